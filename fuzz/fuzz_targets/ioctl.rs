//! Fuzzes the ABI decoder: sequences of ioctls with arbitrary structs on two
//! contexts, `read`s and `write`s of arbitrary counts on their fault-queue
//! and vEVENTQ fds, and device DMA that fills those queues. The kernel
//! writes through any valid user pointer, and so does the dispatcher, so
//! every pointer field is aimed into a sandbox region and the dispatcher
//! sees a user memory that is only that region.
//!
//! The VFIO device files of two declared PCI functions (the endpoint test
//! function behind VT-d and, with PASIDs, behind SMMUv3) take their ioctls
//! and region reads and writes the same way; the bind names the first
//! context's descriptor.
//!
//! Each run starts from objects worth reaching (a device with PRI behind a
//! fault queue, a vIOMMU with a vEVENTQ and a vDEVICE, IOASID sets with
//! PASIDs), and checks what no command may break: a third context's PASID,
//! which neither fuzzed context can name, keeps its owner, and every PASID
//! the run allocated is released once its contexts are closed.
#![no_main]

use std::sync::Arc;

use ioasid_abi::ext::*;
use ioasid_abi::files::{self, File};
use ioasid_abi::selftest::IOMMU_TEST_CMD;
use ioasid_abi::uapi::*;
use ioasid_abi::vfio::declared::{self, DeviceSpec};
use ioasid_abi::vfio::device::*;
use ioasid_abi::vfio::*;
use ioasid_abi::{Errno, InProcess, UserMemory, ioctl};
use ioasid_engine::ioasid_set::global;
use ioasid_engine::{
    Context, ContextConfig, Device, DeviceInfo, FaultId, HostBuffer, HwptFlags, Limit, MockFlags, NestedData,
    SetObjectId, ViommuType,
};
use libfuzzer_sys::fuzz_target;

const SANDBOX: usize = 1 << 20;

/// The program's memory, as far as the dispatcher may see it.
struct Sandbox<'a>(&'a HostBuffer);

impl UserMemory for Sandbox<'_> {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), Errno> {
        let off = self.offset(addr, buf.len())?;
        self.0.read_at(off, buf);
        Ok(())
    }

    fn write(&self, addr: u64, data: &[u8]) -> Result<(), Errno> {
        let off = self.offset(addr, data.len())?;
        self.0.write_at(off, data);
        Ok(())
    }

    /// The default reads and tests a byte at a time, which under coverage
    /// instrumentation made a struct whose size spans the sandbox cost
    /// more than the rest of a run; this compares whole chunks.
    fn is_zero(&self, addr: u64, len: u64) -> Result<bool, Errno> {
        const ZERO: [u8; 4096] = [0; 4096];
        let len = usize::try_from(len).map_err(|_| Errno::EFAULT)?;
        let mut off = self.offset(addr, len)?;
        let end = off + len;
        let mut chunk = [0u8; 4096];
        while off < end {
            let n = (end - off).min(chunk.len());
            self.0.read_at(off, &mut chunk[..n]);
            if chunk[..n] != ZERO[..n] {
                return Ok(false);
            }
            off += n;
        }
        Ok(true)
    }
}

impl Sandbox<'_> {
    /// Up to `count` bytes from `addr`, as far as the sandbox goes.
    fn offset(&self, addr: u64, len: usize) -> Result<usize, Errno> {
        let off = addr.checked_sub(self.0.addr()).ok_or(Errno::EFAULT)? as usize;
        if off.checked_add(len).is_none_or(|end| end > self.0.len()) {
            return Err(Errno::EFAULT);
        }
        Ok(off)
    }
}

const REQUESTS: &[u32] = &[
    IOMMU_DESTROY,
    IOMMU_IOAS_ALLOC,
    IOMMU_IOAS_ALLOW_IOVAS,
    IOMMU_IOAS_COPY,
    IOMMU_IOAS_IOVA_RANGES,
    IOMMU_IOAS_MAP,
    IOMMU_IOAS_UNMAP,
    IOMMU_OPTION,
    IOMMU_VFIO_IOAS,
    IOMMU_HWPT_ALLOC,
    IOMMU_GET_HW_INFO,
    IOMMU_HWPT_SET_DIRTY_TRACKING,
    IOMMU_HWPT_GET_DIRTY_BITMAP,
    IOMMU_HWPT_INVALIDATE,
    IOMMU_FAULT_QUEUE_ALLOC,
    IOMMU_IOAS_MAP_FILE,
    IOMMU_VIOMMU_ALLOC,
    IOMMU_VDEVICE_ALLOC,
    IOMMU_VEVENTQ_ALLOC,
    IOMMU_TEST_CMD,
    VFIO_CHECK_EXTENSION,
    VFIO_SET_IOMMU,
    VFIO_IOMMU_GET_INFO,
    VFIO_IOMMU_MAP_DMA,
    VFIO_IOMMU_UNMAP_DMA,
    IOASID_SET_ALLOC,
    IOASID_SET_QUOTA,
    IOASID_SET_USAGE,
    IOASID_PASID_ALLOC,
    IOASID_PASID_FREE,
    IOASID_PASID_GET,
    IOASID_PASID_PUT,
    IOASID_PASID_FIND,
    IOASID_VPASID_LOOKUP,
    IOASID_VIOMMU_SET_PASIDS,
    IOASID_VDEVICE_ATTACH_PASID,
    IOASID_VDEVICE_DETACH_PASID,
];

/// The VFIO device file's ioctls (and one it does not know).
const DEVICE_REQUESTS: &[u32] = &[
    VFIO_DEVICE_BIND_IOMMUFD,
    VFIO_DEVICE_ATTACH_IOMMUFD_PT,
    VFIO_DEVICE_DETACH_IOMMUFD_PT,
    VFIO_DEVICE_GET_INFO,
    VFIO_DEVICE_GET_REGION_INFO,
    VFIO_DEVICE_GET_IRQ_INFO,
    VFIO_DEVICE_SET_IRQS,
    VFIO_DEVICE_RESET,
    VFIO_DEVICE_FEATURE,
    VFIO_DEVICE_GET_PCI_HOT_RESET_INFO,
    VFIO_GET_API_VERSION,
];

/// What a command does besides an ioctl: the queue fds' file operations,
/// and a device's DMA (which is what puts records in those queues).
#[derive(Clone, Copy)]
enum FileOp {
    FaultRead,
    FaultWrite,
    VeventqRead,
    Dma,
    RegionRead,
    RegionWrite,
}

const FILE_OPS: &[FileOp] =
    &[FileOp::FaultRead, FileOp::FaultWrite, FileOp::VeventqRead, FileOp::Dma, FileOp::RegionRead, FileOp::RegionWrite];

/// Where the out_pasid of the commands that allocate PASIDs is.
fn out_pasid(request: u32) -> Option<usize> {
    match request {
        IOASID_PASID_ALLOC => Some(32),
        IOASID_VDEVICE_ATTACH_PASID => Some(20),
        _ => None,
    }
}

fn call<T>(ctx: &Arc<Context>, request: u32, cmd: &mut T) -> Result<(), Errno> {
    ioctl(ctx, &InProcess, request, cmd as *mut T as u64).map(drop)
}

fn new_context() -> Arc<Context> {
    Arc::new(Context::with_config(ContextConfig::isolated(Limit::Pages(4096))))
}

/// A set of `ctx` (under `parent`, 0 for none) with one PASID in it.
fn set_with_pasid(ctx: &Arc<Context>, parent_id: u32, quota: u32, private_data: u64) -> (u32, u32) {
    let mut s = ioasid_set_alloc { size: 24, parent_id, quota, ..Default::default() };
    call(ctx, IOASID_SET_ALLOC, &mut s).unwrap();
    let mut a = ioasid_pasid_alloc {
        size: 40,
        set_id: s.out_set_id,
        min: 1,
        max: u32::MAX,
        private_data,
        ..Default::default()
    };
    call(ctx, IOASID_PASID_ALLOC, &mut a).unwrap();
    (s.out_set_id, a.out_pasid)
}

/// The fuzzed context's starting objects; returns its devices.
fn populate(ctx: &Arc<Context>) -> [Arc<Device>; 2] {
    let pasid = MockFlags { pasid: true, ..MockFlags::default() };
    let ioas = ctx.ioas_alloc().unwrap();
    let pri = ctx.bind_device(DeviceInfo { pri: true, ..DeviceInfo::mock(1, pasid) }).unwrap();
    let nested = ctx.bind_device(DeviceInfo::mock(2, pasid)).unwrap();
    let parent = ctx.hwpt_alloc(nested, ioas, HwptFlags { nest_parent: true, dirty_tracking: false }, None).unwrap();
    let viommu = ctx.viommu_alloc(nested, parent, ViommuType::Selftest).unwrap();
    let mut fault = iommu_fault_alloc { size: 16, ..Default::default() };
    call(ctx, IOMMU_FAULT_QUEUE_ALLOC, &mut fault).unwrap();
    let mut veventq = iommu_veventq_alloc {
        size: 32,
        viommu_id: viommu.get(),
        r#type: IOMMU_VEVENTQ_TYPE_SELFTEST,
        veventq_depth: 4,
        ..Default::default()
    };
    call(ctx, IOMMU_VEVENTQ_ALLOC, &mut veventq).unwrap();
    let faulting = ctx.hwpt_alloc(pri, ioas, HwptFlags::default(), Some(FaultId::new(fault.out_fault_id))).unwrap();
    ctx.attach(pri, faulting).unwrap();
    let stage1 = ctx.hwpt_alloc_nested(nested, viommu, NestedData::selftest(0), None);
    ctx.attach(nested, stage1.unwrap()).unwrap();
    let vdevice = ctx.vdevice_alloc(viommu, nested, 0x42).unwrap();
    let (guest_set, _) = set_with_pasid(ctx, 0, 16, 1);
    ctx.viommu_set_pasid_set(viommu, SetObjectId::new(guest_set)).unwrap();
    ctx.vdevice_attach_pasid(vdevice, 3, ioas).unwrap();
    set_with_pasid(ctx, guest_set, 8, 2);
    [ctx.get(pri).unwrap(), ctx.get(nested).unwrap()]
}

fn read_u64(arg: &[u8], at: usize) -> u64 {
    u64::from_ne_bytes(arg[at..at + 8].try_into().unwrap())
}

/// The fault-queue or vEVENTQ fds open now, in number order.
fn queue_files(fault: bool) -> Vec<File> {
    let mut fds = files::fds();
    fds.sort_unstable();
    fds.into_iter()
        .filter_map(files::get)
        .filter(|f| matches!((f, fault), (File::Fault(_), true) | (File::Veventq(_), false)))
        .collect()
}

/// One file operation; `arg` carries its operands.
fn file_op(
    op: FileOp,
    arg: &[u8],
    sandbox: &HostBuffer,
    mem: &Sandbox,
    devices: &[Arc<Device>; 2],
    vfio: &[DeviceFile; 2],
) {
    let pick = arg[0] as usize;
    let buf = sandbox.addr() + read_u64(arg, 8) % SANDBOX as u64;
    let count = read_u64(arg, 16) as usize;
    match op {
        FileOp::FaultRead | FileOp::FaultWrite => {
            let files = queue_files(true);
            let Some(File::Fault(file)) = files.get(pick % files.len().max(1)) else { return };
            if let FileOp::FaultRead = op {
                let _ = file.read(mem, buf, count, 0);
            } else {
                let _ = file.write(mem, buf, count, 0);
            }
        }
        FileOp::VeventqRead => {
            let files = queue_files(false);
            let Some(File::Veventq(file)) = files.get(pick % files.len().max(1)) else { return };
            let _ = file.read(mem, buf, count, 0);
        }
        FileOp::Dma => {
            let dev = &devices[pick % 2];
            // Most of it inside the mock IOMMU's aperture (16 MiB to 2 GiB).
            let iova = read_u64(arg, 24) % (1 << 32);
            let mut data = [0u8; 64];
            let len = arg[1] as usize % data.len();
            let pasid = u32::from_ne_bytes(arg[32..36].try_into().unwrap()) % 16;
            // Neither waits for an answer: the fuzzer answers page requests,
            // or does not, through the fault fd.
            match (arg[2] % 3, pasid) {
                (0, _) => drop(dev.try_dma_read(iova, &mut data[..len])),
                (1, _) => drop(dev.try_dma_write(iova, &data[..len])),
                // Only the device without PRI: its PASID DMA fails at once.
                (_, p) if pick % 2 == 1 => drop(dev.dma_write_pasid(p, iova, &data[..len])),
                _ => {}
            }
        }
        FileOp::RegionRead | FileOp::RegionWrite => {
            // Mostly real regions (index below 10), at any offset in them.
            let offset = (u64::from(arg[3] % 10) << 40 | read_u64(arg, 24) % (1 << 21)) as i64;
            let count = count % 8192;
            let file = &vfio[pick % 2];
            if let FileOp::RegionRead = op {
                let _ = file.read(mem, buf, count, offset);
            } else {
                let _ = file.write(mem, buf, count, offset);
            }
        }
    }
}

/// The declared functions, once per process (the list is fixed once made).
fn declare_devices() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let specs = DeviceSpec::parse_list(
            "pci-epf-test,bdf=0000:01:00.0,iommu=vtd;pci-epf-test,bdf=0000:02:00.0,iommu=smmuv3,pasid=8",
        )
        .unwrap();
        declared::declare(specs).unwrap();
    });
}

/// Byte offsets of the fields that hold user pointers, per request (and,
/// for the selftest command, whatever op it carries: its union's words).
fn pointer_fields(request: u32) -> &'static [usize] {
    match request {
        IOMMU_IOAS_ALLOW_IOVAS | IOMMU_IOAS_IOVA_RANGES => &[16],
        IOMMU_IOAS_MAP => &[16],
        IOMMU_HWPT_ALLOC | IOMMU_VIOMMU_ALLOC => &[32],
        IOMMU_GET_HW_INFO => &[16],
        IOMMU_HWPT_GET_DIRTY_BITMAP => &[40],
        IOMMU_HWPT_INVALIDATE => &[8],
        IOMMU_TEST_CMD => &[16, 24, 32, 40, 48, 56],
        VFIO_IOMMU_MAP_DMA => &[8],
        VFIO_DEVICE_BIND_IOMMUFD => &[16],
        _ => &[],
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(sandbox) = HostBuffer::new(SANDBOX) else { return };
    let mem = Sandbox(&sandbox);
    let before = files::fds();
    // A context neither fuzzed one can name: its PASID, referenced once,
    // must keep its owner whatever they do.
    let bystander = new_context();
    let (bystander_set, bystander_pasid) = set_with_pasid(&bystander, 0, 4, 0x5e);
    call(&bystander, IOASID_PASID_GET, &mut ioasid_pasid_ref { size: 8, pasid: bystander_pasid }).unwrap();
    let bystander_set = bystander.get(SetObjectId::new(bystander_set)).unwrap().id();
    let contexts = [new_context(), new_context()];
    let devices = populate(&contexts[0]);
    set_with_pasid(&contexts[1], 0, 4, 3);
    let mut allocated = Vec::new();
    // SAFETY: memfd_create with a valid name; the fd is this harness's.
    let memfd = unsafe { libc::memfd_create(c"ioasid-fuzz".as_ptr(), libc::MFD_CLOEXEC) };
    // The first context behind a descriptor, for the VFIO bind to name.
    // SAFETY: as above.
    let iommufd = unsafe { libc::memfd_create(c"ioasid-fuzz-iommufd".as_ptr(), libc::MFD_CLOEXEC) };
    files::insert(iommufd, File::Iommufd(contexts[0].clone()));
    declare_devices();
    let vfio = [DeviceFile::open_cdev(declared::all()[0].clone()), DeviceFile::open_cdev(declared::all()[1].clone())];
    // SAFETY: sizing the memfd just created.
    unsafe { libc::ftruncate(memfd, 1 << 16) };

    // Each command: one byte picks the context (its top bit) and the request
    // or file operation, 80 bytes are its struct or operands.
    for cmd in data.chunks(81).take(32) {
        let (&pick, body) = cmd.split_first().expect("chunks are never empty");
        let ctx = &contexts[usize::from(pick >> 7)];
        let which = usize::from(pick & 0x7f) % (REQUESTS.len() + FILE_OPS.len() + DEVICE_REQUESTS.len());
        let mut arg = [0u8; 96];
        arg[..body.len()].copy_from_slice(body);
        if let Some(&request) = which.checked_sub(REQUESTS.len() + FILE_OPS.len()).and_then(|i| DEVICE_REQUESTS.get(i))
        {
            for &at in pointer_fields(request) {
                let aimed = sandbox.addr() + read_u64(&arg, at) % (SANDBOX as u64 - 4096);
                arg[at..at + 8].copy_from_slice(&aimed.to_ne_bytes());
            }
            if request == VFIO_DEVICE_BIND_IOMMUFD && arg[8] & 1 == 0 {
                arg[8..12].copy_from_slice(&iommufd.to_ne_bytes());
            }
            sandbox.write_at(0, &arg);
            let _ = vfio[usize::from(pick >> 7)].ioctl(&mem, request, sandbox.addr());
            continue;
        }
        let Some(&request) = REQUESTS.get(which) else {
            file_op(FILE_OPS[which - REQUESTS.len()], &arg, &sandbox, &mem, &devices, &vfio);
            continue;
        };
        for &at in pointer_fields(request) {
            let raw = read_u64(&arg, at);
            let aimed = sandbox.addr() + raw % (SANDBOX as u64 - 4096);
            arg[at..at + 8].copy_from_slice(&aimed.to_ne_bytes());
        }
        // A mapping may not run past the sandbox, or copies through it could
        // reach the harness's own memory; u64::MAX stays, for the overflow paths.
        if let Some((va, len)) = match request {
            IOMMU_IOAS_MAP => Some((16, 24)),
            VFIO_IOMMU_MAP_DMA => Some((8, 24)),
            _ => None,
        } {
            let user_va = read_u64(&arg, va);
            let length = read_u64(&arg, len);
            let room = sandbox.addr() + SANDBOX as u64 - user_va;
            if length != u64::MAX && length > room {
                arg[len..len + 8].copy_from_slice(&(length % (room + 1)).to_ne_bytes());
            }
        }
        if request == IOMMU_IOAS_MAP_FILE {
            arg[12..16].copy_from_slice(&memfd.to_ne_bytes());
        }
        // The struct itself lives at the start of the sandbox.
        sandbox.write_at(0, &arg);
        let scalar = u64::from(body.first().copied().unwrap_or(0));
        let argument = match request {
            VFIO_CHECK_EXTENSION | VFIO_SET_IOMMU => scalar,
            _ => sandbox.addr(),
        };
        let done = ioctl(ctx, &mem, request, argument).is_ok();
        if let (true, Some(at)) = (done, out_pasid(request)) {
            let mut out = [0u8; 4];
            sandbox.read_at(at, &mut out);
            allocated.push(u32::from_ne_bytes(out));
        }
        assert_eq!(global().find(bystander_set, bystander_pasid), Some(0x5e), "another context's PASID");
        assert_eq!(global().usage(bystander_set).ok(), Some((4, 1)), "another context's set");
        assert_eq!(bystander.set_owner().held(bystander_pasid), 1);
    }

    // Close what the run opened, as a program's exit would.
    drop(vfio);
    files::remove(iommufd);
    // SAFETY: the descriptor opened above.
    unsafe { libc::close(iommufd) };
    for fd in files::fds() {
        if !before.contains(&fd) {
            files::remove(fd);
            // SAFETY: a descriptor the dispatcher created in this run.
            unsafe { libc::close(fd) };
        }
    }
    // SAFETY: the memfd opened above.
    unsafe { libc::close(memfd) };
    drop(devices);
    drop(contexts);
    for pasid in allocated {
        let entry = global().entry(pasid);
        assert!(entry.is_none_or(|e| e.set() == bystander_set), "PASID {pasid} outlived its context");
    }
    drop(bystander);
    assert!(global().entry(bystander_pasid).is_none(), "a closed context's reference was left");
});
