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

use std::os::fd::BorrowedFd;
use std::sync::{Arc, LazyLock, Mutex, OnceLock, Weak};

use crate::account::Accounting;
use crate::error::{Error, Result};
use crate::iova::{self, IovaRange, PAGE_SIZE};
use crate::memory::{self, FileMapping, HostBuffer, Trust};

#[derive(Debug)]
enum Backing {
    User,
    File(#[allow(dead_code)] FileMapping),
    /// Memory of another process (a forked child mapping through the fd it
    /// shares), taken when Linux would pin it.
    Remote {
        pid: i32,
        taken: OnceLock<Taken>,
    },
}

#[derive(Debug)]
enum Taken {
    /// Shared memory this process maps at the same address: the same pages,
    /// used in place (and checked, as any memory of a program is).
    Shared,
    /// Private memory ioasid cannot map from another address space: copied,
    /// and ours from then on.
    Copy(HostBuffer),
}

#[derive(Debug)]
pub struct Pages {
    /// Host address of the first page (page aligned).
    base: u64,
    npages: u64,
    writable: bool,
    trust: Trust,
    backing: Backing,
    accounting: Accounting,
    /// Page ranges currently pinned, one entry per pinning user; the union is
    /// what is charged.
    pins: Mutex<Vec<IovaRange>>,
}

/// Every `Pages` of user memory alive in the process, so the number of pins
/// on a page can be counted (what Linux reads from `struct page`'s refcount).
/// Touched only when pages are created and by `pin_count`.
static LIVE: LazyLock<Mutex<Vec<Weak<Pages>>>> = LazyLock::new(|| Mutex::new(Vec::new()));

fn register(pages: Pages) -> Arc<Pages> {
    let pages = Arc::new(pages);
    let mut live = LIVE.lock().unwrap_or_else(|e| e.into_inner());
    live.retain(|w| w.strong_count() > 0);
    live.push(Arc::downgrade(&pages));
    pages
}

/// How many `Pages` hold the user page at `addr` pinned: each pins it once,
/// however many areas and domains use it.
pub fn pin_count(addr: u64) -> u32 {
    let page = addr & !(PAGE_SIZE - 1);
    let live: Vec<Arc<Pages>> =
        LIVE.lock().unwrap_or_else(|e| e.into_inner()).iter().filter_map(Weak::upgrade).collect();
    live.iter()
        .filter(|p| matches!(p.backing, Backing::User) && page >= p.base && page < p.base + p.npages * PAGE_SIZE)
        .filter(|p| {
            let index = (page - p.base) / PAGE_SIZE;
            p.pins.lock().unwrap_or_else(|e| e.into_inner()).iter().any(|r| r.start <= index && index <= r.last)
        })
        .count() as u32
}

impl Pages {
    /// Pages of the user address range `[uptr, uptr + length)`; returns them
    /// and the byte offset of `uptr` inside them.
    pub fn user(
        uptr: u64,
        length: u64,
        writable: bool,
        trust: Trust,
        accounting: Accounting,
    ) -> Result<(Arc<Pages>, u64)> {
        let (pages, lead) = Self::of_range(uptr, length, writable, trust, Backing::User, accounting)?;
        Ok((register(pages), lead))
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
        if length == 0 || length > u64::MAX - PAGE_SIZE {
            return Err(Error::Invalid("length is zero or too large"));
        }
        uptr.checked_add(length).ok_or(Error::Overflow("user_va + length wraps"))?;
        crate::inject::check("pages")?;
        let base = uptr & !(PAGE_SIZE - 1);
        let lead = uptr - base;
        let npages = (length + lead).div_ceil(PAGE_SIZE);
        Ok((Pages { base, npages, writable, trust, backing, accounting, pins: Mutex::new(Vec::new()) }, lead))
    }

    /// Pages of `[uptr, uptr + length)` in process `pid`'s memory, taken at
    /// the first pin (EFAULT then if they, or the process, are gone).
    pub fn remote(
        pid: i32,
        uptr: u64,
        length: u64,
        writable: bool,
        accounting: Accounting,
    ) -> Result<(Arc<Pages>, u64)> {
        let backing = Backing::Remote { pid, taken: OnceLock::new() };
        let (pages, lead) = Self::of_range(uptr, length, writable, Trust::Direct, backing, accounting)?;
        Ok((Arc::new(pages), lead))
    }

    /// Takes another process's pages into memory of ours, once; a no-op
    /// for every other kind of pages.
    pub fn materialize(&self) -> Result<()> {
        let Backing::Remote { pid, taken } = &self.backing else { return Ok(()) };
        if taken.get().is_some() {
            return Ok(());
        }
        let len = self.npages * PAGE_SIZE;
        // Shared memory both processes map is used in place; anything else
        // must be readable in the process now, or it is EFAULT (gone, or
        // never mapped).
        let took = if memory::shared_with(*pid, self.base, len) {
            Taken::Shared
        } else {
            let mut bytes = vec![0u8; len as usize];
            memory::read_process(*pid, self.base, &mut bytes)?;
            let buf = HostBuffer::new(len as usize)?;
            buf.write_at(0, &bytes);
            Taken::Copy(buf)
        };
        // A racing materialize may have won; both took the same memory.
        let _ = taken.set(took);
        Ok(())
    }

    /// Pages of `[start, start + length)` of a file, mapped by the engine.
    pub fn file(
        fd: BorrowedFd<'_>,
        start: u64,
        length: u64,
        writable: bool,
        accounting: Accounting,
    ) -> Result<(Arc<Pages>, u64)> {
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
            accounting,
            pins: Mutex::new(Vec::new()),
        };
        Ok((Arc::new(pages), lead))
    }

    pub fn writable(&self) -> bool {
        self.writable
    }

    pub fn trust(&self) -> Trust {
        match &self.backing {
            Backing::Remote { taken, .. } if matches!(taken.get(), Some(Taken::Shared)) => Trust::Checked,
            _ => self.trust,
        }
    }

    pub fn npages(&self) -> u64 {
        self.npages
    }

    pub fn is_file(&self) -> bool {
        matches!(self.backing, Backing::File(_))
    }

    /// Host address of byte `offset` of these pages (for another process's
    /// pages not yet taken, where they are in that process).
    pub fn host_addr(&self, offset: u64) -> u64 {
        match &self.backing {
            Backing::Remote { taken: t, .. } => match t.get() {
                Some(Taken::Copy(buf)) => buf.addr() + offset,
                _ => self.base + offset,
            },
            _ => self.base + offset,
        }
    }

    /// Pins the pages holding bytes `[offset, offset + len)`: checks that
    /// untrusted memory is mapped and charges the pages not already pinned.
    pub fn pin(&self, offset: u64, len: u64) -> Result<()> {
        let range = self.page_range(offset, len);
        let mut pins = self.pins.lock().unwrap_or_else(|e| e.into_inner());
        let before = pinned_pages(pins.iter().copied());
        let after = pinned_pages(pins.iter().copied().chain([range]));
        if after > before {
            crate::inject::check("pin")?;
            self.materialize()?;
            if self.trust == Trust::Checked {
                memory::check_mapped(self.host_addr(offset), len)?;
            }
            self.accounting.charge(after - before)?;
        }
        pins.push(range);
        Ok(())
    }

    /// Undoes one `pin` of the same bytes.
    pub fn unpin(&self, offset: u64, len: u64) {
        let range = self.page_range(offset, len);
        let mut pins = self.pins.lock().unwrap_or_else(|e| e.into_inner());
        let Some(i) = pins.iter().position(|r| *r == range) else {
            debug_assert!(false, "unpin of a range that was not pinned");
            return;
        };
        let before = pinned_pages(pins.iter().copied());
        pins.swap_remove(i);
        self.accounting.uncharge(before - pinned_pages(pins.iter().copied()));
    }

    /// Number of distinct pages pinned now.
    pub fn pinned(&self) -> u64 {
        pinned_pages(self.pins.lock().unwrap_or_else(|e| e.into_inner()).iter().copied())
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

impl Drop for Pages {
    fn drop(&mut self) {
        let pins = self.pins.get_mut().unwrap_or_else(|e| e.into_inner());
        debug_assert!(pins.is_empty(), "pages dropped while pinned");
        let n = pinned_pages(pins.drain(..));
        self.accounting.uncharge(n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::account::Limit;

    #[test]
    fn overlapping_pins_are_charged_once() {
        let acct = Accounting::isolated(Limit::Pages(100));
        let buf = vec![0u8; 10 * PAGE_SIZE as usize];
        let (p, lead) = Pages::user(buf.as_ptr() as u64, buf.len() as u64, true, Trust::Checked, acct.clone()).unwrap();
        p.pin(lead, 4 * PAGE_SIZE).unwrap();
        p.pin(lead + 2 * PAGE_SIZE, 4 * PAGE_SIZE).unwrap();
        assert_eq!(p.pinned(), 6 + u64::from(lead != 0));
        assert_eq!(acct.charged(), p.pinned());
        p.unpin(lead, 4 * PAGE_SIZE);
        p.unpin(lead + 2 * PAGE_SIZE, 4 * PAGE_SIZE);
        assert_eq!(acct.charged(), 0);
    }

    #[test]
    fn pin_count_counts_each_pages_object_once() {
        let buf = crate::memory::HostBuffer::new(4 * PAGE_SIZE as usize).unwrap();
        let (a, _) = Pages::user(buf.addr(), 4 * PAGE_SIZE, true, Trust::Direct, Accounting::none()).unwrap();
        let (b, _) = Pages::user(buf.addr() + PAGE_SIZE, PAGE_SIZE, true, Trust::Direct, Accounting::none()).unwrap();
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
    fn pin_over_the_limit_fails_and_charges_nothing() {
        let acct = Accounting::isolated(Limit::Pages(2));
        let buf = vec![0u8; 4 * PAGE_SIZE as usize];
        let (p, lead) = Pages::user(buf.as_ptr() as u64, buf.len() as u64, true, Trust::Direct, acct.clone()).unwrap();
        assert!(matches!(p.pin(lead, buf.len() as u64), Err(Error::NoMemory(_))));
        assert_eq!(acct.charged(), 0);
        assert_eq!(p.pinned(), 0);
    }

    #[test]
    fn pinning_unmapped_user_memory_is_efault() {
        let (p, lead) = Pages::user(PAGE_SIZE, PAGE_SIZE, true, Trust::Checked, Accounting::none()).unwrap();
        assert!(matches!(p.pin(lead, PAGE_SIZE), Err(Error::Fault(_))));
    }

    #[test]
    fn user_pages_reject_bad_lengths() {
        assert!(matches!(Pages::user(0, 0, true, Trust::Direct, Accounting::none()), Err(Error::Invalid(_))));
        assert!(matches!(
            Pages::user(u64::MAX - 10, 100, true, Trust::Direct, Accounting::none()),
            Err(Error::Overflow(_))
        ));
    }
}
