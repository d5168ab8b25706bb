//! `cargo xtask bench`: builds lb (release) and runs the benchmark harness
//! (the `lb-bench` crate): lb against kube-proxy's iptables and nftables
//! modes, side by side in one run. Prints the table; writes
//! `bench-results/<time>-<profile>.json`, `bench-results/latest.json` and
//! `bench-results/README-section.md`. A full run (no `--quick`, no `--only`)
//! also replaces the README's results section with it.

use std::process::Command;

use anyhow::{Context as _, Result, bail};

use crate::setup;

pub fn run(quick: bool, args: Vec<String>) -> Result<()> {
    let target = setup::release("bench", &["lb-agent", "lb-bench"])?;
    let root = setup::workspace();
    let mut cmd = Command::new(target.join("lb-bench"));
    if quick {
        cmd.arg("--quick");
    }
    let complete = !quick && args.is_empty();
    cmd.arg("--agent")
        .arg(target.join("lb-agent"))
        .arg("--out")
        .arg(root.join("bench-results"))
        .args(args);
    setup::status(&mut cmd)?;
    if complete {
        let section = std::fs::read_to_string(root.join("bench-results/README-section.md"))
            .context("reading bench-results/README-section.md")?;
        let readme = root.join("README.md");
        let text = std::fs::read_to_string(&readme).context("reading README.md")?;
        std::fs::write(&readme, splice(&text, &section)?).context("writing README.md")?;
        eprintln!("bench: README.md results section updated");
    }
    Ok(())
}

const START: &str = "<!-- bench-results:start -->";
const END: &str = "<!-- bench-results:end -->";

/// Replaces what lies between the README's results markers with `section`.
fn splice(readme: &str, section: &str) -> Result<String> {
    let (Some(a), Some(b)) = (readme.find(START), readme.find(END)) else {
        bail!("README.md has no `{START}` ... `{END}` markers for the results section");
    };
    if b < a {
        bail!("README.md's results markers are out of order");
    }
    Ok(format!(
        "{}{START}\n{}\n{}",
        &readme[..a],
        section.trim_end(),
        &readme[b..]
    ))
}

#[cfg(test)]
mod tests {
    use super::splice;

    #[test]
    fn splice_replaces_only_the_marked_section() {
        let readme = "intro\n<!-- bench-results:start -->\nold\n<!-- bench-results:end -->\nrest\n";
        let out = splice(readme, "## new\n\n| a |\n").unwrap();
        assert_eq!(
            out,
            "intro\n<!-- bench-results:start -->\n## new\n\n| a |\n<!-- bench-results:end -->\nrest\n"
        );
        assert!(splice("no markers", "x").is_err());
    }
}
