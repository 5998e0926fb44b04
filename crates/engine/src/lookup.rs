//! IOASes by ID for lookups that take no lock.
//!
//! Map and unmap, the calls a VMM makes most, each find their IOAS by ID.
//! Through the object table that costs its lock and a reference count: four
//! locked read-modify-writes, a quarter of a one-page map and unmap. Here
//! they find it with a few loads inside a lookup section
//! ([`epoch::pin_lookup`]), which stores to this thread's slot and nothing
//! else.
//!
//! The table keeps the index under its lock: a slot holds the table's own
//! reference to the IOAS (`Arc::as_ptr`), and `IOMMU_DESTROY` clears it,
//! then waits for the lookups that may have read it
//! ([`epoch::synchronize_lookups`]) before it lets the IOAS go. A map in
//! flight thus keeps no count, and a destroy that meets one waits for it
//! instead of failing with `EBUSY`: the map happened first, as it may have.
//! Grown or cut back, the old slots are freed once the lookups that may
//! still read them have left.

use std::sync::Arc;
use std::sync::atomic::{AtomicPtr, Ordering};

use crate::epoch::{self, Lookup};
use crate::ioas::Ioas;

/// See the module docs.
pub(crate) struct IoasIndex {
    /// Slot `n` holds IOAS `n`, or null. Replaced, never changed in length.
    slots: AtomicPtr<Slots>,
}

struct Slots(Box<[AtomicPtr<Ioas>]>);

impl Slots {
    fn with_len(len: usize) -> *mut Slots {
        Box::into_raw(Box::new(Slots((0..len).map(|_| AtomicPtr::new(std::ptr::null_mut())).collect())))
    }
}

/// The fewest slots kept: a context's first IOASes never grow the index.
const MIN_SLOTS: usize = 64;

impl Default for IoasIndex {
    fn default() -> Self {
        IoasIndex { slots: AtomicPtr::new(Slots::with_len(MIN_SLOTS)) }
    }
}

impl IoasIndex {
    /// The IOAS `id` names, for as long as `section` lasts; `None` when the
    /// index holds none there (the table may still hold another kind).
    #[inline]
    pub(crate) fn get<'a>(&'a self, id: u32, _section: &'a Lookup) -> Option<&'a Ioas> {
        // SAFETY: replaced slots are freed only after the lookups that may
        // have read them have left (`resize`), and this one is inside.
        let slots = unsafe { &*self.slots.load(Ordering::Acquire) };
        let ioas = slots.0.get(id as usize)?.load(Ordering::Acquire);
        // SAFETY: a slot holds the table's reference to a live IOAS; the
        // table lets it go only after clearing the slot and waiting for
        // the lookups inside (see the module docs), this one among them.
        unsafe { ioas.as_ref() }
    }

    fn slots(&self) -> &[AtomicPtr<Ioas>] {
        // SAFETY: only writers replace the slots, and the caller is the
        // writer (under the table's lock).
        unsafe { &(*self.slots.load(Ordering::Relaxed)).0 }
    }

    /// Enters (`Some`) or clears (`None`) IOAS `id`. Writers are serialised
    /// by the table's lock; a cleared IOAS may be let go only after
    /// `epoch::synchronize_lookups`.
    pub(crate) fn set(&self, id: u32, ioas: Option<&Arc<Ioas>>) {
        let id = id as usize;
        if id >= self.slots().len() {
            if ioas.is_none() {
                return;
            }
            self.resize((id + 1).next_power_of_two());
        }
        let ptr = ioas.map_or(std::ptr::null_mut(), |a| Arc::as_ptr(a).cast_mut());
        self.slots()[id].store(ptr, Ordering::Release);
    }

    /// Cuts the slots back when IDs up to `top` use a quarter of them or
    /// less, as the table's own slots are.
    pub(crate) fn fit(&self, top: u32) {
        let want = (top as usize + 1).next_power_of_two().max(MIN_SLOTS);
        if self.slots().len() >= 4 * want {
            self.resize(2 * want);
        }
    }

    /// Replaces the slots by `len` of them holding the same IOASes (those
    /// below `len`), and frees the old ones once no lookup can read them.
    fn resize(&self, len: usize) {
        let new = Slots::with_len(len);
        // SAFETY: made just above, not shared yet.
        for (to, from) in unsafe { &(*new).0 }.iter().zip(self.slots()) {
            to.store(from.load(Ordering::Relaxed), Ordering::Relaxed);
        }
        let old = self.slots.swap(new, Ordering::AcqRel) as usize;
        epoch::defer_after_lookups(move || {
            // SAFETY: `Box::into_raw` made it; no lookup reads it any more.
            drop(unsafe { Box::from_raw(old as *mut Slots) });
        });
    }
}

impl Drop for IoasIndex {
    fn drop(&mut self) {
        // SAFETY: `Box::into_raw` made it, and with `&mut self` no lookup
        // can read it.
        drop(unsafe { Box::from_raw(*self.slots.get_mut()) });
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn slots_follow_the_ids_up_and_down() {
        let index = IoasIndex::default();
        let a = Arc::new(Ioas::new());
        index.set(3, Some(&a));
        index.set(5000, Some(&a));
        let section = epoch::pin_lookup();
        assert!(std::ptr::eq(index.get(3, &section).unwrap(), &*a));
        assert!(std::ptr::eq(index.get(5000, &section).unwrap(), &*a));
        assert!(index.get(4, &section).is_none());
        assert!(index.get(1 << 30, &section).is_none(), "IDs past the slots are not there");
        drop(section);
        assert_eq!(index.slots().len(), 8192);
        index.set(5000, None);
        index.fit(3);
        assert_eq!(index.slots().len(), 2 * MIN_SLOTS, "cut back once the high IDs are gone");
        let section = epoch::pin_lookup();
        assert!(std::ptr::eq(index.get(3, &section).unwrap(), &*a), "kept across the cut");
        assert!(index.get(5000, &section).is_none());
        drop(section);
        index.set(1 << 20, None);
        assert_eq!(index.slots().len(), 2 * MIN_SLOTS, "clearing past the slots grows nothing");
    }
}
