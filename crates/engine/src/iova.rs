//! IOVA intervals and the hole search used for automatic IOVA allocation.
//!
//! Intervals are inclusive (`start..=last`) like the uAPI's
//! `struct iommu_iova_range`, so the whole 64-bit space is representable.

use crate::error::{Error, Result};

/// The host page size that alignment rules are written against.
pub const PAGE_SIZE: u64 = 4096;
/// The largest alignment automatic allocation asks for (a transparent huge page).
pub(crate) const HUGE_ALIGN: u64 = 2 << 20;

/// An inclusive IOVA interval `[start, last]` (`struct iommu_iova_range`):
/// apertures, reserved and allowed ranges, unmap ranges. Never empty; `last`
/// is not below `start` in any range the engine makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IovaRange {
    /// First IOVA in the range.
    pub start: u64,
    /// Last IOVA in the range (inclusive).
    pub last: u64,
}

impl IovaRange {
    /// The whole 64-bit IOVA space.
    pub const ALL: IovaRange = IovaRange { start: 0, last: u64::MAX };

    /// `[start, last]`, unchecked: the caller keeps `start <= last`.
    pub const fn new(start: u64, last: u64) -> Self {
        IovaRange { start, last }
    }

    /// `[iova, iova + length)`, rejecting empty and overflowing ranges.
    pub fn from_len(iova: u64, length: u64) -> Result<Self> {
        if length == 0 {
            return Err(Error::Invalid("length is zero"));
        }
        let last = iova.checked_add(length - 1).ok_or(Error::Overflow("iova + length wraps"))?;
        Ok(IovaRange { start: iova, last })
    }

    /// Its length in bytes; saturates at `u64::MAX` for [`IovaRange::ALL`],
    /// whose 2^64 bytes do not fit.
    pub fn len(&self) -> u64 {
        // Saturates only for the whole 2^64 space, which no mapping can have.
        (self.last - self.start).saturating_add(1)
    }

    /// Always false: a range holds at least `start` (here for clippy's
    /// `len_without_is_empty`).
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Whether the two share at least one IOVA.
    pub fn overlaps(&self, other: &IovaRange) -> bool {
        self.start <= other.last && other.start <= self.last
    }

    /// Whether `other` lies wholly inside this range.
    pub fn contains(&self, other: &IovaRange) -> bool {
        self.start <= other.start && other.last <= self.last
    }

    /// The IOVAs both hold, if any.
    pub fn intersect(&self, other: &IovaRange) -> Option<IovaRange> {
        let start = self.start.max(other.start);
        let last = self.last.min(other.last);
        (start <= last).then_some(IovaRange { start, last })
    }
}

/// Whether `r` overlaps any of `disjoint`, which is sorted and whose ranges
/// do not overlap (so their ends rise too): one binary search.
pub(crate) fn overlaps_any(disjoint: &[IovaRange], r: &IovaRange) -> bool {
    let i = disjoint.partition_point(|a| a.last < r.start);
    disjoint.get(i).is_some_and(|a| a.overlaps(r))
}

/// Merges possibly overlapping ranges into sorted, disjoint, non-adjacent spans.
pub(crate) fn union(ranges: impl IntoIterator<Item = IovaRange>) -> Vec<IovaRange> {
    let mut v: Vec<IovaRange> = ranges.into_iter().collect();
    v.sort_unstable();
    let mut out: Vec<IovaRange> = Vec::with_capacity(v.len());
    for r in v {
        match out.last_mut() {
            Some(prev) if prev.last == u64::MAX || r.start <= prev.last + 1 => prev.last = prev.last.max(r.last),
            _ => out.push(r),
        }
    }
    out
}

/// The holes of `used` (sorted, disjoint) inside `window`.
pub(crate) fn holes(used: &[IovaRange], window: IovaRange) -> Vec<IovaRange> {
    holes_iter(used.iter().copied(), window).collect()
}

/// [`holes`], found one at a time as they are asked for, with no list made;
/// `used` need only be sorted by start (its ranges may overlap), and is
/// read no further than the holes asked for.
pub(crate) fn holes_iter(
    used: impl IntoIterator<Item = IovaRange>,
    window: IovaRange,
) -> impl Iterator<Item = IovaRange> {
    // The first IOVA not known to be used; `None` past the top of the space.
    let mut cursor = Some(window.start);
    let mut used = used.into_iter();
    std::iter::from_fn(move || {
        loop {
            let c = cursor?;
            let Some(u) = used.next().filter(|u| u.start <= window.last) else {
                // Nothing is used from `c` to the window's end.
                cursor = None;
                return (c <= window.last).then(|| IovaRange::new(c, window.last));
            };
            if u.last < c {
                continue;
            }
            cursor = u.last.checked_add(1);
            if u.start > c {
                return Some(IovaRange::new(c, u.start - 1));
            }
        }
    })
}

/// The ranges of `a` and `b`, each sorted by start, as one run sorted by
/// start.
pub(crate) fn merge(
    a: impl IntoIterator<Item = IovaRange>,
    b: impl IntoIterator<Item = IovaRange>,
) -> impl Iterator<Item = IovaRange> {
    let (mut a, mut b) = (a.into_iter().peekable(), b.into_iter().peekable());
    std::iter::from_fn(move || match (a.peek(), b.peek()) {
        (Some(x), Some(y)) if y.start < x.start => b.next(),
        (Some(_), _) => a.next(),
        (None, _) => b.next(),
    })
}

/// Fits `length` bytes into `span` at `alignment`, keeping the sub-page offset
/// of the memory so the IOVA and the memory share their offset in a page.
pub fn fit(span: IovaRange, length: u64, alignment: u64, page_offset: u64) -> Option<u64> {
    let aligned = span.start.checked_add(alignment - 1)? & !(alignment - 1);
    let start = aligned | page_offset;
    if start >= span.last || span.last - start < length - 1 {
        return None;
    }
    Some(start)
}

/// The alignment automatic allocation uses for memory at `uptr`: the largest
/// power of two that divides both the length (rounded up) and the address,
/// capped at a huge page so huge IO pages remain possible.
pub(crate) fn alloc_alignment(uptr: u64, length: u64) -> u64 {
    let by_len = length.checked_next_power_of_two().unwrap_or(1 << 63);
    let a = if uptr == 0 { by_len } else { by_len.min(1 << uptr.trailing_zeros()) };
    a.min(HUGE_ALIGN)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_len_rejects_empty_and_wrapping() {
        assert_eq!(IovaRange::from_len(0, 0), Err(Error::Invalid("length is zero")));
        assert!(matches!(IovaRange::from_len(u64::MAX, 2), Err(Error::Overflow(_))));
        assert_eq!(IovaRange::from_len(u64::MAX, 1).unwrap().last, u64::MAX);
    }

    #[test]
    fn overlaps_any_finds_the_one_neighbour_that_matters() {
        let disjoint = [IovaRange::new(0, 9), IovaRange::new(20, 29), IovaRange::new(40, 49)];
        assert!(overlaps_any(&disjoint, &IovaRange::new(9, 9)));
        assert!(overlaps_any(&disjoint, &IovaRange::new(10, 20)));
        assert!(overlaps_any(&disjoint, &IovaRange::new(5, 100)));
        assert!(!overlaps_any(&disjoint, &IovaRange::new(10, 19)));
        assert!(!overlaps_any(&disjoint, &IovaRange::new(50, u64::MAX)));
        assert!(!overlaps_any(&[], &IovaRange::new(0, u64::MAX)));
    }

    #[test]
    fn union_merges_overlapping_and_adjacent() {
        let u = union([
            IovaRange::new(10, 20),
            IovaRange::new(0, 4),
            IovaRange::new(5, 9),
            IovaRange::new(30, u64::MAX),
            IovaRange::new(40, 50),
        ]);
        assert_eq!(u, vec![IovaRange::new(0, 20), IovaRange::new(30, u64::MAX)]);
    }

    #[test]
    fn holes_cover_the_complement() {
        let used = [IovaRange::new(0, 9), IovaRange::new(20, 29)];
        assert_eq!(holes(&used, IovaRange::new(0, 100)), vec![IovaRange::new(10, 19), IovaRange::new(30, 100)]);
        assert_eq!(holes(&[IovaRange::ALL], IovaRange::ALL), vec![]);
        assert_eq!(holes(&[], IovaRange::ALL), vec![IovaRange::ALL]);
        assert_eq!(holes(&[IovaRange::new(5, u64::MAX)], IovaRange::ALL), vec![IovaRange::new(0, 4)]);
    }

    proptest::proptest! {
        /// The holes are exactly the window's IOVAs no used range holds, as
        /// maximal runs, whatever the ranges and the window.
        #[test]
        fn holes_are_the_unused_runs_of_the_window(
            ranges in proptest::collection::vec((0..200u64, 0..20u64), 0..12),
            (lo, len) in (0..200u64, 0..120u64),
        ) {
            let used = union(ranges.iter().map(|&(s, n)| IovaRange::new(s, s + n)));
            let window = IovaRange::new(lo, lo + len);
            let free = |i: u64| !used.iter().any(|u| u.start <= i && i <= u.last);
            let mut want: Vec<IovaRange> = Vec::new();
            for i in (window.start..=window.last).filter(|&i| free(i)) {
                match want.last_mut() {
                    Some(h) if h.last + 1 == i => h.last = i,
                    _ => want.push(IovaRange::new(i, i)),
                }
            }
            proptest::prop_assert_eq!(holes(&used, window), want);
        }
    }

    #[test]
    fn fit_honours_alignment_and_offset() {
        let span = IovaRange::new(0x1001, 0x10_0000);
        assert_eq!(fit(span, 0x1000, 0x1000, 0), Some(0x2000));
        assert_eq!(fit(span, 0x1000, 0x1000, 0x10), Some(0x2010));
        assert_eq!(fit(IovaRange::new(0, 0xfff), 0x1000, 0x1000, 0), Some(0));
        assert_eq!(fit(IovaRange::new(0, 0xffe), 0x1000, 0x1000, 0), None);
        assert_eq!(fit(IovaRange::new(u64::MAX - 10, u64::MAX), 2, 1 << 20, 0), None);
    }

    #[test]
    fn alloc_alignment_is_capped_at_a_huge_page() {
        assert_eq!(alloc_alignment(0x20_0000, 1 << 30), HUGE_ALIGN);
        assert_eq!(alloc_alignment(0x1000, 1 << 30), 0x1000);
        assert_eq!(alloc_alignment(0x4000, 0x3000), 0x4000);
        assert_eq!(alloc_alignment(0, 0x3000), 0x4000);
    }
}
