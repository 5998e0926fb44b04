//! The ioasid engine: I/O address spaces, hardware page tables in real
//! formats, emulated devices and their DMA, in the object model of Linux's
//! iommufd. Front ends (the ABI, the preload shim, the daemon) sit on top.
//!
//! ```
//! use ioasid_engine::{Context, DeviceInfo, HostBuffer, Perm};
//!
//! let ctx = Context::new();
//! let ioas = ctx.ioas_alloc()?;
//! let dev = ctx.bind_device(DeviceInfo::new("nic", 0x0100))?;
//! ctx.attach(dev, ioas)?;
//!
//! let ram = HostBuffer::new(8192)?;
//! // SAFETY: `ram` outlives the mapping (it is unmapped below).
//! let iova = unsafe { ctx.map_user(ioas, ram.addr(), 8192, None, Perm::RW)? };
//! ctx.get(dev)?.dma_write(iova + 10, b"hello")?;
//! ctx.unmap(ioas, iova, 8192)?;
//!
//! let mut seen = [0u8; 5];
//! ram.read_at(10, &mut seen);
//! assert_eq!(&seen, b"hello");
//! // After unmap, the device's DMA faults instead of reaching `ram`.
//! assert!(ctx.get(dev)?.dma_write(iova, b"late").is_err());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![warn(missing_docs)]

pub mod access;
pub mod account;
mod attach;
pub mod context;
pub mod device;
pub mod domain;
pub mod epoch;
pub mod error;
pub mod fault;
pub mod hw_queue;
pub mod hwpt;
pub mod id;
pub mod inject;
pub mod ioas;
pub mod ioasid_set;
pub mod iotlb;
pub mod iova;
mod lock;
mod lookup;
pub mod memory;
pub mod model;
pub mod pages;
pub mod pci;
pub mod pgtable;
pub mod veventq;
pub mod viommu;
#[cfg(feature = "vm-memory")]
pub mod vm_memory_iommu;

pub use access::{Access, AccessOps};
pub use account::{AccountMode, Limit, credentials_changed, watch_credentials};
pub use context::{Context, ContextConfig, Kind, Object, ProcessMemory, SelftestDevice, SelftestId};
pub use device::{Device, DeviceInfo, DmaError, DmaPort, MockFlags, Pending, Stage, Stall};
pub use domain::{Gpa, HostAddr, Translated};
pub use error::{Error, Result};
pub use fault::FaultQueue;
pub use hw_queue::HwQueue;
pub use hwpt::{
    ConfigFault, Domain, FaultReason, Hwpt, HwptFlags, HwptNested, HwptPaging, NestedData, PageFormat, PasidUse,
    WalkStep,
};
pub use id::{
    AccessId, DeviceId, FaultId, HwQueueId, HwptId, HwptNestedId, HwptPagingId, Id, IoasId, NestParentId, ObjectId,
    PtId, SetObjectId, VdeviceId, VeventqId, ViommuId,
};
pub use iova::{IovaRange, PAGE_SIZE};
pub use memory::{HostBuffer, Trust};
pub use model::{HwInfo, IommuModel, IommuOps, Stage1, smmuv3};
pub use pci::{Bar, BarKind, Bus, EpfTest, FunctionConfig, Irq, IrqCounts, PciFunction};
pub use pgtable::Perm;
pub use veventq::Veventq;
pub use viommu::{MmapRegion, Vdevice, Viommu, ViommuType};
