//! `ioasid serve` and the programs it serves: under `ioasid run --socket`
//! (the shim), `ioasid run --supervised` (statically linked, no shim) and
//! both together.

use std::io::{BufRead, BufReader, Write};
use std::process::Stdio;

mod common;
use common::{Serve, build_shim, compile, compile_with, ioasid_run, run_c_args};

#[test]
fn serve_stops_on_sigterm_and_removes_its_socket() {
    let mut serve = Serve::start("sigterm");
    let socket = serve.socket.clone();
    let status = serve.stop();
    assert_eq!(status.code(), Some(0), "{status}");
    assert!(!socket.exists(), "the socket file is left behind");
}

#[test]
fn serve_refuses_a_socket_a_live_daemon_holds() {
    let serve = Serve::start("live");
    let out = std::process::Command::new(common::ioasid_exe())
        .args(["serve", "--socket", serve.socket()])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success(), "a second daemon started on a live socket");
    assert!(String::from_utf8_lossy(&out.stderr).contains("already listening"), "{out:?}");
    // The first still answers.
    assert!(common::listening(&serve.socket));
}

#[test]
fn serve_replaces_a_stale_socket_file() {
    let mut first = Serve::start("stale");
    // A daemon killed outright leaves its socket file behind.
    first.child.as_mut().unwrap().kill().unwrap();
    first.child.as_mut().unwrap().wait().unwrap();
    assert!(first.socket.exists() && !common::listening(&first.socket));
    let child = std::process::Command::new(common::ioasid_exe())
        .args(["serve", "--socket", first.socket()])
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    first.child = Some(child);
    first.wait_listening();
    assert_eq!(first.stop().code(), Some(0));
}

#[test]
fn iommufds_are_shared_as_kernel_files_under_run_socket() {
    let serve = Serve::start("files");
    let program = format!("{}{}", common::IOMMUFD_C, common::FILES_C);
    run_c_args("daemon-files", &program, &[], &["--socket", serve.socket()]);
}

#[test]
fn an_iommufd_passed_to_an_unrelated_program_outlives_its_sender() {
    build_shim();
    let serve = Serve::start("scm");
    let dir = serve.dir.join("prog");
    std::fs::create_dir_all(&dir).unwrap();
    let exe = compile(&dir, &format!("{}{}", common::IOMMUFD_C, common::FILES_C));
    let path = dir.join("pass");
    let path = path.to_str().unwrap();
    let socket = ["--socket", serve.socket()];
    let mut receiver =
        ioasid_run(&socket, &exe).args(["receive", path]).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
    let mut out = BufReader::new(receiver.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "listening");
    let sender = ioasid_run(&socket, &exe).args(["send", path]).output().unwrap();
    assert!(sender.status.success(), "{sender:?}");
    receiver.stdin.take().unwrap().write_all(b"go\n").unwrap();
    let status = receiver.wait().unwrap();
    let rest = std::io::read_to_string(out).unwrap();
    assert!(status.success() && rest.trim() == "ok", "{rest}");
}

/// A statically linked program: a memfd (MAP_SHARED) and private memory
/// mapped, IOVA ranges read, and the same through raw `syscall(SYS_ioctl)`.
const STATIC_C: &str = r#"
int main(void) {
    alarm(20);
    int fd = open("/dev/iommu", O_RDWR | O_CLOEXEC);
    CHECK(fd >= 0);
    __u32 ioas = ioas_alloc(fd);
    CHECK(iova_ranges(fd, ioas) >= 1);
    int mfd = memfd_create("dma", 0);
    CHECK(mfd >= 0 && ftruncate(mfd, 0x10000) == 0);
    void *shared = mmap(NULL, 0x10000, PROT_READ | PROT_WRITE, MAP_SHARED, mfd, 0);
    void *private = mmap(NULL, 0x10000, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    CHECK(shared != MAP_FAILED && private != MAP_FAILED);
    CHECK(ioas_map(fd, ioas, shared, 0x10000, 0x100000) == 0);
    CHECK(ioas_map(fd, ioas, private, 0x10000, 0x200000) == 0);
    CHECK(ioas_map(fd, ioas, private, 0x10000, 0x200000) == -1 && errno == EEXIST);
    /* Raw system calls reach it too. */
    struct ioas_unmap u = { sizeof(u), ioas, 0x100000, 0x10000 };
    CHECK(syscall(SYS_ioctl, fd, IOMMU_IOAS_UNMAP, &u) == 0 && u.length == 0x10000);
    struct iova_range r[4];
    struct ioas_iova_ranges q = { sizeof(q), ioas, 4, 0, (__u64)(unsigned long)r, 0 };
    CHECK(syscall(SYS_ioctl, fd, IOMMU_IOAS_IOVA_RANGES, &q) == 0 && q.num_iovas >= 1 && r[0].start <= 0x100000);
    struct destroy d = { sizeof(d), ioas };
    CHECK(syscall(SYS_ioctl, fd, IOMMU_DESTROY, &d) == 0);
    CHECK(syscall(SYS_ioctl, fd, IOMMU_DESTROY, &d) == -1 && errno == ENOENT);
    CHECK(ioas_unmap(fd, ioas_alloc(fd), 0, ~0ULL) == 0);
    /* A read is the socket's, which the daemon never writes to: the end of
       the file at once (Linux's is EINVAL), never a wait. */
    char byte;
    CHECK(read(fd, &byte, 1) == 0);
    CHECK(close(fd) == 0);
    /* Other files are the kernel's as ever. */
    CHECK(syscall(SYS_ioctl, mfd, IOMMU_IOAS_ALLOC, &d) == -1 && errno == ENOTTY);
    printf("ok\n");
    return 0;
}
"#;

fn static_program() -> String {
    format!("{}{STATIC_C}", common::IOMMUFD_C)
}

#[test]
fn a_static_program_runs_supervised() {
    // Linked statically, the program never loads the shim: only the
    // supervisor can answer its /dev/iommu.
    let dir = std::env::temp_dir().join(format!("ioasid-static-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let exe = compile_with(&dir, &static_program(), &["-static"]);
    let plain = std::process::Command::new(&exe).output().unwrap();
    std::fs::remove_dir_all(&dir).ok();
    assert!(String::from_utf8_lossy(&plain.stdout).trim() != "ok", "the machine's own /dev/iommu answered");
    run_c_args("supervised", &static_program(), &["-static"], &["--supervised"]);
}

#[test]
fn a_static_program_runs_supervised_by_the_daemon() {
    let serve = Serve::start("supervised");
    run_c_args("supervised-socket", &static_program(), &["-static"], &["--supervised", "--socket", serve.socket()]);
}
