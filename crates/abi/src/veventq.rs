//! A vEVENTQ's file descriptor: `read` delivers whole events, each as a
//! `struct iommufd_vevent_header` followed by the event's data (nothing
//! after the lost-events marker's header). Positioned reads are `ESPIPE`;
//! a read shorter than a header is `EINVAL` whether or not events wait, as
//! is one too short for the first waiting event.

use std::os::fd::OwnedFd;
use std::sync::Arc;

use ioasid_engine::{Context, Veventq};
use zerocopy::IntoBytes;

use crate::errno::Errno;
use crate::uapi::iommufd_vevent_header;
use crate::user::{UserMemory, signal_eventfd};

pub struct VeventqFile {
    /// The fd keeps its context open, as in Linux.
    _ctx: Arc<Context>,
    queue: Arc<Veventq>,
}

impl VeventqFile {
    /// Ties `queue` to a descriptor: `signal` (a second descriptor of the
    /// program's eventfd) is made readable while events wait.
    pub(crate) fn new(ctx: Arc<Context>, queue: Arc<Veventq>, signal: OwnedFd) -> Self {
        queue.set_notifier(Box::new(move |ready| signal_eventfd(&signal, ready)));
        VeventqFile { _ctx: ctx, queue }
    }

    pub fn queue(&self) -> &Arc<Veventq> {
        &self.queue
    }

    /// `read(2)` of `count` bytes into `buf` at file position `offset`.
    pub fn read(&self, mem: &dyn UserMemory, buf: u64, count: usize, offset: i64) -> Result<usize, Errno> {
        if offset != 0 {
            return Err(Errno::ESPIPE);
        }
        if count < std::mem::size_of::<iommufd_vevent_header>() {
            return Err(Errno::EINVAL);
        }
        let events = self.queue.read(count).ok_or(Errno::EINVAL)?;
        let mut out = Vec::with_capacity(count.min(4096));
        for e in &events {
            out.extend_from_slice(&record(e));
        }
        if let Err(e) = mem.write(buf, &out) {
            self.queue.unread(events);
            return Err(e);
        }
        Ok(out.len())
    }

    /// Takes the events waiting that fit in `count` bytes, each as the
    /// record a `read` gives (header, then data), for a reader that passes
    /// them on one by one; they count against the queue's depth until
    /// `moved_read` (see `Veventq::take_moved`).
    pub fn take_moved(&self, count: usize) -> Vec<Vec<u8>> {
        self.queue.take_moved(count).iter().map(record).collect()
    }
}

/// An event as `read` delivers it.
fn record(e: &ioasid_engine::veventq::Vevent) -> Vec<u8> {
    let mut r = Vec::with_capacity(size_of::<iommufd_vevent_header>() + e.data.len());
    r.extend_from_slice(iommufd_vevent_header { flags: e.flags, sequence: e.sequence }.as_bytes());
    r.extend_from_slice(&e.data);
    r
}

impl Drop for VeventqFile {
    fn drop(&mut self) {
        self.queue.set_notifier(Box::new(|_| {}));
    }
}
