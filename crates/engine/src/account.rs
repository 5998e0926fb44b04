//! Locked-memory accounting of pinned pages, as Linux's iommufd does it.
//!
//! Pages are charged against `RLIMIT_MEMLOCK` when they are pinned (when they
//! first enter a page table) and uncharged when the last user unpins them.
//! The counter is either the user's (default, shared by every context of the
//! uid in this process) or the process's (`IOMMU_OPTION_RLIMIT_MODE` = 1, the
//! mode VFIO type1 uses). Callers holding `CAP_IPC_LOCK` are not charged.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};

use crate::error::{Error, Result};
use crate::iova::PAGE_SIZE;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccountMode {
    /// Charged to the user (`user->locked_vm`).
    User,
    /// Charged to the process (`mm->locked_vm`).
    Process,
}

/// Where pinned pages of one context are charged, and against which limit.
#[derive(Debug, Clone)]
pub struct Accounting {
    counter: Option<Arc<AtomicU64>>,
    limit: Limit,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// `RLIMIT_MEMLOCK` of this process, read at each pin.
    Rlimit,
    /// A fixed number of pages (tests, and the selftests' temporary limit).
    Pages(u64),
}

static USER_COUNTERS: LazyLock<Mutex<HashMap<u32, Arc<AtomicU64>>>> = LazyLock::new(|| Mutex::new(HashMap::new()));
static PROCESS_COUNTER: LazyLock<Arc<AtomicU64>> = LazyLock::new(|| Arc::new(AtomicU64::new(0)));

impl Accounting {
    /// The accounting a caller with these privileges gets in `mode`.
    pub fn new(mode: AccountMode, exempt: bool, limit: Limit) -> Self {
        let counter = (!exempt).then(|| match mode {
            AccountMode::User => {
                let uid = rustix::process::getuid().as_raw();
                let mut map = USER_COUNTERS.lock().unwrap_or_else(|e| e.into_inner());
                map.entry(uid).or_default().clone()
            }
            AccountMode::Process => PROCESS_COUNTER.clone(),
        });
        Accounting { counter, limit }
    }

    /// A private counter, for tests that must not share the process's.
    pub fn isolated(limit: Limit) -> Self {
        Accounting { counter: Some(Arc::new(AtomicU64::new(0))), limit }
    }

    pub fn none() -> Self {
        Accounting { counter: None, limit: Limit::Rlimit }
    }

    fn limit_pages(&self) -> u64 {
        match self.limit {
            Limit::Pages(p) => p,
            Limit::Rlimit => {
                let lim = rustix::process::getrlimit(rustix::process::Resource::Memlock);
                lim.current.map_or(u64::MAX, |b| b / PAGE_SIZE)
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
            .map(drop)
            .map_err(|_| Error::NoMemory("RLIMIT_MEMLOCK would be exceeded"))
    }

    pub fn uncharge(&self, npages: u64) {
        if let Some(c) = &self.counter {
            let prev = c.fetch_sub(npages, Ordering::AcqRel);
            debug_assert!(prev >= npages, "uncharged more pages than were charged");
        }
    }

    /// Pages currently charged to this accounting's counter.
    pub fn charged(&self) -> u64 {
        self.counter.as_ref().map_or(0, |c| c.load(Ordering::Acquire))
    }
}

pub const CAP_IPC_LOCK: u32 = 14;
pub const CAP_SYS_RESOURCE: u32 = 24;

/// Whether this process holds `CAP_IPC_LOCK`, which exempts it from charging.
pub fn has_cap_ipc_lock() -> bool {
    has_capability(CAP_IPC_LOCK)
}

/// Whether capability `cap` is in this process's effective set.
pub fn has_capability(cap: u32) -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("CapEff:")).and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & (1 << cap) != 0)
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
        let a = Accounting::new(AccountMode::User, true, Limit::Pages(0));
        a.charge(u64::MAX).unwrap();
        assert_eq!(a.charged(), 0);
    }

    #[test]
    fn process_mode_shares_one_counter() {
        let a = Accounting::new(AccountMode::Process, false, Limit::Pages(u64::MAX));
        let b = Accounting::new(AccountMode::Process, false, Limit::Pages(u64::MAX));
        let before = b.charged();
        a.charge(3).unwrap();
        assert!(b.charged() >= before + 3);
        a.uncharge(3);
    }
}
