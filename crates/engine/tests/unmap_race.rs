//! DESIGN §3's guarantee, under load: once `unmap` returns, no DMA reaches
//! the old pages. Writer threads DMA continuously; after each unmap the
//! test checks the old memory stays untouched, and it counts stale hits.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ioasid_engine::{HostBuffer, Perm};

const IOVA: u64 = 0x10_0000;
const LEN: u64 = 2 * 4096;
const ROUNDS: u32 = 300;

#[test]
fn no_dma_lands_after_unmap_returns() {
    let (ctx, ioas, device) = common::attached_device();
    let stop = Arc::new(AtomicBool::new(false));
    let landed = Arc::new(AtomicU64::new(0));

    let writers: Vec<_> = (0..2)
        .map(|t| {
            let (device, stop, landed) = (device.clone(), stop.clone(), landed.clone());
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let word = (n << 8 | t as u64 | 1).to_le_bytes();
                    if device.dma_write(IOVA + 4096 + 64 * t as u64, &word).is_ok() {
                        landed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();

    let mut stale = 0u32;
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut rounds = 0;
    while rounds < ROUNDS && Instant::now() < deadline {
        rounds += 1;
        let buf = HostBuffer::new(LEN as usize).unwrap();
        // SAFETY: `buf` is dropped only after it is unmapped below.
        unsafe { ctx.map_user(ioas, buf.addr(), LEN, Some(IOVA), Perm::RW).unwrap() };
        std::thread::sleep(Duration::from_micros(50));
        ctx.unmap(ioas, IOVA, LEN).unwrap();
        let mut before = [0u8; LEN as usize];
        buf.read_at(0, &mut before);
        // Give any straggler time to land, then compare.
        std::thread::sleep(Duration::from_micros(200));
        let mut after = [0u8; LEN as usize];
        buf.read_at(0, &mut after);
        if before != after {
            stale += 1;
        }
    }
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.join().unwrap();
    }
    assert_eq!(stale, 0, "DMA reached memory after unmap returned in {stale} of {rounds} rounds");
    assert!(landed.load(Ordering::Relaxed) > 0, "writers never hit a mapping: the test tested nothing");
}
