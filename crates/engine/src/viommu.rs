//! vIOMMUs and vDEVICEs: a VM's slice of one physical IOMMU instance.
//!
//! A vIOMMU pins a nesting-parent HWPT (the VM's stage 2) and is the parent
//! that nested HWPTs can be allocated on. A vDEVICE gives a bound device
//! the ID the guest knows it by (a virtual StreamID or RID), so that
//! guest-issued commands naming that ID reach the right device. IDs are
//! unique per vIOMMU and each device has at most one per vIOMMU.
//!
//! `device`, `hwpt` and `viommu` import each other, and only each other,
//! because the objects point at each other: a device is attached to HWPTs,
//! a nested HWPT sits on a vIOMMU that takes its faults, and a vIOMMU names
//! its devices by virtual ID. Linux's iommufd has the same triangle
//! (`device.c`, `hw_pagetable.c` and `viommu.c` share one private header).
//!
//! ```
//! use ioasid_engine::{Context, DeviceInfo, HwptFlags, MockFlags, ViommuType};
//!
//! let ctx = Context::new();
//! let ioas = ctx.ioas_alloc()?;
//! let dev = ctx.bind_device(DeviceInfo::mock(0x10, MockFlags::default()))?;
//! let stage2 = ctx.hwpt_alloc(dev, ioas, HwptFlags { nest_parent: true, ..Default::default() }, None)?;
//! let viommu = ctx.viommu_alloc(dev, stage2, ViommuType::Selftest)?;
//! ctx.vdevice_alloc(viommu, dev, 0x300)?; // the guest calls it StreamID 0x300
//! assert_eq!(ctx.get(viommu)?.device(0x300).map(|d| d.id()), Some(dev.get()));
//! # Ok::<(), ioasid_engine::Error>(())
//! ```

use std::collections::BTreeMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, OnceLock, Weak};

use parking_lot::{Mutex, MutexGuard};

use crate::device::{Device, DmaError};
use crate::fault::DmaAttrs;
use crate::hw_queue::HwQueue;
use crate::hwpt::{Hwpt, HwptNested, HwptPaging};
use crate::ioasid_set::{SetHandle, global};
use crate::iova::PAGE_SIZE;
pub use crate::model::ViommuType;
use crate::model::{EntryArray, HwInfo, ViommuCore};
use crate::veventq::Veventq;
use crate::{Error, Result};

/// A vIOMMU object (`IOMMU_VIOMMU_ALLOC`): the IOMMU a guest sees, over a
/// nest-parent HWPT (its stage 2), which it holds. Nested HWPTs, vDEVICEs,
/// vEVENTQs and HW queues are allocated on it and hold it in turn, so it
/// cannot be destroyed (`EBUSY`) while any of them exists.
pub struct Viommu {
    kind: ViommuType,
    hwpt: Arc<HwptPaging>,
    /// Virtual ID → device; weak so that unbinding a device is never held
    /// up by the table (its vDEVICE object owns the entry).
    vdevices: Mutex<BTreeMap<u64, Weak<Device>>>,
    /// The IOASID set the guest's PASIDs are drawn from, once given.
    pasid_set: OnceLock<Arc<SetHandle>>,
    /// vPASIDs in use by this vIOMMU's devices.
    vpasids: Mutex<BTreeMap<u32, VpasidUse>>,
    /// Its event queues, at most one per type; weak, as each queue holds
    /// its vIOMMU.
    veventqs: Mutex<Vec<Weak<Veventq>>>,
    /// The nested HWPTs allocated on it, whose caches its invalidations
    /// reach; weak, as each holds its vIOMMU.
    nested: Mutex<Vec<Weak<HwptNested>>>,
    /// Its HW queues; weak, as each holds its vIOMMU.
    hw_queues: Mutex<Vec<Weak<HwQueue>>>,
    /// Memory it shares with the program, if its model has any.
    region: Option<MmapRegion>,
    /// What the IOMMU it was made for reports: what its model checks a
    /// guest's commands against.
    hw_info: HwInfo,
}

/// What a vIOMMU's `MmapRegion` is made of.
pub(crate) struct RegionSpec<'a> {
    pub offset: u64,
    pub len: u64,
    pub contents: &'a [u8],
}

/// Memory a vIOMMU shares with the program that owns it, which maps it by
/// calling `mmap` on the iommufd at `offset` with exactly `len` bytes
/// (Linux's `iommufd_viommu_alloc_mmap`: on hardware, a page of the
/// IOMMU's registers given to the guest; on the mock, two pages whose first
/// word echoes the vIOMMU's driver data). Offsets are unique per context
/// and start past the first page. A mapping holds the vIOMMU, which cannot
/// be destroyed until it is unmapped.
pub struct MmapRegion {
    memory: OwnedFd,
    offset: u64,
    len: u64,
}

impl MmapRegion {
    /// `len` bytes (a whole number of pages) at mmap offset `offset`,
    /// starting with `contents`, the rest zero.
    pub(crate) fn new(offset: u64, len: u64, contents: &[u8]) -> Result<Self> {
        if len == 0 || len % PAGE_SIZE != 0 || offset % PAGE_SIZE != 0 || contents.len() as u64 > len {
            return Err(Error::Invalid("an mmap region is whole pages"));
        }
        crate::inject::check("mmap region")?;
        let no_memory = |_| Error::NoMemory("cannot make the vIOMMU's shared memory");
        let memory = rustix::fs::memfd_create("ioasid:viommu", rustix::fs::MemfdFlags::CLOEXEC).map_err(no_memory)?;
        rustix::fs::ftruncate(&memory, len).map_err(no_memory)?;
        let mut done = 0;
        while done < contents.len() {
            done += rustix::io::pwrite(&memory, &contents[done..], done as u64).map_err(no_memory)?;
        }
        Ok(MmapRegion { memory, offset, len })
    }

    /// The file to map (at file offset 0).
    pub fn memory(&self) -> BorrowedFd<'_> {
        self.memory.as_fd()
    }

    /// The `offset` argument the program passes to `mmap`.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The `length` argument `mmap` must be given.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the region has no bytes (never, for a region that was made).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

struct VpasidUse {
    host: u32,
    users: usize,
    /// Allocated on first attach (and so freed on last detach), rather
    /// than allocated beforehand by the set's owner.
    allocated: bool,
}

impl Viommu {
    /// Whether a vIOMMU of `kind` may be made for `dev` over `hwpt`.
    pub(crate) fn check(kind: ViommuType, dev: &Device, hwpt: &HwptPaging) -> Result<()> {
        // Linux's order: the parent is checked before the driver is asked.
        hwpt.check_nest_parent()?;
        if !kind.serves(dev.info().iommu) {
            return Err(Error::Unsupported("the device's IOMMU does not offer this vIOMMU type"));
        }
        if !dev.info().iommu.serves(hwpt.domain().format()) {
            return Err(Error::Invalid("the HWPT belongs to another IOMMU"));
        }
        Ok(())
    }

    /// A vIOMMU of `kind` for `dev`'s IOMMU over nesting parent `hwpt`.
    pub(crate) fn new(
        kind: ViommuType,
        dev: &Device,
        hwpt: Arc<HwptPaging>,
        region: Option<RegionSpec<'_>>,
    ) -> Result<Arc<Self>> {
        Self::check(kind, dev, &hwpt)?;
        crate::inject::check("vIOMMU")?;
        let region = region.map(|r| MmapRegion::new(r.offset, r.len, r.contents)).transpose()?;
        Ok(Arc::new(Viommu {
            kind,
            hwpt,
            vdevices: Mutex::new(BTreeMap::new()),
            pasid_set: OnceLock::new(),
            vpasids: Mutex::new(BTreeMap::new()),
            veventqs: Mutex::new(Vec::new()),
            nested: Mutex::new(Vec::new()),
            hw_queues: Mutex::new(Vec::new()),
            region,
            hw_info: dev.info().hw_info(),
        }))
    }

    /// The memory it shares with the program through `mmap`, if any.
    pub fn mmap_region(&self) -> Option<&MmapRegion> {
        self.region.as_ref()
    }

    /// `IOMMU_HW_QUEUE_ALLOC`: a HW queue of `kind` at `index`, over
    /// `[base, base + len)` of its stage 2, as its model numbers them.
    pub(crate) fn add_hw_queue(self: &Arc<Self>, kind: u32, index: u32, base: u64, len: u64) -> Result<Arc<HwQueue>> {
        let max = self.kind.ops().hw_queues(kind);
        HwQueue::new(self.clone(), self.hwpt.ioas(), &self.hw_queues, max, kind, index, base, len)
    }

    /// The vIOMMU type it was allocated as.
    pub fn kind(&self) -> ViommuType {
        self.kind
    }

    pub(crate) fn add_nested(&self, hwpt: &Arc<HwptNested>) {
        let mut nested = self.nested.lock();
        nested.retain(|n| n.strong_count() > 0);
        nested.push(Arc::downgrade(hwpt));
    }

    /// Carries out one command of the guest's command queue (an SMMUv3's:
    /// 16 bytes), as its model does (see `ViommuOps::command`).
    pub fn invalidate(&self, cmd: [u64; 2]) -> Result<()> {
        let bytes: Vec<u8> = cmd.iter().flat_map(|w| w.to_le_bytes()).collect();
        let r = self.kind.ops().command(self, &bytes);
        // Back ends in other processes cache translations too.
        crate::epoch::synchronize_external();
        r
    }

    /// `IOMMU_HWPT_INVALIDATE` on the vIOMMU: its model carries out the
    /// guest's commands in `entries`. Returns how many were handled and
    /// how the call ends.
    pub fn invalidate_entries(&self, entries: &mut dyn EntryArray) -> (u32, Result<()>) {
        let r = self.kind.ops().invalidate(self, entries);
        crate::epoch::synchronize_external();
        r
    }

    /// The stage-2 HWPT this vIOMMU's nested HWPTs translate through.
    pub fn hwpt(&self) -> &Arc<HwptPaging> {
        &self.hwpt
    }

    /// The device the guest calls `virt_id`, if it still exists.
    pub fn device(&self, virt_id: u64) -> Option<Arc<Device>> {
        self.table().get(&virt_id)?.upgrade()
    }

    fn table(&self) -> MutexGuard<'_, BTreeMap<u64, Weak<Device>>> {
        self.vdevices.lock()
    }

    /// The virtual ID the guest knows `dev` by here.
    pub fn virt_id_of(&self, dev: &Device) -> Option<u64> {
        self.table().iter().find(|(_, d)| std::ptr::eq(d.as_ptr(), dev)).map(|(&id, _)| id)
    }

    /// A new event queue for events of `kind`; one per kind.
    pub(crate) fn add_veventq(self: &Arc<Self>, kind: u32, depth: u32) -> Result<Arc<Veventq>> {
        let mut queues = self.veventqs.lock();
        queues.retain(|q| q.strong_count() > 0);
        if queues.iter().filter_map(Weak::upgrade).any(|q| q.kind() == kind) {
            return Err(Error::Exists("the vIOMMU already has an event queue of that type"));
        }
        crate::inject::check("vEVENTQ")?;
        let q = Veventq::new(self.clone(), kind, depth);
        queues.push(Arc::downgrade(&q));
        Ok(q)
    }

    /// The event queue for events of `kind`, if there is one.
    pub fn veventq(&self, kind: u32) -> Option<Arc<Veventq>> {
        let queues = self.veventqs.lock();
        queues.iter().filter_map(Weak::upgrade).find(|q| q.kind() == kind)
    }

    /// Tells the guest's owner that `dev` took a fault it cannot recover
    /// from, in this vIOMMU's event format. False when nobody listens.
    pub(crate) fn report_fault(&self, dev: &Device, pasid: Option<u32>, fault: DmaError, attrs: DmaAttrs) -> bool {
        let Some(virt_id) = self.virt_id_of(dev) else { return false };
        let fault = match fault {
            DmaError::Fault { iova, reason, write, .. } => Some((iova, reason, write)),
            _ => None,
        };
        let Some((kind, record)) = self.kind.ops().event(virt_id, pasid, fault, attrs) else { return false };
        let Some(q) = self.veventq(kind) else { return false };
        q.report(&record);
        true
    }

    /// Gives the vIOMMU the IOASID set its guest's PASIDs come from: a
    /// device attached at vPASID N gets the host PASID the set maps N to,
    /// allocated against the set's quota when the set has none yet.
    pub fn set_pasid_set(&self, set: Arc<SetHandle>) -> Result<()> {
        self.pasid_set.set(set).map_err(|_| Error::Busy("the vIOMMU already has an IOASID set"))
    }

    /// The IOASID set given by `set_pasid_set`, if any.
    pub fn pasid_set(&self) -> Option<&Arc<SetHandle>> {
        self.pasid_set.get()
    }

    /// The host PASID standing for the guest's `vpasid`. Lock-free.
    pub fn host_pasid(&self, vpasid: u32) -> Option<u32> {
        global().host_pasid(self.pasid_set.get()?.id(), vpasid)
    }

    /// Takes a use of `vpasid`, allocating its host PASID on the first.
    pub(crate) fn claim(&self, vpasid: u32) -> Result<u32> {
        let set = self.pasid_set.get().ok_or(Error::Invalid("the vIOMMU has no IOASID set"))?.id();
        let mut uses = self.vpasids.lock();
        if let Some(u) = uses.get_mut(&vpasid) {
            u.users += 1;
            return Ok(u.host);
        }
        let (host, allocated) = match global().host_pasid(set, vpasid) {
            Some(host) => (host, false),
            None => (global().alloc_private(set, vpasid, 0)?, true),
        };
        uses.insert(vpasid, VpasidUse { host, users: 1, allocated });
        Ok(host)
    }

    /// Drops a use of `vpasid`; the last frees what `claim` allocated.
    pub(crate) fn release(&self, vpasid: u32) {
        let mut uses = self.vpasids.lock();
        let Some(u) = uses.get_mut(&vpasid) else { return };
        u.users -= 1;
        if u.users == 0 {
            let u = uses.remove(&vpasid).expect("present");
            if let (true, Some(set)) = (u.allocated, self.pasid_set.get()) {
                let _ = global().free(set.id(), u.host);
            }
        }
    }
}

/// A device as the guest behind one vIOMMU names it.
pub struct Vdevice {
    viommu: Arc<Viommu>,
    device: Arc<Device>,
    virt_id: u64,
    /// vPASID → host PASID of each PASID attached through this vDEVICE.
    vpasids: Mutex<BTreeMap<u32, u32>>,
}

impl Vdevice {
    pub(crate) fn new(viommu: Arc<Viommu>, device: Arc<Device>, virt_id: u64) -> Result<Arc<Self>> {
        if !device.info().iommu.serves(viommu.hwpt.domain().format()) {
            return Err(Error::Invalid("the device is behind another IOMMU"));
        }
        let mut table = viommu.table();
        if table.contains_key(&virt_id) {
            return Err(Error::Exists("the virtual ID is taken in this vIOMMU"));
        }
        if table.values().any(|d| d.upgrade().is_some_and(|d| Arc::ptr_eq(&d, &device))) {
            return Err(Error::Exists("the device already has a vDEVICE in this vIOMMU"));
        }
        crate::inject::check("vDEVICE")?;
        table.insert(virt_id, Arc::downgrade(&device));
        drop(table);
        Ok(Arc::new(Vdevice { viommu, device, virt_id, vpasids: Mutex::new(BTreeMap::new()) }))
    }

    /// The vIOMMU the guest sees the device behind.
    pub fn viommu(&self) -> &Arc<Viommu> {
        &self.viommu
    }

    /// The bound device it names.
    pub fn device(&self) -> &Arc<Device> {
        &self.device
    }

    /// The ID the guest knows the device by (a virtual StreamID, RID, ...),
    /// unique within its vIOMMU.
    pub fn virt_id(&self) -> u64 {
        self.virt_id
    }

    /// The PASIDs attached through this vDEVICE: (vPASID, host PASID).
    pub fn pasids(&self) -> Vec<(u32, u32)> {
        self.attached().iter().map(|(&v, &h)| (v, h)).collect()
    }

    pub(crate) fn attached(&self) -> MutexGuard<'_, BTreeMap<u32, u32>> {
        self.vpasids.lock()
    }

    /// A DMA read tagged with the guest's `vpasid`, as the device emits it
    /// once the vIOMMU has translated the tag.
    pub fn dma_read(&self, vpasid: u32, iova: u64, buf: &mut [u8]) -> std::result::Result<(), DmaError> {
        let host = self.viommu.host_pasid(vpasid).ok_or(DmaError::Blocked)?;
        self.device.dma_read_pasid(host, iova, buf)
    }

    /// A DMA write tagged with the guest's `vpasid`.
    pub fn dma_write(&self, vpasid: u32, iova: u64, buf: &[u8]) -> std::result::Result<(), DmaError> {
        let host = self.viommu.host_pasid(vpasid).ok_or(DmaError::Blocked)?;
        self.device.dma_write_pasid(host, iova, buf)
    }
}

impl Drop for Vdevice {
    fn drop(&mut self) {
        self.viommu.table().remove(&self.virt_id);
    }
}

impl ViommuCore for Viommu {
    fn hw_info(&self) -> &HwInfo {
        &self.hw_info
    }

    fn flush_all(&self) {
        let nested = self.nested.lock();
        nested.iter().filter_map(Weak::upgrade).for_each(|n| n.invalidate());
    }

    fn flush_device(&self, virt_id: u64) -> bool {
        let Some(dev) = self.device(virt_id) else { return false };
        for (_, hwpt) in dev.attachments() {
            if let Hwpt::Nested(n) = hwpt {
                n.invalidate();
            }
        }
        true
    }

    fn with_device_cache(&self, virt_id: u64, f: &mut dyn FnMut(&mut [u32])) -> bool {
        let dev = self.device(virt_id);
        let Some(mut cache) = dev.as_ref().and_then(|d| d.mock_cache()) else { return false };
        f(&mut cache[..]);
        true
    }
}
