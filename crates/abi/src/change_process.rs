//! `IOMMU_IOAS_CHANGE_PROCESS` (Linux 6.14): the locked-memory charges of
//! every mapping in the context move to the calling process, which is how a
//! VMM hands its mappings to a new process after a live update. Only file
//! mappings can move (`EINVAL` when any other is mapped), charged to the
//! caller first, so a caller over its `RLIMIT_MEMLOCK` gets `ENOMEM` and
//! nothing moves. A forked child calling it through the fd it shares takes
//! the charges to itself: its user's counter or its own, as the context's
//! accounting mode says.

#![allow(non_camel_case_types)]

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::errno::Errno;
use crate::uapi::io;
use crate::ucmd::Ucmd;

pub const IOMMUFD_CMD_IOAS_CHANGE_PROCESS: u32 = 0x92;
pub const IOMMU_IOAS_CHANGE_PROCESS: u32 = io(IOMMUFD_CMD_IOAS_CHANGE_PROCESS);

#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct iommu_ioas_change_process {
    pub size: u32,
    pub __reserved: u32,
}

const _: () = assert!(size_of::<iommu_ioas_change_process>() == 8);

pub(crate) fn change_process(u: &Ucmd, c: iommu_ioas_change_process) -> Result<(), Errno> {
    if c.__reserved != 0 {
        return Err(Errno::EOPNOTSUPP);
    }
    u.ctx.change_process(u.mem.pid())?;
    Ok(())
}
