//! vm-memory's IOMMU interface on a [`Port`]: an `IommuMemory` built on an
//! [`IommuPort`] does a back end's DMA through the daemon's translations,
//! so rust-vmm device models (virtio-queue) run unchanged.
//!
//! vm-memory's IOMMU yields guest-physical addresses in the back end's own
//! guest memory (for a vhost-user back end, the regions its memory table
//! mapped from the VMM's files). The port's translations name a file and an
//! offset, so the layout given here matches them by file: a region of the
//! guest memory mapped from the same file at the same offset.
//!
//! The translation a vm-memory access uses stays valid while it copies:
//! the guard `translate` returns keeps the thread inside its section, so an
//! unmap in the VMM waits for the copy, as for [`Port::read`].

use std::fmt;
use std::ops::Deref;
use std::sync::Arc;

use parking_lot::{RwLock, RwLockReadGuard, RwLockWriteGuard};
use vm_memory::iommu::{Error, Iommu, Iotlb, IotlbIterator, IovaRange};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion, Permissions};

use crate::port::{Misses, Port, Section};
use crate::wire;

/// One guest memory region as a file range: (file identity, offset in the
/// file, guest-physical address, length).
type Place = ((u64, u64), u64, u64, u64);

/// A port as vm-memory's `Iommu`.
pub struct IommuPort {
    port: Arc<Port>,
    layout: Vec<Place>,
    /// vm-memory's cache, and the table generation it was filled from.
    iotlb: RwLock<(u64, Iotlb)>,
}

impl fmt::Debug for IommuPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IommuPort").field("port", &self.port).finish_non_exhaustive()
    }
}

/// A translation in use: the cache, and the section that keeps it valid.
pub struct Guard<'a> {
    iotlb: RwLockReadGuard<'a, (u64, Iotlb)>,
    _section: Section<'a>,
}

impl Deref for Guard<'_> {
    type Target = Iotlb;
    fn deref(&self) -> &Iotlb {
        &self.iotlb.1
    }
}

impl IommuPort {
    /// `port` over `memory`, whose regions must be mapped from files (the
    /// ones the VMM maps into the address space) for DMA to reach them.
    pub fn for_memory<M: GuestMemoryBackend>(port: Arc<Port>, memory: &M) -> Self {
        let layout = memory
            .iter()
            .filter_map(|r| {
                let fo = r.file_offset()?;
                let st = rustix::fs::fstat(fo.file()).ok()?;
                Some(((st.st_dev, st.st_ino), fo.start(), r.start_addr().0, r.len()))
            })
            .collect();
        IommuPort { port, layout, iotlb: RwLock::new((u64::MAX, Iotlb::new())) }
    }

    /// The port translations come from.
    pub fn port(&self) -> &Arc<Port> {
        &self.port
    }

    /// Fills the cache for `length` bytes at `iova` from the port's table,
    /// asking the daemon for what it lacks, and returns it inside the section
    /// the whole range was found in: an unmap waits for that section, so the
    /// range is served however often the table changes meanwhile. Called
    /// outside any section.
    fn fill(&self, iova: u64, length: usize, access: Permissions) -> Result<Guard<'_>, String> {
        let perm = match access {
            Permissions::Write | Permissions::ReadWrite => wire::PERM_R | wire::PERM_W,
            _ => wire::PERM_R,
        };
        let end = iova.checked_add(length as u64).ok_or("IOVA range wraps")?;
        let mut misses = Misses::default();
        'again: loop {
            let section = self.port.enter().map_err(|e| e.to_string())?;
            let generation = self.port.generation();
            let mut iotlb = self.iotlb.write();
            if iotlb.0 != generation {
                iotlb.1.invalidate_all();
                iotlb.0 = generation;
            }
            let mut at = iova;
            while at < end {
                let Some((identity, offset, len)) = self.port.table_lookup(at, perm) else {
                    // Asked outside the section, which the daemon's answer
                    // may have to wait for.
                    drop((iotlb, section));
                    self.port.miss(at, end - at, perm, &mut misses).map_err(|e| e.to_string())?;
                    continue 'again;
                };
                let (gpa, n) = self.gpa_of(identity, offset).ok_or("the page is outside guest memory")?;
                let n = n.min(len).min(end - at);
                iotlb
                    .1
                    .set_mapping(GuestAddress(at), GuestAddress(gpa), n as usize, access)
                    .map_err(|e| e.to_string())?;
                at += n;
            }
            return Ok(Guard { iotlb: RwLockWriteGuard::downgrade(iotlb), _section: section });
        }
    }

    /// The guest-physical address of byte `offset` of file `identity`, and
    /// the bytes of its region from there.
    fn gpa_of(&self, identity: (u64, u64), offset: u64) -> Option<(u64, u64)> {
        self.layout
            .iter()
            .find(|(id, start, _, len)| *id == identity && offset >= *start && offset - start < *len)
            .map(|(_, start, gpa, len)| (gpa + (offset - start), len - (offset - start)))
    }

    fn lookup(&self, iova: GuestAddress, length: usize, access: Permissions) -> Option<IotlbIterator<Guard<'_>>> {
        let section = self.port.enter().ok()?;
        if self.port.blocked() {
            return None;
        }
        let iotlb = self.iotlb.read();
        if iotlb.0 != self.port.generation() {
            return None;
        }
        Iotlb::lookup(Guard { iotlb, _section: section }, iova, length, access).ok()
    }
}

impl Iommu for IommuPort {
    type IotlbGuard<'a> = Guard<'a>;

    fn translate(
        &self,
        iova: GuestAddress,
        length: usize,
        access: Permissions,
    ) -> Result<IotlbIterator<Self::IotlbGuard<'_>>, Error> {
        let fail = |reason: String| Error::CannotResolve { iova_range: IovaRange { base: iova, length }, reason };
        if let Some(hit) = self.lookup(iova, length, access) {
            return Ok(hit);
        }
        if self.port.blocked() {
            return Err(fail("the port is closed or cut off".into()));
        }
        let filled = self.fill(iova.0, length, access).map_err(fail)?;
        Iotlb::lookup(filled, iova, length, access).map_err(|_| fail("not mapped".into()))
    }
}
