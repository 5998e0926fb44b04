//! Nested translation: a guest-owned VT-d first-stage table, in guest
//! memory mapped by the parent's IOAS, over the host's second stage.

use std::sync::Arc;

use ioasid_engine::pgtable::x86::first_stage::encode;
use ioasid_engine::{
    Context, ContextConfig, DeviceInfo, DmaError, FaultReason, HostBuffer, HwptFlags, Limit, NestedData, Perm,
};
use ioasid_engine::{DeviceId, HwptNestedId, IoasId};

const PAGE: u64 = 4096;
/// Guest RAM: 64 pages at guest-physical 0 (stage 2 maps GPA = IOVA).
const RAM_PAGES: u64 = 64;

struct Guest {
    ctx: Arc<Context>,
    ioas: IoasId,
    dev: DeviceId,
    nested: HwptNestedId,
    ram: HostBuffer,
}

impl Guest {
    /// Writes a stage-1 entry into guest memory, as the guest would.
    fn write_entry(&self, table_gpa: u64, index: u64, pte: u64) {
        self.ram.write_at((table_gpa + index * 8) as usize, &pte.to_le_bytes());
    }

    /// Maps guest IOVA `iova` (4 KiB) to guest-physical `gpa` through a
    /// 4-level table rooted at 0x1000 (tables at 0x2000, 0x3000, 0x4000).
    fn map4k(&self, iova: u64, gpa: u64, write: bool) {
        let idx = |level: u32| (iova >> (12 + 9 * level)) & 511;
        self.write_entry(0x1000, idx(3), encode(0x2000, 3, false, true));
        self.write_entry(0x2000, idx(2), encode(0x3000, 2, false, true));
        self.write_entry(0x3000, idx(1), encode(0x4000, 1, false, true));
        self.write_entry(0x4000, idx(0), encode(gpa, 0, true, write));
    }
}

fn guest() -> Guest {
    let ctx = Arc::new(Context::with_config(ContextConfig::isolated(Limit::Pages(1 << 20))));
    let ioas = ctx.ioas_alloc().unwrap();
    let dev = ctx.bind_device(DeviceInfo::new("vf", 1)).unwrap();
    let ram = HostBuffer::new((RAM_PAGES * PAGE) as usize).unwrap();
    // SAFETY: `ram` lives in the returned struct, beside the context.
    unsafe { ctx.map_user(ioas, ram.addr(), RAM_PAGES * PAGE, Some(0), Perm::RW).unwrap() };
    let parent = ctx.hwpt_alloc(dev, ioas, HwptFlags { nest_parent: true, dirty_tracking: false }, None).unwrap();
    let nested = ctx.hwpt_alloc_nested(dev, parent, NestedData::vtd_s1(0x1000, 4), None).unwrap();
    ctx.attach(dev, nested).unwrap();
    Guest { ctx, ioas, dev, nested, ram }
}

fn fault_reason(r: Result<(), DmaError>) -> FaultReason {
    match r {
        Err(DmaError::Fault { reason, .. }) => reason,
        other => panic!("expected a fault, got {other:?}"),
    }
}

#[test]
fn dma_goes_through_both_stages() {
    let g = guest();
    g.map4k(0x40_0000, 0x10000, true);
    let dev = g.ctx.get(g.dev).unwrap();
    dev.dma_write(0x40_0010, b"nested").unwrap();
    let mut seen = [0u8; 6];
    g.ram.read_at(0x10010, &mut seen);
    assert_eq!(&seen, b"nested", "landed at guest-physical 0x10010");
}

#[test]
fn rights_are_intersected_and_faults_name_their_stage() {
    let g = guest();
    g.map4k(0x40_0000, 0x10000, false);
    let dev = g.ctx.get(g.dev).unwrap();
    let mut buf = [0u8; 4];
    dev.dma_read(0x40_0000, &mut buf).unwrap();
    assert_eq!(fault_reason(dev.dma_write(0x40_0000, b"x")), FaultReason::Permission, "stage 1 is read-only");
    assert_eq!(fault_reason(dev.dma_write(0x50_0000, b"x")), FaultReason::NotPresent, "stage 1 maps nothing");
    // Stage 1 points beyond guest RAM: stage 2 faults, at that GPA.
    g.map4k(0x40_1000, (RAM_PAGES + 10) * PAGE, true);
    assert_eq!(
        fault_reason(dev.dma_write(0x40_1000, b"x")),
        FaultReason::Stage2 { gpa: (RAM_PAGES + 10) * PAGE, permission: false }
    );
}

#[test]
fn a_changed_stage_1_is_seen_only_after_invalidation() {
    let g = guest();
    g.map4k(0x40_0000, 0x10000, true);
    let dev = g.ctx.get(g.dev).unwrap();
    dev.dma_write(0x40_0000, b"a").unwrap();
    // The guest remaps without invalidating: the IOTLB still holds the old
    // translation, as hardware would.
    g.map4k(0x40_0000, 0x11000, true);
    dev.dma_write(0x40_0000, b"b").unwrap();
    let mut v = [0u8; 1];
    g.ram.read_at(0x10000, &mut v);
    assert_eq!(&v, b"b", "stale until invalidated");
    let Ok(n) = g.ctx.get(g.nested) else { panic!("not nested") };
    n.invalidate();
    dev.dma_write(0x40_0000, b"c").unwrap();
    g.ram.read_at(0x11000, &mut v);
    assert_eq!(&v, b"c", "the new translation after invalidation");
}

#[test]
fn a_stage_2_unmap_invalidates_combined_translations() {
    let g = guest();
    g.map4k(0x40_0000, 0x10000, true);
    let dev = g.ctx.get(g.dev).unwrap();
    dev.dma_write(0x40_0000, b"a").unwrap();
    g.ctx.unmap(g.ioas, 0, u64::MAX).unwrap();
    assert!(matches!(fault_reason(dev.dma_write(0x40_0000, b"x")), FaultReason::Stage2 { .. }));
}

mod two_d;

mod model {
    use super::two_d::{Model, Op, op};
    use super::*;
    use proptest::prelude::*;

    /// Guest IOVA pages 0..32 (all under one stage-1 leaf table), data at
    /// guest-physical pages 16..64.
    const IOVA_BASE: u64 = 0x40_0000;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        #[test]
        fn two_dimensional_translation_matches_a_model(ops in proptest::collection::vec(op(RAM_PAGES), 1..40)) {
            let ctx = Arc::new(Context::with_config(ContextConfig::isolated(Limit::Pages(1 << 20))));
            let ioas = ctx.ioas_alloc().unwrap();
            let dev = ctx.bind_device(DeviceInfo::new("vf", 1)).unwrap();
            let ram = HostBuffer::new((RAM_PAGES * PAGE) as usize).unwrap();
            // Stage 2 always maps the table pages (GPA 0..16 pages).
            // SAFETY: `ram` outlives the context (dropped after it).
            unsafe { ctx.map_user(ioas, ram.addr(), 16 * PAGE, Some(0), Perm::RW).unwrap() };
            let parent = ctx.hwpt_alloc(dev, ioas, HwptFlags { nest_parent: true, dirty_tracking: false }, None).unwrap();
            let nested = ctx.hwpt_alloc_nested(dev, parent, NestedData::vtd_s1(0x1000, 4), None).unwrap();
            ctx.attach(dev, nested).unwrap();
            let Ok(hwpt) = ctx.get(nested) else { panic!() };
            let g = Guest { ctx: ctx.clone(), ioas, dev, nested, ram };
            // Build the upper levels once with an unmapped leaf table.
            g.map4k(IOVA_BASE, 16 * PAGE, true);
            g.write_entry(0x4000, (IOVA_BASE >> 12) & 511, 0);
            let device = ctx.get(dev).unwrap();
            let mut model = Model::default();
            for op in ops {
                match op {
                    Op::S1(p, m) => {
                        let idx = ((IOVA_BASE >> 12) + p) & 511;
                        let pte = m.map_or(0, |(gp, w)| encode(gp * PAGE, 0, true, w));
                        g.write_entry(0x4000, idx, pte);
                        hwpt.invalidate();
                        model.apply(&Op::S1(p, m));
                    }
                    Op::S2(gp, m) => model.stage_2(&ctx, ioas, &g.ram, gp, m),
                }
                model.check(IOVA_BASE, g.ram.addr(), |iova, need| device.port(None).translate(iova, need, &ioasid_engine::epoch::pin()))?;
            }
            drop(device);
            drop(hwpt);
            drop(g);
        }
    }
}
