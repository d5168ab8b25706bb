//! `cargo xtask fuzz`, and the bounded fuzz runs of `cargo xtask test`: the
//! cargo-fuzz targets of `fuzz/` (a crate of its own, outside the workspace,
//! built with nightly and libFuzzer's coverage instrumentation into
//! `fuzz/target`).

use std::{path::PathBuf, process::Command};

use anyhow::{Result, bail};
use clap::ValueEnum;

use crate::setup;

/// The fuzz targets (`fuzz/fuzz_targets/<name>.rs`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Target {
    /// The manifest reader: arbitrary files in a manifest directory.
    Manifests,
    /// Source events through the model and the reconciler into real maps.
    Model,
    /// Arbitrary frames through the loaded XDP and tc programs.
    Packets,
}

impl Target {
    pub const ALL: [Self; 3] = [Self::Manifests, Self::Model, Self::Packets];

    pub fn name(self) -> &'static str {
        match self {
            Self::Manifests => "manifests",
            Self::Model => "model",
            Self::Packets => "packets",
        }
    }
}

/// How long `cargo xtask test` runs each target.
pub const BOUNDED_SECONDS: u64 = 10;

/// How the targets are built.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Build {
    /// libFuzzer's coverage only, unoptimized (`--dev --sanitizer none`): the
    /// cheap build the bounded runs use (a few minutes and about 1 GB clean).
    Plain,
    /// With AddressSanitizer, for long runs that should also catch memory
    /// errors in the little unsafe code there is (and in C dependencies).
    Asan,
}

fn fuzz_dir() -> PathBuf {
    setup::workspace().join("fuzz")
}

/// `cargo +nightly fuzz <subcommand>` in the workspace, with the build's
/// options. The outer cargo's toolchain choice is not passed on.
fn cargo_fuzz(subcommand: &str, build: Build) -> Command {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(setup::workspace())
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO")
        .env_remove("RUSTC")
        .args(["+nightly", "fuzz", subcommand, "--dev"]);
    match build {
        Build::Plain => cmd.args(["--sanitizer", "none"]),
        Build::Asan => cmd.args(["--sanitizer", "address"]),
    };
    cmd
}

/// Builds every target (one build of the one fuzz crate).
pub fn build(build: Build) -> Result<()> {
    eprintln!("fuzz: building the fuzz targets ({build:?})");
    setup::status(&mut cargo_fuzz("build", build))
}

/// The libFuzzer arguments of a run of `seconds`.
fn libfuzzer_args(target: Target, seconds: u64) -> Vec<String> {
    let mut args = vec![
        format!("-max_total_time={seconds}"),
        // An input that takes this long is a hang: reported as a failure.
        "-timeout=30".to_string(),
        "-print_final_stats=1".to_string(),
        // Inputs of any length from the start: the model's and the packets'
        // are structured (a few ops or frames take a few hundred bytes), and
        // libFuzzer's slow growth from 4 bytes spends a short run on inputs
        // too small to hold one.
        "-len_control=0".to_string(),
        "-max_len=4096".to_string(),
    ];
    let dict = fuzz_dir()
        .join("dicts")
        .join(format!("{}.dict", target.name()));
    if dict.exists() {
        args.push(format!("-dict={}", dict.display()));
    }
    args
}

/// Runs `target` for `seconds`; a crash, a failed check or a hang fails it
/// (libFuzzer saves the input under `fuzz/artifacts/<target>/`). New inputs
/// go to `fuzz/corpus/<target>/`, which later runs start from, with the
/// seeds of `fuzz/seeds/<target>/`.
pub fn run(target: Target, seconds: u64, build: Build, extra: &[String]) -> Result<()> {
    let name = target.name();
    let corpus = fuzz_dir().join("corpus").join(name);
    std::fs::create_dir_all(&corpus)?;
    let mut cmd = cargo_fuzz("run", build);
    cmd.arg(name).arg(&corpus);
    let seeds = fuzz_dir().join("seeds").join(name);
    if seeds.is_dir() {
        cmd.arg(&seeds);
    }
    cmd.arg("--")
        .args(libfuzzer_args(target, seconds))
        .args(extra);
    eprintln!("fuzz: running {name} for {seconds} s");
    let status = cmd.status()?;
    if !status.success() {
        bail!(
            "fuzz target {name} failed ({status}): the input is under fuzz/artifacts/{name}/; \
             replay it with `cargo +nightly fuzz run --dev --sanitizer none {name} <file>`"
        );
    }
    Ok(())
}

/// `cargo xtask fuzz`: set up, build, and run each of `targets` in turn.
pub fn task(targets: &[Target], seconds: u64, build_kind: Build, extra: &[String]) -> Result<()> {
    if targets.iter().any(|t| *t != Target::Manifests) {
        setup::require_root("cargo xtask fuzz model|packets")?;
    }
    setup::run()?;
    build(build_kind)?;
    for t in targets {
        run(*t, seconds, build_kind, extra)?;
    }
    Ok(())
}

/// The part `cargo xtask test` runs: every target for [`BOUNDED_SECONDS`]
/// with the cheap build.
pub fn bounded() -> Result<()> {
    build(Build::Plain)?;
    for t in Target::ALL {
        run(t, BOUNDED_SECONDS, Build::Plain, &[])?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every target the task knows is a `[[bin]]` of `fuzz/Cargo.toml` with
    /// its source, and the other way round.
    #[test]
    fn the_targets_are_the_fuzz_crates() {
        let manifest = std::fs::read_to_string(fuzz_dir().join("Cargo.toml")).unwrap();
        let bins: Vec<&str> = manifest
            .lines()
            .filter_map(|l| l.strip_prefix("name = \""))
            .filter_map(|l| l.strip_suffix('"'))
            .filter(|n| *n != "lb-fuzz")
            .collect();
        let names: Vec<&str> = Target::ALL.iter().map(|t| t.name()).collect();
        assert_eq!(bins, names);
        for n in names {
            let src = fuzz_dir().join("fuzz_targets").join(format!("{n}.rs"));
            assert!(src.exists(), "{}", src.display());
        }
    }

    /// The bounded runs are bounded, and use the dictionary where there is one.
    #[test]
    fn runs_are_bounded() {
        let args = libfuzzer_args(Target::Manifests, BOUNDED_SECONDS);
        assert!(args.contains(&"-max_total_time=10".to_string()), "{args:?}");
        assert!(args.iter().any(|a| a.starts_with("-dict=")), "{args:?}");
        assert!(
            !libfuzzer_args(Target::Packets, 5)
                .iter()
                .any(|a| a.starts_with("-dict="))
        );
    }
}
