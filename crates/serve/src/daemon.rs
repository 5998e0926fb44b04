//! The daemon: iommufd contexts, and the files made from them, held for
//! other processes.
//!
//! Every file a program gets from the daemon (an iommufd, a fault queue, a
//! vEVENTQ, a selftest access) is one end of a socket pair whose other end
//! the daemon keeps, filed under the program's end's identity (`st_dev`,
//! `st_ino`). The kernel then does the rest as it does for its own files:
//! `dup`, `fork`, `exec` and `SCM_RIGHTS` share the program's end, and when
//! the last descriptor of it anywhere closes, the daemon's end hangs up and
//! the object is dropped. A hang-up is seen by a watcher thread and, so that
//! `close` followed by another command behaves as Linux's synchronous
//! release, before every request too ([`Daemon::reap`]).
//!
//! A request names the program's descriptor by its number; the daemon takes
//! its own copy (`pidfd_getfd`) and looks the file up by identity, so a
//! program reaches only the objects it opened or was handed.
//!
//! Fault queues and vEVENTQs are sockets the daemon writes records into (a
//! pump thread per queue, see `pump`): `read`, `poll` and `epoll` on them
//! need nothing from the shim, in any process the descriptor reaches.
//! Responses written to a fault queue are read back and handed to it.

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};

use parking_lot::Mutex;
use rustix::event::epoll;

use ioasid_abi::Errno;
use ioasid_abi::files::File;
use ioasid_abi::user::{Descriptors, UserMemory};
use ioasid_engine::Context;
use ioasid_engine::ioasid_set::SetHandle;

use crate::limits::{Counted, Limits, Usage};
use crate::wire;

/// An open file's identity.
type Key = (u64, u64);

/// Hands descriptors to the program a request came from.
pub trait Installer {
    /// Gives the program `fd`, which is a `kind` of file (`wire::FILE_*`);
    /// returns its number there.
    fn install(&self, fd: OwnedFd, cloexec: bool, kind: u64) -> Result<i32, Errno>;
    /// Takes back descriptor `n` that `install` gave, when the command
    /// that made it failed after all (best effort).
    fn uninstall(&self, n: i32);
}

/// What the daemon holds for programs.
#[derive(Clone)]
pub enum Holding {
    /// An ioasid file.
    File(File),
    /// An object whose memory a program maps, kept while it does.
    Mapping(ioasid_abi::mmap::Owner),
}

impl Holding {
    fn counted(&self) -> Counted {
        match self {
            Holding::File(File::Iommufd(_)) => Counted::Context,
            _ => Counted::File,
        }
    }
}

/// One object held for programs.
struct Held {
    what: Holding,
    /// The daemon's end of the pair; it hangs up when the programs' end is
    /// closed everywhere.
    ours: Arc<OwnedFd>,
    /// Whose limits it counts against.
    owner: u32,
}

/// The daemon's state. Cheap to share: front ends hold an `Arc`.
pub struct Daemon {
    held: Mutex<HashMap<Key, Held>>,
    /// Held by whoever drops what hung up, until it is dropped: a request
    /// that reaps finds the objects gone, not going.
    reaping: Mutex<()>,
    /// Supervised opens whose descriptor the supervisor still holds (see
    /// `Handler::released`): a program's close of one is seen only after.
    opening: AtomicUsize,
    /// Every `Held::ours`, watched for hang-ups (data: its index in `keys`).
    watch: OwnedFd,
    keys: Mutex<Slots>,
    limits: Limits,
    usage: Mutex<HashMap<u32, Usage>>,
    /// The queues' pumps, flushed after each command.
    pumps: Mutex<Vec<Weak<crate::pump::Pump>>>,
    /// Commands running now (see `pump`).
    busy: Arc<AtomicUsize>,
    /// Each user's share of the PASID space: the set its contexts' top
    /// IOASID sets go under.
    pasid_roots: Mutex<HashMap<u32, Arc<SetHandle>>>,
    /// Back ends' ports, waited for by every grace period.
    pub remotes: Arc<crate::remote::Remotes>,
}

/// Watch-set slots: epoll data is an index here.
#[derive(Default)]
struct Slots {
    keys: Vec<Option<Key>>,
    free: Vec<usize>,
}

impl Daemon {
    pub fn new(limits: Limits) -> std::io::Result<Arc<Daemon>> {
        let watch = epoll::create(epoll::CreateFlags::CLOEXEC)?;
        let bound = std::time::Duration::from_millis(limits.backend_stall_ms.into());
        let d = Arc::new(Daemon {
            held: Mutex::new(HashMap::new()),
            reaping: Mutex::new(()),
            opening: AtomicUsize::new(0),
            watch,
            keys: Mutex::new(Slots::default()),
            limits,
            usage: Mutex::new(HashMap::new()),
            pumps: Mutex::new(Vec::new()),
            busy: Arc::new(AtomicUsize::new(0)),
            pasid_roots: Mutex::new(HashMap::new()),
            remotes: crate::remote::Remotes::new(bound),
        });
        let weak = Arc::downgrade(&d);
        std::thread::Builder::new().name("ioasid-reaper".into()).spawn(move || reaper(weak))?;
        Ok(d)
    }

    /// How many objects are held (for tests and the log).
    pub fn held(&self) -> usize {
        self.held.lock().len()
    }

    /// Drops every object whose programs' end has been closed everywhere
    /// (without waiting for any).
    pub fn reap(&self) {
        // A supervised program answered its open may already have closed
        // the descriptor, which the supervisor's copy keeps open: wait for
        // that copy (microseconds, unless its thread was preempted).
        let mut spins = 0u32;
        while self.opening.load(Ordering::Acquire) > 0 {
            spins += 1;
            if spins > 64 {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
        let _reaping = self.reaping.lock();
        let mut events = Vec::with_capacity(64);
        let now = rustix::time::Timespec { tv_sec: 0, tv_nsec: 0 };
        if epoll::wait(&self.watch, spare(&mut events), Some(&now)).is_err() {
            return;
        }
        let mut gone = Vec::new();
        {
            let mut slots = self.keys.lock();
            for e in &events {
                let slot = e.data.u64() as usize;
                if let Some(key) = slots.keys.get_mut(slot).and_then(Option::take) {
                    slots.free.push(slot);
                    gone.push(key);
                }
            }
        }
        // Dropped outside the lock: a context's drop runs its objects' teardown.
        let mut dropped = Vec::new();
        {
            let mut held = self.held.lock();
            for key in gone {
                if let Some(h) = held.remove(&key) {
                    let _ = epoll::delete(&self.watch, h.ours.as_fd());
                    self.usage.lock().entry(h.owner).or_default().release(h.what.counted());
                    dropped.push(h);
                }
            }
        }
        if !dropped.is_empty() {
            tracing::debug!(objects = dropped.len(), "released");
        }
        drop(dropped);
    }

    /// Files `file` under the program's end `theirs`, watching `ours`.
    fn hold(&self, theirs: &OwnedFd, ours: Arc<OwnedFd>, what: Holding, owner: u32) -> Result<Key, Errno> {
        let key = wire::identity(theirs).ok_or(Errno::EBADF)?;
        self.usage.lock().entry(owner).or_default().charge(&self.limits, what.counted())?;
        let slot = {
            let mut slots = self.keys.lock();
            let slot = slots.free.pop().unwrap_or(slots.keys.len());
            if slot == slots.keys.len() {
                slots.keys.push(None);
            }
            slots.keys[slot] = Some(key);
            slot
        };
        let flags = epoll::EventFlags::RDHUP | epoll::EventFlags::HUP;
        if let Err(e) = epoll::add(&self.watch, ours.as_fd(), epoll::EventData::new_u64(slot as u64), flags) {
            self.usage.lock().entry(owner).or_default().release(what.counted());
            let mut slots = self.keys.lock();
            slots.keys[slot] = None;
            slots.free.push(slot);
            return Err(Errno(e.raw_os_error()));
        }
        self.held.lock().insert(key, Held { what, ours, owner });
        Ok(key)
    }

    fn unhold(&self, key: Key) {
        let h = self.held.lock().remove(&key);
        if let Some(h) = h {
            let _ = epoll::delete(&self.watch, h.ours.as_fd());
            self.usage.lock().entry(h.owner).or_default().release(h.what.counted());
        }
    }

    /// Moves every queue's waiting records into its socket (see
    /// `Pump::flush`); called before a command's answer.
    pub fn flush_queues(&self) {
        let pumps: Vec<_> = {
            let mut pumps = self.pumps.lock();
            pumps.retain(|p| p.upgrade().is_some_and(|p| p.alive()));
            pumps.iter().filter_map(Weak::upgrade).collect()
        };
        for p in pumps {
            p.flush();
        }
    }

    /// The file `copy` (the daemon's copy of a program's descriptor) is,
    /// when it is one of the daemon's.
    pub fn file(&self, copy: &OwnedFd) -> Option<File> {
        let key = wire::identity(copy)?;
        match &self.held.lock().get(&key)?.what {
            Holding::File(f) => Some(f.clone()),
            Holding::Mapping(_) => None,
        }
    }

    /// A new context for process `pid` of user `uid`, which opened it: the
    /// descriptor to give the program.
    pub fn open_context(&self, pid: i32, uid: u32) -> Result<OwnedFd, Errno> {
        let (ours, theirs) = wire::seqpacket_pair().map_err(|e| Errno(e.raw_os_error()))?;
        let root = {
            let mut roots = self.pasid_roots.lock();
            match roots.get(&uid) {
                Some(r) => r.clone(),
                None => {
                    let r = ioasid_engine::ioasid_set::shared_root(self.limits.pasids).map_err(Errno::from)?;
                    roots.insert(uid, r.clone());
                    r
                }
            }
        };
        let config = ioasid_engine::ContextConfig {
            pasid_parent: Some(root),
            max_objects: Some(self.limits.objects),
            max_queue_depth: Some(self.limits.queue_depth),
            ..ioasid_engine::ContextConfig::of_client(pid)
        };
        let file = File::Iommufd(Arc::new(Context::with_config(config)));
        end_reads_unless_readable(&file, &ours);
        self.hold(&theirs, Arc::new(ours), Holding::File(file), uid)?;
        tracing::debug!(pid, uid, "context opened");
        Ok(theirs)
    }

    /// `mmap` of `len` bytes at `offset` of context `file` (the daemon's
    /// copy of the program's descriptor): the memory to map, and the hold
    /// that keeps its object until the program closes it.
    pub fn mmap(
        &self,
        peer: &Peer<'_>,
        file: &OwnedFd,
        len: usize,
        prot: i32,
        flags: i32,
        offset: i64,
    ) -> Result<(OwnedFd, OwnedFd), Errno> {
        let Some(File::Iommufd(ctx)) = self.file(file) else { return Err(Errno(libc::ENODEV)) };
        let owner = ioasid_abi::mmap::region(&ctx, len, prot, flags, offset)?;
        let memory = owner.mmap_region().ok_or(Errno(libc::ENXIO))?.memory();
        let memory = memory.try_clone_to_owned().map_err(|_| Errno(libc::ENFILE))?;
        let (ours, theirs) = wire::seqpacket_pair().map_err(|e| Errno(e.raw_os_error()))?;
        self.hold(&theirs, Arc::new(ours), Holding::Mapping(owner), peer.uid)?;
        Ok((memory, theirs))
    }

    /// `ioctl(fd, request, arg)` where `file` is what the program's `fd`
    /// is (see [`Daemon::file`]).
    pub fn ioctl(&self, peer: &Peer<'_>, file: File, request: u32, arg: u64) -> Result<i64, Errno> {
        self.busy.fetch_add(1, Ordering::AcqRel);
        let r = match file {
            File::Iommufd(ctx) => ioasid_abi::ioctl(&ctx, peer, request, arg).map(i64::from),
            // Linux's other anonymous files of iommufd have no ioctls.
            _ => Err(Errno::ENOTTY),
        };
        self.flush_queues();
        self.busy.fetch_sub(1, Ordering::AcqRel);
        r
    }
}

/// `Vec::spare_capacity_mut` as rustix's buffer.
fn spare(v: &mut Vec<epoll::Event>) -> rustix::buffer::SpareCapacity<'_, epoll::Event> {
    rustix::buffer::spare_capacity(v)
}

fn reaper(daemon: Weak<Daemon>) {
    loop {
        let Some(d) = daemon.upgrade() else { return };
        // Wakes at least once a second to notice the daemon is gone.
        let mut events = Vec::with_capacity(1);
        let second = rustix::time::Timespec { tv_sec: 1, tv_nsec: 0 };
        let ready = epoll::wait(&d.watch, spare(&mut events), Some(&second)).is_ok_and(|n| n > 0);
        if ready {
            d.reap();
        }
    }
}

/// The program a request came from, as the dispatcher sees it: its memory
/// (through the kernel's cross-process interfaces) and its descriptors.
pub struct Peer<'a> {
    pub daemon: &'a Daemon,
    pub pid: i32,
    pub uid: u32,
    pub pidfd: OwnedFd,
    pub installer: &'a dyn Installer,
}

impl<'a> Peer<'a> {
    pub fn new(daemon: &'a Daemon, pid: i32, uid: u32, installer: &'a dyn Installer) -> Result<Self, Errno> {
        let p = rustix::process::Pid::from_raw(pid).ok_or(Errno(libc::ESRCH))?;
        let pidfd = rustix::process::pidfd_open(p, rustix::process::PidfdFlags::empty())
            .map_err(|e| Errno(e.raw_os_error()))?;
        Ok(Peer { daemon, pid, uid, pidfd, installer })
    }

    /// The daemon's copy of the program's descriptor `fd`.
    pub fn copy(&self, fd: i32) -> Result<OwnedFd, Errno> {
        if fd < 0 {
            return Err(Errno::EBADF);
        }
        rustix::process::pidfd_getfd(&self.pidfd, fd, rustix::process::PidfdGetfdFlags::empty()).map_err(|e| match e {
            rustix::io::Errno::BADF => Errno::EBADF,
            e => Errno(e.raw_os_error()),
        })
    }
}

impl UserMemory for Peer<'_> {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), Errno> {
        ioasid_engine::memory::read_process(self.pid, addr, buf).map_err(Errno::from)
    }

    fn write(&self, addr: u64, data: &[u8]) -> Result<(), Errno> {
        ioasid_engine::memory::write_process(self.pid, addr, data).map_err(Errno::from)
    }

    fn pid(&self) -> Option<i32> {
        Some(self.pid)
    }

    fn client(&self) -> bool {
        true
    }

    fn descriptors(&self) -> Result<&dyn Descriptors, Errno> {
        Ok(self)
    }
}

impl Descriptors for Peer<'_> {
    fn get(&self, fd: i32) -> Result<OwnedFd, Errno> {
        self.copy(fd)
    }

    fn file(&self, fd: i32) -> Option<File> {
        let copy = self.copy(fd).ok()?;
        self.daemon.file(&copy)
    }

    fn install(&self, file: File, fd: OwnedFd, respond: &mut dyn FnMut(i32) -> Result<(), Errno>) -> Result<(), Errno> {
        // The answer must reach the program before it gets a descriptor it
        // would not be told about: try it first with no number.
        respond(-1)?;
        let queue = matches!(file, File::Fault(_) | File::Veventq(_));
        let (ours, theirs) = if matches!(file, File::Fault(_)) {
            rustix::net::socketpair(
                rustix::net::AddressFamily::UNIX,
                rustix::net::SocketType::STREAM,
                rustix::net::SocketFlags::CLOEXEC,
                None,
            )
        } else {
            wire::seqpacket_pair()
        }
        .map_err(|e| Errno(e.raw_os_error()))?;
        let ours = Arc::new(ours);
        let kind = match file {
            File::Fault(_) => wire::FILE_FAULT,
            File::Veventq(_) => wire::FILE_VEVENTQ,
            File::Device(_) => wire::FILE_DEVICE,
            File::TestAccess(_) => wire::FILE_ACCESS,
            _ => wire::FILE_PLAIN,
        };
        if let File::Device(d) = &file {
            // Back ends' events are read from the program's end.
            d.send_events_to(ours.clone());
        }
        end_reads_unless_readable(&file, &ours);
        let key = self.daemon.hold(&theirs, ours.clone(), Holding::File(file.clone()), self.uid)?;
        if queue {
            // `fd` is the queue's eventfd, readable while records wait.
            if let Some(p) = crate::pump::start(&file, fd, ours, self.daemon.busy.clone()) {
                self.daemon.pumps.lock().push(Arc::downgrade(&p));
            }
        }
        let n = match self.installer.install(theirs, true, kind) {
            Ok(n) => n,
            Err(e) => {
                self.daemon.unhold(key);
                return Err(e);
            }
        };
        respond(n).inspect_err(|_| {
            self.installer.uninstall(n);
            self.daemon.unhold(key);
        })
    }

    fn give(&self, fd: OwnedFd) -> Result<i32, Errno> {
        let cloexec = rustix::io::fcntl_getfd(&fd).is_ok_and(|f| f.contains(rustix::io::FdFlags::CLOEXEC));
        self.installer.install(fd, cloexec, wire::FILE_PLAIN)
    }
}

impl Daemon {
    /// The file a supervised program's open of `path` gets, if it is one
    /// of the daemon's.
    fn open_file(
        &self,
        call: &crate::supervise::Call<'_>,
        path: &std::ffi::CStr,
        flags: i32,
    ) -> Option<Result<OwnedFd, Errno>> {
        if let Some(pid) = ioasid_abi::proc_status::target(path.to_bytes(), call.pid()) {
            // The pins the daemon charges show in the status file, as Linux's do.
            if flags & libc::O_ACCMODE != libc::O_RDONLY {
                return None;
            }
            // What a close just let go of is not counted, as in Linux.
            self.reap();
            let (locked, pinned) = ioasid_engine::account::process_pages(Some(pid));
            return ioasid_abi::proc_status::file(pid, locked, pinned, flags & libc::O_CLOEXEC != 0);
        }
        if path.to_bytes() != b"/dev/iommu" {
            return None;
        }
        self.reap();
        Some(self.open_context(call.pid(), call.uid()))
    }
}

/// A supervised program's calls (see `supervise`), answered as the shim's
/// are: the program's memory and descriptors are reached the same way.
impl crate::supervise::Handler for Daemon {
    fn open(
        &self,
        call: &crate::supervise::Call<'_>,
        path: &std::ffi::CStr,
        flags: i32,
    ) -> Option<Result<OwnedFd, Errno>> {
        let opened = self.open_file(call, path, flags);
        if let Some(Ok(_)) = opened {
            self.opening.fetch_add(1, Ordering::AcqRel);
        }
        opened
    }

    fn released(&self) {
        self.opening.fetch_sub(1, Ordering::AcqRel);
    }

    fn ioctl(
        &self,
        call: &crate::supervise::Call<'_>,
        file: &OwnedFd,
        _fd: i32,
        request: u32,
        arg: u64,
    ) -> Option<Result<i64, Errno>> {
        self.reap();
        let file = self.file(file)?;
        let installer = Notified(call);
        Some(Peer::new(self, call.pid(), call.uid(), &installer).and_then(|peer| self.ioctl(&peer, file, request, arg)))
    }
}

/// Descriptors a supervised program's command makes are added to its table
/// by the kernel (`SECCOMP_IOCTL_NOTIF_ADDFD`).
struct Notified<'a, 'b>(&'a crate::supervise::Call<'b>);

impl Installer for Notified<'_, '_> {
    fn install(&self, fd: OwnedFd, cloexec: bool, _kind: u64) -> Result<i32, Errno> {
        self.0.install(fd, cloexec)
    }

    /// A descriptor added to another process cannot be taken back; the
    /// answer is tried before it is added (see `Peer::install`), so only a
    /// program that unmaps its argument meanwhile is left holding one.
    fn uninstall(&self, _n: i32) {}
}

/// The daemon never writes to the socket of a file whose Linux counterpart
/// has no `read` (`Kind::can_read`: an iommufd, a selftest access): shut
/// for writing, a read of the program's end sees the end of the file at
/// once instead of waiting for ever, where the shim cannot answer it
/// (`EINVAL`) itself: in a supervised program, or one that received the
/// file from another process. Its hang-up still shows: that is the
/// program's end closing.
fn end_reads_unless_readable(file: &File, ours: &OwnedFd) {
    if !file.kind().can_read() {
        let _ = rustix::net::shutdown(ours, rustix::net::Shutdown::Write);
    }
}
