//! PASID allocation in IOASID sets.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use ioasid_engine::Error;
use ioasid_engine::ioasid_set::{Class, Event, Events, PasidSpace, SetId};
use proptest::prelude::*;

#[test]
fn width_is_checked_and_pasid_zero_is_never_given() {
    assert!(matches!(PasidSpace::new(0), Err(Error::Invalid(_))));
    assert!(matches!(PasidSpace::new(21), Err(Error::Invalid(_))));
    let space = PasidSpace::new(2).unwrap();
    let set = space.create_set(None, 10).unwrap();
    let ids: Vec<u32> = (0..3).map(|_| space.alloc(set, 0, u32::MAX, 0).unwrap()).collect();
    assert_eq!(ids, vec![1, 2, 3]);
    assert!(matches!(space.alloc(set, 0, u32::MAX, 0), Err(Error::NoSpace(_))));
}

#[test]
fn quotas_hold_at_every_level() {
    let space = PasidSpace::new(20).unwrap();
    let vm = space.create_set(None, 4).unwrap();
    let a = space.create_set(Some(vm), 3).unwrap();
    let b = space.create_set(Some(vm), 3).unwrap();
    assert!(matches!(space.create_set(Some(vm), 5), Err(Error::Invalid(_))), "inside the parent's quota");
    space.alloc(a, 1, 1000, 0).unwrap();
    space.alloc(a, 1, 1000, 0).unwrap();
    space.alloc(b, 1, 1000, 0).unwrap();
    let last = space.alloc(b, 1, 1000, 0).unwrap();
    assert!(matches!(space.alloc(a, 1, 1000, 0), Err(Error::Quota(_))), "the parent is full");
    assert_eq!(space.usage(vm).unwrap(), (4, 4));
    assert!(matches!(space.set_quota(vm, 3), Err(Error::Busy(_))), "never below use");
    space.free(b, last).unwrap();
    space.set_quota(a, 2).unwrap();
    assert!(matches!(space.alloc(a, 1, 1000, 0), Err(Error::Quota(_))), "the child is full");
    space.alloc(b, 1, 1000, 0).unwrap();
    assert!(matches!(space.destroy_set(vm), Err(Error::Busy(_))), "children first");
    space.destroy_set(a).unwrap();
    assert_eq!(space.usage(vm).unwrap().1, 2);
}

/// An allocation refused anywhere on the path to the root (a full
/// ancestor, or no free ID in the range) leaves every set's count as it was.
#[test]
fn a_refused_allocation_charges_no_level() {
    let space = PasidSpace::new(4).unwrap();
    let root = space.create_set(None, 3).unwrap();
    let mid = space.create_set(Some(root), 3).unwrap();
    let leaf = space.create_set(Some(mid), 3).unwrap();
    let other = space.create_set(Some(root), 3).unwrap();
    let counts = || [root, mid, leaf, other].map(|s| space.usage(s).unwrap().1);
    let p = space.alloc(leaf, 1, 15, 0).unwrap();
    assert!(matches!(space.alloc(leaf, 16, 20, 0), Err(Error::Invalid(_))), "an empty range");
    assert_eq!(space.alloc(leaf, 15, 15, 0).unwrap(), 15);
    assert!(matches!(space.alloc(leaf, 15, 15, 0), Err(Error::NoSpace(_))), "no free ID in the range");
    assert_eq!(counts(), [2, 2, 2, 0]);
    space.alloc(other, 1, 15, 0).unwrap();
    assert!(matches!(space.alloc(leaf, 1, 15, 0), Err(Error::Quota(_))), "the root is full");
    assert_eq!(counts(), [3, 2, 2, 1], "the leaf and its parent were charged and given back");
    space.free(leaf, p).unwrap();
    assert_eq!(counts(), [2, 1, 1, 1]);
    assert_eq!(space.alloc(leaf, 1, 15, 0).unwrap(), p);
    assert_eq!(counts(), [3, 2, 2, 1]);
}

#[test]
fn a_free_while_referenced_completes_at_the_last_put() {
    let space = PasidSpace::new(20).unwrap();
    let set = space.create_set(None, 8).unwrap();
    let p = space.alloc(set, 1, 100, 77).unwrap();
    space.get(p).unwrap();
    space.get(p).unwrap();
    space.free(set, p).unwrap();
    assert_eq!(space.find(set, p), Some(77), "still there while referenced");
    assert!(matches!(space.get(p), Err(Error::NotFound(_))), "no new references once freed");
    assert!(matches!(space.free(set, p), Err(Error::NotFound(_))), "freed once");
    space.put(p).unwrap();
    assert_eq!(space.usage(set).unwrap().1, 1);
    space.put(p).unwrap();
    assert_eq!(space.find(set, p), None);
    assert_eq!(space.usage(set).unwrap().1, 0);
    assert!(space.put(p).is_err());
}

#[test]
fn set_private_ids_translate_both_ways() {
    let space = PasidSpace::new(20).unwrap();
    let guest = space.create_set(None, 8).unwrap();
    let other = space.create_set(None, 8).unwrap();
    let host = space.alloc_private(guest, 5, 0).unwrap();
    let host2 = space.alloc_private(other, 5, 0).unwrap();
    assert_ne!(host, host2, "each set has its own vPASID 5");
    assert_eq!(space.host_pasid(guest, 5), Some(host));
    assert_eq!(space.vpasid(host), Some(5));
    assert!(matches!(space.alloc_private(guest, 5, 0), Err(Error::Exists(_))));
    assert_eq!(space.find(other, host), None, "lookups respect the set");
    space.free(guest, host).unwrap();
    assert_eq!(space.host_pasid(guest, 5), None);
}

#[test]
fn subscribers_hear_events_in_order_and_by_class() {
    let space = PasidSpace::new(20).unwrap();
    let set = space.create_set(None, 8).unwrap();
    let other = space.create_set(None, 8).unwrap();
    let device = space.subscribe(Class::Device, Some(set), Events::ALL);
    let cpu = space.subscribe(Class::Cpu, None, Events(Events::ALLOC.0 | Events::FREE.0));
    let p = space.alloc(set, 1, 100, 0).unwrap();
    space.bind(p, 42).unwrap();
    let q = space.alloc(other, 1, 100, 0).unwrap();
    space.free(set, p).unwrap();
    space.unbind(p, 42).unwrap();
    let heard: Vec<Event> = device.try_iter().collect();
    assert_eq!(
        heard,
        vec![
            Event::Alloc { set, pasid: p },
            Event::Bind { set, pasid: p, device: 42 },
            Event::Unbind { set, pasid: p, device: 42 },
            Event::Free { set, pasid: p },
        ]
    );
    let heard: Vec<Event> = cpu.try_iter().collect();
    assert_eq!(
        heard,
        vec![Event::Alloc { set, pasid: p }, Event::Alloc { set: other, pasid: q }, Event::Free { set, pasid: p }]
    );
    drop(cpu);
    space.alloc(set, 1, 100, 0).unwrap();
    assert_eq!(device.try_iter().count(), 1, "a dropped subscriber is forgotten");
}

#[test]
fn lookups_run_beside_allocation_on_many_threads() {
    let space = Arc::new(PasidSpace::new(20).unwrap());
    let sets: Vec<SetId> = (0..4).map(|_| space.create_set(None, 1 << 20).unwrap()).collect();
    let threads: Vec<_> = sets
        .iter()
        .map(|&set| {
            let space = space.clone();
            std::thread::spawn(move || {
                for round in 0..2000u64 {
                    let p = space.alloc(set, 1, u32::MAX, round).unwrap();
                    assert_eq!(space.find(set, p), Some(round));
                    space.get(p).unwrap();
                    space.free(set, p).unwrap();
                    assert_eq!(space.find(set, p), Some(round));
                    space.put(p).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    for set in sets {
        assert_eq!(space.usage(set).unwrap().1, 0);
    }
}

#[test]
fn lock_free_readers_never_see_a_torn_or_reused_entry() {
    // Two writers churn the same few IDs (width 3: 7 PASIDs) in two sets,
    // each allocation's private value naming its set; readers check every
    // entry they see is whole, and take and drop references on whatever
    // is live, which must never release an ID twice or lose a reference.
    let space = Arc::new(PasidSpace::new(3).unwrap());
    let sets: Vec<SetId> = (0..2).map(|_| space.create_set(None, 8).unwrap()).collect();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writers: Vec<_> = sets
        .iter()
        .map(|&set| {
            let space = space.clone();
            std::thread::spawn(move || {
                for round in 0..20_000u64 {
                    let private = (u64::from(set.0) << 32) | round;
                    match space.alloc(set, 1, 7, private) {
                        Ok(p) => {
                            assert_eq!(space.find(set, p), Some(private));
                            space.free(set, p).unwrap();
                        }
                        Err(Error::NoSpace(_)) => std::thread::yield_now(),
                        Err(e) => panic!("{e:?}"),
                    }
                }
            })
        })
        .collect();
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let (space, stop) = (space.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    for p in 1..=7 {
                        if let Some(e) = space.entry(p) {
                            assert_eq!(e.pasid(), p);
                            assert_eq!(e.private() >> 32, u64::from(e.set().0), "torn entry");
                        }
                        if space.get(p).is_ok() {
                            space.put(p).unwrap();
                        }
                    }
                }
            })
        })
        .collect();
    for t in writers {
        t.join().unwrap();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in readers {
        t.join().unwrap();
    }
    for set in sets {
        assert_eq!(space.usage(set).unwrap().1, 0);
        assert!(space.ids(set).unwrap().is_empty());
    }
    for p in 1..=7 {
        assert!(space.entry(p).is_none());
    }
}

#[derive(Debug, Clone)]
enum Op {
    Alloc(usize, u32),
    Free(usize, usize),
    Get(usize),
    Put(usize),
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn allocation_matches_a_model(ops in proptest::collection::vec(prop_oneof![
        (0..3usize, 1..10u32).prop_map(|(s, min)| Op::Alloc(s, min)),
        (0..3usize, 0..16usize).prop_map(|(s, i)| Op::Free(s, i)),
        (0..16usize).prop_map(Op::Get),
        (0..16usize).prop_map(Op::Put),
    ], 1..120)) {
        // Width 4: 15 PASIDs. Parent quota 10, two children of quota 6.
        let space = PasidSpace::new(4).unwrap();
        let root = space.create_set(None, 10).unwrap();
        let sets = [root, space.create_set(Some(root), 6).unwrap(), space.create_set(Some(root), 6).unwrap()];
        // Model: pasid -> (set index, references, freed).
        let mut live: BTreeMap<u32, (usize, u32, bool)> = BTreeMap::new();
        let mut seen: Vec<u32> = Vec::new();
        for op in ops {
            match op {
                Op::Alloc(s, min) => {
                    let used = |k: usize| live.values().filter(|v| v.0 == k).count();
                    let root_used = live.len();
                    let r = space.alloc(sets[s], min, 15, s as u64);
                    let over = root_used >= 10 || (s > 0 && used(s) >= 6);
                    // The lowest free ID of the range, as an IDA or xarray gives it.
                    let lowest = (min..=15).find(|p| !live.contains_key(p));
                    if over {
                        prop_assert!(matches!(r, Err(Error::Quota(_))), "{:?}", r);
                    } else if lowest.is_none() {
                        prop_assert!(matches!(r, Err(Error::NoSpace(_))), "{:?}", r);
                    } else {
                        let p = r.unwrap();
                        prop_assert_eq!(Some(p), lowest);
                        live.insert(p, (s, 1, false));
                        seen.push(p);
                    }
                }
                Op::Free(s, i) if !seen.is_empty() => {
                    let p = seen[i % seen.len()];
                    let r = space.free(sets[s], p);
                    match live.get_mut(&p) {
                        Some(e) if e.0 == s && !e.2 => {
                            prop_assert!(r.is_ok());
                            e.2 = true;
                            e.1 -= 1;
                            if e.1 == 0 { live.remove(&p); }
                        }
                        _ => prop_assert!(r.is_err()),
                    }
                }
                Op::Get(i) if !seen.is_empty() => {
                    let p = seen[i % seen.len()];
                    let r = space.get(p);
                    match live.get_mut(&p) {
                        Some(e) if !e.2 => { prop_assert!(r.is_ok()); e.1 += 1; }
                        _ => prop_assert!(r.is_err()),
                    }
                }
                Op::Put(i) if !seen.is_empty() => {
                    let p = seen[i % seen.len()];
                    // Only put what the model says was taken by a get.
                    if let Some(e) = live.get_mut(&p) && e.1 > 1 {
                        space.put(p).unwrap();
                        e.1 -= 1;
                    }
                }
                _ => {}
            }
            // Every live ID is findable in its set; every other ID is gone.
            for p in 1..=15u32 {
                let found = space.find(sets[0], p).or(space.find(sets[1], p)).or(space.find(sets[2], p));
                prop_assert_eq!(found.is_some(), live.contains_key(&p), "pasid {}", p);
            }
            let ids: BTreeSet<u32> = live.keys().copied().collect();
            let counted: usize = (0..3).map(|k| space.ids(sets[k]).unwrap().len()).sum();
            prop_assert_eq!(counted, ids.len());
            prop_assert_eq!(space.usage(root).unwrap().1 as usize, live.len());
        }
    }
}

/// A daemon's user share: two contexts of one user make their sets under
/// one shared root, whose quota holds across both; its sets go with them.
#[test]
fn contexts_under_one_shared_root_share_its_quota() {
    use ioasid_engine::{Context, ContextConfig, Limit, ioasid_set};
    let root = ioasid_set::shared_root(3).unwrap();
    let config = || ContextConfig { pasid_parent: Some(root.clone()), ..ContextConfig::isolated(Limit::Pages(16)) };
    let (a, b) = (Context::with_config(config()), Context::with_config(config()));
    let space = ioasid_set::global();
    let set_a = a.get(a.ioasid_set_alloc(None, 3).unwrap()).unwrap().id();
    let set_b = b.get(b.ioasid_set_alloc(None, 3).unwrap()).unwrap().id();
    assert!(b.ioasid_set_alloc(None, 4).is_err(), "a set's quota fits in the share");
    space.alloc(set_a, 1, 1 << 20, 0).unwrap();
    space.alloc(set_a, 1, 1 << 20, 0).unwrap();
    space.alloc(set_b, 1, 1 << 20, 0).unwrap();
    assert!(matches!(space.alloc(set_b, 1, 1 << 20, 0), Err(Error::Quota(_))), "the share is used up");
    assert_eq!(space.usage(root.id()).unwrap(), (3, 3));
    drop(a);
    assert_eq!(space.usage(root.id()).unwrap(), (3, 1), "a context's sets go with it");
    space.alloc(set_b, 1, 1 << 20, 0).unwrap();
}

/// A context's object limit is an allocation failure, and leaves room
/// again once an object goes.
#[test]
fn a_context_holds_no_more_objects_than_its_limit() {
    use ioasid_engine::{Context, ContextConfig, Limit};
    let ctx = Context::with_config(ContextConfig { max_objects: Some(2), ..ContextConfig::isolated(Limit::Pages(16)) });
    let first = ctx.ioas_alloc().unwrap();
    ctx.ioas_alloc().unwrap();
    assert!(matches!(ctx.ioas_alloc(), Err(Error::NoMemory(_))));
    ctx.destroy(first).unwrap();
    ctx.ioas_alloc().unwrap();
}

/// A destroyed set's ID names nothing after, even once a new set takes
/// its place; its PASIDs cannot be freed through it.
#[test]
fn a_destroyed_sets_id_names_no_later_set() {
    let space = PasidSpace::new(8).unwrap();
    let old = space.create_set(None, 4).unwrap();
    let p = space.alloc(old, 1, 255, 0).unwrap();
    space.destroy_set(old).unwrap();
    let new = space.create_set(None, 4).unwrap();
    assert_ne!(new, old);
    assert!(matches!(space.usage(old), Err(Error::NotFound(_))));
    assert!(matches!(space.alloc(old, 1, 255, 0), Err(Error::NotFound(_))));
    assert!(matches!(space.destroy_set(old), Err(Error::NotFound(_))));
    let q = space.alloc(new, 1, 255, 0).unwrap();
    assert_eq!(q, p, "the old set's PASID went back to the space");
    assert!(matches!(space.free(old, q), Err(Error::NotFound(_))));
    assert_eq!(space.usage(new).unwrap(), (4, 1));
    // Many sets come and go; each live one keeps its own ID.
    let mut live: Vec<SetId> = (0..64).map(|_| space.create_set(None, 1).unwrap()).collect();
    for round in 0..200 {
        let gone = live.remove(round % live.len());
        space.destroy_set(gone).unwrap();
        let made = space.create_set(None, 1).unwrap();
        assert!(!live.contains(&made) && made != gone && made != new);
        assert!(matches!(space.usage(gone), Err(Error::NotFound(_))));
        live.push(made);
    }
    assert_eq!(space.usage(new).unwrap(), (4, 1));
}
