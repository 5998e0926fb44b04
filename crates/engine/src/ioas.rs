//! The I/O address space: IOVA → memory areas, the allowed and reserved
//! ranges that constrain them, and the domains that mirror them.
//!
//! All changes are serialised by one mutex per IOAS; translation never takes
//! it (it reads the domains' page tables).

use std::ops::Bound;
use std::sync::{Arc, Weak};

use crate::lock::{Lock, LockGuard};
use brie_tree::BTree;
use nonmax::NonMaxU64;
use slab::Slab;
use smallvec::SmallVec;

use crate::domain::Domain;
use crate::epoch;
use crate::error::{Error, Result};
use crate::iova::{self, IovaRange, PAGE_SIZE};
use crate::pages::Pages;
use crate::pgtable::Perm;

/// Who reserved a range of IOVA.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owner {
    /// Outside a domain's aperture (keyed by the domain's address).
    Domain(usize),
    /// A device's reserved region (keyed by the device's key).
    Device(u64),
    /// The same, for the device attached at a PASID.
    DevicePasid(u64, u32),
    /// Added by hand (the selftests' `add_reserved`).
    User,
}

/// Memory to place at consecutive IOVAs: part of a `Pages`.
#[derive(Clone)]
pub(crate) struct Source {
    pub pages: Arc<Pages>,
    /// Offset of the first byte in `pages`.
    pub start_byte: u64,
    /// Bytes from there.
    pub len: u64,
    /// Address that automatic IOVA allocation aligns to (user VA or file offset).
    pub align_hint: u64,
}

#[derive(Clone)]
struct Area {
    last: u64,
    src: Source,
    perm: Perm,
    /// Pinned because the IOAS has domains.
    pinned: bool,
    /// Pins held on this area by accesses; unmap waits for them to go.
    num_accesses: u32,
    /// Of those, pins held by objects that cannot let go on request (a HW
    /// queue reading guest memory): unmap is `EBUSY` while any remain.
    num_locks: u32,
    /// Being unmapped: accesses may not pin or copy through it.
    prevent_access: bool,
}

/// A mapping as reported to callers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AreaInfo {
    /// First IOVA of the mapping.
    pub iova: u64,
    /// Its length in bytes.
    pub len: u64,
    /// The rights it was mapped with.
    pub perm: Perm,
    /// Host address in this process of its first byte (for another
    /// process's memory not yet taken: the address in that process).
    pub host_addr: u64,
    /// Whether it maps a file (`IOMMU_IOAS_MAP_FILE`) rather than user
    /// memory.
    pub file: bool,
}

/// The areas by first IOVA. The tree holds each area's place in a slab
/// beside it, not the area: a map inserts a 4-byte value, and making room
/// in a node moves a few of them, where 56-byte areas made the nodes five
/// times as large and most of a one-page map's time was spent in them.
///
/// The tree is `brie_tree`'s B+ tree of integer keys, which searches a node
/// without a branch per key where std's `BTreeMap` compares its keys one by
/// one: entering an area past all the others (maps in IOVA order) took
/// about 26 ns in std's tree, 13 ns in this one, out of a 98 ns map. Its
/// removals cost about what std's do once the search that finds an area
/// also removes it (`take_first_in`). Its largest key is reserved, so an
/// area starting at the last IOVA (one byte long: nothing else can start
/// there) has a slot of its own, `top`.
#[derive(Default)]
struct Areas {
    by_iova: BTree<NonMaxU64, u32>,
    top: Option<u32>,
    /// The last IOVA any area holds: whether a new area lies past them all
    /// (maps placed in IOVA order, or IOVAs chosen from the bottom up) is
    /// then known without a search.
    end: Option<u64>,
    /// The areas, at the places `by_iova` and `top` name.
    table: Slab<Area>,
    /// No IOVA below it is free for automatic allocation: each one is
    /// mapped, reserved, or outside the allowed ranges or the allocation
    /// window. The allocator's search sets it to the first hole it meets,
    /// an area entered there raises it past the area, and anything that
    /// frees IOVAs lowers it, so programs that let ioasid choose IOVAs
    /// find a place without walking every area below it.
    free_from: u64,
}

impl Areas {
    fn at(&self, place: u32) -> &Area {
        &self.table[place as usize]
    }

    /// Where the area starting at `iova` would be: in the tree, or `top`.
    fn place(&self, iova: u64) -> Option<u32> {
        match NonMaxU64::new(iova) {
            Some(key) => self.by_iova.get(key).copied(),
            None => self.top,
        }
    }

    fn get(&self, iova: u64) -> Option<&Area> {
        self.place(iova).map(|p| self.at(p))
    }

    fn get_mut(&mut self, iova: u64) -> Option<&mut Area> {
        let p = self.place(iova)?;
        self.table.get_mut(p as usize)
    }

    fn insert(&mut self, iova: u64, area: Area) {
        if iova == self.free_from {
            self.free_from = area.last.saturating_add(1);
        }
        self.end = self.end.max(Some(area.last));
        let place = u32::try_from(self.table.insert(area)).expect("fewer than 2^32 areas");
        // Callers check for overlaps (or remove) before they insert.
        let old = match NonMaxU64::new(iova) {
            Some(key) => self.by_iova.insert(key, place),
            None => self.top.replace(place),
        };
        assert!(old.is_none(), "two areas start at one IOVA");
    }

    fn remove(&mut self, iova: u64) -> Option<Area> {
        let p = match NonMaxU64::new(iova) {
            Some(key) => self.by_iova.remove(key),
            None => self.top.take(),
        }?;
        Some(self.forget(iova, p))
    }

    /// The first area holding an IOVA of `r`, offered to `take` (which may
    /// change it): when `take` says so, the area leaves the table for the
    /// end of `taken`. Returns where the area starts and ends. One search
    /// finds and removes it, where `first_in` and then `remove` take two;
    /// and the area moves once, as moving it through the stack again and
    /// again stalled on store forwarding.
    fn take_first_in(
        &mut self,
        r: IovaRange,
        take: impl FnOnce(u64, &mut Area) -> bool,
        taken: &mut SmallVec<[Area; 1]>,
    ) -> Option<(u64, u64)> {
        let top = self.top_in(r);
        let mut cursor = match NonMaxU64::new(r.start) {
            Some(key) => self.by_iova.cursor_mut_at(Bound::Included(key)),
            None => self.by_iova.cursor_mut_at(Bound::Unbounded),
        };
        let (start, p) = seek_first_in(&mut cursor, r, &self.table).or(top)?;
        let area = &mut self.table[p as usize];
        let found = Some((start, area.last));
        if !take(start, area) {
            return found;
        }
        match start {
            u64::MAX => self.top = None,
            _ => _ = cursor.remove(),
        }
        taken.push(self.forget(start, p));
        found
    }

    /// Removes the area at `place`, which started at `iova`, from the slab
    /// once neither the tree nor `top` names it.
    fn forget(&mut self, iova: u64, place: u32) -> Area {
        self.free_from = self.free_from.min(iova);
        let area = self.table.remove(place as usize);
        if self.end == Some(area.last) {
            // Often the only area (one mapping, mapped and unmapped again).
            self.end = if self.table.is_empty() { None } else { self.last().map(|(_, a)| a.last) };
        }
        area
    }

    fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    /// IOVAs outside any area may have become free (a reserved range went,
    /// or the allowed ranges changed): the next search starts at the bottom.
    fn forget_free_from(&mut self) {
        self.free_from = 0;
    }

    /// The area that starts last at or below `iova`, with its start: as
    /// areas are disjoint, the only one that can hold `iova`.
    fn at_or_below(&self, iova: u64) -> Option<(u64, &Area)> {
        let mut cursor = match NonMaxU64::new(iova) {
            Some(key) => self.by_iova.cursor_at(Bound::Excluded(key)),
            None => match self.top {
                Some(p) => return Some((u64::MAX, self.at(p))),
                None => self.by_iova.cursor_at(Bound::Unbounded),
            },
        };
        if !cursor.prev() {
            return None;
        }
        cursor.entry().map(|(key, &p)| (key.get(), self.at(p)))
    }

    /// The area that starts highest.
    fn last(&self) -> Option<(u64, &Area)> {
        self.at_or_below(u64::MAX)
    }

    /// Whether an area holds an IOVA at or above `iova`.
    fn any_from(&self, iova: u64) -> bool {
        self.end.is_some_and(|end| end >= iova)
    }

    /// The first area holding an IOVA of `r`, with its start.
    fn first_in(&self, r: IovaRange) -> Option<(u64, &Area)> {
        let mut cursor = match NonMaxU64::new(r.start) {
            Some(key) => self.by_iova.cursor_at(Bound::Included(key)),
            None => self.by_iova.cursor_at(Bound::Unbounded),
        };
        let (start, p) = seek_first_in(&mut cursor, r, &self.table).or(self.top_in(r))?;
        Some((start, self.at(p)))
    }

    /// The area at the last IOVA, with its start and place, if `r` holds it.
    fn top_in(&self, r: IovaRange) -> Option<(u64, u32)> {
        self.top.filter(|_| r.last == u64::MAX).map(|p| (u64::MAX, p))
    }

    /// The areas that hold an IOVA at or above `iova`, as ranges.
    fn ranges_from(&self, iova: u64) -> impl Iterator<Item = IovaRange> {
        let first = if self.any_from(iova) { self.first_in(IovaRange::new(iova, u64::MAX)) } else { None };
        first.into_iter().flat_map(|(s, _)| self.starting_in(s, u64::MAX)).map(|(s, a)| IovaRange::new(s, a.last))
    }

    /// In IOVA order.
    fn iter(&self) -> impl Iterator<Item = (u64, &Area)> {
        self.starting_in(0, u64::MAX)
    }

    /// Areas starting in `[first, last]`, in IOVA order.
    fn starting_in(&self, first: u64, last: u64) -> impl Iterator<Item = (u64, &Area)> {
        // The tree's part ends before the last IOVA, which only `top` holds.
        let in_tree = NonMaxU64::new(first).zip(NonMaxU64::new(last.min(u64::MAX - 1))).filter(|(f, l)| f <= l);
        let tree = in_tree.into_iter().flat_map(|(f, l)| self.by_iova.range(f..=l));
        let top = self.top.filter(|_| last == u64::MAX).map(|p| (u64::MAX, self.at(p)));
        tree.map(|(key, &p)| (key.get(), self.at(p))).chain(top)
    }

    /// In IOVA order.
    fn keys(&self) -> impl Iterator<Item = u64> {
        self.iter().map(|(iova, _)| iova)
    }

    /// In no particular order.
    fn values(&self) -> impl Iterator<Item = &Area> {
        self.table.iter().map(|(_, a)| a)
    }

    /// In no particular order.
    fn values_mut(&mut self) -> impl Iterator<Item = &mut Area> {
        self.table.iter_mut().map(|(_, a)| a)
    }
}

/// What `seek_first_in` needs of brie-tree's two cursors, which have these
/// methods but no trait in common.
trait Seek {
    /// The start and place of the area at the cursor.
    fn here(&self) -> Option<(u64, u32)>;
    fn back(&mut self) -> bool;
    fn on(&mut self);
}

macro_rules! seek_for {
    ($($cursor:ty),*) => {$(
        impl Seek for $cursor {
            fn here(&self) -> Option<(u64, u32)> {
                self.entry().map(|(key, &p)| (key.get(), p))
            }
            fn back(&mut self) -> bool {
                self.prev()
            }
            fn on(&mut self) {
                self.next()
            }
        }
    )*};
}

seek_for!(brie_tree::Cursor<'_, NonMaxU64, u32>, brie_tree::CursorMut<'_, NonMaxU64, u32>);

/// Moves `cursor`, at the first area of the tree starting at or past
/// `r.start`, to the first holding an IOVA of `r`, and returns its start
/// and place (`None`: the tree has none in `r`, though `top` may). Unless
/// the area there starts at `r.start` (most unmaps), the one before may
/// hold `r.start`. One search for both, where a search down to the area
/// before and then one for the next took two.
fn seek_first_in(cursor: &mut impl Seek, r: IovaRange, table: &Slab<Area>) -> Option<(u64, u32)> {
    if cursor.here().is_none_or(|(start, _)| start != r.start)
        && cursor.back()
        && cursor.here().is_some_and(|(_, p)| table[p as usize].last < r.start)
    {
        cursor.on();
    }
    cursor.here().filter(|&(start, _)| start <= r.last)
}

impl std::ops::Index<u64> for Areas {
    type Output = Area;
    fn index(&self, iova: u64) -> &Area {
        self.get(iova).expect("an area starts there")
    }
}

#[derive(Default)]
struct Inner {
    areas: Areas,
    allowed: Vec<IovaRange>,
    reserved: Vec<(IovaRange, Owner)>,
    domains: Vec<Arc<Domain>>,
    /// Accesses attached here, with the IOVA alignment each needs.
    accesses: Vec<(Weak<dyn UnmapNotice>, u64)>,
    iova_alignment: u64,
    disable_large_pages: bool,
}

/// What an IOAS tells the in-engine users of its memory (accesses, in
/// `access`) before an unmap: let go of pins in the range, as Linux's
/// `iommufd_access_notify_unmap`. A trait so that the IOAS, below its
/// users, names none of them.
pub(crate) trait UnmapNotice: Send + Sync {
    /// `[iova, iova + len)` is about to be unmapped.
    fn notify_unmap(&self, iova: u64, len: u64);
}

/// An I/O address space (Linux's `iommufd_ioas`, `IOMMU_IOAS_ALLOC`): the
/// IOVA → memory mappings that every paging HWPT allocated on it mirrors, and
/// that accesses read through. Reached as `Arc<Ioas>` from
/// [`Context::get`](crate::Context::get); mapping and unmapping go through
/// the [`Context`](crate::Context) (which charges and pins the memory), the
/// queries and options here.
pub struct Ioas {
    inner: Lock<Inner>,
}

impl Default for Ioas {
    fn default() -> Self {
        Self::new()
    }
}

impl Ioas {
    /// An empty IOAS outside any context (contexts make theirs with
    /// [`Context::ioas_alloc`](crate::Context::ioas_alloc)): no mappings,
    /// every IOVA allowed, byte alignment.
    pub fn new() -> Self {
        Ioas { inner: Lock::new(Inner { iova_alignment: 1, ..Default::default() }) }
    }

    fn lock(&self) -> LockGuard<'_, Inner> {
        self.inner.lock()
    }

    /// `f` on the memory behind each area, under the IOAS's lock.
    pub(crate) fn each_pages(&self, f: &mut dyn FnMut(&Pages)) {
        self.lock().areas.values().for_each(|a| f(&a.src.pages));
    }

    /// Holds off every change to the areas (and to the domains that pin
    /// them) while the guard lives.
    pub(crate) fn lock_areas(&self) -> AreasLocked<'_> {
        AreasLocked(self.lock())
    }

    /// Maps `srcs` at consecutive IOVAs from `iova`, or from an IOVA chosen
    /// here when `iova` is `None`. Returns the IOVA used. Takes the sources
    /// (an array of one, for a map) so their pages move into the areas.
    /// Inlined into the map paths: a one-page map then spends about 2 ns
    /// less moving its source between frames.
    #[inline(always)]
    pub(crate) fn map<S>(&self, srcs: S, iova: Option<u64>, perm: Perm) -> Result<u64>
    where
        S: AsRef<[Source]> + IntoIterator<Item = Source>,
    {
        let total: u64 = srcs.as_ref().iter().map(|s| s.len).sum();
        crate::inject::check("area")?;
        let mut g = self.lock();
        if total == 0 || total & (g.iova_alignment - 1) != 0 {
            return Err(Error::Invalid("length is zero or not aligned to the IOVA alignment"));
        }
        let iova = match iova {
            None => g.alloc_iova(srcs.as_ref()[0].align_hint, total)?,
            Some(iova) => {
                g.check_iova(iova, total)?;
                iova
            }
        };
        for s in srcs.as_ref() {
            if perm.write && !s.pages.writable() {
                return Err(Error::Permission("memory is not writable"));
            }
            if (s.start_byte % PAGE_SIZE) & (g.iova_alignment - 1) != 0 {
                return Err(Error::Invalid("memory offset is not aligned to the IOVA alignment"));
            }
        }
        // Entered as they are filled: the lock keeps them unseen until all
        // are, and a failure takes back those before it.
        let mut cur = iova;
        for s in srcs {
            let len = s.len;
            let area = Area {
                last: cur + (len - 1),
                src: s,
                perm,
                pinned: false,
                num_accesses: 0,
                num_locks: 0,
                prevent_access: false,
            };
            if let Err(e) = g.fill_area(cur, area) {
                let guard = epoch::pin();
                let mut at = iova;
                while at < cur {
                    let a = g.areas.remove(at).expect("area entered above");
                    g.unfill_area(at, &a, &guard);
                    at = a.last + 1;
                }
                return Err(e);
            }
            // Past the last source this may wrap (a map ending at the last
            // IOVA), and is not used.
            cur = cur.wrapping_add(len);
        }
        Ok(iova)
    }

    /// The memory behind `[iova, iova + len)`, which must be mapped without a
    /// hole; for `IOMMU_IOAS_COPY`.
    pub(crate) fn sources(&self, iova: u64, len: u64) -> Result<Vec<Source>> {
        let range = IovaRange::from_len(iova, len)?;
        let g = self.lock();
        let parts = g.contig(range)?;
        Ok(parts
            .into_iter()
            .map(|(area, offset, len)| {
                let a = &g.areas[area].src;
                Source {
                    pages: a.pages.clone(),
                    start_byte: a.start_byte + offset,
                    len,
                    align_hint: a.align_hint + offset,
                }
            })
            .collect())
    }

    /// Unmaps every area inside `[first, last]`. Areas must lie wholly inside
    /// (`ENOENT` otherwise, after unmapping those before it, as Linux does).
    /// Accesses pinning an area are told to let go first. Returns the bytes
    /// unmapped; when it returns, no DMA reaches them.
    pub fn unmap(&self, range: IovaRange) -> (u64, Result<()>) {
        // Most unmaps take one area: no allocation for it.
        let mut removed: SmallVec<[Area; 1]> = SmallVec::new();
        let mut unmapped = 0u64;
        let mut cur = range.start;
        let mut tries = 0u32;
        let res = 'retry: loop {
            let mut g = self.lock();
            let guard = epoch::pin();
            loop {
                let (mut locked, mut splits) = (false, false);
                let within = IovaRange::new(cur, range.last);
                let mut take = false;
                let found = g.areas.take_first_in(
                    within,
                    |start, a| {
                        locked = a.num_locks > 0;
                        splits = start < range.start || a.last > range.last;
                        if !locked && !splits && a.num_accesses > 0 {
                            // Accesses let go of it once told; none may pin it again.
                            a.prevent_access = true;
                        }
                        take = !locked && !splits && a.num_accesses == 0;
                        take
                    },
                    &mut removed,
                );
                let Some((start, last)) = found else {
                    break 'retry Ok(());
                };
                if !take {
                    if locked {
                        break 'retry Err(Error::Busy("an object locks the area"));
                    }
                    if splits {
                        break 'retry Err(Error::NotFound("range would split a mapping"));
                    }
                    // An access pins it: told to let go, then the area is
                    // looked for again.
                    if start != cur {
                        tries = 0;
                    }
                    cur = start;
                    tries += 1;
                    if tries > 100 {
                        break 'retry Err(Error::Busy("an access keeps the range pinned"));
                    }
                    let accesses: Vec<Arc<dyn UnmapNotice>> =
                        g.accesses.iter().filter_map(|(w, _)| w.upgrade()).collect();
                    drop(guard);
                    drop(g);
                    for access in accesses {
                        access.notify_unmap(start, last - start + 1);
                    }
                    continue 'retry;
                }
                for d in &g.domains {
                    d.unmap(start, last - start + 1, &guard);
                }
                unmapped += last - start + 1;
                if last >= range.last {
                    break 'retry Ok(());
                }
                cur = last + 1;
            }
        };
        if !removed.is_empty() {
            epoch::synchronize();
        }
        for mut a in removed {
            if a.pinned {
                Pages::unpin_alone(&mut a.src.pages, a.src.start_byte, a.src.len);
            }
            crate::pages::recycle(a.src.pages);
        }
        (unmapped, res)
    }

    /// Unmaps everything (`IOMMU_IOAS_UNMAP` of the whole IOVA space, VFIO's
    /// `VFIO_DMA_UNMAP_FLAG_ALL`) as far as it can; returns the bytes
    /// unmapped. Areas an access will not let go of, or an object locks,
    /// stay mapped.
    pub fn unmap_all(&self) -> u64 {
        self.unmap(IovaRange::ALL).0
    }

    /// Splits the areas holding each of `iovas` so that one ends at it, as
    /// VFIO type1 compatibility needs for partial unmaps. Where a domain
    /// holds the area, splitting needs huge pages off (no leaf may straddle
    /// the cut); both halves keep sharing the memory and its pins.
    pub fn cut(&self, iovas: &[u64]) -> Result<()> {
        let mut g = self.lock();
        for &iova in iovas {
            let Some((start, a)) = g.areas.first_in(IovaRange::new(iova, iova)) else {
                continue;
            };
            if iova == start || iova == a.last {
                continue;
            }
            let new_start = iova + 1;
            let align = g.iova_alignment - 1;
            let rhs_byte = a.src.start_byte + (new_start - start);
            if new_start & align != 0 || rhs_byte & align != 0 {
                return Err(Error::Invalid("cut is not aligned to the IOVA alignment"));
            }
            if a.num_accesses > 0 {
                return Err(Error::Invalid("an access pins the area"));
            }
            if a.pinned && !g.disable_large_pages {
                return Err(Error::Invalid("cutting a mapped area needs huge pages disabled"));
            }
            let a = g.areas.remove(start).expect("area just found");
            let lhs_len = new_start - start;
            let lhs_src = Source { len: lhs_len, ..a.src.clone() };
            let rhs_src = Source {
                pages: a.src.pages.clone(),
                start_byte: rhs_byte,
                len: a.src.len - lhs_len,
                align_hint: a.src.align_hint + lhs_len,
            };
            if a.pinned {
                // The union of pinned pages is unchanged, so nothing is charged.
                lhs_src.pages.pin(lhs_src.start_byte, lhs_src.len)?;
                rhs_src.pages.pin(rhs_src.start_byte, rhs_src.len)?;
                a.src.pages.unpin(a.src.start_byte, a.src.len);
            }
            g.areas.insert(start, Area { last: iova, src: lhs_src, ..a.clone() });
            g.areas.insert(new_start, Area { last: a.last, src: rhs_src, ..a });
        }
        Ok(())
    }

    /// The usable IOVA ranges: the holes between reserved ranges.
    pub fn iova_ranges(&self) -> (Vec<IovaRange>, u64) {
        let g = self.lock();
        let used = iova::union(g.reserved.iter().map(|r| r.0));
        (iova::holes(&used, IovaRange::ALL), g.iova_alignment)
    }

    /// Replaces the allowed list; fails with `EADDRINUSE` when part of it is
    /// already reserved.
    pub fn allow_iovas(&self, ranges: &[IovaRange]) -> Result<()> {
        if ranges.iter().any(|r| r.start >= r.last) {
            return Err(Error::Invalid("allowed range is empty or reversed"));
        }
        // Sorted, any overlap is between neighbours: a program's list of a
        // million ranges is checked in a moment, not in 10^12 comparisons.
        let mut allowed = ranges.to_vec();
        allowed.sort_unstable();
        if allowed.windows(2).any(|w| w[0].overlaps(&w[1])) {
            return Err(Error::Invalid("allowed ranges overlap"));
        }
        self.lock().allow(allowed)
    }

    /// Reserves `ranges` for `owner`, all or none.
    pub fn reserve(&self, ranges: &[IovaRange], owner: Owner) -> Result<()> {
        let mut g = self.lock();
        for r in ranges {
            if let Err(e) = g.reserve(*r, owner) {
                g.unreserve(owner);
                return Err(e);
            }
        }
        Ok(())
    }

    pub(crate) fn unreserve(&self, owner: Owner) {
        self.lock().unreserve(owner);
    }

    /// `IOMMU_OPTION_HUGE_PAGES`.
    pub fn huge_pages(&self) -> bool {
        !self.lock().disable_large_pages
    }

    /// Sets `IOMMU_OPTION_HUGE_PAGES`. Turning huge pages off makes every
    /// domain map in CPU pages, so VFIO-style partial unmaps can split
    /// areas. Fails with `Invalid` (EINVAL) while areas are mapped into a
    /// domain, `AddrInUse` (EADDRINUSE) when a mapping is not aligned to the
    /// CPU page the IOVAs must then keep to.
    pub fn set_huge_pages(&self, enable: bool) -> Result<()> {
        let mut g = self.lock();
        if enable {
            g.disable_large_pages = false;
            return g.recalc_alignment();
        }
        if g.disable_large_pages {
            return Ok(());
        }
        if !g.domains.is_empty() && !g.areas.is_empty() {
            return Err(Error::Invalid("cannot disable huge pages while mapped into a domain"));
        }
        g.disable_large_pages = true;
        let r = g.recalc_alignment();
        if r.is_err() {
            g.disable_large_pages = false;
        }
        r
    }

    /// Mirrors every mapping into `domain` and keeps it mirrored.
    pub(crate) fn add_domain(&self, domain: &Arc<Domain>) -> Result<()> {
        let mut g = self.lock();
        let align = (1u64 << domain.pgsize_bitmap().trailing_zeros()).max(g.iova_alignment);
        if align > PAGE_SIZE {
            return Err(Error::Invalid("domain page size is larger than a page"));
        }
        if align != g.iova_alignment {
            g.check_alignment(align)?;
        }
        let owner = Owner::Domain(Arc::as_ptr(domain) as usize);
        let ap = domain.aperture();
        let outside = [
            (ap.start != 0).then(|| IovaRange::new(0, ap.start - 1)),
            (ap.last != u64::MAX).then(|| IovaRange::new(ap.last + 1, u64::MAX)),
        ];
        for r in outside.into_iter().flatten() {
            if let Err(e) = g.reserve(r, owner) {
                g.unreserve(owner);
                return Err(e);
            }
        }
        let first = g.domains.is_empty();
        let huge = !g.disable_large_pages;
        let keys: Vec<u64> = g.areas.keys().collect();
        for (i, &at) in keys.iter().enumerate() {
            let a = g.areas.get_mut(at).expect("key from map");
            let r = map_into(domain, at, a, first, huge);
            if let Err(e) = r {
                let guard = epoch::pin();
                for &undo in &keys[..i] {
                    let a = g.areas.get_mut(undo).expect("key from map");
                    domain.unmap(undo, a.last - undo + 1, &guard);
                    if first {
                        a.src.pages.unpin(a.src.start_byte, a.src.len);
                        a.pinned = false;
                    }
                }
                g.unreserve(owner);
                return Err(e);
            }
        }
        g.iova_alignment = align;
        g.domains.push(domain.clone());
        Ok(())
    }

    pub(crate) fn remove_domain(&self, domain: &Arc<Domain>) {
        let mut g = self.lock();
        let Some(i) = g.domains.iter().position(|d| Arc::ptr_eq(d, domain)) else {
            return;
        };
        g.domains.swap_remove(i);
        {
            let guard = epoch::pin();
            for (at, a) in g.areas.iter() {
                domain.unmap(at, a.last - at + 1, &guard);
            }
        }
        if g.domains.is_empty() {
            epoch::synchronize();
            for a in g.areas.values_mut() {
                a.src.pages.unpin(a.src.start_byte, a.src.len);
                a.pinned = false;
            }
        }
        let owner = Owner::Domain(Arc::as_ptr(domain) as usize);
        g.unreserve(owner);
        let _ = g.recalc_alignment();
    }

    /// Adds an access needing `alignment`; fails like a domain would when
    /// existing mappings are less aligned.
    pub(crate) fn add_access(&self, access: Weak<dyn UnmapNotice>, alignment: u64) -> Result<()> {
        let mut g = self.lock();
        g.accesses.push((access, alignment));
        let r = g.recalc_alignment();
        if r.is_err() {
            g.accesses.pop();
        }
        r
    }

    pub(crate) fn remove_access(&self, access: *const ()) {
        let mut g = self.lock();
        g.accesses.retain(|(w, _)| w.as_ptr().cast::<()>() != access);
        let _ = g.recalc_alignment();
    }

    /// Pins `[iova, iova + len)` for an access: every area it crosses gains an
    /// access pin and its pages are pinned. Returns the pinned parts and the
    /// host address of each CPU page.
    pub(crate) fn access_pin(&self, range: IovaRange, write: bool) -> Result<(Vec<Pinned>, Vec<u64>)> {
        self.pin_range(range, write, false)
    }

    /// `access_pin` for an object that keeps its pin until it is destroyed:
    /// the areas are locked against unmap meanwhile (Linux's internal access).
    pub(crate) fn lock_pin(&self, range: IovaRange, write: bool) -> Result<(Vec<Pinned>, Vec<u64>)> {
        self.pin_range(range, write, true)
    }

    fn pin_range(&self, range: IovaRange, write: bool, lock: bool) -> Result<(Vec<Pinned>, Vec<u64>)> {
        crate::inject::check("access pin")?;
        let mut g = self.lock();
        let parts = g.contig(range)?;
        let mut pinned: Vec<Pinned> = Vec::with_capacity(parts.len());
        let mut pages = Vec::new();
        let n = parts.len();
        let undo = |g: &mut Inner, pinned: &[Pinned]| {
            for p in pinned {
                p.pages.unpin(p.start_byte, p.len);
                if let Some(a) = g.areas.get_mut(p.area) {
                    a.num_accesses -= 1;
                    a.num_locks -= u32::from(p.locked);
                }
            }
        };
        for (i, (area, offset, len)) in parts.into_iter().enumerate() {
            let a = &g.areas[area];
            let start_byte = a.src.start_byte + offset;
            let aligned = start_byte % PAGE_SIZE == 0 && (i + 1 == n || (start_byte + len) % PAGE_SIZE == 0);
            let err = if a.prevent_access || !aligned {
                Some(Error::Invalid("range is being unmapped or not page aligned"))
            } else if !(if write { a.perm.write } else { a.perm.read }) {
                Some(Error::Permission("mapping does not allow that access"))
            } else {
                a.src.pages.pin(start_byte, len).err()
            };
            if let Some(e) = err {
                undo(&mut g, &pinned);
                return Err(e);
            }
            let a = g.areas.get_mut(area).expect("area from contig");
            a.num_accesses += 1;
            a.num_locks += u32::from(lock);
            let host = a.src.pages.host_addr(start_byte);
            pages.extend((0..len.div_ceil(PAGE_SIZE)).map(|k| host + k * PAGE_SIZE));
            pinned.push(Pinned { area, pages: a.src.pages.clone(), start_byte, len, locked: lock });
        }
        Ok((pinned, pages))
    }

    /// Undoes `access_pin`.
    pub(crate) fn access_unpin(&self, pinned: &[Pinned]) {
        let mut g = self.lock();
        for p in pinned {
            p.pages.unpin(p.start_byte, p.len);
            if let Some(a) = g.areas.get_mut(p.area) {
                a.num_accesses -= 1;
                a.num_locks -= u32::from(p.locked);
            }
        }
    }

    /// Copies between `buf` and `[iova, iova + buf.len())` as an access does,
    /// without a page table: through the memory behind the areas.
    pub(crate) fn access_rw(&self, iova: u64, buf: &mut [u8], write: bool) -> Result<()> {
        let range = IovaRange::from_len(iova, buf.len() as u64)?;
        crate::inject::check("access copy")?;
        let g = self.lock();
        let mut done = 0usize;
        let mut result = Ok(());
        let parts = g.contig_prefix(range);
        for (area, offset, len) in &parts {
            let a = &g.areas[*area];
            if a.prevent_access {
                return Err(Error::Invalid("range is being unmapped"));
            }
            if !(if write { a.perm.write } else { a.perm.read }) {
                return Err(Error::Permission("mapping does not allow that access"));
            }
            let chunk = &mut buf[done..done + *len as usize];
            let r = a.src.pages.rw(a.src.start_byte + offset, chunk, write);
            if r.is_err() {
                result = r;
                break;
            }
            done += *len as usize;
        }
        result?;
        if done as u64 != range.len() {
            return Err(Error::NotFound("range is not fully mapped"));
        }
        Ok(())
    }

    /// Turns a domain's dirty tracking on or off with the IOAS steady.
    pub(crate) fn set_dirty_tracking(&self, domain: &Domain, enable: bool) -> Result<()> {
        let g = self.lock();
        let mapped: Vec<IovaRange> = g.areas.iter().map(|(s, a)| IovaRange::new(s, a.last)).collect();
        domain.set_dirty_tracking(enable, &mapped)
    }

    /// Reads (and clears) the dirty state of `range`, mapped without a hole.
    pub(crate) fn read_and_clear_dirty(
        &self,
        domain: &Domain,
        range: IovaRange,
        keep: bool,
        record: &mut dyn FnMut(u64, u64),
    ) -> Result<()> {
        let g = self.lock();
        let parts = g.contig(range).map_err(|_| Error::Invalid("range is not fully mapped"))?;
        for (area, offset, len) in parts {
            let start = area + offset;
            domain.read_and_clear_dirty(IovaRange::new(start, start + (len - 1)), keep, record);
        }
        Ok(())
    }

    /// The page sizes every domain here supports, as VFIO type1 reports
    /// them: sub-page sizes fold into the CPU page, and never below the IOVA
    /// alignment.
    pub fn pgsize_bitmap(&self) -> u64 {
        let g = self.lock();
        let mut bitmap = g.domains.iter().fold(u64::MAX, |acc, d| acc & d.pgsize_bitmap());
        if bitmap & (PAGE_SIZE - 1) != 0 {
            bitmap = (bitmap & !(PAGE_SIZE - 1)) | PAGE_SIZE;
        }
        bitmap.max(g.iova_alignment)
    }

    /// The current mappings, in IOVA order.
    pub fn areas(&self) -> Vec<AreaInfo> {
        self.lock()
            .areas
            .iter()
            .map(|(iova, a)| AreaInfo {
                iova,
                len: a.last - iova + 1,
                perm: a.perm,
                host_addr: a.src.pages.host_addr(a.src.start_byte),
                file: a.src.pages.is_file(),
            })
            .collect()
    }

    /// How many domains (paging HWPTs, automatic ones included) mirror this
    /// IOAS now.
    pub fn domain_count(&self) -> usize {
        self.lock().domains.len()
    }
}

fn map_into(domain: &Domain, iova: u64, a: &mut Area, pin: bool, huge: bool) -> Result<()> {
    let len = a.last - iova + 1;
    if pin {
        Pages::pin_alone(&mut a.src.pages, a.src.start_byte, len)?;
        a.pinned = true;
    }
    let pages = &a.src.pages;
    let host = pages.host_addr(a.src.start_byte);
    let r = domain.map(iova, host, len, a.perm, pages.trust(), huge);
    if r.is_err() {
        domain.unmap(iova, len, &epoch::pin());
        if pin {
            pages.unpin(a.src.start_byte, len);
            a.pinned = false;
        }
    }
    r
}

/// An IOAS whose areas cannot change: see `Ioas::lock_areas`.
pub(crate) struct AreasLocked<'a>(LockGuard<'a, Inner>);

impl AreasLocked<'_> {
    /// The memory behind each area (the same pages once per area using them).
    pub(crate) fn pages(&self) -> impl Iterator<Item = &Arc<Pages>> {
        self.0.areas.values().map(|a| &a.src.pages)
    }
}

/// One area's share of an access pin.
pub(crate) struct Pinned {
    area: u64,
    pages: Arc<Pages>,
    start_byte: u64,
    len: u64,
    locked: bool,
}

impl Inner {
    /// The areas covering `range` without a hole, as (area start, offset in
    /// the area, length); `ENOENT` when there is a hole.
    fn contig(&self, range: IovaRange) -> Result<Vec<(u64, u64, u64)>> {
        let parts = self.contig_prefix(range);
        let covered: u64 = parts.iter().map(|p| p.2).sum();
        if covered != range.len() {
            return Err(Error::NotFound("range is not fully mapped"));
        }
        Ok(parts)
    }

    /// The areas covering `range` from its start up to the first hole.
    fn contig_prefix(&self, range: IovaRange) -> Vec<(u64, u64, u64)> {
        let mut out = Vec::new();
        let mut cur = range.start;
        while let Some((start, a)) = self.areas.at_or_below(cur) {
            if a.last < cur {
                break;
            }
            let last = a.last.min(range.last);
            out.push((start, cur - start, last - cur + 1));
            if last == range.last {
                break;
            }
            cur = last + 1;
        }
        out
    }

    /// Whether an area overlaps `r`: the last area starting at or before
    /// its end is the only candidate, as areas are disjoint. One search.
    fn overlaps_area(&self, r: IovaRange) -> bool {
        if !self.areas.any_from(r.start) {
            return false;
        }
        self.areas.at_or_below(r.last).is_some_and(|(_, a)| a.last >= r.start)
    }

    fn reserve(&mut self, r: IovaRange, owner: Owner) -> Result<()> {
        crate::inject::check("reserved range")?;
        if self.overlaps_area(r) || iova::overlaps_any(&self.allowed, &r) {
            return Err(Error::AddrInUse("range is mapped or allowed"));
        }
        self.reserved.push((r, owner));
        Ok(())
    }

    fn check_iova(&self, iova: u64, len: u64) -> Result<()> {
        if iova & (self.iova_alignment - 1) != 0 {
            return Err(Error::Invalid("IOVA is not aligned to the IOVA alignment"));
        }
        let r = IovaRange::from_len(iova, len)?;
        if self.reserved.iter().any(|(res, _)| res.overlaps(&r)) {
            return Err(Error::Invalid("IOVA range is reserved"));
        }
        if self.overlaps_area(r) {
            return Err(Error::Exists("IOVA range is already mapped"));
        }
        Ok(())
    }

    /// Replaces the allowed list (sorted, disjoint); `EADDRINUSE` when part
    /// of it is reserved.
    fn allow(&mut self, allowed: Vec<IovaRange>) -> Result<()> {
        if self.reserved.iter().any(|(r, _)| iova::overlaps_any(&allowed, r)) {
            return Err(Error::AddrInUse("allowed range is reserved"));
        }
        self.allowed = allowed;
        self.areas.forget_free_from();
        Ok(())
    }

    /// Drops the ranges `owner` reserved.
    fn unreserve(&mut self, owner: Owner) {
        self.reserved.retain(|(_, o)| *o != owner);
        self.areas.forget_free_from();
    }

    fn alloc_iova(&mut self, hint: u64, len: u64) -> Result<u64> {
        if len == 0 || len >= u64::MAX / 2 {
            return Err(Error::Overflow("length too large to place"));
        }
        let align = iova::alloc_alignment(hint, len);
        if align < self.iova_alignment {
            return Err(Error::Invalid("memory is less aligned than the IOVA alignment"));
        }
        let offset = hint % PAGE_SIZE;
        let no_space = Error::NoSpace("no IOVA hole fits the mapping");
        // Nothing below `free_from` is free: the search starts there, and
        // the areas, spans and holes below it are never looked at.
        let from = self.areas.free_from.max(PAGE_SIZE);
        let Some(window) = (from <= u64::MAX - PAGE_SIZE).then(|| IovaRange::new(from, u64::MAX - PAGE_SIZE)) else {
            return Err(no_space);
        };
        let whole = [window];
        let spans = if self.allowed.is_empty() {
            &whole[..]
        } else {
            &self.allowed[self.allowed.partition_point(|a| a.last < from)..]
        };
        // The used ranges are read as the search goes, never gathered: it
        // mostly ends at the first hole, however many areas lie above.
        let mut reserved: Vec<IovaRange> = self.reserved.iter().map(|r| r.0).filter(|r| r.last >= from).collect();
        reserved.sort_unstable();
        let (areas, reserved) = (&self.areas, &reserved);
        let used_from = |at: u64| iova::merge(reserved.iter().copied(), areas.ranges_from(at));
        let mut first_hole = None;
        let found = spans
            .iter()
            .filter_map(|a| a.intersect(&window))
            .flat_map(|span| iova::holes_iter(used_from(span.start), span))
            .inspect(|hole| _ = first_hole.get_or_insert(hole.start))
            .find_map(|hole| iova::fit(hole, len, align, offset));
        // Everything between the search's start and the first hole is used.
        self.areas.free_from = first_hole.unwrap_or(u64::MAX);
        found.ok_or(no_space)
    }

    /// Maps a new area into every domain (pinning first) and enters it.
    fn fill_area(&mut self, iova: u64, mut area: Area) -> Result<()> {
        let huge = !self.disable_large_pages;
        for (i, d) in self.domains.iter().enumerate() {
            if let Err(e) = map_into(d, iova, &mut area, i == 0, huge) {
                let guard = epoch::pin();
                for d in &self.domains[..i] {
                    d.unmap(iova, area.last - iova + 1, &guard);
                }
                if area.pinned {
                    Pages::unpin_alone(&mut area.src.pages, area.src.start_byte, area.src.len);
                }
                return Err(e);
            }
        }
        self.areas.insert(iova, area);
        Ok(())
    }

    /// Undoes `fill_area` for an area that was never published.
    fn unfill_area(&self, iova: u64, a: &Area, guard: &epoch::Guard) {
        for d in &self.domains {
            d.unmap(iova, a.last - iova + 1, guard);
        }
        if a.pinned {
            a.src.pages.unpin(a.src.start_byte, a.src.len);
        }
    }

    fn check_alignment(&self, align: u64) -> Result<()> {
        let mask = align - 1;
        let bad = self
            .areas
            .iter()
            .any(|(s, a)| s & mask != 0 || (a.last - s + 1) & mask != 0 || (a.src.start_byte % PAGE_SIZE) & mask != 0);
        if bad {
            return Err(Error::AddrInUse("existing mappings are not aligned for this domain"));
        }
        Ok(())
    }

    fn recalc_alignment(&mut self) -> Result<()> {
        let base = if self.disable_large_pages { PAGE_SIZE } else { 1 };
        let align = self
            .domains
            .iter()
            .map(|d| 1u64 << d.pgsize_bitmap().trailing_zeros())
            .chain(self.accesses.iter().map(|(_, a)| *a))
            .fold(base, u64::max);
        if align > self.iova_alignment {
            self.check_alignment(align)?;
        }
        self.iova_alignment = align;
        Ok(())
    }
}

impl Drop for Ioas {
    fn drop(&mut self) {
        self.unmap_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn area(last: u64) -> Area {
        static BYTE: u8 = 0;
        let acct = crate::account::Accounting::isolated(crate::account::Limit::Pages(1));
        let at = &BYTE as *const u8 as u64;
        let (pages, start_byte) = Pages::user(at, 1, false, crate::pgtable::Trust::Checked, &acct).unwrap();
        Area {
            last,
            src: Source { pages, start_byte, len: 1, align_hint: 0 },
            perm: Perm::RW,
            pinned: false,
            num_accesses: 0,
            num_locks: 0,
            prevent_access: false,
        }
    }

    /// The lowest fitting IOVA found the plain way: every used range, every
    /// hole from the bottom.
    fn alloc_by_scanning(g: &Inner, hint: u64, len: u64) -> Option<u64> {
        let align = iova::alloc_alignment(hint, len);
        let window = IovaRange::new(PAGE_SIZE, u64::MAX - PAGE_SIZE);
        let spans: Vec<IovaRange> = if g.allowed.is_empty() {
            vec![window]
        } else {
            g.allowed.iter().filter_map(|a| a.intersect(&window)).collect()
        };
        let used =
            iova::union(g.reserved.iter().map(|r| r.0).chain(g.areas.iter().map(|(s, a)| IovaRange::new(s, a.last))));
        spans
            .iter()
            .flat_map(|span| iova::holes(&used, *span))
            .find_map(|hole| iova::fit(hole, len, align, hint % PAGE_SIZE))
    }

    #[derive(Debug, Clone)]
    enum Step {
        Map { pages: u64, hint_page: u64 },
        Unmap(usize),
        Reserve { page: u64, pages: u64 },
        Unreserve,
        Allow(Vec<(u64, u64)>),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            // Small and many, so that reservations and holes soon lie
            // below where the search starts.
            6 => (1..8u64, 0..64u64).prop_map(|(pages, hint_page)| Step::Map { pages, hint_page }),
            1 => any::<usize>().prop_map(Step::Unmap),
            2 => (1..64u64, 1..8u64).prop_map(|(page, pages)| Step::Reserve { page, pages }),
            1 => Just(Step::Unreserve),
            1 => proptest::collection::vec((1..128u64, 1..64u64), 0..3).prop_map(Step::Allow),
        ]
    }

    proptest! {
        /// Automatic IOVAs, searched from where nothing below is free, are
        /// the ones a search from the bottom finds, through maps, unmaps,
        /// reservations and changes of the allowed ranges.
        #[test]
        fn iova_allocation_from_the_free_mark_matches_a_full_search(steps in proptest::collection::vec(step(), 1..80)) {
            let mut g = Inner { iova_alignment: 1, ..Default::default() };
            for step in steps {
                match step {
                    Step::Map { pages, hint_page } => {
                        let (hint, len) = (hint_page * PAGE_SIZE, pages * PAGE_SIZE);
                        let want = alloc_by_scanning(&g, hint, len);
                        let got = g.alloc_iova(hint, len).ok();
                        prop_assert_eq!(got, want);
                        if let Some(iova) = got {
                            g.areas.insert(iova, area(iova + len - 1));
                        }
                    }
                    Step::Unmap(i) => {
                        let keys: Vec<u64> = g.areas.keys().collect();
                        if !keys.is_empty() {
                            g.areas.remove(keys[i % keys.len()]);
                        }
                    }
                    Step::Reserve { page, pages } => {
                        let r = IovaRange::from_len(page * PAGE_SIZE, pages * PAGE_SIZE).unwrap();
                        let _ = g.reserve(r, Owner::User);
                    }
                    Step::Unreserve => g.unreserve(Owner::User),
                    Step::Allow(spans) => {
                        let mut allowed: Vec<IovaRange> = spans
                            .iter()
                            .map(|&(p, n)| IovaRange::from_len(p * PAGE_SIZE, n * PAGE_SIZE).unwrap())
                            .collect();
                        allowed.sort_unstable();
                        allowed.dedup_by(|b, a| a.overlaps(b));
                        let _ = g.allow(allowed);
                    }
                }
            }
        }

        /// The table of areas answers as a plain ordered map of IOVAs would,
        /// whatever the order of inserts and removes, the last IOVA (kept
        /// beside the tree) included.
        #[test]
        fn areas_answer_as_an_ordered_map(ops in proptest::collection::vec((0..3u8, 0..65u64), 1..200)) {
            use std::collections::BTreeMap;
            // Key 64 stands for the last IOVA, and 63 for the one below it.
            // Areas are 0x100 bytes long but at the top (one byte each there).
            let iova = |k: u64| match k { 64 => u64::MAX, 63 => u64::MAX - 1, k => k << 12 };
            let end = |key: u64| if key >= u64::MAX - 1 { key } else { key + 0xff };
            // Ranges from the key: starting at an area's first byte, inside it,
            // at its last byte or just past it; ending inside the next place
            // or at its first byte.
            let ranges = |key: u64| {
                [(0, 0x800), (0x80, 0), (0xff, 0xf01), (0x100, 0xf00), (0, 0x1000)]
                    .map(|(at, len)| IovaRange::new(key.saturating_add(at), key.saturating_add(at + len)))
            };
            let (mut areas, mut model) = (Areas::default(), BTreeMap::<u64, u64>::new());
            // The model's first area holding an IOVA of `r`.
            let first_in = |model: &BTreeMap<u64, u64>, r: IovaRange| {
                model.range(..=r.last).find(|&(_, &l)| l >= r.start).map(|(&s, &l)| (s, l))
            };
            for (op, k) in ops {
                let key = iova(k);
                let r = ranges(key)[k as usize % 5];
                let first = first_in(&model, r);
                if op == 0 && !model.contains_key(&key) {
                    areas.insert(key, area(end(key)));
                    model.insert(key, end(key));
                } else if op == 2 {
                    // Offered, and kept or taken by the key's parity.
                    let (take, mut taken) = (k % 2 == 0, SmallVec::new());
                    let got = areas.take_first_in(r, |s, a| {
                        assert_eq!(Some((s, a.last)), first);
                        take
                    }, &mut taken);
                    prop_assert_eq!(got, first);
                    prop_assert_eq!(taken.iter().map(|a| a.last).collect::<Vec<_>>(), first.filter(|_| take).map(|(_, l)| l).into_iter().collect::<Vec<_>>());
                    if take && let Some((s, _)) = first {
                        model.remove(&s);
                    }
                } else {
                    prop_assert_eq!(areas.remove(key).map(|a| a.last), model.remove(&key));
                }
                prop_assert_eq!(areas.any_from(key), model.values().any(|&l| l >= key));
                let listed = |it: &mut dyn Iterator<Item = (u64, &Area)>| it.map(|(k, a)| (k, a.last)).collect::<Vec<_>>();
                let all: Vec<(u64, u64)> = model.iter().map(|(&k, &v)| (k, v)).collect();
                prop_assert_eq!(&listed(&mut areas.iter()), &all);
                prop_assert_eq!(areas.keys().collect::<Vec<_>>(), model.keys().copied().collect::<Vec<_>>());
                prop_assert_eq!(areas.last().map(|(k, _)| k), model.last_key_value().map(|(&k, _)| k));
                prop_assert_eq!(areas.values().count(), model.len());
                prop_assert_eq!(areas.is_empty(), model.is_empty());
                prop_assert_eq!(areas.get(key).map(|a| a.last), model.get(&key).copied());
                for r in ranges(key) {
                    prop_assert_eq!(areas.first_in(r).map(|(s, a)| (s, a.last)), first_in(&model, r));
                }
                for (lo, hi) in [(0, key), (key, u64::MAX), (key / 2, key), (key, key / 2), (u64::MAX, u64::MAX)] {
                    let want: Vec<(u64, u64)> = model.range(lo..=hi.max(lo)).filter(|&(&k, _)| k <= hi).map(|(&k, &v)| (k, v)).collect();
                    prop_assert_eq!(&listed(&mut areas.starting_in(lo, hi)), &want);
                    prop_assert_eq!(areas.at_or_below(hi).map(|(k, _)| k), model.range(..=hi).next_back().map(|(&k, _)| k));
                }
            }
        }
    }

    #[test]
    fn a_million_allowed_ranges_are_checked_at_once_and_overlaps_still_found() {
        let n = 1u64 << 20;
        // Given in reverse order, every range two pages apart.
        let mut ranges: Vec<IovaRange> = (0..n).rev().map(|i| IovaRange::new(i << 13, (i << 13) + 0xfff)).collect();
        let ioas = std::sync::Arc::new(Ioas::new());
        // On a thread, so a check that takes for ever fails the test rather
        // than hold it up.
        let (done, took) = std::sync::mpsc::channel();
        let (checking, list) = (ioas.clone(), ranges.clone());
        std::thread::spawn(move || done.send(checking.allow_iovas(&list)));
        let result = took.recv_timeout(std::time::Duration::from_secs(5)).expect("allowing took over 5 s");
        result.unwrap();
        assert_eq!(ioas.lock().allowed.first(), Some(&IovaRange::new(0, 0xfff)));
        // A reserved range between two allowed ones is fine; on one, not.
        ioas.reserve(&[IovaRange::new(0x1000, 0x1fff)], Owner::User).unwrap();
        assert!(matches!(ioas.reserve(&[IovaRange::new(0x2000, 0x2000)], Owner::Device(1)), Err(Error::AddrInUse(_))));
        // Two ranges far apart in the list that overlap.
        ranges[7] = IovaRange::new(0x20_0800, 0x20_1800);
        assert!(matches!(ioas.allow_iovas(&ranges), Err(Error::Invalid(_))));
        ranges[7] = IovaRange::new(5, 5);
        assert!(matches!(ioas.allow_iovas(&ranges), Err(Error::Invalid(_))));
        // One that covers a reserved range.
        let allowed = [IovaRange::new(0, 0xfff), IovaRange::new(0x1800, 0x2fff)];
        assert!(matches!(ioas.allow_iovas(&allowed), Err(Error::AddrInUse(_))));
    }
}
