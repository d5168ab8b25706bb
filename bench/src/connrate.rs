//! Connection rate: short-lived TCP connections per second from the client
//! namespace to the NodePort (192.0.2.1:30080), real TCP stacks at both ends
//! (the backend namespace answers on every pod address: accept, write 3 bytes,
//! close), through lb and through kube-proxy's iptables mode, with error
//! counts. Same topology as [`crate::forwarding`], `xdp_pass` on the hosts'
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
    forwarding::{NODE_IP, NODE_PORT, Topology},
};

const CLIENTS: usize = 4;
const SECTION: &str = "Connection rate (short TCP connections through a NodePort)";

pub fn keys() -> Vec<String> {
    let mut k = Vec::new();
    for m in ["lb", "iptables"] {
        k.push(format!("connrate.{m}.cps"));
        k.push(format!("connrate.{m}.errors"));
    }
    k.push("connrate.lb_vs_iptables".into());
    k
}

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
    let target = SocketAddr::from((NODE_IP, NODE_PORT));
    let (mut lb_cps, mut lb_err, mut ipt_cps, mut ipt_err, mut ratio) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut error_notes = Vec::new();
    for round in 0..rounds {
        let agent = topo.start_agent(agent_bin, &dir, &format!("cr-agent-{round}"))?;
        let r = load(&topo.cli, target, secs);
        let drops = datapath_drops(agent_bin, &agent.pin);
        agent.stop();
        topo.flush_rules()?;
        let lb = r.context("lb")?;
        topo.load_iptables()?;
        let r = load(&topo.cli, target, secs);
        topo.flush_rules()?;
        let ipt = r.context("iptables")?;
        error_notes.push(format!(
            "round {}: lb errors: {} (datapath drops: {drops}); iptables errors: {}",
            round + 1,
            lb.error_kinds(),
            ipt.error_kinds()
        ));
        lb_cps.push(lb.cps);
        lb_err.push(lb.error_count() as f64);
        ipt_cps.push(ipt.cps);
        ipt_err.push(ipt.error_count() as f64);
        ratio.push(lb.cps / ipt.cps);
    }
    let figs = vec![
        Figure::new(SECTION, "connrate.lb.cps", "lb", "conn/s", lb_cps),
        Figure::new(SECTION, "connrate.lb.errors", "  lb errors", "", lb_err)
            .target(Target::AtMost(0.0)),
        Figure::new(
            SECTION,
            "connrate.iptables.cps",
            "kube-proxy iptables",
            "conn/s",
            ipt_cps,
        ),
        Figure::new(
            SECTION,
            "connrate.iptables.errors",
            "  iptables errors",
            "",
            ipt_err,
        ),
        Figure::new(
            SECTION,
            "connrate.lb_vs_iptables",
            "lb / iptables",
            "x",
            ratio,
        )
        .target(Target::AtLeast(1.0)),
    ];
    let mut notes = vec![format!(
        "Connection rate: {CLIENTS} client threads, each connect → read the 3-byte answer to EOF \
         → close, for {secs} s per mode and round ({rounds} rounds, lb then iptables); errors = \
         failed connects or reads (1 s timeouts). Client, balancer softirq and servers share the \
         machine's 2 vCPUs. The servers close first and keep no TIME_WAIT sockets \
         (tcp_max_tw_buckets=0), so that one round's connections cannot stall the next's."
    )];
    notes.extend(error_notes);
    Ok((figs, notes))
}
