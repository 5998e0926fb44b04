//! The DMA hot paths allocate nothing: an IOTLB hit, a page walk on a
//! miss, a nested two-dimensional walk, and device reads and writes into
//! both trusted and checked (ABI-mapped) memory. A counting allocator
//! sees every allocation this thread makes while they run.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::Arc;

use ioasid_engine::pgtable::x86::first_stage::encode;
use ioasid_engine::{
    Context, ContextConfig, DeviceInfo, HostAddr, HostBuffer, HwptFlags, Limit, NestedData, Perm, Translated, Trust,
};

struct Counting;

thread_local! {
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

// SAFETY: forwards to the system allocator; the counter is thread-local
// and const-initialised, so counting itself never allocates.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.with(|n| n.set(n.get() + 1));
        // SAFETY: the caller's contract, passed on.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.with(|n| n.set(n.get() + 1));
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Allocations `f` makes on this thread, after one warm-up call (which may
/// set up thread-local epoch state once).
fn allocations(mut f: impl FnMut()) -> u64 {
    f();
    let before = ALLOCATIONS.with(Cell::get);
    for _ in 0..100 {
        f();
    }
    ALLOCATIONS.with(Cell::get) - before
}

const PAGE: u64 = 4096;
const PAGES: u64 = 2048;

#[test]
fn translate_and_dma_do_not_allocate() {
    let ctx = Arc::new(Context::with_config(ContextConfig::isolated(Limit::Pages(1 << 20))));
    let ioas = ctx.ioas_alloc().unwrap();
    ctx.get(ioas).unwrap().set_huge_pages(false).unwrap();
    let dev = ctx.bind_device(DeviceInfo::new("dma", 1)).unwrap();
    let hwpt = ctx.attach(dev, ioas).unwrap();
    let trusted = HostBuffer::new((PAGES * PAGE) as usize).unwrap();
    let checked = HostBuffer::new((PAGES * PAGE) as usize).unwrap();
    // SAFETY: `trusted` outlives the context's use of it in this test.
    unsafe { ctx.map_user(ioas, trusted.addr(), PAGES * PAGE, Some(0), Perm::RW).unwrap() };
    ctx.map_user_checked(ioas, checked.addr(), PAGES * PAGE, Some(1 << 30), Perm::RW).unwrap();
    let domain = ctx.get(hwpt.paging()).unwrap().domain().clone();
    let device = ctx.get(dev).unwrap();
    let guard = ioasid_engine::epoch::pin();
    let mut buf = [0u8; 256];
    assert_eq!(allocations(|| drop(std::hint::black_box(Box::new(1)))), 100, "the counter sees allocations");

    assert_eq!(allocations(|| _ = domain.translate(64, Perm::R, &guard).unwrap()), 0, "IOTLB hit");
    // More pages than the IOTLB holds, so most translations walk.
    let mut page = 0;
    let walk = || {
        page = (page + 97) % PAGES;
        domain.translate(page * PAGE, Perm::RW, &guard).unwrap();
    };
    assert_eq!(allocations(walk), 0, "page walk on a miss");
    assert_eq!(allocations(|| device.dma_read(3 * PAGE - 100, &mut buf).unwrap()), 0, "DMA read");
    assert_eq!(allocations(|| device.dma_write(5 * PAGE - 100, &buf).unwrap()), 0, "DMA write");
    let base = 1 << 30;
    assert_eq!(allocations(|| device.dma_read(base + PAGE - 100, &mut buf).unwrap()), 0, "checked read");
    assert_eq!(allocations(|| device.dma_write(base + PAGE - 100, &buf).unwrap()), 0, "checked write");
}

#[test]
fn nested_translation_does_not_allocate() {
    let ctx = Arc::new(Context::with_config(ContextConfig::isolated(Limit::Pages(1 << 20))));
    let ioas = ctx.ioas_alloc().unwrap();
    let dev = ctx.bind_device(DeviceInfo::new("vf", 1)).unwrap();
    let ram = HostBuffer::new((64 * PAGE) as usize).unwrap();
    // SAFETY: `ram` outlives the context's use of it in this test.
    unsafe { ctx.map_user(ioas, ram.addr(), 64 * PAGE, Some(0), Perm::RW).unwrap() };
    let parent = ctx.hwpt_alloc(dev, ioas, HwptFlags { nest_parent: true, dirty_tracking: false }, None).unwrap();
    let nested = ctx.hwpt_alloc_nested(dev, parent, NestedData::vtd_s1(0x1000, 4), None).unwrap();
    // Guest stage 1: IOVA 0x40_0000 + p pages -> guest-physical 0x10000 + p pages.
    let put = |table: u64, index: u64, pte: u64| ram.write_at((table + index * 8) as usize, &pte.to_le_bytes());
    put(0x1000, 0, encode(0x2000, 3, false, true));
    put(0x2000, 0, encode(0x3000, 2, false, true));
    put(0x3000, 2, encode(0x4000, 1, false, true));
    for p in 0..16 {
        put(0x4000, p, encode(0x10000 + p * PAGE, 0, true, true));
    }
    let Ok(hwpt) = ctx.get(nested) else { panic!("not nested") };
    let guard = ioasid_engine::epoch::pin();
    let landed = Translated { host: HostAddr(ram.addr() + 0x10010), trust: Trust::Direct };
    assert_eq!(hwpt.translate(0x40_0010, Perm::R, None, &guard), Ok(landed));
    assert_eq!(allocations(|| _ = hwpt.translate(0x40_0010, Perm::R, None, &guard).unwrap()), 0, "combined hit");
    let walk = || {
        hwpt.invalidate();
        hwpt.translate(0x40_3000, Perm::W, None, &guard).unwrap();
    };
    assert_eq!(allocations(walk), 0, "two-dimensional walk");
}

/// A VMM maps the pages a guest hands a device one at a time: each map
/// allocates its `Pages` and, now and then, room in the IOAS's map of
/// areas. Nothing else: no list of pins, no staging of areas, no global
/// index of pages.
#[test]
fn mapping_one_page_allocates_only_its_pages() {
    const N: u64 = 512;
    const IOVA: u64 = 1 << 32;
    let ctx = Context::with_config(ContextConfig::isolated(Limit::Pages(1 << 20)));
    let ioas = ctx.ioas_alloc().unwrap();
    ctx.get(ioas).unwrap().set_huge_pages(false).unwrap();
    let dev = ctx.bind_device(DeviceInfo::new("dma", 1)).unwrap();
    ctx.attach(dev, ioas).unwrap();
    let mem = HostBuffer::new((N * PAGE) as usize).unwrap();
    let map_each = || {
        for p in 0..N {
            // SAFETY: `mem` outlives the context's use of it in this test.
            unsafe { ctx.map_user(ioas, mem.addr() + p * PAGE, PAGE, Some(IOVA + p * PAGE), Perm::RW).unwrap() };
        }
    };
    // Once to grow the page table and the thread's state.
    map_each();
    ctx.unmap(ioas, IOVA, N * PAGE).unwrap();
    let before = ALLOCATIONS.with(Cell::get);
    map_each();
    let made = ALLOCATIONS.with(Cell::get) - before;
    ctx.unmap(ioas, IOVA, N * PAGE).unwrap();
    assert!(made <= N + N / 4, "{made} allocations for {N} one-page maps");
}

/// A handler's batch, read lent where the groups wait and answered under
/// one lock, allocates nothing once the queue has grown to it: the groups
/// are not copied out.
#[test]
fn reading_and_answering_fault_groups_does_not_allocate() {
    use ioasid_engine::FaultQueue;
    use ioasid_engine::fault::{Group, LAST_PAGE, PageRequest, Response};
    let q = FaultQueue::new();
    let request = PageRequest { flags: LAST_PAGE, dev_id: 1, pasid: 0, grpid: 0, perm: 2, addr: 0 };
    let mut cookies = Vec::with_capacity(64);
    let mut taken = 0;
    for round in 0..10 {
        // The devices' side allocates their groups; not counted.
        let waiters: Vec<_> = (0..64)
            .map(|_| {
                let (g, w) = Group::awaited(vec![request.clone()]);
                q.report(g);
                w
            })
            .collect();
        let before = ALLOCATIONS.with(Cell::get);
        cookies.clear();
        cookies.extend(q.lend(usize::MAX).unwrap().iter().map(|(c, _)| c));
        let mut responses = q.responses();
        for &c in &cookies {
            responses.respond(c, Response::Success).unwrap();
        }
        drop(responses);
        let n = ALLOCATIONS.with(Cell::get) - before;
        if round > 0 {
            taken += n;
        }
        assert!(waiters.iter().all(|w| w.answered() == Some(Response::Success)));
    }
    assert_eq!(taken, 0, "allocations reading and answering 9 batches of 64 groups");
}

/// A device reporting a batch of groups and waiting for their answers
/// allocates nothing once warm (two batches): the groups reuse the request
/// lists that answered ones left, and one waiter serves the whole batch.
#[test]
fn a_warm_device_reports_a_batch_and_waits_without_allocating() {
    use ioasid_engine::FaultQueue;
    use ioasid_engine::fault::{Batch, LAST_PAGE, PageRequest, Response};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;
    let q = FaultQueue::new();
    let stop = Arc::new(AtomicBool::new(false));
    let handler = {
        let (q, stop) = (q.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut cookies = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                if q.wait_for_requests(Duration::from_millis(1)) {
                    cookies.clear();
                    cookies.extend(q.lend(usize::MAX).unwrap().iter().map(|(c, _)| c));
                    let mut responses = q.responses();
                    for &c in &cookies {
                        responses.answer(c, Response::Success).unwrap();
                    }
                }
            }
        })
    };
    let request = PageRequest { flags: LAST_PAGE, dev_id: 1, pasid: 0, grpid: 0, perm: 2, addr: 0 };
    let mut batch = Batch::new();
    let mut round = || {
        let mut reports = q.report_batch(&mut batch);
        for _ in 0..64 {
            reports.report(std::slice::from_ref(&request));
        }
        drop(reports);
        assert_eq!(batch.wait().success, 64);
    };
    // The first batch's lists reach the devices' side when the handler
    // reads the second; `allocations` warms up once more.
    round();
    let made = allocations(round);
    stop.store(true, Ordering::Relaxed);
    handler.join().unwrap();
    assert_eq!(made, 0, "allocations reporting and awaiting 100 batches of 64 groups");
}
