//! A device back end in its own process, wired as a vhost-user back end is:
//! it connects to the VMM's control socket, receives the device (made in
//! the VMM's iommufd with `IOASID_DEVICE_NEW`) and the guest memory file
//! over `SCM_RIGHTS`, opens a port on the device through `ioasid serve`,
//! and then does DMA at IOVAs, translated locally, as the VMM asks.
//!
//! ```text
//! backend CONTROL_SOCKET
//! ```
//!
//! The first message carries the device and the guest memory memfd, and
//! the text `DAEMON_SOCKET PASID|- GUEST_MEMORY_BYTES`. Each later message is
//! one command, answered with one message:
//!
//! - `read IOVA LEN`: `ok HEX` (or `fault`/`blocked`)
//! - `write IOVA BYTE LEN`: fills, `ok`
//! - `virtio IOVA`: reads a `u64` through vm-memory's `IommuMemory` (the
//!   path a virtio-queue device model takes), `ok VALUE`
//! - `hammer IOVA`: starts writing a nonzero pattern at IOVA continuously, `ok`
//! - `vhammer IOVA`: starts reading a `u64` at IOVA through `IommuMemory`
//!   continuously, `ok`
//! - `stop`: stops either, `ok ACCESSES FAULTS [FIRST ERROR]`
//! - `stall IOVA`: translates IOVA through vm-memory and, holding the
//!   translation (so mid-DMA), stops itself with SIGSTOP
//!
//! The VMM side of the same wiring is `ioasid demo --processes`.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use ioasid_client::{DmaError, IommuPort, Port, wire};
use vm_memory::iommu::{Iommu, IommuMemory};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap, Permissions};

fn recv(sock: &OwnedFd) -> Option<(String, Vec<OwnedFd>)> {
    let mut buf = [0u8; 4096];
    let (n, fds) = wire::recv_with(sock.as_fd(), &mut buf).ok()?;
    (n > 0).then(|| (String::from_utf8_lossy(&buf[..n]).into_owned(), fds))
}

fn say(sock: &OwnedFd, text: &str) {
    let _ = rustix::net::send(sock, text.as_bytes(), rustix::net::SendFlags::NOSIGNAL);
}

fn num(s: Option<&str>) -> u64 {
    let s = s.unwrap_or("0");
    s.strip_prefix("0x").map_or_else(|| s.parse().unwrap_or(0), |h| u64::from_str_radix(h, 16).unwrap_or(0))
}

fn outcome(r: Result<(), DmaError>) -> String {
    match r {
        Ok(()) => "ok".into(),
        Err(DmaError::Fault { .. }) => "fault".into(),
        Err(DmaError::Blocked) => "blocked".into(),
        Err(e) => format!("error {e}"),
    }
}

fn main() {
    let control = std::env::args().nth(1).expect("usage: backend CONTROL_SOCKET");
    let sock = rustix::net::socket_with(
        rustix::net::AddressFamily::UNIX,
        rustix::net::SocketType::SEQPACKET,
        rustix::net::SocketFlags::CLOEXEC,
        None,
    )
    .unwrap();
    rustix::net::connect(&sock, &rustix::net::SocketAddrUnix::new(control.as_str()).unwrap()).unwrap();

    // The VMM's hand-over: the device, guest memory, and where the daemon is.
    let (text, mut fds) = recv(&sock).expect("the VMM hung up");
    let mut words = text.split_whitespace();
    let daemon = std::path::PathBuf::from(words.next().expect("daemon socket"));
    let pasid = words.next().and_then(|p| p.parse().ok());
    let ram_len = num(words.next()) as usize;
    let memfd = fds.pop().expect("guest memory");
    let device = fds.pop().expect("device");
    let port = match Port::open(&daemon, device.as_fd(), pasid) {
        Ok(p) => Arc::new(p),
        Err(e) => return say(&sock, &format!("error {e}")),
    };
    // Guest memory as a vhost-user back end maps it: the VMM's file, at
    // guest-physical 0.
    let file = Arc::new(std::fs::File::from(memfd));
    let region = GuestRegionMmap::from_range(GuestAddress(0), ram_len, Some(FileOffset::from_arc(file, 0))).unwrap();
    let ram = GuestMemoryMmap::from_regions(vec![region]).unwrap();
    let memory = Arc::new(IommuMemory::new(ram.clone(), IommuPort::for_memory(port.clone(), &ram), true, ()));
    say(&sock, "ready");

    let running = Arc::new(AtomicBool::new(false));
    let counts = Arc::new((AtomicU64::new(0), AtomicU64::new(0)));
    let first_error = Arc::new(std::sync::Mutex::new(None::<String>));
    let mut hammer: Option<std::thread::JoinHandle<()>> = None;
    while let Some((cmd, _)) = recv(&sock) {
        let mut w = cmd.split_whitespace();
        let reply = match w.next() {
            Some("read") => {
                let (iova, len) = (num(w.next()), num(w.next()) as usize);
                let mut buf = vec![0u8; len];
                match port.read(iova, &mut buf) {
                    Ok(()) => format!("ok {}", buf.iter().map(|b| format!("{b:02x}")).collect::<String>()),
                    Err(e) => outcome(Err(e)),
                }
            }
            Some("write") => {
                let (iova, byte, len) = (num(w.next()), num(w.next()) as u8, num(w.next()) as usize);
                outcome(port.write(iova, &vec![byte; len]))
            }
            Some("virtio") => match memory.read_obj::<u64>(GuestAddress(num(w.next()))) {
                Ok(v) => format!("ok {v:#x}"),
                Err(e) => format!("fault {e}"),
            },
            Some("hammer") => {
                let iova = num(w.next());
                running.store(true, Ordering::SeqCst);
                let (port, running, counts) = (port.clone(), running.clone(), counts.clone());
                hammer = Some(std::thread::spawn(move || {
                    let data = [0xa5u8; 256];
                    while running.load(Ordering::Relaxed) {
                        match port.write(iova, &data) {
                            Ok(()) => counts.0.fetch_add(1, Ordering::Relaxed),
                            Err(_) => counts.1.fetch_add(1, Ordering::Relaxed),
                        };
                    }
                }));
                "ok".into()
            }
            Some("vhammer") => {
                let iova = GuestAddress(num(w.next()));
                running.store(true, Ordering::SeqCst);
                let (memory, running, counts) = (memory.clone(), running.clone(), counts.clone());
                let first = first_error.clone();
                hammer = Some(std::thread::spawn(move || {
                    while running.load(Ordering::Relaxed) {
                        match memory.read_obj::<u64>(iova) {
                            Ok(_) => counts.0.fetch_add(1, Ordering::Relaxed),
                            Err(e) => {
                                first.lock().unwrap().get_or_insert_with(|| e.to_string());
                                counts.1.fetch_add(1, Ordering::Relaxed)
                            }
                        };
                    }
                }));
                "ok".into()
            }
            Some("stop") => {
                running.store(false, Ordering::SeqCst);
                if let Some(h) = hammer.take() {
                    let _ = h.join();
                }
                let (n, faults) = (counts.0.load(Ordering::SeqCst), counts.1.load(Ordering::SeqCst));
                match first_error.lock().unwrap().take() {
                    Some(e) => format!("ok {n} {faults} {e}"),
                    None => format!("ok {n} {faults}"),
                }
            }
            Some("stall") => {
                let iova = GuestAddress(num(w.next()));
                match memory.iommu().translate(iova, 8, Permissions::Write) {
                    Ok(held) => {
                        say(&sock, "stalled");
                        // Inside the DMA: the translation is held.
                        let _ = rustix::process::kill_process(rustix::process::getpid(), rustix::process::Signal::STOP);
                        drop(held);
                        "resumed".into()
                    }
                    Err(e) => format!("fault {e}"),
                }
            }
            _ => "error unknown command".into(),
        };
        say(&sock, &reply);
    }
}
