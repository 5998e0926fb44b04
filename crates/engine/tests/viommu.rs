//! vIOMMUs and vDEVICEs: the object rules (who may be a parent, which IDs
//! are unique, what holds what busy) and the guest-ID lookup they exist for.

use std::sync::{Arc, Mutex};

use ioasid_engine::{
    Context, ContextConfig, DeviceInfo, Error, Hwpt, HwptFlags, Limit, MockFlags, NestedData, ViommuType,
};

struct Vm {
    ctx: Arc<Context>,
    dev: u32,
    parent: u32,
}

fn vm() -> Vm {
    let ctx = Arc::new(Context::with_config(ContextConfig::isolated(Limit::Pages(1 << 20))));
    let ioas = ctx.ioas_alloc().unwrap();
    let dev = ctx.bind_device(DeviceInfo::mock(1, MockFlags::default())).unwrap();
    let parent = ctx.hwpt_alloc(dev, ioas, HwptFlags { nest_parent: true, dirty_tracking: false }, None).unwrap();
    Vm { ctx, dev, parent }
}

#[test]
fn a_viommu_needs_a_nesting_parent_of_its_iommu() {
    let v = vm();
    let ioas = v.ctx.ioas_alloc().unwrap();
    let plain = v.ctx.hwpt_alloc(v.dev, ioas, HwptFlags::default(), None).unwrap();
    assert!(matches!(v.ctx.viommu_alloc(v.dev, plain, ViommuType::Selftest), Err(Error::Invalid(_))));
    assert!(matches!(v.ctx.viommu_alloc(v.dev, ioas, ViommuType::Selftest), Err(Error::NotFound(_))));
    let vtd = v.ctx.bind_device(DeviceInfo::new("vtd", 2)).unwrap();
    assert!(
        matches!(v.ctx.viommu_alloc(vtd, v.parent, ViommuType::Selftest), Err(Error::Unsupported(_))),
        "a VT-d device's IOMMU offers no selftest vIOMMU"
    );
    let viommu = v.ctx.viommu_alloc(v.dev, v.parent, ViommuType::Selftest).unwrap();
    assert_eq!(v.ctx.viommu(viommu).unwrap().kind(), ViommuType::Selftest);
}

#[test]
fn virtual_ids_are_unique_per_viommu_and_resolve_to_their_device() {
    let v = vm();
    let other = v.ctx.bind_device(DeviceInfo::mock(2, MockFlags::default())).unwrap();
    let a = v.ctx.viommu_alloc(v.dev, v.parent, ViommuType::Selftest).unwrap();
    let b = v.ctx.viommu_alloc(v.dev, v.parent, ViommuType::Selftest).unwrap();
    v.ctx.vdevice_alloc(a, v.dev, 0x99).unwrap();
    assert!(matches!(v.ctx.vdevice_alloc(a, other, 0x99), Err(Error::Exists(_))), "ID taken");
    assert!(matches!(v.ctx.vdevice_alloc(a, v.dev, 0x42), Err(Error::Exists(_))), "device already named");
    v.ctx.vdevice_alloc(a, other, 0x42).unwrap();
    v.ctx.vdevice_alloc(b, other, 0x99).unwrap();
    let (va, vb) = (v.ctx.viommu(a).unwrap(), v.ctx.viommu(b).unwrap());
    assert_eq!(va.device(0x99).unwrap().id(), v.dev);
    assert_eq!(va.device(0x42).unwrap().id(), other);
    assert_eq!(vb.device(0x99).unwrap().id(), other, "each vIOMMU has its own ID space");
    assert!(vb.device(0x42).is_none());
}

#[test]
fn objects_hold_what_they_name_busy_until_destroyed() {
    let v = vm();
    let viommu = v.ctx.viommu_alloc(v.dev, v.parent, ViommuType::Selftest).unwrap();
    assert!(matches!(v.ctx.destroy(v.parent), Err(Error::Busy(_))), "the vIOMMU holds its HWPT");
    let vdev = v.ctx.vdevice_alloc(viommu, v.dev, 7).unwrap();
    assert!(matches!(v.ctx.destroy(viommu), Err(Error::Busy(_))), "the vDEVICE holds its vIOMMU");
    v.ctx.destroy(vdev).unwrap();
    assert!(v.ctx.viommu(viommu).unwrap().device(7).is_none(), "destroying the vDEVICE frees its ID");
}

#[test]
fn nested_hwpts_on_a_viommu_translate_through_its_parent() {
    let v = vm();
    let viommu = v.ctx.viommu_alloc(v.dev, v.parent, ViommuType::Selftest).unwrap();
    let nested =
        v.ctx.hwpt_alloc_nested(v.dev, viommu, NestedData::Selftest { iotlb: Mutex::new([0; 4]) }, None).unwrap();
    let Ok(Hwpt::Nested(n)) = v.ctx.any_hwpt(nested) else { panic!("not nested") };
    let Ok(Hwpt::Paging(p)) = v.ctx.any_hwpt(v.parent) else { panic!("not paging") };
    assert!(Arc::ptr_eq(n.parent(), &p));
    assert!(Arc::ptr_eq(n.viommu().unwrap(), &v.ctx.viommu(viommu).unwrap()));
    v.ctx.attach(v.dev, nested).unwrap();
    assert!(matches!(v.ctx.destroy(viommu), Err(Error::Busy(_))), "the nested HWPT holds its vIOMMU");
    v.ctx.detach(v.dev).unwrap();
    drop((n, p));
    v.ctx.destroy(nested).unwrap();
    v.ctx.destroy(viommu).unwrap();
    v.ctx.destroy(v.parent).unwrap();
}

#[test]
fn unbinding_a_device_removes_its_vdevices() {
    let v = vm();
    let viommu = v.ctx.viommu_alloc(v.dev, v.parent, ViommuType::Selftest).unwrap();
    let other = v.ctx.bind_device(DeviceInfo::mock(2, MockFlags::default())).unwrap();
    let vdev = v.ctx.vdevice_alloc(viommu, other, 3).unwrap();
    v.ctx.unbind_device(other).unwrap();
    assert!(matches!(v.ctx.destroy(vdev), Err(Error::NotFound(_))), "gone with its device");
    assert!(v.ctx.viommu(viommu).unwrap().device(3).is_none());
    v.ctx.destroy(viommu).unwrap();
}
