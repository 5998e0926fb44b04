//! Engine benchmarks, each beside a peer measured in the same run
//! (vm-memory 0.18's IOMMU support on the same mappings). `benches/run.sh`
//! runs them and writes BENCHMARKS.md.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use ioasid_engine::pgtable::x86::VtdSs4;
use ioasid_engine::pgtable::{PageTable, Perm};
use ioasid_engine::{Context, ContextConfig, DeviceInfo, Domain, HostBuffer, Limit};
use vm_memory::iommu::Iotlb;
use vm_memory::{GuestAddress, Permissions};

const PAGE: u64 = 4096;
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
        ctx.ioas(ioas).unwrap().set_huge_pages(false).unwrap();
    }
    let dev = ctx.bind_device(DeviceInfo::new("bench", 1)).unwrap();
    let hwpt = ctx.attach(dev, ioas).unwrap();
    // SAFETY: `mem` outlives the context in every benchmark.
    unsafe { ctx.map_user(ioas, mem.addr(), n * PAGE, Some(IOVA), Perm::RW).unwrap() };
    let domain = ctx.hwpt(hwpt).unwrap().domain().clone();
    (ctx, domain)
}

/// vm-memory's IOTLB holding the same mappings, one per page.
fn vm_iotlb(mem: &HostBuffer, n: u64) -> Iotlb {
    let mut t = Iotlb::new();
    for p in 0..n {
        t.set_mapping(
            GuestAddress(IOVA + p * PAGE),
            GuestAddress(mem.addr() + p * PAGE),
            PAGE as usize,
            Permissions::ReadWrite,
        )
        .unwrap();
    }
    t
}

fn vm_lookup(t: &Iotlb, iova: u64) -> u64 {
    Iotlb::lookup(t, GuestAddress(iova), 8, Permissions::Read).unwrap().next().unwrap().base.0
}

fn iotlb_hit(c: &mut Criterion) {
    let mem = HostBuffer::new(PAGE as usize).unwrap();
    let (_ctx, domain) = domain_with(&mem, 1, false);
    let guard = ioasid_engine::epoch::pin();
    let mut g = c.benchmark_group("translate: IOTLB hit, one 4 KiB page");
    g.bench_function("ioasid", |b| b.iter(|| domain.translate(black_box(IOVA + 64), Perm::R, &guard).unwrap()));
    let t = vm_iotlb(&mem, 1);
    g.bench_function("vm-memory Iotlb", |b| b.iter(|| vm_lookup(&t, black_box(IOVA + 64))));
    g.finish();
}

fn page_walk(c: &mut Criterion) {
    const N: u64 = 1 << 18; // 1 GiB of 4 KiB pages
    let mem = HostBuffer::new((N * PAGE) as usize).unwrap();
    let pt = PageTable::<VtdSs4>::new();
    pt.map(IOVA, mem.addr(), N * PAGE, Perm::RW, false, false).unwrap();
    let order = pages(N, 4096);
    let guard = ioasid_engine::epoch::pin();
    let mut g = c.benchmark_group("translate: page walk (no IOTLB), random page of 1 GiB in 4 KiB pages");
    let mut i = 0;
    g.bench_function("ioasid", |b| {
        b.iter(|| {
            let host = pt.walk(IOVA + order[i] * PAGE, &guard).unwrap().addr;
            i = chain(i, host, order.len());
        })
    });
    let t = vm_iotlb(&mem, N);
    let mut i = 0;
    g.bench_function("vm-memory Iotlb", |b| {
        b.iter(|| {
            let host = vm_lookup(&t, IOVA + order[i] * PAGE);
            i = chain(i, host, order.len());
        })
    });
    g.finish();
}

fn working_set(c: &mut Criterion) {
    const N: u64 = 1 << 16;
    let mem = HostBuffer::new((N * PAGE) as usize).unwrap();
    let (_ctx, domain) = domain_with(&mem, N, false);
    let t = vm_iotlb(&mem, N);
    let guard = ioasid_engine::epoch::pin();
    let mut g = c.benchmark_group("translate: working set (pages)");
    for ws in [1u64, 64, 512, 4096, 65536] {
        let order = pages(ws, 8192);
        let mut i = 0;
        g.bench_with_input(BenchmarkId::new("ioasid", ws), &ws, |b, _| {
            b.iter(|| {
                let (host, _) = domain.translate(IOVA + order[i] * PAGE, Perm::R, &guard).unwrap();
                i = chain(i, host, order.len());
            })
        });
        let mut i = 0;
        g.bench_with_input(BenchmarkId::new("vm-memory Iotlb", ws), &ws, |b, _| {
            b.iter(|| {
                let host = vm_lookup(&t, IOVA + order[i] * PAGE);
                i = chain(i, host, order.len());
            })
        });
    }
    g.finish();
}

fn map_unmap(c: &mut Criterion) {
    let mut g = c.benchmark_group("map + unmap: 2 MiB as 512 pages of 4 KiB");
    let mem = HostBuffer::new(2 << 20).unwrap();
    let (ctx, _domain) = domain_with(&mem, 1, false);
    let ioas = 1;
    ctx.unmap(ioas, 0, u64::MAX).unwrap();
    g.bench_function("ioasid", |b| {
        b.iter(|| {
            // SAFETY: `mem` outlives the context.
            unsafe { ctx.map_user(ioas, mem.addr(), 2 << 20, Some(IOVA), Perm::RW).unwrap() };
            ctx.unmap(ioas, IOVA, 2 << 20).unwrap()
        })
    });
    g.bench_function("vm-memory Iotlb", |b| {
        b.iter(|| {
            let mut t = vm_iotlb(&mem, 512);
            t.invalidate_mapping(GuestAddress(IOVA), 2 << 20);
            t
        })
    });
    g.finish();

    let mut g = c.benchmark_group("map + unmap: 1 GiB as 2 MiB leaves");
    let mem = HostBuffer::new(1 << 30).unwrap();
    let (ctx, _domain) = domain_with(&mem, 1, true);
    ctx.unmap(ioas, 0, u64::MAX).unwrap();
    // The leaves need 2 MiB-aligned memory: map from the first aligned byte.
    let start = (mem.addr() + (2 << 20) - 1) & !((2 << 20) - 1);
    let len = (512u64 - 1) << 21;
    g.bench_function("ioasid", |b| {
        b.iter(|| {
            // SAFETY: `mem` outlives the context.
            unsafe { ctx.map_user(ioas, start, len, Some(IOVA), Perm::RW).unwrap() };
            ctx.unmap(ioas, IOVA, len).unwrap()
        })
    });
    g.bench_function("vm-memory Iotlb", |b| {
        b.iter(|| {
            let mut t = Iotlb::new();
            for k in 0..511u64 {
                t.set_mapping(
                    GuestAddress(IOVA + (k << 21)),
                    GuestAddress(start + (k << 21)),
                    2 << 20,
                    Permissions::ReadWrite,
                )
                .unwrap();
            }
            t.invalidate_mapping(GuestAddress(IOVA), len as usize);
            t
        })
    });
    g.finish();
}

fn dma(c: &mut Criterion) {
    let mem = HostBuffer::new(64 * PAGE as usize).unwrap();
    let (ctx, _domain) = domain_with(&mem, 64, false);
    let dev = ctx.device(2).unwrap();
    let mut buf = [0u8; 64];
    let mut g = c.benchmark_group("DMA: 64-byte read through the IOMMU");
    g.bench_function("ioasid", |b| b.iter(|| dev.dma_read(black_box(IOVA + 3 * PAGE + 8), &mut buf).unwrap()));
    let t = vm_iotlb(&mem, 64);
    g.bench_function("vm-memory Iotlb", |b| {
        b.iter(|| {
            let host = vm_lookup(&t, black_box(IOVA + 3 * PAGE + 8));
            mem.read_at((host - mem.addr()) as usize, &mut buf);
        })
    });
    g.finish();
}

/// A handler thread that answers every request "success": it waits for
/// one, then takes whatever else is waiting. Stop it through the flag.
fn answer_everything(
    queue: &Arc<ioasid_engine::FaultQueue>,
) -> (Arc<std::sync::atomic::AtomicBool>, std::thread::JoinHandle<()>) {
    use ioasid_engine::fault::Response;
    use std::sync::atomic::{AtomicBool, Ordering};
    let stop = Arc::new(AtomicBool::new(false));
    let handler = {
        let (queue, stop) = (queue.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if queue.next(Duration::from_millis(10)).map(|(c, _)| queue.respond(c, Response::Success)).is_some() {
                    for (cookie, _) in queue.read(usize::MAX).unwrap_or_default() {
                        queue.respond(cookie, Response::Success).unwrap();
                    }
                }
            }
        })
    };
    (stop, handler)
}

fn fault_round_trip(c: &mut Criterion) {
    use ioasid_engine::fault::{Group, LAST_PAGE, PageRequest, Response};
    use std::sync::atomic::Ordering;
    use std::sync::mpsc;

    let mut g = c.benchmark_group("fault round trip: request, handler wakes, answer, device wakes");
    let queue = ioasid_engine::FaultQueue::new();
    let (stop, handler) = answer_everything(&queue);
    let request = PageRequest { flags: LAST_PAGE, dev_id: 1, pasid: 0, grpid: 0, perm: 2, addr: IOVA };
    g.bench_function("ioasid", |b| {
        b.iter(|| {
            let (group, waiter) = Group::awaited(vec![request.clone()]);
            queue.report(group);
            waiter.wait()
        })
    });
    stop.store(true, Ordering::Relaxed);
    handler.join().unwrap();

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
    g.bench_function("std mpsc ping-pong", |b| {
        b.iter(|| {
            to_handler.send(1).unwrap();
            answers.recv().unwrap()
        })
    });
    g.finish();

    // Batched: 64 requests in flight, the handler takes whatever is waiting.
    const BATCH: usize = 64;
    let mut g = c.benchmark_group("fault round trip: 64 requests answered in a batch");
    let queue = ioasid_engine::FaultQueue::new();
    let (stop, handler) = answer_everything(&queue);
    g.bench_function("ioasid", |b| {
        b.iter(|| {
            let waiters: Vec<_> = (0..BATCH)
                .map(|_| {
                    let (group, waiter) = Group::awaited(vec![request.clone()]);
                    queue.report(group);
                    waiter
                })
                .collect();
            waiters.iter().map(|w| w.wait() == Response::Success).filter(|ok| *ok).count()
        })
    });
    stop.store(true, Ordering::Relaxed);
    handler.join().unwrap();
    g.bench_function("std mpsc ping-pong", |b| {
        b.iter(|| {
            for _ in 0..BATCH {
                to_handler.send(1).unwrap();
            }
            (0..BATCH).map(|_| answers.recv().unwrap()).sum::<u64>()
        })
    });
    drop(to_handler);
    echo.join().unwrap();
    g.finish();
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

fn pasid(c: &mut Criterion) {
    use ioasid_engine::ioasid_set::PasidSpace;
    let mut g = c.benchmark_group("PASID: alloc + free");
    let space = PasidSpace::new(20).unwrap();
    let set = space.create_set(None, 1 << 20).unwrap();
    g.bench_function("ioasid", |b| {
        b.iter(|| {
            let p = space.alloc(set, 1, u32::MAX, 7).unwrap();
            space.free(set, p).unwrap();
        })
    });
    let plain = PlainAllocator::new(20);
    g.bench_function("Mutex<BTreeSet>", |b| {
        b.iter(|| {
            let p = plain.alloc().unwrap();
            plain.free(p);
        })
    });
    g.finish();

    let mut g = c.benchmark_group("PASID: exhaust and release all 2^20");
    g.sample_size(10);
    g.bench_function("ioasid", |b| {
        b.iter(|| {
            let space = PasidSpace::new(20).unwrap();
            let set = space.create_set(None, 1 << 20).unwrap();
            while space.alloc(set, 1, u32::MAX, 0).is_ok() {}
            space.destroy_set(set).unwrap();
        })
    });
    g.bench_function("Mutex<BTreeSet>", |b| {
        b.iter(|| {
            let plain = PlainAllocator::new(20);
            let mut ids = Vec::with_capacity(1 << 20);
            while let Some(p) = plain.alloc() {
                ids.push(p);
            }
            for p in ids {
                plain.free(p);
            }
        })
    });
    g.finish();
}

fn config() -> Criterion {
    let quick = std::env::var_os("IOASID_BENCH_QUICK").is_some();
    let (warm, measure) = if quick { (200, 700) } else { (1000, 3000) };
    Criterion::default()
        .warm_up_time(Duration::from_millis(warm))
        .measurement_time(Duration::from_millis(measure))
        .sample_size(if quick { 20 } else { 60 })
}

criterion_group! { name = benches; config = config(); targets = iotlb_hit, page_walk, working_set, map_unmap, dma, fault_round_trip, pasid }
criterion_main!(benches);
