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
use zerocopy::IntoBytes;

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

impl FaultFile {
    /// `read(2)` of `count` bytes into `buf` at file position `offset`.
    pub fn read(&self, mem: &dyn UserMemory, buf: u64, count: usize, offset: i64) -> Result<usize, Errno> {
        if offset != 0 || count % RECORD != 0 {
            return Err(Errno::ESPIPE);
        }
        let groups = self.queue.read(count / RECORD)?;
        let mut out = Vec::with_capacity(groups.iter().map(|(_, g)| g.requests.len() * RECORD).sum());
        for (cookie, group) in &groups {
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
                    cookie: *cookie,
                };
                out.extend_from_slice(rec.as_bytes());
            }
        }
        if let Err(e) = mem.write(buf, &out) {
            let cookies: Vec<u32> = groups.iter().map(|g| g.0).collect();
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
        while done < count {
            let mut r = iommu_hwpt_page_response::default();
            if let Err(e) = mem.read(buf.wrapping_add(done as u64), r.as_mut_bytes()) {
                err = Some(e);
                break;
            }
            let response = match r.code {
                IOMMUFD_PAGE_RESP_SUCCESS => Response::Success,
                IOMMUFD_PAGE_RESP_INVALID => Response::Invalid,
                _ => {
                    err = Some(Errno::EINVAL);
                    break;
                }
            };
            if let Err(e) = self.queue.respond(r.cookie, response) {
                err = Some(e.into());
                break;
            }
            done += RESPONSE;
        }
        match (done, err) {
            (0, Some(e)) => Err(e),
            _ => Ok(done),
        }
    }
}
