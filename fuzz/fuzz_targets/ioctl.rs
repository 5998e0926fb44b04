//! Fuzzes the ABI decoder: sequences of ioctls with arbitrary structs on one
//! context. The kernel writes through any valid user pointer, and so does the
//! dispatcher, so every pointer field is aimed into a sandbox region and the
//! dispatcher sees a user memory that is only that region.
#![no_main]

use std::sync::Arc;

use ioasid_abi::files;
use ioasid_abi::selftest::IOMMU_TEST_CMD;
use ioasid_abi::uapi::*;
use ioasid_abi::vfio::*;
use ioasid_abi::{Errno, UserMemory, ioctl};
use ioasid_engine::{Context, ContextConfig, HostBuffer, Limit};
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
}

impl Sandbox<'_> {
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
];

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
        _ => &[],
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(sandbox) = HostBuffer::new(SANDBOX) else { return };
    let mem = Sandbox(&sandbox);
    let ctx = Arc::new(Context::with_config(ContextConfig::isolated(Limit::Pages(4096))));
    let before = files::fds();
    // SAFETY: memfd_create with a valid name; the fd is this harness's.
    let memfd = unsafe { libc::memfd_create(c"ioasid-fuzz".as_ptr(), libc::MFD_CLOEXEC) };
    // SAFETY: sizing the memfd just created.
    unsafe { libc::ftruncate(memfd, 1 << 16) };

    // Each command: one byte picks the request, 80 bytes are its struct.
    for cmd in data.chunks(81).take(32) {
        let (&pick, body) = cmd.split_first().expect("chunks are never empty");
        let request = REQUESTS[pick as usize % REQUESTS.len()];
        let mut arg = [0u8; 96];
        arg[..body.len()].copy_from_slice(body);
        for &at in pointer_fields(request) {
            let raw = u64::from_ne_bytes(arg[at..at + 8].try_into().unwrap());
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
            let user_va = u64::from_ne_bytes(arg[va..va + 8].try_into().unwrap());
            let length = u64::from_ne_bytes(arg[len..len + 8].try_into().unwrap());
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
        let _ = ioctl(&ctx, &mem, request, argument);
    }

    // Close what the run opened, as a program's exit would.
    for fd in files::fds() {
        if !before.contains(&fd) {
            files::remove(fd);
            // SAFETY: a descriptor the dispatcher created in this run.
            unsafe { libc::close(fd) };
        }
    }
    // SAFETY: the memfd opened above.
    unsafe { libc::close(memfd) };
    drop(ctx);
});
