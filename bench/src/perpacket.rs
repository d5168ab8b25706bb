//! Per-packet cost of `lb_xdp` under BPF_PROG_TEST_RUN, against a floor program.
//!
//! `repeat` reruns a program on the frame its previous iteration rewrote, so lb
//! would see its own output from the second iteration on. Every case therefore
//! runs through `bench_wrap` (lb-ebpf/src/bench.rs), which restores the frame
//! from a map and tail-calls `lb_xdp` through a PROG_ARRAY; for the new-flow
//! cases it also gives every iteration a source of its own (port, then address,
//! or a new address every time, from a per-CPU counter, checksums fixed), so
//! each iteration opens a flow. The wrapper's own cost is measured in the same
//! round by tail-calling `bench_nop` (returns at once) and subtracting
//! `bench_nop` run directly:
//!
//! `lb(case) = wrap→lb_xdp − (wrap→nop − nop)`,   `ratio = lb(case) / floor`.
//!
//! Rounds interleave every program; a round's figure of a program is the
//! fastest of a few slices of its run (the machine's noise only adds time),
//! and figures are medians over rounds. Each
//! measured run is checked: the return code, the frame after the last
//! iteration (addresses, ports, every checksum, and the conntrack entry it was
//! translated by), the datapath's `reasons` counters (all N iterations under
//! the expected reason), and for the Service features the maps they leave
//! (affinity entries, which endpoints the last flows went to).
//!
//! The Service features (session affinity, source ranges, traffic policy
//! Local, the cluster CIDRs and the masquerade they bring) run on the new-flow
//! path only. Their cases run in each round with the maps in one of three
//! states, switched through the agent's sync engine and map writers ([`State`]):
//! `web` alone (the baselines), `web` beside Services that use the features,
//! and the same with the cluster CIDRs configured. Each feature case is shown
//! against a partner measured in the same round that differs from it in that
//! feature only, and against the baselines. The checks alone (one LPM lookup
//! each for the source ranges and the cluster CIDRs) are too small to show
//! on a new flow's two LRU inserts; the cases where they drop a new flow
//! measure them without. The feature cases run in reverse every other round:
//! a run leaves conntrack in a shape that changes the next run's cost (the
//! source-NAT ports it holds above all).

use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::MutexGuard,
};

use anyhow::{Context as _, Result, ensure};
use aya::{
    Ebpf,
    maps::{Array, HashMap, MapData, PerCpuArray, ProgramArray},
    programs::Xdp,
};
use lb_agent::{
    bpf::{Datapath, LoadOptions, NodeConfig, Sizes, maps::Cidr},
    cluster::NodeInfo,
    model::Prefix,
    reconcile::Reconciler,
    source::{SourceEvent, manifests},
    sync::Engine,
};
use lb_common::{
    AffinityKey, CFG_F_CLUSTER_CIDRS, CT_F_FORWARD, CT_F_SNAT, CtEntry, FAMILY_V4, FlowKey, Reason,
    SVC_F_AFFINITY, SVC_F_EXTERNAL, SVC_F_LOCAL, SVC_F_SNAT_REMOTE, SVC_F_SOURCE_RANGES, Service,
    ServiceKey,
};

use lb_testbed::{
    fib::{FibNamespace, NODE_B_MAC, ROUTER_MAC, UPLINK_MAC},
    packet::{self, ACK, Decoded, FROM_ROUTER, L4, SYN},
    test_run,
};

use crate::{
    cpu,
    report::{Figure, Target},
};

pub const XDP_DROP: u32 = 1;
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
    /// `vary`: [`Vary`] as the wrapper takes it (0, 1 or 2).
    pub fn new(frame: &[u8], vary: u32, flows: u32) -> Result<Self> {
        ensure!(
            frame.len() <= 128 && frame.len().is_multiple_of(4),
            "frames must be a multiple of 4 bytes, at most 128"
        );
        let mut data = [0u8; 128];
        data[..frame.len()].copy_from_slice(frame);
        Ok(Self {
            len: frame.len() as u32,
            vary,
            flows,
            _pad: 0,
            data,
        })
    }
}

/// How the wrapper varies the frame from one iteration to the next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Vary {
    /// Not at all: every iteration is the same packet of one flow.
    No = 0,
    /// A flow per iteration: the source port plus the counter, the low 16
    /// bits of the address plus its upper bits (a client's next flows).
    Port = 1,
    /// A client per iteration: the source address plus the counter (low
    /// half, then high half), the port fixed (clients' first flows).
    Addr = 2,
}

#[derive(Clone, Copy, Debug)]
pub struct Settings {
    /// Iterations of each measured run.
    pub iterations: u32,
    pub rounds: usize,
    /// Each round's figure of a case is the fastest of this many runs of
    /// `iterations / slices` (the machine's noise only ever adds time).
    pub slices: u32,
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

/// What the maps hold while a case runs. Switched through the agent's sync
/// engine (the manifests of the state) and its map writers (the cluster
/// CIDRs, as the agent writes `--cluster-cidr`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// `web` alone, no cluster CIDRs: the baselines.
    Plain,
    /// `web` and the feature Services (affinity, source ranges, Local), no
    /// cluster CIDRs.
    Features,
    /// The same with the cluster CIDRs configured.
    Cidrs,
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
    /// The manifests of [`State::Plain`] and of the other two states.
    plain_dir: PathBuf,
    features_dir: PathBuf,
    /// The state the maps were last found in.
    state: Option<State>,
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

/// The MACs a packet from `src` arrives with: from node B for a pod of the
/// cluster (10.244.0.0/16), else from the router to the clients.
fn macs_from(src: SocketAddr) -> ([u8; 6], [u8; 6]) {
    match src.ip() {
        IpAddr::V4(a) if a.octets()[..2] == [10, 244] => FROM_NODE_B,
        _ => FROM_ROUTER,
    }
}

const CLIENT: &str = "198.51.100.7:40000";
const CLIENT6: &str = "[2001:db8:100::7]:40000";
/// A pod on another node (node C's pod CIDR, where no endpoint lives, so
/// that the varied addresses never meet an endpoint's): a client inside
/// the cluster once the cluster CIDRs are configured.
const POD_CLIENT: &str = "10.244.2.7:40000";
/// A client outside every loadBalancerSourceRanges prefix of `ranged`.
const BLOCKED_CLIENT: &str = "203.0.113.99:40000";
const VIP: &str = "10.96.0.10:80";
const VIP_UDP: &str = "10.96.0.10:53";
const VIP6: &str = "[fd00:96::10]:80";
const NODEPORT: &str = "192.0.2.1:30080";
const NOT_SERVICE: &str = "192.0.2.1:22";

/// The feature Services' frontends (see [`write_feature_manifests`]).
const VIP_AFFINITY: &str = "10.96.0.20:80";
const LB_IP: &str = "203.0.113.21:80";
const LB_IP_RANGES: &str = "203.0.113.22:80";
const LB_IP_LOCAL: &str = "203.0.113.23:80";
/// externalTrafficPolicy Local, no endpoint on this node.
const LB_IP_NONE: &str = "203.0.113.24:80";
/// `ranged`'s loadBalancerSourceRanges: CLIENT's /16 (its varied addresses
/// stay inside it), and others, as a real list has several.
const SOURCE_RANGES: [&str; 6] = [
    "198.51.0.0/16",
    "100.64.0.0/10",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "192.0.2.0/24",
    "2001:db8:100::/48",
];
/// The cluster's pod CIDRs (the agent's `--cluster-cidr`) in [`State::Cidrs`].
const CLUSTER_CIDRS: [&str; 2] = ["10.244.0.0/16", "fd00:244::/48"];
const AFFINITY_TIMEOUT: u32 = 10_800;

/// IPv4 endpoints (port 8080) `first..=last` of 10.244.1.0/24. The FIB
/// namespace routes that prefix through node B, so every case's flows leave
/// by the same XDP_TX; a pod of this node really sits behind a veth, which
/// XDP hands to tc (`pass_to_tc`), a different path. The Local Service's
/// endpoints on this node (`nodeName: node-a`) are therefore numbered here
/// too.
fn pool(first: u8, last: u8) -> Vec<SocketAddr> {
    (first..=last)
        .map(|i| SocketAddr::new(IpAddr::from([10, 244, 1, i]), 8080))
        .collect()
}

/// Endpoints of `affinity`, `lb` and the remote ones of `local` (node B).
fn pool_a() -> Vec<SocketAddr> {
    pool(101, 110)
}

/// Endpoints of `ranged` on this node (node-a).
fn pool_b() -> Vec<SocketAddr> {
    pool(203, 204)
}

/// The Local Service's endpoints on this node (node-a).
fn pool_local() -> Vec<SocketAddr> {
    pool(201, 202)
}

fn backend_v4(i: u32) -> SocketAddr {
    SocketAddr::new(IpAddr::from([10, 244, 1, i as u8]), 8080)
}

fn backend_v6(i: u32) -> SocketAddr {
    SocketAddr::new(format!("fd00:244:1::{i:x}").parse().unwrap(), 8080)
}

fn node_config(cluster_cidrs: bool) -> Result<NodeConfig> {
    Ok(NodeConfig {
        snat_v4: Some([192, 0, 2, 1].into()),
        snat_v6: Some("2001:db8::1".parse()?),
        snat_ports: (lb_common::SNAT_PORT_MIN, lb_common::SNAT_PORT_MAX),
        cluster_cidrs,
    })
}

fn cluster_cidrs() -> Vec<Cidr> {
    CLUSTER_CIDRS
        .iter()
        .map(|c| {
            let p = Prefix::parse(c).expect("a CIDR");
            (p.addr, p.len)
        })
        .collect()
}

fn service_key(front: SocketAddr, proto: u8) -> ServiceKey {
    let (addr, family) = lb_common::addr16(front.ip());
    ServiceKey {
        addr,
        port: front.port(),
        proto,
        family,
        _pad: [0; 4],
    }
}

impl Lab {
    /// The lab, its Services written as manifests under `dir` and synced
    /// ([`State::Plain`]).
    fn new(dir: &Path) -> Result<Self> {
        let sizes = Sizes {
            services: 1024,
            service_ids: 16,
            backends: 256,
            maglev_entries: lb_common::capacity::MAGLEV_ENTRIES,
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
        maps.set_config(&node_config(false)?)?;
        maps.add_tx_port(uplink)?;
        let mut bench =
            crate::load_bench(&["bench_floor", "bench_nop", "bench_wrap", "bench_lru"])?;
        let tmpl = Array::try_from(bench.take_map("bench_tmpl").context("bench_tmpl")?)?;
        let jmp = ProgramArray::try_from(bench.take_map("bench_jmp").context("bench_jmp")?)?;
        let counter = PerCpuArray::try_from(bench.take_map("bench_cnt").context("bench_cnt")?)?;
        let lru = HashMap::try_from(bench.take_map("bench_lru_tbl").context("bench_lru_tbl")?)?;
        // The services go in the way the agent writes them: manifests into its
        // sync engine.
        let plain_dir = dir.join("plain");
        let features_dir = dir.join("features");
        write_manifests(&plain_dir)?;
        write_manifests(&features_dir)?;
        write_feature_manifests(&features_dir)?;
        let engine = Engine::new(
            Reconciler::adopt(maps)?,
            NodeInfo {
                name: "node-a".into(),
                addresses: vec!["192.0.2.1".parse()?, "2001:db8::1".parse()?],
                zone: None,
            },
        );
        let mut lab = Self {
            _dp_keep: dp,
            engine,
            bench,
            tmpl,
            jmp,
            counter,
            lru,
            uplink,
            lb_fd,
            plain_dir,
            features_dir,
            state: Some(State::Plain),
        };
        lab.sync_manifests(State::Plain)?;
        lab.check_state(State::Plain)?;
        Ok(lab)
    }

    /// Gives the sync engine the manifests of `state` as a full listing, as
    /// the manifest source does, and syncs.
    fn sync_manifests(&mut self, state: State) -> Result<()> {
        let dir = if state == State::Plain {
            &self.plain_dir
        } else {
            &self.features_dir
        };
        let loaded = manifests::load_dir(dir);
        ensure!(
            loaded.problems.is_empty(),
            "manifest problems: {:?}",
            loaded.problems.first()
        );
        self.engine.take(SourceEvent::Resync {
            services: loaded.services,
            slices: loaded.slices,
            problems: Vec::new(),
        });
        if let Some(sync) = self.engine.sync() {
            ensure!(
                sync.problems.is_empty(),
                "sync: {:?}",
                sync.problems.first()
            );
        }
        Ok(())
    }

    /// Brings the maps to `state`: its Services through the sync engine, and
    /// the cluster CIDRs as the agent writes them (the prefixes before the
    /// `config` flag that makes the datapath read them; the flag off first).
    fn set_state(&mut self, state: State) -> Result<()> {
        if self.state == Some(state) {
            return Ok(());
        }
        // Unknown until the maps are found in `state`: every case switches
        // (and checks) again until then.
        self.state = None;
        self.sync_manifests(state)?;
        {
            let mut r = self.reconciler();
            let maps = r.maps_mut();
            if state == State::Cidrs {
                maps.set_cluster_cidrs(&cluster_cidrs())?;
                maps.set_config(&node_config(true)?)?;
            } else {
                maps.set_config(&node_config(false)?)?;
                maps.set_cluster_cidrs(&[])?;
            }
        }
        self.check_state(state)
            .with_context(|| format!("the maps in state {state:?}"))?;
        self.state = Some(state);
        Ok(())
    }

    fn frontend(&self, front: SocketAddr) -> Option<Service> {
        self.reconciler()
            .maps()
            .services
            .get(&service_key(front, TCP), 0)
            .ok()
    }

    /// Checks that the maps hold what the state says: the feature frontends
    /// with their flags (or none of them), the source ranges, the config flag.
    fn check_state(&self, state: State) -> Result<()> {
        let features = state != State::Plain;
        let web = self.frontend(sock(VIP)).context("no web frontend")?;
        ensure!(
            web.flags & (SVC_F_AFFINITY | SVC_F_SOURCE_RANGES | SVC_F_LOCAL | SVC_F_EXTERNAL) == 0,
            "web has feature flags: {web:?}"
        );
        let fronts = [VIP_AFFINITY, LB_IP, LB_IP_RANGES, LB_IP_LOCAL, LB_IP_NONE];
        if !features {
            for f in fronts {
                ensure!(self.frontend(sock(f)).is_none(), "{f} is still a frontend");
            }
        } else {
            let [aff, lb, ranged, local, none] = fronts.map(|f| self.frontend(sock(f)));
            let aff = aff.context("no affinity frontend")?;
            ensure!(
                aff.flags & SVC_F_AFFINITY != 0 && aff.affinity_timeout == AFFINITY_TIMEOUT,
                "affinity frontend: {aff:?}"
            );
            let lb = lb.context("no LoadBalancer IP frontend")?;
            ensure!(
                lb.flags & (SVC_F_EXTERNAL | SVC_F_SNAT_REMOTE)
                    == SVC_F_EXTERNAL | SVC_F_SNAT_REMOTE
                    && lb.flags & (SVC_F_SOURCE_RANGES | SVC_F_AFFINITY | SVC_F_LOCAL) == 0,
                "LoadBalancer IP frontend: {lb:?}"
            );
            let ranged = ranged.context("no source-ranges frontend")?;
            ensure!(
                ranged.flags & (SVC_F_EXTERNAL | SVC_F_LOCAL | SVC_F_SOURCE_RANGES)
                    == SVC_F_EXTERNAL | SVC_F_LOCAL | SVC_F_SOURCE_RANGES
                    && ranged.flags & SVC_F_SNAT_REMOTE == 0
                    && ranged.backend_count == pool_b().len() as u32,
                "source-ranges frontend: {ranged:?}"
            );
            // The Service is IPv4 only: its IPv4 prefixes are written.
            let ranges = self.reconciler().maps().source_ranges()?;
            let n = ranges
                .iter()
                .filter(|(id, (addr, _))| *id == ranged.id && addr.is_ipv4())
                .count();
            let want = SOURCE_RANGES.iter().filter(|r| !r.contains(':')).count();
            ensure!(
                n == want,
                "{n} IPv4 source ranges for {LB_IP_RANGES}, not {want}"
            );
            let local = local.context("no Local frontend")?;
            ensure!(
                local.flags & (SVC_F_EXTERNAL | SVC_F_LOCAL) == SVC_F_EXTERNAL | SVC_F_LOCAL
                    && local.flags & SVC_F_SNAT_REMOTE == 0
                    && local.backend_count == pool_local().len() as u32
                    && local.cluster_backend_count == (pool_local().len() + pool_a().len()) as u32,
                "Local frontend: {local:?}"
            );
            let none = none.context("no Local frontend without local endpoints")?;
            ensure!(
                none.flags & (SVC_F_EXTERNAL | SVC_F_LOCAL) == SVC_F_EXTERNAL | SVC_F_LOCAL
                    && none.backend_count == 0
                    && none.cluster_backend_count == pool_a().len() as u32,
                "Local frontend without local endpoints: {none:?}"
            );
        }
        let cfg = self.reconciler().maps().config.get(&0, 0)?;
        ensure!(
            (cfg.flags & CFG_F_CLUSTER_CIDRS != 0) == (state == State::Cidrs),
            "config flags {:#x}",
            cfg.flags
        );
        Ok(())
    }

    /// The reconciler, for its maps (locked while the guard lasts).
    fn reconciler(&self) -> MutexGuard<'_, Reconciler> {
        self.engine.reconciler()
    }

    fn prog(&self, name: &str) -> Result<&Xdp> {
        crate::bench_prog(&self.bench, name)
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

    fn template(&mut self, frame: &[u8], vary: Vary) -> Result<()> {
        self.tmpl.set(0, Template::new(frame, vary as u32, 0)?, 0)?;
        Ok(())
    }

    fn counter(&self) -> Result<u64> {
        Ok(self.counter.get(&0, 0)?.iter().sum())
    }

    /// Checks that `bench_lru` inserted the key of its last iteration (as it
    /// builds it: its counter in the first bytes of `src`, the CPU in the
    /// next, TCP, IPv4).
    fn check_lru_insert(&self) -> Result<()> {
        let cpu = cpu::bench_cpu();
        let n: u64 = self.counter.get(&lb_common::bench_keys::SLOT_LRU, 0)?[cpu];
        ensure!(n > 0, "bench_lru inserted nothing");
        let key = lb_common::bench_keys::key40(n - 1, cpu as u32);
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
    fn wrapped(&mut self, frame: &[u8], vary: Vary, repeat: u32) -> Result<(u32, f64, Vec<u8>)> {
        self.target(true)?;
        self.template(frame, vary)?;
        test_run(self.prog("bench_wrap")?, frame, repeat, self.uplink)
    }

    fn conntrack_entry(&self, key: &FlowKey) -> Option<CtEntry> {
        self.reconciler().maps().conntrack.get(key, 0).ok()
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
        let f = frame(macs_from(src), src, dst, proto, SYN);
        let (ret, _, _) = self.wrapped(&f, Vary::No, 1)?;
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

    /// The `count` last flows a varied run opened (the counter after it is
    /// `end`): each client and its forward conntrack entry.
    fn last_flows(
        &self,
        vary: Vary,
        client: SocketAddr,
        front: SocketAddr,
        end: u64,
        count: u64,
    ) -> Result<Vec<(SocketAddr, CtEntry)>> {
        (end.saturating_sub(count)..end)
            .map(|idx| {
                let src = varied(vary, client, idx as u32);
                let e = self
                    .conntrack_entry(&FlowKey::new(src, front, TCP))
                    .with_context(|| format!("no conntrack entry for flow {idx} ({src})"))?;
                ensure!(
                    e.flags & CT_F_FORWARD != 0,
                    "flow {idx}: not a forward entry"
                );
                Ok((src, e))
            })
            .collect()
    }

    /// Where the affinity of `client` to the Service port of `front` points.
    fn affinity_of(&self, client: SocketAddr, front: SocketAddr) -> Result<SocketAddr> {
        let id = self.frontend(front).context("no frontend")?.id;
        let (addr, family) = lb_common::addr16(client.ip());
        let key = AffinityKey {
            client: addr,
            service: id,
            family,
            _pad: [0; 3],
        };
        let a = self
            .reconciler()
            .maps()
            .affinity
            .get(&key, 0)
            .with_context(|| format!("no affinity entry for {client}"))?;
        lb_common::socket_addr(&a.addr, family, a.port).context("affinity address")
    }
}

/// Checks a case's output frame.
type Check = Box<dyn Fn(&Decoded) -> Result<()>>;

/// Checks the maps after a varied case's run, given the last flows it opened
/// (see [`Lab::last_flows`]); may run probes of its own.
type After = Box<dyn Fn(&mut Lab, &[(SocketAddr, CtEntry)]) -> Result<()>>;

/// How a feature case is reported: against the baseline (`new_flow` or
/// `established`, state Plain) as a ratio, and against its `partner` (same
/// round, differing in the one feature) as a difference in ns.
#[derive(Clone, Copy)]
struct Compare {
    baseline: &'static str,
    partner: Option<&'static str>,
}

/// One measured case.
struct Case {
    key: &'static str,
    label: &'static str,
    state: State,
    frame: Vec<u8>,
    vary: Vary,
    /// Flows opened anew before each run (established cases).
    opens: Vec<(SocketAddr, SocketAddr, u8)>,
    ret: u32,
    reason: Reason,
    check: Check,
    after: Option<After>,
    /// None: one of the first table's cases.
    compare: Option<Compare>,
}

/// How many of a varied run's last flows the feature checks look at.
const LAST_FLOWS: u64 = 16;

/// The source `bench_wrap` gives flow `idx` with `vary` (see
/// lb-ebpf/src/bench.rs): [`Vary::Port`]: the port plus idx, the low 16 bits
/// of the address plus idx >> 16; [`Vary::Addr`]: the port kept, the low 16
/// bits of the address plus idx, its high 16 bits plus idx >> 16; each
/// wrapping.
pub fn varied(vary: Vary, base: SocketAddr, idx: u32) -> SocketAddr {
    let IpAddr::V4(a) = base.ip() else {
        return base;
    };
    let o = a.octets();
    let hi = u16::from_be_bytes([o[0], o[1]]);
    let lo = u16::from_be_bytes([o[2], o[3]]);
    let (hi, lo, port) = match vary {
        Vary::No => (hi, lo, base.port()),
        Vary::Port => (
            hi,
            lo.wrapping_add((idx >> 16) as u16),
            base.port().wrapping_add(idx as u16),
        ),
        Vary::Addr => (
            hi.wrapping_add((idx >> 16) as u16),
            lo.wrapping_add(idx as u16),
            base.port(),
        ),
    };
    let (h, l) = (hi.to_be_bytes(), lo.to_be_bytes());
    SocketAddr::new(IpAddr::from([h[0], h[1], l[0], l[1]]), port)
}

/// The Service the baseline cases hit, as manifests: dual-stack NodePort
/// `web` (TCP 80, UDP 53; NodePorts 30080, 30053), 10 ready pods per family
/// on node B.
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

/// One IPv4 TCP Service `name` (port 80 to 8080) with `spec` lines added to
/// its spec, `lb_ip` as its LoadBalancer ingress, and one EndpointSlice of
/// `endpoints` (address, node).
fn feature_service(
    name: &str,
    kind: &str,
    cluster_ip: &str,
    node_port: Option<u16>,
    spec: &str,
    lb_ip: Option<SocketAddr>,
    endpoints: &[(SocketAddr, &str)],
) -> String {
    let mut y = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  \
         type: {kind}\n  clusterIP: {cluster_ip}\n  clusterIPs: [{cluster_ip}]\n  \
         ipFamilies: [IPv4]\n  ipFamilyPolicy: SingleStack\n{spec}  ports:\n  \
         - {{name: tcp, port: 80, protocol: TCP, targetPort: 8080"
    );
    if let Some(np) = node_port {
        y.push_str(&format!(", nodePort: {np}"));
    }
    y.push_str("}\n");
    if let Some(ip) = lb_ip {
        y.push_str(&format!(
            "status:\n  loadBalancer:\n    ingress:\n    - ip: {}\n",
            ip.ip()
        ));
    }
    y.push_str(&format!(
        "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-v4\n  \
         namespace: default\n  labels: {{kubernetes.io/service-name: {name}}}\naddressType: IPv4\n\
         ports: [{{name: tcp, port: 8080, protocol: TCP}}]\nendpoints:\n"
    ));
    for (a, node) in endpoints {
        y.push_str(&format!(
            "- {{addresses: ['{}'], nodeName: {node}, conditions: {{ready: true}}}}\n",
            a.ip()
        ));
    }
    y
}

/// The Services that use the features, beside `web` in [`State::Features`]
/// and [`State::Cidrs`]: `affinity` (ClusterIP, sessionAffinity ClientIP),
/// `lb` (LoadBalancer IP, externalTrafficPolicy Cluster: source NAT to remote
/// endpoints), `ranged` (the same with loadBalancerSourceRanges), `local`
/// (LoadBalancer IP, externalTrafficPolicy Local, endpoints on both nodes)
/// and `local-none` (the same, endpoints on the other node only).
fn write_feature_manifests(dir: &Path) -> Result<()> {
    let on = |pool: Vec<SocketAddr>, node: &'static str| {
        pool.into_iter().map(move |a| (a, node)).collect::<Vec<_>>()
    };
    let remote = on(pool_a(), "node-b");
    let cluster = "  externalTrafficPolicy: Cluster\n";
    let ranges: Vec<String> = SOURCE_RANGES.iter().map(|r| format!("'{r}'")).collect();
    let mut local = on(pool_local(), "node-a");
    local.extend(remote.iter().copied());
    let docs = [
        feature_service(
            "affinity",
            "ClusterIP",
            "10.96.0.20",
            None,
            &format!(
                "  sessionAffinity: ClientIP\n  \
                 sessionAffinityConfig: {{clientIP: {{timeoutSeconds: {AFFINITY_TIMEOUT}}}}}\n"
            ),
            None,
            &remote,
        ),
        feature_service(
            "lb",
            "LoadBalancer",
            "10.96.0.21",
            Some(30081),
            cluster,
            Some(sock(LB_IP)),
            &remote,
        ),
        feature_service(
            "ranged",
            "LoadBalancer",
            "10.96.0.22",
            Some(30082),
            &format!(
                "  externalTrafficPolicy: Local\n  healthCheckNodePort: 32082\n  \
                 loadBalancerSourceRanges: [{}]\n",
                ranges.join(", ")
            ),
            Some(sock(LB_IP_RANGES)),
            &on(pool_b(), "node-a"),
        ),
        feature_service(
            "local",
            "LoadBalancer",
            "10.96.0.23",
            Some(30083),
            "  externalTrafficPolicy: Local\n  healthCheckNodePort: 32083\n",
            Some(sock(LB_IP_LOCAL)),
            &local,
        ),
        feature_service(
            "local-none",
            "LoadBalancer",
            "10.96.0.24",
            Some(30084),
            "  externalTrafficPolicy: Local\n  healthCheckNodePort: 32084\n",
            Some(sock(LB_IP_NONE)),
            &remote,
        ),
    ];
    std::fs::write(dir.join("features.yaml"), docs.join("---\n"))?;
    Ok(())
}

/// The flows the established cases (and the reply case) hit.
fn established_flows() -> Vec<(SocketAddr, SocketAddr, u8)> {
    let client = sock(CLIENT);
    vec![
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

/// Where an output frame comes from.
#[derive(Clone, Copy)]
enum From {
    /// The node's address (source NAT).
    Node,
    /// The client (not NATed): the case's client or, varied, one in its /16.
    Client(IpAddr),
    /// A client (not NATed) with an address of its own (see [`Vary::Addr`]).
    AnyClient,
}

/// The output went to one of `pool`, from `from`.
fn sent(d: &Decoded, pool: &[SocketAddr], from: From) -> Result<()> {
    ensure!(pool.contains(&d.dst_addr()), "not sent to the pool: {d:?}");
    ensure!(
        d.eth_dst == NODE_B_MAC && d.ttl == 63,
        "not forwarded: {d:?}"
    );
    let ok = match (from, d.src) {
        (From::Node, src) => src == NODE_IP,
        (From::AnyClient, src) => src != NODE_IP,
        (From::Client(IpAddr::V4(c)), IpAddr::V4(src)) => {
            IpAddr::V4(src) != NODE_IP && src.octets()[..2] == c.octets()[..2]
        }
        (From::Client(c), src) => src == c,
    };
    ensure!(ok, "from {}: {d:?}", d.src);
    Ok(())
}

const NODE_IP: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1));

/// The base cases: the first table, measured with `web` alone.
fn base_cases(chosen: SocketAddr) -> Vec<Case> {
    let client = sock(CLIENT);
    let vip = sock(VIP);
    let np = sock(NODEPORT);
    let syn = frame(FROM_ROUTER, client, vip, TCP, SYN);
    let plain = |key, label, frame, vary, ret, reason, check| Case {
        key,
        label,
        state: State::Plain,
        frame,
        vary,
        opens: if vary == Vary::No {
            established_flows()
        } else {
            Vec::new()
        },
        ret,
        reason,
        check,
        after: None,
        compare: None,
    };
    vec![
        plain(
            "non_service",
            "non-service traffic (pass to kernel)",
            frame(FROM_ROUTER, client, sock(NOT_SERVICE), TCP, ACK),
            Vary::No,
            XDP_PASS,
            Reason::PassNotService,
            Box::new(move |d: &Decoded| {
                ensure!(
                    d.dst_addr() == sock(NOT_SERVICE) && d.src_addr() == client,
                    "frame changed: {d:?}"
                );
                Ok(())
            }) as Check,
        ),
        plain(
            "new_flow",
            "TCP SYN to a ClusterIP (new flow: Maglev, 2 inserts)",
            syn,
            Vary::Port,
            XDP_TX,
            Reason::Tx,
            Box::new(|d: &Decoded| {
                ensure!(is_backend(d.dst_addr()), "not sent to a backend: {d:?}");
                ensure!(
                    d.eth_dst == NODE_B_MAC && d.ttl == 63,
                    "not forwarded: {d:?}"
                );
                Ok(())
            }),
        ),
        plain(
            "established",
            "TCP established to a ClusterIP (conntrack hit)",
            frame(FROM_ROUTER, client, vip, TCP, ACK),
            Vary::No,
            XDP_TX,
            Reason::Tx,
            Box::new(move |d: &Decoded| {
                ensure!(
                    d.dst_addr() == chosen && d.src_addr() == client,
                    "not translated: {d:?}"
                );
                ensure!(d.eth_dst == NODE_B_MAC, "not forwarded to node B: {d:?}");
                Ok(())
            }),
        ),
        plain(
            "reply",
            "reply reverse-translated (backend -> client)",
            frame(FROM_NODE_B, chosen, client, TCP, ACK),
            Vary::No,
            XDP_TX,
            Reason::Tx,
            Box::new(move |d: &Decoded| {
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
        ),
        plain(
            "nodeport_snat",
            "NodePort with source NAT (established)",
            frame(FROM_ROUTER, client, np, TCP, ACK),
            Vary::No,
            XDP_TX,
            Reason::Tx,
            Box::new(|d: &Decoded| {
                ensure!(is_backend(d.dst_addr()), "not sent to a backend: {d:?}");
                ensure!(
                    d.src == NODE_IP && d.src_addr().port() >= lb_common::SNAT_PORT_MIN,
                    "not source-NATed: {d:?}"
                );
                Ok(())
            }),
        ),
        plain(
            "udp",
            "UDP to a ClusterIP (established)",
            frame(FROM_ROUTER, client, sock(VIP_UDP), UDP, 0),
            Vary::No,
            XDP_TX,
            Reason::Tx,
            Box::new(move |d: &Decoded| {
                ensure!(
                    is_backend(d.dst_addr())
                        && d.src_addr() == client
                        && matches!(d.l4, L4::Udp { .. }),
                    "not translated: {d:?}"
                );
                Ok(())
            }),
        ),
        plain(
            "ipv6",
            "IPv6 TCP established to a ClusterIP",
            frame(FROM_ROUTER, sock(CLIENT6), sock(VIP6), TCP, ACK),
            Vary::No,
            XDP_TX,
            Reason::Tx,
            Box::new(|d: &Decoded| {
                ensure!(is_backend(d.dst_addr()), "not sent to a backend: {d:?}");
                ensure!(d.ttl == 63, "hop limit not decremented: {d:?}");
                Ok(())
            }),
        ),
    ]
}

/// The feature cases' keys, in the order they are reported (each reports
/// `ns`, `ratio` and, with a partner, `delta`).
pub const FEATURE_KEYS: [&str; 17] = [
    "others_new_flow",
    "others_established",
    "pod_new_flow",
    "pod_established",
    "affinity_first",
    "affinity_next",
    "lb_ip",
    "local_outside",
    "source_ranges",
    "no_local_endpoint",
    "range_blocked",
    "cidrs_pod_new_flow",
    "cidrs_pod_established",
    "masquerade",
    "cidrs_local_outside",
    "cidrs_local_inside",
    "cidrs_no_local_endpoint",
];

/// The order the feature cases run in, within each round (after the first
/// table's): each soon after its partner.
const FEATURE_ORDER: [&str; 17] = [
    "others_new_flow",
    "others_established",
    "affinity_next",
    "affinity_first",
    "lb_ip",
    "pod_new_flow",
    "cidrs_pod_new_flow",
    "pod_established",
    "cidrs_pod_established",
    "masquerade",
    "local_outside",
    "source_ranges",
    "cidrs_local_outside",
    "cidrs_local_inside",
    "no_local_endpoint",
    "range_blocked",
    "cidrs_no_local_endpoint",
];

/// The keys of the feature cases' figures: `ns`, `ratio` and, for a case
/// with a partner, `delta`.
pub fn feature_figure_keys() -> Vec<String> {
    let cases = feature_cases();
    FEATURE_KEYS
        .iter()
        .flat_map(|k| {
            let c = cases.iter().find(|c| c.key == *k).expect("a case");
            let delta = c.compare.is_some_and(|cmp| cmp.partner.is_some());
            ["ns", "ratio"]
                .into_iter()
                .chain(delta.then_some("delta"))
                .map(move |f| format!("per_packet.{k}.{f}"))
        })
        .collect()
}

/// The feature cases (reported in the order of [`FEATURE_KEYS`]).
fn feature_cases() -> Vec<Case> {
    let client = sock(CLIENT);
    let pod = sock(POD_CLIENT);
    let vip = sock(VIP);
    let web_pool: Vec<SocketAddr> = (1..=BACKENDS).map(backend_v4).collect();
    let mut local_or_a = pool_local();
    local_or_a.extend(pool_a());
    let new_flow =
        |key, label, state, src: SocketAddr, dst: &str, vary, partner, check, after| Case {
            key,
            label,
            state,
            frame: frame(macs_from(src), src, sock(dst), TCP, SYN),
            vary,
            opens: Vec::new(),
            ret: XDP_TX,
            reason: Reason::Tx,
            check,
            after,
            compare: Some(Compare {
                baseline: "new_flow",
                partner: Some(partner),
            }),
        };
    let established = |key, label, state, src: SocketAddr, partner, pool: Vec<SocketAddr>| Case {
        key,
        label,
        state,
        frame: frame(macs_from(src), src, vip, TCP, ACK),
        vary: Vary::No,
        opens: vec![(src, vip, TCP)],
        ret: XDP_TX,
        reason: Reason::Tx,
        check: Box::new(move |d: &Decoded| sent(d, &pool, From::Client(src.ip()))) as Check,
        after: None,
        compare: Some(Compare {
            baseline: "established",
            partner: Some(partner),
        }),
    };
    // A new flow dropped by a policy (no conntrack insert: what the check
    // itself costs shows, without the inserts' noise).
    let dropped = |key, label, state, src: SocketAddr, dst: &str, reason, partner| {
        let front = sock(dst);
        Case {
            key,
            label,
            state,
            frame: frame(macs_from(src), src, front, TCP, SYN),
            vary: Vary::No,
            opens: Vec::new(),
            ret: XDP_DROP,
            reason,
            check: Box::new(move |d: &Decoded| {
                ensure!(
                    (d.src_addr(), d.dst_addr()) == (src, front),
                    "frame changed: {d:?}"
                );
                Ok(())
            }) as Check,
            after: None,
            compare: Some(Compare {
                baseline: "established",
                partner,
            }),
        }
    };
    // No flow of these was source-NATed (or all were).
    let snat = |want: bool| -> After {
        Box::new(move |_: &mut Lab, flows: &[(SocketAddr, CtEntry)]| {
            for (src, e) in flows {
                ensure!(
                    (e.flags & CT_F_SNAT != 0) == want,
                    "flow from {src}: source NAT {}, expected {want}",
                    e.flags & CT_F_SNAT != 0
                );
            }
            Ok(())
        })
    };
    // Which endpoints the last flows went to: all in `within`, and (if
    // given) some in `some_in`.
    let went = |within: Vec<SocketAddr>, some_in: Option<Vec<SocketAddr>>| -> After {
        Box::new(move |_: &mut Lab, flows: &[(SocketAddr, CtEntry)]| {
            let to: Vec<SocketAddr> = flows
                .iter()
                .map(|(_, e)| lb_common::socket_addr(&e.nat_dst, FAMILY_V4, e.nat_dst_port))
                .collect::<Option<_>>()
                .context("an endpoint address")?;
            ensure!(
                to.iter().all(|a| within.contains(a)),
                "endpoints outside the expected ones: {to:?}"
            );
            if let Some(some) = &some_in {
                ensure!(
                    to.iter().any(|a| some.contains(a)),
                    "none of {} flows went to {some:?}: {to:?}",
                    to.len()
                );
            }
            Ok(())
        })
    };
    let web_pool2 = web_pool.clone();
    let web_pool3 = web_pool.clone();
    let local_or_a2 = local_or_a.clone();
    vec![
        // What the features cost a Service that uses none of them.
        new_flow(
            "others_new_flow",
            "TCP SYN to a ClusterIP (web), other Services using the features",
            State::Features,
            client,
            VIP,
            Vary::Port,
            "new_flow",
            Box::new(move |d: &Decoded| sent(d, &web_pool, From::Client(client.ip()))) as Check,
            Some(snat(false)),
        ),
        established(
            "others_established",
            "TCP established to a ClusterIP (web), other Services using the features",
            State::Features,
            client,
            "established",
            web_pool2.clone(),
        ),
        new_flow(
            "pod_new_flow",
            "TCP SYN from a pod to a ClusterIP (web), no cluster CIDRs",
            State::Features,
            pod,
            VIP,
            Vary::Port,
            "others_new_flow",
            Box::new(move |d: &Decoded| sent(d, &web_pool2, From::Client(pod.ip()))),
            Some(snat(false)),
        ),
        established(
            "pod_established",
            "TCP established from a pod to a ClusterIP (web), no cluster CIDRs",
            State::Features,
            pod,
            "others_established",
            web_pool3.clone(),
        ),
        // Session affinity: a client's first flow misses (and inserts), its
        // next ones hit.
        new_flow(
            "affinity_first",
            "sessionAffinity ClientIP: a client's first flow (miss + insert)",
            State::Features,
            client,
            VIP_AFFINITY,
            Vary::Addr,
            "others_new_flow",
            Box::new(|d: &Decoded| sent(d, &pool_a(), From::AnyClient)),
            Some(Box::new(
                |lab: &mut Lab, flows: &[(SocketAddr, CtEntry)]| {
                    let clients: std::collections::BTreeSet<IpAddr> =
                        flows.iter().map(|(c, _)| c.ip()).collect();
                    ensure!(clients.len() == flows.len(), "clients repeat: {clients:?}");
                    for (c, e) in flows {
                        let to = lb_common::socket_addr(&e.nat_dst, FAMILY_V4, e.nat_dst_port);
                        let a = lab.affinity_of(*c, sock(VIP_AFFINITY))?;
                        ensure!(Some(a) == to, "{c}: affinity to {a}, flow to {to:?}");
                    }
                    Ok(())
                },
            )),
        ),
        new_flow(
            "affinity_next",
            "sessionAffinity ClientIP: a client's next flow (hit)",
            State::Features,
            client,
            VIP_AFFINITY,
            Vary::Port,
            "others_new_flow",
            Box::new(move |d: &Decoded| sent(d, &pool_a(), From::Client(client.ip()))),
            Some(Box::new(
                |lab: &mut Lab, flows: &[(SocketAddr, CtEntry)]| {
                    // A client keeps its address for 65,536 flows: the last
                    // flows are of one or two clients, each at one endpoint, its
                    // affinity's.
                    let mut clients: Vec<IpAddr> = flows.iter().map(|(c, _)| c.ip()).collect();
                    clients.dedup();
                    ensure!(clients.len() <= 2, "clients: {clients:?}");
                    let most = clients
                        .iter()
                        .map(|ip| flows.iter().filter(|(c, _)| c.ip() == *ip).count())
                        .max()
                        .unwrap_or(0);
                    ensure!(most >= 8, "at most {most} flows of one client");
                    for ip in clients {
                        let a = lab.affinity_of(SocketAddr::new(ip, 0), sock(VIP_AFFINITY))?;
                        for (c, e) in flows.iter().filter(|(c, _)| c.ip() == ip) {
                            let to = lb_common::socket_addr(&e.nat_dst, FAMILY_V4, e.nat_dst_port);
                            ensure!(Some(a) == to, "{c}: affinity to {a}, the flow to {to:?}");
                        }
                    }
                    Ok(())
                },
            )),
        ),
        // Source ranges, on a LoadBalancer IP (source NAT to remote
        // endpoints, as any LoadBalancer IP with the Cluster policy).
        new_flow(
            "lb_ip",
            "TCP SYN to a LoadBalancer IP (Cluster policy: source NAT)",
            State::Features,
            client,
            LB_IP,
            Vary::Port,
            "others_new_flow",
            Box::new(|d: &Decoded| sent(d, &pool_a(), From::Node)),
            Some(snat(true)),
        ),
        new_flow(
            "source_ranges",
            "loadBalancerSourceRanges: Local LoadBalancer IP, a client in the ranges",
            State::Features,
            client,
            LB_IP_RANGES,
            Vary::Port,
            "local_outside",
            Box::new(move |d: &Decoded| sent(d, &pool_b(), From::Client(client.ip()))),
            Some(Box::new(
                move |lab: &mut Lab, flows: &[(SocketAddr, CtEntry)]| {
                    went(pool_b(), None)(lab, flows)?;
                    // The ranges are in force: a client outside them is dropped.
                    let blocked = sock(BLOCKED_CLIENT);
                    let before = lab.reasons()?;
                    let f = frame(FROM_ROUTER, blocked, sock(LB_IP_RANGES), TCP, SYN);
                    let (ret, _, _) = lab.wrapped(&f, Vary::No, 1)?;
                    let after = lab.reasons()?;
                    let r = Reason::DropSourceRange as usize;
                    ensure!(
                        ret == XDP_DROP && after[r] == before[r] + 1,
                        "a client outside the ranges: returned {ret}, {} drop_source_range",
                        after[r] - before[r]
                    );
                    Ok(())
                },
            )),
        ),
        // externalTrafficPolicy Local without the cluster CIDRs: every client
        // is an outside one, this node's endpoints only.
        new_flow(
            "local_outside",
            "externalTrafficPolicy Local: LoadBalancer IP, no cluster CIDRs",
            State::Features,
            client,
            LB_IP_LOCAL,
            Vary::Port,
            "others_new_flow",
            Box::new(move |d: &Decoded| sent(d, &pool_local(), From::Client(client.ip()))),
            Some(went(pool_local(), None)),
        ),
        // The cluster CIDRs configured: every new flow asks whether its
        // client is inside the cluster.
        new_flow(
            "cidrs_pod_new_flow",
            "cluster CIDRs: TCP SYN from a pod to a ClusterIP (web)",
            State::Cidrs,
            pod,
            VIP,
            Vary::Port,
            "pod_new_flow",
            Box::new(move |d: &Decoded| sent(d, &web_pool3, From::Client(pod.ip()))),
            Some(snat(false)),
        ),
        established(
            "cidrs_pod_established",
            "cluster CIDRs: TCP established from a pod to a ClusterIP (web)",
            State::Cidrs,
            pod,
            "pod_established",
            (1..=BACKENDS).map(backend_v4).collect(),
        ),
        new_flow(
            "masquerade",
            "cluster CIDRs: outside client to a ClusterIP (masqueraded)",
            State::Cidrs,
            client,
            VIP,
            Vary::Port,
            "others_new_flow",
            Box::new(|d: &Decoded| {
                sent(
                    d,
                    &(1..=BACKENDS).map(backend_v4).collect::<Vec<_>>(),
                    From::Node,
                )
            }),
            Some(snat(true)),
        ),
        new_flow(
            "cidrs_local_outside",
            "cluster CIDRs: Local LoadBalancer IP, outside client (local endpoints)",
            State::Cidrs,
            client,
            LB_IP_LOCAL,
            Vary::Port,
            "local_outside",
            Box::new(move |d: &Decoded| sent(d, &pool_local(), From::Client(client.ip()))),
            Some(went(pool_local(), None)),
        ),
        new_flow(
            "cidrs_local_inside",
            "cluster CIDRs: Local LoadBalancer IP, pod client (every endpoint)",
            State::Cidrs,
            pod,
            LB_IP_LOCAL,
            Vary::Port,
            "cidrs_local_outside",
            Box::new(move |d: &Decoded| sent(d, &local_or_a, From::Client(pod.ip()))),
            Some(went(local_or_a2, Some(pool_a()))),
        ),
        // The checks alone, on the paths where they drop a new flow.
        dropped(
            "no_local_endpoint",
            "Local without a local endpoint: new flow dropped",
            State::Features,
            client,
            LB_IP_NONE,
            Reason::DropNoLocalEndpoint,
            None,
        ),
        dropped(
            "range_blocked",
            "loadBalancerSourceRanges: a client outside them, dropped",
            State::Features,
            sock(BLOCKED_CLIENT),
            LB_IP_RANGES,
            Reason::DropSourceRange,
            Some("no_local_endpoint"),
        ),
        dropped(
            "cidrs_no_local_endpoint",
            "cluster CIDRs: Local without a local endpoint, outside client",
            State::Cidrs,
            client,
            LB_IP_NONE,
            Reason::DropNoLocalEndpoint,
            Some("no_local_endpoint"),
        ),
    ]
}

/// Runs one case; returns its time per iteration (wrapper included).
fn run_case(lab: &mut Lab, c: &Case, n: u32, slices: u32) -> Result<f64> {
    lab.set_state(c.state)?;
    for (src, dst, proto) in &c.opens {
        lab.reopen(*src, *dst, *proto)?;
    }
    let mut best = f64::INFINITY;
    for _ in 0..slices {
        best = best.min(run_slice(lab, c, n / slices)?);
    }
    Ok(best)
}

/// One checked run of `n` iterations of a case; its time per iteration.
fn run_slice(lab: &mut Lab, c: &Case, n: u32) -> Result<f64> {
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
        "returned {ret}, not {} (reasons: {})",
        c.ret,
        counted.join(", ")
    );
    let got: u64 = r1.iter().zip(&r0).map(|(a, b)| a - b).sum();
    let hit = r1[c.reason as usize] - r0[c.reason as usize];
    ensure!(
        hit == u64::from(n) && got == u64::from(n),
        "{hit} of {n} iterations counted under {}, {got} in all ({})",
        c.reason.name(),
        counted.join(", ")
    );
    let d = packet::check(&out)
        .and_then(|d| {
            ensure!(d.ports().is_some(), "not TCP or UDP: {d:?}");
            Ok(d)
        })
        .context("output frame")?;
    (c.check)(&d).context("output frame")?;
    let input = packet::check(&c.frame).context("the case's frame")?;
    let (client, front) = (input.src_addr(), input.dst_addr());
    let proto = if matches!(input.l4, L4::Udp { .. }) {
        UDP
    } else {
        TCP
    };
    // The frame left as the conntrack entry of its flow says.
    let matches = |e: &CtEntry, what: &str| -> Result<()> {
        let family = FlowKey::new(client, front, proto).family;
        let src = lb_common::socket_addr(&e.nat_src, family, e.nat_src_port);
        let dst = lb_common::socket_addr(&e.nat_dst, family, e.nat_dst_port);
        ensure!(
            Some(d.src_addr()) == src && Some(d.dst_addr()) == dst,
            "{what}: left as {} -> {}, its conntrack entry says {src:?} -> {dst:?}",
            d.src_addr(),
            d.dst_addr()
        );
        Ok(())
    };
    if c.ret == XDP_DROP {
        ensure!(
            lab.conntrack_entry(&FlowKey::new(client, front, proto))
                .is_none(),
            "a dropped flow is in conntrack"
        );
    }
    if c.vary == Vary::No {
        if c.reason == Reason::Tx {
            let e = lab
                .conntrack_entry(&FlowKey::new(client, front, proto))
                .context("no conntrack entry for the case's flow")?;
            matches(&e, "the flow")?;
        }
        return Ok(t);
    }
    let c1 = lab.counter()?;
    ensure!(c1 - c0 == u64::from(n), "{} flows varied, not {n}", c1 - c0);
    // The last iteration's flow is in conntrack, and the output is it.
    let last = c1 - 1;
    let src = varied(c.vary, client, last as u32);
    let e = lab
        .conntrack_entry(&FlowKey::new(src, front, proto))
        .with_context(|| format!("no conntrack entry for the last flow {src}"))?;
    ensure!(e.flags & CT_F_FORWARD != 0, "not a forward entry");
    matches(&e, "the last flow")?;
    if e.flags & CT_F_SNAT == 0 {
        ensure!(
            d.src_addr() == src,
            "last frame from {}, expected {src}",
            d.src_addr()
        );
    }
    if let Some(after) = &c.after {
        let flows = lab.last_flows(c.vary, client, front, c1, LAST_FLOWS.min(u64::from(n)))?;
        after(lab, &flows)?;
    }
    Ok(t)
}

fn measure(s: Settings, cpu: usize, manifests: &Path) -> Result<(Vec<Figure>, Vec<String>)> {
    let mut lab = Lab::new(manifests)?;
    let mut notes = Vec::new();
    let client = sock(CLIENT);

    // New flows really are new: on an empty table, N varied SYNs must leave
    // N forward and N reply entries.
    let syn = frame(FROM_ROUTER, client, sock(VIP), TCP, SYN);
    let before = lab.conntrack_len();
    let (ret, _, _) = lab.wrapped(&syn, Vary::Port, s.flow_check)?;
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

    // Then the table is filled, so that every measured new-flow run evicts
    // (the first round's first run would otherwise find room).
    let fill = lb_common::capacity::CONNTRACK / 2 + 20_000;
    let (ret, _, _) = lab.wrapped(&syn, Vary::Port, fill)?;
    ensure!(ret == XDP_TX, "filling conntrack returned {ret}");

    // Flows the established cases hit.
    for (src, dst, proto) in established_flows() {
        lab.reopen(src, dst, proto)?;
    }
    let fwd = lab
        .conntrack_entry(&FlowKey::new(client, sock(VIP), TCP))
        .context("the VIP flow's forward entry")?;
    ensure!(fwd.flags & CT_F_FORWARD != 0, "not a forward entry");
    let chosen = lb_common::socket_addr(&fwd.nat_dst, FAMILY_V4, fwd.nat_dst_port)
        .context("backend of the VIP flow")?;

    let mut cases = base_cases(chosen);
    cases.extend(feature_cases());
    // The first table's cases, then the feature cases, each as close to its
    // partner as the states allow (switching between the two feature states
    // is two map writes; to and from `web` alone, a sync).
    let order: Vec<usize> = cases
        .iter()
        .filter(|c| c.compare.is_none())
        .map(|c| c.key)
        .chain(FEATURE_ORDER)
        .map(|k| cases.iter().position(|c| c.key == k).expect("a case"))
        .collect();
    ensure!(
        order.len() == cases.len(),
        "cases left out of the run order"
    );

    let n = s.iterations;
    let rounds = s.rounds;
    let slices = s.slices.max(1);
    let mut floor = Vec::new();
    let mut nop = Vec::new();
    let mut wrap = Vec::new();
    let mut wrap_vary = Vec::new();
    let mut wrap_addr = Vec::new();
    let mut lru = Vec::new();
    let mut per_case: Vec<Vec<f64>> = vec![Vec::new(); cases.len()];
    let mut failed: Vec<Option<String>> = vec![None; cases.len()];
    let plain = frame(FROM_ROUTER, client, sock(VIP), TCP, ACK);
    let first_syn = frame(FROM_ROUTER, client, sock(VIP_AFFINITY), TCP, SYN);
    let slice = n / slices;
    let features_from = order
        .iter()
        .position(|&i| cases[i].compare.is_some())
        .unwrap_or(order.len());
    for round in 0..rounds {
        // Every other round runs the feature cases in reverse, so that no
        // case always follows the same one (what a run leaves in conntrack
        // shapes the next run's inserts).
        let mut order = order.clone();
        if round % 2 == 1 {
            order[features_from..].reverse();
        }
        // Each figure of a round is the best of its slices.
        let best = |run: &mut dyn FnMut() -> Result<f64>| -> Result<f64> {
            let mut best = f64::INFINITY;
            for _ in 0..slices {
                best = best.min(run()?);
            }
            Ok(best)
        };
        floor.push(best(&mut || {
            let (ret, t, _) = test_run(lab.prog("bench_floor")?, &plain, slice, lab.uplink)?;
            ensure!(ret == XDP_TX, "floor returned {ret}");
            Ok(t)
        })?);
        nop.push(best(&mut || {
            let (ret, t, _) = test_run(lab.prog("bench_nop")?, &plain, slice, lab.uplink)?;
            ensure!(ret == XDP_TX, "nop returned {ret}");
            Ok(t)
        })?);
        lru.push(best(&mut || {
            let (ret, t, _) = test_run(lab.prog("bench_lru")?, &plain, slice, lab.uplink)?;
            ensure!(ret == XDP_TX, "bench_lru returned {ret} (insert failed)");
            lab.check_lru_insert()?;
            Ok(t)
        })?);
        lab.target(false)?;
        for (f, vary, out) in [
            (&plain, Vary::No, &mut wrap),
            (&syn, Vary::Port, &mut wrap_vary),
            (&first_syn, Vary::Addr, &mut wrap_addr),
        ] {
            lab.template(f, vary)?;
            out.push(best(&mut || {
                let (ret, t, _) = test_run(lab.prog("bench_wrap")?, f, slice, lab.uplink)?;
                ensure!(ret == XDP_TX, "wrapper ({vary:?}) into nop returned {ret}");
                Ok(t)
            })?);
        }
        for &i in &order {
            let c = &cases[i];
            if failed[i].is_some() {
                continue;
            }
            match run_case(&mut lab, c, n, slices).with_context(|| c.key) {
                Ok(t) => {
                    let wrapper = match c.vary {
                        Vary::No => wrap.last(),
                        Vary::Port => wrap_vary.last(),
                        Vary::Addr => wrap_addr.last(),
                    };
                    per_case[i].push(t - (wrapper.unwrap() - nop.last().unwrap()));
                }
                Err(e) => failed[i] = Some(format!("{e:#}")),
            }
        }
    }
    let minus_nop = |w: &[f64]| -> Vec<f64> { w.iter().zip(&nop).map(|(w, n)| w - n).collect() };
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
            minus_nop(&wrap),
        ),
        Figure::new(
            sec,
            "per_packet.wrapper_vary.ns",
            "wrapper with per-packet flow (subtracted, new flow)",
            "ns",
            minus_nop(&wrap_vary),
        ),
        Figure::new(
            sec,
            "per_packet.lru_insert.ns",
            "reference: kernel LRU insert (conntrack's shape)",
            "ns",
            lru.clone(),
        ),
    ];
    let samples = |key: &str| -> Option<&Vec<f64>> {
        let i = cases.iter().position(|c| c.key == key)?;
        failed[i].is_none().then_some(&per_case[i])
    };
    let report_order = cases
        .iter()
        .filter(|c| c.compare.is_none())
        .map(|c| c.key)
        .chain(FEATURE_KEYS)
        .map(|k| cases.iter().position(|c| c.key == k).expect("a case"));
    for i in report_order {
        let c = &cases[i];
        if let Some(e) = &failed[i] {
            notes.push(format!(
                "Per-packet case `{}` FAILED its checks, no figure: {e}",
                c.key
            ));
            eprintln!("lb-bench: per-packet case {} failed: {e}", c.key);
            continue;
        }
        let ns = &per_case[i];
        if let Some(cmp) = c.compare {
            let fsec = "Per-packet cost of Service features (BPF_PROG_TEST_RUN, same run)";
            figs.push(Figure::new(
                fsec,
                &format!("per_packet.{}.ns", c.key),
                c.label,
                "ns",
                ns.clone(),
            ));
            // Per round: the case against the baseline and the partner of
            // the same round.
            if let Some(base) = samples(cmp.baseline) {
                figs.push(Figure::new(
                    fsec,
                    &format!("per_packet.{}.ratio", c.key),
                    &format!("  / {}", cmp.baseline),
                    "x",
                    ns.iter().zip(base).map(|(a, b)| a / b).collect(),
                ));
            }
            if let Some((key, partner)) = cmp.partner.and_then(|k| Some((k, samples(k)?))) {
                figs.push(Figure::new(
                    fsec,
                    &format!("per_packet.{}.delta", c.key),
                    &format!("  − {key}"),
                    "ns",
                    ns.iter().zip(partner).map(|(a, b)| a - b).collect(),
                ));
            }
            continue;
        }
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
    // Keep the sections apart: the feature figures after the first table.
    figs.sort_by_key(|f| f.section != sec);
    notes.push(format!(
        "Per-packet: {n} iterations per case and round, {rounds} interleaved rounds, thread \
         pinned to CPU {cpu} (sched_setaffinity; XDP test runs take no \
         BPF_F_TEST_RUN_ON_CPU); a round's figure of a case is the fastest of {slices} runs of \
         {slice} (on this shared machine noise only ever adds time). lb runs behind a wrapper \
         that restores the frame from a map and tail-calls lb_xdp; the wrapper's cost \
         (wrapper→nop minus nop, same round, for each way of varying the frame) is subtracted. \
         Each run is checked: return code, output frame (addresses, ports, all checksums, and \
         that it left as its conntrack entry says), and all N iterations under the expected \
         `reasons` counter. Conntrack holds {} entries (the agent's default) and is filled \
         before the first round, so every new-flow run includes LRU eviction, as on a busy \
         node; the LRU-insert reference runs on a table of the same shape, also full after the \
         first round.",
        lb_common::capacity::CONNTRACK
    ));
    notes.push(format!(
        "Per-packet Service features: each round runs the first table's cases with `web` alone \
         (a dual-stack NodePort, 10 endpoints a family), then, synced through the agent's \
         engine, with five more Services beside it (ClusterIP with sessionAffinity ClientIP; \
         LoadBalancer IP with externalTrafficPolicy Cluster; LoadBalancer IP with \
         externalTrafficPolicy Local, 2 endpoints on this node and 10 on another; the same with \
         {} loadBalancerSourceRanges, 2 endpoints here; the same without an endpoint here), \
         and with the cluster CIDRs ({}) written as the agent writes --cluster-cidr, in an \
         order that puts each case near its partner, reversed every other round (what a run \
         leaves in conntrack shapes the next run's inserts, source NAT's most: its ports). \
         `/ new_flow` and `/ established` are per-round ratios to the first table's cases; \
         `− x` is the per-round difference to case x of the same round, which differs in the \
         one feature. Checks beyond every case's: the affinity cases, that the last \
         {LAST_FLOWS} flows' affinity entries point where they went (first flows: a client \
         address each, the affinity LRU of {} clients full within each run, then evicting; \
         next flows: one endpoint per client); source NAT or none, on every last flow; source \
         ranges, that a client outside them is dropped; Local, the endpoints the last flows \
         went to (this node's only, or with the cluster CIDRs, some on the other node for a \
         pod); drops, that no conntrack entry was made. This node's endpoints have addresses \
         the namespace routes over the uplink, so that every case ends in the same XDP_TX (a \
         pod behind a veth is handed to tc, another path).",
        SOURCE_RANGES.len(),
        CLUSTER_CIDRS.join(", "),
        lb_common::capacity::AFFINITY
    ));
    Ok((figs, notes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn feature_cases_are_the_listed_ones_with_partners_that_run_before_them() {
        let base = base_cases(sock("10.244.1.1:8080"));
        let features = feature_cases();
        let mut keys: Vec<&str> = features.iter().map(|c| c.key).collect();
        keys.sort_unstable();
        let mut order = FEATURE_ORDER;
        order.sort_unstable();
        let mut sorted = FEATURE_KEYS;
        sorted.sort_unstable();
        assert_eq!(order, sorted, "every feature case runs, once");
        assert_eq!(keys, sorted, "every feature case is reported, once");
        for (i, key) in FEATURE_ORDER.iter().enumerate() {
            let c = features.iter().find(|c| c.key == *key).unwrap();
            let cmp = c.compare.expect("a comparison");
            for other in [Some(cmp.baseline), cmp.partner].into_iter().flatten() {
                let known =
                    base.iter().any(|b| b.key == other) || FEATURE_ORDER[..i].contains(&other);
                assert!(known, "{}: {other} does not run before it", c.key);
            }
        }
    }

    #[test]
    fn cases_without_a_partner_report_no_difference() {
        let keys = feature_figure_keys();
        assert!(keys.contains(&"per_packet.range_blocked.delta".to_string()));
        assert!(keys.contains(&"per_packet.no_local_endpoint.ratio".to_string()));
        assert!(!keys.contains(&"per_packet.no_local_endpoint.delta".to_string()));
        assert_eq!(keys.len(), 3 * FEATURE_KEYS.len() - 1);
    }

    #[test]
    fn varied_sources_are_what_the_wrapper_makes() {
        let base = sock(CLIENT);
        assert_eq!(varied(Vary::Port, base, 3), sock("198.51.100.7:40003"));
        assert_eq!(
            varied(Vary::Port, base, (2 << 16) + 1),
            sock("198.51.100.9:40001")
        );
        assert_eq!(varied(Vary::Addr, base, 3), sock("198.51.100.10:40000"));
        assert_eq!(
            varied(Vary::Addr, base, (1 << 16) + 0x100),
            sock("198.52.101.7:40000")
        );
    }
}
