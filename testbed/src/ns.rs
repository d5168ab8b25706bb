//! Running code and commands inside a network namespace, and running
//! commands with a time limit.

use std::{
    ffi::OsStr,
    fs::File,
    io::{self, Read as _},
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
    sync::{Mutex, MutexGuard, mpsc},
    thread,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};

/// Where `ip netns add` keeps its named namespaces.
pub const NETNS_DIR: &str = "/run/netns";

/// The file of a namespace: a name under `/run/netns`, or an absolute path
/// (e.g. `/proc/<pid>/ns/net`) as it is.
pub fn netns_path(ns: &str) -> PathBuf {
    if ns.starts_with('/') {
        PathBuf::from(ns)
    } else {
        Path::new(NETNS_DIR).join(ns)
    }
}

pub(crate) fn enter_netns(file: &File) -> io::Result<()> {
    // SAFETY: setns on a valid, open namespace file descriptor; it changes
    // only the calling thread's network namespace.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Runs `f` on a new thread that has entered the network namespace `ns`
/// (a name under `/run/netns` or a path), and returns what it returns.
/// Sockets created by `f` belong to that namespace for their whole life,
/// whichever thread uses them later.
pub fn try_in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> Result<T> {
    let path = netns_path(ns);
    let file = File::open(&path)
        .with_context(|| format!("opening network namespace {}", path.display()))?;
    thread::scope(|s| {
        match thread::Builder::new()
            .name(format!("netns {ns}"))
            .spawn_scoped(s, move || -> Result<T> {
                enter_netns(&file)
                    .with_context(|| format!("entering network namespace {}", path.display()))?;
                Ok(f())
            })
            .context("spawning a thread")?
            .join()
        {
            Ok(r) => r,
            // Re-raise the closure's panic on the caller's thread.
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// Runs `f` on a new thread inside the network namespace `ns` and returns
/// its result. Panics if the namespace cannot be entered (use
/// [`try_in_netns`] to get an error instead).
pub fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    match try_in_netns(ns, f) {
        Ok(v) => v,
        Err(e) => panic!("in_netns({ns}): {e:#}"),
    }
}

/// A command whose child process enters the network namespace `ns` before
/// it executes `program` (with `setns` in `pre_exec`). Unlike
/// `ip netns exec`, this does not remount `/sys`, so the child sees the
/// host's `/sys/fs/bpf` (where the lb agents pin their maps).
///
/// If the namespace does not exist, spawning the command fails.
pub fn command_in<I, S>(ns: &str, program: impl AsRef<OsStr>, args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = Command::new(program);
    cmd.args(args);
    // Opened here, in the parent, close-on-exec: the child only calls setns,
    // which is async-signal-safe.
    let file = File::open(netns_path(ns)).map_err(|e| e.raw_os_error().unwrap_or(libc::ENOENT));
    // SAFETY: the closure runs between fork and exec and only calls setns
    // (async-signal-safe) on a descriptor opened before the fork; it does
    // not allocate.
    unsafe {
        cmd.pre_exec(move || match &file {
            Ok(f) => enter_netns(f),
            Err(errno) => Err(io::Error::from_raw_os_error(*errno)),
        });
    }
    cmd
}

/// Makes `cmd`'s child enter a mount namespace of its own (after the
/// network namespace of [`command_in`], if any) in which each `(source,
/// target)` of `mounts` is bind-mounted: what a container runtime does for
/// a pod's volumes. With `read_only_but`, every mount it then sees is made
/// read-only but those at (or holding) the paths given: a container with a
/// read-only root filesystem and these writable volumes, stricter (its
/// /dev, /proc and the like are read-only too). Nothing of it shows outside
/// the child.
pub fn private_mounts(
    cmd: &mut Command,
    mounts: &[(PathBuf, PathBuf)],
    read_only_but: Option<&[PathBuf]>,
) -> Result<()> {
    use std::{ffi::CString, os::unix::ffi::OsStrExt as _};
    let c = |p: &Path| CString::new(p.as_os_str().as_bytes()).context("a path with a NUL byte");
    let pairs: Vec<(CString, CString)> = mounts
        .iter()
        .map(|(s, t)| Ok((c(s)?, c(t)?)))
        .collect::<Result<_>>()?;
    let writable: Option<Vec<CString>> = read_only_but
        .map(|w| w.iter().map(|p| c(p)).collect::<Result<_>>())
        .transpose()?;
    // struct mount_attr (include/uapi/linux/mount.h).
    #[repr(C)]
    struct MountAttr {
        attr_set: u64,
        attr_clr: u64,
        propagation: u64,
        userns_fd: u64,
    }
    const MOUNT_ATTR_RDONLY: u64 = 1;
    // SAFETY: mount_setattr(2) on a valid C string with a valid attribute
    // struct of the size given.
    let setattr = |path: *const libc::c_char, flags: libc::c_int, attr: &MountAttr| unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            libc::AT_FDCWD,
            path,
            flags,
            std::ptr::from_ref(attr),
            size_of::<MountAttr>(),
        )
    };
    // SAFETY: between fork and exec the closure only calls unshare, mount
    // and mount_setattr (async-signal-safe) with C strings made before the
    // fork; it does not allocate.
    unsafe {
        cmd.pre_exec(move || {
            if libc::unshare(libc::CLONE_NEWNS) != 0 {
                return Err(io::Error::last_os_error());
            }
            // Mounts made here must not propagate to the host's namespace.
            let root = c"/";
            if libc::mount(
                std::ptr::null(),
                root.as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ) != 0
            {
                return Err(io::Error::last_os_error());
            }
            // Recursive, as a kubelet's hostPath volumes are (the host's
            // /sys/fs/cgroup carries the hierarchies mounted below it).
            for (source, target) in &pairs {
                if libc::mount(
                    source.as_ptr(),
                    target.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND | libc::MS_REC,
                    std::ptr::null(),
                ) != 0
                {
                    return Err(io::Error::last_os_error());
                }
            }
            if let Some(writable) = &writable {
                let ro = MountAttr {
                    attr_set: MOUNT_ATTR_RDONLY,
                    attr_clr: 0,
                    propagation: 0,
                    userns_fd: 0,
                };
                if setattr(root.as_ptr(), libc::AT_RECURSIVE, &ro) != 0 {
                    return Err(io::Error::last_os_error());
                }
                let rw = MountAttr {
                    attr_set: 0,
                    attr_clr: MOUNT_ATTR_RDONLY,
                    propagation: 0,
                    userns_fd: 0,
                };
                for path in writable {
                    if setattr(path.as_ptr(), 0, &rw) != 0 {
                        return Err(io::Error::last_os_error());
                    }
                }
            }
            Ok(())
        });
    }
    Ok(())
}

/// What a finished command printed.
#[derive(Debug)]
pub struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `cmd` with stdin closed, collecting its output; kills it (by its
/// pid) if it has not finished after `timeout`.
pub fn output_with_timeout(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    output_with_input(cmd, None, timeout)
}

/// Like [`output_with_timeout`], writing `input` to the command's stdin.
pub fn output_with_input(
    cmd: &mut Command,
    input: Option<Vec<u8>>,
    timeout: Duration,
) -> Result<Output> {
    let what = describe(cmd);
    cmd.stdin(if input.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().with_context(|| format!("starting {what}"))?;
    let pid = child.id();
    if let (Some(input), Some(mut stdin)) = (input, child.stdin.take()) {
        thread::spawn(move || {
            use std::io::Write as _;
            let _ = stdin.write_all(&input);
        });
    }
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = match rx.recv_timeout(timeout) {
        Ok(out) => out.with_context(|| format!("waiting for {what}"))?,
        Err(_) => {
            // The child is not reaped until wait_with_output returns, so the
            // pid is still ours.
            kill(pid, libc::SIGKILL);
            let _ = rx.recv_timeout(Duration::from_secs(5));
            bail!("{what} did not finish within {timeout:?} (killed)");
        }
    };
    Ok(Output {
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// Runs `cmd` (10 s at most) and fails, with its stderr, unless it exits 0.
pub fn run(cmd: &mut Command) -> Result<String> {
    let what = describe(cmd);
    let out = output_with_timeout(cmd, Duration::from_secs(10))?;
    if !out.status.success() {
        bail!("{what} failed ({}): {}", out.status, out.stderr.trim());
    }
    Ok(out.stdout)
}

/// `ip [-n ns] <args>`.
pub fn ip(ns: Option<&str>, args: &str) -> Result<String> {
    let mut cmd = Command::new("ip");
    if let Some(ns) = ns {
        cmd.args(["-n", ns]);
    }
    cmd.args(args.split_whitespace());
    run(&mut cmd)
}

/// Sets sysctls (`key=value`) inside `ns`; keys that do not exist on this
/// kernel are ignored (`sysctl -e`).
/// Kills what still runs in a namespace, then deletes it.
pub fn delete_netns(name: &str) -> Result<()> {
    if let Ok(pids) = ip(None, &format!("netns pids {name}")) {
        for pid in pids.split_whitespace().filter_map(|p| p.parse().ok()) {
            kill(pid, libc::SIGKILL);
        }
    }
    ip(None, &format!("netns del {name}")).map(drop)
}

pub fn sysctl_in(ns: &str, settings: &[&str]) -> Result<()> {
    let mut args = vec!["-e", "-q", "-w"];
    args.extend_from_slice(settings);
    run(&mut command_in(ns, "sysctl", args)).map(drop)
}

/// `ethtool <args>` inside `ns`.
pub fn ethtool_in(ns: &str, args: &[&str]) -> Result<()> {
    run(&mut command_in(ns, "ethtool", args)).map(drop)
}

pub(crate) fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

pub fn kill(pid: u32, sig: libc::c_int) {
    if let Ok(pid) = libc::pid_t::try_from(pid) {
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(pid, sig) };
    }
}

/// Whether a process exists (also one we may not signal).
pub fn pid_alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: signal 0 only checks that the process exists.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Reads a whole file into a string, lossily; empty if it cannot be read.
pub(crate) fn read_lossy(path: &Path) -> String {
    let mut buf = Vec::new();
    if let Ok(mut f) = File::open(path) {
        let _ = f.read_to_end(&mut buf);
    }
    String::from_utf8_lossy(&buf).into_owned()
}

/// The last `n` lines of `text`.
pub(crate) fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Locks `m`, also after a panic elsewhere (teardown must still run).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The index of interface `name` in the calling thread's namespace.
pub fn ifindex(name: &str) -> Result<u32> {
    let c = std::ffi::CString::new(name)?;
    // SAFETY: a valid C string.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if i == 0 {
        bail!("no interface {name} in this namespace");
    }
    Ok(i)
}
