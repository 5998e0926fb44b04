//! The `ioasid` command.

mod demo;
mod demo_processes;
mod run;
mod serve;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "ioasid", version, about = "Userspace I/O address spaces: Linux's iommufd, in Rust")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Walk through the whole path: an IOAS, memory, two devices, DMA, page tables, unmap.
    Demo {
        /// Instead: a VMM here and a virtio back end in another process
        /// sharing an IOAS through a daemon.
        #[arg(long)]
        processes: bool,
    },
    /// The back end of `ioasid demo --processes`, which runs it.
    #[command(name = "demo-backend", hide = true)]
    DemoBackend {
        /// The demo's control socket.
        control: std::path::PathBuf,
    },
    /// Run a program with a working /dev/iommu (the preload shim).
    Run {
        /// An emulated PCI function the program gets as a VFIO device
        /// (/dev/vfio/devices/vfioN, its group and sysfs entries):
        /// MODEL[,bdf=DDDD:BB:DD.F][,iommu=vtd|vtd5|smmuv3|amd|selftest][,pasid=BITS][,pri=on].
        /// Repeat for several; `--device help` lists the models.
        #[arg(long = "device", value_name = "SPEC")]
        devices: Vec<String>,
        /// Contexts live in the daemon listening at PATH (`ioasid serve`),
        /// not in the program: they outlive it and are shared with whatever
        /// process it passes its descriptors to.
        #[arg(long, value_name = "PATH", conflicts_with = "devices")]
        socket: Option<std::path::PathBuf>,
        /// Without the preload shim: the program's opens and iommufd ioctls
        /// are answered through seccomp user notification, so statically
        /// linked programs and raw system calls get /dev/iommu too (by this
        /// process, or by the daemon given with --socket).
        #[arg(long, conflicts_with = "devices")]
        supervised: bool,
        /// The program and its arguments.
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<std::ffi::OsString>,
    },
    /// Serve I/O address spaces to other processes (in the foreground; stop with SIGTERM).
    Serve {
        /// The socket to listen on [default: /run/ioasid.sock as root,
        /// $XDG_RUNTIME_DIR/ioasid.sock otherwise]; ignored when systemd
        /// passes one (socket activation).
        #[arg(long, value_name = "PATH")]
        socket: Option<std::path::PathBuf>,
        /// The socket file's permissions: who may connect. Each user then
        /// reaches only its own contexts and those it is handed.
        #[arg(long, value_name = "OCTAL", default_value = "600", value_parser = octal)]
        mode: u32,
        /// Open iommufds each user may have.
        #[arg(long, value_name = "N", default_value_t = ioasid_serve::limits::Limits::default().contexts)]
        max_contexts: u32,
        /// Other open files (fault queues, vEVENTQs) each user may have.
        #[arg(long, value_name = "N", default_value_t = ioasid_serve::limits::Limits::default().files)]
        max_files: u32,
        /// Objects (IOASes, HWPTs, ...) each context may hold.
        #[arg(long, value_name = "N", default_value_t = ioasid_serve::limits::Limits::default().objects)]
        max_objects: u32,
        /// PASIDs each user's IOASID sets may hold together, of the
        /// daemon-wide PASID space.
        #[arg(long, value_name = "N", default_value_t = ioasid_serve::limits::Limits::default().pasids)]
        max_pasids: u32,
        /// Events each vEVENTQ may hold (the deepest queue a client may ask for).
        #[arg(long, value_name = "N", default_value_t = ioasid_serve::limits::Limits::default().queue_depth)]
        max_queue_depth: u32,
        /// How long an unmap waits for a back end's DMA in flight before it
        /// cuts the back end off (kills it and tells the VMM), in milliseconds.
        #[arg(long, value_name = "MS", default_value_t = ioasid_serve::limits::Limits::default().backend_stall_ms)]
        backend_stall_ms: u32,
    },
}

fn octal(s: &str) -> Result<u32, String> {
    u32::from_str_radix(s, 8).map_err(|e| format!("not an octal mode: {e}"))
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Demo { processes: false } => demo::run(&mut std::io::stdout().lock()),
        Command::Demo { processes: true } => demo_processes::run(&mut std::io::stdout().lock()),
        Command::DemoBackend { control } => demo_processes::backend(&control),
        Command::Run { devices, socket, supervised, command } => {
            run::run(&devices, socket.as_deref(), supervised, &command)
        }
        Command::Serve {
            socket,
            mode,
            max_contexts,
            max_files,
            max_objects,
            max_pasids,
            max_queue_depth,
            backend_stall_ms,
        } => {
            let limits = ioasid_serve::limits::Limits {
                contexts: max_contexts,
                files: max_files,
                objects: max_objects,
                pasids: max_pasids,
                queue_depth: max_queue_depth,
                backend_stall_ms,
            };
            serve::serve(serve::Options { socket, mode, limits })
        }
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ioasid: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
