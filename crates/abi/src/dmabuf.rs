//! The selftest mock's dma-buf (`IOMMU_TEST_OP_DMABUF_GET` and
//! `IOMMU_TEST_OP_DMABUF_REVOKE`) and `IOMMU_IOAS_MAP_FILE` of one.
//!
//! Linux's mock exports kernel memory as a dma-buf that iommufd maps by its
//! physical address; its exporter may revoke it, which takes it out of every
//! domain, and maps of a revoked dma-buf fail with `ENODEV`. Here the dma-buf
//! is a sealed memfd (it cannot grow or shrink) that ioasid creates and
//! knows by its inode: `MAP_FILE` of it maps it uncharged, as Linux charges
//! no dma-buf, and a revoke makes the engine's mappings of it inaccessible,
//! so DMA through them faults and accesses fail with `EFAULT`. Unrevoking
//! lets new maps succeed; mappings revoked stay revoked, as Linux's do. Unlike
//! Linux's, the fd can be mapped and read by the program (it is a memfd);
//! any other file passed to `MAP_FILE` is the ordinary file mapping.

use std::cell::Cell;
use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock, Mutex, Weak};

use ioasid_engine::pages::Pages;
use ioasid_engine::{Context, PAGE_SIZE, Perm};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::errno::Errno;
use crate::selftest::{IOMMU_TEST_CMD, TEST_CMD_MIN_SIZE, iommu_test_cmd};
use crate::ucmd::{Op, Ucmd};
use crate::user::UserMemory;

pub const IOMMU_TEST_OP_DMABUF_GET: u32 = 22;
pub const IOMMU_TEST_OP_DMABUF_REVOKE: u32 = 23;

/// The largest dma-buf the mock exports.
const MAX_PAGES: u64 = 512;

#[repr(C)]
#[derive(Debug, Default, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct DmabufGet {
    pub length: u32,
    pub open_flags: u32,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct DmabufRevoke {
    pub dmabuf_fd: i32,
    pub revoked: u32,
}

struct Dmabuf {
    /// Ours, so the inode that names it stays this dma-buf's while it is known.
    memfd: OwnedFd,
    size: u64,
    revoked: AtomicBool,
    /// What maps it, to revoke.
    mapped: Mutex<Vec<Weak<Pages>>>,
}

/// A file's device and inode.
type FileId = (u64, u64);

/// Known dma-bufs by their file.
static DMABUFS: LazyLock<Mutex<HashMap<FileId, Arc<Dmabuf>>>> = LazyLock::new(|| Mutex::new(HashMap::new()));

fn identity(fd: BorrowedFd<'_>) -> Option<FileId> {
    let st = rustix::fs::fstat(fd).ok()?;
    Some((st.st_dev, st.st_ino))
}

fn lookup(u: &Ucmd, fd: i32) -> Option<Arc<Dmabuf>> {
    if fd < 0 {
        return None;
    }
    let file = u.fds().ok()?.get(fd).ok()?;
    let key = identity(file.as_fd())?;
    DMABUFS.lock().unwrap_or_else(|e| e.into_inner()).get(&key).cloned()
}

/// Forgets dma-bufs nothing uses any more: no fd of the program's names
/// them and nothing maps them (Linux frees a dma-buf then).
fn prune() {
    let open: Vec<(u64, u64, i32)> = std::fs::read_dir("/proc/self/fd")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
                .filter_map(|fd| {
                    // SAFETY: as in `lookup`.
                    let (dev, ino) = identity(unsafe { BorrowedFd::borrow_raw(fd) })?;
                    Some((dev, ino, fd))
                })
                .collect()
        })
        .unwrap_or_default();
    let mut map = DMABUFS.lock().unwrap_or_else(|e| e.into_inner());
    map.retain(|&(dev, ino), d| {
        let ours = d.memfd.as_raw_fd();
        let mut mapped = d.mapped.lock().unwrap_or_else(|e| e.into_inner());
        mapped.retain(|p| p.strong_count() > 0);
        !mapped.is_empty() || open.iter().any(|&(dv, i, fd)| dv == dev && i == ino && fd != ours)
    });
}

/// `IOMMU_TEST_CMD` with a dma-buf op: `None` for every other op.
pub(crate) fn test_cmd(ctx: &Arc<Context>, mem: &dyn UserMemory, arg: u64) -> Option<Result<i32, Errno>> {
    let mut head = [0u8; 8];
    mem.read(arg, &mut head).ok()?;
    let op = u32::from_ne_bytes(head[4..].try_into().expect("4 bytes"));
    if op != IOMMU_TEST_OP_DMABUF_GET && op != IOMMU_TEST_OP_DMABUF_REVOKE {
        return None;
    }
    static OP: Op = Op {
        num: IOMMU_TEST_CMD,
        size: size_of::<iommu_test_cmd>(),
        min_size: TEST_CMD_MIN_SIZE,
        run: |u, b| {
            let value = run(u, iommu_test_cmd::read_from_bytes(b).expect("buffer sized for the struct"))?;
            VALUE.set(value);
            Ok(())
        },
    };
    Some(
        crate::ucmd::run_op::<{ size_of::<iommu_test_cmd>() }>(Some(&OP), ctx, mem, IOMMU_TEST_CMD, arg)
            .map(|_| VALUE.take()),
    )
}

thread_local! {
    /// What the command running on this thread returns (a new fd).
    static VALUE: Cell<i32> = const { Cell::new(0) };
}

fn run(u: &Ucmd, c: iommu_test_cmd) -> Result<i32, Errno> {
    let arm = c.union.as_bytes();
    match c.op {
        IOMMU_TEST_OP_DMABUF_GET => get(u, DmabufGet::read_from_prefix(arm).expect("fits").0),
        _ => revoke(u, DmabufRevoke::read_from_prefix(arm).expect("fits").0).map(|()| 0),
    }
}

fn get(u: &Ucmd, a: DmabufGet) -> Result<i32, Errno> {
    let fds = u.fds()?;
    let len = u64::from(a.length).div_ceil(PAGE_SIZE) * PAGE_SIZE;
    if len == 0 || len > PAGE_SIZE * MAX_PAGES {
        return Err(Errno::EINVAL);
    }
    if fds.is_local() {
        prune();
    }
    use rustix::fs::{MemfdFlags, SealFlags};
    let mut flags = MemfdFlags::ALLOW_SEALING;
    if a.open_flags & libc::O_CLOEXEC as u32 != 0 {
        flags |= MemfdFlags::CLOEXEC;
    }
    let fd = rustix::fs::memfd_create("ioasid-dmabuf", flags).map_err(|e| Errno(e.raw_os_error()))?;
    rustix::fs::ftruncate(&fd, len).map_err(|_| Errno::ENOMEM)?;
    rustix::fs::fcntl_add_seals(&fd, SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL)
        .map_err(|e| Errno(e.raw_os_error()))?;
    let ours = rustix::io::fcntl_dupfd_cloexec(&fd, 0).map_err(|e| Errno(e.raw_os_error()))?;
    let key = identity(fd.as_fd()).ok_or(Errno::EBADF)?;
    let d = Dmabuf { memfd: ours, size: len, revoked: AtomicBool::new(false), mapped: Mutex::new(Vec::new()) };
    DMABUFS.lock().unwrap_or_else(|e| e.into_inner()).insert(key, Arc::new(d));
    fds.give(fd)
}

fn revoke(u: &Ucmd, a: DmabufRevoke) -> Result<(), Errno> {
    let d = lookup(u, a.dmabuf_fd).ok_or_else(|| {
        // As `dma_buf_get`: a file that is no dma-buf of ours is EINVAL.
        let open = a.dmabuf_fd >= 0 && u.fds().is_ok_and(|fds| fds.get(a.dmabuf_fd).is_ok());
        if open { Errno::EINVAL } else { Errno::EBADF }
    })?;
    let mut mapped = d.mapped.lock().unwrap_or_else(|e| e.into_inner());
    d.revoked.store(a.revoked != 0, Ordering::Release);
    if a.revoked != 0 {
        // Revoked for good, as Linux's importer drops the memory's address.
        for p in mapped.drain(..).filter_map(|p| p.upgrade()) {
            p.revoke();
        }
    }
    Ok(())
}

/// `IOMMU_IOAS_MAP_FILE` of `fd` when it is a dma-buf of ours: the IOVA
/// used; `None` for any other file.
pub(crate) fn map_file(
    u: &Ucmd,
    ioas: u32,
    fd: i32,
    start: u64,
    length: u64,
    iova: Option<u64>,
    perm: Perm,
) -> Option<Result<u64, Errno>> {
    let d = lookup(u, fd)?;
    Some((|| {
        if length == 0 || start.checked_add(length).is_none_or(|end| end > d.size) {
            return Err(Errno::EINVAL);
        }
        let mut mapped = d.mapped.lock().unwrap_or_else(|e| e.into_inner());
        if d.revoked.load(Ordering::Acquire) {
            return Err(Errno::ENODEV);
        }
        let (iova, pages) =
            u.ctx.map_dmabuf(ioasid_engine::IoasId::new(ioas), d.memfd.as_fd(), start, length, iova, perm)?;
        mapped.retain(|p| p.strong_count() > 0);
        mapped.push(Arc::downgrade(&pages));
        Ok(iova)
    })())
}
