//! Hardware page tables. A paging HWPT owns a [`Domain`]: a page table in a
//! real format that mirrors every mapping of its IOAS, with the IOTLB that
//! caches its translations.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crossbeam_epoch::Guard;

use crate::fault::FaultQueue;
use crate::ioas::Ioas;
use crate::iotlb::{Hit, Iotlb};
use crate::iova::IovaRange;
use crate::memory::Trust;
pub use crate::model::NestedData;
use crate::pgtable::amd::AmdV1Mode4;
use crate::pgtable::arm::{ArmS1, ArmS2};
use crate::pgtable::mock::{Mock, MockPt};
use crate::pgtable::x86::{VtdSs4, VtdSs5};
use crate::pgtable::{self, Format, PageTable, Perm, Summary};

/// Every page-table format a domain can use, listed once. Each becomes a
/// `PageFormat` variant, an `AnyTable` variant holding its `PageTable`, and
/// an arm of `with_format!` and `with_table!`, which run code with the
/// format's type bound, so the walk is specialised per format. (`$d` hands
/// a `$` to the macros this one defines.)
macro_rules! formats {
    ($d:tt $($(#[$doc:meta])* $name:ident: $ty:ty),* $(,)?) => {
        /// The page-table formats a domain can use.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum PageFormat {
            $($(#[$doc])* $name,)*
        }

        enum AnyTable {
            $($name(PageTable<$ty>),)*
        }

        impl AnyTable {
            fn new(format: PageFormat) -> Self {
                match format {
                    $(PageFormat::$name => AnyTable::$name(PageTable::new()),)*
                }
            }
        }

        /// Runs `$body` with `$F` bound to the format type of `$format`.
        macro_rules! with_format {
            ($d format:expr, $d F:ident => $d body:expr) => {
                match $d format {
                    $(PageFormat::$name => {
                        type $d F = $ty;
                        $d body
                    })*
                }
            };
        }

        /// Runs `$body` with `$pt` bound to the typed table inside `$t`.
        macro_rules! with_table {
            ($d t:expr, $d pt:ident => $d body:expr) => {
                match $d t {
                    $(AnyTable::$name($d pt) => $d body,)*
                }
            };
        }
    };
}

formats! {$
    VtdSs4: VtdSs4,
    VtdSs5: VtdSs5,
    /// Linux's selftest mock IOMMU: 2 KiB IO pages.
    Mock: Mock<false>,
    /// The mock with 1 MiB huge pages too (`MOCK_IOMMUPT_HUGE`).
    MockHuge: Mock<true>,
    /// The 7.3 mock's default table: leaves of whole CPU pages and up
    /// (`MOCK_IOMMUPT_DEFAULT`).
    MockPt: MockPt,
    /// AMD-Vi v1, Mode 4.
    AmdV1: AmdV1Mode4,
    /// Arm VMSAv8-64 with 4 KiB granules, stage 1 and stage 2.
    ArmS1: ArmS1,
    ArmS2: ArmS2,
}

impl PageFormat {
    pub fn name(self) -> &'static str {
        with_format!(self, F => F::NAME)
    }

    pub fn pgsize_bitmap(self) -> u64 {
        with_format!(self, F => pgtable::pgsize_bitmap::<F>())
    }

    pub fn iova_bits(self) -> u32 {
        with_format!(self, F => F::iova_bits())
    }

    /// log2 of the smallest IO page.
    pub fn page_shift(self) -> u32 {
        with_format!(self, F => F::PAGE_SHIFT)
    }

    pub fn is_mock(self) -> bool {
        matches!(self, PageFormat::Mock | PageFormat::MockHuge | PageFormat::MockPt)
    }
}

/// Why a translation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultReason {
    /// The IOVA is outside the domain's aperture.
    Aperture,
    /// No leaf maps the IOVA (in a nested table: the stage-1 walk found none).
    NotPresent,
    /// A leaf maps it without the needed right.
    Permission,
    /// Nested: stage 2 does not map guest-physical address `gpa` (a stage-1
    /// table or the final page) with the rights needed.
    Stage2 { gpa: u64, permission: bool },
    /// Nested: the guest's stage-1 leaf has its access flag clear (an
    /// SMMUv3 `F_ACCESS`).
    AccessFlag,
    /// Nested: the guest's configuration for the stream (an SMMUv3 STE or
    /// CD) does not let the transaction be translated.
    Config(ConfigFault),
}

/// The guest configuration errors of a nested SMMUv3 stream, named as its
/// event records name them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigFault {
    /// The STE's Config aborts the stream: refused, with no event.
    Abort,
    /// `C_BAD_STE`: the STE is not valid, or ILLEGAL.
    BadSte,
    /// `F_STREAM_DISABLED`: no substream, and the STE takes only substreams.
    StreamDisabled,
    /// `C_BAD_SUBSTREAMID`: no context descriptor for the substream.
    BadSubstream,
    /// `C_BAD_CD`: the context descriptor is not valid or not walkable.
    BadCd,
}

/// An I/O page table and its IOTLB (Linux's `iommu_domain`).
pub struct Domain {
    table: AnyTable,
    iotlb: Iotlb,
    format: PageFormat,
    aperture: IovaRange,
    /// Allocated with dirty tracking support (has Linux's `dirty_ops`).
    dirty_capable: bool,
    /// Dirty tracking is on: writes set the leaves' dirty bits.
    tracking: AtomicBool,
}

impl Domain {
    pub fn new(format: PageFormat, aperture: IovaRange) -> Self {
        Self::with_dirty(format, aperture, false)
    }

    pub fn with_dirty(format: PageFormat, aperture: IovaRange, dirty_capable: bool) -> Self {
        let table = AnyTable::new(format);
        let max = (1u128 << format.iova_bits()) - 1;
        let aperture = IovaRange::new(aperture.start, aperture.last.min(max as u64));
        Domain { table, iotlb: Iotlb::new(), format, aperture, dirty_capable, tracking: AtomicBool::new(false) }
    }

    pub fn format(&self) -> PageFormat {
        self.format
    }

    pub fn aperture(&self) -> IovaRange {
        self.aperture
    }

    pub fn pgsize_bitmap(&self) -> u64 {
        self.format.pgsize_bitmap()
    }

    pub(crate) fn map(
        &self,
        iova: u64,
        addr: u64,
        len: u64,
        perm: Perm,
        checked: bool,
        huge: bool,
    ) -> crate::Result<()> {
        with_table!(&self.table, pt => pt.map(iova, addr, len, perm, checked, huge))
    }

    /// Clears the range and invalidates the IOTLB. The caller must wait for
    /// readers (`crate::epoch::synchronize`) before the memory goes away.
    pub(crate) fn unmap(&self, iova: u64, len: u64, guard: &Guard) {
        with_table!(&self.table, pt => pt.unmap(iova, len, guard));
        self.iotlb.invalidate_all();
    }

    pub fn dirty_capable(&self) -> bool {
        self.dirty_capable
    }

    pub fn dirty_tracking(&self) -> bool {
        self.tracking.load(Ordering::Acquire)
    }

    fn set_dirty(&self, iova: u64, guard: &Guard) -> bool {
        with_table!(&self.table, pt => pt.set_dirty(iova, guard))
    }

    /// Marks the leaf mapping `iova` dirty as a device write would; false
    /// when nothing maps it.
    pub fn mark_dirty(&self, iova: u64) -> bool {
        let guard = crate::epoch::pin();
        self.set_dirty(iova, &guard)
    }

    /// Turns dirty tracking on (starting from clean leaves) or off.
    pub(crate) fn set_dirty_tracking(&self, enable: bool, mapped: &[IovaRange]) -> crate::Result<()> {
        if !self.dirty_capable {
            return Err(crate::Error::Unsupported("HWPT was not allocated with dirty tracking"));
        }
        if enable && !self.dirty_tracking() {
            for r in mapped {
                self.read_and_clear_dirty(*r, false, &mut |_, _| {});
            }
        }
        self.tracking.store(enable, Ordering::Release);
        Ok(())
    }

    /// Reports dirty leaves in `range` and, unless `keep`, cleans them; the
    /// IOTLB forgets them so the next write marks them again.
    pub(crate) fn read_and_clear_dirty(&self, range: IovaRange, keep: bool, record: &mut dyn FnMut(u64, u64)) {
        with_table!(&self.table, pt => pt.read_and_clear_dirty(range.start, range.last, keep, record));
        if !keep {
            self.iotlb.invalidate_all();
        }
    }

    pub fn summary(&self) -> Summary {
        with_table!(&self.table, pt => pt.summary())
    }

    pub(crate) fn iotlb_generation(&self) -> u64 {
        self.iotlb.generation()
    }

    /// The rights the leaf mapping `iova` grants.
    fn perm_of(&self, iova: u64, guard: &Guard) -> Option<Perm> {
        if let Some(hit) = self.iotlb.lookup(iova >> self.format.page_shift()) {
            return Some(hit.perm);
        }
        with_table!(&self.table, pt => pt.walk(iova, guard)).map(|t| t.perm)
    }

    /// Where `iova` leads, whatever the rights (what hardware would fetch).
    pub fn lookup(&self, iova: u64) -> Option<u64> {
        let guard = crate::epoch::pin();
        with_table!(&self.table, pt => pt.walk(iova, &guard)).map(|t| t.addr)
    }

    /// Translates the IO page holding `iova` for an access needing `need`.
    /// Returns the host address of `iova` and whether it needs checked copies.
    #[inline]
    pub fn translate(&self, iova: u64, need: Perm, guard: &Guard) -> Result<(u64, bool), FaultReason> {
        let shift = self.format.page_shift();
        let page = iova >> shift;
        let offset = iova & ((1 << shift) - 1);
        if let Some(hit) = self.iotlb.lookup(page) {
            let must_dirty = need.write && !hit.dirty && self.tracking.load(Ordering::Relaxed);
            if !hit.perm.allows(need) {
                return Err(FaultReason::Permission);
            }
            if !must_dirty {
                return Ok((hit.host_page + offset, hit.checked));
            }
        }
        if iova < self.aperture.start || iova > self.aperture.last {
            return Err(FaultReason::Aperture);
        }
        let generation = self.iotlb.generation();
        let t = with_table!(&self.table, pt => pt.walk(iova, guard)).ok_or(FaultReason::NotPresent)?;
        let allowed = t.perm.allows(need);
        // A write with tracking on marks the leaf, as the hardware does.
        let dirty = allowed && need.write && self.tracking.load(Ordering::Relaxed) && self.set_dirty(iova, guard);
        let host_page = t.addr - offset;
        self.iotlb.fill(page, generation, Hit { host_page, perm: t.perm, checked: t.checked, dirty });
        if allowed { Ok((t.addr, t.checked)) } else { Err(FaultReason::Permission) }
    }
}

/// Flags a paging HWPT was allocated with.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HwptFlags {
    pub nest_parent: bool,
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

    pub fn domain(&self) -> &Arc<Domain> {
        &self.domain
    }

    pub fn ioas(&self) -> &Arc<Ioas> {
        &self.ioas
    }

    pub fn flags(&self) -> HwptFlags {
        self.flags
    }

    /// A new table's choice, made before anyone else can see it.
    pub(crate) fn with_pasid_use(mut self: Arc<Self>, pasid_use: PasidUse) -> Arc<Self> {
        Arc::get_mut(&mut self).expect("a new table").pasid_use = pasid_use;
        self
    }

    pub fn is_auto(&self) -> bool {
        self.auto
    }

    /// `IOMMU_HWPT_SET_DIRTY_TRACKING`.
    pub fn set_dirty_tracking(&self, enable: bool) -> crate::Result<()> {
        self.ioas.set_dirty_tracking(&self.domain, enable)
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
        self.ioas.read_and_clear_dirty(&self.domain, range, keep, record)
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
    pub fn parent(&self) -> &Arc<HwptPaging> {
        &self.parent
    }

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
    /// until either stage is invalidated.
    pub fn translate(&self, iova: u64, need: Perm, guard: &Guard) -> Result<(u64, bool), FaultReason> {
        self.translate_at(iova, need, None, guard)
    }

    /// `translate` of a DMA tagged with substream (PASID) `ssid`: a stage 1
    /// that covers substreams (an SMMUv3 STE) picks the guest's table by
    /// it; others (VT-d's) have one per PASID attachment, so ignore it.
    pub fn translate_substream(
        &self,
        iova: u64,
        need: Perm,
        ssid: u32,
        guard: &Guard,
    ) -> Result<(u64, bool), FaultReason> {
        self.translate_at(iova, need, Some(ssid), guard)
    }

    /// `translate` with or without a substream: a stage 1 that covers
    /// substreams treats a transaction without one apart from one with
    /// substream 0.
    fn translate_at(
        &self,
        iova: u64,
        need: Perm,
        ssid: Option<u32>,
        guard: &Guard,
    ) -> Result<(u64, bool), FaultReason> {
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
            return Ok((hit.host_page + offset, hit.checked));
        }
        // A miss, or rights the cached combination lacks: walk, so the fault
        // names the stage that denies it.
        let (gpa, perm) = self.walk_stage1(iova, ssid, guard, &mut |_| {})?;
        if !perm.allows(need) {
            return Err(FaultReason::Permission);
        }
        let (host, checked) = s2.translate(gpa, need, guard).map_err(|r| stage2(gpa, r))?;
        let s2perm = s2.perm_of(gpa, guard).unwrap_or_default();
        let combined = Perm { read: perm.read && s2perm.read, write: perm.write && s2perm.write };
        // Writes through a dirty-tracking stage 2 must reach it.
        if !s2.dirty_tracking() {
            iotlb.fill(tag, generation, Hit { host_page: host - offset, perm: combined, checked, dirty: false });
        }
        Ok((host, checked))
    }

    /// The two-dimensional walk of `iova`, step by step (no IOTLB), for
    /// people: where each stage-1 entry was read and what it said, then where
    /// the final guest-physical address lands in host memory.
    pub fn trace(&self, iova: u64) -> (Vec<WalkStep>, Result<u64, FaultReason>) {
        let guard = crate::epoch::pin();
        let mut steps = Vec::new();
        let walked = self.walk_stage1(iova, None, &guard, &mut |s| steps.push(s));
        let result = walked.and_then(|(gpa, _)| {
            let (host, _) = self.parent.domain.translate(gpa, Perm::default(), &guard).map_err(|r| stage2(gpa, r))?;
            Ok(host)
        });
        (steps, result)
    }

    /// Walks the guest's stage-1 table: returns the guest-physical address
    /// `iova` maps to and the rights along the way.
    fn walk_stage1(
        &self,
        iova: u64,
        ssid: Option<u32>,
        guard: &Guard,
        step: &mut dyn FnMut(WalkStep),
    ) -> Result<(u64, Perm), FaultReason> {
        let s2 = &self.parent.domain;
        self.data.walk(iova, ssid, &mut |gpa| read_guest(s2, gpa, guard), step)
    }

    pub fn data(&self) -> &NestedData {
        &self.data
    }
}

/// One stage-1 entry read during a nested walk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WalkStep {
    pub level: u32,
    /// Where the entry is, guest-physical, and where stage 2 put it.
    pub entry_gpa: u64,
    pub entry_host: u64,
    pub pte: u64,
}

/// Reads the 8-byte entry at guest-physical `gpa` through stage 2; returns
/// where it is in host memory and its value.
fn read_guest(s2: &Domain, gpa: u64, guard: &Guard) -> Result<(u64, u64), FaultReason> {
    let (host, checked) = s2.translate(gpa, Perm::R, guard).map_err(|r| stage2(gpa, r))?;
    let mut raw = [0u8; 8];
    crate::memory::read(trust(checked), host, &mut raw).map_err(|_| stage2(gpa, FaultReason::NotPresent))?;
    Ok((host, u64::from_le_bytes(raw)))
}

fn stage2(gpa: u64, r: FaultReason) -> FaultReason {
    FaultReason::Stage2 { gpa, permission: r == FaultReason::Permission }
}

/// A HWPT a device can attach to.
#[derive(Clone)]
pub enum Hwpt {
    Paging(Arc<HwptPaging>),
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

    pub fn pasid_use(&self) -> PasidUse {
        match self {
            Hwpt::Paging(h) => h.pasid_use,
            Hwpt::Nested(n) => n.pasid_use,
        }
    }

    pub fn dirty_capable(&self) -> bool {
        match self {
            Hwpt::Paging(h) => h.domain.dirty_capable(),
            Hwpt::Nested(_) => false,
        }
    }

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

    /// Translates `iova` for an access needing `need`.
    #[inline]
    pub fn translate(&self, iova: u64, need: Perm, guard: &Guard) -> Result<(u64, bool), FaultReason> {
        match self {
            Hwpt::Paging(h) => h.domain.translate(iova, need, guard),
            Hwpt::Nested(n) => n.translate(iova, need, guard),
        }
    }

    /// `translate` of a DMA tagged with substream (PASID) `ssid`.
    pub fn translate_substream(
        &self,
        iova: u64,
        need: Perm,
        ssid: u32,
        guard: &Guard,
    ) -> Result<(u64, bool), FaultReason> {
        match self {
            Hwpt::Paging(h) => h.domain.translate(iova, need, guard),
            Hwpt::Nested(n) => n.translate_substream(iova, need, ssid, guard),
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
    pub fn fault(&self) -> Option<&Arc<FaultQueue>> {
        self.fault.as_ref()
    }

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

fn trust(checked: bool) -> Trust {
    if checked { Trust::Checked } else { Trust::Direct }
}
