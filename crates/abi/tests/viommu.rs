//! `IOMMU_VIOMMU_ALLOC` and `IOMMU_VDEVICE_ALLOC`, and nested HWPTs
//! allocated on a vIOMMU, through the ABI.

use std::sync::Arc;

use ioasid_abi::selftest::IOMMU_HWPT_DATA_SELFTEST;
use ioasid_abi::uapi::*;
use ioasid_abi::{Errno, InProcess};
use ioasid_engine::{
    Context, ContextConfig, DeviceId, DeviceInfo, HwptFlags, IoasId, IommuModel, Limit, MockFlags, ObjectId, ViommuId,
};
use zerocopy::IntoBytes;

mod common;
use common::call;

struct Vm {
    ctx: Arc<Context>,
    ioas: u32,
    dev: u32,
    parent: u32,
}

fn vm() -> Vm {
    let ctx = Arc::new(Context::with_config(ContextConfig::isolated(Limit::Pages(1 << 20))));
    let ioas = ctx.ioas_alloc().unwrap();
    let dev = ctx.bind_device(DeviceInfo::mock(1, MockFlags::default())).unwrap();
    let parent = ctx.hwpt_alloc(dev, ioas, HwptFlags { nest_parent: true, dirty_tracking: false }, None).unwrap();
    Vm { ctx, ioas: ioas.get(), dev: dev.get(), parent: parent.get() }
}

fn viommu(v: &Vm, c: iommu_viommu_alloc) -> Result<u32, Errno> {
    let mut c =
        iommu_viommu_alloc { size: 40, dev_id: v.dev, hwpt_id: v.parent, r#type: IOMMU_VIOMMU_TYPE_SELFTEST, ..c };
    call(&v.ctx, IOMMU_VIOMMU_ALLOC, &mut c).map(|()| c.out_viommu_id)
}

fn vdevice(v: &Vm, viommu_id: u32, dev_id: u32, virt_id: u64) -> Result<u32, Errno> {
    let mut c = iommu_vdevice_alloc { size: 24, viommu_id, dev_id, virt_id, out_vdevice_id: 0 };
    call(&v.ctx, IOMMU_VDEVICE_ALLOC, &mut c).map(|()| c.out_vdevice_id)
}

fn destroy(v: &Vm, id: u32) -> Result<(), Errno> {
    call(&v.ctx, IOMMU_DESTROY, &mut iommu_destroy { size: 8, id })
}

#[test]
fn viommu_alloc_errnos_follow_linux() {
    let v = vm();
    let d = iommu_viommu_alloc::default();
    assert_eq!(viommu(&v, iommu_viommu_alloc { flags: 1, ..d }), Err(Errno::EOPNOTSUPP));
    // Linux never checks this __reserved field, so neither may we.
    let id = viommu(&v, iommu_viommu_alloc { __reserved: 1, ..d }).unwrap();
    destroy(&v, id).unwrap();
    let default_type = iommu_viommu_alloc { size: 40, dev_id: v.dev, hwpt_id: v.parent, ..d };
    assert_eq!(call(&v.ctx, IOMMU_VIOMMU_ALLOC, &mut { default_type }), Err(Errno::EOPNOTSUPP), "type 0");
    let unknown = iommu_viommu_alloc { r#type: 77, ..default_type };
    assert_eq!(call(&v.ctx, IOMMU_VIOMMU_ALLOC, &mut { unknown }), Err(Errno::EOPNOTSUPP));
    assert_eq!(
        call(&v.ctx, IOMMU_VIOMMU_ALLOC, &mut iommu_viommu_alloc { dev_id: 999, ..unknown }),
        Err(Errno::ENOENT)
    );
    assert_eq!(viommu(&v, iommu_viommu_alloc { data_len: 8, ..d }), Err(Errno::EFAULT), "the mock reads its data");
    let mut short =
        iommu_viommu_alloc { size: 20, r#type: IOMMU_VIOMMU_TYPE_SELFTEST, dev_id: v.dev, hwpt_id: v.parent, ..d };
    assert_eq!(call(&v.ctx, IOMMU_VIOMMU_ALLOC, &mut short), Err(Errno::EINVAL), "shorter than the first version");
    let mut first_version = iommu_viommu_alloc { size: 24, ..short };
    call(&v.ctx, IOMMU_VIOMMU_ALLOC, &mut first_version).unwrap();
    assert_ne!(first_version.out_viommu_id, 0);

    let plain = v.ctx.hwpt_alloc(DeviceId::new(v.dev), IoasId::new(v.ioas), HwptFlags::default(), None).unwrap().get();
    let mut c = iommu_viommu_alloc { size: 40, dev_id: v.dev, r#type: IOMMU_VIOMMU_TYPE_SELFTEST, ..d };
    assert_eq!(call(&v.ctx, IOMMU_VIOMMU_ALLOC, &mut iommu_viommu_alloc { hwpt_id: plain, ..c }), Err(Errno::EINVAL));
    assert_eq!(call(&v.ctx, IOMMU_VIOMMU_ALLOC, &mut iommu_viommu_alloc { hwpt_id: v.ioas, ..c }), Err(Errno::ENOENT));
    assert_eq!(call(&v.ctx, IOMMU_VIOMMU_ALLOC, &mut iommu_viommu_alloc { dev_id: v.ioas, ..c }), Err(Errno::ENOENT));
    c.hwpt_id = v.parent;
    call(&v.ctx, IOMMU_VIOMMU_ALLOC, &mut c).unwrap();
}

#[test]
fn vdevice_ids_are_unique_and_objects_keep_each_other_busy() {
    let v = vm();
    let other = v.ctx.bind_device(DeviceInfo::mock(2, MockFlags::default())).unwrap();
    let id = viommu(&v, iommu_viommu_alloc::default()).unwrap();
    assert_eq!(vdevice(&v, v.parent, v.dev, 1), Err(Errno::ENOENT), "not a vIOMMU");
    assert_eq!(vdevice(&v, id, 999, 1), Err(Errno::ENOENT));
    let vdev = vdevice(&v, id, v.dev, 0x1234).unwrap();
    assert_eq!(vdevice(&v, id, other.get(), 0x1234), Err(Errno::EEXIST));
    assert_eq!(vdevice(&v, id, v.dev, 0x5678), Err(Errno::EEXIST));
    let vtd = v.ctx.bind_device(DeviceInfo::new("vtd", 3)).unwrap();
    assert_eq!(vdevice(&v, id, vtd.get(), 9), Err(Errno::EINVAL), "behind another IOMMU");
    assert_eq!(destroy(&v, v.parent), Err(Errno::EBUSY));
    assert_eq!(destroy(&v, id), Err(Errno::EBUSY));
    destroy(&v, vdev).unwrap();
    vdevice(&v, id, other.get(), 0x1234).unwrap();
}

#[test]
fn nested_hwpts_can_be_allocated_on_a_viommu() {
    let v = vm();
    let id = viommu(&v, iommu_viommu_alloc::default()).unwrap();
    let mut data = ioasid_abi::selftest::iommu_hwpt_selftest { iotlb: 0xbeef, ..Default::default() };
    let mut c = iommu_hwpt_alloc {
        size: 48,
        dev_id: v.dev,
        pt_id: id,
        data_type: IOMMU_HWPT_DATA_SELFTEST,
        data_len: 4,
        data_uptr: &mut data as *mut _ as u64,
        ..Default::default()
    };
    assert_eq!(call(&v.ctx, IOMMU_HWPT_ALLOC, &mut iommu_hwpt_alloc { flags: 1, ..c }), Err(Errno::EOPNOTSUPP));
    call(&v.ctx, IOMMU_HWPT_ALLOC, &mut c).unwrap();
    assert_eq!(destroy(&v, id), Err(Errno::EBUSY), "the nested HWPT holds its vIOMMU");
    destroy(&v, c.out_hwpt_id).unwrap();
    destroy(&v, id).unwrap();
    destroy(&v, v.parent).unwrap();
}

#[test]
fn a_viommu_attaches_guest_pasids_from_its_set_through_the_extension_commands() {
    use ioasid_abi::ext::*;
    let ctx = Arc::new(Context::with_config(ContextConfig::isolated(Limit::Pages(1 << 20))));
    let ioas = ctx.ioas_alloc().unwrap();
    let dev = ctx.bind_device(DeviceInfo::mock(1, MockFlags { pasid: true, ..MockFlags::default() })).unwrap();
    let parent = ctx.hwpt_alloc(dev, ioas, HwptFlags { nest_parent: true, dirty_tracking: false }, None).unwrap();
    let v = Vm { ctx: ctx.clone(), ioas: ioas.get(), dev: dev.get(), parent: parent.get() };
    let viommu_id = viommu(&v, iommu_viommu_alloc::default()).unwrap();
    let vdevice_id = vdevice(&v, viommu_id, dev.get(), 0x10).unwrap();
    let attach = |vpasid: u32| {
        let mut c =
            ioasid_vdevice_attach_pasid { size: 24, vdevice_id, vpasid, pt_id: ioas.get(), ..Default::default() };
        call(&ctx, IOASID_VDEVICE_ATTACH_PASID, &mut c).map(|()| c.out_pasid)
    };
    assert_eq!(attach(4), Err(Errno::EINVAL), "the vIOMMU has no set yet");

    let mut set = ioasid_set_alloc { size: 24, quota: 1, ..Default::default() };
    call(&ctx, IOASID_SET_ALLOC, &mut set).unwrap();
    let mut give = ioasid_viommu_set_pasids { size: 16, viommu_id, set_id: set.out_set_id, __reserved: 0 };
    assert_eq!(call(&ctx, IOASID_VIOMMU_SET_PASIDS, &mut { give }), Ok(()));
    assert_eq!(call(&ctx, IOASID_VIOMMU_SET_PASIDS, &mut give), Err(Errno::EBUSY), "once only");
    assert_eq!(
        call(&ctx, IOASID_VIOMMU_SET_PASIDS, &mut { ioasid_viommu_set_pasids { viommu_id: 999, ..give } }),
        Err(Errno::ENOENT)
    );

    let host = attach(4).unwrap();
    let mut lookup = ioasid_vpasid_lookup { size: 16, set_id: set.out_set_id, vpasid: 4, out_pasid: 0 };
    call(&ctx, IOASID_VPASID_LOOKUP, &mut lookup).unwrap();
    assert_eq!(lookup.out_pasid, host, "the set maps vPASID 4 to the host PASID the device uses");
    assert_eq!(attach(4), Err(Errno::EBUSY));
    assert_eq!(attach(5), Err(Errno::EDQUOT), "the set's quota is 1");
    assert_eq!(
        call(
            &ctx,
            IOASID_VDEVICE_ATTACH_PASID,
            &mut ioasid_vdevice_attach_pasid { size: 24, flags: 1, ..Default::default() }
        ),
        Err(Errno::EOPNOTSUPP)
    );

    let mut detach = ioasid_vdevice_detach_pasid { size: 16, vdevice_id, vpasid: 4, __reserved: 0 };
    call(&ctx, IOASID_VDEVICE_DETACH_PASID, &mut detach).unwrap();
    assert_eq!(call(&ctx, IOASID_VDEVICE_DETACH_PASID, &mut detach), Err(Errno::EINVAL), "not attached any more");
    assert_eq!(call(&ctx, IOASID_VPASID_LOOKUP, &mut lookup), Err(Errno::ENOENT), "freed with its last user");
    assert_eq!(destroy(&v, set.out_set_id), Err(Errno::EBUSY), "the vIOMMU holds its set");
}

#[test]
fn veventq_alloc_and_its_fd_follow_linux() {
    use ioasid_abi::files::{self, File};
    let v = vm();
    let id = viommu(&v, iommu_viommu_alloc::default()).unwrap();
    let alloc = |c: iommu_veventq_alloc| {
        let mut c = iommu_veventq_alloc { size: 32, ..c };
        call(&v.ctx, IOMMU_VEVENTQ_ALLOC, &mut c).map(|()| c)
    };
    let good = iommu_veventq_alloc {
        viommu_id: id,
        r#type: IOMMU_VEVENTQ_TYPE_SELFTEST,
        veventq_depth: 2,
        ..Default::default()
    };
    assert_eq!(alloc(iommu_veventq_alloc { flags: 1, ..good }), Err(Errno::EOPNOTSUPP));
    assert_eq!(alloc(iommu_veventq_alloc { __reserved: 1, ..good }), Err(Errno::EOPNOTSUPP));
    assert_eq!(alloc(iommu_veventq_alloc { r#type: IOMMU_VEVENTQ_TYPE_DEFAULT, ..good }), Err(Errno::EOPNOTSUPP));
    assert_eq!(alloc(iommu_veventq_alloc { veventq_depth: 0, ..good }), Err(Errno::EINVAL));
    assert_eq!(alloc(iommu_veventq_alloc { viommu_id: v.parent, ..good }), Err(Errno::ENOENT));
    let c = alloc(good).unwrap();
    assert_eq!(alloc(good), Err(Errno::EEXIST), "one queue per type");
    let Some(File::Veventq(file)) = files::get(c.out_veventq_fd as i32) else { panic!("not a vEVENTQ fd") };
    let mut buf = [0u8; 64];
    let addr = buf.as_mut_ptr() as u64;
    assert_eq!(file.read(&InProcess, addr, 0, 0), Err(Errno::EINVAL), "shorter than a header, though empty");
    assert_eq!(file.read(&InProcess, addr, 7, 0), Err(Errno::EINVAL));
    assert_eq!(file.read(&InProcess, addr, 8, 0), Ok(0), "empty");

    // A device behind the vIOMMU, named 0x42, faults three times.
    let nested =
        v.ctx.hwpt_alloc_nested(DeviceId::new(v.dev), ViommuId::new(id), ioasid_engine::NestedData::selftest(0), None);
    v.ctx.attach(DeviceId::new(v.dev), nested.unwrap()).unwrap();
    vdevice(&v, id, v.dev, 0x42).unwrap();
    let dev = v.ctx.get(DeviceId::new(v.dev)).unwrap();
    for _ in 0..3 {
        assert!(dev.dma_write(1 << 24, b"x").is_err());
    }
    assert_eq!(file.read(&InProcess, addr, 0, 0), Err(Errno::EINVAL), "shorter than a header");
    assert_eq!(file.read(&InProcess, addr, 8, 0), Err(Errno::EINVAL), "the header fits, its data does not");
    assert_eq!(file.read(&InProcess, addr, 64, 8), Err(Errno::ESPIPE));
    assert_eq!(file.read(&InProcess, addr, 11, 0), Err(Errno::EINVAL), "too short for the first event");
    assert_eq!(file.read(&InProcess, addr, 12, 0), Ok(12));
    assert_eq!(buf[..12], [0, 0, 0, 0, 0, 0, 0, 0, 0x42, 0, 0, 0], "header (flags 0, sequence 0), then the ID");
    assert_eq!(file.read(&InProcess, addr, 64, 0), Ok(20), "the second event and the lost marker");
    assert_eq!(buf[..12], [0, 0, 0, 0, 1, 0, 0, 0, 0x42, 0, 0, 0]);
    assert_eq!(buf[12..20], [IOMMU_VEVENTQ_FLAG_LOST_EVENTS as u8, 0, 0, 0, 2, 0, 0, 0], "the third was lost");
    assert_eq!(file.read(&InProcess, addr, 64, 0), Ok(0), "empty");
    assert!(dev.dma_write(1 << 24, b"x").is_err());
    // A count of SIZE_MAX is bounded by the events waiting, never allocated.
    assert_eq!(file.read(&InProcess, addr, usize::MAX, 0), Ok(12));
    assert_eq!(file.read(&InProcess, addr, usize::MAX, 0), Ok(0));

    assert_eq!(destroy(&v, c.out_veventq_id), Err(Errno::EBUSY), "its fd holds it");
    drop(file);
    files::remove(c.out_veventq_fd as i32);
    destroy(&v, c.out_veventq_id).unwrap();
    alloc(good).unwrap();
}

/// An SMMUv3 guest: a vIOMMU of type ARM_SMMUV3 over a stage-2 parent, the
/// device known to the guest as stream 0x42.
fn smmu_vm() -> (Vm, u32) {
    let ctx = Arc::new(Context::with_config(ContextConfig::isolated(Limit::Pages(1 << 20))));
    let ioas = ctx.ioas_alloc().unwrap();
    let dev = ctx.bind_device(DeviceInfo::behind(IommuModel::ArmSmmuV3, "smmu", 1)).unwrap();
    let parent = ctx.hwpt_alloc(dev, ioas, HwptFlags { nest_parent: true, dirty_tracking: false }, None).unwrap();
    let v = Vm { ctx, ioas: ioas.get(), dev: dev.get(), parent: parent.get() };
    let mut c = iommu_viommu_alloc {
        size: 40,
        dev_id: v.dev,
        hwpt_id: v.parent,
        r#type: IOMMU_VIOMMU_TYPE_ARM_SMMUV3,
        ..Default::default()
    };
    call(&v.ctx, IOMMU_VIOMMU_ALLOC, &mut c).unwrap();
    let id = c.out_viommu_id;
    vdevice(&v, id, v.dev, 0x42).unwrap();
    (v, id)
}

fn smmu_nested(v: &Vm, pt_id: u32, ste: [u64; 2]) -> Result<u32, Errno> {
    let data = iommu_hwpt_arm_smmuv3 { ste };
    let mut c = iommu_hwpt_alloc {
        size: 48,
        dev_id: v.dev,
        pt_id,
        data_type: IOMMU_HWPT_DATA_ARM_SMMUV3,
        data_len: 16,
        data_uptr: data.as_bytes().as_ptr() as u64,
        ..Default::default()
    };
    call(&v.ctx, IOMMU_HWPT_ALLOC, &mut c).map(|()| c.out_hwpt_id)
}

fn smmu_invalidate(v: &Vm, hwpt_id: u32, data_type: u32, cmds: &[[u64; 2]]) -> (u32, Result<(), Errno>) {
    let mut c = iommu_hwpt_invalidate {
        size: 32,
        hwpt_id,
        data_uptr: cmds.as_ptr() as u64,
        data_type,
        entry_len: 16,
        entry_num: cmds.len() as u32,
        ..Default::default()
    };
    let rc = call(&v.ctx, IOMMU_HWPT_INVALIDATE, &mut c);
    (c.entry_num, rc)
}

#[test]
fn smmuv3_nested_stes_are_checked_as_linux_checks_them() {
    let (v, viommu_id) = smmu_vm();
    let s1 = [1 | 0b101 << 1 | 0x1000, 0];
    smmu_nested(&v, viommu_id, s1).unwrap();
    smmu_nested(&v, viommu_id, [0, 0]).unwrap();
    assert_eq!(smmu_nested(&v, viommu_id, [1 | 0b110 << 1, 0]), Err(Errno::EIO), "stage-2 Config");
    assert_eq!(smmu_nested(&v, viommu_id, [s1[0] | 1 << 52, 0]), Err(Errno::EIO), "a reserved bit");
    assert_eq!(smmu_nested(&v, v.parent, s1), Err(Errno::EOPNOTSUPP), "SMMUv3 nesting needs the vIOMMU");
    // The selftest's data on an SMMU vIOMMU, and an STE too short.
    let mut c = iommu_hwpt_alloc {
        size: 48,
        dev_id: v.dev,
        pt_id: viommu_id,
        data_type: IOMMU_HWPT_DATA_SELFTEST,
        data_len: 4,
        data_uptr: s1.as_ptr() as u64,
        ..Default::default()
    };
    assert_eq!(call(&v.ctx, IOMMU_HWPT_ALLOC, &mut c), Err(Errno::EOPNOTSUPP));
    c.data_type = IOMMU_HWPT_DATA_ARM_SMMUV3;
    assert_eq!(call(&v.ctx, IOMMU_HWPT_ALLOC, &mut c), Err(Errno::EINVAL));
}

#[test]
fn smmuv3_commands_go_to_the_viommu() {
    let (v, viommu_id) = smmu_vm();
    let nested = smmu_nested(&v, viommu_id, [1 | 0b101 << 1 | 0x1000, 0]).unwrap();
    let t = IOMMU_VIOMMU_INVALIDATE_DATA_ARM_SMMUV3;
    let good = [[0x12 | 1 << 48, 0x40_0000], [0x05 | 0x42 << 32, 1], [0x10, 0], [0x30, 0]];
    assert_eq!(smmu_invalidate(&v, viommu_id, t, &good), (4, Ok(())));
    // 7.3 checks each command field by field; the SMMU has no ATS, and
    // stage-2 invalidation (TLBI_S12_VMALL) is the host's.
    let refused: [[u64; 2]; 6] = [
        [0x28, 0],
        [0x40 | 0x42 << 32, 0],
        [0x10 | 1 << 48, 0],
        [0x30 | 1 << 32, 0],
        [0x05 | 0x42 << 32, 2],
        [0x12 | 1 << 48 | 1 << 12, 0x40_0000],
    ];
    for cmd in refused {
        assert_eq!(smmu_invalidate(&v, viommu_id, t, &[good[0], cmd]), (1, Err(Errno::EIO)), "{cmd:x?}");
    }
    // Processing stops at the first rejected command, and says where.
    let bad = [[0x11 | 1 << 48, 0], [0x46, 0], [0x28, 0]];
    assert_eq!(smmu_invalidate(&v, viommu_id, t, &bad), (1, Err(Errno::EIO)), "CMD_SYNC");
    let unknown_sid = [[0x03 | 0x77 << 32, 0]];
    assert_eq!(smmu_invalidate(&v, viommu_id, t, &unknown_sid), (0, Err(Errno::EIO)));
    assert_eq!(smmu_invalidate(&v, viommu_id, IOMMU_HWPT_INVALIDATE_DATA_VTD_S1, &good), (0, Err(Errno::EINVAL)));
    assert_eq!(smmu_invalidate(&v, viommu_id, t, &[]), (0, Ok(())), "an empty array probes the type");
    // The nested HWPT itself takes no invalidations: its vIOMMU does.
    assert_eq!(smmu_invalidate(&v, nested, t, &good).1, Err(Errno::EOPNOTSUPP));
}

#[test]
fn the_mock_viommu_echoes_its_data_and_shares_two_pages_at_an_mmap_offset() {
    use ioasid_abi::mmap;
    use ioasid_abi::selftest::iommu_viommu_selftest;
    let v = vm();
    let page = ioasid_engine::PAGE_SIZE;
    let with = |data: &mut [u8]| {
        let c = iommu_viommu_alloc {
            data_len: data.len() as u32,
            data_uptr: data.as_mut_ptr() as u64,
            ..Default::default()
        };
        viommu(&v, c)
    };
    let mut data = iommu_viommu_selftest { in_data: 0xbeef, ..Default::default() };
    assert_eq!(with(&mut data.as_mut_bytes()[..7]), Err(Errno::EINVAL), "shorter than up to out_data");
    let mut longer = [0u8; 32];
    longer[..4].copy_from_slice(&0xbeefu32.to_ne_bytes());
    longer[31] = 1;
    assert_eq!(with(&mut longer), Err(Errno::E2BIG), "unknown bytes that are not zero");
    assert_eq!(v.ctx.objects().iter().filter(|o| o.1 == "vIOMMU").count(), 0, "nothing left behind");

    let id = with(data.as_mut_bytes()).unwrap();
    assert_eq!(data.out_data, 0xbeef);
    assert_eq!((data.out_mmap_offset, data.out_mmap_length), (page, 2 * page), "past the first page");
    // A second one gets the next free offset; a longer struct's tail is zeroed.
    longer[31] = 0;
    longer[24..28].copy_from_slice(&[0; 4]);
    let second = with(&mut longer).unwrap();
    assert_eq!(u64::from_ne_bytes(longer[8..16].try_into().unwrap()), 3 * page);

    let region = |len: usize, prot: i32, flags: i32, off: u64| mmap::region(&v.ctx, len, prot, flags, off as i64);
    let (rw, shared) = (libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED);
    assert_eq!(region(2 * page as usize, rw, shared, page + page).err(), Some(mmap::ENXIO), "inside, not at, a region");
    assert_eq!(region(page as usize, rw, shared, page).err(), Some(mmap::ENXIO), "half the length");
    assert_eq!(region(4 * page as usize, rw, shared, page).err(), Some(mmap::ENXIO), "twice the length");
    assert_eq!(region(2 * page as usize, rw, shared, 0).err(), Some(mmap::ENXIO), "the first page is no region");
    assert_eq!(region(2 * page as usize, rw, libc::MAP_PRIVATE, page).err(), Some(Errno::EINVAL));
    assert_eq!(region(2 * page as usize, rw | libc::PROT_EXEC, shared, page).err(), Some(Errno::EPERM));
    assert_eq!(region(2 * page as usize, rw, shared, page + 1).err(), Some(Errno::EINVAL), "unaligned offset");
    let owner = region(2 * page as usize - 100, rw, shared, page).expect("rounded up to whole pages");
    let r = owner.mmap_region().unwrap();
    let mut word = [0u8; 4];
    rustix::io::pread(r.memory(), &mut word, 0).unwrap();
    assert_eq!(u32::from_ne_bytes(word), 0xbeef, "the region starts with in_data");

    // A mapping holds its vIOMMU until every piece of it is gone.
    mmap::mapped(0x7000_0000, 2 * page, owner);
    assert_eq!(destroy(&v, id), Err(Errno::EBUSY));
    mmap::unmapped(0x7000_0000 + page, page);
    assert_eq!(destroy(&v, id), Err(Errno::EBUSY), "the first page is still mapped");
    mmap::unmapped(0x7000_0000, page);
    destroy(&v, id).unwrap();
    assert_eq!(region(2 * page as usize, rw, shared, page).err(), Some(mmap::ENXIO), "its offset went with it");
    destroy(&v, second).unwrap();
    assert_eq!(with(data.as_mut_bytes()), Ok(id));
    assert_eq!(data.out_mmap_offset, page, "offsets are reused");
}

#[test]
fn hw_queues_pin_their_guest_memory_and_go_in_descending_order() {
    use ioasid_abi::hw_queue::*;
    use ioasid_abi::selftest::{IOMMU_HW_QUEUE_TYPE_SELFTEST, IOMMU_TEST_HW_QUEUE_MAX};
    let v = vm();
    let page = ioasid_engine::PAGE_SIZE;
    let id = viommu(&v, iommu_viommu_alloc::default()).unwrap();
    let alloc = |r#type: u32, index: u32, nesting_parent_iova: u64, length: u64| {
        let mut c = iommu_hw_queue_alloc {
            size: 40,
            viommu_id: id,
            r#type,
            index,
            nesting_parent_iova,
            length,
            ..Default::default()
        };
        call(&v.ctx, IOMMU_HW_QUEUE_ALLOC, &mut c).map(|()| c.out_hw_queue_id)
    };
    let st = IOMMU_HW_QUEUE_TYPE_SELFTEST;
    let iova = 1 << 24; // the mock's aperture
    assert_eq!(alloc(IOMMU_HW_QUEUE_TYPE_DEFAULT, 0, iova, page), Err(Errno::EOPNOTSUPP));
    assert_eq!(alloc(77, 0, iova, page), Err(Errno::EOPNOTSUPP), "a type the mock does not have");
    assert_eq!(alloc(st, 0, iova, 0), Err(Errno::EINVAL));
    assert_eq!(alloc(st, 0, u64::MAX, page), Err(Errno::EOVERFLOW));
    assert_eq!(alloc(st, 0, iova, page), Err(Errno::ENOENT), "nothing mapped there");
    let mut flags =
        iommu_hw_queue_alloc { size: 40, flags: 1, viommu_id: id, r#type: st, length: page, ..Default::default() };
    assert_eq!(call(&v.ctx, IOMMU_HW_QUEUE_ALLOC, &mut flags), Err(Errno::EOPNOTSUPP));

    let ram = ioasid_engine::HostBuffer::new(2 * page as usize).unwrap();
    // SAFETY: `ram` outlives the mappings (the context goes first).
    unsafe {
        v.ctx.map_user(IoasId::new(v.ioas), ram.addr(), page, Some(iova), ioasid_engine::Perm::RW).unwrap();
        v.ctx
            .map_user(IoasId::new(v.ioas), ram.addr() + page, page, Some(iova + page), ioasid_engine::Perm::RW)
            .unwrap();
    }
    assert_eq!(alloc(st, 1, iova, page), Err(Errno::EIO), "index 0 first");
    assert_eq!(alloc(st, IOMMU_TEST_HW_QUEUE_MAX, iova, page), Err(Errno::EINVAL));
    let q0 = alloc(st, 0, iova, page).unwrap();
    assert_eq!(alloc(st, 0, iova, page), Err(Errno::EEXIST));
    assert_eq!(
        v.ctx.unmap(IoasId::new(v.ioas), iova, page).map_err(Errno::from),
        Err(Errno::EBUSY),
        "the queue locks its page"
    );
    v.ctx.unmap(IoasId::new(v.ioas), iova + page, page).unwrap();
    let q1 = alloc(st, 1, iova + page / 2, page / 2).unwrap();
    let Ok(ioasid_engine::Object::HwQueue(q)) = v.ctx.object(ObjectId::new(q1)) else { panic!("a HW queue") };
    assert_eq!((q.index(), q.range(), q.host_addr()), (1, (iova + page / 2, page / 2), ram.addr() + page / 2));
    drop(q);
    assert_eq!(destroy(&v, q0), Err(Errno::EBUSY), "queue 1 depends on it");
    assert_eq!(destroy(&v, id), Err(Errno::EBUSY), "the queues hold their vIOMMU");
    destroy(&v, q1).unwrap();
    destroy(&v, q0).unwrap();
    v.ctx.unmap(IoasId::new(v.ioas), iova, page).unwrap();
    destroy(&v, id).unwrap();
}
