//! Linux's failure-injection files, served from the engine's own injection
//! (`ioasid_engine::inject`): `/proc/<pid>/task/<tid>/fail-nth` arms a
//! thread, and the `fail*` knobs of debugfs, which only tune which kernel
//! allocations may fail, are accepted where the kernel has none.

use std::ffi::{CStr, c_int};

use ioasid_abi::files::{self, File};
use ioasid_abi::user::new_fd_with;
use ioasid_engine::inject;

/// The thread whose `fail-nth` `path` names, if it names one.
pub fn thread_of(path: &CStr) -> Option<i32> {
    let p = path.to_str().ok()?;
    if p == "/proc/thread-self/fail-nth" {
        return Some(inject::current_tid());
    }
    let rest = p.strip_prefix("/proc/")?;
    let (proc_part, rest) = rest.split_once("/task/")?;
    if proc_part != "self" && proc_part.parse::<u32>().ok() != Some(std::process::id()) {
        return None;
    }
    rest.strip_suffix("/fail-nth")?.parse().ok()
}

/// Opens `fail-nth` of thread `tid`.
pub fn open(tid: i32, flags: c_int) -> Result<c_int, c_int> {
    let fd = new_fd_with(c"ioasid:fail-nth", flags & libc::O_CLOEXEC != 0).map_err(|e| e.0)?;
    let fd = std::os::fd::IntoRawFd::into_raw_fd(fd);
    files::insert(fd, File::FailNth(tid));
    Ok(fd)
}

/// What reading up to `count` bytes at `offset` gives: the steps still to
/// go, then a newline.
pub fn read(tid: i32, count: usize, offset: usize) -> Vec<u8> {
    let text = format!("{}\n", inject::fail_nth(tid));
    let src = text.as_bytes().get(offset..).unwrap_or(&[]);
    src[..src.len().min(count)].to_vec()
}

/// Writing a number arms the thread; anything else is `EINVAL`.
pub fn write(tid: i32, data: &[u8]) -> Result<usize, c_int> {
    let n: u32 = std::str::from_utf8(data).ok().and_then(|s| s.trim().parse().ok()).ok_or(libc::EINVAL)?;
    inject::set_fail_nth(tid, n);
    Ok(data.len())
}

/// Whether `path` (relative to `dirfd` when not absolute) is one of
/// debugfs's `fail*` knobs.
pub fn is_debugfs_knob(dirfd: c_int, path: &CStr) -> bool {
    let Ok(p) = path.to_str() else { return false };
    if let Some(rest) = p.strip_prefix("/sys/kernel/debug/") {
        return rest.starts_with("fail");
    }
    if p.starts_with('/') || !p.starts_with("fail") {
        return false;
    }
    std::fs::read_link(format!("/proc/self/fd/{dirfd}"))
        .is_ok_and(|dir| dir.as_os_str() == "/sys/kernel/debug" || dir.as_os_str() == "/sys/kernel/debug/")
}

/// A descriptor that takes writes to a knob the kernel does not have.
pub fn knob_sink(flags: c_int) -> Result<c_int, c_int> {
    let fd = new_fd_with(c"ioasid:debugfs-knob", flags & libc::O_CLOEXEC != 0).map_err(|e| e.0)?;
    Ok(std::os::fd::IntoRawFd::into_raw_fd(fd))
}
