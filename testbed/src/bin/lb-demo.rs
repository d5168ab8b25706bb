//! `lb-demo`, what `cargo xtask demo` runs once it has set the machine up and
//! built lb: a two-node cluster on network namespaces, lb on both nodes, and
//! real requests showing what it does.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, Result, ensure};
use clap::Parser;
use lb_testbed::{
    Cluster, Options, command_in,
    kube_cluster::{KubeCluster, NAMESPACE},
    output_with_timeout, tcp_request, udp_request,
};
use serde_json::json;

const REQUESTS: usize = 40;
const TIMEOUT: Duration = Duration::from_secs(2);

fn spread(ns: &str, target: SocketAddr, udp: bool) -> String {
    let mut tally: BTreeMap<String, usize> = BTreeMap::new();
    for i in 0..REQUESTS {
        let payload = format!("demo request {i}");
        let answer = if udp {
            udp_request(ns, target, payload.as_bytes(), TIMEOUT)
        } else {
            tcp_request(ns, target, payload.as_bytes(), TIMEOUT)
        };
        let who = answer.unwrap_or_else(|e| format!("FAILED ({e:#})"));
        *tally.entry(who).or_default() += 1;
    }
    tally
        .iter()
        .map(|(who, n)| format!("{who} x{n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn show(what: &str, ns: &str, target: SocketAddr, udp: bool) {
    println!(
        "  {what:<46} {:>3} {:<22} -> {}",
        if udp { "UDP" } else { "TCP" },
        target.to_string(),
        spread(ns, target, udp)
    );
}

fn excerpt(text: &str, lines: usize) -> String {
    text.lines()
        .take(lines)
        .map(|l| format!("    {l}\n"))
        .collect()
}

/// The demo: a two-node cluster on network namespaces running lb, with requests.
#[derive(Parser)]
#[command(
    about = "lb demo: a two-node cluster on network namespaces running lb-agent, with requests \
             from a pod and from an external client (as root; `cargo xtask demo` builds and runs it)"
)]
struct Cli {
    /// The lb-agent binary to run on the nodes.
    #[arg(long, value_name = "PATH")]
    agent: PathBuf,
    /// Tear down and exit after showing the results.
    #[arg(long)]
    once: bool,
    /// Run the agents in Kubernetes mode, as the DaemonSet runs them, against
    /// a real API server (etcd, kube-apiserver and kube-controller-manager
    /// on loopback) through which the demo creates its Pods and Services;
    /// otherwise they follow a directory of manifests.
    #[arg(long)]
    kube: bool,
}

/// Where the demo's Services answer.
struct Targets {
    /// `web`'s ClusterIPs, IPv4 and IPv6.
    vip: Vec<IpAddr>,
    /// `web-nodeport`'s NodePort (TCP and UDP).
    node_port: u16,
    /// `web-lb`'s ingress IPs and externalIPs.
    lb: Vec<IpAddr>,
    ext: Vec<IpAddr>,
}

/// The cluster with agents following a manifest directory of the demo's
/// Services, and where they answer.
fn with_manifests(agent: &Path) -> Result<(Cluster, Targets, String)> {
    let cluster = Cluster::up(Options::default())?;
    cluster.start_pod_servers(&[8080])?;
    let dir = cluster.run_dir().join("manifests");
    std::fs::create_dir_all(&dir)?;
    for (name, yaml) in cluster.demo_manifests() {
        std::fs::write(dir.join(&name), yaml).with_context(|| format!("writing {name}"))?;
    }
    eprintln!("demo: starting lb-agent on node-a and node-b");
    cluster.start_agents(agent, &dir)?;
    let targets = Targets {
        vip: cluster.cluster_ips(10),
        node_port: 30080,
        lb: cluster.lb_ips(10),
        ext: cluster.external_ips(10),
    };
    let how = format!(
        "  manifests: {} (edit them: the agents follow within a second)",
        dir.display()
    );
    Ok((cluster, targets, how))
}

/// The cluster driven through a real API server, the demo's Services created
/// through it (addresses and NodePorts allocated by the API server, the
/// LoadBalancer's ingress set as a cloud controller would), and where they
/// answer.
fn with_kube(agent: &Path) -> Result<(KubeCluster, Targets, String)> {
    eprintln!(
        "demo: starting a Kubernetes control plane and lb-agent on both nodes as the DaemonSet runs it"
    );
    let k = KubeCluster::up(Options::default(), agent)?;
    let all: Vec<&str> = k.cluster.pods().map(|p| p.name()).collect();
    let selector = k.pod_set("demo", &all)?;
    let spec = |kind: &str| {
        json!({
            "type": kind,
            "selector": selector,
            "ipFamilyPolicy": "RequireDualStack",
            "ipFamilies": ["IPv4", "IPv6"],
            "ports": [
                {"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080},
                {"name": "http-udp", "port": 80, "protocol": "UDP", "targetPort": 8080},
            ],
        })
    };
    let web = k.apply_service("web", spec("ClusterIP"))?;
    let np = k.apply_service("web-nodeport", spec("NodePort"))?;
    let lb = k.cluster.lb_ips(10);
    let ext = k.cluster.external_ips(10);
    let mut lb_spec = spec("LoadBalancer");
    lb_spec["externalIPs"] = json!(ext.iter().map(ToString::to_string).collect::<Vec<_>>());
    k.apply_service("web-lb", lb_spec)?;
    k.set_ingress("web-lb", &lb)?;
    let vip = web
        .spec
        .and_then(|s| s.cluster_ips)
        .unwrap_or_default()
        .iter()
        .map(|ip| ip.parse())
        .collect::<Result<Vec<IpAddr>, _>>()?;
    let node_port = np
        .spec
        .and_then(|s| s.ports)
        .and_then(|p| p.first().and_then(|p| p.node_port))
        .context("no nodePort allocated")?;
    // Give the EndpointSlice controller and the agents a moment.
    std::thread::sleep(Duration::from_secs(2));
    let how = format!(
        "  the API server: kubectl --kubeconfig {} get svc,endpointslices,pods -n {NAMESPACE}",
        k.cp.kubeconfig().display()
    );
    Ok((
        k,
        Targets {
            vip,
            node_port: u16::try_from(node_port)?,
            lb,
            ext,
        },
        how,
    ))
}

fn main() -> Result<()> {
    let Cli { agent, once, kube } = Cli::parse();
    ensure!(
        agent.is_file(),
        "--agent {}: no such file (build it with `cargo build --release -p lb-agent`)",
        agent.display()
    );
    eprintln!("demo: building the cluster (2 nodes, 2 pods each, a client, a switch)");
    // Held until the end: dropping them tears everything down.
    let (plain, kubed, targets, how);
    let cluster = if kube {
        let (k, t, h) = with_kube(&agent)?;
        (targets, how) = (t, h);
        kubed = k;
        &kubed.cluster
    } else {
        let (c, t, h) = with_manifests(&agent)?;
        (targets, how) = (t, h);
        plain = c;
        &plain
    };
    let a0 = cluster.pod("pod-a0");
    let client = cluster.client();
    let (na, nb) = (cluster.node("node-a"), cluster.node("node-b"));
    let Targets {
        vip,
        node_port,
        lb,
        ext,
    } = targets;
    println!(
        "\nlb demo: run {} — pods answer with their name; {REQUESTS} new connections per line\n",
        cluster.run_id()
    );
    println!("From pod-a0 (on node-a) to the ClusterIP Service `web`:");
    show(
        "ClusterIP, IPv4",
        a0.ns(),
        SocketAddr::new(vip[0], 80),
        false,
    );
    show(
        "ClusterIP, IPv4",
        a0.ns(),
        SocketAddr::new(vip[0], 80),
        true,
    );
    show(
        "ClusterIP, IPv6",
        a0.ns(),
        SocketAddr::new(vip[1], 80),
        false,
    );
    println!(
        "\nFrom the external client to the NodePort Service `web-nodeport` (externalTrafficPolicy Cluster):"
    );
    show(
        "NodePort on node-a",
        client.ns(),
        na.sock(false, node_port),
        false,
    );
    show(
        "NodePort on node-b",
        client.ns(),
        nb.sock(false, node_port),
        false,
    );
    show(
        "NodePort on node-b, IPv6",
        client.ns(),
        nb.sock(true, node_port),
        true,
    );
    println!("\nFrom the external client to the LoadBalancer Service `web-lb` (routed to node-a):");
    show(
        "LoadBalancer ingress IP",
        client.ns(),
        SocketAddr::new(lb[0], 80),
        false,
    );
    show(
        "LoadBalancer ingress IP, IPv6",
        client.ns(),
        SocketAddr::new(lb[1], 80),
        false,
    );
    show(
        "externalIP",
        client.ns(),
        SocketAddr::new(ext[0], 80),
        false,
    );

    let pins = na.pin_path().display().to_string();
    let bpftool = output_with_timeout(
        Command::new("bpftool").args(["map", "dump", "pinned", &format!("{pins}/services")]),
        TIMEOUT,
    )?;
    println!("\n`bpftool map dump pinned {pins}/services` on node-a (first lines):");
    print!("{}", excerpt(&bpftool.stdout, 24));
    let dump = output_with_timeout(
        &mut command_in(
            na.ns(),
            &agent,
            ["dump", "--pin-path", &pins, "--conntrack-limit", "6"],
        ),
        TIMEOUT,
    )?;
    println!("\n`lb-agent dump` on node-a:");
    print!("{}", excerpt(&dump.stdout, 60));

    if once {
        println!("\ndemo: done (--once); tearing the cluster down");
        return Ok(());
    }
    println!("\nThe cluster stays up for you to explore (Ctrl-C removes it). For example:");
    println!(
        "  nsenter --net=/run/netns/{} curl -s --http0.9 http://{}:80/    # a pod to the ClusterIP",
        a0.ns(),
        vip[0]
    );
    println!(
        "  nsenter --net=/run/netns/{} curl -s --http0.9 http://{}/      # the client to the NodePort",
        client.ns(),
        na.sock(false, node_port)
    );
    println!("  {} dump --pin-path {pins}", agent.display());
    println!("  bpftool map dump pinned {pins}/conntrack");
    println!("{how}");
    println!("  agent logs: {}", cluster.run_dir().display());
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}
