//! Nested translation on an Arm SMMUv3: the guest's stream table entry
//! points at context descriptors in guest memory, whose TTB0 is a stage-1
//! table walked through the host's stage 2; the guest's commands
//! (TLBI, CFGI) reach the vIOMMU, and nothing stale survives them.

use std::sync::Arc;

use ioasid_engine::pgtable::arm::{AF, AP_RDONLY};
use ioasid_engine::smmuv3::{cd, ste};
use ioasid_engine::{
    ConfigFault, Context, ContextConfig, DeviceInfo, DmaError, Error, FaultReason, HostBuffer, HwptFlags, IommuModel,
    Limit, NestedData, Perm, ViommuType,
};
use ioasid_engine::{DeviceId, HwptNestedId, IoasId, ViommuId};

const PAGE: u64 = 4096;
const RAM_PAGES: u64 = 64;
const VSID: u32 = 0x42;
const CD_TABLE: u64 = 0x1000;

struct Guest {
    ctx: Arc<Context>,
    ioas: IoasId,
    dev: DeviceId,
    viommu: ViommuId,
    ram: HostBuffer,
}

impl Guest {
    fn put(&self, gpa: u64, value: u64) {
        self.ram.write_at(gpa as usize, &value.to_le_bytes());
    }

    /// Writes CD 0: valid, AArch64, 4 KiB granule, 48-bit input, `asid`, TTB0.
    fn write_cd(&self, ttb0: u64, asid: u64) {
        self.put(CD_TABLE, cd::V | cd::AA64 | 16 | asid << cd::ASID_SHIFT);
        self.put(CD_TABLE + 8, ttb0);
    }

    /// Maps 4 KiB at `iova` to `gpa` in the table at `ttb0` (next levels at
    /// `ttb0 + 0x1000`, `+ 0x2000`, `+ 0x3000`).
    fn map(&self, ttb0: u64, iova: u64, gpa: u64, write: bool) {
        let idx = |level: u32| (iova >> (12 + 9 * level)) & 511;
        self.put(ttb0 + idx(3) * 8, (ttb0 + 0x1000) | 0b11);
        self.put(ttb0 + 0x1000 + idx(2) * 8, (ttb0 + 0x2000) | 0b11);
        self.put(ttb0 + 0x2000 + idx(1) * 8, (ttb0 + 0x3000) | 0b11);
        let rights = if write { 0 } else { AP_RDONLY };
        self.put(ttb0 + 0x3000 + idx(0) * 8, gpa | 0b11 | AF | rights);
    }

    fn nested(&self, words: [u64; 2]) -> HwptNestedId {
        let data = NestedData::arm_smmuv3(words).unwrap();
        let id = self.ctx.hwpt_alloc_nested(self.dev, self.viommu, data, None).unwrap();
        let dev = self.ctx.get(self.dev).unwrap();
        if dev.attached().is_some() { self.ctx.replace(self.dev, id) } else { self.ctx.attach(self.dev, id) }.unwrap();
        id
    }

    fn command(&self, cmd: [u64; 2]) -> Result<(), Error> {
        self.ctx.get(self.viommu).unwrap().invalidate(cmd)
    }

    fn read_ram(&self, gpa: u64) -> u8 {
        let mut b = [0u8; 1];
        self.ram.read_at(gpa as usize, &mut b);
        b[0]
    }
}

const S1: [u64; 2] = [ste::V | ste::CONFIG_S1 << 1 | CD_TABLE, 0];

fn guest() -> Guest {
    guest_with(DeviceInfo::behind(IommuModel::ArmSmmuV3, "smmu-vf", 1))
}

fn guest_with(info: DeviceInfo) -> Guest {
    let ctx = Arc::new(Context::with_config(ContextConfig::isolated(Limit::Pages(1 << 20))));
    let ioas = ctx.ioas_alloc().unwrap();
    let ram = HostBuffer::new((RAM_PAGES * PAGE) as usize).unwrap();
    // SAFETY: `ram` lives in the returned struct, beside the context.
    unsafe { ctx.map_user(ioas, ram.addr(), RAM_PAGES * PAGE, Some(0), Perm::RW).unwrap() };
    let dev = ctx.bind_device(info).unwrap();
    let parent = ctx.hwpt_alloc(dev, ioas, HwptFlags { nest_parent: true, dirty_tracking: false }, None).unwrap();
    let viommu = ctx.viommu_alloc(dev, parent, ViommuType::ArmSmmuV3).unwrap();
    ctx.vdevice_alloc(viommu, dev, u64::from(VSID)).unwrap();
    Guest { ctx, ioas, dev, viommu, ram }
}

fn fault(r: Result<(), DmaError>) -> FaultReason {
    match r {
        Err(DmaError::Fault { reason, .. }) => reason,
        other => panic!("expected a fault, got {other:?}"),
    }
}

#[test]
fn dma_goes_through_the_cd_and_both_stages() {
    let g = guest();
    g.write_cd(0x10000, 1);
    g.map(0x10000, 0x40_0000, 0x20000, true);
    g.map(0x10000, 0x40_1000, 0x21000, false);
    g.nested(S1);
    let dev = g.ctx.get(g.dev).unwrap();
    dev.dma_write(0x40_0010, b"s").unwrap();
    assert_eq!(g.read_ram(0x20010), b's');
    assert_eq!(fault(dev.dma_write(0x40_1000, b"x")), FaultReason::Permission, "stage 1 is read-only");
    assert_eq!(fault(dev.dma_write(0x50_0000, b"x")), FaultReason::NotPresent);
    // Stage 1 names guest memory stage 2 does not map.
    g.map(0x10000, 0x40_2000, (RAM_PAGES + 1) * PAGE, true);
    assert_eq!(
        fault(dev.dma_write(0x40_2000, b"x")),
        FaultReason::Stage2 { gpa: (RAM_PAGES + 1) * PAGE, permission: false }
    );
    g.ctx.unmap(g.ioas, 0, u64::MAX).unwrap();
    assert!(matches!(fault(dev.dma_write(0x40_0010, b"x")), FaultReason::Stage2 { .. }), "stage 2 went away");
}

#[test]
fn tlbi_and_cfgi_drop_what_they_must() {
    let g = guest();
    g.write_cd(0x10000, 1);
    g.map(0x10000, 0x40_0000, 0x20000, true);
    g.nested(S1);
    let dev = g.ctx.get(g.dev).unwrap();
    dev.dma_write(0x40_0000, b"a").unwrap();
    // A remap without a TLBI: the SMMU's TLB still holds the old page.
    g.map(0x10000, 0x40_0000, 0x22000, true);
    dev.dma_write(0x40_0000, b"b").unwrap();
    assert_eq!(g.read_ram(0x20000), b'b', "stale until invalidated");
    g.command([u64::from(ioasid_engine::smmuv3::CMD_TLBI_NH_VA) | 1 << 48, 0x40_0000]).unwrap();
    dev.dma_write(0x40_0000, b"c").unwrap();
    assert_eq!(g.read_ram(0x22000), b'c', "TLBI_NH_VA");
    // A new CD (another table) is read only after CFGI_CD for the stream.
    g.map(0x30000, 0x40_0000, 0x23000, true);
    g.write_cd(0x30000, 2);
    dev.dma_write(0x40_0000, b"d").unwrap();
    assert_eq!(g.read_ram(0x22000), b'd', "the old CD's translation, still cached");
    assert!(matches!(g.command([0x05 | 0x99 << 32, 1]), Err(Error::Io(_))), "no vDEVICE has stream 0x99");
    g.command([0x05 | u64::from(VSID) << 32, 1]).unwrap();
    dev.dma_write(0x40_0000, b"e").unwrap();
    assert_eq!(g.read_ram(0x23000), b'e', "CFGI_CD");
    // TLBI of the whole VMID (NH_ALL) reaches every nested table of the vIOMMU.
    g.map(0x30000, 0x40_0000, 0x24000, true);
    g.command([0x10, 0]).unwrap();
    dev.dma_write(0x40_0000, b"f").unwrap();
    assert_eq!(g.read_ram(0x24000), b'f', "TLBI_NH_ALL");
    assert!(matches!(g.command([0x46, 0]), Err(Error::Io(_))), "CMD_SYNC is the host's");
    assert!(matches!(g.command([0x28, 0]), Err(Error::Io(_))), "TLBI_S12_VMALL is the host's");
    assert!(matches!(g.command([0x40 | u64::from(VSID) << 32, 0]), Err(Error::Io(_))), "ATC_INV: no ATS");
}

#[test]
fn bypass_and_abort_stes() {
    let g = guest();
    g.nested([ste::V | ste::CONFIG_BYPASS << 1, 0]);
    let dev = g.ctx.get(g.dev).unwrap();
    dev.dma_write(0x3000, b"p").unwrap();
    assert_eq!(g.read_ram(0x3000), b'p', "bypass: stage 2 alone");
    g.nested([ste::V, 0]);
    assert_eq!(fault(dev.dma_write(0x3000, b"x")), FaultReason::Config(ConfigFault::Abort), "Config abort");
    g.nested([0, 0]);
    assert_eq!(fault(dev.dma_write(0x3000, b"x")), FaultReason::Config(ConfigFault::BadSte), "not valid");
}

#[test]
fn smmu_nesting_needs_its_viommu_and_a_valid_ste() {
    let g = guest();
    assert!(matches!(NestedData::arm_smmuv3([ste::V | 0b110 << 1, 0]), Err(Error::Io(_))));
    let parent = g.ctx.hwpt_alloc(g.dev, g.ioas, HwptFlags { nest_parent: true, dirty_tracking: false }, None).unwrap();
    let data = NestedData::arm_smmuv3(S1).unwrap();
    assert!(matches!(g.ctx.hwpt_alloc_nested(g.dev, parent, data, None), Err(Error::Unsupported(_))));
    let vtd = g.ctx.bind_device(DeviceInfo::new("vtd", 2)).unwrap();
    let vtd_parent =
        g.ctx.hwpt_alloc(vtd, g.ioas, HwptFlags { nest_parent: true, dirty_tracking: false }, None).unwrap();
    assert!(matches!(g.ctx.viommu_alloc(vtd, vtd_parent, ViommuType::ArmSmmuV3), Err(Error::Unsupported(_))));
}

#[test]
fn faults_reach_the_guests_event_queue_as_smmu_event_records() {
    use ioasid_engine::veventq::VEVENTQ_TYPE_ARM_SMMUV3;
    let g = guest();
    let (_, queue) = g.ctx.veventq_alloc(g.viommu, VEVENTQ_TYPE_ARM_SMMUV3, 8).unwrap();
    g.write_cd(0x10000, 1);
    g.map(0x10000, 0x40_1000, 0x21000, false);
    g.map(0x10000, 0x40_2000, (RAM_PAGES + 3) * PAGE, true);
    g.nested(S1);
    let dev = g.ctx.get(g.dev).unwrap();
    dev.dma_write(0x40_1008, b"x").unwrap_err();
    dev.dma_read(0x40_2000, &mut [0u8; 4]).unwrap_err();
    let events = queue.read(4096).unwrap();
    let words = |i: usize| -> Vec<u64> {
        events[i].data.chunks(8).map(|c| u64::from_le_bytes(c.try_into().unwrap())).collect()
    };
    // F_PERMISSION on a write (RnW clear) by stream 0x42, at the input address.
    assert_eq!(words(0), [0x13 | u64::from(VSID) << 32, 0b10 << 40, 0x40_1008, 0]);
    // The stage-2 fault is the host's: counted, never the guest's event.
    assert_eq!(events.len(), 1, "no stage-2 event");
    assert_eq!(dev.unrecoverable_faults(), 2);
}

/// Every stage-1 condition Linux forwards has its own event code: the
/// guest's STE and CD errors, a substream it has no CD for, a clear access
/// flag; an aborting STE records nothing.
#[test]
fn each_stage_1_condition_reaches_the_guest_with_its_event_code() {
    use ioasid_engine::smmuv3::{C_BAD_CD, C_BAD_STE, C_BAD_SUBSTREAMID, F_ACCESS, F_STREAM_DISABLED};
    use ioasid_engine::veventq::VEVENTQ_TYPE_ARM_SMMUV3;
    let g = guest();
    let (_, queue) = g.ctx.veventq_alloc(g.viommu, VEVENTQ_TYPE_ARM_SMMUV3, 16).unwrap();
    let dev = g.ctx.get(g.dev).unwrap();
    let sid = u64::from(VSID) << 32;
    let next = || {
        let e = queue.read(4096).unwrap();
        assert_eq!(e.len(), 1);
        let w: Vec<u64> = e[0].data.chunks(8).map(|c| u64::from_le_bytes(c.try_into().unwrap())).collect();
        (w[0], w[1], w[2])
    };
    g.nested([0, 0]);
    dev.dma_read(0x3000, &mut [0]).unwrap_err();
    assert_eq!(next(), (C_BAD_STE | sid, 0, 0), "an STE that is not valid");
    g.nested([ste::V, 0]);
    dev.dma_read(0x3000, &mut [0]).unwrap_err();
    assert!(queue.read(4096).unwrap().is_empty(), "Config abort: no event");
    // Substreams enabled (S1CDMax 1), S1DSS terminate: DMA without a PASID is refused.
    g.write_cd(0x10000, 1);
    g.nested([S1[0] | 1 << 59, 0]);
    dev.dma_read(0x40_0000, &mut [0]).unwrap_err();
    assert_eq!(next(), (F_STREAM_DISABLED | sid, 0, 0));
    dev.dma_read_pasid(5, 0x40_0000, &mut [0]).unwrap_err();
    assert_eq!(next(), (C_BAD_SUBSTREAMID | 1 << 11 | 5 << 12 | sid, 0, 0), "beyond S1CDMax");
    dev.dma_read_pasid(1, 0x40_0000, &mut [0]).unwrap_err();
    assert_eq!(next(), (C_BAD_CD | 1 << 11 | 1 << 12 | sid, 0, 0), "CD 1 is all zero");
    // A leaf without its access flag.
    g.nested(S1);
    g.map(0x10000, 0x40_0000, 0x20000, true);
    g.put(0x10000 + 0x3000, 0x20000 | 0b11);
    dev.dma_write(0x40_0000, b"x").unwrap_err();
    assert_eq!(next(), (F_ACCESS | sid, 0b10 << 40, 0x40_0000));
    assert_eq!(dev.unrecoverable_faults(), 6);
}

/// Exec and privileged requests, as the device's PASID capability allows
/// them: an event record sets InD and PnU.
#[test]
fn exec_and_privileged_requests_mark_the_event_record() {
    use ioasid_engine::fault::DmaAttrs;
    use ioasid_engine::veventq::VEVENTQ_TYPE_ARM_SMMUV3;
    let base = DeviceInfo::behind(IommuModel::ArmSmmuV3, "vf", 1);
    let g = guest_with(DeviceInfo { pasid_exec: true, pasid_priv: true, ..base });
    let (_, queue) = g.ctx.veventq_alloc(g.viommu, VEVENTQ_TYPE_ARM_SMMUV3, 8).unwrap();
    // CD 1 of two: nothing mapped.
    g.put(CD_TABLE + cd::SIZE, cd::V | cd::AA64 | 16 | 2 << cd::ASID_SHIFT);
    g.put(CD_TABLE + cd::SIZE + 8, 0x30000);
    g.nested([S1[0] | 1 << 59, 0]);
    let device = g.ctx.get(g.dev).unwrap();
    let attrs = DmaAttrs { exec: true, privileged: true };
    device.dma_read_pasid_with(1, 0x1000, &mut [0], attrs).unwrap_err();
    device.dma_read_pasid_with(1, 0x1000, &mut [0], DmaAttrs { exec: false, privileged: true }).unwrap_err();
    let e = queue.read(4096).unwrap();
    let word1 = |i: usize| u64::from_le_bytes(e[i].data[8..16].try_into().unwrap());
    assert_eq!(word1(0), 1 << 33 | 1 << 34 | 1 << 35 | 0b10 << 40, "PnU, InD, a read");
    assert_eq!(word1(1), 1 << 33 | 1 << 35 | 0b10 << 40, "PnU alone");
    // A device whose PASID capability lacks Execute never asks for it.
    let g = guest_with(DeviceInfo { pasid_priv: true, ..DeviceInfo::behind(IommuModel::ArmSmmuV3, "vf", 1) });
    let (_, queue) = g.ctx.veventq_alloc(g.viommu, VEVENTQ_TYPE_ARM_SMMUV3, 8).unwrap();
    g.put(CD_TABLE + cd::SIZE, cd::V | cd::AA64 | 16 | 2 << cd::ASID_SHIFT);
    g.put(CD_TABLE + cd::SIZE + 8, 0x30000);
    g.nested([S1[0] | 1 << 59, 0]);
    g.ctx.get(g.dev).unwrap().dma_read_pasid_with(1, 0x1000, &mut [0], attrs).unwrap_err();
    let e = queue.read(4096).unwrap();
    assert_eq!(u64::from_le_bytes(e[0].data[..8].try_into().unwrap()) & 0xff, 0x10, "F_TRANSLATION");
    assert_eq!(u64::from_le_bytes(e[0].data[8..16].try_into().unwrap()), 1 << 33 | 1 << 35 | 0b10 << 40, "no InD");
}

mod two_d;

mod model {
    use super::two_d::{Model, Op, op};
    use super::*;
    use proptest::prelude::*;

    /// Guest IOVA pages 0..32 under one stage-1 leaf table; tables in the
    /// first 16 guest pages (always mapped by stage 2), data pages 16..64.
    const IOVA_BASE: u64 = 0x40_0000;
    const TTB0: u64 = 0x2000;
    const LEAF_TABLE: u64 = TTB0 + 0x3000;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        /// Random stage-1 (guest table, then TLBI_NH_VA) and stage-2 (host
        /// map and unmap) changes; after each, every page translates as the
        /// model says, faults naming the stage and address that failed.
        #[test]
        fn smmu_two_dimensional_translation_matches_a_model(ops in proptest::collection::vec(op(RAM_PAGES), 1..40)) {
            let ctx = Arc::new(Context::with_config(ContextConfig::isolated(Limit::Pages(1 << 20))));
            let ioas = ctx.ioas_alloc().unwrap();
            let ram = HostBuffer::new((RAM_PAGES * PAGE) as usize).unwrap();
            // SAFETY: `ram` outlives the context (dropped after it).
            unsafe { ctx.map_user(ioas, ram.addr(), 16 * PAGE, Some(0), Perm::RW).unwrap() };
            let dev = ctx.bind_device(DeviceInfo::behind(IommuModel::ArmSmmuV3, "vf", 1)).unwrap();
            let parent = ctx.hwpt_alloc(dev, ioas, HwptFlags { nest_parent: true, dirty_tracking: false }, None).unwrap();
            let viommu = ctx.viommu_alloc(dev, parent, ViommuType::ArmSmmuV3).unwrap();
            let g = Guest { ctx: ctx.clone(), ioas, dev, viommu, ram };
            g.write_cd(TTB0, 3);
            g.map(TTB0, IOVA_BASE, 16 * PAGE, true);
            g.put(LEAF_TABLE + ((IOVA_BASE >> 12) & 511) * 8, 0);
            g.nested(S1);
            let device = ctx.get(dev).unwrap();
            let mut model = Model::default();
            for op in ops {
                match op {
                    Op::S1(p, m) => {
                        let iova = IOVA_BASE + p * PAGE;
                        match m {
                            Some((gp, w)) => g.map(TTB0, iova, gp * PAGE, w),
                            None => g.put(LEAF_TABLE + ((iova >> 12) & 511) * 8, 0),
                        }
                        g.command([u64::from(ioasid_engine::smmuv3::CMD_TLBI_NH_VA) | 3 << 48, iova]).unwrap();
                        model.apply(&Op::S1(p, m));
                    }
                    Op::S2(gp, m) => model.stage_2(&ctx, ioas, &g.ram, gp, m),
                }
                model.check(IOVA_BASE, g.ram.addr(), |iova, need| device.port(None).translate(iova, need, &ioasid_engine::epoch::pin()))?;
            }
            drop(device);
            drop(g);
        }
    }
}

#[test]
fn pasids_pick_the_guests_context_descriptor() {
    use ioasid_engine::veventq::VEVENTQ_TYPE_ARM_SMMUV3;
    let g = guest();
    // CD 0 (TTB0 0x10000) maps IOVA 0x40_0000 to 0x20000; CD 1 (TTB0
    // 0x30000) maps it to 0x21000. S1CDMax 1: substreams 0 and 1.
    g.write_cd(0x10000, 1);
    g.put(CD_TABLE + cd::SIZE, cd::V | cd::AA64 | 16 | 2 << cd::ASID_SHIFT);
    g.put(CD_TABLE + cd::SIZE + 8, 0x30000);
    g.map(0x10000, 0x40_0000, 0x20000, true);
    g.map(0x30000, 0x40_0000, 0x21000, true);
    // S1DSS SSID0: DMA without a PASID uses CD 0.
    g.nested([S1[0] | 1 << 59, 2]);
    let (_, queue) = g.ctx.veventq_alloc(g.viommu, VEVENTQ_TYPE_ARM_SMMUV3, 8).unwrap();
    let dev = g.ctx.get(g.dev).unwrap();
    // Alternate, so each substream's cached translation is checked against the other's.
    for round in 0..3u8 {
        dev.dma_write(0x40_0000, &[b'r' + round]).unwrap();
        dev.dma_write_pasid(1, 0x40_0000, &[b'p' + round]).unwrap();
        assert_eq!((g.read_ram(0x20000), g.read_ram(0x21000)), (b'r' + round, b'p' + round), "round {round}");
    }
    // Substream 2 is beyond S1CDMax: a fault, reported with its SSID.
    assert_eq!(fault(dev.dma_write_pasid(2, 0x40_0000, b"x")), FaultReason::Config(ConfigFault::BadSubstream));
    let events = queue.read(4096).unwrap();
    let word0 = u64::from_le_bytes(events[0].data[..8].try_into().unwrap());
    assert_eq!(word0, 0x08 | 1 << 11 | 2 << 12 | u64::from(VSID) << 32, "C_BAD_SUBSTREAMID, SSV, SubstreamID 2");
}
