//! What the daemon (`ioasid serve`) costs a program: iommufd ioctls that
//! travel to it and back, and clients that come and go. `benches/run.sh`
//! starts the daemon and runs this program three times, each named by
//! `IOASID_BENCH_DAEMON`, the daemon's socket in `IOASID_BENCH_SOCKET`:
//!
//! - `shim`: under `ioasid run --socket`, where the preload shim sends each
//!   ioctl on `/dev/iommu` over the program's channel;
//! - `supervised`: under `ioasid run --supervised --socket`, where the
//!   kernel turns each ioctl into a seccomp notification the daemon answers;
//! - `clients`: on its own, as 1,000 clients one after another, each
//!   connecting as the shim does, opening a context, making an IOAS, mapping
//!   memory and disconnecting, with the daemon's resident memory before and
//!   after.
//!
//! Each figure is timed in alternation with its peers through
//! `benches/harness.rs`: a bare `SOCK_SEQPACKET` round trip of one 40-byte
//! message and its answer to another process (what any daemon pays), and
//! the same ioctl served in this process, as the shim serves it without a
//! daemon.

#[path = "../../../benches/harness.rs"]
mod harness;

use std::ffi::{CStr, CString, c_void};
use std::hint::black_box;
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use harness::{Harness, iter};
use ioasid_abi::InProcess;
use ioasid_abi::uapi::{
    IOMMU_IOAS_ALLOC, IOMMU_IOAS_IOVA_RANGES, IOMMU_IOAS_MAP, IOMMU_IOAS_MAP_FIXED_IOVA, IOMMU_IOAS_MAP_READABLE,
    IOMMU_IOAS_MAP_WRITEABLE, IOMMU_IOAS_UNMAP, iommu_ioas_alloc, iommu_ioas_iova_ranges, iommu_ioas_map,
    iommu_ioas_unmap,
};
use ioasid_engine::{Context, HostBuffer};
use ioasid_serve::client::Client;
use ioasid_serve::wire::{self, MSG_SIZE};

const PAGE: u64 = 4096;
const IOVA: u64 = 1 << 32;
/// Clients per batch, and what each maps.
const CLIENTS: usize = 1000;
const CLIENT_MAP: u64 = 1 << 20;

fn main() {
    let mode = std::env::var("IOASID_BENCH_DAEMON").unwrap_or_default();
    let Some(socket) = std::env::var_os("IOASID_BENCH_SOCKET") else {
        eprintln!("no daemon: benches/run.sh runs this benchmark beside `ioasid serve`");
        return;
    };
    let socket = CString::new(socket.into_encoded_bytes()).unwrap();
    match mode.as_str() {
        "shim" => calls(&socket, "shim --socket"),
        "supervised" => calls(&socket, "supervised"),
        "clients" => clients(&socket),
        _ => eprintln!("IOASID_BENCH_DAEMON is shim, supervised or clients"),
    }
}

fn ioctl<T>(fd: i32, request: u32, arg: &mut T) -> i32 {
    // SAFETY: `arg` is the struct `request` names, and lives for the call.
    unsafe { libc::ioctl(fd, request as _, arg as *mut T as *mut c_void) }
}

/// The shim's own path without a daemon: the dispatcher on a context in this
/// process, the program's memory reached directly.
fn in_process<T>(ctx: &Arc<Context>, request: u32, arg: &mut T) -> i32 {
    ioasid_abi::ioctl(ctx, &InProcess, request, arg as *mut T as u64).unwrap()
}

/// One ioctl, then map + unmap of one page, through the daemon, each beside
/// its peers.
fn calls(socket: &CStr, via: &str) {
    let mut h = Harness::new(&format!("daemon-{}", via.split(' ').next().unwrap()));
    let round_trip = format!("daemon: one ioctl round trip (IOMMU_IOAS_IOVA_RANGES), {via}");
    let map_unmap = format!("daemon: map + unmap of one 4 KiB page, {via}");
    if !h.wants(&round_trip) && !h.wants(&map_unmap) {
        return;
    }
    // Forked before any iommufd is open, so the shim has nothing to pass on.
    let (bare, echoed) = wire::seqpacket_pair().unwrap();
    let echo = fork_echo(Some(echoed), None);

    // SAFETY: a NUL-terminated path; the result is checked.
    let fd = unsafe { libc::open(c"/dev/iommu".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    assert!(fd >= 0, "no /dev/iommu: run under `ioasid run --socket` or `--supervised --socket`");
    assert!(served_by_daemon(fd, socket), "/dev/iommu is not the daemon's: run with --socket");
    let mut alloc = iommu_ioas_alloc { size: size_of::<iommu_ioas_alloc>() as u32, ..Default::default() };
    assert_eq!(ioctl(fd, IOMMU_IOAS_ALLOC, &mut alloc), 0);
    let ioas = alloc.out_ioas_id;
    let ctx = Arc::new(Context::new());
    let mut alloc = iommu_ioas_alloc { size: size_of::<iommu_ioas_alloc>() as u32, ..Default::default() };
    assert_eq!(in_process(&ctx, IOMMU_IOAS_ALLOC, &mut alloc), 0);
    let local_ioas = alloc.out_ioas_id;

    // Room for four ranges (a start and a last each); both sides write here.
    let mut ranges = [0u64; 8];
    let allowed_iovas = ranges.as_mut_ptr() as u64;
    let ranges_of = |ioas_id| iommu_ioas_iova_ranges {
        size: size_of::<iommu_ioas_iova_ranges>() as u32,
        ioas_id,
        num_iovas: 4,
        allowed_iovas,
        ..Default::default()
    };
    let (daemon_ranges, local_ranges) = (ranges_of(ioas), ranges_of(local_ioas));
    let ours = format!("`ioctl(IOMMU_IOAS_IOVA_RANGES)` on `/dev/iommu`, answered by `ioasid serve` ({via})");
    let daemon_call = || {
        let mut r = daemon_ranges;
        assert_eq!(ioctl(fd, IOMMU_IOAS_IOVA_RANGES, &mut r), 0);
        black_box(r.num_iovas)
    };
    h.compare(
        &round_trip,
        iter("ioasid", &ours, daemon_call),
        iter(
            "bare SOCK_SEQPACKET round trip",
            "`send` of a 40-byte message to another process, which sends it back; `recv` of the answer",
            || black_box(bounce(bare.as_fd())),
        ),
    );
    h.compare(
        &round_trip,
        iter("ioasid", &ours, daemon_call),
        iter("in process (the shim, no daemon)", "the same ioctl through the dispatcher, in this process", || {
            let mut r = local_ranges;
            assert_eq!(in_process(&ctx, IOMMU_IOAS_IOVA_RANGES, &mut r), 0);
            black_box(r.num_iovas)
        }),
    );

    let mem = HostBuffer::new(PAGE as usize).unwrap();
    let map_of = |ioas_id| iommu_ioas_map {
        size: size_of::<iommu_ioas_map>() as u32,
        flags: IOMMU_IOAS_MAP_FIXED_IOVA | IOMMU_IOAS_MAP_READABLE | IOMMU_IOAS_MAP_WRITEABLE,
        ioas_id,
        user_va: mem.addr(),
        length: PAGE,
        iova: IOVA,
        ..Default::default()
    };
    let unmap_of =
        |ioas_id| iommu_ioas_unmap { size: size_of::<iommu_ioas_unmap>() as u32, ioas_id, iova: IOVA, length: PAGE };
    let (map, unmap) = (map_of(ioas), unmap_of(ioas));
    let (local_map, local_unmap) = (map_of(local_ioas), unmap_of(local_ioas));
    h.compare(
        &map_unmap,
        iter(
            "ioasid",
            &format!(
                "`ioctl(IOMMU_IOAS_MAP)` then `ioctl(IOMMU_IOAS_UNMAP)` of anonymous memory on `/dev/iommu`, answered by `ioasid serve` ({via})"
            ),
            || {
                let (mut m, mut u) = (map, unmap);
                assert_eq!(ioctl(fd, IOMMU_IOAS_MAP, &mut m), 0);
                assert_eq!(ioctl(fd, IOMMU_IOAS_UNMAP, &mut u), 0);
            },
        ),
        iter("in process (the shim, no daemon)", "the same two ioctls through the dispatcher, in this process", || {
            let (mut m, mut u) = (local_map, local_unmap);
            assert_eq!(in_process(&ctx, IOMMU_IOAS_MAP, &mut m), 0);
            assert_eq!(in_process(&ctx, IOMMU_IOAS_UNMAP, &mut u), 0);
        }),
    );
    // SAFETY: our own descriptor, closed once.
    unsafe { libc::close(fd) };
    drop(bare);
    reap(echo);
}

/// Whether `fd` is a context of the daemon at `socket`: its file is a
/// `SOCK_SEQPACKET` socket whose other end that daemon holds.
fn served_by_daemon(fd: i32, socket: &CStr) -> bool {
    // SAFETY: `fd` stays open for the borrow.
    let fd = unsafe { BorrowedFd::borrow_raw(fd) };
    let Ok(cred) = rustix::net::sockopt::socket_peercred(fd) else { return false };
    cred.pid.as_raw_nonzero().get() == daemon_pid(socket)
}

/// The process listening at `socket` (the credentials a connection reports
/// are the listener's).
fn daemon_pid(socket: &CStr) -> i32 {
    let sock = connect(socket).expect("the daemon's socket answers");
    rustix::net::sockopt::socket_peercred(&sock).unwrap().pid.as_raw_nonzero().get()
}

fn connect(path: &CStr) -> rustix::io::Result<OwnedFd> {
    use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
    let sock = rustix::net::socket_with(AddressFamily::UNIX, SocketType::SEQPACKET, SocketFlags::CLOEXEC, None)?;
    rustix::net::connect(&sock, &SocketAddrUnix::new(path)?)?;
    Ok(sock)
}

/// One 40-byte message to the echo process and its answer back.
fn bounce(sock: BorrowedFd<'_>) -> usize {
    let mut msg = [7u8; MSG_SIZE];
    assert_eq!(rustix::net::send(sock, &msg, rustix::net::SendFlags::empty()), Ok(MSG_SIZE));
    let (n, _) = rustix::net::recv(sock, &mut msg, rustix::net::RecvFlags::empty()).unwrap();
    assert_eq!(n, MSG_SIZE);
    n
}

/// A child process that sends back each message it gets on `sock`, until
/// the other end closes, or on each connection `listener` accepts, one at a
/// time.
fn fork_echo(sock: Option<OwnedFd>, listener: Option<OwnedFd>) -> i32 {
    // SAFETY: the child makes only system calls on descriptors it already
    // has, and leaves with `_exit`: nothing of the parent's state is used.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
    if pid > 0 {
        return pid;
    }
    if let Some(s) = sock {
        echo(s.as_fd());
    }
    if let Some(l) = listener {
        while let Ok(conn) = rustix::net::accept(&l) {
            echo(conn.as_fd());
        }
    }
    // SAFETY: ends the child without running the parent's exit handlers.
    unsafe { libc::_exit(0) }
}

fn echo(sock: BorrowedFd<'_>) {
    let mut buf = [0u8; MSG_SIZE];
    loop {
        match rustix::net::recv(sock, &mut buf, rustix::net::RecvFlags::empty()) {
            Ok((0, _)) => return,
            Ok((n, _)) => {
                if rustix::net::send(sock, &buf[..n], rustix::net::SendFlags::empty()).is_err() {
                    return;
                }
            }
            Err(rustix::io::Errno::INTR) => continue,
            Err(_) => return,
        }
    }
}

/// Ends and waits for an echo child.
fn reap(pid: i32) {
    // SAFETY: our own child, signalled and waited for once.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
        libc::waitpid(pid, std::ptr::null_mut(), 0);
    }
}

/// One client as a program under the shim is one: connects, opens
/// `/dev/iommu`, makes an IOAS, maps `mem`, and goes (closing its iommufd
/// and its channel).
fn client(socket: &CStr, mem: &HostBuffer) {
    let c = Client::new(socket.to_owned(), |_, _| {});
    let fd = c.open(libc::O_RDWR | libc::O_CLOEXEC).unwrap();
    // SAFETY: the descriptor the daemon just gave us, ours alone.
    let iommufd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut alloc = iommu_ioas_alloc { size: size_of::<iommu_ioas_alloc>() as u32, ..Default::default() };
    c.ioctl(fd, IOMMU_IOAS_ALLOC, (&raw mut alloc) as u64).unwrap().unwrap();
    let mut map = iommu_ioas_map {
        size: size_of::<iommu_ioas_map>() as u32,
        flags: IOMMU_IOAS_MAP_READABLE | IOMMU_IOAS_MAP_WRITEABLE,
        ioas_id: alloc.out_ioas_id,
        user_va: mem.addr(),
        length: CLIENT_MAP,
        ..Default::default()
    };
    c.ioctl(fd, IOMMU_IOAS_MAP, (&raw mut map) as u64).unwrap().unwrap();
    drop(iommufd);
    drop(c);
}

/// The bare peer of one client: connect, one round trip, close.
fn bare_client(socket: &CStr) {
    let sock = connect(socket).unwrap();
    bounce(sock.as_fd());
}

/// `VmRSS` of process `pid`, in bytes.
fn rss(pid: i32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/PID/status");
    kib * 1024.0
}

/// Batches of 1,000 clients through the daemon, each batch in alternation
/// with 1,000 bare connections to an echo process; the daemon's resident
/// memory before and after each batch.
fn clients(socket: &CStr) {
    let mut h = Harness::new("daemon-clients");
    let time = "daemon: 1,000 clients connect, open /dev/iommu, make an IOAS, map 1 MiB, disconnect";
    let memory = "daemon: resident memory (VmRSS) after 1,000 clients, each batch";
    if !h.wants(time) && !h.wants(memory) {
        return;
    }
    let daemon = daemon_pid(socket);
    let mem = HostBuffer::new(CLIENT_MAP as usize).unwrap();
    let dir = std::env::temp_dir().join(format!("ioasid-bench-echo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let echo_path = CString::new(dir.join("echo.sock").into_os_string().into_encoded_bytes()).unwrap();
    let listener = {
        use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
        let l =
            rustix::net::socket_with(AddressFamily::UNIX, SocketType::SEQPACKET, SocketFlags::CLOEXEC, None).unwrap();
        rustix::net::bind(&l, &SocketAddrUnix::new(echo_path.as_c_str()).unwrap()).unwrap();
        rustix::net::listen(&l, 128).unwrap();
        l
    };
    let echo = fork_echo(None, Some(listener));

    let batch = |f: &dyn Fn()| {
        let t = Instant::now();
        for _ in 0..CLIENTS {
            f();
        }
        t.elapsed()
    };
    let (mut ours, mut peer, mut before, mut after) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..h.alternations() {
        before.push(rss(daemon));
        ours.push(batch(&|| client(socket, &mem)).as_nanos() as f64);
        settle(socket);
        after.push(rss(daemon));
        peer.push(batch(&|| bare_client(&echo_path)).as_nanos() as f64);
    }
    let rss_note = |v: &[f64]| format!(r#""first": {:.0}, "last": {:.0}"#, v[0], v[v.len() - 1]);
    if h.wants(time) {
        h.record(
            time,
            None,
            "ns",
            (
                "ioasid",
                "1,000 clients one after another, each as the shim's: connect, `open(\"/dev/iommu\")`, \
             `IOMMU_IOAS_ALLOC`, `IOMMU_IOAS_MAP` of 1 MiB of anonymous memory, close of the iommufd and the \
             channel (total time)",
                &ours,
                None,
            ),
            (
                "1,000 bare connections",
                "1,000 times: connect to a `SOCK_SEQPACKET` listener in another process, one 40-byte round trip, close",
                &peer,
                None,
            ),
        );
    }
    if h.wants(memory) {
        h.record(
            memory,
            None,
            "bytes",
            (
                "ioasid",
                "`VmRSS` of `ioasid serve` after a batch of 1,000 clients has gone",
                &after,
                Some(rss_note(&after)),
            ),
            ("before the batch", "`VmRSS` of `ioasid serve` before the same batch", &before, Some(rss_note(&before))),
        );
    }
    reap(echo);
    std::fs::remove_dir_all(&dir).ok();
}

/// Waits until the daemon has let go of every client that left: a request
/// on a new channel is answered only after the daemon drops what hung up,
/// and the threads of channels that closed have ended by the time the
/// daemon has been quiet a moment.
fn settle(socket: &CStr) {
    Client::new(socket.to_owned(), |_, _| {}).flush().unwrap();
    std::thread::sleep(Duration::from_millis(50));
    Client::new(socket.to_owned(), |_, _| {}).flush().unwrap();
}
