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
