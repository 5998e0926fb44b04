#!/usr/bin/env bash
# Runs the benchmarks and writes BENCHMARKS.md and benches/working-set.svg.
# Each figure is timed in alternation with its peer (benches/harness.rs):
# 15 alternations of about 20 ms samples in a full run, 5 of 5 ms in a quick one.
#
#   bash benches/run.sh           full run
#   bash benches/run.sh --quick   short run
# Extra arguments (a figure's name, or part of it) run only matching figures.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=full
if [ "${1:-}" = "--quick" ]; then
    mode=quick
    export IOASID_BENCH_QUICK=1
    shift
fi
rm -rf target/ioasid-bench
log=target/bench.log
fail() { tail -n 20 "$log"; exit 1; }
echo "engine benchmarks ($mode run)..."
cargo bench -q -p ioasid-engine --bench engine -- "$@" >"$log" 2>&1 || fail
# The ABI benchmark runs as an unmodified program under the preload shim.
echo "ABI benchmark under ioasid run..."
cargo build -q --release -p ioasid -p ioasid-preload >>"$log" 2>&1 || fail
# The executable of bench NAME of package PKG, built.
bench_exe() {
    cargo bench -q -p "$1" --bench "$2" --no-run --message-format=json 2>>"$log" |
        python3 -c 'import json,sys; print([m["executable"] for m in map(json.loads, sys.stdin) if m.get("executable") and m["target"]["name"] == sys.argv[1]][0])' "$2"
}
ioctl_bench=$(bench_exe ioasid-abi ioctl) || fail
CARGO_TARGET_DIR=target target/release/ioasid run --device pci-epf-test -- "$ioctl_bench" --bench "$@" >>"$log" 2>&1 || fail
# The daemon's rows: a program reaching `ioasid serve` through the shim and
# supervised, then clients coming and going. The daemon runs on a socket of
# its own for them and is stopped after.
echo "daemon benchmarks against ioasid serve..."
daemon_bench=$(bench_exe ioasid-serve daemon) || fail
remote_bench=$(bench_exe ioasid-serve remote) || fail
serve_dir=$(mktemp -d)
sock=$serve_dir/ioasid.sock
target/release/ioasid serve --socket "$sock" 2>"$serve_dir/log" &
serve_pid=$!
trap 'kill "$serve_pid" 2>/dev/null || true; rm -rf "$serve_dir"' EXIT
# It says "listening" once the socket accepts connections.
for _ in $(seq 200); do
    grep -q listening "$serve_dir/log" && break
    kill -0 "$serve_pid" 2>/dev/null || { cat "$serve_dir/log" >>"$log"; fail; }
    sleep 0.05
done
export IOASID_BENCH_SOCKET=$sock
IOASID_BENCH_DAEMON=shim target/release/ioasid run --socket "$sock" -- "$daemon_bench" --bench "$@" >>"$log" 2>&1 || fail
IOASID_BENCH_DAEMON=supervised target/release/ioasid run --supervised --socket "$sock" -- "$daemon_bench" --bench "$@" \
    >>"$log" 2>&1 || fail
IOASID_BENCH_DAEMON=clients "$daemon_bench" --bench "$@" >>"$log" 2>&1 || fail
# A back end in another process: this bench is the VMM, and starts itself
# again as the back end, whose DMA goes through the daemon's address spaces.
echo "back ends in other processes against ioasid serve..."
"$remote_bench" --bench "$@" >>"$log" 2>&1 || fail
kill "$serve_pid"
wait "$serve_pid" || true
cat "$serve_dir/log" >>"$log"
# The guest's DMA throughput through QEMU, when the end-to-end guest is built.
if ls e2e/work/bzImage-* >/dev/null 2>&1 && command -v qemu-system-x86_64 >/dev/null; then
    echo "end to end: a QEMU guest's pcitest through ioasid..."
    for m in direct viommu; do
        IOASID=target/release/ioasid BENCH_OUT=target/ioasid-bench/e2e-$m.jsonl bash e2e/qemu-pcitest.sh --$m >>"$log" 2>&1 || fail
    done
else
    echo "end to end: skipped (run e2e/qemu-pcitest.sh --direct once to build its guest)"
fi
python3 benches/report.py target "$mode" benches/working-set.svg >BENCHMARKS.md
echo "wrote BENCHMARKS.md and benches/working-set.svg ($mode run)"
