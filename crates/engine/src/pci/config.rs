//! A type-0 (endpoint) config space: the registers a driver finds there,
//! which of their bits it may change, and the capabilities a function is
//! built with.
//!
//! [`ConfigBuilder`] lays the header out (IDs, class, BARs, interrupt pin),
//! chains the capabilities it is given from 0x40 on (PCI Express endpoint,
//! MSI, MSI-X) and the extended ones from 0x100 on (PASID, PRI), and records
//! for every byte which bits are writable and which are write-1-to-clear.
//! [`ConfigSpace`] then answers reads and applies writes through those masks,
//! so a driver that writes all-ones to a BAR reads its size mask back and a
//! read-only field keeps its value whatever is written over it. A function
//! model reads its own enables (MSI, MSI-X, PASID, PRI) back from it, as
//! hardware reads its registers.

use super::{Bar, BarKind};

/// `PCI_VENDOR_ID`.
pub const VENDOR_ID: usize = 0x00;
/// `PCI_DEVICE_ID`.
pub const DEVICE_ID: usize = 0x02;
/// `PCI_COMMAND`.
pub const COMMAND: usize = 0x04;
/// `PCI_STATUS`.
pub const STATUS: usize = 0x06;
/// `PCI_CLASS_REVISION`: revision in the low byte, class code above.
pub const CLASS_REVISION: usize = 0x08;
/// `PCI_CACHE_LINE_SIZE`.
pub const CACHE_LINE_SIZE: usize = 0x0c;
/// `PCI_HEADER_TYPE`.
pub const HEADER_TYPE: usize = 0x0e;
/// `PCI_BASE_ADDRESS_0`; BAR `n` is at `BAR0 + 4 * n`.
pub const BAR0: usize = 0x10;
/// `PCI_SUBSYSTEM_VENDOR_ID`.
pub const SUBSYSTEM_VENDOR_ID: usize = 0x2c;
/// `PCI_SUBSYSTEM_ID`.
pub const SUBSYSTEM_ID: usize = 0x2e;
/// `PCI_CAPABILITY_LIST`.
pub const CAPABILITY_LIST: usize = 0x34;
/// `PCI_INTERRUPT_LINE`.
pub const INTERRUPT_LINE: usize = 0x3c;
/// `PCI_INTERRUPT_PIN`.
pub const INTERRUPT_PIN: usize = 0x3d;

/// `PCI_COMMAND_IO`.
pub const COMMAND_IO: u16 = 1 << 0;
/// `PCI_COMMAND_MEMORY`.
pub const COMMAND_MEMORY: u16 = 1 << 1;
/// `PCI_COMMAND_MASTER`.
pub const COMMAND_MASTER: u16 = 1 << 2;
/// `PCI_COMMAND_PARITY`.
pub const COMMAND_PARITY: u16 = 1 << 6;
/// `PCI_COMMAND_SERR`.
pub const COMMAND_SERR: u16 = 1 << 8;
/// `PCI_COMMAND_INTX_DISABLE`.
pub const COMMAND_INTX_DISABLE: u16 = 1 << 10;
/// `PCI_STATUS_CAP_LIST`.
pub const STATUS_CAP_LIST: u16 = 1 << 4;
/// The status bits a driver clears by writing 1 (`PCI_STATUS_PARITY`,
/// `_SIG_TARGET_ABORT`, `_REC_TARGET_ABORT`, `_REC_MASTER_ABORT`,
/// `_SIG_SYSTEM_ERROR`, `_DETECTED_PARITY`).
pub const STATUS_RW1C: u16 = 1 << 8 | 1 << 11 | 1 << 12 | 1 << 13 | 1 << 14 | 1 << 15;

/// `PCI_BASE_ADDRESS_SPACE_IO`.
const BAR_IO: u32 = 1 << 0;
/// `PCI_BASE_ADDRESS_MEM_TYPE_64`.
const BAR_MEM_64: u32 = 0b10 << 1;
/// `PCI_BASE_ADDRESS_MEM_PREFETCH`.
const BAR_PREFETCH: u32 = 1 << 3;

/// `PCI_CAP_ID_MSI`.
pub const CAP_ID_MSI: u8 = 0x05;
/// `PCI_CAP_ID_EXP`.
pub const CAP_ID_EXP: u8 = 0x10;
/// `PCI_CAP_ID_MSIX`.
pub const CAP_ID_MSIX: u8 = 0x11;
/// `PCI_EXT_CAP_ID_PRI`.
pub const EXT_CAP_ID_PRI: u16 = 0x13;
/// `PCI_EXT_CAP_ID_PASID`.
pub const EXT_CAP_ID_PASID: u16 = 0x1b;

/// `PCI_MSI_FLAGS_ENABLE`.
pub const MSI_FLAGS_ENABLE: u16 = 1 << 0;
/// `PCI_MSI_FLAGS_64BIT`.
pub const MSI_FLAGS_64BIT: u16 = 1 << 7;
/// `PCI_MSI_FLAGS_MASKBIT`: per-vector masking.
pub const MSI_FLAGS_MASKBIT: u16 = 1 << 8;
/// `PCI_MSIX_FLAGS_MASKALL`.
pub const MSIX_FLAGS_MASKALL: u16 = 1 << 14;
/// `PCI_MSIX_FLAGS_ENABLE`.
pub const MSIX_FLAGS_ENABLE: u16 = 1 << 15;
/// `PCI_MSIX_ENTRY_SIZE`: bytes of one MSI-X table entry.
pub const MSIX_ENTRY_SIZE: u64 = 16;
/// `PCI_PASID_CAP_EXEC`.
pub const PASID_CAP_EXEC: u16 = 1 << 1;
/// `PCI_PASID_CAP_PRIV`.
pub const PASID_CAP_PRIV: u16 = 1 << 2;
/// `PCI_PASID_CTRL_ENABLE`.
pub const PASID_CTRL_ENABLE: u16 = 1 << 0;
/// `PCI_PRI_CTRL_ENABLE`.
pub const PRI_CTRL_ENABLE: u16 = 1 << 0;
/// `PCI_PRI_STATUS_STOPPED`: no request outstanding while disabled, which
/// Linux's `pci_enable_pri` insists on.
pub const PRI_STATUS_STOPPED: u16 = 1 << 8;
/// `PCI_PRI_STATUS_PASID`: responses to PASID-tagged requests carry it.
pub const PRI_STATUS_PASID: u16 = 1 << 15;

/// Bytes of the PCI Express capability (version 2).
const EXP_SIZE: usize = 0x3c;
/// `PCI_EXP_DEVCAP_FLR`: the function supports a function-level reset.
const EXP_DEVCAP_FLR: u32 = 1 << 28;

/// Where the table or the PBA of an MSI-X capability lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsixPlace {
    /// The BAR (BIR).
    pub bar: u8,
    /// Offset in that BAR (8-byte aligned).
    pub offset: u32,
}

#[derive(Debug, Clone, Copy)]
enum Cap {
    Exp,
    Msi { vectors: u32, per_vector_mask: bool },
    Msix { vectors: u32, table: MsixPlace, pba: MsixPlace },
}

#[derive(Debug, Clone, Copy)]
enum ExtCap {
    Pasid { width: u8, exec: bool, privileged: bool },
    Pri { outstanding: u32 },
}

/// Lays out a type-0 config space.
#[derive(Debug, Clone)]
pub struct ConfigBuilder {
    vendor: u16,
    device: u16,
    class: u32,
    revision: u8,
    subsystem: (u16, u16),
    bars: [Option<Bar>; 6],
    interrupt_pin: u8,
    caps: Vec<Cap>,
    ext_caps: Vec<ExtCap>,
}

impl ConfigBuilder {
    /// A function with these vendor and device IDs, class 0, no BARs, no
    /// interrupt pin and no capabilities.
    pub fn new(vendor: u16, device: u16) -> Self {
        ConfigBuilder {
            vendor,
            device,
            class: 0,
            revision: 0,
            subsystem: (0, 0),
            bars: [None; 6],
            interrupt_pin: 0,
            caps: Vec::new(),
            ext_caps: Vec::new(),
        }
    }

    /// The 24-bit class code (base class, sub-class, programming interface).
    pub fn class(mut self, class: u32) -> Self {
        self.class = class & 0xff_ffff;
        self
    }

    /// The revision ID.
    pub fn revision(mut self, revision: u8) -> Self {
        self.revision = revision;
        self
    }

    /// The subsystem vendor and subsystem IDs.
    pub fn subsystem(mut self, vendor: u16, id: u16) -> Self {
        self.subsystem = (vendor, id);
        self
    }

    /// BAR `index`; a 64-bit one takes `index + 1` as its upper half.
    ///
    /// # Panics
    /// On a size that is no power of two (or below a BAR's minimum: 16 bytes
    /// of memory, 4 of I/O), a 64-bit BAR at index 5, or a BAR over another.
    pub fn bar(mut self, index: usize, bar: Bar) -> Self {
        let min = if bar.kind == BarKind::Io { 4 } else { 16 };
        assert!(bar.size.is_power_of_two() && bar.size >= min, "BAR size {:#x}", bar.size);
        assert!(bar.kind != BarKind::Io || bar.size <= 1 << 32, "I/O BARs are 32-bit");
        assert!(bar.kind == BarKind::Mem64 || bar.size <= 1 << 31, "a 32-bit BAR above 2 GiB");
        assert!(
            self.bars[index].is_none() && (index == 0 || self.bars[index - 1].is_none_or(|b| b.kind != BarKind::Mem64))
        );
        if bar.kind == BarKind::Mem64 {
            assert!(index < 5 && self.bars[index + 1].is_none(), "64-bit BAR {index} has no upper half");
        }
        self.bars[index] = Some(bar);
        self
    }

    /// The INTx pin (1 = INTA … 4 = INTD; 0 for none).
    pub fn interrupt_pin(mut self, pin: u8) -> Self {
        self.interrupt_pin = pin;
        self
    }

    /// A PCI Express capability for an endpoint (version 2, function-level
    /// reset supported); it makes config space 4096 bytes.
    pub fn pcie_endpoint(mut self) -> Self {
        self.caps.push(Cap::Exp);
        self
    }

    /// A 64-bit MSI capability with `vectors` vectors (a power of two, 1–32),
    /// with per-vector masking when asked.
    pub fn msi(mut self, vectors: u32, per_vector_mask: bool) -> Self {
        assert!(vectors.is_power_of_two() && vectors <= 32, "MSI vectors {vectors}");
        self.caps.push(Cap::Msi { vectors, per_vector_mask });
        self
    }

    /// An MSI-X capability with `vectors` vectors (1–2048), its table and
    /// PBA where given.
    pub fn msix(mut self, vectors: u32, table: MsixPlace, pba: MsixPlace) -> Self {
        assert!((1..=2048).contains(&vectors), "MSI-X vectors {vectors}");
        assert!(table.bar < 6 && pba.bar < 6 && table.offset % 8 == 0 && pba.offset % 8 == 0);
        self.caps.push(Cap::Msix { vectors, table, pba });
        self
    }

    /// A PASID extended capability of `width` bits (1–20), with the Execute
    /// and Privileged Mode permissions when supported.
    pub fn pasid(mut self, width: u8, exec: bool, privileged: bool) -> Self {
        assert!((1..=20).contains(&width), "PASID width {width}");
        self.ext_caps.push(ExtCap::Pasid { width, exec, privileged });
        self
    }

    /// A Page Request Interface extended capability that can have
    /// `outstanding` page requests in flight.
    pub fn pri(mut self, outstanding: u32) -> Self {
        self.ext_caps.push(ExtCap::Pri { outstanding });
        self
    }

    /// The config space, at its power-on values.
    pub fn build(self) -> ConfigSpace {
        let extended = !self.ext_caps.is_empty() || self.caps.iter().any(|c| matches!(c, Cap::Exp));
        let size = if extended { 4096 } else { 256 };
        let mut s = ConfigSpace {
            init: vec![0; size],
            bytes: Vec::new(),
            wmask: vec![0; size],
            w1c: vec![0; size],
            bars: self.bars,
            msi: None,
            msix: None,
            pasid: None,
            pri: None,
        };

        s.set16(VENDOR_ID, self.vendor);
        s.set16(DEVICE_ID, self.device);
        s.set32(CLASS_REVISION, self.class << 8 | u32::from(self.revision));
        s.set16(SUBSYSTEM_VENDOR_ID, self.subsystem.0);
        s.set16(SUBSYSTEM_ID, self.subsystem.1);
        s.set8(HEADER_TYPE, 0);
        s.set8(INTERRUPT_PIN, self.interrupt_pin);
        s.wmask[INTERRUPT_LINE] = 0xff;
        s.wmask[CACHE_LINE_SIZE] = 0xff;

        let has_io = self.bars.iter().flatten().any(|b| b.kind == BarKind::Io);
        let has_mem = self.bars.iter().flatten().any(|b| b.kind != BarKind::Io);
        let mut command = COMMAND_MASTER | COMMAND_PARITY | COMMAND_SERR;
        if has_io {
            command |= COMMAND_IO;
        }
        if has_mem {
            command |= COMMAND_MEMORY;
        }
        if self.interrupt_pin != 0 {
            command |= COMMAND_INTX_DISABLE;
        }
        s.mask16(COMMAND, command, 0);
        s.mask16(STATUS, 0, STATUS_RW1C);

        for (i, bar) in self.bars.iter().enumerate() {
            let Some(bar) = bar else { continue };
            let at = BAR0 + 4 * i;
            let size_mask = !(bar.size - 1);
            match bar.kind {
                BarKind::Io => {
                    s.set32(at, BAR_IO);
                    s.mask32(at, size_mask as u32 & !0b11, 0);
                }
                BarKind::Mem32 => {
                    s.set32(at, if bar.prefetchable { BAR_PREFETCH } else { 0 });
                    s.mask32(at, size_mask as u32 & !0xf, 0);
                }
                BarKind::Mem64 => {
                    s.set32(at, BAR_MEM_64 | if bar.prefetchable { BAR_PREFETCH } else { 0 });
                    s.mask32(at, size_mask as u32 & !0xf, 0);
                    s.mask32(at + 4, (size_mask >> 32) as u32, 0);
                }
            }
        }

        // Standard capabilities, chained from 0x40 in the order given.
        let mut at = 0x40;
        let mut prev = CAPABILITY_LIST;
        for cap in &self.caps {
            let size = match *cap {
                Cap::Exp => EXP_SIZE,
                Cap::Msi { per_vector_mask, .. } => {
                    if per_vector_mask {
                        0x18
                    } else {
                        0x0e
                    }
                }
                Cap::Msix { .. } => 0x0c,
            };
            assert!(at + size <= 0x100, "capabilities overflow config space");
            s.set8(prev, at as u8);
            prev = at + 1;
            match *cap {
                Cap::Exp => {
                    s.set8(at, CAP_ID_EXP);
                    // Version 2, PCI_EXP_TYPE_ENDPOINT.
                    s.set16(at + 0x02, 2);
                    s.set32(at + 0x04, EXP_DEVCAP_FLR);
                    // Device control: error reporting, relaxed ordering,
                    // payload and read request sizes, no-snoop; not FLR,
                    // which is the function's reset, not a stored bit.
                    s.mask16(at + 0x08, 0x7fff, 0);
                    s.set16(at + 0x08, 0x2810);
                    s.mask16(at + 0x0a, 0, 0x000f);
                    // Link: 2.5 GT/s, x1, and so it runs.
                    s.set32(at + 0x0c, 1 | 1 << 4);
                    s.set16(at + 0x12, 1 | 1 << 4);
                    s.mask16(at + 0x28, 0x0400, 0);
                }
                Cap::Msi { vectors, per_vector_mask } => {
                    s.set8(at, CAP_ID_MSI);
                    let mmc = vectors.trailing_zeros() as u16;
                    let mut flags = MSI_FLAGS_64BIT | mmc << 1;
                    if per_vector_mask {
                        flags |= MSI_FLAGS_MASKBIT;
                    }
                    s.set16(at + 0x02, flags);
                    s.mask16(at + 0x02, MSI_FLAGS_ENABLE | 0b111 << 4, 0);
                    s.mask32(at + 0x04, !0b11, 0);
                    s.mask32(at + 0x08, !0, 0);
                    s.mask16(at + 0x0c, !0, 0);
                    if per_vector_mask {
                        let used = if vectors == 32 { !0 } else { (1u32 << vectors) - 1 };
                        s.mask32(at + 0x10, used, 0);
                    }
                    s.msi = Some(at);
                }
                Cap::Msix { vectors, table, pba } => {
                    s.set8(at, CAP_ID_MSIX);
                    s.set16(at + 0x02, (vectors - 1) as u16);
                    s.mask16(at + 0x02, MSIX_FLAGS_ENABLE | MSIX_FLAGS_MASKALL, 0);
                    s.set32(at + 0x04, table.offset | u32::from(table.bar));
                    s.set32(at + 0x08, pba.offset | u32::from(pba.bar));
                    s.msix = Some(at);
                }
            }
            at += size.next_multiple_of(4);
        }
        if !self.caps.is_empty() {
            s.set16(STATUS, STATUS_CAP_LIST);
        }

        // Extended capabilities, chained from 0x100.
        let mut at = 0x100;
        let mut prev: Option<usize> = None;
        for cap in &self.ext_caps {
            if let Some(p) = prev {
                let header = s.get32(p);
                s.set32(p, header | (at as u32) << 20);
            }
            prev = Some(at);
            match *cap {
                ExtCap::Pasid { width, exec, privileged } => {
                    s.set32(at, u32::from(EXT_CAP_ID_PASID) | 1 << 16);
                    let mut caps = u16::from(width) << 8;
                    let mut ctrl = PASID_CTRL_ENABLE;
                    if exec {
                        caps |= PASID_CAP_EXEC;
                        ctrl |= PASID_CAP_EXEC;
                    }
                    if privileged {
                        caps |= PASID_CAP_PRIV;
                        ctrl |= PASID_CAP_PRIV;
                    }
                    s.set16(at + 0x04, caps);
                    s.mask16(at + 0x06, ctrl, 0);
                    s.pasid = Some(at);
                    at += 8;
                }
                ExtCap::Pri { outstanding } => {
                    s.set32(at, u32::from(EXT_CAP_ID_PRI) | 1 << 16);
                    s.mask16(at + 0x04, PRI_CTRL_ENABLE, 0);
                    let mut status = PRI_STATUS_STOPPED;
                    if self.ext_caps.iter().any(|c| matches!(c, ExtCap::Pasid { .. })) {
                        status |= PRI_STATUS_PASID;
                    }
                    s.set16(at + 0x06, status);
                    // Response Failure and Unexpected PRG Index.
                    s.mask16(at + 0x06, 0, 0b11);
                    s.set32(at + 0x08, outstanding);
                    s.mask32(at + 0x0c, !0, 0);
                    s.pri = Some(at);
                    at += 16;
                }
            }
        }

        s.bytes = s.init.clone();
        s
    }
}

/// A function's config space: its bytes and, per byte, the bits a write
/// changes and the bits a written 1 clears.
#[derive(Debug, Clone)]
pub struct ConfigSpace {
    init: Vec<u8>,
    bytes: Vec<u8>,
    wmask: Vec<u8>,
    w1c: Vec<u8>,
    bars: [Option<Bar>; 6],
    msi: Option<usize>,
    msix: Option<usize>,
    pasid: Option<usize>,
    pri: Option<usize>,
}

impl ConfigSpace {
    /// Its size: 256, or 4096 for a PCI Express function.
    pub fn size(&self) -> usize {
        self.bytes.len()
    }

    /// Reads at `offset`; bytes past the end read as zero.
    pub fn read(&self, offset: usize, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = self.bytes.get(offset + i).copied().unwrap_or(0);
        }
    }

    /// Writes at `offset` through the write masks: read-only bits keep their
    /// values, write-1-to-clear bits clear where a 1 is written; bytes past
    /// the end are dropped.
    pub fn write(&mut self, offset: usize, data: &[u8]) {
        for (i, &v) in data.iter().enumerate() {
            let at = offset + i;
            let Some(b) = self.bytes.get_mut(at) else { break };
            let (w, c) = (self.wmask[at], self.w1c[at]);
            *b = (*b & !w | v & w) & !(v & c);
        }
    }

    /// Back to the power-on values.
    pub fn reset(&mut self) {
        self.bytes.copy_from_slice(&self.init);
    }

    /// A byte.
    pub fn read8(&self, offset: usize) -> u8 {
        self.bytes[offset]
    }

    /// A little-endian 16-bit register.
    pub fn read16(&self, offset: usize) -> u16 {
        u16::from_le_bytes([self.bytes[offset], self.bytes[offset + 1]])
    }

    /// A little-endian 32-bit register.
    pub fn read32(&self, offset: usize) -> u32 {
        self.get32(offset)
    }

    /// Writes a 16-bit register as a driver would (through the masks).
    pub fn write16(&mut self, offset: usize, v: u16) {
        self.write(offset, &v.to_le_bytes());
    }

    /// Writes a 32-bit register as a driver would (through the masks).
    pub fn write32(&mut self, offset: usize, v: u32) {
        self.write(offset, &v.to_le_bytes());
    }

    /// The command register.
    pub fn command(&self) -> u16 {
        self.read16(COMMAND)
    }

    /// BAR `index` as built.
    pub fn bar(&self, index: usize) -> Option<Bar> {
        self.bars.get(index).copied().flatten()
    }

    /// Where the MSI capability is, if any.
    pub fn msi_cap(&self) -> Option<usize> {
        self.msi
    }

    /// Where the MSI-X capability is, if any.
    pub fn msix_cap(&self) -> Option<usize> {
        self.msix
    }

    /// Where the PASID extended capability is, if any.
    pub fn pasid_cap(&self) -> Option<usize> {
        self.pasid
    }

    /// Where the PRI extended capability is, if any.
    pub fn pri_cap(&self) -> Option<usize> {
        self.pri
    }

    /// MSI vectors the capability has (0 without one).
    pub fn msi_vectors(&self) -> u32 {
        self.msi.map_or(0, |at| 1 << ((self.read16(at + 2) >> 1) & 0b111))
    }

    /// MSI vectors the driver enabled: 0 while MSI is off, else what
    /// Multiple Message Enable grants, at most what the capability has.
    pub fn msi_enabled_vectors(&self) -> u32 {
        let Some(at) = self.msi else { return 0 };
        let flags = self.read16(at + 2);
        if flags & MSI_FLAGS_ENABLE == 0 {
            return 0;
        }
        (1u32 << ((flags >> 4) & 0b111)).min(self.msi_vectors())
    }

    /// MSI-X vectors the capability has (its table size; 0 without one).
    pub fn msix_vectors(&self) -> u32 {
        self.msix.map_or(0, |at| u32::from(self.read16(at + 2) & 0x7ff) + 1)
    }

    /// Whether the driver enabled MSI-X.
    pub fn msix_enabled(&self) -> bool {
        self.msix.is_some_and(|at| self.read16(at + 2) & MSIX_FLAGS_ENABLE != 0)
    }

    /// Whether the driver enabled PASID.
    pub fn pasid_enabled(&self) -> bool {
        self.pasid.is_some_and(|at| self.read16(at + 6) & PASID_CTRL_ENABLE != 0)
    }

    /// Whether the driver enabled PRI.
    pub fn pri_enabled(&self) -> bool {
        self.pri.is_some_and(|at| self.read16(at + 4) & PRI_CTRL_ENABLE != 0)
    }

    fn get32(&self, offset: usize) -> u32 {
        u32::from_le_bytes(self.bytes_at(offset))
    }

    fn bytes_at(&self, offset: usize) -> [u8; 4] {
        let src = if self.bytes.is_empty() { &self.init } else { &self.bytes };
        src[offset..offset + 4].try_into().expect("4 bytes")
    }

    fn set8(&mut self, offset: usize, v: u8) {
        self.init[offset] = v;
    }

    fn set16(&mut self, offset: usize, v: u16) {
        self.init[offset..offset + 2].copy_from_slice(&v.to_le_bytes());
    }

    fn set32(&mut self, offset: usize, v: u32) {
        self.init[offset..offset + 4].copy_from_slice(&v.to_le_bytes());
    }

    fn mask16(&mut self, offset: usize, writable: u16, w1c: u16) {
        self.wmask[offset..offset + 2].copy_from_slice(&writable.to_le_bytes());
        self.w1c[offset..offset + 2].copy_from_slice(&w1c.to_le_bytes());
    }

    fn mask32(&mut self, offset: usize, writable: u32, w1c: u32) {
        self.wmask[offset..offset + 4].copy_from_slice(&writable.to_le_bytes());
        self.w1c[offset..offset + 4].copy_from_slice(&w1c.to_le_bytes());
    }
}

/// Finds capability `id` as Linux's `pci_find_capability` does: follows the
/// list from `PCI_CAPABILITY_LIST` (when the status register says there is
/// one), at most 48 steps, stopping at a pointer below 0x40; 0 when absent.
pub fn find_capability(read: impl Fn(usize) -> u32, id: u8) -> usize {
    let status = read(COMMAND) >> 16;
    if status as u16 & STATUS_CAP_LIST == 0 {
        return 0;
    }
    let mut pos = (read(CAPABILITY_LIST) & 0xff) as usize;
    for _ in 0..48 {
        if pos < 0x40 {
            break;
        }
        pos &= !3;
        let ent = read(pos) & 0xffff;
        let cap = (ent & 0xff) as u8;
        if cap == 0xff {
            break;
        }
        if cap == id {
            return pos;
        }
        pos = (ent >> 8) as usize;
    }
    0
}

/// Finds extended capability `id` as Linux's `pci_find_ext_capability`
/// does: from 0x100, at most (4096 - 256) / 8 steps, stopping at an empty
/// header or a pointer below 0x100; 0 when absent.
pub fn find_ext_capability(read: impl Fn(usize) -> u32, config_size: usize, id: u16) -> usize {
    if config_size <= 256 {
        return 0;
    }
    let mut pos = 0x100;
    let mut header = read(pos);
    if header == 0 {
        return 0;
    }
    for _ in 0..(4096 - 256) / 8 {
        if header & 0xffff == u32::from(id) && pos != 0 {
            return pos;
        }
        pos = (header >> 20) as usize & 0xffc;
        if pos < 0x100 {
            break;
        }
        header = read(pos);
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem(size: u64, kind: BarKind, prefetchable: bool) -> Bar {
        Bar { size, kind, prefetchable }
    }

    fn full() -> ConfigSpace {
        ConfigBuilder::new(0x104c, 0xb500)
            .class(0xff0000)
            .revision(3)
            .subsystem(0x1af4, 0x1100)
            .interrupt_pin(1)
            .bar(0, mem(4096, BarKind::Mem32, false))
            .bar(2, mem(1 << 20, BarKind::Mem64, true))
            .bar(4, mem(256, BarKind::Io, false))
            .pcie_endpoint()
            .msi(8, true)
            .msix(16, MsixPlace { bar: 0, offset: 0x80 }, MsixPlace { bar: 0, offset: 0x180 })
            .pasid(20, true, false)
            .pri(32)
            .build()
    }

    fn reader(c: &ConfigSpace) -> impl Fn(usize) -> u32 + '_ {
        |at| c.read32(at)
    }

    #[test]
    fn ids_class_and_pin() {
        let c = full();
        assert_eq!(c.size(), 4096);
        assert_eq!(c.read16(VENDOR_ID), 0x104c);
        assert_eq!(c.read16(DEVICE_ID), 0xb500);
        assert_eq!(c.read32(CLASS_REVISION), 0xff00_0003);
        assert_eq!(c.read16(SUBSYSTEM_VENDOR_ID), 0x1af4);
        assert_eq!(c.read16(SUBSYSTEM_ID), 0x1100);
        assert_eq!(c.read8(INTERRUPT_PIN), 1);
        assert_eq!(ConfigBuilder::new(1, 2).build().size(), 256);
    }

    #[test]
    fn read_only_fields_keep_their_values() {
        let mut c = full();
        c.write(0, &[0xff; 0x10]);
        assert_eq!(c.read16(VENDOR_ID), 0x104c);
        assert_eq!(c.read32(CLASS_REVISION), 0xff00_0003);
        let writable = COMMAND_IO | COMMAND_MEMORY | COMMAND_MASTER | COMMAND_PARITY | COMMAND_SERR;
        assert_eq!(c.command(), writable | COMMAND_INTX_DISABLE);
        c.write(INTERRUPT_PIN, &[7]);
        assert_eq!(c.read8(INTERRUPT_PIN), 1);
        c.write(INTERRUPT_LINE, &[11]);
        assert_eq!(c.read8(INTERRUPT_LINE), 11);
        c.write16(COMMAND, COMMAND_INTX_DISABLE);
        assert_eq!(c.command(), COMMAND_INTX_DISABLE);
        // Past the end: dropped, read as zero.
        c.write(4094, &[1, 2, 3, 4]);
        let mut out = [9; 4];
        c.read(4094, &mut out);
        assert_eq!(out, [0; 4]);
    }

    #[test]
    fn status_is_read_only_but_for_rw1c_bits() {
        let mut c = full();
        assert_eq!(c.read16(STATUS), STATUS_CAP_LIST);
        c.write16(STATUS, 0xffff);
        assert_eq!(c.read16(STATUS), STATUS_CAP_LIST);
        // A set error bit stays until a 1 is written to it.
        c.bytes[STATUS + 1] |= 0x20;
        c.write16(STATUS, 0);
        assert_eq!(c.read16(STATUS), STATUS_CAP_LIST | 1 << 13);
        c.write16(STATUS, 1 << 13);
        assert_eq!(c.read16(STATUS), STATUS_CAP_LIST);
        assert_eq!(ConfigBuilder::new(1, 2).build().read16(STATUS), 0);
    }

    #[test]
    fn bars_answer_sizing() {
        let mut c = full();
        for i in 0..6 {
            c.write32(BAR0 + 4 * i, !0);
        }
        assert_eq!(c.read32(BAR0), !0xfff, "32-bit memory, 4 KiB");
        assert_eq!(c.read32(BAR0 + 4), 0, "unimplemented");
        assert_eq!(c.read32(BAR0 + 8), !0xfffff & !0xf | BAR_MEM_64 | BAR_PREFETCH, "64-bit prefetchable, 1 MiB");
        assert_eq!(c.read32(BAR0 + 12), !0, "upper half of a 1 MiB 64-bit BAR");
        assert_eq!(c.read32(BAR0 + 16), !0xff | BAR_IO, "I/O, 256 bytes");
        assert_eq!(c.read32(BAR0 + 20), 0);

        // An address sticks, the flag bits stay.
        c.write32(BAR0, 0xfe00_0123);
        assert_eq!(c.read32(BAR0), 0xfe00_0000);
        c.write32(BAR0 + 8, 0x8000_0000);
        c.write32(BAR0 + 12, 0x1);
        assert_eq!(c.read32(BAR0 + 8), 0x8000_0000 | BAR_MEM_64 | BAR_PREFETCH);
        assert_eq!(c.read32(BAR0 + 12), 1);

        let big = ConfigBuilder::new(1, 2).bar(0, mem(1 << 33, BarKind::Mem64, false)).build();
        let mut big = big;
        big.write32(BAR0, !0);
        big.write32(BAR0 + 4, !0);
        let size = !(u64::from(big.read32(BAR0 + 4)) << 32 | u64::from(big.read32(BAR0) & !0xf)) + 1;
        assert_eq!(size, 1 << 33);
    }

    #[test]
    #[should_panic]
    fn a_bar_over_a_64_bit_upper_half_panics() {
        ConfigBuilder::new(1, 2).bar(0, mem(4096, BarKind::Mem64, false)).bar(1, mem(4096, BarKind::Mem32, false));
    }

    #[test]
    fn capability_walks_find_each_one() {
        let c = full();
        let exp = find_capability(reader(&c), CAP_ID_EXP);
        let msi = find_capability(reader(&c), CAP_ID_MSI);
        let msix = find_capability(reader(&c), CAP_ID_MSIX);
        assert_eq!((exp, Some(msi), Some(msix)), (0x40, c.msi_cap(), c.msix_cap()));
        assert!(exp < msi && msi < msix && msix + 12 <= 0x100);
        assert_eq!(find_capability(reader(&c), 0x09), 0);
        assert_eq!(c.read16(exp + 2) & 0xf, 2, "PCIe capability version 2");
        assert_eq!((c.read16(exp + 2) >> 4) & 0xf, 0, "endpoint");

        let pasid = find_ext_capability(reader(&c), c.size(), EXT_CAP_ID_PASID);
        let pri = find_ext_capability(reader(&c), c.size(), EXT_CAP_ID_PRI);
        assert_eq!((pasid, pri), (0x100, 0x108));
        assert_eq!(find_ext_capability(reader(&c), c.size(), 0x0f), 0);
        assert_eq!(c.read16(pasid + 4), 20 << 8 | PASID_CAP_EXEC);

        // No capabilities: no list, nothing found.
        let bare = ConfigBuilder::new(1, 2).build();
        assert_eq!(find_capability(reader(&bare), CAP_ID_MSI), 0);
        assert_eq!(find_ext_capability(reader(&bare), bare.size(), EXT_CAP_ID_PASID), 0);
        let pcie = ConfigBuilder::new(1, 2).pcie_endpoint().build();
        assert_eq!(find_ext_capability(reader(&pcie), pcie.size(), EXT_CAP_ID_PASID), 0);
    }

    #[test]
    fn msi_enable_and_vector_grant() {
        let mut c = full();
        let at = c.msi_cap().unwrap();
        assert_eq!((c.msi_vectors(), c.msi_enabled_vectors()), (8, 0));
        assert_eq!(c.read16(at + 2), MSI_FLAGS_64BIT | MSI_FLAGS_MASKBIT | 3 << 1);
        // MMC is read-only; MME and enable are the driver's.
        c.write16(at + 2, 0xffff);
        assert_eq!(c.read16(at + 2) & 0b1110, 3 << 1);
        assert_eq!(c.msi_enabled_vectors(), 8, "MME above MMC grants what there is");
        c.write16(at + 2, MSI_FLAGS_ENABLE | 2 << 4);
        assert_eq!(c.msi_enabled_vectors(), 4);
        c.write32(at + 4, 0xfee0_0003);
        assert_eq!(c.read32(at + 4), 0xfee0_0000);
        c.write32(at + 0x10, !0);
        assert_eq!(c.read32(at + 0x10), 0xff, "mask bits only for vectors that exist");
        c.reset();
        assert_eq!(c.msi_enabled_vectors(), 0);
    }

    #[test]
    fn msix_table_size_and_enable() {
        let mut c = full();
        let at = c.msix_cap().unwrap();
        assert_eq!(c.msix_vectors(), 16);
        assert_eq!(c.read32(at + 4), 0x80);
        assert_eq!(c.read32(at + 8), 0x180);
        c.write16(at + 2, 0xffff);
        assert_eq!(c.read16(at + 2), MSIX_FLAGS_ENABLE | MSIX_FLAGS_MASKALL | 15);
        assert!(c.msix_enabled());
    }

    #[test]
    fn pasid_and_pri_controls() {
        let mut c = full();
        let pasid = c.pasid_cap().unwrap();
        c.write16(pasid + 6, 0xffff);
        assert_eq!(c.read16(pasid + 6), PASID_CTRL_ENABLE | PASID_CAP_EXEC, "no privileged mode to enable");
        assert!(c.pasid_enabled());
        let pri = c.pri_cap().unwrap();
        assert_eq!(c.read16(pri + 6), PRI_STATUS_STOPPED | PRI_STATUS_PASID);
        assert_eq!(c.read32(pri + 8), 32);
        c.write16(pri + 4, PRI_CTRL_ENABLE);
        c.write32(pri + 0x0c, 32);
        assert!(c.pri_enabled());
        assert_eq!(c.read32(pri + 0x0c), 32);
        c.reset();
        assert!(!c.pasid_enabled() && !c.pri_enabled());
    }
}
