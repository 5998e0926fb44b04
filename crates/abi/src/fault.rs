//! The fault queue's file descriptor: `read` delivers page requests as
//! `struct iommu_hwpt_pgfault` records, whole groups at a time; `write`
//! takes `struct iommu_hwpt_page_response`s. Both follow Linux's rules
//! (positioned I/O is `ESPIPE`, as are sizes that are not whole records).
//!
//! The caller's count only bounds the work: a read builds no more than the
//! records waiting, and a write takes responses from the caller's memory one
//! at a time, as Linux does, so no count (up to `SIZE_MAX`) is ever an
//! allocation.

use std::sync::Arc;

use ioasid_engine::fault::Response;
use ioasid_engine::{Context, FaultQueue};
use zerocopy::{FromBytes, IntoBytes};

use crate::errno::Errno;
use crate::uapi::{IOMMUFD_PAGE_RESP_INVALID, IOMMUFD_PAGE_RESP_SUCCESS, iommu_hwpt_page_response, iommu_hwpt_pgfault};
use crate::user::{UserMemory, signal_eventfd};
use std::os::fd::OwnedFd;

pub struct FaultFile {
    /// The fd keeps its context open, as in Linux.
    _ctx: Arc<Context>,
    queue: Arc<FaultQueue>,
}

impl FaultFile {
    /// Ties `queue` to a descriptor: `signal` (a second descriptor of the
    /// program's eventfd) is made readable while requests wait.
    pub(crate) fn new(ctx: Arc<Context>, queue: Arc<FaultQueue>, signal: OwnedFd) -> Self {
        queue.set_notifier(Box::new(move |ready| signal_eventfd(&signal, ready)));
        FaultFile { _ctx: ctx, queue }
    }
}

impl Drop for FaultFile {
    /// The last descriptor closed: nobody will answer, so every request
    /// still pending is refused, and no device waits forever.
    fn drop(&mut self) {
        self.queue.set_notifier(Box::new(|_| {}));
        self.queue.abort(None);
    }
}

/// Bytes in one fault record, and in one page response.
pub const RECORD: usize = size_of::<iommu_hwpt_pgfault>();
pub const RESPONSE: usize = size_of::<iommu_hwpt_page_response>();
/// Responses a write reads from the caller's memory at once.
const BATCH: usize = 64;

impl FaultFile {
    /// `read(2)` of `count` bytes into `buf` at file position `offset`.
    pub fn read(&self, mem: &dyn UserMemory, buf: u64, count: usize, offset: i64) -> Result<usize, Errno> {
        if offset != 0 || count % RECORD != 0 {
            return Err(Errno::ESPIPE);
        }
        // The groups are lent, not copied: only their records are built,
        // and the lock goes before the caller's memory is touched.
        let lent = self.queue.lend(count / RECORD)?;
        let mut out = Vec::with_capacity(lent.iter().map(|(_, g)| g.requests.len() * RECORD).sum());
        for (cookie, group) in lent.iter() {
            for r in &group.requests {
                let rec = iommu_hwpt_pgfault {
                    flags: r.flags,
                    dev_id: r.dev_id,
                    pasid: r.pasid,
                    grpid: r.grpid,
                    perm: r.perm,
                    __reserved: 0,
                    addr: r.addr,
                    length: 0,
                    cookie,
                };
                out.extend_from_slice(rec.as_bytes());
            }
        }
        drop(lent);
        if let Err(e) = mem.write(buf, &out) {
            // The records name their groups' cookies, in order.
            let mut cookies: Vec<u32> = out
                .chunks_exact(RECORD)
                .map(|rec| iommu_hwpt_pgfault::read_from_bytes(rec).expect("whole records").cookie)
                .collect();
            cookies.dedup();
            self.queue.unread(&cookies);
            return Err(e);
        }
        Ok(out.len())
    }

    /// `write(2)` of the `count` bytes of responses at `buf`; stops at the
    /// first bad one (or the first it cannot read), reporting what was taken
    /// before it.
    pub fn write(&self, mem: &dyn UserMemory, buf: u64, count: usize, offset: i64) -> Result<usize, Errno> {
        if offset != 0 || count % RESPONSE != 0 {
            return Err(Errno::ESPIPE);
        }
        let mut done = 0;
        let mut err = None;
        // Responses are read a batch at a time and answered under one hold
        // of the queue's lock; a batch the caller's memory cannot give whole
        // is read one response at a time, to stop exactly where it fails.
        let mut batch = [iommu_hwpt_page_response::default(); BATCH];
        while done < count && err.is_none() {
            let n = ((count - done) / RESPONSE).min(BATCH);
            let at = buf.wrapping_add(done as u64);
            let got = match mem.read(at, batch[..n].as_mut_bytes()) {
                Ok(()) => n,
                Err(_) => {
                    let mut got = 0;
                    while got < n {
                        if let Err(e) = mem.read(at.wrapping_add((got * RESPONSE) as u64), batch[got].as_mut_bytes()) {
                            err = Some(e);
                            break;
                        }
                        got += 1;
                    }
                    got
                }
            };
            let mut responses = self.queue.responses();
            for r in &batch[..got] {
                let response = match r.code {
                    IOMMUFD_PAGE_RESP_SUCCESS => Response::Success,
                    IOMMUFD_PAGE_RESP_INVALID => Response::Invalid,
                    _ => {
                        err = Some(Errno::EINVAL);
                        break;
                    }
                };
                if let Err(e) = responses.respond(r.cookie, response) {
                    err = Some(e.into());
                    break;
                }
                done += RESPONSE;
            }
        }
        match (done, err) {
            (0, Some(e)) => Err(e),
            _ => Ok(done),
        }
    }
}
