//! The benchmark's own network namespaces (`lbb-<pid>-<role>`), agents and pin
//! directories: removed when the [`Scope`] is dropped, on SIGINT / SIGTERM, and,
//! for those of dead runs, when the next run starts.

use std::{
    fs,
    path::PathBuf,
    process::{Child, Command},
    sync::Mutex,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use lb_testbed::{NETNS_DIR, command_in, delete_netns, kill, output_with_timeout, pid_alive};
pub use lb_testbed::{ip, run};

pub const NS_PREFIX: &str = "lbb-";
pub const PIN_PREFIX: &str = "/sys/fs/bpf/lbb-";

/// What to remove on exit.
#[derive(Default)]
struct Registry {
    namespaces: Vec<String>,
    pins: Vec<PathBuf>,
    children: Vec<u32>,
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry {
    namespaces: Vec::new(),
    pins: Vec::new(),
    children: Vec::new(),
});

fn registry() -> std::sync::MutexGuard<'static, Registry> {
    REGISTRY.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs `program args` inside `ns`.
pub fn exec(ns: &str, program: &str, args: &[&str]) -> Result<String> {
    run(&mut command_in(ns, program, args))
}

/// Removes everything on SIGINT / SIGTERM, then exits 130.
pub fn install_signal_handler() {
    lb_testbed::interrupt::on_interrupt("lb-bench", teardown_all);
}

/// Removes everything registered (idempotent).
pub fn teardown_all() {
    let (children, namespaces, pins) = {
        let mut r = registry();
        (
            std::mem::take(&mut r.children),
            std::mem::take(&mut r.namespaces),
            std::mem::take(&mut r.pins),
        )
    };
    for pid in children {
        kill(pid, libc::SIGKILL);
    }
    for ns in namespaces.iter().rev() {
        let _ = delete_netns(ns);
    }
    for p in pins {
        let _ = fs::remove_dir_all(&p);
    }
}

/// Removes namespaces and pin directories of benchmark runs whose process is gone.
pub fn cleanup_stale() -> Vec<String> {
    let mut removed = Vec::new();
    let pid_of = |name: &str, prefix: &str| -> Option<u32> {
        name.strip_prefix(prefix)?.split('-').next()?.parse().ok()
    };
    for e in fs::read_dir(NETNS_DIR).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(pid) = pid_of(&name, NS_PREFIX)
            && !pid_alive(pid)
        {
            let _ = delete_netns(&name);
            removed.push(name);
        }
    }
    for e in fs::read_dir("/sys/fs/bpf").into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(pid) = pid_of(&name, "lbb-")
            && !pid_alive(pid)
        {
            let _ = fs::remove_dir_all(e.path());
            removed.push(e.path().display().to_string());
        }
    }
    removed
}

/// Names of this process's namespaces: `lbb-<pid>-<role>`.
pub fn ns_name(role: &str) -> String {
    format!("{NS_PREFIX}{}-{role}", std::process::id())
}

/// A pin directory of this process: `/sys/fs/bpf/lbb-<pid>-<role>`.
pub fn pin_dir(role: &str) -> PathBuf {
    let p = PathBuf::from(format!("{PIN_PREFIX}{}-{role}", std::process::id()));
    registry().pins.push(p.clone());
    p
}

/// Creates a namespace (removed with [`teardown_all`] / [`Scope`]).
pub fn add_netns(name: &str) -> Result<()> {
    // A leftover of the same name (it does not exist, normally).
    let _ = delete_netns(name);
    ip(None, &format!("netns add {name}"))?;
    registry().namespaces.push(name.to_string());
    ip(Some(name), "link set lo up")?;
    Ok(())
}

pub fn del_netns(name: &str) {
    let _ = delete_netns(name);
    registry().namespaces.retain(|n| n != name);
}

/// Removes what a part of the run created when dropped.
pub struct Scope {
    namespaces: Vec<String>,
}

impl Scope {
    pub fn new() -> Self {
        install_signal_handler();
        Self {
            namespaces: Vec::new(),
        }
    }

    pub fn netns(&mut self, role: &str) -> Result<String> {
        let name = ns_name(role);
        add_netns(&name)?;
        self.namespaces.push(name.clone());
        Ok(name)
    }
}

impl Default for Scope {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Scope {
    fn drop(&mut self) {
        for ns in self.namespaces.iter().rev() {
            del_netns(ns);
        }
    }
}

/// A child process (an lb-agent) killed with its namespace or on Ctrl-C.
pub struct Agent {
    child: Option<Child>,
    pub log: PathBuf,
    pub pin: PathBuf,
    pub started: Instant,
}

impl Agent {
    /// Starts `bin args` inside `ns` with stderr (the log) to `log`.
    pub fn spawn(
        bin: &std::path::Path,
        ns: &str,
        args: &[String],
        log: PathBuf,
        pin: PathBuf,
    ) -> Result<Self> {
        let file = fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let started = Instant::now();
        let child = command_in(ns, bin, args)
            .stdin(std::process::Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .env("RUST_LOG", "warn,lb_agent=info")
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        registry().children.push(child.id());
        Ok(Self {
            child: Some(child),
            log,
            pin,
            started,
        })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Waits until the log has a line containing `needle`; returns when it
    /// was first seen (polling every 2 ms).
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> Result<Instant> {
        let deadline = Instant::now() + timeout;
        loop {
            let text = fs::read_to_string(&self.log).unwrap_or_default();
            if text.contains(needle) {
                return Ok(Instant::now());
            }
            if let Some(c) = self.child.as_mut()
                && let Some(status) = c.try_wait()?
            {
                bail!(
                    "lb-agent exited ({status}) before `{needle}`: {}",
                    tail(&text)
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "no `{needle}` from lb-agent within {timeout:?}: {}",
                    tail(&text)
                );
            }
            thread::sleep(Duration::from_millis(2));
        }
    }

    /// Peak resident set (VmHWM) in bytes.
    pub fn peak_rss(&self) -> Option<u64> {
        let status = fs::read_to_string(format!("/proc/{}/status", self.pid()?)).ok()?;
        let kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()?;
        Some(kb * 1024)
    }

    /// Stops the agent (SIGTERM, then SIGKILL after 5 s) and removes its pins.
    pub fn stop(&mut self, bin: &std::path::Path) {
        if let Some(mut c) = self.child.take() {
            kill(c.id(), libc::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if matches!(c.try_wait(), Ok(Some(_))) {
                    break;
                }
                thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
            registry().children.retain(|p| *p != c.id());
        }
        let _ = output_with_timeout(
            Command::new(bin)
                .args(["cleanup", "--pin-path"])
                .arg(&self.pin),
            Duration::from_secs(10),
        );
        let _ = fs::remove_dir_all(&self.pin);
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = fs::remove_dir_all(&self.pin);
    }
}

fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(8)..].join(" | ")
}

/// Pins the calling thread to `cpu`.
pub fn pin_thread(cpu: usize) -> Result<()> {
    // SAFETY: a zeroed cpu_set_t with one bit set, for this thread (0).
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) != 0 {
            bail!("sched_setaffinity: {}", std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The CPU benchmarks pin to: the last one.
pub fn bench_cpu() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .saturating_sub(1)
}

pub fn ifindex(name: &str) -> Result<u32> {
    let c = std::ffi::CString::new(name)?;
    // SAFETY: valid C string.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if i == 0 {
        bail!("no interface {name} in this namespace");
    }
    Ok(i)
}
