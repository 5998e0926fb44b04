//! `pci-epf-test`: the endpoint test function of Linux's PCI endpoint
//! framework (`drivers/pci/endpoint/functions/pci-epf-test.c`), as the host
//! sees it, for Linux's host-side driver `pci_endpoint_test`
//! (`drivers/misc/pci_endpoint_test.c`, the `/dev/pci-endpoint-test.N` of
//! `pcitest` and of the `pci_endpoint` selftests).
//!
//! # What the driver finds
//! - IDs: vendor 0x104c (`PCI_VENDOR_ID_TI`), device 0xb500
//!   (`PCI_DEVICE_ID_TI_DRA74x`), class 0xff0000 (`PCI_CLASS_OTHERS`, as the
//!   EPF's header says). The driver's ID table matches them with its
//!   `default_data` in 6.12 and 7.3 alike: test registers in BAR 0, and 4 KiB
//!   buffer alignment, which 7.3 drops since CAPS says unaligned access works.
//! - BARs (all 32-bit, non-prefetchable memory): BAR 0 is 4 KiB holding
//!   the test registers at 0, the MSI-X table at 0x80 and its PBA after it,
//!   as the EPF lays them out (registers rounded up to 128 bytes); BARs 1–4
//!   are 128 KiB and BAR 5 is 1 MiB of plain memory (7.3's default sizes),
//!   which the BAR tests fill with patterns and read back.
//! - Interrupts: INTA, MSI with 32 vectors (64-bit), MSI-X with 32 vectors;
//!   a PCI Express endpoint capability; with [`FunctionConfig`]'s
//!   `pasid_log2` a PASID extended capability of that width, with `pri` a
//!   PRI one.
//!
//! # Registers (BAR 0)
//! `MAGIC` 0x00, `COMMAND` 0x04, `STATUS` 0x08, `SRC_ADDR` 0x0c (64-bit),
//! `DST_ADDR` 0x14 (64-bit), `SIZE` 0x1c, `CHECKSUM` 0x20, `IRQ_TYPE` 0x24,
//! `IRQ_NUMBER` 0x28, `FLAGS` 0x2c, and 7.3's `CAPS` 0x30 and doorbell
//! registers 0x34–0x3c, as the EPF's `struct pci_epf_test_reg`. CAPS says
//! unaligned access, MSI, MSI-X and INTx; no reserved BARs, no subrange
//! mapping and no doorbell, so the 7.3 driver skips those tests, and a
//! doorbell or subrange command is answered with its FAIL status as an EPF
//! on a controller without the feature answers it.
//!
//! ioasid's extension: [`REG_PASID`] at 0x40, the first word after the
//! standard registers. Bit 31 ([`PASID_VALID`]) set tags the function's DMA
//! with the PASID in bits 19–0; 0 (its reset value, which the standard
//! driver never changes) leaves DMA untagged. A PASID the function's
//! capability cannot carry fails the command.
//!
//! # Commands
//! A write that leaves `COMMAND` non-zero is the doorbell: as the EPF's
//! command handler does, the model clears `COMMAND` and `STATUS`, runs the
//! command (`RAISE_*_IRQ`, `READ`, `WRITE` or `COPY`, with `FLAG_USE_DMA` or
//! without: both are the same copy here), writes `STATUS` (and `CHECKSUM`
//! for `WRITE`, crc32 as the driver's `crc32_le(~0, ...)`), sets
//! `IRQ_RAISED` and raises the interrupt `IRQ_TYPE`/`IRQ_NUMBER` name (MSI
//! and MSI-X numbers from 1, as the driver writes them). A DMA that fails
//! (blocked, IOMMU fault, memory gone) sets `SRC_ADDR_INVALID` or
//! `DST_ADDR_INVALID` beside the command's FAIL bit. Transfers above 4 MiB
//! fail as the EPF's buffer allocation does (`KMALLOC_MAX_SIZE`); the model
//! moves data through one buffer of at most 64 KiB per command, so its
//! memory is its BARs (allocated once) and that buffer.
//!
//! # Threads
//! Without PRI, a command runs inside the `bar_write` that rang the doorbell:
//! the DMA is a copy, and the vCPU that wrote the register waits for it as it
//! would for a posted write's side effects. Commands never run two at a time:
//! a doorbell rung while another vCPU runs one is picked up by that vCPU
//! when it finishes, as the EPF's single command handler would.
//!
//! With PRI, a DMA may wait for a page response from whoever handles the
//! fault queue, possibly the very vCPU that wrote the doorbell, so
//! `bar_write` only hands the command to a worker thread the model owns:
//! started on the first command, it runs commands until the function is reset
//! or dropped, which stop and join it (waiting for the command in flight,
//! whose page request the fault queue answers or aborts on detach).
//!
//! The interrupt a command raises goes to [`Bus::interrupt`]; masking and
//! vectors the driver did not set up are the bus's business. The EPF's check
//! of the vector number against the vectors enabled
//! (`pci_epc_get_msi`/`_msix`) reads this function's own MSI and MSI-X
//! capabilities; while one is not enabled in config space (a front end that
//! virtualises it, as vfio-pci does), every vector of the capability counts.

use std::sync::Arc;
use std::thread::JoinHandle;

use parking_lot::{Condvar, Mutex};

use super::config::{ConfigBuilder, ConfigSpace, MSIX_ENTRY_SIZE, MsixPlace};
use super::{Bar, BarKind, Bus, FunctionConfig, Irq, IrqCounts, PciFunction};

/// The model's name.
pub const MODEL: &str = "pci-epf-test";
/// `PCI_VENDOR_ID_TI`.
pub const VENDOR_ID: u16 = 0x104c;
/// `PCI_DEVICE_ID_TI_DRA74x`: matched with the driver's default data.
pub const DEVICE_ID: u16 = 0xb500;
/// `PCI_CLASS_OTHERS`, as the EPF's header has it.
pub const CLASS: u32 = 0xff_0000;

/// `PCI_ENDPOINT_TEST_MAGIC`.
pub const REG_MAGIC: u64 = 0x00;
/// `PCI_ENDPOINT_TEST_COMMAND`.
pub const REG_COMMAND: u64 = 0x04;
/// `PCI_ENDPOINT_TEST_STATUS`.
pub const REG_STATUS: u64 = 0x08;
/// `PCI_ENDPOINT_TEST_LOWER_SRC_ADDR` (the upper half at 0x10).
pub const REG_SRC_ADDR: u64 = 0x0c;
/// `PCI_ENDPOINT_TEST_LOWER_DST_ADDR` (the upper half at 0x18).
pub const REG_DST_ADDR: u64 = 0x14;
/// `PCI_ENDPOINT_TEST_SIZE`.
pub const REG_SIZE: u64 = 0x1c;
/// `PCI_ENDPOINT_TEST_CHECKSUM`.
pub const REG_CHECKSUM: u64 = 0x20;
/// `PCI_ENDPOINT_TEST_IRQ_TYPE`.
pub const REG_IRQ_TYPE: u64 = 0x24;
/// `PCI_ENDPOINT_TEST_IRQ_NUMBER`.
pub const REG_IRQ_NUMBER: u64 = 0x28;
/// `PCI_ENDPOINT_TEST_FLAGS`.
pub const REG_FLAGS: u64 = 0x2c;
/// `PCI_ENDPOINT_TEST_CAPS` (7.3).
pub const REG_CAPS: u64 = 0x30;
/// `PCI_ENDPOINT_TEST_DB_BAR` (7.3).
pub const REG_DB_BAR: u64 = 0x34;
/// ioasid's extension: the PASID the function's DMA is tagged with.
pub const REG_PASID: u64 = 0x40;
/// In [`REG_PASID`]: tag DMA with the PASID in bits 19–0.
pub const PASID_VALID: u32 = 1 << 31;

/// `IRQ_TYPE_INTX`.
pub const IRQ_TYPE_INTX: u32 = 0;
/// `IRQ_TYPE_MSI`.
pub const IRQ_TYPE_MSI: u32 = 1;
/// `IRQ_TYPE_MSIX`.
pub const IRQ_TYPE_MSIX: u32 = 2;

/// `COMMAND_RAISE_INTX_IRQ`.
pub const COMMAND_RAISE_INTX_IRQ: u32 = 1 << 0;
/// `COMMAND_RAISE_MSI_IRQ`.
pub const COMMAND_RAISE_MSI_IRQ: u32 = 1 << 1;
/// `COMMAND_RAISE_MSIX_IRQ`.
pub const COMMAND_RAISE_MSIX_IRQ: u32 = 1 << 2;
/// `COMMAND_READ`: the function reads `SIZE` bytes at `SRC_ADDR` and checks
/// them against `CHECKSUM`.
pub const COMMAND_READ: u32 = 1 << 3;
/// `COMMAND_WRITE`: the function writes `SIZE` random bytes at `DST_ADDR`
/// and their checksum to `CHECKSUM`.
pub const COMMAND_WRITE: u32 = 1 << 4;
/// `COMMAND_COPY`: `SIZE` bytes from `SRC_ADDR` to `DST_ADDR`.
pub const COMMAND_COPY: u32 = 1 << 5;
/// `COMMAND_ENABLE_DOORBELL` (7.3).
pub const COMMAND_ENABLE_DOORBELL: u32 = 1 << 6;
/// `COMMAND_DISABLE_DOORBELL` (7.3).
pub const COMMAND_DISABLE_DOORBELL: u32 = 1 << 7;
/// `COMMAND_BAR_SUBRANGE_SETUP` (7.3).
pub const COMMAND_BAR_SUBRANGE_SETUP: u32 = 1 << 8;
/// `COMMAND_BAR_SUBRANGE_CLEAR` (7.3).
pub const COMMAND_BAR_SUBRANGE_CLEAR: u32 = 1 << 9;

/// `STATUS_READ_SUCCESS`.
pub const STATUS_READ_SUCCESS: u32 = 1 << 0;
/// `STATUS_READ_FAIL`.
pub const STATUS_READ_FAIL: u32 = 1 << 1;
/// `STATUS_WRITE_SUCCESS`.
pub const STATUS_WRITE_SUCCESS: u32 = 1 << 2;
/// `STATUS_WRITE_FAIL`.
pub const STATUS_WRITE_FAIL: u32 = 1 << 3;
/// `STATUS_COPY_SUCCESS`.
pub const STATUS_COPY_SUCCESS: u32 = 1 << 4;
/// `STATUS_COPY_FAIL`.
pub const STATUS_COPY_FAIL: u32 = 1 << 5;
/// `STATUS_IRQ_RAISED`.
pub const STATUS_IRQ_RAISED: u32 = 1 << 6;
/// `STATUS_SRC_ADDR_INVALID`.
pub const STATUS_SRC_ADDR_INVALID: u32 = 1 << 7;
/// `STATUS_DST_ADDR_INVALID`.
pub const STATUS_DST_ADDR_INVALID: u32 = 1 << 8;
/// `STATUS_DOORBELL_ENABLE_FAIL` (7.3).
pub const STATUS_DOORBELL_ENABLE_FAIL: u32 = 1 << 11;
/// `STATUS_DOORBELL_DISABLE_SUCCESS` (7.3).
pub const STATUS_DOORBELL_DISABLE_SUCCESS: u32 = 1 << 12;
/// `STATUS_DOORBELL_DISABLE_FAIL` (7.3).
pub const STATUS_DOORBELL_DISABLE_FAIL: u32 = 1 << 13;
/// `STATUS_BAR_SUBRANGE_SETUP_FAIL` (7.3).
pub const STATUS_BAR_SUBRANGE_SETUP_FAIL: u32 = 1 << 15;
/// `STATUS_BAR_SUBRANGE_CLEAR_FAIL` (7.3).
pub const STATUS_BAR_SUBRANGE_CLEAR_FAIL: u32 = 1 << 17;

/// `FLAG_USE_DMA`: the EPF's DMA engine instead of its CPU copies; the same
/// copy here.
pub const FLAG_USE_DMA: u32 = 1 << 0;

/// `CAP_UNALIGNED_ACCESS` (7.3).
pub const CAP_UNALIGNED_ACCESS: u32 = 1 << 0;
/// `CAP_MSI` (7.3).
pub const CAP_MSI: u32 = 1 << 1;
/// `CAP_MSIX` (7.3).
pub const CAP_MSIX: u32 = 1 << 2;
/// `CAP_INTX` (7.3).
pub const CAP_INTX: u32 = 1 << 3;

/// Sizes of BARs 0–5: BAR 0 holds the registers, MSI-X table and PBA.
pub const BAR_SIZES: [u64; 6] = [4096, 128 << 10, 128 << 10, 128 << 10, 128 << 10, 1 << 20];
/// MSI vectors.
pub const MSI_VECTORS: u32 = 32;
/// MSI-X vectors.
pub const MSIX_VECTORS: u32 = 32;
/// Where the MSI-X table is in BAR 0: after the registers, rounded up to
/// 128 bytes, as the EPF places it.
pub const MSIX_TABLE: u64 = 0x80;
/// Where the MSI-X PBA is in BAR 0: right after the table.
pub const MSIX_PBA: u64 = MSIX_TABLE + MSIX_ENTRY_SIZE * MSIX_VECTORS as u64;
/// Bytes of the PBA: one bit a vector, in whole quadwords.
const MSIX_PBA_SIZE: u64 = (MSIX_VECTORS as u64).div_ceil(64) * 8;
/// The largest transfer: the EPF's buffer is one `kzalloc`, which fails above
/// `KMALLOC_MAX_SIZE` (4 MiB).
pub const MAX_TRANSFER: u32 = 4 << 20;
/// The model's transfer buffer.
const CHUNK: usize = 64 << 10;
/// `NO_BAR`, as the EPF writes it to `DB_BAR`.
const NO_BAR: u32 = u32::MAX;

/// The endpoint test function.
pub struct EpfTest {
    config: FunctionConfig,
    shared: Arc<Shared>,
    /// The worker of a PRI function, once started.
    worker: Mutex<Option<JoinHandle<()>>>,
}

/// What the function's accessors and its worker share.
struct Shared {
    cfg: Mutex<ConfigSpace>,
    /// BAR 0 ... BAR 5; BAR 0's registers are read and written as memory,
    /// as the EPF's are.
    bars: [Mutex<Box<[u8]>>; 6],
    /// Held while commands run: one at a time, and reset waits for it.
    running: Mutex<()>,
    work: Mutex<Work>,
    wake: Condvar,
}

/// A PRI function's hand-over to its worker.
#[derive(Default)]
struct Work {
    /// The bus of the latest doorbell, taken by the worker: held only while
    /// a command waits, so the function keeps no reference of its bus.
    bus: Option<Arc<dyn Bus>>,
    stop: bool,
}

/// A command as its registers gave it.
struct Command {
    command: u32,
    src: u64,
    dst: u64,
    size: u32,
    checksum: u32,
    irq_type: u32,
    irq_number: u32,
    pasid: u32,
}

impl EpfTest {
    /// A function configured with `config`, or `None` if its PASID width is
    /// more than PCI's 20 bits.
    pub fn new(config: FunctionConfig) -> Option<Self> {
        if config.pasid_log2 > 20 {
            return None;
        }
        let mut b = ConfigBuilder::new(VENDOR_ID, DEVICE_ID).class(CLASS).interrupt_pin(1);
        for (i, &size) in BAR_SIZES.iter().enumerate() {
            b = b.bar(i, Bar { size, kind: BarKind::Mem32, prefetchable: false });
        }
        b = b.pcie_endpoint().msi(MSI_VECTORS, false).msix(
            MSIX_VECTORS,
            MsixPlace { bar: 0, offset: MSIX_TABLE as u32 },
            MsixPlace { bar: 0, offset: MSIX_PBA as u32 },
        );
        if config.pasid_log2 > 0 {
            b = b.pasid(config.pasid_log2, false, false);
        }
        if config.pri {
            b = b.pri(32);
        }
        let shared = Shared {
            cfg: Mutex::new(b.build()),
            bars: BAR_SIZES.map(|s| Mutex::new(vec![0; s as usize].into_boxed_slice())),
            running: Mutex::new(()),
            work: Mutex::new(Work::default()),
            wake: Condvar::new(),
        };
        shared.power_on();
        Some(EpfTest { config, shared: Arc::new(shared), worker: Mutex::new(None) })
    }

    /// Runs the commands rung for, on this thread (no PRI) or on the worker.
    fn doorbell(&self, bus: &Arc<dyn Bus>) {
        if !self.config.pri {
            self.shared.run_pending(bus);
            return;
        }
        let mut worker = self.worker.lock();
        self.shared.work.lock().bus = Some(bus.clone());
        if worker.is_none() {
            let shared = self.shared.clone();
            *worker = Some(
                std::thread::Builder::new()
                    .name("pci-epf-test".into())
                    .spawn(move || shared.serve())
                    .expect("spawning the pci-epf-test worker"),
            );
        }
        self.shared.wake.notify_one();
    }

    /// Stops the worker, if any, once its command in flight is done.
    fn stop_worker(&self) {
        let mut worker = self.worker.lock();
        let Some(handle) = worker.take() else { return };
        self.shared.work.lock().stop = true;
        self.shared.wake.notify_one();
        let _ = handle.join();
        *self.shared.work.lock() = Work::default();
    }
}

impl Drop for EpfTest {
    fn drop(&mut self) {
        self.stop_worker();
    }
}

impl Shared {
    /// Registers as the EPF leaves them once bound: zero but for CAPS.
    fn power_on(&self) {
        for bar in &self.bars {
            bar.lock().fill(0);
        }
        let mut bar0 = self.bars[0].lock();
        let caps = CAP_UNALIGNED_ACCESS | CAP_MSI | CAP_MSIX | CAP_INTX;
        put32(&mut bar0, REG_CAPS, caps);
    }

    /// The worker's loop: waits for a doorbell, runs what is pending.
    fn serve(&self) {
        loop {
            let bus = {
                let mut work = self.work.lock();
                loop {
                    if work.stop {
                        return;
                    }
                    if let Some(bus) = work.bus.take() {
                        break bus;
                    }
                    self.wake.wait(&mut work);
                }
            };
            self.run_pending(&bus);
        }
    }

    /// Runs commands while `COMMAND` holds one; returns at once if another
    /// thread is running them (it sees this one when it finishes).
    fn run_pending(&self, bus: &Arc<dyn Bus>) {
        loop {
            let Some(running) = self.running.try_lock() else { return };
            while let Some(cmd) = self.take_command() {
                self.execute(bus, cmd);
            }
            drop(running);
            // A doorbell rung between the last look and the unlock saw the
            // lock held and left its command to this thread.
            if get32(&self.bars[0].lock(), REG_COMMAND) == 0 {
                return;
            }
        }
    }

    /// Takes the pending command as the EPF's handler does: `COMMAND` and
    /// `STATUS` cleared, the other registers read.
    fn take_command(&self) -> Option<Command> {
        let mut r = self.bars[0].lock();
        let command = get32(&r, REG_COMMAND);
        if command == 0 {
            return None;
        }
        put32(&mut r, REG_COMMAND, 0);
        put32(&mut r, REG_STATUS, 0);
        Some(Command {
            command,
            src: get64(&r, REG_SRC_ADDR),
            dst: get64(&r, REG_DST_ADDR),
            size: get32(&r, REG_SIZE),
            checksum: get32(&r, REG_CHECKSUM),
            irq_type: get32(&r, REG_IRQ_TYPE),
            irq_number: get32(&r, REG_IRQ_NUMBER),
            pasid: get32(&r, REG_PASID),
        })
    }

    fn execute(&self, bus: &Arc<dyn Bus>, cmd: Command) {
        // The EPF ignores a command with an IRQ type it does not know.
        if cmd.irq_type > IRQ_TYPE_MSIX {
            return;
        }
        let pasid = self.pasid(cmd.pasid);
        let mut checksum = None;
        let status = match cmd.command {
            COMMAND_RAISE_INTX_IRQ | COMMAND_RAISE_MSI_IRQ | COMMAND_RAISE_MSIX_IRQ => 0,
            COMMAND_READ => match pasid {
                Ok(pasid) => self.read(bus.as_ref(), pasid, &cmd),
                Err(()) => STATUS_READ_FAIL,
            },
            COMMAND_WRITE => match pasid {
                Ok(pasid) => {
                    let (status, crc) = self.write(bus.as_ref(), pasid, &cmd);
                    checksum = Some(crc);
                    status
                }
                Err(()) => STATUS_WRITE_FAIL,
            },
            COMMAND_COPY => match pasid {
                Ok(pasid) => self.copy(bus.as_ref(), pasid, &cmd),
                Err(()) => STATUS_COPY_FAIL,
            },
            // No doorbell here: allocating one fails, and the EPF's cleanup
            // leaves DB_BAR at NO_BAR.
            COMMAND_ENABLE_DOORBELL => {
                put32(&mut self.bars[0].lock(), REG_DB_BAR, NO_BAR);
                STATUS_DOORBELL_ENABLE_FAIL
            }
            COMMAND_DISABLE_DOORBELL => {
                let mut r = self.bars[0].lock();
                if (get32(&r, REG_DB_BAR) as i32) < 0 {
                    STATUS_DOORBELL_DISABLE_FAIL
                } else {
                    put32(&mut r, REG_DB_BAR, NO_BAR);
                    STATUS_DOORBELL_DISABLE_SUCCESS
                }
            }
            COMMAND_BAR_SUBRANGE_SETUP => STATUS_BAR_SUBRANGE_SETUP_FAIL,
            COMMAND_BAR_SUBRANGE_CLEAR => STATUS_BAR_SUBRANGE_CLEAR_FAIL,
            // "Invalid command": no status, no interrupt.
            _ => return,
        };
        {
            // Status before the interrupt, so the handler sees it.
            let mut r = self.bars[0].lock();
            if let Some(crc) = checksum {
                put32(&mut r, REG_CHECKSUM, crc);
            }
            put32(&mut r, REG_STATUS, status | STATUS_IRQ_RAISED);
        }
        self.raise(bus.as_ref(), cmd.irq_type, cmd.irq_number);
    }

    /// The PASID `reg` asks DMA to carry: `Err` for one the function's
    /// capability cannot carry.
    fn pasid(&self, reg: u32) -> Result<Option<u32>, ()> {
        if reg & PASID_VALID == 0 {
            return Ok(None);
        }
        let pasid = reg & 0xf_ffff;
        let cfg = self.cfg.lock();
        let Some(at) = cfg.pasid_cap() else { return Err(()) };
        let width = (cfg.read16(at + 4) >> 8) & 0x1f;
        if u64::from(pasid) >> width != 0 {
            return Err(());
        }
        Ok(Some(pasid))
    }

    /// `COMMAND_READ`: reads the driver's buffer, checks its checksum.
    fn read(&self, bus: &dyn Bus, pasid: Option<u32>, cmd: &Command) -> u32 {
        let Some(mut buf) = transfer_buffer(cmd.size) else { return STATUS_READ_FAIL };
        let mut crc = crc32fast::Hasher::new();
        let mut done = 0u64;
        while done < u64::from(cmd.size) {
            let n = (u64::from(cmd.size) - done).min(buf.len() as u64) as usize;
            if bus.dma_read(pasid, cmd.src.wrapping_add(done), &mut buf[..n]).is_err() {
                return STATUS_SRC_ADDR_INVALID | STATUS_READ_FAIL;
            }
            crc.update(&buf[..n]);
            done += n as u64;
        }
        if crc32_le(crc) == cmd.checksum { STATUS_READ_SUCCESS } else { STATUS_READ_FAIL }
    }

    /// `COMMAND_WRITE`: random bytes to the driver's buffer, and their
    /// checksum.
    fn write(&self, bus: &dyn Bus, pasid: Option<u32>, cmd: &Command) -> (u32, u32) {
        let Some(mut buf) = transfer_buffer(cmd.size) else { return (STATUS_WRITE_FAIL, 0) };
        let mut rng = fastrand::Rng::new();
        let mut crc = crc32fast::Hasher::new();
        let mut done = 0u64;
        let mut status = STATUS_WRITE_SUCCESS;
        while done < u64::from(cmd.size) {
            let n = (u64::from(cmd.size) - done).min(buf.len() as u64) as usize;
            rng.fill(&mut buf[..n]);
            crc.update(&buf[..n]);
            if bus.dma_write(pasid, cmd.dst.wrapping_add(done), &buf[..n]).is_err() {
                status = STATUS_DST_ADDR_INVALID | STATUS_WRITE_FAIL;
                break;
            }
            done += n as u64;
        }
        (status, crc32_le(crc))
    }

    /// `COMMAND_COPY`: the driver's source buffer to its destination.
    fn copy(&self, bus: &dyn Bus, pasid: Option<u32>, cmd: &Command) -> u32 {
        let Some(mut buf) = transfer_buffer(cmd.size) else { return STATUS_COPY_FAIL };
        let mut done = 0u64;
        while done < u64::from(cmd.size) {
            let n = (u64::from(cmd.size) - done).min(buf.len() as u64) as usize;
            if bus.dma_read(pasid, cmd.src.wrapping_add(done), &mut buf[..n]).is_err() {
                return STATUS_SRC_ADDR_INVALID | STATUS_COPY_FAIL;
            }
            if bus.dma_write(pasid, cmd.dst.wrapping_add(done), &buf[..n]).is_err() {
                return STATUS_DST_ADDR_INVALID | STATUS_COPY_FAIL;
            }
            done += n as u64;
        }
        STATUS_COPY_SUCCESS
    }

    /// Raises the interrupt a command asked for, as `pci_epf_test_raise_irq`
    /// does: an MSI or MSI-X number (from 1) beyond the vectors enabled is
    /// dropped.
    fn raise(&self, bus: &dyn Bus, irq_type: u32, number: u32) {
        let irq = {
            let cfg = self.cfg.lock();
            match irq_type {
                IRQ_TYPE_INTX => Some(Irq::Intx),
                IRQ_TYPE_MSI => {
                    let count = match cfg.msi_enabled_vectors() {
                        0 => cfg.msi_vectors(),
                        n => n,
                    };
                    (1..=count).contains(&number).then(|| Irq::Msi(number - 1))
                }
                _ => (1..=cfg.msix_vectors()).contains(&number).then(|| Irq::Msix(number - 1)),
            }
        };
        if let Some(irq) = irq {
            bus.interrupt(irq);
        }
    }
}

/// The transfer buffer for `size` bytes, or `None` where the EPF's
/// allocation would fail.
fn transfer_buffer(size: u32) -> Option<Vec<u8>> {
    (size <= MAX_TRANSFER).then(|| vec![0; (size as usize).min(CHUNK)])
}

/// The driver's `crc32_le(~0, buf, len)`: the standard CRC-32 without its
/// final inversion.
fn crc32_le(h: crc32fast::Hasher) -> u32 {
    !h.finalize()
}

fn get32(b: &[u8], at: u64) -> u32 {
    let at = at as usize;
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn get64(b: &[u8], at: u64) -> u64 {
    u64::from(get32(b, at)) | u64::from(get32(b, at + 4)) << 32
}

fn put32(b: &mut [u8], at: u64, v: u32) {
    let at = at as usize;
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

impl PciFunction for EpfTest {
    fn model(&self) -> &'static str {
        MODEL
    }

    fn config(&self) -> FunctionConfig {
        self.config
    }

    fn config_size(&self) -> usize {
        self.shared.cfg.lock().size()
    }

    fn config_read(&self, offset: usize, data: &mut [u8]) {
        self.shared.cfg.lock().read(offset, data);
    }

    fn config_write(&self, offset: usize, data: &[u8]) {
        self.shared.cfg.lock().write(offset, data);
    }

    fn bar(&self, index: usize) -> Option<Bar> {
        self.shared.cfg.lock().bar(index)
    }

    fn bar_read(&self, _bus: &Arc<dyn Bus>, index: usize, offset: u64, data: &mut [u8]) {
        let Some(bar) = self.shared.bars.get(index) else { return data.fill(0xff) };
        let bar = bar.lock();
        for (i, b) in data.iter_mut().enumerate() {
            *b = bar.get(offset as usize + i).copied().unwrap_or(0xff);
        }
    }

    fn bar_write(&self, bus: &Arc<dyn Bus>, index: usize, offset: u64, data: &[u8]) {
        let Some(bar) = self.shared.bars.get(index) else { return };
        let ring = {
            let mut bar = bar.lock();
            for (i, &v) in data.iter().enumerate() {
                let at = offset + i as u64;
                // The PBA is the function's to set.
                let pba = index == 0 && (MSIX_PBA..MSIX_PBA + MSIX_PBA_SIZE).contains(&at);
                if let Some(b) = bar.get_mut(at as usize).filter(|_| !pba) {
                    *b = v;
                }
            }
            let end = offset.saturating_add(data.len() as u64);
            index == 0 && offset < REG_COMMAND + 4 && end > REG_COMMAND && get32(&bar, REG_COMMAND) != 0
        };
        if ring {
            self.doorbell(bus);
        }
    }

    fn irqs(&self) -> IrqCounts {
        IrqCounts { intx: true, msi: MSI_VECTORS, msix: MSIX_VECTORS }
    }

    fn reset(&self) {
        self.stop_worker();
        let _running = self.shared.running.lock();
        self.shared.cfg.lock().reset();
        self.shared.power_on();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::DmaError;

    /// Memory at IOVA 0.. for the function, and the interrupts it raised.
    #[derive(Default)]
    struct Ram {
        mem: Mutex<Vec<u8>>,
        irqs: Mutex<Vec<Irq>>,
    }

    impl Bus for Ram {
        fn dma_read(&self, _: Option<u32>, iova: u64, buf: &mut [u8]) -> Result<(), DmaError> {
            let mem = self.mem.lock();
            let src = mem.get(iova as usize..iova as usize + buf.len()).ok_or(DmaError::Blocked)?;
            buf.copy_from_slice(src);
            Ok(())
        }
        fn dma_write(&self, _: Option<u32>, iova: u64, buf: &[u8]) -> Result<(), DmaError> {
            let mut mem = self.mem.lock();
            let dst = mem.get_mut(iova as usize..iova as usize + buf.len()).ok_or(DmaError::Blocked)?;
            dst.copy_from_slice(buf);
            Ok(())
        }
        fn interrupt(&self, irq: Irq) {
            self.irqs.lock().push(irq);
        }
    }

    fn setup() -> (EpfTest, Arc<Ram>, Arc<dyn Bus>) {
        let f = EpfTest::new(FunctionConfig::default()).unwrap();
        let ram = Arc::new(Ram { mem: Mutex::new(vec![0; 1 << 16]), ..Ram::default() });
        let bus: Arc<dyn Bus> = ram.clone();
        (f, ram, bus)
    }

    fn w32(f: &EpfTest, bus: &Arc<dyn Bus>, reg: u64, v: u32) {
        f.bar_write(bus, 0, reg, &v.to_le_bytes());
    }

    fn r32(f: &EpfTest, bus: &Arc<dyn Bus>, reg: u64) -> u32 {
        let mut b = [0; 4];
        f.bar_read(bus, 0, reg, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn caps_and_ids() {
        let (f, _, bus) = setup();
        assert_eq!(r32(&f, &bus, REG_CAPS), CAP_UNALIGNED_ACCESS | CAP_MSI | CAP_MSIX | CAP_INTX);
        let mut id = [0; 4];
        f.config_read(0, &mut id);
        assert_eq!(id, [0x4c, 0x10, 0x00, 0xb5]);
        assert_eq!(f.config_size(), 4096);
        assert!(EpfTest::new(FunctionConfig { pasid_log2: 21, pri: false }).is_none());
    }

    #[test]
    fn crc_matches_the_drivers_crc32_le() {
        // crc32_le(~0, "123456789", 9), as lib/crc32 computes it.
        let mut h = crc32fast::Hasher::new();
        h.update(b"123456789");
        assert_eq!(crc32_le(h), !0xcbf4_3926);
    }

    #[test]
    fn unknown_irq_type_or_command_raises_nothing() {
        let (f, ram, bus) = setup();
        w32(&f, &bus, REG_IRQ_TYPE, 3);
        w32(&f, &bus, REG_COMMAND, COMMAND_RAISE_INTX_IRQ);
        assert_eq!((r32(&f, &bus, REG_COMMAND), r32(&f, &bus, REG_STATUS)), (0, 0));
        w32(&f, &bus, REG_IRQ_TYPE, IRQ_TYPE_INTX);
        w32(&f, &bus, REG_COMMAND, 1 << 20);
        assert_eq!((r32(&f, &bus, REG_COMMAND), r32(&f, &bus, REG_STATUS)), (0, 0));
        assert!(ram.irqs.lock().is_empty());
    }

    #[test]
    fn msi_numbers_beyond_the_enabled_vectors_are_dropped() {
        let (f, ram, bus) = setup();
        let msi = f.shared.cfg.lock().msi_cap().unwrap();
        // Enabled with 4 vectors (MME 2).
        f.config_write(msi + 2, &(1u16 | 2 << 4).to_le_bytes());
        w32(&f, &bus, REG_IRQ_TYPE, IRQ_TYPE_MSI);
        for n in [0, 1, 4, 5] {
            w32(&f, &bus, REG_IRQ_NUMBER, n);
            w32(&f, &bus, REG_COMMAND, COMMAND_RAISE_MSI_IRQ);
            assert_eq!(r32(&f, &bus, REG_STATUS), STATUS_IRQ_RAISED);
        }
        assert_eq!(*ram.irqs.lock(), [Irq::Msi(0), Irq::Msi(3)]);
    }

    #[test]
    fn doorbell_and_subrange_commands_fail_as_unsupported() {
        let (f, ram, bus) = setup();
        w32(&f, &bus, REG_IRQ_TYPE, IRQ_TYPE_INTX);
        for (cmd, status) in [
            (COMMAND_ENABLE_DOORBELL, STATUS_DOORBELL_ENABLE_FAIL),
            (COMMAND_DISABLE_DOORBELL, STATUS_DOORBELL_DISABLE_FAIL),
            (COMMAND_BAR_SUBRANGE_SETUP, STATUS_BAR_SUBRANGE_SETUP_FAIL),
            (COMMAND_BAR_SUBRANGE_CLEAR, STATUS_BAR_SUBRANGE_CLEAR_FAIL),
        ] {
            w32(&f, &bus, REG_COMMAND, cmd);
            assert_eq!(r32(&f, &bus, REG_STATUS), status | STATUS_IRQ_RAISED, "command {cmd:#x}");
        }
        assert_eq!(ram.irqs.lock().len(), 4);
    }

    #[test]
    fn oversized_transfers_fail_without_dma() {
        let (f, _, bus) = setup();
        w32(&f, &bus, REG_SIZE, MAX_TRANSFER + 1);
        for (cmd, fail) in
            [(COMMAND_READ, STATUS_READ_FAIL), (COMMAND_WRITE, STATUS_WRITE_FAIL), (COMMAND_COPY, STATUS_COPY_FAIL)]
        {
            w32(&f, &bus, REG_COMMAND, cmd);
            assert_eq!(r32(&f, &bus, REG_STATUS), fail | STATUS_IRQ_RAISED);
        }
    }

    #[test]
    fn pba_is_read_only_and_reset_restores_power_on() {
        let (f, _, bus) = setup();
        f.bar_write(&bus, 0, MSIX_PBA, &[0xff; 8]);
        let mut pba = [1; 8];
        f.bar_read(&bus, 0, MSIX_PBA, &mut pba);
        assert_eq!(pba, [0; 8]);
        f.bar_write(&bus, 3, 100, &[7; 4]);
        w32(&f, &bus, REG_CAPS, 0);
        f.reset();
        let mut b = [9; 4];
        f.bar_read(&bus, 3, 100, &mut b);
        assert_eq!(b, [0; 4]);
        assert_ne!(r32(&f, &bus, REG_CAPS), 0);
    }

    #[test]
    fn a_pasid_the_capability_cannot_carry_fails_the_command() {
        let (f, _, bus) = setup();
        w32(&f, &bus, REG_PASID, PASID_VALID | 1);
        w32(&f, &bus, REG_SIZE, 16);
        w32(&f, &bus, REG_COMMAND, COMMAND_COPY);
        assert_eq!(r32(&f, &bus, REG_STATUS), STATUS_COPY_FAIL | STATUS_IRQ_RAISED);

        let f = EpfTest::new(FunctionConfig { pasid_log2: 4, pri: false }).unwrap();
        w32(&f, &bus, REG_PASID, PASID_VALID | 16);
        w32(&f, &bus, REG_SIZE, 16);
        w32(&f, &bus, REG_COMMAND, COMMAND_COPY);
        assert_eq!(r32(&f, &bus, REG_STATUS), STATUS_COPY_FAIL | STATUS_IRQ_RAISED);
        w32(&f, &bus, REG_PASID, PASID_VALID | 15);
        w32(&f, &bus, REG_COMMAND, COMMAND_COPY);
        assert_eq!(r32(&f, &bus, REG_STATUS), STATUS_COPY_SUCCESS | STATUS_IRQ_RAISED);
    }
}
