//! VFIO device files for declared PCI functions under `ioasid run
//! --device`: a C program does what a VMM's VFIO code does on both paths
//! (the cdev bound to an iommufd, and a group in a type1 container), drives
//! the endpoint test function's DMA through its IOAS, and gets vfio-pci's
//! errnos for what vfio-pci refuses.

mod common;

use common::run_c_devices;

const COMMON: &str = r#"
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/uio.h>
#include <unistd.h>

#define IOMMUFD(nr) ((';' << 8) | (nr))
#define VFIO(n) ((';' << 8) | (100 + (n)))
struct ioas_alloc { uint32_t size, flags, out_ioas_id; };
struct ioas_map { uint32_t size, flags, ioas_id, reserved; uint64_t user_va, length, iova; };
struct ioas_unmap { uint32_t size, ioas_id; uint64_t iova, length; };
struct hw_info { uint32_t size, flags, dev_id, data_len; uint64_t data_uptr; uint32_t out_data_type, reserved; uint64_t out_capabilities; };
struct bind { uint32_t argsz, flags; int32_t iommufd; uint32_t out_devid; uint64_t token; };
struct attach { uint32_t argsz, flags, pt_id, pasid; };
struct detach { uint32_t argsz, flags, pasid; };
struct dev_info { uint32_t argsz, flags, num_regions, num_irqs, cap_offset, pad; };
struct region_info { uint32_t argsz, flags, index, cap_offset; uint64_t size, offset; };
struct irq_info { uint32_t argsz, flags, index, count; };
struct irq_set { uint32_t argsz, flags, index, start, count; int32_t data[1]; };
struct feature { uint32_t argsz, flags; };
struct dma_map { uint32_t argsz, flags; uint64_t vaddr, iova, size; };
struct group_status { uint32_t argsz, flags; };

#define CHECK(c) do { if (!(c)) { printf("FAIL line %d: %s (errno %d)\n", __LINE__, #c, errno); return 1; } } while (0)
#define FAILS(call, e) do { errno = 0; CHECK((call) < 0 && errno == (e)); } while (0)
#define BAR0 0ULL
#define CONFIG (7ULL << 40)

static int reg_write(int dev, uint32_t off, uint32_t v) { return pwrite(dev, &v, 4, BAR0 + off) == 4 ? 0 : -1; }
static uint32_t reg_read(int dev, uint32_t off) { uint32_t v = ~0u; pread(dev, &v, 4, BAR0 + off); return v; }

/* pci-epf-test's COPY of `len` bytes from src to dst, finished with MSI 1;
   returns STATUS. */
static uint32_t copy(int dev, int msi, uint64_t src, uint64_t dst, uint32_t len) {
    reg_write(dev, 0x0c, (uint32_t)src); reg_write(dev, 0x10, src >> 32);
    reg_write(dev, 0x14, (uint32_t)dst); reg_write(dev, 0x18, dst >> 32);
    reg_write(dev, 0x1c, len);
    reg_write(dev, 0x24, 1); /* IRQ_TYPE: MSI */
    reg_write(dev, 0x28, 1); /* IRQ_NUMBER: the first vector */
    reg_write(dev, 0x08, 0);
    reg_write(dev, 0x04, 1 << 5); /* COMMAND_COPY */
    struct pollfd p = { msi, POLLIN };
    if (poll(&p, 1, 5000) != 1) return 0xdead;
    uint64_t n; read(msi, &n, 8);
    return reg_read(dev, 0x08);
}
"#;

const CDEV: &str = r#"
int main(void) {
    /* sysfs, as QEMU's host= path looks the device up */
    const char *sys = "/sys/bus/pci/devices/0000:01:00.0";
    struct stat st;
    CHECK(stat(sys, &st) == 0);
    char path[PATH_MAX], buf[256];
    snprintf(path, sizeof(path), "%s/vfio-dev", sys);
    DIR *d = opendir(path);
    CHECK(d);
    struct dirent *e; char cdev[64] = "";
    while ((e = readdir(d))) if (!strncmp(e->d_name, "vfio", 4)) snprintf(cdev, sizeof(cdev), "%s", e->d_name);
    closedir(d);
    CHECK(!strcmp(cdev, "vfio0"));
    snprintf(path, sizeof(path), "%s/vfio-dev/vfio0/dev", sys);
    FILE *f = fopen(path, "r"); CHECK(f);
    int major, minor; CHECK(fscanf(f, "%d:%d", &major, &minor) == 2); fclose(f);
    snprintf(path, sizeof(path), "%s/iommu_group", sys);
    ssize_t n = readlink(path, buf, sizeof(buf) - 1); CHECK(n > 0); buf[n] = 0;
    CHECK(!strcmp(strrchr(buf, '/'), "/0"));
    char *real = realpath(sys, NULL);
    CHECK(real && !strcmp(real, "/sys/devices/pci0000:00/0000:01:00.0"));
    free(real);
    snprintf(path, sizeof(path), "%s/vendor", sys);
    f = fopen(path, "r"); CHECK(f); CHECK(fgets(buf, sizeof(buf), f)); fclose(f);
    CHECK(!strcmp(buf, "0x104c\n"));

    int dev = open("/dev/vfio/devices/vfio0", O_RDWR | O_CLOEXEC);
    CHECK(dev >= 0);
    CHECK(fstat(dev, &st) == 0 && S_ISCHR(st.st_mode) && st.st_rdev == makedev(major, minor));
    CHECK(stat("/dev/vfio/devices/vfio0", &st) == 0 && S_ISCHR(st.st_mode) && st.st_rdev == makedev(major, minor));
    FAILS(stat("/dev/vfio/devices/vfio1", &st), ENOENT);
    struct statx stx;
    CHECK(statx(AT_FDCWD, "/dev/vfio/devices/vfio0", 0, STATX_BASIC_STATS, &stx) == 0 && S_ISCHR(stx.stx_mode) &&
          stx.stx_rdev_major == (unsigned)major && stx.stx_rdev_minor == (unsigned)minor);
    CHECK(statx(dev, "", AT_EMPTY_PATH, STATX_BASIC_STATS, &stx) == 0 && S_ISCHR(stx.stx_mode) &&
          stx.stx_rdev_major == (unsigned)major && stx.stx_rdev_minor == (unsigned)minor);
    FAILS(open("/dev/vfio/devices/vfio1", O_RDWR), ENOENT);

    /* nothing before the bind */
    struct dev_info info = { sizeof(info) };
    FAILS(ioctl(dev, VFIO(7), &info), EINVAL);
    uint32_t v;
    FAILS(pread(dev, &v, 4, CONFIG), EINVAL);

    int iommufd = open("/dev/iommu", O_RDWR);
    CHECK(iommufd >= 0);
    struct bind b = { sizeof(b), 0, iommufd };
    struct bind bad = b; bad.flags = 2;
    FAILS(ioctl(dev, VFIO(18), &bad), EINVAL);
    bad = b; bad.argsz = 8;
    FAILS(ioctl(dev, VFIO(18), &bad), EINVAL);
    bad = b; bad.iommufd = 0; /* stdin: a file, not an iommufd */
    FAILS(ioctl(dev, VFIO(18), &bad), EBADFD);
    bad = b; bad.iommufd = 999;
    FAILS(ioctl(dev, VFIO(18), &bad), EBADF);
    CHECK(ioctl(dev, VFIO(18), &b) == 0);
    FAILS(ioctl(dev, VFIO(18), &b), EINVAL); /* bound once */
    int dev2 = open("/dev/vfio/devices/vfio0", O_RDWR);
    CHECK(dev2 >= 0);
    FAILS(ioctl(dev2, VFIO(18), &b), EINVAL); /* the cdev path opens a device once */
    close(dev2);

    /* its IOMMU, through iommufd */
    uint8_t vtd[16];
    struct hw_info hw = { sizeof(hw), 0, b.out_devid, sizeof(vtd), (uintptr_t)vtd };
    CHECK(ioctl(iommufd, IOMMUFD(0x8a), &hw) == 0);
    CHECK(hw.out_data_type == 1); /* IOMMU_HW_INFO_TYPE_INTEL_VTD */

    CHECK(ioctl(dev, VFIO(7), &info) == 0);
    CHECK(info.flags == 3 && info.num_regions == 9 && info.num_irqs == 5);
    struct region_info r = { sizeof(r), 0, 7 };
    CHECK(ioctl(dev, VFIO(8), &r) == 0 && r.offset == CONFIG && r.size >= 256);
    r.index = 8; FAILS(ioctl(dev, VFIO(8), &r), EINVAL);
    r.index = 9; FAILS(ioctl(dev, VFIO(8), &r), EINVAL);
    r.index = 0; CHECK(ioctl(dev, VFIO(8), &r) == 0 && r.size > 0 && r.flags == 3);
    uint32_t bar0 = r.size;
    struct irq_info ii = { sizeof(ii), 0, 1 };
    CHECK(ioctl(dev, VFIO(9), &ii) == 0 && ii.count >= 1);
    ii.index = 5; FAILS(ioctl(dev, VFIO(9), &ii), EINVAL);
    FAILS(ioctl(dev, VFIO(30), &ii), ENOTTY);
    struct feature feat = { sizeof(feat), (1 << 16) | 1 }; /* GET MIGRATION */
    FAILS(ioctl(dev, VFIO(17), &feat), ENOTTY);
    feat.flags = (1 << 16) | (1 << 17) | 1;
    FAILS(ioctl(dev, VFIO(17), &feat), EINVAL);

    /* config space and BARs */
    CHECK(pread(dev, &v, 4, CONFIG) == 4 && v == 0xb500104c);
    FAILS(pread(dev, &v, 4, CONFIG + r.size * 0 + 4096), EFAULT);
    FAILS(pread(dev, &v, 4, BAR0 + bar0), EINVAL);
    CHECK(pread(dev, buf, 8, BAR0 + bar0 - 4) == 4); /* cut at the BAR's end */
    FAILS(pread(dev, &v, 4, 6ULL << 40), EINVAL); /* no ROM */
    /* No lseek, as Linux's device files have none; read and write start at
       0 (BAR 0's first registers) and move on. */
    FAILS(lseek(dev, CONFIG, SEEK_SET), ESPIPE);
    FAILS(lseek(dev, 0, SEEK_CUR), ESPIPE);
    uint32_t at0, at4;
    CHECK(pread(dev, &at0, 4, BAR0) == 4 && pread(dev, &at4, 4, BAR0 + 4) == 4);
    CHECK(read(dev, &v, 4) == 4 && v == at0);
    CHECK(read(dev, &v, 4) == 4 && v == at4);
    /* A vector is read a buffer at a time, from where the last stopped; a
       positioned one leaves the position alone. */
    uint32_t id[2] = { 0, 0 }, again[2] = { 0, 0 };
    struct iovec two[2] = { { &id[0], 2 }, { (uint8_t *)&id[0] + 2, 2 } };
    CHECK(preadv(dev, two, 2, CONFIG) == 4 && id[0] == 0xb500104c);
    struct iovec regs[2] = { { &again[0], 4 }, { &again[1], 4 } };
    CHECK(preadv(dev, regs, 2, BAR0) == 8 && again[0] == at0 && again[1] == at4);
    CHECK(pwritev(dev, regs, 2, BAR0 + bar0) == -1 && errno == EINVAL);
    CHECK(readv(dev, regs, 2) == 8 && read(dev, &v, 4) == 4);
    CHECK(pread(dev, &again[0], 4, BAR0 + 16) == 4 && v == again[0]);

    /* MSI: eventfds for its vectors */
    int msi = eventfd(0, EFD_CLOEXEC);
    struct irq_set s = { sizeof(s), (1 << 2) | (1 << 5), 1, 0, 1, { msi } };
    CHECK(ioctl(dev, VFIO(10), &s) == 0);
    struct irq_set sx = s; sx.index = 2; /* MSI-X while MSI is on */
    FAILS(ioctl(dev, VFIO(10), &sx), EINVAL);
    struct irq_set bad_fd = s; bad_fd.data[0] = 0; /* not an eventfd */
    FAILS(ioctl(dev, VFIO(10), &bad_fd), EINVAL);

    /* DMA through an IOAS the program maps */
    struct ioas_alloc a = { sizeof(a) };
    CHECK(ioctl(iommufd, IOMMUFD(0x81), &a) == 0);
    struct attach at = { sizeof(at), 0, a.out_ioas_id };
    CHECK(ioctl(dev, VFIO(19), &at) == 0 && at.pt_id != a.out_ioas_id);
    CHECK(ioctl(dev, VFIO(19), &at) == 0); /* again: a replace */
    size_t len = 1 << 20;
    uint8_t *ram = mmap(0, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    for (size_t i = 0; i < len / 2; i++) ram[i] = (uint8_t)(i * 7);
    struct ioas_map m = { sizeof(m), 1 | 2 | 4, a.out_ioas_id, 0, (uintptr_t)ram, len, 0x100000 };
    CHECK(ioctl(iommufd, IOMMUFD(0x85), &m) == 0);
    uint32_t status = copy(dev, msi, 0x100000, 0x100000 + len / 2, 4096 + 3);
    CHECK(status & (1 << 4)); /* COPY_SUCCESS */
    CHECK(!memcmp(ram, ram + len / 2, 4096 + 3));
    /* after unmap the DMA faults and says so */
    struct ioas_unmap u = { sizeof(u), a.out_ioas_id, 0x100000, len };
    CHECK(ioctl(iommufd, IOMMUFD(0x86), &u) == 0);
    status = copy(dev, msi, 0x100000, 0x100000 + len / 2, 64);
    CHECK(status & (1 << 5) && status & (1 << 7)); /* COPY_FAIL, SRC_ADDR_INVALID */

    struct detach dt = { sizeof(dt), 0 };
    CHECK(ioctl(dev, VFIO(20), &dt) == 0);
    CHECK(ioctl(dev, VFIO(20), &dt) == 0); /* nothing attached: a no-op */
    dt.flags = 2; FAILS(ioctl(dev, VFIO(20), &dt), EINVAL);
    CHECK(ioctl(dev, VFIO(11)) == 0); /* reset */
    close(dev);
    /* the function is free again once its file is gone */
    dev = open("/dev/vfio/devices/vfio0", O_RDWR);
    CHECK(dev >= 0 && ioctl(dev, VFIO(18), &b) == 0);
    printf("ok\n");
    return 0;
}
"#;

const GROUP: &str = r#"
int main(void) {
    int container = open("/dev/vfio/vfio", O_RDWR);
    CHECK(container >= 0);
    CHECK(ioctl(container, VFIO(0)) == 0); /* VFIO_API_VERSION */
    CHECK(ioctl(container, VFIO(1), 3) == 1); /* TYPE1v2 */
    int group = open("/dev/vfio/0", O_RDWR);
    CHECK(group >= 0);
    FAILS(open("/dev/vfio/0", O_RDWR), EBUSY);
    struct group_status gs = { sizeof(gs) };
    CHECK(ioctl(group, VFIO(3), &gs) == 0 && gs.flags == 1); /* viable, no container */
    FAILS(ioctl(group, VFIO(6), "0000:01:00.0"), EINVAL); /* no container yet */
    int bad = 0;
    FAILS(ioctl(group, VFIO(4), &bad), EBADFD);
    CHECK(ioctl(group, VFIO(4), &container) == 0);
    FAILS(ioctl(group, VFIO(4), &container), EINVAL);
    CHECK(ioctl(group, VFIO(3), &gs) == 0 && gs.flags == 3);
    CHECK(ioctl(container, VFIO(2), 3) == 0); /* SET_IOMMU TYPE1v2 */
    size_t len = 1 << 16;
    uint8_t *ram = mmap(0, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    memset(ram, 0x5a, len / 2);
    struct dma_map m = { sizeof(m), 3, (uintptr_t)ram, 0x200000, len };
    CHECK(ioctl(container, VFIO(13), &m) == 0);
    FAILS(ioctl(group, VFIO(6), "0000:02:00.0"), ENODEV);
    int dev = ioctl(group, VFIO(6), "0000:01:00.0");
    CHECK(dev >= 0);
    struct bind b = { sizeof(b), 0, container };
    FAILS(ioctl(dev, VFIO(18), &b), EINVAL); /* bind is for the cdev path */
    struct attach at = { sizeof(at), 0, 1 };
    FAILS(ioctl(dev, VFIO(19), &at), ENOTTY);
    struct dev_info info = { sizeof(info) };
    CHECK(ioctl(dev, VFIO(7), &info) == 0 && info.num_regions == 9);
    FAILS(ioctl(group, VFIO(5)), EBUSY); /* a device is open */
    int msi = eventfd(0, EFD_CLOEXEC);
    struct irq_set s = { sizeof(s), (1 << 2) | (1 << 5), 1, 0, 1, { msi } };
    CHECK(ioctl(dev, VFIO(10), &s) == 0);
    uint32_t status = copy(dev, msi, 0x200000, 0x200000 + len / 2, 1000);
    CHECK(status & (1 << 4));
    CHECK(ram[len / 2] == 0x5a && ram[len / 2 + 999] == 0x5a && ram[len / 2 + 1000] == 0);
    close(dev);
    CHECK(ioctl(group, VFIO(5)) == 0);
    printf("ok\n");
    return 0;
}
"#;

const NESTED: &str = r#"
struct hwpt_alloc { uint32_t size, flags, dev_id, pt_id, out_hwpt_id, reserved, data_type, data_len; uint64_t data_uptr; uint32_t fault_id, reserved2; };
struct viommu_alloc { uint32_t size, flags, type, dev_id, hwpt_id, out_viommu_id, data_len, reserved; uint64_t data_uptr; };
struct vdevice_alloc { uint32_t size, viommu_id, dev_id, out_vdevice_id; uint64_t virt_id; };

static int bind(int iommufd, const char *path, uint32_t *dev_id) {
    int dev = open(path, O_RDWR);
    struct bind b = { sizeof(b), 0, iommufd };
    if (dev < 0 || ioctl(dev, VFIO(18), &b)) return -1;
    *dev_id = b.out_devid;
    return dev;
}

int main(void) {
    int iommufd = open("/dev/iommu", O_RDWR);
    uint32_t smmu_id, vtd_id;
    int smmu = bind(iommufd, "/dev/vfio/devices/vfio0", &smmu_id);
    int vtd = bind(iommufd, "/dev/vfio/devices/vfio1", &vtd_id);
    CHECK(smmu >= 0 && vtd >= 0);
    uint8_t data[64];
    struct hw_info hw = { sizeof(hw), 0, smmu_id, sizeof(data), (uintptr_t)data };
    CHECK(ioctl(iommufd, IOMMUFD(0x8a), &hw) == 0 && hw.out_data_type == 2); /* ARM_SMMUV3 */
    hw.dev_id = vtd_id;
    CHECK(ioctl(iommufd, IOMMUFD(0x8a), &hw) == 0 && hw.out_data_type == 1); /* INTEL_VTD */

    struct ioas_alloc a = { sizeof(a) };
    CHECK(ioctl(iommufd, IOMMUFD(0x81), &a) == 0);
    size_t len = 1 << 16;
    uint8_t *ram = mmap(0, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    memset(ram, 0x3c, len / 2);
    struct ioas_map m = { sizeof(m), 1 | 2 | 4, a.out_ioas_id, 0, (uintptr_t)ram, len, 0x100000 };
    CHECK(ioctl(iommufd, IOMMUFD(0x85), &m) == 0);

    /* SMMUv3 nesting: the host's stage 2 under a vIOMMU, the guest's STE on top */
    struct hwpt_alloc s2 = { sizeof(s2), 1 /* NEST_PARENT */, smmu_id, a.out_ioas_id };
    CHECK(ioctl(iommufd, IOMMUFD(0x89), &s2) == 0);
    struct viommu_alloc v = { sizeof(v), 0, 1 /* ARM_SMMUV3 */, smmu_id, s2.out_hwpt_id };
    CHECK(ioctl(iommufd, IOMMUFD(0x90), &v) == 0);
    struct vdevice_alloc vd = { sizeof(vd), v.out_viommu_id, smmu_id, 0, 0x10 };
    CHECK(ioctl(iommufd, IOMMUFD(0x91), &vd) == 0);
    uint64_t ste[2] = { 1 | (4 << 1), 0 }; /* valid, stage 1 bypassed */
    struct hwpt_alloc nested = { sizeof(nested), 0, smmu_id, v.out_viommu_id, 0, 0, 2 /* ARM_SMMUV3 */, sizeof(ste), (uintptr_t)ste };
    CHECK(ioctl(iommufd, IOMMUFD(0x89), &nested) == 0);
    struct attach at = { sizeof(at), 0, nested.out_hwpt_id };
    CHECK(ioctl(smmu, VFIO(19), &at) == 0 && at.pt_id == nested.out_hwpt_id);
    int msi = eventfd(0, EFD_CLOEXEC);
    struct irq_set s = { sizeof(s), (1 << 2) | (1 << 5), 1, 0, 1, { msi } };
    CHECK(ioctl(smmu, VFIO(10), &s) == 0);
    CHECK(copy(smmu, msi, 0x100000, 0x100000 + len / 2, 256) & (1 << 4));
    CHECK(ram[len / 2] == 0x3c && ram[len / 2 + 255] == 0x3c);
    /* the guest aborts the stream: the same DMA now faults */
    uint64_t abort_ste[2] = { 1, 0 };
    struct hwpt_alloc blocked = nested; blocked.data_uptr = (uintptr_t)abort_ste;
    CHECK(ioctl(iommufd, IOMMUFD(0x89), &blocked) == 0);
    at.pt_id = blocked.out_hwpt_id;
    CHECK(ioctl(smmu, VFIO(19), &at) == 0);
    CHECK(copy(smmu, msi, 0x100000, 0x100000 + len / 2, 256) & (1 << 5));

    /* VT-d with PASIDs: PASID 5 gets the IOAS while the RID has nothing */
    memset(ram + len / 2, 0, len / 2);
    struct attach ap = { sizeof(ap), 1 /* PASID */, a.out_ioas_id, 5 };
    CHECK(ioctl(vtd, VFIO(19), &ap) == 0);
    struct attach ap_short = ap; ap_short.argsz = 12;
    FAILS(ioctl(vtd, VFIO(19), &ap_short), EINVAL);
    int msi2 = eventfd(0, EFD_CLOEXEC);
    struct irq_set s2i = { sizeof(s2i), (1 << 2) | (1 << 5), 1, 0, 1, { msi2 } };
    CHECK(ioctl(vtd, VFIO(10), &s2i) == 0);
    CHECK(copy(vtd, msi2, 0x100000, 0x100000 + len / 2, 128) & (1 << 5)); /* untagged: no table */
    CHECK(reg_write(vtd, 0x40, (1u << 31) | 5) == 0);
    CHECK(copy(vtd, msi2, 0x100000, 0x100000 + len / 2, 128) & (1 << 4));
    CHECK(ram[len / 2 + 127] == 0x3c);
    struct detach dp = { sizeof(dp), 1, 5 };
    CHECK(ioctl(vtd, VFIO(20), &dp) == 0);
    CHECK(copy(vtd, msi2, 0x100000, 0x100000 + len / 2, 128) & (1 << 5));
    printf("ok\n");
    return 0;
}
"#;

const PRI: &str = r#"
struct hwpt_alloc { uint32_t size, flags, dev_id, pt_id, out_hwpt_id, reserved, data_type, data_len; uint64_t data_uptr; uint32_t fault_id, reserved2; };
struct fault_alloc { uint32_t size, flags, out_fault_id, out_fault_fd; };
struct pgfault { uint32_t flags, dev_id, pasid, grpid, perm, reserved; uint64_t addr; uint32_t length, cookie; };
struct response { uint32_t cookie, code; };

int main(void) {
    int iommufd = open("/dev/iommu", O_RDWR);
    int dev = open("/dev/vfio/devices/vfio0", O_RDWR);
    struct bind b = { sizeof(b), 0, iommufd };
    CHECK(ioctl(dev, VFIO(18), &b) == 0);
    struct ioas_alloc a = { sizeof(a) };
    CHECK(ioctl(iommufd, IOMMUFD(0x81), &a) == 0);
    struct fault_alloc fa = { sizeof(fa) };
    CHECK(ioctl(iommufd, IOMMUFD(0x8e), &fa) == 0);
    /* a PASID-capable table that reports faults to the queue */
    struct hwpt_alloc h = { sizeof(h), (1 << 2) | (1 << 3), b.out_devid, a.out_ioas_id };
    h.fault_id = fa.out_fault_id;
    CHECK(ioctl(iommufd, IOMMUFD(0x89), &h) == 0);
    struct attach ap = { sizeof(ap), 1, h.out_hwpt_id, 7 };
    CHECK(ioctl(dev, VFIO(19), &ap) == 0);
    CHECK(reg_write(dev, 0x40, (1u << 31) | 7) == 0);
    int msi = eventfd(0, EFD_CLOEXEC);
    struct irq_set s = { sizeof(s), (1 << 2) | (1 << 5), 1, 0, 1, { msi } };
    CHECK(ioctl(dev, VFIO(10), &s) == 0);

    /* the source is mapped, the destination not yet */
    size_t len = 1 << 16;
    uint8_t *src = mmap(0, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    uint8_t *dst = mmap(0, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    memset(src, 0x77, len);
    struct ioas_map m = { sizeof(m), 1 | 2 | 4, a.out_ioas_id, 0, (uintptr_t)src, len, 0x100000 };
    CHECK(ioctl(iommufd, IOMMUFD(0x85), &m) == 0);
    reg_write(dev, 0x0c, 0x100000); reg_write(dev, 0x10, 0);
    reg_write(dev, 0x14, 0x400000); reg_write(dev, 0x18, 0);
    reg_write(dev, 0x1c, 8192);
    reg_write(dev, 0x24, 1); reg_write(dev, 0x28, 1);
    reg_write(dev, 0x08, 0);
    reg_write(dev, 0x04, 1 << 5); /* COPY: the doorbell returns at once */

    /* page requests arrive; the handler maps the destination and answers */
    int answered = 0, mapped = 0;
    while (answered < 16) {
        struct pollfd p[2] = { { fa.out_fault_fd, POLLIN }, { msi, POLLIN } };
        CHECK(poll(p, 2, 5000) > 0);
        if (p[1].revents) break;
        struct pgfault f[8];
        ssize_t n = read(fa.out_fault_fd, f, sizeof(f));
        CHECK(n > 0 && n % sizeof(f[0]) == 0);
        for (int i = 0; i < n / (ssize_t)sizeof(f[0]); i++) {
            CHECK(f[i].pasid == 7 && f[i].dev_id == b.out_devid && (f[i].addr & ~0xfffULL) >= 0x400000);
            if (!mapped) {
                struct ioas_map md = { sizeof(md), 1 | 2 | 4, a.out_ioas_id, 0, (uintptr_t)dst, len, 0x400000 };
                CHECK(ioctl(iommufd, IOMMUFD(0x85), &md) == 0);
                mapped = 1;
            }
            if (f[i].flags & 2 /* LAST_PAGE */) {
                struct response r = { f[i].cookie, 0 /* SUCCESS */ };
                CHECK(write(fa.out_fault_fd, &r, sizeof(r)) == sizeof(r));
                answered++;
            }
        }
    }
    CHECK(mapped);
    struct pollfd p = { msi, POLLIN };
    CHECK(poll(&p, 1, 5000) == 1);
    CHECK(reg_read(dev, 0x08) & (1 << 4)); /* COPY_SUCCESS */
    CHECK(dst[0] == 0x77 && dst[8191] == 0x77 && dst[8192] == 0);
    printf("ok\n");
    return 0;
}
"#;

#[test]
fn a_pri_function_s_dma_waits_for_the_page_its_program_maps_on_request() {
    run_c_devices("vfio-pri", &format!("{COMMON}{PRI}"), &[], &["pci-epf-test,iommu=vtd,pasid=8,pri=on"]);
}

#[test]
fn nesting_viommu_and_pasids_are_reachable_through_vfio_devices() {
    run_c_devices(
        "vfio-nested",
        &format!("{COMMON}{NESTED}"),
        &[],
        &["pci-epf-test,bdf=0000:01:00.0,iommu=smmuv3", "pci-epf-test,bdf=0000:02:00.0,iommu=vtd,pasid=8"],
    );
}

#[test]
fn a_vmm_binds_the_cdev_to_iommufd_and_its_dma_goes_through_the_ioas() {
    run_c_devices("vfio-cdev", &format!("{COMMON}{CDEV}"), &[], &["pci-epf-test,bdf=0000:01:00.0"]);
}

#[test]
fn a_type1_program_reaches_the_device_through_its_group_and_container() {
    run_c_devices("vfio-group", &format!("{COMMON}{GROUP}"), &[], &["pci-epf-test"]);
}

/// `ioasid run --device` stays to remove the run's sysfs tree; a
/// termination sent to it (as `timeout` sends one) reaches the program,
/// and the run ends as the program did, leaving nothing behind.
#[test]
fn a_terminated_run_passes_the_signal_on_and_removes_its_tree() {
    common::build_shim();
    let mut run = std::process::Command::new(env!("CARGO_BIN_EXE_ioasid"))
        .args(["run", "--device", "pci-epf-test", "--", "sleep", "30"])
        .env("IOASID_PRELOAD", common::target_dir().join("libioasid_preload.so"))
        .spawn()
        .unwrap();
    let tree = std::env::temp_dir().join(format!("ioasid-sysfs-{}", run.id()));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !tree.join("bus/pci/devices/0000:01:00.0").exists() {
        assert!(std::time::Instant::now() < deadline, "no sysfs tree at {}", tree.display());
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let started = std::time::Instant::now();
    // SAFETY: signalling the child just spawned.
    unsafe { libc::kill(run.id() as i32, libc::SIGTERM) };
    let status = run.wait().unwrap();
    assert!(started.elapsed() < std::time::Duration::from_secs(5), "the program did not get the signal");
    assert_eq!(status.code(), Some(128 + libc::SIGTERM));
    assert!(!tree.exists(), "the run left {} behind", tree.display());
}
