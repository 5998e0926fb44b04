//! Which file descriptors are iommufd contexts.

use std::collections::HashMap;
use std::ffi::c_int;
use std::sync::{Arc, LazyLock, Mutex, MutexGuard};

use ioasid_engine::Context;

static FDS: LazyLock<Mutex<HashMap<c_int, Arc<Context>>>> = LazyLock::new(|| Mutex::new(HashMap::new()));

fn fds() -> MutexGuard<'static, HashMap<c_int, Arc<Context>>> {
    FDS.lock().unwrap_or_else(|e| e.into_inner())
}

pub fn get(fd: c_int) -> Option<Arc<Context>> {
    fds().get(&fd).cloned()
}

/// `fd` now refers to `ctx` (a new open, or a duplicate).
pub fn insert(fd: c_int, ctx: Arc<Context>) {
    // Whatever `fd` referred to before was closed by the dup or open that
    // reused the number; dropping it outside the lock tears it down.
    let old = fds().insert(fd, ctx);
    drop(old);
}

/// `fd` was closed. The context goes with its last descriptor.
pub fn remove(fd: c_int) {
    let old = fds().remove(&fd);
    drop(old);
}
