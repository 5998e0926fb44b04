//! I/O page tables in hardware layouts, and the one walker that serves every
//! format.
//!
//! A table is a 4 KiB block of 512 atomic 64-bit entries; an entry points to
//! the next table or to memory by host address (see `memory`). Readers walk
//! with plain atomic loads inside an epoch critical section and never block;
//! writers (map, unmap) are serialised by the owner of the table (the IOAS
//! lock) and reuse or free tables only after every reader that could see
//! them is gone (`Spares`).
//!
//! Dirty tracking keeps its state beside each table, not in the entries'
//! dirty bits: one bit per entry in [`DirtyBits`], which the table's chunk
//! holds (see `pool`).
//! A DMA write sets a bit (a load alone when it is already set) in the one
//! of two buffers its table's generation names. Reading and clearing the
//! dirty log flips the generation of the leaf tables it reads, waits for
//! the DMA still marking the old buffers (an epoch grace period), then
//! takes them with plain loads and stores, skipping clean words and tables
//! through a summary word, where walking every leaf entry would cost an
//! atomic update per page and taking bits DMA may be setting one per word.
//! Everything the dirty log reports is as the entries' bits would have it
//! (a leaf is dirty when its bit is set in either buffer): which leaves
//! have a dirty state at all ([`Format::tracks_dirty`]), and which start
//! dirty when mapped.

pub mod amd;
pub mod arm;
pub mod image;
pub mod mock;
mod pool;
pub use pool::{Held as TablesHeld, hold as hold_tables};
pub mod x86;

use std::marker::PhantomData;
use std::ptr::NonNull;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::epoch::{Guard, Reclaim};
use parking_lot::Mutex;

use crate::error::{Error, Result};
pub use crate::memory::Trust;

/// Entries per table: 4 KiB of 64-bit entries, in every format.
pub const ENTRIES: usize = 512;
const STRIDE: u32 = 9;

/// DMA permissions, as the page-table formats encode them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Perm {
    /// DMA reads (device from memory) are allowed (`IOMMU_IOAS_MAP_READABLE`).
    pub read: bool,
    /// DMA writes (device to memory) are allowed (`IOMMU_IOAS_MAP_WRITEABLE`).
    pub write: bool,
}

impl Perm {
    /// Read only.
    pub const R: Perm = Perm { read: true, write: false };
    /// Write only.
    pub const W: Perm = Perm { read: false, write: true };
    /// Read and write.
    pub const RW: Perm = Perm { read: true, write: true };

    /// Whether an access needing `need` is allowed by `self`.
    pub fn allows(self, need: Perm) -> bool {
        (self.read || !need.read) && (self.write || !need.write)
    }
}

/// ioasid's mark of a leaf whose memory needs checked copies, in the
/// format's software bit `bit`.
pub(crate) fn trust_mark(trust: Trust, bit: u64) -> u64 {
    if trust == Trust::Checked { bit } else { 0 }
}

/// How the memory of a leaf marked in software bit `bit` is reached.
pub(crate) fn trust_of(pte: u64, bit: u64) -> Trust {
    if pte & bit != 0 { Trust::Checked } else { Trust::Direct }
}

/// One decoded entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pte {
    /// Not present.
    None,
    /// A pointer to the next level's table, at this address.
    Table(u64),
    /// A leaf mapping memory.
    Leaf {
        /// Address of the memory, aligned to the leaf's size (host memory
        /// in ioasid's tables, guest-physical in a guest's).
        addr: u64,
        /// The rights the leaf grants.
        perm: Perm,
        /// How its memory is reached (ioasid's software bit).
        trust: Trust,
        /// The hardware's dirty bit is set.
        dirty: bool,
    },
}

/// One entry of a table image, decoded for a walk (see [`Format::step`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Not present: the walk faults.
    Invalid,
    /// The next table, at level `next` (below `level - 1` when levels are
    /// skipped), and the most rights anything below may grant.
    Table {
        /// Address of the next table.
        addr: u64,
        /// The next table's level.
        next: u32,
        /// The most rights entries below may grant.
        limit: Perm,
    },
    /// A leaf of `1 << shift` bytes at `addr` (aligned to its size).
    Leaf {
        /// Address of the memory.
        addr: u64,
        /// log2 of the leaf's size in bytes.
        shift: u32,
        /// The rights the leaf itself grants.
        perm: Perm,
        /// The hardware's dirty bit is set.
        dirty: bool,
        /// The access flag is set (formats that have one fault otherwise).
        accessed: bool,
    },
}

/// A page-table format: how entries are laid out at each level. Level 0 holds
/// the smallest leaves (`1 << PAGE_SHIFT` bytes); level `LEVELS - 1` is the root.
pub trait Format: Send + Sync + 'static {
    /// The format's name, for reports and benchmarks.
    const NAME: &'static str;
    /// Table levels from root to the smallest leaves.
    const LEVELS: u32;
    /// log2 of the smallest IO page.
    const PAGE_SHIFT: u32 = 12;
    /// Bit `n` set when level `n` may hold a leaf.
    const LEAF_LEVELS: u32;
    /// Bit that hardware sets on a write through a leaf (dirty tracking).
    const DIRTY: u64;

    /// What the entry `pte` at `level` is, as ioasid's own tables use it.
    fn decode(pte: u64, level: u32) -> Pte;
    /// An entry at `level` pointing to a table of level `level - 1`.
    fn table(addr: u64, level: u32) -> u64;
    /// A leaf mapping `addr`; a `Trust::Checked` leaf is memory reached
    /// through checked copies, marked in a bit the hardware ignores.
    fn leaf(addr: u64, level: u32, perm: Perm, trust: Trust) -> u64;

    /// Whether the leaf `pte` has a dirty state at all: writes to a leaf
    /// without one leave no trace (Arm: only DBM leaves record writes).
    fn tracks_dirty(_pte: u64) -> bool {
        true
    }

    /// Records a write in the leaf at `slot`, as the hardware's dirty
    /// tracking does in a table image (ioasid's own tables keep the state
    /// in [`DirtyBits`] instead).
    fn set_dirty(slot: &AtomicU64) {
        slot.fetch_or(Self::DIRTY, Ordering::AcqRel);
    }

    /// Makes the leaf at `slot` clean again.
    fn clear_dirty(slot: &AtomicU64) {
        slot.fetch_and(!Self::DIRTY, Ordering::AcqRel);
    }

    /// One step of a walk through a table image someone else built (a
    /// guest's, or a golden test's), with what this format allows there
    /// that ioasid's own tables never use: skipped levels, odd page sizes,
    /// rights limited by table entries, leaves not yet accessed.
    fn step(pte: u64, level: u32) -> Step {
        match Self::decode(pte, level) {
            Pte::None => Step::Invalid,
            Pte::Table(addr) => Step::Table { addr, next: level - 1, limit: Perm::RW },
            Pte::Leaf { addr, perm, dirty, .. } => {
                Step::Leaf { addr, shift: Self::level_shift(level), perm, dirty, accessed: true }
            }
        }
    }

    /// Bits of IOVA this format translates.
    fn iova_bits() -> u32 {
        Self::PAGE_SHIFT + STRIDE * Self::LEVELS
    }

    /// log2 of the size an entry at `level` covers.
    fn level_shift(level: u32) -> u32 {
        Self::PAGE_SHIFT + STRIDE * level
    }
}

/// Page sizes (as a bitmap, like Linux's `pgsize_bitmap`) that `F` supports.
pub fn pgsize_bitmap<F: Format>() -> u64 {
    (0..F::LEVELS).filter(|l| F::LEAF_LEVELS & (1 << l) != 0).fold(0, |acc, l| acc | 1u64 << F::level_shift(l))
}

#[repr(C, align(4096))]
struct Table([AtomicU64; ENTRIES]);

/// Words of a [`DirtyBuf`], 64 entries each.
const DIRTY_WORDS: usize = ENTRIES / 64;

/// Bit of [`DirtyBits::generation`] set while a read has flipped the
/// table and is yet to take the buffer DMA marked before (see `flip_level`).
const FLIPPED: u64 = 2;

/// One buffer of a table's dirty bits, one bit per entry. Bit `w` of
/// `summary` is set while word `w` may hold a set bit: a clean buffer costs
/// one load to read.
#[repr(C)]
struct DirtyBuf {
    words: [AtomicU64; DIRTY_WORDS],
    summary: AtomicU64,
}

/// The dirty state of a table's leaves, kept in the table's chunk (see
/// `pool`), so a DMA write allocates nothing. DMA marks the buffer that bit 0 of `generation` names; a leaf
/// is dirty when its bit is set in either buffer. A read that clears a
/// leaf table flips `generation`, waits for the DMA that may still mark
/// the old buffer, then takes that buffer with plain loads and stores,
/// where taking bits DMA may be setting costs an atomic swap per word.
/// Between reads the buffer DMA does not mark is empty. Tables above level
/// 0 (whose leaves are huge) are never flipped: their bits are taken one
/// by one, by read-modify-writes.
#[repr(C)]
struct DirtyBits {
    generation: AtomicU64,
    bufs: [DirtyBuf; 2],
}

impl DirtyBits {
    /// The buffer DMA marks now.
    #[inline]
    fn current(&self) -> &DirtyBuf {
        &self.bufs[(self.generation.load(Ordering::Relaxed) & 1) as usize]
    }

    /// Marks entry `i` dirty, as a DMA write through it does (inside its
    /// epoch critical section, which a flipping read waits for).
    #[inline]
    fn mark(&self, i: usize) {
        let buf = self.current();
        let (w, bit) = (i / 64, 1u64 << (i % 64));
        // Already dirty is the common case: a load, no read-modify-write.
        if buf.words[w].load(Ordering::Relaxed) & bit == 0 {
            buf.words[w].fetch_or(bit, Ordering::AcqRel);
            // After the word, and a read-modify-write: a reader that
            // swapped the summary before this either reads the word after
            // the bit or sees this update (see `dirty_leaves`).
            buf.summary.fetch_or(1 << w, Ordering::AcqRel);
        }
    }

    /// Sets the state of entry `i`, for a map or an unmap (writers and
    /// reads of the dirty state are serialised).
    fn set(&self, i: usize, dirty: bool) {
        if dirty {
            return self.mark(i);
        }
        let (w, bit) = (i / 64, 1u64 << (i % 64));
        for buf in &self.bufs {
            // Clean already is the common case (a new leaf, a leaf never
            // written): a load, no read-modify-write per page mapped.
            if buf.words[w].load(Ordering::Relaxed) & bit != 0 {
                buf.words[w].fetch_and(!bit, Ordering::AcqRel);
            }
        }
    }

    /// Whether entry `i` is dirty; cleans it unless `keep`. DMA may be
    /// marking it meanwhile: each set bit is taken by a read-modify-write.
    fn take(&self, i: usize, keep: bool) -> bool {
        let (w, bit) = (i / 64, 1u64 << (i % 64));
        let mut dirty = false;
        for buf in &self.bufs {
            if buf.words[w].load(Ordering::Acquire) & bit != 0 {
                dirty |= keep || buf.words[w].fetch_and(!bit, Ordering::AcqRel) & bit != 0;
            }
        }
        dirty
    }

    /// Makes DMA mark the other buffer from now on, for a read that takes
    /// and clears the old one once the DMA still marking it has finished.
    fn flip(&self) {
        let generation = self.generation.load(Ordering::Relaxed);
        if generation & FLIPPED != 0 {
            // A read that unwound before taking the old buffer: this one
            // takes it.
            return;
        }
        // DMA that still loads the old number is waited for before the
        // old buffer is read (`epoch::synchronize` orders this store
        // before the loads of any DMA it does not wait for).
        self.generation.store((generation ^ 1) | FLIPPED, Ordering::Release);
    }

    /// Asks the cache for these bits ahead of a read (a hint: no effect on
    /// what any access sees).
    #[inline]
    fn prefetch(&self) {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
            let start = self as *const DirtyBits as *const i8;
            for line in (0..std::mem::size_of::<DirtyBits>()).step_by(64) {
                // SAFETY: a prefetch only hints the cache and never faults;
                // the address is inside `self`, and SSE is in every x86_64.
                unsafe { _mm_prefetch::<_MM_HINT_T0>(start.wrapping_add(line)) };
            }
        }
    }

    /// Everything clean, for a table taken from the spares or freed (no
    /// reader). Only what is set is written: bits of a table that never
    /// tracked dirty state stay on a page nothing has touched.
    fn reset(&self) {
        let clear = |w: &AtomicU64| {
            if w.load(Ordering::Relaxed) != 0 {
                w.store(0, Ordering::Relaxed);
            }
        };
        clear(&self.generation);
        for buf in &self.bufs {
            buf.words.iter().for_each(clear);
            clear(&buf.summary);
        }
    }
}

/// The root table of a `PageTable`, owned by it.
struct RootTable {
    ptr: NonNull<Table>,
}

// SAFETY: a `RootTable` owns its allocation like a `Box<Table>` would, and
// `Table` (atomics only) is `Send` and `Sync`.
unsafe impl Send for RootTable {}
// SAFETY: as for `Send`.
unsafe impl Sync for RootTable {}

impl RootTable {
    fn new() -> Self {
        RootTable { ptr: NonNull::new(Table::alloc() as *mut Table).expect("allocated") }
    }
}

impl std::ops::Deref for RootTable {
    type Target = Table;

    fn deref(&self) -> &Table {
        // SAFETY: the table lives as long as `self`, which owns it.
        unsafe { self.ptr.as_ref() }
    }
}

impl Drop for RootTable {
    fn drop(&mut self) {
        // SAFETY: made by `Table::alloc`; the page table that owned it is
        // gone, and with it every reader.
        unsafe { Table::free(self.ptr.as_ptr() as u64) };
    }
}

impl Table {
    /// A new empty table with clean dirty bits, as an address for entries.
    fn alloc() -> u64 {
        pool::alloc()
    }

    /// Frees a table made by `alloc`.
    ///
    /// # Safety
    /// `addr` came from `Table::alloc`, is freed once, and nothing can
    /// reach the table any more.
    unsafe fn free(addr: u64) {
        // SAFETY: per the contract.
        unsafe { pool::free(addr) }
    }

    /// The dirty bits of this table's entries.
    #[inline]
    fn dirty(&self) -> &DirtyBits {
        pool::dirty_bits(self as *const Table as usize)
    }

    fn index<F: Format>(iova: u64, level: u32) -> usize {
        ((iova >> F::level_shift(level)) as usize) & (ENTRIES - 1)
    }

    /// The table that an entry of `self` points to (`addr`, decoded as
    /// `Pte::Table`), borrowed no longer than `self`.
    #[inline]
    fn child(&self, addr: u64) -> &Table {
        // SAFETY: the one step from an entry to a table. Entries only ever
        // hold addresses of tables made by `Table::alloc`. A table stays live while linked; once unlinked
        // it is reused or freed through the epoch (`Spares`), after every reader
        // that could have seen it, or by `Drop` when nothing borrows the
        // page table. Readers walk inside an epoch guard and writers are
        // serialised by the table's owner, so no borrow outlives it.
        unsafe { &*(addr as *const Table) }
    }

    /// The entries at `level` that `[first, last]` touches, in order.
    #[inline]
    fn entries<F: Format>(&self, level: u32, first: u64, last: u64) -> Entries<'_> {
        Entries { table: self, shift: F::level_shift(level), cur: first, last, done: false }
    }
}

/// The level iterator: each entry of one table that a range touches, with
/// the part of the range inside it. Map, unmap and dirty tracking all walk
/// a range with it, descending into `Table::child` where they need to.
struct Entries<'t> {
    table: &'t Table,
    shift: u32,
    cur: u64,
    last: u64,
    done: bool,
}

/// One entry a range touches.
struct Entry<'t> {
    slot: &'t AtomicU64,
    /// Its index in the table.
    index: usize,
    /// The IOVA the entry starts at, and its size.
    start: u64,
    size: u64,
    /// The part of the range inside the entry.
    first: u64,
    last: u64,
}

impl Entry<'_> {
    /// Whether the range covers the whole entry.
    #[inline]
    fn whole(&self) -> bool {
        self.first == self.start && self.last == self.start + (self.size - 1)
    }
}

impl<'t> Iterator for Entries<'t> {
    type Item = Entry<'t>;

    #[inline]
    fn next(&mut self) -> Option<Entry<'t>> {
        if self.done {
            return None;
        }
        let size = 1u64 << self.shift;
        let start = self.cur & !(size - 1);
        let last = self.last.min(start + (size - 1));
        let index = ((self.cur >> self.shift) as usize) & (ENTRIES - 1);
        let entry = Entry { slot: &self.table.0[index], index, start, size, first: self.cur, last };
        if last == self.last {
            self.done = true;
        } else {
            self.cur = last + 1;
        }
        Some(entry)
    }
}

/// The result of a walk: where `iova` lands and with what rights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Translation {
    /// Host address of the byte at the walked IOVA.
    pub addr: u64,
    /// log2 of the leaf's size.
    pub shift: u32,
    /// The leaf's rights.
    pub perm: Perm,
    /// How the memory is reached.
    pub trust: Trust,
}

/// Counts of tables and leaves, by level.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    /// Tables at each level, index 0 the lowest.
    pub tables: Vec<u64>,
    /// Leaves at each level, index 0 the smallest.
    pub leaves: Vec<u64>,
}

/// An I/O page table in format `F`, in host memory, which the emulated
/// IOMMU walks. Walks are lock-free under an epoch guard; `map` and `unmap`
/// must be serialised by the caller (an IOAS does it under its lock).
pub struct PageTable<F: Format> {
    root: RootTable,
    spares: Arc<Spares<F>>,
    /// Held by a dirty read: between the flip of a leaf table and the
    /// take of its old buffer, no other read may flip or take it.
    dirty_reads: Mutex<()>,
    _format: PhantomData<F>,
}

impl<F: Format> Default for PageTable<F> {
    fn default() -> Self {
        Self::new()
    }
}

impl<F: Format> PageTable<F> {
    /// An empty table: a root with nothing present.
    pub fn new() -> Self {
        PageTable { root: RootTable::new(), spares: Arc::default(), dirty_reads: Mutex::new(()), _format: PhantomData }
    }

    fn max_iova() -> u64 {
        let bits = F::iova_bits();
        if bits >= 64 { u64::MAX } else { (1u64 << bits) - 1 }
    }

    /// Host address of the root table (what a context entry would hold).
    pub fn root_addr(&self) -> u64 {
        &*self.root as *const Table as u64
    }

    /// Translates one IOVA. The guard keeps every table it reads alive.
    #[inline]
    pub fn walk(&self, iova: u64, _guard: &Guard) -> Option<Translation> {
        if iova > Self::max_iova() {
            return None;
        }
        let mut table: &Table = &self.root;
        for level in (0..F::LEVELS).rev() {
            let raw = table.0[Table::index::<F>(iova, level)].load(Ordering::Acquire);
            match F::decode(raw, level) {
                Pte::None => return None,
                Pte::Leaf { addr, perm, trust, .. } => {
                    let shift = F::level_shift(level);
                    let offset = iova & ((1u64 << shift) - 1);
                    return Some(Translation { addr: addr + offset, shift, perm, trust });
                }
                Pte::Table(next) => table = table.child(next),
            }
        }
        None
    }

    /// Maps `[iova, iova + len)` to host memory at `addr`. `huge` allows leaves
    /// above 4 KiB where IOVA and memory are aligned and contiguous. The caller
    /// serialises writers and guarantees the range is unmapped.
    pub fn map(&self, iova: u64, addr: u64, len: u64, perm: Perm, trust: Trust, huge: bool) -> Result<()> {
        let page_mask = (1u64 << F::PAGE_SHIFT) - 1;
        if len == 0 || (iova | addr | len) & page_mask != 0 {
            return Err(Error::Invalid("page table maps whole pages only"));
        }
        let last = iova.checked_add(len - 1).ok_or(Error::Overflow("iova + length wraps"))?;
        if last > Self::max_iova() {
            return Err(Error::Invalid("IOVA beyond the page table's address width"));
        }
        let op = MapOp { addr_base: addr.wrapping_sub(iova), perm, trust, huge };
        if let Some(level) = Self::one_leaf(iova, addr, len, huge)
            && op.map_one_leaf::<F>(&self.root, iova, level, &self.spares)?
        {
            return Ok(());
        }
        // Down the levels where the range lies inside one entry that cannot
        // be its leaf (a small map, most often), without a call per level.
        let (mut table, mut level): (&Table, u32) = (&self.root, F::LEVELS - 1);
        while level > 0 && iova >> F::level_shift(level) == last >> F::level_shift(level) {
            let e = table.entries::<F>(level, iova, last).next().expect("a range touches an entry");
            if op.leaf_ok::<F>(&e, level) {
                break;
            }
            table = op.descend::<F>(table, level, &e, &self.spares)?;
            level -= 1;
        }
        op.map_level::<F>(table, level, iova, last, &self.spares)
    }

    /// The level of the one leaf that maps all of `[iova, iova + len)` to
    /// `addr`, when one can: a page, or an aligned huge page (`huge`).
    #[inline]
    fn one_leaf(iova: u64, addr: u64, len: u64, huge: bool) -> Option<u32> {
        Self::leaf_level(iova | addr, len).filter(|&level| level == 0 || huge)
    }

    /// The level whose leaves are `len` bytes, when `aligned` (an IOVA, or
    /// its bits or'ed with the memory's) is aligned to it.
    #[inline]
    fn leaf_level(aligned: u64, len: u64) -> Option<u32> {
        let above = len.trailing_zeros().checked_sub(F::PAGE_SHIFT)?;
        let level = above / STRIDE;
        let fits = len.is_power_of_two()
            && above % STRIDE == 0
            && level < F::LEVELS
            && F::LEAF_LEVELS & (1 << level) != 0
            && aligned & (len - 1) == 0;
        fits.then_some(level)
    }

    /// Unmaps `[iova, iova + len)`, splitting huge leaves that are only partly
    /// covered and freeing the tables the range covers once readers are done
    /// with them; tables it only enters stay, even emptied, as in Linux.
    pub fn unmap(&self, iova: u64, len: u64, guard: &Guard) {
        if len == 0 || iova > Self::max_iova() {
            return;
        }
        // The unmap of one leaf's range (what `map_one_leaf` mapped, most
        // often): straight down to it.
        if let Some(level) = Self::leaf_level(iova, len)
            && unmap_one_leaf::<F>(&self.root, iova, level)
        {
            return;
        }
        let last = iova.saturating_add(len - 1).min(Self::max_iova());
        // Down the levels where the range lies inside one table's entry that
        // it does not cover (a small unmap, most often), without a call per
        // level; the level where that stops does the work.
        let (mut table, mut level): (&Table, u32) = (&self.root, F::LEVELS - 1);
        while level > 0 && iova >> F::level_shift(level) == last >> F::level_shift(level) {
            let e = table.entries::<F>(level, iova, last).next().expect("a range touches an entry");
            match F::decode(e.slot.load(Ordering::Relaxed), level) {
                Pte::None => return,
                Pte::Table(next) if !e.whole() => table = table.child(next),
                _ => break,
            }
            level -= 1;
        }
        unmap_level::<F>(table, level, iova, last, guard, &self.spares);
    }

    /// Marks the leaf mapping `iova` dirty, as hardware does on a write
    /// (if the leaf has a dirty state); false when nothing maps it.
    #[inline]
    pub fn set_dirty(&self, iova: u64, _guard: &Guard) -> bool {
        if iova > Self::max_iova() {
            return false;
        }
        let mut table: &Table = &self.root;
        for level in (0..F::LEVELS).rev() {
            let i = Table::index::<F>(iova, level);
            let pte = table.0[i].load(Ordering::Acquire);
            match F::decode(pte, level) {
                Pte::None => return false,
                Pte::Leaf { .. } => {
                    if F::tracks_dirty(pte) {
                        table.dirty().mark(i);
                    }
                    return true;
                }
                Pte::Table(next) => table = table.child(next),
            }
        }
        false
    }

    /// Calls `record(start, size)` for every run of contiguous dirty leaves
    /// overlapping `[first, last]` (whole leaves, so a run may reach
    /// outside it), cleaning them unless `keep`.
    ///
    /// A clearing read takes the leaf tables it touches without a
    /// read-modify-write per word: it first makes DMA mark their other
    /// buffer, then waits for the DMA still in flight (an epoch grace
    /// period) before taking the old one, so a leaf it reports was written
    /// by DMA that has finished. Called inside a critical section, where it
    /// cannot wait, it takes every word by a read-modify-write instead, as
    /// it does the dirty bits of huge leaves. Reads of one table are
    /// serialised with each other; the caller serialises them with map and
    /// unmap, as those are with each other.
    pub fn read_and_clear_dirty(&self, first: u64, last: u64, keep: bool, record: &mut dyn FnMut(u64, u64)) {
        self.read_and_clear_dirty_then(first, last, keep, record, &mut || {});
    }

    /// `read_and_clear_dirty`, calling `flipped` once DMA marks the other
    /// buffers and before waiting for the DMA in flight: where a cache of
    /// translations that remember their leaf is already dirty (an IOTLB)
    /// must be dropped, so no write after the flip goes unmarked.
    pub fn read_and_clear_dirty_then(
        &self,
        first: u64,
        last: u64,
        keep: bool,
        record: &mut dyn FnMut(u64, u64),
        flipped: &mut dyn FnMut(),
    ) {
        let last = last.min(Self::max_iova());
        if first > last {
            return;
        }
        let _reads = self.dirty_reads.lock();
        if !keep && !crate::epoch::pinned() && flip_level::<F>(&self.root, F::LEVELS - 1, first, last) {
            flipped();
            crate::epoch::synchronize();
        }
        let mut runs = Runs { start: 0, len: 0, record };
        dirty_level::<F>(&self.root, F::LEVELS - 1, first, last, keep, &mut runs);
        runs.flush();
    }

    /// Number of tables and leaves at each level.
    pub fn summary(&self) -> Summary {
        let n = F::LEVELS as usize;
        let mut s = Summary { tables: vec![0; n], leaves: vec![0; n] };
        count::<F>(&self.root, F::LEVELS - 1, &mut s);
        s
    }
}

struct MapOp {
    /// `host = iova + addr_base` (wrapping), so sub-ranges need no bookkeeping.
    addr_base: u64,
    perm: Perm,
    trust: Trust,
    huge: bool,
}

impl MapOp {
    /// Whether entry `e` at `level` can be one leaf for its part of the range.
    #[inline]
    fn leaf_ok<F: Format>(&self, e: &Entry<'_>, level: u32) -> bool {
        let host = e.first.wrapping_add(self.addr_base);
        F::LEAF_LEVELS & (1 << level) != 0 && (level == 0 || self.huge) && e.whole() && host & (e.size - 1) == 0
    }

    /// The table below entry `e` (at `level` of `table`, not to be a leaf),
    /// made when there is none.
    #[inline(always)]
    fn descend<'t, F: Format>(
        &self,
        table: &'t Table,
        level: u32,
        e: &Entry<'t>,
        spares: &Spares<F>,
    ) -> Result<&'t Table> {
        let child = match F::decode(e.slot.load(Ordering::Relaxed), level) {
            Pte::Leaf { .. } => return Err(Error::Exists("IOVA already mapped in the page table")),
            Pte::Table(next) => next,
            Pte::None => {
                crate::inject::check("page table")?;
                let t = spares.take();
                e.slot.store(F::table(t, level), Ordering::Release);
                t
            }
        };
        Ok(table.child(child))
    }

    /// Maps the leaf at `level` holding `iova` (its range is the whole
    /// map, see `PageTable::one_leaf`), walking straight down and making
    /// the tables it lacks. False, having mapped nothing, when its entry
    /// is not empty: the range walk decides what to do there.
    #[inline]
    fn map_one_leaf<F: Format>(&self, root: &Table, iova: u64, level: u32, spares: &Spares<F>) -> Result<bool> {
        let mut table = root;
        for l in (level + 1..F::LEVELS).rev() {
            let slot = &table.0[Table::index::<F>(iova, l)];
            let next = match F::decode(slot.load(Ordering::Relaxed), l) {
                Pte::Table(next) => next,
                Pte::Leaf { .. } => return Err(Error::Exists("IOVA already mapped in the page table")),
                Pte::None => {
                    crate::inject::check("page table")?;
                    let t = spares.take();
                    slot.store(F::table(t, l), Ordering::Release);
                    t
                }
            };
            table = table.child(next);
        }
        let index = Table::index::<F>(iova, level);
        let slot = &table.0[index];
        if F::decode(slot.load(Ordering::Relaxed), level) != Pte::None {
            return Ok(false);
        }
        let pte = F::leaf(iova.wrapping_add(self.addr_base), level, self.perm, self.trust);
        table.dirty().set(index, starts_dirty::<F>(pte, level));
        slot.store(pte, Ordering::Release);
        Ok(true)
    }

    fn map_level<F: Format>(
        &self,
        table: &Table,
        level: u32,
        first: u64,
        last: u64,
        spares: &Arc<Spares<F>>,
    ) -> Result<()> {
        for e in table.entries::<F>(level, first, last) {
            if self.leaf_ok::<F>(&e, level) {
                let old = F::decode(e.slot.load(Ordering::Relaxed), level);
                // Where a table is that holds nothing (an unmap entered it
                // and left it), the leaf replaces it, as Linux's does; the
                // table goes once the readers that may be walking it leave.
                let emptied = match old {
                    Pte::Table(next) => subtree_empty::<F>(table.child(next), level - 1).then_some(next),
                    _ => None,
                };
                if old == Pte::None || emptied.is_some() {
                    let pte = F::leaf(e.first.wrapping_add(self.addr_base), level, self.perm, self.trust);
                    table.dirty().set(e.index, starts_dirty::<F>(pte, level));
                    e.slot.store(pte, Ordering::Release);
                    if let Some(next) = emptied {
                        spares.retire(Retired { table: next as usize, level: level - 1 }, &crate::epoch::pin());
                    }
                    continue;
                }
            }
            let child = self.descend::<F>(table, level, &e, spares)?;
            self.map_level::<F>(child, level - 1, e.first, e.last, spares)?;
        }
        Ok(())
    }
}

/// Whether `table` (at `level`) and every table below it hold no leaf.
fn subtree_empty<F: Format>(table: &Table, level: u32) -> bool {
    table.0.iter().all(|e| match F::decode(e.load(Ordering::Relaxed), level) {
        Pte::None => true,
        Pte::Table(next) => level > 0 && subtree_empty::<F>(table.child(next), level - 1),
        Pte::Leaf { .. } => false,
    })
}

/// Clears the leaf at `level` holding `iova`, whose range is the whole
/// unmap, walking straight down. False, having changed nothing, when there
/// is no such leaf: the range walk decides what to do there.
#[inline]
fn unmap_one_leaf<F: Format>(root: &Table, iova: u64, level: u32) -> bool {
    let mut table = root;
    for l in (level + 1..F::LEVELS).rev() {
        match F::decode(table.0[Table::index::<F>(iova, l)].load(Ordering::Relaxed), l) {
            Pte::Table(next) => table = table.child(next),
            _ => return false,
        }
    }
    let index = Table::index::<F>(iova, level);
    let slot = &table.0[index];
    if !matches!(F::decode(slot.load(Ordering::Relaxed), level), Pte::Leaf { .. }) {
        return false;
    }
    slot.store(0, Ordering::Release);
    table.dirty().set(index, false);
    true
}

fn unmap_level<F: Format>(table: &Table, level: u32, first: u64, last: u64, guard: &Guard, spares: &Arc<Spares<F>>) {
    for e in table.entries::<F>(level, first, last) {
        match F::decode(e.slot.load(Ordering::Relaxed), level) {
            Pte::None => {}
            Pte::Leaf { .. } if e.whole() => {
                e.slot.store(0, Ordering::Release);
                table.dirty().set(e.index, false);
            }
            Pte::Leaf { addr, perm, trust, .. } => {
                // A partial unmap of a huge leaf: replace it by a table of
                // next-level leaves covering the same memory, then unmap
                // there. They start as new leaves do.
                let t = Table::alloc();
                let child = table.child(t);
                let sub = 1u64 << F::level_shift(level - 1);
                for (i, s) in child.0.iter().enumerate() {
                    let pte = F::leaf(addr + i as u64 * sub, level - 1, perm, trust);
                    child.dirty().set(i, starts_dirty::<F>(pte, level - 1));
                    s.store(pte, Ordering::Relaxed);
                }
                table.dirty().set(e.index, false);
                e.slot.store(F::table(t, level), Ordering::Release);
                unmap_level::<F>(child, level - 1, e.first, e.last, guard, spares);
            }
            // A table the range covers goes whole, with one store: its
            // tables are not visited here, but after the readers have left
            // (`Spares`). One the range only enters stays, even emptied, as
            // Linux's page tables keep it: the next map there needs it again.
            Pte::Table(next) if e.whole() => {
                e.slot.store(0, Ordering::Release);
                spares.retire(Retired { table: next as usize, level: level - 1 }, guard);
            }
            Pte::Table(next) => unmap_level::<F>(table.child(next), level - 1, e.first, e.last, guard, spares),
        }
    }
}

/// A table unlinked by unmap, with every table below it.
#[derive(Clone, Copy)]
struct Retired {
    table: usize,
    level: u32,
}

impl Retired {
    /// An upper bound of the tables in the subtree, when small enough to
    /// keep: a level-0 table alone, or a level-1 table with its leaf
    /// tables (what one unmapped GiB of 4 KiB pages leaves).
    fn kept_cost(self) -> Option<usize> {
        match self.level {
            0 => Some(1),
            1 => Some(1 + ENTRIES),
            _ => None,
        }
    }
}

/// Most tables kept for reuse by one page table (4 MiB: two unmapped GiB
/// of 4 KiB pages).
const SPARE_TABLES: usize = 2 * (1 + ENTRIES);

/// Tables an unmap took out of a page table, kept for its next maps once
/// every reader that could still see them has left: unmapping a subtree is
/// then one store and one deferred push, and remapping it needs no
/// allocation. Subtrees stay whole until a map takes them (their tables
/// are visited and cleared then); beyond `SPARE_TABLES` they are freed.
struct Spares<F: Format> {
    list: Mutex<SpareList>,
    _format: PhantomData<F>,
}

#[derive(Default)]
struct SpareList {
    retired: Vec<Retired>,
    /// Sum of the `kept_cost` of `retired`.
    cost: usize,
}

impl<F: Format> Default for Spares<F> {
    fn default() -> Self {
        Spares { list: Mutex::new(SpareList::default()), _format: PhantomData }
    }
}

impl<F: Format> Spares<F> {
    /// Hands a subtree unlinked under `guard` to the spares once the
    /// epoch's readers have left.
    fn retire(self: &Arc<Self>, r: Retired, guard: &Guard) {
        // The subtree is unlinked, so no new reader can reach it; readers
        // already inside hold guards, and the epoch reclaims it only after
        // them. Until then nothing else owns it.
        let token = [r.table, r.level as usize];
        guard.defer_reclaim(self.clone(), token);
    }

    /// Keeps a subtree no reader can see, or frees it past the budget.
    fn keep(&self, r: Retired) {
        let mut list = self.list.lock();
        match r.kept_cost() {
            Some(cost) if list.cost + cost <= SPARE_TABLES => {
                list.cost += cost;
                list.retired.push(r);
            }
            _ => {
                drop(list);
                r.free::<F>();
            }
        }
    }

    /// An empty table for a map, from the spares when there are any; the
    /// tables below a reused subtree's root become spares themselves.
    fn take(&self) -> u64 {
        let mut list = self.list.lock();
        let Some(r) = list.retired.pop() else {
            drop(list);
            return Table::alloc();
        };
        list.cost -= r.kept_cost().expect("only kept subtrees are listed");
        // SAFETY: a retired table is unreachable by any reader and owned by
        // the spares alone (see `retire`).
        let t = unsafe { &*(r.table as *const Table) };
        for e in t.0.iter() {
            let pte = e.load(Ordering::Relaxed);
            if pte == 0 {
                continue;
            }
            if r.level > 0
                && let Pte::Table(next) = F::decode(pte, r.level)
            {
                let child = Retired { table: next as usize, level: r.level - 1 };
                list.cost += child.kept_cost().expect("children of a kept subtree are kept");
                list.retired.push(child);
            }
            e.store(0, Ordering::Relaxed);
        }
        t.dirty().reset();
        r.table as u64
    }
}

impl<F: Format> Reclaim for Spares<F> {
    fn reclaim(&self, [table, meta]: [usize; 2]) {
        self.keep(Retired { table, level: meta as u32 });
    }
}

impl Retired {
    fn free<F: Format>(self) {
        free_tree::<F>(self.table as u64, self.level);
    }
}

impl<F: Format> Drop for Spares<F> {
    fn drop(&mut self) {
        for r in self.list.get_mut().retired.drain(..) {
            r.free::<F>();
        }
    }
}

/// Frees a detached table and every table below it.
fn free_tree<F: Format>(table: u64, level: u32) {
    // SAFETY: the caller passes a table that is unreachable by any reader and
    // was made by `Table::alloc`; it is freed below, after this borrow.
    let t = unsafe { &*(table as *const Table) };
    if level > 0 {
        for e in t.0.iter() {
            if let Pte::Table(next) = F::decode(e.load(Ordering::Relaxed), level) {
                free_tree::<F>(next, level - 1);
            }
        }
    }
    // SAFETY: as above; nothing borrows it any more.
    unsafe { Table::free(table) };
}

/// Whether a leaf `pte` just made at `level` is dirty, as its entry says:
/// Arm's writable leaves start dirty, as Linux makes them.
fn starts_dirty<F: Format>(pte: u64, level: u32) -> bool {
    matches!(F::decode(pte, level), Pte::Leaf { dirty: true, .. })
}

/// Dirty leaves found by a read, merged into runs of contiguous IOVA
/// before they are handed on.
struct Runs<'r> {
    start: u64,
    len: u64,
    record: &'r mut dyn FnMut(u64, u64),
}

impl Runs<'_> {
    #[inline]
    fn push(&mut self, start: u64, len: u64) {
        if self.len != 0 && self.start + self.len == start {
            self.len += len;
        } else {
            self.flush();
            self.start = start;
            self.len = len;
        }
    }

    fn flush(&mut self) {
        if self.len != 0 {
            (self.record)(self.start, self.len);
            self.len = 0;
        }
    }
}

fn dirty_level<F: Format>(table: &Table, level: u32, first: u64, last: u64, keep: bool, runs: &mut Runs<'_>) {
    if level == 0 {
        return dirty_leaves::<F>(table, first, last, keep, runs);
    }
    for e in table.entries::<F>(level, first, last) {
        match F::decode(e.slot.load(Ordering::Acquire), level) {
            Pte::None => {}
            Pte::Leaf { .. } => {
                if table.dirty().take(e.index, keep) {
                    runs.push(e.start, e.size);
                }
            }
            Pte::Table(next) => dirty_level::<F>(table.child(next), level - 1, e.first, e.last, keep, runs),
        }
    }
}

/// Flips (see [`DirtyBits::flip`]) every level-0 table that `[first,
/// last]` touches, for a read that clears them; whether any flipped, so
/// that the read must wait for DMA in flight before taking them.
fn flip_level<F: Format>(table: &Table, level: u32, first: u64, last: u64) -> bool {
    if level == 0 {
        table.dirty().flip();
        return true;
    }
    if level == 1 {
        // The leaf tables' bits sit each on a page of its own, cold after
        // the DMA that set them walked the tables: asking for all of them
        // before the first flip overlaps their misses, where one flip at a
        // time waits for each, and the read that takes them after the wait
        // finds them near.
        for e in table.entries::<F>(level, first, last) {
            if let Pte::Table(next) = F::decode(e.slot.load(Ordering::Acquire), level) {
                table.child(next).dirty().prefetch();
            }
        }
    }
    let mut flipped = false;
    for e in table.entries::<F>(level, first, last) {
        if let Pte::Table(next) = F::decode(e.slot.load(Ordering::Acquire), level) {
            flipped |= flip_level::<F>(table.child(next), level - 1, e.first, e.last);
        }
    }
    flipped
}

/// Hands the set bits of `v`, word `w` of the leaf table starting at
/// `table_start`, to `runs`.
#[inline]
fn push_word(runs: &mut Runs<'_>, table_start: u64, page: u64, w: usize, mut v: u64) {
    let base = table_start + (w as u64 * 64) * page;
    if v == u64::MAX {
        // All dirty, the common case of a busy guest: one run.
        return runs.push(base, 64 * page);
    }
    while v != 0 {
        let at = v.trailing_zeros();
        let n = (v >> at).trailing_ones();
        runs.push(base + u64::from(at) * page, u64::from(n) * page);
        v &= !((u64::MAX >> (64 - n)) << at);
    }
}

/// The dirty leaves of a level-0 table within `[first, last]`, 64 at a
/// time. Only leaves have their bits set there, so the entries are not read.
fn dirty_leaves<F: Format>(table: &Table, first: u64, last: u64, keep: bool, runs: &mut Runs<'_>) {
    let bits = table.dirty();
    let page = 1u64 << F::PAGE_SHIFT;
    let table_start = first & !((page << STRIDE) - 1);
    let (i0, i1) = (Table::index::<F>(first, 0), Table::index::<F>(last, 0));
    let whole = i0 == 0 && i1 == ENTRIES - 1;
    // The entries of word `w` inside the range.
    let mask = |w: usize| {
        let (lo, hi) = (i0.max(w * 64), i1.min(w * 64 + 63));
        if lo > hi { 0 } else { (u64::MAX >> (63 - (hi - w * 64))) & (u64::MAX << (lo - w * 64)) }
    };
    let generation = bits.generation.load(Ordering::Relaxed);
    if generation & FLIPPED != 0 {
        // Flipped by this read, which then waited for every DMA that could
        // still mark the old buffer: nothing else writes it now, so plain
        // loads and stores take it. Bits outside the range move to the
        // buffer DMA marks, which leaves the old one empty.
        bits.generation.store(generation & 1, Ordering::Relaxed);
        let (old, current) = (&bits.bufs[(generation & 1 ^ 1) as usize], &bits.bufs[(generation & 1) as usize]);
        let mut summary = old.summary.load(Ordering::Relaxed);
        old.summary.store(0, Ordering::Relaxed);
        while summary != 0 {
            let w = summary.trailing_zeros() as usize;
            summary &= summary - 1;
            let v = old.words[w].load(Ordering::Relaxed);
            if v == 0 {
                continue;
            }
            old.words[w].store(0, Ordering::Relaxed);
            let inside = if whole { v } else { v & mask(w) };
            let outside = v & !inside;
            if outside != 0 {
                current.words[w].fetch_or(outside, Ordering::AcqRel);
                current.summary.fetch_or(1 << w, Ordering::AcqRel);
            }
            push_word(runs, table_start, page, w, inside);
        }
        return;
    }
    // Not flipped (a read that keeps the bits, or one inside a critical
    // section): DMA may be marking either buffer, so each word is taken by
    // a read-modify-write. Summaries are swapped before the words: a write
    // that sets a bit after its word was read sets the summary again
    // (`DirtyBits::mark`). A partial read leaves the summaries as they
    // are; a set bit for a clean word only costs a later read one load.
    let summary = bits.bufs.iter().fold(0, |acc, buf| {
        acc | if whole && !keep { buf.summary.swap(0, Ordering::AcqRel) } else { buf.summary.load(Ordering::Acquire) }
    });
    for w in i0 / 64..=i1 / 64 {
        if summary & (1 << w) == 0 {
            continue;
        }
        let mask = mask(w);
        let mut v = 0;
        for buf in &bits.bufs {
            let word = &buf.words[w];
            let seen = word.load(Ordering::Acquire) & mask;
            v |= if seen == 0 || keep {
                seen
            } else if mask == u64::MAX {
                word.swap(0, Ordering::AcqRel)
            } else {
                word.fetch_and(!mask, Ordering::AcqRel) & mask
            };
        }
        push_word(runs, table_start, page, w, v);
    }
}

fn count<F: Format>(table: &Table, level: u32, s: &mut Summary) {
    s.tables[level as usize] += 1;
    for e in table.0.iter() {
        match F::decode(e.load(Ordering::Acquire), level) {
            Pte::None => {}
            Pte::Leaf { .. } => s.leaves[level as usize] += 1,
            Pte::Table(next) => count::<F>(table.child(next), level - 1, s),
        }
    }
}

impl<F: Format> Drop for PageTable<F> {
    fn drop(&mut self) {
        for e in self.root.0.iter() {
            if let Pte::Table(next) = F::decode(e.load(Ordering::Relaxed), F::LEVELS - 1) {
                free_tree::<F>(next, F::LEVELS - 2);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::x86::VtdSs4;
    use super::*;

    const MIB2: u64 = 2 << 20;

    /// The level-0 table under which `iova` is mapped.
    fn leaf_table<F: Format>(pt: &PageTable<F>, iova: u64) -> u64 {
        let mut table: &Table = &pt.root;
        for level in (1..F::LEVELS).rev() {
            match F::decode(table.0[Table::index::<F>(iova, level)].load(Ordering::Acquire), level) {
                Pte::Table(next) => table = table.child(next),
                other => panic!("no table at level {level}: {other:?}"),
            }
        }
        table as *const Table as u64
    }

    fn spare_count<F: Format>(pt: &PageTable<F>) -> usize {
        pt.spares.list.lock().retired.len()
    }

    /// Drives the epoch until `pt` holds `want` spares (other tests' readers
    /// may hold it back a while).
    fn settle<F: Format>(pt: &PageTable<F>, want: usize) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while spare_count(pt) < want && std::time::Instant::now() < deadline {
            crate::epoch::pin().flush();
            std::thread::yield_now();
        }
    }

    #[test]
    fn a_small_map_descends_to_its_leaf_and_stops_at_a_huge_one() {
        let pt = PageTable::<VtdSs4>::new();
        let guard = crate::epoch::pin();
        let a = 1u64 << 30;
        pt.map(a, 0x4000_0000, MIB2, Perm::RW, Trust::Direct, true).unwrap();
        assert_eq!(pt.summary().leaves[1], 1, "one 2 MiB leaf");
        let r = pt.map(a + 4096, 0x9000_0000, 4096, Perm::R, Trust::Direct, false);
        assert!(matches!(r, Err(Error::Exists(_))), "{r:?}");
        assert_eq!(pt.walk(a + 4096, &guard).unwrap().addr, 0x4000_1000, "the leaf is left as it was");
        // One page far from the rest makes a table at every level below the root.
        let b = (1u64 << 39) + 5 * 4096;
        pt.map(b, 0x7000_0000, 4096, Perm::R, Trust::Direct, false).unwrap();
        let t = pt.walk(b + 12, &guard).unwrap();
        assert_eq!((t.addr, t.shift, t.perm), (0x7000_000c, 12, Perm::R));
        assert_eq!(pt.summary().tables, vec![1, 2, 2, 1], "a leaf table for b only");
        assert!(matches!(pt.map(b, 0x7000_0000, 4096, Perm::R, Trust::Direct, false), Err(Error::Exists(_))));
    }

    /// An unmap of exactly one leaf's range goes straight to that leaf: it
    /// clears the leaf and its dirty state, and nothing beside it.
    #[test]
    fn unmapping_one_leaf_clears_it_and_nothing_beside_it() {
        let pt = PageTable::<VtdSs4>::new();
        let gib = 1u64 << 30;
        // Under another root entry than the first, at the same index below.
        let far = 1u64 << 39;
        for (iova, addr) in [(0, 0x4000_0000), (far, 0x8000_0000), (far + gib, 0xc000_0000)] {
            pt.map(iova, addr, gib, Perm::RW, Trust::Direct, true).unwrap();
        }
        let page = 3 * gib + 5 * 4096;
        pt.map(page, 0x5000, 4096, Perm::RW, Trust::Direct, true).unwrap();
        pt.map(page + 4096, 0x6000, 4096, Perm::RW, Trust::Direct, true).unwrap();
        let g = crate::epoch::pin();
        for iova in [far + 8, page, page + 4096] {
            assert!(pt.set_dirty(iova, &g));
        }
        pt.unmap(far, gib, &g);
        pt.unmap(page, 4096, &g);
        assert!(pt.walk(far, &g).is_none() && pt.walk(page, &g).is_none());
        assert_eq!(pt.walk(0, &g).unwrap().addr, 0x4000_0000);
        assert_eq!(pt.walk(far + gib, &g).unwrap().addr, 0xc000_0000);
        assert_eq!(pt.walk(page + 4096, &g).unwrap().addr, 0x6000);
        let mut dirty = Vec::new();
        pt.read_and_clear_dirty(0, u64::MAX, true, &mut |iova, len| dirty.push((iova, len)));
        assert_eq!(dirty, vec![(page + 4096, 4096)], "only the page left mapped is dirty");
        // Nothing there, or not a leaf of that size: the range walk decides.
        pt.unmap(far, gib, &g);
        pt.unmap(3 * gib, MIB2, &g);
        assert!(pt.walk(page + 4096, &g).is_none(), "a 2 MiB unmap over 4 KiB pages");
        assert_eq!(pt.summary().leaves, vec![0, 0, 2, 0]);
    }

    #[test]
    fn unmapped_tables_are_reused_only_after_readers_leave() {
        let pt = PageTable::<VtdSs4>::new();
        let (a, b) = (1u64 << 30, 1u64 << 39);
        pt.map(a, 0x4000_0000, MIB2, Perm::RW, Trust::Direct, false).unwrap();
        let old = leaf_table(&pt, a);
        // A reader inside since before the unmap (here on this thread: a
        // pinned participant holds the epoch back for everyone).
        let reader = crate::epoch::pin();
        pt.unmap(a, MIB2, &crate::epoch::pin());
        for _ in 0..256 {
            crate::epoch::pin().flush();
        }
        // It may still walk the old tables: none of them may be handed to a
        // new mapping, nor changed.
        assert_eq!(spare_count(&pt), 0);
        pt.map(b, 0x8000_0000, MIB2, Perm::RW, Trust::Direct, false).unwrap();
        assert_ne!(leaf_table(&pt, b), old);
        let old_b = leaf_table(&pt, b);
        // SAFETY: `old` is retired but not freed while the reader is inside.
        let first = unsafe { &*(old as *const Table) }.0[0].load(Ordering::Relaxed);
        assert_eq!(
            VtdSs4::decode(first, 0),
            Pte::Leaf { addr: 0x4000_0000, perm: Perm::RW, trust: Trust::Direct, dirty: false }
        );
        drop(reader);
        // The leaf table of `a` comes back once the reader left (the
        // tables above it stay: the unmap did not cover them), then `b`'s.
        settle(&pt, 1);
        assert_eq!(spare_count(&pt), 1, "tables come back once the reader left");
        pt.unmap(b, MIB2, &crate::epoch::pin());
        settle(&pt, 2);
        assert_eq!(pt.summary().tables, vec![0, 2, 2, 1], "what the unmaps only entered stays");
        pt.map(a, 0xc000_0000, MIB2, Perm::RW, Trust::Direct, false).unwrap();
        assert!([old, old_b].contains(&leaf_table(&pt, a)), "a spare table is reused");
        let g = crate::epoch::pin();
        for i in 0..512 {
            let t = pt.walk(a + i * 4096, &g).expect("mapped");
            assert_eq!(t.addr, 0xc000_0000 + i * 4096, "a reused table holds nothing of its past");
        }
        assert!(pt.walk(b, &g).is_none());
    }

    /// Tables an unmap only entered stay, and a huge leaf mapped over them
    /// later replaces them, as Linux's page tables do.
    #[test]
    fn a_huge_leaf_replaces_the_emptied_tables_below_it() {
        let pt = PageTable::<VtdSs4>::new();
        let gib = 1u64 << 30;
        pt.map(gib + MIB2 + 4096, 0x5000, 4096, Perm::R, Trust::Direct, true).unwrap();
        pt.unmap(gib + MIB2 + 4096, 4096, &crate::epoch::pin());
        assert_eq!(pt.summary().tables, vec![1, 1, 1, 1], "emptied, not freed");
        pt.map(gib, 0x4000_0000, gib, Perm::RW, Trust::Direct, true).unwrap();
        assert_eq!(pt.summary().leaves, vec![0, 0, 1, 0], "one 1 GiB leaf");
        assert_eq!(pt.summary().tables, vec![0, 0, 1, 1]);
        settle(&pt, 1);
        assert_eq!(spare_count(&pt), 1, "the emptied level-1 table and its leaf table");
        let g = crate::epoch::pin();
        assert_eq!(pt.walk(gib + MIB2 + 4096, &g).unwrap().addr, 0x4000_0000 + MIB2 + 4096);
        // A table that still holds a leaf is never replaced.
        pt.unmap(gib, gib, &g);
        pt.map(gib + 4096, 0x5000, 4096, Perm::R, Trust::Direct, true).unwrap();
        pt.map(gib + MIB2, 0x8000_0000, MIB2, Perm::R, Trust::Direct, true).unwrap();
        assert_eq!(pt.summary().leaves, vec![1, 1, 0, 0]);
        assert!(pt.map(gib, 0x4000_0000, MIB2, Perm::R, Trust::Direct, true).is_err());
    }

    #[test]
    fn whole_gib_unmap_keeps_its_subtree_and_map_reuses_it() {
        let pt = PageTable::<VtdSs4>::new();
        let gib = 1u64 << 30;
        pt.map(gib, 0, gib, Perm::RW, Trust::Direct, false).unwrap();
        assert_eq!(pt.summary().tables, vec![512, 1, 1, 1]);
        pt.unmap(gib, gib, &crate::epoch::pin());
        settle(&pt, 1);
        // The level-2 table stays, emptied: the unmap did not cover it.
        assert_eq!(pt.summary().tables, vec![0, 0, 1, 1]);
        {
            let list = pt.spares.list.lock();
            // The level-1 subtree in one piece.
            assert_eq!(list.retired.len(), 1);
            assert_eq!(list.cost, 1 + ENTRIES);
        }
        pt.map(3 * gib, gib, gib, Perm::R, Trust::Checked, false).unwrap();
        assert_eq!(pt.summary().tables, vec![512, 1, 1, 1]);
        assert_eq!(spare_count(&pt), 0, "every spare went back into the table");
        let g = crate::epoch::pin();
        for i in (0..gib).step_by(4096 * 37) {
            let t = pt.walk(3 * gib + i, &g).expect("mapped");
            assert_eq!((t.addr, t.perm, t.trust), (gib + i, Perm::R, Trust::Checked));
        }
    }
}
