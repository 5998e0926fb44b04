//! `ioasid serve` as systemd starts it: socket activation, without systemd.
//! The test holds the listening socket, passes it as descriptor 3 with
//! `LISTEN_FDS=1` and `LISTEN_PID` naming the daemon, and a C program run
//! with `ioasid run --socket` gets its context from the daemon.

mod common;

use std::os::fd::{AsRawFd, OwnedFd};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{build_shim, compile, target_dir};

const PROGRAM: &str = r#"
#include <fcntl.h>
#include <stdio.h>
#include <sys/ioctl.h>
#include <unistd.h>
#include <linux/types.h>

struct ioas_alloc { __u32 size, flags, out_ioas_id; };
#define IOMMU_IOAS_ALLOC 0x3b81

int main(void) {
    int fd = open("/dev/iommu", O_RDWR);
    if (fd < 0) { perror("open /dev/iommu"); return 1; }
    struct ioas_alloc a = { .size = sizeof(a) };
    if (ioctl(fd, IOMMU_IOAS_ALLOC, &a)) { perror("IOMMU_IOAS_ALLOC"); return 1; }
    if (a.out_ioas_id == 0) { fprintf(stderr, "no IOAS ID\n"); return 1; }
    close(fd);
    printf("ok\n");
    return 0;
}
"#;

/// A listening `SOCK_SEQPACKET` socket at `path`, as systemd's
/// `ListenSequentialPacket=` makes it.
fn listen(path: &std::path::Path) -> OwnedFd {
    use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
    let sock =
        rustix::net::socket_with(AddressFamily::UNIX, SocketType::SEQPACKET, SocketFlags::CLOEXEC, None).unwrap();
    rustix::net::bind(&sock, &SocketAddrUnix::new(path).unwrap()).unwrap();
    rustix::net::listen(&sock, 16).unwrap();
    sock
}

/// `ioasid serve` with `listener` as its descriptor 3 and the environment
/// sd_listen_fds(3) reads; the shell's `exec` keeps its pid for LISTEN_PID.
fn activate(listener: &OwnedFd) -> Child {
    let fd = listener.as_raw_fd();
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(r#"LISTEN_PID=$$ LISTEN_FDS=1 exec "$0" serve"#)
        .arg(env!("CARGO_BIN_EXE_ioasid"))
        .env("IOASID_LOG", "debug")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // SAFETY: between fork and exec only dup2 or fcntl, async-signal-safe;
    // `fd` stays open in the parent until the child is spawned.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
            // dup2 leaves the new descriptor without close-on-exec, but does
            // nothing when the listener is descriptor 3 already.
            let r = if fd == 3 { libc::fcntl(fd, libc::F_SETFD, 0) } else { libc::dup2(fd, 3) };
            if r < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn().unwrap()
}

/// Waits for `child` to exit, at most `limit`.
fn wait(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

#[test]
fn a_socket_activated_daemon_serves_a_program_and_stops_on_sigterm() {
    build_shim();
    let dir = std::env::temp_dir().join(format!("ioasid-serve-activated-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("ioasid.sock");
    let listener = listen(&path);
    let mut daemon = activate(&listener);
    // The daemon has its own copy: connections now queue for it alone.
    drop(listener);

    let prog = compile(&dir, PROGRAM);
    let out = Command::new(env!("CARGO_BIN_EXE_ioasid"))
        .arg("run")
        .arg("--socket")
        .arg(&path)
        .arg("--")
        .arg(&prog)
        .env("IOASID_PRELOAD", target_dir().join("libioasid_preload.so"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);

    let pid = rustix::process::Pid::from_child(&daemon);
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    let status = wait(&mut daemon, Duration::from_secs(10));
    if status.is_none() {
        let _ = daemon.kill();
        let _ = daemon.wait();
    }
    let log = std::io::read_to_string(daemon.stderr.take().unwrap()).unwrap();
    std::fs::remove_dir_all(&dir).ok();

    assert!(out.status.success() && stdout.trim() == "ok", "{stdout}{}\n{log}", String::from_utf8_lossy(&out.stderr));
    assert!(log.contains("listening on the socket systemd passed"), "{log}");
    assert!(log.contains("context opened"), "the program's context was not the daemon's:\n{log}");
    let status = status.unwrap_or_else(|| panic!("SIGTERM did not stop the daemon:\n{log}"));
    assert!(status.success(), "{status}\n{log}");
}
