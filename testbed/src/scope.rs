//! What a testbed run makes, and its removal: network namespaces, a pin
//! directory on bpffs, a directory for logs and files, and lb agents. All of it
//! is removed when the [`Scope`] is dropped, on SIGINT / SIGTERM (exit status
//! 130), and, for a run whose process died, by the next run's
//! [`cleanup_stale`]. The cluster, the one-node lab and the benchmark each make
//! their namespaces and start their agents through one.
//!
//! Names carry a run id (4 hex digits) and the owner's pid: namespaces
//! `lbt-<run>-<pid>-<role>`, the pin directory `/sys/fs/bpf/lb-test-<run>`
//! (with an `owner-<pid>` marker), the run directory
//! `$TMPDIR/lb-testbed-<run>-<pid>`.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    hash::{BuildHasher as _, Hasher as _},
    path::{Path, PathBuf},
    process::ExitStatus,
    sync::{
        Arc, Mutex, Weak,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context as _, Result, bail};

use crate::{
    agent::{Agent, AgentSpec},
    ns::{self, ip, lock, sysctl_in},
};

/// Prefix of every namespace a testbed creates: `lbt-<run>-<owner pid>-<role>`.
const NS_PREFIX: &str = "lbt-";
/// Where pin directories go: `/sys/fs/bpf/lb-test-<run>`.
pub(crate) const BPFFS: &str = "/sys/fs/bpf";
const PIN_PREFIX: &str = "lb-test-";
/// How long an agent gets to exit after SIGTERM before it is killed.
const AGENT_STOP: Duration = Duration::from_secs(5);

/// What teardown needs; shared with the Ctrl-C handler's registry.
struct Shared {
    run: String,
    namespaces: Mutex<Vec<String>>,
    pin_dir: PathBuf,
    run_dir: PathBuf,
    keep_run_dir: AtomicBool,
    agents: Mutex<BTreeMap<String, Agent>>,
    /// Held for the whole teardown, so that a second caller (the signal
    /// thread while a drop is under way) waits for the first to finish.
    torn_down: Mutex<bool>,
}

impl Shared {
    /// Removes everything the run made; idempotent, bounded (every command
    /// has a time limit, agents get 5 s to exit).
    fn teardown(&self) {
        let mut done = lock(&self.torn_down);
        if *done {
            return;
        }
        *done = true;
        let agents = std::mem::take(&mut *lock(&self.agents));
        for (_, agent) in agents {
            let _ = agent.stop(AGENT_STOP);
        }
        let namespaces = std::mem::take(&mut *lock(&self.namespaces));
        for name in namespaces.iter().rev() {
            if let Err(e) = ns::delete_netns(name) {
                eprintln!("lb-testbed: {e:#}");
            }
        }
        if self.pin_dir.exists()
            && let Err(e) = fs::remove_dir_all(&self.pin_dir)
        {
            eprintln!("lb-testbed: removing {}: {e}", self.pin_dir.display());
        }
        if self.keep_run_dir.load(Ordering::SeqCst) {
            eprintln!(
                "lb-testbed: run {} kept its logs in {}",
                self.run,
                self.run_dir.display()
            );
        } else {
            let _ = fs::remove_dir_all(&self.run_dir);
        }
        lock(&REGISTRY).retain(|w| w.upgrade().is_some_and(|s| s.run != self.run));
    }
}

/// Scopes to tear down on SIGINT / SIGTERM.
static REGISTRY: Mutex<Vec<Weak<Shared>>> = Mutex::new(Vec::new());

fn teardown_registered() {
    let scopes: Vec<Arc<Shared>> = lock(&REGISTRY).iter().filter_map(Weak::upgrade).collect();
    for s in scopes {
        s.teardown();
    }
}

/// What one run made (see the module docs); removed when dropped. A scope
/// dropped during a panic (a failing test) keeps its run directory, with the
/// agents' logs.
pub struct Scope {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scope")
            .field("run", &self.shared.run)
            .finish_non_exhaustive()
    }
}

impl Scope {
    /// A new run: its id, its (empty) run directory, registered for Ctrl-C.
    pub fn new() -> Result<Self> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            bail!("network namespaces and BPF need root");
        }
        crate::interrupt::on_interrupt("lb-testbed", teardown_registered);
        let run = new_run_id();
        let pid = std::process::id();
        let run_dir = std::env::temp_dir().join(format!("lb-testbed-{run}-{pid}"));
        fs::create_dir_all(&run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
        let shared = Arc::new(Shared {
            pin_dir: Path::new(BPFFS).join(format!("{PIN_PREFIX}{run}")),
            run,
            namespaces: Mutex::new(Vec::new()),
            run_dir,
            keep_run_dir: AtomicBool::new(false),
            agents: Mutex::new(BTreeMap::new()),
            torn_down: Mutex::new(false),
        });
        lock(&REGISTRY).push(Arc::downgrade(&shared));
        Ok(Self { shared })
    }

    /// The run id (4 hex digits) in every name of the run.
    pub fn run_id(&self) -> &str {
        &self.shared.run
    }

    /// The name the namespace of `role` gets: `lbt-<run>-<pid>-<role>`.
    pub fn netns_name(&self, role: &str) -> String {
        format!(
            "{NS_PREFIX}{}-{}-{role}",
            self.shared.run,
            std::process::id()
        )
    }

    /// Creates the namespace [`Self::netns_name`]`(role)` with `sysctls` set
    /// (before any interface exists: interfaces copy `default`) and `lo` up;
    /// returns its name. Duplicate address detection is off: every address in
    /// a testbed is planned, and tentative addresses would only make the first
    /// packets fail.
    pub fn add_netns(&self, role: &str, sysctls: &[&str]) -> Result<String> {
        let name = self.netns_name(role);
        ip(None, &format!("netns add {name}"))?;
        lock(&self.shared.namespaces).push(name.clone());
        let mut all = vec![
            "net.ipv6.conf.all.accept_dad=0",
            "net.ipv6.conf.default.accept_dad=0",
        ];
        all.extend_from_slice(sysctls);
        sysctl_in(&name, &all)?;
        ip(Some(&name), "link set lo up")?;
        Ok(name)
    }

    /// Every namespace made so far, in order.
    pub fn namespaces(&self) -> Vec<String> {
        lock(&self.shared.namespaces).clone()
    }

    /// `/sys/fs/bpf/lb-test-<run>`: where the run's agents pin.
    pub fn pin_dir(&self) -> &Path {
        &self.shared.pin_dir
    }

    /// Creates the pin directory with the `owner-<pid>` marker that lets a
    /// later run find it if this process dies without tearing down (nothing,
    /// where /sys/fs/bpf is no bpffs: the agent mounts one itself).
    pub fn mark_pin_dir(&self) -> Result<()> {
        if is_bpffs(BPFFS) {
            let owner = self
                .shared
                .pin_dir
                .join(format!("owner-{}", std::process::id()));
            fs::create_dir_all(&owner).with_context(|| format!("creating {}", owner.display()))?;
        }
        Ok(())
    }

    /// The run directory: logs and files of the run.
    pub fn run_dir(&self) -> &Path {
        &self.shared.run_dir
    }

    /// Keeps the run directory at teardown (and says where it is).
    pub fn keep_run_dir(&self) {
        self.shared.keep_run_dir.store(true, Ordering::SeqCst);
    }

    /// Starts an agent as `spec` says, known as `name` from then on.
    pub fn start_agent(&self, name: &str, spec: &AgentSpec) -> Result<()> {
        let mut agents = lock(&self.shared.agents);
        if agents.contains_key(name) {
            bail!("the agent {name} is already running");
        }
        let agent = Agent::spawn(spec).with_context(|| format!("starting the agent {name}"))?;
        agents.insert(name.to_string(), agent);
        Ok(())
    }

    /// Stops the agent `name` (SIGTERM, then SIGKILL after 5 s); nothing if
    /// it is not running. Returns its exit status.
    pub fn stop_agent(&self, name: &str) -> Result<Option<ExitStatus>> {
        let agent = lock(&self.shared.agents).remove(name);
        agent
            .map(|a| a.stop(AGENT_STOP))
            .transpose()
            .with_context(|| format!("stopping the agent {name}"))
    }

    /// The pid of the agent `name`, if it runs.
    pub fn agent_pid(&self, name: &str) -> Option<u32> {
        lock(&self.shared.agents).get(name).map(Agent::pid)
    }

    /// When the agent `name` was started.
    pub fn agent_started(&self, name: &str) -> Option<Instant> {
        lock(&self.shared.agents).get(name).map(Agent::started)
    }

    /// Its peak resident set (VmHWM) in bytes.
    pub fn agent_peak_rss(&self, name: &str) -> Option<u64> {
        lock(&self.shared.agents).get(name)?.peak_rss()
    }

    /// A size field of its `/proc/<pid>/status` in bytes (see
    /// [`Agent::status_bytes`]).
    pub fn agent_status_bytes(&self, name: &str, field: &str) -> Option<u64> {
        lock(&self.shared.agents).get(name)?.status_bytes(field)
    }

    /// Fails if the agent `name` is not running: it was never started, or it
    /// has exited (then it is forgotten, and the error has its status).
    pub fn check_agent(&self, name: &str) -> Result<()> {
        let mut agents = lock(&self.shared.agents);
        let agent = agents
            .get_mut(name)
            .with_context(|| format!("the agent {name} is not running"))?;
        if let Some(status) = agent.try_wait()? {
            agents.remove(name);
            bail!("the agent {name} exited ({status})");
        }
        Ok(())
    }

    /// Waits until `log` has a line containing `needle`, polling every 2 ms,
    /// and returns when it was first seen; fails early if the agent `name`
    /// exits, and after `timeout`, with the log's last lines.
    pub fn wait_agent_log(
        &self,
        name: &str,
        log: &Path,
        needle: &str,
        timeout: Duration,
    ) -> Result<Instant> {
        let deadline = Instant::now() + timeout;
        loop {
            let text = ns::read_lossy(log);
            if text.contains(needle) {
                return Ok(Instant::now());
            }
            if let Err(e) = self.check_agent(name) {
                bail!(
                    "{e:#} before `{needle}`; its log ends:\n{}",
                    ns::tail(&text, 8)
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "no `{needle}` from the agent {name} within {timeout:?}; its log ends:\n{}",
                    ns::tail(&text, 8)
                );
            }
            thread::sleep(Duration::from_millis(2));
        }
    }

    /// Tears everything down now (also what dropping does).
    pub fn teardown(&self) {
        self.shared.teardown();
    }
}

impl Drop for Scope {
    fn drop(&mut self) {
        if thread::panicking() {
            self.keep_run_dir();
        }
        self.shared.teardown();
    }
}

/// A namespace name of ours, split: `lbt-<run>-<pid>-<role>`.
fn parse_ns_name(name: &str) -> Option<(&str, u32)> {
    let rest = name.strip_prefix(NS_PREFIX)?;
    let (run, rest) = rest.split_once('-')?;
    let (pid, _role) = rest.split_once('-')?;
    (run.len() == 4 && run.bytes().all(|b| b.is_ascii_hexdigit())).then_some(())?;
    Some((run, pid.parse().ok()?))
}

/// Removes what crashed runs left behind: namespaces named
/// `lbt-<run>-<pid>-*` whose pid is dead (after killing the processes still
/// in them, e.g. orphaned agents), and the pin dirs
/// `/sys/fs/bpf/lb-test-<run>` of those runs or whose `owner-<pid>` marker
/// names a dead process. Returns what it removed.
pub fn cleanup_stale() -> Vec<String> {
    let mut removed = Vec::new();
    let mut dead_runs = BTreeSet::new();
    let mut names: Vec<String> = fs::read_dir(ns::NETNS_DIR)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    names.sort();
    for name in names {
        let Some((run, pid)) = parse_ns_name(&name) else {
            continue;
        };
        if ns::pid_alive(pid) {
            continue;
        }
        dead_runs.insert(run.to_string());
        match ns::delete_netns(&name) {
            Ok(()) => removed.push(name),
            Err(e) => eprintln!("lb-testbed: stale namespace: {e:#}"),
        }
    }
    let pin_dirs = fs::read_dir(BPFFS).into_iter().flatten().flatten();
    for dir in pin_dirs {
        let Some(run) = dir
            .file_name()
            .to_str()
            .and_then(|n| n.strip_prefix(PIN_PREFIX))
            .map(str::to_string)
        else {
            continue;
        };
        let owner_dead = fs::read_dir(dir.path())
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                e.file_name()
                    .to_str()?
                    .strip_prefix("owner-")?
                    .parse::<u32>()
                    .ok()
            })
            .any(|pid| !ns::pid_alive(pid));
        if owner_dead || dead_runs.contains(&run) {
            match fs::remove_dir_all(dir.path()) {
                Ok(()) => removed.push(dir.path().display().to_string()),
                Err(e) => eprintln!("lb-testbed: removing {}: {e}", dir.path().display()),
            }
        }
    }
    removed
}

/// A run id no live run and no leftover uses.
fn new_run_id() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    for _ in 0..256 {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        h.write_u64(COUNTER.fetch_add(1, Ordering::SeqCst));
        h.write_u128(
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0),
        );
        let run = format!("{:04x}", h.finish() & 0xffff);
        let taken = fs::read_dir(ns::NETNS_DIR)
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| {
                parse_ns_name(&e.file_name().to_string_lossy()).is_some_and(|(r, _)| r == run)
            })
            || Path::new(BPFFS).join(format!("{PIN_PREFIX}{run}")).exists()
            || lock(&REGISTRY)
                .iter()
                .filter_map(Weak::upgrade)
                .any(|s| s.run == run);
        if !taken {
            return run;
        }
    }
    // 256 collisions in a 16-bit space means something else is wrong; a
    // clash only matters for the pin dir anyway.
    format!("{:04x}", std::process::id() & 0xffff)
}

pub(crate) fn is_bpffs(path: &str) -> bool {
    let Ok(c) = std::ffi::CString::new(path) else {
        return false;
    };
    // SAFETY: statfs writes into a zeroed struct we own.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == 0xcafe_4a11
    }
}
