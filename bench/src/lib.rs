//! lb's benchmark harness (`cargo xtask bench`): lb against kube-proxy's
//! iptables and nftables modes on the same machine, in one run, interleaved.
//!
//! - [`perpacket`]: per-packet cost of `lb_xdp` under BPF_PROG_TEST_RUN;
//! - [`ct_maps`]: conntrack's map shape (LRU flavour, key size) against the
//!   alternatives, under BPF_PROG_TEST_RUN;
//! - [`maglev_bench`]: Maglev table builds and disruption;
//! - [`control`]: full sync and single-change latency, agent memory, and
//!   kube-proxy's rule loads for the same Services;
//! - [`forwarding`]: packets per second through a balancer namespace;
//! - [`connrate`]: short TCP connections per second through a NodePort.
//!
//! Needs root. Everything runs in network namespaces of testbed scopes
//! (`lb_testbed::Scope`: `lbt-<run>-<pid>-*`), removed when each part ends, on
//! failure and on Ctrl-C; what a crashed run left is removed at the start.

pub mod agent;
pub mod connrate;
pub mod control;
pub mod cpu;
pub mod ct_maps;
pub mod forwarding;
pub mod kubeproxy;
pub mod maglev_bench;
pub mod perpacket;
pub mod report;

use std::{
    path::{Path, PathBuf},
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result, bail};

pub use report::{Figure, Report, Target};

/// The benchmark programs (lb-ebpf/src/bench.rs; see the `lb-objects` crate).
pub static BENCH_OBJECT: &[u8] = lb_objects::BENCH;

/// The bench object with the XDP programs `names` loaded.
pub fn load_bench(names: &[&str]) -> Result<aya::Ebpf> {
    let mut bench = aya::Ebpf::load(BENCH_OBJECT).context("loading the bench object")?;
    for &name in names {
        let p: &mut aya::programs::Xdp = bench
            .program_mut(name)
            .with_context(|| format!("no program {name}"))?
            .try_into()?;
        p.load().with_context(|| format!("loading {name}"))?;
    }
    Ok(bench)
}

/// The loaded XDP program `name` of `bench`.
pub fn bench_prog<'a>(bench: &'a aya::Ebpf, name: &str) -> Result<&'a aya::programs::Xdp> {
    Ok(bench
        .program(name)
        .with_context(|| format!("no program {name}"))?
        .try_into()?)
}

/// How much to measure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Profile {
    /// Everything, reduced: under two minutes.
    Quick,
    /// Everything (bounded: about ten minutes).
    Full,
}

impl Profile {
    pub fn name(self) -> &'static str {
        match self {
            Self::Quick => "quick",
            Self::Full => "full",
        }
    }
}

/// The parts of a run, in the order they run.
pub const PARTS: [&str; 6] = [
    "per-packet",
    "ct-maps",
    "maglev",
    "control",
    "forwarding",
    "connrate",
];

#[derive(Clone, Debug)]
pub struct Options {
    pub profile: Profile,
    /// Where the JSON and the README section go (`bench-results/`).
    pub out_dir: PathBuf,
    /// The lb-agent binary (the control-plane, forwarding and connection-rate
    /// parts run it).
    pub agent: PathBuf,
    /// Parts to run (empty: all).
    pub only: Vec<String>,
}

/// The workspace root (for the default paths and the git commit).
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// The lb-agent binary: `$LB_AGENT`, else target/release, else target/debug.
pub fn default_agent() -> PathBuf {
    if let Some(p) = std::env::var_os("LB_AGENT") {
        return PathBuf::from(p);
    }
    let release = workspace().join("target/release/lb-agent");
    if release.exists() {
        return release;
    }
    workspace().join("target/debug/lb-agent")
}

/// Every figure key a complete run reports (the smoke test checks them).
pub fn expected_keys(profile: Profile) -> Vec<String> {
    let quick = profile == Profile::Quick;
    let mut k: Vec<String> = [
        "floor.ns",
        "wrapper.ns",
        "wrapper_vary.ns",
        "lru_insert.ns",
        "new_flow.lru_ratio",
    ]
    .iter()
    .map(|s| format!("per_packet.{s}"))
    .collect();
    for c in [
        "non_service",
        "new_flow",
        "established",
        "reply",
        "nodeport_snat",
        "udp",
        "ipv6",
    ] {
        k.push(format!("per_packet.{c}.ns"));
        k.push(format!("per_packet.{c}.ratio"));
    }
    k.extend(perpacket::feature_figure_keys());
    k.extend(ct_maps::keys());
    k.extend(maglev_bench::keys());
    k.extend(control::keys_for(quick));
    k.extend(forwarding::keys());
    k.extend(connrate::keys());
    k
}

/// Runs the benchmark and writes its outputs; the report is returned even
/// when parts failed (they are listed in it).
pub fn run(opts: &Options) -> Result<Report> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the benchmark needs root (BPF programs, network namespaces)");
    }
    for r in lb_testbed::cleanup_stale() {
        eprintln!("lb-bench: removed leftover {r}");
    }
    let started = Instant::now();
    let mut report = Report {
        machine: report::Machine::detect(&workspace()),
        profile: opts.profile.name().into(),
        started_unix: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        ..Report::default()
    };
    let quick = opts.profile == Profile::Quick;
    let wanted = |p: &str| opts.only.is_empty() || opts.only.iter().any(|o| o == p);
    let mut part = |name: &str, f: &mut dyn FnMut() -> Result<(Vec<Figure>, Vec<String>)>| {
        if !wanted(name) {
            return;
        }
        eprintln!("lb-bench: {name} ...");
        let t = Instant::now();
        match f() {
            Ok((figs, notes)) => {
                report.figures.extend(figs);
                report.notes.extend(notes);
            }
            Err(e) => {
                eprintln!("lb-bench: {name} failed: {e:#}");
                report.errors.push((name.to_string(), format!("{e:#}")));
            }
        }
        eprintln!("lb-bench: {name} took {:.1} s", t.elapsed().as_secs_f64());
    };
    part("per-packet", &mut || {
        perpacket::run(perpacket::Settings {
            // 14 cases a round open a flow per iteration (about 2 µs
            // each): quick keeps the part to about half a minute.
            iterations: if quick { 250_000 } else { 1_000_000 },
            rounds: if quick { 3 } else { 7 },
            slices: if quick { 2 } else { 4 },
            flow_check: 20_000,
        })
    });
    // Pins its own threads: one run per CPU at once, or one on the bench CPU.
    part("ct-maps", &mut || ct_maps::run(quick));
    part("maglev", &mut || maglev_bench::run(quick));
    part("control", &mut || control::run(quick, &opts.agent));
    part("forwarding", &mut || forwarding::run(quick, &opts.agent));
    part("connrate", &mut || connrate::run(quick, &opts.agent));
    report.duration = started.elapsed();
    let path = report.write(&opts.out_dir).context("writing the results")?;
    eprintln!("lb-bench: results in {}", path.display());
    Ok(report)
}
