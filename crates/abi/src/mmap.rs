//! `mmap` of an iommufd (Linux 7.3's `iommufd_fops_mmap`): a program maps
//! memory an object shares with it (the mock vIOMMU's two pages; on
//! hardware, a vIOMMU's registers) at the offset and length the object's
//! allocation returned, exactly those. Each mapping holds its object, so
//! destroying it is `EBUSY` until every piece of the mapping is unmapped;
//! the front end that places mappings reports them here.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use ioasid_engine::{Context, PAGE_SIZE, Viommu};

use crate::errno::Errno;

pub const ENXIO: Errno = Errno(libc::ENXIO);

/// The object behind a mapping, held while the mapping lasts.
pub type Owner = Arc<Viommu>;

/// Checks an `mmap(NULL, len, prot, flags, iommufd, offset)` as Linux
/// does and returns the object whose memory (`mmap_region().memory()`, at
/// file offset 0) is to be mapped with the caller's `prot` and `flags`.
pub fn region(ctx: &Context, len: usize, prot: i32, flags: i32, offset: i64) -> Result<Owner, Errno> {
    // The system call's own checks, then the length as it rounds it.
    if len == 0 || offset < 0 || offset as u64 % PAGE_SIZE != 0 {
        return Err(Errno::EINVAL);
    }
    let len = (len as u64).div_ceil(PAGE_SIZE) * PAGE_SIZE;
    let shared = matches!(flags & 0xf, libc::MAP_SHARED | libc::MAP_SHARED_VALIDATE);
    if !shared {
        return Err(Errno::EINVAL);
    }
    if prot & libc::PROT_EXEC != 0 {
        return Err(Errno::EPERM);
    }
    let owner = ctx.mmap_region(offset as u64).ok_or(ENXIO)?;
    if owner.mmap_region().is_none_or(|r| r.len() != len) {
        return Err(ENXIO);
    }
    Ok(owner)
}

/// Live mappings by start address: (end, the object they hold).
static MAPPINGS: Mutex<BTreeMap<u64, (u64, Owner)>> = Mutex::new(BTreeMap::new());
/// How many there are, so that the program's other mmaps and munmaps pay
/// one atomic load.
static COUNT: AtomicUsize = AtomicUsize::new(0);

fn mappings() -> MutexGuard<'static, BTreeMap<u64, (u64, Owner)>> {
    MAPPINGS.lock().unwrap_or_else(|e| e.into_inner())
}

/// `[addr, addr + len)` now maps `owner`'s memory.
pub fn mapped(addr: u64, len: u64, owner: Owner) {
    let end = addr.saturating_add(len.div_ceil(PAGE_SIZE) * PAGE_SIZE);
    let mut m = mappings();
    m.insert(addr, (end, owner));
    COUNT.store(m.len(), Ordering::Release);
}

/// `[addr, addr + len)` was unmapped (or mapped over): the pieces of
/// mappings left outside it keep holding their objects, as Linux's split
/// VMAs do; the rest let go.
pub fn unmapped(addr: u64, len: u64) {
    if COUNT.load(Ordering::Acquire) == 0 {
        return;
    }
    let end = addr.saturating_add(len.div_ceil(PAGE_SIZE) * PAGE_SIZE);
    let mut released = Vec::new();
    let mut m = mappings();
    let hit: Vec<u64> = m.range(..end).filter(|(_, (e, _))| *e > addr).map(|(&s, _)| s).collect();
    for start in hit {
        let (e, owner) = m.remove(&start).expect("listed");
        if start < addr {
            m.insert(start, (addr, owner.clone()));
        }
        if e > end {
            m.insert(end, (e, owner.clone()));
        }
        released.push(owner);
    }
    COUNT.store(m.len(), Ordering::Release);
    drop(m);
    drop(released);
}
