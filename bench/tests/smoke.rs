//! Runs the quick benchmark in-process and checks that its JSON has every
//! figure (not their values: the machine is shared and noisy). Needs root, as
//! the benchmark does.

use std::{collections::BTreeSet, path::PathBuf, process::Command};

use lb_bench::{Options, Profile};

/// The release agent the forwarding and control-plane parts run, built (or
/// brought up to date: a stale binary would benchmark old code) first.
fn agent() -> PathBuf {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let ok = Command::new(cargo)
        .args(["build", "--release", "--package", "lb-agent"])
        .current_dir(lb_bench::workspace())
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "building lb-agent failed");
    lb_bench::default_agent()
}

#[test]
fn quick_bench_reports_every_figure() {
    // SAFETY: geteuid has no preconditions.
    assert!(
        unsafe { libc::geteuid() } == 0,
        "the benchmark needs root: run the tests with `cargo xtask test`"
    );
    let out = std::env::temp_dir().join(format!("lbb-smoke-{}", std::process::id()));
    let report = lb_bench::run(&Options {
        profile: Profile::Quick,
        out_dir: out.clone(),
        agent: agent(),
        only: Vec::new(),
    })
    .expect("the benchmark runs");
    let text = std::fs::read_to_string(out.join("latest.json")).expect("latest.json");
    let json: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
    for field in ["machine", "git_commit", "figures", "profile"] {
        assert!(json.get(field).is_some(), "no {field} in the JSON");
    }
    for field in ["cpu_model", "cores", "kernel"] {
        assert!(json["machine"].get(field).is_some(), "no machine.{field}");
    }
    let keys: BTreeSet<&str> = json["figures"]
        .as_array()
        .expect("figures")
        .iter()
        .map(|f| {
            for k in ["min", "median", "max", "unit"] {
                assert!(f.get(k).is_some(), "figure {f} has no {k}");
            }
            f["key"].as_str().expect("key")
        })
        .collect();
    let missing: Vec<String> = lb_bench::expected_keys(Profile::Quick)
        .into_iter()
        .filter(|k| !keys.contains(k.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "figures missing: {missing:?}; parts that failed: {:?}",
        report.errors
    );
    assert!(out.join("README-section.md").exists());
    let _ = std::fs::remove_dir_all(&out);
}
