//! `IOMMU_HWPT_ALLOC_PASID`: Linux 7.3's rule between a device's RID and
//! its PASIDs for tables allocated through the uAPI, and the mock driver's
//! faked failure at `IOMMU_TEST_PASID_RESERVED`.

use std::sync::Arc;

use ioasid_abi::Errno;
use ioasid_abi::uapi::*;
use ioasid_engine::{Context, ContextConfig, DeviceId, DeviceInfo, HwptFlags, HwptId, IoasId, Limit, MockFlags};

mod common;
use common::call;

fn setup() -> (Arc<Context>, IoasId, DeviceId) {
    let ctx = Arc::new(Context::with_config(ContextConfig::isolated(Limit::Pages(1 << 20))));
    let ioas = ctx.ioas_alloc().unwrap();
    let dev = ctx.bind_device(DeviceInfo::mock(1, MockFlags { pasid: true, ..MockFlags::default() })).unwrap();
    (ctx, ioas, dev)
}

fn hwpt(ctx: &Arc<Context>, dev: DeviceId, pt_id: IoasId, flags: u32) -> HwptId {
    let mut c = iommu_hwpt_alloc { size: 48, flags, dev_id: dev.get(), pt_id: pt_id.get(), ..Default::default() };
    call(ctx, IOMMU_HWPT_ALLOC, &mut c).unwrap();
    HwptId::new(c.out_hwpt_id)
}

#[test]
fn pasids_attach_only_to_tables_allocated_for_them_beside_such_a_rid_table() {
    let (ctx, ioas, dev) = setup();
    let plain = hwpt(&ctx, dev, ioas, 0);
    let compat = hwpt(&ctx, dev, ioas, IOMMU_HWPT_ALLOC_PASID);
    let compat2 = hwpt(&ctx, dev, ioas, IOMMU_HWPT_ALLOC_PASID);
    let err = |r: ioasid_engine::Result<HwptId>| r.map_err(Errno::from);

    assert_eq!(err(ctx.attach_pasid(dev, 100, plain)), Err(Errno::EINVAL), "the table lacks the flag");
    ctx.attach(dev, plain).unwrap();
    assert_eq!(err(ctx.attach_pasid(dev, 100, compat)), Err(Errno::EINVAL), "the RID's table lacks it");
    ctx.replace(dev, compat).unwrap();
    ctx.attach_pasid(dev, 100, compat2).unwrap();
    assert_eq!(err(ctx.replace(dev, plain)), Err(Errno::EINVAL), "not while a PASID is attached");
    assert_eq!(err(ctx.replace_pasid(dev, 100, plain)), Err(Errno::EINVAL));
    ctx.replace_pasid(dev, 100, compat).unwrap();
    ctx.detach_pasid(dev, 100).unwrap();
    ctx.replace(dev, plain).unwrap();
}

#[test]
fn the_engines_own_tables_take_pasids_as_before() {
    let (ctx, ioas, dev) = setup();
    let typed = ctx.hwpt_alloc(dev, ioas, HwptFlags::default(), None).unwrap();
    ctx.attach(dev, typed).unwrap();
    ctx.attach_pasid(dev, 7, typed).unwrap();
    ctx.attach_pasid(dev, 8, ioas).unwrap();
}

#[test]
fn the_mock_fails_every_second_setting_of_pasid_1024_until_it_is_blocked() {
    let (ctx, ioas, dev) = setup();
    let a = hwpt(&ctx, dev, ioas, IOMMU_HWPT_ALLOC_PASID);
    let b = hwpt(&ctx, dev, ioas, IOMMU_HWPT_ALLOC_PASID);
    ctx.attach_pasid(dev, 1024, a).unwrap();
    assert_eq!(ctx.replace_pasid(dev, 1024, b).map_err(Errno::from), Err(Errno::ENOMEM));
    let hwpt_a = ctx.get(a).unwrap();
    assert!(ctx.get(dev).unwrap().attached_at(Some(1024)).is_some_and(|h| h.is_same(&hwpt_a)), "the old table stays");
    ctx.replace_pasid(dev, 1024, b).unwrap();
    ctx.detach_pasid(dev, 1024).unwrap();
    ctx.attach_pasid(dev, 1024, a).unwrap();
    ctx.detach_pasid(dev, 1024).unwrap();
    ctx.attach_pasid(dev, 1024, b).unwrap();
    ctx.attach_pasid(dev, 2048, a).unwrap();
    ctx.replace_pasid(dev, 2048, b).unwrap();
}
