//! One named test per errno case of each command, driven through the
//! dispatcher with real pointers, as a program's ioctl would be.

use std::os::fd::AsRawFd;
use std::sync::Arc;

use ioasid_abi::uapi::*;
use ioasid_abi::{Errno, InProcess, ioctl};
use ioasid_engine::{
    Context, ContextConfig, DeviceId, DeviceInfo, HostBuffer, HwptPagingId, IoasId, IommuModel, IovaRange, Limit,
};
use zerocopy::{FromBytes, IntoBytes};

mod common;
use common::{call, ctx, map_file_cmd};

const PAGE: u64 = 4096;

fn sz<T>() -> u32 {
    std::mem::size_of::<T>() as u32
}

fn ioas(ctx: &Arc<Context>) -> u32 {
    let mut c = iommu_ioas_alloc { size: sz::<iommu_ioas_alloc>(), ..Default::default() };
    call(ctx, IOMMU_IOAS_ALLOC, &mut c).unwrap();
    c.out_ioas_id
}

fn map_cmd(ioas_id: u32, buf: &HostBuffer, len: u64, iova: Option<u64>) -> iommu_ioas_map {
    iommu_ioas_map {
        size: sz::<iommu_ioas_map>(),
        flags: IOMMU_IOAS_MAP_READABLE
            | IOMMU_IOAS_MAP_WRITEABLE
            | if iova.is_some() { IOMMU_IOAS_MAP_FIXED_IOVA } else { 0 },
        ioas_id,
        user_va: buf.addr(),
        length: len,
        iova: iova.unwrap_or(0),
        ..Default::default()
    }
}

/// A context with an IOAS, a device attached to it and `pages` mapped at 1 MiB.
fn attached(pages: u64) -> (Arc<Context>, u32, DeviceId, HostBuffer) {
    let ctx = ctx();
    let ioas_id = ioas(&ctx);
    let mut info = DeviceInfo::new("dev", 8);
    info.reserved.push(IovaRange::new(0xfee0_0000, 0xfeef_ffff));
    let dev = ctx.bind_device(info).unwrap();
    ctx.attach(dev, IoasId::new(ioas_id)).unwrap();
    let buf = HostBuffer::new((pages * PAGE) as usize).unwrap();
    call(&ctx, IOMMU_IOAS_MAP, &mut map_cmd(ioas_id, &buf, pages * PAGE, Some(1 << 20))).unwrap();
    (ctx, ioas_id, dev, buf)
}

macro_rules! errno_test {
    ($name:ident, $errno:ident, $body:expr) => {
        #[test]
        fn $name() {
            let r: Result<(), Errno> = $body;
            assert_eq!(r, Err(Errno::$errno));
        }
    };
}

// ---- dispatch: the size rules --------------------------------------------

errno_test!(dispatch_number_below_the_range_is_enotty, ENOTTY, {
    let mut c = iommu_destroy { size: 8, id: 1 };
    call(&ctx(), io(0x7f), &mut c)
});
errno_test!(dispatch_number_above_the_range_is_enotty, ENOTTY, {
    let mut c = iommu_destroy { size: 8, id: 1 };
    call(&ctx(), io(0xb0), &mut c)
});
errno_test!(dispatch_request_with_other_type_is_enotty, ENOTTY, {
    let mut c = iommu_destroy { size: 8, id: 1 };
    call(&ctx(), (b'V' as u32) << 8 | IOMMUFD_CMD_DESTROY, &mut c)
});
errno_test!(dispatch_unimplemented_slot_is_enotty, ENOTTY, {
    // No kernel has a command 0x9f yet.
    let mut c = iommu_fault_alloc { size: 16, ..Default::default() };
    call(&ctx(), io(0x9f), &mut c)
});
errno_test!(dispatch_size_below_minimum_is_einval, EINVAL, {
    let mut c = iommu_ioas_alloc { size: 8, ..Default::default() };
    call(&ctx(), IOMMU_IOAS_ALLOC, &mut c)
});
errno_test!(dispatch_nonzero_tail_is_e2big, E2BIG, {
    let mut c = [0u32; 8];
    c[0] = 32;
    c[5] = 1;
    call(&ctx(), IOMMU_IOAS_ALLOC, &mut c)
});
errno_test!(dispatch_unreadable_struct_is_efault, EFAULT, { ioctl(&ctx(), &InProcess, IOMMU_IOAS_ALLOC, 8).map(drop) });
errno_test!(dispatch_unreadable_tail_is_efault, EFAULT, {
    // The struct ends a page; the page after it is inaccessible.
    let buf = HostBuffer::new(2 * PAGE as usize).unwrap();
    // SAFETY: changes the protection of the second page of our own mapping,
    // which nothing references.
    unsafe { rustix::mm::mprotect((buf.addr() + PAGE) as *mut _, PAGE as usize, rustix::mm::MprotectFlags::empty()) }
        .unwrap();
    let at = buf.addr() + PAGE - 12;
    let c = iommu_ioas_alloc { size: 64, ..Default::default() };
    buf.write_at((PAGE - 12) as usize, c.as_bytes());
    ioctl(&ctx(), &InProcess, IOMMU_IOAS_ALLOC, at).map(drop)
});

#[test]
fn dispatch_zero_tail_is_accepted_and_short_struct_is_padded() {
    let ctx = ctx();
    let mut c = [0u32; 8];
    c[0] = 32;
    call(&ctx, IOMMU_IOAS_ALLOC, &mut c).unwrap();
    assert_eq!(c[2], 1);
    assert_eq!(&c[3..], &[0; 5], "nothing written past the struct");
}

// ---- IOMMU_DESTROY ---------------------------------------------------------

errno_test!(destroy_unknown_id_is_enoent, ENOENT, {
    call(&ctx(), IOMMU_DESTROY, &mut iommu_destroy { size: 8, id: 42 })
});
errno_test!(destroy_ioas_with_a_hwpt_is_ebusy, EBUSY, {
    let (ctx, ioas_id, _, _) = attached(1);
    call(&ctx, IOMMU_DESTROY, &mut iommu_destroy { size: 8, id: ioas_id })
});
errno_test!(destroy_attached_hwpt_is_ebusy, EBUSY, {
    let (ctx, _, dev, _) = attached(1);
    let hwpt = ctx.get(dev).unwrap().attached().map(|_| 3).unwrap();
    call(&ctx, IOMMU_DESTROY, &mut iommu_destroy { size: 8, id: hwpt })
});
errno_test!(destroy_bound_device_is_ebusy, EBUSY, {
    let (ctx, _, dev, _) = attached(1);
    call(&ctx, IOMMU_DESTROY, &mut iommu_destroy { size: 8, id: dev.get() })
});

#[test]
fn destroy_frees_the_id_for_reuse() {
    let ctx = ctx();
    let a = ioas(&ctx);
    let b = ioas(&ctx);
    call(&ctx, IOMMU_DESTROY, &mut iommu_destroy { size: 8, id: a }).unwrap();
    assert_eq!(ioas(&ctx), a);
    assert_eq!((a, b), (1, 2));
}

// ---- IOMMU_IOAS_ALLOC -------------------------------------------------------

errno_test!(ioas_alloc_flags_is_eopnotsupp, EOPNOTSUPP, {
    let mut c = iommu_ioas_alloc { size: 12, flags: 1, ..Default::default() };
    call(&ctx(), IOMMU_IOAS_ALLOC, &mut c)
});

// ---- IOMMU_IOAS_IOVA_RANGES ------------------------------------------------

fn ranges_cmd(ioas_id: u32, out: &mut [iommu_iova_range]) -> iommu_ioas_iova_ranges {
    iommu_ioas_iova_ranges {
        size: sz::<iommu_ioas_iova_ranges>(),
        ioas_id,
        num_iovas: out.len() as u32,
        allowed_iovas: out.as_mut_ptr() as u64,
        ..Default::default()
    }
}

errno_test!(iova_ranges_reserved_is_eopnotsupp, EOPNOTSUPP, {
    let ctx = ctx();
    let mut c = ranges_cmd(ioas(&ctx), &mut []);
    c.__reserved = 1;
    call(&ctx, IOMMU_IOAS_IOVA_RANGES, &mut c)
});
errno_test!(iova_ranges_unknown_ioas_is_enoent, ENOENT, {
    call(&ctx(), IOMMU_IOAS_IOVA_RANGES, &mut ranges_cmd(9, &mut []))
});
errno_test!(iova_ranges_bad_array_is_efault, EFAULT, {
    let ctx = ctx();
    let mut c = ranges_cmd(ioas(&ctx), &mut []);
    c.num_iovas = 1;
    c.allowed_iovas = 16;
    call(&ctx, IOMMU_IOAS_IOVA_RANGES, &mut c)
});

#[test]
fn iova_ranges_too_small_is_emsgsize_with_the_count() {
    let (ctx, ioas_id, _, _) = attached(1);
    let mut out = [iommu_iova_range::default(); 1];
    let mut c = ranges_cmd(ioas_id, &mut out);
    assert_eq!(call(&ctx, IOMMU_IOAS_IOVA_RANGES, &mut c), Err(Errno::EMSGSIZE));
    assert_eq!(c.num_iovas, 2);
    assert_eq!((out[0].start, out[0].last), (0, 0xfedf_ffff));
    assert_eq!(c.out_iova_alignment, PAGE);
    let mut out = [iommu_iova_range::default(); 2];
    let mut c = ranges_cmd(ioas_id, &mut out);
    call(&ctx, IOMMU_IOAS_IOVA_RANGES, &mut c).unwrap();
    assert_eq!((out[1].start, out[1].last), (0xfef0_0000, (1 << 48) - 1));
}

#[test]
fn iova_ranges_of_a_fresh_ioas_is_everything_at_alignment_one() {
    let ctx = ctx();
    let mut out = [iommu_iova_range::default(); 1];
    let mut c = ranges_cmd(ioas(&ctx), &mut out);
    call(&ctx, IOMMU_IOAS_IOVA_RANGES, &mut c).unwrap();
    assert_eq!((c.num_iovas, out[0].start, out[0].last, c.out_iova_alignment), (1, 0, u64::MAX, 1));
}

// ---- IOMMU_IOAS_ALLOW_IOVAS ------------------------------------------------

fn allow(ctx: &Arc<Context>, ioas_id: u32, ranges: &mut [iommu_iova_range]) -> Result<(), Errno> {
    let mut c = iommu_ioas_allow_iovas {
        size: sz::<iommu_ioas_allow_iovas>(),
        ioas_id,
        num_iovas: ranges.len() as u32,
        allowed_iovas: ranges.as_mut_ptr() as u64,
        ..Default::default()
    };
    call(ctx, IOMMU_IOAS_ALLOW_IOVAS, &mut c)
}

errno_test!(allow_iovas_reserved_is_eopnotsupp, EOPNOTSUPP, {
    let ctx = ctx();
    let mut c = iommu_ioas_allow_iovas { size: 24, ioas_id: ioas(&ctx), __reserved: 1, ..Default::default() };
    call(&ctx, IOMMU_IOAS_ALLOW_IOVAS, &mut c)
});
errno_test!(allow_iovas_unknown_ioas_is_enoent, ENOENT, allow(&ctx(), 5, &mut []));
errno_test!(allow_iovas_empty_range_is_einval, EINVAL, {
    let ctx = ctx();
    let id = ioas(&ctx);
    allow(&ctx, id, &mut [iommu_iova_range { start: 0x1000, last: 0x1000 }])
});
errno_test!(allow_iovas_overlapping_ranges_is_einval, EINVAL, {
    let ctx = ctx();
    let id = ioas(&ctx);
    allow(
        &ctx,
        id,
        &mut [iommu_iova_range { start: 0x1000, last: 0x4fff }, iommu_iova_range { start: 0x4000, last: 0x8fff }],
    )
});
errno_test!(allow_iovas_over_a_reserved_range_is_eaddrinuse, EADDRINUSE, {
    let (ctx, id, _, _) = attached(1);
    allow(&ctx, id, &mut [iommu_iova_range { start: 0xfe00_0000, last: 0xfeff_ffff }])
});
errno_test!(allow_iovas_overlap_before_a_bad_pointer_is_einval, EINVAL, {
    let ctx = ctx();
    let id = ioas(&ctx);
    // Two ranges that overlap, then the array runs off the end of the
    // mapping: checked as read, as Linux checks them.
    let page = HostBuffer::new(PAGE as usize).unwrap();
    let at = page.addr() + PAGE - 32;
    page.write_at((PAGE - 32) as usize, [0x1000u64, 0x4fff, 0x4000, 0x8fff].as_bytes());
    let mut c = iommu_ioas_allow_iovas {
        size: sz::<iommu_ioas_allow_iovas>(),
        ioas_id: id,
        num_iovas: 4096,
        allowed_iovas: at,
        ..Default::default()
    };
    call(&ctx, IOMMU_IOAS_ALLOW_IOVAS, &mut c)
});
errno_test!(allow_iovas_bad_array_is_efault, EFAULT, {
    let ctx = ctx();
    let mut c =
        iommu_ioas_allow_iovas { size: 24, ioas_id: ioas(&ctx), num_iovas: 1, allowed_iovas: 8, ..Default::default() };
    call(&ctx, IOMMU_IOAS_ALLOW_IOVAS, &mut c)
});

/// A program's list of a million ranges, the last overlapping the first:
/// refused in a moment, not after a comparison of every pair.
#[test]
fn a_million_allowed_ranges_are_checked_as_fast_as_they_are_read() {
    let ctx = ctx();
    let id = ioas(&ctx);
    let n = 1u64 << 20;
    let mut ranges: Vec<iommu_iova_range> =
        (0..n).map(|i| iommu_iova_range { start: i << 13, last: (i << 13) + 0xfff }).collect();
    ranges[(n - 1) as usize] = iommu_iova_range { start: 0x800, last: 0x1800 };
    let (done, took) = std::sync::mpsc::channel();
    std::thread::spawn(move || done.send(allow(&ctx, id, &mut ranges)));
    let result = took.recv_timeout(std::time::Duration::from_secs(10)).expect("checking took over 10 s");
    assert_eq!(result, Err(Errno::EINVAL));
}

#[test]
fn allowed_ranges_steer_automatic_iovas_and_refuse_reservations() {
    let ctx = ctx();
    let id = ioas(&ctx);
    allow(&ctx, id, &mut [iommu_iova_range { start: 0x4000_0000, last: 0x4fff_ffff }]).unwrap();
    let buf = HostBuffer::new(PAGE as usize).unwrap();
    let mut m = map_cmd(id, &buf, PAGE, None);
    call(&ctx, IOMMU_IOAS_MAP, &mut m).unwrap();
    assert!((0x4000_0000..0x5000_0000).contains(&m.iova));
    let mut info = DeviceInfo::new("d", 1);
    info.reserved.push(IovaRange::new(0x4800_0000, 0x48ff_ffff));
    let dev = ctx.bind_device(info).unwrap();
    assert_eq!(ctx.attach(dev, IoasId::new(id)).map_err(Errno::from), Err(Errno::EADDRINUSE));
}

// ---- IOMMU_IOAS_MAP ----------------------------------------------------------

errno_test!(map_unknown_flag_is_eopnotsupp, EOPNOTSUPP, {
    let ctx = ctx();
    let buf = HostBuffer::new(4096).unwrap();
    let mut c = map_cmd(ioas(&ctx), &buf, PAGE, None);
    c.flags |= 1 << 3;
    call(&ctx, IOMMU_IOAS_MAP, &mut c)
});
errno_test!(map_reserved_is_eopnotsupp, EOPNOTSUPP, {
    let ctx = ctx();
    let buf = HostBuffer::new(4096).unwrap();
    let mut c = map_cmd(ioas(&ctx), &buf, PAGE, None);
    c.__reserved = 1;
    call(&ctx, IOMMU_IOAS_MAP, &mut c)
});
errno_test!(map_iova_u64_max_is_eoverflow, EOVERFLOW, {
    let ctx = ctx();
    let buf = HostBuffer::new(4096).unwrap();
    call(&ctx, IOMMU_IOAS_MAP, &mut map_cmd(ioas(&ctx), &buf, PAGE, Some(u64::MAX)))
});
errno_test!(map_length_u64_max_is_eoverflow, EOVERFLOW, {
    let ctx = ctx();
    let buf = HostBuffer::new(4096).unwrap();
    call(&ctx, IOMMU_IOAS_MAP, &mut map_cmd(ioas(&ctx), &buf, u64::MAX, None))
});
errno_test!(map_without_read_or_write_is_einval, EINVAL, {
    let ctx = ctx();
    let buf = HostBuffer::new(4096).unwrap();
    let mut c = map_cmd(ioas(&ctx), &buf, PAGE, None);
    c.flags = 0;
    call(&ctx, IOMMU_IOAS_MAP, &mut c)
});
errno_test!(map_unknown_ioas_is_enoent, ENOENT, {
    let buf = HostBuffer::new(4096).unwrap();
    call(&ctx(), IOMMU_IOAS_MAP, &mut map_cmd(3, &buf, PAGE, None))
});
errno_test!(map_zero_length_is_einval, EINVAL, {
    let ctx = ctx();
    let buf = HostBuffer::new(4096).unwrap();
    call(&ctx, IOMMU_IOAS_MAP, &mut map_cmd(ioas(&ctx), &buf, 0, None))
});
errno_test!(map_user_va_wrapping_is_eoverflow, EOVERFLOW, {
    let ctx = ctx();
    let mut c = iommu_ioas_map {
        size: 40,
        flags: IOMMU_IOAS_MAP_READABLE,
        ioas_id: ioas(&ctx),
        user_va: u64::MAX - PAGE,
        length: 4 * PAGE,
        ..Default::default()
    };
    call(&ctx, IOMMU_IOAS_MAP, &mut c)
});
errno_test!(map_fixed_iova_wrapping_is_eoverflow, EOVERFLOW, {
    let ctx = ctx();
    let buf = HostBuffer::new(8192).unwrap();
    call(&ctx, IOMMU_IOAS_MAP, &mut map_cmd(ioas(&ctx), &buf, 2 * PAGE, Some(u64::MAX - PAGE + 1)))
});
errno_test!(map_over_an_existing_mapping_is_eexist, EEXIST, {
    let (ctx, id, _, buf) = attached(2);
    call(&ctx, IOMMU_IOAS_MAP, &mut map_cmd(id, &buf, PAGE, Some((1 << 20) + PAGE)))
});
errno_test!(map_into_a_reserved_range_is_einval, EINVAL, {
    let (ctx, id, _, buf) = attached(1);
    call(&ctx, IOMMU_IOAS_MAP, &mut map_cmd(id, &buf, PAGE, Some(0xfee0_0000)))
});
errno_test!(map_unaligned_iova_with_a_domain_is_einval, EINVAL, {
    let (ctx, id, _, buf) = attached(1);
    call(&ctx, IOMMU_IOAS_MAP, &mut map_cmd(id, &buf, PAGE, Some(0x100_0010)))
});
errno_test!(map_unaligned_length_with_a_domain_is_einval, EINVAL, {
    let (ctx, id, _, buf) = attached(1);
    call(&ctx, IOMMU_IOAS_MAP, &mut map_cmd(id, &buf, 100, None))
});
errno_test!(map_unmapped_memory_with_a_domain_is_efault, EFAULT, {
    let (ctx, id, _, _) = attached(1);
    let mut c = iommu_ioas_map {
        size: 40,
        flags: IOMMU_IOAS_MAP_READABLE,
        ioas_id: id,
        user_va: PAGE,
        length: PAGE,
        ..Default::default()
    };
    call(&ctx, IOMMU_IOAS_MAP, &mut c)
});
errno_test!(map_past_the_memlock_limit_is_enomem, ENOMEM, {
    let ctx = Arc::new(Context::with_config(ContextConfig {
        memlock_limit: Limit::Pages(2),
        memlock_exempt: false,
        sys_resource: false,
        private_counter: true,
        live_capabilities: false,
        owner: None,
        pasid_parent: None,
        max_objects: None,
        max_queue_depth: None,
    }));
    let id = ioas(&ctx);
    let dev = ctx.bind_device(DeviceInfo::new("d", 1)).unwrap();
    ctx.attach(dev, IoasId::new(id)).unwrap();
    let buf = HostBuffer::new(3 * PAGE as usize).unwrap();
    call(&ctx, IOMMU_IOAS_MAP, &mut map_cmd(id, &buf, 3 * PAGE, None))
});
errno_test!(map_with_no_space_left_is_enospc, ENOSPC, {
    let ctx = ctx();
    let id = ioas(&ctx);
    allow(&ctx, id, &mut [iommu_iova_range { start: 0x10000, last: 0x10fff }]).unwrap();
    let buf = HostBuffer::new(8192).unwrap();
    call(&ctx, IOMMU_IOAS_MAP, &mut map_cmd(id, &buf, 2 * PAGE, None))
});

#[test]
fn map_without_a_domain_pins_nothing_and_accepts_any_alignment() {
    let ctx = ctx();
    let id = ioas(&ctx);
    let buf = HostBuffer::new(8192).unwrap();
    let mut c = map_cmd(id, &buf, 100, Some(0x10_0003));
    c.user_va += 3;
    call(&ctx, IOMMU_IOAS_MAP, &mut c).unwrap();
    assert_eq!(ctx.locked_pages(), 0);
}

// ---- IOMMU_IOAS_MAP_FILE ---------------------------------------------------

fn memfd(len: u64) -> std::fs::File {
    let f = memfd::MemfdOptions::new().create("t").unwrap().into_file();
    f.set_len(len).unwrap();
    f
}

errno_test!(map_file_unknown_flag_is_eopnotsupp, EOPNOTSUPP, {
    let ctx = ctx();
    let f = memfd(PAGE);
    let mut c = map_file_cmd(ioas(&ctx), f.as_raw_fd(), 0, PAGE);
    c.flags |= 1 << 7;
    call(&ctx, IOMMU_IOAS_MAP_FILE, &mut c)
});
errno_test!(map_file_bad_fd_is_ebadf, EBADF, {
    let ctx = ctx();
    call(&ctx, IOMMU_IOAS_MAP_FILE, &mut map_file_cmd(ioas(&ctx), -1, 0, PAGE))
});
errno_test!(map_file_unknown_ioas_is_enoent, ENOENT, {
    let f = memfd(PAGE);
    call(&ctx(), IOMMU_IOAS_MAP_FILE, &mut map_file_cmd(7, f.as_raw_fd(), 0, PAGE))
});
errno_test!(map_file_past_the_end_is_einval, EINVAL, {
    let ctx = ctx();
    let f = memfd(PAGE);
    call(&ctx, IOMMU_IOAS_MAP_FILE, &mut map_file_cmd(ioas(&ctx), f.as_raw_fd(), PAGE, PAGE))
});
errno_test!(map_file_length_u64_max_is_eoverflow, EOVERFLOW, {
    let ctx = ctx();
    let f = memfd(PAGE);
    call(&ctx, IOMMU_IOAS_MAP_FILE, &mut map_file_cmd(ioas(&ctx), f.as_raw_fd(), 0, u64::MAX))
});

#[test]
fn map_file_dma_sees_the_file() {
    let (ctx, id, dev, _) = attached(1);
    let f = memfd(2 * PAGE);
    rustix::io::pwrite(&f, b"file data", PAGE).unwrap();
    let mut c = map_file_cmd(id, f.as_raw_fd(), PAGE, PAGE);
    call(&ctx, IOMMU_IOAS_MAP_FILE, &mut c).unwrap();
    drop(f);
    let mut got = [0u8; 9];
    ctx.get(dev).unwrap().dma_read(c.iova, &mut got).unwrap();
    assert_eq!(&got, b"file data");
}

/// A test access (the selftests' in-kernel user of an IOAS) on `ioas_id`:
/// its fd, closed by the caller.
fn test_access(ctx: &Arc<Context>, ioas_id: u32) -> u32 {
    use ioasid_abi::selftest::*;
    let mut t = iommu_test_cmd { size: 72, op: IOMMU_TEST_OP_CREATE_ACCESS, id: ioas_id, ..Default::default() };
    call(ctx, IOMMU_TEST_CMD, &mut t).unwrap();
    CreateAccess::read_from_prefix(t.union.as_bytes()).unwrap().0.out_access_fd
}

fn access_rw(ctx: &Arc<Context>, fd: u32, iova: u64, buf: &mut [u8], write: bool) -> Result<(), Errno> {
    use ioasid_abi::selftest::*;
    let a = AccessRw {
        iova,
        length: buf.len() as u64,
        uptr: buf.as_mut_ptr() as u64,
        flags: if write { MOCK_ACCESS_RW_WRITE } else { 0 },
        __pad: 0,
    };
    let mut t = iommu_test_cmd { size: 72, op: IOMMU_TEST_OP_ACCESS_RW, id: fd, ..Default::default() };
    t.union.as_mut_bytes()[..size_of::<AccessRw>()].copy_from_slice(a.as_bytes());
    call(ctx, IOMMU_TEST_CMD, &mut t)
}

#[test]
fn map_file_of_a_file_truncated_later_fails_dma_and_access_cleanly() {
    let (ctx, id, dev, _) = attached(1);
    let f = memfd(2 * PAGE);
    rustix::io::pwrite(&f, b"kept", 0).unwrap();
    let mut c = map_file_cmd(id, f.as_raw_fd(), 0, 2 * PAGE);
    call(&ctx, IOMMU_IOAS_MAP_FILE, &mut c).unwrap();
    let access = test_access(&ctx, id);
    f.set_len(PAGE).unwrap();
    let device = ctx.get(dev).unwrap();
    let mut got = [0u8; 4];
    // What is left of the file is still reached.
    device.dma_read(c.iova, &mut got).unwrap();
    assert_eq!(&got, b"kept");
    access_rw(&ctx, access, c.iova, &mut got, false).unwrap();
    // Past the file's new end: an error, not the SIGBUS the pages raise.
    assert!(device.dma_read(c.iova + PAGE, &mut got).is_err());
    assert!(device.dma_write(c.iova + PAGE - 2, b"over").is_err());
    assert_eq!(access_rw(&ctx, access, c.iova + PAGE, &mut got, false), Err(Errno::EFAULT));
    assert_eq!(access_rw(&ctx, access, c.iova + PAGE, &mut got, true), Err(Errno::EFAULT));
    f.set_len(0).unwrap();
    assert!(device.dma_read(c.iova, &mut got).is_err());
    assert_eq!(access_rw(&ctx, access, c.iova, &mut got, false), Err(Errno::EFAULT));
    ioasid_abi::files::remove(access as i32);
    // The mapping itself unmaps as usual.
    let mut u = iommu_ioas_unmap { size: sz::<iommu_ioas_unmap>(), ioas_id: id, iova: c.iova, length: 2 * PAGE };
    call(&ctx, IOMMU_IOAS_UNMAP, &mut u).unwrap();
}

// ---- IOMMU_IOAS_COPY -------------------------------------------------------

fn copy_cmd(dst: u32, src: u32, src_iova: u64, length: u64) -> iommu_ioas_copy {
    iommu_ioas_copy {
        size: sz::<iommu_ioas_copy>(),
        flags: IOMMU_IOAS_MAP_READABLE | IOMMU_IOAS_MAP_WRITEABLE,
        dst_ioas_id: dst,
        src_ioas_id: src,
        length,
        dst_iova: 0,
        src_iova,
    }
}

errno_test!(copy_unknown_flag_is_eopnotsupp, EOPNOTSUPP, {
    let (ctx, id, _, _) = attached(1);
    let mut c = copy_cmd(id, id, 1 << 20, PAGE);
    c.flags |= 1 << 9;
    call(&ctx, IOMMU_IOAS_COPY, &mut c)
});
errno_test!(copy_length_u64_max_is_eoverflow, EOVERFLOW, {
    let (ctx, id, _, _) = attached(1);
    call(&ctx, IOMMU_IOAS_COPY, &mut copy_cmd(id, id, 1 << 20, u64::MAX))
});
errno_test!(copy_without_read_or_write_is_einval, EINVAL, {
    let (ctx, id, _, _) = attached(1);
    let mut c = copy_cmd(id, id, 1 << 20, PAGE);
    c.flags = 0;
    call(&ctx, IOMMU_IOAS_COPY, &mut c)
});
errno_test!(copy_unknown_source_is_enoent, ENOENT, {
    let (ctx, id, _, _) = attached(1);
    call(&ctx, IOMMU_IOAS_COPY, &mut copy_cmd(id, 99, 1 << 20, PAGE))
});
errno_test!(copy_unmapped_source_range_is_enoent, ENOENT, {
    let (ctx, id, _, _) = attached(1);
    let dst = ioas(&ctx);
    call(&ctx, IOMMU_IOAS_COPY, &mut copy_cmd(dst, id, 1 << 20, 2 * PAGE))
});
errno_test!(copy_zero_length_is_einval, EINVAL, {
    let (ctx, id, _, _) = attached(1);
    let dst = ioas(&ctx);
    call(&ctx, IOMMU_IOAS_COPY, &mut copy_cmd(dst, id, 1 << 20, 0))
});
errno_test!(copy_unknown_destination_is_enoent, ENOENT, {
    let (ctx, id, _, _) = attached(1);
    call(&ctx, IOMMU_IOAS_COPY, &mut copy_cmd(77, id, 1 << 20, PAGE))
});
errno_test!(copy_writeable_from_read_only_memory_is_eperm, EPERM, {
    let (ctx, id, _, buf) = attached(1);
    let mut m = map_cmd(id, &buf, PAGE, Some(0x4000_0000));
    m.flags = IOMMU_IOAS_MAP_READABLE | IOMMU_IOAS_MAP_FIXED_IOVA;
    call(&ctx, IOMMU_IOAS_MAP, &mut m).unwrap();
    let dst = ioas(&ctx);
    call(&ctx, IOMMU_IOAS_COPY, &mut copy_cmd(dst, id, 0x4000_0000, PAGE))
});

#[test]
fn copy_shares_pins_and_maps_a_subrange() {
    let (ctx, id, _, _buf) = attached(4);
    let pinned = ctx.locked_pages();
    let dst = ioas(&ctx);
    let dev = ctx.bind_device(DeviceInfo::new("other", 16)).unwrap();
    ctx.attach(dev, IoasId::new(dst)).unwrap();
    let mut c = copy_cmd(dst, id, (1 << 20) + PAGE, 2 * PAGE);
    call(&ctx, IOMMU_IOAS_COPY, &mut c).unwrap();
    assert_eq!(ctx.locked_pages(), pinned, "copied pages are pinned once");
    ctx.get(dev).unwrap().dma_write(c.dst_iova, b"x").unwrap();
}

// ---- IOMMU_IOAS_UNMAP ------------------------------------------------------

fn unmap(ctx: &Arc<Context>, ioas_id: u32, iova: u64, length: u64) -> Result<u64, Errno> {
    let mut c = iommu_ioas_unmap { size: sz::<iommu_ioas_unmap>(), ioas_id, iova, length };
    call(ctx, IOMMU_IOAS_UNMAP, &mut c).map(|()| c.length)
}

errno_test!(unmap_unknown_ioas_is_enoent, ENOENT, unmap(&ctx(), 4, 0, PAGE).map(drop));
errno_test!(unmap_length_u64_max_is_eoverflow, EOVERFLOW, {
    let (ctx, id, _, _) = attached(1);
    unmap(&ctx, id, PAGE, u64::MAX).map(drop)
});
errno_test!(unmap_iova_u64_max_is_eoverflow, EOVERFLOW, {
    let (ctx, id, _, _) = attached(1);
    unmap(&ctx, id, u64::MAX, 1).map(drop)
});
errno_test!(unmap_wrapping_range_is_eoverflow, EOVERFLOW, {
    let (ctx, id, _, _) = attached(1);
    unmap(&ctx, id, u64::MAX - 1, 4).map(drop)
});
errno_test!(unmap_zero_length_is_einval, EINVAL, {
    let (ctx, id, _, _) = attached(1);
    unmap(&ctx, id, 1 << 20, 0).map(drop)
});
errno_test!(unmap_part_of_a_mapping_is_enoent, ENOENT, {
    let (ctx, id, _, _) = attached(2);
    unmap(&ctx, id, 1 << 20, PAGE).map(drop)
});
errno_test!(unmap_of_nothing_is_enoent, ENOENT, {
    let (ctx, id, _, _) = attached(1);
    unmap(&ctx, id, 1 << 30, PAGE).map(drop)
});

#[test]
fn unmap_returns_bytes_and_unmap_all_empties() {
    let (ctx, id, dev, buf) = attached(2);
    call(&ctx, IOMMU_IOAS_MAP, &mut map_cmd(id, &buf, PAGE, Some(1 << 30))).unwrap();
    assert_eq!(unmap(&ctx, id, 0, 1 << 29), Ok(2 * PAGE));
    assert_eq!(unmap(&ctx, id, 0, u64::MAX), Ok(PAGE));
    assert_eq!(unmap(&ctx, id, 0, u64::MAX), Ok(0), "unmap all of nothing succeeds");
    assert_eq!(ctx.locked_pages(), 0);
    assert!(ctx.get(dev).unwrap().dma_write(1 << 30, b"x").is_err());
}

// ---- IOMMU_OPTION ----------------------------------------------------------

fn option_cmd(option_id: u32, op: u16, object_id: u32, val64: u64) -> iommu_option {
    iommu_option { size: sz::<iommu_option>(), option_id, op, __reserved: 0, object_id, val64 }
}

errno_test!(option_reserved_is_eopnotsupp, EOPNOTSUPP, {
    let mut c = option_cmd(IOMMU_OPTION_RLIMIT_MODE, IOMMU_OPTION_OP_GET, 0, 0);
    c.__reserved = 1;
    call(&ctx(), IOMMU_OPTION, &mut c)
});
errno_test!(option_unknown_option_is_eopnotsupp, EOPNOTSUPP, {
    call(&ctx(), IOMMU_OPTION, &mut option_cmd(9, IOMMU_OPTION_OP_GET, 0, 0))
});
errno_test!(option_rlimit_with_an_object_is_eopnotsupp, EOPNOTSUPP, {
    call(&ctx(), IOMMU_OPTION, &mut option_cmd(IOMMU_OPTION_RLIMIT_MODE, IOMMU_OPTION_OP_GET, 1, 0))
});
errno_test!(option_rlimit_unknown_op_is_eopnotsupp, EOPNOTSUPP, {
    call(&ctx(), IOMMU_OPTION, &mut option_cmd(IOMMU_OPTION_RLIMIT_MODE, 5, 0, 0))
});
errno_test!(option_rlimit_set_unprivileged_is_eperm, EPERM, {
    let ctx = Arc::new(Context::with_config(ContextConfig { sys_resource: false, ..ContextConfig::from_process() }));
    call(&ctx, IOMMU_OPTION, &mut option_cmd(IOMMU_OPTION_RLIMIT_MODE, IOMMU_OPTION_OP_SET, 0, 1))
});
errno_test!(option_rlimit_set_with_objects_is_ebusy, EBUSY, {
    let ctx = ctx();
    ioas(&ctx);
    call(&ctx, IOMMU_OPTION, &mut option_cmd(IOMMU_OPTION_RLIMIT_MODE, IOMMU_OPTION_OP_SET, 0, 1))
});
errno_test!(option_rlimit_set_bad_value_is_einval, EINVAL, {
    call(&ctx(), IOMMU_OPTION, &mut option_cmd(IOMMU_OPTION_RLIMIT_MODE, IOMMU_OPTION_OP_SET, 0, 2))
});
errno_test!(option_huge_pages_unknown_ioas_is_enoent, ENOENT, {
    call(&ctx(), IOMMU_OPTION, &mut option_cmd(IOMMU_OPTION_HUGE_PAGES, IOMMU_OPTION_OP_GET, 3, 0))
});
errno_test!(option_huge_pages_bad_value_is_einval, EINVAL, {
    let ctx = ctx();
    let id = ioas(&ctx);
    call(&ctx, IOMMU_OPTION, &mut option_cmd(IOMMU_OPTION_HUGE_PAGES, IOMMU_OPTION_OP_SET, id, 2))
});
errno_test!(option_huge_pages_unknown_op_is_eopnotsupp, EOPNOTSUPP, {
    let ctx = ctx();
    let id = ioas(&ctx);
    call(&ctx, IOMMU_OPTION, &mut option_cmd(IOMMU_OPTION_HUGE_PAGES, 7, id, 0))
});
errno_test!(option_huge_pages_disable_while_mapped_into_a_domain_is_einval, EINVAL, {
    let (ctx, id, _, _) = attached(1);
    call(&ctx, IOMMU_OPTION, &mut option_cmd(IOMMU_OPTION_HUGE_PAGES, IOMMU_OPTION_OP_SET, id, 0))
});

#[test]
fn option_get_and_set_round_trip() {
    let ctx = ctx();
    let mut c = option_cmd(IOMMU_OPTION_RLIMIT_MODE, IOMMU_OPTION_OP_SET, 0, 1);
    call(&ctx, IOMMU_OPTION, &mut c).unwrap();
    let mut c = option_cmd(IOMMU_OPTION_RLIMIT_MODE, IOMMU_OPTION_OP_GET, 0, 0);
    call(&ctx, IOMMU_OPTION, &mut c).unwrap();
    assert_eq!(c.val64, 1);
    let id = ioas(&ctx);
    let mut c = option_cmd(IOMMU_OPTION_HUGE_PAGES, IOMMU_OPTION_OP_GET, id, 7);
    call(&ctx, IOMMU_OPTION, &mut c).unwrap();
    assert_eq!(c.val64, 1);
    call(&ctx, IOMMU_OPTION, &mut option_cmd(IOMMU_OPTION_HUGE_PAGES, IOMMU_OPTION_OP_SET, id, 0)).unwrap();
    let mut c = option_cmd(IOMMU_OPTION_HUGE_PAGES, IOMMU_OPTION_OP_GET, id, 7);
    call(&ctx, IOMMU_OPTION, &mut c).unwrap();
    assert_eq!(c.val64, 0);
}

// ---- IOMMU_HWPT_ALLOC ------------------------------------------------------

fn hwpt_cmd(dev_id: u32, pt_id: u32, flags: u32) -> iommu_hwpt_alloc {
    iommu_hwpt_alloc { size: sz::<iommu_hwpt_alloc>(), flags, dev_id, pt_id, ..Default::default() }
}

fn with_device(dirty: bool) -> (Arc<Context>, u32, u32) {
    let ctx = ctx();
    let id = ioas(&ctx);
    let mut info = DeviceInfo::new("d", 1);
    info.dirty_tracking = dirty;
    let dev = ctx.bind_device(info).unwrap();
    (ctx, id, dev.get())
}

errno_test!(hwpt_alloc_reserved_is_eopnotsupp, EOPNOTSUPP, {
    let (ctx, id, dev) = with_device(false);
    let mut c = hwpt_cmd(dev, id, 0);
    c.__reserved = 1;
    call(&ctx, IOMMU_HWPT_ALLOC, &mut c)
});
errno_test!(hwpt_alloc_data_type_without_data_is_einval, EINVAL, {
    let (ctx, id, dev) = with_device(false);
    let mut c = hwpt_cmd(dev, id, 0);
    c.data_type = IOMMU_HWPT_DATA_VTD_S1;
    call(&ctx, IOMMU_HWPT_ALLOC, &mut c)
});
errno_test!(hwpt_alloc_data_without_type_is_einval, EINVAL, {
    let (ctx, id, dev) = with_device(false);
    let mut c = hwpt_cmd(dev, id, 0);
    c.data_len = 8;
    call(&ctx, IOMMU_HWPT_ALLOC, &mut c)
});
errno_test!(hwpt_alloc_unknown_device_is_enoent, ENOENT, {
    let (ctx, id, _) = with_device(false);
    call(&ctx, IOMMU_HWPT_ALLOC, &mut hwpt_cmd(id, id, 0))
});
errno_test!(hwpt_alloc_unknown_pt_is_einval, EINVAL, {
    let (ctx, _, dev) = with_device(false);
    call(&ctx, IOMMU_HWPT_ALLOC, &mut hwpt_cmd(dev, 50, 0))
});
errno_test!(hwpt_alloc_pt_is_a_device_is_einval, EINVAL, {
    let (ctx, _, dev) = with_device(false);
    call(&ctx, IOMMU_HWPT_ALLOC, &mut hwpt_cmd(dev, dev, 0))
});
errno_test!(hwpt_alloc_unknown_flag_is_eopnotsupp, EOPNOTSUPP, {
    let (ctx, id, dev) = with_device(false);
    call(&ctx, IOMMU_HWPT_ALLOC, &mut hwpt_cmd(dev, id, 1 << 5))
});
errno_test!(hwpt_alloc_dirty_tracking_without_support_is_eopnotsupp, EOPNOTSUPP, {
    let (ctx, id, dev) = with_device(false);
    call(&ctx, IOMMU_HWPT_ALLOC, &mut hwpt_cmd(dev, id, IOMMU_HWPT_ALLOC_DIRTY_TRACKING))
});
errno_test!(hwpt_alloc_fault_on_a_nest_parent_is_eopnotsupp, EOPNOTSUPP, {
    let (ctx, id, dev) = with_device(false);
    call(&ctx, IOMMU_HWPT_ALLOC, &mut hwpt_cmd(dev, id, IOMMU_HWPT_FAULT_ID_VALID | IOMMU_HWPT_ALLOC_NEST_PARENT))
});
errno_test!(hwpt_alloc_unknown_fault_id_is_enoent, ENOENT, {
    let (ctx, id, dev) = with_device(false);
    let mut c = hwpt_cmd(dev, id, IOMMU_HWPT_FAULT_ID_VALID);
    c.fault_id = 12;
    call(&ctx, IOMMU_HWPT_ALLOC, &mut c)
});

#[test]
fn hwpt_alloc_mirrors_the_ioas_and_is_busy_while_attached() {
    let (ctx, id, dev) = with_device(true);
    let buf = HostBuffer::new(4096).unwrap();
    call(&ctx, IOMMU_IOAS_MAP, &mut map_cmd(id, &buf, PAGE, Some(0x8000))).unwrap();
    let mut c = hwpt_cmd(dev, id, IOMMU_HWPT_ALLOC_NEST_PARENT | IOMMU_HWPT_ALLOC_DIRTY_TRACKING);
    call(&ctx, IOMMU_HWPT_ALLOC, &mut c).unwrap();
    let hwpt = c.out_hwpt_id;
    let dev = DeviceId::new(dev);
    assert_eq!(ctx.attach(dev, HwptPagingId::new(hwpt)).map(|h| h.get()), Ok(hwpt));
    assert_eq!(call(&ctx, IOMMU_DESTROY, &mut iommu_destroy { size: 8, id: hwpt }), Err(Errno::EBUSY));
    ctx.get(dev).unwrap().dma_write(0x8000, b"ok").unwrap();
    ctx.detach(dev).unwrap();
    call(&ctx, IOMMU_DESTROY, &mut iommu_destroy { size: 8, id: hwpt }).unwrap();
    call(&ctx, IOMMU_DESTROY, &mut iommu_destroy { size: 8, id }).unwrap();
}

// ---- IOMMU_GET_HW_INFO -----------------------------------------------------

fn hw_info_cmd(dev_id: u32, data: &mut [u8]) -> iommu_hw_info {
    iommu_hw_info {
        size: sz::<iommu_hw_info>(),
        dev_id,
        data_len: data.len() as u32,
        data_uptr: data.as_mut_ptr() as u64,
        ..Default::default()
    }
}

errno_test!(hw_info_unknown_flag_is_eopnotsupp, EOPNOTSUPP, {
    let (ctx, _, dev) = with_device(false);
    let mut c = hw_info_cmd(dev, &mut []);
    c.flags = 2;
    call(&ctx, IOMMU_GET_HW_INFO, &mut c)
});
errno_test!(hw_info_asking_for_another_type_is_eopnotsupp, EOPNOTSUPP, {
    let (ctx, _, dev) = with_device(false);
    let mut c = hw_info_cmd(dev, &mut []);
    c.flags = IOMMU_HW_INFO_FLAG_INPUT_TYPE;
    c.out_data_type = IOMMU_HW_INFO_TYPE_ARM_SMMUV3;
    call(&ctx, IOMMU_GET_HW_INFO, &mut c)
});
errno_test!(hw_info_reserved_is_eopnotsupp, EOPNOTSUPP, {
    let (ctx, _, dev) = with_device(false);
    let mut c = hw_info_cmd(dev, &mut []);
    c.__reserved[2] = 1;
    call(&ctx, IOMMU_GET_HW_INFO, &mut c)
});
errno_test!(hw_info_unknown_device_is_enoent, ENOENT, {
    let (ctx, id, _) = with_device(false);
    call(&ctx, IOMMU_GET_HW_INFO, &mut hw_info_cmd(id, &mut []))
});
errno_test!(hw_info_bad_data_pointer_is_efault, EFAULT, {
    let (ctx, _, dev) = with_device(false);
    let mut c = hw_info_cmd(dev, &mut []);
    c.data_len = 16;
    c.data_uptr = 16;
    call(&ctx, IOMMU_GET_HW_INFO, &mut c)
});

#[test]
fn hw_info_reports_capabilities_and_clears_the_buffer() {
    let ctx = ctx();
    let mut info = DeviceInfo::new("d", 1);
    info.dirty_tracking = true;
    info.max_pasid_log2 = 20;
    let dev = ctx.bind_device(info).unwrap();
    let mut data = [0xffu8; 32];
    let mut c = hw_info_cmd(dev.get(), &mut data);
    call(&ctx, IOMMU_GET_HW_INFO, &mut c).unwrap();
    assert_eq!((c.data_len, c.out_data_type, c.out_max_pasid_log2), (24, IOMMU_HW_INFO_TYPE_INTEL_VTD, 20));
    // 7.3 also says when ATS cannot be used, as on every emulated device.
    assert_eq!(c.out_capabilities, IOMMU_HW_CAP_DIRTY_TRACKING | IOMMU_HW_CAP_PCI_ATS_NOT_SUPPORTED);
    let vtd = iommu_hw_info_vtd::read_from_bytes(&data[..24]).unwrap();
    assert_eq!((vtd.cap_reg >> 16) & 0x3f, 47, "MGAW of a 48-bit IOMMU");
    assert_eq!((vtd.ecap_reg >> 35) & 0x1f, 19, "20-bit PASIDs");
    assert_eq!(data[24..], [0; 8], "the rest of the buffer is cleared");
    // A shorter buffer gets what fits, and the full length.
    let mut short = [0u8; 8];
    let mut c = hw_info_cmd(dev.get(), &mut short);
    call(&ctx, IOMMU_GET_HW_INFO, &mut c).unwrap();
    assert_eq!((c.data_len, u32::from_le_bytes(short[..4].try_into().unwrap())), (24, vtd.flags));
}

#[test]
fn hw_info_describes_each_iommu_model() {
    let ctx = ctx();
    let smmu = ctx.bind_device(DeviceInfo::behind(IommuModel::ArmSmmuV3, "smmu", 1)).unwrap();
    let amd = ctx.bind_device(DeviceInfo::behind(IommuModel::AmdVi, "amd", 2)).unwrap();
    let mut data = [0u8; 40];
    let mut c = hw_info_cmd(smmu.get(), &mut data);
    call(&ctx, IOMMU_GET_HW_INFO, &mut c).unwrap();
    assert_eq!((c.data_len, c.out_data_type), (40, IOMMU_HW_INFO_TYPE_ARM_SMMUV3));
    let info = iommu_hw_info_arm_smmuv3::read_from_bytes(&data[..]).unwrap();
    assert_eq!(info.idr[0] & 0b11, 0b11, "stage 1 and stage 2");
    assert_eq!(info.idr[5] & 0b111, 0b101, "48-bit output");
    // Asking for the model's own type works; another is refused.
    let mut c = hw_info_cmd(amd.get(), &mut data);
    c.flags = IOMMU_HW_INFO_FLAG_INPUT_TYPE;
    c.out_data_type = IOMMU_HW_INFO_TYPE_AMD;
    call(&ctx, IOMMU_GET_HW_INFO, &mut c).unwrap();
    assert_eq!((c.data_len, c.out_data_type), (16, IOMMU_HW_INFO_TYPE_AMD));
    c.out_data_type = IOMMU_HW_INFO_TYPE_INTEL_VTD;
    assert_eq!(call(&ctx, IOMMU_GET_HW_INFO, &mut c), Err(Errno::EOPNOTSUPP));
}

// ---- IOMMU_VFIO_IOAS -------------------------------------------------------

fn vfio_ioas(ctx: &Arc<Context>, op: u16, ioas_id: u32) -> Result<u32, Errno> {
    let mut c = iommu_vfio_ioas { size: sz::<iommu_vfio_ioas>(), ioas_id, op, __reserved: 0 };
    call(ctx, IOMMU_VFIO_IOAS, &mut c).map(|()| c.ioas_id)
}

errno_test!(vfio_ioas_reserved_is_eopnotsupp, EOPNOTSUPP, {
    let mut c = iommu_vfio_ioas { size: 12, ioas_id: 0, op: IOMMU_VFIO_IOAS_GET, __reserved: 1 };
    call(&ctx(), IOMMU_VFIO_IOAS, &mut c)
});
errno_test!(vfio_ioas_get_when_unset_is_enodev, ENODEV, vfio_ioas(&ctx(), IOMMU_VFIO_IOAS_GET, 0).map(drop));
errno_test!(vfio_ioas_set_unknown_ioas_is_enoent, ENOENT, vfio_ioas(&ctx(), IOMMU_VFIO_IOAS_SET, 4).map(drop));
errno_test!(vfio_ioas_unknown_op_is_eopnotsupp, EOPNOTSUPP, vfio_ioas(&ctx(), 3, 0).map(drop));
errno_test!(vfio_ioas_get_after_its_ioas_is_destroyed_is_enodev, ENODEV, {
    let ctx = ctx();
    let id = ioas(&ctx);
    vfio_ioas(&ctx, IOMMU_VFIO_IOAS_SET, id).unwrap();
    call(&ctx, IOMMU_DESTROY, &mut iommu_destroy { size: 8, id }).unwrap();
    vfio_ioas(&ctx, IOMMU_VFIO_IOAS_GET, 0).map(drop)
});

#[test]
fn vfio_ioas_set_get_clear() {
    let ctx = ctx();
    let id = ioas(&ctx);
    vfio_ioas(&ctx, IOMMU_VFIO_IOAS_SET, id).unwrap();
    assert_eq!(vfio_ioas(&ctx, IOMMU_VFIO_IOAS_GET, 0), Ok(id));
    vfio_ioas(&ctx, IOMMU_VFIO_IOAS_CLEAR, 0).unwrap();
    assert_eq!(vfio_ioas(&ctx, IOMMU_VFIO_IOAS_GET, 0), Err(Errno::ENODEV));
}

// ---- IOMMU_HWPT_INVALIDATE -------------------------------------------------

fn invalidate(ctx: &Arc<Context>, c: &mut iommu_hwpt_invalidate) -> Result<(), Errno> {
    c.size = sz::<iommu_hwpt_invalidate>();
    call(ctx, IOMMU_HWPT_INVALIDATE, c)
}

errno_test!(invalidate_reserved_is_eopnotsupp, EOPNOTSUPP, {
    invalidate(&ctx(), &mut iommu_hwpt_invalidate { __reserved: 1, ..Default::default() })
});
errno_test!(invalidate_entries_without_a_pointer_is_einval, EINVAL, {
    invalidate(&ctx(), &mut iommu_hwpt_invalidate { entry_num: 1, entry_len: 24, ..Default::default() })
});
errno_test!(invalidate_zero_entry_len_is_einval, EINVAL, {
    invalidate(&ctx(), &mut iommu_hwpt_invalidate { entry_num: 1, data_uptr: 64, ..Default::default() })
});
errno_test!(invalidate_entry_len_above_a_page_is_einval, EINVAL, {
    let mut c = iommu_hwpt_invalidate { entry_num: 1, entry_len: 4097, data_uptr: 64, ..Default::default() };
    invalidate(&ctx(), &mut c)
});
errno_test!(invalidate_too_many_entries_is_einval, EINVAL, {
    let mut c = iommu_hwpt_invalidate { entry_num: (1 << 19) + 1, entry_len: 24, data_uptr: 64, ..Default::default() };
    invalidate(&ctx(), &mut c)
});

#[test]
fn invalidate_of_a_paging_hwpt_is_enoent_and_reports_no_entries() {
    let (ctx, _, dev, _buf) = attached(1);
    let hwpt = ctx.get(dev).unwrap().attached().map(|_| 3).unwrap();
    let mut entry = iommu_hwpt_vtd_s1_invalidate::default();
    let mut c = iommu_hwpt_invalidate {
        hwpt_id: hwpt,
        data_uptr: &mut entry as *mut _ as u64,
        data_type: IOMMU_HWPT_INVALIDATE_DATA_VTD_S1,
        entry_len: 24,
        entry_num: 1,
        ..Default::default()
    };
    assert_eq!(invalidate(&ctx, &mut c), Err(Errno::ENOENT));
    assert_eq!(c.entry_num, 0);
}
