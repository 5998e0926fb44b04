//! A back end's view of one device: DMA at an IOVA, translated from the
//! table the daemon publishes (see [`atc`](crate::atc)) and copied into
//! memory mapped from the files the daemon hands over. A hit makes no
//! system call and sends no message; a miss asks the daemon once
//! ([`wire::TRANSLATE`]), which publishes what it found.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering, compiler_fence, fence};

use parking_lot::Mutex;

use crate::atc::{self, Shared, SlotsPage, TablePage};
use crate::wire::{self, Msg};

/// Why a DMA failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DmaError {
    /// The IOMMU refused the access (not mapped, not allowed, or refused
    /// by the page request's answer).
    #[error("IOMMU fault at IOVA {iova:#x} ({})", if *.write { "write" } else { "read" })]
    Fault {
        /// The first IOVA that failed.
        iova: u64,
        /// Whether it was a write.
        write: bool,
    },
    /// The port no longer translates: the back end was cut off, or the
    /// device or the daemon went away.
    #[error("the port is closed or cut off")]
    Blocked,
    /// More threads than the port has slots for ([`atc::SLOTS`]).
    #[error("too many threads doing DMA")]
    Threads,
    /// The daemon broke the protocol or went away (the errno).
    #[error("the daemon failed: errno {0}")]
    Daemon(i32),
}

/// A region: one file the daemon handed over, mapped whole.
struct Region {
    base: NonNull<u8>,
    len: u64,
    writable: bool,
    /// The file's `(st_dev, st_ino)`.
    identity: (u64, u64),
}

// SAFETY: the mapping is shared memory reached only by copies; the struct
// only carries its address and unmaps it once.
unsafe impl Send for Region {}
// SAFETY: as above.
unsafe impl Sync for Region {}

impl Region {
    fn map(fd: BorrowedFd<'_>, len: u64, writable: bool) -> Result<Region, DmaError> {
        let size = usize::try_from(len).map_err(|_| DmaError::Daemon(libc::EOVERFLOW))?;
        if size == 0 {
            return Err(DmaError::Daemon(libc::EPROTO));
        }
        let prot = if writable {
            rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE
        } else {
            rustix::mm::ProtFlags::READ
        };
        // SAFETY: a new shared mapping the kernel places; nothing else uses
        // its addresses, and it is only reached by copies.
        let p = unsafe { rustix::mm::mmap(std::ptr::null_mut(), size, prot, rustix::mm::MapFlags::SHARED, fd, 0) }
            .map_err(|e| DmaError::Daemon(e.raw_os_error()))?;
        let base = NonNull::new(p.cast()).ok_or(DmaError::Daemon(libc::ENOMEM))?;
        let identity = rustix::fs::fstat(fd).map_or((0, 0), |st| (st.st_dev, st.st_ino));
        Ok(Region { base, len, writable, identity })
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: exactly the mapping `map` made; copies through it borrow
        // the port, which owns this region.
        let _ = unsafe { rustix::mm::munmap(self.base.as_ptr().cast(), self.len as usize) };
    }
}

/// The connection a back end's ports share with the daemon.
struct Channel {
    sock: OwnedFd,
}

/// Asks for one access's misses in a row, past which it faults however
/// often unmaps invalidate the answers.
const MAX_ASKS: u32 = 64;

/// The misses of one access since it last found what it looked up.
#[derive(Default)]
pub(crate) struct Misses {
    asked: u32,
    /// Misses in a table unchanged since the daemon's answer.
    unexplained: u32,
    /// The generation the table reached when the daemon published its last
    /// answer.
    answered: Option<u64>,
}

/// One device (at its RID or one PASID) as a back end reaches it.
pub struct Port {
    channel: Mutex<Channel>,
    index: u32,
    table: Shared<TablePage>,
    slots: Shared<SlotsPage>,
    fences: bool,
    regions: Box<[OnceLock<Region>]>,
    /// Each thread's last translation, by slot number.
    hits: Box<[Hit]>,
}

/// A thread's last translation through a port, used again while the
/// table's generation stays the one it was found in: a hit then reads this
/// line and the table's header, where a lookup searches the extents and
/// finds the region, a chain of dependent loads. Only the thread holding
/// the slot number touches it (relaxed atomics: plain loads and stores).
#[repr(align(64))]
#[derive(Default)]
struct Hit {
    /// The table's generation when it was found.
    generation: AtomicU64,
    /// The IOVAs it covers (inside one extent and its region's mapping).
    first: AtomicU64,
    last: AtomicU64,
    /// The address here of `first`.
    host: AtomicU64,
    /// The rights it allows (`wire::PERM_*`; no write to a read-only
    /// region). None until a lookup fills it, so a new slot never hits: a
    /// DMA asks for read at least.
    perm: AtomicU32,
}

impl std::fmt::Debug for Port {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Port").field("index", &self.index).finish_non_exhaustive()
    }
}

/// This thread's slot number, the same in every port.
#[inline]
fn thread_slot() -> Option<usize> {
    // Without a destructor, so reading it costs a TLS offset and nothing
    // else; `claim_slot` gives the number back through `Release` at exit.
    thread_local! {
        static SLOT: std::cell::Cell<usize> = const { std::cell::Cell::new(usize::MAX) };
    }
    let i = SLOT.with(std::cell::Cell::get);
    if i < atc::SLOTS {
        return Some(i);
    }
    claim_slot(&SLOT)
}

/// `thread_slot` on a thread's first DMA: takes a free number (or the next
/// one) and arranges for it to go back when the thread exits.
#[cold]
#[inline(never)]
fn claim_slot(slot: &'static std::thread::LocalKey<std::cell::Cell<usize>>) -> Option<usize> {
    struct Release(std::cell::Cell<usize>);
    impl Drop for Release {
        fn drop(&mut self) {
            let i = self.0.get();
            if i != usize::MAX {
                FREE.lock().push(i);
            }
        }
    }
    static FREE: Mutex<Vec<usize>> = Mutex::new(Vec::new());
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    thread_local! {
        static OWNED: Release = const { Release(std::cell::Cell::new(usize::MAX)) };
    }
    if slot.with(std::cell::Cell::get) != usize::MAX {
        // Taken already, past the table's slots.
        return None;
    }
    OWNED
        .try_with(|owned| {
            let i = FREE.lock().pop().unwrap_or_else(|| NEXT.fetch_add(1, Ordering::Relaxed));
            owned.0.set(i);
            slot.with(|s| s.set(i));
            i
        })
        .ok()
        .filter(|&i| i < atc::SLOTS)
}

/// Whether readers may leave ordering to the daemon's membarrier.
fn membarrier_registered() -> bool {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    *REGISTERED.get_or_init(|| {
        use rustix::thread::{MembarrierCommand, membarrier, membarrier_query};
        membarrier_query().contains_command(MembarrierCommand::GlobalExpedited)
            && membarrier(MembarrierCommand::RegisterGlobalExpedited).is_ok()
    })
}

/// Where `ioasid serve` listens unless told: `/run/ioasid.sock` for root,
/// `$XDG_RUNTIME_DIR/ioasid.sock` for anyone else (or `/tmp/ioasid-UID.sock`).
pub fn serve_socket() -> std::path::PathBuf {
    let uid = rustix::process::getuid();
    if uid.is_root() {
        return "/run/ioasid.sock".into();
    }
    match std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        Some(dir) => std::path::Path::new(&dir).join("ioasid.sock"),
        None => format!("/tmp/ioasid-{}.sock", uid.as_raw()).into(),
    }
}

/// The daemon's socket for a back end: `$IOASID_SOCKET` (what `ioasid run
/// --socket` sets), else [`serve_socket`].
pub fn default_socket() -> std::path::PathBuf {
    std::env::var_os("IOASID_SOCKET").map_or_else(serve_socket, Into::into)
}

/// A section: while it lives, the daemon waits for this thread before an
/// unmap returns.
pub(crate) struct Section<'a> {
    slot: &'a atc::Slot,
    hit: &'a Hit,
}

impl Drop for Section<'_> {
    #[inline]
    fn drop(&mut self) {
        let depth = self.slot.depth.load(Ordering::Relaxed) - 1;
        self.slot.depth.store(depth, Ordering::Relaxed);
        if depth == 0 {
            let seq = self.slot.seq.load(Ordering::Relaxed) + 1;
            self.slot.seq.store(seq, Ordering::Release);
        }
    }
}

impl Port {
    /// Connects to the daemon at `socket` and opens a port on `device` (a
    /// device descriptor a VMM made with `IOASID_DEVICE_NEW` and passed
    /// here), at `pasid` or at the RID.
    pub fn open(socket: &std::path::Path, device: BorrowedFd<'_>, pasid: Option<u32>) -> Result<Port, DmaError> {
        let errno = |e: rustix::io::Errno| DmaError::Daemon(e.raw_os_error());
        let sock = rustix::net::socket_with(
            rustix::net::AddressFamily::UNIX,
            rustix::net::SocketType::SEQPACKET,
            rustix::net::SocketFlags::CLOEXEC,
            None,
        )
        .map_err(errno)?;
        let addr = rustix::net::SocketAddrUnix::new(socket).map_err(errno)?;
        rustix::net::connect(&sock, &addr).map_err(errno)?;
        Self::open_on(sock, device, pasid)
    }

    /// As [`Port::open`], on a channel already connected to the daemon.
    pub fn open_on(sock: OwnedFd, device: BorrowedFd<'_>, pasid: Option<u32>) -> Result<Port, DmaError> {
        let fences = !membarrier_registered();
        // The daemon takes its own copy of the device by number: send it
        // first, so the number is ours for sure.
        let mut m = Msg::new(wire::PORT);
        m.fd = -1;
        m.request = u32::from(pasid.is_some());
        m.arg = u64::from(pasid.unwrap_or(0));
        m.arg2 = 1;
        wire::send(sock.as_fd(), &m, &[device]).map_err(|e| DmaError::Daemon(e.raw_os_error()))?;
        let (reply, fds) = match wire::recv(sock.as_fd()) {
            Ok(Some(r)) => r,
            Ok(None) => return Err(DmaError::Daemon(libc::EPIPE)),
            Err(e) => return Err(DmaError::Daemon(e.raw_os_error())),
        };
        let index = reply.result().map_err(DmaError::Daemon)? as u32;
        let [table, slots]: [OwnedFd; 2] = fds.try_into().map_err(|_| DmaError::Daemon(libc::EPROTO))?;
        let table = Shared::<TablePage>::map(table.as_fd(), false).map_err(|e| DmaError::Daemon(e.raw_os_error()))?;
        let slots = Shared::<SlotsPage>::map(slots.as_fd(), true).map_err(|e| DmaError::Daemon(e.raw_os_error()))?;
        if table.header.magic.load(Ordering::Relaxed) != atc::MAGIC {
            return Err(DmaError::Daemon(libc::EPROTO));
        }
        if fences {
            slots.fences.store(1, Ordering::SeqCst);
        }
        let regions = (0..atc::REGIONS).map(|_| OnceLock::new()).collect();
        let hits = (0..atc::SLOTS).map(|_| Hit::default()).collect();
        Ok(Port { channel: Mutex::new(Channel { sock }), index, table, slots, fences, regions, hits })
    }

    #[inline]
    pub(crate) fn enter(&self) -> Result<Section<'_>, DmaError> {
        let i = thread_slot().ok_or(DmaError::Threads)?;
        let slot = &self.slots.slots[i];
        let depth = slot.depth.load(Ordering::Relaxed);
        if depth == 0 {
            if self.slots.used.load(Ordering::Relaxed) <= i as u32 {
                self.slots.used.fetch_max(i as u32 + 1, Ordering::SeqCst);
            }
            slot.seq.store(slot.seq.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
            if self.fences {
                fence(Ordering::SeqCst);
            } else {
                // The daemon's membarrier orders the store before the
                // table's loads on the CPU; only the compiler must not move
                // them above it.
                compiler_fence(Ordering::SeqCst);
            }
        }
        slot.depth.store(depth + 1, Ordering::Relaxed);
        Ok(Section { slot, hit: &self.hits[i] })
    }

    /// The address (here) of `len` bytes at `iova`, or fewer up to the end
    /// of its extent, when the table has them with `perm`: the thread's
    /// last translation while the table has not changed since, else a
    /// lookup, which becomes the last translation.
    #[inline]
    fn lookup(&self, iova: u64, perm: u32, hit: &Hit) -> Option<(*mut u8, usize)> {
        // Read before the table's `current`: a switch of the array bumps
        // it after, so a translation is never tagged with a generation
        // newer than its array's (an older one only misses next time).
        let generation = self.table.header.generation.load(Ordering::Acquire);
        if hit.generation.load(Ordering::Relaxed) == generation {
            let (first, last) = (hit.first.load(Ordering::Relaxed), hit.last.load(Ordering::Relaxed));
            let off = iova.wrapping_sub(first);
            if off <= last - first && perm & !hit.perm.load(Ordering::Relaxed) == 0 {
                let host = hit.host.load(Ordering::Relaxed).wrapping_add(off);
                return Some((host as *mut u8, (last - iova).saturating_add(1).min(usize::MAX as u64) as usize));
            }
        }
        let f = self.table.lookup(iova)?;
        let region = self.regions.get(f.region as usize)?.get()?;
        let allowed = if region.writable { f.perm } else { f.perm & !wire::PERM_W };
        if allowed & perm != perm || f.offset >= region.len {
            return None;
        }
        let n = f.len.min(region.len - f.offset);
        // SAFETY: `offset < len`, inside the region's mapping.
        let host = unsafe { region.base.as_ptr().add(f.offset as usize) };
        hit.first.store(iova, Ordering::Relaxed);
        hit.last.store(iova + (n - 1), Ordering::Relaxed);
        hit.host.store(host as u64, Ordering::Relaxed);
        hit.perm.store(allowed, Ordering::Relaxed);
        hit.generation.store(generation, Ordering::Relaxed);
        Some((host, n.min(usize::MAX as u64) as usize))
    }

    /// Runs a DMA of `len` bytes at `iova`, each translated piece handed to
    /// `copy(address here, range of the buffer)` inside a section.
    #[inline(always)]
    fn access(
        &self,
        iova: u64,
        len: usize,
        perm: u32,
        mut copy: impl FnMut(*mut u8, std::ops::Range<usize>),
    ) -> Result<(), DmaError> {
        let section = self.enter()?;
        // The common case first: one extent holds it all.
        if self.table.header.state.load(Ordering::Relaxed) == atc::OPEN
            && let Some((p, n)) = self.lookup(iova, perm, section.hit)
            && n >= len
        {
            copy(p, 0..len);
            return Ok(());
        }
        self.access_extents(iova, len, perm, copy, section)
    }

    /// `access` extent by extent, asking the daemon on a miss.
    #[inline(never)]
    fn access_extents<'a>(
        &'a self,
        iova: u64,
        len: usize,
        perm: u32,
        mut copy: impl FnMut(*mut u8, std::ops::Range<usize>),
        mut section: Section<'a>,
    ) -> Result<(), DmaError> {
        let mut done = 0usize;
        let mut misses = Misses::default();
        while done < len {
            if self.table.header.state.load(Ordering::Relaxed) != atc::OPEN {
                return Err(DmaError::Blocked);
            }
            let at = iova.wrapping_add(done as u64);
            match self.lookup(at, perm, section.hit) {
                Some((p, n)) => {
                    let n = n.min(len - done);
                    copy(p, done..done + n);
                    done += n;
                    misses = Misses::default();
                }
                None => {
                    // Outside the section: the daemon may be waiting for it.
                    drop(section);
                    self.miss(at, (len - done) as u64, perm, &mut misses)?;
                    section = self.enter()?;
                }
            }
        }
        Ok(())
    }

    /// Device reads `buf.len()` bytes at `iova`.
    #[inline]
    pub fn read(&self, iova: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        let dst = buf.as_mut_ptr();
        self.access(iova, buf.len(), wire::PERM_R, |p, r| {
            // SAFETY: `p` has `r.len()` readable bytes (its extent, inside
            // its region's mapping, checked by `lookup`), and `r` is inside
            // `buf`. The memory is shared with the guest: a copy, never a
            // reference.
            unsafe { std::ptr::copy_nonoverlapping(p, dst.add(r.start), r.len()) }
        })
    }

    /// Device writes `buf` at `iova`.
    #[inline]
    pub fn write(&self, iova: u64, buf: &[u8]) -> Result<(), DmaError> {
        let src = buf.as_ptr();
        self.access(iova, buf.len(), wire::PERM_R | wire::PERM_W, |p, r| {
            // SAFETY: as in `read`; `lookup` checked the region is writable.
            unsafe { std::ptr::copy_nonoverlapping(src.add(r.start), p, r.len()) }
        })
    }

    /// Whether the daemon cut this back end off or closed the port.
    pub fn blocked(&self) -> bool {
        self.table.header.state.load(Ordering::Relaxed) != atc::OPEN
    }

    /// How many times the table changed (each publication or invalidation).
    pub fn generation(&self) -> u64 {
        self.table.header.generation.load(Ordering::Acquire)
    }

    /// What the table has at `iova` for `perm`: the file's identity, the
    /// offset in it and the bytes from there. The caller is inside a section.
    pub(crate) fn table_lookup(&self, iova: u64, perm: u32) -> Option<((u64, u64), u64, u64)> {
        let f = self.table.lookup(iova)?;
        let region = self.regions.get(f.region as usize)?.get()?;
        if f.perm & perm != perm || f.offset >= region.len {
            return None;
        }
        Some((region.identity, f.offset, f.len.min(region.len - f.offset)))
    }

    /// Asks the daemon for `len` bytes at `iova` after a lookup missed
    /// there, unless the misses in `misses` say its answers do not hold. An
    /// answer an unmap invalidated before the lookup after it, or one the
    /// daemon could not publish as the table changed, is asked for again; a
    /// miss in a table unchanged since a published answer counts against
    /// the daemon, and a fourth is a fault. Called outside any section.
    pub(crate) fn miss(&self, iova: u64, len: u64, perm: u32, misses: &mut Misses) -> Result<(), DmaError> {
        if misses.answered == Some(self.generation()) {
            misses.unexplained += 1;
        }
        misses.asked += 1;
        if misses.unexplained > 3 || misses.asked > MAX_ASKS {
            return Err(DmaError::Fault { iova, write: perm & wire::PERM_W != 0 });
        }
        misses.answered = self.request(iova, len, perm)?;
        Ok(())
    }

    /// Asks the daemon to translate `len` bytes at `iova` for `perm` and
    /// publish them; maps the files it announces first. The table's
    /// generation once the daemon published (`None`: it did not).
    #[cold]
    pub(crate) fn request(&self, iova: u64, len: u64, perm: u32) -> Result<Option<u64>, DmaError> {
        let ch = self.channel.lock();
        let mut m = Msg::new(wire::TRANSLATE);
        m.fd = self.index as i32;
        m.request = perm;
        m.arg = iova;
        m.arg2 = len;
        wire::send(ch.sock.as_fd(), &m, &[]).map_err(|e| DmaError::Daemon(e.raw_os_error()))?;
        loop {
            let (m, fds) = match wire::recv(ch.sock.as_fd()) {
                Ok(Some(r)) => r,
                Ok(None) => return Err(DmaError::Blocked),
                Err(e) => return Err(DmaError::Daemon(e.raw_os_error())),
            };
            match m.kind {
                wire::REGION => {
                    let fd = fds.into_iter().next().ok_or(DmaError::Daemon(libc::EPROTO))?;
                    let slot = self.regions.get(m.request as usize).ok_or(DmaError::Daemon(libc::EPROTO))?;
                    if slot.get().is_none() {
                        let region = Region::map(fd.as_fd(), m.arg, m.value == 1)?;
                        let _ = slot.set(region);
                    }
                }
                wire::REPLY => {
                    return match m.result() {
                        Ok(wire::CHANGED) => Ok(None),
                        Ok(generation) => Ok(Some(generation as u64)),
                        Err(libc::EFAULT) => Err(DmaError::Fault { iova, write: perm & wire::PERM_W != 0 }),
                        Err(libc::EPERM) => Err(DmaError::Blocked),
                        Err(e) => Err(DmaError::Daemon(e)),
                    };
                }
                _ => return Err(DmaError::Daemon(libc::EPROTO)),
            }
        }
    }
}
