//! Fault queues: page requests delivered to whoever owns the page table a
//! device faulted on, read in groups and answered by cookie (Linux's
//! `iommufd_fault`).

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex, MutexGuard};

/// The longest a waiter spins before it sleeps: a handler that answers at
/// once is heard in microseconds instead of two thread wake-ups.
const SPIN: Duration = Duration::from_micros(50);
/// The shortest: spinning is not worth more when answers keep missing it.
const MIN_SPIN: Duration = Duration::from_micros(2);
/// Rounds of busy checks before a spinning waiter yields between checks.
const BUSY_ROUNDS: u32 = 4;

/// How long spinning pays, learnt from the last waits (in nanoseconds),
/// one for devices waiting on answers and one for readers waiting on
/// requests. A spin only pays when the thread that will answer runs on
/// another CPU; when it shares this one (a loaded machine), every spin
/// runs to its end and only delays that thread. So a wait the spin missed
/// halves the next spin, and one it caught doubles it, up to `SPIN`.
static ANSWER_SPIN: AtomicU64 = AtomicU64::new(SPIN.as_nanos() as u64);
static REQUEST_SPIN: AtomicU64 = AtomicU64::new(SPIN.as_nanos() as u64);

/// Spins for up to the budget in `spin` until `done()`, and adapts it.
fn spin_until(spin: &AtomicU64, done: impl Fn() -> bool) -> bool {
    let budget = spin.load(Ordering::Relaxed);
    // Already done is the common case in a batch: no clock read. It still
    // counts as caught: the other side keeps up, and the waits that do
    // miss (a batch's last) must not talk the spin down to sleeping.
    let caught = done()
        || 'spin: {
            let start = Instant::now();
            let mut round = 0;
            while (start.elapsed().as_nanos() as u64) < budget {
                for _ in 0..64 {
                    if done() {
                        break 'spin true;
                    }
                    std::hint::spin_loop();
                }
                // Past the first rounds, yield between checks: a thread that
                // shares this CPU and is about to answer runs now, and finds
                // this one awake, with no wake-up to pay.
                round += 1;
                if round > BUSY_ROUNDS {
                    std::thread::yield_now();
                }
            }
            done()
        };
    let next =
        if caught { (budget * 2).min(SPIN.as_nanos() as u64) } else { (budget / 2).max(MIN_SPIN.as_nanos() as u64) };
    if next != budget {
        spin.store(next, Ordering::Relaxed);
    }
    caught
}

use crate::error::{Error, Result};

/// `IOMMU_PGFAULT_FLAGS_PASID_VALID`: the request carries a PASID.
pub const PASID_VALID: u32 = 1 << 0;
/// `IOMMU_PGFAULT_FLAGS_LAST_PAGE`: the last request of its group; the
/// group is complete, and answered as one, from it.
pub const LAST_PAGE: u32 = 1 << 1;
/// `IOMMU_PGFAULT_PERM_READ`: the faulting access reads.
pub const PERM_READ: u32 = 1 << 0;
/// `IOMMU_PGFAULT_PERM_WRITE`: the faulting access writes.
pub const PERM_WRITE: u32 = 1 << 1;
/// `IOMMU_PGFAULT_PERM_EXEC`: the faulting access asks for execute.
pub const PERM_EXEC: u32 = 1 << 2;
/// `IOMMU_PGFAULT_PERM_PRIV`: the faulting access asks for privileged mode.
pub const PERM_PRIV: u32 = 1 << 3;

/// What a DMA tagged with a PASID may ask beyond read and write: the
/// Execute and Privileged Mode bits of PCIe's PASID prefix, which a
/// function sends only when its PASID capability enables them. They
/// travel with the request (into page requests and event records); no
/// table ioasid keeps grants or denies them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DmaAttrs {
    /// Execute access asked for (the PASID prefix's Execute Requested bit).
    pub exec: bool,
    /// Supervisor access asked for (its Privileged Mode Requested bit).
    pub privileged: bool,
}

impl DmaAttrs {
    /// `IOMMU_PGFAULT_PERM_EXEC` and `_PRIV` as a page request carries them.
    pub fn perm_bits(self) -> u32 {
        (if self.exec { PERM_EXEC } else { 0 }) | if self.privileged { PERM_PRIV } else { 0 }
    }
}

/// One page request, as a PCIe PRI message carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageRequest {
    /// [`PASID_VALID`] and [`LAST_PAGE`] (`IOMMU_PGFAULT_FLAGS_*`).
    pub flags: u32,
    /// The device's object ID in the context the queue belongs to.
    pub dev_id: u32,
    /// The PASID the DMA was tagged with (the guest's number behind a
    /// vIOMMU); meaningful only with [`PASID_VALID`].
    pub pasid: u32,
    /// The page request group index (9 bits, as PCIe's PRG index): the
    /// requests of one group share it.
    pub grpid: u32,
    /// `IOMMU_PGFAULT_PERM_*`.
    pub perm: u32,
    /// The faulting address (the IO page's start for a device's requests).
    pub addr: u64,
}

/// The requests of one group, answered together.
#[derive(Debug, Clone, Default)]
pub struct Group {
    /// The group's requests, the last with [`LAST_PAGE`].
    pub requests: Vec<PageRequest>,
    /// Where the device waits for the answer.
    waiter: Awaits,
}

/// Who hears a group's answer.
#[derive(Debug, Clone, Default)]
enum Awaits {
    /// Nobody: an injected request.
    #[default]
    Nobody,
    /// A device waiting on this group alone.
    One(Arc<Waiter>),
    /// A device waiting on a batch of groups, woken once for all of them.
    Batch(Arc<BatchAnswers>),
}

impl Group {
    /// A group no device waits on (an injected request, as the selftest's
    /// `IOMMU_TEST_OP_TRIGGER_IOPF` makes): its answer goes nowhere.
    pub fn new(requests: Vec<PageRequest>) -> Self {
        Group { requests, waiter: Awaits::Nobody }
    }

    /// A group a device waits on; the returned handle receives the answer.
    pub fn awaited(requests: Vec<PageRequest>) -> (Self, Arc<Waiter>) {
        let w = Arc::new(Waiter::default());
        (Group { requests, waiter: Awaits::One(w.clone()) }, w)
    }

    fn answer(&self, r: Response) {
        match &self.waiter {
            Awaits::Nobody => {}
            Awaits::One(w) => w.set(r),
            Awaits::Batch(b) => b.set(r),
        }
    }
}

/// The answer bits of [`Waiter::state`]: 0 until answered, then
/// `SUCCESS` or `INVALID`.
const ANSWER: u8 = 0b11;
const SUCCESS: u8 = 1;
const INVALID: u8 = 2;
/// Set in [`Waiter::state`] by a waiter about to sleep, under its lock: the
/// answer then takes the lock and wakes it. Unset, answering is one atomic
/// operation, so a handler answering a batch pays no lock per group.
const SLEEPING: u8 = 1 << 2;

/// A device's wait for the answer to its page request group.
#[derive(Debug, Default)]
pub struct Waiter {
    /// The answer (the first one wins) and whether anyone sleeps on it.
    state: AtomicU8,
    lock: Mutex<()>,
    cv: Condvar,
}

impl Waiter {
    fn set(&self, r: Response) {
        let v = if r == Response::Success { SUCCESS } else { INVALID };
        let prev = self.state.fetch_update(Ordering::AcqRel, Ordering::Acquire, |s| (s & ANSWER == 0).then_some(s | v));
        if let Ok(prev) = prev
            && prev & SLEEPING != 0
        {
            // The sleeper marked itself under the lock and holds it until it
            // sleeps: taking it here orders the wake after that.
            let _g = self.lock.lock();
            self.cv.notify_all();
        }
    }

    /// The answer, if one came.
    pub fn answered(&self) -> Option<Response> {
        match self.state.load(Ordering::Acquire) & ANSWER {
            0 => None,
            SUCCESS => Some(Response::Success),
            _ => Some(Response::Invalid),
        }
    }

    /// Blocks until the group is answered.
    pub fn wait(&self) -> Response {
        loop {
            if let Some(r) = self.wait_for(Duration::from_secs(3600)) {
                return r;
            }
        }
    }

    /// The answer, if it came within `timeout`: spins briefly, then sleeps.
    pub fn wait_for(&self, timeout: Duration) -> Option<Response> {
        if spin_until(&ANSWER_SPIN, || self.answered().is_some()) {
            return self.answered();
        }
        let mut g = self.lock.lock();
        self.cv.wait_while_for(&mut g, |_| self.state.fetch_or(SLEEPING, Ordering::AcqRel) & ANSWER == 0, timeout);
        self.answered()
    }
}

/// The answers to a batch of groups (see [`Batch`]): how many came, how
/// many refused, and whether the device sleeps until the last.
///
/// Aligned past its `Arc`'s counts: each group holds a reference, which
/// the handler lets go as it answers, while the device spins reading
/// `state`; on one cache line every answer would pull it from the spinner.
#[derive(Debug, Default)]
#[repr(align(128))]
struct BatchAnswers {
    /// Answers so far (low 32 bits), of which `Invalid` (the next 31),
    /// and [`BATCH_SLEEPING`].
    state: AtomicU64,
    /// Groups reported in this batch; written by the device alone, before
    /// each group is published under the queue's lock.
    expected: AtomicU32,
    lock: Mutex<()>,
    cv: Condvar,
}

const BATCH_ANSWERED: u64 = 1;
const BATCH_INVALID: u64 = 1 << 32;
const BATCH_COUNT: u64 = (1 << 31) - 1;
/// Set by a device about to sleep, under the lock: the answer that
/// completes the batch then takes the lock and wakes it. Only that one:
/// the answers before it are one atomic operation each.
const BATCH_SLEEPING: u64 = 1 << 63;

impl BatchAnswers {
    fn set(&self, r: Response) {
        self.add(Self::one(r));
    }

    /// What one answer adds to `state`.
    fn one(r: Response) -> u64 {
        BATCH_ANSWERED + if r == Response::Success { 0 } else { BATCH_INVALID }
    }

    /// Adds answers (a sum of [`BatchAnswers::one`]).
    fn add(&self, add: u64) {
        let prev = self.state.fetch_add(add, Ordering::AcqRel);
        let answered = (prev & u64::from(u32::MAX)) + (add & u64::from(u32::MAX));
        if prev & BATCH_SLEEPING != 0 && answered == u64::from(self.expected.load(Ordering::Relaxed)) {
            // As for `Waiter::set`: the sleeper holds the lock until it sleeps.
            let _g = self.lock.lock();
            self.cv.notify_all();
        }
    }

    /// Whether every group reported so far is answered.
    fn done(&self) -> bool {
        self.state.load(Ordering::Acquire) & u64::from(u32::MAX) == u64::from(self.expected.load(Ordering::Relaxed))
    }
}

/// What came back for a batch of groups.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Answered {
    /// Groups answered [`Response::Success`].
    pub success: u32,
    /// Groups answered [`Response::Invalid`] (refused by the handler, by a
    /// full queue, or by an abort).
    pub invalid: u32,
}

/// A device's wait for many page request groups at once, reported with
/// [`FaultQueue::report_batch`]: each group is still read, given a cookie
/// and answered on its own, but the device is woken once, when the last
/// answer arrives, and nothing is allocated per group once the queue has
/// recycled a batch's worth of them. Reusable: each [`Batch::wait`] ends
/// one batch and starts the next.
#[derive(Debug, Default)]
pub struct Batch {
    answers: Arc<BatchAnswers>,
}

impl Batch {
    /// An empty batch.
    pub fn new() -> Batch {
        Batch::default()
    }

    /// Groups reported in the batch so far.
    pub fn len(&self) -> u32 {
        self.answers.expected.load(Ordering::Relaxed)
    }

    /// Whether none was.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The answers so far, if every group of the batch has one.
    pub fn answered(&self) -> Option<Answered> {
        let s = self.answers.state.load(Ordering::Acquire);
        let answered = (s & u64::from(u32::MAX)) as u32;
        (answered == self.len()).then(|| {
            let invalid = ((s >> 32) & BATCH_COUNT) as u32;
            Answered { success: answered - invalid, invalid }
        })
    }

    /// Blocks until every group reported is answered; the batch is empty
    /// again after.
    pub fn wait(&mut self) -> Answered {
        loop {
            if let Some(a) = self.wait_for(Duration::from_secs(3600)) {
                return a;
            }
        }
    }

    /// The answers, if they all came within `timeout` (the batch is then
    /// empty again): spins briefly, then sleeps.
    pub fn wait_for(&mut self, timeout: Duration) -> Option<Answered> {
        let a = &*self.answers;
        if !spin_until(&ANSWER_SPIN, || a.done()) {
            let mut g = a.lock.lock();
            let expected = u64::from(a.expected.load(Ordering::Relaxed));
            a.cv.wait_while_for(
                &mut g,
                |_| a.state.fetch_or(BATCH_SLEEPING, Ordering::AcqRel) & u64::from(u32::MAX) != expected,
                timeout,
            );
        }
        let got = self.answered()?;
        // Every group is answered: no handler touches the count any more
        // (one finishing its wake-up only wakes nobody).
        a.state.store(0, Ordering::Relaxed);
        a.expected.store(0, Ordering::Relaxed);
        Some(got)
    }
}

/// How a group is answered (`IOMMUFD_PAGE_RESP_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Response {
    /// `IOMMUFD_PAGE_RESP_SUCCESS`: the pages are mapped now; the device
    /// retries its DMA.
    Success,
    /// `IOMMUFD_PAGE_RESP_INVALID`: they will not be; the DMA fails.
    Invalid,
}

/// Groups reported and not yet read: all a reporting device touches, so
/// a device reporting never waits on a handler answering (Linux keeps its
/// deliver list under a spinlock of its own, beside the mutex of reads and
/// responses).
#[derive(Default)]
struct Deliver {
    groups: VecDeque<Group>,
    /// Requests refused because the queue was full.
    dropped: u64,
    /// Request lists of answered groups, for [`Reports`] to fill again.
    spare: Vec<Vec<PageRequest>>,
}

/// The most answered groups' request lists a queue keeps for reuse.
const SPARE_LIMIT: usize = 1024;

/// Groups read and awaiting a response, by cookie: slot `c - 1` holds the
/// group read with cookie `c`. Cookies are the lowest free from 1, as
/// Linux allocates them, so the slots stay dense and finding a group, or
/// a free cookie, is an index, with no allocation once the slots have
/// grown to the most groups ever pending at once.
#[derive(Default)]
struct Pending {
    slots: Vec<Option<Group>>,
    /// No slot below it is free: where the search for the lowest free
    /// cookie starts, so a handler answering as it reads does not rescan
    /// the cookies it holds.
    free_from: usize,
    /// Groups answered without their owner (detach, close): nothing is
    /// lost silently.
    auto_answered: u64,
    /// The cookies of the groups the last read took, in order: what a
    /// [`Lent`] lends. Kept, so a read builds no list of its own.
    lent: Vec<u32>,
    /// Groups on their way from the unread ones to their slots, kept so
    /// moving them allocates nothing once it has grown to a batch.
    moving: Vec<Group>,
    /// Request lists of groups answered with [`Responses::answer`], on
    /// their way to [`Deliver::spare`] at the next read.
    spare: Vec<Vec<PageRequest>>,
}

impl Pending {
    /// Gives `group` the lowest free cookie, from 1, as Linux allocates them.
    fn pend(&mut self, group: Group) -> u32 {
        let mut i = self.free_from;
        while self.slots.get(i).is_some_and(Option::is_some) {
            i += 1;
        }
        let cookie = u32::try_from(i + 1).expect("cookies left");
        match self.slots.get_mut(i) {
            Some(slot) => *slot = Some(group),
            None => self.slots.push(Some(group)),
        }
        self.free_from = i + 1;
        cookie
    }

    fn unpend(&mut self, cookie: u32) -> Option<Group> {
        let i = (cookie as usize).checked_sub(1)?;
        let g = self.slots.get_mut(i)?.take()?;
        self.free_from = self.free_from.min(i);
        // Free slots at the end go, so a scan over the pending groups
        // (`abort`, `len`) covers no more than the highest cookie held.
        while self.slots.last().is_some_and(Option::is_none) {
            self.slots.pop();
        }
        Some(g)
    }

    /// The pending groups, by cookie.
    fn iter(&self) -> impl Iterator<Item = (u32, &Group)> {
        self.slots.iter().enumerate().filter_map(|(i, g)| Some((i as u32 + 1, g.as_ref()?)))
    }

    fn len(&self) -> usize {
        self.slots.iter().filter(|g| g.is_some()).count()
    }
}

/// A value alone on its cache line (two lines: adjacent-line prefetch).
#[derive(Default)]
#[repr(align(128))]
struct Padded<T>(T);

impl<T> std::ops::Deref for Padded<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

/// Told whether groups are waiting to be read (an fd's readiness).
pub type Notifier = Box<dyn Fn(bool) + Send + Sync>;

/// The most groups a queue holds unread; beyond it requests are refused.
pub const QUEUE_LIMIT: usize = 4096;

/// A fault object's queue (Linux's `iommufd_fault`, made by
/// `IOMMU_FAULT_QUEUE_ALLOC`): page request groups from devices whose table
/// it is attached to wait here until read (by [`FaultQueue::read`] or
/// [`FaultQueue::next`]) and answered by cookie with
/// [`FaultQueue::respond`]. Groups left unanswered when a device detaches
/// or the owner goes are answered [`Response::Invalid`].
#[derive(Default)]
pub struct FaultQueue {
    /// Read and answered groups' lock, held by reads, responses and
    /// aborts; taken before `deliver` when both are needed, so a group
    /// moving from one to the other is never missed by an abort.
    pending: Mutex<Pending>,
    /// Reported groups' lock, held briefly: devices report under it alone.
    /// On cache lines of its own, apart from what the handler answers
    /// under `pending`.
    deliver: Padded<Mutex<Deliver>>,
    /// Groups not yet read, readable without the lock (readers spin on it).
    /// On a cache line of its own: a reader spinning on it would otherwise
    /// pull the lock's line from under every report.
    unread: Padded<AtomicUsize>,
    /// Wakes readers that block in `next` (waits on `deliver`).
    arrived: Condvar,
    notifier: Mutex<Option<Notifier>>,
    /// Whether a notifier was ever set: without one, telling readiness
    /// takes no lock (an in-process handler, which waits in `next`).
    notified: AtomicBool,
}

impl FaultQueue {
    /// An empty queue, shared between the devices reporting to it and its
    /// reader.
    pub fn new() -> Arc<FaultQueue> {
        Arc::new(FaultQueue::default())
    }

    /// Makes `f` hear whether groups are waiting to be read.
    pub fn set_notifier(&self, f: Notifier) {
        *self.notifier.lock() = Some(f);
        self.notified.store(true, Ordering::Release);
    }

    /// Tells the notifier whether groups wait now. The count is read under
    /// the notifier's lock, so of two racing calls (a read that emptied the
    /// queue, a report that refilled it) the later tells what is true.
    fn notify(&self) {
        // A notifier set after this load hears the next change, as one
        // set after a locked look that found none would.
        if !self.notified.load(Ordering::Acquire) {
            return;
        }
        if let Some(f) = &*self.notifier.lock() {
            f(self.unread.load(Ordering::Acquire) > 0);
        }
    }

    /// Queues a group for its owner. A full queue answers it `Invalid` at
    /// once (and counts it) rather than lose it.
    pub fn report(&self, group: Group) {
        let mut d = self.deliver.lock();
        if d.groups.len() >= QUEUE_LIMIT {
            d.dropped += 1;
            drop(d);
            group.answer(Response::Invalid);
            return;
        }
        let was_empty = d.groups.is_empty();
        d.groups.push_back(group);
        self.unread.store(d.groups.len(), Ordering::Release);
        drop(d);
        self.arrived.notify_all();
        if was_empty {
            self.notify();
        }
    }

    /// Reports groups for `batch` under one hold of the queue's lock (see
    /// [`Reports`]); the handler is told once, when it is dropped.
    pub fn report_batch<'a>(&'a self, batch: &'a mut Batch) -> Reports<'a> {
        let deliver = self.deliver.lock();
        let was_empty = deliver.groups.is_empty();
        Reports { queue: self, deliver: Some(deliver), batch, was_empty, reported: 0 }
    }

    /// Blocks up to `timeout` until a group waits to be read; whether one
    /// does (for handlers in the same program that read with
    /// [`FaultQueue::lend`]).
    pub fn wait_for_requests(&self, timeout: Duration) -> bool {
        if spin_until(&REQUEST_SPIN, || self.unread.load(Ordering::Acquire) > 0) {
            return true;
        }
        let mut d = self.deliver.lock();
        !self.arrived.wait_while_for(&mut d, |d| d.groups.is_empty(), timeout).timed_out()
    }

    /// Blocks up to `timeout` for a group and reads it (for handlers that
    /// live in the same program, without a file descriptor).
    pub fn next(&self, timeout: Duration) -> Option<(u32, Group)> {
        spin_until(&REQUEST_SPIN, || self.unread.load(Ordering::Acquire) > 0);
        let deadline = Instant::now().checked_add(timeout);
        loop {
            if self.unread.load(Ordering::Acquire) == 0 {
                let mut d = self.deliver.lock();
                let left = deadline.map_or(timeout, |t| t.saturating_duration_since(Instant::now()));
                if self.arrived.wait_while_for(&mut d, |d| d.groups.is_empty(), left).timed_out() {
                    return None;
                }
            }
            // Exactly one group, whatever its size.
            let lent = self.lend_groups(usize::MAX, 1).ok()?;
            if let Some((cookie, g)) = lent.iter().next() {
                return Some((cookie, g.clone()));
            }
            // Another reader took it first.
        }
    }

    /// Takes whole groups, in order, while their requests fit in `max`
    /// records, giving each a cookie. `EINVAL` when not even the first fits.
    /// The groups stay pending under their cookies, so each is a copy:
    /// [`FaultQueue::lend`] reads without one.
    pub fn read(&self, max: usize) -> Result<Vec<(u32, Group)>> {
        let lent = self.lend(max)?;
        Ok(lent.iter().map(|(cookie, g)| (cookie, g.clone())).collect())
    }

    /// Reads as [`FaultQueue::read`] does, but lends the groups instead of
    /// copying them: they are seen where they wait for their response,
    /// under the queue's lock (as Linux reads under its fault mutex), until
    /// the [`Lent`] is dropped. Answering, or reading again, before then
    /// waits on that lock forever.
    pub fn lend(&self, max: usize) -> Result<Lent<'_>> {
        self.lend_groups(max, usize::MAX)
    }

    fn lend_groups(&self, max: usize, groups: usize) -> Result<Lent<'_>> {
        let mut p = self.pending.lock();
        let left = self.take(&mut p, max, groups)?;
        let tell = left == 0 && !p.lent.is_empty();
        Ok(Lent { queue: self, pending: Some(p), tell })
    }

    /// Takes up to `groups` whole groups, in order, while their requests
    /// fit in `max` records, and gives each a cookie in `p`, listing them in
    /// `p.lent`; returns how many are left unread. `EINVAL` when not even
    /// the first fits. The groups leave `deliver` in one short hold of its
    /// lock; cookies are given after it, under `pending` alone.
    fn take(&self, p: &mut Pending, max: usize, groups: usize) -> Result<usize> {
        p.lent.clear();
        let mut d = self.deliver.lock();
        let (mut n, mut used) = (0, 0);
        for g in d.groups.iter().take(groups) {
            if used + g.requests.len() > max {
                break;
            }
            used += g.requests.len();
            n += 1;
        }
        if n == 0 && !d.groups.is_empty() && groups > 0 {
            return Err(Error::Invalid("buffer too small for the next fault group"));
        }
        let mut moving = std::mem::take(&mut p.moving);
        moving.extend(d.groups.drain(..n));
        // Both locks are held here anyway: the answered groups' lists go
        // where reports take them, at no extra lock.
        if !p.spare.is_empty() {
            let room = SPARE_LIMIT.saturating_sub(d.spare.len()).min(p.spare.len());
            d.spare.extend(p.spare.drain(..room));
            p.spare.clear();
        }
        let left = d.groups.len();
        self.unread.store(left, Ordering::Release);
        drop(d);
        for g in moving.drain(..) {
            let cookie = p.pend(g);
            p.lent.push(cookie);
        }
        p.moving = moving;
        Ok(left)
    }

    /// Puts groups whose delivery failed back at the head of the queue.
    pub fn unread(&self, cookies: &[u32]) {
        let mut p = self.pending.lock();
        let mut d = self.deliver.lock();
        for c in cookies.iter().rev() {
            if let Some(g) = p.unpend(*c) {
                d.groups.push_front(g);
            }
        }
        let ready = !d.groups.is_empty();
        self.unread.store(d.groups.len(), Ordering::Release);
        drop((d, p));
        if ready {
            self.notify();
        }
    }

    /// Answers the group read with `cookie`; the device waiting on it goes on.
    pub fn respond(&self, cookie: u32, response: Response) -> Result<Group> {
        self.responses().respond(cookie, response)
    }

    /// Answers many groups under one hold of the queue's lock (as Linux
    /// answers a write's responses under its fault mutex). Reading, or
    /// answering through the queue, before it is dropped waits on that lock
    /// forever.
    pub fn responses(&self) -> Responses<'_> {
        Responses { pending: self.pending.lock(), owed: None }
    }

    /// Answers `Invalid` every group, read or not, that device `dev` made
    /// at `pasid` (`None`: without one) — its table went away — or every
    /// group when `who` is `None` (the owner left).
    pub fn abort(&self, who: Option<(u32, Option<u32>)>) {
        let mut p = self.pending.lock();
        let made_by = |r: &PageRequest, dev: u32, pasid: Option<u32>| {
            r.dev_id == dev
                && match pasid {
                    None => r.flags & PASID_VALID == 0,
                    Some(p) => r.flags & PASID_VALID != 0 && r.pasid == p,
                }
        };
        let hit = |g: &Group| who.is_none_or(|(d, p)| g.requests.iter().any(|r| made_by(r, d, p)));
        let mut gone: Vec<Group> = Vec::new();
        let mut d = self.deliver.lock();
        d.groups.retain(|g| {
            let h = hit(g);
            if h {
                gone.push(g.clone());
            }
            !h
        });
        let empty = d.groups.is_empty();
        self.unread.store(d.groups.len(), Ordering::Release);
        drop(d);
        let cookies: Vec<u32> = p.iter().filter(|(_, g)| hit(g)).map(|(c, _)| c).collect();
        for c in cookies {
            gone.extend(p.unpend(c));
        }
        p.auto_answered += gone.len() as u64;
        drop(p);
        for g in &gone {
            g.answer(Response::Invalid);
        }
        if empty {
            self.notify();
        }
    }

    /// Groups answered without their owner, and requests refused for a full
    /// queue, since the queue was made.
    pub fn lost(&self) -> (u64, u64) {
        let p = self.pending.lock();
        (p.auto_answered, self.deliver.lock().dropped)
    }

    /// Groups waiting to be read, and groups awaiting a response.
    pub fn counts(&self) -> (usize, usize) {
        let p = self.pending.lock();
        (self.deliver.lock().groups.len(), p.len())
    }
}

/// Groups just read, lent where they wait for their response (see
/// [`FaultQueue::lend`]); the queue's lock is held until it is dropped.
pub struct Lent<'a> {
    queue: &'a FaultQueue,
    /// Always `Some` until dropped: the lock goes before the notifier is
    /// told, as everywhere else.
    pending: Option<MutexGuard<'a, Pending>>,
    /// Whether readiness changed, to tell once the lock is gone.
    tell: bool,
}

impl Lent<'_> {
    fn pending(&self) -> &Pending {
        self.pending.as_ref().expect("held until dropped")
    }

    /// The groups read, in order, each with its cookie.
    pub fn iter(&self) -> impl Iterator<Item = (u32, &Group)> {
        let p = self.pending();
        p.lent.iter().map(|&c| (c, p.slots[c as usize - 1].as_ref().expect("a lent group stays pending")))
    }

    /// How many groups were read.
    pub fn len(&self) -> usize {
        self.pending().lent.len()
    }

    /// Whether none was.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Puts the groups back at the head of the queue, unread (their
    /// delivery failed), as [`FaultQueue::unread`] does with their cookies.
    pub fn unread(mut self) {
        let p = self.pending.as_mut().expect("held until dropped");
        let mut d = self.queue.deliver.lock();
        let lent = std::mem::take(&mut p.lent);
        for &c in lent.iter().rev() {
            if let Some(g) = p.unpend(c) {
                d.groups.push_front(g);
            }
        }
        p.lent = lent;
        p.lent.clear();
        self.tell = !d.groups.is_empty();
        self.queue.unread.store(d.groups.len(), Ordering::Release);
    }
}

impl Drop for Lent<'_> {
    fn drop(&mut self) {
        drop(self.pending.take());
        if self.tell {
            self.queue.notify();
        }
    }
}

/// Responses given under one hold of a queue's lock (see
/// [`FaultQueue::responses`]).
pub struct Responses<'a> {
    pending: MutexGuard<'a, Pending>,
    /// Answers to a [`Batch`]'s groups, given together when the next
    /// group is another's or these responses end: the device spins on
    /// that count, so one update beats one per group.
    owed: Option<(Arc<BatchAnswers>, u64)>,
}

impl Responses<'_> {
    /// Answers the group read with `cookie`; the device waiting on it goes
    /// on (a [`Batch`]'s, once its last group is answered and these
    /// responses end).
    pub fn respond(&mut self, cookie: u32, response: Response) -> Result<Group> {
        let g = self.pending.unpend(cookie).ok_or(Error::Invalid("no fault group has that cookie"))?;
        match &g.waiter {
            Awaits::Batch(b) => self.owe(b, response),
            _ => g.answer(response),
        }
        Ok(g)
    }

    /// [`Responses::respond`] for a handler that has no use for the group
    /// back: its request list is kept for the next reports to reuse.
    pub fn answer(&mut self, cookie: u32, response: Response) -> Result<()> {
        let mut g = self.respond(cookie, response)?;
        if self.pending.spare.len() < SPARE_LIMIT {
            g.requests.clear();
            self.pending.spare.push(std::mem::take(&mut g.requests));
        }
        Ok(())
    }
}

impl Responses<'_> {
    fn owe(&mut self, batch: &Arc<BatchAnswers>, response: Response) {
        match &mut self.owed {
            Some((b, sum)) if Arc::ptr_eq(b, batch) => *sum += BatchAnswers::one(response),
            owed => {
                if let Some((b, sum)) = owed.replace((batch.clone(), BatchAnswers::one(response))) {
                    b.add(sum);
                }
            }
        }
    }
}

impl Drop for Responses<'_> {
    fn drop(&mut self) {
        if let Some((b, sum)) = self.owed.take() {
            b.add(sum);
        }
    }
}

/// Groups reported under one hold of a queue's lock, each awaited by the
/// [`Batch`] they were reported for (see [`FaultQueue::report_batch`]).
/// A handler reads none of them before it is dropped, so it wakes once for
/// them all.
pub struct Reports<'a> {
    queue: &'a FaultQueue,
    /// Always `Some` until dropped: the lock goes before the handler is told.
    deliver: Option<MutexGuard<'a, Deliver>>,
    batch: &'a mut Batch,
    was_empty: bool,
    reported: usize,
}

impl Reports<'_> {
    /// Reports one group of `requests` (the last with [`LAST_PAGE`]),
    /// copied into a list an answered group left, if there is one. A full
    /// queue answers it `Invalid` at once, as [`FaultQueue::report`] does.
    pub fn report(&mut self, requests: &[PageRequest]) {
        let d = self.deliver.as_mut().expect("held until dropped");
        let answers = &self.batch.answers;
        answers.expected.store(answers.expected.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
        if d.groups.len() >= QUEUE_LIMIT {
            d.dropped += 1;
            answers.set(Response::Invalid);
            return;
        }
        let mut list = d.spare.pop().unwrap_or_default();
        list.extend_from_slice(requests);
        d.groups.push_back(Group { requests: list, waiter: Awaits::Batch(answers.clone()) });
        self.reported += 1;
    }
}

impl Drop for Reports<'_> {
    fn drop(&mut self) {
        let d = self.deliver.take().expect("held until dropped");
        self.queue.unread.store(d.groups.len(), Ordering::Release);
        drop(d);
        if self.reported > 0 {
            self.queue.arrived.notify_all();
            if self.was_empty {
                self.queue.notify();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(n: usize) -> Group {
        let r = PageRequest { flags: LAST_PAGE, dev_id: 1, pasid: 0, grpid: 2, perm: 1, addr: 0x1000 };
        Group::new(vec![r; n])
    }

    #[test]
    fn groups_are_read_whole_and_answered_once() {
        let q = FaultQueue::new();
        q.report(group(2));
        q.report(group(1));
        assert!(matches!(q.read(1), Err(Error::Invalid(_))), "the first group does not fit");
        let got = q.read(2).unwrap();
        assert_eq!((got.len(), got[0].0), (1, 1));
        let got = q.read(8).unwrap();
        assert_eq!(got[0].0, 2);
        assert!(q.read(8).unwrap().is_empty());
        q.respond(1, Response::Success).unwrap();
        assert!(q.respond(1, Response::Success).is_err(), "a second response is refused");
        assert_eq!(q.counts(), (0, 1));
        q.unread(&[2]);
        assert_eq!(q.counts(), (1, 0));
    }
}

#[cfg(test)]
mod wait_tests {
    use super::*;

    pub(super) fn request(dev_id: u32) -> PageRequest {
        PageRequest { flags: LAST_PAGE, dev_id, pasid: 0, grpid: 0, perm: 1, addr: 0 }
    }

    #[test]
    fn next_takes_one_group_at_a_time() {
        let q = FaultQueue::new();
        q.report(Group::new(vec![request(1)]));
        q.report(Group::new(vec![request(2)]));
        let (_, g) = q.next(Duration::ZERO).unwrap();
        assert_eq!(g.requests[0].dev_id, 1);
        assert_eq!(q.counts(), (1, 1), "the second group is still unread");
    }

    #[test]
    fn the_waiting_device_hears_the_answer() {
        let q = FaultQueue::new();
        let (g, w) = Group::awaited(vec![request(1)]);
        q.report(g);
        assert_eq!(w.answered(), None);
        let (cookie, _) = q.next(Duration::from_secs(1)).unwrap();
        q.respond(cookie, Response::Success).unwrap();
        assert_eq!(w.wait(), Response::Success);
    }

    #[test]
    fn abort_answers_invalid_and_counts() {
        let q = FaultQueue::new();
        let (a, wa) = Group::awaited(vec![request(1)]);
        let (b, wb) = Group::awaited(vec![request(2)]);
        q.report(a);
        q.report(b);
        q.read(1).unwrap();
        q.abort(Some((1, None)));
        assert_eq!(wa.answered(), Some(Response::Invalid));
        assert_eq!(wb.answered(), None);
        q.abort(None);
        assert_eq!(wb.answered(), Some(Response::Invalid));
        assert_eq!(q.lost(), (2, 0));
    }

    #[test]
    fn the_notifier_follows_readiness() {
        let q = FaultQueue::new();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        q.set_notifier(Box::new(move |r| s.lock().push(r)));
        q.report(Group::new(vec![request(1)]));
        q.report(Group::new(vec![request(1)]));
        q.read(8).unwrap();
        assert_eq!(*seen.lock(), vec![true, false]);
    }

    /// A reader emptying the queue and a reporter refilling it race to tell
    /// the notifier; whichever tells last must tell what is true, or a
    /// handler polling the fault fd sleeps with a group waiting. Here the
    /// reader is preempted between publishing what it left and telling.
    #[test]
    fn the_notifier_ends_on_the_truth_when_a_read_and_a_report_race() {
        let q = FaultQueue::new();
        let last = Arc::new(Mutex::new(false));
        let l = last.clone();
        q.set_notifier(Box::new(move |r| *l.lock() = r));
        q.report(Group::new(vec![request(1)]));
        let mut p = q.pending.lock();
        let left = q.take(&mut p, 8, usize::MAX).unwrap();
        assert_eq!((p.lent.len(), left), (1, 0));
        drop(p);
        q.report(Group::new(vec![request(2)]));
        // The reader's late word, which used to be "nothing waits".
        q.notify();
        assert!(*last.lock(), "the notifier says empty with a group waiting");
    }
}

#[cfg(test)]
mod cookie_and_spin_tests {
    use super::*;

    fn group() -> Group {
        Group::new(vec![PageRequest { flags: LAST_PAGE, dev_id: 1, pasid: 0, grpid: 0, perm: 1, addr: 0 }])
    }

    #[test]
    fn cookies_are_the_lowest_free_whatever_the_answer_order() {
        let q = FaultQueue::new();
        for _ in 0..5 {
            q.report(group());
        }
        let got: Vec<u32> = q.read(3).unwrap().into_iter().map(|(c, _)| c).collect();
        assert_eq!(got, [1, 2, 3]);
        q.respond(3, Response::Success).unwrap();
        q.respond(1, Response::Success).unwrap();
        let got: Vec<u32> = q.read(8).unwrap().into_iter().map(|(c, _)| c).collect();
        assert_eq!(got, [1, 3], "the freed cookies, lowest first");
        q.unread(&[1]);
        q.report(group());
        let got: Vec<u32> = q.read(8).unwrap().into_iter().map(|(c, _)| c).collect();
        assert_eq!(got, [1, 4], "a group put back is read again first, its cookie the lowest free again");
    }

    #[test]
    fn a_sleeping_device_is_woken_by_the_answer() {
        let (_, w) = Group::awaited(vec![]);
        let sleeper = {
            let w = w.clone();
            std::thread::spawn(move || w.wait_for(Duration::from_secs(30)))
        };
        // Well past any spin: the device sleeps.
        std::thread::sleep(Duration::from_millis(50));
        Group { requests: vec![], waiter: Awaits::One(w.clone()) }.answer(Response::Invalid);
        assert_eq!(sleeper.join().unwrap(), Some(Response::Invalid));
        Group { requests: vec![], waiter: Awaits::One(w.clone()) }.answer(Response::Success);
        assert_eq!(w.answered(), Some(Response::Invalid), "the first answer wins");
    }

    /// A group moves from the unread groups to the pending ones under the
    /// pending lock, which an abort takes first: an abort racing reads
    /// finds every group of the device in one place or the other. The
    /// handler here leaves device 0's groups pending, so only the abort can
    /// answer them; one it missed in flight would stay unanswered.
    #[test]
    fn an_abort_racing_reads_answers_every_group_of_its_device() {
        use std::sync::atomic::AtomicBool;
        let request = |dev_id| PageRequest { flags: LAST_PAGE, dev_id, pasid: 0, grpid: 0, perm: 1, addr: 0 };
        let q = FaultQueue::new();
        let (stop, stop_other) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
        let handler = {
            let (q, stop) = (q.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    for (cookie, g) in q.read(usize::MAX).unwrap() {
                        if g.requests[0].dev_id == 1 {
                            q.respond(cookie, Response::Success).unwrap();
                        }
                    }
                }
            })
        };
        let other = {
            let (q, stop) = (q.clone(), stop_other.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let (g, w) = Group::awaited(vec![request(1)]);
                    q.report(g);
                    assert_eq!(w.wait_for(Duration::from_secs(10)), Some(Response::Success));
                }
            })
        };
        for round in 0..300 {
            let waiters: Vec<_> = (0..32)
                .map(|_| {
                    let (g, w) = Group::awaited(vec![request(0)]);
                    q.report(g);
                    w
                })
                .collect();
            // Abort while the handler takes them, where a group is in flight.
            let since = Instant::now();
            while q.unread.load(Ordering::Acquire) == waiters.len() && since.elapsed() < Duration::from_millis(10) {
                std::hint::spin_loop();
            }
            q.abort(Some((0, None)));
            for w in &waiters {
                assert_eq!(w.answered(), Some(Response::Invalid), "round {round}: a group escaped the abort");
            }
        }
        // The other device's last request needs the handler.
        stop_other.store(true, Ordering::Relaxed);
        other.join().unwrap();
        stop.store(true, Ordering::Relaxed);
        handler.join().unwrap();
        assert_eq!(q.lost(), (300 * 32, 0));
    }

    /// A lent read shows the groups where they wait for their response:
    /// they are answered by the cookies it gave, or put back unread, in
    /// order, readable again (and told so).
    #[test]
    fn lent_groups_stay_pending_and_go_back_whole() {
        let q = FaultQueue::new();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        q.set_notifier(Box::new(move |r| s.lock().push(r)));
        let mut waiters = Vec::new();
        for dev_id in 1..=3 {
            let (g, w) = Group::awaited(vec![PageRequest { dev_id, ..group().requests[0].clone() }]);
            q.report(g);
            waiters.push(w);
        }
        assert!(q.wait_for_requests(Duration::ZERO));
        let lent = q.lend(2).unwrap();
        let got: Vec<(u32, u32)> = lent.iter().map(|(c, g)| (c, g.requests[0].dev_id)).collect();
        assert_eq!((got, lent.len()), (vec![(1, 1), (2, 2)], 2));
        lent.unread();
        assert_eq!(q.counts(), (3, 0));
        let lent = q.lend(8).unwrap();
        let got: Vec<(u32, u32)> = lent.iter().map(|(c, g)| (c, g.requests[0].dev_id)).collect();
        assert_eq!(got, [(1, 1), (2, 2), (3, 3)], "put back at the head, in order");
        drop(lent);
        assert_eq!(q.counts(), (0, 3));
        assert!(!q.wait_for_requests(Duration::ZERO));
        assert_eq!(*seen.lock(), [true, true, false], "ready, ready again once put back, empty");
        let mut r = q.responses();
        assert_eq!(r.respond(2, Response::Invalid).unwrap().requests[0].dev_id, 2);
        r.respond(1, Response::Success).unwrap();
        assert!(r.respond(2, Response::Success).is_err(), "answered already");
        drop(r);
        let answers: Vec<_> = waiters.iter().map(|w| w.answered()).collect();
        assert_eq!(answers, [Some(Response::Success), Some(Response::Invalid), None]);
        assert!(q.lend(8).unwrap().is_empty());
        assert_eq!(q.counts(), (0, 1));
    }

    #[test]
    fn a_spin_that_misses_shortens_the_next_and_one_that_catches_lengthens_it() {
        let spin = AtomicU64::new(SPIN.as_nanos() as u64);
        assert!(!spin_until(&spin, || false));
        assert_eq!(spin.load(Ordering::Relaxed), SPIN.as_nanos() as u64 / 2);
        for _ in 0..20 {
            spin_until(&spin, || false);
        }
        assert_eq!(spin.load(Ordering::Relaxed), MIN_SPIN.as_nanos() as u64);
        assert!(spin_until(&spin, || true));
        assert_eq!(spin.load(Ordering::Relaxed), 2 * MIN_SPIN.as_nanos() as u64);
        // Done a few checks in: caught too.
        let checks = std::cell::Cell::new(0);
        assert!(spin_until(&spin, || {
            checks.set(checks.get() + 1);
            checks.get() > 3
        }));
        assert_eq!(spin.load(Ordering::Relaxed), 4 * MIN_SPIN.as_nanos() as u64);
    }
}

#[cfg(test)]
mod batch_tests {
    use super::wait_tests::request;
    use super::*;

    /// Each group of a batch is read and answered on its own cookie; the
    /// batch counts the answers, and is empty again once waited for.
    #[test]
    fn a_batch_counts_each_groups_answer_and_starts_again() {
        let q = FaultQueue::new();
        let mut batch = Batch::new();
        let mut reports = q.report_batch(&mut batch);
        for dev_id in 1..=3 {
            reports.report(&[request(dev_id)]);
        }
        drop(reports);
        assert_eq!((batch.len(), batch.answered()), (3, None));
        let got: Vec<(u32, u32)> = q.read(8).unwrap().iter().map(|(c, g)| (*c, g.requests[0].dev_id)).collect();
        assert_eq!(got, [(1, 1), (2, 2), (3, 3)]);
        let mut r = q.responses();
        r.answer(2, Response::Invalid).unwrap();
        r.respond(1, Response::Success).unwrap();
        assert!(r.answer(2, Response::Success).is_err(), "answered already");
        drop(r);
        assert_eq!(batch.answered(), None, "one group is still unanswered");
        q.responses().answer(3, Response::Success).unwrap();
        assert_eq!(batch.wait(), Answered { success: 2, invalid: 1 });
        assert!(batch.is_empty());
        // Reused: the lists the answers left carry the next groups.
        let mut reports = q.report_batch(&mut batch);
        reports.report(&[request(4), request(4)]);
        drop(reports);
        let (cookie, g) = q.next(Duration::ZERO).unwrap();
        assert_eq!(g.requests, [request(4), request(4)]);
        q.responses().answer(cookie, Response::Success).unwrap();
        assert_eq!(batch.wait_for(Duration::ZERO), Some(Answered { success: 1, invalid: 0 }));
    }

    #[test]
    fn a_wait_for_answers_that_do_not_come_ends_at_its_timeout() {
        let q = FaultQueue::new();
        let mut batch = Batch::new();
        q.report_batch(&mut batch).report(&[request(1)]);
        let since = Instant::now();
        assert_eq!(batch.wait_for(Duration::from_millis(100)), None);
        assert!(since.elapsed() < Duration::from_secs(5));
        let (cookie, _) = q.next(Duration::ZERO).unwrap();
        q.responses().answer(cookie, Response::Success).unwrap();
        assert_eq!(batch.wait_for(Duration::from_millis(100)), Some(Answered { success: 1, invalid: 0 }));
    }

    /// Groups of a batch that the queue has no room for, or that an abort
    /// takes, are answered `Invalid`: a device never waits on a lost one.
    #[test]
    fn a_full_queue_and_an_abort_answer_a_batch_invalid() {
        let q = FaultQueue::new();
        let mut batch = Batch::new();
        let mut reports = q.report_batch(&mut batch);
        for _ in 0..QUEUE_LIMIT + 2 {
            reports.report(&[request(1)]);
        }
        drop(reports);
        assert_eq!(q.lost(), (0, 2));
        q.read(1).unwrap();
        q.abort(Some((1, None)));
        assert_eq!(batch.wait_for(Duration::ZERO), Some(Answered { success: 0, invalid: QUEUE_LIMIT as u32 + 2 }));
    }

    /// The handler answers each batch in several writes, from two threads,
    /// sometimes late enough that the device has gone to sleep: the answer
    /// that completes a batch must wake it, whichever thread gives it. A
    /// lost wake-up leaves the device asleep until its wait times out.
    #[test]
    fn the_last_answer_of_a_batch_always_wakes_the_device() {
        let q = FaultQueue::new();
        let stop = Arc::new(AtomicBool::new(false));
        let handlers: Vec<_> = (0..2u64)
            .map(|seed| {
                let (q, stop) = (q.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut rng = fastrand::Rng::with_seed(seed);
                    let mut cookies = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        if !q.wait_for_requests(Duration::from_millis(1)) {
                            continue;
                        }
                        if rng.u8(..8) == 0 {
                            // Past any spin: the device sleeps.
                            std::thread::sleep(Duration::from_micros(rng.u64(50..300)));
                        }
                        cookies.clear();
                        cookies.extend(q.lend(rng.usize(1..6)).unwrap().iter().map(|(c, _)| c));
                        let mut r = q.responses();
                        for &c in &cookies {
                            let response = if c % 5 == 0 { Response::Invalid } else { Response::Success };
                            r.answer(c, response).unwrap();
                        }
                    }
                })
            })
            .collect();
        let mut rng = fastrand::Rng::with_seed(7);
        let mut batch = Batch::new();
        for round in 0..3000 {
            let n = rng.u32(1..12);
            let mut reports = q.report_batch(&mut batch);
            for _ in 0..n {
                reports.report(&[request(1)]);
            }
            drop(reports);
            // The answers may all be in by the time a lost wake-up times
            // out: the time it took tells.
            let since = Instant::now();
            let got = batch.wait_for(Duration::from_secs(2));
            assert!(since.elapsed() < Duration::from_secs(1), "round {round}: the device was not woken");
            assert_eq!(got.map(|a| a.success + a.invalid), Some(n), "round {round}");
        }
        stop.store(true, Ordering::Relaxed);
        for h in handlers {
            h.join().unwrap();
        }
    }
}
