//! Memory of another process, as a forked child maps it through the fd it
//! shares with its parent: taken when Linux would pin it, EFAULT once the
//! process is gone.

use std::sync::Arc;

use ioasid_engine::{Context, ContextConfig, DeviceInfo, Error, HostBuffer, Limit, Perm};

const PAGE: u64 = 4096;

/// A child whose copy of `buf` holds `b'C'`, stopped until `release` runs.
struct Child {
    pid: i32,
    go: i32,
}

fn fork_writing(buf: &HostBuffer) -> Child {
    let (mut ready, mut go) = ([0; 2], [0; 2]);
    // SAFETY: plain pipe creation into arrays of two.
    unsafe { assert_eq!((libc::pipe(ready.as_mut_ptr()), libc::pipe(go.as_mut_ptr())), (0, 0)) };
    // SAFETY: the child only writes memory it owns, uses pipes and _exits,
    // all async-signal-safe, as a child of a threaded process must.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        // SAFETY: `buf` is mapped in the child too (a copy); the pipes are ours.
        unsafe {
            std::ptr::write_bytes(buf.addr() as *mut u8, b'C', buf.len());
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
    ctx.map_remote(live, child.pid, buf.addr(), 2 * PAGE, Some(0x10_0000), Perm::RW).unwrap();
    ctx.map_remote(gone, child.pid, buf.addr(), 2 * PAGE, Some(0x10_0000), Perm::RW).unwrap();
    // Attaching pins: the child's memory is taken now.
    let dev = ctx.bind_device(DeviceInfo::new("d", 1)).unwrap();
    ctx.attach(dev, live).unwrap();
    let mut seen = [0u8; 4];
    ctx.device(dev).unwrap().dma_read(0x10_1ffc, &mut seen).unwrap();
    assert_eq!(&seen, b"CCCC", "the child's memory, not ours");
    child.release();
    // With the child gone, pinning its memory fails as Linux's does.
    let late = ctx.bind_device(DeviceInfo::new("late", 2)).unwrap();
    assert!(matches!(ctx.attach(late, gone), Err(Error::Fault(_))));
    // What was taken stays usable.
    ctx.device(dev).unwrap().dma_write(0x10_0000, b"ok").unwrap();
    ctx.device(dev).unwrap().dma_read(0x10_0000, &mut seen).unwrap();
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
    ctx.map_remote(ioas, pid, shared as u64, len as u64, Some(0x10_0000), Perm::RW).unwrap();
    // SAFETY: our pipe and our child.
    unsafe {
        libc::write(go[1], b"g".as_ptr().cast(), 1);
        assert_eq!(libc::waitpid(pid, std::ptr::null_mut(), 0), pid);
    }
    // The same pages as ours: a device write is seen here, and ours there.
    ctx.device(dev).unwrap().dma_write(0x10_0010, b"dev").unwrap();
    // SAFETY: reading and writing our own live mapping.
    unsafe {
        assert_eq!(std::slice::from_raw_parts((shared as *const u8).add(0x10), 3), b"dev");
        (shared as *mut u8).add(0x20).write(b'h');
    }
    let mut seen = [0u8; 1];
    ctx.device(dev).unwrap().dma_read(0x10_0020, &mut seen).unwrap();
    assert_eq!(&seen, b"h");
    ctx.unmap(ioas, 0, u64::MAX).unwrap();
    // SAFETY: our mapping, no longer used by the context.
    unsafe { libc::munmap(shared, len) };
}
