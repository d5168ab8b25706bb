//! The end-to-end suites' harness: one cluster (lb-testbed) with lb-agent on
//! both nodes following a manifest directory (e2e.rs) or a real API server
//! (e2e_kube.rs), real clients (curl, socat) and the testbed's probes,
//! `lb-agent dump` decoded, packet captures for evidence, the case runner.

/// Fails the case with the message unless `cond` holds; counts a passed check.
macro_rules! check {
    ($env:expr, $cond:expr, $($arg:tt)+) => {{
        if !$cond {
            anyhow::bail!($($arg)+);
        }
        $env.passed();
    }};
}

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt, fs,
    io::{BufRead as _, BufReader},
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    process::Stdio,
    sync::{
        atomic::{AtomicUsize, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use lb_testbed::{
    Cluster, Options, Pod, ProbeError, command_in, curl_in,
    kube_cluster::KubeCluster,
    manifests::{ServiceSpec, service_yaml},
    output_with_timeout, socat_udp_in, tcp_probe, udp_probe,
};
use serde_json::Value;

/// The agent under test.
pub const AGENT: &str = env!("CARGO_BIN_EXE_lb-agent");
/// What a single request may take when it is expected to be answered.
pub const ANSWER: Duration = Duration::from_secs(3);

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Proto {
    Tcp,
    Udp,
}

pub use Proto::{Tcp, Udp};

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Tcp => "TCP",
            Udp => "UDP",
        })
    }
}

/// "v4" / "v6".
pub fn fam(v6: bool) -> &'static str {
    if v6 { "v6" } else { "v4" }
}

/// A pod server's greeting: who answered, and the client address it saw.
#[derive(Clone, Debug)]
pub struct Answer {
    pub server: String,
    pub peer: SocketAddr,
}

impl fmt::Display for Answer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (saw {})", self.server, self.peer)
    }
}

/// Parses `<name> <peer>` (the first line of an answer).
pub fn greeting(text: &str) -> Result<Answer> {
    let line = text.lines().next().unwrap_or_default();
    let (server, peer) = line
        .split_once(' ')
        .with_context(|| format!("no greeting in {text:?}"))?;
    Ok(Answer {
        server: server.to_string(),
        peer: peer
            .trim()
            .parse()
            .with_context(|| format!("bad peer address in greeting {line:?}"))?,
    })
}

/// One request with a real client: `curl` (TCP) or `socat` (UDP) from `ns`.
/// For UDP the echo of the payload is checked too.
pub fn ask(ns: &str, addr: SocketAddr, proto: Proto) -> Result<Answer> {
    match proto {
        Tcp => {
            let body = curl_in(ns, &format!("http://{addr}/"), ANSWER)?;
            ensure!(
                body.contains("GET / HTTP/1.1"),
                "curl {addr}: the request was not echoed: {body:?}"
            );
            greeting(&body)
        }
        Udp => {
            let payload = format!("e2e udp to {addr}");
            let out = socat_udp_in(ns, addr, payload.as_bytes(), ANSWER)?;
            let (_, rest) = out.split_once('\n').unwrap_or_default();
            ensure!(
                rest == payload,
                "socat {addr}: the payload was not echoed: {out:?}"
            );
            greeting(&out)
        }
    }
}

/// One request with the testbed's probe (a kernel socket in `ns`): the
/// answering pod's name, or why there was none.
pub fn probe(
    ns: &str,
    addr: SocketAddr,
    proto: Proto,
    timeout: Duration,
) -> Result<String, ProbeError> {
    let payload = format!("e2e probe {proto} to {addr}\n");
    match proto {
        Tcp => tcp_probe(ns, addr, payload.as_bytes(), timeout),
        Udp => udp_probe(ns, addr, payload.as_bytes(), timeout),
    }
}

/// Runs `f` and measures it.
pub fn timed<T>(f: impl FnOnce() -> T) -> (T, Duration) {
    let t = Instant::now();
    let r = f();
    (r, t.elapsed())
}

pub fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

/// The services a dump shows, reduced to what must not change across an agent
/// restart: ids, names, frontends (address, table row, backend count, flags),
/// backend ids with addresses and flags, Maglev rows and their shares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shape {
    pub services: BTreeMap<u64, String>,
    pub backends: BTreeMap<u64, String>,
    pub maglev: BTreeMap<u64, String>,
}

impl Shape {
    pub fn of(dump: &Value) -> Result<Self> {
        let arr = |k: &str| -> Result<&Vec<Value>> {
            dump[k]
                .as_array()
                .with_context(|| format!("dump without {k}"))
        };
        let id = |v: &Value, k: &str| -> Result<u64> {
            v[k].as_u64().with_context(|| format!("no {k} in {v}"))
        };
        let mut s = Shape {
            services: BTreeMap::new(),
            backends: BTreeMap::new(),
            maglev: BTreeMap::new(),
        };
        for v in arr("services")? {
            s.services
                .insert(id(v, "id")?, format!("{} {}", v["name"], v["frontends"]));
        }
        for v in arr("backends")? {
            s.backends
                .insert(id(v, "id")?, format!("{} {}", v["address"], v["flags"]));
        }
        for v in arr("maglev")? {
            s.maglev.insert(id(v, "start")?, v["shares"].to_string());
        }
        Ok(s)
    }

    /// What differs from `other`, one line per id.
    pub fn diff(&self, other: &Shape) -> Vec<String> {
        let mut out = Vec::new();
        for (what, a, b) in [
            ("service", &self.services, &other.services),
            ("backend", &self.backends, &other.backends),
            ("maglev table at", &self.maglev, &other.maglev),
        ] {
            let ids: BTreeSet<&u64> = a.keys().chain(b.keys()).collect();
            for id in ids {
                if a.get(id) != b.get(id) {
                    out.push(format!(
                        "{what} {id}: {} => {}",
                        a.get(id).map_or("(none)", String::as_str),
                        b.get(id).map_or("(none)", String::as_str)
                    ));
                }
            }
        }
        out
    }
}

/// Where the agents of a suite take the cluster's state from.
pub enum Source {
    /// A manifest directory (`lb-agent run --manifests`), written by the suite.
    Manifests(Box<Cluster>),
    /// A real API server, the agents run as the DaemonSet runs them.
    Kube(Box<KubeCluster>),
}

/// The suite's cluster, its agents' source and the tally of passed checks.
pub struct Env {
    source: Source,
    pub dir: PathBuf,
    checks: AtomicUsize,
}

impl Env {
    /// A cluster built as `opts` say, with pod servers on port 8080 and an
    /// empty manifest directory (agents not started yet).
    pub fn up(opts: Options) -> Result<Self> {
        let c = Cluster::up(opts)?;
        c.start_pod_servers(&[8080])?;
        let dir = c.run_dir().join("manifests");
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Env {
            source: Source::Manifests(Box::new(c)),
            dir,
            checks: AtomicUsize::new(0),
        })
    }

    /// A cluster built as `opts` say, driven through a real API server, with
    /// `agent` running on every node as the DaemonSet runs it (see
    /// `lb_testbed::kube_cluster`).
    pub fn up_kube(opts: Options, agent: &std::path::Path) -> Result<Self> {
        let k = KubeCluster::up(opts, agent)?;
        let dir = k.cluster.run_dir().to_path_buf();
        Ok(Env {
            source: Source::Kube(Box::new(k)),
            dir,
            checks: AtomicUsize::new(0),
        })
    }

    /// The namespace cluster.
    pub fn c(&self) -> &Cluster {
        match &self.source {
            Source::Manifests(c) => c,
            Source::Kube(k) => &k.cluster,
        }
    }

    /// The cluster and its API server (Kubernetes suites).
    pub fn kube(&self) -> &KubeCluster {
        match &self.source {
            Source::Kube(k) => k,
            Source::Manifests(_) => panic!("a manifest-mode suite has no API server"),
        }
    }

    pub fn start_agents(&self) -> Result<()> {
        self.c().start_agents(AGENT.as_ref(), &self.dir)
    }

    /// Counts one passed check.
    pub fn passed(&self) {
        self.checks.fetch_add(1, Ordering::SeqCst);
    }

    pub fn checks(&self) -> usize {
        self.checks.load(Ordering::SeqCst)
    }

    pub fn pods(&self, names: &[&str]) -> Vec<&Pod> {
        names.iter().map(|n| self.c().pod(n)).collect()
    }

    /// The pod that has `ip`.
    pub fn pod_of(&self, ip: IpAddr) -> Option<&Pod> {
        self.c().pods().find(|p| p.addrs().contains(&ip))
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.yaml"))
    }

    /// Writes the Service `spec` with `ready` pods as endpoints to
    /// `<dir>/<name>.yaml`, atomically (a hidden file renamed into place).
    pub fn write(&self, spec: &ServiceSpec, ready: &[&str]) -> Result<()> {
        let yaml = service_yaml(spec, &self.pods(ready), &[]);
        let tmp = self.dir.join(format!(".{}.yaml.tmp", spec.name));
        fs::write(&tmp, yaml).with_context(|| format!("writing {}", tmp.display()))?;
        fs::rename(&tmp, self.path(&spec.name))
            .with_context(|| format!("renaming {} into place", tmp.display()))
    }

    pub fn delete(&self, name: &str) -> Result<()> {
        let p = self.path(name);
        fs::remove_file(&p).with_context(|| format!("removing {}", p.display()))
    }

    fn dump_cmd(&self, node: &str, extra: &[&str]) -> Result<String> {
        let n = self.c().node(node);
        let pins = n.pin_path().display().to_string();
        let mut args = vec!["dump", "--pin-path", pins.as_str()];
        args.extend_from_slice(extra);
        let out = output_with_timeout(&mut command_in(n.ns(), AGENT, &args), ANSWER)?;
        ensure!(
            out.status.success(),
            "lb-agent dump on {node} failed ({}): {}",
            out.status,
            out.stderr.trim()
        );
        Ok(out.stdout)
    }

    /// The cluster CIDRs `lb-agent dump` shows on `node` (None: none in
    /// force), and every node's pod CIDRs, which they must be.
    pub fn cluster_cidrs(&self, node: &str) -> Result<(Option<Vec<String>>, Vec<String>)> {
        let shown = self.dump(node)?["config"]["cluster_cidrs"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|c| c.as_str().map(String::from))
                    .collect()
            });
        let mut want: Vec<String> = self
            .c()
            .nodes()
            .iter()
            .flat_map(|n| [n.pod_cidr_v4().to_string(), n.pod_cidr_v6().to_string()])
            .collect();
        want.sort();
        Ok((shown, want))
    }

    /// `lb-agent dump --json` of `node`, conntrack counted but no flow shown
    /// (a node with a hundred thousand flows takes seconds to list them).
    pub fn dump(&self, node: &str) -> Result<Value> {
        self.dump_limited(node, 0)
    }

    /// `lb-agent dump --json` of `node`, every conntrack entry included.
    pub fn dump_flows(&self, node: &str) -> Result<Value> {
        self.dump_limited(node, 1_000_000)
    }

    /// `lb-agent dump --json` of `node`, at most `conntrack` flows shown.
    fn dump_limited(&self, node: &str, conntrack: usize) -> Result<Value> {
        let limit = conntrack.to_string();
        let text = self.dump_cmd(node, &["--json", "--conntrack-limit", &limit])?;
        serde_json::from_str(&text).with_context(|| format!("parsing the dump of {node}"))
    }

    /// The [`Shape`] of `node`'s maps.
    pub fn shape(&self, node: &str) -> Result<Shape> {
        Shape::of(&self.dump_limited(node, 0)?)
    }

    /// Service port names on `node` (`default/web:http-tcp/TCP/v4`, ...).
    pub fn service_names(&self, node: &str) -> Result<Vec<String>> {
        Ok(self.dump_limited(node, 0)?["services"]
            .as_array()
            .context("dump without services")?
            .iter()
            .filter_map(|s| s["name"].as_str().map(str::to_string))
            .collect())
    }

    /// The SNAT port range of `node`'s datapath config.
    pub fn snat_ports(&self, node: &str) -> Result<(u16, u16)> {
        let d = self.dump_limited(node, 0)?;
        let r = d["config"]["snat_ports"]
            .as_str()
            .context("dump without config.snat_ports")?;
        let (a, b) = r.split_once('-').context("bad snat_ports")?;
        Ok((a.parse()?, b.parse()?))
    }

    /// What the failing suite leaves for its reader: per node, the end of the
    /// agent's log and `lb-agent dump` (text).
    pub fn evidence(&self) -> String {
        let mut out = String::new();
        for node in self.c().nodes() {
            let name = node.name();
            let log = self.c().agent_log(name);
            let lines: Vec<&str> = log.lines().collect();
            let tail = lines[lines.len().saturating_sub(40)..].join("\n");
            out += &format!("---- agent log of {name} (last 40 lines) ----\n{tail}\n");
            let dump = self
                .dump_cmd(name, &["--conntrack-limit", "40"])
                .unwrap_or_else(|e| format!("{e:#}"));
            out += &format!("---- lb-agent dump on {name} ----\n{dump}\n");
        }
        if let Source::Kube(k) = &self.source {
            for component in ["kube-apiserver", "kube-controller-manager"] {
                let tail = k.cp.log_tail(component, 15);
                out += &format!("---- {component} log (last 15 lines) ----\n{tail}\n");
            }
        }
        out
    }

    /// Runs `f` while tcpdump listens on every interface of each namespace in
    /// `namespaces` (with `filter`), and returns what it printed.
    pub fn capture(&self, namespaces: &[&str], filter: &str, f: impl FnOnce()) -> String {
        let mut running = Vec::new();
        let mut out = String::new();
        for ns in namespaces {
            match Capture::start(ns, filter) {
                Ok(c) => running.push(c),
                Err(e) => out += &format!("tcpdump in {ns}: {e:#}\n"),
            }
        }
        f();
        thread::sleep(Duration::from_millis(200));
        for c in running {
            out += &c.stop();
        }
        out
    }

    /// [`ask`], and if it fails or `expect` rejects the answer, the same
    /// request once more under tcpdump (the client's namespace and both
    /// nodes), the capture added to the error.
    pub fn ask_expect(
        &self,
        ns: &str,
        addr: SocketAddr,
        proto: Proto,
        expect: impl Fn(&Answer) -> Result<()>,
    ) -> Result<Answer> {
        let first = ask(ns, addr, proto).and_then(|a| expect(&a).map(|()| a));
        match first {
            Ok(a) => {
                self.passed();
                Ok(a)
            }
            Err(e) => {
                let mut again = String::new();
                let nodes: Vec<&str> = self.c().nodes().iter().map(|n| n.ns()).collect();
                let mut spaces = vec![ns];
                spaces.extend(nodes);
                let filter = format!(
                    "{} or icmp or icmp6",
                    if proto == Tcp { "tcp" } else { "udp" }
                );
                let cap = self.capture(&spaces, &filter, || {
                    again = match ask(ns, addr, proto) {
                        Ok(a) => format!("answered by {a}"),
                        Err(e) => format!("{e:#}"),
                    };
                });
                Err(e.context(format!(
                    "{proto} {ns} -> {addr}; again under tcpdump: {again}\n{cap}"
                )))
            }
        }
    }
}

/// A running tcpdump.
struct Capture {
    ns: String,
    child: std::process::Child,
    file: PathBuf,
}

impl Capture {
    fn start(ns: &str, filter: &str) -> Result<Self> {
        let file =
            std::env::temp_dir().join(format!("e2e-tcpdump-{}-{ns}.txt", std::process::id()));
        let out = fs::File::create(&file)?;
        let mut child = command_in(
            ns,
            "tcpdump",
            ["-i", "any", "-nn", "-l", "-c", "400", filter],
        )
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(Stdio::piped())
        .spawn()
        .context("starting tcpdump")?;
        let stderr = child.stderr.take().context("tcpdump stderr")?;
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(l) if l.contains("listening on") => break,
                Ok(_) => {}
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    bail!("tcpdump did not start listening within 3 s");
                }
            }
        }
        Ok(Capture {
            ns: ns.to_string(),
            child,
            file,
        })
    }

    fn stop(mut self) -> String {
        // SAFETY: signalling our own, not yet reaped child by its pid.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGINT) };
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                break;
            }
            thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let text = fs::read_to_string(&self.file).unwrap_or_default();
        let _ = fs::remove_file(&self.file);
        format!("---- tcpdump in {} ----\n{text}", self.ns)
    }
}

/// Polls `cond` every 50 ms until it holds, up to `limit`; returns how long
/// that took, or the last reason it did not hold.
pub fn wait_until(limit: Duration, mut cond: impl FnMut() -> Result<()>) -> Result<Duration> {
    let t = Instant::now();
    loop {
        match cond() {
            Ok(()) => return Ok(t.elapsed()),
            Err(e) if t.elapsed() >= limit => {
                return Err(e.context(format!("still so after {}", ms(t.elapsed()))));
            }
            Err(_) => thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// Counts answers by pod name.
pub fn tally_line(t: &BTreeMap<String, usize>) -> String {
    t.iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `n` requests with the real clients ([`ask`]: a new curl connection or a
/// new socat socket each) from `ns` to `addr`; the answering pods counted.
/// Any failure fails.
pub fn spread(
    ns: &str,
    addr: SocketAddr,
    proto: Proto,
    n: usize,
) -> Result<BTreeMap<String, usize>> {
    let mut t = BTreeMap::new();
    for i in 0..n {
        let who = ask(ns, addr, proto)
            .with_context(|| format!("{proto} {ns} -> {addr}, request {i} of {n}"))?;
        *t.entry(who.server).or_insert(0) += 1;
    }
    Ok(t)
}

/// A case of a suite: its name, and what checks it (a line saying what it
/// saw, or why it failed).
pub type Case = (&'static str, fn(&Env) -> Result<String>);

/// Runs `cases` in order on `env`, printing a line per case (`<suite> [i]
/// name ok: ...`, or FAILED with the evidence), then the tally; panics at the
/// end if any failed (the others still ran). `t0`: when the suite started.
///
/// `LB_E2E_CASES` (comma-separated case names), when set, runs only those
/// cases, for working on one; the tally says how many were left out.
pub fn run_cases(env: &Env, suite: &str, cases: &[Case], t0: Instant) {
    let only: Option<Vec<String>> = std::env::var("LB_E2E_CASES")
        .ok()
        .map(|v| v.split(',').map(|s| s.trim().to_string()).collect());
    let chosen = |name: &str| only.as_ref().is_none_or(|o| o.iter().any(|n| n == name));
    let left_out = cases.iter().filter(|(n, _)| !chosen(n)).count();
    if left_out > 0 {
        println!(
            "{suite}: LB_E2E_CASES leaves out {left_out} of {} cases",
            cases.len()
        );
    }
    let mut failed = Vec::new();
    for (i, (name, case)) in cases.iter().enumerate() {
        if !chosen(name) {
            continue;
        }
        let t = Instant::now();
        match case(env) {
            Ok(line) => println!(
                "{suite} [{}] {name} ok ({:.1}s): {line}",
                i + 1,
                t.elapsed().as_secs_f64()
            ),
            Err(e) => {
                println!(
                    "{suite} [{}] {name} FAILED ({:.1}s): {e:#}\n{}",
                    i + 1,
                    t.elapsed().as_secs_f64(),
                    env.evidence()
                );
                failed.push(*name);
            }
        }
    }
    let names: Vec<&str> = cases
        .iter()
        .map(|(n, _)| *n)
        .filter(|n| chosen(n))
        .collect();
    if failed.is_empty() {
        println!(
            "{suite}: {} checks passed ({}) in {:.1}s",
            env.checks(),
            names.join(", "),
            t0.elapsed().as_secs_f64()
        );
    } else {
        panic!(
            "{suite}: {} checks passed, {} of {} cases failed: {}",
            env.checks(),
            failed.len(),
            names.len(),
            failed.join(", ")
        );
    }
}
