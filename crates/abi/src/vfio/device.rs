//! A VFIO device file (`/dev/vfio/devices/vfioN`, or one a group hands
//! out) for a declared PCI function, answering as Linux's vfio-pci does:
//! bind to an iommufd and attach to its page tables (the cdev path), the
//! device, region and interrupt queries, `SET_IRQS`, reset, features, and
//! `pread`/`pwrite` of config space and BARs at `index << 40`.
//!
//! Until a cdev file is bound, everything but the bind answers `EINVAL`,
//! as Linux's `access_granted` check does. Closing the last access to the
//! function turns its interrupts off, resets it and unbinds it from its
//! iommufd, so the next user finds it as a fresh one.

use core::mem::{offset_of, size_of};
use std::collections::BTreeSet;
use std::sync::Arc;

use ioasid_engine::pci::BarKind;
use ioasid_engine::{Context, DeviceId, PtId};
use parking_lot::Mutex;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use super::declared::Declared;
use super::irq::{self, Data};
use super::vfio_io;
use crate::errno::Errno;
use crate::ucmd::copy_struct_from_user;
use crate::user::UserMemory;

pub const VFIO_DEVICE_GET_INFO: u32 = vfio_io(7);
pub const VFIO_DEVICE_GET_REGION_INFO: u32 = vfio_io(8);
pub const VFIO_DEVICE_GET_IRQ_INFO: u32 = vfio_io(9);
pub const VFIO_DEVICE_SET_IRQS: u32 = vfio_io(10);
pub const VFIO_DEVICE_RESET: u32 = vfio_io(11);
pub const VFIO_DEVICE_GET_PCI_HOT_RESET_INFO: u32 = vfio_io(12);
pub const VFIO_DEVICE_PCI_HOT_RESET: u32 = vfio_io(13);
pub const VFIO_DEVICE_FEATURE: u32 = vfio_io(17);
pub const VFIO_DEVICE_BIND_IOMMUFD: u32 = vfio_io(18);
pub const VFIO_DEVICE_ATTACH_IOMMUFD_PT: u32 = vfio_io(19);
pub const VFIO_DEVICE_DETACH_IOMMUFD_PT: u32 = vfio_io(20);

pub const VFIO_DEVICE_FLAGS_RESET: u32 = 1 << 0;
pub const VFIO_DEVICE_FLAGS_PCI: u32 = 1 << 1;
pub const VFIO_DEVICE_BIND_FLAG_TOKEN: u32 = 1 << 0;
pub const VFIO_DEVICE_ATTACH_PASID: u32 = 1 << 0;
pub const VFIO_DEVICE_DETACH_PASID: u32 = 1 << 0;
pub const VFIO_REGION_INFO_FLAG_READ: u32 = 1 << 0;
pub const VFIO_REGION_INFO_FLAG_WRITE: u32 = 1 << 1;
pub const VFIO_IRQ_INFO_EVENTFD: u32 = 1 << 0;
pub const VFIO_IRQ_INFO_MASKABLE: u32 = 1 << 1;
pub const VFIO_IRQ_INFO_AUTOMASKED: u32 = 1 << 2;
pub const VFIO_IRQ_INFO_NORESIZE: u32 = 1 << 3;
pub const VFIO_DEVICE_FEATURE_MASK: u32 = 0xffff;
pub const VFIO_DEVICE_FEATURE_GET: u32 = 1 << 16;
pub const VFIO_DEVICE_FEATURE_SET: u32 = 1 << 17;
pub const VFIO_DEVICE_FEATURE_PROBE: u32 = 1 << 18;
const FEATURE_LOW_POWER_ENTRY: u32 = 3;
const FEATURE_LOW_POWER_ENTRY_WITH_WAKEUP: u32 = 4;
const FEATURE_LOW_POWER_EXIT: u32 = 5;

/// Regions: BARs 0–5, the ROM, config space, VGA (`VFIO_PCI_NUM_REGIONS`).
pub const NUM_REGIONS: u32 = 9;
pub const ROM_REGION: u32 = 6;
pub const CONFIG_REGION: u32 = 7;
pub const VGA_REGION: u32 = 8;
/// A region's offset in the file is its index shifted by this.
pub const REGION_SHIFT: u32 = 40;

#[repr(C)]
#[derive(Debug, Default, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct vfio_device_info {
    pub argsz: u32,
    pub flags: u32,
    pub num_regions: u32,
    pub num_irqs: u32,
    pub cap_offset: u32,
    pub pad: u32,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct vfio_region_info {
    pub argsz: u32,
    pub flags: u32,
    pub index: u32,
    pub cap_offset: u32,
    pub size: u64,
    pub offset: u64,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct vfio_irq_info {
    pub argsz: u32,
    pub flags: u32,
    pub index: u32,
    pub count: u32,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct vfio_irq_set {
    pub argsz: u32,
    pub flags: u32,
    pub index: u32,
    pub start: u32,
    pub count: u32,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct vfio_device_feature {
    pub argsz: u32,
    pub flags: u32,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct vfio_device_bind_iommufd {
    pub argsz: u32,
    pub flags: u32,
    pub iommufd: i32,
    pub out_devid: u32,
    pub token_uuid_ptr: u64,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct vfio_device_attach_iommufd_pt {
    pub argsz: u32,
    pub flags: u32,
    pub pt_id: u32,
    pub pasid: u32,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct vfio_device_detach_iommufd_pt {
    pub argsz: u32,
    pub flags: u32,
    pub pasid: u32,
}

const _: () = {
    assert!(size_of::<vfio_device_info>() == 24);
    assert!(size_of::<vfio_region_info>() == 32);
    assert!(size_of::<vfio_irq_info>() == 16);
    assert!(size_of::<vfio_irq_set>() == 20);
    assert!(size_of::<vfio_device_bind_iommufd>() == 24);
    assert!(size_of::<vfio_device_attach_iommufd_pt>() == 16);
    assert!(size_of::<vfio_device_detach_iommufd_pt>() == 12);
};

/// `offsetofend(T, field)`.
macro_rules! end_of {
    ($t:ty, $f:ident) => {
        offset_of!($t, $f) + size_of::<u32>()
    };
}

/// An open VFIO device file.
pub struct DeviceFile {
    dev: Arc<Declared>,
    /// Opened through a group: access came with the open, and the
    /// iommufd-only ioctls are not for it.
    through_group: bool,
    binding: Mutex<Option<Binding>>,
}

/// The file's bond to an iommufd: Linux's `iommufd_device` for it.
struct Binding {
    ctx: Arc<Context>,
    id: DeviceId,
    /// Whether its RID is attached (attach becomes replace, detach a no-op
    /// when not).
    attached: bool,
    pasids: BTreeSet<u32>,
}

impl DeviceFile {
    /// A file for `dev` opened through its cdev: nothing is granted until
    /// `VFIO_DEVICE_BIND_IOMMUFD`.
    pub fn open_cdev(dev: Arc<Declared>) -> Self {
        DeviceFile { dev, through_group: false, binding: Mutex::new(None) }
    }

    /// A file for `dev` handed out by its group, whose container is the
    /// iommufd `ctx`: bound there and attached to its compatibility IOAS,
    /// as Linux's group path does at open.
    pub(crate) fn open_in_group(dev: Arc<Declared>, ctx: Arc<Context>) -> Result<Self, Errno> {
        let file = DeviceFile { dev, through_group: true, binding: Mutex::new(None) };
        let ioas = ctx.vfio_ioas()?;
        {
            let mut open = file.dev.lock.lock();
            let mut binding = file.bind(&ctx, &mut open)?;
            if let Err(e) = binding.ctx.attach(binding.id, ioas) {
                file.unbind(binding, &mut open);
                return Err(e.into());
            }
            binding.attached = true;
            *file.binding.lock() = Some(binding);
        }
        Ok(file)
    }

    /// The function behind the file.
    pub fn declared(&self) -> &Arc<Declared> {
        &self.dev
    }

    /// The iommufd device ID, once bound.
    pub fn dev_id(&self) -> Option<DeviceId> {
        self.binding.lock().as_ref().map(|b| b.id)
    }

    fn bind(&self, ctx: &Arc<Context>, open: &mut super::declared::OpenState) -> Result<Binding, Errno> {
        // Only the group path may open a function twice.
        if open.open_count != 0 && !self.through_group {
            return Err(Errno::EINVAL);
        }
        let id = ctx.bind_device(self.dev.spec.device_info())?;
        if open.open_count == 0 {
            self.dev.port.device.store(Some(ctx.get(id)?));
        }
        open.open_count += 1;
        Ok(Binding { ctx: ctx.clone(), id, attached: false, pasids: BTreeSet::new() })
    }

    fn unbind(&self, b: Binding, open: &mut super::declared::OpenState) {
        open.open_count -= 1;
        if open.open_count == 0 {
            // The last user: DMA stops before the function forgets its
            // state, and nothing it raises reaches the old eventfds.
            self.dev.port.device.store(None);
            self.dev.port.irqs.lock().disable_all();
            self.dev.function.reset();
        }
        let _ = b.ctx.unbind_device(b.id);
    }

    /// Runs one ioctl on the file; `Ok` carries its return value.
    pub fn ioctl(&self, mem: &dyn UserMemory, request: u32, arg: u64) -> Result<i32, Errno> {
        if request == VFIO_DEVICE_BIND_IOMMUFD {
            return self.bind_iommufd(mem, arg).map(|()| 0);
        }
        self.granted()?;
        match request {
            VFIO_DEVICE_ATTACH_IOMMUFD_PT if !self.through_group => self.attach_pt(mem, arg),
            VFIO_DEVICE_DETACH_IOMMUFD_PT if !self.through_group => self.detach_pt(mem, arg),
            VFIO_DEVICE_FEATURE => self.feature(mem, arg),
            VFIO_DEVICE_GET_REGION_INFO => self.region_info(mem, arg),
            VFIO_DEVICE_GET_INFO => self.info(mem, arg),
            VFIO_DEVICE_GET_IRQ_INFO => self.irq_info(mem, arg),
            VFIO_DEVICE_SET_IRQS => self.set_irqs(mem, arg),
            VFIO_DEVICE_RESET => {
                self.dev.function.reset();
                Ok(())
            }
            // No slot or bus reset reaches an emulated function alone.
            VFIO_DEVICE_GET_PCI_HOT_RESET_INFO | VFIO_DEVICE_PCI_HOT_RESET => Err(Errno::ENODEV),
            _ => Err(Errno::ENOTTY),
        }
        .map(|()| 0)
    }

    fn granted(&self) -> Result<(), Errno> {
        if self.binding.lock().is_some() { Ok(()) } else { Err(Errno::EINVAL) }
    }

    fn bind_iommufd(&self, mem: &dyn UserMemory, arg: u64) -> Result<(), Errno> {
        let minsz = end_of!(vfio_device_bind_iommufd, out_devid);
        let mut size = [0u8; 4];
        mem.read(arg, &mut size)?;
        let user_size = u32::from_ne_bytes(size) as usize;
        if user_size < minsz {
            return Err(Errno::EINVAL);
        }
        let mut bind = vfio_device_bind_iommufd::default();
        copy_struct_from_user(mem, arg, user_size, bind.as_mut_bytes())?;
        if bind.iommufd < 0 || bind.flags & !VFIO_DEVICE_BIND_FLAG_TOKEN != 0 || self.through_group {
            return Err(Errno::EINVAL);
        }
        let mut open = self.dev.lock.lock();
        let mut slot = self.binding.lock();
        if slot.is_some() {
            return Err(Errno::EINVAL);
        }
        if bind.flags & VFIO_DEVICE_BIND_FLAG_TOKEN != 0 {
            // A function that is neither an SR-IOV PF nor a VF takes no VF
            // token: the UUID is read, then refused.
            let mut uuid = [0u8; 16];
            mem.read(bind.token_uuid_ptr, &mut uuid)?;
            return Err(Errno::EINVAL);
        }
        let ctx = iommufd_of(bind.iommufd)?;
        let binding = self.bind(&ctx, &mut open)?;
        if let Err(e) =
            mem.write(arg + offset_of!(vfio_device_bind_iommufd, out_devid) as u64, &binding.id.get().to_ne_bytes())
        {
            self.unbind(binding, &mut open);
            return Err(e);
        }
        *slot = Some(binding);
        Ok(())
    }

    fn attach_pt(&self, mem: &dyn UserMemory, arg: u64) -> Result<(), Errno> {
        let minsz = end_of!(vfio_device_attach_iommufd_pt, pt_id);
        let (a, pasid): (vfio_device_attach_iommufd_pt, _) = read_pt_args(mem, arg, minsz, VFIO_DEVICE_ATTACH_PASID)?;
        let _open = self.dev.lock.lock();
        let mut slot = self.binding.lock();
        let b = slot.as_mut().ok_or(Errno::EINVAL)?;
        let pt = PtId::new(a.pt_id);
        let hwpt = if pasid {
            if b.pasids.contains(&a.pasid) {
                b.ctx.replace_pasid(b.id, a.pasid, pt)?
            } else {
                let h = b.ctx.attach_pasid(b.id, a.pasid, pt)?;
                b.pasids.insert(a.pasid);
                h
            }
        } else if b.attached {
            b.ctx.replace(b.id, pt)?
        } else {
            let h = b.ctx.attach(b.id, pt)?;
            b.attached = true;
            h
        };
        if let Err(e) =
            mem.write(arg + offset_of!(vfio_device_attach_iommufd_pt, pt_id) as u64, &hwpt.get().to_ne_bytes())
        {
            // As Linux: the failed copy detaches the RID (whatever was asked).
            if b.attached {
                let _ = b.ctx.detach(b.id);
                b.attached = false;
            }
            return Err(e);
        }
        Ok(())
    }

    fn detach_pt(&self, mem: &dyn UserMemory, arg: u64) -> Result<(), Errno> {
        let minsz = end_of!(vfio_device_detach_iommufd_pt, flags);
        let (d, pasid): (vfio_device_detach_iommufd_pt, _) = read_pt_args(mem, arg, minsz, VFIO_DEVICE_DETACH_PASID)?;
        let _open = self.dev.lock.lock();
        let mut slot = self.binding.lock();
        let b = slot.as_mut().ok_or(Errno::EINVAL)?;
        if pasid {
            if b.pasids.remove(&d.pasid) {
                b.ctx.detach_pasid(b.id, d.pasid)?;
            }
        } else if b.attached {
            b.ctx.detach(b.id)?;
            b.attached = false;
        }
        Ok(())
    }

    fn info(&self, mem: &dyn UserMemory, arg: u64) -> Result<(), Errno> {
        let minsz = end_of!(vfio_device_info, num_irqs);
        let mut info = vfio_device_info::default();
        mem.read(arg, &mut info.as_mut_bytes()[..minsz])?;
        if (info.argsz as usize) < minsz {
            return Err(Errno::EINVAL);
        }
        let n = (info.argsz as usize).min(size_of::<vfio_device_info>());
        let out = vfio_device_info {
            argsz: info.argsz,
            flags: VFIO_DEVICE_FLAGS_PCI | VFIO_DEVICE_FLAGS_RESET,
            num_regions: NUM_REGIONS,
            num_irqs: irq::NUM_IRQS,
            cap_offset: 0,
            pad: 0,
        };
        mem.write(arg, &out.as_bytes()[..n])
    }

    /// Size and flags of region `index`; `EINVAL` for VGA, which no
    /// emulated function decodes.
    fn region(&self, index: u32) -> Result<(u64, u32), Errno> {
        let rw = VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE;
        Ok(match index {
            0..=5 => match self.dev.function.bar(index as usize) {
                Some(bar) => (bar.size, rw),
                None => (0, 0),
            },
            ROM_REGION => (0, 0),
            CONFIG_REGION => (self.dev.function.config_size() as u64, rw),
            _ => return Err(Errno::EINVAL),
        })
    }

    fn region_info(&self, mem: &dyn UserMemory, arg: u64) -> Result<(), Errno> {
        let minsz = size_of::<vfio_region_info>();
        let mut info = vfio_region_info::default();
        mem.read(arg, info.as_mut_bytes())?;
        if (info.argsz as usize) < minsz {
            return Err(Errno::EINVAL);
        }
        let (size, flags) = self.region(info.index)?;
        info.size = size;
        info.flags = flags;
        info.offset = u64::from(info.index) << REGION_SHIFT;
        info.cap_offset = 0;
        mem.write(arg, info.as_bytes())
    }

    fn irq_info(&self, mem: &dyn UserMemory, arg: u64) -> Result<(), Errno> {
        let mut info = vfio_irq_info::default();
        mem.read(arg, info.as_mut_bytes())?;
        if (info.argsz as usize) < size_of::<vfio_irq_info>() || info.index >= irq::NUM_IRQS {
            return Err(Errno::EINVAL);
        }
        info.flags = VFIO_IRQ_INFO_EVENTFD
            | if info.index == irq::INTX {
                VFIO_IRQ_INFO_MASKABLE | VFIO_IRQ_INFO_AUTOMASKED
            } else {
                VFIO_IRQ_INFO_NORESIZE
            };
        info.count = self.dev.port.irqs.lock().count(info.index);
        mem.write(arg, info.as_bytes())
    }

    fn set_irqs(&self, mem: &dyn UserMemory, arg: u64) -> Result<(), Errno> {
        let minsz = size_of::<vfio_irq_set>();
        let mut hdr = vfio_irq_set::default();
        mem.read(arg, hdr.as_mut_bytes())?;
        let max = self.dev.port.irqs.lock().count(hdr.index);
        // vfio_set_irqs_validate_and_prepare, check for check.
        if (hdr.argsz as usize) < minsz
            || hdr.index >= irq::NUM_IRQS
            || hdr.count >= u32::MAX - hdr.start
            || hdr.flags & !(irq::DATA_TYPE_MASK | irq::ACTION_TYPE_MASK) != 0
        {
            return Err(Errno::EINVAL);
        }
        if hdr.start >= max || hdr.start + hdr.count > max {
            return Err(Errno::EINVAL);
        }
        let size = match hdr.flags & irq::DATA_TYPE_MASK {
            irq::DATA_NONE => 0,
            irq::DATA_BOOL => 1,
            irq::DATA_EVENTFD => 4,
            _ => return Err(Errno::EINVAL),
        };
        let len = hdr.count as usize * size;
        if size > 0 && (hdr.argsz as usize - minsz) < len {
            return Err(Errno::EINVAL);
        }
        let mut raw = vec![0u8; len];
        mem.read(arg + minsz as u64, &mut raw)?;
        let data = match size {
            0 => Data::None,
            1 => Data::Bool(raw),
            _ => {
                Data::Eventfd(raw.chunks_exact(4).map(|c| i32::from_ne_bytes(c.try_into().expect("4 bytes"))).collect())
            }
        };
        self.dev.port.irqs.lock().set(hdr.flags, hdr.index, hdr.start, hdr.count, data)
    }

    fn feature(&self, mem: &dyn UserMemory, arg: u64) -> Result<(), Errno> {
        let mut f = vfio_device_feature::default();
        mem.read(arg, f.as_mut_bytes())?;
        if (f.argsz as usize) < size_of::<vfio_device_feature>() {
            return Err(Errno::EINVAL);
        }
        let (get, set, probe) = (VFIO_DEVICE_FEATURE_GET, VFIO_DEVICE_FEATURE_SET, VFIO_DEVICE_FEATURE_PROBE);
        if f.flags & !(VFIO_DEVICE_FEATURE_MASK | get | set | probe) != 0 {
            return Err(Errno::EINVAL);
        }
        if f.flags & probe == 0 && f.flags & set != 0 && f.flags & get != 0 {
            return Err(Errno::EINVAL);
        }
        match f.flags & VFIO_DEVICE_FEATURE_MASK {
            // An emulated function has one power state: entering and
            // leaving low power are accepted and change nothing.
            FEATURE_LOW_POWER_ENTRY | FEATURE_LOW_POWER_EXIT => check_feature(f.flags, f.argsz, set, 0),
            // Its payload is the wakeup eventfd.
            FEATURE_LOW_POWER_ENTRY_WITH_WAKEUP => check_feature(f.flags, f.argsz, set, 4),
            // Migration, dirty logging, VF tokens, DMA-bufs: none here.
            _ => Err(Errno::ENOTTY),
        }
    }

    /// `pread` of the file at `offset`: a region's contents.
    pub fn read(&self, mem: &dyn UserMemory, buf: u64, count: usize, offset: i64) -> Result<usize, Errno> {
        self.granted()?;
        let (index, pos, n) = self.span(offset, count)?;
        let mut data = vec![0u8; n];
        if index == CONFIG_REGION {
            self.dev.function.config_read(pos as usize, &mut data);
        } else {
            self.dev.function.bar_read(&self.dev.bus, index as usize, pos, &mut data);
        }
        mem.write(buf, &data)?;
        Ok(n)
    }

    /// `pwrite` of the file at `offset`: into a region.
    pub fn write(&self, mem: &dyn UserMemory, buf: u64, count: usize, offset: i64) -> Result<usize, Errno> {
        self.granted()?;
        let (index, pos, n) = self.span(offset, count)?;
        let mut data = vec![0u8; n];
        mem.read(buf, &mut data)?;
        if index == CONFIG_REGION {
            self.dev.function.config_write(pos as usize, &data);
        } else {
            self.dev.function.bar_write(&self.dev.bus, index as usize, pos, &data);
        }
        Ok(n)
    }

    /// The region, offset in it and byte count an access at `offset` gets,
    /// with vfio-pci's errors: `EINVAL` for a region that is not there or
    /// an offset past a BAR's end (a BAR access is cut at its end),
    /// `EFAULT` for one that leaves config space.
    fn span(&self, offset: i64, count: usize) -> Result<(u32, u64, usize), Errno> {
        let offset = offset as u64;
        let index = offset >> REGION_SHIFT;
        let pos = offset & ((1 << REGION_SHIFT) - 1);
        if index >= u64::from(NUM_REGIONS) {
            return Err(Errno::EINVAL);
        }
        let index = index as u32;
        match index {
            CONFIG_REGION => {
                let size = self.dev.function.config_size() as u64;
                if pos >= size || pos + count as u64 > size {
                    return Err(Errno::EFAULT);
                }
                Ok((index, pos, count))
            }
            0..=5 => {
                let bar = self.dev.function.bar(index as usize).ok_or(Errno::EINVAL)?;
                if pos >= bar.size {
                    return Err(Errno::EINVAL);
                }
                if bar.kind == BarKind::Io && count > 4 {
                    // I/O space moves at most a dword per access.
                    return Ok((index, pos, 4.min((bar.size - pos) as usize)));
                }
                Ok((index, pos, count.min((bar.size - pos) as usize)))
            }
            // No ROM to read (and a ROM is never written), no VGA.
            _ => Err(Errno::EINVAL),
        }
    }
}

/// An attach or detach struct (both begin `argsz, flags`): its leading
/// `minsz` bytes, and the PASID after them when its flags ask for one, with
/// Linux's checks (`EINVAL` for unknown flags or a size without the PASID).
fn read_pt_args<T: FromBytes + IntoBytes + Immutable + Default>(
    mem: &dyn UserMemory,
    arg: u64,
    minsz: usize,
    pasid_flag: u32,
) -> Result<(T, bool), Errno> {
    let mut v = T::default();
    mem.read(arg, &mut v.as_mut_bytes()[..minsz])?;
    let word = |i: usize| u32::from_ne_bytes(v.as_bytes()[i * 4..i * 4 + 4].try_into().expect("4 bytes"));
    let (argsz, flags) = (word(0) as usize, word(1));
    if argsz < minsz || flags & !pasid_flag != 0 {
        return Err(Errno::EINVAL);
    }
    let pasid = flags & pasid_flag != 0;
    if pasid {
        if argsz < size_of::<T>() {
            return Err(Errno::EINVAL);
        }
        mem.read(arg + minsz as u64, &mut v.as_mut_bytes()[minsz..])?;
    }
    Ok((v, pasid))
}

/// `vfio_check_feature`: `Ok` for a probe or a valid get/set of a feature
/// that supports only `supported` and carries `minsz` bytes.
fn check_feature(flags: u32, argsz: u32, supported: u32, minsz: usize) -> Result<(), Errno> {
    let ops = flags & (VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_SET);
    if ops & !supported != 0 {
        return Err(Errno::EINVAL);
    }
    if flags & VFIO_DEVICE_FEATURE_PROBE != 0 {
        return Ok(());
    }
    if ops == 0 || (argsz as usize) < size_of::<vfio_device_feature>() + minsz {
        return Err(Errno::EINVAL);
    }
    Ok(())
}

/// The context behind iommufd `fd`: `EBADF` when `fd` is not open,
/// `EBADFD` when it is some other file.
fn iommufd_of(fd: i32) -> Result<Arc<Context>, Errno> {
    if let Some(ctx) = crate::files::context(fd) {
        return Ok(ctx);
    }
    let link = std::fs::read_link(format!("/proc/self/fd/{fd}"));
    Err(if link.is_ok() { Errno::EBADFD } else { Errno::EBADF })
}

impl Drop for DeviceFile {
    fn drop(&mut self) {
        if let Some(b) = self.binding.get_mut().take() {
            let mut open = self.dev.lock.lock();
            self.unbind(b, &mut open);
        }
    }
}
