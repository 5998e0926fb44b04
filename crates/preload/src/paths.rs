//! Which paths name `/dev/iommu`, and what `stat` says about it.
//!
//! Programs spell the device's path in more ways than one: `//dev/iommu`,
//! `/dev/./iommu`, `/dev/../dev/iommu`, `iommu` relative to a directory
//! descriptor of `/dev` or to the working directory `/dev`, and
//! `/proc/self/fd/N` (or `/dev/fd/N`) of an iommufd, which on Linux opens
//! the device again: a new context. Paths are compared after removing `.`,
//! `..` and repeated slashes, without following symbolic links.
//!
//! Linux's `/dev/iommu` is a misc character device (major 10, a dynamic
//! minor); `stat` of the path and of an iommufd answer as for one.

use std::ffi::{CStr, c_int};
use std::os::unix::ffi::OsStrExt;

use ioasid_abi::files::{self, File};

const IOMMU: &[u8] = b"/dev/iommu";

/// Linux's misc devices' major number.
pub const MISC_MAJOR: u32 = 10;
/// The minor number this shim reports (Linux's is given out at boot).
pub const IOMMU_MINOR: u32 = 123;

/// `path` without `.`, `..` and repeated slashes (`..` at the root stays
/// at the root, as in Linux).
fn normalise(path: &[u8]) -> Vec<u8> {
    let mut parts: Vec<&[u8]> = Vec::new();
    for part in path.split(|&b| b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    let mut out = Vec::with_capacity(path.len());
    for p in parts {
        out.push(b'/');
        out.extend_from_slice(p);
    }
    out
}

/// The directory `dirfd` names (the working directory for `AT_FDCWD`).
fn directory(dirfd: c_int) -> Option<Vec<u8>> {
    let dir = if dirfd == libc::AT_FDCWD {
        std::env::current_dir().ok()?
    } else {
        std::fs::read_link(format!("/proc/self/fd/{dirfd}")).ok()?
    };
    Some(dir.as_os_str().as_bytes().to_vec())
}

/// `path` made absolute against `dirfd` and normalised, for paths whose
/// last component is `last` (the only ones worth the work).
fn resolve(dirfd: c_int, path: &[u8], last: &[u8]) -> Option<Vec<u8>> {
    let tail = path.rsplit(|&b| b == b'/').next()?;
    if tail != last {
        return None;
    }
    if path.first() == Some(&b'/') {
        return Some(normalise(path));
    }
    let mut full = directory(dirfd)?;
    full.push(b'/');
    full.extend_from_slice(path);
    Some(normalise(&full))
}

/// Whether `path`, relative to `dirfd`, names `/dev/iommu`.
pub fn is_iommu(dirfd: c_int, path: &CStr) -> bool {
    let p = path.to_bytes();
    p == IOMMU || resolve(dirfd, p, b"iommu").is_some_and(|full| full == IOMMU)
}

/// Whether `path` reopens an iommufd through `/proc/self/fd` or `/dev/fd`.
pub fn reopens_iommufd(path: &CStr) -> bool {
    let p = path.to_bytes();
    let Some(n) = p.rsplit(|&b| b == b'/').next() else { return false };
    let Some(fd) = std::str::from_utf8(n).ok().and_then(|n| n.parse::<c_int>().ok()) else { return false };
    let dir = &p[..p.len() - n.len()];
    let pid = format!("/proc/{}/fd/", std::process::id());
    let named = matches!(dir, b"/proc/self/fd/" | b"/dev/fd/" | b"/proc/thread-self/fd/") || dir == pid.as_bytes();
    named && matches!(files::get(fd), Some(File::Iommufd(_)))
}

/// Whether `fd` is an iommufd.
pub fn is_iommufd(fd: c_int) -> bool {
    matches!(files::get(fd), Some(File::Iommufd(_)))
}

/// Makes `st` describe the device; its times and filesystem stay those of
/// the file it was filled from (the memfd underneath, or `/dev`).
pub fn device_stat(st: &mut libc::stat) {
    st.st_mode = libc::S_IFCHR | 0o666;
    st.st_rdev = libc::makedev(MISC_MAJOR, IOMMU_MINOR);
    st.st_nlink = 1;
    st.st_uid = 0;
    st.st_gid = 0;
    st.st_size = 0;
    st.st_blocks = 0;
    st.st_blksize = 4096;
}

/// `statx`'s version of `device_stat`.
pub fn device_statx(stx: &mut libc::statx) {
    stx.stx_mode = (libc::S_IFCHR | 0o666) as u16;
    stx.stx_rdev_major = MISC_MAJOR;
    stx.stx_rdev_minor = IOMMU_MINOR;
    stx.stx_nlink = 1;
    stx.stx_uid = 0;
    stx.stx_gid = 0;
    stx.stx_size = 0;
    stx.stx_blocks = 0;
    stx.stx_blksize = 4096;
}

/// Whether `access` with `mode` is allowed on the device (read and write
/// for everyone, as the shim lets everyone open it; nobody may execute it).
pub fn access(mode: c_int) -> Result<(), c_int> {
    if mode & !(libc::R_OK | libc::W_OK | libc::X_OK) != 0 {
        return Err(libc::EINVAL);
    }
    if mode & libc::X_OK != 0 {
        return Err(libc::EACCES);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::normalise;

    #[test]
    fn spellings_of_the_device_normalise_to_it() {
        for p in ["/dev/iommu", "//dev/iommu", "/dev/./iommu", "/dev/../dev/iommu", "/../dev//iommu/"] {
            assert_eq!(normalise(p.as_bytes()), b"/dev/iommu", "{p}");
        }
        assert_ne!(normalise(b"/dev/iommu/.."), b"/dev/iommu");
    }
}
