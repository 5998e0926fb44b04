//! The one place where engine errors become errnos.

use ioasid_engine::Error;

/// A positive errno value, as `ioctl` reports it through `errno`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Errno(pub i32);

impl Errno {
    pub const EPERM: Errno = Errno(libc::EPERM);
    pub const ENOENT: Errno = Errno(libc::ENOENT);
    pub const EBADF: Errno = Errno(libc::EBADF);
    pub const ENOMEM: Errno = Errno(libc::ENOMEM);
    pub const EFAULT: Errno = Errno(libc::EFAULT);
    pub const EBUSY: Errno = Errno(libc::EBUSY);
    pub const EEXIST: Errno = Errno(libc::EEXIST);
    pub const EINVAL: Errno = Errno(libc::EINVAL);
    pub const ENOTTY: Errno = Errno(libc::ENOTTY);
    pub const ENOSPC: Errno = Errno(libc::ENOSPC);
    pub const E2BIG: Errno = Errno(libc::E2BIG);
    pub const EMSGSIZE: Errno = Errno(libc::EMSGSIZE);
    pub const EOPNOTSUPP: Errno = Errno(libc::EOPNOTSUPP);
    pub const EADDRINUSE: Errno = Errno(libc::EADDRINUSE);
    pub const EOVERFLOW: Errno = Errno(libc::EOVERFLOW);
    pub const ENODEV: Errno = Errno(libc::ENODEV);
    pub const EIO: Errno = Errno(libc::EIO);
    pub const EBADFD: Errno = Errno(libc::EBADFD);
    pub const EBADE: Errno = Errno(libc::EBADE);
    pub const ESPIPE: Errno = Errno(libc::ESPIPE);
    pub const EDQUOT: Errno = Errno(libc::EDQUOT);

    pub fn name(self) -> &'static str {
        match self.0 {
            libc::EPERM => "EPERM",
            libc::ENOENT => "ENOENT",
            libc::EBADF => "EBADF",
            libc::ENOMEM => "ENOMEM",
            libc::EFAULT => "EFAULT",
            libc::EBUSY => "EBUSY",
            libc::EEXIST => "EEXIST",
            libc::EINVAL => "EINVAL",
            libc::ENOTTY => "ENOTTY",
            libc::ENOSPC => "ENOSPC",
            libc::E2BIG => "E2BIG",
            libc::EMSGSIZE => "EMSGSIZE",
            libc::EOPNOTSUPP => "EOPNOTSUPP",
            libc::EADDRINUSE => "EADDRINUSE",
            libc::EOVERFLOW => "EOVERFLOW",
            libc::ENODEV => "ENODEV",
            libc::EIO => "EIO",
            libc::EBADFD => "EBADFD",
            libc::EBADE => "EBADE",
            libc::ESPIPE => "ESPIPE",
            libc::EDQUOT => "EDQUOT",
            _ => "errno",
        }
    }
}

impl std::fmt::Display for Errno {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.name(), self.0)
    }
}

impl From<Error> for Errno {
    fn from(e: Error) -> Errno {
        match e {
            Error::NotFound(_) => Errno::ENOENT,
            Error::NoObject { .. } => Errno::ENOENT,
            Error::Busy(_) => Errno::EBUSY,
            Error::Invalid(_) => Errno::EINVAL,
            Error::Unsupported(_) => Errno::EOPNOTSUPP,
            Error::Overflow(_) => Errno::EOVERFLOW,
            Error::Exists(_) => Errno::EEXIST,
            Error::NoSpace(_) => Errno::ENOSPC,
            Error::AddrInUse(_) => Errno::EADDRINUSE,
            Error::NoMemory(_) => Errno::ENOMEM,
            Error::Fault(_) => Errno::EFAULT,
            Error::Permission(_) => Errno::EPERM,
            Error::BadFd(_) => Errno::EBADF,
            Error::NoDevice(_) => Errno::ENODEV,
            Error::Quota(_) => Errno::EDQUOT,
            Error::Io(_) => Errno::EIO,
        }
    }
}
