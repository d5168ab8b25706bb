//! An lb agent process started by a testbed: inside a network namespace,
//! output appended to a log file, in a process group of its own (a terminal's
//! Ctrl-C reaches only the test, which stops its agents in order).

use std::{
    collections::BTreeSet,
    ffi::OsString,
    fs::OpenOptions,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, ExitStatus, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};

use crate::ns::{self, command_in};

/// How an agent is started (kept for restarts).
#[derive(Debug, Clone)]
pub struct AgentSpec {
    pub bin: PathBuf,
    pub args: Vec<OsString>,
    pub env: Vec<(String, String)>,
    /// Bind mounts (source, target) in a mount namespace of the agent's own.
    pub mounts: Vec<(PathBuf, PathBuf)>,
    /// The network namespace it runs in.
    pub ns: String,
    /// Where its output goes (appended: restarts add to it).
    pub log: PathBuf,
    /// Confined as a container runtime confines a container's process; None:
    /// with the test's own privileges.
    pub confinement: Option<Confinement>,
}

/// What a container's securityContext makes of its process, as runc and
/// crun apply it, for a process that runs as root (uid 0).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Confinement {
    /// The only capabilities it keeps, in Kubernetes' spelling (`NET_ADMIN`;
    /// `drop: [ALL]` plus these `add`): its bounding set, and so, for root,
    /// its permitted and effective sets; nothing inheritable or ambient.
    pub capabilities: BTreeSet<String>,
    /// `allowPrivilegeEscalation: false`: no_new_privs.
    pub no_new_privs: bool,
    /// `readOnlyRootFilesystem: true`, made stricter: every mount the process
    /// sees is read-only but those of `writable`.
    pub read_only: bool,
    /// With `read_only`: the mounts left writable (the container's writable
    /// volumes), as paths the process sees.
    pub writable: Vec<PathBuf>,
}

/// The capabilities by number (`include/uapi/linux/capability.h`), in
/// Kubernetes' spelling.
pub const CAPABILITIES: [&str; 41] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "LINUX_IMMUTABLE",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_ADMIN",
    "NET_RAW",
    "IPC_LOCK",
    "IPC_OWNER",
    "SYS_MODULE",
    "SYS_RAWIO",
    "SYS_CHROOT",
    "SYS_PTRACE",
    "SYS_PACCT",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_NICE",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "MKNOD",
    "LEASE",
    "AUDIT_WRITE",
    "AUDIT_CONTROL",
    "SETFCAP",
    "MAC_OVERRIDE",
    "MAC_ADMIN",
    "SYSLOG",
    "WAKE_ALARM",
    "BLOCK_SUSPEND",
    "AUDIT_READ",
    "PERFMON",
    "BPF",
    "CHECKPOINT_RESTORE",
];

impl Confinement {
    /// The command that runs `bin args` so confined: util-linux's `setpriv`,
    /// which keeps only the capabilities in the bounding set, clears the
    /// inheritable set and sets no_new_privs, then executes the program. A
    /// root process's permitted and effective sets after that execve are its
    /// bounding set, as a container's root process's are. (The mounts are
    /// made read-only before, see `ns::private_mounts`.)
    pub fn command(&self, bin: &Path, args: &[OsString]) -> Result<(OsString, Vec<OsString>)> {
        for c in &self.capabilities {
            ensure!(
                CAPABILITIES.contains(&c.as_str()),
                "{c:?} is no capability (Kubernetes spelling, e.g. NET_ADMIN)"
            );
        }
        let keep: String = self
            .capabilities
            .iter()
            .map(|c| format!(",+{}", c.to_lowercase()))
            .collect();
        let mut out: Vec<OsString> = vec![
            format!("--bounding-set=-all{keep}").into(),
            "--inh-caps=-all".into(),
        ];
        if self.no_new_privs {
            out.push("--no-new-privs".into());
        }
        out.push("--".into());
        out.push(bin.into());
        out.extend(args.iter().cloned());
        Ok(("setpriv".into(), out))
    }
}

/// What a process runs with, from `/proc/<pid>/status`: capability sets (by
/// name, Kubernetes' spelling) and no_new_privs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Privileges {
    pub effective: BTreeSet<String>,
    pub permitted: BTreeSet<String>,
    pub inheritable: BTreeSet<String>,
    pub bounding: BTreeSet<String>,
    pub ambient: BTreeSet<String>,
    pub no_new_privs: bool,
}

impl Privileges {
    pub fn of(pid: u32) -> Result<Self> {
        let path = format!("/proc/{pid}/status");
        let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        let field = |name: &str| -> Result<&str> {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .map(str::trim)
                .with_context(|| format!("{path} has no {name}"))
        };
        let set = |name: &str| -> Result<BTreeSet<String>> {
            let mask = u64::from_str_radix(field(name)?, 16)
                .with_context(|| format!("{path}: {name} is no hex mask"))?;
            let mut names = BTreeSet::new();
            for bit in 0..64 {
                if mask & (1 << bit) != 0 {
                    match CAPABILITIES.get(bit) {
                        Some(c) => names.insert((*c).to_string()),
                        None => bail!("{path}: {name} has capability {bit}, which is unknown here"),
                    };
                }
            }
            Ok(names)
        };
        Ok(Self {
            effective: set("CapEff")?,
            permitted: set("CapPrm")?,
            inheritable: set("CapInh")?,
            bounding: set("CapBnd")?,
            ambient: set("CapAmb")?,
            no_new_privs: field("NoNewPrivs")? == "1",
        })
    }
}

/// A running agent.
#[derive(Debug)]
pub struct Agent {
    child: Child,
    started: Instant,
}

impl Agent {
    pub fn spawn(spec: &AgentSpec) -> Result<Self> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&spec.log)
            .with_context(|| format!("opening {}", spec.log.display()))?;
        let (program, args) = match &spec.confinement {
            Some(c) => c.command(&spec.bin, &spec.args)?,
            None => (spec.bin.clone().into(), spec.args.clone()),
        };
        let mut cmd = command_in(&spec.ns, &program, &args);
        cmd.envs(spec.env.iter().map(|(k, v)| (k, v)));
        let read_only = spec
            .confinement
            .as_ref()
            .filter(|c| c.read_only)
            .map(|c| c.writable.as_slice());
        if !spec.mounts.is_empty() || read_only.is_some() {
            ns::private_mounts(&mut cmd, &spec.mounts, read_only)?;
        }
        let started = Instant::now();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting {} in {}", spec.bin.display(), spec.ns))?;
        Ok(Self { child, started })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What it runs with now (a confined agent: once `setpriv` has executed
    /// it).
    pub fn privileges(&self) -> Result<Privileges> {
        Privileges::of(self.pid())
    }

    /// When it was started.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// Its exit status if it has exited.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        Ok(self.child.try_wait()?)
    }

    /// Stops it as a DaemonSet rollout or systemd does: SIGTERM, then SIGKILL
    /// after `grace`; reaps it.
    pub fn stop(mut self, grace: Duration) -> Result<ExitStatus> {
        if let Some(status) = self.child.try_wait()? {
            return Ok(status);
        }
        ns::kill(self.child.id(), libc::SIGTERM);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            thread::sleep(Duration::from_millis(20));
        }
        self.child.kill()?;
        Ok(self.child.wait()?)
    }

    /// Peak resident set (VmHWM) in bytes.
    pub fn peak_rss(&self) -> Option<u64> {
        self.status_bytes("VmHWM")
    }

    /// A size field of its `/proc/<pid>/status` (`VmRSS`, `VmHWM`, ...,
    /// given in kB there) in bytes.
    pub fn status_bytes(&self, field: &str) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).ok()?;
        let kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()?;
        Some(kb * 1024)
    }
}
