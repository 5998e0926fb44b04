#!/usr/bin/env bash
# Runs the benchmarks and writes BENCHMARKS.md and benches/working-set.svg.
#
#   bash benches/run.sh           full run (a few minutes)
#   bash benches/run.sh --quick   short run, under two minutes
set -euo pipefail
cd "$(dirname "$0")/.."
mode=full
if [ "${1:-}" = "--quick" ]; then
    mode=quick
    export IOASID_BENCH_QUICK=1
fi
rm -rf target/criterion
cargo bench -q -p ioasid-engine --bench engine >target/bench.log 2>&1 || { tail -n 20 target/bench.log; exit 1; }
python3 benches/report.py target/criterion "$mode" benches/working-set.svg >BENCHMARKS.md
echo "wrote BENCHMARKS.md and benches/working-set.svg ($mode run)"
