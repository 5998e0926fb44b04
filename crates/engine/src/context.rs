//! A context: what one open `/dev/iommu` holds. Objects live in a table of
//! IDs, looked up by kind with `get` (Linux's `iommufd_get_object`) through
//! the typed `Id`s of `crate::id`; an object is in use while anything else
//! holds a reference to it (an `Arc` clone), so `destroy` is `EBUSY` exactly
//! when Linux's `users` count would be above one. Map, unmap and copy find
//! their IOAS without one (`lookup`); a destroy waits for those under way.
//! Attaching devices lives beside it, in `attach.rs`.
//!
//! Every call on the ioctl path costs O(log n) in the number of live
//! objects, as Linux's xarray does: IDs come from a set of freed IDs, and
//! the questions an attach or unbind asks of the table (the automatic HWPT
//! of an IOAS, whether a device still uses it, a device's vDEVICEs) are
//! answered from indexes kept beside it, not by a scan.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use crate::lock::{Lock, LockGuard};

use crate::access::{Access, AccessOps};
use crate::account::{AccountMode, Accounting, Limit};
use crate::device::{Device, DeviceInfo};
use crate::error::{Error, Result};
use crate::fault::FaultQueue;
use crate::hw_queue::HwQueue;
use crate::hwpt::{Hwpt, HwptFlags, HwptNested, HwptPaging, NestedData, PageFormat, PasidUse};
use crate::id::{
    AccessId, AnyObject, DeviceId, FaultId, HwQueueId, HwptId, HwptNestedId, HwptPagingId, Id, IoasId, NestParentId,
    ObjectId, PtId, SetObjectId, VdeviceId, VeventqId, ViommuId,
};
use crate::ioas::{Ioas, Source};
use crate::ioasid_set::{SetHandle, SetOwner};
use crate::iova::{IovaRange, PAGE_SIZE};
use crate::lookup::IoasIndex;
use crate::memory::Trust;
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
    /// Objects by ID: the slot of ID `n` is `slots[n]` (0 is never an ID).
    /// IDs are handed out lowest free first, so the highest live ID is at
    /// most the most objects ever held at once, and the slots (16 bytes
    /// each, cut back as the highest ID falls) stay a fraction of what the
    /// objects themselves took; a lookup is one index, not a tree search.
    slots: Vec<Option<Object>>,
    /// Objects in `slots`.
    live: usize,
    /// IDs freed below `top`; every ID above `top` is free. The lowest free
    /// ID, which an allocating xarray hands out, is the first of these or
    /// `top + 1`.
    free: BTreeSet<u32>,
    top: u32,
    /// The IOAS that VFIO type1 compatibility uses (`IOMMU_VFIO_IOAS`),
    /// kept here so destroying it clears it under the same lock.
    vfio_ioas: Option<IoasId>,
    /// Automatic HWPTs by their IOAS (its `Arc`'s address).
    auto_by_ioas: HashMap<usize, Vec<u32>>,
    /// How many device attachments use each automatic HWPT: it goes with
    /// the last, as Linux's auto domain does.
    auto_users: HashMap<u32, usize>,
    /// vDEVICEs by their device (its `Arc`'s address).
    vdevices: HashMap<usize, Vec<u32>>,
    /// Objects' mmap regions by offset: (length, object ID).
    mmaps: BTreeMap<u64, (u64, u32)>,
    /// The IOASes again, for lookups that take no lock (`Context::with_ioas`).
    ioases: Arc<IoasIndex>,
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
        if id > self.top {
            self.top = id;
            self.slots.resize_with(id as usize + 1, || None);
        }
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
            Object::Ioas(i) => self.ioases.set(id, Some(i)),
            _ => {}
        }
        self.slots[id as usize] = Some(obj);
        self.live += 1;
        Ok(id)
    }

    /// Takes `id` out. An IOAS taken out may still be in use by lookups
    /// that took no lock: it is let go only after
    /// `epoch::synchronize_lookups` (`Context::destroy`).
    fn remove(&mut self, id: u32) -> Option<Object> {
        let obj = self.slots.get_mut(id as usize)?.take()?;
        self.live -= 1;
        if id == self.top {
            self.top -= 1;
            while self.free.last() == Some(&self.top) {
                self.free.pop_last();
                self.top -= 1;
            }
            self.slots.truncate(self.top as usize + 1);
            if self.slots.capacity() > 4 * self.slots.len().max(64) {
                self.slots.shrink_to(2 * self.slots.len());
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
            Object::Ioas(_) => self.ioases.set(id, None),
            _ => {}
        }
        self.ioases.fit(self.top);
        Some(obj)
    }

    /// The ID of automatic HWPT `hwpt`, while it is in the table.
    fn auto_id(&self, hwpt: &Arc<HwptPaging>) -> Option<u32> {
        self.auto_by_ioas
            .get(&addr(hwpt.ioas()))?
            .iter()
            .copied()
            .find(|&id| matches!(self.get(id), Some(Object::HwptPaging(h)) if Arc::ptr_eq(h, hwpt)))
    }

    /// An automatic HWPT of `ioas` that `info`'s device can use.
    pub(crate) fn find_auto(&self, ioas: &Arc<Ioas>, info: &DeviceInfo) -> Option<(u32, Arc<HwptPaging>)> {
        let autos = self.auto_by_ioas.get(&addr(ioas))?;
        autos.iter().find_map(|&id| match self.get(id) {
            Some(Object::HwptPaging(h))
                if h.domain().format() == info.format() && h.domain().aperture() == info.aperture =>
            {
                Some((id, h.clone()))
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

impl crate::pages::Holder for Lock<Table> {
    fn each_pages(&self, f: &mut dyn FnMut(&Pages)) {
        // Collected first: the IOASes' locks are taken with the table's let go.
        let ioases = self.lock().ioases();
        for ioas in ioases {
            ioas.each_pages(f);
        }
    }
}

impl Table {
    /// The object `id` names.
    pub(crate) fn get(&self, id: u32) -> Option<&Object> {
        self.slots.get(id as usize)?.as_ref()
    }

    /// Every object with its ID, in ID order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (u32, &Object)> {
        self.slots.iter().enumerate().filter_map(|(id, o)| Some((id as u32, o.as_ref()?)))
    }

    /// Every object, in ID order.
    pub(crate) fn values(&self) -> impl Iterator<Item = &Object> {
        self.slots.iter().flatten()
    }

    /// Every IOAS, in ID order.
    pub(crate) fn ioases(&self) -> Vec<Arc<Ioas>> {
        self.values()
            .filter_map(|o| match o {
                Object::Ioas(i) => Some(i.clone()),
                _ => None,
            })
            .collect()
    }

    /// How many objects the table holds.
    pub(crate) fn len(&self) -> usize {
        self.live
    }

    /// Whether the table holds no object.
    pub(crate) fn is_empty(&self) -> bool {
        self.live == 0
    }
}

/// The object kinds of a context, each once: the `Object` variant, the type
/// it holds, and its name in messages. Everything that goes by kind (the
/// typed lookup, the reference count `destroy` checks) is derived from it.
macro_rules! objects {
    ($($(#[$doc:meta])* $variant:ident($ty:ty) $name:literal,)*) => {
        /// An object of the table, of any kind.
        #[derive(Clone)]
        pub enum Object {
            $($(#[$doc])* $variant(Arc<$ty>),)*
        }

        impl Object {
            fn strong_count(&self) -> usize {
                match self {
                    $(Object::$variant(o) => Arc::strong_count(o),)*
                }
            }

            /// The kind's name, for people.
            pub fn kind(&self) -> &'static str {
                match self {
                    $(Object::$variant(_) => $name,)*
                }
            }
        }

        $(impl Kind for $ty {
            type Handle = Arc<$ty>;
            const NAME: &'static str = $name;

            fn from_object(obj: &Object) -> Option<Arc<$ty>> {
                match obj {
                    Object::$variant(o) => Some(o.clone()),
                    _ => None,
                }
            }
        })*
    };
}

objects! {
    /// An I/O address space (`IOMMU_IOAS_ALLOC`).
    Ioas(Ioas) "IOAS",
    /// A paging HWPT, allocated or made automatically by an attach to an
    /// IOAS.
    HwptPaging(HwptPaging) "HWPT paging",
    /// A bound device (`iommufd_device`).
    Device(Device) "device",
    /// A mock device made by the selftest command; destroying it unbinds
    /// the device (Linux's `IOMMUFD_OBJ_SELFTEST`).
    Selftest(SelftestDevice) "selftest device",
    /// An in-engine user of an IOAS, owned by its driver.
    Access(Access) "access",
    /// A guest's stage 1 over a nesting-parent paging HWPT.
    HwptNested(HwptNested) "HWPT nested",
    /// A fault queue (`IOMMU_FAULT_QUEUE_ALLOC`).
    Fault(FaultQueue) "fault queue",
    /// An IOASID set of the global PASID space.
    IoasidSet(SetHandle) "IOASID set",
    /// A virtual IOMMU instance (`IOMMU_VIOMMU_ALLOC`).
    Viommu(Viommu) "vIOMMU",
    /// A device's identity behind a vIOMMU (`IOMMU_VDEVICE_ALLOC`).
    Vdevice(Vdevice) "vDEVICE",
    /// A vIOMMU's event queue (`IOMMU_VEVENTQ_ALLOC`).
    Veventq(Veventq) "vEVENTQ",
    /// A guest-owned hardware queue of a vIOMMU (`IOMMU_HW_QUEUE_ALLOC`).
    HwQueue(HwQueue) "HW queue",
}

/// A kind of object `Context::get` can look up by its `Id`, as Linux's
/// `iommufd_get_object` takes a type: an ID naming another kind is
/// `ENOENT`, like one naming nothing.
pub trait Kind {
    /// What a lookup gives: the object's `Arc`, or an enum over the kinds
    /// an ID of this type may name.
    type Handle;
    /// The kind's name, for errors.
    const NAME: &'static str;
    /// `obj` as this kind, if it is one.
    fn from_object(obj: &Object) -> Option<Self::Handle>;
}

/// A HWPT of either kind.
impl Kind for Hwpt {
    type Handle = Hwpt;
    const NAME: &'static str = "HWPT";

    fn from_object(obj: &Object) -> Option<Hwpt> {
        match obj {
            Object::HwptPaging(h) => Some(Hwpt::Paging(h.clone())),
            Object::HwptNested(n) => Some(Hwpt::Nested(n.clone())),
            _ => None,
        }
    }
}

/// The ID of a selftest object (`MOCK_DOMAIN`'s `out_stdev_id`).
pub type SelftestId = Id<SelftestDevice>;

impl From<SelftestId> for ObjectId {
    fn from(id: SelftestId) -> Self {
        id.any()
    }
}

/// The selftest object behind `IOMMU_TEST_OP_MOCK_DOMAIN` (Linux's
/// `selftest_obj`): it owns the mock device it bound, and destroying it
/// unbinds that device.
#[derive(Default)]
pub struct SelftestDevice {
    dev_id: OnceLock<u32>,
}

impl SelftestDevice {
    /// The mock device bound under it, once it is.
    pub fn dev_id(&self) -> Option<DeviceId> {
        self.dev_id.get().copied().map(Id::new)
    }
}

/// Whose memory `Context::map_process` maps, and so how it is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProcessMemory {
    /// A forked child sharing this context: its private memory is taken
    /// (copied) when first pinned.
    Forked,
    /// A daemon's client: its shared memory is mapped here too, its private
    /// memory reached in the client at each access, and a device's DMA into
    /// that faults.
    Client,
}

/// How a context charges pinned memory and what its caller may do.
#[derive(Debug, Clone)]
pub struct ContextConfig {
    /// The limit on pages pinned and charged (see [`Limit`]).
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
    /// The process whose pins these are, charged to it and held to its
    /// `RLIMIT_MEMLOCK` (`None`: this one): a daemon's client.
    pub owner: Option<i32>,
    /// The set every IOASID set this context makes at the top goes under,
    /// whose quota bounds them all: a daemon's share of the PASID space for
    /// one user (see [`crate::ioasid_set::shared_root`]). `None`: the top.
    pub pasid_parent: Option<Arc<SetHandle>>,
    /// The most objects the context may hold at once (`None`: as many as
    /// IDs go); past it, allocations fail with `ENOMEM`, as memory would.
    pub max_objects: Option<u32>,
    /// The deepest event queue (vEVENTQ) the context may make (`None`:
    /// Linux's own bound); deeper is refused as Linux refuses past its own.
    pub max_queue_depth: Option<u32>,
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
            owner: None,
            pasid_parent: None,
            max_objects: None,
            max_queue_depth: None,
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
            owner: None,
            pasid_parent: None,
            max_objects: None,
            max_queue_depth: None,
        }
    }

    /// The privileges of process `pid` (a daemon's client, which opened the
    /// context), judged from its capabilities at each use.
    pub fn of_client(pid: i32) -> Self {
        ContextConfig {
            memlock_limit: Limit::Rlimit,
            memlock_exempt: false,
            sys_resource: false,
            private_counter: false,
            live_capabilities: true,
            owner: Some(pid),
            pasid_parent: None,
            max_objects: None,
            max_queue_depth: None,
        }
    }

    /// Whether the owner holds capability `cap` now.
    fn capable(&self, cap: CapabilitySet) -> bool {
        match self.owner {
            None => crate::account::has_capability(cap),
            Some(pid) => crate::account::capabilities_of(pid) & cap.bits() != 0,
        }
    }

    /// Whether pinned pages go uncharged (`CAP_IPC_LOCK`).
    fn memlock_exempt(&self) -> bool {
        if self.live_capabilities { self.capable(CapabilitySet::IPC_LOCK) } else { self.memlock_exempt }
    }

    /// Whether the accounting mode may change (`CAP_SYS_RESOURCE`).
    fn sys_resource(&self) -> bool {
        if self.live_capabilities { self.capable(CapabilitySet::SYS_RESOURCE) } else { self.sys_resource }
    }
}

/// One open `/dev/iommu` (Linux's `iommufd_ctx`): the object table that
/// IOASes, HWPTs, devices, accesses, fault queues and vIOMMU objects live in,
/// named by typed IDs ([`Id`]). Every operation of the uAPI is a method here
/// (the ABI crate only decodes structs), with errors of the errno Linux
/// returns. `Sync`: share it as `Arc<Context>` between threads; dropping it
/// destroys every object, as closing the fd does.
pub struct Context {
    /// Shared with the registry of what holds user pages (see
    /// `pages::Holder`), which counts their pins through it.
    objects: Arc<Lock<Table>>,
    /// The table's IOASes, found without its lock.
    ioases: Arc<IoasIndex>,
    /// Serialises changes to the object graph (attach, detach, destroy) so
    /// checks of who uses what stay true while they act.
    graph: Lock<()>,
    /// `IOMMU_OPTION_RLIMIT_MODE`: charged per process, else per user.
    process_mode: AtomicBool,
    config: ContextConfig,
    private: Option<Accounting>,
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
    /// A context with this process's privileges
    /// ([`ContextConfig::from_process`]).
    pub fn new() -> Self {
        Self::with_config(ContextConfig::from_process())
    }

    /// A context that charges and permits as `config` says.
    pub fn with_config(config: ContextConfig) -> Self {
        let table = Table::default();
        let ioases = table.ioases.clone();
        let objects = Arc::new(Lock::new(table));
        crate::pages::hold(Arc::downgrade(&objects) as std::sync::Weak<dyn crate::pages::Holder>);
        Context {
            objects,
            ioases,
            graph: Lock::new(()),
            process_mode: AtomicBool::new(false),
            private: config.private_counter.then(|| Accounting::isolated(config.memlock_limit)),
            config,
            set_owner: SetOwner::default(),
        }
    }

    pub(crate) fn table(&self) -> LockGuard<'_, Table> {
        self.objects.lock()
    }

    pub(crate) fn graph(&self) -> LockGuard<'_, ()> {
        self.graph.lock()
    }

    /// Enters `obj` in the table under the lowest free ID, typed as the
    /// caller names it.
    fn insert<T: ?Sized>(&self, obj: Object) -> Result<Id<T>> {
        crate::inject::check("object ID")?;
        let mut t = self.table();
        if self.config.max_objects.is_some_and(|max| t.len() >= max as usize) {
            return Err(Error::NoMemory("the context holds as many objects as it may"));
        }
        t.alloc(obj).map(Id::new)
    }

    /// The object `id` names, of whatever kind.
    pub fn object(&self, id: impl Into<ObjectId>) -> Result<Object> {
        let id = id.into().get();
        self.table().get(id).cloned().ok_or(Error::NoObject { id, kind: "object" })
    }

    /// The object `id` names, if it is of kind `T` (Linux's
    /// `iommufd_get_object`): `NoObject` otherwise, as for an unused ID.
    pub fn get<T: Kind>(&self, id: Id<T>) -> Result<T::Handle> {
        let t = self.table();
        t.get(id.get()).and_then(T::from_object).ok_or(Error::NoObject { id: id.get(), kind: T::NAME })
    }

    /// `f` on IOAS `id`, found without the table's lock or a reference
    /// (see `lookup`): for the calls made most, map and unmap. A destroy of
    /// the IOAS meanwhile waits for `f` to return.
    fn with_ioas<R>(&self, id: IoasId, f: impl FnOnce(&Ioas) -> Result<R>) -> Result<R> {
        loop {
            let section = crate::epoch::pin_lookup();
            if let Some(ioas) = self.ioases.get(id.get(), &section) {
                return f(ioas);
            }
            drop(section);
            // Not an IOAS, or one entered since the look: the table, which
            // enters IOASes in the index first, says which.
            if !matches!(self.table().get(id.get()), Some(Object::Ioas(_))) {
                return Err(Error::NoObject { id: id.get(), kind: Ioas::NAME });
            }
        }
    }

    /// IDs and kinds of every object, in ID order.
    pub fn objects(&self) -> Vec<(ObjectId, &'static str)> {
        self.table().iter().map(|(id, o)| (Id::new(id), o.kind())).collect()
    }

    fn accounting(&self) -> Accounting {
        self.with_accounting(Accounting::clone)
    }

    /// `f` on where this context charges pins now, without a reference
    /// taken on a private counter: a map's pages that already charge there
    /// keep theirs.
    fn with_accounting<R>(&self, f: impl FnOnce(&Accounting) -> R) -> R {
        if let Some(private) = &self.private {
            return f(private);
        }
        let (mode, exempt, limit) = (self.account_mode(), self.config.memlock_exempt(), self.config.memlock_limit);
        match self.config.owner {
            None => crate::account::with_own(mode, exempt, limit, f),
            Some(pid) => f(&Accounting::of_process(mode, exempt, limit, Some(pid))),
        }
    }

    /// Pages pinned and charged through this context's counter.
    pub fn locked_pages(&self) -> u64 {
        self.accounting().charged()
    }

    /// The accounting mode new pins are charged in
    /// (`IOMMU_OPTION_RLIMIT_MODE` read back).
    pub fn account_mode(&self) -> AccountMode {
        if self.process_mode.load(Ordering::Relaxed) { AccountMode::Process } else { AccountMode::User }
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
        let process = match value {
            0 => false,
            1 => true,
            _ => return Err(Error::Invalid("accounting mode is 0 or 1")),
        };
        // Under the table's lock, which every object's making takes: no map
        // can be under way.
        self.process_mode.store(process, Ordering::Relaxed);
        Ok(())
    }

    /// `IOMMU_IOAS_CHANGE_PROCESS`: the charges for every mapping of every
    /// IOAS move to process `pid` (`None`: this one) - its user's or its
    /// own counter, as the mode that charged them says. Only file mappings
    /// can move (`EINVAL` otherwise), and on failure nothing has moved.
    pub fn change_process(&self, pid: Option<i32>) -> Result<()> {
        let _g = self.graph();
        let ioases = self.table().ioases();
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
    pub fn vfio_ioas(&self) -> Result<IoasId> {
        let _g = self.graph();
        self.table().vfio_ioas.ok_or(Error::NoDevice("no VFIO compatibility IOAS is set"))
    }

    /// `IOMMU_VFIO_IOAS_SET` (`Some`) and `IOMMU_VFIO_IOAS_CLEAR` (`None`).
    pub fn set_vfio_ioas(&self, ioas: Option<IoasId>) -> Result<()> {
        let _g = self.graph();
        let mut t = self.table();
        if let Some(id) = ioas {
            t.get(id.get()).and_then(Ioas::from_object).ok_or(Error::NoObject { id: id.get(), kind: Ioas::NAME })?;
        }
        t.vfio_ioas = ioas;
        Ok(())
    }

    /// `IOMMU_IOAS_ALLOC`: a new, empty IOAS under the lowest free ID.
    /// Fails with `NoSpace` (ENOSPC) when every object ID is taken.
    pub fn ioas_alloc(&self) -> Result<IoasId> {
        self.insert(Object::Ioas(Arc::new(Ioas::new())))
    }

    /// Maps user memory that the caller keeps mapped while it is in the IOAS;
    /// DMA touches it directly.
    ///
    /// # Safety
    /// `[uptr, uptr + len)` must stay mapped (with the rights given in
    /// `perm`) until it is unmapped from the IOAS or the context is dropped.
    pub unsafe fn map_user(&self, ioas: IoasId, uptr: u64, len: u64, iova: Option<u64>, perm: Perm) -> Result<u64> {
        self.map_user_trust(ioas, uptr, len, iova, perm, Trust::Direct)
    }

    /// Maps user memory that its owner may unmap at any time: pinning checks
    /// it is mapped, and DMA that finds it gone fails instead of crashing.
    pub fn map_user_checked(&self, ioas: IoasId, uptr: u64, len: u64, iova: Option<u64>, perm: Perm) -> Result<u64> {
        self.map_user_trust(ioas, uptr, len, iova, perm, Trust::Checked)
    }

    fn map_user_trust(
        &self,
        ioas: IoasId,
        uptr: u64,
        len: u64,
        iova: Option<u64>,
        perm: Perm,
        trust: Trust,
    ) -> Result<u64> {
        self.with_accounting(|acct| {
            let user = || Pages::user(uptr, len, perm.write, trust, acct);
            self.map_pages(ioas, len, iova, perm, uptr, user)
        })
    }

    /// Maps `[uptr, uptr + len)` of another process, `pid`, reached as
    /// `how` says (see `pages`).
    #[allow(clippy::too_many_arguments)]
    pub fn map_process(
        &self,
        ioas: IoasId,
        pid: i32,
        how: ProcessMemory,
        uptr: u64,
        len: u64,
        iova: Option<u64>,
        perm: Perm,
    ) -> Result<u64> {
        let client = how == ProcessMemory::Client;
        let remote = || Pages::remote(pid, client, uptr, len, perm.write, self.accounting());
        self.map_pages(ioas, len, iova, perm, uptr, remote)
    }

    /// Maps `[start, start + len)` of a file (a memfd, typically).
    pub fn map_file(
        &self,
        ioas: IoasId,
        fd: BorrowedFd<'_>,
        start: u64,
        len: u64,
        iova: Option<u64>,
        perm: Perm,
    ) -> Result<u64> {
        let file = || Pages::file(fd, start, len, perm.write, self.accounting());
        self.map_pages(ioas, len, iova, perm, start, file)
    }

    /// Maps `[start, start + len)` of a dma-buf whose memory is the file
    /// `fd`; returns the IOVA and the pages, for the exporter to revoke.
    pub fn map_dmabuf(
        &self,
        ioas: IoasId,
        fd: BorrowedFd<'_>,
        start: u64,
        len: u64,
        iova: Option<u64>,
        perm: Perm,
    ) -> Result<(u64, Arc<Pages>)> {
        let mut kept = None;
        let dmabuf = || {
            let (pages, lead) = Pages::dmabuf(fd, start, len, perm.write)?;
            kept = Some(pages.clone());
            Ok((pages, lead))
        };
        let iova = self.map_pages(ioas, len, iova, perm, start, dmabuf)?;
        Ok((iova, kept.expect("pages are made before they are mapped")))
    }

    /// Maps `len` bytes of the memory `pages` makes (its pages and the
    /// offset into the first) into `ioas`, once the IOAS is known to exist:
    /// a missing IOAS is `ENOENT` before any memory is pinned or charged.
    /// Returns the IOVA.
    fn map_pages(
        &self,
        ioas: IoasId,
        len: u64,
        iova: Option<u64>,
        perm: Perm,
        align_hint: u64,
        pages: impl FnOnce() -> Result<(Arc<Pages>, u64)>,
    ) -> Result<u64> {
        self.with_ioas(ioas, |ioas| {
            let (pages, start_byte) = pages()?;
            ioas.map([Source { pages, start_byte, len, align_hint }], iova, perm)
        })
    }

    /// Maps at `dst_iova` (or a chosen IOVA) of `dst` the memory mapped at
    /// `[src_iova, src_iova + len)` of `src`, sharing its pins.
    pub fn copy(
        &self,
        dst: IoasId,
        src: IoasId,
        src_iova: u64,
        len: u64,
        dst_iova: Option<u64>,
        perm: Perm,
    ) -> Result<u64> {
        let srcs = self.with_ioas(src, |src| src.sources(src_iova, len))?;
        self.with_ioas(dst, |dst| dst.map(srcs, dst_iova, perm))
    }

    /// Unmaps whole mappings inside `[iova, iova + len)`; `0, u64::MAX`
    /// unmaps everything. Returns the bytes unmapped.
    pub fn unmap(&self, ioas: IoasId, iova: u64, len: u64) -> Result<u64> {
        self.with_ioas(ioas, |ioas| {
            if iova == 0 && len == u64::MAX {
                return Ok(ioas.unmap_all());
            }
            let (unmapped, res) = ioas.unmap(IovaRange::from_len(iova, len)?);
            res?;
            if unmapped == 0 {
                return Err(Error::NotFound("nothing is mapped in that range"));
            }
            Ok(unmapped)
        })
    }

    /// Binds an emulated device; it can then be attached to page tables.
    pub fn bind_device(&self, info: DeviceInfo) -> Result<DeviceId> {
        let _g = self.graph();
        let dev = Arc::new(Device::new(info));
        let id: DeviceId = self.insert(Object::Device(dev.clone()))?;
        dev.set_id(id.get());
        Ok(id)
    }

    /// Detaches and forgets a device (what closing its VFIO fd does).
    pub fn unbind_device(&self, dev_id: DeviceId) -> Result<()> {
        let _g = self.graph();
        self.unbind_locked(dev_id)
    }

    fn unbind_locked(&self, dev_id: DeviceId) -> Result<()> {
        let dev = self.get(dev_id)?;
        // Its vDEVICEs go with it: the guest's name for a device that is
        // gone must not resolve.
        let vdevs: Vec<(u32, Arc<Vdevice>)> = {
            let t = self.table();
            let ids = t.vdevices.get(&addr(&dev)).map(Vec::as_slice).unwrap_or_default();
            ids.iter()
                .filter_map(|&id| match t.get(id) {
                    Some(Object::Vdevice(v)) => Some((id, v.clone())),
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
        t.remove(dev_id.get());
        for (id, _) in &vdevs {
            t.remove(*id);
        }
        Ok(())
    }

    /// Creates an access for a driver and attaches it to `ioas_id`.
    pub fn access_create(
        &self,
        ioas_id: IoasId,
        ops: Arc<dyn AccessOps>,
        needs_pin_pages: bool,
    ) -> Result<(AccessId, Arc<Access>)> {
        let _g = self.graph();
        let access = Access::new(ops, needs_pin_pages);
        let id: AccessId = self.insert(Object::Access(access.clone()))?;
        let attached = self.get(ioas_id).and_then(|ioas| access.set_ioas(Some(ioas)));
        if let Err(e) = attached {
            self.table().remove(id.get());
            return Err(e);
        }
        Ok((id, access))
    }

    /// Moves an attached access to another IOAS.
    pub fn access_replace(&self, id: AccessId, ioas_id: IoasId) -> Result<()> {
        let _g = self.graph();
        let access = self.get(id)?;
        if access.ioas().is_none() {
            return Err(Error::NotFound("access is not attached"));
        }
        access.set_ioas(Some(self.get(ioas_id)?))
    }

    /// The driver is done with its access: detach and forget it.
    pub fn access_destroy(&self, id: AccessId) {
        let _g = self.graph();
        let removed = self.table().remove(id.get());
        if let Some(Object::Access(access)) = removed {
            let _ = access.set_ioas(None);
        }
    }

    /// The selftest's `MOCK_DOMAIN`: a selftest object, a mock device bound
    /// under it and attached to `pt_id`. Returns (selftest, HWPT, device) IDs.
    pub fn mock_domain(&self, pt_id: impl Into<PtId>, info: DeviceInfo) -> Result<(SelftestId, HwptId, DeviceId)> {
        let _g = self.graph();
        let stdev = Arc::new(SelftestDevice::default());
        let stdev_id: SelftestId = self.insert(Object::Selftest(stdev.clone()))?;
        let dev = Arc::new(Device::new(info));
        let dev_id: DeviceId = match self.insert(Object::Device(dev.clone())) {
            Ok(id) => {
                dev.set_id(id.get());
                id
            }
            Err(e) => {
                self.table().remove(stdev_id.get());
                return Err(e);
            }
        };
        match self.attach_locked(dev_id, None, pt_id.into()) {
            Ok(hwpt_id) => {
                stdev.dev_id.set(dev_id.get()).expect("set once");
                Ok((stdev_id, hwpt_id, dev_id))
            }
            Err(e) => {
                let mut t = self.table();
                t.remove(dev_id.get());
                t.remove(stdev_id.get());
                Err(e)
            }
        }
    }

    /// The selftest's `MOCK_DOMAIN_REPLACE`, by selftest object ID.
    pub fn mock_domain_replace(&self, stdev_id: SelftestId, pt_id: impl Into<PtId>) -> Result<HwptId> {
        let _g = self.graph();
        let stdev = self.get(stdev_id)?;
        let dev_id = stdev.dev_id().ok_or(Error::NotFound("selftest device is not bound"))?;
        self.replace_locked(dev_id, None, pt_id.into())
    }

    /// `IOMMU_HWPT_ALLOC` of a paging HWPT over an IOAS, for a device;
    /// page requests on it go to fault queue `fault` when given.
    pub fn hwpt_alloc(
        &self,
        dev_id: DeviceId,
        ioas_id: IoasId,
        flags: HwptFlags,
        fault: Option<FaultId>,
    ) -> Result<HwptPagingId> {
        self.hwpt_alloc_format(dev_id, ioas_id, flags, fault, None)
    }

    /// `hwpt_alloc` in `format` when given (a driver's data may choose one
    /// of its IOMMU's formats), else the IOMMU's own for `flags`.
    pub fn hwpt_alloc_format(
        &self,
        dev_id: DeviceId,
        ioas_id: IoasId,
        flags: HwptFlags,
        fault: Option<FaultId>,
        format: Option<PageFormat>,
    ) -> Result<HwptPagingId> {
        self.hwpt_alloc_with(dev_id, ioas_id, flags, fault, format, PasidUse::Compatible)
    }

    /// `hwpt_alloc_format` with the table's `PasidUse` chosen.
    pub fn hwpt_alloc_with(
        &self,
        dev_id: DeviceId,
        ioas_id: IoasId,
        flags: HwptFlags,
        fault: Option<FaultId>,
        format: Option<PageFormat>,
        pasid_use: PasidUse,
    ) -> Result<HwptPagingId> {
        let _g = self.graph();
        let dev = self.get(dev_id)?;
        let ioas = self.get(ioas_id).map_err(|_| Error::Invalid("pt_id is not an IOAS"))?;
        if flags.dirty_tracking && !dev.info().dirty_tracking {
            return Err(Error::Unsupported("the device's IOMMU cannot track dirty pages"));
        }
        let info = dev.info();
        let format = format.unwrap_or_else(|| info.iommu.paging_format(flags.nest_parent));
        if !info.iommu.serves(format) {
            return Err(Error::Unsupported("the device's IOMMU has no such page-table format"));
        }
        let fault = fault.map(|id| self.get(id)).transpose()?;
        let hwpt = HwptPaging::new(ioas, format, info.aperture, flags, false, fault)?.with_pasid_use(pasid_use);
        self.insert_hwpt(hwpt)
    }

    /// `IOMMU_HWPT_ALLOC` of a nested HWPT over paging HWPT `parent_id`.
    pub fn hwpt_alloc_nested(
        &self,
        dev_id: DeviceId,
        parent_id: impl Into<NestParentId>,
        data: NestedData,
        fault: Option<FaultId>,
    ) -> Result<HwptNestedId> {
        self.hwpt_alloc_nested_with(dev_id, parent_id.into(), data, fault, PasidUse::Compatible)
    }

    /// `hwpt_alloc_nested` with the table's `PasidUse` chosen.
    pub fn hwpt_alloc_nested_with(
        &self,
        dev_id: DeviceId,
        parent_id: NestParentId,
        data: NestedData,
        fault: Option<FaultId>,
        pasid_use: PasidUse,
    ) -> Result<HwptNestedId> {
        let _g = self.graph();
        let dev = self.get(dev_id)?;
        let (parent, viommu) = match self.object(Id::<AnyObject>::new(parent_id.get()))? {
            Object::HwptPaging(parent) => (parent, None),
            Object::Viommu(v) => (v.hwpt().clone(), Some(v)),
            _ => return Err(Error::Invalid("a nested HWPT needs a paging parent or a vIOMMU")),
        };
        if !dev.info().iommu.serves(parent.domain().format()) {
            return Err(Error::Invalid("parent HWPT format does not match the device's IOMMU"));
        }
        parent.check_nest_parent()?;
        // Each stage-1 type belongs to one IOMMU; SMMUv3's needs its vIOMMU.
        if !data.fits(dev.info().iommu, viommu.as_ref().map(|v| v.kind())) {
            return Err(Error::Unsupported("the IOMMU does not take this stage-1 type here"));
        }
        let fault = fault.map(|id| self.get(id)).transpose()?;
        let nested = parent.nest(data, fault, viommu, pasid_use)?;
        self.insert(Object::HwptNested(nested))
    }

    /// `IOMMU_VIOMMU_ALLOC`: a vIOMMU of `kind` for `dev_id`'s IOMMU,
    /// translating through nesting-parent HWPT `hwpt_id`.
    pub fn viommu_alloc(&self, dev_id: DeviceId, hwpt_id: HwptPagingId, kind: ViommuType) -> Result<ViommuId> {
        let _g = self.graph();
        let dev = self.get(dev_id)?;
        let hwpt = self.get(hwpt_id)?;
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
        dev_id: DeviceId,
        hwpt_id: HwptPagingId,
        kind: ViommuType,
        init: impl FnOnce() -> std::result::Result<(u64, Vec<u8>), E>,
    ) -> std::result::Result<ViommuId, E> {
        let _g = self.graph();
        let dev = self.get(dev_id)?;
        let hwpt = self.get(hwpt_id)?;
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
        match t.get(id) {
            Some(Object::Viommu(v)) => Some(v.clone()),
            _ => None,
        }
    }

    /// `IOMMU_HW_QUEUE_ALLOC`: a HW queue of `kind` at `index` of vIOMMU
    /// `viommu_id`, over `[base, base + len)` of its stage 2.
    pub fn hw_queue_alloc(&self, viommu_id: ViommuId, kind: u32, index: u32, base: u64, len: u64) -> Result<HwQueueId> {
        let _g = self.graph();
        let queue = self.get(viommu_id)?.add_hw_queue(kind, index, base, len)?;
        self.insert(Object::HwQueue(queue))
    }

    /// Gives vIOMMU `viommu_id` the IOASID set object `set_id` to draw its
    /// guest's PASIDs from.
    pub fn viommu_set_pasid_set(&self, viommu_id: ViommuId, set_id: SetObjectId) -> Result<()> {
        let _g = self.graph();
        self.get(viommu_id)?.set_pasid_set(self.get(set_id)?)
    }

    /// `IOMMU_VEVENTQ_ALLOC`: an event queue of `kind` for vIOMMU
    /// `viommu_id`, holding at most `depth` events.
    pub fn veventq_alloc(&self, viommu_id: ViommuId, kind: u32, depth: u32) -> Result<(VeventqId, Arc<Veventq>)> {
        if depth == 0 {
            return Err(Error::Invalid("a vEVENTQ needs a depth"));
        }
        let _g = self.graph();
        let q = self.get(viommu_id)?.add_veventq(kind, depth)?;
        Ok((self.insert(Object::Veventq(q.clone()))?, q))
    }

    /// `IOMMU_VDEVICE_ALLOC`: names `dev_id` `virt_id` behind `viommu_id`.
    pub fn vdevice_alloc(&self, viommu_id: ViommuId, dev_id: DeviceId, virt_id: u64) -> Result<VdeviceId> {
        let _g = self.graph();
        let viommu = self.get(viommu_id)?;
        let dev = self.get(dev_id)?;
        let vdev = Vdevice::new(viommu, dev, virt_id)?;
        self.insert(Object::Vdevice(vdev))
    }

    /// A new IOASID set under set object `parent` (or at the top).
    pub fn ioasid_set_alloc(&self, parent: Option<SetObjectId>, quota: u32) -> Result<SetObjectId> {
        let parent = match parent {
            Some(id) => Some(self.get(id)?),
            None => self.config.pasid_parent.clone(),
        };
        let set = crate::ioasid_set::new_set(&self.set_owner, parent, quota)?;
        self.insert(Object::IoasidSet(set))
    }

    /// How the context charges memory and what it may hold.
    pub fn config(&self) -> &ContextConfig {
        &self.config
    }

    /// The owner of this context's IOASID sets: PASID references go
    /// through it (`IOASID_PASID_GET` and `PUT`).
    pub fn set_owner(&self) -> &SetOwner {
        &self.set_owner
    }

    /// `IOMMU_FAULT_QUEUE_ALLOC`.
    pub fn fault_alloc(&self) -> Result<(FaultId, Arc<FaultQueue>)> {
        let queue = FaultQueue::new();
        Ok((self.insert(Object::Fault(queue.clone()))?, queue))
    }

    pub(crate) fn insert_hwpt(&self, hwpt: Arc<HwptPaging>) -> Result<HwptPagingId> {
        self.insert(Object::HwptPaging(hwpt.clone())).inspect_err(|_| hwpt.release())
    }

    /// `IOMMU_DESTROY`.
    pub fn destroy(&self, id: impl Into<ObjectId>) -> Result<()> {
        let id = id.into().get();
        let graph = self.graph();
        let mut t = self.table();
        let obj = t.get(id).ok_or(Error::NoObject { id, kind: "object" })?;
        if matches!(obj, Object::Device(_) | Object::Access(_)) {
            return Err(Error::Busy("owned by its driver, which releases it"));
        }
        if obj.strong_count() > 1 {
            return Err(Error::Busy("object is in use"));
        }
        let obj = t.remove(id).expect("present");
        if t.vfio_ioas.is_some_and(|ioas| ioas.get() == id) {
            t.vfio_ioas = None;
        }
        drop(t);
        match &obj {
            Object::HwptPaging(h) => h.release(),
            Object::Vdevice(v) => self.vdevice_release_locked(v),
            Object::Selftest(s) => {
                if let Some(dev_id) = s.dev_id() {
                    let _ = self.unbind_locked(dev_id);
                }
            }
            Object::Ioas(_) => {
                // A map or unmap that found it without the lock finishes
                // first; it may take any lock but none is held here.
                drop(graph);
                crate::epoch::synchronize_lookups();
            }
            _ => {}
        }
        Ok(())
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        // Leaves first: devices hold HWPTs, HWPTs hold IOASes.
        let devices: Vec<DeviceId> =
            self.table().iter().filter(|(_, o)| matches!(o, Object::Device(_))).map(|(id, _)| Id::new(id)).collect();
        for id in devices {
            let _ = self.unbind_device(id);
        }
        let t = std::mem::take(&mut *self.table());
        let mut ioases = Vec::new();
        for obj in t.slots.into_iter().flatten() {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> Context {
        Context::with_config(ContextConfig::isolated(Limit::Pages(u64::MAX)))
    }

    /// The table's slots follow the highest live ID down, so a context that
    /// once held many objects does not keep their slots.
    #[test]
    fn slots_shrink_as_the_highest_id_falls() {
        let ctx = ctx();
        let ids: Vec<IoasId> = (0..10_000).map(|_| ctx.ioas_alloc().unwrap()).collect();
        assert!(ctx.table().slots.len() > 10_000);
        for &id in ids.iter().rev() {
            ctx.destroy(id).unwrap();
        }
        let t = ctx.table();
        assert!(t.is_empty());
        assert!(t.slots.capacity() <= 256, "{} slots kept for no object", t.slots.capacity());
    }

    /// IDs freed below the highest stay free slots; the highest going takes
    /// the free IDs under it along.
    #[test]
    fn freed_ids_below_the_top_are_reused_lowest_first() {
        let ctx = ctx();
        let ids: Vec<IoasId> = (0..5).map(|_| ctx.ioas_alloc().unwrap()).collect();
        ctx.destroy(ids[1]).unwrap();
        ctx.destroy(ids[3]).unwrap();
        ctx.destroy(ids[4]).unwrap();
        assert_eq!(ctx.table().top, 3, "ID 4 went with 5");
        assert_eq!(ctx.ioas_alloc().unwrap().get(), 2);
        assert_eq!(ctx.ioas_alloc().unwrap().get(), 4);
        assert_eq!(ctx.table().len(), 4);
        assert!(ctx.object(IoasId::new(5)).is_err());
    }

    /// Destroying the VFIO compatibility IOAS unsets it, as Linux's destroy
    /// of `ictx->vfio_ioas` does.
    #[test]
    fn destroying_the_vfio_ioas_unsets_it() {
        let ctx = ctx();
        let ioas = ctx.ioas_alloc().unwrap();
        let other = ctx.ioas_alloc().unwrap();
        assert!(ctx.set_vfio_ioas(Some(IoasId::new(9))).is_err());
        ctx.set_vfio_ioas(Some(ioas)).unwrap();
        ctx.destroy(other).unwrap();
        assert_eq!(ctx.vfio_ioas().unwrap(), ioas);
        ctx.destroy(ioas).unwrap();
        assert!(matches!(ctx.vfio_ioas(), Err(Error::NoDevice(_))));
        assert_eq!(ctx.ioas_alloc().unwrap(), ioas);
        assert!(ctx.vfio_ioas().is_err(), "a new IOAS under the same ID is not the compatibility IOAS");
    }

    /// A map or unmap finds its IOAS without a lock or a reference, so a
    /// destroy meanwhile succeeds; it must not let the IOAS go before the
    /// lookup is done with it.
    #[test]
    fn destroy_waits_for_a_lookup_that_took_no_lock() {
        use std::sync::atomic::Ordering::SeqCst;
        let ctx = ctx();
        let id = ctx.ioas_alloc().unwrap();
        let gone = Arc::downgrade(&ctx.get(id).unwrap());
        let destroyed = AtomicBool::new(false);
        std::thread::scope(|s| {
            ctx.with_ioas(id, |ioas| {
                s.spawn(|| {
                    ctx.destroy(id).unwrap();
                    destroyed.store(true, SeqCst);
                });
                while ctx.get(id).is_ok() {
                    std::thread::yield_now();
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
                assert!(!destroyed.load(SeqCst), "destroy returned while a lookup used the IOAS");
                assert!(ioas.areas().is_empty(), "the IOAS is still whole");
                Ok(())
            })
            .unwrap();
        });
        assert!(destroyed.load(SeqCst));
        assert!(gone.upgrade().is_none(), "the IOAS went with the destroy");
        assert!(matches!(ctx.unmap(id, 0, u64::MAX), Err(Error::NoObject { .. })));
    }

    /// Maps and unmaps on other threads race destroys and new IOASes under
    /// the same ID: each either finds the IOAS of its moment or fails with
    /// `ENOENT`, and each destroyed IOAS is gone when its destroy returns.
    #[test]
    fn lookups_race_destroys_and_reused_ids() {
        use std::sync::atomic::{AtomicU32, Ordering::Relaxed};
        let ctx = ctx();
        let buf = crate::memory::HostBuffer::new(2 * PAGE_SIZE as usize).unwrap();
        let (current, stop, done) = (AtomicU32::new(0), AtomicBool::new(false), AtomicU32::new(0));
        std::thread::scope(|s| {
            for t in 0..2u64 {
                let (ctx, buf, current, stop, done) = (&ctx, &buf, &current, &stop, &done);
                s.spawn(move || {
                    while !stop.load(Relaxed) {
                        let id = IoasId::new(current.load(Relaxed));
                        let iova = (t + 1) << 20;
                        let addr = buf.addr() + t * PAGE_SIZE;
                        // SAFETY: `buf` outlives the context's IOASes' use of it:
                        // the context drops after the scope.
                        match unsafe { ctx.map_user(id, addr, PAGE_SIZE, Some(iova), Perm::RW) } {
                            Ok(_) => match ctx.unmap(id, iova, PAGE_SIZE) {
                                Ok(n) => assert_eq!(n, PAGE_SIZE),
                                // Destroyed, or destroyed and its ID taken by the next.
                                Err(e) => {
                                    assert!(matches!(e, Error::NoObject { .. } | Error::NotFound(_)), "unmap: {e}")
                                }
                            },
                            Err(e) => assert!(matches!(e, Error::NoObject { .. }), "map: {e}"),
                        }
                        done.fetch_add(1, Relaxed);
                    }
                });
            }
            // Stops the workers however this thread ends, a failed assertion too.
            struct Stop<'a>(&'a AtomicBool);
            impl Drop for Stop<'_> {
                fn drop(&mut self) {
                    self.0.store(true, Relaxed);
                }
            }
            let _stop = Stop(&stop);
            for _ in 0..2_000 {
                let id = ctx.ioas_alloc().unwrap();
                let gone = Arc::downgrade(&ctx.get(id).unwrap());
                current.store(id.get(), Relaxed);
                let seen = done.load(Relaxed);
                while done.load(Relaxed) < seen + 2 {
                    std::hint::spin_loop();
                }
                ctx.destroy(id).unwrap();
                assert!(gone.upgrade().is_none(), "a destroyed IOAS outlived its destroy");
            }
        });
    }
}
