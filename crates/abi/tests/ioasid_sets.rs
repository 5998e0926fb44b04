//! ioasid's extension commands: IOASID sets through the ABI.

use std::sync::Arc;

use ioasid_abi::ext::*;
use ioasid_abi::uapi::{IOMMU_DESTROY, iommu_destroy};
use ioasid_abi::{Errno, InProcess, ioctl};
use ioasid_engine::{Context, ContextConfig, Limit};
use zerocopy::{FromBytes, IntoBytes};

fn ctx() -> Arc<Context> {
    Arc::new(Context::with_config(ContextConfig::isolated(Limit::Pages(1 << 20))))
}

fn call<T: IntoBytes + FromBytes>(ctx: &Arc<Context>, req: u32, cmd: &mut T) -> Result<(), Errno> {
    ioctl(ctx, &InProcess, req, cmd as *mut T as u64).map(drop)
}

fn set(ctx: &Arc<Context>, parent_id: u32, quota: u32) -> Result<u32, Errno> {
    let mut c = ioasid_set_alloc { size: 24, parent_id, quota, ..Default::default() };
    call(ctx, IOASID_SET_ALLOC, &mut c).map(|()| c.out_set_id)
}

fn alloc(ctx: &Arc<Context>, set_id: u32, private_data: u64) -> Result<u32, Errno> {
    let mut c = ioasid_pasid_alloc { size: 40, set_id, min: 1, max: u32::MAX, private_data, ..Default::default() };
    call(ctx, IOASID_PASID_ALLOC, &mut c).map(|()| c.out_pasid)
}

fn usage(ctx: &Arc<Context>, set_id: u32) -> (u32, u32) {
    let mut c = ioasid_set_usage { size: 16, set_id, ..Default::default() };
    call(ctx, IOASID_SET_USAGE, &mut c).unwrap();
    (c.out_quota, c.out_used)
}

#[test]
fn extension_numbers_cannot_collide_with_iommufd() {
    assert_eq!(IOASID_SET_ALLOC >> 8, b'i' as u32);
    assert_ne!(IOASID_SET_ALLOC >> 8, b';' as u32);
}

#[test]
fn set_alloc_with_flags_is_eopnotsupp() {
    let mut c = ioasid_set_alloc { size: 24, flags: 1, quota: 4, ..Default::default() };
    assert_eq!(call(&ctx(), IOASID_SET_ALLOC, &mut c), Err(Errno::EOPNOTSUPP));
}

#[test]
fn set_alloc_short_is_einval_and_unknown_command_is_enotty() {
    let mut c = ioasid_set_alloc { size: 12, quota: 4, ..Default::default() };
    assert_eq!(call(&ctx(), IOASID_SET_ALLOC, &mut c), Err(Errno::EINVAL));
    assert_eq!(call(&ctx(), ext_io(0x30), &mut c), Err(Errno::ENOTTY));
}

#[test]
fn set_alloc_under_an_unknown_parent_is_enoent() {
    assert_eq!(set(&ctx(), 99, 4), Err(Errno::ENOENT));
}

#[test]
fn child_quota_above_the_parents_is_einval() {
    let ctx = ctx();
    let vm = set(&ctx, 0, 4).unwrap();
    assert_eq!(set(&ctx, vm, 5), Err(Errno::EINVAL));
}

#[test]
fn pasid_alloc_past_a_quota_is_edquot() {
    let ctx = ctx();
    let vm = set(&ctx, 0, 2).unwrap();
    let dev = set(&ctx, vm, 2).unwrap();
    alloc(&ctx, dev, 0).unwrap();
    alloc(&ctx, vm, 0).unwrap();
    assert_eq!(alloc(&ctx, dev, 0), Err(Errno::EDQUOT), "the parent is full");
    assert_eq!(usage(&ctx, vm), (2, 2));
}

#[test]
fn quota_below_use_is_ebusy() {
    let ctx = ctx();
    let s = set(&ctx, 0, 4).unwrap();
    alloc(&ctx, s, 0).unwrap();
    alloc(&ctx, s, 0).unwrap();
    let mut c = ioasid_set_quota { size: 16, set_id: s, quota: 1, __reserved: 0 };
    assert_eq!(call(&ctx, IOASID_SET_QUOTA, &mut c), Err(Errno::EBUSY));
    c.quota = 2;
    call(&ctx, IOASID_SET_QUOTA, &mut c).unwrap();
}

#[test]
fn private_ids_translate_and_repeat_is_eexist() {
    let ctx = ctx();
    let guest = set(&ctx, 0, 8).unwrap();
    let mut c = ioasid_pasid_alloc {
        size: 40,
        flags: IOASID_PASID_ALLOC_PRIVATE,
        set_id: guest,
        vpasid: 5,
        ..Default::default()
    };
    call(&ctx, IOASID_PASID_ALLOC, &mut c).unwrap();
    let host = c.out_pasid;
    let mut l = ioasid_vpasid_lookup { size: 16, set_id: guest, vpasid: 5, out_pasid: 0 };
    call(&ctx, IOASID_VPASID_LOOKUP, &mut l).unwrap();
    assert_eq!(l.out_pasid, host);
    assert_eq!(call(&ctx, IOASID_PASID_ALLOC, &mut c), Err(Errno::EEXIST));
    l.vpasid = 6;
    assert_eq!(call(&ctx, IOASID_VPASID_LOOKUP, &mut l), Err(Errno::ENOENT));
}

#[test]
fn free_while_referenced_completes_at_the_last_put() {
    let ctx = ctx();
    let s = set(&ctx, 0, 8).unwrap();
    let p = alloc(&ctx, s, 42).unwrap();
    let mut r = ioasid_pasid_ref { size: 8, pasid: p };
    call(&ctx, IOASID_PASID_GET, &mut r).unwrap();
    let mut f = ioasid_pasid_free { size: 16, set_id: s, pasid: p, __reserved: 0 };
    call(&ctx, IOASID_PASID_FREE, &mut f).unwrap();
    let mut find = ioasid_pasid_find { size: 24, set_id: s, pasid: p, ..Default::default() };
    call(&ctx, IOASID_PASID_FIND, &mut find).unwrap();
    assert_eq!(find.out_private_data, 42);
    assert_eq!(call(&ctx, IOASID_PASID_GET, &mut r), Err(Errno::ENOENT));
    call(&ctx, IOASID_PASID_PUT, &mut r).unwrap();
    assert_eq!(call(&ctx, IOASID_PASID_FIND, &mut find), Err(Errno::ENOENT));
}

#[test]
fn destroying_a_set_frees_its_ids_and_parents_wait_for_children() {
    let ctx = ctx();
    let vm = set(&ctx, 0, 8).unwrap();
    let dev = set(&ctx, vm, 4).unwrap();
    alloc(&ctx, dev, 0).unwrap();
    assert_eq!(call(&ctx, IOMMU_DESTROY, &mut iommu_destroy { size: 8, id: vm }), Err(Errno::EBUSY));
    call(&ctx, IOMMU_DESTROY, &mut iommu_destroy { size: 8, id: dev }).unwrap();
    assert_eq!(usage(&ctx, vm), (8, 0));
    call(&ctx, IOMMU_DESTROY, &mut iommu_destroy { size: 8, id: vm }).unwrap();
}
