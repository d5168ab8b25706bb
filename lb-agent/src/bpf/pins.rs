//! The pin directory: maps at `<dir>/<map>` (so `bpftool map dump pinned
//! <dir>/services` works) and the attachment links at `<dir>/links/<hook>-<ifindex>`.
//! Pins are what lets the datapath outlive the agent: restarts adopt them.

use std::{
    ffi::CString,
    os::unix::ffi::OsStrExt as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};
use lb_common::map_names;

/// The per-packet scratch map: holds nothing between packets, so a pinned one of
/// another layout is simply replaced.
pub const SCRATCH: &str = "scratch";

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Every map the agent pins, state first.
pub fn all_map_names() -> impl Iterator<Item = &'static str> {
    map_names::ALL.into_iter().chain(std::iter::once(SCRATCH))
}

fn is_bpffs(path: &Path) -> Result<bool> {
    let c = CString::new(path.as_os_str().as_bytes())?;
    // SAFETY: statfs into a zeroed struct with a valid path.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("statfs {}", path.display()));
    }
    Ok(st.f_type as i64 == BPF_FS_MAGIC)
}

/// Makes `dir` a directory on bpffs: mounts bpffs on /sys/fs/bpf (or, for a pin
/// path elsewhere, on the path itself) when it is not there yet.
pub fn prepare_dir(dir: &Path) -> Result<()> {
    let mut existing = dir.to_path_buf();
    while !existing.exists() {
        if !existing.pop() {
            bail!("{} has no existing ancestor", dir.display());
        }
    }
    if !is_bpffs(&existing)? {
        // A DaemonSet's agent has no CAP_SYS_ADMIN and cannot mount: it
        // must find the host's bpffs where its volume puts it.
        mount_bpffs(dir).with_context(|| {
            format!(
                "{} is not on bpffs and mounting one failed: the pins must be on the host's \
                 bpffs to outlive the agent; mount it on the host's /sys/fs/bpf (systemd does at \
                 boot; deploy/README.md says how elsewhere)",
                dir.display()
            )
        })?;
    }
    std::fs::create_dir_all(dir.join("links"))
        .with_context(|| format!("creating {}/links", dir.display()))
}

/// Mounts bpffs for `dir`: on /sys/fs/bpf for a pin path below it, else on
/// `dir` itself. Only `mode=0700`: the pins are the agent's alone.
fn mount_bpffs(dir: &Path) -> Result<()> {
    let target = if dir.starts_with("/sys/fs/bpf") {
        PathBuf::from("/sys/fs/bpf")
    } else {
        dir.to_path_buf()
    };
    std::fs::create_dir_all(&target).with_context(|| format!("creating {}", target.display()))?;
    log::info!("mounting bpffs on {}", target.display());
    let t = CString::new(target.as_os_str().as_bytes())?;
    // SAFETY: mount(2) with valid C strings.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            t.as_ptr(),
            c"bpf".as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            c"mode=0700".as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| {
            format!(
                "mounting bpffs on {} (needs CAP_SYS_ADMIN)",
                target.display()
            )
        });
    }
    Ok(())
}

/// Removes every pin the agent made in `dir` (detaching the programs) and the
/// directory itself. Missing pins are fine.
pub fn remove_all(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    let links = dir.join("links");
    if let Ok(entries) = std::fs::read_dir(&links) {
        for e in entries.flatten() {
            std::fs::remove_file(e.path())
                .with_context(|| format!("removing {}", e.path().display()))?;
            removed.push(e.path());
        }
        let _ = std::fs::remove_dir(&links);
    }
    for name in all_map_names() {
        // (`<name>-new`: a migration's pin not yet renamed, see `super::migrate`.)
        for p in [dir.join(name), dir.join(format!("{name}-new"))] {
            if p.exists() {
                std::fs::remove_file(&p).with_context(|| format!("removing {}", p.display()))?;
                removed.push(p);
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
    Ok(removed)
}
