//! Control plane: N Services × 10 endpoints, and 10,000 Services of skewed
//! sizes (most 1 to 10 endpoints, a few 1,000 to 5,000).
//!
//! - full sync: `lb-agent run --manifests` on a directory holding them, from
//!   process start to its "first sync done" log line (and from "datapath
//!   ready" to it); the agent's peak RSS (VmHWM) right after;
//! - the same sync in-process (lb_agent's sync engine writing real maps), and
//!   the latency of single EndpointSlice changes through the same engine the
//!   agent's loop drives (store → model → desired → reconcile);
//! - beside it, `iptables-restore` of kube-proxy's rules for the same Services,
//!   and `nft -f` of its nftables rules, each capped in time.

use std::{
    fmt::Write as _,
    net::Ipv4Addr,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use lb_agent::{
    bpf::{Datapath, LoadOptions, Sizes},
    cluster::NodeInfo,
    model::Address,
    reconcile::Reconciler,
    source::{SourceEvent, manifests},
    sync::Engine,
};
use lb_testbed::{Scope, command_in, ip, output_with_input};

use crate::{
    Figure, Target,
    agent::LbAgent,
    kubeproxy::{self, NodeFacts},
    report::percentile,
};

const SECTION: &str = "Control plane (Services × 10 endpoints)";
const EPS: usize = 10;

fn counts(quick: bool) -> Vec<usize> {
    if quick {
        vec![1000]
    } else {
        vec![1000, 10_000]
    }
}

pub fn keys_for(quick: bool) -> Vec<String> {
    let mut k = Vec::new();
    for n in counts(quick) {
        for f in [
            "agent_sync.s",
            "agent_start_to_sync.s",
            "agent_rss.mb",
            "inproc_sync.s",
            "iptables_restore.s",
            "nft.s",
        ] {
            k.push(format!("control.{n}.{f}"));
        }
    }
    if !quick {
        k.push("control.skewed.agent_sync.s".into());
        k.push("control.skewed.agent_rss.mb".into());
    }
    k.push("control.change.p50_ms".into());
    k.push("control.change.p99_ms".into());
    k.push("control.pod_patch.p50_ms".into());
    k.push("control.pod_patch.p99_ms".into());
    k
}

pub fn keys() -> Vec<String> {
    keys_for(false)
}

/// Endpoints of Service `i` in the uniform runs.
fn uniform(_: usize) -> usize {
    EPS
}

/// Endpoints of Service `i` of the skewed run's 10,000: per 1,000, one of
/// 1,000 to 5,000, 9 of 100 to 999, 90 of 11 to 99, and 900 of 1 to 10
/// (172,938 endpoints in all).
fn skewed(i: usize) -> usize {
    let spread = |lo: usize, hi: usize| lo + (i.wrapping_mul(7919) % (hi - lo + 1));
    match i % 1000 {
        0 => spread(1000, 5000),
        1..=9 => spread(100, 999),
        10..=99 => spread(11, 99),
        _ => spread(1, 10),
    }
}

/// Map sizes for `n` Services of `eps(i)` endpoints: room for every table
/// at the size its endpoints get, and the default service ids up to 1,000.
fn sizes(n: usize, eps: fn(usize) -> usize) -> Sizes {
    let tables: u64 = (0..n)
        .map(|i| {
            u64::from(lb_common::maglev_row_elements(
                lb_agent::maglev::table_size_for(eps(i)),
            )) * 2
        })
        .sum();
    let endpoints: usize = (0..n).map(eps).sum();
    Sizes {
        services: 65_536,
        service_ids: if n > 1000 { 20_000 } else { 1024 },
        backends: (endpoints as u32 + 1024).next_power_of_two().max(131_072),
        maglev_entries: u32::try_from(tables + (1 << 20))
            .unwrap_or(u32::MAX)
            .max(lb_common::capacity::MAGLEV_ENTRIES),
        conntrack: 65_536,
    }
}

/// Writes N Services with their slices (`eps(i)` endpoints for Service i),
/// 100 per file.
fn write_manifests(dir: &Path, n: usize, eps: fn(usize) -> usize) -> Result<()> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)?;
    let mut file = String::new();
    let mut pod = 0;
    for i in 0..n {
        let _ = write!(
            file,
            "apiVersion: v1\nkind: Service\nmetadata: {{name: svc-{i}, namespace: bench}}\nspec:\n  type: ClusterIP\n  clusterIP: {ip}\n  clusterIPs: [{ip}]\n  ipFamilies: [IPv4]\n  ports: [{{name: http, port: 80, protocol: TCP, targetPort: 8080}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: svc-{i}-1\n  namespace: bench\n  labels: {{kubernetes.io/service-name: svc-{i}}}\naddressType: IPv4\nports: [{{name: http, port: 8080, protocol: TCP}}]\nendpoints:\n",
            ip = kubeproxy::cluster_ip(i)
        );
        for _ in 0..eps(i) {
            let _ = writeln!(
                file,
                "- {{addresses: [\"{}\"], nodeName: node-b, conditions: {{ready: true}}}}",
                kubeproxy::pod_ip(pod)
            );
            pod += 1;
        }
        file.push_str("---\n");
        if (i + 1) % 100 == 0 || i + 1 == n {
            std::fs::write(dir.join(format!("svc-{:05}.yaml", i / 100)), &file)?;
            file.clear();
        }
    }
    Ok(())
}

fn agent_sync(bin: &Path, dir: &Path, n: usize, s: Sizes) -> Result<(f64, f64, f64)> {
    let scope = Scope::new()?;
    let ns = scope.add_netns(&format!("cp{n}"), &[])?;
    ip(Some(&ns), "link add u0 type veth peer name u1")?;
    ip(Some(&ns), "link set u0 up")?;
    ip(Some(&ns), "link set u1 up")?;
    ip(Some(&ns), "addr add 192.0.2.1/24 dev u0")?;
    let args: Vec<String> = [
        "run".to_string(),
        "--manifests".into(),
        dir.display().to_string(),
        "--node-name".into(),
        "node-a".into(),
        "--iface".into(),
        "u0".into(),
        "--metrics-addr".into(),
        "127.0.0.1:10249".into(),
        "--healthz-addr".into(),
        "127.0.0.1:10256".into(),
        "--maglev-entries".into(),
        s.maglev_entries.to_string(),
        "--max-services".into(),
        s.service_ids.to_string(),
        "--max-backends".into(),
        s.backends.to_string(),
        "--conntrack-size".into(),
        s.conntrack.to_string(),
    ]
    .to_vec();
    let agent = LbAgent::start(&scope, bin, &ns, &format!("cp{n}"), &args)?;
    let started = agent.started()?;
    let ready = agent.wait_for("datapath ready", Duration::from_secs(60))?;
    let synced = agent.wait_for("first sync done", Duration::from_secs(180))?;
    let text = std::fs::read_to_string(&agent.log).unwrap_or_default();
    ensure!(
        text.contains(&format!("{n} service ports")),
        "the agent synced something else than {n} service ports: {}",
        text.lines()
            .find(|l| l.contains("first sync done"))
            .unwrap_or("")
    );
    let rss = agent.peak_rss().unwrap_or(0) as f64 / (1024.0 * 1024.0);
    agent.stop();
    Ok((
        (synced - ready).as_secs_f64(),
        (synced - started).as_secs_f64(),
        rss,
    ))
}

/// The skewed run (see [`skewed`]): the agent's full sync and peak RSS.
fn skewed_run(bin: &Path, files: &Scope) -> Result<Vec<Figure>> {
    const N: usize = 10_000;
    let dir = files.run_dir().join("cp-skewed-manifests");
    write_manifests(&dir, N, skewed)?;
    let s = sizes(N, skewed);
    let (mut sync, mut rss) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        let (a, _, c) = agent_sync(bin, &dir, N, s).context("agent with 10,000 skewed Services")?;
        sync.push(a);
        rss.push(c);
    }
    let _ = std::fs::remove_dir_all(&dir);
    let what = "10,000 skewed Services";
    Ok(vec![
        Figure::new(
            SECTION,
            "control.skewed.agent_sync.s",
            &format!("{what}: full sync into the maps (agent)"),
            "s",
            sync,
        )
        .note(format!(
            "{} endpoints, {} MB of Maglev tables",
            (0..N).map(skewed).sum::<usize>(),
            (s.maglev_entries as u64 - (1 << 20)) * 4 / 1_000_000
        ))
        .target(Target::AtMost(3.0)),
        Figure::new(
            SECTION,
            "control.skewed.agent_rss.mb",
            &format!("{what}: agent peak RSS (VmHWM)"),
            "MB",
            rss,
        )
        .target(Target::AtMost(300.0)),
    ])
}

/// The sync and single-change latencies in-process, through the agent's sync
/// engine (store, model, desired tables, reconcile) on real maps.
fn inproc(dir: &Path, n: usize, changes: usize) -> Result<(f64, Vec<f64>)> {
    let mut dp = Datapath::load(&LoadOptions {
        pin_path: None,
        sizes: sizes(n, uniform),
        log_level: None,
    })?;
    let mut engine = Engine::new(
        Reconciler::adopt(dp.take_maps()?)?,
        NodeInfo {
            name: "node-a".into(),
            addresses: vec!["192.0.2.1".parse()?],
            zone: None,
        },
    );
    let loaded = manifests::load_dir(dir);
    ensure!(
        loaded.problems.is_empty(),
        "manifest problems: {:?}",
        loaded.problems.first()
    );
    let mut slices = loaded.slices.clone();
    // One event and its sync, as the agent's loop takes them.
    let step = |engine: &mut Engine, ev: SourceEvent| -> Result<usize> {
        engine.take(ev);
        let sync = engine.sync().context("the event made no sync due")?;
        ensure!(
            sync.problems.is_empty(),
            "sync problems: {:?}",
            sync.problems.first()
        );
        Ok(sync.changed.len())
    };
    let t = Instant::now();
    let ports = step(
        &mut engine,
        SourceEvent::Resync {
            services: loaded.services,
            slices: loaded.slices,
            problems: Vec::new(),
        },
    )?;
    let sync = t.elapsed().as_secs_f64();
    ensure!(ports == n, "in-process sync wrote {ports} ports, not {n}");
    let mut lat = Vec::new();
    for c in 0..changes {
        // Move one endpoint of one Service to another address and back.
        let i = (c * 7919) % slices.len();
        let slice = &mut slices[i];
        let ep = slice
            .endpoints
            .first_mut()
            .context("a slice without endpoints")?;
        let orig = Address::Ip(kubeproxy::pod_ip(i * EPS).into());
        let spare = Address::Ip(
            Ipv4Addr::new(10, 250, ((i / 250) % 250) as u8, (i % 250 + 1) as u8).into(),
        );
        ep.address = if ep.address == orig { spare } else { orig };
        let ev = SourceEvent::SliceApplied(Box::new(slice.clone()));
        let t = Instant::now();
        let ports = step(&mut engine, ev)?;
        lat.push(t.elapsed().as_secs_f64() * 1e3);
        ensure!(ports == 1, "one slice change touched {ports} ports");
    }
    Ok((sync, lat))
}

/// Runs `program args` with `input` in a fresh namespace; the time it took,
/// or None past `cap`.
fn timed_load(
    role: &str,
    program: &str,
    args: &[&str],
    input: String,
    cap: Duration,
) -> Result<Option<f64>> {
    let scope = Scope::new()?;
    let ns = scope.add_netns(role, &[])?;
    let t = Instant::now();
    match output_with_input(
        &mut command_in(&ns, program, args),
        Some(input.into_bytes()),
        cap,
    ) {
        Ok(out) => {
            ensure!(out.status.success(), "{program}: {}", out.stderr.trim());
            Ok(Some(t.elapsed().as_secs_f64()))
        }
        Err(e) if format!("{e:#}").contains("did not finish") => Ok(None),
        Err(e) => Err(e),
    }
}

pub fn run(quick: bool, bin: &Path) -> Result<(Vec<Figure>, Vec<String>)> {
    ensure!(bin.exists(), "no lb-agent binary at {}", bin.display());
    let cap = Duration::from_secs(if quick { 20 } else { 90 });
    let mut figs = Vec::new();
    let mut notes = Vec::new();
    let mut lat_all = Vec::new();
    // The manifests' directory, removed with the scope.
    let files = Scope::new()?;
    for n in counts(quick) {
        let dir = files.run_dir().join(format!("cp{n}-manifests"));
        write_manifests(&dir, n, uniform)?;
        let runs = if quick { 1 } else { 3 };
        let (mut sync, mut start, mut rss, mut inproc_sync) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for _ in 0..runs {
            let (a, b, c) = agent_sync(bin, &dir, n, sizes(n, uniform))
                .with_context(|| format!("agent with {n} Services"))?;
            sync.push(a);
            start.push(b);
            rss.push(c);
            let (s, lat) = inproc(&dir, n, if quick { 100 } else { 200 })?;
            inproc_sync.push(s);
            if n == *counts(quick).last().unwrap() {
                lat_all.extend(lat);
            }
        }
        let svcs = kubeproxy::many(n, EPS);
        let node = NodeFacts {
            pod_cidr: "10.0.0.0/8".into(),
            service_cidr: "10.96.0.0/12".into(),
            node_ips: vec!["192.0.2.1".parse()?],
        };
        let ipt = timed_load(
            &format!("ipt{n}"),
            "iptables-restore",
            &["-w", "--noflush"],
            kubeproxy::iptables_restore(&svcs, &node),
            cap,
        )?;
        let nft = timed_load(
            &format!("nft{n}"),
            "nft",
            &["-f", "-"],
            kubeproxy::nft_script(&svcs, &node),
            cap,
        )?;
        let s = sizes(n, uniform);
        let what = format!("{n} Services");
        let mut f = Figure::new(
            SECTION,
            &format!("control.{n}.agent_sync.s"),
            &format!("{what}: full sync into the maps (agent)"),
            "s",
            sync,
        )
        .note(format!(
            "{} tables of {} entries, max-services {}",
            n,
            lb_agent::maglev::table_size_for(EPS),
            s.service_ids
        ));
        if n == 10_000 {
            f = f.target(Target::AtMost(2.0));
        }
        figs.push(f);
        figs.push(Figure::new(
            SECTION,
            &format!("control.{n}.agent_start_to_sync.s"),
            &format!("{what}: agent start to first sync"),
            "s",
            start,
        ));
        figs.push(
            Figure::new(
                SECTION,
                &format!("control.{n}.agent_rss.mb"),
                &format!("{what}: agent peak RSS (VmHWM)"),
                "MB",
                rss,
            )
            .target(Target::AtMost(150.0)),
        );
        figs.push(Figure::new(
            SECTION,
            &format!("control.{n}.inproc_sync.s"),
            &format!("{what}: sync in-process (store+model+maps)"),
            "s",
            inproc_sync,
        ));
        for (key, label, v) in [
            ("iptables_restore", "kube-proxy iptables-restore", ipt),
            ("nft", "kube-proxy nft -f", nft),
        ] {
            let f = Figure::new(
                SECTION,
                &format!("control.{n}.{key}.s"),
                &format!("{what}: {label}"),
                "s",
                vec![v.unwrap_or(cap.as_secs_f64())],
            );
            figs.push(match v {
                Some(_) => f,
                None => f.note(format!("> {} s cap, stopped", cap.as_secs())),
            });
        }
    }
    if !quick {
        figs.extend(skewed_run(bin, &files)?);
    }
    let last = *counts(quick).last().unwrap();
    figs.push(Figure::new(
        SECTION,
        "control.change.p50_ms",
        &format!("one EndpointSlice change to maps, p50 ({last} Services)"),
        "ms",
        vec![percentile(&lat_all, 50.0).unwrap_or(f64::NAN)],
    ));
    figs.push(
        Figure::new(
            SECTION,
            "control.change.p99_ms",
            &format!("one EndpointSlice change to maps, p99 ({last} Services)"),
            "ms",
            vec![percentile(&lat_all, 99.0).unwrap_or(f64::NAN)],
        )
        .target(Target::AtMost(10.0)),
    );
    let flips = if quick { 10 } else { 40 };
    let pod_lat = pod_patch_to_map(bin, flips).context("Pod status patch to map write")?;
    for (key, label, pct) in [("p50_ms", "p50", 50.0), ("p99_ms", "p99", 99.0)] {
        figs.push(Figure::new(
            SECTION,
            &format!("control.pod_patch.{key}"),
            &format!("Pod status patch to map write (real API server), {label}"),
            "ms",
            vec![percentile(&pod_lat, pct).unwrap_or(f64::NAN)],
        ));
    }
    notes.push(format!(
        "Pod status patch to map write: {} readiness flips of one of a Service's two Pods through \
         a real kube-apiserver v1.32 (TLS) and its EndpointSlice controller, lb-agent (release) \
         run as the DaemonSet runs it; timed from the patch request until node-a's `services` map \
         shows the new backend count.",
        pod_lat.len()
    ));
    notes.push(format!(
        "Control plane: Services are ClusterIP, one TCP port, 10 ready endpoints on another node. \
         Agent sync = from its `datapath ready` to its `first sync done` log line (reading and \
         parsing the manifests included); start-to-sync adds loading the datapath. Each Service's \
         Maglev table has the size its endpoints get (8,191 entries for 10); 10,000 Services run \
         with --max-services 20000 and --maglev-entries sized to hold every table. The skewed \
         run: 10,000 Services whose endpoints are, per 1,000, one of 1,000-5,000, 9 of 100-999, \
         90 of 11-99 and 900 of 1-10 (172,938 endpoints). \
         Change latency: {} single EndpointSlice changes (one endpoint's address), each timed \
         through the agent loop's steps in-process (store, model, desired state, reconcile with \
         map writes); the manifest watcher's 100 ms debounce is left out. iptables-restore \
         (the system's {}) and nft run in a fresh namespace, capped at {} s.",
        lat_all.len(),
        iptables_backend(),
        cap.as_secs()
    ));
    Ok((figs, notes))
}

/// Pod readiness flips through a real API server: the agent (release, run as
/// the DaemonSet runs it, on the testbed's two nodes) follows a Service over
/// two Pods; each flip patches one Pod's Ready condition and times until
/// node-a's `services` map shows the new backend count (polled every 0.2 ms
/// through the pinned map). The EndpointSlice controller's work is included,
/// as in a cluster.
fn pod_patch_to_map(bin: &Path, flips: usize) -> Result<Vec<f64>> {
    use lb_agent::{
        model::{Frontend, Proto},
        reconcile::encoding::service_key,
    };
    use lb_testbed::{
        Options,
        kube_cluster::{KubeCluster, NAMESPACE},
    };
    let k = KubeCluster::up(Options::default(), bin)?;
    let selector = k.pod_set("bench", &["pod-a1", "pod-b1"])?;
    let svc = k.apply_service(
        "bench",
        serde_json::json!({
            "type": "ClusterIP",
            "selector": selector,
            "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}],
        }),
    )?;
    let vip: std::net::IpAddr = svc
        .spec
        .and_then(|s| s.cluster_ip)
        .context("no ClusterIP allocated")?
        .parse()?;
    let key = service_key(&Frontend {
        addr: vip,
        port: 80,
        proto: Proto::Tcp,
    });
    let maps = lb_agent::bpf::Maps::open_pinned(k.cluster.node("node-a").pin_path())?;
    let count = || maps.services.get(&key, 0).map_or(0, |v| v.backend_count);
    let wait_for = |want: u32| -> Result<f64> {
        let t = Instant::now();
        while count() != want {
            ensure!(
                t.elapsed() < Duration::from_secs(10),
                "node-a's map did not reach {want} backends in 10 s"
            );
            std::thread::sleep(Duration::from_micros(200));
        }
        Ok(t.elapsed().as_secs_f64() * 1000.0)
    };
    wait_for(2)?;
    let pod = k.cluster.pod("pod-b1");
    let mut lat = Vec::new();
    for i in 0..flips {
        let ready = i % 2 == 1;
        let t = Instant::now();
        k.cp.set_pod_ready(NAMESPACE, pod, ready)?;
        let patched = t.elapsed().as_secs_f64() * 1000.0;
        lat.push(patched + wait_for(if ready { 2 } else { 1 })?);
    }
    Ok(lat)
}

fn iptables_backend() -> String {
    std::process::Command::new("iptables")
        .arg("--version")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "iptables".into())
}
