//! ioasid's extension commands: IOASID sets through the ABI.

use std::sync::Arc;

use ioasid_abi::Errno;
use ioasid_abi::ext::*;
use ioasid_abi::uapi::{IOMMU_DESTROY, iommu_destroy};
use ioasid_engine::Context;

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

// Two contexts: what one allocates, the other can neither see nor change.
// A context's IDs name only its own objects, and a PASID of another
// context's set answers as a missing one does (ENOENT).

use ioasid_engine::{DeviceInfo, HwptFlags, MockFlags, SetObjectId, VdeviceId, ViommuType};

mod common;
use common::{call, ctx};

/// A guest's context: a set (object 1) with PASID `pasid` (private data 42)
/// and private ID 5 mapped to `host`; a vIOMMU drawing from a second set,
/// with a vDEVICE attached at vPASID 4.
struct Owner {
    ctx: Arc<Context>,
    set: u32,
    pasid: u32,
    host: u32,
    viommu: u32,
    viommu_set: u32,
    vdevice: u32,
    ioas: u32,
}

fn owner() -> Owner {
    let ctx = ctx();
    let s = set(&ctx, 0, 8).unwrap();
    assert_eq!(s, 1);
    let pasid = alloc(&ctx, s, 42).unwrap();
    let mut c =
        ioasid_pasid_alloc { size: 40, flags: IOASID_PASID_ALLOC_PRIVATE, set_id: s, vpasid: 5, ..Default::default() };
    call(&ctx, IOASID_PASID_ALLOC, &mut c).unwrap();
    let ioas = ctx.ioas_alloc().unwrap();
    let dev = ctx.bind_device(DeviceInfo::mock(1, MockFlags { pasid: true, ..MockFlags::default() })).unwrap();
    let parent = ctx.hwpt_alloc(dev, ioas, HwptFlags { nest_parent: true, dirty_tracking: false }, None).unwrap();
    let viommu = ctx.viommu_alloc(dev, parent, ViommuType::Selftest).unwrap();
    let vdevice = ctx.vdevice_alloc(viommu, dev, 0x10).unwrap();
    let viommu_set = set(&ctx, 0, 4).unwrap();
    ctx.viommu_set_pasid_set(viommu, SetObjectId::new(viommu_set)).unwrap();
    ctx.vdevice_attach_pasid(vdevice, 4, ioas).unwrap();
    Owner {
        ctx,
        set: s,
        pasid,
        host: c.out_pasid,
        viommu: viommu.get(),
        viommu_set,
        vdevice: vdevice.get(),
        ioas: ioas.get(),
    }
}

/// An unrelated context whose own objects sit at the owner's IDs (none of
/// them a set where the owner has one), with a set and a vIOMMU of its own.
struct Other {
    ctx: Arc<Context>,
    set: u32,
    viommu: u32,
}

fn other(o: &Owner) -> Other {
    let ctx = ctx();
    assert_eq!(ctx.ioas_alloc().unwrap().get(), o.set, "the owner's set ID is an IOAS here");
    let s = set(&ctx, 0, 8).unwrap();
    alloc(&ctx, s, 7).unwrap();
    let ioas = ctx.ioas_alloc().unwrap();
    let dev = ctx.bind_device(DeviceInfo::mock(1, MockFlags { pasid: true, ..MockFlags::default() })).unwrap();
    let parent = ctx.hwpt_alloc(dev, ioas, HwptFlags { nest_parent: true, dirty_tracking: false }, None).unwrap();
    let viommu = ctx.viommu_alloc(dev, parent, ViommuType::Selftest).unwrap();
    Other { ctx, set: s, viommu: viommu.get() }
}

fn find(ctx: &Arc<Context>, set_id: u32, pasid: u32) -> Result<u64, Errno> {
    let mut c = ioasid_pasid_find { size: 24, set_id, pasid, ..Default::default() };
    call(ctx, IOASID_PASID_FIND, &mut c).map(|()| c.out_private_data)
}

fn pasid_ref(ctx: &Arc<Context>, req: u32, pasid: u32) -> Result<(), Errno> {
    call(ctx, req, &mut ioasid_pasid_ref { size: 8, pasid })
}

fn free(ctx: &Arc<Context>, set_id: u32, pasid: u32) -> Result<(), Errno> {
    call(ctx, IOASID_PASID_FREE, &mut ioasid_pasid_free { size: 16, set_id, pasid, __reserved: 0 })
}

/// The owner's sets and PASIDs are as `owner()` left them.
fn untouched(o: &Owner) {
    assert_eq!(find(&o.ctx, o.set, o.pasid), Ok(42));
    assert_eq!(usage(&o.ctx, o.set), (8, 2));
    assert_eq!(usage(&o.ctx, o.viommu_set), (4, 1));
    let mut l = ioasid_vpasid_lookup { size: 16, set_id: o.set, vpasid: 5, out_pasid: 0 };
    call(&o.ctx, IOASID_VPASID_LOOKUP, &mut l).unwrap();
    assert_eq!(l.out_pasid, o.host);
    assert_eq!(o.ctx.get(VdeviceId::new(o.vdevice)).unwrap().pasids().len(), 1);
}

#[test]
fn pasid_put_from_another_context_is_enoent_and_releases_nothing() {
    let o = owner();
    let b = other(&o);
    for _ in 0..3 {
        assert_eq!(pasid_ref(&b.ctx, IOASID_PASID_PUT, o.pasid), Err(Errno::ENOENT));
        assert_eq!(pasid_ref(&b.ctx, IOASID_PASID_PUT, o.host), Err(Errno::ENOENT));
    }
    untouched(&o);
}

#[test]
fn pasid_get_from_another_context_is_enoent_and_holds_nothing() {
    let o = owner();
    let b = other(&o);
    assert_eq!(pasid_ref(&b.ctx, IOASID_PASID_GET, o.pasid), Err(Errno::ENOENT));
    untouched(&o);
    free(&o.ctx, o.set, o.pasid).unwrap();
    assert_eq!(find(&o.ctx, o.set, o.pasid), Err(Errno::ENOENT), "freed at once: nobody else holds it");
    assert_eq!(usage(&o.ctx, o.set), (8, 1));
}

#[test]
fn set_quota_of_another_contexts_set_is_enoent() {
    let o = owner();
    let b = other(&o);
    for set_id in [o.set, o.viommu_set] {
        let mut c = ioasid_set_quota { size: 16, set_id, quota: 2, __reserved: 0 };
        assert_eq!(call(&b.ctx, IOASID_SET_QUOTA, &mut c), Err(Errno::ENOENT));
    }
    untouched(&o);
}

#[test]
fn set_usage_of_another_contexts_set_is_enoent() {
    let o = owner();
    let b = other(&o);
    let mut c = ioasid_set_usage { size: 16, set_id: o.set, ..Default::default() };
    assert_eq!(call(&b.ctx, IOASID_SET_USAGE, &mut c), Err(Errno::ENOENT));
    assert_eq!((c.out_quota, c.out_used), (0, 0));
}

#[test]
fn set_alloc_under_another_contexts_set_is_enoent() {
    let o = owner();
    let b = other(&o);
    assert_eq!(set(&b.ctx, o.set, 1), Err(Errno::ENOENT));
    untouched(&o);
}

#[test]
fn pasid_alloc_in_another_contexts_set_is_enoent() {
    let o = owner();
    let b = other(&o);
    assert_eq!(alloc(&b.ctx, o.set, 0), Err(Errno::ENOENT));
    let mut c = ioasid_pasid_alloc {
        size: 40,
        flags: IOASID_PASID_ALLOC_PRIVATE,
        set_id: o.viommu_set,
        vpasid: 9,
        ..Default::default()
    };
    assert_eq!(call(&b.ctx, IOASID_PASID_ALLOC, &mut c), Err(Errno::ENOENT));
    untouched(&o);
}

#[test]
fn pasid_free_of_another_contexts_pasid_is_enoent() {
    let o = owner();
    let b = other(&o);
    assert_eq!(free(&b.ctx, o.set, o.pasid), Err(Errno::ENOENT), "the owner's set ID");
    assert_eq!(free(&b.ctx, b.set, o.pasid), Err(Errno::ENOENT), "its own set");
    assert_eq!(free(&b.ctx, b.set, o.host), Err(Errno::ENOENT));
    untouched(&o);
}

#[test]
fn pasid_find_of_another_contexts_pasid_is_enoent() {
    let o = owner();
    let b = other(&o);
    assert_eq!(find(&b.ctx, o.set, o.pasid), Err(Errno::ENOENT));
    assert_eq!(find(&b.ctx, b.set, o.pasid), Err(Errno::ENOENT));
}

#[test]
fn vpasid_lookup_in_another_contexts_set_is_enoent() {
    let o = owner();
    let b = other(&o);
    for set_id in [o.set, b.set] {
        let mut l = ioasid_vpasid_lookup { size: 16, set_id, vpasid: 5, out_pasid: 0 };
        assert_eq!(call(&b.ctx, IOASID_VPASID_LOOKUP, &mut l), Err(Errno::ENOENT));
        assert_eq!(l.out_pasid, 0);
    }
}

#[test]
fn viommu_set_pasids_across_contexts_is_enoent() {
    let o = owner();
    let b = other(&o);
    let mut give = ioasid_viommu_set_pasids { size: 16, viommu_id: b.viommu, set_id: o.set, __reserved: 0 };
    assert_eq!(call(&b.ctx, IOASID_VIOMMU_SET_PASIDS, &mut give), Err(Errno::ENOENT), "the owner's set");
    let mut take = ioasid_viommu_set_pasids { size: 16, viommu_id: o.viommu, set_id: b.set, __reserved: 0 };
    assert_eq!(call(&b.ctx, IOASID_VIOMMU_SET_PASIDS, &mut take), Err(Errno::ENOENT), "the owner's vIOMMU");
    untouched(&o);
}

#[test]
fn vdevice_attach_and_detach_pasid_across_contexts_are_enoent() {
    let o = owner();
    let b = other(&o);
    let mut attach =
        ioasid_vdevice_attach_pasid { size: 24, vdevice_id: o.vdevice, vpasid: 6, pt_id: o.ioas, ..Default::default() };
    assert_eq!(call(&b.ctx, IOASID_VDEVICE_ATTACH_PASID, &mut attach), Err(Errno::ENOENT));
    let mut detach = ioasid_vdevice_detach_pasid { size: 16, vdevice_id: o.vdevice, vpasid: 4, __reserved: 0 };
    assert_eq!(call(&b.ctx, IOASID_VDEVICE_DETACH_PASID, &mut detach), Err(Errno::ENOENT));
    untouched(&o);
}

#[test]
fn put_without_a_reference_is_einval_and_keeps_the_pasid() {
    let o = owner();
    assert_eq!(pasid_ref(&o.ctx, IOASID_PASID_PUT, o.pasid), Err(Errno::EINVAL));
    assert_eq!(pasid_ref(&o.ctx, IOASID_PASID_PUT, o.host), Err(Errno::EINVAL), "the device's reference is not ours");
    untouched(&o);
    pasid_ref(&o.ctx, IOASID_PASID_GET, o.pasid).unwrap();
    pasid_ref(&o.ctx, IOASID_PASID_PUT, o.pasid).unwrap();
    assert_eq!(pasid_ref(&o.ctx, IOASID_PASID_PUT, o.pasid), Err(Errno::EINVAL), "one GET, one PUT");
    untouched(&o);
}

#[test]
fn closing_a_context_drops_the_references_it_took_once() {
    use ioasid_engine::ioasid_set::global;
    let a = ctx();
    let s = set(&a, 0, 8).unwrap();
    let sid = a.get(SetObjectId::new(s)).unwrap().id();
    // Other tests share the global space: a number may be theirs again.
    let gone = |p: u32| global().entry(p).is_none_or(|e| e.set() != sid);
    let held = alloc(&a, s, 1).unwrap();
    let done = alloc(&a, s, 2).unwrap();
    for _ in 0..2 {
        pasid_ref(&a, IOASID_PASID_GET, held).unwrap();
    }
    pasid_ref(&a, IOASID_PASID_GET, done).unwrap();
    pasid_ref(&a, IOASID_PASID_PUT, done).unwrap();
    free(&a, s, held).unwrap();
    free(&a, s, done).unwrap();
    assert_eq!(find(&a, s, held), Ok(1), "still referenced");
    assert!(gone(done));
    // Another context reuses what was released; closing the first must
    // not put anything of it.
    let c = ctx();
    let cs = set(&c, 0, 8).unwrap();
    let reused: Vec<u32> = (0..4).map(|_| alloc(&c, cs, 3).unwrap()).collect();
    drop(a);
    assert!(gone(held), "the closed context's references went with it");
    for p in reused {
        assert_eq!(find(&c, cs, p), Ok(3));
    }
    assert_eq!(usage(&c, cs), (8, 4));
}
