//! Helpers shared by the engine's integration tests.
#![allow(dead_code)]

use std::sync::Arc;

use ioasid_engine::{Context, ContextConfig, Device, DeviceInfo, IoasId, Limit};

/// A context of its own: pins are charged to a private 4 GiB budget, not to
/// the user running the tests, so tests in parallel do not share a limit.
pub fn ctx() -> Arc<Context> {
    Arc::new(Context::with_config(ContextConfig::isolated(Limit::Pages(1 << 20))))
}

/// A context with an IOAS and a device attached to it, for DMA tests.
pub fn attached_device() -> (Arc<Context>, IoasId, Arc<Device>) {
    let ctx = Arc::new(Context::new());
    let ioas = ctx.ioas_alloc().unwrap();
    let dev = ctx.bind_device(DeviceInfo::new("dma", 1)).unwrap();
    ctx.attach(dev, ioas).unwrap();
    let device = ctx.get(dev).unwrap();
    (ctx, ioas, device)
}
