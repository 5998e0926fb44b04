//! ioasid's extension commands (`include/ioasid/ioasid.h`): PASID
//! allocation in IOASID sets, and vIOMMUs drawing guest PASIDs from a
//! set. They use their own ioctl type byte, so they
//! can never collide with iommufd's or VFIO's numbers, and follow iommufd's
//! size rules through the same decoder.

use std::sync::Arc;

use ioasid_engine::ioasid_set::global;
use ioasid_engine::{Context, PtId, SetObjectId, VdeviceId, ViommuId};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::errno::Errno;
use crate::ucmd::{OpTable, Ucmd, op, run_op};
use crate::user::UserMemory;

pub const IOASID_TYPE: u32 = b'i' as u32;

pub const fn ext_io(nr: u32) -> u32 {
    crate::uapi::io_type(IOASID_TYPE, nr)
}

pub const IOASID_SET_ALLOC: u32 = ext_io(0x00);
pub const IOASID_SET_QUOTA: u32 = ext_io(0x01);
pub const IOASID_SET_USAGE: u32 = ext_io(0x02);
pub const IOASID_PASID_ALLOC: u32 = ext_io(0x03);
pub const IOASID_PASID_FREE: u32 = ext_io(0x04);
pub const IOASID_PASID_GET: u32 = ext_io(0x05);
pub const IOASID_PASID_PUT: u32 = ext_io(0x06);
pub const IOASID_PASID_FIND: u32 = ext_io(0x07);
pub const IOASID_VPASID_LOOKUP: u32 = ext_io(0x08);
pub const IOASID_VIOMMU_SET_PASIDS: u32 = ext_io(0x09);
pub const IOASID_VDEVICE_ATTACH_PASID: u32 = ext_io(0x0a);
pub const IOASID_VDEVICE_DETACH_PASID: u32 = ext_io(0x0b);
pub const IOASID_DEVICE_NEW: u32 = ext_io(0x0c);
pub const IOASID_DEVICE_ATTACH: u32 = ext_io(0x0d);
pub const IOASID_DEVICE_DETACH: u32 = ext_io(0x0e);

/// `IOASID_DEVICE_NEW` flags: the device has PCIe PRI (a DMA that misses
/// asks for the page and waits).
pub const IOASID_DEVICE_PRI: u32 = 1 << 0;
/// `IOASID_DEVICE_NEW` flags: its IOMMU tracks dirty pages (HWPTs for it
/// may be allocated with `IOMMU_HWPT_ALLOC_DIRTY_TRACKING`).
pub const IOASID_DEVICE_DIRTY: u32 = 1 << 1;
/// `IOASID_DEVICE_ATTACH`/`DETACH` flags: at `pasid`, not the RID.
pub const IOASID_DEVICE_PASID: u32 = 1 << 0;

pub const IOASID_PASID_ALLOC_PRIVATE: u32 = 1 << 0;

macro_rules! ext_struct {
    ($name:ident { $($field:ident : $ty:ty),* $(,)? } size $size:literal) => {
        #[repr(C)]
        #[derive(Debug, Default, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
        pub struct $name { $(pub $field: $ty),* }
        const _: () = assert!(core::mem::size_of::<$name>() == $size);
    };
}

ext_struct!(ioasid_set_alloc { size: u32, flags: u32, parent_id: u32, quota: u32, out_set_id: u32, __reserved: u32 } size 24);
ext_struct!(ioasid_set_quota { size: u32, set_id: u32, quota: u32, __reserved: u32 } size 16);
ext_struct!(ioasid_set_usage { size: u32, set_id: u32, out_quota: u32, out_used: u32 } size 16);
ext_struct!(ioasid_pasid_alloc {
    size: u32, flags: u32, set_id: u32, min: u32, max: u32, vpasid: u32, private_data: u64, out_pasid: u32, __reserved: u32,
} size 40);
ext_struct!(ioasid_pasid_free { size: u32, set_id: u32, pasid: u32, __reserved: u32 } size 16);
ext_struct!(ioasid_pasid_ref { size: u32, pasid: u32 } size 8);
ext_struct!(ioasid_pasid_find { size: u32, set_id: u32, pasid: u32, __reserved: u32, out_private_data: u64 } size 24);
ext_struct!(ioasid_vpasid_lookup { size: u32, set_id: u32, vpasid: u32, out_pasid: u32 } size 16);
ext_struct!(ioasid_viommu_set_pasids { size: u32, viommu_id: u32, set_id: u32, __reserved: u32 } size 16);
ext_struct!(ioasid_vdevice_attach_pasid {
    size: u32, flags: u32, vdevice_id: u32, vpasid: u32, pt_id: u32, out_pasid: u32,
} size 24);
ext_struct!(ioasid_vdevice_detach_pasid { size: u32, vdevice_id: u32, vpasid: u32, __reserved: u32 } size 16);

ext_struct!(ioasid_device_new {
    size: u32, flags: u32, iommu: u32, rid: u32, pasid_bits: u32, __reserved: u32, out_dev_id: u32, out_fd: i32,
} size 32);
ext_struct!(ioasid_device_attach { size: u32, flags: u32, dev_id: u32, pasid: u32, pt_id: u32, __reserved: u32 } size 24);
ext_struct!(ioasid_device_detach { size: u32, flags: u32, dev_id: u32, pasid: u32 } size 16);

type Res = Result<(), Errno>;

/// Each command at its number, from 0.
static OPS: OpTable<15> = OpTable::by_number(
    0,
    &[
        op!(IOASID_SET_ALLOC, ioasid_set_alloc, out_set_id, set_alloc),
        op!(IOASID_SET_QUOTA, ioasid_set_quota, quota, set_quota),
        op!(IOASID_SET_USAGE, ioasid_set_usage, out_used, set_usage),
        op!(IOASID_PASID_ALLOC, ioasid_pasid_alloc, out_pasid, pasid_alloc),
        op!(IOASID_PASID_FREE, ioasid_pasid_free, pasid, pasid_free),
        op!(IOASID_PASID_GET, ioasid_pasid_ref, pasid, pasid_get),
        op!(IOASID_PASID_PUT, ioasid_pasid_ref, pasid, pasid_put),
        op!(IOASID_PASID_FIND, ioasid_pasid_find, out_private_data, pasid_find),
        op!(IOASID_VPASID_LOOKUP, ioasid_vpasid_lookup, out_pasid, vpasid_lookup),
        op!(IOASID_VIOMMU_SET_PASIDS, ioasid_viommu_set_pasids, __reserved, viommu_set_pasids),
        op!(IOASID_VDEVICE_ATTACH_PASID, ioasid_vdevice_attach_pasid, out_pasid, vdevice_attach_pasid),
        op!(IOASID_VDEVICE_DETACH_PASID, ioasid_vdevice_detach_pasid, __reserved, vdevice_detach_pasid),
        op!(IOASID_DEVICE_NEW, ioasid_device_new, out_fd, device_new),
        op!(IOASID_DEVICE_ATTACH, ioasid_device_attach, __reserved, device_attach),
        op!(IOASID_DEVICE_DETACH, ioasid_device_detach, pasid, device_detach),
    ],
);

/// The buffer commands are decoded into: the table's largest struct.
const BUF: usize = OPS.largest();

pub fn ioctl(ctx: &Arc<Context>, mem: &dyn UserMemory, request: u32, arg: u64) -> Result<i32, Errno> {
    run_op::<BUF>(OPS.get(request), ctx, mem, request, arg)
}

fn set_alloc(u: &Ucmd, mut c: ioasid_set_alloc) -> Res {
    if c.flags != 0 || c.__reserved != 0 {
        return Err(Errno::EOPNOTSUPP);
    }
    let parent = (c.parent_id != 0).then_some(SetObjectId::new(c.parent_id));
    c.out_set_id = u.ctx.ioasid_set_alloc(parent, c.quota)?.get();
    u.respond_created(&c, c.out_set_id)
}

fn set_quota(u: &Ucmd, c: ioasid_set_quota) -> Res {
    let set = u.ctx.get(SetObjectId::new(c.set_id))?;
    Ok(global().set_quota(set.id(), c.quota)?)
}

fn set_usage(u: &Ucmd, mut c: ioasid_set_usage) -> Res {
    let set = u.ctx.get(SetObjectId::new(c.set_id))?;
    (c.out_quota, c.out_used) = global().usage(set.id())?;
    u.respond(&c)
}

fn pasid_alloc(u: &Ucmd, mut c: ioasid_pasid_alloc) -> Res {
    if c.flags & !IOASID_PASID_ALLOC_PRIVATE != 0 || c.__reserved != 0 {
        return Err(Errno::EOPNOTSUPP);
    }
    let set = u.ctx.get(SetObjectId::new(c.set_id))?;
    c.out_pasid = if c.flags & IOASID_PASID_ALLOC_PRIVATE != 0 {
        global().alloc_private(set.id(), c.vpasid, c.private_data)?
    } else {
        global().alloc(set.id(), c.min, c.max, c.private_data)?
    };
    u.respond(&c).inspect_err(|_| {
        let _ = global().free(set.id(), c.out_pasid);
    })
}

fn pasid_free(u: &Ucmd, c: ioasid_pasid_free) -> Res {
    let set = u.ctx.get(SetObjectId::new(c.set_id))?;
    Ok(global().free(set.id(), c.pasid)?)
}

fn pasid_get(u: &Ucmd, c: ioasid_pasid_ref) -> Res {
    Ok(u.ctx.set_owner().get(c.pasid)?)
}

fn pasid_put(u: &Ucmd, c: ioasid_pasid_ref) -> Res {
    Ok(u.ctx.set_owner().put(c.pasid)?)
}

fn pasid_find(u: &Ucmd, mut c: ioasid_pasid_find) -> Res {
    let set = u.ctx.get(SetObjectId::new(c.set_id))?;
    c.out_private_data = global().find(set.id(), c.pasid).ok_or(Errno::ENOENT)?;
    u.respond(&c)
}

fn vpasid_lookup(u: &Ucmd, mut c: ioasid_vpasid_lookup) -> Res {
    let set = u.ctx.get(SetObjectId::new(c.set_id))?;
    c.out_pasid = global().host_pasid(set.id(), c.vpasid).ok_or(Errno::ENOENT)?;
    u.respond(&c)
}

fn viommu_set_pasids(u: &Ucmd, c: ioasid_viommu_set_pasids) -> Res {
    if c.__reserved != 0 {
        return Err(Errno::EOPNOTSUPP);
    }
    Ok(u.ctx.viommu_set_pasid_set(ViommuId::new(c.viommu_id), SetObjectId::new(c.set_id))?)
}

fn vdevice_attach_pasid(u: &Ucmd, mut c: ioasid_vdevice_attach_pasid) -> Res {
    if c.flags != 0 {
        return Err(Errno::EOPNOTSUPP);
    }
    c.out_pasid = u.ctx.vdevice_attach_pasid(VdeviceId::new(c.vdevice_id), c.vpasid, PtId::new(c.pt_id))?;
    u.respond(&c).inspect_err(|_| {
        let _ = u.ctx.vdevice_detach_pasid(VdeviceId::new(c.vdevice_id), c.vpasid);
    })
}

fn vdevice_detach_pasid(u: &Ucmd, c: ioasid_vdevice_detach_pasid) -> Res {
    if c.__reserved != 0 {
        return Err(Errno::EOPNOTSUPP);
    }
    Ok(u.ctx.vdevice_detach_pasid(VdeviceId::new(c.vdevice_id), c.vpasid)?)
}

/// The IOMMU a new device sits behind, by `IOMMU_HW_INFO_TYPE_*` (0: VT-d).
fn iommu_of(kind: u32) -> Option<ioasid_engine::IommuModel> {
    use ioasid_engine::IommuModel;
    Some(match kind {
        0 | 1 => IommuModel::VTD,
        2 => IommuModel::ArmSmmuV3,
        ioasid_engine::model::amd::IOMMU_HW_INFO_TYPE_AMD => IommuModel::AmdVi,
        ioasid_engine::model::selftest::IOMMU_HW_INFO_TYPE_SELFTEST => IommuModel::Selftest { huge: false },
        _ => return None,
    })
}

/// `IOASID_DEVICE_NEW`: an emulated device bound in this context, and its
/// file, which a back end in another process opens a port on (see
/// `device_file`). Closing the file everywhere unbinds the device.
fn device_new(u: &Ucmd, mut c: ioasid_device_new) -> Res {
    if c.flags & !(IOASID_DEVICE_PRI | IOASID_DEVICE_DIRTY) != 0 || c.__reserved != 0 {
        return Err(Errno::EOPNOTSUPP);
    }
    let iommu = iommu_of(c.iommu).ok_or(Errno::EOPNOTSUPP)?;
    if c.rid > 0xffff || c.pasid_bits > 20 {
        return Err(Errno::EINVAL);
    }
    let fds = u.fds()?;
    let mut info = ioasid_engine::DeviceInfo::behind(iommu, "back end", c.rid);
    info.max_pasid_log2 = c.pasid_bits as u8;
    info.pri = c.flags & IOASID_DEVICE_PRI != 0;
    info.dirty_tracking = c.flags & IOASID_DEVICE_DIRTY != 0;
    let fd = crate::user::new_fd(c"ioasid:[device]")?;
    let id = u.ctx.bind_device(info)?;
    let file = crate::device_file::DeviceFile::new(u.ctx.clone(), id)?;
    c.out_dev_id = id.get();
    // On failure `file` drops and unbinds the device; `fd` closes.
    fds.install(crate::files::File::Device(file), fd, &mut |n| {
        c.out_fd = n;
        u.respond(&c)
    })
}

/// `IOASID_DEVICE_ATTACH`: attaches the device (at the RID or `pasid`) to
/// an IOAS or HWPT, replacing what is attached there, as
/// `VFIO_DEVICE_ATTACH_IOMMUFD_PT` does; `pt_id` becomes the HWPT's ID.
fn device_attach(u: &Ucmd, mut c: ioasid_device_attach) -> Res {
    if c.flags & !IOASID_DEVICE_PASID != 0 || c.__reserved != 0 {
        return Err(Errno::EOPNOTSUPP);
    }
    let dev_id = ioasid_engine::DeviceId::new(c.dev_id);
    let dev = u.ctx.get(dev_id)?;
    let pasid = (c.flags & IOASID_DEVICE_PASID != 0).then_some(c.pasid);
    let pt = PtId::new(c.pt_id);
    let hwpt = match (pasid, dev.attached_at(pasid).is_some()) {
        (None, false) => u.ctx.attach(dev_id, pt)?,
        (None, true) => u.ctx.replace(dev_id, pt)?,
        (Some(p), false) => u.ctx.attach_pasid(dev_id, p, pt)?,
        (Some(p), true) => u.ctx.replace_pasid(dev_id, p, pt)?,
    };
    c.pt_id = hwpt.get();
    u.respond(&c)
}

/// `IOASID_DEVICE_DETACH`: detaches the device at the RID or `pasid`.
fn device_detach(u: &Ucmd, c: ioasid_device_detach) -> Res {
    if c.flags & !IOASID_DEVICE_PASID != 0 {
        return Err(Errno::EOPNOTSUPP);
    }
    let dev_id = ioasid_engine::DeviceId::new(c.dev_id);
    match (c.flags & IOASID_DEVICE_PASID != 0).then_some(c.pasid) {
        None => Ok(u.ctx.detach(dev_id)?),
        Some(p) => Ok(u.ctx.detach_pasid(dev_id, p)?),
    }
}
