//! An lb agent process started by a testbed: inside a network namespace,
//! output appended to a log file, in a process group of its own (a terminal's
//! Ctrl-C reaches only the test, which stops its agents in order).

use std::{
    ffi::OsString,
    fs::OpenOptions,
    os::unix::process::CommandExt as _,
    path::PathBuf,
    process::{Child, ExitStatus, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};

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
        let mut cmd = command_in(&spec.ns, &spec.bin, &spec.args);
        cmd.envs(spec.env.iter().map(|(k, v)| (k, v)));
        if !spec.mounts.is_empty() {
            ns::private_mounts(&mut cmd, &spec.mounts)?;
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
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).ok()?;
        let kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()?;
        Some(kb * 1024)
    }
}
