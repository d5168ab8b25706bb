//! `lb-agent run`: load (or adopt) the datapath, attach it, follow a source, and
//! keep the maps equal to the desired state until told to stop. Stopping leaves
//! the datapath attached and serving; only `lb-agent cleanup` removes it.

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context as _, Result, bail};
use lb_common::Config;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};

use crate::{
    bpf::{Datapath, LoadOptions, NodeConfig, Sizes, sock},
    cluster::{NodeInfo, Problem, ProblemKind},
    health::Health,
    interfaces::{Interfaces, UplinkHook},
    metrics::{self, Metrics},
    model::Prefix,
    netlink::{self, Link, LinkEvent},
    reconcile::Reconciler,
    repair::{self, RepairSchedule},
    service_health::{HealthCheck, HealthCheckServers},
    source::{self, SourceEvent},
    sync::Engine,
};

/// Where cluster state comes from.
#[derive(Clone, Debug)]
pub enum SourceConfig {
    Manifests(PathBuf),
    /// Kubernetes API; `None`: in-cluster config, then $KUBECONFIG / ~/.kube/config.
    Kubernetes(Option<PathBuf>),
}

#[derive(Clone, Debug)]
pub struct Settings {
    pub source: SourceConfig,
    pub node_name: String,
    /// Empty: discover (Kubernetes: the Node object; manifests: the uplinks' addresses).
    pub node_ips: Vec<IpAddr>,
    /// Empty: the interfaces holding the node addresses.
    pub ifaces: Vec<String>,
    pub uplink_hook: UplinkHook,
    pub pod_iface_patterns: Vec<String>,
    /// Interfaces neither uplinks nor pods that get the tc program (see `interfaces`).
    pub other_iface_patterns: Vec<String>,
    pub pin_path: PathBuf,
    pub sizes: Sizes,
    pub snat_ports: (u16, u16),
    pub metrics_addr: SocketAddr,
    pub healthz_addr: SocketAddr,
    /// Datapath log level (per-flow messages are debug).
    pub datapath_log: log::Level,
    /// Socket-level balancing for the node's own clients (see `bpf::sock`).
    pub socket_lb: bool,
    /// Where the cgroup v2 hierarchy is mounted (or its hybrid-layout parent).
    pub cgroup_path: PathBuf,
    /// The cluster's pod CIDRs (`--cluster-cidr`): which clients are inside
    /// the cluster. Empty: the Nodes' pod CIDRs, as the source reports them.
    pub cluster_cidrs: Vec<Prefix>,
    /// The period of the verify-and-repair pass (see `repair`).
    pub verify_every: Duration,
    /// The receive buffer of the link events' netlink socket, in bytes.
    pub link_events_buffer: usize,
}

/// The uplinks named with --iface.
fn named_uplinks(settings: &Settings, links: &[Link]) -> Result<BTreeSet<u32>> {
    settings
        .ifaces
        .iter()
        .map(|name| {
            links
                .iter()
                .find(|l| &l.name == name)
                .map(|l| l.index)
                .with_context(|| format!("--iface {name}: no such interface"))
        })
        .collect()
}

/// The interfaces holding `node_ips` (the default uplinks).
fn uplinks_holding(node_ips: &[IpAddr], addrs: &[(u32, IpAddr)]) -> BTreeSet<u32> {
    let mut uplinks = BTreeSet::new();
    for ip in node_ips {
        match addrs.iter().find(|(_, a)| a == ip) {
            Some((i, _)) => {
                uplinks.insert(*i);
            }
            None => log::warn!("node address {ip} is on no interface of this host (pass --iface)"),
        }
    }
    uplinks
}

/// Returns freed heap memory to the system. glibc keeps what a thread frees in
/// that thread's arena for its next allocations; memory freed after a large
/// listing would otherwise stay in the agent's RSS for good.
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The cluster CIDRs the datapath tells clients inside the cluster by: those
/// of `--cluster-cidr`, fixed; else the Nodes' pod CIDRs, which the source
/// reports after its first listing. Until then the datapath keeps what the
/// last run left (a restart changes nothing).
struct ClusterCidrs {
    from_flag: bool,
    /// None: not reported yet.
    known: Option<Vec<Prefix>>,
}

impl ClusterCidrs {
    fn at_start(settings: &Settings) -> Self {
        let from_flag = !settings.cluster_cidrs.is_empty();
        Self {
            from_flag,
            known: from_flag.then(|| settings.cluster_cidrs.clone()),
        }
    }

    /// Takes the source's report; whether the datapath must follow it.
    fn reported(&mut self, cidrs: Vec<Prefix>) -> bool {
        if self.from_flag || self.known.as_ref() == Some(&cidrs) {
            return false;
        }
        self.known = Some(cidrs);
        true
    }

    /// Writes the tries, then (through `config`) the flag that makes the
    /// datapath read them. Nothing before they are known.
    fn write(&self, maps: &mut crate::bpf::maps::Maps) -> Result<()> {
        let Some(cidrs) = &self.known else {
            return Ok(());
        };
        let tries: Vec<crate::bpf::maps::Cidr> = cidrs.iter().map(|p| (p.addr, p.len)).collect();
        maps.set_cluster_cidrs(&tries)
    }

    /// Whether `config` says the tries hold them: once known, whether there
    /// are any; before, what `pinned` says.
    fn in_config(&self, pinned: &Config) -> bool {
        match &self.known {
            Some(cidrs) => !cidrs.is_empty(),
            None => pinned.flags & lb_common::CFG_F_CLUSTER_CIDRS != 0,
        }
    }
}

/// The node's `config`: source NAT from its first address of each family.
fn node_config(settings: &Settings, node_ips: &[IpAddr], cluster_cidrs: bool) -> NodeConfig {
    NodeConfig {
        snat_v4: node_ips.iter().find_map(|i| match i {
            IpAddr::V4(v4) => Some(*v4),
            IpAddr::V6(_) => None,
        }),
        snat_v6: node_ips.iter().find_map(|i| match i {
            IpAddr::V6(v6) => Some(*v6),
            IpAddr::V4(_) => None,
        }),
        snat_ports: settings.snat_ports,
        cluster_cidrs,
    }
}

async fn start_source(settings: &Settings, tx: mpsc::Sender<SourceEvent>) -> Result<()> {
    match &settings.source {
        SourceConfig::Manifests(dir) => {
            let dir = dir.clone();
            let node = settings.node_name.clone();
            if !dir.is_dir() {
                bail!("--manifests {}: not a directory", dir.display());
            }
            tokio::spawn(async move {
                if let Err(e) = source::manifests::watch(dir, node, tx).await {
                    log::error!("manifest source stopped: {e:#}");
                }
            });
        }
        SourceConfig::Kubernetes(kubeconfig) => {
            let client = kube_client(kubeconfig.as_deref()).await?;
            let node = settings.node_name.clone();
            // The Nodes' pod CIDRs are only needed without --cluster-cidr.
            let nodes = if settings.cluster_cidrs.is_empty() {
                source::kube::Nodes::All
            } else {
                source::kube::Nodes::OwnOnly
            };
            tokio::spawn(async move {
                if let Err(e) = source::kube::run(client, node, nodes, tx).await {
                    log::error!("Kubernetes source stopped: {e:#}");
                }
            });
        }
    }
    Ok(())
}

/// A client for the API server: `kubeconfig`, else the in-cluster config (the
/// DaemonSet's service account), else $KUBECONFIG / ~/.kube/config.
pub async fn kube_client(kubeconfig: Option<&std::path::Path>) -> Result<kube::Client> {
    // rustls needs one process-wide crypto provider; with none installed it
    // panics when the client is built. An error means one is installed already.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await?
        }
        None => match kube::Config::incluster() {
            Ok(c) => c,
            Err(_) => kube::Config::from_kubeconfig(&kube::config::KubeConfigOptions::default())
                .await
                .context("no in-cluster config and no usable $KUBECONFIG / ~/.kube/config")?,
        },
    };
    kube::Client::try_from(config).context("building the Kubernetes client")
}

/// What the agent knows about this node, and so what it may touch: its
/// addresses (the NodePort frontends, the source-NAT addresses in `config`) and
/// its uplinks (the XDP links and `tx_ports`).
///
/// A restart must change nothing in the datapath: the previous run left links,
/// `tx_ports`, `config` and frontends right for this node. In Kubernetes mode
/// without --node-ip the addresses come from the Node object, which arrives
/// after a while (or, with the API server down, not for a long while); until
/// then the agent leaves all of that as it is rather than write an
/// address-less node over it. Pod interfaces do not depend on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct NodeFacts {
    /// The addresses are the Node object's (Kubernetes mode without
    /// --node-ip); else the flags fixed them at start.
    from_node_object: bool,
    /// Whether the addresses are known: from the flags, or a Node object has
    /// arrived.
    addresses_known: bool,
    /// The uplinks are named with --iface; else they are the interfaces holding
    /// the addresses.
    uplinks_named: bool,
}

impl NodeFacts {
    fn at_start(source: &SourceConfig, node_ip_flag: bool, uplinks_named: bool) -> Self {
        let from_node_object = matches!(source, SourceConfig::Kubernetes(_)) && !node_ip_flag;
        Self {
            from_node_object,
            addresses_known: !from_node_object,
            uplinks_named,
        }
    }

    /// Whether Node objects set the addresses (else the flags win).
    fn follows_node_object(self) -> bool {
        self.from_node_object
    }

    fn addresses_known(self) -> bool {
        self.addresses_known
    }

    /// Whether the uplinks may be set: XDP attached and detached, `tx_ports`
    /// written, stale XDP links removed.
    fn uplinks_known(self) -> bool {
        self.uplinks_named || self.addresses_known
    }

    /// Whether the uplinks change with the addresses.
    fn uplinks_follow_addresses(self) -> bool {
        !self.uplinks_named
    }

    /// Whether `config` may be written, `pinned` being what it holds: once the
    /// addresses are known, or at once into a fresh datapath (all zeros:
    /// nothing uses its source-NAT addresses before there are services, and
    /// `lb-agent dump` shows the ports from the start).
    fn may_write_config(self, pinned: &Config) -> bool {
        self.addresses_known() || *pinned == Config::default()
    }

    /// Whether the maps may be synced: the first sync removes every frontend
    /// that is not desired, NodePorts on addresses not known yet included.
    fn may_sync(self) -> bool {
        self.addresses_known()
    }

    /// A Node object's addresses arrived (`changed`: they differ from the
    /// store's). Returns whether `config` and the uplinks must follow them: on
    /// the first arrival, and on changes.
    fn node_arrived(&mut self, changed: bool) -> bool {
        let first = !self.addresses_known;
        self.addresses_known = true;
        first || changed
    }
}

/// How often the main loop stamps its heartbeat (what `/livez` checks).
const HEARTBEAT_EVERY: Duration = Duration::from_secs(5);

pub async fn run(settings: Settings) -> Result<()> {
    let started = Instant::now();
    let mut dp = Datapath::load(&LoadOptions {
        pin_path: Some(settings.pin_path.clone()),
        sizes: settings.sizes,
        log_level: Some(settings.datapath_log),
    })?;
    forward_datapath_logs(dp.take_logger()?)?;
    let reconciler = Reconciler::adopt(dp.take_maps()?)?;

    let links = netlink::links().await?;
    let addrs = netlink::addresses().await?;
    let named = named_uplinks(&settings, &links)?;
    let mut facts = NodeFacts::at_start(
        &settings.source,
        !settings.node_ips.is_empty(),
        !named.is_empty(),
    );
    let node_ips = if facts.follows_node_object() {
        // The Node object's, when it arrives.
        Vec::new()
    } else if settings.node_ips.is_empty() {
        // Manifest mode: those of the named uplinks.
        addrs
            .iter()
            .filter(|(i, _)| named.contains(i))
            .map(|(_, a)| *a)
            .collect()
    } else {
        settings.node_ips.clone()
    };
    let uplinks = if named.is_empty() {
        uplinks_holding(&node_ips, &addrs)
    } else {
        named
    };
    if !facts.uplinks_known() {
        log::info!(
            "no --iface or --node-ip: the uplinks follow the Node object's addresses; until it \
             arrives, uplinks, tx_ports, config and services stay as the last run left them"
        );
    } else if uplinks.is_empty() && matches!(settings.source, SourceConfig::Manifests(_)) {
        bail!("no uplink: pass --iface or --node-ip");
    }
    let mut engine = Engine::new(
        reconciler,
        NodeInfo {
            name: settings.node_name.clone(),
            addresses: node_ips.clone(),
            zone: None,
        },
    );
    let mut att = Interfaces::new(
        settings.pin_path.join("links"),
        settings.uplink_hook,
        settings.pod_iface_patterns.clone(),
        settings.other_iface_patterns.clone(),
    );
    // The subscription lists the links once subscribed, so that no link
    // falls in between: its first listing is the links to start with.
    let (link_tx, mut link_rx) = mpsc::channel(256);
    tokio::spawn(netlink::follow_links(link_tx, settings.link_events_buffer));
    let links_now = match link_rx.recv().await {
        Some(LinkEvent::Listed(links)) => links,
        Some(LinkEvent::Lost(why)) => bail!("following the node's links: {why}"),
        other => bail!("the link subscription began with {other:?}, not a listing"),
    };
    let mut cluster_cidrs = ClusterCidrs::at_start(&settings);
    // What the last run left (the cluster CIDRs' flag stays until they are known).
    let pinned = engine
        .reconciler()
        .maps()
        .config
        .get(&0, 0)
        .context("reading config")?;
    {
        let mut r = engine.reconciler();
        // The CIDRs before the flag that makes the datapath read them.
        cluster_cidrs.write(r.maps_mut())?;
        if facts.may_write_config(&pinned) {
            r.maps_mut().set_config(&node_config(
                &settings,
                &node_ips,
                cluster_cidrs.in_config(&pinned),
            ))?;
        }
        for link in links_now {
            att.link_added(&mut dp, r.maps_mut(), link);
        }
        if facts.uplinks_known() {
            att.set_uplinks(&mut dp, r.maps_mut(), uplinks)?;
        }
    }
    let socket_lb = socket_lb(&settings, &mut dp);
    // Maps migrated at load (a new layout or size) take their pins only now
    // that the new programs serve (see `bpf::migrate`).
    if let Some(report) = dp
        .finish_migration(&settings.pin_path.join("links"))
        .context("finishing the migration of the pinned maps")?
    {
        log::info!(
            "pinned maps migrated to layout {}: {report}",
            lb_common::LAYOUT_VERSION
        );
    }
    let awaited = "from the Node object (as pinned until then)";
    log::info!(
        "datapath ready in {:?}: node {} addresses {}, uplinks {}, {} pod and {} other interface(s)",
        started.elapsed(),
        settings.node_name,
        if facts.addresses_known() {
            format!("{node_ips:?}")
        } else {
            awaited.into()
        },
        match att.uplinks() {
            Some(u) => format!("{u:?}"),
            None => awaited.into(),
        },
        att.count(lb_common::iface::ROLE_POD),
        att.count(lb_common::iface::ROLE_OTHER),
    );

    // Kubernetes mode starts without contact with the API server (the source
    // says when it has some); the manifest source always has it.
    let source_lost_since =
        matches!(settings.source, SourceConfig::Kubernetes(_)).then(SystemTime::now);
    // The scrape reads the counters through handles of its own and the ids'
    // names from the reconciler's shared copy: it never takes the reconciler's
    // lock, which every sync holds.
    let (counters, names) = {
        let r = engine.reconciler();
        (r.maps().counter_handles()?, r.id_names())
    };
    let metrics = Arc::new(Metrics::new(
        counters,
        names,
        Health::new(Instant::now(), source_lost_since),
    ));
    metrics.agent.socket_lb.set(i64::from(socket_lb));
    // The janitor's sweeps tell the reconciler which backends still have
    // flows: one that leaves every port keeps its filter bit until they end.
    let flows = crate::reconcile::departed::SharedFlowBackends::default();
    engine.reconciler().follow_flows(flows.clone());
    let janitor = crate::conntrack::Janitor::start(
        &settings.pin_path,
        metrics.agent.clone(),
        settings.sizes.conntrack,
        flows,
    );
    let mut server = {
        let m = metrics.clone();
        let (ma, ha) = (settings.metrics_addr, settings.healthz_addr);
        tokio::spawn(async move { metrics::serve(m, ma, ha).await })
    };

    let mut health_checks = HealthCheckServers::new({
        let health = metrics.health.clone();
        Arc::new(move || {
            health
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .proxy_healthy(SystemTime::now())
        })
    });
    let (tx, mut rx) = mpsc::channel(4096);
    start_source(&settings, tx).await?;
    let mut known_problems: HashSet<String> = HashSet::new();
    let mut heartbeat = tokio::time::interval(HEARTBEAT_EVERY);
    let mut repairs = RepairSchedule::new(settings.verify_every, tokio::time::Instant::now());
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;

    loop {
        let mut node_changed = false;
        let mut cidrs_changed = false;
        let mut problems = Vec::new();
        tokio::select! {
            ev = rx.recv() => {
                let Some(ev) = ev else { bail!("the source stopped") };
                let mut take = |ev: SourceEvent| match ev {
                    SourceEvent::Disconnected { since } => {
                        metrics.agent.source_errors.inc();
                        metrics.health.lock().expect("health lock").source_lost_since = Some(since);
                    }
                    SourceEvent::Connected => {
                        metrics.health.lock().expect("health lock").source_lost_since = None;
                    }
                    SourceEvent::NodeEligible(eligible) => {
                        metrics.health.lock().expect("health lock").node_eligible = eligible;
                    }
                    SourceEvent::ClusterCidrs(cidrs) => {
                        cidrs_changed |= cluster_cidrs.reported(cidrs);
                    }
                    // Flags win over the Node object for the node's addresses.
                    SourceEvent::NodeAddresses(_) if !facts.follows_node_object() => {}
                    ev => {
                        let node = matches!(ev, SourceEvent::NodeAddresses(_));
                        let taken = engine.take(ev);
                        if node {
                            node_changed |= facts.node_arrived(taken.node_changed);
                        }
                        problems.extend(taken.problems);
                        if taken.listing {
                            // Reading a listing leaves freed memory (parsed
                            // values, the API objects slices were converted
                            // from) in the reader threads' malloc arenas, which
                            // this thread does not allocate from: hand it back
                            // before the sync grows the agent again.
                            release_freed_memory();
                        }
                    }
                };
                take(ev);
                while let Ok(ev) = rx.try_recv() {
                    take(ev);
                }
            }
            // (follow_links ends only once this receiver is gone.)
            Some(le) = link_rx.recv() => {
                let mut r = engine.reconciler();
                match le {
                    LinkEvent::Added(l) => att.link_added(&mut dp, r.maps_mut(), l),
                    LinkEvent::Removed(l) => att.link_removed(r.maps_mut(), &l),
                    LinkEvent::Listed(links) => {
                        metrics.health.lock().expect("health lock").links_lost_since = None;
                        att.relisted(&mut dp, r.maps_mut(), links);
                    }
                    LinkEvent::Lost(_) => {
                        metrics.agent.error("link_events");
                        metrics
                            .health
                            .lock()
                            .expect("health lock")
                            .links_lost_since
                            .get_or_insert_with(SystemTime::now);
                    }
                }
                continue;
            }
            () = tokio::time::sleep_until(repairs.next()) => {
                // Then on to the sync below, which tries the failed ports again.
                let failing = repair::pass(&mut engine, &att, &metrics);
                repairs.ran(tokio::time::Instant::now(), failing);
            }
            _ = heartbeat.tick() => {
                metrics.health.lock().expect("health lock").heartbeat = Instant::now();
                continue;
            }
            done = &mut server => {
                // Say why (an address in use, or not assignable in this namespace).
                return match done {
                    Ok(Err(e)) => Err(e.context("the metrics/healthz server stopped")),
                    Ok(Ok(())) => bail!("the metrics/healthz server stopped"),
                    Err(e) => Err(anyhow::Error::new(e).context("the metrics/healthz server failed")),
                };
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
        report_problems(&metrics, &mut known_problems, problems);
        if cidrs_changed {
            let mut r = engine.reconciler();
            // `config` is written once the addresses are known (it holds
            // the source-NAT addresses too); until then the CIDRs wait in
            // the tries. Its flag goes off before the tries empty, and on
            // after they are filled: never a moment in which every client
            // counts as outside.
            let flag = cluster_cidrs.in_config(&pinned);
            let config = (facts.addresses_known() && !node_changed)
                .then(|| node_config(&settings, &engine.store().node().addresses, flag));
            if let Some(c) = config.as_ref().filter(|_| !flag) {
                r.maps_mut().set_config(c)?;
            }
            cluster_cidrs.write(r.maps_mut())?;
            if let Some(c) = config.as_ref().filter(|_| flag) {
                r.maps_mut().set_config(c)?;
            }
        }
        if node_changed {
            // The Node object's addresses arrived or changed: SNAT addresses,
            // and the uplinks unless --iface names them.
            let ips = engine.store().node().addresses.clone();
            log::info!("node addresses now {ips:?}");
            let addrs = netlink::addresses().await?;
            let mut r = engine.reconciler();
            r.maps_mut().set_config(&node_config(
                &settings,
                &ips,
                cluster_cidrs.in_config(&pinned),
            ))?;
            if facts.uplinks_follow_addresses() {
                att.set_uplinks(&mut dp, r.maps_mut(), uplinks_holding(&ips, &addrs))?;
            }
        }
        if !facts.may_sync() || !engine.is_due() {
            continue;
        }
        {
            let mut h = metrics.health.lock().expect("health lock");
            h.pending_since.get_or_insert_with(SystemTime::now);
        }
        let Some(sync) = engine.sync() else {
            continue;
        };
        // Removed UDP frontends: their flows' conntrack entries go, off this loop.
        janitor.hand(sync.stats.udp_gone.clone());
        {
            let mut r = engine.reconciler();
            if r.take_repair_due() || !r.failed_ports().is_empty() {
                repairs.failed(tokio::time::Instant::now());
            }
        }
        if sync.first {
            log::info!(
                "first sync done: {} service ports from {} Services",
                engine.desired().len(),
                engine.store().service_count()
            );
            // The first sync's temporaries (changed-port sets, Maglev
            // tables) are gone: give their memory back too.
            release_freed_memory();
        }
        let sizes = settings.sizes;
        let o = sync.occupancy;
        metrics
            .agent
            .set_map("services", o.frontends, sizes.services);
        metrics
            .agent
            .set_map("backends", o.backends, sizes.backends);
        metrics
            .agent
            .set_map("service_ids", o.ports, sizes.service_ids);
        metrics.agent.set_map(
            lb_common::map_names::MAGLEV,
            o.maglev_elements,
            sizes.maglev_elements(),
        );
        report_problems(&metrics, &mut known_problems, sync.problems);
        serve_health_checks(&engine, &mut health_checks, &metrics, &mut known_problems);
        metrics.agent.syncs.inc();
        metrics.agent.sync_duration.observe(sync.took.as_secs_f64());
        metrics
            .agent
            .maglev_entries_written
            .inc_by(sync.stats.maglev_entries_written as u64);
        if let Some(latency) = sync.latency {
            metrics.agent.event_to_map.observe(latency.as_secs_f64());
        }
        {
            let mut h = metrics.health.lock().expect("health lock");
            h.last_synced = Some(SystemTime::now());
            h.pending_since = None;
        }
        log::debug!(
            "sync: {} ports changed in {:?} (model {:?}, maps {:?}): {:?}",
            sync.changed.len(),
            sync.took,
            sync.modelled,
            sync.took - sync.modelled,
            sync.stats
        );
    }
    log::info!("stopping; the datapath stays attached and serving (`lb-agent cleanup` removes it)");
    Ok(())
}

/// Attaches (or, with `--socket-lb=false`, detaches) the socket programs that
/// serve the node's own clients. A node without a cgroup v2 hierarchy still
/// serves every other client: that is said loudly, not fatal. Returns whether
/// they run.
fn socket_lb(settings: &Settings, dp: &mut Datapath) -> bool {
    let links = settings.pin_path.join("links");
    if !settings.socket_lb {
        match sock::detach(&links) {
            Ok(n) => log::info!(
                "--socket-lb=false: the node's own clients (its processes, hostNetwork pods)                  do not reach Services through lb ({n} socket program(s) detached)"
            ),
            Err(e) => log::error!("detaching the socket programs: {e:#}"),
        }
        return false;
    }
    let attached = sock::cgroup2_root(&settings.cgroup_path).and_then(|root| {
        dp.attach_sockets(&root, &links)?;
        Ok(root)
    });
    match attached {
        Ok(root) => {
            log::info!(
                "socket-level balancing on cgroup {}: the node's own clients (its processes,                  hostNetwork pods) reach Services",
                root.display()
            );
            true
        }
        Err(e) => {
            log::warn!(
                "the node's own clients (its processes, hostNetwork pods) will not reach                  Services: {e:#}"
            );
            false
        }
    }
}

/// Drains the datapath's log ring buffer into the agent's log as records arrive.
fn forward_datapath_logs(logger: aya_log::EbpfLogger<&'static dyn log::Log>) -> Result<()> {
    // SAFETY: the logger owns the ring buffer's fd and keeps it open while the
    // AsyncFd holds it.
    let mut fd = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
    }
    .context("polling the datapath log ring buffer")?;
    tokio::spawn(async move {
        loop {
            let Ok(mut guard) = fd.readable_mut().await else {
                break;
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
    Ok(())
}

/// Opens, updates and closes the health check node ports to match the
/// desired state (a port that cannot be opened is reported, and tried again
/// at the next sync).
fn serve_health_checks(
    engine: &Engine,
    servers: &mut HealthCheckServers,
    metrics: &Metrics,
    known: &mut HashSet<String>,
) {
    let wanted: BTreeMap<u16, HealthCheck> = engine
        .desired()
        .health_checks()
        .into_iter()
        .map(|(port, (svc, hc))| {
            (
                port,
                HealthCheck {
                    service: svc.clone(),
                    local_endpoints: hc.local_endpoints,
                },
            )
        })
        .collect();
    let failed = servers.update(&wanted);
    let problems = failed
        .into_iter()
        .map(|(port, why)| {
            Problem::new(
                ProblemKind::HealthCheckPort,
                wanted.get(&port).map(|c| c.service.clone()),
                format!("health check node port {port} cannot be opened: {why}"),
            )
        })
        .collect();
    report_problems(metrics, known, problems);
}

/// Logs each problem once (sources repeat them on every resync) and counts it.
fn report_problems(metrics: &Metrics, known: &mut HashSet<String>, problems: Vec<Problem>) {
    for p in problems {
        let text = p.to_string();
        if known.insert(text.clone()) {
            log::warn!("skipped: {text}");
            metrics.agent.error(p.kind.as_str());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kubernetes() -> SourceConfig {
        SourceConfig::Kubernetes(None)
    }

    /// A datapath an earlier run configured.
    fn pinned() -> Config {
        Config {
            snat_port_min: 30_000,
            snat_port_max: 60_000,
            ..Config::default()
        }
    }

    #[test]
    fn flags_and_manifest_mode_know_the_node_at_start() {
        for facts in [
            NodeFacts::at_start(&SourceConfig::Manifests("/m".into()), false, true),
            NodeFacts::at_start(&SourceConfig::Manifests("/m".into()), true, false),
            NodeFacts::at_start(&kubernetes(), true, false),
            NodeFacts::at_start(&kubernetes(), true, true),
        ] {
            assert!(!facts.follows_node_object(), "{facts:?}");
            assert!(facts.uplinks_known(), "{facts:?}");
            assert!(facts.may_write_config(&pinned()), "{facts:?}");
            assert!(facts.may_sync(), "{facts:?}");
        }
    }

    #[test]
    fn without_flags_nothing_of_the_node_is_touched_until_the_node_arrives() {
        let mut facts = NodeFacts::at_start(&kubernetes(), false, false);
        assert!(facts.follows_node_object());
        assert!(!facts.uplinks_known(), "XDP links and tx_ports stay");
        assert!(!facts.may_write_config(&pinned()), "config stays");
        assert!(!facts.may_sync(), "frontends stay");
        assert!(facts.uplinks_follow_addresses());

        // The first Node object counts even with the addresses the store had.
        assert!(facts.node_arrived(false));
        assert!(facts.uplinks_known());
        assert!(facts.may_write_config(&pinned()));
        assert!(facts.may_sync());
        // After that, only changes.
        assert!(!facts.node_arrived(false));
        assert!(facts.node_arrived(true));
    }

    #[test]
    fn named_uplinks_are_set_at_once_and_the_rest_waits_for_the_node() {
        let mut facts = NodeFacts::at_start(&kubernetes(), false, true);
        assert!(facts.follows_node_object());
        assert!(facts.uplinks_known());
        assert!(!facts.uplinks_follow_addresses());
        assert!(!facts.may_write_config(&pinned()));
        assert!(!facts.may_sync());
        assert!(facts.node_arrived(false));
        assert!(facts.may_write_config(&pinned()));
        assert!(facts.may_sync());
    }

    #[test]
    fn a_fresh_datapath_gets_its_config_at_once() {
        let facts = NodeFacts::at_start(&kubernetes(), false, false);
        assert!(facts.may_write_config(&Config::default()));
        assert!(!facts.may_sync());
    }
}
