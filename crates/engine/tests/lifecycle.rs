//! Object lifetimes: IDs, EBUSY while used, automatic HWPTs, replace, and
//! teardown that leaves nothing pinned.

use ioasid_engine::{DeviceId, DeviceInfo, Error, HostBuffer, HwptFlags, IoasId, IovaRange, ObjectId, Perm, PtId};

mod common;
use common::ctx;

const PAGE: u64 = 4096;

#[test]
fn unknown_and_wrong_type_ids_are_not_found() {
    let ctx = ctx();
    let ioas = ctx.ioas_alloc().unwrap();
    assert!(matches!(ctx.get(DeviceId::new(ioas.get())), Err(Error::NoObject { kind: "device", .. })));
    assert!(matches!(ctx.get(IoasId::new(77)), Err(Error::NoObject { id: 77, .. })));
    assert!(matches!(ctx.destroy(ObjectId::new(77)), Err(Error::NoObject { id: 77, .. })));
}

#[test]
fn auto_hwpt_is_shared_and_goes_with_its_last_device() {
    let ctx = ctx();
    let ioas = ctx.ioas_alloc().unwrap();
    let a = ctx.bind_device(DeviceInfo::new("a", 1)).unwrap();
    let b = ctx.bind_device(DeviceInfo::new("b", 2)).unwrap();
    let h1 = ctx.attach(a, ioas).unwrap();
    let h2 = ctx.attach(b, ioas).unwrap();
    assert_eq!(h1, h2);
    assert_eq!(ctx.get(ioas).unwrap().domain_count(), 1);
    assert!(matches!(ctx.destroy(ioas), Err(Error::Busy(_))));
    ctx.detach(a).unwrap();
    assert!(ctx.get(h1).is_ok(), "still used by b");
    ctx.detach(b).unwrap();
    assert!(ctx.get(h1).is_err(), "auto HWPT destroyed with its last device");
    assert_eq!(ctx.get(ioas).unwrap().domain_count(), 0);
    ctx.destroy(ioas).unwrap();
}

#[test]
fn attach_twice_and_detach_unattached_are_invalid() {
    let ctx = ctx();
    let ioas = ctx.ioas_alloc().unwrap();
    let d = ctx.bind_device(DeviceInfo::new("d", 1)).unwrap();
    assert!(matches!(ctx.detach(d), Err(Error::Invalid(_))));
    assert!(matches!(ctx.replace(d, ioas), Err(Error::Invalid(_))));
    assert!(matches!(ctx.attach(d, PtId::new(99)), Err(Error::NoObject { id: 99, .. })));
    ctx.attach(d, ioas).unwrap();
    assert!(matches!(ctx.attach(d, ioas), Err(Error::Invalid(_))));
    ctx.detach(d).unwrap();
    assert!(matches!(ctx.attach(d, PtId::new(d.get())), Err(Error::Invalid(_))));
}

#[test]
fn replace_moves_dma_to_the_new_ioas_and_its_reservations() {
    let ctx = ctx();
    let (x, y) = (ctx.ioas_alloc().unwrap(), ctx.ioas_alloc().unwrap());
    let mut info = DeviceInfo::new("d", 1);
    info.reserved.push(IovaRange::new(0xfee0_0000, 0xfeef_ffff));
    let d = ctx.bind_device(info).unwrap();
    let bx = HostBuffer::new(PAGE as usize).unwrap();
    let by = HostBuffer::new(PAGE as usize).unwrap();
    // SAFETY: both buffers outlive the context's use of them (dropped last).
    unsafe {
        ctx.map_user(x, bx.addr(), PAGE, Some(0x1000), Perm::RW).unwrap();
        ctx.map_user(y, by.addr(), PAGE, Some(0x1000), Perm::RW).unwrap();
    }
    ctx.attach(d, x).unwrap();
    let dev = ctx.get(d).unwrap();
    dev.dma_write(0x1000, b"x").unwrap();
    ctx.replace(d, y).unwrap();
    dev.dma_write(0x1000, b"y").unwrap();
    let (mut gx, mut gy) = ([0u8], [0u8]);
    bx.read_at(0, &mut gx);
    by.read_at(0, &mut gy);
    assert_eq!((gx, gy), (*b"x", *b"y"));
    // The reservation moved with the device.
    assert_eq!(ctx.get(x).unwrap().iova_ranges().0, vec![IovaRange::ALL]);
    assert_eq!(ctx.get(y).unwrap().iova_ranges().0.len(), 2);
    assert!(ctx.get(x).unwrap().domain_count() == 0, "x's auto HWPT went with the device");
}

#[test]
fn attach_over_a_mapped_reserved_region_is_addr_in_use() {
    let ctx = ctx();
    let ioas = ctx.ioas_alloc().unwrap();
    let b = HostBuffer::new(PAGE as usize).unwrap();
    // SAFETY: `b` outlives the context.
    unsafe { ctx.map_user(ioas, b.addr(), PAGE, Some(0xfee0_0000), Perm::RW).unwrap() };
    let mut info = DeviceInfo::new("d", 1);
    info.reserved.push(IovaRange::new(0xfee0_0000, 0xfeef_ffff));
    let d = ctx.bind_device(info).unwrap();
    assert!(matches!(ctx.attach(d, ioas), Err(Error::AddrInUse(_))));
    assert_eq!(ctx.objects().len(), 2, "the automatic HWPT was not left behind");
}

#[test]
fn dropping_the_context_unpins_everything() {
    let b = HostBuffer::new(16 * PAGE as usize).unwrap();
    let ctx = ctx();
    let ioas = ctx.ioas_alloc().unwrap();
    let d = ctx.bind_device(DeviceInfo::new("d", 1)).unwrap();
    let hwpt = ctx.hwpt_alloc(d, ioas, HwptFlags::default(), None).unwrap();
    ctx.attach(d, hwpt).unwrap();
    // SAFETY: `b` outlives the context.
    unsafe { ctx.map_user(ioas, b.addr(), 16 * PAGE, None, Perm::RW).unwrap() };
    let copy_ioas = ctx.ioas_alloc().unwrap();
    ctx.copy(copy_ioas, ioas, ctx.get(ioas).unwrap().areas()[0].iova, 16 * PAGE, None, Perm::R).unwrap();
    assert_eq!(ctx.locked_pages(), 16);
    let probe = ctx.get(ioas).unwrap();
    drop(ctx);
    assert!(probe.areas().is_empty(), "the IOAS was emptied on close");
    assert_eq!(probe.domain_count(), 0);
}

#[test]
fn unmapping_the_last_domain_user_uncharges() {
    let b = HostBuffer::new(4 * PAGE as usize).unwrap();
    let ctx = ctx();
    let ioas = ctx.ioas_alloc().unwrap();
    // SAFETY: `b` outlives the context.
    let iova = unsafe { ctx.map_user(ioas, b.addr(), 4 * PAGE, None, Perm::RW).unwrap() };
    assert_eq!(ctx.locked_pages(), 0, "nothing pinned without a domain");
    let d = ctx.bind_device(DeviceInfo::new("d", 1)).unwrap();
    ctx.attach(d, ioas).unwrap();
    assert_eq!(ctx.locked_pages(), 4, "attaching a domain pins");
    ctx.detach(d).unwrap();
    assert_eq!(ctx.locked_pages(), 0, "the last domain leaving unpins");
    ctx.attach(d, ioas).unwrap();
    ctx.unmap(ioas, iova, 4 * PAGE).unwrap();
    assert_eq!(ctx.locked_pages(), 0);
}

#[test]
fn cut_splits_areas_where_linux_allows_it() {
    let b = HostBuffer::new(8 * PAGE as usize).unwrap();
    let ctx = ctx();
    let ioas = ctx.ioas_alloc().unwrap();
    let d = ctx.bind_device(DeviceInfo::new("d", 1)).unwrap();
    ctx.attach(d, ioas).unwrap();
    // SAFETY: `b` outlives the context.
    unsafe { ctx.map_user(ioas, b.addr(), 8 * PAGE, Some(0x10_0000), Perm::RW).unwrap() };
    let io = ctx.get(ioas).unwrap();
    assert!(matches!(io.cut(&[0x10_0000 + 2 * PAGE - 1]), Err(Error::Invalid(_))), "huge pages are on");
    // Huge pages can only be turned off before anything is mapped into a domain.
    ctx.unmap(ioas, 0, u64::MAX).unwrap();
    io.set_huge_pages(false).unwrap();
    // SAFETY: as above.
    unsafe { ctx.map_user(ioas, b.addr(), 8 * PAGE, Some(0x10_0000), Perm::RW).unwrap() };
    let pinned = ctx.locked_pages();
    assert!(matches!(io.cut(&[0x10_0000 + 100]), Err(Error::Invalid(_))), "unaligned cut");
    io.cut(&[0x10_0000 + 2 * PAGE - 1, 0x10_0000, 0x9999_0000]).unwrap();
    assert_eq!(io.areas().len(), 2);
    assert_eq!(ctx.locked_pages(), pinned, "cutting charges nothing");
    assert_eq!(ctx.unmap(ioas, 0x10_0000, 2 * PAGE), Ok(2 * PAGE));
    let dev = ctx.get(d).unwrap();
    assert!(dev.dma_write(0x10_0000, b"x").is_err());
    dev.dma_write(0x10_0000 + 2 * PAGE, b"y").unwrap();
}

#[test]
fn dma_into_memory_its_owner_unmapped_is_an_error_not_a_crash() {
    let ctx = ctx();
    let ioas = ctx.ioas_alloc().unwrap();
    let d = ctx.bind_device(DeviceInfo::new("d", 1)).unwrap();
    ctx.attach(d, ioas).unwrap();
    let b = HostBuffer::new(2 * PAGE as usize).unwrap();
    let iova = ctx.map_user_checked(ioas, b.addr(), 2 * PAGE, None, Perm::RW).unwrap();
    let dev = ctx.get(d).unwrap();
    dev.dma_write(iova, b"before").unwrap();
    // The owner revokes the memory. (PROT_NONE rather than munmap so no
    // concurrent test can be handed the same addresses meanwhile.)
    // SAFETY: changes the protection of our own buffer, which no Rust
    // reference points into.
    unsafe { rustix::mm::mprotect(b.addr() as *mut _, b.len(), rustix::mm::MprotectFlags::empty()) }.unwrap();
    assert_eq!(dev.dma_write(iova, b"after"), Err(ioasid_engine::DmaError::Memory { iova }));
    let mut r = [0u8; 4];
    assert_eq!(dev.dma_read(iova + PAGE, &mut r), Err(ioasid_engine::DmaError::Memory { iova: iova + PAGE }));
    assert_eq!(ctx.unmap(ioas, iova, 2 * PAGE), Ok(2 * PAGE));
}

#[test]
fn the_last_iova_maps_and_unmaps_like_any_other() {
    // With no domain the IOVA alignment is one byte, so a mapping may start
    // at the very last IOVA (one byte long) or end there.
    let ctx = ctx();
    let ioas = ctx.ioas_alloc().unwrap();
    let mem = HostBuffer::new(2 * PAGE as usize).unwrap();
    let below = u64::MAX - 2 * PAGE + 1;
    // SAFETY: `mem` outlives the context's use of it (everything is unmapped below).
    unsafe {
        ctx.map_user(ioas, mem.addr(), PAGE, Some(below), Perm::RW).unwrap();
        ctx.map_user(ioas, mem.addr() + PAGE, 1, Some(u64::MAX), Perm::RW).unwrap();
        assert!(matches!(ctx.map_user(ioas, mem.addr(), 1, Some(u64::MAX), Perm::RW), Err(Error::Exists(_))));
        assert!(matches!(ctx.map_user(ioas, mem.addr(), 2, Some(u64::MAX - 1), Perm::RW), Err(Error::Exists(_))));
    }
    let listed = |ctx: &ioasid_engine::Context| -> Vec<(u64, u64)> {
        ctx.get(ioas).unwrap().areas().iter().map(|a| (a.iova, a.len)).collect()
    };
    assert_eq!(listed(&ctx), [(below, PAGE), (u64::MAX, 1)]);
    // A range ending before the last byte leaves it mapped.
    assert!(matches!(ctx.unmap(ioas, u64::MAX - PAGE + 1, PAGE - 1), Err(Error::NotFound(_))));
    assert_eq!(ctx.unmap(ioas, u64::MAX, 1).unwrap(), 1);
    assert_eq!(listed(&ctx), [(below, PAGE)]);
    // SAFETY: as above.
    unsafe { ctx.map_user(ioas, mem.addr() + PAGE, PAGE, Some(u64::MAX - PAGE + 1), Perm::RW).unwrap() };
    assert_eq!(listed(&ctx), [(below, PAGE), (u64::MAX - PAGE + 1, PAGE)]);
    assert_eq!(ctx.unmap(ioas, 0, u64::MAX).unwrap(), 2 * PAGE);
    assert!(listed(&ctx).is_empty());
}
