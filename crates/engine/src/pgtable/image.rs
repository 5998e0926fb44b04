//! Walks of table images that ioasid did not build: a guest's stage-1
//! tables, read through stage 2, and the hand-built images of the golden
//! tests. Entries are fetched through a callback, so the same walk serves
//! guest memory and test fixtures, and every format's oddities
//! ([`Format::step`]) are honoured.

use super::{Format, Perm, Step};

/// Where a walk ended up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageTranslation {
    /// The output address of the walked input address.
    pub addr: u64,
    /// log2 of the leaf's size.
    pub shift: u32,
    /// Rights of the leaf, within every limit the tables above it set.
    pub perm: Perm,
    /// The leaf's dirty state is set.
    pub dirty: bool,
}

/// Why a walk stopped, with the level (0: smallest pages) where it did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFault {
    /// No valid entry: a translation fault.
    Translation {
        /// Level of the entry that was not valid.
        level: u32,
    },
    /// A leaf whose access flag is clear, with no hardware to set it.
    AccessFlag {
        /// Level of the leaf.
        level: u32,
    },
    /// A table entry skipped levels, but the input address has bits set in
    /// the index of a skipped level.
    SkippedBits {
        /// Level of the table entry that skipped.
        level: u32,
    },
    /// The input address is wider than the format translates.
    AddressSize,
    /// The entry at `entry` could not be read (stage 2 faulted, or the image
    /// has nothing there).
    Read {
        /// Address of the entry, in the image's address space.
        entry: u64,
        /// Level of the table it is in.
        level: u32,
    },
}

/// Translates `input` through the table rooted at `root`; `read` fetches the
/// 8-byte entry at an address of the image. Generic over `read` so a nested
/// walk's reads through stage 2 inline into it (a `&mut dyn FnMut` works too).
#[inline]
pub fn walk_image<F: Format>(
    root: u64,
    input: u64,
    read: &mut (impl FnMut(u64) -> Option<u64> + ?Sized),
) -> Result<ImageTranslation, ImageFault> {
    walk_image_from::<F>(root, F::LEVELS - 1, input, read)
}

/// `walk_image` of a table whose root is at level `top`, as a smaller input
/// size gives (Arm's T0SZ); the input must fit that table.
#[inline]
pub fn walk_image_from<F: Format>(
    root: u64,
    top: u32,
    input: u64,
    read: &mut (impl FnMut(u64) -> Option<u64> + ?Sized),
) -> Result<ImageTranslation, ImageFault> {
    let bits = F::level_shift(top.min(F::LEVELS - 1)) + 9;
    if bits < 64 && input >> bits != 0 {
        return Err(ImageFault::AddressSize);
    }
    let index = |level: u32| (input >> F::level_shift(level)) & (super::ENTRIES as u64 - 1);
    let mut table = root;
    let mut level = top.min(F::LEVELS - 1);
    let mut limit = Perm::RW;
    loop {
        let entry = table + index(level) * 8;
        let pte = read(entry).ok_or(ImageFault::Read { entry, level })?;
        match F::step(pte, level) {
            Step::Invalid => return Err(ImageFault::Translation { level }),
            Step::Leaf { accessed: false, .. } => return Err(ImageFault::AccessFlag { level }),
            Step::Leaf { addr, shift, perm, dirty, .. } => {
                let perm = Perm { read: perm.read && limit.read, write: perm.write && limit.write };
                return Ok(ImageTranslation { addr: addr | (input & ((1u64 << shift) - 1)), shift, perm, dirty });
            }
            Step::Table { next, .. } if next >= level => return Err(ImageFault::Translation { level }),
            Step::Table { addr, next, limit: l } => {
                // Levels a table entry skips translate nothing: their index
                // bits of the input must be zero.
                if let Some(skipped) = (next + 1..level).find(|&s| index(s) != 0) {
                    return Err(ImageFault::SkippedBits { level: skipped });
                }
                limit = Perm { read: limit.read && l.read, write: limit.write && l.write };
                table = addr;
                level = next;
            }
        }
    }
}
