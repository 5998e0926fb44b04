//! One ioctl in flight: the caller's struct decoded under iommufd's size
//! rules (`size` below the last mandatory field is `EINVAL`, non-zero bytes
//! past what is understood `E2BIG`), the dispatch-table entry type, and the
//! copy helpers every handler shares. Below the dispatcher and every
//! handler module, so data flows one way: dispatch → handlers → ucmd.

use std::sync::Arc;

use ioasid_engine::{Context, Perm};
use zerocopy::{FromBytes, Immutable, IntoBytes};

use crate::errno::Errno;
use crate::uapi::iommu_hwpt_invalidate;
use crate::user::UserMemory;

type Res = Result<(), Errno>;

/// Largest struct in the dispatch tables; commands are decoded into a
/// stack buffer of this size (the tables check it at compile time).
pub(crate) const MAX_SIZE: usize = 72;

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
            Some(pid) => self.ctx.map_remote(ioas, pid, va, len, iova, perm)?,
        })
    }

    /// Commands that hand the caller a new descriptor, or take one of its
    /// own, work only for this process: another's fd table is not ours.
    pub(crate) fn local_only(&self) -> Res {
        if self.mem.pid().is_some() { Err(Errno::EOPNOTSUPP) } else { Ok(()) }
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
pub(crate) struct Op {
    pub(crate) num: u32,
    pub(crate) size: usize,
    pub(crate) min_size: usize,
    pub(crate) run: fn(&Ucmd, &[u8]) -> Res,
}

macro_rules! op {
    ($num:expr, $ty:ty, $last:ident, $handler:path) => {
        Some(Op {
            num: $num,
            size: core::mem::size_of::<$ty>(),
            min_size: core::mem::offset_of!($ty, $last) + size_of_field!($ty, $last),
            run: |u, b| $handler(u, <$ty>::read_from_bytes(b).expect("buffer sized for the struct")),
        })
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

/// Decodes the caller's struct for `op` under the size rules and runs it.
pub(crate) fn run_op(
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
    let mut buf = [0u8; MAX_SIZE];
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

/// The loop every type of `IOMMU_HWPT_INVALIDATE` shares: entry `i`, of
/// `entry_len` bytes (at least `min`), is copied into a `T` and handled;
/// the first failure stops it, and the count says how many were handled.
pub(crate) fn each_entry<T: FromBytes + IntoBytes + Default>(
    u: &Ucmd,
    c: &iommu_hwpt_invalidate,
    min: usize,
    mut handle: impl FnMut(T) -> Res,
) -> (u32, Res) {
    for i in 0..c.entry_num {
        let mut entry = T::default();
        let at = c.data_uptr.wrapping_add(u64::from(c.entry_len) * u64::from(i));
        let done =
            copy_driver_data(u.mem, at, c.entry_len as usize, min, entry.as_mut_bytes()).and_then(|()| handle(entry));
        if let Err(e) = done {
            return (i, Err(e));
        }
    }
    (c.entry_num, Ok(()))
}

/// Linux's `iommu_copy_struct_from_user`: driver data of `len` bytes must
/// hold at least `min` and at most `out.len()`; the rest of `out` stays zero.
pub(crate) fn copy_driver_data(mem: &dyn UserMemory, uptr: u64, len: usize, min: usize, out: &mut [u8]) -> Res {
    if len < min || len > out.len() {
        return Err(Errno::EINVAL);
    }
    mem.read(uptr, &mut out[..len])
}
