//! Fault queues: page requests delivered to whoever owns the page table a
//! device faulted on, read in groups and answered by cookie (Linux's
//! `iommufd_fault`).

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::error::{Error, Result};

/// `IOMMU_PGFAULT_FLAGS_*`.
pub const PASID_VALID: u32 = 1 << 0;
pub const LAST_PAGE: u32 = 1 << 1;

/// One page request, as a PCIe PRI message carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageRequest {
    pub flags: u32,
    /// The device's object ID in the context the queue belongs to.
    pub dev_id: u32,
    pub pasid: u32,
    pub grpid: u32,
    /// `IOMMU_PGFAULT_PERM_*`.
    pub perm: u32,
    pub addr: u64,
}

/// The requests of one group, answered together.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    pub requests: Vec<PageRequest>,
}

/// How a group is answered (`IOMMUFD_PAGE_RESP_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Response {
    Success,
    Invalid,
}

#[derive(Default)]
struct Queue {
    /// Reported, not yet read.
    deliver: VecDeque<Group>,
    /// Read, awaiting a response, by cookie.
    pending: BTreeMap<u32, Group>,
}

#[derive(Default)]
pub struct FaultQueue {
    queue: Mutex<Queue>,
}

impl FaultQueue {
    pub fn new() -> Arc<FaultQueue> {
        Arc::new(FaultQueue::default())
    }

    fn queue(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn report(&self, group: Group) {
        self.queue().deliver.push_back(group);
    }

    /// Takes whole groups, in order, while their requests fit in `max`
    /// records, giving each a cookie. `EINVAL` when not even the first fits.
    pub fn read(&self, max: usize) -> Result<Vec<(u32, Group)>> {
        let mut q = self.queue();
        let mut out = Vec::new();
        let mut used = 0;
        while let Some(g) = q.deliver.front() {
            if used + g.requests.len() > max {
                if out.is_empty() {
                    return Err(Error::Invalid("buffer too small for the next fault group"));
                }
                break;
            }
            let g = q.deliver.pop_front().expect("front exists");
            used += g.requests.len();
            // The lowest free cookie, from 1, as Linux allocates them.
            let cookie = (1..).find(|c| !q.pending.contains_key(c)).expect("cookies left");
            q.pending.insert(cookie, g.clone());
            out.push((cookie, g));
        }
        Ok(out)
    }

    /// Puts groups whose delivery failed back at the head of the queue.
    pub fn unread(&self, cookies: &[u32]) {
        let mut q = self.queue();
        for c in cookies.iter().rev() {
            if let Some(g) = q.pending.remove(c) {
                q.deliver.push_front(g);
            }
        }
    }

    /// Answers the group read with `cookie`.
    pub fn respond(&self, cookie: u32, response: Response) -> Result<Group> {
        let _ = response;
        self.queue().pending.remove(&cookie).ok_or(Error::Invalid("no fault group has that cookie"))
    }

    /// Groups waiting to be read, and groups awaiting a response.
    pub fn counts(&self) -> (usize, usize) {
        let q = self.queue();
        (q.deliver.len(), q.pending.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(n: usize) -> Group {
        let r = PageRequest { flags: LAST_PAGE, dev_id: 1, pasid: 0, grpid: 2, perm: 1, addr: 0x1000 };
        Group { requests: vec![r; n] }
    }

    #[test]
    fn groups_are_read_whole_and_answered_once() {
        let q = FaultQueue::new();
        q.report(group(2));
        q.report(group(1));
        assert_eq!(q.read(1), Err(Error::Invalid("buffer too small for the next fault group")));
        let got = q.read(2).unwrap();
        assert_eq!((got.len(), got[0].0), (1, 1));
        let got = q.read(8).unwrap();
        assert_eq!(got[0].0, 2);
        assert!(q.read(8).unwrap().is_empty());
        q.respond(1, Response::Success).unwrap();
        assert!(q.respond(1, Response::Success).is_err(), "a second response is refused");
        assert_eq!(q.counts(), (0, 1));
        q.unread(&[2]);
        assert_eq!(q.counts(), (1, 0));
    }
}
