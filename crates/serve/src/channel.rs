//! The daemon's side of the shim's channels (see [`wire`](crate::wire)):
//! a listening socket, and a thread per connected process.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use ioasid_abi::Errno;

use crate::daemon::{Daemon, Installer, Peer};
use crate::wire::{self, Msg};

/// Accepts channels on `listener` until it fails, serving each on a thread
/// of its own.
pub fn serve(daemon: Arc<Daemon>, listener: OwnedFd) -> std::io::Result<()> {
    loop {
        let sock = match rustix::net::accept_with(&listener, rustix::net::SocketFlags::CLOEXEC) {
            Ok(s) => s,
            Err(rustix::io::Errno::INTR | rustix::io::Errno::CONNABORTED) => continue,
            Err(e) => return Err(e.into()),
        };
        let d = daemon.clone();
        std::thread::Builder::new().name("ioasid-channel".into()).spawn(move || serve_one(&d, sock))?;
    }
}

/// The descriptors a command makes go to the program over its channel.
struct Shim<'a> {
    sock: &'a OwnedFd,
}

impl Installer for Shim<'_> {
    fn install(&self, fd: OwnedFd, cloexec: bool, kind: u64) -> Result<i32, Errno> {
        let mut m = Msg::new(wire::INSTALL);
        m.request = u32::from(cloexec);
        m.arg = kind;
        wire::send(self.sock.as_fd(), &m, &[fd.as_fd()]).map_err(|e| Errno(e.raw_os_error()))?;
        drop(fd);
        match wire::recv(self.sock.as_fd()) {
            Ok(Some((m, fds))) if m.kind == wire::INSTALLED && fds.is_empty() => {
                m.result().map(|n| n as i32).map_err(Errno)
            }
            // The shim broke the protocol or went away; the command fails
            // and the channel ends at its next read.
            _ => Err(Errno(libc::EPIPE)),
        }
    }

    fn uninstall(&self, n: i32) {
        let mut m = Msg::new(wire::UNINSTALL);
        m.fd = n;
        let _ = wire::send(self.sock.as_fd(), &m, &[]);
    }
}

/// Serves one process's connected channel, on the calling thread, until it
/// hangs up or breaks the protocol. The caller is whoever `SO_PEERCRED`
/// names: the process that connected, or made the pair.
pub fn serve_one(daemon: &Arc<Daemon>, sock: OwnedFd) {
    let Ok(cred) = rustix::net::sockopt::socket_peercred(&sock) else { return };
    let (pid, uid) = (cred.pid.as_raw_nonzero().get(), cred.uid.as_raw());
    let shim = Shim { sock: &sock };
    let peer = match Peer::new(daemon, pid, uid, &shim) {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(pid, errno = e.0, "cannot reach a new client");
            return;
        }
    };
    tracing::debug!(pid, uid, "client connected");
    // Ports a back end opened on this channel, by number.
    let mut ports: Vec<Arc<crate::remote::RemotePort>> = Vec::new();
    // The caller's failure injection runs on this thread for each call;
    // its number is asked once, not a system call per request.
    let tid = ioasid_engine::inject::current_tid();
    loop {
        let (msg, passed) = match wire::recv(sock.as_fd()) {
            Ok(Some(m)) => m,
            Ok(None) => break,
            Err(e) => {
                tracing::warn!(pid, error = %e, "a client broke the protocol; its channel is closed");
                break;
            }
        };
        daemon.reap();
        ioasid_engine::inject::set_fail_nth(tid, msg.fail_nth);
        let (mut reply, fds) = match msg.kind {
            wire::SUPERVISE => supervise(daemon, pid, passed),
            wire::PORT => open_port(daemon, &peer, &msg, passed, &mut ports),
            wire::TRANSLATE => match ports.get(msg.fd as usize) {
                Some(port) => match translate(&sock, port, &msg) {
                    Ok(r) => (r, Vec::new()),
                    Err(()) => break,
                },
                None => (Msg::reply(Err(libc::EBADF)), Vec::new()),
            },
            _ => answer(daemon, &peer, &msg),
        };
        reply.fail_nth = ioasid_engine::inject::fail_nth(tid);
        ioasid_engine::inject::set_fail_nth(tid, 0);
        let fds: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
        if wire::send(sock.as_fd(), &reply, &fds).is_err() {
            break;
        }
    }
    for p in ports {
        p.close();
    }
    tracing::debug!(pid, "client disconnected");
}

/// Opens a port on the device file passed with the message.
fn open_port(
    daemon: &Daemon,
    peer: &Peer<'_>,
    msg: &Msg,
    passed: Vec<OwnedFd>,
    ports: &mut Vec<Arc<crate::remote::RemotePort>>,
) -> (Msg, Vec<OwnedFd>) {
    let errno = |e: i32| (Msg::reply(Err(e)), Vec::new());
    let Some(device) = passed.first() else { return errno(libc::EBADF) };
    let Some(ioasid_abi::files::File::Device(device)) = daemon.file(device) else { return errno(libc::ENODEV) };
    if ports.len() >= ioasid_client::atc::REGIONS {
        return errno(libc::EMFILE);
    }
    let pasid = match msg.request {
        0 => None,
        1 => match u32::try_from(msg.arg) {
            Ok(p) => Some(p),
            Err(_) => return errno(libc::EINVAL),
        },
        _ => return errno(libc::EINVAL),
    };
    let pidfd = match peer.pidfd.try_clone() {
        Ok(f) => f,
        Err(_) => return errno(libc::EMFILE),
    };
    match daemon.remotes.open(device, pasid, peer.pid, pidfd) {
        Ok((port, table, slots)) => {
            ports.push(port);
            (Msg::reply(Ok(ports.len() as i64 - 1)), vec![table, slots])
        }
        Err(e) => errno(e.0),
    }
}

/// Serves a back end's miss: announces the files it needs (`REGION`),
/// then answers. `Err` when the back end is gone.
fn translate(sock: &OwnedFd, port: &crate::remote::RemotePort, msg: &Msg) -> Result<Msg, ()> {
    match port.translate(msg.arg, msg.arg2, msg.request) {
        Ok((announce, generation)) => {
            for (index, file, len, writable) in announce {
                let mut m = Msg::new(wire::REGION);
                m.fd = msg.fd;
                m.request = index;
                m.arg = len;
                m.value = i64::from(writable);
                wire::send(sock.as_fd(), &m, &[file.as_fd()]).map_err(|_| ())?;
            }
            Ok(Msg::reply(Ok(generation.map_or(wire::CHANGED, |g| g as i64))))
        }
        Err(e) => Ok(Msg::reply(Err(e.0))),
    }
}

/// Serves a supervised program's listener, on a thread of its own.
fn supervise(daemon: &Arc<Daemon>, pid: i32, passed: Vec<OwnedFd>) -> (Msg, Vec<OwnedFd>) {
    let Some(listener) = passed.into_iter().next() else { return (Msg::reply(Err(libc::EINVAL)), Vec::new()) };
    let d = daemon.clone();
    let spawned = std::thread::Builder::new().name("ioasid-supervise".into()).spawn(move || {
        crate::supervise::serve(listener, d);
        tracing::debug!(pid, "supervised program ended");
    });
    match spawned {
        Ok(_) => (Msg::reply(Ok(0)), Vec::new()),
        Err(_) => (Msg::reply(Err(libc::EAGAIN)), Vec::new()),
    }
}

fn answer(daemon: &Daemon, peer: &Peer<'_>, msg: &Msg) -> (Msg, Vec<OwnedFd>) {
    let errno = |e: Errno| (Msg::reply(Err(e.0)), Vec::new());
    match msg.kind {
        wire::OPEN => match daemon.open_context(peer.pid, peer.uid) {
            Ok(fd) => (Msg::reply(Ok(0)), vec![fd]),
            Err(e) => errno(e),
        },
        wire::IOCTL => {
            let copy = match peer.copy(msg.fd) {
                Ok(f) => f,
                Err(e) => return errno(e),
            };
            match daemon.file(&copy) {
                Some(file) => (Msg::reply(daemon.ioctl(peer, file, msg.request, msg.arg).map_err(|e| e.0)), Vec::new()),
                None => (Msg::new(wire::NOT_OURS), Vec::new()),
            }
        }
        wire::MMAP => {
            let r = peer.copy(msg.fd).and_then(|file| {
                let len = usize::try_from(msg.arg2).map_err(|_| Errno::EINVAL)?;
                daemon.mmap(peer, &file, len, msg.request as i32, msg.value as i32, msg.arg as i64)
            });
            match r {
                Ok((memory, hold)) => (Msg::reply(Ok(0)), vec![memory, hold]),
                Err(e) => errno(e),
            }
        }
        wire::FLUSH => {
            daemon.flush_queues();
            (Msg::reply(Ok(0)), Vec::new())
        }
        wire::PAGES => {
            let pid = msg.arg as i32;
            // Another user's processes are not this client's to ask about.
            if ioasid_engine::account::uid_of(Some(pid)) != peer.uid && peer.uid != 0 {
                return errno(Errno(libc::EPERM));
            }
            let (locked, pinned) = ioasid_engine::account::process_pages(Some(pid));
            let n = if msg.request == 1 { locked } else { pinned };
            (Msg::reply(Ok(n as i64)), Vec::new())
        }
        _ => errno(Errno::EINVAL),
    }
}
