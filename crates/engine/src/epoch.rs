//! Waiting for DMA in flight.
//!
//! DMA through the engine runs inside a critical section (a pinned
//! [`Guard`]); `synchronize` returns only after every critical section that
//! was running when it was called has ended. This is what makes "after
//! unmap returns, no DMA can reach the old pages" true. Memory that readers
//! may still see (page tables an unmap took out) is handed to
//! [`Guard::defer`] and released once they are gone.
//!
//! The scheme is userspace RCU's membarrier flavour, asymmetric on
//! purpose: DMA is frequent and unmap is rare, so readers pay as little as
//! possible and writers pay the rest.
//!
//! - A global epoch counts grace periods. Each thread owns a slot holding
//!   the epoch it read on entering, shifted, with the low bit set while it
//!   is inside. Entering loads the epoch (acquire) and stores the slot
//!   (release) with a compiler fence; leaving clears the low bit with a
//!   release store. No lock, no allocation, no read-modify-write, no full
//!   fence, no system call. Nested pins only count depth.
//! - A writer first unlinks, then advances the epoch (a release
//!   read-modify-write). A reader whose slot shows the new epoch read it,
//!   so it sees everything unlinked before (acquire pairs with release),
//!   and its slot's release store orders its earlier sections before the
//!   writer's read of it. A reader busy with DMA enters again within
//!   nanoseconds, so the writer first waits briefly for every slot to show
//!   the new epoch: then it is done without disturbing any other CPU.
//! - Slots still behind after that (idle threads, or readers stuck in a long
//!   section) are settled by `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED)`,
//!   which runs a full memory barrier on every CPU running one of the
//!   process's threads. After it, a reader either has its slot visible to
//!   the writer, or entered afterwards and can only see the unlinked state.
//!   The writer waits for each slot it then sees inside under an older
//!   epoch to change: the same section cannot show the same value again,
//!   since a new entry reads the new epoch.
//! - Where membarrier cannot be registered (old kernels, seccomp filters),
//!   readers issue a SeqCst fence after their store and writers a SeqCst
//!   fence before their scan: the same Dekker pairing, paid by readers.
//!   The choice is made once, when the first thread pins.
//! - A grace period with no other thread registered (the caller's own slot
//!   aside) needs neither the barrier nor a wait: a thread fences after
//!   claiming its slot, before it first enters, and the writer fences
//!   before looking for claimed slots, so a reader the writer missed sees
//!   what was unlinked. A single-threaded unmap makes no system call.
//!
//! `crossbeam-epoch`, used before, pays a SeqCst fence on every outermost
//! pin (most of the cost of a 64-byte DMA through an IOTLB hit) and has no
//! synchronous grace period (`synchronize` had to drive the epoch by
//! pinning in a loop). `seize` protects by reservation and retirement and
//! has no "wait for every reader inside" either, which unmap needs for
//! memory it does not own (the program's pages). Neither fits, so the few
//! lines of the protocol live here, with a loom model of them below.
//!
//! Deferred work runs after a grace period that began after it was
//! deferred: the next `synchronize` (which an unmap runs anyway, so the
//! grace period costs it no second barrier), or one started without
//! blocking by [`Guard::flush`] or by the drop of a deferring thread's
//! outermost guard once `BACKLOG` items wait; such a drop also runs the work
//! whose readers have left since. It never runs on a reader's path that
//! deferred nothing.
//!
//! A second domain, with its own epoch and slots, serves the lookups of
//! IOASes by ID that take no lock (the context's IOAS index): `Lookup`
//! sections and `synchronize_lookups`, the same protocol kept apart, so
//! that an unmap made inside a lookup still waits for DMA, and a destroy
//! waiting for the lookups never waits for DMA.

use std::cell::Cell;
use std::marker::PhantomData;
use std::sync::OnceLock;
use std::sync::atomic::{Ordering, compiler_fence};

#[cfg(loom)]
use loom::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, fence};
#[cfg(not(loom))]
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, fence};

#[cfg(loom)]
type Mutex<T> = loom::sync::Mutex<T>;
#[cfg(not(loom))]
type Mutex<T> = parking_lot::Mutex<T>;

#[cfg(loom)]
fn lock<T>(m: &Mutex<T>) -> loom::sync::MutexGuard<'_, T> {
    m.lock().unwrap()
}
#[cfg(not(loom))]
fn lock<T>(m: &Mutex<T>) -> parking_lot::MutexGuard<'_, T> {
    m.lock()
}

#[cfg(loom)]
fn pause() {
    loom::thread::yield_now();
}
#[cfg(not(loom))]
fn pause() {
    std::thread::yield_now();
}

/// One thread's place among the readers.
struct Slot {
    /// The epoch its owner read on entering its last critical section,
    /// shifted left by one; the low bit is set while it is inside.
    state: AtomicU64,
    /// Owned by a live thread.
    taken: AtomicBool,
    /// The next slot of the collector's list.
    next: AtomicPtr<Slot>,
}

impl Slot {
    /// Enters a critical section under the current `epoch`; returns the
    /// state stored, for `leave`.
    #[inline(always)]
    fn enter(&self, epoch: &AtomicU64, membarrier: bool) -> u64 {
        // Acquire: a writer that advanced the epoch unlinked before.
        // Release: the sections before this one are over for a writer that
        // reads this state.
        let state = epoch.load(Ordering::Acquire) << 1 | 1;
        self.state.store(state, Ordering::Release);
        if membarrier {
            // The writer's membarrier orders this store before the loads
            // below on the CPU; only the compiler must be kept from moving
            // them above it.
            compiler_fence(Ordering::SeqCst);
        } else {
            fence(Ordering::SeqCst);
        }
        state
    }

    /// Leaves the section `enter` returned `state` for: every access of the
    /// section happens before a writer that reads the cleared bit.
    #[inline(always)]
    fn leave(&self, state: u64) {
        self.state.store(state & !1, Ordering::Release);
    }
}

/// A value alone on its cache lines: the epoch, which every reader loads
/// on entering, shares its line with nothing a reader or writer stores to
/// more often.
#[repr(align(128))]
struct Padded<T>(T);

/// How long a grace period waits for readers to show the new epoch before
/// it interrupts their CPUs instead: a reader in a DMA loop enters again
/// well within it, and it is short beside the barrier's interrupt (about
/// 2 µs in a virtual machine).
#[cfg(not(loom))]
const CATCH_UP: std::time::Duration = std::time::Duration::from_nanos(1000);

/// How long slots behind may stay outside and unchanged before the grace
/// period stops waiting for them to catch up: far longer than a DMA loop
/// spends between two sections.
#[cfg(not(loom))]
const QUIET: std::time::Duration = std::time::Duration::from_nanos(150);

/// Memory an owner takes back once the readers that could see it have
/// left: what page tables retire on unmap, deferred without a box per item.
pub(crate) trait Reclaim: Send + Sync {
    /// Takes back what `token` names (its meaning is the owner's); runs once,
    /// after the grace period.
    fn reclaim(&self, token: [usize; 2]);
}

/// One item of deferred work.
enum Deferred {
    /// Any closure (`Guard::defer`).
    Boxed(Box<dyn FnOnce() + Send>),
    /// An owner's reclaim (`Guard::defer_reclaim`): no allocation.
    Reclaim(std::sync::Arc<dyn Reclaim>, [usize; 2]),
}

impl Deferred {
    fn run(self) {
        match self {
            Deferred::Boxed(f) => f(),
            Deferred::Reclaim(owner, token) => owner.reclaim(token),
        }
    }
}

/// Deferred items past which a guard's drop starts a grace period itself
/// rather than leave it to the next `synchronize` or `flush`.
const BACKLOG: usize = 64;

#[derive(Default)]
struct Garbage {
    /// Deferred since the current grace period began.
    queued: Vec<Deferred>,
    /// Deferred before the current grace period began, waiting for it.
    batch: Vec<Deferred>,
    /// The current grace period: slots (by address) seen inside, with the
    /// number each was inside under.
    waiting_for: Vec<(usize, u64)>,
    /// An empty buffer kept from the last run, so that deferring and
    /// running allocate nothing once the queues have grown.
    recycled: Vec<Deferred>,
}

impl Garbage {
    /// What `Collector::pending` mirrors: `batch` in the high half,
    /// `queued` in the low one.
    fn pending(&self) -> u64 {
        (self.batch.len() as u64) << 32 | self.queued.len() as u64
    }
}

/// The readers of one reclamation domain, and what waits for them.
struct Collector {
    /// Grace periods started: what readers read on entering.
    epoch: Padded<AtomicU64>,
    /// Slots are pushed at the head and never removed (a thread that exits
    /// leaves its slot for the next one), so writers scan without a lock.
    head: AtomicPtr<Slot>,
    /// Readers rely on the writers' membarrier (else on their own fence).
    membarrier: bool,
    garbage: Mutex<Garbage>,
    /// `Garbage::pending`, stored under the lock after every change, so a
    /// grace period or a guard's drop with nothing to run needs no lock.
    pending: AtomicU64,
}

impl Collector {
    fn new(membarrier: bool) -> Self {
        Collector {
            epoch: Padded(AtomicU64::new(0)),
            head: AtomicPtr::new(std::ptr::null_mut()),
            membarrier,
            garbage: Mutex::new(Garbage::default()),
            pending: AtomicU64::new(0),
        }
    }

    fn slots(&self) -> impl Iterator<Item = &Slot> {
        let mut p = self.head.load(Ordering::Acquire);
        std::iter::from_fn(move || {
            // SAFETY: slots are leaked boxes freed only when the collector
            // drops, which the borrow of `self` rules out.
            let slot = unsafe { p.as_ref() }?;
            p = slot.next.load(Ordering::Acquire);
            Some(slot)
        })
    }

    /// A slot for a new thread, reusing one whose thread exited.
    fn claim(&self) -> &Slot {
        for slot in self.slots() {
            if slot.taken.compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed).is_ok() {
                // Pairs with the fence of `others_registered`.
                fence(Ordering::SeqCst);
                return slot;
            }
        }
        let slot = Box::into_raw(Box::new(Slot {
            state: AtomicU64::new(0),
            taken: AtomicBool::new(true),
            next: AtomicPtr::new(std::ptr::null_mut()),
        }));
        let mut head = self.head.load(Ordering::Relaxed);
        loop {
            // SAFETY: `slot` is not published yet; this thread owns it.
            unsafe { &*slot }.next.store(head, Ordering::Relaxed);
            match self.head.compare_exchange_weak(head, slot, Ordering::Release, Ordering::Relaxed) {
                Ok(_) => break,
                Err(h) => head = h,
            }
        }
        // Pairs with the fence of `others_registered`.
        fence(Ordering::SeqCst);
        // SAFETY: published slots live as long as the collector.
        unsafe { &*slot }
    }

    /// Whether a thread other than the owner of `own` (the caller, outside
    /// any section; null for none) holds a slot. Without one no reader can
    /// be inside, nor can one enter and still see what the caller unlinked
    /// before: a thread claims its slot, then fences, before it first
    /// enters; this fence pairs with that one, so either the scan below
    /// sees the claim or the claimer's loads see the unlink. A grace period
    /// then needs neither the barrier nor a wait.
    fn others_registered(&self, own: *const Slot) -> bool {
        fence(Ordering::SeqCst);
        self.slots().any(|s| !std::ptr::eq(s, own) && s.taken.load(Ordering::Acquire))
    }

    /// Gives a slot back (its thread is not inside).
    fn release(&self, slot: &Slot) {
        slot.taken.store(false, Ordering::Release);
    }

    /// Makes every reader either visible as inside, or sure to see what
    /// was unlinked before this call.
    fn barrier(&self) {
        #[cfg(not(loom))]
        BARRIERS.fetch_add(1, Ordering::Relaxed);
        full_barrier(self.membarrier);
    }

    /// Starts a grace period: readers that enter from now on see what was
    /// unlinked before. Returns the new epoch.
    fn advance(&self) -> u64 {
        self.epoch.0.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// The slots inside a critical section now, with their states.
    fn inside(&self) -> Vec<(usize, u64)> {
        self.slots()
            .filter_map(|s| {
                let state = s.state.load(Ordering::Acquire);
                (state & 1 == 1).then_some((s as *const Slot as usize, state))
            })
            .collect()
    }

    /// The state of slot `addr`, from `inside` or `behind`.
    fn state(addr: usize) -> u64 {
        // SAFETY: `addr` came from a scan of the slots, and slots live as
        // long as the collector, which the caller borrows.
        unsafe { &*(addr as *const Slot) }.state.load(Ordering::Acquire)
    }

    /// Whether the reader in slot `addr` has left the section it was inside
    /// with `state`: a new entry reads a newer epoch, as one was started
    /// before `state` was seen, so the same value cannot come back.
    fn left(addr: usize, state: u64) -> bool {
        Self::state(addr) != state
    }

    /// Other threads' slots that have not shown epoch `now` yet.
    fn behind(&self, own: *const Slot, now: u64) -> Vec<(usize, u64)> {
        self.slots()
            .filter(|s| !std::ptr::eq(*s, own) && s.taken.load(Ordering::Acquire))
            .filter_map(|s| {
                let state = s.state.load(Ordering::Acquire);
                (state >> 1 < now).then_some((s as *const Slot as usize, state))
            })
            .collect()
    }

    /// The slots of `behind` still behind epoch `now` once waiting for
    /// them stopped paying: after `CATCH_UP`, or as soon as none of them
    /// has been inside or moved for `QUIET` (idle threads never catch up).
    #[cfg(not(loom))]
    fn catch_up(mut behind: Vec<(usize, u64)>, now: u64) -> Vec<(usize, u64)> {
        let since = std::time::Instant::now();
        let mut stirred = since;
        loop {
            let mut active = false;
            behind.retain_mut(|(addr, seen)| {
                let state = Self::state(*addr);
                active |= state & 1 == 1 || state != *seen;
                *seen = state;
                state >> 1 < now
            });
            if behind.is_empty() {
                return behind;
            }
            let t = std::time::Instant::now();
            if active {
                stirred = t;
            }
            if t - since >= CATCH_UP || t - stirred >= QUIET {
                return behind;
            }
            std::hint::spin_loop();
        }
    }

    /// Waits for the readers of a grace period started at epoch `now`:
    /// first for busy ones to enter again, which shows they read `now`;
    /// then, for any still behind, with the barrier and a wait for each one
    /// it shows inside.
    fn wait_for_readers(&self, own: *const Slot, now: u64) {
        let behind = self.behind(own, now);
        #[cfg(not(loom))]
        let behind = Self::catch_up(behind, now);
        if behind.is_empty() {
            return;
        }
        self.barrier();
        for (addr, _) in behind {
            let state = Self::state(addr);
            if state & 1 == 0 || state >> 1 >= now {
                continue;
            }
            let mut spins = 0u32;
            while !Self::left(addr, state) {
                spins += 1;
                if spins > 64 {
                    pause();
                } else {
                    std::hint::spin_loop();
                }
            }
        }
    }

    /// Waits until every critical section running when it was called has
    /// ended, then runs everything deferred before it was called. `own` is
    /// the caller's slot (null for none); the caller is outside any section.
    fn synchronize(&self, own: *const Slot) {
        // Nothing deferred (work this thread deferred is seen: its own
        // store), and no reader to wait for: no lock, no barrier. Work
        // another thread is deferring meanwhile is not ordered before this
        // call, so it is left for the next grace period, as it would be
        // had it come just after.
        if self.pending.load(Ordering::Acquire) == 0 && !self.others_registered(own) {
            return;
        }
        let ready = {
            let mut g = lock(&self.garbage);
            g.waiting_for.clear();
            let mut ready = std::mem::take(&mut g.recycled);
            ready.append(&mut g.batch);
            ready.append(&mut g.queued);
            self.pending.store(0, Ordering::Release);
            ready
        };
        if self.others_registered(own) {
            let now = self.advance();
            self.wait_for_readers(own, now);
        }
        self.run(ready);
    }

    /// Runs `ready` (deferred work past its grace period) outside the lock,
    /// and keeps its buffer for the next run.
    fn run(&self, mut ready: Vec<Deferred>) {
        if ready.capacity() == 0 {
            return;
        }
        ready.drain(..).for_each(Deferred::run);
        let mut g = lock(&self.garbage);
        if g.recycled.capacity() < ready.capacity() {
            g.recycled = ready;
        }
    }

    fn defer(&self, f: Deferred) {
        let mut g = lock(&self.garbage);
        if g.queued.capacity() == 0 {
            g.queued = std::mem::take(&mut g.recycled);
        }
        g.queued.push(f);
        self.pending.store(g.pending(), Ordering::Release);
    }

    /// Runs deferred work whose grace period is over, and starts one (a
    /// barrier) for work deferred since if `start` or if that work piles up;
    /// never waits for a reader.
    fn try_collect(&self, start: bool) {
        if !start {
            let pending = self.pending.load(Ordering::Acquire);
            // Nothing waits for readers, and too little is queued to start.
            if pending >> 32 == 0 && (pending as u32 as usize) < BACKLOG {
                return;
            }
        }
        let mut ready = Vec::new();
        {
            let mut g = lock(&self.garbage);
            if !g.batch.is_empty() {
                g.waiting_for.retain(|&(addr, state)| !Self::left(addr, state));
                if g.waiting_for.is_empty() {
                    ready = std::mem::take(&mut g.batch);
                }
            }
            if g.batch.is_empty() && !g.queued.is_empty() && (start || g.queued.len() >= BACKLOG) {
                g.batch = std::mem::take(&mut g.queued);
                // So that a reader seen inside shows a new state once it left,
                // even if it enters again before it is next looked at.
                self.advance();
                self.barrier();
                g.waiting_for = self.inside();
                if g.waiting_for.is_empty() {
                    ready.append(&mut g.batch);
                }
            }
            self.pending.store(g.pending(), Ordering::Release);
        }
        self.run(ready);
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        let mut p = self.head.load(Ordering::Relaxed);
        while !p.is_null() {
            // SAFETY: the collector owns every slot, and nothing borrows it.
            let slot = unsafe { Box::from_raw(p) };
            p = slot.next.load(Ordering::Relaxed);
        }
        let mut left = {
            let mut g = lock(&self.garbage);
            let mut left = std::mem::take(&mut g.batch);
            left.append(&mut g.queued);
            left
        };
        left.drain(..).for_each(Deferred::run);
    }
}

/// The process's collector for DMA; membarrier is registered when it is
/// made.
fn global() -> &'static Collector {
    static GLOBAL: OnceLock<Collector> = OnceLock::new();
    GLOBAL.get_or_init(|| {
        #[cfg(not(loom))]
        let membarrier = {
            use rustix::thread::{MembarrierCommand, membarrier, membarrier_query};
            membarrier_query().contains_command(MembarrierCommand::PrivateExpedited)
                && membarrier(MembarrierCommand::RegisterPrivateExpedited).is_ok()
        };
        #[cfg(loom)]
        let membarrier = false;
        #[cfg(not(loom))]
        // SAFETY: three handlers with the C signature pthread_atfork
        // expects, living as long as the process.
        unsafe {
            libc::pthread_atfork(Some(fork::prepare), Some(fork::parent), Some(fork::child))
        };
        Collector::new(membarrier)
    })
}

/// A full memory barrier on every CPU running one of the process's
/// threads when `membarrier` (registered), else on this one.
fn full_barrier(membarrier: bool) {
    #[cfg(not(loom))]
    if membarrier {
        expedited();
        return;
    }
    #[cfg(loom)]
    let _ = membarrier; // loom's model has only the fence
    fence(Ordering::SeqCst);
}

/// `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED)`, registered.
#[cfg(not(loom))]
fn expedited() {
    use rustix::thread::{MembarrierCommand, membarrier};
    // Registration is per process and kept across fork; should it be
    // missing anyway, register again: it cannot fail where it once
    // succeeded, and the other side does not fence on its own.
    if membarrier(MembarrierCommand::PrivateExpedited).is_err() {
        membarrier(MembarrierCommand::RegisterPrivateExpedited)
            .and_then(|()| membarrier(MembarrierCommand::PrivateExpedited))
            .expect("membarrier worked when the epoch started");
    }
}

/// Whether the process's fast sides may leave their fences to
/// [`heavy_barrier`]: membarrier is registered (decided once, with the
/// DMA collector). Once true, always true. Other protocols with a frequent
/// side and a rare one (a lock's release and its sleepers) use the pair
/// as the epoch's readers and writers do.
pub(crate) fn asymmetric() -> bool {
    global().membarrier
}

/// A full memory barrier on every CPU running one of the process's threads
/// (where [`asymmetric`]), not counted as a grace period's.
pub(crate) fn heavy_barrier() {
    full_barrier(global().membarrier);
}

/// The collector of lookups that take no lock (see [`Lookup`]), apart from
/// DMA's: an unmap made inside a lookup still waits for DMA, and waiting
/// for lookups never waits for DMA.
fn lookups() -> &'static Collector {
    static LOOKUPS: OnceLock<Collector> = OnceLock::new();
    LOOKUPS.get_or_init(|| Collector::new(global().membarrier))
}

/// A fork keeps only the forking thread. Every other thread's slot in the
/// child stays as it was (taken, maybe inside) and would hold up the
/// child's grace periods for ever, and a lock another thread held would
/// stay held; so the fork waits for the collector's lock, and the child
/// gives back every slot but its own.
#[cfg(not(loom))]
mod fork {
    use super::{LOCAL, LOOKUP_LOCAL, Ordering, global, lookups};

    pub(super) extern "C" fn prepare() {
        std::mem::forget(global().garbage.lock());
        std::mem::forget(lookups().garbage.lock());
    }

    pub(super) extern "C" fn parent() {
        // SAFETY: `prepare` locked them on this thread and forgot the guards.
        unsafe {
            lookups().garbage.force_unlock();
            global().garbage.force_unlock();
        }
    }

    pub(super) extern "C" fn child() {
        let own = [LOCAL.with(|l| l.slot.get()), LOOKUP_LOCAL.with(|l| l.slot.get())];
        for (c, own) in [global(), lookups()].into_iter().zip(own) {
            // SAFETY: as in `parent`: the child's copy of the same lock.
            unsafe { c.garbage.force_unlock() };
            let outside = c.epoch.0.load(Ordering::Relaxed) << 1;
            for slot in c.slots().filter(|s| !std::ptr::eq(*s, own)) {
                slot.state.store(outside, Ordering::Relaxed);
                slot.taken.store(false, Ordering::Release);
            }
        }
    }
}

/// This thread's reader state in one collector; const-initialised and
/// without a destructor, so reaching it costs a TLS offset and nothing else.
struct Local {
    slot: Cell<*const Slot>,
    depth: Cell<u32>,
    /// The state the slot was given on entering the outermost section.
    state: Cell<u64>,
    /// The collector's epoch.
    epoch: Cell<*const AtomicU64>,
    membarrier: Cell<bool>,
    /// Something was deferred since the outermost pin.
    deferred: Cell<bool>,
}

/// Gives the slots back when the thread exits.
struct Owner;

impl Drop for Owner {
    fn drop(&mut self) {
        for (local, c) in [(&LOCAL, global as fn() -> _), (&LOOKUP_LOCAL, lookups)] {
            let _ = local.try_with(|l| {
                let slot = l.slot.replace(std::ptr::null());
                // A guard forgotten on this thread keeps its slot inside for
                // ever, so it is not handed to another thread.
                if !slot.is_null() && l.depth.get() == 0 {
                    // SAFETY: slots of a collector live for ever.
                    c().release(unsafe { &*slot });
                }
            });
        }
    }
}

impl Local {
    const fn new() -> Local {
        Local {
            slot: Cell::new(std::ptr::null()),
            depth: Cell::new(0),
            state: Cell::new(0),
            epoch: Cell::new(std::ptr::null()),
            membarrier: Cell::new(false),
            deferred: Cell::new(false),
        }
    }

    /// Enters a section of `collector` (or nests in the one this thread is
    /// in).
    #[inline(always)]
    fn enter(&self, collector: fn() -> &'static Collector) {
        let depth = self.depth.get();
        if depth == 0 {
            let mut slot = self.slot.get();
            if slot.is_null() {
                slot = register(self, collector());
            }
            // SAFETY: slots and the epoch of a collector live for ever
            // (`register` set both).
            let state = unsafe { &*slot }.enter(unsafe { &*self.epoch.get() }, self.membarrier.get());
            self.state.set(state);
        }
        self.depth.set(depth + 1);
    }

    /// Leaves the section `enter` entered.
    #[inline(always)]
    fn leave(&self, collector: fn() -> &'static Collector) {
        let depth = self.depth.get() - 1;
        self.depth.set(depth);
        if depth == 0 {
            // SAFETY: set by the `enter` this pairs with; slots of a
            // collector live for ever.
            unsafe { &*self.slot.get() }.leave(self.state.get());
            if self.deferred.replace(false) {
                collector().try_collect(false);
            }
        }
    }
}

thread_local! {
    static LOCAL: Local = const { Local::new() };
    static LOOKUP_LOCAL: Local = const { Local::new() };
    static OWNER: Owner = const { Owner };
}

#[cold]
#[inline(never)]
fn register(l: &Local, c: &'static Collector) -> *const Slot {
    let slot = c.claim();
    l.epoch.set(&c.epoch.0);
    l.membarrier.set(c.membarrier);
    l.slot.set(slot);
    // A thread already past its destructors (pinning from another TLS
    // destructor) keeps its slot: leaked, never inside, so harmless.
    let _ = OWNER.try_with(|_| ());
    slot
}

/// A pinned critical section: while it lives, nothing unlinked after it
/// began is freed or reused. Not `Send`: it is this thread's.
#[must_use = "the section ends when the guard drops"]
pub struct Guard {
    _not_send: PhantomData<*mut ()>,
}

impl std::fmt::Debug for Guard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Guard")
    }
}

/// Enters a critical section (or nests in the one this thread is in).
#[inline]
pub fn pin() -> Guard {
    LOCAL.with(|l| l.enter(global));
    Guard { _not_send: PhantomData }
}

impl Drop for Guard {
    #[inline]
    fn drop(&mut self) {
        LOCAL.with(|l| l.leave(global));
    }
}

impl Guard {
    /// Runs `f` once every reader that could see what this thread unlinked
    /// before the call has left its critical section.
    pub fn defer(&self, f: impl FnOnce() + Send + 'static) {
        global().defer(Deferred::Boxed(Box::new(f)));
        LOCAL.with(|l| l.deferred.set(true));
    }

    /// `defer` of `owner.reclaim(token)`, without allocating for it.
    pub(crate) fn defer_reclaim(&self, owner: std::sync::Arc<dyn Reclaim>, token: [usize; 2]) {
        global().defer(Deferred::Reclaim(owner, token));
        LOCAL.with(|l| l.deferred.set(true));
    }

    /// Runs deferred work whose readers have left, and starts waiting for
    /// those of work deferred since; never blocks.
    pub fn flush(&self) {
        global().try_collect(true);
    }
}

/// Barriers grace periods have issued so far (`membarrier`, or the fence
/// where it is missing): what the benchmarks report of how often readers
/// did not catch up on their own.
#[cfg(not(loom))]
static BARRIERS: AtomicU64 = AtomicU64::new(0);

/// How many barriers grace periods have issued in this process.
#[cfg(not(loom))]
pub fn barriers() -> u64 {
    BARRIERS.load(Ordering::Relaxed)
}

/// Whether this thread is inside a critical section, where `synchronize`
/// would wait for itself.
pub(crate) fn pinned() -> bool {
    LOCAL.with(|l| l.depth.get() != 0)
}

/// Waits until every DMA (every critical section) that was running when it
/// was called has finished, and runs the work deferred before it; spins,
/// then yields. Called inside a critical section, it would wait for itself.
pub(crate) fn synchronize() {
    let own = LOCAL.with(|l| {
        assert_eq!(l.depth.get(), 0, "epoch::synchronize inside a critical section");
        l.slot.get()
    });
    global().synchronize(own);
    synchronize_external();
}

/// A section of lookups by ID that take no lock (`Context::with_ioas`): an
/// object found inside one is not let go before it ends. A domain apart
/// from DMA's, so that an unmap made inside one can still wait for DMA.
/// Not `Send`: it is this thread's.
#[must_use = "the section ends when it drops"]
pub(crate) struct Lookup {
    _not_send: PhantomData<*mut ()>,
}

/// Enters a lookup section (or nests in the one this thread is in).
#[inline]
pub(crate) fn pin_lookup() -> Lookup {
    LOOKUP_LOCAL.with(|l| l.enter(lookups));
    Lookup { _not_send: PhantomData }
}

impl Drop for Lookup {
    #[inline]
    fn drop(&mut self) {
        LOOKUP_LOCAL.with(|l| l.leave(lookups));
    }
}

/// Waits until every lookup section running when it was called has ended.
/// Called inside one, it would wait for itself.
pub(crate) fn synchronize_lookups() {
    let own = LOOKUP_LOCAL.with(|l| {
        assert_eq!(l.depth.get(), 0, "epoch::synchronize_lookups inside a lookup");
        l.slot.get()
    });
    lookups().synchronize(own);
}

/// Runs `f` once the lookup sections running now have ended, without
/// waiting for them: a grace period starts here, and `f` runs at its end,
/// or at the next `synchronize_lookups`.
pub(crate) fn defer_after_lookups(f: impl FnOnce() + Send + 'static) {
    let c = lookups();
    c.defer(Deferred::Boxed(Box::new(f)));
    c.try_collect(true);
    // This thread's next lookup to leave runs `f` if its readers are gone.
    LOOKUP_LOCAL.with(|l| l.deferred.set(true));
}

/// Readers outside this process: device back ends in other processes that
/// translate from tables this process publishes to them (see
/// `ioasid_serve::remote`). Every grace period also waits for them, so
/// unmap, detach and replace keep their guarantee across processes.
pub trait External: Send + Sync {
    /// Waits until none of these readers can still use a translation that
    /// changed before the call (the readers decide how: a back end checks
    /// whether its device's translation changed, and waits only then).
    fn synchronize(&self);
}

#[cfg(not(loom))]
static EXTERNAL: parking_lot::RwLock<Vec<std::sync::Weak<dyn External>>> = parking_lot::RwLock::new(Vec::new());
#[cfg(not(loom))]
static EXTERNALS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Makes every later grace period wait for `readers` too, for as long as
/// they live.
#[cfg(not(loom))]
pub fn add_external(readers: std::sync::Weak<dyn External>) {
    let mut list = EXTERNAL.write();
    list.retain(|w| w.strong_count() > 0);
    list.push(readers);
    EXTERNALS.store(list.len(), Ordering::Release);
}

/// Waits for the readers outside this process only: for changes that need
/// no in-process grace period (a cache invalidation, a cleared dirty bit)
/// but must not be missed by a back end's cached translation.
#[cfg(not(loom))]
pub fn synchronize_external() {
    if EXTERNALS.load(Ordering::Acquire) == 0 {
        return;
    }
    let list: Vec<_> = EXTERNAL.read().iter().filter_map(std::sync::Weak::upgrade).collect();
    for readers in list {
        readers.synchronize();
    }
}

/// No readers outside the process in the model.
#[cfg(loom)]
pub fn synchronize_external() {}

/// Whether readers outside the process may be following this process's
/// translations now (some were added and may still live).
#[cfg(not(loom))]
pub(crate) fn has_external() -> bool {
    EXTERNALS.load(Ordering::Acquire) != 0
}

/// None in the model.
#[cfg(loom)]
pub(crate) fn has_external() -> bool {
    false
}

/// A shared value readers follow inside a pinned section without touching
/// its reference count, and writers replace, waiting for those readers
/// before the old value can go: RCU's publish and retire. It is how a
/// device's DMA finds its page table with one plain load (an `ArcSwap`
/// load pays a read-modify-write and a full fence on its fast path).
pub struct Rcu<T> {
    ptr: std::sync::atomic::AtomicPtr<T>,
}

impl<T> Rcu<T> {
    /// Holds `value` (`None`: nothing).
    pub fn new(value: Option<std::sync::Arc<T>>) -> Self {
        Rcu { ptr: std::sync::atomic::AtomicPtr::new(into_raw(value)) }
    }

    /// The value now, for as long as `guard`'s section lasts.
    #[inline]
    pub fn load<'a>(&'a self, _guard: &'a Guard) -> Option<&'a T> {
        // SAFETY: the pointer came from `Arc::into_raw` (or is null), and a
        // writer that unpublished it waits for this section (`replace`)
        // before letting its reference go.
        unsafe { self.ptr.load(Ordering::Acquire).as_ref() }
    }

    /// A counted reference to the value now, to keep past a section.
    pub fn load_full(&self) -> Option<std::sync::Arc<T>> {
        let _guard = pin();
        let p = self.ptr.load(Ordering::Acquire);
        if p.is_null() {
            return None;
        }
        // SAFETY: `p` is live for this section (as in `load`), so its count
        // is at least one while it is raised for the new reference.
        unsafe {
            std::sync::Arc::increment_strong_count(p);
            Some(std::sync::Arc::from_raw(p))
        }
    }

    /// Publishes `value` and waits until no reader can still see the old
    /// one, which it returns. Called outside any section.
    pub fn replace(&self, value: Option<std::sync::Arc<T>>) -> Option<std::sync::Arc<T>> {
        let old = self.ptr.swap(into_raw(value), Ordering::AcqRel);
        synchronize();
        // SAFETY: `old` came from `Arc::into_raw`, and its readers are gone.
        (!old.is_null()).then(|| unsafe { std::sync::Arc::from_raw(old) })
    }
}

impl<T: Send + Sync + 'static> Rcu<T> {
    /// Publishes `value` without waiting: the old one is dropped once the
    /// readers that may still see it have left. For writers that must not
    /// wait, such as one inside a section of its own.
    pub fn publish(&self, value: Option<std::sync::Arc<T>>, guard: &Guard) {
        let old = self.ptr.swap(into_raw(value), Ordering::AcqRel);
        if !old.is_null() {
            // SAFETY: `old` came from `Arc::into_raw`; this reference is the
            // one `Rcu` held, and readers only borrow it inside sections the
            // deferred drop waits for.
            let old = unsafe { std::sync::Arc::from_raw(old) };
            guard.defer(move || drop(old));
        }
    }
}

fn into_raw<T>(value: Option<std::sync::Arc<T>>) -> *mut T {
    value.map_or(std::ptr::null_mut(), |v| std::sync::Arc::into_raw(v).cast_mut())
}

impl<T> Drop for Rcu<T> {
    fn drop(&mut self) {
        let p = *self.ptr.get_mut();
        if !p.is_null() {
            // SAFETY: the reference `Rcu` held; nobody can load it any more
            // (`&mut self`), and loads borrowed from `self`.
            drop(unsafe { std::sync::Arc::from_raw(p) });
        }
    }
}

// SAFETY: it hands out `&T` and `Arc<T>` across threads, as `Arc<T>` does.
unsafe impl<T: Send + Sync> Send for Rcu<T> {}
// SAFETY: as above.
unsafe impl<T: Send + Sync> Sync for Rcu<T> {}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, AtomicUsize};
    use std::time::Duration;

    #[test]
    fn synchronize_waits_for_a_reader() {
        let state = Arc::new(AtomicU32::new(0));
        let s = state.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            let _g = pin();
            tx.send(()).unwrap();
            std::thread::sleep(Duration::from_millis(50));
            s.store(1, Ordering::Release);
        });
        rx.recv().unwrap();
        synchronize();
        assert_eq!(state.load(Ordering::Acquire), 1, "synchronize returned while a reader was inside");
        reader.join().unwrap();
    }

    #[test]
    fn nested_pins_keep_the_section_until_the_outermost_drops() {
        let outer = pin();
        let ran = Arc::new(AtomicU32::new(0));
        {
            let inner = pin();
            let r = ran.clone();
            inner.defer(move || _ = r.fetch_add(1, Ordering::Relaxed));
        }
        for _ in 0..8 {
            pin().flush();
        }
        assert_eq!(ran.load(Ordering::Relaxed), 0, "deferred work ran inside the section that deferred it");
        drop(outer);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while ran.load(Ordering::Relaxed) == 0 && std::time::Instant::now() < deadline {
            pin().flush();
            std::thread::yield_now();
        }
        assert_eq!(ran.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn an_exited_thread_gives_its_slot_back() {
        let count = || global().slots().count();
        std::thread::spawn(|| drop(pin())).join().unwrap();
        let before = count();
        for _ in 0..16 {
            std::thread::spawn(|| drop(pin())).join().unwrap();
        }
        // Other tests' threads may hold slots meanwhile, never 16 more.
        assert!(count() < before + 16, "slots of exited threads are reused");
        // An exited thread is never waited for.
        synchronize();
    }

    /// The protocol on a collector of its own, in both reader flavours: a
    /// writer unlinks a value, waits, and poisons it; readers that loaded
    /// it inside a section must never see the poison. With `churn` each
    /// reader claims its slot for one section and gives it back, so the
    /// writer (which holds a slot of its own) often finds no other thread
    /// registered and skips the barrier while readers are claiming.
    fn stress(membarrier: bool, churn: bool) {
        let c = Arc::new(Collector::new(membarrier));
        if membarrier {
            use rustix::thread::{MembarrierCommand, membarrier};
            if membarrier(MembarrierCommand::RegisterPrivateExpedited).is_err() {
                return;
            }
        }
        let cells: Arc<[AtomicUsize; 2]> = Arc::new([AtomicUsize::new(1), AtomicUsize::new(1)]);
        let current = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let sections = Arc::new(AtomicUsize::new(0));
        let readers: Vec<_> = (0..2)
            .map(|_| {
                let (c, cells, current, stop) = (c.clone(), cells.clone(), current.clone(), stop.clone());
                let sections = sections.clone();
                std::thread::spawn(move || {
                    let mut slot = c.claim();
                    let mut bad = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        if churn {
                            c.release(slot);
                            slot = c.claim();
                        }
                        let state = slot.enter(&c.epoch.0, membarrier);
                        let i = current.load(Ordering::Acquire);
                        for _ in 0..4 {
                            if cells[i].load(Ordering::Relaxed) == 0 {
                                bad += 1;
                            }
                        }
                        slot.leave(state);
                        sections.fetch_add(1, Ordering::Relaxed);
                    }
                    c.release(slot);
                    bad
                })
            })
            .collect();
        let own = c.claim();
        // Until the readers have been at it a while, however fast rounds
        // go (a skipped barrier makes them very fast).
        let mut round = 0;
        while round < 20_000 || (sections.load(Ordering::Relaxed) < 200_000 && round < 2_000_000) {
            round += 1;
            let old = round % 2;
            cells[1 - old].store(1, Ordering::Relaxed);
            current.store(1 - old, Ordering::Release);
            c.synchronize(own);
            cells[old].store(0, Ordering::Relaxed);
        }
        stop.store(true, Ordering::Relaxed);
        let bad: u64 = readers.into_iter().map(|r| r.join().unwrap()).sum();
        assert_eq!(bad, 0, "a reader saw a value poisoned after synchronize");
    }

    #[test]
    fn readers_never_see_memory_released_after_synchronize_with_membarrier() {
        stress(true, false);
    }

    #[test]
    fn readers_never_see_memory_released_after_synchronize_with_fences() {
        stress(false, false);
    }

    #[test]
    fn readers_claiming_slots_never_see_memory_released_after_a_skipped_barrier() {
        stress(true, true);
        stress(false, true);
    }
}

/// A model of the protocol: membarrier is modelled by the SeqCst fence on
/// both sides (it runs one on every thread running at that moment). Run
/// with `RUSTFLAGS="--cfg loom" cargo test -p ioasid-engine --lib --release epoch::loom`.
#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;
    use loom::sync::Arc;
    use loom::sync::atomic::AtomicUsize;

    /// 1: the old value, live; 2: the new one; 0: released.
    type Cells = Arc<[AtomicUsize; 2]>;

    /// A reader that claims a slot, reads the current cell inside a
    /// section (releasing its slot after, when `release`), and checks it
    /// never saw a released value.
    fn reader(
        c: &Arc<Collector>,
        cells: &Cells,
        current: &Arc<AtomicUsize>,
        release: bool,
    ) -> loom::thread::JoinHandle<()> {
        let (c, cells, current) = (c.clone(), cells.clone(), current.clone());
        loom::thread::spawn(move || {
            let slot = c.claim();
            let state = slot.enter(&c.epoch.0, false);
            let i = current.load(Ordering::Acquire);
            let seen = cells[i].load(Ordering::Relaxed);
            slot.leave(state);
            if release {
                c.release(slot);
            }
            assert_ne!(seen, 0, "read a released value");
        })
    }

    /// A reader that loaded the old value never sees it released, whether
    /// the writer waits (`synchronize`) or defers (`try_collect`).
    fn model(defer: bool) {
        loom::model(move || {
            let c = Arc::new(Collector::new(false));
            let cells: Cells = Arc::new([AtomicUsize::new(1), AtomicUsize::new(1)]);
            let current = Arc::new(AtomicUsize::new(0));
            let reader = reader(&c, &cells, &current, false);
            current.store(1, Ordering::Release);
            if defer {
                let cells = cells.clone();
                c.defer(Deferred::Boxed(Box::new(move || cells[0].store(0, Ordering::Relaxed))));
                c.try_collect(true);
                c.try_collect(true);
            } else {
                c.synchronize(std::ptr::null());
                cells[0].store(0, Ordering::Relaxed);
            }
            reader.join().unwrap();
        });
    }

    #[test]
    fn synchronize_waits_for_readers_inside() {
        model(false);
    }

    /// A writer that sees no other thread registered skips the barrier and
    /// the wait: a reader claiming its slot meanwhile must still never see
    /// the released value.
    #[test]
    fn synchronize_without_other_readers_skips_safely() {
        loom::model(|| {
            let c = Arc::new(Collector::new(false));
            let own = c.claim() as *const Slot;
            let cells: Cells = Arc::new([AtomicUsize::new(1), AtomicUsize::new(1)]);
            let current = Arc::new(AtomicUsize::new(0));
            // The model's readers fence on entering (membarrier is not
            // modelled), so it checks the writer's side of the pairing; a
            // membarrier reader's side is the fence in `claim`, which the
            // stress tests run.
            let reader = reader(&c, &cells, &current, true);
            current.store(1, Ordering::Release);
            c.synchronize(own);
            cells[0].store(0, Ordering::Relaxed);
            reader.join().unwrap();
        });
    }

    #[test]
    fn deferred_work_waits_for_readers_inside() {
        model(true);
    }

    /// The grace period's first way out, with a reader that does not fence
    /// (as under membarrier, which loom cannot model): once its slot shows
    /// the new epoch, every section of it either ended or sees the unlink.
    #[test]
    fn a_reader_showing_the_new_epoch_sees_what_was_unlinked() {
        loom::model(|| {
            let c = Arc::new(Collector::new(false));
            let cells: Cells = Arc::new([AtomicUsize::new(1), AtomicUsize::new(1)]);
            let current = Arc::new(AtomicUsize::new(0));
            let done = Arc::new(AtomicBool::new(false));
            let slot = c.claim() as *const Slot as usize;
            let reader = {
                let (c, cells, current, done) = (c.clone(), cells.clone(), current.clone(), done.clone());
                loom::thread::spawn(move || {
                    // SAFETY: claimed above; slots live as long as `c`.
                    let slot = unsafe { &*(slot as *const Slot) };
                    for _ in 0..2 {
                        let state = slot.enter(&c.epoch.0, true);
                        let i = current.load(Ordering::Acquire);
                        let seen = cells[i].load(Ordering::Relaxed);
                        slot.leave(state);
                        assert_ne!(seen, 0, "read a released value");
                    }
                    done.store(true, Ordering::Release);
                })
            };
            current.store(1, Ordering::Release);
            let now = c.advance();
            while Collector::state(slot) >> 1 < now && !done.load(Ordering::Acquire) {
                loom::thread::yield_now();
            }
            cells[0].store(0, Ordering::Relaxed);
            reader.join().unwrap();
        });
    }

    /// Work another thread deferred, run by this thread's grace period
    /// (whose lock-free start may see nothing pending, or the work), still
    /// waits for the readers that could see what it frees.
    #[test]
    fn work_deferred_by_another_thread_waits_for_readers() {
        let mut builder = loom::model::Builder::new();
        builder.preemption_bound = Some(3);
        builder.check(|| {
            let c = Arc::new(Collector::new(false));
            let cells: Cells = Arc::new([AtomicUsize::new(1), AtomicUsize::new(1)]);
            let current = Arc::new(AtomicUsize::new(0));
            let reader = reader(&c, &cells, &current, false);
            let unlinker = {
                let (c, cells, current) = (c.clone(), cells.clone(), current.clone());
                loom::thread::spawn(move || {
                    current.store(1, Ordering::Release);
                    c.defer(Deferred::Boxed(Box::new(move || cells[0].store(0, Ordering::Relaxed))));
                })
            };
            c.synchronize(std::ptr::null());
            unlinker.join().unwrap();
            c.synchronize(std::ptr::null());
            reader.join().unwrap();
        });
    }
}
