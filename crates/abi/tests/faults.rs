//! Fault queues and nested HWPTs of the selftest type, through the ABI.

use std::sync::Arc;

use ioasid_abi::fault::FaultFile;
use ioasid_abi::files::{self, File};
use ioasid_abi::selftest::*;
use ioasid_abi::uapi::*;
use ioasid_abi::{Errno, InProcess};
use ioasid_engine::device::MockFlags;
use ioasid_engine::{Context, DeviceId, DeviceInfo, FaultId, HwptPagingId, PtId};
use zerocopy::IntoBytes;

mod common;
use common::{call, ctx};

fn fault_alloc(ctx: &Arc<Context>) -> (u32, Arc<FaultFile>) {
    let (id, _, file) = fault_queue(ctx);
    (id, file)
}

/// A fault queue: its ID, its fd and the fd's file.
fn fault_queue(ctx: &Arc<Context>) -> (u32, i32, Arc<FaultFile>) {
    let mut c = iommu_fault_alloc { size: 16, ..Default::default() };
    call(ctx, IOMMU_FAULT_QUEUE_ALLOC, &mut c).unwrap();
    let fd = c.out_fault_fd as i32;
    match files::get(fd) {
        Some(File::Fault(f)) => (c.out_fault_id, fd, f),
        _ => panic!("the fault fd is not registered"),
    }
}

/// A PRI device described by `info`, bound, and a paging HWPT of a new IOAS
/// whose faults go to a new queue (its fd and file). Nothing is attached.
fn pri_device_and_queue(info: DeviceInfo) -> (Arc<Context>, DeviceId, HwptPagingId, i32, Arc<FaultFile>) {
    let ctx = ctx();
    let ioas = ctx.ioas_alloc().unwrap();
    let dev = ctx.bind_device(info).unwrap();
    let (fault, fd, file) = fault_queue(&ctx);
    let hwpt = ctx.hwpt_alloc(dev, ioas, ioasid_engine::HwptFlags::default(), Some(FaultId::new(fault))).unwrap();
    (ctx, dev, hwpt, fd, file)
}

/// A mock device on an IOAS, a nest-parent HWPT, and a fault queue.
fn setup() -> (Arc<Context>, u32, u32, u32, Arc<FaultFile>) {
    let ctx = ctx();
    let ioas = ctx.ioas_alloc().unwrap();
    let (stdev, _, dev) = ctx.mock_domain(ioas, DeviceInfo::mock(1, MockFlags::default())).unwrap();
    let mut c = iommu_hwpt_alloc {
        size: 48,
        flags: IOMMU_HWPT_ALLOC_NEST_PARENT,
        dev_id: dev.get(),
        pt_id: ioas.get(),
        ..Default::default()
    };
    call(&ctx, IOMMU_HWPT_ALLOC, &mut c).unwrap();
    let (fault_id, fault) = fault_alloc(&ctx);
    let _ = stdev;
    (ctx, dev.get(), c.out_hwpt_id, fault_id, fault)
}

/// `setup`, with the device on a nested HWPT whose faults go to the queue.
fn attached_to_queue() -> (Arc<Context>, u32, u32, Arc<FaultFile>) {
    let (ctx, dev, parent, fault_id, fault) = setup();
    let mut data = IOMMU_TEST_IOTLB_DEFAULT.to_ne_bytes();
    let iopf = alloc_nested(&ctx, dev, parent, Some(fault_id), &mut data).unwrap();
    ctx.replace(DeviceId::new(dev), PtId::new(iopf)).unwrap();
    (ctx, dev, fault_id, fault)
}

fn alloc_nested(ctx: &Arc<Context>, dev: u32, parent: u32, fault: Option<u32>, data: &mut [u8]) -> Result<u32, Errno> {
    let mut c = iommu_hwpt_alloc {
        size: 48,
        flags: if fault.is_some() { IOMMU_HWPT_FAULT_ID_VALID } else { 0 },
        dev_id: dev,
        pt_id: parent,
        data_type: IOMMU_HWPT_DATA_SELFTEST,
        data_len: data.len() as u32,
        data_uptr: data.as_mut_ptr() as u64,
        fault_id: fault.unwrap_or(0),
        ..Default::default()
    };
    call(ctx, IOMMU_HWPT_ALLOC, &mut c).map(|()| c.out_hwpt_id)
}

#[test]
fn fault_alloc_with_flags_is_eopnotsupp() {
    let mut c = iommu_fault_alloc { size: 16, flags: 1, ..Default::default() };
    assert_eq!(call(&ctx(), IOMMU_FAULT_QUEUE_ALLOC, &mut c), Err(Errno::EOPNOTSUPP));
}

#[test]
fn nested_alloc_checks_its_data_as_linux_does() {
    let (ctx, dev, parent, _, _) = setup();
    let mut data = IOMMU_TEST_IOTLB_DEFAULT.to_ne_bytes();
    assert_eq!(alloc_nested(&ctx, dev, parent, None, &mut data[..3]), Err(Errno::EINVAL), "shorter than the struct");
    let mut long = [0u8; 9];
    assert_eq!(alloc_nested(&ctx, dev, parent, None, &mut long), Err(Errno::EINVAL), "longer than the struct");
    assert_eq!(alloc_nested(&ctx, dev, parent, Some(999), &mut data), Err(Errno::ENOENT), "no such fault queue");
    let nested = alloc_nested(&ctx, dev, parent, None, &mut data).unwrap();
    assert_eq!(alloc_nested(&ctx, dev, nested, None, &mut data), Err(Errno::EINVAL), "nested over nested");
    let mut destroy = iommu_destroy { size: 8, id: parent };
    assert_eq!(call(&ctx, IOMMU_DESTROY, &mut destroy), Err(Errno::EBUSY), "the parent is in use");
}

#[test]
fn selftest_invalidation_reports_what_it_handled() {
    let (ctx, dev, parent, _, _) = setup();
    let mut data = IOMMU_TEST_IOTLB_DEFAULT.to_ne_bytes();
    let nested = alloc_nested(&ctx, dev, parent, None, &mut data).unwrap();
    let mut reqs = [
        iommu_hwpt_invalidate_selftest { flags: 0, iotlb_id: 2 },
        iommu_hwpt_invalidate_selftest { flags: 0, iotlb_id: 9 },
    ];
    let mut c = iommu_hwpt_invalidate {
        size: 32,
        hwpt_id: nested,
        data_uptr: reqs.as_mut_ptr() as u64,
        data_type: IOMMU_HWPT_INVALIDATE_DATA_SELFTEST,
        entry_len: 8,
        entry_num: 2,
        __reserved: 0,
    };
    assert_eq!(call(&ctx, IOMMU_HWPT_INVALIDATE, &mut c), Err(Errno::EINVAL));
    assert_eq!(c.entry_num, 1, "the first entry was handled");
    let check = |index: u32, value: u32| {
        let mut t = iommu_test_cmd { size: 72, op: IOMMU_TEST_OP_MD_CHECK_IOTLB, id: nested, ..Default::default() };
        t.union.as_mut_bytes()[..8].copy_from_slice([index, value].as_bytes());
        call(&ctx, IOMMU_TEST_CMD, &mut t)
    };
    assert_eq!(check(2, 0), Ok(()));
    assert_eq!(check(1, IOMMU_TEST_IOTLB_DEFAULT), Ok(()));
    assert_eq!(check(4, 0), Err(Errno::EINVAL));
}

#[test]
fn page_requests_reach_the_fault_fd_and_are_answered_once() {
    let (ctx, dev, fault_id, fault) = attached_to_queue();
    let mut buf = [iommu_hwpt_pgfault::default(); 2];
    let addr = buf.as_mut_ptr() as u64;
    assert_eq!(fault.read(&InProcess, addr, 80, 0), Ok(0), "nothing pending");
    let mut t = iommu_test_cmd { size: 72, op: IOMMU_TEST_OP_TRIGGER_IOPF, ..Default::default() };
    t.union.as_mut_bytes()[..24].copy_from_slice([dev, 1, 2, 3, 0, 0].as_bytes());
    t.union[2] = 0xdead_b000;
    call(&ctx, IOMMU_TEST_CMD, &mut t).unwrap();
    assert_eq!(fault.read(&InProcess, addr, 41, 0), Err(Errno::ESPIPE), "not whole records");
    assert_eq!(fault.read(&InProcess, addr, 40, 8), Err(Errno::ESPIPE), "positioned");
    assert_eq!(fault.read(&InProcess, addr, 80, 0), Ok(40));
    let r = buf[0];
    assert_eq!((r.dev_id, r.pasid, r.grpid, r.perm, r.addr), (dev, 1, 2, 3, 0xdead_b000));
    assert_eq!(r.flags, IOMMU_PGFAULT_FLAGS_PASID_VALID | IOMMU_PGFAULT_FLAGS_LAST_PAGE);
    let bad_code = iommu_hwpt_page_response { cookie: r.cookie, code: 7 };
    assert_eq!(fault.write(&InProcess, bad_code.as_bytes().as_ptr() as u64, 8, 0), Err(Errno::EINVAL));
    let ok = iommu_hwpt_page_response { cookie: r.cookie, code: IOMMUFD_PAGE_RESP_SUCCESS };
    assert_eq!(fault.write(&InProcess, ok.as_bytes().as_ptr() as u64, 8, 0), Ok(8));
    assert_eq!(fault.write(&InProcess, ok.as_bytes().as_ptr() as u64, 8, 0), Err(Errno::EINVAL), "answered already");
    // The queue is busy while its HWPT or its fd holds it.
    let mut destroy = iommu_destroy { size: 8, id: fault_id };
    assert_eq!(call(&ctx, IOMMU_DESTROY, &mut destroy), Err(Errno::EBUSY));
}

fn readable(fd: i32) -> bool {
    let mut p = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    // SAFETY: one pollfd for a descriptor this test owns; no waiting.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n == 1 && p.revents & libc::POLLIN != 0
}

#[test]
fn the_fault_fd_polls_readable_while_requests_wait_and_close_answers_them() {
    let (ctx, dev, hwpt, fd, file) = pri_device_and_queue(DeviceInfo { pri: true, ..DeviceInfo::new("pri", 1) });
    ctx.attach(dev, hwpt).unwrap();
    assert!(!readable(fd));

    let device = ctx.get(dev).unwrap();
    let dma = std::thread::spawn(move || device.dma_write(0x10000, b"x"));
    while !readable(fd) {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    let mut rec = [iommu_hwpt_pgfault::default(); 1];
    assert_eq!(file.read(&InProcess, rec.as_mut_ptr() as u64, 40, 0), Ok(40));
    assert_eq!((rec[0].dev_id, rec[0].addr, rec[0].perm), (dev.get(), 0x10000, IOMMU_PGFAULT_PERM_WRITE));
    assert!(!readable(fd), "read drains readiness");

    // The owner closes the fd without answering: the DMA is refused, not stuck.
    drop(file);
    files::remove(fd);
    // SAFETY: the fault fd this test was handed.
    unsafe { libc::close(fd) };
    assert!(dma.join().unwrap().is_err());
}

/// A page whose last `n` bytes are followed by unmapped memory: a copy that
/// runs past them faults.
fn at_end_of_mapping(n: usize) -> (u64, impl Drop) {
    struct Unmap(*mut libc::c_void);
    impl Drop for Unmap {
        fn drop(&mut self) {
            // SAFETY: the page mapped below, no longer used.
            unsafe { libc::munmap(self.0, 4096) };
        }
    }
    // SAFETY: fresh anonymous mappings; the second page is unmapped at once
    // so nothing can be mapped behind the first by us.
    let p = unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            8192,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        assert_ne!(p, libc::MAP_FAILED);
        libc::munmap(p.cast::<u8>().add(4096).cast(), 4096);
        p
    };
    (p as u64 + 4096 - n as u64, Unmap(p))
}

#[test]
fn huge_counts_on_the_fault_fd_are_bounded_by_the_records() {
    let (ctx, dev, _, fault) = attached_to_queue();
    const RECORD: usize = size_of::<iommu_hwpt_pgfault>();
    // Whole records, as Linux requires: near 2^46 bytes, and near SIZE_MAX.
    let huge = [(1usize << 46) / RECORD * RECORD, usize::MAX / RECORD * RECORD];
    let (end, _map) = at_end_of_mapping(RECORD);
    for count in huge {
        assert_eq!(fault.read(&InProcess, end, count, 0), Ok(0), "nothing pending");
    }
    let mut t = iommu_test_cmd { size: 72, op: IOMMU_TEST_OP_TRIGGER_IOPF, ..Default::default() };
    t.union.as_mut_bytes()[..24].copy_from_slice([dev, 1, 2, 3, 0, 0].as_bytes());
    call(&ctx, IOMMU_TEST_CMD, &mut t).unwrap();
    // The one record waiting fills the last bytes of the mapping and no more.
    assert_eq!(fault.read(&InProcess, end, huge[1], 0), Ok(RECORD));
    // SAFETY: the record just written there.
    let cookie = unsafe { (*(end as *const iommu_hwpt_pgfault)).cookie };

    const RESPONSE: usize = size_of::<iommu_hwpt_page_response>();
    let huge = [(1usize << 46) / RESPONSE * RESPONSE, usize::MAX / RESPONSE * RESPONSE];
    let (end, _map) = at_end_of_mapping(RESPONSE);
    for count in huge {
        assert_eq!(fault.write(&InProcess, end + RESPONSE as u64, count, 0), Err(Errno::EFAULT), "nothing readable");
    }
    let ok = iommu_hwpt_page_response { cookie, code: IOMMUFD_PAGE_RESP_SUCCESS };
    // SAFETY: the last bytes of our own mapping.
    unsafe { std::ptr::write(end as *mut iommu_hwpt_page_response, ok) };
    // Responses are taken one at a time: the first, then the end of memory.
    assert_eq!(fault.write(&InProcess, end, huge[0], 0), Ok(RESPONSE));
    assert_eq!(fault.write(&InProcess, end, huge[1], 0), Err(Errno::EINVAL), "answered already");
}

/// A page request of an execute or privileged DMA (PASID-tagged, the
/// device's PASID capability enabling both) reaches the fault fd's record
/// with `IOMMU_PGFAULT_PERM_EXEC` and `_PRIV`.
#[test]
fn fault_records_carry_exec_and_priv() {
    use ioasid_abi::uapi::{
        IOMMU_PGFAULT_FLAGS_PASID_VALID, IOMMU_PGFAULT_PERM_EXEC, IOMMU_PGFAULT_PERM_PRIV, IOMMU_PGFAULT_PERM_READ,
    };
    use ioasid_engine::fault::DmaAttrs;
    let info =
        DeviceInfo { pri: true, max_pasid_log2: 8, pasid_exec: true, pasid_priv: true, ..DeviceInfo::new("pri", 1) };
    let (ctx, dev, hwpt, fd, file) = pri_device_and_queue(info);
    ctx.attach_pasid(dev, 5, hwpt).unwrap();
    let device = ctx.get(dev).unwrap();
    let attrs = DmaAttrs { exec: true, privileged: true };
    let dma = std::thread::spawn(move || device.dma_read_pasid_with(5, 0x10000, &mut [0], attrs));
    while !readable(fd) {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    let mut rec = [iommu_hwpt_pgfault::default(); 1];
    assert_eq!(file.read(&InProcess, rec.as_mut_ptr() as u64, 40, 0), Ok(40));
    assert_eq!(
        (rec[0].flags & IOMMU_PGFAULT_FLAGS_PASID_VALID, rec[0].pasid, rec[0].perm),
        (
            IOMMU_PGFAULT_FLAGS_PASID_VALID,
            5,
            IOMMU_PGFAULT_PERM_READ | IOMMU_PGFAULT_PERM_EXEC | IOMMU_PGFAULT_PERM_PRIV
        )
    );
    drop(file);
    files::remove(fd);
    // SAFETY: the fault fd this test was handed.
    unsafe { libc::close(fd) };
    assert!(dma.join().unwrap().is_err());
}

/// A read whose copy out faults puts every group it took back, in order;
/// a long write answers across the batches it reads and stops at its first
/// bad response, reporting what it took before it.
#[test]
fn a_failed_read_puts_its_groups_back_and_a_long_write_stops_at_its_first_bad_response() {
    const RECORD: usize = size_of::<iommu_hwpt_pgfault>();
    const RESPONSE: usize = size_of::<iommu_hwpt_page_response>();
    const N: usize = 150;
    let (ctx, dev, _, fault) = attached_to_queue();
    for grpid in 0..N as u32 {
        let mut t = iommu_test_cmd { size: 72, op: IOMMU_TEST_OP_TRIGGER_IOPF, ..Default::default() };
        t.union.as_mut_bytes()[..24].copy_from_slice([dev, 1, grpid, 3, 0, 0].as_bytes());
        call(&ctx, IOMMU_TEST_CMD, &mut t).unwrap();
    }
    let (end, _map) = at_end_of_mapping(RECORD);
    assert_eq!(fault.read(&InProcess, end, 2 * RECORD, 0), Err(Errno::EFAULT));
    let mut recs = vec![iommu_hwpt_pgfault::default(); N];
    assert_eq!(fault.read(&InProcess, recs.as_mut_ptr() as u64, N * RECORD, 0), Ok(N * RECORD));
    let seen: Vec<(u32, u32)> = recs.iter().map(|r| (r.grpid, r.cookie)).collect();
    let want: Vec<(u32, u32)> = (0..N as u32).map(|g| (g, g + 1)).collect();
    assert_eq!(seen, want, "every group back, in order, with the lowest cookies");

    let bad = 100;
    let mut responses: Vec<iommu_hwpt_page_response> =
        recs.iter().map(|r| iommu_hwpt_page_response { cookie: r.cookie, code: IOMMUFD_PAGE_RESP_SUCCESS }).collect();
    responses[bad].code = 7;
    let base = responses.as_ptr() as u64;
    let at = |i: usize| base + (i * RESPONSE) as u64;
    assert_eq!(fault.write(&InProcess, at(0), N * RESPONSE, 0), Ok(bad * RESPONSE));
    assert_eq!(fault.write(&InProcess, at(bad), (N - bad) * RESPONSE, 0), Err(Errno::EINVAL));
    assert_eq!(fault.write(&InProcess, at(bad + 1), (N - bad - 1) * RESPONSE, 0), Ok((N - bad - 1) * RESPONSE));
    assert_eq!(fault.write(&InProcess, at(0), RESPONSE, 0), Err(Errno::EINVAL), "answered already");
    responses[bad].code = IOMMUFD_PAGE_RESP_INVALID;
    assert_eq!(fault.write(&InProcess, at(bad), RESPONSE, 0), Ok(RESPONSE));
}
