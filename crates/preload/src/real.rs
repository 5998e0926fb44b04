//! The C library's own functions, found past this library with
//! `dlsym(RTLD_NEXT)`, so forwarded calls never re-enter our hooks.

use std::ffi::{CStr, c_char, c_int, c_long, c_uint, c_ulong, c_void};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

pub type OpenFn = unsafe extern "C" fn(*const c_char, c_int, c_uint) -> c_int;
pub type OpenatFn = unsafe extern "C" fn(c_int, *const c_char, c_int, c_uint) -> c_int;
pub type IoctlFn = unsafe extern "C" fn(c_int, c_ulong, *mut c_void) -> c_int;
pub type CloseFn = unsafe extern "C" fn(c_int) -> c_int;
pub type DupFn = unsafe extern "C" fn(c_int) -> c_int;
pub type Dup2Fn = unsafe extern "C" fn(c_int, c_int) -> c_int;
pub type Dup3Fn = unsafe extern "C" fn(c_int, c_int, c_int) -> c_int;
pub type FcntlFn = unsafe extern "C" fn(c_int, c_int, c_ulong) -> c_int;
pub type ReadFn = unsafe extern "C" fn(c_int, *mut c_void, usize) -> isize;
pub type WriteFn = unsafe extern "C" fn(c_int, *const c_void, usize) -> isize;
pub type PreadFn = unsafe extern "C" fn(c_int, *mut c_void, usize, i64) -> isize;
pub type PwriteFn = unsafe extern "C" fn(c_int, *const c_void, usize, i64) -> isize;

/// The next definition of `name` (nul-terminated) past this library, as a
/// function pointer of type `T`, looked up once and kept in `cell`.
///
/// # Safety
/// `T` must be a function-pointer type whose signature is the C signature
/// of `name` (the transmute below takes the caller's word for it), and
/// `cell` must hold no other symbol: it caches the first lookup whatever
/// name a later call passes.
pub unsafe fn next<T: Copy>(cell: &'static OnceLock<usize>, name: &'static str) -> T {
    const { assert!(std::mem::size_of::<T>() == std::mem::size_of::<usize>(), "T is not a function pointer") };
    let p = *cell.get_or_init(|| {
        let c = CStr::from_bytes_with_nul(name.as_bytes()).expect("nul-terminated name");
        // SAFETY: dlsym with a valid, nul-terminated symbol name.
        let p = unsafe { libc::dlsym(libc::RTLD_NEXT, c.as_ptr()) };
        if p.is_null() {
            // Without the C library's function there is nothing to forward to.
            eprintln!("ioasid-preload: cannot find {name} in the C library");
            std::process::abort();
        }
        p as usize
    });
    // SAFETY: `p` is the address of `name`, non-null, and `T` is a function
    // pointer of its signature (this function's contract).
    unsafe { std::mem::transmute_copy(&p) }
}

/// Declares a forwarder `$fn` to the C library's `$sym` of type `$ty`.
macro_rules! forward {
    ($fn:ident, $ty:ty, $sym:literal) => {
        pub fn $fn() -> $ty {
            static CELL: OnceLock<usize> = OnceLock::new();
            // SAFETY: `$ty` is the C signature of `$sym`, and `CELL` is this
            // forwarder's alone.
            unsafe { next::<$ty>(&CELL, concat!($sym, "\0")) }
        }
    };
}

forward!(open, OpenFn, "open");
forward!(open64, OpenFn, "open64");
forward!(openat, OpenatFn, "openat");
forward!(openat64, OpenatFn, "openat64");
forward!(ioctl, IoctlFn, "ioctl");
forward!(close, CloseFn, "close");
forward!(dup, DupFn, "dup");
forward!(dup2, Dup2Fn, "dup2");
forward!(dup3, Dup3Fn, "dup3");
forward!(fcntl, FcntlFn, "fcntl");
forward!(fcntl64, FcntlFn, "fcntl64");
forward!(read, ReadFn, "read");
forward!(write, WriteFn, "write");
forward!(pread, PreadFn, "pread");
forward!(pread64, PreadFn, "pread64");
forward!(pwrite, PwriteFn, "pwrite");
forward!(pwrite64, PwriteFn, "pwrite64");

pub type SigactionFn = unsafe extern "C" fn(c_int, *const libc::sigaction, *mut libc::sigaction) -> c_int;
pub type SigmaskFn = unsafe extern "C" fn(c_int, *const libc::sigset_t, *mut libc::sigset_t) -> c_int;
pub type StartFn = extern "C" fn(*mut c_void) -> *mut c_void;
pub type PthreadCreateFn =
    unsafe extern "C" fn(*mut libc::pthread_t, *const libc::pthread_attr_t, StartFn, *mut c_void) -> c_int;

forward!(sigaction, SigactionFn, "sigaction");
forward!(pthread_sigmask, SigmaskFn, "pthread_sigmask");
forward!(pthread_create, PthreadCreateFn, "pthread_create");
pub type Open2Fn = unsafe extern "C" fn(*const c_char, c_int) -> c_int;
pub type Openat2Fn = unsafe extern "C" fn(c_int, *const c_char, c_int) -> c_int;
pub type FopenFn = unsafe extern "C" fn(*const c_char, *const c_char) -> *mut libc::FILE;
pub type FcloseFn = unsafe extern "C" fn(*mut libc::FILE) -> c_int;
pub type CloseRangeFn = unsafe extern "C" fn(c_uint, c_uint, c_int) -> c_int;
pub type ClosefromFn = unsafe extern "C" fn(c_int);
pub type StatFn = unsafe extern "C" fn(*const c_char, *mut libc::stat) -> c_int;
pub type FstatFn = unsafe extern "C" fn(c_int, *mut libc::stat) -> c_int;
pub type FstatatFn = unsafe extern "C" fn(c_int, *const c_char, *mut libc::stat, c_int) -> c_int;
pub type FxstatatFn = unsafe extern "C" fn(c_int, c_int, *const c_char, *mut libc::stat, c_int) -> c_int;
pub type StatxFn = unsafe extern "C" fn(c_int, *const c_char, c_int, c_uint, *mut libc::statx) -> c_int;
pub type AccessFn = unsafe extern "C" fn(*const c_char, c_int) -> c_int;
pub type FaccessatFn = unsafe extern "C" fn(c_int, *const c_char, c_int, c_int) -> c_int;

forward!(open_2, Open2Fn, "__open_2");
forward!(open64_2, Open2Fn, "__open64_2");
forward!(openat_2, Openat2Fn, "__openat_2");
forward!(openat64_2, Openat2Fn, "__openat64_2");
forward!(fopen, FopenFn, "fopen");
forward!(fopen64, FopenFn, "fopen64");
forward!(fclose, FcloseFn, "fclose");
forward!(close_range, CloseRangeFn, "close_range");
forward!(closefrom, ClosefromFn, "closefrom");
forward!(stat, StatFn, "stat");
forward!(stat64, StatFn, "stat64");
forward!(lstat, StatFn, "lstat");
forward!(lstat64, StatFn, "lstat64");
pub type LseekFn = unsafe extern "C" fn(c_int, i64, c_int) -> i64;
pub type VectorFn = unsafe extern "C" fn(c_int, *const libc::iovec, c_int) -> isize;
pub type VectorAtFn = unsafe extern "C" fn(c_int, *const libc::iovec, c_int, i64) -> isize;
pub type VectorAt2Fn = unsafe extern "C" fn(c_int, *const libc::iovec, c_int, i64, c_int) -> isize;
forward!(readv, VectorFn, "readv");
forward!(writev, VectorFn, "writev");
forward!(preadv, VectorAtFn, "preadv");
forward!(pwritev, VectorAtFn, "pwritev");
forward!(preadv64, VectorAtFn, "preadv64");
forward!(pwritev64, VectorAtFn, "pwritev64");
forward!(preadv2, VectorAt2Fn, "preadv2");
forward!(pwritev2, VectorAt2Fn, "pwritev2");
forward!(preadv64v2, VectorAt2Fn, "preadv64v2");
forward!(pwritev64v2, VectorAt2Fn, "pwritev64v2");
pub type CapsetFn = unsafe extern "C" fn(*mut c_void, *const c_void) -> c_int;
pub type Setuid1Fn = unsafe extern "C" fn(libc::uid_t) -> c_int;
pub type Setuid2Fn = unsafe extern "C" fn(libc::uid_t, libc::uid_t) -> c_int;
pub type Setuid3Fn = unsafe extern "C" fn(libc::uid_t, libc::uid_t, libc::uid_t) -> c_int;
forward!(capset, CapsetFn, "capset");
forward!(setuid, Setuid1Fn, "setuid");
forward!(seteuid, Setuid1Fn, "seteuid");
forward!(setreuid, Setuid2Fn, "setreuid");
forward!(setresuid, Setuid3Fn, "setresuid");
forward!(lseek, LseekFn, "lseek");
forward!(lseek64, LseekFn, "lseek64");
forward!(fstat, FstatFn, "fstat");
forward!(fstat64, FstatFn, "fstat64");
forward!(fstatat, FstatatFn, "fstatat");
forward!(fstatat64, FstatatFn, "fstatat64");
forward!(fxstatat, FxstatatFn, "__fxstatat");
forward!(fxstatat64, FxstatatFn, "__fxstatat64");
forward!(statx, StatxFn, "statx");
forward!(access, AccessFn, "access");
forward!(faccessat, FaccessatFn, "faccessat");

pub type SyscallFn = unsafe extern "C" fn(c_long, c_long, c_long, c_long, c_long, c_long, c_long) -> c_long;

/// The C library's `syscall`, called as a function of seven `long`s (see
/// the `syscall` hook for why that reads a variadic call's arguments, and
/// the C library's `syscall` reads them the same way: it is written in
/// assembly and never looks at the vector-register count a variadic call
/// passes).
///
/// Looked up without `OnceLock`: waiting on one can make a futex system
/// call through `syscall`, which would come back here.
///
/// # Safety
/// As the C library's `syscall` with the same arguments.
#[allow(clippy::too_many_arguments)]
pub unsafe fn syscall(n: c_long, a: c_long, b: c_long, c: c_long, d: c_long, e: c_long, f: c_long) -> c_long {
    static FN: AtomicUsize = AtomicUsize::new(0);
    let mut p = FN.load(Ordering::Relaxed);
    if p == 0 {
        // SAFETY: dlsym with a valid, nul-terminated symbol name; looking
        // it up twice when two threads race is harmless.
        p = unsafe { libc::dlsym(libc::RTLD_NEXT, c"syscall".as_ptr()) } as usize;
        if p == 0 {
            eprintln!("ioasid-preload: cannot find syscall in the C library");
            std::process::abort();
        }
        FN.store(p, Ordering::Relaxed);
    }
    // SAFETY: `p` is the C library's `syscall`, called as described above.
    unsafe { std::mem::transmute::<usize, SyscallFn>(p)(n, a, b, c, d, e, f) }
}

pub type ReadlinkFn = unsafe extern "C" fn(*const c_char, *mut c_char, usize) -> isize;
pub type ReadlinkatFn = unsafe extern "C" fn(c_int, *const c_char, *mut c_char, usize) -> isize;
pub type OpendirFn = unsafe extern "C" fn(*const c_char) -> *mut libc::DIR;
pub type RealpathFn = unsafe extern "C" fn(*const c_char, *mut c_char) -> *mut c_char;
pub type RealpathChkFn = unsafe extern "C" fn(*const c_char, *mut c_char, usize) -> *mut c_char;
pub type PreadChkFn = unsafe extern "C" fn(c_int, *mut c_void, usize, i64, usize) -> isize;

forward!(readlink, ReadlinkFn, "readlink");
forward!(readlinkat, ReadlinkatFn, "readlinkat");
forward!(opendir, OpendirFn, "opendir");
forward!(realpath, RealpathFn, "realpath");
forward!(realpath_chk, RealpathChkFn, "__realpath_chk");
forward!(pread_chk, PreadChkFn, "__pread_chk");
forward!(pread64_chk, PreadChkFn, "__pread64_chk");

/// Looks up now the forwarders a forked child may be the first to call:
/// the lookup's lock, copied while another thread of the parent held it,
/// would be held for ever in the child.
pub fn resolve_for_fork() {
    let _ = (close(), lseek(), lseek64(), readv(), writev(), preadv(), pwritev(), preadv64(), pwritev64());
    let _ = (preadv2(), pwritev2(), preadv64v2(), pwritev64v2());
    let _ = (capset(), setuid(), seteuid(), setreuid(), setresuid());
}
