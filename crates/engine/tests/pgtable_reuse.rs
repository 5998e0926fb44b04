//! Tables an unmap takes out are reused by later maps only after the
//! readers that could still walk them have left: readers translating
//! without a break while a writer maps and unmaps two ranges in turn (so
//! one range's old tables become the other's) must only ever see the
//! range's own memory or nothing.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use ioasid_engine::epoch;
use ioasid_engine::pgtable::x86::VtdSs4;
use ioasid_engine::pgtable::{PageTable, Perm, Trust};

const LEN: u64 = 2 << 20;
/// Two ranges under different top-level entries, and the memory of each.
const RANGES: [(u64, u64); 2] = [(1 << 30, 0x10_0000_0000), (1 << 39, 0x20_0000_0000)];
const ROUNDS: u32 = 3000;

#[test]
fn readers_never_see_a_reused_table() {
    let pt = Arc::new(PageTable::<VtdSs4>::new());
    let stop = Arc::new(AtomicBool::new(false));
    let (wrong, seen) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let readers: Vec<_> = (0..2u64)
        .map(|t| {
            let (pt, stop, wrong, seen) = (pt.clone(), stop.clone(), wrong.clone(), seen.clone());
            std::thread::spawn(move || {
                let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ t;
                while !stop.load(Ordering::Relaxed) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let (iova, host) = RANGES[(x & 1) as usize];
                    let offset = (x >> 1) % LEN;
                    let guard = epoch::pin();
                    if let Some(t) = pt.walk(iova + offset, &guard) {
                        seen.fetch_add(1, Ordering::Relaxed);
                        if t.addr != host + offset {
                            wrong.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            })
        })
        .collect();
    for round in 0..ROUNDS {
        let (iova, host) = RANGES[(round % 2) as usize];
        pt.map(iova, host, LEN, Perm::RW, Trust::Direct, false).unwrap();
        std::thread::yield_now();
        pt.unmap(iova, LEN, &epoch::pin());
        epoch::pin().flush();
    }
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        r.join().unwrap();
    }
    assert!(seen.load(Ordering::Relaxed) > 0, "readers found the mappings");
    assert_eq!(wrong.load(Ordering::Relaxed), 0, "a reader walked a table already reused");
}
