//! Object IDs: Linux's choice (the lowest free ID from 1, as an allocating
//! xarray gives it) at a cost that does not grow with the live objects;
//! and IOASID sets, whose destroy costs what they hold.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use ioasid_engine::{DeviceInfo, ObjectId, PtId};
use proptest::prelude::*;

mod common;
use common::ctx;

#[test]
fn ids_are_the_lowest_free_from_one() {
    let ctx = ctx();
    let ids: Vec<u32> = (0..6).map(|_| ctx.ioas_alloc().unwrap().get()).collect();
    assert_eq!(ids, [1, 2, 3, 4, 5, 6]);
    for id in [2, 4, 6, 5] {
        ctx.destroy(ObjectId::new(id)).unwrap();
    }
    assert_eq!(ctx.ioas_alloc().unwrap().get(), 2);
    let dev = ctx.bind_device(DeviceInfo::new("d", 1)).unwrap();
    assert_eq!(dev.get(), 4, "every kind of object shares one ID space");
    assert_eq!(ctx.ioas_alloc().unwrap().get(), 5);
    assert_eq!(ctx.attach(dev, PtId::new(1)).unwrap().get(), 6, "the automatic HWPT takes the next one");
    ctx.detach(dev).unwrap();
    assert_eq!(ctx.ioas_alloc().unwrap().get(), 6, "the automatic HWPT's ID was freed with it");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Any sequence of allocations and destroys hands out the IDs a scan
    /// for the lowest free one would.
    #[test]
    fn ids_match_a_lowest_free_scan(ops in proptest::collection::vec((any::<bool>(), 0u32..48), 1..300)) {
        let ctx = ctx();
        let mut live = BTreeSet::new();
        for (alloc, pick) in ops {
            if alloc || live.is_empty() {
                let want = (1..).find(|id| !live.contains(id)).unwrap();
                prop_assert_eq!(ctx.ioas_alloc().unwrap().get(), want);
                live.insert(want);
            } else {
                let id = *live.iter().nth(pick as usize % live.len()).unwrap();
                ctx.destroy(ObjectId::new(id)).unwrap();
                live.remove(&id);
            }
        }
        let listed: Vec<u32> = ctx.objects().into_iter().map(|(id, _)| id.get()).collect();
        prop_assert_eq!(listed, live.into_iter().collect::<Vec<_>>());
    }
}

/// The best of a few rounds of `ops` calls to `f`, per call.
fn per_call(ops: u32, mut f: impl FnMut()) -> Duration {
    (0..5)
        .map(|_| {
            let start = Instant::now();
            for _ in 0..ops {
                f();
            }
            start.elapsed() / ops
        })
        .min()
        .unwrap()
}

/// What an allocation, a destroy and an attach to an IOAS cost in a context
/// of `live` objects with a hole in the middle.
fn costs(live: u32) -> (Duration, Duration) {
    let ctx = ctx();
    let ioas = ctx.ioas_alloc().unwrap();
    let dev = ctx.bind_device(DeviceInfo::new("d", 1)).unwrap();
    for _ in 2..live {
        ctx.ioas_alloc().unwrap();
    }
    ctx.destroy(ObjectId::new(live / 2)).unwrap();
    let alloc = per_call(300, || {
        let id = ctx.ioas_alloc().unwrap();
        ctx.destroy(id).unwrap();
    });
    let attach = per_call(100, || {
        ctx.attach(dev, ioas).unwrap();
        ctx.detach(dev).unwrap();
    });
    (alloc, attach)
}

/// Linux's xarray allocates in O(log n); a scan of the table made a context
/// of 72 k IOASes take seconds. At 20 k objects a scan costs hundreds of
/// times a small context's call; a tree, a small multiple.
#[test]
fn calls_do_not_slow_down_with_live_objects() {
    let (small_alloc, small_attach) = costs(16);
    let (large_alloc, large_attach) = costs(20_000);
    assert!(
        large_alloc < small_alloc * 10 + Duration::from_micros(5),
        "alloc + destroy: {small_alloc:?} at 16 objects, {large_alloc:?} at 20 k"
    );
    assert!(
        large_attach < small_attach * 10 + Duration::from_micros(5),
        "attach + detach: {small_attach:?} at 16 objects, {large_attach:?} at 20 k"
    );
}

/// Destroying an IOASID set (`IOMMU_DESTROY` of a set object) visits the
/// IDs it holds, not the whole 20-bit space.
#[test]
fn set_destroy_costs_what_the_set_holds() {
    use ioasid_engine::ioasid_set::PasidSpace;
    let cost = |width: u8| {
        let space = PasidSpace::new(width).unwrap();
        per_call(200, || {
            let set = space.create_set(None, 4).unwrap();
            space.alloc(set, 1, u32::MAX, 0).unwrap();
            space.destroy_set(set).unwrap();
        })
    };
    let (narrow, wide) = (cost(6), cost(20));
    assert!(wide < narrow * 10 + Duration::from_micros(2), "{narrow:?} in a 6-bit space, {wide:?} in 20 bits");
}
