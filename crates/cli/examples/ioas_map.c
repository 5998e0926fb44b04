/*
 * A program written for Linux's iommufd, run unchanged under ioasid:
 *
 *     cc -o ioas_map crates/cli/examples/ioas_map.c
 *     cargo build -p ioasid-preload && cargo run -p ioasid -- run -- ./ioas_map
 *
 * It opens /dev/iommu, makes an I/O address space, asks where IOVAs may go,
 * maps a buffer and unmaps it. The structs are those of <linux/iommufd.h>,
 * written out so the program builds where that header is missing.
 * Prints "ok" when every step did what Linux does.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>
#include <linux/types.h>

struct iommu_destroy { __u32 size, id; };
struct iommu_ioas_alloc { __u32 size, flags, out_ioas_id; };
struct iommu_iova_range { __u64 start, last; };
struct iommu_ioas_iova_ranges { __u32 size, ioas_id, num_iovas, reserved; __u64 allowed_iovas, out_iova_alignment; };
struct iommu_ioas_map { __u32 size, flags, ioas_id, reserved; __u64 user_va, length, iova; };
struct iommu_ioas_unmap { __u32 size, ioas_id; __u64 iova, length; };

#define IOMMU_DESTROY _IO(';', 0x80)
#define IOMMU_IOAS_ALLOC _IO(';', 0x81)
#define IOMMU_IOAS_IOVA_RANGES _IO(';', 0x84)
#define IOMMU_IOAS_MAP _IO(';', 0x85)
#define IOMMU_IOAS_UNMAP _IO(';', 0x86)
#define IOMMU_IOAS_MAP_WRITEABLE (1 << 1)
#define IOMMU_IOAS_MAP_READABLE (1 << 2)

#define CHECK(c) do { if (!(c)) { printf("FAIL line %d: %s (errno %d)\n", __LINE__, #c, errno); return 1; } } while (0)

int main(void) {
    int fd = open("/dev/iommu", O_RDWR | O_CLOEXEC);
    CHECK(fd >= 0);

    struct iommu_ioas_alloc alloc = { .size = sizeof(alloc) };
    CHECK(ioctl(fd, IOMMU_IOAS_ALLOC, &alloc) == 0);
    __u32 ioas = alloc.out_ioas_id;

    /* Where IOVAs may go: with no device attached, all of them. */
    struct iommu_iova_range ranges[4];
    struct iommu_ioas_iova_ranges query = {
        .size = sizeof(query), .ioas_id = ioas, .num_iovas = 4, .allowed_iovas = (__u64)(unsigned long)ranges,
    };
    CHECK(ioctl(fd, IOMMU_IOAS_IOVA_RANGES, &query) == 0 && query.num_iovas >= 1);

    /* Map a buffer where the kernel chooses. The buffer must stay mapped
     * in this process until the unmap returns. */
    size_t len = 4 * 4096;
    void *buf = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    CHECK(buf != MAP_FAILED);
    struct iommu_ioas_map map = {
        .size = sizeof(map), .flags = IOMMU_IOAS_MAP_READABLE | IOMMU_IOAS_MAP_WRITEABLE,
        .ioas_id = ioas, .user_va = (__u64)(unsigned long)buf, .length = len,
    };
    CHECK(ioctl(fd, IOMMU_IOAS_MAP, &map) == 0 && map.iova % 4096 == 0);

    /* Unmapping says how much went; there is nothing left the second time. */
    struct iommu_ioas_unmap unmap = { .size = sizeof(unmap), .ioas_id = ioas, .iova = map.iova, .length = len };
    CHECK(ioctl(fd, IOMMU_IOAS_UNMAP, &unmap) == 0 && unmap.length == len);
    CHECK(ioctl(fd, IOMMU_IOAS_UNMAP, &unmap) == -1 && errno == ENOENT);
    munmap(buf, len);

    struct iommu_destroy destroy = { .size = sizeof(destroy), .id = ioas };
    CHECK(ioctl(fd, IOMMU_DESTROY, &destroy) == 0);
    CHECK(ioctl(fd, IOMMU_DESTROY, &destroy) == -1 && errno == ENOENT);
    close(fd);
    printf("ok\n");
    return 0;
}
