//! What Linux 7.3's uAPI added beyond the selftests' mock, answered as
//! Linux answers it on the hardware ioasid emulates (VT-d, SMMUv3 without
//! Tegra241 CMDQV, AMD-Vi) and for its mock.

use std::sync::Arc;

use ioasid_abi::Errno;
use ioasid_abi::selftest::IOMMU_HW_INFO_TYPE_SELFTEST;
use ioasid_abi::uapi::*;
use ioasid_engine::{Context, DeviceId, DeviceInfo, HostBuffer, HwptFlags, IommuModel, MockFlags, Perm};
use zerocopy::{FromBytes, IntoBytes};

mod common;
use common::{call, ctx};

const MODELS: [IommuModel; 3] = [IommuModel::VTD, IommuModel::ArmSmmuV3, IommuModel::AmdVi];

fn hw_info(ctx: &Arc<Context>, dev: DeviceId, input: Option<u32>, data: &mut [u8]) -> Result<iommu_hw_info, Errno> {
    let mut c = iommu_hw_info {
        size: 40,
        dev_id: dev.get(),
        data_len: data.len() as u32,
        data_uptr: data.as_mut_ptr() as u64,
        flags: if input.is_some() { IOMMU_HW_INFO_FLAG_INPUT_TYPE } else { 0 },
        out_data_type: input.unwrap_or(0),
        ..Default::default()
    };
    call(ctx, IOMMU_GET_HW_INFO, &mut c).map(|()| c)
}

#[test]
fn hw_info_says_ats_is_not_supported_and_smmuv3_has_no_errata() {
    let ctx = ctx();
    let mut devs: Vec<DeviceId> =
        MODELS.iter().map(|&m| ctx.bind_device(DeviceInfo::behind(m, "d", 1)).unwrap()).collect();
    devs.push(ctx.bind_device(DeviceInfo::mock(2, MockFlags::default())).unwrap());
    for dev in devs {
        let mut data = [0u8; 64];
        let c = hw_info(&ctx, dev, None, &mut data).unwrap();
        // No emulated device has an ATC, and the mock never claims ATS.
        assert_ne!(c.out_capabilities & IOMMU_HW_CAP_PCI_ATS_NOT_SUPPORTED, 0, "device {dev}");
        if c.out_data_type == IOMMU_HW_INFO_TYPE_ARM_SMMUV3 {
            let smmu = iommu_hw_info_arm_smmuv3::read_from_prefix(&data).unwrap().0;
            // Only Tegra264's SMMU has erratum T264-SMMU-3.
            assert_eq!(smmu.flags & IOMMU_HW_INFO_ARM_SMMUV3_ERRATA_REPEAT_TLBI_CFGI, 0);
        }
    }
}

#[test]
fn hw_info_reports_pasid_exec_and_priv_only_with_pasids() {
    let ctx = ctx();
    for m in MODELS {
        let with = |pasid_bits, exec, privileged| {
            let info = DeviceInfo {
                max_pasid_log2: pasid_bits,
                pasid_exec: exec,
                pasid_priv: privileged,
                ..DeviceInfo::behind(m, "d", 1)
            };
            let dev = ctx.bind_device(info).unwrap();
            let caps = hw_info(&ctx, dev, None, &mut []).unwrap().out_capabilities;
            ctx.unbind_device(dev).unwrap();
            caps & (IOMMU_HW_CAP_PCI_PASID_EXEC | IOMMU_HW_CAP_PCI_PASID_PRIV)
        };
        assert_eq!(with(20, true, true), IOMMU_HW_CAP_PCI_PASID_EXEC | IOMMU_HW_CAP_PCI_PASID_PRIV, "{m:?}");
        assert_eq!(with(20, true, false), IOMMU_HW_CAP_PCI_PASID_EXEC, "{m:?}");
        assert_eq!(with(20, false, true), IOMMU_HW_CAP_PCI_PASID_PRIV, "{m:?}");
        assert_eq!(with(0, true, true), 0, "{m:?}: no PASIDs, no PASID capability bits");
    }
    // The mock is no PCI function: never.
    let dev = ctx.bind_device(DeviceInfo::mock(2, MockFlags { pasid: true, ..MockFlags::default() })).unwrap();
    let c = hw_info(&ctx, dev, None, &mut []).unwrap();
    assert_ne!(c.out_max_pasid_log2, 0);
    assert_eq!(c.out_capabilities & (IOMMU_HW_CAP_PCI_PASID_EXEC | IOMMU_HW_CAP_PCI_PASID_PRIV), 0);
}

#[test]
fn tegra241_cmdqv_is_answered_as_an_smmu_without_it() {
    let ctx = ctx();
    let ioas = ctx.ioas_alloc().unwrap();
    for m in MODELS {
        let dev = ctx.bind_device(DeviceInfo::behind(m, "d", 1)).unwrap();
        // GET_HW_INFO asking for the CMDQV type: the driver has no such
        // implementation.
        let mut data = [0u8; 8];
        assert_eq!(hw_info(&ctx, dev, Some(IOMMU_HW_INFO_TYPE_TEGRA241_CMDQV), &mut data), Err(Errno::EOPNOTSUPP));
        // A vIOMMU of the CMDQV type: none (the SMMU's get_viommu_size is 0).
        let parent = ctx.hwpt_alloc(dev, ioas, HwptFlags { nest_parent: true, dirty_tracking: false }, None).unwrap();
        let cmdqv = iommu_viommu_tegra241_cmdqv::default();
        let mut c = iommu_viommu_alloc {
            size: 40,
            dev_id: dev.get(),
            hwpt_id: parent.get(),
            r#type: IOMMU_VIOMMU_TYPE_TEGRA241_CMDQV,
            data_len: 16,
            data_uptr: cmdqv.as_bytes().as_ptr() as u64,
            ..Default::default()
        };
        assert_eq!(call(&ctx, IOMMU_VIOMMU_ALLOC, &mut c), Err(Errno::EOPNOTSUPP), "{m:?}");
        ctx.destroy(parent).unwrap();
        ctx.unbind_device(dev).unwrap();
    }
}

#[test]
fn a_tegra241_veventq_is_taken_and_never_has_events() {
    // The core takes any non-default vEVENTQ type, whichever driver the
    // vIOMMU has; an SMMUv3 without CMDQV just never reports to it.
    let ctx = ctx();
    let ioas = ctx.ioas_alloc().unwrap();
    let dev = ctx.bind_device(DeviceInfo::behind(IommuModel::ArmSmmuV3, "d", 1)).unwrap();
    let parent = ctx.hwpt_alloc(dev, ioas, HwptFlags { nest_parent: true, dirty_tracking: false }, None).unwrap();
    let viommu = ctx.viommu_alloc(dev, parent, ioasid_engine::ViommuType::ArmSmmuV3).unwrap();
    let mut c = iommu_veventq_alloc {
        size: 32,
        viommu_id: viommu.get(),
        r#type: IOMMU_VEVENTQ_TYPE_TEGRA241_CMDQV,
        veventq_depth: 4,
        ..Default::default()
    };
    call(&ctx, IOMMU_VEVENTQ_ALLOC, &mut c).unwrap();
    assert_eq!(call(&ctx, IOMMU_VEVENTQ_ALLOC, &mut c), Err(Errno::EEXIST), "one queue per type");
    assert!(ctx.get(viommu).unwrap().veventq(IOMMU_VEVENTQ_TYPE_TEGRA241_CMDQV).is_some());
    // SAFETY: the fd was just given to this process by the command.
    drop(unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(c.out_veventq_fd as i32) });
}

#[test]
fn amd_guest_data_is_answered_as_a_driver_without_amd_nesting() {
    let ctx = ctx();
    let ioas = ctx.ioas_alloc().unwrap();
    let dev = ctx.bind_device(DeviceInfo::behind(IommuModel::AmdVi, "d", 1)).unwrap();
    let parent = ctx.hwpt_alloc(dev, ioas, HwptFlags { nest_parent: true, dirty_tracking: false }, None).unwrap();
    // A guest DTE: V, GV, a GCR3 table root, 4-level guest tables.
    let gdte = iommu_hwpt_amd_guest { dte: [1 | 1 << 55 | 1 << 12, 0x10, 0, 0] };
    let nested = |pt_id| {
        let mut c = iommu_hwpt_alloc {
            size: 48,
            dev_id: dev.get(),
            pt_id,
            data_type: IOMMU_HWPT_DATA_AMD_GUEST,
            data_len: 32,
            data_uptr: gdte.as_bytes().as_ptr() as u64,
            ..Default::default()
        };
        call(&ctx, IOMMU_HWPT_ALLOC, &mut c)
    };
    // Without CONFIG_AMD_IOMMU_IOMMUFD there is no domain_alloc_nested...
    assert_eq!(nested(parent.get()), Err(Errno::EOPNOTSUPP));
    // ...nor an AMD vIOMMU to allocate one on, of whatever type.
    for r#type in [IOMMU_VIOMMU_TYPE_ARM_SMMUV3, IOMMU_VIOMMU_TYPE_TEGRA241_CMDQV, 0x1234] {
        let mut c =
            iommu_viommu_alloc { size: 40, dev_id: dev.get(), hwpt_id: parent.get(), r#type, ..Default::default() };
        assert_eq!(call(&ctx, IOMMU_VIOMMU_ALLOC, &mut c), Err(Errno::EOPNOTSUPP));
    }
    // And a paging HWPT takes no driver data.
    assert_eq!(nested(ioas.get()), Err(Errno::EOPNOTSUPP));
}

#[test]
fn noiommu_get_pa_is_answered_as_a_kernel_without_noiommu() {
    let ctx = ctx();
    let ioas = ctx.ioas_alloc().unwrap();
    let ram = HostBuffer::new(0x1000).unwrap();
    // SAFETY: `ram` outlives the context's use of it.
    unsafe { ctx.map_user(ioas, ram.addr(), 0x1000, Some(0x10000), Perm::RW).unwrap() };
    let mut c = iommu_ioas_noiommu_get_pa {
        size: 40,
        ioas_id: ioas.get(),
        iova: 0x10000,
        length: 0x1000,
        ..Default::default()
    };
    assert_eq!(call(&ctx, IOMMU_IOAS_NOIOMMU_GET_PA, &mut c), Err(Errno::EOPNOTSUPP));
    assert_eq!(c.out_phys, 0);
    // The generic size rules still come first.
    c.size = 32;
    assert_eq!(call(&ctx, IOMMU_IOAS_NOIOMMU_GET_PA, &mut c), Err(Errno::EINVAL));
}

#[test]
fn the_mock_answers_other_hw_info_types_with_eopnotsupp() {
    let ctx = ctx();
    let dev = ctx.bind_device(DeviceInfo::mock(2, MockFlags::default())).unwrap();
    assert!(hw_info(&ctx, dev, Some(IOMMU_HW_INFO_TYPE_SELFTEST), &mut []).is_ok());
    for t in [IOMMU_HW_INFO_TYPE_TEGRA241_CMDQV, IOMMU_HW_INFO_TYPE_AMD, IOMMU_HW_INFO_TYPE_INTEL_VTD] {
        assert_eq!(hw_info(&ctx, dev, Some(t), &mut []), Err(Errno::EOPNOTSUPP));
    }
}

#[test]
fn smmuv3_tlbi_nsnh_all_is_taken_as_tlbi_nh_all() {
    let ctx = ctx();
    let ioas = ctx.ioas_alloc().unwrap();
    let dev = ctx.bind_device(DeviceInfo::behind(IommuModel::ArmSmmuV3, "d", 1)).unwrap();
    let parent = ctx.hwpt_alloc(dev, ioas, HwptFlags { nest_parent: true, dirty_tracking: false }, None).unwrap();
    let viommu = ctx.viommu_alloc(dev, parent, ioasid_engine::ViommuType::ArmSmmuV3).unwrap();
    // TLBI_NSNH_ALL (0x30), then CMD_SYNC, which is the host's: one taken.
    let cmds: [[u64; 2]; 2] = [[0x30, 0], [0x46, 0]];
    let mut c = iommu_hwpt_invalidate {
        size: 32,
        hwpt_id: viommu.get(),
        data_uptr: cmds.as_ptr() as u64,
        data_type: IOMMU_VIOMMU_INVALIDATE_DATA_ARM_SMMUV3,
        entry_len: 16,
        entry_num: 2,
        ..Default::default()
    };
    assert_eq!(call(&ctx, IOMMU_HWPT_INVALIDATE, &mut c), Err(Errno::EIO));
    assert_eq!(c.entry_num, 1, "NSNH_ALL was taken");
}
