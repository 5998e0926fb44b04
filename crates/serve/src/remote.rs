//! Back ends in other processes: the daemon's side of their ports.
//!
//! A port is one device (at its RID or a PASID) as a back end reaches it:
//! a translation table in shared memory that the daemon fills when the
//! back end asks ([`RemotePort::translate`], PCIe ATS's translation
//! request) and takes back what may have changed (what an unmap touched,
//! or everything), waiting for the back end's DMA in flight
//! (`ioasid_client::atc` has the protocol).
//!
//! Every grace period of the engine (unmap, detach, replace, and the
//! invalidations and dirty-bit clears that need none in-process) calls
//! [`Remotes`], which checks each port's device: a port whose translations
//! changed since it was filled drops those (all of them unless only unmaps
//! changed them) and waits. A back end still
//! inside a DMA after the bound is cut off: its table closes, the daemon
//! kills its process (the only way to take back memory another process has
//! mapped) and waits for it to end, and the VMM reads an event on the
//! device's file. A back end that dies is noticed by its process
//! descriptor and not waited for.

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering, fence};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use ioasid_abi::Errno;
use ioasid_abi::device_file::{DeviceFile, IOASID_BACKEND_CUT_OFF, IOASID_BACKEND_GONE, ioasid_backend_event};
use ioasid_client::atc::{self, Shared, SlotsPage, TablePage};
use ioasid_client::wire;
use ioasid_engine::fault::DmaAttrs;
use ioasid_engine::memory::shared_file_at;
use ioasid_engine::{Perm, epoch};

/// How long a grace period waits for a back end before cutting it off.
pub const DEFAULT_BOUND: Duration = Duration::from_millis(100);

/// Bytes a miss publishes beyond what was asked, when the pages follow
/// on in the same file: a back end touching memory in order asks once per
/// this much, not once per page.
const AHEAD: u64 = 2 << 20;

/// Every port of the daemon's, for the engine's grace periods.
pub struct Remotes {
    ports: Mutex<Vec<Weak<RemotePort>>>,
    bound: Duration,
}

impl Remotes {
    /// The registry, registered with the engine: grace periods wait for
    /// back ends from now on. `bound`: how long they wait for one.
    pub fn new(bound: Duration) -> Arc<Remotes> {
        let r = Arc::new(Remotes { ports: Mutex::new(Vec::new()), bound });
        let weak: Weak<dyn epoch::External> = Arc::downgrade(&(r.clone() as Arc<dyn epoch::External>));
        epoch::add_external(weak);
        r
    }

    /// Ports open now.
    pub fn ports(&self) -> usize {
        self.ports.lock().iter().filter(|p| p.strong_count() > 0).count()
    }

    /// Misses the open ports' back ends have asked this daemon to serve.
    pub fn misses(&self) -> u64 {
        self.ports.lock().iter().filter_map(Weak::upgrade).map(|p| p.misses.load(Ordering::Relaxed)).sum()
    }

    /// Opens a port on `device` at `pasid` for process `pid` (whose
    /// descriptor is `pidfd`): the port, and the table and slots
    /// descriptors to send it.
    pub fn open(
        &self,
        device: Arc<DeviceFile>,
        pasid: Option<u32>,
        pid: i32,
        pidfd: OwnedFd,
    ) -> Result<(Arc<RemotePort>, OwnedFd, OwnedFd), Errno> {
        if let Some(p) = pasid {
            device.device().check_pasid(p).map_err(Errno::from)?;
        }
        // The guarantee rests on being able to stop the back end: refuse
        // one the daemon may not signal.
        send_signal(&pidfd, 0)?;
        let sys = |e: rustix::io::Errno| Errno(e.raw_os_error());
        let (table, table_fd) = Shared::<TablePage>::create(c"ioasid-atc").map_err(sys)?;
        let (slots, slots_fd) = Shared::<SlotsPage>::create(c"ioasid-atc-slots").map_err(sys)?;
        table.header.magic.store(atc::MAGIC, Ordering::Release);
        atc::seal(&table_fd).map_err(sys)?;
        let stamp = device.device().generation_at(pasid);
        let port = Arc::new(RemotePort {
            device,
            pasid,
            pid,
            pidfd,
            table,
            slots,
            bound: self.bound,
            writer: Mutex::new(Writer { stamp, inactive_clean: true, ..Writer::default() }),
            refused: Mutex::new(None),
            misses: AtomicU64::new(0),
        });
        let mut ports = self.ports.lock();
        ports.retain(|p| p.strong_count() > 0);
        ports.push(Arc::downgrade(&port));
        Ok((port, table_fd, slots_fd))
    }
}

impl epoch::External for Remotes {
    fn synchronize(&self) {
        let ports: Vec<_> = self.ports.lock().iter().filter_map(Weak::upgrade).collect();
        for p in ports {
            p.sync();
        }
    }
}

/// What the daemon has published in a port, and the files it named.
#[derive(Default)]
struct Writer {
    /// The current array's extents: (first IOVA, last IOVA, region, offset,
    /// rights), sorted.
    extents: Vec<(u64, u64, u32, u64, u32)>,
    /// The device's `generation_at` the extents were translated under.
    stamp: (usize, u64),
    /// No reader can be in the array not in use (a grace period passed
    /// since it was).
    inactive_clean: bool,
    /// Regions announced: (file identity, size) → index.
    regions: HashMap<((u64, u64), u64), u32>,
    /// Cut off or closed: nothing more is published or waited for.
    done: bool,
}

/// A file the back end must map before using a translation: (index, file,
/// bytes, writable).
pub type Announcement = (u32, Arc<OwnedFd>, u64, bool);

/// One back end's port on one device.
pub struct RemotePort {
    device: Arc<DeviceFile>,
    pasid: Option<u32>,
    pid: i32,
    pidfd: OwnedFd,
    table: Shared<TablePage>,
    slots: Shared<SlotsPage>,
    bound: Duration,
    writer: Mutex<Writer>,
    /// Where the last miss's DMA was refused past its first page (IOVA,
    /// rights): the back end asks again right there, and must get the
    /// fault, not a second page request for a page the VMM refused.
    refused: Mutex<Option<(u64, u32)>>,
    /// Misses served (`translate` calls).
    misses: AtomicU64,
}

impl RemotePort {
    fn stamp(&self) -> (usize, u64) {
        self.device.device().generation_at(self.pasid)
    }

    /// Serves a miss: translates `len` bytes at `iova` for `perm` as the
    /// device's DMA would (a fault is counted, a page request waits for
    /// the VMM's answer, an unrecoverable fault reaches the vIOMMU's
    /// event queue), then publishes the result, and somewhat more when the
    /// pages that follow are in the same file. Returns the files the back
    /// end must map first, and the table's generation once published
    /// (`None`: the device's table changed meanwhile, nothing published).
    /// `EFAULT`: the IOMMU refused; `EPERM`: cut off.
    pub fn translate(&self, iova: u64, len: u64, perm: u32) -> Result<(Vec<Announcement>, Option<u64>), Errno> {
        self.misses.fetch_add(1, Ordering::Relaxed);
        if self.writer.lock().done {
            return Err(Errno(libc::EPERM));
        }
        if self.refused.lock().take() == Some((iova, perm)) {
            return Err(Errno(libc::EFAULT));
        }
        let len = len.clamp(1, AHEAD);
        let need = if perm & wire::PERM_W != 0 { Perm::RW } else { Perm::R };
        let stamp = self.stamp();
        let port = self.device.device().port(self.pasid);
        // (IOVA, host address here, bytes), contiguous runs.
        let mut runs: Vec<(u64, u64, u64)> = Vec::new();
        let asked = port.access(need, DmaAttrs::default(), iova, len as usize, true, |t, r| {
            extend(&mut runs, iova + r.start as u64, t.host.0, r.len() as u64);
            Ok(())
        });
        // A fault past the first page: publish what came before it; the back
        // end asks again at the page that faulted.
        if asked.is_err() {
            match runs.last() {
                Some(&(start, _, n)) if runs[0].0 == iova => *self.refused.lock() = Some((start + n, perm)),
                _ => return Err(Errno(libc::EFAULT)),
            }
        }
        // While writes are tracked as dirty, a translation for writing marks
        // its page: publish only what was asked.
        let tracking = self.device.device().serving(self.pasid).is_some_and(|h| h.dirty_tracking());
        if !tracking && asked.is_ok() {
            let guard = epoch::pin();
            let mut at = iova.wrapping_add(len);
            let end = iova.saturating_add(AHEAD);
            while at < end {
                let Ok(t) = port.translate(at, need, &guard) else { break };
                let n = 4096 - at % 4096;
                // Only what follows on from what came before.
                if !runs.last().is_some_and(|&(i, h, l)| i + l == at && h + l == t.host.0) {
                    break;
                }
                extend(&mut runs, at, t.host.0, n);
                at += n;
            }
        }
        let mut w = self.writer.lock();
        if w.done {
            return Err(Errno(libc::EPERM));
        }
        let mut announce = Vec::new();
        let mut fresh = Vec::new();
        for (at, host, n) in runs {
            let (mut at, mut host, mut left) = (at, host, n);
            while left > 0 {
                // Memory the daemon reaches in the client itself (private)
                // cannot be shared: the back end faults on it.
                let Some(f) = shared_file_at(host) else { break };
                let identity = rustix::fs::fstat(f.file.as_fd()).map_err(|e| Errno(e.raw_os_error()))?;
                let size = identity.st_size as u64;
                let key = ((identity.st_dev, identity.st_ino), size);
                let next = w.regions.len() as u32;
                let region = match w.regions.get(&key) {
                    Some(&r) => r,
                    None if (next as usize) < atc::REGIONS => {
                        w.regions.insert(key, next);
                        announce.push((next, f.file.clone(), size, f.writable));
                        next
                    }
                    None => return Err(Errno(libc::ENOSPC)),
                };
                let take = left.min(f.len).min(size.saturating_sub(f.offset));
                if take == 0 {
                    break;
                }
                let rights = if f.writable && need.write { wire::PERM_R | wire::PERM_W } else { wire::PERM_R };
                fresh.push((at, at + take - 1, region, f.offset, rights));
                (at, host, left) = (at + take, host + take, left - take);
            }
        }
        if self.stamp() != stamp {
            // Changed while translating: publish nothing; the back end asks
            // again and gets the new translation.
            return Ok((announce, None));
        }
        if w.stamp != stamp {
            // What is published predates a change the grace period has not
            // caught up with yet: catch up now.
            self.catch_up(&mut w, stamp);
        }
        let mut all: Vec<_> = w
            .extents
            .iter()
            .copied()
            .filter(|&(a, l, ..)| !fresh.iter().any(|&(fa, fl, ..)| a <= fl && fa <= l))
            .collect();
        if all.len() + fresh.len() > atc::CAPACITY {
            all.clear();
        }
        all.extend_from_slice(&fresh);
        all.sort_unstable_by_key(|e| e.0);
        self.switch(&mut w, all);
        if w.done {
            return Err(Errno(libc::EPERM));
        }
        Ok((announce, Some(self.table.header.generation.load(Ordering::Relaxed))))
    }

    /// Makes `extents` current (the array readers do not use is written
    /// once they have left it).
    fn switch(&self, w: &mut Writer, extents: Vec<(u64, u64, u32, u64, u32)>) {
        if !w.inactive_clean {
            self.grace(w);
            if w.done {
                return;
            }
        }
        self.table.publish(&extents);
        w.extents = extents;
        w.inactive_clean = false;
    }

    /// Empties the table and waits until no DMA can use what it held.
    fn empty(&self, w: &mut Writer) {
        if w.extents.is_empty() && w.inactive_clean {
            return;
        }
        self.switch(w, Vec::new());
        if !w.done {
            self.grace(w);
        }
    }

    /// The engine's grace period reached this port.
    fn sync(&self) {
        let mut w = self.writer.lock();
        if w.done {
            return;
        }
        let stamp = self.stamp();
        if stamp == w.stamp {
            return;
        }
        self.catch_up(&mut w, stamp);
    }

    /// Brings the published table from `w.stamp` to `stamp`: drops the
    /// extents the changes between them touched (an unmap's range), or
    /// everything when those changes are not known, and waits until no
    /// DMA uses what was dropped.
    fn catch_up(&self, w: &mut Writer, stamp: (usize, u64)) {
        let changed = self.device.device().changes_between(self.pasid, w.stamp, stamp);
        w.stamp = stamp;
        let Some(ranges) = changed else { return self.empty(w) };
        let touched =
            |&(first, last, ..): &(u64, u64, u32, u64, u32)| ranges.iter().any(|&(f, l)| first <= l && f <= last);
        if !w.extents.iter().any(touched) {
            // The array before the current one may still have readers, and
            // what they read there a change may have touched: wait for them
            // (once: the array stays clean until the next publish).
            if !w.inactive_clean {
                self.grace(w);
            }
            return;
        }
        let kept = w.extents.iter().copied().filter(|e| !touched(e)).collect();
        self.switch(w, kept);
        if !w.done {
            self.grace(w);
        }
    }

    /// Waits for every reader inside a section now (or cuts the back end
    /// off after the bound).
    fn grace(&self, w: &mut Writer) {
        // Readers that fence themselves need only the writer's fence; the
        // others, the barrier on every CPU running them.
        let fenced = self.slots.fences.load(Ordering::Acquire) == 1;
        if fenced || rustix::thread::membarrier(rustix::thread::MembarrierCommand::GlobalExpedited).is_err() {
            fence(Ordering::SeqCst);
        }
        let used = (self.slots.used.load(Ordering::Acquire) as usize).min(atc::SLOTS);
        let deadline = Instant::now() + self.bound;
        for slot in &self.slots.slots[..used] {
            let seen = slot.seq.load(Ordering::Acquire);
            if seen & 1 == 0 {
                continue;
            }
            let mut spins = 0u32;
            while slot.seq.load(Ordering::Acquire) == seen {
                spins += 1;
                if spins < 256 {
                    std::hint::spin_loop();
                    continue;
                }
                if self.exited() {
                    w.inactive_clean = true;
                    return;
                }
                if Instant::now() >= deadline {
                    self.cut_off(w);
                    return;
                }
                if spins < 1024 {
                    std::thread::yield_now();
                } else {
                    std::thread::sleep(Duration::from_micros(50));
                }
            }
        }
        w.inactive_clean = true;
    }

    /// Whether the back end's process has ended.
    fn exited(&self) -> bool {
        let mut fds = [rustix::event::PollFd::new(&self.pidfd, rustix::event::PollFlags::IN)];
        let zero = rustix::time::Timespec { tv_sec: 0, tv_nsec: 0 };
        rustix::event::poll(&mut fds, Some(&zero)).is_ok_and(|n| n > 0)
    }

    fn event(&self, kind: u32) {
        self.device.notify(ioasid_backend_event {
            kind,
            pid: self.pid as u32,
            pasid: self.pasid.unwrap_or(u32::MAX),
            __reserved: 0,
        });
    }

    /// The back end stalled inside a DMA past the bound: close its table,
    /// kill it and wait for it to end (its mappings go with it), tell the
    /// VMM.
    fn cut_off(&self, w: &mut Writer) {
        self.table.header.state.store(atc::CUT_OFF, Ordering::Release);
        w.done = true;
        tracing::warn!(
            pid = self.pid,
            bound_ms = self.bound.as_millis() as u64,
            "a back end stayed inside a DMA past the bound; it is cut off"
        );
        let _ = send_signal(&self.pidfd, libc::SIGKILL);
        let mut fds = [rustix::event::PollFd::new(&self.pidfd, rustix::event::PollFlags::IN)];
        let wait = rustix::time::Timespec { tv_sec: 5, tv_nsec: 0 };
        let _ = rustix::event::poll(&mut fds, Some(&wait));
        w.inactive_clean = true;
        self.event(IOASID_BACKEND_CUT_OFF);
    }

    /// The back end closed its channel (or ended): nothing it still has
    /// mapped may be used from now on.
    pub fn close(&self) {
        let mut w = self.writer.lock();
        if w.done {
            return;
        }
        self.table.header.state.store(atc::CLOSED, Ordering::Release);
        // A back end that only closed its channel may still be inside.
        self.empty(&mut w);
        if !w.done {
            w.done = true;
            self.event(IOASID_BACKEND_GONE);
        }
    }
}

impl Drop for RemotePort {
    fn drop(&mut self) {
        self.close();
    }
}

/// Adds `n` bytes at `at` (here: `host`) to `runs`, merged with the last
/// run when they follow on from it.
fn extend(runs: &mut Vec<(u64, u64, u64)>, at: u64, host: u64, n: u64) {
    match runs.last_mut() {
        Some((i, h, l)) if *i + *l == at && *h + *l == host => *l += n,
        _ => runs.push((at, host, n)),
    }
}

/// `pidfd_send_signal(pidfd, sig)`; 0 checks the permission only.
fn send_signal(pidfd: &OwnedFd, sig: i32) -> Result<(), Errno> {
    // SAFETY: a plain system call on a descriptor we own, no pointers.
    let r = unsafe { libc::syscall(libc::SYS_pidfd_send_signal, pidfd.as_raw_fd(), sig, 0usize, 0u32) };
    if r < 0 { Err(Errno(std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EPERM))) } else { Ok(()) }
}
