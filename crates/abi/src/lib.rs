//! The iommufd ABI of ioasid: Linux's uAPI structs with their layouts
//! asserted, the ioctl dispatcher, and the mapping of engine errors to
//! errnos. Front ends (preload shim, daemon) hand ioctls to [`ioctl`].

pub mod change_process;
pub mod device_file;
pub mod dispatch;
pub mod dmabuf;
pub mod errno;
pub mod ext;
pub mod fault;
pub mod files;
pub mod hw_queue;
pub mod mmap;
pub mod proc_status;
pub mod selftest;
pub mod uapi;
mod ucmd;
pub mod user;
pub mod veventq;
pub mod vfio;

pub use dispatch::ioctl;
pub use errno::Errno;
pub use user::{InProcess, UserMemory};
