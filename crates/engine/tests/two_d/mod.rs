//! The model two-dimensional translation the nested proptests check
//! against: stage 1 maps guest IOVA pages to guest-physical pages, stage 2
//! maps guest-physical pages, each with a write right.

use std::collections::BTreeMap;

use ioasid_engine::{Context, DmaError, FaultReason, HostBuffer, Perm, Stage, Translated};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

const PAGE: u64 = 4096;

#[derive(Debug, Clone)]
pub enum Op {
    /// Stage 1: map IOVA page to GPA page (writable?), or unmap it.
    S1(u64, Option<(u64, bool)>),
    /// Stage 2: map a data GPA page (writable?), or unmap it.
    S2(u64, Option<bool>),
}

/// Changes to IOVA pages 0..32 and to data pages 16..`ram_pages` (the
/// pages below 16 hold the guest's tables).
pub fn op(ram_pages: u64) -> impl Strategy<Value = Op> {
    prop_oneof![
        (0..32u64, proptest::option::of((16..ram_pages, any::<bool>()))).prop_map(|(p, m)| Op::S1(p, m)),
        (16..ram_pages, proptest::option::of(any::<bool>())).prop_map(|(g, m)| Op::S2(g, m)),
    ]
}

#[derive(Debug, Default)]
pub struct Model {
    pub s1: BTreeMap<u64, (u64, bool)>,
    pub s2: BTreeMap<u64, bool>,
}

impl Model {
    /// Records `op` (the caller applies it to the real tables).
    pub fn apply(&mut self, op: &Op) {
        match *op {
            Op::S1(p, Some(m)) => drop(self.s1.insert(p, m)),
            Op::S1(p, None) => drop(self.s1.remove(&p)),
            Op::S2(g, Some(w)) => drop(self.s2.insert(g, w)),
            Op::S2(g, None) => drop(self.s2.remove(&g)),
        }
    }

    /// Applies stage-2 change `Op::S2(gp, m)` to the host's IOAS `ioas`,
    /// whose guest RAM is `ram`, and records it.
    pub fn stage_2(&mut self, ctx: &Context, ioas: ioasid_engine::IoasId, ram: &HostBuffer, gp: u64, m: Option<bool>) {
        if self.s2.contains_key(&gp) {
            ctx.unmap(ioas, gp * PAGE, PAGE).unwrap();
        }
        if let Some(w) = m {
            let perm = if w { Perm::RW } else { Perm::R };
            // SAFETY: the callers drop `ram` only after the context.
            unsafe { ctx.map_user(ioas, ram.addr() + gp * PAGE, PAGE, Some(gp * PAGE), perm).unwrap() };
        }
        self.apply(&Op::S2(gp, m));
    }

    /// Checks byte 8 of each of the 32 IOVA pages from `iova_base`, read
    /// and written, against the model; `ram` is the host address of
    /// guest-physical 0 and `translate` the device's translation.
    pub fn check(
        &self,
        iova_base: u64,
        ram: u64,
        translate: impl Fn(u64, Perm) -> Result<Translated, DmaError>,
    ) -> Result<(), TestCaseError> {
        for p in 0..32u64 {
            let iova = iova_base + p * PAGE + 8;
            for write in [false, true] {
                let got = translate(iova, if write { Perm::W } else { Perm::R });
                match self.expect(p, 8, write) {
                    Ok(gpa) => prop_assert_eq!(got.map(|t| t.host.0), Ok(ram + gpa)),
                    Err(reason) => {
                        let stage =
                            if matches!(reason, FaultReason::Stage2 { .. }) { Stage::Second } else { Stage::First };
                        prop_assert_eq!(got, Err(DmaError::Fault { iova, reason, write, pasid: None, stage }))
                    }
                }
            }
        }
        Ok(())
    }

    /// What an access to byte `offset` of IOVA page `p` gives: the
    /// guest-physical address, or the fault (naming the exact GPA).
    pub fn expect(&self, p: u64, offset: u64, write: bool) -> Result<u64, FaultReason> {
        let &(g, w1) = self.s1.get(&p).ok_or(FaultReason::NotPresent)?;
        if write && !w1 {
            return Err(FaultReason::Permission);
        }
        let gpa = g * PAGE + offset;
        match self.s2.get(&g) {
            None => Err(FaultReason::Stage2 { gpa, permission: false }),
            Some(&w2) if write && !w2 => Err(FaultReason::Stage2 { gpa, permission: true }),
            Some(_) => Ok(gpa),
        }
    }
}
