//! The `ioasid` command.

mod demo;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "ioasid",
    version,
    about = "Userspace I/O address spaces: Linux's iommufd, in Rust"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Walk through the whole path: an IOAS, memory, two devices, DMA, page tables, unmap.
    Demo,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Demo => demo::run(&mut std::io::stdout().lock()),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ioasid: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
