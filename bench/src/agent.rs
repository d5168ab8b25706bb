//! lb-agent as the benchmark runs it: started through a testbed scope (which
//! stops it on Ctrl-C and when the part ends), its log in the scope's run
//! directory and its pins in the scope's pin directory; stopped with
//! `lb-agent cleanup`, so that the next mode in the same namespace starts with
//! no program attached.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use lb_testbed::{Scope, agent::AgentSpec, output_with_timeout};

pub struct LbAgent<'s> {
    scope: &'s Scope,
    name: String,
    bin: PathBuf,
    pub log: PathBuf,
    pub pin: PathBuf,
}

impl<'s> LbAgent<'s> {
    /// Starts `bin <args> --pin-path <pin>` in `ns`, known as `name` in `scope`.
    pub fn start(
        scope: &'s Scope,
        bin: &Path,
        ns: &str,
        name: &str,
        args: &[String],
    ) -> Result<Self> {
        scope.mark_pin_dir()?;
        let pin = scope.pin_dir().join(name);
        let log = scope.run_dir().join(format!("{name}.log"));
        let mut args: Vec<std::ffi::OsString> = args.iter().map(Into::into).collect();
        args.push("--pin-path".into());
        args.push(pin.clone().into());
        scope.start_agent(
            name,
            &AgentSpec {
                bin: bin.to_path_buf(),
                args,
                env: vec![("RUST_LOG".into(), "warn,lb_agent=info".into())],
                mounts: Vec::new(),
                ns: ns.to_string(),
                log: log.clone(),
                confinement: None,
            },
        )?;
        Ok(Self {
            scope,
            name: name.to_string(),
            bin: bin.to_path_buf(),
            log,
            pin,
        })
    }

    /// Waits until its log has a line containing `needle`; returns when it
    /// was first seen (polled every 2 ms).
    pub fn wait_for(&self, needle: &str, timeout: Duration) -> Result<Instant> {
        self.scope
            .wait_agent_log(&self.name, &self.log, needle, timeout)
    }

    /// When it was started.
    pub fn started(&self) -> Result<Instant> {
        self.scope
            .agent_started(&self.name)
            .context("the agent is not running")
    }

    /// Peak resident set (VmHWM) in bytes.
    pub fn peak_rss(&self) -> Option<u64> {
        self.scope.agent_peak_rss(&self.name)
    }

    /// Stops it (SIGTERM, then SIGKILL after 5 s) and removes what it
    /// attached and pinned.
    pub fn stop(self) {
        let _ = self.scope.stop_agent(&self.name);
        let _ = output_with_timeout(
            Command::new(&self.bin)
                .args(["cleanup", "--pin-path"])
                .arg(&self.pin),
            Duration::from_secs(10),
        );
        let _ = std::fs::remove_dir_all(&self.pin);
    }
}
