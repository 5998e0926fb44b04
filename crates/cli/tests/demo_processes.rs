//! `ioasid demo --processes`: a VMM (with the daemon) in the demo's process
//! and a virtio back end in another, sharing an IOAS.

use std::process::Command;

mod common;

#[test]
fn the_processes_demo_runs_each_scene_and_leaves_no_back_end_behind() {
    let out = Command::new(common::ioasid_exe()).args(["demo", "--processes"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "the demo failed:\n{text}\n{}", String::from_utf8_lossy(&out.stderr));
    let expect = |line: &str| assert!(text.contains(line), "no {line:?} in:\n{text}");
    // 1: the reply arrives through the VMM's mappings.
    expect("\"HELLO FROM THE GUEST\" in guest page 0x5000");
    // 2: after the remap, the reply lands in the new page, the old one kept.
    expect("\"SECOND REQUEST, NEW PAGES\" in the new page 0x7000");
    expect("page 0x5000 still holds \"HELLO FROM THE GUEST\": untouched");
    // 3: after the unmap, the back end's write faults and lands nowhere.
    expect("IOVA 0x90001000 (write)");
    expect("its reply's DMA failed: IOMMU fault at IOVA 0x90001000 (write)");
    expect("chain 4 completed with 0 B written");
    expect("page 0x7000 untouched by the refused DMA");
    // 4: the page request crosses to the VMM, which maps and answers.
    expect("IOVA 0x90002000 (write)");
    expect("mapped page 0x8000 there, answered SUCCESS");
    expect("\"WRITTEN AFTER A PAGE REQUEST\" in page 0x8000");
    // 5: hits ask the daemon nothing.
    expect("ns per 64-byte Port::read");
    expect("no request to the daemon (its table unchanged)");
    expect("the VMM's device file reported its port gone");
    assert!(!text.contains("CHANGED"), "{text}");

    // The back end ended with the demo (and the demo reaped it).
    let pid = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("back end").and_then(|r| r.trim().strip_prefix("pid ")))
        .and_then(|r| r.split_whitespace().next())
        .expect("the back end's pid");
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists(), "back end {pid} outlived the demo");
}

#[test]
fn the_back_end_dies_with_a_demo_killed_before_it_could_end_it() {
    use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
    use rustix::process::{Pid, Signal, kill_process};
    use std::io::BufRead;
    use std::process::Stdio;
    use std::time::{Duration, Instant};
    let dir = std::env::temp_dir().join(format!("ioasid-demo-backend-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("control");
    let listener =
        rustix::net::socket_with(AddressFamily::UNIX, SocketType::SEQPACKET, SocketFlags::CLOEXEC, None).unwrap();
    rustix::net::bind(&listener, &SocketAddrUnix::new(&path).unwrap()).unwrap();
    rustix::net::listen(&listener, 1).unwrap();
    // A stand-in for the demo: a process that starts the back end and then
    // only waits, to be killed.
    let mut demo = Command::new("sh")
        .arg("-c")
        .arg(r#""$0" demo-backend "$1" & echo $!; exec sleep 60"#)
        .arg(common::ioasid_exe())
        .arg(&path)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(demo.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let pid: i32 = line.trim().parse().unwrap();
    // Connected: it waits for a hand-over that will never come.
    let _sock = rustix::net::accept_with(&listener, SocketFlags::CLOEXEC).unwrap();
    demo.kill().unwrap();
    demo.wait().unwrap();
    // Gone, or a zombie waiting for whoever inherited it.
    let ended = || {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map_or(true, |s| s.rsplit_once(") ").is_some_and(|(_, rest)| rest.starts_with('Z')))
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while !ended() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let outlived = !ended();
    if outlived {
        let _ = kill_process(Pid::from_raw(pid).unwrap(), Signal::KILL);
    }
    std::fs::remove_dir_all(&dir).ok();
    assert!(!outlived, "the back end outlived the demo");
}
