//! End to end against a real Kubernetes API server: the testbed's two-node
//! cluster of network namespaces (lb-testbed) driven through its own
//! control plane (etcd, kube-apiserver and kube-controller-manager v1.32 from
//! `shared/tools/kube-control-plane`, on loopback, with TLS, client
//! certificates and RBAC). The release build of lb-agent runs on both nodes
//! the way `deploy/kubernetes/daemonset.yaml` runs it: the DaemonSet's own
//! args (only `--node-name` and `--cgroup-path`: addresses and uplinks come
//! from the Node object; metrics on the agent's default, the node's
//! loopback), in-cluster configuration with a token of the ServiceAccount
//! that `deploy/kubernetes/rbac.yaml` binds (so the RBAC is shown to be
//! enough), the container's volumes (the node's bpffs where the container
//! mounts the host's) and environment, and its securityContext: only the
//! capabilities it adds, no_new_privs, every mount read-only but the bpffs
//! volume (so every case below also shows that those privileges suffice).
//!
//! Services of every type are created through the API; the real
//! EndpointSlice controller makes the slices from Pods whose status the
//! test sets as a kubelet would. Real clients (curl, socat, kernel sockets)
//! in the pods and in the external client check what answers. The cases
//! run in sequence on one cluster; each prints one line; the test ends with
//! `e2e-kube: N checks passed (...)`. On a failure it prints the agents'
//! logs, `lb-agent dump` of both nodes and the control plane's logs, runs
//! the remaining cases, and fails.
//!
//! Needs root. `cargo test -p lb-agent --test e2e_kube -- --nocapture`.

// The harness also serves the manifest-mode suite (e2e.rs).
#[allow(dead_code)]
#[macro_use]
#[path = "e2e/harness.rs"]
mod harness;

#[path = "e2e_kube/churn.rs"]
mod churn;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use harness::{Env, Proto, Tcp, Udp, fam, ms, probe, wait_until};
use k8s_openapi::api::core::v1::Service;
use lb_testbed::{
    AgentProbe, Options, http_get,
    kube_cluster::{NAMESPACE, POD_PORT},
};
use serde_json::{Value, json};

const ALL: [&str; 4] = ["pod-a0", "pod-a1", "pod-b0", "pod-b1"];
/// Changes made through the API must be in force within this.
const FOLLOW_WITHIN: Duration = Duration::from_secs(1);
/// How long a probe waits while polling for a change.
const FAST: Duration = Duration::from_millis(300);
/// The first answer of a new Service: the EndpointSlice controller and the
/// agent both act on it.
const NEW_SERVICE_WITHIN: Duration = Duration::from_secs(5);

/// The release build of the agent (what the DaemonSet's image ships), built
/// if needed.
fn release_agent() -> Result<PathBuf> {
    let debug = Path::new(env!("CARGO_BIN_EXE_lb-agent"));
    let target = debug
        .parent()
        .and_then(Path::parent)
        .context("the test binary's target directory")?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args([
            "build",
            "--release",
            "--package",
            "lb-agent",
            "--bin",
            "lb-agent",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("CARGO_TARGET_DIR", target)
        .status()
        .context("running cargo build --release")?;
    ensure!(status.success(), "building the release agent failed");
    Ok(target.join("release/lb-agent"))
}

/// A Service port per protocol: `port` to the pods' [`POD_PORT`] (or to a
/// named container port).
fn ports(port: u16, target: Value) -> Value {
    json!([
        {"name": "tcp", "port": port, "protocol": "TCP", "targetPort": named(&target, "tcp")},
        {"name": "udp", "port": port, "protocol": "UDP", "targetPort": named(&target, "udp")},
    ])
}

/// A target port: a number as it is, a container port name with the
/// protocol's suffix (`web` -> `web-tcp`, as the testbed's Pods name them).
fn named(t: &Value, proto: &str) -> Value {
    t.as_str()
        .map_or_else(|| t.clone(), |name| json!(format!("{name}-{proto}")))
}

/// A dual-stack Service spec.
fn dual_stack(kind: &str, selector: Value, ports: Value) -> Value {
    json!({
        "type": kind,
        "selector": selector,
        "ports": ports,
        "ipFamilyPolicy": "RequireDualStack",
        "ipFamilies": ["IPv4", "IPv6"],
    })
}

/// The ClusterIPs the API server gave a Service, IPv4 first.
fn cluster_ips(svc: &Service) -> Result<[IpAddr; 2]> {
    let ips: Vec<IpAddr> = svc
        .spec
        .as_ref()
        .and_then(|s| s.cluster_ips.clone())
        .unwrap_or_default()
        .iter()
        .map(|s| s.parse())
        .collect::<Result<_, _>>()?;
    match ips[..] {
        [a @ IpAddr::V4(_), b @ IpAddr::V6(_)] => Ok([a, b]),
        _ => bail!("not one ClusterIP per family: {ips:?}"),
    }
}

/// The NodePort the API server allocated to the Service's port of `proto`.
fn node_port(svc: &Service, proto: Proto) -> Result<u16> {
    let p = svc
        .spec
        .as_ref()
        .and_then(|s| s.ports.as_ref())
        .into_iter()
        .flatten()
        .find(|p| p.protocol.as_deref() == Some(&proto.to_string()))
        .with_context(|| format!("no {proto} port"))?;
    let np = p.node_port.context("no nodePort allocated")?;
    Ok(u16::try_from(np)?)
}

/// The backend counts of `service`'s frontends on `node` (from
/// `lb-agent dump`), by port name `<port>/<proto>/<family>`.
fn backends_on(env: &Env, node: &str, service: &str) -> Result<BTreeMap<String, u64>> {
    let prefix = format!("{NAMESPACE}/{service}:");
    let mut out = BTreeMap::new();
    for s in env.dump(node)?["services"].as_array().into_iter().flatten() {
        let Some(port) = s["name"].as_str().and_then(|n| n.strip_prefix(&prefix)) else {
            continue;
        };
        let n = s["frontends"][0]["backends"].as_u64().unwrap_or(0);
        out.insert(port.to_string(), n);
    }
    Ok(out)
}

/// Waits until every frontend of `service` on both nodes has `want`
/// backends (and there are four: TCP and UDP, both families); returns how
/// long that took. A failure also says what the API server's EndpointSlices
/// hold.
fn wait_backends(env: &Env, service: &str, want: u64, limit: Duration) -> Result<Duration> {
    wait_until(limit, || {
        for node in ["node-a", "node-b"] {
            let b = backends_on(env, node, service)?;
            ensure!(
                b.len() == 4 && b.values().all(|n| *n == want),
                "{service} on {node}: {b:?}, want 4 ports with {want} backends (the API server's EndpointSlices: ready {:?})",
                env.kube().ready_endpoints(service)
            );
        }
        Ok(())
    })
}

/// Asks `to` from `ns` until it is answered (up to `limit`); returns the
/// answering pod and how long it took.
fn first_answer(
    ns: &str,
    to: SocketAddr,
    proto: Proto,
    limit: Duration,
) -> Result<(String, Duration)> {
    let mut who = String::new();
    let took = wait_until(limit, || {
        who = probe(ns, to, proto, FAST).map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(())
    })
    .with_context(|| format!("{proto} {ns} -> {to}"))?;
    Ok((who, took))
}

/// Requests with the real clients (curl, socat) from `ns` to `to`; every
/// answer must come from one of `pods`. Returns who answered how often.
fn answered_by(
    env: &Env,
    ns: &str,
    to: SocketAddr,
    proto: Proto,
    n: usize,
    pods: &[&str],
) -> Result<BTreeMap<String, usize>> {
    let mut tally = BTreeMap::new();
    for _ in 0..n {
        let a = env.ask_expect(ns, to, proto, |a| {
            ensure!(
                pods.contains(&a.server.as_str()),
                "{proto} {ns} -> {to} answered by {a}, expected one of {pods:?}"
            );
            Ok(())
        })?;
        *tally.entry(a.server).or_insert(0) += 1;
    }
    Ok(tally)
}

fn tally(t: &BTreeMap<String, usize>) -> String {
    harness::tally_line(t)
}

/// Case 1: a dual-stack ClusterIP Service over all four pods, created
/// through the API: the API server allocates its addresses, the
/// EndpointSlice controller makes its slices from the Pods, and pods on
/// both nodes reach it over TCP and UDP in both families, spread over the
/// pods.
fn clusterip(env: &Env) -> Result<String> {
    let k = env.kube();
    let sel = k.pod_set("web", &ALL)?;
    let t0 = Instant::now();
    let svc = k.apply_service(
        "web",
        dual_stack("ClusterIP", sel, ports(80, json!(POD_PORT))),
    )?;
    let vips = cluster_ips(&svc)?;
    let a0 = env.c().pod("pod-a0");
    let (_, first) = first_answer(
        a0.ns(),
        SocketAddr::new(vips[0], 80),
        Tcp,
        NEW_SERVICE_WITHIN,
    )?;
    let first = t0.elapsed().max(first);
    let mut lines = Vec::new();
    // Pods, and the nodes' own namespaces (hostNetwork pods, the kubelet),
    // served by the socket programs.
    let clients = [
        ("pod-a0", env.c().pod("pod-a0").ns()),
        ("pod-b1", env.c().pod("pod-b1").ns()),
        ("node-a", env.c().node("node-a").ns()),
        ("node-b", env.c().node("node-b").ns()),
    ];
    for (client, ns) in clients {
        for v6 in [false, true] {
            for proto in [Tcp, Udp] {
                let t = answered_by(
                    env,
                    ns,
                    SocketAddr::new(vips[usize::from(v6)], 80),
                    proto,
                    4,
                    &ALL,
                )?;
                lines.push(format!("{client} {proto} {}: {}", fam(v6), tally(&t)));
            }
        }
    }
    let spread = answered_by(env, a0.ns(), SocketAddr::new(vips[0], 80), Tcp, 24, &ALL)?;
    check!(
        env,
        spread.len() >= 3,
        "24 connections to the ClusterIP reached only {}",
        tally(&spread)
    );
    let kubernetes = kubernetes_service_from_the_node(env)?;
    Ok(format!(
        "ClusterIPs {} and {} allocated by the API server; first answer {} after the create; {}; 24 TCP connections spread over {}; {kubernetes}",
        vips[0],
        vips[1],
        ms(first),
        lines.join("; "),
        tally(&spread)
    ))
}

/// The `kubernetes` Service from both nodes' own namespaces. This control
/// plane's API server advertises 127.0.0.1, which Endpoints refuse, so the
/// Service has no endpoints (see shared/tools/kube-control-plane): the node's
/// connect is refused at once, as a client of any Service without endpoints
/// is, rather than left to time out.
fn kubernetes_service_from_the_node(env: &Env) -> Result<String> {
    let api: kube::Api<Service> = kube::Api::namespaced(env.kube().cp.client(), "default");
    let svc = env
        .kube()
        .cp
        .block_on(api.get("kubernetes"))
        .context("reading the kubernetes Service")?;
    let ip: IpAddr = svc
        .spec
        .as_ref()
        .and_then(|s| s.cluster_ip.as_ref())
        .context("the kubernetes Service has no ClusterIP")?
        .parse()?;
    let to = SocketAddr::new(ip, 443);
    for node in ["node-a", "node-b"] {
        let ns = env.c().node(node).ns();
        let (r, t) = harness::timed(|| probe(ns, to, Tcp, Duration::from_secs(3)));
        check!(
            env,
            r == Err(lb_testbed::ProbeError::Refused) && t < Duration::from_millis(500),
            "{node} -> the kubernetes Service {to} (no endpoints): {r:?} after {}, expected refused at once",
            ms(t)
        );
    }
    Ok(format!(
        "the kubernetes Service {to} (no endpoints here) refused at connect from both nodes' own namespaces"
    ))
}

/// Case 2: a NodePort Service whose port the API server allocates,
/// externalTrafficPolicy Cluster, its one backend on node-b: the external
/// client reaches it on both nodes' addresses (v4, v6; TCP, UDP), through
/// node-a with source NAT. The node addresses came from the Node objects
/// alone (the agents have no --node-ip).
fn nodeport(env: &Env) -> Result<String> {
    let k = env.kube();
    let sel = k.pod_set("np", &["pod-b1"])?;
    let svc = k.apply_service(
        "np",
        dual_stack("NodePort", sel, ports(80, json!(POD_PORT))),
    )?;
    let client = env.c().client();
    let mut lines = Vec::new();
    for proto in [Tcp, Udp] {
        let np = node_port(&svc, proto)?;
        ensure!(
            (30000..=32767).contains(&np),
            "nodePort {np} outside the range"
        );
        first_answer(
            client.ns(),
            env.c().node("node-a").sock(false, np),
            proto,
            NEW_SERVICE_WITHIN,
        )?;
        for node in ["node-a", "node-b"] {
            for v6 in [false, true] {
                let to = env.c().node(node).sock(v6, np);
                let t = answered_by(env, client.ns(), to, proto, 2, &["pod-b1"])?;
                lines.push(format!("{proto} {to} -> {}", tally(&t)));
            }
        }
    }
    Ok(format!(
        "NodePorts allocated by the API server, answered on both nodes' Node-object addresses: {}",
        lines.join("; ")
    ))
}

/// Case 3: a LoadBalancer Service: not answered on its ingress IPs until
/// `status.loadBalancer.ingress` is set (as a cloud controller would),
/// then answered within a second, in both families; its externalIPs are
/// answered too.
fn loadbalancer(env: &Env) -> Result<String> {
    let k = env.kube();
    let sel = k.pod_set("lb", &["pod-a1", "pod-b0"])?;
    let lb = env.c().lb_ips(40);
    let ext = env.c().external_ips(40);
    let mut spec = dual_stack("LoadBalancer", sel, ports(80, json!(POD_PORT)));
    spec["externalIPs"] = json!(ext.iter().map(ToString::to_string).collect::<Vec<_>>());
    k.apply_service("lb", spec)?;
    let client = env.c().client();
    first_answer(
        client.ns(),
        SocketAddr::new(ext[0], 80),
        Tcp,
        NEW_SERVICE_WITHIN,
    )?;
    let before = probe(client.ns(), SocketAddr::new(lb[0], 80), Tcp, FAST);
    check!(
        env,
        before.is_err(),
        "the LB IP {} answered ({before:?}) before the Service's status named it",
        lb[0]
    );
    let t0 = Instant::now();
    k.set_ingress("lb", &lb)?;
    let (_, took) = first_answer(
        client.ns(),
        SocketAddr::new(lb[0], 80),
        Tcp,
        Duration::from_secs(3),
    )?;
    let took = took.max(t0.elapsed());
    check!(
        env,
        took <= FOLLOW_WITHIN,
        "the ingress IP answered only {} after the status patch",
        ms(took)
    );
    let mut lines = Vec::new();
    for ip in lb.iter().chain(&ext) {
        for proto in [Tcp, Udp] {
            let to = SocketAddr::new(*ip, 80);
            let t = answered_by(env, client.ns(), to, proto, 2, &["pod-a1", "pod-b0"])?;
            lines.push(format!("{proto} {to} -> {}", tally(&t)));
        }
    }
    Ok(format!(
        "ingress IP refused before the status patch, answered {} after it; {}",
        ms(took),
        lines.join("; ")
    ))
}

/// Case 4: readiness from Pod status: a pod turned not Ready leaves the
/// datapath of both nodes within a second of the status patch (the real
/// EndpointSlice controller in between), new connections avoid it, and it
/// comes back as fast when Ready again.
fn readiness(env: &Env) -> Result<String> {
    let k = env.kube();
    let sel = k.pod_set("ready", &["pod-a1", "pod-b1"])?;
    let svc = k.apply_service(
        "ready",
        dual_stack("ClusterIP", sel, ports(80, json!(POD_PORT))),
    )?;
    let vip = SocketAddr::new(cluster_ips(&svc)?[0], 80);
    wait_backends(env, "ready", 2, NEW_SERVICE_WITHIN)?;
    let b1 = env.c().pod("pod-b1");
    // pod-b1's readiness set to `ready`: the backends the maps must reach
    // within a second of the status patch.
    let flip = |ready: bool, want: u64| -> Result<Duration> {
        let t0 = Instant::now();
        k.cp.set_pod_ready(NAMESPACE, b1, ready)?;
        let took = wait_backends(env, "ready", want, Duration::from_secs(5))?.max(t0.elapsed());
        check!(
            env,
            took <= FOLLOW_WITHIN,
            "pod-b1 ready={ready} reached the maps only {} after its status patch",
            ms(took)
        );
        Ok(took)
    };
    let gone = flip(false, 1)?;
    let a0 = env.c().pod("pod-a0");
    let t = answered_by(env, a0.ns(), vip, Tcp, 10, &["pod-a1"])?;
    let back = flip(true, 2)?;
    Ok(format!(
        "Pod status patch to map write: not ready {} (then {}), ready again {}",
        ms(gone),
        tally(&t),
        ms(back)
    ))
}

/// Case 5: graceful termination during a rolling update, both families. A
/// Pod deleted without force stays terminating (serving, not ready):
/// - its established TCP streams (the client through node-b's NodePort, to
///   pod-a0 on node-a) flow on to their end, lossless, and its UDP flows
///   (one socket each) stay on it, while new flows of either protocol go to
///   the ready pod-b0 only;
/// - once pod-b0 is not ready either, new flows go to the terminating pod
///   (kube-proxy's fallback to serving-terminating endpoints), and back to
///   pod-b0 when it is ready again;
/// - once pod-a0 is gone for good (force-deleted, as the kubelet does when
///   its containers have stopped) its UDP flows move to pod-b0 and the
///   Service has one backend.
fn terminating(env: &Env) -> Result<String> {
    const BYTES: u64 = 4_000_000;
    const DURATION: Duration = Duration::from_secs(10);
    let k = env.kube();
    let sel = k.pod_set("term", &["pod-a0"])?;
    let svc = k.apply_service(
        "term",
        dual_stack("NodePort", sel, ports(80, json!(POD_PORT))),
    )?;
    let (tcp_port, udp_port) = (node_port(&svc, Tcp)?, node_port(&svc, Udp)?);
    wait_backends(env, "term", 1, NEW_SERVICE_WITHIN)?;
    let client = env.c().client();
    let nb = env.c().node("node-b");
    let targets: Vec<(String, &str, SocketAddr)> = [false, true]
        .map(|v6| {
            (
                format!("TCP client -> node-b NodePort {}", fam(v6)),
                client.ns(),
                nb.sock(v6, tcp_port),
            )
        })
        .into();
    let udp_to = [false, true].map(|v6| nb.sock(v6, udp_port));
    // New flows of both protocols and families from the client, each
    // answered by one of `pods`.
    let new_flows = |pods: &[&str]| -> Result<BTreeMap<String, usize>> {
        let mut t = BTreeMap::new();
        for v6 in [false, true] {
            for (proto, port) in [(Tcp, tcp_port), (Udp, udp_port)] {
                for (who, n) in answered_by(env, client.ns(), nb.sock(v6, port), proto, 4, pods)? {
                    *t.entry(who).or_insert(0) += n;
                }
            }
        }
        Ok(t)
    };
    let ((flows, steps), streams, servers) = with_streams(&targets, BYTES, DURATION, || {
        let mut flows = Vec::new();
        for to in udp_to {
            let f = lb_testbed::UdpFlow::open(client.ns(), to)?;
            let who = f
                .ask(b"term?\n", FAST * 3)
                .map_err(|e| anyhow::anyhow!("UDP {to}: {e}"))?;
            ensure!(who == "pod-a0", "UDP client -> {to} answered by {who}");
            flows.push((to, f));
        }
        let udp_stays = |when: &str| -> Result<()> {
            for (to, f) in &flows {
                let who = f
                    .ask(b"still?\n", FAST * 3)
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
                check!(
                    env,
                    who == "pod-a0",
                    "the UDP flow client -> {to} {when} answered by {who}, not pod-a0"
                );
            }
            Ok(())
        };
        thread::sleep(Duration::from_millis(1000));
        // A second pod joins, then the first is deleted gracefully.
        k.pod_set("term", &["pod-a0", "pod-b0"])?;
        wait_backends(env, "term", 2, Duration::from_secs(3))?;
        k.cp.delete_pod(NAMESPACE, "pod-a0")?;
        let moved = wait_until(Duration::from_secs(3), || {
            let t = new_flows(&["pod-b0"])?;
            ensure!(t.len() == 1, "{}", tally(&t));
            Ok(())
        })
        .context("new flows while pod-a0 terminates")?;
        udp_stays("while pod-a0 terminates")?;
        // No ready endpoint: the terminating one takes new flows.
        let b0 = env.c().pod("pod-b0");
        k.cp.set_pod_ready(NAMESPACE, b0, false)?;
        let fallback = wait_until(Duration::from_secs(3), || {
            new_flows(&["pod-a0"]).map(|_| ())
        })
        .context("new flows with pod-b0 not ready and pod-a0 terminating")?;
        udp_stays("with pod-b0 not ready")?;
        k.cp.set_pod_ready(NAMESPACE, b0, true)?;
        let back = wait_until(Duration::from_secs(3), || {
            new_flows(&["pod-b0"]).map(|_| ())
        })
        .context("new flows with pod-b0 ready again")?;
        udp_stays("with pod-b0 ready again")?;
        Ok((
            flows,
            format!(
                "new flows only to pod-b0 within {}, to the terminating pod-a0 within {} of pod-b0 turning not ready, to pod-b0 again within {}",
                ms(moved),
                ms(fallback),
                ms(back)
            ),
        ))
    })?;
    check!(
        env,
        servers.iter().all(|s| s == "pod-a0"),
        "the streams went to {servers:?}, not pod-a0"
    );
    // Gone for good: its UDP flows move on.
    k.cp.force_delete_pod(NAMESPACE, "pod-a0")?;
    wait_backends(env, "term", 1, Duration::from_secs(3))?;
    let mut moved = Vec::new();
    for (to, f) in &flows {
        let mut now = String::new();
        let took = wait_until(FOLLOW_WITHIN, || {
            now = f
                .ask(b"moved?\n", FAST)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            ensure!(now == "pod-b0", "answered by {now}");
            Ok(())
        })
        .with_context(|| format!("the UDP flow client -> {to} after pod-a0 was removed"))?;
        moved.push(format!("{to} after {}", ms(took)));
    }
    k.recreate_pod("pod-a0")?;
    Ok(format!(
        "pod-a0 deleted gracefully (terminating): {streams}; its UDP flows stayed; {steps}; once force-deleted its UDP flows moved to pod-b0 ({})",
        moved.join(", ")
    ))
}

/// Case 6: `publishNotReadyAddresses` and named target ports: a Service
/// that publishes not-ready addresses keeps a not-Ready pod as its backend,
/// and a port targeting the container port by name reaches its number.
fn not_ready_and_named(env: &Env) -> Result<String> {
    let k = env.kube();
    let a1 = env.c().pod("pod-a1");
    let sel = k.pod_set("pub", &["pod-a1"])?;
    let mut spec = dual_stack("ClusterIP", sel, ports(81, json!("web")));
    spec["publishNotReadyAddresses"] = json!(true);
    let svc = k.apply_service("pub", spec)?;
    let vips = cluster_ips(&svc)?;
    k.cp.set_pod_ready(NAMESPACE, a1, false)?;
    let b0 = env.c().pod("pod-b0");
    let mut lines = Vec::new();
    for v6 in [false, true] {
        for proto in [Tcp, Udp] {
            let to = SocketAddr::new(vips[usize::from(v6)], 81);
            first_answer(b0.ns(), to, proto, NEW_SERVICE_WITHIN)?;
            let t = answered_by(env, b0.ns(), to, proto, 2, &["pod-a1"])?;
            lines.push(format!("{proto} {to} -> {}", tally(&t)));
        }
    }
    k.cp.set_pod_ready(NAMESPACE, a1, true)?;
    // An ExternalName Service is DNS only: nothing in the datapath.
    k.apply_service(
        "alias",
        json!({"type": "ExternalName", "externalName": "example.invalid", "ports": [{"port": 80}]}),
    )?;
    thread::sleep(Duration::from_millis(500));
    for node in ["node-a", "node-b"] {
        let b = backends_on(env, node, "alias")?;
        check!(
            env,
            b.is_empty(),
            "ExternalName Service alias programmed on {node}: {b:?}"
        );
    }
    Ok(format!(
        "not-Ready pod-a1 served through port 81 -> named port web-tcp / web-udp (8080): {}; an ExternalName Service left the maps alone",
        lines.join("; ")
    ))
}

/// An agent endpoint on `node`: the status code and body of `path` on
/// `port` of the node's loopback.
fn agent_get(env: &Env, node: &str, probe: &AgentProbe) -> Result<(u16, String)> {
    http_get(env.c().node(node).ns(), probe.addr(), &probe.path, FAST * 3)
}

/// The value of metric `name` (no labels) that the agent on `node` exports
/// on 10249 of the node's loopback (the DaemonSet keeps `--metrics-addr` at
/// its default).
fn metric(env: &Env, node: &str, name: &str) -> Result<f64> {
    let probe = AgentProbe {
        path: "/metrics".into(),
        port: 10249,
    };
    let (code, body) = agent_get(env, node, &probe)?;
    ensure!(code == 200, "/metrics on {node}: HTTP {code}");
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .with_context(|| format!("no metric {name} on {node}"))
}

/// Long TCP streams through `targets` while `f` runs; every stream must be
/// lossless. Returns `f`'s result, a line about the streams and the pods
/// that served them.
fn with_streams<T>(
    targets: &[(String, &str, SocketAddr)],
    bytes: u64,
    duration: Duration,
    f: impl FnOnce() -> Result<T>,
) -> Result<(T, String, Vec<String>)> {
    thread::scope(|s| {
        let streams: Vec<_> = targets
            .iter()
            .map(|(_, ns, to)| s.spawn(move || lb_testbed::tcp_stream(ns, *to, bytes, duration)))
            .collect();
        let out = f();
        let mut lines = Vec::new();
        let mut servers = Vec::new();
        let mut broken = Vec::new();
        for ((what, _, _), st) in targets.iter().zip(streams) {
            match st
                .join()
                .map_err(|_| anyhow::anyhow!("stream thread panicked"))?
            {
                Ok(r) if r.lossless() => {
                    lines.push(format!(
                        "{what} to {} lossless (stall {})",
                        r.server,
                        ms(r.longest_stall)
                    ));
                    servers.push(r.server);
                }
                Ok(r) => broken.push(format!("{what}: {r:?}")),
                Err(e) => broken.push(format!("{what}: {e:#}")),
            }
        }
        let out = out?;
        ensure!(broken.is_empty(), "streams broke: {}", broken.join("; "));
        Ok((out, lines.join(", "), servers))
    })
}

/// The streams of the fault cases: the external client through node-a's
/// NodePort (v4, v6) and pod-a0 to the ClusterIP, of Service `name`
/// (whose backends are on node-b, so node-a source-NATs the NodePort flows).
fn fault_streams<'e>(env: &'e Env, name: &str) -> Result<Vec<(String, &'e str, SocketAddr)>> {
    let k = env.kube();
    let sel = k.pod_set(name, &["pod-b0", "pod-b1"])?;
    let svc = k.apply_service(
        name,
        dual_stack("NodePort", sel, ports(80, json!(POD_PORT))),
    )?;
    wait_backends(env, name, 2, NEW_SERVICE_WITHIN)?;
    let np = node_port(&svc, Tcp)?;
    let vip = cluster_ips(&svc)?;
    let client = env.c().client();
    let na = env.c().node("node-a");
    Ok(vec![
        (
            "client -> node-a NodePort v4".into(),
            client.ns(),
            na.sock(false, np),
        ),
        (
            "client -> node-a NodePort v6".into(),
            client.ns(),
            na.sock(true, np),
        ),
        (
            "pod-a0 -> ClusterIP v4".into(),
            env.c().pod("pod-a0").ns(),
            SocketAddr::new(vip[0], 80),
        ),
    ])
}

/// Case 7: the API server stops for 30 s while streams flow: the agents
/// keep serving (streams lossless, new connections answered), their
/// liveness probe (the DaemonSet's) answers 200 throughout, and the outage
/// shows: readiness 503, `lb_source_connected` 0, `sourceConnected: false`
/// on /healthz. When the API server is back, both agents say so again.
fn api_outage(env: &Env) -> Result<String> {
    const OUTAGE: Duration = Duration::from_secs(30);
    let k = env.kube();
    let targets = fault_streams(env, "outage")?;
    let vip = targets[2].2;
    let (live, ready) = (&k.shipped.liveness, &k.shipped.readiness);
    let nodes = ["node-a", "node-b"];
    let ((probes, requests, seen, back), streams, _) = with_streams(
        &targets,
        16_000_000,
        OUTAGE + Duration::from_secs(10),
        || {
            thread::sleep(Duration::from_secs(2));
            k.cp.stop_api_server()?;
            let t0 = Instant::now();
            let (mut probes, mut requests) = (0, 0);
            let mut seen = None;
            while t0.elapsed() < OUTAGE {
                for node in nodes {
                    let (code, body) = agent_get(env, node, live)?;
                    ensure!(
                        code == 200,
                        "{node}'s liveness probe {} answered {code} {} after the API server stopped: {body}",
                        live.path,
                        ms(t0.elapsed())
                    );
                    probes += 1;
                }
                let b1 = env.c().pod("pod-b1");
                answered_by(env, b1.ns(), vip, Tcp, 1, &["pod-b0", "pod-b1"])?;
                requests += 1;
                if seen.is_none() && t0.elapsed() > Duration::from_secs(15) {
                    let mut facts = Vec::new();
                    for node in nodes {
                        let (code, _) = agent_get(env, node, ready)?;
                        let (_, health) = agent_get(env, node, &AgentProbe::healthz())?;
                        let connected = metric(env, node, "lb_source_connected")?;
                        ensure!(
                            code == 503
                                && health.contains("\"sourceConnected\": false")
                                && connected == 0.0,
                            "{node} does not report the outage: readiness {code}, healthz {health}, lb_source_connected {connected}"
                        );
                        facts.push(format!("{node}: readiness {code}, lb_source_connected 0"));
                    }
                    seen = Some(facts.join(", "));
                }
                thread::sleep(Duration::from_millis(500));
            }
            let t1 = Instant::now();
            k.cp.start_api_server()?;
            let back = wait_until(Duration::from_secs(30), || {
                for node in nodes {
                    ensure!(
                        metric(env, node, "lb_source_connected")? == 1.0,
                        "{node} not back"
                    );
                    ensure!(agent_get(env, node, ready)?.0 == 200, "{node} not ready");
                }
                Ok(())
            })?
            .max(t1.elapsed());
            // The controller manager lost the API server too; the next
            // cases need its EndpointSlice controller.
            k.wait_controllers(Duration::from_secs(60))?;
            Ok((probes, requests, seen, back))
        },
    )?;
    check!(env, seen.is_some(), "the outage was never checked");
    Ok(format!(
        "API server stopped for {} s: {probes} liveness probes ({}) all 200, {requests} new connections answered, {}; back in contact and ready {} after its restart began; streams: {streams}",
        OUTAGE.as_secs(),
        live.path,
        seen.unwrap_or_default(),
        ms(back)
    ))
}

/// Case 8: the agents restarted as the DaemonSet runs them while streams
/// flow, with the API server up, then (node-a) with it down: no stream
/// breaks, the maps keep the same ids, rows and frontends throughout, and
/// the agent restarted without an API server becomes ready once it is back.
fn restart_as_shipped(env: &Env) -> Result<String> {
    let k = env.kube();
    let targets = fault_streams(env, "restart")?;
    let nodes = ["node-a", "node-b"];
    let before: Vec<_> = nodes.iter().map(|n| env.shape(n)).collect::<Result<_>>()?;
    let (took, streams, _) = with_streams(&targets, 12_000_000, Duration::from_secs(16), || {
        thread::sleep(Duration::from_secs(1));
        let mut took = Vec::new();
        for node in nodes {
            let t = Instant::now();
            env.c().restart_agent(node)?;
            took.push(format!(
                "{node} ready {} after its restart",
                ms(t.elapsed())
            ));
        }
        k.cp.stop_api_server()?;
        let t = Instant::now();
        env.c().restart_agent_until("node-a", &k.shipped.liveness)?;
        took.push(format!(
            "node-a live {} after a restart without an API server",
            ms(t.elapsed())
        ));
        thread::sleep(Duration::from_secs(3));
        let during = env.shape("node-a")?;
        let diff = before[0].diff(&during);
        ensure!(
            diff.is_empty(),
            "node-a's maps changed while it waited for the API server: {diff:?}"
        );
        k.cp.start_api_server()?;
        let t = Instant::now();
        wait_until(Duration::from_secs(30), || {
            ensure!(
                agent_get(env, "node-a", &k.shipped.readiness)?.0 == 200,
                "not ready"
            );
            Ok(())
        })?;
        took.push(format!(
            "ready {} after the API server came back",
            ms(t.elapsed())
        ));
        Ok(took)
    })?;
    for (node, b) in nodes.iter().zip(&before) {
        let diff = b.diff(&env.shape(node)?);
        check!(
            env,
            diff.is_empty(),
            "{node}'s maps differ after the restarts: {diff:?}"
        );
    }
    Ok(format!(
        "{}; maps identical before, during and after; streams: {streams}",
        took.join(", ")
    ))
}

/// The frontend addresses (`addr:port`) of `service` on `node`.
fn frontends_on(env: &Env, node: &str, service: &str) -> Result<BTreeSet<String>> {
    let prefix = format!("{NAMESPACE}/{service}:");
    let mut out = BTreeSet::new();
    for s in env.dump(node)?["services"].as_array().into_iter().flatten() {
        if !s["name"].as_str().is_some_and(|n| n.starts_with(&prefix)) {
            continue;
        }
        for f in s["frontends"].as_array().into_iter().flatten() {
            out.extend(f["address"].as_str().map(str::to_string));
        }
    }
    Ok(out)
}

/// Case 9: the agents cut off from the API server (a partition; the API
/// server stays up) while a Service is deleted, another changes its port,
/// and a third is created with its EndpointSlices: they keep serving what
/// they knew, and when the way is back they catch up (relist or resumed
/// watches) and converge.
fn partition(env: &Env) -> Result<String> {
    let k = env.kube();
    let web = k.service("web")?;
    let vip = cluster_ips(&web)?[0];
    let old = SocketAddr::new(vip, 80).to_string();
    let new = SocketAddr::new(vip, 90).to_string();
    env.c().cut_api(true);
    thread::sleep(Duration::from_secs(3));
    k.delete_service("np")?;
    let mut spec = serde_json::to_value(web.spec.context("web has no spec")?)?;
    spec["ports"] = ports(90, json!(POD_PORT));
    k.apply_service("web", spec)?;
    // Without a selector, its slices written here: what the agents must
    // catch up on does not wait for the controller manager (which lost the
    // API server in the cases before and comes back on its own backoff).
    let mut spec = dual_stack("ClusterIP", json!(null), ports(80, json!(POD_PORT)));
    spec.as_object_mut().map(|o| o.remove("selector"));
    let late = k.apply_service("late", spec)?;
    k.apply_own_slices("late", &["pod-b1"])?;
    thread::sleep(Duration::from_secs(2));
    // Meanwhile they serve what they knew.
    let stale = backends_on(env, "node-a", "np")?;
    check!(
        env,
        stale.len() == 4,
        "node-a dropped np while cut off: {stale:?}"
    );
    let a0 = env.c().pod("pod-a0");
    answered_by(env, a0.ns(), old.parse()?, Tcp, 2, &ALL)?;
    env.c().cut_api(false);
    let t0 = Instant::now();
    let took = wait_until(Duration::from_secs(15), || {
        for node in ["node-a", "node-b"] {
            let np = backends_on(env, node, "np")?;
            ensure!(np.is_empty(), "{node} still has np: {np:?}");
            let f = frontends_on(env, node, "web")?;
            ensure!(
                f.contains(&new) && !f.contains(&old),
                "{node}: web's frontends {f:?}, want {new} and not {old}"
            );
            let l = backends_on(env, node, "late")?;
            ensure!(
                l.len() == 4 && l.values().all(|n| *n == 1),
                "{node}: late {l:?}"
            );
        }
        Ok(())
    })?
    .max(t0.elapsed());
    let late_vip = SocketAddr::new(cluster_ips(&late)?[1], 80);
    let t = answered_by(env, a0.ns(), late_vip, Udp, 2, &["pod-b1"])?;
    answered_by(env, a0.ns(), new.parse()?, Tcp, 2, &ALL)?;
    Ok(format!(
        "cut off for 5 s while np was deleted, web moved from port 80 to 90 and late was created (served the old state meanwhile): converged {} after the way was back; late answered ({}), web on {new}",
        ms(took),
        tally(&t)
    ))
}

/// Case 10: a silent partition: every packet between the agents and the API
/// server dropped, no connection reset, so the watches just hear nothing.
/// The agents find out by themselves (an unanswered probe): readiness 503
/// and `lb_source_connected` 0, while they keep serving. A Service created
/// meanwhile is in force within seconds of the way being back: the stuck
/// watches are replaced by a relist.
fn silent_partition(env: &Env) -> Result<String> {
    /// The agent's contact check (10 s), its timeout (2 s), readiness'
    /// grace (10 s), and slack.
    const NOTICED_WITHIN: Duration = Duration::from_secs(35);
    let k = env.kube();
    let ready = &k.shipped.readiness;
    let nodes = ["node-a", "node-b"];
    let web = k.service("web")?;
    // (The case before moved it to another port.)
    let port = web
        .spec
        .as_ref()
        .and_then(|s| Some(s.ports.as_ref()?.first()?.port))
        .context("web's port")?;
    let vip = SocketAddr::new(cluster_ips(&web)?[0], u16::try_from(port)?);
    env.c().silence_api(true)?;
    let t0 = Instant::now();
    let outcome = (|| -> Result<_> {
        let noticed = wait_until(NOTICED_WITHIN, || {
            for node in nodes {
                let (code, body) = agent_get(env, node, ready)?;
                ensure!(code == 503, "{node}'s readiness {code}: {body}");
                ensure!(
                    metric(env, node, "lb_source_connected")? == 0.0,
                    "{node} still says it is connected"
                );
            }
            Ok(())
        })
        .context("the agents noticing the silent partition")?
        .max(t0.elapsed());
        // Meanwhile they serve what they knew.
        let a0 = env.c().pod("pod-a0");
        answered_by(env, a0.ns(), vip, Tcp, 2, &ALL)?;
        let mut spec = dual_stack("ClusterIP", json!(null), ports(80, json!(POD_PORT)));
        spec.as_object_mut().map(|o| o.remove("selector"));
        let hushed = k.apply_service("hushed", spec)?;
        k.apply_own_slices("hushed", &["pod-a1"])?;
        Ok((noticed, hushed))
    })();
    env.c().silence_api(false)?;
    let (noticed, hushed) = outcome?;
    let t1 = Instant::now();
    let converged = wait_until(Duration::from_secs(15), || {
        for node in nodes {
            let h = backends_on(env, node, "hushed")?;
            ensure!(
                h.len() == 4 && h.values().all(|n| *n == 1),
                "{node}: hushed {h:?}"
            );
            ensure!(agent_get(env, node, ready)?.0 == 200, "{node} not ready");
        }
        Ok(())
    })?
    .max(t1.elapsed());
    let to = SocketAddr::new(cluster_ips(&hushed)?[0], 80);
    let t = answered_by(env, env.c().pod("pod-b1").ns(), to, Tcp, 2, &["pod-a1"])?;
    Ok(format!(
        "packets to and from the API server dropped: both agents not ready, lb_source_connected 0, after {} (still serving web); hushed, created meanwhile, in force and the agents ready {} after the way was back ({})",
        ms(noticed),
        ms(converged),
        tally(&t)
    ))
}

/// Case 10: trafficDistribution PreferClose through the real EndpointSlice
/// controller. The Nodes are labelled zone-a and zone-b (one node each); the
/// controller hints every endpoint for its own zone, and each agent reads its
/// zone from its Node: node-a's clients (a pod, the node's own namespace)
/// reach node-a's pods only, node-b's pod node-b's, TCP and UDP, both
/// families. When node-b's pods leave the selection, its clients (no endpoint
/// for their zone) fall back to every endpoint.
fn topology(env: &Env) -> Result<String> {
    let k = env.kube();
    let sel = k.pod_set("zoned", &ALL)?;
    let mut spec = dual_stack("ClusterIP", sel, ports(80, json!(POD_PORT)));
    spec["trafficDistribution"] = json!("PreferClose");
    let svc = k.apply_service("zoned", spec)?;
    let vips = cluster_ips(&svc)?;
    // The controller adds the hints in a write of its own after the slices'
    // first: in force when each node's tables hold its zone's two pods.
    let hinted = wait_backends(env, "zoned", 2, NEW_SERVICE_WITHIN)
        .context("the controller's zone hints taking effect")?;
    let c = env.c();
    let clients = [
        ("pod-a0", c.pod("pod-a0").ns(), ["pod-a0", "pod-a1"]),
        ("node-a", c.node("node-a").ns(), ["pod-a0", "pod-a1"]),
        ("pod-b1", c.pod("pod-b1").ns(), ["pod-b0", "pod-b1"]),
    ];
    let mut lines = Vec::new();
    for v6 in [false, true] {
        let to = SocketAddr::new(vips[usize::from(v6)], 80);
        for (who, ns, zone_pods) in &clients {
            for proto in [Tcp, Udp] {
                let t = answered_by(env, ns, to, proto, 8, zone_pods)?;
                if proto == Tcp {
                    lines.push(format!("{who} {}: {}", fam(v6), tally(&t)));
                }
            }
        }
    }
    k.pod_set("zoned", &["pod-a0", "pod-a1"])?;
    let to = SocketAddr::new(vips[0], 80);
    let fell_back = wait_until(Duration::from_secs(3), || {
        answered_by(env, c.pod("pod-b1").ns(), to, Tcp, 6, &["pod-a0", "pod-a1"]).map(drop)
    })
    .context("node-b's clients falling back to node-a's pods")?;
    k.delete_service("zoned")?;
    Ok(format!(
        "PreferClose (hints in force {} after creation): {}; node-b's pods out of the selection: pod-b1 answered by node-a's pods after {}",
        ms(hinted),
        lines.join("; "),
        ms(fell_back)
    ))
}

/// Case 11: the Node's eligibility for external load balancers, as
/// kube-proxy's `/healthz` reports it: tainted ToBeDeletedByClusterAutoscaler,
/// node-a's `/healthz` answers 503 with `nodeEligible: false` (node-b's stays
/// 200); the taint removed, 200 again.
fn node_eligible(env: &Env) -> Result<String> {
    let k = env.kube();
    let healthz = AgentProbe::healthz();
    let eligible = |node: &str| -> Result<(u16, Value)> {
        let (code, body) = agent_get(env, node, &healthz)?;
        let json: Value =
            serde_json::from_str(&body).with_context(|| format!("{node}'s /healthz: {body:?}"))?;
        Ok((code, json["nodeEligible"].clone()))
    };
    let set = |taints: &[&str], want: (u16, Value)| -> Result<Duration> {
        k.cp.set_node_taints("node-a", taints)?;
        wait_until(Duration::from_secs(3), || {
            let got = eligible("node-a")?;
            ensure!(got == want, "node-a's /healthz: {got:?}, want {want:?}");
            Ok(())
        })
    };
    let before = eligible("node-a")?;
    check!(
        env,
        before == (200, json!(true)),
        "node-a's /healthz before the taint: {before:?}"
    );
    let off = set(&["ToBeDeletedByClusterAutoscaler"], (503, json!(false)))?;
    let other = eligible("node-b")?;
    check!(
        env,
        other == (200, json!(true)),
        "node-b's /healthz while node-a is drained: {other:?}"
    );
    let on = set(&[], (200, json!(true)))?;
    Ok(format!(
        "node-a tainted ToBeDeletedByClusterAutoscaler: /healthz 503 nodeEligible false after {} (node-b 200); untainted: 200 after {}",
        ms(off),
        ms(on)
    ))
}

/// Case 12: the cluster CIDRs come from the Nodes: with no --cluster-cidr
/// (the DaemonSet passes none) each agent watches every Node and takes their
/// `spec.podCIDRs`, which `lb-agent dump` shows.
fn cluster_cidrs_from_nodes(env: &Env) -> Result<String> {
    let mut shown_all = Vec::new();
    for node in ["node-a", "node-b"] {
        let (shown, want) = env.cluster_cidrs(node)?;
        check!(
            env,
            shown.as_ref() == Some(&want),
            "{node}'s cluster CIDRs {shown:?}, expected the Nodes' pod CIDRs {want:?}"
        );
        shown_all = want;
    }
    Ok(format!(
        "both agents' cluster CIDRs are the Nodes' pod CIDRs: {}",
        shown_all.join(" ")
    ))
}

fn main_cases() -> Vec<harness::Case> {
    vec![
        ("clusterip", clusterip),
        ("nodeport", nodeport),
        ("loadbalancer", loadbalancer),
        ("readiness", readiness),
        ("terminating", terminating),
        ("publish-not-ready-and-named-ports", not_ready_and_named),
        ("api-server-outage", api_outage),
        ("restart-as-shipped", restart_as_shipped),
        ("partition-and-catch-up", partition),
        ("silent-partition", silent_partition),
        ("topology", topology),
        ("node-eligible", node_eligible),
        ("cluster-cidrs-from-nodes", cluster_cidrs_from_nodes),
        ("churn-soak", churn::churn_soak),
    ]
}

#[test]
fn agents_run_as_the_daemonset_serve_what_the_api_server_says() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        panic!("the Kubernetes e2e suite needs root: run it with `cargo xtask test`");
    }
    let t0 = Instant::now();
    let agent = release_agent().expect("the release agent");
    let opts = Options {
        pods_per_node: churn::PODS_PER_NODE,
        ..Options::default()
    };
    let env = Env::up_kube(opts, &agent).expect("bringing up the cluster and its API server");
    println!(
        "e2e-kube: cluster {} and its API server up, lb-agent (release) on both nodes as the DaemonSet runs it: {:?} with capabilities {:?} only, in {:.1}s",
        env.c().run_id(),
        env.kube().shipped.args,
        env.kube()
            .shipped
            .container
            .confinement
            .as_ref()
            .map(|c| &c.capabilities),
        t0.elapsed().as_secs_f64()
    );
    harness::run_cases(&env, "e2e-kube", &main_cases(), t0);
}
