//! `cargo xtask <task>`: everything a developer runs.

mod setup;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "lb developer tasks", long_about = None)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building and testing lb needs (skipping what is there):
    /// Debian packages (llvm-22-dev, bpftool, iproute2, ...), rust-src for the
    /// nightly toolchain, bpf-linker built against LLVM 22; mounts bpffs.
    Setup,
    /// Set up, then run the whole test suite (as root: it loads BPF programs
    /// and builds network namespaces).
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::Setup => setup::run(),
        Task::Test { args } => {
            setup::require_root("cargo xtask test")?;
            setup::run()?;
            setup::cargo(
                [
                    "test",
                    "--package",
                    "lb-common",
                    "--package",
                    "lb-agent",
                    "--package",
                    "xtask",
                ]
                .into_iter()
                .map(String::from)
                .chain(
                    args.is_empty()
                        .then(Vec::new)
                        .unwrap_or_else(|| std::iter::once("--".to_string()).chain(args).collect()),
                ),
            )
        }
    }
}
