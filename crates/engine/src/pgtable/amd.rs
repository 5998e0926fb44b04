//! AMD-Vi's host page tables ("v1" format, AMD I/O Virtualization Technology
//! specification, I/O page tables for host translations): `L` levels (the
//! device table entry's Mode field), 4 KiB tables of 512 entries.
//!
//! Every entry has present (bit 0), accessed (5), the Next Level field
//! (bits 9..11), the address (12..51), and read and write permission (61,
//! 62). Next Level names the level of the table an entry points to, which
//! may skip levels (their index bits must then be zero); 0 makes the entry a
//! page of the size its level covers; 7 makes it a page whose size is
//! encoded in the address: the lowest clear address bit at or above 12, say
//! bit `n`, gives a page of `2^(n+1)` bytes. Permissions in table entries
//! limit everything below them. Leaves record writes in the dirty bit (6).

use super::{Format, Perm, Pte, Step, Trust, trust_mark, trust_of};

/// PR: the entry is present.
pub const PRESENT: u64 = 1 << 0;
/// A: the IOMMU used the entry.
pub const ACCESSED: u64 = 1 << 5;
/// D (leaves): the IOMMU wrote through the leaf.
pub const DIRTY: u64 = 1 << 6;
/// Ignored by the IOMMU: ioasid's "checked memory" mark.
const SW_CHECKED: u64 = 1 << 8;
const NEXT_LEVEL_SHIFT: u32 = 9;
const NEXT_LEVEL: u64 = 7 << NEXT_LEVEL_SHIFT;
/// Force coherent: what Linux sets on every leaf.
pub const FC: u64 = 1 << 60;
/// IR: DMA reads allowed (at and below this entry).
pub const IR: u64 = 1 << 61;
/// IW: DMA writes allowed (at and below this entry).
pub const IW: u64 = 1 << 62;
const ADDR: u64 = ((1 << 52) - 1) & !0xfff;

/// The AMD v1 format with `L` levels (Mode `L`): 4 levels translate 48 bits.
pub struct AmdV1<const L: u32>;

/// Mode 4: four levels, 48-bit IOVA, the host tables ioasid builds.
pub type AmdV1Mode4 = AmdV1<4>;

fn next_level(pte: u64) -> u32 {
    ((pte & NEXT_LEVEL) >> NEXT_LEVEL_SHIFT) as u32
}

fn perm(pte: u64) -> Perm {
    Perm { read: pte & IR != 0, write: pte & IW != 0 }
}

/// A table entry at `level` (0-based) pointing to a table at `next`; the
/// Next Level field counts from 1.
pub fn table_entry(addr: u64, next: u32) -> u64 {
    addr | PRESENT | IR | IW | u64::from(next + 1) << NEXT_LEVEL_SHIFT
}

/// A page of the size its level covers.
pub fn leaf_entry(addr: u64, perm: Perm) -> u64 {
    let mut pte = addr | PRESENT | FC;
    if perm.read {
        pte |= IR;
    }
    if perm.write {
        pte |= IW;
    }
    pte
}

/// A page of `1 << shift` bytes (Next Level 7), for sizes between levels.
pub fn sized_leaf_entry(addr: u64, shift: u32, perm: Perm) -> u64 {
    debug_assert!(shift > 12 && addr & ((1 << shift) - 1) == 0);
    // Ones from bit 12 up to the size's marker bit (shift - 1), clear there.
    let ones = ((1u64 << (shift - 1)) - 1) & !0xfff;
    leaf_entry(addr | ones, perm) | NEXT_LEVEL
}

impl<const L: u32> Format for AmdV1<L> {
    const NAME: &'static str = "AMD-Vi v1";
    const LEVELS: u32 = L;
    const LEAF_LEVELS: u32 = 0b111;
    const DIRTY: u64 = DIRTY;

    fn decode(pte: u64, level: u32) -> Pte {
        if pte & PRESENT == 0 {
            return Pte::None;
        }
        match next_level(pte) {
            0 => Pte::Leaf {
                addr: pte & ADDR & !((1u64 << Self::level_shift(level)) - 1),
                perm: perm(pte),
                trust: trust_of(pte, SW_CHECKED),
                dirty: pte & DIRTY != 0,
            },
            _ => Pte::Table(pte & ADDR),
        }
    }

    fn table(addr: u64, level: u32) -> u64 {
        table_entry(addr, level - 1)
    }

    fn leaf(addr: u64, _level: u32, perm: Perm, trust: Trust) -> u64 {
        debug_assert_eq!(addr & 0xfff, 0);
        leaf_entry(addr, perm) | trust_mark(trust, SW_CHECKED)
    }

    fn step(pte: u64, level: u32) -> Step {
        if pte & PRESENT == 0 {
            return Step::Invalid;
        }
        let dirty = pte & DIRTY != 0;
        match next_level(pte) {
            0 => {
                let shift = Self::level_shift(level);
                Step::Leaf { addr: pte & ADDR & !((1u64 << shift) - 1), shift, perm: perm(pte), dirty, accessed: true }
            }
            7 => {
                // The marker is the lowest clear address bit from bit 12.
                let marker = (pte | !ADDR).trailing_ones().max(12);
                let shift = marker + 1;
                // A size beyond what one entry here covers is malformed.
                if shift > Self::level_shift(level + 1) || shift > 52 {
                    return Step::Invalid;
                }
                Step::Leaf { addr: pte & ADDR & !((1u64 << shift) - 1), shift, perm: perm(pte), dirty, accessed: true }
            }
            n => Step::Table { addr: pte & ADDR, next: n - 1, limit: perm(pte) },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pgtable::image::{ImageFault, ImageTranslation, walk_image};
    use crate::pgtable::{PageTable, pgsize_bitmap};
    use std::collections::BTreeMap;

    type F = AmdV1Mode4;

    fn walk(image: &BTreeMap<u64, u64>, root: u64, iova: u64) -> Result<ImageTranslation, ImageFault> {
        walk_image::<F>(root, iova, &mut |a| Some(image.get(&a).copied().unwrap_or(0)))
    }

    #[test]
    fn golden_entries() {
        // A 4 KiB read-write page: present, force-coherent, IR, IW, NL 0.
        assert_eq!(F::leaf(0x1234_5000, 0, Perm::RW, Trust::Direct), 0x6000_0000_1234_5001 | FC);
        // A table entry at level 3 (Mode 4 root) names level 3 in Next Level.
        assert_eq!(F::table(0x8000, 3), 0x6000_0000_0000_8601);
        assert_eq!(F::decode(0x6000_0000_0000_8601, 3), Pte::Table(0x8000));
        assert_eq!(
            F::decode(0x2000_0000_4020_0001 | DIRTY, 1),
            Pte::Leaf { addr: 0x4020_0000, perm: Perm::R, trust: Trust::Direct, dirty: true }
        );
        assert_eq!(F::decode(0x6000_0000_1234_5000, 0), Pte::None, "not present");
        assert_eq!(pgsize_bitmap::<F>(), 0x1000 | 0x20_0000 | 0x4000_0000);
        assert_eq!(F::iova_bits(), 48);
        // An 8 KiB page: bit 12 is the marker (clear), so the size is 2^13.
        assert_eq!(sized_leaf_entry(0x10_0000, 13, Perm::R), 0x2000_0000_0010_0e01 | FC);
        // 32 KiB: bits 12 and 13 set, bit 14 the marker.
        assert_eq!(sized_leaf_entry(0x10_0000, 15, Perm::R) & ADDR, 0x10_3000);
    }

    /// A hand-built Mode 4 image: the root at 0x1000 maps IOVA 0 through a
    /// level-3 table entry that skips straight to a level-1 table (our 0) at
    /// 0x3000, which holds a 4 KiB page and an 8 KiB page (Next Level 7).
    fn image() -> BTreeMap<u64, u64> {
        let mut m = BTreeMap::new();
        // Root (our level 3) entry 0 -> table of AMD level 1, i.e. our level 0.
        m.insert(0x1000, 0x3000 | PRESENT | IR | IW | 1 << NEXT_LEVEL_SHIFT);
        m.insert(0x3000 + 5 * 8, 0x7_7000 | PRESENT | IR);
        // Entries 8 and 9 both hold the 8 KiB page at 0x9_a000.
        for i in [8, 9] {
            m.insert(0x3000 + i * 8, sized_leaf_entry(0x9_a000, 13, Perm::RW));
        }
        // Root entry 1 -> a level-2 table (ours: 1) at 0x4000 that may not write.
        m.insert(0x1000 + 8, 0x4000 | PRESENT | IR | 2 << NEXT_LEVEL_SHIFT);
        m.insert(0x4000 + 3 * 8, 0x20_0000 | PRESENT | IR | IW | DIRTY);
        m
    }

    #[test]
    fn golden_walks() {
        let m = image();
        let page = |addr, shift, perm, dirty| Ok(ImageTranslation { addr, shift, perm, dirty });
        assert_eq!(walk(&m, 0x1000, 0x5123), page(0x7_7123, 12, Perm::R, false));
        assert_eq!(walk(&m, 0x1000, 0x8010), page(0x9_a010, 13, Perm::RW, false));
        assert_eq!(walk(&m, 0x1000, 0x9ff0), page(0x9_bff0, 13, Perm::RW, false));
        // Skipped levels: IOVA bits 21..38 must be zero below root entry 0.
        assert_eq!(walk(&m, 0x1000, 1 << 21 | 0x5000), Err(ImageFault::SkippedBits { level: 1 }));
        assert_eq!(walk(&m, 0x1000, 1 << 30 | 0x5000), Err(ImageFault::SkippedBits { level: 2 }));
        assert_eq!(walk(&m, 0x1000, 0x6000), Err(ImageFault::Translation { level: 0 }));
        // A 2 MiB page under a read-only table: the table's limit wins.
        let iova = (1 << 39) | (3 << 21) | 0x42;
        assert_eq!(walk(&m, 0x1000, iova), page(0x20_0042, 21, Perm::R, true));
        assert_eq!(walk(&m, 0x1000, 1 << 48), Err(ImageFault::AddressSize));
    }

    #[test]
    fn tables_ioasid_builds_walk_the_same() {
        let pt = PageTable::<F>::new();
        pt.map(1 << 30, 1 << 32, (1 << 30) + 0x1000, Perm::R, Trust::Direct, true).unwrap();
        assert_eq!(pt.summary().leaves, vec![1, 0, 1, 0]);
        let g = crate::epoch::pin();
        assert_eq!(pt.walk((1 << 30) + 77, &g).unwrap().addr, (1 << 32) + 77);
        // SAFETY: the tables are live while `pt` is, and not written here.
        let read = &mut |a: u64| Some(unsafe { (a as *const u64).read_volatile() });
        let t = walk_image::<F>(pt.root_addr(), (2 << 30) + 5, read).unwrap();
        assert_eq!((t.addr, t.shift, t.perm), ((2 << 30) + (1 << 32) - (1 << 30) + 5, 12, Perm::R));
    }
}
