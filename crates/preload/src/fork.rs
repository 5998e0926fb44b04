//! Children forked by a program that opened `/dev/iommu`.
//!
//! Linux's iommufd is one kernel object however many processes hold its
//! descriptor, and a child's `IOMMU_IOAS_MAP` maps the child's memory into
//! it. A forked child of this process has only a copy of ioasid's state, so
//! each fork gets a socket to its parent: the child's ioctls on iommufd
//! descriptors it inherited travel there and run on the parent's contexts,
//! which read and write the child's memory by pid (and take mapped pages
//! when Linux would pin them). Commands that would hand the child a new
//! descriptor answer `EOPNOTSUPP`. A grandchild shares its parent's link.

use std::ffi::{c_int, c_ulong, c_void};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Mutex, Once};

use ioasid_abi::files;
use ioasid_abi::user::OtherProcess;

use crate::real;

/// The socket pair made for the fork under way, from `prepare` to the
/// `parent` and `child` handlers.
static PENDING: [AtomicI32; 2] = [AtomicI32::new(-1), AtomicI32::new(-1)];
/// In a child: its end of the link to the parent that serves its ioctls.
static PARENT: AtomicI32 = AtomicI32::new(-1);
/// One request at a time per link, whatever the child's threads do.
static LINK: Mutex<()> = Mutex::new(());

/// `{fd, pid, request, 0, arg}` and `{value or -1, errno, 0}`.
const REQUEST: usize = 24;
const REPLY: usize = 16;

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
    let Some((theirs, ours)) = take_pending() else { return };
    // Only async-signal-safe calls here: the parent may have had threads.
    // SAFETY: the parent's end, which belongs to the parent.
    unsafe { real::close()(theirs) };
    PARENT.store(ours, Ordering::Release);
}

/// In a child, runs the ioctl on the parent's context; `None` in a process
/// that is not a forked child (its own contexts are the real ones).
pub fn forward(fd: c_int, request: c_ulong, arg: *mut c_void) -> Option<Result<c_int, c_int>> {
    let link = PARENT.load(Ordering::Acquire);
    if link < 0 {
        return None;
    }
    let _one = LINK.lock().unwrap_or_else(|e| e.into_inner());
    let mut msg = [0u8; REQUEST];
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { libc::getpid() };
    msg[0..4].copy_from_slice(&fd.to_le_bytes());
    msg[4..8].copy_from_slice(&pid.to_le_bytes());
    msg[8..12].copy_from_slice(&(request as u32).to_le_bytes());
    msg[16..24].copy_from_slice(&(arg as u64).to_le_bytes());
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
    Some(if value < 0 { Err(errno) } else { Ok(value as c_int) })
}

/// The parent's side of one child's link: runs its requests until it
/// closes (exits).
fn serve(link: c_int) {
    let mut msg = [0u8; REQUEST];
    // SAFETY: receiving into a buffer of the size given.
    while unsafe { libc::recv(link, msg.as_mut_ptr().cast(), REQUEST, 0) } == REQUEST as isize {
        let word = |at: usize| u32::from_le_bytes(msg[at..at + 4].try_into().expect("4 bytes"));
        let (fd, pid, request) = (word(0) as c_int, word(4) as i32, word(8));
        let arg = u64::from_le_bytes(msg[16..24].try_into().expect("8 bytes"));
        let result = match files::context(fd) {
            None => Err(libc::EBADF),
            Some(ctx) => ioasid_abi::ioctl(&ctx, &OtherProcess { pid }, request, arg).map_err(|e| e.0),
        };
        let (value, errno) = match result {
            Ok(v) => (i64::from(v), 0),
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
