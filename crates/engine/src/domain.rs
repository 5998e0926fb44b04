//! The page-table domain (Linux's `iommu_domain`): a page table in one of
//! the real formats plus the IOTLB that caches its translations. An IOAS
//! mirrors its mappings into every domain added to it; HWPTs own domains.
//! Below the IOAS and above `pgtable`: ioas → domain → pgtable.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::epoch::Guard;

use crate::iotlb::{Hit, Iotlb};
use crate::iova::IovaRange;
use crate::memory::Trust;
use crate::pgtable::amd::AmdV1Mode4;
use crate::pgtable::arm::{ArmS1, ArmS2};
use crate::pgtable::mock::{Mock, MockPt};
use crate::pgtable::x86::{VtdSs4, VtdSs5};
use crate::pgtable::{self, Format, PageTable, Perm, Summary};

/// Every page-table format a domain can use, listed once. Each becomes a
/// `PageFormat` variant, an `AnyTable` variant holding its `PageTable`, and
/// an arm of `with_format!` and `with_table!`, which run code with the
/// format's type bound, so the walk is specialised per format. (`$d` hands
/// a `$` to the macros this one defines.)
macro_rules! formats {
    ($d:tt $($(#[$doc:meta])* $name:ident: $ty:ty),* $(,)?) => {
        /// The page-table formats a domain can use.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum PageFormat {
            $($(#[$doc])* $name,)*
        }

        enum AnyTable {
            $($name(PageTable<$ty>),)*
        }

        impl AnyTable {
            fn new(format: PageFormat) -> Self {
                match format {
                    $(PageFormat::$name => AnyTable::$name(PageTable::new()),)*
                }
            }
        }

        /// Runs `$body` with `$F` bound to the format type of `$format`.
        macro_rules! with_format {
            ($d format:expr, $d F:ident => $d body:expr) => {
                match $d format {
                    $(PageFormat::$name => {
                        type $d F = $ty;
                        $d body
                    })*
                }
            };
        }

        /// Runs `$body` with `$pt` bound to the typed table inside `$t`.
        macro_rules! with_table {
            ($d t:expr, $d pt:ident => $d body:expr) => {
                match $d t {
                    $(AnyTable::$name($d pt) => $d body,)*
                }
            };
        }
    };
}

formats! {$
    /// Intel VT-d second-stage table, 4 levels (48-bit IOVA).
    VtdSs4: VtdSs4,
    /// Intel VT-d second-stage table, 5 levels (57-bit IOVA).
    VtdSs5: VtdSs5,
    /// Linux's selftest mock IOMMU: 2 KiB IO pages.
    Mock: Mock<false>,
    /// The mock with 1 MiB huge pages too (`MOCK_IOMMUPT_HUGE`).
    MockHuge: Mock<true>,
    /// The 7.3 mock's default table: leaves of whole CPU pages and up
    /// (`MOCK_IOMMUPT_DEFAULT`).
    MockPt: MockPt,
    /// AMD-Vi v1, Mode 4.
    AmdV1: AmdV1Mode4,
    /// Arm VMSAv8-64 stage 1 with 4 KiB granules (SMMUv3 S1 tables).
    ArmS1: ArmS1,
    /// Arm VMSAv8-64 stage 2 with 4 KiB granules (SMMUv3 S2 tables, the
    /// parent of a nested SMMUv3 HWPT).
    ArmS2: ArmS2,
}

impl PageFormat {
    /// The format's name for people (the CLI's listings).
    pub fn name(self) -> &'static str {
        with_format!(self, F => F::NAME)
    }

    /// The IO page sizes the format's leaves can have, one bit per size in
    /// bytes (bit 12: 4 KiB), as `IOMMU_IOAS_IOVA_RANGES` and Linux's
    /// `pgsize_bitmap` give them.
    pub fn pgsize_bitmap(self) -> u64 {
        with_format!(self, F => pgtable::pgsize_bitmap::<F>())
    }

    /// Width in bits of the IOVAs the format can translate: its tables
    /// cover `[0, 2^iova_bits)`.
    pub fn iova_bits(self) -> u32 {
        with_format!(self, F => F::iova_bits())
    }

    /// log2 of the smallest IO page.
    pub fn page_shift(self) -> u32 {
        with_format!(self, F => F::PAGE_SHIFT)
    }

    /// Whether it is one of the selftest mock IOMMU's formats: the test
    /// commands that look into a mock page table (Linux's
    /// `get_md_pagetable`) refuse others with EINVAL.
    pub fn is_mock(self) -> bool {
        matches!(self, PageFormat::Mock | PageFormat::MockHuge | PageFormat::MockPt)
    }
}

/// Why a translation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultReason {
    /// The IOVA is outside the domain's aperture.
    Aperture,
    /// No leaf maps the IOVA (in a nested table: the stage-1 walk found none).
    NotPresent,
    /// A leaf maps it without the needed right.
    Permission,
    /// Nested: stage 2 does not map guest-physical address `gpa` (a stage-1
    /// table or the final page) with the rights needed.
    Stage2 {
        /// The guest-physical address stage 2 was asked for.
        gpa: u64,
        /// True when stage 2 maps `gpa` but without the rights needed;
        /// false when it does not map it at all.
        permission: bool,
    },
    /// Nested: the guest's stage-1 leaf has its access flag clear (an
    /// SMMUv3 `F_ACCESS`).
    AccessFlag,
    /// Nested: the guest's configuration for the stream (an SMMUv3 STE or
    /// CD) does not let the transaction be translated.
    Config(ConfigFault),
}

/// The guest configuration errors of a nested SMMUv3 stream, named as its
/// event records name them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigFault {
    /// The STE's Config aborts the stream: refused, with no event.
    Abort,
    /// `C_BAD_STE`: the STE is not valid, or ILLEGAL.
    BadSte,
    /// `F_STREAM_DISABLED`: no substream, and the STE takes only substreams.
    StreamDisabled,
    /// `C_BAD_SUBSTREAMID`: no context descriptor for the substream.
    BadSubstream,
    /// `C_BAD_CD`: the context descriptor is not valid or not walkable.
    BadCd,
}

/// An I/O page table and its IOTLB (Linux's `iommu_domain`).
pub struct Domain {
    table: AnyTable,
    iotlb: Iotlb,
    format: PageFormat,
    /// `format.page_shift()`, kept so a hit reads it instead of matching.
    page_shift: u32,
    aperture: IovaRange,
    /// Allocated with dirty tracking support (has Linux's `dirty_ops`).
    dirty_capable: bool,
    /// Dirty tracking is on: writes mark their leaves dirty.
    tracking: AtomicBool,
}

impl Domain {
    pub(crate) fn with_dirty(format: PageFormat, aperture: IovaRange, dirty_capable: bool) -> Self {
        let table = AnyTable::new(format);
        let max = (1u128 << format.iova_bits()) - 1;
        let aperture = IovaRange::new(aperture.start, aperture.last.min(max as u64));
        Domain {
            table,
            iotlb: Iotlb::new(),
            format,
            page_shift: format.page_shift(),
            aperture,
            dirty_capable,
            tracking: AtomicBool::new(false),
        }
    }

    /// The format of its page table.
    pub fn format(&self) -> PageFormat {
        self.format
    }

    /// The IOVAs it translates: the device's aperture cut to what the
    /// format can reach. Anything outside faults with
    /// [`FaultReason::Aperture`].
    pub fn aperture(&self) -> IovaRange {
        self.aperture
    }

    /// The IO page sizes its leaves can have (see
    /// [`PageFormat::pgsize_bitmap`]).
    pub fn pgsize_bitmap(&self) -> u64 {
        self.format.pgsize_bitmap()
    }

    pub(crate) fn map(
        &self,
        iova: u64,
        addr: u64,
        len: u64,
        perm: Perm,
        trust: Trust,
        huge: bool,
    ) -> crate::Result<()> {
        with_table!(&self.table, pt => pt.map(iova, addr, len, perm, trust, huge))
    }

    /// Clears the range and invalidates the IOTLB. The caller must wait for
    /// readers (`crate::epoch::synchronize`) before the memory goes away.
    pub(crate) fn unmap(&self, iova: u64, len: u64, guard: &Guard) {
        with_table!(&self.table, pt => pt.unmap(iova, len, guard));
        match len {
            0 => self.iotlb.invalidate_all(),
            _ => self.iotlb.invalidate_range(iova, iova.saturating_add(len - 1)),
        }
    }

    /// Whether it was allocated with dirty tracking
    /// (`IOMMU_HWPT_ALLOC_DIRTY_TRACKING`), so tracking can be turned on.
    pub fn dirty_capable(&self) -> bool {
        self.dirty_capable
    }

    /// Whether dirty tracking is on now (`IOMMU_HWPT_SET_DIRTY_TRACKING`):
    /// DMA writes then set the dirty bits of the leaves they go through.
    pub fn dirty_tracking(&self) -> bool {
        self.tracking.load(Ordering::Acquire)
    }

    fn set_dirty(&self, iova: u64, guard: &Guard) -> bool {
        with_table!(&self.table, pt => pt.set_dirty(iova, guard))
    }

    /// Marks the leaf mapping `iova` dirty as a device write would; false
    /// when nothing maps it.
    pub fn mark_dirty(&self, iova: u64) -> bool {
        let guard = crate::epoch::pin();
        self.set_dirty(iova, &guard)
    }

    /// Turns dirty tracking on (starting from clean leaves) or off.
    pub(crate) fn set_dirty_tracking(&self, enable: bool, mapped: &[IovaRange]) -> crate::Result<()> {
        if !self.dirty_capable {
            return Err(crate::Error::Unsupported("HWPT was not allocated with dirty tracking"));
        }
        if enable && !self.dirty_tracking() {
            for r in mapped {
                self.read_and_clear_dirty(*r, false, &mut |_, _| {});
            }
        }
        self.tracking.store(enable, Ordering::Release);
        Ok(())
    }

    /// Reports dirty leaves in `range`, a run of contiguous ones per
    /// `record(start, size)`, and, unless `keep`, cleans them; the IOTLB
    /// forgets them so the next write marks them again.
    pub(crate) fn read_and_clear_dirty(&self, range: IovaRange, keep: bool, record: &mut dyn FnMut(u64, u64)) {
        self.read_and_clear_dirty_then(range, keep, record, &mut || {});
    }

    /// `read_and_clear_dirty`, with `after_flip` run where a DMA could land
    /// between the table's switch of buffers and its wait (tests put one
    /// there).
    fn read_and_clear_dirty_then(
        &self,
        range: IovaRange,
        keep: bool,
        record: &mut dyn FnMut(u64, u64),
        after_flip: &mut dyn FnMut(),
    ) {
        // An IOTLB entry remembers its leaf is dirty, so a write through it
        // marks nothing: entries made before the table switched buffers must
        // go before the write that would rely on them, or the write is lost.
        let mut flipped = || {
            self.iotlb.invalidate_all();
            after_flip();
        };
        with_table!(&self.table, pt => pt.read_and_clear_dirty_then(range.start, range.last, keep, record, &mut flipped));
        if !keep {
            // A read that could not switch buffers (inside a critical
            // section) took the bits in place: drop what remembers them.
            self.iotlb.invalidate_all();
        }
    }

    /// Forgets every cached translation (their generation changes).
    pub(crate) fn invalidate_iotlb(&self) {
        self.iotlb.invalidate_all();
    }

    /// Counts of the table's levels and leaves, for inspection (the CLI's
    /// demo, benchmarks); it walks the whole table.
    pub fn summary(&self) -> Summary {
        with_table!(&self.table, pt => pt.summary())
    }

    pub(crate) fn iotlb_generation(&self) -> u64 {
        self.iotlb.generation()
    }

    /// See `Iotlb::changes_between`.
    pub(crate) fn changes_between(&self, from: u64, to: u64) -> Option<Vec<(u64, u64)>> {
        self.iotlb.changes_between(from, to)
    }

    /// The rights the leaf mapping `iova` grants.
    pub(crate) fn perm_of(&self, iova: u64, guard: &Guard) -> Option<Perm> {
        if let Some(hit) = self.iotlb.lookup(iova >> self.format.page_shift()) {
            return Some(hit.perm);
        }
        with_table!(&self.table, pt => pt.walk(iova, guard)).map(|t| t.perm)
    }

    /// Where `iova` leads, whatever the rights (what hardware would fetch).
    pub fn lookup(&self, iova: u64) -> Option<u64> {
        let guard = crate::epoch::pin();
        with_table!(&self.table, pt => pt.walk(iova, &guard)).map(|t| t.addr)
    }

    /// Translates the IO page holding `iova` for an access needing `need`:
    /// where `iova` lands and how that memory is reached.
    #[inline]
    pub fn translate(&self, iova: u64, need: Perm, guard: &Guard) -> Result<Translated, FaultReason> {
        let (page, offset) = (iova >> self.page_shift, iova & ((1 << self.page_shift) - 1));
        if let Some(hit) = self.iotlb.lookup(page) {
            let must_dirty = need.write && !hit.dirty && self.tracking.load(Ordering::Relaxed);
            if !hit.perm.allows(need) {
                return Err(FaultReason::Permission);
            }
            if !must_dirty {
                return Ok(Translated { host: HostAddr(hit.host_page + offset), trust: hit.trust });
            }
        }
        self.translate_walk(iova, need, guard)
    }

    /// The IOTLB's answer for an access of `len` bytes at `iova` that stays
    /// in one IO page, when it needs nothing more (rights enough, no dirty
    /// bit to set): DMA's fast path. `None` sends the access the long way,
    /// which finds the same answer or the fault.
    #[inline(always)]
    pub(crate) fn hit(&self, iova: u64, len: usize, need: Perm) -> Option<Translated> {
        let offset = iova & ((1 << self.page_shift) - 1);
        if offset + len as u64 > 1 << self.page_shift {
            return None;
        }
        let hit = self.iotlb.lookup(iova >> self.page_shift)?;
        if !hit.perm.allows(need) || (need.write && !hit.dirty && self.tracking.load(Ordering::Relaxed)) {
            return None;
        }
        Some(Translated { host: HostAddr(hit.host_page + offset), trust: hit.trust })
    }

    /// `translate` past the IOTLB: walks the table and fills the IOTLB.
    /// Out of line, so a hit's code stays small.
    #[inline(never)]
    fn translate_walk(&self, iova: u64, need: Perm, guard: &Guard) -> Result<Translated, FaultReason> {
        let (page, offset) = (iova >> self.page_shift, iova & ((1 << self.page_shift) - 1));
        if iova < self.aperture.start || iova > self.aperture.last {
            return Err(FaultReason::Aperture);
        }
        let generation = self.iotlb.generation();
        let t = with_table!(&self.table, pt => pt.walk(iova, guard)).ok_or(FaultReason::NotPresent)?;
        let allowed = t.perm.allows(need);
        // A write with tracking on marks the leaf, as the hardware does.
        let dirty = allowed && need.write && self.tracking.load(Ordering::Relaxed) && self.set_dirty(iova, guard);
        let host_page = t.addr - offset;
        self.iotlb.fill(page, generation, Hit { host_page, perm: t.perm, trust: t.trust, dirty });
        if allowed { Ok(Translated { host: HostAddr(t.addr), trust: t.trust }) } else { Err(FaultReason::Permission) }
    }
}

/// A host virtual address in this process: what ioasid's page tables hold
/// and what DMA finally reads or writes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HostAddr(pub u64);

/// A guest-physical address: what a guest's stage-1 table holds and what
/// the host's stage 2 translates (an IOVA of the parent's IOAS).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Gpa(pub u64);

impl fmt::LowerHex for HostAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::LowerHex::fmt(&self.0, f)
    }
}

impl fmt::LowerHex for Gpa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::LowerHex::fmt(&self.0, f)
    }
}

/// What a translation returns: where the byte lands, valid to the end of
/// its IO page, and how that memory must be reached (plain loads and stores
/// or checked copies, as the mapping's pages said).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Translated {
    /// Where the translated byte is in this process.
    pub host: HostAddr,
    /// Whether that memory may be touched directly or only by a checked copy.
    pub trust: Trust,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::HostBuffer;

    /// A write that lands after a clearing read switched the table's
    /// buffers must be reported by the next read, even when an IOTLB entry
    /// from before remembered the page as dirty already.
    #[test]
    fn a_write_right_after_the_dirty_buffers_switch_is_not_lost() {
        let ram = HostBuffer::new(0x1000).unwrap();
        let d = Domain::with_dirty(PageFormat::VtdSs4, IovaRange::ALL, true);
        d.map(0x1000, ram.addr(), 0x1000, Perm::RW, Trust::Direct, false).unwrap();
        d.set_dirty_tracking(true, &[]).unwrap();
        let write = || {
            let guard = crate::epoch::pin();
            d.translate(0x1008, Perm::RW, &guard).unwrap();
        };
        // The IOTLB now holds the page, marked.
        write();
        let mut first = Vec::new();
        d.read_and_clear_dirty_then(IovaRange::new(0x1000, 0x1fff), false, &mut |a, l| first.push((a, l)), &mut || {
            write()
        });
        assert_eq!(first, [(0x1000, 0x1000)]);
        let mut second = Vec::new();
        d.read_and_clear_dirty(IovaRange::new(0x1000, 0x1fff), false, &mut |a, l| second.push((a, l)));
        assert_eq!(second, [(0x1000, 0x1000)], "the write after the switch was lost");
    }
}
