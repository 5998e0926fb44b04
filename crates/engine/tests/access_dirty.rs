//! Accesses (pin, copy, unmap notification) and dirty tracking.

use std::sync::{Arc, Mutex, Weak};

use ioasid_engine::{Access, AccessOps, Context, DeviceInfo, Error, HostBuffer, HwptFlags, IovaRange, Perm};

mod common;
use common::ctx;

const PAGE: u64 = 4096;

/// A driver that remembers its pins and drops those an unmap covers.
#[derive(Default)]
struct Driver {
    access: Mutex<Option<Weak<Access>>>,
    pins: Mutex<Vec<(u64, u64)>>,
    notices: Mutex<Vec<(u64, u64)>>,
}

impl AccessOps for Driver {
    fn unmap(&self, iova: u64, len: u64) {
        self.notices.lock().unwrap().push((iova, len));
        let access = self.access.lock().unwrap().as_ref().and_then(Weak::upgrade);
        let last = iova.saturating_add(len - 1);
        self.pins.lock().unwrap().retain(|&(i, l)| {
            let hit = i <= last && iova < i + l;
            if hit && let Some(a) = &access {
                a.unpin_pages(i, l);
            }
            !hit
        });
    }
}

fn with_access(ctx: &Context, ioas: ioasid_engine::IoasId, needs_pin: bool) -> (Arc<Driver>, Arc<Access>) {
    let driver = Arc::new(Driver::default());
    let (_, access) = ctx.access_create(ioas, driver.clone(), needs_pin).unwrap();
    *driver.access.lock().unwrap() = Some(Arc::downgrade(&access));
    (driver, access)
}

#[test]
fn access_pins_the_callers_pages_and_unmap_asks_it_to_let_go() {
    let ctx = ctx();
    let ioas = ctx.ioas_alloc().unwrap();
    let buf = HostBuffer::new(8 * PAGE as usize).unwrap();
    // SAFETY: `buf` outlives the context.
    let iova = unsafe { ctx.map_user(ioas, buf.addr(), 8 * PAGE, None, Perm::RW).unwrap() };
    let (driver, access) = with_access(&ctx, ioas, true);
    let pages = access.pin_pages(iova + PAGE, 2 * PAGE, true).unwrap();
    assert_eq!(pages, vec![buf.addr() + PAGE, buf.addr() + 2 * PAGE]);
    driver.pins.lock().unwrap().push((iova + PAGE, 2 * PAGE));
    assert_eq!(ctx.locked_pages(), 2);
    assert_eq!(ctx.unmap(ioas, iova, 8 * PAGE), Ok(8 * PAGE));
    assert_eq!(*driver.notices.lock().unwrap(), vec![(iova, 8 * PAGE)]);
    assert_eq!(ctx.locked_pages(), 0);
}

#[test]
fn unmap_fails_when_the_driver_keeps_its_pins() {
    let ctx = ctx();
    let ioas = ctx.ioas_alloc().unwrap();
    let buf = HostBuffer::new(PAGE as usize).unwrap();
    // SAFETY: `buf` outlives the context.
    let iova = unsafe { ctx.map_user(ioas, buf.addr(), PAGE, None, Perm::RW).unwrap() };
    let (driver, access) = with_access(&ctx, ioas, true);
    access.pin_pages(iova, PAGE, false).unwrap();
    // Not recorded: the driver will not unpin it when asked.
    assert!(matches!(ctx.unmap(ioas, iova, PAGE), Err(Error::Busy(_))));
    assert!(driver.notices.lock().unwrap().len() > 1, "unmap retried");
    access.unpin_pages(iova, PAGE);
    assert_eq!(ctx.unmap(ioas, iova, PAGE), Ok(PAGE));
}

#[test]
fn access_checks_rights_alignment_and_holes() {
    let ctx = ctx();
    let ioas = ctx.ioas_alloc().unwrap();
    let buf = HostBuffer::new(4 * PAGE as usize).unwrap();
    // SAFETY: `buf` outlives the context.
    unsafe {
        ctx.map_user(ioas, buf.addr(), PAGE, Some(0x10000), Perm::R).unwrap();
        ctx.map_user(ioas, buf.addr() + 2 * PAGE, PAGE, Some(0x11000), Perm::RW).unwrap();
    }
    let (_, access) = with_access(&ctx, ioas, true);
    assert!(matches!(access.pin_pages(0x10000, PAGE, true), Err(Error::Permission(_))));
    assert!(matches!(access.pin_pages(0x10000, 3 * PAGE, false), Err(Error::NotFound(_))));
    assert!(matches!(access.pin_pages(0x10000, 0, false), Err(Error::Invalid(_))));
    assert!(matches!(access.pin_pages(u64::MAX, 2, false), Err(Error::Overflow(_))));
    // Copies cross areas without a page table.
    access.write(0x10ffe, b"ab").map_err(|e| assert!(matches!(e, Error::Permission(_)))).ok();
    access.write(0x11000, b"cd").unwrap();
    let mut got = [0u8; 4];
    access.read(0x10ffe, &mut got).unwrap();
    assert_eq!(&got[2..], b"cd");
    assert!(matches!(access.read(0x12000, &mut got), Err(Error::NotFound(_))));
}

#[test]
fn a_pinning_access_makes_the_ioas_page_aligned() {
    let ctx = ctx();
    let ioas = ctx.ioas_alloc().unwrap();
    let buf = HostBuffer::new(2 * PAGE as usize).unwrap();
    // SAFETY: `buf` outlives the context.
    unsafe { ctx.map_user(ioas, buf.addr() + 8, 100, Some(0x10008), Perm::RW).unwrap() };
    let driver = Arc::new(Driver::default());
    let r = ctx.access_create(ioas, driver.clone(), true).map(|(id, _)| id);
    assert!(matches!(r, Err(Error::AddrInUse(_))), "{r:?}");
    assert_eq!(ctx.objects().len(), 1, "the failed access left no object behind");
    let (_, _unpinned) = with_access(&ctx, ioas, false);
}

#[test]
fn device_writes_set_dirty_bits_that_reading_clears() {
    let ctx = ctx();
    let ioas = ctx.ioas_alloc().unwrap();
    let mut info = DeviceInfo::new("d", 1);
    info.dirty_tracking = true;
    let dev = ctx.bind_device(info).unwrap();
    let hwpt_id = ctx.hwpt_alloc(dev, ioas, HwptFlags { nest_parent: false, dirty_tracking: true }, None).unwrap();
    ctx.attach(dev, hwpt_id).unwrap();
    let buf = HostBuffer::new(8 * PAGE as usize).unwrap();
    // SAFETY: `buf` outlives the context.
    let iova = unsafe { ctx.map_user(ioas, buf.addr(), 8 * PAGE, None, Perm::RW).unwrap() };
    let hwpt = ctx.get(hwpt_id).unwrap();
    let device = ctx.get(dev).unwrap();
    let range = IovaRange::new(iova, iova + 8 * PAGE - 1);
    let dirty = |keep| {
        let mut seen = Vec::new();
        hwpt.read_and_clear_dirty(range, keep, &mut |s, l| seen.push((s - iova, l))).map(|()| seen)
    };
    assert!(matches!(dirty(false), Err(Error::Invalid(_))), "tracking is off");
    hwpt.set_dirty_tracking(true).unwrap();
    // The first write caches the translation; the second hits the IOTLB.
    device.dma_write(iova + 3 * PAGE, b"x").unwrap();
    device.dma_write(iova + 3 * PAGE + 8, b"y").unwrap();
    let mut r = [0u8; 1];
    device.dma_read(iova + 5 * PAGE, &mut r).unwrap();
    assert_eq!(dirty(true), Ok(vec![(3 * PAGE, PAGE)]), "reads do not dirty");
    assert_eq!(dirty(false), Ok(vec![(3 * PAGE, PAGE)]), "no-clear kept it");
    assert_eq!(dirty(false), Ok(vec![]));
    // After clearing, a write through the still-cached translation marks again.
    device.dma_write(iova + 3 * PAGE, b"z").unwrap();
    assert_eq!(dirty(false), Ok(vec![(3 * PAGE, PAGE)]));
    let hole = IovaRange::new(iova, iova + 9 * PAGE - 1);
    assert!(matches!(hwpt.read_and_clear_dirty(hole, false, &mut |_, _| {}), Err(Error::Invalid(_))));
}

#[test]
fn dirty_tracking_needs_a_capable_hwpt_and_device() {
    let ctx = ctx();
    let ioas = ctx.ioas_alloc().unwrap();
    let mut info = DeviceInfo::new("d", 1);
    info.dirty_tracking = true;
    let dev = ctx.bind_device(info).unwrap();
    let plain = ctx.hwpt_alloc(dev, ioas, HwptFlags::default(), None).unwrap();
    assert!(matches!(ctx.get(plain).unwrap().set_dirty_tracking(true), Err(Error::Unsupported(_))));
    let tracking = ctx.hwpt_alloc(dev, ioas, HwptFlags { nest_parent: false, dirty_tracking: true }, None).unwrap();
    let blind = ctx.bind_device(DeviceInfo::new("blind", 2)).unwrap();
    assert!(matches!(ctx.attach(blind, tracking), Err(Error::Invalid(_))));
    ctx.attach(blind, plain).unwrap();
}
