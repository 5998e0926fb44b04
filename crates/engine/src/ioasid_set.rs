//! PASID allocation in IOASID sets: a global PASID space carved into sets,
//! each with a quota inside its parent's (like a cgroup controller), IDs
//! reference-counted so a free while referenced completes at the last put,
//! private data per ID, set-private IDs (a guest's vPASIDs) mapped to host
//! PASIDs, and notifications of alloc, free, bind and unbind.
//!
//! Changes (references taken and dropped included) are serialised by one
//! lock; lookups (`find`, `entry`, `host_pasid`, `vpasid`) take none: each
//! ID has a slot of atomics in a two-level table (allocated a leaf at a
//! time), reused by every allocation of the ID and read as a seqlock, its
//! generation telling one allocation from the next; references are counted
//! in the slot's state word. As only the lock's holder writes a slot, every
//! change of it is a plain store: alloc and free pay the lock's one atomic
//! operation each (its release is a store, see `crate::lock`) and nothing
//! more.
//!
//! # Ownership
//!
//! The space is global, as the system's PASIDs are, but what a context may
//! do in it is not: every set a context allocates belongs to that context
//! (its `SetOwner`), and so do the PASIDs allocated in it. A context acts
//! only on its own sets (named by its own object IDs, so another context's
//! sets cannot even be named) and on their PASIDs; a PASID of another
//! context's set is not found (`ENOENT`), as iommufd answers for another
//! context's object IDs. References follow the same rule: `SetOwner::get`
//! takes one on a PASID of the owner's sets and records it, `put` drops
//! only a reference the owner recorded (`EINVAL` when it holds none, so the
//! allocation's own reference is dropped by a free alone), and the owner's
//! end (its context closing) drops every reference it still holds, once.
//! References held inside the engine (a device bound to a PASID) are taken
//! on the owner's behalf by the context's own commands.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering, fence};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, OnceLock};

use parking_lot::{Mutex, MutexGuard};

use crate::lock::{Lock, LockGuard};

use arc_swap::ArcSwap;

use crate::error::{Error, Result};

/// PASID 0 is the RID's own address space (`IOMMU_NO_PASID`): never allocated.
pub const NO_PASID: u32 = 0;
/// The widest PASID space, in bits: PCIe's 20-bit PASIDs.
pub const MAX_WIDTH: u8 = 20;

/// An IOASID set's handle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SetId(pub u32);

/// What subscribers hear.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// `pasid` was allocated in `set`.
    Alloc {
        /// The set it belongs to.
        set: SetId,
        /// The (host) PASID.
        pasid: u32,
    },
    /// The ID is gone (its last reference was put).
    Free {
        /// The set it belonged to.
        set: SetId,
        /// The (host) PASID.
        pasid: u32,
    },
    /// `device` now uses `pasid` (`PasidSpace::bind`).
    Bind {
        /// The set the PASID belongs to.
        set: SetId,
        /// The (host) PASID.
        pasid: u32,
        /// The caller's name for the device, passed through.
        device: u64,
    },
    /// `device` no longer uses `pasid` (`PasidSpace::unbind`).
    Unbind {
        /// The set the PASID belongs to.
        set: SetId,
        /// The (host) PASID.
        pasid: u32,
        /// The caller's name for the device, passed through.
        device: u64,
    },
}

impl Event {
    fn set(&self) -> SetId {
        match *self {
            Event::Alloc { set, .. }
            | Event::Free { set, .. }
            | Event::Bind { set, .. }
            | Event::Unbind { set, .. } => set,
        }
    }

    fn bit(&self) -> u8 {
        match self {
            Event::Alloc { .. } => Events::ALLOC.0,
            Event::Free { .. } => Events::FREE.0,
            Event::Bind { .. } => Events::BIND.0,
            Event::Unbind { .. } => Events::UNBIND.0,
        }
    }
}

/// A mask of the events a subscriber wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Events(pub u8);

impl Events {
    /// [`Event::Alloc`].
    pub const ALLOC: Events = Events(1);
    /// [`Event::Free`].
    pub const FREE: Events = Events(2);
    /// [`Event::Bind`].
    pub const BIND: Events = Events(4);
    /// [`Event::Unbind`].
    pub const UNBIND: Events = Events(8);
    /// Every event.
    pub const ALL: Events = Events(15);
}

/// Who a subscriber is; subscribers hear each event in this order (the CPU
/// side first, then the IOMMU, then devices), as the original series had it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Class {
    /// The CPU side (a process's PASID, as for SVA), told first.
    Cpu,
    /// The IOMMU (its PASID tables), told second.
    Iommu,
    /// Device drivers, told last.
    Device,
}

/// One allocated PASID, as read at one moment.
pub struct Entry {
    pasid: u32,
    set: SetId,
    private: u64,
    vpasid: Option<u32>,
    /// The allocation it belongs to, so a reference taken through it is
    /// never taken on a later allocation of the same ID.
    generation: u32,
}

impl Entry {
    /// The (host) PASID.
    pub fn pasid(&self) -> u32 {
        self.pasid
    }
    /// The set it was allocated in.
    pub fn set(&self) -> SetId {
        self.set
    }
    /// The opaque value given at allocation.
    pub fn private(&self) -> u64 {
        self.private
    }
    /// The set's own ID it stands for (a guest's vPASID), when allocated
    /// by `alloc_private`.
    pub fn vpasid(&self) -> Option<u32> {
        self.vpasid
    }
}

const LEAF_BITS: u32 = 10;
const LEAF: usize = 1 << LEAF_BITS;

/// The references an allocation holds: its own plus every `get`.
const REFS: u64 = u32::MAX as u64;
/// Set by `free`: no new references; the last `put` releases the ID.
const FREED: u64 = 1 << 32;
/// Between `alloc` and the release of the last reference.
const LIVE: u64 = 1 << 33;
/// Counts allocations of the slot's ID (the bits above `LIVE`).
const GENERATION_SHIFT: u32 = 34;
/// `vpasid` of an ID `alloc` gave (IDs are at most 20 bits).
const NO_VPASID: u32 = u32::MAX;

fn generation(state: u64) -> u32 {
    (state >> GENERATION_SHIFT) as u32
}

/// The place of one ID, reused by every allocation of it, so allocating
/// costs no memory allocation and readers need no reclamation scheme.
/// Only the space's lock holder writes the slot (`set`, `private` and
/// `vpasid` only while the ID is not `LIVE`); readers take them as a seqlock's readers
/// do, checking that the generation and `LIVE` did not change meanwhile.
#[derive(Default)]
struct Slot {
    /// References, `FREED`, `LIVE` and the generation.
    state: AtomicU64,
    private: AtomicU64,
    set: AtomicU32,
    vpasid: AtomicU32,
    /// Where the ID is in its set's `own`; written and read under the
    /// space's lock only.
    own_index: AtomicU32,
}

impl Slot {
    /// The allocation in the slot, if any, read consistently.
    fn read(&self, pasid: u32) -> Option<Entry> {
        loop {
            let before = self.state.load(Ordering::Acquire);
            if before & LIVE == 0 {
                return None;
            }
            let set = SetId(self.set.load(Ordering::Relaxed));
            let private = self.private.load(Ordering::Relaxed);
            let vpasid = self.vpasid.load(Ordering::Relaxed);
            fence(Ordering::Acquire);
            let after = self.state.load(Ordering::Relaxed);
            if (before ^ after) & !(REFS | FREED) == 0 {
                let vpasid = (vpasid != NO_VPASID).then_some(vpasid);
                return Some(Entry { pasid, set, private, vpasid, generation: generation(before) });
            }
        }
    }

    /// The live allocation's state (of `generation` when given); only the
    /// space's lock holder may call it, as only it writes the state.
    fn live(&self, generation_of: Option<u32>) -> Result<u64> {
        let cur = self.state.load(Ordering::Relaxed);
        if cur & LIVE == 0 || generation_of.is_some_and(|g| g != generation(cur)) {
            return Err(Error::NotFound("PASID not allocated"));
        }
        Ok(cur)
    }
}

/// A lock-free table of every ID's slot, allocated 1024 slots at a time.
struct Slots {
    leaves: Box<[OnceLock<Box<[Slot]>>]>,
}

impl Slots {
    fn new(width: u8) -> Self {
        let n = (1usize << width).div_ceil(LEAF);
        Slots { leaves: (0..n).map(|_| OnceLock::new()).collect() }
    }

    /// The slot of `id`, if its leaf exists.
    fn get(&self, id: u32) -> Option<&Slot> {
        let leaf = self.leaves.get((id >> LEAF_BITS) as usize)?.get()?;
        Some(&leaf[id as usize & (LEAF - 1)])
    }

    /// The slot of `id`, making its leaf.
    fn slot(&self, id: u32) -> &Slot {
        let leaf = self.leaves[(id >> LEAF_BITS) as usize].get_or_init(|| (0..LEAF).map(|_| Slot::default()).collect());
        &leaf[id as usize & (LEAF - 1)]
    }

    fn read(&self, id: u32) -> Option<Entry> {
        self.get(id)?.read(id)
    }
}

/// A lock-free map from a set's own IDs to host PASIDs (0: none, as PASID
/// 0 is never allocated).
struct VpasidMap {
    leaves: Box<[OnceLock<Box<[AtomicU32]>>]>,
}

impl VpasidMap {
    fn new(width: u8) -> Self {
        let n = (1usize << width).div_ceil(LEAF);
        VpasidMap { leaves: (0..n).map(|_| OnceLock::new()).collect() }
    }

    fn get(&self, vpasid: u32) -> Option<u32> {
        let leaf = self.leaves.get((vpasid >> LEAF_BITS) as usize)?.get()?;
        Some(leaf[vpasid as usize & (LEAF - 1)].load(Ordering::Acquire)).filter(|&p| p != NO_PASID)
    }

    fn set(&self, vpasid: u32, pasid: u32) {
        let leaf = self.leaves[(vpasid >> LEAF_BITS) as usize]
            .get_or_init(|| (0..LEAF).map(|_| AtomicU32::new(NO_PASID)).collect());
        leaf[vpasid as usize & (LEAF - 1)].store(pasid, Ordering::Release);
    }
}

struct SetState {
    parent: Option<SetId>,
    quota: u32,
    /// IDs of this set and all its descendants.
    used: u32,
    children: u32,
    /// IDs allocated in this set (including those freed but still
    /// referenced), in no order, so destroying a set costs what it holds,
    /// not a scan of the whole space; each ID's slot keeps its index here.
    own: Vec<u32>,
    /// Destroyed while IDs were still referenced: goes with the last of them.
    dying: bool,
}

/// What lookups read without the lock.
struct SetShared {
    /// The `SetOwner` key of the context the set belongs to (0: none, a set
    /// made by the engine's own users of a private space).
    owner: u64,
    by_vpasid: VpasidMap,
}

struct Subscriber {
    class: Class,
    set: Option<SetId>,
    events: Events,
    tx: Sender<Event>,
}

/// Bits of a [`SetId`] that index its place in [`Sets`]; the bits above
/// count the reuses of that place.
const SET_INDEX_BITS: u32 = 20;
const SET_INDEX: u32 = (1 << SET_INDEX_BITS) - 1;

/// The sets, each at the place its ID's low bits index, so finding one
/// (every alloc and free does, once per level of its hierarchy) is an
/// index rather than a search. A destroyed set's place is reused; the ID's
/// high bits count the reuses, so its ID names no later set until one
/// place has been reused 4096 times.
struct Sets {
    /// The reuses of each place, and the set there now. Place 0 is never
    /// used (its count matches no ID), so no set's ID is 0.
    places: Vec<(u32, Option<SetState>)>,
    /// Places no set is at.
    free: Vec<u32>,
}

impl Sets {
    fn new() -> Self {
        Sets { places: vec![(u32::MAX, None)], free: Vec::new() }
    }

    /// The place `id` names, while its reuses are the ID's.
    fn place(&mut self, id: SetId) -> Option<&mut (u32, Option<SetState>)> {
        self.places.get_mut((id.0 & SET_INDEX) as usize).filter(|(reuses, _)| *reuses == id.0 >> SET_INDEX_BITS)
    }

    fn get(&self, id: SetId) -> Option<&SetState> {
        let (reuses, set) = self.places.get((id.0 & SET_INDEX) as usize)?;
        set.as_ref().filter(|_| *reuses == id.0 >> SET_INDEX_BITS)
    }

    fn get_mut(&mut self, id: SetId) -> Option<&mut SetState> {
        self.place(id)?.1.as_mut()
    }

    /// Places `set`; `ENOSPC` when 2^20 sets exist.
    fn insert(&mut self, set: SetState) -> Result<SetId> {
        let index = match self.free.pop() {
            Some(i) => i,
            None if self.places.len() <= SET_INDEX as usize => {
                self.places.push((0, None));
                (self.places.len() - 1) as u32
            }
            None => return Err(Error::NoSpace("no IOASID set ID left")),
        };
        let place = &mut self.places[index as usize];
        place.1 = Some(set);
        Ok(SetId(place.0 << SET_INDEX_BITS | index))
    }

    fn remove(&mut self, id: SetId) -> Option<SetState> {
        let place = self.place(id)?;
        let set = place.1.take()?;
        place.0 = (place.0 + 1) & (u32::MAX >> SET_INDEX_BITS);
        self.free.push(id.0 & SET_INDEX);
        Some(set)
    }
}

struct Inner {
    /// One bit per PASID, set when allocated.
    bitmap: Vec<u64>,
    sets: Sets,
    /// Every ID below it is taken, so the search for the lowest free ID starts there.
    hint: u32,
    subscribers: Vec<Subscriber>,
}

/// A space of PASIDs carved into IOASID sets with nested quotas; the
/// system's is [`global`]. Lookups are lock-free, changes serialised.
pub struct PasidSpace {
    width: u8,
    inner: Lock<Inner>,
    slots: Slots,
    shared: ArcSwap<BTreeMap<SetId, Arc<SetShared>>>,
}

impl PasidSpace {
    /// A space of `width`-bit PASIDs (1 to 20).
    pub fn new(width: u8) -> Result<Self> {
        if width == 0 || width > MAX_WIDTH {
            return Err(Error::Invalid("PASID width is 1 to 20 bits"));
        }
        let words = (1usize << width).div_ceil(64);
        let mut bitmap = vec![0u64; words];
        bitmap[0] |= 1 << NO_PASID;
        Ok(PasidSpace {
            width,
            inner: Lock::new(Inner { bitmap, sets: Sets::new(), hint: 1, subscribers: Vec::new() }),
            slots: Slots::new(width),
            shared: ArcSwap::from_pointee(BTreeMap::new()),
        })
    }

    fn lock(&self) -> LockGuard<'_, Inner> {
        self.inner.lock()
    }

    /// The largest PASID.
    pub fn max_pasid(&self) -> u32 {
        (1u32 << self.width) - 1
    }

    /// A set holding at most `quota` IDs, inside `parent`'s quota.
    pub fn create_set(&self, parent: Option<SetId>, quota: u32) -> Result<SetId> {
        self.create_owned_set(0, parent, quota)
    }

    /// `create_set` for the owner with key `owner`, under a parent of the
    /// same owner only.
    fn create_owned_set(&self, owner: u64, parent: Option<SetId>, quota: u32) -> Result<SetId> {
        crate::inject::check("IOASID set")?;
        let mut g = self.lock();
        if let Some(p) = parent {
            if self.owner(p) != Some(owner) && self.owner(p) != Some(SHARED_ROOT) {
                return Err(Error::NotFound("no such parent set"));
            }
            let ps = g.sets.get(p).ok_or(Error::NotFound("no such parent set"))?;
            if quota > ps.quota {
                return Err(Error::Invalid("a set's quota must fit in its parent's"));
            }
        }
        let id = g.sets.insert(SetState { parent, quota, used: 0, children: 0, own: Vec::new(), dying: false })?;
        if let Some(p) = parent {
            g.sets.get_mut(p).expect("looked up above").children += 1;
        }
        let mut shared = (**self.shared.load()).clone();
        shared.insert(id, Arc::new(SetShared { owner, by_vpasid: VpasidMap::new(self.width) }));
        self.shared.store(Arc::new(shared));
        Ok(id)
    }

    /// Changes a quota live; never below what the set uses.
    pub fn set_quota(&self, set: SetId, quota: u32) -> Result<()> {
        let mut g = self.lock();
        let parent_quota = match g.sets.get(set).ok_or(Error::NotFound("no such set"))?.parent {
            Some(p) => g.sets.get(p).expect("parents outlive children").quota,
            None => u32::MAX,
        };
        let s = g.sets.get_mut(set).expect("checked");
        if quota < s.used {
            return Err(Error::Busy("the set uses more IDs than that"));
        }
        if quota > parent_quota {
            return Err(Error::Invalid("a set's quota must fit in its parent's"));
        }
        s.quota = quota;
        Ok(())
    }

    /// (quota, IDs in use in the set and below it).
    pub fn usage(&self, set: SetId) -> Result<(u32, u32)> {
        let g = self.lock();
        let s = g.sets.get(set).ok_or(Error::NotFound("no such set"))?;
        Ok((s.quota, s.used))
    }

    /// Frees every ID of a set that has no child sets, then the set.
    /// Referenced IDs complete their free at their last `put`.
    pub fn destroy_set(&self, set: SetId) -> Result<()> {
        if self.lock().sets.get(set).ok_or(Error::NotFound("no such set"))?.children > 0 {
            return Err(Error::Busy("the set has child sets"));
        }
        for pasid in self.ids(set)? {
            let _ = self.free(set, pasid);
        }
        let mut g = self.lock();
        let s = g.sets.get_mut(set).ok_or(Error::NotFound("no such set"))?;
        if !s.own.is_empty() {
            // Referenced IDs finish their free later; the set goes with them.
            s.dying = true;
            return Ok(());
        }
        self.remove_set(&mut g, set);
        Ok(())
    }

    fn remove_set(&self, g: &mut Inner, set: SetId) {
        let Some(s) = g.sets.remove(set) else { return };
        if let Some(p) = s.parent {
            g.sets.get_mut(p).expect("parents outlive children").children -= 1;
        }
        let mut shared = (**self.shared.load()).clone();
        shared.remove(&set);
        self.shared.store(Arc::new(shared));
    }

    /// Allocates a PASID in `[min, max]` for `set`, charged to the set and
    /// every ancestor (`EDQUOT` past a quota, `ENOSPC` when none is free).
    pub fn alloc(&self, set: SetId, min: u32, max: u32, private: u64) -> Result<u32> {
        self.alloc_with(set, min, max, private, None)
    }

    /// Allocates a host PASID standing for the set's own ID `vpasid` (a
    /// guest's PASID); `EEXIST` when the set already uses `vpasid`.
    pub fn alloc_private(&self, set: SetId, vpasid: u32, private: u64) -> Result<u32> {
        if vpasid > self.max_pasid() {
            return Err(Error::Invalid("set-private ID out of range"));
        }
        self.alloc_with(set, 1, self.max_pasid(), private, Some(vpasid))
    }

    // Inlined so `alloc`, the common call, drops the set-private branches.
    #[inline]
    fn alloc_with(&self, set: SetId, min: u32, max: u32, private: u64, vpasid: Option<u32>) -> Result<u32> {
        crate::inject::check("PASID")?;
        let mut g = self.lock();
        let inner = &mut *g;
        let lo = min.max(1);
        let hi = max.min(self.max_pasid());
        // Searched first, answered in Linux's order (after the quota): the
        // search changes nothing, and the set is then looked up once.
        let found = if lo > hi { Err(Error::Invalid("empty PASID range")) } else { inner.find_free(lo, hi) };
        let st = inner.sets.get_mut(set).ok_or(Error::NotFound("no such set"))?;
        // Only a set-private ID needs the set's lookup table.
        let shared = vpasid.map(|_| self.shared.load().get(&set).cloned().expect("every set is shared"));
        if let (Some(v), Some(shared)) = (vpasid, &shared)
            && shared.by_vpasid.get(v).is_some()
        {
            return Err(Error::Exists("the set already uses that ID"));
        }
        if st.used >= st.quota {
            return Err(Error::Quota("IOASID set quota exhausted"));
        }
        let (pasid, st) = match st.parent {
            None => (found?, st),
            Some(parent) => {
                // The quota along the path to the root, checked and charged
                // in one pass; no PASID to take gives the charges back.
                inner.charge(parent)?;
                let pasid = found.inspect_err(|_| inner.uncharge(parent))?;
                (pasid, inner.sets.get_mut(set).expect("looked up above"))
            }
        };
        st.used += 1;
        let slot = self.slots.slot(pasid);
        slot.own_index.store(st.own.len() as u32, Ordering::Relaxed);
        st.own.push(pasid);
        inner.bitmap[(pasid / 64) as usize] |= 1 << (pasid % 64);
        // Every ID below the hint is taken: an allocation above it (a
        // range starting higher) leaves lower free IDs where they are.
        if pasid == inner.hint {
            inner.hint = pasid + 1;
        }
        // The ID is free, so only this lock's holder writes its slot; the
        // fence keeps a reader that sees these values from missing the
        // release of the previous allocation (see `Slot`).
        let generation = slot.state.load(Ordering::Relaxed) & !(REFS | FREED | LIVE);
        fence(Ordering::Release);
        slot.set.store(set.0, Ordering::Relaxed);
        slot.private.store(private, Ordering::Relaxed);
        slot.vpasid.store(vpasid.unwrap_or(NO_VPASID), Ordering::Relaxed);
        slot.state.store(generation.wrapping_add(1 << GENERATION_SHIFT) | LIVE | 1, Ordering::Release);
        if let (Some(v), Some(shared)) = (vpasid, shared) {
            shared.by_vpasid.set(v, pasid);
        }
        inner.notify(Event::Alloc { set, pasid });
        Ok(pasid)
    }

    /// The private data of `pasid`, if `set` allocated it. Lock-free.
    pub fn find(&self, set: SetId, pasid: u32) -> Option<u64> {
        self.slots.read(pasid).filter(|e| e.set == set).map(|e| e.private)
    }

    /// The entry of `pasid`, whoever allocated it. Lock-free.
    pub fn entry(&self, pasid: u32) -> Option<Arc<Entry>> {
        self.slots.read(pasid).map(Arc::new)
    }

    /// The owner key of `set`, while it exists (dying sets included).
    fn owner(&self, set: SetId) -> Option<u64> {
        self.shared.load().get(&set).map(|s| s.owner)
    }

    /// The host PASID standing for `set`'s own ID `vpasid`. Lock-free.
    pub fn host_pasid(&self, set: SetId, vpasid: u32) -> Option<u32> {
        self.shared.load().get(&set)?.by_vpasid.get(vpasid)
    }

    /// The set-private ID `pasid` stands for. Lock-free.
    pub fn vpasid(&self, pasid: u32) -> Option<u32> {
        self.slots.read(pasid)?.vpasid
    }

    /// The IDs a set allocated, in order.
    pub fn ids(&self, set: SetId) -> Result<Vec<u32>> {
        let g = self.lock();
        let s = g.sets.get(set).ok_or(Error::NotFound("no such set"))?;
        let mut ids = s.own.clone();
        ids.sort_unstable();
        Ok(ids)
    }

    /// Takes a reference; `ENOENT` once the ID is freed.
    pub fn get(&self, pasid: u32) -> Result<()> {
        self.take_ref(pasid, None)
    }

    /// Takes a reference on the allocation of `pasid` (of `generation` when
    /// given, so an ID freed and allocated again meanwhile is never
    /// referenced by mistake); `ENOENT` once it is freed.
    fn take_ref(&self, pasid: u32, generation: Option<u32>) -> Result<()> {
        let slot = self.slots.get(pasid).ok_or(Error::NotFound("PASID not allocated"))?;
        let _g = self.lock();
        let cur = slot.live(generation)?;
        match cur & REFS {
            _ if cur & FREED != 0 => Err(Error::NotFound("PASID is being freed")),
            0 => Err(Error::NotFound("PASID is being freed")),
            REFS => Err(Error::Overflow("too many references on the PASID")),
            // Lookups tell allocations apart by `LIVE` and the generation
            // alone, so a reference moves under their feet unseen.
            _ => {
                slot.state.store(cur + 1, Ordering::Release);
                Ok(())
            }
        }
    }

    /// Drops a reference; the last one of a freed ID completes the free.
    pub fn put(&self, pasid: u32) -> Result<()> {
        let slot = self.slots.get(pasid).ok_or(Error::NotFound("PASID not allocated"))?;
        let mut g = self.lock();
        let cur = slot.live(None)?;
        match cur & REFS {
            0 => Err(Error::Invalid("put without a reference")),
            1 => {
                slot.state.store(cur & !(REFS | FREED | LIVE), Ordering::Release);
                self.release_locked(&mut g, pasid, slot);
                Ok(())
            }
            _ => {
                slot.state.store(cur - 1, Ordering::Release);
                Ok(())
            }
        }
    }

    /// Frees `pasid` for `set`: at once when nothing references it, else at
    /// the last `put`.
    pub fn free(&self, set: SetId, pasid: u32) -> Result<()> {
        let not_ours = Error::NotFound("set did not allocate it");
        let slot = self.slots.get(pasid).ok_or(not_ours)?;
        // Every write of a slot's state is made under the lock (references
        // included), so one plain store drops the allocation's own
        // reference and, when it was the last, ends the allocation.
        let mut g = self.lock();
        let cur = slot.state.load(Ordering::Relaxed);
        if cur & LIVE == 0 || slot.set.load(Ordering::Relaxed) != set.0 {
            return Err(not_ours);
        }
        if cur & FREED != 0 {
            return Err(Error::NotFound("PASID already freed"));
        }
        if cur & REFS == 0 {
            return Err(Error::Invalid("put without a reference"));
        }
        if cur & REFS == 1 {
            slot.state.store(cur & !(REFS | FREED | LIVE), Ordering::Release);
            self.release_locked(&mut g, pasid, slot);
        } else {
            slot.state.store((cur - 1) | FREED, Ordering::Release);
        }
        Ok(())
    }

    /// Tells subscribers `device` now uses `pasid`, holding a reference.
    pub fn bind(&self, pasid: u32, device: u64) -> Result<()> {
        self.get(pasid)?;
        let set = self.slots.read(pasid).map(|e| e.set).ok_or(Error::NotFound("PASID not allocated"))?;
        self.lock().notify(Event::Bind { set, pasid, device });
        Ok(())
    }

    /// Undoes `bind`.
    pub fn unbind(&self, pasid: u32, device: u64) -> Result<()> {
        let set = self.slots.read(pasid).map(|e| e.set).ok_or(Error::NotFound("PASID not allocated"))?;
        self.lock().notify(Event::Unbind { set, pasid, device });
        self.put(pasid)
    }

    /// Subscribes to `events` of `set` (or of every set). Events arrive on
    /// the receiver in order; a slow reader never holds up allocation.
    pub fn subscribe(&self, class: Class, set: Option<SetId>, events: Events) -> Receiver<Event> {
        let (tx, rx) = channel();
        let mut g = self.lock();
        g.subscribers.push(Subscriber { class, set, events, tx });
        g.subscribers.sort_by_key(|s| s.class);
        rx
    }

    /// Gives back what the allocation of `pasid`, ended in its slot, held:
    /// its set-private ID, its bit, its place in its set and the charge to
    /// the set and its ancestors.
    fn release_locked(&self, g: &mut Inner, pasid: u32, slot: &Slot) {
        let set = SetId(slot.set.load(Ordering::Relaxed));
        let vpasid = slot.vpasid.load(Ordering::Relaxed);
        if vpasid != NO_VPASID
            && let Some(shared) = self.shared.load().get(&set)
        {
            shared.by_vpasid.set(vpasid, NO_PASID);
        }
        g.bitmap[(pasid / 64) as usize] &= !(1 << (pasid % 64));
        g.hint = g.hint.min(pasid);
        // The set holds its IDs until the last is released, so it is there.
        let st = g.sets.get_mut(set).expect("a set outlives its IDs");
        let at = slot.own_index.load(Ordering::Relaxed) as usize;
        st.own.swap_remove(at);
        if let Some(&moved) = st.own.get(at) {
            self.slots.slot(moved).own_index.store(at as u32, Ordering::Relaxed);
        }
        st.used -= 1;
        let finished = st.dying && st.own.is_empty();
        if let Some(parent) = st.parent {
            g.uncharge(parent);
        }
        g.notify(Event::Free { set, pasid });
        if finished {
            self.remove_set(g, set);
        }
    }
}

/// The process's PASID space (20 bits), shared by every context, as the
/// system's PASID space is shared by every process.
pub fn global() -> &'static PasidSpace {
    static SPACE: std::sync::LazyLock<PasidSpace> =
        std::sync::LazyLock::new(|| PasidSpace::new(MAX_WIDTH).expect("20 bits is a valid width"));
    &SPACE
}

/// A context's identity in the global space and the PASID references it
/// holds (see the module docs): dropped with the context, it drops them.
pub struct SetOwner {
    key: u64,
    /// PASID -> references this owner took and has not put.
    refs: Mutex<BTreeMap<u32, u32>>,
}

impl Default for SetOwner {
    fn default() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        SetOwner { key: NEXT.fetch_add(1, Ordering::Relaxed), refs: Mutex::new(BTreeMap::new()) }
    }
}

impl SetOwner {
    fn refs(&self) -> MutexGuard<'_, BTreeMap<u32, u32>> {
        self.refs.lock()
    }

    /// The entry of `pasid` when it is allocated in one of this owner's sets.
    fn owns(&self, pasid: u32) -> Result<Entry> {
        let space = global();
        match space.slots.read(pasid) {
            Some(e) if space.owner(e.set) == Some(self.key) => Ok(e),
            _ => Err(Error::NotFound("no PASID of this context's sets")),
        }
    }

    /// Takes a reference on a PASID of this owner's sets; `ENOENT` for any
    /// other, or once it is freed.
    pub fn get(&self, pasid: u32) -> Result<()> {
        let mut refs = self.refs();
        let e = self.owns(pasid)?;
        global().take_ref(pasid, Some(e.generation))?;
        *refs.entry(pasid).or_default() += 1;
        Ok(())
    }

    /// Drops a reference this owner took with `get`.
    pub fn put(&self, pasid: u32) -> Result<()> {
        let mut refs = self.refs();
        let Some(held) = refs.get_mut(&pasid) else {
            self.owns(pasid)?;
            return Err(Error::Invalid("no reference taken on that PASID"));
        };
        *held -= 1;
        if *held == 0 {
            refs.remove(&pasid);
        }
        global().put(pasid)
    }

    /// References this owner holds on `pasid`.
    pub fn held(&self, pasid: u32) -> u32 {
        self.refs().get(&pasid).copied().unwrap_or(0)
    }
}

impl Drop for SetOwner {
    fn drop(&mut self) {
        for (pasid, n) in std::mem::take(&mut *self.refs()) {
            for _ in 0..n {
                let _ = global().put(pasid);
            }
        }
    }
}

/// The owner of shared roots: no context's (their keys start at 1).
const SHARED_ROOT: u64 = 0;

/// A set that any context may make sets under, whose quota bounds all of
/// them: a daemon gives each of its users one, so one user's sets cannot
/// take more of the PASID space than `quota`. Gone with its last handle
/// (the sets under it hold it).
pub fn shared_root(quota: u32) -> Result<Arc<SetHandle>> {
    let set = global().create_owned_set(SHARED_ROOT, None, quota)?;
    Ok(Arc::new(SetHandle { set, _parent: None }))
}

/// A set owned by a context object: destroying the object destroys the
/// set. Child sets hold their parent, so a parent outlives its children.
#[derive(Debug)]
pub struct SetHandle {
    set: SetId,
    _parent: Option<Arc<SetHandle>>,
}

impl SetHandle {
    /// The set's ID in the global space.
    pub fn id(&self) -> SetId {
        self.set
    }
}

impl Drop for SetHandle {
    fn drop(&mut self) {
        let _ = global().destroy_set(self.set);
    }
}

/// A new set of `owner` in the global space, held by the returned handle.
pub(crate) fn new_set(owner: &SetOwner, parent: Option<Arc<SetHandle>>, quota: u32) -> Result<Arc<SetHandle>> {
    let set = global().create_owned_set(owner.key, parent.as_ref().map(|p| p.set), quota)?;
    Ok(Arc::new(SetHandle { set, _parent: parent }))
}

impl Inner {
    /// The lowest free ID in `[lo, hi]`: none is below the hint, so the
    /// search starts there.
    fn find_free(&self, lo: u32, hi: u32) -> Result<u32> {
        let start = self.hint.clamp(lo, hi);
        self.scan(start, hi)
            .or_else(|| self.scan(lo, start.saturating_sub(1).max(lo)))
            .ok_or(Error::NoSpace("no free PASID in range"))
    }

    /// Charges one ID to `set` and every ancestor, or (`EDQUOT` when one
    /// is at its quota) to none: one pass up, and back only on failure.
    fn charge(&mut self, set: SetId) -> Result<()> {
        let mut at = Some(set);
        while let Some(s) = at {
            let st = self.sets.get_mut(s).expect("parents outlive children");
            if st.used >= st.quota {
                let mut back = Some(set);
                while let Some(b) = back.filter(|&b| b != s) {
                    let st = self.sets.get_mut(b).expect("charged above");
                    st.used -= 1;
                    back = st.parent;
                }
                return Err(Error::Quota("IOASID set quota exhausted"));
            }
            st.used += 1;
            at = st.parent;
        }
        Ok(())
    }

    /// Gives back one ID charged to `set` and every ancestor.
    fn uncharge(&mut self, set: SetId) {
        let mut at = Some(set);
        while let Some(s) = at {
            let Some(st) = self.sets.get_mut(s) else { break };
            st.used -= 1;
            at = st.parent;
        }
    }

    fn scan(&self, lo: u32, hi: u32) -> Option<u32> {
        let mut id = lo;
        while id <= hi {
            let word = self.bitmap[(id / 64) as usize] | ((1u64 << (id % 64)) - 1);
            if word != u64::MAX {
                let free = (id / 64) * 64 + (!word).trailing_zeros();
                return (free <= hi).then_some(free);
            }
            id = (id / 64 + 1) * 64;
        }
        None
    }

    /// Delivers `ev` to its subscribers, CPU side first; drops the gone.
    fn notify(&mut self, ev: Event) {
        if self.subscribers.is_empty() {
            return;
        }
        self.subscribers.retain(|s| {
            let wanted = s.events.0 & ev.bit() != 0 && s.set.is_none_or(|set| set == ev.set());
            !wanted || s.tx.send(ev).is_ok()
        });
    }
}
