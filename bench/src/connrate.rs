//! Connection rate: short-lived TCP connections per second, real TCP stacks
//! at both ends (the backend namespace answers on every pod address: accept,
//! write 3 bytes, close), with error counts: from the client namespace to the
//! NodePort (192.0.2.1:30080) through lb's XDP hook, its tc hook and
//! kube-proxy's iptables mode; and from the balancer's own namespace (a
//! node's process) to the ClusterIP through lb's socket programs and
//! kube-proxy's OUTPUT rules, beside the same client straight to a pod. Same topology as [`crate::forwarding`], `xdp_pass` on the hosts'
//! veths (lb redirects into them); each mode runs a bounded time per round.

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use lb_testbed::xdp;

use crate::{
    Figure, Target,
    forwarding::{NODE_IP, NODE_PORT, Topology, VIP, pod},
};

const CLIENTS: usize = 4;
const SECTION: &str =
    "Connection rate (short TCP connections: through a NodePort, and from the node to a ClusterIP)";

/// The backend servers: accept, write, close (the server closes first, so
/// TIME_WAIT stays on its side, not on the client's ports).
struct Server {
    stop: Arc<AtomicBool>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl Server {
    fn start(ns: &str) -> Result<Self> {
        let listener = lb_testbed::try_in_netns(ns, || -> Result<TcpListener> {
            let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
            sock.set_reuse_address(true)?;
            sock.bind(&SocketAddr::from(([0, 0, 0, 0], 8080)).into())?;
            sock.listen(4096)?;
            // accept() returns EAGAIN after this, so the threads see `stop`.
            sock.set_read_timeout(Some(Duration::from_millis(100)))?;
            Ok(sock.into())
        })??;
        let stop = Arc::new(AtomicBool::new(false));
        let listener = Arc::new(listener);
        let threads = (0..2)
            .map(|_| {
                let (l, s) = (listener.clone(), stop.clone());
                thread::spawn(move || {
                    while !s.load(Ordering::Relaxed) {
                        if let Ok((mut c, _)) = l.accept() {
                            let _ = c.write_all(b"ok\n");
                        }
                    }
                })
            })
            .collect();
        Ok(Self { stop, threads })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// What one mode's load did: connections per second, and failures by kind.
struct Load {
    cps: f64,
    errors: BTreeMap<String, u64>,
}

impl Load {
    fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    /// "3 × connection timed out, 1 × short answer" (or "none").
    fn error_kinds(&self) -> String {
        if self.errors.is_empty() {
            return "none".into();
        }
        let kinds: Vec<String> = self
            .errors
            .iter()
            .map(|(k, n)| format!("{n} × {k}"))
            .collect();
        kinds.join(", ")
    }
}

/// Opens and closes connections for `secs`.
fn load(ns: &str, target: SocketAddr, secs: f64) -> Result<Load> {
    let ok = Arc::new(AtomicU64::new(0));
    let err = Arc::new(Mutex::new(BTreeMap::<String, u64>::new()));
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let t0 = Instant::now();
    let handles: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (ok, err, ns) = (ok.clone(), err.clone(), ns.to_string());
            thread::spawn(move || {
                lb_testbed::try_in_netns(&ns, || {
                    while Instant::now() < deadline {
                        let r = (|| -> std::io::Result<()> {
                            let mut s =
                                TcpStream::connect_timeout(&target, Duration::from_secs(1))?;
                            s.set_read_timeout(Some(Duration::from_secs(1)))?;
                            let mut buf = [0u8; 8];
                            let mut got = 0;
                            loop {
                                let n = s.read(&mut buf[got..])?;
                                if n == 0 {
                                    break;
                                }
                                got += n;
                            }
                            if got == 3 {
                                Ok(())
                            } else {
                                Err(std::io::Error::other("short answer"))
                            }
                        })();
                        match r {
                            Ok(()) => {
                                ok.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(e) => {
                                let mut kinds = err.lock().unwrap_or_else(|p| p.into_inner());
                                *kinds.entry(e.kind().to_string()).or_default() += 1;
                            }
                        }
                    }
                })
            })
        })
        .collect();
    for h in handles {
        let _ = h.join();
    }
    let took = t0.elapsed().as_secs_f64();
    let errors = std::mem::take(&mut *err.lock().unwrap_or_else(|p| p.into_inner()));
    Ok(Load {
        cps: ok.load(Ordering::Relaxed) as f64 / took,
        errors,
    })
}

/// The datapath's drop counters with packets, as `reason: packets, ...` (from
/// `lb-agent dump --json`), to tell what a failed connection ran into.
fn datapath_drops(agent_bin: &Path, pin: &Path) -> String {
    let out = std::process::Command::new(agent_bin)
        .args(["dump", "--json", "--conntrack-limit", "0", "--pin-path"])
        .arg(pin)
        .output();
    let dump: serde_json::Value = match out {
        Ok(o) if o.status.success() => match serde_json::from_slice(&o.stdout) {
            Ok(v) => v,
            Err(e) => return format!("unreadable dump: {e}"),
        },
        Ok(o) => return format!("dump failed: {}", String::from_utf8_lossy(&o.stderr).trim()),
        Err(e) => return format!("dump failed: {e}"),
    };
    let mut drops = Vec::new();
    if let Some(reasons) = dump["reasons"].as_object() {
        for (name, c) in reasons {
            let packets = c["packets"].as_u64().unwrap_or(0);
            if name.starts_with("drop") && packets > 0 {
                drops.push(format!("{name}: {packets}"));
            }
        }
    }
    let drops = if drops.is_empty() {
        "none".into()
    } else {
        drops.join(", ")
    };
    format!(
        "{drops}; {} conntrack entries",
        dump["conntrack"]["entries"].as_u64().unwrap_or(0)
    )
}

/// A way of balancing under test: who connects to what, through which hook.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// The client to the NodePort, lb with XDP on the uplinks.
    Lb,
    /// The same, lb with its tc hook (`--uplink-hook tc`, as on veth uplinks).
    LbTc,
    /// The same through kube-proxy's iptables rules.
    Iptables,
    /// A client in the balancer's own namespace (a node's process, a
    /// hostNetwork pod) to the ClusterIP, lb's socket programs.
    LbSocket,
    /// The same through kube-proxy's iptables rules (its OUTPUT chain).
    IptablesLocal,
    /// The same client straight to a pod address: no balancer at all.
    Direct,
}

impl Mode {
    const ALL: [Self; 6] = [
        Self::Lb,
        Self::LbTc,
        Self::Iptables,
        Self::LbSocket,
        Self::IptablesLocal,
        Self::Direct,
    ];

    fn key(self) -> &'static str {
        match self {
            Self::Lb => "lb",
            Self::LbTc => "lb_tc",
            Self::Iptables => "iptables",
            Self::LbSocket => "lb_socket",
            Self::IptablesLocal => "iptables_local",
            Self::Direct => "direct",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Self::Lb => "lb (XDP), client -> NodePort",
            Self::LbTc => "lb (tc), client -> NodePort",
            Self::Iptables => "kube-proxy iptables, client -> NodePort",
            Self::LbSocket => "lb (socket), node -> ClusterIP",
            Self::IptablesLocal => "kube-proxy iptables, node -> ClusterIP",
            Self::Direct => "no balancer, node -> pod",
        }
    }

    /// The agent's `--uplink-hook`, for the modes that run lb.
    fn hook(self) -> Option<&'static str> {
        match self {
            Self::Lb | Self::LbSocket => Some("xdp"),
            Self::LbTc => Some("tc"),
            _ => None,
        }
    }

    fn node_local(self) -> bool {
        matches!(self, Self::LbSocket | Self::IptablesLocal | Self::Direct)
    }

    fn target(self) -> SocketAddr {
        match self {
            Self::Lb | Self::LbTc | Self::Iptables => SocketAddr::from((NODE_IP, NODE_PORT)),
            Self::LbSocket | Self::IptablesLocal => SocketAddr::from((VIP, 80)),
            Self::Direct => SocketAddr::from((pod(1), 8080)),
        }
    }
}

/// The ratios shown: (key, label, numerator, denominator).
const RATIOS: [(&str, &str, Mode, Mode); 4] = [
    (
        "lb_vs_iptables",
        "lb (XDP) / iptables, NodePort",
        Mode::Lb,
        Mode::Iptables,
    ),
    (
        "tc_vs_xdp",
        "lb's tc hook / its XDP hook, NodePort",
        Mode::LbTc,
        Mode::Lb,
    ),
    (
        "socket_vs_iptables",
        "lb (socket) / iptables, node -> ClusterIP",
        Mode::LbSocket,
        Mode::IptablesLocal,
    ),
    (
        "socket_vs_direct",
        "lb (socket) / no balancer, node-local",
        Mode::LbSocket,
        Mode::Direct,
    ),
];

pub fn keys() -> Vec<String> {
    let mut k = Vec::new();
    for m in Mode::ALL {
        k.push(format!("connrate.{}.cps", m.key()));
        k.push(format!("connrate.{}.errors", m.key()));
    }
    for (key, ..) in RATIOS {
        k.push(format!("connrate.{key}"));
    }
    k
}

pub fn run(quick: bool, agent_bin: &Path) -> Result<(Vec<Figure>, Vec<String>)> {
    ensure!(
        agent_bin.exists(),
        "no lb-agent binary at {}",
        agent_bin.display()
    );
    let rounds = if quick { 1 } else { 3 };
    let secs = if quick { 2.0 } else { 5.0 };
    let topo = Topology::build("cr")?;
    // No TIME_WAIT sockets on the servers. Each round opens tens of thousands of
    // connections from a few thousand (SNAT) source ports; TIME_WAIT (60 s) would
    // carry them into the next rounds and modes, where a SYN meeting one is taken
    // for an old duplicate and stalls for a 1 s retransmission: the figure would
    // measure the order of the rounds, not the balancer.
    lb_testbed::sysctl_in(&topo.be, &["net.ipv4.tcp_max_tw_buckets=0"])?;
    let dir = topo.run_dir().join("manifests");
    Topology::write_manifests(&dir)?;
    let _c0 = xdp::attach(&topo.cli, "xdp_pass", &["c0".to_string()])?;
    let _s0 = xdp::attach(&topo.be, "xdp_pass", &["s0".to_string()])?;
    let _server = Server::start(&topo.be)?;
    let mut cps: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    let mut errors: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    let mut ratios: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    let mut error_notes = Vec::new();
    for round in 0..rounds {
        let mut this: BTreeMap<&str, f64> = BTreeMap::new();
        let mut line = Vec::new();
        for mode in Mode::ALL {
            // lb's tc hook on b0 needs b0 to take the client's XDP_TX frames.
            let _pass = (mode == Mode::LbTc)
                .then(|| xdp::attach(&topo.lb, "xdp_pass", &["b0".to_string()]))
                .transpose()?;
            let agent = match mode.hook() {
                Some(hook) => Some(topo.start_agent(
                    agent_bin,
                    &dir,
                    &format!("cr-agent-{}-{round}", mode.key()),
                    hook,
                )?),
                None => None,
            };
            if matches!(mode, Mode::Iptables | Mode::IptablesLocal) {
                topo.load_iptables()?;
            }
            let ns = if mode.node_local() {
                &topo.lb
            } else {
                &topo.cli
            };
            let r = load(ns, mode.target(), secs);
            let drops = agent.as_ref().map(|a| datapath_drops(agent_bin, &a.pin));
            if let Some(a) = agent {
                a.stop();
            }
            topo.flush_rules()?;
            let r = r.with_context(|| mode.label())?;
            line.push(format!(
                "{}: {}{}",
                mode.key(),
                r.error_kinds(),
                drops
                    .map(|d| format!(" (datapath drops: {d})"))
                    .unwrap_or_default()
            ));
            cps.entry(mode.key()).or_default().push(r.cps);
            errors
                .entry(mode.key())
                .or_default()
                .push(r.error_count() as f64);
            this.insert(mode.key(), r.cps);
        }
        for (key, _, a, b) in RATIOS {
            ratios
                .entry(key)
                .or_default()
                .push(this[a.key()] / this[b.key()]);
        }
        error_notes.push(format!("round {}: errors: {}", round + 1, line.join("; ")));
    }
    let mut figs = Vec::new();
    for mode in Mode::ALL {
        figs.push(Figure::new(
            SECTION,
            &format!("connrate.{}.cps", mode.key()),
            mode.label(),
            "conn/s",
            cps[mode.key()].clone(),
        ));
        let errs = Figure::new(
            SECTION,
            &format!("connrate.{}.errors", mode.key()),
            "  errors",
            "",
            errors[mode.key()].clone(),
        );
        figs.push(if mode.hook().is_some() {
            errs.target(Target::AtMost(0.0))
        } else {
            errs
        });
    }
    for (key, label, a, _) in RATIOS {
        let f = Figure::new(
            SECTION,
            &format!("connrate.{key}"),
            label,
            "x",
            ratios[key].clone(),
        );
        figs.push(
            if matches!(a, Mode::Lb | Mode::LbSocket) && key.ends_with("iptables") {
                f.target(Target::AtLeast(1.0))
            } else {
                f
            },
        );
    }
    let mut notes = vec![format!(
        "Connection rate: {CLIENTS} client threads, each connect → read the 3-byte answer to EOF \
         → close, for {secs} s per mode and round ({rounds} rounds, modes in turn: {}); errors = \
         failed connects or reads (1 s timeouts). Client, balancer softirq and servers share the \
         machine's 2 vCPUs. The servers close first and keep no TIME_WAIT sockets \
         (tcp_max_tw_buckets=0), so that one round's connections cannot stall the next's. \
         Node-local modes connect from the balancer's own namespace, as a node's process or a \
         hostNetwork pod does: lb's socket programs pick the backend at connect, no packet is \
         translated.",
        Mode::ALL.map(Mode::label).join("; ")
    )];
    notes.extend(error_notes);
    Ok((figs, notes))
}
