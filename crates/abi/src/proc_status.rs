//! `/proc/<pid>/status` as Linux would write it with ioasid's pins in it.
//!
//! Linux charges the pages iommufd pins to a process's `mm`: they show in
//! its `VmPin` (and in `VmLck` when accounting is per process), which is how
//! programs, and Linux's selftests of `IOMMU_IOAS_CHANGE_PROCESS`, see where
//! pinned memory is charged. ioasid's pins are not the kernel's, so a
//! read-only open of a status file gets a copy of the kernel's text with
//! ioasid's charges added to those two lines (the preload shim and the
//! supervisor both answer such opens). Where nothing is charged, the open
//! goes to the kernel untouched.

use std::os::fd::OwnedFd;

use crate::errno::Errno;

/// The process whose status file `path` names, `me` being the caller:
/// `/proc/self/status`, `/proc/thread-self/status` or `/proc/<pid>/status`.
pub fn target(path: &[u8], me: i32) -> Option<i32> {
    let rest = path.strip_prefix(b"/proc/")?.strip_suffix(b"/status")?;
    match rest {
        b"self" | b"thread-self" => Some(me),
        digits if !digits.is_empty() && digits.iter().all(u8::is_ascii_digit) => {
            std::str::from_utf8(digits).ok()?.parse().ok()
        }
        _ => None,
    }
}

/// A memfd reading `pid`'s status with `locked` and `pinned` pages added to
/// `VmLck` and `VmPin`, positioned at its start; `None` when nothing is
/// charged or the kernel's text cannot be read.
pub fn file(pid: i32, locked: u64, pinned: u64, cloexec: bool) -> Option<Result<OwnedFd, Errno>> {
    if locked == 0 && pinned == 0 {
        return None;
    }
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib = |pages: u64| pages * (rustix::param::page_size() as u64 / 1024);
    let text = with_pages(&text, "VmLck:", kib(locked));
    let text = with_pages(&text, "VmPin:", kib(pinned));
    Some(crate::user::new_fd_with(c"status", cloexec).and_then(|fd| {
        rustix::io::write(&fd, text.as_bytes()).map_err(|e| Errno(e.raw_os_error()))?;
        rustix::fs::seek(&fd, rustix::fs::SeekFrom::Start(0)).map_err(|e| Errno(e.raw_os_error()))?;
        Ok(fd)
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
        assert_eq!(target(b"/proc/self/status", 7), Some(7));
        assert_eq!(target(b"/proc/thread-self/status", 7), Some(7));
        assert_eq!(target(b"/proc/42/status", 7), Some(42));
        assert_eq!(target(b"/proc/42/stat", 7), None);
        assert_eq!(target(b"/proc//status", 7), None);
        assert_eq!(target(b"/proc/4x/status", 7), None);
    }

    #[test]
    fn charges_are_added_to_their_lines_only() {
        let text = "Name:\tprog\nVmLck:\t       0 kB\nVmPin:\t      12 kB\nVmRSS:\t     100 kB\n";
        let out = with_pages(&with_pages(text, "VmLck:", 8), "VmPin:", 4);
        assert_eq!(out, "Name:\tprog\nVmLck:\t       8 kB\nVmPin:\t      16 kB\nVmRSS:\t     100 kB\n");
    }
}
