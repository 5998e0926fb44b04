//! A PRI-capable device and the thread that serves its page requests.
//!
//! The device's HWPT sends its faults to a fault queue. A DMA to an IOVA
//! nothing maps does not fail at once: it becomes a page request, and the
//! DMA waits. The handler thread takes each request off the queue, maps a
//! page there and answers; the DMA then completes. (A `Response::Invalid`
//! answer would fail it instead.)
//!
//! Run: `cargo run -p ioasid-engine --example pri_fault_handler`

use std::error::Error;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::Duration;

use ioasid_engine::fault::Response;
use ioasid_engine::{Context, DeviceInfo, HostBuffer, HwptFlags, Perm};

const PAGE: u64 = 4096;
const IOVA: u64 = 1 << 30;

fn main() -> Result<(), Box<dyn Error>> {
    let ram = Arc::new(HostBuffer::new(4 * PAGE as usize)?);
    let ctx = Arc::new(Context::new());
    let ioas = ctx.ioas_alloc()?;
    let mut info = DeviceInfo::new("gpu0", 0x18);
    info.pri = true;
    let dev = ctx.bind_device(info)?;
    let (fault_id, queue) = ctx.fault_alloc()?;
    let hwpt = ctx.hwpt_alloc(dev, ioas, HwptFlags::default(), Some(fault_id))?;
    ctx.attach(dev, hwpt)?;

    // The handler: maps RAM page n at IOVA page n on demand.
    let stop = Arc::new(AtomicBool::new(false));
    let handler = {
        let (ctx, ram, stop) = (ctx.clone(), ram.clone(), stop.clone());
        thread::spawn(move || -> usize {
            let mut served = 0;
            while !stop.load(Ordering::Relaxed) {
                let Some((cookie, group)) = queue.next(Duration::from_millis(20)) else { continue };
                for request in &group.requests {
                    let page = (request.addr - IOVA) & !(PAGE - 1);
                    println!("page request: IOVA {:#x}, mapping RAM page {}", request.addr, page / PAGE);
                    // SAFETY: `ram` outlives the mapping: `main` unmaps before it goes.
                    let mapped = unsafe { ctx.map_user(ioas, ram.addr() + page, PAGE, Some(IOVA + page), Perm::RW) };
                    mapped.expect("the page is free");
                }
                queue.respond(cookie, Response::Success).expect("a pending request");
                served += 1;
            }
            served
        })
    };

    // The device touches three pages nobody mapped; each DMA waits for its answer.
    let device = ctx.get(dev)?;
    for page in [2, 0, 3] {
        device.dma_write(IOVA + page * PAGE + 8, format!("page {page}").as_bytes())?;
    }
    let mut seen = [0u8; 6];
    ram.read_at(3 * PAGE as usize + 8, &mut seen);
    assert_eq!(&seen, b"page 3");
    // Mapped now: no further request.
    device.dma_read(IOVA + 2 * PAGE + 8, &mut seen)?;
    assert_eq!(&seen, b"page 2");

    stop.store(true, Ordering::Relaxed);
    let served = handler.join().map_err(|_| "the handler panicked")?;
    println!("{served} page requests served");
    assert_eq!(served, 3);
    ctx.unmap(ioas, 0, u64::MAX)?;
    Ok(())
}

#[test]
fn runs() {
    main().unwrap();
}
