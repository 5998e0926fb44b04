//! One ioctl in flight: the caller's struct decoded under iommufd's size
//! rules (`size` below the last mandatory field is `EINVAL`, non-zero bytes
//! past what is understood `E2BIG`), the dispatch tables (built by command
//! number, with the decode buffer sized from their structs), and the copy
//! helpers every handler shares. Below the dispatcher and every
//! handler module, so data flows one way: dispatch → handlers → ucmd.

use std::sync::Arc;

use ioasid_engine::model::{DataLayout, EntryArray};
use ioasid_engine::{Context, Perm, ProcessMemory};
use zerocopy::{Immutable, IntoBytes};

use crate::errno::Errno;
use crate::uapi::iommu_hwpt_invalidate;
use crate::user::UserMemory;

type Res = Result<(), Errno>;

/// One ioctl in flight: where its struct lives and how big the caller said it is.
pub struct Ucmd<'a> {
    pub ctx: &'a Arc<Context>,
    pub mem: &'a dyn UserMemory,
    pub(crate) arg: u64,
    user_size: u32,
}

impl<'a> Ucmd<'a> {
    /// A call whose argument is not one of iommufd's structs (VFIO's
    /// container ioctls take plain values).
    pub(crate) fn without_struct(ctx: &'a Arc<Context>, mem: &'a dyn UserMemory, arg: u64) -> Self {
        Ucmd { ctx, mem, arg, user_size: 0 }
    }

    /// Maps the caller's memory: this process's, checked, or another's.
    pub(crate) fn map_user(
        &self,
        ioas: ioasid_engine::IoasId,
        va: u64,
        len: u64,
        iova: Option<u64>,
        perm: Perm,
    ) -> Result<u64, Errno> {
        Ok(match self.mem.pid() {
            None => self.ctx.map_user_checked(ioas, va, len, iova, perm)?,
            Some(pid) => {
                let how = if self.mem.client() { ProcessMemory::Client } else { ProcessMemory::Forked };
                self.ctx.map_process(ioas, pid, how, va, len, iova, perm)?
            }
        })
    }

    /// The caller's descriptors, for commands that hand it a new one or take
    /// one of its own: `EOPNOTSUPP` where its fd table cannot be reached.
    pub(crate) fn fds(&self) -> Result<&'a dyn crate::user::Descriptors, Errno> {
        self.mem.descriptors()
    }

    /// Copies the (updated) struct back, no more than the caller's size.
    pub(crate) fn respond<T: IntoBytes + Immutable>(&self, cmd: &T) -> Res {
        let b = cmd.as_bytes();
        let n = (self.user_size as usize).min(b.len());
        self.mem.write(self.arg, &b[..n])
    }

    /// `respond` for a command that created object `id`: a caller who cannot
    /// be told its ID never gets the object either.
    pub(crate) fn respond_created<T: IntoBytes + Immutable>(&self, cmd: &T, id: u32) -> Res {
        self.respond(cmd).inspect_err(|_| {
            let _ = self.ctx.destroy(ioasid_engine::ObjectId::new(id));
        })
    }
}

/// One command of a dispatch table: its number, struct size, the size up
/// to its last mandatory field, and its handler.
#[derive(Clone, Copy)]
pub(crate) struct Op {
    pub(crate) num: u32,
    pub(crate) size: usize,
    pub(crate) min_size: usize,
    pub(crate) run: fn(&Ucmd, &[u8]) -> Res,
}

/// A dispatch table: the command whose number (the request's low byte) is
/// `base + i` sits at `ops[i]`, so no list order has to match the numbers.
pub(crate) struct OpTable<const N: usize> {
    base: u32,
    ops: [Option<Op>; N],
}

impl<const N: usize> OpTable<N> {
    /// Places each of `list` at its command number. A number outside
    /// `base..base + N`, or taken twice, fails the build.
    pub(crate) const fn by_number(base: u32, list: &[Op]) -> Self {
        let mut ops = [None; N];
        let mut i = 0;
        while i < list.len() {
            let nr = list[i].num & 0xff;
            assert!(nr >= base && ((nr - base) as usize) < N, "a command number outside its table");
            let slot = (nr - base) as usize;
            assert!(ops[slot].is_none(), "two commands with one number");
            ops[slot] = Some(list[i]);
            i += 1;
        }
        OpTable { base, ops }
    }

    /// The largest struct of the table: the size of the buffer `run_op`
    /// decodes its commands into.
    pub(crate) const fn largest(&self) -> usize {
        let mut max = 0;
        let mut i = 0;
        while i < N {
            if let Some(op) = &self.ops[i]
                && op.size > max
            {
                max = op.size;
            }
            i += 1;
        }
        max
    }

    /// Whether `request`'s number falls in this table (taken or not).
    pub(crate) fn covers(&self, request: u32) -> bool {
        (request & 0xff).checked_sub(self.base).is_some_and(|i| (i as usize) < N)
    }

    /// The command at `request`'s number, if one is there.
    pub(crate) fn get(&self, request: u32) -> Option<&Op> {
        let i = (request & 0xff).checked_sub(self.base)?;
        self.ops.get(i as usize)?.as_ref()
    }
}

macro_rules! op {
    ($num:expr, $ty:ty, $last:ident, $handler:path) => {
        $crate::ucmd::Op {
            num: $num,
            size: core::mem::size_of::<$ty>(),
            min_size: core::mem::offset_of!($ty, $last) + $crate::ucmd::size_of_field!($ty, $last),
            run: |u, b| $handler(u, <$ty>::read_from_bytes(b).expect("buffer sized for the struct")),
        }
    };
}

macro_rules! size_of_field {
    ($ty:ty, $field:ident) => {{
        const fn size_of_return<T>(_: fn(&$ty) -> &T) -> usize {
            core::mem::size_of::<T>()
        }
        size_of_return(|s: &$ty| &s.$field)
    }};
}

pub(crate) use {op, size_of_field};

/// Decodes the caller's struct for `op` under the size rules, in a buffer
/// of `BUF` bytes (its table's `largest`), and runs it.
pub(crate) fn run_op<const BUF: usize>(
    op: Option<&Op>,
    ctx: &Arc<Context>,
    mem: &dyn UserMemory,
    request: u32,
    arg: u64,
) -> Result<i32, Errno> {
    let mut size = [0u8; 4];
    mem.read(arg, &mut size)?;
    let user_size = u32::from_ne_bytes(size);
    let Some(op) = op.filter(|op| op.num == request) else {
        return Err(Errno::ENOTTY);
    };
    if (user_size as usize) < op.min_size {
        return Err(Errno::EINVAL);
    }
    let mut buf = [0u8; BUF];
    let known = op.size.min(user_size as usize);
    mem.read(arg, &mut buf[..known])?;
    check_zeroed(mem, arg + op.size as u64, (user_size as usize).saturating_sub(op.size))?;
    (op.run)(&Ucmd { ctx, mem, arg, user_size }, &buf[..op.size]).map(|()| 0)
}

/// Linux's `copy_struct_from_user`: `len` bytes of the caller's struct
/// into `out`. A shorter one leaves the rest of `out` zero; a longer one is
/// taken when the bytes past `out` are zero, else `E2BIG`.
pub(crate) fn copy_struct_from_user(mem: &dyn UserMemory, uptr: u64, len: usize, out: &mut [u8]) -> Res {
    let known = len.min(out.len());
    check_zeroed(mem, uptr.wrapping_add(out.len() as u64), len.saturating_sub(out.len()))?;
    mem.read(uptr, &mut out[..known])
}

/// `E2BIG` unless the caller's bytes past what we understand are all zero.
fn check_zeroed(mem: &dyn UserMemory, addr: u64, len: usize) -> Res {
    if mem.is_zero(addr, len as u64)? { Ok(()) } else { Err(Errno::E2BIG) }
}

/// The loop of `IOMMU_HWPT_INVALIDATE` on a nested HWPT: entry `i`, of
/// `entry_len` bytes (at least `layout.min_len`), is copied into
/// `layout.len` bytes and handled; the first failure stops it, and the
/// count says how many were handled.
pub(crate) fn each_entry_bytes(
    u: &Ucmd,
    c: &iommu_hwpt_invalidate,
    layout: DataLayout,
    mut handle: impl FnMut(&[u8]) -> Res,
) -> (u32, Res) {
    let mut entry = vec![0u8; layout.len];
    for i in 0..c.entry_num {
        entry.fill(0);
        let at = c.data_uptr.wrapping_add(u64::from(c.entry_len) * u64::from(i));
        let done =
            copy_driver_data(u.mem, at, c.entry_len as usize, layout.min_len, &mut entry).and_then(|()| handle(&entry));
        if let Err(e) = done {
            return (i, Err(e));
        }
    }
    (c.entry_num, Ok(()))
}

/// The caller's invalidation array as a model copies it (Linux's
/// `iommu_user_data_array`). A failed copy's errno is kept for the reply,
/// the model seeing only that the copy failed.
pub(crate) struct UserEntries<'a> {
    u: &'a Ucmd<'a>,
    c: &'a iommu_hwpt_invalidate,
    failed: Option<Errno>,
}

impl<'a> UserEntries<'a> {
    pub(crate) fn new(u: &'a Ucmd<'a>, c: &'a iommu_hwpt_invalidate) -> Self {
        UserEntries { u, c, failed: None }
    }

    fn at(&self, i: u32) -> u64 {
        self.c.data_uptr.wrapping_add(u64::from(self.c.entry_len) * u64::from(i))
    }

    fn fail(&mut self, e: Errno) -> ioasid_engine::Error {
        self.failed = Some(e);
        ioasid_engine::Error::Fault("copying an invalidation entry failed")
    }

    /// The errno a call ending in `e` answers.
    pub(crate) fn errno(&mut self, e: ioasid_engine::Error) -> Errno {
        self.failed.take().unwrap_or(Errno::from(e))
    }
}

impl EntryArray for UserEntries<'_> {
    fn data_type(&self) -> u32 {
        self.c.data_type
    }

    fn len(&self) -> u32 {
        self.c.entry_num
    }

    fn copy(&mut self, i: u32, min: usize, out: &mut [u8]) -> ioasid_engine::Result<()> {
        copy_driver_data(self.u.mem, self.at(i), self.c.entry_len as usize, min, out).map_err(|e| self.fail(e))
    }

    fn copy_extensible(&mut self, i: u32, out: &mut [u8]) -> ioasid_engine::Result<()> {
        copy_struct_from_user(self.u.mem, self.at(i), self.c.entry_len as usize, out).map_err(|e| self.fail(e))
    }
}

/// A model's driver data of `len` bytes at `uptr`, as `layout` sizes it
/// (`copy_driver_data`).
pub(crate) fn driver_data(mem: &dyn UserMemory, uptr: u64, len: u32, layout: DataLayout) -> Result<Vec<u8>, Errno> {
    let mut data = vec![0u8; layout.len];
    copy_driver_data(mem, uptr, len as usize, layout.min_len, &mut data)?;
    Ok(data)
}

/// Linux's `iommu_copy_struct_from_user`: driver data of `len` bytes must
/// hold at least `min` and at most `out.len()`; the rest of `out` stays zero.
pub(crate) fn copy_driver_data(mem: &dyn UserMemory, uptr: u64, len: usize, min: usize, out: &mut [u8]) -> Res {
    if len < min || len > out.len() {
        return Err(Errno::EINVAL);
    }
    mem.read(uptr, &mut out[..len])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(num: u32, size: usize) -> Op {
        Op { num, size, min_size: 0, run: |_, _| Ok(()) }
    }

    #[test]
    fn a_table_places_commands_by_number_whatever_their_order() {
        let table: OpTable<4> = OpTable::by_number(0x80, &[op(0x83, 8), op(0x80, 24), op(0x81, 16)]);
        assert_eq!(table.get(0x80).map(|o| o.size), Some(24));
        assert_eq!(table.get(0x81).map(|o| o.size), Some(16));
        assert!(table.get(0x82).is_none());
        assert_eq!(table.get(0x83).map(|o| o.size), Some(8));
        assert!(table.covers(0x83) && !table.covers(0x84) && !table.covers(0x7f));
        assert_eq!(table.largest(), 24);
    }
}
