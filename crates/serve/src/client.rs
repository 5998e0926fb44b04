//! The shim's side of a channel (see [`wire`](crate::wire)): the program's
//! `open("/dev/iommu")` and its ioctls on descriptors the daemon made.
//!
//! Each process has one channel, opened at its first call and again in a
//! forked child (whose calls must not read its parent's answers). The
//! channel's descriptor lives in the program's fd table, where the program
//! may close it behind our back (`close_range` before `exec` is common): its
//! identity is checked on every call, and a channel that is gone, or whose
//! number now names another file, is replaced.
//!
//! Calls are made with raw system calls (rustix), so none passes through
//! the shim's own hooks.

use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, IntoRawFd, OwnedFd};
use std::sync::{Mutex, MutexGuard};

use crate::wire::{self, Msg};

/// A process's channel.
pub struct Chan {
    pid: u32,
    fd: OwnedFd,
    key: (u64, u64),
}

/// A daemon, reached at a socket path.
pub struct Client {
    path: CString,
    chan: Mutex<Option<Chan>>,
    /// Told of each descriptor the daemon gives the program during a call,
    /// and what it is (`wire::FILE_*`).
    installed: fn(i32, u64),
}

/// Where a channel's descriptor goes: out of the low numbers programs
/// expect to get for their own files.
const HIGH_FD: i32 = 900;

impl Client {
    pub fn new(path: CString, installed: fn(i32, u64)) -> Client {
        Client { path, chan: Mutex::new(None), installed }
    }

    /// Holds calls back (across `fork`, so the child does not start with the
    /// channel locked by a thread it does not have).
    pub fn hold(&self) -> MutexGuard<'_, Option<Chan>> {
        self.chan.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `open("/dev/iommu", flags)`: the new descriptor (close-on-exec as
    /// `flags` say), or an errno.
    pub fn open(&self, flags: i32) -> Result<i32, i32> {
        let mut m = Msg::new(wire::OPEN);
        m.arg = flags as u64;
        let (reply, fds) = self.call(&m)?;
        reply.result()?;
        let fd = fds.into_iter().next().ok_or(libc::EPROTO)?;
        if flags & libc::O_CLOEXEC == 0 {
            let _ = rustix::io::fcntl_setfd(&fd, rustix::io::FdFlags::empty());
        }
        Ok(fd.into_raw_fd())
    }

    /// `ioctl(fd, request, arg)` when `fd` is the daemon's: `None` for any
    /// other file.
    pub fn ioctl(&self, fd: i32, request: u32, arg: u64) -> Option<Result<i64, i32>> {
        let mut m = Msg::new(wire::IOCTL);
        m.fd = fd;
        m.request = request;
        m.arg = arg;
        match self.call(&m) {
            Ok((r, _)) if r.kind == wire::NOT_OURS => None,
            Ok((r, _)) => Some(r.result()),
            Err(e) => Some(Err(e)),
        }
    }

    /// `mmap` of `len` bytes at `offset` of the daemon's iommufd `fd`: the
    /// memory to map (at offset 0) and the hold to close when it is unmapped.
    pub fn mmap(&self, fd: i32, len: usize, prot: i32, flags: i32, offset: i64) -> Result<(OwnedFd, OwnedFd), i32> {
        let mut m = Msg::new(wire::MMAP);
        m.fd = fd;
        m.arg = offset as u64;
        m.arg2 = len as u64;
        m.request = prot as u32;
        m.value = i64::from(flags);
        let (reply, fds) = self.call(&m)?;
        reply.result()?;
        let mut fds = fds.into_iter();
        match (fds.next(), fds.next()) {
            (Some(memory), Some(hold)) => Ok((memory, hold)),
            _ => Err(libc::EPROTO),
        }
    }

    /// The pages the daemon's contexts charge to process `pid`: locked
    /// (`VmLck`) or pinned (`VmPin`).
    pub fn pages(&self, pid: i32, locked: bool) -> Result<u64, i32> {
        let mut m = Msg::new(wire::PAGES);
        m.arg = pid as u64;
        m.request = u32::from(locked);
        Ok(self.call(&m)?.0.result()? as u64)
    }

    /// Asks for the records waiting in the daemon's queues.
    pub fn flush(&self) -> Result<(), i32> {
        self.call(&Msg::new(wire::FLUSH))?.0.result().map(|_| ())
    }

    /// Hands the daemon a supervised program's seccomp listener to serve.
    pub fn supervise(&self, listener: OwnedFd) -> Result<(), i32> {
        let chan = self.connect()?;
        wire::send(chan.fd.as_fd(), &Msg::new(wire::SUPERVISE), &[listener.as_fd()]).map_err(|e| e.raw_os_error())?;
        let (m, _) = wire::recv(chan.fd.as_fd()).map_err(|e| e.raw_os_error())?.ok_or(libc::ECONNRESET)?;
        m.result().map(|_| ())
    }

    /// Sends `msg` and serves the daemon's requests until the answer.
    fn call(&self, msg: &Msg) -> Result<(Msg, Vec<OwnedFd>), i32> {
        let mut guard = self.hold();
        let pid = std::process::id();
        let fresh = guard.as_ref().is_some_and(|c| c.pid == pid && wire::identity(&c.fd) == Some(c.key));
        if !fresh {
            if let Some(old) = guard.take() {
                if wire::identity(&old.fd) == Some(old.key) {
                    // A parent's channel, inherited by this forked child.
                    drop(old.fd);
                } else {
                    // Not ours to close: the number names another file now.
                    std::mem::forget(old.fd);
                }
            }
            *guard = Some(self.connect()?);
        }
        let chan = guard.as_ref().expect("connected above");
        let sock = chan.fd.as_fd();
        let lost = |_| libc::ECONNRESET;
        // The thread's failure injection travels with the call and back.
        let tid = ioasid_engine::inject::current_tid();
        let mut msg = *msg;
        msg.fail_nth = ioasid_engine::inject::fail_nth(tid);
        wire::send(sock, &msg, &[]).map_err(lost)?;
        loop {
            let (m, fds) = wire::recv(sock).map_err(lost)?.ok_or(libc::ECONNRESET)?;
            match m.kind {
                wire::INSTALL => {
                    let mut back = Msg::new(wire::INSTALLED);
                    back.value = match fds.into_iter().next() {
                        Some(fd) => {
                            if m.request == 0 {
                                let _ = rustix::io::fcntl_setfd(&fd, rustix::io::FdFlags::empty());
                            }
                            let n = fd.into_raw_fd();
                            (self.installed)(n, m.arg);
                            i64::from(n)
                        }
                        None => -i64::from(libc::EPROTO),
                    };
                    wire::send(sock, &back, &[]).map_err(lost)?;
                }
                wire::UNINSTALL => {
                    // SAFETY: the daemon gave this descriptor during this
                    // call, and the call has not returned it to the program.
                    drop(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(m.fd) });
                }
                _ => {
                    ioasid_engine::inject::set_fail_nth(tid, m.fail_nth);
                    return Ok((m, fds));
                }
            }
        }
    }

    fn connect(&self) -> Result<Chan, i32> {
        use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
        let errno = |e: rustix::io::Errno| e.raw_os_error();
        let sock = rustix::net::socket_with(AddressFamily::UNIX, SocketType::SEQPACKET, SocketFlags::CLOEXEC, None)
            .map_err(errno)?;
        let addr = SocketAddrUnix::new(self.path.as_c_str()).map_err(errno)?;
        rustix::net::connect(&sock, &addr).map_err(errno)?;
        let fd = match rustix::io::fcntl_dupfd_cloexec(&sock, HIGH_FD) {
            Ok(high) => high,
            Err(_) => sock,
        };
        let key = wire::identity(&fd).ok_or(libc::EBADF)?;
        debug_assert!(fd.as_raw_fd() >= 0);
        Ok(Chan { pid: std::process::id(), fd, key })
    }
}
