//! rust-vmm's `vfio-ioctls`, driven as a VMM drives it, against an emulated
//! `pci-epf-test` function under `ioasid run --device`: on the cdev path
//! (`VfioIommufd`: the device's cdev bound to an iommufd and attached to an
//! IOAS) and on the group path (`VfioContainer`: a type1 container holding
//! the function's group), the crate reads the device's info, regions and
//! IRQs, enables MSI with eventfds, maps a buffer for DMA, and programs the
//! endpoint's COPY through its region write API; the test checks the copied
//! bytes, which MSI vector fired, and that the DMA faults once unmapped.
//!
//! The crate is linked into this test binary, so each `#[ignore]`d scenario
//! below is run by its test above it: the binary re-runs itself under
//! `ioasid run` with only that scenario selected.

mod common;

use std::io::ErrorKind;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::ptr::NonNull;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{build_shim, target_dir};
use iommufd_ioctls::IommuFd;
use vfio_ioctls::{VfioContainer, VfioDevice, VfioIommufd, VfioOps};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

/// Set in the environment of the scenarios run under `ioasid run`.
const SCENARIO_ENV: &str = "IOASID_VFIO_IOCTLS_SCENARIO";
const BDF: &str = "0000:01:00.0";
const SYSFS: &str = "/sys/bus/pci/devices/0000:01:00.0";

// vfio.h's region and IRQ indexes of a vfio-pci device.
const VFIO_PCI_BAR0_REGION_INDEX: u32 = 0;
const VFIO_PCI_CONFIG_REGION_INDEX: u32 = 7;
const VFIO_PCI_INTX_IRQ_INDEX: u32 = 0;
const VFIO_PCI_MSI_IRQ_INDEX: u32 = 1;
const VFIO_PCI_MSIX_IRQ_INDEX: u32 = 2;
const VFIO_REGION_INFO_FLAG_READ: u32 = 1 << 0;
const VFIO_REGION_INFO_FLAG_WRITE: u32 = 1 << 1;

// pci-epf-test's registers in BAR 0 and their bits, as Linux's
// pci_endpoint_test driver names them.
const PCI_ENDPOINT_TEST_COMMAND: u64 = 0x04;
const PCI_ENDPOINT_TEST_STATUS: u64 = 0x08;
const PCI_ENDPOINT_TEST_LOWER_SRC_ADDR: u64 = 0x0c;
const PCI_ENDPOINT_TEST_UPPER_SRC_ADDR: u64 = 0x10;
const PCI_ENDPOINT_TEST_LOWER_DST_ADDR: u64 = 0x14;
const PCI_ENDPOINT_TEST_UPPER_DST_ADDR: u64 = 0x18;
const PCI_ENDPOINT_TEST_SIZE: u64 = 0x1c;
const PCI_ENDPOINT_TEST_IRQ_TYPE: u64 = 0x24;
const PCI_ENDPOINT_TEST_IRQ_NUMBER: u64 = 0x28;
const COMMAND_COPY: u32 = 1 << 5;
const IRQ_TYPE_MSI: u32 = 1;
const STATUS_COPY_SUCCESS: u32 = 1 << 4;
const STATUS_COPY_FAIL: u32 = 1 << 5;
const STATUS_IRQ_RAISED: u32 = 1 << 6;
const STATUS_SRC_ADDR_INVALID: u32 = 1 << 7;

const VENDOR_DEVICE: u32 = 0xb500_104c; // TI, DRA74x
const MSI_VECTORS: u32 = 32;

const BUF_LEN: usize = 1 << 20;
const IOVA: u64 = 0x10_0000;
/// Not a multiple of anything: the copy crosses pages and ends mid-word.
const COPY_LEN: usize = 3 * 4096 + 5;

/// Runs `scenario` (one of the ignored tests) in this binary under `ioasid
/// run` with one pci-epf-test function, and expects it to pass.
fn run_scenario(scenario: &str) {
    build_shim();
    let exe = std::env::current_exe().unwrap();
    let device = format!("pci-epf-test,bdf={BDF}");
    let mut child = Command::new(env!("CARGO_BIN_EXE_ioasid"))
        .args(["run", "--device", &device, "--"])
        .arg(&exe)
        .args([scenario, "--exact", "--ignored", "--nocapture", "--test-threads=1"])
        .env("IOASID_PRELOAD", target_dir().join("libioasid_preload.so"))
        .env(SCENARIO_ENV, scenario)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group: `ioasid run` forks the scenario, and a
        // deadline must end both (and so close the pipes read below).
        .process_group(0)
        .spawn()
        .unwrap();
    // A device that never answers must fail the test, not hang CI.
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let group = rustix::process::Pid::from_child(&child);
            rustix::process::kill_process_group(group, rustix::process::Signal::KILL).unwrap();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("test result: ok. 1 passed"),
        "{scenario} under ioasid run: {}\n{stdout}{stderr}",
        out.status
    );
}

#[test]
fn vfio_ioctls_binds_the_cdev_to_iommufd_and_the_dma_goes_through_its_ioas() {
    run_scenario("scenario_cdev_path");
}

#[test]
fn vfio_ioctls_reaches_the_device_through_a_type1_container_and_its_group() {
    run_scenario("scenario_container_path");
}

#[test]
#[ignore = "run under `ioasid run` by the test of the cdev path"]
fn scenario_cdev_path() {
    assert_under_ioasid("scenario_cdev_path");
    let iommufd = Arc::new(IommuFd::new().expect("open /dev/iommu"));
    let vfio_iommufd = Arc::new(VfioIommufd::new(Arc::clone(&iommufd), None, None).unwrap());
    let device = VfioDevice::new(Path::new(SYSFS), vfio_iommufd.clone(), true).expect("bind and attach the cdev");
    assert!(device.iommufd_dev_id().is_some(), "VFIO_DEVICE_BIND_IOMMUFD gave no device ID");
    check_device(&device);
    check_dma(&device, vfio_iommufd.as_ref());
}

#[test]
#[ignore = "run under `ioasid run` by the test of the container path"]
fn scenario_container_path() {
    assert_under_ioasid("scenario_container_path");
    let container = Arc::new(VfioContainer::new(None).expect("open the type1 container"));
    let device =
        VfioDevice::new(Path::new(SYSFS), container.clone(), false).expect("open the device through its group");
    assert_eq!(device.iommufd_dev_id(), None);
    check_device(&device);
    check_dma(&device, container.as_ref());
}

fn assert_under_ioasid(scenario: &str) {
    assert_eq!(
        std::env::var(SCENARIO_ENV).as_deref(),
        Ok(scenario),
        "this scenario needs ioasid's VFIO device files: its non-ignored test runs it"
    );
}

/// What the crate read of the device when it opened it, and config space.
fn check_device(device: &VfioDevice) {
    let bar0 = VFIO_PCI_BAR0_REGION_INDEX;
    assert_eq!(device.get_region_size(bar0), 4096);
    let rw = VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE;
    assert_eq!(device.get_region_flags(bar0) & rw, rw);
    assert!(device.get_region_size(VFIO_PCI_CONFIG_REGION_INDEX) >= 256);
    assert_eq!(device.get_irq_info(VFIO_PCI_INTX_IRQ_INDEX).map(|i| i.count), Some(1));
    assert_eq!(device.get_irq_info(VFIO_PCI_MSI_IRQ_INDEX).map(|i| i.count), Some(MSI_VECTORS));
    assert_eq!(device.get_irq_info(VFIO_PCI_MSIX_IRQ_INDEX).map(|i| i.count), Some(32));
    assert_eq!(device.max_interrupts(), 32);
    let mut id = [0xffu8; 4];
    device.region_read(VFIO_PCI_CONFIG_REGION_INDEX, &mut id, 0);
    assert_eq!(u32::from_le_bytes(id), VENDOR_DEVICE);
}

/// Anonymous memory that the device reaches by DMA while it is mapped: no
/// Rust reference to it lives then, as `VfioOps::vfio_dma_map` requires.
struct DmaBuffer(NonNull<u8>);

impl DmaBuffer {
    fn new() -> Self {
        // SAFETY: a fresh private anonymous mapping, owned by the buffer until
        // its drop unmaps it.
        let ptr = unsafe {
            rustix::mm::mmap_anonymous(
                std::ptr::null_mut(),
                BUF_LEN,
                rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
                rustix::mm::MapFlags::PRIVATE,
            )
        }
        .unwrap();
        DmaBuffer(NonNull::new(ptr.cast()).unwrap())
    }

    /// The buffer's bytes, while no device may reach them.
    fn bytes(&mut self) -> &mut [u8] {
        // SAFETY: BUF_LEN bytes mapped read-write for the buffer's life; the
        // callers take this only while the buffer is not mapped for DMA.
        unsafe { std::slice::from_raw_parts_mut(self.0.as_ptr(), BUF_LEN) }
    }
}

impl Drop for DmaBuffer {
    fn drop(&mut self) {
        // SAFETY: the mapping `new` made, which nothing uses any more.
        unsafe { rustix::mm::munmap(self.0.as_ptr().cast(), BUF_LEN) }.unwrap();
    }
}

/// MSI with an eventfd per vector, a buffer mapped through `ops`, and
/// the endpoint's COPY within it: the bytes arrive and the vector the
/// command names fires; unmapped, the same COPY faults.
fn check_dma(device: &VfioDevice, ops: &dyn VfioOps) {
    let vectors: Vec<EventFd> = (0..MSI_VECTORS).map(|_| EventFd::new(EFD_NONBLOCK).unwrap()).collect();
    device.enable_msi(vectors.iter().collect()).expect("VFIO_DEVICE_SET_IRQS for MSI");

    let mut buf = DmaBuffer::new();
    let (src, dst) = (IOVA, IOVA + BUF_LEN as u64 / 2);
    for (i, b) in buf.bytes()[..BUF_LEN / 2].iter_mut().enumerate() {
        *b = (i * 7 + i / 251) as u8;
    }
    // SAFETY: the buffer outlives the mapping (unmapped below before any
    // reference to it is taken again), and no reference to it lives meanwhile.
    unsafe { ops.vfio_dma_map(IOVA, BUF_LEN, buf.0.as_ptr()) }.expect("map the buffer for DMA");

    // Vector 3 (the driver's IRQ_NUMBER 4): only its eventfd may fire.
    let status = copy(device, &vectors, src, dst, COPY_LEN, 4);
    assert_eq!(
        status & (STATUS_COPY_SUCCESS | STATUS_COPY_FAIL | STATUS_IRQ_RAISED),
        STATUS_COPY_SUCCESS | STATUS_IRQ_RAISED,
        "COPY's status {status:#x}"
    );

    ops.vfio_dma_unmap(IOVA, BUF_LEN).expect("unmap the buffer");
    let bytes = buf.bytes();
    let (from, to) = bytes.split_at(BUF_LEN / 2);
    assert!(from[..COPY_LEN] == to[..COPY_LEN], "the device copied other bytes");
    assert!(to[COPY_LEN..].iter().all(|&b| b == 0), "the device wrote past its COPY");

    // Nothing mapped any more: the device's read faults, and it says so.
    let status = copy(device, &vectors, src, dst, 64, 1);
    assert_eq!(
        status & (STATUS_COPY_SUCCESS | STATUS_COPY_FAIL | STATUS_SRC_ADDR_INVALID),
        STATUS_COPY_FAIL | STATUS_SRC_ADDR_INVALID,
        "COPY from an unmapped IOVA: status {status:#x}"
    );

    device.disable_msi().expect("disable MSI");
    device.reset();
}

fn write_reg(device: &VfioDevice, reg: u64, value: u32) {
    device.region_write(VFIO_PCI_BAR0_REGION_INDEX, &value.to_le_bytes(), reg);
}

fn read_reg(device: &VfioDevice, reg: u64) -> u32 {
    // region_read leaves the buffer as it was if the read fails.
    let mut value = [0xffu8; 4];
    device.region_read(VFIO_PCI_BAR0_REGION_INDEX, &mut value, reg);
    u32::from_le_bytes(value)
}

/// pci_endpoint_test's COPY of `len` bytes from `src` to `dst` (IOVAs),
/// completed with MSI `irq_number` (from 1, as the driver numbers them): waits
/// for that vector's eventfd, as the driver waits for the interrupt, checks
/// no other vector fired, and returns STATUS.
fn copy(device: &VfioDevice, vectors: &[EventFd], src: u64, dst: u64, len: usize, irq_number: u32) -> u32 {
    write_reg(device, PCI_ENDPOINT_TEST_LOWER_SRC_ADDR, src as u32);
    write_reg(device, PCI_ENDPOINT_TEST_UPPER_SRC_ADDR, (src >> 32) as u32);
    write_reg(device, PCI_ENDPOINT_TEST_LOWER_DST_ADDR, dst as u32);
    write_reg(device, PCI_ENDPOINT_TEST_UPPER_DST_ADDR, (dst >> 32) as u32);
    write_reg(device, PCI_ENDPOINT_TEST_SIZE, len as u32);
    write_reg(device, PCI_ENDPOINT_TEST_IRQ_TYPE, IRQ_TYPE_MSI);
    write_reg(device, PCI_ENDPOINT_TEST_IRQ_NUMBER, irq_number);
    write_reg(device, PCI_ENDPOINT_TEST_STATUS, 0);
    write_reg(device, PCI_ENDPOINT_TEST_COMMAND, COMMAND_COPY);
    let vector = irq_number as usize - 1;
    assert_eq!(wait_for(&vectors[vector]), 1, "MSI vector {vector} fired once");
    for (v, fd) in vectors.iter().enumerate().filter(|&(v, _)| v != vector) {
        assert_eq!(fd.read().map_err(|e| e.kind()), Err(ErrorKind::WouldBlock), "MSI vector {v} fired");
    }
    read_reg(device, PCI_ENDPOINT_TEST_STATUS)
}

/// Waits (boundedly) for `eventfd` to be signalled; returns its count.
fn wait_for(eventfd: &EventFd) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match eventfd.read() {
            Ok(count) => return count,
            Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => panic!("no MSI within 5 s: {e}"),
        }
    }
}
