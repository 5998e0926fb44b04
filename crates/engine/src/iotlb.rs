//! The IOTLB: a direct-mapped cache of 4 KiB translations, read without locks
//! or read-modify-write operations.
//!
//! Each entry is a small seqlock. Every fill is tagged with the generation
//! that was current before its walk started; invalidation bumps the
//! generation, so a walk that raced an unmap can insert its (stale) result but
//! that result never hits again. Lookups compare generations, so invalidating
//! costs one atomic increment whatever the IOTLB's size.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering, fence};

use parking_lot::Mutex;

use crate::memory::Trust;
use crate::pgtable::Perm;

const ENTRIES: usize = 512;
/// How many ranged invalidations `Iotlb::changes_between` remembers.
const LOGGED: usize = 64;
const READ: u64 = 1;
const WRITE: u64 = 2;
const CHECKED: u64 = 4;
const DIRTY: u64 = 8;
/// Rights live in the low bits of `data`; IO pages are at least 2 KiB aligned.
const FLAGS: u64 = READ | WRITE | CHECKED | DIRTY;

#[repr(align(32))]
#[derive(Default)]
struct Entry {
    seq: AtomicU64,
    tag: AtomicU64,
    generation: AtomicU64,
    /// Host page address | rights.
    data: AtomicU64,
}

/// A cached translation of one 4 KiB IOVA page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hit {
    /// Host address of the page, aligned to at least 2 KiB.
    pub host_page: u64,
    /// The rights of the whole translation (for a nested one, both stages').
    pub perm: Perm,
    /// How the page's memory is reached (Linux has no such bit: ioasid's
    /// software mark, cached with the rights).
    pub trust: Trust,
    /// The leaf's dirty bit was set when this was cached, so writes through
    /// it need not set it again.
    pub dirty: bool,
}

/// A cache of translations, 4 KiB IOVA page to host page: a paging
/// domain's, and a nested HWPT's of combined stage-1 and stage-2 results
/// (which the guest's invalidations drop). Shared between threads without
/// locks; invalidation is one atomic increment.
pub struct Iotlb {
    generation: AtomicU64,
    /// Inline rather than boxed: a hit then costs no load of a pointer
    /// before the entry's own.
    entries: [Entry; ENTRIES],
    /// The latest ranged invalidations, oldest first: (the generation each
    /// made, first IOVA, last IOVA). Kept only while a cache outside the
    /// process follows the translations (see `changes_between`).
    ranged: Mutex<VecDeque<(u64, u64, u64)>>,
}

impl Default for Iotlb {
    fn default() -> Self {
        Self::new()
    }
}

impl Iotlb {
    /// An empty IOTLB of 512 entries.
    pub fn new() -> Self {
        Iotlb {
            // Generation 0 is what empty entries carry; start above it.
            generation: AtomicU64::new(1),
            entries: std::array::from_fn(|_| Entry::default()),
            ranged: Mutex::new(VecDeque::new()),
        }
    }

    #[inline(always)]
    fn slot(&self, page: u64) -> &Entry {
        &self.entries[(page as usize) & (ENTRIES - 1)]
    }

    /// The generation to pass to [`Iotlb::fill`] after a walk started now.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The cached translation of IOVA page number `page` (IOVA >> 12), if
    /// one was filled since the last invalidation.
    #[inline(always)]
    pub fn lookup(&self, page: u64) -> Option<Hit> {
        self.lookup_at(page, self.generation.load(Ordering::Acquire))
    }

    /// `lookup` of entries filled at `generation` (a nested table passes
    /// the sum of its own and its parent's, which changes when either does).
    #[inline(always)]
    pub fn lookup_at(&self, page: u64, generation: u64) -> Option<Hit> {
        let e = self.slot(page);
        let s1 = e.seq.load(Ordering::Acquire);
        let tag = e.tag.load(Ordering::Relaxed);
        let g = e.generation.load(Ordering::Relaxed);
        let data = e.data.load(Ordering::Relaxed);
        fence(Ordering::Acquire);
        let s2 = e.seq.load(Ordering::Relaxed);
        if s1 != s2 || s1 & 1 != 0 || tag != page || g != generation {
            return None;
        }
        Some(Hit {
            host_page: data & !FLAGS,
            perm: Perm { read: data & READ != 0, write: data & WRITE != 0 },
            trust: if data & CHECKED != 0 { Trust::Checked } else { Trust::Direct },
            dirty: data & DIRTY != 0,
        })
    }

    /// Caches a translation found by a walk that began at `generation`.
    /// Gives up silently if another thread is filling the same slot.
    pub fn fill(&self, page: u64, generation: u64, hit: Hit) {
        let e = self.slot(page);
        let s = e.seq.load(Ordering::Relaxed);
        if s & 1 != 0 || e.seq.compare_exchange(s, s + 1, Ordering::Acquire, Ordering::Relaxed).is_err() {
            return;
        }
        fence(Ordering::Release);
        let mut data = hit.host_page;
        if hit.perm.read {
            data |= READ;
        }
        if hit.perm.write {
            data |= WRITE;
        }
        if hit.trust == Trust::Checked {
            data |= CHECKED;
        }
        if hit.dirty {
            data |= DIRTY;
        }
        e.tag.store(page, Ordering::Relaxed);
        e.generation.store(generation, Ordering::Relaxed);
        e.data.store(data, Ordering::Relaxed);
        e.seq.store(s + 2, Ordering::Release);
    }

    /// Makes every cached entry miss from now on.
    pub fn invalidate_all(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// `invalidate_all` for a change to IOVAs `[first, last]` alone (an
    /// unmap), noted for `changes_between` while a back end in another
    /// process keeps a table of these translations: it then drops what
    /// the change touched instead of everything.
    pub fn invalidate_range(&self, first: u64, last: u64) {
        if !crate::epoch::has_external() {
            self.invalidate_all();
            return;
        }
        let mut log = self.ranged.lock();
        let generation = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
        if log.len() == LOGGED {
            log.pop_front();
        }
        log.push_back((generation, first, last));
    }

    /// The IOVA ranges that changed from generation `from` to `to`, when
    /// every invalidation between them was ranged and is still remembered;
    /// `None` otherwise (anything may have changed).
    pub fn changes_between(&self, from: u64, to: u64) -> Option<Vec<(u64, u64)>> {
        let n = to.checked_sub(from)?;
        let log = self.ranged.lock();
        let ranges: Vec<(u64, u64)> =
            log.iter().filter(|&&(g, ..)| g > from && g <= to).map(|&(_, first, last)| (first, last)).collect();
        (ranges.len() as u64 == n).then_some(ranges)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HIT: Hit = Hit { host_page: 0x7000, perm: Perm::R, trust: Trust::Checked, dirty: false };

    // The model has no readers outside the process, so no ranges.
    #[cfg(not(loom))]
    #[test]
    fn ranged_invalidations_say_what_changed_until_another_kind_comes() {
        struct Nobody;
        impl crate::epoch::External for Nobody {
            fn synchronize(&self) {}
        }
        // Ranges are noted only while something outside the process reads.
        let nobody: std::sync::Arc<dyn crate::epoch::External> = std::sync::Arc::new(Nobody);
        crate::epoch::add_external(std::sync::Arc::downgrade(&nobody));
        let t = Iotlb::new();
        t.fill(1, t.generation(), HIT);
        let g0 = t.generation();
        t.invalidate_range(0x1000, 0x1fff);
        assert_eq!(t.lookup(1), None, "a ranged invalidation drops the IOTLB's entries all the same");
        t.invalidate_range(0x5000, 0x5fff);
        let g2 = t.generation();
        assert_eq!(t.changes_between(g0, g2), Some(vec![(0x1000, 0x1fff), (0x5000, 0x5fff)]));
        assert_eq!(t.changes_between(g0 + 1, g2), Some(vec![(0x5000, 0x5fff)]));
        assert_eq!(t.changes_between(g2, g2), Some(vec![]));
        assert_eq!(t.changes_between(g2, g0), None);
        t.invalidate_all();
        assert_eq!(t.changes_between(g0, t.generation()), None, "an unranged change hides what changed");
        let g = t.generation();
        for page in 0..=LOGGED as u64 {
            t.invalidate_range(page << 12, (page << 12) + 0xfff);
        }
        assert_eq!(t.changes_between(g, t.generation()), None, "the oldest is forgotten");
        assert_eq!(t.changes_between(g + 1, t.generation()).map(|r| r.len()), Some(LOGGED));
    }

    #[test]
    fn half_page_addresses_survive() {
        let t = Iotlb::new();
        let hit = Hit { host_page: 0x7800, perm: Perm::RW, trust: Trust::Direct, dirty: true };
        t.fill(9, t.generation(), hit);
        assert_eq!(t.lookup(9), Some(hit));
    }

    #[test]
    fn fill_then_hit() {
        let t = Iotlb::new();
        assert_eq!(t.lookup(5), None);
        t.fill(5, t.generation(), HIT);
        assert_eq!(t.lookup(5), Some(HIT));
        assert_eq!(t.lookup(5 + ENTRIES as u64), None);
    }

    #[test]
    fn a_fill_from_before_an_invalidation_never_hits() {
        let t = Iotlb::new();
        let g = t.generation();
        t.invalidate_all();
        t.fill(5, g, HIT);
        assert_eq!(t.lookup(5), None);
        t.fill(5, t.generation(), HIT);
        assert_eq!(t.lookup(5), Some(HIT));
        t.invalidate_all();
        assert_eq!(t.lookup(5), None);
    }
}
