//! Engine benchmarks, each beside a peer measured in the same run
//! (vm-memory 0.18's IOMMU support on the same mappings). `benches/run.sh`
//! runs them and writes BENCHMARKS.md.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::measurement::WallTime;
use criterion::{BatchSize, BenchmarkGroup, BenchmarkId, Criterion, criterion_group};
use ioasid_engine::ioas::Ioas;
use ioasid_engine::pgtable::mock::Mock;
use ioasid_engine::pgtable::x86::{VtdSs4, VtdSs5};
use ioasid_engine::pgtable::{Format, PageTable, Perm, Trust};
use ioasid_engine::{Context, ContextConfig, DeviceInfo, Domain, HostBuffer, HwptFlags, IovaRange, Limit};
use vm_memory::iommu::Iotlb;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, Permissions};

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

fn iotlb_hit(c: &mut Criterion) {
    let mem = HostBuffer::new(PAGE as usize).unwrap();
    let (_ctx, domain) = domain_with(&mem, 1, false);
    let guard = ioasid_engine::epoch::pin();
    let mut g = c.benchmark_group("translate: IOTLB hit, one 4 KiB page");
    g.bench_function("ioasid", |b| b.iter(|| domain.translate(black_box(IOVA + 64), Perm::R, &guard).unwrap()));
    let t = vm_iotlb(&mem, 1);
    g.bench_function("vm-memory Iotlb", |b| b.iter(|| vm_lookup(&t, black_box(IOVA + 64))));
    // What a VMM without an IOMMU pays: guest-physical to host, one region.
    let gm = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(IOVA), PAGE as usize)]).unwrap();
    g.bench_function("vm-memory GuestMemoryMmap", |b| {
        b.iter(|| gm.get_host_address(black_box(GuestAddress(IOVA + 64))).unwrap())
    });
    g.finish();
}

type WalkBench = fn(&mut BenchmarkGroup<WallTime>, &HostBuffer, &[u64]);

/// One walk per lookup, in format `F`, over 1 GiB mapped in its smallest pages.
fn walk_in<F: Format>(g: &mut BenchmarkGroup<WallTime>, mem: &HostBuffer, order: &[u64]) {
    let pt = PageTable::<F>::new();
    pt.map(IOVA, mem.addr(), mem.len() as u64, Perm::RW, Trust::Direct, false).unwrap();
    let guard = ioasid_engine::epoch::pin();
    let mut i = 0;
    g.bench_function("ioasid", |b| {
        b.iter(|| {
            let host = pt.walk(IOVA + order[i] * PAGE, &guard).unwrap().addr;
            i = chain(i, host, order.len());
        })
    });
}

fn page_walk(c: &mut Criterion) {
    const N: u64 = 1 << 18; // 1 GiB of 4 KiB pages
    let mem = HostBuffer::new((N * PAGE) as usize).unwrap();
    let order = pages(N, 4096);
    let t = vm_iotlb(&mem, N);
    let formats: [(&str, WalkBench); 3] = [
        ("VT-d second stage, 4 levels", walk_in::<VtdSs4>),
        ("VT-d second stage, 5 levels", walk_in::<VtdSs5>),
        ("selftest mock, 2 KiB pages", walk_in::<Mock<false>>),
    ];
    for (name, walk) in formats {
        let mut g = c.benchmark_group(format!("translate: page walk (no IOTLB), random page of 1 GiB, {name}"));
        walk(&mut g, &mem, &order);
        let mut i = 0;
        g.bench_function("vm-memory Iotlb", |b| {
            b.iter(|| {
                let host = vm_lookup(&t, IOVA + order[i] * PAGE);
                i = chain(i, host, order.len());
            })
        });
        g.finish();
    }
}

/// A guest whose VT-d first-stage table maps `N` scattered pages, nested
/// over a host second stage in 4 KiB pages: each translation that misses
/// the combined IOTLB reads four stage-1 entries through stage 2, then
/// translates the result through stage 2.
fn nested_walk(c: &mut Criterion) {
    use ioasid_engine::NestedData;
    use ioasid_engine::pgtable::x86::first_stage::encode;
    const N: u64 = 1 << 16;
    const ROOT: u64 = 0x1000;
    const LEAF_TABLES: u64 = 0x4000;
    const DATA: u64 = 16 << 20;
    const GIOVA: u64 = 1 << 30;
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
    ctx.ioas(ioas).unwrap().set_huge_pages(false).unwrap();
    let dev = ctx.bind_device(DeviceInfo::new("bench", 1)).unwrap();
    // SAFETY: `ram` outlives the context.
    unsafe { ctx.map_user(ioas, ram.addr(), ram_len, Some(0), Perm::RW).unwrap() };
    let parent = ctx.hwpt_alloc(dev, ioas, HwptFlags { nest_parent: true, dirty_tracking: false }, None).unwrap();
    let nested = ctx.hwpt_alloc_nested(dev, parent, NestedData::vtd_s1(ROOT, 4), None).unwrap();
    let Ok(ioasid_engine::Hwpt::Nested(hwpt)) = ctx.any_hwpt(nested) else { panic!("not nested") };
    let order = pages(N, 8192);
    let guard = ioasid_engine::epoch::pin();

    let mut g = c.benchmark_group("translate: nested walk (VT-d stage 1 over stage 2), random page of 256 MiB");
    let mut i = 0;
    g.bench_function("ioasid", |b| {
        b.iter(|| {
            let host = hwpt.translate(GIOVA + order[i] * PAGE, Perm::R, None, &guard).unwrap().host.0;
            i = chain(i, host, order.len());
        })
    });
    // vm-memory's two steps for the same mappings: its IOTLB gives the
    // guest-physical page, its guest memory the host address.
    let mut t = Iotlb::new();
    for p in 0..N {
        let gpa = DATA + scatter[p as usize] * PAGE;
        t.set_mapping(GuestAddress(GIOVA + p * PAGE), GuestAddress(gpa), PAGE as usize, Permissions::ReadWrite)
            .unwrap();
    }
    let gm = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), ram_len as usize)]).unwrap();
    let mut i = 0;
    g.bench_function("vm-memory Iotlb + GuestMemoryMmap", |b| {
        b.iter(|| {
            let gpa = vm_lookup(&t, GIOVA + order[i] * PAGE);
            let host = gm.get_host_address(GuestAddress(gpa)).unwrap() as u64;
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
                let host = domain.translate(IOVA + order[i] * PAGE, Perm::R, &guard).unwrap().host.0;
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

/// Batch map and unmap of 1 GiB in 4 KiB pages, timed apart: 262,144
/// entries each way.
fn map_unmap_gib(c: &mut Criterion) {
    const N: u64 = 1 << 18;
    const LEN: u64 = N * PAGE;
    let mem = HostBuffer::new(LEN as usize).unwrap();
    mem.write_at(0, &[1]); // one touch so both sides start alike
    let (ctx, _domain) = domain_with(&mem, 1, false);
    let ioas = 1;
    ctx.unmap(ioas, 0, u64::MAX).unwrap();
    let timed = |map: bool| {
        let (ctx, mem) = (&ctx, &mem);
        move |iters: u64| {
            let mut spent = Duration::ZERO;
            for _ in 0..iters {
                let t = std::time::Instant::now();
                // SAFETY: `mem` outlives the context.
                unsafe { ctx.map_user(ioas, mem.addr(), LEN, Some(IOVA), Perm::RW).unwrap() };
                let mapped = t.elapsed();
                let t = std::time::Instant::now();
                ctx.unmap(ioas, IOVA, LEN).unwrap();
                spent += if map { mapped } else { t.elapsed() };
            }
            spent
        }
    };
    let vm_timed = |map: bool| {
        let mem = &mem;
        move |iters: u64| {
            let mut spent = Duration::ZERO;
            for _ in 0..iters {
                let t = std::time::Instant::now();
                let mut iotlb = vm_iotlb(mem, N);
                let mapped = t.elapsed();
                let t = std::time::Instant::now();
                iotlb.invalidate_mapping(GuestAddress(IOVA), LEN as usize);
                spent += if map { mapped } else { t.elapsed() };
            }
            spent
        }
    };
    for (name, map) in
        [("map: 1 GiB as 262,144 pages of 4 KiB", true), ("unmap: 1 GiB as 262,144 pages of 4 KiB", false)]
    {
        let mut g = c.benchmark_group(name);
        g.sample_size(10);
        g.bench_function("ioasid", |b| b.iter_custom(timed(map)));
        g.bench_function("vm-memory Iotlb", |b| b.iter_custom(vm_timed(map)));
        g.finish();
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
    let mut g = c.benchmark_group("map + unmap: 1 GiB as one 1 GiB leaf");
    g.bench_function("ioasid", |b| {
        b.iter(|| {
            // SAFETY: `mem` outlives the context.
            unsafe { ctx.map_user(ioas, start, 1 << 30, Some(IOVA), Perm::RW).unwrap() };
            ctx.unmap(ioas, IOVA, 1 << 30).unwrap()
        })
    });
    g.bench_function("vm-memory Iotlb", |b| {
        b.iter(|| {
            let mut t = Iotlb::new();
            t.set_mapping(GuestAddress(IOVA), GuestAddress(start), 1 << 30, Permissions::ReadWrite).unwrap();
            t.invalidate_mapping(GuestAddress(IOVA), 1 << 30);
            t
        })
    });
    g.finish();
}

/// `IOMMU_HWPT_GET_DIRTY_BITMAP`'s work for 1 GiB of 4 KiB pages, every one
/// dirty: walk the leaves, clear their dirty bits, fill a bitmap.
fn dirty_bitmap(c: &mut Criterion) {
    const N: u64 = 1 << 18;
    let mem = HostBuffer::new((N * PAGE) as usize).unwrap();
    let ctx = Arc::new(Context::with_config(ContextConfig::isolated(Limit::Pages(u64::MAX))));
    let ioas = ctx.ioas_alloc().unwrap();
    ctx.ioas(ioas).unwrap().set_huge_pages(false).unwrap();
    let dev = ctx.bind_device(DeviceInfo { dirty_tracking: true, ..DeviceInfo::new("bench", 1) }).unwrap();
    let hwpt_id = ctx.hwpt_alloc(dev, ioas, HwptFlags { nest_parent: false, dirty_tracking: true }, None).unwrap();
    // SAFETY: `mem` outlives the context.
    unsafe { ctx.map_user(ioas, mem.addr(), N * PAGE, Some(IOVA), Perm::RW).unwrap() };
    let hwpt = ctx.hwpt(hwpt_id).unwrap();
    hwpt.set_dirty_tracking(true).unwrap();
    let range = IovaRange::new(IOVA, IOVA + N * PAGE - 1);
    let dirty_all = || (0..N).for_each(|p| assert!(hwpt.domain().mark_dirty(IOVA + p * PAGE)));
    let read_and_clear = |bitmap: &mut [u64]| {
        hwpt.read_and_clear_dirty(range, false, &mut |start, size| {
            for page in (start - IOVA) / PAGE..(start - IOVA + size) / PAGE {
                bitmap[(page / 64) as usize] |= 1 << (page % 64);
            }
        })
        .unwrap()
    };
    let mut bitmap = vec![0u64; (N / 64) as usize];
    dirty_all();
    read_and_clear(&mut bitmap);
    assert!(bitmap.iter().all(|w| *w == u64::MAX), "every page was reported");

    let mut g = c.benchmark_group("dirty bitmap: read and clear 1 GiB of 4 KiB pages, all dirty");
    g.sample_size(10);
    g.bench_function("ioasid", |b| {
        b.iter_batched(dirty_all, |()| read_and_clear(&mut bitmap), BatchSize::PerIteration)
    });
    // rust-vmm's dirty log: one bit per page in a flat atomic bitmap.
    let log = vm_memory::bitmap::AtomicBitmap::new((N * PAGE) as usize, std::num::NonZeroUsize::new(4096).unwrap());
    g.bench_function("vm-memory AtomicBitmap", |b| {
        b.iter_batched(|| log.set_addr_range(0, (N * PAGE) as usize), |()| log.get_and_reset(), BatchSize::PerIteration)
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
        Iotlb::lookup(self.0.read().unwrap(), iova, length, access).map_err(|_| {
            vm_memory::iommu::Error::CannotResolve {
                iova_range: vm_memory::iommu::IovaRange { base: iova, length },
                reason: "not mapped".into(),
            }
        })
    }
}

/// The same 64-byte DMA through vm-memory's `IommuMemory`, the front end
/// rust-vmm device models use, over ioasid's `IommuPort` and over a plain
/// locked `Iotlb`.
fn iommu_memory(c: &mut Criterion) {
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
    let ours = IommuMemory::new(ram.clone(), IommuPort::for_memory(ctx.device(dev).unwrap(), None, &ram), true, ());
    let mut t = Iotlb::new();
    t.set_mapping(GuestAddress(IOVA), GuestAddress(0), (N * PAGE) as usize, Permissions::ReadWrite).unwrap();
    let theirs = IommuMemory::new(ram.clone(), VmIotlb(std::sync::RwLock::new(t)), true, ());
    let mut buf = [0u8; 64];
    let mut g = c.benchmark_group("DMA: 64-byte read through vm-memory's IommuMemory");
    let at = GuestAddress(IOVA + 3 * PAGE + 8);
    g.bench_function("ioasid", |b| b.iter(|| ours.read_slice(&mut buf, black_box(at)).unwrap()));
    g.bench_function("vm-memory Iotlb under RwLock", |b| {
        b.iter(|| theirs.read_slice(&mut buf, black_box(at)).unwrap())
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
fn object_ids(c: &mut Criterion) {
    const LIVE: u32 = 100_000;
    let mut g = c.benchmark_group("objects: IOAS alloc + destroy, 100 k live");
    let ctx = Context::with_config(ContextConfig::isolated(Limit::Pages(u64::MAX)));
    for _ in 0..LIVE {
        ctx.ioas_alloc().unwrap();
    }
    ctx.destroy(LIVE / 2).unwrap();
    g.bench_function("ioasid", |b| {
        b.iter(|| {
            let id = ctx.ioas_alloc().unwrap();
            ctx.destroy(black_box(id)).unwrap();
        })
    });
    let plain = PlainTable::default();
    for _ in 0..LIVE {
        plain.insert(Arc::new(Ioas::new()));
    }
    plain.remove(LIVE / 2);
    g.bench_function("Mutex<BTreeMap> + free set", |b| {
        b.iter(|| {
            let id = plain.insert(Arc::new(Ioas::new()));
            black_box(plain.remove(black_box(id)));
        })
    });
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
    ioas: u32,
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

/// Unmap latency under concurrent translation, written where
/// `benches/report.py` reads it: criterion reports means of batches, and
/// this figure is about the tail.
fn unmap_under_translation(quick: bool) {
    let rounds = if quick { 400 } else { 3000 };
    let ctx = Arc::new(Context::with_config(ContextConfig::isolated(Limit::Pages(u64::MAX))));
    let ioas = ctx.ioas_alloc().unwrap();
    ctx.ioas(ioas).unwrap().set_huge_pages(false).unwrap();
    let dev = ctx.bind_device(DeviceInfo::new("bench", 1)).unwrap();
    ctx.attach(dev, ioas).unwrap();
    let device = ctx.device(dev).unwrap();
    let sides: [(&str, Arc<dyn Dma>); 2] = [
        ("ioasid", Arc::new(Engine { ctx, ioas, device })),
        ("vm-memory Iotlb under RwLock", Arc::new(VmIotlb(std::sync::RwLock::new(Iotlb::new())))),
    ];
    let mut rows = Vec::new();
    for (name, side) in sides {
        let r = race(side, rounds);
        println!(
            "unmap under translation, {name}: p50 {:.0} ns, p99 {:.0} ns, {} stale of {} rounds, {} writes",
            r.p50, r.p99, r.stale, r.rounds, r.writes
        );
        rows.push(format!(
            r#"{{"impl": "{name}", "p50": {}, "p99": {}, "stale": {}, "rounds": {}, "writes": {}}}"#,
            r.p50, r.p99, r.stale, r.rounds, r.writes
        ));
    }
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/ioasid-bench");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("unmap-race.json"), format!("[{}]\n", rows.join(",\n"))).unwrap();
}

fn quick() -> bool {
    std::env::var_os("IOASID_BENCH_QUICK").is_some()
}

fn config() -> Criterion {
    let (warm, measure) = if quick() { (200, 700) } else { (1000, 3000) };
    Criterion::default()
        .warm_up_time(Duration::from_millis(warm))
        .measurement_time(Duration::from_millis(measure))
        .sample_size(if quick() { 20 } else { 60 })
}

criterion_group! {
    name = benches;
    config = config();
    targets = iotlb_hit, page_walk, nested_walk, working_set, map_unmap, map_unmap_gib, dma, iommu_memory, dirty_bitmap,
        fault_round_trip, pasid, object_ids
}

fn main() {
    // `cargo bench -- FILTER` runs only criterion's matching groups; the
    // race runs on a full run, or when the filter names it.
    let filter = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    if filter.as_deref().is_none_or(|f| "unmap under translation".contains(f)) {
        unmap_under_translation(quick());
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
