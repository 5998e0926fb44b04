//! `IOMMU_TEST_CMD`: the commands Linux's iommufd selftests drive its mock
//! IOMMU with (`drivers/iommu/iommufd/iommufd_test.h`), answered by the
//! engine's emulated devices behind the mock page-table format.

use core::mem::size_of;

use ioasid_engine::device::MockFlags;
use ioasid_engine::ioas::Owner;
use ioasid_engine::{DeviceInfo, IovaRange, Object, PAGE_SIZE, memory, pages};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::dispatch::Ucmd;
use crate::errno::Errno;
use crate::uapi::io;

pub const IOMMU_TEST_CMD: u32 = io(0x80 + 32);

pub const IOMMU_TEST_OP_ADD_RESERVED: u32 = 1;
pub const IOMMU_TEST_OP_MOCK_DOMAIN: u32 = 2;
pub const IOMMU_TEST_OP_MD_CHECK_MAP: u32 = 3;
pub const IOMMU_TEST_OP_MD_CHECK_REFS: u32 = 4;
pub const IOMMU_TEST_OP_CREATE_ACCESS: u32 = 5;
pub const IOMMU_TEST_OP_DESTROY_ACCESS_PAGES: u32 = 6;
pub const IOMMU_TEST_OP_ACCESS_PAGES: u32 = 7;
pub const IOMMU_TEST_OP_ACCESS_RW: u32 = 8;
pub const IOMMU_TEST_OP_SET_TEMP_MEMORY_LIMIT: u32 = 9;
pub const IOMMU_TEST_OP_MOCK_DOMAIN_REPLACE: u32 = 10;
pub const IOMMU_TEST_OP_ACCESS_REPLACE_IOAS: u32 = 11;
pub const IOMMU_TEST_OP_MOCK_DOMAIN_FLAGS: u32 = 12;
pub const IOMMU_TEST_OP_DIRTY: u32 = 13;
pub const IOMMU_TEST_OP_MD_CHECK_IOTLB: u32 = 14;
pub const IOMMU_TEST_OP_TRIGGER_IOPF: u32 = 15;

pub const MOCK_FLAGS_DEVICE_NO_DIRTY: u32 = 1 << 0;
pub const MOCK_FLAGS_DEVICE_HUGE_IOVA: u32 = 1 << 1;
pub const MOCK_FLAGS_DEVICE_PASID: u32 = 1 << 2;

pub const IOMMU_HW_INFO_TYPE_SELFTEST: u32 = 0xfeed_beef;
pub const IOMMU_HW_INFO_SELFTEST_REGVAL: u32 = 0xdead_beef;
pub const MOCK_IO_PAGE_SIZE: u64 = PAGE_SIZE / 2;

/// `struct iommu_test_cmd`: a header, a union of per-op arguments, `last`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct iommu_test_cmd {
    pub size: u32,
    pub op: u32,
    pub id: u32,
    pub __reserved: u32,
    pub union: [u64; 6],
    pub last: u32,
    pub __pad: u32,
}
const _: () = assert!(size_of::<iommu_test_cmd>() == 72);
pub const TEST_CMD_MIN_SIZE: usize = core::mem::offset_of!(iommu_test_cmd, last) + 4;

/// `struct iommu_test_hw_info`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct iommu_test_hw_info {
    pub flags: u32,
    pub test_reg: u32,
}

macro_rules! union_arm {
    ($name:ident { $($field:ident : $ty:ty),* $(,)? }) => {
        #[repr(C)]
        #[derive(Debug, Default, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
        pub struct $name { $(pub $field: $ty),* }
        const _: () = assert!(size_of::<$name>() <= 48);
    };
}

union_arm!(AddReserved { start: u64, length: u64 });
union_arm!(MockDomain { out_stdev_id: u32, out_hwpt_id: u32, out_idev_id: u32, dev_flags: u32 });
union_arm!(MockDomainReplace { pt_id: u32 });
union_arm!(CheckMap { iova: u64, length: u64, uptr: u64 });
union_arm!(CheckRefs { length: u64, uptr: u64, refs: u32, __pad: u32 });
union_arm!(MemoryLimit { limit: u32 });

impl iommu_test_cmd {
    fn arm<T: FromBytes>(&self) -> T {
        T::read_from_prefix(self.union.as_bytes()).expect("arms fit the union").0
    }

    fn set_arm<T: IntoBytes + Immutable>(&mut self, v: &T) {
        self.union.as_mut_bytes()[..size_of::<T>()].copy_from_slice(v.as_bytes());
    }
}

type Res = Result<(), Errno>;

pub fn run(u: &Ucmd, mut c: iommu_test_cmd) -> Res {
    match c.op {
        IOMMU_TEST_OP_ADD_RESERVED => {
            let a: AddReserved = c.arm();
            let range = IovaRange::from_len(a.start, a.length)?;
            Ok(u.ctx.ioas(c.id)?.reserve(&[range], Owner::User)?)
        }
        IOMMU_TEST_OP_MOCK_DOMAIN | IOMMU_TEST_OP_MOCK_DOMAIN_FLAGS => {
            let mut a: MockDomain = c.arm();
            let flags = if c.op == IOMMU_TEST_OP_MOCK_DOMAIN_FLAGS { a.dev_flags } else { 0 };
            let known = MOCK_FLAGS_DEVICE_NO_DIRTY | MOCK_FLAGS_DEVICE_HUGE_IOVA | MOCK_FLAGS_DEVICE_PASID;
            if flags & !known != 0 {
                return Err(Errno::EINVAL);
            }
            let info = DeviceInfo::mock(
                0,
                MockFlags {
                    no_dirty: flags & MOCK_FLAGS_DEVICE_NO_DIRTY != 0,
                    huge_iova: flags & MOCK_FLAGS_DEVICE_HUGE_IOVA != 0,
                    pasid: flags & MOCK_FLAGS_DEVICE_PASID != 0,
                },
            );
            let (stdev, hwpt, idev) = u.ctx.mock_domain(c.id, info)?;
            (a.out_stdev_id, a.out_hwpt_id, a.out_idev_id) = (stdev, hwpt, idev);
            c.set_arm(&a);
            u.respond(&c).inspect_err(|_| {
                let _ = u.ctx.destroy(stdev);
            })
        }
        IOMMU_TEST_OP_MOCK_DOMAIN_REPLACE => {
            let mut a: MockDomainReplace = c.arm();
            a.pt_id = u.ctx.mock_domain_replace(c.id, a.pt_id)?;
            c.set_arm(&a);
            u.respond(&c)
        }
        IOMMU_TEST_OP_MD_CHECK_MAP => check_map(u, c.id, c.arm()),
        IOMMU_TEST_OP_MD_CHECK_REFS => check_refs(c.arm()),
        // Linux uses it to size an internal batch buffer; the engine has none.
        IOMMU_TEST_OP_SET_TEMP_MEMORY_LIMIT => Ok(()),
        _ => Err(Errno::EOPNOTSUPP),
    }
}

/// Every mock IO page of `[iova, iova + length)` leads to the matching byte
/// of `uptr`.
fn check_map(u: &Ucmd, hwpt_id: u32, a: CheckMap) -> Res {
    if a.iova % MOCK_IO_PAGE_SIZE != 0
        || a.length % MOCK_IO_PAGE_SIZE != 0
        || a.uptr % MOCK_IO_PAGE_SIZE != 0
        || a.uptr.checked_add(a.length).is_none()
    {
        return Err(Errno::EINVAL);
    }
    let hwpt = match u.ctx.object(hwpt_id)? {
        Object::HwptPaging(h) => h,
        _ => return Err(Errno::ENOENT),
    };
    if !hwpt.domain().format().is_mock() {
        return Err(Errno::EINVAL);
    }
    let mut off = 0;
    while off < a.length {
        memory::check_mapped(a.uptr + off, 1)?;
        if hwpt.domain().lookup(a.iova + off) != Some(a.uptr + off) {
            return Err(Errno::EINVAL);
        }
        off += MOCK_IO_PAGE_SIZE;
    }
    Ok(())
}

/// Every CPU page of `[uptr, uptr + length)` is pinned exactly `refs` times.
fn check_refs(a: CheckRefs) -> Res {
    if a.length % PAGE_SIZE != 0 || a.uptr % PAGE_SIZE != 0 || a.uptr.checked_add(a.length).is_none() {
        return Err(Errno::EINVAL);
    }
    let mut off = 0;
    while off < a.length {
        memory::check_mapped(a.uptr + off, 1)?;
        if pages::pin_count(a.uptr + off) != a.refs {
            return Err(Errno::EIO);
        }
        off += PAGE_SIZE;
    }
    Ok(())
}

/// The hardware info of a mock device.
pub fn hw_info() -> iommu_test_hw_info {
    iommu_test_hw_info { flags: 0, test_reg: IOMMU_HW_INFO_SELFTEST_REGVAL }
}
