//! `lb-agent`: the lb node agent.

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
};

use anyhow::{Context as _, Result, bail};
use clap::{Args, Parser, Subcommand};
use lb_agent::{
    agent::{self, Settings, SourceConfig},
    bpf::{Sizes, pins},
    dump,
    interfaces::UplinkHook,
    model, snat_ports,
};
use lb_common::capacity;

#[derive(Parser)]
#[command(
    version,
    about = "lb node agent: an eBPF/XDP load balancer for Kubernetes Services",
    long_about = "lb node agent: loads the XDP/tc datapath, attaches it to the node's uplinks and \
                  pod interfaces, and keeps its maps equal to the Services and EndpointSlices of \
                  the cluster (or of a directory of manifests)."
)]
struct Cli {
    /// Log level: error, warn, info, debug or trace (RUST_LOG overrides).
    #[arg(long, global = true, default_value = "info", env = "LB_LOG_LEVEL")]
    log_level: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent: load or adopt the datapath, attach it, follow the cluster.
    /// SIGTERM stops the agent but leaves the datapath serving.
    Run(Box<RunArgs>),
    /// Print services, backends, Maglev tables and conntrack entries decoded from
    /// the pinned maps (works without a running agent).
    Dump {
        /// The agent's --pin-path.
        #[arg(long, default_value = "/sys/fs/bpf/lb", env = "LB_PIN_PATH")]
        pin_path: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// Conntrack entries to show at most.
        #[arg(long, default_value_t = 100)]
        conntrack_limit: usize,
    },
    /// Detach the programs from every interface and remove the pinned maps.
    Cleanup {
        /// The agent's --pin-path.
        #[arg(long, default_value = "/sys/fs/bpf/lb", env = "LB_PIN_PATH")]
        pin_path: PathBuf,
    },
}

#[derive(Args)]
struct RunArgs {
    /// Follow the Kubernetes API with this kubeconfig [default: in-cluster config,
    /// then $KUBECONFIG or ~/.kube/config].
    #[arg(long, conflicts_with = "manifests")]
    kubeconfig: Option<PathBuf>,
    /// Follow a directory of Service and EndpointSlice manifests (YAML or JSON)
    /// instead of the API. Services must carry their clusterIP and nodePorts.
    #[arg(long, value_name = "DIR")]
    manifests: Option<PathBuf>,
    /// This node's name (matches EndpointSlice endpoints' nodeName) [default: hostname].
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
    /// Node addresses NodePorts answer on, IPv4 and IPv6; repeat or comma-separate
    /// [default: Kubernetes: the Node's addresses; manifests: the uplinks' addresses].
    #[arg(long, value_delimiter = ',')]
    node_ip: Vec<IpAddr>,
    /// Uplinks, where Service traffic from outside arrives [default: the
    /// interfaces holding the node addresses].
    #[arg(long, value_delimiter = ',')]
    iface: Vec<String>,
    /// How uplinks are hooked: `auto` runs XDP in native mode where the driver
    /// has it and tc (tcx ingress) on virtual links such as veths (kind, docker,
    /// VMs on veth), whose peer may hand over partial checksums and drops XDP
    /// transmits; `xdp` asks for XDP; `tc` for tc only. Where native XDP will
    /// not attach (no driver support, an MTU the driver cannot run XDP at), the
    /// uplink is served through tc and the log says why; `lb-agent dump` shows
    /// the choice. With XDP, tc runs behind it for what XDP cannot send itself.
    #[arg(long, value_enum, default_value_t = UplinkHook::Auto)]
    uplink_hook: UplinkHook,
    /// Glob patterns of the host side of pod veths, which get the tc program;
    /// interfaces appearing later are attached automatically.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "veth*,lxc*,cali*,gke*,eni*"
    )]
    pod_ifaces: Vec<String>,
    /// Glob patterns of the other interfaces that get the tc program, where
    /// replies and forwarded traffic may arrive: overlay tunnels (flannel.1,
    /// vxlan.calico, tunl0, wg0), second NICs. Default: every interface but lo,
    /// the uplinks and the pod interfaces. An empty value turns it off.
    #[arg(long, value_delimiter = ',', default_value = "*")]
    other_ifaces: Vec<String>,
    /// bpffs directory for the pinned maps and links (bpffs is mounted if needed
    /// and the agent may: it takes CAP_SYS_ADMIN).
    #[arg(long, default_value = "/sys/fs/bpf/lb", env = "LB_PIN_PATH")]
    pin_path: PathBuf,
    /// Address for /metrics (Prometheus text format). Loopback by default, as
    /// kube-proxy's: the metrics name every Service port and backend address
    /// the node serves. Give 0.0.0.0:10249 (or a node address) for a
    /// Prometheus that scrapes the nodes from elsewhere.
    #[arg(long, default_value = "127.0.0.1:10249")]
    metrics_addr: SocketAddr,
    /// Address for /healthz (answers like kube-proxy's), /livez (the main loop
    /// is alive; never depends on the API server) and /readyz (synced, and in
    /// contact with the source). Every address by default, as kube-proxy's:
    /// the kubelet's probes and external load balancers reach it at the
    /// node's address. It tells no more than whether the agent is synced and
    /// in contact with its source.
    #[arg(long, default_value = "0.0.0.0:10256")]
    healthz_addr: SocketAddr,
    /// Maglev entries (4 bytes each) for every Service port's tables. Each
    /// port's tables are sized from its backends: 1 entry for one backend,
    /// 4,093 for 2 to 7, 8,191 up to 10, 16,381 up to 30, 32,749 up to 100,
    /// 65,521 up to 6,552, and larger primes beyond; a port with
    /// externalTrafficPolicy Local has two. A port that finds no room for a
    /// larger size keeps the size it had (a new port waits), and is retried
    /// until room frees up (lb_errors_total{kind="capacity"}).
    /// The default, 64 MiB, holds 4,096 tables of 2 to 7 backends.
    #[arg(long, default_value_t = capacity::MAGLEV_ENTRIES)]
    maglev_entries: u32,
    /// Gone: tables are sized per Service port from its backends (see
    /// --maglev-entries). Refused, with that explanation.
    #[arg(long, hide = true)]
    maglev_table_size: Option<u32>,
    /// Service ports the maps hold (per-port counters and names).
    #[arg(long, default_value_t = capacity::SERVICE_IDS)]
    max_services: u32,
    /// Frontends (VIP, NodePort per node address, LB and external IPs) the maps hold.
    #[arg(long, default_value_t = capacity::SERVICES)]
    max_frontends: u32,
    /// Backends the maps hold.
    #[arg(long, default_value_t = capacity::BACKENDS)]
    max_backends: u32,
    /// Connection-tracking entries (two per flow, about 150 bytes each).
    #[arg(long, default_value_t = capacity::CONNTRACK)]
    conntrack_size: u32,
    /// Datapath log level (error, warn, info, debug, trace): per-flow messages are
    /// debug. Messages below the level are removed by the verifier at load, so
    /// they cost nothing per packet.
    #[arg(long, default_value = "warn")]
    datapath_log: log::Level,
    /// Source ports for source-NATed flows, FIRST-LAST. Unique per backend
    /// address and port; a flow keeps its client's port where it is free and
    /// in the range, as with Linux's masquerade. Ports a local socket holds for
    /// that backend (or listens on) are skipped [default: the ports outside the
    /// node's ephemeral range (net.ipv4.ip_local_port_range), 1024-32767 on a
    /// default node, so that no connection the node opens can clash with a
    /// source-NATed flow].
    #[arg(long, value_name = "FIRST-LAST")]
    snat_ports: Option<String>,
    /// Serve the node's own clients (its processes, the kubelet, hostNetwork
    /// pods) at the socket: cgroup programs on the root of the cgroup v2
    /// hierarchy send their connects and datagrams to a ClusterIP, a NodePort
    /// on a node address, a LoadBalancer IP or an externalIP straight to a
    /// backend, and show the frontend as the peer. Pods keep going through tc.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    socket_lb: bool,
    /// Where the cgroup v2 hierarchy is mounted (on a hybrid-layout host, its
    /// `unified` directory below this path is used).
    #[arg(long, default_value = "/sys/fs/cgroup")]
    cgroup_path: PathBuf,
    /// The cluster's pod CIDRs, IPv4 and IPv6; repeat or comma-separate (as
    /// kube-proxy's --cluster-cidr). Clients in them are inside the cluster:
    /// with externalTrafficPolicy Local they still reach every endpoint, and
    /// clients outside them reaching a ClusterIP are source-NATed to a backend
    /// on another node, as kube-proxy's masquerade rule does. [default: every
    /// Node's spec.podCIDRs (Kubernetes: the agent then watches all Nodes, not
    /// only its own; manifests: the Node manifests); with none, clients are
    /// told apart by neither rule]
    #[arg(long, value_delimiter = ',', value_name = "CIDR")]
    cluster_cidr: Vec<String>,
    /// Seconds between verify-and-repair passes: the maps the agent writes
    /// are read back, compared with the desired state, and rewritten where
    /// they differ (a failed write, a change by hand), counted in
    /// lb_map_drift_repaired_total. After a failed write or a port refused
    /// for lack of room, passes come sooner, from 1 s with doubling backoff.
    #[arg(long, default_value_t = 60, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(1..=86_400))]
    verify_every: u64,
    /// Receive buffer, in bytes, of the netlink socket that follows the
    /// node's interfaces. A burst of changes larger than it (hundreds of pods
    /// started at once) makes the kernel drop events; the agent then lists
    /// the interfaces afresh, so nothing is lost but time.
    #[arg(long, default_value_t = 4 << 20, value_name = "BYTES", value_parser = clap::value_parser!(u64).range(4096..=1 << 30))]
    link_events_buffer: u64,
}

/// `--snat-ports`, or the default range for this node's ephemeral ports (see
/// `lb_agent::snat_ports`), warning where they may clash.
fn snat_range(flag: Option<&str>) -> Result<(u16, u16)> {
    let ephemeral = snat_ports::ephemeral();
    let (range, warning) = match (flag, &ephemeral) {
        (Some(s), Ok(e)) => {
            let r = snat_ports::parse(s)?;
            (r, snat_ports::overlap_warning(r, *e))
        }
        (Some(s), Err(_)) => (snat_ports::parse(s)?, None),
        (None, Ok(e)) => snat_ports::default_range(*e),
        (None, Err(e)) => return Err(anyhow::anyhow!("{e:#}: pass --snat-ports")),
    };
    if let Some(w) = warning {
        log::warn!("{w}");
    }
    Ok(range)
}

fn hostname() -> Result<String> {
    let name =
        std::fs::read_to_string("/proc/sys/kernel/hostname").context("reading the hostname")?;
    Ok(name.trim().to_string())
}

fn settings(a: RunArgs) -> Result<Settings> {
    let source = match (a.manifests, a.kubeconfig) {
        (Some(dir), _) => SourceConfig::Manifests(dir),
        (None, kc) => SourceConfig::Kubernetes(kc),
    };
    if let Some(size) = a.maglev_table_size {
        bail!(
            "--maglev-table-size {size}: the flag is gone. Each Service port's Maglev tables are \
             sized from its backend count now (a fixed list, so that nodes agree); size the space \
             they share with --maglev-entries (default {})",
            capacity::MAGLEV_ENTRIES
        );
    }
    Ok(Settings {
        source,
        node_name: match a.node_name {
            Some(n) => n,
            None => hostname()?,
        },
        node_ips: a.node_ip,
        ifaces: a.iface,
        uplink_hook: a.uplink_hook,
        pod_iface_patterns: a.pod_ifaces,
        other_iface_patterns: a
            .other_ifaces
            .into_iter()
            .filter(|p| !p.is_empty())
            .collect(),
        pin_path: a.pin_path,
        sizes: Sizes {
            services: a.max_frontends,
            service_ids: a.max_services,
            backends: a.max_backends,
            maglev_entries: a.maglev_entries,
            conntrack: a.conntrack_size,
        },
        snat_ports: snat_range(a.snat_ports.as_deref())?,
        metrics_addr: a.metrics_addr,
        healthz_addr: a.healthz_addr,
        datapath_log: a.datapath_log,
        socket_lb: a.socket_lb,
        cgroup_path: a.cgroup_path,
        verify_every: std::time::Duration::from_secs(a.verify_every),
        link_events_buffer: usize::try_from(a.link_events_buffer)?,
        cluster_cidrs: a
            .cluster_cidr
            .iter()
            .map(|c| {
                model::Prefix::parse(c).with_context(|| {
                    format!("--cluster-cidr {c:?} is no CIDR (e.g. 10.244.0.0/16)")
                })
            })
            .collect::<Result<_>>()?,
    })
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    env_logger::Builder::new()
        // `lb` is the datapath's log target: its level is set in the datapath itself.
        .parse_filters(&format!("warn,lb_agent={},lb=trace", cli.log_level))
        .parse_env("RUST_LOG")
        .format_timestamp_millis()
        .init();
    match cli.command {
        Command::Run(args) => {
            let s = settings(*args)?;
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?
                .block_on(agent::run(s))
        }
        Command::Dump {
            pin_path,
            json,
            conntrack_limit,
        } => {
            let d = dump::collect(&pin_path, conntrack_limit)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&d)?);
            } else {
                print!("{}", dump::render(&d));
            }
            Ok(())
        }
        Command::Cleanup { pin_path } => {
            let removed = pins::remove_all(&pin_path)?;
            if removed.is_empty() {
                println!("nothing pinned at {}", pin_path.display());
            } else {
                println!(
                    "removed {} pins under {} (programs detached, maps freed)",
                    removed.len(),
                    pin_path.display()
                );
            }
            Ok(())
        }
    }
}
