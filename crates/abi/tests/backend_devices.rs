//! `IOASID_DEVICE_NEW`, `_ATTACH` and `_DETACH`: devices for back ends in
//! other processes, made and attached through the ABI.

use ioasid_abi::Errno;
use ioasid_abi::ext::*;
use ioasid_abi::uapi::{IOMMU_IOAS_ALLOC, iommu_ioas_alloc};
use ioasid_engine::DeviceId;

mod common;
use common::{call, ctx};

fn new(ctx: &std::sync::Arc<ioasid_engine::Context>, c: &mut ioasid_device_new) -> Result<(), Errno> {
    c.size = 32;
    call(ctx, IOASID_DEVICE_NEW, c)
}

#[test]
fn unknown_flags_iommus_and_reserved_bits_are_refused() {
    let ctx = ctx();
    assert_eq!(new(&ctx, &mut ioasid_device_new { flags: 1 << 7, ..Default::default() }), Err(Errno::EOPNOTSUPP));
    assert_eq!(new(&ctx, &mut ioasid_device_new { iommu: 77, ..Default::default() }), Err(Errno::EOPNOTSUPP));
    assert_eq!(new(&ctx, &mut ioasid_device_new { __reserved: 1, ..Default::default() }), Err(Errno::EOPNOTSUPP));
    assert_eq!(new(&ctx, &mut ioasid_device_new { rid: 0x1_0000, ..Default::default() }), Err(Errno::EINVAL));
    assert_eq!(new(&ctx, &mut ioasid_device_new { pasid_bits: 21, ..Default::default() }), Err(Errno::EINVAL));
    let mut short = ioasid_device_new { size: 8, ..Default::default() };
    assert_eq!(call(&ctx, IOASID_DEVICE_NEW, &mut short), Err(Errno::EINVAL));
}

#[test]
fn a_new_device_is_bound_with_what_was_asked_and_attaches_replaces_and_detaches() {
    let ctx = ctx();
    let mut c = ioasid_device_new {
        flags: IOASID_DEVICE_PRI | IOASID_DEVICE_DIRTY,
        rid: 0x0310,
        pasid_bits: 8,
        ..Default::default()
    };
    new(&ctx, &mut c).unwrap();
    assert!(c.out_fd >= 0);
    let dev = ctx.get(DeviceId::new(c.out_dev_id)).unwrap();
    let info = dev.info();
    assert_eq!((info.rid, info.pri, info.dirty_tracking, info.max_pasid_log2), (0x0310, true, true, 8));

    let mut a = iommu_ioas_alloc { size: 12, ..Default::default() };
    call(&ctx, IOMMU_IOAS_ALLOC, &mut a).unwrap();
    let mut b = iommu_ioas_alloc { size: 12, ..Default::default() };
    call(&ctx, IOMMU_IOAS_ALLOC, &mut b).unwrap();
    let mut at = ioasid_device_attach { size: 24, dev_id: c.out_dev_id, pt_id: a.out_ioas_id, ..Default::default() };
    call(&ctx, IOASID_DEVICE_ATTACH, &mut at).unwrap();
    assert_ne!(at.pt_id, a.out_ioas_id, "the HWPT made for the IOAS is reported");
    assert!(dev.attached().is_some());
    // Attached already: a second attach replaces.
    let mut again = ioasid_device_attach { size: 24, dev_id: c.out_dev_id, pt_id: b.out_ioas_id, ..Default::default() };
    call(&ctx, IOASID_DEVICE_ATTACH, &mut again).unwrap();
    assert_ne!(again.pt_id, at.pt_id);
    // At a PASID the device has.
    let mut p = ioasid_device_attach {
        size: 24,
        flags: IOASID_DEVICE_PASID,
        dev_id: c.out_dev_id,
        pasid: 5,
        pt_id: a.out_ioas_id,
        ..Default::default()
    };
    call(&ctx, IOASID_DEVICE_ATTACH, &mut p).unwrap();
    assert!(dev.attached_at(Some(5)).is_some());
    let mut d = ioasid_device_detach { size: 16, flags: IOASID_DEVICE_PASID, dev_id: c.out_dev_id, pasid: 5 };
    call(&ctx, IOASID_DEVICE_DETACH, &mut d).unwrap();
    assert!(dev.attached_at(Some(5)).is_none());
    let mut d = ioasid_device_detach { size: 16, dev_id: c.out_dev_id, ..Default::default() };
    call(&ctx, IOASID_DEVICE_DETACH, &mut d).unwrap();
    assert!(dev.attached().is_none());
    // Not a device: ENOENT, as iommufd answers for a missing object.
    let mut bad = ioasid_device_attach { size: 24, dev_id: a.out_ioas_id, pt_id: a.out_ioas_id, ..Default::default() };
    assert_eq!(call(&ctx, IOASID_DEVICE_ATTACH, &mut bad), Err(Errno::ENOENT));
}
