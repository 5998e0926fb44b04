//! ioasid's daemon side. A [`daemon::Daemon`] owns iommufd contexts for
//! other processes; programs reach it in one of two ways:
//!
//! - through the preload shim, which sends each ioctl on an iommufd over a
//!   Unix socket ([`wire`] is the protocol, [`channel`] the daemon's end,
//!   [`client`] the shim's);
//! - supervised: a seccomp filter turns the program's `open` of
//!   `/dev/iommu` and its iommufd ioctls into notifications the daemon
//!   answers, so static binaries and raw system calls work too.
//!
//! Either way the program's iommufd is a real kernel file (a socket whose
//! other end the daemon holds), so `dup`, `fork`, `exec` and `SCM_RIGHTS`
//! share it as they share Linux's, and the last close frees the context.

pub mod channel;
pub mod client;
pub mod daemon;
pub mod limits;
mod pump;
pub mod remote;
pub mod supervise;
pub mod vmm;
/// The protocol (shared with back ends, whose crate holds it).
pub use ioasid_client::wire;
