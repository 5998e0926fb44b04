//! Memory of another process, as a forked child maps it through the fd it
//! shares with its parent: taken when Linux would pin it (only the pages the
//! child wrote), EFAULT once the process is gone.

use std::sync::Arc;

use ioasid_engine::{AccessOps, Context, ContextConfig, DeviceInfo, Error, HostBuffer, Limit, Perm, ProcessMemory};

const PAGE: u64 = 4096;

/// A child whose copy of `buf` holds `b'C'`, stopped until `release` runs.
struct Child {
    pid: i32,
    go: i32,
}

fn fork_writing(buf: &HostBuffer) -> Child {
    fork_writing_at(buf.addr() as *mut u8, 0, &[b'C'; 8192][..buf.len()])
}

impl Child {
    fn release(self) {
        // SAFETY: our pipe end and our child.
        unsafe {
            libc::write(self.go, b"g".as_ptr().cast(), 1);
            libc::close(self.go);
            assert_eq!(libc::waitpid(self.pid, std::ptr::null_mut(), 0), self.pid);
        }
    }
}

#[test]
fn another_processs_pages_are_taken_at_pin_and_missed_once_it_is_gone() {
    let ctx = Arc::new(Context::with_config(ContextConfig::isolated(Limit::Pages(1 << 20))));
    let buf = HostBuffer::new(2 * PAGE as usize).unwrap();
    buf.write_at(0, &[b'P'; 2 * PAGE as usize]);
    let child = fork_writing(&buf);
    let live = ctx.ioas_alloc().unwrap();
    let gone = ctx.ioas_alloc().unwrap();
    ctx.map_process(live, child.pid, ProcessMemory::Forked, buf.addr(), 2 * PAGE, Some(0x10_0000), Perm::RW).unwrap();
    ctx.map_process(gone, child.pid, ProcessMemory::Forked, buf.addr(), 2 * PAGE, Some(0x10_0000), Perm::RW).unwrap();
    // Attaching pins: the child's memory is taken now.
    let dev = ctx.bind_device(DeviceInfo::new("d", 1)).unwrap();
    ctx.attach(dev, live).unwrap();
    let mut seen = [0u8; 4];
    ctx.get(dev).unwrap().dma_read(0x10_1ffc, &mut seen).unwrap();
    assert_eq!(&seen, b"CCCC", "the child's memory, not ours");
    child.release();
    // With the child gone, pinning its memory fails as Linux's does.
    let late = ctx.bind_device(DeviceInfo::new("late", 2)).unwrap();
    assert!(matches!(ctx.attach(late, gone), Err(Error::Fault(_))));
    // What was taken stays usable.
    ctx.get(dev).unwrap().dma_write(0x10_0000, b"ok").unwrap();
    ctx.get(dev).unwrap().dma_read(0x10_0000, &mut seen).unwrap();
    assert_eq!(&seen, b"okCC");
    let mut ours = [0u8; 2];
    buf.read_at(0, &mut ours);
    assert_eq!(&ours, b"PP", "our own copy was never touched");
}

#[test]
fn shared_memory_of_a_child_is_used_in_place() {
    let ctx = Arc::new(Context::with_config(ContextConfig::isolated(Limit::Pages(1 << 20))));
    let len = 2 * PAGE as usize;
    // SAFETY: a fresh shared anonymous mapping, unmapped at the end.
    let shared = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(shared, libc::MAP_FAILED);
    let (mut ready, mut go) = ([0; 2], [0; 2]);
    // SAFETY: as in `fork_writing`.
    unsafe { assert_eq!((libc::pipe(ready.as_mut_ptr()), libc::pipe(go.as_mut_ptr())), (0, 0)) };
    // SAFETY: the child only signals, waits and _exits.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: our pipes.
        unsafe {
            libc::write(ready[1], b"r".as_ptr().cast(), 1);
            let mut b = [0u8];
            libc::read(go[0], b.as_mut_ptr().cast(), 1);
            libc::_exit(0);
        }
    }
    let mut b = [0u8];
    // SAFETY: our pipe.
    unsafe { assert_eq!(libc::read(ready[0], b.as_mut_ptr().cast(), 1), 1) };
    let ioas = ctx.ioas_alloc().unwrap();
    let dev = ctx.bind_device(DeviceInfo::new("d", 1)).unwrap();
    ctx.attach(dev, ioas).unwrap();
    // Mapped (and pinned, a domain exists) while the child lives.
    ctx.map_process(ioas, pid, ProcessMemory::Forked, shared as u64, len as u64, Some(0x10_0000), Perm::RW).unwrap();
    // SAFETY: our pipe and our child.
    unsafe {
        libc::write(go[1], b"g".as_ptr().cast(), 1);
        assert_eq!(libc::waitpid(pid, std::ptr::null_mut(), 0), pid);
    }
    // The same pages as ours: a device write is seen here, and ours there.
    ctx.get(dev).unwrap().dma_write(0x10_0010, b"dev").unwrap();
    // SAFETY: reading and writing our own live mapping.
    unsafe {
        assert_eq!(std::slice::from_raw_parts((shared as *const u8).add(0x10), 3), b"dev");
        (shared as *mut u8).add(0x20).write(b'h');
    }
    let mut seen = [0u8; 1];
    ctx.get(dev).unwrap().dma_read(0x10_0020, &mut seen).unwrap();
    assert_eq!(&seen, b"h");
    ctx.unmap(ioas, 0, u64::MAX).unwrap();
    // SAFETY: our mapping, no longer used by the context.
    unsafe { libc::munmap(shared, len) };
}

/// `len` bytes of address space, reserved but not populated.
fn sparse(len: usize) -> *mut u8 {
    // SAFETY: a fresh private anonymous mapping; MAP_NORESERVE so its size
    // is not held against the commit limit, as nothing populates it.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED);
    p.cast()
}

/// A child that writes `data` at `at` of its copy of `mem`, then waits.
fn fork_writing_at(mem: *mut u8, at: usize, data: &'static [u8]) -> Child {
    let (mut ready, mut go) = ([0; 2], [0; 2]);
    // SAFETY: plain pipe creation into arrays of two.
    unsafe { assert_eq!((libc::pipe(ready.as_mut_ptr()), libc::pipe(go.as_mut_ptr())), (0, 0)) };
    // SAFETY: the child only writes memory it owns, uses pipes and _exits,
    // all async-signal-safe, as a child of a threaded process must.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        // SAFETY: `mem` is mapped in the child too (a copy); the pipes are
        // ours. Without its own write end, the child sees the parent go
        // even if the parent's test fails before releasing it.
        unsafe {
            libc::close(go[1]);
            std::ptr::copy_nonoverlapping(data.as_ptr(), mem.add(at), data.len());
            libc::write(ready[1], b"r".as_ptr().cast(), 1);
            let mut b = [0u8];
            libc::read(go[0], b.as_mut_ptr().cast(), 1);
            libc::_exit(0);
        }
    }
    let mut b = [0u8];
    // SAFETY: reading one byte from our pipe; closing our copies of the ends.
    unsafe {
        assert_eq!(libc::read(ready[0], b.as_mut_ptr().cast(), 1), 1);
        libc::close(ready[0]);
        libc::close(ready[1]);
        libc::close(go[0]);
    }
    Child { pid, go: go[1] }
}

/// This process's resident memory, in bytes.
fn rss() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    statm.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * PAGE
}

#[test]
fn a_small_dma_into_a_childs_large_sparse_mapping_takes_only_what_the_child_wrote() {
    // 1 GiB copied whole took 2 GiB here; 4 GiB failed; 64 GiB never returned.
    for gib in [1u64, 4, 64] {
        let len = gib << 30;
        let mem = sparse(len as usize);
        let at = (len / 2 + 4096 - 8) as usize;
        let child = fork_writing_at(mem, at, b"the child's bytes");
        let ctx = Arc::new(Context::with_config(ContextConfig::isolated(Limit::Pages(1 << 30))));
        let ioas = ctx.ioas_alloc().unwrap();
        let dev = ctx.bind_device(DeviceInfo::new("d", 1)).unwrap();
        ctx.attach(dev, ioas).unwrap();
        let (before, start) = (rss(), std::time::Instant::now());
        // Mapped with a domain: pinned (and taken) now, all of it.
        ctx.map_process(ioas, child.pid, ProcessMemory::Forked, mem as u64, len, Some(1 << 40), Perm::RW).unwrap();
        let mut seen = [0u8; 16];
        let device = ctx.get(dev).unwrap();
        device.dma_read((1 << 40) + at as u64, &mut seen).unwrap();
        assert_eq!(&seen, b"the child's byte");
        device.dma_write((1 << 40) + at as u64, b"dev").unwrap();
        let (took, grew) = (start.elapsed(), rss().saturating_sub(before));
        assert!(took < std::time::Duration::from_secs(20), "{gib} GiB: {took:?}");
        assert!(grew < 8 << 20, "{gib} GiB: resident memory grew by {grew} bytes");
        // Pages the child never wrote read as zero.
        device.dma_read(1 << 40, &mut seen).unwrap();
        assert_eq!(seen, [0; 16]);
        ctx.unmap(ioas, 0, u64::MAX).unwrap();
        child.release();
        // SAFETY: our own mapping, no longer in any IOAS.
        unsafe { libc::munmap(mem.cast(), len as usize) };
        eprintln!("{gib} GiB: {took:?}, resident memory +{} KiB", grew >> 10);
    }
}

struct NoDriver;
impl AccessOps for NoDriver {
    fn unmap(&self, _: u64, _: u64) {}
}

#[test]
fn an_access_reaches_a_childs_unpinned_memory_in_the_child_then_its_pin_takes_it() {
    let ctx = Arc::new(Context::with_config(ContextConfig::isolated(Limit::Pages(1 << 20))));
    let len = 1u64 << 30;
    let mem = sparse(len as usize);
    let child = fork_writing_at(mem, 4096, b"child");
    let ioas = ctx.ioas_alloc().unwrap();
    // No domain: nothing is pinned, nor taken.
    ctx.map_process(ioas, child.pid, ProcessMemory::Forked, mem as u64, len, Some(1 << 40), Perm::RW).unwrap();
    let (_, access) = ctx.access_create(ioas, Arc::new(NoDriver), true).unwrap();
    let mut seen = [0u8; 5];
    access.read((1 << 40) + 4096, &mut seen).unwrap();
    assert_eq!(&seen, b"child");
    // Written in the child itself, so a later pin takes what was written.
    access.write((1 << 40) + 4096, b"acc").unwrap();
    access.pin_pages((1 << 40) + 4096, 4096, true).unwrap();
    child.release();
    access.read((1 << 40) + 4096, &mut seen).unwrap();
    assert_eq!(&seen, b"accld", "the pinned page outlives the child");
    // Pages not pinned went with the child.
    assert!(matches!(access.read(1 << 40, &mut seen), Err(Error::Fault(_))));
    access.unpin_pages((1 << 40) + 4096, 4096);
    ctx.unmap(ioas, 0, u64::MAX).unwrap();
    // SAFETY: our own mapping, no longer in any IOAS.
    unsafe { libc::munmap(mem.cast(), len as usize) };
}

/// A daemon's client: its private memory stays the client's even once
/// pinned (an access sees what the client holds at each use, not a copy),
/// a device's DMA into it faults rather than reaching anything else, and
/// once the client is gone every access fails.
#[test]
fn a_clients_private_memory_stays_in_the_client() {
    let ctx = Arc::new(Context::with_config(ContextConfig::isolated(Limit::Pages(1 << 20))));
    let buf = HostBuffer::new(2 * PAGE as usize).unwrap();
    buf.write_at(0, &[b'P'; 2 * PAGE as usize]);
    let child = fork_writing(&buf);
    let ioas = ctx.ioas_alloc().unwrap();
    ctx.map_process(ioas, child.pid, ProcessMemory::Client, buf.addr(), 2 * PAGE, Some(0x10_0000), Perm::RW).unwrap();
    // Attaching pins: the client's memory is checked, not copied.
    let dev = ctx.bind_device(DeviceInfo::new("d", 1)).unwrap();
    ctx.attach(dev, ioas).unwrap();
    let (_, access) = ctx.access_create(ioas, Arc::new(NoDriver), true).unwrap();
    access.pin_pages(0x10_0000, PAGE, true).unwrap();
    let mut seen = [0u8; 4];
    access.read(0x10_0000, &mut seen).unwrap();
    assert_eq!(&seen, b"CCCC", "the client's memory, not ours");
    access.write(0x10_0000, b"acc").unwrap();
    let mut theirs = [0u8; 3];
    ioasid_engine::memory::read_process(child.pid, buf.addr(), &mut theirs).unwrap();
    assert_eq!(&theirs, b"acc", "written in the client itself, pinned or not");
    assert!(ctx.get(dev).unwrap().dma_read(0x10_0000, &mut seen).is_err(), "DMA into private memory faults");
    child.release();
    assert!(matches!(access.read(0x10_0000, &mut seen), Err(Error::Fault(_))));
    let mut ours = [0u8; 2];
    buf.read_at(0, &mut ours);
    assert_eq!(&ours, b"PP", "our own copy was never touched");
    access.unpin_pages(0x10_0000, PAGE);
    ctx.unmap(ioas, 0, u64::MAX).unwrap();
}

/// A daemon's client's shared memory is mapped here from the object it
/// maps: devices reach it directly, and the client sees their writes.
#[test]
fn a_clients_shared_memory_is_mapped_here_and_reached_by_dma() {
    let ctx = Arc::new(Context::with_config(ContextConfig::isolated(Limit::Pages(1 << 20))));
    let len = 2 * PAGE as usize;
    let memfd = memfd::MemfdOptions::default().create("client").unwrap();
    memfd.as_file().set_len(len as u64).unwrap();
    // SAFETY: a fresh shared mapping of our memfd, unmapped at the end.
    let shared = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            std::os::fd::AsRawFd::as_raw_fd(memfd.as_file()),
            0,
        )
    };
    assert_ne!(shared, libc::MAP_FAILED);
    let child = fork_writing_at(shared.cast(), 0, b"client");
    let ioas = ctx.ioas_alloc().unwrap();
    let dev = ctx.bind_device(DeviceInfo::new("d", 1)).unwrap();
    ctx.attach(dev, ioas).unwrap();
    ctx.map_process(ioas, child.pid, ProcessMemory::Client, shared as u64, len as u64, Some(0x10_0000), Perm::RW)
        .unwrap();
    let mut seen = [0u8; 6];
    ctx.get(dev).unwrap().dma_read(0x10_0000, &mut seen).unwrap();
    assert_eq!(&seen, b"client");
    ctx.get(dev).unwrap().dma_write(0x10_0100, b"device").unwrap();
    let mut theirs = [0u8; 6];
    ioasid_engine::memory::read_process(child.pid, shared as u64 + 0x100, &mut theirs).unwrap();
    assert_eq!(&theirs, b"device");
    child.release();
    // The pages are the object's, still mapped here after the client went.
    ctx.get(dev).unwrap().dma_read(0x10_0100, &mut seen).unwrap();
    assert_eq!(&seen, b"device");
    ctx.unmap(ioas, 0, u64::MAX).unwrap();
    // SAFETY: our mapping, no longer used by the context.
    unsafe { libc::munmap(shared, len) };
}
