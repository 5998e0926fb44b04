//! x86-64 page tables as VT-d's second stage uses them (4 or 5 levels;
//! 4 KiB, 2 MiB and 1 GiB leaves), per the VT-d specification's
//! second-stage paging-entry layout.

use super::{Format, Perm, Pte, Step, Trust, trust_mark, trust_of};

const READ: u64 = 1 << 0;
const WRITE: u64 = 1 << 1;
/// Page size: set on a leaf above level 0.
const PS: u64 = 1 << 7;
const ACCESSED: u64 = 1 << 8;
pub(super) const DIRTY: u64 = 1 << 9;
/// Bits 52..61 are ignored by hardware; ioasid keeps its "checked memory"
/// mark in the lowest of them.
const SW_CHECKED: u64 = 1 << 52;
/// Address bits of an entry (bits 12..51 for tables).
const ADDR_BITS: u64 = (1 << 52) - 1;
const ADDR_MASK: u64 = ADDR_BITS & !0xfff;

/// Decodes an entry in this layout; leaves are aligned to `leaf_align`
/// bytes (4 KiB here; the selftest mock reuses the layout at 2 KiB).
pub(super) fn decode_entry(pte: u64, level: u32, leaf_align: u64) -> Pte {
    if pte & (READ | WRITE) == 0 {
        return Pte::None;
    }
    if level > 0 && pte & PS == 0 {
        return Pte::Table(pte & ADDR_MASK);
    }
    Pte::Leaf {
        addr: pte & ADDR_BITS & !(leaf_align - 1),
        perm: Perm { read: pte & READ != 0, write: pte & WRITE != 0 },
        trust: trust_of(pte, SW_CHECKED),
        dirty: pte & DIRTY != 0,
    }
}

pub(super) fn table_entry(addr: u64) -> u64 {
    debug_assert_eq!(addr & !ADDR_MASK, 0);
    // Non-leaf entries grant everything; rights are decided at the leaf.
    addr | READ | WRITE
}

pub(super) fn leaf_entry(addr: u64, level: u32, perm: Perm, trust: Trust) -> u64 {
    debug_assert_eq!(addr & !ADDR_BITS, 0, "host address does not fit the format");
    let mut pte = addr | ACCESSED;
    if perm.read {
        pte |= READ;
    }
    if perm.write {
        pte |= WRITE;
    }
    if level > 0 {
        pte |= PS;
    }
    pte | trust_mark(trust, SW_CHECKED)
}

/// VT-d first-stage entries (x86-64 IA-32e paging, as VT-d's first stage
/// uses it): present bit 0, writable bit 1, user bit 2, accessed bit 5,
/// dirty bit 6 (leaves), page size bit 7, execute-disable bit 63. Unlike the
/// second stage, rights accumulate: a write needs bit 1 at every level.
pub mod first_stage {
    use super::super::{Perm, Pte, Trust};

    /// P: the entry is present.
    pub const PRESENT: u64 = 1 << 0;
    /// R/W: writes allowed (needed at every level).
    pub const WRITABLE: u64 = 1 << 1;
    /// U/S: user-mode (non-supervisor) requests allowed.
    pub const USER: u64 = 1 << 2;
    /// A: the IOMMU used the entry.
    pub const ACCESSED: u64 = 1 << 5;
    /// D (leaves): the IOMMU wrote through the leaf.
    pub const DIRTY: u64 = 1 << 6;
    /// PS (levels 1 and 2): the entry is a 2 MiB or 1 GiB leaf.
    pub const PAGE_SIZE: u64 = 1 << 7;
    /// XD: execute requests not allowed.
    pub const XD: u64 = 1 << 63;
    const ADDR: u64 = ((1 << 52) - 1) & !0xfff;

    /// Decodes one entry at `level` (0: 4 KiB leaves; 1 and 2 may be 2 MiB
    /// and 1 GiB leaves), with the rights this entry grants.
    pub fn decode(pte: u64, level: u32) -> (Pte, Perm) {
        if pte & PRESENT == 0 {
            return (Pte::None, Perm::default());
        }
        let perm = Perm { read: true, write: pte & WRITABLE != 0 };
        if level > 0 && (pte & PAGE_SIZE == 0 || level > 2) {
            return (Pte::Table(pte & ADDR), perm);
        }
        let size_mask = (1u64 << (12 + 9 * level)) - 1;
        (Pte::Leaf { addr: pte & ADDR & !size_mask, perm, trust: Trust::Direct, dirty: pte & DIRTY != 0 }, perm)
    }

    /// An entry a guest would write: a table pointer or a leaf.
    pub fn encode(addr: u64, level: u32, leaf: bool, write: bool) -> u64 {
        let mut pte = addr | PRESENT | ACCESSED | USER;
        if write {
            pte |= WRITABLE;
        }
        if leaf && level > 0 {
            pte |= PAGE_SIZE;
        }
        pte
    }
}

/// VT-d's first stage as a [`Format`] with `L` levels, so that a guest's
/// table image is walked by the generic walker (`image::walk_image`): a
/// table entry limits the rights of everything below it.
pub struct VtdFirstStage<const L: u32>;

/// 4-level first stage: 48-bit IOVA.
pub type VtdFs4 = VtdFirstStage<4>;
/// 5-level first stage: 57-bit IOVA.
pub type VtdFs5 = VtdFirstStage<5>;

impl<const L: u32> Format for VtdFirstStage<L> {
    const NAME: &'static str = if L == 5 { "VT-d first stage, 5-level" } else { "VT-d first stage, 4-level" };
    const LEVELS: u32 = L;
    const LEAF_LEVELS: u32 = 0b111;
    const DIRTY: u64 = first_stage::DIRTY;

    fn decode(pte: u64, level: u32) -> Pte {
        first_stage::decode(pte, level).0
    }

    fn table(addr: u64, level: u32) -> u64 {
        first_stage::encode(addr, level, false, true)
    }

    /// A guest's entry: it has no bit for ioasid's trust mark.
    fn leaf(addr: u64, level: u32, perm: Perm, _trust: Trust) -> u64 {
        first_stage::encode(addr, level, true, perm.write)
    }

    fn step(pte: u64, level: u32) -> Step {
        match first_stage::decode(pte, level) {
            (Pte::None, _) => Step::Invalid,
            (Pte::Table(addr), limit) => Step::Table { addr, next: level - 1, limit },
            (Pte::Leaf { addr, perm, dirty, .. }, _) => {
                Step::Leaf { addr, shift: Self::level_shift(level), perm, dirty, accessed: true }
            }
        }
    }
}

/// VT-d second-stage format with `L` levels (4: 48-bit IOVA, 5: 57-bit).
pub struct VtdSecondStage<const L: u32>;

/// 4-level second stage: 48-bit IOVA.
pub type VtdSs4 = VtdSecondStage<4>;
/// 5-level second stage: 57-bit IOVA.
pub type VtdSs5 = VtdSecondStage<5>;

impl<const L: u32> Format for VtdSecondStage<L> {
    const NAME: &'static str = if L == 5 { "VT-d second stage, 5-level" } else { "VT-d second stage, 4-level" };
    const LEVELS: u32 = L;
    const LEAF_LEVELS: u32 = 0b111;
    const DIRTY: u64 = DIRTY;

    fn decode(pte: u64, level: u32) -> Pte {
        decode_entry(pte, level, 1 << 12)
    }

    fn table(addr: u64, _level: u32) -> u64 {
        table_entry(addr)
    }

    fn leaf(addr: u64, level: u32, perm: Perm, trust: Trust) -> u64 {
        debug_assert_eq!(addr & 0xfff, 0);
        leaf_entry(addr, level, perm, trust)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pgtable::{PageTable, Translation, pgsize_bitmap};

    const G: u64 = 1 << 30;
    const M2: u64 = 2 << 20;
    const K4: u64 = 4096;

    fn walk<F: Format>(pt: &PageTable<F>, iova: u64) -> Option<Translation> {
        pt.walk(iova, &crate::epoch::pin())
    }

    #[test]
    fn golden_first_stage_entries() {
        use first_stage::*;
        // A 4 KiB read-only leaf: present, accessed, user; not writable.
        let (pte, perm) = decode(0x1234_5000 | PRESENT | ACCESSED | USER, 0);
        assert_eq!(pte, Pte::Leaf { addr: 0x1234_5000, perm: Perm::R, trust: Trust::Direct, dirty: false });
        assert_eq!(perm, Perm::R);
        // A 2 MiB leaf at level 1 needs PS; without it, it is a table.
        let (pte, _) = decode(0x4020_0000 | PRESENT | WRITABLE | PAGE_SIZE | DIRTY, 1);
        assert_eq!(pte, Pte::Leaf { addr: 0x4020_0000, perm: Perm::RW, trust: Trust::Direct, dirty: true });
        assert_eq!(decode(0x4020_0000 | PRESENT, 1).0, Pte::Table(0x4020_0000));
        // PS means nothing at level 3 (no 512 GiB pages): still a table.
        assert_eq!(decode(0x8000_0000 | PRESENT | PAGE_SIZE, 3).0, Pte::Table(0x8000_0000));
        // Not present whatever else is set.
        assert_eq!(decode(0xffff_f000 | WRITABLE | PAGE_SIZE, 1).0, Pte::None);
        assert_eq!(encode(0x5000, 0, true, true), 0x5000 | PRESENT | ACCESSED | USER | WRITABLE);
    }

    #[test]
    fn golden_entries() {
        // A 2 MiB read-only leaf at level 1: R | PS | A | address.
        assert_eq!(VtdSs4::leaf(0x4020_0000, 1, Perm::R, Trust::Direct), 0x4020_0000 | 1 | 1 << 7 | 1 << 8);
        assert_eq!(VtdSs4::decode(0x1234_5000 | 3, 2), Pte::Table(0x1234_5000));
        assert_eq!(
            VtdSs4::decode(0x1234_5000 | 1 << 7 | 2, 2),
            Pte::Leaf { addr: 0x1234_5000, perm: Perm::W, trust: Trust::Direct, dirty: false }
        );
        assert_eq!(VtdSs4::decode(0x1234_5000 | 1 << 9, 0), Pte::None);
        assert_eq!(pgsize_bitmap::<VtdSs4>(), K4 | M2 | G);
        assert_eq!(VtdSs5::iova_bits(), 57);
    }

    #[test]
    fn golden_second_stage_walks() {
        use crate::pgtable::image::{ImageFault, ImageTranslation, walk_image};
        use std::collections::BTreeMap;
        // A 4-level image rooted at 0x1000: IOVA 0 -> tables 0x2000, 0x3000;
        // a 2 MiB read-only leaf at level 1 index 1, and a 4 KiB write-only
        // page under table 0x4000 (level 1 index 2, page 3).
        let image: BTreeMap<u64, u64> = [
            (0x1000, 0x2000 | 3),
            (0x2000, 0x3000 | 3),
            (0x3000 + 8, 0x80_0000 | 1 | PS),
            (0x3000 + 2 * 8, 0x4000 | 3),
            (0x4000 + 3 * 8, 0x9000 | 2 | DIRTY),
        ]
        .into();
        let walk = |iova| walk_image::<VtdSs4>(0x1000, iova, &mut |a| Some(image.get(&a).copied().unwrap_or(0)));
        let t = |addr, shift, perm, dirty| Ok(ImageTranslation { addr, shift, perm, dirty });
        assert_eq!(walk(M2 + 0x1234), t(0x80_1234, 21, Perm::R, false));
        assert_eq!(walk(2 * M2 + 3 * K4 + 8), t(0x9008, 12, Perm::W, true));
        assert_eq!(walk(2 * M2 + 4 * K4), Err(ImageFault::Translation { level: 0 }));
        assert_eq!(walk(G), Err(ImageFault::Translation { level: 2 }));
        assert_eq!(walk(1 << 48), Err(ImageFault::AddressSize));
    }

    #[test]
    fn golden_first_stage_walks() {
        use crate::pgtable::image::{ImageFault, ImageTranslation, walk_image, walk_image_from};
        use first_stage::encode;
        use std::collections::BTreeMap;
        // Root at 0x1000; IOVA 0x40_0000 is a 4 KiB page under a read-only
        // table entry, 0x80_0000 a writable 2 MiB leaf.
        let image: BTreeMap<u64, u64> = [
            (0x1000, encode(0x2000, 3, false, true)),
            (0x2000, encode(0x3000, 2, false, true)),
            (0x3000 + 2 * 8, encode(0x4000, 1, false, false)),
            (0x3000 + 4 * 8, encode(0x60_0000, 1, true, true)),
            (0x4000, encode(0x9000, 0, true, true)),
        ]
        .into();
        let mut read = |a| Some(image.get(&a).copied().unwrap_or(0));
        let t = |addr, shift, perm| Ok(ImageTranslation { addr, shift, perm, dirty: false });
        assert_eq!(walk_image::<VtdFs4>(0x1000, 0x40_0123, &mut read), t(0x9123, 12, Perm::R), "the table limits");
        assert_eq!(walk_image::<VtdFs4>(0x1000, 0x80_1234, &mut read), t(0x60_1234, 21, Perm::RW));
        assert_eq!(walk_image::<VtdFs4>(0x1000, 0x40_1000, &mut read), Err(ImageFault::Translation { level: 0 }));
        // Four levels walked inside the five-level format, as a nested
        // table of either depth is.
        assert_eq!(walk_image_from::<VtdFs5>(0x1000, 3, 0x40_0123, &mut read), t(0x9123, 12, Perm::R));
        assert_eq!(walk_image_from::<VtdFs5>(0x1000, 3, 1 << 48, &mut read), Err(ImageFault::AddressSize));
    }

    #[test]
    fn huge_leaves_are_used_when_aligned() {
        let pt = PageTable::<VtdSs4>::new();
        pt.map(G, 4 * G, G + M2 + K4, Perm::RW, Trust::Direct, true).unwrap();
        let s = pt.summary();
        assert_eq!(s.leaves, vec![1, 1, 1, 0]);
        assert_eq!(walk(&pt, G + 5).unwrap().addr, 4 * G + 5);
        assert_eq!(walk(&pt, G + 5).unwrap().shift, 30);
        assert_eq!(walk(&pt, 2 * G + M2 + 7).unwrap().addr, 5 * G + M2 + 7);
        assert_eq!(walk(&pt, 2 * G + M2 + K4), None);
    }

    #[test]
    fn misaligned_memory_uses_small_leaves() {
        let pt = PageTable::<VtdSs4>::new();
        pt.map(0, K4, M2, Perm::R, Trust::Direct, true).unwrap();
        assert_eq!(pt.summary().leaves, vec![512, 0, 0, 0]);
        let pt = PageTable::<VtdSs4>::new();
        pt.map(0, 0, M2, Perm::R, Trust::Direct, false).unwrap();
        assert_eq!(pt.summary().leaves, vec![512, 0, 0, 0]);
    }

    #[test]
    fn partial_unmap_splits_a_huge_leaf() {
        let pt = PageTable::<VtdSs4>::new();
        pt.map(0, G, M2, Perm::RW, Trust::Direct, true).unwrap();
        pt.unmap(K4, K4, &crate::epoch::pin());
        assert_eq!(pt.summary().leaves, vec![511, 0, 0, 0]);
        assert_eq!(walk(&pt, 0).unwrap().addr, G);
        assert_eq!(walk(&pt, K4), None);
        assert_eq!(walk(&pt, 2 * K4 + 1).unwrap().addr, G + 2 * K4 + 1);
    }

    /// As Linux's page tables: an unmap frees the tables its range covers,
    /// and keeps those it only enters, even emptied.
    #[test]
    fn unmap_frees_the_tables_it_covers() {
        let pt = PageTable::<VtdSs5>::new();
        pt.map(1 << 50, 0x1000, 3 * K4, Perm::R, Trust::Checked, true).unwrap();
        assert_eq!(pt.summary().tables, vec![1, 1, 1, 1, 1]);
        assert!(walk(&pt, (1 << 50) + K4).unwrap().trust == Trust::Checked);
        pt.unmap(1 << 50, 3 * K4, &crate::epoch::pin());
        assert_eq!(pt.summary().tables, vec![1, 1, 1, 1, 1]);
        assert_eq!(walk(&pt, 1 << 50), None);
        pt.unmap(1 << 50, 1 << 21, &crate::epoch::pin());
        assert_eq!(pt.summary().tables, vec![0, 1, 1, 1, 1]);
        pt.unmap(1 << 50, 1 << 48, &crate::epoch::pin());
        assert_eq!(pt.summary().tables, vec![0, 0, 0, 0, 1]);
    }

    #[test]
    fn mapping_over_a_leaf_is_refused() {
        let pt = PageTable::<VtdSs4>::new();
        pt.map(0, 0, M2, Perm::R, Trust::Direct, true).unwrap();
        assert!(pt.map(K4, K4, K4, Perm::R, Trust::Direct, true).is_err());
        assert!(pt.map(1 << 48, 0, K4, Perm::R, Trust::Direct, true).is_err());
    }
}
