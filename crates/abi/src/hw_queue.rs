//! `IOMMU_HW_QUEUE_ALLOC` (Linux 7.3): a vIOMMU's queue that the IOMMU reads
//! from guest memory, checked in the order Linux's core checks it.

#![allow(non_camel_case_types)]

use core::mem::size_of;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use ioasid_engine::ViommuId;

use crate::errno::Errno;
use crate::uapi::io;
use crate::ucmd::Ucmd;

pub const IOMMUFD_CMD_HW_QUEUE_ALLOC: u32 = 0x94;
pub const IOMMU_HW_QUEUE_ALLOC: u32 = io(IOMMUFD_CMD_HW_QUEUE_ALLOC);
pub const IOMMU_HW_QUEUE_TYPE_DEFAULT: u32 = 0;

/// `struct iommu_hw_queue_alloc`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct iommu_hw_queue_alloc {
    pub size: u32,
    pub flags: u32,
    pub viommu_id: u32,
    pub r#type: u32,
    pub index: u32,
    pub out_hw_queue_id: u32,
    pub nesting_parent_iova: u64,
    pub length: u64,
}
const _: () = assert!(size_of::<iommu_hw_queue_alloc>() == 40);

pub(crate) fn hw_queue_alloc(u: &Ucmd, mut c: iommu_hw_queue_alloc) -> Result<(), Errno> {
    if c.flags != 0 || c.r#type == IOMMU_HW_QUEUE_TYPE_DEFAULT {
        return Err(Errno::EOPNOTSUPP);
    }
    if c.length == 0 {
        return Err(Errno::EINVAL);
    }
    if c.nesting_parent_iova.checked_add(c.length - 1).is_none() {
        return Err(Errno::EOVERFLOW);
    }
    c.out_hw_queue_id =
        u.ctx.hw_queue_alloc(ViommuId::new(c.viommu_id), c.r#type, c.index, c.nesting_parent_iova, c.length)?.get();
    u.respond_created(&c, c.out_hw_queue_id)
}
