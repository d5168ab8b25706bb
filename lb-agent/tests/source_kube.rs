//! The Kubernetes source against a fake API server (a `tower_test` mock service
//! behind a real `kube::Client`): lists, watches, relists after `410 Gone`,
//! retries after errors, label selectors, Node addresses, contact with the API
//! server lost and regained.
//!
//! The fake keeps objects per resource with a resource version counter. A list
//! returns the current objects; a watch request is held until the test queues
//! events for that resource, then answered with them (the response ends, and
//! the watcher watches again from the last resource version). `/version`
//! answers as an API server's does. While the fake is down, every request, held
//! watches included, fails as if the connection were refused.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use http::{Request, Response, StatusCode};
use kube::{Client, client::Body};
use lb_agent::{
    cluster::ObjectKey,
    model::Prefix,
    source::{
        SourceEvent,
        kube::{Nodes, SERVICE_LABEL_SELECTOR, SLICE_LABEL_SELECTOR, run},
    },
};
use serde_json::{Value, json};
use tokio::{sync::mpsc, task::JoinHandle, time::timeout};

/// Long enough for a watcher's backoff (0.8 to 1.6 s after a first error).
const WAIT: Duration = Duration::from_secs(5);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Res {
    Services,
    Slices,
    Nodes,
}

impl Res {
    fn of_path(path: &str) -> Option<Self> {
        match path {
            "/api/v1/services" => Some(Self::Services),
            "/apis/discovery.k8s.io/v1/endpointslices" => Some(Self::Slices),
            "/api/v1/nodes" => Some(Self::Nodes),
            _ => None,
        }
    }

    fn list_kind(self) -> &'static str {
        match self {
            Self::Services => "ServiceList",
            Self::Slices => "EndpointSliceList",
            Self::Nodes => "NodeList",
        }
    }

    fn api_version(self) -> &'static str {
        match self {
            Self::Slices => "discovery.k8s.io/v1",
            _ => "v1",
        }
    }
}

/// One request the fake received.
#[derive(Clone, Debug)]
struct Seen {
    at: Instant,
    res: Res,
    watch: bool,
    /// The query string, percent-decoded.
    query: String,
}

#[derive(Default)]
struct Db {
    rv: u64,
    objects: HashMap<Res, BTreeMap<String, Value>>,
    /// Watch events for the next watch request of each resource.
    queued: HashMap<Res, Vec<Value>>,
    fail_lists: HashMap<Res, usize>,
    fail_watches: HashMap<Res, usize>,
    requests: Vec<Seen>,
    /// Every request fails (the API server is unreachable).
    down: bool,
}

#[derive(Clone)]
struct Fake {
    db: Arc<Mutex<Db>>,
    /// Bumped whenever events are queued, to wake held watch requests.
    bell: Arc<tokio::sync::watch::Sender<u64>>,
}

fn key(obj: &Value) -> String {
    let ns = obj["metadata"]["namespace"].as_str().unwrap_or("");
    let name = obj["metadata"]["name"].as_str().expect("object has a name");
    format!("{ns}/{name}")
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code,
    })
}

impl Fake {
    fn new() -> Self {
        let (bell, _) = tokio::sync::watch::channel(0);
        Self {
            db: Arc::default(),
            bell: Arc::new(bell),
        }
    }

    fn ring(&self) {
        self.bell.send_modify(|n| *n += 1);
    }

    /// Creates or replaces an object; a watcher sees ADDED or MODIFIED.
    fn put(&self, res: Res, mut obj: Value) {
        let mut db = self.db.lock().unwrap();
        db.rv += 1;
        obj["metadata"]["resourceVersion"] = json!(db.rv.to_string());
        let k = key(&obj);
        let objects = db.objects.entry(res).or_default();
        let kind = if objects.contains_key(&k) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        objects.insert(k, obj.clone());
        db.queued
            .entry(res)
            .or_default()
            .push(json!({"type": kind, "object": obj}));
        drop(db);
        self.ring();
    }

    /// Deletes an object; a watcher sees DELETED.
    fn delete(&self, res: Res, ns: &str, name: &str) {
        let mut db = self.db.lock().unwrap();
        db.rv += 1;
        let rv = db.rv.to_string();
        let mut obj = db
            .objects
            .entry(res)
            .or_default()
            .remove(&format!("{ns}/{name}"))
            .expect("object exists");
        obj["metadata"]["resourceVersion"] = json!(rv);
        db.queued
            .entry(res)
            .or_default()
            .push(json!({"type": "DELETED", "object": obj}));
        drop(db);
        self.ring();
    }

    /// Deletes an object without telling watchers (as if it happened while the
    /// watch was down).
    fn vanish(&self, res: Res, ns: &str, name: &str) {
        let mut db = self.db.lock().unwrap();
        db.rv += 1;
        db.objects
            .entry(res)
            .or_default()
            .remove(&format!("{ns}/{name}"))
            .expect("object exists");
    }

    /// Ends the current watch of `res` with `410 Gone` (resource version too old).
    fn expire(&self, res: Res) {
        let event =
            json!({"type": "ERROR", "object": status(410, "Expired", "too old resource version")});
        self.db
            .lock()
            .unwrap()
            .queued
            .entry(res)
            .or_default()
            .push(event);
        self.ring();
    }

    /// Takes the API server away (held watches fail at once) or brings it back.
    fn set_down(&self, down: bool) {
        self.db.lock().unwrap().down = down;
        self.ring();
    }

    fn fail_next_lists(&self, res: Res, n: usize) {
        self.db.lock().unwrap().fail_lists.insert(res, n);
    }

    fn fail_next_watches(&self, res: Res, n: usize) {
        self.db.lock().unwrap().fail_watches.insert(res, n);
    }

    fn requests(&self, res: Res, watch: bool) -> Vec<Seen> {
        let db = self.db.lock().unwrap();
        db.requests
            .iter()
            .filter(|r| r.res == res && r.watch == watch)
            .cloned()
            .collect()
    }

    /// Waits until `n` requests of that sort have arrived.
    async fn wait_requests(&self, res: Res, watch: bool, n: usize) -> Vec<Seen> {
        timeout(WAIT, async {
            loop {
                let seen = self.requests(res, watch);
                if seen.len() >= n {
                    return seen;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("no {n} {res:?} requests (watch: {watch}) in {WAIT:?}"))
    }

    /// Answers requests until the client goes away.
    async fn serve(self, mut handle: tower_test::mock::Handle<Request<Body>, Response<Body>>) {
        while let Some((request, send)) = handle.next_request().await {
            let uri = request.uri().clone();
            if self.db.lock().unwrap().down {
                send.send_error(refused());
                continue;
            }
            if uri.path() == "/version" {
                let info = json!({
                    "major": "1", "minor": "34", "gitVersion": "v1.34.0",
                    "gitCommit": "0000000", "gitTreeState": "clean", "buildDate": "2025-08-27T00:00:00Z",
                    "goVersion": "go1.24.6", "compiler": "gc", "platform": "linux/amd64",
                });
                send.send_response(Response::new(Body::from(
                    serde_json::to_vec(&info).unwrap(),
                )));
                continue;
            }
            let Some(res) = Res::of_path(uri.path()) else {
                let body = serde_json::to_vec(&status(404, "NotFound", "no such path")).unwrap();
                send.send_response(
                    Response::builder()
                        .status(404)
                        .body(Body::from(body))
                        .unwrap(),
                );
                continue;
            };
            let query = percent_decode(uri.query().unwrap_or(""));
            let watch = query.split('&').any(|p| p == "watch=true");
            let mut db = self.db.lock().unwrap();
            db.requests.push(Seen {
                at: Instant::now(),
                res,
                watch,
                query,
            });
            let failures = if watch {
                &mut db.fail_watches
            } else {
                &mut db.fail_lists
            };
            if let Some(n) = failures.get_mut(&res).filter(|n| **n > 0) {
                *n -= 1;
                let body =
                    serde_json::to_vec(&status(500, "InternalError", "etcd is having a bad day"))
                        .unwrap();
                send.send_response(
                    Response::builder()
                        .status(StatusCode::INTERNAL_SERVER_ERROR)
                        .body(Body::from(body))
                        .unwrap(),
                );
                continue;
            }
            if !watch {
                let items: Vec<Value> = db
                    .objects
                    .get(&res)
                    .map(|o| o.values().cloned().collect())
                    .unwrap_or_default();
                let list = json!({
                    "kind": res.list_kind(), "apiVersion": res.api_version(),
                    "metadata": {"resourceVersion": db.rv.to_string()},
                    "items": items,
                });
                send.send_response(Response::new(Body::from(
                    serde_json::to_vec(&list).unwrap(),
                )));
                continue;
            }
            drop(db);
            // Hold the watch until there are events for it.
            let fake = self.clone();
            tokio::spawn(async move {
                let mut bell = fake.bell.subscribe();
                loop {
                    bell.borrow_and_update();
                    let events = {
                        let mut db = fake.db.lock().unwrap();
                        if db.down {
                            send.send_error(refused());
                            return;
                        }
                        db.queued.remove(&res).unwrap_or_default()
                    };
                    if !events.is_empty() {
                        let mut body = Vec::new();
                        for e in events {
                            serde_json::to_writer(&mut body, &e).unwrap();
                            body.push(b'\n');
                        }
                        send.send_response(Response::new(Body::from(body)));
                        return;
                    }
                    if bell.changed().await.is_err() {
                        return;
                    }
                }
            });
        }
    }
}

/// What the client sees when the API server is not there.
fn refused() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "connection refused")
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap();
                out.push(u8::from_str_radix(hex, 16).unwrap());
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).unwrap()
}

fn service(ns: &str, name: &str, ip: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": ns, "uid": format!("uid-{name}")},
        "spec": {
            "type": "ClusterIP", "clusterIP": ip, "clusterIPs": [ip],
            "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}],
        },
    })
}

fn slice(ns: &str, name: &str, svc: &str, ip: &str) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": ns, "labels": {"kubernetes.io/service-name": svc}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": [ip], "conditions": {"ready": true}, "nodeName": "n1"}],
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
    })
}

fn node(name: &str, addresses: &[(&str, &str)]) -> Value {
    let addresses: Vec<Value> = addresses
        .iter()
        .map(|(t, a)| json!({"type": t, "address": a}))
        .collect();
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name},
        "status": {"addresses": addresses},
    })
}

struct Running {
    fake: Fake,
    rx: mpsc::Receiver<SourceEvent>,
    agent: JoinHandle<anyhow::Result<()>>,
}

/// Starts `run` against the fake for node "n1", watching its Node only.
fn start(fake: &Fake) -> Running {
    start_watching(fake, Nodes::OwnOnly)
}

fn start_watching(fake: &Fake, nodes: Nodes) -> Running {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    tokio::spawn(fake.clone().serve(handle));
    let client = Client::new(service, "default");
    let (tx, rx) = mpsc::channel(64);
    let agent = tokio::spawn(run(client, "n1".into(), nodes, tx));
    Running {
        fake: fake.clone(),
        rx,
        agent,
    }
}

impl Running {
    async fn next(&mut self) -> SourceEvent {
        timeout(WAIT, self.rx.recv())
            .await
            .expect("an event in time")
            .expect("the source is running")
    }

    /// The next event about Services or EndpointSlices (`NodeAddresses` and
    /// contact with the API server come independently).
    async fn next_cluster_event(&mut self) -> SourceEvent {
        loop {
            let e = self.next().await;
            if !is_independent(&e) {
                return e;
            }
        }
    }

    /// The next `Connected` or `Disconnected`.
    async fn next_contact_event(&mut self) -> SourceEvent {
        loop {
            match self.next().await {
                e @ (SourceEvent::Connected | SourceEvent::Disconnected { .. }) => return e,
                _ => continue,
            }
        }
    }

    async fn next_resync(&mut self) -> (Vec<String>, Vec<String>) {
        match self.next_cluster_event().await {
            SourceEvent::Resync {
                services,
                slices,
                problems,
            } => {
                assert!(problems.is_empty(), "{problems:?}");
                let mut s: Vec<String> = services
                    .iter()
                    .map(|s| ObjectKey::of(&s.metadata).to_string())
                    .collect();
                let mut e: Vec<String> = slices.iter().map(|s| s.key.to_string()).collect();
                s.sort();
                e.sort();
                (s, e)
            }
            e => panic!("expected a Resync, got {e:?}"),
        }
    }

    /// Asserts that no cluster event arrives for a while.
    async fn quiet(&mut self, d: Duration) {
        let deadline = tokio::time::Instant::now() + d;
        while let Ok(event) = tokio::time::timeout_at(deadline, self.rx.recv()).await {
            match event {
                Some(e) if is_independent(&e) => {}
                e => panic!("unexpected event {e:?}"),
            }
        }
    }
}

/// Events that come independently of Service and EndpointSlice changes.
fn is_independent(e: &SourceEvent) -> bool {
    matches!(
        e,
        SourceEvent::NodeAddresses(_)
            | SourceEvent::NodeZone(_)
            | SourceEvent::ClusterCidrs(_)
            | SourceEvent::Connected
            | SourceEvent::Disconnected { .. }
    )
}

fn strs(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn cluster_ip(svc: &k8s_openapi::api::core::v1::Service) -> &str {
    svc.spec.as_ref().unwrap().cluster_ip.as_deref().unwrap()
}

fn seed(fake: &Fake) {
    fake.put(Res::Services, service("web", "a", "10.96.0.10"));
    fake.put(Res::Services, service("web", "b", "10.96.0.11"));
    fake.put(Res::Slices, slice("web", "a-1", "a", "10.244.0.5"));
    fake.put(Res::Slices, slice("web", "b-1", "b", "10.244.0.6"));
    fake.put(Res::Nodes, node("n1", &[("InternalIP", "192.0.2.1")]));
    // Seeding is not an event: the initial list carries it.
    fake.db.lock().unwrap().queued.clear();
}

#[tokio::test]
async fn initial_lists_arrive_as_one_resync_with_the_selectors_sent() {
    let fake = Fake::new();
    seed(&fake);
    let mut r = start(&fake);
    let (services, slices) = r.next_resync().await;
    assert_eq!(services, strs(&["web/a", "web/b"]));
    assert_eq!(slices, strs(&["web/a-1", "web/b-1"]));

    // One list per resource, with the selectors; the watches carry them too.
    for (res, param) in [
        (
            Res::Services,
            format!("labelSelector={SERVICE_LABEL_SELECTOR}"),
        ),
        (Res::Slices, format!("labelSelector={SLICE_LABEL_SELECTOR}")),
        (Res::Nodes, "fieldSelector=metadata.name=n1".to_string()),
    ] {
        let lists = r.fake.requests(res, false);
        assert_eq!(lists.len(), 1, "{res:?}: {lists:?}");
        assert!(
            lists[0].query.split('&').any(|p| p == param),
            "{res:?}: {} lacks {param}",
            lists[0].query
        );
        let watches = r.fake.wait_requests(res, true, 1).await;
        assert!(
            watches[0].query.split('&').any(|p| p == param),
            "{res:?}: {} lacks {param}",
            watches[0].query
        );
    }
    assert_eq!(
        SERVICE_LABEL_SELECTOR,
        "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless"
    );
    assert_eq!(SLICE_LABEL_SELECTOR, "!service.kubernetes.io/headless");
}

#[tokio::test]
async fn watch_events_become_applied_and_deleted() {
    let fake = Fake::new();
    seed(&fake);
    let mut r = start(&fake);
    r.next_resync().await;

    fake.put(Res::Services, service("web", "c", "10.96.0.12"));
    match r.next_cluster_event().await {
        SourceEvent::ServiceApplied(svc) => {
            assert_eq!(ObjectKey::of(&svc.metadata), ObjectKey::new("web", "c"));
            assert_eq!(cluster_ip(&svc), "10.96.0.12");
        }
        e => panic!("expected ServiceApplied, got {e:?}"),
    }
    // MODIFIED
    fake.put(Res::Services, service("web", "a", "10.96.0.99"));
    match r.next_cluster_event().await {
        SourceEvent::ServiceApplied(svc) => {
            assert_eq!(ObjectKey::of(&svc.metadata), ObjectKey::new("web", "a"));
            assert_eq!(cluster_ip(&svc), "10.96.0.99");
        }
        e => panic!("expected ServiceApplied, got {e:?}"),
    }
    fake.delete(Res::Services, "web", "b");
    match r.next_cluster_event().await {
        SourceEvent::ServiceDeleted(k) => assert_eq!(k, ObjectKey::new("web", "b")),
        e => panic!("expected ServiceDeleted, got {e:?}"),
    }
    fake.put(Res::Slices, slice("web", "c-1", "c", "10.244.0.7"));
    match r.next_cluster_event().await {
        SourceEvent::SliceApplied(s) => {
            assert_eq!(s.key, ObjectKey::new("web", "c-1"));
            assert_eq!(
                s.endpoints[0].address,
                lb_agent::model::Address::Ip("10.244.0.7".parse().unwrap())
            );
        }
        e => panic!("expected SliceApplied, got {e:?}"),
    }
    fake.delete(Res::Slices, "web", "a-1");
    match r.next_cluster_event().await {
        SourceEvent::SliceDeleted(k) => assert_eq!(k, ObjectKey::new("web", "a-1")),
        e => panic!("expected SliceDeleted, got {e:?}"),
    }
    r.quiet(Duration::from_millis(300)).await;
    // Watching resumed from the last resource version, with no relist.
    assert_eq!(fake.requests(Res::Services, false).len(), 1);
    assert_eq!(fake.requests(Res::Slices, false).len(), 1);
}

#[tokio::test]
async fn relist_after_gone_drops_objects_deleted_meanwhile() {
    let fake = Fake::new();
    seed(&fake);
    let mut r = start(&fake);
    assert_eq!(r.next_resync().await.0, strs(&["web/a", "web/b"]));
    fake.wait_requests(Res::Services, true, 1).await;

    // Deleted while the watch was (as good as) down, then the watch expires.
    fake.vanish(Res::Services, "web", "b");
    fake.vanish(Res::Slices, "web", "b-1");
    fake.expire(Res::Services);
    let (services, slices) = r.next_resync().await;
    assert_eq!(services, strs(&["web/a"]));
    // The slices were not listed again: the store still has b-1.
    assert_eq!(slices, strs(&["web/a-1", "web/b-1"]));
    assert_eq!(fake.requests(Res::Services, false).len(), 2);

    fake.expire(Res::Slices);
    let (services, slices) = r.next_resync().await;
    assert_eq!(services, strs(&["web/a"]));
    assert_eq!(slices, strs(&["web/a-1"]));

    // And watching goes on after the relists.
    fake.put(Res::Services, service("web", "d", "10.96.0.13"));
    match r.next_cluster_event().await {
        SourceEvent::ServiceApplied(svc) => assert_eq!(svc.metadata.name.as_deref(), Some("d")),
        e => panic!("expected ServiceApplied, got {e:?}"),
    }
}

#[tokio::test]
async fn failed_list_is_retried_after_a_backoff() {
    let fake = Fake::new();
    seed(&fake);
    fake.fail_next_lists(Res::Services, 1);
    let mut r = start(&fake);
    let (services, slices) = r.next_resync().await;
    assert_eq!(services, strs(&["web/a", "web/b"]));
    assert_eq!(slices, strs(&["web/a-1", "web/b-1"]));
    let lists = fake.requests(Res::Services, false);
    assert_eq!(lists.len(), 2, "{lists:?}");
    let gap = lists[1].at - lists[0].at;
    // kube-runtime's default backoff starts at 800 ms (plus jitter).
    assert!(gap >= Duration::from_millis(700), "retried after {gap:?}");
    assert!(!r.agent.is_finished());
}

#[tokio::test]
async fn failed_watch_is_retried_and_events_still_arrive() {
    let fake = Fake::new();
    seed(&fake);
    let mut r = start(&fake);
    r.next_resync().await;
    fake.wait_requests(Res::Services, true, 1).await;

    // The held watch ends with this event; the next watch request fails.
    fake.fail_next_watches(Res::Services, 1);
    fake.put(Res::Services, service("web", "c", "10.96.0.12"));
    assert!(
        matches!(r.next_cluster_event().await, SourceEvent::ServiceApplied(s) if s.metadata.name.as_deref() == Some("c"))
    );
    let watches = fake.wait_requests(Res::Services, true, 3).await;
    let gap = watches[2].at - watches[1].at;
    assert!(gap >= Duration::from_millis(700), "retried after {gap:?}");
    // The retry resumed from the last resource version: no relist, no Resync.
    assert_eq!(fake.requests(Res::Services, false).len(), 1);
    fake.put(Res::Services, service("web", "e", "10.96.0.14"));
    match r.next_cluster_event().await {
        SourceEvent::ServiceApplied(svc) => assert_eq!(svc.metadata.name.as_deref(), Some("e")),
        e => panic!("expected ServiceApplied, got {e:?}"),
    }
    assert!(!r.agent.is_finished());
}

#[tokio::test]
async fn node_addresses_follow_the_node() {
    let fake = Fake::new();
    fake.put(
        Res::Nodes,
        node(
            "n1",
            &[
                ("Hostname", "n1"),
                ("InternalIP", "192.0.2.1"),
                ("ExternalIP", "203.0.113.7"),
                ("InternalIP", "fd00::1"),
                ("InternalDNS", "n1.cluster.local"),
            ],
        ),
    );
    fake.db.lock().unwrap().queued.clear();
    let mut r = start(&fake);
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    let first = loop {
        if let SourceEvent::NodeAddresses(a) = r.next().await {
            break a;
        }
    };
    assert_eq!(
        first,
        vec![ip("192.0.2.1"), ip("203.0.113.7"), ip("fd00::1")]
    );

    fake.put(Res::Nodes, node("n1", &[("InternalIP", "192.0.2.2")]));
    let second = loop {
        if let SourceEvent::NodeAddresses(a) = r.next().await {
            break a;
        }
    };
    assert_eq!(second, vec![ip("192.0.2.2")]);
}

#[tokio::test]
async fn all_nodes_give_the_cluster_cidrs_and_this_one_its_zone() {
    let fake = Fake::new();
    let zoned = |name: &str, zone: &str, cidrs: &[&str]| {
        let mut n = node(name, &[("InternalIP", "192.0.2.1")]);
        n["metadata"]["labels"] = json!({"topology.kubernetes.io/zone": zone});
        n["spec"] = json!({"podCIDR": cidrs[0], "podCIDRs": cidrs});
        n
    };
    fake.put(
        Res::Nodes,
        zoned("n1", "z1", &["10.244.1.0/24", "fd00:244:1::/64"]),
    );
    fake.put(Res::Nodes, zoned("n2", "z2", &["10.244.2.0/24"]));
    // A Node whose CIDR is broken still counts with the others.
    fake.put(Res::Nodes, zoned("n3", "z2", &["10.244.3.0/33"]));
    fake.db.lock().unwrap().queued.clear();
    let mut r = start_watching(&fake, Nodes::All);
    let cidrs =
        |want: &[&str]| -> Vec<Prefix> { want.iter().map(|c| Prefix::parse(c).unwrap()).collect() };
    let (mut zone, mut all) = (None, None);
    while zone.is_none() || all.is_none() {
        match r.next().await {
            SourceEvent::NodeZone(z) => zone = Some(z),
            SourceEvent::ClusterCidrs(c) => all = Some(c),
            _ => {}
        }
    }
    assert_eq!(zone, Some(Some("z1".to_string())));
    assert_eq!(
        all.unwrap(),
        cidrs(&["10.244.1.0/24", "10.244.2.0/24", "fd00:244:1::/64"])
    );
    // Every Node is listed: no field selector.
    let lists = r.fake.requests(Res::Nodes, false);
    assert!(
        !lists[0].query.contains("fieldSelector"),
        "{}",
        lists[0].query
    );

    // Another Node going away takes its CIDR; this one's zone changes.
    r.fake.delete(Res::Nodes, "", "n2");
    let next = loop {
        if let SourceEvent::ClusterCidrs(c) = r.next().await {
            break c;
        }
    };
    assert_eq!(next, cidrs(&["10.244.1.0/24", "fd00:244:1::/64"]));
    r.fake.put(
        Res::Nodes,
        zoned("n1", "z3", &["10.244.1.0/24", "fd00:244:1::/64"]),
    );
    let next = loop {
        match r.next().await {
            SourceEvent::NodeZone(z) => break z,
            SourceEvent::ClusterCidrs(c) => panic!("unchanged CIDRs sent again: {c:?}"),
            _ => {}
        }
    };
    assert_eq!(next.as_deref(), Some("z3"));
}

#[tokio::test]
async fn run_returns_when_the_receiver_is_gone() {
    let fake = Fake::new();
    seed(&fake);
    let mut r = start(&fake);
    r.next_resync().await;
    drop(r.rx);
    let result = timeout(WAIT, r.agent)
        .await
        .expect("run returned")
        .expect("run did not panic");
    assert!(result.is_ok(), "{result:?}");
}

#[tokio::test]
async fn without_an_api_server_at_start_the_source_waits_and_says_so() {
    let fake = Fake::new();
    seed(&fake);
    fake.set_down(true);
    let started = SystemTime::now();
    let mut r = start(&fake);
    // Every failed list says so, with the same time: no contact since the
    // source started.
    let mut since = Vec::new();
    while since.len() < 3 {
        match r.next().await {
            SourceEvent::Disconnected { since: s } => since.push(s),
            e => panic!("an event without an API server: {e:?}"),
        }
    }
    assert!(since[0] >= started, "{since:?}");
    assert!(since.iter().all(|s| *s == since[0]), "{since:?}");
    assert!(!r.agent.is_finished(), "the source gave up");

    fake.set_down(false);
    assert!(matches!(
        r.next_contact_event().await,
        SourceEvent::Connected
    ));
    let (services, slices) = r.next_resync().await;
    assert_eq!(services, strs(&["web/a", "web/b"]));
    assert_eq!(slices, strs(&["web/a-1", "web/b-1"]));
}

/// A seeded API server and a source that has made contact, listed, and holds
/// a watch of every kind.
async fn listed_and_watching() -> (Fake, Running) {
    let fake = Fake::new();
    seed(&fake);
    let mut r = start(&fake);
    // The first contact comes before the first listing.
    assert!(matches!(r.next().await, SourceEvent::Connected));
    r.next_resync().await;
    for res in [Res::Services, Res::Slices, Res::Nodes] {
        fake.wait_requests(res, true, 1).await;
    }
    (fake, r)
}

#[tokio::test]
async fn an_outage_is_reported_and_its_end_seen_without_any_event() {
    let (fake, mut r) = listed_and_watching().await;

    let down = SystemTime::now();
    fake.set_down(true);
    let SourceEvent::Disconnected { since } = r.next_contact_event().await else {
        panic!("expected Disconnected")
    };
    assert!(since >= down, "{since:?} is before the outage");
    // The watchers keep retrying (after their backoff), the time stays.
    match r.next_contact_event().await {
        SourceEvent::Disconnected { since: again } => assert_eq!(again, since),
        e => panic!("expected Disconnected, got {e:?}"),
    }

    // Back: the watches resume from their resource versions and say nothing
    // (no object changes); the source finds out by asking.
    fake.set_down(false);
    let back = Instant::now();
    loop {
        match r.next().await {
            SourceEvent::Connected => break,
            SourceEvent::Disconnected { since: again } => assert_eq!(again, since),
            e => panic!("unexpected event {e:?}"),
        }
    }
    assert!(
        back.elapsed() < WAIT,
        "contact seen after {:?}",
        back.elapsed()
    );
    assert_eq!(fake.requests(Res::Services, false).len(), 1, "relisted");
    assert_eq!(fake.requests(Res::Slices, false).len(), 1, "relisted");
    r.quiet(Duration::from_millis(300)).await;

    // And events flow again.
    fake.put(Res::Services, service("web", "c", "10.96.0.12"));
    match r.next_cluster_event().await {
        SourceEvent::ServiceApplied(svc) => assert_eq!(svc.metadata.name.as_deref(), Some("c")),
        e => panic!("expected ServiceApplied, got {e:?}"),
    }
}

#[tokio::test]
async fn after_a_long_outage_the_source_lists_afresh_at_once() {
    let (fake, mut r) = listed_and_watching().await;
    fake.set_down(true);
    assert!(matches!(
        r.next_contact_event().await,
        SourceEvent::Disconnected { .. }
    ));
    // Longer than a blip: the watchers' backoff has grown meanwhile.
    tokio::time::sleep(Duration::from_secs(4)).await;
    // A change made during the outage (the API server kept it).
    fake.put(Res::Services, service("web", "c", "10.96.0.12"));
    fake.set_down(false);
    let back = Instant::now();
    // The source notices within a probe interval plus a probe's timeout (a
    // probe sent just before the API server came back may hang that long),
    // on a loaded machine a little more.
    const NOTICED_WITHIN: Duration = Duration::from_secs(7);
    // Each kind's listing ends in a Resync (the other kind from the store):
    // the one after the Services' listing has the change.
    loop {
        let left = NOTICED_WITHIN.saturating_sub(back.elapsed());
        let event = timeout(left, r.rx.recv())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "no listing with the change {NOTICED_WITHIN:?} after the API server was back"
                )
            })
            .expect("the source is running");
        match event {
            SourceEvent::Resync { services, .. }
                if services
                    .iter()
                    .any(|s| s.metadata.name.as_deref() == Some("c")) =>
            {
                break;
            }
            SourceEvent::Resync { .. }
            | SourceEvent::Connected
            | SourceEvent::Disconnected { .. }
            // The resumed watch may carry the change first.
            | SourceEvent::ServiceApplied(_) => {}
            e => panic!("unexpected event {e:?}"),
        }
    }
    println!(
        "listed afresh {:?} after the API server was back",
        back.elapsed()
    );
    assert_eq!(fake.requests(Res::Services, false).len(), 2, "one relist");
}
