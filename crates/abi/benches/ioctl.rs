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
    // SAFETY: our own descriptors, each closed once.
    unsafe {
        libc::close(fd);
        libc::close(pipe[0]);
        libc::close(pipe[1]);
    }
}
