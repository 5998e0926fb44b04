//! Children forked by a program that opened `/dev/iommu`.
//!
//! Linux's iommufd is one kernel object however many processes hold its
//! descriptor, and a child's `IOMMU_IOAS_MAP` maps the child's memory into
//! it. A forked child of this process has only a copy of ioasid's state, so
//! each fork gets a socket to its parent: the child's ioctls on iommufd
//! descriptors it inherited travel there and run on the parent's contexts,
//! which read and write the child's memory by pid (and take mapped pages
//! when Linux would pin them); so do its reads and writes of fault queues
//! and vEVENTQs it inherited. Commands that would hand the child a new
//! descriptor answer `EOPNOTSUPP`. A grandchild shares its parent's link.

use std::ffi::c_int;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Mutex, Once};

use ioasid_abi::files::{self, File};
use ioasid_abi::user::OtherProcess;

use crate::real;

/// The socket pair made for the fork under way, from `prepare` to the
/// `parent` and `child` handlers.
static PENDING: [AtomicI32; 2] = [AtomicI32::new(-1), AtomicI32::new(-1)];
/// In a child: its end of the link to the parent that serves its ioctls.
static PARENT: AtomicI32 = AtomicI32::new(-1);
/// One request at a time per link, whatever the child's threads do.
static LINK: Mutex<()> = Mutex::new(());

/// What a child asks its parent to do on one of its descriptors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    Ioctl { request: u32, arg: u64 },
    Read { buf: u64, count: u64, offset: i64 },
    Write { buf: u64, count: u64, offset: i64 },
}

/// `{op, fd, pid, request, a, b, c}` and `{value or -1, errno, 0}`.
const REQUEST: usize = 40;
const REPLY: usize = 16;

impl Call {
    fn encode(self, fd: c_int, pid: i32) -> [u8; REQUEST] {
        let (op, request, a, b, c) = match self {
            Call::Ioctl { request, arg } => (0u32, request, arg, 0, 0),
            Call::Read { buf, count, offset } => (1, 0, buf, count, offset as u64),
            Call::Write { buf, count, offset } => (2, 0, buf, count, offset as u64),
        };
        let mut m = [0u8; REQUEST];
        m[0..4].copy_from_slice(&op.to_le_bytes());
        m[4..8].copy_from_slice(&fd.to_le_bytes());
        m[8..12].copy_from_slice(&pid.to_le_bytes());
        m[12..16].copy_from_slice(&request.to_le_bytes());
        m[16..24].copy_from_slice(&a.to_le_bytes());
        m[24..32].copy_from_slice(&b.to_le_bytes());
        m[32..40].copy_from_slice(&c.to_le_bytes());
        m
    }

    fn decode(m: &[u8; REQUEST]) -> Option<(Call, c_int, i32)> {
        let w32 = |at: usize| u32::from_le_bytes(m[at..at + 4].try_into().expect("4 bytes"));
        let w64 = |at: usize| u64::from_le_bytes(m[at..at + 8].try_into().expect("8 bytes"));
        let call = match w32(0) {
            0 => Call::Ioctl { request: w32(12), arg: w64(16) },
            1 => Call::Read { buf: w64(16), count: w64(24), offset: w64(32) as i64 },
            2 => Call::Write { buf: w64(16), count: w64(24), offset: w64(32) as i64 },
            _ => return None,
        };
        Some((call, w32(4) as c_int, w32(8) as i32))
    }
}

/// Registers the fork handlers, once, when the first context is made.
pub fn install() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Resolved now: after a fork of a threaded process, looking symbols
        // up could wait forever on a lock another thread held.
        let _ = real::close();
        // SAFETY: registering three handlers with the C signature
        // pthread_atfork expects; they live as long as the library.
        unsafe { libc::pthread_atfork(Some(prepare), Some(parent), Some(child)) };
    });
}

extern "C" fn prepare() {
    let has_context = files::fds().into_iter().any(|fd| files::context(fd).is_some());
    files::lock_for_fork();
    if !has_context || PARENT.load(Ordering::Acquire) >= 0 {
        return;
    }
    let mut pair = [-1; 2];
    // SAFETY: socketpair writes two descriptors into `pair`.
    let rc =
        unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0, pair.as_mut_ptr()) };
    if rc == 0 {
        PENDING[0].store(pair[0], Ordering::Release);
        PENDING[1].store(pair[1], Ordering::Release);
    }
}

fn take_pending() -> Option<(c_int, c_int)> {
    let ours = PENDING[0].swap(-1, Ordering::AcqRel);
    let theirs = PENDING[1].swap(-1, Ordering::AcqRel);
    (ours >= 0).then_some((ours, theirs))
}

extern "C" fn parent() {
    // SAFETY: `prepare` locked the table on this side of the fork.
    unsafe { files::unlock_after_fork() };
    let Some((ours, theirs)) = take_pending() else { return };
    // SAFETY: the child's end, which this process has no use for.
    unsafe { real::close()(theirs) };
    let spawned = std::thread::Builder::new().name("ioasid-fork".into()).spawn(move || serve(ours));
    if spawned.is_err() {
        // The child's requests then fail with EIO rather than wait forever.
        // SAFETY: our end, not handed to any thread.
        unsafe { real::close()(ours) };
    }
}

extern "C" fn child() {
    // SAFETY: `prepare` locked the table, and this copy of it is ours alone.
    unsafe { files::unlock_after_fork() };
    let Some((theirs, ours)) = take_pending() else { return };
    // Only async-signal-safe calls here: the parent may have had threads.
    // SAFETY: the parent's end, which belongs to the parent.
    unsafe { real::close()(theirs) };
    PARENT.store(ours, Ordering::Release);
}

/// Whether this process is a forked child whose parent serves its calls.
pub fn is_child() -> bool {
    PARENT.load(Ordering::Acquire) >= 0
}

/// In a child, runs `call` on the parent's object behind `fd`; `None` in a
/// process that is not a forked child (its own objects are the real ones).
pub fn forward(fd: c_int, call: Call) -> Option<Result<i64, c_int>> {
    let link = PARENT.load(Ordering::Acquire);
    if link < 0 {
        return None;
    }
    let _one = LINK.lock().unwrap_or_else(|e| e.into_inner());
    // SAFETY: getpid has no preconditions.
    let msg = call.encode(fd, unsafe { libc::getpid() });
    let mut reply = [0u8; REPLY];
    // SAFETY: sending and receiving whole messages from and into buffers
    // of their sizes; MSG_NOSIGNAL keeps a gone parent from killing us.
    let ok = unsafe {
        libc::send(link, msg.as_ptr().cast(), REQUEST, libc::MSG_NOSIGNAL) == REQUEST as isize
            && libc::recv(link, reply.as_mut_ptr().cast(), REPLY, 0) == REPLY as isize
    };
    if !ok {
        return Some(Err(libc::EIO));
    }
    let value = i64::from_le_bytes(reply[0..8].try_into().expect("8 bytes"));
    let errno = i32::from_le_bytes(reply[8..12].try_into().expect("4 bytes"));
    Some(if value < 0 { Err(errno) } else { Ok(value) })
}

/// Carries out one of a child's calls here, on this process's objects.
fn run(call: Call, fd: c_int, pid: i32) -> Result<i64, c_int> {
    let child = OtherProcess { pid };
    match (call, files::get(fd)) {
        (Call::Ioctl { request, arg }, Some(File::Iommufd(ctx))) => {
            return ioasid_abi::ioctl(&ctx, &child, request, arg).map(i64::from).map_err(|e| e.0);
        }
        (Call::Read { buf, count, offset }, Some(File::Fault(f))) => f.read(&child, buf, count as usize, offset),
        (Call::Read { buf, count, offset }, Some(File::Veventq(q))) => q.read(&child, buf, count as usize, offset),
        (Call::Write { buf, count, offset }, Some(File::Fault(f))) => f.write(&child, buf, count as usize, offset),
        (Call::Write { .. }, Some(File::Veventq(_))) => return Err(libc::EINVAL),
        _ => return Err(libc::EBADF),
    }
    .map(|n| n as i64)
    .map_err(|e| e.0)
}

/// The parent's side of one child's link: runs its requests until it
/// closes (exits).
fn serve(link: c_int) {
    let mut msg = [0u8; REQUEST];
    // SAFETY: receiving into a buffer of the size given.
    while unsafe { libc::recv(link, msg.as_mut_ptr().cast(), REQUEST, 0) } == REQUEST as isize {
        let result = Call::decode(&msg).map_or(Err(libc::EINVAL), |(call, fd, pid)| run(call, fd, pid));
        let (value, errno) = match result {
            Ok(v) => (v, 0),
            Err(e) => (-1, e),
        };
        let mut reply = [0u8; REPLY];
        reply[0..8].copy_from_slice(&value.to_le_bytes());
        reply[8..12].copy_from_slice(&errno.to_le_bytes());
        // SAFETY: sending a whole message from a buffer of its size.
        if unsafe { libc::send(link, reply.as_ptr().cast(), REPLY, libc::MSG_NOSIGNAL) } != REPLY as isize {
            break;
        }
    }
    // SAFETY: our end of the link, closed once.
    unsafe { real::close()(link) };
}
