//! Devices attached per PASID: each PASID translates through its own table.

use std::time::Duration;

use ioasid_engine::DeviceId;
use ioasid_engine::fault::{LAST_PAGE, PASID_VALID, Response};
use ioasid_engine::{Context, DeviceInfo, DmaError, Error, HostBuffer, HwptFlags, Perm};

mod common;
use common::ctx;

const PAGE: u64 = 4096;

fn pasid_device(ctx: &Context, width: u8) -> DeviceId {
    let mut info = DeviceInfo::new("pasid", 1);
    info.max_pasid_log2 = width;
    info.pri = true;
    ctx.bind_device(info).unwrap()
}

#[test]
fn each_pasid_translates_through_its_own_table() {
    let ctx = ctx();
    let (a, b) = (ctx.ioas_alloc().unwrap(), ctx.ioas_alloc().unwrap());
    let dev = pasid_device(&ctx, 8);
    let (ma, mb) = (HostBuffer::new(PAGE as usize).unwrap(), HostBuffer::new(PAGE as usize).unwrap());
    // SAFETY: both buffers outlive the context.
    unsafe {
        ctx.map_user(a, ma.addr(), PAGE, Some(0x1000), Perm::RW).unwrap();
        ctx.map_user(b, mb.addr(), PAGE, Some(0x1000), Perm::RW).unwrap();
    }
    ctx.attach(dev, a).unwrap();
    ctx.attach_pasid(dev, 7, b).unwrap();
    let d = ctx.get(dev).unwrap();
    d.dma_write(0x1000, b"rid").unwrap();
    d.dma_write_pasid(7, 0x1000, b"p7").unwrap();
    assert_eq!(d.dma_write_pasid(9, 0x1000, b"x"), Err(DmaError::Blocked), "nothing attached at PASID 9");
    let (mut ra, mut rb) = ([0u8; 3], [0u8; 2]);
    ma.read_at(0, &mut ra);
    mb.read_at(0, &mut rb);
    assert_eq!((&ra, &rb), (b"rid", b"p7"));
    // Replace moves only that PASID.
    ctx.replace_pasid(dev, 7, a).unwrap();
    d.dma_write_pasid(7, 0x1000, b"P7").unwrap();
    ma.read_at(0, &mut rb);
    assert_eq!(&rb, b"P7");
    ctx.detach_pasid(dev, 7).unwrap();
    assert_eq!(d.dma_write_pasid(7, 0x1000, b"x"), Err(DmaError::Blocked));
    d.dma_write(0x1000, b"still").unwrap();
}

#[test]
fn pasids_must_fit_the_device() {
    let ctx = ctx();
    let ioas = ctx.ioas_alloc().unwrap();
    let plain = ctx.bind_device(DeviceInfo::new("plain", 2)).unwrap();
    assert!(matches!(ctx.attach_pasid(plain, 1, ioas), Err(Error::Invalid(_))), "no PASID capability");
    let dev = pasid_device(&ctx, 4);
    assert!(matches!(ctx.attach_pasid(dev, 16, ioas), Err(Error::Invalid(_))), "beyond a 4-bit width");
    assert!(matches!(ctx.attach_pasid(dev, 0, ioas), Err(Error::Invalid(_))), "PASID 0 is the RID's");
    ctx.attach_pasid(dev, 15, ioas).unwrap();
    assert!(matches!(ctx.attach_pasid(dev, 15, ioas), Err(Error::Invalid(_))), "attached already");
    assert!(matches!(ctx.detach_pasid(dev, 3), Err(Error::Invalid(_))));
}

#[test]
fn an_automatic_hwpt_lives_while_any_pasid_uses_it() {
    let ctx = ctx();
    let ioas = ctx.ioas_alloc().unwrap();
    let dev = pasid_device(&ctx, 8);
    let hwpt = ctx.attach(dev, ioas).unwrap();
    assert_eq!(ctx.attach_pasid(dev, 3, ioas).unwrap(), hwpt, "shared with the RID");
    ctx.detach(dev).unwrap();
    assert!(ctx.get(hwpt).is_ok(), "PASID 3 still uses it");
    ctx.unbind_device(dev).unwrap();
    assert!(ctx.get(hwpt).is_err(), "unbinding detached every PASID");
    ctx.destroy(ioas).unwrap();
}

#[test]
fn page_requests_carry_the_pasid_and_detach_refuses_only_that_pasids() {
    let ctx = ctx();
    let ioas = ctx.ioas_alloc().unwrap();
    let dev = pasid_device(&ctx, 8);
    let (fault_id, queue) = ctx.fault_alloc().unwrap();
    let hwpt = ctx.hwpt_alloc(dev, ioas, HwptFlags::default(), Some(fault_id)).unwrap();
    ctx.attach_pasid(dev, 5, hwpt).unwrap();
    ctx.attach_pasid(dev, 6, hwpt).unwrap();
    let d5 = ctx.get(dev).unwrap();
    let d6 = d5.clone();
    let t5 = std::thread::spawn(move || d5.dma_write_pasid(5, 0x2000, b"5"));
    let t6 = std::thread::spawn(move || d6.dma_write_pasid(6, 0x3000, b"6"));
    while queue.counts().0 < 2 {
        std::thread::sleep(Duration::from_millis(1));
    }
    ctx.detach_pasid(dev, 5).unwrap();
    assert!(t5.join().unwrap().is_err(), "PASID 5's request was refused with its table");
    assert_eq!(queue.counts(), (1, 0), "PASID 6's request still waits");
    let (cookie, g) = queue.next(Duration::ZERO).unwrap();
    let r = &g.requests[0];
    assert_eq!((r.flags, r.pasid, r.addr), (LAST_PAGE | PASID_VALID, 6, 0x3000));
    let mem = HostBuffer::new(PAGE as usize).unwrap();
    // SAFETY: `mem` outlives the context.
    unsafe { ctx.map_user(ioas, mem.addr(), PAGE, Some(0x3000), Perm::RW).unwrap() };
    queue.respond(cookie, Response::Success).unwrap();
    t6.join().unwrap().unwrap();
    let mut got = [0u8; 1];
    mem.read_at(0, &mut got);
    assert_eq!(&got, b"6");
}
