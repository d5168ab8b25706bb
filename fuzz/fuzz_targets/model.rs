//! The model and the reconciler: a run of source events (Services and
//! EndpointSlices applied and deleted, listings, node address changes,
//! syncs) through the agent's sync engine into real BPF maps.
//!
//! After every sync the maps must hold exactly what the desired tables say,
//! worked out here from the tables alone (not from the reconciler's own
//! books): every frontend its entry, of its kind, every ClusterIP its address
//! entry, every backend of a port its active slot, and nothing else; and the
//! verify pass must find nothing to repair. At the end everything is deleted
//! and the maps must be empty again. Nothing may panic.
//!
//! The input picks from small pools of names, addresses and ports, so that
//! Services collide: one Service's externalIP is another's ClusterIP, a
//! NodePort lands on a port another Service uses, endpoints move between
//! Services.
#![no_main]

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::OnceLock,
};

use arbitrary::Arbitrary;
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use lb_agent::{
    bpf::{Datapath, LoadOptions, Maps, NodeConfig, Sizes},
    cluster::{NodeInfo, ObjectKey, ProblemKind},
    model::{FrontendKind, Slice},
    reconcile::{Drift, Reconciler, encoding},
    source::SourceEvent,
    sync::Engine,
};
use lb_common::ServiceKey;
use libfuzzer_sys::fuzz_target;
use serde_json::{Value, json};

/// Room for everything an input can ask for (3 Services, 3 ports each, two
/// families, two tables per port), so that no port is ever refused for room.
const SIZES: Sizes = Sizes {
    services: 1024,
    service_ids: 128,
    backends: 256,
    maglev_entries: 1 << 20,
    conntrack: 1024,
};

const NODE: &str = "node-a";
/// Addresses Services use (ClusterIPs, externalIPs, ingress IPs): few, so
/// that they collide. The node's own addresses are among them.
/// Addresses Services use (ClusterIPs, externalIPs, ingress IPs): few, and
/// the common ones twice, so that they collide. The node's own address is
/// among them.
const SERVICE_ADDRS: [&str; 8] = [
    "10.96.0.1",
    "10.96.0.1",
    "10.96.0.2",
    "10.96.0.2",
    "192.0.2.1",
    "fd00:96::1",
    "fd00:96::1",
    "not-an-ip",
];
const NODE_ADDRS: [&str; 4] = ["192.0.2.1", "192.0.2.2", "2001:db8::1", "10.96.0.3"];
const ENDPOINT_ADDRS: [&str; 8] = [
    "10.244.0.5",
    "10.244.0.6",
    "10.244.1.7",
    "10.96.0.2",
    "fd00:244::5",
    "fd00:244:1::7",
    "10.244.0.300",
    "192.0.2.1",
];
/// Service ports (number, protocol): the common ones twice; a bad number
/// and protocols lb does not serve.
const PORTS: [(i32, &str); 8] = [
    (80, "TCP"),
    (80, "TCP"),
    (53, "UDP"),
    (53, "UDP"),
    (80, "UDP"),
    (0, "TCP"),
    (80, "SCTP"),
    (443, "tcp"),
];
const TARGET_PORTS: [i32; 3] = [8080, 53, 0];
const NODE_PORTS: [i32; 4] = [30080, 30081, 30053, 80];
const PORT_NAMES: [&str; 3] = ["", "http", "dns"];
const TYPES: [&str; 4] = ["ClusterIP", "NodePort", "LoadBalancer", "ExternalName"];
const RANGES: [&str; 4] = [
    "198.51.100.0/24",
    "0.0.0.0/0",
    "2001:db8:100::/64",
    "bad/99",
];
const ZONES: [&str; 2] = ["zone-a", "zone-b"];

fn pick<T: Copy>(pool: &[T], i: u8) -> T {
    pool[usize::from(i) % pool.len()]
}

#[derive(Arbitrary, Debug)]
struct Port {
    name: u8,
    port: u8,
    target: u8,
    node_port: Option<u8>,
}

#[derive(Arbitrary, Debug)]
struct ServiceSpec {
    type_: u8,
    cluster_ip: u8,
    /// A second ClusterIP (dual stack).
    second_ip: Option<u8>,
    external_ips: Vec<u8>,
    ingress: Vec<u8>,
    ports: Vec<Port>,
    external_local: bool,
    internal_local: bool,
    affinity: Option<u16>,
    ranges: Vec<u8>,
    health_check_node_port: Option<u8>,
    traffic_distribution: bool,
}

#[derive(Arbitrary, Debug)]
struct Endpoint {
    addr: u8,
    ready: Option<bool>,
    serving: Option<bool>,
    terminating: Option<bool>,
    /// This node, another, or none.
    node: u8,
    zone_hint: Option<u8>,
}

#[derive(Arbitrary, Debug)]
struct SliceSpec {
    service: u8,
    v6: bool,
    ports: Vec<Port>,
    endpoints: Vec<Endpoint>,
}

#[derive(Arbitrary, Debug)]
enum Op {
    Service(u8, ServiceSpec),
    DeleteService(u8),
    Slice(u8, SliceSpec),
    DeleteSlice(u8),
    /// A full listing of what is there now.
    Relist,
    NodeAddresses(Vec<u8>),
    NodeZone(Option<u8>),
    /// The op after this one is synced together with the one after it.
    Sync,
}

#[derive(Arbitrary, Debug)]
struct Input {
    ops: Vec<Op>,
}

/// Service names: their order decides who owns a contested frontend.
fn service_name(i: u8) -> String {
    format!("s{}", i % 3)
}

fn service(i: u8, s: &ServiceSpec) -> Service {
    let mut ips = vec![pick(&SERVICE_ADDRS, s.cluster_ip)];
    ips.extend(s.second_ip.map(|i| pick(&SERVICE_ADDRS, i)));
    let ports: Vec<Value> = s
        .ports
        .iter()
        .take(3)
        .map(|p| {
            let (port, protocol) = pick(&PORTS, p.port);
            let mut v = json!({
                "name": pick(&PORT_NAMES, p.name),
                "protocol": protocol,
                "port": port,
                "targetPort": pick(&TARGET_PORTS, p.target),
            });
            if let Some(n) = p.node_port {
                v["nodePort"] = json!(pick(&NODE_PORTS, n));
            }
            v
        })
        .collect();
    let mut spec = json!({
        "type": pick(&TYPES, s.type_),
        "clusterIP": ips[0],
        "clusterIPs": ips,
        "ports": ports,
        "externalIPs": s.external_ips.iter().take(3).map(|&i| pick(&SERVICE_ADDRS, i)).collect::<Vec<_>>(),
        "externalTrafficPolicy": if s.external_local { "Local" } else { "Cluster" },
        "internalTrafficPolicy": if s.internal_local { "Local" } else { "Cluster" },
        "loadBalancerSourceRanges": s.ranges.iter().take(3).map(|&i| pick(&RANGES, i)).collect::<Vec<_>>(),
    });
    if let Some(t) = s.affinity {
        spec["sessionAffinity"] = json!("ClientIP");
        spec["sessionAffinityConfig"] = json!({"clientIP": {"timeoutSeconds": t}});
    }
    if let Some(p) = s.health_check_node_port {
        spec["healthCheckNodePort"] = json!(32000 + i32::from(p % 3));
    }
    if s.traffic_distribution {
        spec["trafficDistribution"] = json!("PreferClose");
    }
    let ingress: Vec<Value> = s
        .ingress
        .iter()
        .take(2)
        .map(|&i| json!({"ip": pick(&SERVICE_ADDRS, i)}))
        .collect();
    serde_json::from_value(json!({
        "metadata": {"name": service_name(i), "namespace": "t"},
        "spec": spec,
        "status": {"loadBalancer": {"ingress": ingress}},
    }))
    .expect("a Service object")
}

fn slice_name(i: u8) -> String {
    format!("slice{}", i % 6)
}

fn slice(i: u8, s: &SliceSpec) -> Slice {
    let endpoints: Vec<Value> = s
        .endpoints
        .iter()
        .take(4)
        .map(|e| {
            let mut v = json!({
                "addresses": [pick(&ENDPOINT_ADDRS, e.addr)],
                "conditions": {"ready": e.ready, "serving": e.serving, "terminating": e.terminating},
            });
            match e.node % 3 {
                0 => v["nodeName"] = json!(NODE),
                1 => v["nodeName"] = json!("node-b"),
                _ => {}
            }
            if let Some(z) = e.zone_hint {
                v["zone"] = json!(pick(&ZONES, z));
                v["hints"] = json!({"forZones": [{"name": pick(&ZONES, z / 2)}]});
            }
            v
        })
        .collect();
    let ports: Vec<Value> = s
        .ports
        .iter()
        .take(3)
        .map(|p| {
            json!({
                "name": pick(&PORT_NAMES, p.name),
                "protocol": pick(&PORTS, p.port).1,
                "port": pick(&TARGET_PORTS, p.target),
            })
        })
        .collect();
    let object: EndpointSlice = serde_json::from_value(json!({
        "metadata": {
            "name": slice_name(i),
            "namespace": "t",
            "labels": {"kubernetes.io/service-name": service_name(s.service)},
        },
        "addressType": if s.v6 { "IPv6" } else { "IPv4" },
        "ports": ports,
        "endpoints": endpoints,
    }))
    .expect("an EndpointSlice object");
    Slice::from(&object)
}

/// The directory on bpffs this process pins its maps in, so that each input
/// starts a reconciler of its own over them (loading the datapath takes a
/// while; opening its pins does not).
fn pins() -> &'static PathBuf {
    static PINS: OnceLock<PathBuf> = OnceLock::new();
    PINS.get_or_init(|| {
        let root = PathBuf::from("/sys/fs/bpf");
        // What runs that died (a crash exits at once) left behind.
        for e in std::fs::read_dir(&root).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(pid) = name.strip_prefix("lb-fuzz-model-")
                && !PathBuf::from(format!("/proc/{pid}")).exists()
            {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
        let dir = root.join(format!("lb-fuzz-model-{}", std::process::id()));
        let mut dp = Datapath::load(&LoadOptions {
            pin_path: Some(dir.clone()),
            sizes: SIZES,
            log_level: None,
        })
        .expect("loading the datapath (as root, with bpffs on /sys/fs/bpf)");
        let mut maps = dp.take_maps().expect("maps");
        maps.set_config(&NodeConfig {
            snat_v4: None,
            snat_v6: None,
            snat_ports: (61_000, 61_099),
            cluster_cidrs: false,
        })
        .expect("config");
        // The pins keep the maps; the programs are not needed.
        drop(maps);
        drop(dp);
        extern "C" fn unpin() {
            if let Some(dir) = PINS.get() {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
        // SAFETY: registers a plain function run at exit.
        unsafe { libc::atexit(unpin) };
        dir
    })
}

fn node_info(addresses: &[IpAddr]) -> NodeInfo {
    NodeInfo {
        name: NODE.into(),
        addresses: addresses.to_vec(),
        zone: Some("zone-a".into()),
    }
}

/// What the maps must hold: worked out from the desired tables alone.
struct Expected {
    /// Each frontend entry, and whether it is a ClusterIP; each address
    /// entry (None).
    services: BTreeMap<ServiceKey, Option<bool>>,
    backends: BTreeSet<SocketAddr>,
}

fn expected(engine: &Engine) -> Expected {
    let mut services = BTreeMap::new();
    let mut backends = BTreeSet::new();
    for (_, spec) in engine.desired().ports() {
        if spec.frontends.is_empty() {
            continue;
        }
        for (f, fs) in &spec.frontends {
            let k = encoding::service_key(f);
            let cluster_ip = fs.kind == FrontendKind::ClusterIp;
            let before = services.insert(k, Some(cluster_ip));
            assert!(before.is_none(), "two desired ports hold frontend {f}");
            if cluster_ip {
                services.insert(encoding::address_key(&k), None);
            }
        }
        backends.extend(spec.all_backends().map(|b| b.addr));
    }
    Expected { services, backends }
}

fn active_backends(maps: &Maps) -> BTreeSet<SocketAddr> {
    (0..maps.sizes().backends)
        .filter_map(|id| {
            let b = maps.backends.get(&id, 0).expect("reading backends");
            b.is_active().then(|| {
                lb_common::socket_addr(&b.addr, b.family, b.port).expect("a backend address")
            })
        })
        .collect()
}

fn check(engine: &Engine, when: &str) {
    let want = expected(engine);
    let reconciler = engine.reconciler();
    let maps = reconciler.maps();
    let mut have = BTreeMap::new();
    for entry in maps.services.iter() {
        let (k, v) = entry.expect("reading services");
        let kind = (v.flags & lb_common::SVC_F_ADDRESS == 0).then(|| encoding::is_cluster_ip(&v));
        have.insert(k, kind);
    }
    if have != want.services {
        let missing: Vec<_> = want
            .services
            .iter()
            .filter(|(k, v)| have.get(k) != Some(v))
            .collect();
        let extra: Vec<_> = have
            .iter()
            .filter(|(k, v)| want.services.get(k) != Some(v))
            .collect();
        panic!(
            "{when}: services map differs from the desired tables\n\
             missing or of the wrong kind: {missing:?}\nleft behind or of the wrong kind: {extra:?}"
        );
    }
    assert_eq!(
        active_backends(maps),
        want.backends,
        "{when}: active backend slots differ from the desired ports' backends"
    );
    drop(reconciler);
    let drift = engine.verify().expect("a sync happened").expect("verify");
    assert_eq!(
        drift,
        Drift::default(),
        "{when}: the verify pass repaired something"
    );
}

fn sync(engine: &mut Engine, when: &str) {
    if let Some(report) = engine.sync() {
        let room: Vec<_> = report
            .problems
            .iter()
            .filter(|p| p.kind == ProblemKind::Capacity)
            .collect();
        assert!(room.is_empty(), "{when}: refused for room: {room:?}");
        assert!(engine.reconciler().failed_ports().is_empty());
        check(engine, when);
    }
}

fuzz_target!(|input: Input| {
    let maps = Maps::open_pinned(pins()).expect("opening the pinned maps");
    let reconciler = Reconciler::adopt(maps).expect("adopting the maps");
    let default_node: Vec<IpAddr> = vec![
        NODE_ADDRS[0].parse().unwrap(),
        NODE_ADDRS[2].parse().unwrap(),
    ];
    let mut engine = Engine::new(reconciler, node_info(&default_node));
    // What exists, for listings.
    let mut services: BTreeMap<String, Service> = BTreeMap::new();
    let mut slices: BTreeMap<String, Slice> = BTreeMap::new();
    engine.take(SourceEvent::Resync {
        services: Vec::new(),
        slices: Vec::new(),
        problems: Vec::new(),
    });
    for (n, op) in input.ops.iter().take(40).enumerate() {
        match op {
            Op::Service(i, s) => {
                let svc = service(*i, s);
                services.insert(service_name(*i), svc.clone());
                engine.take(SourceEvent::ServiceApplied(Box::new(svc)));
            }
            Op::DeleteService(i) => {
                services.remove(&service_name(*i));
                engine.take(SourceEvent::ServiceDeleted(ObjectKey::new(
                    "t",
                    service_name(*i),
                )));
            }
            Op::Slice(i, s) => {
                let sl = slice(*i, s);
                slices.insert(slice_name(*i), sl.clone());
                engine.take(SourceEvent::SliceApplied(Box::new(sl)));
            }
            Op::DeleteSlice(i) => {
                slices.remove(&slice_name(*i));
                engine.take(SourceEvent::SliceDeleted(ObjectKey::new(
                    "t",
                    slice_name(*i),
                )));
            }
            Op::Relist => {
                engine.take(SourceEvent::Resync {
                    services: services.values().cloned().collect(),
                    slices: slices.values().cloned().collect(),
                    problems: Vec::new(),
                });
            }
            Op::NodeAddresses(a) => {
                let addrs: Vec<IpAddr> = a
                    .iter()
                    .take(3)
                    .map(|&i| pick(&NODE_ADDRS, i).parse().unwrap())
                    .collect();
                engine.take(SourceEvent::NodeAddresses(addrs));
            }
            Op::NodeZone(z) => {
                engine.take(SourceEvent::NodeZone(
                    z.map(|z| pick(&ZONES, z).to_string()),
                ));
            }
            Op::Sync => {}
        }
        // Most ops are synced at once (and checked); after a `Sync` op
        // the next two ops go into one sync.
        let batched = n > 0 && matches!(input.ops.get(n - 1), Some(Op::Sync));
        if !batched {
            sync(&mut engine, &format!("after op {n} ({op:?})"));
        }
    }
    sync(&mut engine, "at the end");
    // Everything deleted: nothing may stay behind.
    engine.take(SourceEvent::Resync {
        services: Vec::new(),
        slices: Vec::new(),
        problems: Vec::new(),
    });
    sync(&mut engine, "after deleting everything");
    let reconciler = engine.reconciler();
    let maps = reconciler.maps();
    let left: Vec<_> = maps.services.keys().collect();
    assert!(
        left.is_empty(),
        "services left after deleting everything: {left:?}"
    );
    assert!(
        active_backends(maps).is_empty(),
        "backends left after deleting everything"
    );
    let ranges = maps.source_ranges().expect("source ranges");
    assert!(ranges.is_empty(), "source ranges left: {ranges:?}");
    for i in 0..maps.addr_filter.len() {
        let word = maps.addr_filter.get(&i, 0).expect("addr_filter");
        assert_eq!(
            word, 0,
            "addr_filter word {i} left set after deleting everything"
        );
    }
});
