//! `libioasid_preload.so`: preloaded into an unmodified program, it gives the
//! program a working `/dev/iommu` backed by the ioasid engine in-process.
//!
//! Opening `/dev/iommu` returns a real file descriptor (a memfd), so ordinary
//! fd handling (`close`, `dup`, `fcntl`, passing it around) keeps working;
//! this library remembers which descriptors are iommufd contexts and answers
//! their `ioctl`s through the ABI dispatcher. Everything else is forwarded to
//! the C library untouched. While a hook runs, calls it makes itself (the
//! engine reading `/proc`, say) go straight to the C library. A child forked
//! afterwards has its ioctls on what it inherited carried out by its parent
//! (see `fork`). Which paths name the device, and what `stat` says of it,
//! is `paths`'s business. With `IOASID_SOCKET` set, contexts live in the
//! daemon instead (see `daemon`).

mod credentials;
mod daemon;
mod fail_nth;
mod fork;
mod hooks;
mod paths;
mod proc_status;
mod real;
mod signals;
mod vfio;
