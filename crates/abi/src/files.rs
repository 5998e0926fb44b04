//! The file descriptors of this process that are ioasid objects: iommufd
//! contexts, and the test accesses the selftest command hands out. Like a
//! kernel's file table, it is process-wide; the preload shim consults it on
//! every `ioctl`, `close` and `dup`.
//!
//! A number is only a name: a program can close a descriptor in ways the
//! shim never sees (`close_range`, a raw system call) and get the number
//! back for another file. So each entry remembers the open file it was made
//! for, and a lookup checks with a raw system call, which no hooked C
//! library function sees, that the number still names it; an entry whose
//! file is gone is dropped with its objects. How it remembers (a `Mark`):
//! - Linux's counterparts have no `lseek`, so a program never sets their
//!   position (the shim answers `ESPIPE`, as Linux does). Most (the
//!   iommufd, VFIO groups and devices, selftest accesses, `fail-nth`) are
//!   memfds whose position starts at a mark of their own, far past any
//!   real file's: one `lseek` tells it, at half the cost of an `fstat`, on
//!   every `ioctl`. Reading a VFIO device or `fail-nth` (and writing a
//!   device) moves the position on from there, as the file's own.
//! - Any other by its inode (`st_dev`, `st_ino`: every memfd has its own),
//!   with an `fstat`. The queues' eventfds share the kernel's one anonymous
//!   inode, so for them the check only tells an eventfd from anything else.
//!
//! Lookups take no lock, so no thread can hold the table at `fork` in a
//! way the child would wait for; writers are serialised by a lock that the
//! forking thread holds across `fork` and releases on both sides.
//!
//! This module and `selftest` import each other, on purpose: the table
//! holds the selftest's access files by their type (as it holds fault
//! queues and vEVENTQs), and the selftest command registers them here and
//! finds them by number. No single item can move to break the cycle: an
//! access file is the selftest's mock access driver and the access it
//! serves, which the selftest's handlers reach into; moving it here would
//! put the mock driver in the file table, and an untyped entry would trade
//! the cycle for a downcast on every lookup.
//!
//! `vfio` and this module import each other for the same reason: the table
//! holds VFIO device and group files by their type, and the VFIO ioctls
//! find the iommufd a bind or `SET_CONTAINER` names, and register the
//! device file `GET_DEVICE_FD` opens, by number here.
//!
//! After a `fork` the child's table is a copy: its entries name objects
//! that live in the parent (their *owner*), where the child's calls on
//! them are carried out; what the child opens itself is its own.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::ffi::c_int;
use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard};

use arc_swap::ArcSwap;

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
    /// A VFIO device file of a declared PCI function.
    VfioDevice(Arc<crate::vfio::device::DeviceFile>),
    /// A VFIO group file (`/dev/vfio/N`).
    VfioGroup(Arc<crate::vfio::group::GroupFile>),
    /// A device for a back end in another process (`IOASID_DEVICE_NEW`).
    Device(Arc<crate::device_file::DeviceFile>),
}

impl File {
    pub fn kind(&self) -> Kind {
        match self {
            File::Iommufd(_) => Kind::Iommufd,
            File::TestAccess(_) => Kind::TestAccess,
            File::FailNth(_) => Kind::FailNth,
            File::Fault(_) => Kind::Fault,
            File::Veventq(_) => Kind::Veventq,
            File::VfioDevice(_) => Kind::VfioDevice,
            File::VfioGroup(_) => Kind::VfioGroup,
            File::Device(_) => Kind::Device,
        }
    }
}

/// A `File` without its object: what the file's Linux counterpart allows
/// goes by it, wherever the object lives (here, or in `ioasid serve`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Iommufd,
    TestAccess,
    FailNth,
    Fault,
    Veventq,
    VfioDevice,
    VfioGroup,
    Device,
}

/// What Linux's counterpart of each file allows, from its file operations
/// and how it is opened. None has `llseek`: `lseek` is `ESPIPE` on every
/// one (the shim answers it).
impl Kind {
    /// Whether the shim keeps the file's mark, and the position it has, in
    /// the position of the memfd it is (see `Mark`). Fault queues and
    /// vEVENTQs are eventfds, which `poll` needs, and a back end's device is
    /// an open file other processes share (a back end opens its port
    /// through it): they are known by their inode instead.
    pub fn marked_by_position(self) -> bool {
        !matches!(self, Kind::Fault | Kind::Veventq | Kind::Device)
    }

    /// Whether it can be read (`FMODE_CAN_READ`: its operations have
    /// `read`); every form of `read` is `EINVAL` otherwise.
    pub fn can_read(self) -> bool {
        matches!(self, Kind::FailNth | Kind::Fault | Kind::Veventq | Kind::VfioDevice | Kind::Device)
    }

    /// Whether it can be written (`FMODE_CAN_WRITE`).
    pub fn can_write(self) -> bool {
        matches!(self, Kind::FailNth | Kind::Fault | Kind::VfioDevice)
    }

    /// Whether it takes positioned reads and writes (`FMODE_PREAD` and
    /// `FMODE_PWRITE`): files opened by path have them, and VFIO gives
    /// them to the device files it makes; the other anonymous files (the
    /// queues, selftest accesses, back ends' devices) do not, so `pread`,
    /// `pwrite` and their vector forms are `ESPIPE` there, whatever the
    /// offset.
    pub fn has_pread(self) -> bool {
        matches!(self, Kind::Iommufd | Kind::VfioGroup | Kind::VfioDevice | Kind::FailNth)
    }
}

/// A process, as the owner of objects: a process ID alone could name a
/// later process too.
pub type Owner = u64;

/// One descriptor's entry.
#[derive(Clone)]
pub struct Entry {
    pub file: File,
    /// How the number is known to still name the open file.
    mark: Mark,
    /// Names the open file among its owner's, the same for every duplicate.
    pub serial: u64,
    /// The process whose objects these are.
    pub owner: Owner,
}

impl Entry {
    /// Whether the objects live in this process (not in a parent it was
    /// forked from).
    pub fn is_local(&self) -> bool {
        self.owner == this_process()
    }
}

/// How an entry's descriptor is known to still name its open file (see the
/// module docs).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mark {
    /// The open file's inode.
    Inode(u64, u64),
    /// The open file's position, shifted right by `POSITION_BITS`: what
    /// is left below is the file's own position.
    Position(u64),
}

/// Bits of a marked file's position left for the file itself: VFIO region
/// offsets (index << 40) fit.
pub const POSITION_BITS: u32 = 48;

impl Mark {
    /// The mark for a new entry of `file` at `fd`, set on the file now when
    /// it is one of those marked by position.
    fn new(fd: c_int, file: &File, serial: u64) -> Option<Mark> {
        if !file.kind().marked_by_position() {
            let (dev, ino) = inode(fd)?;
            return Some(Mark::Inode(dev, ino));
        }
        // Bit 62 set: past any real file's end; the rest tells this file
        // from this process's others and from another process's.
        let high = 1 << (62 - POSITION_BITS) | (serial ^ *SALT) & ((1 << (62 - POSITION_BITS)) - 1);
        // SAFETY: only for the duration of one lseek; the caller's new file.
        let fd = unsafe { BorrowedFd::borrow_raw(fd) };
        rustix::fs::seek(fd, rustix::fs::SeekFrom::Start(high << POSITION_BITS)).ok()?;
        Some(Mark::Position(high))
    }

    /// Whether `fd` still names the file this marks.
    fn names(self, fd: c_int) -> bool {
        match self {
            Mark::Inode(dev, ino) => inode(fd) == Some((dev, ino)),
            Mark::Position(high) => position(fd).is_some_and(|p| p >> POSITION_BITS == high),
        }
    }
}

/// Mixed into position marks, so that another process's files do not
/// share this one's.
static SALT: LazyLock<u64> = LazyLock::new(|| new_owner() >> 7);

/// `fd`'s position now; raw, so no hook sees it.
pub fn position(fd: c_int) -> Option<u64> {
    if fd < 0 {
        return None;
    }
    // SAFETY: only for the duration of one lseek; a closed number fails it.
    rustix::fs::seek(unsafe { BorrowedFd::borrow_raw(fd) }, rustix::fs::SeekFrom::Current(0)).ok()
}

/// By number. A program has a few ioasid files, so a lookup (on every
/// `ioctl`) searches one node's handful of numbers: 137 instructions a
/// lookup, where hashing the number with the standard hasher made it 262.
type Table = BTreeMap<c_int, Entry>;

static TABLE: LazyLock<ArcSwap<Table>> = LazyLock::new(|| ArcSwap::from_pointee(Table::new()));
/// Serialises writers, who replace the table whole.
static WRITER: Mutex<()> = Mutex::new(());
/// How many entries there are, so `read` and `write` on descriptors of a
/// program without any skip the table.
static RW_FILES: AtomicUsize = AtomicUsize::new(0);
static SERIAL: AtomicU64 = AtomicU64::new(1);
/// This process as an owner, renewed in every forked child.
static THIS: LazyLock<AtomicU64> = LazyLock::new(|| {
    PID.store(std::process::id(), Ordering::Relaxed);
    AtomicU64::new(new_owner())
});
/// The process whose table this is: a `vfork` child (which runs in its
/// parent's memory without the fork handlers, as CPython's `subprocess`
/// does when it closes descriptors before `exec`) must not edit it.
static PID: AtomicU32 = AtomicU32::new(0);

thread_local! {
    /// The writer lock the forking thread holds across `fork`.
    static FORK_GUARD: RefCell<Option<MutexGuard<'static, ()>>> = const { RefCell::new(None) };
}

fn new_owner() -> Owner {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    (u64::from(std::process::id()) << 32) ^ (now.as_nanos() as u64)
}

/// This process, as the owner of the objects it made.
pub fn this_process() -> Owner {
    THIS.load(Ordering::Relaxed)
}

/// The inode `fd` names now; raw, so no hook sees it.
fn inode(fd: c_int) -> Option<(u64, u64)> {
    if fd < 0 {
        return None;
    }
    // SAFETY: only for the duration of one fstat; a closed number fails it.
    let st = rustix::fs::fstat(unsafe { BorrowedFd::borrow_raw(fd) }).ok()?;
    Some((st.st_dev, st.st_ino))
}

fn writer() -> MutexGuard<'static, ()> {
    WRITER.lock().unwrap_or_else(|e| e.into_inner())
}

/// Replaces the table with `edit`'s version of it. Entries `edit` drops go
/// with the old table, outside the writer lock when the caller drops what
/// this returns, since dropping may tear objects down.
fn update(edit: impl FnOnce(&mut Table)) -> Arc<Table> {
    LazyLock::force(&THIS);
    if std::process::id() != PID.load(Ordering::Relaxed) {
        return TABLE.load_full();
    }
    let _w = writer();
    let mut table = Table::clone(&TABLE.load());
    edit(&mut table);
    RW_FILES.store(table.len(), Ordering::Release);
    TABLE.swap(Arc::new(table))
}

/// Lets go of an entry leaving the table: a copy of a parent's objects,
/// inherited through `fork`, is never torn down here (the parent's are the
/// real ones, and their locks may have been held by threads this copy of the
/// process does not have).
fn release(entry: Entry) {
    if !entry.is_local() {
        std::mem::forget(entry.file);
    }
}

/// Holds the table across a `fork`, so the child cannot inherit it half
/// written by a thread that does not exist there.
pub fn lock_for_fork() {
    let guard = writer();
    FORK_GUARD.with(|g| *g.borrow_mut() = Some(guard));
}

/// Releases what `lock_for_fork` took, in the parent and in the child; in
/// the child, what the table holds becomes the parent's, and what the child
/// makes from now on its own.
pub fn unlock_after_fork(child: bool) {
    if child {
        PID.store(std::process::id(), Ordering::Relaxed);
        THIS.store(new_owner(), Ordering::Relaxed);
    }
    FORK_GUARD.with(|g| g.borrow_mut().take());
}

/// What `fd` is, when it still names the file its entry was made for. A
/// stale entry is dropped.
pub fn lookup(fd: c_int) -> Option<Entry> {
    let entry = TABLE.load().get(&fd).cloned()?;
    if entry.mark.names(fd) {
        return Some(entry);
    }
    drop_stale(fd, entry.serial);
    None
}

fn drop_stale(fd: c_int, serial: u64) {
    let mut gone = None;
    let old = update(|t| {
        if t.get(&fd).is_some_and(|e| e.serial == serial) {
            gone = t.remove(&fd);
        }
    });
    drop(old);
    gone.into_iter().for_each(release);
}

pub fn get(fd: c_int) -> Option<File> {
    lookup(fd).map(|e| e.file)
}

pub fn context(fd: c_int) -> Option<Arc<Context>> {
    match get(fd)? {
        File::Iommufd(ctx) => Some(ctx),
        _ => None,
    }
}

/// `fd`'s entry, for `read` and `write`: every ioasid file answers them
/// itself (the iommufd with a refusal).
pub fn rw_file(fd: c_int) -> Option<Entry> {
    if RW_FILES.load(Ordering::Acquire) == 0 {
        return None;
    }
    lookup(fd)
}

/// `fd` is a new open file of this process's: `file`. Entries whose files
/// were closed behind the table's back are dropped on the way.
pub fn insert(fd: c_int, file: File) {
    let serial = SERIAL.fetch_add(1, Ordering::Relaxed);
    let Some(mark) = Mark::new(fd, &file, serial) else { return };
    let entry = Entry { file, mark, serial, owner: this_process() };
    // By serial too: another thread may have put a new file at a stale
    // number since this list was made, and that entry must stay.
    let stale: Vec<(c_int, u64)> =
        TABLE.load().iter().filter(|(n, e)| **n != fd && !e.mark.names(**n)).map(|(n, e)| (*n, e.serial)).collect();
    let mut gone = Vec::new();
    let old = update(|t| {
        gone.extend(t.insert(fd, entry));
        for (n, serial) in &stale {
            if t.get(n).is_some_and(|e| e.serial == *serial) {
                gone.extend(t.remove(n));
            }
        }
    });
    drop(old);
    gone.into_iter().for_each(release);
}

/// `fd` was closed: an object goes with its last descriptor.
pub fn remove(fd: c_int) {
    remove_range(fd, fd);
}

/// Every descriptor from `first` to `last` was closed.
pub fn remove_range(first: c_int, last: c_int) {
    if !TABLE.load().keys().any(|n| (first..=last).contains(n)) {
        return;
    }
    let mut gone = Vec::new();
    let old = update(|t| {
        t.retain(|n, e| {
            let keep = !(first..=last).contains(n);
            if !keep {
                gone.push(e.clone());
            }
            keep
        })
    });
    drop(old);
    gone.into_iter().for_each(release);
}

/// Every descriptor in the table.
pub fn fds() -> Vec<c_int> {
    TABLE.load().keys().copied().collect()
}

/// The open files this process's objects are behind, by serial: what a
/// child forked now inherits and will ask this process to act on.
pub fn local_files() -> HashMap<u64, File> {
    TABLE.load().values().filter(|e| e.is_local()).map(|e| (e.serial, e.file.clone())).collect()
}

/// Records `new` as another descriptor of whatever `old` is.
pub fn duplicate(old: c_int, new: c_int) {
    match lookup(old) {
        Some(entry) => {
            let mut gone = None;
            let prev = update(|t| gone = t.insert(new, entry));
            drop(prev);
            gone.into_iter().for_each(release);
        }
        None => remove(new),
    }
}
