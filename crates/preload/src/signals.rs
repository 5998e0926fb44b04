//! The program's signal handling, kept out of ioasid's calls as the kernel
//! keeps it out of system calls.
//!
//! Two things must hold whatever the program does with signals:
//! - ioasid's guarded copy owns SIGSEGV and SIGBUS (see the engine's
//!   `memory` module): the program's `sigaction`, `signal` and mask calls for
//!   them are recorded as its own view, which its faults are delivered by,
//!   and never reach the kernel;
//! - no handler of the program runs inside ioasid (a hook holding a lock,
//!   or a copy): every handler the program installs is entered through
//!   `trampoline`, which, when it interrupts a hook, puts the signal back
//!   (same siginfo) and leaves it blocked until the hook ends. A program
//!   with no handler pays nothing, one whose handlers do not fire during a
//!   hook pays nothing either: no system call on the common path.
//!
//! What the program reads back (`oldact`, old masks) is what it set. Calls
//! that bypass the C library's exported functions (`syscall(SYS_rt_sigaction,
//! ..)`, `syscall(SYS_rt_sigprocmask, ..)`, glibc's `sighold` family) are
//! not seen.

use std::cell::Cell;
use std::ffi::{c_int, c_void};
use std::marker::PhantomData;
use std::sync::atomic::{Ordering, compiler_fence};

use ioasid_engine::memory::{self, FAULT_SIGNALS, SignalAction, sigset_bits, sigset_from_bits};

use crate::real;

/// The program's actions for the signals whose handlers go through
/// `trampoline` (index: signal number; SIGSEGV and SIGBUS live in the engine).
static ACTIONS: [SignalAction; 65] = [const { SignalAction::new() }; 65];

thread_local! {
    /// How many hooks this thread is inside.
    static DEPTH: Cell<u32> = const { Cell::new(0) };
    /// Signals put back while a hook ran, blocked until it ends.
    static DEFERRED: Cell<u64> = const { Cell::new(0) };
}

const fn bit(sig: c_int) -> u64 {
    1 << (sig - 1)
}

fn is_fault_signal(sig: c_int) -> bool {
    sig == libc::SIGSEGV || sig == libc::SIGBUS
}

fn empty_action() -> libc::sigaction {
    // SAFETY: an all-zero sigaction is SIG_DFL, no flags, an empty mask.
    unsafe { std::mem::zeroed() }
}

/// Held while ioasid code runs on a thread on behalf of the program: the
/// program's handlers wait until the outermost one is dropped.
pub struct Shield {
    _thread: PhantomData<*const ()>,
}

impl Shield {
    pub fn raise() -> Shield {
        DEPTH.set(DEPTH.get() + 1);
        compiler_fence(Ordering::SeqCst);
        Shield { _thread: PhantomData }
    }
}

impl Drop for Shield {
    fn drop(&mut self) {
        compiler_fence(Ordering::SeqCst);
        let depth = DEPTH.get() - 1;
        DEPTH.set(depth);
        compiler_fence(Ordering::SeqCst);
        if depth == 0 {
            deliver_deferred();
        }
    }
}

/// Unblocks the signals put back while this thread was inside ioasid:
/// they are delivered now.
fn deliver_deferred() {
    let deferred = DEFERRED.replace(0);
    if deferred != 0 {
        let set = sigset_from_bits(deferred);
        // SAFETY: unblocking signals this thread blocked itself.
        unsafe { real::pthread_sigmask()(libc::SIG_UNBLOCK, &set, std::ptr::null_mut()) };
    }
}

/// Runs `call` (the C library's own function, forwarded by a hook) with
/// this thread's shields lowered: a call that blocks (a `read` of a pipe,
/// say) must let the program's handlers run, as it would without ioasid.
/// Only for calls made while ioasid holds no lock.
pub fn lowered<R>(call: impl FnOnce() -> R) -> R {
    compiler_fence(Ordering::SeqCst);
    let depth = DEPTH.replace(0);
    compiler_fence(Ordering::SeqCst);
    deliver_deferred();
    let r = call();
    compiler_fence(Ordering::SeqCst);
    DEPTH.set(depth);
    compiler_fence(Ordering::SeqCst);
    r
}

/// Runs at load, before the program: ioasid's fault handler goes in first,
/// and a mask inherited across exec becomes the main thread's view.
#[used]
#[unsafe(link_section = ".init_array")]
static INIT: extern "C" fn() = init;

extern "C" fn init() {
    memory::install_fault_handler();
    // Looked up now: handlers must not call dlsym.
    let _ = (real::sigaction(), real::pthread_sigmask());
    // SAFETY: getpid takes no arguments; the call resolves `syscall` now,
    // since `requeue` runs in signal handlers.
    unsafe { real::syscall(libc::SYS_getpid, 0, 0, 0, 0, 0, 0) };
    let set = sigset_from_bits(FAULT_SIGNALS);
    let mut old = sigset_from_bits(0);
    // SAFETY: two valid sets.
    unsafe { real::pthread_sigmask()(libc::SIG_UNBLOCK, &set, &mut old) };
    memory::set_program_blocked_fault_signals(sigset_bits(&old));
}

/// Every catching handler of the program is entered here.
extern "C" fn trampoline(sig: c_int, info: *mut libc::siginfo_t, context: *mut c_void) {
    if DEPTH.get() > 0 {
        // Blocked now, before it is queued again: with SA_NODEFER it would
        // otherwise come straight back into this frame's successor. The
        // kernel's context keeps it blocked once this handler returns.
        let set = sigset_from_bits(bit(sig));
        // SAFETY: blocking one signal of this thread; the kernel's context
        // of this delivery.
        unsafe {
            real::pthread_sigmask()(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            libc::sigaddset(&mut (*context.cast::<libc::ucontext_t>()).uc_sigmask, sig);
        }
        DEFERRED.set(DEFERRED.get() | bit(sig));
        requeue(sig, info);
        return;
    }
    let Some(slot) = ACTIONS.get(sig as usize) else { return };
    let action = slot.load();
    match action.sa_sigaction {
        libc::SIG_IGN => return,
        libc::SIG_DFL => {
            // Changed while this delivery was on its way: the default action.
            // SAFETY: setting a disposition, a valid struct.
            unsafe { real::sigaction()(sig, &empty_action(), std::ptr::null_mut()) };
            requeue(sig, info);
            return;
        }
        _ => {}
    }
    if action.sa_flags & libc::SA_RESETHAND != 0 {
        slot.store(&empty_action());
        // SAFETY: as above.
        unsafe { real::sigaction()(sig, &empty_action(), std::ptr::null_mut()) };
    }
    // The kernel blocked the handler's mask for this call, as it would have.
    let frame = memory::enter_program_handler(sigset_bits(&action.sa_mask));
    // SAFETY: the program's handler for `sig`, with the kernel's arguments.
    unsafe { memory::call_handler(&action, sig, info, context) };
    memory::leave_program_handler(frame);
}

/// Sends this thread `sig` again with the siginfo it came with (the kernel
/// lets a thread queue any siginfo to itself).
fn requeue(sig: c_int, info: *mut libc::siginfo_t) {
    // SAFETY: getpid and gettid have no preconditions; rt_tgsigqueueinfo
    // reads the kernel's siginfo of this delivery.
    unsafe {
        let (pid, tid) = (libc::getpid(), libc::gettid());
        real::syscall(libc::SYS_rt_tgsigqueueinfo, pid as i64, tid as i64, sig as i64, info as i64, 0, 0);
    }
}

/// `sigaction`, as the program sees it.
///
/// # Safety
/// As the C library's `sigaction`.
pub unsafe fn sigaction(sig: c_int, act: *const libc::sigaction, old: *mut libc::sigaction) -> c_int {
    // SAFETY: the caller's pointers, null or valid.
    let (act, old) = unsafe { (act.as_ref().copied(), old.as_mut()) };
    if is_fault_signal(sig) {
        let previous = match act {
            Some(a) => memory::set_program_fault_action(sig, &a),
            None => memory::program_fault_action(sig),
        };
        if let (Some(old), Some(p)) = (old, previous) {
            *old = p;
        }
        return 0;
    }
    let real = real::sigaction();
    let Some(slot) = ACTIONS.get(sig as usize).filter(|_| sig > 0) else {
        // Not a signal: the C library's error.
        // SAFETY: the caller's arguments.
        return unsafe { real(sig, act.as_ref().map_or(std::ptr::null(), |a| a), std::ptr::null_mut()) };
    };
    // Handlers of this thread wait: the slot and the kernel change together.
    let _shield = Shield::raise();
    let previous = slot.load();
    let kernel = act.map(|a| {
        slot.store(&a);
        if a.sa_sigaction == libc::SIG_DFL || a.sa_sigaction == libc::SIG_IGN {
            return a;
        }
        let mut k = a;
        k.sa_sigaction = trampoline as *const () as usize;
        // The trampoline resets the action itself, so a delivery it puts
        // back still finds the program's handler.
        k.sa_flags = (a.sa_flags & !libc::SA_RESETHAND) | libc::SA_SIGINFO;
        k
    });
    let mut kernel_old = empty_action();
    // SAFETY: valid structs or null.
    let rc = unsafe { real(sig, kernel.as_ref().map_or(std::ptr::null(), |k| k), &mut kernel_old) };
    if rc != 0 {
        slot.store(&previous);
        return rc;
    }
    if let Some(old) = old {
        *old = if kernel_old.sa_sigaction == trampoline as *const () as usize { previous } else { kernel_old };
    }
    0
}

/// `pthread_sigmask`, as the program sees it: SIGSEGV and SIGBUS are
/// blocked in its view only. Returns an errno value.
///
/// # Safety
/// As the C library's `pthread_sigmask`.
pub unsafe fn sigmask(how: c_int, set: *const libc::sigset_t, old: *mut libc::sigset_t) -> c_int {
    let view = memory::program_blocked_fault_signals();
    // Copied first: `set` and `old` may be the same set.
    // SAFETY: the caller's pointer, null or valid.
    let wanted = unsafe { set.as_ref().copied() };
    let kernel = wanted.map(|mut k| {
        // SAFETY: a valid set and signals.
        unsafe {
            libc::sigdelset(&mut k, libc::SIGSEGV);
            libc::sigdelset(&mut k, libc::SIGBUS);
        }
        k
    });
    let mut kernel_old = sigset_from_bits(0);
    // SAFETY: valid sets or null.
    let rc = unsafe { real::pthread_sigmask()(how, kernel.as_ref().map_or(std::ptr::null(), |k| k), &mut kernel_old) };
    if rc != 0 {
        return rc;
    }
    if let Some(w) = wanted {
        let bits = sigset_bits(&w) & FAULT_SIGNALS;
        let now = match how {
            libc::SIG_BLOCK => view | bits,
            libc::SIG_UNBLOCK => view & !bits,
            _ => bits,
        };
        memory::set_program_blocked_fault_signals(now);
        memory::release_held_fault_signals(view & !now);
    }
    // SAFETY: the caller's pointer, null or valid.
    if let Some(old) = unsafe { old.as_mut() } {
        *old = kernel_old;
        for sig in [libc::SIGSEGV, libc::SIGBUS] {
            if view & bit(sig) != 0 {
                // SAFETY: a valid set and signal.
                unsafe { libc::sigaddset(old, sig) };
            }
        }
    }
    0
}

/// `signal` and its relatives: `sigaction` with the flags each implies.
/// Returns the previous handler, or `SIG_ERR`.
///
/// # Safety
/// As the C library's `signal`.
unsafe fn set_handler(sig: c_int, handler: libc::sighandler_t, flags: c_int, mask_self: bool) -> libc::sighandler_t {
    if handler == libc::SIG_ERR || !(1..=64).contains(&sig) {
        // SAFETY: this thread's errno.
        unsafe { *libc::__errno_location() = libc::EINVAL };
        return libc::SIG_ERR;
    }
    let mut act = empty_action();
    act.sa_sigaction = handler;
    act.sa_flags = flags;
    if mask_self {
        act.sa_mask = sigset_from_bits(bit(sig));
    }
    let mut old = empty_action();
    // SAFETY: valid structs.
    if unsafe { sigaction(sig, &act, &mut old) } != 0 {
        return libc::SIG_ERR;
    }
    old.sa_sigaction
}

mod exports {
    use std::ffi::{c_int, c_void};

    use super::*;

    /// # Safety
    /// As the C library's function of the same name.
    #[unsafe(no_mangle)]
    pub unsafe extern "C" fn sigaction(sig: c_int, act: *const libc::sigaction, old: *mut libc::sigaction) -> c_int {
        // SAFETY: the caller's arguments.
        unsafe { super::sigaction(sig, act, old) }
    }

    /// # Safety
    /// As the C library's function of the same name.
    #[unsafe(no_mangle)]
    pub unsafe extern "C" fn pthread_sigmask(
        how: c_int,
        set: *const libc::sigset_t,
        old: *mut libc::sigset_t,
    ) -> c_int {
        // SAFETY: the caller's arguments.
        unsafe { sigmask(how, set, old) }
    }

    /// # Safety
    /// As the C library's function of the same name.
    #[unsafe(no_mangle)]
    pub unsafe extern "C" fn sigprocmask(how: c_int, set: *const libc::sigset_t, old: *mut libc::sigset_t) -> c_int {
        // SAFETY: the caller's arguments.
        match unsafe { sigmask(how, set, old) } {
            0 => 0,
            e => {
                // SAFETY: this thread's errno.
                unsafe { *libc::__errno_location() = e };
                -1
            }
        }
    }

    /// glibc's `signal` has BSD semantics: the handler stays, calls restart.
    ///
    /// # Safety
    /// As the C library's function of the same name.
    #[unsafe(no_mangle)]
    pub unsafe extern "C" fn signal(sig: c_int, handler: libc::sighandler_t) -> libc::sighandler_t {
        // SAFETY: the caller's arguments.
        unsafe { set_handler(sig, handler, libc::SA_RESTART, true) }
    }

    /// # Safety
    /// As the C library's function of the same name.
    #[unsafe(no_mangle)]
    pub unsafe extern "C" fn bsd_signal(sig: c_int, handler: libc::sighandler_t) -> libc::sighandler_t {
        // SAFETY: the caller's arguments.
        unsafe { set_handler(sig, handler, libc::SA_RESTART, true) }
    }

    /// System V semantics: the handler is reset on delivery, not masked.
    ///
    /// # Safety
    /// As the C library's function of the same name.
    #[unsafe(no_mangle)]
    pub unsafe extern "C" fn sysv_signal(sig: c_int, handler: libc::sighandler_t) -> libc::sighandler_t {
        // SAFETY: the caller's arguments.
        unsafe { set_handler(sig, handler, libc::SA_RESETHAND | libc::SA_NODEFER, false) }
    }

    /// What `signal` is in a strict ISO C program.
    ///
    /// # Safety
    /// As the C library's function of the same name.
    #[unsafe(no_mangle)]
    pub unsafe extern "C" fn __sysv_signal(sig: c_int, handler: libc::sighandler_t) -> libc::sighandler_t {
        // SAFETY: the caller's arguments.
        unsafe { set_handler(sig, handler, libc::SA_RESETHAND | libc::SA_NODEFER, false) }
    }

    /// A new thread starts with its creator's mask, SIGSEGV and SIGBUS in the
    /// program's view included.
    ///
    /// # Safety
    /// As the C library's function of the same name.
    #[unsafe(no_mangle)]
    pub unsafe extern "C" fn pthread_create(
        thread: *mut libc::pthread_t,
        attr: *const libc::pthread_attr_t,
        start: real::StartFn,
        arg: *mut c_void,
    ) -> c_int {
        let view = memory::program_blocked_fault_signals();
        let create = real::pthread_create();
        if view == 0 {
            // SAFETY: the caller's arguments.
            return unsafe { create(thread, attr, start, arg) };
        }
        let boxed = Box::into_raw(Box::new((start, arg, view)));
        // SAFETY: the caller's thread and attributes; `inherit` takes the box.
        let rc = unsafe { create(thread, attr, inherit, boxed.cast()) };
        if rc != 0 {
            // SAFETY: the thread was not created, so the box is still ours.
            drop(unsafe { Box::from_raw(boxed) });
        }
        rc
    }

    extern "C" fn inherit(p: *mut c_void) -> *mut c_void {
        // SAFETY: the box `pthread_create` made for this thread, taken once.
        let (start, arg, view) = *unsafe { Box::from_raw(p.cast::<(real::StartFn, *mut c_void, u64)>()) };
        memory::set_program_blocked_fault_signals(view);
        start(arg)
    }
}
