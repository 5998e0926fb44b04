#!/usr/bin/env python3
"""Turns kselftest TAP output into one line per test:
STATUS<TAB>program: fixture.variant.test<TAB>reason (for what did not pass)."""
import re
import sys

result = re.compile(r"^(not ok|ok) \d+ (\S+: \S+)(?: # (.*))?$")
reasons = []
for line in open(sys.argv[1], errors="replace"):
    line = line.rstrip("\n")
    if line.startswith("#  RUN"):
        reasons = []
        continue
    m = result.match(line)
    if not m:
        if line.startswith("# ") and ("Expected" in line or "Test " in line or "SKIP" in line):
            reasons.append(re.sub(r"^\S*/", "", line[2:].strip()))
        continue
    verdict, name, directive = m.groups()
    if directive and directive.upper().startswith("SKIP"):
        status, why = "SKIP", directive[4:].strip()
    elif verdict == "ok":
        status, why = "PASS", ""
    else:
        status, why = "FAIL", reasons[0] if reasons else "failed"
    print(f"{status}\t{name}\t{why}")
