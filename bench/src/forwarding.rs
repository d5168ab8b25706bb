//! Forwarding rate: 64-byte frames (60 bytes + FCS on a wire) from a client
//! namespace, through a balancer namespace, to a backend namespace whose XDP
//! sink counts what arrives.
//!
//! ```text
//!  cli: c0 192.0.2.2 ──veth── b0 192.0.2.1  lb  b1 203.0.113.1 ──veth── s0 203.0.113.2  be
//!                              (NodePort 192.0.2.1:30080,                  (pods 10.244.1.1-10,
//!                               ClusterIP 10.96.0.10:80, UDP)               xdp_sink on s0)
//! ```
//!
//! The generator is `bench_gen` run with BPF_PROG_RUN live frames on `c0`: it
//! rewrites the whole frame each time and varies the source port over 1 or
//! 10,000 flows; XDP_TX puts the frame on the wire to `b0`. Generator and the
//! balancer's softirq share one pinned CPU. Modes, interleaved per round:
//! lb (`lb-agent run --manifests`, XDP on b0/b1), lb with its tc hook on the
//! uplinks (`--uplink-hook tc`, as on veth uplinks), a minimal no-NAT XDP forwarder
//! (`bench_fwd`: fib lookup + redirect, frames sent straight to a pod address),
//! plain kernel routing (same frames), kube-proxy's iptables mode and its
//! nftables mode (rules from [`crate::kubeproxy`]). Kernel modes and lb's tc
//! mode run `xdp_pass` on b0, which a veth needs to take XDP_TX frames from
//! its peer.

use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::Path,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use aya::{
    Ebpf,
    maps::{Array, MapData, xdp::DevMapHash},
    programs::{Xdp, xdp::XdpMode},
};
use lb_testbed::{Scope, command_in, ifindex, ip, output_with_input, packet, test_run, xdp};

use crate::{
    BENCH_OBJECT, Figure, Target,
    agent::LbAgent,
    cpu,
    kubeproxy::{self, NodeFacts, Svc},
    perpacket::{Template, Vary},
    report::median,
};

pub const C0_MAC: [u8; 6] = [2, 0xbb, 0, 0, 0, 2];
pub const B0_MAC: [u8; 6] = [2, 0xbb, 0, 0, 0, 1];
pub const B1_MAC: [u8; 6] = [2, 0xbb, 0, 0, 1, 1];
pub const S0_MAC: [u8; 6] = [2, 0xbb, 0, 0, 1, 2];
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
pub const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
pub const NODE_PORT: u16 = 30080;
pub const PODS: u8 = 10;

fn mac(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

pub fn pod(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, 1, i)
}

/// The three namespaces.
pub struct Topology {
    pub cli: String,
    pub lb: String,
    pub be: String,
    scope: Scope,
}

impl Topology {
    pub fn build(tag: &str) -> Result<Self> {
        let scope = Scope::new()?;
        let cli = scope.add_netns(&format!("{tag}-cli"), &[])?;
        let lb = scope.add_netns(&format!("{tag}-lb"), &[])?;
        let be = scope.add_netns(&format!("{tag}-be"), &[])?;
        let (c, l, b) = (Some(cli.as_str()), Some(lb.as_str()), Some(be.as_str()));
        ip(
            l,
            &format!(
                "link add b0 address {} type veth peer name c0 netns {cli} address {}",
                mac(B0_MAC),
                mac(C0_MAC)
            ),
        )?;
        ip(
            l,
            &format!(
                "link add b1 address {} type veth peer name s0 netns {be} address {}",
                mac(B1_MAC),
                mac(S0_MAC)
            ),
        )?;
        for (n, dev) in [(l, "b0"), (l, "b1"), (c, "c0"), (b, "s0")] {
            ip(n, &format!("link set {dev} up"))?;
        }
        ip(c, "addr add 192.0.2.2/24 dev c0")?;
        ip(l, "addr add 192.0.2.1/24 dev b0")?;
        ip(l, "addr add 203.0.113.1/24 dev b1")?;
        ip(b, "addr add 203.0.113.2/24 dev s0")?;
        for i in 1..=PODS {
            ip(b, &format!("addr add {}/32 dev s0", pod(i)))?;
        }
        ip(c, "route add default via 192.0.2.1")?;
        ip(b, "route add default via 203.0.113.1")?;
        ip(l, "route add 10.244.1.0/24 via 203.0.113.2")?;
        // A node's default route: the kernel routes a node's own connection
        // to a ClusterIP before kube-proxy's OUTPUT rules rewrite it.
        ip(l, "route add default via 203.0.113.2")?;
        ip(
            c,
            &format!(
                "neigh add 192.0.2.1 lladdr {} dev c0 nud permanent",
                mac(B0_MAC)
            ),
        )?;
        ip(
            l,
            &format!(
                "neigh add 192.0.2.2 lladdr {} dev b0 nud permanent",
                mac(C0_MAC)
            ),
        )?;
        ip(
            l,
            &format!(
                "neigh add 203.0.113.2 lladdr {} dev b1 nud permanent",
                mac(S0_MAC)
            ),
        )?;
        ip(
            b,
            &format!(
                "neigh add 203.0.113.1 lladdr {} dev s0 nud permanent",
                mac(B1_MAC)
            ),
        )?;
        lb_testbed::sysctl_in(
            &lb,
            &[
                "net.ipv4.ip_forward=1",
                "net.ipv4.conf.all.rp_filter=0",
                "net.ipv4.conf.default.rp_filter=0",
                "net.ipv4.conf.b0.rp_filter=0",
                "net.ipv4.conf.b1.rp_filter=0",
            ],
        )?;
        lb_testbed::sysctl_in(
            &cli,
            &[
                "net.ipv4.ip_local_port_range=1024 65000",
                "net.ipv4.tcp_tw_reuse=1",
            ],
        )?;
        // Uplinks deliver complete checksums to XDP (as NICs do): no offloaded
        // (partial) checksums from the hosts at either end.
        for (ns, dev) in [(&cli, "c0"), (&be, "s0")] {
            lb_testbed::run(&mut command_in(ns, "ethtool", ["-K", dev, "tx", "off"]))?;
        }
        Ok(Self { cli, lb, be, scope })
    }

    /// Where the part's files go (removed with the namespaces).
    pub fn run_dir(&self) -> &Path {
        self.scope.run_dir()
    }

    /// The manifests the agent reads: one NodePort Service (UDP and TCP port
    /// 80, NodePort 30080) with 10 ready pods on another node.
    pub fn write_manifests(dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir)?;
        let mut eps = String::new();
        for i in 1..=PODS {
            eps.push_str(&format!(
                "  - addresses: [\"{}\"]\n    conditions: {{ready: true, serving: true, terminating: false}}\n    nodeName: node-b\n",
                pod(i)
            ));
        }
        let yaml = format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  namespace: default\nspec:\n  type: NodePort\n  clusterIP: {VIP}\n  clusterIPs: [{VIP}]\n  ipFamilies: [IPv4]\n  ipFamilyPolicy: SingleStack\n  externalTrafficPolicy: Cluster\n  ports:\n  - name: udp\n    port: 80\n    protocol: UDP\n    targetPort: 8080\n    nodePort: {NODE_PORT}\n  - name: tcp\n    port: 80\n    protocol: TCP\n    targetPort: 8080\n    nodePort: {NODE_PORT}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-1\n  namespace: default\n  labels:\n    kubernetes.io/service-name: web\naddressType: IPv4\nendpoints:\n{eps}ports:\n- name: udp\n  port: 8080\n  protocol: UDP\n- name: tcp\n  port: 8080\n  protocol: TCP\n"
        );
        std::fs::write(dir.join("web.yaml"), yaml)?;
        Ok(())
    }

    /// Starts lb-agent on the balancer and waits for its first sync.
    /// Starts lb-agent in the balancer with `hook` (`--uplink-hook`) on b0
    /// and b1.
    pub fn start_agent(
        &self,
        bin: &Path,
        dir: &Path,
        role: &str,
        hook: &str,
    ) -> Result<LbAgent<'_>> {
        let args: Vec<String> = [
            "run",
            "--manifests",
            &dir.display().to_string(),
            "--node-name",
            "node-a",
            "--iface",
            "b0,b1",
            // xdp: the peers run XDP (generator, sink), so the uplinks act
            // as NICs; tc: the hook veth uplinks get.
            "--uplink-hook",
            hook,
            "--node-ip",
            "192.0.2.1",
            "--metrics-addr",
            "127.0.0.1:10249",
            "--healthz-addr",
            "127.0.0.1:10256",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let agent = LbAgent::start(&self.scope, bin, &self.lb, role, &args)?;
        agent.wait_for("first sync done", Duration::from_secs(30))?;
        Ok(agent)
    }

    fn rules(&self) -> (Vec<Svc>, NodeFacts) {
        let eps: Vec<SocketAddrV4> = (1..=PODS)
            .map(|i| SocketAddrV4::new(pod(i), 8080))
            .collect();
        let svc = |proto, port_name: &str| Svc {
            namespace: "default".into(),
            name: "web".into(),
            port_name: port_name.into(),
            cluster_ip: VIP,
            port: 80,
            proto,
            node_port: Some(NODE_PORT),
            endpoints: eps.clone(),
        };
        (
            vec![svc("udp", "udp"), svc("tcp", "tcp")],
            NodeFacts {
                pod_cidr: "10.244.0.0/16".into(),
                service_cidr: "10.96.0.0/12".into(),
                node_ips: vec![NODE_IP],
            },
        )
    }

    /// Loads kube-proxy's iptables rules into the balancer.
    pub fn load_iptables(&self) -> Result<()> {
        let (svcs, node) = self.rules();
        let out = output_with_input(
            &mut command_in(&self.lb, "iptables-restore", ["-w", "--noflush"]),
            Some(kubeproxy::iptables_restore(&svcs, &node).into_bytes()),
            Duration::from_secs(30),
        )?;
        ensure!(
            out.status.success(),
            "iptables-restore: {}",
            out.stderr.trim()
        );
        Ok(())
    }

    /// Loads kube-proxy's nftables rules into the balancer.
    pub fn load_nft(&self) -> Result<()> {
        let (svcs, node) = self.rules();
        let out = output_with_input(
            &mut command_in(&self.lb, "nft", ["-f", "-"]),
            Some(kubeproxy::nft_script(&svcs, &node).into_bytes()),
            Duration::from_secs(30),
        )?;
        ensure!(out.status.success(), "nft -f: {}", out.stderr.trim());
        Ok(())
    }

    /// Removes every netfilter rule from the balancer (and its conntrack state).
    pub fn flush_rules(&self) -> Result<()> {
        for t in ["nat", "filter"] {
            for flag in ["-F", "-X"] {
                let _ =
                    lb_testbed::run(&mut command_in(&self.lb, "iptables", ["-w", "-t", t, flag]));
            }
        }
        lb_testbed::run(&mut command_in(&self.lb, "nft", ["flush", "ruleset"]))?;
        Ok(())
    }
}

/// A mode under test.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Lb,
    LbTc,
    XdpFwd,
    Kernel,
    Iptables,
    Nftables,
}

impl Mode {
    const ALL: [Self; 6] = [
        Self::Lb,
        Self::LbTc,
        Self::XdpFwd,
        Self::Kernel,
        Self::Iptables,
        Self::Nftables,
    ];

    fn key(self) -> &'static str {
        match self {
            Self::Lb => "lb",
            Self::LbTc => "lb_tc",
            Self::XdpFwd => "xdp_fwd",
            Self::Kernel => "kernel",
            Self::Iptables => "iptables",
            Self::Nftables => "nftables",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Self::Lb => "lb",
            Self::LbTc => "lb, tc hook",
            Self::XdpFwd => "no-NAT XDP forwarder",
            Self::Kernel => "kernel routing",
            Self::Iptables => "kube-proxy iptables",
            Self::Nftables => "kube-proxy nftables",
        }
    }

    /// Destinations the mode is measured to.
    fn targets(self) -> &'static [&'static str] {
        match self {
            Self::XdpFwd | Self::Kernel => &["pod"],
            _ => &["nodeport", "vip"],
        }
    }
}

const FLOWS: [u32; 2] = [1, 10_000];

pub fn keys() -> Vec<String> {
    let mut k = Vec::new();
    for m in Mode::ALL {
        for t in m.targets() {
            for f in FLOWS {
                k.push(format!("forwarding.{}.{t}.{f}.pps", m.key()));
                k.push(format!("forwarding.{}.{t}.{f}.drop_pct", m.key()));
            }
        }
    }
    for t in ["nodeport", "vip"] {
        k.push(format!("forwarding.lb_vs_iptables.{t}.10000"));
        k.push(format!("forwarding.lb_vs_xdp_fwd.{t}.10000"));
        k.push(format!("forwarding.tc_vs_xdp.{t}.10000"));
    }
    k
}

/// The live-frames generator in the client namespace.
struct Generator {
    bench: Ebpf,
    tmpl: Array<MapData, Template>,
    ifindex: u32,
}

impl Generator {
    fn new() -> Result<Self> {
        let mut bench = Ebpf::load(BENCH_OBJECT).context("loading the bench object")?;
        let p: &mut Xdp = bench
            .program_mut("bench_gen")
            .context("bench_gen")?
            .try_into()?;
        p.load().context("loading bench_gen")?;
        let tmpl = Array::try_from(bench.take_map("bench_tmpl").context("bench_tmpl")?)?;
        Ok(Self {
            bench,
            tmpl,
            ifindex: ifindex("c0")?,
        })
    }

    /// Sends `count` frames of `frame` over `flows` flows; returns the wall time.
    fn send(&mut self, frame: &[u8], flows: u32, count: u32) -> Result<Duration> {
        self.tmpl
            .set(0, Template::new(frame, Vary::Port as u32, flows)?, 0)?;
        let prog: &Xdp = self
            .bench
            .program("bench_gen")
            .context("bench_gen")?
            .try_into()?;
        let t = Instant::now();
        test_run::xdp_live_frames(prog, frame, self.ifindex, count, 64)?;
        Ok(t.elapsed())
    }
}

/// One measurement: frames sent and delivered, and how long sending took.
struct Sample {
    pps: f64,
    drop_pct: f64,
}

fn measure(
    gen_ns: &str,
    generator: &mut Option<Generator>,
    sink: &xdp::Attached,
    frame: &[u8],
    flows: u32,
    secs: f64,
) -> Result<Sample> {
    let frame = frame.to_vec();
    let cpu = cpu::bench_cpu();
    let g = generator.take();
    // The generator lives on a thread in the client namespace, pinned.
    let (g, warm, counts, took) = lb_testbed::try_in_netns(gen_ns, move || -> Result<_> {
        cpu::pin_thread(cpu)?;
        let mut g = match g {
            Some(g) => g,
            None => Generator::new()?,
        };
        // Warm-up: opens every flow (so the figure is the steady state) and
        // calibrates the count for `secs`.
        let warm_n = 20_000u32.max(flows * 3);
        let wt = g.send(&frame, flows, warm_n)?;
        let rate = f64::from(warm_n) / wt.as_secs_f64().max(1e-3);
        let n = ((rate * secs) as u64).clamp(50_000, 30_000_000) as u32;
        thread::sleep(Duration::from_millis(20));
        let before = sink_packets(sink)?;
        let took = g.send(&frame, flows, n)?;
        thread::sleep(Duration::from_millis(30));
        let after = sink_packets(sink)?;
        Ok((g, rate, (n, after - before), took))
    })??;
    let _ = warm;
    *generator = Some(g);
    let (sent, delivered) = counts;
    Ok(Sample {
        pps: delivered as f64 / took.as_secs_f64(),
        drop_pct: 100.0 * (f64::from(sent) - delivered as f64).max(0.0) / f64::from(sent),
    })
}

fn sink_packets(sink: &xdp::Attached) -> Result<u64> {
    Ok(sink.sink_counters()?.0)
}

fn frame_to(dst: SocketAddr) -> Vec<u8> {
    // 60 bytes: the minimum Ethernet frame, as on a wire less its FCS.
    packet::padded(
        packet::udp(
            (C0_MAC, B0_MAC),
            SocketAddr::from((CLIENT_IP, 10_000)),
            dst,
            &[0; 10],
        ),
        60,
    )
}

fn target_addr(t: &str) -> SocketAddr {
    match t {
        "nodeport" => SocketAddr::from((NODE_IP, NODE_PORT)),
        "vip" => SocketAddr::from((VIP, 80)),
        _ => SocketAddr::from((pod(1), 8080)),
    }
}

/// The no-NAT forwarder attached to b0 (redirecting to b1).
struct Forwarder {
    _bench: Ebpf,
}

fn attach_forwarder(lb_ns: &str) -> Result<Forwarder> {
    lb_testbed::try_in_netns(lb_ns, || -> Result<Forwarder> {
        let mut bench = Ebpf::load(BENCH_OBJECT).context("loading the bench object")?;
        let mut ports =
            DevMapHash::try_from(bench.take_map("bench_ports").context("bench_ports")?)?;
        for dev in ["b0", "b1"] {
            let i = ifindex(dev)?;
            ports.insert(i, i, None, 0)?;
        }
        let p: &mut Xdp = bench
            .program_mut("bench_fwd")
            .context("bench_fwd")?
            .try_into()?;
        p.load().context("loading bench_fwd")?;
        p.attach("b0", XdpMode::default())
            .context("attaching bench_fwd to b0")?;
        // Keep the devmap alive with the program.
        std::mem::forget(ports);
        Ok(Forwarder { _bench: bench })
    })?
}

pub fn run(quick: bool, agent_bin: &Path) -> Result<(Vec<Figure>, Vec<String>)> {
    ensure!(
        agent_bin.exists(),
        "no lb-agent binary at {} (cargo build --release -p lb-agent)",
        agent_bin.display()
    );
    let rounds = if quick { 2 } else { 3 };
    let secs = if quick { 0.3 } else { 1.0 };
    let topo = Topology::build("fw")?;
    let dir = topo.run_dir().join("manifests");
    Topology::write_manifests(&dir)?;
    let sink = xdp::attach(&topo.be, "xdp_sink", &["s0".to_string()])?;
    let mut generator: Option<Generator> = None;
    // (mode, target, flows) -> samples
    let mut pps: std::collections::BTreeMap<(usize, &str, u32), Vec<f64>> = Default::default();
    let mut drops: std::collections::BTreeMap<(usize, &str, u32), Vec<f64>> = Default::default();
    let mut ratio_ipt: std::collections::BTreeMap<&str, Vec<f64>> = Default::default();
    let mut ratio_fwd: std::collections::BTreeMap<&str, Vec<f64>> = Default::default();
    let mut ratio_tc: std::collections::BTreeMap<&str, Vec<f64>> = Default::default();
    for round in 0..rounds {
        let mut this: std::collections::BTreeMap<(usize, &str, u32), f64> = Default::default();
        for (mi, mode) in Mode::ALL.iter().enumerate() {
            // Set the mode up.
            let mut agent = None;
            let mut pass = None;
            let mut fwd = None;
            match mode {
                Mode::Lb => {
                    agent = Some(topo.start_agent(
                        agent_bin,
                        &dir,
                        &format!("fw-agent-{round}"),
                        "xdp",
                    )?)
                }
                Mode::LbTc => {
                    pass = Some(xdp::attach(&topo.lb, "xdp_pass", &["b0".to_string()])?);
                    agent = Some(topo.start_agent(
                        agent_bin,
                        &dir,
                        &format!("fw-agent-tc-{round}"),
                        "tc",
                    )?)
                }
                Mode::XdpFwd => fwd = Some(attach_forwarder(&topo.lb)?),
                Mode::Kernel => {
                    pass = Some(xdp::attach(&topo.lb, "xdp_pass", &["b0".to_string()])?)
                }
                Mode::Iptables => {
                    pass = Some(xdp::attach(&topo.lb, "xdp_pass", &["b0".to_string()])?);
                    topo.load_iptables()?;
                }
                Mode::Nftables => {
                    pass = Some(xdp::attach(&topo.lb, "xdp_pass", &["b0".to_string()])?);
                    topo.load_nft()?;
                }
            }
            let result = (|| -> Result<()> {
                for t in mode.targets() {
                    for f in FLOWS {
                        let s = measure(
                            &topo.cli,
                            &mut generator,
                            &sink,
                            &frame_to(target_addr(t)),
                            f,
                            secs,
                        )?;
                        if s.pps < 1.0 {
                            bail!(
                                "{}: nothing reached the backends ({t}, {f} flows)",
                                mode.label()
                            );
                        }
                        pps.entry((mi, t, f)).or_default().push(s.pps);
                        drops.entry((mi, t, f)).or_default().push(s.drop_pct);
                        this.insert((mi, t, f), s.pps);
                    }
                }
                Ok(())
            })();
            if let Some(a) = agent {
                a.stop();
            }
            drop(pass);
            drop(fwd);
            topo.flush_rules()?;
            result?;
        }
        let at = |mode: Mode, t: &str| {
            let mi = Mode::ALL.iter().position(|m| *m == mode).expect("a mode");
            this[&(mi, t, 10_000)]
        };
        for t in ["nodeport", "vip"] {
            let lb = at(Mode::Lb, t);
            ratio_ipt
                .entry(t)
                .or_default()
                .push(lb / at(Mode::Iptables, t));
            ratio_fwd
                .entry(t)
                .or_default()
                .push(100.0 * lb / at(Mode::XdpFwd, "pod"));
            ratio_tc
                .entry(t)
                .or_default()
                .push(100.0 * at(Mode::LbTc, t) / lb);
        }
    }
    let sec = "Forwarding rate (64-byte UDP frames, live-frames generator, 1 CPU)";
    let mut figs = Vec::new();
    for (mi, mode) in Mode::ALL.iter().enumerate() {
        for t in mode.targets() {
            for f in FLOWS {
                let label = format!(
                    "{}, {}{} flow{}",
                    mode.label(),
                    match *t {
                        "nodeport" => "NodePort, ",
                        "vip" => "ClusterIP, ",
                        _ => "to a pod, ",
                    },
                    f,
                    if f == 1 { "" } else { "s" }
                );
                figs.push(Figure::new(
                    sec,
                    &format!("forwarding.{}.{t}.{f}.pps", mode.key()),
                    &label,
                    "pps",
                    pps[&(mi, *t, f)].clone(),
                ));
                figs.push(Figure::new(
                    sec,
                    &format!("forwarding.{}.{t}.{f}.drop_pct", mode.key()),
                    "  dropped",
                    "%",
                    drops[&(mi, *t, f)].clone(),
                ));
            }
        }
    }
    for t in ["nodeport", "vip"] {
        let name = if t == "nodeport" {
            "NodePort"
        } else {
            "ClusterIP"
        };
        figs.push(
            Figure::new(
                sec,
                &format!("forwarding.lb_vs_iptables.{t}.10000"),
                &format!("lb / iptables, {name}, 10,000 flows"),
                "x",
                ratio_ipt[t].clone(),
            )
            .target(Target::AtLeast(5.0)),
        );
        figs.push(
            Figure::new(
                sec,
                &format!("forwarding.lb_vs_xdp_fwd.{t}.10000"),
                &format!("lb / no-NAT forwarder, {name}, 10,000 flows"),
                "%",
                ratio_fwd[t].clone(),
            )
            .target(Target::AtLeast(70.0)),
        );
        figs.push(Figure::new(
            sec,
            &format!("forwarding.tc_vs_xdp.{t}.10000"),
            &format!("lb's tc hook / its XDP hook, {name}, 10,000 flows"),
            "%",
            ratio_tc[t].clone(),
        ));
    }
    let _ = median(&[]);
    let notes = vec![format!(
        "Forwarding: {rounds} rounds, modes interleaved (lb with XDP, lb with tc on the uplinks, \
         no-NAT XDP forwarder, kernel routing, iptables, nftables), ~{secs} s of frames per figure after a warm-up that opens every flow; \
         delivered = frames counted by xdp_sink on the backend side, pps = delivered / wall time of \
         the generator call (which includes ~25 ms of set-up), dropped = 1 − delivered / sent. \
         The generator and the balancer's softirq share one pinned CPU, so a mode's rate is \
         inversely its per-packet cost there."
    )];
    Ok((figs, notes))
}
