//! VFIO type1 compatibility and the dirty-tracking ioctls, through the
//! dispatcher with real pointers.

use std::sync::Arc;

use ioasid_abi::uapi::*;
use ioasid_abi::vfio::*;
use ioasid_abi::{Errno, InProcess, ioctl};
use ioasid_engine::{Context, DeviceId, DeviceInfo, HostBuffer, HwptPagingId};
use zerocopy::{FromBytes, IntoBytes};

mod common;
use common::ctx;

const PAGE: u64 = 4096;

fn call<T: IntoBytes + FromBytes>(ctx: &Arc<Context>, req: u32, cmd: &mut T) -> Result<i32, Errno> {
    ioctl(ctx, &InProcess, req, cmd as *mut T as u64)
}

fn value(ctx: &Arc<Context>, req: u32, arg: u64) -> Result<i32, Errno> {
    ioctl(ctx, &InProcess, req, arg)
}

/// A context whose VFIO compatibility IOAS has a device attached.
fn compat(kind: u64) -> (Arc<Context>, DeviceId) {
    let ctx = ctx();
    let ioas = ctx.ioas_alloc().unwrap();
    let dev = ctx.bind_device(DeviceInfo::new("d", 1)).unwrap();
    ctx.attach(dev, ioas).unwrap();
    ctx.set_vfio_ioas(Some(ioas)).unwrap();
    value(&ctx, VFIO_SET_IOMMU, kind).unwrap();
    (ctx, dev)
}

fn map_cmd(buf: &HostBuffer, iova: u64, size: u64) -> vfio_iommu_type1_dma_map {
    vfio_iommu_type1_dma_map {
        argsz: 32,
        flags: VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE,
        vaddr: buf.addr(),
        iova,
        size,
    }
}

fn unmap(ctx: &Arc<Context>, iova: u64, size: u64, flags: u32) -> Result<u64, Errno> {
    let mut c = vfio_iommu_type1_dma_unmap { argsz: 24, flags, iova, size };
    call(ctx, VFIO_IOMMU_UNMAP_DMA, &mut c).map(|_| c.size)
}

macro_rules! errno_test {
    ($name:ident, $errno:ident, $body:expr) => {
        #[test]
        fn $name() {
            let r: Result<i32, Errno> = $body;
            assert_eq!(r, Err(Errno::$errno));
        }
    };
}

#[test]
fn vfio_version_and_extensions() {
    let ctx = ctx();
    assert_eq!(value(&ctx, VFIO_GET_API_VERSION, 0), Ok(VFIO_API_VERSION));
    assert_eq!(value(&ctx, VFIO_CHECK_EXTENSION, VFIO_TYPE1V2_IOMMU), Ok(1));
    assert_eq!(value(&ctx, VFIO_CHECK_EXTENSION, VFIO_UNMAP_ALL), Ok(1));
    assert_eq!(value(&ctx, VFIO_CHECK_EXTENSION, 10), Ok(0), "VFIO_UPDATE_VADDR is not offered");
    assert_eq!(value(&ctx, VFIO_CHECK_EXTENSION, VFIO_DMA_CC_IOMMU), Err(Errno::ENODEV));
}

errno_test!(vfio_unknown_container_ioctl_is_enotty, ENOTTY, value(&ctx(), (b';' as u32) << 8 | 120, 0));
errno_test!(vfio_set_iommu_without_compat_ioas_is_enodev, ENODEV, value(&ctx(), VFIO_SET_IOMMU, VFIO_TYPE1V2_IOMMU));
errno_test!(vfio_set_iommu_unknown_type_is_einval, EINVAL, value(&ctx(), VFIO_SET_IOMMU, 2));
errno_test!(vfio_map_short_argsz_is_einval, EINVAL, {
    let buf = HostBuffer::new(PAGE as usize).unwrap();
    let mut c = map_cmd(&buf, 0x10000, PAGE);
    c.argsz = 8;
    call(&ctx(), VFIO_IOMMU_MAP_DMA, &mut c)
});
errno_test!(vfio_map_unknown_flag_is_einval, EINVAL, {
    let buf = HostBuffer::new(PAGE as usize).unwrap();
    let mut c = map_cmd(&buf, 0x10000, PAGE);
    c.flags |= 1 << 31;
    call(&ctx(), VFIO_IOMMU_MAP_DMA, &mut c)
});
errno_test!(vfio_map_without_compat_ioas_is_enodev, ENODEV, {
    let buf = HostBuffer::new(PAGE as usize).unwrap();
    call(&ctx(), VFIO_IOMMU_MAP_DMA, &mut map_cmd(&buf, 0x10000, PAGE))
});
errno_test!(vfio_unmap_all_with_a_range_is_einval, EINVAL, {
    let (ctx, _) = compat(VFIO_TYPE1V2_IOMMU);
    unmap(&ctx, 0x1000, PAGE, VFIO_DMA_UNMAP_FLAG_ALL).map(|_| 0)
});
errno_test!(vfio_info_short_argsz_is_einval, EINVAL, {
    let mut info = vfio_iommu_type1_info { argsz: 8, ..Default::default() };
    call(&ctx(), VFIO_IOMMU_GET_INFO, &mut info)
});

#[test]
fn vfio_type1v2_maps_and_refuses_partial_unmaps() {
    let (ctx, dev) = compat(VFIO_TYPE1V2_IOMMU);
    let buf = HostBuffer::new(4 * PAGE as usize).unwrap();
    call(&ctx, VFIO_IOMMU_MAP_DMA, &mut map_cmd(&buf, 0x10000, 4 * PAGE)).unwrap();
    ctx.get(dev).unwrap().dma_write(0x10000 + PAGE, b"v2").unwrap();
    assert_eq!(unmap(&ctx, 0x10000, PAGE, 0), Err(Errno::ENOENT));
    assert_eq!(unmap(&ctx, 0x10000, 4 * PAGE, 0), Ok(4 * PAGE));
    assert_eq!(unmap(&ctx, 0, 0, VFIO_DMA_UNMAP_FLAG_ALL), Ok(0));
}

#[test]
fn vfio_type1_splits_mappings_on_partial_unmap() {
    let (ctx, dev) = compat(VFIO_TYPE1_IOMMU);
    let buf = HostBuffer::new(4 * PAGE as usize).unwrap();
    call(&ctx, VFIO_IOMMU_MAP_DMA, &mut map_cmd(&buf, 0x10000, 4 * PAGE)).unwrap();
    assert_eq!(unmap(&ctx, 0x10000 + PAGE, PAGE, 0), Ok(PAGE));
    let device = ctx.get(dev).unwrap();
    assert!(device.dma_write(0x10000 + PAGE, b"x").is_err());
    device.dma_write(0x10000, b"y").unwrap();
    device.dma_write(0x10000 + 2 * PAGE, b"z").unwrap();
    assert_eq!(unmap(&ctx, 0, 0, VFIO_DMA_UNMAP_FLAG_ALL), Ok(3 * PAGE));
}

#[test]
fn vfio_info_reports_page_sizes_and_a_capability_chain() {
    let (ctx, _) = compat(VFIO_TYPE1V2_IOMMU);
    // Too small for the chain: argsz says how much is needed.
    let mut info = vfio_iommu_type1_info { argsz: 24, ..Default::default() };
    call(&ctx, VFIO_IOMMU_GET_INFO, &mut info).unwrap();
    assert_eq!(info.flags, VFIO_IOMMU_INFO_PGSIZES | VFIO_IOMMU_INFO_CAPS);
    assert_eq!(info.iova_pgsizes & PAGE, PAGE);
    assert_eq!(info.cap_offset, 0);
    let need = info.argsz as usize;
    assert_eq!(need, 24 + 16 + 16 + 16, "header, DMA-available cap, IOVA cap with one range");
    let mut raw = vec![0u64; need / 8];
    raw[0] = need as u64;
    let arg = raw.as_mut_ptr() as u64;
    ioctl(&ctx, &InProcess, VFIO_IOMMU_GET_INFO, arg).unwrap();
    let bytes = raw.as_bytes();
    let info = vfio_iommu_type1_info::read_from_prefix(bytes).unwrap().0;
    assert_eq!(info.cap_offset, 24);
    let first = vfio_info_cap_header::read_from_prefix(&bytes[24..]).unwrap().0;
    assert_eq!((first.id, first.next), (VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL, 40));
    let second = vfio_info_cap_header::read_from_prefix(&bytes[40..]).unwrap().0;
    assert_eq!((second.id, second.next), (VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE, 0));
    let nr = u32::from_ne_bytes(bytes[48..52].try_into().unwrap());
    let last = u64::from_ne_bytes(bytes[64..72].try_into().unwrap());
    assert_eq!((nr, last), (1, (1 << 48) - 1));
}

// ---- dirty tracking ----------------------------------------------------------

/// A context with a dirty-tracking HWPT over an IOAS holding 8 pages at 1 MiB.
fn dirty_setup(buf: &HostBuffer) -> (Arc<Context>, u32, DeviceId) {
    let ctx = ctx();
    let ioas = ctx.ioas_alloc().unwrap();
    let mut info = DeviceInfo::new("d", 1);
    info.dirty_tracking = true;
    let dev = ctx.bind_device(info).unwrap();
    let mut c = iommu_hwpt_alloc {
        size: 48,
        flags: IOMMU_HWPT_ALLOC_DIRTY_TRACKING,
        dev_id: dev.get(),
        pt_id: ioas.get(),
        ..Default::default()
    };
    call(&ctx, IOMMU_HWPT_ALLOC, &mut c).unwrap();
    ctx.attach(dev, HwptPagingId::new(c.out_hwpt_id)).unwrap();
    ctx.map_user_checked(ioas, buf.addr(), 8 * PAGE, Some(1 << 20), ioasid_engine::Perm::RW).unwrap();
    (ctx, c.out_hwpt_id, dev)
}

fn set_tracking(ctx: &Arc<Context>, hwpt_id: u32, flags: u32) -> Result<i32, Errno> {
    let mut c = iommu_hwpt_set_dirty_tracking { size: 16, flags, hwpt_id, __reserved: 0 };
    call(ctx, IOMMU_HWPT_SET_DIRTY_TRACKING, &mut c)
}

fn bitmap_cmd(hwpt_id: u32, iova: u64, length: u64, page_size: u64, data: &mut [u64]) -> iommu_hwpt_get_dirty_bitmap {
    iommu_hwpt_get_dirty_bitmap {
        size: 48,
        hwpt_id,
        iova,
        length,
        page_size,
        data: data.as_mut_ptr() as u64,
        ..Default::default()
    }
}

errno_test!(set_dirty_unknown_flag_is_eopnotsupp, EOPNOTSUPP, {
    let buf = HostBuffer::new(8 * PAGE as usize).unwrap();
    let (ctx, hwpt, _) = dirty_setup(&buf);
    set_tracking(&ctx, hwpt, 2)
});
errno_test!(set_dirty_unknown_hwpt_is_enoent, ENOENT, set_tracking(&ctx(), 9, 1));
errno_test!(set_dirty_on_a_plain_hwpt_is_eopnotsupp, EOPNOTSUPP, {
    let ctx = ctx();
    let ioas = ctx.ioas_alloc().unwrap();
    let dev = ctx.bind_device(DeviceInfo::new("d", 1)).unwrap();
    let hwpt = ctx.attach(dev, ioas).unwrap();
    set_tracking(&ctx, hwpt.get(), 1)
});
errno_test!(dirty_bitmap_zero_length_is_einval, EINVAL, {
    let buf = HostBuffer::new(8 * PAGE as usize).unwrap();
    let (ctx, hwpt, _) = dirty_setup(&buf);
    let mut bits = [0u64; 1];
    call(&ctx, IOMMU_HWPT_GET_DIRTY_BITMAP, &mut bitmap_cmd(hwpt, 1 << 20, 0, PAGE, &mut bits))
});
errno_test!(dirty_bitmap_zero_page_size_is_einval, EINVAL, {
    let buf = HostBuffer::new(8 * PAGE as usize).unwrap();
    let (ctx, hwpt, _) = dirty_setup(&buf);
    let mut bits = [0u64; 1];
    call(&ctx, IOMMU_HWPT_GET_DIRTY_BITMAP, &mut bitmap_cmd(hwpt, 1 << 20, PAGE, 0, &mut bits))
});
errno_test!(dirty_bitmap_unaligned_to_page_size_is_einval, EINVAL, {
    let buf = HostBuffer::new(8 * PAGE as usize).unwrap();
    let (ctx, hwpt, _) = dirty_setup(&buf);
    let mut bits = [0u64; 1];
    call(&ctx, IOMMU_HWPT_GET_DIRTY_BITMAP, &mut bitmap_cmd(hwpt, 1 << 20, 3 * PAGE, 2 * PAGE, &mut bits))
});
errno_test!(dirty_bitmap_wrapping_range_is_eoverflow, EOVERFLOW, {
    let buf = HostBuffer::new(8 * PAGE as usize).unwrap();
    let (ctx, hwpt, _) = dirty_setup(&buf);
    let mut bits = [0u64; 1];
    call(&ctx, IOMMU_HWPT_GET_DIRTY_BITMAP, &mut bitmap_cmd(hwpt, u64::MAX - PAGE + 1, 2 * PAGE, PAGE, &mut bits))
});
errno_test!(dirty_bitmap_with_tracking_off_is_einval, EINVAL, {
    let buf = HostBuffer::new(8 * PAGE as usize).unwrap();
    let (ctx, hwpt, _) = dirty_setup(&buf);
    let mut bits = [0u64; 1];
    call(&ctx, IOMMU_HWPT_GET_DIRTY_BITMAP, &mut bitmap_cmd(hwpt, 1 << 20, 8 * PAGE, PAGE, &mut bits))
});
errno_test!(dirty_bitmap_bad_pointer_is_efault, EFAULT, {
    let buf = HostBuffer::new(8 * PAGE as usize).unwrap();
    let (ctx, hwpt, _) = dirty_setup(&buf);
    set_tracking(&ctx, hwpt, 1).unwrap();
    let mut c = bitmap_cmd(hwpt, 1 << 20, 8 * PAGE, PAGE, &mut []);
    c.data = 8;
    call(&ctx, IOMMU_HWPT_GET_DIRTY_BITMAP, &mut c)
});

#[test]
fn dirty_bitmap_reports_device_writes_and_keeps_other_bits() {
    let buf = HostBuffer::new(8 * PAGE as usize).unwrap();
    let (ctx, hwpt, dev) = dirty_setup(&buf);
    set_tracking(&ctx, hwpt, IOMMU_HWPT_DIRTY_TRACKING_ENABLE).unwrap();
    let device = ctx.get(dev).unwrap();
    device.dma_write((1 << 20) + 2 * PAGE, b"a").unwrap();
    device.dma_write((1 << 20) + 7 * PAGE + 100, b"b").unwrap();
    let mut bits = [1u64 << 40];
    let mut c = bitmap_cmd(hwpt, 1 << 20, 8 * PAGE, PAGE, &mut bits);
    c.flags = IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR;
    call(&ctx, IOMMU_HWPT_GET_DIRTY_BITMAP, &mut c).unwrap();
    assert_eq!(bits[0], 1 << 40 | 1 << 2 | 1 << 7, "dirty bits set, the caller's own bit left alone");
    bits[0] = 0;
    call(&ctx, IOMMU_HWPT_GET_DIRTY_BITMAP, &mut bitmap_cmd(hwpt, 1 << 20, 8 * PAGE, PAGE, &mut bits)).unwrap();
    assert_eq!(bits[0], 1 << 2 | 1 << 7);
    bits[0] = 0;
    call(&ctx, IOMMU_HWPT_GET_DIRTY_BITMAP, &mut bitmap_cmd(hwpt, 1 << 20, 8 * PAGE, PAGE, &mut bits)).unwrap();
    assert_eq!(bits[0], 0, "cleared by the previous read");
}

#[test]
fn dirty_bits_of_small_io_pages_cover_exactly_the_dirty_run() {
    let buf = HostBuffer::new(8 * PAGE as usize).unwrap();
    let (ctx, hwpt, dev) = dirty_setup(&buf);
    set_tracking(&ctx, hwpt, IOMMU_HWPT_DIRTY_TRACKING_ENABLE).unwrap();
    let device = ctx.get(dev).unwrap();
    for (page_size, first, last) in [(1024, 8, 11), (1, 2 * PAGE, 3 * PAGE - 1)] {
        device.dma_write((1 << 20) + 2 * PAGE, b"a").unwrap();
        let nbits = 8 * PAGE / page_size;
        // The caller's own bits around the run must survive.
        let mut bits = vec![0u64; nbits.div_ceil(64) as usize];
        bits[0] = 1;
        let own = (first - 1, last + 1);
        for b in [own.0, own.1] {
            bits[(b / 64) as usize] |= 1 << (b % 64);
        }
        call(&ctx, IOMMU_HWPT_GET_DIRTY_BITMAP, &mut bitmap_cmd(hwpt, 1 << 20, 8 * PAGE, page_size, &mut bits))
            .unwrap();
        for b in 0..nbits {
            let set = bits[(b / 64) as usize] & (1 << (b % 64)) != 0;
            let want = b == 0 || b == own.0 || b == own.1 || (first..=last).contains(&b);
            assert_eq!(set, want, "bit {b} with {page_size}-byte IO pages");
        }
    }
}
