//! End to end: a two-node cluster of network namespaces (lb-testbed) with
//! `lb-agent run --manifests` on both nodes, pod servers in four pods, and
//! real clients (curl, socat, kernel sockets) in the pods and in the external
//! client. Every case uses its own Services, written to the manifest
//! directory; the cluster is brought up once and the cases run in sequence.
//! Each case prints one line saying what it checked; the test ends with
//! `e2e: N checks passed (...)`. On a failure it prints the agents' logs and
//! `lb-agent dump` of both nodes (and a tcpdump of a failing request), runs the
//! remaining cases, and fails.
//!
//! Needs root (namespaces, BPF). `cargo test -p lb-agent --test e2e -- --nocapture`.

// The harness also serves the Kubernetes suite (e2e_kube.rs).
#[allow(dead_code)]
#[macro_use]
#[path = "e2e/harness.rs"]
mod harness;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    sync::{
        Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use harness::{
    ANSWER, Answer, Env, Shape, Tcp, Udp, fam, ms, probe, spread, tally_line, timed, wait_until,
};
use lb_testbed::{
    Options, PodNetwork, ProbeError, StreamReport, Uplinks, curl_in, manifests::ServiceSpec,
    socat_udp_in,
};

const PODS: [&str; 4] = ["pod-a0", "pod-a1", "pod-b0", "pod-b1"];
/// A stream may not go longer than this with bytes outstanding and nothing
/// echoed ("well under a second").
const MAX_STALL: Duration = Duration::from_millis(500);
/// A refusal must come at once: well under a second.
const REFUSE_WITHIN: Duration = Duration::from_millis(500);
/// Manifest changes must be in force within a second.
const FOLLOW_WITHIN: Duration = Duration::from_secs(1);
/// How long a probe waits while polling for a change: an answer takes
/// milliseconds.
const FAST: Duration = Duration::from_millis(100);

/// The Services of the suite: (ClusterIP number, name).
const LOCAL: (u128, &str) = (20, "e2e-local");
const REMOTE: (u128, &str) = (21, "e2e-remote");
const NP_TO_B: (u128, &str) = (22, "e2e-np-to-b");
const NP_TO_A: (u128, &str) = (23, "e2e-np-to-a");
const LB: (u128, &str) = (24, "e2e-lb");
const SPREAD: (u128, &str) = (25, "e2e-spread");
const CHURN: (u128, &str) = (26, "e2e-churn");
const RESTART: (u128, &str) = (27, "e2e-restart");
const EMPTY: (u128, &str) = (28, "e2e-empty");
const EDIT: (u128, &str) = (29, "e2e-edit");
const HAIRPIN: (u128, &str) = (30, "e2e-hairpin");
const HEALTH: (u128, &str) = (31, "e2e-health");
const ITP_LOCAL: (u128, &str) = (32, "e2e-itp-local");
const AFFINITY: (u128, &str) = (33, "e2e-affinity");
const FIREWALL: (u128, &str) = (34, "e2e-firewall");
const ZONED: (u128, &str) = (35, "e2e-zoned");
const TYPED: (u128, &str) = (36, "e2e-typed");
const LEFT: (u128, &str) = (37, "e2e-left");
const UDP_CT: (u128, &str) = (38, "e2e-udp-ct");

const NODEPORT_TO_B: u16 = 30101;
const NODEPORT_TO_A: u16 = 30102;
const NODEPORT_LB: u16 = 30103;
const NODEPORT_RESTART: u16 = 30107;
const NODEPORT_EMPTY: u16 = 30108;
const EDIT_OLD: (u16, u16) = (81, 30109);
const EDIT_NEW: (u16, u16) = (82, 30110);
const CHURN_PODS: [&str; 3] = ["pod-a1", "pod-b0", "pod-b1"];
const NODEPORT_HEALTH: u16 = 30111;
const HEALTH_CHECK_PORT: u16 = 32100;
const NODEPORT_FIREWALL: u16 = 30112;
const NODEPORT_TYPED: u16 = 30113;
/// e2e-left's endpoint, then the ones that replace it.
const LEFT_FIRST: &str = "pod-b0";
const LEFT_NEXT: [&str; 2] = ["pod-a1", "pod-b1"];
/// e2e-udp-ct's (port, nodePort) before and after it is renumbered.
const UDP_CT_OLD: (u16, u16) = (83, 30115);
const UDP_CT_NEW: (u16, u16) = (84, 30116);

fn spec(
    env: &Env,
    svc: (u128, &str),
    kind: &'static str,
    port: u16,
    np: Option<u16>,
) -> ServiceSpec {
    ServiceSpec::new(svc.1, kind, env.c().cluster_ips(svc.0)).tcp_udp("p", port, np)
}

fn edit_spec(env: &Env, (port, np): (u16, u16)) -> ServiceSpec {
    spec(env, EDIT, "NodePort", port, Some(np))
}

fn lb_spec(env: &Env) -> ServiceSpec {
    let mut s = spec(env, LB, "LoadBalancer", 80, Some(NODEPORT_LB));
    s.load_balancer_ips = env.c().lb_ips(20);
    s.external_ips = env.c().external_ips(20);
    s
}

/// Every Service of the suite as it starts.
fn initial_services(env: &Env) -> Vec<(ServiceSpec, Vec<&'static str>)> {
    vec![
        (spec(env, LOCAL, "ClusterIP", 80, None), vec!["pod-a1"]),
        (spec(env, REMOTE, "ClusterIP", 80, None), vec!["pod-b0"]),
        (
            spec(env, NP_TO_B, "NodePort", 80, Some(NODEPORT_TO_B)),
            vec!["pod-b1"],
        ),
        (
            spec(env, NP_TO_A, "NodePort", 80, Some(NODEPORT_TO_A)),
            vec!["pod-a1"],
        ),
        (lb_spec(env), PODS.to_vec()),
        (spec(env, SPREAD, "ClusterIP", 80, None), PODS.to_vec()),
        (spec(env, CHURN, "ClusterIP", 80, None), CHURN_PODS.to_vec()),
        (
            spec(env, RESTART, "NodePort", 80, Some(NODEPORT_RESTART)),
            vec!["pod-b0", "pod-b1"],
        ),
        (
            spec(env, EMPTY, "NodePort", 80, Some(NODEPORT_EMPTY)),
            vec![],
        ),
        (edit_spec(env, EDIT_OLD), vec!["pod-a1", "pod-b0"]),
        (spec(env, HAIRPIN, "ClusterIP", 80, None), vec!["pod-a0"]),
        (health_spec(env), vec!["pod-b1"]),
        (itp_local_spec(env), vec!["pod-b0"]),
        (affinity_spec(env, Some(60)), PODS.to_vec()),
        (firewall_spec(env, &client_ranges(env)), PODS.to_vec()),
        (zoned_spec(env), PODS.to_vec()),
        (typed_spec(env, "LoadBalancer"), vec!["pod-b0"]),
        (spec(env, LEFT, "ClusterIP", 80, None), vec![LEFT_FIRST]),
    ]
}

/// A ClusterIP Service with trafficDistribution PreferClose.
fn zoned_spec(env: &Env) -> ServiceSpec {
    let mut s = spec(env, ZONED, "ClusterIP", 80, None);
    s.traffic_distribution = Some("PreferClose");
    s
}

/// e2e-typed as `kind`, always with its nodePort and its ingress status (what
/// a Service changed from LoadBalancer keeps until its controllers catch up).
fn typed_spec(env: &Env, kind: &'static str) -> ServiceSpec {
    let mut s = spec(env, TYPED, kind, 80, Some(NODEPORT_TYPED));
    s.load_balancer_ips = env.c().lb_ips(TYPED.0);
    s
}

/// A LoadBalancer Service with externalTrafficPolicy Local and a health
/// check node port.
fn health_spec(env: &Env) -> ServiceSpec {
    let mut s = spec(env, HEALTH, "LoadBalancer", 80, Some(NODEPORT_HEALTH));
    s.load_balancer_ips = env.c().lb_ips(31);
    s.external_traffic_policy_local = true;
    s.health_check_node_port = Some(HEALTH_CHECK_PORT);
    s
}

fn itp_local_spec(env: &Env) -> ServiceSpec {
    let mut s = spec(env, ITP_LOCAL, "ClusterIP", 80, None);
    s.internal_traffic_policy_local = true;
    s
}

fn affinity_spec(env: &Env, timeout: Option<u32>) -> ServiceSpec {
    let mut s = spec(env, AFFINITY, "ClusterIP", 80, None);
    s.affinity_timeout = timeout;
    s
}

fn firewall_spec(env: &Env, ranges: &[String]) -> ServiceSpec {
    let mut s = spec(env, FIREWALL, "LoadBalancer", 80, Some(NODEPORT_FIREWALL));
    s.load_balancer_ips = env.c().lb_ips(34);
    s.source_ranges = ranges.to_vec();
    s
}

/// The external client's own addresses, as source ranges.
fn client_ranges(env: &Env) -> Vec<String> {
    env.c()
        .client()
        .addrs()
        .iter()
        .map(|a| format!("{a}/{}", if a.is_ipv4() { 32 } else { 128 }))
        .collect()
}

fn vip(env: &Env, svc: (u128, &str), v6: bool, port: u16) -> SocketAddr {
    SocketAddr::new(env.c().cluster_ips(svc.0)[usize::from(v6)], port)
}

fn both<T>(f: impl Fn(bool) -> T) -> [T; 2] {
    [f(false), f(true)]
}

/// Case 1: ClusterIP from pods to a backend on their own node and on the other
/// node; the backend sees the client pod's own address.
fn clusterip(env: &Env) -> Result<String> {
    let mut n = 0;
    for client in ["pod-a0", "pod-b1"] {
        let cp = env.c().pod(client);
        for (svc, backend) in [(LOCAL, "pod-a1"), (REMOTE, "pod-b0")] {
            for v6 in [false, true] {
                let to = vip(env, svc, v6, 80);
                let own = cp.addrs()[usize::from(v6)];
                for proto in [Tcp, Udp] {
                    env.ask_expect(cp.ns(), to, proto, |a| {
                        if a.server != backend || a.peer.ip() != own {
                            bail!(
                                "{proto} {client} -> {} {to}: answered by {a}, expected {backend} seeing {own}",
                                svc.1
                            );
                        }
                        Ok(())
                    })?;
                    n += 1;
                }
            }
        }
    }
    Ok(format!(
        "{n}/{n} requests (curl TCP, socat UDP, v4+v6) from pod-a0 and pod-b1 to a backend on the same node (pod-a1 / pod-b0) and on the other node each answered by it, seeing the client pod's own address"
    ))
}

/// Case 2: NodePort with externalTrafficPolicy Cluster, the only backend on the
/// other node: answered through the dialed node, which the backend sees as
/// the peer (source NAT from its address, a port of its SNAT range).
fn nodeport(env: &Env) -> Result<String> {
    let client = env.c().client();
    let mut lines = Vec::new();
    for (dialed, nodeport, backend) in [
        ("node-a", NODEPORT_TO_B, "pod-b1"),
        ("node-b", NODEPORT_TO_A, "pod-a1"),
    ] {
        let node = env.c().node(dialed);
        let (lo, hi) = env.snat_ports(dialed)?;
        for v6 in [false, true] {
            let to = node.sock(v6, nodeport);
            let snat = node.addrs()[usize::from(v6)];
            for proto in [Tcp, Udp] {
                let a = env.ask_expect(client.ns(), to, proto, |a| {
                    if a.server != backend
                        || a.peer.ip() != snat
                        || !(lo..=hi).contains(&a.peer.port())
                    {
                        bail!(
                            "{proto} client -> {dialed} {to}: answered by {a}, expected {backend} seeing {snat} with a port in {lo}-{hi}"
                        );
                    }
                    Ok(())
                })?;
                lines.push(format!("{proto} {to} -> {}", a));
            }
        }
    }
    Ok(format!(
        "client -> NodePort (connected sockets: curl, socat) on each node, backend only on the other node: {}",
        lines.join("; ")
    ))
}

/// Case 3: The LoadBalancer ingress IP and the externalIP from the client (routed
/// via node-a): answered by the Service's pods; a backend on node-a sees the
/// client, one on node-b sees node-a (source NAT for remote backends only).
fn loadbalancer(env: &Env) -> Result<String> {
    let client = env.c().client();
    let na = env.c().node("node-a");
    let mut tally: BTreeMap<String, usize> = BTreeMap::new();
    let mut n = 0;
    for (what, ips) in [
        ("LB ingress", env.c().lb_ips(20)),
        ("externalIP", env.c().external_ips(20)),
    ] {
        for v6 in [false, true] {
            let to = SocketAddr::new(ips[usize::from(v6)], 80);
            let client_ip = client.addrs()[usize::from(v6)];
            let node_ip = na.addrs()[usize::from(v6)];
            for proto in [Tcp, Udp] {
                for _ in 0..6 {
                    let a = env.ask_expect(client.ns(), to, proto, |a| {
                        let Some(p) = PODS.iter().find(|p| **p == a.server) else {
                            bail!("{what} {proto} {to}: answered by {a}, not a pod of the Service");
                        };
                        let want = if env.c().pod(p).node() == "node-a" {
                            client_ip
                        } else {
                            node_ip
                        };
                        if a.peer.ip() != want {
                            bail!(
                                "{what} {proto} {to}: answered by {a}, expected it to see {want}"
                            );
                        }
                        Ok(())
                    })?;
                    *tally.entry(a.server).or_insert(0) += 1;
                    n += 1;
                }
            }
        }
    }
    check!(
        env,
        tally.len() >= 2,
        "all {n} LoadBalancer/externalIP requests went to one pod: {}",
        tally_line(&tally)
    );
    Ok(format!(
        "{n}/{n} requests from the client to {} and {} (and IPv6), TCP (curl) and UDP (socat), answered by the pods ({}), node-a's backends seeing the client, node-b's seeing node-a",
        env.c().lb_ips(20)[0],
        env.c().external_ips(20)[0],
        tally_line(&tally)
    ))
}

/// Case 4: 200 new connections (curl) / new sockets (socat) reach every
/// backend and none gets more than twice its fair share.
fn spread_case(env: &Env) -> Result<String> {
    const N: usize = 200;
    let fair = N / PODS.len();
    let a0 = env.c().pod("pod-a0");
    let client = env.c().client();
    let mut lines = Vec::new();
    let mut targets = Vec::new();
    for v6 in [false, true] {
        targets.push(("pod-a0 -> ClusterIP", a0.ns(), vip(env, SPREAD, v6, 80), v6));
        targets.push((
            "client -> LB IP",
            client.ns(),
            SocketAddr::new(env.c().lb_ips(20)[usize::from(v6)], 80),
            v6,
        ));
    }
    for (what, ns, to, v6) in targets {
        for proto in [Tcp, Udp] {
            let t = spread(ns, to, proto, N)?;
            let missing: Vec<&str> = PODS
                .iter()
                .filter(|p| !t.contains_key(**p))
                .copied()
                .collect();
            check!(
                env,
                missing.is_empty(),
                "{what} {proto} {}: {} never chosen ({})",
                fam(v6),
                missing.join(", "),
                tally_line(&t)
            );
            check!(
                env,
                t.values().all(|&c| c <= 2 * fair) && t.len() == PODS.len(),
                "{what} {proto} {}: more than twice the fair share ({fair}) or a stranger: {}",
                fam(v6),
                tally_line(&t)
            );
            lines.push(format!(
                "{what} {proto} {}: {}",
                fam(v6),
                t.values()
                    .map(|c| c.to_string())
                    .collect::<Vec<_>>()
                    .join("/")
            ));
        }
    }
    Ok(format!(
        "{N} new flows (curl TCP, socat UDP) each reach all 4 backends (a0/a1/b0/b1), none above {}: {}",
        2 * fair,
        lines.join("; ")
    ))
}

/// The pod each TCP flow from `client` to `vips` was sent to, from node
/// `node`'s conntrack (the only flows to those VIPs so far).
fn stream_backends(
    env: &Env,
    node: &str,
    client: IpAddr,
    vips: &[SocketAddr],
) -> Result<Vec<String>> {
    let mut found = Vec::new();
    wait_until(Duration::from_secs(3), || {
        let d = env.dump_flows(node)?;
        let shown = d["conntrack"]["shown"]
            .as_array()
            .context("no conntrack in dump")?;
        found.clear();
        for v in vips {
            let hits: Vec<&serde_json::Value> = shown
                .iter()
                .filter(|e| {
                    e["protocol"] == "TCP"
                        && e["direction"] == "forward"
                        && e["to"] == v.to_string().as_str()
                        && e["from"]
                            .as_str()
                            .and_then(|f| f.parse::<SocketAddr>().ok())
                            .is_some_and(|f| f.ip() == client)
                })
                .collect();
            if hits.len() != 1 {
                bail!(
                    "{} forward conntrack entries {client} -> {v} on {node}",
                    hits.len()
                );
            }
            let to: SocketAddr = hits[0]["becomes_to"]
                .as_str()
                .and_then(|s| s.parse().ok())
                .context("bad becomes_to")?;
            let pod = env
                .pod_of(to.ip())
                .with_context(|| format!("{v} becomes {to}: no pod"))?;
            found.push(pod.name().to_string());
        }
        Ok(())
    })?;
    Ok(found)
}

fn stream_ok(env: &Env, what: &str, r: &StreamReport) -> Result<String> {
    check!(
        env,
        r.lossless(),
        "{what}: not lossless: sent {} received {} corrupt at {:?} error {:?}",
        r.sent,
        r.received,
        r.corrupt_at,
        r.error
    );
    check!(
        env,
        r.longest_stall < MAX_STALL,
        "{what}: stalled for {} (limit {})",
        ms(r.longest_stall),
        ms(MAX_STALL)
    );
    Ok(format!(
        "{what} {} bytes via {}, longest stall {}",
        r.received,
        r.server,
        ms(r.longest_stall)
    ))
}

/// Case 5: An endpoint is removed while long-lived TCP streams (v4, v6) run to
/// remaining backends: the streams go on without a stall or a lost byte, and
/// new flows avoid the removed backend.
fn endpoint_removal(env: &Env) -> Result<String> {
    const BYTES: u64 = 6_000_000;
    const DURATION: Duration = Duration::from_secs(6);
    let a0 = env.c().pod("pod-a0");
    let vips = both(|v6| vip(env, CHURN, v6, 80));
    thread::scope(|s| -> Result<String> {
        let streams: Vec<_> = vips
            .iter()
            .map(|to| s.spawn(move || lb_testbed::tcp_stream(a0.ns(), *to, BYTES, DURATION)))
            .collect();
        let during = (|| -> Result<(String, Vec<String>, String)> {
            let mut used = Vec::new();
            for (v, to) in vips.iter().enumerate() {
                used.extend(stream_backends(env, "node-a", a0.addrs()[v], &[*to])?);
            }
            let removed = CHURN_PODS
                .iter()
                .find(|p| !used.iter().any(|u| u == *p))
                .copied()
                .context("no backend free of streams")?;
            let keep: Vec<&str> = CHURN_PODS
                .iter()
                .copied()
                .filter(|p| *p != removed)
                .collect();
            env.write(&spec(env, CHURN, "ClusterIP", 80, None), &keep)?;
            thread::sleep(Duration::from_millis(1500));
            let mut tally: BTreeMap<String, usize> = BTreeMap::new();
            for to in &vips {
                for proto in [Tcp, Udp] {
                    for (k, c) in spread(a0.ns(), *to, proto, 50)? {
                        *tally.entry(k).or_insert(0) += c;
                    }
                }
            }
            check!(
                env,
                !tally.contains_key(removed) && tally.keys().all(|k| keep.contains(&k.as_str())),
                "after removing {removed}: new flows answered by {}",
                tally_line(&tally)
            );
            Ok((removed.to_string(), used, tally_line(&tally)))
        })();
        let reports: Vec<Result<StreamReport>> = streams
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow!("stream thread panicked")))
            })
            .collect();
        let (removed, used, tally) = during?;
        let mut lines = Vec::new();
        for (i, r) in reports.into_iter().enumerate() {
            let r = r?;
            check!(
                env,
                r.server == used[i],
                "stream {} answered by {} but conntrack said {}",
                fam(i == 1),
                r.server,
                used[i]
            );
            lines.push(stream_ok(env, &format!("TCP {} stream", fam(i == 1)), &r)?);
        }
        Ok(format!(
            "removed {removed} from {} during 2 streams: {}; 200 new flows (curl, socat, v4+v6) 1.5 s later: {tally}",
            CHURN.1,
            lines.join(", ")
        ))
    })
}

/// Case 6: Both agents are restarted while TCP streams (pod -> ClusterIP, client
/// -> NodePort, v4 and v6) run and new TCP and UDP flows keep being made: no
/// stream stalls or loses a byte, no new flow fails, and `lb-agent dump`
/// shows the same service ids, backend ids and Maglev rows before, during
/// and after.
fn agent_restart(env: &Env) -> Result<String> {
    const BYTES: u64 = 8_000_000;
    const DURATION: Duration = Duration::from_secs(12);
    let a0 = env.c().pod("pod-a0");
    let client = env.c().client();
    let na = env.c().node("node-a");
    let nodes = ["node-a", "node-b"];
    let before: Vec<Shape> = nodes.iter().map(|n| env.shape(n)).collect::<Result<_>>()?;
    let mut targets: Vec<(String, &str, SocketAddr)> = Vec::new();
    for v6 in [false, true] {
        targets.push((
            format!("pod-a0 -> ClusterIP {}", fam(v6)),
            a0.ns(),
            vip(env, RESTART, v6, 80),
        ));
        targets.push((
            format!("client -> node-a NodePort {}", fam(v6)),
            client.ns(),
            na.sock(v6, NODEPORT_RESTART),
        ));
    }
    let done = AtomicBool::new(false);
    let shapes_seen = Mutex::new((0usize, Vec::<String>::new()));
    let flows = Mutex::new((0usize, Vec::<String>::new()));
    let t0 = Instant::now();
    thread::scope(|s| -> Result<String> {
        let streams: Vec<_> = targets
            .iter()
            .map(|(_, ns, to)| s.spawn(move || lb_testbed::tcp_stream(ns, *to, BYTES, DURATION)))
            .collect();
        // The maps, while the agents go and come.
        s.spawn(|| {
            while !done.load(Ordering::SeqCst) {
                for (i, n) in nodes.iter().enumerate() {
                    let diff = match env.shape(n) {
                        Ok(shape) => before[i].diff(&shape),
                        Err(e) => vec![format!("dump failed: {e:#}")],
                    };
                    let mut g = shapes_seen.lock().unwrap();
                    g.0 += 1;
                    g.1.extend(diff.into_iter().map(|d| format!("{n}: {d}")));
                }
                thread::sleep(Duration::from_millis(100));
            }
        });
        // New flows all along.
        s.spawn(|| {
            while !done.load(Ordering::SeqCst) {
                for (what, ns, to) in &targets {
                    for proto in [Tcp, Udp] {
                        let r = probe(ns, *to, proto, Duration::from_secs(1));
                        let mut g = flows.lock().unwrap();
                        g.0 += 1;
                        if let Err(e) = r {
                            g.1.push(format!("{what} {proto} at {}: {e}", ms(t0.elapsed())));
                        }
                    }
                }
                thread::sleep(Duration::from_millis(20));
            }
        });
        let restarts = (|| -> Result<Vec<String>> {
            thread::sleep(Duration::from_millis(1000));
            let mut took = Vec::new();
            for n in nodes {
                let (r, t) = timed(|| env.c().restart_agent(n));
                r.with_context(|| format!("restarting the agent on {n}"))?;
                took.push(format!("{n} {}", ms(t)));
            }
            thread::sleep(Duration::from_millis(500));
            Ok(took)
        })();
        let restarted_at = t0.elapsed();
        done.store(true, Ordering::SeqCst);
        let reports: Vec<Result<StreamReport>> = streams
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow!("stream thread panicked")))
            })
            .collect();
        let took = restarts?;
        check!(
            env,
            restarted_at + Duration::from_millis(500) < DURATION,
            "the restarts ended {} after the streams started, not within their {} (the check would be void)",
            ms(restarted_at),
            ms(DURATION)
        );
        let mut stalls = Vec::new();
        for ((what, _, _), r) in targets.iter().zip(reports) {
            let r = r?;
            stream_ok(env, what, &r)?;
            stalls.push(ms(r.longest_stall));
        }
        let (flows_made, flows_failed) = std::mem::take(&mut *flows.lock().unwrap());
        check!(
            env,
            flows_failed.is_empty() && flows_made > 0,
            "{} of {flows_made} new flows during the restarts failed: {}",
            flows_failed.len(),
            flows_failed.join("; ")
        );
        let (dumps, diffs) = std::mem::take(&mut *shapes_seen.lock().unwrap());
        check!(
            env,
            diffs.is_empty() && dumps > 0,
            "the maps changed across the restart ({dumps} dumps): {}",
            diffs.join("\n")
        );
        let mut after = Vec::new();
        for (i, n) in nodes.iter().enumerate() {
            let shape = env.shape(n)?;
            let diff = before[i].diff(&shape);
            check!(
                env,
                diff.is_empty(),
                "after the restart, {n}'s maps differ:\n{}",
                diff.join("\n")
            );
            after.push(format!(
                "{n}: {} service ids, {} backend ids",
                shape.services.len(),
                shape.backends.len()
            ));
        }
        Ok(format!(
            "restarted {} during 4 streams (pod->ClusterIP, client->NodePort via node-a, v4+v6): all lossless, longest stalls {}; {flows_made} new TCP/UDP flows during the restarts all answered; {dumps} dumps during and one after identical to before ({})",
            took.join(", "),
            stalls.join("/"),
            after.join("; ")
        ))
    })
}

/// Case 7: A Service without endpoints is refused at once: TCP with a RST
/// (connection refused), UDP with ICMP port unreachable, from a pod to the
/// ClusterIP and from the client to the NodePort of both nodes.
fn no_endpoints(env: &Env) -> Result<String> {
    let a0 = env.c().pod("pod-a0");
    let client = env.c().client();
    let mut targets: Vec<(&str, &str, SocketAddr)> = Vec::new();
    for v6 in [false, true] {
        targets.push(("pod-a0", a0.ns(), vip(env, EMPTY, v6, 80)));
        for n in ["node-a", "node-b"] {
            targets.push((
                "client",
                client.ns(),
                env.c().node(n).sock(v6, NODEPORT_EMPTY),
            ));
        }
    }
    let mut slowest = Duration::ZERO;
    for (who, ns, to) in &targets {
        for proto in [Tcp, Udp] {
            let (r, t) = timed(|| probe(ns, *to, proto, Duration::from_secs(3)));
            check!(
                env,
                r == Err(ProbeError::Refused) && t < REFUSE_WITHIN,
                "{proto} {who} -> {to} (no endpoints): {r:?} after {}, expected refused within {}",
                ms(t),
                ms(REFUSE_WITHIN)
            );
            slowest = slowest.max(t);
        }
        // The real clients say the same: refused (curl's exit 7, "Connection
        // refused" from socat), not timed out. Their time includes starting
        // a process in the namespace, seconds on a loaded machine: the probe
        // above times the refusal itself.
        let (r, t) = timed(|| curl_in(ns, &format!("http://{to}/"), Duration::from_secs(3)));
        let msg = r
            .err()
            .map(|e| format!("{e:#}"))
            .unwrap_or_else(|| "answered".into());
        check!(
            env,
            msg.contains("exit status: 7"),
            "curl {who} -> {to} (no endpoints) after {}: {msg}",
            ms(t)
        );
        let (r, t) = timed(|| socat_udp_in(ns, *to, b"x", Duration::from_secs(3)));
        let msg = r
            .err()
            .map(|e| format!("{e:#}"))
            .unwrap_or_else(|| "answered".into());
        check!(
            env,
            msg.contains("Connection refused"),
            "socat {who} -> {to} (no endpoints) after {}: {msg}",
            ms(t)
        );
    }
    Ok(format!(
        "{} frontends (ClusterIP from pod-a0, NodePort on node-a and node-b from the client, v4+v6): TCP refused (probe, curl exit 7) and UDP port unreachable (probe, socat \"Connection refused\"), slowest probe {}",
        targets.len(),
        ms(slowest)
    ))
}

/// The e2e-edit frontends of one port pair: (what, ns, address, is a
/// ClusterIP).
fn edit_targets(env: &Env, (port, np): (u16, u16)) -> Vec<(String, String, SocketAddr, bool)> {
    let a0 = env.c().pod("pod-a0");
    let client = env.c().client();
    let mut t = Vec::new();
    for v6 in [false, true] {
        t.push((
            "pod-a0 -> ClusterIP".into(),
            a0.ns().to_string(),
            vip(env, EDIT, v6, port),
            true,
        ));
        for n in ["node-a", "node-b"] {
            t.push((
                format!("client -> {n} NodePort"),
                client.ns().to_string(),
                env.c().node(n).sock(v6, np),
                false,
            ));
        }
    }
    t
}

type Targets = [(String, String, SocketAddr, bool)];

/// Every target answers (by a pod of e2e-edit) within `timeout`, over TCP
/// and UDP.
fn all_answer(targets: &Targets, timeout: Duration) -> Result<()> {
    for (who, ns, to, _) in targets {
        for proto in [Tcp, Udp] {
            match probe(ns, *to, proto, timeout) {
                Ok(p) if p == "pod-a1" || p == "pod-b0" => {}
                other => bail!("{proto} {who} {to}: {other:?}, expected an answer"),
            }
        }
    }
    Ok(())
}

/// The NodePorts among `targets` refuse TCP (the node's own RST, at once).
fn nodeports_refuse_tcp(targets: &Targets) -> Result<()> {
    for (who, ns, to, cluster_ip) in targets {
        if !cluster_ip {
            let r = probe(ns, *to, Tcp, Duration::from_millis(100));
            if r != Err(ProbeError::Refused) {
                bail!("TCP {who} {to}: {r:?}, expected refused");
            }
        }
    }
    Ok(())
}

/// No service port of e2e-edit is left in either node's maps.
fn edit_gone_from_maps(env: &Env) -> Result<()> {
    let prefix = format!("default/{}:", EDIT.1);
    for n in ["node-a", "node-b"] {
        let left: Vec<String> = env
            .service_names(n)?
            .into_iter()
            .filter(|s| s.starts_with(&prefix))
            .collect();
        if !left.is_empty() {
            bail!("{n} still has {}", left.join(", "));
        }
    }
    Ok(())
}

/// No target is answered (within 300 ms); returns how each kind failed.
fn none_answer(targets: &Targets) -> Result<Vec<String>> {
    let mut how = BTreeSet::new();
    for (who, ns, to, cluster_ip) in targets {
        for proto in [Tcp, Udp] {
            let r = probe(ns, *to, proto, Duration::from_millis(300));
            let Err(e) = r else {
                bail!("{proto} {who} {to}: still answered: {r:?}");
            };
            let kind = if *cluster_ip { "ClusterIP" } else { "NodePort" };
            how.insert(format!("{kind} {proto} {e}"));
        }
    }
    Ok(how.into_iter().collect())
}

/// The old port's frontends are refused: the ClusterIP over TCP and UDP, the
/// NodePorts over TCP (the node's own RST; its ICMP port unreachables are
/// rate-limited, so UDP there is only required to go unanswered, above).
/// Returns what was not refused, with a capture of one such request.
fn refused(env: &Env, targets: &Targets) -> Vec<String> {
    let mut bad = Vec::new();
    let mut captured = false;
    for (who, ns, to, cluster_ip) in targets {
        for proto in [Tcp, Udp] {
            if proto == Udp && !cluster_ip {
                continue;
            }
            let (r, t) = timed(|| probe(ns, *to, proto, Duration::from_secs(1)));
            if r == Err(ProbeError::Refused) && t < REFUSE_WITHIN {
                env.passed();
                continue;
            }
            let mut line = format!(
                "{proto} {who} {to}: {r:?} after {}, expected refused",
                ms(t)
            );
            if !captured {
                captured = true;
                let nodes: Vec<&str> = env.c().nodes().iter().map(|n| n.ns()).collect();
                let mut spaces = vec![ns.as_str()];
                spaces.extend(nodes);
                let mut again = String::new();
                let cap = env.capture(
                    &spaces,
                    &format!("host {} or icmp or icmp6", to.ip()),
                    || {
                        again = format!("{:?}", probe(ns, *to, proto, Duration::from_secs(1)));
                    },
                );
                line += &format!("; again under tcpdump: {again}\n{cap}");
            }
            bad.push(line);
        }
    }
    bad
}

/// Case 8: Changing a port, deleting the Service's file and writing it again each
/// take effect within a second.
fn update_delete(env: &Env) -> Result<String> {
    let old = edit_targets(env, EDIT_OLD);
    let new = edit_targets(env, EDIT_NEW);
    all_answer(&old, ANSWER).context("before the change")?;
    env.passed();
    let mut problems = Vec::new();

    // In force: the old NodePorts refuse TCP and every new frontend answers
    // (both decided in milliseconds, so the poll measures the change).
    env.write(&edit_spec(env, EDIT_NEW), &["pod-a1", "pod-b0"])?;
    let t_change = wait_until(Duration::from_secs(3), || {
        nodeports_refuse_tcp(&old)?;
        all_answer(&new, FAST)
    })
    .context("after changing port 81 -> 82 and nodePort 30109 -> 30110")?;
    check!(
        env,
        t_change <= FOLLOW_WITHIN,
        "the port change took {} (limit {})",
        ms(t_change),
        ms(FOLLOW_WITHIN)
    );
    let how_old = none_answer(&old).context("after the port change")?;
    let not_refused = refused(env, &old);
    if !not_refused.is_empty() {
        problems.push(format!(
            "after the port change, the old port is not refused:\n{}",
            not_refused.join("\n")
        ));
    }

    // Gone: the NodePorts refusing TCP (decided in milliseconds, so the poll
    // measures the change), and out of both nodes' maps (read by `lb-agent
    // dump`, which takes a while on a loaded machine: not timed); then
    // nothing answers on any of its frontends.
    env.delete(EDIT.1)?;
    let t_delete = wait_until(Duration::from_secs(3), || nodeports_refuse_tcp(&new))
        .context("after deleting the file")?;
    wait_until(Duration::from_secs(3), || edit_gone_from_maps(env))
        .context("after deleting the file, in the maps")?;
    check!(
        env,
        t_delete <= FOLLOW_WITHIN,
        "the deletion took {} (limit {})",
        ms(t_delete),
        ms(FOLLOW_WITHIN)
    );
    let how_deleted = none_answer(&new).context("after deleting the file")?;

    env.write(&edit_spec(env, EDIT_NEW), &["pod-a1", "pod-b0"])?;
    let t_again = wait_until(Duration::from_secs(3), || all_answer(&new, FAST))
        .context("after writing the file again")?;
    check!(
        env,
        t_again <= FOLLOW_WITHIN,
        "the re-creation took {} (limit {})",
        ms(t_again),
        ms(FOLLOW_WITHIN)
    );
    let line = format!(
        "port 81->82 / nodePort 30109->30110 in force after {} (old port unanswered: {}), file deleted: refused after {} and gone from both nodes' maps (then unanswered: {}), written again: answering after {}",
        ms(t_change),
        how_old.join(", "),
        ms(t_delete),
        how_deleted.join(", "),
        ms(t_again)
    );
    if !problems.is_empty() {
        bail!("{}\n(the rest held: {line})", problems.join("\n"));
    }
    Ok(format!(
        "{line}; the old port then refused (ClusterIP TCP+UDP, NodePort TCP)"
    ))
}

/// Hairpin: a pod reaching a Service whose only backend is itself is answered
/// by itself, which sees the Service's address.
fn hairpin(env: &Env) -> Result<String> {
    let a0 = env.c().pod("pod-a0");
    let mut seen = Vec::new();
    for v6 in [false, true] {
        let to = vip(env, HAIRPIN, v6, 80);
        for proto in [Tcp, Udp] {
            let a: Answer = env.ask_expect(a0.ns(), to, proto, |a| {
                if a.server != "pod-a0" || a.peer.ip() != to.ip() {
                    bail!(
                        "hairpin {proto} {to}: answered by {a}, expected pod-a0 seeing {}",
                        to.ip()
                    );
                }
                Ok(())
            })?;
            seen.push(format!("{proto} {}", a.peer));
        }
    }
    Ok(format!(
        "pod-a0 -> {} (only backend pod-a0), TCP (curl) and UDP (socat), v4+v6: answered by pod-a0 seeing the VIP ({})",
        HAIRPIN.1,
        seen.join(", ")
    ))
}

/// Case 10: Remote backends are reached at once after every node forgot its
/// neighbours (`ip neigh flush`), as on nodes that have not talked for a
/// while: the first TCP SYN and the first UDP datagram through a NodePort to
/// a pod on the other node get through (no retransmission: well under the
/// 1 s SYN retry), and the dialed node counted them `redirect_neigh` (tc
/// resolves the next hop instead of handing the kernel a source-NATed packet
/// it would drop as a martian).
fn cold_neighbours(env: &Env) -> Result<String> {
    const AT_ONCE: Duration = Duration::from_millis(800);
    let client = env.c().client();
    let mut lines = Vec::new();
    for (dialed, nodeport, backend) in [
        ("node-a", NODEPORT_TO_B, "pod-b1"),
        ("node-b", NODEPORT_TO_A, "pod-a1"),
    ] {
        let node = env.c().node(dialed);
        for v6 in [false, true] {
            for proto in [Tcp, Udp] {
                for n in env.c().nodes() {
                    lb_testbed::ip(Some(n.ns()), "neigh flush all")?;
                }
                let before = redirect_neigh(env, dialed)?;
                let to = node.sock(v6, nodeport);
                let (answer, took) = timed(|| harness::ask(client.ns(), to, proto));
                let a = answer.with_context(|| format!("{proto} {to} after the flush"))?;
                check!(
                    env,
                    a.server == backend,
                    "{proto} {to}: answered by {a}, expected {backend}"
                );
                check!(
                    env,
                    took < AT_ONCE,
                    "{proto} {to}: answered after {} (limit {}): the first packet was lost",
                    ms(took),
                    ms(AT_ONCE)
                );
                let counted = redirect_neigh(env, dialed)? - before;
                check!(
                    env,
                    counted > 0,
                    "{proto} {to}: {dialed} counted nothing under redirect_neigh"
                );
                lines.push(format!("{proto} {to} {}", ms(took)));
            }
        }
    }
    Ok(format!(
        "after `ip neigh flush all` on both nodes, client -> NodePort -> pod on the other node answered at once, counted redirect_neigh: {}",
        lines.join(", ")
    ))
}

/// The overlay suite's last case: the tunnel devices carried the traffic to
/// the other node's pods both ways (so the suite went through them), and run
/// the tc program as "other" interfaces.
fn overlay_carried_the_traffic(env: &Env) -> Result<String> {
    let mut lines = Vec::new();
    for node in env.c().nodes() {
        let dump = env.dump(node.name())?;
        for dev in ["flannel.1", "flannel-v6.1"] {
            let out = lb_testbed::ip(Some(node.ns()), &format!("-j -s link show dev {dev}"))?;
            let link: serde_json::Value = serde_json::from_str(&out)?;
            let stats = &link[0]["stats64"];
            let (tx, rx) = (
                stats["tx"]["packets"].as_u64().unwrap_or(0),
                stats["rx"]["packets"].as_u64().unwrap_or(0),
            );
            check!(
                env,
                tx > 100 && rx > 100,
                "{} {dev}: {tx} packets sent, {rx} received: the suite did not go through the overlay",
                node.name()
            );
            let entry = dump["interfaces"]
                .as_array()
                .and_then(|a| a.iter().find(|i| i["name"] == dev))
                .cloned()
                .unwrap_or_default();
            check!(
                env,
                entry["role"] == "other" && entry["hooks"] == serde_json::json!(["tc"]),
                "{} {dev} is not lb's: {entry}",
                node.name()
            );
            lines.push(format!("{} {dev} {tx}/{rx}", node.name()));
        }
    }
    Ok(format!(
        "packets sent/received through the tunnels (each with tc as an \"other\" interface): {}",
        lines.join(", ")
    ))
}

/// Case 12 (routed pod networks): jumbo frames. The segment, both nodes'
/// uplinks, the client and pod-b1 go to MTU 9000 (AWS's is 9001); a TCP
/// stream from the client through node-a's NodePort to pod-b1 then carries
/// segments of more than 8,000 bytes (the XDP program is frags-aware: such a
/// frame spans several buffers), lossless, and an 8,000-byte UDP datagram is
/// echoed; then everything goes back to 1500. The frames are counted where
/// they arrive, in pod-b1: what XDP sends on (XDP_TX, redirects) passes no
/// packet tap on the nodes.
fn jumbo_frames(env: &Env) -> Result<String> {
    const MTU: u32 = 9000;
    let c = env.c();
    let client = c.client();
    let b1 = c.pod("pod-b1");
    // (namespace, device) pairs, in the order to raise them.
    let mut links: Vec<(String, String)> = vec![(client.ns().into(), client.iface().into())];
    for n in c.nodes() {
        links.push((n.ns().into(), n.uplink().into()));
        links.push((c.lan_ns().into(), n.bridge_port().into()));
    }
    links.push((c.lan_ns().into(), client.bridge_port().into()));
    let node_b = c.node("node-b");
    links.push((node_b.ns().into(), b1.host_veth().into()));
    links.push((b1.ns().into(), b1.iface().into()));
    let set = |mtu: u32| -> Result<()> {
        for (ns, dev) in &links {
            lb_testbed::ip(Some(ns), &format!("link set {dev} mtu {mtu}"))?;
        }
        Ok(())
    };
    let result = (|| -> Result<String> {
        set(MTU)?;
        let to = c.node("node-a").sock(false, NODEPORT_TO_B);
        let mut report = None;
        let cap = env.capture(&[b1.ns()], "tcp and greater 8000", || {
            report = Some(lb_testbed::tcp_stream(
                client.ns(),
                to,
                4_000_000,
                Duration::from_secs(3),
            ));
        });
        let r = report.context("no stream ran")??;
        let line = stream_ok(env, "client -> node-a NodePort -> pod-b1 (MTU 9000)", &r)?;
        let big = cap.lines().filter(|l| l.contains(" length ")).count();
        check!(
            env,
            big > 0,
            "no TCP frame above 8,000 bytes reached pod-b1:\n{cap}"
        );
        let payload = vec![b'j'; 8000];
        let out = lb_testbed::socat_udp_in(client.ns(), to, &payload, ANSWER)?;
        let (_, echoed) = out.split_once('\n').unwrap_or_default();
        check!(
            env,
            echoed.len() == payload.len(),
            "an 8000-byte datagram came back as {} bytes",
            echoed.len()
        );
        Ok(format!(
            "{line}; {big} TCP frames above 8,000 bytes reached pod-b1; an 8000-byte UDP datagram echoed"
        ))
    })();
    // Back to 1500, lowest first.
    let mut restore = Ok(());
    for (ns, dev) in links.iter().rev() {
        if let Err(e) = lb_testbed::ip(Some(ns), &format!("link set {dev} mtu 1500")) {
            restore = Err(e);
        }
    }
    let line = result?;
    restore.context("restoring MTU 1500")?;
    Ok(line)
}

/// Case 13: the nodes' own clients (processes in a node's namespace, as
/// hostNetwork pods and the kubelet are) reach Services through the socket
/// programs: ClusterIPs with a backend on either node, a NodePort on the
/// node's own address and on the other node's, the LoadBalancer IP and the
/// externalIP, TCP (curl) and UDP (socat), v4+v6. A kernel socket sees the
/// frontend as its peer (getpeername) and as the source of the answers to an
/// unconnected UDP socket (recvmsg); a Service without endpoints is refused
/// at connect.
fn node_clients(env: &Env) -> Result<String> {
    let c = env.c();
    let mut n = 0;
    for node in ["node-a", "node-b"] {
        let ns = c.node(node).ns().to_string();
        for v6 in [false, true] {
            let i = usize::from(v6);
            let mut targets: Vec<(String, SocketAddr, Vec<&str>)> = vec![
                ("ClusterIP".into(), vip(env, LOCAL, v6, 80), vec!["pod-a1"]),
                ("ClusterIP".into(), vip(env, REMOTE, v6, 80), vec!["pod-b0"]),
                (
                    "LoadBalancer IP".into(),
                    SocketAddr::new(c.lb_ips(20)[i], 80),
                    PODS.to_vec(),
                ),
                (
                    "externalIP".into(),
                    SocketAddr::new(c.external_ips(20)[i], 80),
                    PODS.to_vec(),
                ),
            ];
            for np_node in ["node-a", "node-b"] {
                let what = if np_node == node {
                    "own NodePort"
                } else {
                    "other node's NodePort"
                };
                targets.push((
                    what.into(),
                    c.node(np_node).sock(v6, NODEPORT_TO_B),
                    vec!["pod-b1"],
                ));
            }
            for (what, to, backends) in &targets {
                for proto in [Tcp, Udp] {
                    env.ask_expect(&ns, *to, proto, |a| {
                        if !backends.contains(&a.server.as_str()) {
                            bail!("{proto} {node} -> {what} {to}: answered by {a}, expected {backends:?}");
                        }
                        Ok(())
                    })?;
                    n += 1;
                }
            }
            // What the application sees of its peer.
            let to = vip(env, LOCAL, v6, 80);
            let seen = lb_testbed::in_netns(&ns, move || -> Result<(SocketAddr, SocketAddr)> {
                let tcp = std::net::TcpStream::connect_timeout(&to, ANSWER)?;
                let tcp_peer = tcp.peer_addr()?;
                let udp = std::net::UdpSocket::bind(if v6 { "[::]:0" } else { "0.0.0.0:0" })?;
                udp.set_read_timeout(Some(ANSWER))?;
                udp.send_to(b"peer", to)?;
                let mut buf = [0u8; 512];
                let (_, from) = udp.recv_from(&mut buf)?;
                Ok((tcp_peer, from))
            })
            .with_context(|| format!("{node}: kernel sockets to {to}"))?;
            check!(
                env,
                seen == (to, to),
                "{node} -> {to}: getpeername {} and the answer's source {}, expected the ClusterIP for both",
                seen.0,
                seen.1
            );
            // No endpoints: refused at connect.
            for to in [
                vip(env, EMPTY, v6, 80),
                c.node(node).sock(v6, NODEPORT_EMPTY),
            ] {
                for proto in [Tcp, Udp] {
                    let (r, t) = timed(|| probe(&ns, to, proto, Duration::from_secs(3)));
                    check!(
                        env,
                        r == Err(ProbeError::Refused) && t < REFUSE_WITHIN,
                        "{proto} {node} -> {to} (no endpoints): {r:?} after {}, expected refused",
                        ms(t)
                    );
                }
            }
        }
        let dump = env.dump(node)?;
        let sl = &dump["socket_lb"];
        check!(
            env,
            sl["programs_attached"] == sl["programs"]
                && sl["calls"]["connected"].as_u64() > Some(0),
            "{node}'s dump says of the socket programs: {sl}"
        );
    }
    Ok(format!(
        "{n}/{n} requests (curl, socat, v4+v6) from node-a's and node-b's own namespaces to ClusterIPs (backend on either node), the own and the other node's NodePort, the LoadBalancer IP and the externalIP answered by their backends; kernel sockets see the ClusterIP as their peer and as the answers' source; no-endpoint ClusterIP and NodePort refused at connect"
    ))
}

/// A node's health check node port: (status, localEndpoints), as the external
/// client (a cloud load balancer's prober) sees it.
fn health_check(env: &Env, node: &str, v6: bool) -> Result<(u16, u64)> {
    let to = env.c().node(node).sock(v6, HEALTH_CHECK_PORT);
    let (code, body) = lb_testbed::http_get(env.c().client().ns(), to, "/", FAST * 10)
        .with_context(|| format!("GET http://{to}/"))?;
    let json: serde_json::Value =
        serde_json::from_str(&body).with_context(|| format!("{to} answered {body:?}"))?;
    ensure!(
        json["service"]["name"] == HEALTH.1 && json["service"]["namespace"] == "default",
        "{to} answered for another Service: {body}"
    );
    Ok((code, json["localEndpoints"].as_u64().unwrap_or(u64::MAX)))
}

/// What a probe that must be dropped gets: nothing (no RST, no ICMP).
fn dropped(env: &Env, who: &str, ns: &str, to: SocketAddr, proto: harness::Proto) -> Result<()> {
    let r = probe(ns, to, proto, Duration::from_millis(700));
    check!(
        env,
        r == Err(ProbeError::TimedOut),
        "{proto} {who} -> {to}: {r:?}, expected dropped (no answer, no refusal)"
    );
    Ok(())
}

/// Case 14: traffic policies as kube-proxy has them, and its health check
/// node ports. e2e-health (LoadBalancer, externalTrafficPolicy Local, its one
/// endpoint pod-b1 on node-b): node-b's health check port answers 200 with
/// one local endpoint, node-a's 503 with none, to the load balancer's prober
/// (the client); external clients reach the Service through node-b, keeping
/// their address, and node-a drops theirs (no refusal, counted); clients
/// inside the cluster (a pod on node-a through tc, node-a's own namespace
/// through its socket programs) reach pod-b1 all the same. e2e-itp-local
/// (internalTrafficPolicy Local, its endpoint on node-b): pod-b1 reaches it,
/// pod-a0's flows are dropped. Then an endpoint on node-a too: node-a's
/// health check turns 200 within a second and serves its client locally;
/// the Service deleted: both health check ports close.
fn traffic_policies(env: &Env) -> Result<String> {
    let c = env.c();
    let client = c.client();
    for v6 in [false, true] {
        for (node, want) in [("node-a", (503, 0)), ("node-b", (200, 1))] {
            let got = health_check(env, node, v6)?;
            check!(
                env,
                got == want,
                "{node}'s health check node port ({}): {got:?}, expected {want:?}",
                fam(v6)
            );
        }
    }
    let drops_before = reason_packets(env, "node-a", "drop_no_local_endpoint")?;
    for v6 in [false, true] {
        for proto in [Tcp, Udp] {
            dropped(
                env,
                "client",
                client.ns(),
                c.node("node-a").sock(v6, NODEPORT_HEALTH),
                proto,
            )?;
            let to = c.node("node-b").sock(v6, NODEPORT_HEALTH);
            let own = client.addrs()[usize::from(v6)];
            env.ask_expect(client.ns(), to, proto, |a| {
                ensure!(
                    a.server == "pod-b1" && a.peer.ip() == own,
                    "{proto} client -> {to}: {a}, expected pod-b1 seeing the client's {own}"
                );
                Ok(())
            })?;
        }
    }
    let drops = reason_packets(env, "node-a", "drop_no_local_endpoint")? - drops_before;
    check!(
        env,
        drops >= 4,
        "node-a counted {drops} flows under drop_no_local_endpoint"
    );
    // Inside the cluster: cluster-wide.
    let lb_ip = SocketAddr::new(c.lb_ips(HEALTH.0)[0], 80);
    for (who, ns) in [
        ("pod-a0", c.pod("pod-a0").ns()),
        ("node-a", c.node("node-a").ns()),
    ] {
        for proto in [Tcp, Udp] {
            env.ask_expect(ns, lb_ip, proto, |a| {
                ensure!(a.server == "pod-b1", "{proto} {who} -> {lb_ip}: {a}");
                Ok(())
            })?;
        }
    }
    // internalTrafficPolicy Local.
    for v6 in [false, true] {
        let to = vip(env, ITP_LOCAL, v6, 80);
        for proto in [Tcp, Udp] {
            dropped(env, "pod-a0", c.pod("pod-a0").ns(), to, proto)?;
            env.ask_expect(c.pod("pod-b1").ns(), to, proto, |a| {
                ensure!(a.server == "pod-b0", "{proto} pod-b1 -> {to}: {a}");
                Ok(())
            })?;
        }
    }
    // A local endpoint on node-a too.
    env.write(&health_spec(env), &["pod-b1", "pod-a1"])?;
    let took = wait_until(FOLLOW_WITHIN, || {
        let got = health_check(env, "node-a", false)?;
        ensure!(got == (200, 1), "{got:?}");
        Ok(())
    })
    .context("node-a's health check after pod-a1 joined")?;
    let to = c.node("node-a").sock(false, NODEPORT_HEALTH);
    env.ask_expect(client.ns(), to, Tcp, |a| {
        ensure!(
            a.server == "pod-a1" && a.peer.ip() == client.addrs()[0],
            "TCP client -> {to}: {a}, expected pod-a1 seeing the client"
        );
        Ok(())
    })?;
    // Gone: both ports closed.
    env.delete(HEALTH.1)?;
    let closed = wait_until(FOLLOW_WITHIN, || {
        for node in ["node-a", "node-b"] {
            let to = c.node(node).sock(false, HEALTH_CHECK_PORT);
            match lb_testbed::http_get(client.ns(), to, "/", FAST) {
                Err(e) if format!("{e:#}").contains("refused") => {}
                other => bail!("{node}: {other:?}"),
            }
        }
        Ok(())
    })
    .context("the health check ports after the Service was deleted")?;
    env.write(&health_spec(env), &["pod-b1"])?;
    Ok(format!(
        "health check node port {HEALTH_CHECK_PORT}: node-b 200 (1 local endpoint), node-a 503 (0), v4+v6; client -> node-a NodePort dropped ({drops} flows counted, no refusal), -> node-b answered by pod-b1 seeing the client; pod-a0 and node-a's own namespace -> the LB IP answered by pod-b1; internalTrafficPolicy Local: pod-a0 dropped, pod-b1 answered by pod-b0; pod-a1 joined: node-a 200 after {}, serving the client locally; Service deleted: both ports closed after {}",
        ms(took),
        ms(closed)
    ))
}

/// Case 17: trafficDistribution PreferClose. Each node is a zone of its own
/// (the Node manifests label them zone-a and zone-b) and the slices name each
/// endpoint's zone but carry no hints (no EndpointSlice controller writes them
/// in manifest mode; lb reads the zones as that controller would hint them):
/// node-a's clients (a pod through tc, the node's own namespace through its
/// socket programs) reach node-a's two pods only, node-b's pod node-b's two,
/// TCP and UDP, both families. With node-b's endpoints gone, its clients (no
/// endpoint for their zone) fall back to every endpoint.
fn topology(env: &Env) -> Result<String> {
    let c = env.c();
    let clients = [
        ("pod-a0", c.pod("pod-a0").ns(), "pod-a"),
        ("node-a", c.node("node-a").ns(), "pod-a"),
        ("pod-b1", c.pod("pod-b1").ns(), "pod-b"),
    ];
    let mut lines = Vec::new();
    for v6 in [false, true] {
        let to = vip(env, ZONED, v6, 80);
        for (who, ns, zone_pods) in clients {
            for proto in [Tcp, Udp] {
                let t = spread(ns, to, proto, 16)?;
                check!(
                    env,
                    t.len() == 2 && t.keys().all(|k| k.starts_with(zone_pods)),
                    "{proto} {who} -> {to} (PreferClose) went to {}, expected both {zone_pods}* pods",
                    tally_line(&t)
                );
                if proto == Tcp {
                    lines.push(format!("{who} {}: {}", fam(v6), tally_line(&t)));
                }
            }
        }
    }
    env.write(&zoned_spec(env), &["pod-a0", "pod-a1"])?;
    let to = vip(env, ZONED, false, 80);
    let took = wait_until(FOLLOW_WITHIN * 3, || {
        for proto in [Tcp, Udp] {
            let t = spread(c.pod("pod-b1").ns(), to, proto, 8)?;
            ensure!(
                t.values().sum::<usize>() == 8 && t.keys().all(|k| k.starts_with("pod-a")),
                "{proto}: {}",
                tally_line(&t)
            );
        }
        Ok(())
    })
    .context("node-b's clients falling back to node-a's endpoints")?;
    env.write(&zoned_spec(env), &PODS)?;
    Ok(format!(
        "PreferClose, TCP and UDP: {}; node-b's endpoints gone: pod-b1 answered by node-a's pods after {}",
        lines.join("; "),
        ms(took)
    ))
}

/// Case 18: clients outside the cluster reaching a ClusterIP (routed to
/// node-a, as networks that advertise Service addresses route them): with
/// the backend on node-b (e2e-remote, pod-b0), node-a source-NATs them, the
/// backend sees node-a's address and the replies come back through node-a,
/// TCP and UDP, both families (as kube-proxy masquerades traffic from
/// outside the cluster CIDRs: here the Node manifests' pod CIDRs, which both
/// agents' dumps show).
/// Pods keep their own address (case 1).
fn masquerade(env: &Env) -> Result<String> {
    let c = env.c();
    let client = c.client();
    let node_a = c.node("node-a");
    let vips = both(|v6| vip(env, REMOTE, v6, 80));
    let route = |verb: &str, to: &SocketAddr| {
        let (flag, len) = if to.is_ipv6() { ("-6 ", 128) } else { ("", 32) };
        lb_testbed::ip(
            Some(client.ns()),
            &format!(
                "{flag}route {verb} {}/{len} via {}",
                to.ip(),
                node_a.addrs()[usize::from(to.is_ipv6())]
            ),
        )
    };
    for node in ["node-a", "node-b"] {
        let (shown, want) = env.cluster_cidrs(node)?;
        check!(
            env,
            shown.as_ref() == Some(&want),
            "{node}'s cluster CIDRs {shown:?}, expected the Node manifests' pod CIDRs {want:?}"
        );
    }
    for to in &vips {
        route("replace", to)?;
    }
    let checked = (|| -> Result<()> {
        for to in &vips {
            let snat = node_a.addrs()[usize::from(to.is_ipv6())];
            for proto in [Tcp, Udp] {
                env.ask_expect(client.ns(), *to, proto, |a| {
                    ensure!(
                        a.server == "pod-b0" && a.peer.ip() == snat,
                        "{proto} client -> {to}: {a}, expected pod-b0 seeing node-a's {snat}"
                    );
                    Ok(())
                })?;
            }
        }
        Ok(())
    })();
    for to in &vips {
        route("del", to)?;
    }
    checked?;
    Ok(format!(
        "the client's TCP and UDP to e2e-remote's ClusterIPs {} and {} via node-a: answered by pod-b0 (on node-b), which saw node-a's address",
        vips[0].ip(),
        vips[1].ip()
    ))
}

/// Case 19: an endpoint leaves its slice while its pod still runs (the other
/// half of graceful termination): e2e-left's one endpoint pod-b0 is replaced
/// by pod-a1 and pod-b1. A TCP stream to pod-b0 from pod-a0, in each family,
/// goes on to its end, lossless, as kube-proxy's conntrack keeps it; a UDP
/// flow to it (one
/// socket: one source port), in each family, moves to a new endpoint at its
/// next datagram, as kube-proxy clears the flow (conformance #21); new flows
/// of either protocol go to the new endpoints only.
fn endpoint_left(env: &Env) -> Result<String> {
    const BYTES: u64 = 3_000_000;
    const DURATION: Duration = Duration::from_secs(6);
    let c = env.c();
    let a0 = c.pod("pod-a0");
    thread::scope(|s| -> Result<String> {
        let streams = [false, true].map(|v6| {
            let to = vip(env, LEFT, v6, 80);
            s.spawn(move || lb_testbed::tcp_stream(a0.ns(), to, BYTES, DURATION))
        });
        let mut flows = Vec::new();
        for v6 in [false, true] {
            let to = vip(env, LEFT, v6, 80);
            let f = lb_testbed::UdpFlow::open(a0.ns(), to)?;
            let who = f
                .ask(b"left?\n", ANSWER)
                .map_err(|e| anyhow!("UDP pod-a0 -> {to}: {e}"))?;
            ensure!(who == LEFT_FIRST, "UDP pod-a0 -> {to} answered by {who}");
            flows.push((to, f));
        }
        thread::sleep(Duration::from_millis(1000));
        env.write(&spec(env, LEFT, "ClusterIP", 80, None), &LEFT_NEXT)?;
        let mut moved = Vec::new();
        for (to, f) in &flows {
            let mut now = String::new();
            let took = wait_until(FOLLOW_WITHIN, || {
                now = f
                    .ask(b"still there?\n", FAST * 3)
                    .map_err(|e| anyhow!("{e}"))?;
                ensure!(LEFT_NEXT.contains(&now.as_str()), "answered by {now}");
                Ok(())
            })
            .with_context(|| format!("the UDP flow pod-a0 -> {to} after {LEFT_FIRST} left"))?;
            moved.push(format!("{to} to {now} after {}", ms(took)));
        }
        let mut spread_to = BTreeMap::new();
        for v6 in [false, true] {
            for proto in [Tcp, Udp] {
                for (k, n) in spread(a0.ns(), vip(env, LEFT, v6, 80), proto, 12)? {
                    *spread_to.entry(k).or_insert(0) += n;
                }
            }
        }
        check!(
            env,
            spread_to.keys().all(|k| LEFT_NEXT.contains(&k.as_str())),
            "new flows after {LEFT_FIRST} left: {}",
            tally_line(&spread_to)
        );
        let mut streamed = Vec::new();
        for (v6, stream) in [false, true].into_iter().zip(streams) {
            let r = stream
                .join()
                .map_err(|_| anyhow!("the stream thread panicked"))??;
            check!(
                env,
                r.server == LEFT_FIRST,
                "the {} stream went to {}, not {LEFT_FIRST}",
                fam(v6),
                r.server
            );
            let what = format!("the {} TCP stream to the pod that left", fam(v6));
            streamed.push(stream_ok(env, &what, &r)?);
        }
        let streamed = streamed.join("; ");
        env.write(&spec(env, LEFT, "ClusterIP", 80, None), &[LEFT_FIRST])?;
        Ok(format!(
            "{LEFT_FIRST} left e2e-left's slices for {}: {streamed}; its UDP flows moved ({}); new flows went to {}",
            LEFT_NEXT.join(" and "),
            moved.join(", "),
            tally_line(&spread_to)
        ))
    })
}

/// Case 20: `type` decides the frontends, whatever else the object still
/// holds. e2e-typed as a LoadBalancer (pod-b0) answers the client on its
/// ingress IP and on node-a's NodePort; changed to NodePort with its ingress
/// status left in the object, the ingress IP stops answering while the
/// NodePort goes on; changed to ClusterIP with its nodePort left too, the
/// NodePort stops answering as well, and pods still reach the ClusterIP.
/// TCP and UDP, both families.
fn type_change(env: &Env) -> Result<String> {
    let c = env.c();
    let client = c.client();
    let lb_ips: Vec<SocketAddr> = c
        .lb_ips(TYPED.0)
        .into_iter()
        .map(|ip| SocketAddr::new(ip, 80))
        .collect();
    let node_ports: Vec<SocketAddr> = both(|v6| c.node("node-a").sock(v6, NODEPORT_TYPED)).to_vec();
    let answers = |targets: &[SocketAddr]| -> Result<()> {
        for to in targets {
            for proto in [Tcp, Udp] {
                env.ask_expect(client.ns(), *to, proto, |a| {
                    ensure!(a.server == "pod-b0", "{proto} client -> {to}: {a}");
                    Ok(())
                })?;
            }
        }
        Ok(())
    };
    let silent = |targets: &[SocketAddr]| -> Result<Duration> {
        wait_until(FOLLOW_WITHIN, || {
            for to in targets {
                for proto in [Tcp, Udp] {
                    if let Ok(who) = probe(client.ns(), *to, proto, FAST) {
                        bail!("{proto} client -> {to} still answered by {who}");
                    }
                }
            }
            Ok(())
        })
    };
    answers(&lb_ips)?;
    answers(&node_ports)?;
    env.write(&typed_spec(env, "NodePort"), &["pod-b0"])?;
    let lb_gone = silent(&lb_ips).context("the ingress IPs of a Service turned NodePort")?;
    answers(&node_ports)?;
    env.write(&typed_spec(env, "ClusterIP"), &["pod-b0"])?;
    let np_gone = silent(&node_ports).context("the NodePorts of a Service turned ClusterIP")?;
    for v6 in [false, true] {
        let to = vip(env, TYPED, v6, 80);
        for proto in [Tcp, Udp] {
            env.ask_expect(c.pod("pod-a0").ns(), to, proto, |a| {
                ensure!(a.server == "pod-b0", "{proto} pod-a0 -> {to}: {a}");
                Ok(())
            })?;
        }
    }
    env.write(&typed_spec(env, "LoadBalancer"), &["pod-b0"])?;
    Ok(format!(
        "LoadBalancer -> NodePort (ingress status kept): ingress IPs silent after {}, NodePorts served; -> ClusterIP (nodePort kept): NodePorts silent after {}, the ClusterIPs served",
        ms(lb_gone),
        ms(np_gone)
    ))
}

/// Case 15: sessionAffinity ClientIP over all four pods: every new
/// connection of one client (pod-a0 through tc, node-a's own namespace
/// through its socket programs) goes to one pod, TCP and UDP; with affinity
/// switched off they spread again.
fn session_affinity(env: &Env) -> Result<String> {
    let c = env.c();
    let mut lines = Vec::new();
    for v6 in [false, true] {
        let to = vip(env, AFFINITY, v6, 80);
        for (who, ns) in [
            ("pod-a0", c.pod("pod-a0").ns()),
            ("node-a", c.node("node-a").ns()),
        ] {
            for proto in [Tcp, Udp] {
                let t = spread(ns, to, proto, 12)?;
                check!(
                    env,
                    t.len() == 1,
                    "{proto} {who} -> {to} with affinity went to {}",
                    tally_line(&t)
                );
                lines.push(format!("{who} {proto} {}: {}", fam(v6), tally_line(&t)));
            }
        }
    }
    env.write(&affinity_spec(env, None), &PODS)?;
    let to = vip(env, AFFINITY, false, 80);
    let took = wait_until(FOLLOW_WITHIN * 3, || {
        let t = spread(c.pod("pod-a0").ns(), to, Tcp, 12)?;
        ensure!(t.len() >= 2, "still {}", tally_line(&t));
        Ok(())
    })
    .context("spreading again without affinity")?;
    env.write(&affinity_spec(env, Some(60)), &PODS)?;
    Ok(format!(
        "{}; affinity off: pod-a0's connections spread again after {}",
        lines.join("; "),
        ms(took)
    ))
}

/// Case 16: loadBalancerSourceRanges. e2e-firewall admits the client's own
/// addresses: the client reaches its LoadBalancer IPs; with ranges that leave
/// the client out its new flows to them are dropped (counted), while its
/// NodePort stays open (kube-proxy restricts the LoadBalancer IPs only); a
/// range that does not parse admits nobody.
fn source_ranges(env: &Env) -> Result<String> {
    let c = env.c();
    let client = c.client();
    let lbs = c.lb_ips(FIREWALL.0);
    for ip in &lbs {
        env.ask_expect(client.ns(), SocketAddr::new(*ip, 80), Tcp, |_| Ok(()))?;
    }
    let before = reason_packets(env, "node-a", "drop_source_range")?;
    for ranges in [
        vec!["10.0.0.0/8".to_string(), "fd00:9::/64".into()],
        vec!["bogus".into()],
    ] {
        env.write(&firewall_spec(env, &ranges), &PODS)?;
        let to = SocketAddr::new(lbs[0], 80);
        wait_until(FOLLOW_WITHIN, || match probe(client.ns(), to, Tcp, FAST) {
            Err(ProbeError::TimedOut) => Ok(()),
            other => bail!("{other:?}"),
        })
        .with_context(|| format!("the client shut out by {ranges:?}"))?;
        for ip in &lbs {
            for proto in [Tcp, Udp] {
                dropped(env, "client", client.ns(), SocketAddr::new(*ip, 80), proto)?;
            }
        }
        let np = c.node("node-a").sock(false, NODEPORT_FIREWALL);
        env.ask_expect(client.ns(), np, Tcp, |_| Ok(()))?;
    }
    let drops = reason_packets(env, "node-a", "drop_source_range")? - before;
    check!(
        env,
        drops >= 8,
        "node-a counted {drops} flows under drop_source_range"
    );
    env.write(&firewall_spec(env, &client_ranges(env)), &PODS)?;
    Ok(format!(
        "the client admitted by its own /32 and /128 to {lbs:?}; ranges leaving it out, and a range that does not parse: its new flows to the LB IPs dropped ({drops} counted), its NodePort still answered"
    ))
}

/// Packets counted under `reason` on `node`.
fn reason_packets(env: &Env, node: &str, reason: &str) -> Result<u64> {
    let dump = env.dump(node)?;
    dump["reasons"][reason]["packets"]
        .as_u64()
        .with_context(|| format!("no {reason} counter in the dump"))
}

fn redirect_neigh(env: &Env, node: &str) -> Result<u64> {
    reason_packets(env, node, "redirect_neigh")
}

/// Case 11: 50,000 concurrent UDP flows from one client (one address, 50,000
/// source ports) to node-a's NodePort of a Service whose two backends are on
/// node-b: every flow is source-NATed and answered, none is dropped for want
/// of a port (`drop_snat_exhausted` stays as it was), and the flows keep their
/// client's port where it is free and in the source-NAT range (by default the
/// ports below node-a's ephemeral ones), as Linux's masquerade does. All of
/// them are in conntrack at once (UDP entries live a minute).
fn snat_capacity(env: &Env) -> Result<String> {
    const FLOWS: usize = 50_000;
    const FIRST_PORT: usize = 10_000;
    const BATCH: usize = 500;
    const BATCH_WAIT: Duration = Duration::from_secs(3);
    let client = env.c().client();
    let node_a = env.c().node("node-a");
    let to = node_a.sock(false, NODEPORT_RESTART);
    let snat = node_a.ipv4();
    let drops_before = reason_packets(env, "node-a", "drop_snat_exhausted")?;
    let (first, last) = env.snat_ports("node-a")?;
    let in_range = (FIRST_PORT..FIRST_PORT + FLOWS)
        .filter(|p| (usize::from(first)..=usize::from(last)).contains(p))
        .count();
    let t0 = Instant::now();
    // A batch of sockets at a time (the process may hold only so many); the
    // flows stay in lb's conntrack after their socket closes, so all of them
    // are there at once.
    let (answered, by_pod, kept) = lb_testbed::in_netns(client.ns(), move || -> Result<_> {
        let mut answered = 0usize;
        let mut kept = 0usize;
        let mut by_pod: BTreeMap<String, usize> = BTreeMap::new();
        let mut buf = [0u8; 512];
        for start in (FIRST_PORT..FIRST_PORT + FLOWS).step_by(BATCH) {
            let mut pending = Vec::with_capacity(BATCH);
            for port in start..(start + BATCH).min(FIRST_PORT + FLOWS) {
                let s = std::net::UdpSocket::bind(("0.0.0.0", port as u16))
                    .with_context(|| format!("binding port {port}"))?;
                s.connect(to)?;
                s.set_nonblocking(true)?;
                s.send(b"snat")?;
                pending.push((port, s));
            }
            let deadline = Instant::now() + BATCH_WAIT;
            while !pending.is_empty() && Instant::now() < deadline {
                pending.retain(|(port, s)| {
                    let Ok(n) = s.recv(&mut buf) else {
                        return true;
                    };
                    let text = String::from_utf8_lossy(&buf[..n]);
                    let first = text.lines().next().unwrap_or_default();
                    let (pod, peer) = first.split_once(' ').unwrap_or_default();
                    *by_pod.entry(pod.to_string()).or_default() += 1;
                    if peer == format!("{snat}:{port}") {
                        kept += 1;
                    }
                    answered += 1;
                    false
                });
                thread::sleep(Duration::from_millis(1));
            }
        }
        Ok((answered, by_pod, kept))
    })?;
    let took = t0.elapsed();
    let drops = reason_packets(env, "node-a", "drop_snat_exhausted")? - drops_before;
    let entries = conntrack_entries(env, "node-a")?;
    check!(
        env,
        answered == FLOWS && drops == 0,
        "{answered} of {FLOWS} flows answered, {drops} dropped for want of a source-NAT port"
    );
    check!(
        env,
        by_pod.len() == 2 && by_pod.values().all(|n| *n > FLOWS / 4),
        "the flows went to {by_pod:?}, expected both of the Service's pods"
    );
    check!(
        env,
        entries >= 2 * FLOWS as u64,
        "node-a's conntrack holds {entries} entries, expected both directions of {FLOWS} flows at once"
    );
    check!(
        env,
        kept * 10 >= in_range * 9 && kept <= in_range,
        "{kept} flows kept their client's port, of {in_range} whose port is in the source-NAT range {first}-{last}"
    );
    Ok(format!(
        "{FLOWS} concurrent UDP flows from one client address to {to} (backends pod-b0, pod-b1 on node-b) all answered in {} ({}), 0 dropped, {kept} of the {in_range} in the source-NAT range {first}-{last} kept their client's port, node-a's conntrack at {entries} entries",
        ms(took),
        tally_line(&by_pod)
    ))
}

/// One datagram of `flow` and its answer within `wait`: the answering pod's
/// name, or None (nothing came, or it was refused).
fn udp_exchange(flow: &lb_testbed::UdpFlow, wait: Duration) -> Result<Option<String>> {
    match flow.ask(b"udp-ct\n", wait) {
        Ok(pod) => Ok(Some(pod)),
        Err(ProbeError::TimedOut | ProbeError::Refused) => Ok(None),
        Err(e) => Err(anyhow!("{e}")),
    }
}

/// The counter `name` (e.g. `lb_conntrack_cleared_total`) of `node`'s agent.
fn agent_counter(env: &Env, node: &str, name: &str) -> Result<u64> {
    let ns = env.c().node(node).ns();
    let (status, body) = lb_testbed::http_get(
        ns,
        "127.0.0.1:10249".parse()?,
        "/metrics",
        Duration::from_secs(2),
    )?;
    ensure!(status == 200, "{node} /metrics: {status}");
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .with_context(|| format!("no {name}"))?
        .trim()
        .parse()
        .with_context(|| name.to_string())
}

/// The number of entries in `node`'s conntrack (`lb-agent dump`).
fn conntrack_entries(env: &Env, node: &str) -> Result<u64> {
    env.dump(node)?["conntrack"]["entries"]
        .as_u64()
        .context("no conntrack entry count in the dump")
}

fn conntrack_cleared(env: &Env, node: &str) -> Result<u64> {
    agent_counter(env, node, "lb_conntrack_cleared_total")
}

/// Case 22: a spoofed-SYN flood (issue 13). From the client, SYNs with
/// sources in 198.18.0.0/15 (which node-a routes into a blackhole, as an
/// attacker's spoofed sources lead nowhere) to node-a's NodePort of
/// e2e-restart, whose two backends are on node-b: every flow is
/// source-NATed, and the flood is as many SYNs as both backends have
/// source-NAT ports, and more, a batch at a time, until the ports have run
/// out (SYNs refused, counted: not every SYN sent arrives, the client's
/// queues drop some under such a burst) and a real client is refused. Yet
/// its new connections are answered again within seconds of the flood's end
/// (an unconfirmed flow holds its port for 5 s of its client's silence), a
/// TCP stream that ran throughout is lossless, and the agent's sweep deletes
/// the flood's entries.
fn syn_flood(env: &Env) -> Result<String> {
    const BYTES: u64 = 6_000_000;
    const DURATION: Duration = Duration::from_secs(8);
    /// The unconfirmed flows' hold on their ports, and some slack for the
    /// probes' own timeouts.
    const BACK_WITHIN: Duration = Duration::from_secs(8);
    const FLOOD_STALL: Duration = Duration::from_secs(3);
    let client = env.c().client();
    let na = env.c().node("node-a");
    let std::net::SocketAddr::V4(to) = na.sock(false, NODEPORT_RESTART) else {
        bail!("node-a's IPv4 NodePort");
    };
    let (first, last) = env.snat_ports("node-a")?;
    let span = usize::from(last - first) + 1;
    let batch = span / 4;
    let (prefix, len) = lb_testbed::flood::SPOOFED_V4;
    let blackhole = format!("{prefix}/{len}");
    lb_testbed::ip(
        Some(na.ns()),
        &format!("route replace blackhole {blackhole}"),
    )?;
    // From the metrics, which are cheap to read (the dump walks conntrack).
    let snat_drops = || {
        agent_counter(
            env,
            "node-a",
            r#"lb_datapath_packets_total{reason="drop_snat_exhausted",verdict="drop"}"#,
        )
    };
    let drops_before = snat_drops()?;
    let expired_before = agent_counter(env, "node-a", "lb_conntrack_expired_total")?;
    let entries_before = conntrack_entries(env, "node-a")?;
    let outcome = thread::scope(|s| -> Result<_> {
        let stream = s.spawn(|| lb_testbed::tcp_stream(client.ns(), to.into(), BYTES, DURATION));
        thread::sleep(Duration::from_millis(500));
        let flood_start = Instant::now();
        let (mut sent, mut drops, mut refused) = (0, 0, 0);
        // Both ranges, then batches until the ports have run out for good (a
        // batch's worth of SYNs refused) and a real client, trying at once
        // (a spoofed flow holds its port for 5 s only, less than a loaded
        // machine may take to send the next batch), is refused too; 8
        // ranges' worth at most.
        while sent < 8 * span {
            sent += lb_testbed::flood::spoofed_syns(client.ns(), to, sent..sent + batch)?;
            drops = snat_drops()? - drops_before;
            if sent >= 2 * span
                && drops >= batch as u64
                && probe(client.ns(), to.into(), Tcp, Duration::from_millis(500)).is_err()
            {
                refused += 1;
                break;
            }
        }
        let took = flood_start.elapsed();
        let flood_end = Instant::now();
        // What the flood left in conntrack (not every SYN sent arrives: the
        // client's queues drop some).
        let entries = conntrack_entries(env, "node-a")?.saturating_sub(entries_before);
        let back = wait_until(BACK_WITHIN + Duration::from_secs(4), || {
            probe(client.ns(), to.into(), Tcp, Duration::from_millis(500)).map_err(|e| {
                refused += 1;
                anyhow!("{e}")
            })?;
            Ok(())
        })
        .map(|_| flood_end.elapsed())
        .context("a real client after the flood")?;
        let r = stream
            .join()
            .map_err(|_| anyhow!("the stream thread panicked"))??;
        Ok((sent, took, drops, entries, refused, back, r))
    });
    let _ = lb_testbed::ip(Some(na.ns()), &format!("route del blackhole {blackhole}"));
    let (sent, took, drops, entries, refused, back, r) = outcome?;
    check!(
        env,
        drops >= batch as u64 && refused > 0,
        "{sent} spoofed SYNs over {span} ports for each of two backends: {drops} refused for want \
         of a port, and the real client was refused {refused} times: the ports did not run out"
    );
    check!(
        env,
        back <= BACK_WITHIN,
        "a real client was answered only {} after the flood ended",
        ms(back)
    );
    // Lossless, but the flood takes both of this machine's cores (the
    // sender, both nodes' datapaths and the backends' kernels answering
    // SYN-ACKs share them), so the stream may stall for more than
    // MAX_STALL while it lasts.
    check!(
        env,
        r.lossless() && r.longest_stall < FLOOD_STALL,
        "the TCP stream during the flood: {r:?}"
    );
    let streamed = format!(
        "a TCP stream through the flood lossless ({} bytes, longest stall {})",
        r.received,
        ms(r.longest_stall)
    );
    // The sweep (every 10 s) deletes the flood's flows, both entries each.
    let mut expired = 0;
    let swept = wait_until(Duration::from_secs(25), || {
        expired = agent_counter(env, "node-a", "lb_conntrack_expired_total")? - expired_before;
        ensure!(
            expired >= entries * 9 / 10,
            "{expired} entries expired of the {entries} the flood added"
        );
        Ok(())
    })?;
    Ok(format!(
        "{sent} spoofed SYNs in {} ({span} source-NAT ports per backend) added {entries} conntrack entries, \
         {drops} dropped for want of a port; a real client answered {} after the flood ({refused} tries \
         refused before); {streamed}; {expired} entries expired by the sweep within {} after",
        ms(took),
        ms(back),
        ms(swept)
    ))
}

/// Renumbering a Service port clears the UDP flows of its old port: sockets
/// that keep their tuple (connected, fixed source port: pod-a0 to the
/// ClusterIP, the client to node-a's NodePort, source-NATed to pod-b0 on
/// node-b; v4 and v6) are answered by the pod before; after port 83 -> 84
/// and nodePort 30115 -> 30116 their datagrams to the old port are answered
/// no more (within a second, and for good), node-a's conntrack holds no
/// entry of theirs, its agent counted the entries it cleared, and new
/// sockets to the new port are answered.
fn udp_conntrack(env: &Env) -> Result<String> {
    const BACKEND: &str = "pod-b0";
    let udp_ct_spec = |(port, np): (u16, u16)| spec(env, UDP_CT, "NodePort", port, Some(np));
    let a0 = env.c().pod("pod-a0");
    let client = env.c().client();
    let na = env.c().node("node-a");
    let targets = |(port, np): (u16, u16)| -> Vec<(String, &str, SocketAddr)> {
        let mut t = Vec::new();
        for v6 in [false, true] {
            t.push((
                format!("pod-a0 -> ClusterIP {}", fam(v6)),
                a0.ns(),
                vip(env, UDP_CT, v6, port),
            ));
            t.push((
                format!("client -> node-a NodePort {}", fam(v6)),
                client.ns(),
                na.sock(v6, np),
            ));
        }
        t
    };
    let old = targets(UDP_CT_OLD);
    let new = targets(UDP_CT_NEW);
    env.write(&udp_ct_spec(UDP_CT_OLD), &[BACKEND])?;
    wait_until(Duration::from_secs(3), || {
        for (who, ns, to) in &old {
            match probe(ns, *to, Udp, FAST) {
                Ok(p) if p == BACKEND => {}
                other => bail!("{who} {to}: {other:?}"),
            }
        }
        Ok(())
    })
    .context("e2e-udp-ct answering on its old port")?;
    let cleared_before = conntrack_cleared(env, "node-a")?;

    // One socket per target, its tuple fixed from here on.
    let mut sockets = Vec::new();
    for (i, (who, ns, to)) in old.iter().enumerate() {
        let s = lb_testbed::UdpFlow::open_from(ns, 46_000 + i as u16, *to)
            .map_err(|e| anyhow!("a UDP socket in {ns} to {to}: {e}"))?;
        let answer = udp_exchange(&s, ANSWER)?;
        check!(
            env,
            answer.as_deref() == Some(BACKEND),
            "{who} {to} from a fixed port: {answer:?}, expected {BACKEND}"
        );
        sockets.push((who, *to, s));
    }

    env.write(&udp_ct_spec(UDP_CT_NEW), &[BACKEND])?;
    let t_stop = wait_until(Duration::from_secs(3), || {
        for (who, to, s) in &sockets {
            if let Some(p) = udp_exchange(s, FAST)? {
                bail!("{who} {to}: still answered by {p}");
            }
        }
        Ok(())
    })
    .context("after renumbering 83 -> 84 / 30115 -> 30116")?;
    check!(
        env,
        t_stop <= FOLLOW_WITHIN,
        "the old flows were answered for {} after the change (limit {})",
        ms(t_stop),
        ms(FOLLOW_WITHIN)
    );
    // For good: the same sockets keep sending.
    for _ in 0..3 {
        for (who, to, s) in &sockets {
            let answer = udp_exchange(s, Duration::from_millis(300))?;
            check!(
                env,
                answer.is_none(),
                "{who} {to}: answered by {answer:?} after the port change"
            );
        }
    }
    // No entry of the old flows in node-a's conntrack (a datagram of theirs
    // since is refused or passed, and opens none).
    let d = env.dump("node-a")?;
    let shown = d["conntrack"]["shown"]
        .as_array()
        .context("no conntrack in dump")?;
    let old_to: BTreeSet<String> = sockets.iter().map(|(_, to, _)| to.to_string()).collect();
    let left: Vec<&serde_json::Value> = shown
        .iter()
        .filter(|e| {
            e["protocol"] == "UDP"
                && (e["to"].as_str().is_some_and(|t| old_to.contains(t))
                    || e["becomes_from"]
                        .as_str()
                        .is_some_and(|t| old_to.contains(t)))
        })
        .collect();
    check!(
        env,
        left.is_empty(),
        "node-a still has {} conntrack entries of the old port: {left:?}",
        left.len()
    );
    let cleared = conntrack_cleared(env, "node-a")? - cleared_before;
    check!(
        env,
        cleared >= 2 * sockets.len() as u64,
        "node-a's agent counted {cleared} cleared entries, expected at least {} (both entries of {} flows)",
        2 * sockets.len(),
        sockets.len()
    );
    let log = env.c().agent_log("node-a");
    let walk_line = log
        .lines()
        .rev()
        .find(|l| l.contains("conntrack: ") && l.contains("cleared"))
        .unwrap_or("no janitor line in the log")
        .to_string();
    // The new port answers new sockets.
    for (who, ns, to) in &new {
        let r = probe(ns, *to, Udp, ANSWER);
        check!(
            env,
            r.as_deref() == Ok(BACKEND),
            "{who} {to} (new port): {r:?}, expected {BACKEND}"
        );
    }
    env.delete(UDP_CT.1)?;
    let walk = walk_line
        .split_once("conntrack: ")
        .map_or(walk_line.as_str(), |(_, w)| w);
    Ok(format!(
        "{} UDP sockets with fixed tuples (pod-a0 -> ClusterIP, client -> node-a NodePort source-NATed, v4+v6) answered by {BACKEND} on port 83/30115; after renumbering to 84/30116 their datagrams went unanswered within {} and stayed so, node-a's conntrack kept none of their entries, lb_conntrack_cleared_total +{cleared} ({walk}); new sockets to 84/30116 answered",
        sockets.len(),
        ms(t_stop)
    ))
}

/// Case 21: UDP datagrams larger than the path MTU (3,000 bytes over links of
/// MTU 1500, or the overlay's pod MTU), which the sender's kernel sends as IP
/// fragments, only the first carrying the ports: from pod-a0 to a ClusterIP
/// with its backend on the same node (the fragments translated by tc on both
/// pod veths) and on the other node (the answer's fragments translated where
/// they come back in, the uplink's hook or the tunnel's), and, on routed pod
/// networks, from the client to node-a's NodePort with its backend on node-b
/// (source NAT; by XDP on NIC uplinks). The backend reassembles the request,
/// sees the client's own address (the node's, source-NATed) and its echo of
/// the whole datagram reassembles at the client. (Over the overlay the
/// client's 1500-byte fragments do not fit the tunnel: the node answers IPv6
/// with packet too big and hands IPv4 to the kernel, which drops it when
/// source-NATed; see the README's odd packets.)
fn fragmented_datagrams(env: &Env) -> Result<String> {
    const LEN: usize = 3000;
    let c = env.c();
    let payload: Vec<u8> = (0..LEN).map(|i| b'a' + (i % 26) as u8).collect();
    let a0 = c.pod("pod-a0");
    let mut targets = Vec::new();
    for v6 in [false, true] {
        let own = a0.addrs()[usize::from(v6)];
        targets.push((a0.ns(), vip(env, LOCAL, v6, 80), "pod-a1", own));
        targets.push((a0.ns(), vip(env, REMOTE, v6, 80), "pod-b0", own));
        if c.options().pod_network == PodNetwork::Routed {
            let node = c.node("node-a");
            targets.push((
                c.client().ns(),
                node.sock(v6, NODEPORT_TO_B),
                "pod-b1",
                node.addrs()[usize::from(v6)],
            ));
        }
    }
    let backends: Vec<&str> = ["pod-a1", "pod-b0", "pod-b1"]
        .iter()
        .map(|p| c.pod(p).ns())
        .collect();
    let mut asked = None;
    // The fragments are counted where they arrive, in the backends (the
    // hooks' redirects pass no packet tap on the nodes).
    let cap = env.capture(
        &backends,
        "(ip[6:2] & 0x3fff != 0) or (ip6 and ip6[6] == 44)",
        || asked = Some(ask_all(env, &targets, &payload)),
    );
    let lines = asked.context("no datagram sent")??;
    let fragments = cap.lines().filter(|l| l.contains(" IP")).count();
    check!(
        env,
        fragments >= 2 * lines.len(),
        "{fragments} fragments reached the backends for {} datagrams:\n{cap}",
        lines.len()
    );
    Ok(format!(
        "{} datagrams of {LEN} bytes, sent as IP fragments ({fragments} seen in the backends), echoed whole by the Service's backend seeing the right client: {}",
        lines.len(),
        lines.join("; ")
    ))
}

/// Sends `payload` from each (namespace, frontend) of `targets` with socat,
/// expecting the whole of it echoed by the backend named, which saw the
/// address given; on a failure, the same once more under tcpdump.
fn ask_all(
    env: &Env,
    targets: &[(&str, SocketAddr, &str, IpAddr)],
    payload: &[u8],
) -> Result<Vec<String>> {
    let c = env.c();
    let mut lines = Vec::new();
    for &(ns, to, backend, peer) in targets {
        let asked = || -> Result<Answer> {
            let out = socat_udp_in(ns, to, payload, ANSWER)?;
            let a = harness::greeting(&out)?;
            let (_, echoed) = out.split_once('\n').unwrap_or_default();
            ensure!(
                echoed.as_bytes() == payload,
                "{to}: the {}-byte datagram came back as {} bytes",
                payload.len(),
                echoed.len()
            );
            ensure!(
                a.server == backend && a.peer.ip() == peer,
                "{to}: answered by {a}, expected {backend} seeing {peer}"
            );
            Ok(a)
        };
        match asked() {
            Ok(a) => {
                env.passed();
                lines.push(format!("{ns} -> {to}: {a}"));
            }
            Err(e) => {
                // Once more under tcpdump, fragments included (an IPv6
                // fragment's next header is the Fragment header's, 44).
                let mut spaces = vec![ns];
                spaces.extend(c.nodes().iter().map(|n| n.ns()));
                let mut again = String::new();
                let cap = env.capture(&spaces, "udp or icmp or icmp6 or ip6[6] == 44", || {
                    again = match asked() {
                        Ok(a) => format!("answered by {a}"),
                        Err(e) => format!("{e:#}"),
                    };
                });
                return Err(e.context(format!("again under tcpdump: {again}\n{cap}")));
            }
        }
    }
    Ok(lines)
}

/// The four streams of the upgrade cases, all through node-a's datapath to
/// e2e-restart's pods on node-b: the client to node-a's NodePort (source-NATed:
/// their replies come back to a claimed port) and pod-a0 to the ClusterIP, in
/// each family.
fn node_a_streams(env: &Env) -> Vec<(String, &str, SocketAddr)> {
    let a0 = env.c().pod("pod-a0");
    let client = env.c().client();
    let na = env.c().node("node-a");
    let mut targets = Vec::new();
    for v6 in [false, true] {
        targets.push((
            format!("client -> node-a NodePort {}", fam(v6)),
            client.ns(),
            na.sock(v6, NODEPORT_RESTART),
        ));
        targets.push((
            format!("pod-a0 -> ClusterIP {}", fam(v6)),
            a0.ns(),
            vip(env, RESTART, v6, 80),
        ));
    }
    targets
}

/// Runs `during` a second into [`node_a_streams`] of `bytes` over `duration`
/// each; every stream must be lossless and never stall past [`MAX_STALL`].
/// Returns what `during` returned and a line per stream.
fn while_streaming<T: Send>(
    env: &Env,
    (bytes, duration): (u64, Duration),
    during: impl FnOnce() -> Result<T> + Send,
) -> Result<(T, Vec<String>)> {
    let targets = node_a_streams(env);
    let t0 = Instant::now();
    let (out, reports, ended_at) = thread::scope(|s| {
        let streams: Vec<_> = targets
            .iter()
            .map(|(_, ns, to)| s.spawn(move || lb_testbed::tcp_stream(ns, *to, bytes, duration)))
            .collect();
        thread::sleep(Duration::from_secs(1));
        let out = during();
        let ended_at = t0.elapsed();
        let reports: Vec<Result<StreamReport>> = streams
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow!("stream thread panicked")))
            })
            .collect();
        (out, reports, ended_at)
    });
    let out = out?;
    check!(
        env,
        ended_at + Duration::from_millis(500) < duration,
        "the change ended {} after the streams started, not within their {} (the check would be void)",
        ms(ended_at),
        ms(duration)
    );
    let mut lines = Vec::new();
    for ((what, _, _), r) in targets.iter().zip(reports) {
        lines.push(stream_ok(env, what, &r?)?);
    }
    Ok((out, lines))
}

/// The last "pinned maps migrated" line of `node`'s agent log.
fn migration_line(env: &Env, node: &str) -> Result<String> {
    env.c()
        .agent_log(node)
        .lines()
        .rev()
        .find(|l| l.contains("pinned maps migrated to layout"))
        .map(str::to_string)
        .with_context(|| format!("{node}'s agent logged no migration"))
}

/// The number before `what` in a migration line (e.g. "more after the swap").
fn number_before(line: &str, what: &str) -> Option<u64> {
    let head = &line[..line.find(what)?];
    head.split_whitespace().last()?.parse().ok()
}

/// What node-a's pinned conntrack is: (value size, max entries).
fn pinned_conntrack_def(env: &Env) -> Result<(u32, u32)> {
    let path = env
        .c()
        .node("node-a")
        .pin_path()
        .join(lb_common::map_names::CONNTRACK);
    let info = aya::maps::MapInfo::from_pin(&path)
        .with_context(|| format!("reading {}", path.display()))?;
    Ok((info.value_size(), info.max_entries()))
}

/// Case: an upgrade from the previous release's maps (layout 1) while
/// streams flow. With node-a's agent stopped, its pin set is made the one
/// the previous release left (`lb_testbed::layout_v1`: conntrack as layout
/// 1 with what it held, the streams' flows and their source-NAT ports among
/// them, plus 1,500 entries of 750 other flows; no `layout` or `fragments`
/// map); the programs attached serve on. The new agent migrates conntrack
/// to layout 2 before its programs take over, then replaces the pins: the
/// four streams are lossless, every entry is in the new conntrack, and
/// the pins say layout 2.
fn upgrade(env: &Env) -> Result<String> {
    use lb_common::{CT_F_FORWARD, CtEntry, FlowKey, map_names};
    use lb_testbed::layout_v1;
    const FLOWS: usize = 750;
    let pins = env.c().node("node-a").pin_path().to_path_buf();
    let flows = layout_v1::tcp_flows(
        FLOWS,
        ([10, 96, 200, 1], 80),
        (1, [10, 244, 200, 10], 8080),
        1,
        layout_v1::now_ns(),
    );
    let ((made, took), streams) =
        while_streaming(env, (8_000_000, Duration::from_secs(12)), || {
            env.c().stop_agent("node-a")?;
            let made = layout_v1::make_v1(&pins, &flows)?;
            let (r, took) = timed(|| env.c().start_agent_with("node-a", |_| {}));
            r.context("starting node-a's agent on the layout-1 pins")?;
            Ok((made, took))
        })?;
    let (value_size, _) = pinned_conntrack_def(env)?;
    check!(
        env,
        value_size == size_of::<CtEntry>() as u32,
        "node-a's pinned conntrack has {value_size}-byte values after the upgrade"
    );
    let ct: aya::maps::HashMap<aya::maps::MapData, FlowKey, CtEntry> = aya::maps::Map::LruHashMap(
        aya::maps::MapData::from_pin(pins.join(map_names::CONNTRACK))?,
    )
    .try_into()?;
    let missing = flows
        .iter()
        .filter(|(k, old)| match ct.get(k, 0) {
            Ok(new) => {
                (
                    new.nat_dst,
                    new.nat_dst_port,
                    new.backend,
                    new.flags & CT_F_FORWARD,
                ) != (
                    old.nat_dst,
                    old.nat_dst_port,
                    old.backend,
                    old.flags & CT_F_FORWARD,
                )
            }
            Err(_) => true,
        })
        .count();
    check!(
        env,
        missing == 0,
        "{missing} of the {} layout-1 entries added are not in node-a's conntrack as they were",
        flows.len()
    );
    let layout = lb_agent::bpf::layout::read_layout(&pins)?.context("no layout map pinned")?;
    check!(
        env,
        layout.version == lb_common::LAYOUT_VERSION && layout.migrations == 1,
        "node-a's layout map says {layout:?}"
    );
    let line = migration_line(env, "node-a")?;
    let late = number_before(&line, "more after the swap").context("no late count")?;
    Ok(format!(
        "node-a upgraded from a layout-1 pin set ({} entries of its own flows carried, {} added) \
         in {} while 4 TCP streams ran: {}; the agent: {}; {late} entries came over after the swap",
        made.carried,
        made.added,
        ms(took),
        streams.join("; "),
        line.split("migrated to layout 2: ").nth(1).unwrap_or(&line)
    ))
}

/// Case: `--conntrack-size` changed under live flows: node-a's agent
/// restarted with 262,144 entries, then with 524,288 again, each a
/// migration of conntrack into a map of the new size (no `cleanup`), while
/// four TCP streams run through node-a: lossless.
fn conntrack_resize(env: &Env) -> Result<String> {
    let mut done = Vec::new();
    let ((), streams) = while_streaming(env, (8_000_000, Duration::from_secs(14)), || {
        for size in [262_144u32, 524_288] {
            env.c().stop_agent("node-a")?;
            let (r, took) = timed(|| {
                env.c().start_agent_with("node-a", |args| {
                    if let Some(i) = args.iter().position(|a| a == "--conntrack-size") {
                        args.drain(i..i + 2);
                    }
                    args.push("--conntrack-size".into());
                    args.push(size.to_string().into());
                })
            });
            r.with_context(|| format!("restarting node-a's agent with --conntrack-size {size}"))?;
            let (_, entries) = pinned_conntrack_def(env)?;
            check!(
                env,
                entries == size,
                "node-a's conntrack holds {entries} entries after --conntrack-size {size}"
            );
            let line = migration_line(env, "node-a")?;
            let copied = number_before(&line, " of ").unwrap_or(0);
            done.push(format!("{size} in {} ({copied} entries copied)", ms(took)));
        }
        Ok(())
    })?;
    Ok(format!(
        "node-a's conntrack resized to {} by migration while 4 TCP streams ran: {}",
        done.join(", then "),
        streams.join("; ")
    ))
}

/// The suites share the machine's two cores: one cluster at a time.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// The suite on switch ports that act as NICs (XDP on the uplinks), pod
/// networks routed.
#[test]
fn e2e() {
    suite("e2e", Uplinks::Nic, PodNetwork::Routed);
}

/// The suite on plain veth uplinks, as kind wires its nodes (partial
/// checksums, no XDP on the peer: the agent's default picks tc).
#[test]
fn e2e_veth_uplinks() {
    suite("e2e-veth", Uplinks::Veth, PodNetwork::Routed);
}

/// The suite over a VXLAN overlay as Flannel sets one up (XDP uplinks): XDP
/// hands packets for the tunnel to tc, replies come back decapsulated on
/// `flannel.1` / `flannel-v6.1`.
#[test]
fn e2e_vxlan_overlay() {
    suite("e2e-vxlan", Uplinks::Nic, PodNetwork::Vxlan);
}

fn suite(name: &str, uplinks: Uplinks, pod_network: PodNetwork) {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let t0 = Instant::now();
    let env = Env::up(Options {
        uplinks,
        pod_network,
        ..Options::default()
    })
    .unwrap_or_else(|e| panic!("bringing the cluster up: {e:#}"));
    let setup = (|| -> Result<()> {
        for (s, pods) in initial_services(&env) {
            env.write(&s, &pods)?;
        }
        env.start_agents()?;
        // Ready means the first sync is done; check that it saw every Service.
        let want = initial_services(&env).len() * 4;
        for n in ["node-a", "node-b"] {
            let names = env.service_names(n)?;
            let ours = names
                .iter()
                .filter(|s| s.starts_with("default/e2e-"))
                .count();
            if ours != want {
                bail!("{n} has {ours} service ports of the suite, expected {want}: {names:?}");
            }
        }
        Ok(())
    })();
    if let Err(e) = setup {
        panic!("setting up: {e:#}\n{}", env.evidence());
    }
    println!(
        "{name}: cluster {} ({uplinks:?} uplinks, {pod_network:?} pod network) up with lb-agent on both nodes in {:.1}s",
        env.c().run_id(),
        t0.elapsed().as_secs_f64()
    );

    let mut cases: Vec<harness::Case> = vec![
        ("clusterip", clusterip),
        ("nodeport", nodeport),
        ("loadbalancer", loadbalancer),
        ("spread", spread_case),
        ("endpoint-removal", endpoint_removal),
        ("agent-restart", agent_restart),
        ("no-endpoints", no_endpoints),
        ("update-delete", update_delete),
        ("hairpin", hairpin),
        ("cold-neighbours", cold_neighbours),
        ("snat-capacity", snat_capacity),
        ("node-clients", node_clients),
        ("traffic-policies", traffic_policies),
        ("session-affinity", session_affinity),
        ("source-ranges", source_ranges),
        ("topology", topology),
        ("masquerade", masquerade),
        ("endpoint-left", endpoint_left),
        ("type-change", type_change),
        ("udp-conntrack", udp_conntrack),
        ("fragments", fragmented_datagrams),
        ("syn-flood", syn_flood),
        ("upgrade", upgrade),
        ("conntrack-resize", conntrack_resize),
    ];
    match pod_network {
        PodNetwork::Vxlan => cases.push(("overlay", overlay_carried_the_traffic)),
        PodNetwork::Routed => cases.push(("jumbo-frames", jumbo_frames)),
    }
    harness::run_cases(&env, name, &cases, t0);
}
