//! vIOMMUs and vDEVICEs: the object rules (who may be a parent, which IDs
//! are unique, what holds what busy) and the guest-ID lookup they exist for.

use std::sync::Arc;
use std::thread;
use std::time::Duration;

use ioasid_engine::fault::{PASID_VALID, Response};
use ioasid_engine::ioasid_set::global;
use ioasid_engine::{
    Context, ContextConfig, DeviceInfo, DmaError, Error, HostBuffer, HwptFlags, Limit, MockFlags, NestedData, Perm,
    ViommuType,
};
use ioasid_engine::{DeviceId, HwptPagingId, IoasId, SetObjectId, VdeviceId, ViommuId};

struct Vm {
    ctx: Arc<Context>,
    dev: DeviceId,
    parent: HwptPagingId,
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
    let not_a_hwpt = HwptPagingId::new(ioas.get());
    assert!(matches!(v.ctx.viommu_alloc(v.dev, not_a_hwpt, ViommuType::Selftest), Err(Error::NoObject { .. })));
    let vtd = v.ctx.bind_device(DeviceInfo::new("vtd", 2)).unwrap();
    assert!(
        matches!(v.ctx.viommu_alloc(vtd, v.parent, ViommuType::Selftest), Err(Error::Unsupported(_))),
        "a VT-d device's IOMMU offers no selftest vIOMMU"
    );
    let viommu = v.ctx.viommu_alloc(v.dev, v.parent, ViommuType::Selftest).unwrap();
    assert_eq!(v.ctx.get(viommu).unwrap().kind(), ViommuType::Selftest);
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
    let (va, vb) = (v.ctx.get(a).unwrap(), v.ctx.get(b).unwrap());
    assert_eq!(va.device(0x99).unwrap().id(), v.dev.get());
    assert_eq!(va.device(0x42).unwrap().id(), other.get());
    assert_eq!(vb.device(0x99).unwrap().id(), other.get(), "each vIOMMU has its own ID space");
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
    assert!(v.ctx.get(viommu).unwrap().device(7).is_none(), "destroying the vDEVICE frees its ID");
}

#[test]
fn nested_hwpts_on_a_viommu_translate_through_its_parent() {
    let v = vm();
    let viommu = v.ctx.viommu_alloc(v.dev, v.parent, ViommuType::Selftest).unwrap();
    let nested = v.ctx.hwpt_alloc_nested(v.dev, viommu, NestedData::selftest(0), None).unwrap();
    let Ok(n) = v.ctx.get(nested) else { panic!("not nested") };
    let Ok(p) = v.ctx.get(v.parent) else { panic!("not paging") };
    assert!(Arc::ptr_eq(n.parent(), &p));
    assert!(Arc::ptr_eq(n.viommu().unwrap(), &v.ctx.get(viommu).unwrap()));
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
    assert!(matches!(v.ctx.destroy(vdev), Err(Error::NoObject { .. })), "gone with its device");
    assert!(v.ctx.get(viommu).unwrap().device(3).is_none());
    v.ctx.destroy(viommu).unwrap();
}

/// Inside the mock IOMMU's aperture.
const IOVA: u64 = (1 << 24) + 0x1000;

/// A VM whose vIOMMU draws its guest's PASIDs from an IOASID set of quota
/// 2, with a PASID- and PRI-capable device named 0x10 behind it.
struct PasidVm {
    vm: Vm,
    viommu: ViommuId,
    set: SetObjectId,
    vdev: VdeviceId,
}

fn pasid_device(ctx: &Context, rid: u32) -> DeviceId {
    let mut info = DeviceInfo::mock(rid, MockFlags { pasid: true, ..MockFlags::default() });
    info.pri = true;
    ctx.bind_device(info).unwrap()
}

fn pasid_vm() -> PasidVm {
    let ctx = Arc::new(Context::with_config(ContextConfig::isolated(Limit::Pages(1 << 20))));
    let ioas = ctx.ioas_alloc().unwrap();
    let dev = pasid_device(&ctx, 1);
    let parent = ctx.hwpt_alloc(dev, ioas, HwptFlags { nest_parent: true, dirty_tracking: false }, None).unwrap();
    let vm = Vm { ctx, dev, parent };
    let viommu = vm.ctx.viommu_alloc(vm.dev, vm.parent, ViommuType::Selftest).unwrap();
    let set = vm.ctx.ioasid_set_alloc(None, 2).unwrap();
    vm.ctx.viommu_set_pasid_set(viommu, set).unwrap();
    let vdev = vm.ctx.vdevice_alloc(viommu, vm.dev, 0x10).unwrap();
    PasidVm { vm, viommu, set, vdev }
}

/// An IOAS with one page of `buf` at `IOVA`.
fn mapped_ioas(ctx: &Context, buf: &HostBuffer) -> IoasId {
    let ioas = ctx.ioas_alloc().unwrap();
    // SAFETY: the test keeps `buf` alive past the context's use of it.
    unsafe { ctx.map_user(ioas, buf.addr(), 4096, Some(IOVA), Perm::RW).unwrap() };
    ioas
}

#[test]
fn a_vpasid_gets_a_host_pasid_from_the_set_and_dma_tagged_with_it_uses_it() {
    let p = pasid_vm();
    let ctx = &p.vm.ctx;
    let set_id = ctx.get(p.set).unwrap().id();
    let buf = HostBuffer::new(4096).unwrap();
    let ioas = mapped_ioas(ctx, &buf);
    let host = ctx.vdevice_attach_pasid(p.vdev, 5, ioas).unwrap();
    let viommu = ctx.get(p.viommu).unwrap();
    assert_eq!(viommu.host_pasid(5), Some(host));
    assert_eq!(global().vpasid(host), Some(5), "the host PASID stands for vPASID 5");
    assert_eq!(global().usage(set_id).unwrap(), (2, 1), "charged to the set");

    let vdev = ctx.get(p.vdev).unwrap();
    vdev.dma_write(5, IOVA, b"v5").unwrap();
    let mut seen = [0u8; 2];
    buf.read_at(0, &mut seen);
    assert_eq!(&seen, b"v5");
    assert_eq!(vdev.dma_write(6, IOVA, b"x"), Err(DmaError::Blocked), "vPASID 6 is not attached");
    assert!(matches!(ctx.vdevice_attach_pasid(p.vdev, 5, ioas), Err(Error::Busy(_))), "already attached");

    // A second device of the same guest shares vPASID 5's host PASID.
    let other = pasid_device(ctx, 2);
    let other_vdev = ctx.vdevice_alloc(p.viommu, other, 0x20).unwrap();
    assert_eq!(ctx.vdevice_attach_pasid(other_vdev, 5, ioas).unwrap(), host);
    assert_eq!(global().usage(set_id).unwrap().1, 1);
    ctx.vdevice_attach_pasid(other_vdev, 6, ioas).unwrap();
    assert!(matches!(ctx.vdevice_attach_pasid(other_vdev, 7, ioas), Err(Error::Quota(_))), "the set's quota is 2");
    assert_eq!(viommu.host_pasid(7), None, "nothing left behind by the failed attach");

    ctx.vdevice_detach_pasid(p.vdev, 5).unwrap();
    assert_eq!(viommu.host_pasid(5), Some(host), "still used by the other device");
    assert_eq!(vdev.dma_write(5, IOVA, b"x"), Err(DmaError::Blocked));
    ctx.destroy(other_vdev).unwrap();
    assert_eq!(global().usage(set_id).unwrap().1, 0, "destroying the vDEVICE freed its vPASIDs");
    assert!(ctx.get(other).unwrap().attachments().is_empty());
}

#[test]
fn page_requests_name_the_guests_pasid_and_detaching_aborts_them() {
    // High, so that no host PASID of this process can have the same number.
    const VPASID: u32 = 0xabcde;
    let p = pasid_vm();
    let ctx = &p.vm.ctx;
    let ioas = ctx.ioas_alloc().unwrap();
    let (fault_id, queue) = ctx.fault_alloc().unwrap();
    let hwpt = ctx.hwpt_alloc(p.vm.dev, ioas, HwptFlags::default(), Some(fault_id)).unwrap();
    let host = ctx.vdevice_attach_pasid(p.vdev, VPASID, hwpt).unwrap();
    assert_ne!(host, VPASID, "the guest's number is not the host's");
    let vdev = ctx.get(p.vdev).unwrap();

    let dma = {
        let vdev = vdev.clone();
        thread::spawn(move || vdev.dma_write(VPASID, IOVA + 0x6000, b"x"))
    };
    let (cookie, group) = queue.next(Duration::from_secs(5)).expect("a page request");
    let r = &group.requests[0];
    assert_eq!(
        (r.pasid, r.flags & PASID_VALID, r.addr, r.dev_id),
        (VPASID, PASID_VALID, IOVA + 0x6000, p.vm.dev.get())
    );
    queue.respond(cookie, Response::Invalid).unwrap();
    assert!(dma.join().unwrap().is_err(), "a refused request fails the DMA");

    let dma = {
        let vdev = vdev.clone();
        thread::spawn(move || vdev.dma_write(VPASID, IOVA + 0x7000, b"x"))
    };
    queue.next(Duration::from_secs(5)).expect("a page request");
    ctx.vdevice_detach_pasid(p.vdev, VPASID).unwrap();
    assert!(dma.join().unwrap().is_err(), "detaching released the waiting DMA");
}

#[test]
fn unbinding_releases_the_vpasids_of_the_devices_vdevices() {
    let p = pasid_vm();
    let ctx = &p.vm.ctx;
    let set_id = ctx.get(p.set).unwrap().id();
    let buf = HostBuffer::new(4096).unwrap();
    let ioas = mapped_ioas(ctx, &buf);
    let other = pasid_device(ctx, 2);
    let vdev = ctx.vdevice_alloc(p.viommu, other, 0x20).unwrap();
    ctx.vdevice_attach_pasid(vdev, 3, ioas).unwrap();
    assert_eq!(global().usage(set_id).unwrap().1, 1);
    ctx.unbind_device(other).unwrap();
    assert_eq!(global().usage(set_id).unwrap().1, 0);
    assert!(matches!(ctx.destroy(p.set), Err(Error::Busy(_))), "the vIOMMU holds its set");
    ctx.destroy(p.vdev).unwrap();
    ctx.destroy(p.viommu).unwrap();
    ctx.destroy(p.set).unwrap();
}

#[test]
fn unrecoverable_faults_reach_the_viommus_event_queue_named_by_virtual_id() {
    use ioasid_engine::veventq::{HEADER, VEVENTQ_TYPE_SELFTEST};
    let v = vm();
    let viommu = v.ctx.viommu_alloc(v.dev, v.parent, ViommuType::Selftest).unwrap();
    let nested = v.ctx.hwpt_alloc_nested(v.dev, viommu, NestedData::selftest(0), None);
    v.ctx.attach(v.dev, nested.unwrap()).unwrap();
    let dev = v.ctx.get(v.dev).unwrap();
    assert!(dev.dma_write(IOVA, b"x").is_err());
    assert_eq!(dev.unrecoverable_faults(), 1, "counted when nobody listens");

    assert!(matches!(v.ctx.veventq_alloc(viommu, VEVENTQ_TYPE_SELFTEST, 0), Err(Error::Invalid(_))));
    let (qid, q) = v.ctx.veventq_alloc(viommu, VEVENTQ_TYPE_SELFTEST, 2).unwrap();
    assert!(matches!(v.ctx.veventq_alloc(viommu, VEVENTQ_TYPE_SELFTEST, 2), Err(Error::Exists(_))), "one per type");
    assert!(dev.dma_write(IOVA, b"x").is_err());
    assert!(q.is_empty(), "the device has no vDEVICE: the guest has no name for it");

    v.ctx.vdevice_alloc(viommu, v.dev, 0x77).unwrap();
    assert!(dev.dma_write(IOVA, b"x").is_err());
    let events = q.read(4 * HEADER).unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].data, 0x77u32.to_le_bytes());
    assert_eq!(dev.unrecoverable_faults(), 3);
    assert!(matches!(v.ctx.destroy(viommu), Err(Error::Busy(_))), "the queue holds its vIOMMU");
    drop(q);
    v.ctx.destroy(qid).unwrap();
}

#[cfg(feature = "vm-memory")]
#[test]
fn a_fault_through_vm_memory_reaches_the_viommus_event_queue() {
    use ioasid_engine::veventq::{HEADER, VEVENTQ_TYPE_SELFTEST};
    use ioasid_engine::vm_memory_iommu::IommuPort;
    use vm_memory::iommu::IommuMemory;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
    let v = vm();
    let viommu = v.ctx.viommu_alloc(v.dev, v.parent, ViommuType::Selftest).unwrap();
    let nested = v.ctx.hwpt_alloc_nested(v.dev, viommu, NestedData::selftest(0), None);
    v.ctx.attach(v.dev, nested.unwrap()).unwrap();
    v.ctx.vdevice_alloc(viommu, v.dev, 0x77).unwrap();
    let (_, q) = v.ctx.veventq_alloc(viommu, VEVENTQ_TYPE_SELFTEST, 2).unwrap();
    let dev = v.ctx.get(v.dev).unwrap();
    let ram = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
    let memory = IommuMemory::new(ram.clone(), IommuPort::for_memory(dev.clone(), None, &ram), true, ());
    assert!(memory.write_slice(b"x", GuestAddress(IOVA)).is_err());
    let events = q.read(4 * HEADER).unwrap();
    assert_eq!(events.len(), 1, "the guest hears of a fault taken through vm-memory too");
    assert_eq!(events[0].data, 0x77u32.to_le_bytes());
    assert_eq!(dev.unrecoverable_faults(), 1);
}
