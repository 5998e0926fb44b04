//! The generic rules of iommufd's extensible structs, across every command
//! of Linux 7.3's `iommufd.h`, as `drivers/iommu/iommufd/main.c` applies
//! them before any command runs: a `size` below the command's last
//! mandatory field is `EINVAL`; a longer struct is taken when the bytes
//! past the kernel's struct are zero, `E2BIG` when they are not, and
//! `EFAULT` when they cannot be read; then each command's own check of
//! unknown flags and reserved fields answers as Linux's does.

use std::sync::Arc;

use ioasid_abi::selftest::{IOMMU_TEST_CMD, TEST_CMD_MIN_SIZE};
use ioasid_abi::uapi::*;
use ioasid_abi::{Errno, InProcess, ioctl};
use ioasid_engine::{Context, ContextConfig, DeviceInfo, Limit, MockFlags};

/// `_IO(';', 0x92)` and `0x94`: commands whose handlers may not be in
/// every build; their rows run once the command answers something other
/// than `ENOTTY`.
const IOMMU_IOAS_CHANGE_PROCESS: u32 = io(0x92);
const IOMMU_HW_QUEUE_ALLOC: u32 = io(0x94);

/// One command: its struct's size in 7.3, and `offsetofend` of the field
/// Linux's table names as its last mandatory one.
struct Row {
    name: &'static str,
    request: u32,
    size: u32,
    min_size: u32,
    /// Bodies that must fail each command's own checks, and the errno
    /// Linux gives: (byte offset, little-endian value, errno). Object IDs
    /// stay zero, so a check made after an object lookup cannot be put here.
    rejects: &'static [(usize, u64, Errno)],
    /// Present only in later builds (see above).
    optional: bool,
}

const fn row(name: &'static str, request: u32, size: u32, min_size: u32) -> Row {
    Row { name, request, size, min_size, rejects: &[], optional: false }
}

const EOPNOTSUPP: Errno = Errno::EOPNOTSUPP;

static ROWS: &[Row] = &[
    row("DESTROY", IOMMU_DESTROY, 8, 8),
    Row { rejects: &[(4, 1, EOPNOTSUPP)], ..row("IOAS_ALLOC", IOMMU_IOAS_ALLOC, 12, 12) },
    Row { rejects: &[(12, 1, EOPNOTSUPP)], ..row("IOAS_ALLOW_IOVAS", IOMMU_IOAS_ALLOW_IOVAS, 24, 24) },
    Row { rejects: &[(4, 1 << 3, EOPNOTSUPP)], ..row("IOAS_COPY", IOMMU_IOAS_COPY, 40, 40) },
    Row { rejects: &[(12, 1, EOPNOTSUPP)], ..row("IOAS_IOVA_RANGES", IOMMU_IOAS_IOVA_RANGES, 32, 32) },
    Row { rejects: &[(4, 1 << 3, EOPNOTSUPP), (12, 1, EOPNOTSUPP)], ..row("IOAS_MAP", IOMMU_IOAS_MAP, 40, 40) },
    row("IOAS_UNMAP", IOMMU_IOAS_UNMAP, 24, 24),
    Row { rejects: &[(10, 1, EOPNOTSUPP), (4, 99, EOPNOTSUPP)], ..row("OPTION", IOMMU_OPTION, 24, 24) },
    Row { rejects: &[(10, 1, EOPNOTSUPP), (8, 3, EOPNOTSUPP)], ..row("VFIO_IOAS", IOMMU_VFIO_IOAS, 12, 12) },
    Row {
        // __reserved first; then data_type NONE with a length is EINVAL.
        rejects: &[(20, 1, EOPNOTSUPP), (28, 8, Errno::EINVAL)],
        ..row("HWPT_ALLOC", IOMMU_HWPT_ALLOC, 48, 24)
    },
    Row {
        rejects: &[(4, 1 << 1, EOPNOTSUPP), (29, 1, EOPNOTSUPP), (31, 1, EOPNOTSUPP)],
        ..row("GET_HW_INFO", IOMMU_GET_HW_INFO, 40, 32)
    },
    // Linux checks only the flags of SET_DIRTY_TRACKING, not __reserved.
    Row {
        rejects: &[(4, 1 << 1, EOPNOTSUPP)],
        ..row("HWPT_SET_DIRTY_TRACKING", IOMMU_HWPT_SET_DIRTY_TRACKING, 16, 16)
    },
    Row {
        rejects: &[(8, 1 << 1, EOPNOTSUPP), (12, 1, EOPNOTSUPP)],
        ..row("HWPT_GET_DIRTY_BITMAP", IOMMU_HWPT_GET_DIRTY_BITMAP, 48, 48)
    },
    Row { rejects: &[(28, 1, EOPNOTSUPP)], ..row("HWPT_INVALIDATE", IOMMU_HWPT_INVALIDATE, 32, 32) },
    Row { rejects: &[(4, 1, EOPNOTSUPP)], ..row("FAULT_QUEUE_ALLOC", IOMMU_FAULT_QUEUE_ALLOC, 16, 16) },
    Row { rejects: &[(4, 1 << 3, EOPNOTSUPP)], ..row("IOAS_MAP_FILE", IOMMU_IOAS_MAP_FILE, 40, 40) },
    // type DEFAULT is never a vIOMMU's; Linux has no check of __reserved.
    Row { rejects: &[(4, 1, EOPNOTSUPP), (8, 0, EOPNOTSUPP)], ..row("VIOMMU_ALLOC", IOMMU_VIOMMU_ALLOC, 40, 24) },
    row("VDEVICE_ALLOC", IOMMU_VDEVICE_ALLOC, 24, 24),
    Row {
        rejects: &[(4, 1, EOPNOTSUPP)],
        optional: true,
        ..row("IOAS_CHANGE_PROCESS", IOMMU_IOAS_CHANGE_PROCESS, 8, 8)
    },
    Row {
        // type DEFAULT (zero) is never a queue's, then the depth.
        rejects: &[(4, 1, EOPNOTSUPP), (28, 1, EOPNOTSUPP), (12, 0, EOPNOTSUPP)],
        ..row("VEVENTQ_ALLOC", IOMMU_VEVENTQ_ALLOC, 32, 28)
    },
    Row {
        rejects: &[(4, 1, EOPNOTSUPP), (12, 0, EOPNOTSUPP)],
        optional: true,
        ..row("HW_QUEUE_ALLOC", IOMMU_HW_QUEUE_ALLOC, 40, 40)
    },
    Row {
        rejects: &[(4, 1, EOPNOTSUPP), (12, 1, EOPNOTSUPP)],
        ..row("IOAS_NOIOMMU_GET_PA", IOMMU_IOAS_NOIOMMU_GET_PA, 40, 40)
    },
    row("TEST_CMD", IOMMU_TEST_CMD, 72, TEST_CMD_MIN_SIZE as u32),
];

/// Two pages: the first read-write, the second inaccessible, so a struct
/// placed at the end of the first has a tail that cannot be read.
struct Arena {
    base: *mut u8,
}

const PAGE: usize = 4096;

impl Arena {
    fn new() -> Arena {
        // SAFETY: a fresh anonymous mapping, owned by the arena.
        let base = unsafe {
            rustix::mm::mmap_anonymous(
                std::ptr::null_mut(),
                2 * PAGE,
                rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
                rustix::mm::MapFlags::PRIVATE,
            )
        }
        .expect("mmap");
        // SAFETY: the second page of the mapping made above.
        unsafe { rustix::mm::mprotect(base.cast::<u8>().add(PAGE).cast(), PAGE, rustix::mm::MprotectFlags::empty()) }
            .expect("mprotect");
        Arena { base: base.cast() }
    }

    /// Writes `bytes` so that they end `gap` bytes before the guard page;
    /// returns their address.
    fn place(&self, bytes: &[u8], gap: usize) -> u64 {
        let at = PAGE - gap - bytes.len();
        // SAFETY: within the first, writable page; zero it first so
        // nothing of an earlier placement lingers.
        unsafe {
            std::ptr::write_bytes(self.base, 0, PAGE);
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.base.add(at), bytes.len());
        }
        self.base as u64 + at as u64
    }
}

impl Drop for Arena {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, no longer referenced.
        unsafe { rustix::mm::munmap(self.base.cast(), 2 * PAGE) }.expect("munmap");
    }
}

/// A context with one IOAS and one mock device, so commands have objects
/// other than ID 0 around (ID 0 is never an object).
fn ctx() -> Arc<Context> {
    let ctx = Arc::new(Context::with_config(ContextConfig::isolated(Limit::Pages(1 << 16))));
    ctx.ioas_alloc().unwrap();
    ctx.bind_device(DeviceInfo::mock(1, MockFlags::default())).unwrap();
    ctx
}

/// A body of `len` bytes whose size field says `size`, zero elsewhere
/// except `set` (offset, little-endian value of up to 8 bytes).
fn body(len: usize, size: u32, set: Option<(usize, u64)>) -> Vec<u8> {
    let mut b = vec![0u8; len];
    b[..4].copy_from_slice(&size.to_ne_bytes());
    if let Some((off, v)) = set {
        let n = (len - off).min(8);
        b[off..off + n].copy_from_slice(&v.to_le_bytes()[..n]);
    }
    b
}

fn run(ctx: &Arc<Context>, arena: &Arena, r: &Row, bytes: &[u8], gap: usize) -> Result<i32, Errno> {
    let at = arena.place(bytes, gap);
    ioctl(ctx, &InProcess, r.request, at)
}

/// Whether an optional command is in this build.
fn present(r: &Row) -> bool {
    let ctx = ctx();
    let arena = Arena::new();
    !r.optional || run(&ctx, &arena, r, &body(8, 0, None), 0) != Err(Errno::ENOTTY)
}

#[test]
fn every_command_is_in_the_table_or_answered_enotty() {
    let ctx = ctx();
    let arena = Arena::new();
    for nr in 0x80..=0xa0u32 {
        let request = io(nr);
        let known = ROWS.iter().any(|r| r.request == request);
        let got = ioctl(&ctx, &InProcess, request, arena.place(&body(64, 64, None), 0));
        if !known {
            assert_eq!(got, Err(Errno::ENOTTY), "command {nr:#x} is not in 7.3's iommufd.h");
        }
    }
}

#[test]
fn a_size_below_the_last_mandatory_field_is_einval() {
    let arena = Arena::new();
    for r in ROWS.iter().filter(|r| present(r)) {
        let ctx = ctx();
        for size in [0, 4, r.min_size - 1] {
            // Whatever else the struct holds: the size is checked first.
            let mut b = body(r.size as usize, size, None);
            b[4..].fill(0xff);
            assert_eq!(run(&ctx, &arena, r, &b, 0), Err(Errno::EINVAL), "{} with size {size}", r.name);
        }
    }
}

#[test]
fn a_longer_struct_is_e2big_unless_its_tail_is_zero() {
    let arena = Arena::new();
    for r in ROWS.iter().filter(|r| present(r)) {
        let full = r.size as usize;
        for extra in [1, 8, 200] {
            let ctx = ctx();
            let mut b = body(full + extra, (full + extra) as u32, None);
            *b.last_mut().unwrap() = 1;
            assert_eq!(run(&ctx, &arena, r, &b, 0), Err(Errno::E2BIG), "{} with {extra} bytes more", r.name);
        }
    }
}

/// A struct the kernel reads as zero answers the same whatever the size
/// the caller gives, from `min_size` up, as long as the rest is zero.
#[test]
fn a_shorter_or_longer_struct_with_zeros_is_taken_as_the_same_command() {
    let arena = Arena::new();
    for r in ROWS.iter().filter(|r| present(r)) {
        let full = r.size as usize;
        let want = run(&ctx(), &arena, r, &body(full, full as u32, None), 0);
        assert_ne!(want, Err(Errno::E2BIG), "{}", r.name);
        for len in [r.min_size as usize, full + 8, PAGE - 64] {
            let got = run(&ctx(), &arena, r, &body(len, len as u32, None), 0);
            assert_eq!(got, want, "{} with size {len}", r.name);
        }
    }
}

#[test]
fn a_longer_struct_that_cannot_be_read_is_efault() {
    let arena = Arena::new();
    for r in ROWS.iter().filter(|r| present(r)) {
        let ctx = ctx();
        let full = r.size as usize;
        // The size claims 8 bytes past the readable page.
        let b = body(full, (full + 8) as u32, None);
        assert_eq!(run(&ctx, &arena, r, &b, 0), Err(Errno::EFAULT), "{} with an unreadable tail", r.name);
        // Nor can the size itself be read.
        let at = arena.base as u64 + PAGE as u64;
        assert_eq!(ioctl(&ctx, &InProcess, r.request, at), Err(Errno::EFAULT), "{} at a bad address", r.name);
    }
}

#[test]
fn unknown_flags_and_reserved_fields_get_linux_errno() {
    let arena = Arena::new();
    for r in ROWS.iter().filter(|r| present(r)) {
        for &(off, v, errno) in r.rejects {
            let ctx = ctx();
            let b = body(r.size as usize, r.size, Some((off, v)));
            assert_eq!(run(&ctx, &arena, r, &b, 0), Err(errno), "{}: {v:#x} at offset {off}", r.name);
            // Past a longer struct's zero tail too.
            let mut b = body(r.size as usize + 16, r.size + 16, Some((off, v)));
            b[r.size as usize..].fill(0);
            assert_eq!(run(&ctx, &arena, r, &b, 0), Err(errno), "{}: {v:#x} at offset {off}, longer", r.name);
        }
    }
}

#[test]
fn a_struct_longer_than_the_kernels_still_gets_its_answer() {
    // IOAS_ALLOC with 4 KiB of zeros after it: the ID lands where it
    // belongs, and nothing is written past the kernel's struct.
    let ctx = Arc::new(Context::new());
    let mut buf = vec![0u8; 12 + 4084];
    let len = buf.len() as u32;
    buf[..4].copy_from_slice(&len.to_ne_bytes());
    ioctl(&ctx, &InProcess, IOMMU_IOAS_ALLOC, buf.as_mut_ptr() as u64).unwrap();
    let id = u32::from_ne_bytes(buf[8..12].try_into().unwrap());
    assert!(ctx.get(ioasid_engine::IoasId::new(id)).is_ok());
    assert!(buf[12..].iter().all(|&b| b == 0));
}

/// Reserved fields Linux leaves unchecked must not be refused either: a
/// program that fills them works on Linux, so it works here.
#[test]
fn reserved_fields_linux_ignores_are_ignored() {
    let arena = Arena::new();
    let ctx = ctx();
    let find = |name| ROWS.iter().find(|r| r.name == name).unwrap();
    // VIOMMU_ALLOC's __reserved (offset 28), with a type: the device
    // lookup is what fails.
    let r = find("VIOMMU_ALLOC");
    let mut b = body(40, 40, Some((28, 1)));
    b[8..12].copy_from_slice(&IOMMU_VIOMMU_TYPE_ARM_SMMUV3.to_ne_bytes());
    assert_eq!(run(&ctx, &arena, r, &b, 0), Err(Errno::ENOENT));
    // SET_DIRTY_TRACKING's __reserved (offset 12): the HWPT lookup fails.
    let r = find("HWPT_SET_DIRTY_TRACKING");
    assert_eq!(run(&ctx, &arena, r, &body(16, 16, Some((12, 1))), 0), Err(Errno::ENOENT));
}
