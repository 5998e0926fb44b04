//! Helpers shared by the tests that run C programs under `ioasid run`.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

pub fn target_dir() -> PathBuf {
    // The test binary lives in target/<profile>/deps.
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().parent().unwrap().to_path_buf()
}

pub fn build_shim() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args(["build", "-q", "-p", "ioasid-preload"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .unwrap();
    assert!(status.success(), "building the shim failed");
    assert!(target_dir().join("libioasid_preload.so").is_file());
}

pub fn compile(dir: &Path, program: &str) -> PathBuf {
    compile_with(dir, program, &[])
}

/// `compile`, with more flags for the compiler (`-static`, say).
pub fn compile_with(dir: &Path, program: &str, flags: &[&str]) -> PathBuf {
    let src = dir.join("prog.c");
    std::fs::write(&src, program).unwrap();
    let exe = dir.join("prog");
    let include = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../include");
    let status = Command::new("cc")
        .arg("-I")
        .arg(include)
        .args(flags)
        .arg("-o")
        .arg(&exe)
        .arg(&src)
        .status()
        .expect("a C compiler (cc)");
    assert!(status.success(), "compiling the test program failed");
    exe
}

/// Runs `program` under `ioasid run` and expects it to print "ok".
pub fn run_c(tag: &str, program: &str) {
    run_c_with(tag, program, &[]);
}

/// `run_c`, with more flags for the compiler.
pub fn run_c_with(tag: &str, program: &str, flags: &[&str]) {
    run_c_devices(tag, program, flags, &[]);
}

/// `run_c_with`, the program given the emulated PCI functions `devices`
/// (`ioasid run --device`).
pub fn run_c_devices(tag: &str, program: &str, flags: &[&str], devices: &[&str]) {
    build_shim();
    let dir = std::env::temp_dir().join(format!("ioasid-run-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let prog = compile_with(&dir, program, flags);
    let out = Command::new(env!("CARGO_BIN_EXE_ioasid"))
        .arg("run")
        .args(devices.iter().flat_map(|d| ["--device", d]))
        .arg("--")
        .arg(&prog)
        .env("IOASID_PRELOAD", target_dir().join("libioasid_preload.so"))
        .output()
        .unwrap();
    std::fs::remove_dir_all(&dir).ok();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && stdout.trim() == "ok", "{stdout}{}", String::from_utf8_lossy(&out.stderr));
}
