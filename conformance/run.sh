#!/usr/bin/env bash
# Runs Linux's iommufd selftests under `ioasid run`, one suite per kernel
# version (Debian's linux-source-6.12 and linux-source-7.3), in each of
# ioasid's modes:
#   shim        in-process, under the preload shim (`ioasid run`)
#   daemon      under the shim, contexts in `ioasid serve` (`ioasid run --socket`)
#   supervised  statically linked, no shim, through the daemon
#               (`ioasid run --supervised --socket`)
# writes conformance/results-VERSION[-MODE].txt, and fails when a test listed
# in conformance/passing-VERSION[-MODE].txt does not pass (the shim's files
# have no suffix).
#
#   conformance/run.sh                      every suite and mode, checked against their passing lists
#   conformance/run.sh 7.3 daemon           one suite, one mode
#   conformance/run.sh --update [VERSION]   run, and rewrite the passing lists from the results
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
work=$here/work
update=
versions=()
modes=()
for arg in "$@"; do
    case "$arg" in
        --update) update=1 ;;
        6.12 | 7.3) versions+=("$arg") ;;
        shim | daemon | supervised) modes+=("$arg") ;;
        *) echo "usage: $0 [--update] [6.12] [7.3] [shim] [daemon] [supervised]" >&2; exit 2 ;;
    esac
done
[ ${#versions[@]} -gt 0 ] || versions=(6.12 7.3)
[ ${#modes[@]} -gt 0 ] || modes=(shim daemon supervised)
mkdir -p "$work"

log() { printf 'conformance: %s\n' "$*" >&2; }

# The Debian suite each source package comes from; empty means one this
# machine's apt already knows.
suite_of() {
    case "$1" in
        7.3) echo trixie-backports ;;
        *) echo "" ;;
    esac
}

# Downloads package $1 into the current directory. From a suite the system's
# apt does not know, it uses a private apt configuration (its own sources
# list, lists and cache under $work/apt) on the archive the system already
# uses, and leaves the system's sources alone.
download() {
    local pkg=$1 suite=$2
    if [ -z "$suite" ]; then
        apt-get download "$pkg" >/dev/null 2>&1 || { apt-get update -qq && apt-get download "$pkg" >/dev/null; }
        return
    fi
    local apt=$work/apt uri
    uri=$(awk '/^URIs:/ { print $2; exit }' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
    [ -n "$uri" ] || uri=$(awk '/^deb / && $3 !~ /security/ { print $2; exit }' /etc/apt/sources.list)
    mkdir -p "$apt/lists/partial" "$apt/cache/archives/partial"
    echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $uri $suite main" >"$apt/sources.list"
    local opts=(-o "Dir::Etc::SourceList=$apt/sources.list" -o Dir::Etc::SourceParts=/nonexistent
        -o "Dir::State::Lists=$apt/lists" -o "Dir::Cache=$apt/cache" -o Acquire::Languages=none
        -o APT::Sandbox::User=root)
    apt-get "${opts[@]}" update -qq
    apt-get "${opts[@]}" download "$pkg" >/dev/null
}

# 1. The selftests and the headers they need, from the Debian package.
fetch() {
    local v=$1 src=$work/linux-source-$1
    [ -f "$src/.ready" ] && return
    local deb
    deb=$(ls "$work"/linux-source-"$v"_*.deb 2>/dev/null | head -n 1 || true)
    if [ -z "$deb" ]; then
        log "downloading linux-source-$v"
        (cd "$work" && download "linux-source-$v" "$(suite_of "$v")")
        deb=$(ls "$work"/linux-source-"$v"_*.deb | head -n 1)
    fi
    log "extracting the selftests from $(basename "$deb")"
    rm -rf "$work/deb" "$src"
    dpkg-deb -x "$deb" "$work/deb"
    tar -xJf "$work/deb/usr/src/linux-source-$v.tar.xz" -C "$work" --wildcards \
        "linux-source-$v/tools/testing/selftests/iommu/*" \
        "linux-source-$v/tools/testing/selftests/kselftest*.h" \
        "linux-source-$v/include/uapi/linux/iommufd.h" \
        "linux-source-$v/include/uapi/linux/vfio.h" \
        "linux-source-$v/drivers/iommu/iommufd/iommufd_test.h"
    rm -rf "$work/deb"
    touch "$src/.ready"
}

# 2. Headers as `make headers_install` would give them, then the two test
# programs built as their Makefile builds them.
build() {
    local v=$1 src=$work/linux-source-$1 inc=$work/include-$1
    mkdir -p "$inc/linux"
    for h in iommufd.h vfio.h; do
        sed -e 's/\b__user\b//g' -e 's/__counted_by([a-z_]*)//g' "$src/include/uapi/linux/$h" >"$inc/linux/$h"
    done
    local libs=()
    if [ "$v" = 6.12 ]; then
        # Names of later kernels that 6.12's tests already use (values as Linux defines them).
        sed -i -e 's/^\t__u32 out_data_type;$/\tunion {\n\t\t__u32 in_data_type;\n\t\t__u32 out_data_type;\n\t};/' \
            -e 's/^#endif$/#define IOMMU_HW_INFO_TYPE_DEFAULT 0\n#define IOMMU_HW_INFO_FLAG_INPUT_TYPE (1 << 0)\n#endif/' \
            "$inc/linux/iommufd.h"
        local test_h=$src/drivers/iommu/iommufd/iommufd_test.h
        if ! grep -q MOCK_FLAGS_DEVICE_PASID "$test_h"; then
            sed -i -e 's/^\tMOCK_FLAGS_DEVICE_HUGE_IOVA = 1 << 1,$/&\n\tMOCK_FLAGS_DEVICE_PASID = 1 << 2,/' \
                -e 's/^#define IOMMU_TEST_CMD .*/&\n#define MOCK_PASID_WIDTH 20/' "$test_h"
        fi
    else
        libs=(-lcap)
        [ -f /usr/include/sys/capability.h ] ||
            { apt-get install -y -qq libcap-dev >/dev/null 2>&1 ||
                { apt-get update -qq && apt-get install -y -qq libcap-dev >/dev/null; }; }
    fi
    # Each twice: as the Makefile builds it, and statically linked, for the
    # supervised mode (no preloading reaches a static program).
    for t in iommufd iommufd_fail_nth; do
        for link in "" -static; do
            gcc -Wall -O2 -Wno-unused-function -D_GNU_SOURCE -pthread $link -isystem "$inc" \
                -I "$src/tools/testing/selftests" -o "$work/$t-$v$link" \
                "$src/tools/testing/selftests/iommu/$t.c" "${libs[@]}"
        done
    done
}

# 3. Each program in mode $2; its TAP becomes one line per test; the
# passing list may only grow.
check() {
    local v=$1 mode=$2 suffix= run=(run) exe=
    case "$mode" in
        daemon) suffix=-daemon run=(run --socket "$socket") ;;
        supervised) suffix=-supervised run=(run --supervised --socket "$socket") exe=-static ;;
    esac
    local tap=$work/all-$v$suffix.tap results=$here/results-$v$suffix.txt passing=$here/passing-$v$suffix.txt
    : >"$tap"
    for t in iommufd iommufd_fail_nth; do
        log "running $t ($v, $mode)"
        timeout 1800 "$ioasid" "${run[@]}" -- "$work/$t-$v$exe" >"$work/$t-$v$suffix.tap" 2>&1 || true
        sed "s/^\(not \)\{0,1\}ok [0-9]* /&$t: /" "$work/$t-$v$suffix.tap" >>"$tap"
    done
    python3 "$here/parse_tap.py" "$tap" >"$results"
    log "$v ($mode): $(grep -c '^PASS' "$results") passed of $(grep -c '' "$results")"
    if [ -n "$update" ]; then
        grep '^PASS' "$results" | cut -f2 | sort >"$passing"
        log "$(basename "$passing") updated: $(wc -l <"$passing") tests"
        return 0
    fi
    local regressed
    regressed=$(comm -23 <(sort "$passing") <(grep '^PASS' "$results" | cut -f2 | sort))
    if [ -n "$regressed" ]; then
        log "$v ($mode): tests that passed before and do not now:"
        printf '  %s\n' $regressed >&2
        return 1
    fi
    log "$v ($mode): no regressions against $(basename "$passing")"
}

command -v gcc >/dev/null || { apt-get update -qq && apt-get install -y -qq gcc libc6-dev >/dev/null; }
for v in "${versions[@]}"; do
    fetch "$v"
    build "$v"
done
(cd "$root" && cargo build -q --workspace)
ioasid=$root/target/debug/ioasid

# Huge pages: a few dozen tests map hugetlb memory.
want=128
if [ "$(cat /proc/sys/vm/nr_hugepages)" -lt "$want" ]; then
    if ! { echo "$want" >/proc/sys/vm/nr_hugepages; } 2>/dev/null; then
        log "cannot set vm.nr_hugepages=$want (not root?); the hugetlb tests will fail"
    fi
fi
log "hugetlb pages available: $(cat /proc/sys/vm/nr_hugepages)"

# The daemon the daemon and supervised modes use, stopped on the way out.
socket=$work/ioasid.sock
daemon_pid=
case " ${modes[*]} " in
    *" daemon "* | *" supervised "*)
        "$ioasid" serve --socket "$socket" 2>"$work/serve.log" &
        daemon_pid=$!
        trap 'kill $daemon_pid 2>/dev/null; wait $daemon_pid 2>/dev/null' EXIT
        for _ in $(seq 100); do [ -S "$socket" ] && break; sleep 0.1; done
        [ -S "$socket" ] || { log "ioasid serve did not start:"; cat "$work/serve.log" >&2; exit 1; }
        ;;
esac

status=0
for v in "${versions[@]}"; do
    for mode in "${modes[@]}"; do
        check "$v" "$mode" || status=1
    done
done
exit $status
