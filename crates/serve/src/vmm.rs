//! A VMM in Rust reaching `ioasid serve` without the shim: its iommufd in
//! the daemon, driven with the uAPI's ioctls over the process's channel
//! (the same calls an unmodified program makes under `ioasid run
//! --socket`), and the device it hands to a back end in another process
//! (`IOASID_DEVICE_NEW`; the back end's side is `ioasid_client::Port`).
//!
//! Arguments live in this process's memory, which the daemon reads and
//! writes as it does a program's.

use std::ffi::CString;
use std::os::fd::{BorrowedFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::ptr::NonNull;

use zerocopy::IntoBytes;

use ioasid_abi::ext::{
    IOASID_DEVICE_ATTACH, IOASID_DEVICE_NEW, IOASID_DEVICE_PRI, ioasid_device_attach, ioasid_device_new,
};
use ioasid_abi::uapi::*;

use crate::client::Client;

/// An iommufd in the daemon.
pub struct Iommufd {
    client: Client,
    fd: OwnedFd,
}

/// A device made for a back end: its ID in the iommufd, and its file (what
/// the back end is handed; reading it gives the back ends' events).
pub struct BackendDevice {
    pub id: u32,
    pub file: OwnedFd,
}

impl Iommufd {
    /// Opens `/dev/iommu` in the daemon listening at `socket`.
    pub fn open(socket: &Path) -> Result<Iommufd, i32> {
        let path = CString::new(socket.as_os_str().as_encoded_bytes()).map_err(|_| libc::EINVAL)?;
        let client = Client::new(path, |_, _| {});
        let fd = client.open(libc::O_RDWR | libc::O_CLOEXEC)?;
        // SAFETY: `open` gave this process a new descriptor, owned from here.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Iommufd { client, fd })
    }

    /// The iommufd's descriptor.
    pub fn fd(&self) -> BorrowedFd<'_> {
        std::os::fd::AsFd::as_fd(&self.fd)
    }

    /// `ioctl(iommufd, request, cmd)`.
    pub fn ioctl<T: IntoBytes + zerocopy::FromBytes>(&self, request: u32, cmd: &mut T) -> Result<i64, i32> {
        use std::os::fd::AsRawFd;
        self.client
            .ioctl(self.fd.as_raw_fd(), request, cmd.as_mut_bytes().as_mut_ptr() as u64)
            .unwrap_or(Err(libc::EBADF))
    }

    /// `IOMMU_IOAS_ALLOC`.
    pub fn ioas_alloc(&self) -> Result<u32, i32> {
        let mut c = iommu_ioas_alloc { size: size_of::<iommu_ioas_alloc>() as u32, ..Default::default() };
        self.ioctl(IOMMU_IOAS_ALLOC, &mut c)?;
        Ok(c.out_ioas_id)
    }

    /// `IOMMU_IOAS_MAP` of `len` bytes at `va` (this process's) to `iova`,
    /// readable and writable.
    pub fn map(&self, ioas: u32, va: u64, len: u64, iova: u64) -> Result<(), i32> {
        let mut c = iommu_ioas_map {
            size: size_of::<iommu_ioas_map>() as u32,
            flags: IOMMU_IOAS_MAP_FIXED_IOVA | IOMMU_IOAS_MAP_READABLE | IOMMU_IOAS_MAP_WRITEABLE,
            ioas_id: ioas,
            user_va: va,
            length: len,
            iova,
            ..Default::default()
        };
        self.ioctl(IOMMU_IOAS_MAP, &mut c).map(drop)
    }

    /// `IOMMU_IOAS_UNMAP`: returns once no DMA, a back end's included, can
    /// reach what was there.
    pub fn unmap(&self, ioas: u32, iova: u64, len: u64) -> Result<(), i32> {
        let mut c = iommu_ioas_unmap { size: size_of::<iommu_ioas_unmap>() as u32, ioas_id: ioas, iova, length: len };
        self.ioctl(IOMMU_IOAS_UNMAP, &mut c).map(drop)
    }

    /// `IOASID_DEVICE_NEW`: a device at `rid` behind a VT-d IOMMU, with PRI
    /// when `pri`.
    pub fn device_new(&self, rid: u32, pri: bool) -> Result<BackendDevice, i32> {
        self.device_new_with(rid, if pri { IOASID_DEVICE_PRI } else { 0 }, 0)
    }

    /// `IOASID_DEVICE_NEW` with `flags` (`IOASID_DEVICE_*`), behind the IOMMU
    /// `iommu` names (an `IOMMU_HW_INFO_TYPE_*`; 0 for VT-d).
    pub fn device_new_with(&self, rid: u32, flags: u32, iommu: u32) -> Result<BackendDevice, i32> {
        let size = size_of::<ioasid_device_new>() as u32;
        let mut c = ioasid_device_new { size, flags, iommu, rid, ..Default::default() };
        self.ioctl(IOASID_DEVICE_NEW, &mut c)?;
        // SAFETY: the daemon installed this descriptor in this process for
        // the command; nothing else owns it.
        Ok(BackendDevice { id: c.out_dev_id, file: unsafe { OwnedFd::from_raw_fd(c.out_fd) } })
    }

    /// `IOASID_DEVICE_ATTACH` of device `dev` at its RID to `pt` (an IOAS
    /// or HWPT); the HWPT's ID.
    pub fn attach(&self, dev: u32, pt: u32) -> Result<u32, i32> {
        let mut c = ioasid_device_attach {
            size: size_of::<ioasid_device_attach>() as u32,
            dev_id: dev,
            pt_id: pt,
            ..Default::default()
        };
        self.ioctl(IOASID_DEVICE_ATTACH, &mut c)?;
        Ok(c.pt_id)
    }

    /// `IOMMU_FAULT_QUEUE_ALLOC`: the queue's ID and its descriptor.
    pub fn fault_queue(&self) -> Result<(u32, OwnedFd), i32> {
        let mut c = iommu_fault_alloc { size: size_of::<iommu_fault_alloc>() as u32, ..Default::default() };
        self.ioctl(IOMMU_FAULT_QUEUE_ALLOC, &mut c)?;
        // SAFETY: installed in this process for the command, owned here.
        Ok((c.out_fault_id, unsafe { OwnedFd::from_raw_fd(c.out_fault_fd as i32) }))
    }

    /// `IOMMU_HWPT_ALLOC` of a paging HWPT for `dev` on `ioas`, its page
    /// faults going to fault queue `fault` (when given).
    pub fn hwpt_alloc(&self, dev: u32, ioas: u32, fault: Option<u32>) -> Result<u32, i32> {
        self.hwpt_alloc_with(dev, ioas, fault, 0)
    }

    /// `IOMMU_HWPT_ALLOC` with `flags` (`IOMMU_HWPT_ALLOC_*`) besides the
    /// fault queue's.
    pub fn hwpt_alloc_with(&self, dev: u32, ioas: u32, fault: Option<u32>, flags: u32) -> Result<u32, i32> {
        let mut c = iommu_hwpt_alloc {
            size: size_of::<iommu_hwpt_alloc>() as u32,
            flags: flags | if fault.is_some() { IOMMU_HWPT_FAULT_ID_VALID } else { 0 },
            dev_id: dev,
            pt_id: ioas,
            fault_id: fault.unwrap_or(0),
            ..Default::default()
        };
        self.ioctl(IOMMU_HWPT_ALLOC, &mut c)?;
        Ok(c.out_hwpt_id)
    }
}

/// Guest memory as a VMM shares it with back ends: a memfd, mapped
/// `MAP_SHARED` here (what QEMU's `memory-backend-memfd` is).
pub struct GuestRam {
    memfd: OwnedFd,
    base: NonNull<u8>,
    len: usize,
}

// SAFETY: plain shared memory reached by raw pointers only; the struct
// unmaps it once, on drop.
unsafe impl Send for GuestRam {}
// SAFETY: as above.
unsafe impl Sync for GuestRam {}

impl GuestRam {
    /// `len` bytes of zeroed guest memory.
    pub fn new(len: usize) -> rustix::io::Result<GuestRam> {
        let memfd = rustix::fs::memfd_create(c"ioasid-guest", rustix::fs::MemfdFlags::CLOEXEC)?;
        rustix::fs::ftruncate(&memfd, len as u64)?;
        // SAFETY: a new shared mapping the kernel places; only this struct
        // hands out its address.
        let p = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                len,
                rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
                rustix::mm::MapFlags::SHARED,
                &memfd,
                0,
            )?
        };
        let base = NonNull::new(p.cast()).ok_or(rustix::io::Errno::NOMEM)?;
        Ok(GuestRam { memfd, base, len })
    }

    /// The memfd, to hand to back ends.
    pub fn memfd(&self) -> BorrowedFd<'_> {
        std::os::fd::AsFd::as_fd(&self.memfd)
    }

    /// This process's address of byte `offset` (for `IOMMU_IOAS_MAP`, and for
    /// the VMM's own copies: devices write the memory at any time, so reach
    /// it by copies, never references).
    pub fn at(&self, offset: usize) -> *mut u8 {
        assert!(offset <= self.len, "offset {offset:#x} past guest memory");
        // SAFETY: inside the mapping (or one past its end).
        unsafe { self.base.as_ptr().add(offset) }
    }

    /// Its length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it is empty (never: `new` maps at least a page).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for GuestRam {
    fn drop(&mut self) {
        // SAFETY: exactly the mapping `new` made; its addresses are not
        // used after the struct goes.
        let _ = unsafe { rustix::mm::munmap(self.base.as_ptr().cast(), self.len) };
    }
}
