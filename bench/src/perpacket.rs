//! Per-packet cost of `lb_xdp` under BPF_PROG_TEST_RUN, against a floor program.
//!
//! `repeat` reruns a program on the frame its previous iteration rewrote, so lb
//! would see its own output from the second iteration on. Every case therefore
//! runs through `bench_wrap` (lb-ebpf/src/bench.rs), which restores the frame
//! from a map and tail-calls `lb_xdp` through a PROG_ARRAY; for the new-flow
//! case it also gives every iteration a source of its own (port, then address,
//! from a per-CPU counter, checksums fixed), so each iteration opens a flow.
//! The wrapper's own cost is measured in the same round by tail-calling
//! `bench_nop` (returns at once) and subtracting `bench_nop` run directly:
//!
//! `lb(case) = wrap→lb_xdp − (wrap→nop − nop)`,   `ratio = lb(case) / floor`.
//!
//! Rounds interleave every program; figures are medians over rounds. Each
//! measured run is checked: the return code, the frame after the last
//! iteration (addresses, ports, every checksum), and the datapath's `reasons`
//! counters (all N iterations under the expected reason).

use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
    sync::MutexGuard,
};

use anyhow::{Context as _, Result, ensure};
use aya::{
    Ebpf,
    maps::{Array, HashMap, MapData, PerCpuArray, ProgramArray},
    programs::Xdp,
};
use lb_agent::{
    bpf::{Datapath, LoadOptions, NodeConfig, Sizes},
    cluster::NodeInfo,
    reconcile::Reconciler,
    source::{SourceEvent, manifests},
    sync::Engine,
};
use lb_common::{CT_F_FORWARD, CtEntry, FAMILY_V4, FlowKey, PROTO_TCP, Reason};

use lb_testbed::{
    fib::{FibNamespace, NODE_B_MAC, ROUTER_MAC, UPLINK_MAC},
    packet::{self, ACK, Decoded, FROM_ROUTER, L4, SYN},
    test_run,
};

use crate::{
    BENCH_OBJECT, cpu,
    report::{Figure, Target},
};

pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;

const FROM_NODE_B: ([u8; 6], [u8; 6]) = (NODE_B_MAC, UPLINK_MAC);
const BACKENDS: u32 = 10;

/// `bench_tmpl`'s value (see lb-ebpf/src/bench.rs).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Template {
    pub len: u32,
    pub vary: u32,
    pub flows: u32,
    pub _pad: u32,
    pub data: [u8; 128],
}

// SAFETY: repr(C), integers and bytes only, no implicit padding.
unsafe impl aya::Pod for Template {}

impl Template {
    pub fn new(frame: &[u8], vary: bool, flows: u32) -> Result<Self> {
        ensure!(
            frame.len() <= 128 && frame.len().is_multiple_of(4),
            "frames must be a multiple of 4 bytes, at most 128"
        );
        let mut data = [0u8; 128];
        data[..frame.len()].copy_from_slice(frame);
        Ok(Self {
            len: frame.len() as u32,
            vary: u32::from(vary),
            flows,
            _pad: 0,
            data,
        })
    }
}

#[derive(Clone, Copy, Debug)]
pub struct Settings {
    pub iterations: u32,
    pub rounds: usize,
    /// Iterations of the new-flow check run on an empty conntrack table.
    pub flow_check: u32,
}

/// An XDP test run: return value, ns per iteration, output frame.
pub fn test_run(
    prog: &Xdp,
    frame: &[u8],
    repeat: u32,
    ifindex: u32,
) -> Result<(u32, f64, Vec<u8>)> {
    let r = test_run::xdp(prog, frame, ifindex, repeat)?;
    Ok((r.ret, r.per_iteration.as_nanos() as f64, r.frame))
}

struct Lab {
    _dp_keep: Datapath,
    /// The maps, programmed by the agent's sync engine.
    engine: Engine,
    bench: Ebpf,
    tmpl: Array<MapData, Template>,
    jmp: ProgramArray<MapData>,
    counter: PerCpuArray<MapData, u64>,
    lru: HashMap<MapData, FlowKey, CtEntry>,
    uplink: u32,
    lb_fd: aya::programs::ProgramFd,
}

fn sock(s: &str) -> SocketAddr {
    s.parse().expect("socket address")
}

const TCP: u8 = lb_common::PROTO_TCP;
const UDP: u8 = lb_common::PROTO_UDP;

/// A case's frame: TCP with `flags` (sequence 1000, acknowledging 2000), or
/// UDP with 10 zero bytes, padded as a short Ethernet frame to a multiple of 4
/// bytes (what `bench_tmpl` holds).
fn frame(
    macs: ([u8; 6], [u8; 6]),
    src: SocketAddr,
    dst: SocketAddr,
    proto: u8,
    flags: u8,
) -> Vec<u8> {
    let f = if proto == TCP {
        let ack = if flags & ACK != 0 { 2000 } else { 0 };
        packet::tcp(macs, src, dst, flags, 1000, ack, &[])
    } else {
        packet::udp(macs, src, dst, &[0; 10])
    };
    let len = f.len().max(60).next_multiple_of(4);
    packet::padded(f, len)
}

const CLIENT: &str = "198.51.100.7:40000";
const CLIENT6: &str = "[2001:db8:100::7]:40000";
const VIP: &str = "10.96.0.10:80";
const VIP_UDP: &str = "10.96.0.10:53";
const VIP6: &str = "[fd00:96::10]:80";
const NODEPORT: &str = "192.0.2.1:30080";
const NOT_SERVICE: &str = "192.0.2.1:22";

fn backend_v4(i: u32) -> SocketAddr {
    SocketAddr::new(IpAddr::from([10, 244, 1, i as u8]), 8080)
}

fn backend_v6(i: u32) -> SocketAddr {
    SocketAddr::new(format!("fd00:244:1::{i:x}").parse().unwrap(), 8080)
}

impl Lab {
    /// The lab, its Service written as manifests into `dir` and synced.
    fn new(dir: &Path) -> Result<Self> {
        let sizes = Sizes {
            services: 1024,
            service_ids: 16,
            backends: 256,
            maglev_table_size: lb_common::capacity::MAGLEV_TABLE_SIZE,
            conntrack: lb_common::capacity::CONNTRACK,
        };
        let mut dp = Datapath::load(&LoadOptions {
            pin_path: None,
            sizes,
            log_level: None,
        })?;
        let mut maps = dp.take_maps()?;
        let lb_fd = dp.xdp()?.fd()?.try_clone()?;
        let uplink = lb_testbed::ifindex("up0")?;
        maps.set_config(&NodeConfig {
            snat_v4: Some([192, 0, 2, 1].into()),
            snat_v6: Some("2001:db8::1".parse()?),
            snat_ports: (lb_common::SNAT_PORT_MIN, lb_common::SNAT_PORT_MAX),
            cluster_cidrs: false,
        })?;
        maps.add_tx_port(uplink)?;
        let mut bench = Ebpf::load(BENCH_OBJECT).context("loading the bench object")?;
        for name in ["bench_floor", "bench_nop", "bench_wrap", "bench_lru"] {
            let p: &mut Xdp = bench
                .program_mut(name)
                .with_context(|| format!("no program {name}"))?
                .try_into()?;
            p.load().with_context(|| format!("loading {name}"))?;
        }
        let tmpl = Array::try_from(bench.take_map("bench_tmpl").context("bench_tmpl")?)?;
        let jmp = ProgramArray::try_from(bench.take_map("bench_jmp").context("bench_jmp")?)?;
        let counter = PerCpuArray::try_from(bench.take_map("bench_cnt").context("bench_cnt")?)?;
        let lru = HashMap::try_from(bench.take_map("bench_lru_tbl").context("bench_lru_tbl")?)?;
        // The services go in the way the agent writes them: manifests into its
        // sync engine.
        write_manifests(dir)?;
        let loaded = manifests::load_dir(dir);
        ensure!(
            loaded.problems.is_empty(),
            "manifest problems: {:?}",
            loaded.problems.first()
        );
        let mut engine = Engine::new(
            Reconciler::adopt(maps)?,
            NodeInfo {
                name: "node-a".into(),
                addresses: vec!["192.0.2.1".parse()?, "2001:db8::1".parse()?],
            },
        );
        engine.take(SourceEvent::Resync {
            services: loaded.services,
            slices: loaded.slices,
            problems: Vec::new(),
        });
        let sync = engine.sync().context("the listing made no sync due")?;
        ensure!(
            sync.problems.is_empty(),
            "sync: {:?}",
            sync.problems.first()
        );
        let lab = Self {
            _dp_keep: dp,
            engine,
            bench,
            tmpl,
            jmp,
            counter,
            lru,
            uplink,
            lb_fd,
        };
        Ok(lab)
    }

    /// The reconciler, for its maps (locked while the guard lasts).
    fn reconciler(&self) -> MutexGuard<'_, Reconciler> {
        self.engine.reconciler()
    }

    fn prog(&self, name: &str) -> Result<&Xdp> {
        Ok(self
            .bench
            .program(name)
            .with_context(|| format!("no program {name}"))?
            .try_into()?)
    }

    /// Points the wrapper at lb (true) or at `bench_nop`.
    fn target(&mut self, lb: bool) -> Result<()> {
        let fd = if lb {
            self.lb_fd.try_clone()?
        } else {
            self.prog("bench_nop")?.fd()?.try_clone()?
        };
        self.jmp.set(0, &fd, 0)?;
        Ok(())
    }

    fn template(&mut self, frame: &[u8], vary: bool) -> Result<()> {
        self.tmpl.set(0, Template::new(frame, vary, 0)?, 0)?;
        Ok(())
    }

    fn counter(&self) -> Result<u64> {
        Ok(self.counter.get(&0, 0)?.iter().sum())
    }

    /// Checks that `bench_lru` inserted the key of its last iteration (as it
    /// builds it: its counter in the first bytes of `src`, TCP, IPv4).
    fn check_lru_insert(&self) -> Result<()> {
        let n: u64 = self.counter.get(&1, 0)?.iter().sum();
        ensure!(n > 0, "bench_lru inserted nothing");
        let mut key = FlowKey {
            proto: PROTO_TCP,
            family: FAMILY_V4,
            ..FlowKey::default()
        };
        key.src[..8].copy_from_slice(&(n - 1).to_ne_bytes());
        let v = self
            .lru
            .get(&key, 0)
            .context("bench_lru: the last key is not in the table")?;
        ensure!(v.last_seen_ns == n - 1, "bench_lru: wrong value {v:?}");
        Ok(())
    }

    fn reasons(&self) -> Result<Vec<u64>> {
        Ok(self
            .reconciler()
            .maps()
            .reason_counters()?
            .into_iter()
            .map(|(_, c)| c.packets)
            .collect())
    }

    /// Runs `frame` through the wrapper into lb.
    fn wrapped(&mut self, frame: &[u8], vary: bool, repeat: u32) -> Result<(u32, f64, Vec<u8>)> {
        self.target(true)?;
        self.template(frame, vary)?;
        test_run(self.prog("bench_wrap")?, frame, repeat, self.uplink)
    }

    /// (Re)opens a flow with one SYN after removing both of its entries: the
    /// new-flow runs fill the LRU table and may evict either entry alone.
    fn reopen(&mut self, src: SocketAddr, dst: SocketAddr, proto: u8) -> Result<()> {
        let key = FlowKey::new(src, dst, proto);
        let mut r = self.reconciler();
        if let Ok(e) = r.maps().conntrack.get(&key, 0) {
            let reply = FlowKey {
                src: e.nat_dst,
                dst: e.nat_src,
                src_port: e.nat_dst_port,
                dst_port: e.nat_src_port,
                proto,
                family: key.family,
                _pad: [0; 2],
            };
            let _ = r.maps_mut().conntrack.remove(&reply);
            let _ = r.maps_mut().conntrack.remove(&key);
        }
        drop(r);
        let f = frame(FROM_ROUTER, src, dst, proto, SYN);
        let (ret, _, _) = self.wrapped(&f, false, 1)?;
        ensure!(ret == XDP_TX, "opening {src} -> {dst} returned {ret}");
        Ok(())
    }

    fn conntrack_len(&self) -> usize {
        self.reconciler()
            .maps()
            .conntrack
            .keys()
            .filter(Result::is_ok)
            .count()
    }
}

/// Checks a case's output frame.
type Check = Box<dyn Fn(&Decoded) -> Result<()>>;

/// One measured case.
struct Case {
    key: &'static str,
    label: &'static str,
    frame: Vec<u8>,
    vary: bool,
    ret: u32,
    reason: Reason,
    check: Check,
}

/// The source `bench_wrap` gives flow `idx` (see lb-ebpf/src/bench.rs): the
/// port plus idx, the low 16 bits of the address plus idx >> 16, each wrapping.
pub fn varied(base: SocketAddr, idx: u32) -> SocketAddr {
    let IpAddr::V4(a) = base.ip() else {
        return base;
    };
    let o = a.octets();
    let low = u16::from_be_bytes([o[2], o[3]]).wrapping_add((idx >> 16) as u16);
    let l = low.to_be_bytes();
    SocketAddr::new(
        IpAddr::from([o[0], o[1], l[0], l[1]]),
        base.port().wrapping_add(idx as u16),
    )
}

/// The Service the cases hit, as manifests: dual-stack NodePort `web` (TCP 80,
/// UDP 53; NodePorts 30080, 30053), 10 ready pods per family on node B.
fn write_manifests(dir: &std::path::Path) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut y = String::from(
        "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: default}\nspec:\n  \
         type: NodePort\n  clusterIP: 10.96.0.10\n  clusterIPs: [10.96.0.10, 'fd00:96::10']\n  \
         ipFamilies: [IPv4, IPv6]\n  ipFamilyPolicy: PreferDualStack\n  \
         externalTrafficPolicy: Cluster\n  ports:\n  \
         - {name: tcp, port: 80, protocol: TCP, targetPort: 8080, nodePort: 30080}\n  \
         - {name: udp, port: 53, protocol: UDP, targetPort: 8080, nodePort: 30053}\n",
    );
    for (family, name) in [("IPv4", "web-v4"), ("IPv6", "web-v6")] {
        y.push_str(&format!(
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}\n  \
             namespace: default\n  labels: {{kubernetes.io/service-name: web}}\naddressType: {family}\n\
             ports: [{{name: tcp, port: 8080, protocol: TCP}}, {{name: udp, port: 8080, protocol: UDP}}]\n\
             endpoints:\n"
        ));
        for i in 1..=BACKENDS {
            let a = if family == "IPv4" {
                backend_v4(i).ip()
            } else {
                backend_v6(i).ip()
            };
            y.push_str(&format!(
                "- {{addresses: ['{a}'], nodeName: node-b, conditions: {{ready: true}}}}\n"
            ));
        }
    }
    std::fs::write(dir.join("web.yaml"), y)?;
    Ok(())
}

/// The flows the established cases (and the reply case) hit.
fn established_flows() -> [(SocketAddr, SocketAddr, u8); 4] {
    let client = sock(CLIENT);
    [
        (client, sock(VIP), TCP),
        (client, sock(NODEPORT), TCP),
        (client, sock(VIP_UDP), UDP),
        (sock(CLIENT6), sock(VIP6), TCP),
    ]
}

fn is_backend(a: SocketAddr) -> bool {
    (1..=BACKENDS).any(|i| backend_v4(i) == a || backend_v6(i) == a)
}

/// Measures everything; returns the figures.
pub fn run(s: Settings) -> Result<(Vec<Figure>, Vec<String>)> {
    // Every test run happens in the testbed's one-node namespace, whose FIB
    // answers are known (node B owns the remote pod CIDR, a router the clients).
    let fib = FibNamespace::up()?;
    let manifests = fib.scope().run_dir().join("manifests");
    let cpu = cpu::bench_cpu();
    lb_testbed::try_in_netns(fib.ns(), move || -> Result<(Vec<Figure>, Vec<String>)> {
        cpu::pin_thread(cpu)?;
        measure(s, cpu, &manifests)
    })?
}

fn measure(s: Settings, cpu: usize, manifests: &Path) -> Result<(Vec<Figure>, Vec<String>)> {
    let mut lab = Lab::new(manifests)?;
    let mut notes = Vec::new();
    let client = sock(CLIENT);

    // New flows really are new: on an empty table, N varied SYNs must leave
    // N forward and N reply entries.
    let syn = frame(FROM_ROUTER, client, sock(VIP), TCP, SYN);
    let before = lab.conntrack_len();
    let (ret, _, _) = lab.wrapped(&syn, true, s.flow_check)?;
    ensure!(ret == XDP_TX, "new-flow check returned {ret}");
    let created = lab.conntrack_len() - before;
    ensure!(
        created == 2 * s.flow_check as usize,
        "{} varied SYNs created {created} conntrack entries, not {}",
        s.flow_check,
        2 * s.flow_check
    );
    notes.push(format!(
        "Per-packet new flow: a check run of {} SYNs, each given its own source by the wrapper, \
         created exactly {} conntrack entries (one forward, one reply per flow).",
        s.flow_check, created
    ));

    // Flows the established cases hit.
    for (src, dst, proto) in established_flows() {
        lab.reopen(src, dst, proto)?;
    }
    let fwd = lab
        .reconciler()
        .maps()
        .conntrack
        .get(&FlowKey::new(client, sock(VIP), TCP), 0)
        .context("the VIP flow's forward entry")?;
    ensure!(fwd.flags & CT_F_FORWARD != 0, "not a forward entry");
    let chosen = lb_common::socket_addr(&fwd.nat_dst, FAMILY_V4, fwd.nat_dst_port)
        .context("backend of the VIP flow")?;

    let vip = sock(VIP);
    let np = sock(NODEPORT);
    let cases = [
        Case {
            key: "non_service",
            label: "non-service traffic (pass to kernel)",
            frame: frame(FROM_ROUTER, client, sock(NOT_SERVICE), TCP, ACK),
            vary: false,
            ret: XDP_PASS,
            reason: Reason::PassNotService,
            check: Box::new(move |d| {
                ensure!(
                    d.dst_addr() == sock(NOT_SERVICE) && d.src_addr() == client,
                    "frame changed: {d:?}"
                );
                Ok(())
            }),
        },
        Case {
            key: "new_flow",
            label: "TCP SYN to a ClusterIP (new flow: Maglev, 2 inserts)",
            frame: syn.clone(),
            vary: true,
            ret: XDP_TX,
            reason: Reason::Tx,
            check: Box::new(|d| {
                ensure!(is_backend(d.dst_addr()), "not sent to a backend: {d:?}");
                ensure!(
                    d.eth_dst == NODE_B_MAC && d.ttl == 63,
                    "not forwarded: {d:?}"
                );
                Ok(())
            }),
        },
        Case {
            key: "established",
            label: "TCP established to a ClusterIP (conntrack hit)",
            frame: frame(FROM_ROUTER, client, vip, TCP, ACK),
            vary: false,
            ret: XDP_TX,
            reason: Reason::Tx,
            check: Box::new(move |d| {
                ensure!(
                    d.dst_addr() == chosen && d.src_addr() == client,
                    "not translated: {d:?}"
                );
                ensure!(d.eth_dst == NODE_B_MAC, "not forwarded to node B: {d:?}");
                Ok(())
            }),
        },
        Case {
            key: "reply",
            label: "reply reverse-translated (backend -> client)",
            frame: frame(FROM_NODE_B, chosen, client, TCP, ACK),
            vary: false,
            ret: XDP_TX,
            reason: Reason::Tx,
            check: Box::new(move |d| {
                ensure!(
                    d.src_addr() == vip && d.dst_addr() == client,
                    "not reverse-translated: {d:?}"
                );
                ensure!(
                    d.eth_dst == ROUTER_MAC,
                    "not forwarded to the router: {d:?}"
                );
                Ok(())
            }),
        },
        Case {
            key: "nodeport_snat",
            label: "NodePort with source NAT (established)",
            frame: frame(FROM_ROUTER, client, np, TCP, ACK),
            vary: false,
            ret: XDP_TX,
            reason: Reason::Tx,
            check: Box::new(|d| {
                ensure!(is_backend(d.dst_addr()), "not sent to a backend: {d:?}");
                ensure!(
                    d.src == IpAddr::from([192, 0, 2, 1])
                        && d.src_addr().port() >= lb_common::SNAT_PORT_MIN,
                    "not source-NATed: {d:?}"
                );
                Ok(())
            }),
        },
        Case {
            key: "udp",
            label: "UDP to a ClusterIP (established)",
            frame: frame(FROM_ROUTER, client, sock(VIP_UDP), UDP, 0),
            vary: false,
            ret: XDP_TX,
            reason: Reason::Tx,
            check: Box::new(move |d| {
                ensure!(
                    is_backend(d.dst_addr())
                        && d.src_addr() == client
                        && matches!(d.l4, L4::Udp { .. }),
                    "not translated: {d:?}"
                );
                Ok(())
            }),
        },
        Case {
            key: "ipv6",
            label: "IPv6 TCP established to a ClusterIP",
            frame: frame(FROM_ROUTER, sock(CLIENT6), sock(VIP6), TCP, ACK),
            vary: false,
            ret: XDP_TX,
            reason: Reason::Tx,
            check: Box::new(|d| {
                ensure!(is_backend(d.dst_addr()), "not sent to a backend: {d:?}");
                ensure!(d.ttl == 63, "hop limit not decremented: {d:?}");
                Ok(())
            }),
        },
    ];

    let n = s.iterations;
    let mut floor = Vec::new();
    let mut nop = Vec::new();
    let mut wrap = Vec::new();
    let mut wrap_vary = Vec::new();
    let mut lru = Vec::new();
    let mut per_case: Vec<Vec<f64>> = vec![Vec::new(); cases.len()];
    let mut failed: Vec<Option<String>> = vec![None; cases.len()];
    let plain = frame(FROM_ROUTER, client, vip, TCP, ACK);
    for _round in 0..s.rounds {
        let (ret, t, _) = test_run(lab.prog("bench_floor")?, &plain, n, lab.uplink)?;
        ensure!(ret == XDP_TX, "floor returned {ret}");
        floor.push(t);
        let (ret, t, _) = test_run(lab.prog("bench_nop")?, &plain, n, lab.uplink)?;
        ensure!(ret == XDP_TX, "nop returned {ret}");
        nop.push(t);
        let (ret, t, _) = test_run(lab.prog("bench_lru")?, &plain, n, lab.uplink)?;
        ensure!(ret == XDP_TX, "bench_lru returned {ret} (insert failed)");
        lab.check_lru_insert()?;
        lru.push(t);
        lab.target(false)?;
        lab.template(&plain, false)?;
        let (ret, t, _) = test_run(lab.prog("bench_wrap")?, &plain, n, lab.uplink)?;
        ensure!(ret == XDP_TX, "wrapper into nop returned {ret}");
        wrap.push(t);
        lab.template(&syn, true)?;
        let (ret, t, _) = test_run(lab.prog("bench_wrap")?, &syn, n, lab.uplink)?;
        ensure!(ret == XDP_TX, "varying wrapper into nop returned {ret}");
        wrap_vary.push(t);
        for (i, c) in cases.iter().enumerate() {
            if failed[i].is_some() {
                continue;
            }
            let r = (|| -> Result<f64> {
                if !c.vary {
                    for (src, dst, proto) in established_flows() {
                        lab.reopen(src, dst, proto)?;
                    }
                }
                let r0 = lab.reasons()?;
                let c0 = lab.counter()?;
                let (ret, t, out) = lab.wrapped(&c.frame, c.vary, n)?;
                let r1 = lab.reasons()?;
                let counted: Vec<String> = r1
                    .iter()
                    .zip(&r0)
                    .enumerate()
                    .filter(|(_, (a, b))| a > b)
                    .map(|(i, (a, b))| {
                        let name = Reason::from_index(i as u32).map_or("?", Reason::name);
                        format!("{name} {}", a - b)
                    })
                    .collect();
                ensure!(
                    ret == c.ret,
                    "{}: returned {ret}, not {} (reasons: {})",
                    c.key,
                    c.ret,
                    counted.join(", ")
                );
                let got: u64 = r1.iter().zip(&r0).map(|(a, b)| a - b).sum();
                let hit = r1[c.reason as usize] - r0[c.reason as usize];
                ensure!(
                    hit == u64::from(n) && got == u64::from(n),
                    "{}: {hit} of {n} iterations counted under {}, {got} in all",
                    c.key,
                    c.reason.name()
                );
                let d = packet::check(&out)
                    .and_then(|d| {
                        ensure!(d.ports().is_some(), "not TCP or UDP: {d:?}");
                        Ok(d)
                    })
                    .with_context(|| format!("{}: output frame", c.key))?;
                (c.check)(&d).with_context(|| format!("{}: output frame", c.key))?;
                if c.vary {
                    let c1 = lab.counter()?;
                    ensure!(
                        c1 - c0 == u64::from(n),
                        "{}: {} flows varied, not {n}",
                        c.key,
                        c1 - c0
                    );
                    // The last iteration's flow is in conntrack, and the output is it.
                    let last = c1 - 1;
                    let src = varied(client, last as u32);
                    ensure!(
                        d.src_addr() == src,
                        "{}: last frame from {}, expected {src}",
                        c.key,
                        d.src_addr()
                    );
                    let e = lab
                        .reconciler()
                        .maps()
                        .conntrack
                        .get(&FlowKey::new(src, vip, TCP), 0)
                        .with_context(|| {
                            format!("{}: no conntrack entry for the last flow {src}", c.key)
                        })?;
                    ensure!(
                        e.flags & CT_F_FORWARD != 0,
                        "{}: not a forward entry",
                        c.key
                    );
                }
                Ok(t)
            })();
            match r {
                Ok(t) => {
                    let overhead = if c.vary {
                        wrap_vary.last().unwrap() - nop.last().unwrap()
                    } else {
                        wrap.last().unwrap() - nop.last().unwrap()
                    };
                    per_case[i].push(t - overhead);
                }
                Err(e) => failed[i] = Some(format!("{e:#}")),
            }
        }
    }
    let overhead: Vec<f64> = wrap.iter().zip(&nop).map(|(w, n)| w - n).collect();
    let overhead_vary: Vec<f64> = wrap_vary.iter().zip(&nop).map(|(w, n)| w - n).collect();
    let sec = "Per-packet cost (BPF_PROG_TEST_RUN)";
    let mut figs = vec![
        Figure::new(
            sec,
            "per_packet.floor.ns",
            "floor: swap MACs, XDP_TX",
            "ns",
            floor.clone(),
        ),
        Figure::new(
            sec,
            "per_packet.wrapper.ns",
            "wrapper: restore frame + tail call (subtracted)",
            "ns",
            overhead,
        ),
        Figure::new(
            sec,
            "per_packet.wrapper_vary.ns",
            "wrapper with per-packet flow (subtracted, new flow)",
            "ns",
            overhead_vary,
        ),
        Figure::new(
            sec,
            "per_packet.lru_insert.ns",
            "reference: kernel LRU insert (conntrack's shape)",
            "ns",
            lru.clone(),
        ),
    ];
    for (i, c) in cases.iter().enumerate() {
        if let Some(e) = &failed[i] {
            notes.push(format!(
                "Per-packet case `{}` FAILED its checks, no figure: {e}",
                c.key
            ));
            eprintln!("lb-bench: per-packet case {} failed: {e}", c.key);
            continue;
        }
        let ns = &per_case[i];
        let ratio: Vec<f64> = ns.iter().zip(&floor).map(|(a, f)| a / f).collect();
        figs.push(Figure::new(
            sec,
            &format!("per_packet.{}.ns", c.key),
            c.label,
            "ns",
            ns.clone(),
        ));
        let mut r = Figure::new(
            sec,
            &format!("per_packet.{}.ratio", c.key),
            &format!("  {} / floor", c.key),
            "x",
            ratio,
        );
        r = match c.key {
            "established" => r.target(Target::AtMost(5.0)),
            "new_flow" => r.target(Target::AtMost(12.0)),
            "non_service" => r.target(Target::AtMost(2.0)),
            _ => r,
        };
        figs.push(r);
        if c.key == "new_flow" {
            // A new flow inserts two conntrack entries: this shows how much of its
            // cost is the kernel's hash table rather than lb's own work.
            figs.push(Figure::new(
                sec,
                "per_packet.new_flow.lru_ratio",
                "  new_flow / LRU insert (a new flow inserts 2)",
                "x",
                ns.iter().zip(&lru).map(|(a, l)| a / l).collect(),
            ));
        }
    }
    notes.push(format!(
        "Per-packet: {n} iterations per run, {} interleaved rounds, thread pinned to CPU {cpu} \
         (sched_setaffinity; XDP test runs take no BPF_F_TEST_RUN_ON_CPU). lb runs behind a \
         wrapper that restores the frame from a map and tail-calls lb_xdp; the wrapper's cost \
         (wrapper→nop minus nop, same round) is subtracted. Each run is checked: return code, \
         output frame (addresses, ports, all checksums), and all N iterations under the expected \
         `reasons` counter. Conntrack holds {} entries (the agent's default), so the new-flow \
         runs include LRU eviction once the table is full, as on a busy node; the LRU-insert \
         reference runs on a table of the same shape, also full after the first round.",
        s.rounds,
        lb_common::capacity::CONNTRACK
    ));
    Ok((figs, notes))
}
