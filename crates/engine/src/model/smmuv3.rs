//! Arm SMMUv3 structures a guest hands to ioasid (SMMUv3 architecture
//! specification): the stream table entry of a nested HWPT, the context
//! descriptors it points to in guest memory, and the commands a guest's
//! command queue carries to a vIOMMU, and the event records it writes.

use zerocopy::FromBytes;

use super::GuestTables;
use crate::domain::{ConfigFault, FaultReason, Gpa, PageFormat};
use crate::iotlb::Iotlb;
use crate::pgtable::Perm;
use crate::pgtable::arm::ArmS1;
use crate::pgtable::image::{ImageFault, walk_image_from};
use crate::{Error, Result};

use super::{
    DataLayout, EntryArray, HwInfo, HwInfoData, IommuModel, IommuOps, NestedData, Stage1, ViommuCore, ViommuOps,
    ViommuType,
};

/// `GET_HW_INFO` type of [`iommu_hw_info_arm_smmuv3`].
pub const IOMMU_HW_INFO_TYPE_ARM_SMMUV3: u32 = 2;
/// The SMMU needs TLBI and CFGI commands issued twice (an erratum flag).
pub const IOMMU_HW_INFO_ARM_SMMUV3_ERRATA_REPEAT_TLBI_CFGI: u32 = 1 << 0;
/// Nested HWPT data type of [`iommu_hwpt_arm_smmuv3`].
pub const IOMMU_HWPT_DATA_ARM_SMMUV3: u32 = 2;
/// vIOMMU invalidation entry type of [`iommu_viommu_arm_smmuv3_invalidate`].
pub const IOMMU_VIOMMU_INVALIDATE_DATA_ARM_SMMUV3: u32 = 1;
/// The SMMUv3 vIOMMU type (`IOMMU_VIOMMU_TYPE_ARM_SMMUV3`).
pub const IOMMU_VIOMMU_TYPE_ARM_SMMUV3: u32 = 1;
/// SMMUv3 event records (32 bytes), naming the stream by its virtual ID.
pub const VEVENTQ_TYPE_ARM_SMMUV3: u32 = 1;

uapi_struct!(
    /// SMMUv3's `IOMMU_GET_HW_INFO` data: ID registers IDR0-5, IIDR and
    /// AIDR (SMMUv3 6.3) a guest's vIOMMU mirrors.
    iommu_hw_info_arm_smmuv3 { flags: u32, __reserved: u32, idr: [u32; 6], iidr: u32, aidr: u32 } size 40
);
uapi_struct!(
    /// A nested HWPT's data: the guest's stream table entry, words 0 and 1
    /// (SMMUv3 5.2), checked as [`NestedData::arm_smmuv3`] checks it.
    iommu_hwpt_arm_smmuv3 { ste: [u64; 2] } size 16
);
uapi_struct!(
    /// One command of the guest's command queue (SMMUv3 4.1), for
    /// `IOMMU_HWPT_INVALIDATE` on the vIOMMU.
    iommu_viommu_arm_smmuv3_invalidate { cmd: [u64; 2] } size 16
);
uapi_struct!(
    /// One vEVENTQ record: an SMMUv3 event record (SMMUv3 7.3) naming the
    /// stream by the guest's virtual StreamID.
    iommu_vevent_arm_smmuv3 { evt: [u64; 4] } size 32
);

impl HwInfoData for iommu_hw_info_arm_smmuv3 {
    const TYPE: u32 = IOMMU_HW_INFO_TYPE_ARM_SMMUV3;
}

/// An SMMUv3: stage-1 tables for paging domains, stage 2 under nesting,
/// whose nested HWPTs take a guest's STE and live on its vIOMMU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct ArmSmmuV3;

impl IommuOps for ArmSmmuV3 {
    fn name(&self) -> &'static str {
        "Arm SMMUv3"
    }

    fn paging_format(&self, nest_parent: bool) -> PageFormat {
        if nest_parent { PageFormat::ArmS2 } else { PageFormat::ArmS1 }
    }

    /// An SMMU walks both its stages.
    fn serves(&self, format: PageFormat) -> bool {
        matches!(format, PageFormat::ArmS1 | PageFormat::ArmS2)
    }

    fn hw_info(&self, features: super::Features) -> HwInfo {
        let pasid_bits = u64::from(features.max_pasid_log2);
        // IDR0 (SMMUv3 6.3.1): stage 1 and 2, AArch64 tables, coherent,
        // 16-bit ASIDs and VMIDs, MSIs, two-level stream and CD tables;
        // hardware access/dirty update (HTTU) when it tracks dirty pages;
        // PRI with page requests.
        let mut idr0 = 1 | 1 << 1 | 0b10 << 2 | 1 << 4 | 1 << 12 | 1 << 13 | 1 << 18 | 1 << 19 | 0b01 << 27;
        if features.dirty_tracking {
            idr0 |= 0b10 << 6;
        }
        if features.pri {
            idr0 |= 1 << 16;
        }
        // IDR1: 16-bit stream IDs, substream IDs as wide as PASIDs.
        let idr1 = 16 | (pasid_bits as u32) << 6;
        // IDR3: range invalidation (RIL).
        let idr3 = 1 << 10;
        // IDR5: 48-bit output addresses, 4 KiB granule.
        let idr5 = 0b101 | 1 << 4;
        // IIDR: implementer Arm (JEP106 0x43b); AIDR: SMMUv3.1.
        let idr = [idr0, idr1, 0, idr3, 0, idr5];
        HwInfo::new(&iommu_hw_info_arm_smmuv3 { idr, iidr: 0x43b, aidr: 1, ..Default::default() })
    }

    /// A guest's STE, over a stage-2 table only.
    fn nested_layout(&self, data_type: u32, parent: PageFormat) -> Option<DataLayout> {
        (data_type == IOMMU_HWPT_DATA_ARM_SMMUV3 && parent == PageFormat::ArmS2)
            .then_some(DataLayout::of::<iommu_hwpt_arm_smmuv3>(data_type))
    }

    fn nested_data(&self, _data_type: u32, data: &[u8]) -> Result<NestedData> {
        let vste = iommu_hwpt_arm_smmuv3::read_from_prefix(data).map_err(|_| Error::Invalid("short STE"))?.0;
        NestedData::arm_smmuv3(vste.ste)
    }
}

/// An SMMUv3 for a guest: its command queue's invalidations and its event
/// records.
pub(crate) struct SmmuViommu;

impl ViommuOps for SmmuViommu {
    fn uapi_type(&self) -> u32 {
        IOMMU_VIOMMU_TYPE_ARM_SMMUV3
    }

    fn serves(&self, iommu: IommuModel) -> bool {
        iommu == IommuModel::ArmSmmuV3
    }

    /// Each entry is one command of the guest's queue, stopping at the
    /// first it rejects (`EIO`).
    fn invalidate(&self, viommu: &dyn ViommuCore, entries: &mut dyn EntryArray) -> (u32, Result<()>) {
        if entries.data_type() != IOMMU_VIOMMU_INVALIDATE_DATA_ARM_SMMUV3 {
            return (0, Err(Error::Invalid("not SMMUv3 commands")));
        }
        for i in 0..entries.len() {
            let mut inv = iommu_viommu_arm_smmuv3_invalidate::default();
            let min = size_of::<iommu_viommu_arm_smmuv3_invalidate>();
            let done = entries
                .copy(i, min, zerocopy::IntoBytes::as_mut_bytes(&mut inv))
                .and_then(|()| self.command(viommu, zerocopy::IntoBytes::as_bytes(&inv)));
            if let Err(e) = done {
                return (i, Err(e));
            }
        }
        (entries.len(), Ok(()))
    }

    /// One command (16 bytes): TLB invalidations drop the combined
    /// translations of every nested HWPT of the vIOMMU (its one VMID; finer
    /// ASID or address ranges are honoured by dropping more, never less);
    /// configuration invalidations name the guest's stream ID, which must
    /// be a vDEVICE there (`EIO` otherwise, as in Linux), and drop that
    /// device's nested translations, so a changed context descriptor is
    /// read again.
    fn command(&self, viommu: &dyn ViommuCore, command: &[u8]) -> Result<()> {
        let cmd = iommu_viommu_arm_smmuv3_invalidate::read_from_prefix(command)
            .map_err(|_| Error::Invalid("short SMMUv3 command"))?
            .0
            .cmd;
        let idr = viommu.hw_info().get::<iommu_hw_info_arm_smmuv3>().map_or([0; 6], |h| h.idr);
        let command = Command::decode(cmd, Features::from_idr(idr))?;
        if let Some(sid) = command.sid() {
            if !viommu.flush_device(u64::from(sid)) {
                return Err(Error::Io("no vDEVICE has that stream ID"));
            }
            return Ok(());
        }
        viommu.flush_all();
        Ok(())
    }

    fn event(
        &self,
        virt_id: u64,
        pasid: Option<u32>,
        fault: Option<(u64, FaultReason, bool)>,
        attrs: crate::fault::DmaAttrs,
    ) -> Option<(u32, Vec<u8>)> {
        let (iova, reason, write) = fault?;
        let record = event(virt_id as u32, pasid, iova, reason, write, attrs)?;
        Some((VEVENTQ_TYPE_ARM_SMMUV3, record.iter().flat_map(|w| w.to_le_bytes()).collect()))
    }
}

/// An SMMUv3 stream table entry the guest wrote (its first two words,
/// validated): abort, bypass to stage 2, or stage 1 through the guest's
/// context descriptors. `iotlb` caches combined translations.
pub(crate) struct NestedSte {
    ste: [u64; 2],
    iotlb: Iotlb,
}

impl NestedData {
    /// A nested SMMUv3 STE, checked as Linux checks it (`EIO` if rejected).
    pub fn arm_smmuv3(ste: [u64; 2]) -> Result<Self> {
        Ok(NestedData::new(NestedSte { ste: validate_ste(ste)?, iotlb: Iotlb::new() }))
    }
}

impl Stage1 for NestedSte {
    /// Only through an SMMUv3 vIOMMU, whose commands invalidate it.
    fn fits(&self, _iommu: IommuModel, viommu: Option<ViommuType>) -> bool {
        viommu == Some(ViommuType::ArmSmmuV3)
    }

    fn iotlb(&self) -> Option<&Iotlb> {
        Some(&self.iotlb)
    }

    fn covers_substreams(&self) -> bool {
        true
    }

    fn walk(
        &self,
        iova: u64,
        ssid: Option<u32>,
        tables: &mut GuestTables<'_>,
    ) -> std::result::Result<(Gpa, Perm), FaultReason> {
        let mut failed = None;
        let mut read = |gpa| tables.read(Gpa(gpa)).map(|(_, v)| v).map_err(|r| failed = Some(r)).ok();
        translate(self.ste, ssid, iova, &mut read)
            .map_err(|f| match f {
                S1Fault::Read { gpa } => failed.unwrap_or(FaultReason::Stage2 { gpa, permission: false }),
                S1Fault::Abort => FaultReason::Config(ConfigFault::Abort),
                S1Fault::Translation => FaultReason::NotPresent,
                S1Fault::Access => FaultReason::AccessFlag,
                S1Fault::BadSte => FaultReason::Config(ConfigFault::BadSte),
                S1Fault::StreamDisabled => FaultReason::Config(ConfigFault::StreamDisabled),
                S1Fault::BadSubstream => FaultReason::Config(ConfigFault::BadSubstream),
                S1Fault::BadCd => FaultReason::Config(ConfigFault::BadCd),
            })
            .map(|(gpa, perm)| (Gpa(gpa), perm))
    }

    /// Its invalidations are the vIOMMU's commands.
    fn invalidation(&self) -> Option<DataLayout> {
        None
    }

    fn invalidate(&self, _entry: &[u8]) -> Result<()> {
        Err(Error::Unsupported("an SMMUv3 nested HWPT is invalidated through its vIOMMU"))
    }
}

/// Stream table entry fields (SMMUv3 5.2) a guest may set in a nested STE.
/// Masks are in place; field values (`CONFIG_*`, `EATS_*`) are unshifted.
pub mod ste {
    /// Word 0: V, the entry is valid.
    pub const V: u64 = 1;
    /// Word 0: Config, what the stream gets (one of `CONFIG_*`, at bit 1).
    pub const CONFIG: u64 = 0b111 << 1;
    /// Config: abort every transaction, without an event.
    pub const CONFIG_ABORT: u64 = 0;
    /// Config: stage 1 bypassed, stage 2 alone.
    pub const CONFIG_BYPASS: u64 = 0b100;
    /// Config: stage 1 through the CD table, over stage 2.
    pub const CONFIG_S1: u64 = 0b101;
    /// Word 0: S1Fmt, the CD table's layout (linear or two-level).
    pub const S1FMT: u64 = 0b11 << 4;
    /// Word 0: S1ContextPtr, guest-physical address of the CD table.
    pub const S1_CONTEXT_PTR: u64 = ((1 << 52) - 1) & !((1 << 6) - 1);
    /// Word 0: S1CDMax, log2 of the number of CDs (0: no substreams).
    pub const S1CDMAX: u64 = 0x1f << 59;
    /// Word 1: S1DSS, what a transaction without a substream gets when
    /// substreams are enabled.
    pub const S1DSS: u64 = 0b11;
    /// Word 1: S1CIR, inner cacheability of CD table fetches.
    pub const S1CIR: u64 = 0b11 << 2;
    /// Word 1: S1COR, outer cacheability of CD table fetches.
    pub const S1COR: u64 = 0b11 << 4;
    /// Word 1: S1CSH, shareability of CD table fetches.
    pub const S1CSH: u64 = 0b11 << 6;
    /// Word 1: S1STALLD, stall faults disabled for the stream.
    pub const S1STALLD: u64 = 1 << 27;
    /// Word 1: EATS, ATS for the stream (one of `EATS_*`, at bit 28);
    /// the host's to set, cleared from a guest's STE.
    pub const EATS: u64 = 0b11 << 28;
    /// EATS: ATS translation requests abort.
    pub const EATS_ABORT: u64 = 0;
    /// EATS: full ATS.
    pub const EATS_TRANS: u64 = 1;

    pub(crate) const WORD0_ALLOWED: u64 = V | CONFIG | S1FMT | S1_CONTEXT_PTR | S1CDMAX;
    pub(crate) const WORD1_ALLOWED: u64 = S1DSS | S1CIR | S1COR | S1CSH | S1STALLD | EATS;
}

/// Context descriptor fields (SMMUv3 5.4), words 0 and 1.
pub mod cd {
    /// Word 0: T0SZ, the input range is `64 - T0SZ` bits (16 to 39 here).
    pub const T0SZ: u64 = 0x3f;
    /// Word 0: TG0, the granule; only 0 (4 KiB) is walked.
    pub const TG0: u64 = 0b11 << 6;
    /// Word 0: EPD0, TTB0 walks disabled (every address faults).
    pub const EPD0: u64 = 1 << 14;
    /// Word 0: V, the descriptor is valid.
    pub const V: u64 = 1 << 31;
    /// Word 0: AA64, AArch64 tables (required).
    pub const AA64: u64 = 1 << 41;
    /// Word 0: where the 16-bit ASID starts.
    pub const ASID_SHIFT: u32 = 48;
    /// Word 1: TTB0.
    pub const TTB0: u64 = ((1 << 52) - 1) & !0xf;
    /// Bytes per descriptor.
    pub const SIZE: u64 = 64;
}

/// Checks a guest's STE as Linux does before installing it: `EIO` for any
/// field a nested STE may not set, a Config other than abort, bypass or
/// stage 1, or an EATS other than abort or translate. An STE that is not
/// valid becomes all zero (abort). EATS is the host's to set, so it is
/// cleared.
pub(crate) fn validate_ste(mut words: [u64; 2]) -> Result<[u64; 2]> {
    if words[0] & ste::V == 0 {
        return Ok([0; 2]);
    }
    if words[0] & !ste::WORD0_ALLOWED != 0 || words[1] & !ste::WORD1_ALLOWED != 0 {
        return Err(Error::Io("the STE sets a field a nested STE may not"));
    }
    let config = (words[0] & ste::CONFIG) >> 1;
    if ![ste::CONFIG_ABORT, ste::CONFIG_BYPASS, ste::CONFIG_S1].contains(&config) {
        return Err(Error::Io("the STE's Config is not abort, bypass or stage 1"));
    }
    let eats = (words[1] & ste::EATS) >> 28;
    if eats != ste::EATS_ABORT && eats != ste::EATS_TRANS {
        return Err(Error::Io("the STE's EATS is not abort or translate"));
    }
    words[1] &= !ste::EATS;
    Ok(words)
}

/// What a (validated) STE does with a stream's transactions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Config {
    /// Not valid: every transaction is refused with `C_BAD_STE`.
    Invalid,
    /// Valid, Config abort: refused without an event.
    Abort,
    /// Stage 2 alone.
    Bypass,
    /// Stage 1 through the CD table at guest-physical `cd_table`.
    Stage1 { cd_table: u64 },
}

pub(crate) fn config(words: [u64; 2]) -> Config {
    if words[0] & ste::V == 0 {
        return Config::Invalid;
    }
    match (words[0] & ste::CONFIG) >> 1 {
        ste::CONFIG_BYPASS => Config::Bypass,
        ste::CONFIG_S1 => Config::Stage1 { cd_table: words[0] & ste::S1_CONTEXT_PTR },
        _ => Config::Abort,
    }
}

/// Why a stage-1 walk through a CD failed, each as the SMMU reports it
/// (SMMUv3 7.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum S1Fault {
    /// The STE's Config aborts the stream: no event.
    Abort,
    /// `C_BAD_STE`: the STE is not valid, or is ILLEGAL (a reserved S1Fmt
    /// or S1DSS with substreams enabled).
    BadSte,
    /// `F_STREAM_DISABLED`: a transaction without a substream, and the STE
    /// (S1DSS terminate) takes only substreams.
    StreamDisabled,
    /// `C_BAD_SUBSTREAMID`: a substream the STE has no descriptor for
    /// (substreams disabled, beyond S1CDMax, substream 0 reserved by S1DSS,
    /// or an invalid level-1 CD table descriptor).
    BadSubstream,
    /// `C_BAD_CD`: the CD is not valid or not one this SMMU walks (AArch64,
    /// 4 KiB granule, an input size it supports).
    BadCd,
    /// `F_TRANSLATION`: stage 1 has no translation (or TTB0 walks are
    /// disabled, or the address is beyond T0SZ).
    Translation,
    /// `F_ACCESS`: the leaf's access flag is clear.
    Access,
    /// Reading the guest's memory at `gpa` failed (stage 2).
    Read { gpa: u64 },
}

/// STE S1DSS: what a transaction without a substream uses when
/// substreams are enabled.
const S1DSS_TERMINATE: u64 = 0;
const S1DSS_BYPASS: u64 = 1;
const S1DSS_SSID0: u64 = 2;
/// STE S1Fmt: linear, or two levels with 4 KiB (64 CDs) or 64 KiB (1024
/// CDs) leaf tables.
const S1FMT_LINEAR: u64 = 0;
const S1FMT_4K_L2: u64 = 1;
const S1FMT_64K_L2: u64 = 2;
/// Level-1 CD table descriptor (SMMUv3 5.4.1).
const L1CD_V: u64 = 1;
const L1CD_L2PTR: u64 = ((1 << 52) - 1) & !0xfff;

/// Translates `iova` of substream `ssid` (`None`: a transaction without
/// one) by an STE: returns the guest-physical address and stage 1's rights.
/// `read` fetches 8 bytes of guest memory.
pub(crate) fn translate(
    words: [u64; 2],
    ssid: Option<u32>,
    iova: u64,
    read: &mut dyn FnMut(u64) -> Option<u64>,
) -> std::result::Result<(u64, Perm), S1Fault> {
    let cd_table = match config(words) {
        Config::Invalid => return Err(S1Fault::BadSte),
        Config::Abort => return Err(S1Fault::Abort),
        Config::Bypass => return Ok((iova, Perm::RW)),
        Config::Stage1 { cd_table } => cd_table,
    };
    let cd_max = (words[0] & ste::S1CDMAX) >> 59;
    let s1fmt = (words[0] & ste::S1FMT) >> 4;
    let s1dss = words[1] & ste::S1DSS;
    // S1Fmt and S1DSS only count when substreams are enabled.
    if cd_max != 0 && (s1fmt > S1FMT_64K_L2 || s1dss > S1DSS_SSID0) {
        return Err(S1Fault::BadSte);
    }
    let index = match ssid {
        None if cd_max == 0 => 0,
        None => match s1dss {
            S1DSS_TERMINATE => return Err(S1Fault::StreamDisabled),
            S1DSS_BYPASS => return Ok((iova, Perm::RW)),
            _ => 0,
        },
        Some(s) if cd_max == 0 || u64::from(s) >> cd_max != 0 => return Err(S1Fault::BadSubstream),
        Some(0) if s1dss == S1DSS_SSID0 => return Err(S1Fault::BadSubstream),
        Some(s) => u64::from(s),
    };
    let fetch = |gpa: u64, read: &mut dyn FnMut(u64) -> Option<u64>| read(gpa).ok_or(S1Fault::Read { gpa });
    let cd_addr = if cd_max == 0 || s1fmt == S1FMT_LINEAR {
        cd_table + index * cd::SIZE
    } else {
        let split = if s1fmt == S1FMT_4K_L2 { 6 } else { 10 };
        let l1 = fetch(cd_table + (index >> split) * 8, read)?;
        if l1 & L1CD_V == 0 {
            return Err(S1Fault::BadSubstream);
        }
        (l1 & L1CD_L2PTR) + (index & ((1 << split) - 1)) * cd::SIZE
    };
    let cd0 = fetch(cd_addr, read)?;
    let t0sz = (cd0 & cd::T0SZ) as u32;
    if cd0 & cd::V == 0 || cd0 & cd::AA64 == 0 || cd0 & cd::TG0 != 0 || !(16..=39).contains(&t0sz) {
        return Err(S1Fault::BadCd);
    }
    let ttb0 = fetch(cd_addr + 8, read)? & cd::TTB0;
    // The input size sets where the walk starts: 4 levels above 39 bits.
    let input_bits = 64 - t0sz;
    if cd0 & cd::EPD0 != 0 || iova >> input_bits != 0 {
        return Err(S1Fault::Translation);
    }
    let top = (input_bits - 12).div_ceil(9) - 1;
    match walk_image_from::<ArmS1>(ttb0, top, iova, read) {
        Ok(t) => Ok((t.addr, t.perm)),
        Err(ImageFault::Read { entry, .. }) => Err(S1Fault::Read { gpa: entry }),
        Err(ImageFault::AccessFlag { .. }) => Err(S1Fault::Access),
        Err(_) => Err(S1Fault::Translation),
    }
}

/// Event record types (SMMUv3 7.3): those Linux forwards to a vEVENTQ.
/// The type is the low byte of an [`iommu_vevent_arm_smmuv3`]'s `evt[0]`.
/// `C_BAD_STE`: the STE is not valid, or is ILLEGAL.
pub const C_BAD_STE: u64 = 0x04;
/// A transaction without a substream on a stream that takes only substreams.
pub const F_STREAM_DISABLED: u64 = 0x06;
/// A substream the STE has no descriptor for.
pub const C_BAD_SUBSTREAMID: u64 = 0x08;
/// The CD is not valid or not one the SMMU walks.
pub const C_BAD_CD: u64 = 0x0a;
/// Stage 1 has no translation for the address.
pub const F_TRANSLATION: u64 = 0x10;
/// The address is beyond the input range (the aperture).
pub const F_ADDR_SIZE: u64 = 0x11;
/// The leaf's access flag is clear.
pub const F_ACCESS: u64 = 0x12;
/// Stage 1 does not allow the access (a write to a read-only page).
pub const F_PERMISSION: u64 = 0x13;

/// The event record (SMMUv3 7.3) an SMMU writes for a fault no page
/// request covers, for the guest's event queue: type, the guest's StreamID
/// and the substream (SSV, SubstreamID) when the DMA had one, read/write
/// (RnW), instruction (InD) and privileged (PnU) accesses, the class (an
/// input address), and the input address. `None` for what Linux keeps from
/// the guest: stage-2 faults (`event->s2`), which are the host's. An
/// aborting STE records nothing.
pub(crate) fn event(
    vsid: u32,
    ssid: Option<u32>,
    iova: u64,
    reason: FaultReason,
    write: bool,
    attrs: crate::fault::DmaAttrs,
) -> Option<[u64; 4]> {
    let kind = match reason {
        FaultReason::NotPresent => F_TRANSLATION,
        FaultReason::Permission => F_PERMISSION,
        FaultReason::Aperture => F_ADDR_SIZE,
        FaultReason::AccessFlag => F_ACCESS,
        FaultReason::Config(ConfigFault::BadSte) => C_BAD_STE,
        FaultReason::Config(ConfigFault::StreamDisabled) => F_STREAM_DISABLED,
        FaultReason::Config(ConfigFault::BadSubstream) => C_BAD_SUBSTREAMID,
        FaultReason::Config(ConfigFault::BadCd) => C_BAD_CD,
        FaultReason::Stage2 { .. } | FaultReason::Config(ConfigFault::Abort) => return None,
    };
    const PNU: u64 = 1 << 33;
    const IND: u64 = 1 << 34;
    const RNW: u64 = 1 << 35;
    const CLASS_IN: u64 = 0b10 << 40;
    let mut word1 = CLASS_IN;
    if !write {
        word1 |= RNW;
    }
    if attrs.exec {
        word1 |= IND;
    }
    if attrs.privileged {
        word1 |= PNU;
    }
    const SSV: u64 = 1 << 11;
    let substream = ssid.map_or(0, |s| SSV | u64::from(s & 0xf_ffff) << 12);
    let word0 = kind | substream | u64::from(vsid) << 32;
    // Configuration errors name the stream alone: no access, no address.
    if matches!(reason, FaultReason::Config(_)) {
        return Some([word0, 0, 0, 0]);
    }
    Some([word0, word1, iova, 0])
}

/// What the SMMU under a vIOMMU implements, from its ID registers: the
/// features 7.3 checks a guest's commands against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Features {
    /// IDR0.ATS: ATC_INV is legal.
    pub(crate) ats: bool,
    /// IDR0.ASID16: 16-bit ASIDs, else 8.
    pub(crate) asid_bits: u32,
    /// IDR1.SSIDSIZE: substream ID bits (0: no substreams).
    pub(crate) ssid_bits: u32,
    /// IDR3.RIL: range invalidation.
    pub(crate) range_inv: bool,
    /// IDR5.DS: 52-bit addresses with 4 and 16 KiB granules.
    pub(crate) ds: bool,
}

impl Features {
    pub(crate) fn from_idr(idr: [u32; 6]) -> Self {
        Features {
            ats: idr[0] & 1 << 10 != 0,
            asid_bits: if idr[0] & 1 << 12 != 0 { 16 } else { 8 },
            ssid_bits: (idr[1] >> 6) & 0x1f,
            range_inv: idr[3] & 1 << 10 != 0,
            ds: idr[5] & 1 << 7 != 0,
        }
    }
}

/// A command from a guest's command queue (SMMUv3 4.1), as a vIOMMU
/// accepts it. Stream IDs are the guest's (virtual) ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Command {
    /// TLBI_NH_ALL and TLBI_NSNH_ALL (which Linux turns into TLBI_NH_ALL of
    /// the vIOMMU's VMID): everything of the guest's VMID.
    TlbiAll,
    TlbiAsid {
        asid: u16,
    },
    /// TLBI_NH_VA (one ASID) and TLBI_NH_VAA (`asid` None: all ASIDs).
    TlbiVa {
        asid: Option<u16>,
        addr: u64,
    },
    CfgiSte {
        sid: u32,
    },
    CfgiCd {
        sid: u32,
        ssid: u32,
    },
    CfgiCdAll {
        sid: u32,
    },
    AtcInv {
        sid: u32,
    },
}

/// Command opcodes (SMMUv3 4.1), the low byte of a command's first word.
/// `CFGI_STE`: a stream's STE changed (a flush of its translations here).
pub const CMD_CFGI_STE: u8 = 0x03;
/// `CFGI_CD`: one CD of a stream changed.
pub const CMD_CFGI_CD: u8 = 0x05;
/// `CFGI_CD_ALL`: every CD of a stream changed.
pub const CMD_CFGI_CD_ALL: u8 = 0x06;
/// `TLBI_NH_ALL`: every stage-1 translation of the guest.
pub const CMD_TLBI_NH_ALL: u8 = 0x10;
/// `TLBI_NH_ASID`: the translations of one ASID (bits 63:48 of word 0).
pub const CMD_TLBI_NH_ASID: u8 = 0x11;
/// `TLBI_NH_VA`: one address (word 1) of one ASID.
pub const CMD_TLBI_NH_VA: u8 = 0x12;
/// `TLBI_NH_VAA`: one address (word 1) of every ASID.
pub const CMD_TLBI_NH_VAA: u8 = 0x13;
/// `TLBI_S12_VMALL`: stage 1 and 2 of a VMID; the host's, `EIO` from a guest.
pub const CMD_TLBI_S12_VMALL: u8 = 0x28;
/// `TLBI_NSNH_ALL`: taken as `TLBI_NH_ALL` of the vIOMMU's VMID.
pub const CMD_TLBI_NSNH_ALL: u8 = 0x30;
/// `ATC_INV`: a device's ATS cache; `EIO` on an SMMU without ATS.
pub const CMD_ATC_INV: u8 = 0x40;

/// Command fields (SMMUv3 4.1-4.5).
mod field {
    const fn mask(hi: u32, lo: u32) -> u64 {
        (u64::MAX >> (63 - hi)) & !((1 << lo) - 1)
    }
    pub const OP: u64 = mask(7, 0);
    pub const SSV: u64 = 1 << 11;
    pub const SSID: u64 = mask(31, 12);
    pub const SID: u64 = mask(63, 32);
    pub const CFGI_LEAF: u64 = 1;
    pub const TLBI_NUM: u64 = mask(16, 12);
    pub const TLBI_SCALE: u64 = mask(25, 20);
    pub const TLBI_VMID: u64 = mask(47, 32);
    pub const TLBI_ASID_SHIFT: u32 = 48;
    pub const TLBI_LEAF: u64 = 1;
    pub const TLBI_TTL: u64 = mask(9, 8);
    pub const TLBI_TG: u64 = mask(11, 10);
    pub const TLBI_VA: u64 = mask(63, 12);
    pub const ATC_GLOBAL: u64 = 1 << 9;
    pub const ATC_SIZE: u64 = mask(5, 0);
    pub const ATC_ADDR: u64 = mask(63, 12);
    /// ATC_INV Size beyond this (invalidate everything) is reserved.
    pub const ATC_SIZE_ALL: u64 = 52;
}

/// The range fields of a TLBI with range invalidation: the combinations
/// the architecture reserves are refused.
fn range_is_valid(f: Features, cmd: [u64; 2]) -> bool {
    let range = cmd[0] & (field::TLBI_NUM | field::TLBI_SCALE) != 0;
    let ttl = (cmd[1] & field::TLBI_TTL) >> 8;
    let tg = (cmd[1] & field::TLBI_TG) >> 10;
    match tg {
        // NUM, SCALE and TTL are RES0 without a granule.
        0 => !range && ttl == 0,
        // TTL 1 with 16 KiB needs DS.
        2 if ttl == 1 && !f.ds => false,
        // No range and no TTL is reserved.
        _ => range || ttl != 0,
    }
}

/// The fields a guest may set in a command of opcode `op` on an SMMU with
/// `f`, as Linux 7.3 collects them; `None` for a command it never takes.
/// Anything else (a RES0 or Secure bit) could wedge the shared command
/// queue with CERROR_ILL, so it is refused.
fn allowed(f: Features, op: u8, cmd: [u64; 2]) -> Option<[u64; 2]> {
    let asid = ((1u64 << f.asid_bits) - 1) << field::TLBI_ASID_SHIFT;
    let mut allowed = [field::OP, 0];
    match op {
        CMD_TLBI_NSNH_ALL => {}
        CMD_TLBI_NH_VA | CMD_TLBI_NH_VAA => {
            if op == CMD_TLBI_NH_VA {
                allowed[0] |= asid;
            }
            if f.range_inv {
                if !range_is_valid(f, cmd) {
                    return None;
                }
                allowed[0] |= field::TLBI_NUM | field::TLBI_SCALE;
                allowed[1] |= field::TLBI_TG | field::TLBI_TTL;
                // SCALE above 31 needs DS.
                if !f.ds {
                    allowed[0] &= !(1 << 25);
                }
            }
            allowed[0] |= field::TLBI_VMID;
            allowed[1] |= field::TLBI_LEAF | field::TLBI_VA;
        }
        CMD_TLBI_NH_ASID => allowed[0] |= asid | field::TLBI_VMID,
        CMD_TLBI_NH_ALL => allowed[0] |= field::TLBI_VMID,
        CMD_ATC_INV => {
            if !f.ats || cmd[1] & field::ATC_SIZE > field::ATC_SIZE_ALL {
                return None;
            }
            if f.ssid_bits != 0 {
                allowed[0] |= field::SSV | field::SSID | field::ATC_GLOBAL;
            }
            allowed[0] |= field::SID;
            allowed[1] |= field::ATC_SIZE | field::ATC_ADDR;
        }
        CMD_CFGI_CD | CMD_CFGI_CD_ALL => {
            if op == CMD_CFGI_CD {
                if f.ssid_bits != 0 {
                    allowed[0] |= field::SSID;
                }
                allowed[1] |= field::CFGI_LEAF;
            }
            allowed[0] |= field::SID;
        }
        // Not Linux's: taken as a flush of the stream (see `Command::decode`).
        CMD_CFGI_STE => {
            allowed[0] |= field::SID;
            allowed[1] |= field::CFGI_LEAF;
        }
        _ => return None,
    }
    Some(allowed)
}

impl Command {
    /// Decodes one 16-byte command from a guest of an SMMU with `f`,
    /// checked field by field as Linux 7.3 checks it: `EIO` for opcodes a
    /// guest may not issue through a vIOMMU (the host issues its own syncs
    /// and stage-2 invalidations, TLBI_S12_VMALL among them), for ATC_INV
    /// on an SMMU without ATS, for reserved range encodings, and for any
    /// field the opcode may not set. The VMID field is ignored: the vIOMMU
    /// has its own. CFGI_STE, which Linux refuses (a guest changes its STE
    /// by replacing the nested HWPT), is taken as a flush of the stream's
    /// cached translations, so a guest that rewrites an STE in place keeps
    /// working.
    pub fn decode(cmd: [u64; 2], f: Features) -> Result<Command> {
        let op = cmd[0] as u8;
        let allowed = allowed(f, op, cmd).ok_or(Error::Io("a command a vIOMMU does not take"))?;
        if cmd[0] & !allowed[0] != 0 || cmd[1] & !allowed[1] != 0 {
            return Err(Error::Io("the command sets a field it may not"));
        }
        let sid = (cmd[0] >> 32) as u32;
        let asid = (cmd[0] >> field::TLBI_ASID_SHIFT) as u16;
        Ok(match op {
            CMD_TLBI_NH_ALL | CMD_TLBI_NSNH_ALL => Command::TlbiAll,
            CMD_TLBI_NH_ASID => Command::TlbiAsid { asid },
            CMD_TLBI_NH_VA => Command::TlbiVa { asid: Some(asid), addr: cmd[1] & field::TLBI_VA },
            CMD_TLBI_NH_VAA => Command::TlbiVa { asid: None, addr: cmd[1] & field::TLBI_VA },
            CMD_CFGI_STE => Command::CfgiSte { sid },
            CMD_CFGI_CD => Command::CfgiCd { sid, ssid: ((cmd[0] & field::SSID) >> 12) as u32 },
            CMD_CFGI_CD_ALL => Command::CfgiCdAll { sid },
            CMD_ATC_INV => Command::AtcInv { sid },
            _ => unreachable!("`allowed` takes no other opcode"),
        })
    }

    /// The guest stream ID the command names, if any.
    pub fn sid(self) -> Option<u32> {
        match self {
            Command::CfgiSte { sid } | Command::CfgiCd { sid, .. } | Command::CfgiCdAll { sid } => Some(sid),
            Command::AtcInv { sid } => Some(sid),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pgtable::arm::{AF, AP_RDONLY};
    use std::collections::BTreeMap;

    const S1: u64 = ste::V | ste::CONFIG_S1 << 1;

    #[test]
    fn stes_are_checked_as_linux_checks_them() {
        assert_eq!(validate_ste([0x1234 << 6, 5]), Ok([0, 0]), "not valid: abort, zeroed");
        assert_eq!(validate_ste([S1 | 0x4000, 0]), Ok([S1 | 0x4000, 0]));
        assert!(matches!(validate_ste([S1 | 1 << 52, 0]), Err(Error::Io(_))), "a reserved word-0 bit");
        assert!(matches!(validate_ste([ste::V | 0b110 << 1, 0]), Err(Error::Io(_))), "stage-2 Config");
        assert!(matches!(validate_ste([S1, 1 << 8]), Err(Error::Io(_))), "a word-1 field not allowed");
        assert!(matches!(validate_ste([S1, 2 << 28]), Err(Error::Io(_))), "EATS split-stage");
        assert_eq!(validate_ste([S1, 1 << 28 | 1]), Ok([S1, 1]), "EATS is the host's");
        assert_eq!(config([ste::V | ste::CONFIG_BYPASS << 1, 0]), Config::Bypass);
    }

    /// The SMMU of ioasid's model: no ATS, 16-bit ASIDs, range invalidation.
    const SMMU: Features = Features { ats: false, asid_bits: 16, ssid_bits: 20, range_inv: true, ds: false };

    #[test]
    fn commands_decode_and_unknown_ones_are_eio() {
        let decode = |cmd| Command::decode(cmd, SMMU);
        assert_eq!(decode([0x12 | 7 << 48, 0x4000_1001]), Ok(Command::TlbiVa { asid: Some(7), addr: 0x4000_1000 }));
        assert_eq!(decode([0x05 | 9 << 32 | 3 << 12, 1]), Ok(Command::CfgiCd { sid: 9, ssid: 3 }));
        assert_eq!(decode([0x30, 0]), Ok(Command::TlbiAll), "NSNH_ALL: the guest's whole VMID");
        assert_eq!(decode([0x10 | 5 << 32, 0]), Ok(Command::TlbiAll), "NH_ALL: the VMID is ignored");
        assert_eq!(decode([0x03 | 2 << 32, 0]).unwrap().sid(), Some(2));
        assert!(matches!(decode([0x46, 0]), Err(Error::Io(_))), "CMD_SYNC is the host's");
        assert!(matches!(decode([0x28, 0]), Err(Error::Io(_))), "TLBI_S12_VMALL is the host's");
    }

    #[test]
    fn commands_are_checked_field_by_field_as_linux_7_3_checks_them() {
        let eio = |cmd, f| matches!(Command::decode(cmd, f), Err(Error::Io(_)));
        // A field of another command, a RES0 bit, a Secure bit (SSec, 10).
        assert!(eio([0x30 | 1 << 32, 0], SMMU), "NSNH_ALL takes no VMID");
        assert!(eio([0x30, 1], SMMU), "NSNH_ALL: word 1 is RES0");
        assert!(eio([0x10 | 1 << 48, 0], SMMU), "NH_ALL takes no ASID");
        assert!(eio([0x11 | 1 << 48, 1 << 12], SMMU), "NH_ASID takes no address");
        assert!(eio([0x11 | 1 << 10, 0], SMMU), "SSec");
        assert!(eio([0x13 | 1 << 48, 0x1000 | 1], SMMU), "NH_VAA takes no ASID");
        assert!(eio([0x12 | 1 << 8, 0x1000 | 1], SMMU), "a RES0 bit of NH_VA");
        assert!(eio([0x05 | 1 << 11, 0], SMMU), "CFGI_CD has no SSV");
        assert!(eio([0x05, 2], SMMU), "CFGI_CD: only Leaf in word 1");
        assert!(eio([0x06 | 3 << 12, 0], SMMU), "CFGI_CD_ALL takes no SSID");
        assert!(eio([0x06, 1], SMMU), "CFGI_CD_ALL takes no Leaf");
        assert!(eio([0x03 | 3 << 12, 0], SMMU), "CFGI_STE takes no SSID");
        // Fields that depend on the SMMU.
        let no_ssid = Features { ssid_bits: 0, ..SMMU };
        assert!(!eio([0x05 | 3 << 12, 1], SMMU));
        assert!(eio([0x05 | 3 << 12, 1], no_ssid), "an SSID needs substreams");
        let asid8 = Features { asid_bits: 8, ..SMMU };
        assert!(!eio([0x11 | 0xff << 48, 0], asid8));
        assert!(eio([0x11 | 0x100 << 48, 0], asid8), "the upper ASID bits are RES0 with 8-bit ASIDs");
        // ATC_INV needs ATS; its Size may not exceed 52.
        assert!(eio([0x40 | 2 << 32, 0], SMMU), "no ATS");
        let ats = Features { ats: true, ..SMMU };
        assert_eq!(Command::decode([0x40 | 2 << 32 | 1 << 11 | 5 << 12, 52], ats), Ok(Command::AtcInv { sid: 2 }));
        assert!(eio([0x40, 53], ats), "Size above 52");
        assert!(eio([0x40 | 1 << 11, 0], Features { ssid_bits: 0, ..ats }), "SSV needs substreams");
        // Range invalidation: fields only with RIL, and reserved encodings.
        const TG_4K: u64 = 1 << 10;
        assert!(!eio([0x12 | 3 << 12, 0x4000 | TG_4K | 1 << 8], SMMU), "NUM with TG and TTL");
        assert!(eio([0x12 | 3 << 12, 0x4000], SMMU), "NUM without TG");
        assert!(eio([0x12, 0x4000 | TG_4K], SMMU), "TG without NUM, SCALE or TTL");
        assert!(eio([0x12, 0x4000 | 2 << 10 | 1 << 8], SMMU), "TTL 1 with 16 KiB needs DS");
        assert!(!eio([0x12, 0x4000 | 2 << 10 | 1 << 8], Features { ds: true, ..SMMU }));
        assert!(eio([0x12 | 32 << 20, 0x4000 | TG_4K], SMMU), "SCALE above 31 needs DS");
        assert!(eio([0x12 | 1 << 12, 0x4000 | TG_4K], Features { range_inv: false, ..SMMU }), "no RIL");
    }

    /// Guest memory: a CD table at 0x1000 whose CD 0 has a 48-bit TTB0 at
    /// 0x2000 (levels at 0x2000, 0x3000, 0x4000, 0x5000) mapping IOVA
    /// 0x40_0000 to 0x9000 read-only.
    fn guest(t0sz: u64) -> BTreeMap<u64, u64> {
        let mut m = BTreeMap::new();
        m.insert(0x1000, cd::V | cd::AA64 | t0sz | 5 << cd::ASID_SHIFT);
        m.insert(0x1008, 0x2000);
        m.insert(0x2000, 0x3000 | 0b11);
        m.insert(0x3000, 0x4000 | 0b11);
        m.insert(0x4000 + 2 * 8, 0x5000 | 0b11);
        m.insert(0x5000, 0x9000 | 0b11 | AF | AP_RDONLY);
        m
    }

    #[test]
    fn stage_1_walks_through_the_cd() {
        let m = guest(16);
        let mut read = |a: u64| m.get(&a).copied().or(Some(0));
        let s1 = [S1 | 0x1000, 0];
        assert_eq!(translate(s1, None, 0x40_0123, &mut read), Ok((0x9123, Perm::R)));
        assert_eq!(translate(s1, None, 0x40_1000, &mut read), Err(S1Fault::Translation));
        assert_eq!(translate([ste::V | ste::CONFIG_BYPASS << 1, 0], None, 0x77, &mut read), Ok((0x77, Perm::RW)));
        assert_eq!(translate([ste::V, 0], None, 0x77, &mut read), Err(S1Fault::Abort));
        assert_eq!(translate([0, 0], None, 0x77, &mut read), Err(S1Fault::BadSte), "not valid");
        // A 39-bit input starts at level 1: TTB0 is then the level-1 table.
        let mut m = guest(25);
        m.insert(0x1008, 0x3000);
        let mut read = |a: u64| m.get(&a).copied().or(Some(0));
        assert_eq!(translate(s1, None, 0x40_0123, &mut read), Ok((0x9123, Perm::R)));
        assert_eq!(translate(s1, None, 1 << 39, &mut read), Err(S1Fault::Translation), "beyond T0SZ");
        // A CD that is not valid, and guest memory that cannot be read.
        let mut read = |a: u64| if a == 0x1000 { Some(0) } else { None };
        assert_eq!(translate(s1, None, 0, &mut read), Err(S1Fault::BadCd));
        let mut read = |_| None;
        assert_eq!(translate(s1, None, 0, &mut read), Err(S1Fault::Read { gpa: 0x1000 }));
        // Substream 1 needs S1CDMax of at least 1, and reads the second CD.
        assert_eq!(translate(s1, Some(1), 0, &mut read), Err(S1Fault::BadSubstream));
        let s1_two = [s1[0] | 1 << 59, 0];
        assert_eq!(translate(s1_two, Some(1), 0, &mut read), Err(S1Fault::Read { gpa: 0x1040 }));
        assert_eq!(translate(s1_two, Some(2), 0, &mut read), Err(S1Fault::BadSubstream));
    }

    #[test]
    fn each_guest_configuration_error_is_its_own_fault() {
        let m = guest(16);
        let mut read = |a: u64| m.get(&a).copied().or(Some(0));
        let s1 = [S1 | 0x1000, 0];
        // CDs: AArch32, a 64 KiB granule, an input size the SMMU lacks; TTB0
        // walks disabled is a translation fault, not a bad CD.
        for bad in [cd::AA64, 0b01 << 6] {
            let mut m = m.clone();
            m.insert(0x1000, m[&0x1000] ^ bad);
            let mut read = |a: u64| m.get(&a).copied().or(Some(0));
            assert_eq!(translate(s1, None, 0x40_0000, &mut read), Err(S1Fault::BadCd), "{bad:#x}");
        }
        let mut m2 = guest(12);
        let mut read2 = |a: u64| m2.get(&a).copied().or(Some(0));
        assert_eq!(translate(s1, None, 0x40_0000, &mut read2), Err(S1Fault::BadCd), "T0SZ 12");
        m2 = guest(16);
        m2.insert(0x1000, m2[&0x1000] | cd::EPD0);
        let mut read2 = |a: u64| m2.get(&a).copied().or(Some(0));
        assert_eq!(translate(s1, None, 0x40_0000, &mut read2), Err(S1Fault::Translation), "EPD0");
        // The leaf's access flag.
        let mut m3 = guest(16);
        m3.insert(0x5000, m3[&0x5000] & !AF);
        let mut read3 = |a: u64| m3.get(&a).copied().or(Some(0));
        assert_eq!(translate(s1, None, 0x40_0000, &mut read3), Err(S1Fault::Access));
        // Substreams disabled (S1CDMax 0): any substream is bad.
        assert_eq!(translate(s1, Some(0), 0x40_0000, &mut read), Err(S1Fault::BadSubstream));
        // Substreams enabled: S1DSS decides for transactions without one.
        let s1dss = |dss: u64| [s1[0] | 2 << 59, dss];
        assert_eq!(translate(s1dss(0), None, 0x40_0000, &mut read), Err(S1Fault::StreamDisabled));
        assert_eq!(translate(s1dss(1), None, 0x40_0000, &mut read), Ok((0x40_0000, Perm::RW)), "stage 1 bypassed");
        assert_eq!(translate(s1dss(2), None, 0x40_0123, &mut read), Ok((0x9123, Perm::R)), "CD 0");
        assert_eq!(translate(s1dss(2), Some(0), 0x40_0000, &mut read), Err(S1Fault::BadSubstream), "0 is reserved");
        assert_eq!(translate(s1dss(0), Some(0), 0x40_0123, &mut read), Ok((0x9123, Perm::R)));
        assert_eq!(translate(s1dss(3), None, 0, &mut read), Err(S1Fault::BadSte), "S1DSS reserved");
        assert_eq!(translate([s1[0] | 2 << 59 | 3 << 4, 0], Some(1), 0, &mut read), Err(S1Fault::BadSte), "S1Fmt");
        assert_eq!(translate([s1[0] | 3 << 4, 0], None, 0x40_0123, &mut read), Ok((0x9123, Perm::R)), "S1Fmt unused");
    }

    #[test]
    fn two_level_cd_tables() {
        // L1 at 0x1000: entry 1 points at a 4 KiB leaf table at 0x6000 whose
        // CD 2 (substream 64 + 2) is CD 0 of `guest`, moved; entry 0 is invalid.
        let mut m = guest(16);
        let (cd0, cd1) = (m[&0x1000], m[&0x1008]);
        m.insert(0x1000, 0);
        m.insert(0x1008, 0x6000 | L1CD_V);
        m.insert(0x6000 + 2 * cd::SIZE, cd0);
        m.insert(0x6000 + 2 * cd::SIZE + 8, cd1);
        let mut read = |a: u64| m.get(&a).copied().or(Some(0));
        let l2_4k = [S1 | 0x1000 | 7 << 59 | S1FMT_4K_L2 << 4, 0];
        assert_eq!(translate(l2_4k, Some(66), 0x40_0123, &mut read), Ok((0x9123, Perm::R)));
        assert_eq!(translate(l2_4k, Some(2), 0, &mut read), Err(S1Fault::BadSubstream), "L1 entry 0 invalid");
        assert_eq!(translate(l2_4k, Some(67), 0, &mut read), Err(S1Fault::BadCd), "an empty CD");
        // With 64 KiB leaves, substreams 0..1024 share L1 entry 0.
        let mut m = m.clone();
        m.insert(0x1000, 0x6000 | L1CD_V);
        let mut read = |a: u64| m.get(&a).copied().or(Some(0));
        let l2_64k = [S1 | 0x1000 | 11 << 59 | S1FMT_64K_L2 << 4, 0];
        assert_eq!(translate(l2_64k, Some(2), 0x40_0123, &mut read), Ok((0x9123, Perm::R)));
    }

    #[test]
    fn events_carry_the_code_of_each_fault_and_never_stage_2() {
        use crate::fault::DmaAttrs;
        let ev = |reason, ssid| event(0x42, ssid, 0x1000, reason, false, DmaAttrs::default());
        let code = |reason| ev(reason, None).map(|e| e[0] & 0xff);
        assert_eq!(code(FaultReason::NotPresent), Some(F_TRANSLATION));
        assert_eq!(code(FaultReason::Permission), Some(F_PERMISSION));
        assert_eq!(code(FaultReason::Aperture), Some(F_ADDR_SIZE));
        assert_eq!(code(FaultReason::AccessFlag), Some(F_ACCESS));
        assert_eq!(code(FaultReason::Config(ConfigFault::BadSte)), Some(C_BAD_STE));
        assert_eq!(code(FaultReason::Config(ConfigFault::StreamDisabled)), Some(F_STREAM_DISABLED));
        assert_eq!(code(FaultReason::Config(ConfigFault::BadSubstream)), Some(C_BAD_SUBSTREAMID));
        assert_eq!(code(FaultReason::Config(ConfigFault::BadCd)), Some(C_BAD_CD));
        assert_eq!(code(FaultReason::Config(ConfigFault::Abort)), None, "an aborting STE records nothing");
        assert_eq!(code(FaultReason::Stage2 { gpa: 0x5000, permission: false }), None, "stage 2 is the host's");
        assert_eq!(
            ev(FaultReason::Config(ConfigFault::BadCd), Some(3)),
            Some([0x0a | 1 << 11 | 3 << 12 | 0x42 << 32, 0, 0, 0])
        );
        let attrs = DmaAttrs { exec: true, privileged: true };
        let e = event(0x42, None, 0x1000, FaultReason::NotPresent, false, attrs);
        assert_eq!(e.unwrap()[1], 1 << 33 | 1 << 34 | 1 << 35 | 0b10 << 40, "PnU, InD, RnW, class IN");
    }

    #[test]
    fn registers_and_nested_data_in_linux_layout() {
        let full = super::super::Features { max_pasid_log2: 20, pri: true, dirty_tracking: true };
        let info = ArmSmmuV3.hw_info(full);
        assert_eq!((info.data_type, info.data.len()), (IOMMU_HW_INFO_TYPE_ARM_SMMUV3, 40));
        let smmu = info.get::<iommu_hw_info_arm_smmuv3>().unwrap();
        assert_eq!(smmu.idr[0] & 0b11, 0b11, "stage 1 and stage 2");
        assert_eq!((smmu.idr[0] >> 6) & 0b11, 0b10, "HTTU: access and dirty");
        assert_eq!((smmu.idr[1] >> 6) & 0x1f, 20, "SSIDSIZE");
        assert_eq!(smmu.idr[5] & 0b111, 0b101, "OAS: 48 bits");
        assert_eq!(smmu.iidr & 0xfff, 0x43b);
        assert!(ArmSmmuV3.nested_layout(IOMMU_HWPT_DATA_ARM_SMMUV3, PageFormat::ArmS1).is_none(), "stage 2 only");
        let layout = ArmSmmuV3.nested_layout(IOMMU_HWPT_DATA_ARM_SMMUV3, PageFormat::ArmS2).unwrap();
        assert_eq!((layout.min_len, layout.len), (16, 16));
        let vste = |w0: u64| [w0.to_le_bytes(), 0u64.to_le_bytes()].concat();
        let data = ArmSmmuV3.nested_data(IOMMU_HWPT_DATA_ARM_SMMUV3, &vste(S1 | 0x1000)).unwrap();
        assert!(data.covers_substreams() && data.invalidation().is_none());
        assert!(matches!(ArmSmmuV3.nested_data(2, &vste(ste::V | 0b110 << 1)), Err(Error::Io(_))));
    }

    #[test]
    fn commands_reach_the_whole_vmid_or_one_stream() {
        use super::super::fake::{Core, Entries};
        let full = super::super::Features { max_pasid_log2: 20, pri: false, dirty_tracking: false };
        let core = Core::new(ArmSmmuV3.hw_info(full), 2);
        let cmd = |w0: u64| [w0.to_le_bytes(), 0u64.to_le_bytes()].concat();
        let mut entries = Entries {
            data_type: IOMMU_VIOMMU_INVALIDATE_DATA_ARM_SMMUV3,
            entries: vec![cmd(0x11 | 7 << 48), cmd(0x03 | 1 << 32), cmd(0x03 | 5 << 32), cmd(0x30)],
        };
        let (done, rc) = SmmuViommu.invalidate(&core, &mut entries);
        assert_eq!(done, 2, "stops at the stream with no vDEVICE");
        assert!(matches!(rc, Err(Error::Io(_))));
        assert_eq!(*core.flushed.borrow(), [None, Some(1), Some(5)]);
        entries.data_type = 0;
        assert!(matches!(SmmuViommu.invalidate(&core, &mut entries), (0, Err(Error::Invalid(_)))));
        entries = Entries { data_type: IOMMU_VIOMMU_INVALIDATE_DATA_ARM_SMMUV3, entries: vec![vec![0; 8]] };
        assert!(matches!(SmmuViommu.invalidate(&core, &mut entries), (0, Err(Error::Invalid(_)))), "short");
    }
}
