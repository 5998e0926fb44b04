//! The ioctl dispatcher: one table from command number to handler, the
//! `size` rules of iommufd's extensible structs, and each command's checks in
//! the order Linux makes them, so the same bad input gets the same errno.

use std::os::fd::AsFd;
use std::sync::Arc;

use ioasid_engine::model::Stage1;
use ioasid_engine::{
    AccountMode, Context, DeviceId, FaultId, HwInfo, HwptFlags, HwptPaging, HwptPagingId, IoasId, IommuModel,
    IovaRange, NestParentId, NestedData, Object, ObjectId, PageFormat, PasidUse, Perm, ViommuId, ViommuType,
};

use zerocopy::{FromBytes, IntoBytes};

use crate::errno::Errno;
use crate::selftest;
use crate::uapi::*;
use crate::ucmd::{OpTable, Ucmd, UserEntries, copy_struct_from_user, driver_data, each_entry_bytes, op, run_op};
use crate::user::UserMemory;

type Res = Result<(), Errno>;

/// Up to and including the selftest command, 0x80 + 32.
const NOPS: usize = 33;

/// Each command at its `IOMMUFD_CMD_*` number; the order below is free.
static OPS: OpTable<NOPS> = OpTable::by_number(
    IOMMUFD_CMD_BASE,
    &[
        op!(IOMMU_DESTROY, iommu_destroy, id, destroy),
        op!(IOMMU_IOAS_ALLOC, iommu_ioas_alloc, out_ioas_id, ioas_alloc),
        op!(IOMMU_IOAS_ALLOW_IOVAS, iommu_ioas_allow_iovas, allowed_iovas, ioas_allow_iovas),
        op!(IOMMU_IOAS_COPY, iommu_ioas_copy, src_iova, ioas_copy),
        op!(IOMMU_IOAS_IOVA_RANGES, iommu_ioas_iova_ranges, out_iova_alignment, ioas_iova_ranges),
        op!(IOMMU_IOAS_MAP, iommu_ioas_map, iova, ioas_map),
        op!(IOMMU_IOAS_UNMAP, iommu_ioas_unmap, length, ioas_unmap),
        op!(IOMMU_OPTION, iommu_option, val64, option),
        op!(IOMMU_VFIO_IOAS, iommu_vfio_ioas, __reserved, vfio_ioas),
        op!(IOMMU_HWPT_ALLOC, iommu_hwpt_alloc, __reserved, hwpt_alloc),
        op!(IOMMU_GET_HW_INFO, iommu_hw_info, __reserved, get_hw_info),
        op!(IOMMU_HWPT_SET_DIRTY_TRACKING, iommu_hwpt_set_dirty_tracking, __reserved, hwpt_set_dirty_tracking),
        op!(IOMMU_HWPT_GET_DIRTY_BITMAP, iommu_hwpt_get_dirty_bitmap, data, hwpt_get_dirty_bitmap),
        op!(IOMMU_HWPT_INVALIDATE, iommu_hwpt_invalidate, __reserved, hwpt_invalidate),
        op!(IOMMU_FAULT_QUEUE_ALLOC, iommu_fault_alloc, out_fault_fd, fault_alloc),
        op!(IOMMU_IOAS_MAP_FILE, iommu_ioas_map_file, iova, ioas_map_file),
        op!(IOMMU_VIOMMU_ALLOC, iommu_viommu_alloc, out_viommu_id, viommu_alloc),
        op!(IOMMU_VDEVICE_ALLOC, iommu_vdevice_alloc, virt_id, vdevice_alloc),
        op!(
            crate::change_process::IOMMU_IOAS_CHANGE_PROCESS,
            crate::change_process::iommu_ioas_change_process,
            __reserved,
            crate::change_process::change_process
        ),
        op!(IOMMU_VEVENTQ_ALLOC, iommu_veventq_alloc, out_veventq_fd, veventq_alloc),
        op!(
            crate::hw_queue::IOMMU_HW_QUEUE_ALLOC,
            crate::hw_queue::iommu_hw_queue_alloc,
            length,
            crate::hw_queue::hw_queue_alloc
        ),
        op!(IOMMU_IOAS_NOIOMMU_GET_PA, iommu_ioas_noiommu_get_pa, out_phys, ioas_noiommu_get_pa),
        op!(selftest::IOMMU_TEST_CMD, selftest::iommu_test_cmd, last, selftest::run),
    ],
);

/// The buffer commands are decoded into: the table's largest struct.
const BUF: usize = OPS.largest();

/// Runs one ioctl on an iommufd. `arg` is the caller's argument (for
/// iommufd's own commands, a pointer to the struct). `Ok` carries the value
/// the ioctl returns.
pub fn ioctl(ctx: &Arc<Context>, mem: &dyn UserMemory, request: u32, arg: u64) -> Result<i32, Errno> {
    if (request >> 8) & 0xff == crate::ext::IOASID_TYPE {
        return crate::ext::ioctl(ctx, mem, request, arg);
    }
    if request == selftest::IOMMU_TEST_CMD
        && let Some(r) = crate::dmabuf::test_cmd(ctx, mem, arg)
    {
        return r;
    }
    if !OPS.covers(request) {
        // Outside iommufd's numbers: VFIO's container ioctls, as Linux routes them.
        return crate::vfio::ioctl(&Ucmd::without_struct(ctx, mem, arg), request);
    }
    run_op::<BUF>(OPS.get(request), ctx, mem, request, arg)
}

fn destroy(u: &Ucmd, c: iommu_destroy) -> Res {
    Ok(u.ctx.destroy(ObjectId::new(c.id))?)
}

fn ioas_alloc(u: &Ucmd, mut c: iommu_ioas_alloc) -> Res {
    if c.flags != 0 {
        return Err(Errno::EOPNOTSUPP);
    }
    c.out_ioas_id = u.ctx.ioas_alloc()?.get();
    u.respond_created(&c, c.out_ioas_id)
}

fn ioas_iova_ranges(u: &Ucmd, mut c: iommu_ioas_iova_ranges) -> Res {
    if c.__reserved != 0 {
        return Err(Errno::EOPNOTSUPP);
    }
    let (ranges, alignment) = u.ctx.get(IoasId::new(c.ioas_id))?.iova_ranges();
    let max = c.num_iovas as usize;
    for (i, r) in ranges.iter().take(max).enumerate() {
        let elm = iommu_iova_range { start: r.start, last: r.last };
        u.mem.write(c.allowed_iovas.wrapping_add(16 * i as u64), elm.as_bytes())?;
    }
    c.num_iovas = ranges.len() as u32;
    c.out_iova_alignment = alignment;
    u.respond(&c)?;
    if ranges.len() > max {
        return Err(Errno::EMSGSIZE);
    }
    Ok(())
}

fn ioas_allow_iovas(u: &Ucmd, c: iommu_ioas_allow_iovas) -> Res {
    if c.__reserved != 0 {
        return Err(Errno::EOPNOTSUPP);
    }
    let ioas = u.ctx.get(IoasId::new(c.ioas_id))?;
    // Checked as they are read, as Linux does (a bad range before a bad
    // pointer is EINVAL), each against the one range read so far that can
    // overlap it: the highest starting at or below its end.
    let mut seen: std::collections::BTreeMap<u64, u64> = std::collections::BTreeMap::new();
    for i in 0..c.num_iovas as u64 {
        let mut elm = iommu_iova_range::default();
        u.mem.read(c.allowed_iovas.wrapping_add(16 * i), elm.as_mut_bytes())?;
        let r = IovaRange::new(elm.start, elm.last);
        if r.start >= r.last || seen.range(..=r.last).next_back().is_some_and(|(_, &last)| last >= r.start) {
            return Err(Errno::EINVAL);
        }
        seen.insert(r.start, r.last);
    }
    let ranges: Vec<IovaRange> = seen.into_iter().map(|(start, last)| IovaRange::new(start, last)).collect();
    Ok(ioas.allow_iovas(&ranges)?)
}

const MAP_FLAGS: u32 = IOMMU_IOAS_MAP_FIXED_IOVA | IOMMU_IOAS_MAP_WRITEABLE | IOMMU_IOAS_MAP_READABLE;

/// The checks MAP, MAP_FILE and COPY share, in Linux's order after the flags.
fn map_perm(flags: u32, values: &[u64]) -> Result<Perm, Errno> {
    if values.contains(&u64::MAX) {
        return Err(Errno::EOVERFLOW);
    }
    let perm = Perm { read: flags & IOMMU_IOAS_MAP_READABLE != 0, write: flags & IOMMU_IOAS_MAP_WRITEABLE != 0 };
    if !perm.read && !perm.write {
        return Err(Errno::EINVAL);
    }
    Ok(perm)
}

fn fixed(flags: u32, iova: u64) -> Option<u64> {
    (flags & IOMMU_IOAS_MAP_FIXED_IOVA != 0).then_some(iova)
}

fn ioas_map(u: &Ucmd, mut c: iommu_ioas_map) -> Res {
    if c.flags & !MAP_FLAGS != 0 || c.__reserved != 0 {
        return Err(Errno::EOPNOTSUPP);
    }
    let perm = map_perm(c.flags, &[c.iova, c.length])?;
    c.iova = u.map_user(IoasId::new(c.ioas_id), c.user_va, c.length, fixed(c.flags, c.iova), perm)?;
    u.respond(&c)
}

fn ioas_map_file(u: &Ucmd, mut c: iommu_ioas_map_file) -> Res {
    if c.flags & !MAP_FLAGS != 0 {
        return Err(Errno::EOPNOTSUPP);
    }
    let perm = map_perm(c.flags, &[c.iova, c.length])?;
    u.ctx.get(IoasId::new(c.ioas_id))?;
    let fds = u.fds()?;
    if let Some(iova) = crate::dmabuf::map_file(u, c.ioas_id, c.fd, c.start, c.length, fixed(c.flags, c.iova), perm) {
        c.iova = iova?;
        return u.respond(&c);
    }
    let fd = fds.get(c.fd)?;
    c.iova = u.ctx.map_file(IoasId::new(c.ioas_id), fd.as_fd(), c.start, c.length, fixed(c.flags, c.iova), perm)?;
    u.respond(&c)
}

fn ioas_copy(u: &Ucmd, mut c: iommu_ioas_copy) -> Res {
    if c.flags & !MAP_FLAGS != 0 {
        return Err(Errno::EOPNOTSUPP);
    }
    let perm = map_perm(c.flags, &[c.length, c.src_iova, c.dst_iova])?;
    c.dst_iova = u.ctx.copy(
        IoasId::new(c.dst_ioas_id),
        IoasId::new(c.src_ioas_id),
        c.src_iova,
        c.length,
        fixed(c.flags, c.dst_iova),
        perm,
    )?;
    u.respond(&c)
}

/// Linux answers this only for devices with no IOMMU at all (VFIO's
/// no-IOMMU mode, `CONFIG_IOMMUFD_NOIOMMU`); every device ioasid offers has
/// one, and its process's physical addresses are not ioasid's to give, so
/// it answers as a kernel built without that option.
fn ioas_noiommu_get_pa(_u: &Ucmd, _c: iommu_ioas_noiommu_get_pa) -> Res {
    Err(Errno::EOPNOTSUPP)
}

fn ioas_unmap(u: &Ucmd, mut c: iommu_ioas_unmap) -> Res {
    u.ctx.get(IoasId::new(c.ioas_id))?;
    let unmap_all = c.iova == 0 && c.length == u64::MAX;
    if !unmap_all && (c.iova == u64::MAX || c.length == u64::MAX) {
        return Err(Errno::EOVERFLOW);
    }
    c.length = u.ctx.unmap(IoasId::new(c.ioas_id), c.iova, c.length)?;
    u.respond(&c)
}

fn option(u: &Ucmd, mut c: iommu_option) -> Res {
    if c.__reserved != 0 {
        return Err(Errno::EOPNOTSUPP);
    }
    match c.option_id {
        IOMMU_OPTION_RLIMIT_MODE => {
            if c.object_id != 0 {
                return Err(Errno::EOPNOTSUPP);
            }
            match c.op {
                IOMMU_OPTION_OP_GET => c.val64 = u64::from(u.ctx.account_mode() == AccountMode::Process),
                IOMMU_OPTION_OP_SET => u.ctx.set_account_mode(c.val64).map_err(Errno::from)?,
                _ => return Err(Errno::EOPNOTSUPP),
            }
        }
        IOMMU_OPTION_HUGE_PAGES => {
            let ioas = u.ctx.get(IoasId::new(c.object_id))?;
            match (c.op, c.val64) {
                (IOMMU_OPTION_OP_GET, _) => c.val64 = u64::from(ioas.huge_pages()),
                (IOMMU_OPTION_OP_SET, v @ (0 | 1)) => ioas.set_huge_pages(v == 1)?,
                (IOMMU_OPTION_OP_SET, _) => return Err(Errno::EINVAL),
                _ => return Err(Errno::EOPNOTSUPP),
            }
        }
        _ => return Err(Errno::EOPNOTSUPP),
    }
    // Only val64 is written back.
    u.mem.write(u.arg + core::mem::offset_of!(iommu_option, val64) as u64, c.val64.as_bytes())
}

fn hwpt_alloc(u: &Ucmd, mut c: iommu_hwpt_alloc) -> Res {
    if c.__reserved != 0 {
        return Err(Errno::EOPNOTSUPP);
    }
    if (c.data_type == IOMMU_HWPT_DATA_NONE) != (c.data_len == 0) {
        return Err(Errno::EINVAL);
    }
    let dev = u.ctx.get(DeviceId::new(c.dev_id))?;
    let pt = u.ctx.object(ObjectId::new(c.pt_id)).map_err(|_| Errno::EINVAL)?;
    let fault = (c.flags & IOMMU_HWPT_FAULT_ID_VALID != 0).then_some(FaultId::new(c.fault_id));
    let id = match pt {
        Object::Ioas(_) => {
            let valid = IOMMU_HWPT_ALLOC_NEST_PARENT
                | IOMMU_HWPT_ALLOC_DIRTY_TRACKING
                | IOMMU_HWPT_FAULT_ID_VALID
                | IOMMU_HWPT_ALLOC_PASID;
            if c.flags & !valid != 0 {
                return Err(Errno::EOPNOTSUPP);
            }
            if c.flags & IOMMU_HWPT_ALLOC_DIRTY_TRACKING != 0 && !dev.info().dirty_tracking {
                return Err(Errno::EOPNOTSUPP);
            }
            if c.flags & IOMMU_HWPT_FAULT_ID_VALID != 0 && c.flags & IOMMU_HWPT_ALLOC_NEST_PARENT != 0 {
                return Err(Errno::EOPNOTSUPP);
            }
            let format = match c.data_len {
                0 => None,
                _ => Some(paging_data(u, dev.info().iommu, &c)?),
            };
            let flags = HwptFlags {
                nest_parent: c.flags & IOMMU_HWPT_ALLOC_NEST_PARENT != 0,
                dirty_tracking: c.flags & IOMMU_HWPT_ALLOC_DIRTY_TRACKING != 0,
            };
            u.ctx
                .hwpt_alloc_with(
                    DeviceId::new(c.dev_id),
                    IoasId::new(c.pt_id),
                    flags,
                    fault,
                    format,
                    pasid_use(c.flags),
                )?
                .get()
        }
        // A nested HWPT on a nesting parent or on a vIOMMU (over its parent).
        Object::HwptPaging(_) | Object::Viommu(_) => {
            if c.flags & !(IOMMU_HWPT_FAULT_ID_VALID | IOMMU_HWPT_ALLOC_PASID) != 0 || c.data_len == 0 {
                return Err(Errno::EOPNOTSUPP);
            }
            let parent = match &pt {
                Object::Viommu(viommu) => viommu.hwpt().clone(),
                Object::HwptPaging(parent) => {
                    parent.check_nest_parent()?;
                    parent.clone()
                }
                _ => unreachable!("matched above"),
            };
            let data = nested_data(u, &parent, &c)?;
            let (dev, parent_id) = (DeviceId::new(c.dev_id), NestParentId::new(c.pt_id));
            u.ctx.hwpt_alloc_nested_with(dev, parent_id, data, fault, pasid_use(c.flags))?.get()
        }
        _ => return Err(Errno::EINVAL),
    };
    c.out_hwpt_id = id;
    u.respond_created(&c, id)
}

/// Linux's rule for tables of the uAPI: PASIDs only on those allocated
/// with `IOMMU_HWPT_ALLOC_PASID`.
fn pasid_use(flags: u32) -> PasidUse {
    if flags & IOMMU_HWPT_ALLOC_PASID != 0 { PasidUse::Compatible } else { PasidUse::RidOnly }
}

/// The format a paging HWPT's driver data asks the device's IOMMU for.
fn paging_data(u: &Ucmd, iommu: IommuModel, c: &iommu_hwpt_alloc) -> Result<PageFormat, Errno> {
    let layout = iommu.with_ops(|m| m.paging_layout(c.data_type)).ok_or(Errno::EOPNOTSUPP)?;
    let data = driver_data(u.mem, c.data_uptr, c.data_len, layout)?;
    Ok(iommu.with_ops(|m| m.paging_data(&data))?)
}

/// The stage-1 data of a nested HWPT, in the type the parent's IOMMU takes.
fn nested_data(u: &Ucmd, parent: &HwptPaging, c: &iommu_hwpt_alloc) -> Result<NestedData, Errno> {
    let format = parent.domain().format();
    let iommu = IommuModel::owning(format).ok_or(Errno::EOPNOTSUPP)?;
    let layout = iommu.with_ops(|m| m.nested_layout(c.data_type, format)).ok_or(Errno::EOPNOTSUPP)?;
    let data = driver_data(u.mem, c.data_uptr, c.data_len, layout)?;
    Ok(iommu.with_ops(|m| m.nested_data(c.data_type, &data))?)
}

/// `IOMMU_HWPT_INVALIDATE` on a nested HWPT: each entry goes to its
/// stage 1's model, stopping at the first it rejects.
fn stage1_invalidate(u: &Ucmd, c: &iommu_hwpt_invalidate, stage1: &dyn Stage1) -> (u32, Res) {
    let Some(layout) = stage1.invalidation() else {
        return (0, Err(Errno::EOPNOTSUPP));
    };
    if c.data_type != layout.data_type {
        return (0, Err(Errno::EINVAL));
    }
    let r = each_entry_bytes(u, c, layout, |entry| Ok(stage1.invalidate(entry)?));
    // Back ends in other processes cache translations through stage 1 too.
    ioasid_engine::epoch::synchronize_external();
    r
}

fn viommu_alloc(u: &Ucmd, mut c: iommu_viommu_alloc) -> Res {
    // Linux has no check of __reserved here.
    if c.flags != 0 || c.r#type == IOMMU_VIOMMU_TYPE_DEFAULT {
        return Err(Errno::EOPNOTSUPP);
    }
    let Some(kind) = ViommuType::from_uapi(c.r#type) else {
        // Linux finds the device before asking its driver about the type.
        u.ctx.get(DeviceId::new(c.dev_id))?;
        return Err(Errno::EOPNOTSUPP);
    };
    if c.data_len != 0 {
        c.out_viommu_id = viommu_alloc_with_data(u, &c, kind)?;
        return u.respond_created(&c, c.out_viommu_id);
    }
    c.out_viommu_id = u.ctx.viommu_alloc(DeviceId::new(c.dev_id), HwptPagingId::new(c.hwpt_id), kind)?.get();
    u.respond_created(&c, c.out_viommu_id)
}

/// A vIOMMU whose type takes driver data (the mock's, in 7.3): the data
/// is copied in once the device and HWPT are checked, decides the memory
/// the vIOMMU shares through `mmap`, and is written back with where to map
/// it. Returns the vIOMMU's ID.
fn viommu_alloc_with_data(u: &Ucmd, c: &iommu_viommu_alloc, kind: ViommuType) -> Result<u32, Errno> {
    let ops = kind.ops();
    let layout = ops.alloc_layout().ok_or(Errno::EOPNOTSUPP)?;
    let mut data = vec![0u8; layout.len];
    let len = c.data_len as usize;
    let id = u.ctx.viommu_alloc_mmap(DeviceId::new(c.dev_id), HwptPagingId::new(c.hwpt_id), kind, || {
        if len < layout.min_len {
            return Err(Errno::EINVAL);
        }
        copy_struct_from_user(u.mem, c.data_uptr, len, &mut data)?;
        Ok(ops.alloc_region(&data))
    })?;
    let region = u.ctx.get(id).ok().and_then(|v| v.mmap_region().map(|r| (r.offset(), r.len())));
    let (offset, length) = region.expect("made with a region");
    let reply = ops.alloc_reply(&data, offset, length);
    // Linux's copy_struct_to_user: what fits, and zeroes past what it knows.
    let known = len.min(reply.len());
    let written = u
        .mem
        .write(c.data_uptr, &reply[..known])
        .and_then(|()| u.mem.zero(c.data_uptr.wrapping_add(known as u64), (len - known) as u64));
    written.map(|()| id.get()).inspect_err(|_| {
        let _ = u.ctx.destroy(id.any());
    })
}

fn vdevice_alloc(u: &Ucmd, mut c: iommu_vdevice_alloc) -> Res {
    c.out_vdevice_id = u.ctx.vdevice_alloc(ViommuId::new(c.viommu_id), DeviceId::new(c.dev_id), c.virt_id)?.get();
    u.respond_created(&c, c.out_vdevice_id)
}

/// Linux's bound on a vEVENTQ's depth, one that fits every IOMMU's queue.
const VEVENTQ_MAX_DEPTH: u32 = 1 << 19;

fn veventq_alloc(u: &Ucmd, mut c: iommu_veventq_alloc) -> Res {
    if c.flags != 0 || c.__reserved != 0 || c.r#type == IOMMU_VEVENTQ_TYPE_DEFAULT {
        return Err(Errno::EOPNOTSUPP);
    }
    let max = u.ctx.config().max_queue_depth.map_or(VEVENTQ_MAX_DEPTH, |m| m.min(VEVENTQ_MAX_DEPTH));
    if c.veventq_depth == 0 || c.veventq_depth > max {
        return Err(Errno::EINVAL);
    }
    u.fds()?;
    let (id, queue) = u.ctx.veventq_alloc(ViommuId::new(c.viommu_id), c.r#type, c.veventq_depth)?;
    c.out_veventq_id = id.get();
    let respond = |fd| {
        c.out_veventq_fd = fd;
        u.respond(&c)
    };
    queue_fd(u, id.into(), queue, respond, |q, signal| {
        crate::files::File::Veventq(Arc::new(crate::veventq::VeventqFile::new(u.ctx.clone(), q, signal)))
    })
}

fn fault_alloc(u: &Ucmd, mut c: iommu_fault_alloc) -> Res {
    if c.flags != 0 {
        return Err(Errno::EOPNOTSUPP);
    }
    u.fds()?;
    let (id, queue) = u.ctx.fault_alloc()?;
    c.out_fault_id = id.get();
    let respond = |fd| {
        c.out_fault_fd = fd;
        u.respond(&c)
    };
    queue_fd(u, id.into(), queue, respond, |q, signal| {
        crate::files::File::Fault(Arc::new(crate::fault::FaultFile::new(u.ctx.clone(), q, signal)))
    })
}

/// Gives the caller an fd for new queue object `id`: `respond` writes the
/// command back with the fd's number, and `file` makes what the fd is. On
/// any failure the object is destroyed and no fd is left behind.
fn queue_fd<Q>(
    u: &Ucmd,
    id: ObjectId,
    queue: Arc<Q>,
    mut respond: impl FnMut(u32) -> Res,
    file: impl FnOnce(Arc<Q>, std::os::fd::OwnedFd) -> crate::files::File,
) -> Res {
    let undo = |queue: Option<Arc<Q>>| {
        drop(queue);
        let _ = u.ctx.destroy(id);
    };
    let (fd, signal) = match crate::user::new_eventfd() {
        Ok(fds) => fds,
        Err(e) => {
            undo(Some(queue));
            return Err(e);
        }
    };
    let installed = u.fds().and_then(|fds| fds.install(file(queue, signal), fd, &mut |n| respond(n as u32)));
    installed.inspect_err(|_| undo(None))
}

fn get_hw_info(u: &Ucmd, mut c: iommu_hw_info) -> Res {
    if c.flags & !IOMMU_HW_INFO_FLAG_INPUT_TYPE != 0 || c.__reserved != [0; 3] {
        return Err(Errno::EOPNOTSUPP);
    }
    // The type field is in/out: a caller may ask for one type (later kernels).
    let wanted =
        if c.flags & IOMMU_HW_INFO_FLAG_INPUT_TYPE != 0 { c.out_data_type } else { IOMMU_HW_INFO_TYPE_DEFAULT };
    let dev = u.ctx.get(DeviceId::new(c.dev_id))?;
    let info = dev.info();
    let HwInfo { data_type: kind, data } = info.hw_info();
    if wanted != IOMMU_HW_INFO_TYPE_DEFAULT && wanted != kind {
        return Err(Errno::EOPNOTSUPP);
    }
    // Copy what fits, zero the rest of the caller's buffer.
    let n = data.len().min(c.data_len as usize);
    u.mem.write(c.data_uptr, &data[..n])?;
    u.mem.zero(c.data_uptr.wrapping_add(n as u64), u64::from(c.data_len) - n as u64)?;
    c.data_len = data.len() as u32;
    c.out_data_type = kind;
    c.out_capabilities = if info.dirty_tracking { IOMMU_HW_CAP_DIRTY_TRACKING } else { 0 };
    // No emulated device has an ATC (nor the mock, whose driver never
    // claims ATS), so 7.3 tells the caller not to use ATS.
    c.out_capabilities |= IOMMU_HW_CAP_PCI_ATS_NOT_SUPPORTED;
    c.out_max_pasid_log2 = info.max_pasid_log2;
    // The PCI PASID capability's Execute and Privileged bits, enabled
    // with PASIDs.
    if info.max_pasid_log2 != 0 {
        if info.pasid_exec {
            c.out_capabilities |= IOMMU_HW_CAP_PCI_PASID_EXEC;
        }
        if info.pasid_priv {
            c.out_capabilities |= IOMMU_HW_CAP_PCI_PASID_PRIV;
        }
    }
    u.respond(&c)
}

fn vfio_ioas(u: &Ucmd, mut c: iommu_vfio_ioas) -> Res {
    if c.__reserved != 0 {
        return Err(Errno::EOPNOTSUPP);
    }
    match c.op {
        IOMMU_VFIO_IOAS_GET => {
            c.ioas_id = u.ctx.vfio_ioas()?.get();
            u.respond(&c)
        }
        IOMMU_VFIO_IOAS_SET => Ok(u.ctx.set_vfio_ioas(Some(IoasId::new(c.ioas_id)))?),
        IOMMU_VFIO_IOAS_CLEAR => Ok(u.ctx.set_vfio_ioas(None)?),
        _ => Err(Errno::EOPNOTSUPP),
    }
}

/// Bounds one call's work, as Linux does.
const INVALIDATE_ENTRY_NUM_MAX: u32 = 1 << 19;

fn hwpt_invalidate(u: &Ucmd, mut c: iommu_hwpt_invalidate) -> Res {
    let mut processed = 0;
    let rc = if c.__reserved != 0 {
        Err(Errno::EOPNOTSUPP)
    } else if c.entry_num != 0
        && (c.data_uptr == 0 || c.entry_len == 0 || c.entry_len > 4096 || c.entry_num > INVALIDATE_ENTRY_NUM_MAX)
    {
        Err(Errno::EINVAL)
    } else {
        // Only nested HWPTs take user invalidations.
        match u.ctx.object(ObjectId::new(c.hwpt_id)) {
            Ok(Object::HwptNested(n)) => {
                let (done, rc) = stage1_invalidate(u, &c, n.data().stage1());
                processed = done;
                rc
            }
            // A vIOMMU's invalidations are its guest's command queue.
            Ok(Object::Viommu(v)) => {
                let mut entries = UserEntries::new(u, &c);
                let (done, rc) = v.invalidate_entries(&mut entries);
                processed = done;
                rc.map_err(|e| entries.errno(e))
            }
            // Linux 7.3 answers EINVAL for other objects, 6.12 ENOENT; the
            // two suites check opposite errnos, and 6.12's is kept.
            _ => Err(Errno::ENOENT),
        }
    };
    // Linux reports how many entries it handled, even on failure.
    c.entry_num = processed;
    u.respond(&c).map_err(|_| Errno::EFAULT)?;
    rc
}

fn hwpt_set_dirty_tracking(u: &Ucmd, c: iommu_hwpt_set_dirty_tracking) -> Res {
    if c.flags & !IOMMU_HWPT_DIRTY_TRACKING_ENABLE != 0 {
        return Err(Errno::EOPNOTSUPP);
    }
    let hwpt = u.ctx.get(HwptPagingId::new(c.hwpt_id))?;
    Ok(hwpt.set_dirty_tracking(c.flags & IOMMU_HWPT_DIRTY_TRACKING_ENABLE != 0)?)
}

fn hwpt_get_dirty_bitmap(u: &Ucmd, c: iommu_hwpt_get_dirty_bitmap) -> Res {
    if c.flags & !IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR != 0 || c.__reserved != 0 {
        return Err(Errno::EOPNOTSUPP);
    }
    let hwpt = u.ctx.get(HwptPagingId::new(c.hwpt_id))?;
    // Linux's iommufd_check_iova_range, in its order.
    if c.length == 0 {
        return Err(Errno::EINVAL);
    }
    let last = c.iova.checked_add(c.length - 1).ok_or(Errno::EOVERFLOW)?;
    let align = hwpt.ioas().iova_ranges().1;
    if c.iova & (align - 1) != 0 || last.wrapping_add(1) & (align - 1) != 0 || c.page_size == 0 {
        return Err(Errno::EINVAL);
    }
    if c.iova % c.page_size != 0 || last.wrapping_add(1) % c.page_size != 0 {
        return Err(Errno::EINVAL);
    }
    let nbits = c.length / c.page_size;
    let bitmap = Bitmap { mem: u.mem, base: c.data, nbytes: nbits.div_ceil(8) };
    bitmap.check()?;
    let mut runs: Vec<(u64, u64)> = Vec::new();
    let range = IovaRange::new(c.iova, last);
    let keep = c.flags & IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR != 0;
    hwpt.read_and_clear_dirty(range, keep, &mut |start, size| {
        let lo = start.max(c.iova);
        let hi = (start + (size - 1)).min(last);
        if lo <= hi {
            runs.push(((lo - c.iova) / c.page_size, (hi - c.iova) / c.page_size));
        }
    })?;
    runs.iter().try_for_each(|&(first, last)| bitmap.set(first, last))
}

/// A caller's bitmap, one bit per page, set without disturbing other bits.
struct Bitmap<'a> {
    mem: &'a dyn crate::UserMemory,
    base: u64,
    nbytes: u64,
}

impl Bitmap<'_> {
    /// `EFAULT` unless the whole bitmap is readable.
    fn check(&self) -> Res {
        self.mem.is_zero(self.base, self.nbytes).map(drop)
    }

    /// Sets bits `first..=last`, a bounded chunk of the caller's bitmap at a
    /// time however long the dirty run is.
    fn set(&self, first: u64, last: u64) -> Res {
        const CHUNK: u64 = 4096;
        let mut bytes = [0u8; CHUNK as usize];
        let (b0, b1) = (first / 8, last / 8);
        let mut at = b0;
        while at <= b1 {
            let n = (b1 - at + 1).min(CHUNK);
            let chunk = &mut bytes[..n as usize];
            self.mem.read(self.base + at, chunk)?;
            for (k, byte) in chunk.iter_mut().enumerate() {
                let lo = ((at + k as u64) * 8).max(first);
                let hi = ((at + k as u64) * 8 + 7).min(last);
                // Bits lo..=hi of this byte, as a mask.
                *byte |= (0xffu16 << (lo % 8) & 0xffu16 >> (7 - hi % 8)) as u8;
            }
            self.mem.write(self.base + at, chunk)?;
            at += n;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::change_process::{IOMMU_IOAS_CHANGE_PROCESS, iommu_ioas_change_process};
    use crate::hw_queue::{IOMMU_HW_QUEUE_ALLOC, iommu_hw_queue_alloc};

    /// Every command iommufd (and its selftest) numbers, with its struct.
    const COMMANDS: &[(u32, usize)] = &[
        (IOMMU_DESTROY, size_of::<iommu_destroy>()),
        (IOMMU_IOAS_ALLOC, size_of::<iommu_ioas_alloc>()),
        (IOMMU_IOAS_ALLOW_IOVAS, size_of::<iommu_ioas_allow_iovas>()),
        (IOMMU_IOAS_COPY, size_of::<iommu_ioas_copy>()),
        (IOMMU_IOAS_IOVA_RANGES, size_of::<iommu_ioas_iova_ranges>()),
        (IOMMU_IOAS_MAP, size_of::<iommu_ioas_map>()),
        (IOMMU_IOAS_UNMAP, size_of::<iommu_ioas_unmap>()),
        (IOMMU_OPTION, size_of::<iommu_option>()),
        (IOMMU_VFIO_IOAS, size_of::<iommu_vfio_ioas>()),
        (IOMMU_HWPT_ALLOC, size_of::<iommu_hwpt_alloc>()),
        (IOMMU_GET_HW_INFO, size_of::<iommu_hw_info>()),
        (IOMMU_HWPT_SET_DIRTY_TRACKING, size_of::<iommu_hwpt_set_dirty_tracking>()),
        (IOMMU_HWPT_GET_DIRTY_BITMAP, size_of::<iommu_hwpt_get_dirty_bitmap>()),
        (IOMMU_HWPT_INVALIDATE, size_of::<iommu_hwpt_invalidate>()),
        (IOMMU_FAULT_QUEUE_ALLOC, size_of::<iommu_fault_alloc>()),
        (IOMMU_IOAS_MAP_FILE, size_of::<iommu_ioas_map_file>()),
        (IOMMU_VIOMMU_ALLOC, size_of::<iommu_viommu_alloc>()),
        (IOMMU_VDEVICE_ALLOC, size_of::<iommu_vdevice_alloc>()),
        (IOMMU_IOAS_CHANGE_PROCESS, size_of::<iommu_ioas_change_process>()),
        (IOMMU_VEVENTQ_ALLOC, size_of::<iommu_veventq_alloc>()),
        (IOMMU_HW_QUEUE_ALLOC, size_of::<iommu_hw_queue_alloc>()),
        (IOMMU_IOAS_NOIOMMU_GET_PA, size_of::<iommu_ioas_noiommu_get_pa>()),
        (selftest::IOMMU_TEST_CMD, size_of::<selftest::iommu_test_cmd>()),
    ];

    #[test]
    fn each_command_sits_at_its_number_and_nothing_else_is_taken() {
        for &(request, size) in COMMANDS {
            let op = OPS.get(request).expect("a command in the table");
            assert_eq!((op.num, op.size), (request, size));
        }
        let taken = (0..NOPS as u32).filter(|i| OPS.get(IOMMUFD_CMD_BASE + i).is_some()).count();
        assert_eq!(taken, COMMANDS.len());
    }

    #[test]
    fn the_decode_buffer_is_the_largest_command_struct() {
        assert_eq!(BUF, COMMANDS.iter().map(|&(_, size)| size).max().unwrap());
    }
}
