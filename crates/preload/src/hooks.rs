//! The exported functions that stand in for the C library's.

use std::cell::Cell;
use std::ffi::{CStr, c_char, c_int, c_uint, c_ulong, c_void};
use std::sync::Arc;

use ioasid_abi::files::{self, File};
use ioasid_abi::{InProcess, UserMemory};
use ioasid_engine::Context;

use crate::fork::{self, Call};
use crate::{fail_nth, real};

thread_local! {
    /// Set while a hook runs, so calls made from inside it are forwarded.
    static IN_HOOK: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` as a hook unless we are already inside one (then `fallback`).
/// A panic becomes an errno instead of unwinding into C.
fn hook(fallback: impl FnOnce() -> c_int, f: impl FnOnce() -> c_int) -> c_int {
    if IN_HOOK.with(|h| h.replace(true)) {
        return fallback();
    }
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|_| {
        set_errno(libc::EIO);
        -1
    });
    IN_HOOK.with(|h| h.set(false));
    r
}

fn set_errno(e: c_int) {
    // SAFETY: the calling thread's errno slot.
    unsafe { *libc::__errno_location() = e };
}

const IOMMU: &CStr = c"/dev/iommu";

/// A new context behind a real descriptor.
fn open_iommu(flags: c_int) -> Result<c_int, c_int> {
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
    let r = if p == IOMMU {
        open_iommu(flags)
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
            // SAFETY: forwarding the caller's own arguments.
            let fwd = || unsafe { real::$real()(path, flags, mode) };
            hook(fwd, || open_special(libc::AT_FDCWD, path, flags, fwd))
        }
    };
}

macro_rules! openat_hook {
    ($name:ident, $real:ident) => {
        /// # Safety
        /// As the C library's function of the same name.
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name(dirfd: c_int, path: *const c_char, flags: c_int, mode: c_uint) -> c_int {
            // SAFETY: forwarding the caller's own arguments.
            let fwd = || unsafe { real::$real()(dirfd, path, flags, mode) };
            hook(fwd, || open_special(dirfd, path, flags, fwd))
        }
    };
}

open_hook!(open, open);
open_hook!(open64, open64);
openat_hook!(openat, openat);
openat_hook!(openat64, openat64);

/// # Safety
/// As the C library's `ioctl`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ioctl(fd: c_int, request: c_ulong, arg: *mut c_void) -> c_int {
    // SAFETY: forwarding the caller's own arguments.
    let fwd = || unsafe { real::ioctl()(fd, request, arg) };
    hook(fwd, || {
        let Some(ctx) = files::context(fd) else { return fwd() };
        let call = Call::Ioctl { request: request as u32, arg: arg as u64 };
        let result = match fork::forward(fd, call) {
            Some(r) => r.map(|v| v as c_int),
            None => ioasid_abi::ioctl(&ctx, &InProcess, request as u32, arg as u64).map_err(|e| e.0),
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
    let fwd = || unsafe { real::close()(fd) };
    hook(fwd, || {
        files::remove(fd);
        fwd()
    })
}

/// Records `new` as another descriptor of whatever `old` is.
fn duplicated(old: c_int, new: c_int) -> c_int {
    if new >= 0 {
        files::duplicate(old, new);
    }
    new
}

/// # Safety
/// As the C library's `dup`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dup(old: c_int) -> c_int {
    // SAFETY: forwarding the caller's own argument.
    let fwd = || unsafe { real::dup()(old) };
    hook(fwd, || duplicated(old, fwd()))
}

/// # Safety
/// As the C library's `dup2`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dup2(old: c_int, new: c_int) -> c_int {
    // SAFETY: forwarding the caller's own arguments.
    let fwd = || unsafe { real::dup2()(old, new) };
    hook(fwd, || if old == new { fwd() } else { duplicated(old, fwd()) })
}

/// # Safety
/// As the C library's `dup3`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dup3(old: c_int, new: c_int, flags: c_int) -> c_int {
    // SAFETY: forwarding the caller's own arguments.
    let fwd = || unsafe { real::dup3()(old, new, flags) };
    hook(fwd, || duplicated(old, fwd()))
}

macro_rules! fcntl_hook {
    ($name:ident, $real:ident) => {
        /// # Safety
        /// As the C library's function of the same name.
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name(fd: c_int, cmd: c_int, arg: c_ulong) -> c_int {
            // SAFETY: forwarding the caller's own arguments.
            let fwd = || unsafe { real::$real()(fd, cmd, arg) };
            hook(fwd, || match cmd {
                libc::F_DUPFD | libc::F_DUPFD_CLOEXEC => duplicated(fd, fwd()),
                _ => fwd(),
            })
        }
    };
}

fcntl_hook!(fcntl, fcntl);
fcntl_hook!(fcntl64, fcntl64);

macro_rules! read_hook {
    ($name:ident, $real:ident $(, $off:ident)?) => {
        /// # Safety
        /// As the C library's function of the same name.
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name(fd: c_int, buf: *mut c_void, count: usize $(, $off: i64)?) -> isize {
            let Some(file) = files::rw_file(fd) else {
                // SAFETY: forwarding the caller's own arguments.
                return unsafe { real::$real()(fd, buf, count $(, $off)?) };
            };
            #[allow(unused_mut, unused_assignments)]
            let mut offset = 0i64;
            $(offset = $off;)?
            if let Some(r) = forwarded(&file, fd, Call::Read { buf: buf as u64, count: count as u64, offset }) {
                return r;
            }
            let r = match file {
                File::FailNth(tid) => {
                    // SAFETY: the caller hands us `count` writable bytes at `buf`.
                    let out = unsafe { std::slice::from_raw_parts_mut(buf.cast::<u8>(), count) };
                    Ok(fail_nth::read(tid, out, offset.max(0) as usize))
                }
                File::Fault(f) => f.read(&InProcess, buf as u64, count, offset).map_err(|e| e.0),
                File::Veventq(q) => q.read(&InProcess, buf as u64, count, offset).map_err(|e| e.0),
                _ => unreachable!("rw_file returns only files with their own read"),
            };
            finish(r)
        }
    };
}

macro_rules! write_hook {
    ($name:ident, $real:ident $(, $off:ident)?) => {
        /// # Safety
        /// As the C library's function of the same name.
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name(fd: c_int, buf: *const c_void, count: usize $(, $off: i64)?) -> isize {
            let Some(file) = files::rw_file(fd) else {
                // SAFETY: forwarding the caller's own arguments.
                return unsafe { real::$real()(fd, buf, count $(, $off)?) };
            };
            #[allow(unused_mut, unused_assignments)]
            let mut offset = 0i64;
            $(offset = $off;)?
            if let Some(r) = forwarded(&file, fd, Call::Write { buf: buf as u64, count: count as u64, offset }) {
                return r;
            }
            let r = match file {
                File::FailNth(tid) => {
                    // As Linux's kstrtouint_from_user: the number is in the first bytes.
                    let mut data = vec![0u8; count.min(34)];
                    InProcess.read(buf as u64, &mut data).map_err(|e| e.0).and_then(|()| fail_nth::write(tid, &data)).map(|_| count)
                }
                File::Fault(f) => f.write(&InProcess, buf as u64, count, offset).map_err(|e| e.0),
                // Linux's vEVENTQ file has no write.
                File::Veventq(_) => Err(libc::EINVAL),
                _ => unreachable!("rw_file returns only files with their own write"),
            };
            finish(r)
        }
    };
}

/// In a forked child, a queue's read or write runs on its parent's queue.
fn forwarded(file: &File, fd: c_int, call: Call) -> Option<isize> {
    if !matches!(file, File::Fault(_) | File::Veventq(_)) || !fork::is_child() {
        return None;
    }
    Some(finish(fork::forward(fd, call).unwrap_or(Err(libc::EIO)).map(|n| n as usize)))
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

read_hook!(read, read);
read_hook!(pread, pread, offset);
read_hook!(pread64, pread64, offset);
write_hook!(write, write);
write_hook!(pwrite, pwrite, offset);
write_hook!(pwrite64, pwrite64, offset);
