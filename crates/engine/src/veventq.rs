//! vEVENTQs: the queue through which a vIOMMU tells its guest's owner about
//! events the guest's IOMMU would have logged (faults it cannot recover,
//! for one), one queue per event type.
//!
//! Each event carries a sequence number (31 bits, wrapping) so the reader
//! sees gaps. The queue holds at most `depth` events; past that, events are
//! dropped and a single lost-events marker is queued in their place, whose
//! sequence is that of the latest event dropped.

use std::any::Any;
use std::collections::VecDeque;
use std::sync::Arc;

use parking_lot::{Mutex, MutexGuard};

pub use crate::model::selftest::VEVENTQ_TYPE_SELFTEST;
pub use crate::model::smmuv3::VEVENTQ_TYPE_ARM_SMMUV3;
/// Header flag: events were dropped because the queue was full.
pub const LOST_EVENTS: u32 = 1 << 0;
/// Size of the header every event is read with: flags, then sequence.
pub const HEADER: usize = 8;

/// One entry of a vEVENTQ as `read(2)` on its fd returns it: Linux's
/// `struct iommufd_vevent_header`, then the event's record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vevent {
    /// Header flags: [`LOST_EVENTS`] on the marker standing for dropped events.
    pub flags: u32,
    /// The event's number (31 bits, wrapping); on the lost-events marker,
    /// that of the latest event dropped.
    pub sequence: u32,
    /// The record in the queue type's layout (for SMMUv3, an
    /// `iommu_vevent_arm_smmuv3`); empty on the lost-events marker.
    pub data: Vec<u8>,
}

impl Vevent {
    fn is_lost_marker(&self) -> bool {
        self.flags & LOST_EVENTS != 0
    }

    fn size(&self) -> usize {
        HEADER + self.data.len()
    }
}

type Notifier = Box<dyn Fn(bool) + Send + Sync>;

/// A vEVENTQ object (`IOMMU_VEVENTQ_ALLOC`): a bounded queue of one event
/// type of a vIOMMU, holding its vIOMMU busy while it exists.
pub struct Veventq {
    /// The vIOMMU it belongs to, kept alive (and busy) by it.
    _viommu: Arc<dyn Any + Send + Sync>,
    kind: u32,
    depth: usize,
    inner: Mutex<Inner>,
    notifier: Mutex<Option<Notifier>>,
}

#[derive(Default)]
struct Inner {
    events: VecDeque<Vevent>,
    /// Real events queued (the lost marker is not one).
    queued: usize,
    /// Real events taken with `take_moved` that the reader has not read yet:
    /// they still count against the depth.
    moved: usize,
    sequence: u32,
}

impl Veventq {
    /// A queue of `viommu`'s events of `kind` (made by `Viommu::add_veventq`).
    pub(crate) fn new(viommu: Arc<dyn Any + Send + Sync>, kind: u32, depth: u32) -> Arc<Self> {
        Arc::new(Veventq {
            _viommu: viommu,
            kind,
            depth: depth as usize,
            inner: Mutex::new(Inner::default()),
            notifier: Mutex::new(None),
        })
    }

    /// The event type it queues (`VEVENTQ_TYPE_*`, Linux's
    /// `enum iommu_veventq_type`).
    pub fn kind(&self) -> u32 {
        self.kind
    }

    fn inner(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock()
    }

    /// Called with whether events wait, after every change.
    pub fn set_notifier(&self, f: Notifier) {
        let ready = !self.inner().events.is_empty();
        f(ready);
        *self.notifier.lock() = Some(f);
    }

    fn notify(&self, ready: bool) {
        if let Some(f) = &*self.notifier.lock() {
            f(ready);
        }
    }

    /// Queues an event, or records its loss when the queue is full.
    pub fn report(&self, data: &[u8]) {
        let mut q = self.inner();
        let sequence = q.sequence;
        q.sequence = (q.sequence + 1) & i32::MAX as u32;
        if q.queued + q.moved >= self.depth {
            match q.events.back_mut() {
                Some(last) if last.is_lost_marker() => last.sequence = sequence,
                _ => q.events.push_back(Vevent { flags: LOST_EVENTS, sequence, data: Vec::new() }),
            }
        } else {
            q.events.push_back(Vevent { flags: 0, sequence, data: data.to_vec() });
            q.queued += 1;
        }
        drop(q);
        self.notify(true);
    }

    /// Takes the events that fit, whole, in `room` bytes (headers included),
    /// oldest first. `None` when the first waiting event does not fit.
    pub fn read(&self, room: usize) -> Option<Vec<Vevent>> {
        let mut q = self.inner();
        let mut out = Vec::new();
        let mut used = 0;
        while let Some(next) = q.events.front() {
            if next.size() > room - used {
                break;
            }
            used += next.size();
            let event = q.events.pop_front().expect("peeked");
            if !event.is_lost_marker() {
                q.queued -= 1;
            }
            out.push(event);
        }
        let ready = !q.events.is_empty();
        if out.is_empty() && ready {
            return None;
        }
        drop(q);
        self.notify(ready);
        Some(out)
    }

    /// `read`, for a reader that moves the events somewhere the program
    /// reads them later (the daemon's socket): they count against the depth
    /// until `moved_read` says the program has read them all.
    pub fn take_moved(&self, room: usize) -> Vec<Vevent> {
        let taken = self.read(room).unwrap_or_default();
        self.inner().moved += taken.iter().filter(|e| !e.is_lost_marker()).count();
        taken
    }

    /// Every event `take_moved` took has been read.
    pub fn moved_read(&self) {
        self.inner().moved = 0;
    }

    /// Puts back, in front and in order, events `read` took but that could
    /// not be delivered.
    pub fn unread(&self, events: Vec<Vevent>) {
        let mut q = self.inner();
        for event in events.into_iter().rev() {
            if !event.is_lost_marker() {
                q.queued += 1;
            }
            q.events.push_front(event);
        }
        drop(q);
        self.notify(true);
    }

    /// Events waiting, the lost marker included.
    pub fn len(&self) -> usize {
        self.inner().events.len()
    }

    /// Whether no event (nor lost marker) waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Context, ContextConfig, DeviceInfo, HwptFlags, Limit, MockFlags, ViommuType};

    fn queue(depth: u32) -> (Context, Arc<Veventq>) {
        let ctx = Context::with_config(ContextConfig::isolated(Limit::Pages(1 << 10)));
        let ioas = ctx.ioas_alloc().unwrap();
        let dev = ctx.bind_device(DeviceInfo::mock(1, MockFlags::default())).unwrap();
        let hwpt = ctx.hwpt_alloc(dev, ioas, HwptFlags { nest_parent: true, dirty_tracking: false }, None).unwrap();
        let viommu = ctx.viommu_alloc(dev, hwpt, ViommuType::Selftest).unwrap();
        let q = Veventq::new(ctx.get(viommu).unwrap(), VEVENTQ_TYPE_SELFTEST, depth);
        (ctx, q)
    }

    fn seqs(events: &[Vevent]) -> Vec<(u32, u32)> {
        events.iter().map(|e| (e.flags, e.sequence)).collect()
    }

    #[test]
    fn events_carry_rising_sequence_numbers_and_their_data() {
        let (_ctx, q) = queue(4);
        q.report(&[1, 0, 0, 0]);
        q.report(&[2, 0, 0, 0]);
        let got = q.read(64).unwrap();
        assert_eq!(seqs(&got), [(0, 0), (0, 1)]);
        assert_eq!(got[1].data, [2, 0, 0, 0]);
        assert_eq!(q.read(64), Some(vec![]), "empty");
    }

    #[test]
    fn a_full_queue_drops_events_behind_one_lost_marker() {
        let (_ctx, q) = queue(2);
        for i in 0..5u8 {
            q.report(&[i, 0, 0, 0]);
        }
        assert_eq!(q.len(), 3, "two events and one marker");
        let got = q.read(1024).unwrap();
        assert_eq!(seqs(&got), [(0, 0), (0, 1), (LOST_EVENTS, 4)], "the marker has the latest dropped number");
        assert!(got[2].data.is_empty());
        q.report(&[9, 0, 0, 0]);
        assert_eq!(seqs(&q.read(1024).unwrap()), [(0, 5)], "room again after reading");
    }

    #[test]
    fn reads_take_whole_events_only() {
        let (_ctx, q) = queue(4);
        q.report(&[1, 0, 0, 0]);
        q.report(&[2, 0, 0, 0]);
        assert_eq!(q.read(11), None, "12 bytes needed for the first");
        assert_eq!(seqs(&q.read(20).unwrap()), [(0, 0)], "the second does not fit whole");
        assert_eq!(seqs(&q.read(12).unwrap()), [(0, 1)]);
    }

    #[test]
    fn sequence_numbers_wrap_at_31_bits() {
        let (_ctx, q) = queue(4);
        q.inner().sequence = i32::MAX as u32;
        q.report(&[]);
        q.report(&[]);
        assert_eq!(seqs(&q.read(64).unwrap()), [(0, i32::MAX as u32), (0, 0)]);
    }
}
