//! The agent in the DaemonSet's container, capabilities and all: on the
//! testbed's two-node cluster (manifest mode, XDP uplinks), each node's agent
//! runs as `deploy/kubernetes/daemonset.yaml`'s lb-agent container says, read
//! from the file so that the two cannot drift: its volumes (the node's bpffs
//! at the container's mount path, the host's cgroup hierarchy), its
//! environment (the pin path), its own args, and its securityContext: the
//! capabilities it adds and none other, no_new_privs, every mount read-only
//! but the writable volumes (`lb_testbed::agent::Confinement`).
//!
//! So confined, the agents load, pin and attach everything (XDP and tc on
//! the uplink, tc on the pod veths, the socket programs on the cgroup root)
//! and serve real clients through a ClusterIP (from a pod and from the
//! node itself) and a NodePort (from outside); a restart adopts the pins;
//! `lb-agent dump` works with the same capabilities; metrics answer on the
//! node's loopback only, healthz on the node's address. Then, for each
//! capability the DaemonSet adds, an agent without it fails at start and
//! says what the kernel refused: every capability listed is needed.
//!
//! Needs root (BPF, network namespaces, mount namespaces).

use std::{
    collections::BTreeSet,
    ffi::OsString,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use lb_testbed::{
    Cluster, Container, Options, agent::Privileges, http_get, kube_cluster::ShippedAgent,
    tcp_request,
};
use serde_json::Value;

const AGENT: &str = env!("CARGO_BIN_EXE_lb-agent");
const WAIT: Duration = Duration::from_secs(3);

/// The DaemonSet's container args but `run` and `--node-name` (the testbed
/// runs `run` and names each node).
fn own_args(shipped: &ShippedAgent) -> Vec<String> {
    let args = &shipped.args;
    assert_eq!(args.first().map(String::as_str), Some("run"), "{args:?}");
    args.iter()
        .skip(1)
        .filter(|a| !a.starts_with("--node-name"))
        .cloned()
        .collect()
}

/// What the kernel says when an agent lacks `cap` (the step of the start
/// that needs it); `None` for a capability this test knows no step of.
fn refusal(cap: &str) -> Option<&'static str> {
    match cap {
        // The LRU hash maps (conntrack) need CAP_BPF.
        "BPF" => Some("failed to create map"),
        // The XDP redirect map (a devmap) needs CAP_NET_ADMIN.
        "NET_ADMIN" => Some("failed to create map `tx_ports`"),
        // The verifier refuses variable packet offsets without it.
        "PERFMON" => Some("prohibited for !root"),
        _ => None,
    }
}

/// The mounts `pid` sees, with whether each is read-only.
fn mounts_of(pid: u32) -> Vec<(PathBuf, bool)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    text.lines()
        .map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            // mount id, parent, major:minor, root, mount point, options, ...
            (PathBuf::from(f[4]), f[5].split(',').any(|o| o == "ro"))
        })
        .collect()
}

/// `lb-agent dump --json` of `pins`, run with `container`'s confinement (as
/// `kubectl exec` into the container runs it).
fn confined_dump(container: &Container, pins: &Path) -> Value {
    let args: Vec<OsString> = ["dump", "--json", "--pin-path"]
        .map(OsString::from)
        .into_iter()
        .chain([pins.as_os_str().to_owned()])
        .collect();
    let (program, args) = container
        .confinement
        .as_ref()
        .unwrap()
        .command(Path::new(AGENT), &args)
        .unwrap();
    let out = Command::new(program).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "lb-agent dump with the DaemonSet's capabilities: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Who answers a TCP request from `ns` to `to` (a pod's name).
fn answer(ns: &str, to: SocketAddr) -> String {
    tcp_request(ns, to, b"hello\n", WAIT).unwrap_or_else(|e| panic!("{e:#}"))
}

#[test]
fn the_daemonsets_container_serves_with_its_capabilities_and_fails_without_any_one() {
    let shipped = ShippedAgent::from_deploy().unwrap();
    let container = shipped.container.clone();
    let confinement = container.confinement.clone().expect("a securityContext");
    let caps = confinement.capabilities.clone();
    assert!(!caps.is_empty(), "the DaemonSet adds no capability");
    assert!(
        confinement.no_new_privs && confinement.read_only,
        "{confinement:?}"
    );
    let extra = own_args(&shipped);

    let c = Cluster::up(Options::default()).unwrap();
    c.start_pod_servers(&[8080]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    for (name, yaml) in c.demo_manifests() {
        std::fs::write(dir.path().join(name), yaml).unwrap();
    }
    let pods: BTreeSet<String> = c.pods().map(|p| p.name().to_string()).collect();
    let cluster_ips = c.cluster_ips(10);

    c.start_agents_contained(AGENT.as_ref(), dir.path(), &container, &extra)
        .unwrap_or_else(|e| panic!("{e:#}"));
    for node in c.nodes() {
        let pid = c.agent_pid(node.name()).expect("the agent runs");
        assert_eq!(
            std::fs::read_link(format!("/proc/{pid}/exe")).unwrap(),
            std::fs::canonicalize(AGENT).unwrap(),
            "setpriv has executed the agent"
        );
        let p = Privileges::of(pid).unwrap();
        assert_eq!(p.effective, caps, "{}: {p:?}", node.name());
        assert_eq!(p.permitted, caps, "{}: {p:?}", node.name());
        assert_eq!(p.bounding, caps, "{}: {p:?}", node.name());
        assert!(p.inheritable.is_empty() && p.ambient.is_empty(), "{p:?}");
        assert!(p.no_new_privs, "{p:?}");
        for (mount, ro) in mounts_of(pid) {
            let writable = confinement.writable.contains(&mount);
            assert_eq!(ro, !writable, "{}: {}", node.name(), mount.display());
        }
    }

    let serves = |when: &str| {
        for (i, ip) in cluster_ips.iter().enumerate() {
            let vip = SocketAddr::new(*ip, 80);
            // A pod's connection goes through tc on its veth; the node's own
            // through the socket programs on the cgroup root.
            for ns in [c.pod("pod-a0").ns(), c.node("node-a").ns()] {
                let who = answer(ns, vip);
                assert!(pods.contains(&who), "{when}: {ns} -> {vip}: {who}");
            }
            // From outside, to a NodePort: XDP on the uplink.
            let np = c.node("node-b").sock(i == 1, 30080);
            let who = answer(c.client().ns(), np);
            assert!(pods.contains(&who), "{when}: client -> {np}: {who}");
        }
    };
    serves("first start");

    for node in c.nodes() {
        let d = confined_dump(&container, node.pin_path());
        let uplink = d["interfaces"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["role"] == "uplink")
            .unwrap_or_else(|| panic!("no uplink in {}", d["interfaces"]));
        assert!(
            uplink["hooks"].as_array().unwrap().contains(&"xdp".into()),
            "{}: {uplink}",
            node.name()
        );
        let sl = &d["socket_lb"];
        assert!(
            sl["programs"].as_u64().unwrap() > 0 && sl["programs_attached"] == sl["programs"],
            "{}: {sl}",
            node.name()
        );
        assert!(!d["services"].as_array().unwrap().is_empty());

        // The DaemonSet's agent keeps its metrics on the node's loopback; its
        // health is for the kubelet and load balancers, on every address.
        let ns = node.ns();
        let on =
            |ip: IpAddr, port: u16, path: &str| http_get(ns, SocketAddr::new(ip, port), path, WAIT);
        let loopback = IpAddr::from([127, 0, 0, 1]);
        assert_eq!(on(loopback, 10249, "/metrics").unwrap().0, 200);
        assert!(
            on(node.ipv4().into(), 10249, "/metrics").is_err(),
            "metrics answer on {}",
            node.ipv4()
        );
        assert_eq!(on(node.ipv4().into(), 10256, "/healthz").unwrap().0, 200);
    }

    // A restart (a rollout) adopts the pins under the same confinement.
    c.restart_agent("node-a")
        .unwrap_or_else(|e| panic!("{e:#}"));
    serves("after a restart");

    // Without any one of them, an agent does not start.
    for node in c.nodes() {
        c.stop_agent(node.name()).unwrap();
        let out = Command::new(AGENT)
            .args(["cleanup", "--pin-path"])
            .arg(node.pin_path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    for cap in &caps {
        // What each agent logs from now on.
        let logged: Vec<usize> = c
            .nodes()
            .iter()
            .map(|n| c.agent_log(n.name()).len())
            .collect();
        let mut fewer = container.clone();
        fewer.confinement.as_mut().unwrap().capabilities.remove(cap);
        let e = c
            .start_agents_contained(AGENT.as_ref(), dir.path(), &fewer, &extra)
            .expect_err(&format!(
                "the agent started without CAP_{cap}: the DaemonSet need not add it"
            ));
        let e = format!("{e:#}");
        assert!(e.contains("exited"), "without CAP_{cap}: {e}");
        let log = c.agent_log("node-a")[logged[0]..].to_string();
        // anyhow's report: the error and its causes (a backtrace may follow).
        let error: Vec<&str> = log
            .lines()
            .skip_while(|l| !l.starts_with("Error: "))
            .take_while(|l| !l.starts_with("Stack backtrace"))
            .collect();
        assert!(!error.is_empty(), "without CAP_{cap}, no error in:\n{log}");
        let mut said = vec![error[0].trim()];
        if let Some(why) = refusal(cap) {
            let line = error.iter().find(|l| l.contains(why)).unwrap_or_else(|| {
                panic!(
                    "without CAP_{cap}, expected {why:?} in:\n{}",
                    error.join("\n")
                )
            });
            said.push(line.trim());
        }
        eprintln!("without CAP_{cap}: {}", said.join(" ... "));
        for node in c.nodes() {
            c.stop_agent(node.name()).unwrap();
            let _ = Command::new(AGENT)
                .args(["cleanup", "--pin-path"])
                .arg(node.pin_path())
                .output();
        }
    }
}
