//! Attaching devices to page tables: attach, replace and detach of a
//! device's RID or one of its PASIDs, and the vPASID attachments a vDEVICE
//! makes on its guest's behalf.
//!
//! Attach and replace are one change of the table a device (at a PASID)
//! translates through, as Linux's `iommufd_device_change_pt` is: they differ
//! only in what must be there before. Everything here runs under the
//! context's graph lock, so what a check saw still holds when it acts.
//!
//! These are methods of `Context` kept apart from the object table; the
//! table calls back into them (unbind, destroy) through `Context` itself.

use std::sync::Arc;

use crate::context::{Context, Object};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::hwpt::{Hwpt, HwptFlags, HwptPaging, PasidUse};
use crate::id::{DeviceId, HwptId, Id, ObjectId, PtId, VdeviceId};
use crate::ioas::Owner;
use crate::viommu::Vdevice;

/// What a change of page table requires of the device's current one.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Change {
    /// Nothing may be attached there yet.
    Attach,
    /// Something must be attached there, and is swapped without a window
    /// in which the device's DMA is blocked.
    Replace,
}

impl Context {
    /// Attaches a device (its RID) to an IOAS, through an automatically
    /// created HWPT, or to a HWPT. Returns the HWPT's ID.
    pub fn attach(&self, dev_id: DeviceId, pt_id: impl Into<PtId>) -> Result<HwptId> {
        let _g = self.graph();
        self.change_pt(dev_id, None, pt_id.into(), Change::Attach)
    }

    /// Attaches the device's `pasid` to a table; DMA tagged with that PASID
    /// translates there, apart from the RID's and every other PASID's.
    pub fn attach_pasid(&self, dev_id: DeviceId, pasid: u32, pt_id: impl Into<PtId>) -> Result<HwptId> {
        let _g = self.graph();
        self.change_pt(dev_id, Some(pasid), pt_id.into(), Change::Attach)
    }

    /// Moves an attached device to another page table without a window in
    /// which its DMA is blocked.
    pub fn replace(&self, dev_id: DeviceId, pt_id: impl Into<PtId>) -> Result<HwptId> {
        let _g = self.graph();
        self.change_pt(dev_id, None, pt_id.into(), Change::Replace)
    }

    /// `replace` of the table the device's `pasid` translates through.
    pub fn replace_pasid(&self, dev_id: DeviceId, pasid: u32, pt_id: impl Into<PtId>) -> Result<HwptId> {
        let _g = self.graph();
        self.change_pt(dev_id, Some(pasid), pt_id.into(), Change::Replace)
    }

    pub(crate) fn attach_locked(&self, dev_id: DeviceId, pasid: Option<u32>, pt_id: PtId) -> Result<HwptId> {
        self.change_pt(dev_id, pasid, pt_id, Change::Attach)
    }

    pub(crate) fn replace_locked(&self, dev_id: DeviceId, pasid: Option<u32>, pt_id: PtId) -> Result<HwptId> {
        self.change_pt(dev_id, pasid, pt_id, Change::Replace)
    }

    /// Points the device at `pasid` (or its RID) to `pt_id`. The new table
    /// takes the device's reservations before the old one gives them up,
    /// and on any failure the device stays where it was.
    fn change_pt(&self, dev_id: DeviceId, pasid: Option<u32>, pt_id: PtId, change: Change) -> Result<HwptId> {
        let dev = self.get(dev_id)?;
        let old = dev.attached_at(pasid);
        match change {
            Change::Attach => {
                if let Some(p) = pasid {
                    dev.check_pasid(p)?;
                }
                if old.is_some() {
                    return Err(Error::Invalid("already attached there; use replace"));
                }
            }
            Change::Replace if old.is_none() => return Err(Error::Invalid("device is not attached there")),
            Change::Replace => {}
        }
        let (id, hwpt) = self.resolve_pt(&dev, pt_id)?;
        if old.as_ref().is_some_and(|old| old.is_same(&hwpt)) {
            return Ok(id);
        }
        let owner = owner(&dev, pasid);
        let new_ioas = old.as_ref().is_none_or(|old| !Arc::ptr_eq(old.ioas(), hwpt.ioas()));
        let prepared = check_pasid_use(&dev, pasid, &hwpt)
            .and_then(|()| pasid.map_or(Ok(()), |p| dev.mock_set_pasid(p, false)))
            .and_then(|()| if new_ioas { hwpt.ioas().reserve(&dev.info().reserved, owner) } else { Ok(()) });
        if let Err(e) = prepared {
            self.release_attachment(hwpt);
            return Err(e);
        }
        if let Some(old) = self.set_attachment(&dev, pasid, Some(hwpt)) {
            self.retire(&dev, pasid, old, new_ioas);
        }
        Ok(id)
    }

    /// Detaches the device's RID.
    pub fn detach(&self, dev_id: DeviceId) -> Result<()> {
        self.detach_at(dev_id, None)
    }

    /// Detaches the device's `pasid`.
    pub fn detach_pasid(&self, dev_id: DeviceId, pasid: u32) -> Result<()> {
        self.detach_at(dev_id, Some(pasid))
    }

    fn detach_at(&self, dev_id: DeviceId, pasid: Option<u32>) -> Result<()> {
        let _g = self.graph();
        let dev = self.get(dev_id)?;
        if dev.attached_at(pasid).is_none() {
            return Err(Error::Invalid("device is not attached there"));
        }
        self.detach_locked(&dev, pasid);
        Ok(())
    }

    pub(crate) fn detach_locked(&self, dev: &Device, pasid: Option<u32>) {
        if let Some(p) = pasid {
            let _ = dev.mock_set_pasid(p, true);
        }
        if let Some(old) = self.set_attachment(dev, pasid, None) {
            self.retire(dev, pasid, old, true);
        }
    }

    /// Lets go of the table the device at `pasid` was attached to: its
    /// reservations (when the device left that IOAS), the page requests
    /// made through it, which it will never answer, and the reference.
    fn retire(&self, dev: &Device, pasid: Option<u32>, old: Hwpt, left_ioas: bool) {
        if left_ioas {
            old.ioas().unreserve(owner(dev, pasid));
        }
        if let Some(q) = old.fault() {
            q.abort(Some(dev.fault_origin(pasid)));
        }
        self.release_attachment(old);
    }

    /// Attaches `dev` at `pasid` to `hwpt` (or detaches it), counting the
    /// users of automatic HWPTs. Returns what it was attached to.
    fn set_attachment(&self, dev: &Device, pasid: Option<u32>, hwpt: Option<Hwpt>) -> Option<Hwpt> {
        if let Some(new) = &hwpt {
            self.table().count_user(new, 1);
        }
        let old = dev.set_attached_at(pasid, hwpt);
        if let Some(old) = &old {
            self.table().count_user(old, -1);
        }
        old
    }

    /// The HWPT a device attaches to for `pt_id`: the HWPT itself, or for an
    /// IOAS a compatible automatic one, created when there is none.
    fn resolve_pt(&self, dev: &Device, pt_id: PtId) -> Result<(HwptId, Hwpt)> {
        let info = dev.info();
        let hwpt = match self.object(ObjectId::new(pt_id.get()))? {
            Object::HwptPaging(h) => Hwpt::Paging(h),
            Object::HwptNested(n) => Hwpt::Nested(n),
            Object::Ioas(ioas) => {
                if let Some((id, found)) = self.table().find_auto(&ioas, info) {
                    return Ok((Id::new(id), Hwpt::Paging(found)));
                }
                let hwpt = HwptPaging::new(ioas, info.format(), info.aperture, HwptFlags::default(), true, None)?;
                return Ok((self.insert_hwpt(hwpt.clone())?.into(), Hwpt::Paging(hwpt)));
            }
            _ => return Err(Error::Invalid("pt_id is not a page table")),
        };
        if !info.iommu.serves(hwpt.format()) {
            return Err(Error::Invalid("HWPT format does not match the device's IOMMU"));
        }
        if hwpt.dirty_capable() && !info.dirty_tracking {
            return Err(Error::Invalid("device cannot track dirty pages for this HWPT"));
        }
        Ok((Id::new(pt_id.get()), hwpt))
    }

    /// Drops a device's reference to a HWPT: an automatic HWPT goes with its
    /// last device, as Linux destroys an auto domain with its last device.
    fn release_attachment(&self, hwpt: Hwpt) {
        let Hwpt::Paging(hwpt) = hwpt else { return };
        if hwpt.is_auto() && self.table().remove_unused_auto(&hwpt) {
            hwpt.release();
        }
    }

    /// Attaches the device behind vDEVICE `vdev_id` at the guest's `vpasid`
    /// to `pt_id`: the vPASID's host PASID (allocated from the vIOMMU's set
    /// on first use) is what the device is attached at, and fault records
    /// from it name `vpasid`. Returns the host PASID.
    pub fn vdevice_attach_pasid(&self, vdev_id: VdeviceId, vpasid: u32, pt_id: impl Into<PtId>) -> Result<u32> {
        let pt_id = pt_id.into();
        let _g = self.graph();
        let vdev = self.get(vdev_id)?;
        if vdev.attached().contains_key(&vpasid) {
            return Err(Error::Busy("the vDEVICE is already attached at that vPASID"));
        }
        let dev = vdev.device().clone();
        let host = vdev.viommu().claim(vpasid)?;
        let attached = (|| {
            dev.check_pasid(host)?;
            if dev.attached_at(Some(host)).is_some() {
                return Err(Error::Busy("the host PASID is already attached on the device"));
            }
            crate::ioasid_set::global().bind(host, dev.key())?;
            self.attach_locked(Id::new(dev.id()), Some(host), pt_id).inspect_err(|_| {
                let _ = crate::ioasid_set::global().unbind(host, dev.key());
            })
        })();
        if let Err(e) = attached {
            vdev.viommu().release(vpasid);
            return Err(e);
        }
        dev.set_guest_pasid(host, Some(vpasid));
        vdev.attached().insert(vpasid, host);
        Ok(host)
    }

    /// Undoes `vdevice_attach_pasid`.
    pub fn vdevice_detach_pasid(&self, vdev_id: VdeviceId, vpasid: u32) -> Result<()> {
        let _g = self.graph();
        let vdev = self.get(vdev_id)?;
        let host = vdev.attached().remove(&vpasid).ok_or(Error::Invalid("not attached at that vPASID"))?;
        self.vdevice_detach_locked(&vdev, vpasid, host);
        Ok(())
    }

    fn vdevice_detach_locked(&self, vdev: &Vdevice, vpasid: u32, host: u32) {
        let dev = vdev.device();
        // Detached while the guest's name still holds, so pending requests
        // are aborted under the name they were reported with.
        self.detach_locked(dev, Some(host));
        dev.set_guest_pasid(host, None);
        let _ = crate::ioasid_set::global().unbind(host, dev.key());
        vdev.viommu().release(vpasid);
    }

    /// Detaches every PASID a vDEVICE attached, before it goes.
    pub(crate) fn vdevice_release_locked(&self, vdev: &Vdevice) {
        let pasids = std::mem::take(&mut *vdev.attached());
        for (vpasid, host) in pasids {
            self.vdevice_detach_locked(vdev, vpasid, host);
        }
    }
}

/// Linux's rule between a device's RID and its PASIDs (see `PasidUse`):
/// `hwpt` may take `dev` at `pasid` given what else `dev` is attached to.
fn check_pasid_use(dev: &Device, pasid: Option<u32>, hwpt: &Hwpt) -> Result<()> {
    let compatible = |h: &Hwpt| h.pasid_use() == PasidUse::Compatible;
    let ok = match pasid {
        None => compatible(hwpt) || dev.attachments().iter().all(|(p, _)| p.is_none()),
        Some(_) => compatible(hwpt) && dev.attached_at(None).is_none_or(|rid| compatible(&rid)),
    };
    if ok { Ok(()) } else { Err(Error::Invalid("the HWPT is not PASID-compatible")) }
}

/// Who owns the reservations a device brings when attached at `pasid`:
/// each attachment its own, so detaching one leaves the others' in place.
fn owner(dev: &Device, pasid: Option<u32>) -> Owner {
    match pasid {
        None => Owner::Device(dev.key()),
        Some(p) => Owner::DevicePasid(dev.key(), p),
    }
}
