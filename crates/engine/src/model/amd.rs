//! AMD-Vi with v1 host tables (Mode 4). It takes no nested HWPTs here.

use crate::domain::PageFormat;

use super::{Features, HwInfo, HwInfoData, IommuOps};

/// Later kernels (AMD's hw_info arrived after 6.12).
pub const IOMMU_HW_INFO_TYPE_AMD: u32 = 4;

uapi_struct!(
    /// AMD-Vi's `IOMMU_GET_HW_INFO` data: the Extended Feature Registers
    /// (MMIO 0x30 and 0x1A0) a guest's vIOMMU mirrors.
    iommu_hw_info_amd { efr: u64, efr2: u64 } size 16
);

impl HwInfoData for iommu_hw_info_amd {
    const TYPE: u32 = IOMMU_HW_INFO_TYPE_AMD;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct AmdVi;

impl IommuOps for AmdVi {
    fn name(&self) -> &'static str {
        "AMD-Vi"
    }

    fn paging_format(&self, _nest_parent: bool) -> PageFormat {
        PageFormat::AmdV1
    }

    fn serves(&self, format: PageFormat) -> bool {
        format == PageFormat::AmdV1
    }

    fn hw_info(&self, features: Features) -> HwInfo {
        let pasid_bits = u64::from(features.max_pasid_log2);
        // Extended Feature Register: guest translation, invalidate all,
        // hardware error registers, performance counters; page requests
        // (PPR), PASID width (PASmax), host access/dirty bits when tracking.
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
        HwInfo::new(&iommu_hw_info_amd { efr, efr2: 0 })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extended_features_follow_the_device() {
        let full = Features { max_pasid_log2: 20, pri: true, dirty_tracking: true };
        let info = AmdVi.hw_info(full);
        assert_eq!((info.data_type, info.data.len()), (IOMMU_HW_INFO_TYPE_AMD, 16));
        let efr = info.get::<iommu_hw_info_amd>().unwrap().efr;
        assert_eq!((efr >> 32) & 0x1f, 19, "PASmax");
        assert_ne!(efr & 1 << 52, 0, "HDSup");
        assert_ne!(efr & 1 << 1, 0, "PPRSup");
        let plain = AmdVi.hw_info(Features { max_pasid_log2: 0, pri: false, dirty_tracking: false });
        assert_eq!(plain.get::<iommu_hw_info_amd>().unwrap().efr, 1 << 4 | 1 << 6 | 1 << 8 | 1 << 9);
    }
}
