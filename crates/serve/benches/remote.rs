//! What a device back end in another process pays for DMA through an
//! address space `ioasid serve` owns. `benches/run.sh` starts the daemon
//! (its socket in `IOASID_BENCH_SOCKET`) and runs this program, which is the
//! VMM: its iommufd in the daemon (`ioasid_serve::vmm::Iommufd`), guest
//! memory in a memfd, two devices made with `IOASID_DEVICE_NEW` (one plain,
//! one with PRI behind a fault queue). It starts itself again as the back
//! end (`IOASID_BENCH_REMOTE=backend`), hands it both devices over a
//! `SOCK_SEQPACKET` control socket as a vhost-user VMM hands over its
//! memory, and the back end opens a port on each (`ioasid_client::Port`).
//!
//! Three figures, each timed in alternation with its peer through
//! `benches/harness.rs`:
//!
//! - a 64-byte DMA read on a translation hit, timed in the back end beside
//!   the same read in-process (an engine context of the back end's own)
//!   and vm-memory's `Iotlb` lookup and copy;
//! - unmap (then remap) of one 4 KiB mapping while the back end writes it
//!   continuously, timed in the VMM, its p50 and p99, beside the same race
//!   in-process (a thread DMAing while the same process unmaps); a write
//!   that lands after its unmap returned is counted as stale, for both;
//! - a page request's round trip, timed in the back end: its DMA misses on
//!   the PRI device, the request reaches the VMM's fault queue, the VMM
//!   maps the page and answers, the DMA completes; beside a bare round trip
//!   of 64 bytes each way between the same two processes.

#[path = "../../../benches/harness.rs"]
mod harness;

use std::hint::black_box;
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use harness::{Harness, iter, timed};
use ioasid_abi::uapi::{
    IOMMU_PGFAULT_FLAGS_LAST_PAGE, IOMMUFD_PAGE_RESP_SUCCESS, iommu_hwpt_page_response, iommu_hwpt_pgfault,
};
use ioasid_client::Port;
use ioasid_engine::{Context, ContextConfig, DeviceInfo, HostBuffer, IoasId, Limit, Perm};
use ioasid_serve::vmm::{BackendDevice, GuestRam, Iommufd};
use ioasid_serve::wire::{self, MSG_SIZE, Msg};
use vm_memory::iommu::Iotlb;
use vm_memory::{GuestAddress, Permissions};
use zerocopy::{FromBytes, IntoBytes};

const PAGE: u64 = 4096;
/// Guest memory: the read's 64 pages from 0, the race's two pages and the
/// page request's page after them.
const RAM: usize = 1 << 20;
const READ_IOVA: u64 = 1 << 32;
const READ_PAGES: u64 = 64;
const RACE_IOVA: u64 = 2 << 32;
const RACE_RAM: [usize; 2] = [0x8_0000, 0x8_1000];
/// What each of the race's device writes writes, at the mapping's start.
const RACE_WRITE: usize = 256;
const PRI_IOVA: u64 = 3 << 32;
const PRI_RAM: usize = 0x9_0000;
const PRI_WORD: u32 = 0xfeed_f00d;
/// Bytes each way in the page request's peer: more than a command, so the
/// VMM tells them apart by size.
const ECHO: usize = 64;
const _: () = assert!(ECHO > MSG_SIZE);

const READ: &str = "back end in another process: 64-byte DMA read";
const RACE: &str = "back end in another process: unmap while it writes continuously";
const PRI: &str = "back end in another process: page request round trip";

// The control socket's commands, VMM to back end (`Msg::kind`), and the
// back end's requests to the VMM while it times page requests.
const HANDOVER: u32 = 100;
const RUN_READ: u32 = 101;
const HAMMER: u32 = 102;
const STOP: u32 = 103;
const RUN_PRI: u32 = 104;
const EXIT: u32 = 105;
const UNMAP: u32 = 110;
const DONE: u32 = 111;

fn main() {
    let Some(socket) = std::env::var_os("IOASID_BENCH_SOCKET").map(PathBuf::from) else {
        eprintln!("no daemon: benches/run.sh runs this benchmark beside `ioasid serve`");
        return;
    };
    if std::env::var_os("IOASID_BENCH_REMOTE").is_some_and(|r| r == "backend") {
        backend(&socket);
    } else {
        vmm(&socket);
    }
}

fn send(sock: BorrowedFd<'_>, kind: u32, arg: u64) {
    let mut m = Msg::new(kind);
    m.arg = arg;
    wire::send(sock, &m, &[]).expect("the other side hung up");
}

fn recv(sock: BorrowedFd<'_>) -> Msg {
    wire::recv(sock).expect("control socket").expect("the other side hung up").0
}

/// Sends `kind` and waits for its answer.
fn ask(sock: BorrowedFd<'_>, kind: u32, arg: u64) -> Msg {
    send(sock, kind, arg);
    recv(sock)
}

/// The VMM: guest memory, its iommufd in the daemon, and its devices.
struct Vmm {
    iommufd: Iommufd,
    ioas: u32,
    pri_ioas: u32,
    ram: GuestRam,
    dev: BackendDevice,
    pri_dev: BackendDevice,
    fault_fd: OwnedFd,
}

impl Vmm {
    fn new(socket: &Path) -> Vmm {
        let iommufd = Iommufd::open(socket).expect("open /dev/iommu in the daemon");
        let ram = GuestRam::new(RAM).unwrap();
        let ioas = iommufd.ioas_alloc().unwrap();
        let dev = iommufd.device_new(0x10, false).unwrap();
        iommufd.attach(dev.id, ioas).unwrap();
        let pri_ioas = iommufd.ioas_alloc().unwrap();
        let pri_dev = iommufd.device_new(0x18, true).unwrap();
        let (fault_id, fault_fd) = iommufd.fault_queue().unwrap();
        let hwpt = iommufd.hwpt_alloc(pri_dev.id, pri_ioas, Some(fault_id)).unwrap();
        iommufd.attach(pri_dev.id, hwpt).unwrap();
        let vmm = Vmm { iommufd, ioas, pri_ioas, ram, dev, pri_dev, fault_fd };
        vmm.iommufd.map(vmm.ioas, vmm.ram.at(0) as u64, READ_PAGES * PAGE, READ_IOVA).unwrap();
        // SAFETY: inside the mapping, aligned; nothing else writes it yet.
        unsafe { vmm.ram.at(PRI_RAM).cast::<u32>().write_volatile(PRI_WORD) };
        vmm
    }

    /// Guest memory at `offset`.
    fn at(&self, offset: usize) -> *mut u8 {
        self.ram.at(offset)
    }
}

/// Starts this program again as the back end and hands it the devices.
fn start_backend(vmm: &Vmm) -> (std::process::Child, OwnedFd) {
    let (ours, theirs) = wire::seqpacket_pair().unwrap();
    // A duplicate without close-on-exec, for the child to inherit.
    let inherited = rustix::io::dup(&theirs).unwrap();
    let child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(std::env::args().skip(1))
        .env("IOASID_BENCH_REMOTE", "backend")
        .env("IOASID_BENCH_CONTROL", std::os::fd::AsRawFd::as_raw_fd(&inherited).to_string())
        .spawn()
        .unwrap();
    drop((inherited, theirs));
    let devices = [vmm.dev.file.as_fd(), vmm.pri_dev.file.as_fd()];
    wire::send(ours.as_fd(), &Msg::new(HANDOVER), &devices).unwrap();
    assert_eq!(recv(ours.as_fd()).kind, HANDOVER, "the back end did not open its ports");
    (child, ours)
}

fn vmm(socket: &Path) {
    let mut h = Harness::new("remote");
    if !h.wants(READ) && !h.wants(RACE) && !h.wants(PRI) {
        return;
    }
    let vmm = Vmm::new(socket);
    let (mut child, ctl) = start_backend(&vmm);
    let ctl = ctl.as_fd();
    if h.wants(READ) {
        assert_eq!(ask(ctl, RUN_READ, 0).kind, RUN_READ);
    }
    if h.wants(RACE) {
        unmap_while_writing(&mut h, &vmm, ctl);
    }
    if h.wants(PRI) {
        send(ctl, RUN_PRI, 0);
        answer_page_requests(&vmm, ctl);
    }
    send(ctl, EXIT, 0);
    let status = child.wait().unwrap();
    assert!(status.success(), "the back end failed: {status}");
}

/// One side of the race: one 4 KiB mapping, two pages it alternates
/// between, and a device that writes the mapping continuously.
trait RaceSide {
    fn map(&self, k: usize);
    fn unmap(&self);
    /// The first bytes of page `k`, where the device writes.
    fn page(&self, k: usize) -> *mut u8;
    fn start(&mut self);
    /// Stops the device: its writes since `start`.
    fn stop(&mut self) -> u64;
}

/// The back end's port, writing through the daemon's IOAS.
struct Remote<'a> {
    vmm: &'a Vmm,
    ctl: BorrowedFd<'a>,
}

impl RaceSide for Remote<'_> {
    fn map(&self, k: usize) {
        self.vmm.iommufd.map(self.vmm.ioas, self.vmm.at(RACE_RAM[k]) as u64, PAGE, RACE_IOVA).unwrap();
    }
    fn unmap(&self) {
        self.vmm.iommufd.unmap(self.vmm.ioas, RACE_IOVA, PAGE).unwrap();
    }
    fn page(&self, k: usize) -> *mut u8 {
        self.vmm.at(RACE_RAM[k])
    }
    fn start(&mut self) {
        assert_eq!(ask(self.ctl, HAMMER, RACE_IOVA).kind, HAMMER);
    }
    fn stop(&mut self) -> u64 {
        ask(self.ctl, STOP, 0).arg
    }
}

/// The same race in this process: an engine context, a thread DMAing.
struct Local {
    ctx: Arc<Context>,
    ioas: IoasId,
    device: Arc<ioasid_engine::Device>,
    bufs: [HostBuffer; 2],
    writer: Option<(Arc<AtomicBool>, std::thread::JoinHandle<u64>)>,
}

impl Local {
    fn new() -> Local {
        let ctx = Arc::new(Context::with_config(ContextConfig::isolated(Limit::Pages(u64::MAX))));
        let ioas = ctx.ioas_alloc().unwrap();
        let dev = ctx.bind_device(DeviceInfo::new("bench", 1)).unwrap();
        ctx.attach(dev, ioas).unwrap();
        let device = ctx.get(dev).unwrap();
        let bufs = [0, 1].map(|_| HostBuffer::new(PAGE as usize).unwrap());
        Local { ctx, ioas, device, bufs, writer: None }
    }
}

impl RaceSide for Local {
    fn map(&self, k: usize) {
        // SAFETY: the buffers outlive the context's mappings: the race
        // unmaps before it returns, and `Local` drops the context first.
        unsafe { self.ctx.map_user(self.ioas, self.bufs[k].addr(), PAGE, Some(RACE_IOVA), Perm::RW).unwrap() };
    }
    fn unmap(&self) {
        self.ctx.unmap(self.ioas, RACE_IOVA, PAGE).unwrap();
    }
    fn page(&self, k: usize) -> *mut u8 {
        self.bufs[k].addr() as *mut u8
    }
    fn start(&mut self) {
        let stop = Arc::new(AtomicBool::new(false));
        let (device, running) = (self.device.clone(), stop.clone());
        let writer = std::thread::spawn(move || {
            let data = [0xa5u8; RACE_WRITE];
            let mut writes = 0;
            while !running.load(Ordering::Relaxed) {
                writes += u64::from(device.dma_write(RACE_IOVA, &data).is_ok());
            }
            writes
        });
        self.writer = Some((stop, writer));
    }
    fn stop(&mut self) -> u64 {
        let (stop, writer) = self.writer.take().expect("started");
        stop.store(true, Ordering::Relaxed);
        writer.join().unwrap()
    }
}

struct RaceResult {
    p50: f64,
    p99: f64,
    stale: u32,
    writes: u64,
}

fn zero(p: *mut u8) {
    // SAFETY: `p` has `RACE_WRITE` bytes, in memory this process mapped.
    unsafe { std::ptr::write_bytes(p, 0, RACE_WRITE) };
}

fn is_zero(p: *mut u8) -> bool {
    // SAFETY: as in `zero`; a racing write is what the check looks for,
    // so each byte is read once, volatile.
    (0..RACE_WRITE).all(|i| unsafe { p.add(i).read_volatile() } == 0)
}

/// `rounds` times: map one of the two pages, wait until the device has
/// written it (so it holds the translation), and time the unmap. The page
/// is zeroed once unmap returns; if it is not zero when its turn comes
/// again, a write landed after unmap returned: stale.
fn race(side: &mut dyn RaceSide, rounds: u32) -> RaceResult {
    zero(side.page(0));
    zero(side.page(1));
    side.start();
    let mut stale = 0;
    let mut times = Vec::with_capacity(rounds as usize);
    for r in 0..rounds as usize {
        let k = r % 2;
        if !is_zero(side.page(k)) {
            stale += 1;
            zero(side.page(k));
        }
        side.map(k);
        let deadline = Instant::now() + Duration::from_secs(10);
        // SAFETY: inside the page; the device writes it concurrently.
        while unsafe { side.page(k).read_volatile() } == 0 {
            assert!(Instant::now() < deadline, "the device never wrote the new mapping");
            std::hint::spin_loop();
        }
        let t = Instant::now();
        side.unmap();
        times.push(t.elapsed().as_nanos() as f64);
        zero(side.page(k));
    }
    std::thread::sleep(Duration::from_millis(1));
    stale += (0..2).filter(|&k| !is_zero(side.page(k))).count() as u32;
    let writes = side.stop();
    times.sort_by(f64::total_cmp);
    let at = |q: f64| times[((times.len() - 1) as f64 * q) as usize];
    RaceResult { p50: at(0.5), p99: at(0.99), stale, writes }
}

#[derive(Default)]
struct Tally {
    p50: Vec<f64>,
    p99: Vec<f64>,
    stale: u32,
    rounds: u32,
    writes: u64,
}

/// The race with the back end, in alternation with the same race in this
/// process; each alternation gives both sides' p50 and p99.
fn unmap_while_writing(h: &mut Harness, vmm: &Vmm, ctl: BorrowedFd<'_>) {
    let rounds = if h.quick() { 200 } else { 1000 };
    let mut remote = Remote { vmm, ctl };
    let mut local = Local::new();
    let mut seen: [Tally; 2] = Default::default();
    for _ in 0..h.alternations() {
        let sides: [&mut dyn RaceSide; 2] = [&mut remote, &mut local];
        for (side, seen) in sides.into_iter().zip(&mut seen) {
            let r = race(side, rounds);
            seen.p50.push(r.p50);
            seen.p99.push(r.p99);
            seen.stale += r.stale;
            seen.rounds += rounds;
            seen.writes += r.writes;
        }
    }
    let extra = |s: &Tally| Some(format!(r#""stale": {}, "rounds": {}, "writes": {}"#, s.stale, s.rounds, s.writes));
    let ours = "`IOMMU_IOAS_UNMAP` in the daemon of one 4 KiB mapping (then a map of the other page) while a back end \
                in another process writes 256 bytes into it with `Port::write` in a loop";
    let peer = "`Context::unmap` of one 4 KiB mapping (then a map of the other page) while a thread of the same \
                process writes 256 bytes into it with `Device::dma_write` in a loop";
    let [a, b] = &seen;
    for (q, va, vb) in [("p50", &a.p50, &b.p50), ("p99", &a.p99, &b.p99)] {
        h.record(
            &format!("{RACE}, {q}"),
            None,
            "ns",
            ("ioasid", ours, va, extra(a)),
            ("in process (engine)", peer, vb, extra(b)),
        );
    }
}

/// While the back end times its page requests: answers each page request
/// on the fault queue (mapping the page first), unmaps when asked, and
/// echoes the peer's messages, until the back end is done.
fn answer_page_requests(vmm: &Vmm, ctl: BorrowedFd<'_>) {
    use rustix::event::{PollFd, PollFlags, poll};
    let mut mapped = false;
    loop {
        let mut fds = [PollFd::new(&vmm.fault_fd, PollFlags::IN), PollFd::new(&ctl, PollFlags::IN)];
        poll(&mut fds, None).unwrap();
        let (fault, control) = (!fds[0].revents().is_empty(), !fds[1].revents().is_empty());
        if fault {
            let mut faults = [iommu_hwpt_pgfault::default(); 8];
            let n = rustix::io::read(&vmm.fault_fd, faults.as_mut_bytes()).unwrap();
            for f in &faults[..n / size_of::<iommu_hwpt_pgfault>()] {
                assert_eq!(f.addr & !(PAGE - 1), PRI_IOVA, "a page request outside the page");
                if !mapped {
                    vmm.iommufd.map(vmm.pri_ioas, vmm.at(PRI_RAM) as u64, PAGE, PRI_IOVA).unwrap();
                    mapped = true;
                }
                if f.flags & IOMMU_PGFAULT_FLAGS_LAST_PAGE != 0 {
                    let answer = iommu_hwpt_page_response { cookie: f.cookie, code: IOMMUFD_PAGE_RESP_SUCCESS };
                    rustix::io::write(&vmm.fault_fd, answer.as_bytes()).unwrap();
                }
            }
        }
        if control {
            let mut buf = [0u8; ECHO];
            let (n, _) = rustix::net::recv(ctl, &mut buf, rustix::net::RecvFlags::empty()).unwrap();
            if n == ECHO {
                rustix::net::send(ctl, &buf[..n], rustix::net::SendFlags::empty()).unwrap();
                continue;
            }
            assert_eq!(n, MSG_SIZE, "the back end hung up");
            match Msg::read_from_bytes(&buf[..MSG_SIZE]).unwrap().kind {
                UNMAP => {
                    if mapped {
                        vmm.iommufd.unmap(vmm.pri_ioas, PRI_IOVA, PAGE).unwrap();
                        mapped = false;
                    }
                    send(ctl, UNMAP, 0);
                }
                DONE => return,
                k => panic!("unexpected request {k} from the back end"),
            }
        }
    }
}

/// The back end: opens a port on each device it is handed and does what
/// the VMM asks, timing the read and the page request itself.
fn backend(socket: &Path) {
    let fd: i32 = std::env::var("IOASID_BENCH_CONTROL").expect("IOASID_BENCH_CONTROL").parse().unwrap();
    // SAFETY: the control socket the VMM left open across exec for this
    // process; nothing else here owns that number.
    let ctl = unsafe { OwnedFd::from_raw_fd(fd) };
    rustix::io::fcntl_setfd(&ctl, rustix::io::FdFlags::CLOEXEC).unwrap();
    let ctl = ctl.as_fd();
    let (m, devices) = wire::recv(ctl).unwrap().expect("the VMM hung up");
    assert_eq!(m.kind, HANDOVER);
    let [dev, pri_dev]: [OwnedFd; 2] = devices.try_into().expect("two devices");
    let port = Arc::new(Port::open(socket, dev.as_fd(), None).expect("a port on the device"));
    let pri_port = Port::open(socket, pri_dev.as_fd(), None).expect("a port on the PRI device");
    send(ctl, HANDOVER, 0);

    let mut h = Harness::new("remote-backend");
    let mut hammer: Option<(Arc<AtomicBool>, std::thread::JoinHandle<u64>)> = None;
    loop {
        let m = recv(ctl);
        match m.kind {
            RUN_READ => {
                dma_read(&mut h, &port);
                send(ctl, RUN_READ, 0);
            }
            HAMMER => {
                let stop = Arc::new(AtomicBool::new(false));
                let (port, running, iova) = (port.clone(), stop.clone(), m.arg);
                let writes = AtomicU64::new(0);
                hammer = Some((
                    stop,
                    std::thread::spawn(move || {
                        let data = [0xa5u8; RACE_WRITE];
                        while !running.load(Ordering::Relaxed) {
                            if port.write(iova, &data).is_ok() {
                                writes.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        writes.into_inner()
                    }),
                ));
                send(ctl, HAMMER, 0);
            }
            STOP => {
                let (stop, writer) = hammer.take().expect("hammering");
                stop.store(true, Ordering::Relaxed);
                send(ctl, STOP, writer.join().unwrap());
            }
            RUN_PRI => {
                page_request(&mut h, &pri_port, ctl);
                send(ctl, DONE, 0);
            }
            EXIT => return,
            k => panic!("unexpected command {k} from the VMM"),
        }
    }
}

/// Row 1, in the back end: `Port::read` of 64 bytes on a translation hit,
/// beside the same read in-process and vm-memory's `Iotlb`.
fn dma_read(h: &mut Harness, port: &Port) {
    let at = READ_IOVA + 3 * PAGE + 8;
    let mem = HostBuffer::new((READ_PAGES * PAGE) as usize).unwrap();
    let ctx = Context::with_config(ContextConfig::isolated(Limit::Pages(u64::MAX)));
    let ioas = ctx.ioas_alloc().unwrap();
    ctx.get(ioas).unwrap().set_huge_pages(false).unwrap();
    let dev = ctx.bind_device(DeviceInfo::new("bench", 1)).unwrap();
    ctx.attach(dev, ioas).unwrap();
    // SAFETY: `mem` outlives the context (declared before it).
    unsafe { ctx.map_user(ioas, mem.addr(), READ_PAGES * PAGE, Some(READ_IOVA), Perm::RW).unwrap() };
    let device = ctx.get(dev).unwrap();
    let mut t = Iotlb::new();
    for p in 0..READ_PAGES {
        let (iova, host) = (GuestAddress(READ_IOVA + p * PAGE), GuestAddress(mem.addr() + p * PAGE));
        t.set_mapping(iova, host, PAGE as usize, Permissions::ReadWrite).unwrap();
    }
    let (mut ours, mut theirs) = ([0u8; 64], [0u8; 64]);
    // The first read misses and asks the daemon; the rest hit.
    port.read(at, &mut ours).expect("the back end reads guest memory");
    let does = "`Port::read` of 64 bytes in a back-end process, on a hit in the table the daemon published, then the \
                copy from guest memory";
    h.compare(
        READ,
        iter("ioasid", does, || port.read(black_box(at), &mut ours).unwrap()),
        iter(
            "in process (engine)",
            "`Device::dma_read` of 64 bytes on a context of the back end's own: IOTLB hit, then the copy",
            || device.port(None).read(black_box(at), &mut theirs).unwrap(),
        ),
    );
    h.compare(
        READ,
        iter("ioasid", does, || port.read(black_box(at), &mut ours).unwrap()),
        iter("vm-memory Iotlb", "`Iotlb::lookup`, then a 64-byte copy from the host address", || {
            let host =
                Iotlb::lookup(&t, GuestAddress(black_box(at)), 64, Permissions::Read).unwrap().next().unwrap().base.0;
            mem.read_at((host - mem.addr()) as usize, &mut theirs);
        }),
    );
}

/// Row 3, in the back end: each read misses on the PRI device and waits
/// for the VMM's answer; between reads (untimed) the VMM unmaps the page
/// again. The peer is 64 bytes to the VMM and back on the control socket.
fn page_request(h: &mut Harness, port: &Port, ctl: BorrowedFd<'_>) {
    h.compare(
        PRI,
        timed(
            "ioasid",
            "`Port::read` of 64 bytes that misses on a PRI device: a page request to the VMM's fault queue, which \
             the VMM reads from the fault fd, maps the page, writes the answer; the read completes (the VMM unmaps \
             the page between reads, untimed)",
            |n| {
                let mut spent = Duration::ZERO;
                let mut buf = [0u8; 64];
                for _ in 0..n {
                    let t = Instant::now();
                    port.read(PRI_IOVA, &mut buf).expect("the page request was answered");
                    spent += t.elapsed();
                    assert_eq!(buf[..4], PRI_WORD.to_le_bytes());
                    assert_eq!(ask(ctl, UNMAP, 0).kind, UNMAP);
                }
                spent
            },
        ),
        iter(
            "bare SOCK_SEQPACKET round trip",
            "`send` of 64 bytes to the VMM's process, which sends them back; `recv` of the answer",
            || {
                let mut buf = [7u8; ECHO];
                rustix::net::send(ctl, &buf, rustix::net::SendFlags::empty()).unwrap();
                let (n, _) = rustix::net::recv(ctl, &mut buf, rustix::net::RecvFlags::empty()).unwrap();
                assert_eq!(n, ECHO);
            },
        ),
    );
}
