//! `ioasid demo --processes`: a VMM and a virtio back end in another
//! process share an IOAS.
//!
//! Two processes, three parties. This process runs a daemon (what `ioasid
//! serve` runs, on a socket in a temporary directory) and a VMM that
//! reaches it as any client does (`ioasid_serve::vmm::Iommufd`): guest
//! memory in a memfd mapped `MAP_SHARED`, an IOAS, a device with PRI whose
//! HWPT reports page requests to the VMM's fault queue. The back end is
//! this executable again (`ioasid demo-backend`, hidden), handed the
//! device's file and the guest memory file over `SCM_RIGHTS` as a
//! vhost-user back end is handed its memory table. It runs a virtio device
//! model (virtio-queue) on vm-memory's `IommuMemory` over an
//! `ioasid_client::IommuPort`, so every ring and buffer access it makes is
//! DMA at an IOVA, translated in the back end from the table the daemon
//! publishes. The VMM also plays the guest's driver: it writes descriptor
//! chains into a split virtqueue in guest memory and reads the used ring.
//!
//! The two talk over a control socket (`SOCK_SEQPACKET`, one message per
//! command and one per answer):
//!
//! - hand-over: `GUEST_MEMORY_BYTES DAEMON_SOCKET` with the device file and
//!   the memfd; answered `ready`;
//! - `queue SIZE DESC AVAIL USED`: the virtqueue, at IOVAs; `ok`;
//! - `serve`: pops one chain, answers it upper-cased and puts it in the used
//!   ring; `ok HEAD READ WRITTEN`, `fault HEAD WHY` or `empty`;
//! - `bench IOVA COUNT`: one 64-byte `Port::read` (a miss, timed), then
//!   COUNT more (hits, timed); `ok MISS_NS HITS_NS TABLE_CHANGES`.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ioasid_abi::device_file::{IOASID_BACKEND_GONE, ioasid_backend_event};
use ioasid_abi::uapi::{
    IOMMU_PGFAULT_PERM_WRITE, IOMMUFD_PAGE_RESP_INVALID, IOMMUFD_PAGE_RESP_SUCCESS, iommu_hwpt_page_response,
    iommu_hwpt_pgfault,
};
use ioasid_client::{IommuPort, Port};
use ioasid_serve::daemon::Daemon;
use ioasid_serve::limits::Limits;
use ioasid_serve::vmm::{BackendDevice, Iommufd};
use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::iommu::IommuMemory;
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use zerocopy::IntoBytes;

use crate::demo::{row, section};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

const PAGE: u64 = 4096;
const RAM: usize = 1 << 20;
const QUEUE_SIZE: u16 = 8;
/// The device's requester ID (00:02.0).
const RID: u32 = 0x0010;
/// Guest-physical pages: the virtqueue's three parts, mapped for the
/// device at `RINGS_IOVA + GPA`.
const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
const RINGS_IOVA: u64 = 0x8000_0000;
/// The request and reply buffers' pages, before and after the remap.
const REQUEST: [u64; 2] = [0x4000, 0x6000];
const REPLY: [u64; 2] = [0x5000, 0x7000];
/// The page the VMM maps when the back end's page request arrives.
const LATE: u64 = 0x8000;
/// Where the driver's descriptors point.
const REQUEST_IOVA: u64 = 0x9000_0000;
const REPLY_IOVA: u64 = 0x9000_1000;
const LATE_IOVA: u64 = 0x9000_2000;
/// Bytes of a reply buffer.
const REPLY_LEN: u32 = 64;
/// Descriptor flags (virtio 1.2, 2.7.5).
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
/// How long the VMM waits for the back end's answer to any one command.
const PATIENCE: Duration = Duration::from_secs(10);
/// Hits timed in the last scene.
const HITS: u32 = 200_000;

fn errno(e: i32) -> Box<dyn std::error::Error> {
    std::io::Error::from_raw_os_error(e).into()
}

fn text(bytes: &[u8]) -> String {
    format!("\"{}\"", String::from_utf8_lossy(bytes))
}

fn micros(d: Duration) -> String {
    match d.as_nanos() as f64 / 1000.0 {
        us if us >= 1000.0 => format!("{:.1} ms", us / 1000.0),
        us => format!("{us:.1} µs"),
    }
}

/// The demo's side: daemon, VMM and guest driver, then the scenes.
pub fn run(out: &mut impl Write) -> Result<()> {
    writeln!(out, "ioasid demo --processes: a VMM and a virtio back end in another process share an IOAS")?;
    writeln!(out, "\nSetup")?;
    let dir = TempDir::new()?;
    let socket = dir.0.join("sock");
    let daemon = serve(&socket)?;
    row(out, "daemon", format!("in this process, listening at {}", socket.display()))?;
    let vmm = Vmm::new(&socket)?;
    row(out, "VMM", format!("iommufd in the daemon; IOAS {}; guest RAM 1 MiB, a memfd mapped MAP_SHARED", vmm.ioas))?;
    row(
        out,
        "device",
        format!(
            "id {} at RID 00:02.0 with PRI; fault queue {}, HWPT {} with it, attached",
            vmm.dev.id, vmm.fault_id, vmm.hwpt
        ),
    )?;
    for gpa in [DESC, AVAIL, USED] {
        vmm.map(gpa, RINGS_IOVA + gpa)?;
    }
    vmm.map(REQUEST[0], REQUEST_IOVA)?;
    vmm.map(REPLY[0], REPLY_IOVA)?;
    row(
        out,
        "mappings",
        format!(
            "virtqueue rings at IOVA {:#x}; request page {:#x} at IOVA {REQUEST_IOVA:#x}, reply page {:#x} at IOVA {REPLY_IOVA:#x}",
            RINGS_IOVA + DESC,
            REQUEST[0],
            REPLY[0]
        ),
    )?;
    let mut backend = Backend::start(&dir.0, &socket, &vmm)?;
    row(
        out,
        "back end",
        format!("pid {} (ioasid demo-backend), handed the device file and the memfd over SCM_RIGHTS", backend.pid()),
    )?;
    let answer = backend.ask(&format!(
        "queue {QUEUE_SIZE} {:#x} {:#x} {:#x}",
        RINGS_IOVA + DESC,
        RINGS_IOVA + AVAIL,
        RINGS_IOVA + USED
    ))?;
    expect_ok(&answer, "setting up the virtqueue")?;
    row(out, "virtqueue", format!("split, {QUEUE_SIZE} entries; the back end runs virtio-queue on IommuMemory"))?;

    section(out, 1, "The back end's DMA goes through the VMM's mappings")?;
    let message = b"hello from the guest";
    let head = vmm.post(0, REQUEST[0], message, REPLY_IOVA)?;
    row(
        out,
        "driver posts",
        format!("chain {head}: {} at IOVA {REQUEST_IOVA:#x}, then {REPLY_LEN} B for the reply", text(message)),
    )?;
    let t = Instant::now();
    let served = backend.serve(&vmm, |_| Ok(IOMMUFD_PAGE_RESP_INVALID))?;
    let took = t.elapsed();
    row(out, "back end", served.describe())?;
    let reply = vmm.reply(0, REPLY[0])?;
    row(
        out,
        "VMM reads the reply",
        format!("{} in guest page {:#x}, {} after posting", text(&reply), REPLY[0], micros(took)),
    )?;

    section(out, 2, "The VMM remaps the buffers to other pages")?;
    let t = Instant::now();
    vmm.unmap(REQUEST_IOVA)?;
    vmm.unmap(REPLY_IOVA)?;
    vmm.map(REQUEST[1], REQUEST_IOVA)?;
    vmm.map(REPLY[1], REPLY_IOVA)?;
    row(
        out,
        "remap",
        format!(
            "IOVA {REQUEST_IOVA:#x} -> page {:#x}, IOVA {REPLY_IOVA:#x} -> page {:#x} (unmap + map, {})",
            REQUEST[1],
            REPLY[1],
            micros(t.elapsed())
        ),
    )?;
    let message = b"second request, new pages";
    let head = vmm.post(1, REQUEST[1], message, REPLY_IOVA)?;
    row(out, "driver posts", format!("chain {head}: {}", text(message)))?;
    let served = backend.serve(&vmm, |_| Ok(IOMMUFD_PAGE_RESP_INVALID))?;
    row(out, "back end", served.describe())?;
    let reply = vmm.reply(1, REPLY[1])?;
    row(out, "reply", format!("{} in the new page {:#x}", text(&reply), REPLY[1]))?;
    let old = vmm.read(REPLY[0], 20)?;
    let same = old == b"HELLO FROM THE GUEST";
    row(
        out,
        "old pages",
        format!("page {:#x} still holds {}: {}", REPLY[0], text(&old), if same { "untouched" } else { "CHANGED" }),
    )?;

    section(out, 3, "The VMM unmaps: the back end's DMA is cut off from the mapping")?;
    let t = Instant::now();
    vmm.unmap(REPLY_IOVA)?;
    row(
        out,
        "unmap",
        format!(
            "IOVA {REPLY_IOVA:#x} in {}: the back end's table emptied, its DMA in flight waited for",
            micros(t.elapsed())
        ),
    )?;
    let before = vmm.read(REPLY[1], 25)?;
    let message = b"too late";
    let head = vmm.post(2, REQUEST[1], message, REPLY_IOVA)?;
    row(
        out,
        "driver posts",
        format!("chain {head}: {}, its reply buffer still at IOVA {REPLY_IOVA:#x}", text(message)),
    )?;
    let served = backend.serve(&vmm, |_| Ok(IOMMUFD_PAGE_RESP_INVALID))?;
    for f in &served.faults {
        row(out, "VMM's fault queue", format!("{}: the guest unmapped it, answered INVALID", f.describe()))?;
    }
    row(out, "back end", served.describe())?;
    let used = vmm.used(2)?;
    row(out, "used ring", format!("chain {} completed with {} B written", used.0, used.1))?;
    let after = vmm.read(REPLY[1], 25)?;
    row(
        out,
        "guest memory",
        format!("page {:#x} {}", REPLY[1], if after == before { "untouched by the refused DMA" } else { "CHANGED" }),
    )?;

    section(out, 4, "A page request answered across the processes")?;
    let message = b"written after a page request";
    let head = vmm.post(3, REQUEST[1], message, LATE_IOVA)?;
    row(out, "driver posts", format!("chain {head}: its reply buffer at IOVA {LATE_IOVA:#x}, not mapped yet"))?;
    let t = Instant::now();
    let served = backend.serve(&vmm, |f| {
        if f.addr & !(PAGE - 1) != LATE_IOVA {
            return Ok(IOMMUFD_PAGE_RESP_INVALID);
        }
        vmm.map(LATE, LATE_IOVA)?;
        Ok(IOMMUFD_PAGE_RESP_SUCCESS)
    })?;
    let took = t.elapsed();
    for f in &served.faults {
        let what = if f.code == IOMMUFD_PAGE_RESP_SUCCESS {
            format!("mapped page {LATE:#x} there, answered SUCCESS")
        } else {
            "answered INVALID".into()
        };
        row(out, "VMM's fault queue", format!("{}: {what}", f.describe()))?;
    }
    row(out, "back end", served.describe())?;
    let reply = vmm.reply(3, LATE)?;
    row(out, "reply", format!("{} in page {LATE:#x}, {} after posting", text(&reply), micros(took)))?;

    section(out, 5, "A 64-byte DMA's cost in the back end")?;
    // A remap empties the back end's table: its first read asks the daemon.
    vmm.unmap(REQUEST_IOVA)?;
    vmm.map(REQUEST[1], REQUEST_IOVA)?;
    let answer = backend.ask(&format!("bench {REQUEST_IOVA:#x} {HITS}"))?;
    let figures: Vec<u128> = answer.split_whitespace().skip(1).filter_map(|w| w.parse().ok()).collect();
    let [miss, hits, changes] = figures[..] else {
        return Err(format!("the back end's timing failed: {answer}").into());
    };
    row(
        out,
        "miss",
        format!(
            "{}: the back end asks the daemon, which publishes the translation",
            micros(Duration::from_nanos(miss as u64))
        ),
    )?;
    row(
        out,
        "hit",
        format!(
            "{:.1} ns per 64-byte Port::read ({HITS} reads{}); {}",
            hits as f64 / f64::from(HITS),
            if cfg!(debug_assertions) { ", a debug build" } else { "" },
            if changes == 0 {
                "no request to the daemon (its table unchanged)".to_string()
            } else {
                format!("the table changed {changes} times")
            }
        ),
    )?;

    writeln!(out, "\nTeardown")?;
    let pid = backend.pid();
    backend.stop();
    let gone = vmm.event(Duration::from_secs(2)).is_some_and(|e| e.kind == IOASID_BACKEND_GONE && e.pid == pid);
    row(
        out,
        "back end",
        format!(
            "pid {pid} stopped; {}",
            if gone { "the VMM's device file reported its port gone" } else { "no event on the device file" }
        ),
    )?;
    drop(vmm);
    drop(dir);
    drop(daemon);
    row(out, "daemon", "socket and temporary directory removed")?;
    writeln!(out)?;
    Ok(())
}

fn expect_ok(answer: &str, what: &str) -> Result<()> {
    if answer == "ok" { Ok(()) } else { Err(format!("{what}: the back end answered {answer:?}").into()) }
}

/// A directory of the demo's own, removed at the end.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Result<TempDir> {
        let dir = std::env::temp_dir().join(format!("ioasid-demo-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        Ok(TempDir(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A daemon in this process, serving `socket` on a thread.
fn serve(socket: &Path) -> Result<Arc<Daemon>> {
    let listener = rustix::net::socket_with(AddressFamily::UNIX, SocketType::SEQPACKET, SocketFlags::CLOEXEC, None)?;
    rustix::net::bind(&listener, &SocketAddrUnix::new(socket)?)?;
    rustix::net::listen(&listener, 16)?;
    let daemon = Daemon::new(Limits::default())?;
    let d = daemon.clone();
    std::thread::Builder::new()
        .name("ioasid-demo-daemon".into())
        .spawn(move || ioasid_serve::channel::serve(d, listener))?;
    Ok(daemon)
}

/// The VMM: its iommufd in the daemon, guest memory, the device.
struct Vmm {
    iommufd: Iommufd,
    ioas: u32,
    memfd: Arc<File>,
    ram: GuestMemoryMmap,
    dev: BackendDevice,
    fault_id: u32,
    faults: OwnedFd,
    hwpt: u32,
}

impl Vmm {
    fn new(socket: &Path) -> Result<Vmm> {
        let iommufd = Iommufd::open(socket).map_err(errno)?;
        let ioas = iommufd.ioas_alloc().map_err(errno)?;
        let memfd = rustix::fs::memfd_create(c"ioasid-demo-guest", rustix::fs::MemfdFlags::CLOEXEC)?;
        let memfd = Arc::new(File::from(memfd));
        memfd.set_len(RAM as u64)?;
        // vm-memory maps a file MAP_SHARED: the daemon and the back end
        // reach the same pages.
        let ram = GuestMemoryMmap::from_ranges_with_files([(
            GuestAddress(0),
            RAM,
            Some(FileOffset::from_arc(memfd.clone(), 0)),
        )])?;
        let dev = iommufd.device_new(RID, true).map_err(errno)?;
        let (fault_id, faults) = iommufd.fault_queue().map_err(errno)?;
        let hwpt = iommufd.hwpt_alloc(dev.id, ioas, Some(fault_id)).map_err(errno)?;
        iommufd.attach(dev.id, hwpt).map_err(errno)?;
        Ok(Vmm { iommufd, ioas, memfd, ram, dev, fault_id, faults, hwpt })
    }

    /// Maps guest page `gpa` at `iova`, as the guest's vIOMMU asks.
    fn map(&self, gpa: u64, iova: u64) -> Result<()> {
        let host = self.ram.get_host_address(GuestAddress(gpa))? as u64;
        self.iommufd.map(self.ioas, host, PAGE, iova).map_err(errno)
    }

    fn unmap(&self, iova: u64) -> Result<()> {
        self.iommufd.unmap(self.ioas, iova, PAGE).map_err(errno)
    }

    /// The driver posts chain `slot`: `request`, driver-readable, written
    /// to page `request_gpa` (mapped at `REQUEST_IOVA`), then a
    /// device-writable buffer at `reply_iova`.
    /// The chain is named by its head descriptor, as the used ring names it.
    fn post(&self, slot: u16, request_gpa: u64, request: &[u8], reply_iova: u64) -> Result<u16> {
        let head = slot * 2;
        self.ram.write_slice(request, GuestAddress(request_gpa))?;
        let chain = [
            Descriptor::new(REQUEST_IOVA, request.len() as u32, F_NEXT, head + 1),
            Descriptor::new(reply_iova, REPLY_LEN, F_WRITE, 0),
        ];
        for (i, d) in chain.into_iter().enumerate() {
            self.ram.write_obj(d, GuestAddress(DESC + (u64::from(head) + i as u64) * 16))?;
        }
        self.ram.write_obj(head, GuestAddress(AVAIL + 4 + u64::from(slot % QUEUE_SIZE) * 2))?;
        // The ring entry before the index that publishes it.
        std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
        self.ram.write_obj(slot + 1, GuestAddress(AVAIL + 2))?;
        Ok(head)
    }

    /// The used ring's entry for chain `slot`: (head, bytes written).
    fn used(&self, slot: u16) -> Result<(u32, u32)> {
        let idx: u16 = self.ram.read_obj(GuestAddress(USED + 2))?;
        if idx <= slot {
            return Err(format!("chain {slot} is not in the used ring").into());
        }
        std::sync::atomic::fence(std::sync::atomic::Ordering::Acquire);
        let at = USED + 4 + u64::from(slot % QUEUE_SIZE) * 8;
        Ok((self.ram.read_obj(GuestAddress(at))?, self.ram.read_obj(GuestAddress(at + 4))?))
    }

    /// The reply to chain `slot`, in page `gpa`.
    fn reply(&self, slot: u16, gpa: u64) -> Result<Vec<u8>> {
        let (_, len) = self.used(slot)?;
        self.read(gpa, len as usize)
    }

    fn read(&self, gpa: u64, len: usize) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; len];
        self.ram.read_slice(&mut buf, GuestAddress(gpa))?;
        Ok(buf)
    }

    /// One event from the device file, if one comes `within`.
    fn event(&self, within: Duration) -> Option<ioasid_backend_event> {
        if !readable(&[self.dev.file.as_fd()], within).ok()?[0] {
            return None;
        }
        let mut e = [0u32; 4];
        let n = rustix::io::read(&self.dev.file, e.as_mut_bytes()).ok()?;
        (n == size_of::<ioasid_backend_event>()).then_some(ioasid_backend_event {
            kind: e[0],
            pid: e[1],
            pasid: e[2],
            __reserved: e[3],
        })
    }
}

/// Which of `fds` are readable, waiting up to `within` for one.
fn readable(fds: &[BorrowedFd<'_>], within: Duration) -> Result<Vec<bool>> {
    use rustix::event::{PollFd, PollFlags};
    let mut polled: Vec<PollFd<'_>> = fds.iter().map(|fd| PollFd::new(fd, PollFlags::IN)).collect();
    let t = rustix::time::Timespec { tv_sec: within.as_secs() as i64, tv_nsec: within.subsec_nanos() as i64 };
    loop {
        match rustix::event::poll(&mut polled, Some(&t)) {
            Ok(_) => return Ok(polled.iter().map(|p| !p.revents().is_empty()).collect()),
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// A page request the VMM read from its fault queue, and its answer.
struct Answered {
    fault: iommu_hwpt_pgfault,
    code: u32,
    after: Duration,
}

impl Answered {
    fn describe(&self) -> String {
        let access = if self.fault.perm & IOMMU_PGFAULT_PERM_WRITE != 0 { "write" } else { "read" };
        format!(
            "page request from device {}, IOVA {:#x} ({access}), {} after the command",
            self.fault.dev_id,
            self.fault.addr,
            micros(self.after)
        )
    }
}

/// What one `serve` did.
struct Served {
    answer: String,
    faults: Vec<Answered>,
}

impl Served {
    fn describe(&self) -> String {
        let words: Vec<&str> = self.answer.splitn(3, ' ').collect();
        match words[..] {
            ["ok", head, read] => {
                let (read, written) = read.split_once(' ').unwrap_or((read, "?"));
                format!("popped chain {head} through IommuMemory: read {read} B, wrote {written} B, used ring updated")
            }
            // The innermost cause: what the port said.
            ["fault", head, why] => format!(
                "chain {head}: its reply's DMA failed: {}; completed with nothing written",
                why.rsplit(": ").next().unwrap_or(why)
            ),
            _ => format!("answered {:?}", self.answer),
        }
    }
}

/// The back-end process, killed when this is dropped.
struct Backend {
    child: Child,
    sock: OwnedFd,
}

impl Backend {
    /// Starts the back end and hands it the device and guest memory.
    fn start(dir: &Path, daemon: &Path, vmm: &Vmm) -> Result<Backend> {
        let path = dir.join("control");
        let listener =
            rustix::net::socket_with(AddressFamily::UNIX, SocketType::SEQPACKET, SocketFlags::CLOEXEC, None)?;
        rustix::net::bind(&listener, &SocketAddrUnix::new(&path)?)?;
        rustix::net::listen(&listener, 1)?;
        let mut child = Guard(Some(Command::new(std::env::current_exe()?).arg("demo-backend").arg(&path).spawn()?));
        let deadline = Instant::now() + PATIENCE;
        while !readable(&[listener.as_fd()], Duration::from_millis(50))?[0] {
            if let Some(status) = child.get().try_wait()? {
                return Err(format!("the back end exited before connecting: {status}").into());
            }
            if Instant::now() > deadline {
                return Err("the back end did not connect".into());
            }
        }
        let sock = rustix::net::accept_with(&listener, SocketFlags::CLOEXEC)?;
        let text = format!("{RAM} {}", daemon.display());
        ioasid_serve::wire::send_with(sock.as_fd(), text.as_bytes(), &[vmm.dev.file.as_fd(), vmm.memfd.as_fd()])?;
        let b = Backend { child: child.take(), sock };
        let ready = b.recv()?;
        if ready != "ready" {
            return Err(format!("the back end did not start: {ready}").into());
        }
        Ok(b)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn send(&self, cmd: &str) -> Result<()> {
        rustix::net::send(&self.sock, cmd.as_bytes(), rustix::net::SendFlags::NOSIGNAL)?;
        Ok(())
    }

    fn recv(&self) -> Result<String> {
        if !readable(&[self.sock.as_fd()], PATIENCE)?[0] {
            return Err("the back end did not answer".into());
        }
        let mut buf = [0u8; 4096];
        let n = rustix::net::recv(&self.sock, &mut buf, rustix::net::RecvFlags::empty())?.0;
        if n == 0 {
            return Err("the back end hung up".into());
        }
        Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
    }

    fn ask(&self, cmd: &str) -> Result<String> {
        self.send(cmd)?;
        self.recv()
    }

    /// Has the back end serve one chain, answering the page requests its
    /// DMA raises meanwhile with `decide`'s code.
    fn serve(&self, vmm: &Vmm, mut decide: impl FnMut(&iommu_hwpt_pgfault) -> Result<u32>) -> Result<Served> {
        let t = Instant::now();
        self.send("serve")?;
        let mut faults = Vec::new();
        loop {
            let ready = readable(&[self.sock.as_fd(), vmm.faults.as_fd()], PATIENCE)?;
            if ready[1] {
                let mut records = [iommu_hwpt_pgfault::default(); 8];
                let n = rustix::io::read(&vmm.faults, records.as_mut_bytes())? / size_of::<iommu_hwpt_pgfault>();
                for fault in &records[..n] {
                    let code = decide(fault)?;
                    // One answer per group: Linux's cookie names the group.
                    if !faults.iter().any(|a: &Answered| a.fault.cookie == fault.cookie) {
                        let response = iommu_hwpt_page_response { cookie: fault.cookie, code };
                        rustix::io::write(&vmm.faults, response.as_bytes())?;
                    }
                    faults.push(Answered { fault: *fault, code, after: t.elapsed() });
                }
            } else if ready[0] {
                return Ok(Served { answer: self.recv()?, faults });
            } else {
                return Err("the back end did not answer".into());
            }
        }
    }

    /// Ends the back end and waits for it.
    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A child killed if the start fails before a `Backend` owns it.
struct Guard(Option<Child>);

impl Guard {
    fn get(&mut self) -> &mut Child {
        self.0.as_mut().expect("taken only once")
    }

    fn take(&mut self) -> Child {
        self.0.take().expect("taken only once")
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(c) = self.0.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `ioasid demo-backend CONTROL_SOCKET`: the back end, run by the demo.
pub fn backend(control: &Path) -> Result<()> {
    // Not to outlive the demo, even one killed before it could end this.
    rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL))?;
    let sock = rustix::net::socket_with(AddressFamily::UNIX, SocketType::SEQPACKET, SocketFlags::CLOEXEC, None)?;
    // Fails if the demo ended before the death signal was set.
    rustix::net::connect(&sock, &SocketAddrUnix::new(control)?)?;
    let (text, mut fds) = receive(&sock)?.ok_or("the VMM hung up")?;
    let (len, daemon) = text.split_once(' ').ok_or("a malformed hand-over")?;
    let len: usize = len.parse()?;
    let (Some(memfd), Some(device)) = (fds.pop(), fds.pop()) else {
        return Err("the hand-over lacks the device or guest memory".into());
    };
    let port = match Port::open(Path::new(daemon), device.as_fd(), None) {
        Ok(p) => Arc::new(p),
        Err(e) => {
            say(&sock, &format!("error {e}"));
            return Err(e.into());
        }
    };
    // Guest memory as a vhost-user back end maps it: the VMM's file, at
    // guest-physical 0.
    let file = Arc::new(File::from(memfd));
    let ram = GuestMemoryMmap::from_ranges_with_files([(GuestAddress(0), len, Some(FileOffset::from_arc(file, 0)))])?;
    let memory = IommuMemory::new(ram.clone(), IommuPort::for_memory(port.clone(), &ram), true, ());
    let mut queue: Option<Queue> = None;
    say(&sock, "ready");
    while let Some((cmd, _)) = receive(&sock)? {
        let mut w = cmd.split_whitespace();
        let reply = match w.next() {
            Some("queue") => {
                let size = num(w.next()) as u16;
                let (desc, avail, used) = (num(w.next()), num(w.next()), num(w.next()));
                let made = (|| -> Result<Queue> {
                    let mut q = Queue::new(size)?;
                    q.try_set_desc_table_address(GuestAddress(desc))?;
                    q.try_set_avail_ring_address(GuestAddress(avail))?;
                    q.try_set_used_ring_address(GuestAddress(used))?;
                    q.set_ready(true);
                    Ok(q)
                })();
                match made {
                    Ok(q) => {
                        queue = Some(q);
                        "ok".into()
                    }
                    Err(e) => format!("error {e}"),
                }
            }
            Some("serve") => match queue.as_mut() {
                Some(q) => serve_chain(&memory, q),
                None => "error no queue".into(),
            },
            Some("bench") => bench(&port, num(w.next()), num(w.next()) as u32),
            _ => "error unknown command".into(),
        };
        say(&sock, &reply);
    }
    Ok(())
}

/// The device model: pops one chain and answers its request upper-cased.
/// All of it (ring reads, buffers, the used ring) is DMA at IOVAs.
fn serve_chain<M: vm_memory::GuestMemory>(memory: &M, queue: &mut Queue) -> String {
    let Some(chain) = queue.pop_descriptor_chain(memory) else { return "empty".into() };
    let head = chain.head_index();
    let mut request = Vec::new();
    let done = (|| -> Result<usize> {
        chain.clone().reader(memory)?.read_to_end(&mut request)?;
        virtio_queue::Writer::new(memory, chain)?.write_all(&request.to_ascii_uppercase())?;
        Ok(request.len())
    })();
    let written = *done.as_ref().unwrap_or(&0);
    if let Err(e) = queue.add_used(memory, head, written as u32) {
        return format!("error used ring: {e}");
    }
    match done {
        Ok(n) => format!("ok {head} {} {n}", request.len()),
        Err(e) => format!("fault {head} {e}"),
    }
}

/// One 64-byte read (a miss after the VMM's remap), then `count` more.
fn bench(port: &Port, iova: u64, count: u32) -> String {
    let mut buf = [0u8; 64];
    let t = Instant::now();
    if let Err(e) = port.read(iova, &mut buf) {
        return format!("error {e}");
    }
    let miss = t.elapsed();
    let generation = port.generation();
    let t = Instant::now();
    for _ in 0..count {
        if let Err(e) = port.read(iova, std::hint::black_box(&mut buf)) {
            return format!("error {e}");
        }
    }
    let hits = t.elapsed();
    format!("ok {} {} {}", miss.as_nanos(), hits.as_nanos(), port.generation() - generation)
}

fn num(s: Option<&str>) -> u64 {
    let s = s.unwrap_or("0");
    s.strip_prefix("0x").map_or_else(|| s.parse().unwrap_or(0), |h| u64::from_str_radix(h, 16).unwrap_or(0))
}

fn say(sock: &OwnedFd, text: &str) {
    let _ = rustix::net::send(sock, text.as_bytes(), rustix::net::SendFlags::NOSIGNAL);
}

/// One message and the descriptors it carries; `None` once the VMM hangs up.
fn receive(sock: &OwnedFd) -> Result<Option<(String, Vec<OwnedFd>)>> {
    let mut buf = [0u8; 4096];
    let (n, fds) = ioasid_serve::wire::recv_with(sock.as_fd(), &mut buf)?;
    Ok((n > 0).then(|| (String::from_utf8_lossy(&buf[..n]).into_owned(), fds)))
}
