//! Helpers shared by the ABI's integration tests.
#![allow(dead_code)]

use std::sync::Arc;

use ioasid_abi::uapi::{IOMMU_IOAS_MAP_READABLE, IOMMU_IOAS_MAP_WRITEABLE, iommu_ioas_map_file};
use ioasid_abi::{Errno, InProcess, ioctl};
use ioasid_engine::{Context, ContextConfig, Limit};
use zerocopy::{FromBytes, IntoBytes};

/// A context of its own: pins are charged to a private 4 GiB budget, not to
/// the user running the tests, so tests in parallel do not share a limit.
pub fn ctx() -> Arc<Context> {
    Arc::new(Context::with_config(ContextConfig::isolated(Limit::Pages(1 << 20))))
}

/// The ioctl `req` on `cmd`, as a program in this process makes it.
pub fn call<T: IntoBytes + FromBytes>(ctx: &Arc<Context>, req: u32, cmd: &mut T) -> Result<(), Errno> {
    ioctl(ctx, &InProcess, req, cmd as *mut T as u64).map(drop)
}

/// `IOMMU_IOAS_MAP_FILE` of `[start, start + length)` of `fd`, readable and
/// writable, at an IOVA the IOAS picks.
pub fn map_file_cmd(ioas_id: u32, fd: i32, start: u64, length: u64) -> iommu_ioas_map_file {
    iommu_ioas_map_file {
        size: size_of::<iommu_ioas_map_file>() as u32,
        flags: IOMMU_IOAS_MAP_READABLE | IOMMU_IOAS_MAP_WRITEABLE,
        ioas_id,
        fd,
        start,
        length,
        iova: 0,
    }
}
