//! A virtio device model (rust-vmm's `virtio-queue`) doing its DMA through
//! ioasid: the queue and its buffers sit at guest IOVAs that a guest-owned
//! VT-d first-stage table translates, over the host's second stage.

#![cfg(feature = "vm-memory")]

use std::io::{Read, Write};
use std::sync::Arc;

use ioasid_engine::pgtable::x86::first_stage::encode;
use ioasid_engine::vm_memory_iommu::IommuPort;
use ioasid_engine::{
    Context, ContextConfig, DeviceId, DeviceInfo, DmaError, FaultReason, HwptFlags, HwptNestedId, Limit, NestedData,
    Perm, Stage,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::iommu::IommuMemory;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MemoryRegionAddress};

const PAGE: u64 = 4096;
/// Descriptor flags, from the virtio specification (2.7.5).
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const RAM_PAGES: u64 = 64;
/// The guest's stage-1 table: root and three lower levels at these GPAs.
const S1_TABLES: [u64; 4] = [0x1000, 0x2000, 0x3000, 0x4000];
/// Guest IOVAs of the queue and its buffers; each page is its own mapping.
const DESC: u64 = 0x40_0000;
const AVAIL: u64 = 0x40_1000;
const USED: u64 = 0x40_2000;
const REQUEST: u64 = 0x40_3000;
const REPLY: u64 = 0x40_4000;
const READ_ONLY: u64 = 0x40_5000;
/// Where stage 1 puts the IOVA pages above: far apart and out of order.
const GPA_OF: [(u64, u64, bool); 6] = [
    (DESC, 0x30000, false),
    (AVAIL, 0x21000, false),
    (USED, 0x12000, true),
    (REQUEST, 0x2b000, false),
    (REPLY, 0x17000, true),
    (READ_ONLY, 0x18000, false),
];

struct Guest {
    ctx: Arc<Context>,
    dev: DeviceId,
    nested: HwptNestedId,
    ram: GuestMemoryMmap,
    memory: IommuMemory<GuestMemoryMmap, IommuPort>,
}

impl Guest {
    /// The guest's CPU view: its own writes go straight to guest-physical.
    fn gpa(iova: u64) -> u64 {
        let page = iova & !(PAGE - 1);
        GPA_OF.iter().find(|m| m.0 == page).unwrap().1 + (iova - page)
    }

    fn poke(&self, iova: u64, bytes: &[u8]) {
        self.ram.write_slice(bytes, GuestAddress(Self::gpa(iova))).unwrap();
    }

    fn peek(&self, iova: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        self.ram.read_slice(&mut v, GuestAddress(Self::gpa(iova))).unwrap();
        v
    }

    fn map4k(&self, iova: u64, gpa: u64, write: bool) {
        let idx = |level: u32| (iova >> (12 + 9 * level)) & 511;
        for (i, level) in (1..4).rev().enumerate() {
            let entry = encode(S1_TABLES[i + 1], level, false, true);
            self.ram.write_obj(entry, GuestAddress(S1_TABLES[i] + idx(level) * 8)).unwrap();
        }
        self.ram.write_obj(encode(gpa, 0, true, write), GuestAddress(S1_TABLES[3] + idx(0) * 8)).unwrap();
    }

    /// Adds a two-descriptor chain (request, then a device-writable reply
    /// buffer at `reply`) to the available ring as entry `slot`.
    fn post(&self, slot: u16, request: &[u8], reply: u64) {
        let head = slot * 2;
        let descriptor = |addr: u64, len: u32, flags: u16, next: u16| {
            let mut d = [0u8; 16];
            d[..8].copy_from_slice(&addr.to_le_bytes());
            d[8..12].copy_from_slice(&len.to_le_bytes());
            d[12..14].copy_from_slice(&flags.to_le_bytes());
            d[14..].copy_from_slice(&next.to_le_bytes());
            d
        };
        let request_at = REQUEST + u64::from(slot) * 64;
        self.poke(request_at, request);
        self.poke(DESC + u64::from(head) * 16, &descriptor(request_at, request.len() as u32, F_NEXT, head + 1));
        self.poke(DESC + u64::from(head + 1) * 16, &descriptor(reply, 64, F_WRITE, 0));
        self.poke(AVAIL + 4 + u64::from(slot) * 2, &head.to_le_bytes());
        self.poke(AVAIL + 2, &(slot + 1).to_le_bytes());
    }
}

fn guest() -> Guest {
    let ctx = Arc::new(Context::with_config(ContextConfig::isolated(Limit::Pages(1 << 20))));
    let ram = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), (RAM_PAGES * PAGE) as usize)]).unwrap();
    let host = ram.iter().next().unwrap().get_host_address(MemoryRegionAddress(0)).unwrap() as u64;
    let ioas = ctx.ioas_alloc().unwrap();
    // SAFETY: `ram` lives in the returned Guest, beside the context.
    unsafe { ctx.map_user(ioas, host, RAM_PAGES * PAGE, Some(0), Perm::RW).unwrap() };
    let dev = ctx.bind_device(DeviceInfo::new("virtio-blk", 1)).unwrap();
    let parent = ctx.hwpt_alloc(dev, ioas, HwptFlags { nest_parent: true, dirty_tracking: false }, None).unwrap();
    let nested = ctx.hwpt_alloc_nested(dev, parent, NestedData::vtd_s1(S1_TABLES[0], 4), None).unwrap();
    ctx.attach(dev, nested).unwrap();
    let port = IommuPort::for_memory(ctx.get(dev).unwrap(), None, &ram);
    let memory = IommuMemory::new(ram.clone(), port, true, ());
    let g = Guest { ctx, dev, nested, ram, memory };
    for (iova, gpa, write) in GPA_OF {
        g.map4k(iova, gpa, write);
    }
    g
}

fn queue(g: &Guest) -> Queue {
    let mut q = Queue::new(4).unwrap();
    q.try_set_desc_table_address(GuestAddress(DESC)).unwrap();
    q.try_set_avail_ring_address(GuestAddress(AVAIL)).unwrap();
    q.try_set_used_ring_address(GuestAddress(USED)).unwrap();
    q.set_ready(true);
    assert!(q.is_valid(&g.memory), "the rings are reachable through both stages");
    q
}

/// The device model: reads each request and writes it back upper-cased.
fn serve(g: &Guest, q: &mut Queue) -> Vec<Result<u32, String>> {
    let mut outcomes = Vec::new();
    while let Some(chain) = q.pop_descriptor_chain(&g.memory) {
        let head = chain.head_index();
        let result = (|| {
            let mut request = Vec::new();
            chain.clone().reader(&g.memory).map_err(|e| e.to_string())?.read_to_end(&mut request).unwrap();
            let mut writer = virtio_queue::Writer::new(&g.memory, chain).map_err(|e| format!("{e}: {e:?}"))?;
            writer.write_all(&request.to_ascii_uppercase()).map_err(|e| e.to_string())?;
            Ok(request.len() as u32)
        })();
        q.add_used(&g.memory, head, *result.as_ref().unwrap_or(&0)).unwrap();
        outcomes.push(result);
    }
    outcomes
}

#[test]
fn a_virtio_queue_runs_through_a_nested_table() {
    let g = guest();
    let mut q = queue(&g);
    g.post(0, b"hello through two stages", REPLY);
    assert_eq!(serve(&g, &mut q), vec![Ok(24)]);
    assert_eq!(g.peek(REPLY, 24), b"HELLO THROUGH TWO STAGES");
    assert_eq!(g.peek(USED + 2, 2), 1u16.to_le_bytes(), "used index advanced");
    assert_eq!(g.peek(USED + 4, 8), [0, 0, 0, 0, 24, 0, 0, 0], "used entry: head 0, 24 bytes");
}

#[test]
fn a_reply_buffer_the_guest_made_read_only_faults() {
    let g = guest();
    let mut q = queue(&g);
    g.post(0, b"write me", READ_ONLY);
    let outcomes = serve(&g, &mut q);
    let err = outcomes[0].as_ref().unwrap_err();
    assert!(err.contains("IOVA 0x405000 (Permission, write)"), "the fault names IOVA and cause: {err}");
    let typed = g.memory.iommu().take_fault();
    let fault = DmaError::Fault {
        iova: READ_ONLY,
        reason: FaultReason::Permission,
        write: true,
        pasid: None,
        stage: Stage::First,
    };
    assert_eq!(typed, Some(fault), "the device model gets the fault typed, with its stage");
    assert_eq!(g.ctx.get(g.dev).unwrap().unrecoverable_faults(), 1, "and it was counted");
    assert_eq!(g.peek(READ_ONLY, 8), [0; 8], "nothing was written");
}

#[test]
fn a_guest_remap_is_used_once_invalidated() {
    let g = guest();
    let mut q = queue(&g);
    g.post(0, b"first", REPLY);
    assert_eq!(serve(&g, &mut q), vec![Ok(5)]);
    // The guest points the reply page elsewhere and invalidates its IOTLB.
    g.map4k(REPLY, 0x19000, true);
    let Ok(n) = g.ctx.get(g.nested) else { panic!("not nested") };
    n.invalidate();
    g.post(1, b"second", REPLY);
    assert_eq!(serve(&g, &mut q), vec![Ok(6)]);
    let mut moved = [0u8; 6];
    g.ram.read_slice(&mut moved, GuestAddress(0x19000)).unwrap();
    assert_eq!(&moved, b"SECOND");
}
