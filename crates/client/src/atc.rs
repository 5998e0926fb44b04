//! The shared memory of one port: a translation table the daemon publishes
//! and the back end reads without a lock, and the back end's reader slots
//! the daemon waits on.
//!
//! The model is PCIe's Address Translation Services: the back end is a
//! device with an address translation cache (ATC) that the IOMMU (the
//! daemon) fills on request and invalidates, waiting for the device to
//! finish what it started with the old translations.
//!
//! - The **table** (`TablePage`, one memfd, read-only for the back end and
//!   sealed against writable mappings) holds two arrays of extents, IOVA
//!   ranges sorted and disjoint, each naming a region (a file the back end
//!   was handed) and an offset in it. `current` says which array readers
//!   use. The daemon writes only the other array, then switches `current`,
//!   so a reader never sees an array being written: before the daemon
//!   writes an array again, it waits for every reader that could still be
//!   in it (a grace period, below).
//! - The **slots** (`SlotsPage`, one memfd the back end writes) hold one
//!   sequence number per back-end thread, odd while that thread is inside a
//!   DMA (from before it reads the table until after its last byte is
//!   copied). Entering is a plain store and a compiler fence; leaving a
//!   release store.
//! - A **grace period** (the daemon's): a `membarrier(GLOBAL_EXPEDITED)`,
//!   which runs a full barrier on every CPU running a thread of a process
//!   registered for it (the back end registers when it opens a port), then
//!   a wait for every odd number seen to change. Where the back end cannot
//!   register, it says so in `fences` and its readers fence after entering.
//!
//! So an unmap in the daemon (which drops what it touched from the table,
//! then waits) returns only after every DMA that could have used the old
//! translation is done, as in-process. A reader that stays inside past the
//! daemon's bound is cut off: `state` turns to [`CUT_OFF`], and the daemon
//! kills the process, the only way to revoke memory another process has
//! mapped.
//!
//! The back end maps the whole of every region, so the table guards the
//! IOVA contract of an honest back end (no DMA through a stale or missing
//! translation), not guest memory from a hostile one: that needs the copies
//! to happen in the daemon, as `ioasid run --socket` does for programs.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// `magic` of a table page.
pub const MAGIC: u64 = u64::from_le_bytes(*b"ioasATC1");
/// Extents in one table.
pub const CAPACITY: usize = 1024;
/// Reader slots: threads of the back end that may DMA through the port at
/// once.
pub const SLOTS: usize = 256;
/// Regions (files) one port may name.
pub const REGIONS: usize = 1024;

/// `state`: translations may be used.
pub const OPEN: u32 = 0;
/// `state`: the back end stalled past the daemon's bound and was cut off.
pub const CUT_OFF: u32 = 1;
/// `state`: the port is closed (the device went away, or the daemon did).
pub const CLOSED: u32 = 2;

/// The table page's header.
#[repr(C, align(64))]
pub struct TableHeader {
    /// [`MAGIC`].
    pub magic: AtomicU64,
    /// The array readers use: 0 or 1.
    pub current: AtomicU32,
    /// [`OPEN`], [`CUT_OFF`] or [`CLOSED`].
    pub state: AtomicU32,
    /// Counts switches of `current` (for caches built from the table).
    pub generation: AtomicU64,
}

/// One translation: IOVAs `iova..=last` are bytes `offset..` of region
/// `meta >> 32`, with rights `meta & 3` (`wire::PERM_*`).
#[repr(C)]
pub struct Extent {
    /// First IOVA.
    pub iova: AtomicU64,
    /// Last IOVA.
    pub last: AtomicU64,
    /// Offset in the region of `iova`.
    pub offset: AtomicU64,
    /// Region << 32 | rights.
    pub meta: AtomicU64,
}

/// One array of extents.
#[repr(C, align(64))]
pub struct Table {
    /// Extents in use.
    pub len: AtomicU32,
    _pad: [u32; 15],
    /// Sorted by `iova`, disjoint.
    pub extents: [Extent; CAPACITY],
}

/// The table memfd's contents.
#[repr(C)]
pub struct TablePage {
    /// Which array, and the port's state.
    pub header: TableHeader,
    /// The two arrays.
    pub tables: [Table; 2],
}

/// One back-end thread's slot.
#[repr(C, align(64))]
pub struct Slot {
    /// Odd while its thread is inside a DMA; only grows.
    pub seq: AtomicU64,
    /// Nesting of its thread's sections (the thread's own bookkeeping).
    pub depth: AtomicU32,
}

/// The slots memfd's contents.
#[repr(C)]
pub struct SlotsPage {
    /// 1 when the back end's readers fence themselves (no membarrier).
    pub fences: AtomicU32,
    /// Slots handed out so far: the daemon scans this many.
    pub used: AtomicU32,
    _pad: [u64; 7],
    /// One per thread.
    pub slots: [Slot; SLOTS],
}

/// What a lookup found: the region, the offset in it, the bytes the extent
/// covers from there, and the rights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Found {
    /// Region index.
    pub region: u32,
    /// Offset of the IOVA in the region.
    pub offset: u64,
    /// Bytes of the extent from the IOVA on.
    pub len: u64,
    /// `wire::PERM_*` bits.
    pub perm: u32,
}

impl TablePage {
    /// The extent holding `iova`, in the array readers use now. The caller
    /// is inside a section (see the module docs).
    #[inline]
    pub fn lookup(&self, iova: u64) -> Option<Found> {
        let t = &self.tables[(self.header.current.load(Ordering::Acquire) & 1) as usize];
        let n = (t.len.load(Ordering::Acquire) as usize).min(CAPACITY);
        let extents = &t.extents[..n];
        // The last extent starting at or below `iova`.
        let i = extents.partition_point(|e| e.iova.load(Ordering::Relaxed) <= iova);
        let e = extents.get(i.checked_sub(1)?)?;
        let (start, last) = (e.iova.load(Ordering::Relaxed), e.last.load(Ordering::Relaxed));
        if iova > last {
            return None;
        }
        let meta = e.meta.load(Ordering::Relaxed);
        Some(Found {
            region: (meta >> 32) as u32,
            offset: e.offset.load(Ordering::Relaxed).wrapping_add(iova - start),
            len: (last - iova).saturating_add(1),
            perm: meta as u32 & 3,
        })
    }

    /// Writes `extents` (sorted, disjoint: `(iova, last, region, offset,
    /// perm)`) into the array readers do not use, then makes it current.
    /// The caller (the daemon) waited for the readers of that array.
    pub fn publish(&self, extents: &[(u64, u64, u32, u64, u32)]) {
        let next = (self.header.current.load(Ordering::Relaxed) & 1) ^ 1;
        let t = &self.tables[next as usize];
        let n = extents.len().min(CAPACITY);
        for (e, &(iova, last, region, offset, perm)) in t.extents.iter().zip(&extents[..n]) {
            e.iova.store(iova, Ordering::Relaxed);
            e.last.store(last, Ordering::Relaxed);
            e.offset.store(offset, Ordering::Relaxed);
            e.meta.store(u64::from(region) << 32 | u64::from(perm & 3), Ordering::Relaxed);
        }
        t.len.store(n as u32, Ordering::Release);
        self.header.current.store(next, Ordering::Release);
        self.header.generation.fetch_add(1, Ordering::Release);
    }
}

/// A shared mapping of a memfd as a `T`.
pub struct Shared<T> {
    ptr: NonNull<T>,
}

// SAFETY: `T` is made of atomics, which any thread (and process) may use.
unsafe impl<T: Sync> Send for Shared<T> {}
// SAFETY: as above.
unsafe impl<T: Sync> Sync for Shared<T> {}

impl<T> Shared<T> {
    /// A new memfd of `T`'s size, zeroed, mapped read-write here; with it,
    /// the descriptor to hand the back end.
    pub fn create(name: &std::ffi::CStr) -> rustix::io::Result<(Shared<T>, OwnedFd)> {
        let fd =
            rustix::fs::memfd_create(name, rustix::fs::MemfdFlags::CLOEXEC | rustix::fs::MemfdFlags::ALLOW_SEALING)?;
        rustix::fs::ftruncate(&fd, size_of::<T>() as u64)?;
        let shared = Self::map(fd.as_fd(), true)?;
        Ok((shared, fd))
    }

    /// Maps `fd`, which must be exactly `T`'s size.
    pub fn map(fd: BorrowedFd<'_>, writable: bool) -> rustix::io::Result<Shared<T>> {
        let st = rustix::fs::fstat(fd)?;
        if st.st_size as usize != size_of::<T>() {
            return Err(rustix::io::Errno::PROTO);
        }
        let prot = if writable {
            rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE
        } else {
            rustix::mm::ProtFlags::READ
        };
        // SAFETY: a new shared mapping the kernel places; nothing else uses
        // its addresses. `T` is made of atomics, valid for any bytes
        // (zeroes included).
        let p = unsafe {
            rustix::mm::mmap(std::ptr::null_mut(), size_of::<T>(), prot, rustix::mm::MapFlags::SHARED, fd, 0)?
        };
        Ok(Shared { ptr: NonNull::new(p.cast()).ok_or(rustix::io::Errno::NOMEM)? })
    }
}

impl<T> std::ops::Deref for Shared<T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: mapped for `T`'s size in `map` and unmapped only on drop;
        // every field is atomic, so other processes' writes are not races.
        unsafe { self.ptr.as_ref() }
    }
}

impl<T> Drop for Shared<T> {
    fn drop(&mut self) {
        // SAFETY: exactly the mapping `map` made; no reference outlives
        // `self`.
        let _ = unsafe { rustix::mm::munmap(self.ptr.as_ptr().cast(), size_of::<T>()) };
    }
}

/// Forbids writable mappings of the table from now on (the back end's is
/// read-only); the daemon's own, made before, stays writable.
pub fn seal(fd: &OwnedFd) -> rustix::io::Result<()> {
    rustix::fs::fcntl_add_seals(
        fd,
        rustix::fs::SealFlags::FUTURE_WRITE | rustix::fs::SealFlags::SHRINK | rustix::fs::SealFlags::GROW,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_is_fixed() {
        assert_eq!(size_of::<Extent>(), 32);
        assert_eq!(size_of::<Slot>(), 64);
        assert_eq!(size_of::<TablePage>(), 64 + 2 * (64 + CAPACITY * 32));
        assert_eq!(size_of::<SlotsPage>(), 64 + SLOTS * 64);
    }

    #[test]
    fn lookups_follow_the_published_array() {
        let (page, fd) = Shared::<TablePage>::create(c"t").unwrap();
        assert_eq!(page.lookup(0x1000), None);
        page.publish(&[(0x1000, 0x1fff, 3, 0x8000, 3), (0x4000, 0x7fff, 1, 0, 1)]);
        let reader = Shared::<TablePage>::map(fd.as_fd(), false).unwrap();
        assert_eq!(reader.lookup(0x1800), Some(Found { region: 3, offset: 0x8800, len: 0x800, perm: 3 }));
        assert_eq!(reader.lookup(0x2000), None);
        assert_eq!(reader.lookup(0x7fff), Some(Found { region: 1, offset: 0x3fff, len: 1, perm: 1 }));
        assert_eq!(reader.lookup(0xfff), None);
        page.publish(&[]);
        assert_eq!(reader.lookup(0x1800), None);
        assert_eq!(reader.header.generation.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn a_sealed_table_cannot_be_mapped_writable() {
        let (_page, fd) = Shared::<TablePage>::create(c"t").unwrap();
        seal(&fd).unwrap();
        assert!(Shared::<TablePage>::map(fd.as_fd(), true).is_err());
        assert!(Shared::<TablePage>::map(fd.as_fd(), false).is_ok());
    }
}
