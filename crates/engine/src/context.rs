//! A context: what one open `/dev/iommu` holds. Objects live in a table of
//! u32 IDs; an object is in use while anything else holds a reference to it
//! (an `Arc` clone), so `destroy` is `EBUSY` exactly when Linux's `users`
//! count would be above one.
//!
//! Every call on the ioctl path costs O(log n) in the number of live
//! objects, as Linux's xarray does: IDs come from a set of freed IDs, and
//! the questions an attach or unbind asks of the table (the automatic HWPT
//! of an IOAS, whether a device still uses it, a device's vDEVICEs) are
//! answered from indexes kept beside it, not by a scan.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::Deref;
use std::os::fd::BorrowedFd;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use crate::access::{Access, AccessOps};
use crate::account::{AccountMode, Accounting, Limit};
use crate::device::{Device, DeviceInfo};
use crate::error::{Error, Result};
use crate::fault::FaultQueue;
use crate::hw_queue::HwQueue;
use crate::hwpt::{Hwpt, HwptFlags, HwptNested, HwptPaging, NestedData, PageFormat, PasidUse};
use crate::ioas::{Ioas, Source};
use crate::ioasid_set::{SetHandle, SetOwner};
use crate::iova::{IovaRange, PAGE_SIZE};
use crate::memory::Trust;
use crate::model::IommuModel;
use crate::pages::Pages;
use crate::pgtable::Perm;
use crate::veventq::Veventq;
use crate::viommu::{RegionSpec, Vdevice, Viommu, ViommuType};
use rustix::thread::CapabilitySet;

/// Object IDs are positive and fit in 31 bits, as Linux allocates them.
const MAX_ID: u32 = i32::MAX as u32;

/// The objects of a context by ID, with the indexes that keep every lookup
/// off a scan. Changed only through `alloc` and `remove`, so the indexes
/// follow the objects.
#[derive(Default)]
pub(crate) struct Table {
    objects: BTreeMap<u32, Object>,
    /// IDs freed below `top`; every ID above `top` is free. The lowest free
    /// ID, which an allocating xarray hands out, is the first of these or
    /// `top + 1`.
    free: BTreeSet<u32>,
    top: u32,
    /// Automatic HWPTs by their IOAS (its `Arc`'s address).
    auto_by_ioas: HashMap<usize, Vec<u32>>,
    /// How many device attachments use each automatic HWPT: it goes with
    /// the last, as Linux's auto domain does.
    auto_users: HashMap<u32, usize>,
    /// vDEVICEs by their device (its `Arc`'s address).
    vdevices: HashMap<usize, Vec<u32>>,
    /// Objects' mmap regions by offset: (length, object ID).
    mmaps: BTreeMap<u64, (u64, u32)>,
}

fn addr<T>(a: &Arc<T>) -> usize {
    Arc::as_ptr(a) as usize
}

impl Table {
    fn alloc(&mut self, obj: Object) -> Result<u32> {
        let id = match self.free.pop_first() {
            Some(id) => id,
            None if self.top >= MAX_ID => return Err(Error::NoSpace("object IDs exhausted")),
            None => self.top + 1,
        };
        self.top = self.top.max(id);
        match &obj {
            Object::HwptPaging(h) if h.is_auto() => {
                self.auto_by_ioas.entry(addr(h.ioas())).or_default().push(id);
                self.auto_users.insert(id, 0);
            }
            Object::Vdevice(v) => self.vdevices.entry(addr(v.device())).or_default().push(id),
            Object::Viommu(v) => {
                if let Some(r) = v.mmap_region() {
                    self.mmaps.insert(r.offset(), (r.len(), id));
                }
            }
            _ => {}
        }
        self.objects.insert(id, obj);
        Ok(id)
    }

    fn remove(&mut self, id: u32) -> Option<Object> {
        let obj = self.objects.remove(&id)?;
        if id == self.top {
            self.top -= 1;
            while self.free.last() == Some(&self.top) {
                self.free.pop_last();
                self.top -= 1;
            }
        } else {
            self.free.insert(id);
        }
        let unindex = |index: &mut HashMap<usize, Vec<u32>>, key: usize| {
            if let Some(ids) = index.get_mut(&key) {
                ids.retain(|&i| i != id);
                if ids.is_empty() {
                    index.remove(&key);
                }
            }
        };
        match &obj {
            Object::HwptPaging(h) if h.is_auto() => {
                unindex(&mut self.auto_by_ioas, addr(h.ioas()));
                self.auto_users.remove(&id);
            }
            Object::Vdevice(v) => unindex(&mut self.vdevices, addr(v.device())),
            Object::Viommu(v) => {
                if let Some(r) = v.mmap_region() {
                    self.mmaps.remove(&r.offset());
                }
            }
            _ => {}
        }
        Some(obj)
    }

    /// The ID of automatic HWPT `hwpt`, while it is in the table.
    fn auto_id(&self, hwpt: &Arc<HwptPaging>) -> Option<u32> {
        self.auto_by_ioas
            .get(&addr(hwpt.ioas()))?
            .iter()
            .copied()
            .find(|id| matches!(self.objects.get(id), Some(Object::HwptPaging(h)) if Arc::ptr_eq(h, hwpt)))
    }

    /// An automatic HWPT of `ioas` that `info`'s device can use.
    pub(crate) fn find_auto(&self, ioas: &Arc<Ioas>, info: &DeviceInfo) -> Option<(u32, Arc<HwptPaging>)> {
        let autos = self.auto_by_ioas.get(&addr(ioas))?;
        autos.iter().find_map(|id| match self.get(id) {
            Some(Object::HwptPaging(h))
                if h.domain().format() == info.format() && h.domain().aperture() == info.aperture =>
            {
                Some((*id, h.clone()))
            }
            _ => None,
        })
    }

    /// Removes automatic HWPT `hwpt` once no device uses it; says whether
    /// it went.
    pub(crate) fn remove_unused_auto(&mut self, hwpt: &Arc<HwptPaging>) -> bool {
        let Some(id) = self.auto_id(hwpt) else { return false };
        if self.auto_users.get(&id) != Some(&0) {
            return false;
        }
        self.remove(id);
        true
    }

    /// Counts a device attachment gained (`+1`) or lost (`-1`) by `hwpt`.
    pub(crate) fn count_user(&mut self, hwpt: &Hwpt, delta: isize) {
        let Hwpt::Paging(h) = hwpt else { return };
        if let Some(id) = self.auto_id(h)
            && let Some(users) = self.auto_users.get_mut(&id)
        {
            *users = users.checked_add_signed(delta).expect("attachments are counted in pairs");
        }
    }
}

impl Deref for Table {
    type Target = BTreeMap<u32, Object>;

    fn deref(&self) -> &Self::Target {
        &self.objects
    }
}

#[derive(Clone)]
pub enum Object {
    Ioas(Arc<Ioas>),
    HwptPaging(Arc<HwptPaging>),
    Device(Arc<Device>),
    /// A mock device made by the selftest command; destroying it unbinds
    /// the device (Linux's `IOMMUFD_OBJ_SELFTEST`).
    Selftest(Arc<SelftestDevice>),
    /// An in-engine user of an IOAS, owned by its driver.
    Access(Arc<Access>),
    HwptNested(Arc<HwptNested>),
    Fault(Arc<FaultQueue>),
    /// An IOASID set of the global PASID space.
    IoasidSet(Arc<SetHandle>),
    Viommu(Arc<Viommu>),
    Vdevice(Arc<Vdevice>),
    Veventq(Arc<Veventq>),
    HwQueue(Arc<HwQueue>),
}

#[derive(Default)]
pub struct SelftestDevice {
    dev_id: OnceLock<u32>,
}

impl SelftestDevice {
    pub fn dev_id(&self) -> Option<u32> {
        self.dev_id.get().copied()
    }
}

impl Object {
    fn strong_count(&self) -> usize {
        match self {
            Object::Ioas(o) => Arc::strong_count(o),
            Object::HwptPaging(o) => Arc::strong_count(o),
            Object::Device(o) => Arc::strong_count(o),
            Object::Selftest(o) => Arc::strong_count(o),
            Object::Access(o) => Arc::strong_count(o),
            Object::HwptNested(o) => Arc::strong_count(o),
            Object::Fault(o) => Arc::strong_count(o),
            Object::IoasidSet(o) => Arc::strong_count(o),
            Object::Viommu(o) => Arc::strong_count(o),
            Object::Vdevice(o) => Arc::strong_count(o),
            Object::Veventq(o) => Arc::strong_count(o),
            Object::HwQueue(o) => Arc::strong_count(o),
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Object::Ioas(_) => "IOAS",
            Object::HwptPaging(_) => "HWPT paging",
            Object::Device(_) => "device",
            Object::Selftest(_) => "selftest device",
            Object::Access(_) => "access",
            Object::HwptNested(_) => "HWPT nested",
            Object::Fault(_) => "fault queue",
            Object::IoasidSet(_) => "IOASID set",
            Object::Viommu(_) => "vIOMMU",
            Object::Vdevice(_) => "vDEVICE",
            Object::Veventq(_) => "vEVENTQ",
            Object::HwQueue(_) => "HW queue",
        }
    }
}

/// How a context charges pinned memory and what its caller may do.
#[derive(Debug, Clone)]
pub struct ContextConfig {
    pub memlock_limit: Limit,
    /// The caller holds `CAP_IPC_LOCK`: pinned pages are not charged.
    pub memlock_exempt: bool,
    /// The caller holds `CAP_SYS_RESOURCE`: it may change the accounting mode.
    pub sys_resource: bool,
    /// Charge this context's pins to a counter of its own instead of the
    /// user's or process's (a VMM accounting each VM apart; tests).
    pub private_counter: bool,
    /// Judge `CAP_IPC_LOCK` and `CAP_SYS_RESOURCE` from this process's
    /// capabilities at each use, as Linux's `capable()` is (a program may
    /// drop them after opening `/dev/iommu`), instead of the two fields.
    pub live_capabilities: bool,
}

impl ContextConfig {
    /// A context that charges pins to a counter of its own against `limit`
    /// and may change its accounting mode: one VM's memory accounted apart.
    pub fn isolated(limit: Limit) -> Self {
        ContextConfig {
            memlock_limit: limit,
            memlock_exempt: false,
            sys_resource: true,
            private_counter: true,
            live_capabilities: false,
        }
    }

    /// The privileges of this process, as Linux would judge them.
    pub fn from_process() -> Self {
        ContextConfig {
            memlock_limit: Limit::Rlimit,
            memlock_exempt: crate::account::has_capability(CapabilitySet::IPC_LOCK),
            sys_resource: crate::account::has_capability(CapabilitySet::SYS_RESOURCE),
            private_counter: false,
            live_capabilities: true,
        }
    }

    /// Whether pinned pages go uncharged (`CAP_IPC_LOCK`).
    fn memlock_exempt(&self) -> bool {
        if self.live_capabilities {
            crate::account::has_capability(CapabilitySet::IPC_LOCK)
        } else {
            self.memlock_exempt
        }
    }

    /// Whether the accounting mode may change (`CAP_SYS_RESOURCE`).
    fn sys_resource(&self) -> bool {
        if self.live_capabilities {
            crate::account::has_capability(CapabilitySet::SYS_RESOURCE)
        } else {
            self.sys_resource
        }
    }
}

pub struct Context {
    objects: Mutex<Table>,
    /// Serialises changes to the object graph (attach, detach, destroy) so
    /// checks of who uses what stay true while they act.
    graph: Mutex<()>,
    account_mode: Mutex<AccountMode>,
    config: ContextConfig,
    private: Option<Accounting>,
    /// The IOAS that VFIO type1 compatibility uses (`IOMMU_VFIO_IOAS`).
    vfio_ioas: Mutex<Option<u32>>,
    /// Owner of this context's IOASID sets and of the PASID references it
    /// took; declared last so it is dropped after the sets, releasing what
    /// they left referenced.
    set_owner: SetOwner,
}

impl Default for Context {
    fn default() -> Self {
        Self::new()
    }
}

impl Context {
    pub fn new() -> Self {
        Self::with_config(ContextConfig::from_process())
    }

    pub fn with_config(config: ContextConfig) -> Self {
        Context {
            objects: Mutex::new(Table::default()),
            graph: Mutex::new(()),
            account_mode: Mutex::new(AccountMode::User),
            private: config.private_counter.then(|| Accounting::isolated(config.memlock_limit)),
            config,
            vfio_ioas: Mutex::new(None),
            set_owner: SetOwner::default(),
        }
    }

    pub(crate) fn table(&self) -> MutexGuard<'_, Table> {
        self.objects.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn graph(&self) -> MutexGuard<'_, ()> {
        self.graph.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn insert(&self, obj: Object) -> Result<u32> {
        crate::inject::check("object ID")?;
        self.table().alloc(obj)
    }

    pub fn object(&self, id: u32) -> Result<Object> {
        self.table().get(&id).cloned().ok_or(Error::NotFound("no object with that ID"))
    }

    pub fn ioas(&self, id: u32) -> Result<Arc<Ioas>> {
        match self.object(id)? {
            Object::Ioas(o) => Ok(o),
            _ => Err(Error::NotFound("object is not an IOAS")),
        }
    }

    pub fn device(&self, id: u32) -> Result<Arc<Device>> {
        match self.object(id)? {
            Object::Device(o) => Ok(o),
            _ => Err(Error::NotFound("object is not a device")),
        }
    }

    pub fn hwpt(&self, id: u32) -> Result<Arc<HwptPaging>> {
        match self.object(id)? {
            Object::HwptPaging(o) => Ok(o),
            _ => Err(Error::NotFound("object is not a HWPT")),
        }
    }

    /// IDs and kinds of every object, in ID order.
    pub fn objects(&self) -> Vec<(u32, &'static str)> {
        self.table().iter().map(|(&id, o)| (id, o.kind())).collect()
    }

    fn accounting(&self) -> Accounting {
        if let Some(private) = &self.private {
            return private.clone();
        }
        let mode = *self.account_mode.lock().unwrap_or_else(|e| e.into_inner());
        Accounting::new(mode, self.config.memlock_exempt(), self.config.memlock_limit)
    }

    /// Pages pinned and charged through this context's counter.
    pub fn locked_pages(&self) -> u64 {
        self.accounting().charged()
    }

    pub fn account_mode(&self) -> AccountMode {
        *self.account_mode.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `IOMMU_OPTION_RLIMIT_MODE` with its value (0: per user, 1: per
    /// process): needs `CAP_SYS_RESOURCE` and a context without objects.
    pub fn set_account_mode(&self, value: u64) -> Result<()> {
        if !self.config.sys_resource() {
            return Err(Error::Permission("changing the accounting mode needs CAP_SYS_RESOURCE"));
        }
        let t = self.table();
        if !t.is_empty() {
            return Err(Error::Busy("the context already has objects"));
        }
        let mode = match value {
            0 => AccountMode::User,
            1 => AccountMode::Process,
            _ => return Err(Error::Invalid("accounting mode is 0 or 1")),
        };
        *self.account_mode.lock().unwrap_or_else(|e| e.into_inner()) = mode;
        Ok(())
    }

    /// `IOMMU_IOAS_CHANGE_PROCESS`: the charges for every mapping of every
    /// IOAS move to process `pid` (`None`: this one) - its user's or its
    /// own counter, as the mode that charged them says. Only file mappings
    /// can move (`EINVAL` otherwise), and on failure nothing has moved.
    pub fn change_process(&self, pid: Option<i32>) -> Result<()> {
        let _g = self.graph();
        let ioases: Vec<Arc<Ioas>> = self
            .table()
            .values()
            .filter_map(|o| match o {
                Object::Ioas(i) => Some(i.clone()),
                _ => None,
            })
            .collect();
        // Every IOAS stays locked, as Linux takes every IOAS's iova_rwsem:
        // no mapping comes or goes, and no pin changes, until all moved.
        let locked: Vec<_> = ioases.iter().map(|i| i.lock_areas()).collect();
        let pages: Vec<&Arc<Pages>> = locked.iter().flat_map(|l| l.pages()).collect();
        if pages.iter().any(|p| !p.is_file()) {
            return Err(Error::Invalid("only file mappings can change process"));
        }
        let mut moved = Vec::new();
        for p in pages {
            match p.change_process(pid) {
                Ok(Some(old)) => moved.push((p, old)),
                Ok(None) => {}
                Err(e) => {
                    for (p, old) in moved.into_iter().rev() {
                        p.restore_accounting(old);
                    }
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// `IOMMU_VFIO_IOAS_GET`: the compatibility IOAS, `ENODEV` when unset.
    pub fn vfio_ioas(&self) -> Result<u32> {
        let _g = self.graph();
        self.vfio_ioas
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .ok_or(Error::NoDevice("no VFIO compatibility IOAS is set"))
    }

    /// `IOMMU_VFIO_IOAS_SET` (`Some`) and `IOMMU_VFIO_IOAS_CLEAR` (`None`).
    pub fn set_vfio_ioas(&self, ioas: Option<u32>) -> Result<()> {
        let _g = self.graph();
        if let Some(id) = ioas {
            self.ioas(id)?;
        }
        *self.vfio_ioas.lock().unwrap_or_else(|e| e.into_inner()) = ioas;
        Ok(())
    }

    pub fn ioas_alloc(&self) -> Result<u32> {
        self.insert(Object::Ioas(Arc::new(Ioas::new())))
    }

    /// Maps user memory that the caller keeps mapped while it is in the IOAS;
    /// DMA touches it directly.
    ///
    /// # Safety
    /// `[uptr, uptr + len)` must stay mapped (with the rights given in
    /// `perm`) until it is unmapped from the IOAS or the context is dropped.
    pub unsafe fn map_user(&self, ioas: u32, uptr: u64, len: u64, iova: Option<u64>, perm: Perm) -> Result<u64> {
        self.map_user_trust(ioas, uptr, len, iova, perm, Trust::Direct)
    }

    /// Maps user memory that its owner may unmap at any time: pinning checks
    /// it is mapped, and DMA that finds it gone fails instead of crashing.
    pub fn map_user_checked(&self, ioas: u32, uptr: u64, len: u64, iova: Option<u64>, perm: Perm) -> Result<u64> {
        self.map_user_trust(ioas, uptr, len, iova, perm, Trust::Checked)
    }

    fn map_user_trust(
        &self,
        ioas: u32,
        uptr: u64,
        len: u64,
        iova: Option<u64>,
        perm: Perm,
        trust: Trust,
    ) -> Result<u64> {
        let ioas = self.ioas(ioas)?;
        let (pages, lead) = Pages::user(uptr, len, perm.write, trust, self.accounting())?;
        ioas.map(&[Source { pages, start_byte: lead, len, align_hint: uptr }], iova, perm)
    }

    /// Maps memory of another process sharing this context (a forked
    /// child): `[uptr, uptr + len)` of `pid`, taken when first pinned.
    pub fn map_remote(&self, ioas: u32, pid: i32, uptr: u64, len: u64, iova: Option<u64>, perm: Perm) -> Result<u64> {
        let ioas = self.ioas(ioas)?;
        let (pages, lead) = Pages::remote(pid, uptr, len, perm.write, self.accounting())?;
        ioas.map(&[Source { pages, start_byte: lead, len, align_hint: uptr }], iova, perm)
    }

    /// Maps `[start, start + len)` of a file (a memfd, typically).
    pub fn map_file(
        &self,
        ioas: u32,
        fd: BorrowedFd<'_>,
        start: u64,
        len: u64,
        iova: Option<u64>,
        perm: Perm,
    ) -> Result<u64> {
        let ioas = self.ioas(ioas)?;
        let (pages, lead) = Pages::file(fd, start, len, perm.write, self.accounting())?;
        ioas.map(&[Source { pages, start_byte: lead, len, align_hint: start }], iova, perm)
    }

    /// Maps `[start, start + len)` of a dma-buf whose memory is the file
    /// `fd`; returns the IOVA and the pages, for the exporter to revoke.
    pub fn map_dmabuf(
        &self,
        ioas: u32,
        fd: BorrowedFd<'_>,
        start: u64,
        len: u64,
        iova: Option<u64>,
        perm: Perm,
    ) -> Result<(u64, Arc<Pages>)> {
        let ioas = self.ioas(ioas)?;
        let (pages, lead) = Pages::dmabuf(fd, start, len, perm.write)?;
        let iova =
            ioas.map(&[Source { pages: pages.clone(), start_byte: lead, len, align_hint: start }], iova, perm)?;
        Ok((iova, pages))
    }

    /// Maps at `dst_iova` (or a chosen IOVA) of `dst` the memory mapped at
    /// `[src_iova, src_iova + len)` of `src`, sharing its pins.
    pub fn copy(&self, dst: u32, src: u32, src_iova: u64, len: u64, dst_iova: Option<u64>, perm: Perm) -> Result<u64> {
        let srcs = self.ioas(src)?.sources(src_iova, len)?;
        self.ioas(dst)?.map(&srcs, dst_iova, perm)
    }

    /// Unmaps whole mappings inside `[iova, iova + len)`; `0, u64::MAX`
    /// unmaps everything. Returns the bytes unmapped.
    pub fn unmap(&self, ioas: u32, iova: u64, len: u64) -> Result<u64> {
        let ioas = self.ioas(ioas)?;
        if iova == 0 && len == u64::MAX {
            return Ok(ioas.unmap_all());
        }
        let (unmapped, res) = ioas.unmap(IovaRange::from_len(iova, len)?);
        res?;
        if unmapped == 0 {
            return Err(Error::NotFound("nothing is mapped in that range"));
        }
        Ok(unmapped)
    }

    /// Binds an emulated device; it can then be attached to page tables.
    pub fn bind_device(&self, info: DeviceInfo) -> Result<u32> {
        let _g = self.graph();
        let dev = Arc::new(Device::new(info));
        let id = self.insert(Object::Device(dev.clone()))?;
        dev.set_id(id);
        Ok(id)
    }

    /// Detaches and forgets a device (what closing its VFIO fd does).
    pub fn unbind_device(&self, dev_id: u32) -> Result<()> {
        let _g = self.graph();
        self.unbind_locked(dev_id)
    }

    fn unbind_locked(&self, dev_id: u32) -> Result<()> {
        let dev = self.device(dev_id)?;
        // Its vDEVICEs go with it: the guest's name for a device that is
        // gone must not resolve.
        let vdevs: Vec<(u32, Arc<Vdevice>)> = {
            let t = self.table();
            let ids = t.vdevices.get(&addr(&dev)).map(Vec::as_slice).unwrap_or_default();
            ids.iter()
                .filter_map(|id| match t.get(id) {
                    Some(Object::Vdevice(v)) => Some((*id, v.clone())),
                    _ => None,
                })
                .collect()
        };
        for (_, v) in &vdevs {
            self.vdevice_release_locked(v);
        }
        for (pasid, _) in dev.attachments() {
            self.detach_locked(&dev, pasid);
        }
        let mut t = self.table();
        t.remove(dev_id);
        for (id, _) in &vdevs {
            t.remove(*id);
        }
        Ok(())
    }

    /// Creates an access for a driver and attaches it to `ioas_id`.
    pub fn access_create(
        &self,
        ioas_id: u32,
        ops: Arc<dyn AccessOps>,
        needs_pin_pages: bool,
    ) -> Result<(u32, Arc<Access>)> {
        let _g = self.graph();
        let access = Access::new(ops, needs_pin_pages);
        let id = self.insert(Object::Access(access.clone()))?;
        let attached = self.ioas(ioas_id).and_then(|ioas| access.set_ioas(Some(ioas)));
        if let Err(e) = attached {
            self.table().remove(id);
            return Err(e);
        }
        Ok((id, access))
    }

    /// Moves an attached access to another IOAS.
    pub fn access_replace(&self, id: u32, ioas_id: u32) -> Result<()> {
        let _g = self.graph();
        let Object::Access(access) = self.object(id)? else {
            return Err(Error::NotFound("object is not an access"));
        };
        if access.ioas().is_none() {
            return Err(Error::NotFound("access is not attached"));
        }
        access.set_ioas(Some(self.ioas(ioas_id)?))
    }

    /// The driver is done with its access: detach and forget it.
    pub fn access_destroy(&self, id: u32) {
        let _g = self.graph();
        let removed = self.table().remove(id);
        if let Some(Object::Access(access)) = removed {
            let _ = access.set_ioas(None);
        }
    }

    /// The selftest's `MOCK_DOMAIN`: a selftest object, a mock device bound
    /// under it and attached to `pt_id`. Returns (selftest, HWPT, device) IDs.
    pub fn mock_domain(&self, pt_id: u32, info: DeviceInfo) -> Result<(u32, u32, u32)> {
        let _g = self.graph();
        let stdev = Arc::new(SelftestDevice::default());
        let stdev_id = self.insert(Object::Selftest(stdev.clone()))?;
        let dev = Arc::new(Device::new(info));
        let dev_id = match self.insert(Object::Device(dev.clone())) {
            Ok(id) => {
                dev.set_id(id);
                id
            }
            Err(e) => {
                self.table().remove(stdev_id);
                return Err(e);
            }
        };
        match self.attach_locked(dev_id, None, pt_id) {
            Ok(hwpt_id) => {
                stdev.dev_id.set(dev_id).expect("set once");
                Ok((stdev_id, hwpt_id, dev_id))
            }
            Err(e) => {
                let mut t = self.table();
                t.remove(dev_id);
                t.remove(stdev_id);
                Err(e)
            }
        }
    }

    /// The selftest's `MOCK_DOMAIN_REPLACE`, by selftest object ID.
    pub fn mock_domain_replace(&self, stdev_id: u32, pt_id: u32) -> Result<u32> {
        let _g = self.graph();
        let Object::Selftest(stdev) = self.object(stdev_id)? else {
            return Err(Error::NotFound("object is not a selftest device"));
        };
        let dev_id = stdev.dev_id().ok_or(Error::NotFound("selftest device is not bound"))?;
        self.replace_locked(dev_id, None, pt_id)
    }

    /// `IOMMU_HWPT_ALLOC` of a paging HWPT over an IOAS, for a device;
    /// page requests on it go to fault queue `fault` when given.
    pub fn hwpt_alloc(&self, dev_id: u32, ioas_id: u32, flags: HwptFlags, fault: Option<u32>) -> Result<u32> {
        self.hwpt_alloc_format(dev_id, ioas_id, flags, fault, None)
    }

    /// `hwpt_alloc` in `format` when given (a driver's data may choose one
    /// of its IOMMU's formats), else the IOMMU's own for `flags`.
    pub fn hwpt_alloc_format(
        &self,
        dev_id: u32,
        ioas_id: u32,
        flags: HwptFlags,
        fault: Option<u32>,
        format: Option<PageFormat>,
    ) -> Result<u32> {
        self.hwpt_alloc_with(dev_id, ioas_id, flags, fault, format, PasidUse::Compatible)
    }

    /// `hwpt_alloc_format` with the table's `PasidUse` chosen.
    pub fn hwpt_alloc_with(
        &self,
        dev_id: u32,
        ioas_id: u32,
        flags: HwptFlags,
        fault: Option<u32>,
        format: Option<PageFormat>,
        pasid_use: PasidUse,
    ) -> Result<u32> {
        let _g = self.graph();
        let dev = self.device(dev_id)?;
        let ioas = self.ioas(ioas_id).map_err(|_| Error::Invalid("pt_id is not an IOAS"))?;
        if flags.dirty_tracking && !dev.info().dirty_tracking {
            return Err(Error::Unsupported("the device's IOMMU cannot track dirty pages"));
        }
        let info = dev.info();
        let format = format.unwrap_or_else(|| info.iommu.paging_format(flags.nest_parent));
        if !info.iommu.serves(format) {
            return Err(Error::Unsupported("the device's IOMMU has no such page-table format"));
        }
        let fault = fault.map(|id| self.fault_queue(id)).transpose()?;
        let hwpt = HwptPaging::new(ioas, format, info.aperture, flags, false, fault)?.with_pasid_use(pasid_use);
        self.insert_hwpt(hwpt)
    }

    /// `IOMMU_HWPT_ALLOC` of a nested HWPT over paging HWPT `parent_id`.
    pub fn hwpt_alloc_nested(&self, dev_id: u32, parent_id: u32, data: NestedData, fault: Option<u32>) -> Result<u32> {
        self.hwpt_alloc_nested_with(dev_id, parent_id, data, fault, PasidUse::Compatible)
    }

    /// `hwpt_alloc_nested` with the table's `PasidUse` chosen.
    pub fn hwpt_alloc_nested_with(
        &self,
        dev_id: u32,
        parent_id: u32,
        data: NestedData,
        fault: Option<u32>,
        pasid_use: PasidUse,
    ) -> Result<u32> {
        let _g = self.graph();
        let dev = self.device(dev_id)?;
        let (parent, viommu) = match self.object(parent_id)? {
            Object::HwptPaging(parent) => (parent, None),
            Object::Viommu(v) => (v.hwpt().clone(), Some(v)),
            _ => return Err(Error::Invalid("a nested HWPT needs a paging parent or a vIOMMU")),
        };
        if !dev.info().iommu.serves(parent.domain().format()) {
            return Err(Error::Invalid("parent HWPT format does not match the device's IOMMU"));
        }
        parent.check_nest_parent()?;
        // Each stage-1 type belongs to one IOMMU; SMMUv3's needs its vIOMMU.
        let fits = match &data {
            NestedData::ArmSmmuV3 { .. } => viommu.as_ref().is_some_and(|v| v.kind() == ViommuType::ArmSmmuV3),
            NestedData::VtdS1 { .. } => matches!(dev.info().iommu, IommuModel::IntelVtd { .. }),
            NestedData::Selftest { .. } => dev.info().iommu.is_selftest(),
        };
        if !fits {
            return Err(Error::Unsupported("the IOMMU does not take this stage-1 type here"));
        }
        let fault = fault.map(|id| self.fault_queue(id)).transpose()?;
        let nested = parent.nest(data, fault, viommu, pasid_use)?;
        self.insert(Object::HwptNested(nested))
    }

    /// `IOMMU_VIOMMU_ALLOC`: a vIOMMU of `kind` for `dev_id`'s IOMMU,
    /// translating through nesting-parent HWPT `hwpt_id`.
    pub fn viommu_alloc(&self, dev_id: u32, hwpt_id: u32, kind: ViommuType) -> Result<u32> {
        let _g = self.graph();
        let dev = self.device(dev_id)?;
        let Object::HwptPaging(hwpt) = self.object(hwpt_id)? else {
            return Err(Error::NotFound("object is not a paging HWPT"));
        };
        let viommu = Viommu::new(kind, &dev, hwpt, None)?;
        self.insert(Object::Viommu(viommu))
    }

    /// `viommu_alloc` for a vIOMMU that shares memory with the program,
    /// which maps it with `mmap` on the iommufd at the offset its
    /// `mmap_region` gives: the lowest free one past the first page, as
    /// Linux allocates them. Once the generic checks pass, `init` (the
    /// driver taking its data, where Linux's `viommu_init` does) gives the
    /// region's length and first bytes.
    pub fn viommu_alloc_mmap<E: From<Error>>(
        &self,
        dev_id: u32,
        hwpt_id: u32,
        kind: ViommuType,
        init: impl FnOnce() -> std::result::Result<(u64, Vec<u8>), E>,
    ) -> std::result::Result<u32, E> {
        let _g = self.graph();
        let dev = self.device(dev_id)?;
        let Object::HwptPaging(hwpt) = self.object(hwpt_id)? else {
            return Err(Error::NotFound("object is not a paging HWPT").into());
        };
        Viommu::check(kind, &dev, &hwpt)?;
        let (len, contents) = init()?;
        let mut offset = PAGE_SIZE;
        for (&start, &(used, _)) in &self.table().mmaps {
            if offset.checked_add(len).is_some_and(|end| end <= start) {
                break;
            }
            offset = offset.max(start + used);
        }
        offset.checked_add(len).ok_or(Error::NoSpace("no mmap offset left"))?;
        let viommu = Viommu::new(kind, &dev, hwpt, Some(RegionSpec { offset, len, contents: &contents }))?;
        Ok(self.insert(Object::Viommu(viommu))?)
    }

    /// The object whose mmap region starts at `offset`, if any.
    pub fn mmap_region(&self, offset: u64) -> Option<Arc<Viommu>> {
        let t = self.table();
        let &(_, id) = t.mmaps.get(&offset)?;
        match t.get(&id) {
            Some(Object::Viommu(v)) => Some(v.clone()),
            _ => None,
        }
    }

    /// `IOMMU_HW_QUEUE_ALLOC`: a HW queue of `kind` at `index` of vIOMMU
    /// `viommu_id`, over `[base, base + len)` of its stage 2.
    pub fn hw_queue_alloc(&self, viommu_id: u32, kind: u32, index: u32, base: u64, len: u64) -> Result<u32> {
        let _g = self.graph();
        let queue = HwQueue::new(&self.viommu(viommu_id)?, kind, index, base, len)?;
        self.insert(Object::HwQueue(queue))
    }

    pub fn viommu(&self, id: u32) -> Result<Arc<Viommu>> {
        match self.object(id)? {
            Object::Viommu(v) => Ok(v),
            _ => Err(Error::NotFound("object is not a vIOMMU")),
        }
    }

    /// Gives vIOMMU `viommu_id` the IOASID set object `set_id` to draw its
    /// guest's PASIDs from.
    pub fn viommu_set_pasid_set(&self, viommu_id: u32, set_id: u32) -> Result<()> {
        let _g = self.graph();
        self.viommu(viommu_id)?.set_pasid_set(self.ioasid_set(set_id)?)
    }

    pub fn vdevice(&self, id: u32) -> Result<Arc<Vdevice>> {
        match self.object(id)? {
            Object::Vdevice(v) => Ok(v),
            _ => Err(Error::NotFound("object is not a vDEVICE")),
        }
    }

    /// `IOMMU_VEVENTQ_ALLOC`: an event queue of `kind` for vIOMMU
    /// `viommu_id`, holding at most `depth` events.
    pub fn veventq_alloc(&self, viommu_id: u32, kind: u32, depth: u32) -> Result<(u32, Arc<Veventq>)> {
        if depth == 0 {
            return Err(Error::Invalid("a vEVENTQ needs a depth"));
        }
        let _g = self.graph();
        let q = self.viommu(viommu_id)?.add_veventq(kind, depth)?;
        Ok((self.insert(Object::Veventq(q.clone()))?, q))
    }

    /// `IOMMU_VDEVICE_ALLOC`: names `dev_id` `virt_id` behind `viommu_id`.
    pub fn vdevice_alloc(&self, viommu_id: u32, dev_id: u32, virt_id: u64) -> Result<u32> {
        let _g = self.graph();
        let viommu = self.viommu(viommu_id)?;
        let dev = self.device(dev_id)?;
        let vdev = Vdevice::new(viommu, dev, virt_id)?;
        self.insert(Object::Vdevice(vdev))
    }

    /// A new IOASID set under set object `parent` (or at the top).
    pub fn ioasid_set_alloc(&self, parent: Option<u32>, quota: u32) -> Result<u32> {
        let parent = parent.map(|id| self.ioasid_set(id)).transpose()?;
        let set = crate::ioasid_set::new_set(&self.set_owner, parent, quota)?;
        self.insert(Object::IoasidSet(set))
    }

    /// The owner of this context's IOASID sets: PASID references go
    /// through it (`IOASID_PASID_GET` and `PUT`).
    pub fn set_owner(&self) -> &SetOwner {
        &self.set_owner
    }

    pub fn ioasid_set(&self, id: u32) -> Result<Arc<SetHandle>> {
        match self.object(id)? {
            Object::IoasidSet(s) => Ok(s),
            _ => Err(Error::NotFound("object is not an IOASID set")),
        }
    }

    /// `IOMMU_FAULT_QUEUE_ALLOC`.
    pub fn fault_alloc(&self) -> Result<(u32, Arc<FaultQueue>)> {
        let queue = FaultQueue::new();
        Ok((self.insert(Object::Fault(queue.clone()))?, queue))
    }

    pub fn fault_queue(&self, id: u32) -> Result<Arc<FaultQueue>> {
        match self.object(id)? {
            Object::Fault(q) => Ok(q),
            _ => Err(Error::NotFound("object is not a fault queue")),
        }
    }

    /// A HWPT of either kind.
    pub fn any_hwpt(&self, id: u32) -> Result<Hwpt> {
        match self.object(id)? {
            Object::HwptPaging(h) => Ok(Hwpt::Paging(h)),
            Object::HwptNested(n) => Ok(Hwpt::Nested(n)),
            _ => Err(Error::NotFound("object is not a HWPT")),
        }
    }

    pub(crate) fn insert_hwpt(&self, hwpt: Arc<HwptPaging>) -> Result<u32> {
        self.insert(Object::HwptPaging(hwpt.clone())).inspect_err(|_| hwpt.release())
    }

    /// `IOMMU_DESTROY`.
    pub fn destroy(&self, id: u32) -> Result<()> {
        let _g = self.graph();
        let mut t = self.table();
        let obj = t.get(&id).ok_or(Error::NotFound("no object with that ID"))?;
        if matches!(obj, Object::Device(_) | Object::Access(_)) {
            return Err(Error::Busy("owned by its driver, which releases it"));
        }
        if obj.strong_count() > 1 {
            return Err(Error::Busy("object is in use"));
        }
        let obj = t.remove(id).expect("present");
        drop(t);
        let mut vfio = self.vfio_ioas.lock().unwrap_or_else(|e| e.into_inner());
        if *vfio == Some(id) {
            *vfio = None;
        }
        drop(vfio);
        match &obj {
            Object::HwptPaging(h) => h.release(),
            Object::Vdevice(v) => self.vdevice_release_locked(v),
            Object::Selftest(s) => {
                if let Some(dev_id) = s.dev_id() {
                    let _ = self.unbind_locked(dev_id);
                }
            }
            _ => {}
        }
        Ok(())
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        // Leaves first: devices hold HWPTs, HWPTs hold IOASes.
        let devices: Vec<u32> =
            self.table().iter().filter(|(_, o)| matches!(o, Object::Device(_))).map(|(&id, _)| id).collect();
        for id in devices {
            let _ = self.unbind_device(id);
        }
        let t = std::mem::take(&mut *self.table());
        let mut ioases = Vec::new();
        for obj in t.objects.into_values() {
            match obj {
                Object::HwptPaging(h) => h.release(),
                Object::Ioas(i) => ioases.push(i),
                Object::Access(a) => {
                    let _ = a.set_ioas(None);
                }
                _ => {}
            }
        }
        // Closing tears mappings down even if a handle outlives the context.
        for ioas in ioases {
            ioas.unmap_all();
        }
    }
}
