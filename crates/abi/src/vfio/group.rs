//! A VFIO group file (`/dev/vfio/N`): the legacy path to a device, through
//! a container. Each declared function is alone in its group `N`. The
//! container is an iommufd (what `/dev/vfio/vfio` opens, as Linux's
//! iommufd-backed container is), so a group set to it gets that context's
//! compatibility IOAS, and the devices it hands out are bound there and
//! attached to it, for type1's `MAP_DMA` to reach.

use core::mem::size_of;
use std::sync::Arc;

use ioasid_engine::Context;
use parking_lot::Mutex;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use super::declared::Declared;
use super::device::DeviceFile;
use super::vfio_io;
use crate::errno::Errno;
use crate::files::{self, File};
use crate::user::{UserMemory, new_fd};

pub const VFIO_GROUP_GET_STATUS: u32 = vfio_io(3);
pub const VFIO_GROUP_SET_CONTAINER: u32 = vfio_io(4);
pub const VFIO_GROUP_UNSET_CONTAINER: u32 = vfio_io(5);
pub const VFIO_GROUP_GET_DEVICE_FD: u32 = vfio_io(6);
pub const VFIO_GROUP_FLAGS_VIABLE: u32 = 1 << 0;
pub const VFIO_GROUP_FLAGS_CONTAINER_SET: u32 = 1 << 1;

#[repr(C)]
#[derive(Debug, Default, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct vfio_group_status {
    pub argsz: u32,
    pub flags: u32,
}

/// An open group.
pub struct GroupFile {
    dev: Arc<Declared>,
    container: Mutex<Option<Arc<Context>>>,
}

impl GroupFile {
    /// Opens `dev`'s group; `EBUSY` while another open file has it, as in
    /// Linux.
    pub fn open(dev: Arc<Declared>) -> Result<Self, Errno> {
        let mut open = dev.lock.lock();
        if open.group_open {
            return Err(Errno::EBUSY);
        }
        open.group_open = true;
        drop(open);
        Ok(GroupFile { dev, container: Mutex::new(None) })
    }

    /// The function in the group.
    pub fn declared(&self) -> &Arc<Declared> {
        &self.dev
    }

    /// Runs one ioctl on the group; `Ok` carries its return value (a new
    /// descriptor for `GET_DEVICE_FD`).
    pub fn ioctl(&self, mem: &dyn UserMemory, request: u32, arg: u64) -> Result<i32, Errno> {
        match request {
            VFIO_GROUP_GET_STATUS => self.status(mem, arg).map(|()| 0),
            VFIO_GROUP_SET_CONTAINER => self.set_container(mem, arg).map(|()| 0),
            VFIO_GROUP_UNSET_CONTAINER => self.unset_container().map(|()| 0),
            VFIO_GROUP_GET_DEVICE_FD => self.device_fd(mem, arg),
            _ => Err(Errno::ENOTTY),
        }
    }

    fn status(&self, mem: &dyn UserMemory, arg: u64) -> Result<(), Errno> {
        let mut s = vfio_group_status::default();
        mem.read(arg, s.as_mut_bytes())?;
        if (s.argsz as usize) < size_of::<vfio_group_status>() {
            return Err(Errno::EINVAL);
        }
        s.flags = VFIO_GROUP_FLAGS_VIABLE;
        if self.container.lock().is_some() {
            s.flags |= VFIO_GROUP_FLAGS_CONTAINER_SET;
        }
        mem.write(arg, s.as_bytes())
    }

    fn set_container(&self, mem: &dyn UserMemory, arg: u64) -> Result<(), Errno> {
        let mut raw = [0u8; 4];
        mem.read(arg, &mut raw)?;
        let fd = i32::from_ne_bytes(raw);
        let file = files::get(fd);
        if file.is_none() && std::fs::read_link(format!("/proc/self/fd/{fd}")).is_err() {
            return Err(Errno::EBADF);
        }
        let mut slot = self.container.lock();
        if slot.is_some() {
            return Err(Errno::EINVAL);
        }
        let Some(File::Iommufd(ctx)) = file else { return Err(Errno::EBADFD) };
        // iommufd_vfio_compat_ioas_create: the container's IOAS, made once.
        if ctx.vfio_ioas().is_err() {
            let ioas = ctx.ioas_alloc()?;
            ctx.set_vfio_ioas(Some(ioas))?;
        }
        *slot = Some(ctx);
        Ok(())
    }

    fn unset_container(&self) -> Result<(), Errno> {
        let mut slot = self.container.lock();
        if slot.is_none() {
            return Err(Errno::EINVAL);
        }
        if self.dev.lock.lock().open_count > 0 {
            return Err(Errno::EBUSY);
        }
        *slot = None;
        Ok(())
    }

    fn device_fd(&self, mem: &dyn UserMemory, arg: u64) -> Result<i32, Errno> {
        let name = read_string(mem, arg, 4096)?;
        let dev = super::declared::by_name(&name).filter(|d| Arc::ptr_eq(d, &self.dev)).ok_or(Errno::ENODEV)?;
        let ctx = self.container.lock().clone().ok_or(Errno::EINVAL)?;
        let file = DeviceFile::open_in_group(dev.clone(), ctx)?;
        let fd = new_fd(c"ioasid:[vfio-device]")?;
        let fd = std::os::fd::IntoRawFd::into_raw_fd(fd);
        files::insert(fd, File::VfioDevice(Arc::new(file)));
        Ok(fd)
    }
}

/// A nul-terminated string of at most `max` bytes from the caller
/// (`strndup_user`): `EFAULT` when unreadable, `EINVAL` when too long.
fn read_string(mem: &dyn UserMemory, addr: u64, max: usize) -> Result<String, Errno> {
    let mut out = Vec::new();
    let mut chunk = [0u8; 64];
    while out.len() < max {
        // Byte by byte past a failed chunk read: the string may end just
        // before an unmapped page.
        if mem.read(addr + out.len() as u64, &mut chunk).is_ok() {
            if let Some(end) = chunk.iter().position(|&b| b == 0) {
                out.extend_from_slice(&chunk[..end]);
                return String::from_utf8(out).map_err(|_| Errno::ENODEV);
            }
            out.extend_from_slice(&chunk);
        } else {
            let mut b = [0u8; 1];
            mem.read(addr + out.len() as u64, &mut b)?;
            if b[0] == 0 {
                return String::from_utf8(out).map_err(|_| Errno::ENODEV);
            }
            out.push(b[0]);
        }
    }
    Err(Errno::EINVAL)
}

impl Drop for GroupFile {
    fn drop(&mut self) {
        self.dev.lock.lock().group_open = false;
    }
}
