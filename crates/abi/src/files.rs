//! The file descriptors of this process that are ioasid objects: iommufd
//! contexts, and the test accesses the selftest command hands out. Like a
//! kernel's file table, it is process-wide; the preload shim consults it on
//! every `ioctl`, `close` and `dup`.

use std::collections::HashMap;
use std::ffi::c_int;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock};

use parking_lot::{Mutex, MutexGuard};

use ioasid_engine::Context;

use crate::fault::FaultFile;
use crate::selftest::AccessFile;

#[derive(Clone)]
pub enum File {
    /// An open `/dev/iommu`.
    Iommufd(Arc<Context>),
    /// A selftest access (`IOMMU_TEST_OP_CREATE_ACCESS`).
    TestAccess(Arc<AccessFile>),
    /// A thread's `fail-nth` file (the thread's ID).
    FailNth(i32),
    /// A fault queue (`IOMMU_FAULT_QUEUE_ALLOC`).
    Fault(Arc<FaultFile>),
    /// A vIOMMU's event queue (`IOMMU_VEVENTQ_ALLOC`).
    Veventq(Arc<crate::veventq::VeventqFile>),
}

static FILES: LazyLock<Mutex<HashMap<c_int, File>>> = LazyLock::new(|| Mutex::new(HashMap::new()));

/// How many descriptors have their own `read` and `write`, so those calls
/// on every other descriptor skip the table.
static RW_FILES: AtomicUsize = AtomicUsize::new(0);

fn counted(file: Option<&File>) -> usize {
    usize::from(matches!(file, Some(File::FailNth(_) | File::Fault(_) | File::Veventq(_))))
}

fn files() -> MutexGuard<'static, HashMap<c_int, File>> {
    FILES.lock()
}

/// Holds the table across a `fork`, so the child cannot inherit it locked
/// by a thread that does not exist there (every hook of the child needs it).
pub fn lock_for_fork() {
    std::mem::forget(files());
}

/// Releases what `lock_for_fork` took, in the parent and in the child.
///
/// # Safety
/// Only once on each side of a fork, after `lock_for_fork`.
pub unsafe fn unlock_after_fork() {
    // SAFETY: the caller's contract: this side holds the forgotten guard.
    unsafe { FILES.force_unlock() };
}

pub fn get(fd: c_int) -> Option<File> {
    files().get(&fd).cloned()
}

pub fn context(fd: c_int) -> Option<Arc<Context>> {
    match get(fd)? {
        File::Iommufd(ctx) => Some(ctx),
        _ => None,
    }
}

/// `fd`, when `read` and `write` on it are ours to answer.
pub fn rw_file(fd: c_int) -> Option<File> {
    if RW_FILES.load(Ordering::Acquire) == 0 {
        return None;
    }
    get(fd).filter(|f| counted(Some(f)) == 1)
}

/// `fd` now refers to `file` (a new open, or a duplicate).
pub fn insert(fd: c_int, file: File) {
    // What `fd` named before was closed by the call that reused the number;
    // it is dropped outside the lock, since dropping may tear objects down.
    RW_FILES.fetch_add(counted(Some(&file)), Ordering::AcqRel);
    let old = files().insert(fd, file);
    RW_FILES.fetch_sub(counted(old.as_ref()), Ordering::AcqRel);
    drop(old);
}

/// `fd` was closed: an object goes with its last descriptor.
pub fn remove(fd: c_int) {
    let old = files().remove(&fd);
    RW_FILES.fetch_sub(counted(old.as_ref()), Ordering::AcqRel);
    drop(old);
}

/// Every descriptor in the table.
pub fn fds() -> Vec<c_int> {
    files().keys().copied().collect()
}

/// Records `new` as another descriptor of whatever `old` is.
pub fn duplicate(old: c_int, new: c_int) {
    match get(old) {
        Some(file) => insert(new, file),
        None => remove(new),
    }
}
