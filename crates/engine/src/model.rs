//! The IOMMU in front of a device. Its architecture decides the page-table
//! formats its domains use, the aperture, and the hardware description
//! `IOMMU_GET_HW_INFO` reports: the registers a VMM reads to build a
//! matching virtual IOMMU for its guest.
//!
//! A guest behind an emulated SMMUv3: its stream table entry and stage-1
//! tables live in guest memory, the host's stage 2 under them, and the
//! guest's TLB invalidations go to the vIOMMU.
//!
//! ```
//! use ioasid_engine::pgtable::arm::{AF, AP_RDONLY};
//! use ioasid_engine::smmuv3::{cd, ste, CMD_TLBI_NH_ASID};
//! use ioasid_engine::{Context, DeviceInfo, HostBuffer, HwInfo, HwptFlags, IommuModel, NestedData, Perm, ViommuType};
//!
//! let ctx = Context::new();
//! let ioas = ctx.ioas_alloc()?;
//! let ram = HostBuffer::new(0x20000)?; // guest RAM, guest-physical 0
//! // SAFETY: `ram` outlives the context's use of it.
//! unsafe { ctx.map_user(ioas, ram.addr(), 0x20000, Some(0), Perm::RW)? };
//! let dev = ctx.bind_device(DeviceInfo::behind(IommuModel::ArmSmmuV3, "nic", 0x10))?;
//! let HwInfo::ArmSmmuV3 { idr, .. } = ctx.get(dev)?.info().hw_info() else { unreachable!() };
//! assert_eq!(idr[0] & 0b11, 0b11, "stage 1 and stage 2");
//!
//! // The guest: CD 0 at 0x1000 (TTB0 0x2000, 48-bit input); four table
//! // levels at 0x2000..0x5000 map IOVA 0 to guest page 0x8000, read-only.
//! let put = |gpa: usize, v: u64| ram.write_at(gpa, &v.to_le_bytes());
//! put(0x1000, cd::V | cd::AA64 | 16 | 7 << cd::ASID_SHIFT);
//! put(0x1008, 0x2000);
//! put(0x2000, 0x3000 | 0b11);
//! put(0x3000, 0x4000 | 0b11);
//! put(0x4000, 0x5000 | 0b11);
//! put(0x5000, 0x8000 | 0b11 | AF | AP_RDONLY);
//! ram.write_at(0x8000, b"hello");
//!
//! let s2 = ctx.hwpt_alloc(dev, ioas, HwptFlags { nest_parent: true, dirty_tracking: false }, None)?;
//! let viommu = ctx.viommu_alloc(dev, s2, ViommuType::ArmSmmuV3)?;
//! ctx.vdevice_alloc(viommu, dev, 0x10)?; // the guest's StreamID
//! let vste = [ste::V | ste::CONFIG_S1 << 1 | 0x1000, 0];
//! let nested = ctx.hwpt_alloc_nested(dev, viommu, NestedData::arm_smmuv3(vste)?, None)?;
//! ctx.attach(dev, nested)?;
//!
//! let mut buf = [0u8; 5];
//! ctx.get(dev)?.dma_read(0, &mut buf)?;
//! assert_eq!(&buf, b"hello");
//! assert!(ctx.get(dev)?.dma_write(0, b"x").is_err(), "stage 1 is read-only");
//! ctx.get(viommu)?.invalidate([u64::from(CMD_TLBI_NH_ASID) | 7 << 48, 0])?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use crate::hwpt::PageFormat;
use crate::iova::IovaRange;

/// An IOMMU architecture, as emulated for a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IommuModel {
    /// Intel VT-d in scalable mode, second-stage tables of `levels` (4 or 5).
    IntelVtd { levels: u32 },
    /// Arm SMMUv3: stage-1 tables for paging domains, stage 2 under nesting.
    ArmSmmuV3,
    /// AMD-Vi with v1 host tables, Mode 4.
    AmdVi,
    /// Linux's selftest mock IOMMU; `huge` adds its 1 MiB IO pages.
    Selftest { huge: bool },
}

/// What the IOMMU's registers say, per architecture (see `hw_info`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HwInfo {
    /// VT-d's Capability and Extended Capability registers.
    IntelVtd { cap_reg: u64, ecap_reg: u64 },
    /// SMMUv3's IDR0-IDR5, IIDR and AIDR.
    ArmSmmuV3 { idr: [u32; 6], iidr: u32, aidr: u32 },
    /// AMD-Vi's Extended Feature registers.
    AmdVi { efr: u64, efr2: u64 },
    /// The mock's test register.
    Selftest,
}

/// What a device brings to its IOMMU's description: PASIDs, PRI, and
/// whether dirty tracking is offered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Features {
    pub max_pasid_log2: u8,
    pub pri: bool,
    pub dirty_tracking: bool,
}

impl IommuModel {
    pub const VTD: IommuModel = IommuModel::IntelVtd { levels: 4 };

    /// The format of a paging domain; `nest_parent` asks for the stage that
    /// sits under a guest's tables.
    pub fn paging_format(self, nest_parent: bool) -> PageFormat {
        match self {
            IommuModel::IntelVtd { levels: 5 } => PageFormat::VtdSs5,
            IommuModel::IntelVtd { .. } => PageFormat::VtdSs4,
            IommuModel::ArmSmmuV3 if nest_parent => PageFormat::ArmS2,
            IommuModel::ArmSmmuV3 => PageFormat::ArmS1,
            IommuModel::AmdVi => PageFormat::AmdV1,
            IommuModel::Selftest { huge: true } => PageFormat::MockHuge,
            IommuModel::Selftest { huge: false } => PageFormat::Mock,
        }
    }

    /// Whether a device behind this IOMMU can attach to a table in `format`:
    /// tables belong to one architecture (the mock's huge pages are a device
    /// option, and an SMMU walks both its stages).
    pub fn serves(self, format: PageFormat) -> bool {
        match self {
            IommuModel::IntelVtd { .. } => matches!(format, PageFormat::VtdSs4 | PageFormat::VtdSs5),
            IommuModel::ArmSmmuV3 => matches!(format, PageFormat::ArmS1 | PageFormat::ArmS2),
            IommuModel::AmdVi => format == PageFormat::AmdV1,
            IommuModel::Selftest { .. } => format.is_mock(),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            IommuModel::IntelVtd { .. } => "Intel VT-d",
            IommuModel::ArmSmmuV3 => "Arm SMMUv3",
            IommuModel::AmdVi => "AMD-Vi",
            IommuModel::Selftest { .. } => "selftest mock",
        }
    }

    pub fn is_selftest(self) -> bool {
        matches!(self, IommuModel::Selftest { .. })
    }

    /// The IOVAs a default paging domain translates.
    pub fn aperture(self) -> IovaRange {
        match self {
            IommuModel::Selftest { .. } => crate::device::MOCK_APERTURE,
            _ => IovaRange::new(0, (1u64 << self.paging_format(false).iova_bits()) - 1),
        }
    }

    /// The registers of this IOMMU as a device with `features` sees it.
    pub fn hw_info(self, features: Features) -> HwInfo {
        let pasid_bits = u64::from(features.max_pasid_log2);
        match self {
            IommuModel::IntelVtd { levels } => {
                // Capability register (VT-d 11.4.2): 16-bit domain IDs,
                // SAGAW for the table depth, MGAW one less than the address
                // width, 2 MiB and 1 GiB second-stage pages, page-selective
                // invalidation, 1 GiB first-stage pages, and 5-level
                // first-stage paging with 5-level tables.
                let width = u64::from(self.paging_format(false).iova_bits());
                let sagaw = if levels == 5 { 1 << 3 } else { 1 << 2 };
                let mut cap = 6 | sagaw << 8 | (width - 1) << 16 | 0b11 << 34 | 1 << 39 | 1 << 56;
                if levels == 5 {
                    cap |= 1 << 60;
                }
                // Extended capability register (VT-d 11.4.3): coherent,
                // queued invalidation, device TLBs, interrupt remapping,
                // pass-through, snoop control, nesting, scalable mode, first-
                // and second-stage translation, and per feature: page
                // requests, PASIDs and their width, second-stage A/D bits.
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
                HwInfo::IntelVtd { cap_reg: cap, ecap_reg: ecap }
            }
            IommuModel::ArmSmmuV3 => {
                // IDR0 (SMMUv3 6.3.1): stage 1 and 2, AArch64 tables,
                // coherent, 16-bit ASIDs and VMIDs, MSIs, two-level stream
                // and CD tables; hardware access/dirty update (HTTU) when it
                // tracks dirty pages; PRI with page requests.
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
                HwInfo::ArmSmmuV3 { idr: [idr0, idr1, 0, idr3, 0, idr5], iidr: 0x43b, aidr: 1 }
            }
            IommuModel::AmdVi => {
                // Extended Feature Register: guest translation, invalidate
                // all, hardware error registers, performance counters;
                // page requests (PPR), PASID width (PASmax), host
                // access/dirty bits when tracking.
                let mut efr = 1 << 4 | 1 << 6 | 1 << 8 | 1 << 9;
                if features.pri {
                    efr |= 1 << 1;
                }
                if pasid_bits > 0 {
                    efr |= (pasid_bits - 1) << 32;
                }
                if features.dirty_tracking {
                    efr |= 1 << 49 | 1 << 52;
                }
                HwInfo::AmdVi { efr, efr2: 0 }
            }
            IommuModel::Selftest { .. } => HwInfo::Selftest,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PLAIN: Features = Features { max_pasid_log2: 0, pri: false, dirty_tracking: false };
    const FULL: Features = Features { max_pasid_log2: 20, pri: true, dirty_tracking: true };

    #[test]
    fn vtd_registers_describe_the_table_depth_and_features() {
        let HwInfo::IntelVtd { cap_reg, ecap_reg } = IommuModel::VTD.hw_info(PLAIN) else { panic!() };
        assert_eq!((cap_reg >> 8) & 0x1f, 0b00100, "SAGAW: 4-level tables");
        assert_eq!((cap_reg >> 16) & 0x3f, 47, "MGAW: 48-bit addresses");
        assert_eq!(ecap_reg & (1 << 40 | 1 << 29 | 1 << 45), 0, "no PASID, PRS or SLADS");
        let HwInfo::IntelVtd { cap_reg, ecap_reg } = IommuModel::IntelVtd { levels: 5 }.hw_info(FULL) else { panic!() };
        assert_eq!((cap_reg >> 8) & 0x1f, 0b01000, "SAGAW: 5-level tables");
        assert_eq!((cap_reg >> 16) & 0x3f, 56);
        assert_eq!((ecap_reg >> 35) & 0x1f, 19, "PSS: 20-bit PASIDs");
        assert_ne!(ecap_reg & 1 << 26, 0, "nesting");
        assert_ne!(ecap_reg & 1 << 45, 0, "second-stage A/D bits");
    }

    #[test]
    fn smmu_and_amd_registers() {
        let HwInfo::ArmSmmuV3 { idr, iidr, .. } = IommuModel::ArmSmmuV3.hw_info(FULL) else { panic!() };
        assert_eq!(idr[0] & 0b11, 0b11, "stage 1 and stage 2");
        assert_eq!((idr[0] >> 6) & 0b11, 0b10, "HTTU: access and dirty");
        assert_eq!((idr[1] >> 6) & 0x1f, 20, "SSIDSIZE");
        assert_eq!(idr[5] & 0b111, 0b101, "OAS: 48 bits");
        assert_ne!(idr[5] & 1 << 4, 0, "4 KiB granule");
        assert_eq!(iidr & 0xfff, 0x43b);
        let HwInfo::AmdVi { efr, .. } = IommuModel::AmdVi.hw_info(FULL) else { panic!() };
        assert_eq!((efr >> 32) & 0x1f, 19, "PASmax");
        assert_ne!(efr & 1 << 52, 0, "HDSup");
    }

    #[test]
    fn formats_follow_the_architecture() {
        assert_eq!(IommuModel::ArmSmmuV3.paging_format(false), PageFormat::ArmS1);
        assert_eq!(IommuModel::ArmSmmuV3.paging_format(true), PageFormat::ArmS2);
        assert!(IommuModel::ArmSmmuV3.serves(PageFormat::ArmS2));
        assert!(!IommuModel::AmdVi.serves(PageFormat::VtdSs4));
        assert!(IommuModel::Selftest { huge: false }.serves(PageFormat::MockHuge));
        assert_eq!(IommuModel::AmdVi.aperture(), IovaRange::new(0, (1 << 48) - 1));
    }
}
