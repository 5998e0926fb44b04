//! The structs and numbers of Linux's `include/uapi/linux/iommufd.h`, up
//! to 7.3's. Every layout is asserted against the C header's sizes and
//! offsets. Types for hardware ioasid does not model (Tegra241 CMDQV, AMD's
//! guest DTE) are here so the dispatcher can answer them as Linux does on a
//! machine without that hardware.

#![allow(non_camel_case_types)]

use core::mem::{offset_of, size_of};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

pub const IOMMUFD_TYPE: u32 = b';' as u32;

/// `_IO(ty, nr)`: no direction or size bits, as iommufd encodes them.
pub const fn io_type(ty: u32, nr: u32) -> u32 {
    (ty << 8) | nr
}

/// `_IO(IOMMUFD_TYPE, nr)`.
pub const fn io(nr: u32) -> u32 {
    io_type(IOMMUFD_TYPE, nr)
}

pub const IOMMUFD_CMD_BASE: u32 = 0x80;
pub const IOMMUFD_CMD_DESTROY: u32 = 0x80;
pub const IOMMUFD_CMD_IOAS_ALLOC: u32 = 0x81;
pub const IOMMUFD_CMD_IOAS_ALLOW_IOVAS: u32 = 0x82;
pub const IOMMUFD_CMD_IOAS_COPY: u32 = 0x83;
pub const IOMMUFD_CMD_IOAS_IOVA_RANGES: u32 = 0x84;
pub const IOMMUFD_CMD_IOAS_MAP: u32 = 0x85;
pub const IOMMUFD_CMD_IOAS_UNMAP: u32 = 0x86;
pub const IOMMUFD_CMD_OPTION: u32 = 0x87;
pub const IOMMUFD_CMD_VFIO_IOAS: u32 = 0x88;
pub const IOMMUFD_CMD_HWPT_ALLOC: u32 = 0x89;
pub const IOMMUFD_CMD_GET_HW_INFO: u32 = 0x8a;
pub const IOMMUFD_CMD_HWPT_SET_DIRTY_TRACKING: u32 = 0x8b;
pub const IOMMUFD_CMD_HWPT_GET_DIRTY_BITMAP: u32 = 0x8c;
pub const IOMMUFD_CMD_HWPT_INVALIDATE: u32 = 0x8d;
pub const IOMMUFD_CMD_FAULT_QUEUE_ALLOC: u32 = 0x8e;
pub const IOMMUFD_CMD_IOAS_MAP_FILE: u32 = 0x8f;
pub const IOMMUFD_CMD_VIOMMU_ALLOC: u32 = 0x90;
pub const IOMMUFD_CMD_VDEVICE_ALLOC: u32 = 0x91;
pub const IOMMUFD_CMD_VEVENTQ_ALLOC: u32 = 0x93;
pub const IOMMUFD_CMD_IOAS_NOIOMMU_GET_PA: u32 = 0x95;

pub const IOMMU_DESTROY: u32 = io(IOMMUFD_CMD_DESTROY);
pub const IOMMU_IOAS_ALLOC: u32 = io(IOMMUFD_CMD_IOAS_ALLOC);
pub const IOMMU_IOAS_ALLOW_IOVAS: u32 = io(IOMMUFD_CMD_IOAS_ALLOW_IOVAS);
pub const IOMMU_IOAS_COPY: u32 = io(IOMMUFD_CMD_IOAS_COPY);
pub const IOMMU_IOAS_IOVA_RANGES: u32 = io(IOMMUFD_CMD_IOAS_IOVA_RANGES);
pub const IOMMU_IOAS_MAP: u32 = io(IOMMUFD_CMD_IOAS_MAP);
pub const IOMMU_IOAS_UNMAP: u32 = io(IOMMUFD_CMD_IOAS_UNMAP);
pub const IOMMU_OPTION: u32 = io(IOMMUFD_CMD_OPTION);
pub const IOMMU_VFIO_IOAS: u32 = io(IOMMUFD_CMD_VFIO_IOAS);
pub const IOMMU_HWPT_ALLOC: u32 = io(IOMMUFD_CMD_HWPT_ALLOC);
pub const IOMMU_GET_HW_INFO: u32 = io(IOMMUFD_CMD_GET_HW_INFO);
pub const IOMMU_HWPT_SET_DIRTY_TRACKING: u32 = io(IOMMUFD_CMD_HWPT_SET_DIRTY_TRACKING);
pub const IOMMU_HWPT_GET_DIRTY_BITMAP: u32 = io(IOMMUFD_CMD_HWPT_GET_DIRTY_BITMAP);
pub const IOMMU_HWPT_INVALIDATE: u32 = io(IOMMUFD_CMD_HWPT_INVALIDATE);
pub const IOMMU_FAULT_QUEUE_ALLOC: u32 = io(IOMMUFD_CMD_FAULT_QUEUE_ALLOC);
pub const IOMMU_IOAS_MAP_FILE: u32 = io(IOMMUFD_CMD_IOAS_MAP_FILE);
pub const IOMMU_VIOMMU_ALLOC: u32 = io(IOMMUFD_CMD_VIOMMU_ALLOC);
pub const IOMMU_VDEVICE_ALLOC: u32 = io(IOMMUFD_CMD_VDEVICE_ALLOC);
pub const IOMMU_VEVENTQ_ALLOC: u32 = io(IOMMUFD_CMD_VEVENTQ_ALLOC);
pub const IOMMU_IOAS_NOIOMMU_GET_PA: u32 = io(IOMMUFD_CMD_IOAS_NOIOMMU_GET_PA);

/// `enum iommu_veventq_type`: 0 is never a queue's type.
pub const IOMMU_VEVENTQ_TYPE_DEFAULT: u32 = 0;
/// The selftest driver's events (`iommufd_test.h`).
pub const IOMMU_VEVENTQ_TYPE_SELFTEST: u32 = ioasid_engine::veventq::VEVENTQ_TYPE_SELFTEST;
pub const IOMMU_VEVENTQ_TYPE_ARM_SMMUV3: u32 = ioasid_engine::veventq::VEVENTQ_TYPE_ARM_SMMUV3;
pub const IOMMU_VEVENTQ_FLAG_LOST_EVENTS: u32 = ioasid_engine::veventq::LOST_EVENTS;
/// NVIDIA Tegra241 CMDQV's events (7.3); no device ioasid offers has one.
pub const IOMMU_VEVENTQ_TYPE_TEGRA241_CMDQV: u32 = 2;

/// `enum iommu_viommu_type`; 0 was the core's generic type, since dropped.
pub const IOMMU_VIOMMU_TYPE_DEFAULT: u32 = 0;
/// The selftest driver's vIOMMU (`iommufd_test.h`).
pub use ioasid_engine::model::selftest::IOMMU_VIOMMU_TYPE_SELFTEST;
pub use ioasid_engine::model::smmuv3::IOMMU_VIOMMU_TYPE_ARM_SMMUV3;
/// An SMMUv3 extended by Tegra241 CMDQV (7.3).
pub const IOMMU_VIOMMU_TYPE_TEGRA241_CMDQV: u32 = 2;

/// `enum iommu_hw_queue_type` (7.3): 0 is never a queue's type.
pub const IOMMU_HW_QUEUE_TYPE_DEFAULT: u32 = 0;
pub const IOMMU_HW_QUEUE_TYPE_TEGRA241_CMDQV: u32 = 1;

pub const IOMMU_IOAS_MAP_FIXED_IOVA: u32 = 1 << 0;
pub const IOMMU_IOAS_MAP_WRITEABLE: u32 = 1 << 1;
pub const IOMMU_IOAS_MAP_READABLE: u32 = 1 << 2;

pub const IOMMU_OPTION_RLIMIT_MODE: u32 = 0;
pub const IOMMU_OPTION_HUGE_PAGES: u32 = 1;
pub const IOMMU_OPTION_OP_SET: u16 = 0;
pub const IOMMU_OPTION_OP_GET: u16 = 1;

pub const IOMMU_VFIO_IOAS_GET: u16 = 0;
pub const IOMMU_VFIO_IOAS_SET: u16 = 1;
pub const IOMMU_VFIO_IOAS_CLEAR: u16 = 2;

pub const IOMMU_HWPT_ALLOC_NEST_PARENT: u32 = 1 << 0;
pub const IOMMU_HWPT_ALLOC_DIRTY_TRACKING: u32 = 1 << 1;
pub const IOMMU_HWPT_FAULT_ID_VALID: u32 = 1 << 2;
/// Later kernels: the HWPT may be attached to PASIDs.
pub const IOMMU_HWPT_ALLOC_PASID: u32 = 1 << 3;

pub const IOMMU_HWPT_DATA_NONE: u32 = 0;
/// AMD's guest DTE for a nested HWPT (7.3).
pub const IOMMU_HWPT_DATA_AMD_GUEST: u32 = 3;

pub const IOMMU_HW_INFO_TYPE_NONE: u32 = 0;
/// Later kernels' name for "whatever the IOMMU has" (the same value as NONE).
pub const IOMMU_HW_INFO_TYPE_DEFAULT: u32 = 0;
/// Later kernels: `out_data_type` carries the type the caller asks for.
pub const IOMMU_HW_INFO_FLAG_INPUT_TYPE: u32 = 1 << 0;
pub const IOMMU_HW_INFO_TYPE_TEGRA241_CMDQV: u32 = 3;

pub const IOMMU_HW_CAP_DIRTY_TRACKING: u64 = 1 << 0;
pub const IOMMU_HW_CAP_PCI_PASID_EXEC: u64 = 1 << 1;
pub const IOMMU_HW_CAP_PCI_PASID_PRIV: u64 = 1 << 2;
/// 7.3: the device cannot use ATS (its absence means it may).
pub const IOMMU_HW_CAP_PCI_ATS_NOT_SUPPORTED: u64 = 1 << 3;

pub const IOMMU_HWPT_DIRTY_TRACKING_ENABLE: u32 = 1;
pub const IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR: u32 = 1;

pub const IOMMU_PGFAULT_FLAGS_PASID_VALID: u32 = 1 << 0;
pub const IOMMU_PGFAULT_FLAGS_LAST_PAGE: u32 = 1 << 1;
pub const IOMMU_PGFAULT_PERM_READ: u32 = 1 << 0;
pub const IOMMU_PGFAULT_PERM_WRITE: u32 = 1 << 1;
pub const IOMMU_PGFAULT_PERM_EXEC: u32 = 1 << 2;
pub const IOMMU_PGFAULT_PERM_PRIV: u32 = 1 << 3;
pub const IOMMUFD_PAGE_RESP_SUCCESS: u32 = 0;
pub const IOMMUFD_PAGE_RESP_INVALID: u32 = 1;

// Each IOMMU model's structs and numbers live beside it in the engine.
pub use ioasid_engine::model::amd::{IOMMU_HW_INFO_TYPE_AMD, iommu_hw_info_amd};
pub use ioasid_engine::model::smmuv3::{
    IOMMU_HW_INFO_ARM_SMMUV3_ERRATA_REPEAT_TLBI_CFGI, IOMMU_HW_INFO_TYPE_ARM_SMMUV3, IOMMU_HWPT_DATA_ARM_SMMUV3,
    IOMMU_VIOMMU_INVALIDATE_DATA_ARM_SMMUV3, iommu_hw_info_arm_smmuv3, iommu_hwpt_arm_smmuv3, iommu_vevent_arm_smmuv3,
    iommu_viommu_arm_smmuv3_invalidate,
};
pub use ioasid_engine::model::vtd::{
    IOMMU_HW_INFO_TYPE_INTEL_VTD, IOMMU_HW_INFO_VTD_ERRATA_772415_SPR17, IOMMU_HWPT_DATA_VTD_S1,
    IOMMU_HWPT_INVALIDATE_DATA_VTD_S1, IOMMU_VTD_INV_FLAGS_LEAF, IOMMU_VTD_S1_EAFE, IOMMU_VTD_S1_SRE, IOMMU_VTD_S1_WPE,
    iommu_hw_info_vtd, iommu_hwpt_vtd_s1, iommu_hwpt_vtd_s1_invalidate,
};

macro_rules! uapi_struct {
    ($(#[$m:meta])* $name:ident { $($field:ident : $ty:ty),* $(,)? } size $size:literal) => {
        $(#[$m])*
        #[repr(C)]
        #[derive(Debug, Default, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
        pub struct $name { $(pub $field: $ty),* }
        const _: () = assert!(size_of::<$name>() == $size);
    };
}

uapi_struct!(iommu_destroy { size: u32, id: u32 } size 8);
uapi_struct!(iommu_ioas_alloc { size: u32, flags: u32, out_ioas_id: u32 } size 12);
uapi_struct!(iommu_iova_range { start: u64, last: u64 } size 16);
uapi_struct!(iommu_ioas_iova_ranges {
    size: u32, ioas_id: u32, num_iovas: u32, __reserved: u32, allowed_iovas: u64, out_iova_alignment: u64,
} size 32);
uapi_struct!(iommu_ioas_allow_iovas {
    size: u32, ioas_id: u32, num_iovas: u32, __reserved: u32, allowed_iovas: u64,
} size 24);
uapi_struct!(iommu_ioas_map {
    size: u32, flags: u32, ioas_id: u32, __reserved: u32, user_va: u64, length: u64, iova: u64,
} size 40);
uapi_struct!(iommu_ioas_map_file {
    size: u32, flags: u32, ioas_id: u32, fd: i32, start: u64, length: u64, iova: u64,
} size 40);
uapi_struct!(iommu_ioas_copy {
    size: u32, flags: u32, dst_ioas_id: u32, src_ioas_id: u32, length: u64, dst_iova: u64, src_iova: u64,
} size 40);
uapi_struct!(iommu_ioas_unmap { size: u32, ioas_id: u32, iova: u64, length: u64 } size 24);
uapi_struct!(iommu_option {
    size: u32, option_id: u32, op: u16, __reserved: u16, object_id: u32, val64: u64,
} size 24);
uapi_struct!(iommu_vfio_ioas { size: u32, ioas_id: u32, op: u16, __reserved: u16 } size 12);
uapi_struct!(iommu_hwpt_alloc {
    size: u32, flags: u32, dev_id: u32, pt_id: u32, out_hwpt_id: u32, __reserved: u32,
    data_type: u32, data_len: u32, data_uptr: u64, fault_id: u32, __reserved2: u32,
} size 48);
uapi_struct!(iommu_hw_info {
    size: u32, flags: u32, dev_id: u32, data_len: u32, data_uptr: u64,
    out_data_type: u32, out_max_pasid_log2: u8, __reserved: [u8; 3], out_capabilities: u64,
} size 40);
uapi_struct!(iommu_hwpt_set_dirty_tracking { size: u32, flags: u32, hwpt_id: u32, __reserved: u32 } size 16);
uapi_struct!(iommu_hwpt_get_dirty_bitmap {
    size: u32, hwpt_id: u32, flags: u32, __reserved: u32, iova: u64, length: u64, page_size: u64, data: u64,
} size 48);
uapi_struct!(iommu_hwpt_invalidate {
    size: u32, hwpt_id: u32, data_uptr: u64, data_type: u32, entry_len: u32, entry_num: u32, __reserved: u32,
} size 32);
uapi_struct!(iommu_hwpt_pgfault {
    flags: u32, dev_id: u32, pasid: u32, grpid: u32, perm: u32, __reserved: u32, addr: u64, length: u32, cookie: u32,
} size 40);
uapi_struct!(iommu_hwpt_page_response { cookie: u32, code: u32 } size 8);
uapi_struct!(iommu_fault_alloc { size: u32, flags: u32, out_fault_id: u32, out_fault_fd: u32 } size 16);
uapi_struct!(iommu_viommu_alloc {
    size: u32, flags: u32, r#type: u32, dev_id: u32, hwpt_id: u32, out_viommu_id: u32,
    data_len: u32, __reserved: u32, data_uptr: u64,
} size 40);
uapi_struct!(iommu_veventq_alloc {
    size: u32, flags: u32, viommu_id: u32, r#type: u32, veventq_depth: u32, out_veventq_id: u32, out_veventq_fd: u32,
    __reserved: u32,
} size 32);
uapi_struct!(iommufd_vevent_header { flags: u32, sequence: u32 } size 8);
uapi_struct!(iommu_ioas_noiommu_get_pa {
    size: u32, flags: u32, ioas_id: u32, __reserved: u32, iova: u64, length: u64, out_phys: u64,
} size 40);
uapi_struct!(iommu_hwpt_amd_guest { dte: [u64; 4] } size 32);
uapi_struct!(iommu_hw_info_tegra241_cmdqv { flags: u32, version: u8, log2vcmdqs: u8, log2vsids: u8, __reserved: u8 } size 8);
uapi_struct!(iommu_viommu_tegra241_cmdqv { out_vintf_mmap_offset: u64, out_vintf_mmap_length: u64 } size 16);
uapi_struct!(iommu_vevent_tegra241_cmdqv { lvcmdq_err_map: [u64; 2] } size 16);
uapi_struct!(iommu_vdevice_alloc { size: u32, viommu_id: u32, dev_id: u32, out_vdevice_id: u32, virt_id: u64 } size 24);

// Offsets that differ from a naive packing, checked against the C header.
const _: () = {
    assert!(offset_of!(iommu_ioas_iova_ranges, allowed_iovas) == 16);
    assert!(offset_of!(iommu_ioas_map, user_va) == 16);
    assert!(offset_of!(iommu_ioas_map_file, fd) == 12);
    assert!(offset_of!(iommu_ioas_unmap, iova) == 8);
    assert!(offset_of!(iommu_option, object_id) == 12);
    assert!(offset_of!(iommu_hwpt_alloc, data_uptr) == 32);
    assert!(offset_of!(iommu_hwpt_alloc, fault_id) == 40);
    assert!(offset_of!(iommu_hw_info, out_max_pasid_log2) == 28);
    assert!(offset_of!(iommu_hw_info, out_capabilities) == 32);
    assert!(offset_of!(iommu_hwpt_invalidate, entry_num) == 24);
    assert!(offset_of!(iommu_hwpt_pgfault, addr) == 24);
    assert!(offset_of!(iommu_viommu_alloc, data_uptr) == 32);
    assert!(offset_of!(iommu_vdevice_alloc, virt_id) == 16);
    assert!(offset_of!(iommu_ioas_noiommu_get_pa, out_phys) == 32);
    assert!(offset_of!(iommu_hw_info_tegra241_cmdqv, log2vsids) == 6);
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_header() {
        // _IO(';', 0x80) and friends, as a C compiler computes them.
        assert_eq!(IOMMU_DESTROY, 0x3b80);
        assert_eq!(IOMMU_IOAS_MAP, 0x3b85);
        assert_eq!(IOMMU_FAULT_QUEUE_ALLOC, 0x3b8e);
        assert_eq!(IOMMU_IOAS_MAP_FILE, 0x3b8f);
        assert_eq!(IOMMU_VIOMMU_ALLOC, 0x3b90);
        assert_eq!(IOMMU_VDEVICE_ALLOC, 0x3b91);
        assert_eq!(IOMMU_VEVENTQ_ALLOC, 0x3b93);
        assert_eq!(IOMMU_IOAS_NOIOMMU_GET_PA, 0x3b95);
    }
}
