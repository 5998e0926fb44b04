//! `ioasid run -- PROGRAM ARGS...`: runs a program with the preload shim.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;

const LIB: &str = "libioasid_preload.so";

/// Where the shim is: `$IOASID_PRELOAD`, next to this executable, or in the
/// cargo target directory this executable was built into.
pub fn find_preload() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("IOASID_PRELOAD") {
        let p = PathBuf::from(p);
        return if p.is_file() { Ok(p) } else { Err(format!("IOASID_PRELOAD={} is not a file", p.display())) };
    }
    let exe = std::env::current_exe().map_err(|e| format!("cannot locate the ioasid executable: {e}"))?;
    let dir = exe.parent().ok_or("the ioasid executable has no directory")?;
    // Test binaries live in target/<profile>/deps, the library one level up.
    for d in [dir, dir.parent().unwrap_or(dir)] {
        let p = d.join(LIB);
        if p.is_file() {
            return Ok(p);
        }
    }
    Err(format!(
        "cannot find {LIB} next to {} (build it with `cargo build --workspace`, or set IOASID_PRELOAD)",
        exe.display()
    ))
}

pub fn exec(command: &[OsString]) -> Result<(), Box<dyn std::error::Error>> {
    let lib = find_preload()?;
    let mut preload = OsString::from(lib);
    if let Some(existing) = std::env::var_os("LD_PRELOAD").filter(|v| !v.is_empty()) {
        preload.push(":");
        preload.push(existing);
    }
    let err = std::process::Command::new(&command[0]).args(&command[1..]).env("LD_PRELOAD", preload).exec();
    Err(format!("cannot run {}: {err}", command[0].to_string_lossy()).into())
}
