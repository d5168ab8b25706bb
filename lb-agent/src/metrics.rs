//! Prometheus metrics (`/metrics`, text format) and kube-proxy-style `/healthz`.
//!
//! The agent's own metrics live in a prometheus-client registry; the datapath's
//! counters (per service, per backend, per reason) are read from the per-CPU maps
//! on each scrape by a collector, so they are always current.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
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

use crate::reconcile::Reconciler;

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

/// What `/healthz` reports.
#[derive(Debug, Default)]
pub struct Health {
    /// When the maps last matched the sources (None: not yet).
    pub last_synced: Option<SystemTime>,
    /// Changes are waiting since this time (None: nothing pending).
    pub pending_since: Option<SystemTime>,
}

/// A pending change older than this makes `/healthz` answer 503 (kube-proxy's
/// default healthz threshold is twice its sync period; the agent syncs at once).
const UNHEALTHY_AFTER: Duration = Duration::from_secs(60);

pub struct Metrics {
    registry: Registry,
    pub agent: AgentMetrics,
    pub health: Arc<Mutex<Health>>,
}

impl Metrics {
    pub fn new(reconciler: Arc<Mutex<Reconciler>>) -> Self {
        let agent = AgentMetrics {
            syncs: Counter::default(),
            sync_duration: Histogram::new(exponential_buckets(0.000_1, 2.0, 18)),
            event_to_map: Histogram::new(exponential_buckets(0.000_1, 2.0, 18)),
            errors: Family::default(),
            map_entries: Family::default(),
            map_capacity: Family::default(),
            maglev_entries_written: Counter::default(),
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
        registry.register_collector(Box::new(DatapathCollector { reconciler }));
        Self {
            registry,
            agent,
            health: Arc::new(Mutex::new(Health::default())),
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
    reconciler: Arc<Mutex<Reconciler>>,
}

impl std::fmt::Debug for Reconciler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Reconciler")
    }
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
        let Ok(r) = self.reconciler.lock() else {
            return Ok(());
        };
        let maps = r.maps();
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
        for (key, id) in r.service_ids() {
            if let Ok(c) = maps.service_counters(id) {
                let l: Labels = vec![("service".into(), key.to_string())];
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
        for (addr, id) in r.backend_ids() {
            if let Ok(c) = maps.backend_counters(id) {
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

        let (_, _, ports) = r.occupancy();
        let mut g = encoder.encode_descriptor(
            "service_ports",
            "Service ports programmed",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        ConstGauge::new(ports as i64).encode(g.encode_family(&Vec::<(String, String)>::new())?)?;
        Ok(())
    }
}

#[derive(Clone)]
struct AppState {
    metrics: Arc<Metrics>,
}

async fn metrics_handler(State(s): State<AppState>) -> impl IntoResponse {
    let m = s.metrics.clone();
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

fn rfc3339(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs() as i64;
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// kube-proxy's answer: 200 with `lastUpdated`/`currentTime` when the maps are in
/// sync (or changes are fresh), 503 before the first sync or when changes have
/// been pending too long.
async fn healthz_handler(State(s): State<AppState>) -> impl IntoResponse {
    let now = SystemTime::now();
    let (last, pending) = {
        s.metrics
            .health
            .lock()
            .map(|h| (h.last_synced, h.pending_since))
            .unwrap_or_default()
    };
    let healthy = last.is_some()
        && pending.is_none_or(|p| now.duration_since(p).unwrap_or_default() < UNHEALTHY_AFTER);
    let body = format!(
        "{{\"lastUpdated\": \"{}\",\"currentTime\": \"{}\",\"nodeEligible\": true}}",
        last.map(rfc3339).unwrap_or_default(),
        rfc3339(now)
    );
    let code = if healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, [("content-type", "application/json")], body)
}

/// Serves `/metrics` and `/healthz` (on one address, or two).
pub async fn serve(
    metrics: Arc<Metrics>,
    metrics_addr: SocketAddr,
    healthz_addr: SocketAddr,
) -> Result<()> {
    let state = AppState { metrics };
    let both = Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(healthz_handler))
        .with_state(state.clone());
    if metrics_addr == healthz_addr {
        let l = tokio::net::TcpListener::bind(metrics_addr)
            .await
            .with_context(|| format!("binding {metrics_addr}"))?;
        return axum::serve(l, both).await.context("http server");
    }
    let m = tokio::net::TcpListener::bind(metrics_addr)
        .await
        .with_context(|| format!("binding --metrics-addr {metrics_addr}"))?;
    let h = tokio::net::TcpListener::bind(healthz_addr)
        .await
        .with_context(|| format!("binding --healthz-addr {healthz_addr}"))?;
    let metrics_router = Router::new()
        .route("/metrics", get(metrics_handler))
        .with_state(state.clone());
    let health_router = Router::new()
        .route("/healthz", get(healthz_handler))
        .with_state(state);
    tokio::try_join!(
        async {
            axum::serve(m, metrics_router)
                .await
                .context("metrics server")
        },
        async {
            axum::serve(h, health_router)
                .await
                .context("healthz server")
        },
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(1_795_391_537)),
            "2026-11-22T23:52:17Z"
        );
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(951_782_400)),
            "2000-02-29T00:00:00Z"
        );
    }
}
