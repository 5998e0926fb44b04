//! A process that forks while another of its threads is inside a DMA's
//! critical section: the child, which has only the forking thread, still
//! maps and unmaps (its grace periods wait for no thread it does not have).

use std::sync::mpsc;
use std::time::Duration;

use ioasid_engine::{Context, ContextConfig, DeviceInfo, HostBuffer, Limit, Perm, epoch};

const PAGE: u64 = 4096;

#[test]
fn a_child_forked_while_a_thread_is_inside_a_section_can_still_unmap() {
    let (inside_tx, inside_rx) = mpsc::channel();
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let reader = std::thread::spawn(move || {
        let _guard = epoch::pin();
        inside_tx.send(()).unwrap();
        // Inside until the parent is done with the child.
        let _ = done_rx.recv();
    });
    inside_rx.recv().unwrap();
    // SAFETY: the child runs only this code and leaves with `_exit`.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        // The child: a hang here is what the test is about; the parent
        // gives it a few seconds.
        let code = std::panic::catch_unwind(|| {
            let mem = HostBuffer::new(PAGE as usize).unwrap();
            let ctx = Context::with_config(ContextConfig::isolated(Limit::Pages(u64::MAX)));
            let ioas = ctx.ioas_alloc().unwrap();
            let dev = ctx.bind_device(DeviceInfo::new("child", 1)).unwrap();
            ctx.attach(dev, ioas).unwrap();
            // SAFETY: `mem` outlives the context.
            unsafe { ctx.map_user(ioas, mem.addr(), PAGE, Some(1 << 32), Perm::RW).unwrap() };
            ctx.unmap(ioas, 1 << 32, PAGE).unwrap();
        })
        .map_or(2, |()| 0);
        // SAFETY: leaving the child without running the parent's test harness.
        unsafe { libc::_exit(code) };
    }
    let mut status = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let waited = loop {
        // SAFETY: waiting for our own child, without blocking.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if r == pid || std::time::Instant::now() > deadline {
            break r == pid;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    if !waited {
        // SAFETY: our own child.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        // SAFETY: as above.
        unsafe { libc::waitpid(pid, &mut status, 0) };
    }
    done_tx.send(()).unwrap();
    reader.join().unwrap();
    assert!(waited, "the child hung in a grace period");
    assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0, "the child failed: {status:#x}");
}
