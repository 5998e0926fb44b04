//! Helpers shared by the ABI's integration tests.
#![allow(dead_code)]

use std::sync::Arc;

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
