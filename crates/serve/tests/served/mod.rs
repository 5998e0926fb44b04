//! A daemon run in a test's process, serving channels on a socket of its
//! own.

use std::ffi::CString;
use std::path::PathBuf;
use std::sync::Arc;

use ioasid_serve::client::Client;
use ioasid_serve::daemon::Daemon;
use ioasid_serve::limits::Limits;

/// A daemon in this process, listening in a directory of its own.
pub struct Served {
    pub daemon: Arc<Daemon>,
    pub dir: PathBuf,
    pub socket: PathBuf,
}

impl Served {
    pub fn start(tag: &str, limits: Limits) -> Served {
        use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
        let dir = std::env::temp_dir().join(format!("ioasid-daemon-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("sock");
        let listener =
            rustix::net::socket_with(AddressFamily::UNIX, SocketType::SEQPACKET, SocketFlags::CLOEXEC, None).unwrap();
        rustix::net::bind(&listener, &SocketAddrUnix::new(&socket).unwrap()).unwrap();
        rustix::net::listen(&listener, 16).unwrap();
        let daemon = Daemon::new(limits).unwrap();
        let d = daemon.clone();
        std::thread::spawn(move || ioasid_serve::channel::serve(d, listener));
        Served { daemon, dir, socket }
    }

    /// A channel of this process's, as the shim opens one.
    #[allow(dead_code)]
    pub fn client(&self) -> Client {
        Client::new(CString::new(self.socket.to_str().unwrap()).unwrap(), |_, _| {})
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        std::fs::remove_dir_all(&self.dir).ok();
    }
}
