//! `cargo xtask demo`: a two-node cluster on network namespaces, lb on both
//! nodes, and real requests showing what it does.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, Result};
use lb_testbed::{Cluster, Options, command_in, output_with_timeout, tcp_request, udp_request};

use crate::setup;

const REQUESTS: usize = 40;
const TIMEOUT: Duration = Duration::from_secs(2);

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// Builds the agent (release) and returns its path.
pub fn build_agent() -> Result<PathBuf> {
    eprintln!("demo: building lb-agent (release)");
    setup::cargo(["build", "--release", "--package", "lb-agent"].map(String::from))?;
    Ok(workspace().join("target/release/lb-agent"))
}

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

pub fn run(once: bool) -> Result<()> {
    setup::require_root("cargo xtask demo")?;
    setup::run()?;
    let agent = build_agent()?;
    eprintln!("demo: building the cluster (2 nodes, 2 pods each, a client, a switch)");
    let cluster = Cluster::up(Options::default())?;
    cluster.start_pod_servers(&[8080])?;
    let dir = cluster.run_dir().join("manifests");
    std::fs::create_dir_all(&dir)?;
    for (name, yaml) in cluster.demo_manifests() {
        std::fs::write(dir.join(&name), yaml).with_context(|| format!("writing {name}"))?;
    }
    eprintln!("demo: starting lb-agent on node-a and node-b");
    cluster.start_agents(&agent, &dir)?;

    let a0 = cluster.pod("pod-a0");
    let client = cluster.client();
    let (na, nb) = (cluster.node("node-a"), cluster.node("node-b"));
    let vip = cluster.cluster_ips(10);
    let lb = cluster.lb_ips(10);
    let ext = cluster.external_ips(10);
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
        na.sock(false, 30080),
        false,
    );
    show(
        "NodePort on node-b",
        client.ns(),
        nb.sock(false, 30080),
        false,
    );
    show(
        "NodePort on node-b, IPv6",
        client.ns(),
        nb.sock(true, 30080),
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
        na.sock(false, 30080)
    );
    println!("  {} dump --pin-path {pins}", agent.display());
    println!("  bpftool map dump pinned {pins}/conntrack");
    println!(
        "  manifests: {} (edit them: the agents follow within a second)",
        dir.display()
    );
    println!("  agent logs: {}", cluster.run_dir().display());
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}
