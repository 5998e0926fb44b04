//! vm-memory's IOMMU interface on ioasid: an [`IommuPort`] is one device's
//! (and optionally one PASID's) view of its page table, so rust-vmm device
//! models that use `vm_memory::iommu::IommuMemory` (virtio-queue included)
//! do their DMA through ioasid's translation.
//!
//! vm-memory's IOMMU yields guest-physical addresses in the backend memory,
//! while ioasid's tables hold host addresses, so the port carries the guest
//! memory layout to convert back. Translations are cached in vm-memory's own
//! `Iotlb`, dropped whole when the device's table changes: a replace, an
//! unmap, or an invalidation of either nested stage.
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
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use parking_lot::{Mutex, RwLock, RwLockReadGuard};

use vm_memory::iommu::{Error, Iommu, Iotlb, IotlbIterator, IovaRange};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress, Permissions};

use crate::device::{Device, DmaError};
use crate::fault::DmaAttrs;
use crate::pgtable::Perm;

const PAGE: u64 = 4096;

/// One device's IOMMU, as vm-memory sees it.
pub struct IommuPort {
    device: Arc<Device>,
    pasid: Option<u32>,
    /// (host address, guest-physical address, length) of each RAM region.
    layout: Vec<(u64, u64, u64)>,
    iotlb: RwLock<Iotlb>,
    /// The table identity and generation the cache was filled under.
    table: AtomicUsize,
    generation: AtomicU64,
    /// The last fault, for the device model to inspect.
    fault: Mutex<Option<DmaError>>,
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
            iotlb: RwLock::new(Iotlb::new()),
            table: AtomicUsize::new(0),
            generation: AtomicU64::new(0),
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

    /// Drops the cache when the device's table changed since it was filled.
    fn refresh(&self) {
        let (table, generation) = self.device.generation_at(self.pasid);
        if self.table.load(Ordering::Acquire) != table || self.generation.load(Ordering::Acquire) != generation {
            self.iotlb.write().invalidate_all();
            self.table.store(table, Ordering::Release);
            self.generation.store(generation, Ordering::Release);
        }
    }

    /// Resolves every page of the range into the cache through the
    /// device's DMA port, so a fault here is what a fault of the device's
    /// own DMA is: counted, a page request on a PRI device (waited for),
    /// a vEVENTQ record where a vIOMMU listens. The typed fault is kept for
    /// [`IommuPort::take_fault`].
    fn fill(&self, iova: u64, length: usize, access: Permissions) -> Result<(), String> {
        let need = Perm { read: access.allow(Permissions::Read), write: access.allow(Permissions::Write) };
        let end = iova.checked_add(length as u64).ok_or("IOVA range wraps")?;
        let first = iova & !(PAGE - 1);
        let len = end.div_ceil(PAGE) * PAGE - first;
        let len = usize::try_from(len).map_err(|_| "IOVA range too long")?;
        let port = self.device.port(self.pasid);
        let filled = port.access(need, DmaAttrs::default(), first, len, true, |t, r| {
            let gpa = self.gpa_of(t.host.0).ok_or(crate::Error::Fault("the page is outside guest memory"))?;
            let at = GuestAddress(first + r.start as u64);
            let mut iotlb = self.iotlb.write();
            iotlb.set_mapping(at, GuestAddress(gpa), r.len(), access).map_err(|_| crate::Error::Invalid("IOTLB"))
        });
        filled.map_err(|stall| {
            let fault = stall.into_error();
            *self.fault.lock() = Some(fault);
            fault.to_string()
        })
    }

    /// The fault that made the last translation fail, typed (vm-memory's
    /// error carries only its text); `None` once taken.
    pub fn take_fault(&self) -> Option<DmaError> {
        self.fault.lock().take()
    }
}

impl Iommu for IommuPort {
    type IotlbGuard<'a> = RwLockReadGuard<'a, Iotlb>;

    fn translate(
        &self,
        iova: GuestAddress,
        length: usize,
        access: Permissions,
    ) -> Result<IotlbIterator<Self::IotlbGuard<'_>>, Error> {
        self.refresh();
        if let Ok(hit) = Iotlb::lookup(self.iotlb.read(), iova, length, access) {
            return Ok(hit);
        }
        self.fill(iova.0, length, access)
            .map_err(|reason| Error::CannotResolve { iova_range: IovaRange { base: iova, length }, reason })?;
        Iotlb::lookup(self.iotlb.read(), iova, length, access).map_err(|_| Error::CannotResolve {
            iova_range: IovaRange { base: iova, length },
            reason: "not mapped".into(),
        })
    }
}
