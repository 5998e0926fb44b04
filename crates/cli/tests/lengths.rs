//! Lengths a program passes under `ioasid run`: whatever the count of a
//! `read` or `write` on an iommufd queue's descriptor, the answer is a count
//! or an errno, in the program and in the parent that serves its forked
//! children.

mod common;

use common::run_c;

/// Near 2^46 and near SIZE_MAX, in whole fault records (40 bytes) and whole
/// responses (8 bytes); from the program itself and from a forked child.
const FAULT_COUNTS_PROGRAM: &str = r#"
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>
#include <linux/types.h>

struct ioas_alloc { __u32 size, flags, out_ioas_id; };
struct fault_alloc { __u32 size, flags, out_fault_id, out_fault_fd; };
#define IOAS_ALLOC ((';' << 8) | 0x81)
#define FAULT_QUEUE_ALLOC ((';' << 8) | 0x8e)

#define CHECK(c) do { if (!(c)) { printf("FAIL line %d: %s (errno %d)\n", __LINE__, #c, errno); return 1; } } while (0)

static const size_t reads[] = { (1ull << 46) / 40 * 40, SIZE_MAX / 40 * 40 };
static const size_t writes[] = { (1ull << 46) / 8 * 8, SIZE_MAX / 8 * 8 };

/* A huge count at the last bytes of a mapping, then unmapped memory. */
static int queue_io(int ffd, char *end) {
    for (int i = 0; i < 2; i++) {
        CHECK(read(ffd, end - 40, reads[i]) == 0);
        /* A zeroed response (cookie 0, never handed out), then the end. */
        CHECK(write(ffd, end - 8, writes[i]) == -1 && errno == EINVAL);
        CHECK(write(ffd, end, writes[i]) == -1 && errno == EFAULT);
    }
    return 0;
}

int main(void) {
    int fd = open("/dev/iommu", O_RDWR);
    CHECK(fd >= 0);
    struct fault_alloc f = { sizeof(f), 0, 0, 0 };
    CHECK(ioctl(fd, FAULT_QUEUE_ALLOC, &f) == 0);
    char *page = mmap(0, 8192, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    CHECK(page != MAP_FAILED && munmap(page + 4096, 4096) == 0);
    CHECK(queue_io(f.out_fault_fd, page + 4096) == 0);

    pid_t child = fork();
    CHECK(child >= 0);
    if (child == 0)
        _exit(queue_io(f.out_fault_fd, page + 4096) == 0 ? 0 : 1);
    int status;
    CHECK(waitpid(child, &status, 0) == child && WIFEXITED(status) && WEXITSTATUS(status) == 0);

    /* The parent that served the child's calls is alive and well. */
    struct ioas_alloc a = { sizeof(a), 0, 0 };
    CHECK(ioctl(fd, IOAS_ALLOC, &a) == 0);
    printf("ok\n");
    return 0;
}
"#;

#[test]
fn huge_counts_on_a_fault_queue_are_errnos_in_the_program_and_its_forked_child() {
    run_c("fault-counts", FAULT_COUNTS_PROGRAM);
}

/// A memfd mapped with IOAS_MAP_FILE, then truncated behind the mapping:
/// a read through the IOAS past the file's end is EFAULT, not SIGBUS.
const TRUNCATED_FILE_PROGRAM: &str = r#"
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>
#include <linux/types.h>

struct ioas_alloc { __u32 size, flags, out_ioas_id; };
struct ioas_map_file { __u32 size, flags, ioas_id; __s32 fd; __u64 start, length, iova; };
struct test_cmd {
    __u32 size, op, id, reserved;
    union {
        struct { __u32 out_access_fd, flags; } create_access;
        struct { __u64 iova, length, uptr; __u32 flags, pad; } access_rw;
        __u64 pad[6];
    };
    __u32 last;
};
#define IOAS_ALLOC ((';' << 8) | 0x81)
#define IOAS_MAP_FILE ((';' << 8) | 0x8f)
#define TEST_CMD ((';' << 8) | 0xa0)
#define OP_CREATE_ACCESS 5
#define OP_ACCESS_RW 8

#define CHECK(c) do { if (!(c)) { printf("FAIL line %d: %s (errno %d)\n", __LINE__, #c, errno); return 1; } } while (0)

static int access_read(int fd, __u32 access, __u64 iova, char *out, __u64 len) {
    struct test_cmd t = { sizeof(t), OP_ACCESS_RW, access };
    t.access_rw.iova = iova;
    t.access_rw.length = len;
    t.access_rw.uptr = (__u64)out;
    return ioctl(fd, TEST_CMD, &t);
}

int main(void) {
    int fd = open("/dev/iommu", O_RDWR);
    CHECK(fd >= 0);
    struct ioas_alloc a = { sizeof(a), 0, 0 };
    CHECK(ioctl(fd, IOAS_ALLOC, &a) == 0);
    int mfd = memfd_create("dma", 0);
    CHECK(mfd >= 0 && ftruncate(mfd, 8192) == 0 && pwrite(mfd, "kept", 4, 0) == 4);
    struct ioas_map_file m = { sizeof(m), 6, a.out_ioas_id, mfd, 0, 8192, 0 };
    CHECK(ioctl(fd, IOAS_MAP_FILE, &m) == 0);
    struct test_cmd t = { sizeof(t), OP_CREATE_ACCESS, a.out_ioas_id };
    CHECK(ioctl(fd, TEST_CMD, &t) == 0);
    __u32 access = t.create_access.out_access_fd;
    char out[4];
    CHECK(access_read(fd, access, m.iova, out, 4) == 0 && memcmp(out, "kept", 4) == 0);
    CHECK(ftruncate(mfd, 4096) == 0);
    CHECK(access_read(fd, access, m.iova + 4096, out, 4) == -1 && errno == EFAULT);
    CHECK(access_read(fd, access, m.iova, out, 4) == 0);
    CHECK(ftruncate(mfd, 0) == 0);
    CHECK(access_read(fd, access, m.iova, out, 4) == -1 && errno == EFAULT);
    printf("ok\n");
    return 0;
}
"#;

#[test]
fn a_file_truncated_under_map_file_fails_reads_with_efault() {
    run_c("truncated-file", TRUNCATED_FILE_PROGRAM);
}
