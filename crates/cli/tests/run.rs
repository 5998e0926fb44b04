//! `ioasid run` end to end: a C program, built here, opens /dev/iommu and
//! uses it as a program written for Linux would.

mod common;

use std::process::Command;

use common::run_c;

const PROGRAM: &str = r#"
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>
#include <linux/types.h>

struct ioas_alloc { __u32 size, flags, out_ioas_id; };
struct ioas_map { __u32 size, flags, ioas_id, reserved; __u64 user_va, length, iova; };
#define IOAS_ALLOC ((';' << 8) | 0x81)
#define IOAS_MAP ((';' << 8) | 0x85)
#define VFIO_CHECK_EXTENSION ((';' << 8) | 101)

#define CHECK(c) do { if (!(c)) { printf("FAIL line %d: %s (errno %d)\n", __LINE__, #c, errno); return 1; } } while (0)

int main(void) {
    int fd = open("/dev/iommu", O_RDWR | O_CLOEXEC);
    CHECK(fd >= 0);
    CHECK((fcntl(fd, F_GETFD) & FD_CLOEXEC) != 0);
    struct ioas_alloc a = { sizeof(a), 0, 0 };
    CHECK(ioctl(fd, IOAS_ALLOC, &a) == 0 && a.out_ioas_id == 1);

    /* A duplicate names the same context. */
    int fd2 = fcntl(fd, F_DUPFD_CLOEXEC, 100);
    CHECK(fd2 >= 100);
    close(fd);
    void *buf = mmap(0, 8192, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    struct ioas_map m = { sizeof(m), 6, a.out_ioas_id, 0, (__u64)buf, 8192, 0 };
    CHECK(ioctl(fd2, IOAS_MAP, &m) == 0 && m.iova != 0);

    /* Errors come back through errno, as from the kernel. */
    a.flags = 1;
    CHECK(ioctl(fd2, IOAS_ALLOC, &a) == -1 && errno == EOPNOTSUPP);
    CHECK(ioctl(fd2, VFIO_CHECK_EXTENSION, 3) == 1);

    /* Closing the last descriptor ends the context. */
    dup2(fd2, 200);
    close(fd2);
    CHECK(ioctl(200, IOAS_ALLOC, &a) == -1 && errno == EOPNOTSUPP);
    close(200);
    CHECK(ioctl(200, IOAS_ALLOC, &a) == -1 && errno == EBADF);

    /* Failure injection through fail-nth. */
    char path[64];
    snprintf(path, sizeof(path), "/proc/self/task/%d/fail-nth", getpid());
    int nth = open(path, O_RDWR);
    CHECK(nth >= 0);
    CHECK(pwrite(nth, "1", 1, 0) == 1);
    CHECK(open("/dev/iommu", O_RDWR) == -1 && errno == ENOMEM);
    char out[8] = {0};
    CHECK(pread(nth, out, sizeof(out), 0) == 2 && out[0] == '0');
    /* A bad buffer is EFAULT, as the kernel's copy out gives, not a crash. */
    CHECK(pread(nth, NULL, sizeof(out), 0) == -1 && errno == EFAULT);
    CHECK(pread(nth, out, 0, 0) == 0);
    CHECK(open("/dev/iommu", O_RDWR) >= 0);

    /* Ordinary files are untouched. */
    CHECK(open("/definitely/not/here", O_RDONLY) == -1 && errno == ENOENT);
    printf("ok\n");
    return 0;
}
"#;

const SETS_PROGRAM: &str = r#"
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <sys/ioctl.h>
#include <ioasid/ioasid.h>

#define CHECK(c) do { if (!(c)) { printf("FAIL line %d: %s (errno %d)\n", __LINE__, #c, errno); return 1; } } while (0)

int main(void) {
    int fd = open("/dev/iommu", O_RDWR);
    CHECK(fd >= 0);
    struct ioasid_set_alloc vm = { .size = sizeof(vm), .quota = 2 };
    CHECK(ioctl(fd, IOASID_SET_ALLOC, &vm) == 0);
    struct ioasid_pasid_alloc a = { .size = sizeof(a), .flags = IOASID_PASID_ALLOC_PRIVATE,
                                    .set_id = vm.out_set_id, .vpasid = 5, .private_data = 99 };
    CHECK(ioctl(fd, IOASID_PASID_ALLOC, &a) == 0 && a.out_pasid != 0);
    struct ioasid_vpasid_lookup l = { .size = sizeof(l), .set_id = vm.out_set_id, .vpasid = 5 };
    CHECK(ioctl(fd, IOASID_VPASID_LOOKUP, &l) == 0 && l.out_pasid == a.out_pasid);
    struct ioasid_pasid_alloc b = { .size = sizeof(b), .set_id = vm.out_set_id, .min = 1, .max = 100 };
    CHECK(ioctl(fd, IOASID_PASID_ALLOC, &b) == 0);
    CHECK(ioctl(fd, IOASID_PASID_ALLOC, &b) == -1 && errno == EDQUOT);
    printf("ok\n");
    return 0;
}
"#;

const FORK_PROGRAM: &str = r#"
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>
#include <linux/types.h>

struct ioas_alloc { __u32 size, flags, out_ioas_id; };
struct ioas_map { __u32 size, flags, ioas_id, reserved; __u64 user_va, length, iova; };
struct ioas_unmap { __u32 size, ioas_id; __u64 iova, length; };
struct fault_alloc { __u32 size, flags, out_fault_id, out_fault_fd; };
#define IOAS_ALLOC ((';' << 8) | 0x81)
#define IOAS_MAP ((';' << 8) | 0x85)
#define IOAS_UNMAP ((';' << 8) | 0x86)
#define FAULT_QUEUE_ALLOC ((';' << 8) | 0x8e)

#define CHECK(c) do { if (!(c)) { printf("FAIL line %d: %s (errno %d)\n", __LINE__, #c, errno); exit(1); } } while (0)

int main(void) {
    int fd = open("/dev/iommu", O_RDWR);
    CHECK(fd >= 0);
    struct ioas_alloc a = { sizeof(a), 0, 0 };
    CHECK(ioctl(fd, IOAS_ALLOC, &a) == 0 && a.out_ioas_id == 1);
    char *buf = mmap(0, 8192, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    pid_t child = fork();
    CHECK(child >= 0);
    if (child == 0) {
        /* The child's calls act on the one context it shares. */
        struct ioas_alloc b = { sizeof(b), 0, 0 };
        CHECK(ioctl(fd, IOAS_ALLOC, &b) == 0 && b.out_ioas_id == 2);
        memset(buf, 'c', 8192);
        struct ioas_map m = { sizeof(m), 7, a.out_ioas_id, 0, (__u64)buf, 8192, 0x100000 };
        CHECK(ioctl(fd, IOAS_MAP, &m) == 0);
        m.user_va = 0x1000; m.iova = 0x200000;
        CHECK(ioctl(fd, IOAS_MAP, &m) == 0);
        struct fault_alloc f = { sizeof(f), 0, 0, 0 };
        CHECK(ioctl(fd, FAULT_QUEUE_ALLOC, &f) == -1 && errno == EOPNOTSUPP);
        exit(0);
    }
    int status;
    CHECK(waitpid(child, &status, 0) == child && WIFEXITED(status) && WEXITSTATUS(status) == 0);
    /* What the child made is in the parent's context. */
    struct ioas_alloc c = { sizeof(c), 0, 0 };
    CHECK(ioctl(fd, IOAS_ALLOC, &c) == 0 && c.out_ioas_id == 3);
    struct ioas_unmap u = { sizeof(u), a.out_ioas_id, 0x100000, 8192 };
    CHECK(ioctl(fd, IOAS_UNMAP, &u) == 0 && u.length == 8192);
    u.iova = 0x200000;
    CHECK(ioctl(fd, IOAS_UNMAP, &u) == 0 && u.length == 8192);
    printf("ok\n");
    return 0;
}
"#;

#[test]
fn a_forked_child_shares_its_parents_context() {
    run_c("fork", FORK_PROGRAM);
}

#[test]
fn a_c_program_uses_ioasid_sets_through_the_header() {
    run_c("sets", SETS_PROGRAM);
}

#[test]
fn a_c_program_gets_a_working_dev_iommu() {
    run_c("basic", PROGRAM);
}

/// The C example the README points to keeps working.
#[test]
fn the_c_example_runs() {
    run_c("example", include_str!("../examples/ioas_map.c"));
}

#[test]
fn run_without_a_program_is_a_usage_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_ioasid")).arg("run").output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("required"));
}

#[test]
fn run_reports_a_missing_shim_clearly() {
    let out = Command::new(env!("CARGO_BIN_EXE_ioasid"))
        .args(["run", "--", "true"])
        .env("IOASID_PRELOAD", "/nonexistent/libioasid_preload.so")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("IOASID_PRELOAD"));
}
