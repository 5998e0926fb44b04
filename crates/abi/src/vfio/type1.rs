//! VFIO type1 compatibility on the iommufd file descriptor: the container
//! ioctls of `linux/vfio.h`, answered on the IOAS chosen with
//! `IOMMU_VFIO_IOAS`, with type1's and type1v2's semantics as Linux's
//! `vfio_compat.c` gives them.

use core::mem::{offset_of, size_of};
use std::sync::Arc;

use ioasid_engine::ioas::Ioas;
use ioasid_engine::{IovaRange, Perm};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::errno::Errno;
use crate::ucmd::Ucmd;

use super::vfio_io;

pub const VFIO_GET_API_VERSION: u32 = vfio_io(0);
pub const VFIO_CHECK_EXTENSION: u32 = vfio_io(1);
pub const VFIO_SET_IOMMU: u32 = vfio_io(2);
pub const VFIO_IOMMU_GET_INFO: u32 = vfio_io(12);
pub const VFIO_IOMMU_MAP_DMA: u32 = vfio_io(13);
pub const VFIO_IOMMU_UNMAP_DMA: u32 = vfio_io(14);

pub const VFIO_API_VERSION: i32 = 0;
pub const VFIO_TYPE1_IOMMU: u64 = 1;
pub const VFIO_TYPE1V2_IOMMU: u64 = 3;
pub const VFIO_DMA_CC_IOMMU: u64 = 4;
pub const VFIO_UNMAP_ALL: u64 = 9;

pub const VFIO_IOMMU_INFO_PGSIZES: u32 = 1 << 0;
pub const VFIO_IOMMU_INFO_CAPS: u32 = 1 << 1;
pub const VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE: u16 = 1;
pub const VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL: u16 = 3;
pub const VFIO_DMA_MAP_FLAG_READ: u32 = 1 << 0;
pub const VFIO_DMA_MAP_FLAG_WRITE: u32 = 1 << 1;
pub const VFIO_DMA_UNMAP_FLAG_ALL: u32 = 1 << 1;

#[repr(C)]
#[derive(Debug, Default, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct vfio_iommu_type1_info {
    pub argsz: u32,
    pub flags: u32,
    pub iova_pgsizes: u64,
    pub cap_offset: u32,
    pub pad: u32,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct vfio_info_cap_header {
    pub id: u16,
    pub version: u16,
    pub next: u32,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct vfio_iommu_type1_dma_map {
    pub argsz: u32,
    pub flags: u32,
    pub vaddr: u64,
    pub iova: u64,
    pub size: u64,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct vfio_iommu_type1_dma_unmap {
    pub argsz: u32,
    pub flags: u32,
    pub iova: u64,
    pub size: u64,
}

const _: () = {
    assert!(size_of::<vfio_iommu_type1_info>() == 24);
    assert!(size_of::<vfio_iommu_type1_dma_map>() == 32);
    assert!(size_of::<vfio_iommu_type1_dma_unmap>() == 24);
};

/// Runs a VFIO container ioctl; `Ok` carries the ioctl's return value.
pub fn ioctl(u: &Ucmd, request: u32) -> Result<i32, Errno> {
    match request {
        VFIO_GET_API_VERSION => Ok(VFIO_API_VERSION),
        VFIO_CHECK_EXTENSION => check_extension(u, u.arg),
        VFIO_SET_IOMMU => set_iommu(u, u.arg).map(|()| 0),
        VFIO_IOMMU_GET_INFO => get_info(u).map(|()| 0),
        VFIO_IOMMU_MAP_DMA => map_dma(u).map(|()| 0),
        VFIO_IOMMU_UNMAP_DMA => unmap_dma(u).map(|()| 0),
        _ => Err(Errno::ENOTTY),
    }
}

fn compat_ioas(u: &Ucmd) -> Result<Arc<Ioas>, Errno> {
    let id = u.ctx.vfio_ioas()?;
    Ok(u.ctx.get(id)?)
}

fn check_extension(u: &Ucmd, ext: u64) -> Result<i32, Errno> {
    Ok(match ext {
        VFIO_TYPE1_IOMMU | VFIO_TYPE1V2_IOMMU | VFIO_UNMAP_ALL => 1,
        // Every domain here is coherent with the CPU.
        VFIO_DMA_CC_IOMMU => {
            compat_ioas(u)?;
            1
        }
        _ => 0,
    })
}

fn set_iommu(u: &Ucmd, kind: u64) -> Result<(), Errno> {
    if kind != VFIO_TYPE1_IOMMU && kind != VFIO_TYPE1V2_IOMMU {
        return Err(Errno::EINVAL);
    }
    let ioas = compat_ioas(u)?;
    // Type1 (v1) may unmap part of a mapping, which needs 4 KiB IO pages.
    if kind == VFIO_TYPE1_IOMMU {
        ioas.set_huge_pages(false)?;
    }
    Ok(())
}

/// Reads the leading `minsz` bytes of a VFIO struct; the rest stays zero.
fn read_head<T: FromBytes + IntoBytes>(u: &Ucmd, minsz: usize) -> Result<T, Errno> {
    let mut v = T::new_zeroed();
    u.mem.read(u.arg, &mut v.as_mut_bytes()[..minsz])?;
    Ok(v)
}

fn map_dma(u: &Ucmd) -> Result<(), Errno> {
    let minsz = size_of::<vfio_iommu_type1_dma_map>();
    let m: vfio_iommu_type1_dma_map = read_head(u, minsz)?;
    if (m.argsz as usize) < minsz || m.flags & !(VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE) != 0 {
        return Err(Errno::EINVAL);
    }
    let perm = Perm { read: m.flags & VFIO_DMA_MAP_FLAG_READ != 0, write: m.flags & VFIO_DMA_MAP_FLAG_WRITE != 0 };
    let id = u.ctx.vfio_ioas()?;
    u.map_user(id, m.vaddr, m.size, Some(m.iova), perm)?;
    Ok(())
}

fn unmap_dma(u: &Ucmd) -> Result<(), Errno> {
    let minsz = size_of::<vfio_iommu_type1_dma_unmap>();
    let mut m: vfio_iommu_type1_dma_unmap = read_head(u, minsz)?;
    if (m.argsz as usize) < minsz || m.flags & !VFIO_DMA_UNMAP_FLAG_ALL != 0 {
        return Err(Errno::EINVAL);
    }
    let ioas = compat_ioas(u)?;
    let (unmapped, res) = if m.flags & VFIO_DMA_UNMAP_FLAG_ALL != 0 {
        if m.iova != 0 || m.size != 0 {
            return Err(Errno::EINVAL);
        }
        (ioas.unmap_all(), Ok(()))
    } else {
        // Type1 unmaps may split mappings; splitting needs huge pages off.
        if !ioas.huge_pages() {
            let end = m.iova.wrapping_add(m.size).wrapping_sub(1);
            let cuts: &[u64] = if m.iova != 0 { &[end, m.iova - 1] } else { &[end] };
            ioas.cut(cuts)?;
        }
        match IovaRange::from_len(m.iova, m.size) {
            Ok(range) => ioas.unmap(range),
            Err(e) => (0, Err(e)),
        }
    };
    m.size = unmapped;
    let written = u.mem.write(u.arg, m.as_bytes());
    res?;
    written
}

fn get_info(u: &Ucmd) -> Result<(), Errno> {
    let minsz = offset_of!(vfio_iommu_type1_info, cap_offset);
    let mut info: vfio_iommu_type1_info = read_head(u, minsz)?;
    if (info.argsz as usize) < minsz {
        return Err(Errno::EINVAL);
    }
    let argsz = info.argsz as usize;
    let copy = argsz.min(size_of::<vfio_iommu_type1_info>());
    let ioas = compat_ioas(u)?;
    info.flags = VFIO_IOMMU_INFO_PGSIZES;
    info.iova_pgsizes = ioas.pgsize_bitmap();
    info.cap_offset = 0;

    // The capability chain, written where the caller's buffer has room.
    let (ranges, _) = ioas.iova_ranges();
    let dma_avail = {
        let mut c = [0u8; 16];
        c[..8].copy_from_slice(
            vfio_info_cap_header { id: VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL, version: 1, next: 0 }.as_bytes(),
        );
        c[8..12].copy_from_slice(&u32::MAX.to_ne_bytes());
        c
    };
    let iova_cap = {
        let mut c = Vec::with_capacity(16 + 16 * ranges.len());
        c.extend_from_slice(
            vfio_info_cap_header { id: VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE, version: 1, next: 0 }.as_bytes(),
        );
        c.extend_from_slice(&(ranges.len() as u32).to_ne_bytes());
        c.extend_from_slice(&0u32.to_ne_bytes());
        for r in &ranges {
            c.extend_from_slice(&r.start.to_ne_bytes());
            c.extend_from_slice(&r.last.to_ne_bytes());
        }
        c
    };
    let mut total = size_of::<vfio_iommu_type1_info>();
    let mut last_cap: Option<usize> = None;
    for cap in [&dma_avail[..], &iova_cap[..]] {
        let size = cap.len().next_multiple_of(8);
        if argsz >= total + cap.len() {
            u.mem.write(u.arg + total as u64, cap)?;
        }
        if let Some(prev) = last_cap
            && argsz >= total
        {
            u.mem
                .write(u.arg + (prev + offset_of!(vfio_info_cap_header, next)) as u64, &(total as u32).to_ne_bytes())?;
        }
        last_cap = Some(total);
        total += size;
    }
    if argsz >= total {
        info.cap_offset = size_of::<vfio_iommu_type1_info>() as u32;
    }
    info.argsz = total as u32;
    info.flags |= VFIO_IOMMU_INFO_CAPS;
    u.mem.write(u.arg, &info.as_bytes()[..copy])
}
