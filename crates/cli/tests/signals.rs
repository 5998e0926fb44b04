//! What programs do with signals does not reach into ioasid's calls, as it
//! does not reach into the kernel's: C programs under `ioasid run` that block
//! SIGSEGV, install or reset their own handlers, jump out of them, and make
//! iommufd calls from signal handlers.

mod common;

use std::io::Read;
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Declarations every program below shares: the uAPI structs it uses, and
/// helpers for an IOAS with a selftest access whose DMA the tests aim at
/// memory the program unmapped.
const PRELUDE: &str = r#"
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>
#include <linux/types.h>

struct ioas_alloc { __u32 size, flags, out_ioas_id; };
struct ioas_map { __u32 size, flags, ioas_id, reserved; __u64 user_va, length, iova; };
struct ioas_unmap { __u32 size, ioas_id; __u64 iova, length; };
struct destroy { __u32 size, id; };
struct fault_alloc { __u32 size, flags, out_fault_id, out_fault_fd; };
struct test_cmd { __u32 size, op, id, reserved; __u64 arg[6]; __u32 last, pad; };
#define DESTROY ((';' << 8) | 0x80)
#define IOAS_ALLOC ((';' << 8) | 0x81)
#define IOAS_MAP ((';' << 8) | 0x85)
#define IOAS_UNMAP ((';' << 8) | 0x86)
#define FAULT_QUEUE_ALLOC ((';' << 8) | 0x8e)
#define TEST_CMD ((';' << 8) | 0xa0)
#define TEST_OP_CREATE_ACCESS 5
#define TEST_OP_ACCESS_RW 8
#define ACCESS_RW_WRITE 1
#define BAD ((void *)8)

#define CHECK(c) do { if (!(c)) { printf("FAIL line %d: %s (errno %d)\n", __LINE__, #c, errno); fflush(stdout); _exit(1); } } while (0)

static int fd;
static __u32 ioas;
static int access_fd;

static void setup(void) {
    fd = open("/dev/iommu", O_RDWR);
    CHECK(fd >= 0);
    struct ioas_alloc a = { sizeof(a), 0, 0 };
    CHECK(ioctl(fd, IOAS_ALLOC, &a) == 0);
    ioas = a.out_ioas_id;
    struct test_cmd c = { sizeof(c), TEST_OP_CREATE_ACCESS, ioas };
    CHECK(ioctl(fd, TEST_CMD, &c) == 0);
    access_fd = (int)(c.arg[0] & 0xffffffff);
}

/* A device's DMA into a buffer the program mapped into the IOAS and then
   unmapped from itself: the access writes 16 bytes at `iova`. */
static int dma_into_unmapped(__u64 iova) {
    char *buf = mmap(0, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    CHECK(buf != MAP_FAILED);
    struct ioas_map m = { sizeof(m), 7, ioas, 0, (__u64)buf, 4096, iova };
    CHECK(ioctl(fd, IOAS_MAP, &m) == 0);
    munmap(buf, 4096);
    char data[16] = "from the device";
    struct test_cmd c = { sizeof(c), TEST_OP_ACCESS_RW, (__u32)access_fd };
    c.arg[0] = iova;
    c.arg[1] = sizeof(data);
    c.arg[2] = (__u64)data;
    c.arg[3] = ACCESS_RW_WRITE;
    int r = ioctl(fd, TEST_CMD, &c);
    int e = errno;
    struct ioas_unmap u = { sizeof(u), ioas, iova, 4096 };
    CHECK(ioctl(fd, IOAS_UNMAP, &u) == 0);
    errno = e;
    return r;
}

/* Both ways a program's memory reaches ioasid fail as Linux's do. */
static void copies_fail_with_efault(__u64 iova) {
    struct ioas_alloc a = { sizeof(a), 0, 0 };
    CHECK(ioctl(fd, IOAS_ALLOC, BAD) == -1 && errno == EFAULT);
    CHECK(dma_into_unmapped(iova) == -1 && errno == EFAULT);
    CHECK(ioctl(fd, IOAS_ALLOC, &a) == 0);
}

static int blocked(int sig) {
    sigset_t s;
    CHECK(pthread_sigmask(SIG_BLOCK, NULL, &s) == 0);
    return sigismember(&s, sig);
}
"#;

/// How a program run by `run` ended, and what it printed.
struct Run {
    status: ExitStatus,
    out: String,
}

impl Run {
    fn ok(&self) -> bool {
        self.status.success() && self.out.trim() == "ok"
    }
}

/// Runs `program` (after `PRELUDE`) under `ioasid run`; a program still
/// running after `limit` is killed and fails the test, so a hang cannot stall
/// the suite.
fn run(tag: &str, program: &str, limit: Duration) -> Run {
    common::build_shim();
    let dir = std::env::temp_dir().join(format!("ioasid-signals-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let prog = common::compile(&dir, &format!("{PRELUDE}{program}"));
    let mut child = Command::new(env!("CARGO_BIN_EXE_ioasid"))
        .arg("run")
        .arg("--")
        .arg(&prog)
        .env("IOASID_PRELOAD", common::target_dir().join("libioasid_preload.so"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > limit {
            child.kill().unwrap();
            child.wait().unwrap();
            std::fs::remove_dir_all(&dir).ok();
            panic!("{tag}: still running after {limit:?} (hung)");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut out = String::new();
    child.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    std::fs::remove_dir_all(&dir).ok();
    Run { status, out }
}

fn expect_ok(tag: &str, program: &str) {
    let r = run(tag, program, Duration::from_secs(60));
    assert!(r.ok(), "{tag}: {:?}\n{}", r.status, r.out);
}

/// QEMU's threads start with every signal blocked.
#[test]
fn a_thread_with_every_signal_blocked_gets_efault() {
    expect_ok(
        "blocked-thread",
        r#"
static void *created_blocked(void *p) {
    CHECK(blocked(SIGSEGV) && blocked(SIGBUS) && blocked(SIGUSR1));
    copies_fail_with_efault(0x100000);
    CHECK(blocked(SIGSEGV) && blocked(SIGBUS));
    return p;
}

static void *blocks_itself(void *p) {
    sigset_t all;
    sigfillset(&all);
    CHECK(sigprocmask(SIG_SETMASK, &all, NULL) == 0);
    copies_fail_with_efault(0x200000);
    CHECK(blocked(SIGSEGV));
    return p;
}

int main(void) {
    alarm(30);
    setup();
    sigset_t all, old;
    sigfillset(&all);
    CHECK(pthread_sigmask(SIG_BLOCK, &all, &old) == 0);
    pthread_t t;
    CHECK(pthread_create(&t, NULL, created_blocked, NULL) == 0);
    CHECK(pthread_join(t, NULL) == 0);
    /* The main thread's own block, too. */
    copies_fail_with_efault(0x300000);
    CHECK(blocked(SIGSEGV) && blocked(SIGBUS));
    CHECK(pthread_sigmask(SIG_SETMASK, &old, NULL) == 0);
    CHECK(!blocked(SIGSEGV) && !blocked(SIGBUS));
    CHECK(pthread_create(&t, NULL, blocks_itself, NULL) == 0);
    CHECK(pthread_join(t, NULL) == 0);
    printf("ok\n");
    return 0;
}
"#,
    );
}

/// The kernel forces a fault the program blocked to its default action,
/// whatever handler the program has.
#[test]
fn a_program_that_blocks_sigsegv_still_dies_of_its_own_fault() {
    let r = run(
        "blocked-own-fault",
        r#"
static void on_segv(int sig) { printf("the handler ran\n"); _exit(3); }

int main(void) {
    alarm(30);
    setup();
    copies_fail_with_efault(0x100000);
    signal(SIGSEGV, on_segv);
    sigset_t s;
    sigemptyset(&s);
    sigaddset(&s, SIGSEGV);
    CHECK(sigprocmask(SIG_BLOCK, &s, NULL) == 0);
    copies_fail_with_efault(0x200000);
    *(volatile int *)BAD = 1;
    printf("survived\n");
    return 0;
}
"#,
        Duration::from_secs(60),
    );
    assert_eq!(r.status.signal(), Some(SIGSEGV), "{:?}\n{}", r.status, r.out);
}

const SIGSEGV: i32 = 11;

/// SIG_DFL set after the first call.
#[test]
fn resetting_sigsegv_after_the_first_call_keeps_efault() {
    expect_ok(
        "sig-dfl",
        r#"
int main(void) {
    alarm(30);
    setup();
    copies_fail_with_efault(0x100000);
    void (*segv)(int) = signal(SIGSEGV, SIG_DFL);
    void (*bus)(int) = signal(SIGBUS, SIG_DFL);
    copies_fail_with_efault(0x200000);
    /* The program reads back what it had: the default action. */
    CHECK(segv == SIG_DFL && bus == SIG_DFL);
    struct sigaction dfl = { 0 };
    dfl.sa_handler = SIG_DFL;
    CHECK(sigaction(SIGSEGV, &dfl, NULL) == 0);
    copies_fail_with_efault(0x300000);
    printf("ok\n");
    return 0;
}
"#,
    );
}

/// A handler installed after the first call is never run for ioasid's
/// copies, a thread that jumps out of it keeps a working iommufd, and the
/// program's own faults still reach it.
#[test]
fn a_later_handler_sees_only_the_programs_own_faults() {
    expect_ok(
        "later-handler",
        r#"
static sigjmp_buf env;
static volatile int hits;

static void on_segv(int sig, siginfo_t *si, void *uc) {
    hits++;
    siglongjmp(env, 1);
}

static void *unmap_all(void *p) {
    struct ioas_unmap u = { sizeof(u), ioas, 0, ~0ULL };
    CHECK(ioctl(fd, IOAS_UNMAP, &u) == 0);
    return p;
}

int main(void) {
    alarm(30);
    setup();
    copies_fail_with_efault(0x100000);
    struct sigaction sa = { 0 }, old;
    sa.sa_sigaction = on_segv;
    sa.sa_flags = SA_SIGINFO;
    sigfillset(&sa.sa_mask);
    CHECK(sigaction(SIGSEGV, &sa, &old) == 0);
    CHECK(sigaction(SIGBUS, &sa, NULL) == 0);
    for (int i = 0; i < 3; i++) {
        if (sigsetjmp(env, 1) == 0) {
            copies_fail_with_efault(0x200000);
        }
        CHECK(hits == 0);
    }
    CHECK(old.sa_handler == SIG_DFL);
    /* Another thread's unmap of the same IOAS finds nothing held. */
    char *buf = mmap(0, 8192, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    struct ioas_map m = { sizeof(m), 7, ioas, 0, (__u64)buf, 8192, 0x400000 };
    CHECK(ioctl(fd, IOAS_MAP, &m) == 0);
    pthread_t t;
    CHECK(pthread_create(&t, NULL, unmap_all, NULL) == 0);
    CHECK(pthread_join(t, NULL) == 0);

    /* The program's own faults reach its handler, each time. */
    for (int i = 1; i <= 3; i++) {
        if (sigsetjmp(env, 1) == 0) {
            *(volatile int *)BAD = 1;
            CHECK(0);
        }
        CHECK(hits == i);
        CHECK(!blocked(SIGSEGV));
        copies_fail_with_efault(0x500000);
    }
    /* What it set is what it reads back. */
    CHECK(sigaction(SIGSEGV, NULL, &old) == 0);
    CHECK(old.sa_sigaction == on_segv && (old.sa_flags & SA_SIGINFO) && sigismember(&old.sa_mask, SIGINT));

    /* Jumping out without restoring the mask leaves SIGSEGV blocked, as
       the kernel would; ioasid's copies still fail with EFAULT. */
    if (sigsetjmp(env, 0) == 0) {
        *(volatile int *)BAD = 1;
        CHECK(0);
    }
    CHECK(hits == 4);
    CHECK(blocked(SIGSEGV));
    copies_fail_with_efault(0x600000);
    sigset_t s;
    sigemptyset(&s);
    sigaddset(&s, SIGSEGV);
    CHECK(sigprocmask(SIG_UNBLOCK, &s, NULL) == 0);
    if (sigsetjmp(env, 1) == 0) {
        *(volatile int *)BAD = 1;
        CHECK(0);
    }
    CHECK(hits == 5);

    CHECK(signal(SIGSEGV, SIG_DFL) == (void *)on_segv);
    CHECK(sigaction(SIGSEGV, NULL, &old) == 0 && old.sa_handler == SIG_DFL);
    copies_fail_with_efault(0x700000);
    printf("ok\n");
    return 0;
}
"#,
    );
}

/// A handler that makes iommufd calls, run by a fast timer while the main
/// thread reads a fault queue and makes calls of its own: every call the
/// handler makes succeeds, and nothing waits on itself.
#[test]
fn iommufd_calls_from_a_signal_handler_just_work() {
    expect_ok("handler-calls", &format!("#define QUEUE 0\n{FREQUENT}{HANDLER_CALLS}"));
}

/// As above, with the main thread reading a fault queue's fd.
#[test]
fn iommufd_calls_from_a_signal_handler_interrupting_a_queue_read_just_work() {
    expect_ok("handler-calls-queue", &format!("#define QUEUE 1\n{FREQUENT}{HANDLER_CALLS}"));
}

/// A timer every 20 µs, 5000 handler calls.
const FREQUENT: &str = "#define FLAGS SA_RESTART\n#define PERIOD_NS 20000\n#define CALLS 5000\n";

/// As above, with a handler that does not block its own signal
/// (`SA_NODEFER`, what `sysv_signal` installs): one that arrives inside
/// ioasid waits as the others do, rather than re-entering at once. The
/// timer is slower than a handler, so that, as under Linux, handlers do
/// not nest without end.
#[test]
fn a_nodefer_handler_waits_for_ioasid_like_any_other() {
    let nodefer = "#define FLAGS (SA_RESTART | SA_NODEFER)\n#define PERIOD_NS 2000000\n#define CALLS 200\n";
    expect_ok("handler-calls-nodefer", &format!("#define QUEUE 0\n{nodefer}{HANDLER_CALLS}"));
}

/// A handler runs while the program blocks in an ordinary call that the
/// shim only forwards (a `read` of an empty pipe, restarted after the
/// handler as `SA_RESTART` asks), and its own iommufd call works there.
#[test]
fn a_handler_runs_while_the_program_blocks_in_a_forwarded_call() {
    expect_ok(
        "forwarded-read",
        r#"
static int pipefd[2];
static volatile int handled;

static void on_alarm(int sig) {
    struct ioas_alloc a = { sizeof(a), 0, 0 };
    if (ioctl(fd, IOAS_ALLOC, &a) == 0)
        handled = 1;
    (void)write(pipefd[1], "x", 1);
}

int main(void) {
    setup();
    CHECK(pipe(pipefd) == 0);
    struct sigaction sa = { 0 };
    sa.sa_handler = on_alarm;
    sa.sa_flags = SA_RESTART;
    CHECK(sigaction(SIGALRM, &sa, NULL) == 0);
    alarm(1);
    char c;
    CHECK(read(pipefd[0], &c, 1) == 1 && c == 'x');
    CHECK(handled == 1);
    printf("ok\n");
    return 0;
}
"#,
    );
}

const HANDLER_CALLS: &str = r#"
static volatile long handled, failed, last_errno;

static void on_timer(int sig) {
    int saved = errno;
    struct ioas_alloc a = { sizeof(a), 0, 0 };
    if (ioctl(fd, IOAS_ALLOC, &a) == 0) {
        struct destroy d = { sizeof(d), a.out_ioas_id };
        if (ioctl(fd, DESTROY, &d) == 0)
            handled++;
        else
            failed++, last_errno = errno;
    } else {
        failed++, last_errno = errno;
    }
    errno = saved;
}

static void hammer(int queue, long calls) {
    long start = handled;
    char rec[40 * 4];
    while (handled - start < calls) {
        if (queue >= 0)
            CHECK(read(queue, rec, sizeof(rec)) == 0);
        struct ioas_alloc a = { sizeof(a), 0, 0 };
        CHECK(ioctl(fd, IOAS_ALLOC, &a) == 0);
        struct destroy d = { sizeof(d), a.out_ioas_id };
        CHECK(ioctl(fd, DESTROY, &d) == 0);
        if (failed)
            break;
    }
    if (failed)
        printf("handler calls failed: %ld (errno %ld) of %ld\n", failed, last_errno, failed + handled);
    CHECK(failed == 0);
}

int main(void) {
    alarm(30);
    setup();
    struct sigaction sa = { 0 };
    sa.sa_handler = on_timer;
    sa.sa_flags = FLAGS;
    CHECK(sigaction(SIGUSR1, &sa, NULL) == 0);
    struct sigevent ev = { 0 };
    ev.sigev_notify = SIGEV_SIGNAL;
    ev.sigev_signo = SIGUSR1;
    timer_t timer;
    CHECK(timer_create(CLOCK_MONOTONIC, &ev, &timer) == 0);
    struct itimerspec every = { { 0, PERIOD_NS }, { 0, PERIOD_NS } };
    CHECK(timer_settime(timer, 0, &every, NULL) == 0);
    int queue = -1;
    if (QUEUE) {
        struct fault_alloc f = { sizeof(f), 0, 0, 0 };
        CHECK(ioctl(fd, FAULT_QUEUE_ALLOC, &f) == 0);
        queue = (int)f.out_fault_fd;
    }
    hammer(queue, CALLS);
    struct itimerspec off = { 0 };
    CHECK(timer_settime(timer, 0, &off, NULL) == 0);
    printf("ok\n");
    return 0;
}
"#;
