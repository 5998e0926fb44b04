//! Where pinned memory is charged, as a program sees it: ioasid's pins
//! show in `/proc/<pid>/status` (`VmPin`) as Linux's do, and the
//! `CAP_IPC_LOCK` exemption is judged when memory is pinned, not when
//! `/dev/iommu` was opened or an earlier map was made.

mod common;

use common::run_c;

const PROGRAM: &str = r#"
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>
#include <linux/capability.h>

int capset(cap_user_header_t, const cap_user_data_t);
#include <linux/types.h>

struct ioas_alloc { __u32 size, flags, out_ioas_id; };
struct ioas_map_file { __u32 size, flags, ioas_id; __s32 fd; __u64 start, length, iova; };
struct ioas_unmap { __u32 size, ioas_id; __u64 iova, length; };
struct test_cmd { __u32 size, op, id, reserved; __u64 arg[6]; __u32 last, pad; };
#define IOAS_ALLOC ((';' << 8) | 0x81)
#define IOAS_UNMAP ((';' << 8) | 0x86)
#define IOAS_MAP_FILE ((';' << 8) | 0x8f)
#define TEST_CMD ((';' << 8) | 0xa0)
#define TEST_OP_MOCK_DOMAIN 2

#define CHECK(c) do { if (!(c)) { printf("FAIL line %d: %s (errno %d)\n", __LINE__, #c, errno); exit(1); } } while (0)

static long vm_pinned_kb(pid_t pid) {
    char path[64], line[128];
    long kb = -1;
    snprintf(path, sizeof(path), "/proc/%d/status", pid);
    FILE *f = fopen(path, "r");
    CHECK(f != NULL);
    while (fgets(line, sizeof(line), f))
        if (sscanf(line, "VmPin: %ld kB", &kb) == 1)
            break;
    fclose(f);
    return kb;
}

static int fd, mfd;
static struct ioas_map_file m;
static struct ioas_unmap u;

/* Maps the memfd's 8 KiB and checks this process's VmPin is `kb`. */
static void map_expecting(long kb) {
    CHECK(ioctl(fd, IOAS_MAP_FILE, &m) == 0);
    CHECK(vm_pinned_kb(getpid()) == kb);
}

static void unmap(void) {
    u.iova = m.iova;
    CHECK(ioctl(fd, IOAS_UNMAP, &u) == 0);
}

static struct __user_cap_header_struct h = { _LINUX_CAPABILITY_VERSION_3, 0 };
static struct __user_cap_data_struct caps[2];

/* CAP_IPC_LOCK into or out of the effective set, by the C library's capset
   or by syscall(3). */
static void ipc_lock(int on, int by_libc) {
    CHECK(syscall(SYS_capget, &h, caps) == 0);
    if (on)
        caps[0].effective |= 1u << CAP_IPC_LOCK;
    else
        caps[0].effective &= ~(1u << CAP_IPC_LOCK);
    CHECK((by_libc ? capset(&h, caps) : syscall(SYS_capset, &h, caps)) == 0);
}

int main(void) {
    fd = open("/dev/iommu", O_RDWR);
    CHECK(fd >= 0);
    struct ioas_alloc a = { sizeof(a), 0, 0 };
    CHECK(ioctl(fd, IOAS_ALLOC, &a) == 0);
    struct test_cmd d = { sizeof(d), TEST_OP_MOCK_DOMAIN, a.out_ioas_id };
    CHECK(ioctl(fd, TEST_CMD, &d) == 0);

    long before = vm_pinned_kb(getpid());
    CHECK(before >= 0);
    mfd = memfd_create("ram", 0);
    CHECK(mfd >= 0 && ftruncate(mfd, 8192) == 0);
    m = (struct ioas_map_file){ sizeof(m), 6, a.out_ioas_id, mfd, 0, 8192, 0 };
    u = (struct ioas_unmap){ sizeof(u), a.out_ioas_id, 0, 8192 };

    /* With CAP_IPC_LOCK, a pin is not charged. */
    map_expecting(before);
    unmap();

    /* Give it up after maps were made: pins made now are charged, whichever
       way the capability went, and back to uncharged when it comes back. */
    ipc_lock(0, 1);
    map_expecting(before + 8);
    unmap();
    ipc_lock(1, 0);
    map_expecting(before);
    unmap();
    ipc_lock(0, 0);
    map_expecting(before + 8);

    pid_t parent = getpid(), child = fork();
    CHECK(child >= 0);
    if (child == 0) {
        /* The parent's pins, as its status shows them to anyone. */
        CHECK(vm_pinned_kb(parent) == before + 8);
        CHECK(vm_pinned_kb(getpid()) == 0);
        exit(0);
    }
    int status;
    CHECK(waitpid(child, &status, 0) == child && WIFEXITED(status) && WEXITSTATUS(status) == 0);
    unmap();
    CHECK(vm_pinned_kb(getpid()) == before);

    /* Leaving root takes every capability with it. */
    ipc_lock(1, 0);
    map_expecting(before);
    unmap();
    CHECK(setuid(65534) == 0);
    map_expecting(before + 8);
    unmap();
    printf("ok\n");
    return 0;
}
"#;

#[test]
fn pins_show_in_proc_status_and_are_charged_while_cap_ipc_lock_is_dropped() {
    run_c("accounting", PROGRAM);
}
