//! Random maps (small and huge leaves), unmaps, writes and dirty reads on a
//! page table of each format, checked against a plain model: the set of
//! dirty IO pages. A write dirties its whole leaf; a read reports (and,
//! unless it keeps them, cleans) every dirty leaf it touches. A read from
//! inside an epoch critical section (which cannot wait for DMA) must agree.
//! Then a writer marking pages while another thread reads and clears: no
//! DMA write is ever lost.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use ioasid_engine::pgtable::amd::AmdV1Mode4;
use ioasid_engine::pgtable::arm::{ArmS1, ArmS2};
use ioasid_engine::pgtable::mock::{Mock, MockPt};
use ioasid_engine::pgtable::x86::VtdSs4;
use ioasid_engine::pgtable::{Format, PageTable, Perm, Pte, Trust};
use proptest::prelude::*;

/// IO pages per huge leaf of the first size up, in every format here.
const HUGE: u64 = 512;
/// IO pages the test plays in: four huge leaves' worth.
const SPACE: u64 = 4 * HUGE;
/// Where IOVA 0's memory would be (aligned for every leaf size).
const HOST: u64 = 1 << 40;

#[derive(Debug, Clone)]
enum Op {
    Map { page: u64, npages: u64, write: bool },
    Unmap { page: u64, npages: u64 },
    Write { page: u64 },
    Read { page: u64, npages: u64, keep: bool, pinned: bool },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => (0..SPACE, 1..40u64, any::<bool>()).prop_map(|(page, npages, write)| Op::Map { page, npages, write }),
        2 => (0..SPACE / HUGE, 1..3u64, any::<bool>())
            .prop_map(|(h, n, write)| Op::Map { page: h * HUGE, npages: n * HUGE, write }),
        2 => (0..SPACE, 1..700u64).prop_map(|(page, npages)| Op::Unmap { page, npages }),
        5 => (0..SPACE).prop_map(|page| Op::Write { page }),
        3 => (0..SPACE, 1..SPACE, any::<bool>(), any::<bool>())
            .prop_map(|(page, npages, keep, pinned)| Op::Read { page, npages, keep, pinned }),
        // Whole leaf tables (of 4 KiB pages; of 2 KiB ones in the mock).
        2 => (0..SPACE / HUGE, 1..=SPACE / HUGE, any::<bool>())
            .prop_map(|(t, n, keep)| Op::Read { page: t * HUGE, npages: n * HUGE, keep, pinned: false }),
    ]
}

struct Model<F: Format> {
    pt: PageTable<F>,
    /// Mapped IO pages and whether they are writable.
    mapped: BTreeMap<u64, bool>,
    dirty: HashSet<u64>,
}

impl<F: Format> Model<F> {
    fn page_size() -> u64 {
        1 << F::PAGE_SHIFT
    }

    /// What the format's entry says of a new leaf with these rights.
    fn starts_dirty(write: bool) -> bool {
        let pte = F::leaf(0, 0, if write { Perm::RW } else { Perm::R }, Trust::Direct);
        matches!(F::decode(pte, 0), Pte::Leaf { dirty: true, .. })
    }

    fn tracks_dirty(write: bool) -> bool {
        F::tracks_dirty(F::leaf(0, 0, if write { Perm::RW } else { Perm::R }, Trust::Direct))
    }

    /// The IO pages of the leaf mapping `page`.
    fn leaf_of(&self, page: u64) -> std::ops::Range<u64> {
        let g = ioasid_engine::epoch::pin();
        let t = self.pt.walk(page * Self::page_size(), &g).expect("mapped");
        let n = 1u64 << (t.shift - F::PAGE_SHIFT);
        let first = page & !(n - 1);
        first..first + n
    }

    fn apply(&mut self, op: &Op) -> Result<(), TestCaseError> {
        let ps = Self::page_size();
        match *op {
            Op::Map { page, npages, write } => {
                let npages = npages.min(SPACE - page);
                if (page..page + npages).any(|p| self.mapped.contains_key(&p)) {
                    return Ok(());
                }
                let perm = if write { Perm::RW } else { Perm::R };
                self.pt.map(page * ps, HOST + page * ps, npages * ps, perm, Trust::Direct, true).unwrap();
                for p in page..page + npages {
                    self.mapped.insert(p, write);
                    if Self::starts_dirty(write) {
                        self.dirty.insert(p);
                    }
                }
            }
            Op::Unmap { page, npages } => {
                let last = (page + npages - 1).min(SPACE - 1);
                // A huge leaf cut in two becomes smaller leaves, which start
                // as new leaves do.
                for edge in [page.checked_sub(1), Some(last + 1)].into_iter().flatten() {
                    if let Some(&write) = self.mapped.get(&edge) {
                        let leaf = self.leaf_of(edge);
                        if leaf.start <= last && leaf.end > page {
                            for p in leaf {
                                self.dirty.remove(&p);
                                if Self::starts_dirty(write) {
                                    self.dirty.insert(p);
                                }
                            }
                        }
                    }
                }
                self.pt.unmap(page * ps, (last + 1 - page) * ps, &ioasid_engine::epoch::pin());
                for p in page..=last {
                    self.mapped.remove(&p);
                    self.dirty.remove(&p);
                }
            }
            Op::Write { page } => {
                let mapped = self.mapped.get(&page).copied();
                let leaf = mapped.map(|_| self.leaf_of(page));
                let g = ioasid_engine::epoch::pin();
                prop_assert_eq!(self.pt.set_dirty(page * ps + 5, &g), mapped.is_some());
                if let (Some(write), Some(leaf)) = (mapped, leaf)
                    && Self::tracks_dirty(write)
                {
                    self.dirty.extend(leaf);
                }
            }
            Op::Read { page, npages, keep, pinned } => {
                let last = (page + npages - 1).min(SPACE - 1);
                let mut want = BTreeSet::new();
                for p in (page..=last).filter(|p| self.dirty.contains(p)) {
                    want.extend(self.leaf_of(p));
                }
                let mut got = BTreeSet::new();
                let mut runs = Vec::new();
                let inside = pinned.then(ioasid_engine::epoch::pin);
                self.pt.read_and_clear_dirty(page * ps, last * ps + ps - 1, keep, &mut |start, len| {
                    runs.push((start, len));
                });
                drop(inside);
                for &(start, len) in &runs {
                    prop_assert!(start % ps == 0 && len % ps == 0 && len > 0, "run {start:#x}+{len:#x}");
                    for p in start / ps..(start + len) / ps {
                        prop_assert!(got.insert(p), "page {p} reported twice");
                    }
                }
                prop_assert!(runs.windows(2).all(|w| w[0].0 + w[0].1 < w[1].0), "runs sorted and merged: {runs:x?}");
                prop_assert_eq!(&got, &want, "read of pages {}..={} (keep: {})", page, last, keep);
                if !keep {
                    for p in &want {
                        self.dirty.remove(p);
                    }
                }
            }
        }
        Ok(())
    }
}

fn run<F: Format>(ops: &[Op]) -> Result<(), TestCaseError> {
    let mut m = Model::<F> { pt: PageTable::new(), mapped: BTreeMap::new(), dirty: HashSet::new() };
    for op in ops {
        m.apply(op)?;
    }
    // Everything left dirty is reported once, then nothing.
    m.apply(&Op::Read { page: 0, npages: SPACE, keep: true, pinned: false })?;
    m.apply(&Op::Read { page: 0, npages: SPACE, keep: false, pinned: false })?;
    prop_assert!(m.dirty.is_empty());
    m.apply(&Op::Read { page: 0, npages: SPACE, keep: false, pinned: false })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn dirty_reads_match_the_model(format in 0..6usize, ops in proptest::collection::vec(op(), 1..60)) {
        match format {
            0 => run::<VtdSs4>(&ops)?,
            1 => run::<ArmS1>(&ops)?,
            2 => run::<ArmS2>(&ops)?,
            3 => run::<AmdV1Mode4>(&ops)?,
            4 => run::<Mock<true>>(&ops)?,
            _ => run::<MockPt>(&ops)?,
        }
    }
}

/// A 1 GiB leaf is dirtied and read whole, beside its 4 KiB neighbours.
#[test]
fn a_gib_leaf_is_dirtied_and_read_whole() {
    const GIB: u64 = 1 << 30;
    let pt = PageTable::<VtdSs4>::new();
    pt.map(GIB, HOST, GIB, Perm::RW, Trust::Direct, true).unwrap();
    pt.map(2 * GIB, HOST + GIB, 0x2000, Perm::RW, Trust::Direct, true).unwrap();
    assert_eq!(pt.summary().leaves, vec![2, 0, 1, 0]);
    let g = ioasid_engine::epoch::pin();
    assert!(pt.set_dirty(GIB + 12345, &g));
    assert!(pt.set_dirty(2 * GIB, &g));
    let mut runs = Vec::new();
    pt.read_and_clear_dirty(GIB + GIB / 2, 2 * GIB + 0x1fff, true, &mut |a, l| runs.push((a, l)));
    assert_eq!(runs, [(GIB, GIB + 0x1000)], "the whole leaf and the page after it, as one run");
    runs.clear();
    pt.read_and_clear_dirty(0, u64::MAX, false, &mut |a, l| runs.push((a, l)));
    assert_eq!(runs, [(GIB, GIB + 0x1000)]);
    runs.clear();
    pt.read_and_clear_dirty(0, u64::MAX, false, &mut |a, l| runs.push((a, l)));
    assert!(runs.is_empty());
}

/// A device writes pages (marks its leaf, then writes the data, inside one
/// epoch critical section, as DMA through a domain does) while a VMM reads
/// and clears the dirty log and copies every page it reports, as a
/// migration does. In each round the device writes every page once; after
/// it stopped, one more read and copy must leave every copy up to date: a
/// report taken while the write that set it was still in flight, and the
/// data copied before the write landed, would lose that write.
#[test]
fn no_dma_write_is_lost_while_the_dirty_log_is_read() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::{Arc, Barrier};
    use std::time::{Duration, Instant};

    const PAGES: u64 = 2 * HUGE;
    const ROUNDS: u64 = 400;
    const IOVA: u64 = 1 << 30;
    let pt = Arc::new(PageTable::<VtdSs4>::new());
    // Small pages: two whole leaf tables, and reads that cut one of them.
    pt.map(IOVA, HOST, PAGES << 12, Perm::RW, Trust::Direct, false).unwrap();
    let mem: Arc<Vec<AtomicU64>> = Arc::new((0..PAGES).map(|_| AtomicU64::new(0)).collect());
    let (start, done) = (Arc::new(Barrier::new(2)), Arc::new(AtomicBool::new(false)));
    let device = {
        let (pt, mem, start, done) = (pt.clone(), mem.clone(), start.clone(), done.clone());
        std::thread::spawn(move || {
            for round in 1..=ROUNDS {
                start.wait();
                for p in (0..PAGES).map(|i| (i * 97 + round) % PAGES) {
                    let dma = ioasid_engine::epoch::pin();
                    assert!(pt.set_dirty(IOVA + (p << 12), &dma));
                    // The data, a while after the mark (a 4 KiB copy).
                    for _ in 0..64 {
                        std::hint::spin_loop();
                    }
                    mem[p as usize].store(round, Ordering::Release);
                    drop(dma);
                }
                done.store(true, Ordering::Release);
                start.wait();
            }
        })
    };
    let mut copy = vec![0u64; PAGES as usize];
    let read = |copy: &mut [u64], first: u64, last: u64| {
        pt.read_and_clear_dirty(IOVA + (first << 12), IOVA + (last << 12) + 0xfff, false, &mut |at, len| {
            for p in (at - IOVA) >> 12..(at - IOVA + len) >> 12 {
                copy[p as usize] = mem[p as usize].load(Ordering::Acquire);
            }
        });
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut reads = 0u64;
    for round in 1..=ROUNDS {
        start.wait();
        while !done.load(Ordering::Acquire) {
            // Mostly whole, sometimes cut inside the first leaf table.
            match reads % 4 {
                0 => read(&mut copy, 0, 100),
                1 => read(&mut copy, 101, PAGES - 1),
                _ => read(&mut copy, 0, PAGES - 1),
            }
            reads += 1;
        }
        read(&mut copy, 0, PAGES - 1);
        let stale: Vec<u64> = (0..PAGES).filter(|&p| copy[p as usize] != round).collect();
        assert!(stale.is_empty(), "round {round}: writes to pages {stale:?} were lost ({reads} reads)");
        done.store(false, Ordering::Relaxed);
        start.wait();
        if Instant::now() > deadline {
            break;
        }
    }
    device.join().unwrap();
}
