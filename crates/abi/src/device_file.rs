//! The file of a device made for a back end in another process
//! (`IOASID_DEVICE_NEW`): whoever holds it may open a port on the device
//! through `ioasid serve` (`ioasid_client::Port`); the VMM that made it
//! attaches the device with `IOASID_DEVICE_ATTACH`. Closing it everywhere
//! unbinds the device, as closing a VFIO device file does.
//!
//! Reading the file gives the back ends' events, one
//! [`ioasid_backend_event`] per read (the daemon writes them): a back end
//! cut off for stalling past the daemon's bound, or gone.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, OnceLock};

use ioasid_engine::{Context, Device, DeviceId};
use zerocopy::{Immutable, IntoBytes, KnownLayout};

use crate::errno::Errno;

/// `kind` of [`ioasid_backend_event`]: a back end stayed inside a DMA past
/// the daemon's bound while an unmap waited, and was killed.
pub const IOASID_BACKEND_CUT_OFF: u32 = 1;
/// `kind`: a back end's port closed: its process ended, or it closed its
/// connection to the daemon.
pub const IOASID_BACKEND_GONE: u32 = 2;

/// One event on a device file.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, IntoBytes, Immutable, KnownLayout)]
#[allow(non_camel_case_types)]
pub struct ioasid_backend_event {
    pub kind: u32,
    /// The back end's process.
    pub pid: u32,
    /// The PASID of its port, or `u32::MAX` for the RID.
    pub pasid: u32,
    pub __reserved: u32,
}
const _: () = assert!(size_of::<ioasid_backend_event>() == 16);

/// A device made for a back end.
pub struct DeviceFile {
    ctx: Arc<Context>,
    id: DeviceId,
    device: Arc<Device>,
    /// Where events go: the daemon's end of the program's file.
    events: OnceLock<Arc<OwnedFd>>,
}

impl DeviceFile {
    /// The file of device `id` of `ctx`.
    pub fn new(ctx: Arc<Context>, id: DeviceId) -> Result<Arc<DeviceFile>, Errno> {
        let device = ctx.get(id)?;
        Ok(Arc::new(DeviceFile { ctx, id, device, events: OnceLock::new() }))
    }

    /// The device.
    pub fn device(&self) -> &Arc<Device> {
        &self.device
    }

    /// Sends events to `sink` (a socket whose other end is the file the
    /// program reads).
    pub fn send_events_to(&self, sink: Arc<OwnedFd>) {
        let _ = self.events.set(sink);
    }

    /// Tells the file's readers about a back end (best effort: a reader
    /// that lets events pile up loses the newest).
    pub fn notify(&self, event: ioasid_backend_event) {
        if let Some(sink) = self.events.get() {
            let _ = rustix::net::send(sink.as_fd(), event.as_bytes(), rustix::net::SendFlags::DONTWAIT);
        }
    }
}

impl Drop for DeviceFile {
    fn drop(&mut self) {
        let _ = self.ctx.unbind_device(self.id);
    }
}
