//! Back ends in other processes: a VMM (this test, through its channel to
//! a daemon in this process) maps guest memory (a memfd) into an IOAS and
//! hands a device to a back end (the `backend` example, its own process),
//! which DMAs through a port translated in its own process.

use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use ioasid_abi::ext::{IOASID_DEVICE_DIRTY, IOASID_DEVICE_PRI};
use ioasid_abi::uapi::*;
use ioasid_serve::limits::Limits;
use ioasid_serve::vmm::{BackendDevice, GuestRam, Iommufd};
use zerocopy::IntoBytes;

mod served;
use served::Served;

const RAM: usize = 1 << 20;
const IOVA: u64 = 0x10_0000;

/// The VMM: its iommufd in the daemon, an IOAS, guest memory, a device,
/// and what its set-up made besides.
struct Vmm<X = ()> {
    iommufd: Iommufd,
    ioas: u32,
    ram: GuestRam,
    dev: BackendDevice,
    extra: X,
}

impl Vmm {
    fn new(served: &Served) -> Vmm {
        Self::with(served, IOASID_DEVICE_PRI, 0, |iommufd, ioas, dev| {
            iommufd.attach(dev.id, ioas).unwrap();
        })
    }
}

impl<X> Vmm<X> {
    /// A VMM whose device (made with `flags`, behind `iommu`) `attach` attaches.
    fn with(
        served: &Served,
        flags: u32,
        iommu: u32,
        attach: impl FnOnce(&Iommufd, u32, &BackendDevice) -> X,
    ) -> Vmm<X> {
        let iommufd = Iommufd::open(&served.socket).expect("open /dev/iommu in the daemon");
        let ioas = iommufd.ioas_alloc().unwrap();
        let ram = GuestRam::new(RAM).unwrap();
        let dev = iommufd.device_new_with(0x10, flags, iommu).unwrap();
        let extra = attach(&iommufd, ioas, &dev);
        Vmm { iommufd, ioas, ram, dev, extra }
    }

    /// Maps `len` bytes of guest memory from `offset` at `iova`.
    fn map(&self, offset: usize, len: usize, iova: u64) {
        self.iommufd.map(self.ioas, self.ram.at(offset) as u64, len as u64, iova).unwrap();
    }

    fn unmap(&self, iova: u64, len: u64) {
        self.iommufd.unmap(self.ioas, iova, len).unwrap();
    }

    fn ram(&self, offset: usize, len: usize) -> &[u8] {
        // SAFETY: inside the mapping made in `new`; read only here (the
        // back end writes it too: a copy would be exact, a racy view is
        // what the checks want to see).
        unsafe { std::slice::from_raw_parts(self.ram.at(offset), len) }
    }

    fn zero(&self, offset: usize, len: usize) {
        // SAFETY: inside the mapping made in `new`.
        unsafe { std::ptr::write_bytes(self.ram.at(offset), 0, len) };
    }
}

/// A VMM whose device has PRI, attached to a HWPT whose page requests go
/// to a fault queue (the extra: its descriptor).
fn pri_vmm(served: &Served) -> Vmm<OwnedFd> {
    Vmm::with(served, IOASID_DEVICE_PRI, 0, |iommufd, ioas, dev| {
        let (fault_id, fault_fd) = iommufd.fault_queue().unwrap();
        let hwpt = iommufd.hwpt_alloc(dev.id, ioas, Some(fault_id)).unwrap();
        iommufd.attach(dev.id, hwpt).unwrap();
        fault_fd
    })
}

/// The `backend` example, handed the VMM's device and memory.
struct Backend {
    child: Child,
    sock: OwnedFd,
}

fn example() -> PathBuf {
    // Built once per run even when present: one left from before a change
    // to the client would test the old code.
    static BUILT: std::sync::Once = std::sync::Once::new();
    BUILT.call_once(|| {
        let ok = Command::new(env!("CARGO"))
            .args(["build", "-q", "-p", "ioasid-client", "--example", "backend"])
            .status()
            .unwrap()
            .success();
        assert!(ok, "building the backend example failed");
    });
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().parent().unwrap().join("examples/backend")
}

impl Backend {
    fn start<X>(served: &Served, vmm: &Vmm<X>, tag: &str) -> Backend {
        use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
        let path = served.dir.join(format!("control-{tag}"));
        let listener =
            rustix::net::socket_with(AddressFamily::UNIX, SocketType::SEQPACKET, SocketFlags::CLOEXEC, None).unwrap();
        rustix::net::bind(&listener, &SocketAddrUnix::new(&path).unwrap()).unwrap();
        rustix::net::listen(&listener, 1).unwrap();
        let child = Command::new(example()).arg(&path).spawn().unwrap();
        let sock = rustix::net::accept_with(&listener, SocketFlags::CLOEXEC).unwrap();
        // The hand-over, as a vhost-user VMM passes its memory table.
        let text = format!("{} - {RAM}", served.socket.display());
        ioasid_serve::wire::send_with(sock.as_fd(), text.as_bytes(), &[vmm.dev.file.as_fd(), vmm.ram.memfd()]).unwrap();
        let b = Backend { child, sock };
        assert_eq!(b.recv(), "ready");
        b
    }

    fn recv(&self) -> String {
        let mut buf = [0u8; 4096];
        let n = rustix::net::recv(&self.sock, &mut buf, rustix::net::RecvFlags::empty()).unwrap().0;
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    fn ask(&self, cmd: &str) -> String {
        rustix::net::send(&self.sock, cmd.as_bytes(), rustix::net::SendFlags::empty()).unwrap();
        self.recv()
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One event from the device file.
fn event<X>(vmm: &Vmm<X>, within: Duration) -> Option<[u32; 4]> {
    let dev = vmm.dev.file.as_fd();
    let mut fds = [rustix::event::PollFd::new(&dev, rustix::event::PollFlags::IN)];
    let t = rustix::time::Timespec { tv_sec: within.as_secs() as i64, tv_nsec: within.subsec_nanos() as i64 };
    if rustix::event::poll(&mut fds, Some(&t)).ok()? == 0 {
        return None;
    }
    let mut e = [0u32; 4];
    rustix::io::read(dev, e.as_mut_bytes()).ok()?;
    Some(e)
}

#[test]
fn a_back_end_reads_and_writes_guest_memory_through_the_vmms_mappings() {
    let served = Served::start("remote-rw", Limits::default());
    let vmm = Vmm::new(&served);
    vmm.map(0x4000, 0x2000, IOVA);
    let b = Backend::start(&served, &vmm, "rw");
    assert_eq!(b.ask(&format!("write {IOVA:#x} 0x5a 16")), "ok");
    assert_eq!(vmm.ram(0x4000, 16), &[0x5a; 16]);
    // A write crossing the two pages of the mapping.
    assert_eq!(b.ask(&format!("write {:#x} 0x11 8", IOVA + 0xffc)), "ok");
    assert_eq!(vmm.ram(0x4ffc, 8), &[0x11; 8]);
    // vm-memory's IommuMemory, as a virtio device model reads.
    assert_eq!(b.ask(&format!("virtio {IOVA:#x}")), "ok 0x5a5a5a5a5a5a5a5a");
    // Not mapped: a fault, not some other memory.
    assert_eq!(b.ask(&format!("read {:#x} 4", IOVA + 0x2000)), "fault");
    // The VMM remaps: the back end follows.
    vmm.unmap(IOVA, 0x2000);
    assert_eq!(b.ask(&format!("read {IOVA:#x} 1")), "fault");
    vmm.map(0x8000, 0x1000, IOVA);
    vmm.zero(0x8000, 1);
    assert_eq!(b.ask(&format!("write {IOVA:#x} 0x77 1")), "ok");
    assert_eq!(vmm.ram(0x8000, 1), &[0x77]);
    assert_eq!(vmm.ram(0x4000, 1), &[0x5a], "the old page is not written after the unmap");
    assert_eq!(served.daemon.remotes.ports(), 1);
}

/// An unmap drops from a back end's table only what it unmapped: what the
/// back end translated elsewhere is still used, without asking again.
#[test]
fn a_back_end_keeps_its_translations_through_an_unmap_elsewhere() {
    let served = Served::start("remote-keep", Limits::default());
    let vmm = Vmm::new(&served);
    vmm.map(0x4000, 0x1000, IOVA);
    vmm.zero(0x4000, 1);
    let b = Backend::start(&served, &vmm, "keep");
    assert_eq!(b.ask(&format!("write {IOVA:#x} 0x33 1")), "ok");
    let asked = served.daemon.remotes.misses();
    assert!(asked >= 1, "the first write was not asked for");
    for _ in 0..10 {
        vmm.map(0x8000, 0x1000, IOVA + 0x10_0000);
        vmm.unmap(IOVA + 0x10_0000, 0x1000);
        assert_eq!(b.ask(&format!("read {IOVA:#x} 1")), "ok 33");
    }
    assert_eq!(served.daemon.remotes.misses(), asked, "an unmap elsewhere sent the back end back to the daemon");
    // Through vm-memory's IommuMemory too, once its own cache is filled.
    assert_eq!(b.ask(&format!("virtio {IOVA:#x}")), "ok 0x33");
    let asked = served.daemon.remotes.misses();
    vmm.map(0x8000, 0x1000, IOVA + 0x10_0000);
    vmm.unmap(IOVA + 0x10_0000, 0x1000);
    assert_eq!(b.ask(&format!("virtio {IOVA:#x}")), "ok 0x33");
    assert_eq!(served.daemon.remotes.misses(), asked);
    // An unmap of the page itself still takes it away at once.
    vmm.unmap(IOVA, 0x1000);
    assert_eq!(b.ask(&format!("read {IOVA:#x} 1")), "fault");
}

#[test]
fn no_write_lands_after_unmap_returns_while_a_back_end_writes_continuously() {
    let served = Served::start("remote-race", Limits::default());
    let vmm = Vmm::new(&served);
    let b = Backend::start(&served, &vmm, "race");
    let (a, other) = (0usize, 0x1000usize);
    vmm.map(a, 0x1000, IOVA);
    assert_eq!(b.ask(&format!("hammer {IOVA:#x}")), "ok");
    let mut stale = 0;
    let rounds = 10_000;
    let mut current = a;
    for _ in 0..rounds {
        vmm.unmap(IOVA, 0x1000);
        // From here no write may reach `current`'s page.
        vmm.zero(current, 256);
        let next = if current == a { other } else { a };
        // Anything written to `next` came before its unmap (zeroed since).
        vmm.map(next, 0x1000, IOVA);
        if vmm.ram(current, 256).iter().any(|&x| x != 0) {
            stale += 1;
        }
        current = next;
    }
    let counts = b.ask("stop");
    let writes: u64 = counts.split_whitespace().nth(1).unwrap().parse().unwrap();
    eprintln!("{rounds} rounds: {stale} stale, back end: {counts}");
    assert_eq!(stale, 0, "writes landed after unmap returned");
    assert!(writes > 0, "the back end never wrote: {counts}");
}

/// Every unmap empties the back end's table, so each one sends its
/// `IommuMemory` back to the daemon; a page that stays mapped is still read
/// every time, however fast the unmaps come.
#[test]
fn a_back_ends_iommu_memory_reads_a_mapped_page_while_the_vmm_maps_and_unmaps_another() {
    let served = Served::start("remote-steady", Limits::default());
    let vmm = Vmm::new(&served);
    let b = Backend::start(&served, &vmm, "steady");
    vmm.map(0, 0x1000, IOVA);
    assert_eq!(b.ask(&format!("vhammer {IOVA:#x}")), "ok");
    for _ in 0..2000 {
        vmm.map(0x1000, 0x1000, IOVA + 0x1000);
        vmm.unmap(IOVA + 0x1000, 0x1000);
    }
    let counts = b.ask("stop");
    let mut words = counts.split_whitespace().skip(1).map(|w| w.parse::<u64>().unwrap());
    let (reads, faults) = (words.next().unwrap(), words.next().unwrap());
    assert_eq!(faults, 0, "reads of a mapped page failed: {counts}");
    assert!(reads > 0, "the back end never read: {counts}");
}

#[test]
fn a_back_end_stopped_mid_dma_is_cut_off_and_the_unmap_returns() {
    let limits = Limits { backend_stall_ms: 50, ..Limits::default() };
    let served = Served::start("remote-stop", limits);
    let vmm = Vmm::new(&served);
    vmm.map(0, 0x1000, IOVA);
    let mut b = Backend::start(&served, &vmm, "stop");
    assert_eq!(b.ask(&format!("stall {IOVA:#x}")), "stalled");
    // Stopped inside its DMA (give it the moment to stop itself).
    let deadline = Instant::now() + Duration::from_secs(5);
    while !std::fs::read_to_string(format!("/proc/{}/stat", b.child.id())).unwrap().contains(") T ") {
        assert!(Instant::now() < deadline, "the back end did not stop");
        std::thread::sleep(Duration::from_millis(1));
    }
    let t = Instant::now();
    vmm.unmap(IOVA, 0x1000);
    let took = t.elapsed();
    assert!(took >= Duration::from_millis(50), "the unmap did not wait for the back end ({took:?})");
    // Cut off: killed, and the VMM is told.
    let status = b.child.wait().unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(libc::SIGKILL));
    let e = event(&vmm, Duration::from_secs(2)).expect("an event on the device file");
    assert_eq!(e[0], ioasid_abi::device_file::IOASID_BACKEND_CUT_OFF);
    assert_eq!(e[1], b.child.id());
}

#[test]
fn a_back_end_killed_mid_dma_does_not_hold_up_unmap() {
    // A stalled back end would hold the unmap this long: far from the
    // moment it takes, however loaded the machine.
    let bound = Duration::from_secs(5);
    let limits = Limits { backend_stall_ms: bound.as_millis() as u32, ..Limits::default() };
    let served = Served::start("remote-kill", limits);
    let vmm = Vmm::new(&served);
    vmm.map(0, 0x1000, IOVA);
    let mut b = Backend::start(&served, &vmm, "kill");
    assert_eq!(b.ask(&format!("hammer {IOVA:#x}")), "ok");
    std::thread::sleep(Duration::from_millis(20));
    b.child.kill().unwrap();
    b.child.wait().unwrap();
    let t = Instant::now();
    vmm.unmap(IOVA, 0x1000);
    assert!(t.elapsed() < bound / 2, "unmap waited for a dead back end");
    let e = event(&vmm, Duration::from_secs(2)).expect("an event on the device file");
    assert_eq!(e[0], ioasid_abi::device_file::IOASID_BACKEND_GONE);
    let deadline = Instant::now() + Duration::from_secs(5);
    while served.daemon.remotes.ports() != 0 {
        assert!(Instant::now() < deadline, "the port outlived its back end");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_back_ends_page_request_reaches_the_vmms_fault_queue_and_its_answer_resumes_the_dma() {
    use ioasid_abi::uapi::{IOMMUFD_PAGE_RESP_SUCCESS, iommu_hwpt_page_response, iommu_hwpt_pgfault};
    let served = Served::start("remote-pri", Limits::default());
    let vmm = pri_vmm(&served);
    let queue = &vmm.extra;
    let b = Backend::start(&served, &vmm, "pri");
    // Nothing mapped at IOVA yet: the back end's read becomes a page request.
    rustix::net::send(&b.sock, format!("read {IOVA:#x} 4").as_bytes(), rustix::net::SendFlags::empty()).unwrap();
    let mut fds = [rustix::event::PollFd::new(&queue, rustix::event::PollFlags::IN)];
    let five = rustix::time::Timespec { tv_sec: 5, tv_nsec: 0 };
    assert_eq!(rustix::event::poll(&mut fds, Some(&five)).unwrap(), 1, "no page request reached the VMM");
    let mut fault = iommu_hwpt_pgfault::default();
    assert_eq!(rustix::io::read(queue, fault.as_mut_bytes()).unwrap(), size_of::<iommu_hwpt_pgfault>());
    assert_eq!(fault.dev_id, vmm.dev.id);
    assert_eq!(fault.addr, IOVA);
    // The VMM makes the page present, then answers.
    vmm.map(0x3000, 0x1000, IOVA);
    // SAFETY: inside the VMM's guest memory mapping.
    unsafe { vmm.ram.at(0x3000).cast::<u32>().write_volatile(0xfeed_f00d) };
    let answer = iommu_hwpt_page_response { cookie: fault.cookie, code: IOMMUFD_PAGE_RESP_SUCCESS };
    rustix::io::write(queue, answer.as_bytes()).unwrap();
    assert_eq!(b.recv(), format!("ok {}", "0df0edfe"));
}

#[test]
fn a_back_ends_writes_are_dirty_exactly_where_it_wrote_once_tracking_is_on() {
    let served = Served::start("remote-dirty", Limits::default());
    let mut hwpt = 0;
    let vmm = Vmm::with(&served, IOASID_DEVICE_DIRTY, 0, |iommufd, ioas, dev| {
        hwpt = iommufd.hwpt_alloc_with(dev.id, ioas, None, IOMMU_HWPT_ALLOC_DIRTY_TRACKING).unwrap();
        iommufd.attach(dev.id, hwpt).unwrap();
    });
    vmm.map(0, 0x8000, IOVA);
    let b = Backend::start(&served, &vmm, "dirty");
    // Before tracking: a write makes the back end's table hold the pages after it, writable.
    assert_eq!(b.ask(&format!("write {IOVA:#x} 1 8")), "ok");
    let mut on = iommu_hwpt_set_dirty_tracking {
        size: 16,
        flags: IOMMU_HWPT_DIRTY_TRACKING_ENABLE,
        hwpt_id: hwpt,
        ..Default::default()
    };
    vmm.iommufd.ioctl(IOMMU_HWPT_SET_DIRTY_TRACKING, &mut on).unwrap();
    assert_eq!(b.ask(&format!("write {:#x} 2 8", IOVA + 0x3000)), "ok");
    assert_eq!(b.ask(&format!("read {:#x} 8", IOVA + 0x5000)), "ok 0000000000000000");
    let mut bitmap = 0u64;
    let mut get = iommu_hwpt_get_dirty_bitmap {
        size: 48,
        hwpt_id: hwpt,
        iova: IOVA,
        length: 0x8000,
        page_size: 0x1000,
        data: &mut bitmap as *mut u64 as u64,
        ..Default::default()
    };
    vmm.iommufd.ioctl(IOMMU_HWPT_GET_DIRTY_BITMAP, &mut get).unwrap();
    assert_eq!(bitmap, 1 << 3, "only the page written since tracking began is dirty");
    // Cleared: a second write through the same translation is recorded again.
    assert_eq!(b.ask(&format!("write {:#x} 3 8", IOVA + 0x3000)), "ok");
    bitmap = 0;
    vmm.iommufd.ioctl(IOMMU_HWPT_GET_DIRTY_BITMAP, &mut get).unwrap();
    assert_eq!(bitmap, 1 << 3);
}

#[test]
fn a_back_ends_unrecoverable_fault_reaches_the_viommus_event_queue_by_its_virtual_id() {
    use ioasid_engine::pgtable::arm::{AF, AP_RDONLY};
    use ioasid_engine::smmuv3::{cd, ste};
    const VSID: u64 = 0x42;
    const CD_TABLE: usize = 0x1000;
    const TTB0: usize = 0x10000;
    let served = Served::start("remote-vevent", Limits::default());
    let mut veventq = None;
    // Guest RAM is the IOAS at IOVA 0 (stage 2); the guest's SMMU tables live in it.
    let vmm = Vmm::with(&served, 0, IOMMU_HW_INFO_TYPE_ARM_SMMUV3, |iommufd, ioas, dev| {
        let mut parent = iommu_hwpt_alloc {
            size: 48,
            flags: IOMMU_HWPT_ALLOC_NEST_PARENT,
            dev_id: dev.id,
            pt_id: ioas,
            ..Default::default()
        };
        iommufd.ioctl(IOMMU_HWPT_ALLOC, &mut parent).unwrap();
        let mut viommu = iommu_viommu_alloc {
            size: 40,
            r#type: IOMMU_VIOMMU_TYPE_ARM_SMMUV3,
            dev_id: dev.id,
            hwpt_id: parent.out_hwpt_id,
            ..Default::default()
        };
        iommufd.ioctl(IOMMU_VIOMMU_ALLOC, &mut viommu).unwrap();
        let mut vdev = iommu_vdevice_alloc {
            size: 24,
            viommu_id: viommu.out_viommu_id,
            dev_id: dev.id,
            virt_id: VSID,
            ..Default::default()
        };
        iommufd.ioctl(IOMMU_VDEVICE_ALLOC, &mut vdev).unwrap();
        let mut q = iommu_veventq_alloc {
            size: 32,
            viommu_id: viommu.out_viommu_id,
            r#type: IOMMU_VEVENTQ_TYPE_ARM_SMMUV3,
            veventq_depth: 8,
            ..Default::default()
        };
        iommufd.ioctl(IOMMU_VEVENTQ_ALLOC, &mut q).unwrap();
        // SAFETY: installed in this process for the command, owned here.
        veventq = Some(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(q.out_veventq_fd as i32) });
        (viommu.out_viommu_id, dev.id)
    });
    let (viommu, dev) = vmm.extra;
    vmm.map(0, RAM, 0);
    // The guest's CD 0 and a stage-1 table mapping IOVA 0x40_1000 read-only to GPA 0x21000.
    // SAFETY: inside the VMM's guest memory mapping, aligned.
    let put = |gpa: usize, v: u64| unsafe { vmm.ram.at(gpa).cast::<u64>().write_volatile(v) };
    put(CD_TABLE, cd::V | cd::AA64 | 16 | 1 << cd::ASID_SHIFT);
    put(CD_TABLE + 8, TTB0 as u64);
    let iova = 0x40_1000u64;
    let idx = |level: u32| ((iova >> (12 + 9 * level)) & 511) as usize;
    put(TTB0 + idx(3) * 8, (TTB0 as u64 + 0x1000) | 0b11);
    put(TTB0 + 0x1000 + idx(2) * 8, (TTB0 as u64 + 0x2000) | 0b11);
    put(TTB0 + 0x2000 + idx(1) * 8, (TTB0 as u64 + 0x3000) | 0b11);
    put(TTB0 + 0x3000 + idx(0) * 8, 0x21000 | 0b11 | AF | AP_RDONLY);
    let mut data = iommu_hwpt_arm_smmuv3 { ste: [ste::V | ste::CONFIG_S1 << 1 | CD_TABLE as u64, 0] };
    let mut nested = iommu_hwpt_alloc {
        size: 48,
        dev_id: dev,
        pt_id: viommu,
        data_type: IOMMU_HWPT_DATA_ARM_SMMUV3,
        data_len: 16,
        data_uptr: data.as_mut_bytes().as_mut_ptr() as u64,
        ..Default::default()
    };
    vmm.iommufd.ioctl(IOMMU_HWPT_ALLOC, &mut nested).unwrap();
    vmm.iommufd.attach(dev, nested.out_hwpt_id).unwrap();

    let b = Backend::start(&served, &vmm, "vevent");
    // Reads go through both stages; a write hits the guest's read-only entry.
    // SAFETY: inside the VMM's guest memory mapping.
    unsafe { vmm.ram.at(0x21008).write_volatile(0x66) };
    assert_eq!(b.ask(&format!("read {:#x} 1", iova + 8)), "ok 66");
    assert_eq!(b.ask(&format!("write {:#x} 0x78 1", iova + 8)), "fault");
    let queue = veventq.unwrap();
    let mut fds = [rustix::event::PollFd::new(&queue, rustix::event::PollFlags::IN)];
    let five = rustix::time::Timespec { tv_sec: 5, tv_nsec: 0 };
    assert_eq!(rustix::event::poll(&mut fds, Some(&five)).unwrap(), 1, "no event reached the vEVENTQ");
    let mut event = [0u64; 5];
    let n = rustix::io::read(queue, event.as_mut_bytes()).unwrap();
    assert_eq!(n, 8 + 32, "a header and an SMMUv3 event record");
    // F_PERMISSION on a write by stream 0x42 (the virtual ID), at the IOVA.
    assert_eq!(event[1], 0x13 | VSID << 32);
    assert_eq!(event[3], iova + 8);
    // SAFETY: inside the VMM's guest memory mapping.
    assert_eq!(unsafe { vmm.ram.at(0x21008).read_volatile() }, 0x66, "the refused write did not land");
}

#[test]
fn a_dma_refused_past_its_first_page_asks_for_that_page_once() {
    use ioasid_abi::uapi::{IOMMUFD_PAGE_RESP_INVALID, iommu_hwpt_page_response, iommu_hwpt_pgfault};
    let served = Served::start("remote-pri-once", Limits::default());
    let vmm = pri_vmm(&served);
    let queue = &vmm.extra;
    vmm.map(0, 0x1000, IOVA);
    let b = Backend::start(&served, &vmm, "pri-once");
    // The read spans the mapped page and the one after it, which is not.
    rustix::net::send(&b.sock, format!("read {:#x} 16", IOVA + 0xff8).as_bytes(), rustix::net::SendFlags::empty())
        .unwrap();
    let wait = |ms: i64| {
        let mut fds = [rustix::event::PollFd::new(&queue, rustix::event::PollFlags::IN)];
        let t = rustix::time::Timespec { tv_sec: ms / 1000, tv_nsec: (ms % 1000) * 1_000_000 };
        rustix::event::poll(&mut fds, Some(&t)).unwrap() == 1
    };
    assert!(wait(5000), "no page request reached the VMM");
    let mut fault = iommu_hwpt_pgfault::default();
    rustix::io::read(queue, fault.as_mut_bytes()).unwrap();
    assert_eq!(fault.addr, IOVA + 0x1000);
    let answer = iommu_hwpt_page_response { cookie: fault.cookie, code: IOMMUFD_PAGE_RESP_INVALID };
    rustix::io::write(queue, answer.as_bytes()).unwrap();
    // Next comes the back end's answer, not a second request for the page.
    let mut fds = [
        rustix::event::PollFd::new(&queue, rustix::event::PollFlags::IN),
        rustix::event::PollFd::new(&b.sock, rustix::event::PollFlags::IN),
    ];
    let five = rustix::time::Timespec { tv_sec: 5, tv_nsec: 0 };
    rustix::event::poll(&mut fds, Some(&five)).unwrap();
    assert!(!fds[0].revents().contains(rustix::event::PollFlags::IN), "the refused page was asked for again");
    assert_eq!(b.recv(), "fault");
    assert!(!wait(200), "the refused page was asked for again");
}
