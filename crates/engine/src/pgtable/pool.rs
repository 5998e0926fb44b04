//! Where tables live: 4 KiB tables carved from 2 MiB chunks of anonymous
//! memory, with each table's dirty bits in an array at the chunk's start.
//!
//! The system allocator cannot hold a 4 KiB-aligned 4 KiB block in less than
//! two pages (its header sits in front), which made page tables cost twice
//! the memory their entries need. Here a table is one page, and the dirty
//! bits are dense: tables allocated one after another (as a large map makes
//! them) have their dirty bits next to each other, so reading the dirty log
//! of a gigabyte reads a few contiguous pages rather than one page per
//! table. Pages of a chunk that nothing has written cost no memory: the dirty
//! bits of a page table that never tracked dirty state stay untouched, and a
//! read of them sees the kernel's zero page.
//!
//! Chunk layout, in pages: pages 0 to 18 hold the dirty bits (152 bytes per
//! table), pages 19 to 511 the 493 tables. A table's dirty bits are found
//! from its address alone: the chunk is 2 MiB-aligned.

use parking_lot::Mutex;

use super::{DirtyBits, Table};

const PAGE: usize = 4096;
const CHUNK: usize = 2 << 20;
/// Pages of dirty bits at the start of a chunk.
const SIDE_PAGES: usize = 19;
/// Tables per chunk.
const TABLES: usize = CHUNK / PAGE - SIDE_PAGES;

const _: () = {
    assert!(std::mem::size_of::<Table>() == PAGE);
    assert!(TABLES * std::mem::size_of::<DirtyBits>() <= SIDE_PAGES * PAGE);
    assert!(std::mem::align_of::<DirtyBits>() <= 8 && std::mem::size_of::<DirtyBits>() % 8 == 0);
};

/// One chunk: its base address and the indexes of its free tables.
pub struct Chunk {
    base: usize,
    /// Free table indexes, popped from the end: the lowest first, so tables
    /// made one after another sit side by side.
    free: Vec<u16>,
}

/// Chunks and their free tables, sorted by address.
struct Pool {
    chunks: Mutex<Vec<Chunk>>,
}

/// The process's tables.
static POOL: Pool = Pool::new();

/// A new table: every entry empty, its dirty bits clean.
pub(super) fn alloc() -> u64 {
    POOL.alloc()
}

/// Gives a table back, clearing it and its dirty bits for its next use.
///
/// # Safety
/// `addr` came from [`alloc`], is freed once, and nothing reaches the table
/// any more.
pub(super) unsafe fn free(addr: u64) {
    // SAFETY: per the contract.
    unsafe { POOL.free(addr) }
}

impl Pool {
    const fn new() -> Self {
        Pool { chunks: Mutex::new(Vec::new()) }
    }

    fn alloc(&self) -> u64 {
        let mut chunks = self.chunks.lock();
        let chunk = match chunks.iter_mut().position(|c| !c.free.is_empty()) {
            Some(i) => &mut chunks[i],
            None => {
                let base = map_chunk();
                let at = chunks.partition_point(|c| c.base < base);
                chunks.insert(at, Chunk { base, free: (0..TABLES as u16).rev().collect() });
                &mut chunks[at]
            }
        };
        let i = chunk.free.pop().expect("a chunk with a free table") as usize;
        (chunk.base + SIDE_PAGES * PAGE + i * PAGE) as u64
    }

    /// `free` of this pool.
    ///
    /// # Safety
    /// As `free`'s.
    unsafe fn free(&self, addr: u64) {
        let addr = addr as usize;
        // SAFETY: per the contract the table is ours alone; it is one page.
        unsafe { std::ptr::write_bytes(addr as *mut u8, 0, PAGE) };
        dirty_bits(addr).reset();
        let base = addr & !(CHUNK - 1);
        let mut chunks = self.chunks.lock();
        let at = chunks.partition_point(|c| c.base < base);
        let chunk = &mut chunks[at];
        debug_assert_eq!(chunk.base, base, "a table from a chunk of the pool");
        chunk.free.push(((addr - base) / PAGE - SIDE_PAGES) as u16);
        // A chunk with nothing in it goes back to the system, unless it is the
        // only one with room: a map that follows would need it again.
        if chunk.free.len() == TABLES && chunks.iter().filter(|c| !c.free.is_empty()).count() > 1 {
            let gone = chunks.remove(at);
            drop(chunks);
            // SAFETY: a chunk this pool mapped, every table of it free: nothing
            // refers to it any more.
            unsafe { rustix::mm::munmap(gone.base as *mut _, CHUNK) }.expect("munmap of a chunk the pool mapped");
        }
    }
}

/// The dirty bits of the table at `addr`.
#[inline]
pub(super) fn dirty_bits(addr: usize) -> &'static DirtyBits {
    let base = addr & !(CHUNK - 1);
    let i = (addr - base) / PAGE - SIDE_PAGES;
    // SAFETY: `addr` is a table of a chunk (every table is made by `alloc`),
    // whose dirty bits lie at this offset, 8-aligned, zeroed when mapped and
    // kept for as long as the table is (a chunk goes only when all its
    // tables are free, and nothing borrows a free table's bits).
    unsafe { &*((base + i * std::mem::size_of::<DirtyBits>()) as *const DirtyBits) }
}

/// The pool held, for a fork: a child made while another thread is
/// allocating or freeing a table would inherit the pool locked for ever.
/// Take it before `fork` and drop it after, in parent and child.
pub struct Held(#[allow(dead_code)] parking_lot::MutexGuard<'static, Vec<Chunk>>);

/// Holds the pool (see [`Held`]).
pub fn hold() -> Held {
    Held(POOL.chunks.lock())
}

/// Maps a new 2 MiB-aligned chunk: twice the size, then the unaligned ends
/// given back.
fn map_chunk() -> usize {
    use rustix::mm::{MapFlags, ProtFlags, mmap_anonymous, munmap};
    // SAFETY: a fresh anonymous mapping, at an address the kernel picks.
    let p = unsafe {
        mmap_anonymous(
            std::ptr::null_mut(),
            2 * CHUNK,
            ProtFlags::READ | ProtFlags::WRITE,
            MapFlags::PRIVATE | MapFlags::NORESERVE,
        )
    }
    .unwrap_or_else(|_| std::alloc::handle_alloc_error(std::alloc::Layout::new::<[u8; CHUNK]>()));
    let start = p as usize;
    let base = (start + CHUNK - 1) & !(CHUNK - 1);
    // SAFETY: both ends are parts of the mapping just made, outside the
    // chunk kept.
    unsafe {
        if base > start {
            munmap(start as *mut _, base - start).expect("munmap of the head");
        }
        let tail = start + 2 * CHUNK - (base + CHUNK);
        if tail > 0 {
            munmap((base + CHUNK) as *mut _, tail).expect("munmap of the tail");
        }
    }
    // Small pages: a table nothing uses yet must cost nothing, which a
    // transparent huge page over the chunk would not allow.
    // SAFETY: advice on the chunk just mapped; it changes no contents.
    let _ = unsafe { rustix::mm::madvise(base as *mut _, CHUNK, rustix::mm::Advice::LinuxNoHugepage) };
    base
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_are_pages_and_their_dirty_bits_their_own() {
        let pool = Pool::new();
        let a = pool.alloc();
        let b = pool.alloc();
        assert_eq!(a % PAGE as u64, 0);
        assert_eq!(b, a + PAGE as u64, "tables made one after another sit side by side");
        dirty_bits(a as usize).mark(3);
        assert!(!dirty_bits(b as usize).take(3, true));
        // SAFETY: tables of this test, nothing else sees them.
        unsafe {
            *(a as *mut u64) = 0x1234;
            pool.free(a);
        }
        let c = pool.alloc();
        assert_eq!(c, a, "the lowest free table comes back first");
        // SAFETY: as above.
        assert_eq!(unsafe { *(c as *const u64) }, 0, "a table comes back empty");
        assert!(!dirty_bits(c as usize).take(3, true), "and with clean dirty bits");
    }

    #[test]
    fn an_empty_chunk_goes_back_unless_it_is_the_only_room() {
        let pool = Pool::new();
        let first: Vec<u64> = (0..TABLES).map(|_| pool.alloc()).collect();
        let second = pool.alloc();
        assert_eq!(pool.chunks.lock().len(), 2);
        for &t in &first {
            // SAFETY: tables of this test.
            unsafe { pool.free(t) };
        }
        assert_eq!(pool.chunks.lock().len(), 1, "an empty chunk goes back while another has room");
        // SAFETY: as above.
        unsafe { pool.free(second) };
        assert_eq!(pool.chunks.lock().len(), 1, "the last one with room stays");
        assert_eq!(pool.alloc(), second, "and serves the next table");
    }
}
