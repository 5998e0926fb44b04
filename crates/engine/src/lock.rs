//! A mutex whose release is a plain store.
//!
//! The engine's short critical sections (an IOAS's areas, the PASID space)
//! are seldom contended, and then a mutex costs its two atomic
//! read-modify-writes: one to take it, one to release it while checking
//! for sleepers. This lock pays the first only. Releasing stores "free"
//! and then loads the count of threads that sleep on the lock; the CPU
//! must not let that load pass the store (a sleeper counted after the load
//! would sleep through the release), which takes a full fence on the
//! releasing side, or one on every CPU from the sleeping side. As the
//! epoch does for DMA (see `crate::epoch`), the fence goes to the rare
//! side: a thread about to sleep counts itself, then runs
//! `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED)`, a full barrier on every
//! CPU running one of the process's threads. After it, a releaser either
//! has its store seen (the thread takes the lock instead of sleeping) or
//! loads the count after the barrier and wakes it. Where membarrier is not
//! registered, a release pays a SeqCst fence, and the protocol is the
//! plain Dekker pairing.
//!
//! Sleeping is parking_lot's: a thread parks on the lock's address after
//! spinning briefly, and parks only while the lock is still taken, checked
//! under parking_lot's queue lock, which the releaser's wake takes too.

use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, Ordering, compiler_fence, fence};

use parking_lot::lock_api::{self, RawMutex as _};

/// A mutex over `T` whose release is a store (see the module docs).
pub type Lock<T> = lock_api::Mutex<RawLock, T>;
/// What [`Lock::lock`] returns.
pub type LockGuard<'a, T> = lock_api::MutexGuard<'a, RawLock, T>;

/// The lock word and its sleepers.
pub struct RawLock {
    locked: AtomicBool,
    /// Threads that may sleep on the lock (counted before they look at it
    /// a last time, until they hold it).
    sleepers: AtomicU32,
}

/// Whether releases leave their fence to sleepers' membarrier: 0 not known
/// yet, else [`ASYMMETRIC`] or [`SYMMETRIC`], as the epoch found
/// membarrier (registered for good, or not at all). Sleepers ask the epoch
/// themselves, so a release and a sleeper always agree on who fences.
static MODE: AtomicU8 = AtomicU8::new(0);
const ASYMMETRIC: u8 = 1;
const SYMMETRIC: u8 = 2;

#[cold]
#[inline(never)]
fn learn_mode() -> u8 {
    let mode = if crate::epoch::asymmetric() { ASYMMETRIC } else { SYMMETRIC };
    MODE.store(mode, Ordering::Relaxed);
    mode
}

// SAFETY: `lock` and `try_lock` take the word with an acquire
// read-modify-write from false to true, so one holder at a time; `unlock`
// stores false with release, so the next holder sees the section's writes.
unsafe impl lock_api::RawMutex for RawLock {
    #[allow(clippy::declare_interior_mutable_const)] // lock_api's initialiser
    const INIT: RawLock = RawLock { locked: AtomicBool::new(false), sleepers: AtomicU32::new(0) };
    type GuardMarker = lock_api::GuardSend;

    #[inline]
    fn lock(&self) {
        if !self.try_lock() {
            self.lock_contended();
        }
    }

    #[inline]
    fn try_lock(&self) -> bool {
        self.locked.compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed).is_ok()
    }

    #[inline]
    unsafe fn unlock(&self) {
        self.locked.store(false, Ordering::Release);
        let mode = match MODE.load(Ordering::Relaxed) {
            0 => learn_mode(),
            mode => mode,
        };
        if mode == ASYMMETRIC {
            // A sleeper's membarrier orders the store before the load on
            // the CPU; only the compiler must keep it there.
            compiler_fence(Ordering::SeqCst);
        } else {
            fence(Ordering::SeqCst);
        }
        if self.sleepers.load(Ordering::Relaxed) != 0 {
            self.wake();
        }
    }

    #[inline]
    fn is_locked(&self) -> bool {
        self.locked.load(Ordering::Relaxed)
    }
}

impl RawLock {
    fn key(&self) -> usize {
        self as *const RawLock as usize
    }

    #[cold]
    #[inline(never)]
    fn lock_contended(&self) {
        let mut spin = parking_lot_core::SpinWait::new();
        while spin.spin() {
            if !self.locked.load(Ordering::Relaxed) && self.try_lock() {
                return;
            }
        }
        self.sleepers.fetch_add(1, Ordering::SeqCst);
        // After it, every release either loads the count after its store,
        // or has its store seen by the look below. (Without membarrier it
        // is a fence, and releases fence too.)
        crate::epoch::heavy_barrier();
        while !self.try_lock() {
            // SAFETY: the key is this lock's address, which no other kind
            // of parking uses; the closures neither park nor panic.
            unsafe {
                parking_lot_core::park(
                    self.key(),
                    || self.locked.load(Ordering::Relaxed),
                    || {},
                    |_, _| {},
                    parking_lot_core::DEFAULT_PARK_TOKEN,
                    None,
                );
            }
        }
        self.sleepers.fetch_sub(1, Ordering::Relaxed);
    }

    #[cold]
    #[inline(never)]
    fn wake(&self) {
        // SAFETY: as in `lock_contended`; the callback does nothing.
        unsafe { parking_lot_core::unpark_one(self.key(), |_| parking_lot_core::DEFAULT_UNPARK_TOKEN) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    /// Threads that take the lock in turn, some holding it long enough for
    /// the others to sleep: every increment of a plain counter lands, and
    /// nobody sleeps through a release (the test would hang).
    #[test]
    fn contended_sections_exclude_each_other_and_sleepers_wake() {
        const THREADS: usize = 4;
        const ROUNDS: usize = 20_000;
        let lock = Arc::new(Lock::new(0usize));
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let lock = lock.clone();
                std::thread::spawn(move || {
                    for i in 0..ROUNDS {
                        let mut g = lock.lock();
                        let seen = *g;
                        if (i + t) % 2_000 == 0 {
                            std::thread::sleep(Duration::from_micros(200));
                        }
                        *g = seen + 1;
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        assert_eq!(*lock.lock(), THREADS * ROUNDS);
        // SAFETY: only read, with the lock's holders all gone.
        let sleepers = unsafe { lock.raw() }.sleepers.load(Ordering::Relaxed);
        assert_eq!(sleepers, 0, "every sleeper left the count");
    }

    /// Threads that find the lock held for long sleep (they are counted),
    /// and the release wakes every one of them in turn.
    #[test]
    fn a_long_hold_puts_waiters_to_sleep_and_its_release_wakes_them() {
        let lock = Arc::new(Lock::new(0u32));
        let held = lock.lock();
        let waiters: Vec<_> = (0..3)
            .map(|_| {
                let lock = lock.clone();
                std::thread::spawn(move || *lock.lock() += 1)
            })
            .collect();
        // SAFETY (both reads): the count is an atomic, read only.
        let sleepers = || unsafe { lock.raw() }.sleepers.load(Ordering::Relaxed);
        while sleepers() < 3 {
            std::thread::sleep(Duration::from_millis(1));
        }
        drop(held);
        for w in waiters {
            w.join().unwrap();
        }
        assert_eq!((*lock.lock(), sleepers()), (3, 0));
    }

    #[test]
    fn try_lock_fails_while_held() {
        let lock = Lock::new(());
        let g = lock.lock();
        assert!(lock.try_lock().is_none() && lock.is_locked());
        drop(g);
        assert!(lock.try_lock().is_some());
    }
}
