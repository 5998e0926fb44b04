#!/usr/bin/env bash
# Runs Linux's iommufd selftests (from Debian's linux-source-6.12) under
# `ioasid run`, writes conformance/results.txt, and fails when a test listed
# in conformance/passing.txt does not pass.
#
#   conformance/run.sh            run and check against passing.txt
#   conformance/run.sh --update   run and rewrite passing.txt from the results
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
work=$here/work
src=$work/linux-source-6.12
update=${1:-}
mkdir -p "$work"

log() { printf 'conformance: %s\n' "$*" >&2; }

# 1. The selftests and the headers they need, from the Debian package.
if [ ! -f "$src/.ready" ]; then
    deb=$(ls "$work"/linux-source-6.12_*.deb 2>/dev/null | head -n 1 || true)
    if [ -z "$deb" ]; then
        log "downloading linux-source-6.12"
        (cd "$work" && apt-get download linux-source-6.12 >/dev/null 2>&1) ||
            { apt-get update -qq && (cd "$work" && apt-get download linux-source-6.12 >/dev/null); }
        deb=$(ls "$work"/linux-source-6.12_*.deb | head -n 1)
    fi
    log "extracting the selftests from $(basename "$deb")"
    rm -rf "$work/deb" "$src"
    dpkg-deb -x "$deb" "$work/deb"
    tar -xJf "$work"/deb/usr/src/linux-source-6.12.tar.xz -C "$work" --wildcards \
        'linux-source-6.12/tools/testing/selftests/iommu/*' \
        'linux-source-6.12/tools/testing/selftests/kselftest*.h' \
        'linux-source-6.12/include/uapi/linux/iommufd.h' \
        'linux-source-6.12/include/uapi/linux/vfio.h' \
        'linux-source-6.12/drivers/iommu/iommufd/iommufd_test.h'
    rm -rf "$work/deb"
    touch "$src/.ready"
fi

# 2. Headers as `make headers_install` would give them, plus the names of
# later kernels that these tests already use (values as Linux defines them).
inc=$work/include
mkdir -p "$inc/linux"
for h in iommufd.h vfio.h; do
    sed -e 's/\b__user\b//g' "$src/include/uapi/linux/$h" >"$inc/linux/$h"
done
sed -i -e 's/^\t__u32 out_data_type;$/\tunion {\n\t\t__u32 in_data_type;\n\t\t__u32 out_data_type;\n\t};/' \
    -e 's/^#endif$/#define IOMMU_HW_INFO_TYPE_DEFAULT 0\n#define IOMMU_HW_INFO_FLAG_INPUT_TYPE (1 << 0)\n#endif/' \
    "$inc/linux/iommufd.h"
test_h=$src/drivers/iommu/iommufd/iommufd_test.h
if ! grep -q MOCK_FLAGS_DEVICE_PASID "$test_h"; then
    sed -i -e 's/^\tMOCK_FLAGS_DEVICE_HUGE_IOVA = 1 << 1,$/&\n\tMOCK_FLAGS_DEVICE_PASID = 1 << 2,/' \
        -e 's/^#define IOMMU_TEST_CMD .*/&\n#define MOCK_PASID_WIDTH 20/' "$test_h"
fi

# 3. Build the two test programs and ioasid.
command -v gcc >/dev/null || { apt-get update -qq && apt-get install -y -qq gcc libc6-dev >/dev/null; }
for t in iommufd iommufd_fail_nth; do
    gcc -Wall -O2 -Wno-unused-function -D_GNU_SOURCE -pthread -isystem "$inc" \
        -o "$work/$t" "$src/tools/testing/selftests/iommu/$t.c"
done
(cd "$root" && cargo build -q --workspace)
ioasid=$root/target/debug/ioasid

# 4. Huge pages: 22 tests map hugetlb memory.
want=128
if [ "$(cat /proc/sys/vm/nr_hugepages)" -lt "$want" ]; then
    if ! { echo "$want" >/proc/sys/vm/nr_hugepages; } 2>/dev/null; then
        log "cannot set vm.nr_hugepages=$want (not root?); the hugetlb tests will fail"
    fi
fi
log "hugetlb pages available: $(cat /proc/sys/vm/nr_hugepages)"

# 5. Run each program under the shim and turn its TAP into results.
: >"$work/all.tap"
for t in iommufd iommufd_fail_nth; do
    log "running $t"
    timeout 1800 "$ioasid" run -- "$work/$t" >"$work/$t.tap" 2>&1 || true
    sed "s/^\(not \)\{0,1\}ok [0-9]* /&$t: /" "$work/$t.tap" >>"$work/all.tap"
done
python3 "$here/parse_tap.py" "$work/all.tap" >"$here/results.txt"
grep -c '^PASS' "$here/results.txt" | xargs -I{} echo "conformance: {} passed of $(grep -c '' "$here/results.txt")" >&2

# 6. The passing set may only grow.
if [ "$update" = "--update" ]; then
    grep '^PASS' "$here/results.txt" | cut -f2 | sort >"$here/passing.txt"
    log "passing.txt updated: $(wc -l <"$here/passing.txt") tests"
    exit 0
fi
regressed=$(comm -23 <(sort "$here/passing.txt") <(grep '^PASS' "$here/results.txt" | cut -f2 | sort))
if [ -n "$regressed" ]; then
    log "tests that passed before and do not now:"
    printf '  %s\n' $regressed >&2
    exit 1
fi
log "no regressions against passing.txt"
