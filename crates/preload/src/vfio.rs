//! The VFIO files of the declared PCI functions, as the shim opens them:
//! `/dev/vfio/devices/vfioN` (a device's cdev), `/dev/vfio/N` (its group)
//! and `/dev/vfio/vfio` (a container, which is an iommufd), and the `/sys`
//! paths VFIO users look the functions up by, sent to the tree `ioasid run`
//! wrote (`IOASID_SYSFS`) so that its relative links resolve as in sysfs.
//!
//! Nothing here is consulted for a path outside `/dev/vfio` and `/sys`, and
//! nothing at all when the run declares no devices.

use std::ffi::{CStr, CString, c_int};
use std::sync::{Arc, OnceLock};

use ioasid_abi::files::{self, File};
use ioasid_abi::vfio::declared::{self, DeviceSpec};
use ioasid_abi::vfio::device::DeviceFile;
use ioasid_abi::vfio::group::GroupFile;
use ioasid_abi::vfio::sysfs;
use ioasid_engine::Context;

/// Linux's VFIO misc device (`/dev/vfio/vfio`): major 10, minor 196.
const VFIO_CONTAINER_MINOR: u32 = 196;
/// The major number group files report (Linux's is dynamic).
pub const VFIO_GROUP_MAJOR: u32 = 237;

/// What an open of a VFIO path makes.
enum Node {
    Container,
    Group(u32),
    Device(u32),
}

fn node(path: &[u8]) -> Option<Node> {
    let rest = path.strip_prefix(b"/dev/vfio/")?;
    if rest == b"vfio" {
        return Some(Node::Container);
    }
    let number = |s: &[u8]| std::str::from_utf8(s).ok()?.parse::<u32>().ok();
    if let Some(n) = rest.strip_prefix(b"devices/vfio") {
        return number(n).map(Node::Device);
    }
    number(rest).map(Node::Group)
}

/// Opens `path` when it is one of the declared functions' VFIO files (or
/// the container); `None` leaves it to the file system.
pub fn open(path: &CStr, flags: c_int) -> Option<Result<c_int, c_int>> {
    if !path.to_bytes().starts_with(b"/dev/vfio/") || declared::all().is_empty() {
        return None;
    }
    let cloexec = flags & libc::O_CLOEXEC != 0;
    let file = match node(path.to_bytes())? {
        Node::Container => File::Iommufd(Arc::new(Context::new())),
        Node::Device(n) => File::VfioDevice(Arc::new(DeviceFile::open_cdev(declared::by_index(n)?.clone()))),
        Node::Group(n) => match GroupFile::open(declared::by_index(n)?.clone()) {
            Ok(g) => File::VfioGroup(Arc::new(g)),
            Err(e) => return Some(Err(e.0)),
        },
    };
    let name = match &file {
        File::Iommufd(_) => c"ioasid:/dev/vfio/vfio",
        File::VfioGroup(_) => c"ioasid:/dev/vfio/group",
        _ => c"ioasid:/dev/vfio/devices/vfio",
    };
    Some(match ioasid_abi::user::new_fd_with(name, cloexec) {
        Ok(fd) => {
            let fd = std::os::fd::IntoRawFd::into_raw_fd(fd);
            files::insert(fd, file);
            crate::fork::install();
            Ok(fd)
        }
        Err(e) => Err(e.0),
    })
}

/// The device numbers `fstat` reports for a VFIO file, if `fd` is one.
pub fn rdev(fd: c_int) -> Option<(u32, u32)> {
    match files::get(fd)? {
        File::VfioDevice(d) => Some((sysfs::VFIO_DEV_MAJOR, d.declared().index)),
        File::VfioGroup(g) => Some((VFIO_GROUP_MAJOR, g.declared().index)),
        _ => None,
    }
}

/// The device numbers `stat` reports for `path`, when it is a declared
/// function's VFIO node (or the container's).
pub fn node_rdev(path: &CStr) -> Option<(u32, u32)> {
    if !path.to_bytes().starts_with(b"/dev/vfio/") || declared::all().is_empty() {
        return None;
    }
    match node(path.to_bytes())? {
        Node::Container => Some((crate::paths::MISC_MAJOR, VFIO_CONTAINER_MINOR)),
        Node::Device(n) => declared::by_index(n).map(|_| (sysfs::VFIO_DEV_MAJOR, n)),
        Node::Group(n) => declared::by_index(n).map(|_| (VFIO_GROUP_MAJOR, n)),
    }
}

/// Where `/sys` lookups of the declared functions go.
struct Tree {
    root: Vec<u8>,
    prefixes: Vec<Vec<u8>>,
}

fn tree() -> Option<&'static Tree> {
    static TREE: OnceLock<Option<Tree>> = OnceLock::new();
    TREE.get_or_init(|| {
        // Read without the declared list itself: building models is not
        // needed to know their addresses, and this runs inside path hooks.
        let root = std::env::var_os(sysfs::ENV)?;
        let specs = DeviceSpec::parse_list(&std::env::var(declared::ENV).ok()?).ok()?;
        let prefixes =
            specs.iter().enumerate().flat_map(|(i, s)| sysfs::prefixes(s, i as u32)).map(String::into_bytes).collect();
        Some(Tree { root: std::os::unix::ffi::OsStringExt::into_vec(root), prefixes })
    })
    .as_ref()
}

/// `path` in the tree, when it is a `/sys` path of a declared function.
pub fn redirect(path: &CStr) -> Option<CString> {
    let p = path.to_bytes();
    if !p.starts_with(b"/sys/") {
        return None;
    }
    let tree = tree()?;
    let hit = tree.prefixes.iter().any(|pre| p.starts_with(pre) && matches!(p.get(pre.len()), None | Some(b'/')));
    if !hit {
        return None;
    }
    let mut out = tree.root.clone();
    out.extend_from_slice(&p[4..]);
    CString::new(out).ok()
}

/// A path the C library resolved inside the tree, told as the `/sys` path
/// it stands for.
pub fn unredirect(resolved: &[u8]) -> Option<Vec<u8>> {
    let tree = tree()?;
    let rest = resolved.strip_prefix(tree.root.as_slice())?;
    if !(rest.is_empty() || rest.starts_with(b"/")) {
        return None;
    }
    let mut out = b"/sys".to_vec();
    out.extend_from_slice(rest);
    Some(out)
}
