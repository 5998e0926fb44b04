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
        /// The program and its arguments.
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<std::ffi::OsString>,
    },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Demo => demo::run(&mut std::io::stdout().lock()),
        Command::Run { command } => run::exec(&command),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ioasid: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
