//! `lb-agent run`: load (or adopt) the datapath, attach it, follow a source, and
//! keep the maps equal to the desired state until told to stop. Stopping leaves
//! the datapath attached and serving; only `lb-agent cleanup` removes it.

use std::{
    collections::{BTreeSet, HashSet},
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Instant, SystemTime},
};

use anyhow::{Context as _, Result, bail};
use lb_common::{CFG_F_SNAT_V4, CFG_F_SNAT_V6, Config};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};

use crate::{
    bpf::{
        Datapath, LoadOptions, Sizes,
        attach::{self, Hook},
    },
    cluster::{NodeInfo, Problem, SourceEvent},
    metrics::{self, Metrics},
    model::Desired,
    netlink::{self, Link, LinkEvent, glob_match},
    reconcile::{Reconciler, Stats},
    source,
    store::{Dirty, Store},
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
    pub pod_iface_patterns: Vec<String>,
    pub pin_path: PathBuf,
    pub sizes: Sizes,
    pub snat_ports: (u16, u16),
    pub metrics_addr: SocketAddr,
    pub healthz_addr: SocketAddr,
    /// Datapath log level (per-flow messages are debug).
    pub datapath_log: log::Level,
}

/// Interfaces the programs run on, and what to do when links come and go.
struct Attachments {
    links_dir: PathBuf,
    uplinks: BTreeSet<u32>,
    patterns: Vec<String>,
    pods: HashSet<u32>,
}

impl Attachments {
    fn is_pod(&self, link: &Link) -> bool {
        link.name != "lo"
            && !self.uplinks.contains(&link.index)
            && self.patterns.iter().any(|p| glob_match(p, &link.name))
    }

    fn attach_pod(&mut self, dp: &mut Datapath, link: &Link) {
        if !self.is_pod(link) || self.pods.contains(&link.index) {
            return;
        }
        match dp.attach(Hook::Tc, link.index, &self.links_dir) {
            Ok(how) => {
                log::info!("tc program on pod interface {} ({how:?})", link.name);
                self.pods.insert(link.index);
            }
            Err(e) => log::warn!("cannot attach to pod interface {}: {e:#}", link.name),
        }
    }

    /// Runs the XDP program on exactly `want`, which become the only redirect
    /// targets.
    fn set_uplinks(
        &mut self,
        dp: &mut Datapath,
        r: &mut Reconciler,
        want: BTreeSet<u32>,
    ) -> Result<()> {
        for i in want.difference(&self.uplinks.clone()) {
            let name = attach::ifname(*i).unwrap_or_default();
            let how = dp.attach(Hook::Xdp, *i, &self.links_dir)?;
            r.maps_mut().add_tx_port(*i)?;
            log::info!("XDP program on uplink {name} ({how:?})");
        }
        for i in self.uplinks.difference(&want) {
            log::info!("ifindex {i} is no longer an uplink");
            attach::detach(&self.links_dir, Hook::Xdp, *i)?;
            let _ = r.maps_mut().remove_tx_port(*i);
        }
        // Redirect targets left over by an earlier run.
        let stale: Vec<u32> = r
            .maps()
            .tx_ports
            .keys()
            .filter_map(Result::ok)
            .filter(|i| !want.contains(i))
            .collect();
        for i in stale {
            r.maps_mut().remove_tx_port(i)?;
        }
        self.uplinks = want;
        Ok(())
    }

    fn forget_pod(&mut self, link: &Link) {
        if self.pods.remove(&link.index) {
            log::info!("pod interface {} is gone", link.name);
            if let Err(e) = attach::detach(&self.links_dir, Hook::Tc, link.index) {
                log::warn!("{e:#}");
            }
        }
    }
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

fn node_config(settings: &Settings, node_ips: &[IpAddr]) -> Config {
    let mut cfg = Config {
        maglev_size: settings.sizes.maglev_table_size,
        snat_port_min: settings.snat_ports.0,
        snat_port_max: settings.snat_ports.1,
        ..Config::default()
    };
    if let Some(IpAddr::V4(v4)) = node_ips.iter().find(|i| i.is_ipv4()) {
        cfg.snat_addr_v4 = v4.octets();
        cfg.flags |= CFG_F_SNAT_V4;
    }
    if let Some(IpAddr::V6(v6)) = node_ips.iter().find(|i| i.is_ipv6()) {
        cfg.snat_addr_v6 = v6.octets();
        cfg.flags |= CFG_F_SNAT_V6;
    }
    cfg
}

async fn start_source(settings: &Settings, tx: mpsc::Sender<SourceEvent>) -> Result<()> {
    match &settings.source {
        SourceConfig::Manifests(dir) => {
            let dir = dir.clone();
            if !dir.is_dir() {
                bail!("--manifests {}: not a directory", dir.display());
            }
            tokio::spawn(async move {
                if let Err(e) = source::manifests::watch(dir, tx).await {
                    log::error!("manifest source stopped: {e:#}");
                }
            });
        }
        SourceConfig::Kubernetes(kubeconfig) => {
            let client = kube_client(kubeconfig.as_deref()).await?;
            let node = settings.node_name.clone();
            tokio::spawn(async move {
                if let Err(e) = source::kube::run(client, node, tx).await {
                    log::error!("Kubernetes source stopped: {e:#}");
                }
            });
        }
    }
    Ok(())
}

async fn kube_client(kubeconfig: Option<&std::path::Path>) -> Result<kube::Client> {
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

pub async fn run(settings: Settings) -> Result<()> {
    let started = Instant::now();
    let mut dp = Datapath::load(&LoadOptions {
        pin_path: Some(settings.pin_path.clone()),
        sizes: settings.sizes,
        log_level: Some(settings.datapath_log),
    })?;
    forward_datapath_logs(dp.take_logger()?)?;
    let reconciler = Reconciler::adopt(dp.take_maps()?, settings.sizes)?;
    let reconciler = Arc::new(Mutex::new(reconciler));

    let links = netlink::links().await?;
    let addrs = netlink::addresses().await?;
    let named = named_uplinks(&settings, &links)?;
    let mut node_ips = settings.node_ips.clone();
    if node_ips.is_empty() && !named.is_empty() {
        node_ips = addrs
            .iter()
            .filter(|(i, _)| named.contains(i))
            .map(|(_, a)| *a)
            .collect();
    }
    let uplinks = if named.is_empty() {
        uplinks_holding(&node_ips, &addrs)
    } else {
        named
    };
    if uplinks.is_empty() {
        match settings.source {
            SourceConfig::Manifests(_) => bail!("no uplink: pass --iface or --node-ip"),
            SourceConfig::Kubernetes(_) => {
                log::info!("no --iface or --node-ip: uplinks follow the Node object's addresses")
            }
        }
    }
    let mut att = Attachments {
        links_dir: settings.pin_path.join("links"),
        uplinks: BTreeSet::new(),
        patterns: settings.pod_iface_patterns.clone(),
        pods: HashSet::new(),
    };
    {
        let mut r = reconciler.lock().expect("reconciler lock");
        r.maps_mut()
            .set_config(&node_config(&settings, &node_ips))?;
        att.set_uplinks(&mut dp, &mut r, uplinks)?;
    }
    // Subscribe to link events before listing, so no pod veth falls in between.
    let (link_tx, mut link_rx) = mpsc::channel(256);
    tokio::spawn(async move {
        if let Err(e) = netlink::watch_links(link_tx).await {
            log::error!("link events stopped: {e:#}");
        }
    });
    for link in netlink::links().await? {
        att.attach_pod(&mut dp, &link);
    }
    // Links pinned by an earlier run for interfaces that are neither uplinks nor
    // pods now are detached.
    for (hook, index, path) in attach::pinned_links(&att.links_dir) {
        let keep = match hook {
            Hook::Xdp => att.uplinks.contains(&index),
            Hook::Tc => att.pods.contains(&index),
        };
        if !keep {
            log::info!("detaching stale {hook} link {}", path.display());
            let _ = std::fs::remove_file(&path);
        }
    }
    log::info!(
        "datapath ready in {:?}: node {} addresses {:?}, {} uplink(s), {} pod interface(s)",
        started.elapsed(),
        settings.node_name,
        node_ips,
        att.uplinks.len(),
        att.pods.len()
    );

    let metrics = Arc::new(Metrics::new(reconciler.clone()));
    count_conntrack(&settings, &metrics);
    let server = {
        let m = metrics.clone();
        let (ma, ha) = (settings.metrics_addr, settings.healthz_addr);
        tokio::spawn(async move { metrics::serve(m, ma, ha).await })
    };

    let (tx, mut rx) = mpsc::channel(4096);
    start_source(&settings, tx).await?;
    let mut store = Store::new(NodeInfo {
        name: settings.node_name.clone(),
        addresses: node_ips,
    });
    let mut desired = Desired::default();
    let mut adopted = false;
    let mut dirty = Dirty::default();
    let mut pending_since: Option<Instant> = None;
    let mut known_problems: HashSet<String> = HashSet::new();
    let node_ips_fixed = !settings.node_ips.is_empty();
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;

    loop {
        tokio::select! {
            ev = rx.recv() => {
                let Some(ev) = ev else { bail!("the source stopped") };
                pending_since.get_or_insert_with(Instant::now);
                let mut take = |ev: SourceEvent| {
                    // Flags win over the Node object for NodePort addresses.
                    if node_ips_fixed && matches!(ev, SourceEvent::NodeAddresses(_)) {
                        return;
                    }
                    let listing = matches!(ev, SourceEvent::Resync { .. });
                    dirty.merge(store.apply(ev));
                    if listing {
                        // Reading a listing leaves freed memory (parsed values,
                        // the API objects slices were converted from) in the
                        // reader threads' malloc arenas, which this thread does
                        // not allocate from: hand it back before the sync grows
                        // the agent again.
                        release_freed_memory();
                    }
                };
                take(ev);
                while let Ok(ev) = rx.try_recv() {
                    take(ev);
                }
            }
            le = link_rx.recv() => {
                match le {
                    Some(LinkEvent::Added(l)) => att.attach_pod(&mut dp, &l),
                    Some(LinkEvent::Removed(l)) => att.forget_pod(&l),
                    None => {}
                }
                continue;
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
        report_problems(
            &metrics,
            &mut known_problems,
            std::mem::take(&mut dirty.problems),
        );
        if dirty.all && !node_ips_fixed {
            // The Node object's addresses changed: SNAT address, and the uplinks
            // unless --iface names them.
            let ips = store.node().addresses.clone();
            log::info!("node addresses now {ips:?}");
            let addrs = netlink::addresses().await?;
            let mut r = reconciler.lock().expect("reconciler lock");
            r.maps_mut().set_config(&node_config(&settings, &ips))?;
            if settings.ifaces.is_empty() {
                att.set_uplinks(&mut dp, &mut r, uplinks_holding(&ips, &addrs))?;
            }
        }
        if !store.is_synced() || dirty.is_empty() {
            continue;
        }
        {
            let mut h = metrics.health.lock().expect("health lock");
            h.pending_since.get_or_insert_with(SystemTime::now);
        }
        let t0 = Instant::now();
        let keys: Vec<_> = if dirty.all {
            store.service_keys().cloned().collect()
        } else {
            dirty.services.iter().cloned().collect()
        };
        dirty = Dirty::default();
        let mut changed = BTreeSet::new();
        let mut problems = Vec::new();
        for k in keys {
            let model = store.model(&k);
            if let Some(m) = &model {
                problems.extend(m.problems.iter().cloned());
            }
            let ch = desired.set_service(&k, model);
            changed.extend(ch.ports);
            problems.extend(ch.problems);
        }
        let modelled = t0.elapsed();
        let mut stats = Stats::default();
        {
            let mut r = reconciler.lock().expect("reconciler lock");
            problems.extend(r.apply(&desired, &changed, &mut stats));
            if !adopted {
                r.finish_adoption(&mut stats);
                adopted = true;
                log::info!(
                    "first sync done: {} service ports from {} Services",
                    desired.len(),
                    store.service_count()
                );
                // The first sync's temporaries (changed-port sets, Maglev
                // tables) are gone: give their memory back too.
                release_freed_memory();
            }
            let sizes = *r.sizes();
            let (frontends, backends, ports) = r.occupancy();
            metrics.agent.set_map("services", frontends, sizes.services);
            metrics.agent.set_map("backends", backends, sizes.backends);
            metrics
                .agent
                .set_map("service_ids", ports, sizes.service_ids);
        }
        report_problems(&metrics, &mut known_problems, problems);
        let took = t0.elapsed();
        metrics.agent.syncs.inc();
        metrics.agent.sync_duration.observe(took.as_secs_f64());
        metrics
            .agent
            .maglev_entries_written
            .inc_by(stats.maglev_entries_written as u64);
        if let Some(p) = pending_since.take() {
            metrics
                .agent
                .event_to_map
                .observe(p.elapsed().as_secs_f64());
        }
        {
            let mut h = metrics.health.lock().expect("health lock");
            h.last_synced = Some(SystemTime::now());
            h.pending_since = None;
        }
        log::debug!(
            "sync: {} ports changed in {took:?} (model {modelled:?}, maps {:?}): {stats:?}",
            changed.len(),
            took - modelled
        );
        if server.is_finished() {
            // Say why (an address in use, or not assignable in this namespace).
            return match server.await {
                Ok(Err(e)) => Err(e.context("the metrics/healthz server stopped")),
                Ok(Ok(())) => bail!("the metrics/healthz server stopped"),
                Err(e) => Err(anyhow::Error::new(e).context("the metrics/healthz server failed")),
            };
        }
    }
    log::info!("stopping; the datapath stays attached and serving (`lb-agent cleanup` removes it)");
    Ok(())
}

/// How often conntrack entries are counted (a walk over the whole map).
const CONNTRACK_COUNT_EVERY: std::time::Duration = std::time::Duration::from_secs(15);

/// Publishes the number of conntrack entries, counted now and then on a thread
/// of its own through a second handle to the pinned map, so the walk never holds
/// up a sync.
fn count_conntrack(settings: &Settings, metrics: &Arc<Metrics>) {
    let path = settings.pin_path.join(lb_common::map_names::CONNTRACK);
    let capacity = settings.sizes.conntrack;
    let metrics = metrics.clone();
    std::thread::spawn(move || {
        let map = match aya::maps::MapData::from_pin(&path)
            .map_err(anyhow::Error::from)
            .and_then(|d| {
                Ok(aya::maps::HashMap::<
                    _,
                    lb_common::FlowKey,
                    lb_common::CtEntry,
                >::try_from(aya::maps::Map::from_map_data(
                    d,
                )?)?)
            }) {
            Ok(m) => m,
            Err(e) => {
                log::warn!("cannot count conntrack entries: {e:#}");
                return;
            }
        };
        loop {
            // Bounded by the map's capacity even if entries churn during the walk.
            let n = map
                .keys()
                .take(capacity as usize)
                .filter(Result::is_ok)
                .count();
            metrics.agent.set_map("conntrack", n, capacity);
            std::thread::sleep(CONNTRACK_COUNT_EVERY);
        }
    });
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
