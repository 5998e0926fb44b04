//! A virtio device model behind a vIOMMU.
//!
//! The VMM's vIOMMU (a virtio-iommu, say) turns the guest's MAP and UNMAP
//! requests into mappings of guest RAM in an IOAS; the device model,
//! rust-vmm's `virtio-queue`, does its DMA through vm-memory's
//! `IommuMemory` over an ioasid `IommuPort`, so every ring and buffer
//! access is translated by the device's page table. When the guest unmaps
//! a buffer the device is about to fill, the DMA faults and the VMM reports
//! the fault to the guest instead of touching memory.
//!
//! Run: `cargo run -p ioasid-engine --example virtio_device`

use std::error::Error;
use std::io::{Read, Write};

use ioasid_engine::vm_memory_iommu::IommuPort;
use ioasid_engine::{Context, DeviceInfo, IoasId, Perm};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::iommu::IommuMemory;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

const PAGE: u64 = 4096;
/// Descriptor flags (virtio 1.2, 2.7.5).
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
/// The guest driver's pages (guest-physical), and where it asks the vIOMMU
/// to map them for the device: IOVA = `IOVA_BASE` + GPA.
const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
const REQUEST: u64 = 0x4000;
const REPLY: u64 = 0x5000;
const IOVA_BASE: u64 = 0x8000_0000;

/// The VMM's vIOMMU: guest MAP/UNMAP requests become IOAS mappings.
struct Viommu<'a> {
    ctx: &'a Context,
    ioas: IoasId,
    ram: &'a GuestMemoryMmap,
}

impl Viommu<'_> {
    fn map(&self, gpa: u64, perm: Perm) -> Result<(), Box<dyn Error>> {
        let host = self.ram.get_host_address(GuestAddress(gpa))? as u64;
        // SAFETY: guest RAM outlives the context (`main` drops the context first).
        unsafe { self.ctx.map_user(self.ioas, host, PAGE, Some(IOVA_BASE + gpa), perm)? };
        Ok(())
    }

    fn unmap(&self, gpa: u64) -> Result<(), Box<dyn Error>> {
        self.ctx.unmap(self.ioas, IOVA_BASE + gpa, PAGE)?;
        Ok(())
    }
}

/// The guest driver posts a request and a device-writable reply buffer as
/// chain `slot` (descriptors `2 * slot` and `2 * slot + 1`).
fn post(ram: &GuestMemoryMmap, slot: u16, request: &[u8]) -> Result<(), Box<dyn Error>> {
    let (head, at) = (slot * 2, REQUEST + u64::from(slot) * 64);
    ram.write_slice(request, GuestAddress(at))?;
    let descs = [
        Descriptor::new(IOVA_BASE + at, request.len() as u32, F_NEXT, head + 1),
        Descriptor::new(IOVA_BASE + REPLY, 64, F_WRITE, 0),
    ];
    for (i, d) in descs.into_iter().enumerate() {
        ram.write_obj(d, GuestAddress(DESC + (u64::from(head) + i as u64) * 16))?;
    }
    ram.write_obj(head, GuestAddress(AVAIL + 4 + u64::from(slot) * 2))?;
    ram.write_obj(slot + 1, GuestAddress(AVAIL + 2))?;
    Ok(())
}

/// The device model: answers each request upper-cased. A DMA fault fails
/// the request; the VMM reports it to the guest and completes the chain
/// with nothing written.
fn serve<M: vm_memory::GuestMemory>(memory: &M, queue: &mut Queue) -> Vec<Result<usize, String>> {
    let mut outcomes = Vec::new();
    while let Some(chain) = queue.pop_descriptor_chain(memory) {
        let head = chain.head_index();
        let result = (|| -> Result<usize, Box<dyn Error>> {
            let mut request = Vec::new();
            chain.clone().reader(memory)?.read_to_end(&mut request)?;
            virtio_queue::Writer::new(memory, chain)?.write_all(&request.to_ascii_uppercase())?;
            Ok(request.len())
        })()
        .map_err(|e| e.to_string());
        if let Err(fault) = &result {
            println!("VMM: reporting a DMA fault to the guest: {fault}");
        }
        queue.add_used(memory, head, *result.as_ref().unwrap_or(&0) as u32).expect("the used ring is mapped");
        outcomes.push(result);
    }
    outcomes
}

fn main() -> Result<(), Box<dyn Error>> {
    let ram = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 16 * PAGE as usize)])?;
    let ctx = Context::new();
    let ioas = ctx.ioas_alloc()?;
    let dev = ctx.bind_device(DeviceInfo::new("virtio-blk", 0x08))?;
    ctx.attach(dev, ioas)?;
    let viommu = Viommu { ctx: &ctx, ioas, ram: &ram };

    // The guest maps its rings and buffers for the device.
    for gpa in [DESC, AVAIL, REQUEST] {
        viommu.map(gpa, Perm::R)?;
    }
    viommu.map(USED, Perm::RW)?;
    viommu.map(REPLY, Perm::RW)?;

    // The device's view of memory: IOVAs, translated by its page table.
    // The port snapshots the guest memory layout: after a hot-plug, build a new one.
    let memory = IommuMemory::new(ram.clone(), IommuPort::for_memory(ctx.get(dev)?, None, &ram), true, ());
    let mut queue = Queue::new(4)?;
    queue.try_set_desc_table_address(GuestAddress(IOVA_BASE + DESC))?;
    queue.try_set_avail_ring_address(GuestAddress(IOVA_BASE + AVAIL))?;
    queue.try_set_used_ring_address(GuestAddress(IOVA_BASE + USED))?;
    queue.set_ready(true);

    post(&ram, 0, b"hello through the viommu")?;
    assert_eq!(serve(&memory, &mut queue), [Ok(24)]);
    let mut reply = [0u8; 24];
    ram.read_slice(&mut reply, GuestAddress(REPLY))?;
    println!("device replied: {}", String::from_utf8_lossy(&reply));
    assert_eq!(&reply, b"HELLO THROUGH THE VIOMMU");

    // The guest takes the reply page back; the device's next write faults.
    viommu.unmap(REPLY)?;
    ram.write_slice(&[0; 24], GuestAddress(REPLY))?;
    post(&ram, 1, b"too late")?;
    let outcomes = serve(&memory, &mut queue);
    assert!(outcomes[0].is_err(), "a DMA to an unmapped IOVA faults");
    ram.read_slice(&mut reply, GuestAddress(REPLY))?;
    assert_eq!(reply, [0; 24], "nothing reached the unmapped page");
    Ok(())
}

#[test]
fn runs() {
    main().unwrap();
}
