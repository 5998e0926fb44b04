//! The daemon mode: with `IOASID_SOCKET` set (`ioasid run --socket PATH`),
//! `/dev/iommu` is a context in that daemon (`ioasid serve`), not in this
//! process. Opening it gets a socket the daemon made; ioctls on a socket
//! with iommufd's (or ioasid's) ioctl type go to the daemon, which answers
//! for its own files and says which are not; everything else about the
//! descriptor (`read` of a fault queue, `poll`, `close`, `dup`, passing it)
//! is the kernel's.

use std::collections::{BTreeMap, HashMap};
use std::ffi::c_int;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{LazyLock, Mutex, MutexGuard};

use arc_swap::ArcSwap;
use ioasid_abi::files::Kind;
use ioasid_serve::client::{Chan, Client};
use ioasid_serve::wire;

static CLIENT: LazyLock<Option<Client>> = LazyLock::new(|| {
    let path = std::env::var_os("IOASID_SOCKET").filter(|p| !p.is_empty())?;
    let path = std::ffi::CString::new(std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str())).ok()?;
    Some(Client::new(path, installed))
});

/// A number the daemon gave: the open file (`wire::identity`) and what it is.
type Given = ((u64, u64), Kind);

/// The files the daemon gave this process (opened, installed or
/// duplicated here), by number, with the open file each number was given
/// (a number closed behind the shim's back and reused names another file,
/// which is then not taken for it). Their reads and writes are the
/// kernel's, on the daemon's socket, but what Linux's files refuse (any
/// read of an iommufd, a positioned one of a queue, a size a queue does not
/// take) is refused here first, and a read of an iommufd does not wait on
/// the socket for ever. A file another process passed this one is not
/// here. Read without a lock, as a signal handler's `read` may come in the
/// middle of an update.
static GIVEN: LazyLock<ArcSwap<HashMap<c_int, Given>>> = LazyLock::new(ArcSwap::default);
/// Whether the daemon gave any, so that a program without pays nothing.
static ANY_GIVEN: AtomicBool = AtomicBool::new(false);

fn identity(fd: c_int) -> Option<(u64, u64)> {
    // SAFETY: only inspected for the call's duration; a closed fd fails fstat.
    wire::identity(unsafe { BorrowedFd::borrow_raw(fd) })
}

/// Whether `fd` is a socket: the daemon's files all are, so anything else
/// is not worth a message.
fn is_socket(fd: c_int) -> bool {
    // SAFETY: only inspected for the call's duration; a closed fd fails fstat.
    rustix::fs::fstat(unsafe { BorrowedFd::borrow_raw(fd) })
        .is_ok_and(|st| rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::Socket)
}

fn installed(fd: c_int, kind: u64) {
    let kind = match kind {
        wire::FILE_ACCESS => Kind::TestAccess,
        wire::FILE_FAULT => Kind::Fault,
        wire::FILE_VEVENTQ => Kind::Veventq,
        wire::FILE_DEVICE => Kind::Device,
        _ => return,
    };
    given_as(fd, kind);
}

fn given_as(fd: c_int, kind: Kind) {
    let Some(key) = identity(fd) else { return };
    GIVEN.rcu(|given| {
        let mut given = HashMap::clone(given);
        given.insert(fd, (key, kind));
        given
    });
    ANY_GIVEN.store(true, Ordering::Release);
}

/// What `fd` is when the daemon gave it to this process; `None` for any
/// other descriptor.
pub fn given(fd: c_int) -> Option<Kind> {
    if !ANY_GIVEN.load(Ordering::Acquire) {
        return None;
    }
    let (key, kind) = *GIVEN.load().get(&fd)?;
    (identity(fd)? == key).then_some(kind)
}

/// `new` is a duplicate of `old`: a file the daemon gave stays known.
pub fn duplicated(old: c_int, new: c_int) {
    if let Some(kind) = given(old) {
        given_as(new, kind);
    }
}

/// A read or write of a file the daemon gave this process, of a kind
/// that has it (see `Kind`), as Linux's file takes it: a queue refuses the
/// sizes Linux's does, and its read takes only what waits (0 when nothing
/// does) and, from a vEVENTQ, only whole events. `None` for what the
/// kernel does: a fault queue's write, a device's read.
pub fn given_rw(fd: c_int, kind: Kind, rw: Rw) -> Option<Result<usize, c_int>> {
    let fault = match kind {
        Kind::Fault => true,
        Kind::Veventq => false,
        _ => return None,
    };
    Some(match rw {
        Rw::Read { count, .. } if fault && count % ioasid_abi::fault::RECORD as u64 != 0 => Err(libc::ESPIPE),
        Rw::Read { buf, count } if fault => receive(fd, buf, count as usize, 0),
        Rw::Read { count, .. } if count < VEVENT_HEADER => Err(libc::EINVAL),
        Rw::Read { buf, count } => read_events(fd, buf, count as usize),
        Rw::Write { count } if fault && count % ioasid_abi::fault::RESPONSE as u64 != 0 => Err(libc::ESPIPE),
        Rw::Write { .. } if fault => return None,
        Rw::Write { .. } => Err(libc::EINVAL),
    })
}

/// A read into `buf` or a write, of `count` bytes.
#[derive(Debug, Clone, Copy)]
pub enum Rw {
    Read { buf: u64, count: u64 },
    Write { count: u64 },
}

/// One `recv` without waiting: 0 when nothing waits.
fn receive(fd: c_int, buf: u64, len: usize, flags: c_int) -> Result<usize, c_int> {
    // SAFETY: the program's own buffer of `len` bytes (the kernel checks
    // it: a bad one is EFAULT), or none with MSG_TRUNC's length query.
    let n = unsafe { libc::recv(fd, buf as *mut libc::c_void, len, flags | libc::MSG_DONTWAIT) };
    if n >= 0 {
        return Ok(n as usize);
    }
    // SAFETY: reading this thread's errno.
    match unsafe { *libc::__errno_location() } {
        libc::EAGAIN => Ok(0),
        e => Err(e),
    }
}

/// The events that wait and fit in `count` bytes, whole; `EINVAL` when
/// the first does not fit.
fn read_events(fd: c_int, buf: u64, count: usize) -> Result<usize, c_int> {
    let mut done = 0;
    let mut asked = false;
    loop {
        let mut next = receive(fd, 0, 0, libc::MSG_PEEK | libc::MSG_TRUNC)?;
        if next == 0 && !asked {
            // All read that was moved: the daemon moves what waits behind.
            asked = true;
            if let Some(c) = client() {
                c.flush()?;
            }
            next = receive(fd, 0, 0, libc::MSG_PEEK | libc::MSG_TRUNC)?;
        }
        if next == 0 {
            return Ok(done);
        }
        if next > count - done {
            return if done == 0 { Err(libc::EINVAL) } else { Ok(done) };
        }
        done += receive(fd, buf + done as u64, next, 0)?;
    }
}

/// Bytes in a vEVENTQ record's header, the least a read must take.
const VEVENT_HEADER: u64 = 8;

/// The holds of the daemon's memory this process maps, by address: each
/// keeps its object until the mapping is gone.
static HOLDS: Mutex<BTreeMap<u64, (u64, OwnedFd)>> = Mutex::new(BTreeMap::new());

/// The daemon, in daemon mode.
pub fn client() -> Option<&'static Client> {
    CLIENT.as_ref()
}

/// `open("/dev/iommu")` in daemon mode: `None` in-process.
pub fn open(flags: c_int) -> Option<Result<c_int, c_int>> {
    let opened = client()?.open(flags);
    if let Ok(fd) = opened {
        given_as(fd, Kind::Iommufd);
    }
    Some(opened)
}

/// Whether `request` may be the daemon's: iommufd's type (VFIO's too) or
/// ioasid's own.
fn may_be_ours(request: u32) -> bool {
    let kind = (request >> 8) & 0xff;
    kind == u32::from(b';') || kind == ioasid_abi::ext::IOASID_TYPE
}

/// `ioctl(fd, request, arg)` on a descriptor the daemon may have made:
/// `None` for any other (the kernel's).
pub fn ioctl(fd: c_int, request: u32, arg: u64) -> Option<Result<c_int, c_int>> {
    let client = client()?;
    if !may_be_ours(request) {
        return None;
    }
    if !is_socket(fd) {
        return None;
    }
    client.ioctl(fd, request, arg).map(|r| r.map(|v| v as c_int))
}

/// `mmap` of a descriptor the daemon may have made: `None` for any other.
/// `map` maps a descriptor of ours in the caller's place.
pub fn mmap(
    fd: c_int,
    len: usize,
    prot: c_int,
    flags: c_int,
    off: i64,
    map: impl FnOnce(c_int) -> *mut libc::c_void,
) -> Option<Result<*mut libc::c_void, c_int>> {
    let client = client()?;
    if !is_socket(fd) {
        return None;
    }
    let (memory, hold) = match client.mmap(fd, len, prot, flags, off) {
        Ok(fds) => fds,
        Err(libc::EBADF) => return None,
        Err(e) => return Some(Err(e)),
    };
    let p = map(memory.as_raw_fd());
    if p == libc::MAP_FAILED {
        // SAFETY: reading this thread's errno.
        return Some(Err(unsafe { *libc::__errno_location() }));
    }
    unmapped(p as u64, len as u64);
    HOLDS.lock().unwrap_or_else(|e| e.into_inner()).insert(p as u64, (p as u64 + len as u64, hold));
    Some(Ok(p))
}

/// `[addr, addr + len)` is no longer mapped: the holds of mappings wholly
/// inside it are let go.
pub fn unmapped(addr: u64, len: u64) {
    let end = addr.saturating_add(len);
    let mut holds = HOLDS.lock().unwrap_or_else(|e| e.into_inner());
    if holds.is_empty() {
        return;
    }
    let gone: Vec<u64> = holds.range(addr..end).filter(|(_, (e, _))| *e <= end).map(|(a, _)| *a).collect();
    for a in gone {
        holds.remove(&a);
    }
}

/// The pages the daemon charges to process `pid`, in daemon mode.
pub fn charged_pages(pid: i32, locked: bool) -> u64 {
    client().and_then(|c| c.pages(pid, locked).ok()).unwrap_or(0)
}

/// Held across `fork` by the forking thread.
pub fn hold() -> Option<MutexGuard<'static, Option<Chan>>> {
    client().map(Client::hold)
}
