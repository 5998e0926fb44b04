//! A daemon run in this process, serving channels on a socket of its own:
//! what it holds (`Daemon::held`) and the pages it pins are observed while
//! programs (C, under the shim in daemon mode) and channels opened here use
//! it, and after they close, exit or die.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ioasid_abi::uapi::*;
use ioasid_serve::client::Client;
use ioasid_serve::limits::Limits;
use ioasid_serve::wire::{self, Msg};

#[path = "../../cli/tests/common/mod.rs"]
mod common;

mod served;
use served::Served;

impl Served {
    /// `program` under the shim, its contexts in this daemon.
    fn program(&self, program: &Path) -> Command {
        let mut cmd = Command::new(program);
        cmd.env("LD_PRELOAD", common::target_dir().join("libioasid_preload.so"))
            .env("IOASID_SOCKET", &self.socket)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd
    }

    /// Waits (5 s at most) until the daemon holds nothing.
    fn wait_released(&self) {
        self.wait_held(0);
    }

    /// Waits (5 s at most) until the daemon holds `n` objects.
    fn wait_held(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.daemon.held() != n {
            assert!(Instant::now() < deadline, "the daemon still holds {} objects", self.daemon.held());
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Builds the shim and compiles `source` (after the uAPI prelude).
fn compile(tag: &str, source: &str) -> (PathBuf, PathBuf) {
    common::build_shim();
    let dir = std::env::temp_dir().join(format!("ioasid-daemon-c-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let exe = common::compile(&dir, &format!("{}{source}", common::IOMMUFD_C));
    (dir, exe)
}

fn assert_ok(out: std::process::Output) {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && stdout.trim() == "ok", "{stdout}{}", String::from_utf8_lossy(&out.stderr));
}

/// Pages the daemon's contexts pin for process `pid` (`VmPin`).
fn pinned(pid: u32) -> u64 {
    ioasid_engine::account::process_pages(Some(pid as i32)).1
}

/// Runs one step of the shared files program, under a daemon that lets
/// each user hold two contexts: the step's closes must free them at once.
fn files_step(step: &str) {
    let served = Served::start(step, Limits { contexts: 2, files: 16, ..Limits::default() });
    let (dir, exe) = compile(step, common::FILES_C);
    let out = served.program(&exe).arg(step).output().unwrap();
    std::fs::remove_dir_all(&dir).ok();
    assert_ok(out);
    served.wait_released();
}

#[test]
fn dup_shares_the_context_and_the_last_close_frees_it() {
    files_step("dup");
}

#[test]
fn a_forked_child_maps_into_its_parents_ioas() {
    files_step("fork");
}

#[test]
fn exec_keeps_an_iommufd_opened_without_cloexec() {
    files_step("exec");
}

#[test]
fn close_range_frees_the_contexts_and_the_channel_comes_back() {
    files_step("close_range");
}

#[test]
fn closefrom_frees_the_contexts_and_the_channel_comes_back() {
    files_step("closefrom");
}

/// Reads one line of `child`'s stdout.
fn line(out: &mut BufReader<std::process::ChildStdout>) -> String {
    let mut l = String::new();
    out.read_line(&mut l).unwrap();
    l
}

/// Kills `child` if a test fails before it is waited for.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        self.0.kill().ok();
        self.0.wait().ok();
    }
}

#[test]
fn an_iommufd_passed_with_scm_rights_outlives_its_sender() {
    let served = Served::start("scm", Limits::default());
    let (dir, exe) = compile("scm", common::FILES_C);
    let path = dir.join("pass");
    let mut receiver = Reaped(served.program(&exe).arg("receive").arg(&path).stdin(Stdio::piped()).spawn().unwrap());
    let mut out = BufReader::new(receiver.0.stdout.take().unwrap());
    assert_eq!(line(&mut out).trim(), "listening");
    let sender = served.program(&exe).arg("send").arg(&path).output().unwrap();
    assert_ok(sender);
    // The sender is gone; the receiver's descriptor keeps the context.
    assert_eq!(served.daemon.held(), 1);
    receiver.0.stdin.take().unwrap().write_all(b"go\n").unwrap();
    let status = receiver.0.wait().unwrap();
    assert_eq!(line(&mut out).trim(), "ok", "{}", std::io::read_to_string(out).unwrap_or_default());
    assert!(status.success());
    std::fs::remove_dir_all(&dir).ok();
    served.wait_released();
}

/// Without CAP_IPC_LOCK (whose holders Linux does not charge), maps memory
/// into an IOAS a mock device is attached to (so it is pinned), allocates a fault queue with a page request waiting unanswered
/// and a selftest access, moves its iommufd to descriptor 777, prints
/// "ready IOAS" and waits to be killed.
const HOLDER_C: &str = r#"
#define LEN 0x100000
#define IOVA (1UL << 24) /* the mock's aperture */
#include <linux/capability.h>
int main(void) {
    alarm(30);
    struct __user_cap_header_struct h = { _LINUX_CAPABILITY_VERSION_3, 0 };
    struct __user_cap_data_struct caps[2];
    CHECK(syscall(SYS_capget, &h, caps) == 0);
    caps[0].effective &= ~(1u << CAP_IPC_LOCK);
    caps[0].permitted &= ~(1u << CAP_IPC_LOCK);
    caps[0].inheritable &= ~(1u << CAP_IPC_LOCK);
    CHECK(syscall(SYS_capset, &h, caps) == 0);
    int fd = open("/dev/iommu", O_RDWR);
    CHECK(fd >= 0);
    __u32 ioas = ioas_alloc(fd), idev;
    int queue = mock_with_fault_queue(fd, ioas, &idev);
    void *buf = mmap(NULL, LEN, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    CHECK(buf != MAP_FAILED);
    memset(buf, 1, LEN);
    CHECK(ioas_map(fd, ioas, buf, LEN, IOVA) == 0);
    page_request(fd, queue, idev, 1, 0xdead000);
    struct test_cmd a = { sizeof(a), TEST_OP_CREATE_ACCESS, ioas };
    CHECK(ioctl(fd, IOMMU_TEST_CMD, &a) == 0);
    CHECK(dup2(fd, 777) == 777 && close(fd) == 0);
    printf("ready %u\n", ioas);
    fflush(stdout);
    for (;;)
        pause();
}
"#;

/// Starts the holder; returns it and its IOAS once it is ready.
fn holder(served: &Served, exe: &Path) -> (Reaped, BufReader<std::process::ChildStdout>, u32) {
    let mut child = Reaped(served.program(exe).spawn().unwrap());
    let mut out = BufReader::new(child.0.stdout.take().unwrap());
    let l = line(&mut out);
    let ioas = l.strip_prefix("ready ").and_then(|n| n.trim().parse().ok());
    let Some(ioas) = ioas else {
        child.0.kill().ok();
        let err = std::io::read_to_string(child.0.stderr.take().unwrap()).unwrap_or_default();
        panic!("the holder is not ready: {l}{}{err}", std::io::read_to_string(out).unwrap_or_default());
    };
    (child, out, ioas)
}

#[test]
fn a_killed_client_leaves_nothing_held_or_pinned() {
    let served = Served::start("killed", Limits::default());
    let (dir, exe) = compile("killed", HOLDER_C);
    let (mut child, _out, _) = holder(&served, &exe);
    let pid = child.0.id();
    // The context, the fault queue and the access.
    assert_eq!(served.daemon.held(), 3);
    assert_eq!(pinned(pid), 0x100000 / 4096, "the mapping is pinned for the program");
    child.0.kill().unwrap();
    child.0.wait().unwrap();
    std::fs::remove_dir_all(&dir).ok();
    served.wait_released();
    // `held` drops as the teardown starts; the pins go as it ends.
    let deadline = Instant::now() + Duration::from_secs(5);
    while ioasid_engine::account::process_pages(Some(pid as i32)) != (0, 0) {
        assert!(
            Instant::now() < deadline,
            "pages stay pinned: {:?}",
            ioasid_engine::account::process_pages(Some(pid as i32))
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn ioctl<T>(client: &Client, fd: i32, request: u32, arg: &mut T) -> Result<i64, i32> {
    client.ioctl(fd, request, (arg as *mut T).addr() as u64).expect("the daemon's file")
}

fn ioas_alloc(client: &Client, fd: i32) -> Result<u32, i32> {
    let mut a = iommu_ioas_alloc { size: 12, ..Default::default() };
    ioctl(client, fd, IOMMU_IOAS_ALLOC, &mut a).map(|_| a.out_ioas_id)
}

fn fault_alloc(client: &Client, fd: i32) -> Result<i32, i32> {
    let mut f = iommu_fault_alloc { size: 16, ..Default::default() };
    ioctl(client, fd, IOMMU_FAULT_QUEUE_ALLOC, &mut f).map(|_| f.out_fault_fd as i32)
}

fn close(fd: i32) {
    // SAFETY: `fd` is a descriptor the daemon gave this test, closed once.
    drop(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) });
}

#[test]
fn past_its_limits_a_user_gets_emfile_until_it_closes_one() {
    let served = Served::start("limits", Limits { contexts: 2, files: 2, ..Limits::default() });
    let client = served.client();
    let a = client.open(libc::O_RDWR).unwrap();
    let b = client.open(libc::O_RDWR).unwrap();
    assert_eq!(client.open(libc::O_RDWR), Err(libc::EMFILE));
    close(a);
    let c = client.open(libc::O_RDWR).unwrap();
    assert_eq!(client.open(libc::O_RDWR), Err(libc::EMFILE));

    let q1 = fault_alloc(&client, b).unwrap();
    let q2 = fault_alloc(&client, c).unwrap();
    assert_eq!(fault_alloc(&client, b), Err(libc::EMFILE));
    close(q1);
    let q3 = fault_alloc(&client, b).unwrap();
    assert_eq!(fault_alloc(&client, c), Err(libc::EMFILE));
    assert_eq!(served.daemon.held(), 4);
    for fd in [b, c, q2, q3] {
        close(fd);
    }
    served.wait_released();
}

/// A raw channel: sends `bytes` (and `fds`) as one message.
fn send_raw(sock: &OwnedFd, bytes: &[u8], fds: &[std::os::fd::BorrowedFd<'_>]) {
    use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
    let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(2))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() {
        assert!(control.push(SendAncillaryMessage::ScmRights(fds)));
    }
    rustix::net::sendmsg(sock, &[std::io::IoSlice::new(bytes)], &mut control, SendFlags::NOSIGNAL).unwrap();
}

fn connect(served: &Served) -> OwnedFd {
    use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
    let sock =
        rustix::net::socket_with(AddressFamily::UNIX, SocketType::SEQPACKET, SocketFlags::CLOEXEC, None).unwrap();
    rustix::net::connect(&sock, &SocketAddrUnix::new(&served.socket).unwrap()).unwrap();
    sock
}

/// Sends `msg` on a raw channel and reads the daemon's answer.
fn ask(sock: &OwnedFd, msg: &Msg) -> Msg {
    wire::send(sock.as_fd(), msg, &[]).unwrap();
    wire::recv(sock.as_fd()).unwrap().expect("an answer").0
}

fn ioctl_msg(fd: i32, request: u32, arg: u64) -> Msg {
    let mut m = Msg::new(wire::IOCTL);
    m.fd = fd;
    m.request = request;
    m.arg = arg;
    m
}

/// A channel the daemon closed: the next read finds its end.
fn closed(sock: &OwnedFd) -> bool {
    matches!(wire::recv(sock.as_fd()), Ok(None) | Err(_))
}

#[test]
fn garbage_on_one_channel_neither_reaches_others_nor_disturbs_them() {
    let served = Arc::new(Served::start("garbage", Limits::default()));
    let (dir, exe) = compile("garbage", HOLDER_C);
    let (victim, _out, victim_ioas) = holder(&served, &exe);
    assert_eq!(served.daemon.held(), 3);

    // A well-behaved client works throughout, on a thread of its own.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let worker = {
        let (served, stop) = (served.clone(), stop.clone());
        std::thread::spawn(move || {
            let client = served.client();
            let fd = client.open(libc::O_RDWR).unwrap();
            let ioas = ioas_alloc(&client, fd).unwrap();
            let buf = vec![7u8; 0x4000];
            let mut rounds = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) || rounds < 50 {
                let mut map = iommu_ioas_map {
                    size: 40,
                    flags: IOMMU_IOAS_MAP_FIXED_IOVA | IOMMU_IOAS_MAP_READABLE,
                    ioas_id: ioas,
                    user_va: buf.as_ptr().addr() as u64,
                    length: 0x4000,
                    iova: 0x10000,
                    ..Default::default()
                };
                assert_eq!(ioctl(&client, fd, IOMMU_IOAS_MAP, &mut map), Ok(0));
                let mut unmap = iommu_ioas_unmap { size: 24, ioas_id: ioas, iova: 0x10000, length: 0x4000 };
                assert_eq!(ioctl(&client, fd, IOMMU_IOAS_UNMAP, &mut unmap), Ok(0));
                assert_eq!(unmap.length, 0x4000);
                rounds += 1;
            }
            close(fd);
            rounds
        })
    };

    // Short, long, and empty-but-for-descriptors messages end the channel.
    for bytes in [&[1u8, 2, 3][..], &[0u8; wire::MSG_SIZE + 8][..]] {
        let sock = connect(&served);
        send_raw(&sock, bytes, &[]);
        assert!(closed(&sock), "a {}-byte message", bytes.len());
    }
    // Unknown kinds, and the daemon's own kinds sent the wrong way, are
    // EINVAL; the channel goes on.
    let sock = connect(&served);
    for kind in [0, 99, wire::REPLY, wire::INSTALLED, wire::INSTALL, u32::MAX] {
        assert_eq!(ask(&sock, &Msg::new(kind)).result(), Err(libc::EINVAL), "kind {kind}");
    }
    // Descriptors sent with a request are not taken for anything.
    let (x, _y) = wire::seqpacket_pair().unwrap();
    let mut destroy = iommu_destroy { size: 8, id: victim_ioas };
    let request = ioctl_msg(-1, IOMMU_DESTROY, (&raw mut destroy).addr() as u64);
    wire::send(sock.as_fd(), &request, &[x.as_fd()]).unwrap();
    assert_eq!(wire::recv(sock.as_fd()).unwrap().unwrap().0.result(), Err(libc::EBADF));
    // The victim's descriptor number, which is not open here: EBADF.
    assert!(!Path::new("/proc/self/fd/777").exists());
    assert_eq!(ask(&sock, &ioctl_msg(777, IOMMU_DESTROY, (&raw mut destroy).addr() as u64)).result(), Err(libc::EBADF));
    // A descriptor of this process's that is no file of the daemon's.
    let pipe = rustix::pipe::pipe().unwrap();
    assert_eq!(ask(&sock, &ioctl_msg(pipe.0.as_raw_fd(), IOMMU_DESTROY, 0)).kind, wire::NOT_OURS);
    // An IOCTL whose argument points nowhere: EFAULT, not a crash.
    let client = served.client();
    let mine = client.open(libc::O_RDWR).unwrap();
    assert_eq!(ask(&sock, &ioctl_msg(mine, IOMMU_IOAS_ALLOC, 8)).result(), Err(libc::EFAULT));
    // A context of its own does not reach the victim's objects.
    assert_eq!(
        ask(&sock, &ioctl_msg(mine, IOMMU_DESTROY, (&raw mut destroy).addr() as u64)).result(),
        Err(libc::ENOENT)
    );
    close(mine);
    // Mapping requests for bad descriptors and absurd lengths.
    let mut mmap = Msg::new(wire::MMAP);
    mmap.fd = 777;
    mmap.arg2 = u64::MAX;
    assert_eq!(ask(&sock, &mmap).result(), Err(libc::EBADF));
    // Asking about another user's process is refused (pid 1 is root's).
    let mut pages = Msg::new(wire::PAGES);
    pages.arg = 1;
    if rustix::process::getuid().as_raw() != 0 {
        assert_eq!(ask(&sock, &pages).result(), Err(libc::EPERM));
    }
    // A SUPERVISE without a listener.
    assert_eq!(ask(&sock, &Msg::new(wire::SUPERVISE)).result(), Err(libc::EINVAL));
    drop(sock);

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(worker.join().unwrap() >= 50);
    // The victim's objects are all there.
    served.wait_held(3);
    drop(victim);
    std::fs::remove_dir_all(&dir).ok();
    served.wait_released();
}
