//! Emulated devices: what a device brings to an IOMMU (RID, aperture,
//! reserved regions, PASID width, format) and the DMA it does through the
//! page table it is attached to.
//!
//! `device`, `hwpt` and `viommu` import each other, and only each other,
//! because the objects point at each other: a device is attached to HWPTs,
//! a nested HWPT sits on a vIOMMU that takes its faults, and a vIOMMU names
//! its devices by virtual ID. Linux's iommufd has the same triangle
//! (`device.c`, `hw_pagetable.c` and `viommu.c` share one private header).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use parking_lot::Mutex;
use thiserror::Error;

use crate::domain::Domain;
use crate::epoch;
use crate::fault::{DmaAttrs, Group, LAST_PAGE, PASID_VALID, PERM_READ, PERM_WRITE, PageRequest, Response, Waiter};
use crate::hwpt::{FaultReason, Hwpt, PageFormat, Translated};
use crate::iova::IovaRange;
use crate::memory;
use crate::model::{Features, HwInfo, IommuModel};
use crate::pgtable::Perm;

/// A device as its IOMMU sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// A name for people (logs, the CLI's listings); the IOMMU never reads it.
    pub name: String,
    /// PCI requester ID (bus << 8 | devfn).
    pub rid: u32,
    /// The IOMMU in front of the device.
    pub iommu: IommuModel,
    /// IOVAs the device's IOMMU can translate.
    pub aperture: IovaRange,
    /// IOVAs the device must never be given (MSI windows and the like).
    pub reserved: Vec<IovaRange>,
    /// log2 of the PASID space; 0 when the device has no PASID capability.
    pub max_pasid_log2: u8,
    /// The PCI PASID capability's Execute Permission bit, which the IOMMU
    /// driver enables with PASIDs (meaningless without them): DMA may then
    /// ask for execute access.
    pub pasid_exec: bool,
    /// The PCI PASID capability's Privileged Mode bit, enabled as
    /// `pasid_exec` is: DMA may then ask for supervisor access.
    pub pasid_priv: bool,
    /// Whether its IOMMU can track dirty pages.
    pub dirty_tracking: bool,
    /// PCIe Page Request Interface: a DMA that misses asks for the page and
    /// waits, instead of failing.
    pub pri: bool,
}

impl DeviceInfo {
    /// A device behind a 4-level VT-d IOMMU with the whole 48-bit aperture.
    pub fn new(name: impl Into<String>, rid: u32) -> Self {
        Self::behind(IommuModel::VTD, name, rid)
    }

    /// A device behind an IOMMU of model `iommu`, with its whole aperture.
    pub fn behind(iommu: IommuModel, name: impl Into<String>, rid: u32) -> Self {
        DeviceInfo {
            name: name.into(),
            rid,
            iommu,
            aperture: iommu.aperture(),
            reserved: Vec::new(),
            max_pasid_log2: 0,
            pasid_exec: false,
            pasid_priv: false,
            dirty_tracking: false,
            pri: false,
        }
    }
}

impl DeviceInfo {
    /// The format of the device's default paging domains.
    pub fn format(&self) -> PageFormat {
        self.iommu.paging_format(false)
    }

    /// What `IOMMU_GET_HW_INFO` reports of the device's IOMMU.
    pub fn hw_info(&self) -> HwInfo {
        let features =
            Features { max_pasid_log2: self.max_pasid_log2, pri: self.pri, dirty_tracking: self.dirty_tracking };
        self.iommu.hw_info(features)
    }
}

/// Flags of Linux's selftest mock devices (`MOCK_FLAGS_DEVICE_*`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MockFlags {
    /// `MOCK_FLAGS_DEVICE_NO_DIRTY`: its IOMMU cannot track dirty pages, so
    /// `IOMMU_HWPT_ALLOC_DIRTY_TRACKING` fails for it (EOPNOTSUPP).
    pub no_dirty: bool,
    /// `MOCK_FLAGS_DEVICE_HUGE_IOVA`: its tables also have the mock's 1 MiB
    /// IO pages.
    pub huge_iova: bool,
    /// `MOCK_FLAGS_DEVICE_PASID`: it has a PASID capability
    /// [`MOCK_PASID_WIDTH`] bits wide.
    pub pasid: bool,
}

impl DeviceInfo {
    /// A device behind Linux's selftest mock IOMMU.
    pub fn mock(rid: u32, flags: MockFlags) -> Self {
        DeviceInfo {
            name: format!("mock{rid}"),
            rid,
            iommu: IommuModel::Selftest { huge: flags.huge_iova },
            aperture: MOCK_APERTURE,
            reserved: Vec::new(),
            max_pasid_log2: if flags.pasid { MOCK_PASID_WIDTH } else { 0 },
            // The mock device is not a PCI function.
            pasid_exec: false,
            pasid_priv: false,
            dirty_tracking: !flags.no_dirty,
            pri: false,
        }
    }
}

pub use crate::model::selftest::{MOCK_APERTURE, MOCK_DEV_CACHE_NUM};
/// PASID width of a PASID-capable mock device.
pub const MOCK_PASID_WIDTH: u8 = 20;
/// What each entry of a new mock device's cache holds (`IOMMU_TEST_DEV_CACHE_DEFAULT`).
pub const MOCK_DEV_CACHE_DEFAULT: u32 = 0xbaddad;
/// The PASID at which the mock's driver fakes a failure
/// (`IOMMU_TEST_PASID_RESERVED`), so its callers' error paths are seen.
pub const MOCK_PASID_FAKE_ERROR: u32 = 1024;
/// Most pages one page request group asks for.
pub const MAX_GROUP_PAGES: usize = 16;

/// Why a DMA did not complete.
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
pub enum DmaError {
    /// No table serves the RID or PASID (nothing attached, or a blocking
    /// domain): the IOMMU drops the DMA without a fault record.
    #[error("DMA blocked: the device is not attached to a page table")]
    Blocked,
    /// The IOMMU refused the access: where, why, tagged with which PASID
    /// (`None`: the RID), and which stage of the table refused it.
    #[error(
        "IOMMU fault at IOVA {iova:#x} ({reason:?}, {}){}, {stage:?} stage",
        if *.write { "write" } else { "read" },
        .pasid.map_or(String::new(), |p| format!(" at PASID {p}"))
    )]
    Fault {
        /// The IOVA (the device's address) that faulted.
        iova: u64,
        /// What the walk found wrong there.
        reason: FaultReason,
        /// Whether the DMA was a write.
        write: bool,
        /// The PASID the DMA was tagged with, as the device sent it.
        pasid: Option<u32>,
        /// Which stage of the serving table refused it.
        stage: Stage,
    },
    /// The table translated `iova`, but the host memory behind it was
    /// unmapped by its owner under the mapping (a user mapping torn down or
    /// a file truncated): what Linux would see as a bad page, not an IOMMU
    /// fault, so it is neither counted nor reported.
    #[error("the memory behind IOVA {iova:#x} is no longer mapped by its owner")]
    Memory {
        /// The IOVA whose memory was gone.
        iova: u64,
    },
}

/// Which stage of the table serving a DMA refused it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// A paging HWPT: the one stage there is.
    Single,
    /// A nested HWPT's stage 1, the guest's table or configuration.
    First,
    /// A nested HWPT's stage 2, the host's table under the guest's.
    Second,
}

impl Stage {
    /// The stage of `hwpt` that a fault for `reason` comes from.
    fn of(hwpt: &Hwpt, reason: FaultReason) -> Stage {
        match (hwpt, reason) {
            (Hwpt::Paging(_), _) => Stage::Single,
            (Hwpt::Nested(_), FaultReason::Stage2 { .. }) => Stage::Second,
            (Hwpt::Nested(_), _) => Stage::First,
        }
    }
}

static NEXT_KEY: AtomicU64 = AtomicU64::new(1);

/// What the RID is attached to, with the paging table's domain at hand so a
/// DMA's IOTLB hit reads no pointer more than it must.
struct Attached {
    hwpt: Hwpt,
    /// The domain of `hwpt` when it is a paging table.
    domain: Option<Arc<Domain>>,
}

/// A device bound to a context (Linux's `iommufd_device`, made by
/// [`Context::bind_device`]): what it is, which table serves its RID and
/// each PASID, and its DMA through them (see [`DmaPort`]). Shared as
/// `Arc<Device>`; DMA from any thread is safe against attach, replace and
/// unmap, which wait for DMA in flight before returning.
///
/// [`Context::bind_device`]: crate::Context::bind_device
pub struct Device {
    info: DeviceInfo,
    /// Identity for reservations, unique in the process.
    key: u64,
    /// Object ID in the context, as fault records name the device.
    id: OnceLock<u32>,
    /// The RID's table (what DMA without a PASID uses).
    attached: epoch::Rcu<Attached>,
    /// Tables attached per PASID, replaced whole on change so DMA reads
    /// them without a lock.
    pasids: epoch::Rcu<BTreeMap<u32, Hwpt>>,
    next_group: AtomicU32,
    unrecoverable: AtomicU64,
    /// PASIDs whose owner knows them by another number (a guest's vPASID
    /// behind a vIOMMU): host PASID → the PASID fault records carry.
    guest_pasids: Mutex<BTreeMap<u32, u32>>,
    /// The per-device cache of a selftest mock device; `None` otherwise.
    mock_cache: Option<Mutex<[u32; MOCK_DEV_CACHE_NUM]>>,
    /// The mock's driver fails its next setting of `MOCK_PASID_FAKE_ERROR`.
    mock_pasid_armed: AtomicBool,
}

impl Device {
    pub(crate) fn new(info: DeviceInfo) -> Self {
        let mock_cache = info.iommu.is_selftest().then(|| Mutex::new([MOCK_DEV_CACHE_DEFAULT; MOCK_DEV_CACHE_NUM]));
        Device {
            mock_cache,
            info,
            key: NEXT_KEY.fetch_add(1, Ordering::Relaxed),
            id: OnceLock::new(),
            attached: epoch::Rcu::new(None),
            pasids: epoch::Rcu::new(Some(Arc::new(BTreeMap::new()))),
            next_group: AtomicU32::new(0),
            unrecoverable: AtomicU64::new(0),
            guest_pasids: Mutex::new(BTreeMap::new()),
            mock_pasid_armed: AtomicBool::new(false),
        }
    }

    /// The mock driver's `set_dev_pasid` (Linux's selftest): at
    /// `MOCK_PASID_FAKE_ERROR` the first setting of a table succeeds and
    /// arms a failure, the next one fails with `ENOMEM` (a replace that
    /// must leave the old table in place), and blocking it disarms.
    pub(crate) fn mock_set_pasid(&self, pasid: u32, blocking: bool) -> crate::Result<()> {
        if !self.info.iommu.is_selftest() || pasid != MOCK_PASID_FAKE_ERROR {
            return Ok(());
        }
        if blocking {
            self.mock_pasid_armed.store(false, Ordering::Relaxed);
        } else if self.mock_pasid_armed.swap(false, Ordering::Relaxed) {
            return Err(crate::Error::NoMemory("the mock fakes a failure at this PASID"));
        } else {
            self.mock_pasid_armed.store(true, Ordering::Relaxed);
        }
        Ok(())
    }

    /// What the device was bound as.
    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    pub(crate) fn key(&self) -> u64 {
        self.key
    }

    /// The table attached at the RID (`None`: blocked), a snapshot that a
    /// concurrent attach may already have replaced.
    pub fn attached(&self) -> Option<Hwpt> {
        self.attached.load_full().map(|a| a.hwpt.clone())
    }

    /// The table attached at `pasid` (`None`: the RID's).
    pub fn attached_at(&self, pasid: Option<u32>) -> Option<Hwpt> {
        match pasid {
            None => self.attached(),
            Some(p) => self.pasids.load_full().and_then(|m| m.get(&p).cloned()),
        }
    }

    /// The table DMA tagged with `pasid` goes through (`None`: the RID's):
    /// the PASID's own attachment, or else an SMMUv3 STE at the RID, which
    /// covers every substream.
    pub fn serving(&self, pasid: Option<u32>) -> Option<Hwpt> {
        let rid = || self.attached().filter(Hwpt::covers_substreams);
        match pasid {
            None => self.attached(),
            Some(p) => self.pasids.load_full().and_then(|m| m.get(&p).cloned()).or_else(rid),
        }
    }

    /// `Hwpt::generation` of the table serving `pasid` ((0, 0): none), read
    /// without taking a reference, for caches to check on every use (the
    /// vm-memory port's, a back end's table in another process): it changes
    /// whenever a translation there may have.
    pub fn generation_at(&self, pasid: Option<u32>) -> (usize, u64) {
        self.generation_in(pasid, &epoch::pin())
    }

    /// The IOVA ranges whose translations at `pasid` may differ between
    /// its `generation_at` `old` and `new`; `None` when anything may have.
    pub fn changes_between(&self, pasid: Option<u32>, old: (usize, u64), new: (usize, u64)) -> Option<Vec<(u64, u64)>> {
        self.with_serving(pasid, &epoch::pin(), |h| h?.changes_between(old, new))
    }

    /// `generation_at` inside a section the caller already holds, so what
    /// it checks against the generation is read in the same section.
    #[inline]
    pub(crate) fn generation_in(&self, pasid: Option<u32>, guard: &epoch::Guard) -> (usize, u64) {
        self.with_serving(pasid, guard, |h| h.map_or((0, 0), Hwpt::generation))
    }

    /// Runs `f` on the table serving `pasid`, read under `guard` (no
    /// reference taken: this is on every DMA's path).
    #[inline]
    fn with_serving<R>(&self, pasid: Option<u32>, guard: &epoch::Guard, f: impl FnOnce(Option<&Hwpt>) -> R) -> R {
        let Some(p) = pasid else { return f(self.attached.load(guard).map(|a| &a.hwpt)) };
        if let Some(own) = self.pasids.load(guard).and_then(|m| m.get(&p)) {
            return f(Some(own));
        }
        f(self.attached.load(guard).map(|a| &a.hwpt).filter(|h| h.covers_substreams()))
    }

    /// Every table the device is attached to, the RID's first.
    pub fn attachments(&self) -> Vec<(Option<u32>, Hwpt)> {
        let rid = self.attached().map(|h| (None, h));
        let pasids = self.pasids.load_full().unwrap_or_default();
        rid.into_iter().chain(pasids.iter().map(|(&p, h)| (Some(p), h.clone()))).collect()
    }

    /// Whether `pasid` is one this device can issue.
    /// Whether the device can tag DMA with `pasid`.
    pub fn check_pasid(&self, pasid: u32) -> crate::Result<()> {
        if self.info.max_pasid_log2 == 0 {
            return Err(crate::Error::Invalid("the device has no PASID capability"));
        }
        if pasid == 0 || u64::from(pasid) >= 1u64 << self.info.max_pasid_log2 {
            return Err(crate::Error::Invalid("PASID outside the device's PASID width"));
        }
        Ok(())
    }

    /// `set_attached` for one PASID (`None`: the RID).
    pub(crate) fn set_attached_at(&self, pasid: Option<u32>, hwpt: Option<Hwpt>) -> Option<Hwpt> {
        let Some(p) = pasid else { return self.set_attached(hwpt) };
        let mut map = self.pasids.load_full().map(|m| (*m).clone()).unwrap_or_default();
        let old = match hwpt {
            Some(h) => map.insert(p, h),
            None => map.remove(&p),
        };
        self.pasids.replace(Some(Arc::new(map)));
        old
    }

    /// Switches the page table DMA uses and waits for DMA that still uses the
    /// old one, so the old one is unreachable when this returns.
    pub(crate) fn set_attached(&self, hwpt: Option<Hwpt>) -> Option<Hwpt> {
        let attached = hwpt.map(|hwpt| {
            let domain = match &hwpt {
                Hwpt::Paging(h) => Some(h.domain().clone()),
                Hwpt::Nested(_) => None,
            };
            Arc::new(Attached { hwpt, domain })
        });
        let old = self.attached.replace(attached);
        old.map(|a| a.hwpt.clone())
    }

    /// The IOTLB's answer for RID DMA of `len` bytes at `iova` within one
    /// page of a paging table, when it needs nothing more (see
    /// [`Domain::hit`]): two pointers from the device to the entry.
    #[inline(always)]
    fn hit(&self, iova: u64, len: usize, need: Perm, guard: &epoch::Guard) -> Option<Translated> {
        self.attached.load(guard)?.domain.as_ref()?.hit(iova, len, need)
    }

    /// The device's DMA port at `pasid` (`None`: its RID): the one path
    /// every DMA of the device takes.
    #[inline]
    pub fn port(&self, pasid: Option<u32>) -> DmaPort<'_> {
        DmaPort { device: self, pasid }
    }

    /// The smallest IO page of the device's IOMMU.
    fn granule(&self) -> u64 {
        1 << self.info.format().page_shift()
    }

    /// Device reads `buf.len()` bytes at `iova`; a page fault on a PRI
    /// device waits for its answer.
    #[inline]
    pub fn dma_read(&self, iova: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        self.port(None).read(iova, buf)
    }

    /// Device writes `buf` at `iova`; a page fault on a PRI device waits for
    /// its answer.
    #[inline]
    pub fn dma_write(&self, iova: u64, buf: &[u8]) -> Result<(), DmaError> {
        self.port(None).write(iova, buf)
    }

    /// `dma_read` tagged with `pasid`: through the table attached there.
    pub fn dma_read_pasid(&self, pasid: u32, iova: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        self.port(Some(pasid)).read(iova, buf)
    }

    /// `dma_write` tagged with `pasid`.
    pub fn dma_write_pasid(&self, pasid: u32, iova: u64, buf: &[u8]) -> Result<(), DmaError> {
        self.port(Some(pasid)).write(iova, buf)
    }

    /// `dma_read_pasid` asking for execute or privileged access too (see
    /// [`DmaPort::read_with`]).
    pub fn dma_read_pasid_with(&self, pasid: u32, iova: u64, buf: &mut [u8], attrs: DmaAttrs) -> Result<(), DmaError> {
        self.port(Some(pasid)).read_with(iova, buf, attrs)
    }

    /// `dma_write_pasid` with `attrs` (see [`DmaPort::read_with`]).
    pub fn dma_write_pasid_with(&self, pasid: u32, iova: u64, buf: &[u8], attrs: DmaAttrs) -> Result<(), DmaError> {
        self.port(Some(pasid)).write_with(iova, buf, attrs)
    }

    #[inline]
    fn sendable(&self, attrs: DmaAttrs) -> DmaAttrs {
        DmaAttrs { exec: attrs.exec && self.info.pasid_exec, privileged: attrs.privileged && self.info.pasid_priv }
    }

    /// `dma_read` that does not wait: a page fault returns the pending page
    /// request. Bytes before the fault are read; retry once it is answered.
    pub fn try_dma_read(&self, iova: u64, buf: &mut [u8]) -> Result<(), Stall> {
        self.port(None).try_read(iova, buf)
    }

    /// `dma_write` that does not wait (see `try_dma_read`).
    pub fn try_dma_write(&self, iova: u64, buf: &[u8]) -> Result<(), Stall> {
        self.port(None).try_write(iova, buf)
    }

    /// Faults that no page request could cover (no PRI, or no fault queue on
    /// the table): counted, not lost silently.
    pub fn unrecoverable_faults(&self) -> u64 {
        self.unrecoverable.load(Ordering::Relaxed)
    }

    /// Sends a page request group for the IO page holding `iova` and the
    /// pages up to `end` that miss too (at most `MAX_GROUP_PAGES`), if the
    /// device can and its table has a queue; returns where the answer will
    /// come. One group, so the owner maps them all before the DMA retries.
    fn page_request(
        &self,
        pasid: Option<u32>,
        iova: u64,
        end: u64,
        need: Perm,
        attrs: DmaAttrs,
    ) -> Option<Arc<Waiter>> {
        if !self.info.pri {
            return None;
        }
        let hwpt = self.serving(pasid)?;
        let queue = hwpt.fault()?;
        let mut perm = 0;
        if need.read {
            perm |= PERM_READ;
        }
        if need.write {
            perm |= PERM_WRITE;
        }
        perm |= attrs.perm_bits();
        let granule = self.granule();
        let first = iova & !(granule - 1);
        let guard = epoch::pin();
        let missing = (0..MAX_GROUP_PAGES as u64)
            .map(|i| first + i * granule)
            .take_while(|&page| page < end && page >= first)
            .filter(|&page| page == first || self.port(pasid).translate(page, need, &guard).is_err());
        let flags = if pasid.is_some() { PASID_VALID } else { 0 };
        // PCIe's page request group index is 9 bits.
        let grpid = self.next_group.fetch_add(1, Ordering::Relaxed) & 0x1ff;
        let (dev_id, reported) = (self.id(), pasid.map_or(0, |p| self.reported_pasid(p)));
        let mut requests: Vec<PageRequest> =
            missing.map(|addr| PageRequest { flags, dev_id, pasid: reported, grpid, perm, addr }).collect();
        drop(guard);
        requests.last_mut().expect("the faulting page").flags |= LAST_PAGE;
        let (group, waiter) = Group::awaited(requests);
        queue.report(group);
        Some(waiter)
    }

    /// Counts a fault no page request can resolve, and reports it to the
    /// guest when the table is a vIOMMU's with an event queue listening.
    fn unrecoverable(&self, pasid: Option<u32>, fault: DmaError, attrs: DmaAttrs) {
        self.unrecoverable.fetch_add(1, Ordering::Relaxed);
        if let Some(Hwpt::Nested(n)) = self.serving(pasid)
            && let Some(viommu) = n.viommu()
        {
            viommu.report_fault(self, pasid, fault, attrs);
        }
    }

    /// The PASID a fault at host `pasid` is reported with: the guest's
    /// number when the PASID was attached through a vIOMMU.
    pub(crate) fn reported_pasid(&self, pasid: u32) -> u32 {
        self.guest_pasids.lock().get(&pasid).copied().unwrap_or(pasid)
    }

    pub(crate) fn set_guest_pasid(&self, pasid: u32, vpasid: Option<u32>) {
        let mut map = self.guest_pasids.lock();
        match vpasid {
            Some(v) => map.insert(pasid, v),
            None => map.remove(&pasid),
        };
    }

    /// How this device's fault records at `pasid` are named, for aborting them.
    pub(crate) fn fault_origin(&self, pasid: Option<u32>) -> (u32, Option<u32>) {
        (self.id(), pasid.map(|p| self.reported_pasid(p)))
    }

    /// The cache of a selftest mock device (the device-side cache a mock
    /// vIOMMU's invalidation commands name by virtual ID); `None` for any
    /// other device.
    pub fn mock_cache(&self) -> Option<parking_lot::MutexGuard<'_, [u32; MOCK_DEV_CACHE_NUM]>> {
        self.mock_cache.as_ref().map(|c| c.lock())
    }

    /// The device's object ID in its context.
    pub fn id(&self) -> u32 {
        self.id.get().copied().unwrap_or(0)
    }

    pub(crate) fn set_id(&self, id: u32) {
        let _ = self.id.set(id);
    }
}

/// One device's DMA at one PASID (`None`: its RID), as the IOMMU sees it:
/// which table serves it is chosen on every access, so a port is cheap to
/// make and to keep. Every DMA takes [`DmaPort::access`]: a fault there is
/// counted, becomes a page request on a PRI device (or a vEVENTQ record
/// where a vIOMMU has one), and reaches the caller as a [`DmaError`].
#[derive(Clone, Copy)]
pub struct DmaPort<'a> {
    device: &'a Device,
    pasid: Option<u32>,
}

impl<'a> DmaPort<'a> {
    /// The device whose DMA this port carries.
    pub fn device(&self) -> &'a Device {
        self.device
    }

    /// The PASID the port's DMA is tagged with (`None`: untagged, the RID).
    pub fn pasid(&self) -> Option<u32> {
        self.pasid
    }

    /// Where `iova` lands for an access needing `need`, valid to the end of
    /// its IO page; the caller must stay inside `guard` while using it. A
    /// look only: a fault here is neither counted nor reported (DMA goes
    /// through [`DmaPort::access`]).
    #[inline(always)]
    pub fn translate(&self, iova: u64, need: Perm, guard: &epoch::Guard) -> Result<Translated, DmaError> {
        let pasid = self.pasid;
        // The RID's table without the PASID map: the common case, kept short.
        if pasid.is_none() {
            return resolve(self.device.attached.load(guard).map(|a| &a.hwpt), iova, need, pasid, guard);
        }
        self.device.with_serving(pasid, guard, |hwpt| resolve(hwpt, iova, need, pasid, guard))
    }

    /// Device reads `buf.len()` bytes at `iova`; a page fault on a PRI
    /// device waits for its answer.
    #[inline]
    pub fn read(&self, iova: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        let len = buf.len();
        self.access(Perm::R, DmaAttrs::default(), iova, len, true, |t, r| memory::read(t.trust, t.host.0, &mut buf[r]))
            .map_err(Stall::into_error)
    }

    /// Device writes `buf` at `iova`; a page fault on a PRI device waits for
    /// its answer.
    #[inline]
    pub fn write(&self, iova: u64, buf: &[u8]) -> Result<(), DmaError> {
        self.access(Perm::W, DmaAttrs::default(), iova, buf.len(), true, |t, r| {
            memory::write(t.trust, t.host.0, &buf[r])
        })
        .map_err(Stall::into_error)
    }

    /// `read` asking for execute or privileged access too, as far as the
    /// device's PASID capability lets it ask (the bits it does not enable
    /// are never sent).
    #[inline]
    pub fn read_with(&self, iova: u64, buf: &mut [u8], attrs: DmaAttrs) -> Result<(), DmaError> {
        let (len, attrs) = (buf.len(), self.device.sendable(attrs));
        self.access(Perm::R, attrs, iova, len, true, |t, r| memory::read(t.trust, t.host.0, &mut buf[r]))
            .map_err(Stall::into_error)
    }

    /// `write` with `attrs` (see `read_with`).
    #[inline]
    pub fn write_with(&self, iova: u64, buf: &[u8], attrs: DmaAttrs) -> Result<(), DmaError> {
        let attrs = self.device.sendable(attrs);
        self.access(Perm::W, attrs, iova, buf.len(), true, |t, r| memory::write(t.trust, t.host.0, &buf[r]))
            .map_err(Stall::into_error)
    }

    /// `read` that does not wait: a page fault returns the pending page
    /// request. Bytes before the fault are read; retry once it is answered.
    pub fn try_read(&self, iova: u64, buf: &mut [u8]) -> Result<(), Stall> {
        let len = buf.len();
        self.access(Perm::R, DmaAttrs::default(), iova, len, false, |t, r| memory::read(t.trust, t.host.0, &mut buf[r]))
    }

    /// `write` that does not wait (see `try_read`).
    pub fn try_write(&self, iova: u64, buf: &[u8]) -> Result<(), Stall> {
        self.access(Perm::W, DmaAttrs::default(), iova, buf.len(), false, |t, r| {
            memory::write(t.trust, t.host.0, &buf[r])
        })
    }

    /// The one DMA primitive: `len` bytes at `iova` needing `need`, one IO
    /// page at a time; `each` gets where each piece lands and its range of
    /// the access, inside the epoch section that keeps that memory mapped.
    /// A miss on a device with PRI, attached to a HWPT with a fault queue,
    /// becomes a page request; unless `wait` is false, the DMA waits for the
    /// answer (outside its epoch section, so the handler may unmap) and then
    /// retries, or fails if it was refused. Any other fault is counted and
    /// reported to the vIOMMU's event queue, if any.
    #[inline(always)]
    pub fn access(
        &self,
        need: Perm,
        attrs: DmaAttrs,
        iova: u64,
        len: usize,
        wait: bool,
        mut each: impl FnMut(Translated, std::ops::Range<usize>) -> crate::Result<()>,
    ) -> Result<(), Stall> {
        let guard = epoch::pin();
        // The common case first: the RID's paging table, one page, an IOTLB
        // hit. Everything else (and every fault) takes the loop below.
        if self.pasid.is_none()
            && let Some(t) = self.device.hit(iova, len, need, &guard)
        {
            return each(t, 0..len).map_err(|_| Stall::Failed(DmaError::Memory { iova }));
        }
        self.access_pages(need, attrs, iova, len, wait, each, guard)
    }

    /// `access` page by page, faults included.
    #[inline(never)]
    #[allow(clippy::too_many_arguments)]
    fn access_pages(
        &self,
        need: Perm,
        attrs: DmaAttrs,
        iova: u64,
        len: usize,
        wait: bool,
        mut each: impl FnMut(Translated, std::ops::Range<usize>) -> crate::Result<()>,
        mut guard: epoch::Guard,
    ) -> Result<(), Stall> {
        let mut done = 0usize;
        let mut retries = 0;
        while done < len {
            let at = iova.wrapping_add(done as u64);
            match self.translate(at, need, &guard) {
                Ok(t) => {
                    let n = chunk(at, len - done, self.device.granule());
                    each(t, done..done + n).map_err(|_| Stall::Failed(DmaError::Memory { iova: at }))?;
                    done += n;
                    retries = 0;
                }
                Err(e) => {
                    // Outside the epoch section, so a handler may unmap.
                    drop(guard);
                    let end = iova.saturating_add(len as u64);
                    self.fault(e, need, attrs, at, end, wait, &mut retries)?;
                    guard = epoch::pin();
                }
            }
        }
        Ok(())
    }

    /// What a DMA does about fault `e` at `at`: `Ok` to retry the page
    /// once a page request was answered with success (at most
    /// `MAX_RETRIES` times in a row), or how it stops. Kept out of line, off
    /// the path of DMA that does not fault.
    #[cold]
    #[allow(clippy::too_many_arguments)]
    fn fault(
        &self,
        e: DmaError,
        need: Perm,
        attrs: DmaAttrs,
        at: u64,
        end: u64,
        wait: bool,
        retries: &mut u32,
    ) -> Result<(), Stall> {
        let (device, pasid) = (self.device, self.pasid);
        match e {
            DmaError::Fault { reason: FaultReason::NotPresent | FaultReason::Permission, .. } => {
                let Some(waiter) = device.page_request(pasid, at, end, need, attrs) else {
                    device.unrecoverable(pasid, e, attrs);
                    return Err(Stall::Failed(e));
                };
                if !wait {
                    return Err(Stall::PageRequest(Pending { waiter, fault: e }));
                }
                // A handler that answers "success" without mapping gets a
                // few more requests, then the DMA gives up.
                if waiter.wait() != Response::Success || *retries == MAX_RETRIES {
                    return Err(Stall::Failed(e));
                }
                *retries += 1;
                Ok(())
            }
            DmaError::Fault { .. } => {
                device.unrecoverable(pasid, e, attrs);
                Err(Stall::Failed(e))
            }
            DmaError::Blocked | DmaError::Memory { .. } => Err(Stall::Failed(e)),
        }
    }
}

/// Why a non-waiting DMA stopped.
#[derive(Debug)]
pub enum Stall {
    /// It failed, as a waiting DMA would have.
    Failed(DmaError),
    /// It faulted and asked for the page; the answer comes on `Pending`.
    PageRequest(Pending),
}

impl Stall {
    /// The error a DMA that waits would have returned.
    pub fn into_error(self) -> DmaError {
        match self {
            Stall::Failed(e) | Stall::PageRequest(Pending { fault: e, .. }) => e,
        }
    }
}

/// A page request a DMA made, not yet answered.
#[derive(Debug)]
pub struct Pending {
    waiter: Arc<Waiter>,
    fault: DmaError,
}

impl Pending {
    /// The fault that made the request.
    pub fn fault(&self) -> DmaError {
        self.fault
    }

    /// The answer, once it came.
    pub fn answered(&self) -> Option<Response> {
        self.waiter.answered()
    }

    /// Blocks for the answer; on `Success`, retry the DMA.
    pub fn wait(&self) -> Response {
        self.waiter.wait()
    }
}

/// Answers of "success" a DMA accepts for one page before it gives up.
const MAX_RETRIES: u32 = 8;

/// Translates through `hwpt`, the table serving a DMA tagged with `pasid`,
/// naming a fault as the caller sees it.
#[inline(always)]
fn resolve(
    hwpt: Option<&Hwpt>,
    iova: u64,
    need: Perm,
    pasid: Option<u32>,
    guard: &epoch::Guard,
) -> Result<Translated, DmaError> {
    let hwpt = hwpt.ok_or(DmaError::Blocked)?;
    hwpt.translate(iova, need, pasid, guard).map_err(|reason| DmaError::Fault {
        iova,
        reason,
        write: need.write,
        pasid,
        stage: Stage::of(hwpt, reason),
    })
}

/// Bytes from `iova` to the end of its IO page of `granule` bytes, at most `left`.
fn chunk(iova: u64, left: usize, granule: u64) -> usize {
    ((granule - iova % granule) as usize).min(left)
}
