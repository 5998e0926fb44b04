//! VFIO, as Linux offers it to programs: the type1 container ioctls an
//! iommufd answers (`type1`), and device files for the emulated PCI
//! functions a run declares (`declared`): `/dev/vfio/devices/vfioN`
//! (`device`), reached through iommufd or through a group and container
//! (`group`), with the sysfs entries programs look devices up by (`sysfs`).

pub mod declared;
pub mod device;
pub mod group;
mod irq;
pub mod sysfs;
mod type1;

pub use type1::*;

/// The ioctl number of VFIO command `n` (`_IO(VFIO_TYPE, VFIO_BASE + n)`).
pub(crate) const fn vfio_io(n: u32) -> u32 {
    crate::uapi::io(100 + n)
}
