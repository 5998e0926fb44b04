//! A VFIO device's interrupts, as vfio-pci delivers them: one of INTx,
//! MSI or MSI-X enabled at a time, each vector an eventfd the program
//! registered with `VFIO_DEVICE_SET_IRQS`, INTx masked automatically when
//! it fires until the program unmasks it, and the error and request
//! eventfds beside them.

use std::os::fd::OwnedFd;

use ioasid_engine::pci::{Irq, IrqCounts};

use crate::errno::Errno;
use crate::user::{dup_fd, signal_eventfd};

pub const INTX: u32 = 0;
pub const MSI: u32 = 1;
pub const MSIX: u32 = 2;
pub const ERR: u32 = 3;
pub const REQ: u32 = 4;
/// `VFIO_PCI_NUM_IRQS`.
pub const NUM_IRQS: u32 = 5;

pub const DATA_NONE: u32 = 1 << 0;
pub const DATA_BOOL: u32 = 1 << 1;
pub const DATA_EVENTFD: u32 = 1 << 2;
pub const ACTION_MASK: u32 = 1 << 3;
pub const ACTION_UNMASK: u32 = 1 << 4;
pub const ACTION_TRIGGER: u32 = 1 << 5;
pub const DATA_TYPE_MASK: u32 = DATA_NONE | DATA_BOOL | DATA_EVENTFD;
pub const ACTION_TYPE_MASK: u32 = ACTION_MASK | ACTION_UNMASK | ACTION_TRIGGER;

/// What `SET_IRQS` carries after its header.
pub enum Data {
    None,
    Bool(Vec<u8>),
    Eventfd(Vec<i32>),
}

pub struct Irqs {
    counts: IrqCounts,
    /// The enabled index (`INTX`, `MSI`, `MSIX`), `None` for none.
    kind: Option<u32>,
    intx: Option<OwnedFd>,
    intx_masked: bool,
    /// The function raised INTx while it was masked: it fires again on unmask.
    intx_pending: bool,
    vectors: Vec<Option<OwnedFd>>,
    err: Option<OwnedFd>,
    req: Option<OwnedFd>,
}

impl Irqs {
    pub fn new(counts: IrqCounts) -> Self {
        Irqs {
            counts,
            kind: None,
            intx: None,
            intx_masked: false,
            intx_pending: false,
            vectors: Vec::new(),
            err: None,
            req: None,
        }
    }

    /// How many interrupts `index` has (`vfio_pci_get_irq_count`).
    pub fn count(&self, index: u32) -> u32 {
        match index {
            INTX => u32::from(self.counts.intx),
            MSI => self.counts.msi,
            MSIX => self.counts.msix,
            ERR | REQ => 1,
            _ => 0,
        }
    }

    /// The function raises `irq`: delivered when its kind is enabled and a
    /// vector has an eventfd; otherwise dropped, as a real function's
    /// message is when the driver has not enabled it.
    pub fn raise(&mut self, irq: Irq) {
        match irq {
            Irq::Intx if self.kind == Some(INTX) => {
                if self.intx_masked {
                    self.intx_pending = true;
                } else if let Some(fd) = &self.intx {
                    signal_eventfd(fd, true);
                    self.intx_masked = true;
                }
            }
            Irq::Msi(n) if self.kind == Some(MSI) => self.signal_vector(n),
            Irq::Msix(n) if self.kind == Some(MSIX) => self.signal_vector(n),
            _ => {}
        }
    }

    fn signal_vector(&self, n: u32) {
        if let Some(Some(fd)) = self.vectors.get(n as usize) {
            signal_eventfd(fd, true);
        }
    }

    fn unmask_intx(&mut self) {
        if !self.intx_masked {
            return;
        }
        self.intx_masked = false;
        if std::mem::take(&mut self.intx_pending) {
            self.raise(Irq::Intx);
        }
    }

    /// Everything off, every eventfd let go (close, reset of the file).
    pub fn disable_all(&mut self) {
        let counts = self.counts;
        *self = Irqs::new(counts);
    }

    /// `VFIO_DEVICE_SET_IRQS` after its header was checked: the action on
    /// `index`'s interrupts `start..start + count`.
    pub fn set(&mut self, flags: u32, index: u32, start: u32, count: u32, data: Data) -> Result<(), Errno> {
        let action = flags & ACTION_TYPE_MASK;
        match (index, action) {
            (INTX, ACTION_MASK) => self.intx_mask(start, count, &data),
            (INTX, ACTION_UNMASK) => self.intx_unmask(start, count, &data),
            (INTX, ACTION_TRIGGER) => self.intx_trigger(start, count, data),
            (MSI | MSIX, ACTION_TRIGGER) => self.msi_trigger(index, start, count, data),
            (ERR, ACTION_TRIGGER) => Self::single_trigger(&mut self.err, start, count, data),
            (REQ, ACTION_TRIGGER) => Self::single_trigger(&mut self.req, start, count, data),
            _ => Err(Errno::ENOTTY),
        }
    }

    fn intx_mask(&mut self, start: u32, count: u32, data: &Data) -> Result<(), Errno> {
        if self.kind != Some(INTX) || start != 0 || count != 1 {
            return Err(Errno::EINVAL);
        }
        match data {
            Data::None => self.intx_masked = true,
            Data::Bool(b) if b[0] != 0 => self.intx_masked = true,
            Data::Bool(_) => {}
            // Masking through an eventfd is not something vfio-pci offers.
            Data::Eventfd(_) => return Err(Errno::EINVAL),
        }
        Ok(())
    }

    fn intx_unmask(&mut self, start: u32, count: u32, data: &Data) -> Result<(), Errno> {
        if self.kind != Some(INTX) || start != 0 || count != 1 {
            return Err(Errno::EINVAL);
        }
        match data {
            Data::None => self.unmask_intx(),
            Data::Bool(b) if b[0] != 0 => self.unmask_intx(),
            Data::Bool(_) => {}
            // An unmask eventfd (KVM's resample path) needs someone to wait
            // on it; ioasid's devices are driven without KVM.
            Data::Eventfd(_) => return Err(Errno::EOPNOTSUPP),
        }
        Ok(())
    }

    fn intx_trigger(&mut self, start: u32, count: u32, data: Data) -> Result<(), Errno> {
        if self.kind == Some(INTX) && count == 0 && matches!(data, Data::None) {
            self.disable_all_but_side();
            return Ok(());
        }
        if !(self.kind == Some(INTX) || self.kind.is_none()) || start != 0 || count != 1 {
            return Err(Errno::EINVAL);
        }
        match data {
            Data::Eventfd(fds) => {
                let fd = if fds[0] >= 0 { Some(eventfd(fds[0])?) } else { None };
                if self.kind.is_none() {
                    self.kind = Some(INTX);
                    self.intx_masked = false;
                    self.intx_pending = false;
                }
                self.intx = fd;
                Ok(())
            }
            _ if self.kind != Some(INTX) => Err(Errno::EINVAL),
            // Loopback: the program fires its own interrupt.
            Data::None => {
                if let Some(fd) = &self.intx {
                    signal_eventfd(fd, true);
                }
                Ok(())
            }
            Data::Bool(b) => {
                if let (Some(fd), true) = (&self.intx, b[0] != 0) {
                    signal_eventfd(fd, true);
                }
                Ok(())
            }
        }
    }

    /// INTx, MSI or MSI-X off, the error and request eventfds kept.
    fn disable_all_but_side(&mut self) {
        self.kind = None;
        self.intx = None;
        self.intx_masked = false;
        self.intx_pending = false;
        self.vectors.clear();
    }

    fn msi_trigger(&mut self, index: u32, start: u32, count: u32, data: Data) -> Result<(), Errno> {
        if self.kind == Some(index) && count == 0 && matches!(data, Data::None) {
            self.disable_all_but_side();
            return Ok(());
        }
        if !(self.kind == Some(index) || self.kind.is_none()) {
            return Err(Errno::EINVAL);
        }
        match data {
            Data::Eventfd(fds) => {
                // Every eventfd is checked before any changes hands, so a bad
                // one leaves the vectors as they were.
                if self.kind.is_none() && count == 0 {
                    return Err(Errno::EINVAL);
                }
                let new: Vec<Option<OwnedFd>> = fds
                    .iter()
                    .map(|&fd| if fd >= 0 { eventfd(fd).map(Some) } else { Ok(None) })
                    .collect::<Result<_, _>>()?;
                if self.kind.is_none() {
                    self.kind = Some(index);
                    self.vectors = (0..start + count).map(|_| None).collect();
                }
                let end = (start + count) as usize;
                if self.vectors.len() < end {
                    // Enabled with fewer vectors than now named: as a
                    // non-resizable MSI block, refused.
                    return Err(Errno::EINVAL);
                }
                for (slot, fd) in self.vectors[start as usize..end].iter_mut().zip(new) {
                    *slot = fd;
                }
                Ok(())
            }
            _ if self.kind != Some(index) => Err(Errno::EINVAL),
            Data::None => {
                (start..start + count).for_each(|n| self.signal_vector(n));
                Ok(())
            }
            Data::Bool(b) => {
                (start..start + count).filter(|n| b[(n - start) as usize] != 0).for_each(|n| self.signal_vector(n));
                Ok(())
            }
        }
    }

    fn single_trigger(slot: &mut Option<OwnedFd>, start: u32, count: u32, data: Data) -> Result<(), Errno> {
        if start != 0 || count > 1 {
            return Err(Errno::EINVAL);
        }
        match data {
            Data::None => {
                let fd = slot.as_ref().ok_or(Errno::EINVAL)?;
                if count == 1 {
                    signal_eventfd(fd, true);
                } else {
                    *slot = None;
                }
            }
            Data::Bool(b) => {
                if count == 0 {
                    return Err(Errno::EINVAL);
                }
                if b[0] != 0 {
                    signal_eventfd(slot.as_ref().ok_or(Errno::EINVAL)?, true);
                }
            }
            Data::Eventfd(fds) => {
                let fd = *fds.first().ok_or(Errno::EINVAL)?;
                *slot = if fd >= 0 { Some(eventfd(fd)?) } else { None };
            }
        }
        Ok(())
    }
}

/// Our own reference to the program's eventfd `fd`, as Linux's
/// `eventfd_ctx_fdget`: `EBADF` when not open, `EINVAL` when not an eventfd.
fn eventfd(fd: i32) -> Result<OwnedFd, Errno> {
    let link = std::fs::read_link(format!("/proc/self/fd/{fd}")).map_err(|_| Errno::EBADF)?;
    if link.as_os_str() != "anon_inode:[eventfd]" {
        return Err(Errno::EINVAL);
    }
    dup_fd(fd)
}

#[cfg(test)]
mod tests {
    use std::os::fd::{AsRawFd, FromRawFd};

    use super::*;

    fn eventfd_pair() -> OwnedFd {
        // SAFETY: a fresh non-blocking eventfd, owned here.
        unsafe { OwnedFd::from_raw_fd(libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)) }
    }

    /// How many times `fd` was signalled since the last call.
    fn fired(fd: &OwnedFd) -> u64 {
        let mut n = 0u64;
        // SAFETY: eight bytes from a live eventfd; EAGAIN leaves `n` at 0.
        unsafe { libc::read(fd.as_raw_fd(), (&raw mut n).cast(), 8) };
        n
    }

    fn irqs() -> Irqs {
        Irqs::new(IrqCounts { intx: true, msi: 4, msix: 8 })
    }

    #[test]
    fn intx_masks_itself_when_it_fires_and_fires_again_on_unmask_if_raised_meanwhile() {
        let mut q = irqs();
        let fd = eventfd_pair();
        q.set(DATA_EVENTFD | ACTION_TRIGGER, INTX, 0, 1, Data::Eventfd(vec![fd.as_raw_fd()])).unwrap();
        q.raise(Irq::Intx);
        q.raise(Irq::Intx);
        assert_eq!(fired(&fd), 1, "masked after the first");
        q.set(DATA_NONE | ACTION_UNMASK, INTX, 0, 1, Data::None).unwrap();
        assert_eq!(fired(&fd), 1, "the one raised while masked");
        q.set(DATA_NONE | ACTION_UNMASK, INTX, 0, 1, Data::None).unwrap();
        assert_eq!(fired(&fd), 0, "nothing pending");
        q.raise(Irq::Intx);
        assert_eq!(fired(&fd), 1);
        // MSI is refused while INTx is on, and MSI the function raises is dropped.
        let msi = eventfd_pair();
        assert_eq!(
            q.set(DATA_EVENTFD | ACTION_TRIGGER, MSI, 0, 1, Data::Eventfd(vec![msi.as_raw_fd()])),
            Err(Errno::EINVAL)
        );
        q.raise(Irq::Msi(0));
        assert_eq!(fired(&msi), 0);
    }

    #[test]
    fn msi_vectors_fire_their_own_eventfds_and_disable_with_count_zero() {
        let mut q = irqs();
        let (a, b) = (eventfd_pair(), eventfd_pair());
        q.set(DATA_EVENTFD | ACTION_TRIGGER, MSIX, 0, 3, Data::Eventfd(vec![a.as_raw_fd(), -1, b.as_raw_fd()]))
            .unwrap();
        q.raise(Irq::Msix(2));
        q.raise(Irq::Msix(1));
        q.raise(Irq::Msix(7));
        assert_eq!((fired(&a), fired(&b)), (0, 1));
        // Loopback through DATA_BOOL.
        q.set(DATA_BOOL | ACTION_TRIGGER, MSIX, 0, 3, Data::Bool(vec![1, 0, 0])).unwrap();
        assert_eq!(fired(&a), 1);
        // A bad eventfd changes nothing.
        assert_eq!(q.set(DATA_EVENTFD | ACTION_TRIGGER, MSIX, 0, 1, Data::Eventfd(vec![0])), Err(Errno::EINVAL));
        q.raise(Irq::Msix(0));
        assert_eq!(fired(&a), 1);
        q.set(DATA_NONE | ACTION_TRIGGER, MSIX, 0, 0, Data::None).unwrap();
        q.raise(Irq::Msix(0));
        assert_eq!(fired(&a), 0);
        // INTx actions need INTx on.
        assert_eq!(q.set(DATA_NONE | ACTION_UNMASK, INTX, 0, 1, Data::None), Err(Errno::EINVAL));
        assert_eq!(q.set(DATA_NONE | ACTION_MASK, MSI, 0, 1, Data::None), Err(Errno::ENOTTY));
    }
}
