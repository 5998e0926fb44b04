//! `ioasid serve`: the daemon, in the foreground.

use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use ioasid_serve::daemon::Daemon;
use ioasid_serve::limits::Limits;

/// Where the daemon listens unless told.
pub use ioasid_client::serve_socket as default_socket;

pub struct Options {
    pub socket: Option<PathBuf>,
    pub mode: u32,
    pub limits: Limits,
}

/// Runs the daemon until SIGTERM or SIGINT.
pub fn serve(opts: Options) -> Result<(), Box<dyn std::error::Error>> {
    init_log();
    // Termination is taken by one thread; every other (the serving ones
    // started below inherit the mask) leaves it alone.
    let stop = block_termination()?;
    let (listener, path) = match activated()? {
        Some(fd) => {
            tracing::info!("listening on the socket systemd passed");
            (fd, None)
        }
        None => {
            let path = opts.socket.unwrap_or_else(default_socket);
            (bind(&path, opts.mode)?, Some(path))
        }
    };
    let daemon = Daemon::new(opts.limits.clone())?;
    if let Some(p) = &path {
        tracing::info!(socket = %p.display(), mode = format!("{:o}", opts.mode), "listening");
    }
    let l = &opts.limits;
    tracing::info!(
        contexts = l.contexts,
        files = l.files,
        objects = l.objects,
        pasids = l.pasids,
        queue_depth = l.queue_depth,
        "limits per user"
    );
    std::thread::Builder::new().name("ioasid-accept".into()).spawn(move || {
        if let Err(e) = ioasid_serve::channel::serve(daemon, listener) {
            tracing::error!(error = %e, "cannot accept clients");
            std::process::exit(1);
        }
    })?;
    let sig = wait_for(&stop);
    tracing::info!(signal = sig, "stopping");
    if let Some(p) = path {
        let _ = std::fs::remove_file(p);
    }
    Ok(())
}

fn init_log() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("IOASID_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
}

/// The listening socket systemd passed (socket activation), if any; an
/// error when what was passed is not a listening `SOCK_SEQPACKET` socket.
fn activated() -> Result<Option<OwnedFd>, String> {
    let var = |name| std::env::var(name).ok().and_then(|v| v.parse::<u32>().ok());
    let (Some(pid), Some(n)) = (var("LISTEN_PID"), var("LISTEN_FDS")) else { return Ok(None) };
    if pid != std::process::id() || n < 1 {
        return Ok(None);
    }
    // SAFETY: sd_listen_fds(3): descriptor 3 is the first one passed;
    // borrowed only to look at it until it is known to be open.
    let passed = unsafe { std::os::fd::BorrowedFd::borrow_raw(3) };
    let listening = rustix::net::sockopt::socket_type(passed).is_ok_and(|t| t == rustix::net::SocketType::SEQPACKET)
        && rustix::net::sockopt::socket_acceptconn(passed).unwrap_or(false);
    if !listening {
        return Err("the descriptor passed by socket activation (3) is not a listening SOCK_SEQPACKET socket \
                    (ListenSequentialPacket= in the socket unit)"
            .into());
    }
    // SAFETY: open and a socket, as checked above; ours from now on.
    let fd = unsafe { OwnedFd::from_raw_fd(3) };
    let _ = rustix::io::fcntl_setfd(&fd, rustix::io::FdFlags::CLOEXEC);
    Ok(Some(fd))
}

/// A listening `SOCK_SEQPACKET` socket at `path`, replacing a stale one (a
/// socket file nobody listens on) but never a live daemon's.
fn bind(path: &Path, mode: u32) -> Result<OwnedFd, Box<dyn std::error::Error>> {
    use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
    let new = || rustix::net::socket_with(AddressFamily::UNIX, SocketType::SEQPACKET, SocketFlags::CLOEXEC, None);
    let addr = SocketAddrUnix::new(path)?;
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        if !meta.file_type().is_socket() {
            return Err(format!("{} exists and is not a socket", path.display()).into());
        }
        let probe = new()?;
        if rustix::net::connect(&probe, &addr).is_ok() {
            return Err(format!("a daemon is already listening on {}", path.display()).into());
        }
        std::fs::remove_file(path).map_err(|e| format!("cannot replace {}: {e}", path.display()))?;
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let sock = new()?;
    rustix::net::bind(&sock, &addr).map_err(|e| format!("cannot listen on {}: {e}", path.display()))?;
    rustix::fs::chmod(path, rustix::fs::Mode::from_raw_mode(mode))?;
    rustix::net::listen(&sock, 128)?;
    Ok(sock)
}

fn block_termination() -> std::io::Result<libc::sigset_t> {
    // SAFETY: a sigset built and installed as this thread's mask before any
    // other thread exists.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            libc::sigaddset(&mut set, s);
        }
        let r = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        if r != 0 {
            return Err(std::io::Error::from_raw_os_error(r));
        }
        Ok(set)
    }
}

fn wait_for(set: &libc::sigset_t) -> i32 {
    let mut sig = 0;
    // SAFETY: waits for one of the blocked signals in `set`.
    while unsafe { libc::sigwait(set, &mut sig) } != 0 {}
    sig
}
