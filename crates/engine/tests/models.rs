//! Devices behind each IOMMU model: DMA through the model's own table
//! format, its rights, dirty tracking in that format's bits, and tables
//! that belong to one architecture only.

use ioasid_engine::{
    DeviceInfo, DmaError, Error, FaultReason, HostBuffer, HwptFlags, IommuModel, IovaRange, PageFormat, Perm, Stage,
};

mod common;
use common::ctx;

const PAGE: u64 = 4096;
const MODELS: [IommuModel; 4] =
    [IommuModel::VTD, IommuModel::IntelVtd { levels: 5 }, IommuModel::ArmSmmuV3, IommuModel::AmdVi];

#[test]
fn dma_goes_through_each_models_format() {
    for iommu in MODELS {
        let ctx = ctx();
        let ioas = ctx.ioas_alloc().unwrap();
        let mem = HostBuffer::new(4 * PAGE as usize).unwrap();
        // SAFETY: `mem` outlives the context's use of it in this iteration.
        unsafe { ctx.map_user(ioas, mem.addr(), 2 * PAGE, Some(0x10_0000), Perm::RW).unwrap() };
        // SAFETY: as above.
        unsafe { ctx.map_user(ioas, mem.addr() + 2 * PAGE, PAGE, Some(0x20_0000), Perm::R).unwrap() };
        let dev_id = ctx.bind_device(DeviceInfo::behind(iommu, "d", 1)).unwrap();
        let hwpt = ctx.attach(dev_id, ioas).unwrap();
        assert_eq!(ctx.get(hwpt.paging()).unwrap().domain().format(), iommu.paging_format(false), "{iommu:?}");
        let dev = ctx.get(dev_id).unwrap();
        dev.dma_write(0x10_0ffe, b"abcd").unwrap();
        let mut seen = [0u8; 4];
        mem.read_at(0xffe, &mut seen);
        assert_eq!(&seen, b"abcd", "{iommu:?}: a write across two pages");
        dev.dma_read(0x20_0000, &mut seen).unwrap();
        let denied = dev.dma_write(0x20_0000, b"x");
        assert_eq!(
            denied,
            Err(DmaError::Fault {
                iova: 0x20_0000,
                reason: FaultReason::Permission,
                write: true,
                pasid: None,
                stage: Stage::Single
            }),
            "{iommu:?}"
        );
    }
}

#[test]
fn dirty_tracking_uses_each_formats_bits() {
    for iommu in MODELS {
        let ctx = ctx();
        let ioas = ctx.ioas_alloc().unwrap();
        let mem = HostBuffer::new(8 * PAGE as usize).unwrap();
        ctx.get(ioas).unwrap().set_huge_pages(false).unwrap();
        // SAFETY: `mem` outlives the context's use of it in this iteration.
        unsafe { ctx.map_user(ioas, mem.addr(), 8 * PAGE, Some(0), Perm::RW).unwrap() };
        let dev_id = ctx.bind_device(DeviceInfo { dirty_tracking: true, ..DeviceInfo::behind(iommu, "d", 1) }).unwrap();
        let flags = HwptFlags { nest_parent: false, dirty_tracking: true };
        let hwpt_id = ctx.hwpt_alloc(dev_id, ioas, flags, None).unwrap();
        ctx.attach(dev_id, hwpt_id).unwrap();
        let hwpt = ctx.get(hwpt_id).unwrap();
        hwpt.set_dirty_tracking(true).unwrap();
        let dev = ctx.get(dev_id).unwrap();
        dev.dma_write(3 * PAGE + 5, b"d").unwrap();
        dev.dma_read(5 * PAGE, &mut [0u8; 8]).unwrap();
        let range = IovaRange::new(0, 8 * PAGE - 1);
        let mut dirty = Vec::new();
        hwpt.read_and_clear_dirty(range, false, &mut |iova, _| dirty.push(iova)).unwrap();
        assert_eq!(dirty, [3 * PAGE], "{iommu:?}: only the written page");
        dirty.clear();
        hwpt.read_and_clear_dirty(range, false, &mut |iova, _| dirty.push(iova)).unwrap();
        assert!(dirty.is_empty(), "{iommu:?}: cleared");
        dev.dma_write(3 * PAGE, b"e").unwrap();
        hwpt.read_and_clear_dirty(range, true, &mut |iova, _| dirty.push(iova)).unwrap();
        assert_eq!(dirty, [3 * PAGE], "{iommu:?}: a cleaned page is written again");
    }
}

#[test]
fn smmu_nests_over_stage_2() {
    let ctx = ctx();
    let ioas = ctx.ioas_alloc().unwrap();
    let dev = ctx.bind_device(DeviceInfo::behind(IommuModel::ArmSmmuV3, "smmu", 1)).unwrap();
    let parent = ctx.hwpt_alloc(dev, ioas, HwptFlags { nest_parent: true, dirty_tracking: false }, None).unwrap();
    assert_eq!(ctx.get(parent).unwrap().domain().format(), PageFormat::ArmS2);
    // A device may attach to its SMMU's stage-2 table directly too.
    ctx.attach(dev, parent).unwrap();
}

#[test]
fn tables_belong_to_one_architecture() {
    let ctx = ctx();
    let ioas = ctx.ioas_alloc().unwrap();
    let vtd = ctx.bind_device(DeviceInfo::new("vtd", 1)).unwrap();
    let amd = ctx.bind_device(DeviceInfo::behind(IommuModel::AmdVi, "amd", 2)).unwrap();
    let hwpt = ctx.hwpt_alloc(vtd, ioas, HwptFlags::default(), None).unwrap();
    assert!(matches!(ctx.attach(amd, hwpt), Err(Error::Invalid(_))));
    // Attaching to the IOAS gives each its own automatic table.
    let a = ctx.attach(vtd, ioas).unwrap();
    let b = ctx.attach(amd, ioas).unwrap();
    assert_ne!(a, b);
    assert_eq!(ctx.get(b.paging()).unwrap().domain().format(), PageFormat::AmdV1);
}
