//! vm-memory's IOMMU interface on ioasid: an [`IommuPort`] is one device's
//! (and optionally one PASID's) view of its page table, so rust-vmm device
//! models that use `vm_memory::iommu::IommuMemory` (virtio-queue included)
//! do their DMA through ioasid's translation.
//!
//! vm-memory's IOMMU yields guest-physical addresses in the backend memory,
//! while ioasid's tables hold host addresses, so the port carries the guest
//! memory layout to convert back. Translations are cached in vm-memory's own
//! `Iotlb`, tagged with the device's table and its generation, so it stops
//! being used as soon as the table changes: a replace, an unmap, or an
//! invalidation of either nested stage.
//!
//! Readers take no lock: the cache is published through
//! [`Rcu`](crate::epoch::Rcu) and looked up inside an epoch section, the
//! same section the generation is read in, which an unmap waits for before
//! it returns. A miss resolves the range inside a section of its own,
//! builds a new `Iotlb` from the port's recent mappings plus the new one,
//! publishes it (the old one is freed once its readers left) and serves the
//! range from it in that section. So a miss is served however fast the
//! table changes: it never waits for a cache that stays current.
//!
//! A miss resolves through the device's [`DmaPort`](crate::device::DmaPort),
//! the path of every DMA: a fault is counted, becomes a page request on a
//! PRI device (the access waits for its answer) or an event record on the
//! vIOMMU's queue, and is kept typed for [`IommuPort::take_fault`], since
//! vm-memory's error carries only text.
//!
//! ```
//! use ioasid_engine::vm_memory_iommu::IommuPort;
//! use ioasid_engine::{Context, DeviceInfo, Perm};
//! use vm_memory::iommu::IommuMemory;
//! use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
//!
//! let ram = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
//! let host = ram.iter().next().unwrap().as_ptr() as u64;
//! let ctx = Context::new();
//! let ioas = ctx.ioas_alloc()?;
//! // SAFETY: `ram` outlives the mapping (the context is dropped first).
//! unsafe { ctx.map_user(ioas, host + 0x3000, 0x1000, Some(0x8000_0000), Perm::RW)? };
//! let dev = ctx.bind_device(DeviceInfo::new("virtio-net", 0x08))?;
//! ctx.attach(dev, ioas)?;
//!
//! let memory = IommuMemory::new(ram.clone(), IommuPort::for_memory(ctx.get(dev)?, None, &ram), true, ());
//! memory.write_obj(0xfeed_u32, GuestAddress(0x8000_0010)).unwrap(); // an IOVA
//! assert_eq!(ram.read_obj::<u32>(GuestAddress(0x3010)).unwrap(), 0xfeed); // lands at its GPA
//! assert!(memory.read_obj::<u32>(GuestAddress(0x9000_0000)).is_err()); // unmapped: a fault
//! # Ok::<(), ioasid_engine::Error>(())
//! ```

use std::fmt;
use std::ops::Deref;
use std::ptr::NonNull;
use std::sync::Arc;

use parking_lot::Mutex;

use vm_memory::iommu::{Error, Iommu, Iotlb, IotlbIterator, IovaRange};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress, Permissions};

use crate::device::{Device, DmaError, Pending, Stall};
use crate::epoch::{self, Rcu};
use crate::fault::{DmaAttrs, Response};
use crate::pgtable::Perm;

const PAGE: u64 = 4096;

/// Mappings past which a fill starts its cache over, so that rebuilding it
/// on a miss stays cheap.
const MAX_MAPPINGS: usize = 64;

/// Page requests a translation makes for one range, each answered with
/// success, before it gives up (as a device's own DMA does).
const FILL_TRIES: usize = 8;

/// The device's table identity and generation, as `Device::generation_in`
/// gives them.
type Tag = (usize, u64);

/// (IOVA, guest-physical address, length, access) of one cached range.
type Mapping = (u64, u64, usize, Permissions);

/// A published cache: valid only while the device's table still has `tag`,
/// since every range in it was resolved after reading `tag`.
struct Cached {
    tag: Tag,
    iotlb: Iotlb,
}

/// What a fill builds the next cache from.
struct Recent {
    tag: Tag,
    mappings: Vec<Mapping>,
}

/// One device's IOMMU, as vm-memory sees it.
pub struct IommuPort {
    device: Arc<Device>,
    pasid: Option<u32>,
    /// (host address, guest-physical address, length) of each RAM region.
    layout: Vec<(u64, u64, u64)>,
    cache: Rcu<Cached>,
    recent: Mutex<Recent>,
    /// The last fault, for the device model to inspect.
    fault: Mutex<Option<DmaError>>,
}

/// The `Iotlb` a translation was served from, kept alive, and its
/// translations current, for as long as vm-memory iterates over it: both
/// kinds hold the epoch section the range was found in, which an unmap
/// waits for.
pub struct IotlbRef<'a> {
    inner: Held<'a>,
}

enum Held<'a> {
    /// Found in the published cache: the section keeps it from being freed.
    Pinned { _guard: epoch::Guard, iotlb: NonNull<Iotlb>, _port: std::marker::PhantomData<&'a IommuPort> },
    /// Built by this translation's fill, in this section.
    Filled { _guard: epoch::Guard, cached: Arc<Cached> },
}

/// Why a fill did not resolve its range.
enum Miss {
    /// It faulted for good, or the range cannot be cached.
    Failed(String),
    /// It faulted on a PRI device, which was asked for the page.
    Asked(Pending),
}

impl Deref for IotlbRef<'_> {
    type Target = Iotlb;

    #[inline]
    fn deref(&self) -> &Iotlb {
        match &self.inner {
            // SAFETY: loaded from the port's `Rcu` inside `_guard`'s section,
            // which lasts as long as `self`; a fill that publishes over it
            // defers dropping the old cache until that section has ended,
            // and the port outlives `'a`.
            Held::Pinned { iotlb, .. } => unsafe { iotlb.as_ref() },
            Held::Filled { cached, .. } => &cached.iotlb,
        }
    }
}

impl fmt::Debug for IotlbRef<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("IotlbRef")
    }
}

impl fmt::Debug for IommuPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IommuPort").field("device", &self.device.id()).field("pasid", &self.pasid).finish()
    }
}

impl IommuPort {
    /// The port of `device` (at `pasid`, or its RID) over guest memory laid
    /// out as `layout`: (host address, guest-physical address, length).
    pub fn new(device: Arc<Device>, pasid: Option<u32>, layout: Vec<(u64, u64, u64)>) -> Self {
        IommuPort {
            device,
            pasid,
            layout,
            cache: Rcu::new(None),
            recent: Mutex::new(Recent { tag: (0, 0), mappings: Vec::new() }),
            fault: Mutex::new(None),
        }
    }

    /// The port over the regions of a vm-memory guest memory.
    pub fn for_memory<M: GuestMemoryBackend>(device: Arc<Device>, pasid: Option<u32>, memory: &M) -> Self {
        let layout = memory
            .iter()
            .filter_map(|r| {
                let host = r.get_host_address(MemoryRegionAddress(0)).ok()? as u64;
                Some((host, r.start_addr().0, r.len()))
            })
            .collect();
        Self::new(device, pasid, layout)
    }

    fn gpa_of(&self, host: u64) -> Option<u64> {
        self.layout.iter().find(|(h, _, len)| host >= *h && host < h + len).map(|(h, gpa, _)| gpa + (host - h))
    }

    /// Looks the range up in the published cache, if it was filled under
    /// the table the device has now; the generation and the cache are read
    /// in the section the returned guard keeps.
    #[inline]
    fn lookup(&self, iova: GuestAddress, length: usize, access: Permissions) -> Option<IotlbIterator<IotlbRef<'_>>> {
        let guard = epoch::pin();
        let tag = self.device.generation_in(self.pasid, &guard);
        let cached = self.cache.load(&guard).filter(|c| c.tag == tag)?;
        let iotlb = NonNull::from(&cached.iotlb);
        let held = IotlbRef { inner: Held::Pinned { _guard: guard, iotlb, _port: std::marker::PhantomData } };
        Iotlb::lookup(held, iova, length, access).ok()
    }

    /// Resolves every page of the range through the device's DMA port, so a
    /// fault here is what a fault of the device's own DMA is: counted, a
    /// page request on a PRI device, a vEVENTQ record where a vIOMMU
    /// listens. The typed fault is kept for [`IommuPort::take_fault`].
    /// Publishes the cache it builds and returns it: its ranges stay current
    /// for as long as `guard`'s section, in which they were resolved, lasts.
    fn fill(&self, iova: u64, length: usize, access: Permissions, guard: &epoch::Guard) -> Result<Arc<Cached>, Miss> {
        let need = Perm { read: access.allow(Permissions::Read), write: access.allow(Permissions::Write) };
        let end = iova.checked_add(length as u64).ok_or(Miss::Failed("IOVA range wraps".into()))?;
        let first = iova & !(PAGE - 1);
        let len = end.div_ceil(PAGE) * PAGE - first;
        let len = usize::try_from(len).map_err(|_| Miss::Failed("IOVA range too long".into()))?;
        // Read before resolving: an unmap that races the walk bumps it
        // after clearing, so what is cached under it is never stale for
        // a reader that sees it.
        let tag = self.device.generation_in(self.pasid, guard);
        let port = self.device.port(self.pasid);
        let mut resolved = Vec::new();
        // Not waiting for a page request's answer: this section would hold
        // up a handler that unmaps. The caller waits outside it.
        let filled = port.access(need, DmaAttrs::default(), first, len, false, |t, r| {
            let gpa = self.gpa_of(t.host.0).ok_or(crate::Error::Fault("the page is outside guest memory"))?;
            resolved.push((first + r.start as u64, gpa, r.len(), access));
            Ok(())
        });
        match filled {
            Ok(()) => {}
            Err(Stall::PageRequest(pending)) => return Err(Miss::Asked(pending)),
            Err(Stall::Failed(fault)) => return Err(Miss::Failed(self.failed(fault))),
        }
        let cached = {
            let mut recent = self.recent.lock();
            if recent.tag != tag || recent.mappings.len() + resolved.len() > MAX_MAPPINGS {
                recent.tag = tag;
                recent.mappings.clear();
            }
            recent.mappings.extend(resolved);
            let mut iotlb = Iotlb::new();
            for &(at, gpa, len, access) in &recent.mappings {
                iotlb
                    .set_mapping(GuestAddress(at), GuestAddress(gpa), len, access)
                    .map_err(|_| Miss::Failed("IOTLB".into()))?;
            }
            Arc::new(Cached { tag, iotlb })
        };
        self.cache.publish(Some(cached.clone()), guard);
        Ok(cached)
    }

    /// Keeps `fault` for [`IommuPort::take_fault`]; its text for vm-memory.
    fn failed(&self, fault: DmaError) -> String {
        *self.fault.lock() = Some(fault);
        fault.to_string()
    }

    /// The fault that made the last translation fail, typed (vm-memory's
    /// error carries only its text); `None` once taken.
    pub fn take_fault(&self) -> Option<DmaError> {
        self.fault.lock().take()
    }
}

impl Iommu for IommuPort {
    type IotlbGuard<'a> = IotlbRef<'a>;

    #[inline]
    fn translate(
        &self,
        iova: GuestAddress,
        length: usize,
        access: Permissions,
    ) -> Result<IotlbIterator<Self::IotlbGuard<'_>>, Error> {
        match self.lookup(iova, length, access) {
            Some(hit) => Ok(hit),
            None => self.translate_missed(iova, length, access),
        }
    }
}

impl IommuPort {
    /// `translate` after the cache missed: kept out of the hit's way, whose
    /// call then sets up no frame for it.
    #[cold]
    #[inline(never)]
    fn translate_missed(
        &self,
        iova: GuestAddress,
        length: usize,
        access: Permissions,
    ) -> Result<IotlbIterator<IotlbRef<'_>>, Error> {
        let fail = |reason| Error::CannotResolve { iova_range: IovaRange { base: iova, length }, reason };
        let mut asked = 0;
        loop {
            let guard = epoch::pin();
            let pending = match self.fill(iova.0, length, access, &guard) {
                Ok(cached) => {
                    let filled = IotlbRef { inner: Held::Filled { _guard: guard, cached } };
                    return Iotlb::lookup(filled, iova, length, access).map_err(|_| fail("not mapped".into()));
                }
                Err(Miss::Failed(reason)) => return Err(fail(reason)),
                Err(Miss::Asked(pending)) => pending,
            };
            // Outside the section: the handler may unmap.
            drop(guard);
            asked += 1;
            if pending.wait() != Response::Success || asked == FILL_TRIES {
                return Err(fail(self.failed(pending.fault())));
            }
            if let Some(hit) = self.lookup(iova, length, access) {
                return Ok(hit);
            }
        }
    }
}
