//! `mmap` of an iommufd under `ioasid run`: the memory a vIOMMU shares
//! with the program, mapped at the offset its allocation returned, as
//! Linux 7.3's `iommufd_fops_mmap` maps it.

mod common;

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
struct destroy { __u32 size, id; };
struct test_cmd { __u32 size, op, id, reserved; __u32 out_stdev_id, out_hwpt_id, out_idev_id, pad[9]; __u32 last, pad2; };
struct hwpt_alloc { __u32 size, flags, dev_id, pt_id, out_hwpt_id, reserved, data_type, data_len; __u64 data_uptr; __u32 fault_id, reserved2; };
struct viommu_alloc { __u32 size, flags, type, dev_id, hwpt_id, out_viommu_id, data_len, reserved; __u64 data_uptr; };
struct viommu_selftest { __u32 in_data, out_data; __u64 out_mmap_offset, out_mmap_length; };
struct fault_alloc { __u32 size, flags, out_fault_id, out_fault_fd; };
#define CMD(nr) ((';' << 8) | (nr))

#define CHECK(c) do { if (!(c)) { printf("FAIL line %d: %s (errno %d)\n", __LINE__, #c, errno); return 1; } } while (0)

int main(void) {
    long page = sysconf(_SC_PAGESIZE);
    int fd = open("/dev/iommu", O_RDWR);
    CHECK(fd >= 0);
    struct ioas_alloc a = { sizeof(a) };
    CHECK(ioctl(fd, CMD(0x81), &a) == 0);
    struct test_cmd md = { sizeof(md), 2 /* MOCK_DOMAIN */, a.out_ioas_id };
    CHECK(ioctl(fd, CMD(0xa0), &md) == 0);
    struct hwpt_alloc h = { sizeof(h), 1 /* NEST_PARENT */, md.out_idev_id, a.out_ioas_id };
    CHECK(ioctl(fd, CMD(0x89), &h) == 0);
    struct viommu_selftest data = { .in_data = 0xbeef };
    struct viommu_alloc v = { sizeof(v), 0, 0xdeadbeef, md.out_idev_id, h.out_hwpt_id, 0, sizeof(data), 0, (__u64)&data };
    CHECK(ioctl(fd, CMD(0x90), &v) == 0);
    CHECK(data.out_data == 0xbeef && data.out_mmap_offset == page && data.out_mmap_length == 2 * page);
    size_t len = data.out_mmap_length;
    off_t off = data.out_mmap_offset;

    /* Only that offset and length, shared, not executable. */
    CHECK(mmap(0, len, PROT_READ, MAP_SHARED, fd, off + page) == MAP_FAILED && errno == ENXIO);
    CHECK(mmap(0, len / 2, PROT_READ, MAP_SHARED, fd, off) == MAP_FAILED && errno == ENXIO);
    CHECK(mmap(0, len * 2, PROT_READ, MAP_SHARED, fd, off) == MAP_FAILED && errno == ENXIO);
    CHECK(mmap(0, len, PROT_READ, MAP_PRIVATE, fd, off) == MAP_FAILED && errno == EINVAL);
    CHECK(mmap(0, len, PROT_READ | PROT_EXEC, MAP_SHARED, fd, off) == MAP_FAILED && errno == EPERM);

    /* Two mappings of the region are the same memory, starting with in_data. */
    __u32 *p = mmap(0, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, off);
    CHECK(p != MAP_FAILED && *p == 0xbeef);
    __u32 *q = mmap(0, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, off);
    CHECK(q != MAP_FAILED && q != p);
    p[page / 4] = 42;
    CHECK(q[page / 4] == 42);

    /* Each mapping, and each piece left of one, holds the vIOMMU. */
    struct destroy d = { sizeof(d), v.out_viommu_id };
    CHECK(ioctl(fd, CMD(0x80), &d) == -1 && errno == EBUSY);
    CHECK(munmap(q, len) == 0);
    CHECK(ioctl(fd, CMD(0x80), &d) == -1 && errno == EBUSY);
    CHECK(munmap(p, page) == 0);
    CHECK(ioctl(fd, CMD(0x80), &d) == -1 && errno == EBUSY);
    CHECK(((__u32 *)((char *)p + page))[0] == 42);
    /* Mapping over what is left lets go too. */
    CHECK(mmap((char *)p + page, page, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0) != MAP_FAILED);
    CHECK(ioctl(fd, CMD(0x80), &d) == 0);
    CHECK(mmap(0, len, PROT_READ, MAP_SHARED, fd, off) == MAP_FAILED && errno == ENXIO);

    /* The other iommufd files have no mmap. */
    struct fault_alloc f = { sizeof(f) };
    CHECK(ioctl(fd, CMD(0x8e), &f) == 0);
    CHECK(mmap(0, page, PROT_READ, MAP_SHARED, f.out_fault_fd, 0) == MAP_FAILED && errno == ENODEV);

    /* Ordinary mappings are untouched. */
    char *anon = mmap(0, page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    CHECK(anon != MAP_FAILED);
    anon[0] = 1;
    CHECK(munmap(anon, page) == 0);
    printf("ok\n");
    return 0;
}
"#;

#[test]
fn a_viommu_shares_memory_through_mmap_of_the_iommufd() {
    run_c("mmap", PROGRAM);
}
