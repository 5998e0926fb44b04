//! Intel VT-d in scalable mode: second-stage tables for paging domains, a
//! guest's first-stage table in its memory for nested ones
//! (`IOMMU_HWPT_DATA_VTD_S1`), invalidated through the nested HWPT.

use super::{GuestTables, WalkStep};
use crate::domain::{FaultReason, Gpa, PageFormat};
use crate::iotlb::Iotlb;
use crate::pgtable::Perm;
use crate::pgtable::image::{ImageFault, walk_image_from};
use crate::pgtable::x86::VtdFs5;
use crate::{Error, Result};

use super::{DataLayout, Features, HwInfo, HwInfoData, IommuModel, IommuOps, NestedData, Stage1, ViommuType};

/// `GET_HW_INFO` type of [`iommu_hw_info_vtd`].
pub const IOMMU_HW_INFO_TYPE_INTEL_VTD: u32 = 1;
/// `iommu_hw_info_vtd.flags`: the unit has erratum 772415 (SPR17), so a
/// nest-parent domain must not hold read-only mappings.
pub const IOMMU_HW_INFO_VTD_ERRATA_772415_SPR17: u32 = 1 << 0;
/// Nested HWPT data type of [`iommu_hwpt_vtd_s1`].
pub const IOMMU_HWPT_DATA_VTD_S1: u32 = 1;
/// `iommu_hwpt_vtd_s1.flags`: supervisor requests enabled.
pub const IOMMU_VTD_S1_SRE: u64 = 1 << 0;
/// `iommu_hwpt_vtd_s1.flags`: extended access flag enabled.
pub const IOMMU_VTD_S1_EAFE: u64 = 1 << 1;
/// `iommu_hwpt_vtd_s1.flags`: write protection enforced on supervisor requests.
pub const IOMMU_VTD_S1_WPE: u64 = 1 << 2;
/// Invalidation entry type of [`iommu_hwpt_vtd_s1_invalidate`].
pub const IOMMU_HWPT_INVALIDATE_DATA_VTD_S1: u32 = 0;
/// `iommu_hwpt_vtd_s1_invalidate.flags`: only leaf entries changed, so
/// paging-structure caches may be kept.
pub const IOMMU_VTD_INV_FLAGS_LEAF: u32 = 1 << 0;

uapi_struct!(
    /// VT-d's `IOMMU_GET_HW_INFO` data: the capability and extended
    /// capability registers (VT-d spec 11.4.2, 11.4.3) a guest's vIOMMU mirrors.
    iommu_hw_info_vtd { flags: u32, __reserved: u32, cap_reg: u64, ecap_reg: u64 } size 24
);
uapi_struct!(
    /// A nested HWPT's VT-d first-stage table: its guest-physical root, its
    /// width (48 or 57 bits) and `IOMMU_VTD_S1_*` flags.
    iommu_hwpt_vtd_s1 { flags: u64, pgtbl_addr: u64, addr_width: u32, __reserved: u32 } size 24
);
uapi_struct!(
    /// One `IOMMU_HWPT_INVALIDATE` entry for a VT-d nested HWPT: `npages`
    /// 4 KiB pages from `addr` (`addr` 0 and `npages` `u64::MAX`: all).
    iommu_hwpt_vtd_s1_invalidate { addr: u64, npages: u64, flags: u32, __reserved: u32 } size 24
);

impl HwInfoData for iommu_hw_info_vtd {
    const TYPE: u32 = IOMMU_HW_INFO_TYPE_INTEL_VTD;
}

/// A VT-d unit whose second-stage tables are `levels` deep (4 or 5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct IntelVtd {
    pub(crate) levels: u32,
}

impl IommuOps for IntelVtd {
    fn name(&self) -> &'static str {
        "Intel VT-d"
    }

    fn paging_format(&self, _nest_parent: bool) -> PageFormat {
        if self.levels == 5 { PageFormat::VtdSs5 } else { PageFormat::VtdSs4 }
    }

    fn serves(&self, format: PageFormat) -> bool {
        matches!(format, PageFormat::VtdSs4 | PageFormat::VtdSs5)
    }

    fn hw_info(&self, features: Features) -> HwInfo {
        let pasid_bits = u64::from(features.max_pasid_log2);
        // Capability register (VT-d 11.4.2): 16-bit domain IDs, SAGAW for
        // the table depth, MGAW one less than the address width, 2 MiB and
        // 1 GiB second-stage pages, page-selective invalidation, 1 GiB
        // first-stage pages, and 5-level first-stage paging with 5-level
        // tables.
        let width = u64::from(self.paging_format(false).iova_bits());
        let sagaw = if self.levels == 5 { 1 << 3 } else { 1 << 2 };
        let mut cap = 6 | sagaw << 8 | (width - 1) << 16 | 0b11 << 34 | 1 << 39 | 1 << 56;
        if self.levels == 5 {
            cap |= 1 << 60;
        }
        // Extended capability register (VT-d 11.4.3): coherent, queued
        // invalidation, device TLBs, interrupt remapping, pass-through,
        // snoop control, nesting, scalable mode, first- and second-stage
        // translation, and per feature: page requests, PASIDs and their
        // width, second-stage A/D bits.
        let mut ecap = 1 | 1 << 1 | 1 << 2 | 1 << 3 | 1 << 6 | 1 << 7 | 1 << 26 | 1 << 43 | 1 << 46 | 1 << 47;
        if features.pri {
            ecap |= 1 << 29;
        }
        if pasid_bits > 0 {
            ecap |= (pasid_bits - 1) << 35 | 1 << 40;
        }
        if features.dirty_tracking {
            ecap |= 1 << 45;
        }
        HwInfo::new(&iommu_hw_info_vtd { cap_reg: cap, ecap_reg: ecap, ..Default::default() })
    }

    fn nested_layout(&self, data_type: u32, parent: PageFormat) -> Option<DataLayout> {
        (data_type == IOMMU_HWPT_DATA_VTD_S1 && self.serves(parent))
            .then_some(DataLayout::of::<iommu_hwpt_vtd_s1>(data_type))
    }

    /// As Intel's driver checks it: known flags, a 48- or 57-bit width, an
    /// aligned root.
    fn nested_data(&self, _data_type: u32, data: &[u8]) -> Result<NestedData> {
        let s1 = iommu_hwpt_vtd_s1::read_from_prefix(data).map_err(|_| Error::Invalid("short VT-d stage-1 data"))?.0;
        if s1.flags & !(IOMMU_VTD_S1_SRE | IOMMU_VTD_S1_EAFE | IOMMU_VTD_S1_WPE) != 0 || s1.__reserved != 0 {
            return Err(Error::Unsupported("unknown VT-d stage-1 flags"));
        }
        let levels = match s1.addr_width {
            48 => 4,
            57 => 5,
            _ => return Err(Error::Invalid("VT-d stage 1 is 48 or 57 bits wide")),
        };
        if s1.pgtbl_addr & 0xfff != 0 {
            return Err(Error::Invalid("the stage-1 root is not page aligned"));
        }
        Ok(NestedData::vtd_s1(s1.pgtbl_addr, levels))
    }
}

use zerocopy::FromBytes;

/// A VT-d first-stage table owned by the guest: its root at guest-physical
/// `root` (an IOVA of the parent's IOAS), `levels` deep (4 or 5). `iotlb`
/// caches combined stage-1 + stage-2 translations.
pub(crate) struct VtdS1 {
    root: u64,
    levels: u32,
    iotlb: Iotlb,
}

impl NestedData {
    /// A VT-d first-stage table of the guest, rooted at guest-physical
    /// `root` (an IOVA of the nest parent), `levels` deep (4 or 5). Unlike
    /// `IOMMU_HWPT_DATA_VTD_S1` this takes no flags and checks nothing: a
    /// bad root shows as translation faults on DMA.
    pub fn vtd_s1(root: u64, levels: u32) -> Self {
        NestedData::new(VtdS1 { root, levels, iotlb: Iotlb::new() })
    }
}

impl Stage1 for VtdS1 {
    fn fits(&self, iommu: IommuModel, _viommu: Option<ViommuType>) -> bool {
        matches!(iommu, IommuModel::IntelVtd { .. })
    }

    fn iotlb(&self) -> Option<&Iotlb> {
        Some(&self.iotlb)
    }

    fn walk(
        &self,
        iova: u64,
        _ssid: Option<u32>,
        tables: &mut GuestTables<'_>,
    ) -> std::result::Result<(Gpa, Perm), FaultReason> {
        // The first stage skips no level, so reads come one a level; a
        // 4-level table is the 5-level format entered one level down.
        let top = self.levels.checked_sub(1).ok_or(FaultReason::NotPresent)?;
        let mut level = self.levels;
        let mut failed = None;
        let mut read_entry = |entry| {
            level -= 1;
            let (host, pte) = tables.read(Gpa(entry)).map_err(|r| failed = Some(r)).ok()?;
            tables.step(WalkStep { level, entry_gpa: Gpa(entry), entry_host: host, pte });
            Some(pte)
        };
        let t = walk_image_from::<VtdFs5>(self.root, top, iova, &mut read_entry).map_err(|f| match f {
            ImageFault::Read { .. } => failed.unwrap_or(FaultReason::NotPresent),
            _ => FaultReason::NotPresent,
        })?;
        Ok((Gpa(t.addr), t.perm))
    }

    fn invalidation(&self) -> Option<DataLayout> {
        Some(DataLayout::of::<iommu_hwpt_vtd_s1_invalidate>(IOMMU_HWPT_INVALIDATE_DATA_VTD_S1))
    }

    /// A stage-1 descriptor, as Intel's driver checks it. Any valid one
    /// drops the whole combined IOTLB: exact, if coarser than ranges.
    fn invalidate(&self, entry: &[u8]) -> Result<()> {
        let inv = iommu_hwpt_vtd_s1_invalidate::read_from_prefix(entry)
            .map_err(|_| Error::Invalid("short VT-d invalidation"))?
            .0;
        if inv.flags & !IOMMU_VTD_INV_FLAGS_LEAF != 0 || inv.__reserved != 0 {
            return Err(Error::Unsupported("unknown VT-d invalidation flags"));
        }
        if inv.addr & 0xfff != 0 || (inv.npages == u64::MAX && inv.addr != 0) {
            return Err(Error::Invalid("bad VT-d invalidation range"));
        }
        self.iotlb.invalidate_all();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use zerocopy::IntoBytes;

    const PLAIN: Features = Features { max_pasid_log2: 0, pri: false, dirty_tracking: false };
    const FULL: Features = Features { max_pasid_log2: 20, pri: true, dirty_tracking: true };

    fn regs(levels: u32, f: Features) -> (u64, u64) {
        let info = IntelVtd { levels }.hw_info(f);
        assert_eq!(info.data_type, IOMMU_HW_INFO_TYPE_INTEL_VTD);
        assert_eq!(info.data.len(), 24);
        let vtd = info.get::<iommu_hw_info_vtd>().unwrap();
        (vtd.cap_reg, vtd.ecap_reg)
    }

    #[test]
    fn registers_describe_the_table_depth_and_features() {
        let (cap_reg, ecap_reg) = regs(4, PLAIN);
        assert_eq!((cap_reg >> 8) & 0x1f, 0b00100, "SAGAW: 4-level tables");
        assert_eq!((cap_reg >> 16) & 0x3f, 47, "MGAW: 48-bit addresses");
        assert_eq!(ecap_reg & (1 << 40 | 1 << 29 | 1 << 45), 0, "no PASID, PRS or SLADS");
        let (cap_reg, ecap_reg) = regs(5, FULL);
        assert_eq!((cap_reg >> 8) & 0x1f, 0b01000, "SAGAW: 5-level tables");
        assert_eq!((cap_reg >> 16) & 0x3f, 56);
        assert_eq!((ecap_reg >> 35) & 0x1f, 19, "PSS: 20-bit PASIDs");
        assert_ne!(ecap_reg & 1 << 26, 0, "nesting");
        assert_ne!(ecap_reg & 1 << 45, 0, "second-stage A/D bits");
    }

    #[test]
    fn stage_1_data_is_checked_as_intel_checks_it() {
        let vtd = IntelVtd { levels: 4 };
        assert!(vtd.nested_layout(IOMMU_HWPT_DATA_VTD_S1, PageFormat::VtdSs5).is_some());
        assert!(vtd.nested_layout(IOMMU_HWPT_DATA_VTD_S1, PageFormat::ArmS2).is_none());
        assert!(vtd.nested_layout(2, PageFormat::VtdSs4).is_none());
        let data = |flags, addr_width, pgtbl_addr| iommu_hwpt_vtd_s1 { flags, pgtbl_addr, addr_width, __reserved: 0 };
        let decode = |d: iommu_hwpt_vtd_s1| vtd.nested_data(IOMMU_HWPT_DATA_VTD_S1, d.as_bytes()).map(|_| ());
        assert_eq!(decode(data(IOMMU_VTD_S1_WPE, 57, 0x1000)), Ok(()));
        assert!(matches!(decode(data(1 << 3, 48, 0x1000)), Err(Error::Unsupported(_))));
        assert!(matches!(decode(data(0, 39, 0x1000)), Err(Error::Invalid(_))));
        assert!(matches!(decode(data(0, 48, 0x1008)), Err(Error::Invalid(_))));
    }

    #[test]
    fn invalidations_are_checked_then_drop_the_cache() {
        let s1 = VtdS1 { root: 0, levels: 4, iotlb: Iotlb::new() };
        let inv = |addr, npages, flags| iommu_hwpt_vtd_s1_invalidate { addr, npages, flags, __reserved: 0 };
        let before = s1.iotlb.generation();
        assert_eq!(s1.invalidate(inv(0x1000, 1, IOMMU_VTD_INV_FLAGS_LEAF).as_bytes()), Ok(()));
        assert_ne!(s1.iotlb.generation(), before);
        assert!(matches!(s1.invalidate(inv(0, 1, 2).as_bytes()), Err(Error::Unsupported(_))));
        assert!(matches!(s1.invalidate(inv(0x1001, 1, 0).as_bytes()), Err(Error::Invalid(_))));
        assert!(matches!(s1.invalidate(inv(0x1000, u64::MAX, 0).as_bytes()), Err(Error::Invalid(_))));
        assert_eq!(s1.invalidate(inv(0, u64::MAX, 0).as_bytes()), Ok(()), "everything");
    }
}
