//! Accesses: users of an IOAS inside the engine that reach its memory
//! without a page table — an emulated device doing DMA by IOVA, a mediated
//! driver. They pin ranges or copy through them, and are told when a range
//! they pin is being unmapped so they can let go (Linux's `iommufd_access`).

use std::sync::{Arc, Weak};

use parking_lot::{Mutex, MutexGuard};

use crate::error::{Error, Result};
use crate::ioas::{Ioas, Pinned, UnmapNotice};
use crate::iova::{IovaRange, PAGE_SIZE};

/// The driver behind an access.
pub trait AccessOps: Send + Sync {
    /// `[iova, iova + len)` is being unmapped: unpin whatever pins it holds
    /// there before returning, or the unmap fails.
    fn unmap(&self, iova: u64, len: u64);
}

/// An in-kernel-style user of one IOAS (Linux's `iommufd_access`): it reads,
/// writes and pins memory by IOVA through the IOAS's mappings rather than
/// through a page table. Created by [`Context::access_create`]; while it pins
/// a range, an unmap of that range first asks its [`AccessOps`] to let go.
///
/// [`Context::access_create`]: crate::Context::access_create
pub struct Access {
    ops: Arc<dyn AccessOps>,
    /// Drivers that pin pages need page-aligned IOVAs.
    needs_pin_pages: bool,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    ioas: Option<Arc<Ioas>>,
    pins: Vec<(IovaRange, Vec<Pinned>)>,
}

impl Access {
    pub(crate) fn new(ops: Arc<dyn AccessOps>, needs_pin_pages: bool) -> Arc<Access> {
        Arc::new(Access { ops, needs_pin_pages, state: Mutex::new(State::default()) })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock()
    }

    fn alignment(&self) -> u64 {
        if self.needs_pin_pages { PAGE_SIZE } else { 1 }
    }

    pub(crate) fn ioas(&self) -> Option<Arc<Ioas>> {
        self.state().ioas.clone()
    }

    /// Moves the access to `new` (or detaches it). The driver is told to drop
    /// everything it pinned in the old IOAS first.
    pub(crate) fn set_ioas(self: &Arc<Self>, new: Option<Arc<Ioas>>) -> Result<()> {
        let old = self.ioas();
        if let (Some(o), Some(n)) = (&old, &new)
            && Arc::ptr_eq(o, n)
        {
            return Ok(());
        }
        if let Some(n) = &new {
            n.add_access(Arc::downgrade(self) as Weak<dyn UnmapNotice>, self.alignment())?;
        }
        if let Some(o) = &old {
            self.ops.unmap(0, u64::MAX);
            o.remove_access(Arc::as_ptr(self).cast());
        }
        self.state().ioas = new;
        Ok(())
    }

    /// Pins `[iova, iova + len)` and returns the host address of each CPU
    /// page it covers.
    pub fn pin_pages(&self, iova: u64, len: u64, write: bool) -> Result<Vec<u64>> {
        if !self.needs_pin_pages {
            return Err(Error::Invalid("this access does not pin pages"));
        }
        let range = IovaRange::from_len(iova, len)?;
        let mut st = self.state();
        let ioas = st.ioas.clone().ok_or(Error::NotFound("access is not attached"))?;
        let (pinned, pages) = ioas.access_pin(range, write)?;
        st.pins.push((range, pinned));
        Ok(pages)
    }

    /// Undoes a `pin_pages` of the same range.
    pub fn unpin_pages(&self, iova: u64, len: u64) {
        let Ok(range) = IovaRange::from_len(iova, len) else { return };
        let mut st = self.state();
        let Some(i) = st.pins.iter().position(|(r, _)| *r == range) else {
            debug_assert!(false, "unpin of a range that was not pinned");
            return;
        };
        let (_, pinned) = st.pins.swap_remove(i);
        if let Some(ioas) = &st.ioas {
            ioas.access_unpin(&pinned);
        }
    }

    /// Copies `buf.len()` bytes at `iova` out of the IOAS, as
    /// `iommufd_access_rw` does for a read. Fails with `Invalid` (EINVAL) for
    /// an empty `buf` or a range being unmapped, `NotFound` (ENOENT) when the
    /// access is detached or the range is not fully mapped, `Permission`
    /// (EPERM) when a mapping is not readable, `Fault` (EFAULT) when the
    /// memory behind it is gone.
    pub fn read(&self, iova: u64, buf: &mut [u8]) -> Result<()> {
        self.rw(iova, buf, false)
    }

    /// Copies `data` into the IOAS at `iova`; the errors of [`Access::read`],
    /// with `Permission` (EPERM) for a mapping that is not writable.
    pub fn write(&self, iova: u64, data: &[u8]) -> Result<()> {
        let mut tmp = data.to_vec();
        self.rw(iova, &mut tmp, true)
    }

    fn rw(&self, iova: u64, buf: &mut [u8], write: bool) -> Result<()> {
        if buf.is_empty() {
            return Err(Error::Invalid("length is zero"));
        }
        let ioas = self.ioas().ok_or(Error::NotFound("access is not attached"))?;
        ioas.access_rw(iova, buf, write)
    }
}

impl UnmapNotice for Access {
    fn notify_unmap(&self, iova: u64, len: u64) {
        self.ops.unmap(iova, len);
    }
}
