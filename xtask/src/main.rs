//! `cargo xtask <task>`: everything a developer runs.

mod bench;
mod demo;
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
    /// The main job: build lb, bring up a two-node cluster on network namespaces
    /// (nodes, pods with real servers, an external client), run lb-agent on both
    /// nodes with example Services, and show requests and the maps. Keeps the
    /// cluster up for exploring until Ctrl-C (as root).
    Demo {
        /// Tear down and exit after showing the results.
        #[arg(long)]
        once: bool,
    },
    /// Benchmark lb against kube-proxy (iptables, nftables) in one run, as root;
    /// prints ratios, writes bench-results/ (JSON, README section).
    Bench {
        /// The reduced run (under two minutes).
        #[arg(long)]
        quick: bool,
        /// Extra arguments for lb-bench (e.g. `--only per-packet`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::Setup => setup::run(),
        Task::Demo { once } => demo::run(once),
        Task::Bench { quick, args } => bench::run(quick, args),
        Task::Test { args } => {
            setup::require_root("cargo xtask test")?;
            setup::run()?;
            // Every crate but the BPF one, which only builds for the BPF target
            // (the agent's and the testbed's build scripts build and embed it).
            let mut cargo_args: Vec<String> = ["test", "--workspace", "--exclude", "lb-ebpf"]
                .map(String::from)
                .to_vec();
            if !args.is_empty() {
                cargo_args.push("--".into());
                cargo_args.extend(args);
            }
            setup::cargo(cargo_args)
        }
    }
}
