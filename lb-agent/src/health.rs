//! The agent's health, served on the healthz address:
//!
//! - `/healthz`: kube-proxy's answer (200 once synced, 503 before that or when
//!   changes have waited too long), its JSON body extended with the source's
//!   contact with the API server;
//! - `/livez`: whether the agent's main loop is alive (it stamps a heartbeat
//!   every few seconds). It never depends on the API server: an outage must not
//!   get the agent restarted, since the datapath keeps serving meanwhile and a
//!   restarted agent could do no more;
//! - `/readyz`: whether the maps follow the cluster and the node: synced once,
//!   the source not out of contact, and the link events followed (new pod
//!   interfaces get their program), each allowed a short grace.
//!
//! The verdicts are pure functions of [`Health`] and the time, so that they can
//! be tested without a clock.

use std::{
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use axum::{
    Router,
    extract::State,
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::get,
};

/// A pending change older than this makes `/healthz` answer 503 (kube-proxy's
/// default healthz threshold is twice its sync period; the agent syncs at once).
const UNHEALTHY_AFTER: Duration = Duration::from_secs(60);
/// A heartbeat older than this makes `/livez` answer 503 (the loop stamps one
/// every few seconds, see `agent::HEARTBEAT_EVERY`).
const LIVE_WITHIN: Duration = Duration::from_secs(30);
/// How long the source may be out of contact before `/readyz` answers 503
/// (a watch that breaks and resumes at once is no outage).
const READY_GRACE: Duration = Duration::from_secs(10);

/// What the health endpoints report on.
#[derive(Debug)]
pub struct Health {
    /// When the maps last matched the sources (None: not yet).
    pub last_synced: Option<SystemTime>,
    /// Changes are waiting since this time (None: nothing pending).
    pub pending_since: Option<SystemTime>,
    /// Since when the source has had no contact with the API server (None: it
    /// has; the manifest source always does).
    pub source_lost_since: Option<SystemTime>,
    /// When the agent's main loop last went round (monotonic: a clock step must
    /// not kill the agent).
    pub heartbeat: Instant,
    /// Whether external load balancers should send this node traffic (see
    /// `source::node::node_eligible`); always in manifest mode.
    pub node_eligible: bool,
    /// Since when the link events have not been followed (None: they are):
    /// interfaces created meanwhile get their program only once the
    /// subscription is back and has listed them.
    pub links_lost_since: Option<SystemTime>,
}

/// A probe's answer: fine, or why not.
pub type Verdict = Result<(), String>;

impl Health {
    /// Nothing synced yet, the loop alive at `now`.
    pub fn new(now: Instant, source_lost_since: Option<SystemTime>) -> Self {
        Self {
            last_synced: None,
            pending_since: None,
            source_lost_since,
            heartbeat: now,
            node_eligible: true,
            links_lost_since: None,
        }
    }

    /// kube-proxy's `/healthz` verdict: the node eligible for external load
    /// balancers (a node being deleted or drained answers 503, so that they
    /// take it out before it goes), and [`Self::proxy_healthy`].
    pub fn healthz(&self, now: SystemTime) -> bool {
        self.node_eligible && self.proxy_healthy(now)
    }

    /// Whether the agent is healthy: synced, and no change pending for too
    /// long (what health check node ports report as `serviceProxyHealthy`).
    pub fn proxy_healthy(&self, now: SystemTime) -> bool {
        self.last_synced.is_some()
            && self
                .pending_since
                .is_none_or(|p| elapsed(p, now) < UNHEALTHY_AFTER)
    }

    /// Whether the main loop is alive.
    pub fn live(&self, now: Instant) -> Verdict {
        let age = now.saturating_duration_since(self.heartbeat);
        if age < LIVE_WITHIN {
            Ok(())
        } else {
            Err(format!("the agent loop has not run for {}s", age.as_secs()))
        }
    }

    /// Whether the maps follow the cluster.
    pub fn ready(&self, now: SystemTime) -> Verdict {
        if self.last_synced.is_none() {
            return Err("not synced yet".into());
        }
        if let Some(since) = self.source_lost_since
            && elapsed(since, now) >= READY_GRACE
        {
            return Err(format!(
                "no contact with the API server since {}",
                rfc3339(since)
            ));
        }
        match self.links_lost_since {
            Some(since) if elapsed(since, now) >= READY_GRACE => Err(format!(
                "link events not followed since {}: new interfaces get no program yet",
                rfc3339(since)
            )),
            _ => Ok(()),
        }
    }

    /// `/healthz`'s body: kube-proxy's fields, then the source's contact.
    pub fn healthz_body(&self, now: SystemTime) -> String {
        let lost = match self.source_lost_since {
            Some(since) => format!(",\"sourceDisconnectedSince\": \"{}\"", rfc3339(since)),
            None => String::new(),
        };
        format!(
            "{{\"lastUpdated\": \"{}\",\"currentTime\": \"{}\",\"nodeEligible\": {},\"sourceConnected\": {}{lost}}}",
            self.last_synced.map(rfc3339).unwrap_or_default(),
            rfc3339(now),
            self.node_eligible,
            self.source_lost_since.is_none(),
        )
    }
}

/// Time from `then` to `now` (zero if the clock went back).
fn elapsed(then: SystemTime, now: SystemTime) -> Duration {
    now.duration_since(then).unwrap_or_default()
}

pub fn rfc3339(t: SystemTime) -> String {
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

type Shared = Arc<Mutex<Health>>;

fn status(ok: bool) -> StatusCode {
    if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

/// A plain-text answer: `ok`, or why not.
fn answer(verdict: Verdict) -> Response {
    let code = status(verdict.is_ok());
    (code, verdict.err().unwrap_or_else(|| "ok".into())).into_response()
}

async fn healthz(State(h): State<Shared>) -> Response {
    let now = SystemTime::now();
    let h = h.lock().unwrap_or_else(PoisonError::into_inner);
    (
        status(h.healthz(now)),
        [("content-type", "application/json")],
        h.healthz_body(now),
    )
        .into_response()
}

async fn livez(State(h): State<Shared>) -> Response {
    let h = h.lock().unwrap_or_else(PoisonError::into_inner);
    answer(h.live(Instant::now()))
}

async fn readyz(State(h): State<Shared>) -> Response {
    let h = h.lock().unwrap_or_else(PoisonError::into_inner);
    answer(h.ready(SystemTime::now()))
}

/// `/healthz`, `/livez` and `/readyz`.
pub fn routes(health: Shared) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .with_state(health)
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: Duration = Duration::from_secs(1_795_391_537);

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + T0 + Duration::from_secs(secs)
    }

    fn synced(source_lost_since: Option<SystemTime>) -> Health {
        Health {
            last_synced: Some(at(0)),
            ..Health::new(Instant::now(), source_lost_since)
        }
    }

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(UNIX_EPOCH + T0), "2026-11-22T23:52:17Z");
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(951_782_400)),
            "2000-02-29T00:00:00Z"
        );
    }

    #[test]
    fn healthz_is_kube_proxys_and_ignores_the_source() {
        let mut h = Health::new(Instant::now(), None);
        assert!(!h.healthz(at(0)), "not synced yet");
        h.last_synced = Some(at(0));
        assert!(h.healthz(at(1000)));
        h.pending_since = Some(at(10));
        assert!(h.healthz(at(69)));
        assert!(!h.healthz(at(70)), "a change pending for a minute");
        h.pending_since = None;
        // An outage changes nothing in kube-proxy's answer, only in the body.
        h.source_lost_since = Some(at(5));
        assert!(h.healthz(at(1000)));
        // A node being deleted or drained: 503, and the body says so; the
        // agent itself is still healthy (what health check node ports say).
        h.node_eligible = false;
        assert!(!h.healthz(at(1000)));
        assert!(h.proxy_healthy(at(1000)));
        let body: serde_json::Value = serde_json::from_str(&h.healthz_body(at(1000))).unwrap();
        assert_eq!(body["nodeEligible"], false);
    }

    #[test]
    fn healthz_body_says_whether_the_source_is_in_contact() {
        let h = synced(None);
        assert_eq!(
            h.healthz_body(at(1)),
            "{\"lastUpdated\": \"2026-11-22T23:52:17Z\",\"currentTime\": \"2026-11-22T23:52:18Z\",\
             \"nodeEligible\": true,\"sourceConnected\": true}"
        );
        let h = Health::new(Instant::now(), Some(at(3)));
        let body: serde_json::Value = serde_json::from_str(&h.healthz_body(at(4))).unwrap();
        assert_eq!(body["lastUpdated"], "");
        assert_eq!(body["sourceConnected"], false);
        assert_eq!(body["sourceDisconnectedSince"], "2026-11-22T23:52:20Z");
    }

    #[test]
    fn livez_follows_the_heartbeat_only() {
        let start = Instant::now();
        // Never synced, out of contact for an hour: alive all the same.
        let mut h = Health::new(start, Some(at(0)));
        assert_eq!(h.live(start), Ok(()));
        assert_eq!(h.live(start + Duration::from_secs(29)), Ok(()));
        let stale = h.live(start + Duration::from_secs(31));
        assert!(stale.is_err_and(|why| why.contains("31s")));
        h.heartbeat = start + Duration::from_secs(30);
        assert_eq!(h.live(start + Duration::from_secs(31)), Ok(()));
        // A heartbeat stamped after `now` was read is no panic.
        assert_eq!(h.live(start), Ok(()));
    }

    #[test]
    fn readyz_wants_a_sync_and_contact_within_the_grace() {
        let h = Health::new(Instant::now(), None);
        assert_eq!(h.ready(at(0)), Err("not synced yet".into()));
        assert_eq!(synced(None).ready(at(1000)), Ok(()));
        let h = synced(Some(at(100)));
        assert_eq!(h.ready(at(100)), Ok(()));
        assert_eq!(h.ready(at(109)), Ok(()), "within the grace");
        assert_eq!(
            h.ready(at(110)),
            Err("no contact with the API server since 2026-11-22T23:53:57Z".into())
        );
        // A clock stepped back is no outage.
        assert_eq!(h.ready(at(50)), Ok(()));
    }

    #[test]
    fn readyz_wants_the_link_events_followed_within_the_grace() {
        let mut h = synced(None);
        h.links_lost_since = Some(at(100));
        assert_eq!(h.ready(at(109)), Ok(()), "within the grace");
        assert_eq!(
            h.ready(at(110)),
            Err(
                "link events not followed since 2026-11-22T23:53:57Z: new interfaces get no \
                 program yet"
                    .into()
            )
        );
        // Liveness does not care: a restart would not bring them back sooner.
        assert_eq!(h.live(h.heartbeat), Ok(()));
        h.links_lost_since = None;
        assert_eq!(h.ready(at(110)), Ok(()));
    }
}
