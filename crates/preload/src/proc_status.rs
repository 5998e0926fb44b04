//! `/proc/<pid>/status` with ioasid's pins in it (see
//! `ioasid_abi::proc_status`), counted by every process whose contexts this
//! one shares (see `fork`) and by the daemon in daemon mode.

use std::ffi::{CStr, c_int};

use crate::fork;

/// The process whose status file `path` names.
pub fn target(path: &CStr) -> Option<i32> {
    ioasid_abi::proc_status::target(path.to_bytes(), std::process::id() as i32)
}

/// A descriptor reading the status of `pid` with ioasid's charges in it,
/// or `None` when there are none (the kernel's file is then the answer).
pub fn open(_path: &CStr, pid: i32, flags: c_int) -> Option<Result<c_int, c_int>> {
    if flags & libc::O_ACCMODE != libc::O_RDONLY {
        return None;
    }
    let pages = |locked| fork::charged_pages(pid, locked) + crate::daemon::charged_pages(pid, locked);
    let file = ioasid_abi::proc_status::file(pid, pages(true), pages(false), flags & libc::O_CLOEXEC != 0)?;
    Some(file.map(std::os::fd::IntoRawFd::into_raw_fd).map_err(|e| e.0))
}
