//! Linux's selftest mock IOMMU (`drivers/iommu/iommufd/selftest.c`) as a
//! model: its aperture, its hardware info, the paging-table type its
//! paging HWPTs take, and its nested HWPT (a mock IOTLB of four entries
//! that invalidations clear). The selftests' test command itself
//! (`IOMMU_TEST_CMD`) is the ABI's.

use parking_lot::Mutex;

use zerocopy::FromBytes;

use crate::domain::PageFormat;
use crate::iova::IovaRange;
use crate::{Error, Result};

use super::{
    DataLayout, EntryArray, Features, HwInfo, HwInfoData, IommuModel, IommuOps, NestedData, Stage1, ViommuCore,
    ViommuOps, ViommuType,
};

/// The mock IOMMU's aperture, `MOCK_APERTURE_START..=MOCK_APERTURE_LAST`.
pub const MOCK_APERTURE: IovaRange = IovaRange::new(1 << 24, (1 << 31) - 1);

/// `GET_HW_INFO` type of [`iommu_test_hw_info`].
pub const IOMMU_HW_INFO_TYPE_SELFTEST: u32 = 0xfeed_beef;
/// The value of `iommu_test_hw_info.test_reg`, which the selftests check.
pub const IOMMU_HW_INFO_SELFTEST_REGVAL: u32 = 0xdead_beef;
/// HWPT data type of [`iommu_hwpt_selftest`], paging or nested.
pub const IOMMU_HWPT_DATA_SELFTEST: u32 = 0xdead;
/// `iommu_hwpt_selftest.pagetable_type`: the mock's default table, leaves
/// of a CPU page and up.
pub const MOCK_IOMMUPT_DEFAULT: u32 = 0;
/// `iommu_hwpt_selftest.pagetable_type`: 2 KiB and 1 MiB leaves.
pub const MOCK_IOMMUPT_HUGE: u32 = 1;
/// Invalidation entry type of [`iommu_hwpt_invalidate_selftest`].
pub const IOMMU_HWPT_INVALIDATE_DATA_SELFTEST: u32 = 0xdead_beef;
/// A mock invalidation's flag: clear every entry, whatever its ID.
pub const IOMMU_TEST_INVALIDATE_FLAG_ALL: u32 = 1 << 0;
/// The last entry of a mock nested HWPT's IOTLB (it has four); a greater
/// `iotlb_id` is `EINVAL`.
pub const MOCK_NESTED_DOMAIN_IOTLB_ID_MAX: u32 = 3;
/// The mock's vIOMMU type (`IOMMU_VIOMMU_TYPE_SELFTEST`).
pub const IOMMU_VIOMMU_TYPE_SELFTEST: u32 = 0xdead_beef;
/// vIOMMU invalidation entry type of [`iommu_viommu_invalidate_selftest`].
pub const IOMMU_VIOMMU_INVALIDATE_DATA_SELFTEST: u32 = 0xdead_beef;
/// The selftest vIOMMU's event type; its events are the vDEVICE's virtual
/// ID as a little-endian `u32`.
pub const VEVENTQ_TYPE_SELFTEST: u32 = 0xbeef_beef;
/// The mock vIOMMU's HW queue type.
pub const HW_QUEUE_TYPE_SELFTEST: u32 = 0xdead_beef;
/// How many queues a mock vIOMMU has (Linux's `IOMMU_TEST_HW_QUEUE_MAX`).
pub const SELFTEST_HW_QUEUE_MAX: u32 = 2;
/// Entries of a mock device's own cache (`MOCK_DEV_CACHE_NUM`), which its
/// vIOMMU's invalidation commands clear.
pub const MOCK_DEV_CACHE_NUM: usize = 4;
/// The last entry of a mock device's cache; a greater `cache_id` is `EINVAL`.
pub const MOCK_DEV_CACHE_ID_MAX: u32 = MOCK_DEV_CACHE_NUM as u32 - 1;

uapi_struct!(
    /// The mock's hardware info.
    iommu_test_hw_info { flags: u32, test_reg: u32 } size 8
);
uapi_struct!(
    /// A selftest HWPT's data. Nested HWPTs take `iotlb`; paging ones
    /// `pagetable_type` (7.3, `MOCK_IOMMUPT_*`).
    iommu_hwpt_selftest { iotlb: u32, pagetable_type: u32 } size 8
);
/// The size of `iommu_hwpt_selftest`'s first version, up to `iotlb`.
pub const HWPT_SELFTEST_MIN_LEN: usize = 4;
uapi_struct!(
    /// One `IOMMU_HWPT_INVALIDATE` entry for a mock nested HWPT: clears IOTLB
    /// entry `iotlb_id`, or all with `IOMMU_TEST_INVALIDATE_FLAG_ALL`.
    iommu_hwpt_invalidate_selftest { flags: u32, iotlb_id: u32 } size 8
);
uapi_struct!(
    /// The mock vIOMMU's driver data (7.3).
    iommu_viommu_selftest { in_data: u32, out_data: u32, out_mmap_offset: u64, out_mmap_length: u64 } size 24
);
/// Linux copies it in up to `out_data`.
pub const VIOMMU_SELFTEST_MIN_LEN: usize = 8;
uapi_struct!(
    /// One command of the mock vIOMMU, clearing a device's cache entries.
    iommu_viommu_invalidate_selftest { flags: u32, vdev_id: u32, cache_id: u32 } size 12
);

impl HwInfoData for iommu_test_hw_info {
    const TYPE: u32 = IOMMU_HW_INFO_TYPE_SELFTEST;
}

/// The mock; `huge` adds its 1 MiB IO pages (`MOCK_FLAGS_DEVICE_HUGE_IOVA`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Mock {
    pub(crate) huge: bool,
}

const HWPT_SELFTEST: DataLayout = DataLayout {
    data_type: IOMMU_HWPT_DATA_SELFTEST,
    min_len: HWPT_SELFTEST_MIN_LEN,
    len: size_of::<iommu_hwpt_selftest>(),
};

fn hwpt_selftest(data: &[u8]) -> iommu_hwpt_selftest {
    let mut cfg = iommu_hwpt_selftest::default();
    let n = data.len().min(size_of::<iommu_hwpt_selftest>());
    zerocopy::IntoBytes::as_mut_bytes(&mut cfg)[..n].copy_from_slice(&data[..n]);
    cfg
}

impl IommuOps for Mock {
    fn name(&self) -> &'static str {
        "selftest mock"
    }

    fn paging_format(&self, _nest_parent: bool) -> PageFormat {
        if self.huge { PageFormat::MockHuge } else { PageFormat::Mock }
    }

    /// The mock's huge pages are a device option: any mock table will do.
    fn serves(&self, format: PageFormat) -> bool {
        format.is_mock()
    }

    fn aperture(&self) -> IovaRange {
        MOCK_APERTURE
    }

    fn hw_info(&self, _features: Features) -> HwInfo {
        HwInfo::new(&iommu_test_hw_info { flags: 0, test_reg: IOMMU_HW_INFO_SELFTEST_REGVAL })
    }

    fn paging_layout(&self, data_type: u32) -> Option<DataLayout> {
        (data_type == IOMMU_HWPT_DATA_SELFTEST).then_some(HWPT_SELFTEST)
    }

    /// The table a paging HWPT gets from its selftest data
    /// (`mock_domain_alloc_paging_flags`): `MOCK_IOMMUPT_DEFAULT` leaves of
    /// a CPU page and up, `MOCK_IOMMUPT_HUGE` 2 KiB and 1 MiB leaves.
    /// Without data the mock keeps the table of 2 KiB leaves that 6.12's
    /// suite checks page by page.
    fn paging_data(&self, data: &[u8]) -> Result<PageFormat> {
        match hwpt_selftest(data).pagetable_type {
            MOCK_IOMMUPT_DEFAULT => Ok(PageFormat::MockPt),
            MOCK_IOMMUPT_HUGE => Ok(PageFormat::MockHuge),
            _ => Err(Error::Unsupported("unknown mock page-table type")),
        }
    }

    fn nested_layout(&self, data_type: u32, parent: PageFormat) -> Option<DataLayout> {
        (data_type == IOMMU_HWPT_DATA_SELFTEST && parent.is_mock()).then_some(HWPT_SELFTEST)
    }

    fn nested_data(&self, _data_type: u32, data: &[u8]) -> Result<NestedData> {
        Ok(NestedData::selftest(hwpt_selftest(data).iotlb))
    }
}

/// The mock's nested HWPT: no table, only a mock IOTLB of four entries.
pub struct MockNested {
    iotlb: Mutex<[u32; 4]>,
}

impl NestedData {
    /// A mock nested HWPT whose IOTLB entries all hold `iotlb`.
    pub fn selftest(iotlb: u32) -> Self {
        NestedData::new(MockNested { iotlb: Mutex::new([iotlb; 4]) })
    }
}

impl MockNested {
    /// Mock IOTLB entry `id` (`MD_CHECK_IOTLB`).
    pub fn iotlb_entry(&self, id: u32) -> Option<u32> {
        self.iotlb.lock().get(id as usize).copied()
    }
}

impl Stage1 for MockNested {
    fn fits(&self, iommu: IommuModel, _viommu: Option<ViommuType>) -> bool {
        iommu.is_selftest()
    }

    fn invalidation(&self) -> Option<DataLayout> {
        Some(DataLayout::of::<iommu_hwpt_invalidate_selftest>(IOMMU_HWPT_INVALIDATE_DATA_SELFTEST))
    }

    /// Clears one mock IOTLB entry, or all of them.
    fn invalidate(&self, entry: &[u8]) -> Result<()> {
        let inv = iommu_hwpt_invalidate_selftest::read_from_prefix(entry)
            .map_err(|_| Error::Invalid("short mock invalidation"))?
            .0;
        if inv.flags & !IOMMU_TEST_INVALIDATE_FLAG_ALL != 0 {
            return Err(Error::Unsupported("unknown mock invalidation flags"));
        }
        if inv.iotlb_id > MOCK_NESTED_DOMAIN_IOTLB_ID_MAX {
            return Err(Error::Invalid("no such mock IOTLB entry"));
        }
        let mut iotlb = self.iotlb.lock();
        if inv.flags & IOMMU_TEST_INVALIDATE_FLAG_ALL != 0 {
            *iotlb = [0; 4];
        } else {
            iotlb[inv.iotlb_id as usize] = 0;
        }
        Ok(())
    }
}

/// The mock's vIOMMU.
pub(crate) struct MockViommu;

impl ViommuOps for MockViommu {
    fn uapi_type(&self) -> u32 {
        IOMMU_VIOMMU_TYPE_SELFTEST
    }

    fn serves(&self, iommu: IommuModel) -> bool {
        iommu.is_selftest()
    }

    /// Each command clears one entry, or all, of the cache of the device
    /// the guest calls `vdev_id`. The whole array is read before any
    /// command runs, as the mock does; an empty one only checks the type.
    fn invalidate(&self, viommu: &dyn ViommuCore, entries: &mut dyn EntryArray) -> (u32, Result<()>) {
        let right_type = entries.data_type() == IOMMU_VIOMMU_INVALIDATE_DATA_SELFTEST;
        if entries.is_empty() && right_type {
            return (0, Ok(()));
        }
        if !right_type || entries.is_empty() {
            return (0, Err(Error::Invalid("not the mock vIOMMU's invalidation type")));
        }
        let mut cmds = Vec::with_capacity(entries.len() as usize);
        for i in 0..entries.len() {
            let mut cmd = iommu_viommu_invalidate_selftest::default();
            if let Err(e) = entries.copy_extensible(i, zerocopy::IntoBytes::as_mut_bytes(&mut cmd)) {
                return (0, Err(e));
            }
            cmds.push(cmd);
        }
        for (done, cmd) in cmds.iter().enumerate() {
            if cmd.flags & !IOMMU_TEST_INVALIDATE_FLAG_ALL != 0 {
                return (done as u32, Err(Error::Unsupported("unknown mock invalidation flags")));
            }
            if cmd.cache_id > MOCK_DEV_CACHE_ID_MAX {
                return (done as u32, Err(Error::Invalid("no such mock device cache entry")));
            }
            let cleared = viommu.with_device_cache(u64::from(cmd.vdev_id), &mut |cache| {
                if cmd.flags & IOMMU_TEST_INVALIDATE_FLAG_ALL != 0 {
                    cache.fill(0);
                } else {
                    cache[cmd.cache_id as usize] = 0;
                }
            });
            if !cleared {
                return (done as u32, Err(Error::Invalid("no mock vDEVICE has that ID")));
            }
        }
        (entries.len(), Ok(()))
    }

    /// The device's virtual ID, whatever the fault.
    fn event(
        &self,
        virt_id: u64,
        _pasid: Option<u32>,
        _fault: Option<(u64, crate::domain::FaultReason, bool)>,
        _attrs: crate::fault::DmaAttrs,
    ) -> Option<(u32, Vec<u8>)> {
        Some((VEVENTQ_TYPE_SELFTEST, (virt_id as u32).to_le_bytes().to_vec()))
    }

    /// Its queues start at index 0 and go up one at a time.
    fn hw_queues(&self, kind: u32) -> Option<u32> {
        (kind == HW_QUEUE_TYPE_SELFTEST).then_some(SELFTEST_HW_QUEUE_MAX)
    }

    fn alloc_layout(&self) -> Option<DataLayout> {
        Some(DataLayout {
            data_type: IOMMU_VIOMMU_TYPE_SELFTEST,
            min_len: VIOMMU_SELFTEST_MIN_LEN,
            len: size_of::<iommu_viommu_selftest>(),
        })
    }

    /// Two pages whose first word echoes `in_data`.
    fn alloc_region(&self, data: &[u8]) -> (u64, Vec<u8>) {
        let data = iommu_viommu_selftest::read_from_prefix(data).map(|(d, _)| d).unwrap_or_default();
        (2 * crate::iova::PAGE_SIZE, data.in_data.to_ne_bytes().to_vec())
    }

    /// `in_data` comes back in `out_data`, with where to map the region.
    fn alloc_reply(&self, data: &[u8], offset: u64, len: u64) -> Vec<u8> {
        let mut data = iommu_viommu_selftest::read_from_prefix(data).map(|(d, _)| d).unwrap_or_default();
        data.out_data = data.in_data;
        data.out_mmap_offset = offset;
        data.out_mmap_length = len;
        zerocopy::IntoBytes::as_bytes(&data).to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use zerocopy::IntoBytes;

    #[test]
    fn paging_data_picks_the_table() {
        let mock = Mock { huge: false };
        assert_eq!(mock.paging_layout(IOMMU_HWPT_DATA_SELFTEST), Some(HWPT_SELFTEST));
        assert_eq!(mock.paging_layout(1), None);
        let cfg = |pagetable_type| iommu_hwpt_selftest { iotlb: 0, pagetable_type };
        assert_eq!(mock.paging_data(cfg(MOCK_IOMMUPT_DEFAULT).as_bytes()), Ok(PageFormat::MockPt));
        assert_eq!(mock.paging_data(cfg(MOCK_IOMMUPT_HUGE).as_bytes()), Ok(PageFormat::MockHuge));
        assert_eq!(mock.paging_data(&[0; 4]), Ok(PageFormat::MockPt), "the first version");
        assert!(matches!(mock.paging_data(cfg(2).as_bytes()), Err(Error::Unsupported(_))));
        let info = mock.hw_info(Features { max_pasid_log2: 0, pri: false, dirty_tracking: false });
        assert_eq!(info.get::<iommu_test_hw_info>().unwrap().test_reg, IOMMU_HW_INFO_SELFTEST_REGVAL);
    }

    #[test]
    fn nested_iotlb_entries_are_cleared_one_or_all() {
        let mock = Mock { huge: true };
        assert!(mock.nested_layout(IOMMU_HWPT_DATA_SELFTEST, PageFormat::VtdSs4).is_none());
        let data = mock.nested_data(IOMMU_HWPT_DATA_SELFTEST, &7u32.to_le_bytes()).unwrap();
        let nested = data.downcast::<MockNested>().unwrap();
        let inv = |flags, iotlb_id| iommu_hwpt_invalidate_selftest { flags, iotlb_id };
        assert_eq!(nested.invalidate(inv(0, 2).as_bytes()), Ok(()));
        assert_eq!((nested.iotlb_entry(1), nested.iotlb_entry(2)), (Some(7), Some(0)));
        assert!(matches!(nested.invalidate(inv(0, 4).as_bytes()), Err(Error::Invalid(_))));
        assert!(matches!(nested.invalidate(inv(2, 0).as_bytes()), Err(Error::Unsupported(_))));
        assert_eq!(
            nested.invalidate(inv(IOMMU_TEST_INVALIDATE_FLAG_ALL, 9).as_bytes()),
            Err(Error::Invalid("no such mock IOTLB entry"))
        );
        assert_eq!(nested.invalidate(inv(IOMMU_TEST_INVALIDATE_FLAG_ALL, 0).as_bytes()), Ok(()));
        assert_eq!(nested.iotlb_entry(0), Some(0));
    }

    #[test]
    fn viommu_commands_clear_device_caches_after_reading_them_all() {
        use super::super::fake::{Core, Entries};
        let core = Core::new(
            Mock { huge: false }.hw_info(Features { max_pasid_log2: 0, pri: false, dirty_tracking: false }),
            2,
        );
        let cmd = |flags, vdev_id, cache_id| {
            iommu_viommu_invalidate_selftest { flags, vdev_id, cache_id }.as_bytes().to_vec()
        };
        let mut entries = Entries {
            data_type: IOMMU_VIOMMU_INVALIDATE_DATA_SELFTEST,
            entries: vec![cmd(0, 0, 1), cmd(IOMMU_TEST_INVALIDATE_FLAG_ALL, 1, 0), cmd(0, 2, 0)],
        };
        let (done, rc) = MockViommu.invalidate(&core, &mut entries);
        assert_eq!(done, 2);
        assert!(matches!(rc, Err(Error::Invalid(_))), "no vDEVICE 2");
        assert_eq!(*core.caches.borrow(), [[7, 0, 7, 7], [0; 4]]);
        entries.entries = vec![cmd(0, 0, 4)];
        assert!(matches!(MockViommu.invalidate(&core, &mut entries), (0, Err(Error::Invalid(_)))));
        entries.entries = vec![cmd(4, 0, 0)];
        assert!(matches!(MockViommu.invalidate(&core, &mut entries), (0, Err(Error::Unsupported(_)))));
        entries.entries.clear();
        assert_eq!(MockViommu.invalidate(&core, &mut entries), (0, Ok(())), "an empty array checks the type");
        entries.data_type = 1;
        assert!(matches!(MockViommu.invalidate(&core, &mut entries), (0, Err(Error::Invalid(_)))));
        let ev = MockViommu.event(0x0001_2345_6789, None, None, crate::fault::DmaAttrs::default());
        assert_eq!(ev, Some((VEVENTQ_TYPE_SELFTEST, 0x2345_6789u32.to_le_bytes().to_vec())));
    }

    #[test]
    fn viommu_data_is_echoed_with_its_region() {
        let layout = MockViommu.alloc_layout().unwrap();
        assert_eq!((layout.min_len, layout.len), (8, 24));
        let data = iommu_viommu_selftest { in_data: 0xbeef, ..Default::default() };
        let (len, contents) = MockViommu.alloc_region(data.as_bytes());
        assert_eq!((len, contents), (2 * crate::iova::PAGE_SIZE, 0xbeefu32.to_ne_bytes().to_vec()));
        let reply = MockViommu.alloc_reply(data.as_bytes(), 0x3000, 0x2000);
        let reply = iommu_viommu_selftest::read_from_bytes(&reply).unwrap();
        assert_eq!((reply.out_data, reply.out_mmap_offset, reply.out_mmap_length), (0xbeef, 0x3000, 0x2000));
    }
}
