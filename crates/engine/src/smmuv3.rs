//! Arm SMMUv3 structures a guest hands to ioasid (SMMUv3 architecture
//! specification): the stream table entry of a nested HWPT, the context
//! descriptors it points to in guest memory, and the commands a guest's
//! command queue carries to a vIOMMU.

use crate::pgtable::Perm;
use crate::pgtable::arm::ArmS1;
use crate::pgtable::image::{ImageFault, walk_image_from};
use crate::{Error, Result};

/// Stream table entry fields (SMMUv3 5.2) a guest may set in a nested STE.
pub mod ste {
    /// Word 0.
    pub const V: u64 = 1;
    pub const CONFIG: u64 = 0b111 << 1;
    pub const CONFIG_ABORT: u64 = 0;
    pub const CONFIG_BYPASS: u64 = 0b100;
    pub const CONFIG_S1: u64 = 0b101;
    pub const S1FMT: u64 = 0b11 << 4;
    pub const S1_CONTEXT_PTR: u64 = ((1 << 52) - 1) & !((1 << 6) - 1);
    pub const S1CDMAX: u64 = 0x1f << 59;
    /// Word 1.
    pub const S1DSS: u64 = 0b11;
    pub const S1CIR: u64 = 0b11 << 2;
    pub const S1COR: u64 = 0b11 << 4;
    pub const S1CSH: u64 = 0b11 << 6;
    pub const S1STALLD: u64 = 1 << 27;
    pub const EATS: u64 = 0b11 << 28;
    pub const EATS_ABORT: u64 = 0;
    pub const EATS_TRANS: u64 = 1;

    pub const WORD0_ALLOWED: u64 = V | CONFIG | S1FMT | S1_CONTEXT_PTR | S1CDMAX;
    pub const WORD1_ALLOWED: u64 = S1DSS | S1CIR | S1COR | S1CSH | S1STALLD | EATS;
}

/// Context descriptor fields (SMMUv3 5.4), words 0 and 1.
pub mod cd {
    pub const T0SZ: u64 = 0x3f;
    pub const TG0: u64 = 0b11 << 6;
    pub const EPD0: u64 = 1 << 14;
    pub const V: u64 = 1 << 31;
    pub const AA64: u64 = 1 << 41;
    pub const ASID_SHIFT: u32 = 48;
    /// Word 1: TTB0.
    pub const TTB0: u64 = ((1 << 52) - 1) & !0xf;
    /// Bytes per descriptor.
    pub const SIZE: u64 = 64;
}

/// Checks a guest's STE as Linux does before installing it: `EIO` for any
/// field a nested STE may not set, a Config other than abort, bypass or
/// stage 1, or an EATS other than abort or translate. An STE that is not
/// valid becomes all zero (abort). EATS is the host's to set, so it is
/// cleared.
pub fn validate_ste(mut words: [u64; 2]) -> Result<[u64; 2]> {
    if words[0] & ste::V == 0 {
        return Ok([0; 2]);
    }
    if words[0] & !ste::WORD0_ALLOWED != 0 || words[1] & !ste::WORD1_ALLOWED != 0 {
        return Err(Error::Io("the STE sets a field a nested STE may not"));
    }
    let config = (words[0] & ste::CONFIG) >> 1;
    if ![ste::CONFIG_ABORT, ste::CONFIG_BYPASS, ste::CONFIG_S1].contains(&config) {
        return Err(Error::Io("the STE's Config is not abort, bypass or stage 1"));
    }
    let eats = (words[1] & ste::EATS) >> 28;
    if eats != ste::EATS_ABORT && eats != ste::EATS_TRANS {
        return Err(Error::Io("the STE's EATS is not abort or translate"));
    }
    words[1] &= !ste::EATS;
    Ok(words)
}

/// What a (validated) STE does with a stream's transactions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Config {
    Abort,
    /// Stage 2 alone.
    Bypass,
    /// Stage 1 through the linear CD table at guest-physical `cd_table`.
    Stage1 {
        cd_table: u64,
    },
}

pub fn config(words: [u64; 2]) -> Config {
    if words[0] & ste::V == 0 {
        return Config::Abort;
    }
    match (words[0] & ste::CONFIG) >> 1 {
        ste::CONFIG_BYPASS => Config::Bypass,
        ste::CONFIG_S1 => Config::Stage1 { cd_table: words[0] & ste::S1_CONTEXT_PTR },
        _ => Config::Abort,
    }
}

/// Why a stage-1 walk through a CD failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum S1Fault {
    /// The STE aborts the stream.
    Abort,
    /// The CD is not valid or not one this SMMU walks (AArch64, 4 KiB
    /// granule, TTB0 enabled): a bad CD.
    BadCd,
    /// Stage 1 has no translation, or the access flag is clear.
    Translation,
    /// Reading the guest's memory at `gpa` failed (stage 2).
    Read { gpa: u64 },
    /// A substream ID the STE has no descriptor for.
    BadSubstream,
}

/// Translates `iova` of substream `ssid` by an STE: returns the
/// guest-physical address and stage 1's rights. `read` fetches 8 bytes of
/// guest memory. Substreams beyond the STE's S1CDMax have no descriptor.
pub fn translate(
    words: [u64; 2],
    ssid: u32,
    iova: u64,
    read: &mut dyn FnMut(u64) -> Option<u64>,
) -> std::result::Result<(u64, Perm), S1Fault> {
    let cd_table = match config(words) {
        Config::Abort => return Err(S1Fault::Abort),
        Config::Bypass => return Ok((iova, Perm::RW)),
        Config::Stage1 { cd_table } => cd_table,
    };
    let cd_max = (words[0] & ste::S1CDMAX) >> 59;
    if u64::from(ssid) >> cd_max != 0 {
        return Err(S1Fault::BadSubstream);
    }
    let cd_table = cd_table + u64::from(ssid) * cd::SIZE;
    let word = |i: u64, read: &mut dyn FnMut(u64) -> Option<u64>| {
        let gpa = cd_table + i * 8;
        read(gpa).ok_or(S1Fault::Read { gpa })
    };
    let cd0 = word(0, read)?;
    let t0sz = (cd0 & cd::T0SZ) as u32;
    if cd0 & cd::V == 0
        || cd0 & cd::AA64 == 0
        || cd0 & cd::TG0 != 0
        || cd0 & cd::EPD0 != 0
        || !(16..=39).contains(&t0sz)
    {
        return Err(S1Fault::BadCd);
    }
    let ttb0 = word(1, read)? & cd::TTB0;
    // The input size sets where the walk starts: 4 levels above 39 bits.
    let input_bits = 64 - t0sz;
    if iova >> input_bits != 0 {
        return Err(S1Fault::Translation);
    }
    let top = (input_bits - 12).div_ceil(9) - 1;
    match walk_image_from::<ArmS1>(ttb0, top, iova, read) {
        Ok(t) => Ok((t.addr, t.perm)),
        Err(ImageFault::Read { entry, .. }) => Err(S1Fault::Read { gpa: entry }),
        Err(_) => Err(S1Fault::Translation),
    }
}

/// Event record types (SMMUv3 7.3).
pub const F_TRANSLATION: u64 = 0x10;
pub const F_ADDR_SIZE: u64 = 0x11;
pub const F_PERMISSION: u64 = 0x13;

/// The event record (SMMUv3 7.3) an SMMU writes for a fault no page
/// request covers, for the guest's event queue: type, the guest's StreamID
/// and the substream (SSV, SubstreamID) when the DMA had one, read/write
/// (RnW), whether stage 2 faulted (S2, with the IPA), the class (an input
/// address), and the input address.
pub fn event(vsid: u32, ssid: Option<u32>, fault: crate::DmaError) -> Option<[u64; 4]> {
    use crate::FaultReason;
    let crate::DmaError::Fault { iova, reason, write } = fault else { return None };
    let (kind, ipa) = match reason {
        FaultReason::NotPresent => (F_TRANSLATION, None),
        FaultReason::Permission => (F_PERMISSION, None),
        FaultReason::Aperture => (F_ADDR_SIZE, None),
        FaultReason::Stage2 { gpa, permission } => (if permission { F_PERMISSION } else { F_TRANSLATION }, Some(gpa)),
    };
    const RNW: u64 = 1 << 35;
    const S2: u64 = 1 << 39;
    const CLASS_IN: u64 = 0b10 << 40;
    let mut word1 = CLASS_IN;
    if !write {
        word1 |= RNW;
    }
    if ipa.is_some() {
        word1 |= S2;
    }
    let ipa = ipa.unwrap_or(0) & (((1 << 52) - 1) & !0xfff);
    const SSV: u64 = 1 << 11;
    let substream = ssid.map_or(0, |s| SSV | u64::from(s & 0xf_ffff) << 12);
    Some([kind | substream | u64::from(vsid) << 32, word1, iova, ipa])
}

/// A command from a guest's command queue (SMMUv3 4.1), as a vIOMMU
/// accepts it. Stream IDs are the guest's (virtual) ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// TLBI_NH_ALL, TLBI_NSNH_ALL (which Linux turns into TLBI_NH_ALL of
    /// the vIOMMU's VMID) and TLBI_S12_VMALL: everything of the guest's VMID.
    TlbiAll,
    TlbiAsid {
        asid: u16,
    },
    /// TLBI_NH_VA (one ASID) and TLBI_NH_VAA (`asid` None: all ASIDs).
    TlbiVa {
        asid: Option<u16>,
        addr: u64,
    },
    CfgiSte {
        sid: u32,
    },
    CfgiCd {
        sid: u32,
        ssid: u32,
    },
    CfgiCdAll {
        sid: u32,
    },
    AtcInv {
        sid: u32,
    },
}

pub const CMD_CFGI_STE: u8 = 0x03;
pub const CMD_CFGI_CD: u8 = 0x05;
pub const CMD_CFGI_CD_ALL: u8 = 0x06;
pub const CMD_TLBI_NH_ALL: u8 = 0x10;
pub const CMD_TLBI_NH_ASID: u8 = 0x11;
pub const CMD_TLBI_NH_VA: u8 = 0x12;
pub const CMD_TLBI_NH_VAA: u8 = 0x13;
pub const CMD_TLBI_S12_VMALL: u8 = 0x28;
pub const CMD_TLBI_NSNH_ALL: u8 = 0x30;
pub const CMD_ATC_INV: u8 = 0x40;

impl Command {
    /// Decodes one 16-byte command; `EIO` for opcodes a guest may not
    /// issue through a vIOMMU (the host issues its own syncs and stage-2
    /// invalidations). The VMID field is ignored: the vIOMMU has its own.
    pub fn decode(cmd: [u64; 2]) -> Result<Command> {
        let sid = (cmd[0] >> 32) as u32;
        let asid = (cmd[0] >> 48) as u16;
        Ok(match cmd[0] as u8 {
            CMD_TLBI_NH_ALL | CMD_TLBI_NSNH_ALL | CMD_TLBI_S12_VMALL => Command::TlbiAll,
            CMD_TLBI_NH_ASID => Command::TlbiAsid { asid },
            CMD_TLBI_NH_VA => Command::TlbiVa { asid: Some(asid), addr: cmd[1] & !0xfff },
            CMD_TLBI_NH_VAA => Command::TlbiVa { asid: None, addr: cmd[1] & !0xfff },
            CMD_CFGI_STE => Command::CfgiSte { sid },
            CMD_CFGI_CD => Command::CfgiCd { sid, ssid: ((cmd[0] >> 12) & 0xf_ffff) as u32 },
            CMD_CFGI_CD_ALL => Command::CfgiCdAll { sid },
            CMD_ATC_INV => Command::AtcInv { sid },
            _ => return Err(Error::Io("a command a vIOMMU does not take")),
        })
    }

    /// The guest stream ID the command names, if any.
    pub fn sid(self) -> Option<u32> {
        match self {
            Command::CfgiSte { sid } | Command::CfgiCd { sid, .. } | Command::CfgiCdAll { sid } => Some(sid),
            Command::AtcInv { sid } => Some(sid),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pgtable::arm::{AF, AP_RDONLY};
    use std::collections::BTreeMap;

    const S1: u64 = ste::V | ste::CONFIG_S1 << 1;

    #[test]
    fn stes_are_checked_as_linux_checks_them() {
        assert_eq!(validate_ste([0x1234 << 6, 5]), Ok([0, 0]), "not valid: abort, zeroed");
        assert_eq!(validate_ste([S1 | 0x4000, 0]), Ok([S1 | 0x4000, 0]));
        assert!(matches!(validate_ste([S1 | 1 << 52, 0]), Err(Error::Io(_))), "a reserved word-0 bit");
        assert!(matches!(validate_ste([ste::V | 0b110 << 1, 0]), Err(Error::Io(_))), "stage-2 Config");
        assert!(matches!(validate_ste([S1, 1 << 8]), Err(Error::Io(_))), "a word-1 field not allowed");
        assert!(matches!(validate_ste([S1, 2 << 28]), Err(Error::Io(_))), "EATS split-stage");
        assert_eq!(validate_ste([S1, 1 << 28 | 1]), Ok([S1, 1]), "EATS is the host's");
        assert_eq!(config([ste::V | ste::CONFIG_BYPASS << 1, 0]), Config::Bypass);
    }

    #[test]
    fn commands_decode_and_unknown_ones_are_eio() {
        assert_eq!(
            Command::decode([0x12 | 7 << 48, 0x4000_1001]),
            Ok(Command::TlbiVa { asid: Some(7), addr: 0x4000_1000 })
        );
        assert_eq!(Command::decode([0x05 | 9 << 32 | 3 << 12, 1]), Ok(Command::CfgiCd { sid: 9, ssid: 3 }));
        assert_eq!(Command::decode([0x28 | 5 << 32, 0]), Ok(Command::TlbiAll));
        assert_eq!(Command::decode([0x30, 0]), Ok(Command::TlbiAll), "NSNH_ALL: the guest's whole VMID");
        assert_eq!(Command::decode([0x03 | 2 << 32, 0]).unwrap().sid(), Some(2));
        assert!(matches!(Command::decode([0x46, 0]), Err(Error::Io(_))), "CMD_SYNC is the host's");
    }

    /// Guest memory: a CD table at 0x1000 whose CD 0 has a 48-bit TTB0 at
    /// 0x2000 (levels at 0x2000, 0x3000, 0x4000, 0x5000) mapping IOVA
    /// 0x40_0000 to 0x9000 read-only.
    fn guest(t0sz: u64) -> BTreeMap<u64, u64> {
        let mut m = BTreeMap::new();
        m.insert(0x1000, cd::V | cd::AA64 | t0sz | 5 << cd::ASID_SHIFT);
        m.insert(0x1008, 0x2000);
        m.insert(0x2000, 0x3000 | 0b11);
        m.insert(0x3000, 0x4000 | 0b11);
        m.insert(0x4000 + 2 * 8, 0x5000 | 0b11);
        m.insert(0x5000, 0x9000 | 0b11 | AF | AP_RDONLY);
        m
    }

    #[test]
    fn stage_1_walks_through_the_cd() {
        let m = guest(16);
        let mut read = |a: u64| m.get(&a).copied().or(Some(0));
        let s1 = [S1 | 0x1000, 0];
        assert_eq!(translate(s1, 0, 0x40_0123, &mut read), Ok((0x9123, Perm::R)));
        assert_eq!(translate(s1, 0, 0x40_1000, &mut read), Err(S1Fault::Translation));
        assert_eq!(translate([ste::V | ste::CONFIG_BYPASS << 1, 0], 0, 0x77, &mut read), Ok((0x77, Perm::RW)));
        assert_eq!(translate([0, 0], 0, 0x77, &mut read), Err(S1Fault::Abort));
        // A 39-bit input starts at level 1: TTB0 is then the level-1 table.
        let mut m = guest(25);
        m.insert(0x1008, 0x3000);
        let mut read = |a: u64| m.get(&a).copied().or(Some(0));
        assert_eq!(translate(s1, 0, 0x40_0123, &mut read), Ok((0x9123, Perm::R)));
        assert_eq!(translate(s1, 0, 1 << 39, &mut read), Err(S1Fault::Translation), "beyond T0SZ");
        // A CD that is not valid, and guest memory that cannot be read.
        let mut read = |a: u64| if a == 0x1000 { Some(0) } else { None };
        assert_eq!(translate(s1, 0, 0, &mut read), Err(S1Fault::BadCd));
        let mut read = |_| None;
        assert_eq!(translate(s1, 0, 0, &mut read), Err(S1Fault::Read { gpa: 0x1000 }));
        // Substream 1 needs S1CDMax of at least 1, and reads the second CD.
        assert_eq!(translate(s1, 1, 0, &mut read), Err(S1Fault::BadSubstream));
        let s1_two = [s1[0] | 1 << 59, 0];
        assert_eq!(translate(s1_two, 1, 0, &mut read), Err(S1Fault::Read { gpa: 0x1040 }));
        assert_eq!(translate(s1_two, 2, 0, &mut read), Err(S1Fault::BadSubstream));
    }
}
