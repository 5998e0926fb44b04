//! The IOMMU in front of a device, one module per architecture, as Linux
//! splits iommufd's core from its drivers (`iommu_ops`,
//! `iommufd_viommu_ops`). A model decides the page-table formats its
//! domains use and the aperture; the hardware description
//! `IOMMU_GET_HW_INFO` reports (the registers a VMM reads to build a
//! matching virtual IOMMU for its guest), in Linux's uAPI layout; which
//! driver data a nested HWPT takes and the stage-1 object it becomes, with
//! its walk and its invalidation entries; and, for a vIOMMU, its commands
//! and event records. The core (`hwpt`, `viommu`, the ABI's dispatcher)
//! hands bytes to a model and names no vendor.
//!
//! Adding a model is one module here and one line in the `models!` list
//! below.
//!
//! A guest behind an emulated SMMUv3: its stream table entry and stage-1
//! tables live in guest memory, the host's stage 2 under them, and the
//! guest's TLB invalidations go to the vIOMMU.
//!
//! ```
//! use ioasid_engine::pgtable::arm::{AF, AP_RDONLY};
//! use ioasid_engine::smmuv3::{cd, ste, CMD_TLBI_NH_ASID};
//! use ioasid_engine::model::smmuv3::iommu_hw_info_arm_smmuv3;
//! use ioasid_engine::{Context, DeviceInfo, HostBuffer, HwptFlags, IommuModel, NestedData, Perm, ViommuType};
//!
//! let ctx = Context::new();
//! let ioas = ctx.ioas_alloc()?;
//! let ram = HostBuffer::new(0x20000)?; // guest RAM, guest-physical 0
//! // SAFETY: `ram` outlives the context's use of it.
//! unsafe { ctx.map_user(ioas, ram.addr(), 0x20000, Some(0), Perm::RW)? };
//! let dev = ctx.bind_device(DeviceInfo::behind(IommuModel::ArmSmmuV3, "nic", 0x10))?;
//! let idr = ctx.get(dev)?.info().hw_info().get::<iommu_hw_info_arm_smmuv3>().unwrap().idr;
//! assert_eq!(idr[0] & 0b11, 0b11, "stage 1 and stage 2");
//!
//! // The guest: CD 0 at 0x1000 (TTB0 0x2000, 48-bit input); four table
//! // levels at 0x2000..0x5000 map IOVA 0 to guest page 0x8000, read-only.
//! let put = |gpa: usize, v: u64| ram.write_at(gpa, &v.to_le_bytes());
//! put(0x1000, cd::V | cd::AA64 | 16 | 7 << cd::ASID_SHIFT);
//! put(0x1008, 0x2000);
//! put(0x2000, 0x3000 | 0b11);
//! put(0x3000, 0x4000 | 0b11);
//! put(0x4000, 0x5000 | 0b11);
//! put(0x5000, 0x8000 | 0b11 | AF | AP_RDONLY);
//! ram.write_at(0x8000, b"hello");
//!
//! let s2 = ctx.hwpt_alloc(dev, ioas, HwptFlags { nest_parent: true, dirty_tracking: false }, None)?;
//! let viommu = ctx.viommu_alloc(dev, s2, ViommuType::ArmSmmuV3)?;
//! ctx.vdevice_alloc(viommu, dev, 0x10)?; // the guest's StreamID
//! let vste = [ste::V | ste::CONFIG_S1 << 1 | 0x1000, 0];
//! let nested = ctx.hwpt_alloc_nested(dev, viommu, NestedData::arm_smmuv3(vste)?, None)?;
//! ctx.attach(dev, nested)?;
//!
//! let mut buf = [0u8; 5];
//! ctx.get(dev)?.dma_read(0, &mut buf)?;
//! assert_eq!(&buf, b"hello");
//! assert!(ctx.get(dev)?.dma_write(0, b"x").is_err(), "stage 1 is read-only");
//! ctx.get(viommu)?.invalidate([u64::from(CMD_TLBI_NH_ASID) | 7 << 48, 0])?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

/// A struct of Linux's iommufd uAPI, in its layout (`size` checks it).
/// Each field's doc names the Linux field it is, whose meaning it keeps.
macro_rules! uapi_struct {
    ($(#[$m:meta])* $name:ident { $($(#[$fm:meta])* $field:ident : $ty:ty),* $(,)? } size $size:literal) => {
        $(#[$m])*
        #[repr(C)]
        #[allow(non_camel_case_types)]
        #[derive(
            Debug, Default, Clone, Copy, PartialEq, Eq,
            zerocopy::FromBytes, zerocopy::IntoBytes, zerocopy::Immutable, zerocopy::KnownLayout,
        )]
        pub struct $name {
            $(
                #[doc = concat!("`", stringify!($field), "` of Linux's `struct ", stringify!($name), "`.")]
                $(#[$fm])*
                pub $field: $ty
            ),*
        }
        const _: () = assert!(size_of::<$name>() == $size);
    };
}

pub mod amd;
pub mod selftest;
pub mod smmuv3;
pub mod vtd;

use std::any::Any;

use zerocopy::{FromBytes, Immutable, IntoBytes};

// The vocabulary of domains and translations. These sit in `hwpt` until
// the page-table domain gets its own module below both.
use crate::epoch::Guard;

use crate::domain::{Domain, FaultReason, Gpa, HostAddr, PageFormat};
use crate::iotlb::Iotlb;
use crate::iova::IovaRange;
use crate::pgtable::Perm;
use crate::{Error, Result};

/// What one IOMMU architecture does for the core: Linux's `iommu_ops`
/// (formats, hardware info, nested domains) for a device behind it.
/// Driver data comes in as the bytes of Linux's uAPI structs.
pub trait IommuOps {
    /// The architecture's name, for messages and `ioasid` listings.
    fn name(&self) -> &'static str;

    /// The format of a paging domain; `nest_parent` asks for the stage that
    /// sits under a guest's tables.
    fn paging_format(&self, nest_parent: bool) -> PageFormat;

    /// Whether a device behind this IOMMU can attach to a table in `format`:
    /// tables belong to one architecture.
    fn serves(&self, format: PageFormat) -> bool;

    /// The IOVAs a default paging domain translates.
    fn aperture(&self) -> IovaRange {
        IovaRange::new(0, (1u64 << self.paging_format(false).iova_bits()) - 1)
    }

    /// `IOMMU_GET_HW_INFO`: the registers of this IOMMU as a device with
    /// `features` sees it.
    fn hw_info(&self, features: Features) -> HwInfo;

    /// The driver data a paging HWPT takes, if any, for `data_type`.
    fn paging_layout(&self, _data_type: u32) -> Option<DataLayout> {
        None
    }

    /// The format a paging HWPT's driver data asks for.
    fn paging_data(&self, _data: &[u8]) -> Result<PageFormat> {
        Err(Error::Unsupported("the IOMMU takes no paging HWPT data"))
    }

    /// The driver data of `data_type` a nested HWPT over a table in
    /// `parent` takes, if this IOMMU takes such a one.
    fn nested_layout(&self, _data_type: u32, _parent: PageFormat) -> Option<DataLayout> {
        None
    }

    /// Validates a nested HWPT's driver data (as `nested_layout` sized it)
    /// into the stage-1 object it describes.
    fn nested_data(&self, _data_type: u32, _data: &[u8]) -> Result<NestedData> {
        Err(Error::Unsupported("the IOMMU takes no nested HWPT data"))
    }
}

/// One stage-1 entry read during a nested walk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WalkStep {
    /// The table's level, counted as the format counts it (the root is
    /// the highest).
    pub level: u32,
    /// Where the entry is, guest-physical.
    pub entry_gpa: Gpa,
    /// Where stage 2 put the entry in host memory.
    pub entry_host: HostAddr,
    /// The entry's value as read.
    pub pte: u64,
}

/// A guest's memory as its stage-1 walk reads it: through the nest
/// parent's stage 2. A concrete type rather than a callback, so the reads of
/// a nested walk's every level inline into the model's walk.
pub struct GuestTables<'a> {
    s2: &'a Domain,
    guard: &'a Guard,
    step: Option<&'a mut dyn FnMut(WalkStep)>,
}

impl<'a> GuestTables<'a> {
    /// Reads through stage 2 `s2`; `step`, when given, sees each entry a
    /// walk reads (a trace; translations pass `None`).
    pub(crate) fn new(s2: &'a Domain, guard: &'a Guard, step: Option<&'a mut dyn FnMut(WalkStep)>) -> Self {
        GuestTables { s2, guard, step }
    }

    /// The 8-byte entry at guest-physical `gpa`: where stage 2 put it in
    /// host memory and its value. Stage 2's faults come back as
    /// [`FaultReason::Stage2`].
    #[inline]
    pub fn read(&self, gpa: Gpa) -> std::result::Result<(HostAddr, u64), FaultReason> {
        let stage2 = |r: FaultReason| FaultReason::Stage2 { gpa: gpa.0, permission: r == FaultReason::Permission };
        let t = self.s2.translate(gpa.0, Perm::R, self.guard).map_err(stage2)?;
        let mut raw = [0u8; 8];
        crate::memory::read(t.trust, t.host.0, &mut raw).map_err(|_| stage2(FaultReason::NotPresent))?;
        Ok((t.host, u64::from_le_bytes(raw)))
    }

    /// Shows a read entry to whoever traces the walk.
    #[inline]
    pub fn step(&mut self, step: WalkStep) {
        if let Some(f) = &mut self.step {
            f(step);
        }
    }
}

/// The sizes of a uAPI struct of driver data or of an invalidation entry:
/// the caller's must be at least `min_len` bytes (the first version) and is
/// read into `len` (the current one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataLayout {
    /// The uAPI type number (`IOMMU_HWPT_DATA_*`, `IOMMU_HWPT_INVALIDATE_DATA_*`, ...).
    pub data_type: u32,
    /// Bytes of the struct's first version: the least a caller may pass
    /// (`EINVAL` below it).
    pub min_len: usize,
    /// Bytes of the current version: the struct the caller's bytes are
    /// copied into, zero past what the caller passed.
    pub len: usize,
}

impl DataLayout {
    /// The layout of `T`, whose every version is the same size.
    pub const fn of<T>(data_type: u32) -> Self {
        DataLayout { data_type, min_len: size_of::<T>(), len: size_of::<T>() }
    }
}

/// A nested HWPT's stage 1 as its IOMMU model owns it (Linux's nested
/// `iommu_domain` and its `cache_invalidate_user`).
pub trait Stage1: Any + Send + Sync {
    /// Whether a device behind `iommu` may get this stage 1, through a
    /// vIOMMU of `viommu` when it is allocated on one.
    fn fits(&self, iommu: IommuModel, viommu: Option<ViommuType>) -> bool;

    /// The cache of combined translations, for types that walk a table.
    fn iotlb(&self) -> Option<&Iotlb> {
        None
    }

    /// Whether it covers all of a stream's substreams (PASIDs) when
    /// attached to the RID, choosing among the guest's tables by PASID.
    fn covers_substreams(&self) -> bool {
        false
    }

    /// Walks the guest's stage 1 for `iova` (of substream `ssid`, for types
    /// that cover substreams): the guest-physical address and the rights
    /// along the way. `tables` reads the guest's entries through stage 2
    /// and is shown each table entry read ([`GuestTables::step`]).
    fn walk(
        &self,
        _iova: u64,
        _ssid: Option<u32>,
        _tables: &mut GuestTables<'_>,
    ) -> std::result::Result<(Gpa, Perm), FaultReason> {
        Err(FaultReason::NotPresent)
    }

    /// The entries `IOMMU_HWPT_INVALIDATE` takes on this HWPT; `None` when
    /// its invalidations go elsewhere (a vIOMMU's command queue).
    fn invalidation(&self) -> Option<DataLayout>;

    /// Carries out one invalidation entry (`invalidation().len` bytes).
    fn invalidate(&self, entry: &[u8]) -> Result<()>;
}

/// What a nested HWPT's stage 1 is: the vendor data it was allocated with,
/// validated by its model. Each model has its constructor.
pub struct NestedData(Box<dyn Stage1>);

impl NestedData {
    /// Wraps a model's validated stage 1; models call it from their
    /// constructors (`NestedData::vtd_s1`, `NestedData::arm_smmuv3`, ...).
    pub fn new(stage1: impl Stage1) -> Self {
        NestedData(Box::new(stage1))
    }

    /// The stage 1 as the core drives it: walks and invalidations.
    pub fn stage1(&self) -> &dyn Stage1 {
        &*self.0
    }

    /// The model's own type, if it is `T`.
    pub fn downcast<T: Stage1>(&self) -> Option<&T> {
        (&*self.0 as &dyn Any).downcast_ref()
    }
}

impl std::ops::Deref for NestedData {
    type Target = dyn Stage1;
    fn deref(&self) -> &Self::Target {
        &*self.0
    }
}

/// What `IOMMU_GET_HW_INFO` reports: the type number and the vendor struct
/// in Linux's uAPI layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HwInfo {
    /// The `enum iommu_hw_info_type` number (`out_data_type`).
    pub data_type: u32,
    /// The vendor struct's bytes, as `IOMMU_GET_HW_INFO` copies them out
    /// (truncated to the caller's `data_len`).
    pub data: Vec<u8>,
}

/// A vendor's `GET_HW_INFO` struct and its type number.
pub trait HwInfoData: FromBytes + IntoBytes + Immutable {
    /// Its `enum iommu_hw_info_type` number.
    const TYPE: u32;
}

impl HwInfo {
    /// The description made of the vendor struct `data`, tagged with its type.
    pub fn new<T: HwInfoData>(data: &T) -> Self {
        HwInfo { data_type: T::TYPE, data: data.as_bytes().to_vec() }
    }

    /// The vendor struct, if the type is `T`'s.
    pub fn get<T: HwInfoData>(&self) -> Option<T> {
        (self.data_type == T::TYPE).then(|| T::read_from_prefix(&self.data).ok()).flatten().map(|(t, _)| t)
    }
}

/// What a device brings to its IOMMU's description: PASIDs, PRI, and
/// whether dirty tracking is offered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Features {
    /// PASID width in bits (`out_max_pasid_log2`); 0 when the device has no PASIDs.
    pub max_pasid_log2: u8,
    /// The device issues page requests (PCIe PRI), so faults can be recoverable.
    pub pri: bool,
    /// The IOMMU tracks dirty pages for the device
    /// (`IOMMU_HW_CAP_DIRTY_TRACKING`).
    pub dirty_tracking: bool,
}

/// The list of models: each line is an `IommuModel` variant (with the
/// fields of its ops type) and the type implementing `IommuOps`.
macro_rules! models {
    ($($(#[$doc:meta])* $name:ident $({ $($(#[$fdoc:meta])* $field:ident: $ty:ty),* })? => $module:ident::$ops:ident,)*) => {
        /// An IOMMU architecture, as emulated for a device.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum IommuModel {
            $($(#[$doc])* $name $({ $($(#[$fdoc])* $field: $ty),* })?,)*
        }

        impl IommuModel {
            /// Runs `f` with the model's operations.
            pub fn with_ops<R>(self, f: impl FnOnce(&dyn IommuOps) -> R) -> R {
                match self {
                    $(IommuModel::$name $({ $($field),* })? => f(&$module::$ops $({ $($field),* })?),)*
                }
            }

            /// The model whose tables are in `format`.
            pub fn owning(format: PageFormat) -> Option<IommuModel> {
                [$(IommuModel::$name $({ $($field: Default::default()),* })?),*]
                    .into_iter()
                    .find(|m| m.serves(format))
            }
        }
    };
}

models! {
    /// Intel VT-d in scalable mode, second-stage tables of `levels` (4 or 5).
    IntelVtd {
        /// Second-stage table levels: 4 (48-bit IOVA) or 5 (57-bit).
        levels: u32
    } => vtd::IntelVtd,
    /// Arm SMMUv3: stage-1 tables for paging domains, stage 2 under nesting.
    ArmSmmuV3 => smmuv3::ArmSmmuV3,
    /// AMD-Vi with v1 host tables, Mode 4.
    AmdVi => amd::AmdVi,
    /// Linux's selftest mock IOMMU; `huge` adds its 1 MiB IO pages.
    Selftest {
        /// 1 MiB IO pages (`MOCK_FLAGS_DEVICE_HUGE_IOVA`).
        huge: bool
    } => selftest::Mock,
}

impl IommuModel {
    /// VT-d with 4-level (48-bit) second-stage tables, the common setup.
    pub const VTD: IommuModel = IommuModel::IntelVtd { levels: 4 };

    /// See `IommuOps::name`.
    pub fn name(self) -> &'static str {
        self.with_ops(|m| m.name())
    }

    /// See `IommuOps::paging_format`.
    pub fn paging_format(self, nest_parent: bool) -> PageFormat {
        self.with_ops(|m| m.paging_format(nest_parent))
    }

    /// See `IommuOps::serves`.
    pub fn serves(self, format: PageFormat) -> bool {
        self.with_ops(|m| m.serves(format))
    }

    /// Whether this is Linux's selftest mock, which alone answers
    /// `IOMMU_TEST_CMD` and the mock's HWPT data.
    pub fn is_selftest(self) -> bool {
        matches!(self, IommuModel::Selftest { .. })
    }

    /// The IOVAs a default paging domain translates.
    pub fn aperture(self) -> IovaRange {
        self.with_ops(|m| m.aperture())
    }

    /// The registers of this IOMMU as a device with `features` sees it.
    pub fn hw_info(self, features: Features) -> HwInfo {
        self.with_ops(|m| m.hw_info(features))
    }
}

/// What a vIOMMU of one model does for the core (Linux's
/// `iommufd_viommu_ops`): which devices it serves, the commands of its
/// guest's queue, its event records and its HW queues.
pub trait ViommuOps {
    /// Its `enum iommu_viommu_type` number.
    fn uapi_type(&self) -> u32;

    /// Whether a guest of this vIOMMU can be given devices behind `iommu`.
    fn serves(&self, iommu: IommuModel) -> bool;

    /// `IOMMU_HWPT_INVALIDATE` on the vIOMMU: the guest's commands in
    /// `entries`, carried out on `viommu` up to the first rejected one.
    /// Returns how many were handled and how the call ends.
    fn invalidate(&self, viommu: &dyn ViommuCore, entries: &mut dyn EntryArray) -> (u32, Result<()>) {
        let _ = (viommu, entries);
        (0, Err(Error::Unsupported("this vIOMMU takes no invalidation commands")))
    }

    /// One command of the guest's queue, in its uAPI bytes.
    fn command(&self, viommu: &dyn ViommuCore, command: &[u8]) -> Result<()> {
        let _ = (viommu, command);
        Err(Error::Unsupported("this vIOMMU takes no invalidation commands"))
    }

    /// The event a fault of the device the guest calls `virt_id` becomes:
    /// the vEVENTQ type it goes to and its record. `fault` is the IOVA,
    /// the reason and whether it was a write, `None` for a DMA that never
    /// reached translation. `None` when the guest is not told.
    fn event(
        &self,
        virt_id: u64,
        pasid: Option<u32>,
        fault: Option<(u64, FaultReason, bool)>,
        attrs: crate::fault::DmaAttrs,
    ) -> Option<(u32, Vec<u8>)>;

    /// How many HW queues of `kind` it has (`None`: no such type).
    fn hw_queues(&self, _kind: u32) -> Option<u32> {
        None
    }

    /// The driver data `IOMMU_VIOMMU_ALLOC` takes for this type, if any
    /// (copied as `copy_struct_from_user` copies, at least `min_len`).
    fn alloc_layout(&self) -> Option<DataLayout> {
        None
    }

    /// The memory a vIOMMU made with driver `data` shares with the program
    /// through `mmap`: its length (whole pages) and first bytes.
    fn alloc_region(&self, _data: &[u8]) -> (u64, Vec<u8>) {
        (0, Vec::new())
    }

    /// The driver data written back once that memory is at mmap `offset`.
    fn alloc_reply(&self, data: &[u8], _offset: u64, _len: u64) -> Vec<u8> {
        data.to_vec()
    }
}

/// What a vIOMMU's commands act on, as the core gives it to its model.
pub trait ViommuCore {
    /// `GET_HW_INFO` of the IOMMU the vIOMMU was made for.
    fn hw_info(&self) -> &HwInfo;

    /// Drops the cached translations of every nested HWPT on the vIOMMU.
    fn flush_all(&self);

    /// Drops those of the device the guest calls `virt_id`; false when no
    /// vDEVICE has that ID.
    fn flush_device(&self, virt_id: u64) -> bool;

    /// Runs `f` on the device-side cache of the device the guest calls
    /// `virt_id` (the mock's devices have one); false when there is none.
    fn with_device_cache(&self, virt_id: u64, f: &mut dyn FnMut(&mut [u32])) -> bool;
}

/// The caller's array of invalidation entries (Linux's
/// `iommu_user_data_array`), copied as the model asks.
pub trait EntryArray {
    /// The entries' uAPI type.
    fn data_type(&self) -> u32;

    /// How many entries there are.
    fn len(&self) -> u32;

    /// Whether there are no entries.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Entry `i` into `out`: at least `min` bytes and no more than `out`
    /// holds (Linux's `iommu_copy_struct_from_user_array`).
    fn copy(&mut self, i: u32, min: usize, out: &mut [u8]) -> Result<()>;

    /// Entry `i` into `out` whatever its size, as `copy_struct_from_user`
    /// takes a struct (Linux's `iommu_copy_struct_from_full_user_array`).
    fn copy_extensible(&mut self, i: u32, out: &mut [u8]) -> Result<()>;
}

/// The list of vIOMMU types: each line is a `ViommuType` variant and the
/// type implementing `ViommuOps`.
macro_rules! viommu_types {
    ($($(#[$doc:meta])* $name:ident => $module:ident::$ops:ident,)*) => {
        /// The IOMMU model a vIOMMU emulates for its guest.
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum ViommuType {
            $($(#[$doc])* $name,)*
        }

        impl ViommuType {
            /// The type's operations.
            pub fn ops(self) -> &'static dyn ViommuOps {
                match self {
                    $(ViommuType::$name => &$module::$ops,)*
                }
            }

            /// The type of `enum iommu_viommu_type` number `uapi_type`.
            pub fn from_uapi(uapi_type: u32) -> Option<ViommuType> {
                [$(ViommuType::$name),*].into_iter().find(|t| t.ops().uapi_type() == uapi_type)
            }
        }
    };
}

viommu_types! {
    /// The selftest mock IOMMU's vIOMMU.
    Selftest => selftest::MockViommu,
    /// An Arm SMMUv3 for the guest: nested HWPTs take its stream table
    /// entries, and its command queue's invalidations come through
    /// `Viommu::invalidate`.
    ArmSmmuV3 => smmuv3::SmmuViommu,
}

impl ViommuType {
    /// Whether a guest of this vIOMMU can be given devices behind `iommu`.
    pub(crate) fn serves(self, iommu: IommuModel) -> bool {
        self.ops().serves(iommu)
    }
}

/// Stand-ins for the core in the models' unit tests.
#[cfg(test)]
pub(crate) mod fake {
    use std::cell::RefCell;

    use super::*;

    /// A vIOMMU with vDEVICEs `0..devices`, recording what it is told.
    pub struct Core {
        pub hw_info: HwInfo,
        pub devices: u64,
        pub flushed: RefCell<Vec<Option<u64>>>,
        pub caches: RefCell<Vec<[u32; 4]>>,
    }

    impl Core {
        pub fn new(hw_info: HwInfo, devices: u64) -> Self {
            let caches = RefCell::new(vec![[7; 4]; devices as usize]);
            Core { hw_info, devices, flushed: RefCell::new(Vec::new()), caches }
        }
    }

    impl ViommuCore for Core {
        fn hw_info(&self) -> &HwInfo {
            &self.hw_info
        }
        fn flush_all(&self) {
            self.flushed.borrow_mut().push(None);
        }
        fn flush_device(&self, virt_id: u64) -> bool {
            self.flushed.borrow_mut().push(Some(virt_id));
            virt_id < self.devices
        }
        fn with_device_cache(&self, virt_id: u64, f: &mut dyn FnMut(&mut [u32])) -> bool {
            let mut caches = self.caches.borrow_mut();
            caches.get_mut(virt_id as usize).map(|c| f(c)).is_some()
        }
    }

    /// An invalidation array in memory, copied as the ABI copies it.
    pub struct Entries {
        pub data_type: u32,
        pub entries: Vec<Vec<u8>>,
    }

    impl EntryArray for Entries {
        fn data_type(&self) -> u32 {
            self.data_type
        }
        fn len(&self) -> u32 {
            self.entries.len() as u32
        }
        fn copy(&mut self, i: u32, min: usize, out: &mut [u8]) -> Result<()> {
            let e = &self.entries[i as usize];
            if e.len() < min || e.len() > out.len() {
                return Err(Error::Invalid("entry size"));
            }
            out[..e.len()].copy_from_slice(e);
            Ok(())
        }
        fn copy_extensible(&mut self, i: u32, out: &mut [u8]) -> Result<()> {
            let e = &self.entries[i as usize];
            let n = e.len().min(out.len());
            out[..n].copy_from_slice(&e[..n]);
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn viommu_types_by_their_uapi_number() {
        assert_eq!(ViommuType::from_uapi(1), Some(ViommuType::ArmSmmuV3));
        assert_eq!(ViommuType::from_uapi(0xdead_beef), Some(ViommuType::Selftest));
        assert_eq!(ViommuType::from_uapi(0), None);
        assert!(ViommuType::ArmSmmuV3.serves(IommuModel::ArmSmmuV3));
        assert!(!ViommuType::ArmSmmuV3.serves(IommuModel::VTD));
        assert!(ViommuType::Selftest.serves(IommuModel::Selftest { huge: true }));
    }

    #[test]
    fn formats_follow_the_architecture() {
        assert_eq!(IommuModel::ArmSmmuV3.paging_format(false), PageFormat::ArmS1);
        assert_eq!(IommuModel::ArmSmmuV3.paging_format(true), PageFormat::ArmS2);
        assert!(IommuModel::ArmSmmuV3.serves(PageFormat::ArmS2));
        assert!(!IommuModel::AmdVi.serves(PageFormat::VtdSs4));
        assert!(IommuModel::Selftest { huge: false }.serves(PageFormat::MockHuge));
        assert_eq!(IommuModel::AmdVi.aperture(), IovaRange::new(0, (1 << 48) - 1));
    }

    #[test]
    fn each_format_has_one_owner() {
        assert_eq!(IommuModel::owning(PageFormat::VtdSs5), Some(IommuModel::IntelVtd { levels: 0 }));
        assert_eq!(IommuModel::owning(PageFormat::ArmS2), Some(IommuModel::ArmSmmuV3));
        assert_eq!(IommuModel::owning(PageFormat::AmdV1), Some(IommuModel::AmdVi));
        assert!(IommuModel::owning(PageFormat::MockPt).is_some_and(IommuModel::is_selftest));
    }
}
