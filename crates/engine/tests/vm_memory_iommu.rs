//! vm-memory's `IommuMemory` driven by an ioasid device: guest memory seen
//! through the device's I/O page table, with faults and unmaps honoured.

#![cfg(feature = "vm-memory")]

use std::sync::Arc;
use std::time::Duration;

use ioasid_engine::fault::Response;
use ioasid_engine::vm_memory_iommu::IommuPort;
use ioasid_engine::{Context, ContextConfig, DeviceInfo, DmaError, FaultReason, HwptFlags, Limit, Perm, Stage};
use ioasid_engine::{DeviceId, IoasId};
use vm_memory::iommu::{Iommu, IommuMemory};
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MemoryRegionAddress, Permissions,
};

const PAGE: u64 = 4096;
const RAM_GPA: u64 = 0x10_0000;
const IOVA: u64 = 0x4000_0000;

struct Guest {
    ctx: Arc<Context>,
    ioas: IoasId,
    dev: DeviceId,
    ram: GuestMemoryMmap,
    memory: IommuMemory<GuestMemoryMmap, IommuPort>,
}

/// Four pages of guest RAM; the device sees IOVA page `i` at RAM page
/// `3 - i` for the first two pages, read-only for the second.
fn guest() -> Guest {
    let ctx = Arc::new(Context::with_config(ContextConfig::isolated(Limit::Pages(1 << 20))));
    let ram = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(RAM_GPA), 4 * PAGE as usize)]).unwrap();
    let host = ram.iter().next().unwrap().get_host_address(MemoryRegionAddress(0)).unwrap() as u64;
    let ioas = ctx.ioas_alloc().unwrap();
    // SAFETY: `ram` is kept in the returned Guest, beside the context.
    unsafe {
        ctx.map_user(ioas, host + 3 * PAGE, PAGE, Some(IOVA), Perm::RW).unwrap();
        ctx.map_user(ioas, host + 2 * PAGE, PAGE, Some(IOVA + PAGE), Perm { read: true, write: false }).unwrap();
    }
    let dev = ctx.bind_device(DeviceInfo::new("virtio-net", 1)).unwrap();
    ctx.attach(dev, ioas).unwrap();
    let port = IommuPort::for_memory(ctx.get(dev).unwrap(), None, &ram);
    let memory = IommuMemory::new(ram.clone(), port, true, ());
    Guest { ctx, ioas, dev, ram, memory }
}

#[test]
fn device_accesses_land_where_the_page_table_says() {
    let g = guest();
    g.memory.write_slice(b"to the last page", GuestAddress(IOVA + 8)).unwrap();
    let mut back = [0u8; 16];
    g.ram.read_slice(&mut back, GuestAddress(RAM_GPA + 3 * PAGE + 8)).unwrap();
    assert_eq!(&back, b"to the last page");

    g.ram.write_slice(b"ro", GuestAddress(RAM_GPA + 2 * PAGE)).unwrap();
    let mut two = [0u8; 2];
    g.memory.read_slice(&mut two, GuestAddress(IOVA + PAGE)).unwrap();
    assert_eq!(&two, b"ro");

    // An access that crosses from the first IOVA page into the second reads
    // two RAM pages that are not adjacent in guest-physical order.
    g.ram.write_slice(b"A", GuestAddress(RAM_GPA + 4 * PAGE - 1)).unwrap();
    let mut cross = [0u8; 3];
    g.memory.read_slice(&mut cross, GuestAddress(IOVA + PAGE - 1)).unwrap();
    assert_eq!(&cross, b"Aro");
}

#[test]
fn writes_to_read_only_and_unmapped_pages_fault() {
    let g = guest();
    assert!(g.memory.write_slice(b"x", GuestAddress(IOVA + PAGE)).is_err(), "the second page is read-only");
    assert!(g.memory.read_slice(&mut [0u8; 1], GuestAddress(IOVA + 2 * PAGE)).is_err(), "nothing mapped there");
    let err = g.memory.iommu().translate(GuestAddress(IOVA + 2 * PAGE), 1, Permissions::Read).unwrap_err();
    assert!(err.to_string().contains("0x40002000"), "the error names the IOVA: {err}");
}

#[test]
fn an_unmap_is_seen_by_the_next_access() {
    let g = guest();
    g.memory.write_slice(b"cached", GuestAddress(IOVA)).unwrap();
    g.ctx.unmap(g.ioas, IOVA, PAGE).unwrap();
    assert!(g.memory.write_slice(b"stale", GuestAddress(IOVA)).is_err(), "the cached translation was dropped");
    let mut back = [0u8; 6];
    g.ram.read_slice(&mut back, GuestAddress(RAM_GPA + 3 * PAGE)).unwrap();
    assert_eq!(&back, b"cached");
}

#[test]
fn a_fault_through_iommu_memory_is_counted_like_any_dma_fault() {
    let g = guest();
    let device = g.ctx.get(g.dev).unwrap();
    assert!(g.memory.read_slice(&mut [0u8; 1], GuestAddress(IOVA + 2 * PAGE)).is_err());
    let fault = |iova, reason, write| DmaError::Fault { iova, reason, write, pasid: None, stage: Stage::Single };
    assert_eq!(g.memory.iommu().take_fault(), Some(fault(IOVA + 2 * PAGE, FaultReason::NotPresent, false)));
    assert!(g.memory.write_slice(b"x", GuestAddress(IOVA + PAGE)).is_err());
    assert_eq!(g.memory.iommu().take_fault(), Some(fault(IOVA + PAGE, FaultReason::Permission, true)));
    assert_eq!(g.memory.iommu().take_fault(), None, "taken");
    assert_eq!(device.unrecoverable_faults(), 2, "both faults counted, as a device's own DMA counts them");
}

#[test]
fn a_miss_through_iommu_memory_on_a_pri_device_asks_for_the_page() {
    let ctx = Arc::new(Context::with_config(ContextConfig::isolated(Limit::Pages(1 << 20))));
    let ram = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(RAM_GPA), 4 * PAGE as usize)]).unwrap();
    let host = ram.iter().next().unwrap().get_host_address(MemoryRegionAddress(0)).unwrap() as u64;
    let ioas = ctx.ioas_alloc().unwrap();
    let mut info = DeviceInfo::new("virtio-pri", 1);
    info.pri = true;
    let dev = ctx.bind_device(info).unwrap();
    let (fault_id, queue) = ctx.fault_alloc().unwrap();
    let hwpt = ctx.hwpt_alloc(dev, ioas, HwptFlags::default(), Some(fault_id)).unwrap();
    ctx.attach(dev, hwpt).unwrap();
    let memory = IommuMemory::new(ram.clone(), IommuPort::for_memory(ctx.get(dev).unwrap(), None, &ram), true, ());
    // The owner maps each requested IOVA page at RAM page 1, then answers.
    let handler = {
        let (ctx, queue) = (ctx.clone(), queue.clone());
        std::thread::spawn(move || {
            let (cookie, group) = queue.next(Duration::from_secs(10)).expect("a page request");
            for r in &group.requests {
                // SAFETY: `ram` outlives the context (the test holds both).
                unsafe { ctx.map_user(ioas, host + PAGE, PAGE, Some(r.addr), Perm::RW).unwrap() };
            }
            queue.respond(cookie, Response::Success).unwrap();
            group.requests.len()
        })
    };
    memory.write_slice(b"faulted in", GuestAddress(IOVA + 16)).unwrap();
    assert_eq!(handler.join().unwrap(), 1);
    let mut back = [0u8; 10];
    ram.read_slice(&mut back, GuestAddress(RAM_GPA + PAGE + 16)).unwrap();
    assert_eq!(&back, b"faulted in");
    assert_eq!(ctx.get(dev).unwrap().unrecoverable_faults(), 0, "resolved, not lost");
}

/// Fills publish a new cache while other threads look up; an unmap that
/// returned before a lookup began is never missed by it, whichever cache
/// (old, new, or one a racing fill built) the lookup is served from.
#[test]
fn fills_racing_lookups_never_serve_a_mapping_after_its_unmap() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    let g = Arc::new(guest());
    let host = g.ram.iter().next().unwrap().get_host_address(MemoryRegionAddress(0)).unwrap() as u64;
    let toggled = IOVA + 2 * PAGE;
    // Odd from just before a map until its unmap returned.
    let state = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let stale = Arc::new(AtomicU64::new(0));
    let looked = Arc::new(AtomicU64::new(0));
    let readers: Vec<_> = (0..2)
        .map(|i| {
            let (g, state, stop, stale, looked) =
                (g.clone(), state.clone(), stop.clone(), stale.clone(), looked.clone());
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::Acquire) {
                    // The always-mapped page keeps fills (and publications)
                    // going on every table change.
                    let iommu = g.memory.iommu();
                    assert!(iommu.translate(GuestAddress(IOVA + (n % 8) * 8), 8, Permissions::Read).is_ok());
                    let before = state.load(Ordering::Acquire);
                    let seen = iommu.translate(GuestAddress(toggled + (n + i) % 64), 1, Permissions::Read);
                    let after = state.load(Ordering::Acquire);
                    match seen {
                        Ok(mut ranges) => {
                            let r = ranges.next().unwrap();
                            assert_eq!(r.base.0 & !(PAGE - 1), RAM_GPA, "served where it is mapped");
                            if before == after && before % 2 == 0 {
                                stale.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        Err(_) => {
                            let _ = g.memory.iommu().take_fault();
                        }
                    }
                    n += 1;
                    looked.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    let mut cycles = 0u64;
    // Until both sides did enough, whenever they get a core: readers that
    // never wait leave an unmap's grace period to the scheduler on a small
    // machine.
    while (cycles < 500 || looked.load(Ordering::Relaxed) < 4000) && std::time::Instant::now() < deadline {
        state.fetch_add(1, Ordering::AcqRel);
        // SAFETY: `ram` lives in `g`, beside the context.
        unsafe { g.ctx.map_user(g.ioas, host, PAGE, Some(toggled), Perm { read: true, write: false }).unwrap() };
        std::thread::yield_now();
        g.ctx.unmap(g.ioas, toggled, PAGE).unwrap();
        state.fetch_add(1, Ordering::AcqRel);
        std::thread::yield_now();
        cycles += 1;
    }
    stop.store(true, Ordering::Release);
    readers.into_iter().for_each(|r| r.join().unwrap());
    let lookups = looked.load(Ordering::Relaxed);
    assert!(cycles > 20 && lookups > 20, "too little interleaving: {cycles} unmaps, {lookups} lookups");
    assert_eq!(stale.load(Ordering::Relaxed), 0, "lookups served a mapping after its unmap returned");
}

/// A device model that translates inside its own epoch section is served:
/// publishing a fill does not wait for sections.
#[test]
fn a_miss_inside_an_epoch_section_is_served() {
    let g = guest();
    let guard = ioasid_engine::epoch::pin();
    g.memory.write_slice(b"pinned", GuestAddress(IOVA)).unwrap();
    drop(guard);
    let mut back = [0u8; 6];
    g.memory.read_slice(&mut back, GuestAddress(IOVA)).unwrap();
    assert_eq!(&back, b"pinned");
}
