//! The IOAS side of Linux 7.3: `IOMMU_IOAS_CHANGE_PROCESS` with its
//! accounting moves, the mock's pages compared by page (a program's own
//! mapping of a file the engine maps elsewhere), and the mock's dma-buf.

use std::os::fd::AsRawFd;
use std::sync::Arc;

use ioasid_abi::change_process::*;
use ioasid_abi::selftest::*;
use ioasid_abi::uapi::*;
use ioasid_abi::{Errno, InProcess, UserMemory, ioctl};
use ioasid_engine::account::process_pages;
use ioasid_engine::{Context, ContextConfig, Limit, PAGE_SIZE};
use zerocopy::{FromBytes, IntoBytes};

mod common;
use common::{call, map_file_cmd};

const PAGE: u64 = PAGE_SIZE;

fn call_as<T: IntoBytes + FromBytes>(
    ctx: &Arc<Context>,
    mem: &dyn UserMemory,
    req: u32,
    cmd: &mut T,
) -> Result<(), Errno> {
    ioctl(ctx, mem, req, cmd as *mut T as u64).map(drop)
}

fn test_cmd(ctx: &Arc<Context>, op: u32, id: u32, arm: &[u64]) -> Result<iommu_test_cmd, Errno> {
    let mut c = iommu_test_cmd { size: 72, op, id, ..Default::default() };
    c.union.as_mut_bytes()[..arm.len() * 8].copy_from_slice(arm.as_bytes());
    call(ctx, IOMMU_TEST_CMD, &mut c).map(|()| c)
}

fn ioas(ctx: &Arc<Context>) -> u32 {
    let mut a = iommu_ioas_alloc { size: 12, ..Default::default() };
    call(ctx, IOMMU_IOAS_ALLOC, &mut a).unwrap();
    a.out_ioas_id
}

/// A mock device on `ioas`: its HWPT's ID.
fn mock_domain(ctx: &Arc<Context>, ioas: u32) -> u32 {
    let c = test_cmd(ctx, IOMMU_TEST_OP_MOCK_DOMAIN, ioas, &[]).unwrap();
    <[u32; 3]>::read_from_prefix(c.union.as_bytes()).unwrap().0[1]
}

fn memfd(len: u64) -> std::fs::File {
    let f = memfd::MemfdOptions::new().create("t").unwrap().into_file();
    f.set_len(len).unwrap();
    f
}

fn map_file(ctx: &Arc<Context>, ioas_id: u32, fd: i32, start: u64, length: u64) -> Result<u64, Errno> {
    let mut c = map_file_cmd(ioas_id, fd, start, length);
    call(ctx, IOMMU_IOAS_MAP_FILE, &mut c).map(|()| c.iova)
}

fn unmap(ctx: &Arc<Context>, ioas_id: u32, iova: u64, length: u64) {
    let mut c = iommu_ioas_unmap { size: 24, ioas_id, iova, length };
    call(ctx, IOMMU_IOAS_UNMAP, &mut c).unwrap();
}

// ---- IOMMU_IOAS_CHANGE_PROCESS -----------------------------------------------

/// This process's memory, as a forked child `pid` calling through the
/// iommufd it shares would be seen: only its process differs.
struct AsProcess(i32);

impl UserMemory for AsProcess {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), Errno> {
        InProcess.read(addr, buf)
    }
    fn write(&self, addr: u64, data: &[u8]) -> Result<(), Errno> {
        InProcess.write(addr, data)
    }
    fn pid(&self) -> Option<i32> {
        Some(self.0)
    }
}

fn change_process(ctx: &Arc<Context>, mem: &dyn UserMemory) -> Result<(), Errno> {
    call_as(ctx, mem, IOMMU_IOAS_CHANGE_PROCESS, &mut iommu_ioas_change_process { size: 8, __reserved: 0 })
}

/// A process that lives until killed, with `RLIMIT_MEMLOCK` of `memlock`
/// bytes (within the hard limit: raising that needs `CAP_SYS_RESOURCE`).
fn other_process(memlock: u64) -> std::process::Child {
    use std::os::unix::process::CommandExt;
    let mut cmd = std::process::Command::new("sleep");
    cmd.arg("60");
    // SAFETY: setrlimit is async-signal-safe, as a pre_exec hook must be.
    unsafe {
        cmd.pre_exec(move || {
            let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
            libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim);
            lim.rlim_cur = memlock.min(lim.rlim_max);
            if libc::setrlimit(libc::RLIMIT_MEMLOCK, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    };
    cmd.spawn().unwrap()
}

/// A context charging this process (the caller holds `CAP_SYS_RESOURCE`
/// here, so it may pick the mode) with a mock domain that pins what is
/// mapped, and 4 pages of a memfd mapped.
fn pinned_file_mapping(process_mode: bool) -> (Arc<Context>, u32, std::fs::File) {
    let config = ContextConfig {
        memlock_limit: Limit::Rlimit,
        memlock_exempt: false,
        sys_resource: true,
        private_counter: false,
        live_capabilities: false,
        owner: None,
        pasid_parent: None,
        max_objects: None,
        max_queue_depth: None,
    };
    let ctx = Arc::new(Context::with_config(config));
    let mut opt = iommu_option {
        size: 24,
        option_id: IOMMU_OPTION_RLIMIT_MODE,
        op: IOMMU_OPTION_OP_SET,
        val64: process_mode.into(),
        ..Default::default()
    };
    call(&ctx, IOMMU_OPTION, &mut opt).unwrap();
    let id = ioas(&ctx);
    mock_domain(&ctx, id);
    let f = memfd(4 * PAGE);
    map_file(&ctx, id, f.as_raw_fd(), 0, 4 * PAGE).unwrap();
    (ctx, id, f)
}

/// One test for everything that charges this process's own counters, so
/// no other test of this file moves them meanwhile.
#[test]
fn change_process_moves_the_charges_of_file_mappings() {
    let own = || process_pages(None);
    for process_mode in [true, false] {
        let before = own();
        let (ctx, id, f) = pinned_file_mapping(process_mode);
        let locked = if process_mode { 4 } else { 0 };
        assert_eq!(own(), (before.0 + locked, before.1 + 4));
        let user_charged = ctx.locked_pages();

        // In the same process nothing moves.
        change_process(&ctx, &InProcess).unwrap();
        assert_eq!(own(), (before.0 + locked, before.1 + 4));

        // To another process: all of it, locked (process mode) and pinned.
        let mut child = other_process(libc::RLIM_INFINITY);
        let pid = child.id() as i32;
        change_process(&ctx, &AsProcess(pid)).unwrap();
        assert_eq!(process_pages(Some(pid)), (locked, 4));
        assert_eq!(own(), before);
        // The user's counter is the same user's in user mode.
        assert_eq!(ctx.locked_pages(), user_charged - locked);

        // And back, which unmapping then uncharges here.
        change_process(&ctx, &InProcess).unwrap();
        assert_eq!(process_pages(Some(pid)), (0, 0));
        assert_eq!(own(), (before.0 + locked, before.1 + 4));

        // A process whose RLIMIT_MEMLOCK cannot take them: nothing moves.
        let mut small = other_process(PAGE);
        let spid = small.id() as i32;
        assert_eq!(change_process(&ctx, &AsProcess(spid)), Err(Errno::ENOMEM));
        assert_eq!(process_pages(Some(spid)), (0, 0));
        assert_eq!(own(), (before.0 + locked, before.1 + 4));
        small.kill().unwrap();
        small.wait().unwrap();

        // Memory that is not a file's cannot move: EINVAL, and nothing moved.
        let buf = ioasid_engine::HostBuffer::new(PAGE as usize).unwrap();
        let mut m = iommu_ioas_map {
            size: 40,
            flags: IOMMU_IOAS_MAP_READABLE | IOMMU_IOAS_MAP_WRITEABLE,
            ioas_id: id,
            user_va: buf.addr(),
            length: PAGE,
            ..Default::default()
        };
        call(&ctx, IOMMU_IOAS_MAP, &mut m).unwrap();
        assert_eq!(change_process(&ctx, &AsProcess(pid)), Err(Errno::EINVAL));
        assert_eq!(process_pages(Some(pid)), (0, 0));
        unmap(&ctx, id, m.iova, PAGE);

        unmap(&ctx, id, 0, u64::MAX);
        assert_eq!(own(), before);
        drop((ctx, f));
        child.kill().unwrap();
        child.wait().unwrap();
    }
}

#[test]
fn change_process_reserved_is_eopnotsupp_and_the_length_rules_hold() {
    let ctx = Arc::new(Context::with_config(ContextConfig::isolated(Limit::Pages(1 << 20))));
    let mut c = iommu_ioas_change_process { size: 8, __reserved: 1 };
    assert_eq!(call(&ctx, IOMMU_IOAS_CHANGE_PROCESS, &mut c), Err(Errno::EOPNOTSUPP));
    c = iommu_ioas_change_process { size: 7, __reserved: 0 };
    assert_eq!(call(&ctx, IOMMU_IOAS_CHANGE_PROCESS, &mut c), Err(Errno::EINVAL));
    // Without mappings, or with a private counter, there is nothing to move.
    assert_eq!(change_process(&ctx, &InProcess), Ok(()));
    let id = ioas(&ctx);
    mock_domain(&ctx, id);
    let f = memfd(PAGE);
    map_file(&ctx, id, f.as_raw_fd(), 0, PAGE).unwrap();
    assert_eq!(change_process(&ctx, &AsProcess(1)), Ok(()));
    assert_eq!(ctx.locked_pages(), 1);
}

// ---- pages compared by page ---------------------------------------------------

fn check_map(ctx: &Arc<Context>, hwpt: u32, iova: u64, length: u64, uptr: u64) -> Result<(), Errno> {
    test_cmd(ctx, IOMMU_TEST_OP_MD_CHECK_MAP, hwpt, &[iova, length, uptr]).map(drop)
}

/// The program's own shared mapping of a memfd.
fn mmap_shared(f: &std::fs::File, len: u64) -> u64 {
    // SAFETY: a fresh shared mapping of the file, unmapped by the caller.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED);
    p as u64
}

#[test]
fn check_map_matches_a_files_pages_through_the_programs_own_mapping() {
    let ctx = Arc::new(Context::with_config(ContextConfig::isolated(Limit::Pages(1 << 20))));
    let id = ioas(&ctx);
    let hwpt = mock_domain(&ctx, id);
    let f = memfd(4 * PAGE);
    let mine = mmap_shared(&f, 4 * PAGE);
    let iova = map_file(&ctx, id, f.as_raw_fd(), PAGE, 2 * PAGE).unwrap();
    check_map(&ctx, hwpt, iova, 2 * PAGE, mine + PAGE).unwrap();
    // The domain pins those pages once: the program's mapping sees it.
    let refs = |uptr: u64, len: u64, refs: u64| test_cmd(&ctx, IOMMU_TEST_OP_MD_CHECK_REFS, 0, &[len, uptr, refs]);
    refs(mine + PAGE, 2 * PAGE, 1).unwrap();
    refs(mine, PAGE, 0).unwrap();
    refs(mine + 3 * PAGE, PAGE, 0).unwrap();
    assert_eq!(refs(mine, 2 * PAGE, 1).map(drop), Err(Errno::EIO));
    assert_eq!(check_map(&ctx, hwpt, iova, 2 * PAGE, mine), Err(Errno::EINVAL), "other pages of the file");
    let other = memfd(4 * PAGE);
    let theirs = mmap_shared(&other, 4 * PAGE);
    assert_eq!(check_map(&ctx, hwpt, iova, PAGE, theirs + PAGE), Err(Errno::EINVAL), "another file");

    // An access's pinned pages are the caller's pages the same way.
    let c =
        test_cmd(&ctx, IOMMU_TEST_OP_CREATE_ACCESS, id, &[u64::from(MOCK_FLAGS_ACCESS_CREATE_NEEDS_PIN_PAGES) << 32])
            .unwrap();
    let access_fd = u32::read_from_prefix(c.union.as_bytes()).unwrap().0;
    let pages = |uptr: u64| {
        let arm = [0u64, iova, 2 * PAGE, uptr];
        test_cmd(&ctx, IOMMU_TEST_OP_ACCESS_PAGES, access_fd, &arm).map(drop)
    };
    pages(mine + PAGE).unwrap();
    assert_eq!(pages(theirs + PAGE), Err(Errno::EBADE));
    // SAFETY: the test's own mappings, used no more.
    unsafe {
        libc::munmap(mine as *mut _, 4 * PAGE as usize);
        libc::munmap(theirs as *mut _, 4 * PAGE as usize);
    }
    ioasid_abi::files::remove(access_fd as i32);
}

// ---- the mock's dma-buf ---------------------------------------------------------

fn get_dmabuf(ctx: &Arc<Context>, length: u32) -> Result<i32, Errno> {
    let mut c = iommu_test_cmd { size: 72, op: ioasid_abi::dmabuf::IOMMU_TEST_OP_DMABUF_GET, ..Default::default() };
    c.union[0] = u64::from(length) | (libc::O_CLOEXEC as u64) << 32;
    ioctl(ctx, &InProcess, IOMMU_TEST_CMD, &mut c as *mut _ as u64)
}

fn revoke_dmabuf(ctx: &Arc<Context>, fd: i32, revoked: bool) -> Result<(), Errno> {
    let mut c = iommu_test_cmd { size: 72, op: ioasid_abi::dmabuf::IOMMU_TEST_OP_DMABUF_REVOKE, ..Default::default() };
    c.union[0] = fd as u32 as u64 | u64::from(revoked) << 32;
    call(ctx, IOMMU_TEST_CMD, &mut c)
}

#[test]
fn dmabuf_maps_by_its_size_and_revoked_stays_out_of_reach() {
    let ctx = Arc::new(Context::with_config(ContextConfig::isolated(Limit::Pages(1 << 20))));
    let id = ioas(&ctx);
    let c = test_cmd(&ctx, IOMMU_TEST_OP_MOCK_DOMAIN, id, &[]).unwrap();
    let [_, _, idev] = <[u32; 3]>::read_from_prefix(c.union.as_bytes()).unwrap().0;
    assert_eq!(get_dmabuf(&ctx, 0), Err(Errno::EINVAL));
    assert_eq!(get_dmabuf(&ctx, 513 * PAGE as u32), Err(Errno::EINVAL));
    let fd = get_dmabuf(&ctx, 3 * PAGE as u32 + 1).unwrap();
    assert!(fd >= 0);
    let size = 4 * PAGE;
    assert_eq!(map_file(&ctx, id, fd, 0, 0), Err(Errno::EINVAL));
    assert_eq!(map_file(&ctx, id, fd, size, size), Err(Errno::EINVAL));
    assert_eq!(map_file(&ctx, id, fd, 0, size + 1), Err(Errno::EINVAL));
    let iova = map_file(&ctx, id, fd, 0, size).unwrap();
    assert_eq!(ctx.locked_pages(), 0, "a dma-buf is not charged");
    let dev = ctx.get(ioasid_engine::DeviceId::new(idev)).unwrap();
    dev.dma_write(iova + PAGE, b"dma").unwrap();

    revoke_dmabuf(&ctx, fd, true).unwrap();
    let mut got = [0u8; 3];
    assert!(dev.dma_read(iova + PAGE, &mut got).is_err(), "DMA to a revoked dma-buf fails");
    assert_eq!(map_file(&ctx, id, fd, 0, size), Err(Errno::ENODEV));
    // Another domain still attaches over the revoked mapping.
    test_cmd(&ctx, IOMMU_TEST_OP_MOCK_DOMAIN, id, &[]).unwrap();

    revoke_dmabuf(&ctx, fd, false).unwrap();
    let iova2 = map_file(&ctx, id, fd, 0, size).unwrap();
    dev.dma_read(iova2 + PAGE, &mut got).unwrap();
    assert_eq!(&got, b"dma", "the same memory, mapped anew");
    assert!(dev.dma_read(iova + PAGE, &mut got).is_err(), "what was revoked stays revoked");
    unmap(&ctx, id, iova, size);

    // Files that are no dma-buf are refused; other files map as files.
    let f = memfd(PAGE);
    assert_eq!(revoke_dmabuf(&ctx, f.as_raw_fd(), true), Err(Errno::EINVAL));
    assert_eq!(revoke_dmabuf(&ctx, -1, true), Err(Errno::EBADF));
    map_file(&ctx, id, f.as_raw_fd(), 0, PAGE).unwrap();
    // SAFETY: the dma-buf's fd, which this test owns.
    unsafe { libc::close(fd) };
}
