//! iommufd descriptors under `ioasid run` as Linux has them: known by the
//! open file they are rather than by their number, opened by whatever path
//! or call a program uses, and shared with forked children (and theirs)
//! without one process ever getting another's answer.

mod common;

use common::{run_c, run_c_args};

/// What every program here starts with.
const PRELUDE: &str = r#"
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/sysmacros.h>
#include <sys/wait.h>
#include <unistd.h>
#include <linux/types.h>

struct ioas_alloc { __u32 size, flags, out_ioas_id; };
struct destroy { __u32 size, id; };
struct fault_alloc { __u32 size, flags, out_fault_id, out_fault_fd; };
#define IOMMU_DESTROY ((';' << 8) | 0x80)
#define IOAS_ALLOC ((';' << 8) | 0x81)
#define FAULT_QUEUE_ALLOC ((';' << 8) | 0x8e)

#define CHECK(c) do { if (!(c)) { printf("FAIL %d line %d: %s (errno %d)\n", getpid(), __LINE__, #c, errno); \
    fflush(stdout); _exit(1); } } while (0)

/* The new IOAS's ID, or 0 with errno set. */
static __u32 ioas_alloc(int fd) {
    struct ioas_alloc a = { sizeof(a), 0, 0 };
    return ioctl(fd, IOAS_ALLOC, &a) == 0 ? a.out_ioas_id : 0;
}

static int destroy(int fd, __u32 id) {
    struct destroy d = { sizeof(d), id };
    return ioctl(fd, IOMMU_DESTROY, &d);
}

/* Waits up to `seconds` for `child` to exit 0. */
static int reap(pid_t child, int seconds) {
    int status;
    for (int i = 0; i < seconds * 1000; i++) {
        pid_t r = waitpid(child, &status, WNOHANG);
        if (r == child) return WIFEXITED(status) && WEXITSTATUS(status) == 0 ? 0 : -1;
        usleep(1000);
    }
    kill(child, SIGKILL);
    waitpid(child, &status, 0);
    printf("FAIL child %d hung\n", child);
    return -1;
}
"#;

fn run(tag: &str, body: &str) {
    run_c(tag, &format!("{PRELUDE}{body}"));
}

/// The file table was held at fork by whichever thread had it; a child
/// forked while other threads used iommufd then waited for it forever on
/// its first ioctl (about one fork in 75).
#[test]
fn a_child_forked_while_threads_use_iommufd_does_not_hang() {
    run(
        "fork-threads",
        r#"
static int fd;
static volatile int stop;

static void *hammer(void *unused) {
    (void)unused;
    while (!stop) {
        __u32 id = ioas_alloc(fd);
        if (id) destroy(fd, id);
        close(dup(fd));
    }
    return 0;
}

int main(void) {
    alarm(120);
    fd = open("/dev/iommu", O_RDWR);
    CHECK(fd >= 0);
    pthread_t t[4];
    for (int i = 0; i < 4; i++) CHECK(pthread_create(&t[i], 0, hammer, 0) == 0);
    for (int i = 0; i < 500; i++) {
        pid_t child = fork();
        CHECK(child >= 0);
        if (child == 0) _exit(ioas_alloc(fd) != 0 ? 0 : 2);
        CHECK(reap(child, 10) == 0);
    }
    stop = 1;
    for (int i = 0; i < 4; i++) pthread_join(t[i], 0);
    printf("ok\n");
    return 0;
}
"#,
    );
}

/// A child and its own child each allocate and destroy IOASes in their
/// parent's context at the same time: every answer must be their own
/// (destroying an ID that was never allocated fails, one's own IOAS goes).
#[test]
fn a_child_and_a_grandchild_get_their_own_answers() {
    run(
        "fork-grandchild",
        r#"
static void work(int fd) {
    for (int i = 0; i < 3000; i++) {
        __u32 id = ioas_alloc(fd);
        CHECK(id != 0);
        CHECK(destroy(fd, 0x7fffff00) == -1 && errno == ENOENT);
        CHECK(destroy(fd, id) == 0);
    }
}

int main(void) {
    alarm(120);
    int fd = open("/dev/iommu", O_RDWR);
    CHECK(fd >= 0);
    CHECK(ioas_alloc(fd) == 1);
    pid_t child = fork();
    CHECK(child >= 0);
    if (child == 0) {
        pid_t grandchild = fork();
        CHECK(grandchild >= 0);
        work(fd);
        if (grandchild == 0) _exit(0);
        CHECK(reap(grandchild, 60) == 0);
        _exit(0);
    }
    CHECK(reap(child, 100) == 0);
    CHECK(destroy(fd, 1) == 0);
    printf("ok\n");
    return 0;
}
"#,
    );
}

/// A child's own open of /dev/iommu is a new context, even when it gets the
/// number of the descriptor it inherited; what it inherited stays its
/// parent's.
#[test]
fn a_childs_own_open_is_a_new_context() {
    run(
        "fork-open",
        r#"
int main(void) {
    alarm(60);
    int fd = open("/dev/iommu", O_RDWR);
    CHECK(fd >= 0);
    CHECK(ioas_alloc(fd) == 1);
    int keep = dup(fd);
    CHECK(keep >= 0);
    pid_t child = fork();
    CHECK(child >= 0);
    if (child == 0) {
        /* A second descriptor, on a number the parent does not have. */
        int other = open("/dev/iommu", O_RDWR);
        CHECK(other >= 0);
        CHECK(ioas_alloc(other) == 1);
        struct fault_alloc f = { sizeof(f), 0, 0, 0 };
        CHECK(ioctl(other, FAULT_QUEUE_ALLOC, &f) == 0);
        /* The inherited number, reused for a new open. */
        CHECK(close(fd) == 0);
        int mine = open("/dev/iommu", O_RDWR);
        CHECK(mine == fd);
        CHECK(ioas_alloc(mine) == 1);
        CHECK(destroy(mine, 1) == 0);
        /* The other inherited descriptor still reaches the parent's context. */
        CHECK(ioas_alloc(keep) == 2);
        _exit(0);
    }
    CHECK(reap(child, 30) == 0);
    CHECK(ioas_alloc(fd) == 3);
    CHECK(destroy(fd, 1) == 0);
    CHECK(destroy(fd, 2) == 0);
    printf("ok\n");
    return 0;
}
"#,
    );
}

/// However a descriptor is closed, its number given to another file
/// (here /dev/null, whose ioctls answer ENOTTY) is that file.
#[test]
fn closes_behind_the_shim_end_the_iommufd() {
    run(
        "closes",
        r#"
/* A system call made with the instruction itself, past any C library. */
static long raw3(long n, long a, long b, long c) {
    long r;
    __asm__ volatile("syscall" : "=a"(r) : "a"(n), "D"(a), "S"(b), "d"(c) : "rcx", "r11", "memory");
    return r;
}

/* Opens an iommufd, closes it with `how`, and checks its number is no longer one. */
static void check(int how) {
    int fd = open("/dev/iommu", O_RDWR);
    CHECK(fd >= 0);
    CHECK(ioas_alloc(fd) == 1);
    FILE *f;
    int null = -1;
    switch (how) {
    case 0: CHECK(close_range(fd, fd, 0) == 0); break;
    case 1: closefrom(fd); break;
    case 2: f = fdopen(fd, "r+"); CHECK(f != 0); CHECK(fclose(f) == 0); break;
    case 3: CHECK(syscall(SYS_close, fd) == 0); break;
    case 4: CHECK(syscall(SYS_close_range, fd, fd, 0) == 0); break;
    case 5: null = open("/dev/null", O_RDWR); CHECK(syscall(SYS_dup3, null, fd, 0) == fd); close(null); break;
    /* Replaced by system calls the shim does not see at all: by /dev/null,
       and by a memfd of the program's (a file of the same kind as ioasid's). */
    case 6: null = open("/dev/null", O_RDWR); CHECK(raw3(SYS_dup3, null, fd, 0) == fd); close(null); break;
    case 7:
        CHECK(raw3(SYS_close, fd, 0, 0) == 0);
        CHECK(memfd_create("program's", 0) == fd);
        break;
    }
    if (how < 5) CHECK(open("/dev/null", O_RDWR) == fd);
    CHECK(ioas_alloc(fd) == 0 && errno == ENOTTY);
    CHECK(close(fd) == 0);
}

int main(void) {
    for (int how = 0; how <= 7; how++) check(how);
    /* CLOSE_RANGE_CLOEXEC closes nothing. */
    int fd = open("/dev/iommu", O_RDWR);
    CHECK(fd >= 0);
    CHECK(close_range(fd, fd, CLOSE_RANGE_CLOEXEC) == 0);
    CHECK(ioas_alloc(fd) == 1);
    printf("ok\n");
    return 0;
}
"#,
    );
}

/// The iommufd has no read, write or lseek, whatever their form, in
/// process or in the daemon (where it is a socket, which would otherwise
/// wait for a message).
const NO_READ_WRITE_C: &str = r#"
int main(void) {
    alarm(10);
    int fd = open("/dev/iommu", O_RDWR);
    CHECK(fd >= 0);
    char buf[16] = {0};
    CHECK(read(fd, buf, sizeof(buf)) == -1 && errno == EINVAL);
    CHECK(write(fd, buf, sizeof(buf)) == -1 && errno == EINVAL);
    CHECK(pread(fd, buf, sizeof(buf), 0) == -1 && errno == EINVAL);
    CHECK(pwrite(fd, buf, sizeof(buf), 0) == -1 && errno == EINVAL);
    /* Nor any vector of them. */
    struct iovec v = { buf, sizeof(buf) };
    CHECK(readv(fd, &v, 1) == -1 && errno == EINVAL);
    CHECK(writev(fd, &v, 1) == -1 && errno == EINVAL);
    CHECK(preadv(fd, &v, 1, 0) == -1 && errno == EINVAL);
    CHECK(pwritev(fd, &v, 1, 0) == -1 && errno == EINVAL);
    CHECK(preadv2(fd, &v, 1, -1, 0) == -1 && errno == EINVAL);
    CHECK(pwritev2(fd, &v, 1, -1, 0) == -1 && errno == EINVAL);
    /* Refused before the vector is looked at. */
    CHECK(readv(fd, NULL, 0) == -1 && errno == EINVAL);
    CHECK(pwritev(fd, NULL, 1, 0) == -1 && errno == EINVAL);
    /* No lseek either, however it is called; and none moves anything. */
    CHECK(lseek(fd, 0, SEEK_SET) == -1 && errno == ESPIPE);
    CHECK(lseek(fd, 0, SEEK_CUR) == -1 && errno == ESPIPE);
    CHECK(syscall(SYS_lseek, fd, 4096, SEEK_SET) == -1 && errno == ESPIPE);
    /* A duplicate is the same file. */
    int again = fcntl(fd, F_DUPFD_CLOEXEC, 100);
    CHECK(again >= 100 && read(again, buf, sizeof(buf)) == -1 && errno == EINVAL);
    CHECK(ioas_alloc(fd) == 1);
    printf("ok\n");
    return 0;
}
"#;

#[test]
fn the_iommufd_has_no_read_write_or_lseek() {
    run("no-read-write", NO_READ_WRITE_C);
}

#[test]
fn the_daemons_iommufd_has_no_read_write_or_lseek() {
    let serve = common::Serve::start("no-read-write");
    run_c_args("no-read-write-daemon", &format!("{PRELUDE}{NO_READ_WRITE_C}"), &[], &["--socket", serve.socket()]);
}

/// At the descriptor limit Linux answers EMFILE.
#[test]
fn the_iommufd_has_linuxs_errnos_for_files() {
    run(
        "file-errnos",
        r#"
int main(void) {
    int fd = open("/dev/iommu", O_RDWR);
    CHECK(fd >= 0);
    CHECK(ioas_alloc(fd) == 1);

    struct rlimit lim = { 64, 64 };
    CHECK(setrlimit(RLIMIT_NOFILE, &lim) == 0);
    int last = -1;
    for (;;) {
        int n = open("/dev/null", O_RDONLY);
        if (n < 0) { CHECK(errno == EMFILE); break; }
        last = n;
    }
    CHECK(open("/dev/iommu", O_RDWR) == -1 && errno == EMFILE);
    struct fault_alloc f = { sizeof(f), 0, 0, 0 };
    CHECK(ioctl(fd, FAULT_QUEUE_ALLOC, &f) == -1 && errno == EMFILE);
    CHECK(close(last) == 0);
    CHECK(open("/dev/iommu", O_RDWR) == last);
    printf("ok\n");
    return 0;
}
"#,
    );
}

/// Every way of naming and opening the device that real programs use
/// opens a new context, and `stat` and `access` see a character device.
#[test]
fn the_device_is_found_however_it_is_named() {
    run(
        "paths",
        r#"
struct how { __u64 flags, mode, resolve; };
extern int __open_2(const char *, int);

/* A new context: its first IOAS is 1. */
static void fresh(int fd) {
    CHECK(fd >= 0);
    CHECK(ioas_alloc(fd) == 1);
    CHECK(close(fd) == 0);
}

static void is_device(const struct stat *st) {
    CHECK(S_ISCHR(st->st_mode) && major(st->st_rdev) == 10);
}

int main(void) {
    fresh(open("/dev/../dev/iommu", O_RDWR));
    fresh(open("//dev/iommu", O_RDWR));
    fresh(open("/dev/./iommu", O_RDWR));
    int dev = open("/dev", O_RDONLY | O_DIRECTORY);
    CHECK(dev >= 0);
    fresh(openat(dev, "iommu", O_RDWR));
    CHECK(chdir("/dev") == 0);
    fresh(open("iommu", O_RDWR));
    fresh(open("./iommu", O_RDWR));
    CHECK(chdir("/") == 0);
    fresh(open("dev/iommu", O_RDWR));
    struct how how = { O_RDWR | O_CLOEXEC, 0, 0 };
    int fd = syscall(SYS_openat2, AT_FDCWD, "/dev/iommu", &how, sizeof(how));
    CHECK(fd >= 0 && (fcntl(fd, F_GETFD) & FD_CLOEXEC));
    fresh(fd);
    fresh(__open_2("/dev/iommu", O_RDWR));
    fresh(syscall(SYS_open, "/dev/iommu", O_RDWR));
    fresh(syscall(SYS_openat, AT_FDCWD, "/dev/iommu", O_RDWR));
    FILE *f = fopen("/dev/iommu", "r+e");
    CHECK(f != 0 && ioas_alloc(fileno(f)) == 1 && fclose(f) == 0);
    f = fopen64("/dev/iommu", "r+");
    CHECK(f != 0 && ioas_alloc(fileno(f)) == 1 && fclose(f) == 0);

    /* Reopening through /proc is a new open of the device, as in Linux. */
    fd = open("/dev/iommu", O_RDWR);
    CHECK(ioas_alloc(fd) == 1);
    char path[64];
    snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
    fresh(open(path, O_RDWR));
    snprintf(path, sizeof(path), "/dev/fd/%d", fd);
    fresh(open(path, O_RDWR));

    /* Names that are not the device. */
    CHECK(open("/dev/iommu/", O_RDWR) == -1);
    CHECK(open("/dev/iommux", O_RDWR) == -1 && errno == ENOENT);

    struct stat st;
    CHECK(stat("/dev/iommu", &st) == 0); is_device(&st);
    CHECK(lstat("/dev/./iommu", &st) == 0); is_device(&st);
    CHECK(fstatat(dev, "iommu", &st, 0) == 0); is_device(&st);
    CHECK(fstat(fd, &st) == 0); is_device(&st);
    CHECK(fstatat(fd, "", &st, AT_EMPTY_PATH) == 0); is_device(&st);
    struct statx sx;
    CHECK(statx(AT_FDCWD, "/dev/iommu", 0, STATX_BASIC_STATS, &sx) == 0);
    CHECK(S_ISCHR(sx.stx_mode) && sx.stx_rdev_major == 10);
    CHECK(statx(fd, "", AT_EMPTY_PATH, STATX_BASIC_STATS, &sx) == 0 && S_ISCHR(sx.stx_mode));
    CHECK(access("/dev/iommu", R_OK | W_OK) == 0);
    CHECK(faccessat(dev, "iommu", F_OK, 0) == 0);
    CHECK(access("/dev/iommu", X_OK) == -1 && errno == EACCES);
    CHECK(stat("/dev/null", &st) == 0 && S_ISCHR(st.st_mode) && major(st.st_rdev) == 1);

    /* A raw ioctl system call reaches the context too. */
    struct ioas_alloc a = { sizeof(a), 0, 0 };
    CHECK(syscall(SYS_ioctl, fd, IOAS_ALLOC, &a) == 0 && a.out_ioas_id == 2);
    printf("ok\n");
    return 0;
}
"#,
    );
}

/// What the README's "Limits" promises for the ways of starting a process.
#[test]
fn fork_by_system_call_shares_and_exec_leaves_a_plain_file() {
    run(
        "limits",
        r#"
int main(int argc, char **argv) {
    if (argc == 3) {
        /* After exec the inherited number is the memfd underneath. */
        int fd = atoi(argv[2]);
        struct stat st;
        CHECK(fstat(fd, &st) == 0 && S_ISREG(st.st_mode));
        CHECK(ioas_alloc(fd) == 0 && errno == ENOTTY);
        CHECK(ioas_alloc(open("/dev/iommu", O_RDWR)) == 1);
        printf("ok\n");
        return 0;
    }
    int fd = open("/dev/iommu", O_RDWR);
    CHECK(ioas_alloc(fd) == 1);
    /* syscall(SYS_fork) is a fork: the child shares the context. */
    pid_t child = syscall(SYS_fork);
    CHECK(child >= 0);
    if (child == 0) _exit(ioas_alloc(fd) == 2 ? 0 : 1);
    CHECK(reap(child, 30) == 0);
    CHECK(ioas_alloc(fd) == 3);
    fflush(stdout);
    char n[16];
    snprintf(n, sizeof(n), "%d", fd);
    execl("/proc/self/exe", argv[0], "exec", n, (char *)0);
    CHECK(0);
}
"#,
    );
}

/// A static binary does not load the shim: it sees the machine's own
/// /dev/iommu (here, none).
#[test]
fn a_static_binary_sees_the_machines_dev_iommu() {
    if !std::path::Path::new("/usr/lib/x86_64-linux-gnu/libc.a").exists() {
        eprintln!("no static C library: skipped");
        return;
    }
    let program = format!(
        "{PRELUDE}{}",
        r#"
int main(void) {
    int fd = open("/dev/iommu", O_RDWR);
    struct stat st;
    CHECK((fd < 0) == (stat("/dev/iommu", &st) != 0));
    if (fd >= 0) CHECK(ioas_alloc(fd) != 0 || errno != ENOTTY);
    printf("ok\n");
    return 0;
}
"#
    );
    common::run_c_with("static", &program, &["-static"]);
}

/// A `vfork` child runs in its parent's memory, without the fork handlers,
/// and closes descriptors before `exec` (as CPython's `subprocess` does):
/// its closes are of its own descriptor table and must leave the parent's
/// contexts alone.
#[test]
fn a_vfork_child_closing_the_iommufd_leaves_the_parents_context() {
    run(
        "vfork",
        r#"
int main(void) {
    int fd = open("/dev/iommu", O_RDWR);
    CHECK(fd >= 0);
    CHECK(ioas_alloc(fd) == 1);
    pid_t child = vfork();
    if (child == 0) {
        close(fd);
        _exit(0);
    }
    CHECK(child > 0 && reap(child, 10) == 0);
    CHECK(ioas_alloc(fd) == 2);
    printf("ok\n");
    return 0;
}
"#,
    );
}

/// A child's link to its parent is the only way to the parent's end: a
/// sibling forked later does not keep it, so once the parent is gone the
/// child's calls fail at once instead of waiting on a sibling that holds
/// the parent's end open.
#[test]
fn a_child_sees_its_parent_go_whatever_its_siblings_hold() {
    run(
        "siblings",
        r#"
#include <poll.h>
int main(void) {
    int result[2];
    CHECK(pipe(result) == 0);
    pid_t p = fork();
    CHECK(p >= 0);
    if (p == 0) {
        int fd = open("/dev/iommu", O_RDWR);
        CHECK(fd >= 0);
        int go[2];
        CHECK(pipe(go) == 0);
        pid_t c1 = fork();
        CHECK(c1 >= 0);
        if (c1 == 0) {
            char b;
            CHECK(read(go[0], &b, 1) == 1);
            usleep(200000); /* the parent has exited */
            int r = ioctl(fd, IOAS_ALLOC, &(struct ioas_alloc){ sizeof(struct ioas_alloc), 0, 0 });
            char answer = r == -1 && errno == EIO ? 'y' : 'n';
            CHECK(write(result[1], &answer, 1) == 1);
            _exit(0);
        }
        pid_t c2 = fork();
        CHECK(c2 >= 0);
        if (c2 == 0) {
            close(1);
            close(2);
            sleep(4);
            _exit(0);
        }
        CHECK(write(go[1], "g", 1) == 1);
        _exit(0);
    }
    close(result[1]);
    struct pollfd pfd = { result[0], POLLIN, 0 };
    CHECK(poll(&pfd, 1, 2000) == 1);
    char answer;
    CHECK(read(result[0], &answer, 1) == 1 && answer == 'y');
    printf("ok\n");
    return 0;
}
"#,
    );
}
