//! `lb-bench`: runs lb's benchmark (see the library docs); `cargo xtask bench`
//! builds lb and runs this.

use std::path::PathBuf;

use anyhow::Result;
use clap::Parser;
use lb_bench::{Options, PARTS, Profile};

#[derive(Parser)]
#[command(
    about = "lb vs kube-proxy (iptables, nftables): per-packet cost, forwarding and \
                   connection rates, control plane, Maglev"
)]
struct Cli {
    /// The reduced run (under two minutes).
    #[arg(long)]
    quick: bool,
    /// Directory for the JSON results and the README section [default: <workspace>/bench-results].
    #[arg(long)]
    out: Option<PathBuf>,
    /// The lb-agent binary [default: $LB_AGENT, target/release/lb-agent].
    #[arg(long)]
    agent: Option<PathBuf>,
    /// Run only these parts (repeatable): per-packet, maglev, control, forwarding, connrate.
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(PARTS))]
    only: Vec<String>,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let opts = Options {
        profile: if cli.quick {
            Profile::Quick
        } else {
            Profile::Full
        },
        out_dir: cli
            .out
            .unwrap_or_else(|| lb_bench::workspace().join("bench-results")),
        agent: cli.agent.unwrap_or_else(lb_bench::default_agent),
        only: cli.only,
    };
    let report = lb_bench::run(&opts)?;
    print!("{}", report.table());
    Ok(())
}
