//! Engine benchmarks, each figure timed in alternation with a peer doing
//! the same work (vm-memory 0.18's IOMMU support on the same mappings, or
//! what a VMM would write by hand), through `benches/harness.rs`.
//! `benches/run.sh` runs them and writes BENCHMARKS.md.

#[path = "../../../benches/harness.rs"]
mod harness;
#[path = "peers/plain_ioas.rs"]
mod plain_ioas;

use std::cell::RefCell;
use std::hint::black_box;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use harness::{Harness, iter, timed};
use ioasid_engine::ioas::Ioas;
use ioasid_engine::pgtable::mock::Mock;
use ioasid_engine::pgtable::x86::{VtdSs4, VtdSs5};
use ioasid_engine::pgtable::{Format, PageTable, Perm, Trust};
use ioasid_engine::{
    Context, ContextConfig, DeviceId, DeviceInfo, Domain, HostBuffer, HwptFlags, IoasId, IovaRange, Limit,
};
use plain_ioas::PlainIoas;
use vm_memory::iommu::Iotlb;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, Permissions};

const PAGE: u64 = 4096;
/// The same-work peer's name in the tables.
const PLAIN: &str = "plain IOAS (BTreeMap, charge, x86_64 page table)";
const IOVA: u64 = 1 << 32;

/// A deterministic page order, so both sides see the same accesses.
fn pages(n: u64, count: usize) -> Vec<u64> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..count)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        })
        .collect()
}

/// The next index, made to depend on the last translation so lookups do not
/// overlap in the pipeline: this measures latency, not throughput.
fn chain(i: usize, host: u64, len: usize) -> usize {
    // black_box: the compiler must not see that the low bit is always 0.
    (i + 1 + (black_box(host) as usize & 1)) % len
}

/// A domain with `n` pages mapped at `IOVA` from `mem`.
fn domain_with(mem: &HostBuffer, n: u64, huge: bool) -> (Arc<Context>, Arc<Domain>) {
    let ctx = Arc::new(Context::with_config(ContextConfig::isolated(Limit::Pages(u64::MAX))));
    let ioas = ctx.ioas_alloc().unwrap();
    if !huge {
        ctx.get(ioas).unwrap().set_huge_pages(false).unwrap();
    }
    let dev = ctx.bind_device(DeviceInfo::new("bench", 1)).unwrap();
    let hwpt = ctx.attach(dev, ioas).unwrap();
    // SAFETY: `mem` outlives the context in every benchmark.
    unsafe { ctx.map_user(ioas, mem.addr(), n * PAGE, Some(IOVA), Perm::RW).unwrap() };
    let domain = ctx.get(hwpt.paging()).unwrap().domain().clone();
    (ctx, domain)
}

/// vm-memory's IOTLB holding the same mappings, one per page.
fn vm_iotlb(mem: &HostBuffer, n: u64) -> Iotlb {
    let mut t = Iotlb::new();
    vm_map(&mut t, mem, n);
    t
}

/// `n` pages of `mem` mapped at `IOVA` in `t`, one entry per page.
fn vm_map(t: &mut Iotlb, mem: &HostBuffer, n: u64) {
    for p in 0..n {
        let (iova, host) = (GuestAddress(IOVA + p * PAGE), GuestAddress(mem.addr() + p * PAGE));
        t.set_mapping(iova, host, PAGE as usize, Permissions::ReadWrite).unwrap();
    }
}

fn vm_lookup(t: &Iotlb, iova: u64) -> u64 {
    Iotlb::lookup(t, GuestAddress(iova), 8, Permissions::Read).unwrap().next().unwrap().base.0
}

fn iotlb_hit(h: &mut Harness) {
    let mem = HostBuffer::new(PAGE as usize).unwrap();
    let (_ctx, domain) = domain_with(&mem, 1, false);
    let guard = ioasid_engine::epoch::pin();
    let t = vm_iotlb(&mem, 1);
    // What a VMM without an IOMMU pays: guest-physical to host, one region.
    let gm = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(IOVA), PAGE as usize)]).unwrap();
    let figure = "translate: IOTLB hit, one 4 KiB page";
    let ours = "`Domain::translate` of one mapped page, answered by its IOTLB";
    h.compare(
        figure,
        iter("ioasid", ours, || domain.translate(black_box(IOVA + 64), Perm::R, &guard).unwrap()),
        iter("vm-memory Iotlb", "`Iotlb::lookup` of the same page", || vm_lookup(&t, black_box(IOVA + 64))),
    );
    h.compare(
        figure,
        iter("ioasid", ours, || domain.translate(black_box(IOVA + 64), Perm::R, &guard).unwrap()),
        iter("vm-memory GuestMemoryMmap", "guest-physical to host in one region, no IOMMU", || {
            gm.get_host_address(black_box(GuestAddress(IOVA + 64))).unwrap()
        }),
    );
}

/// One walk per lookup, in format `F`, over 1 GiB mapped in its smallest
/// pages, beside vm-memory's `Iotlb` holding one range per page.
fn walk_in<F: Format>(h: &mut Harness, name: &str, mem: &HostBuffer, order: &[u64], t: &Iotlb) {
    let figure = format!("translate: page walk (no IOTLB), random page of 1 GiB, {name}");
    if !h.wants(&figure) {
        return;
    }
    let pt = PageTable::<F>::new();
    pt.map(IOVA, mem.addr(), mem.len() as u64, Perm::RW, Trust::Direct, false).unwrap();
    let guard = ioasid_engine::epoch::pin();
    let (mut i, mut j) = (0, 0);
    h.compare(
        &figure,
        iter("ioasid", "`PageTable::walk` to a random page, each lookup waiting for the last", || {
            let host = pt.walk(IOVA + order[i] * PAGE, &guard).unwrap().addr;
            i = chain(i, host, order.len());
        }),
        iter("vm-memory Iotlb", "`Iotlb::lookup` of the same pages in the same order", || {
            let host = vm_lookup(t, IOVA + order[j] * PAGE);
            j = chain(j, host, order.len());
        }),
    );
}

fn page_walk(h: &mut Harness) {
    const N: u64 = 1 << 18; // 1 GiB of 4 KiB pages
    if !h.wants("translate: page walk") {
        return;
    }
    let mem = HostBuffer::new((N * PAGE) as usize).unwrap();
    let order = pages(N, 4096);
    let t = vm_iotlb(&mem, N);
    walk_in::<VtdSs4>(h, "VT-d second stage, 4 levels", &mem, &order, &t);
    walk_in::<VtdSs5>(h, "VT-d second stage, 5 levels", &mem, &order, &t);
    walk_in::<Mock<false>>(h, "selftest mock, 2 KiB pages", &mem, &order, &t);
}

/// A guest whose VT-d first-stage table maps `N` scattered pages, nested
/// over a host second stage in 4 KiB pages: each translation that misses
/// the combined IOTLB reads four stage-1 entries through stage 2, then
/// translates the result through stage 2.
fn nested_walk(h: &mut Harness) {
    use ioasid_engine::NestedData;
    use ioasid_engine::pgtable::x86::first_stage::encode;
    const N: u64 = 1 << 16;
    const ROOT: u64 = 0x1000;
    const LEAF_TABLES: u64 = 0x4000;
    const DATA: u64 = 16 << 20;
    const GIOVA: u64 = 1 << 30;
    let figure = "translate: nested walk (VT-d stage 1 over stage 2), random page of 256 MiB";
    if !h.wants(figure) {
        return;
    }
    let ram_len = DATA + N * PAGE;
    let ram = HostBuffer::new(ram_len as usize).unwrap();
    let put = |table: u64, index: u64, pte: u64| ram.write_at((table + index * 8) as usize, &pte.to_le_bytes());
    put(ROOT, (GIOVA >> 39) & 511, encode(0x2000, 3, false, true));
    put(0x2000, (GIOVA >> 30) & 511, encode(0x3000, 2, false, true));
    for k in 0..N / 512 {
        put(0x3000, ((GIOVA >> 21) & 511) + k, encode(LEAF_TABLES + k * PAGE, 1, false, true));
    }
    // Scatter: guest IOVA page p lands on guest-physical page `scatter[p]`.
    let scatter = pages(N, N as usize);
    for p in 0..N {
        put(LEAF_TABLES + (p / 512) * PAGE, p % 512, encode(DATA + scatter[p as usize] * PAGE, 0, true, true));
    }

    let ctx = Arc::new(Context::with_config(ContextConfig::isolated(Limit::Pages(u64::MAX))));
    let ioas = ctx.ioas_alloc().unwrap();
    ctx.get(ioas).unwrap().set_huge_pages(false).unwrap();
    let dev = ctx.bind_device(DeviceInfo::new("bench", 1)).unwrap();
    // SAFETY: `ram` outlives the context.
    unsafe { ctx.map_user(ioas, ram.addr(), ram_len, Some(0), Perm::RW).unwrap() };
    let parent = ctx.hwpt_alloc(dev, ioas, HwptFlags { nest_parent: true, dirty_tracking: false }, None).unwrap();
    let nested = ctx.hwpt_alloc_nested(dev, parent, NestedData::vtd_s1(ROOT, 4), None).unwrap();
    let Ok(hwpt) = ctx.get(nested) else { panic!("not nested") };
    let order = pages(N, 8192);
    let guard = ioasid_engine::epoch::pin();

    // vm-memory's two steps for the same mappings: its IOTLB gives the
    // guest-physical page, its guest memory the host address.
    let mut t = Iotlb::new();
    for p in 0..N {
        let gpa = DATA + scatter[p as usize] * PAGE;
        t.set_mapping(GuestAddress(GIOVA + p * PAGE), GuestAddress(gpa), PAGE as usize, Permissions::ReadWrite)
            .unwrap();
    }
    let gm = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), ram_len as usize)]).unwrap();
    let (mut i, mut j) = (0, 0);
    h.compare(
        figure,
        iter("ioasid", "nested HWPT translate: guest table read through stage 2, result through stage 2", || {
            let host = hwpt.translate(GIOVA + order[i] * PAGE, Perm::R, None, &guard).unwrap().host.0;
            i = chain(i, host, order.len());
        }),
        iter("vm-memory Iotlb + GuestMemoryMmap", "`Iotlb::lookup` to guest-physical, then `get_host_address`", || {
            let gpa = vm_lookup(&t, GIOVA + order[j] * PAGE);
            let host = gm.get_host_address(GuestAddress(gpa)).unwrap() as u64;
            j = chain(j, host, order.len());
        }),
    );
}

fn working_set(h: &mut Harness) {
    const N: u64 = 1 << 16;
    if !h.wants("translate: working set") {
        return;
    }
    let mem = HostBuffer::new((N * PAGE) as usize).unwrap();
    let (_ctx, domain) = domain_with(&mem, N, false);
    let t = vm_iotlb(&mem, N);
    let guard = ioasid_engine::epoch::pin();
    for ws in [1u64, 64, 512, 4096, 65536] {
        let order = pages(ws, 8192);
        let (mut i, mut j) = (0, 0);
        h.compare_at(
            &format!("translate: working set (pages), {ws}"),
            Some(ws),
            iter("ioasid", "`Domain::translate` of random pages among the set, each waiting for the last", || {
                let host = domain.translate(IOVA + order[i] * PAGE, Perm::R, &guard).unwrap().host.0;
                i = chain(i, host, order.len());
            }),
            iter("vm-memory Iotlb", "`Iotlb::lookup` of the same pages in the same order", || {
                let host = vm_lookup(&t, IOVA + order[j] * PAGE);
                j = chain(j, host, order.len());
            }),
        );
    }
}

/// Translations per second from 1 and 2 threads at once on one domain, each
/// thread looking up random pages of 256 MiB independently of its results.
fn translate_threads(h: &mut Harness) {
    use std::sync::atomic::{AtomicU64, Ordering};
    const N: u64 = 1 << 16;
    if !h.wants("translate: throughput") {
        return;
    }
    let mem = HostBuffer::new((N * PAGE) as usize).unwrap();
    let (_ctx, domain) = domain_with(&mem, N, false);
    let t = RwLock::new(vm_iotlb(&mem, N));
    let order = pages(N, 8192);
    let iova = |k: u64| IOVA + order[k as usize % order.len()] * PAGE;
    // `n` translations split among `threads`, timed from the first thread's
    // start to the last one's end. The threads meet at a spinning barrier
    // first: a loaded machine can take milliseconds to run a new thread,
    // and that is not the translations' time.
    let spread = |threads: u64, n: u64, work: &(dyn Fn(std::iter::StepBy<std::ops::Range<u64>>) + Sync)| {
        let ready = AtomicU64::new(0);
        let spans: Vec<(Instant, Instant)> = std::thread::scope(|s| {
            let workers: Vec<_> = (0..threads)
                .map(|w| {
                    let ready = &ready;
                    s.spawn(move || {
                        ready.fetch_add(1, Ordering::AcqRel);
                        while ready.load(Ordering::Acquire) < threads {
                            std::hint::spin_loop();
                        }
                        let start = Instant::now();
                        work((w..n).step_by(threads as usize));
                        (start, Instant::now())
                    })
                })
                .collect();
            workers.into_iter().map(|w| w.join().unwrap()).collect()
        });
        let start = spans.iter().map(|s| s.0).min().unwrap();
        spans.iter().map(|s| s.1).max().unwrap() - start
    };
    for threads in [1u64, 2] {
        h.compare(
            &format!("translate: throughput, {threads} thread(s), random pages of 256 MiB (time per translation)"),
            timed("ioasid", "`Domain::translate` from each thread, one epoch pin per thread", |n| {
                spread(threads, n, &|ks| {
                    let guard = ioasid_engine::epoch::pin();
                    ks.for_each(|k| {
                        black_box(domain.translate(black_box(iova(k)), Perm::R, &guard).unwrap());
                    })
                })
            }),
            timed("vm-memory Iotlb under RwLock", "`Iotlb::lookup` under a read lock all threads share", |n| {
                spread(threads, n, &|ks| {
                    ks.for_each(|k| {
                        black_box(vm_lookup(&t.read().unwrap(), iova(k)));
                    })
                })
            }),
        );
    }
}

fn map_unmap(h: &mut Harness) {
    let ioas = IoasId::new(1);
    let figure = "map + unmap: 2 MiB as 512 pages of 4 KiB";
    if h.wants(figure) {
        let mem = HostBuffer::new(2 << 20).unwrap();
        let (ctx, _domain) = domain_with(&mem, 1, false);
        ctx.unmap(ioas, 0, u64::MAX).unwrap();
        h.compare(
            figure,
            iter("ioasid", "`map_user` of 2 MiB with huge pages off, then `unmap`", || {
                // SAFETY: `mem` outlives the context.
                unsafe { ctx.map_user(ioas, mem.addr(), 2 << 20, Some(IOVA), Perm::RW).unwrap() };
                ctx.unmap(ioas, IOVA, 2 << 20).unwrap()
            }),
            iter("vm-memory Iotlb", "512 `set_mapping`s of a page into a new Iotlb, one `invalidate_mapping`", || {
                let mut t = vm_iotlb(&mem, 512);
                t.invalidate_mapping(GuestAddress(IOVA), 2 << 20);
                t
            }),
        );
    }

    let figure = "map + unmap: 1 GiB as 2 MiB leaves";
    if h.wants(figure) {
        let mem = HostBuffer::new(1 << 30).unwrap();
        let (ctx, _domain) = domain_with(&mem, 1, true);
        ctx.unmap(ioas, 0, u64::MAX).unwrap();
        // The leaves need 2 MiB-aligned memory: map from the first aligned byte.
        let start = (mem.addr() + (2 << 20) - 1) & !((2 << 20) - 1);
        let len = (512u64 - 1) << 21;
        h.compare(
            figure,
            iter("ioasid", "`map_user` of 511 aligned 2 MiB pages in one call, then `unmap`", || {
                // SAFETY: `mem` outlives the context.
                unsafe { ctx.map_user(ioas, start, len, Some(IOVA), Perm::RW).unwrap() };
                ctx.unmap(ioas, IOVA, len).unwrap()
            }),
            iter("vm-memory Iotlb", "511 `set_mapping`s of 2 MiB into a new Iotlb, one `invalidate_mapping`", || {
                let mut t = Iotlb::new();
                for k in 0..511u64 {
                    let (iova, host) = (GuestAddress(IOVA + (k << 21)), GuestAddress(start + (k << 21)));
                    t.set_mapping(iova, host, 2 << 20, Permissions::ReadWrite).unwrap();
                }
                t.invalidate_mapping(GuestAddress(IOVA), len as usize);
                t
            }),
        );
    }
}

/// One 4 KiB map per call, the way a VMM maps a page the guest just handed
/// to a device: `BATCH` calls at consecutive IOVAs are timed, their unmap
/// (one call for all) is not.
fn map_one_page(h: &mut Harness) {
    const BATCH: u64 = 512;
    let figure = "map: one 4 KiB page through the library";
    if !h.wants(figure) {
        return;
    }
    let mem = HostBuffer::new((BATCH * PAGE) as usize).unwrap();
    let (ctx, _domain) = domain_with(&mem, 1, false);
    let ioas = IoasId::new(1);
    ctx.unmap(ioas, 0, u64::MAX).unwrap();
    let batches = |n: u64, map: &mut dyn FnMut(u64), unmap: &mut dyn FnMut(u64)| {
        let (mut spent, mut left) = (Duration::ZERO, n);
        while left > 0 {
            let k = left.min(BATCH);
            let t = Instant::now();
            (0..k).for_each(&mut *map);
            spent += t.elapsed();
            unmap(k);
            left -= k;
        }
        spent
    };
    let mut ours = |n| {
        batches(
            n,
            // SAFETY: `mem` outlives the context.
            &mut |p| unsafe {
                ctx.map_user(ioas, mem.addr() + p * PAGE, PAGE, Some(IOVA + p * PAGE), Perm::RW).unwrap();
            },
            &mut |k| ctx.unmap(ioas, IOVA, k * PAGE).map(drop).unwrap(),
        )
    };
    let does = "`Context::map_user` of one page at a fixed IOVA (unmap untimed)";
    let mut vm = Iotlb::new();
    h.compare(
        figure,
        timed("ioasid", does, &mut ours),
        timed("vm-memory Iotlb", "`Iotlb::set_mapping` of one page (invalidate untimed)", |n| {
            let vm = &RefCell::new(&mut vm);
            batches(
                n,
                &mut |p| {
                    let (iova, host) = (GuestAddress(IOVA + p * PAGE), GuestAddress(mem.addr() + p * PAGE));
                    vm.borrow_mut().set_mapping(iova, host, PAGE as usize, Permissions::ReadWrite).unwrap()
                },
                &mut |k| vm.borrow_mut().invalidate_mapping(GuestAddress(IOVA), (k * PAGE) as usize),
            )
        }),
    );
    let plain = PlainIoas::new();
    h.compare(
        figure,
        timed("ioasid", does, &mut ours),
        timed(PLAIN, "`PlainIoas::map` of one page: area, charge, 4 KiB leaf (unmap untimed)", |n| {
            batches(n, &mut |p| plain.map(IOVA + p * PAGE, mem.addr() + p * PAGE, PAGE, PAGE), &mut |k| {
                plain.unmap(IOVA, k * PAGE)
            })
        }),
    );
}

/// A side timing the map (`timing_map`) or else the unmap alone of
/// map-then-unmap rounds; what `map` returns goes to `unmap`.
fn one_half<'a, T>(
    timing_map: bool,
    mut map: impl FnMut() -> T + 'a,
    mut unmap: impl FnMut(T) + 'a,
) -> impl FnMut(u64) -> Duration + 'a {
    move |iters| {
        let mut spent = Duration::ZERO;
        for _ in 0..iters {
            let t = Instant::now();
            let made = map();
            let mapped = t.elapsed();
            let t = Instant::now();
            unmap(made);
            spent += if timing_map { mapped } else { t.elapsed() };
        }
        spent
    }
}

/// Batch map and unmap of 1 GiB in 4 KiB pages, timed apart: 262,144
/// entries each way.
fn map_unmap_gib(h: &mut Harness) {
    const N: u64 = 1 << 18;
    const LEN: u64 = N * PAGE;
    let ioas = IoasId::new(1);
    if h.wants("map: 1 GiB") || h.wants("unmap: 1 GiB") {
        let mem = HostBuffer::new(LEN as usize).unwrap();
        mem.write_at(0, &[1]); // one touch so both sides start alike
        let (ctx, _domain) = domain_with(&mem, 1, false);
        ctx.unmap(ioas, 0, u64::MAX).unwrap();
        let ours = |map: bool| {
            one_half(
                map,
                // SAFETY: `mem` outlives the context.
                || unsafe { ctx.map_user(ioas, mem.addr(), LEN, Some(IOVA), Perm::RW).unwrap() },
                |iova| {
                    ctx.unmap(ioas, iova, LEN).unwrap();
                },
            )
        };
        let theirs = |map: bool| {
            one_half(map, || vm_iotlb(&mem, N), |mut iotlb| iotlb.invalidate_mapping(GuestAddress(IOVA), LEN as usize))
        };
        h.compare(
            "map: 1 GiB as 262,144 pages of 4 KiB",
            timed("ioasid", "one `map_user` of 1 GiB with huge pages off (its unmap untimed)", ours(true)),
            timed("vm-memory Iotlb", "262,144 `set_mapping`s of a page into a new Iotlb", theirs(true)),
        );
        h.compare(
            "unmap: 1 GiB as 262,144 pages of 4 KiB",
            timed("ioasid", "one `unmap` of that 1 GiB (tables freed after the epoch's readers leave)", ours(false)),
            timed("vm-memory Iotlb", "one `invalidate_mapping` of the Iotlb built page by page", theirs(false)),
        );
        let plain = PlainIoas::new();
        let plain_side =
            |map: bool| one_half(map, || plain.map(IOVA, mem.addr(), LEN, PAGE), |()| plain.unmap(IOVA, LEN));
        h.compare(
            "map: 1 GiB as 262,144 pages of 4 KiB",
            timed("ioasid", "one `map_user` of 1 GiB with huge pages off (its unmap untimed)", ours(true)),
            timed(PLAIN, "`PlainIoas::map` of 1 GiB in 4 KiB leaves (its unmap untimed)", plain_side(true)),
        );
        h.compare(
            "unmap: 1 GiB as 262,144 pages of 4 KiB",
            timed("ioasid", "one `unmap` of that 1 GiB (tables freed after the epoch's readers leave)", ours(false)),
            timed(PLAIN, "`PlainIoas::unmap` of that 1 GiB: 262,144 leaves cleared", plain_side(false)),
        );
    }

    let figure = "map + unmap: 1 GiB as one 1 GiB leaf";
    if !h.wants(figure) {
        return;
    }
    // One 1 GiB leaf needs 1 GiB-aligned memory: map from the first aligned byte.
    let mem = HostBuffer::new(2 << 30).unwrap();
    let start = (mem.addr() + (1 << 30) - 1) & !((1 << 30) - 1);
    let (ctx, domain) = domain_with(&mem, 1, true);
    ctx.unmap(ioas, 0, u64::MAX).unwrap();
    // SAFETY: `mem` outlives the context.
    unsafe { ctx.map_user(ioas, start, 1 << 30, Some(IOVA), Perm::RW).unwrap() };
    assert_eq!(domain.summary().leaves[2], 1, "one 1 GiB leaf");
    ctx.unmap(ioas, IOVA, 1 << 30).unwrap();
    let mut ours = || {
        // SAFETY: `mem` outlives the context.
        unsafe { ctx.map_user(ioas, start, 1 << 30, Some(IOVA), Perm::RW).unwrap() };
        ctx.unmap(ioas, IOVA, 1 << 30).unwrap()
    };
    let does = "`map_user` of an aligned 1 GiB (one leaf), then `unmap`";
    h.compare(
        figure,
        iter("ioasid", does, &mut ours),
        iter("vm-memory Iotlb", "one `set_mapping` of 1 GiB into a new Iotlb, one `invalidate_mapping`", || {
            let mut t = Iotlb::new();
            t.set_mapping(GuestAddress(IOVA), GuestAddress(start), 1 << 30, Permissions::ReadWrite).unwrap();
            t.invalidate_mapping(GuestAddress(IOVA), 1 << 30);
            t
        }),
    );
    let plain = PlainIoas::new();
    h.compare(
        figure,
        iter("ioasid", does, &mut ours),
        iter(PLAIN, "`PlainIoas::map` of an aligned 1 GiB (one 1 GiB leaf), then `unmap`", || {
            plain.map(IOVA, start, 1 << 30, 1 << 30);
            plain.unmap(IOVA, 1 << 30);
        }),
    );
}

/// Page-table memory for 1 GiB mapped in 4 KiB and in 2 MiB pages, beside
/// the least a 4-level table of 512-entry tables can hold it in. Counted
/// from the table itself, so it is exact and needs no alternation.
fn page_table_memory(h: &mut Harness) {
    use ioasid_engine::pgtable::ENTRIES;
    let table = (ENTRIES * 8) as f64;
    for (label, shift) in [("4 KiB", 12u32), ("2 MiB", 21)] {
        let figure = format!("page-table memory per mapped GiB, {label} pages");
        if !h.wants(&figure) {
            continue;
        }
        let mem = HostBuffer::new((1 << 30) + (2 << 20)).unwrap();
        let start = (mem.addr() + (2 << 20) - 1) & !((2 << 20) - 1);
        let (ctx, domain) = domain_with(&mem, 1, shift > 12);
        ctx.unmap(IoasId::new(1), 0, u64::MAX).unwrap();
        // SAFETY: `mem` outlives the context.
        unsafe { ctx.map_user(IoasId::new(1), start, 1 << 30, Some(IOVA), Perm::RW).unwrap() };
        let s = domain.summary();
        assert_eq!(s.leaves.iter().sum::<u64>(), 1 << (30 - shift), "{label} leaves");
        // Each table is a page of the pool's (dirty bits take memory only
        // once dirty tracking writes them); `tests/pgtable_memory.rs`
        // checks the resident memory a mapped gigabyte really adds.
        let ours = s.tables.iter().sum::<u64>() as f64 * table;
        // Leaves fill tables of 512 entries; each level up needs a table
        // per 512 below, up to the one root at level 3.
        let (mut entries, mut floor) = (1u64 << (30 - shift), 0);
        for _ in (shift - 12) / 9..4 {
            entries = entries.div_ceil(ENTRIES as u64);
            floor += entries;
        }
        let floor = floor as f64 * table;
        h.record(
            &figure,
            None,
            "bytes",
            (
                "ioasid",
                "tables of the domain's VT-d 4-level page table after one `map_user` of 1 GiB, 4 KiB each",
                &[ours],
                None,
            ),
            ("4-level floor", "full leaf tables and one table per level above them", &[floor], None),
        );
    }
}

/// `IOMMU_HWPT_GET_DIRTY_BITMAP`'s work for 1 GiB of 4 KiB pages, every one
/// dirty: take the leaf tables' dirty bits, fill a bitmap.
fn dirty_bitmap(h: &mut Harness) {
    const N: u64 = 1 << 18;
    let figure = "dirty bitmap: read and clear 1 GiB of 4 KiB pages, all dirty";
    if !h.wants(figure) {
        return;
    }
    let mem = HostBuffer::new((N * PAGE) as usize).unwrap();
    let ctx = Arc::new(Context::with_config(ContextConfig::isolated(Limit::Pages(u64::MAX))));
    let ioas = ctx.ioas_alloc().unwrap();
    ctx.get(ioas).unwrap().set_huge_pages(false).unwrap();
    let dev = ctx.bind_device(DeviceInfo { dirty_tracking: true, ..DeviceInfo::new("bench", 1) }).unwrap();
    let hwpt_id = ctx.hwpt_alloc(dev, ioas, HwptFlags { nest_parent: false, dirty_tracking: true }, None).unwrap();
    // SAFETY: `mem` outlives the context.
    unsafe { ctx.map_user(ioas, mem.addr(), N * PAGE, Some(IOVA), Perm::RW).unwrap() };
    let hwpt = ctx.get(hwpt_id).unwrap();
    hwpt.set_dirty_tracking(true).unwrap();
    let range = IovaRange::new(IOVA, IOVA + N * PAGE - 1);
    let dirty_all = || (0..N).for_each(|p| assert!(hwpt.domain().mark_dirty(IOVA + p * PAGE)));
    let mut bitmap = vec![0u64; (N / 64) as usize];
    let mut read_and_clear = || {
        // Runs of dirty pages fill the bitmap a word at a time: the words
        // a run covers whole are one fill, its ends a mask each.
        hwpt.read_and_clear_dirty(range, false, &mut |start, size| {
            let (first, end) = (((start - IOVA) / PAGE) as usize, ((start - IOVA + size) / PAGE) as usize);
            let (w0, w1) = (first / 64, end / 64);
            let head = u64::MAX << (first % 64);
            let tail = (1u64 << (end % 64)).wrapping_sub(1);
            if w0 == w1 {
                bitmap[w0] |= head & tail;
                return;
            }
            bitmap[w0] |= head;
            bitmap[w0 + 1..w1].fill(u64::MAX);
            if tail != 0 {
                bitmap[w1] |= tail;
            }
        })
        .unwrap()
    };
    dirty_all();
    read_and_clear();
    // rust-vmm's dirty log: one bit per page in a flat atomic bitmap.
    let log = vm_memory::bitmap::AtomicBitmap::new((N * PAGE) as usize, std::num::NonZeroUsize::new(4096).unwrap());
    h.compare(
        figure,
        timed("ioasid", "`read_and_clear_dirty` over the page table into a bitmap (dirtying untimed)", |n| {
            let mut spent = Duration::ZERO;
            for _ in 0..n {
                dirty_all();
                let t = Instant::now();
                read_and_clear();
                spent += t.elapsed();
            }
            spent
        }),
        timed("vm-memory AtomicBitmap", "`get_and_reset` of a flat bitmap, one bit per page (filling untimed)", |n| {
            let mut spent = Duration::ZERO;
            for _ in 0..n {
                log.set_addr_range(0, (N * PAGE) as usize);
                let t = Instant::now();
                black_box(log.get_and_reset());
                spent += t.elapsed();
            }
            spent
        }),
    );
    assert!(bitmap.iter().all(|w| *w == u64::MAX), "every page was reported");
}

fn dma(h: &mut Harness) {
    let mem = HostBuffer::new(64 * PAGE as usize).unwrap();
    let (ctx, _domain) = domain_with(&mem, 64, false);
    let dev = ctx.get(DeviceId::new(2)).unwrap();
    let t = vm_iotlb(&mem, 64);
    let (mut ours, mut theirs) = ([0u8; 64], [0u8; 64]);
    h.compare(
        "DMA: 64-byte read through the IOMMU",
        iter("ioasid", "`Device::dma_read` of 64 bytes: IOTLB hit, then the copy", || {
            dev.dma_read(black_box(IOVA + 3 * PAGE + 8), &mut ours).unwrap()
        }),
        iter("vm-memory Iotlb", "`Iotlb::lookup`, then a 64-byte copy from the host address", || {
            let host = vm_lookup(&t, black_box(IOVA + 3 * PAGE + 8));
            mem.read_at((host - mem.addr()) as usize, &mut theirs);
        }),
    );
}

/// vm-memory's `Iommu` as a device model writes it by hand: an `Iotlb`
/// behind a lock, filled in advance.
#[derive(Debug)]
struct VmIotlb(std::sync::RwLock<Iotlb>);

impl vm_memory::iommu::Iommu for VmIotlb {
    type IotlbGuard<'a> = std::sync::RwLockReadGuard<'a, Iotlb>;

    fn translate(
        &self,
        iova: GuestAddress,
        length: usize,
        access: Permissions,
    ) -> Result<vm_memory::iommu::IotlbIterator<Self::IotlbGuard<'_>>, vm_memory::iommu::Error> {
        lookup_or_fail(self.0.read().unwrap(), iova, length, access)
    }
}

/// `Iotlb::lookup` as a hand-written `Iommu` answers with it.
fn lookup_or_fail<D: std::ops::Deref<Target = Iotlb>>(
    iotlb: D,
    iova: GuestAddress,
    length: usize,
    access: Permissions,
) -> Result<vm_memory::iommu::IotlbIterator<D>, vm_memory::iommu::Error> {
    Iotlb::lookup(iotlb, iova, length, access).map_err(|_| vm_memory::iommu::Error::CannotResolve {
        iova_range: vm_memory::iommu::IovaRange { base: iova, length },
        reason: "not mapped".into(),
    })
}

/// An `Iotlb` read with no synchronization at all: what any `Iommu` costs
/// `IommuMemory` at the least, since `translate` must return an iterator
/// over an `Iotlb`. Not usable against a concurrent unmap; the floor.
#[derive(Debug)]
struct BareIotlb(Iotlb);

impl vm_memory::iommu::Iommu for BareIotlb {
    type IotlbGuard<'a> = &'a Iotlb;

    fn translate(
        &self,
        iova: GuestAddress,
        length: usize,
        access: Permissions,
    ) -> Result<vm_memory::iommu::IotlbIterator<Self::IotlbGuard<'_>>, vm_memory::iommu::Error> {
        lookup_or_fail(&self.0, iova, length, access)
    }
}

/// The same 64-byte DMA through vm-memory's `IommuMemory`, the front end
/// rust-vmm device models use, over ioasid's `IommuPort`, over a plain
/// locked `Iotlb`, and over an `Iotlb` with no lock (the floor).
fn iommu_memory(h: &mut Harness) {
    use ioasid_engine::vm_memory_iommu::IommuPort;
    use vm_memory::Bytes;
    use vm_memory::iommu::IommuMemory;
    const N: u64 = 64;
    let ram = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), (N * PAGE) as usize)]).unwrap();
    let host = ram.iter().next().unwrap().as_ptr() as u64;
    let ctx = Context::with_config(ContextConfig::isolated(Limit::Pages(u64::MAX)));
    let ioas = ctx.ioas_alloc().unwrap();
    let dev = ctx.bind_device(DeviceInfo::new("bench", 1)).unwrap();
    ctx.attach(dev, ioas).unwrap();
    // SAFETY: `ram` outlives the context.
    unsafe { ctx.map_user(ioas, host, N * PAGE, Some(IOVA), Perm::RW).unwrap() };
    let ours = IommuMemory::new(ram.clone(), IommuPort::for_memory(ctx.get(dev).unwrap(), None, &ram), true, ());
    let iotlb = || {
        let mut t = Iotlb::new();
        t.set_mapping(GuestAddress(IOVA), GuestAddress(0), (N * PAGE) as usize, Permissions::ReadWrite).unwrap();
        t
    };
    let theirs = IommuMemory::new(ram.clone(), VmIotlb(RwLock::new(iotlb())), true, ());
    let floor = IommuMemory::new(ram.clone(), BareIotlb(iotlb()), true, ());
    let (mut buf, mut buf2) = ([0u8; 64], [0u8; 64]);
    let at = GuestAddress(IOVA + 3 * PAGE + 8);
    let figure = "DMA: 64-byte read through vm-memory's IommuMemory";
    let does = "`IommuMemory::read_slice` over ioasid's `IommuPort`";
    h.compare(
        figure,
        iter("ioasid", does, || ours.read_slice(&mut buf, black_box(at)).unwrap()),
        iter("vm-memory Iotlb under RwLock", "`IommuMemory::read_slice` over an `Iotlb` behind a `RwLock`", || {
            theirs.read_slice(&mut buf2, black_box(at)).unwrap()
        }),
    );
    h.compare(
        figure,
        iter("ioasid", does, || ours.read_slice(&mut buf, black_box(at)).unwrap()),
        iter(
            "vm-memory Iotlb, no lock (the floor)",
            "`IommuMemory::read_slice` over an `Iotlb` read with no synchronization, unsafe against an unmap",
            || floor.read_slice(&mut buf2, black_box(at)).unwrap(),
        ),
    );
}

fn answer_everything(
    queue: &Arc<ioasid_engine::FaultQueue>,
) -> (Arc<std::sync::atomic::AtomicBool>, std::thread::JoinHandle<()>) {
    use ioasid_engine::fault::Response;
    use std::sync::atomic::{AtomicBool, Ordering};
    let stop = Arc::new(AtomicBool::new(false));
    let handler = {
        let (queue, stop) = (queue.clone(), stop.clone());
        std::thread::spawn(move || {
            // As the fault fd's handler does: read lends what waits, and
            // the answers go under one hold of the lock.
            let mut cookies = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                if queue.wait_for_requests(Duration::from_millis(10)) {
                    cookies.clear();
                    cookies.extend(queue.lend(usize::MAX).unwrap().iter().map(|(c, _)| c));
                    let mut responses = queue.responses();
                    for &cookie in &cookies {
                        responses.answer(cookie, Response::Success).unwrap();
                    }
                }
            }
        })
    };
    (stop, handler)
}

fn fault_round_trip(h: &mut Harness) {
    use ioasid_engine::fault::{Batch, Group, LAST_PAGE, PageRequest};
    use std::sync::atomic::Ordering;
    use std::sync::mpsc;
    const BATCH: usize = 64;
    const SINGLE: &str = "fault round trip: request, handler wakes, answer, device wakes";
    const BATCHED: &str = "fault round trip: 64 requests answered in a batch";
    // Either figure alone can be asked for (`-- batch`).
    if !h.wants(SINGLE) && !h.wants(BATCHED) {
        return;
    }
    let queue = ioasid_engine::FaultQueue::new();
    let (stop, handler) = answer_everything(&queue);
    let request = PageRequest { flags: LAST_PAGE, dev_id: 1, pasid: 0, grpid: 0, perm: 2, addr: IOVA };
    // The least any cross-thread request and answer can cost here.
    let (to_handler, requests) = mpsc::channel::<u64>();
    let (to_device, answers) = mpsc::channel::<u64>();
    let echo = std::thread::spawn(move || {
        while let Ok(v) = requests.recv() {
            if to_device.send(v).is_err() {
                break;
            }
        }
    });
    h.compare(
        SINGLE,
        iter("ioasid", "report one awaited page request; a handler thread answers it; the device wakes", || {
            let (group, waiter) = Group::awaited(vec![request.clone()]);
            queue.report(group);
            waiter.wait()
        }),
        iter("std mpsc ping-pong", "one value to an echo thread and back over two channels", || {
            to_handler.send(1).unwrap();
            answers.recv().unwrap()
        }),
    );
    // Batched: 64 requests in flight, the handler takes whatever is waiting.
    let mut batch = Batch::new();
    h.compare(
        BATCHED,
        iter(
            "ioasid",
            "report 64 awaited requests as one batch, then wait for all; the handler drains what is queued and \
             answers each by its cookie",
            || {
                let mut reports = queue.report_batch(&mut batch);
                for _ in 0..BATCH {
                    reports.report(std::slice::from_ref(&request));
                }
                drop(reports);
                batch.wait().success
            },
        ),
        iter("std mpsc ping-pong", "64 values sent to the echo thread, then 64 received", || {
            for _ in 0..BATCH {
                to_handler.send(1).unwrap();
            }
            (0..BATCH).map(|_| answers.recv().unwrap()).sum::<u64>()
        }),
    );
    stop.store(true, Ordering::Relaxed);
    handler.join().unwrap();
    drop(to_handler);
    echo.join().unwrap();
}

/// An object table a VMM would write by hand: objects by ID under a lock,
/// the lowest free ID kept in a set of freed IDs below a high-water mark.
#[derive(Default)]
struct PlainTable(std::sync::Mutex<PlainIds>);

#[derive(Default)]
struct PlainIds {
    objects: std::collections::BTreeMap<u32, Arc<Ioas>>,
    free: std::collections::BTreeSet<u32>,
    top: u32,
}

impl PlainTable {
    fn insert(&self, obj: Arc<Ioas>) -> u32 {
        let mut t = self.0.lock().unwrap();
        let id = t.free.pop_first().unwrap_or(t.top + 1);
        t.top = t.top.max(id);
        t.objects.insert(id, obj);
        id
    }
    fn remove(&self, id: u32) -> Option<Arc<Ioas>> {
        let mut t = self.0.lock().unwrap();
        let obj = t.objects.remove(&id)?;
        t.free.insert(id);
        Some(obj)
    }
}

/// Allocating an object ID in a context that already holds 100 k objects,
/// with a hole in the middle (Linux's xarray hands out the lowest free ID).
fn object_ids(h: &mut Harness) {
    const LIVE: u32 = 100_000;
    let figure = "objects: IOAS alloc + destroy, 100 k live";
    if !h.wants(figure) {
        return;
    }
    let ctx = Context::with_config(ContextConfig::isolated(Limit::Pages(u64::MAX)));
    for _ in 0..LIVE {
        ctx.ioas_alloc().unwrap();
    }
    ctx.destroy(IoasId::new(LIVE / 2)).unwrap();
    let plain = PlainTable::default();
    for _ in 0..LIVE {
        plain.insert(Arc::new(Ioas::new()));
    }
    plain.remove(LIVE / 2);
    h.compare(
        figure,
        iter("ioasid", "`ioas_alloc` (lowest free ID, the hole) and `destroy` of it", || {
            let id = ctx.ioas_alloc().unwrap();
            ctx.destroy(black_box(id)).unwrap();
        }),
        iter("Mutex<BTreeMap> + free set", "a new `Ioas` inserted at the lowest free ID and removed", || {
            let id = plain.insert(Arc::new(Ioas::new()));
            black_box(plain.remove(black_box(id)));
        }),
    );
}

/// A one-page map at an IOVA the IOAS chooses, and its unmap, in an IOAS
/// holding 100 k one-page areas with a hole in the middle: the lowest hole
/// that fits is the answer, as Linux's.
fn map_anywhere(h: &mut Harness) {
    const LIVE: u64 = 100_000;
    let figure = "map + unmap: one page at an IOVA the IOAS chooses, 100 k areas, a hole among them";
    if !h.wants(figure) {
        return;
    }
    let mem = HostBuffer::new(PAGE as usize).unwrap();
    let (ctx, _domain) = domain_with(&mem, 1, false);
    let ioas = IoasId::new(1);
    ctx.unmap(ioas, 0, u64::MAX).unwrap();
    let plain = PlainIoas::new();
    let mut iovas = Vec::new();
    for _ in 0..LIVE {
        // SAFETY: `mem` outlives the context.
        iovas.push(unsafe { ctx.map_user(ioas, mem.addr(), PAGE, None, Perm::RW).unwrap() });
        plain.map_anywhere(mem.addr(), PAGE);
    }
    let hole = iovas[LIVE as usize / 2];
    ctx.unmap(ioas, hole, PAGE).unwrap();
    plain.unmap(hole, PAGE);
    h.compare(
        figure,
        iter("ioasid", "`map_user` of one page with no IOVA given (it gets the hole), then `unmap`", || {
            // SAFETY: `mem` outlives the context.
            let iova = unsafe { ctx.map_user(ioas, mem.addr(), PAGE, None, Perm::RW).unwrap() };
            ctx.unmap(ioas, black_box(iova), PAGE).unwrap()
        }),
        iter(PLAIN, "`PlainIoas::map_anywhere`: the holes searched from the bottom, as Linux's; then `unmap`", || {
            let iova = plain.map_anywhere(mem.addr(), PAGE);
            plain.unmap(black_box(iova), PAGE)
        }),
    );
}

/// The allocator a VMM would write by hand: a lock around a set of free IDs.
struct PlainAllocator(std::sync::Mutex<std::collections::BTreeSet<u32>>);

impl PlainAllocator {
    fn new(width: u32) -> Self {
        PlainAllocator(std::sync::Mutex::new((1..1u32 << width).collect()))
    }
    fn alloc(&self) -> Option<u32> {
        self.0.lock().unwrap().pop_first()
    }
    fn free(&self, id: u32) {
        self.0.lock().unwrap().insert(id);
    }
}

fn pasid(h: &mut Harness) {
    use ioasid_engine::ioasid_set::PasidSpace;
    if h.wants("PASID: alloc + free") {
        let space = PasidSpace::new(20).unwrap();
        let set = space.create_set(None, 1 << 20).unwrap();
        let plain = PlainAllocator::new(20);
        h.compare(
            "PASID: alloc + free",
            iter("ioasid", "`PasidSpace::alloc` in a set under its quota, then `free`", || {
                let p = space.alloc(set, 1, u32::MAX, 7).unwrap();
                space.free(set, p).unwrap();
            }),
            iter("Mutex<BTreeSet>", "the lowest ID taken from a locked free set, then put back", || {
                let p = plain.alloc().unwrap();
                plain.free(p);
            }),
        );
    }
    h.compare(
        "PASID: exhaust and release all 2^20",
        iter("ioasid", "a new space and set, `alloc` until it fails, `destroy_set`", || {
            let space = PasidSpace::new(20).unwrap();
            let set = space.create_set(None, 1 << 20).unwrap();
            while space.alloc(set, 1, u32::MAX, 0).is_ok() {}
            space.destroy_set(set).unwrap();
        }),
        iter("Mutex<BTreeSet>", "a new full free set, every ID taken, then every ID put back", || {
            let plain = PlainAllocator::new(20);
            let mut ids = Vec::with_capacity(1 << 20);
            while let Some(p) = plain.alloc() {
                ids.push(p);
            }
            for p in ids {
                plain.free(p);
            }
        }),
    );
}

/// One side of the unmap-under-translation race: a map, an unmap, and a
/// device write through the current mapping.
trait Dma: Send + Sync {
    fn map(&self, buf: &HostBuffer);
    fn unmap(&self);
    fn write(&self, iova: u64, word: u64) -> bool;
}

const RACE_PAGES: u64 = 16;

struct Engine {
    ctx: Arc<Context>,
    ioas: IoasId,
    device: Arc<ioasid_engine::Device>,
}

impl Dma for Engine {
    fn map(&self, buf: &HostBuffer) {
        // SAFETY: the race keeps both buffers alive until it has joined its
        // threads and dropped the context.
        unsafe { self.ctx.map_user(self.ioas, buf.addr(), RACE_PAGES * PAGE, Some(IOVA), Perm::RW).unwrap() };
    }
    fn unmap(&self) {
        self.ctx.unmap(self.ioas, IOVA, RACE_PAGES * PAGE).unwrap();
    }
    fn write(&self, iova: u64, word: u64) -> bool {
        self.device.dma_write(iova, &word.to_le_bytes()).is_ok()
    }
}

/// How a device model uses vm-memory's IOMMU support: the `Iotlb` looked up
/// under its lock, the memory accessed after it is released.
impl Dma for VmIotlb {
    fn map(&self, buf: &HostBuffer) {
        vm_map(&mut self.0.write().unwrap(), buf, RACE_PAGES);
    }
    fn unmap(&self) {
        self.0.write().unwrap().invalidate_mapping(GuestAddress(IOVA), (RACE_PAGES * PAGE) as usize);
    }
    fn write(&self, iova: u64, word: u64) -> bool {
        let host = match Iotlb::lookup(&*self.0.read().unwrap(), GuestAddress(iova), 8, Permissions::Write) {
            Ok(mut m) => m.next().unwrap().base.0,
            Err(_) => return false,
        };
        // SAFETY: `host` is in one of the race's two buffers, which outlive
        // the writer thread; a stale write is what the race counts.
        unsafe { (host as *mut u64).write_volatile(word) };
        true
    }
}

struct RaceResult {
    p50: f64,
    p99: f64,
    stale: u32,
    rounds: u32,
    writes: u64,
}

/// A writer thread DMAs continuously into a 16-page mapping while this
/// thread maps and unmaps it, alternating two buffers; each unmap is timed.
/// A buffer that changed after its unmap returned counts as stale.
fn race(side: Arc<dyn Dma>, rounds: u32) -> RaceResult {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let bufs = [0, 1].map(|_| HostBuffer::new((RACE_PAGES * PAGE) as usize).unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    let writes = Arc::new(AtomicU64::new(0));
    let writer = {
        let (side, stop, writes) = (side.clone(), stop.clone(), writes.clone());
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                if side.write(IOVA + (n % RACE_PAGES) * PAGE + 8 * (n % 64), n) {
                    writes.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    let snapshot = |b: &HostBuffer| {
        let mut v = vec![0u8; b.len()];
        b.read_at(0, &mut v);
        v
    };
    let mut after_unmap: [Option<Vec<u8>>; 2] = [None, None];
    let mut stale = 0;
    let mut times = Vec::with_capacity(rounds as usize);
    for r in 0..rounds as usize {
        let k = r % 2;
        if after_unmap[k].take().is_some_and(|seen| seen != snapshot(&bufs[k])) {
            stale += 1;
        }
        side.map(&bufs[k]);
        // Let the writer find the mapping and cache it before it goes.
        let before = writes.load(Ordering::Relaxed);
        while writes.load(Ordering::Relaxed) < before + 64 {
            std::hint::spin_loop();
        }
        let t = std::time::Instant::now();
        side.unmap();
        times.push(t.elapsed().as_nanos() as f64);
        after_unmap[k] = Some(snapshot(&bufs[k]));
    }
    std::thread::sleep(Duration::from_millis(1));
    for k in 0..2 {
        if after_unmap[k].take().is_some_and(|seen| seen != snapshot(&bufs[k])) {
            stale += 1;
        }
    }
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    times.sort_by(f64::total_cmp);
    let at = |q: f64| times[((times.len() - 1) as f64 * q) as usize];
    RaceResult { p50: at(0.5), p99: at(0.99), stale, rounds, writes: writes.load(Ordering::Relaxed) }
}

/// What an unmap costs with no other thread in the epoch (p50), and what
/// the grace period's `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED)` costs
/// while a thread DMAs on another CPU (p50): the two parts of an unmap
/// under concurrent translation.
fn unmap_parts(side: &Arc<dyn Dma>) -> (f64, f64) {
    use std::sync::atomic::{AtomicBool, Ordering};
    let buf = HostBuffer::new((RACE_PAGES * PAGE) as usize).unwrap();
    let p50 = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let alone = p50((0..2000)
        .map(|_| {
            side.map(&buf);
            let t = Instant::now();
            side.unmap();
            t.elapsed().as_nanos() as f64
        })
        .collect());
    side.map(&buf);
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (side, stop) = (side.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                side.write(IOVA + (n % RACE_PAGES) * PAGE, n);
            }
        })
    };
    std::thread::sleep(Duration::from_millis(2));
    use rustix::thread::{MembarrierCommand, membarrier};
    let barrier = p50((0..2000)
        .map(|_| {
            let t = Instant::now();
            membarrier(MembarrierCommand::PrivateExpedited).unwrap();
            t.elapsed().as_nanos() as f64
        })
        .collect());
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    side.unmap();
    (alone, barrier)
}

/// One side's races over all alternations: each alternation's p50 and p99,
/// and the stale rounds, rounds and device writes of all of them.
#[derive(Default)]
struct RaceTally {
    p50: Vec<f64>,
    p99: Vec<f64>,
    stale: u32,
    rounds: u32,
    writes: u64,
    /// Grace periods' barriers during the rounds (ioasid's side only).
    barriers: u64,
}

/// Unmap latency under concurrent translation: the race above, ioasid's and
/// the peer's in alternation. Each alternation gives both sides' p50 and
/// p99 over its rounds; stale writes are summed over all of them.
fn unmap_under_translation(h: &mut Harness) {
    if !h.wants("unmap under concurrent translation") {
        return;
    }
    let rounds = if h.quick() { 200 } else { 1000 };
    let ctx = Arc::new(Context::with_config(ContextConfig::isolated(Limit::Pages(u64::MAX))));
    let ioas = ctx.ioas_alloc().unwrap();
    ctx.get(ioas).unwrap().set_huge_pages(false).unwrap();
    let dev = ctx.bind_device(DeviceInfo::new("bench", 1)).unwrap();
    ctx.attach(dev, ioas).unwrap();
    let device = ctx.get(dev).unwrap();
    let sides: [Arc<dyn Dma>; 2] =
        [Arc::new(Engine { ctx, ioas, device }), Arc::new(VmIotlb(RwLock::new(Iotlb::new())))];
    let mut seen: [RaceTally; 2] = Default::default();
    for _ in 0..h.alternations() {
        for (side, seen) in sides.iter().zip(&mut seen) {
            let barriers = ioasid_engine::epoch::barriers();
            let r = race(side.clone(), rounds);
            seen.barriers += ioasid_engine::epoch::barriers() - barriers;
            seen.p50.push(r.p50);
            seen.p99.push(r.p99);
            seen.stale += r.stale;
            seen.rounds += r.rounds;
            seen.writes += r.writes;
        }
    }
    let (alone, barrier) = unmap_parts(&sides[0]);
    let extra = |s: &RaceTally| {
        Some(format!(
            r#""stale": {}, "rounds": {}, "writes": {}, "alone": {alone}, "barrier": {barrier}, "barriers": {}"#,
            s.stale, s.rounds, s.writes, s.barriers
        ))
    };
    let ours = "`unmap` of 16 mapped pages while a thread DMAs into them with `Device::dma_write`";
    let peer = "`invalidate_mapping` under the write lock while a thread looks up under the read lock, writes after";
    let [a, b] = &seen;
    for (q, va, vb) in [("p50", &a.p50, &b.p50), ("p99", &a.p99, &b.p99)] {
        h.record(
            &format!("unmap under concurrent translation (16 pages), {q}"),
            None,
            "ns",
            ("ioasid", ours, va, extra(a)),
            ("vm-memory Iotlb under RwLock", peer, vb, extra(b)),
        );
    }
}

fn main() {
    let mut h = Harness::new("engine");
    let benches: [fn(&mut Harness); 17] = [
        iotlb_hit,
        page_walk,
        nested_walk,
        working_set,
        translate_threads,
        map_one_page,
        map_unmap,
        map_unmap_gib,
        page_table_memory,
        dma,
        iommu_memory,
        dirty_bitmap,
        fault_round_trip,
        pasid,
        object_ids,
        map_anywhere,
        unmap_under_translation,
    ];
    for bench in benches {
        bench(&mut h);
    }
}
