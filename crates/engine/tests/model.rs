//! Random map / copy / unmap / attach / detach sequences on two IOASes,
//! checked after every step against a plain model: page → (memory, rights).

use std::collections::BTreeMap;

use ioasid_engine::{Context, ContextConfig, DeviceInfo, DmaError, Error, HostBuffer, IommuModel, Limit, Perm};
use proptest::prelude::*;

const PAGE: u64 = 4096;
/// IOVA pages the test plays in (2 MiB + a bit, so huge leaves happen).
const SPACE: u64 = 600;
const MEM_PAGES: u64 = 1024;

#[derive(Debug, Clone)]
enum Op {
    Map { ioas: usize, page: u64, npages: u64, mem_page: u64, write: bool },
    Copy { from: usize, page: u64, npages: u64, to_page: u64 },
    Unmap { ioas: usize, page: u64, npages: u64 },
    Attach { dev: usize, ioas: usize },
    Detach { dev: usize },
}

fn iommu() -> impl Strategy<Value = IommuModel> {
    prop_oneof![
        Just(IommuModel::VTD),
        Just(IommuModel::IntelVtd { levels: 5 }),
        Just(IommuModel::ArmSmmuV3),
        Just(IommuModel::AmdVi),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        // One page and one 2 MiB leaf are maps of their own in the page
        // table (a single leaf, walked straight down): often enough here.
        4 => (0..2usize, 0..SPACE, prop_oneof![Just(1u64), Just(512), 1..520u64], 0..MEM_PAGES - 520, any::<bool>())
            .prop_map(|(ioas, page, npages, mem_page, write)| Op::Map { ioas, page, npages, mem_page, write }),
        2 => (0..2usize, 0..SPACE, 1..64u64, 0..SPACE)
            .prop_map(|(from, page, npages, to_page)| Op::Copy { from, page, npages, to_page }),
        3 => (0..2usize, 0..SPACE, 1..600u64).prop_map(|(ioas, page, npages)| Op::Unmap { ioas, page, npages }),
        1 => (0..2usize, 0..2usize).prop_map(|(dev, ioas)| Op::Attach { dev, ioas }),
        1 => (0..2usize).prop_map(|dev| Op::Detach { dev }),
    ]
}

/// One mapping in the model: the memory page behind each IOVA page.
#[derive(Debug, Clone)]
struct Area {
    mem: Vec<u64>,
    write: bool,
}

impl Area {
    fn npages(&self) -> u64 {
        self.mem.len() as u64
    }
}

#[derive(Default)]
struct Model {
    areas: [BTreeMap<u64, Area>; 2],
    attached: [Option<usize>; 2],
}

impl Model {
    fn overlaps(&self, ioas: usize, page: u64, npages: u64) -> bool {
        self.areas[ioas].iter().any(|(&p, a)| p < page + npages && page < p + a.npages())
    }

    fn lookup(&self, ioas: usize, page: u64) -> Option<(u64, bool)> {
        let (&p, a) = self.areas[ioas].range(..=page).next_back()?;
        (page < p + a.npages()).then(|| (a.mem[(page - p) as usize], a.write))
    }
}

fn run(iommu: IommuModel, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let ctx = Context::with_config(ContextConfig::isolated(Limit::Pages(u64::MAX)));
    let mem = HostBuffer::new((MEM_PAGES * PAGE) as usize).unwrap();
    let ioas = [ctx.ioas_alloc().unwrap(), ctx.ioas_alloc().unwrap()];
    let devs = [
        ctx.bind_device(DeviceInfo::behind(iommu, "a", 1)).unwrap(),
        ctx.bind_device(DeviceInfo::behind(iommu, "b", 2)).unwrap(),
    ];
    let mut m = Model::default();
    for op in ops {
        match op {
            Op::Map { ioas: i, page, npages, mem_page, write } => {
                let perm = if write { Perm::RW } else { Perm::R };
                // SAFETY: `mem` outlives the context's mappings (dropped after `ctx`).
                let r = unsafe {
                    ctx.map_user(ioas[i], mem.addr() + mem_page * PAGE, npages * PAGE, Some(page * PAGE), perm)
                };
                if m.overlaps(i, page, npages) {
                    prop_assert!(matches!(r, Err(Error::Exists(_))), "overlap must be EEXIST: {r:?}");
                } else {
                    prop_assert_eq!(r, Ok(page * PAGE));
                    m.areas[i].insert(page, Area { mem: (mem_page..mem_page + npages).collect(), write });
                }
            }
            Op::Copy { from, page, npages, to_page } => {
                let to = 1 - from;
                let covered = (page..page + npages).all(|p| m.lookup(from, p).is_some());
                let r = ctx.copy(ioas[to], ioas[from], page * PAGE, npages * PAGE, Some(to_page * PAGE), Perm::R);
                if !covered {
                    prop_assert!(matches!(r, Err(Error::NotFound(_))), "hole must be ENOENT: {r:?}");
                } else if m.overlaps(to, to_page, npages) {
                    prop_assert!(matches!(r, Err(Error::Exists(_))), "{r:?}");
                } else {
                    prop_assert_eq!(r, Ok(to_page * PAGE));
                    let mem = (page..page + npages).map(|p| m.lookup(from, p).unwrap().0).collect();
                    m.areas[to].insert(to_page, Area { mem, write: false });
                }
            }
            Op::Unmap { ioas: i, page, npages } => {
                let r = ctx.unmap(ioas[i], page * PAGE, npages * PAGE);
                let inside: Vec<u64> = m.areas[i]
                    .iter()
                    .filter(|&(&p, a)| p < page + npages && page < p + a.npages())
                    .map(|(&p, _)| p)
                    .collect();
                let splits = inside.iter().any(|&p| p < page || p + m.areas[i][&p].npages() > page + npages);
                if inside.is_empty() {
                    prop_assert!(matches!(r, Err(Error::NotFound(_))), "{r:?}");
                } else if splits {
                    prop_assert!(matches!(r, Err(Error::NotFound(_))), "split must be ENOENT: {r:?}");
                    // Linux unmaps whole areas before the one that would split.
                    for p in inside {
                        if p < page || p + m.areas[i][&p].npages() > page + npages {
                            break;
                        }
                        m.areas[i].remove(&p);
                    }
                } else {
                    let bytes: u64 = inside.iter().map(|p| m.areas[i][p].npages() * PAGE).sum();
                    prop_assert_eq!(r, Ok(bytes));
                    for p in inside {
                        m.areas[i].remove(&p);
                    }
                }
            }
            Op::Attach { dev, ioas: i } => {
                let r = if m.attached[dev].is_some() {
                    ctx.replace(devs[dev], ioas[i])
                } else {
                    ctx.attach(devs[dev], ioas[i])
                };
                prop_assert!(r.is_ok(), "attach: {r:?}");
                m.attached[dev] = Some(i);
            }
            Op::Detach { dev } => {
                let r = ctx.detach(devs[dev]);
                prop_assert_eq!(r.is_ok(), m.attached[dev].is_some());
                m.attached[dev] = None;
            }
        }
        check(&ctx, &devs, &m, &mem)?;
    }
    drop(ctx);
    Ok(())
}

fn check(ctx: &Context, devs: &[ioasid_engine::DeviceId; 2], m: &Model, mem: &HostBuffer) -> Result<(), TestCaseError> {
    let guard = ioasid_engine::epoch::pin();
    for (d, &dev_id) in devs.iter().enumerate() {
        let dev = ctx.get(dev_id).unwrap();
        for page in 0..SPACE {
            let got = dev.port(None).translate(page * PAGE + 8, Perm::R, &guard);
            let Some(i) = m.attached[d] else {
                prop_assert_eq!(got, Err(DmaError::Blocked));
                continue;
            };
            match m.lookup(i, page) {
                None => prop_assert!(got.is_err(), "page {page} should fault, got {got:?}"),
                Some((mem_page, write)) => {
                    let host = got.map_err(|e| TestCaseError::fail(format!("page {page}: {e}")))?.host.0;
                    prop_assert_eq!(host, mem.addr() + mem_page * PAGE + 8);
                    let w = dev.port(None).translate(page * PAGE, Perm::W, &guard);
                    prop_assert_eq!(w.is_ok(), write, "write right of page {}", page);
                }
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    /// The same sequences on every IOMMU model, each with its own table
    /// format (VT-d 4 and 5 levels, Arm stage 1, AMD v1).
    fn translations_match_the_model(iommu in iommu(), ops in proptest::collection::vec(op(), 1..40)) {
        run(iommu, ops)?;
    }
}
