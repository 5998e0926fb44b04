//! The memory behind mappings: a run of host pages from a user address or a
//! file, shared by every area that maps part of it (copies share it too, so
//! memory is pinned and charged once however often it is mapped).
//!
//! A file's pages are the engine's own shared mapping of it, so the program
//! may close or unmap the file freely. Linux pins a file's pages at map time
//! and keeps using them after a truncation; a mapping cannot hold pages the
//! file dropped, so here a DMA or access that reaches past a file's new end
//! fails (`EFAULT`, a DMA fault) instead, and what is left of the file is
//! still reached.
//!
//! Memory of another process (a forked child mapping through the iommufd it
//! shares with us) cannot be mapped here, so it is reached this way:
//! - Shared memory both processes map at the same address (what a child
//!   inherits of `MAP_SHARED` mappings) is one set of pages: used in place,
//!   before and after the child exits, as Linux's pinned pages are.
//! - Private memory is taken when Linux would pin it (a domain or an access
//!   pins it), one pinned range at a time and only that range: its pages
//!   with contents are copied into a buffer of ours that holds nothing else,
//!   so memory and time follow what the child wrote there, not the length
//!   of the mapping (a 64 GiB sparse mapping costs what its written pages
//!   do). From then on those pages are ours: device writes are not seen by
//!   the child and the child's later writes are not seen by devices (with
//!   Linux both share the pinned pages), and they stay usable after the
//!   child exits, as pinned pages do. Pinning fails with `EFAULT` once the
//!   child is gone, or where its memory is not mapped (or not writable, for
//!   a writable mapping), as Linux's pin does.
//! - An access's read or write (no pin) of private memory not taken reaches
//!   the child's memory itself, as Linux's reaches unpinned pages through
//!   the child's mm: `EFAULT` once the child is gone.
//!
//! Memory of a daemon's client (`ProcessMemory::Client`) is reached so
//! that the client and devices keep seeing each other's writes, as with
//! Linux's pinned pages:
//! - Shared memory (a memfd, a `MAP_SHARED` file, shared anonymous memory)
//!   is mapped here too, from the object the client maps: the same pages,
//!   reached without a system call.
//! - Private memory stays in the client: pinning checks it is mapped (and
//!   writable, for a writable mapping), and accesses read and write it there
//!   at each use. In page tables it is a window of address space nothing may
//!   touch, so a device's DMA into it faults instead of reaching anything.
//!   Once the client unmaps it, accesses fail with `EFAULT`, where Linux's
//!   pinned pages would still be there.

use std::cell::RefCell;
use std::os::fd::BorrowedFd;
use std::sync::atomic::{Ordering, fence};
use std::sync::{Arc, OnceLock, Weak};

use parking_lot::Mutex;
use smallvec::SmallVec;

use crate::account::Accounting;
use crate::error::{Error, Result};
use crate::iova::{self, IovaRange, PAGE_SIZE};
use crate::memory::{self, FileMapping, HostBuffer, PageMap, Trust};

#[derive(Debug)]
enum Backing {
    User,
    File(#[allow(dead_code)] FileMapping),
    /// A dma-buf's memory (the mock's), which its exporter may revoke.
    Dmabuf(FileMapping),
    /// Memory of another process (a forked child mapping through the fd it
    /// shares, or a client of the daemon), reached as the module docs say.
    Remote {
        pid: i32,
        /// A client of the daemon's: its memory is reached coherently.
        client: bool,
        reach: OnceLock<Reach>,
    },
}

/// How another process's memory is reached, decided at its first use.
#[derive(Debug)]
enum Reach {
    /// Shared memory this process maps at the same address: the same pages,
    /// used in place (and checked, as any memory of a program is).
    Shared,
    /// Private memory ioasid cannot map from another address space: each
    /// range is copied into `copy` when first pinned (only its pages with
    /// contents), and ours from then on; `taken` holds the page ranges
    /// copied. Ranges not taken are read and written in the process itself.
    Private { copy: HostBuffer, taken: Mutex<Vec<IovaRange>> },
    /// A client's shared memory, mapped here too: the same pages.
    Mapped(FileMapping),
    /// A client's private memory, read and written in the client at every
    /// access; `window` is address space that stands for it in page tables,
    /// where a device's DMA faults.
    Live { window: HostBuffer },
}

/// The memory behind one mapping (Linux's `iopt_pages`): a run of user
/// pages, a file's pages, a dma-buf's or another process's, with the pins
/// the IOAS's domains and accesses hold on them and the locked-memory charge
/// for those pins. Made by the context's map calls; shared by every area
/// (and `IOMMU_IOAS_COPY`) that maps part of it.
#[derive(Debug)]
pub struct Pages {
    /// Host address of the first page (page aligned).
    base: u64,
    npages: u64,
    writable: bool,
    trust: Trust,
    backing: Backing,
    /// The pins and where they are charged, under one lock: every change to
    /// one reads the other.
    pins: Mutex<PinState>,
    /// Its place in the registry of live pages, if it is there.
    live: Option<LiveKey>,
}

#[derive(Debug)]
struct PinState {
    /// Page ranges currently pinned, one entry per pinning user; the union
    /// is what is charged. Most pages have one user (the IOAS's domains) or
    /// two, held inline so that mapping allocates nothing for them.
    ranges: SmallVec<[IovaRange; 2]>,
    accounting: Accounting,
}

impl PinState {
    fn new(accounting: Accounting) -> Mutex<Self> {
        Mutex::new(PinState { ranges: SmallVec::new(), accounting })
    }

    /// Adds the pin of `range` (page indexes); pages not pinned before are
    /// first made ready (`take`: checked, or copied in from another process)
    /// and then charged.
    fn pin(&mut self, range: IovaRange, take: impl FnOnce() -> Result<()>) -> Result<()> {
        let added = only_in(range, &self.ranges);
        if added > 0 {
            crate::inject::check("pin")?;
            take()?;
            self.accounting.charge(added)?;
        }
        self.ranges.push(range);
        Ok(())
    }

    /// Takes back one `pin` of `range`, uncharging the pages no other pin holds.
    fn unpin(&mut self, range: IovaRange) {
        // The last pin, most often the only one there was.
        if let [only] = self.ranges[..]
            && only == range
        {
            self.ranges.clear();
            return self.accounting.uncharge(range.len());
        }
        let Some(i) = self.ranges.iter().position(|r| *r == range) else {
            debug_assert!(false, "unpin of a range that was not pinned");
            return;
        };
        self.ranges.swap_remove(i);
        self.accounting.uncharge(only_in(range, &self.ranges));
    }
}

/// Every `Pages` of a file, a dma-buf or another process alive in the
/// process, so the number of pins on a page can be counted (what Linux reads
/// from `struct page`'s refcount). Registering is on those maps' path, so each
/// thread enters its `Pages` in a shard of its own: an uncontended lock and a
/// free slot, neither a global lock nor (once the shard has grown) an
/// allocation. Counting, a test's question, walks every shard.
///
/// User pages, which one-page maps make and drop at the highest rate, are
/// not entered: a count finds them through what holds them (see `Holder`),
/// so making, pooling and reusing them takes no lock and no weak reference.
#[derive(Default)]
struct Shard(Mutex<Slots>);

#[derive(Default)]
struct Slots {
    live: Vec<Weak<Pages>>,
    /// Indexes of `live` whose `Pages` is gone.
    free: Vec<u32>,
}

thread_local! {
    /// User pages unmapped by this thread with no other holder, kept for its
    /// next maps: a one-page map then neither allocates nor frees its `Pages`.
    static POOL: RefCell<Vec<Arc<Pages>>> = const { RefCell::new(Vec::new()) };
}

/// Most `Pages` a thread keeps for reuse.
const POOL_MAX: usize = 512;

/// Every shard ever made; they live as long as the process.
static SHARDS: Mutex<Vec<&'static Shard>> = Mutex::new(Vec::new());
/// Shards of threads that exited, for new threads to take over, so threads
/// coming and going do not add shards.
static SPARE: Mutex<Vec<&'static Shard>> = Mutex::new(Vec::new());
/// For `Pages` made while a thread's own shard is already gone (in a
/// thread-local destructor).
static LATE: Shard = Shard(Mutex::new(Slots { live: Vec::new(), free: Vec::new() }));

struct ThreadShard(&'static Shard);

impl Drop for ThreadShard {
    fn drop(&mut self) {
        SPARE.lock().push(self.0);
    }
}

thread_local! {
    static SHARD: ThreadShard = ThreadShard(SPARE.lock().pop().unwrap_or_else(|| {
        let shard: &'static Shard = Box::leak(Box::default());
        SHARDS.lock().push(shard);
        shard
    }));
}

/// A `Pages`'s place in the registry: its shard and slot.
type LiveKey = (&'static Shard, u32);

impl std::fmt::Debug for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Shard")
    }
}

fn register(mut pages: Pages) -> Arc<Pages> {
    let shard = SHARD.try_with(|s| s.0).unwrap_or(&LATE);
    let mut slots = shard.0.lock();
    let slot = match slots.free.pop() {
        Some(i) => i,
        None => {
            slots.live.push(Weak::new());
            u32::try_from(slots.live.len() - 1).expect("fewer than 2^32 live pages per shard")
        }
    };
    pages.live = Some((shard, slot));
    let arc = Arc::new(pages);
    slots.live[slot as usize] = Arc::downgrade(&arc);
    arc
}

impl Slots {
    /// Frees registry entry `slot` for the next `Pages`.
    fn vacate(&mut self, slot: u32) {
        self.live[slot as usize] = Weak::new();
        self.free.push(slot);
    }
}

fn unregister((shard, slot): LiveKey) {
    shard.0.lock().vacate(slot);
}

/// Lets go of `pages`, an area's once it is unmapped and unpinned: when
/// nothing else holds them (no other area, copy or access), user pages go to
/// this thread's pool for its next map instead of being freed.
pub(crate) fn recycle(mut pages: Arc<Pages>) {
    if alone(&mut pages).is_none() {
        return;
    }
    let _ = POOL.try_with(move |pool| {
        if let Ok(mut pool) = pool.try_borrow_mut()
            && pool.len() < POOL_MAX
        {
            pool.push(pages);
        }
    });
}

/// User pages that nothing else refers to, to change in place: what
/// `Arc::get_mut` gives, without the read-modify-write it pays to keep a
/// weak reference from being upgraded meanwhile. User pages are in no
/// registry, so no weak reference to them is made (but by a test, in the
/// thread that asks): with no other strong one, none can appear.
fn alone(pages: &mut Arc<Pages>) -> Option<&mut Pages> {
    let user = matches!(pages.backing, Backing::User) && pages.live.is_none();
    if !user || Arc::strong_count(pages) != 1 || Arc::weak_count(pages) != 0 {
        return None;
    }
    // Orders this thread's uses after those of the holder that dropped the
    // last other reference (its decrement is a release).
    fence(Ordering::Acquire);
    // SAFETY: the one `Arc` left is `pages`, borrowed mutably for as long as
    // the result lives, and no `Weak` exists nor can be made but from it; so
    // no other thread can reach the value meanwhile. The pointer comes from
    // the `Arc`'s own allocation, as `Arc::get_mut`'s does.
    Some(unsafe { &mut *Arc::as_ptr(pages).cast_mut() })
}

/// What holds user pages while they are pinned: a context's IOASes, whose
/// areas are the only place user pages are pinned from (accesses and HW
/// queues pin through them). A count of user pages walks the holders.
pub(crate) trait Holder: Send + Sync {
    /// `f` on every `Pages` held (the same one once per area using it).
    fn each_pages(&self, f: &mut dyn FnMut(&Pages));
}

static HOLDERS: Mutex<Vec<Weak<dyn Holder>>> = Mutex::new(Vec::new());

/// Counts the user pages `holder` holds from now on, while it lives.
pub(crate) fn hold(holder: Weak<dyn Holder>) {
    let mut holders = HOLDERS.lock();
    holders.retain(|h| h.strong_count() > 0);
    holders.push(holder);
}

/// `f` on every `Pages` alive that a count can see, each once: the
/// registered ones, and user pages through their holders (under the lock of
/// the IOAS holding them, which their unmap takes).
fn each_live(f: &mut dyn FnMut(&Pages)) {
    for p in registered() {
        f(&p);
    }
    let holders: Vec<Arc<dyn Holder>> = HOLDERS.lock().iter().filter_map(Weak::upgrade).collect();
    let mut seen = std::collections::HashSet::new();
    for h in holders {
        h.each_pages(&mut |p| {
            if p.live.is_none() && seen.insert(std::ptr::from_ref(p)) {
                f(p);
            }
        });
    }
}

/// Every registered `Pages` alive now. Upgraded under each shard's lock and
/// dropped by the caller after it: a last reference dropped here removes its
/// own entry, taking that lock.
fn registered() -> Vec<Arc<Pages>> {
    let shards: Vec<&'static Shard> = SHARDS.lock().iter().copied().chain([&LATE]).collect();
    let mut live = Vec::new();
    for shard in shards {
        live.extend(shard.0.lock().live.iter().filter_map(Weak::upgrade));
    }
    live
}

/// How many `Pages` hold the user page at `addr` pinned: each pins it once,
/// however many areas and domains use it.
pub fn pin_count(addr: u64) -> u32 {
    pin_count_in(None, addr)
}

/// `pin_count` of the page at `addr` in process `pid` (`None`: this one).
pub fn pin_count_in(pid: Option<i32>, addr: u64) -> u32 {
    let page = addr & !(PAGE_SIZE - 1);
    let whose = |p: &Pages| match (&p.backing, pid) {
        (Backing::User, None) => true,
        (Backing::Remote { pid: theirs, .. }, Some(pid)) => *theirs == pid,
        _ => false,
    };
    let mut n = 0;
    each_live(&mut |p| {
        if whose(p) && page >= p.base && page < p.base + p.npages * PAGE_SIZE {
            let index = (page - p.base) / PAGE_SIZE;
            n += u32::from(p.pins.lock().ranges.iter().any(|r| r.start <= index && index <= r.last));
        }
    });
    n
}

/// How many `Pages` of a file hold pinned the page that `addr` maps, when
/// `addr` is in a shared mapping of that file (a program's own mapping of a
/// memfd it mapped with `IOMMU_IOAS_MAP_FILE`); `map` is a snapshot of the
/// process's mappings taken since those pages were made.
pub fn file_pin_count(map: &PageMap, addr: u64) -> u32 {
    file_pin_count_in(map, map, addr)
}

/// `file_pin_count` of an address of another process, whose mappings are
/// `theirs` (ours, where the files' pages are mapped, are `ours`).
pub fn file_pin_count_in(theirs: &PageMap, ours: &PageMap, addr: u64) -> u32 {
    let Some((dev, ino, off)) = theirs.object_at(addr & !(PAGE_SIZE - 1)) else { return 0 };
    registered()
        .iter()
        .filter(|p| matches!(p.backing, Backing::File(_)))
        .filter(|p| {
            let Some((d, i, first)) = ours.object_at(p.base) else { return false };
            let Some(index) = off.checked_sub(first).map(|o| o / PAGE_SIZE) else { return false };
            d == dev && i == ino && index < p.npages && {
                let pins = p.pins.lock();
                pins.ranges.iter().any(|r| r.start <= index && index <= r.last)
            }
        })
        .count() as u32
}

/// Where host address `host` (of a page table, standing for a client's
/// memory) is in that client: `(pid, address)`.
pub fn origin(host: u64) -> Option<(i32, u64)> {
    registered().iter().find_map(|p| {
        let Backing::Remote { pid, reach, .. } = &p.backing else { return None };
        let start = match reach.get()? {
            Reach::Mapped(map) => map.addr(),
            Reach::Live { window } => window.addr(),
            _ => return None,
        };
        let off = host.checked_sub(start).filter(|&o| o < p.npages * PAGE_SIZE)?;
        Some((*pid, p.base + off))
    })
}

impl Pages {
    /// Pages of the user address range `[uptr, uptr + length)`; returns them
    /// and the byte offset of `uptr` inside them. Inlined: returned through
    /// memory, the pages and offset were read back with one 16-byte load
    /// that straddled the two 8-byte stores writing them, and waited for
    /// both (a failed store forwarding, about 5 ns of a one-page map).
    #[inline(always)]
    pub(crate) fn user(
        uptr: u64,
        length: u64,
        writable: bool,
        trust: Trust,
        accounting: &Accounting,
    ) -> Result<(Arc<Pages>, u64)> {
        let (base, npages, lead) = Self::span(uptr, length)?;
        let reuse = |mut kept: Arc<Pages>| {
            // Pooled pages are unpinned user pages held nowhere else (see
            // `recycle`): only what differs between user pages is set.
            let p = alone(&mut kept)?;
            (p.base, p.npages, p.writable, p.trust) = (base, npages, writable, trust);
            let pins = p.pins.get_mut();
            if !pins.ranges.is_empty() {
                debug_assert!(false, "pooled pages are pinned");
                return None;
            }
            if !pins.accounting.same_as(accounting) {
                pins.accounting = accounting.clone();
            }
            Some(kept)
        };
        let pooled = POOL.try_with(|pool| pool.try_borrow_mut().ok()?.pop()).ok().flatten();
        let pages = pooled.and_then(reuse).unwrap_or_else(|| {
            let pins = PinState::new(accounting.clone());
            Arc::new(Pages { base, npages, writable, trust, backing: Backing::User, pins, live: None })
        });
        Ok((pages, lead))
    }

    /// The first page, the page count and the offset of `uptr` in the
    /// first page of `[uptr, uptr + length)`.
    #[inline]
    fn span(uptr: u64, length: u64) -> Result<(u64, u64, u64)> {
        if length == 0 || length > u64::MAX - PAGE_SIZE {
            return Err(Error::Invalid("length is zero or too large"));
        }
        uptr.checked_add(length).ok_or(Error::Overflow("user_va + length wraps"))?;
        crate::inject::check("pages")?;
        let base = uptr & !(PAGE_SIZE - 1);
        let lead = uptr - base;
        Ok((base, (length + lead).div_ceil(PAGE_SIZE), lead))
    }

    /// Pages holding `[uptr, uptr + length)` of some address space, and the
    /// offset of `uptr` in them.
    fn of_range(
        uptr: u64,
        length: u64,
        writable: bool,
        trust: Trust,
        backing: Backing,
        accounting: Accounting,
    ) -> Result<(Pages, u64)> {
        let (base, npages, lead) = Self::span(uptr, length)?;
        Ok((Pages { base, npages, writable, trust, backing, pins: PinState::new(accounting), live: None }, lead))
    }

    /// Pages of `[uptr, uptr + length)` in process `pid`'s memory, taken as
    /// they are pinned (EFAULT then if they, or the process, are gone).
    pub(crate) fn remote(
        pid: i32,
        client: bool,
        uptr: u64,
        length: u64,
        writable: bool,
        accounting: Accounting,
    ) -> Result<(Arc<Pages>, u64)> {
        let backing = Backing::Remote { pid, client, reach: OnceLock::new() };
        let (pages, lead) = Self::of_range(uptr, length, writable, Trust::Direct, backing, accounting)?;
        Ok((register(pages), lead))
    }

    /// How another process's pages are reached, decided once: shared memory
    /// both processes map is used in place; anything else gets room for a
    /// copy (address space only, until pages are taken).
    fn reach(&self) -> Result<Option<(i32, &Reach)>> {
        let Backing::Remote { pid, client, reach } = &self.backing else { return Ok(None) };
        if reach.get().is_none() {
            let len = self.npages * PAGE_SIZE;
            let window = || usize::try_from(len).map_err(|_| Error::NoMemory("too large"));
            let r = if *client {
                match memory::map_process_shared(*pid, self.base, len, self.writable) {
                    Some(map) => Reach::Mapped(map),
                    None => Reach::Live { window: HostBuffer::window(window()?)? },
                }
            } else if memory::shared_with(*pid, self.base, len) {
                Reach::Shared
            } else {
                let copy = HostBuffer::sparse(usize::try_from(len).map_err(|_| Error::NoMemory("too large"))?)?;
                Reach::Private { copy, taken: Mutex::new(Vec::new()) }
            };
            // A racing first use may have won; both saw the same memory.
            let _ = reach.set(r);
        }
        Ok(reach.get().map(|r| (*pid, r)))
    }

    /// Takes the pages `range` (page indexes) of another process's private
    /// memory that are not ours yet; a no-op for every other kind of pages.
    fn take(&self, range: IovaRange) -> Result<()> {
        let Some((pid, reach)) = self.reach()? else { return Ok(()) };
        let (copy, taken) = match reach {
            Reach::Private { copy, taken } => (copy, taken),
            // Held in the client as long as it keeps them mapped: pinning
            // checks that they are, as Linux's pin does.
            Reach::Live { .. } => {
                let (at, len) = (range.start * PAGE_SIZE, range.len() * PAGE_SIZE);
                return memory::process_mapped(pid, self.base + at, len, self.writable);
            }
            _ => return Ok(()),
        };
        let mut taken = taken.lock();
        for hole in iova::holes(&taken, range) {
            let (at, len) = (hole.start * PAGE_SIZE, hole.len() * PAGE_SIZE);
            memory::take_process(pid, self.base + at, len, copy.addr() + at, self.writable)?;
        }
        *taken = iova::union(taken.iter().copied().chain([range]));
        Ok(())
    }

    /// Copies between `buf` and bytes `[offset, offset + buf.len())` of these
    /// pages, as an access does: another process's memory not taken yet is
    /// read and written in that process, as Linux reaches unpinned pages
    /// through their mm.
    pub(crate) fn rw(&self, offset: u64, buf: &mut [u8], write: bool) -> Result<()> {
        let copy = |trust, host, buf: &mut [u8]| {
            if write { memory::write(trust, host, buf) } else { memory::read(trust, host, buf) }
        };
        let (pid, ours, taken) = match self.reach()? {
            Some((pid, Reach::Private { copy: ours, taken })) => (pid, ours, taken),
            Some((pid, Reach::Live { .. })) => {
                let at = self.base + offset;
                return if write { memory::write_process(pid, at, buf) } else { memory::read_process(pid, at, buf) };
            }
            _ => return copy(self.trust(), self.host_addr(offset), buf),
        };
        let taken = taken.lock();
        let mut done = 0;
        while done < buf.len() {
            let at = offset + done as u64;
            let page = at / PAGE_SIZE;
            let n = (buf.len() - done).min((PAGE_SIZE - at % PAGE_SIZE) as usize);
            let chunk = &mut buf[done..done + n];
            if taken.iter().any(|r| r.start <= page && page <= r.last) {
                copy(Trust::Direct, ours.addr() + at, chunk)?;
            } else if write {
                memory::write_process(pid, self.base + at, chunk)?;
            } else {
                memory::read_process(pid, self.base + at, chunk)?;
            }
            done += n;
        }
        Ok(())
    }

    /// Pages of `[start, start + length)` of a file, mapped by the engine.
    pub(crate) fn file(
        fd: BorrowedFd<'_>,
        start: u64,
        length: u64,
        writable: bool,
        accounting: Accounting,
    ) -> Result<(Arc<Pages>, u64)> {
        let (pages, lead) = Self::of_file(fd, start, length, writable, accounting)?;
        Ok((register(pages), lead))
    }

    fn of_file(
        fd: BorrowedFd<'_>,
        start: u64,
        length: u64,
        writable: bool,
        accounting: Accounting,
    ) -> Result<(Pages, u64)> {
        if length == 0 || length > u64::MAX - PAGE_SIZE {
            return Err(Error::Invalid("length is zero or too large"));
        }
        crate::inject::check("pages")?;
        let map = FileMapping::new(fd, start, length, writable)?;
        let lead = start % PAGE_SIZE;
        let pages = Pages {
            base: map.addr() - lead,
            npages: (length + lead).div_ceil(PAGE_SIZE),
            writable,
            // The engine's own mapping stays, but the file under it may
            // shrink: its pages past the new end then raise SIGBUS, which
            // the checked copy turns into EFAULT.
            trust: Trust::Checked,
            backing: Backing::File(map),
            pins: PinState::new(accounting),
            live: None,
        };
        Ok((pages, lead))
    }

    /// Pages of `[start, start + length)` of a dma-buf whose memory is the
    /// file `fd`: not charged (Linux charges no dma-buf), and revocable.
    pub(crate) fn dmabuf(fd: BorrowedFd<'_>, start: u64, length: u64, writable: bool) -> Result<(Arc<Pages>, u64)> {
        let (mut pages, lead) = Self::of_file(fd, start, length, writable, Accounting::none())?;
        let Backing::File(map) = std::mem::replace(&mut pages.backing, Backing::User) else {
            unreachable!("file pages have a file mapping")
        };
        pages.backing = Backing::Dmabuf(map);
        Ok((Arc::new(pages), lead))
    }

    /// Revokes a dma-buf's pages: from now on DMA and accesses through
    /// them fail (`EFAULT`, a DMA fault), whatever maps them.
    pub fn revoke(&self) {
        if let Backing::Dmabuf(map) = &self.backing {
            map.revoke();
        }
    }

    pub(crate) fn writable(&self) -> bool {
        self.writable
    }

    pub(crate) fn trust(&self) -> Trust {
        match &self.backing {
            Backing::Remote { reach, .. }
                if matches!(reach.get(), Some(Reach::Shared | Reach::Mapped(_) | Reach::Live { .. })) =>
            {
                Trust::Checked
            }
            _ => self.trust,
        }
    }

    pub(crate) fn is_file(&self) -> bool {
        matches!(self.backing, Backing::File(_))
    }

    /// Host address of byte `offset` of these pages (for another process's
    /// pages not yet taken, where they are in that process).
    pub(crate) fn host_addr(&self, offset: u64) -> u64 {
        match &self.backing {
            Backing::Remote { reach, .. } => match reach.get() {
                Some(Reach::Private { copy, .. }) => copy.addr() + offset,
                Some(Reach::Mapped(map)) => map.addr() + offset,
                Some(Reach::Live { window }) => window.addr() + offset,
                _ => self.base + offset,
            },
            _ => self.base + offset,
        }
    }

    /// Pins the pages holding bytes `[offset, offset + len)`: checks that
    /// untrusted memory is mapped and charges the pages not already pinned.
    pub(crate) fn pin(&self, offset: u64, len: u64) -> Result<()> {
        let range = self.page_range(offset, len);
        self.pins.lock().pin(range, || {
            self.take(range)?;
            if self.trust == Trust::Checked {
                memory::check_mapped(self.host_addr(offset), len)?;
            }
            Ok(())
        })
    }

    /// `pin` of pages only `pages` refers to (a new mapping's user pages),
    /// without taking their lock: nobody else can reach them.
    pub(crate) fn pin_alone(pages: &mut Arc<Pages>, offset: u64, len: u64) -> Result<()> {
        match alone(pages) {
            Some(p) => {
                let (range, host, checked) = (p.page_range(offset, len), p.base + offset, p.trust == Trust::Checked);
                p.pins.get_mut().pin(range, || if checked { memory::check_mapped(host, len) } else { Ok(()) })
            }
            _ => pages.pin(offset, len),
        }
    }

    /// Undoes one `pin` of the same bytes.
    pub(crate) fn unpin(&self, offset: u64, len: u64) {
        self.pins.lock().unpin(self.page_range(offset, len));
    }

    /// `unpin` of pages only `pages` refers to (an unmapped area's), without
    /// taking their lock.
    pub(crate) fn unpin_alone(pages: &mut Arc<Pages>, offset: u64, len: u64) {
        let range = pages.page_range(offset, len);
        match alone(pages) {
            Some(p) => p.pins.get_mut().unpin(range),
            None => pages.pins.lock().unpin(range),
        }
    }

    /// Number of distinct pages pinned now.
    #[cfg(test)]
    pub(crate) fn pinned(&self) -> u64 {
        pinned_pages(self.pins.lock().ranges.iter().copied())
    }

    /// Moves the charge for these pages to process `pid` (`None`: this
    /// one), as `IOMMU_IOAS_CHANGE_PROCESS` does: charged there first
    /// (`ENOMEM` past its limit, nothing moved), then uncharged here.
    /// Returns the accounting left, for `restore_accounting`; `None` when
    /// nothing had to move.
    pub(crate) fn change_process(&self, pid: Option<i32>) -> Result<Option<Accounting>> {
        let mut pins = self.pins.lock();
        let Some(new) = pins.accounting.moved_to(pid) else { return Ok(None) };
        let n = pinned_pages(pins.ranges.iter().copied());
        if n > 0 {
            new.charge(n)?;
            pins.accounting.uncharge(n);
        }
        Ok(Some(std::mem::replace(&mut pins.accounting, new)))
    }

    /// Undoes a `change_process` that returned `old`.
    pub(crate) fn restore_accounting(&self, old: Accounting) {
        let mut pins = self.pins.lock();
        let n = pinned_pages(pins.ranges.iter().copied());
        pins.accounting.uncharge(n);
        old.recharge(n);
        pins.accounting = old;
    }

    fn page_range(&self, offset: u64, len: u64) -> IovaRange {
        let first = offset / PAGE_SIZE;
        let last = (offset + len - 1) / PAGE_SIZE;
        debug_assert!(last < self.npages);
        IovaRange::new(first, last)
    }
}

fn pinned_pages(ranges: impl IntoIterator<Item = IovaRange>) -> u64 {
    iova::union(ranges).iter().map(IovaRange::len).sum()
}

/// Pages of `range` that no range of `pins` holds: what pinning it adds,
/// or what unpinning it (once out of `pins`) lets go. Without an overlap,
/// which is the common case, that is all of it, and no union is built.
fn only_in(range: IovaRange, pins: &[IovaRange]) -> u64 {
    if !pins.iter().any(|r| r.overlaps(&range)) {
        return range.len();
    }
    pinned_pages(pins.iter().copied().chain([range])) - pinned_pages(pins.iter().copied())
}

impl Drop for Pages {
    fn drop(&mut self) {
        if let Some(key) = self.live {
            unregister(key);
        }
        let pins = self.pins.get_mut();
        debug_assert!(pins.ranges.is_empty(), "pages dropped while pinned");
        // Unpinned pages (every unmapped area's) have nothing to give back.
        if !pins.ranges.is_empty() {
            let n = pinned_pages(pins.ranges.drain(..));
            pins.accounting.uncharge(n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::account::Limit;

    /// Held by the tests that count live pages or references to them: a
    /// count upgrades every registered `Pages` and every holder for a
    /// moment, so one running beside them would keep their pages or holders
    /// alive, or held elsewhere, while they look.
    fn counting_alone() -> std::sync::MutexGuard<'static, ()> {
        static ALONE: std::sync::Mutex<()> = std::sync::Mutex::new(());
        ALONE.lock().unwrap_or_else(|e| e.into_inner())
    }

    #[test]
    fn overlapping_pins_are_charged_once() {
        let acct = Accounting::isolated(Limit::Pages(100));
        let buf = vec![0u8; 10 * PAGE_SIZE as usize];
        let (p, lead) = Pages::user(buf.as_ptr() as u64, buf.len() as u64, true, Trust::Checked, &acct).unwrap();
        p.pin(lead, 4 * PAGE_SIZE).unwrap();
        p.pin(lead + 2 * PAGE_SIZE, 4 * PAGE_SIZE).unwrap();
        assert_eq!(p.pinned(), 6 + u64::from(lead != 0));
        assert_eq!(acct.charged(), p.pinned());
        p.unpin(lead, 4 * PAGE_SIZE);
        p.unpin(lead + 2 * PAGE_SIZE, 4 * PAGE_SIZE);
        assert_eq!(acct.charged(), 0);
    }

    #[test]
    fn charges_follow_the_union_of_pins_in_any_order() {
        let acct = Accounting::isolated(Limit::Pages(100));
        let buf = crate::memory::HostBuffer::new(16 * PAGE_SIZE as usize).unwrap();
        let (p, _) = Pages::user(buf.addr(), 16 * PAGE_SIZE, true, Trust::Direct, &acct).unwrap();
        let pins = [(0, 4), (2, 4), (8, 2), (10, 1), (0, 16), (3, 1)];
        for (at, n) in pins {
            p.pin(at * PAGE_SIZE, n * PAGE_SIZE).unwrap();
            assert_eq!(acct.charged(), p.pinned());
        }
        for (at, n) in [(2, 4), (0, 16), (10, 1), (0, 4), (3, 1), (8, 2)] {
            p.unpin(at * PAGE_SIZE, n * PAGE_SIZE);
            assert_eq!(acct.charged(), p.pinned());
        }
        assert_eq!(acct.charged(), 0);
    }

    /// A holder of user pages for a test, as an IOAS's areas are.
    struct Held(Mutex<Vec<Arc<Pages>>>);

    impl Holder for Held {
        fn each_pages(&self, f: &mut dyn FnMut(&Pages)) {
            self.0.lock().iter().for_each(|p| f(p));
        }
    }

    fn held(pages: &[&Arc<Pages>]) -> Arc<Held> {
        let h = Arc::new(Held(Mutex::new(pages.iter().map(|p| Arc::clone(p)).collect())));
        hold(Arc::downgrade(&h) as Weak<dyn Holder>);
        h
    }

    #[test]
    fn pin_count_counts_each_pages_object_once() {
        let _alone = counting_alone();
        let buf = crate::memory::HostBuffer::new(4 * PAGE_SIZE as usize).unwrap();
        let (a, _) = Pages::user(buf.addr(), 4 * PAGE_SIZE, true, Trust::Direct, &Accounting::none()).unwrap();
        let (b, _) = Pages::user(buf.addr() + PAGE_SIZE, PAGE_SIZE, true, Trust::Direct, &Accounting::none()).unwrap();
        // `a` twice, as two areas of a copy hold it.
        let _held = held(&[&a, &b, &a]);
        assert_eq!(pin_count(buf.addr() + PAGE_SIZE), 0);
        a.pin(0, 2 * PAGE_SIZE).unwrap();
        a.pin(PAGE_SIZE, PAGE_SIZE).unwrap();
        b.pin(0, PAGE_SIZE).unwrap();
        assert_eq!(pin_count(buf.addr() + PAGE_SIZE + 5), 2);
        assert_eq!(pin_count(buf.addr()), 1);
        assert_eq!(pin_count(buf.addr() + 3 * PAGE_SIZE), 0);
        a.unpin(0, 2 * PAGE_SIZE);
        a.unpin(PAGE_SIZE, PAGE_SIZE);
        b.unpin(0, PAGE_SIZE);
        assert_eq!(pin_count(buf.addr() + PAGE_SIZE), 0);
    }

    #[test]
    fn user_pages_are_counted_only_while_something_holds_them() {
        let _alone = counting_alone();
        let buf = crate::memory::HostBuffer::new(PAGE_SIZE as usize).unwrap();
        let (p, _) = Pages::user(buf.addr(), PAGE_SIZE, true, Trust::Direct, &Accounting::none()).unwrap();
        p.pin(0, PAGE_SIZE).unwrap();
        let h = held(&[&p]);
        assert_eq!(pin_count(buf.addr()), 1);
        // A count on another thread may hold it for a moment.
        let gone = Arc::downgrade(&h);
        drop(h);
        while gone.strong_count() > 0 {
            std::thread::yield_now();
        }
        assert_eq!(pin_count(buf.addr()), 0, "a holder gone is not walked");
        p.unpin(0, PAGE_SIZE);
    }

    #[test]
    fn registering_pages_does_not_walk_every_live_one() {
        let _alone = counting_alone();
        // Far from any memory of this process: never touched, only counted.
        const BASE: u64 = 0x6000_0000_0000;
        const N: u64 = 100_000;
        let ours = || registered().iter().filter(|p| (BASE..BASE + N * PAGE_SIZE).contains(&p.base)).count();
        let remote = |i| {
            let backing = Backing::Remote { pid: -1, client: false, reach: OnceLock::new() };
            let (p, _) =
                Pages::of_range(BASE + i * PAGE_SIZE, PAGE_SIZE, true, Trust::Direct, backing, Accounting::none())
                    .unwrap();
            register(p)
        };
        let start = std::time::Instant::now();
        let pages: Vec<Arc<Pages>> = (0..N).map(remote).collect();
        let took = start.elapsed();
        // With a walk of the live ones per registration this took 77 s here.
        assert!(took < std::time::Duration::from_secs(2), "{N} registrations took {took:?}");
        assert_eq!(ours(), N as usize);
        drop(pages);
        assert_eq!(ours(), 0, "each leaves with its pages");
    }

    #[test]
    fn recycled_pages_are_reused_only_when_nothing_else_holds_them() {
        let _alone = counting_alone();
        let buf = crate::memory::HostBuffer::new(4 * PAGE_SIZE as usize).unwrap();
        let acct = Accounting::isolated(Limit::Pages(100));
        let user = |at: u64| Pages::user(buf.addr() + at * PAGE_SIZE, PAGE_SIZE, true, Trust::Direct, &acct);
        let (a, _) = user(0).unwrap();
        let held = a.clone();
        recycle(a);
        let (b, _) = user(1).unwrap();
        assert!(!Arc::ptr_eq(&held, &b), "pages another holder keeps are not reused");
        assert_eq!(Arc::strong_count(&held), 1);
        let weak = Arc::downgrade(&b);
        let (old, kept) = (Arc::as_ptr(&b), b.clone());
        drop(b);
        recycle(kept);
        let (c, _) = user(2).unwrap();
        assert!(!std::ptr::eq(Arc::as_ptr(&c), old), "nor pages a weak reference can reach");
        drop(weak);
        let old = Arc::as_ptr(&c);
        recycle(c);
        let (d, _) = user(3).unwrap();
        assert_eq!(Arc::as_ptr(&d), old, "unmapped pages are reused");
        assert_eq!((d.base, d.npages), (buf.addr() + 3 * PAGE_SIZE, 1));
        let _held = held_pages(&d);
        d.pin(0, PAGE_SIZE).unwrap();
        assert_eq!(pin_count(buf.addr() + 3 * PAGE_SIZE), 1, "reused pages are counted where they are now");
        assert_eq!(pin_count(buf.addr() + 2 * PAGE_SIZE), 0);
        assert_eq!(acct.charged(), 1);
        d.unpin(0, PAGE_SIZE);
        assert_eq!(acct.charged(), 0);
    }

    fn held_pages(p: &Arc<Pages>) -> Arc<Held> {
        held(&[p])
    }

    #[test]
    fn counting_races_maps_and_unmaps() {
        let _alone = counting_alone();
        // A count walks an IOAS's areas while a thread maps and unmaps (and
        // recycles) one page in it: it sees the page pinned once or not at all.
        use std::sync::atomic::{AtomicBool, AtomicU32, Ordering::Relaxed};
        let buf = crate::memory::HostBuffer::new(PAGE_SIZE as usize).unwrap();
        let addr = buf.addr();
        let ctx = crate::Context::with_config(crate::ContextConfig::isolated(Limit::Pages(100)));
        let ioas = ctx.ioas_alloc().unwrap();
        let dev = ctx.bind_device(crate::DeviceInfo::new("count", 1)).unwrap();
        ctx.attach(dev, ioas).unwrap();
        let (stop, counts, seen) = (AtomicBool::new(false), AtomicU32::new(0), AtomicU32::new(0));
        std::thread::scope(|s| {
            s.spawn(|| {
                while !stop.load(Relaxed) {
                    let n = pin_count(addr);
                    assert!(n <= 1);
                    seen.fetch_add(n, Relaxed);
                    counts.fetch_add(1, Relaxed);
                }
            });
            // Stops the counting thread however this one ends, a panic too.
            struct Stop<'a>(&'a AtomicBool);
            impl Drop for Stop<'_> {
                fn drop(&mut self) {
                    self.0.store(true, Relaxed);
                }
            }
            let _stop = Stop(&stop);
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
            while (counts.load(Relaxed) < 10_000 || seen.load(Relaxed) == 0) && std::time::Instant::now() < deadline {
                // SAFETY: `buf` outlives the context.
                unsafe { ctx.map_user(ioas, addr, PAGE_SIZE, Some(1 << 20), crate::Perm::RW).unwrap() };
                ctx.unmap(ioas, 1 << 20, PAGE_SIZE).unwrap();
            }
        });
        assert!(seen.load(Relaxed) > 0, "no count saw the mapped page");
        assert_eq!(pin_count(addr), 0);
    }

    #[test]
    fn pins_of_pages_held_alone_or_shared_charge_the_same() {
        let acct = Accounting::isolated(Limit::Pages(3));
        let buf = crate::memory::HostBuffer::new(4 * PAGE_SIZE as usize).unwrap();
        let (mut p, _) = Pages::user(buf.addr(), 4 * PAGE_SIZE, true, Trust::Checked, &acct).unwrap();
        Pages::pin_alone(&mut p, 0, 2 * PAGE_SIZE).unwrap();
        assert_eq!(acct.charged(), 2);
        // Shared now (a copy's area): the same pin, through the lock.
        let mut copy = p.clone();
        Pages::pin_alone(&mut copy, PAGE_SIZE, 2 * PAGE_SIZE).unwrap();
        assert_eq!((acct.charged(), p.pinned()), (3, 3));
        assert!(matches!(Pages::pin_alone(&mut copy, 3 * PAGE_SIZE, PAGE_SIZE), Err(Error::NoMemory(_))));
        Pages::unpin_alone(&mut copy, PAGE_SIZE, 2 * PAGE_SIZE);
        drop(copy);
        assert_eq!(acct.charged(), 2);
        Pages::unpin_alone(&mut p, 0, 2 * PAGE_SIZE);
        assert_eq!((acct.charged(), p.pinned()), (0, 0));
    }

    #[test]
    fn pin_over_the_limit_fails_and_charges_nothing() {
        let acct = Accounting::isolated(Limit::Pages(2));
        let buf = vec![0u8; 4 * PAGE_SIZE as usize];
        let (p, lead) = Pages::user(buf.as_ptr() as u64, buf.len() as u64, true, Trust::Direct, &acct).unwrap();
        assert!(matches!(p.pin(lead, buf.len() as u64), Err(Error::NoMemory(_))));
        assert_eq!(acct.charged(), 0);
        assert_eq!(p.pinned(), 0);
    }

    #[test]
    fn pinning_unmapped_user_memory_is_efault() {
        let (p, lead) = Pages::user(PAGE_SIZE, PAGE_SIZE, true, Trust::Checked, &Accounting::none()).unwrap();
        assert!(matches!(p.pin(lead, PAGE_SIZE), Err(Error::Fault(_))));
    }

    #[test]
    fn user_pages_reject_bad_lengths() {
        assert!(matches!(Pages::user(0, 0, true, Trust::Direct, &Accounting::none()), Err(Error::Invalid(_))));
        assert!(matches!(
            Pages::user(u64::MAX - 10, 100, true, Trust::Direct, &Accounting::none()),
            Err(Error::Overflow(_))
        ));
    }
}
