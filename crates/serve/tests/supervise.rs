//! Supervised programs: statically linked C programs reach a toy handler's
//! `/dev/iommu` through seccomp user notification, with no LD_PRELOAD.

use std::collections::HashSet;
use std::ffi::CStr;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use ioasid_abi::{Errno, UserMemory};
use ioasid_serve::supervise::{self, Call, Handler};
use parking_lot::Mutex;

// The toy's ioctls (the C side spells them again).
const TOY_ADD: u32 = 0xc008_3b70; // _IOWR(';', 0x70, uint64_t): *arg += 1000, returns 7
const TOY_TID: u32 = 0x0000_6971; // _IO('i', 0x71): returns the calling thread
const TOY_PID: u32 = 0x0000_6972; // _IO('i', 0x72): returns the calling process
const TOY_SLOW: u32 = 0x0000_3b73; // _IO(';', 0x73): counts itself after 20 ms, returns 0
const TOY_NEWFD: u32 = 0x0000_3b74; // _IO(';', 0x74): returns a new close-on-exec pipe holding "x"

/// `/dev/iommu` is a socketpair end; the handler keeps the other and knows
/// its program ends by inode.
#[derive(Default)]
struct Toy {
    ends: Mutex<Vec<OwnedFd>>,
    inodes: Mutex<HashSet<(u64, u64)>>,
    opens: AtomicUsize,
    ioctls: AtomicUsize,
    slow: AtomicUsize,
}

fn inode(fd: &OwnedFd) -> (u64, u64) {
    let st = rustix::fs::fstat(fd).unwrap();
    (st.st_dev, st.st_ino)
}

impl Handler for Toy {
    fn open(&self, _call: &Call<'_>, path: &CStr, _flags: i32) -> Option<Result<OwnedFd, Errno>> {
        if path.to_bytes() != b"/dev/iommu" {
            return None;
        }
        self.opens.fetch_add(1, Ordering::SeqCst);
        let (program, ours) = rustix::net::socketpair(
            rustix::net::AddressFamily::UNIX,
            rustix::net::SocketType::STREAM,
            rustix::net::SocketFlags::CLOEXEC,
            None,
        )
        .unwrap();
        self.inodes.lock().insert(inode(&program));
        self.ends.lock().push(ours);
        Some(Ok(program))
    }

    fn ioctl(&self, call: &Call<'_>, file: &OwnedFd, _fd: i32, request: u32, arg: u64) -> Option<Result<i64, Errno>> {
        if !self.inodes.lock().contains(&inode(file)) {
            return None;
        }
        self.ioctls.fetch_add(1, Ordering::SeqCst);
        Some(match request {
            TOY_ADD => {
                let memory = call.memory();
                let mut value = [0u8; 8];
                memory.read(arg, &mut value).and_then(|()| {
                    let sum = u64::from_ne_bytes(value) + 1000;
                    memory.write(arg, &sum.to_ne_bytes())?;
                    Ok(7)
                })
            }
            TOY_TID => Ok(call.tid().into()),
            TOY_PID => Ok(call.pid().into()),
            TOY_SLOW => {
                std::thread::sleep(Duration::from_millis(20));
                self.slow.fetch_add(1, Ordering::SeqCst);
                Ok(0)
            }
            TOY_NEWFD => {
                let (read, write) = rustix::pipe::pipe().unwrap();
                rustix::io::write(&write, b"x").unwrap();
                call.install(read, true).map(i64::from)
            }
            _ => Err(Errno::EOPNOTSUPP),
        })
    }
}

fn compile_static(tag: &str, program: &str) -> (PathBuf, PathBuf) {
    let dir = std::env::temp_dir().join(format!("ioasid-supervise-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let src = dir.join("prog.c");
    std::fs::write(&src, program).unwrap();
    let exe = dir.join("prog");
    let out = Command::new("cc")
        .args(["-static", "-pthread", "-O1", "-o"])
        .arg(&exe)
        .arg(&src)
        .output()
        .expect("a C compiler (cc)");
    assert!(out.status.success(), "compiling the test program failed: {}", String::from_utf8_lossy(&out.stderr));
    (dir, exe)
}

/// Runs `cmd` supervised by `toy`; returns its output once `serve` has
/// returned. Bounded: a program still running after 20 s is killed, and
/// its output (or `serve` still running) fails the test.
fn supervise(mut cmd: Command, toy: Arc<Toy>) -> Output {
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let (child, listener) = supervise::spawn(cmd).unwrap();
    let pid = rustix::process::Pid::from_raw(child.id() as i32).unwrap();
    let pidfd = rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()).unwrap();
    let (exited, watch) = std::sync::mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if watch.recv_timeout(Duration::from_secs(20)).is_err() {
            rustix::process::pidfd_send_signal(&pidfd, rustix::process::Signal::KILL).ok();
        }
    });
    let (done, served) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        supervise::serve(listener, toy);
        done.send(()).unwrap();
    });
    let out = child.wait_with_output().unwrap();
    drop(exited);
    watchdog.join().unwrap();
    served.recv_timeout(Duration::from_secs(20)).expect("serve returns once the program is gone");
    out
}

const PROGRAM: &str = r#"
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/openat2.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#define TOY_ADD _IOWR(';', 0x70, uint64_t)
#define TOY_TID _IO('i', 0x71)
#define TOY_PID _IO('i', 0x72)
#define TOY_NEWFD _IO(';', 0x74)
#define TOY_OTHER _IO(';', 0x7f)

static long add(int fd, uint64_t *x, int raw) {
    return raw ? syscall(SYS_ioctl, fd, TOY_ADD, x) : ioctl(fd, TOY_ADD, x);
}

static void show(const char *what, long ret, uint64_t x) {
    printf("%s %ld %d %llu\n", what, ret, ret < 0 ? errno : 0, (unsigned long long)x);
}

/* TOY_ADD on `fd` from `start`, and what it gave. */
static void try_add(const char *what, int fd, uint64_t start, int raw) {
    uint64_t x = start;
    long ret = add(fd, &x, raw);
    show(what, ret, x);
}

static int iommu;
static int pid;

static void *thread(void *unused) {
    (void)unused;
    long bad = 0;
    for (int i = 0; i < 50; i++) {
        uint64_t x = i;
        if (add(iommu, &x, i & 1) != 7 || x != (uint64_t)i + 1000)
            bad++;
    }
    if (syscall(SYS_ioctl, iommu, TOY_TID) != gettid() || ioctl(iommu, TOY_PID) != pid || gettid() == pid)
        bad++;
    return (void *)bad;
}

int main(int argc, char **argv) {
    uint64_t x;
    pid = getpid();
    iommu = open("/dev/iommu", O_RDWR);
    printf("open %d\n", iommu >= 0);
    printf("cloexec %d\n", fcntl(iommu, F_GETFD) & FD_CLOEXEC);
    try_add("libc", iommu, 5, 0);
    try_add("raw", iommu, 6, 1);
    printf("tid %d\n", ioctl(iommu, TOY_TID) == gettid());
    show("other", ioctl(iommu, TOY_OTHER), 0);
    int newfd = ioctl(iommu, TOY_NEWFD);
    char c = 0;
    printf("newfd %d %d %d\n", newfd > iommu, fcntl(newfd, F_GETFD) == FD_CLOEXEC, read(newfd, &c, 1) == 1 && c == 'x');

    int dup_fd = dup(iommu);
    try_add("dup", dup_fd, 10, 0);
    try_add("closed", dup_fd + 100, 0, 0);

    int pipes[2];
    pipe(pipes);
    try_add("pipe", pipes[0], 0, 0);

    fflush(stdout);
    pid_t child = fork();
    if (child == 0) {
        x = 20;
        long ret = add(dup_fd, &x, 1);
        printf("child %ld %llu %d\n", ret, (unsigned long long)x, ioctl(dup_fd, TOY_PID) == getpid());
        fflush(stdout);
        _exit(0);
    }
    int status;
    waitpid(child, &status, 0);

    pthread_t threads[4];
    for (int i = 0; i < 4; i++)
        pthread_create(&threads[i], NULL, thread, NULL);
    long bad = 0;
    for (int i = 0; i < 4; i++) {
        void *r;
        pthread_join(threads[i], &r);
        bad += (long)r;
    }
    printf("threads bad %ld\n", bad);

    int fd = open("/dev/iommu", O_RDWR | O_CLOEXEC);
    printf("cloexec %d\n", !!(fcntl(fd, F_GETFD) & FD_CLOEXEC));
    fd = syscall(SYS_open, "/dev/iommu", O_RDWR);
    try_add("sys_open", fd, 1, 0);
    struct open_how how = { .flags = O_RDWR };
    fd = syscall(SYS_openat2, AT_FDCWD, "/dev/iommu", &how, sizeof(how));
    try_add("openat2", fd, 2, 0);
    int dev = open("/dev", O_DIRECTORY | O_RDONLY);
    fd = openat(dev, "iommu", O_RDWR);
    try_add("dirfd", fd, 3, 0);
    chdir("/dev");
    fd = open("./iommu", O_RDWR);
    try_add("cwd", fd, 4, 0);
    /* A trailing slash is the kernel's: ENOENT, or ENOTDIR where the node exists. */
    fd = open("/dev/iommu/", O_RDWR);
    printf("slash %d\n", fd < 0 && (errno == ENOENT || errno == ENOTDIR));
    fd = open("/nonexistent/iommu", O_RDWR);
    show("missing", fd, 0);

    char buf[64] = {0};
    fd = open(argv[1], O_RDONLY);
    long n = read(fd, buf, sizeof(buf) - 1);
    printf("file %ld %s\n", n, buf);
    return argc == 2 ? 0 : 1;
}
"#;

#[test]
fn a_static_program_reaches_the_handler_and_the_kernel() {
    let (dir, exe) = compile_static("static", PROGRAM);
    let file = dir.join("plain");
    std::fs::write(&file, "hello").unwrap();
    let toy = Arc::new(Toy::default());
    let mut cmd = Command::new(&exe);
    cmd.arg(&file);
    let out = supervise(cmd, toy.clone());
    std::fs::remove_dir_all(&dir).ok();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let expected = "\
open 1
cloexec 0
libc 7 0 1005
raw 7 0 1006
tid 1
other -1 95 0
newfd 1 1 1
dup 7 0 1010
closed -1 9 0
pipe -1 25 0
child 7 1020 1
threads bad 0
cloexec 1
sys_open 7 0 1001
openat2 7 0 1002
dirfd 7 0 1003
cwd 7 0 1004
slash 1
missing -1 2 0
file 5 hello
";
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(stdout, expected, "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(toy.opens.load(Ordering::SeqCst), 6);
}

#[test]
fn serve_returns_when_a_dynamic_program_exits() {
    let toy = Arc::new(Toy::default());
    let out = supervise(Command::new("true"), toy.clone());
    assert!(out.status.success());
    assert_eq!(toy.opens.load(Ordering::SeqCst), 0);
}

/// A descendant that outlives the program is still served, and `serve`
/// waits for it.
#[test]
fn serve_waits_for_descendants() {
    let program = r#"
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <sys/ioctl.h>
#include <unistd.h>
int main(void) {
    int fd = open("/dev/iommu", O_RDWR);
    if (fork() == 0) {
        usleep(300 * 1000);
        uint64_t x = 1;
        long ret = ioctl(fd, _IOWR(';', 0x70, uint64_t), &x);
        printf("late %ld %llu\n", ret, (unsigned long long)x);
        return 0;
    }
    return 0;
}
"#;
    let (dir, exe) = compile_static("orphan", program);
    let toy = Arc::new(Toy::default());
    // The orphan keeps the program's stdout open: read it to its end.
    let out = supervise(Command::new(&exe), toy.clone());
    std::fs::remove_dir_all(&dir).ok();
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout), "late 7 1001\n");
    assert_eq!(toy.ioctls.load(Ordering::SeqCst), 1);
}

/// Signals arriving while a call is being answered do not run it twice:
/// the filter waits killably once a call is received.
#[test]
fn signals_do_not_repeat_an_answered_call() {
    let program = r#"
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/time.h>
#include <fcntl.h>
#include <unistd.h>
static volatile long ticks;
static void tick(int sig) { (void)sig; ticks++; }
int main(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = tick;
    sa.sa_flags = SA_RESTART;
    sigaction(SIGALRM, &sa, NULL);
    struct itimerval every = { { 0, 2000 }, { 0, 2000 } };
    setitimer(ITIMER_REAL, &every, NULL);
    int fd = open("/dev/iommu", O_RDWR);
    long bad = 0;
    for (int i = 0; i < 20; i++)
        if (ioctl(fd, _IO(';', 0x73)) != 0)
            bad++;
    printf("bad %ld ticks %d\n", bad, ticks > 5);
    return 0;
}
"#;
    let (dir, exe) = compile_static("signals", program);
    let toy = Arc::new(Toy::default());
    let out = supervise(Command::new(&exe), toy.clone());
    std::fs::remove_dir_all(&dir).ok();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "bad 0 ticks 1\n", "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(toy.slow.load(Ordering::SeqCst), 20);
}
