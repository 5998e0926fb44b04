//! One `IOMMU_IOAS_MAP` + `IOMMU_IOAS_UNMAP` pair through the ABI: an
//! `ioctl` on `/dev/iommu` as an unmodified program issues it. Run under
//! `ioasid run` (`benches/run.sh` does); without the shim there is no
//! `/dev/iommu` and the benchmark says so and measures nothing. Each peer
//! is timed in alternation with it through `benches/harness.rs`.

#[path = "../../../benches/harness.rs"]
mod harness;

use std::ffi::c_void;
use std::hint::black_box;

use harness::{Harness, iter};
use ioasid_abi::uapi::{
    IOMMU_IOAS_ALLOC, IOMMU_IOAS_MAP, IOMMU_IOAS_MAP_FIXED_IOVA, IOMMU_IOAS_MAP_READABLE, IOMMU_IOAS_MAP_WRITEABLE,
    IOMMU_IOAS_UNMAP, iommu_ioas_alloc, iommu_ioas_map, iommu_ioas_unmap,
};
use ioasid_engine::{Context, ContextConfig, HostBuffer, Limit, Perm};

const PAGE: u64 = 4096;
const IOVA: u64 = 1 << 32;

fn ioctl<T>(fd: i32, request: u32, arg: &mut T) -> i32 {
    // SAFETY: `arg` is the struct `request` names, and lives for the call.
    unsafe { libc::ioctl(fd, request as _, arg as *mut T as *mut c_void) }
}

fn main() {
    let mut h = Harness::new("abi");
    let figure = "map + unmap: one 4 KiB page through the ABI (ioctl under the shim)";
    let mem = HostBuffer::new(PAGE as usize).unwrap();
    // SAFETY: a NUL-terminated path; the result is checked.
    let fd = unsafe { libc::open(c"/dev/iommu".as_ptr(), libc::O_RDWR) };
    if fd < 0 {
        eprintln!("no /dev/iommu here: run this benchmark under `ioasid run` (benches/run.sh does)");
        return;
    }
    let mut alloc = iommu_ioas_alloc { size: size_of::<iommu_ioas_alloc>() as u32, ..Default::default() };
    assert_eq!(ioctl(fd, IOMMU_IOAS_ALLOC, &mut alloc), 0);
    let map = iommu_ioas_map {
        size: size_of::<iommu_ioas_map>() as u32,
        flags: IOMMU_IOAS_MAP_FIXED_IOVA | IOMMU_IOAS_MAP_READABLE | IOMMU_IOAS_MAP_WRITEABLE,
        ioas_id: alloc.out_ioas_id,
        user_va: mem.addr(),
        length: PAGE,
        iova: IOVA,
        ..Default::default()
    };
    let unmap = iommu_ioas_unmap {
        size: size_of::<iommu_ioas_unmap>() as u32,
        ioas_id: alloc.out_ioas_id,
        iova: IOVA,
        length: PAGE,
    };
    let ours = "`ioctl(IOMMU_IOAS_MAP)` then `ioctl(IOMMU_IOAS_UNMAP)` on `/dev/iommu`, served by the shim";
    let abi = || {
        let (mut m, mut u) = (map, unmap);
        assert_eq!(ioctl(fd, IOMMU_IOAS_MAP, &mut m), 0);
        assert_eq!(ioctl(fd, IOMMU_IOAS_UNMAP, &mut u), 0);
    };

    // The same pair through the library, no ABI in between.
    let ctx = Context::with_config(ContextConfig::isolated(Limit::Pages(u64::MAX)));
    let ioas = ctx.ioas_alloc().unwrap();
    h.compare(
        figure,
        iter("ioasid", ours, abi),
        iter("library call (no ABI)", "`Context::map_user` then `unmap` of the same page, in process", || {
            // SAFETY: `mem` outlives the context.
            unsafe { ctx.map_user(ioas, mem.addr(), PAGE, Some(IOVA), Perm::RW).unwrap() };
            ctx.unmap(ioas, IOVA, PAGE).unwrap()
        }),
    );

    // What the pair would cost in system calls alone with a kernel IOMMU
    // driver: two ioctls that do no work.
    let mut pipe = [0i32; 2];
    // SAFETY: `pipe` has room for both descriptors.
    assert_eq!(unsafe { libc::pipe(pipe.as_mut_ptr()) }, 0);
    h.compare(
        figure,
        iter("ioasid", ours, abi),
        iter("two kernel ioctls (FIONREAD on a pipe)", "two `ioctl(FIONREAD)` system calls on a pipe", || {
            let mut n = 0i32;
            assert_eq!(ioctl(pipe[0], libc::FIONREAD as u32, &mut n), 0);
            assert_eq!(ioctl(pipe[0], libc::FIONREAD as u32, &mut n), 0);
            black_box(n)
        }),
    );
    bar_access(&mut h, fd);
    // SAFETY: our own descriptors, each closed once.
    unsafe {
        libc::close(fd);
        libc::close(pipe[0]);
        libc::close(pipe[1]);
    }
}

/// One 4-byte register access of an emulated PCI function's BAR through its
/// VFIO device file, as QEMU makes one for each trapped guest access, beside
/// the system call alone (the floor a kernel vfio-pci's BAR access pays before
/// it touches the device).
fn bar_access(h: &mut Harness, iommufd: i32) {
    // SAFETY: a NUL-terminated path; the result is checked.
    let dev = unsafe { libc::open(c"/dev/vfio/devices/vfio0".as_ptr(), libc::O_RDWR) };
    if dev < 0 {
        eprintln!("no VFIO device: run under `ioasid run --device pci-epf-test` (benches/run.sh does)");
        return;
    }
    let mut bind = ioasid_abi::vfio::device::vfio_device_bind_iommufd {
        argsz: size_of::<ioasid_abi::vfio::device::vfio_device_bind_iommufd>() as u32,
        iommufd,
        ..Default::default()
    };
    assert_eq!(ioctl(dev, ioasid_abi::vfio::device::VFIO_DEVICE_BIND_IOMMUFD, &mut bind), 0);
    let peer = std::fs::File::options().read(true).write(true).open("/dev/zero").unwrap();
    let zero = std::os::fd::AsRawFd::as_raw_fd(&peer);
    // The endpoint test function's STATUS register (BAR 0, offset 8) and
    // its IRQ_NUMBER register (offset 0x28), which a write only stores.
    let (status, irq_number) = (8i64, 0x28i64);
    let read = |fd: i32, at: i64| {
        let mut v = 0u32;
        // SAFETY: four bytes into `v`, which lives for the call.
        let n = unsafe { libc::pread(fd, (&raw mut v).cast(), 4, at) };
        assert_eq!(n, 4);
        v
    };
    h.compare(
        "BAR access: read one 4-byte register through a VFIO device file",
        iter("ioasid", "`pread` of 4 bytes at BAR 0's STATUS, served by the shim and the device model", || {
            black_box(read(dev, status))
        }),
        iter("one kernel pread", "`pread` of 4 bytes from /dev/zero: the system call alone", || {
            black_box(read(zero, 0))
        }),
    );
    let write = |fd: i32, at: i64| {
        let v = 1u32;
        // SAFETY: four bytes from `v`, which lives for the call.
        let n = unsafe { libc::pwrite(fd, (&raw const v).cast(), 4, at) };
        assert_eq!(n, 4);
    };
    h.compare(
        "BAR access: write one 4-byte register through a VFIO device file",
        iter("ioasid", "`pwrite` of 4 bytes to BAR 0's IRQ_NUMBER, served by the shim and the device model", || {
            write(dev, irq_number)
        }),
        iter("one kernel pwrite", "`pwrite` of 4 bytes to /dev/zero: the system call alone", || write(zero, 0)),
    );
    // SAFETY: our own descriptor, closed once.
    unsafe { libc::close(dev) };
}
