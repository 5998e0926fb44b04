//! The pci-epf-test model driven as Linux's `pci_endpoint_test` drives it:
//! the BAR tests, READ/WRITE/COPY of the selftests' sizes under INTx, MSI
//! and MSI-X, checksums and STATUS checked, over a plain memory bus and over
//! a real context's device (IOMMU faults and PRI included).

use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;

use ioasid_engine::fault::{PASID_VALID as PGFAULT_PASID_VALID, Response};
use ioasid_engine::pci::config::{CAP_ID_MSI, CAP_ID_MSIX, find_capability};
use ioasid_engine::pci::epf_test::*;
use ioasid_engine::pci::{self, Bus, FunctionConfig, Irq, PciFunction};
use ioasid_engine::{Context, DeviceId, DmaError, HostBuffer, HwptFlags, IoasId, PAGE_SIZE, Perm};
use parking_lot::{Condvar, Mutex};

/// The selftests' transfer sizes (`test_size` in pci_endpoint_test.c).
const SIZES: [u32; 5] = [1, 1024, 1025, 1_024_000, 1_024_001];
/// The driver's 1-second wait for an interrupt.
const IRQ_WAIT: Duration = Duration::from_secs(5);
/// Bytes of host memory the driver's buffers come from.
const RAM: usize = 4 << 20;

/// The interrupts a function raised, waited for as the driver's completion.
#[derive(Default)]
struct Irqs {
    seen: Mutex<Vec<Irq>>,
    cv: Condvar,
}

impl Irqs {
    fn raise(&self, irq: Irq) {
        self.seen.lock().push(irq);
        self.cv.notify_all();
    }

    fn wait(&self) -> Option<Irq> {
        let mut seen = self.seen.lock();
        if seen.is_empty() {
            self.cv.wait_for(&mut seen, IRQ_WAIT);
        }
        (!seen.is_empty()).then(|| seen.remove(0))
    }
}

/// What the driver's side sees of host memory: buffers by IOVA.
trait Host: Bus {
    fn irqs(&self) -> &Irqs;
    /// The IOVA of host memory byte 0.
    fn base(&self) -> u64;
    fn host_write(&self, offset: usize, data: &[u8]);
    fn host_read(&self, offset: usize, buf: &mut [u8]);
}

/// (a) A bus over a Vec: IOVA `BASE + n` is byte n.
struct VecBus {
    mem: Mutex<Vec<u8>>,
    irqs: Irqs,
}

const BASE: u64 = 0x8000_0000;

impl Bus for VecBus {
    fn dma_read(&self, _: Option<u32>, iova: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        let mem = self.mem.lock();
        let at = iova.checked_sub(BASE).ok_or(DmaError::Blocked)? as usize;
        buf.copy_from_slice(mem.get(at..at + buf.len()).ok_or(DmaError::Blocked)?);
        Ok(())
    }
    fn dma_write(&self, _: Option<u32>, iova: u64, buf: &[u8]) -> Result<(), DmaError> {
        let mut mem = self.mem.lock();
        let at = iova.checked_sub(BASE).ok_or(DmaError::Blocked)? as usize;
        mem.get_mut(at..at + buf.len()).ok_or(DmaError::Blocked)?.copy_from_slice(buf);
        Ok(())
    }
    fn interrupt(&self, irq: Irq) {
        self.irqs.raise(irq);
    }
}

impl Host for VecBus {
    fn irqs(&self) -> &Irqs {
        &self.irqs
    }
    fn base(&self) -> u64 {
        BASE
    }
    fn host_write(&self, offset: usize, data: &[u8]) {
        self.mem.lock()[offset..offset + data.len()].copy_from_slice(data);
    }
    fn host_read(&self, offset: usize, buf: &mut [u8]) {
        buf.copy_from_slice(&self.mem.lock()[offset..offset + buf.len()]);
    }
}

/// (b) A device of a real context, its DMA through its IOMMU.
struct CtxBus {
    ctx: Arc<Context>,
    dev: DeviceId,
    ioas: IoasId,
    ram: HostBuffer,
    iova: u64,
    irqs: Irqs,
}

impl Bus for CtxBus {
    fn dma_read(&self, pasid: Option<u32>, iova: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        self.ctx.get(self.dev).map_err(|_| DmaError::Blocked)?.port(pasid).read(iova, buf)
    }
    fn dma_write(&self, pasid: Option<u32>, iova: u64, buf: &[u8]) -> Result<(), DmaError> {
        self.ctx.get(self.dev).map_err(|_| DmaError::Blocked)?.port(pasid).write(iova, buf)
    }
    fn interrupt(&self, irq: Irq) {
        self.irqs.raise(irq);
    }
}

impl Host for CtxBus {
    fn irqs(&self) -> &Irqs {
        &self.irqs
    }
    fn base(&self) -> u64 {
        self.iova
    }
    fn host_write(&self, offset: usize, data: &[u8]) {
        self.ram.write_at(offset, data);
    }
    fn host_read(&self, offset: usize, buf: &mut [u8]) {
        self.ram.read_at(offset, buf);
    }
}

fn vec_bus() -> Arc<VecBus> {
    Arc::new(VecBus { mem: Mutex::new(vec![0; RAM]), irqs: Irqs::default() })
}

/// A context with the function's device attached to an IOAS where `RAM`
/// bytes of host memory are mapped (all of them unless `mapped` says less).
fn ctx_bus(config: FunctionConfig, mapped: usize) -> Arc<CtxBus> {
    let ctx = Arc::new(Context::new());
    let ioas = ctx.ioas_alloc().unwrap();
    let dev = ctx.bind_device(config.device_info("pci-epf-test", 0x0100)).unwrap();
    ctx.attach(dev, ioas).unwrap();
    let ram = HostBuffer::new(RAM).unwrap();
    let iova = ctx.map_user_checked(ioas, ram.addr(), mapped as u64, None, Perm::RW).unwrap();
    Arc::new(CtxBus { ctx, dev, ioas, ram, iova, irqs: Irqs::default() })
}

/// `pci_endpoint_test`, in Rust.
struct Driver<H: Host + 'static> {
    f: Arc<dyn PciFunction>,
    host: Arc<H>,
    bus: Arc<dyn Bus>,
    irq_type: u32,
}

impl<H: Host + 'static> Driver<H> {
    fn probe(f: Arc<dyn PciFunction>, host: Arc<H>) -> Self {
        let bus: Arc<dyn Bus> = host.clone();
        let mut id = [0; 4];
        f.config_read(0, &mut id);
        assert_eq!(u32::from_le_bytes(id), u32::from(DEVICE_ID) << 16 | u32::from(VENDOR_ID));
        Driver { f, host, bus, irq_type: IRQ_TYPE_INTX }
    }

    fn readl(&self, reg: u64) -> u32 {
        let mut b = [0; 4];
        self.f.bar_read(&self.bus, 0, reg, &mut b);
        u32::from_le_bytes(b)
    }

    fn writel(&self, reg: u64, v: u32) {
        self.f.bar_write(&self.bus, 0, reg, &v.to_le_bytes());
    }

    fn cfg32(&self, at: usize) -> u32 {
        let mut b = [0; 4];
        self.f.config_read(at, &mut b);
        u32::from_le_bytes(b)
    }

    /// `PCITEST_SET_IRQTYPE`: what `pci_alloc_irq_vectors` writes to the
    /// function's MSI or MSI-X capability.
    fn set_irq_type(&mut self, irq_type: u32) {
        let read = |at| self.cfg32(at);
        let msi = find_capability(read, CAP_ID_MSI);
        let msix = find_capability(read, CAP_ID_MSIX);
        self.f.config_write(msi + 2, &0u16.to_le_bytes());
        self.f.config_write(msix + 2, &0u16.to_le_bytes());
        match irq_type {
            IRQ_TYPE_MSI => self.f.config_write(msi + 2, &(1u16 | 5 << 4).to_le_bytes()),
            IRQ_TYPE_MSIX => self.f.config_write(msix + 2, &(1u16 << 15).to_le_bytes()),
            _ => {}
        }
        self.irq_type = irq_type;
    }

    /// Waits for the interrupt and checks it is the one asked for, with
    /// `STATUS_IRQ_RAISED` as the driver's handler checks.
    fn wait_irq(&self, number: u32) {
        let irq = self.host.irqs().wait().expect("no interrupt");
        let want = match self.irq_type {
            IRQ_TYPE_INTX => Irq::Intx,
            IRQ_TYPE_MSI => Irq::Msi(number - 1),
            _ => Irq::Msix(number - 1),
        };
        assert_eq!(irq, want);
        assert_ne!(self.readl(REG_STATUS) & STATUS_IRQ_RAISED, 0);
    }

    /// `PCITEST_BAR`: a pattern over the whole BAR (4 bytes of the test
    /// register BAR), read back.
    fn bar_test(&self, barno: usize) {
        let size = if barno == 0 { 4 } else { self.f.bar(barno).unwrap().size as usize };
        let pattern = [0xa0u8 + barno as u8 * 0x11; 4];
        let chunk = size.min(1 << 20);
        let mut read = vec![0; chunk];
        for off in (0..size).step_by(chunk) {
            self.f.bar_write(&self.bus, barno, off as u64, &pattern.repeat(chunk / 4));
            self.f.bar_read(&self.bus, barno, off as u64, &mut read);
            assert_eq!(read, pattern.repeat(chunk / 4), "BAR{barno} at {off:#x}");
        }
    }

    /// `PCITEST_BARS` (7.3): every BAR written with its offset pattern, then
    /// every BAR read back, so one BAR overwriting another shows.
    fn bars_test(&self) {
        let words = |barno: usize| if barno == 0 { 1 } else { self.f.bar(barno).unwrap().size as usize / 4 };
        let value =
            |barno: usize, j: usize| (0xa0a0_a0a0u32 + 0x0101_0101 * barno as u32) & 0xff00_0000 | (j as u32 * 4);
        for barno in 0..6 {
            for j in 0..words(barno) {
                self.f.bar_write(&self.bus, barno, j as u64 * 4, &value(barno, j).to_le_bytes());
            }
        }
        for barno in 0..6 {
            for j in 0..words(barno) {
                let mut b = [0; 4];
                self.f.bar_read(&self.bus, barno, j as u64 * 4, &mut b);
                assert_eq!(u32::from_le_bytes(b), value(barno, j), "BAR{barno} word {j}");
            }
        }
    }

    /// `PCITEST_INTX_IRQ`, `PCITEST_MSI`, `PCITEST_MSIX`.
    fn irq_test(&self, command: u32, number: u32) {
        self.writel(REG_IRQ_TYPE, self.irq_type);
        self.writel(REG_IRQ_NUMBER, number);
        self.writel(REG_COMMAND, command);
        self.wait_irq(number.max(1));
    }

    fn command(&self, command: u32, size: u32) -> u32 {
        self.writel(REG_SIZE, size);
        self.writel(REG_FLAGS, 0);
        self.writel(REG_IRQ_TYPE, self.irq_type);
        self.writel(REG_IRQ_NUMBER, 1);
        self.writel(REG_COMMAND, command);
        self.wait_irq(1);
        self.readl(REG_STATUS)
    }

    fn set_addr(&self, reg: u64, iova: u64) {
        self.writel(reg, iova as u32);
        self.writel(reg + 4, (iova >> 32) as u32);
    }

    /// `PCITEST_WRITE`: the function reads a random buffer at `offset`.
    fn write_test(&self, offset: usize, size: u32) -> u32 {
        let data: Vec<u8> = (0..size).map(|_| fastrand::u8(..)).collect();
        self.host.host_write(offset, &data);
        self.writel(REG_CHECKSUM, crc32_le(&data));
        self.set_addr(REG_SRC_ADDR, self.host.base() + offset as u64);
        self.command(COMMAND_READ, size)
    }

    /// `PCITEST_READ`: the function writes a buffer at `offset`; its
    /// checksum must match.
    fn read_test(&self, offset: usize, size: u32) -> (u32, bool) {
        self.set_addr(REG_DST_ADDR, self.host.base() + offset as u64);
        let status = self.command(COMMAND_WRITE, size);
        let mut data = vec![0; size as usize];
        self.host.host_read(offset, &mut data);
        (status, crc32_le(&data) == self.readl(REG_CHECKSUM))
    }

    /// `PCITEST_COPY`.
    fn copy_test(&self, src: usize, dst: usize, size: u32) -> u32 {
        let data: Vec<u8> = (0..size).map(|_| fastrand::u8(..)).collect();
        self.host.host_write(src, &data);
        self.set_addr(REG_SRC_ADDR, self.host.base() + src as u64);
        self.set_addr(REG_DST_ADDR, self.host.base() + dst as u64);
        let status = self.command(COMMAND_COPY, size);
        let mut copied = vec![0; size as usize];
        self.host.host_read(dst, &mut copied);
        assert!(copied == data, "COPY of {size} bytes");
        status
    }

    /// The whole suite, as the selftests run it.
    fn run_all(&mut self) {
        for barno in 0..6 {
            self.bar_test(barno);
        }
        self.bars_test();

        self.set_irq_type(IRQ_TYPE_INTX);
        self.irq_test(COMMAND_RAISE_INTX_IRQ, 0);
        self.set_irq_type(IRQ_TYPE_MSI);
        for n in 1..=MSI_VECTORS {
            self.irq_test(COMMAND_RAISE_MSI_IRQ, n);
        }
        self.set_irq_type(IRQ_TYPE_MSIX);
        for n in 1..=MSIX_VECTORS {
            self.irq_test(COMMAND_RAISE_MSIX_IRQ, n);
        }

        for irq_type in [IRQ_TYPE_INTX, IRQ_TYPE_MSI, IRQ_TYPE_MSIX] {
            self.set_irq_type(irq_type);
            for (i, &size) in SIZES.iter().enumerate() {
                // Unaligned buffers: CAPS says the function takes them.
                let at = i * 3;
                assert_eq!(self.write_test(at, size), STATUS_READ_SUCCESS | STATUS_IRQ_RAISED, "READ {size}");
                let (status, crc_ok) = self.read_test(at + 7, size);
                assert_eq!(status, STATUS_WRITE_SUCCESS | STATUS_IRQ_RAISED, "WRITE {size}");
                assert!(crc_ok, "WRITE {size}: checksum");
                let status = self.copy_test(at, (RAM / 2) + at + 5, size);
                assert_eq!(status, STATUS_COPY_SUCCESS | STATUS_IRQ_RAISED, "COPY {size}");
            }
        }
        // A wrong checksum fails READ.
        self.writel(REG_CHECKSUM, 0);
        self.set_addr(REG_SRC_ADDR, self.host.base());
        assert_eq!(self.command(COMMAND_READ, 64), STATUS_READ_FAIL | STATUS_IRQ_RAISED);
    }
}

/// The driver's `crc32_le(~0, buf, len)`, bit by bit as lib/crc32's
/// reference does, so the model's table-driven one is checked against it.
fn crc32_le(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = (crc >> 1) ^ (0xedb8_8320 & (crc & 1).wrapping_neg());
        }
    }
    crc
}

#[test]
fn registry_lists_and_creates_the_model() {
    assert!(pci::models().iter().any(|(name, _)| *name == "pci-epf-test"));
    let f = pci::create("pci-epf-test", FunctionConfig::default()).unwrap();
    assert_eq!(f.model(), "pci-epf-test");
    assert!(pci::create("no-such-model", FunctionConfig::default()).is_none());
    assert!(pci::create("pci-epf-test", FunctionConfig { pasid_log2: 21, pri: false }).is_none());
    let irqs = f.irqs();
    assert!(irqs.intx && irqs.msi == MSI_VECTORS && irqs.msix == MSIX_VECTORS);
    let sizes: Vec<u64> = (0..6).map(|i| f.bar(i).unwrap().size).collect();
    assert_eq!(sizes, BAR_SIZES);
}

#[test]
fn driver_suite_over_plain_memory() {
    let f = pci::create("pci-epf-test", FunctionConfig::default()).unwrap();
    Driver::probe(f, vec_bus()).run_all();
}

#[test]
fn driver_suite_through_the_iommu() {
    let f = pci::create("pci-epf-test", FunctionConfig::default()).unwrap();
    let host = ctx_bus(f.config(), RAM);
    Driver::probe(f, host.clone()).run_all();
    assert_eq!(host.ctx.get(host.dev).unwrap().unrecoverable_faults(), 0);
}

#[test]
fn driver_suite_with_pasid_tagged_dma() {
    let config = FunctionConfig { pasid_log2: 8, pri: false };
    let f = pci::create("pci-epf-test", config).unwrap();
    let host = ctx_bus(config, RAM);
    // The RID's own table maps nothing: only PASID 5's reaches the buffers.
    let empty = host.ctx.ioas_alloc().unwrap();
    let pasid_hwpt = host.ctx.hwpt_alloc(host.dev, host.ioas, HwptFlags::default(), None).unwrap();
    host.ctx.replace(host.dev, empty).unwrap();
    host.ctx.attach_pasid(host.dev, 5, pasid_hwpt).unwrap();
    let mut driver = Driver::probe(f, host.clone());
    driver.set_irq_type(IRQ_TYPE_MSI);
    assert_eq!(driver.write_test(0, 4096), STATUS_SRC_ADDR_INVALID | STATUS_READ_FAIL | STATUS_IRQ_RAISED);
    driver.writel(REG_PASID, PASID_VALID | 5);
    driver.run_all();
}

#[test]
fn dma_to_an_unmapped_iova_sets_addr_invalid_and_counts_the_fault() {
    let f = pci::create("pci-epf-test", FunctionConfig::default()).unwrap();
    // Only the first half of host memory is mapped.
    let host = ctx_bus(f.config(), RAM / 2);
    let mut driver = Driver::probe(f, host.clone());
    driver.set_irq_type(IRQ_TYPE_MSIX);
    let dev = host.ctx.get(host.dev).unwrap();
    let hole = RAM / 2 + 100;

    assert_eq!(driver.write_test(hole, 64), STATUS_SRC_ADDR_INVALID | STATUS_READ_FAIL | STATUS_IRQ_RAISED);
    assert_eq!(dev.unrecoverable_faults(), 1);
    let (status, _) = driver.read_test(hole, 64);
    assert_eq!(status, STATUS_DST_ADDR_INVALID | STATUS_WRITE_FAIL | STATUS_IRQ_RAISED);
    assert_eq!(dev.unrecoverable_faults(), 2);

    driver.set_addr(REG_SRC_ADDR, host.iova + hole as u64);
    driver.set_addr(REG_DST_ADDR, host.iova);
    assert_eq!(driver.command(COMMAND_COPY, 64), STATUS_SRC_ADDR_INVALID | STATUS_COPY_FAIL | STATUS_IRQ_RAISED);
    driver.set_addr(REG_SRC_ADDR, host.iova);
    driver.set_addr(REG_DST_ADDR, host.iova + hole as u64);
    assert_eq!(driver.command(COMMAND_COPY, 64), STATUS_DST_ADDR_INVALID | STATUS_COPY_FAIL | STATUS_IRQ_RAISED);
    assert_eq!(dev.unrecoverable_faults(), 4);

    // A transfer that starts mapped and runs into the hole fails too.
    assert_eq!(driver.write_test(RAM / 2 - 10, 64), STATUS_SRC_ADDR_INVALID | STATUS_READ_FAIL | STATUS_IRQ_RAISED);
}

/// A PRI function's DMA to a missing page asks for it and waits on its
/// worker; the BAR write that rang the doorbell returned long before.
#[test]
fn pri_dma_waits_for_the_page_response_off_the_doorbell() {
    const PASID: u32 = 9;
    let config = FunctionConfig { pasid_log2: 8, pri: true };
    let f = pci::create("pci-epf-test", config).unwrap();
    let host = ctx_bus(config, PAGE_SIZE as usize);
    let (fault_id, queue) = host.ctx.fault_alloc().unwrap();
    let hwpt = host.ctx.hwpt_alloc(host.dev, host.ioas, HwptFlags::default(), Some(fault_id)).unwrap();
    host.ctx.attach_pasid(host.dev, PASID, hwpt).unwrap();
    let mut driver = Driver::probe(f.clone(), host.clone());
    driver.set_irq_type(IRQ_TYPE_MSI);
    driver.writel(REG_PASID, PASID_VALID | PASID);

    // The function writes 2 pages at the second page of host memory: only
    // the first page is mapped.
    let offset = PAGE_SIZE as usize;
    let size = 2 * PAGE_SIZE as u32;
    driver.set_addr(REG_DST_ADDR, host.iova + offset as u64);
    driver.writel(REG_SIZE, size);
    driver.writel(REG_IRQ_TYPE, IRQ_TYPE_MSI);
    driver.writel(REG_IRQ_NUMBER, 1);
    let (done, returned) = mpsc::channel();
    let (f2, bus) = (f.clone(), driver.bus.clone());
    std::thread::spawn(move || {
        f2.bar_write(&bus, 0, REG_COMMAND, &COMMAND_WRITE.to_le_bytes());
        done.send(()).unwrap();
    });
    returned.recv_timeout(IRQ_WAIT).expect("bar_write waited for the page response");

    let mut answered = 0;
    while answered < 2 {
        let (cookie, group) = queue.next(IRQ_WAIT).expect("no page request");
        let req = &group.requests[0];
        assert_eq!((req.flags & PGFAULT_PASID_VALID, req.pasid), (PGFAULT_PASID_VALID, PASID));
        let page = req.addr - host.iova;
        assert!(host.irqs.seen.lock().is_empty(), "interrupt before the page response");
        host.ctx.map_user_checked(host.ioas, host.ram.addr() + page, PAGE_SIZE, Some(req.addr), Perm::RW).unwrap();
        queue.respond(cookie, Response::Success).unwrap();
        answered += 1;
    }
    driver.wait_irq(1);
    assert_eq!(driver.readl(REG_STATUS), STATUS_WRITE_SUCCESS | STATUS_IRQ_RAISED);
    let mut data = vec![0; size as usize];
    host.ram.read_at(offset, &mut data);
    assert_eq!(crc32_le(&data), driver.readl(REG_CHECKSUM));
    assert_eq!(host.ctx.get(host.dev).unwrap().unrecoverable_faults(), 0);

    // Reset joins the worker; the next command starts another.
    f.reset();
    driver.set_irq_type(IRQ_TYPE_MSI);
    driver.writel(REG_PASID, PASID_VALID | PASID);
    let (status, crc_ok) = driver.read_test(offset, size);
    assert_eq!(status, STATUS_WRITE_SUCCESS | STATUS_IRQ_RAISED);
    assert!(crc_ok);
}
