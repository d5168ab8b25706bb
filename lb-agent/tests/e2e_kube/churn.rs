//! The churn soak: a Service's pods replaced one by one, every second, for
//! two minutes (one of warm-up, one measured), the way a rolling update or
//! an autoscaler replaces them, while long-lived TCP streams and UDP flows
//! run to the pods that stay.
//!
//! Each replacement does what the API sees of a pod's end and of a new one's
//! start: the oldest replica is deleted gracefully (terminating) and its
//! kubelet turns it not Ready (serving false, terminating true), it is
//! removed a moment later (its containers stop in the next second: its
//! servers close, so a connection still sent there is refused), and a new
//! replica is created on another pod address, not Ready, then Ready. The
//! real EndpointSlice controller turns each change into slice updates.
//!
//! Meanwhile, in both families: TCP streams and UDP flows through a
//! ClusterIP (from a pod) and a NodePort (from the external client, source
//! NATed to the other node) to the two pods that stay must lose, reorder or
//! stall nothing; new connections (TCP and UDP, both clients) are made all
//! the time and must each be answered, by a pod that was Ready then; and
//! the agents' memory (anonymous resident memory: what a leak grows) must
//! not grow over the minute after a warm-up.

use std::{
    collections::{BTreeMap, VecDeque},
    net::SocketAddr,
    sync::{
        Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use lb_testbed::{
    UdpFlow,
    kube_cluster::{NAMESPACE, POD_PORT},
};
use serde_json::json;

use super::{
    FOLLOW_WITHIN, NEW_SERVICE_WITHIN, cluster_ips, dual_stack, harness,
    harness::{Env, Proto, Tcp, Udp, fam, ms, probe},
    node_port, ports, wait_backends,
};

/// The pods that stay in the Service throughout; the streams and flows go
/// to them.
const STAYS: [&str; 2] = ["pod-a2", "pod-b2"];
/// The pod addresses the replicas take in turn (alternating nodes), two of
/// them live at a time: a replica's address is taken again two replacements
/// after it was removed.
const SLOTS: [&str; 4] = ["pod-a3", "pod-b3", "pod-a4", "pod-b4"];
/// Testbed pods per node the suite's cluster needs: the other cases use
/// pods 0 and 1, this one the rest.
pub(super) const PODS_PER_NODE: usize = 5;
/// Replicas live at a time.
const LIVE: usize = 2;
/// Replacements before the memory is first measured, and after. The
/// agents' anonymous memory rises for the first minute or so of churn and
/// then stays level (a run of 180 replacements after 10, sampled every 10:
/// from 3,144 KiB to 4,356 KiB by the 90th, then 4,356 to 4,388 KiB over
/// the last 90): the allocator reaching the peak of what the agent's
/// passes, sweeps and verify passes hold at once. A leak keeps rising.
const WARM_UP: usize = 60;
const REPLACEMENTS: usize = 60;
/// The agents' memory is sampled every so many replacements.
const SAMPLE_EVERY: usize = 10;
/// One replacement begins every so often.
const PERIOD: Duration = Duration::from_secs(1);
/// A replica deleted stays terminating (not serving) this long before it is
/// removed; a new one is in its slices not Ready this long before it is.
const TERMINATING_FOR: Duration = Duration::from_millis(250);
const NOT_READY_FOR: Duration = Duration::from_millis(150);
/// How long the EndpointSlice controller may take to show a replica
/// terminating.
const SLICES_WITHIN: Duration = Duration::from_secs(1);
/// A removed replica's containers stop this long after its removal (they
/// finish their graceful termination): until then a connection the agents
/// still send there (they may take up to [`FOLLOW_WITHIN`] to follow) is
/// answered, from then on it is refused.
const STOP_AFTER: Duration = Duration::from_secs(1);
/// A new connection must be answered within this.
const CONNECT_WITHIN: Duration = Duration::from_secs(2);
/// Pause between one client's new connections.
const CONNECT_GAP: Duration = Duration::from_millis(20);
/// A long-lived UDP flow asks this often, and must be answered within
/// [`FOLLOW_WITHIN`].
const UDP_EVERY: Duration = Duration::from_millis(250);
/// The longest a stream may wait for its echo.
const STALL_BOUND: Duration = Duration::from_secs(1);
/// How much each agent's anonymous memory may grow over the measured churn.
const MEMORY_BOUND: u64 = 1 << 20;

/// A replica: its Pod's name and the testbed pod it runs in.
#[derive(Debug, Clone)]
struct Replica {
    name: String,
    slot: &'static str,
}

/// A replica's time Ready: its slot, its name, from, until.
type Spell = (&'static str, String, Instant, Option<Instant>);

/// When each replica was Ready (from just before its status said so to
/// just before its deletion), and what the churn did when: what a new
/// connection's answer is judged by, and what a failure is shown with.
struct Timeline {
    t0: Instant,
    ready: Mutex<Vec<Spell>>,
    events: Mutex<Vec<(Instant, String)>>,
}

impl Timeline {
    fn new() -> Self {
        Self {
            t0: Instant::now(),
            ready: Mutex::default(),
            events: Mutex::default(),
        }
    }

    fn at(&self, t: Instant) -> String {
        format!(
            "t={:.3}s",
            t.saturating_duration_since(self.t0).as_secs_f64()
        )
    }

    fn event(&self, what: String) {
        lock(&self.events).push((Instant::now(), what));
    }

    fn ready(&self, r: &Replica) {
        lock(&self.ready).push((r.slot, r.name.clone(), Instant::now(), None));
        self.event(format!("{} ({}) ready", r.name, r.slot));
    }

    fn not_ready(&self, r: &Replica) {
        let now = Instant::now();
        for (_, name, _, until) in lock(&self.ready).iter_mut() {
            if *name == r.name {
                *until = Some(now);
            }
        }
    }

    /// Whether `who` may answer a connection made from `t0` to `t1`: a pod
    /// that stays, or a replica's pod that was Ready at some time then (or
    /// until [`FOLLOW_WITHIN`] before: how long the agents may take to
    /// follow).
    fn may_answer(&self, who: &str, t0: Instant, t1: Instant) -> bool {
        STAYS.contains(&who)
            || lock(&self.ready).iter().any(|(slot, _, from, until)| {
                *slot == who && *from <= t1 && until.is_none_or(|u| u + FOLLOW_WITHIN >= t0)
            })
    }

    /// What the churn did from 1.5 s before `t` to 0.5 s after.
    fn around(&self, t: Instant) -> String {
        let lo = t.checked_sub(Duration::from_millis(1500)).unwrap_or(t);
        let hi = t + Duration::from_millis(500);
        lock(&self.events)
            .iter()
            .filter(|(at, _)| (lo..=hi).contains(at))
            .map(|(at, what)| format!("{} {what}", self.at(*at)))
            .collect::<Vec<_>>()
            .join("; ")
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The replicas and what replaces them.
struct Churn<'e> {
    env: &'e Env,
    tl: &'e Timeline,
    live: VecDeque<Replica>,
    /// The slots of removed replicas whose containers have not stopped yet,
    /// and when they were removed: they stop [`STOP_AFTER`] later.
    stopping: Vec<(&'static str, Instant)>,
    made: usize,
    replaced: usize,
    /// Replacements in which the API server's slices showed the replica
    /// going as terminating and not serving.
    seen_terminating: usize,
    /// The longest the slices took to show that.
    slowest_slices: Duration,
}

impl Churn<'_> {
    /// A new replica on the next slot: its containers start, its Pod is
    /// created not Ready, then turns Ready.
    fn add(&mut self) -> Result<()> {
        let k = self.env.kube();
        let r = Replica {
            name: format!("churn-{}", self.made),
            slot: SLOTS[self.made % SLOTS.len()],
        };
        self.made += 1;
        self.stop_containers(Some(r.slot));
        self.env.c().start_pod_server(r.slot, &[POD_PORT])?;
        k.run_replica(&r.name, r.slot, &["churn"], false)?;
        self.tl
            .event(format!("{} ({}) created not ready", r.name, r.slot));
        thread::sleep(NOT_READY_FOR);
        self.tl.ready(&r);
        k.set_replica_ready(&r.name, r.slot, true)?;
        self.live.push_back(r);
        Ok(())
    }

    /// Stops the servers of the removed replicas whose time has come, and
    /// those of `slot` (waiting for their time), which is taken again.
    fn stop_containers(&mut self, slot: Option<&str>) {
        let now = Instant::now();
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.stopping)
            .into_iter()
            .partition(|(s, removed)| *removed + STOP_AFTER <= now || Some(*s) == slot);
        self.stopping = later;
        for (s, removed) in due {
            thread::sleep((removed + STOP_AFTER).saturating_duration_since(Instant::now()));
            self.env.c().stop_pod_server(s);
            self.tl.event(format!("{s}'s servers stopped"));
        }
    }

    /// Replaces the oldest replica.
    fn replace(&mut self) -> Result<()> {
        let k = self.env.kube();
        self.stop_containers(None);
        let old = self.live.pop_front().context("no replica to replace")?;
        self.tl.not_ready(&old);
        k.cp.delete_pod(NAMESPACE, &old.name)?;
        k.set_replica_ready(&old.name, old.slot, false)?;
        self.tl.event(format!(
            "{} ({}) terminating, not ready",
            old.name, old.slot
        ));
        // Terminating for a while, and until its slices say so (the
        // controller may take a moment after quick changes).
        let t = Instant::now();
        let shown = harness::wait_until(TERMINATING_FOR + SLICES_WITHIN, || {
            ensure!(
                k.endpoints("churn")?
                    .iter()
                    .any(|e| e.pod.as_deref() == Some(&old.name) && e.terminating && !e.serving),
                "not yet"
            );
            Ok(())
        });
        if let Ok(took) = shown {
            self.seen_terminating += 1;
            self.slowest_slices = self.slowest_slices.max(took);
        }
        thread::sleep(TERMINATING_FOR.saturating_sub(t.elapsed()));
        k.cp.force_delete_pod(NAMESPACE, &old.name)?;
        self.tl
            .event(format!("{} ({}) removed", old.name, old.slot));
        self.stopping.push((old.slot, Instant::now()));
        self.add()?;
        self.replaced += 1;
        Ok(())
    }

    /// `n` replacements, one every [`PERIOD`]; returns the latest a
    /// replacement began.
    fn run(&mut self, n: usize) -> Result<Duration> {
        let start = Instant::now();
        let mut late = Duration::ZERO;
        for i in 0..n {
            let at = start + PERIOD * u32::try_from(i)?;
            thread::sleep(at.saturating_duration_since(Instant::now()));
            late = late.max(Instant::now() - at);
            self.replace()
                .with_context(|| format!("replacement {}", self.replaced + 1))?;
        }
        Ok(late)
    }
}

/// What one client's new connections met.
#[derive(Default)]
struct Connections {
    made: usize,
    by: BTreeMap<String, usize>,
    slowest: Duration,
    bad: Vec<String>,
    /// The failures by kind: what answered or what went wrong, by protocol.
    kinds: BTreeMap<String, usize>,
}

/// What `node` knew, at a TCP connection's failure, of its flow from
/// `local` to `to` (its conntrack entries) and of the frontend (the table's
/// backends), and how many resets its datapath had sent.
fn trace(env: &Env, node: &str, local: Option<SocketAddr>, to: SocketAddr) -> String {
    let d = match env.dump_flows(node) {
        Ok(d) => d,
        Err(e) => return format!("{node}'s dump failed: {e:#}"),
    };
    let empty = Vec::new();
    let arr = |k: &str| d[k].as_array().unwrap_or(&empty);
    let flows: Vec<String> = match local {
        None => vec!["no local port".into()],
        Some(local) => d["conntrack"]["shown"]
            .as_array()
            .unwrap_or(&empty)
            .iter()
            .filter(|f| {
                let (from, dst) = (f["from"].as_str(), f["to"].as_str());
                (from == Some(&local.to_string()) && dst == Some(&to.to_string()))
                    || f["becomes_to"].as_str() == Some(&local.to_string())
            })
            .map(|f| f.to_string())
            .collect(),
    };
    let backends: BTreeMap<u64, String> = arr("backends")
        .iter()
        .map(|b| {
            (
                b["id"].as_u64().unwrap_or(0),
                format!("{} {}", b["address"].as_str().unwrap_or("?"), b["flags"]),
            )
        })
        .collect();
    let starts: Vec<u64> = arr("services")
        .iter()
        .flat_map(|s| s["frontends"].as_array().unwrap_or(&empty).iter())
        .filter(|f| {
            // A NodePort's number is the cluster's alone: whatever address
            // the dump shows it on.
            let a = f["address"].as_str().unwrap_or("");
            f["protocol"] == "tcp"
                && (a == to.to_string()
                    || (to.port() >= 30000 && a.ends_with(&format!(":{}", to.port()))))
        })
        .filter_map(|f| f["table"].as_u64())
        .collect();
    let tables: Vec<String> = arr("maglev")
        .iter()
        .filter(|t| starts.contains(&t["start"].as_u64().unwrap_or(u64::MAX)))
        .map(|t| {
            let shares = t["shares"].as_object().map(|m| {
                m.keys()
                    .map(|id| {
                        let id: u64 = id.parse().unwrap_or(0);
                        backends
                            .get(&id)
                            .cloned()
                            .unwrap_or_else(|| format!("id {id}?"))
                    })
                    .collect::<Vec<_>>()
                    .join(", ")
            });
            format!("at {}: {}", t["start"], shares.unwrap_or_default())
        })
        .collect();
    format!(
        "{node} then: the flow's entries [{}]; the frontend's table [{}]; resets sent {}",
        flows.join("; "),
        tables.join("; "),
        d["reasons"]["reject_tcp_reset"]["packets"]
    )
}

/// A client's namespace, and the node whose datapath balances its new
/// connections.
type Client<'a> = (&'a str, &'a str);

/// New connections from `ns` to `targets` in turn until `stop`: each must
/// be answered within [`CONNECT_WITHIN`] by a pod that may answer then.
/// `via` is the node whose datapath balances them (a failure is traced
/// there).
fn connections(
    env: &Env,
    tl: &Timeline,
    (ns, via): Client,
    targets: &[(SocketAddr, Proto)],
    stop: &AtomicBool,
) -> Connections {
    let mut c = Connections::default();
    for (to, proto) in targets.iter().cycle() {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let t0 = Instant::now();
        let (r, local) = match proto {
            Tcp => {
                let payload = format!("churn probe {proto} to {to}\n");
                lb_testbed::tcp_probe_traced(ns, *to, payload.as_bytes(), CONNECT_WITHIN)
            }
            Udp => (probe(ns, *to, *proto, CONNECT_WITHIN), None),
        };
        let t1 = Instant::now();
        c.made += 1;
        c.slowest = c.slowest.max(t1 - t0);
        match r {
            Ok(who) if tl.may_answer(&who, t0, t1) => *c.by.entry(who).or_insert(0) += 1,
            Ok(who) => {
                *c.kinds
                    .entry(format!("{proto} answered by a pod not ready"))
                    .or_insert(0) += 1;
                c.bad.push(format!(
                    "{proto} {ns} -> {to} at {} answered by {who}, not ready then (the churn: {})",
                    tl.at(t0),
                    tl.around(t0)
                ));
            }
            Err(e) => {
                *c.kinds.entry(format!("{proto} {e}")).or_insert(0) += 1;
                let traced = if *proto == Tcp {
                    format!("; {}", trace(env, via, local, *to))
                } else {
                    String::new()
                };
                c.bad.push(format!(
                    "{proto} {ns} -> {to} from {} at {}: {e} after {} (the churn: {}){traced}",
                    local.map_or("?".into(), |l| l.to_string()),
                    tl.at(t0),
                    ms(t1 - t0),
                    tl.around(t0)
                ));
            }
        }
        thread::sleep(CONNECT_GAP);
    }
    c
}

/// Asks every flow every [`UDP_EVERY`] until `stop`; each must be answered
/// within [`FOLLOW_WITHIN`] by the pod that answered it first. Returns the
/// asks and what went wrong.
fn udp_flows(
    tl: &Timeline,
    flows: &[(String, UdpFlow, String)],
    stop: &AtomicBool,
) -> (usize, Vec<String>) {
    let (mut asks, mut bad) = (0, Vec::new());
    while !stop.load(Ordering::SeqCst) {
        for (what, f, first) in flows {
            let t0 = Instant::now();
            let payload = format!("churn flow ask {asks}\n");
            asks += 1;
            match f.ask(payload.as_bytes(), FOLLOW_WITHIN) {
                Ok(who) if who == *first => {}
                Ok(who) => bad.push(format!(
                    "{what} at {}: answered by {who}, not {first}",
                    tl.at(t0)
                )),
                Err(e) => bad.push(format!(
                    "{what} at {}: {e} (the churn: {})",
                    tl.at(t0),
                    tl.around(t0)
                )),
            }
        }
        thread::sleep(UDP_EVERY);
    }
    (asks, bad)
}

/// Both agents' memory (node-a, node-b): their anonymous resident memory
/// (what a leak grows; see `Cluster::agent_anon_memory`) and their whole
/// resident sets.
fn memory(env: &Env) -> Result<[(u64, u64); 2]> {
    let of = |node: &str| -> Result<(u64, u64)> {
        let c = env.c();
        let what = || format!("the memory of {node}'s agent");
        Ok((
            c.agent_anon_memory(node).with_context(what)?,
            c.agent_rss(node).with_context(what)?,
        ))
    };
    Ok([of("node-a")?, of("node-b")?])
}

fn join<T>(h: thread::ScopedJoinHandle<'_, T>) -> Result<T> {
    h.join()
        .map_err(|_| anyhow::anyhow!("a thread of the soak panicked"))
}

fn kib(b: i64) -> String {
    format!("{} KiB", b / 1024)
}

/// The case: see the module's documentation.
pub(super) fn churn_soak(env: &Env) -> Result<String> {
    let k = env.kube();
    let c = env.c();
    // The slots' own Pods (made with the cluster) go; their containers stop.
    for slot in SLOTS {
        k.cp.force_delete_pod(NAMESPACE, slot)?;
        c.stop_pod_server(slot);
    }
    let tl = Timeline::new();
    let mut churn = Churn {
        env,
        tl: &tl,
        live: VecDeque::new(),
        stopping: Vec::new(),
        made: 0,
        replaced: 0,
        seen_terminating: 0,
        slowest_slices: Duration::ZERO,
    };
    let outcome = soak(env, &mut churn);
    // Whatever happened: the replicas go, the slots' Pods come back.
    let mut cleanup = Vec::new();
    for r in churn.live.drain(..) {
        cleanup.push(k.cp.force_delete_pod(NAMESPACE, &r.name));
    }
    for slot in SLOTS {
        c.stop_pod_server(slot);
        cleanup.push(c.start_pod_server(slot, &[POD_PORT]));
        cleanup.push(k.recreate_pod(slot));
    }
    cleanup.push(k.delete_service("churn"));
    let line = outcome?;
    cleanup
        .into_iter()
        .collect::<Result<Vec<()>>>()
        .context("putting the slots' Pods back")?;
    Ok(line)
}

fn soak(env: &Env, churn: &mut Churn) -> Result<String> {
    let k = env.kube();
    let c = env.c();
    let tl = churn.tl;
    let sel = k.pod_set("churn", &STAYS)?;
    let svc = k.apply_service(
        "churn",
        dual_stack("NodePort", sel, ports(80, json!(POD_PORT))),
    )?;
    wait_backends(env, "churn", 2, NEW_SERVICE_WITHIN)?;
    let vips = cluster_ips(&svc)?;
    let (tcp_np, udp_np) = (node_port(&svc, Tcp)?, node_port(&svc, Udp)?);
    let vip = |v6: bool| SocketAddr::new(vips[usize::from(v6)], 80);
    let (a1, b1, client) = (c.pod("pod-a1").ns(), c.pod("pod-b1").ns(), c.client().ns());
    let (na, nb) = (c.node("node-a"), c.node("node-b"));
    let mut streams = Vec::new();
    for v6 in [false, true] {
        streams.push((format!("pod-a1 -> ClusterIP {}", fam(v6)), a1, vip(v6)));
        streams.push((
            format!("client -> node-a NodePort {}", fam(v6)),
            client,
            na.sock(v6, tcp_np),
        ));
    }
    let mut flows = Vec::new();
    for v6 in [false, true] {
        for (what, ns, to) in [
            (format!("UDP pod-b1 -> ClusterIP {}", fam(v6)), b1, vip(v6)),
            (
                format!("UDP client -> node-a NodePort {}", fam(v6)),
                client,
                na.sock(v6, udp_np),
            ),
        ] {
            let f = UdpFlow::open(ns, to).map_err(|e| anyhow::anyhow!("{what}: {e}"))?;
            let first = f
                .ask(b"churn flow\n", FOLLOW_WITHIN)
                .map_err(|e| anyhow::anyhow!("{what}: {e}"))?;
            ensure!(
                STAYS.contains(&first.as_str()),
                "{what} answered by {first}"
            );
            flows.push((what, f, first));
        }
    }
    let clients: [(Client, Vec<(SocketAddr, Proto)>); 2] = [
        (
            (a1, "node-a"),
            vec![
                (vip(false), Tcp),
                (vip(true), Udp),
                (vip(true), Tcp),
                (vip(false), Udp),
            ],
        ),
        (
            (client, "node-b"),
            vec![
                (nb.sock(false, tcp_np), Tcp),
                (nb.sock(true, udp_np), Udp),
                (nb.sock(true, tcp_np), Tcp),
                (nb.sock(false, udp_np), Udp),
            ],
        ),
    ];
    // The streams outlast the churn: the first replicas, the warm-up and the
    // measured replacements, and some slack.
    let streams_for = PERIOD * u32::try_from(WARM_UP + REPLACEMENTS + 10)?;
    let stop = &AtomicBool::new(false);
    let t_churn = Instant::now();
    let (churned, reports, still_streaming, conns, (asks, udp_bad)) = thread::scope(|s| {
        let running: Vec<_> = streams
            .iter()
            .map(|(_, ns, to)| {
                s.spawn(move || lb_testbed::tcp_stream(ns, *to, 16_000_000, streams_for))
            })
            .collect();
        let checkers: Vec<_> = clients
            .iter()
            .map(|(from, targets)| s.spawn(move || connections(env, tl, *from, targets, stop)))
            .collect();
        let udp = s.spawn(|| udp_flows(tl, &flows, stop));
        let churned = (|| -> Result<_> {
            // The streams connect to the pods that stay before any replica is.
            thread::sleep(Duration::from_secs(1));
            for _ in 0..LIVE {
                churn.add()?;
            }
            let warm_late = churn.run(WARM_UP)?;
            let before = memory(env)?;
            let t = Instant::now();
            let mut late = warm_late;
            let mut series = vec![before];
            for _ in 0..REPLACEMENTS / SAMPLE_EVERY {
                late = late.max(churn.run(SAMPLE_EVERY)?);
                series.push(memory(env)?);
            }
            let took = t.elapsed();
            let after = *series.last().context("no memory sample")?;
            Ok((before, after, took, late, series))
        })();
        let still_streaming = running.iter().filter(|h| !h.is_finished()).count();
        stop.store(true, Ordering::SeqCst);
        let conns: Vec<Connections> = checkers.into_iter().map(join).collect::<Result<_>>()?;
        let udp = join(udp)?;
        let reports: Vec<_> = running.into_iter().map(join).collect::<Result<_>>()?;
        anyhow::Ok((churned, reports, still_streaming, conns, udp))
    })?;
    let (before, after, took, late, series) = churned?;
    let mut broken = Vec::new();
    let mut lines = Vec::new();
    for ((what, _, _), r) in streams.iter().zip(reports) {
        match r {
            Ok(r)
                if r.lossless()
                    && r.longest_stall <= STALL_BOUND
                    && STAYS.contains(&r.server.as_str()) =>
            {
                lines.push(format!(
                    "{what} to {} ({} MB, stall {})",
                    r.server,
                    r.received / 1_000_000,
                    ms(r.longest_stall)
                ));
            }
            Ok(r) => broken.push(format!("{what}: {r:?}")),
            Err(e) => broken.push(format!("{what}: {e:#}")),
        }
    }
    check!(
        env,
        broken.is_empty(),
        "streams broke or stalled beyond {}: {}",
        ms(STALL_BOUND),
        broken.join("; ")
    );
    check!(
        env,
        still_streaming == streams.len(),
        "only {still_streaming} of {} streams still ran when the churn ended",
        streams.len()
    );
    check!(
        env,
        udp_bad.is_empty(),
        "{} of {asks} asks of the long-lived UDP flows failed: {}",
        udp_bad.len(),
        udp_bad
            .iter()
            .take(5)
            .cloned()
            .collect::<Vec<_>>()
            .join("; ")
    );
    let made: usize = conns.iter().map(|c| c.made).sum();
    let bad: Vec<&String> = conns.iter().flat_map(|c| &c.bad).collect();
    let mut kinds = BTreeMap::new();
    for (k, n) in conns.iter().flat_map(|c| &c.kinds) {
        *kinds.entry(k.clone()).or_insert(0) += n;
    }
    check!(
        env,
        bad.is_empty(),
        "{} of {made} new connections failed ({}): {}",
        bad.len(),
        harness::tally_line(&kinds),
        bad.iter()
            .take(5)
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join("; ")
    );
    let mut by = BTreeMap::new();
    for c in &conns {
        for (who, n) in &c.by {
            *by.entry(who.clone()).or_insert(0) += n;
        }
    }
    let to_replicas: usize = by
        .iter()
        .filter(|(who, _)| !STAYS.contains(&who.as_str()))
        .map(|(_, n)| n)
        .sum();
    check!(
        env,
        to_replicas * 5 >= made,
        "only {to_replicas} of {made} new connections reached a replica: {}",
        harness::tally_line(&by)
    );
    let replacements = WARM_UP + REPLACEMENTS;
    check!(
        env,
        churn.seen_terminating == replacements,
        "the slices showed the replica going as terminating and not serving in only {} of {replacements} replacements (within {})",
        churn.seen_terminating,
        ms(TERMINATING_FOR + SLICES_WITHIN)
    );
    let grew = |i: usize, part: fn(&(u64, u64)) -> u64| -> i64 {
        i64::try_from(part(&after[i])).unwrap_or(i64::MAX)
            - i64::try_from(part(&before[i])).unwrap_or(0)
    };
    let anon = |m: &(u64, u64)| m.0;
    let rss = |m: &(u64, u64)| m.1;
    let growth = [grew(0, anon), grew(1, anon)];
    let samples = |i: usize| {
        series
            .iter()
            .map(|m| (m[i].0 / 1024).to_string())
            .collect::<Vec<_>>()
            .join(" ")
    };
    check!(
        env,
        growth
            .iter()
            .all(|g| *g < i64::try_from(MEMORY_BOUND).unwrap_or(i64::MAX)),
        "the agents' anonymous memory grew by {} (node-a) and {} (node-b) over {REPLACEMENTS} replacements (every {SAMPLE_EVERY}, KiB: node-a {}, node-b {})",
        kib(growth[0]),
        kib(growth[1]),
        samples(0),
        samples(1)
    );
    let slowest = conns.iter().map(|c| c.slowest).max().unwrap_or_default();
    Ok(format!(
        "{replacements} replacements ({WARM_UP} warm-up, then {REPLACEMENTS} in {:.1}s, each begun at most {} late; the replica going shown terminating and not serving in the slices in each, within {}); {} streams lossless: {}; {} long-lived UDP flows answered {asks} times by their own pod; {made} new connections answered by ready pods (slowest {}): {}; agents' anonymous memory {} -> {} (node-a), {} -> {} (node-b): growth {} and {} (whole RSS growth {} and {}; anonymous memory every {SAMPLE_EVERY} replacements, KiB: node-a {}, node-b {}); {:.1}s in all",
        took.as_secs_f64(),
        ms(late),
        ms(churn.slowest_slices),
        streams.len(),
        lines.join(", "),
        flows.len(),
        ms(slowest),
        harness::tally_line(&by),
        kib(i64::try_from(before[0].0)?),
        kib(i64::try_from(after[0].0)?),
        kib(i64::try_from(before[1].0)?),
        kib(i64::try_from(after[1].0)?),
        kib(growth[0]),
        kib(growth[1]),
        kib(grew(0, rss)),
        kib(grew(1, rss)),
        samples(0),
        samples(1),
        t_churn.elapsed().as_secs_f64()
    ))
}
