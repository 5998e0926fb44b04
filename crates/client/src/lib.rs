//! Device back ends in other processes: DMA through an I/O address space
//! that `ioasid serve` owns.
//!
//! A VMM makes a device in its iommufd (`IOASID_DEVICE_NEW`), attaches it
//! to the address space it maps guest memory into, and passes the device's
//! descriptor to a back end (over `SCM_RIGHTS`, as vhost-user passes its
//! memory). The back end opens a [`Port`] on it: DMA at IOVAs, translated
//! in the back end from a table the daemon publishes in shared memory,
//! into the guest memory files the daemon hands over. A hit or a lookup
//! makes no system call and sends no message; unmap, detach and replace in
//! the VMM return only after the back end's DMA through the old mapping has
//! finished ([`atc`] says how, and what happens to a back end that stalls).
//! [`IommuPort`] is vm-memory's `Iommu` on a port, so an `IommuMemory`
//! drives rust-vmm device models (virtio-queue) unchanged.

pub mod atc;
mod iommu;
mod port;
#[allow(missing_docs)]
pub mod wire;

pub use iommu::IommuPort;
pub use port::{DmaError, Port, default_socket, serve_socket};
