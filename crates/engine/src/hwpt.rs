//! Hardware page tables. A paging HWPT owns a [`Domain`]: a page table in a
//! real format that mirrors every mapping of its IOAS, with the IOTLB that
//! caches its translations.
//!
//! `device`, `hwpt` and `viommu` import each other, and only each other,
//! because the objects point at each other: a device is attached to HWPTs,
//! a nested HWPT sits on a vIOMMU that takes its faults, and a vIOMMU names
//! its devices by virtual ID. Linux's iommufd has the same triangle
//! (`device.c`, `hw_pagetable.c` and `viommu.c` share one private header).

use std::sync::Arc;

use crate::epoch::Guard;

pub use crate::domain::{ConfigFault, Domain, FaultReason, Gpa, HostAddr, PageFormat, Translated};
use crate::fault::FaultQueue;
use crate::ioas::Ioas;
use crate::iotlb::{Hit, Iotlb};
use crate::iova::IovaRange;
use crate::model::GuestTables;
pub use crate::model::{NestedData, WalkStep};
use crate::pgtable::Perm;

/// Flags a paging HWPT was allocated with.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HwptFlags {
    /// `IOMMU_HWPT_ALLOC_NEST_PARENT`: a stage 2 that nested HWPTs and
    /// vIOMMUs may be built on.
    pub nest_parent: bool,
    /// `IOMMU_HWPT_ALLOC_DIRTY_TRACKING`: its domain can track dirty pages;
    /// refused (EOPNOTSUPP) for a device whose IOMMU cannot.
    pub dirty_tracking: bool,
}

/// How a HWPT may be shared between a device's RID and its PASIDs.
///
/// Linux (7.3) lets a PASID attach only to a table allocated with
/// `IOMMU_HWPT_ALLOC_PASID`, and only while the device's RID is on such a
/// table too; and a RID may not move to a table without the flag while
/// PASIDs are attached. The uAPI chooses per table; the engine's typed API
/// makes PASID-compatible tables, which its own PASID users (the vPASID
/// extension, VMMs) attach freely.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum PasidUse {
    /// `IOMMU_HWPT_ALLOC_PASID`: PASIDs and the RID alike.
    #[default]
    Compatible,
    /// A uAPI table without the flag: the RID only, and not beside PASIDs.
    RidOnly,
}

/// A paging HWPT: a domain attached to an IOAS, which fills it.
pub struct HwptPaging {
    domain: Arc<Domain>,
    ioas: Arc<Ioas>,
    flags: HwptFlags,
    pasid_use: PasidUse,
    /// Where page requests on this table go.
    fault: Option<Arc<FaultQueue>>,
    /// Created by attaching a device to an IOAS, and destroyed with the last
    /// such attachment.
    auto: bool,
}

impl HwptPaging {
    /// Creates a domain and adds it to `ioas`, which maps everything into it.
    pub(crate) fn new(
        ioas: Arc<Ioas>,
        format: PageFormat,
        aperture: IovaRange,
        flags: HwptFlags,
        auto: bool,
        fault: Option<Arc<FaultQueue>>,
    ) -> crate::Result<Arc<HwptPaging>> {
        crate::inject::check("domain")?;
        let domain = Arc::new(Domain::with_dirty(format, aperture, flags.dirty_tracking));
        ioas.add_domain(&domain)?;
        Ok(Arc::new(HwptPaging { domain, ioas, flags, pasid_use: PasidUse::Compatible, fault, auto }))
    }

    /// Its page table, which mirrors every mapping of [`HwptPaging::ioas`].
    pub fn domain(&self) -> &Arc<Domain> {
        &self.domain
    }

    /// The IOAS it was allocated on and whose mappings fill it.
    pub fn ioas(&self) -> &Arc<Ioas> {
        &self.ioas
    }

    /// A new table's choice, made before anyone else can see it.
    pub(crate) fn with_pasid_use(mut self: Arc<Self>, pasid_use: PasidUse) -> Arc<Self> {
        Arc::get_mut(&mut self).expect("a new table").pasid_use = pasid_use;
        self
    }

    pub(crate) fn is_auto(&self) -> bool {
        self.auto
    }

    /// `IOMMU_HWPT_SET_DIRTY_TRACKING`.
    pub fn set_dirty_tracking(&self, enable: bool) -> crate::Result<()> {
        self.ioas.set_dirty_tracking(&self.domain, enable)?;
        if enable {
            // A back end in another process may hold writable translations
            // made while writes were not tracked: they must go, and only
            // once tracking is on, so none is made again without it.
            self.domain.invalidate_iotlb();
            crate::epoch::synchronize_external();
        }
        Ok(())
    }

    /// `IOMMU_HWPT_GET_DIRTY_BITMAP`: reports dirty leaves in `range`, which
    /// must be mapped without a hole.
    pub fn read_and_clear_dirty(
        &self,
        range: IovaRange,
        keep: bool,
        record: &mut dyn FnMut(u64, u64),
    ) -> crate::Result<()> {
        if !self.domain.dirty_capable() {
            return Err(crate::Error::Unsupported("HWPT was not allocated with dirty tracking"));
        }
        if !self.domain.dirty_tracking() {
            return Err(crate::Error::Invalid("dirty tracking is off"));
        }
        let r = self.ioas.read_and_clear_dirty(&self.domain, range, keep, record);
        if !keep {
            // A back end in another process must not keep writing through a
            // translation that predates the clear: its writes would go
            // unrecorded.
            crate::epoch::synchronize_external();
        }
        r
    }

    /// Detaches the domain from its IOAS; called when the object is destroyed.
    pub(crate) fn release(&self) {
        self.ioas.remove_domain(&self.domain);
    }
}

/// A nested HWPT: a user-owned stage 1 over a paging HWPT's stage 2.
pub struct HwptNested {
    parent: Arc<HwptPaging>,
    data: NestedData,
    fault: Option<Arc<FaultQueue>>,
    /// The vIOMMU it was allocated on, kept alive (and busy) by it.
    viommu: Option<Arc<crate::viommu::Viommu>>,
    pasid_use: PasidUse,
}

impl HwptNested {
    /// The paging HWPT it nests over: stage 2, which translates every
    /// guest-physical address stage 1 produces or holds.
    pub fn parent(&self) -> &Arc<HwptPaging> {
        &self.parent
    }

    /// The vIOMMU it was allocated on (`None`: allocated on a paging HWPT
    /// directly); faults on it become that vIOMMU's event records.
    pub fn viommu(&self) -> Option<&Arc<crate::viommu::Viommu>> {
        self.viommu.as_ref()
    }

    /// Drops every cached translation (the guest changed its stage 1).
    pub fn invalidate(&self) {
        if let Some(iotlb) = self.data.iotlb() {
            iotlb.invalidate_all();
        }
    }

    /// Translates through both stages: each stage-1 entry is read through
    /// stage 2, rights are intersected, and the combined result is cached
    /// until either stage is invalidated. `ssid` is the DMA's substream
    /// (PASID): an SMMUv3 STE picks the guest's context descriptor by it,
    /// and treats a transaction without one apart from one with substream
    /// 0; VT-d stage-1 tables have one per PASID attachment, so they ignore it.
    pub fn translate(
        &self,
        iova: u64,
        need: Perm,
        ssid: Option<u32>,
        guard: &Guard,
    ) -> Result<Translated, FaultReason> {
        let Some(iotlb) = self.data.iotlb() else {
            return Err(FaultReason::NotPresent);
        };
        let ssid = if self.data.covers_substreams() { ssid } else { None };
        // Cached per substream: its ID plus one (0: none) above the page
        // number, which is below 2^36 for the 48-bit inputs stage 1 takes.
        if iova >> 48 != 0 {
            return Err(FaultReason::NotPresent);
        }
        let s2 = &self.parent.domain;
        let tag = iova >> 12 | ssid.map_or(0, |s| u64::from(s) + 1) << 36;
        let offset = iova & 0xfff;
        // Both generations only grow, so their sum changes when either does.
        let generation = iotlb.generation() + s2.iotlb_generation();
        if let Some(hit) = iotlb.lookup_at(tag, generation)
            && hit.perm.allows(need)
        {
            return Ok(Translated { host: HostAddr(hit.host_page + offset), trust: hit.trust });
        }
        // A miss, or rights the cached combination lacks: walk, so the fault
        // names the stage that denies it.
        let (gpa, perm) = self.data.walk(iova, ssid, &mut GuestTables::new(s2, guard, None))?;
        if !perm.allows(need) {
            return Err(FaultReason::Permission);
        }
        let t = s2.translate(gpa.0, need, guard).map_err(|r| stage2(gpa, r))?;
        let s2perm = s2.perm_of(gpa.0, guard).unwrap_or_default();
        let combined = Perm { read: perm.read && s2perm.read, write: perm.write && s2perm.write };
        // Writes through a dirty-tracking stage 2 must reach it.
        if !s2.dirty_tracking() {
            let hit = Hit { host_page: t.host.0 - offset, perm: combined, trust: t.trust, dirty: false };
            iotlb.fill(tag, generation, hit);
        }
        Ok(t)
    }

    /// The two-dimensional walk of `iova`, step by step (no IOTLB), for
    /// people: where each stage-1 entry was read and what it said, then where
    /// the final guest-physical address lands in host memory.
    pub fn trace(&self, iova: u64) -> (Vec<WalkStep>, Result<HostAddr, FaultReason>) {
        let guard = crate::epoch::pin();
        let mut steps = Vec::new();
        let mut step = |s| steps.push(s);
        let walked = self.data.walk(iova, None, &mut GuestTables::new(&self.parent.domain, &guard, Some(&mut step)));
        let result = walked.and_then(|(gpa, _)| {
            let t = self.parent.domain.translate(gpa.0, Perm::default(), &guard).map_err(|r| stage2(gpa, r))?;
            Ok(t.host)
        });
        (steps, result)
    }

    /// The guest's stage-1 configuration it was allocated with (the
    /// vendor's `IOMMU_HWPT_DATA_*` contents).
    pub fn data(&self) -> &NestedData {
        &self.data
    }
}

fn stage2(gpa: Gpa, r: FaultReason) -> FaultReason {
    FaultReason::Stage2 { gpa: gpa.0, permission: r == FaultReason::Permission }
}

/// A HWPT a device can attach to.
#[derive(Clone)]
pub enum Hwpt {
    /// A single-stage table filled from an IOAS.
    Paging(Arc<HwptPaging>),
    /// A guest's stage 1 over a paging HWPT's stage 2.
    Nested(Arc<HwptNested>),
}

impl Hwpt {
    /// The IOAS whose mappings back this table (the parent's, when nested).
    pub fn ioas(&self) -> &Arc<Ioas> {
        match self {
            Hwpt::Paging(h) => &h.ioas,
            Hwpt::Nested(n) => &n.parent.ioas,
        }
    }

    /// The fault queue its page requests go to (`IOMMU_HWPT_FAULT_ID_VALID`
    /// at allocation); `None`: faults on it are unrecoverable.
    pub fn fault(&self) -> Option<&Arc<FaultQueue>> {
        match self {
            Hwpt::Paging(h) => h.fault.as_ref(),
            Hwpt::Nested(n) => n.fault.as_ref(),
        }
    }

    /// The format of the table a device attached here walks last.
    pub fn format(&self) -> PageFormat {
        match self {
            Hwpt::Paging(h) => h.domain.format(),
            Hwpt::Nested(n) => n.parent.domain.format(),
        }
    }

    pub(crate) fn pasid_use(&self) -> PasidUse {
        match self {
            Hwpt::Paging(h) => h.pasid_use,
            Hwpt::Nested(n) => n.pasid_use,
        }
    }

    pub(crate) fn dirty_capable(&self) -> bool {
        match self {
            Hwpt::Paging(h) => h.domain.dirty_capable(),
            Hwpt::Nested(_) => false,
        }
    }

    /// Whether DMA writes through it are being recorded as dirty (the
    /// stage-2 table's tracking, when nested).
    pub fn dirty_tracking(&self) -> bool {
        match self {
            Hwpt::Paging(h) => h.domain.dirty_tracking(),
            Hwpt::Nested(n) => n.parent.domain.dirty_tracking(),
        }
    }

    /// Whether both name the same HWPT object (not merely equal contents).
    pub fn is_same(&self, other: &Hwpt) -> bool {
        match (self, other) {
            (Hwpt::Paging(a), Hwpt::Paging(b)) => Arc::ptr_eq(a, b),
            (Hwpt::Nested(a), Hwpt::Nested(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }

    /// Changes whenever a translation through this table may have changed:
    /// the table's identity and its IOTLB generations (both stages, nested).
    pub fn generation(&self) -> (usize, u64) {
        match self {
            Hwpt::Paging(h) => (Arc::as_ptr(&h.domain) as usize, h.domain.iotlb_generation()),
            Hwpt::Nested(n) => {
                let own = n.data.iotlb().map_or(0, Iotlb::generation);
                (Arc::as_ptr(n) as usize, own + n.parent.domain.iotlb_generation())
            }
        }
    }

    /// The IOVA ranges whose translations may differ between its
    /// `generation` `old` and `new`; `None` when anything may have (the
    /// table is another, a nested one, or not every change was ranged).
    pub fn changes_between(&self, old: (usize, u64), new: (usize, u64)) -> Option<Vec<(u64, u64)>> {
        match self {
            Hwpt::Paging(h) if old.0 == new.0 && new.0 == Arc::as_ptr(&h.domain) as usize => {
                h.domain.changes_between(old.1, new.1)
            }
            _ => None,
        }
    }

    /// Translates `iova` for an access needing `need`, tagged with
    /// `pasid` (a nested SMMUv3 table chooses the substream by it).
    #[inline]
    pub fn translate(
        &self,
        iova: u64,
        need: Perm,
        pasid: Option<u32>,
        guard: &Guard,
    ) -> Result<Translated, FaultReason> {
        match self {
            Hwpt::Paging(h) => h.domain.translate(iova, need, guard),
            Hwpt::Nested(n) => n.translate(iova, need, pasid, guard),
        }
    }

    /// Whether DMA with any PASID goes through this table when it is
    /// attached to the RID (an SMMUv3 STE covers all of a stream's
    /// substreams, choosing among the guest's context descriptors).
    pub fn covers_substreams(&self) -> bool {
        matches!(self, Hwpt::Nested(n) if n.data.covers_substreams())
    }
}

impl HwptPaging {
    /// `EINVAL` unless nested HWPTs may be built on this one.
    pub fn check_nest_parent(&self) -> crate::Result<()> {
        if self.auto || !self.flags.nest_parent || self.fault.is_some() {
            return Err(crate::Error::Invalid("parent HWPT cannot be a nesting parent"));
        }
        Ok(())
    }

    /// A nested HWPT over this one, which must have been allocated as a
    /// nesting parent and not be an automatic or faulting one.
    pub(crate) fn nest(
        self: &Arc<Self>,
        data: NestedData,
        fault: Option<Arc<FaultQueue>>,
        viommu: Option<Arc<crate::viommu::Viommu>>,
        pasid_use: PasidUse,
    ) -> crate::Result<Arc<HwptNested>> {
        self.check_nest_parent()?;
        crate::inject::check("nested HWPT")?;
        let nested = Arc::new(HwptNested { parent: self.clone(), data, fault, viommu, pasid_use });
        if let Some(v) = &nested.viommu {
            v.add_nested(&nested);
        }
        Ok(nested)
    }
}
