//! A VMM wiring a guest's VT-d first-stage table nested over stage 2.
//!
//! The VMM maps the guest's RAM at its guest-physical addresses (stage 2,
//! a nest-parent HWPT); the guest builds its own first-stage table in that
//! RAM and the VMM hands its root to a nested HWPT, as it would on the
//! guest's write of a PASID-table entry. The device's DMA then walks both
//! stages. A guest that changes its table must invalidate, and the VMM
//! forwards that invalidation: until then the IOTLB keeps the old
//! translation, as hardware does.
//!
//! Run: `cargo run -p ioasid-engine --example nested_vtd`

use std::error::Error;

use ioasid_engine::pgtable::x86::first_stage::encode;
use ioasid_engine::{Context, DeviceInfo, HostBuffer, HwptFlags, NestedData, Perm};

const GUEST_RAM: u64 = 64 * 4096;
/// The guest's 4-level table: root at GPA 0x1000, lower levels below it.
const TABLES: [u64; 4] = [0x1000, 0x2000, 0x3000, 0x4000];
const IOVA: u64 = 0x4000_0000;

/// The guest maps `IOVA` to `gpa` in its own table, in its own memory.
fn guest_map(ram: &HostBuffer, gpa: u64) {
    let index = |level: u32| (IOVA >> (12 + 9 * level)) & 511;
    for (i, level) in (1..4u32).rev().enumerate() {
        let entry = encode(TABLES[i + 1], level, false, true);
        ram.write_at((TABLES[i] + index(level) * 8) as usize, &entry.to_le_bytes());
    }
    ram.write_at((TABLES[3] + index(0) * 8) as usize, &encode(gpa, 0, true, true).to_le_bytes());
}

fn main() -> Result<(), Box<dyn Error>> {
    let ram = HostBuffer::new(GUEST_RAM as usize)?;
    let ctx = Context::new();

    // Stage 2: guest-physical addresses to the VMM's memory.
    let gpa_space = ctx.ioas_alloc()?;
    // SAFETY: `ram` outlives the context (declared first, dropped last).
    unsafe { ctx.map_user(gpa_space, ram.addr(), GUEST_RAM, Some(0), Perm::RW)? };
    let dev = ctx.bind_device(DeviceInfo::new("vf0", 0x20))?;
    let stage2 = ctx.hwpt_alloc(dev, gpa_space, HwptFlags { nest_parent: true, dirty_tracking: false }, None)?;

    // Stage 1: the guest's table, by the root it programmed.
    guest_map(&ram, 0x10000);
    let nested = ctx.hwpt_alloc_nested(dev, stage2, NestedData::vtd_s1(TABLES[0], 4), None)?;
    ctx.attach(dev, nested)?;

    let device = ctx.get(dev)?;
    device.dma_write(IOVA + 0x10, b"through both stages")?;
    let mut seen = [0u8; 19];
    ram.read_at(0x10010, &mut seen);
    println!("IOVA {:#x} -> GPA 0x10010: {}", IOVA + 0x10, String::from_utf8_lossy(&seen));
    assert_eq!(&seen, b"through both stages");

    // The guest moves the page; the cached translation still holds...
    guest_map(&ram, 0x11000);
    device.dma_write(IOVA, b"stale")?;
    ram.read_at(0x10000, &mut seen[..5]);
    assert_eq!(&seen[..5], b"stale", "the IOTLB holds the old translation until invalidated");

    // ...until the guest invalidates and the VMM passes it on.
    let hwpt = ctx.get(nested)?;
    hwpt.invalidate();
    device.dma_write(IOVA, b"fresh")?;
    ram.read_at(0x11000, &mut seen[..5]);
    println!("after invalidation, IOVA {IOVA:#x} -> GPA 0x11000: {}", String::from_utf8_lossy(&seen[..5]));
    assert_eq!(&seen[..5], b"fresh");
    Ok(())
}

#[test]
fn runs() {
    main().unwrap();
}
