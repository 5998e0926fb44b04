#!/usr/bin/env bash
# End-to-end test of ioasid's VFIO device files: an unmodified QEMU 10 passes
# an emulated Linux "PCI endpoint test" function to a small Linux guest, whose
# pci_endpoint_test driver does DMA through ioasid, and the guest runs Linux's
# pcitest cases against it.
#
#   e2e/qemu-pcitest.sh --no-device   the guest alone: it must boot and report
#                                     that no endpoint device exists
#   e2e/qemu-pcitest.sh --direct      ioasid run --device pci-epf-test,... --
#                                     qemu ... -device vfio-pci,iommufd=...
#   e2e/qemu-pcitest.sh --viommu      the same behind an emulated VT-d
#                                     (intel-iommu,caching-mode=on), so every
#                                     guest DMA mapping becomes an IOAS map
#
# Environment:
#   IOASID          the ioasid executable (default: target/debug/ioasid)
#   BDF             the device's address (default 0000:01:00.0)
#   QEMU_EXTRA      more QEMU arguments (word-split)
#   APPEND_EXTRA    more guest kernel command line
#   BOOT_TIMEOUT    seconds one boot may take (default 300)
#   BENCH_OUT       a file to write the guest's 1 MiB throughput rounds to,
#                   as benchmark rows (benches/run.sh reads them)
#
# Runs as root on Debian bookworm: it installs what it lacks (QEMU 10 from
# bookworm-backports through a private apt configuration, leaving /etc/apt
# alone), builds a tinyconfig guest kernel from Debian's linux-source-6.12
# (cached under e2e/work/ by the config fragment's hash), pcitest and an
# initramfs, and boots the guest under TCG. Exit status 0 only when the
# guest's summary says `0 failed` (--no-device: when it reports the missing
# device).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
work=$here/work
guest=$here/guest
kversion=6.12
bdf=${BDF:-0000:01:00.0}
timeout_s=${BOOT_TIMEOUT:-300}

mode=
case "${1:-}" in
    --no-device | --direct | --viommu) mode=${1#--} ;;
    *) echo "usage: $0 --no-device|--direct|--viommu" >&2; exit 2 ;;
esac
[ $# -eq 1 ] || { echo "usage: $0 --no-device|--direct|--viommu" >&2; exit 2; }
mkdir -p "$work"

log() { printf 'e2e: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

# apt with a private configuration: this machine's apt may not know
# bookworm-backports, and CI must not change the system's sources. Its lists
# are refreshed once per run, so a stale cache never names removed versions.
apt_updated=
apt_private() {
    local apt=$work/apt uri sec key=/usr/share/keyrings/debian-archive-keyring.gpg
    local opts=(-o "Dir::Etc::SourceList=$apt/sources.list" -o Dir::Etc::SourceParts=/nonexistent
        -o "Dir::State::Lists=$apt/lists" -o "Dir::Cache=$apt/cache" -o Acquire::Languages=none
        -o APT::Sandbox::User=root)
    if [ -z "$apt_updated" ]; then
        uri=$(awk '/^URIs:/ { print $2; exit }' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
        [ -n "$uri" ] || uri=$(awk '/^deb / && $3 !~ /security/ { print $2; exit }' /etc/apt/sources.list 2>/dev/null || true)
        [ -n "$uri" ] || uri=http://deb.debian.org/debian
        # Security and point-release updates too: -dev packages must match
        # the exact versions of the libraries already installed from them.
        sec=$(awk '/^URIs:/ { u = $2 } /^Suites:/ && /security/ { print u; exit }' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
        [ -n "$sec" ] || sec=$(awk '/^deb / && $3 ~ /security/ { print $2; exit }' /etc/apt/sources.list 2>/dev/null || true)
        [ -n "$sec" ] || sec=http://deb.debian.org/debian-security
        mkdir -p "$apt/lists/partial" "$apt/cache/archives/partial"
        printf 'deb [signed-by=%s] %s %s main\n' "$key" "$uri" bookworm "$key" "$uri" bookworm-updates \
            "$key" "$uri" bookworm-backports "$key" "$sec" bookworm-security >"$apt/sources.list"
        apt-get "${opts[@]}" update -qq >&2
        apt_updated=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get "${opts[@]}" "$@"
}

qemu_major() {
    qemu-system-x86_64 --version 2>/dev/null | sed -n 's/^QEMU emulator version \([0-9]*\)\..*/\1/p'
}

# 1. Tools: a kernel build, static userland for the guest, and QEMU 10:
# ioasid's VFIO front end follows the iommufd/VFIO sequence of that version,
# older ones (bookworm has 7.2) have no iommufd backend at all.
install_tools() {
    local need=() t
    for t in gcc:gcc make:make bc:bc flex:flex bison:bison cpio:cpio xz:xz-utils \
        perl:perl busybox:busybox-static; do
        command -v "${t%%:*}" >/dev/null || need+=("${t#*:}")
    done
    [ -f /usr/include/libelf.h ] || need+=(libelf-dev)
    [ -f /usr/include/openssl/ssl.h ] || need+=(libssl-dev)
    [ -f /usr/lib/x86_64-linux-gnu/libc.a ] || need+=(libc6-dev)
    # The guest needs a statically linked busybox: Debian's busybox-static.
    if command -v busybox >/dev/null && ! file_is_static "$(command -v busybox)"; then
        need+=(busybox-static)
    fi
    if [ ${#need[@]} -gt 0 ]; then
        log "installing ${need[*]}"
        apt_private install -y -q --no-install-recommends "${need[@]}" >"$work/apt-install.log" 2>&1 ||
            { cat "$work/apt-install.log" >&2; die "installing ${need[*]} failed"; }
    fi
    if [ "$(qemu_major)" = "" ] || [ "$(qemu_major)" -lt 10 ]; then
        log "installing QEMU 10 from bookworm-backports"
        apt_private install -y -q --no-install-recommends -t bookworm-backports qemu-system-x86 \
            >"$work/apt-qemu.log" 2>&1 || { cat "$work/apt-qemu.log" >&2; die "installing QEMU failed"; }
    fi
    log "$(qemu-system-x86_64 --version | head -n 1)"
}

file_is_static() {
    ! LC_ALL=C ldd "$1" >/dev/null 2>&1
}

# 2. The guest kernel. The key covers the fragment and the source package, so
# changing either rebuilds and a re-run skips the ~6 minute build.
kernel_deb() {
    local deb
    deb=$(ls "$root"/conformance/work/linux-source-${kversion}_*.deb "$work"/linux-source-${kversion}_*.deb 2>/dev/null | head -n 1 || true)
    if [ -z "$deb" ]; then
        log "downloading linux-source-$kversion"
        (cd "$work" && { apt-get download "linux-source-$kversion" >/dev/null 2>&1 ||
            { apt-get update -qq >&2 && apt-get download "linux-source-$kversion" >/dev/null; }; })
        deb=$(ls "$work"/linux-source-${kversion}_*.deb | head -n 1)
    fi
    echo "$deb"
}

kernel_src() {
    local deb=$1 src=$work/linux-source-$kversion
    if [ ! -f "$src/.ready" ]; then
        log "extracting $(basename "$deb")"
        rm -rf "$src"
        dpkg-deb --fsys-tarfile "$deb" | tar -xO "./usr/src/linux-source-$kversion.tar.xz" | tar -xJ -C "$work"
        touch "$src/.ready"
    fi
    echo "$src"
}

build_kernel() {
    local deb=$1 key bzimage src
    key=$( (cat "$guest/kernel.config"; basename "$deb") | sha256sum | cut -c1-16)
    bzimage=$work/bzImage-$key
    if [ -f "$bzimage" ]; then
        log "guest kernel: $(basename "$bzimage") (cached)"
        echo "$bzimage"
        return
    fi
    src=$(kernel_src "$deb")
    log "configuring the guest kernel (tinyconfig + e2e/guest/kernel.config)"
    make -C "$src" -s tinyconfig >/dev/null
    "$src/scripts/kconfig/merge_config.sh" -m -O "$src" "$src/.config" "$guest/kernel.config" >/dev/null
    make -C "$src" -s olddefconfig >&2
    # A symbol Kconfig dropped (an unmet dependency) would silently change
    # what the test covers.
    local missing
    missing=$(grep '^CONFIG_' "$guest/kernel.config" | while read -r l; do grep -qx "$l" "$src/.config" || echo "$l"; done)
    [ -z "$missing" ] || die "kernel options not applied: $missing"
    log "building the guest kernel (make -j2 bzImage, about 6 minutes)"
    make -C "$src" -j2 bzImage >"$work/kernel-build.log" 2>&1 ||
        { tail -n 30 "$work/kernel-build.log" >&2; die "kernel build failed (see $work/kernel-build.log)"; }
    cp "$src/arch/x86/boot/bzImage" "$bzimage"
    log "guest kernel: $(basename "$bzimage")"
    echo "$bzimage"
}

# 3. pcitest (from the same kernel source, as Linux's tools/pci builds it),
# the timing helper and the initramfs. gen_init_cpio writes /dev/console
# without needing mknod.
build_initramfs() {
    local deb=$1 src out=$work/initramfs.cpio.gz inc=$work/include
    src=$(kernel_src "$deb")
    mkdir -p "$inc/linux"
    cp "$src/include/uapi/linux/pcitest.h" "$inc/linux/"
    gcc -static -O2 -Wall -isystem "$inc" -o "$work/pcitest" "$src/tools/pci/pcitest.c"
    gcc -static -O2 -Wall -o "$work/timeit" "$guest/timeit.c"
    gcc -O2 -o "$work/gen_init_cpio" "$src/usr/gen_init_cpio.c"
    local busybox
    busybox=$(command -v busybox)
    file_is_static "$busybox" || die "$busybox is not statically linked (install busybox-static)"
    cat >"$work/initramfs.list" <<EOF
dir /dev 0755 0 0
nod /dev/console 0600 0 0 c 5 1
dir /proc 0755 0 0
dir /sys 0755 0 0
dir /bin 0755 0 0
file /bin/busybox $busybox 0755 0 0
slink /bin/sh busybox 0777 0 0
file /bin/pcitest $work/pcitest 0755 0 0
file /bin/timeit $work/timeit 0755 0 0
file /init $guest/init 0755 0 0
EOF
    "$work/gen_init_cpio" "$work/initramfs.list" | gzip -9 >"$out"
    log "initramfs: $(basename "$out") ($(stat -c %s "$out") bytes)"
    echo "$out"
}

# 4. One boot. QEMU's own errors go to the console and the log, and a
# timeout ends a guest that hangs.
boot() {
    local kernel=$1 initrd=$2 console=$work/console-$mode.log
    local append="console=ttyS0 panic=-1 ${APPEND_EXTRA:-}"
    # No NIC or VGA: the guest has no use for them and they only slow the boot.
    local qemu=(qemu-system-x86_64 -machine q35 -accel tcg -m 512 -nographic -no-reboot -nic none -vga none
        -kernel "$kernel" -initrd "$initrd")
    local wrap=()
    case "$mode" in
        no-device) ;;
        direct | viommu)
            local ioasid=${IOASID:-$root/target/debug/ioasid}
            [ -x "$ioasid" ] || die "no ioasid executable at $ioasid (build it, or set IOASID)"
            wrap=("$ioasid" run --device "pci-epf-test,bdf=$bdf" --)
            if [ "$mode" = viommu ]; then
                # The vIOMMU must exist before the device that sits behind it;
                # vfio needs caching mode to see the guest's mappings.
                qemu+=(-device intel-iommu,caching-mode=on)
                append+=" intel_iommu=on"
            fi
            qemu+=(-object iommufd,id=iommufd0 -device "vfio-pci,host=$bdf,iommufd=iommufd0")
            ;;
    esac
    # shellcheck disable=SC2206 # QEMU_EXTRA is a list of words on purpose
    qemu+=(${QEMU_EXTRA:-} -append "$append")
    log "booting ($mode, timeout ${timeout_s}s): ${wrap[*]} ${qemu[*]}"
    local status
    set +e
    timeout --kill-after=10 "$timeout_s" "${wrap[@]}" "${qemu[@]}" </dev/null 2>&1 |
        tr -d '\r' | tee "$console" >&2
    status=${PIPESTATUS[0]}
    set -e
    [ "$status" != 124 ] || log "the guest did not finish within ${timeout_s}s"
    summary=$(grep -a '^pcitest: [0-9]* passed, [0-9]* failed$' "$console" | tail -n 1 || true)
    [ -n "$summary" ] || { log "no summary from the guest (the boot command exited $status; log: $console)"; return 1; }
    log "$summary"
    case "$mode" in
        no-device)
            [ "$summary" = "pcitest: 0 passed, 1 failed" ] &&
                grep -aq '^not ok device' "$console"
            ;;
        *) [[ "$summary" == *", 0 failed" ]] ;;
    esac
}

# The guest's throughput rounds as benchmark rows (benches/harness.rs's
# format): each transfer beside the plain copy timed next to it.
bench_rows() {
    local console=$work/console-$mode.log
    python3 - "$console" "$mode" >"$BENCH_OUT" <<'PY'
import json, re, sys
console, mode = sys.argv[1], sys.argv[2]
rounds = [tuple(map(int, m.groups())) for m in
          re.finditer(r"^throughput: round \d+ read (\d+) ns .*write (\d+) ns .*memcpy (\d+) (\d+) ns$",
                      open(console, errors="replace").read(), re.M)]
where = "through QEMU's VT-d into ioasid" if mode == "viommu" else "through the IOAS QEMU maps guest RAM into"
peer = {"name": "guest memcpy", "does": "`dd` of 1 MiB from /dev/zero to /dev/null in the same guest, timed next to it"}
for i, what in ((0, "read"), (1, "write")):
    print(json.dumps({
        "figure": f"guest pcitest {what} of 1 MiB ({mode})", "x": None, "unit": "ns",
        "ours": {"name": "ioasid", "does": f"`pcitest -{what[0]} -s 1048576` in a QEMU TCG guest: DMA {where}",
                 "values": [r[i] for r in rounds]},
        "peer": dict(peer, values=[r[2 + i] for r in rounds]),
    }))
PY
}

install_tools
deb=$(kernel_deb)
kernel=$(build_kernel "$deb")
initrd=$(build_initramfs "$deb")
if boot "$kernel" "$initrd"; then
    [ -z "${BENCH_OUT:-}" ] || bench_rows
    log "PASS ($mode)"
else
    log "FAIL ($mode)"
    exit 1
fi
