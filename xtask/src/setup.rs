//! Installs what lb needs on a fresh machine, skipping what is already there,
//! and saying what it installs.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};

/// Debian packages: LLVM 22 for bpf-linker, bpftool, the tools the test
/// topologies and clients use, and what the Kubernetes control plane of the
/// tests needs (`shared/tools/kube-control-plane`: etcd, openssl, xz).
const PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    "bpftool",
    "iproute2",
    "ethtool",
    "socat",
    "curl",
    "iptables",
    "nftables",
    "tcpdump",
    "etcd-server",
    "openssl",
    "xz-utils",
];

const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

pub fn require_root(what: &str) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "{what} needs root (BPF programs, network namespaces): run it as root, e.g. `sudo -E {what}`"
        );
    }
    Ok(())
}

pub fn run() -> Result<()> {
    disk_space();
    apt_packages()?;
    rust_src()?;
    bpf_linker()?;
    cargo_fuzz()?;
    bpffs()?;
    Ok(())
}

fn installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

fn apt_packages() -> Result<()> {
    let missing: Vec<&str> = PACKAGES.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("setup: installing Debian packages: {}", missing.join(" "));
    status(Command::new("apt-get").args(["update", "-q"]))?;
    status(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-q"])
            .args(&missing),
    )
}

fn rust_src() -> Result<()> {
    let out = Command::new("rustup")
        .args(["component", "list", "--toolchain", "nightly", "--installed"])
        .output()
        .context("running rustup (the nightly toolchain builds the datapath)")?;
    if String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l.starts_with("rust-src"))
    {
        return Ok(());
    }
    eprintln!("setup: installing rust-src for the nightly toolchain");
    status(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
}

fn bpf_linker() -> Result<()> {
    let works = Command::new("bpf-linker")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if works {
        return Ok(());
    }
    eprintln!("setup: building bpf-linker against LLVM 22 (takes a few minutes)");
    let path = format!(
        "{LLVM_PREFIX}/bin:{}",
        std::env::var("PATH").unwrap_or_default()
    );
    status(
        Command::new("cargo")
            .env("LLVM_PREFIX", LLVM_PREFIX)
            .env("PATH", path)
            .args([
                "install",
                "bpf-linker@0.13.0",
                "--locked",
                "--no-default-features",
                "--features",
                "llvm-22",
            ]),
    )
}

/// cargo-fuzz, for the fuzz targets (`cargo xtask fuzz`, and the bounded
/// runs of `cargo xtask test`); 0.13.1 builds with rustc 1.95 and drives
/// nightly 1.97's libFuzzer flags.
const CARGO_FUZZ: &str = "cargo-fuzz@0.13.1";

fn cargo_fuzz() -> Result<()> {
    let works = Command::new("cargo")
        .args(["fuzz", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if works {
        return Ok(());
    }
    eprintln!("setup: installing {CARGO_FUZZ} (about a minute)");
    status(Command::new("cargo").args(["install", CARGO_FUZZ, "--locked"]))
}

/// What a clean `cargo xtask test` writes under `target/` (debug and release
/// builds, the BPF objects, the test binaries), with some room to spare.
const DISK_NEEDED: u64 = 6 << 30;

/// Warns when the target directory's disk is short of [`DISK_NEEDED`]: a full
/// disk otherwise shows up ten minutes later as an LLVM I/O error. Only a
/// warning, since a partly built target needs less.
fn disk_space() {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| workspace().join("target"), PathBuf::from);
    let existing = target
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(workspace());
    let Some(free) = free_bytes(existing) else {
        return;
    };
    if free < DISK_NEEDED {
        eprintln!(
            "setup: warning: {:.1} GiB free under {}; a clean build and test run writes about {} GiB \
             there (set CARGO_TARGET_DIR to a larger disk if it runs out)",
            free as f64 / f64::from(1 << 30),
            existing.display(),
            DISK_NEEDED >> 30,
        );
    }
}

/// The bytes an unprivileged writer may still use on `path`'s filesystem.
fn free_bytes(path: &Path) -> Option<u64> {
    let path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: statvfs only writes the struct it is given; zeroed is a valid one.
    let mut fs: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is NUL-terminated and `fs` lives across the call.
    if unsafe { libc::statvfs(path.as_ptr(), &raw mut fs) } != 0 {
        return None;
    }
    Some(fs.f_bavail.saturating_mul(fs.f_frsize))
}

/// Mounts bpffs on /sys/fs/bpf if it is not mounted (the agent pins there).
fn bpffs() -> Result<()> {
    let mounts = std::fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    if mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf"))
    {
        return Ok(());
    }
    if !Path::new("/sys/fs/bpf").exists() {
        std::fs::create_dir_all("/sys/fs/bpf").context("creating /sys/fs/bpf")?;
    }
    eprintln!("setup: mounting bpffs on /sys/fs/bpf");
    status(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))
}

pub fn status(cmd: &mut Command) -> Result<()> {
    let s = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !s.success() {
        bail!("{cmd:?} failed: {s}");
    }
    Ok(())
}

/// What a task that runs lb's binaries does first (as root): the set-up, then
/// a release build of `packages`. Returns the directory of the binaries.
pub fn release(task: &str, packages: &[&str]) -> Result<PathBuf> {
    require_root(&format!("cargo xtask {task}"))?;
    run()?;
    eprintln!("{task}: building {} (release)", packages.join(", "));
    let mut args = vec!["build".to_string(), "--release".to_string()];
    for p in packages {
        args.extend(["--package".to_string(), p.to_string()]);
    }
    cargo(args)?;
    Ok(workspace().join("target/release"))
}

/// The workspace's top directory.
pub fn workspace() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lies in the workspace")
}

pub fn cargo<I: IntoIterator<Item = String>>(args: I) -> Result<()> {
    status(Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())).args(args))
}

#[cfg(test)]
mod tests {
    use std::{path::Path, process::Command};

    /// The free space the set-up warns about is what `df` reports.
    #[test]
    fn free_bytes_agrees_with_df() {
        let ours = super::free_bytes(Path::new("/")).expect("statvfs /");
        let out = Command::new("df")
            .args(["--output=avail", "-B1", "/"])
            .output()
            .expect("df");
        let df: u64 = String::from_utf8_lossy(&out.stdout)
            .lines()
            .nth(1)
            .and_then(|l| l.trim().parse().ok())
            .expect("df's avail column");
        // Other writers may move it a little between the two reads.
        assert!(ours.abs_diff(df) < 256 << 20, "statvfs {ours} vs df {df}");
    }
}
