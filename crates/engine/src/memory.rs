//! Raw host memory: the only module of the engine that dereferences addresses
//! it did not allocate itself (page tables excepted, see `pgtable`).
//!
//! A page-table entry holds a host virtual address. Who vouches for that
//! address decides how it is touched:
//! - [`Trust::Direct`]: memory the embedding program promised to keep mapped
//!   (`Ioas::map_user` is `unsafe` for that reason) or that the engine
//!   allocated itself. Copies are plain `memcpy`s.
//! - [`Trust::Checked`]: addresses that came through the ABI from a program
//!   that may unmap them at any time, and files the engine mapped itself,
//!   which anyone may truncate under the mapping (`SIGBUS` past the new
//!   end). A bad address must be an error (`EFAULT`), never a crash. On x86-64 the copy is one `rep movsb` whose
//!   faults a signal handler turns into a short count, as the kernel's
//!   exception table does for `copy_from_user`: no system call per copy.
//!   Elsewhere copies go through `process_vm_readv`/`process_vm_writev`.
//!   What that asks of the program's own signal handling is in `guarded`.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::ptr::NonNull;

use crate::error::{Error, Result};
use crate::iova::PAGE_SIZE;

/// Who vouches that a host address stays mapped, and so how it may be
/// touched (see the module docs): carried by pages into page-table entries,
/// IOTLB hits and [`Translated`](crate::Translated).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trust {
    /// Kept mapped by whoever mapped it (the `unsafe` contract of
    /// `Context::map_user`) or owned by the engine: plain copies.
    Direct,
    /// May vanish at any time (a program's memory reached through the ABI,
    /// a file that can shrink): copies that turn a fault into `Fault`
    /// (EFAULT) instead of a crash.
    Checked,
}

/// Copies `buf.len()` bytes from host address `addr` into `buf`.
#[inline]
pub fn read(trust: Trust, addr: u64, buf: &mut [u8]) -> Result<()> {
    if buf.is_empty() {
        return Ok(());
    }
    match trust {
        Trust::Direct => {
            // SAFETY: Direct addresses are mapped for as long as the mapping
            // that produced them exists (the caller of `map_user` promised it,
            // or the engine owns the file mapping), and DMA runs inside an
            // epoch critical section that unmap waits for.
            unsafe { std::ptr::copy_nonoverlapping(addr as *const u8, buf.as_mut_ptr(), buf.len()) };
            Ok(())
        }
        Trust::Checked => checked_copy(addr as *const u8, buf.as_mut_ptr(), buf.len(), false),
    }
}

/// Copies `buf` to host address `addr`.
#[inline]
pub fn write(trust: Trust, addr: u64, buf: &[u8]) -> Result<()> {
    if buf.is_empty() {
        return Ok(());
    }
    match trust {
        Trust::Direct => {
            // SAFETY: as in `read`; the mapping was checked writable by the
            // permission bits of the page-table entry that yielded `addr`.
            unsafe { std::ptr::copy_nonoverlapping(buf.as_ptr(), addr as *mut u8, buf.len()) };
            Ok(())
        }
        Trust::Checked => checked_copy(buf.as_ptr(), addr as *mut u8, buf.len(), true),
    }
}

/// Copies `len` bytes; the side that is user memory (`dst` when `to_user`)
/// may be unmapped, which fails the copy.
#[cfg(target_arch = "x86_64")]
fn checked_copy(src: *const u8, dst: *mut u8, len: usize, _to_user: bool) -> Result<()> {
    guarded::install_fault_handler();
    guarded::settle_fault_signal_mask();
    // SAFETY: one side is a live Rust buffer of `len` bytes; the other is the
    // untrusted address, whose faults the installed handler turns into a
    // short count, so no access outside the range happens and none crashes.
    let left = unsafe { guarded::ioasid_guarded_copy(dst, src, len) };
    if left == 0 { Ok(()) } else { Err(Error::Fault("user memory is not mapped")) }
}

#[cfg(not(target_arch = "x86_64"))]
fn checked_copy(src: *const u8, dst: *mut u8, len: usize, to_user: bool) -> Result<()> {
    if to_user { vm_copy(dst as u64, src as *mut u8, len, true) } else { vm_copy(src as u64, dst, len, false) }
}

pub use guarded::{
    FAULT_SIGNALS, HandlerFrame, SignalAction, call_handler, enter_program_handler, install_fault_handler,
    ioasid_thread_signals, leave_program_handler, program_blocked_fault_signals, program_fault_action,
    release_held_fault_signals, set_program_blocked_fault_signals, set_program_fault_action, settle_fault_signal_mask,
    sigset_bits, sigset_from_bits,
};

/// SIGSEGV and SIGBUS belong to the guarded copy.
///
/// `ioasid_guarded_copy(dst, src, len)` copies with one `rep movsb` and
/// returns how many bytes it did not copy. A `SIGSEGV` or `SIGBUS` raised by
/// that instruction resumes right after it, where `rcx` still counts the
/// bytes left. For that to hold whatever the program does, the kernel must
/// always run ioasid's handler for those two signals, and must never have
/// them blocked in a thread that copies (it forces a blocked fault signal to
/// its default action: death). So ioasid keeps the kernel's side and the
/// program's side apart:
/// - the *program's action* for each of the two signals (what it set last,
///   or what was installed before ioasid) is the one faults that are not the
///   copy's go to, with the kernel's semantics: its mask and flags, default
///   action when the program blocked the signal or ignores a fault;
/// - the *program's mask* for them is kept per thread, and only there; a
///   handler the program runs may block them in the kernel for its duration
///   (as the kernel would), and a thread that left such a handler with a
///   jump has the block moved back to its own side before its next copy.
///
/// Under the preload shim, the shim routes the program's `sigaction`,
/// `signal`, `sigprocmask` and `pthread_sigmask` through these, so the
/// program's view is exact. A program that embeds the engine as a library
/// (`InProcess`) has no such interception: installing its own SIGSEGV or
/// SIGBUS handler after ioasid's first checked copy replaces ioasid's, and
/// a fault in a copy then reaches its handler (or kills it) instead of
/// failing with `EFAULT`. Such a program sets its actions through
/// [`set_program_fault_action`] (ioasid chains to them), or chains to the
/// action its own `sigaction` call displaced, and leaves both signals
/// unblocked in threads that make checked copies (or records the wish with
/// [`set_program_blocked_fault_signals`]).
mod guarded {
    use std::cell::Cell;
    use std::ffi::{c_int, c_void};
    use std::sync::Once;
    use std::sync::atomic::{AtomicI32, AtomicU32, AtomicU64, AtomicUsize, Ordering, fence};

    #[cfg(target_arch = "x86_64")]
    std::arch::global_asm!(
        ".pushsection .text.ioasid_guarded_copy,\"ax\",@progbits",
        ".globl ioasid_guarded_copy",
        ".hidden ioasid_guarded_copy",
        ".type ioasid_guarded_copy,@function",
        "ioasid_guarded_copy:",
        "    mov rcx, rdx",
        ".globl ioasid_guarded_copy_insn",
        ".hidden ioasid_guarded_copy_insn",
        "ioasid_guarded_copy_insn:",
        "    rep movsb",
        ".globl ioasid_guarded_copy_resume",
        ".hidden ioasid_guarded_copy_resume",
        "ioasid_guarded_copy_resume:",
        "    mov rax, rcx",
        "    ret",
        ".size ioasid_guarded_copy, . - ioasid_guarded_copy",
        ".popsection",
    );

    #[cfg(target_arch = "x86_64")]
    unsafe extern "C" {
        pub fn ioasid_guarded_copy(dst: *mut u8, src: *const u8, len: usize) -> usize;
        static ioasid_guarded_copy_insn: u8;
        static ioasid_guarded_copy_resume: u8;
    }

    /// SIGSEGV and SIGBUS as bits of a kernel signal set (signal `n` is bit
    /// `n - 1`, as in the first word of a `sigset_t`).
    pub const FAULT_SIGNALS: u64 = bit(libc::SIGSEGV) | bit(libc::SIGBUS);

    const fn bit(sig: c_int) -> u64 {
        1 << (sig - 1)
    }

    /// Signals 1 to 64 of `set`, as bits.
    pub fn sigset_bits(set: &libc::sigset_t) -> u64 {
        // SAFETY: glibc's sigset_t is an array of words whose first holds
        // signals 1 to 64, and it is larger than one u64.
        unsafe { std::ptr::from_ref(set).cast::<u64>().read() }
    }

    /// A `sigset_t` holding the signals of `bits`.
    pub fn sigset_from_bits(bits: u64) -> libc::sigset_t {
        // SAFETY: an all-zero sigset_t is the empty set; the first word is
        // written as in `sigset_bits`.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            std::ptr::from_mut(&mut set).cast::<u64>().write(bits);
            set
        }
    }

    type SigactionFn = unsafe extern "C" fn(c_int, *const libc::sigaction, *mut libc::sigaction) -> c_int;
    type SigmaskFn = unsafe extern "C" fn(c_int, *const libc::sigset_t, *mut libc::sigset_t) -> c_int;

    /// The C library's `sigaction` and `pthread_sigmask`, past any library
    /// (the preload shim) that stands in for them in this process.
    static REAL_SIGACTION: AtomicUsize = AtomicUsize::new(0);
    static REAL_SIGMASK: AtomicUsize = AtomicUsize::new(0);

    fn resolve(cell: &AtomicUsize, name: &std::ffi::CStr, fallback: usize) -> usize {
        let p = cell.load(Ordering::Acquire);
        if p != 0 {
            return p;
        }
        // SAFETY: dlsym with a nul-terminated name; RTLD_NEXT searches the
        // objects loaded after the one this code is in.
        let found = unsafe { libc::dlsym(libc::RTLD_NEXT, name.as_ptr()) } as usize;
        let p = if found == 0 { fallback } else { found };
        cell.store(p, Ordering::Release);
        p
    }

    fn real_sigaction(sig: c_int, new: *const libc::sigaction, old: *mut libc::sigaction) -> c_int {
        let f = resolve(&REAL_SIGACTION, c"sigaction", libc::sigaction as *const () as usize);
        // SAFETY: the address of the C library's sigaction, called with its
        // signature; the pointers are the caller's (null or valid).
        unsafe { std::mem::transmute::<usize, SigactionFn>(f)(sig, new, old) }
    }

    fn real_sigmask(how: c_int, bits: u64) -> u64 {
        let f = resolve(&REAL_SIGMASK, c"pthread_sigmask", libc::pthread_sigmask as *const () as usize);
        let set = sigset_from_bits(bits);
        // SAFETY: an all-zero sigset_t is a valid set to be written.
        let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: the C library's pthread_sigmask with two valid sets; it
        // leaves the signals it reserves for itself alone.
        unsafe { std::mem::transmute::<usize, SigmaskFn>(f)(how, &set, &mut old) };
        sigset_bits(&old)
    }

    /// A signal's action, readable inside a signal handler while another
    /// thread replaces it (a sequence lock over plain atomics).
    pub struct SignalAction {
        seq: AtomicU32,
        handler: AtomicUsize,
        flags: AtomicI32,
        mask: AtomicU64,
    }

    impl Default for SignalAction {
        fn default() -> Self {
            SignalAction::new()
        }
    }

    impl SignalAction {
        /// The default action.
        pub const fn new() -> Self {
            SignalAction {
                seq: AtomicU32::new(0),
                handler: AtomicUsize::new(libc::SIG_DFL),
                flags: AtomicI32::new(0),
                mask: AtomicU64::new(0),
            }
        }

        /// The action as last stored, consistent even against a concurrent
        /// `store`; async-signal-safe.
        pub fn load(&self) -> libc::sigaction {
            loop {
                let before = self.seq.load(Ordering::Acquire);
                if before & 1 == 0 {
                    let handler = self.handler.load(Ordering::Relaxed);
                    let flags = self.flags.load(Ordering::Relaxed);
                    let mask = self.mask.load(Ordering::Relaxed);
                    fence(Ordering::Acquire);
                    if self.seq.load(Ordering::Relaxed) == before {
                        // SAFETY: an all-zero sigaction is valid; the
                        // fields set are plain values.
                        let mut a: libc::sigaction = unsafe { std::mem::zeroed() };
                        a.sa_sigaction = handler;
                        a.sa_flags = flags;
                        a.sa_mask = sigset_from_bits(mask);
                        return a;
                    }
                }
                std::hint::spin_loop();
            }
        }

        /// Replaces the action. A thread must not be interrupted here by a
        /// handler that loads the same action (it would wait on itself).
        pub fn store(&self, a: &libc::sigaction) {
            let mut seq = self.seq.load(Ordering::Relaxed);
            loop {
                if seq & 1 == 0 {
                    match self.seq.compare_exchange_weak(seq, seq + 1, Ordering::Acquire, Ordering::Relaxed) {
                        Ok(_) => break,
                        Err(now) => seq = now,
                    }
                } else {
                    std::hint::spin_loop();
                    seq = self.seq.load(Ordering::Relaxed);
                }
            }
            fence(Ordering::Release);
            self.handler.store(a.sa_sigaction, Ordering::Relaxed);
            self.flags.store(a.sa_flags, Ordering::Relaxed);
            self.mask.store(sigset_bits(&a.sa_mask), Ordering::Relaxed);
            self.seq.store(seq + 2, Ordering::Release);
        }
    }

    /// The program's actions for SIGSEGV and SIGBUS.
    static PROGRAM: [SignalAction; 2] = [SignalAction::new(), SignalAction::new()];

    fn slot(sig: c_int) -> Option<&'static SignalAction> {
        match sig {
            libc::SIGSEGV => Some(&PROGRAM[0]),
            libc::SIGBUS => Some(&PROGRAM[1]),
            _ => None,
        }
    }

    thread_local! {
        /// Of SIGSEGV and SIGBUS, those the program has blocked in this
        /// thread (the kernel has them unblocked).
        static PROGRAM_BLOCKED: Cell<u64> = const { Cell::new(0) };
        /// Faults the program blocked that arrived from kill() and the
        /// like, held until it unblocks them.
        static HELD: Cell<u64> = const { Cell::new(0) };
        /// Set while the kernel may hold SIGSEGV or SIGBUS blocked for this
        /// thread: a program handler whose mask has them runs, or was left
        /// by a jump that did not restore the mask.
        static KERNEL_MAY_BLOCK: Cell<bool> = const { Cell::new(false) };
    }

    /// The program's action for `sig` (SIGSEGV or SIGBUS).
    pub fn program_fault_action(sig: c_int) -> Option<libc::sigaction> {
        install_fault_handler();
        slot(sig).map(SignalAction::load)
    }

    /// Makes `action` the program's action for `sig` (SIGSEGV or SIGBUS):
    /// faults that are not ioasid's copy's go to it. Returns the previous one.
    pub fn set_program_fault_action(sig: c_int, action: &libc::sigaction) -> Option<libc::sigaction> {
        install_fault_handler();
        let slot = slot(sig)?;
        let old = slot.load();
        slot.store(action);
        Some(old)
    }

    /// Of SIGSEGV and SIGBUS (as [`FAULT_SIGNALS`] bits), those the program
    /// has blocked in the calling thread.
    pub fn program_blocked_fault_signals() -> u64 {
        settle_fault_signal_mask();
        PROGRAM_BLOCKED.get()
    }

    /// Records which of SIGSEGV and SIGBUS the program has blocked in the
    /// calling thread; the kernel keeps them unblocked.
    pub fn set_program_blocked_fault_signals(bits: u64) {
        PROGRAM_BLOCKED.set(bits & FAULT_SIGNALS);
    }

    /// The program unblocked `bits`: the faults sent to it meanwhile are
    /// delivered now.
    pub fn release_held_fault_signals(bits: u64) {
        let held = HELD.get() & bits;
        HELD.set(HELD.get() & !held);
        for sig in [libc::SIGSEGV, libc::SIGBUS] {
            if held & bit(sig) != 0 {
                // SAFETY: raise has no preconditions; the handler runs now.
                unsafe { libc::raise(sig) };
            }
        }
    }

    /// Moves into the program's mask whatever block of SIGSEGV or SIGBUS a
    /// program handler left in the kernel, so the next copy's fault reaches
    /// ioasid. No system call unless a program handler ran since the last.
    pub fn settle_fault_signal_mask() {
        if !KERNEL_MAY_BLOCK.get() {
            return;
        }
        KERNEL_MAY_BLOCK.set(false);
        let old = real_sigmask(libc::SIG_UNBLOCK, FAULT_SIGNALS);
        PROGRAM_BLOCKED.set(PROGRAM_BLOCKED.get() | (old & FAULT_SIGNALS));
    }

    /// The thread's signal state saved around a program handler, restored
    /// when the handler returns (as the kernel restores the mask).
    #[derive(Debug, Clone, Copy)]
    pub struct HandlerFrame {
        blocked: u64,
        may_block: bool,
    }

    /// Called before a program handler runs with `mask` blocked in the
    /// kernel.
    pub fn enter_program_handler(mask: u64) -> HandlerFrame {
        let frame = HandlerFrame { blocked: PROGRAM_BLOCKED.get(), may_block: KERNEL_MAY_BLOCK.get() };
        if mask & FAULT_SIGNALS != 0 {
            KERNEL_MAY_BLOCK.set(true);
        }
        frame
    }

    /// Called when the handler `enter_program_handler` saw returns. One
    /// left by a jump never gets here, and its mask stays as the jump left
    /// it, as in the kernel.
    pub fn leave_program_handler(frame: HandlerFrame) {
        PROGRAM_BLOCKED.set(frame.blocked);
        KERNEL_MAY_BLOCK.set(frame.may_block);
    }

    /// Calls `action`'s handler as the kernel would.
    ///
    /// # Safety
    /// `action` holds a handler of the program's, and `info` and `context`
    /// are the ones the kernel passed for `sig`.
    pub unsafe fn call_handler(action: &libc::sigaction, sig: c_int, info: *mut libc::siginfo_t, context: *mut c_void) {
        // SAFETY: the caller's contract: a handler address, called with the
        // signature its flags declare.
        unsafe {
            if action.sa_flags & libc::SA_SIGINFO != 0 {
                let f: extern "C" fn(c_int, *mut libc::siginfo_t, *mut c_void) =
                    std::mem::transmute(action.sa_sigaction);
                f(sig, info, context)
            } else {
                let f: extern "C" fn(c_int) = std::mem::transmute(action.sa_sigaction);
                f(sig)
            }
        }
    }

    /// Gives the calling thread, one of ioasid's own, the mask its threads
    /// need: SIGSEGV and SIGBUS unblocked for the guarded copy, every other
    /// signal blocked, since the program's handlers belong on its threads.
    /// The fork server thread (`serve` in the preload shim's `fork.rs`)
    /// calls it first thing; any thread ioasid spawns must.
    pub fn ioasid_thread_signals() {
        real_sigmask(libc::SIG_SETMASK, !FAULT_SIGNALS);
        PROGRAM_BLOCKED.set(0);
        KERNEL_MAY_BLOCK.set(false);
    }

    /// Installs ioasid's SIGSEGV and SIGBUS handler, once; what was
    /// installed before becomes the program's action.
    pub fn install_fault_handler() {
        static ONCE: Once = Once::new();
        ONCE.call_once(|| {
            // Looked up now: a handler must not call dlsym.
            resolve(&REAL_SIGMASK, c"pthread_sigmask", libc::pthread_sigmask as *const () as usize);
            for sig in [libc::SIGSEGV, libc::SIGBUS] {
                // SAFETY: zeroed sigactions are valid; both calls pass
                // valid pointers.
                unsafe {
                    let mut old: libc::sigaction = std::mem::zeroed();
                    real_sigaction(sig, std::ptr::null(), &mut old);
                    slot(sig).expect("a fault signal").store(&old);
                    let mut new: libc::sigaction = std::mem::zeroed();
                    new.sa_sigaction = on_fault as *const () as usize;
                    // SA_NODEFER: the kernel never blocks the signal for
                    // ioasid's own handler, so a program handler left by a
                    // jump cannot leave it blocked behind ioasid's back.
                    new.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK | libc::SA_NODEFER;
                    libc::sigemptyset(&mut new.sa_mask);
                    real_sigaction(sig, &new, std::ptr::null_mut());
                }
            }
        });
    }

    extern "C" fn on_fault(sig: c_int, info: *mut libc::siginfo_t, context: *mut c_void) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the kernel passes a valid ucontext for an SA_SIGINFO
        // handler; the faulting thread is stopped while we edit its rip.
        unsafe {
            let gregs = &mut (*context.cast::<libc::ucontext_t>()).uc_mcontext.gregs;
            let rip = &mut gregs[libc::REG_RIP as usize];
            if *rip as usize == &raw const ioasid_guarded_copy_insn as usize {
                *rip = &raw const ioasid_guarded_copy_resume as i64;
                return;
            }
        }
        // SAFETY: the kernel's arguments for this signal, passed on.
        unsafe { chain(sig, info, context) }
    }

    /// A fault that is not the copy's: what the kernel would have done with
    /// the program's action and mask.
    unsafe fn chain(sig: c_int, info: *mut libc::siginfo_t, context: *mut c_void) {
        let Some(slot) = slot(sig) else { return };
        let action = slot.load();
        // SAFETY: the kernel's siginfo for this signal.
        let code = unsafe { (*info).si_code };
        // A fault of the thread itself, not a signal someone sent.
        let forced = code > 0;
        let blocked = PROGRAM_BLOCKED.get() & bit(sig) != 0;
        let handler = action.sa_sigaction;
        if !forced && (handler == libc::SIG_IGN || blocked) {
            if blocked && handler != libc::SIG_IGN {
                HELD.set(HELD.get() | bit(sig));
            }
            return;
        }
        if forced && (blocked || handler == libc::SIG_IGN) || handler == libc::SIG_DFL {
            // The default action, as the kernel forces it: back to SIG_DFL;
            // a fault re-executes and kills, a sent signal is sent again.
            // SAFETY: an all-zero sigaction is SIG_DFL with no flags.
            let dfl: libc::sigaction = unsafe { std::mem::zeroed() };
            real_sigaction(sig, &dfl, std::ptr::null_mut());
            if !forced {
                // SAFETY: raise has no preconditions.
                unsafe { libc::raise(sig) };
            }
            return;
        }
        let mut mask = sigset_bits(&action.sa_mask);
        if action.sa_flags & libc::SA_NODEFER == 0 {
            mask |= bit(sig);
        }
        if action.sa_flags & libc::SA_RESETHAND != 0 {
            // SAFETY: as above.
            slot.store(&unsafe { std::mem::zeroed() });
        }
        let frame = enter_program_handler(mask);
        real_sigmask(libc::SIG_BLOCK, mask);
        // SAFETY: the program's handler for `sig`, with the kernel's
        // arguments; the mask is restored when ours returns.
        unsafe { call_handler(&action, sig, info, context) };
        leave_program_handler(frame);
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn vm_copy(remote: u64, local: *mut u8, len: usize, to_remote: bool) -> Result<()> {
    // SAFETY: getpid has no preconditions.
    process_copy(unsafe { libc::getpid() }, remote, local, len, to_remote)
}

/// Copies `buf.len()` bytes from address `addr` of process `pid` (another
/// process sharing an iommufd, a forked child): `EFAULT` when the memory or
/// the process is gone.
pub fn read_process(pid: i32, addr: u64, buf: &mut [u8]) -> Result<()> {
    process_copy(pid, addr, buf.as_mut_ptr(), buf.len(), false)
}

/// Copies `data` to address `addr` of process `pid`.
pub fn write_process(pid: i32, addr: u64, data: &[u8]) -> Result<()> {
    process_copy(pid, addr, data.as_ptr() as *mut u8, data.len(), true)
}

fn process_copy(pid: i32, remote: u64, local: *mut u8, len: usize, to_remote: bool) -> Result<()> {
    // One call moves at most about 2 GiB (the kernel's MAX_RW_COUNT), and
    // may stop short at any page: go on from where it stopped, until it
    // moves nothing.
    let mut done = 0usize;
    while done < len {
        let n = (len - done).min(1 << 30);
        let local_iov = libc::iovec { iov_base: local.wrapping_add(done).cast(), iov_len: n };
        let remote_iov = libc::iovec { iov_base: (remote + done as u64) as *mut libc::c_void, iov_len: n };
        // SAFETY: the local iovec is `n` bytes inside a live Rust buffer of
        // `len` bytes (read-only when copying out); the kernel checks the
        // remote one against `pid`'s memory and fails rather than touching
        // anything unmapped.
        let moved = unsafe {
            if to_remote {
                libc::process_vm_writev(pid, &local_iov, 1, &remote_iov, 1, 0)
            } else {
                libc::process_vm_readv(pid, &local_iov, 1, &remote_iov, 1, 0)
            }
        };
        if moved <= 0 {
            return Err(Error::Fault("the other process's memory is not mapped"));
        }
        done += moved as usize;
    }
    Ok(())
}

/// Copies what process `pid` holds at `[addr, addr + len)` into our memory
/// at `dst` (which must be `len` bytes of zeroed memory the engine owns), as
/// Linux's pin would take it: `EFAULT` unless all of it is mapped readable
/// in `pid` (and writable, when `writable`). Only pages with contents are
/// copied: of private anonymous memory, the pages `pid` has populated
/// (`/proc/<pid>/pagemap`); of any memory, pages that are not all zero. So
/// the time and memory it takes follow what `pid` has written there, not
/// the length of the range.
pub(crate) fn take_process(pid: i32, addr: u64, len: u64, dst: u64, writable: bool) -> Result<()> {
    let spans = covering(pid, addr, len, writable)?;
    let mut scratch = vec![0u8; TAKE_CHUNK];
    let mut pagemap = std::fs::File::open(format!("/proc/{pid}/pagemap")).ok();
    for (r, at, stop) in spans {
        let sparse = !r.shared && r.inode == 0;
        let populated = match (&mut pagemap, sparse) {
            (Some(pm), true) => populated_runs(pm, at, stop),
            _ => None,
        };
        for (start, run_end) in populated.unwrap_or_else(|| vec![(at, stop)]) {
            copy_nonzero(pid, start, run_end - start, dst + (start - addr), &mut scratch)?;
        }
    }
    Ok(())
}

/// The mappings of process `pid` that cover `[addr, addr + len)`, each with
/// the part of the range it holds: `EFAULT` unless all of the range is
/// mapped readable (and writable, when `writable`), as Linux's pin checks.
fn covering(pid: i32, addr: u64, len: u64, writable: bool) -> Result<Vec<(Region, u64, u64)>> {
    let gone = Error::Fault("the other process's memory is not mapped");
    let end = addr.checked_add(len).ok_or(Error::Overflow("address + length wraps"))?;
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).map_err(|_| gone)?;
    let mut spans = Vec::new();
    let mut at = addr;
    for r in maps.lines().filter_map(Region::parse) {
        if at >= end {
            break;
        }
        if r.end <= at {
            continue;
        }
        if r.start > at || !r.readable || (writable && !r.writable) {
            return Err(gone);
        }
        let stop = r.end.min(end);
        spans.push((r, at, stop));
        at = stop;
    }
    if at < end { Err(gone) } else { Ok(spans) }
}

/// Bytes read from another process at a time while taking its memory.
const TAKE_CHUNK: usize = 1 << 20;

/// The runs of `[start, end)` (page aligned) whose pages are present or
/// swapped out, from a process's pagemap; `None` if it cannot be read.
fn populated_runs(pagemap: &mut std::fs::File, start: u64, end: u64) -> Option<Vec<(u64, u64)>> {
    use std::os::unix::fs::FileExt;
    const PRESENT_OR_SWAPPED: u64 = 3 << 62;
    const ENTRIES: u64 = 4096;
    let mut runs: Vec<(u64, u64)> = Vec::new();
    let mut raw = vec![0u8; ENTRIES as usize * 8];
    let mut page = start / PAGE_SIZE;
    let last = end.div_ceil(PAGE_SIZE);
    while page < last {
        let n = (last - page).min(ENTRIES);
        let bytes = &mut raw[..n as usize * 8];
        pagemap.read_exact_at(bytes, page * 8).ok()?;
        for (k, entry) in bytes.chunks_exact(8).enumerate() {
            let entry = u64::from_ne_bytes(entry.try_into().expect("8 bytes"));
            if entry & PRESENT_OR_SWAPPED == 0 {
                continue;
            }
            let at = ((page + k as u64) * PAGE_SIZE).max(start);
            let to = ((page + k as u64 + 1) * PAGE_SIZE).min(end);
            match runs.last_mut() {
                Some(run) if run.1 == at => run.1 = to,
                _ => runs.push((at, to)),
            }
        }
        page += n;
    }
    Some(runs)
}

/// Copies `[addr, addr + len)` of process `pid` to our `dst`, a chunk at a
/// time through `scratch`, writing only the pages that are not all zero
/// (`dst` is zeroed already, and stays untouched, unallocated, there).
fn copy_nonzero(pid: i32, addr: u64, len: u64, dst: u64, scratch: &mut [u8]) -> Result<()> {
    let mut off = 0;
    while off < len {
        let n = (len - off).min(scratch.len() as u64) as usize;
        let chunk = &mut scratch[..n];
        read_process(pid, addr + off, chunk)?;
        let mut k = 0;
        while k < n {
            // Page by page of `pid`'s address space.
            let to = (((addr + off + k as u64) / PAGE_SIZE + 1) * PAGE_SIZE - (addr + off)) as usize;
            let page = &chunk[k..to.min(n)];
            if page.iter().any(|&b| b != 0) {
                write(Trust::Direct, dst + off + k as u64, page)?;
            }
            k += page.len();
        }
        off += n as u64;
    }
    Ok(())
}

/// Whether `[addr, addr + len)` of process `pid` is shared memory that this
/// process maps at the same address (the same object at the same offset):
/// what a forked child inherits of its parent's `MAP_SHARED` mappings.
/// Such memory is one set of pages, reachable here directly.
pub(crate) fn shared_with(pid: i32, addr: u64, len: u64) -> bool {
    let (Ok(theirs), Ok(ours)) =
        (std::fs::read_to_string(format!("/proc/{pid}/maps")), std::fs::read_to_string("/proc/self/maps"))
    else {
        return false;
    };
    let end = addr.saturating_add(len);
    let shared = |maps: &str| -> Vec<Region> {
        maps.lines().filter_map(Region::parse).filter(|r| r.shared && r.start < end && addr < r.end).collect()
    };
    let (theirs, ours) = (shared(&theirs), shared(&ours));
    // Their shared regions must cover the range, each matched by ours.
    let mut at = addr;
    for r in &theirs {
        if r.start > at || !ours.iter().any(|o| o.same_object(r)) {
            return false;
        }
        at = at.max(r.end);
    }
    at >= end
}

/// Fails with `EFAULT` unless all of `[addr, addr + len)` is mapped
/// readable in process `pid` (and writable, when `writable`): the check
/// Linux's pin makes, done on a process whose pages cannot be held here.
pub fn process_mapped(pid: i32, addr: u64, len: u64, writable: bool) -> Result<()> {
    covering(pid, addr, len, writable).map(drop)
}

/// A mapping here of the shared memory (a memfd, a `MAP_SHARED` file or
/// shared anonymous memory) that process `pid` maps at `[addr, addr + len)`:
/// the same pages, so both see every write at once. `None` unless one
/// object, at consecutive offsets, is mapped shared across the whole range
/// and this process may open it (`/proc/<pid>/map_files`, or a descriptor
/// of it that `pid` holds).
pub(crate) fn map_process_shared(pid: i32, addr: u64, len: u64, writable: bool) -> Option<FileMapping> {
    let mut spans = covering(pid, addr, len, writable).ok()?.into_iter().map(|(r, _, _)| r);
    let first = spans.next()?;
    let one_object = |r: &Region| {
        r.shared
            && r.inode != 0
            && r.dev == first.dev
            && r.inode == first.inode
            && first.offset + (r.start - first.start) == r.offset
    };
    if !one_object(&first) || !spans.all(|r| one_object(&r)) {
        return None;
    }
    let file = open_process_object(pid, &first)?;
    use std::os::fd::AsFd;
    let offset = first.offset + (addr - first.start);
    FileMapping::new(file.as_fd(), offset, len, writable).ok()
}

/// Opens the object that `pid` maps at region `r`.
fn open_process_object(pid: i32, r: &Region) -> Option<std::fs::File> {
    // Read-write where allowed; a read-only object maps read-only.
    let open = |path: &std::path::Path| {
        std::fs::OpenOptions::new().read(true).write(true).open(path).or_else(|_| std::fs::File::open(path)).ok()
    };
    let by_map = format!("/proc/{pid}/map_files/{:x}-{:x}", r.start, r.end);
    if let Some(f) = open(by_map.as_ref()) {
        return Some(f);
    }
    // Without the capability map_files needs: a descriptor of the same
    // object that the process holds.
    let (major, minor) = r.dev.split_once(':')?;
    let (major, minor) = (u32::from_str_radix(major, 16).ok()?, u32::from_str_radix(minor, 16).ok()?);
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.flatten() {
        use std::os::unix::fs::MetadataExt;
        let Ok(meta) = std::fs::metadata(entry.path()) else { continue };
        let dev = meta.dev();
        if meta.ino() == r.inode
            && libc::major(dev) == major
            && libc::minor(dev) == minor
            && let Some(f) = open(&entry.path())
        {
            return Some(f);
        }
    }
    None
}

/// This process's mappings, to tell whether two addresses reach the same
/// page: Linux's mock compares the pages behind addresses, and memory the
/// engine maps of a file (`IOMMU_IOAS_MAP_FILE`) is at another address than
/// the program's own mapping of that file.
pub struct PageMap {
    regions: Vec<Region>,
}

impl PageMap {
    /// A snapshot of this process's mappings.
    pub fn of_self() -> Result<PageMap> {
        Self::of_file("/proc/self/maps")
    }

    /// A snapshot of process `pid`'s mappings.
    pub fn of(pid: i32) -> Result<PageMap> {
        Self::of_file(&format!("/proc/{pid}/maps"))
    }

    fn of_file(path: &str) -> Result<PageMap> {
        let maps = std::fs::read_to_string(path).map_err(|_| Error::Fault("mappings cannot be read"))?;
        let mut regions: Vec<Region> = maps.lines().filter_map(Region::parse).collect();
        regions.sort_by_key(|r| r.start);
        Ok(PageMap { regions })
    }

    fn region(&self, addr: u64) -> Option<&Region> {
        let i = self.regions.partition_point(|r| r.start <= addr).checked_sub(1)?;
        Some(&self.regions[i]).filter(|r| addr < r.end)
    }

    /// The object (a file, shared memory) that a shared mapping maps at
    /// `addr`, and the offset in it: `(device, inode, offset)`. `None` for
    /// private memory: a private mapping's pages are its own once written,
    /// and anonymous memory (inode 0) is named by its address alone.
    pub fn object_at(&self, addr: u64) -> Option<(&str, u64, u64)> {
        let r = self.region(addr).filter(|r| r.shared && r.inode != 0)?;
        Some((&r.dev, r.inode, r.offset.checked_add(addr - r.start)?))
    }

    /// Whether `a` and `b` are the same byte of the same page: the same
    /// address, or the same offset of one object that shared mappings at
    /// both addresses map.
    pub fn same_byte(&self, a: u64, b: u64) -> bool {
        a == b || self.object_at(a).is_some_and(|oa| self.object_at(b) == Some(oa))
    }
}

/// One line of `/proc/<pid>/maps`.
#[derive(Debug, PartialEq, Eq)]
struct Region {
    start: u64,
    end: u64,
    readable: bool,
    writable: bool,
    shared: bool,
    offset: u64,
    dev: String,
    inode: u64,
}

impl Region {
    fn parse(line: &str) -> Option<Region> {
        let mut f = line.split_whitespace();
        let (start, end) = f.next()?.split_once('-')?;
        let perms = f.next()?;
        let offset = u64::from_str_radix(f.next()?, 16).ok()?;
        let dev = f.next()?.to_string();
        let inode = f.next()?.parse().ok()?;
        Some(Region {
            start: u64::from_str_radix(start, 16).ok()?,
            end: u64::from_str_radix(end, 16).ok()?,
            readable: perms.as_bytes().first() == Some(&b'r'),
            writable: perms.as_bytes().get(1) == Some(&b'w'),
            shared: perms.as_bytes().get(3) == Some(&b's'),
            offset,
            dev,
            inode,
        })
    }

    /// The same object mapped at the same place and offset.
    fn same_object(&self, other: &Region) -> bool {
        self.start == other.start
            && self.end == other.end
            && self.offset == other.offset
            && self.dev == other.dev
            && self.inode == other.inode
    }
}

/// Fails with `EFAULT` unless every page of `[addr, addr + len)` is mapped;
/// this is the check that pinning does before memory enters a page table.
pub fn check_mapped(addr: u64, len: u64) -> Result<()> {
    if len == 0 {
        return Ok(());
    }
    let start = addr & !(PAGE_SIZE - 1);
    let end = addr.checked_add(len).ok_or(Error::Overflow("address + length wraps"))?;
    // Ask in chunks so the residency vector stays on the stack.
    const CHUNK_PAGES: u64 = 4096;
    let mut vec = [0u8; CHUNK_PAGES as usize];
    let mut cur = start;
    while cur < end {
        let n = (end - cur).min(CHUNK_PAGES * PAGE_SIZE);
        // SAFETY: mincore only inspects the mappings of the range and writes
        // one byte per page into `vec`, which has room for CHUNK_PAGES pages.
        let rc = unsafe { libc::mincore(cur as *mut libc::c_void, n as usize, vec.as_mut_ptr()) };
        if rc != 0 {
            return Err(Error::Fault("user memory is not mapped"));
        }
        cur += n;
    }
    Ok(())
}

/// A shared mapping of part of a file that the engine owns, so memory mapped
/// with `IOMMU_IOAS_MAP_FILE` stays valid whatever the program does with its
/// own mappings of the file.
#[derive(Debug)]
pub(crate) struct FileMapping {
    base: NonNull<u8>,
    len: usize,
    /// Offset of the first requested byte from `base` (the mapping starts on a page).
    lead: u64,
}

/// Where a file the engine mapped lies in this process's memory, so that
/// another process (a device back end) can map the same pages: page tables
/// hold this process's addresses, which mean nothing there.
#[derive(Debug, Clone)]
pub struct SharedFile {
    /// The file (the engine's own descriptor of it).
    pub file: std::sync::Arc<std::os::fd::OwnedFd>,
    /// Offset in the file of the address asked about.
    pub offset: u64,
    /// Bytes of the mapping from that address on.
    pub len: u64,
    /// Whether the engine mapped it writable.
    pub writable: bool,
}

struct Registered {
    len: u64,
    file_offset: u64,
    file: std::sync::Arc<std::os::fd::OwnedFd>,
    writable: bool,
}

/// Every live `FileMapping`, by base address. Touched when a file is
/// mapped or unmapped and when a back end's translation misses, never on
/// the DMA path.
static SHARED: parking_lot::RwLock<std::collections::BTreeMap<u64, Registered>> =
    parking_lot::RwLock::new(std::collections::BTreeMap::new());

/// The file behind `addr`, when `addr` lies in a file the engine mapped
/// (`IOMMU_IOAS_MAP_FILE`, a daemon client's shared memory).
pub fn shared_file_at(addr: u64) -> Option<SharedFile> {
    let map = SHARED.read();
    let (base, r) = map.range(..=addr).next_back()?;
    let into = addr - base;
    (into < r.len).then(|| SharedFile {
        file: r.file.clone(),
        offset: r.file_offset + into,
        len: r.len - into,
        writable: r.writable,
    })
}

// SAFETY: the mapping is plain shared memory; the struct only carries its
// address and unmaps it once, on drop.
unsafe impl Send for FileMapping {}
// SAFETY: as above; no interior state is mutated through `&self`.
unsafe impl Sync for FileMapping {}

impl FileMapping {
    pub fn new(fd: BorrowedFd<'_>, offset: u64, len: u64, writable: bool) -> Result<Self> {
        let st = rustix::fs::fstat(fd).map_err(|_| Error::BadFd("fd cannot be inspected"))?;
        let end = offset.checked_add(len).ok_or(Error::Overflow("start + length wraps"))?;
        if (st.st_mode & libc::S_IFMT) != libc::S_IFREG || len == 0 {
            return Err(Error::Invalid("fd is not a regular file"));
        }
        if end > st.st_size as u64 {
            return Err(Error::Invalid("range extends past the end of the file"));
        }
        let lead = offset % PAGE_SIZE;
        let map_len = (lead + len).div_ceil(PAGE_SIZE) * PAGE_SIZE;
        let prot = if writable { libc::PROT_READ | libc::PROT_WRITE } else { libc::PROT_READ };
        // SAFETY: a fresh shared mapping chosen by the kernel; nothing else
        // refers to its address until we hand it out.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len as usize,
                prot,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                (offset - lead) as libc::off_t,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(match std::io::Error::last_os_error().raw_os_error() {
                Some(libc::EACCES) => Error::Permission("file is not open for that access"),
                Some(libc::ENOMEM) => Error::NoMemory("cannot map the file"),
                _ => Error::Invalid("file cannot be mapped"),
            });
        }
        let base = NonNull::new(p.cast()).ok_or(Error::Invalid("file mapped at 0"))?;
        let mapping = FileMapping { base, len: map_len as usize, lead };
        let file = rustix::io::fcntl_dupfd_cloexec(fd, 0).map_err(|_| Error::NoMemory("no descriptor left"))?;
        let registered =
            Registered { len: map_len, file_offset: offset - lead, file: std::sync::Arc::new(file), writable };
        SHARED.write().insert(base.as_ptr() as u64, registered);
        Ok(mapping)
    }

    /// Host address of the first requested byte.
    pub fn addr(&self) -> u64 {
        self.base.as_ptr() as u64 + self.lead
    }

    /// Makes the mapping inaccessible for good: every later checked copy
    /// through it faults (`EFAULT`), as DMA to a revoked dma-buf fails.
    pub fn revoke(&self) {
        SHARED.write().remove(&(self.base.as_ptr() as u64));
        // SAFETY: exactly the mapping created in `new`; its users copy
        // through it with checked copies, which turn the fault into EFAULT.
        unsafe { libc::mprotect(self.base.as_ptr().cast(), self.len, libc::PROT_NONE) };
    }
}

impl Drop for FileMapping {
    fn drop(&mut self) {
        SHARED.write().remove(&(self.base.as_ptr() as u64));
        // SAFETY: `base`/`len` is exactly the mapping created in `new`, and
        // the last user of its addresses (a page table via its pages) is gone.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

/// Page-aligned anonymous memory owned by the caller: what a VMM's guest RAM
/// looks like. Devices may write it at any time through DMA, so its contents
/// are read and written by copies, never through references.
#[derive(Debug)]
pub struct HostBuffer {
    base: NonNull<u8>,
    len: usize,
}

// SAFETY: plain anonymous memory; accesses go through copies.
unsafe impl Send for HostBuffer {}
// SAFETY: as above.
unsafe impl Sync for HostBuffer {}

impl HostBuffer {
    /// `len` bytes (rounded up to whole pages) of zeroed memory.
    pub fn new(len: usize) -> Result<Self> {
        Self::with_flags(len, 0)
    }

    /// Address space only, which no access may touch: a stand-in address
    /// for memory that is not here (another process's private memory), so
    /// that a copy through it faults instead of reaching anything.
    pub fn window(len: usize) -> Result<Self> {
        Self::with_prot(len, libc::PROT_NONE, libc::MAP_NORESERVE)
    }

    /// `new` for memory that is mostly never touched (a copy of another
    /// process's sparse memory): no swap is reserved for it, so its size is
    /// not held against the system's commit limit, only the pages written.
    pub fn sparse(len: usize) -> Result<Self> {
        Self::with_flags(len, libc::MAP_NORESERVE)
    }

    fn with_flags(len: usize, flags: libc::c_int) -> Result<Self> {
        Self::with_prot(len, libc::PROT_READ | libc::PROT_WRITE, flags)
    }

    fn with_prot(len: usize, prot: libc::c_int, flags: libc::c_int) -> Result<Self> {
        let len = (len.max(1) as u64).div_ceil(PAGE_SIZE) * PAGE_SIZE;
        // SAFETY: a fresh private anonymous mapping; no other user.
        let p = unsafe {
            libc::mmap(std::ptr::null_mut(), len as usize, prot, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | flags, -1, 0)
        };
        if p == libc::MAP_FAILED {
            return Err(Error::NoMemory("cannot allocate host memory"));
        }
        let base = NonNull::new(p.cast()).ok_or(Error::NoMemory("mapped at 0"))?;
        Ok(HostBuffer { base, len: len as usize })
    }

    /// Host address of its first byte (page aligned): what a VMM passes to
    /// `Context::map_user` as `uptr`.
    pub fn addr(&self) -> u64 {
        self.base.as_ptr() as u64
    }

    /// Its size in bytes: whole pages, at least one.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false (a buffer has at least one page); for clippy's
    /// `len_without_is_empty`.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Copies out `buf.len()` bytes at `offset`.
    pub fn read_at(&self, offset: usize, buf: &mut [u8]) {
        assert!(offset.checked_add(buf.len()).is_some_and(|e| e <= self.len), "read past the buffer");
        // The range is inside our own live mapping.
        read(Trust::Direct, self.addr() + offset as u64, buf).expect("direct reads cannot fail");
    }

    /// Copies `data` in at `offset`.
    pub fn write_at(&self, offset: usize, data: &[u8]) {
        assert!(offset.checked_add(data.len()).is_some_and(|e| e <= self.len), "write past the buffer");
        write(Trust::Direct, self.addr() + offset as u64, data).expect("direct writes cannot fail");
    }
}

impl Drop for HostBuffer {
    fn drop(&mut self) {
        // SAFETY: exactly the mapping made in `new`. Dropping it while it is
        // still mapped into an IOAS is the caller's broken promise to
        // `Context::map_user`, which is `unsafe` for that reason.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checked_copy_reports_unmapped_memory() {
        let mut buf = [0u8; 8];
        assert_eq!(read(Trust::Checked, 8, &mut buf), Err(Error::Fault("user memory is not mapped")));
        assert!(write(Trust::Checked, 8, &buf).is_err());
        assert!(check_mapped(0x1000, 0x1000).is_err());
    }

    #[test]
    fn checked_copy_round_trips() {
        let src = vec![7u8; 10_000];
        let mut dst = vec![0u8; 10_000];
        read(Trust::Checked, src.as_ptr() as u64, &mut dst).unwrap();
        assert_eq!(src, dst);
        check_mapped(src.as_ptr() as u64, src.len() as u64).unwrap();
        write(Trust::Checked, dst.as_mut_ptr() as u64, &[1, 2, 3]).unwrap();
        assert_eq!(&dst[..3], &[1, 2, 3]);
    }

    #[test]
    fn two_shared_mappings_of_a_file_are_the_same_pages() {
        let file = rustix::fs::memfd_create("same-pages", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
        rustix::fs::ftruncate(&file, 2 * PAGE_SIZE).unwrap();
        let a = FileMapping::new(std::os::fd::AsFd::as_fd(&file), 0, 2 * PAGE_SIZE, true).unwrap();
        let b = FileMapping::new(std::os::fd::AsFd::as_fd(&file), PAGE_SIZE, PAGE_SIZE, true).unwrap();
        let other = HostBuffer::new(PAGE_SIZE as usize).unwrap();
        let map = PageMap::of_self().unwrap();
        assert!(map.same_byte(a.addr() + PAGE_SIZE + 8, b.addr() + 8));
        assert!(!map.same_byte(a.addr() + 8, b.addr() + 8), "another page of the file");
        assert!(!map.same_byte(a.addr(), other.addr()));
        assert!(!map.same_byte(other.addr(), other.addr() + 8));
        assert!(map.same_byte(other.addr() + 8, other.addr() + 8));
    }

    /// Two pages whose second is inaccessible, so copies that run into it
    /// fault partway.
    fn guard_page() -> HostBuffer {
        let buf = HostBuffer::new(2 * PAGE_SIZE as usize).unwrap();
        // SAFETY: the second page of our own mapping; the buffer's drop
        // unmaps it whatever its protection.
        assert_eq!(unsafe { libc::mprotect((buf.addr() + PAGE_SIZE) as *mut _, PAGE_SIZE as usize, 0) }, 0);
        buf
    }

    #[test]
    fn checked_copy_fails_where_the_memory_ends() {
        let buf = guard_page();
        let mut out = [0u8; 64];
        let end = buf.addr() + PAGE_SIZE;
        read(Trust::Checked, end - 64, &mut out).unwrap();
        assert!(read(Trust::Checked, end - 32, &mut out).is_err(), "the copy crosses into the guard page");
        assert!(write(Trust::Checked, end - 1, &[1, 2]).is_err());
        write(Trust::Checked, end - 2, &[1, 2]).unwrap();
        // Memory that is mapped but read-only fails writes only.
        // SAFETY: our own first page.
        assert_eq!(unsafe { libc::mprotect(buf.addr() as *mut _, PAGE_SIZE as usize, libc::PROT_READ) }, 0);
        assert!(write(Trust::Checked, buf.addr(), &[1]).is_err());
        read(Trust::Checked, end - 64, &mut out).unwrap();
        assert_eq!(&out[62..], &[1, 2], "what the last good write left");
    }

    #[test]
    fn checked_copy_fails_past_the_end_of_a_truncated_file() {
        let f = memfd::MemfdOptions::new().create("t").unwrap();
        f.as_file().set_len(2 * PAGE_SIZE).unwrap();
        let m = FileMapping::new(std::os::fd::AsFd::as_fd(f.as_file()), 0, 2 * PAGE_SIZE, true).unwrap();
        f.as_file().set_len(PAGE_SIZE).unwrap();
        write(Trust::Checked, m.addr(), b"kept").unwrap();
        // The page past the file's end raises SIGBUS, not SIGSEGV.
        assert!(write(Trust::Checked, m.addr() + PAGE_SIZE, b"gone").is_err());
        assert!(read(Trust::Checked, m.addr() + PAGE_SIZE - 2, &mut [0u8; 4]).is_err());
    }

    /// Run by `faults_outside_the_copy_still_kill` in a child process.
    #[test]
    #[ignore = "crashes on purpose; run by faults_outside_the_copy_still_kill"]
    fn crash_after_install() {
        read(Trust::Checked, 8, &mut [0u8; 1]).unwrap_err();
        let buf = guard_page();
        // SAFETY: none; this write faults on purpose, and the process must
        // die of it as it would without ioasid's handler.
        unsafe { ((buf.addr() + PAGE_SIZE) as *mut u8).write_volatile(1) };
    }

    #[test]
    fn faults_outside_the_copy_still_kill() {
        use std::os::unix::process::ExitStatusExt;
        let status = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "memory::tests::crash_after_install", "--ignored", "--test-threads=1"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap();
        assert_eq!(status.signal(), Some(libc::SIGSEGV), "{status:?}");
    }

    static FIXED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

    /// A program's handler that makes the page it faulted on writable.
    extern "C" fn make_writable(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
        FIXED.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        // SAFETY: the kernel's siginfo of a fault; the page is one of the
        // test's own.
        unsafe {
            let page = (*info).si_addr() as usize & !(PAGE_SIZE as usize - 1);
            libc::mprotect(page as *mut _, PAGE_SIZE as usize, libc::PROT_READ | libc::PROT_WRITE);
        }
    }

    #[test]
    fn the_programs_action_gets_its_own_faults_and_never_the_copys() {
        let buf = guard_page();
        let guard = buf.addr() + PAGE_SIZE;
        // SAFETY: an all-zero sigaction with a handler and flags set.
        let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
        act.sa_sigaction = make_writable as *const () as usize;
        act.sa_flags = libc::SA_SIGINFO;
        let before = set_program_fault_action(libc::SIGSEGV, &act).unwrap();
        assert!(write(Trust::Checked, guard, &[1]).is_err(), "the copy's fault is the copy's");
        assert_eq!(FIXED.load(std::sync::atomic::Ordering::SeqCst), 0);
        // SAFETY: faults, then succeeds once the program's handler made
        // the page writable.
        unsafe { (guard as *mut u8).write_volatile(7) };
        assert_eq!(FIXED.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert_eq!(program_fault_action(libc::SIGSEGV).unwrap().sa_sigaction, act.sa_sigaction);
        set_program_fault_action(libc::SIGSEGV, &before).unwrap();
        write(Trust::Checked, guard, &[1]).unwrap();
    }

    #[test]
    fn a_thread_that_blocks_fault_signals_in_its_view_still_gets_errors() {
        std::thread::spawn(|| {
            set_program_blocked_fault_signals(FAULT_SIGNALS);
            assert!(read(Trust::Checked, 8, &mut [0u8; 4]).is_err());
            assert_eq!(program_blocked_fault_signals(), FAULT_SIGNALS);
        })
        .join()
        .unwrap();
    }

    #[test]
    fn file_mapping_sees_file_contents() {
        let f = memfd::MemfdOptions::new().create("t").unwrap();
        let file = f.as_file();
        file.set_len(3 * PAGE_SIZE).unwrap();
        rustix::io::pwrite(file, b"hello", PAGE_SIZE + 5).unwrap();
        let fd = std::os::fd::AsFd::as_fd(file);
        let m = FileMapping::new(fd, PAGE_SIZE + 5, 5, false).unwrap();
        let mut buf = [0u8; 5];
        read(Trust::Direct, m.addr(), &mut buf).unwrap();
        assert_eq!(&buf, b"hello");
        assert!(matches!(FileMapping::new(fd, 2 * PAGE_SIZE, 2 * PAGE_SIZE, false), Err(Error::Invalid(_))));
    }
}
