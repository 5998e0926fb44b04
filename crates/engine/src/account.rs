//! Locked-memory accounting of pinned pages, as Linux's iommufd does it.
//!
//! Pages are charged against `RLIMIT_MEMLOCK` when they are pinned (when they
//! first enter a page table) and uncharged when the last user unpins them.
//! The counter is either the user's (default, shared by every context of the
//! uid in this process) or the process's (`IOMMU_OPTION_RLIMIT_MODE` = 1, the
//! mode VFIO type1 uses). Callers holding `CAP_IPC_LOCK` are not charged.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Once};

use parking_lot::Mutex;
use rustix::thread::{CapabilitySet, CapabilitySets};

use crate::error::{Error, Result};
use crate::iova::PAGE_SIZE;

/// Whose locked-memory counter pinned pages are charged to
/// (`IOMMU_OPTION_RLIMIT_MODE`), read back by
/// [`Context::account_mode`](crate::Context::account_mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccountMode {
    /// Charged to the user (`user->locked_vm`).
    User,
    /// Charged to the process (`mm->locked_vm`).
    Process,
}

/// Where pinned pages of one context are charged, and against which limit.
#[derive(Debug, Clone)]
pub(crate) struct Accounting {
    counter: Option<Arc<AtomicU64>>,
    limit: Limit,
    /// The process the pages are charged to (`None`: this one), with the
    /// mode that chose the counter; `None` for private or no accounting,
    /// which no process owns.
    owner: Option<(AccountMode, Option<i32>)>,
    /// That process's pinned pages (`mm->pinned_vm`), which Linux counts in
    /// both modes.
    pinned: Option<Arc<AtomicU64>>,
}

/// The most pages a context may have charged at once; a pin past it fails
/// with `NoMemory` (ENOMEM), as Linux's `RLIMIT_MEMLOCK` check does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// `RLIMIT_MEMLOCK` of the charged process, read at each pin.
    Rlimit,
    /// A fixed number of pages (tests, and the selftests' temporary limit).
    Pages(u64),
}

type Counters<K> = LazyLock<Mutex<HashMap<K, Arc<AtomicU64>>>>;

static USER_COUNTERS: Counters<u32> = LazyLock::new(|| Mutex::new(HashMap::new()));
/// Per process: `mm->locked_vm` (process mode) and `mm->pinned_vm`. Other
/// processes are forked children whose ioctls this process carries out.
static PROCESS_LOCKED: Counters<i32> = LazyLock::new(|| Mutex::new(HashMap::new()));
static PROCESS_PINNED: Counters<i32> = LazyLock::new(|| Mutex::new(HashMap::new()));

fn counter<K: std::hash::Hash + Eq>(map: &Counters<K>, key: K) -> Arc<AtomicU64> {
    map.lock().entry(key).or_default().clone()
}

fn pid_key(pid: Option<i32>) -> i32 {
    pid.unwrap_or_else(|| rustix::process::getpid().as_raw_nonzero().get())
}

/// The effective capability set of process `pid` (`CapEff`), empty when
/// it cannot be read.
pub fn capabilities_of(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find_map(|l| u64::from_str_radix(l.strip_prefix("CapEff:")?.trim(), 16).ok()))
        .unwrap_or(0)
}

/// The real user ID of process `pid` (`None`: this one).
pub fn uid_of(pid: Option<i32>) -> u32 {
    let own = || rustix::process::getuid().as_raw();
    let Some(pid) = pid else { return own() };
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("Uid:")?.split_whitespace().next()?.parse().ok()))
        .unwrap_or_else(own)
}

impl Accounting {
    /// The same, for process `pid` (`None`: this one).
    pub fn of_process(mode: AccountMode, exempt: bool, limit: Limit, pid: Option<i32>) -> Self {
        if exempt {
            return Accounting { counter: None, limit, owner: None, pinned: None };
        }
        let locked = match mode {
            AccountMode::User => counter(&USER_COUNTERS, uid_of(pid)),
            AccountMode::Process => counter(&PROCESS_LOCKED, pid_key(pid)),
        };
        Accounting {
            counter: Some(locked),
            limit,
            owner: Some((mode, pid)),
            pinned: Some(counter(&PROCESS_PINNED, pid_key(pid))),
        }
    }

    /// Whether `other` charges the same counters against the same limit.
    pub(crate) fn same_as(&self, other: &Accounting) -> bool {
        let same = |a: &Option<Arc<AtomicU64>>, b: &Option<Arc<AtomicU64>>| match (a, b) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        };
        same(&self.counter, &other.counter)
            && same(&self.pinned, &other.pinned)
            && self.limit == other.limit
            && self.owner == other.owner
    }

    /// A private counter, for tests that must not share the process's.
    pub fn isolated(limit: Limit) -> Self {
        Accounting { counter: Some(Arc::new(AtomicU64::new(0))), limit, owner: None, pinned: None }
    }

    pub fn none() -> Self {
        Accounting { counter: None, limit: Limit::Rlimit, owner: None, pinned: None }
    }

    /// This accounting moved to process `pid` (`None`: this one), as
    /// `IOMMU_IOAS_CHANGE_PROCESS` moves it; `None` when the charges stay
    /// where they are (no accounting, a private counter, or the same process).
    pub fn moved_to(&self, pid: Option<i32>) -> Option<Accounting> {
        let (mode, from) = self.owner?;
        if pid_key(from) == pid_key(pid) {
            return None;
        }
        Some(Self::of_process(mode, false, self.limit, pid))
    }

    fn limit_pages(&self) -> u64 {
        match self.limit {
            Limit::Pages(p) => p,
            Limit::Rlimit => {
                let Some(pid) = self.owner.and_then(|(_, pid)| pid) else {
                    let lim = rustix::process::getrlimit(rustix::process::Resource::Memlock);
                    return lim.current.map_or(u64::MAX, |b| b / PAGE_SIZE);
                };
                let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
                // SAFETY: reads another process's limit into `lim`; a null
                // new limit changes nothing.
                let rc = unsafe { libc::prlimit(pid, libc::RLIMIT_MEMLOCK, std::ptr::null(), &mut lim) };
                match rc {
                    // A process gone or out of reach: its limit is unknown,
                    // and nothing more may be charged to it.
                    0 if lim.rlim_cur == libc::RLIM_INFINITY => u64::MAX,
                    0 => lim.rlim_cur / PAGE_SIZE,
                    _ => 0,
                }
            }
        }
    }

    /// Charges `npages`, failing with `ENOMEM` past the limit.
    pub fn charge(&self, npages: u64) -> Result<()> {
        let Some(c) = &self.counter else {
            return Ok(());
        };
        let limit = self.limit_pages();
        c.fetch_update(Ordering::AcqRel, Ordering::Acquire, |cur| cur.checked_add(npages).filter(|&n| n <= limit))
            .map_err(|_| Error::NoMemory("RLIMIT_MEMLOCK would be exceeded"))?;
        if let Some(p) = &self.pinned {
            p.fetch_add(npages, Ordering::AcqRel);
        }
        Ok(())
    }

    /// Charges `npages` whatever the limit: giving back what was just
    /// taken from here.
    pub(crate) fn recharge(&self, npages: u64) {
        for c in self.counter.iter().chain(&self.pinned) {
            c.fetch_add(npages, Ordering::AcqRel);
        }
    }

    pub fn uncharge(&self, npages: u64) {
        for c in self.counter.iter().chain(&self.pinned) {
            let prev = c.fetch_sub(npages, Ordering::AcqRel);
            debug_assert!(prev >= npages, "uncharged more pages than were charged");
        }
    }

    /// Pages currently charged to this accounting's counter.
    pub fn charged(&self) -> u64 {
        self.counter.as_ref().map_or(0, |c| c.load(Ordering::Acquire))
    }
}

/// Pages charged to process `pid`'s own counter (`mm->locked_vm`, process
/// mode only) and pinned for it in either mode (`mm->pinned_vm`): what its
/// `VmLck` and `VmPin` would include under Linux. `None`: this process.
pub fn process_pages(pid: Option<i32>) -> (u64, u64) {
    let get = |map: &Counters<i32>| map.lock().get(&pid_key(pid)).map_or(0, |c| c.load(Ordering::Acquire));
    (get(&PROCESS_LOCKED), get(&PROCESS_PINNED))
}

/// Whether this thread holds capability `cap` now, as Linux's `capable()`
/// judges it at each map. A capability gone from the permitted set never
/// comes back short of an exec (`capset` and uid changes only shrink that
/// set, and a user namespace's capabilities are not `capable()`'s), so once
/// one is seen gone no more `capget`s are spent on it: an unprivileged
/// program's maps make no system call for it. Where every call that can
/// change capabilities is seen (see [`watch_credentials`]), a privileged
/// program's make none either: a thread asks again only after such a call.
pub(crate) fn has_capability(cap: CapabilitySet) -> bool {
    static LOST: Lost = Lost(AtomicU64::new(0));
    LOST.has(cap, || {
        if !WATCHED.load(Ordering::Relaxed) {
            return rustix::thread::capabilities(None).ok();
        }
        SEEN.with(|seen| seen.sets(CHANGES.load(Ordering::Acquire), || rustix::thread::capabilities(None).ok()))
    })
}

/// Calls seen that can change a thread's capabilities (`capset`, the
/// `setuid` family), once [`watch_credentials`] is on.
static CHANGES: AtomicU64 = AtomicU64::new(0);
static WATCHED: AtomicBool = AtomicBool::new(false);

thread_local! {
    /// This thread's capabilities as last asked, with the count of changes
    /// seen then: capabilities are per thread, as `capable()` reads them.
    static SEEN: Seen = const { Seen(Cell::new(None)) };
}

/// Promises that [`credentials_changed`] will be called after every call
/// of this process's that can change a thread's capabilities or the
/// process's user (the preload shim sees them all): each thread then keeps
/// what it last asked, and the counters its maps charge, until one is made
/// (or the process forks). Without the promise, each map asks.
pub fn watch_credentials() {
    static FORK_HANDLER: Once = Once::new();
    FORK_HANDLER.call_once(|| {
        extern "C" fn forked() {
            FORKS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: a child handler with the C signature pthread_atfork
        // expects, which lives as long as the process.
        unsafe { libc::pthread_atfork(None, None, Some(forked)) };
    });
    WATCHED.store(true, Ordering::Relaxed);
}

/// A call that can change capabilities or the user (`capset`, `setuid`,
/// `setreuid`, `setresuid`, `seteuid`) has returned: threads ask again at
/// their next map.
pub fn credentials_changed() {
    CHANGES.fetch_add(1, Ordering::Release);
}

/// Forks seen since [`watch_credentials`]: a child's counters are its own.
static FORKS: AtomicU64 = AtomicU64::new(0);

/// What this process's accounting was made for: while all of it holds, the
/// same counters are charged.
#[derive(Clone, Copy, PartialEq, Eq)]
struct OwnKey {
    mode: AccountMode,
    exempt: bool,
    limit: Limit,
    changes: u64,
    forks: u64,
}

thread_local! {
    /// This thread's last accounting of this process, with what it was
    /// made for: finding the user's counter takes a `getuid`, a `getpid` and
    /// two locks, and it only changes with the user, the mode or a fork.
    static OWN: RefCell<Option<(OwnKey, Accounting)>> = const { RefCell::new(None) };
}

/// `f` on [`Accounting::of_process`] of this process, kept from the thread's
/// last call while nothing it depends on can have changed (see
/// [`watch_credentials`]).
pub(crate) fn with_own<R>(mode: AccountMode, exempt: bool, limit: Limit, f: impl FnOnce(&Accounting) -> R) -> R {
    let fresh = || {
        #[cfg(test)]
        tests::MADE.with(|m| m.set(m.get() + 1));
        Accounting::of_process(mode, exempt, limit, None)
    };
    if !WATCHED.load(Ordering::Relaxed) {
        return f(&fresh());
    }
    let key =
        OwnKey { mode, exempt, limit, changes: CHANGES.load(Ordering::Acquire), forks: FORKS.load(Ordering::Relaxed) };
    // Not kept while the thread exits, or in a call made from `f` itself.
    let mut f = Some(f);
    let r = OWN
        .try_with(|own| {
            let mut slot = own.try_borrow_mut().ok()?;
            if !slot.as_ref().is_some_and(|(k, _)| *k == key) {
                *slot = Some((key, fresh()));
            }
            let (_, kept) = slot.as_ref().expect("filled above");
            Some(f.take().expect("called once")(kept))
        })
        .ok()
        .flatten();
    r.unwrap_or_else(|| f.take().expect("not called")(&fresh()))
}

/// A thread's capability sets as asked after `changes` changes.
struct Seen(Cell<Option<(u64, CapabilitySets)>>);

impl Seen {
    fn sets(&self, changes: u64, capget: impl FnOnce() -> Option<CapabilitySets>) -> Option<CapabilitySets> {
        if let Some((at, sets)) = self.0.get()
            && at == changes
        {
            return Some(sets);
        }
        let sets = capget()?;
        self.0.set(Some((changes, sets)));
        Some(sets)
    }
}

/// The capabilities seen gone from the permitted set.
struct Lost(AtomicU64);

impl Lost {
    fn has(&self, cap: CapabilitySet, capget: impl FnOnce() -> Option<CapabilitySets>) -> bool {
        if self.0.load(Ordering::Relaxed) & cap.bits() == cap.bits() {
            return false;
        }
        let Some(sets) = capget() else { return false };
        if !sets.permitted.contains(cap) {
            self.0.fetch_or(cap.bits(), Ordering::Relaxed);
        }
        sets.effective.contains(cap)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charge_stops_at_the_limit_and_uncharge_restores() {
        let a = Accounting::isolated(Limit::Pages(10));
        a.charge(6).unwrap();
        assert_eq!(a.charge(5), Err(Error::NoMemory("RLIMIT_MEMLOCK would be exceeded")));
        assert_eq!(a.charged(), 6);
        a.charge(4).unwrap();
        a.uncharge(10);
        assert_eq!(a.charged(), 0);
    }

    #[test]
    fn exempt_accounting_never_fails() {
        let a = Accounting::of_process(AccountMode::User, true, Limit::Pages(0), None);
        a.charge(u64::MAX).unwrap();
        assert_eq!(a.charged(), 0);
    }

    #[test]
    fn a_capability_gone_from_the_permitted_set_is_not_asked_for_again() {
        let lost = Lost(AtomicU64::new(0));
        let (ipc, res) = (CapabilitySet::IPC_LOCK, CapabilitySet::SYS_RESOURCE);
        let sets = |effective, permitted| CapabilitySets { effective, permitted, inheritable: CapabilitySet::empty() };
        let asked = &std::cell::Cell::new(0);
        let ask = |s| {
            move || {
                asked.set(asked.get() + 1);
                Some(s)
            }
        };
        // Held, then dropped from the effective set only: asked each time.
        assert!(lost.has(ipc, ask(sets(ipc | res, ipc | res))));
        assert!(!lost.has(ipc, ask(sets(res, ipc | res))));
        assert!(lost.has(ipc, ask(sets(ipc, ipc | res))));
        // Dropped from the permitted set: gone for good, never asked again.
        assert!(!lost.has(ipc, ask(sets(CapabilitySet::empty(), res))));
        assert!(!lost.has(ipc, || panic!("asked again for a capability that cannot come back")));
        assert!(lost.has(res, ask(sets(res, res))), "other capabilities are still asked for");
        assert_eq!(asked.get(), 5);
    }

    #[test]
    fn a_thread_asks_again_only_after_a_change() {
        let seen = Seen(Cell::new(None));
        let ipc = CapabilitySet::IPC_LOCK;
        let held = CapabilitySets { effective: ipc, permitted: ipc, inheritable: CapabilitySet::empty() };
        let dropped = CapabilitySets { effective: CapabilitySet::empty(), ..held };
        let asked = &Cell::new(0);
        let ask = |s: CapabilitySets| {
            move || {
                asked.set(asked.get() + 1);
                Some(s)
            }
        };
        assert_eq!(seen.sets(7, ask(held)).unwrap().effective, ipc);
        assert_eq!(seen.sets(7, ask(dropped)).unwrap().effective, ipc, "kept while nothing changed");
        assert!(seen.sets(8, ask(dropped)).unwrap().effective.is_empty(), "asked again after a change");
        assert_eq!(asked.get(), 2);
        // A failed capget is not kept.
        assert!(seen.sets(9, || None).is_none());
        assert_eq!(seen.sets(9, ask(held)).unwrap().effective, ipc);
    }

    thread_local! {
        /// Accountings `with_own` made on this thread.
        pub(super) static MADE: Cell<u64> = const { Cell::new(0) };
    }

    #[test]
    fn this_process_accounting_is_made_again_only_when_what_it_depends_on_changes() {
        watch_credentials();
        let made = || MADE.with(Cell::get);
        let own = |mode| with_own(mode, false, Limit::Rlimit, |a| a.counter.as_ref().map(Arc::as_ptr));
        let start = made();
        let user = own(AccountMode::User);
        assert_eq!((own(AccountMode::User), own(AccountMode::User)), (user, user));
        assert_eq!(made(), start + 1, "kept");
        credentials_changed();
        assert_eq!(own(AccountMode::User), user, "the same user's counter");
        assert_eq!(made(), start + 2, "made again after a change of credentials");
        assert_ne!(own(AccountMode::Process), user);
        own(AccountMode::User);
        assert_eq!(made(), start + 4, "made again for another mode");
        FORKS.fetch_add(1, Ordering::Relaxed);
        own(AccountMode::User);
        assert_eq!(made(), start + 5, "made again after a fork");
        // A call from inside `f` gets one of its own.
        with_own(AccountMode::User, false, Limit::Rlimit, |_| own(AccountMode::User));
        assert_eq!(made(), start + 6);
        own(AccountMode::User);
        assert_eq!(made(), start + 6);
    }

    #[test]
    fn process_mode_shares_one_counter() {
        let a = Accounting::of_process(AccountMode::Process, false, Limit::Pages(u64::MAX), None);
        let b = Accounting::of_process(AccountMode::Process, false, Limit::Pages(u64::MAX), None);
        let before = b.charged();
        a.charge(3).unwrap();
        assert!(b.charged() >= before + 3);
        a.uncharge(3);
    }
}
