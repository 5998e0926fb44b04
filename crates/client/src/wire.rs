//! The protocol between the daemon and the processes it serves: a
//! program's shim, and device back ends.
//!
//! A process talks to the daemon over one connection of its own, a
//! `SOCK_SEQPACKET` socket (a *channel*), so no two processes ever read each
//! other's answers; a forked child opens its own. Every message is one
//! [`Msg`], fixed size, in the machine's byte order (both ends are on the
//! same machine). The shim sends a request and reads messages until the
//! answer: while a command runs the daemon may first ask the shim to take a
//! descriptor it made ([`INSTALL`], the descriptor passed with
//! `SCM_RIGHTS`), which the shim answers with the number the program got.
//!
//! The daemon knows the caller by the channel's `SO_PEERCRED`, never by what
//! a message says; the descriptors a request names are the caller's
//! numbers, which the daemon takes a copy of (`pidfd_getfd`).

use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::io::Errno as SysErrno;
use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer, SendAncillaryMessage, SendFlags,
};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Shim to daemon: open a new context (`/dev/iommu`); `arg` is the open
/// flags. Answered with [`REPLY`] carrying the descriptor.
pub const OPEN: u32 = 1;
/// Shim to daemon: `ioctl(fd, request, arg)`.
pub const IOCTL: u32 = 2;
/// Shim to daemon: `mmap` of `arg2` bytes at offset `arg` of the iommufd
/// `fd`, with protection `request` and flags `value`. Answered with two
/// descriptors: the memory to map (at offset 0), and a *hold* that keeps
/// the object the memory belongs to until the shim closes it (at `munmap`).
pub const MMAP: u32 = 3;
/// Shim to daemon: the pages the daemon's contexts charge to process `arg`
/// (of the caller's user): locked (`VmLck`) when `request` is 1, else
/// pinned (`VmPin`).
pub const PAGES: u32 = 4;
/// Shim to daemon: move the records waiting in the daemon's queues into
/// their sockets (a vEVENTQ's next batch, once the program has read the
/// last). Answered with 0.
pub const FLUSH: u32 = 5;
/// Shim to daemon: serve the seccomp listener passed with this message (a
/// supervised program's, see `supervise`). Answered with 0.
pub const SUPERVISE: u32 = 6;
/// Back end to daemon: open a port on the device whose descriptor (the
/// back end's number) is `fd`; at PASID `arg` when `request` is 1, at the
/// RID when 0. Answered with the port's number in `value` and two
/// descriptors: its translation table and its reader slots (`atc`).
pub const PORT: u32 = 7;
/// Back end to daemon: a translation missed. Translate `arg2` bytes at IOVA
/// `arg` of port `fd` for `request` (`PERM_*`), publish what was found and
/// answer the table's generation once it is published (at least 1; or
/// [`CHANGED`], or `-errno`: `EFAULT` for a fault, `EPERM` once cut off),
/// after announcing any file the translations need with [`REGION`]. The
/// generation, not the one the back end reads on the answer, tells it
/// whether the table it looks in still holds the answer: a grace period
/// may empty the table in between.
pub const TRANSLATE: u32 = 8;
/// A [`TRANSLATE`] answer: the device's table changed while the daemon
/// translated (an unmap may have taken part of it), so nothing was
/// published; ask again.
pub const CHANGED: i64 = 0;
/// Read and write rights in [`TRANSLATE`] and in the table's extents.
pub const PERM_R: u32 = 1;
pub const PERM_W: u32 = 2;
/// Daemon to shim: the answer. `value` is the result, or `-errno`.
pub const REPLY: u32 = 16;
/// Daemon to shim: `fd` is not one of the daemon's; the shim lets the
/// kernel have the call.
pub const NOT_OURS: u32 = 17;
/// Daemon to shim: take the descriptor passed with this message
/// (close-on-exec when `request` is 1; what it is in `arg`, one of the
/// `FILE_*`) and answer with [`INSTALLED`].
pub const INSTALL: u32 = 18;
/// What an installed descriptor is, for the shim's answers to `read`,
/// `write` and the like: a file it leaves to the kernel (a dma-buf), a
/// selftest access, a fault queue, a vEVENTQ or a device for a back end.
pub const FILE_PLAIN: u64 = 0;
pub const FILE_ACCESS: u64 = 1;
pub const FILE_FAULT: u64 = 2;
pub const FILE_VEVENTQ: u64 = 3;
pub const FILE_DEVICE: u64 = 4;
/// Daemon to shim: close the program's descriptor `fd`, which a command that
/// failed after [`INSTALL`] must not leave behind. Not answered.
pub const UNINSTALL: u32 = 19;
/// Shim to daemon: the number the descriptor got (`value`), or `-errno`.
pub const INSTALLED: u32 = 20;
/// Daemon to back end, before a [`TRANSLATE`]'s answer: region `request`
/// of port `fd` is the file passed with this message, `arg` bytes from
/// offset 0, writable when `value` is 1. Not answered.
pub const REGION: u32 = 21;

/// One message.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
#[allow(missing_docs)]
pub struct Msg {
    pub kind: u32,
    /// The program's descriptor the request is about.
    pub fd: i32,
    pub request: u32,
    /// The calling thread's failure injection (its `fail-nth`): what it
    /// was when the request was sent, and what is left of it in the answer.
    pub fail_nth: u32,
    pub arg: u64,
    pub arg2: u64,
    pub value: i64,
}

/// Bytes in one message.
pub const MSG_SIZE: usize = size_of::<Msg>();
const _: () = assert!(MSG_SIZE == 40);

impl Msg {
    pub fn new(kind: u32) -> Self {
        Msg { kind, ..Msg::default() }
    }

    /// An answer: `Ok(value)` or an errno.
    pub fn reply(result: Result<i64, i32>) -> Self {
        Msg { kind: REPLY, value: result.unwrap_or_else(|e| -i64::from(e)), ..Msg::default() }
    }

    /// The answer's result.
    pub fn result(&self) -> Result<i64, i32> {
        if self.value < 0 { Err((-self.value) as i32) } else { Ok(self.value) }
    }
}

/// The most descriptors one message carries.
pub const MAX_FDS: usize = 2;

/// Sends `msg`, with `fds`, retrying on `EINTR`.
pub fn send(sock: BorrowedFd<'_>, msg: &Msg, fds: &[BorrowedFd<'_>]) -> Result<(), SysErrno> {
    debug_assert!(fds.len() <= MAX_FDS);
    match send_with(sock, msg.as_bytes(), fds)? {
        MSG_SIZE => Ok(()),
        _ => Err(SysErrno::MSGSIZE),
    }
}

/// Receives one message and the descriptors that came with it
/// (close-on-exec until whoever takes them says otherwise). `Ok(None)` when
/// the peer is gone; a message of the wrong size is `EPROTO`.
pub fn recv(sock: BorrowedFd<'_>) -> Result<Option<(Msg, Vec<OwnedFd>)>, SysErrno> {
    let mut bytes = [0u8; MSG_SIZE + 1];
    let (n, fds) = recv_with(sock, &mut bytes)?;
    match n {
        0 => Ok(None),
        MSG_SIZE => Ok(Some((Msg::read_from_bytes(&bytes[..MSG_SIZE]).map_err(|_| SysErrno::PROTO)?, fds))),
        _ => Err(SysErrno::PROTO),
    }
}

/// The most descriptors [`send_with`] and [`recv_with`] carry.
pub const MAX_PASSED: usize = 4;

/// Sends `bytes` (one message on a `SOCK_SEQPACKET` socket) with `fds`
/// (`SCM_RIGHTS`, at most [`MAX_PASSED`]), retrying on `EINTR`: how a VMM
/// hands a back end its device and memory. Returns the bytes sent.
pub fn send_with(sock: BorrowedFd<'_>, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> Result<usize, SysErrno> {
    if fds.len() > MAX_PASSED {
        return Err(SysErrno::INVAL);
    }
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_PASSED))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() {
        control.push(SendAncillaryMessage::ScmRights(fds));
    }
    loop {
        match rustix::net::sendmsg(sock, &[IoSlice::new(bytes)], &mut control, SendFlags::NOSIGNAL) {
            Err(SysErrno::INTR) => continue,
            r => return r,
        }
    }
}

/// Receives one message into `buf` and the descriptors that came with it
/// (close-on-exec); 0 bytes when the peer is gone. A message longer than
/// `buf` is `EPROTO`.
pub fn recv_with(sock: BorrowedFd<'_>, buf: &mut [u8]) -> Result<(usize, Vec<OwnedFd>), SysErrno> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_PASSED))];
    loop {
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let r = match rustix::net::recvmsg(sock, &mut [IoSliceMut::new(buf)], &mut control, RecvFlags::CMSG_CLOEXEC) {
            Err(SysErrno::INTR) => continue,
            r => r?,
        };
        let mut fds = Vec::new();
        for m in control.drain() {
            if let RecvAncillaryMessage::ScmRights(got) = m {
                fds.extend(got);
            }
        }
        if r.flags.contains(rustix::net::ReturnFlags::TRUNC) {
            return Err(SysErrno::PROTO);
        }
        return Ok((r.bytes, fds));
    }
}

/// A connected pair of `SOCK_SEQPACKET` sockets, close-on-exec.
pub fn seqpacket_pair() -> Result<(OwnedFd, OwnedFd), SysErrno> {
    rustix::net::socketpair(
        rustix::net::AddressFamily::UNIX,
        rustix::net::SocketType::SEQPACKET,
        rustix::net::SocketFlags::CLOEXEC,
        None,
    )
}

/// The identity of an open file: `(st_dev, st_ino)`.
pub fn identity(fd: impl AsFd) -> Option<(u64, u64)> {
    let st = rustix::fs::fstat(fd).ok()?;
    Some((st.st_dev, st.st_ino))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_and_its_descriptor_cross_a_channel() {
        let (a, b) = seqpacket_pair().unwrap();
        let (x, _y) = seqpacket_pair().unwrap();
        let mut m = Msg::new(IOCTL);
        m.fd = 7;
        m.arg = 0xdead_beef;
        send(a.as_fd(), &m, &[x.as_fd(), a.as_fd()]).unwrap();
        let (got, fds) = recv(b.as_fd()).unwrap().unwrap();
        assert_eq!(got, m);
        assert_eq!(fds.len(), 2);
        assert_eq!(identity(&fds[0]), identity(&x));
        assert_eq!(identity(&fds[1]), identity(&a));
        // `fds[1]` is `a` too: the peer is gone once both are closed.
        drop(fds);
        drop(a);
        assert!(recv(b.as_fd()).unwrap().is_none());
    }

    #[test]
    fn a_short_message_is_a_protocol_error() {
        let (a, b) = seqpacket_pair().unwrap();
        rustix::io::write(&a, &[1, 2, 3]).unwrap();
        assert_eq!(recv(b.as_fd()).unwrap_err(), SysErrno::PROTO);
    }

    #[test]
    fn errors_travel_as_negative_values() {
        assert_eq!(Msg::reply(Err(22)).result(), Err(22));
        assert_eq!(Msg::reply(Ok(5)).result(), Ok(5));
    }
}
