//! Arm's VMSAv8-64 translation tables with the 4 KiB granule, as SMMUv3
//! walks them (Arm ARM, "VMSAv8-64 translation table format descriptors"):
//! four levels (Arm's 0 to 3; ioasid's 3 to 0), 48-bit input, blocks of
//! 1 GiB and 2 MiB and pages of 4 KiB.
//!
//! Descriptor bits 0..1: `0b11` is a table (levels 0-2) or a page (level
//! 3), `0b01` a block (levels 1-2); anything else is invalid. The access
//! flag (bit 10) must be set or the access faults. Dirty state by DBM
//! (bit 51): a writable leaf that hardware may make dirty starts
//! "writable-clean" and the first write turns it dirty.
//! - Stage 1: AP\[2\] (bit 7) makes a leaf read-only, and is what DBM clears on
//!   a write; AP\[1\] (bit 6) admits unprivileged accesses. Table entries may
//!   forbid writes below them (APTable\[1\], bit 62).
//! - Stage 2: S2AP (bits 6 and 7) grant read and write; DBM sets the write
//!   bit on a write.

use std::sync::atomic::{AtomicU64, Ordering};

use super::{Format, Perm, Pte, Step, Trust, trust_mark, trust_of};

/// The descriptor is valid.
pub const VALID: u64 = 1 << 0;
/// With VALID: a table above level 3, a page at it.
pub const TABLE_OR_PAGE: u64 = 1 << 1;
/// AF, the access flag: clear, an access faults (`F_ACCESS`).
pub const AF: u64 = 1 << 10;
/// Inner shareable.
pub const SH_INNER: u64 = 3 << 8;
/// DBM, dirty bit modifier: hardware records writes in AP\[2\] or S2AP\[1\].
pub const DBM: u64 = 1 << 51;
/// Software-defined bits 55..58: ioasid's "checked memory" mark.
const SW_CHECKED: u64 = 1 << 55;
const ADDR: u64 = ((1 << 48) - 1) & !0xfff;

/// Stage 1: AP\[1\], unprivileged (EL0) access allowed.
pub const AP_UNPRIV: u64 = 1 << 6;
/// Stage 1: AP\[2\], read-only.
pub const AP_RDONLY: u64 = 1 << 7;
/// Stage 1, table entries: APTable\[1\], no writes at any level below.
pub const AP_TABLE_RDONLY: u64 = 1 << 62;
/// Stage 1: AttrIndx 0 (MAIR slot 0, normal memory in Linux's setup).
pub const S1_ATTR_NORMAL: u64 = 0;

/// Stage 2: S2AP\[0\], reads allowed.
pub const S2AP_READ: u64 = 1 << 6;
/// Stage 2: S2AP\[1\], writes allowed.
pub const S2AP_WRITE: u64 = 1 << 7;
/// Stage 2: MemAttr 0b1111, normal write-back memory.
pub const S2_MEMATTR_NORMAL: u64 = 0xf << 2;

/// VMSAv8-64 stage 1, 4 KiB granule, 48-bit input.
pub struct ArmS1;
/// VMSAv8-64 stage 2, 4 KiB granule, 48-bit input (starting at level 0).
pub struct ArmS2;

/// The shape of a descriptor at ioasid's `level` (Arm level `3 - level`).
fn kind(pte: u64, level: u32) -> Option<bool> {
    match (pte & (VALID | TABLE_OR_PAGE), level) {
        (0b11, 0) => Some(true),     // page
        (0b11, _) => Some(false),    // table
        (0b01, 1 | 2) => Some(true), // block
        _ => None,                   // invalid, or a block where none may be
    }
}

fn leaf_addr(pte: u64, level: u32) -> u64 {
    pte & ADDR & !((1u64 << (12 + 9 * level)) - 1)
}

/// A descriptor as `Pte`, given the stage's reading of the leaf's rights
/// and dirty state.
fn decode_as(pte: u64, level: u32, perm: Perm, dirty: bool) -> Pte {
    match kind(pte, level) {
        None => Pte::None,
        Some(false) => Pte::Table(pte & ADDR),
        Some(true) => Pte::Leaf { addr: leaf_addr(pte, level), perm, trust: trust_of(pte, SW_CHECKED), dirty },
    }
}

/// `decoded` as a walk step; `limit` is what a table entry allows below it.
fn step_as<F: Format>(decoded: Pte, pte: u64, level: u32, limit: Perm) -> Step {
    match decoded {
        Pte::None => Step::Invalid,
        Pte::Table(addr) => Step::Table { addr, next: level - 1, limit },
        Pte::Leaf { addr, perm, dirty, .. } => {
            Step::Leaf { addr, shift: F::level_shift(level), perm, dirty, accessed: pte & AF != 0 }
        }
    }
}

/// Whether the leaf at `slot` has a dirty state: only DBM leaves do, and
/// flipping a rights bit of any other would change what it allows.
fn has_dbm(slot: &AtomicU64) -> bool {
    slot.load(Ordering::Acquire) & DBM != 0
}

/// Common bits of a leaf at `level`: its address, type and access flag.
fn leaf_base(addr: u64, level: u32, trust: Trust) -> u64 {
    let kind = if level == 0 { VALID | TABLE_OR_PAGE } else { VALID };
    addr | kind | AF | SH_INNER | trust_mark(trust, SW_CHECKED)
}

impl ArmS1 {
    fn perm(pte: u64) -> Perm {
        // Readable whenever valid; writable unless read-only, or when DBM
        // lets the hardware make it writable-dirty.
        Perm { read: true, write: pte & AP_RDONLY == 0 || pte & DBM != 0 }
    }
}

impl Format for ArmS1 {
    const NAME: &'static str = "Arm VMSAv8-64 stage 1, 4 KiB granule";
    const LEVELS: u32 = 4;
    const LEAF_LEVELS: u32 = 0b111;
    /// Dirty is AP\[2\] clear on a DBM leaf; see `set_dirty`.
    const DIRTY: u64 = AP_RDONLY;

    fn decode(pte: u64, level: u32) -> Pte {
        decode_as(pte, level, Self::perm(pte), pte & DBM != 0 && pte & AP_RDONLY == 0)
    }

    fn table(addr: u64, _level: u32) -> u64 {
        addr | VALID | TABLE_OR_PAGE
    }

    /// Stage 1 cannot express write-only: a writable leaf is readable too.
    /// Writable leaves carry DBM and start dirty, as Linux's are.
    fn leaf(addr: u64, level: u32, perm: Perm, trust: Trust) -> u64 {
        let rights = if perm.write { DBM } else { AP_RDONLY };
        leaf_base(addr, level, trust) | S1_ATTR_NORMAL | AP_UNPRIV | rights
    }

    fn tracks_dirty(pte: u64) -> bool {
        pte & DBM != 0
    }

    fn set_dirty(slot: &AtomicU64) {
        if has_dbm(slot) {
            slot.fetch_and(!AP_RDONLY, Ordering::AcqRel);
        }
    }

    fn clear_dirty(slot: &AtomicU64) {
        if has_dbm(slot) {
            slot.fetch_or(AP_RDONLY, Ordering::AcqRel);
        }
    }

    fn step(pte: u64, level: u32) -> Step {
        let limit = Perm { read: true, write: pte & AP_TABLE_RDONLY == 0 };
        step_as::<Self>(Self::decode(pte, level), pte, level, limit)
    }
}

impl Format for ArmS2 {
    const NAME: &'static str = "Arm VMSAv8-64 stage 2, 4 KiB granule";
    const LEVELS: u32 = 4;
    const LEAF_LEVELS: u32 = 0b111;
    /// On a DBM leaf, the write permission is the dirty state.
    const DIRTY: u64 = S2AP_WRITE;

    fn decode(pte: u64, level: u32) -> Pte {
        let perm = Perm { read: pte & S2AP_READ != 0, write: pte & (S2AP_WRITE | DBM) != 0 };
        decode_as(pte, level, perm, pte & DBM != 0 && pte & S2AP_WRITE != 0)
    }

    fn table(addr: u64, _level: u32) -> u64 {
        addr | VALID | TABLE_OR_PAGE
    }

    fn leaf(addr: u64, level: u32, perm: Perm, trust: Trust) -> u64 {
        let mut pte = leaf_base(addr, level, trust) | S2_MEMATTR_NORMAL;
        if perm.read {
            pte |= S2AP_READ;
        }
        if perm.write {
            pte |= S2AP_WRITE | DBM;
        }
        pte
    }

    fn tracks_dirty(pte: u64) -> bool {
        pte & DBM != 0
    }

    fn set_dirty(slot: &AtomicU64) {
        if has_dbm(slot) {
            slot.fetch_or(S2AP_WRITE, Ordering::AcqRel);
        }
    }

    fn clear_dirty(slot: &AtomicU64) {
        if has_dbm(slot) {
            slot.fetch_and(!S2AP_WRITE, Ordering::AcqRel);
        }
    }

    fn step(pte: u64, level: u32) -> Step {
        step_as::<Self>(Self::decode(pte, level), pte, level, Perm::RW)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pgtable::image::{ImageFault, ImageTranslation, walk_image};
    use crate::pgtable::{PageTable, pgsize_bitmap};
    use std::collections::BTreeMap;

    fn walk<F: Format>(image: &BTreeMap<u64, u64>, iova: u64) -> Result<ImageTranslation, ImageFault> {
        walk_image::<F>(0x1000, iova, &mut |a| Some(image.get(&a).copied().unwrap_or(0)))
    }

    fn leaf(addr: u64, shift: u32, perm: Perm, dirty: bool) -> Result<ImageTranslation, ImageFault> {
        Ok(ImageTranslation { addr, shift, perm, dirty })
    }

    #[test]
    fn golden_stage_1_entries() {
        // A 4 KiB read-only page: page type, AF, inner shareable, AP[1], AP[2].
        assert_eq!(
            ArmS1::leaf(0x8_0000_3000, 0, Perm::R, Trust::Direct),
            0x8_0000_3000 | 0b11 | 1 << 10 | 3 << 8 | 3 << 6
        );
        // A writable 2 MiB block: block type and DBM, AP[2] clear (dirty).
        let block = ArmS1::leaf(0x4020_0000, 1, Perm::RW, Trust::Direct);
        assert_eq!(block, 0x4020_0000 | 0b01 | 1 << 10 | 3 << 8 | 1 << 6 | 1 << 51);
        assert_eq!(
            ArmS1::decode(block, 1),
            Pte::Leaf { addr: 0x4020_0000, perm: Perm::RW, trust: Trust::Direct, dirty: true }
        );
        // Writable-clean: DBM with AP[2] set still admits writes.
        assert_eq!(
            ArmS1::decode(block | AP_RDONLY, 1),
            Pte::Leaf { addr: 0x4020_0000, perm: Perm::RW, trust: Trust::Direct, dirty: false }
        );
        // 0b01 at level 3 (ours 0) is reserved; 0b11 at level 0 (ours 3) a table.
        assert_eq!(ArmS1::decode(0x5000 | 0b01 | AF, 0), Pte::None);
        assert_eq!(ArmS1::decode(0x5000 | 0b01, 3), Pte::None, "no 512 GiB blocks with 4 KiB granules");
        assert_eq!(ArmS1::decode(0x5000 | 0b11, 3), Pte::Table(0x5000));
        assert_eq!(pgsize_bitmap::<ArmS1>(), 0x1000 | 0x20_0000 | 0x4000_0000);
        assert_eq!(ArmS1::iova_bits(), 48);
    }

    #[test]
    fn golden_stage_2_entries() {
        // A 4 KiB write-only page: S2AP write and DBM, no read; MemAttr normal.
        let page = ArmS2::leaf(0x9000, 0, Perm::W, Trust::Direct);
        assert_eq!(page, 0x9000 | 0b11 | 1 << 10 | 3 << 8 | 0xf << 2 | 1 << 7 | 1 << 51);
        assert_eq!(
            ArmS2::decode(page, 0),
            Pte::Leaf { addr: 0x9000, perm: Perm::W, trust: Trust::Direct, dirty: true }
        );
        let clean = page & !S2AP_WRITE;
        assert_eq!(
            ArmS2::decode(clean, 0),
            Pte::Leaf { addr: 0x9000, perm: Perm::W, trust: Trust::Direct, dirty: false }
        );
        // Without DBM a cleared write bit is read-only, not clean.
        let ro = ArmS2::leaf(0x9000, 0, Perm::R, Trust::Direct);
        assert_eq!(ArmS2::decode(ro, 0), Pte::Leaf { addr: 0x9000, perm: Perm::R, trust: Trust::Direct, dirty: false });
    }

    #[test]
    fn dirty_state_follows_dbm() {
        let s1 = AtomicU64::new(ArmS1::leaf(0x9000, 0, Perm::RW, Trust::Direct));
        ArmS1::clear_dirty(&s1);
        assert_eq!(s1.load(Ordering::Relaxed) & AP_RDONLY, AP_RDONLY, "writable-clean");
        ArmS1::set_dirty(&s1);
        assert_eq!(s1.load(Ordering::Relaxed) & AP_RDONLY, 0, "a write made it dirty");
        // A read-only leaf has no DBM: a stray set_dirty must not make it writable.
        let ro = AtomicU64::new(ArmS1::leaf(0x9000, 0, Perm::R, Trust::Direct));
        ArmS1::set_dirty(&ro);
        assert!(!ArmS1::perm(ro.load(Ordering::Relaxed)).write);
        let s2 = AtomicU64::new(ArmS2::leaf(0x9000, 0, Perm::R, Trust::Direct));
        ArmS2::set_dirty(&s2);
        assert_eq!(s2.load(Ordering::Relaxed) & S2AP_WRITE, 0, "read-only stage-2 leaf stays read-only");
    }

    /// A hand-built stage-1 image rooted at 0x1000: level 0 -> 1 at 0x2000,
    /// a 1 GiB block at IOVA 1 GiB, level 2 at 0x3000 under IOVA 0 holding a
    /// 2 MiB block and a level-3 table at 0x4000 under a table entry that
    /// forbids writes.
    fn stage_1_image() -> BTreeMap<u64, u64> {
        let mut m = BTreeMap::new();
        m.insert(0x1000, 0x2000 | 0b11);
        m.insert(0x2000, 0x3000 | 0b11);
        m.insert(0x2000 + 8, 0x8000_0000 | 0b01 | AF | DBM);
        m.insert(0x3000 + 8, 0x60_0000 | 0b01 | AF | AP_RDONLY);
        m.insert(0x3000 + 2 * 8, 0x4000 | 0b11 | AP_TABLE_RDONLY);
        m.insert(0x4000 + 7 * 8, 0x7_7000 | 0b11 | AF);
        m.insert(0x4000 + 8 * 8, 0x7_8000 | 0b11); // access flag clear
        m
    }

    #[test]
    fn golden_stage_1_walks() {
        let m = stage_1_image();
        assert_eq!(walk::<ArmS1>(&m, (1 << 30) + 0x1234), leaf(0x8000_1234, 30, Perm::RW, true));
        assert_eq!(walk::<ArmS1>(&m, (1 << 21) + 5), leaf(0x60_0005, 21, Perm::R, false));
        // APTable[1] above a writable page makes it read-only.
        assert_eq!(walk::<ArmS1>(&m, (2 << 21) + 0x7010), leaf(0x7_7010, 12, Perm::R, false));
        assert_eq!(walk::<ArmS1>(&m, (2 << 21) + 0x8000), Err(ImageFault::AccessFlag { level: 0 }));
        assert_eq!(walk::<ArmS1>(&m, (2 << 21) + 0x9000), Err(ImageFault::Translation { level: 0 }));
        assert_eq!(walk::<ArmS1>(&m, 2 << 30), Err(ImageFault::Translation { level: 2 }));
        assert_eq!(walk::<ArmS1>(&m, 1 << 48), Err(ImageFault::AddressSize));
    }

    #[test]
    fn golden_stage_2_walks() {
        let mut m = BTreeMap::new();
        m.insert(0x1000, 0x2000 | 0b11);
        m.insert(0x2000, 0x3000 | 0b11);
        m.insert(0x3000, 0x4000 | 0b11);
        m.insert(0x4000 + 8, 0x5_1000 | 0b11 | AF | S2AP_READ);
        m.insert(0x4000 + 2 * 8, 0x5_2000 | 0b11 | AF | S2AP_READ | DBM);
        m.insert(0x4000 + 3 * 8, 0x5_3000 | 0b11 | AF | S2AP_WRITE);
        assert_eq!(walk::<ArmS2>(&m, 0x1008), leaf(0x5_1008, 12, Perm::R, false));
        assert_eq!(walk::<ArmS2>(&m, 0x2008), leaf(0x5_2008, 12, Perm::RW, false), "writable-clean");
        assert_eq!(walk::<ArmS2>(&m, 0x3008), leaf(0x5_3008, 12, Perm::W, false));
        assert_eq!(walk::<ArmS2>(&m, 0x4008), Err(ImageFault::Translation { level: 0 }));
    }

    #[test]
    fn tables_ioasid_builds_dirty_and_clean_through_dbm() {
        let pt = PageTable::<ArmS2>::new();
        pt.map(0, 1 << 30, 0x2000, Perm::RW, Trust::Direct, false).unwrap();
        pt.map(0x2000, 1 << 30, 0x1000, Perm::R, Trust::Direct, false).unwrap();
        let g = crate::epoch::pin();
        let mut dirty = Vec::new();
        pt.read_and_clear_dirty(0, u64::MAX, false, &mut |a, len| dirty.push((a, len)));
        assert_eq!(dirty, [(0, 0x2000)], "new writable leaves start dirty, read-only ones clean");
        dirty.clear();
        pt.read_and_clear_dirty(0, u64::MAX, false, &mut |a, len| dirty.push((a, len)));
        assert!(dirty.is_empty());
        assert!(pt.walk(0x1000, &g).unwrap().perm.write, "clean leaves stay writable");
        assert!(pt.set_dirty(0x1000, &g));
        assert!(pt.set_dirty(0x2000, &g), "mapped, but without DBM it records nothing");
        pt.read_and_clear_dirty(0, u64::MAX, true, &mut |a, len| dirty.push((a, len)));
        assert_eq!(dirty, [(0x1000, 0x1000)]);
    }
}
