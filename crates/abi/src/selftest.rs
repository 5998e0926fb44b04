//! `IOMMU_TEST_CMD`: the commands Linux's iommufd selftests drive its mock
//! IOMMU with (`drivers/iommu/iommufd/iommufd_test.h`), answered by the
//! engine's emulated devices behind the mock page-table format.

use core::mem::size_of;
use std::sync::{Arc, Mutex, OnceLock, Weak};

use ioasid_engine::device::MockFlags;
use ioasid_engine::fault::{Group, LAST_PAGE, PASID_VALID, PageRequest};
use ioasid_engine::ioas::Owner;
use ioasid_engine::model::selftest::MockNested;
use ioasid_engine::{
    Access, AccessId, AccessOps, Context, DeviceId, DeviceInfo, IoasId, IovaRange, Object, ObjectId, PAGE_SIZE, PtId,
    SelftestId, memory, pages,
};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::errno::Errno;
use crate::files::File;
use crate::uapi::io;
use crate::ucmd::Ucmd;
use crate::user::new_fd;

pub const IOMMU_TEST_CMD: u32 = io(0x80 + 32);

// The mock IOMMU's own structs and numbers are its model's, in the engine.
pub use ioasid_engine::model::selftest::{
    HWPT_SELFTEST_MIN_LEN, IOMMU_HW_INFO_SELFTEST_REGVAL, IOMMU_HW_INFO_TYPE_SELFTEST, IOMMU_HWPT_DATA_SELFTEST,
    IOMMU_HWPT_INVALIDATE_DATA_SELFTEST, IOMMU_TEST_INVALIDATE_FLAG_ALL, IOMMU_VIOMMU_INVALIDATE_DATA_SELFTEST,
    MOCK_DEV_CACHE_ID_MAX, MOCK_IOMMUPT_DEFAULT, MOCK_IOMMUPT_HUGE, MOCK_NESTED_DOMAIN_IOTLB_ID_MAX,
    VIOMMU_SELFTEST_MIN_LEN, iommu_hwpt_invalidate_selftest, iommu_hwpt_selftest, iommu_test_hw_info,
    iommu_viommu_invalidate_selftest, iommu_viommu_selftest,
};

pub const IOMMU_TEST_OP_ADD_RESERVED: u32 = 1;
pub const IOMMU_TEST_OP_MOCK_DOMAIN: u32 = 2;
pub const IOMMU_TEST_OP_MD_CHECK_MAP: u32 = 3;
pub const IOMMU_TEST_OP_MD_CHECK_REFS: u32 = 4;
pub const IOMMU_TEST_OP_CREATE_ACCESS: u32 = 5;
pub const IOMMU_TEST_OP_DESTROY_ACCESS_PAGES: u32 = 6;
pub const IOMMU_TEST_OP_ACCESS_PAGES: u32 = 7;
pub const IOMMU_TEST_OP_ACCESS_RW: u32 = 8;
pub const IOMMU_TEST_OP_SET_TEMP_MEMORY_LIMIT: u32 = 9;
pub const IOMMU_TEST_OP_MOCK_DOMAIN_REPLACE: u32 = 10;
pub const IOMMU_TEST_OP_ACCESS_REPLACE_IOAS: u32 = 11;
pub const IOMMU_TEST_OP_MOCK_DOMAIN_FLAGS: u32 = 12;
pub const IOMMU_TEST_OP_DIRTY: u32 = 13;
pub const IOMMU_TEST_OP_MD_CHECK_IOTLB: u32 = 14;
pub const IOMMU_TEST_OP_TRIGGER_IOPF: u32 = 15;
pub const IOMMU_TEST_OP_DEV_CHECK_CACHE: u32 = 16;
pub const IOMMU_TEST_OP_TRIGGER_VEVENT: u32 = 17;
pub const IOMMU_TEST_OP_PASID_ATTACH: u32 = 18;
pub const IOMMU_TEST_OP_PASID_REPLACE: u32 = 19;
pub const IOMMU_TEST_OP_PASID_DETACH: u32 = 20;
pub const IOMMU_TEST_OP_PASID_CHECK_HWPT: u32 = 21;

pub const MOCK_FLAGS_ACCESS_WRITE: u32 = 1 << 0;
pub const MOCK_FLAGS_ACCESS_SYZ: u32 = 1 << 16;
pub const MOCK_ACCESS_RW_WRITE: u32 = 1 << 0;
pub const MOCK_ACCESS_RW_SLOW_PATH: u32 = 1 << 2;
pub const MOCK_FLAGS_ACCESS_CREATE_NEEDS_PIN_PAGES: u32 = 1 << 0;

pub const MOCK_FLAGS_DEVICE_NO_DIRTY: u32 = 1 << 0;
pub const MOCK_FLAGS_DEVICE_HUGE_IOVA: u32 = 1 << 1;
pub const MOCK_FLAGS_DEVICE_PASID: u32 = 1 << 2;

pub const IOMMU_TEST_IOTLB_DEFAULT: u32 = 0xbad_beef;
pub const MOCK_IO_PAGE_SIZE: u64 = PAGE_SIZE / 2;
pub const IOMMU_TEST_DEV_CACHE_DEFAULT: u32 = ioasid_engine::device::MOCK_DEV_CACHE_DEFAULT;

/// `struct iommu_test_cmd`: a header, a union of per-op arguments, `last`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct iommu_test_cmd {
    pub size: u32,
    pub op: u32,
    pub id: u32,
    pub __reserved: u32,
    pub union: [u64; 6],
    pub last: u32,
    pub __pad: u32,
}
const _: () = assert!(size_of::<iommu_test_cmd>() == 72);
pub const TEST_CMD_MIN_SIZE: usize = core::mem::offset_of!(iommu_test_cmd, last) + 4;

macro_rules! union_arm {
    ($name:ident { $($field:ident : $ty:ty),* $(,)? }) => {
        #[repr(C)]
        #[derive(Debug, Default, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
        pub struct $name { $(pub $field: $ty),* }
        const _: () = assert!(size_of::<$name>() <= 48);
    };
}

union_arm!(AddReserved { start: u64, length: u64 });
union_arm!(MockDomain { out_stdev_id: u32, out_hwpt_id: u32, out_idev_id: u32, dev_flags: u32 });
union_arm!(MockDomainReplace { pt_id: u32 });
union_arm!(CheckMap { iova: u64, length: u64, uptr: u64 });
union_arm!(CheckRefs { length: u64, uptr: u64, refs: u32, __pad: u32 });
union_arm!(CreateAccess { out_access_fd: u32, flags: u32 });
union_arm!(DestroyAccessPages { access_pages_id: u32 });
union_arm!(AccessPages { flags: u32, out_access_pages_id: u32, iova: u64, length: u64, uptr: u64 });
union_arm!(AccessRw { iova: u64, length: u64, uptr: u64, flags: u32, __pad: u32 });
union_arm!(AccessReplaceIoas { ioas_id: u32 });
union_arm!(CheckIotlb { id: u32, iotlb: u32 });
union_arm!(CheckDevCache { id: u32, cache: u32 });
union_arm!(TriggerVevent { dev_id: u32 });
union_arm!(PasidAttach { pasid: u32, pt_id: u32 });
union_arm!(PasidCheck { pasid: u32, hwpt_id: u32 });
union_arm!(TriggerIopf { dev_id: u32, pasid: u32, grpid: u32, perm: u32, addr: u64 });
union_arm!(Dirty { flags: u32, __pad: u32, iova: u64, length: u64, page_size: u64, uptr: u64, out_nr_dirty: u64 });

impl iommu_test_cmd {
    fn arm<T: FromBytes>(&self) -> T {
        T::read_from_prefix(self.union.as_bytes()).expect("arms fit the union").0
    }

    fn set_arm<T: IntoBytes + Immutable>(&mut self, v: &T) {
        self.union.as_mut_bytes()[..size_of::<T>()].copy_from_slice(v.as_bytes());
    }
}

type Res = Result<(), Errno>;

pub fn run(u: &Ucmd, mut c: iommu_test_cmd) -> Res {
    match c.op {
        IOMMU_TEST_OP_ADD_RESERVED => {
            let a: AddReserved = c.arm();
            let range = IovaRange::from_len(a.start, a.length)?;
            Ok(u.ctx.get(IoasId::new(c.id))?.reserve(&[range], Owner::User)?)
        }
        IOMMU_TEST_OP_MOCK_DOMAIN | IOMMU_TEST_OP_MOCK_DOMAIN_FLAGS => {
            let mut a: MockDomain = c.arm();
            let flags = if c.op == IOMMU_TEST_OP_MOCK_DOMAIN_FLAGS { a.dev_flags } else { 0 };
            let known = MOCK_FLAGS_DEVICE_NO_DIRTY | MOCK_FLAGS_DEVICE_HUGE_IOVA | MOCK_FLAGS_DEVICE_PASID;
            if flags & !known != 0 {
                return Err(Errno::EINVAL);
            }
            let info = DeviceInfo::mock(
                0,
                MockFlags {
                    no_dirty: flags & MOCK_FLAGS_DEVICE_NO_DIRTY != 0,
                    huge_iova: flags & MOCK_FLAGS_DEVICE_HUGE_IOVA != 0,
                    pasid: flags & MOCK_FLAGS_DEVICE_PASID != 0,
                },
            );
            check_vdevice(u, None, c.id)?;
            let (stdev, hwpt, idev) = u.ctx.mock_domain(PtId::new(c.id), info)?;
            (a.out_stdev_id, a.out_hwpt_id, a.out_idev_id) = (stdev.get(), hwpt.get(), idev.get());
            c.set_arm(&a);
            u.respond_created(&c, stdev.get())
        }
        IOMMU_TEST_OP_MOCK_DOMAIN_REPLACE => {
            let mut a: MockDomainReplace = c.arm();
            let dev = u.ctx.get(selftest_device(u, c.id)?)?;
            check_vdevice(u, Some(&dev), a.pt_id)?;
            a.pt_id = u.ctx.mock_domain_replace(SelftestId::new(c.id), PtId::new(a.pt_id))?.get();
            c.set_arm(&a);
            u.respond(&c)
        }
        IOMMU_TEST_OP_CREATE_ACCESS => create_access(u, c),
        IOMMU_TEST_OP_ACCESS_PAGES => access_pages(u, c),
        IOMMU_TEST_OP_DESTROY_ACCESS_PAGES => {
            let a: DestroyAccessPages = c.arm();
            access_file(u, c.id)?.driver.destroy_item(a.access_pages_id)
        }
        IOMMU_TEST_OP_ACCESS_RW => access_rw(u, c.id, c.arm()),
        IOMMU_TEST_OP_ACCESS_REPLACE_IOAS => {
            let a: AccessReplaceIoas = c.arm();
            let f = access_file(u, c.id)?;
            Ok(f.ctx.access_replace(f.id, IoasId::new(a.ioas_id))?)
        }
        IOMMU_TEST_OP_DIRTY => dirty(u, c),
        IOMMU_TEST_OP_MD_CHECK_IOTLB => {
            let a: CheckIotlb = c.arm();
            let nested = match u.ctx.object(ObjectId::new(c.id))? {
                Object::HwptNested(n) => n,
                _ => return Err(Errno::ENOENT),
            };
            let Some(mock) = nested.data().downcast::<MockNested>() else {
                return Err(Errno::EINVAL);
            };
            match mock.iotlb_entry(a.id) {
                Some(v) if v == a.iotlb => Ok(()),
                _ => Err(Errno::EINVAL),
            }
        }
        IOMMU_TEST_OP_DEV_CHECK_CACHE => {
            let a: CheckDevCache = c.arm();
            let dev = u.ctx.get(DeviceId::new(c.id))?;
            let cache = dev.mock_cache().ok_or(Errno::EINVAL)?;
            match cache.get(a.id as usize) {
                Some(&v) if v == a.cache => Ok(()),
                _ => Err(Errno::EINVAL),
            }
        }
        IOMMU_TEST_OP_PASID_ATTACH | IOMMU_TEST_OP_PASID_REPLACE => pasid_attach(u, c),
        IOMMU_TEST_OP_PASID_DETACH => {
            let a: PasidAttach = c.arm();
            let dev = selftest_device(u, c.id)?;
            // Detaching what is not attached is no failure.
            let _ = u.ctx.detach_pasid(dev, a.pasid);
            Ok(())
        }
        IOMMU_TEST_OP_PASID_CHECK_HWPT => pasid_check_hwpt(u, c.id, c.arm()),
        IOMMU_TEST_OP_TRIGGER_IOPF => trigger_iopf(u, c.arm()),
        IOMMU_TEST_OP_TRIGGER_VEVENT => trigger_vevent(u, c.arm()),
        IOMMU_TEST_OP_MD_CHECK_MAP => check_map(u, c.id, c.arm()),
        IOMMU_TEST_OP_MD_CHECK_REFS => check_refs(u, c.arm()),
        // Linux uses it to size an internal batch buffer; the engine has none.
        IOMMU_TEST_OP_SET_TEMP_MEMORY_LIMIT => Ok(()),
        _ => Err(Errno::EOPNOTSUPP),
    }
}

/// The device bound under selftest object `stdev_id`.
fn selftest_device(u: &Ucmd, stdev_id: u32) -> Result<DeviceId, Errno> {
    u.ctx.get(SelftestId::new(stdev_id))?.dev_id().ok_or(Errno::ENOENT)
}

/// The mock attaches a device to a nested HWPT of a vIOMMU only once the
/// device has a vDEVICE there (`mock_domain_nop_attach`): `ENOENT` before.
fn check_vdevice(u: &Ucmd, dev: Option<&ioasid_engine::Device>, pt_id: u32) -> Res {
    if let Ok(Object::HwptNested(n)) = u.ctx.object(ObjectId::new(pt_id))
        && let Some(viommu) = n.viommu()
        && dev.and_then(|d| viommu.virt_id_of(d)).is_none()
    {
        return Err(Errno::ENOENT);
    }
    Ok(())
}

/// The mock vIOMMU reporting an event of a device attached to one of its
/// nested HWPTs: the device's virtual ID, on the selftest vEVENTQ.
fn trigger_vevent(u: &Ucmd, a: TriggerVevent) -> Res {
    let dev = u.ctx.get(DeviceId::new(a.dev_id))?;
    let Some(ioasid_engine::Hwpt::Nested(n)) = dev.attached() else { return Err(Errno::ENOENT) };
    let viommu = n.viommu().ok_or(Errno::ENOENT)?;
    let virt_id = viommu.virt_id_of(&dev).filter(|&v| v != 0).ok_or(Errno::ENOENT)?;
    let queue = viommu.veventq(crate::uapi::IOMMU_VEVENTQ_TYPE_SELFTEST).ok_or(Errno::EOPNOTSUPP)?;
    queue.report(&(virt_id as u32).to_le_bytes());
    Ok(())
}

/// `PASID_ATTACH` and `PASID_REPLACE` of a mock device: its PASID to a HWPT.
fn pasid_attach(u: &Ucmd, mut c: iommu_test_cmd) -> Res {
    let mut a: PasidAttach = c.arm();
    let dev = selftest_device(u, c.id)?;
    // A PASID takes a HWPT, never an IOAS's automatic one.
    if !matches!(u.ctx.object(ObjectId::new(a.pt_id))?, Object::HwptPaging(_) | Object::HwptNested(_)) {
        return Err(Errno::EINVAL);
    }
    if c.op == IOMMU_TEST_OP_PASID_REPLACE {
        a.pt_id = u.ctx.replace_pasid(dev, a.pasid, PtId::new(a.pt_id))?.get();
        c.set_arm(&a);
        return u.respond(&c);
    }
    if u.ctx.get(dev)?.attached_at(Some(a.pasid)).is_some() {
        return Err(Errno::EBUSY);
    }
    a.pt_id = u.ctx.attach_pasid(dev, a.pasid, PtId::new(a.pt_id))?.get();
    c.set_arm(&a);
    u.respond(&c).inspect_err(|_| {
        let _ = u.ctx.detach_pasid(dev, a.pasid);
    })
}

/// `PASID_CHECK_HWPT`: the PASID is attached to `hwpt_id`, or (0) to nothing.
fn pasid_check_hwpt(u: &Ucmd, stdev_id: u32, a: PasidCheck) -> Res {
    let dev = u.ctx.get(selftest_device(u, stdev_id)?)?;
    let attached = dev.attached_at(Some(a.pasid));
    if a.hwpt_id == 0 {
        return if attached.is_some() { Err(Errno::EINVAL) } else { Ok(()) };
    }
    let hwpt = match u.ctx.object(ObjectId::new(a.hwpt_id))? {
        Object::HwptPaging(h) => ioasid_engine::Hwpt::Paging(h),
        Object::HwptNested(n) => ioasid_engine::Hwpt::Nested(n),
        _ => return Err(Errno::EINVAL),
    };
    match attached {
        Some(h) if h.is_same(&hwpt) => Ok(()),
        _ => Err(Errno::EINVAL),
    }
}

/// A paging HWPT of the mock IOMMU (Linux's `get_md_pagetable`).
fn mock_hwpt(u: &Ucmd, hwpt_id: u32) -> Result<Arc<ioasid_engine::HwptPaging>, Errno> {
    let hwpt = match u.ctx.object(ObjectId::new(hwpt_id))? {
        Object::HwptPaging(h) => h,
        _ => return Err(Errno::ENOENT),
    };
    if !hwpt.domain().format().is_mock() {
        return Err(Errno::EINVAL);
    }
    Ok(hwpt)
}

/// Marks dirty, as device writes would, the IO pages whose bits are set in
/// the caller's bitmap; reports how many were mapped.
fn dirty(u: &Ucmd, mut c: iommu_test_cmd) -> Res {
    let mut a: Dirty = c.arm();
    if a.page_size == 0 || a.length == 0 || a.iova % a.page_size != 0 || a.length % a.page_size != 0 || a.uptr == 0 {
        return Err(Errno::EINVAL);
    }
    let max = a.length / a.page_size;
    if max > (16 << 20) * 8 {
        return Err(Errno::EOVERFLOW);
    }
    let hwpt = mock_hwpt(u, c.id)?;
    if !hwpt.domain().dirty_tracking() {
        return Err(Errno::EINVAL);
    }
    let mut bits = vec![0u8; max.div_ceil(8) as usize];
    u.mem.read(a.uptr, &mut bits)?;
    let count = (0..max)
        .filter(|&i| bits[(i / 8) as usize] & (1 << (i % 8)) != 0)
        .filter(|&i| hwpt.domain().mark_dirty(a.iova + i * a.page_size))
        .count();
    a.out_nr_dirty = count as u64;
    c.set_arm(&a);
    u.respond(&c)
}

/// Every mock IO page of `[iova, iova + length)` leads to the matching byte
/// of `uptr`.
fn check_map(u: &Ucmd, hwpt_id: u32, a: CheckMap) -> Res {
    if a.iova % MOCK_IO_PAGE_SIZE != 0
        || a.length % MOCK_IO_PAGE_SIZE != 0
        || a.uptr % MOCK_IO_PAGE_SIZE != 0
        || a.uptr.checked_add(a.length).is_none()
    {
        return Err(Errno::EINVAL);
    }
    let hwpt = mock_hwpt(u, hwpt_id)?;
    let mut pages = SamePage::new(u.mem.pid());
    let mut off = 0;
    while off < a.length {
        u.mem.mapped(a.uptr + off, 1)?;
        let host = hwpt.domain().lookup(a.iova + off).ok_or(Errno::EINVAL)?;
        if !pages.same_byte(host, a.uptr + off)? {
            return Err(Errno::EINVAL);
        }
        off += MOCK_IO_PAGE_SIZE;
    }
    Ok(())
}

/// Whether a host address and a caller's address reach the same byte of
/// the same page, as Linux's mock compares physical pages: the caller may
/// pass its own mapping of a file the engine maps elsewhere, and a daemon's
/// caller is another process. Mappings are read only once addresses
/// differ, and once per command.
struct SamePage {
    /// The caller, when it is another process.
    pid: Option<i32>,
    /// Our mappings and the caller's.
    maps: Option<(memory::PageMap, Option<memory::PageMap>)>,
}

impl SamePage {
    fn new(pid: Option<i32>) -> Self {
        SamePage { pid, maps: None }
    }

    fn same_byte(&mut self, host: u64, theirs: u64) -> Result<bool, Errno> {
        let Some(pid) = self.pid else {
            if host == theirs {
                return Ok(true);
            }
            if self.maps.is_none() {
                self.maps = Some((memory::PageMap::of_self()?, None));
            }
            return Ok(self.maps.as_ref().is_some_and(|(m, _)| m.same_byte(host, theirs)));
        };
        if pages::origin(host) == Some((pid, theirs)) {
            return Ok(true);
        }
        if self.maps.is_none() {
            self.maps = Some((memory::PageMap::of_self()?, Some(memory::PageMap::of(pid)?)));
        }
        let Some((ours, Some(other))) = &self.maps else { return Ok(false) };
        Ok(ours.object_at(host).is_some_and(|o| other.object_at(theirs) == Some(o)))
    }
}

/// Every CPU page of `[uptr, uptr + length)` is pinned exactly `refs` times.
fn check_refs(u: &Ucmd, a: CheckRefs) -> Res {
    if a.length % PAGE_SIZE != 0 || a.uptr % PAGE_SIZE != 0 || a.uptr.checked_add(a.length).is_none() {
        return Err(Errno::EINVAL);
    }
    // Pins of a file's pages count too when `uptr` is the program's own
    // mapping of a file mapped with MAP_FILE, as Linux counts a page's pins.
    let pid = u.mem.pid();
    let ours = memory::PageMap::of_self()?;
    let theirs = match pid {
        Some(pid) => Some(memory::PageMap::of(pid)?),
        None => None,
    };
    let mut off = 0;
    while off < a.length {
        u.mem.mapped(a.uptr + off, 1)?;
        let at = a.uptr + off;
        let files = pages::file_pin_count_in(theirs.as_ref().unwrap_or(&ours), &ours, at);
        if pages::pin_count_in(pid, at) + files != a.refs {
            return Err(Errno::EIO);
        }
        off += PAGE_SIZE;
    }
    Ok(())
}

/// The largest buffer a test access may pin or copy at once, as Linux limits it.
const ACCESS_MAX: u64 = 16 << 20;

/// The mock driver behind a test access: a list of pinned ranges ("items")
/// that it unpins when told the IOAS is unmapping them.
#[derive(Default)]
pub struct MockAccessDriver {
    access: OnceLock<Weak<Access>>,
    items: Mutex<(u32, Vec<Item>)>,
}

struct Item {
    id: u32,
    iova: u64,
    len: u64,
}

impl MockAccessDriver {
    fn access(&self) -> Option<Arc<Access>> {
        self.access.get().and_then(Weak::upgrade)
    }

    fn destroy_item(&self, id: u32) -> Result<(), Errno> {
        let mut items = self.items.lock().unwrap_or_else(|e| e.into_inner());
        let i = items.1.iter().position(|it| it.id == id).ok_or(Errno::ENOENT)?;
        let it = items.1.remove(i);
        if let Some(access) = self.access() {
            access.unpin_pages(it.iova, it.len);
        }
        Ok(())
    }
}

impl AccessOps for MockAccessDriver {
    fn unmap(&self, iova: u64, len: u64) {
        let last = iova.saturating_add(len - 1);
        let mut items = self.items.lock().unwrap_or_else(|e| e.into_inner());
        let access = self.access();
        items.1.retain(|it| {
            let overlaps = iova <= it.iova + (it.len - 1) && it.iova <= last;
            if overlaps && let Some(a) = &access {
                a.unpin_pages(it.iova, it.len);
            }
            !overlaps
        });
    }
}

/// What an access fd refers to; closing the fd destroys the access.
pub struct AccessFile {
    ctx: Arc<Context>,
    id: AccessId,
    driver: Arc<MockAccessDriver>,
    access: Arc<Access>,
}

impl Drop for AccessFile {
    fn drop(&mut self) {
        self.driver.unmap(0, u64::MAX);
        self.ctx.access_destroy(self.id);
    }
}

fn access_file(u: &Ucmd, fd: u32) -> Result<Arc<AccessFile>, Errno> {
    match u.fds()?.file(fd as i32) {
        Some(File::TestAccess(f)) => Ok(f),
        _ => Err(Errno::EBADFD),
    }
}

fn create_access(u: &Ucmd, mut c: iommu_test_cmd) -> Res {
    let mut a: CreateAccess = c.arm();
    if a.flags & !MOCK_FLAGS_ACCESS_CREATE_NEEDS_PIN_PAGES != 0 {
        return Err(Errno::EOPNOTSUPP);
    }
    let fds = u.fds()?;
    let fd = new_fd(c"ioasid:[iommufd_test_staccess]")?;
    let driver = Arc::new(MockAccessDriver::default());
    let needs_pin = a.flags & MOCK_FLAGS_ACCESS_CREATE_NEEDS_PIN_PAGES != 0;
    let (id, access) = u.ctx.access_create(IoasId::new(c.id), driver.clone(), needs_pin)?;
    driver.access.set(Arc::downgrade(&access)).map_err(|_| Errno::EINVAL)?;
    let file = Arc::new(AccessFile { ctx: u.ctx.clone(), id, driver, access });
    // On failure `file` drops and destroys the access; `fd` closes.
    fds.install(File::TestAccess(file), fd, &mut |n| {
        a.out_access_fd = n as u32;
        c.set_arm(&a);
        u.respond(&c)
    })
}

fn access_pages(u: &Ucmd, mut c: iommu_test_cmd) -> Res {
    let mut a: AccessPages = c.arm();
    if a.length > ACCESS_MAX {
        return Err(Errno::ENOMEM);
    }
    if a.flags & !MOCK_FLAGS_ACCESS_WRITE != 0 {
        return Err(Errno::EOPNOTSUPP);
    }
    let f = access_file(u, c.id)?;
    let mut items = f.driver.items.lock().unwrap_or_else(|e| e.into_inner());
    let pages = f.access.pin_pages(a.iova, a.length, a.flags & MOCK_FLAGS_ACCESS_WRITE != 0)?;
    if a.uptr != 0 {
        // The pinned pages must be the caller's pages at `uptr`.
        let first = (a.uptr - (a.iova % PAGE_SIZE)) & !(PAGE_SIZE - 1);
        let mut same = SamePage::new(u.mem.pid());
        let check = pages.iter().enumerate().try_for_each(|(k, &host)| {
            let expect = first + k as u64 * PAGE_SIZE;
            u.mem.mapped(expect, 1)?;
            if same.same_byte(host, expect)? { Ok(()) } else { Err(Errno::EBADE) }
        });
        if let Err(e) = check {
            f.access.unpin_pages(a.iova, a.length);
            return Err(e);
        }
    }
    let id = items.0;
    items.0 += 1;
    items.1.push(Item { id, iova: a.iova, len: a.length });
    a.out_access_pages_id = id;
    c.set_arm(&a);
    if let Err(e) = u.respond(&c) {
        items.1.pop();
        f.access.unpin_pages(a.iova, a.length);
        return Err(e);
    }
    Ok(())
}

fn access_rw(u: &Ucmd, fd: u32, a: AccessRw) -> Res {
    if a.length > ACCESS_MAX {
        return Err(Errno::ENOMEM);
    }
    if a.flags & !(MOCK_ACCESS_RW_WRITE | MOCK_ACCESS_RW_SLOW_PATH) != 0 {
        return Err(Errno::EOPNOTSUPP);
    }
    let f = access_file(u, fd)?;
    let mut tmp = vec![0u8; a.length as usize];
    if a.flags & MOCK_ACCESS_RW_WRITE != 0 {
        u.mem.read(a.uptr, &mut tmp)?;
        f.access.write(a.iova, &tmp)?;
    } else {
        f.access.read(a.iova, &mut tmp)?;
        u.mem.write(a.uptr, &tmp)?;
    }
    Ok(())
}

/// The mock IOMMU reporting a page request from a device, as a PCIe PRI
/// message would; it goes to the fault queue of the HWPT the device is
/// attached to (the RID's, when nothing is attached at that PASID).
fn trigger_iopf(u: &Ucmd, a: TriggerIopf) -> Res {
    let dev = u.ctx.get(DeviceId::new(a.dev_id))?;
    if !dev.info().iommu.is_selftest() {
        return Err(Errno::EINVAL);
    }
    let flags = LAST_PAGE | if a.pasid != 0 { PASID_VALID } else { 0 };
    let request = PageRequest { flags, dev_id: a.dev_id, pasid: a.pasid, grpid: a.grpid, perm: a.perm, addr: a.addr };
    // A PASID's own table takes its requests; without one, the mock (whose
    // PASID table a guest may own) routes them to a nested table on the RID.
    let hwpt = match a.pasid {
        0 => dev.attached(),
        pasid => dev
            .attached_at(Some(pasid))
            .or_else(|| dev.attached().filter(|h| matches!(h, ioasid_engine::Hwpt::Nested(_)))),
    };
    if let Some(queue) = hwpt.as_ref().and_then(|h| h.fault()) {
        queue.report(Group::new(vec![request]));
    }
    Ok(())
}

pub const IOMMU_HW_QUEUE_TYPE_SELFTEST: u32 = ioasid_engine::hw_queue::HW_QUEUE_TYPE_SELFTEST;
pub const IOMMU_TEST_HW_QUEUE_MAX: u32 = ioasid_engine::hw_queue::SELFTEST_HW_QUEUE_MAX;
