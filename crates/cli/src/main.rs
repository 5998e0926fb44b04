//! The `ioasid` command.

mod demo;
mod run;

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
    Demo,
    /// Run a program with a working /dev/iommu (the preload shim).
    Run {
        /// An emulated PCI function the program gets as a VFIO device
        /// (/dev/vfio/devices/vfioN, its group and sysfs entries):
        /// MODEL[,bdf=DDDD:BB:DD.F][,iommu=vtd|vtd5|smmuv3|amd|selftest][,pasid=BITS][,pri=on].
        /// Repeat for several; `--device help` lists the models.
        #[arg(long = "device", value_name = "SPEC")]
        devices: Vec<String>,
        /// The program and its arguments.
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<std::ffi::OsString>,
    },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Demo => demo::run(&mut std::io::stdout().lock()),
        Command::Run { devices, command } => run::run(&devices, &command),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ioasid: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
