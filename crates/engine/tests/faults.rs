//! I/O page faults end to end: a PRI-capable device's DMA misses, its page
//! request reaches the owner of the HWPT's fault queue, and the DMA goes on
//! (or fails) with the owner's answer.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::Duration;

use ioasid_engine::fault::Response;
use ioasid_engine::{
    Context, ContextConfig, DeviceInfo, DmaError, FaultQueue, FaultReason, HostBuffer, HwptFlags, Limit, Perm, Stage,
};
use ioasid_engine::{DeviceId, HwptPagingId, IoasId};

const PAGE: u64 = 4096;
const IOVA: u64 = 1 << 30;

struct Setup {
    ctx: Arc<Context>,
    ioas: IoasId,
    dev: DeviceId,
    hwpt: HwptPagingId,
    queue: Arc<FaultQueue>,
    ram: Arc<HostBuffer>,
}

/// A PRI device attached to a HWPT whose faults go to a queue; `pages`
/// pages of RAM exist but nothing is mapped.
fn setup(pages: usize) -> Setup {
    let ctx = Arc::new(Context::with_config(ContextConfig::isolated(Limit::Pages(1 << 20))));
    let ioas = ctx.ioas_alloc().unwrap();
    let mut info = DeviceInfo::new("pri", 1);
    info.pri = true;
    let dev = ctx.bind_device(info).unwrap();
    let (fault_id, queue) = ctx.fault_alloc().unwrap();
    let hwpt = ctx.hwpt_alloc(dev, ioas, HwptFlags::default(), Some(fault_id)).unwrap();
    ctx.attach(dev, hwpt).unwrap();
    let ram = Arc::new(HostBuffer::new(pages * PAGE as usize).unwrap());
    Setup { ctx, ioas, dev, hwpt, queue, ram }
}

/// A handler: maps each requested page (RAM page = IOVA page) and answers.
fn serve(s: &Setup, stop: Arc<AtomicBool>, answer: Response) -> thread::JoinHandle<usize> {
    let (ctx, ioas, queue, ram) = (s.ctx.clone(), s.ioas, s.queue.clone(), s.ram.clone());
    thread::spawn(move || {
        let mut served = 0;
        while !stop.load(Ordering::Relaxed) {
            let Some((cookie, group)) = queue.next(Duration::from_millis(20)) else { continue };
            for r in &group.requests {
                let page = r.addr - IOVA;
                if answer == Response::Success {
                    // SAFETY: `ram` outlives the context (the test holds it).
                    let _ = unsafe { ctx.map_user(ioas, ram.addr() + page, PAGE, Some(r.addr), Perm::RW) };
                }
            }
            queue.respond(cookie, answer).unwrap();
            served += 1;
        }
        served
    })
}

#[test]
fn a_faulting_dma_completes_once_the_owner_maps_the_page() {
    let s = setup(4);
    let stop = Arc::new(AtomicBool::new(false));
    let handler = serve(&s, stop.clone(), Response::Success);
    let dev = s.ctx.get(s.dev).unwrap();
    dev.dma_write(IOVA + 2 * PAGE + 10, b"faulted in").unwrap();
    let mut back = [0u8; 10];
    s.ram.read_at(2 * PAGE as usize + 10, &mut back);
    assert_eq!(&back, b"faulted in");
    // The page is mapped now: no second request.
    dev.dma_read(IOVA + 2 * PAGE + 10, &mut back).unwrap();
    stop.store(true, Ordering::Relaxed);
    assert_eq!(handler.join().unwrap(), 1);
}

#[test]
fn a_refused_request_fails_the_dma() {
    let s = setup(1);
    let stop = Arc::new(AtomicBool::new(false));
    let handler = serve(&s, stop.clone(), Response::Invalid);
    let dev = s.ctx.get(s.dev).unwrap();
    let r = dev.dma_write(IOVA, b"x");
    assert_eq!(
        r,
        Err(DmaError::Fault {
            iova: IOVA,
            reason: FaultReason::NotPresent,
            write: true,
            pasid: None,
            stage: Stage::Single
        })
    );
    stop.store(true, Ordering::Relaxed);
    handler.join().unwrap();
}

#[test]
fn detaching_releases_a_waiting_dma() {
    let s = setup(1);
    let dev = s.ctx.get(s.dev).unwrap();
    let waiting = thread::spawn(move || dev.dma_write(IOVA, b"x"));
    // Wait until the request is queued, then take the table away unanswered.
    while s.queue.counts().0 == 0 {
        thread::sleep(Duration::from_millis(1));
    }
    s.ctx.detach(s.dev).unwrap();
    assert!(waiting.join().unwrap().is_err());
    assert_eq!(s.queue.lost(), (1, 0), "the request was answered for its owner, and counted");
}

#[test]
fn a_device_without_pri_just_faults() {
    let s = setup(1);
    let plain = s.ctx.bind_device(DeviceInfo::new("plain", 2)).unwrap();
    s.ctx.attach(plain, s.hwpt).unwrap();
    let r = s.ctx.get(plain).unwrap().dma_write(IOVA, b"x");
    assert!(matches!(r, Err(DmaError::Fault { .. })));
    assert_eq!(s.queue.counts(), (0, 0));
}

#[test]
fn concurrent_faults_are_all_served() {
    const THREADS: u64 = 4;
    const PAGES_EACH: u64 = 64;
    let s = setup((THREADS * PAGES_EACH) as usize);
    let stop = Arc::new(AtomicBool::new(false));
    let handler = serve(&s, stop.clone(), Response::Success);
    let workers: Vec<_> = (0..THREADS)
        .map(|t| {
            let dev = s.ctx.get(s.dev).unwrap();
            thread::spawn(move || {
                for p in 0..PAGES_EACH {
                    let page = t * PAGES_EACH + p;
                    dev.dma_write(IOVA + page * PAGE, &page.to_le_bytes()).unwrap();
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    let served = handler.join().unwrap();
    for page in 0..THREADS * PAGES_EACH {
        let mut v = [0u8; 8];
        s.ram.read_at((page * PAGE) as usize, &mut v);
        assert_eq!(u64::from_le_bytes(v), page, "page {page}");
    }
    assert_eq!(served as u64, THREADS * PAGES_EACH, "one request per page, none lost");
    assert_eq!(s.queue.lost(), (0, 0));
}

#[test]
fn a_non_waiting_dma_hands_back_the_page_request() {
    let s = setup(1);
    let dev = s.ctx.get(s.dev).unwrap();
    let pending = match dev.try_dma_write(IOVA + 8, b"later") {
        Err(ioasid_engine::Stall::PageRequest(p)) => p,
        other => panic!("expected a page request, got {other:?}"),
    };
    assert_eq!(pending.answered(), None);
    let (cookie, group) = s.queue.next(Duration::from_secs(1)).unwrap();
    assert_eq!(group.requests[0].addr, IOVA);
    // SAFETY: `ram` outlives the context.
    unsafe { s.ctx.map_user(s.ioas, s.ram.addr(), PAGE, Some(IOVA), Perm::RW).unwrap() };
    s.queue.respond(cookie, Response::Success).unwrap();
    assert_eq!(pending.wait(), Response::Success);
    dev.try_dma_write(IOVA + 8, b"later").unwrap();
}

#[test]
fn unrecoverable_faults_are_counted() {
    let s = setup(1);
    let plain = s.ctx.bind_device(DeviceInfo::new("plain", 2)).unwrap();
    s.ctx.attach(plain, s.hwpt).unwrap();
    let dev = s.ctx.get(plain).unwrap();
    assert!(dev.dma_write(IOVA, b"x").is_err());
    assert!(dev.dma_read(IOVA, &mut [0u8; 4]).is_err());
    assert_eq!(dev.unrecoverable_faults(), 2);
    s.ctx.detach(plain).unwrap();
    assert_eq!(dev.dma_write(IOVA, b"x"), Err(DmaError::Blocked));
    assert_eq!(dev.unrecoverable_faults(), 2, "a blocked DMA is not an IOMMU fault");
}

#[test]
fn many_devices_share_one_queue_and_records_name_each() {
    let s = setup(8);
    let stop = Arc::new(AtomicBool::new(false));
    let handler = serve(&s, stop.clone(), Response::Success);
    let mut devs = vec![s.dev];
    for rid in 2..5 {
        let mut info = DeviceInfo::new("pri", rid);
        info.pri = true;
        let d = s.ctx.bind_device(info).unwrap();
        s.ctx.attach(d, s.hwpt).unwrap();
        devs.push(d);
    }
    let threads: Vec<_> = devs
        .iter()
        .enumerate()
        .map(|(k, &d)| {
            let dev = s.ctx.get(d).unwrap();
            thread::spawn(move || dev.dma_write(IOVA + 2 * k as u64 * PAGE, &[k as u8; 16]))
        })
        .collect();
    for t in threads {
        t.join().unwrap().unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    assert_eq!(handler.join().unwrap(), devs.len());
    for k in 0..devs.len() {
        let mut v = [0u8; 16];
        s.ram.read_at(2 * k * PAGE as usize, &mut v);
        assert_eq!(v, [k as u8; 16]);
    }
}

#[test]
fn a_dma_over_several_missing_pages_asks_for_them_in_one_group() {
    let s = setup(4);
    // SAFETY: `ram` outlives the context.
    unsafe { s.ctx.map_user(s.ioas, s.ram.addr() + PAGE, PAGE, Some(IOVA + PAGE), Perm::RW).unwrap() };
    let dev = s.ctx.get(s.dev).unwrap();
    let data = vec![7u8; 3 * PAGE as usize + 16];
    let pending = match dev.try_dma_write(IOVA + 8, &data) {
        Err(ioasid_engine::Stall::PageRequest(p)) => p,
        other => panic!("expected a page request, got {other:?}"),
    };
    let (cookie, group) = s.queue.next(Duration::from_secs(1)).unwrap();
    let pages: Vec<(u64, bool)> =
        group.requests.iter().map(|r| (r.addr, r.flags & ioasid_engine::fault::LAST_PAGE != 0)).collect();
    assert_eq!(
        pages,
        [(IOVA, false), (IOVA + 2 * PAGE, false), (IOVA + 3 * PAGE, true)],
        "the missing pages the DMA will touch, the mapped one left out, the last one marked"
    );
    assert!(group.requests.iter().all(|r| r.grpid == group.requests[0].grpid), "one group index");
    for r in &group.requests {
        // SAFETY: `ram` outlives the context.
        unsafe { s.ctx.map_user(s.ioas, s.ram.addr() + (r.addr - IOVA), PAGE, Some(r.addr), Perm::RW).unwrap() };
    }
    s.queue.respond(cookie, Response::Success).unwrap();
    assert_eq!(pending.wait(), Response::Success);
    dev.try_dma_write(IOVA + 8, &data).unwrap();
    assert!(s.queue.next(Duration::from_millis(20)).is_none(), "one answer was enough");
}

/// A DMA tagged with a PASID may ask for execute or privileged access, as
/// far as the device's PASID capability allows; its page request carries
/// `IOMMU_PGFAULT_PERM_EXEC` and `_PRIV` beside read or write.
#[test]
fn page_requests_carry_exec_and_privileged() {
    use ioasid_engine::fault::{DmaAttrs, PASID_VALID, PERM_EXEC, PERM_PRIV, PERM_READ};
    let ctx = Arc::new(Context::with_config(ContextConfig::isolated(Limit::Pages(1 << 20))));
    let ioas = ctx.ioas_alloc().unwrap();
    let info =
        DeviceInfo { pri: true, max_pasid_log2: 8, pasid_exec: true, pasid_priv: true, ..DeviceInfo::new("pri", 1) };
    let dev_id = ctx.bind_device(info).unwrap();
    let (fault_id, queue) = ctx.fault_alloc().unwrap();
    let hwpt = ctx.hwpt_alloc(dev_id, ioas, HwptFlags::default(), Some(fault_id)).unwrap();
    ctx.attach_pasid(dev_id, 7, hwpt).unwrap();
    let dev = ctx.get(dev_id).unwrap();
    let requests = thread::spawn(move || {
        let mut perms = Vec::new();
        while perms.len() < 2 {
            let Some((cookie, group)) = queue.next(Duration::from_millis(20)) else { continue };
            perms.push((group.requests[0].flags & PASID_VALID, group.requests[0].perm));
            queue.respond(cookie, Response::Invalid).unwrap();
        }
        perms
    });
    dev.dma_read_pasid_with(7, IOVA, &mut [0], DmaAttrs { exec: true, privileged: true }).unwrap_err();
    dev.dma_read_pasid_with(7, IOVA, &mut [0], DmaAttrs { exec: false, privileged: true }).unwrap_err();
    let perms = requests.join().unwrap();
    assert_eq!(perms, [(PASID_VALID, PERM_READ | PERM_EXEC | PERM_PRIV), (PASID_VALID, PERM_READ | PERM_PRIV)]);
}

/// A DMA on a page the IOTLB holds takes a short path; these are the cases it
/// must hand to the long one: an access running into the next page, and
/// rights the cached translation lacks.
#[test]
fn cached_pages_keep_their_bounds_and_rights() {
    let ctx = Context::with_config(ContextConfig::isolated(Limit::Pages(1 << 20)));
    let ioas = ctx.ioas_alloc().unwrap();
    let dev = ctx.bind_device(DeviceInfo::new("plain", 1)).unwrap();
    ctx.attach(dev, ioas).unwrap();
    let ram = HostBuffer::new(2 * PAGE as usize).unwrap();
    // SAFETY: `ram` outlives the context's use of it in this test.
    unsafe {
        ctx.map_user(ioas, ram.addr(), PAGE, Some(IOVA), Perm::RW).unwrap();
        ctx.map_user(ioas, ram.addr() + PAGE, PAGE, Some(IOVA + PAGE), Perm::R).unwrap();
    }
    let d = ctx.get(dev).unwrap();
    let mut b = [0u8; 16];
    // Both pages cached.
    d.dma_read(IOVA, &mut b).unwrap();
    d.dma_read(IOVA + PAGE, &mut b).unwrap();
    let denied = |r: Result<(), DmaError>, at: u64, why: FaultReason| match r {
        Err(DmaError::Fault { iova, reason, .. }) => assert_eq!((iova, reason), (at, why)),
        other => panic!("expected a fault at {at:#x}, got {other:?}"),
    };
    denied(d.dma_write(IOVA + PAGE, &[1; 8]), IOVA + PAGE, FaultReason::Permission);
    // Across into the read-only page: the first half lands, the rest faults.
    denied(d.dma_write(IOVA + PAGE - 8, &[7; 16]), IOVA + PAGE, FaultReason::Permission);
    let mut landed = [0u8; 16];
    ram.read_at(PAGE as usize - 8, &mut landed);
    assert_eq!(landed, [7, 7, 7, 7, 7, 7, 7, 7, 0, 0, 0, 0, 0, 0, 0, 0]);
    // Across into nothing.
    denied(d.dma_read(IOVA + 2 * PAGE - 8, &mut b), IOVA + 2 * PAGE, FaultReason::NotPresent);
    d.dma_read(IOVA + PAGE - 8, &mut b).unwrap();
}
