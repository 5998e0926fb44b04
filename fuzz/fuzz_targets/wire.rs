//! Fuzzes the daemon's end of the wire protocol (`ioasid serve`): each
//! input is one client's channel, a socket pair whose other end the channel
//! code serves on a thread of its own, fed a sequence of messages: whole
//! requests of every kind (opens, ioctls with arbitrary descriptors,
//! requests and arguments, `mmap`s, `PAGES`, `FLUSH`, `SUPERVISE` without
//! its listener), raw 40-byte messages, messages of any other length, and
//! descriptors sent where none is expected. The daemon's `INSTALL`s are
//! answered as a shim would, or wrongly (an errno, another message, a
//! descriptor back) as the input says.
//!
//! The client is this process (the channel's `SO_PEERCRED`), so the daemon
//! reads and writes this process's memory: every user pointer is aimed into
//! a sandbox region, or at addresses nothing maps, and each length the
//! daemon writes through is kept inside it, or the fuzzer's own memory could
//! be overwritten. Whatever the input, the daemon must answer every request
//! within `ANSWER` (no hang, no crash), and once the client has closed
//! everything it was given, every object the daemon held for it is dropped.
#![no_main]

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use ioasid_abi::selftest::IOMMU_TEST_CMD;
use ioasid_abi::uapi::*;
use ioasid_abi::vfio::{
    VFIO_CHECK_EXTENSION, VFIO_IOMMU_GET_INFO, VFIO_IOMMU_MAP_DMA, VFIO_IOMMU_UNMAP_DMA, VFIO_SET_IOMMU,
};
use ioasid_engine::HostBuffer;
use ioasid_serve::daemon::Daemon;
use ioasid_serve::limits::Limits;
use ioasid_serve::wire::{self, MSG_SIZE, Msg};
use libfuzzer_sys::fuzz_target;
use zerocopy::FromBytes;

const SANDBOX: usize = 1 << 20;
/// Pointers land in the first half of the sandbox, and what the daemon may
/// write through them is at most a quarter of it: nothing reaches past it.
const AIM: u64 = (SANDBOX / 2) as u64;
const ROOM: u64 = (SANDBOX / 4) as u64;
/// How long the daemon may take to answer one request.
const ANSWER: Duration = Duration::from_secs(10);
/// Bytes of input per message sent.
const STEP: usize = 94;

/// One daemon for the whole run, as `ioasid serve` has.
static DAEMON: LazyLock<Arc<Daemon>> = LazyLock::new(|| Daemon::new(Limits::default()).unwrap());

const REQUESTS: &[u32] = &[
    IOMMU_DESTROY,
    IOMMU_IOAS_ALLOC,
    IOMMU_IOAS_ALLOW_IOVAS,
    IOMMU_IOAS_COPY,
    IOMMU_IOAS_IOVA_RANGES,
    IOMMU_IOAS_MAP,
    IOMMU_IOAS_UNMAP,
    IOMMU_OPTION,
    IOMMU_VFIO_IOAS,
    IOMMU_HWPT_ALLOC,
    IOMMU_GET_HW_INFO,
    IOMMU_HWPT_SET_DIRTY_TRACKING,
    IOMMU_HWPT_GET_DIRTY_BITMAP,
    IOMMU_HWPT_INVALIDATE,
    IOMMU_FAULT_QUEUE_ALLOC,
    IOMMU_IOAS_MAP_FILE,
    IOMMU_VIOMMU_ALLOC,
    IOMMU_VDEVICE_ALLOC,
    IOMMU_VEVENTQ_ALLOC,
    ioasid_abi::hw_queue::IOMMU_HW_QUEUE_ALLOC,
    ioasid_abi::change_process::IOMMU_IOAS_CHANGE_PROCESS,
    IOMMU_TEST_CMD,
    IOMMU_TEST_CMD,
    IOMMU_TEST_CMD,
    VFIO_CHECK_EXTENSION,
    VFIO_SET_IOMMU,
    VFIO_IOMMU_GET_INFO,
    VFIO_IOMMU_MAP_DMA,
    VFIO_IOMMU_UNMAP_DMA,
];

/// A pointer field at `.0`; the daemon writes through it at most the bytes
/// its length field says (`.1`: offset, width in bytes, and the most it may
/// hold), when it writes at all.
type Pointer = (usize, Option<(usize, usize, u64)>);

/// The pointer fields of `request` (for the selftest command, of its `op`).
fn pointers(request: u32, op: u32) -> &'static [Pointer] {
    use ioasid_abi::selftest::*;
    match request {
        IOMMU_IOAS_ALLOW_IOVAS => &[(16, Some((8, 4, 64)))],
        IOMMU_IOAS_IOVA_RANGES => &[(16, Some((8, 4, 64)))],
        // A mapping's pages are written by DMA and accesses.
        IOMMU_IOAS_MAP => &[(16, Some((24, 8, ROOM)))],
        IOMMU_HWPT_ALLOC => &[(32, Some((28, 4, 4096)))],
        IOMMU_VIOMMU_ALLOC => &[(32, Some((24, 4, 4096)))],
        IOMMU_GET_HW_INFO => &[(16, Some((12, 4, 4096)))],
        // The bitmap has a bit per page_size of the range (`dirty_bitmap`).
        IOMMU_HWPT_GET_DIRTY_BITMAP => &[(40, None)],
        IOMMU_HWPT_INVALIDATE => &[(8, Some((24, 4, 64)))],
        VFIO_IOMMU_MAP_DMA => &[(8, Some((24, 8, ROOM)))],
        VFIO_IOMMU_UNMAP_DMA => &[(40, Some((32, 8, 4096)))],
        IOMMU_TEST_CMD => match op {
            IOMMU_TEST_OP_MD_CHECK_MAP => &[(32, Some((24, 8, ROOM)))],
            IOMMU_TEST_OP_MD_CHECK_REFS => &[(24, Some((16, 8, ROOM)))],
            IOMMU_TEST_OP_ACCESS_PAGES => &[(40, Some((32, 8, ROOM)))],
            IOMMU_TEST_OP_ACCESS_RW => &[(32, Some((24, 8, ROOM)))],
            IOMMU_TEST_OP_DIRTY => &[(48, Some((32, 8, ROOM)))],
            _ => &[],
        },
        _ => &[],
    }
}

/// `IOMMU_HWPT_GET_DIRTY_BITMAP`'s range, cut to a bitmap that fits.
fn dirty_bitmap(arg: &mut [u8]) {
    let page_size = read_u64(arg, 32).max(1);
    let bits = 8 * (ROOM - 64);
    if read_u64(arg, 24) / page_size >= bits {
        let length = page_size.checked_mul(bits).map_or(page_size, |max| read_u64(arg, 24) % max);
        arg[24..32].copy_from_slice(&length.to_ne_bytes());
    }
}

/// Addresses no process maps: the zero page, the kernel's half, the top.
fn garbage(x: u64) -> u64 {
    match x % 3 {
        0 => x % 4096,
        1 => 0xffff_8000_0000_0000 | x,
        _ => u64::MAX - x % 4096,
    }
}

/// `IOASID_FUZZ_TRACE=1`: each answer on stderr, to follow a reproducer.
static TRACE: LazyLock<bool> = LazyLock::new(|| std::env::var_os("IOASID_FUZZ_TRACE").is_some());

fn read_u64(arg: &[u8], at: usize) -> u64 {
    u64::from_ne_bytes(arg[at..at + 8].try_into().unwrap())
}

fn read_u32(arg: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes(arg[at..at + 4].try_into().unwrap())
}

/// The client: this process's end of the channel and what the daemon gave it.
struct Client<'a> {
    sock: Option<OwnedFd>,
    sandbox: &'a HostBuffer,
    memfd: OwnedFd,
    /// Descriptors the daemon gave: iommufds, installed files, mmap's.
    given: Vec<OwnedFd>,
}

impl Client<'_> {
    /// One of the descriptors the daemon gave, or (`pick` odd) any number.
    fn fd(&self, pick: u32) -> i32 {
        if pick & 1 == 1 || self.given.is_empty() {
            return (pick >> 1) as i32 % 1024 - 1;
        }
        self.given[(pick >> 1) as usize % self.given.len()].as_raw_fd()
    }

    fn sock(&self) -> Option<BorrowedFd<'_>> {
        self.sock.as_ref().map(|s| s.as_fd())
    }

    /// Sends `msg` (with `fds`) and serves the daemon until its answer; false
    /// once the channel is gone. `answer` says how INSTALLs are answered.
    fn call(&mut self, msg: &Msg, fds: &[BorrowedFd<'_>], answer: u8) -> bool {
        let Some(sock) = self.sock() else { return false };
        if wire::send(sock, msg, fds).is_err() {
            self.sock = None;
            return false;
        }
        self.answers(answer)
    }

    /// Reads messages until an answer (kept: its descriptors), answering
    /// INSTALL as `answer` says.
    fn answers(&mut self, answer: u8) -> bool {
        let mut installed: Vec<i32> = Vec::new();
        loop {
            let Some(sock) = self.sock() else { return false };
            let start = Instant::now();
            let got = wire::recv(sock);
            let (m, fds) = match got {
                Ok(Some(m)) => m,
                Ok(None) => {
                    self.sock = None;
                    return false;
                }
                Err(rustix::io::Errno::AGAIN) => {
                    panic!("the daemon did not answer within {:?}", start.elapsed())
                }
                Err(e) => panic!("the daemon broke its protocol: {e}"),
            };
            match m.kind {
                wire::INSTALL => {
                    let mut back = Msg::new(wire::INSTALLED);
                    let Some(fd) = fds.into_iter().next() else { panic!("INSTALL without a descriptor") };
                    let mut extra = None;
                    match answer % 8 {
                        // The shim's program ran out of descriptors, say.
                        1 => back.value = -i64::from(libc::EMFILE),
                        // Another message where INSTALLED is due.
                        2 => back.kind = wire::FLUSH,
                        // An answer that comes with a descriptor.
                        3 => {
                            back.value = i64::from(fd.as_raw_fd());
                            extra = Some(fd);
                        }
                        _ => {
                            back.value = i64::from(fd.as_raw_fd());
                            installed.push(fd.as_raw_fd());
                            self.given.push(fd);
                        }
                    }
                    let sock = self.sock().expect("checked above");
                    let passed: Vec<_> = extra.iter().map(|f| f.as_fd()).collect();
                    if wire::send(sock, &back, &passed).is_err() {
                        self.sock = None;
                        return false;
                    }
                }
                wire::UNINSTALL => {
                    // Only a descriptor given during this call is the daemon's to take back.
                    if installed.contains(&m.fd) {
                        self.given.retain(|f| f.as_raw_fd() != m.fd);
                    }
                }
                wire::REPLY | wire::NOT_OURS => {
                    if *TRACE {
                        eprintln!("answer {m:?}, {} descriptors", fds.len());
                    }
                    self.given.extend(fds);
                    return true;
                }
                k => panic!("the daemon sent a message of kind {k}"),
            }
        }
    }

    /// An ioctl on a descriptor; its struct (from `body`) at the start of the
    /// sandbox, its pointers aimed into it.
    fn ioctl(&mut self, flags: u8, body: &[u8]) -> Msg {
        let mut arg = [0u8; 128];
        arg[..body.len() - 8].copy_from_slice(&body[8..]);
        let pick = read_u32(body, 0);
        let mut m = Msg::new(wire::IOCTL);
        m.fd = self.fd(pick);
        let which = read_u32(body, 4);
        m.request = if flags & 0x10 != 0 { which } else { REQUESTS[which as usize % REQUESTS.len()] };
        let sandbox = self.sandbox.addr();
        for &(at, len) in pointers(m.request, read_u32(&arg, 4)) {
            let ptr = sandbox + read_u64(&arg, at) % AIM;
            arg[at..at + 8].copy_from_slice(&ptr.to_ne_bytes());
            match len {
                Some((l, 4, max)) => {
                    let n = u64::from(read_u32(&arg, l)) % (max + 1);
                    arg[l..l + 4].copy_from_slice(&(n as u32).to_ne_bytes());
                }
                Some((l, _, max)) => {
                    let n = read_u64(&arg, l);
                    // u64::MAX stays, for the overflow paths.
                    let n = if n == u64::MAX { n } else { n % (max + 1) };
                    arg[l..l + 8].copy_from_slice(&n.to_ne_bytes());
                }
                None => {}
            }
        }
        match m.request {
            IOMMU_HWPT_GET_DIRTY_BITMAP => dirty_bitmap(&mut arg),
            // The capability chain is written up to argsz.
            VFIO_IOMMU_GET_INFO => {
                let argsz = read_u32(&arg, 0) % 4096;
                arg[0..4].copy_from_slice(&argsz.to_ne_bytes());
            }
            IOMMU_IOAS_MAP_FILE if flags & 0x20 == 0 => {
                arg[12..16].copy_from_slice(&self.memfd.as_raw_fd().to_ne_bytes())
            }
            _ => {}
        }
        self.sandbox.write_at(0, &arg);
        // A request outside the list may be one whose pointers are not
        // aimed above: its argument points nowhere.
        m.arg = match flags & 0x0c {
            _ if flags & 0x10 != 0 => garbage(read_u64(&arg, 16)),
            0x04 => garbage(read_u64(&arg, 16)),
            0x08 => u64::from(arg[8]),
            _ => sandbox,
        };
        m
    }
}

fn sandbox_fd() -> OwnedFd {
    // SAFETY: memfd_create with a valid name; the descriptor is ours.
    let fd = unsafe { libc::memfd_create(c"ioasid-fuzz-wire".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: just created, owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    rustix::fs::ftruncate(&fd, 1 << 16).unwrap();
    fd
}

fuzz_target!(|data: &[u8]| {
    let daemon = &*DAEMON;
    daemon.reap();
    let before = daemon.held();
    let Ok(sandbox) = HostBuffer::new(SANDBOX) else { return };
    let (ours, theirs) = wire::seqpacket_pair().unwrap();
    rustix::net::sockopt::set_socket_timeout(&ours, rustix::net::sockopt::Timeout::Recv, Some(ANSWER)).unwrap();
    let d = daemon.clone();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let channel = std::thread::spawn(move || {
        ioasid_serve::channel::serve_one(&d, theirs);
        let _ = done_tx.send(());
    });
    let mut client = Client { sock: Some(ours), sandbox: &sandbox, memfd: sandbox_fd(), given: Vec::new() };

    // Each step: a byte choosing what to send, a byte of flags, four of
    // failure injection, and 88 of message, struct or operands.
    for step in data.chunks(STEP).take(48) {
        let mut bytes = [0u8; STEP];
        bytes[..step.len()].copy_from_slice(step);
        let (what, flags) = (bytes[0], bytes[1]);
        let body = &bytes[6..];
        let mut passed: Option<OwnedFd> = None;
        let mut m = match what % 12 {
            0 | 1 => Msg { arg: u64::from(read_u32(body, 0)), ..Msg::new(wire::OPEN) },
            2..=5 => client.ioctl(flags, body),
            6 => Msg {
                fd: client.fd(read_u32(body, 0)),
                request: read_u32(body, 4),
                arg: read_u64(body, 8),
                arg2: read_u64(body, 16) % (1 << 24),
                value: read_u64(body, 24) as i64,
                ..Msg::new(wire::MMAP)
            },
            7 => {
                let pid = match flags & 3 {
                    0 => u64::from(std::process::id()),
                    1 => 1,
                    _ => read_u64(body, 8),
                };
                Msg { request: read_u32(body, 4), arg: pid, ..Msg::new(wire::PAGES) }
            }
            // SUPERVISE without its listener.
            8 => Msg::new(if flags & 1 == 0 { wire::FLUSH } else { wire::SUPERVISE }),
            9 => {
                // A whole message of any kind; an ioctl's argument points
                // nowhere, so nothing of this process is reached.
                let mut m = Msg::read_from_bytes(&body[..MSG_SIZE]).unwrap();
                if m.kind == wire::IOCTL {
                    m.arg = garbage(m.arg);
                }
                if m.kind == wire::MMAP {
                    m.arg2 %= 1 << 24;
                }
                m
            }
            10 => {
                // A message of another length: the daemon hangs up.
                let len = usize::from(body[0]) % (body.len() - 1);
                let len = if len == MSG_SIZE { MSG_SIZE + 1 } else { len };
                if let Some(sock) = client.sock() {
                    let _ = rustix::net::send(sock, &body[1..1 + len], rustix::net::SendFlags::NOSIGNAL);
                }
                // Its hang-up is all that comes back (an empty message reads as one).
                let _ = client.answers(flags);
                continue;
            }
            _ if flags & 1 == 0 && !client.given.is_empty() => {
                // The program closes a descriptor.
                let i = usize::from(body[0]) % client.given.len();
                client.given.swap_remove(i);
                continue;
            }
            _ => {
                // A descriptor where none is expected.
                passed = Some(client.memfd.try_clone().unwrap());
                Msg::new(wire::FLUSH)
            }
        };
        // Failure injection: mostly off, else the nth allocation fails.
        let nth = read_u32(&bytes, 2);
        m.fail_nth = if nth % 4 == 0 { nth / 4 % 64 } else { 0 };
        if *TRACE {
            eprintln!("send {m:?}");
        }
        let passed: Vec<_> = passed.iter().map(|f| f.as_fd()).collect();
        if !client.call(&m, &passed, flags >> 5) {
            break;
        }
    }

    // The program exits: its descriptors close, its channel with them.
    drop(client);
    done_rx.recv_timeout(ANSWER).expect("the channel's thread did not end once its client hung up");
    channel.join().unwrap();
    let deadline = Instant::now() + ANSWER;
    loop {
        daemon.reap();
        if daemon.held() == before {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a gone client left the daemon holding {} objects (before it, {before})",
            daemon.held()
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    drop(sandbox);
});
