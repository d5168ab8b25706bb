//! kube-proxy's health check node ports. A Service of type LoadBalancer with
//! externalTrafficPolicy Local gets a `healthCheckNodePort`; the external load
//! balancer probes it on every node, and sends traffic only to the nodes that
//! answer 200, the ones with an endpoint of the Service. Without it, a plain
//! L4 check passes on every node, and the nodes without endpoints drop what
//! they are sent. So the agent, as kube-proxy does, runs an HTTP server on each
//! such port, on all the node's addresses, answering
//!
//! ```text
//! {"service":{"namespace":"ns","name":"web"},"localEndpoints":2,"serviceProxyHealthy":true}
//! ```
//!
//! with 200 when the node has local endpoints and the agent is healthy, 503
//! otherwise. Servers open and close as Services come, change and go.

use std::{
    collections::BTreeMap,
    net::{Ipv6Addr, SocketAddr},
    sync::{Arc, Mutex, PoisonError},
};

use anyhow::{Context as _, Result};
use axum::{
    Router,
    extract::State,
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use serde::Serialize;

use crate::cluster::ObjectKey;

/// What one health check node port reports: its Service and how many of the
/// Service's ready endpoints run on this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    pub service: ObjectKey,
    pub local_endpoints: usize,
}

/// Whether the agent itself is healthy (kube-proxy's `serviceProxyHealthy`:
/// synced, nothing pending for long).
pub type ProxyHealthy = Arc<dyn Fn() -> bool + Send + Sync>;

#[derive(Serialize)]
struct Body<'a> {
    service: Name<'a>,
    #[serde(rename = "localEndpoints")]
    local_endpoints: usize,
    #[serde(rename = "serviceProxyHealthy")]
    service_proxy_healthy: bool,
}

#[derive(Serialize)]
struct Name<'a> {
    namespace: &'a str,
    name: &'a str,
}

/// The answer for `check`: 200 with local endpoints and a healthy agent,
/// else 503; the JSON body either way.
pub fn answer(check: &HealthCheck, healthy: bool) -> (StatusCode, String) {
    let body = serde_json::to_string(&Body {
        service: Name {
            namespace: &check.service.namespace,
            name: &check.service.name,
        },
        local_endpoints: check.local_endpoints,
        service_proxy_healthy: healthy,
    })
    .unwrap_or_default();
    let code = if check.local_endpoints > 0 && healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, body)
}

struct Served {
    check: Arc<Mutex<HealthCheck>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Served {
    fn drop(&mut self) {
        // The task owns the listener: aborting it closes the port.
        self.task.abort();
    }
}

/// The running servers, by port.
pub struct HealthCheckServers {
    served: BTreeMap<u16, Served>,
    healthy: ProxyHealthy,
}

impl HealthCheckServers {
    pub fn new(healthy: ProxyHealthy) -> Self {
        Self {
            served: BTreeMap::new(),
            healthy,
        }
    }

    /// The ports served now.
    pub fn ports(&self) -> impl Iterator<Item = u16> + '_ {
        self.served.keys().copied()
    }

    /// Serves exactly `wanted`: closes the ports no longer wanted, updates the
    /// counts of the others, opens the new ones. A port that cannot be opened
    /// (another process holds it) is reported and tried again next time.
    pub fn update(&mut self, wanted: &BTreeMap<u16, HealthCheck>) -> Vec<(u16, String)> {
        self.served.retain(|port, _| wanted.contains_key(port));
        let mut failed = Vec::new();
        for (port, check) in wanted {
            if let Some(s) = self.served.get(port) {
                *s.check.lock().unwrap_or_else(PoisonError::into_inner) = check.clone();
                continue;
            }
            match self.open(*port, check.clone()) {
                Ok(s) => {
                    log::info!("health check node port {port} for {} opened", check.service);
                    self.served.insert(*port, s);
                }
                Err(e) => failed.push((*port, format!("{e:#}"))),
            }
        }
        failed
    }

    fn open(&self, port: u16, check: HealthCheck) -> Result<Served> {
        let listener = listen(port)?;
        let check = Arc::new(Mutex::new(check));
        let state = (check.clone(), self.healthy.clone());
        let app = Router::new().fallback(respond).with_state(state);
        let task = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                log::error!("health check node port {port}: {e}");
            }
        });
        Ok(Served { check, task })
    }
}

type AppState = (Arc<Mutex<HealthCheck>>, ProxyHealthy);

async fn respond(State((check, healthy)): State<AppState>) -> Response {
    let check = check.lock().unwrap_or_else(PoisonError::into_inner).clone();
    let (code, body) = answer(&check, healthy());
    let mut r = (code, body).into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    r
}

/// A listener on `port` of every address of the node, both families (one
/// dual-stack socket; IPv4 only where the node has no IPv6).
fn listen(port: u16) -> Result<tokio::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let open = |v6: bool| -> std::io::Result<Socket> {
        let (domain, addr): (Domain, SocketAddr) = if v6 {
            (Domain::IPV6, (Ipv6Addr::UNSPECIFIED, port).into())
        } else {
            (Domain::IPV4, ([0, 0, 0, 0], port).into())
        };
        let s = Socket::new(domain, Type::STREAM, None)?;
        if v6 {
            s.set_only_v6(false)?;
        }
        s.set_reuse_address(true)?;
        s.set_nonblocking(true)?;
        s.bind(&addr.into())?;
        s.listen(128)?;
        Ok(s)
    };
    let socket = open(true)
        .or_else(|_| open(false))
        .with_context(|| format!("listening on health check node port {port}"))?;
    tokio::net::TcpListener::from_std(socket.into()).context("registering the listener")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_as_kube_proxy_does() {
        let check = HealthCheck {
            service: ObjectKey::new("shop", "web"),
            local_endpoints: 2,
        };
        let (code, body) = answer(&check, true);
        assert_eq!(code, StatusCode::OK);
        assert_eq!(
            body,
            r#"{"service":{"namespace":"shop","name":"web"},"localEndpoints":2,"serviceProxyHealthy":true}"#
        );
        // No local endpoint, or an unhealthy agent: 503, and the body says why.
        let none = HealthCheck {
            local_endpoints: 0,
            ..check.clone()
        };
        assert_eq!(answer(&none, true).0, StatusCode::SERVICE_UNAVAILABLE);
        let (code, body) = answer(&check, false);
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains(r#""serviceProxyHealthy":false"#));
    }
}
