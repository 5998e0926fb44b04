//! Access to the calling program's memory and file descriptors: the ABI's
//! pointers and fds are untrusted, so every access is checked.
//!
//! This module and `files` import each other, through the queues' files,
//! on purpose: the caller's descriptors ([`Descriptors`]) hand out and find
//! ioasid files, and the fault queue's and vEVENTQ's files read and write
//! the caller's memory through [`UserMemory`]. Splitting the trait from the
//! files it names would only move the cycle between two smaller modules.

use std::os::fd::{FromRawFd, OwnedFd};

use ioasid_engine::memory::{self, Trust};

use crate::errno::Errno;
use crate::files::File;

/// The memory of the program issuing ioctls.
pub trait UserMemory {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), Errno>;
    fn write(&self, addr: u64, data: &[u8]) -> Result<(), Errno>;

    /// Writes `len` zero bytes at `addr` (Linux's `clear_user`).
    fn zero(&self, addr: u64, len: u64) -> Result<(), Errno> {
        let zeros = [0u8; 256];
        let mut off = 0;
        while off < len {
            let n = (len - off).min(zeros.len() as u64) as usize;
            self.write(addr.wrapping_add(off), &zeros[..n])?;
            off += n as u64;
        }
        Ok(())
    }

    /// The process whose memory this is, when it is not this one (a forked
    /// child whose ioctls its parent's ioasid carries out).
    fn pid(&self) -> Option<i32> {
        None
    }

    /// Whether the memory is a daemon client's, reached coherently (see
    /// `ProcessMemory::Client`); false for a forked child's.
    fn client(&self) -> bool {
        false
    }

    /// `EFAULT` unless `[addr, addr + len)` is mapped in the caller.
    fn mapped(&self, addr: u64, len: u64) -> Result<(), Errno> {
        match self.pid() {
            None => memory::check_mapped(addr, len).map_err(Errno::from),
            Some(pid) => memory::process_mapped(pid, addr, len, false).map_err(Errno::from),
        }
    }

    /// The caller's descriptors: `EOPNOTSUPP` when they cannot be reached
    /// from here (a forked child's, whose fd table is not ours).
    fn descriptors(&self) -> Result<&dyn Descriptors, Errno> {
        Ok(&ThisProcess)
    }

    /// Whether the `len` bytes at `addr` are all zero; `EFAULT` when any
    /// of them cannot be read.
    fn is_zero(&self, addr: u64, len: u64) -> Result<bool, Errno> {
        let mut chunk = [0u8; 256];
        let mut off = 0;
        let mut zero = true;
        while off < len {
            let n = (len - off).min(chunk.len() as u64) as usize;
            self.read(addr.wrapping_add(off), &mut chunk[..n])?;
            zero &= chunk[..n].iter().all(|&b| b == 0);
            off += n as u64;
        }
        Ok(zero)
    }
}

/// The calling program is this process (the preload shim, and tests).
#[derive(Debug, Default, Clone, Copy)]
pub struct InProcess;

impl UserMemory for InProcess {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), Errno> {
        memory::read(Trust::Checked, addr, buf).map_err(Errno::from)
    }

    fn write(&self, addr: u64, data: &[u8]) -> Result<(), Errno> {
        memory::write(Trust::Checked, addr, data).map_err(Errno::from)
    }
}

/// The calling program is another process, `pid`: a child forked after it
/// opened `/dev/iommu`, whose ioctls on the shared descriptor run here.
#[derive(Debug, Clone, Copy)]
pub struct OtherProcess {
    pub pid: i32,
}

impl UserMemory for OtherProcess {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), Errno> {
        memory::read_process(self.pid, addr, buf).map_err(Errno::from)
    }

    fn write(&self, addr: u64, data: &[u8]) -> Result<(), Errno> {
        memory::write_process(self.pid, addr, data).map_err(Errno::from)
    }

    fn pid(&self) -> Option<i32> {
        Some(self.pid)
    }

    fn descriptors(&self) -> Result<&dyn Descriptors, Errno> {
        Err(Errno::EOPNOTSUPP)
    }
}

/// The fd table of the program issuing ioctls: where the descriptors its
/// commands name are found, and where those they create go.
pub trait Descriptors {
    /// A reference of our own to the program's descriptor `fd`, whatever
    /// the program does with its own; `EBADF` when it is not open.
    fn get(&self, fd: i32) -> Result<OwnedFd, Errno>;

    /// The ioasid file the program's descriptor `fd` is, if it is one.
    fn file(&self, fd: i32) -> Option<File>;

    /// Gives the program a descriptor of `file`, whose kernel file (made
    /// here) is `fd`; `respond` is told the program's number for it, and
    /// when it fails the program is left without the descriptor.
    fn install(&self, file: File, fd: OwnedFd, respond: &mut dyn FnMut(i32) -> Result<(), Errno>) -> Result<(), Errno>;

    /// Gives the program `fd`, a plain kernel file (no ioasid object);
    /// returns the program's number for it.
    fn give(&self, fd: OwnedFd) -> Result<i32, Errno>;

    /// Whether these are this process's own descriptors.
    fn is_local(&self) -> bool {
        false
    }
}

/// This process's descriptors (the shim's program is this process).
#[derive(Debug, Default, Clone, Copy)]
pub struct ThisProcess;

impl Descriptors for ThisProcess {
    fn get(&self, fd: i32) -> Result<OwnedFd, Errno> {
        dup_fd(fd)
    }

    fn file(&self, fd: i32) -> Option<File> {
        crate::files::get(fd)
    }

    fn install(&self, file: File, fd: OwnedFd, respond: &mut dyn FnMut(i32) -> Result<(), Errno>) -> Result<(), Errno> {
        use std::os::fd::{AsRawFd, IntoRawFd};
        // On failure `fd` closes here, and `file` drops with it.
        respond(fd.as_raw_fd())?;
        crate::files::insert(fd.into_raw_fd(), file);
        Ok(())
    }

    fn give(&self, fd: OwnedFd) -> Result<i32, Errno> {
        Ok(std::os::fd::IntoRawFd::into_raw_fd(fd))
    }

    fn is_local(&self) -> bool {
        true
    }
}

/// Takes a reference of our own to the program's fd, so it stays valid
/// whatever the program does with its own; `EBADF` when it is not open.
pub fn dup_fd(fd: i32) -> Result<OwnedFd, Errno> {
    if fd < 0 {
        return Err(Errno::EBADF);
    }
    // SAFETY: F_DUPFD_CLOEXEC only reads the fd table; a closed fd fails.
    let new = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if new < 0 {
        return Err(Errno::EBADF);
    }
    // SAFETY: `new` is a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

/// A non-blocking eventfd: the fault queue's descriptor, readable while
/// page requests wait. Returns it and a second descriptor of the same
/// eventfd for the engine to signal through, whatever the program does
/// with its own.
pub fn new_eventfd() -> Result<(OwnedFd, OwnedFd), Errno> {
    ioasid_engine::inject::check("file")?;
    // SAFETY: eventfd creates a fresh descriptor.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if fd < 0 {
        return Err(new_fd_errno(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` is fresh and ours.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let signal = fd.try_clone().map_err(new_fd_errno)?;
    Ok((fd, signal))
}

/// Makes an eventfd readable (`ready`) or drains it.
pub fn signal_eventfd(fd: &OwnedFd, ready: bool) {
    use std::os::fd::AsRawFd;
    let mut value = 1u64;
    // SAFETY: eight bytes to or from a live eventfd; errors (a full counter,
    // nothing to drain) leave it as wanted.
    unsafe {
        if ready {
            libc::write(fd.as_raw_fd(), (&raw const value).cast(), 8);
        } else {
            libc::read(fd.as_raw_fd(), (&raw mut value).cast(), 8);
        }
    }
}

/// A new descriptor for an object the ABI hands out (close-on-exec, as
/// Linux's anonymous-inode files are). It is a memfd: a real descriptor that
/// ordinary fd handling works on.
pub fn new_fd(name: &std::ffi::CStr) -> Result<OwnedFd, Errno> {
    new_fd_with(name, true)
}

/// `new_fd`, choosing close-on-exec (as `open` does with `O_CLOEXEC`).
pub fn new_fd_with(name: &std::ffi::CStr, cloexec: bool) -> Result<OwnedFd, Errno> {
    ioasid_engine::inject::check("file")?;
    let flags = if cloexec { libc::MFD_CLOEXEC } else { 0 };
    // SAFETY: memfd_create with a valid nul-terminated name.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), flags) };
    if fd < 0 {
        return Err(new_fd_errno(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Why a new descriptor could not be made, as Linux's `get_unused_fd_flags`
/// and `alloc_file` say it: out of descriptor numbers is `EMFILE` (the
/// process's limit) or `ENFILE` (the system's), anything else `ENOMEM`.
fn new_fd_errno(e: std::io::Error) -> Errno {
    match e.raw_os_error() {
        Some(n @ (libc::EMFILE | libc::ENFILE)) => Errno(n),
        _ => Errno::ENOMEM,
    }
}
