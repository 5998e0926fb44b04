//! Emulated devices: what a device brings to an IOMMU (RID, aperture,
//! reserved regions, PASID width, format) and the DMA it does through the
//! page table it is attached to.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arc_swap::ArcSwapOption;
use thiserror::Error;

use crate::epoch;
use crate::hwpt::{FaultReason, Hwpt, PageFormat};
use crate::iova::IovaRange;
use crate::memory;
use crate::pgtable::Perm;

/// A device as its IOMMU sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    pub name: String,
    /// PCI requester ID (bus << 8 | devfn).
    pub rid: u32,
    /// The page-table format of the IOMMU instance in front of the device.
    pub format: PageFormat,
    /// IOVAs the device's IOMMU can translate.
    pub aperture: IovaRange,
    /// IOVAs the device must never be given (MSI windows and the like).
    pub reserved: Vec<IovaRange>,
    /// log2 of the PASID space; 0 when the device has no PASID capability.
    pub max_pasid_log2: u8,
    /// Whether its IOMMU can track dirty pages.
    pub dirty_tracking: bool,
}

impl DeviceInfo {
    /// A device behind a 4-level VT-d IOMMU with the whole 48-bit aperture.
    pub fn new(name: impl Into<String>, rid: u32) -> Self {
        DeviceInfo {
            name: name.into(),
            rid,
            format: PageFormat::VtdSs4,
            aperture: IovaRange::new(0, (1 << 48) - 1),
            reserved: Vec::new(),
            max_pasid_log2: 0,
            dirty_tracking: false,
        }
    }
}

/// Flags of Linux's selftest mock devices (`MOCK_FLAGS_DEVICE_*`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MockFlags {
    pub no_dirty: bool,
    pub huge_iova: bool,
    pub pasid: bool,
}

impl DeviceInfo {
    /// A device behind Linux's selftest mock IOMMU.
    pub fn mock(rid: u32, flags: MockFlags) -> Self {
        DeviceInfo {
            name: format!("mock{rid}"),
            rid,
            format: if flags.huge_iova { PageFormat::MockHuge } else { PageFormat::Mock },
            aperture: MOCK_APERTURE,
            reserved: Vec::new(),
            max_pasid_log2: if flags.pasid { MOCK_PASID_WIDTH } else { 0 },
            dirty_tracking: !flags.no_dirty,
        }
    }
}

/// The mock IOMMU's aperture, `MOCK_APERTURE_START..=MOCK_APERTURE_LAST`.
pub const MOCK_APERTURE: IovaRange = IovaRange::new(1 << 24, (1 << 31) - 1);
/// PASID width of a PASID-capable mock device.
pub const MOCK_PASID_WIDTH: u8 = 20;

/// Why a DMA did not complete.
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
pub enum DmaError {
    #[error("DMA blocked: the device is not attached to a page table")]
    Blocked,
    #[error("IOMMU fault at IOVA {iova:#x} ({reason:?}, {})", if *.write { "write" } else { "read" })]
    Fault { iova: u64, reason: FaultReason, write: bool },
    #[error("the memory behind IOVA {iova:#x} is no longer mapped by its owner")]
    Memory { iova: u64 },
}

static NEXT_KEY: AtomicU64 = AtomicU64::new(1);

pub struct Device {
    info: DeviceInfo,
    /// Identity for reservations, unique in the process.
    key: u64,
    attached: ArcSwapOption<Hwpt>,
}

impl Device {
    pub(crate) fn new(info: DeviceInfo) -> Self {
        Device { info, key: NEXT_KEY.fetch_add(1, Ordering::Relaxed), attached: ArcSwapOption::empty() }
    }

    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    pub(crate) fn key(&self) -> u64 {
        self.key
    }

    pub fn attached(&self) -> Option<Hwpt> {
        self.attached.load_full().map(|h| (*h).clone())
    }

    /// Switches the page table DMA uses and waits for DMA that still uses the
    /// old one, so the old one is unreachable when this returns.
    pub(crate) fn set_attached(&self, hwpt: Option<Hwpt>) -> Option<Hwpt> {
        let old = self.attached.swap(hwpt.map(Arc::new));
        epoch::synchronize();
        old.map(|h| (*h).clone())
    }

    /// Host address of `iova` for an access needing `need`, valid to the end
    /// of its 4 KiB page; the caller must stay inside `guard` while using it.
    #[inline]
    pub fn translate(&self, iova: u64, need: Perm, guard: &epoch::Guard) -> Result<(u64, bool), DmaError> {
        let att = self.attached.load();
        let hwpt = att.as_ref().ok_or(DmaError::Blocked)?;
        let fault = |reason| DmaError::Fault { iova, reason, write: need.write };
        let domain = hwpt.paging_domain().ok_or(fault(FaultReason::NotPresent))?;
        domain.translate(iova, need, guard).map_err(fault)
    }

    /// The smallest IO page of the device's IOMMU.
    fn granule(&self) -> u64 {
        1 << self.info.format.page_shift()
    }

    /// Device reads `buf.len()` bytes at `iova`.
    pub fn dma_read(&self, iova: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        let guard = epoch::pin();
        let mut done = 0usize;
        while done < buf.len() {
            let at = iova.wrapping_add(done as u64);
            let (host, checked) = self.translate(at, Perm::R, &guard)?;
            let n = chunk(at, buf.len() - done, self.granule());
            memory::read(trust(checked), host, &mut buf[done..done + n]).map_err(|_| DmaError::Memory { iova: at })?;
            done += n;
        }
        Ok(())
    }

    /// Device writes `buf` at `iova`.
    pub fn dma_write(&self, iova: u64, buf: &[u8]) -> Result<(), DmaError> {
        let guard = epoch::pin();
        let mut done = 0usize;
        while done < buf.len() {
            let at = iova.wrapping_add(done as u64);
            let (host, checked) = self.translate(at, Perm::W, &guard)?;
            let n = chunk(at, buf.len() - done, self.granule());
            memory::write(trust(checked), host, &buf[done..done + n]).map_err(|_| DmaError::Memory { iova: at })?;
            done += n;
        }
        Ok(())
    }
}

fn trust(checked: bool) -> memory::Trust {
    if checked { memory::Trust::Checked } else { memory::Trust::Direct }
}

/// Bytes from `iova` to the end of its IO page of `granule` bytes, at most `left`.
fn chunk(iova: u64, left: usize, granule: u64) -> usize {
    ((granule - iova % granule) as usize).min(left)
}
