//! Failure injection, as Linux's `/proc/<pid>/task/<tid>/fail-nth` does it:
//! a thread armed with N has the Nth fallible step it reaches fail (with
//! `ENOMEM`, as a failed allocation would), and then reads back 0. Every
//! fallible step of the engine calls [`check`], so a test can sweep every
//! failure path of an operation and check that each ends cleanly.

use std::collections::HashMap;
use std::sync::LazyLock;
use std::sync::atomic::{AtomicUsize, Ordering};

use parking_lot::{Mutex, MutexGuard};

use crate::error::{Error, Result};

/// Threads with a non-zero count; lets `check` skip the lock when none is.
static ARMED: AtomicUsize = AtomicUsize::new(0);
static NTH: LazyLock<Mutex<HashMap<i32, u32>>> = LazyLock::new(|| Mutex::new(HashMap::new()));

fn nth() -> MutexGuard<'static, HashMap<i32, u32>> {
    NTH.lock()
}

fn set(map: &mut HashMap<i32, u32>, tid: i32, n: u32) {
    // A disarmed thread has no entry: a daemon sets and clears the count on
    // every client's thread, and those threads come and go.
    let old = if n > 0 { map.insert(tid, n) } else { map.remove(&tid) }.unwrap_or(0);
    match (old > 0, n > 0) {
        (false, true) => ARMED.fetch_add(1, Ordering::AcqRel),
        (true, false) => ARMED.fetch_sub(1, Ordering::AcqRel),
        _ => 0,
    };
}

/// Arms thread `tid` to fail its `n`th fallible step (0 disarms).
pub fn set_fail_nth(tid: i32, n: u32) {
    set(&mut nth(), tid, n);
}

/// What thread `tid` would read from its `fail-nth`: 0 once the failure
/// fired (or when never armed), else the steps still to go.
pub fn fail_nth(tid: i32) -> u32 {
    nth().get(&tid).copied().unwrap_or(0)
}

/// The calling thread's kernel thread ID, the `tid` of
/// [`set_fail_nth`] and [`fail_nth`].
pub fn current_tid() -> i32 {
    rustix::thread::gettid().as_raw_nonzero().get()
}

/// A fallible step: fails when the calling thread's count runs out here.
/// Inline, as it is on every map's path several times: a load when no
/// thread is armed.
#[inline]
pub fn check(what: &'static str) -> Result<()> {
    if ARMED.load(Ordering::Acquire) == 0 {
        return Ok(());
    }
    check_armed(what)
}

#[cold]
fn check_armed(what: &'static str) -> Result<()> {
    let tid = current_tid();
    let mut map = nth();
    match map.get(&tid).copied() {
        Some(n) if n > 0 => {
            set(&mut map, tid, n - 1);
            if n == 1 { Err(Error::NoMemory(what)) } else { Ok(()) }
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_disarmed_thread_leaves_no_entry() {
        // No thread has this ID, so no other test touches its entry.
        let tid = -7;
        set_fail_nth(tid, 3);
        set_fail_nth(tid, 0);
        assert!(!nth().contains_key(&tid));
        set_fail_nth(tid, 0);
        assert!(!nth().contains_key(&tid));
    }

    #[test]
    fn the_nth_check_fails_once() {
        let tid = current_tid();
        set_fail_nth(tid, 3);
        assert!(check("a").is_ok());
        assert_eq!(fail_nth(tid), 2);
        assert!(check("b").is_ok());
        assert_eq!(check("c"), Err(Error::NoMemory("c")));
        assert_eq!(fail_nth(tid), 0);
        assert!(check("d").is_ok());
    }

    #[test]
    fn other_threads_are_not_affected() {
        let tid = current_tid();
        set_fail_nth(tid, 1);
        std::thread::spawn(|| assert!(check("elsewhere").is_ok())).join().unwrap();
        assert!(check("here").is_err());
    }
}
