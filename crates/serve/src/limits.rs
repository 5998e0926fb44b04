//! What one user of the daemon may hold. Each user (by the uid the kernel
//! reports for its connection) has its own count, so one client filling its
//! share leaves every other's untouched; over a limit, the command that
//! would pass it fails with the errno Linux gives for the same exhaustion.

use ioasid_abi::Errno;

/// The limits, per user.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Open iommufds (contexts).
    pub contexts: u32,
    /// Other files: fault queues, vEVENTQs, selftest accesses, and the
    /// holds of mapped memory.
    pub files: u32,
    /// Objects (IOASes, HWPTs, devices, ...) in each context.
    pub objects: u32,
    /// PASIDs in all the user's IOASID sets together: its share of the
    /// daemon-wide PASID space.
    pub pasids: u32,
    /// Events a vEVENTQ may hold (its depth at allocation).
    pub queue_depth: u32,
    /// How long an unmap waits for a back end's DMA in flight before it
    /// cuts the back end off, in milliseconds.
    pub backend_stall_ms: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            contexts: 1024,
            files: 4096,
            objects: 1 << 16,
            pasids: 1 << 16,
            queue_depth: 1 << 19,
            backend_stall_ms: crate::remote::DEFAULT_BOUND.as_millis() as u32,
        }
    }
}

/// What a held object counts as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counted {
    /// An open iommufd.
    Context,
    /// Any other file (or hold of mapped memory).
    File,
}

/// One user's count.
#[derive(Debug, Default)]
pub struct Usage {
    contexts: u32,
    files: u32,
}

impl Usage {
    /// Counts one more `what`: `EMFILE` past the user's limit (as a process
    /// out of descriptors).
    pub fn charge(&mut self, limits: &Limits, what: Counted) -> Result<(), Errno> {
        let (n, max) = match what {
            Counted::Context => (&mut self.contexts, limits.contexts),
            Counted::File => (&mut self.files, limits.files),
        };
        if *n >= max {
            tracing::warn!(limit = max, "a client reached its limit of open files");
            return Err(Errno(libc::EMFILE));
        }
        *n += 1;
        Ok(())
    }

    pub fn release(&mut self, what: Counted) {
        let n = match what {
            Counted::Context => &mut self.contexts,
            Counted::File => &mut self.files,
        };
        *n = n.saturating_sub(1);
    }
}
