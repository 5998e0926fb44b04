//! The exported functions that stand in for the C library's.

use std::cell::Cell;
use std::ffi::{CStr, c_char, c_int, c_long, c_uint, c_ulong, c_void};
use std::os::fd::BorrowedFd;
use std::sync::Arc;

use ioasid_abi::files::{self, File, Kind};
use ioasid_abi::{InProcess, UserMemory};
use ioasid_engine::Context;

use crate::fork::{self, Call};
use crate::{fail_nth, paths, proc_status, real};

thread_local! {
    /// Set while a hook runs, so calls made from inside it are forwarded.
    static IN_HOOK: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` as a hook unless we are already inside one (then `fallback`).
/// A panic becomes an errno instead of unwinding into C. The program's
/// signal handlers wait until the hook is over (the shield is raised
/// before `IN_HOOK` is set and dropped after it is cleared), so a handler's
/// own iommufd call never finds the thread inside ioasid.
fn hook(fallback: impl FnOnce() -> c_int, f: impl FnOnce() -> c_int) -> c_int {
    let _shield = crate::signals::Shield::raise();
    if IN_HOOK.with(|h| h.replace(true)) {
        return fallback();
    }
    let r = caught(-1, f);
    IN_HOOK.with(|h| h.set(false));
    r
}

/// Runs `f`, turning a panic into `EIO` and `failed`: unwinding into C
/// would abort the program.
fn caught<R>(failed: R, f: impl FnOnce() -> R) -> R {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|_| {
        set_errno(libc::EIO);
        failed
    })
}

/// Runs the C library's own function for a hook's call, outside the hook:
/// a call that blocks (a `read` of a pipe, a `close` of a socket) lets the
/// program's signal handlers run, and their own iommufd calls work, as
/// they would without ioasid. Only for calls made while ioasid holds no
/// lock; ioasid's own calls from inside a hook stay inside it.
fn unshielded<R>(call: impl FnOnce() -> R) -> R {
    let was = IN_HOOK.with(|h| h.replace(false));
    let r = crate::signals::lowered(call);
    IN_HOOK.with(|h| h.set(was));
    r
}

fn set_errno(e: c_int) {
    // SAFETY: the calling thread's errno slot.
    unsafe { *libc::__errno_location() = e };
}

/// Where the declared PCI functions' sysfs tree has `path`, when it is one
/// of their `/sys` paths: the hooks below then work on that path instead.
fn sys_path(path: *const c_char) -> Option<std::ffi::CString> {
    if path.is_null() {
        return None;
    }
    // SAFETY: the hooked function's contract: a valid nul-terminated path.
    crate::vfio::redirect(unsafe { CStr::from_ptr(path) })
}

/// A new context behind a real descriptor.
fn open_iommu(flags: c_int) -> Result<c_int, c_int> {
    if let Some(opened) = crate::daemon::open(flags) {
        // The channel is held across fork, as the file table is.
        crate::fork::install();
        return opened;
    }
    let fd = ioasid_abi::user::new_fd_with(c"ioasid:/dev/iommu", flags & libc::O_CLOEXEC != 0).map_err(|e| e.0)?;
    let fd = std::os::fd::IntoRawFd::into_raw_fd(fd);
    files::insert(fd, File::Iommufd(Arc::new(Context::new())));
    crate::fork::install();
    Ok(fd)
}

/// The descriptor to return for an open of `path`, or `None` to forward it.
fn open_special(dirfd: c_int, path: *const c_char, flags: c_int, fwd: impl FnOnce() -> c_int) -> c_int {
    if path.is_null() {
        return fwd();
    }
    // SAFETY: `open`'s contract: a valid nul-terminated path.
    let p = unsafe { CStr::from_ptr(path) };
    let r = if paths::is_iommu(dirfd, p) || paths::reopens_iommufd(p) {
        open_iommu(flags)
    } else if let Some(opened) = crate::vfio::open(p, flags) {
        opened
    } else if let Some(opened) = proc_status::target(p).and_then(|pid| proc_status::open(p, pid, flags)) {
        opened
    } else if let Some(tid) = fail_nth::thread_of(p) {
        fail_nth::open(tid, flags)
    } else if fail_nth::is_debugfs_knob(dirfd, p) {
        let fd = fwd();
        // SAFETY: reading this thread's errno.
        if fd >= 0 || unsafe { *libc::__errno_location() } != libc::ENOENT {
            return fd;
        }
        fail_nth::knob_sink(flags)
    } else {
        return fwd();
    };
    r.unwrap_or_else(|e| {
        set_errno(e);
        -1
    })
}

macro_rules! open_hook {
    ($name:ident, $real:ident) => {
        /// # Safety
        /// As the C library's function of the same name.
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name(path: *const c_char, flags: c_int, mode: c_uint) -> c_int {
            let moved = sys_path(path);
            let path = moved.as_ref().map_or(path, |p| p.as_ptr());
            // SAFETY: forwarding the caller's own arguments.
            let raw = || unsafe { real::$real()(path, flags, mode) };
            let fwd = || unshielded(raw);
            hook(raw, || open_special(libc::AT_FDCWD, path, flags, fwd))
        }
    };
}

macro_rules! openat_hook {
    ($name:ident, $real:ident) => {
        /// # Safety
        /// As the C library's function of the same name.
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name(dirfd: c_int, path: *const c_char, flags: c_int, mode: c_uint) -> c_int {
            let moved = sys_path(path);
            let path = moved.as_ref().map_or(path, |p| p.as_ptr());
            // SAFETY: forwarding the caller's own arguments.
            let raw = || unsafe { real::$real()(dirfd, path, flags, mode) };
            let fwd = || unshielded(raw);
            hook(raw, || open_special(dirfd, path, flags, fwd))
        }
    };
}

open_hook!(open, open);
open_hook!(open64, open64);
openat_hook!(openat, openat);
openat_hook!(openat64, openat64);

macro_rules! open_2_hook {
    ($name:ident, $real:ident) => {
        /// What `_FORTIFY_SOURCE` makes of an `open` whose flags the
        /// compiler cannot see: it reaches the C library's open without
        /// passing through the exported `open`.
        ///
        /// # Safety
        /// As the C library's function of the same name.
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name(path: *const c_char, flags: c_int) -> c_int {
            let moved = sys_path(path);
            let path = moved.as_ref().map_or(path, |p| p.as_ptr());
            // SAFETY: forwarding the caller's own arguments.
            let raw = || unsafe { real::$real()(path, flags) };
            let fwd = || unshielded(raw);
            hook(raw, || open_special(libc::AT_FDCWD, path, flags, fwd))
        }
    };
}

macro_rules! openat_2_hook {
    ($name:ident, $real:ident) => {
        /// `openat`'s `_FORTIFY_SOURCE` entry (see `__open_2`).
        ///
        /// # Safety
        /// As the C library's function of the same name.
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name(dirfd: c_int, path: *const c_char, flags: c_int) -> c_int {
            let moved = sys_path(path);
            let path = moved.as_ref().map_or(path, |p| p.as_ptr());
            // SAFETY: forwarding the caller's own arguments.
            let raw = || unsafe { real::$real()(dirfd, path, flags) };
            let fwd = || unshielded(raw);
            hook(raw, || open_special(dirfd, path, flags, fwd))
        }
    };
}

open_2_hook!(__open_2, open_2);
open_2_hook!(__open64_2, open64_2);
openat_2_hook!(__openat_2, openat_2);
openat_2_hook!(__openat64_2, openat64_2);

/// `open`'s flags for `fopen`'s `mode`.
fn fopen_flags(mode: &CStr) -> c_int {
    let m = mode.to_bytes();
    let plus = m.contains(&b'+');
    let mut flags = match (m.first(), plus) {
        (Some(b'r'), false) => libc::O_RDONLY,
        (Some(b'w' | b'a'), false) => libc::O_WRONLY,
        _ => libc::O_RDWR,
    };
    if m.contains(&b'e') {
        flags |= libc::O_CLOEXEC;
    }
    flags
}

macro_rules! fopen_hook {
    ($name:ident, $real:ident) => {
        /// The C library's `fopen` opens without passing through `open`.
        ///
        /// # Safety
        /// As the C library's function of the same name.
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name(path: *const c_char, mode: *const c_char) -> *mut libc::FILE {
            let moved = sys_path(path);
            let path = moved.as_ref().map_or(path, |p| p.as_ptr());
            // SAFETY: forwarding the caller's own arguments.
            let fwd = || unsafe { real::$real()(path, mode) };
            if path.is_null() || mode.is_null() {
                return fwd();
            }
            // SAFETY: `fopen`'s contract: valid nul-terminated strings.
            let (p, m) = unsafe { (CStr::from_ptr(path), CStr::from_ptr(mode)) };
            let mut file = std::ptr::null_mut();
            let fd = hook(
                || -2,
                || {
                    let flags = fopen_flags(m);
                    let opened = if paths::is_iommu(libc::AT_FDCWD, p) || paths::reopens_iommufd(p) {
                        open_iommu(flags)
                    } else if let Some(status) = proc_status::target(p).and_then(|pid| proc_status::open(p, pid, flags))
                    {
                        status
                    } else {
                        return -2;
                    };
                    match opened {
                        Ok(fd) => {
                            // SAFETY: a descriptor just opened, and the caller's mode.
                            file = unsafe { libc::fdopen(fd, mode) };
                            if file.is_null() {
                                files::remove(fd);
                                // SAFETY: the descriptor opened above, nobody else's.
                                unsafe { real::close()(fd) };
                            }
                            fd
                        }
                        Err(e) => {
                            set_errno(e);
                            -1
                        }
                    }
                },
            );
            if fd == -2 { fwd() } else { file }
        }
    };
}

fopen_hook!(fopen, fopen);
fopen_hook!(fopen64, fopen64);

/// `openat2(2)`, which the C library offers only as a raw system call.
fn openat2(dirfd: c_int, path: *const c_char, how: *const c_void, size: usize, fwd: impl FnOnce() -> c_long) -> c_long {
    // `struct open_how { u64 flags, mode, resolve; }`; one Linux would
    // refuse is for Linux to refuse.
    let mut raw = [0u8; 24];
    if path.is_null() || how.is_null() || size < raw.len() || InProcess.read(how as u64, &mut raw).is_err() {
        return fwd();
    }
    let field = |i: usize| u64::from_ne_bytes(raw[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
    let (flags, mode) = (field(0), field(1));
    let creates = flags & (libc::O_CREAT | libc::O_TMPFILE) as u64 != 0;
    if flags > c_int::MAX as u64 || (mode != 0 && !creates) {
        return fwd();
    }
    let r = hook(
        || -2,
        || {
            // SAFETY: `openat2`'s contract: a valid nul-terminated path.
            let p = unsafe { CStr::from_ptr(path) };
            if !paths::is_iommu(dirfd, p) && !paths::reopens_iommufd(p) {
                return -2;
            }
            open_iommu(flags as c_int).unwrap_or_else(|e| {
                set_errno(e);
                -1
            })
        },
    );
    if r == -2 { fwd() } else { c_long::from(r) }
}

/// # Safety
/// As the C library's `ioctl`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ioctl(fd: c_int, request: c_ulong, arg: *mut c_void) -> c_int {
    // SAFETY: forwarding the caller's own arguments.
    let raw = || unsafe { real::ioctl()(fd, request, arg) };
    let fwd = || unshielded(raw);
    hook(raw, || {
        let Some(entry) = files::lookup(fd) else {
            return match crate::daemon::ioctl(fd, request as u32, arg as u64) {
                Some(r) => r.unwrap_or_else(|e| {
                    set_errno(e);
                    -1
                }),
                None => fwd(),
            };
        };
        let result = match &entry.file {
            // A forked child's copy of a device is not the device: its
            // registers and interrupts live in the parent.
            File::VfioDevice(_) | File::VfioGroup(_) if !entry.is_local() => Err(libc::ENODEV),
            File::VfioDevice(d) => d.ioctl(&InProcess, request as u32, arg as u64).map_err(|e| e.0),
            File::VfioGroup(g) => g.ioctl(&InProcess, request as u32, arg as u64).map_err(|e| e.0),
            _ => Err(0),
        };
        if result != Err(0) {
            return result.unwrap_or_else(|e| {
                set_errno(e);
                -1
            });
        }
        let File::Iommufd(ctx) = &entry.file else { return fwd() };
        let result = if entry.is_local() {
            ioasid_abi::ioctl(ctx, &InProcess, request as u32, arg as u64).map_err(|e| e.0)
        } else {
            let call = Call::Ioctl { request: request as u32, arg: arg as u64 };
            fork::forward(entry.owner, entry.serial, call).map(|v| v as c_int)
        };
        result.unwrap_or_else(|e| {
            set_errno(e);
            -1
        })
    })
}

/// # Safety
/// As the C library's `close`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn close(fd: c_int) -> c_int {
    // SAFETY: forwarding the caller's own argument.
    let raw = || unsafe { real::close()(fd) };
    let fwd = || unshielded(raw);
    hook(raw, || {
        files::remove(fd);
        fwd()
    })
}

/// Records `new` as another descriptor of whatever `old` is.
fn duplicated(old: c_int, new: c_int) -> c_int {
    if new >= 0 {
        files::duplicate(old, new);
        crate::daemon::duplicated(old, new);
    }
    new
}

/// # Safety
/// As the C library's `dup`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dup(old: c_int) -> c_int {
    // SAFETY: forwarding the caller's own argument.
    let raw = || unsafe { real::dup()(old) };
    let fwd = || unshielded(raw);
    hook(raw, || duplicated(old, fwd()))
}

/// # Safety
/// As the C library's `dup2`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dup2(old: c_int, new: c_int) -> c_int {
    // SAFETY: forwarding the caller's own arguments.
    let raw = || unsafe { real::dup2()(old, new) };
    let fwd = || unshielded(raw);
    hook(raw, || if old == new { fwd() } else { duplicated(old, fwd()) })
}

/// # Safety
/// As the C library's `dup3`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dup3(old: c_int, new: c_int, flags: c_int) -> c_int {
    // SAFETY: forwarding the caller's own arguments.
    let raw = || unsafe { real::dup3()(old, new, flags) };
    let fwd = || unshielded(raw);
    hook(raw, || duplicated(old, fwd()))
}

macro_rules! fcntl_hook {
    ($name:ident, $real:ident) => {
        /// # Safety
        /// As the C library's function of the same name.
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name(fd: c_int, cmd: c_int, arg: c_ulong) -> c_int {
            // SAFETY: forwarding the caller's own arguments.
            let raw = || unsafe { real::$real()(fd, cmd, arg) };
            let fwd = || unshielded(raw);
            hook(raw, || match cmd {
                libc::F_DUPFD | libc::F_DUPFD_CLOEXEC => duplicated(fd, fwd()),
                _ => fwd(),
            })
        }
    };
}

fcntl_hook!(fcntl, fcntl);
fcntl_hook!(fcntl64, fcntl64);

/// One buffer's `read` or `write` (`pread` or `pwrite` with an offset
/// `at`), as a hook gets it.
#[derive(Clone, Copy)]
struct Rw {
    write: bool,
    buf: u64,
    count: usize,
    at: Option<i64>,
}

impl Rw {
    fn call(self) -> Call {
        let (buf, count, offset) = (self.buf, self.count as u64, self.at.unwrap_or(0));
        match self.write {
            false => Call::Read { buf, count, offset },
            true => Call::Write { buf, count, offset },
        }
    }
}

/// Linux's checks before a file's own `read` or `write` runs, in its
/// order: a negative offset, a file without positioned reads and writes
/// (`ESPIPE`), one without the operation.
fn refused(kind: Kind, at: Option<i64>, write: bool) -> Result<(), c_int> {
    if at.is_some_and(|p| p < 0) {
        return Err(libc::EINVAL);
    }
    if at.is_some() && !kind.has_pread() {
        return Err(libc::ESPIPE);
    }
    if !(if write { kind.can_write() } else { kind.can_read() }) {
        return Err(libc::EINVAL);
    }
    Ok(())
}

/// One buffer's read or write of `fd`, when it is an ioasid file or one
/// the daemon gave this process; `None` for any other, which the C library
/// serves.
fn rw_one(fd: c_int, rw: Rw) -> Option<isize> {
    rw_ioasid(fd, rw).or_else(|| {
        let kind = crate::daemon::given(fd)?;
        if let Err(e) = refused(kind, rw.at, rw.write) {
            return Some(finish(Err(e)));
        }
        let rw = match rw {
            Rw { write: false, buf, count, .. } => crate::daemon::Rw::Read { buf, count: count as u64 },
            Rw { write: true, count, .. } => crate::daemon::Rw::Write { count: count as u64 },
        };
        crate::daemon::given_rw(fd, kind, rw).map(finish)
    })
}

/// What every read and write hook does with an ioasid file: a forked
/// child's queue is answered by its parent; any other is answered here.
/// `None`: not an ioasid file.
fn rw_ioasid(fd: c_int, rw: Rw) -> Option<isize> {
    caught(Some(-1), || {
        let entry = files::rw_file(fd)?;
        let _shield = crate::signals::Shield::raise();
        panic_for_test();
        if let Err(e) = refused(entry.file.kind(), rw.at, rw.write) {
            return Some(finish(Err(e)));
        }
        if let Some(r) = forwarded(&entry, rw.call()) {
            return Some(r);
        }
        Some(finish(match rw.write {
            false => read_ioasid(fd, &entry.file, rw),
            true => write_ioasid(fd, &entry.file, rw),
        }))
    })
}

/// `read(2)` of an ioasid file that has one (see `refused`).
fn read_ioasid(fd: c_int, file: &File, Rw { buf, count, at, .. }: Rw) -> Result<usize, c_int> {
    match file {
        File::FailNth(tid) => at_position(fd, at, |off| {
            let text = fail_nth::read(*tid, count, off as usize);
            // A checked copy: a bad buffer is EFAULT, as the kernel's copy_to_user gives.
            InProcess.write(buf, &text).map(|()| text.len())
        }),
        File::VfioDevice(d) => at_position(fd, at, |off| d.read(&InProcess, buf, count, off)),
        // A queue's position stays 0: its `read` never moves it.
        File::Fault(f) => f.read(&InProcess, buf, count, 0).map_err(|e| e.0),
        File::Veventq(q) => q.read(&InProcess, buf, count, 0).map_err(|e| e.0),
        // Its events come from back ends, which need the daemon: none here.
        File::Device(_) => Err(libc::EAGAIN),
        File::Iommufd(_) | File::TestAccess(_) | File::VfioGroup(_) => Err(libc::EINVAL),
    }
}

/// `write(2)` to an ioasid file that has one (see `refused`).
fn write_ioasid(fd: c_int, file: &File, Rw { buf, count, at, .. }: Rw) -> Result<usize, c_int> {
    match file {
        // Linux's takes the number from the first bytes and leaves the
        // position where it was.
        File::FailNth(tid) => {
            let mut data = vec![0u8; count.min(34)];
            InProcess.read(buf, &mut data).map_err(|e| e.0).and_then(|()| fail_nth::write(*tid, &data)).map(|_| count)
        }
        File::VfioDevice(d) => at_position(fd, at, |off| d.write(&InProcess, buf, count, off)),
        File::Fault(f) => f.write(&InProcess, buf, count, 0).map_err(|e| e.0),
        _ => Err(libc::EINVAL),
    }
}

/// An access at `at`, or for `read` and `write` at the file position,
/// which then moves past what was done (the memfd's own position, below
/// the mark `files` keeps in its high bits, serves as the file's, so a
/// forked child shares it as on Linux).
fn at_position(
    fd: c_int,
    at: Option<i64>,
    access: impl FnOnce(i64) -> Result<usize, ioasid_abi::Errno>,
) -> Result<usize, c_int> {
    if let Some(off) = at {
        return access(off).map_err(|e| e.0);
    }
    let raw = files::position(fd).ok_or(libc::EBADF)?;
    let mark = raw & !((1 << files::POSITION_BITS) - 1);
    let n = access((raw - mark) as i64).map_err(|e| e.0)?;
    // SAFETY: only for the duration of one lseek, on the caller's descriptor.
    let fd = unsafe { BorrowedFd::borrow_raw(fd) };
    let _ = rustix::fs::seek(fd, rustix::fs::SeekFrom::Start(raw + n as u64));
    Ok(n)
}

/// `lseek` of an ioasid file: `ESPIPE`, as none of Linux's counterparts
/// has `llseek` (their position is the shim's, see `files`); `None` for
/// any other file. A file the daemon gave is a socket, which refuses it
/// itself.
fn lseek_ioasid(fd: c_int) -> Option<i64> {
    files::rw_file(fd).map(|_| {
        set_errno(libc::ESPIPE);
        -1
    })
}

macro_rules! lseek_hook {
    ($name:ident) => {
        /// # Safety
        /// As the C library's function of the same name.
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name(fd: c_int, offset: i64, whence: c_int) -> i64 {
            // SAFETY: forwarding the caller's own arguments.
            caught(None, || lseek_ioasid(fd)).unwrap_or_else(|| unsafe { real::$name()(fd, offset, whence) })
        }
    };
}

lseek_hook!(lseek);
lseek_hook!(lseek64);

/// Linux's bounds on a vector: buffers, and bytes moved by one call
/// (`INT_MAX` rounded down to a page).
const UIO_MAXIOV: c_int = 1024;
const MAX_RW_COUNT: u64 = i32::MAX as u64 & !4095;
/// The end of the user address space, past which a buffer is `EFAULT`
/// before anything is moved: x86-64's with 5-level page tables, so that no
/// buffer a program can have is refused. With 4-level tables Linux's bound
/// is lower; a buffer between the two fails when its turn comes.
const TASK_SIZE_MAX: u64 = (1 << 56) - 4096;
/// The one flag Linux takes for a file without `read_iter` or `write_iter`.
const RWF_HIPRI: c_int = 1;

/// `readv`, `writev` and their positioned forms (offset `at`) on an
/// ioasid file. Linux's files here have `read` and `write` but no
/// `read_iter` or `write_iter`, so the kernel takes the vector apart
/// (`do_loop_readv_writev`): one `read` or `write` per buffer, stopping at
/// the first that fails or falls short, and failing only when nothing was
/// moved. The hooks of those single-buffer calls do each buffer here.
/// `None` for any other file.
fn vectored(
    fd: c_int,
    iov: *const libc::iovec,
    count: c_int,
    at: Option<i64>,
    flags: c_int,
    write: bool,
) -> Option<isize> {
    let kind = match files::rw_file(fd) {
        Some(entry) => entry.file.kind(),
        None => crate::daemon::given(fd)?,
    };
    caught(Some(-1), || {
        let moved = (|| {
            refused(kind, at, write)?;
            let bufs = import_iovec(iov, count)?;
            let total: u64 = bufs.iter().map(|&(_, len)| len).sum();
            if total == 0 {
                return Ok(0);
            }
            // `rw_verify_area`: the last byte's offset must fit.
            if at.is_some_and(|p| p.checked_add(total as i64).is_none()) {
                return Err(libc::EINVAL);
            }
            if flags & !RWF_HIPRI != 0 {
                return Err(libc::EOPNOTSUPP);
            }
            // SAFETY: reading this thread's errno.
            let errno = unsafe { *libc::__errno_location() };
            let mut done = 0u64;
            for (buf, len) in bufs {
                let (ptr, count, at) = (buf as *mut c_void, len as usize, at.map(|p| p + done as i64));
                // SAFETY: the program's own buffer, as it passed it.
                let n = unsafe {
                    match (write, at) {
                        (false, None) => read(fd, ptr, count),
                        (false, Some(p)) => pread(fd, ptr, count, p),
                        (true, None) => self::write(fd, ptr, count),
                        (true, Some(p)) => pwrite(fd, ptr, count, p),
                    }
                };
                if n < 0 {
                    if done == 0 {
                        // SAFETY: reading this thread's errno, which the hook set.
                        return Err(unsafe { *libc::__errno_location() });
                    }
                    // What was moved is the answer; errno is as it was.
                    set_errno(errno);
                    break;
                }
                done += n as u64;
                if n as u64 != len {
                    break;
                }
            }
            Ok(done as usize)
        })();
        Some(finish(moved))
    })
}

/// A vector's buffers as Linux takes them (`import_iovec`): at most
/// `UIO_MAXIOV`, read from the program (`EFAULT`), none whose length is
/// negative as a signed number (`EINVAL`) or that ends past the user
/// address space (`EFAULT`), cut to `MAX_RW_COUNT` bytes in all.
fn import_iovec(iov: *const libc::iovec, count: c_int) -> Result<Vec<(u64, u64)>, c_int> {
    if !(0..=UIO_MAXIOV).contains(&count) {
        return Err(libc::EINVAL);
    }
    let mut bufs = Vec::with_capacity(count as usize);
    for i in 0..count as u64 {
        let mut raw = [0u8; size_of::<libc::iovec>()];
        InProcess.read(iov as u64 + i * raw.len() as u64, &mut raw).map_err(|e| e.0)?;
        let (base, len) = raw.split_at(8);
        let (base, len) = (u64::from_ne_bytes(base.try_into().unwrap()), u64::from_ne_bytes(len.try_into().unwrap()));
        if len > i64::MAX as u64 {
            return Err(libc::EINVAL);
        }
        bufs.push((base, len));
    }
    let mut total = 0;
    for (base, len) in &mut bufs {
        // One buffer is cut before its check, several after theirs.
        if count == 1 {
            *len = (*len).min(MAX_RW_COUNT);
        }
        if base.checked_add(*len).is_none_or(|end| end > TASK_SIZE_MAX) {
            return Err(libc::EFAULT);
        }
        *len = (*len).min(MAX_RW_COUNT - total);
        total += *len;
    }
    Ok(bufs)
}

macro_rules! vectored_hook {
    ($name:ident, $write:literal, ($($arg:ident: $ty:ty),*), $at:expr, $flags:expr) => {
        /// # Safety
        /// As the C library's function of the same name.
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name(fd: c_int, iov: *const libc::iovec, count: c_int $(, $arg: $ty)*) -> isize {
            caught(None, || vectored(fd, iov, count, $at, $flags, $write))
                // SAFETY: forwarding the caller's own arguments.
                .unwrap_or_else(|| unsafe { real::$name()(fd, iov, count $(, $arg)*) })
        }
    };
}

vectored_hook!(readv, false, (), None, 0);
vectored_hook!(writev, true, (), None, 0);
vectored_hook!(preadv, false, (offset: i64), Some(offset), 0);
vectored_hook!(pwritev, true, (offset: i64), Some(offset), 0);
vectored_hook!(preadv64, false, (offset: i64), Some(offset), 0);
vectored_hook!(pwritev64, true, (offset: i64), Some(offset), 0);
// Offset -1: at the file position, as `readv` and `writev`.
vectored_hook!(preadv2, false, (offset: i64, flags: c_int), (offset != -1).then_some(offset), flags);
vectored_hook!(pwritev2, true, (offset: i64, flags: c_int), (offset != -1).then_some(offset), flags);
vectored_hook!(preadv64v2, false, (offset: i64, flags: c_int), (offset != -1).then_some(offset), flags);
vectored_hook!(pwritev64v2, true, (offset: i64, flags: c_int), (offset != -1).then_some(offset), flags);

macro_rules! rw_hook {
    ($name:ident, $ptr:ty, $write:literal $(, $off:ident)?) => {
        /// # Safety
        /// As the C library's function of the same name.
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name(fd: c_int, buf: $ptr, count: usize $(, $off: i64)?) -> isize {
            #[allow(unused_mut, unused_assignments)]
            let mut at: Option<i64> = None;
            $(at = Some($off);)?
            rw_one(fd, Rw { write: $write, buf: buf as u64, count, at })
                // SAFETY: forwarding the caller's own arguments.
                .unwrap_or_else(|| unsafe { real::$name()(fd, buf, count $(, $off)?) })
        }
    };
}

thread_local! {
    /// Set by a test to make this thread's next read, write or mmap of an ioasid
    /// file panic, as a bug in a handler would.
    #[cfg(test)]
    static HOOK_PANIC: Cell<bool> = const { Cell::new(false) };
}

fn panic_for_test() {
    #[cfg(test)]
    if HOOK_PANIC.take() {
        panic!("a hook's handler panicked");
    }
}

/// In a forked child, a read or write of a queue it inherited runs on its
/// parent's queue.
fn forwarded(entry: &files::Entry, call: Call) -> Option<isize> {
    if !matches!(entry.file, File::Fault(_) | File::Veventq(_)) || entry.is_local() {
        return None;
    }
    Some(finish(fork::forward(entry.owner, entry.serial, call).map(|n| n as usize)))
}

/// A byte count, or -1 with `errno` set.
fn finish(r: Result<usize, c_int>) -> isize {
    r.map_or_else(
        |e| {
            set_errno(e);
            -1
        },
        |n| n as isize,
    )
}

rw_hook!(read, *mut c_void, false);
rw_hook!(pread, *mut c_void, false, offset);
rw_hook!(pread64, *mut c_void, false, offset);
rw_hook!(write, *const c_void, true);
rw_hook!(pwrite, *const c_void, true, offset);
rw_hook!(pwrite64, *const c_void, true, offset);

/// # Safety
/// As the C library's `close_range`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn close_range(first: c_uint, last: c_uint, flags: c_int) -> c_int {
    // SAFETY: forwarding the caller's own arguments.
    let raw = || unsafe { real::close_range()(first, last, flags) };
    let fwd = || unshielded(raw);
    hook(raw, || {
        let known = (libc::CLOSE_RANGE_UNSHARE | libc::CLOSE_RANGE_CLOEXEC) as c_int;
        // Marking descriptors close-on-exec closes nothing; a call Linux
        // refuses closes nothing either.
        if first <= last && flags & !known == 0 && flags & libc::CLOSE_RANGE_CLOEXEC as c_int == 0 {
            let number = |n: c_uint| n.min(c_int::MAX as c_uint) as c_int;
            files::remove_range(number(first), number(last));
        }
        fwd()
    })
}

/// # Safety
/// As the C library's `closefrom`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn closefrom(first: c_int) {
    let raw = || {
        // SAFETY: forwarding the caller's own argument.
        unsafe { real::closefrom()(first) };
        0
    };
    let fwd = || unshielded(raw);
    hook(raw, || {
        files::remove_range(first.max(0), c_int::MAX);
        fwd()
    });
}

/// # Safety
/// As the C library's `fclose`: its descriptor is closed without passing
/// through `close`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fclose(file: *mut libc::FILE) -> c_int {
    // SAFETY: forwarding the caller's own argument.
    let raw = || unsafe { real::fclose()(file) };
    let fwd = || unshielded(raw);
    hook(raw, || {
        if !file.is_null() {
            // SAFETY: the caller's open stream.
            files::remove(unsafe { libc::fileno(file) });
        }
        fwd()
    })
}

/// `syscall(3)`, for the system calls that open, close, duplicate or
/// `ioctl` a descriptor, and `fork`: they get what the C library's
/// functions of the same names get here. Every other number goes straight
/// to the C library's `syscall`.
///
/// C-variadic functions cannot be defined in stable Rust. On x86-64 a
/// variadic call passes its integer arguments in the registers a call of a
/// function taking seven `long`s reads them from, so this definition sees
/// what the caller passed (arguments it did not pass are whatever the
/// registers held, which the C library's `syscall` passes on too).
///
/// # Safety
/// As the C library's `syscall`.
#[cfg(target_arch = "x86_64")]
#[unsafe(no_mangle)]
pub unsafe extern "C" fn syscall(
    n: c_long,
    a: c_long,
    b: c_long,
    c: c_long,
    d: c_long,
    e: c_long,
    f: c_long,
) -> c_long {
    // SAFETY: forwarding the caller's own arguments.
    let fwd = || unsafe { real::syscall(n, a, b, c, d, e, f) };
    // SAFETY (each arm): the arguments of the system call `n`, handed to
    // the hook of the C library function that makes it, as the caller's.
    unsafe {
        match n {
            libc::SYS_ioctl => c_long::from(ioctl(a as c_int, b as c_ulong, c as *mut c_void)),
            libc::SYS_close => c_long::from(close(a as c_int)),
            libc::SYS_close_range => c_long::from(close_range(a as c_uint, b as c_uint, c as c_int)),
            libc::SYS_open => c_long::from(open(a as *const c_char, b as c_int, c as c_uint)),
            libc::SYS_openat => c_long::from(openat(a as c_int, b as *const c_char, c as c_int, d as c_uint)),
            libc::SYS_openat2 => openat2(a as c_int, b as *const c_char, c as *const c_void, d as usize, fwd),
            libc::SYS_dup => c_long::from(dup(a as c_int)),
            libc::SYS_dup2 => c_long::from(dup2(a as c_int, b as c_int)),
            libc::SYS_dup3 => c_long::from(dup3(a as c_int, b as c_int, c as c_int)),
            libc::SYS_lseek => lseek(a as c_int, b, c as c_int),
            // The fork handlers give the child its own link to this process.
            libc::SYS_fork => c_long::from(libc::fork()),
            n if crate::credentials::changes_capabilities(n) => {
                let r = fwd();
                ioasid_engine::credentials_changed();
                r
            }
            _ => fwd(),
        }
    }
}

/// Fills `st` for the device, from `/dev`'s times and filesystem.
///
/// # Safety
/// `st` points to a writable `struct stat`.
unsafe fn device_stat_at(st: *mut libc::stat) -> c_int {
    // SAFETY: the caller's contract; all-zero is a valid `struct stat`.
    let st = unsafe {
        st.write(std::mem::zeroed());
        &mut *st
    };
    if let Ok(dev) = rustix::fs::stat("/dev") {
        st.st_dev = dev.st_dev;
        st.st_atime = dev.st_atime;
        st.st_mtime = dev.st_mtime;
        st.st_ctime = dev.st_ctime;
    }
    st.st_ino = u64::from(paths::IOMMU_MINOR) << 8 | u64::from(paths::MISC_MAJOR);
    paths::device_stat(st);
    0
}

/// `stat` of `path` relative to `dirfd`, answered for the device.
fn stat_at(dirfd: c_int, path: *const c_char, flags: c_int, st: *mut libc::stat, fwd: impl FnOnce() -> c_int) -> c_int {
    if path.is_null() || st.is_null() {
        return fwd();
    }
    // SAFETY: `stat`'s contract: a valid nul-terminated path.
    let p = unsafe { CStr::from_ptr(path) };
    if p.is_empty() && flags & libc::AT_EMPTY_PATH != 0 {
        return fstat_of(dirfd, st, fwd);
    }
    if let Some((major, minor)) = crate::vfio::node_rdev(p) {
        // SAFETY: the caller's buffer.
        unsafe { device_stat_at(st) };
        // SAFETY: filled just now.
        let st = unsafe { &mut *st };
        st.st_rdev = libc::makedev(major, minor);
        st.st_ino = u64::from(major) << 20 | u64::from(minor);
        return 0;
    }
    if !paths::is_iommu(dirfd, p) {
        return fwd();
    }
    // SAFETY: the caller's buffer.
    unsafe { device_stat_at(st) }
}

/// `fstat` of `fd`: what the memfd says, as a character device when it is
/// an iommufd.
fn fstat_of(fd: c_int, st: *mut libc::stat, fwd: impl FnOnce() -> c_int) -> c_int {
    let rc = fwd();
    if rc == 0 && !st.is_null() && paths::is_iommufd(fd) {
        // SAFETY: `fstat` just filled the caller's buffer.
        paths::device_stat(unsafe { &mut *st });
    } else if let (0, false, Some((major, minor))) = (rc, st.is_null(), crate::vfio::rdev(fd)) {
        // SAFETY: as above.
        let st = unsafe { &mut *st };
        paths::device_stat(st);
        st.st_rdev = libc::makedev(major, minor);
    }
    rc
}

macro_rules! stat_hook {
    ($name:ident, $real:ident, $flags:expr) => {
        /// # Safety
        /// As the C library's function of the same name.
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name(path: *const c_char, st: *mut libc::stat) -> c_int {
            let moved = sys_path(path);
            let path = moved.as_ref().map_or(path, |p| p.as_ptr());
            // SAFETY: forwarding the caller's own arguments.
            let raw = || unsafe { real::$real()(path, st) };
            let fwd = || unshielded(raw);
            hook(raw, || stat_at(libc::AT_FDCWD, path, $flags, st, fwd))
        }
    };
}

macro_rules! fstat_hook {
    ($name:ident, $real:ident) => {
        /// # Safety
        /// As the C library's function of the same name.
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name(fd: c_int, st: *mut libc::stat) -> c_int {
            // SAFETY: forwarding the caller's own arguments.
            let raw = || unsafe { real::$real()(fd, st) };
            let fwd = || unshielded(raw);
            hook(raw, || fstat_of(fd, st, fwd))
        }
    };
}

macro_rules! fstatat_hook {
    ($name:ident, $real:ident) => {
        /// # Safety
        /// As the C library's function of the same name.
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name(dirfd: c_int, path: *const c_char, st: *mut libc::stat, flags: c_int) -> c_int {
            let moved = sys_path(path);
            let path = moved.as_ref().map_or(path, |p| p.as_ptr());
            // SAFETY: forwarding the caller's own arguments.
            let raw = || unsafe { real::$real()(dirfd, path, st, flags) };
            let fwd = || unshielded(raw);
            hook(raw, || stat_at(dirfd, path, flags, st, fwd))
        }
    };
}

/// The entry points of programs built against a C library older than 2.33,
/// whose `stat` functions call these with a version number.
macro_rules! xstat_hooks {
    ($xstat:ident, $lxstat:ident, $fxstat:ident, $fxstatat:ident, $real:ident) => {
        /// # Safety
        /// As the C library's function of the same name.
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $xstat(ver: c_int, path: *const c_char, st: *mut libc::stat) -> c_int {
            // SAFETY: forwarding the caller's own arguments.
            let raw = || unsafe { real::$real()(ver, libc::AT_FDCWD, path, st, 0) };
            let fwd = || unshielded(raw);
            hook(raw, || stat_at(libc::AT_FDCWD, path, 0, st, fwd))
        }

        /// # Safety
        /// As the C library's function of the same name.
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $lxstat(ver: c_int, path: *const c_char, st: *mut libc::stat) -> c_int {
            // SAFETY: forwarding the caller's own arguments.
            let raw = || unsafe { real::$real()(ver, libc::AT_FDCWD, path, st, libc::AT_SYMLINK_NOFOLLOW) };
            let fwd = || unshielded(raw);
            hook(raw, || stat_at(libc::AT_FDCWD, path, libc::AT_SYMLINK_NOFOLLOW, st, fwd))
        }

        /// # Safety
        /// As the C library's function of the same name.
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $fxstat(ver: c_int, fd: c_int, st: *mut libc::stat) -> c_int {
            // SAFETY: forwarding the caller's own arguments.
            let raw = || unsafe { real::$real()(ver, fd, c"".as_ptr(), st, libc::AT_EMPTY_PATH) };
            let fwd = || unshielded(raw);
            hook(raw, || fstat_of(fd, st, fwd))
        }

        /// # Safety
        /// As the C library's function of the same name.
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $fxstatat(
            ver: c_int,
            dirfd: c_int,
            path: *const c_char,
            st: *mut libc::stat,
            flags: c_int,
        ) -> c_int {
            // SAFETY: forwarding the caller's own arguments.
            let raw = || unsafe { real::$real()(ver, dirfd, path, st, flags) };
            let fwd = || unshielded(raw);
            hook(raw, || stat_at(dirfd, path, flags, st, fwd))
        }
    };
}

stat_hook!(stat, stat, 0);
stat_hook!(stat64, stat64, 0);
stat_hook!(lstat, lstat, libc::AT_SYMLINK_NOFOLLOW);
stat_hook!(lstat64, lstat64, libc::AT_SYMLINK_NOFOLLOW);
fstat_hook!(fstat, fstat);
fstat_hook!(fstat64, fstat64);
fstatat_hook!(fstatat, fstatat);
fstatat_hook!(fstatat64, fstatat64);
xstat_hooks!(__xstat, __lxstat, __fxstat, __fxstatat, fxstatat);
xstat_hooks!(__xstat64, __lxstat64, __fxstat64, __fxstatat64, fxstatat64);

/// # Safety
/// As the C library's `statx`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn statx(
    dirfd: c_int,
    path: *const c_char,
    flags: c_int,
    mask: c_uint,
    stx: *mut libc::statx,
) -> c_int {
    let moved = sys_path(path);
    let path = moved.as_ref().map_or(path, |p| p.as_ptr());
    // SAFETY: forwarding the caller's own arguments.
    let raw = || unsafe { real::statx()(dirfd, path, flags, mask, stx) };
    let fwd = || unshielded(raw);
    hook(raw, || {
        if path.is_null() || stx.is_null() {
            return fwd();
        }
        // SAFETY: `statx`'s contract: a valid nul-terminated path.
        let p = unsafe { CStr::from_ptr(path) };
        let of_fd = p.is_empty() && flags & libc::AT_EMPTY_PATH != 0;
        if of_fd {
            let rc = fwd();
            if rc == 0 && paths::is_iommufd(dirfd) {
                // SAFETY: `statx` just filled the caller's buffer.
                paths::device_statx(unsafe { &mut *stx });
            } else if let (0, Some(rdev)) = (rc, crate::vfio::rdev(dirfd)) {
                // SAFETY: as above.
                vfio_statx(unsafe { &mut *stx }, rdev);
            }
            return rc;
        }
        let vfio = crate::vfio::node_rdev(p);
        if vfio.is_none() && !paths::is_iommu(dirfd, p) {
            return fwd();
        }
        // SAFETY: forwarding for `/dev`, into the caller's buffer.
        let rc = unsafe { real::statx()(libc::AT_FDCWD, c"/dev".as_ptr(), 0, mask, stx) };
        if rc == 0 {
            // SAFETY: filled just now.
            let stx = unsafe { &mut *stx };
            stx.stx_ino = u64::from(paths::IOMMU_MINOR) << 8 | u64::from(paths::MISC_MAJOR);
            paths::device_statx(stx);
            if let Some(rdev) = vfio {
                vfio_statx(stx, rdev);
            }
        }
        rc
    })
}

/// Makes `stx` describe the VFIO character device `(major, minor)`.
fn vfio_statx(stx: &mut libc::statx, (major, minor): (u32, u32)) {
    paths::device_statx(stx);
    stx.stx_rdev_major = major;
    stx.stx_rdev_minor = minor;
    stx.stx_ino = u64::from(major) << 20 | u64::from(minor);
}

/// `access` of the device.
fn access_at(dirfd: c_int, path: *const c_char, mode: c_int, fwd: impl FnOnce() -> c_int) -> c_int {
    if path.is_null() {
        return fwd();
    }
    // SAFETY: `access`'s contract: a valid nul-terminated path.
    if !paths::is_iommu(dirfd, unsafe { CStr::from_ptr(path) }) {
        return fwd();
    }
    paths::access(mode).map_or_else(
        |e| {
            set_errno(e);
            -1
        },
        |()| 0,
    )
}

/// # Safety
/// As the C library's `access`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn access(path: *const c_char, mode: c_int) -> c_int {
    let moved = sys_path(path);
    let path = moved.as_ref().map_or(path, |p| p.as_ptr());
    // SAFETY: forwarding the caller's own arguments.
    let raw = || unsafe { real::access()(path, mode) };
    let fwd = || unshielded(raw);
    hook(raw, || access_at(libc::AT_FDCWD, path, mode, fwd))
}

/// # Safety
/// As the C library's `faccessat`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn faccessat(dirfd: c_int, path: *const c_char, mode: c_int, flags: c_int) -> c_int {
    let moved = sys_path(path);
    let path = moved.as_ref().map_or(path, |p| p.as_ptr());
    // SAFETY: forwarding the caller's own arguments.
    let raw = || unsafe { real::faccessat()(dirfd, path, mode, flags) };
    let fwd = || unshielded(raw);
    hook(raw, || access_at(dirfd, path, mode, fwd))
}

type MmapFn = unsafe extern "C" fn(*mut c_void, usize, c_int, c_int, c_int, libc::off_t) -> *mut c_void;
type MunmapFn = unsafe extern "C" fn(*mut c_void, usize) -> c_int;

fn real_mmap(name: &'static str) -> MmapFn {
    static MMAP: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    static MMAP64: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    // SAFETY: `MmapFn` is the C signature of `mmap` and `mmap64`, each
    // cached in its own cell.
    unsafe {
        match name {
            "mmap64\0" => real::next(&MMAP64, name),
            _ => real::next(&MMAP, name),
        }
    }
}

fn real_munmap() -> MunmapFn {
    static MUNMAP: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    // SAFETY: `MunmapFn` is the C signature of `munmap`, alone in its cell.
    unsafe { real::next(&MUNMAP, "munmap\0") }
}

/// `mmap` of an ioasid descriptor. An iommufd maps the memory an object
/// shares with the program (`ioasid_abi::mmap`) in place of the descriptor's
/// own file, and the mapping is recorded so that it holds the object until
/// unmapped; Linux's other iommufd files have no mmap (`ENODEV`).
fn mmap_ioasid(
    entry: &files::Entry,
    addr: *mut c_void,
    len: usize,
    prot: c_int,
    flags: c_int,
    off: libc::off_t,
    fwd: MmapFn,
) -> Result<*mut c_void, c_int> {
    let File::Iommufd(ctx) = &entry.file else { return Err(libc::ENODEV) };
    if !entry.is_local() {
        // The object's memory is the parent's; a forked child cannot reach it.
        return Err(libc::EOPNOTSUPP);
    }
    let owner = ioasid_abi::mmap::region(ctx, len, prot, flags, off).map_err(|e| e.0)?;
    let memory = owner.mmap_region().expect("checked by region").memory();
    // SAFETY: the caller's own mapping request, of a file we own instead of
    // the descriptor it named; `region` checked the length against the file.
    let p = unsafe { fwd(addr, len, prot, flags, std::os::fd::AsRawFd::as_raw_fd(&memory), 0) };
    if p == libc::MAP_FAILED {
        // SAFETY: reading this thread's errno.
        return Err(unsafe { *libc::__errno_location() });
    }
    if flags & libc::MAP_FIXED != 0 {
        ioasid_abi::mmap::unmapped(p as u64, len as u64);
    }
    ioasid_abi::mmap::mapped(p as u64, len as u64, owner);
    Ok(p)
}

macro_rules! mmap_hook {
    ($name:ident) => {
        /// # Safety
        /// As the C library's function of the same name.
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name(
            addr: *mut c_void,
            len: usize,
            prot: c_int,
            flags: c_int,
            fd: c_int,
            off: libc::off_t,
        ) -> *mut c_void {
            let real = real_mmap(concat!(stringify!($name), "\0"));
            let entry = if fd < 0 || flags & libc::MAP_ANONYMOUS != 0 || IN_HOOK.with(|h| h.get()) {
                None
            } else {
                files::lookup(fd)
            };
            let Some(entry) = entry else {
                let from_daemon = if fd < 0 || flags & libc::MAP_ANONYMOUS != 0 || IN_HOOK.with(|h| h.get()) {
                    None
                } else {
                    // SAFETY: the caller's own request, of memory the daemon gave in
                    // place of the descriptor it named.
                    crate::daemon::mmap(fd, len, prot, flags, off, |memory| unsafe {
                        real(addr, len, prot, flags, memory, 0)
                    })
                };
                if let Some(r) = from_daemon {
                    return r.unwrap_or_else(|e| {
                        set_errno(e);
                        libc::MAP_FAILED
                    });
                }
                // SAFETY: forwarding the caller's own arguments.
                let p = unsafe { real(addr, len, prot, flags, fd, off) };
                if p != libc::MAP_FAILED && flags & libc::MAP_FIXED != 0 {
                    forget_regions(p as u64, len as u64);
                }
                return p;
            };
            let _shield = crate::signals::Shield::raise();
            caught(libc::MAP_FAILED, || {
                panic_for_test();
                mmap_ioasid(&entry, addr, len, prot, flags, off, real).unwrap_or_else(|e| {
                    set_errno(e);
                    libc::MAP_FAILED
                })
            })
        }
    };
}

mmap_hook!(mmap);
mmap_hook!(mmap64);

/// # Safety
/// As the C library's `munmap`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn munmap(addr: *mut c_void, len: usize) -> c_int {
    // SAFETY: forwarding the caller's own arguments.
    let r = unsafe { real_munmap()(addr, len) };
    if r == 0 {
        forget_regions(addr as u64, len as u64);
    }
    r
}

/// Drops ioasid's record of the vIOMMU regions the program no longer maps.
/// The kernel's call already succeeded, so a panic here must neither unwind
/// into the C caller nor turn that success into a failure.
fn forget_regions(addr: u64, len: u64) {
    let _ = std::panic::catch_unwind(|| {
        ioasid_abi::mmap::unmapped(addr, len);
        crate::daemon::unmapped(addr, len);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errno() -> c_int {
        // SAFETY: the calling thread's errno slot.
        unsafe { *libc::__errno_location() }
    }

    /// Linux's order: a negative offset, a file without positioned reads
    /// and writes, one without the operation.
    #[test]
    fn reads_and_writes_are_refused_in_linuxs_order() {
        assert_eq!(refused(Kind::Veventq, Some(-1), true), Err(libc::EINVAL));
        assert_eq!(refused(Kind::Veventq, Some(0), true), Err(libc::ESPIPE));
        assert_eq!(refused(Kind::Veventq, None, true), Err(libc::EINVAL));
        assert_eq!(refused(Kind::Veventq, None, false), Ok(()));
        assert_eq!(refused(Kind::Fault, None, true), Ok(()));
        assert_eq!(refused(Kind::Iommufd, Some(0), false), Err(libc::EINVAL));
        assert_eq!(refused(Kind::TestAccess, Some(0), false), Err(libc::ESPIPE));
        assert_eq!(refused(Kind::VfioDevice, Some(1 << 40), true), Ok(()));
    }

    /// A handler's panic must not unwind into the C caller (which aborts
    /// the program): the call fails with `EIO`, as every other hook's does.
    #[test]
    fn a_panic_in_a_read_or_write_handler_fails_the_call_with_eio() {
        let fd = fail_nth::open(inject_tid(), 0).expect("a fail-nth file");
        let mut buf = [0u8; 16];
        HOOK_PANIC.set(true);
        // SAFETY: `buf` is 16 writable bytes.
        let r = unsafe { read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        assert_eq!((r, errno()), (-1, libc::EIO));
        HOOK_PANIC.set(true);
        // SAFETY: `buf` is 16 readable bytes.
        let r = unsafe { pwrite(fd, buf.as_ptr().cast(), 1, 0) };
        assert_eq!((r, errno()), (-1, libc::EIO));
        // The hooks still work afterwards.
        // SAFETY: `buf` is 16 writable bytes.
        let r = unsafe { read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        assert!(r > 0, "read gave {r}");
        // SAFETY: `fd` is ours.
        unsafe { close(fd) };
    }

    #[test]
    fn a_panic_in_the_mmap_handler_fails_the_call_with_eio() {
        let fd = fail_nth::open(inject_tid(), 0).expect("a fail-nth file");
        HOOK_PANIC.set(true);
        // SAFETY: a shared mapping of a file of ours; it fails before mapping anything.
        let p = unsafe { mmap(std::ptr::null_mut(), 4096, libc::PROT_READ, libc::MAP_SHARED, fd, 0) };
        assert_eq!((p, errno()), (libc::MAP_FAILED, libc::EIO));
        // Without the panic, the same call is what Linux gives for a file without mmap.
        // SAFETY: as above.
        let p = unsafe { mmap(std::ptr::null_mut(), 4096, libc::PROT_READ, libc::MAP_SHARED, fd, 0) };
        assert_eq!((p, errno()), (libc::MAP_FAILED, libc::ENODEV));
        // SAFETY: `fd` is ours.
        unsafe { close(fd) };
    }

    fn inject_tid() -> i32 {
        ioasid_engine::inject::current_tid()
    }
}

/// `readlink` of a declared function's `/sys` link reads the tree's.
///
/// # Safety
/// As the C library's `readlink`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn readlink(path: *const c_char, buf: *mut c_char, size: usize) -> isize {
    let moved = sys_path(path);
    let path = moved.as_ref().map_or(path, |p| p.as_ptr());
    // SAFETY: the caller's arguments, the path perhaps moved into the tree.
    unsafe { real::readlink()(path, buf, size) }
}

/// # Safety
/// As the C library's `readlinkat`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn readlinkat(dirfd: c_int, path: *const c_char, buf: *mut c_char, size: usize) -> isize {
    let moved = sys_path(path);
    let path = moved.as_ref().map_or(path, |p| p.as_ptr());
    // SAFETY: as `readlink`.
    unsafe { real::readlinkat()(dirfd, path, buf, size) }
}

/// `opendir` of a declared function's `/sys` directory lists the tree's.
///
/// # Safety
/// As the C library's `opendir`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn opendir(path: *const c_char) -> *mut libc::DIR {
    let moved = sys_path(path);
    let path = moved.as_ref().map_or(path, |p| p.as_ptr());
    // SAFETY: as `readlink`.
    unsafe { real::opendir()(path) }
}

/// The C library's `realpath` resolves links with calls no hook sees, so a
/// declared function's `/sys` path is resolved in the tree here and told
/// back as the `/sys` path it stands for.
fn realpath_sys(path: *const c_char, resolved: *mut c_char, fwd: impl FnOnce() -> *mut c_char) -> *mut c_char {
    let Some(moved) = sys_path(path) else { return fwd() };
    // SAFETY: a valid path; the C library allocates the answer.
    let found = unsafe { real::realpath()(moved.as_ptr(), std::ptr::null_mut()) };
    if found.is_null() {
        return found;
    }
    // SAFETY: `realpath` returned a nul-terminated string it allocated.
    let text = unsafe { CStr::from_ptr(found) }.to_bytes().to_vec();
    // SAFETY: freeing what `realpath` allocated.
    unsafe { libc::free(found.cast()) };
    let mut out = crate::vfio::unredirect(&text).unwrap_or(text);
    if out.len() >= libc::PATH_MAX as usize {
        set_errno(libc::ENAMETOOLONG);
        return std::ptr::null_mut();
    }
    out.push(0);
    let dst = if resolved.is_null() {
        // SAFETY: an allocation the caller frees, as `realpath`'s is.
        let p = unsafe { libc::malloc(out.len()) }.cast::<c_char>();
        if p.is_null() {
            set_errno(libc::ENOMEM);
            return p;
        }
        p
    } else {
        resolved
    };
    // SAFETY: `dst` holds PATH_MAX bytes (the caller's contract) or
    // `out.len()` (allocated above); `out` is shorter than PATH_MAX.
    unsafe { std::ptr::copy_nonoverlapping(out.as_ptr().cast::<c_char>(), dst, out.len()) };
    dst
}

/// # Safety
/// As the C library's `realpath`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn realpath(path: *const c_char, resolved: *mut c_char) -> *mut c_char {
    // SAFETY: forwarding the caller's own arguments.
    realpath_sys(path, resolved, || unsafe { real::realpath()(path, resolved) })
}

/// `realpath` with `_FORTIFY_SOURCE`'s check of the buffer's size.
///
/// # Safety
/// As the C library's `__realpath_chk`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn __realpath_chk(path: *const c_char, resolved: *mut c_char, size: usize) -> *mut c_char {
    // SAFETY: forwarding the caller's own arguments; the C library checks `size`.
    let fwd = || unsafe { real::realpath_chk()(path, resolved, size) };
    if !resolved.is_null() && size < libc::PATH_MAX as usize {
        return fwd();
    }
    realpath_sys(path, resolved, fwd)
}

macro_rules! pread_chk_hook {
    ($name:ident, $real:ident) => {
        /// `pread` with `_FORTIFY_SOURCE`'s check of the buffer's size: the
        /// C library's runs its own `pread` without passing through the
        /// exported one.
        ///
        /// # Safety
        /// As the C library's function of the same name.
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name(fd: c_int, buf: *mut c_void, count: usize, offset: i64, size: usize) -> isize {
            // SAFETY: forwarding the caller's own arguments.
            let fwd = || unsafe { real::$real()(fd, buf, count, offset, size) };
            if count > size {
                // Overflowing the buffer: the C library's check fails the program.
                return fwd();
            }
            rw_one(fd, Rw { write: false, buf: buf as u64, count, at: Some(offset) }).unwrap_or_else(fwd)
        }
    };
}

pread_chk_hook!(__pread_chk, pread_chk);
pread_chk_hook!(__pread64_chk, pread64_chk);
