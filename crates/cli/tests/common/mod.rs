//! Helpers shared by the tests that run C programs under `ioasid run`.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

pub fn target_dir() -> PathBuf {
    // The test binary lives in target/<profile>/deps.
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().parent().unwrap().to_path_buf()
}

/// The `ioasid` command: cargo's for this package's tests, else the one
/// in the target directory (tests of other crates include this module).
pub fn ioasid_exe() -> PathBuf {
    option_env!("CARGO_BIN_EXE_ioasid").map_or_else(|| target_dir().join("ioasid"), PathBuf::from)
}

pub fn build_shim() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args(["build", "-q", "-p", "ioasid-preload"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .unwrap();
    assert!(status.success(), "building the shim failed");
    assert!(target_dir().join("libioasid_preload.so").is_file());
}

pub fn compile(dir: &Path, program: &str) -> PathBuf {
    compile_with(dir, program, &[])
}

/// `compile`, with more flags for the compiler (`-static`, say).
pub fn compile_with(dir: &Path, program: &str, flags: &[&str]) -> PathBuf {
    let src = dir.join("prog.c");
    std::fs::write(&src, program).unwrap();
    let exe = dir.join("prog");
    let include = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../include");
    let status = Command::new("cc")
        .arg("-I")
        .arg(include)
        .args(flags)
        .arg("-o")
        .arg(&exe)
        .arg(&src)
        .status()
        .expect("a C compiler (cc)");
    assert!(status.success(), "compiling the test program failed");
    exe
}

/// Runs `program` under `ioasid run` and expects it to print "ok".
pub fn run_c(tag: &str, program: &str) {
    run_c_with(tag, program, &[]);
}

/// `run_c`, with more flags for the compiler.
pub fn run_c_with(tag: &str, program: &str, flags: &[&str]) {
    run_c_devices(tag, program, flags, &[]);
}

/// `run_c_with`, the program given the emulated PCI functions `devices`
/// (`ioasid run --device`).
pub fn run_c_devices(tag: &str, program: &str, flags: &[&str], devices: &[&str]) {
    let args: Vec<&str> = devices.iter().flat_map(|d| ["--device", d]).collect();
    run_c_args(tag, program, flags, &args);
}

/// `run_c_with`, with more arguments for `ioasid run` (`--socket PATH`,
/// `--supervised`, ...).
pub fn run_c_args(tag: &str, program: &str, flags: &[&str], run_args: &[&str]) {
    build_shim();
    let dir = std::env::temp_dir().join(format!("ioasid-run-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let prog = compile_with(&dir, program, flags);
    let out = Command::new(ioasid_exe())
        .arg("run")
        .args(run_args)
        .arg("--")
        .arg(&prog)
        .env("IOASID_PRELOAD", target_dir().join("libioasid_preload.so"))
        .output()
        .unwrap();
    std::fs::remove_dir_all(&dir).ok();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && stdout.trim() == "ok", "{stdout}{}", String::from_utf8_lossy(&out.stderr));
}

/// `ioasid run RUN_ARGS -- PROGRAM`, with the shim just built.
pub fn ioasid_run(run_args: &[&str], program: &Path) -> Command {
    let mut cmd = Command::new(ioasid_exe());
    cmd.arg("run").args(run_args).arg("--").arg(program);
    cmd.env("IOASID_PRELOAD", target_dir().join("libioasid_preload.so"));
    cmd
}

/// `ioasid serve --socket DIR/sock` in a directory of its own, stopped
/// (SIGTERM) and its directory removed when dropped.
pub struct Serve {
    pub child: Option<std::process::Child>,
    pub dir: PathBuf,
    pub socket: PathBuf,
}

impl Serve {
    pub fn start(tag: &str) -> Serve {
        Self::start_with(tag, &[])
    }

    /// `start`, with more arguments for `ioasid serve`.
    pub fn start_with(tag: &str, args: &[&str]) -> Serve {
        let dir = std::env::temp_dir().join(format!("ioasid-serve-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("sock");
        let child = Command::new(ioasid_exe())
            .arg("serve")
            .arg("--socket")
            .arg(&socket)
            .args(args)
            .env("IOASID_LOG", "warn")
            .stdin(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let mut serve = Serve { child: Some(child), dir, socket };
        serve.wait_listening();
        serve
    }

    /// Waits (10 s at most) until the daemon accepts connections.
    pub fn wait_listening(&mut self) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !listening(&self.socket) {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().unwrap()) {
                panic!("ioasid serve ended before listening: {status}");
            }
            assert!(std::time::Instant::now() < deadline, "ioasid serve does not listen");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    pub fn socket(&self) -> &str {
        self.socket.to_str().unwrap()
    }

    /// Sends SIGTERM and waits for the daemon's exit (10 s at most).
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        // SAFETY: signalling the daemon this helper started and has not reaped.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if std::time::Instant::now() > deadline {
                child.kill().ok();
                panic!("ioasid serve did not stop on SIGTERM");
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().ok();
            c.wait().ok();
        }
        std::fs::remove_dir_all(&self.dir).ok();
    }
}

/// Whether something accepts connections at `socket`.
pub fn listening(socket: &Path) -> bool {
    use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
    let Ok(sock) = rustix::net::socket_with(AddressFamily::UNIX, SocketType::SEQPACKET, SocketFlags::CLOEXEC, None)
    else {
        return false;
    };
    SocketAddrUnix::new(socket).is_ok_and(|addr| rustix::net::connect(&sock, &addr).is_ok())
}

/// The iommufd uAPI a test program needs, and `CHECK`, which prints the
/// failed condition and exits 1.
pub const IOMMUFD_C: &str = r#"
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>
#include <linux/types.h>

struct ioas_alloc { __u32 size, flags, out_ioas_id; };
struct ioas_map { __u32 size, flags, ioas_id, reserved; __u64 user_va, length, iova; };
struct ioas_unmap { __u32 size, ioas_id; __u64 iova, length; };
struct iova_range { __u64 start, last; };
struct ioas_iova_ranges { __u32 size, ioas_id, num_iovas, reserved; __u64 allowed_iovas, out_iova_alignment; };
struct destroy { __u32 size, id; };
struct fault_alloc { __u32 size, flags, out_fault_id, out_fault_fd; };
struct hwpt_alloc { __u32 size, flags, dev_id, pt_id, out_hwpt_id, reserved, data_type, data_len; __u64 data_uptr; __u32 fault_id, reserved2; };
struct test_cmd { __u32 size, op, id, reserved; __u64 arg[6]; __u32 last, pad; };
struct pgfault { __u32 flags, dev_id, pasid, grpid, perm, reserved; __u64 addr; __u32 length, cookie; };
#define IOMMU_DESTROY ((';' << 8) | 0x80)
#define IOMMU_IOAS_ALLOC ((';' << 8) | 0x81)
#define IOMMU_IOAS_IOVA_RANGES ((';' << 8) | 0x84)
#define IOMMU_IOAS_MAP ((';' << 8) | 0x85)
#define IOMMU_IOAS_UNMAP ((';' << 8) | 0x86)
#define IOMMU_HWPT_ALLOC ((';' << 8) | 0x89)
#define IOMMU_FAULT_QUEUE_ALLOC ((';' << 8) | 0x8e)
#define IOMMU_TEST_CMD ((';' << 8) | 0xa0)
#define MAP_FIXED_IOVA 1
#define MAP_WRITEABLE 2
#define MAP_READABLE 4
#define HWPT_ALLOC_NEST_PARENT 1
#define HWPT_FAULT_ID_VALID 4
#define HWPT_DATA_SELFTEST 0xdead
#define TEST_IOTLB_DEFAULT 0xbadbeef
#define TEST_OP_MOCK_DOMAIN 2
#define TEST_OP_CREATE_ACCESS 5
#define TEST_OP_MOCK_DOMAIN_REPLACE 10
#define TEST_OP_TRIGGER_IOPF 15

#define CHECK(c) do { if (!(c)) { printf("FAIL line %d: %s (errno %d)\n", __LINE__, #c, errno); fflush(stdout); _exit(1); } } while (0)

static __u32 ioas_alloc(int fd) {
    struct ioas_alloc a = { sizeof(a), 0, 0 };
    CHECK(ioctl(fd, IOMMU_IOAS_ALLOC, &a) == 0);
    return a.out_ioas_id;
}

static int ioas_map(int fd, __u32 ioas, void *buf, __u64 len, __u64 iova) {
    struct ioas_map m = { sizeof(m), MAP_FIXED_IOVA | MAP_READABLE | MAP_WRITEABLE, ioas, 0, (__u64)(unsigned long)buf, len, iova };
    return ioctl(fd, IOMMU_IOAS_MAP, &m);
}

/* The bytes unmapped, or -errno. */
static long ioas_unmap(int fd, __u32 ioas, __u64 iova, __u64 len) {
    struct ioas_unmap u = { sizeof(u), ioas, iova, len };
    if (ioctl(fd, IOMMU_IOAS_UNMAP, &u))
        return -errno;
    return (long)u.length;
}

/* A mock device on `ioas` whose page requests go to a new fault queue
   (through a nested HWPT over the IOAS): the queue's descriptor, and the
   device's ID in *idev. */
static int mock_with_fault_queue(int fd, __u32 ioas, __u32 *idev) {
    struct test_cmd t = { sizeof(t), TEST_OP_MOCK_DOMAIN, ioas };
    CHECK(ioctl(fd, IOMMU_TEST_CMD, &t) == 0);
    __u32 stdev = ((__u32 *)t.arg)[0];
    *idev = ((__u32 *)t.arg)[2];
    struct hwpt_alloc parent = { sizeof(parent), HWPT_ALLOC_NEST_PARENT, *idev, ioas };
    CHECK(ioctl(fd, IOMMU_HWPT_ALLOC, &parent) == 0);
    struct fault_alloc f = { sizeof(f), 0, 0, 0 };
    CHECK(ioctl(fd, IOMMU_FAULT_QUEUE_ALLOC, &f) == 0);
    __u32 iotlb = TEST_IOTLB_DEFAULT;
    struct hwpt_alloc nested = { sizeof(nested), HWPT_FAULT_ID_VALID, *idev, parent.out_hwpt_id, 0, 0,
                                 HWPT_DATA_SELFTEST, sizeof(iotlb), (__u64)(unsigned long)&iotlb, f.out_fault_id };
    CHECK(ioctl(fd, IOMMU_HWPT_ALLOC, &nested) == 0);
    struct test_cmd r = { sizeof(r), TEST_OP_MOCK_DOMAIN_REPLACE, stdev };
    ((__u32 *)r.arg)[0] = nested.out_hwpt_id;
    CHECK(ioctl(fd, IOMMU_TEST_CMD, &r) == 0);
    return (int)f.out_fault_fd;
}

/* A read page request of device `idev` at `iova`, in group `group`; returns
   once `queue` shows it. */
static void page_request(int fd, int queue, __u32 idev, __u32 group, __u64 iova) {
    struct test_cmd iopf = { sizeof(iopf), TEST_OP_TRIGGER_IOPF, 0 };
    ((__u32 *)iopf.arg)[0] = idev;
    ((__u32 *)iopf.arg)[2] = group;
    ((__u32 *)iopf.arg)[3] = 1;
    iopf.arg[2] = iova;
    CHECK(ioctl(fd, IOMMU_TEST_CMD, &iopf) == 0);
    struct pollfd p = { queue, POLLIN, 0 };
    CHECK(poll(&p, 1, 5000) == 1);
}

/* How many allowed ranges the IOAS has, or -errno. */
static int iova_ranges(int fd, __u32 ioas) {
    struct iova_range r[8];
    struct ioas_iova_ranges q = { sizeof(q), ioas, 8, 0, (__u64)(unsigned long)r, 0 };
    if (ioctl(fd, IOMMU_IOAS_IOVA_RANGES, &q))
        return -errno;
    return (int)q.num_iovas;
}
"#;

/// A program showing that its iommufd is a kernel file shared as Linux's:
/// `prog [STEP [ARGS]]`, prints "ok". Steps: `dup`, `fork`, `exec`,
/// `close_range`, `closefrom`, `all` (each of those, the default), `send SOCKET` (hands
/// its iommufd, with an IOAS and a mapping, to whoever listens at SOCKET,
/// then exits), `receive SOCKET` (listens, takes the iommufd, waits for a
/// line on stdin, then uses the context).
pub const FILES_C: &str = r#"
#define LEN 0x10000
#define IOVA 0x100000

static void check_dup(void) {
    int fd = open("/dev/iommu", O_RDWR);
    CHECK(fd >= 0);
    __u32 ioas = ioas_alloc(fd);
    void *buf = mmap(NULL, LEN, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    CHECK(buf != MAP_FAILED);
    CHECK(ioas_map(fd, ioas, buf, LEN, IOVA) == 0);
    int d = dup(fd);
    CHECK(d >= 0 && d != fd);
    CHECK(close(fd) == 0);
    /* The duplicate is the same context: its IOAS and mapping are there. */
    CHECK(iova_ranges(d, ioas) >= 1);
    CHECK(ioas_unmap(d, ioas, IOVA, LEN) == LEN);
    int d2 = fcntl(d, F_DUPFD_CLOEXEC, 100);
    CHECK(d2 >= 100);
    CHECK(close(d) == 0);
    CHECK(ioas_map(d2, ioas, buf, LEN, IOVA) == 0);
    CHECK(ioas_unmap(d2, ioas, IOVA, LEN) == LEN);
    CHECK(close(d2) == 0);
    /* Closed everywhere: the descriptor is gone, as Linux's is. */
    CHECK(iova_ranges(d2, ioas) == -EBADF);
    munmap(buf, LEN);
}

static void check_fork(void) {
    int fd = open("/dev/iommu", O_RDWR);
    CHECK(fd >= 0);
    __u32 ioas = ioas_alloc(fd);
    void *shared = mmap(NULL, LEN, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    CHECK(shared != MAP_FAILED);
    pid_t pid = fork();
    CHECK(pid >= 0);
    if (pid == 0) {
        /* The child maps into its parent's IOAS through the inherited fd. */
        if (ioas_map(fd, ioas, shared, LEN, IOVA) != 0)
            _exit(10);
        if (iova_ranges(fd, ioas) < 1)
            _exit(11);
        _exit(0);
    }
    int status;
    CHECK(waitpid(pid, &status, 0) == pid);
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    /* The child's mapping is in the parent's context. */
    CHECK(ioas_map(fd, ioas, shared, LEN, IOVA) == -1 && errno == EEXIST);
    CHECK(ioas_unmap(fd, ioas, IOVA, LEN) == LEN);
    CHECK(ioas_unmap(fd, ioas, IOVA, LEN) == -ENOENT);
    CHECK(close(fd) == 0);
    munmap(shared, LEN);
}

static void check_exec(const char *self) {
    int fd = open("/dev/iommu", O_RDWR);
    CHECK(fd >= 0);
    __u32 ioas = ioas_alloc(fd);
    void *shared = mmap(NULL, LEN, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    CHECK(shared != MAP_FAILED);
    CHECK(ioas_map(fd, ioas, shared, LEN, IOVA) == 0);
    pid_t pid = fork();
    CHECK(pid >= 0);
    if (pid == 0) {
        char fds[16], ioass[16];
        snprintf(fds, sizeof(fds), "%d", fd);
        snprintf(ioass, sizeof(ioass), "%u", ioas);
        execl(self, self, "exec-child", fds, ioass, (char *)NULL);
        _exit(12);
    }
    int status;
    CHECK(waitpid(pid, &status, 0) == pid);
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    /* The new image unmapped what this one mapped. */
    CHECK(ioas_unmap(fd, ioas, IOVA, LEN) == -ENOENT);
    CHECK(close(fd) == 0);
    munmap(shared, LEN);
}

/* The new image: the inherited number is the same context. */
static int exec_child(int fd, __u32 ioas) {
    if (iova_ranges(fd, ioas) < 1)
        return 20;
    if (ioas_unmap(fd, ioas, IOVA, LEN) != LEN)
        return 21;
    return 0;
}

static void check_close_range(int use_closefrom) {
    int a = open("/dev/iommu", O_RDWR);
    int b = open("/dev/iommu", O_RDWR);
    CHECK(a >= 0 && b > a);
    __u32 ioas = ioas_alloc(b);
    if (use_closefrom)
        closefrom(a);
    else
        CHECK(syscall(SYS_close_range, a, ~0U, 0) == 0);
    CHECK(fcntl(a, F_GETFD) == -1 && errno == EBADF);
    CHECK(iova_ranges(b, ioas) == -EBADF);
    /* The shim's channel went too; the next open finds its way again. */
    for (int i = 0; i < 2; i++) {
        int fd = open("/dev/iommu", O_RDWR);
        CHECK(fd >= 0);
        CHECK(iova_ranges(fd, ioas_alloc(fd)) >= 1);
        CHECK(close(fd) == 0);
    }
}

static int listener(const char *path, struct sockaddr_un *addr) {
    int s = socket(AF_UNIX, SOCK_STREAM, 0);
    CHECK(s >= 0);
    memset(addr, 0, sizeof(*addr));
    addr->sun_family = AF_UNIX;
    CHECK(strlen(path) < sizeof(addr->sun_path));
    strcpy(addr->sun_path, path);
    return s;
}

static void send_fd(const char *path) {
    int fd = open("/dev/iommu", O_RDWR | O_CLOEXEC);
    CHECK(fd >= 0);
    __u32 ioas = ioas_alloc(fd);
    void *buf = mmap(NULL, LEN, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    CHECK(buf != MAP_FAILED);
    memset(buf, 0x5a, LEN);
    CHECK(ioas_map(fd, ioas, buf, LEN, IOVA) == 0);
    struct sockaddr_un addr;
    int s = listener(path, &addr);
    CHECK(connect(s, (struct sockaddr *)&addr, sizeof(addr)) == 0);
    char byte = (char)ioas;
    struct iovec iov = { &byte, 1 };
    char control[CMSG_SPACE(sizeof(int))];
    memset(control, 0, sizeof(control));
    struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = control, .msg_controllen = sizeof(control) };
    struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(c), &fd, sizeof(int));
    CHECK(sendmsg(s, &msg, 0) == 1);
    /* Nothing of the sender's stays open: the receiver's copy is all. */
    CHECK(close(fd) == 0);
    CHECK(close(s) == 0);
}

static void receive_fd(const char *path) {
    struct sockaddr_un addr;
    int s = listener(path, &addr);
    CHECK(bind(s, (struct sockaddr *)&addr, sizeof(addr)) == 0);
    CHECK(listen(s, 1) == 0);
    printf("listening\n");
    fflush(stdout);
    int c = accept(s, NULL, NULL);
    CHECK(c >= 0);
    char byte;
    struct iovec iov = { &byte, 1 };
    char control[CMSG_SPACE(sizeof(int))];
    struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = control, .msg_controllen = sizeof(control) };
    CHECK(recvmsg(c, &msg, 0) == 1);
    struct cmsghdr *cm = CMSG_FIRSTHDR(&msg);
    CHECK(cm && cm->cmsg_type == SCM_RIGHTS);
    int fd;
    memcpy(&fd, CMSG_DATA(cm), sizeof(int));
    __u32 ioas = (unsigned char)byte;
    /* Told when the sender has exited. */
    char line[16];
    CHECK(fgets(line, sizeof(line), stdin) != NULL);
    CHECK(iova_ranges(fd, ioas) >= 1);
    CHECK(ioas_unmap(fd, ioas, IOVA, LEN) == LEN);
    void *buf = mmap(NULL, LEN, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    CHECK(ioas_map(fd, ioas, buf, LEN, IOVA) == 0);
    CHECK(close(fd) == 0);
}

int main(int argc, char **argv) {
    alarm(20);
    const char *step = argc >= 2 ? argv[1] : "all";
    int all = !strcmp(step, "all");
    if (!strcmp(step, "exec-child"))
        return exec_child(atoi(argv[2]), (__u32)atoi(argv[3]));
    if (all || !strcmp(step, "dup"))
        check_dup();
    if (all || !strcmp(step, "fork"))
        check_fork();
    if (all || !strcmp(step, "exec"))
        check_exec(argv[0]);
    if (all || !strcmp(step, "close_range"))
        check_close_range(0);
    if (all || !strcmp(step, "closefrom"))
        check_close_range(1);
    if (!strcmp(step, "send"))
        send_fd(argv[2]);
    if (!strcmp(step, "receive"))
        receive_fd(argv[2]);
    printf("ok\n");
    return 0;
}
"#;
