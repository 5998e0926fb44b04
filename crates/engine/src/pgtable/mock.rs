//! The formats of Linux's selftest mock IOMMU: IO pages of half a CPU page
//! (2 KiB), so that the core's handling of IO pages smaller than CPU pages is
//! exercised, and optionally 1 MiB huge pages (512 of them). The mock has no
//! hardware layout of its own; it uses x86's entry layout at 2 KiB alignment.
//!
//! Since Linux 7.3 the mock's default table (`MOCK_IOMMUPT_DEFAULT`) is
//! AMD-Vi v1 at a 2 KiB granule, where a CPU page the IOAS maps is one
//! contiguous leaf of two 2 KiB entries: it is dirtied and reported whole.
//! [`MockPt`] gives those CPU-page leaves (and larger ones) directly.

use super::x86::{DIRTY, decode_entry, leaf_entry, table_entry};
use super::{Format, Perm, Pte, Trust};

/// The mock format; `H` enables 1 MiB leaves (`MOCK_FLAGS_DEVICE_HUGE_IOVA`).
pub struct Mock<const H: bool>;

impl<const H: bool> Format for Mock<H> {
    const NAME: &'static str = if H { "selftest mock, 2 KiB and 1 MiB pages" } else { "selftest mock, 2 KiB pages" };
    /// 11 + 3 * 9 = 38 bits, above the mock aperture's 31.
    const LEVELS: u32 = 3;
    const PAGE_SHIFT: u32 = 11;
    const LEAF_LEVELS: u32 = if H { 0b11 } else { 0b01 };
    const DIRTY: u64 = DIRTY;

    fn decode(pte: u64, level: u32) -> Pte {
        decode_entry(pte, level, 1 << 11)
    }

    fn table(addr: u64, _level: u32) -> u64 {
        table_entry(addr)
    }

    fn leaf(addr: u64, level: u32, perm: Perm, trust: Trust) -> u64 {
        debug_assert_eq!(addr & 0x7ff, 0);
        leaf_entry(addr, level, perm, trust)
    }
}

/// The 7.3 mock's default table: leaves of whole CPU pages (4 KiB, the
/// smallest unit the IOAS maps), 2 MiB and 1 GiB.
pub struct MockPt;

impl Format for MockPt {
    const NAME: &'static str = "selftest mock, AMD-Vi v1 style";
    /// 12 + 3 * 9 = 39 bits, above the mock aperture's 31.
    const LEVELS: u32 = 3;
    const LEAF_LEVELS: u32 = 0b111;
    const DIRTY: u64 = DIRTY;

    fn decode(pte: u64, level: u32) -> Pte {
        decode_entry(pte, level, 1 << 12)
    }

    fn table(addr: u64, _level: u32) -> u64 {
        table_entry(addr)
    }

    fn leaf(addr: u64, level: u32, perm: Perm, trust: Trust) -> u64 {
        leaf_entry(addr, level, perm, trust)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pgtable::{PageTable, pgsize_bitmap};

    #[test]
    fn half_page_leaves_translate_independently() {
        let pt = PageTable::<Mock<false>>::new();
        // Two 2 KiB IO pages of one IOVA page map to different memory.
        pt.map(0x100_0000, 0x5000, 0x800, Perm::R, Trust::Direct, true).unwrap();
        pt.map(0x100_0800, 0x9800, 0x800, Perm::RW, Trust::Direct, true).unwrap();
        let g = crate::epoch::pin();
        assert_eq!(pt.walk(0x100_0010, &g).unwrap().addr, 0x5010);
        assert_eq!(pt.walk(0x100_0810, &g).unwrap().addr, 0x9810);
        assert_eq!(pt.walk(0x100_0810, &g).unwrap().shift, 11);
        assert_eq!(pgsize_bitmap::<Mock<false>>(), 0x800);
        assert_eq!(pgsize_bitmap::<Mock<true>>(), 0x800 | 0x10_0000);
    }

    #[test]
    fn a_dirty_half_page_dirties_the_whole_cpu_page_leaf() {
        let pt = PageTable::<MockPt>::new();
        pt.map(0x100_0000, 0x5000, 0x2000, Perm::RW, Trust::Direct, false).unwrap();
        let g = crate::epoch::pin();
        assert_eq!(pt.walk(0x100_0810, &g).unwrap().addr, 0x5810);
        assert!(pt.set_dirty(0x100_0800, &g));
        let mut dirty = Vec::new();
        pt.read_and_clear_dirty(0x100_0000, 0x100_1fff, false, &mut |at, len| dirty.push((at, len)));
        assert_eq!(dirty, vec![(0x100_0000, 0x1000)]);
    }

    #[test]
    fn huge_mock_pages_are_one_mebibyte() {
        let pt = PageTable::<Mock<true>>::new();
        pt.map(0x100_0000, 0x4000_0000, 0x20_0000, Perm::RW, Trust::Direct, true).unwrap();
        assert_eq!(pt.summary().leaves, vec![0, 2, 0]);
    }
}
