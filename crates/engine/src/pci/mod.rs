//! PCI functions: the device models that sit behind VFIO device files.
//!
//! A model is what a PCI function shows a driver — config space with its
//! capabilities, BARs, interrupts — and the DMA it does. It knows nothing of
//! VFIO or of iommufd: it reaches memory and raises interrupts through the
//! [`Bus`] it is handed, which the front end wires to the device's
//! attachment (DMA through the IOMMU, faults included) and to the eventfds
//! the driver registered. The same model therefore serves the VFIO front
//! end, the library's own tests and any embedding VMM.

use std::sync::Arc;

use crate::device::{DeviceInfo, DmaError};

pub mod config;
pub mod epf_test;

pub use epf_test::EpfTest;

/// The models [`create`] knows, each with a line saying what it is.
pub fn models() -> &'static [(&'static str, &'static str)] {
    &[(
        epf_test::MODEL,
        "Linux's PCI endpoint test function (pci-epf-test), for the pci_endpoint_test driver: \
         BAR tests, READ/WRITE/COPY by DMA, INTx/MSI/MSI-X",
    )]
}

/// A new function of model `model` (a name [`models`] lists), configured
/// with `config`; `None` for a model it does not know or a configuration the
/// model cannot take (a PASID width above 20 bits).
pub fn create(model: &str, config: FunctionConfig) -> Option<Arc<dyn PciFunction>> {
    match model {
        epf_test::MODEL => Some(Arc::new(EpfTest::new(config)?)),
        _ => None,
    }
}

/// What a BAR decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BarKind {
    /// 32-bit memory space.
    Mem32,
    /// 64-bit memory space (the BAR and the next one form one register).
    Mem64,
    /// I/O space.
    Io,
}

/// One implemented BAR.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bar {
    /// Size in bytes: a power of two.
    pub size: u64,
    /// What it decodes.
    pub kind: BarKind,
    /// Whether reads have no side effects (the Prefetchable bit).
    pub prefetchable: bool,
}

/// An interrupt a function raises.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Irq {
    /// Its INTx pin.
    Intx,
    /// MSI vector `n` (from 0).
    Msi(u32),
    /// MSI-X vector `n` (from 0).
    Msix(u32),
}

/// How many interrupts of each kind a function can raise: what
/// `VFIO_DEVICE_GET_IRQ_INFO` reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IrqCounts {
    /// Whether it has an INTx pin.
    pub intx: bool,
    /// MSI vectors (0 without an MSI capability).
    pub msi: u32,
    /// MSI-X vectors (0 without an MSI-X capability).
    pub msix: u32,
}

/// What a function reaches of the machine it sits in.
pub trait Bus: Send + Sync {
    /// Reads memory at `iova` as the function's DMA would: through its
    /// IOMMU, tagged with `pasid` when given.
    fn dma_read(&self, pasid: Option<u32>, iova: u64, buf: &mut [u8]) -> Result<(), DmaError>;
    /// Writes memory at `iova`, as `dma_read` reads it.
    fn dma_write(&self, pasid: Option<u32>, iova: u64, buf: &[u8]) -> Result<(), DmaError>;
    /// Raises `irq`; one the driver has not set up (or has masked) is
    /// dropped or held pending as the interrupt's kind defines.
    fn interrupt(&self, irq: Irq);
}

/// What a function asks of its IOMMU and of the way it is declared.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FunctionConfig {
    /// log2 of its PASID space; 0 for no PASID capability.
    pub pasid_log2: u8,
    /// Whether it has a Page Request Interface (PRI) capability.
    pub pri: bool,
}

impl FunctionConfig {
    /// How the function's IOMMU sees it: a device named `name` at requester
    /// ID `rid` behind the default IOMMU, with this PASID width and PRI.
    pub fn device_info(&self, name: impl Into<String>, rid: u32) -> DeviceInfo {
        DeviceInfo { max_pasid_log2: self.pasid_log2, pri: self.pri, ..DeviceInfo::new(name, rid) }
    }
}

/// A PCI function's model.
///
/// Accesses come from any thread; a model keeps its registers behind its
/// own synchronisation. `bar_write` may start work (DMA, interrupts) that
/// finishes later on a thread of the model's own, holding on to `bus`.
///
/// A model reads its MSI and MSI-X capabilities as hardware does (which
/// vectors the driver enabled); a front end that virtualises them, as
/// vfio-pci does, may write the enables through `config_write` as Linux's
/// MSI code writes them on a real device.
pub trait PciFunction: Send + Sync {
    /// The model's name, as `--device` spells it.
    fn model(&self) -> &'static str;
    /// How it was configured (PASID, PRI).
    fn config(&self) -> FunctionConfig;
    /// Size of its config space: 256, or 4096 with extended capabilities.
    fn config_size(&self) -> usize;
    /// Reads config space at `offset` (in range, as the caller checked).
    fn config_read(&self, offset: usize, data: &mut [u8]);
    /// Writes config space; read-only bits keep their values.
    fn config_write(&self, offset: usize, data: &[u8]);
    /// BAR `index` (0–5), or `None` when it is not implemented (or is the
    /// upper half of a 64-bit BAR).
    fn bar(&self, index: usize) -> Option<Bar>;
    /// Reads BAR `index` at `offset` (in range, as the caller checked).
    fn bar_read(&self, bus: &Arc<dyn Bus>, index: usize, offset: u64, data: &mut [u8]);
    /// Writes BAR `index` at `offset` (in range, as the caller checked).
    fn bar_write(&self, bus: &Arc<dyn Bus>, index: usize, offset: u64, data: &[u8]);
    /// The interrupts it can raise.
    fn irqs(&self) -> IrqCounts;
    /// A function-level reset: registers and BAR contents back to their
    /// power-on values, work in flight finished or abandoned before it returns.
    fn reset(&self);
}
