//! The pump of a queue's socket: records waiting in a fault queue or a
//! vEVENTQ are written into the socket the program reads, and (for a fault
//! queue) the page responses the program writes are read back and handed
//! to the queue. One thread per queue; it ends when the program's end is
//! closed everywhere, or when the daemon drops the queue.
//!
//! A fault queue is a stream of whole records (each send a whole number of
//! them, small enough to stay one piece); a vEVENTQ is a `SOCK_SEQPACKET`
//! socket with one event per message, since its events differ in size.
//! A vEVENTQ keeps Linux's depth: events move into the socket only once
//! the program has read every event moved before, and those waiting there
//! still count against the depth, so the queue overflows as Linux's does
//! (a program that has read part of a batch gets room back only once it has
//! read all of it). Records made by a command (a selftest's triggered
//! events) move when the command ends, before its answer, so the program's
//! next read finds them, and the shim asks for the next batch when a read
//! has room left ([`wire::FLUSH`](crate::wire::FLUSH)).
//!
//! Under the shim, reads and writes of either follow Linux's rules exactly
//! (the shim checks sizes and reads without blocking, as Linux's files
//! do). A program without the shim reads the sockets as they are: a read
//! blocks until a record waits, a fault read whose size is not whole
//! records may end inside one, a vEVENTQ read gets one event (its end cut
//! off when the buffer is too small), and a bad page response is dropped
//! with a log line instead of failing the `write`.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};

use parking_lot::Mutex;

use rustix::event::{PollFd, PollFlags};

use ioasid_abi::InProcess;
use ioasid_abi::fault::{RECORD, RESPONSE};
use ioasid_abi::files::File;

/// Bytes taken from a queue per read: room for many fault records and
/// vEVENTQ events.
const CHUNK: usize = 64 * 1024;
/// The most bytes of fault records sent at once: a whole number of records
/// that the kernel queues as one piece.
const SEND: usize = 4096 / RECORD * RECORD;

enum Queue {
    Fault(Weak<ioasid_abi::fault::FaultFile>),
    Veventq(Weak<ioasid_abi::veventq::VeventqFile>),
}

/// One queue's pump.
pub struct Pump {
    queue: Queue,
    /// Readable while records wait.
    ready: OwnedFd,
    ours: Arc<OwnedFd>,
    /// Held while records move, so they reach the socket in order.
    moving: Mutex<Vec<u8>>,
    /// Commands running now: records they make wait for their `flush`.
    busy: Arc<AtomicUsize>,
}

/// Starts pumping `file` (a queue) into `ours`; `ready` is readable while
/// records wait.
pub fn start(file: &File, ready: OwnedFd, ours: Arc<OwnedFd>, busy: Arc<AtomicUsize>) -> Option<Arc<Pump>> {
    let queue = match file {
        File::Fault(f) => Queue::Fault(Arc::downgrade(f)),
        File::Veventq(v) => Queue::Veventq(Arc::downgrade(v)),
        _ => return None,
    };
    let p = Arc::new(Pump { queue, ready, ours, moving: Mutex::new(vec![0u8; CHUNK]), busy });
    let thread = p.clone();
    let spawned = std::thread::Builder::new().name("ioasid-queue".into()).spawn(move || pump(&thread));
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start a queue's pump");
        return None;
    }
    Some(p)
}

impl Pump {
    /// Moves the records waiting now into the socket: a command that made
    /// some (a selftest's triggered fault) is answered only after, so the
    /// program's next read finds them, as with Linux's queues.
    pub fn flush(&self) {
        let mut fds = [PollFd::new(&self.ready, PollFlags::IN)];
        if rustix::event::poll(&mut fds, Some(&rustix::time::Timespec { tv_sec: 0, tv_nsec: 0 })).is_ok_and(|n| n > 0) {
            self.deliver();
        }
    }

    fn deliver(&self) -> bool {
        let mut buf = self.moving.lock();
        deliver(&self.queue, &self.ours, &mut buf)
    }

    /// Whether its queue is still there.
    pub fn alive(&self) -> bool {
        match &self.queue {
            Queue::Fault(f) => f.strong_count() > 0,
            Queue::Veventq(v) => v.strong_count() > 0,
        }
    }
}

fn pump(p: &Pump) {
    let (queue, ready, ours) = (&p.queue, &p.ready, &p.ours);
    let mut responses: Vec<u8> = Vec::new();
    loop {
        let mut fds = [PollFd::new(ready, PollFlags::IN), PollFd::new(&**ours, PollFlags::IN | PollFlags::RDHUP)];
        // A second at most, to notice a queue the daemon dropped.
        let second = rustix::time::Timespec { tv_sec: 1, tv_nsec: 0 };
        match rustix::event::poll(&mut fds, Some(&second)) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(_) => return,
        }
        let (waiting, theirs) = (fds[0].revents(), fds[1].revents());
        if !p.alive() || theirs.intersects(PollFlags::HUP | PollFlags::ERR) {
            return;
        }
        if theirs.contains(PollFlags::IN) && !take_responses(queue, ours, &mut responses) {
            return;
        }
        if waiting.contains(PollFlags::IN) {
            // A command's records move at its end, and a vEVENTQ's batch
            // once the last is read: look again soon.
            if p.busy.load(Ordering::Acquire) > 0 || (matches!(queue, Queue::Veventq(_)) && unread(ours) > 0) {
                std::thread::sleep(std::time::Duration::from_millis(2));
                continue;
            }
            if !p.deliver() {
                return;
            }
        }
    }
}

/// Moves waiting records into the stream; false when the stream is gone.
fn deliver(queue: &Queue, ours: &OwnedFd, buf: &mut [u8]) -> bool {
    let f = match queue {
        Queue::Fault(f) => f,
        Queue::Veventq(v) => {
            let Some(v) = v.upgrade() else { return false };
            if unread(ours) > 0 {
                return true;
            }
            v.queue().moved_read();
            return v.take_moved(CHUNK).iter().all(|event| write_all(ours, event));
        }
    };
    let Some(f) = f.upgrade() else { return false };
    let n = match f.read(&InProcess, buf.as_mut_ptr() as u64, buf.len() / RECORD * RECORD, 0) {
        Ok(n) => n,
        Err(e) => {
            tracing::warn!(errno = e.0, "a fault queue's records could not be taken");
            0
        }
    };
    buf[..n].chunks(SEND).all(|records| write_all(ours, records))
}

/// Bytes sent into `ours` that the program has not read yet (`SIOCOUTQ`).
fn unread(ours: &OwnedFd) -> usize {
    let mut n: libc::c_int = 0;
    // SAFETY: SIOCOUTQ writes one int through the pointer, to `n`.
    let r = unsafe { libc::ioctl(ours.as_raw_fd(), libc::TIOCOUTQ, &mut n) };
    if r == 0 { n as usize } else { 0 }
}

fn write_all(ours: &OwnedFd, mut bytes: &[u8]) -> bool {
    while !bytes.is_empty() {
        match rustix::net::send(ours, bytes, rustix::net::SendFlags::NOSIGNAL) {
            Ok(n) => bytes = &bytes[n..],
            Err(rustix::io::Errno::INTR) => {}
            Err(_) => return false,
        }
    }
    true
}

/// Reads what the program wrote and answers whole page responses; false
/// when the stream is gone.
fn take_responses(queue: &Queue, ours: &OwnedFd, pending: &mut Vec<u8>) -> bool {
    let mut chunk = [0u8; 4096];
    let n = match rustix::io::read(ours.as_fd(), &mut chunk) {
        Ok(0) => return false,
        Ok(n) => n,
        Err(rustix::io::Errno::INTR | rustix::io::Errno::AGAIN) => return true,
        Err(_) => return false,
    };
    pending.extend_from_slice(&chunk[..n]);
    let whole = pending.len() / RESPONSE * RESPONSE;
    if whole == 0 {
        return true;
    }
    if let Queue::Fault(f) = queue
        && let Some(f) = f.upgrade()
        && let Err(e) = f.write(&InProcess, pending.as_ptr() as u64, whole, 0)
    {
        tracing::info!(errno = e.0, "a page response was refused");
    }
    pending.drain(..whole);
    true
}
