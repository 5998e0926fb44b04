//! The peer that does an iommufd map's whole work, built plainly from common
//! parts: the areas in a locked `BTreeMap` (overlap checked, one entry per
//! map), the pages charged to a counter against a limit, and a 4-level x86
//! page table written through the `x86_64` crate's `OffsetPageTable`, under
//! a `RwLock` that a DMA would hold for reading, so unmap's write lock waits
//! for DMA in flight. Where vm-memory's `Iotlb` records a range and nothing
//! else, this is what an IOAS owes its map and unmap.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};

use x86_64::structures::paging::mapper::{MapToError, Mapper, OffsetPageTable};
use x86_64::structures::paging::page::PageSize;
use x86_64::structures::paging::{
    FrameAllocator, FrameDeallocator, Page, PageTable, PageTableFlags, PhysFrame, Size1GiB, Size2MiB, Size4KiB,
};
use x86_64::{PhysAddr, VirtAddr};

/// Tables for the page table: one 4 KiB-aligned page each, kept for reuse
/// once freed, as the engine's page table keeps its spares.
#[derive(Default)]
struct Frames {
    free: Vec<u64>,
}

// SAFETY: every frame handed out is a fresh, 4 KiB-aligned page of this
// process that nothing else uses (or one given back by the page table).
unsafe impl FrameAllocator<Size4KiB> for Frames {
    fn allocate_frame(&mut self) -> Option<PhysFrame<Size4KiB>> {
        let addr = self.free.pop().unwrap_or_else(|| {
            // Leaked on purpose: the peer lives as long as the benchmark.
            Box::leak(Box::new(PageTable::new())) as *mut PageTable as u64
        });
        Some(PhysFrame::containing_address(PhysAddr::new(addr)))
    }
}

impl FrameDeallocator<Size4KiB> for Frames {
    unsafe fn deallocate_frame(&mut self, frame: PhysFrame<Size4KiB>) {
        self.free.push(frame.start_address().as_u64());
    }
}

struct Table {
    root: Box<PageTable>,
    frames: Frames,
}

impl Table {
    /// The table as the crate walks it, and the frames for new tables.
    fn mapper(&mut self) -> (OffsetPageTable<'_>, &mut Frames) {
        // SAFETY: "physical" addresses here are this process's addresses
        // (offset 0): every table is a `PageTable` the frames made.
        (unsafe { OffsetPageTable::new(&mut self.root, VirtAddr::new(0)) }, &mut self.frames)
    }
}

/// An area: its last IOVA and the page size it is mapped with.
struct Area {
    last: u64,
    page: u64,
}

/// See the module docs.
pub struct PlainIoas {
    areas: Mutex<BTreeMap<u64, Area>>,
    charged: AtomicU64,
    limit: u64,
    table: RwLock<Table>,
}

impl Default for Table {
    fn default() -> Table {
        Table { root: Box::new(PageTable::new()), frames: Frames::default() }
    }
}

impl Default for PlainIoas {
    fn default() -> PlainIoas {
        PlainIoas::new()
    }
}

impl PlainIoas {
    pub fn new() -> PlainIoas {
        PlainIoas { areas: Mutex::default(), charged: AtomicU64::new(0), limit: u64::MAX, table: RwLock::default() }
    }

    /// Maps `len` bytes at `host` to `iova` with leaves of `page` bytes
    /// (4 KiB, 2 MiB or 1 GiB; everything aligned to it).
    pub fn map(&self, iova: u64, host: u64, len: u64, page: u64) {
        let last = iova + (len - 1);
        let mut areas = self.areas.lock().unwrap();
        if areas.range(..=last).next_back().is_some_and(|(_, a)| a.last >= iova) {
            panic!("IOVA already mapped");
        }
        let pages = len / 4096;
        self.charged
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |c| c.checked_add(pages).filter(|&n| n <= self.limit))
            .expect("within the limit");
        let mut table = self.table.write().unwrap();
        let t = &mut *table;
        let flags = PageTableFlags::PRESENT | PageTableFlags::WRITABLE;
        match page {
            4096 => map_pages::<Size4KiB>(t, iova, host, len, flags),
            0x20_0000 => map_pages::<Size2MiB>(t, iova, host, len, flags),
            _ => map_pages::<Size1GiB>(t, iova, host, len, flags),
        }
        drop(table);
        areas.insert(iova, Area { last, page });
    }

    /// Maps `len` bytes at `host` (4 KiB leaves) at the lowest IOVA from
    /// 4 KiB up that fits, found as Linux's `iopt_alloc_iova` finds it: the
    /// holes between the areas, from the bottom. Returns the IOVA.
    pub fn map_anywhere(&self, host: u64, len: u64) -> u64 {
        let mut at = 4096;
        for (&start, a) in self.areas.lock().unwrap().iter() {
            if start - at >= len {
                break;
            }
            at = at.max(a.last + 1);
        }
        self.map(at, host, len, 4096);
        at
    }

    /// Unmaps the areas inside `[iova, iova + len)`.
    pub fn unmap(&self, iova: u64, len: u64) {
        let last = iova + (len - 1);
        let mut areas = self.areas.lock().unwrap();
        // Taken for writing: no DMA is in flight once it is held.
        let mut table = self.table.write().unwrap();
        while let Some((&s, _)) = areas.range(iova..=last).next() {
            let a = areas.remove(&s).expect("just found");
            let n = a.last - s + 1;
            match a.page {
                4096 => unmap_pages::<Size4KiB>(&mut table, s, n),
                0x20_0000 => unmap_pages::<Size2MiB>(&mut table, s, n),
                _ => unmap_pages::<Size1GiB>(&mut table, s, n),
            }
            self.charged.fetch_sub(n / 4096, Ordering::AcqRel);
        }
    }
}

fn map_pages<S: PageSize>(t: &mut Table, iova: u64, host: u64, len: u64, flags: PageTableFlags)
where
    for<'a> OffsetPageTable<'a>: Mapper<S>,
{
    let (mut mapper, frames) = t.mapper();
    for off in (0..len).step_by(S::SIZE as usize) {
        let page = Page::<S>::from_start_address(VirtAddr::new(iova + off)).expect("aligned IOVA");
        let frame = PhysFrame::<S>::from_start_address(PhysAddr::new(host + off)).expect("aligned memory");
        // SAFETY: the page table is never loaded into the MMU: it is data.
        match unsafe { mapper.map_to(page, frame, flags, frames) } {
            // Never loaded, so there is no TLB to flush.
            Ok(flush) => flush.ignore(),
            Err(MapToError::PageAlreadyMapped(_)) => panic!("IOVA already mapped in the table"),
            Err(_) => panic!("cannot map"),
        }
    }
}

fn unmap_pages<S: PageSize>(t: &mut Table, iova: u64, len: u64)
where
    for<'a> OffsetPageTable<'a>: Mapper<S>,
{
    let (mut mapper, _) = t.mapper();
    for off in (0..len).step_by(S::SIZE as usize) {
        let page = Page::<S>::from_start_address(VirtAddr::new(iova + off)).expect("aligned IOVA");
        mapper.unmap(page).expect("mapped").1.ignore();
    }
}
