//! ioctls issued by another process (a forked child, through its parent's
//! ioasid): arguments are read and answers written in that process's
//! memory, its mappings are taken when pinned, and commands that would hand
//! it a descriptor are refused.

use std::sync::Arc;

use ioasid_abi::uapi::*;
use ioasid_abi::user::OtherProcess;
use ioasid_abi::{Errno, ioctl};
use ioasid_engine::{Context, ContextConfig, DeviceInfo, HostBuffer, Limit};
use zerocopy::{FromBytes, IntoBytes};

/// This process stands in for the other one: the calls go through
/// process_vm_readv/writev by pid all the same.
fn other() -> OtherProcess {
    // SAFETY: getpid has no preconditions.
    OtherProcess { pid: unsafe { libc::getpid() } }
}

fn call<T: IntoBytes + FromBytes>(ctx: &Arc<Context>, req: u32, cmd: &mut T) -> Result<(), Errno> {
    ioctl(ctx, &other(), req, cmd as *mut T as u64).map(drop)
}

#[test]
fn another_process_maps_and_gets_answers() {
    let ctx = Arc::new(Context::with_config(ContextConfig::isolated(Limit::Pages(1 << 20))));
    let mut alloc = iommu_ioas_alloc { size: 12, ..Default::default() };
    call(&ctx, IOMMU_IOAS_ALLOC, &mut alloc).unwrap();
    assert_ne!(alloc.out_ioas_id, 0, "the answer was written back by pid");
    let mem = HostBuffer::new(8192).unwrap();
    mem.write_at(0, b"theirs");
    let mut map = iommu_ioas_map {
        size: 40,
        flags: IOMMU_IOAS_MAP_READABLE | IOMMU_IOAS_MAP_WRITEABLE,
        ioas_id: alloc.out_ioas_id,
        user_va: mem.addr(),
        length: 8192,
        ..Default::default()
    };
    call(&ctx, IOMMU_IOAS_MAP, &mut map).unwrap();
    let dev = ctx.bind_device(DeviceInfo::new("d", 1)).unwrap();
    ctx.attach(dev, ioasid_engine::IoasId::new(alloc.out_ioas_id)).unwrap();
    let mut seen = [0u8; 6];
    ctx.get(dev).unwrap().dma_read(map.iova, &mut seen).unwrap();
    assert_eq!(&seen, b"theirs");
    // A mapping of memory the process does not have fails when pinned.
    let mut bad = iommu_ioas_map { user_va: 0x1000, iova: 0, ..map };
    assert_eq!(call(&ctx, IOMMU_IOAS_MAP, &mut bad), Err(Errno::EFAULT), "pinned at once: a domain exists");
}

#[test]
fn commands_that_make_descriptors_stay_local() {
    let ctx = Arc::new(Context::with_config(ContextConfig::isolated(Limit::Pages(1 << 20))));
    let mut fault = iommu_fault_alloc { size: 16, ..Default::default() };
    assert_eq!(call(&ctx, IOMMU_FAULT_QUEUE_ALLOC, &mut fault), Err(Errno::EOPNOTSUPP));
    assert!(ctx.objects().is_empty(), "nothing was left behind");
}
