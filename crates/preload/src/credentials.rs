//! The calls that can change a thread's capabilities: each is passed on to
//! the C library, and the engine is told after it returns, so a map judges
//! `CAP_IPC_LOCK` as Linux does without a `capget` per map (see
//! `ioasid_engine::watch_credentials`). `syscall(3)` with these numbers
//! comes here too, from the `syscall` hook.

use std::ffi::{c_int, c_long, c_void};

use crate::real;

type Uid = libc::uid_t;

/// Declares a hook `$name` that forwards to the C library's function of the
/// same name (`real::$name`) and then reports a possible change.
macro_rules! credentials_hook {
    ($name:ident($($arg:ident: $ty:ty),*)) => {
        /// # Safety
        /// As the C library's function of the same name.
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name($($arg: $ty),*) -> c_int {
            // SAFETY: the caller's own arguments, to the function they were for.
            let r = unsafe { real::$name()($($arg),*) };
            ioasid_engine::credentials_changed();
            r
        }
    };
}

credentials_hook!(capset(header: *mut c_void, data: *const c_void));
credentials_hook!(setuid(uid: Uid));
credentials_hook!(seteuid(euid: Uid));
credentials_hook!(setreuid(ruid: Uid, euid: Uid));
credentials_hook!(setresuid(ruid: Uid, euid: Uid, suid: Uid));

/// Whether `syscall(3)` number `n` can change capabilities.
pub fn changes_capabilities(n: c_long) -> bool {
    matches!(n, libc::SYS_capset | libc::SYS_setuid | libc::SYS_setreuid | libc::SYS_setresuid)
}
