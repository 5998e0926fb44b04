//! The selftest mock IOMMU of Linux 7.3 (`drivers/iommu/iommufd/selftest.c`)
//! through `IOMMU_TEST_CMD` and the commands its objects take: the mock
//! device's cache, selftest data sizes, page-table types, PASIDs and events.

use std::sync::Arc;

use ioasid_abi::Errno;
use ioasid_abi::selftest::*;
use ioasid_abi::uapi::*;
use ioasid_engine::{Context, ContextConfig, HwptPagingId, Limit, ObjectId};
use zerocopy::{FromBytes, IntoBytes};

mod common;
use common::call;

fn test_cmd(ctx: &Arc<Context>, op: u32, id: u32, arm: &[u32]) -> Result<iommu_test_cmd, Errno> {
    let mut c = iommu_test_cmd { size: 72, op, id, ..Default::default() };
    c.union.as_mut_bytes()[..arm.len() * 4].copy_from_slice(arm.as_bytes());
    call(ctx, IOMMU_TEST_CMD, &mut c).map(|()| c)
}

/// An IOAS with one mock device attached: (ctx, ioas, stdev, hwpt, idev).
fn mock_domain(flags: u32) -> (Arc<Context>, u32, u32, u32, u32) {
    mock_domain_with(flags, ContextConfig::isolated(Limit::Pages(1 << 20)))
}

fn mock_domain_with(flags: u32, config: ContextConfig) -> (Arc<Context>, u32, u32, u32, u32) {
    let ctx = Arc::new(Context::with_config(config));
    let mut a = iommu_ioas_alloc { size: 12, ..Default::default() };
    call(&ctx, IOMMU_IOAS_ALLOC, &mut a).unwrap();
    let c = test_cmd(&ctx, IOMMU_TEST_OP_MOCK_DOMAIN_FLAGS, a.out_ioas_id, &[0, 0, 0, flags]).unwrap();
    let out: [u32; 3] = <[u32; 3]>::read_from_prefix(c.union.as_bytes()).unwrap().0;
    (ctx, a.out_ioas_id, out[0], out[1], out[2])
}

fn check_cache(ctx: &Arc<Context>, idev: u32, id: u32, value: u32) -> Result<(), Errno> {
    test_cmd(ctx, IOMMU_TEST_OP_DEV_CHECK_CACHE, idev, &[id, value]).map(drop)
}

fn alloc_hwpt<T: IntoBytes + FromBytes>(
    ctx: &Arc<Context>,
    idev: u32,
    pt_id: u32,
    flags: u32,
    data_type: u32,
    data: Option<&mut T>,
    data_len: u32,
) -> Result<u32, Errno> {
    let data_uptr = data.map_or(0, |d| d as *mut T as u64);
    let mut c =
        iommu_hwpt_alloc { size: 48, flags, dev_id: idev, pt_id, data_type, data_len, data_uptr, ..Default::default() };
    call(ctx, IOMMU_HWPT_ALLOC, &mut c).map(|()| c.out_hwpt_id)
}

/// A selftest vIOMMU over a new nesting parent of `ioas`, for `idev`.
/// `IOMMU_VEVENTQ_ALLOC` of a selftest vEVENTQ of `depth` on `viommu_id`.
fn selftest_veventq(viommu_id: u32, veventq_depth: u32) -> iommu_veventq_alloc {
    iommu_veventq_alloc {
        size: 32,
        viommu_id,
        r#type: IOMMU_VEVENTQ_TYPE_SELFTEST,
        veventq_depth,
        ..Default::default()
    }
}

fn selftest_viommu(ctx: &Arc<Context>, ioas: u32, idev: u32) -> u32 {
    let parent =
        alloc_hwpt::<u8>(ctx, idev, ioas, IOMMU_HWPT_ALLOC_NEST_PARENT, IOMMU_HWPT_DATA_NONE, None, 0).unwrap();
    let mut v = iommu_viommu_alloc {
        size: 40,
        r#type: IOMMU_VIOMMU_TYPE_SELFTEST,
        dev_id: idev,
        hwpt_id: parent,
        ..Default::default()
    };
    call(ctx, IOMMU_VIOMMU_ALLOC, &mut v).unwrap();
    v.out_viommu_id
}

/// A selftest vIOMMU over a nesting parent, with `idev` known as `virt_id`.
fn viommu(ctx: &Arc<Context>, ioas: u32, idev: u32, virt_id: u64) -> u32 {
    let viommu_id = selftest_viommu(ctx, ioas, idev);
    let mut d = iommu_vdevice_alloc { size: 24, viommu_id, dev_id: idev, virt_id, ..Default::default() };
    call(ctx, IOMMU_VDEVICE_ALLOC, &mut d).unwrap();
    viommu_id
}

fn invalidate<T: IntoBytes + FromBytes>(
    ctx: &Arc<Context>,
    id: u32,
    data_type: u32,
    entries: &mut [T],
    entry_len: u32,
    entry_num: u32,
) -> (u32, Result<(), Errno>) {
    let mut c = iommu_hwpt_invalidate {
        size: 32,
        hwpt_id: id,
        data_uptr: entries.as_mut_ptr() as u64,
        data_type,
        entry_len,
        entry_num,
        __reserved: 0,
    };
    let rc = call(ctx, IOMMU_HWPT_INVALIDATE, &mut c);
    (c.entry_num, rc)
}

#[test]
fn a_new_mock_device_has_its_default_cache() {
    let (ctx, ioas, _, _, idev) = mock_domain(0);
    for id in 0..=MOCK_DEV_CACHE_ID_MAX {
        check_cache(&ctx, idev, id, IOMMU_TEST_DEV_CACHE_DEFAULT).unwrap();
    }
    assert_eq!(check_cache(&ctx, idev, 0, 0), Err(Errno::EINVAL), "a value it does not hold");
    assert_eq!(check_cache(&ctx, idev, MOCK_DEV_CACHE_ID_MAX + 1, IOMMU_TEST_DEV_CACHE_DEFAULT), Err(Errno::EINVAL));
    assert_eq!(check_cache(&ctx, ioas, 0, IOMMU_TEST_DEV_CACHE_DEFAULT), Err(Errno::ENOENT), "not a device");
    assert_eq!(check_cache(&ctx, 999, 0, IOMMU_TEST_DEV_CACHE_DEFAULT), Err(Errno::ENOENT));
}

#[test]
fn viommu_invalidation_clears_the_cache_of_the_device_it_names() {
    let (ctx, ioas, _, hwpt, idev) = mock_domain(0);
    let v = viommu(&ctx, ioas, idev, 0x99);
    let ty = IOMMU_VIOMMU_INVALIDATE_DATA_SELFTEST;
    let cmd = |flags, vdev_id, cache_id| iommu_viommu_invalidate_selftest { flags, vdev_id, cache_id };
    let mut inv = [cmd(0, 0x99, 0), cmd(0xffff_ffff, 0x99, 1)];
    assert_eq!(invalidate(&ctx, v, ty, &mut inv, 12, 0), (0, Ok(())), "an empty array checks the type");
    assert_eq!(invalidate(&ctx, v, ty + 1, &mut inv, 12, 0), (0, Err(Errno::EINVAL)));
    assert_eq!(invalidate(&ctx, v, ty, &mut inv, 12, 2), (1, Err(Errno::EOPNOTSUPP)), "the first one is done");
    check_cache(&ctx, idev, 0, 0).unwrap();
    check_cache(&ctx, idev, 1, IOMMU_TEST_DEV_CACHE_DEFAULT).unwrap();
    inv[1] = cmd(0, 0x99, MOCK_DEV_CACHE_ID_MAX + 1);
    assert_eq!(invalidate(&ctx, v, ty, &mut inv, 12, 2), (1, Err(Errno::EINVAL)));
    assert_eq!(invalidate(&ctx, v, ty, &mut [cmd(0, 0x9, 0)], 12, 1), (0, Err(Errno::EINVAL)), "unknown vdev_id");
    // Entries longer than the struct are taken when the tail is zero.
    let mut long = [[0u32; 4]; 1];
    long[0][..3].copy_from_slice(&[0, 0x99, 2]);
    assert_eq!(invalidate(&ctx, v, ty, &mut long, 16, 1), (1, Ok(())));
    check_cache(&ctx, idev, 2, 0).unwrap();
    long[0][3] = 1;
    assert_eq!(invalidate(&ctx, v, ty, &mut long, 16, 1), (0, Err(Errno::E2BIG)));
    assert_eq!(invalidate(&ctx, v, ty, &mut [cmd(IOMMU_TEST_INVALIDATE_FLAG_ALL, 0x99, 0)], 12, 1), (1, Ok(())));
    for id in 0..=MOCK_DEV_CACHE_ID_MAX {
        check_cache(&ctx, idev, id, 0).unwrap();
    }
    // A paging HWPT takes no invalidations: ENOENT as in 6.12 (7.3 says EINVAL).
    assert_eq!(invalidate(&ctx, hwpt, ty, &mut inv, 12, 1), (0, Err(Errno::ENOENT)));
    assert_eq!(invalidate(&ctx, 999, ty, &mut inv, 12, 1), (0, Err(Errno::ENOENT)));
}

#[test]
fn selftest_hwpt_data_is_eight_bytes_and_its_first_version_four() {
    let (ctx, ioas, _, _, idev) = mock_domain(0);
    let parent =
        alloc_hwpt::<u8>(&ctx, idev, ioas, IOMMU_HWPT_ALLOC_NEST_PARENT, IOMMU_HWPT_DATA_NONE, None, 0).unwrap();
    let mut data = [0u32; 3];
    data[0] = IOMMU_TEST_IOTLB_DEFAULT;
    let ty = IOMMU_HWPT_DATA_SELFTEST;
    let nested = |data: Option<&mut [u32; 3]>, len| alloc_hwpt(&ctx, idev, parent, 0, ty, data, len);
    nested(Some(&mut data), 8).unwrap();
    nested(Some(&mut data), 4).unwrap();
    assert_eq!(nested(Some(&mut data), 3), Err(Errno::EINVAL), "shorter than the first version");
    assert_eq!(nested(Some(&mut data), 12), Err(Errno::EINVAL), "longer than the driver knows");
    // A whole struct is read, so a bad pointer faults rather than failing the size check.
    assert_eq!(nested(None, 8), Err(Errno::EFAULT));
}

#[test]
fn selftest_data_chooses_the_paging_table_and_its_dirty_granule() {
    use ioasid_engine::PageFormat;
    let (ctx, ioas, _, _, idev) = mock_domain(0);
    let ty = IOMMU_HWPT_DATA_SELFTEST;
    let dirty = IOMMU_HWPT_ALLOC_DIRTY_TRACKING;
    let mut cfg = iommu_hwpt_selftest { iotlb: 0, pagetable_type: MOCK_IOMMUPT_HUGE };
    let huge = alloc_hwpt(&ctx, idev, ioas, dirty, ty, Some(&mut cfg), 8).unwrap();
    assert_eq!(ctx.get(HwptPagingId::new(huge)).unwrap().domain().format(), PageFormat::MockHuge);
    cfg.pagetable_type = 7;
    assert_eq!(alloc_hwpt(&ctx, idev, ioas, dirty, ty, Some(&mut cfg), 8), Err(Errno::EOPNOTSUPP));
    assert_eq!(alloc_hwpt(&ctx, idev, ioas, dirty, ty + 1, Some(&mut cfg), 8), Err(Errno::EOPNOTSUPP));
    cfg.pagetable_type = MOCK_IOMMUPT_DEFAULT;
    let hwpt = alloc_hwpt(&ctx, idev, ioas, dirty, ty, Some(&mut cfg), 8).unwrap();
    assert_eq!(ctx.get(HwptPagingId::new(hwpt)).unwrap().domain().format(), PageFormat::MockPt);

    // The IOAS maps CPU pages; dirtying one 2 KiB half reports the whole page.
    let buf = ioasid_engine::HostBuffer::new(0x4000).unwrap();
    let mut map = iommu_ioas_map {
        size: 40,
        flags: IOMMU_IOAS_MAP_FIXED_IOVA | IOMMU_IOAS_MAP_READABLE | IOMMU_IOAS_MAP_WRITEABLE,
        ioas_id: ioas,
        user_va: buf.addr(),
        length: 0x4000,
        iova: 1 << 24,
        ..Default::default()
    };
    call(&ctx, IOMMU_IOAS_MAP, &mut map).unwrap();
    let mut track = iommu_hwpt_set_dirty_tracking { size: 16, flags: 1, hwpt_id: hwpt, __reserved: 0 };
    call(&ctx, IOMMU_HWPT_SET_DIRTY_TRACKING, &mut track).unwrap();
    let mut bits = [0u8; 8];
    bits[0] = 0b1_0000; // the 2 KiB page at 8 KiB, first half of the third CPU page
    let mut arm = [0u32; 12];
    arm[2..4].copy_from_slice(&[1 << 24, 0]); // iova
    arm[4..6].copy_from_slice(&[0x4000, 0]); // length
    arm[6..8].copy_from_slice(&[0x800, 0]); // page_size
    let ptr = bits.as_mut_ptr() as u64;
    arm[8..10].copy_from_slice(&[ptr as u32, (ptr >> 32) as u32]);
    test_cmd(&ctx, IOMMU_TEST_OP_DIRTY, hwpt, &arm).unwrap();
    bits = [0; 8];
    let mut get = iommu_hwpt_get_dirty_bitmap {
        size: 48,
        hwpt_id: hwpt,
        iova: 1 << 24,
        length: 0x4000,
        page_size: 0x800,
        data: bits.as_mut_ptr() as u64,
        ..Default::default()
    };
    call(&ctx, IOMMU_HWPT_GET_DIRTY_BITMAP, &mut get).unwrap();
    assert_eq!(bits[0], 0b11_0000, "both halves of the CPU page");
}

#[test]
fn pasid_ops_attach_replace_check_and_detach_a_mock_devices_pasid() {
    let (ctx, ioas, stdev, _, idev) = mock_domain(MOCK_FLAGS_DEVICE_PASID);
    let flags = IOMMU_HWPT_ALLOC_PASID;
    let a = alloc_hwpt::<u8>(&ctx, idev, ioas, flags, IOMMU_HWPT_DATA_NONE, None, 0).unwrap();
    let b = alloc_hwpt::<u8>(&ctx, idev, ioas, flags, IOMMU_HWPT_DATA_NONE, None, 0).unwrap();
    let op = |op, arm: &[u32]| test_cmd(&ctx, op, stdev, arm).map(drop);
    op(IOMMU_TEST_OP_PASID_DETACH, &[100]).unwrap();
    op(IOMMU_TEST_OP_PASID_CHECK_HWPT, &[100, 0]).unwrap();
    assert_eq!(op(IOMMU_TEST_OP_PASID_REPLACE, &[100, a]), Err(Errno::EINVAL), "nothing to replace");
    assert_eq!(op(IOMMU_TEST_OP_PASID_ATTACH, &[100, ioas]), Err(Errno::EINVAL), "not a HWPT");
    op(IOMMU_TEST_OP_PASID_ATTACH, &[100, a]).unwrap();
    op(IOMMU_TEST_OP_PASID_CHECK_HWPT, &[100, a]).unwrap();
    assert_eq!(op(IOMMU_TEST_OP_PASID_CHECK_HWPT, &[100, 0]), Err(Errno::EINVAL));
    assert_eq!(op(IOMMU_TEST_OP_PASID_CHECK_HWPT, &[100, ioas]), Err(Errno::EINVAL));
    assert_eq!(op(IOMMU_TEST_OP_PASID_ATTACH, &[100, b]), Err(Errno::EBUSY), "attach does not overwrite");
    op(IOMMU_TEST_OP_PASID_REPLACE, &[100, b]).unwrap();
    op(IOMMU_TEST_OP_PASID_CHECK_HWPT, &[100, b]).unwrap();
    op(IOMMU_TEST_OP_PASID_DETACH, &[100]).unwrap();
    op(IOMMU_TEST_OP_PASID_CHECK_HWPT, &[100, 0]).unwrap();
    assert_eq!(test_cmd(&ctx, IOMMU_TEST_OP_PASID_ATTACH, ioas, &[100, a]).map(drop), Err(Errno::ENOENT));

    // A device without the PASID capability takes none.
    let other = test_cmd(&ctx, IOMMU_TEST_OP_MOCK_DOMAIN_FLAGS, ioas, &[0, 0, 0, 0]).unwrap();
    let other = <[u32; 1]>::read_from_prefix(other.union.as_bytes()).unwrap().0[0];
    assert_eq!(test_cmd(&ctx, IOMMU_TEST_OP_PASID_ATTACH, other, &[100, a]).map(drop), Err(Errno::EINVAL));
}

#[test]
fn vevents_reach_the_selftest_queue_once_the_device_has_a_vdevice_and_is_attached() {
    let (ctx, ioas, stdev, _, idev) = mock_domain(0);
    let viommu_id = selftest_viommu(&ctx, ioas, idev);
    let mut data = iommu_hwpt_selftest { iotlb: IOMMU_TEST_IOTLB_DEFAULT, ..Default::default() };
    let nested = alloc_hwpt(&ctx, idev, viommu_id, 0, IOMMU_HWPT_DATA_SELFTEST, Some(&mut data), 8).unwrap();
    let trigger = || test_cmd(&ctx, IOMMU_TEST_OP_TRIGGER_VEVENT, 0, &[idev]).map(drop);
    let replace = |pt_id| test_cmd(&ctx, IOMMU_TEST_OP_MOCK_DOMAIN_REPLACE, stdev, &[pt_id]).map(drop);
    assert_eq!(replace(nested), Err(Errno::ENOENT), "no vDEVICE yet");
    assert_eq!(trigger(), Err(Errno::ENOENT), "not behind the vIOMMU");

    let depth = |veventq_depth| selftest_veventq(viommu_id, veventq_depth);
    assert_eq!(call(&ctx, IOMMU_VEVENTQ_ALLOC, &mut depth(0)), Err(Errno::EINVAL));
    assert_eq!(call(&ctx, IOMMU_VEVENTQ_ALLOC, &mut depth((1 << 19) + 1)), Err(Errno::EINVAL));
    let mut q = depth(1 << 19);
    call(&ctx, IOMMU_VEVENTQ_ALLOC, &mut q).unwrap();
    let Ok(ioasid_engine::Object::Veventq(queue)) = ctx.object(ObjectId::new(q.out_veventq_id)) else {
        panic!("a vEVENTQ")
    };

    let mut d = iommu_vdevice_alloc { size: 24, viommu_id, dev_id: idev, virt_id: 0x99, ..Default::default() };
    call(&ctx, IOMMU_VDEVICE_ALLOC, &mut d).unwrap();
    replace(nested).unwrap();
    trigger().unwrap();
    let events = queue.read(64).expect("one event");
    assert_eq!(events.len(), 1);
    replace(ioas).unwrap();
    assert_eq!(trigger(), Err(Errno::ENOENT), "attached to the IOAS again");
    // SAFETY: the vEVENTQ's fd was made for this test and nothing else uses it.
    unsafe { libc::close(q.out_veventq_fd as i32) };
}

/// A context with a queue-depth limit (a daemon's client's) refuses a
/// deeper vEVENTQ as Linux refuses one past its own bound.
#[test]
fn a_veventq_deeper_than_the_context_allows_is_einval() {
    let config = ContextConfig { max_queue_depth: Some(8), ..ContextConfig::isolated(Limit::Pages(1 << 20)) };
    let (ctx, ioas, _, _, idev) = mock_domain_with(0, config);
    let viommu_id = selftest_viommu(&ctx, ioas, idev);
    assert_eq!(call(&ctx, IOMMU_VEVENTQ_ALLOC, &mut selftest_veventq(viommu_id, 9)), Err(Errno::EINVAL));
    let mut q = selftest_veventq(viommu_id, 8);
    call(&ctx, IOMMU_VEVENTQ_ALLOC, &mut q).unwrap();
    // SAFETY: the vEVENTQ's fd was made for this test and nothing else uses it.
    unsafe { libc::close(q.out_veventq_fd as i32) };
}
