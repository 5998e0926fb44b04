//! Supervised programs: `/dev/iommu` for programs that cannot be preloaded
//! (static binaries, Go, raw `syscall()`), through seccomp user notification
//! (Linux's seccomp_unotify(2)).
//!
//! [`spawn`] starts the program under a classic BPF filter that turns its
//! `open`/`openat`/`openat2` calls (all of them: BPF cannot read the path)
//! and its ioctls of iommufd's types into notifications on a listener fd;
//! every other system call, and everything on an architecture other than
//! x86_64 (x32 calls included), goes to the kernel untouched. [`serve`]
//! answers the notifications with a [`Handler`]: an open the handler claims
//! gets the handler's descriptor installed in the program, an ioctl on it the
//! handler's result, and anything the handler does not claim continues to the
//! kernel (`SECCOMP_USER_NOTIF_FLAG_CONTINUE`), which then does exactly what
//! it would have done unsupervised.
//!
//! The filter is not a sandbox: a continued call is re-evaluated by the
//! kernel against the program's memory as it is then, so a program racing
//! its own path buffer only cheats itself out of `/dev/iommu`.
//!
//! Paths. The handler sees an absolute path: an absolute one as given, a
//! relative one joined to the calling thread's working directory
//! (`/proc/TID/cwd`, for `AT_FDCWD`) or to the path of `dirfd`
//! (`/proc/TID/fd/N`). Repeated slashes and `.` components are dropped,
//! which cannot change what the path names; `..` is kept (only the kernel
//! knows where it leads through symlinks), and a path whose last component
//! is empty, `.` or `..` is passed unchanged. A path that cannot be read, is
//! longer than `PATH_MAX`, or whose base is not a path goes to the kernel.
//!
//! Signals. The filter asks for `SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV`
//! (Linux 5.19): once [`serve`] has received a call, only a fatal signal
//! interrupts the calling thread. Without it a signal (Go's preemption
//! signal, a timer) would abandon the call the handler is running and the
//! restarted system call would run it a second time.
//!
//! Lifetime. The filter stays with the program and everything it forks;
//! the listener hangs up when the last of them has exited (`do_exit` lets go
//! of the filter: zombies do not hold it), and [`serve`] returns. Reaping
//! the [`Child`] is still the caller's business. `PR_SET_NO_NEW_PRIVS` is
//! set, as seccomp requires without `CAP_SYS_ADMIN`: set-user-ID programs
//! run without their privileges.

use std::ffi::{CStr, CString};
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};
use std::sync::Arc;

use ioasid_abi::Errno;
use ioasid_abi::user::{OtherProcess, UserMemory};
use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer, SendAncillaryMessage,
    SendFlags, SocketFlags, SocketType,
};

/// The system calls sent to the supervisor whatever their arguments: the
/// filter cannot read the path they open.
pub const OPEN_SYSCALLS: [libc::c_long; 3] = [libc::SYS_open, libc::SYS_openat, libc::SYS_openat2];

/// The ioctl type (`(request >> 8) & 0xff`) of iommufd and VFIO: `';'`.
pub const IOMMUFD_TYPE: u32 = b';' as u32;

/// The ioctl types sent to the supervisor: iommufd's and VFIO's, and
/// ioasid's own extensions.
pub const IOCTL_TYPES: [u32; 2] = [IOMMUFD_TYPE, ioasid_abi::ext::IOASID_TYPE];

/// `AUDIT_ARCH_X86_64`: `EM_X86_64 | __AUDIT_ARCH_64BIT | __AUDIT_ARCH_LE`.
const AUDIT_ARCH_X86_64: u32 = 62 | 0x8000_0000 | 0x4000_0000;

/// The first x32 system call number (`__X32_SYSCALL_BIT`).
const X32_SYSCALL_BIT: u32 = 0x4000_0000;

/// `PIDFD_THREAD` (Linux 6.9): a pidfd for one thread rather than a process.
const PIDFD_THREAD: u32 = libc::O_EXCL as u32;

/// `sizeof(struct open_how)` in its first version: `openat2` rejects less.
const OPEN_HOW_SIZE_VER0: u64 = 24;

// Offsets into `struct seccomp_data`, which the filter loads from.
const DATA_NR: u32 = std::mem::offset_of!(libc::seccomp_data, nr) as u32;
const DATA_ARCH: u32 = std::mem::offset_of!(libc::seccomp_data, arch) as u32;
/// The low half of `args[1]`, the ioctl request (an `unsigned int` in Linux).
const DATA_ARG1_LOW: u32 = std::mem::offset_of!(libc::seccomp_data, args) as u32 + 8;

fn stmt(code: u32, k: u32) -> libc::sock_filter {
    libc::sock_filter { code: code as u16, jt: 0, jf: 0, k }
}

fn jump(code: u32, k: u32, jt: usize, jf: usize) -> libc::sock_filter {
    let offset = |n: usize| u8::try_from(n).expect("filter jump within 255 instructions");
    libc::sock_filter { code: code as u16, jt: offset(jt), jf: offset(jf), k }
}

/// The filter: `open_syscalls` and the ioctls whose type is one of
/// `ioctl_types` go to the supervisor, everything else to the kernel.
pub fn filter(open_syscalls: &[libc::c_long], ioctl_types: &[u32]) -> Vec<libc::sock_filter> {
    use libc::{BPF_ABS, BPF_ALU, BPF_AND, BPF_JEQ, BPF_JGE, BPF_JMP, BPF_K, BPF_LD, BPF_RET, BPF_RSH, BPF_W};
    let ld = BPF_LD | BPF_W | BPF_ABS;
    let jeq = BPF_JMP | BPF_JEQ | BPF_K;
    // Two returns end the program: ALLOW, then USER_NOTIF. A jump at `pc`
    // to one of them skips `target - pc - 1` instructions.
    let length = 4 + open_syscalls.len() + 1 + 3 + ioctl_types.len() + 2;
    let allow = length - 2;
    let notify = length - 1;
    let mut prog = Vec::with_capacity(length);
    prog.push(stmt(ld, DATA_ARCH));
    prog.push(jump(jeq, AUDIT_ARCH_X86_64, 0, allow - 2));
    prog.push(stmt(ld, DATA_NR));
    prog.push(jump(BPF_JMP | BPF_JGE | BPF_K, X32_SYSCALL_BIT, allow - 4, 0));
    for &nr in open_syscalls {
        let pc = prog.len();
        prog.push(jump(jeq, nr as u32, notify - pc - 1, 0));
    }
    let pc = prog.len();
    prog.push(jump(jeq, libc::SYS_ioctl as u32, 0, allow - pc - 1));
    prog.push(stmt(ld, DATA_ARG1_LOW));
    prog.push(stmt(BPF_ALU | BPF_RSH | BPF_K, 8));
    prog.push(stmt(BPF_ALU | BPF_AND | BPF_K, 0xff));
    for &ty in ioctl_types {
        let pc = prog.len();
        prog.push(jump(jeq, ty, notify - pc - 1, 0));
    }
    prog.push(stmt(BPF_RET | BPF_K, libc::SECCOMP_RET_ALLOW));
    prog.push(stmt(BPF_RET | BPF_K, libc::SECCOMP_RET_USER_NOTIF));
    debug_assert_eq!(prog.len(), length);
    prog
}

/// Runs `cmd` under the filter of [`OPEN_SYSCALLS`] and [`IOCTL_TYPES`];
/// returns the program and the listener [`serve`] answers it on.
pub fn spawn(cmd: Command) -> io::Result<(Child, OwnedFd)> {
    spawn_with_filter(cmd, filter(&OPEN_SYSCALLS, &IOCTL_TYPES))
}

/// [`spawn`] with a filter of the caller's (whose notifications [`serve`]
/// must understand: opens and ioctls).
pub fn spawn_with_filter(mut cmd: Command, program: Vec<libc::sock_filter>) -> io::Result<(Child, OwnedFd)> {
    let (ours, theirs) =
        rustix::net::socketpair(AddressFamily::UNIX, SocketType::SEQPACKET, SocketFlags::CLOEXEC, None)?;
    // Above stdio, which the child sets up (dup2 over 0-2) before the hook
    // runs: a parent with stdin closed would otherwise lose the sender.
    let theirs = rustix::io::fcntl_dupfd_cloexec(&theirs, 3)?;
    let sender = theirs.as_raw_fd();
    // SAFETY: the hook runs in the forked child before exec and makes only
    // async-signal-safe system calls, on memory (the filter) built before
    // the fork.
    unsafe {
        cmd.pre_exec(move || install_filter(&program, sender));
    }
    let child = cmd.spawn()?;
    // The child's copy closed at exec: a listener not sent by then never is.
    drop(theirs);
    let listener =
        receive_listener(&ours).inspect_err(|e| tracing::warn!("no seccomp listener from the program: {e}"))?;
    Ok((child, listener))
}

/// In the child: installs `program` and sends its listener over `sender`.
fn install_filter(program: &[libc::sock_filter], sender: RawFd) -> io::Result<()> {
    let prog = libc::sock_fprog { len: program.len() as u16, filter: program.as_ptr().cast_mut() };
    // SAFETY: prctl with integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let install = |flags: libc::c_ulong| {
        // SAFETY: `prog` points at `program`, which outlives the call; the
        // kernel copies the filter.
        unsafe { libc::syscall(libc::SYS_seccomp, libc::SECCOMP_SET_MODE_FILTER, flags, &raw const prog) }
    };
    let mut fd = install(libc::SECCOMP_FILTER_FLAG_NEW_LISTENER | libc::SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV);
    if fd < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL) {
        // Before Linux 5.19: signals may restart a call being answered.
        fd = install(libc::SECCOMP_FILTER_FLAG_NEW_LISTENER);
    }
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nothing else owns.
    let listener = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
    // SAFETY: `sender` stays open in the child until exec closes it.
    let sender = unsafe { BorrowedFd::borrow_raw(sender) };
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    let fds = [listener.as_fd()];
    control.push(SendAncillaryMessage::ScmRights(&fds));
    rustix::net::sendmsg(sender, &[io::IoSlice::new(b"L")], &mut control, SendFlags::empty())?;
    Ok(())
}

fn receive_listener(socket: &OwnedFd) -> io::Result<OwnedFd> {
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let mut byte = [0u8; 1];
    rustix::net::recvmsg(socket, &mut [io::IoSliceMut::new(&mut byte)], &mut control, RecvFlags::CMSG_CLOEXEC)?;
    for message in control.drain() {
        if let RecvAncillaryMessage::ScmRights(mut fds) = message
            && let Some(fd) = fds.next()
        {
            return Ok(fd);
        }
    }
    Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the program exited before installing its filter"))
}

/// What the supervisor does with a supervised program's `/dev/iommu`.
pub trait Handler: Send + Sync {
    /// `open`/`openat`/`openat2` of `path` (absolute, see the module doc)
    /// with `flags`: `Some(result)` when the path is the handler's (the fd
    /// it returns is installed in the program, close-on-exec as `flags`
    /// ask), `None` to let the kernel open it.
    fn open(&self, call: &Call<'_>, path: &CStr, flags: i32) -> Option<Result<OwnedFd, Errno>>;

    /// The supervisor has let go of its copy of a descriptor `open`
    /// returned, installed in the program or not. The program runs on as
    /// soon as it is answered, before that: until then a close of the
    /// descriptor there leaves the file open, here.
    fn released(&self) {}

    /// `ioctl(fd, request, arg)`: `file` is the supervisor's own copy of
    /// the program's descriptor (`pidfd_getfd`). `Some(result)` when the
    /// file is the handler's, `None` to let the kernel run it.
    fn ioctl(&self, call: &Call<'_>, file: &OwnedFd, fd: i32, request: u32, arg: u64) -> Option<Result<i64, Errno>>;
}

/// One system call of the supervised program, waiting for its answer.
pub struct Call<'a> {
    listener: BorrowedFd<'a>,
    id: u64,
    pid: i32,
    uid: u32,
    tid: i32,
}

impl Call<'_> {
    /// The calling process (thread group).
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// The calling thread's real user ID.
    pub fn uid(&self) -> u32 {
        self.uid
    }

    /// The calling thread.
    pub fn tid(&self) -> i32 {
        self.tid
    }

    /// The calling thread's memory, where the call's pointers point.
    pub fn memory(&self) -> OtherProcess {
        OtherProcess { pid: self.tid }
    }

    /// Whether the call still waits for its answer: false once the thread
    /// is gone (or interrupted by a fatal signal), and its tid may name
    /// another thread. Worth asking again after reading its memory.
    pub fn valid(&self) -> bool {
        notif_id_valid(self.listener, self.id)
    }

    /// Installs `fd` in the calling program (`SECCOMP_IOCTL_NOTIF_ADDFD`)
    /// and returns its number there.
    pub fn install(&self, fd: OwnedFd, cloexec: bool) -> Result<i32, Errno> {
        self.add_fd(&fd, cloexec, 0)
    }

    fn add_fd(&self, fd: &OwnedFd, cloexec: bool, flags: u32) -> Result<i32, Errno> {
        let addfd = libc::seccomp_notif_addfd {
            id: self.id,
            flags,
            srcfd: fd.as_raw_fd() as u32,
            newfd: 0,
            newfd_flags: if cloexec { libc::O_CLOEXEC as u32 } else { 0 },
        };
        // SAFETY: ADDFD reads the struct above, which lives across the call.
        let ret = unsafe { libc::ioctl(self.listener.as_raw_fd(), libc::SECCOMP_IOCTL_NOTIF_ADDFD, &raw const addfd) };
        if ret < 0 { Err(last_errno()) } else { Ok(ret) }
    }
}

fn last_errno() -> Errno {
    Errno(io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO))
}

fn notif_id_valid(listener: BorrowedFd<'_>, id: u64) -> bool {
    // SAFETY: ID_VALID reads the u64 above.
    unsafe { libc::ioctl(listener.as_raw_fd(), libc::SECCOMP_IOCTL_NOTIF_ID_VALID, &raw const id) == 0 }
}

/// The answer to one notification.
enum Answer {
    Value(i64),
    Error(Errno),
    Continue,
    /// Already answered (ADDFD with `SECCOMP_ADDFD_FLAG_SEND`), or the
    /// call is gone.
    Done,
}

/// Answers the notifications of `listener` with `handler`, each on a
/// thread of its own so a slow ioctl does not hold up the program's other
/// threads. Returns when the program and all its descendants have exited,
/// after the last answer.
pub fn serve(listener: OwnedFd, handler: Arc<dyn Handler>) {
    let listener = listener.as_fd();
    let handler = &*handler;
    // Workers stay for the next call; one more is started whenever every
    // worker is busy, so a slow call never holds up another thread's.
    let (calls, queue) = std::sync::mpsc::channel::<libc::seccomp_notif>();
    let queue = std::sync::Mutex::new(queue);
    let idle = std::sync::atomic::AtomicUsize::new(0);
    let worker = || {
        loop {
            let next = queue.lock().unwrap_or_else(|e| e.into_inner()).recv();
            let Ok(notif) = next else { return };
            idle.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
            answer(listener, handler, &notif);
            idle.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        }
    };
    std::thread::scope(|scope| {
        loop {
            // SAFETY: all-zero is a valid seccomp_notif, and RECV wants it zeroed.
            let mut notif: libc::seccomp_notif = unsafe { std::mem::zeroed() };
            // SAFETY: RECV fills the struct above.
            let ret = unsafe { libc::ioctl(listener.as_raw_fd(), libc::SECCOMP_IOCTL_NOTIF_RECV, &raw mut notif) };
            if ret < 0 {
                match last_errno().0 {
                    libc::EINTR => continue,
                    // No users left, or a call withdrawn (a fatal signal)
                    // between its wake-up and our receiving it.
                    libc::ENOENT if hung_up(listener) => break,
                    libc::ENOENT => continue,
                    e => {
                        tracing::error!("seccomp listener: {}", Errno(e));
                        break;
                    }
                }
            }
            if idle.load(std::sync::atomic::Ordering::Acquire) == 0 {
                idle.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
                if let Err(e) = std::thread::Builder::new().name("ioasid-supervise".into()).spawn_scoped(scope, worker)
                {
                    idle.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
                    tracing::warn!("no thread for a supervised call ({e}): answering it in line");
                    answer(listener, handler, &notif);
                    continue;
                }
            }
            if calls.send(notif).is_err() {
                answer(listener, handler, &notif);
            }
        }
        // Workers finish what they hold, then see the queue closed.
        drop(calls);
    });
}

fn hung_up(listener: BorrowedFd<'_>) -> bool {
    let mut fds = [rustix::event::PollFd::new(&listener, rustix::event::PollFlags::IN)];
    let zero = rustix::event::Timespec { tv_sec: 0, tv_nsec: 0 };
    rustix::event::poll(&mut fds, Some(&zero)).is_ok()
        && fds[0].revents().contains(rustix::event::PollFlags::HUP)
        && !fds[0].revents().contains(rustix::event::PollFlags::IN)
}

fn answer(listener: BorrowedFd<'_>, handler: &dyn Handler, notif: &libc::seccomp_notif) {
    let tid = notif.pid as i32;
    let Some((pid, uid)) = thread_group(tid) else {
        // Gone already, unless /proc is not there.
        return respond(listener, notif.id, Answer::Continue);
    };
    let call = Call { listener, id: notif.id, pid, uid, tid };
    let nr = notif.data.nr as libc::c_long;
    tracing::trace!(id = notif.id, tid, nr, "supervised call");
    let answer = if nr == libc::SYS_ioctl {
        ioctl(&call, handler, &notif.data.args)
    } else if OPEN_SYSCALLS.contains(&nr) {
        open(&call, handler, nr, &notif.data.args)
    } else {
        Answer::Continue
    };
    respond(listener, notif.id, answer);
}

fn respond(listener: BorrowedFd<'_>, id: u64, answer: Answer) {
    let (val, error, flags) = match answer {
        Answer::Value(v) => (v, 0, 0),
        Answer::Error(e) => (0, -e.0, 0),
        Answer::Continue => (0, 0, libc::SECCOMP_USER_NOTIF_FLAG_CONTINUE as u32),
        Answer::Done => return,
    };
    let resp = libc::seccomp_notif_resp { id, val, error, flags };
    // SAFETY: SEND reads the struct above.
    if unsafe { libc::ioctl(listener.as_raw_fd(), libc::SECCOMP_IOCTL_NOTIF_SEND, &raw const resp) } < 0 {
        match last_errno() {
            // The thread died (or took a fatal signal) meanwhile.
            Errno::ENOENT => tracing::debug!("supervised call {id} gone before its answer"),
            e => tracing::warn!("answering supervised call {id}: {e}"),
        }
    }
}

/// The thread group of thread `tid` and its real user ID, from
/// `/proc/TID/status`.
fn thread_group(tid: i32) -> Option<(i32, u32)> {
    let status = std::fs::read_to_string(format!("/proc/{tid}/status")).ok()?;
    let field = |name: &str| status.lines().find_map(|l| l.strip_prefix(name)?.split_whitespace().next());
    Some((field("Tgid:")?.parse().ok()?, field("Uid:")?.parse().ok()?))
}

fn ioctl(call: &Call<'_>, handler: &dyn Handler, args: &[u64; 6]) -> Answer {
    let (fd, request, arg) = (args[0] as i32, args[1] as u32, args[2]);
    // The thread's own descriptor table (threads made without CLONE_FILES
    // have their own); before Linux 6.9 only the process's.
    let pidfd = rustix::process::Pid::from_raw(call.tid).and_then(|tid| {
        let thread = rustix::process::PidfdFlags::from_bits_retain(PIDFD_THREAD);
        rustix::process::pidfd_open(tid, thread).ok().or_else(|| {
            let pid = rustix::process::Pid::from_raw(call.pid)?;
            rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()).ok()
        })
    });
    // A live call pins its thread: the pidfd is the caller's, not a reuse of its tid.
    if !call.valid() {
        return Answer::Done;
    }
    let Some(pidfd) = pidfd else {
        return Answer::Continue;
    };
    let file = match rustix::process::pidfd_getfd(&pidfd, fd, rustix::process::PidfdGetfdFlags::empty()) {
        Ok(file) => file,
        Err(rustix::io::Errno::BADF) => return Answer::Error(Errno::EBADF),
        Err(e) => {
            tracing::debug!("pidfd_getfd({fd}) of {}: {e}: to the kernel", call.tid);
            return Answer::Continue;
        }
    };
    match handler.ioctl(call, &file, fd, request, arg) {
        Some(Ok(value)) => Answer::Value(value),
        Some(Err(e)) => Answer::Error(e),
        None => Answer::Continue,
    }
}

fn open(call: &Call<'_>, handler: &dyn Handler, nr: libc::c_long, args: &[u64; 6]) -> Answer {
    let Some((path, flags)) = open_args(call, nr, args) else {
        return Answer::Continue;
    };
    // Everything above read the program's memory and /proc: act only if it
    // was the caller's.
    if !call.valid() {
        return Answer::Done;
    }
    let fd = match handler.open(call, &path, flags) {
        None => return Answer::Continue,
        Some(Err(e)) => return Answer::Error(e),
        Some(Ok(fd)) => fd,
    };
    // Installed and answered at once: an fd installed in a program that
    // never learns its number would leak there.
    let answer = match call.add_fd(&fd, flags & libc::O_CLOEXEC != 0, libc::SECCOMP_ADDFD_FLAG_SEND as u32) {
        Ok(_) => Answer::Done,
        Err(Errno::ENOENT) => Answer::Done,
        // The kernel's answer to an open it cannot install: EMFILE, say.
        Err(e) => Answer::Error(e),
    };
    drop(fd);
    handler.released();
    answer
}

/// The absolute path and flags of an open, or `None` when the kernel
/// should decide.
fn open_args(call: &Call<'_>, nr: libc::c_long, args: &[u64; 6]) -> Option<(CString, i32)> {
    let (dirfd, path, flags) = match nr {
        libc::SYS_open => (libc::AT_FDCWD, args[0], args[1] as i32),
        libc::SYS_openat => (args[0] as i32, args[1], args[2] as i32),
        libc::SYS_openat2 => {
            if args[3] < OPEN_HOW_SIZE_VER0 {
                return None;
            }
            let mut how = [0u8; 8];
            call.memory().read(args[2], &mut how).ok()?;
            let flags = i32::try_from(u64::from_ne_bytes(how)).ok()?;
            (args[0] as i32, args[1], flags)
        }
        _ => return None,
    };
    let path = read_path(&call.memory(), path)?;
    let base = if path.starts_with(b"/") {
        None
    } else if dirfd == libc::AT_FDCWD {
        Some(format!("/proc/{}/cwd", call.tid))
    } else {
        Some(format!("/proc/{}/fd/{dirfd}", call.tid))
    };
    let base = match base {
        Some(link) => Some(rustix::fs::readlink(link, Vec::new()).ok()?.into_bytes()),
        None => None,
    };
    Some((resolve(base.as_deref(), &path)?, flags))
}

/// Reads the nul-terminated path at `addr`, at most `PATH_MAX` bytes with
/// its nul, a page at a time (the next page may not be mapped).
fn read_path(memory: &OtherProcess, addr: u64) -> Option<Vec<u8>> {
    let page = rustix::param::page_size() as u64;
    let max = libc::PATH_MAX as usize;
    let mut path = Vec::new();
    let mut at = addr;
    while path.len() < max {
        let n = ((page - at % page) as usize).min(max - path.len());
        let mut chunk = vec![0u8; n];
        memory.read(at, &mut chunk).ok()?;
        if let Some(end) = chunk.iter().position(|&b| b == 0) {
            path.extend_from_slice(&chunk[..end]);
            return Some(path);
        }
        path.extend_from_slice(&chunk);
        at = at.checked_add(n as u64)?;
    }
    None
}

/// `path` made absolute against `base` (a directory's path, for relative
/// paths) and tidied as the module doc says.
fn resolve(base: Option<&[u8]>, path: &[u8]) -> Option<CString> {
    if path.is_empty() {
        return None;
    }
    let mut full = Vec::new();
    if !path.starts_with(b"/") {
        let base = base.filter(|b| b.starts_with(b"/"))?;
        full.extend_from_slice(base);
        full.push(b'/');
    }
    full.extend_from_slice(path);
    let last = full.rsplit(|&b| b == b'/').next().unwrap_or_default();
    if matches!(last, b"" | b"." | b"..") {
        return CString::new(full).ok();
    }
    let mut tidy = Vec::with_capacity(full.len());
    for component in full.split(|&b| b == b'/').filter(|c| !matches!(*c, b"" | b".")) {
        tidy.push(b'/');
        tidy.extend_from_slice(component);
    }
    CString::new(tidy).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolve_joins_and_tidies_without_crossing_dotdot() {
        let r = |base: Option<&str>, path: &str| resolve(base.map(str::as_bytes), path.as_bytes());
        assert_eq!(r(None, "/dev/iommu").unwrap().as_bytes(), b"/dev/iommu");
        assert_eq!(r(None, "//dev/./iommu").unwrap().as_bytes(), b"/dev/iommu");
        assert_eq!(r(Some("/dev"), "iommu").unwrap().as_bytes(), b"/dev/iommu");
        assert_eq!(r(Some("/"), "dev/iommu").unwrap().as_bytes(), b"/dev/iommu");
        assert_eq!(r(Some("/tmp"), "../dev/iommu").unwrap().as_bytes(), b"/tmp/../dev/iommu");
        assert_eq!(r(None, "/dev/iommu/").unwrap().as_bytes(), b"/dev/iommu/");
        assert_eq!(r(None, "/dev/iommu/.").unwrap().as_bytes(), b"/dev/iommu/.");
        assert!(r(Some("socket:[1]"), "iommu").is_none());
        assert!(r(None, "iommu").is_none());
        assert!(r(Some("/dev"), "").is_none());
    }

    #[test]
    fn filter_jumps_land_on_the_returns() {
        let prog = filter(&OPEN_SYSCALLS, &IOCTL_TYPES);
        let (allow, notify) = (prog.len() - 2, prog.len() - 1);
        for (pc, insn) in prog.iter().enumerate() {
            if insn.code as u32 & 0x07 == libc::BPF_JMP {
                for skip in [insn.jt, insn.jf] {
                    let target = pc + 1 + skip as usize;
                    assert!(skip == 0 || target == allow || target == notify, "jump at {pc} to {target}");
                }
            }
        }
        assert_eq!(prog[allow].k, libc::SECCOMP_RET_ALLOW);
        assert_eq!(prog[notify].k, libc::SECCOMP_RET_USER_NOTIF);
    }
}
