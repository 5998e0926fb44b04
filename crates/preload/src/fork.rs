//! Children forked by a program that opened `/dev/iommu`.
//!
//! Linux's iommufd is one kernel object however many processes hold its
//! descriptor, and a child's `IOMMU_IOAS_MAP` maps the child's memory into
//! it. A forked child of this process has only a copy of ioasid's state, so
//! each fork gets a socket to its parent (a *link*): the child's ioctls on
//! iommufd descriptors it inherited travel there and run on the parent's
//! contexts, which read and write the child's memory by pid (and take
//! mapped pages when Linux would pin them); so do its reads and writes of
//! fault queues and vEVENTQs it inherited. Commands that would hand the
//! child a new descriptor answer `EOPNOTSUPP`. What the child opens itself
//! is its own, and its own children reach it through links of their own.
//!
//! Every process has its own link to each process whose objects it uses,
//! so no two processes ever read each other's answers: before a process
//! forks, it asks each process it has a link to for a new one (a socket
//! end passed back with `SCM_RIGHTS`), which the child starts with.
//!
//! The parent serves a link from the open files it had when the child was
//! forked, so they stay open as long as the child may use them, as the
//! child's descriptors keep Linux's files open.
//!
//! Only `fork` (and `syscall(SYS_fork)`, which the shim turns into one)
//! runs the handlers here; a child made by a raw `clone` has a copy of
//! the parent's objects that nothing keeps in step.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::c_int;
use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{BorrowedFd, IntoRawFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard, Once};

use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer, SendAncillaryMessage,
    SendFlags, SocketFlags, SocketType,
};

use ioasid_abi::files::{self, File, Owner};
use ioasid_abi::user::OtherProcess;

use crate::real;

/// What a child asks its parent to do on one of its descriptors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    Ioctl {
        request: u32,
        arg: u64,
    },
    Read {
        buf: u64,
        count: u64,
        offset: i64,
    },
    Write {
        buf: u64,
        count: u64,
        offset: i64,
    },
    /// A link of its own for a child about to be forked.
    NewLink,
    /// The pages this process's contexts charge to process `pid`: locked
    /// (`VmLck`) or pinned (`VmPin`).
    Pages {
        pid: i32,
        locked: bool,
    },
}

/// A socket to a process that serves some of this one's descriptors.
struct Link {
    owner: Owner,
    fd: RawFd,
    /// One request at a time, whatever this process's threads do.
    one: Mutex<()>,
}

/// This process's links, one per process whose objects it uses.
static LINKS: Mutex<Vec<Arc<Link>>> = Mutex::new(Vec::new());

/// What `prepare` sets up for the parent and child handlers of one fork.
struct Forking {
    /// The program's handlers wait until the fork's bookkeeping is done:
    /// one that made an iommufd call meanwhile would wait on the locks held
    /// here.
    _shield: crate::signals::Shield,
    links: MutexGuard<'static, Vec<Arc<Link>>>,
    /// The ends of links this process serves, which a child must not keep
    /// (a child holding its sibling's server end would keep that sibling
    /// from seeing its parent go).
    serving: MutexGuard<'static, Vec<RawFd>>,
    /// The daemon's channel (daemon mode), which no thread may be using
    /// when the child starts; the child opens its own.
    _daemon: Option<MutexGuard<'static, Option<ioasid_serve::client::Chan>>>,
    /// Page tables' memory, which no thread may be changing either.
    _tables: ioasid_engine::pgtable::TablesHeld,
    /// For the child: a new link to each process this one has a link to.
    upstream: Vec<(Owner, RawFd)>,
    /// The link between this process (first) and the child (second).
    pair: Option<(RawFd, RawFd)>,
    /// The open files the child inherits from this process.
    served: HashMap<u64, File>,
    /// Who this process is, to the child.
    owner: Owner,
}

thread_local! {
    static FORKING: RefCell<Option<Forking>> = const { RefCell::new(None) };
}

/// `{op, pid, request, 0, a, b, c, serial}` and `{value or -1, errno, 0}`.
const REQUEST: usize = 48;
const REPLY: usize = 16;

impl Call {
    fn encode(self, serial: u64, pid: i32) -> [u8; REQUEST] {
        let (op, request, a, b, c) = match self {
            Call::Ioctl { request, arg } => (0u32, request, arg, 0, 0),
            Call::Read { buf, count, offset } => (1, 0, buf, count, offset as u64),
            Call::Write { buf, count, offset } => (2, 0, buf, count, offset as u64),
            Call::NewLink => (3, 0, 0, 0, 0),
            Call::Pages { pid, locked } => (4, u32::from(locked), pid as u64, 0, 0),
        };
        let mut m = [0u8; REQUEST];
        m[0..4].copy_from_slice(&op.to_le_bytes());
        m[4..8].copy_from_slice(&pid.to_le_bytes());
        m[8..12].copy_from_slice(&request.to_le_bytes());
        m[16..24].copy_from_slice(&a.to_le_bytes());
        m[24..32].copy_from_slice(&b.to_le_bytes());
        m[32..40].copy_from_slice(&c.to_le_bytes());
        m[40..48].copy_from_slice(&serial.to_le_bytes());
        m
    }

    fn decode(m: &[u8; REQUEST]) -> Option<(Call, u64, i32)> {
        let w32 = |at: usize| u32::from_le_bytes(m[at..at + 4].try_into().expect("4 bytes"));
        let w64 = |at: usize| u64::from_le_bytes(m[at..at + 8].try_into().expect("8 bytes"));
        let call = match w32(0) {
            0 => Call::Ioctl { request: w32(8), arg: w64(16) },
            1 => Call::Read { buf: w64(16), count: w64(24), offset: w64(32) as i64 },
            2 => Call::Write { buf: w64(16), count: w64(24), offset: w64(32) as i64 },
            3 => Call::NewLink,
            4 => Call::Pages { pid: w64(16) as i32, locked: w32(8) != 0 },
            _ => return None,
        };
        Some((call, w64(40), w32(4) as i32))
    }
}

/// A socket call, made again while a signal interrupts it: a reply left
/// unread would be taken by the next call on the link.
fn again(mut call: impl FnMut() -> isize) -> isize {
    loop {
        let n = call();
        // SAFETY: reading this thread's errno.
        if n >= 0 || unsafe { *libc::__errno_location() } != libc::EINTR {
            return n;
        }
    }
}

fn reply(value: i64, errno: c_int) -> [u8; REPLY] {
    let mut m = [0u8; REPLY];
    m[0..8].copy_from_slice(&value.to_le_bytes());
    m[8..12].copy_from_slice(&errno.to_le_bytes());
    m
}

/// Registers the fork handlers, once, when the first context is made.
pub fn install() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Resolved now: after a fork of a threaded process, looking symbols
        // up could wait forever on a lock another thread held.
        real::resolve_for_fork();
        // The engine's epoch registers its own fork handlers when first
        // used: before these, so that its lock is taken after the ones
        // below (handlers prepare in reverse order), never waited for by a
        // thread holding one of them.
        drop(ioasid_engine::epoch::pin());
        // Every call that changes capabilities comes through `credentials`.
        ioasid_engine::watch_credentials();
        // SAFETY: registering three handlers with the C signature
        // pthread_atfork expects; they live as long as the library.
        unsafe { libc::pthread_atfork(Some(prepare), Some(parent), Some(child)) };
    });
}

fn links() -> MutexGuard<'static, Vec<Arc<Link>>> {
    LINKS.lock().unwrap_or_else(|e| e.into_inner())
}

/// The ends of the links this process serves, one per serving thread.
static SERVING: Mutex<Vec<RawFd>> = Mutex::new(Vec::new());

fn serving() -> MutexGuard<'static, Vec<RawFd>> {
    SERVING.lock().unwrap_or_else(|e| e.into_inner())
}

fn close(fd: RawFd) {
    // SAFETY: a descriptor of this module's, closed once.
    unsafe { real::close()(fd) };
}

/// Holds the file table and the links across the fork, and makes the
/// child's links: to this process when it has objects of its own, and a
/// new one to every process this one has a link to.
extern "C" fn prepare() {
    let shield = crate::signals::Shield::raise();
    files::lock_for_fork();
    let links = links();
    let upstream = links.iter().filter_map(|l| Some((l.owner, l.new_link()?))).collect();
    let served = files::local_files();
    let pair = if served.values().any(|f| matches!(f, File::Iommufd(_) | File::Fault(_) | File::Veventq(_))) {
        rustix::net::socketpair(AddressFamily::UNIX, SocketType::SEQPACKET, SocketFlags::CLOEXEC, None)
            .ok()
            .map(|(a, b)| (a.into_raw_fd(), b.into_raw_fd()))
    } else {
        None
    };
    let owner = files::this_process();
    let serving = serving();
    let _daemon = crate::daemon::hold();
    let _tables = ioasid_engine::pgtable::hold_tables();
    let forking = Forking { _shield: shield, links, serving, _daemon, _tables, upstream, pair, served, owner };
    FORKING.with(|f| *f.borrow_mut() = Some(forking));
}

extern "C" fn parent() {
    let Some(forking) = FORKING.with(|f| f.borrow_mut().take()) else { return };
    files::unlock_after_fork(false);
    drop(forking.serving);
    forking.upstream.iter().for_each(|&(_, fd)| close(fd));
    if let Some((ours, theirs)) = forking.pair {
        close(theirs);
        spawn_server(ours, Arc::new(forking.served));
    }
    drop(forking.links);
}

extern "C" fn child() {
    let Some(forking) = FORKING.with(|f| f.borrow_mut().take()) else { return };
    files::unlock_after_fork(true);
    // The parent's objects, which this copy of them must never tear down.
    std::mem::forget(forking.served);
    let mut serving = forking.serving;
    serving.drain(..).for_each(close);
    drop(serving);
    let mut links = forking.links;
    // The parent's own links; a thread of the parent's may have been using
    // one, and whatever it held stays behind with them.
    for old in links.drain(..) {
        close(old.fd);
    }
    links.extend(forking.upstream.into_iter().map(|(owner, fd)| Arc::new(Link { owner, fd, one: Mutex::new(()) })));
    if let Some((theirs, ours)) = forking.pair {
        close(theirs);
        links.push(Arc::new(Link { owner: forking.owner, fd: ours, one: Mutex::new(()) }));
    }
}

impl Link {
    /// One request and its answer.
    fn call(&self, call: Call, serial: u64) -> Result<i64, c_int> {
        let _one = self.one.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: getpid has no preconditions.
        let msg = call.encode(serial, unsafe { libc::getpid() });
        let mut answer = [0u8; REPLY];
        // SAFETY: sending and receiving whole messages from and into buffers
        // of their sizes; MSG_NOSIGNAL keeps a gone parent from killing us.
        let ok = unsafe {
            again(|| libc::send(self.fd, msg.as_ptr().cast(), REQUEST, libc::MSG_NOSIGNAL)) == REQUEST as isize
                && again(|| libc::recv(self.fd, answer.as_mut_ptr().cast(), REPLY, 0)) == REPLY as isize
        };
        if !ok {
            return Err(libc::EIO);
        }
        let value = i64::from_le_bytes(answer[0..8].try_into().expect("8 bytes"));
        let errno = i32::from_le_bytes(answer[8..12].try_into().expect("4 bytes"));
        if value < 0 { Err(errno) } else { Ok(value) }
    }

    /// A new link to the same process, for a child about to be forked.
    fn new_link(&self) -> Option<RawFd> {
        let _one = self.one.lock().unwrap_or_else(|e| e.into_inner());
        let msg = Call::NewLink.encode(0, 0);
        // SAFETY: `fd` is this link's, open while the link is.
        let sock = unsafe { BorrowedFd::borrow_raw(self.fd) };
        rustix::io::retry_on_intr(|| rustix::net::send(sock, &msg, SendFlags::NOSIGNAL))
            .ok()
            .filter(|&n| n == REQUEST)?;
        let mut answer = [0u8; REPLY];
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let got = rustix::io::retry_on_intr(|| {
            rustix::net::recvmsg(sock, &mut [IoSliceMut::new(&mut answer)], &mut control, RecvFlags::CMSG_CLOEXEC)
        })
        .ok()?;
        let fd = control.drain().find_map(|m| match m {
            RecvAncillaryMessage::ScmRights(mut fds) => fds.next(),
            _ => None,
        });
        (got.bytes == REPLY).then_some(fd?.into_raw_fd())
    }
}

/// Runs `call` on the object behind open file `serial` of process `owner`
/// (an ancestor this process was forked from).
pub fn forward(owner: Owner, serial: u64, call: Call) -> Result<i64, c_int> {
    let link = links().iter().find(|l| l.owner == owner).cloned();
    link.map_or(Err(libc::EIO), |l| l.call(call, serial))
}

/// What this process's own contexts charge to process `pid`. A forked
/// child's copy of its parent's counters is stale for every process but
/// itself: what the parent charges is the parent's to tell.
fn local_pages(pid: i32, locked: bool) -> u64 {
    if !links().is_empty() && pid != std::process::id() as i32 {
        return 0;
    }
    let (lck, pin) = ioasid_engine::account::process_pages(Some(pid));
    if locked { lck } else { pin }
}

/// The pages every process this one shares objects with, itself
/// included, charges to process `pid`: what Linux's `VmLck` (`locked`) or
/// `VmPin` of `pid` would include of iommufd's pins.
pub fn charged_pages(pid: i32, locked: bool) -> u64 {
    let links: Vec<Arc<Link>> = links().clone();
    let elsewhere: u64 =
        links.iter().filter_map(|l| l.call(Call::Pages { pid, locked }, 0).ok()).map(|n| n as u64).sum();
    local_pages(pid, locked) + elsewhere
}

/// Carries out one of a child's calls here, on this process's objects.
fn run(call: Call, file: Option<&File>, pid: i32) -> Result<i64, c_int> {
    let child = OtherProcess { pid };
    match (call, file) {
        (Call::Ioctl { request, arg }, Some(File::Iommufd(ctx))) => {
            return ioasid_abi::ioctl(ctx, &child, request, arg).map(i64::from).map_err(|e| e.0);
        }
        (Call::Read { buf, count, offset }, Some(File::Fault(f))) => f.read(&child, buf, count as usize, offset),
        (Call::Read { buf, count, offset }, Some(File::Veventq(q))) => q.read(&child, buf, count as usize, offset),
        (Call::Write { buf, count, offset }, Some(File::Fault(f))) => f.write(&child, buf, count as usize, offset),
        (Call::Write { .. }, Some(File::Veventq(_))) => return Err(libc::EINVAL),
        (Call::Pages { pid, locked }, _) => return Ok(local_pages(pid, locked) as i64),
        _ => return Err(libc::EBADF),
    }
    .map(|n| n as i64)
    .map_err(|e| e.0)
}

fn spawn_server(link: RawFd, served: Arc<HashMap<u64, File>>) {
    serving().push(link);
    let spawned = std::thread::Builder::new().name("ioasid-fork".into()).spawn(move || serve(link, served));
    if spawned.is_err() {
        serving().retain(|&fd| fd != link);
        // The child's requests then fail with EIO rather than wait forever.
        close(link);
    }
}

/// Answers a request for a new link: a socket end served like this one.
fn new_link(link: RawFd, served: &Arc<HashMap<u64, File>>) -> bool {
    let answer = |fd: Option<BorrowedFd>, value: i64, errno: c_int| {
        let msg = reply(value, errno);
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        let fds;
        if let Some(fd) = fd {
            fds = [fd];
            control.push(SendAncillaryMessage::ScmRights(&fds));
        }
        // SAFETY: `link` is the served link, open while it is served.
        let sock = unsafe { BorrowedFd::borrow_raw(link) };
        rustix::net::sendmsg(sock, &[IoSlice::new(&msg)], &mut control, SendFlags::NOSIGNAL) == Ok(REPLY)
    };
    match rustix::net::socketpair(AddressFamily::UNIX, SocketType::SEQPACKET, SocketFlags::CLOEXEC, None) {
        Ok((ours, theirs)) => {
            let sent = answer(Some(std::os::fd::AsFd::as_fd(&theirs)), 0, 0);
            spawn_server(ours.into_raw_fd(), served.clone());
            close(theirs.into_raw_fd());
            sent
        }
        Err(e) => answer(None, -1, e.raw_os_error()),
    }
}

/// The parent's side of one child's link: runs its requests until it
/// closes (exits).
fn serve(link: RawFd, served: Arc<HashMap<u64, File>>) {
    ioasid_engine::memory::ioasid_thread_signals();
    let mut msg = [0u8; REQUEST];
    // SAFETY: receiving into a buffer of the size given.
    while unsafe { again(|| libc::recv(link, msg.as_mut_ptr().cast(), REQUEST, 0)) } == REQUEST as isize {
        let sent = match Call::decode(&msg) {
            Some((Call::NewLink, _, _)) => new_link(link, &served),
            decoded => {
                // A panic answers EIO rather than leave the child waiting.
                let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    decoded.map_or(Err(libc::EINVAL), |(call, serial, pid)| run(call, served.get(&serial), pid))
                }))
                .unwrap_or(Err(libc::EIO));
                let answer = match result {
                    Ok(v) => reply(v, 0),
                    Err(e) => reply(-1, e),
                };
                // SAFETY: sending a whole message from a buffer of its size.
                (unsafe { again(|| libc::send(link, answer.as_ptr().cast(), REPLY, libc::MSG_NOSIGNAL)) })
                    == REPLY as isize
            }
        };
        if !sent {
            break;
        }
    }
    serving().retain(|&fd| fd != link);
    close(link);
}
