//! `ioasid demo`: one run on built-in defaults that shows the whole path a
//! DMA takes, with real page tables and real memory.

use std::io::Write;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::Instant;

use ioasid_abi::uapi::{IOMMU_IOAS_IOVA_RANGES, iommu_ioas_iova_ranges, iommu_iova_range};
use ioasid_abi::{Errno, InProcess};
use ioasid_engine::fault::{PageRequest, Response};
use ioasid_engine::{
    Context, DeviceId, DeviceInfo, HostBuffer, HwptFlags, HwptId, HwptPagingId, IoasId, IovaRange, NestedData, Perm,
};
use std::time::Duration;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

const MIB: u64 = 1 << 20;
const RAM: u64 = 8 * MIB;
const RING: u64 = 64 * 1024;
const MSI: IovaRange = IovaRange::new(0xfee0_0000, 0xfeef_ffff);

pub(crate) fn section(out: &mut impl Write, n: u32, title: &str) -> std::io::Result<()> {
    writeln!(out, "\n{n}. {title}")
}

pub(crate) fn row(out: &mut impl Write, key: &str, value: impl std::fmt::Display) -> std::io::Result<()> {
    writeln!(out, "   {key:<22} {value}")
}

fn size(bytes: u64) -> String {
    match bytes {
        b if b >= MIB && b % MIB == 0 => format!("{} MiB", b / MIB),
        b if b >= 1024 && b % 1024 == 0 => format!("{} KiB", b / 1024),
        b => format!("{b} B"),
    }
}

fn rid(r: u32) -> String {
    format!("{:02x}:{:02x}.{}", r >> 8, (r >> 3) & 0x1f, r & 7)
}

/// The demo, scene by scene: the first seven follow one IOAS and two
/// devices from creation to unmap; the others stand alone.
pub fn run(out: &mut impl Write) -> Result<()> {
    writeln!(out, "ioasid demo: one I/O address space, two devices, DMA through real page tables")?;

    section(out, 1, "Context and I/O address space")?;
    let (ctx, ioas) = context_scene(out)?;

    section(out, 2, "Memory")?;
    let mem = memory_scene(out)?;

    section(out, 3, "Devices")?;
    let devs = devices_scene(out, &ctx, ioas)?;

    section(out, 4, "Mappings")?;
    let maps = mappings_scene(out, &ctx, ioas, &mem)?;

    section(out, 5, "DMA")?;
    dma_scene(out, &ctx, &devs, &maps, &mem)?;

    section(out, 6, "Page table (HWPT shared by both devices)")?;
    page_table(out, &ctx, devs.hwpt.paging())?;

    section(out, 7, "Unmap")?;
    unmap_scene(out, &ctx, ioas, &devs, &maps, &mem)?;

    section(out, 8, "I/O page fault")?;
    fault_scene(out, &ctx, ioas, &mem.ram)?;

    section(out, 9, "Nested translation: a guest's stage 1 over the host's stage 2")?;
    nested_scene(out, &ctx)?;

    section(out, 10, "Guest PASIDs: a vIOMMU drawing from an IOASID set")?;
    vpasid_scene(out, &ctx)?;

    section(out, 11, "IOMMU models: VT-d, SMMUv3, AMD-Vi")?;
    models_scene(out, &ctx)?;

    section(out, 12, "Teardown")?;
    teardown_scene(out, &ctx, ioas, &devs)?;
    writeln!(out)?;
    Ok(())
}

/// The memory the first scenes map: the guest's RAM and a descriptor ring.
struct Memory {
    ram: HostBuffer,
    ring: std::fs::File,
}

/// The two devices sharing the IOAS, and the HWPT made for them.
struct Devices {
    nic: DeviceId,
    nvme: DeviceId,
    hwpt: HwptId,
}

/// Where the guest's RAM and the ring sit in the IOAS.
struct Mappings {
    ram: u64,
    ring: u64,
}

/// Where in guest RAM nic0's packet lands.
const PACKET_AT: u64 = 3 * MIB + 100;

fn packet() -> Vec<u8> {
    (0..1500u32).map(|i| (i * 7 + 3) as u8).collect()
}

fn context_scene(out: &mut impl Write) -> Result<(Arc<Context>, IoasId)> {
    let ctx = Arc::new(Context::new());
    let ioas = ctx.ioas_alloc()?;
    row(out, "context", "in-process engine (what /dev/iommu opens)")?;
    row(out, "IOAS", format!("id {ioas}"))?;
    Ok((ctx, ioas))
}

fn memory_scene(out: &mut impl Write) -> Result<Memory> {
    let ram = HostBuffer::new(RAM as usize)?;
    row(out, "guest RAM", format!("{:>8}  anonymous memory at host {:#x}", size(RAM), ram.addr()))?;
    let ring = memfd_with(b"descriptor ring, written by the driver")?;
    row(out, "descriptor ring", format!("{:>8}  memfd, mapped by the engine itself", size(RING)))?;
    Ok(Memory { ram, ring })
}

/// Two devices attached to one IOAS share the HWPT made for the first.
fn devices_scene(out: &mut impl Write, ctx: &Arc<Context>, ioas: IoasId) -> Result<Devices> {
    let mut nic_info = DeviceInfo::new("nic0", 0x0008);
    nic_info.reserved.push(MSI);
    let nic = ctx.bind_device(nic_info)?;
    let nvme = ctx.bind_device(DeviceInfo::new("nvme0", 0x0010))?;
    for id in [nic, nvme] {
        let d = ctx.get(id)?;
        let i = d.info();
        row(
            out,
            &format!("{} (id {id})", i.name),
            format!(
                "RID {}  {}  aperture {:#x}..={:#x}",
                rid(i.rid),
                i.format().name(),
                i.aperture.start,
                i.aperture.last
            ),
        )?;
    }
    let hwpt = ctx.attach(nic, ioas)?;
    let hwpt2 = ctx.attach(nvme, ioas)?;
    row(out, "attached", format!("both to IOAS {ioas}, sharing HWPT {hwpt} (created for them)"))?;
    assert_eq!(hwpt, hwpt2, "compatible devices share one automatic HWPT");
    row(out, "reserved by nic0", format!("{:#x}..={:#x} (MSI window)", MSI.start, MSI.last))?;
    Ok(Devices { nic, nvme, hwpt })
}

fn mappings_scene(out: &mut impl Write, ctx: &Arc<Context>, ioas: IoasId, mem: &Memory) -> Result<Mappings> {
    // SAFETY: `run` keeps `mem` until after `unmap_scene` has unmapped it.
    let ram = unsafe { ctx.map_user(ioas, mem.ram.addr(), RAM, None, Perm::RW)? };
    let ring = ctx.map_file(ioas, mem.ring.as_fd(), 0, RING, Some(0x1_0000_0000), Perm::R)?;
    for a in ctx.get(ioas)?.areas() {
        let rights = match (a.perm.read, a.perm.write) {
            (true, true) => "RW",
            (true, false) => "R-",
            _ => "-W",
        };
        let what = if a.file { "memfd" } else { "user memory" };
        row(
            out,
            &format!("IOVA {:#012x}", a.iova),
            format!("{:>8}  {rights}  {what} at host {:#x}", size(a.len), a.host_addr),
        )?;
    }
    row(out, "usable IOVA", usable_ranges(ctx, ioas)?)?;
    Ok(Mappings { ram, ring })
}

/// Both devices reach the same memory through the one page table; the
/// read-only ring refuses a write.
fn dma_scene(out: &mut impl Write, ctx: &Arc<Context>, devs: &Devices, maps: &Mappings, mem: &Memory) -> Result<()> {
    let nic_dev = ctx.get(devs.nic)?;
    let nvme_dev = ctx.get(devs.nvme)?;
    let packet = packet();
    let pkt_iova = maps.ram + PACKET_AT;
    let t = Instant::now();
    nic_dev.dma_write(pkt_iova, &packet)?;
    let took = t.elapsed();
    let mut in_ram = vec![0u8; packet.len()];
    mem.ram.read_at(PACKET_AT as usize, &mut in_ram);
    let ok = if in_ram == packet { "landed in guest RAM, bytes match" } else { "MISMATCH" };
    row(out, "nic0 writes packet", format!("1500 B at IOVA {pkt_iova:#x} in {took:.1?}: {ok}"))?;
    let mut copy = vec![0u8; packet.len()];
    nvme_dev.dma_read(pkt_iova, &mut copy)?;
    row(
        out,
        "nvme0 reads it back",
        if copy == packet { "same 1500 B through the same page table" } else { "MISMATCH" },
    )?;
    let mut desc = [0u8; 38];
    nvme_dev.dma_read(maps.ring, &mut desc)?;
    row(out, "nvme0 reads ring", format!("\"{}\"", String::from_utf8_lossy(&desc)))?;
    match nvme_dev.dma_write(maps.ring, b"overwrite") {
        Err(e) => row(out, "nvme0 writes ring", format!("refused: {e}"))?,
        Ok(()) => row(out, "nvme0 writes ring", "UNEXPECTEDLY ALLOWED")?,
    }
    Ok(())
}

/// After the unmap returns, a DMA to the old IOVA no longer reaches memory.
fn unmap_scene(
    out: &mut impl Write,
    ctx: &Arc<Context>,
    ioas: IoasId,
    devs: &Devices,
    maps: &Mappings,
    mem: &Memory,
) -> Result<()> {
    let t = Instant::now();
    let unmapped = ctx.unmap(ioas, maps.ram, RAM)?;
    row(
        out,
        "unmapped",
        format!(
            "{} in {:.1?}; page tables cleared, IOTLB invalidated, DMA in flight drained",
            size(unmapped),
            t.elapsed()
        ),
    )?;
    let packet = packet();
    match ctx.get(devs.nic)?.dma_write(maps.ram + PACKET_AT, &packet) {
        Err(e) => row(out, "nic0 DMA after unmap", format!("{e}"))?,
        Ok(()) => row(out, "nic0 DMA after unmap", "UNEXPECTEDLY REACHED MEMORY")?,
    }
    let mut in_ram = vec![0u8; packet.len()];
    mem.ram.read_at(PACKET_AT as usize, &mut in_ram);
    row(out, "guest RAM", if in_ram == packet { "untouched by the late DMA" } else { "CHANGED" })?;
    Ok(())
}

fn teardown_scene(out: &mut impl Write, ctx: &Arc<Context>, ioas: IoasId, devs: &Devices) -> Result<()> {
    ctx.unmap(ioas, 0, u64::MAX)?;
    ctx.detach(devs.nic)?;
    ctx.detach(devs.nvme)?;
    ctx.destroy(ioas)?;
    row(
        out,
        "teardown",
        format!(
            "devices detached, automatic HWPT gone, IOAS destroyed; objects left besides the two bound devices: {}",
            ctx.objects().len() - 2
        ),
    )?;
    Ok(())
}

/// A device with PRI touches a page nobody mapped; the owner of its page
/// table hears about it on a fault queue, maps the page, answers, and the
/// DMA completes.
fn fault_scene(out: &mut impl Write, ctx: &Arc<Context>, ioas: IoasId, ram: &HostBuffer) -> Result<()> {
    let mut info = DeviceInfo::new("gpu0", 0x0018);
    info.pri = true;
    let gpu = ctx.bind_device(info)?;
    let (fault_id, queue) = ctx.fault_alloc()?;
    let hwpt = ctx.hwpt_alloc(gpu, ioas, HwptFlags::default(), Some(fault_id))?;
    ctx.attach(gpu, hwpt)?;
    let heading = format!("gpu0 (id {gpu})");
    row(out, &heading, format!("RID {}  with PRI, on HWPT {hwpt} whose faults go to queue {fault_id}", rid(0x0018)))?;

    let iova = 0x2_0000_0000u64;
    let page_host = ram.addr() + 4 * MIB;
    // The handler waits first; the clock starts when the device touches the page.
    let start = Arc::new(std::sync::OnceLock::<Instant>::new());
    let handler = {
        let (ctx, queue, start) = (ctx.clone(), queue.clone(), start.clone());
        std::thread::spawn(move || -> Option<(Duration, PageRequest)> {
            let (cookie, group) = queue.next(Duration::from_secs(5))?;
            let heard = start.get()?.elapsed();
            let req = group.requests[0].clone();
            // SAFETY: `ram` outlives the mapping: the scene unmaps it below.
            unsafe { ctx.map_user(ioas, page_host, 4096, Some(req.addr), Perm::RW) }.ok()?;
            queue.respond(cookie, Response::Success).ok()?;
            Some((heard, req))
        })
    };
    drop(queue);
    let device = ctx.get(gpu)?;
    let t0 = *start.get_or_init(Instant::now);
    device.dma_write(iova + 0x80, b"written after a page fault")?;
    let total = t0.elapsed();
    let (heard, req) = handler.join().map_err(|_| "fault handler panicked")?.ok_or("no page request arrived")?;
    row(out, "gpu0 writes", format!("IOVA {iova:#x}: nothing mapped there, so it asks for the page"))?;
    row(
        out,
        "page request",
        format!("addr {:#x}  write  group {}  last page  (heard after {heard:.1?})", req.addr, req.grpid),
    )?;
    row(out, "handler", "mapped 4 KiB of guest RAM there and answered: success")?;
    let mut back = [0u8; 26];
    ram.read_at(4 * MIB as usize + 0x80, &mut back);
    let ok = if &back == b"written after a page fault" { "the data is in guest RAM" } else { "MISMATCH" };
    row(out, "DMA done", format!("{total:.1?} from first touch to completion; {ok}"))?;
    ctx.unmap(ioas, iova, 4096)?;
    drop(device);
    ctx.unbind_device(gpu)?;
    ctx.destroy(hwpt)?;
    ctx.destroy(fault_id)?;
    Ok(())
}

/// A guest-owned VT-d first-stage table in guest memory, over a stage 2
/// that maps the guest's physical memory: a DMA walks both, step by step.
fn nested_scene(out: &mut impl Write, ctx: &Arc<Context>) -> Result<()> {
    use ioasid_engine::pgtable::x86::first_stage;
    const GUEST_RAM: u64 = 256 * 1024;
    let gpa_space = ctx.ioas_alloc()?;
    let guest_ram = HostBuffer::new(GUEST_RAM as usize)?;
    // SAFETY: `guest_ram` outlives the mapping: the scene unmaps it below.
    unsafe { ctx.map_user(gpa_space, guest_ram.addr(), GUEST_RAM, Some(0), Perm::RW)? };
    let vf = ctx.bind_device(DeviceInfo::new("vf0", 0x0020))?;
    let parent = ctx.hwpt_alloc(vf, gpa_space, HwptFlags { nest_parent: true, dirty_tracking: false }, None)?;
    let nested = ctx.hwpt_alloc_nested(vf, parent, NestedData::vtd_s1(0x1000, 4), None)?;
    ctx.attach(vf, nested)?;
    row(
        out,
        "guest RAM",
        format!("{} at guest-physical 0, behind stage 2 (HWPT {parent}, nest parent)", size(GUEST_RAM)),
    )?;
    row(out, "guest stage 1", format!("VT-d first stage, 4 levels, root at GPA 0x1000 (HWPT {nested}, nested)"))?;

    // The guest builds its table: IOVA 0x4000_0000 -> GPA 0x10000.
    let iova = 0x4000_0000u64;
    let map = |gpa: u64| {
        let idx = |level: u32| (iova >> (12 + 9 * level)) & 511;
        let tables = [(0x1000u64, 3u32, 0x2000u64), (0x2000, 2, 0x3000), (0x3000, 1, 0x4000)];
        for (table, level, next) in tables {
            guest_ram.write_at(
                (table + idx(level) * 8) as usize,
                &first_stage::encode(next, level, false, true).to_le_bytes(),
            );
        }
        guest_ram.write_at((0x4000 + idx(0) * 8) as usize, &first_stage::encode(gpa, 0, true, true).to_le_bytes());
    };
    map(0x10000);
    let device = ctx.get(vf)?;
    device.dma_write(iova + 0x10, b"through both stages")?;
    row(out, "vf0 writes", format!("19 B at guest IOVA {:#x}", iova + 0x10))?;
    let Ok(hwpt) = ctx.get(nested) else { return Err("not a nested HWPT".into()) };
    let (steps, landed) = hwpt.trace(iova + 0x10);
    writeln!(out, "   walk                   level  entry at GPA  (host)              entry")?;
    for st in &steps {
        let (kind, _) = first_stage::decode(st.pte, st.level);
        let what = match kind {
            ioasid_engine::pgtable::Pte::Table(a) => format!("table at GPA {a:#x}"),
            ioasid_engine::pgtable::Pte::Leaf { addr, perm, .. } => {
                format!("4 KiB page at GPA {addr:#x}, {}", if perm.write { "RW" } else { "R-" })
            }
            ioasid_engine::pgtable::Pte::None => "not present".into(),
        };
        writeln!(
            out,
            "   {:<22} {:<6} {:<13} ({:#x})  {what}",
            "",
            st.level,
            format!("{:#x}", st.entry_gpa),
            st.entry_host
        )?;
    }
    let host = landed.map_err(|e| format!("walk failed: {e:?}"))?;
    let mut seen = [0u8; 19];
    guest_ram.read_at(0x10010, &mut seen);
    row(out, "lands at", format!("GPA 0x10010 = host {host:#x}: \"{}\"", String::from_utf8_lossy(&seen)))?;

    // The guest remaps the page; the combined IOTLB keeps the old
    // translation until the guest invalidates, as hardware would.
    map(0x11000);
    device.dma_write(iova + 0x10, b"X")?;
    let mut stale = [0u8; 1];
    guest_ram.read_at(0x10010, &mut stale);
    row(
        out,
        "guest remaps",
        format!(
            "IOVA {iova:#x} to GPA 0x11000; before invalidating, a DMA still lands at GPA 0x10010 ({})",
            if &stale == b"X" { "cached" } else { "?" }
        ),
    )?;
    hwpt.invalidate();
    device.dma_write(iova + 0x10, b"after invalidation")?;
    let mut now = [0u8; 18];
    guest_ram.read_at(0x11010, &mut now);
    row(out, "after invalidation", format!("the DMA lands at GPA 0x11010: \"{}\"", String::from_utf8_lossy(&now)))?;
    drop((device, hwpt));
    ctx.unbind_device(vf)?;
    ctx.destroy(nested)?;
    ctx.destroy(parent)?;
    ctx.destroy(gpa_space)?;
    Ok(())
}

/// A guest numbers its own PASIDs; its vIOMMU maps each onto a host PASID
/// from the guest's IOASID set, within the set's quota, and the device's
/// DMA tagged with the guest's number goes through it.
fn vpasid_scene(out: &mut impl Write, ctx: &Arc<Context>) -> Result<()> {
    use ioasid_engine::ioasid_set::{Class, Event, Events, global};
    use ioasid_engine::{MockFlags, ViommuType};
    const IOVA: u64 = 1 << 24;
    let buffer = HostBuffer::new(4096)?;
    let space = ctx.ioas_alloc()?;
    // SAFETY: `buffer` outlives the mapping: the scene destroys the IOAS below.
    unsafe { ctx.map_user(space, buffer.addr(), 4096, Some(IOVA), Perm::RW)? };
    let dev = ctx.bind_device(DeviceInfo::mock(0x0028, MockFlags { pasid: true, ..MockFlags::default() }))?;
    let stage2 = ctx.hwpt_alloc(dev, space, HwptFlags { nest_parent: true, dirty_tracking: false }, None)?;
    let viommu = ctx.viommu_alloc(dev, stage2, ViommuType::Selftest)?;
    let set = ctx.ioasid_set_alloc(None, 2)?;
    ctx.viommu_set_pasid_set(viommu, set)?;
    let set_id = ctx.get(set)?.id();
    let events = global().subscribe(Class::Iommu, Some(set_id), Events::ALL);
    let vdev = ctx.vdevice_alloc(viommu, dev, 0x28)?;
    row(out, "vIOMMU", format!("id {viommu}, over HWPT {stage2}; draws guest PASIDs from set {set} (quota 2)"))?;
    row(out, "vDEVICE", format!("id {vdev}: device {dev}, which the guest calls 0x28"))?;
    for vpasid in [5, 9] {
        let host = ctx.vdevice_attach_pasid(vdev, vpasid, space)?;
        row(out, "attach", format!("guest PASID {vpasid} -> host PASID {host}"))?;
    }
    match ctx.vdevice_attach_pasid(vdev, 12, space) {
        Err(e) => row(out, "attach guest PASID 12", format!("refused: {e} (EDQUOT through the ABI)"))?,
        Ok(host) => row(out, "attach guest PASID 12", format!("UNEXPECTEDLY got host PASID {host}"))?,
    }
    ctx.get(vdev)?.dma_write(5, IOVA, b"tagged with guest PASID 5")?;
    let mut landed = [0u8; 25];
    buffer.read_at(0, &mut landed);
    row(out, "DMA, guest PASID 5", format!("landed: \"{}\"", String::from_utf8_lossy(&landed)))?;
    ctx.destroy(vdev)?;
    let heard: Vec<String> = events
        .try_iter()
        .map(|e| match e {
            Event::Alloc { pasid, .. } => format!("alloc {pasid}"),
            Event::Bind { pasid, .. } => format!("bind {pasid}"),
            Event::Unbind { pasid, .. } => format!("unbind {pasid}"),
            Event::Free { pasid, .. } => format!("free {pasid}"),
        })
        .collect();
    row(out, "set notifications", heard.join(", "))?;
    row(out, "set usage", format!("{} after the vDEVICE is destroyed", global().usage(set_id)?.1))?;
    ctx.unbind_device(dev)?;
    ctx.destroy(viommu)?;
    ctx.destroy(set)?;
    ctx.destroy(stage2)?;
    ctx.destroy(space)?;
    Ok(())
}

/// The same DMA behind each IOMMU architecture, each with its own table
/// format and registers; then an SMMUv3 guest whose stream table entry and
/// stage-1 table live in its memory, and the event record its fault makes.
fn models_scene(out: &mut impl Write, ctx: &Arc<Context>) -> Result<()> {
    use ioasid_engine::model::{amd::iommu_hw_info_amd, smmuv3::iommu_hw_info_arm_smmuv3, vtd::iommu_hw_info_vtd};
    use ioasid_engine::pgtable::arm::{AF, AP_RDONLY};
    use ioasid_engine::smmuv3::{cd, ste};
    use ioasid_engine::veventq::VEVENTQ_TYPE_ARM_SMMUV3;
    use ioasid_engine::{IommuModel, NestedData, ViommuType};
    let ram = HostBuffer::new(0x20000)?;
    let space = ctx.ioas_alloc()?;
    // SAFETY: `ram` outlives the mapping: the scene destroys the IOAS below.
    unsafe { ctx.map_user(space, ram.addr(), 0x20000, Some(0), Perm::RW)? };
    let mut devices = Vec::new();
    for (rid, model) in [(0x30, IommuModel::VTD), (0x31, IommuModel::ArmSmmuV3), (0x32, IommuModel::AmdVi)] {
        let dev = ctx.bind_device(DeviceInfo::behind(model, format!("dev{rid:x}"), rid))?;
        devices.push(dev);
        let hwpt = ctx.attach(dev, space)?;
        let device = ctx.get(dev)?;
        device.dma_write(0x9000 + u64::from(rid), b"m")?;
        let info = device.info().hw_info();
        let registers = if let Some(vtd) = info.get::<iommu_hw_info_vtd>() {
            format!("cap {:#x}, ecap {:#x}", vtd.cap_reg, vtd.ecap_reg)
        } else if let Some(smmu) = info.get::<iommu_hw_info_arm_smmuv3>() {
            let idr = smmu.idr;
            format!("IDR0 {:#x}, IDR1 {:#x}, IDR5 {:#x}", idr[0], idr[1], idr[5])
        } else if let Some(amd) = info.get::<iommu_hw_info_amd>() {
            format!("EFR {:#x}", amd.efr)
        } else {
            String::new()
        };
        let format = ctx.get(hwpt.paging())?.domain().format().name();
        row(out, model.name(), format!("{format}; DMA ok; GET_HW_INFO: {registers}"))?;
    }
    // An SMMUv3 guest: CD 0 at guest-physical 0x1000, its stage-1 table at
    // 0x2000..0x5000 mapping IOVA 0x1000 to guest page 0x8000, read-only.
    let put = |gpa: usize, v: u64| ram.write_at(gpa, &v.to_le_bytes());
    put(0x1000, cd::V | cd::AA64 | 16 | 7 << cd::ASID_SHIFT);
    put(0x1008, 0x2000);
    put(0x2000, 0x3000 | 0b11);
    put(0x3000, 0x4000 | 0b11);
    put(0x4000, 0x5000 | 0b11);
    put(0x5008, 0x8000 | 0b11 | AF | AP_RDONLY);
    ram.write_at(0x8000, b"from the guest's page");
    let smmu = devices[1];
    ctx.detach(smmu)?;
    let stage2 = ctx.hwpt_alloc(smmu, space, HwptFlags { nest_parent: true, dirty_tracking: false }, None)?;
    let viommu = ctx.viommu_alloc(smmu, stage2, ViommuType::ArmSmmuV3)?;
    let vdev = ctx.vdevice_alloc(viommu, smmu, 0x31)?;
    let (veventq, events) = ctx.veventq_alloc(viommu, VEVENTQ_TYPE_ARM_SMMUV3, 16)?;
    let vste = [ste::V | ste::CONFIG_S1 << 1 | 0x1000, 0];
    let nested = ctx.hwpt_alloc_nested(smmu, viommu, NestedData::arm_smmuv3(vste)?, None)?;
    ctx.attach(smmu, nested)?;
    row(
        out,
        "SMMUv3 guest",
        format!("STE {:#x}: stage 1 through CD table 0x1000, over stage 2 (HWPT {stage2})", vste[0]),
    )?;
    let mut buf = [0u8; 21];
    let device = ctx.get(smmu)?;
    device.dma_read(0x1000, &mut buf)?;
    row(
        out,
        "DMA read, IOVA 0x1000",
        format!("\"{}\" (CD, then 4 levels, each read through stage 2)", String::from_utf8_lossy(&buf)),
    )?;
    let refused = device.dma_write(0x1000, b"x").map_err(|e| e.to_string()).err().unwrap_or_default();
    row(out, "DMA write, IOVA 0x1000", format!("refused: {refused}"))?;
    for event in events.read(4096).unwrap_or_default() {
        let words: Vec<String> =
            event.data.chunks(8).map(|w| format!("{:#x}", u64::from_le_bytes(w.try_into().unwrap()))).collect();
        row(out, "guest event queue", format!("F_PERMISSION record for stream 0x31: [{}]", words.join(", ")))?;
    }
    ctx.detach(smmu)?;
    drop(events);
    for id in [nested.any(), veventq.any(), vdev.any(), viommu.any(), stage2.any()] {
        ctx.destroy(id)?;
    }
    for dev in devices {
        ctx.unbind_device(dev)?;
    }
    ctx.destroy(space)?;
    Ok(())
}

fn page_table(out: &mut impl Write, ctx: &Context, hwpt: HwptPagingId) -> Result<()> {
    let hw = ctx.get(hwpt)?;
    let domain = hw.domain();
    row(out, "format", domain.format().name())?;
    writeln!(out, "   level      tables   leaves  leaf size")?;
    let s = domain.summary();
    for level in (0..s.tables.len()).rev() {
        let leaf_size = if level < 3 { size(1u64 << (12 + 9 * level)) } else { "-".into() };
        writeln!(out, "   {:<8} {:>8} {:>8}  {}", level, s.tables[level], s.leaves[level], leaf_size)?;
    }
    let mapped: u64 = (0..s.leaves.len()).map(|l| s.leaves[l] << (12 + 9 * l)).sum();
    let huge = s.leaves.iter().skip(1).sum::<u64>();
    row(
        out,
        "mapped",
        format!(
            "{} in {} leaves ({huge} huge: aligned, contiguous memory uses 2 MiB leaves)",
            size(mapped),
            s.leaves.iter().sum::<u64>()
        ),
    )?;
    Ok(())
}

/// The IOAS's usable ranges, asked the way a program asks: through the ABI.
fn usable_ranges(ctx: &Arc<Context>, ioas: IoasId) -> Result<String> {
    let mut ranges = [iommu_iova_range::default(); 4];
    let mut cmd = iommu_ioas_iova_ranges {
        size: std::mem::size_of::<iommu_ioas_iova_ranges>() as u32,
        ioas_id: ioas.get(),
        num_iovas: ranges.len() as u32,
        allowed_iovas: ranges.as_mut_ptr() as u64,
        ..Default::default()
    };
    let arg = &mut cmd as *mut _ as u64;
    ioasid_abi::ioctl(ctx, &InProcess, IOMMU_IOAS_IOVA_RANGES, arg).map_err(|e: Errno| e.to_string())?;
    let shown: Vec<String> =
        ranges[..cmd.num_iovas as usize].iter().map(|r| format!("{:#x}..={:#x}", r.start, r.last)).collect();
    Ok(format!("{}  (IOMMU_IOAS_IOVA_RANGES)", shown.join(", ")))
}

fn memfd_with(text: &[u8]) -> Result<std::fs::File> {
    let fd = rustix::fs::memfd_create("ioasid-demo-ring", rustix::fs::MemfdFlags::CLOEXEC)?;
    let file = std::fs::File::from(fd);
    file.set_len(RING)?;
    rustix::io::pwrite(&file, text, 0)?;
    Ok(file)
}
