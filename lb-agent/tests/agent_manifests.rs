//! The agent binary in manifest mode, with real pinned maps: files added, edited
//! and deleted show up in the maps within a second; bad input is skipped and
//! counted; a full map is an error, not a partial table; a restart adopts the
//! pins without flushing anything; `cleanup` removes it all.
//! Needs root (BPF, network namespaces).

use std::{
    net::SocketAddr,
    os::unix::process::ExitStatusExt as _,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use lb_agent::bpf::Maps;
use lb_common::{
    CT_F_FORWARD, CtEntry, FAMILY_V4, FlowKey, PROTO_TCP, ServiceKey,
    hash::{FILTER_BACKEND, FILTER_CLUSTER_IP, FILTER_FRONTEND},
    iface,
};
use lb_testbed::{Scope, agent::AgentSpec, http_get};

const AGENT: &str = env!("CARGO_BIN_EXE_lb-agent");
const HEALTHZ: &str = "127.0.0.1:10256";
const METRICS: &str = "127.0.0.1:10249";

fn sh(cmd: &str) {
    let out = Command::new("sh").arg("-c").arg(cmd).output().expect("sh");
    assert!(
        out.status.success(),
        "{cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A node: a namespace with an uplink (192.0.2.1/24) and a pod veth, a manifest
/// directory, a pin path, and the agent process, in a testbed scope (which
/// stops the agent and removes the namespace and the pins in the end).
struct Node {
    ns: String,
    dir: tempfile::TempDir,
    pins: PathBuf,
    extra_args: Vec<String>,
    log: PathBuf,
    // Last: what it removes outlives nothing of the node.
    scope: Scope,
}

/// The node's agent, by its name in the scope.
const AGENT_NAME: &str = "agent";

impl Node {
    fn new(extra_args: &[&str]) -> Self {
        let scope = Scope::new().expect("a testbed scope");
        let ns = scope.add_netns("node", &[]).expect("the node's namespace");
        sh(&format!(
            "ip -n {ns} link add up0 type veth peer name up1 && ip -n {ns} link set up0 up && ip -n {ns} link set up1 up && \
             ip -n {ns} addr add 192.0.2.1/24 dev up0 && \
             ip -n {ns} link add veth-p0 type veth peer name p1 && ip -n {ns} link set veth-p0 up"
        ));
        scope.mark_pin_dir().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("agent.log");
        let node = Self {
            ns,
            pins: scope.pin_dir().join("node"),
            dir,
            extra_args: extra_args.iter().map(ToString::to_string).collect(),
            log,
            scope,
        };
        // The directory must exist before the agent starts; manifests go in a
        // subdirectory so the log next to them is not read as one.
        std::fs::create_dir(node.manifests()).unwrap();
        node
    }

    /// A started node whose manifests hold `web`: ClusterIP 10.96.0.10,
    /// NodePort 30080, endpoints 10.244.1.10 and .11.
    fn started_with_web(extra_args: &[&str]) -> Self {
        let mut node = Self::new(extra_args);
        node.write(
            "web.yaml",
            &service(
                "web",
                "10.96.0.10",
                Some(30080),
                &["10.244.1.10", "10.244.1.11"],
            ),
        );
        node.start();
        node
    }

    fn manifests(&self) -> PathBuf {
        self.dir.path().join("m")
    }

    fn write(&self, name: &str, yaml: &str) {
        // Write then rename, as editors and kubectl-style tools do.
        let tmp = self.dir.path().join(format!(".{name}.tmp"));
        std::fs::write(&tmp, yaml).unwrap();
        std::fs::rename(&tmp, self.manifests().join(name)).unwrap();
    }

    fn start(&mut self) {
        let mut args: Vec<String> = [
            "run",
            "--manifests",
            self.manifests().to_str().unwrap(),
            "--node-name",
            "node-a",
            "--iface",
            "up0",
            "--pod-ifaces",
            "veth*",
            "--pin-path",
            self.pins.to_str().unwrap(),
            "--maglev-entries",
            "1048576",
            "--max-services",
            "64",
            "--conntrack-size",
            "4096",
            "--log-level",
            "debug",
        ]
        .map(String::from)
        .to_vec();
        args.extend(self.extra_args.iter().cloned());
        let spec = AgentSpec {
            bin: AGENT.into(),
            args: args.into_iter().map(Into::into).collect(),
            env: Vec::new(),
            mounts: Vec::new(),
            ns: self.ns.clone(),
            log: self.log.clone(),
            confinement: None,
        };
        self.scope
            .start_agent(AGENT_NAME, &spec)
            .expect("start lb-agent");
        self.wait_healthy();
    }

    fn wait_healthy(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Err(e) = self.scope.check_agent(AGENT_NAME) {
                panic!("{e:#}:\n{}", self.log());
            }
            if let Ok((200, _)) = http_get(
                &self.ns,
                HEALTHZ.parse().unwrap(),
                "/healthz",
                Duration::from_secs(1),
            ) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "agent not healthy in 20 s:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGTERM, as a DaemonSet rollout or systemd does: the agent must be gone
    /// within the 5 s grace (it is killed after).
    fn stop(&mut self) {
        if let Some(status) = self.scope.stop_agent(AGENT_NAME).unwrap() {
            assert_ne!(
                status.signal(),
                Some(libc::SIGKILL),
                "agent ignored SIGTERM"
            );
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn maps(&self) -> Maps {
        Maps::open_pinned(&self.pins).expect("pinned maps")
    }

    fn metrics(&self) -> String {
        http_get(
            &self.ns,
            METRICS.parse().unwrap(),
            "/metrics",
            Duration::from_secs(2),
        )
        .unwrap()
        .1
    }

    /// Polls `check` against the pinned maps until it holds; panics after `within`.
    fn eventually(&self, within: Duration, what: &str, check: impl Fn(&Maps) -> bool) -> Duration {
        let start = Instant::now();
        loop {
            if check(&self.maps()) {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < within,
                "{what}: not within {within:?}\nagent log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("agent log of the failed test:\n{}", self.log());
        }
        if !std::thread::panicking() {
            self.stop();
        }
        let _ = Command::new(AGENT)
            .args(["cleanup", "--pin-path"])
            .arg(&self.pins)
            .output();
    }
}

fn skey(addr: &str, proto: u8) -> ServiceKey {
    let a: SocketAddr = addr.parse().unwrap();
    let mut k = ServiceKey {
        port: a.port(),
        proto,
        family: FAMILY_V4,
        ..ServiceKey::default()
    };
    if let std::net::IpAddr::V4(v4) = a.ip() {
        k.addr[..4].copy_from_slice(&v4.octets());
    }
    k
}

fn service(name: &str, ip: &str, node_port: Option<u16>, endpoints: &[&str]) -> String {
    let (kind, np) = match node_port {
        Some(p) => ("NodePort", format!(", nodePort: {p}")),
        None => ("ClusterIP", String::new()),
    };
    let eps: String = endpoints
        .iter()
        .map(|e| {
            format!("- addresses: [\"{e}\"]\n  nodeName: node-b\n  conditions: {{ready: true}}\n")
        })
        .collect();
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\n\
         spec:\n  type: {kind}\n  clusterIP: {ip}\n  ports: [{{name: http, port: 80, protocol: TCP{np}}}]\n\
         ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{name: {name}-1, namespace: default, labels: {{kubernetes.io/service-name: {name}}}}}\n\
         addressType: IPv4\nendpoints:\n{eps}ports: [{{name: http, port: 8080, protocol: TCP}}]\n"
    )
}

fn backends(m: &Maps) -> Vec<String> {
    let mut out = Vec::new();
    for id in 0..m.backends.len() {
        let b = m.backends.get(&id, 0).unwrap();
        if b.is_active() {
            out.push(format!(
                "{}.{}.{}.{}:{}",
                b.addr[0], b.addr[1], b.addr[2], b.addr[3], b.port
            ));
        }
    }
    out.sort();
    out
}

/// Names of the programs on tcx ingress of `dev` in namespace `ns`.
fn tcx_programs(ns: &str, dev: &str) -> Vec<String> {
    let dev = dev.to_string();
    lb_testbed::in_netns(ns, move || {
        use aya::programs::{SchedClassifier, tc::TcAttachType};
        match SchedClassifier::query_tcx(&dev, TcAttachType::Ingress) {
            Ok((_, progs)) => progs
                .iter()
                .map(|p| p.name_as_str().unwrap_or("?").to_string())
                .collect(),
            Err(_) => Vec::new(),
        }
    })
}

/// Whether the `addr_filter` bit of an IPv4 address and port (protocol 0 for
/// backends and ClusterIP addresses, TCP for frontends) in a role is set.
fn filtered(m: &Maps, addr: &str, role: u32) -> bool {
    let (ip, port) = addr
        .split_once(':')
        .map_or((addr, 0), |(i, p)| (i, p.parse().unwrap()));
    let ip: std::net::Ipv4Addr = ip.parse().unwrap();
    let mut a = [0u8; 16];
    a[..4].copy_from_slice(&ip.octets());
    let proto = if role == lb_common::hash::FILTER_FRONTEND {
        PROTO_TCP
    } else {
        0
    };
    let bit = lb_common::hash::addr_filter_bit(&a, FAMILY_V4, port, proto, role);
    m.addr_filter.get(&(bit / 64), 0).unwrap() & (1 << (bit % 64)) != 0
}

fn frontend(m: &Maps, addr: &str) -> Option<lb_common::Service> {
    m.services.get(&skey(addr, PROTO_TCP), 0).ok()
}

#[test]
fn files_added_edited_and_deleted_reach_the_maps_within_a_second() {
    let node = Node::started_with_web(&[]);
    let m = node.maps();
    let svc = frontend(&m, "10.96.0.10:80").expect("ClusterIP frontend");
    assert_eq!(svc.backend_count, 2);
    assert_eq!(
        frontend(&m, "192.0.2.1:30080")
            .expect("NodePort on the node address")
            .id,
        svc.id
    );
    assert_eq!(backends(&m), ["10.244.1.10:8080", "10.244.1.11:8080"]);
    // The prefilter knows every frontend, ClusterIP and backend.
    for (addr, role) in [
        ("10.96.0.10:80", FILTER_FRONTEND),
        ("10.96.0.10", FILTER_CLUSTER_IP),
        ("192.0.2.1:30080", FILTER_FRONTEND),
        ("10.244.1.10:8080", FILTER_BACKEND),
        ("10.244.1.11:8080", FILTER_BACKEND),
    ] {
        assert!(
            filtered(&m, addr, role),
            "addr_filter bit of {addr} ({role:#x}) not set"
        );
    }
    // Other traffic to the node's own address is none of lb's business.
    assert!(!filtered(&m, "192.0.2.1:22", FILTER_FRONTEND));
    assert!(!filtered(&m, "192.0.2.1", FILTER_CLUSTER_IP));
    drop(m);

    // Edit: a third endpoint.
    node.write(
        "web.yaml",
        &service(
            "web",
            "10.96.0.10",
            Some(30080),
            &["10.244.1.10", "10.244.1.11", "10.244.1.12"],
        ),
    );
    let took = node.eventually(Duration::from_secs(1), "endpoint added", |m| {
        frontend(m, "10.96.0.10:80").is_some_and(|s| s.backend_count == 3)
    });
    println!("endpoint added: in the maps after {took:?}");
    assert_eq!(backends(&node.maps()).len(), 3);
    // Its Maglev row now spreads over three ids.
    let row = node
        .maps()
        .maglev
        .read_table(&frontend(&node.maps(), "10.96.0.10:80").unwrap())
        .unwrap();
    let distinct: std::collections::BTreeSet<u32> = row.iter().copied().collect();
    assert_eq!(distinct.len(), 3);

    // A second Service in another file.
    node.write(
        "db.yaml",
        &service("db", "10.96.0.20", None, &["10.244.1.20"]),
    );
    node.eventually(Duration::from_secs(1), "second file", |m| {
        frontend(m, "10.96.0.20:80").is_some()
    });

    // Delete the first file: its frontends and backends go, the other stays.
    std::fs::remove_file(node.manifests().join("web.yaml")).unwrap();
    // (Backends are freed at the end of the pass that removes the frontends.)
    let took = node.eventually(Duration::from_secs(1), "file deleted", |m| {
        frontend(m, "10.96.0.10:80").is_none()
            && frontend(m, "192.0.2.1:30080").is_none()
            && backends(m) == ["10.244.1.20:8080"]
    });
    println!("file deleted: gone from the maps after {took:?}");
    assert_eq!(backends(&node.maps()), ["10.244.1.20:8080"]);
    assert!(frontend(&node.maps(), "10.96.0.20:80").is_some());
    // And the frontends' bits are cleared (these addresses share no bit with
    // what is left). The backend that left keeps its bit until a conntrack
    // sweep begun after it left finds no flow of it (a TCP connection to it
    // goes on; `tests/udp_conntrack.rs` holds the release), which no pass
    // has seen yet.
    let m = node.maps();
    assert!(!filtered(&m, "10.96.0.10:80", FILTER_FRONTEND));
    assert!(!filtered(&m, "10.96.0.10", FILTER_CLUSTER_IP));
    assert!(filtered(&m, "10.244.1.11:8080", FILTER_BACKEND));
    assert!(filtered(&m, "10.244.1.20:8080", FILTER_BACKEND));
}

/// The value of the metric line starting with `name` and holding `label`.
fn metric(metrics: &str, name: &str, label: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|l| l.starts_with(name) && l.contains(label))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// Entries deleted or changed behind the agent's back (as `bpftool map
/// delete` or `update` would) are put back by the next verify pass, logged
/// and counted per map.
#[test]
fn what_is_changed_by_hand_in_the_maps_is_put_back_and_counted() {
    let node = Node::started_with_web(&["--verify-every", "1"]);
    let m = node.maps();
    let before = frontend(&m, "10.96.0.10:80").expect("the ClusterIP frontend");
    let config = m.config.get(&0, 0).unwrap();
    let pod = *node_interfaces(&node)
        .iter()
        .find(|(_, n)| *n == "veth-p0")
        .expect("the pod interface's entry")
        .0;
    drop(m);
    // One change in each of four maps, two of the reconciler's and two of
    // the agent's own.
    {
        let mut m = node.maps();
        m.remove_service(&skey("10.96.0.10:80", PROTO_TCP)).unwrap();
        let row = m.maglev.read_table(&before).unwrap();
        m.clear_backend(row[0]).unwrap();
        let mut wrong = config;
        wrong.snat_port_min = wrong.snat_port_max;
        m.config.set(0, wrong, 0).unwrap();
        m.remove_interface(pod).unwrap();
    }
    let took = node.eventually(Duration::from_secs(5), "the maps repaired", |m| {
        frontend(m, "10.96.0.10:80") == Some(before)
            && backends(m) == ["10.244.1.10:8080", "10.244.1.11:8080"]
            && m.config.get(&0, 0).ok() == Some(config)
            && m.interfaces.get(&pod, 0).is_ok()
    });
    println!("repaired after {took:?}");
    // Each repair counted once, per map (a pass may have come between two of
    // the changes: the counts add up across passes).
    let maps = ["services", "backends", "config", "interfaces"];
    let drift = |metrics: &str, map: &str| {
        metric(
            metrics,
            "lb_map_drift_repaired_total",
            &format!("map=\"{map}\""),
        )
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    let metrics = loop {
        let m = node.metrics();
        if maps.iter().all(|map| drift(&m, map).is_some()) || Instant::now() > deadline {
            break m;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    for map in maps {
        assert_eq!(drift(&metrics, map), Some(1.0), "{map}: {metrics}");
    }
    assert!(
        metric(&metrics, "lb_map_verify_passes_total", "").is_some_and(|n| n >= 1.0),
        "{metrics}"
    );
    let log = node.log();
    assert!(
        log.contains("verify: the maps had drifted and were repaired: services 1"),
        "{log}"
    );
    // And nothing more: the passes after it find the maps as they should be.
    std::thread::sleep(Duration::from_millis(2500));
    let later = node.metrics();
    for map in maps {
        assert_eq!(drift(&later, map), Some(1.0), "{map}: {later}");
    }
}

#[test]
fn bad_input_is_skipped_and_counted_and_the_rest_keeps_working() {
    let mut node = Node::new(&["--max-backends", "4"]);
    node.write(
        "good.yaml",
        &service("good", "10.96.0.10", None, &["10.244.1.10"]),
    );
    node.write(
        "broken.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: x\n  spec: [\n",
    );
    node.write(
        "noip.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: noip, namespace: default}\nspec:\n  ports: [{port: 80}]\n",
    );
    // Claims the good Service's VIP:port: the first by namespace/name keeps it.
    node.write(
        "dup.yaml",
        &service("zzz-dup", "10.96.0.10", None, &["10.244.1.99"]),
    );
    // Five endpoints with room for four backends (one is already used).
    node.write(
        "big.yaml",
        &service(
            "big",
            "10.96.0.30",
            None,
            &[
                "10.244.2.1",
                "10.244.2.2",
                "10.244.2.3",
                "10.244.2.4",
                "10.244.2.5",
            ],
        ),
    );
    node.start();
    let m = node.maps();
    let good = frontend(&m, "10.96.0.10:80").expect("the good Service works");
    assert_eq!(good.backend_count, 1);
    assert_eq!(
        backends(&m),
        ["10.244.1.10:8080"],
        "no partial table for `big`, no backend of the duplicate"
    );
    assert!(
        frontend(&m, "10.96.0.30:80").is_none(),
        "`big` does not fit and is not programmed"
    );
    let metrics = node.metrics();
    for kind in [
        "parse",
        "missing_cluster_ip",
        "duplicate_frontend",
        "capacity",
    ] {
        let line = metrics
            .lines()
            .find(|l| l.starts_with("lb_errors_total") && l.contains(&format!("kind=\"{kind}\"")))
            .unwrap_or_else(|| panic!("no lb_errors_total{{kind={kind}}} in:\n{metrics}"));
        assert!(!line.ends_with(" 0"), "{line}");
    }
    let log = node.log();
    assert!(
        log.contains("broken.yaml:"),
        "the parse error names the file and line:\n{log}"
    );
    assert!(
        log.contains("default/noip"),
        "the missing clusterIP names the Service:\n{log}"
    );
}

#[test]
fn a_restart_adopts_the_pins_and_flushes_nothing() {
    let mut node = Node::started_with_web(&["--uplink-hook", "xdp"]);
    let before = node.maps();
    let svc = frontend(&before, "10.96.0.10:80").unwrap();
    let row = before.maglev.read_table(&svc).unwrap();
    let ids = backends(&before);
    // A live connection, as the datapath would have recorded it.
    let mut key = FlowKey {
        src_port: 40_000,
        dst_port: 80,
        proto: PROTO_TCP,
        family: FAMILY_V4,
        ..FlowKey::default()
    };
    key.src[..4].copy_from_slice(&[198, 51, 100, 7]);
    key.dst[..4].copy_from_slice(&[10, 96, 0, 10]);
    let mut entry = CtEntry {
        nat_src_port: 40_000,
        nat_dst_port: 8080,
        flags: CT_F_FORWARD,
        ..CtEntry::default()
    };
    entry.nat_dst[..4].copy_from_slice(&[10, 244, 1, 10]);
    let mut m = node.maps();
    m.conntrack.insert(key, entry, 0).unwrap();
    drop((m, before));

    node.stop();
    // Stopped: the programs stay attached and the maps stay pinned.
    let xdp = Command::new("ip")
        .args(["-n", &node.ns, "link", "show", "up0"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&xdp.stdout).contains("xdp"),
        "XDP detached on stop"
    );
    assert!(
        node.pins.join("links").read_dir().unwrap().count() >= 3,
        "link pins gone on stop (XDP and tc on the uplink, tc on the pod)"
    );

    node.start();
    let after = node.maps();
    let svc2 = frontend(&after, "10.96.0.10:80").unwrap();
    assert_eq!(
        (svc2.id, svc2.table, svc2.backend_count),
        (svc.id, svc.table, svc.backend_count)
    );
    assert_eq!(
        after.maglev.read_table(&svc2).unwrap(),
        row,
        "Maglev row rewritten"
    );
    assert_eq!(backends(&after), ids);
    assert_eq!(
        after.conntrack.get(&key, 0).unwrap(),
        entry,
        "conntrack flushed"
    );
    // The metrics count it, and name the service port.
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let metrics = node.metrics();
        if metrics
            .lines()
            .any(|l| l == "lb_map_entries{map=\"conntrack\"} 1")
        {
            assert!(
                metrics.contains("lb_map_capacity{map=\"conntrack\"} 4096"),
                "{metrics}"
            );
            assert!(
                metrics.contains("lb_service_packets_total{service=\"default/web:http/TCP/IPv4\"}"),
                "{metrics}"
            );
            assert!(
                metrics.contains("lb_sync_duration_seconds_bucket"),
                "{metrics}"
            );
            assert!(
                metrics.contains("lb_datapath_packets_total{reason=\"pass_not_service\""),
                "{metrics}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "conntrack occupancy not reported:\n{metrics}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // What the second agent did, from its part of the log.
    let log = node.log();
    let second = &log[log.rfind("adopting").expect("second start in the log")..];
    assert!(
        second.starts_with("adopting 3 frontends and 2 backends"),
        "2 ports and the ClusterIP address entry: {second}"
    );
    assert!(
        second.contains("(Replaced)"),
        "links taken over with bpf_link_update:\n{second}"
    );
    let sync = second
        .lines()
        .find(|l| l.contains("sync:"))
        .expect("a sync line");
    assert!(
        sync.contains("frontends_written: 0")
            && sync.contains("backends_written: 0")
            && sync.contains("maglev_entries_written: 0")
            && sync.contains("frontends_removed: 0"),
        "the restart rewrote entries: {sync}"
    );
}

#[test]
fn cleanup_detaches_and_removes_the_pins() {
    let mut node = Node::new(&[]);
    node.write(
        "web.yaml",
        &service("web", "10.96.0.10", None, &["10.244.1.10"]),
    );
    node.start();
    node.stop();
    assert_eq!(
        tcx_programs(&node.ns, "veth-p0"),
        ["lb_tc"],
        "stays attached after the agent stops"
    );
    let out = Command::new(AGENT)
        .args(["cleanup", "--pin-path"])
        .arg(&node.pins)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!Path::new(&node.pins).exists());
    let link = Command::new("ip")
        .args(["-n", &node.ns, "link", "show", "up0"])
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&link.stdout).contains("xdp"),
        "XDP still attached"
    );
    assert!(
        tcx_programs(&node.ns, "veth-p0").is_empty(),
        "tc program still attached"
    );
}

#[test]
fn help_explains_every_flag_with_its_default() {
    use lb_common::capacity;

    let out = Command::new(AGENT)
        .args(["run", "--help"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let help = String::from_utf8_lossy(&out.stdout);
    // Every flag `run` accepts (its own, the global --log-level and --help), with
    // the default its help must show: clap's `[default: ...]` for a default value
    // (taken from the constants the agent uses where they are shared), the doc
    // comment's for a default worked out at run time, none for a flag without one.
    let d = |s: &str| Some(s.to_string());
    let expected: [(&str, Option<String>); 25] = [
        (
            "--kubeconfig",
            d("in-cluster config, then $KUBECONFIG or ~/.kube/config"),
        ),
        ("--log-level", d("info")),
        ("--manifests", None),
        ("--node-name", d("hostname")),
        (
            "--node-ip",
            d("Kubernetes: the Node's addresses; manifests: the uplinks' addresses"),
        ),
        ("--iface", d("the interfaces holding the node addresses")),
        ("--uplink-hook", d("auto")),
        ("--pod-ifaces", d("veth*,lxc*,cali*,gke*,eni*")),
        ("--other-ifaces", d("*")),
        ("--pin-path", d("/sys/fs/bpf/lb")),
        ("--metrics-addr", d("127.0.0.1:10249")),
        ("--healthz-addr", d("0.0.0.0:10256")),
        (
            "--maglev-entries",
            Some(capacity::MAGLEV_ENTRIES.to_string()),
        ),
        ("--max-services", Some(capacity::SERVICE_IDS.to_string())),
        ("--max-frontends", Some(capacity::SERVICES.to_string())),
        ("--max-backends", Some(capacity::BACKENDS.to_string())),
        ("--conntrack-size", Some(capacity::CONNTRACK.to_string())),
        ("--datapath-log", d("warn")),
        (
            "--snat-ports",
            d(
                "the ports outside the node's ephemeral range (net.ipv4.ip_local_port_range), \
               1024-32767 on a default node, so that no connection the node opens can clash with \
               a source-NATed flow",
            ),
        ),
        ("--socket-lb", d("true")),
        ("--cgroup-path", d("/sys/fs/cgroup")),
        (
            "--cluster-cidr",
            d(
                "every Node's spec.podCIDRs (Kubernetes: the agent then watches all Nodes, not only \
                 its own; manifests: the Node manifests); with none, clients are told apart by \
                 neither rule",
            ),
        ),
        ("--verify-every", d("60")),
        ("--link-events-buffer", d("4194304")),
        ("--help", None),
    ];
    // The options section: a line per flag ("  -h, --help", "      --flag <VALUE>"),
    // then its explanation on the lines indented further.
    let mut entries: Vec<(String, String)> = Vec::new();
    for line in help.lines().skip_while(|l| l.trim() != "Options:").skip(1) {
        let text = line.trim_start();
        let indent = line.len() - text.len();
        if text.starts_with('-') && indent <= 6 {
            let flag = text
                .split_whitespace()
                .find(|w| w.starts_with("--"))
                .unwrap_or_else(|| panic!("no long flag in {line:?}"))
                .trim_end_matches(',');
            entries.push((flag.to_string(), String::new()));
        } else if let Some((_, explanation)) = entries.last_mut() {
            explanation.push(' ');
            explanation.push_str(text);
        }
    }
    let mut listed: Vec<&str> = entries.iter().map(|(f, _)| f.as_str()).collect();
    let mut wanted: Vec<&str> = expected.iter().map(|(f, _)| *f).collect();
    listed.sort_unstable();
    wanted.sort_unstable();
    assert_eq!(listed, wanted, "the flags of --help:\n{help}");
    for (flag, default) in &expected {
        assert!(help.contains(flag), "--help lacks {flag}:\n{help}");
        let (_, explanation) = entries.iter().find(|(f, _)| f == flag).unwrap();
        // An explanation of a few words at least, not counting the bracketed
        // `[default: ...]` and `[env: ...]`.
        let mut depth = 0;
        let words: String = explanation
            .chars()
            .filter(|c| {
                match c {
                    '[' => depth += 1,
                    ']' => depth -= 1,
                    _ => return depth == 0,
                }
                false
            })
            .collect();
        let words = words
            .split_whitespace()
            .filter(|w| w.chars().any(char::is_alphabetic))
            .count();
        assert!(words >= 2, "{flag} is not explained: {explanation:?}");
        let shown: Vec<&str> = explanation
            .split("[default: ")
            .skip(1)
            .map(|rest| &rest[..rest.find(']').unwrap_or(rest.len())])
            .collect();
        match default {
            Some(default) => {
                assert!(
                    help.contains(default.as_str()),
                    "--help lacks the default of {flag} ({default}):\n{help}"
                );
                assert_eq!(
                    shown,
                    [default.as_str()],
                    "{flag} must show [default: {default}]: {explanation:?}"
                );
            }
            None => assert!(
                shown.is_empty(),
                "{flag} has no default but shows one: {explanation:?}"
            ),
        }
    }
    // A flag of an earlier release that means nothing now is refused, and
    // says what replaced it (silently ignoring it would leave an operator
    // believing the tables have the size asked for).
    let old = Command::new(AGENT)
        .args([
            "run",
            "--manifests",
            "/nonexistent",
            "--maglev-table-size",
            "1021",
        ])
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&old.stderr);
    assert!(!old.status.success());
    assert!(
        err.contains("--maglev-table-size 1021: the flag is gone")
            && err.contains("--maglev-entries"),
        "{err}"
    );
    // Why metrics stay on loopback and health does not: what each exposes,
    // and to whom.
    let explained = |flag: &str| {
        entries
            .iter()
            .find(|(f, _)| f == flag)
            .unwrap()
            .1
            .to_lowercase()
    };
    let metrics = explained("--metrics-addr");
    assert!(
        metrics.contains("loopback") && metrics.contains("0.0.0.0:10249"),
        "{metrics}"
    );
    let healthz = explained("--healthz-addr");
    assert!(
        healthz.contains("every address") && healthz.contains("kubelet"),
        "{healthz}"
    );
}

/// Sends `frame` out of `dev` in namespace `ns` (a packet socket), so that it
/// arrives on the veth's peer.
fn inject(ns: &str, dev: &str, frame: &[u8]) {
    let (dev, frame) = (dev.to_string(), frame.to_vec());
    lb_testbed::in_netns(ns, move || {
        // SAFETY: plain socket calls with checked results.
        unsafe {
            let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
            assert!(
                fd >= 0,
                "packet socket: {}",
                std::io::Error::last_os_error()
            );
            let name = std::ffi::CString::new(dev).unwrap();
            let mut sa: libc::sockaddr_ll = std::mem::zeroed();
            sa.sll_family = libc::AF_PACKET as u16;
            sa.sll_ifindex = libc::if_nametoindex(name.as_ptr()) as i32;
            sa.sll_halen = 6;
            let n = libc::sendto(
                fd,
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&raw const sa).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            );
            assert_eq!(
                n,
                frame.len() as isize,
                "sendto: {}",
                std::io::Error::last_os_error()
            );
            libc::close(fd);
        }
    });
}

fn syn_to(dst: [u8; 4], port: u16) -> Vec<u8> {
    syn_from(40_001, dst, port)
}

fn syn_from(src_port: u16, dst: [u8; 4], port: u16) -> Vec<u8> {
    let mut f = Vec::new();
    etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 2], [0xff; 6])
        .ipv4([198, 51, 100, 7], dst, 64)
        .tcp(src_port, port, 1, 1000)
        .syn()
        .write(&mut f, &[])
        .unwrap();
    f
}

/// A flood of flows that cannot get a source-NAT port (a range of one port
/// here) is counted in full, but logged once a second per CPU at most, each
/// line saying how many drops went unlogged.
#[test]
fn dropped_flows_are_counted_and_logged_at_most_once_a_second_per_cpu() {
    let mut node = Node::new(&["--snat-ports", "40000-40000"]);
    node.write(
        "web.yaml",
        &service("web", "10.96.0.10", Some(30080), &["10.244.1.10"]),
    );
    node.start();
    const FLOWS: u16 = 300;
    let t0 = Instant::now();
    for i in 0..FLOWS {
        inject(
            &node.ns,
            "up1",
            &syn_from(41_000 + i, [192, 0, 2, 1], 30080),
        );
    }
    let took = t0.elapsed();
    let drops = || {
        node.maps()
            .reason_counters()
            .unwrap()
            .into_iter()
            .find(|(r, _)| *r == lb_common::Reason::DropSnatExhausted)
            .unwrap()
            .1
            .packets
    };
    let deadline = Instant::now() + Duration::from_secs(2);
    while drops() < u64::from(FLOWS - 1) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(drops(), u64::from(FLOWS - 1), "one flow got the port");
    std::thread::sleep(Duration::from_millis(300));
    let log = node.log();
    let lines = log
        .lines()
        .filter(|l| l.contains("dropped: reason"))
        .count();
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    let seconds = took.as_secs() as usize + 1;
    assert!(
        (1..=cpus * (seconds + 1)).contains(&lines),
        "{lines} log lines for {} drops in {took:?} on {cpus} CPUs:\n{log}",
        FLOWS - 1
    );
    assert!(log.contains("more drops on this CPU"), "{log}");
}

#[test]
fn datapath_logs_reach_the_agent_log_only_when_asked_for() {
    for (level, expect) in [(None, false), (Some("debug"), true)] {
        let args: Vec<&str> = level.map(|l| vec!["--datapath-log", l]).unwrap_or_default();
        let mut node = Node::new(&args);
        node.write(
            "web.yaml",
            &service("web", "10.96.0.10", None, &["10.244.1.10"]),
        );
        node.start();
        // Through up1 into up0, where the datapath runs (tc: a veth uplink).
        inject(&node.ns, "up1", &syn_to([10, 96, 0, 10], 80));
        let deadline = Instant::now() + Duration::from_secs(2);
        let logged = loop {
            let found = node.log().contains("new flow 40001:80");
            if found || Instant::now() > deadline {
                break found;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        assert_eq!(
            logged,
            expect,
            "datapath log level {level:?}:\n{}",
            node.log()
        );
        // The packet was balanced either way.
        assert_eq!(
            node.maps().conntrack.iter().count(),
            2,
            "a forward and a reply entry"
        );
    }
}

/// `lb-agent dump --json` of the node.
fn dump(node: &Node) -> serde_json::Value {
    let out = Command::new(AGENT)
        .args(["dump", "--json", "--pin-path"])
        .arg(&node.pins)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The dump's line for interface `name`: (role, hooks, why).
fn interface(node: &Node, name: &str) -> (String, Vec<String>, String) {
    let d = dump(node);
    let i = d["interfaces"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == name)
        .unwrap_or_else(|| panic!("no {name} in {:#}", d["interfaces"]));
    (
        i["role"].as_str().unwrap().to_string(),
        i["hooks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| h.as_str().unwrap().to_string())
            .collect(),
        i["why"].as_str().unwrap().to_string(),
    )
}

fn has_xdp(ns: &str, dev: &str) -> bool {
    let out = Command::new("ip")
        .args(["-n", ns, "link", "show", dev])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).contains("xdp")
}

/// `--uplink-hook auto` (the default) serves a veth uplink through tc, as on
/// kind's nodes; `xdp` runs XDP with tc behind it, also on a jumbo-frame
/// uplink (the program is frags-aware); an uplink that refuses native XDP (a
/// VXLAN device has no driver support) is served through tc, and the agent
/// runs on. Each choice and its reason are in the dump.
#[test]
fn uplinks_run_xdp_where_it_fits_and_tc_where_it_does_not_and_say_why() {
    let mut node = Node::new(&[]);
    node.write(
        "web.yaml",
        &service("web", "10.96.0.10", None, &["10.244.1.10"]),
    );
    node.start();
    let (role, hooks, why) = interface(&node, "up0");
    assert_eq!((role.as_str(), hooks), ("uplink", vec!["tc".to_string()]));
    assert!(why.contains("virtual link"), "{why}");
    assert!(!has_xdp(&node.ns, "up0"), "no XDP on a veth uplink in auto");
    assert_eq!(tcx_programs(&node.ns, "up0"), ["lb_tc"]);
    node.stop();

    // A VXLAN device has no native XDP.
    let mut node = Node::new(&["--uplink-hook", "xdp", "--iface", "vx0"]);
    sh(&format!(
        "ip -n {0} link set up0 mtu 9000 && ip -n {0} link set up1 mtu 9000 && \
         ip -n {0} link add vx0 type vxlan id 5 dstport 4789 dev up0 && \
         ip -n {0} link set vx0 up && ip -n {0} addr add 198.51.100.1/24 dev vx0",
        node.ns
    ));
    node.write(
        "web.yaml",
        &service("web", "10.96.0.10", None, &["10.244.1.10"]),
    );
    node.start();
    let (_, hooks, why) = interface(&node, "up0");
    assert_eq!(hooks, ["xdp", "tc"], "MTU 9000: {why}\n{}", node.log());
    assert!(has_xdp(&node.ns, "up0"));
    assert_eq!(tcx_programs(&node.ns, "up0"), ["lb_tc"], "tc behind XDP");
    let (role, hooks, why) = interface(&node, "vx0");
    assert_eq!((role.as_str(), hooks), ("uplink", vec!["tc".to_string()]));
    assert!(why.contains("would not attach"), "{why}");
    assert!(
        node.log().contains("uplink vx0:"),
        "the log says why:\n{}",
        node.log()
    );
    // Only XDP uplinks are redirect targets.
    let ports: Vec<u32> = node.maps().tx_ports.keys().map(Result::unwrap).collect();
    assert_eq!(ports.len(), 1, "{ports:?}");
}

#[test]
fn pod_interfaces_that_come_and_go_are_attached_and_forgotten() {
    let mut node = Node::new(&[]);
    node.write(
        "web.yaml",
        &service("web", "10.96.0.10", None, &["10.244.1.10"]),
    );
    node.start();
    let links = node.pins.join("links");
    let pinned = |name: &str| -> bool {
        let out = Command::new("ip")
            .args(["-n", &node.ns, "-o", "link", "show", name])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let Some(ifindex) = text
            .split(':')
            .next()
            .and_then(|i| i.trim().parse::<u32>().ok())
        else {
            return false;
        };
        links.join(format!("tc-{ifindex}")).exists()
    };
    // A CNI creates a pod veth while the agent runs.
    sh(&format!(
        "ip -n {0} link add veth-new type veth peer name p2 && ip -n {0} link set veth-new up",
        node.ns
    ));
    let deadline = Instant::now() + Duration::from_secs(1);
    while !pinned("veth-new") {
        assert!(
            Instant::now() < deadline,
            "new pod interface not attached in 1 s:\n{}",
            node.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        tcx_programs(&node.ns, "veth-new"),
        ["lb_tc"],
        "tcx program not on veth-new"
    );
    // Any other interface (a tunnel, a second NIC) gets tc too, as "other":
    // replies may arrive there.
    sh(&format!(
        "ip -n {0} link add other0 type veth peer name other1",
        node.ns
    ));
    let deadline = Instant::now() + Duration::from_secs(1);
    while !pinned("other0") {
        assert!(
            Instant::now() < deadline,
            "other interface not attached in 1 s:\n{}",
            node.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let roles: Vec<(String, u32)> = node
        .maps()
        .interfaces
        .iter()
        .map(|e| {
            let (_, i) = e.unwrap();
            (i.name().to_string(), i.role)
        })
        .collect();
    for (name, role) in [
        ("up0", iface::ROLE_UPLINK),
        ("veth-new", iface::ROLE_POD),
        ("other0", iface::ROLE_OTHER),
    ] {
        assert!(
            roles.contains(&(name.to_string(), role)),
            "{name} is no {}: {roles:?}",
            iface::role_name(role)
        );
    }
    // The pod goes away: its link pin and its interfaces entry are removed
    // (and those of its peer p2, which was an "other" interface here).
    let index = |name: &str| -> u32 {
        let (&i, _) = node_interfaces(&node)
            .iter()
            .find(|(_, n)| n.as_str() == name)
            .unwrap_or_else(|| panic!("no {name}"));
        i
    };
    let gone = [index("veth-new"), index("p2")];
    sh(&format!("ip -n {} link del veth-new", node.ns));
    let deadline = Instant::now() + Duration::from_secs(1);
    while gone
        .iter()
        .any(|i| links.join(format!("tc-{i}")).exists() || node_interfaces(&node).contains_key(i))
    {
        assert!(
            Instant::now() < deadline,
            "pin or entry of the removed interfaces kept:\n{}",
            node.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The `interfaces` map: ifindex -> name.
/// A burst of interface changes larger than the link events' buffer makes
/// the kernel drop events (ENOBUFS); the agent lists the links afresh, so that
/// every pod interface of the burst gets its program, and every one deleted
/// in the next burst is forgotten.
#[test]
fn a_burst_that_overruns_the_link_events_is_repaired_by_a_listing() {
    const BURST: usize = 60;
    let mut node = Node::new(&["--link-events-buffer", "4096"]);
    node.write(
        "web.yaml",
        &service("web", "10.96.0.10", None, &["10.244.1.10"]),
    );
    node.start();
    let pods = |node: &Node| -> usize {
        node_interfaces(node)
            .values()
            .filter(|n| n.starts_with("veth-b"))
            .count()
    };
    // One `ip -batch` of events, more than the buffer holds.
    let batch = |verb: &str| -> String {
        (0..BURST)
            .map(|i| match verb {
                "add" => {
                    format!("link add veth-b{i} type veth peer name pb{i}\nlink set veth-b{i} up\n")
                }
                _ => format!("link del veth-b{i}\n"),
            })
            .collect()
    };
    let pid = node.scope.agent_pid(AGENT_NAME).expect("the agent's pid") as i32;
    for (verb, want) in [("add", BURST), ("del", 0)] {
        let script = node.dir.path().join(format!("{verb}.batch"));
        std::fs::write(&script, batch(verb)).unwrap();
        // The add burst comes while the agent is stopped, so that it cannot
        // keep up however idle the machine: the events overrun its buffer.
        let hold = verb == "add";
        if hold {
            // SAFETY: signals to the agent this test started.
            assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
        }
        sh(&format!("ip -n {} -batch {}", node.ns, script.display()));
        if hold {
            // SAFETY: as above.
            assert_eq!(unsafe { libc::kill(pid, libc::SIGCONT) }, 0);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while pods(&node) != want {
            assert!(
                Instant::now() < deadline,
                "{verb}: {} of the burst's pod interfaces in the interfaces map, not {want}:\n{}",
                pods(&node),
                node.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let log = node.log();
    assert!(
        log.contains("link events overran their buffer"),
        "the burst did not overrun the buffer, so the listing went untested:\n{log}"
    );
    // A listing leaves no other interface behind either.
    assert_eq!(tcx_programs(&node.ns, "veth-p0"), ["lb_tc"]);
}

fn node_interfaces(node: &Node) -> std::collections::BTreeMap<u32, String> {
    node.maps()
        .interfaces
        .iter()
        .map(|e| {
            let (i, v) = e.unwrap();
            (i, v.name().to_string())
        })
        .collect()
}

/// An uplink forced to XDP (`--uplink-hook xdp`) on a veth whose peer runs no
/// XDP: every frame lb sends back out (XDP_TX) is dropped by the veth after
/// the datapath counted it as `tx`. `lb-agent dump` and the metrics say so,
/// from the device's own statistics.
#[test]
fn frames_the_driver_fails_to_send_are_shown_in_the_dump_and_the_metrics() {
    let mut node = Node::new(&["--uplink-hook", "xdp"]);
    // The backend's next hop is behind the uplink itself: XDP_TX (the node
    // forwards, as a Kubernetes node does).
    sh(&format!(
        "ip netns exec {ns} sysctl -qw net.ipv4.ip_forward=1 && ip -n {ns} route add 10.244.1.0/24 via 192.0.2.2 && \
         ip -n {ns} neigh add 192.0.2.2 lladdr 02:00:00:00:00:02 dev up0 nud permanent",
        ns = node.ns
    ));
    node.write(
        "web.yaml",
        &service("web", "10.96.0.10", Some(30080), &["10.244.1.10"]),
    );
    node.start();
    const FRAMES: u16 = 20;
    for i in 0..FRAMES {
        inject(
            &node.ns,
            "up1",
            &syn_from(42_000 + i, [192, 0, 2, 1], 30080),
        );
    }
    let dump = || -> serde_json::Value {
        // In the node's namespace: the interfaces' statistics are read by name.
        let out = lb_testbed::command_in(
            &node.ns,
            AGENT,
            ["dump", "--json", "--pin-path", node.pins.to_str().unwrap()],
        )
        .output()
        .expect("lb-agent dump");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("dump JSON")
    };
    let failed = |d: &serde_json::Value| -> u64 {
        d["interfaces"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|i| i["name"] == "up0")
            .flat_map(|i| i["xdp_transmit_errors"].as_object().cloned())
            .flat_map(|m| m.into_iter().map(|(_, v)| v.as_u64().unwrap_or(0)))
            .sum()
    };
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut d = dump();
    while failed(&d) < u64::from(FRAMES) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        d = dump();
    }
    assert_eq!(
        failed(&d),
        u64::from(FRAMES),
        "up0's XDP transmit errors in the dump: {}; reasons {}",
        d["interfaces"],
        d["reasons"]
    );
    assert_eq!(
        d["reasons"]["tx"]["packets"].as_u64(),
        Some(u64::from(FRAMES)),
        "the datapath counted them as sent: {}",
        d["reasons"]
    );
    let metrics = node.metrics();
    let line = metrics
        .lines()
        .find(|l| {
            l.starts_with("lb_xdp_transmit_errors")
                && l.contains("interface=\"up0\"")
                && l.contains("xdp_tx_errors")
        })
        .unwrap_or_else(|| panic!("no XDP transmit errors of up0 in the metrics:\n{metrics}"));
    assert!(line.ends_with(&format!(" {FRAMES}")), "{line}");
}
