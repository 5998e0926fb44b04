//! Typed engine errors. The ABI layer maps each kind to exactly one errno
//! (see `ioasid_abi::errno`), so the kind must be chosen as Linux chooses its
//! errno; the message is for people.

use thiserror::Error;

/// The engine's result: an [`Error`](enum@Error) on failure.
pub type Result<T> = std::result::Result<T, Error>;

/// Why an engine call failed: one kind per errno Linux's iommufd would
/// return for it, carrying a static message for people.
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
pub enum Error {
    /// An ID, IOVA or range that does not exist (ENOENT).
    #[error("not found: {0}")]
    NotFound(&'static str),
    /// An object ID that names nothing, or an object of another kind than
    /// the one wanted (ENOENT, as `iommufd_get_object` answers both).
    #[error("no {kind} with ID {id}")]
    NoObject {
        /// The ID asked for.
        id: u32,
        /// The kind of object that was wanted (`"IOAS"`, `"HWPT"`, `"vIOMMU"`, ...).
        kind: &'static str,
    },
    /// An object still used by another (EBUSY).
    #[error("busy: {0}")]
    Busy(&'static str),
    /// A field that is understood but not correct (EINVAL).
    #[error("invalid argument: {0}")]
    Invalid(&'static str),
    /// A known field with a value that is not supported (EOPNOTSUPP).
    #[error("not supported: {0}")]
    Unsupported(&'static str),
    /// Arithmetic on IOVAs or lengths overflowed (EOVERFLOW).
    #[error("overflow: {0}")]
    Overflow(&'static str),
    /// A fixed IOVA range that is already mapped (EEXIST).
    #[error("already mapped: {0}")]
    Exists(&'static str),
    /// No IOVA hole large enough (ENOSPC).
    #[error("no space: {0}")]
    NoSpace(&'static str),
    /// A reservation that collides with a mapping or an allowed range (EADDRINUSE).
    #[error("address in use: {0}")]
    AddrInUse(&'static str),
    /// Out of memory, or over the locked-memory limit (ENOMEM).
    #[error("out of memory: {0}")]
    NoMemory(&'static str),
    /// A user address that is not mapped (EFAULT).
    #[error("bad address: {0}")]
    Fault(&'static str),
    /// Writing to read-only memory, or a privileged option (EPERM).
    #[error("not permitted: {0}")]
    Permission(&'static str),
    /// Something that is not set up, like the VFIO compatibility IOAS (ENODEV).
    #[error("no such device: {0}")]
    NoDevice(&'static str),
    /// A quota would be exceeded (EDQUOT).
    #[error("quota exceeded: {0}")]
    Quota(&'static str),
    /// A file descriptor that is not usable (EBADF).
    #[error("bad file descriptor: {0}")]
    BadFd(&'static str),
    /// Hardware data a guest wrote (an STE, a command) that the IOMMU
    /// rejects; Linux reserves EIO for exactly this.
    #[error("rejected by the IOMMU: {0}")]
    Io(&'static str),
}
