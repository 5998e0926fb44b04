//! The unmap guarantee under a reader that never pauses: one thread DMAs
//! through a device without a break while this one maps and unmaps, in
//! turn, two buffers at the same IOVA, for 10,000 rounds. A buffer that
//! changes after its unmap returned is a stale write. Readers enter their
//! epoch section with no full fence, so this is the check that the
//! writer's barrier (membarrier, or the fence fallback) makes up for it.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use ioasid_engine::{HostBuffer, Perm};

const IOVA: u64 = 0x20_0000;
const LEN: u64 = 4096;
const ROUNDS: u32 = 10_000;

#[test]
fn no_stale_write_in_ten_thousand_unmaps() {
    let (ctx, ioas, device) = common::attached_device();
    let stop = Arc::new(AtomicBool::new(false));
    let landed = Arc::new(AtomicU64::new(0));
    let writer = {
        let (device, stop, landed) = (device.clone(), stop.clone(), landed.clone());
        std::thread::spawn(move || {
            let mut n = 1u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                // Every word differs from the last, and none is zero.
                if device.dma_write(IOVA + (n % 64) * 64, &n.to_le_bytes()).is_ok() {
                    landed.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    let bufs = [HostBuffer::new(LEN as usize).unwrap(), HostBuffer::new(LEN as usize).unwrap()];
    let snapshot = |b: &HostBuffer| {
        let mut v = vec![0u8; LEN as usize];
        b.read_at(0, &mut v);
        v
    };
    let mut stale = 0u32;
    let mut after_unmap: [Option<Vec<u8>>; 2] = [None, None];
    for round in 0..ROUNDS {
        let k = (round % 2) as usize;
        // The buffer unmapped two rounds ago must not have changed since.
        if after_unmap[k].take().is_some_and(|seen| seen != snapshot(&bufs[k])) {
            stale += 1;
        }
        // SAFETY: both buffers outlive the context's use of them: each is
        // unmapped before the next round maps the other.
        unsafe { ctx.map_user(ioas, bufs[k].addr(), LEN, Some(IOVA), Perm::RW).unwrap() };
        for _ in 0..50 {
            std::hint::spin_loop();
        }
        ctx.unmap(ioas, IOVA, LEN).unwrap();
        after_unmap[k] = Some(snapshot(&bufs[k]));
    }
    std::thread::yield_now();
    for (k, seen) in after_unmap.iter_mut().enumerate() {
        if seen.take().is_some_and(|seen| seen != snapshot(&bufs[k])) {
            stale += 1;
        }
    }
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    assert_eq!(stale, 0, "DMA reached memory after unmap returned in {stale} of {ROUNDS} rounds");
    assert!(landed.load(Ordering::Relaxed) > 0, "the writer never hit a mapping: the test tested nothing");
}
