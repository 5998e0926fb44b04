//! Typed object IDs. Linux hands every object a `u32` from one table and
//! checks its type at each lookup (`iommufd_get_object(ictx, id, type)`);
//! here the type rides with the number, so an IOAS ID passed where a device
//! ID belongs does not compile. The ABI makes them from the `u32`s of the
//! uAPI structs at its edge (`Id::new`) and gives them back (`Id::get`);
//! the object table still answers a wrong number with `ENOENT`.
//!
//! ```
//! # use ioasid_engine::{Context, DeviceId, ViommuId};
//! # fn alloc(ctx: &Context, viommu: ViommuId, dev: DeviceId) -> ioasid_engine::Result<()> {
//! ctx.vdevice_alloc(viommu, dev, 0x10)?;
//! # Ok(()) }
//! ```
//!
//! With the vIOMMU and the device swapped, it does not compile:
//!
//! ```compile_fail,E0308
//! # use ioasid_engine::{Context, DeviceId, ViommuId};
//! # fn alloc(ctx: &Context, viommu: ViommuId, dev: DeviceId) -> ioasid_engine::Result<()> {
//! ctx.vdevice_alloc(dev, viommu, 0x10)?;
//! # Ok(()) }
//! ```

use std::fmt;
use std::hash::{Hash, Hasher};
use std::marker::PhantomData;

use crate::access::Access;
use crate::device::Device;
use crate::fault::FaultQueue;
use crate::hw_queue::HwQueue;
use crate::hwpt::{Hwpt, HwptNested, HwptPaging};
use crate::ioas::Ioas;
use crate::ioasid_set::SetHandle;
use crate::veventq::Veventq;
use crate::viommu::{Vdevice, Viommu};

/// The ID of an object of kind `T` in a context's object table.
pub struct Id<T: ?Sized>(u32, PhantomData<fn() -> T>);

impl<T: ?Sized> Id<T> {
    /// The ID `raw`, as a uAPI struct carries it; whether it names a `T`
    /// is checked when it is looked up.
    pub const fn new(raw: u32) -> Self {
        Id(raw, PhantomData)
    }

    /// The number, as the uAPI reports it.
    pub const fn get(self) -> u32 {
        self.0
    }

    /// The same ID, naming an object of any kind (a list of objects to
    /// destroy, say).
    pub const fn any(self) -> Id<AnyObject> {
        Id::new(self.0)
    }
}

impl<T: ?Sized> Clone for Id<T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T: ?Sized> Copy for Id<T> {}

impl<T: ?Sized> PartialEq for Id<T> {
    fn eq(&self, other: &Self) -> bool {
        self.0 == other.0
    }
}

impl<T: ?Sized> Eq for Id<T> {}

impl<T: ?Sized> PartialOrd for Id<T> {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl<T: ?Sized> Ord for Id<T> {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.cmp(&other.0)
    }
}

impl<T: ?Sized> Hash for Id<T> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.0.hash(state)
    }
}

impl<T: ?Sized> fmt::Debug for Id<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Id({})", self.0)
    }
}

impl<T: ?Sized> fmt::Display for Id<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl<T: ?Sized> From<Id<T>> for u32 {
    fn from(id: Id<T>) -> u32 {
        id.0
    }
}

impl Id<Hwpt> {
    /// The same ID, to look up as a paging HWPT (an automatic HWPT, which
    /// an attach to an IOAS reports, always is one).
    pub const fn paging(self) -> Id<HwptPaging> {
        Id::new(self.0)
    }
}

/// A `pt_id`: an IOAS (a device attaches through an automatic HWPT) or a
/// HWPT of either kind.
pub enum PageTable {}

/// The parent of a nested HWPT: a nesting-parent paging HWPT, or a vIOMMU
/// (whose stage 2 it is).
pub enum NestParent {}

/// Any object, as `IOMMU_DESTROY` names it.
pub enum AnyObject {}

/// An IOAS (`IOMMU_IOAS_ALLOC`).
pub type IoasId = Id<Ioas>;
/// A bound device (VFIO's `out_devid`).
pub type DeviceId = Id<Device>;
/// A HWPT of either kind, as an attach reports it.
pub type HwptId = Id<Hwpt>;
/// A paging HWPT (`IOMMU_HWPT_ALLOC` over an IOAS, or an automatic one).
pub type HwptPagingId = Id<HwptPaging>;
/// A nested HWPT (`IOMMU_HWPT_ALLOC` over a parent, with driver data).
pub type HwptNestedId = Id<HwptNested>;
/// A vIOMMU (`IOMMU_VIOMMU_ALLOC`).
pub type ViommuId = Id<Viommu>;
/// A vDEVICE (`IOMMU_VDEVICE_ALLOC`).
pub type VdeviceId = Id<Vdevice>;
/// A fault queue (`IOMMU_FAULT_QUEUE_ALLOC`).
pub type FaultId = Id<FaultQueue>;
/// A vEVENTQ (`IOMMU_VEVENTQ_ALLOC`).
pub type VeventqId = Id<Veventq>;
/// A HW queue (`IOMMU_HW_QUEUE_ALLOC`).
pub type HwQueueId = Id<HwQueue>;
/// An in-engine access to an IOAS.
pub type AccessId = Id<Access>;
/// An IOASID set object.
pub type SetObjectId = Id<SetHandle>;
/// A `pt_id`: see `PageTable`.
pub type PtId = Id<PageTable>;
/// A nested HWPT's parent: see `NestParent`.
pub type NestParentId = Id<NestParent>;
/// Any object: see `AnyObject`.
pub type ObjectId = Id<AnyObject>;

/// An ID of one kind names an object of a wider one.
macro_rules! widen {
    ($($from:ty => $($to:ty),+;)*) => {$($(
        impl From<Id<$from>> for Id<$to> {
            fn from(id: Id<$from>) -> Self {
                Id::new(id.get())
            }
        }
    )+)*};
}

widen! {
    Ioas => PageTable, AnyObject;
    HwptPaging => Hwpt, PageTable, NestParent, AnyObject;
    HwptNested => Hwpt, PageTable, AnyObject;
    Hwpt => PageTable, AnyObject;
    Device => AnyObject;
    Viommu => NestParent, AnyObject;
    Vdevice => AnyObject;
    FaultQueue => AnyObject;
    Veventq => AnyObject;
    HwQueue => AnyObject;
    Access => AnyObject;
    SetHandle => AnyObject;
}
