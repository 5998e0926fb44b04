//! Waiting for DMA in flight.
//!
//! DMA through the engine runs inside a `crossbeam_epoch` critical section
//! (a pinned guard). `synchronize` returns only after every critical section
//! that was running when it was called has ended: it queues a marker to be
//! run once the epoch has moved past all current readers, and drives the
//! epoch forward until the marker runs. This is what makes "after unmap
//! returns, no DMA can reach the old pages" true.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

pub use crossbeam_epoch::{Guard, pin};

/// Waits until every DMA (every epoch critical section) that was running
/// when it was called has finished; spins, then yields.
pub(crate) fn synchronize() {
    let done = Arc::new(AtomicBool::new(false));
    {
        let guard = pin();
        let flag = done.clone();
        guard.defer(move || flag.store(true, Ordering::Release));
        guard.flush();
    }
    let mut spins = 0u32;
    while !done.load(Ordering::Acquire) {
        pin().flush();
        spins += 1;
        if spins > 64 {
            std::thread::yield_now();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;
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
}
