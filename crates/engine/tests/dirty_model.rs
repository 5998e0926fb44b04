//! Random maps (small and huge leaves), unmaps, writes and dirty reads on a
//! page table of each format, checked against a plain model: the set of
//! dirty IO pages. A write dirties its whole leaf; a read reports (and,
//! unless it keeps them, cleans) every dirty leaf it touches.

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
    Read { page: u64, npages: u64, keep: bool },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => (0..SPACE, 1..40u64, any::<bool>()).prop_map(|(page, npages, write)| Op::Map { page, npages, write }),
        2 => (0..SPACE / HUGE, 1..3u64, any::<bool>())
            .prop_map(|(h, n, write)| Op::Map { page: h * HUGE, npages: n * HUGE, write }),
        2 => (0..SPACE, 1..700u64).prop_map(|(page, npages)| Op::Unmap { page, npages }),
        5 => (0..SPACE).prop_map(|page| Op::Write { page }),
        3 => (0..SPACE, 1..SPACE, any::<bool>()).prop_map(|(page, npages, keep)| Op::Read { page, npages, keep }),
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
            Op::Read { page, npages, keep } => {
                let last = (page + npages - 1).min(SPACE - 1);
                let mut want = BTreeSet::new();
                for p in (page..=last).filter(|p| self.dirty.contains(p)) {
                    want.extend(self.leaf_of(p));
                }
                let mut got = BTreeSet::new();
                let mut runs = Vec::new();
                self.pt.read_and_clear_dirty(page * ps, last * ps + ps - 1, keep, &mut |start, len| {
                    runs.push((start, len));
                });
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
    m.apply(&Op::Read { page: 0, npages: SPACE, keep: true })?;
    m.apply(&Op::Read { page: 0, npages: SPACE, keep: false })?;
    prop_assert!(m.dirty.is_empty());
    m.apply(&Op::Read { page: 0, npages: SPACE, keep: false })
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
