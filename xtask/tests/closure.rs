//! `cargo xtask` must build on a bare machine, where the BPF toolchain
//! (rust-src for nightly, bpf-linker) is not there yet: xtask installs it. So
//! no crate whose build needs that toolchain may enter xtask's dependency
//! closure.

use std::{collections::BTreeSet, process::Command};

/// Crates whose build scripts build BPF objects.
const NEEDS_BPF_TOOLCHAIN: &[&str] = &["lb-objects", "aya-build"];

/// The packages in `package`'s normal and build dependency closure.
fn closure(package: &str) -> BTreeSet<String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args(["tree", "--locked", "--package", package])
        .args([
            "--edges",
            "normal,build",
            "--prefix",
            "none",
            "--format",
            "{p}",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("running cargo tree");
    assert!(
        out.status.success(),
        "cargo tree failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

#[test]
fn xtask_builds_without_the_bpf_toolchain() {
    let xtask = closure("xtask");
    assert!(xtask.contains("clap"), "cargo tree listed: {xtask:?}");
    let offending: Vec<&&str> = NEEDS_BPF_TOOLCHAIN
        .iter()
        .filter(|c| xtask.contains(**c))
        .collect();
    assert!(
        offending.is_empty(),
        "xtask depends on {offending:?}, whose build needs the BPF toolchain that xtask installs"
    );
    // The same look finds them where they are.
    let agent = closure("lb-agent");
    for c in NEEDS_BPF_TOOLCHAIN {
        assert!(
            agent.contains(*c),
            "lb-agent's closure lacks {c}: {agent:?}"
        );
    }
}
