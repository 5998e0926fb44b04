//! Nested HWPTs with VT-d stage-1 data, through the ABI.

use std::sync::Arc;

use ioasid_abi::Errno;
use ioasid_abi::uapi::*;
use ioasid_engine::{Context, ContextConfig, DeviceInfo, HwptFlags, Limit};

mod common;
use common::call;

/// A VT-d device and a nest-parent HWPT; returns (ctx, dev, parent).
fn setup() -> (Arc<Context>, u32, u32) {
    let ctx = Arc::new(Context::with_config(ContextConfig::isolated(Limit::Pages(1 << 20))));
    let ioas = ctx.ioas_alloc().unwrap();
    let dev = ctx.bind_device(DeviceInfo::new("vf", 1)).unwrap();
    let parent = ctx.hwpt_alloc(dev, ioas, HwptFlags { nest_parent: true, dirty_tracking: false }, None).unwrap();
    (ctx, dev.get(), parent.get())
}

fn alloc(ctx: &Arc<Context>, dev: u32, parent: u32, s1: &mut iommu_hwpt_vtd_s1, len: u32) -> Result<u32, Errno> {
    let mut c = iommu_hwpt_alloc {
        size: 48,
        dev_id: dev,
        pt_id: parent,
        data_type: IOMMU_HWPT_DATA_VTD_S1,
        data_len: len,
        data_uptr: s1 as *mut _ as u64,
        ..Default::default()
    };
    call(ctx, IOMMU_HWPT_ALLOC, &mut c).map(|()| c.out_hwpt_id)
}

fn s1() -> iommu_hwpt_vtd_s1 {
    iommu_hwpt_vtd_s1 { flags: 0, pgtbl_addr: 0x1000, addr_width: 48, __reserved: 0 }
}

#[test]
fn vtd_s1_alloc_checks_as_intel_does() {
    let (ctx, dev, parent) = setup();
    assert_eq!(alloc(&ctx, dev, parent, &mut s1(), 16), Err(Errno::EINVAL), "data too short");
    assert_eq!(alloc(&ctx, dev, parent, &mut iommu_hwpt_vtd_s1 { flags: 1 << 3, ..s1() }, 24), Err(Errno::EOPNOTSUPP));
    assert_eq!(alloc(&ctx, dev, parent, &mut iommu_hwpt_vtd_s1 { addr_width: 39, ..s1() }, 24), Err(Errno::EINVAL));
    assert_eq!(alloc(&ctx, dev, parent, &mut iommu_hwpt_vtd_s1 { pgtbl_addr: 0x1008, ..s1() }, 24), Err(Errno::EINVAL));
    let id = alloc(&ctx, dev, parent, &mut iommu_hwpt_vtd_s1 { addr_width: 57, ..s1() }, 24).unwrap();
    assert!(matches!(ctx.get(ioasid_engine::HwptId::new(id)), Ok(ioasid_engine::Hwpt::Nested(_))));
}

#[test]
fn vtd_s1_invalidation_checks_each_descriptor() {
    let (ctx, dev, parent) = setup();
    let id = alloc(&ctx, dev, parent, &mut s1(), 24).unwrap();
    let run = |entries: &mut [iommu_hwpt_vtd_s1_invalidate], data_type: u32| {
        let mut c = iommu_hwpt_invalidate {
            size: 32,
            hwpt_id: id,
            data_uptr: entries.as_mut_ptr() as u64,
            data_type,
            entry_len: 24,
            entry_num: entries.len() as u32,
            __reserved: 0,
        };
        (call(&ctx, IOMMU_HWPT_INVALIDATE, &mut c), c.entry_num)
    };
    let ok =
        iommu_hwpt_vtd_s1_invalidate { addr: 0x40_0000, npages: 1, flags: IOMMU_VTD_INV_FLAGS_LEAF, __reserved: 0 };
    assert_eq!(run(&mut [ok], IOMMU_HWPT_INVALIDATE_DATA_VTD_S1), (Ok(()), 1));
    assert_eq!(run(&mut [ok], 7), (Err(Errno::EINVAL), 0), "another vendor's type");
    let bad_flag = iommu_hwpt_vtd_s1_invalidate { flags: 2, ..ok };
    assert_eq!(run(&mut [ok, bad_flag], IOMMU_HWPT_INVALIDATE_DATA_VTD_S1), (Err(Errno::EOPNOTSUPP), 1));
    let unaligned = iommu_hwpt_vtd_s1_invalidate { addr: 0x40_0008, ..ok };
    assert_eq!(run(&mut [unaligned], IOMMU_HWPT_INVALIDATE_DATA_VTD_S1), (Err(Errno::EINVAL), 0));
    let all_but_addr = iommu_hwpt_vtd_s1_invalidate { npages: u64::MAX, ..ok };
    assert_eq!(run(&mut [all_but_addr], IOMMU_HWPT_INVALIDATE_DATA_VTD_S1), (Err(Errno::EINVAL), 0));
    let everything = iommu_hwpt_vtd_s1_invalidate { addr: 0, npages: u64::MAX, ..ok };
    assert_eq!(run(&mut [everything], IOMMU_HWPT_INVALIDATE_DATA_VTD_S1), (Ok(()), 1));
    assert_eq!(run(&mut [], IOMMU_HWPT_INVALIDATE_DATA_VTD_S1), (Ok(()), 0), "an empty array probes the type");
}
