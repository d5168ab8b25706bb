//! `cargo xtask <task>`: everything a developer runs.
//!
//! xtask itself builds with the stable toolchain alone: it depends on no crate
//! whose build needs the BPF toolchain (`lb-objects`, `aya-build`), so that on
//! a bare machine it can install that toolchain first and then build the rest
//! through cargo (`tests/closure.rs` holds it to that).

mod bench;
mod fuzz;
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
    /// nightly toolchain, bpf-linker built against LLVM 22, cargo-fuzz; mounts
    /// bpffs.
    Setup,
    /// The main job: set up, build lb, bring up a two-node cluster on network
    /// namespaces (nodes, pods with real servers, an external client), run
    /// lb-agent on both nodes with example Services, and show requests and the
    /// maps. Keeps the cluster up for exploring until Ctrl-C (as root).
    Demo {
        /// Tear down and exit after showing the results.
        #[arg(long)]
        once: bool,
        /// Run the agents in Kubernetes mode, as the DaemonSet runs them,
        /// against a real API server on loopback (etcd, kube-apiserver,
        /// kube-controller-manager) that the demo's Pods and Services go
        /// through, instead of a directory of manifests.
        #[arg(long)]
        kube: bool,
    },
    /// Set up, then run the whole test suite (as root: it loads BPF programs
    /// and builds network namespaces), and then each fuzz target for 10 s
    /// (see `fuzz`).
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter). With
        /// any, only `cargo test` runs (no fuzz runs).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Fuzz lb with libFuzzer (cargo-fuzz, nightly) for a while: `manifests`
    /// (the manifest reader on arbitrary files), `model` (Service and
    /// EndpointSlice events through the model and the reconciler into real
    /// maps, checked against the desired tables) and `packets` (arbitrary
    /// frames through the XDP and tc programs with BPF_PROG_TEST_RUN, the
    /// output parsed and its checksums checked). As root for model and
    /// packets. A failure leaves its input under fuzz/artifacts/<target>/;
    /// new inputs collect in fuzz/corpus/<target>/.
    Fuzz {
        /// The target to run; all three, one after the other, when left out.
        #[arg(value_enum)]
        target: Option<fuzz::Target>,
        /// How long to run each target, in seconds.
        #[arg(long, default_value_t = 300)]
        time: u64,
        /// Build with AddressSanitizer (a longer build; `cargo xtask test`'s
        /// runs go without it).
        #[arg(long)]
        asan: bool,
        /// Extra arguments for libFuzzer after `--` (e.g. `-- -jobs=2`).
        #[arg(last = true)]
        args: Vec<String>,
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
}

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::Setup => setup::run(),
        Task::Demo { once, kube } => demo(once, kube),
        Task::Bench { quick, args } => bench::run(quick, args),
        Task::Test { args } => test(args),
        Task::Fuzz {
            target,
            time,
            asan,
            args,
        } => {
            let targets = target.map_or(fuzz::Target::ALL.to_vec(), |t| vec![t]);
            let build = if asan {
                fuzz::Build::Asan
            } else {
                fuzz::Build::Plain
            };
            fuzz::task(&targets, time, build, &args)
        }
    }
}

/// Builds lb-agent and the testbed's `lb-demo` (release) and runs the demo.
fn demo(once: bool, kube: bool) -> Result<()> {
    let target = setup::release("demo", &["lb-agent", "lb-testbed"])?;
    let mut cmd = std::process::Command::new(target.join("lb-demo"));
    cmd.arg("--agent").arg(target.join("lb-agent"));
    if once {
        cmd.arg("--once");
    }
    if kube {
        cmd.arg("--kube");
    }
    setup::status(&mut cmd)
}

fn test(args: Vec<String>) -> Result<()> {
    setup::require_root("cargo xtask test")?;
    setup::run()?;
    // Every crate but the BPF one, which only builds for the BPF target
    // (lb-objects' build script builds and embeds it).
    let mut cargo_args: Vec<String> = ["test", "--workspace", "--exclude", "lb-ebpf"]
        .map(String::from)
        .to_vec();
    let filtered = !args.is_empty();
    if filtered {
        cargo_args.push("--".into());
        cargo_args.extend(args);
    }
    setup::cargo(cargo_args)?;
    if filtered {
        eprintln!("test: a filter was given: no fuzz runs");
        return Ok(());
    }
    fuzz::bounded()
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    use super::Cli;

    /// Each task's help describes that task (a doc comment in the wrong place
    /// once gave `demo` the text of `test`).
    #[test]
    fn each_task_has_its_own_help() {
        let cli = Cli::command();
        let about = |task: &str| -> String {
            cli.find_subcommand(task)
                .and_then(|c| c.get_about())
                .map(ToString::to_string)
                .unwrap_or_default()
        };
        for (task, says) in [
            ("setup", "Install what building and testing lb needs"),
            ("demo", "two-node cluster on network namespaces"),
            ("test", "run the whole test suite"),
            ("bench", "Benchmark lb against kube-proxy"),
            ("fuzz", "Fuzz lb with libFuzzer"),
        ] {
            assert!(about(task).contains(says), "{task}: {:?}", about(task));
        }
        let texts: std::collections::BTreeSet<String> =
            ["setup", "demo", "test", "bench", "fuzz"].map(about).into();
        assert_eq!(texts.len(), 5, "two tasks share a help text: {texts:?}");
    }
}
