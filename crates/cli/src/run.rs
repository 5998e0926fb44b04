//! `ioasid run [--device SPEC]... -- PROGRAM ARGS...`: runs a program with
//! the preload shim, and with the emulated PCI functions it declares.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI32, Ordering};

use ioasid_abi::vfio::declared::{self, DeviceSpec};
use ioasid_abi::vfio::sysfs;

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

/// The daemon's socket, absolute (the program may change directory), once
/// it is known to answer.
fn daemon_at(path: &std::path::Path) -> Result<std::path::PathBuf, Box<dyn std::error::Error>> {
    use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
    let path = std::path::absolute(path)?;
    let sock = rustix::net::socket_with(AddressFamily::UNIX, SocketType::SEQPACKET, SocketFlags::CLOEXEC, None)?;
    rustix::net::connect(&sock, &SocketAddrUnix::new(&path)?).map_err(|e| {
        format!("no ioasid daemon answers at {} ({e}); start one with `ioasid serve --socket {0}`", path.display())
    })?;
    Ok(path)
}

/// Runs `command` under the shim. Without devices the program replaces
/// this process; with them, this process stays to remove their sysfs tree
/// when the program ends, and ends as it did.
pub fn run(
    devices: &[String],
    socket: Option<&std::path::Path>,
    supervised: bool,
    command: &[OsString],
) -> Result<(), Box<dyn std::error::Error>> {
    if supervised {
        return run_supervised(socket, command);
    }
    if devices.iter().any(|d| d == "help") {
        println!("device models (--device MODEL[,bdf=DDDD:BB:DD.F][,iommu=NAME][,pasid=BITS][,pri=on]):");
        for (name, what) in ioasid_engine::pci::models() {
            println!("  {name:<16} {what}");
        }
        println!("IOMMU models (iommu=NAME):");
        for (name, what) in declared::IOMMUS {
            println!("  {name:<16} {what}");
        }
        return Ok(());
    }
    let lib = find_preload()?;
    let mut preload = OsString::from(lib);
    if let Some(existing) = std::env::var_os("LD_PRELOAD").filter(|v| !v.is_empty()) {
        preload.push(":");
        preload.push(existing);
    }
    let mut cmd = std::process::Command::new(&command[0]);
    cmd.args(&command[1..]).env("LD_PRELOAD", preload);
    if let Some(path) = socket {
        cmd.env("IOASID_SOCKET", daemon_at(path)?);
    }
    if devices.is_empty() {
        let err = cmd.exec();
        return Err(format!("cannot run {}: {err}", command[0].to_string_lossy()).into());
    }
    let specs = DeviceSpec::parse_list(&devices.join(";")).map_err(|e| format!("--device: {e}"))?;
    let list: Vec<String> = specs.iter().map(DeviceSpec::to_arg).collect();
    declared::declare(specs)?;
    pass_termination_on();
    let tree = SysfsTree::new()?;
    sysfs::write_tree(&tree.0, declared::all()).map_err(|e| format!("cannot write the devices' sysfs tree: {e}"))?;
    cmd.env(declared::ENV, list.join(";")).env(sysfs::ENV, &tree.0);
    let child = cmd.spawn().map_err(|e| format!("cannot run {}: {e}", command[0].to_string_lossy()))?;
    wait_and_end(child, tree)
}

/// `ioasid run --supervised`: the program runs without the shim, under a
/// seccomp filter whose notifications this process (or the daemon at
/// `socket`) answers.
fn run_supervised(socket: Option<&std::path::Path>, command: &[OsString]) -> Result<(), Box<dyn std::error::Error>> {
    use ioasid_serve::{client::Client, daemon::Daemon, limits::Limits, supervise};
    enum Server {
        Here(std::sync::Arc<Daemon>),
        Daemon(Client),
    }
    let server = match socket {
        Some(path) => {
            let path = std::ffi::CString::new(daemon_at(path)?.into_os_string().into_encoded_bytes())?;
            Server::Daemon(Client::new(path, |_, _| {}))
        }
        None => Server::Here(Daemon::new(Limits::default())?),
    };
    pass_termination_on();
    let mut cmd = std::process::Command::new(&command[0]);
    cmd.args(&command[1..]);
    let (child, listener) =
        supervise::spawn(cmd).map_err(|e| format!("cannot run {} supervised: {e}", command[0].to_string_lossy()))?;
    match server {
        Server::Here(daemon) => {
            std::thread::Builder::new()
                .name("ioasid-supervise".into())
                .spawn(move || supervise::serve(listener, daemon))?;
        }
        Server::Daemon(client) => {
            if let Err(e) = client.supervise(listener) {
                // SAFETY: signalling our own child, which nobody would serve.
                unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
                let e = std::io::Error::from_raw_os_error(e);
                return Err(format!("the daemon cannot serve the program: {e}").into());
            }
        }
    }
    wait_and_end(child, ())
}

/// A termination sent to this process alone (`timeout`, `kill`) is passed
/// on to the program, or held until it is started: from here on this
/// process always waits for the program.
fn pass_termination_on() {
    // SAFETY: `forward` only touches atomics and calls the async-signal-safe
    // `kill`; exec resets handled signals in the program.
    unsafe {
        for sig in [libc::SIGTERM, libc::SIGHUP, libc::SIGUSR1, libc::SIGUSR2] {
            libc::signal(sig, forward as extern "C" fn(libc::c_int) as libc::sighandler_t);
        }
    }
}

/// Waits for the program, then drops `keep` (what the run leaves behind)
/// and ends as the program did.
fn wait_and_end(mut child: std::process::Child, keep: impl Sized) -> Result<(), Box<dyn std::error::Error>> {
    CHILD.store(child.id() as i32, Ordering::SeqCst);
    let held = HELD.swap(0, Ordering::SeqCst);
    if held != 0 {
        // SAFETY: signalling the child just started.
        unsafe { libc::kill(child.id() as i32, held) };
    }
    // The terminal's interrupt reaches the program (same process group).
    // SAFETY: ignoring SIGINT and SIGQUIT in this process only, after the
    // program was started (an ignored signal would stay ignored there).
    unsafe {
        libc::signal(libc::SIGINT, libc::SIG_IGN);
        libc::signal(libc::SIGQUIT, libc::SIG_IGN);
    }
    let status = loop {
        match child.wait() {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            other => break other?,
        }
    };
    drop(keep);
    if let Some(code) = status.code() {
        std::process::exit(code);
    }
    let signal = std::os::unix::process::ExitStatusExt::signal(&status).unwrap_or(libc::SIGKILL);
    std::process::exit(128 + signal);
}

/// The program `run` waits for, for `forward`.
static CHILD: AtomicI32 = AtomicI32::new(0);
/// A signal `forward` got before the program was started.
static HELD: AtomicI32 = AtomicI32::new(0);

/// Passes a signal sent to `ioasid run` on to the program, or holds it
/// until the program is started.
extern "C" fn forward(sig: libc::c_int) {
    let pid = CHILD.load(Ordering::SeqCst);
    if pid > 0 {
        // SAFETY: kill is async-signal-safe.
        unsafe { libc::kill(pid, sig) };
    } else {
        HELD.store(sig, Ordering::SeqCst);
    }
}

/// The run's sysfs tree, removed when dropped.
struct SysfsTree(PathBuf);

impl SysfsTree {
    fn new() -> Result<Self, String> {
        let dir = std::env::temp_dir().join(format!("ioasid-sysfs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        Ok(SysfsTree(dir))
    }
}

impl Drop for SysfsTree {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
