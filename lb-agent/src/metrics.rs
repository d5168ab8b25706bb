//! Prometheus metrics (`/metrics`, text format), and the server for them and the
//! health endpoints ([`crate::health`]).
//!
//! The agent's own metrics live in a prometheus-client registry; the datapath's
//! counters (per service, per backend, per reason) are read from the per-CPU maps
//! on each scrape by a collector, so they are always current, and so is the
//! source's contact, read from the health state.
//!
//! A scrape never takes the reconciler's lock (a sync holds it while it writes
//! the maps, which can take a while with thousands of Services): it reads the
//! counters through map handles of its own ([`CounterMaps`]) and labels them
//! with the reconciler's [`SharedIdNames`], a copy of which it takes under a
//! lock of their own.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex, PoisonError},
    time::{SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result};
use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _, text::encode},
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::{ConstGauge, Gauge},
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

use crate::{
    bpf::CounterMaps,
    health::{self, Health},
    reconcile::SharedIdNames,
};

type Labels = Vec<(String, String)>;

/// The agent's own metrics.
#[derive(Clone)]
pub struct AgentMetrics {
    pub syncs: Counter,
    pub sync_duration: Histogram,
    pub event_to_map: Histogram,
    pub errors: Family<Labels, Counter>,
    pub map_entries: Family<Labels, Gauge>,
    pub map_capacity: Family<Labels, Gauge>,
    pub maglev_entries_written: Counter,
    /// Failed lists and watches of the source.
    pub source_errors: Counter,
    /// 1 while the socket programs serve the node's own clients.
    pub socket_lb: Gauge,
    /// Conntrack entries of UDP flows to removed frontends deleted by the
    /// janitor (`crate::conntrack`).
    pub conntrack_cleared: Counter,
    pub conntrack_expired: Counter,
    /// Conntrack entries the LRU evicted (`crate::conntrack::Pressure`).
    pub conntrack_evicted: Counter,
    /// Verify-and-repair passes run (`crate::repair`).
    pub verify_passes: Counter,
    /// Entries the verify pass found wrong and rewrote, per map.
    pub map_drift: Family<Labels, Counter>,
}

impl AgentMetrics {
    pub fn error(&self, kind: &str) {
        self.errors
            .get_or_create(&vec![("kind".into(), kind.into())])
            .inc();
    }

    pub fn set_map(&self, map: &str, entries: usize, capacity: u32) {
        let l = vec![("map".to_string(), map.to_string())];
        self.map_entries.get_or_create(&l).set(entries as i64);
        self.map_capacity.get_or_create(&l).set(i64::from(capacity));
    }
}

pub struct Metrics {
    registry: Registry,
    pub agent: AgentMetrics,
    pub health: Arc<Mutex<Health>>,
}

impl Metrics {
    /// Metrics whose datapath counters come from `counters`, labelled with
    /// `names`.
    pub fn new(counters: CounterMaps, names: SharedIdNames, health: Health) -> Self {
        let agent = AgentMetrics {
            syncs: Counter::default(),
            sync_duration: Histogram::new(exponential_buckets(0.000_1, 2.0, 18)),
            event_to_map: Histogram::new(exponential_buckets(0.000_1, 2.0, 18)),
            errors: Family::default(),
            map_entries: Family::default(),
            map_capacity: Family::default(),
            maglev_entries_written: Counter::default(),
            source_errors: Counter::default(),
            socket_lb: Gauge::default(),
            conntrack_cleared: Counter::default(),
            conntrack_expired: Counter::default(),
            conntrack_evicted: Counter::default(),
            verify_passes: Counter::default(),
            map_drift: Family::default(),
        };
        let mut registry = Registry::with_prefix("lb");
        registry.register(
            "syncs",
            "Reconcile passes that wrote the maps",
            agent.syncs.clone(),
        );
        registry.register(
            "sync_duration_seconds",
            "Time to compute and write one reconcile pass",
            agent.sync_duration.clone(),
        );
        registry.register(
            "event_to_map_seconds",
            "Latency from a source event's arrival to its map update",
            agent.event_to_map.clone(),
        );
        registry.register(
            "errors",
            "Errors by kind: input problems (parse, missing_cluster_ip, duplicate_frontend, ...), capacity, map writes",
            agent.errors.clone(),
        );
        registry.register(
            "map_entries",
            "Entries the agent keeps in each map",
            agent.map_entries.clone(),
        );
        registry.register(
            "map_capacity",
            "Capacity of each map",
            agent.map_capacity.clone(),
        );
        registry.register(
            "maglev_entries_written",
            "Maglev table entries that changed and were written",
            agent.maglev_entries_written.clone(),
        );
        registry.register(
            "map_verify_passes",
            "Passes that compared the maps with the desired state (every --verify-every, sooner after a failure)",
            agent.verify_passes.clone(),
        );
        registry.register(
            "map_drift_repaired",
            "Map entries found different from the desired state (a failed write, a change by hand) and rewritten, per map",
            agent.map_drift.clone(),
        );
        registry.register(
            "source_errors",
            "Failed lists and watches of the source (Kubernetes: of the API server; each is retried)",
            agent.source_errors.clone(),
        );
        registry.register(
            "socket_lb_attached",
            "1 while socket-level balancing serves the node's own clients (its processes, \
             hostNetwork pods); 0: it is off (--socket-lb=false) or could not attach (see the log)",
            agent.socket_lb.clone(),
        );
        registry.register(
            "conntrack_cleared",
            "Conntrack entries (forward and reply) of UDP flows to removed Service frontends \
             deleted, as kube-proxy clears the UDP conntrack entries of removed Service IPs \
             and ports",
            agent.conntrack_cleared.clone(),
        );
        registry.register(
            "conntrack_expired",
            "Conntrack entries (forward and reply) of idle flows deleted by the agent's \
             sweep: unconfirmed flows (a handshake never completed, a UDP flow never \
             answered) after 5 s, closing ones after 10 s, established TCP after 24 h, \
             answered UDP after 60 s, and reply entries left without their forward entry",
            agent.conntrack_expired.clone(),
        );
        registry.register(
            "conntrack_evicted",
            "Conntrack entries evicted by the LRU because the map was full (counted at each \
             sweep: entries the datapath created, less those deleted and those held). A flow \
             that loses an entry loses its backend or its translation: raise --conntrack-size",
            agent.conntrack_evicted.clone(),
        );
        registry.register_collector(Box::new(DatapathCollector { counters, names }));
        let health = Arc::new(Mutex::new(health));
        registry.register_collector(Box::new(SourceCollector {
            health: health.clone(),
        }));
        Self {
            registry,
            agent,
            health,
        }
    }

    pub fn encode(&self) -> Result<String> {
        let mut out = String::new();
        encode(&mut out, &self.registry).context("encoding metrics")?;
        Ok(out)
    }
}

/// Reads the datapath's counters from the maps at scrape time.
#[derive(Debug)]
struct DatapathCollector {
    counters: CounterMaps,
    names: SharedIdNames,
}

fn counter(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: &[(Labels, u64)],
) -> std::fmt::Result {
    let mut metric = encoder.encode_descriptor(
        name,
        help,
        None,
        prometheus_client::metrics::MetricType::Counter,
    )?;
    for (labels, v) in rows {
        let c = ConstCounter::new(*v);
        c.encode(metric.encode_family(labels)?)?;
    }
    Ok(())
}

impl Collector for DatapathCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let maps = &self.counters;
        let names = self.names.snapshot();
        let mut reasons_packets = Vec::new();
        let mut reasons_bytes = Vec::new();
        if let Ok(counters) = maps.reason_counters() {
            for (reason, c) in counters {
                let verdict = if reason.is_drop() { "drop" } else { "pass" };
                let l: Labels = vec![
                    ("reason".into(), reason.name().into()),
                    ("verdict".into(), verdict.into()),
                ];
                reasons_packets.push((l.clone(), c.packets));
                reasons_bytes.push((l, c.bytes));
            }
        }
        counter(
            &mut encoder,
            "datapath_packets",
            "Packets by datapath reason (every packet counted once)",
            &reasons_packets,
        )?;
        counter(
            &mut encoder,
            "datapath_bytes",
            "Bytes by datapath reason",
            &reasons_bytes,
        )?;

        let mut sp = Vec::new();
        let mut sb = Vec::new();
        for (id, name) in &names.services {
            if let Ok(c) = maps.service_counters(*id) {
                let l: Labels = vec![("service".into(), name.clone())];
                sp.push((l.clone(), c.packets));
                sb.push((l, c.bytes));
            }
        }
        counter(
            &mut encoder,
            "service_packets",
            "Packets translated per Service port (both directions)",
            &sp,
        )?;
        counter(
            &mut encoder,
            "service_bytes",
            "Bytes translated per Service port",
            &sb,
        )?;

        let mut bp = Vec::new();
        let mut bb = Vec::new();
        for (id, addr) in &names.backends {
            if let Ok(c) = maps.backend_counters(*id) {
                let l: Labels = vec![("backend".into(), addr.to_string())];
                bp.push((l.clone(), c.packets));
                bb.push((l, c.bytes));
            }
        }
        counter(
            &mut encoder,
            "backend_packets",
            "Packets translated per backend",
            &bp,
        )?;
        counter(
            &mut encoder,
            "backend_bytes",
            "Bytes translated per backend",
            &bb,
        )?;

        let sock: Vec<(Labels, u64)> = maps
            .sock_counters()
            .unwrap_or_default()
            .into_iter()
            .map(|(e, n)| (vec![("event".into(), e.as_str().into())], n))
            .collect();
        counter(
            &mut encoder,
            "socket_lb_calls",
            "System calls of the node's own clients the socket programs changed: connected \
             and sent (to a backend), refused (no backend), restored (the frontend shown as \
             the peer), origin_lost (not remembered)",
            &sock,
        )?;

        let mut xdp_errors = Vec::new();
        for (_, i) in maps.interfaces() {
            if i.hooks & lb_common::iface::HOOK_XDP == 0 {
                continue;
            }
            for (name, n) in crate::ethtool::xdp_transmit_errors(i.name()).unwrap_or_default() {
                xdp_errors.push((
                    vec![
                        ("interface".into(), i.name().to_string()),
                        ("counter".into(), name),
                    ],
                    n,
                ));
            }
        }
        counter(
            &mut encoder,
            "xdp_transmit_errors",
            "XDP frames the driver of an XDP interface failed to send (its ethtool statistics): \
             counted by the datapath as tx or redirect, lost all the same",
            &xdp_errors,
        )?;

        gauge(
            &mut encoder,
            "service_ports",
            "Service ports programmed",
            names.services.len() as i64,
        )
    }
}

fn gauge<N: prometheus_client::encoding::EncodeGaugeValue>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: N,
) -> std::fmt::Result {
    let g = encoder.encode_descriptor(
        name,
        help,
        None,
        prometheus_client::metrics::MetricType::Gauge,
    )?;
    // Without labels: `name value`, not `name{} value`.
    ConstGauge::new(value).encode(g)
}

/// The source's contact with the API server, from the health state at scrape
/// time.
#[derive(Debug)]
struct SourceCollector {
    health: Arc<Mutex<Health>>,
}

impl Collector for SourceCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let lost_since = self
            .health
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .source_lost_since;
        gauge(
            &mut encoder,
            "source_connected",
            "1 while the source is in contact with the API server (manifest mode: always), \
             0 while its lists and watches fail (the datapath keeps serving its last state)",
            i64::from(lost_since.is_none()),
        )?;
        let contact = lost_since.unwrap_or_else(SystemTime::now);
        gauge(
            &mut encoder,
            "source_last_contact_timestamp_seconds",
            "Unix time the source was last in contact with the API server: the scrape time \
             while in contact (its watches are open), else when contact was lost (or the \
             agent started, if it never had any); now minus this is the outage's length",
            contact
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs_f64(),
        )
    }
}

async fn metrics_handler(State(m): State<Arc<Metrics>>) -> impl IntoResponse {
    match tokio::task::spawn_blocking(move || m.encode()).await {
        Ok(Ok(text)) => (
            StatusCode::OK,
            [("content-type", "text/plain; version=0.0.4; charset=utf-8")],
            text,
        )
            .into_response(),
        Ok(Err(e)) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

/// Serves `/metrics` on `metrics_addr` and the health endpoints (`/healthz`,
/// `/livez`, `/readyz`) on `healthz_addr` (which may be the same address).
pub async fn serve(
    metrics: Arc<Metrics>,
    metrics_addr: SocketAddr,
    healthz_addr: SocketAddr,
) -> Result<()> {
    let health_routes = health::routes(metrics.health.clone());
    let metrics_routes = Router::new()
        .route("/metrics", get(metrics_handler))
        .with_state(metrics);
    if metrics_addr == healthz_addr {
        let l = tokio::net::TcpListener::bind(metrics_addr)
            .await
            .with_context(|| format!("binding {metrics_addr}"))?;
        return axum::serve(l, metrics_routes.merge(health_routes))
            .await
            .context("http server");
    }
    let m = tokio::net::TcpListener::bind(metrics_addr)
        .await
        .with_context(|| format!("binding --metrics-addr {metrics_addr}"))?;
    let h = tokio::net::TcpListener::bind(healthz_addr)
        .await
        .with_context(|| format!("binding --healthz-addr {healthz_addr}"))?;
    tokio::try_join!(
        async {
            axum::serve(m, metrics_routes)
                .await
                .context("metrics server")
        },
        async {
            axum::serve(h, health_routes)
                .await
                .context("healthz server")
        },
    )?;
    Ok(())
}
