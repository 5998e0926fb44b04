//! Helpers shared by the engine's integration tests.
#![allow(dead_code)]

use std::sync::Arc;

use ioasid_engine::{Context, ContextConfig, Limit};

/// A context of its own: pins are charged to a private 4 GiB budget, not to
/// the user running the tests, so tests in parallel do not share a limit.
pub fn ctx() -> Arc<Context> {
    Arc::new(Context::with_config(ContextConfig::isolated(Limit::Pages(1 << 20))))
}
