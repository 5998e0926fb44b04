//! ioasid's daemon side. A [`daemon`] owns iommufd contexts for other
//! processes; programs reach it in one of two ways:
//!
//! - through the preload shim, which sends each ioctl on an iommufd over a
//!   Unix socket ([`wire`] is the protocol, [`client`] the shim's side);
//! - supervised ([`supervise`]): a seccomp filter turns the program's
//!   `open` of `/dev/iommu` and its iommufd ioctls into notifications the
//!   daemon answers, so static binaries and raw system calls work too.
//!
//! Either way the program's iommufd is a real kernel file (a socket whose
//! other end the daemon holds), so `dup`, `fork`, `exec` and `SCM_RIGHTS`
//! share it as they share Linux's, and the last close frees the context.

pub mod supervise;
