//! `/proc/<pid>/status` as Linux would write it with ioasid's pins in it.
//!
//! Linux charges the pages iommufd pins to a process's `mm`: they show in
//! its `VmPin` (and in `VmLck` when accounting is per process), which is how
//! programs, and Linux's selftests of `IOMMU_IOAS_CHANGE_PROCESS`, see where
//! pinned memory is charged. ioasid's pins are not the kernel's, so a
//! read-only open of a status file gets a copy of the kernel's text with
//! ioasid's charges added to those two lines, counted by every process
//! whose contexts this one shares (see `fork`). Where nothing is charged,
//! the open goes to the kernel untouched.

use std::ffi::{CStr, c_int};

use crate::fork;

/// The process whose status file `path` names: `/proc/self/status`,
/// `/proc/thread-self/status` or `/proc/<pid>/status`.
pub fn target(path: &CStr) -> Option<i32> {
    let rest = path.to_bytes().strip_prefix(b"/proc/")?.strip_suffix(b"/status")?;
    match rest {
        b"self" | b"thread-self" => Some(std::process::id() as i32),
        digits if !digits.is_empty() && digits.iter().all(u8::is_ascii_digit) => {
            std::str::from_utf8(digits).ok()?.parse().ok()
        }
        _ => None,
    }
}

/// A descriptor reading the status of `pid` with ioasid's charges in it,
/// or `None` when there are none (the kernel's file is then the answer).
pub fn open(path: &CStr, pid: i32, flags: c_int) -> Option<Result<c_int, c_int>> {
    if flags & libc::O_ACCMODE != libc::O_RDONLY {
        return None;
    }
    let pages = |locked| fork::charged_pages(pid, locked) + crate::daemon::charged_pages(pid, locked);
    let (locked, pinned) = (pages(true), pages(false));
    if locked == 0 && pinned == 0 {
        return None;
    }
    // The kernel's text; this runs inside a hook, so the open is the C library's.
    let text = std::fs::read_to_string(path.to_str().ok()?).ok()?;
    let kib = |pages: u64| pages * (rustix::param::page_size() as u64 / 1024);
    let text = with_pages(&text, "VmLck:", kib(locked));
    let text = with_pages(&text, "VmPin:", kib(pinned));
    Some(ioasid_abi::user::new_fd_with(c"status", flags & libc::O_CLOEXEC != 0).map_err(|e| e.0).and_then(|fd| {
        rustix::io::write(&fd, text.as_bytes()).map_err(|e| e.raw_os_error())?;
        rustix::fs::seek(&fd, rustix::fs::SeekFrom::Start(0)).map_err(|e| e.raw_os_error())?;
        Ok(std::os::fd::IntoRawFd::into_raw_fd(fd))
    }))
}

/// `text` with `kib` added to the value of its line `tag` (`VmPin:  4 kB`).
fn with_pages(text: &str, tag: &str, kib: u64) -> String {
    let mut out = String::with_capacity(text.len() + 8);
    for line in text.split_inclusive('\n') {
        let value = line.strip_prefix(tag).and_then(|v| v.trim().strip_suffix("kB")).map(str::trim);
        match value.and_then(|v| v.parse::<u64>().ok()) {
            Some(n) => out.push_str(&format!("{tag}\t{:>8} kB\n", n + kib)),
            None => out.push_str(line),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_paths_name_their_process() {
        let me = std::process::id() as i32;
        assert_eq!(target(c"/proc/self/status"), Some(me));
        assert_eq!(target(c"/proc/thread-self/status"), Some(me));
        assert_eq!(target(c"/proc/42/status"), Some(42));
        assert_eq!(target(c"/proc/42/stat"), None);
        assert_eq!(target(c"/proc//status"), None);
        assert_eq!(target(c"/proc/4x/status"), None);
    }

    #[test]
    fn charges_are_added_to_their_lines_only() {
        let text = "Name:\tprog\nVmLck:\t       0 kB\nVmPin:\t      12 kB\nVmRSS:\t     100 kB\n";
        let out = with_pages(&with_pages(text, "VmLck:", 8), "VmPin:", 4);
        assert_eq!(out, "Name:\tprog\nVmLck:\t       8 kB\nVmPin:\t      16 kB\nVmRSS:\t     100 kB\n");
    }
}
