//! HW queues: a queue of a vIOMMU (a command queue, say) that the IOMMU
//! reads straight from guest memory, which the guest's owner places at a
//! guest physical address of the vIOMMU's stage 2 (Linux's
//! `IOMMU_HW_QUEUE_ALLOC`).
//!
//! The hardware reads the queue by physical address, so the memory under
//! it is pinned for the queue's lifetime and its IOVA range is locked:
//! unmapping it is `EBUSY` until the queue is destroyed. The pages must be
//! contiguous, as for hardware that takes one base address. Each vIOMMU
//! model says which queue types it offers and how they are indexed; the
//! mock's queues start at index 0 and go up one at a time, each holding the
//! one before it, so they are destroyed in descending order.

use std::any::Any;
use std::sync::{Arc, Weak};

use parking_lot::Mutex;

use crate::ioas::{Ioas, Pinned};
use crate::iova::{IovaRange, PAGE_SIZE};
use crate::{Error, Result};

pub use crate::model::selftest::{HW_QUEUE_TYPE_SELFTEST, SELFTEST_HW_QUEUE_MAX};

/// A HW queue object (`IOMMU_HW_QUEUE_ALLOC`): guest memory of a vIOMMU's
/// stage 2 that the emulated IOMMU reads directly. Its pages stay pinned and
/// its IOVA range locked (unmap is `EBUSY`) until the last `Arc` is dropped.
pub struct HwQueue {
    /// The vIOMMU it belongs to, kept alive (and busy) by it.
    _viommu: Arc<dyn Any + Send + Sync>,
    kind: u32,
    index: u32,
    base: u64,
    len: u64,
    /// Host address of the queue's first byte.
    host_addr: u64,
    ioas: Arc<Ioas>,
    pinned: Vec<Pinned>,
    /// The queue one index below, which may not go while this one exists.
    _prev: Option<Arc<HwQueue>>,
}

impl HwQueue {
    /// A queue of `kind` at `index` of `viommu` (made by
    /// `Viommu::add_hw_queue`), over `[base, base + len)` of its stage 2
    /// `ioas`, among its `queues`; its model has `max` queues of `kind`
    /// (`None`: no such type). Checked in Linux's order: the type, then
    /// the pin of its memory, then the model's rules on the index.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        viommu: Arc<dyn Any + Send + Sync>,
        ioas: &Arc<Ioas>,
        queues: &Mutex<Vec<Weak<HwQueue>>>,
        max: Option<u32>,
        kind: u32,
        index: u32,
        base: u64,
        len: u64,
    ) -> Result<Arc<Self>> {
        let range = IovaRange::from_len(base, len)?;
        let Some(max) = max else {
            return Err(Error::Unsupported("the vIOMMU has no HW queue of that type"));
        };
        crate::inject::check("HW queue")?;
        let first = range.start & !(PAGE_SIZE - 1);
        let pages = (range.last - first) / PAGE_SIZE + 1;
        let (pinned, hosts) = ioas.lock_pin(IovaRange::from_len(first, pages * PAGE_SIZE)?, false)?;
        let unpin = |e| {
            ioas.access_unpin(&pinned);
            Err(e)
        };
        if hosts.windows(2).any(|w| w[1] != w[0] + PAGE_SIZE) {
            return unpin(Error::Fault("the queue's pages are not contiguous"));
        }
        let host_addr = hosts[0] + (range.start - first);
        let mut queues = queues.lock();
        queues.retain(|q| q.strong_count() > 0);
        let live = |i: u32| queues.iter().filter_map(Weak::upgrade).find(|q| q.kind == kind && q.index == i);
        if index >= max {
            return unpin(Error::Invalid("no HW queue at that index"));
        }
        if live(index).is_some() {
            return unpin(Error::Exists("the HW queue at that index exists"));
        }
        let prev = match index.checked_sub(1).map(live) {
            Some(None) => return unpin(Error::Io("HW queues are allocated from index 0 up")),
            Some(prev) => prev,
            None => None,
        };
        let queue = Arc::new(HwQueue {
            _viommu: viommu,
            kind,
            index,
            base,
            len,
            host_addr,
            ioas: ioas.clone(),
            pinned,
            _prev: prev,
        });
        queues.push(Arc::downgrade(&queue));
        Ok(queue)
    }

    /// The queue's type, an `IOMMU_HW_QUEUE_TYPE_*` value of its vIOMMU's model.
    pub fn kind(&self) -> u32 {
        self.kind
    }

    /// The queue's index among the queues of its type on the vIOMMU, from 0.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// The queue's guest physical address (IOVA of the vIOMMU's stage 2) and length.
    pub fn range(&self) -> (u64, u64) {
        (self.base, self.len)
    }

    /// Host address of the queue's memory, which stays pinned while the queue exists.
    pub fn host_addr(&self) -> u64 {
        self.host_addr
    }
}

impl Drop for HwQueue {
    fn drop(&mut self) {
        self.ioas.access_unpin(&self.pinned);
    }
}
