//! Kubernetes mode: cluster state from the API server.
//!
//! Three watchers (kube-runtime's `watcher`, with its default backoff):
//!
//! - Services, except those another proxy implements
//!   (`service.kubernetes.io/service-proxy-name`) and headless ones
//!   (`service.kubernetes.io/headless`), as kube-proxy selects them;
//! - EndpointSlices, except those of headless Services (all nodes' endpoints:
//!   the model picks what this node needs);
//! - this node's Node object, whose InternalIP and ExternalIP addresses are the
//!   addresses NodePorts answer on.
//!
//! Events: after the first complete listing of both Services and EndpointSlices
//! one [`SourceEvent::Resync`]; after that `ServiceApplied` / `ServiceDeleted` /
//! `SliceApplied` / `SliceDeleted` for each watch event, and a new `Resync` (with
//! both kinds: the other kind from the local store) whenever a watcher has
//! listed again (after a `410 Gone` or a lost connection), so that objects deleted
//! while it was not watching disappear. `NodeAddresses` when this node's
//! addresses change. Watch errors are logged and retried with backoff; they never
//! end [`run`].
//!
//! Contact with the API server: the source starts without it; every failed list
//! or watch sends [`SourceEvent::Disconnected`] (with the time contact was lost),
//! and the first listing or watch event after that [`SourceEvent::Connected`].
//! A watch that resumes after an outage says nothing until an object changes,
//! so while out of contact the source also asks the API server for its version
//! every few seconds; an answer counts as contact, and after an outage of a
//! few seconds or more the watchers start afresh (each lists at once) instead
//! of waiting out their backoff.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    time::{Duration, SystemTime},
};

use anyhow::{Result, bail};
use futures::{FutureExt as _, StreamExt, future::BoxFuture, stream::BoxStream};
use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client,
    runtime::{
        WatchStreamExt,
        watcher::{self, Event, watcher},
    },
};
use tokio::sync::mpsc;

use crate::{cluster::ObjectKey, model::Slice, source::SourceEvent};

/// The Services lb implements (the same selection as kube-proxy's).
pub const SERVICE_LABEL_SELECTOR: &str =
    "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless";
/// The EndpointSlices lb reads.
pub const SLICE_LABEL_SELECTOR: &str = "!service.kubernetes.io/headless";

/// How often the source asks whether the API server answers while it has no
/// contact (the watchers retry on their own backoff, up to 30 s apart, and a
/// watch that resumes says nothing until an object changes).
const PROBE_EVERY: Duration = Duration::from_secs(2);
/// An outage at least this long ends with fresh watchers (a relist) rather
/// than the watchers' own retries.
const RELIST_AFTER: Duration = Duration::from_secs(3);
/// How long a probe waits for the answer.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Watches Services, EndpointSlices and the Node `node_name` and sends what
/// changes to `tx` (see the module documentation), until `tx` is closed.
pub async fn run(client: Client, node_name: String, tx: mpsc::Sender<SourceEvent>) -> Result<()> {
    let mut w = Watchers::new(&client, &node_name);
    let mut state = State::new(node_name);
    let mut probe_every = tokio::time::interval(PROBE_EVERY);
    probe_every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The probe in flight, if any (it runs alongside the watchers).
    let mut probe: Option<BoxFuture<'static, bool>> = None;
    loop {
        // After a real outage the watchers may sleep in their backoff for up
        // to 30 s more, and a watch resumed from before an API server restart
        // only earns a 410 and another backoff: once in contact again (the
        // probe answered, or one watcher got through first), start them
        // afresh, each lists at once (a Resync follows), so changes made
        // meanwhile are in force within seconds. A blip is left to the
        // watchers, which resume without a listing.
        let long_outage = state.contact.is_lost() && state.contact.lost_for() >= RELIST_AFTER;
        let events = tokio::select! {
            () = tx.closed() => return Ok(()),
            Some(update) = w.services.next() => state.services(update),
            Some(update) = w.slices.next() => state.slices(update),
            Some(update) = w.nodes.next() => state.node(update),
            _ = probe_every.tick(), if probe.is_none() && state.contact.is_lost() => {
                probe = Some(api_server_answers(client.clone()).boxed());
                Vec::new()
            }
            // (Only polled while a probe is in flight.)
            answered = async { probe.as_mut().expect("a probe in flight").await }, if probe.is_some() => {
                probe = None;
                if answered {
                    state.contact.heard()
                } else {
                    Vec::new()
                }
            }
            // The watchers retry forever; this does not happen.
            else => bail!("the Kubernetes watch streams ended"),
        };
        if long_outage && !state.contact.is_lost() {
            log::info!("the API server answers again: listing afresh");
            w = Watchers::new(&client, &state.node_name);
        }
        for event in events {
            if tx.send(event).await.is_err() {
                return Ok(());
            }
        }
    }
}

/// The three watch streams.
struct Watchers {
    services: BoxStream<'static, Result<Event<Service>, watcher::Error>>,
    slices: BoxStream<'static, Result<Event<EndpointSlice>, watcher::Error>>,
    nodes: BoxStream<'static, Result<Event<Node>, watcher::Error>>,
}

impl Watchers {
    /// New watchers: each starts with a listing.
    fn new(client: &Client, node_name: &str) -> Self {
        Self {
            services: watcher(
                Api::<Service>::all(client.clone()),
                watcher::Config::default().labels(SERVICE_LABEL_SELECTOR),
            )
            .default_backoff()
            .boxed(),
            slices: watcher(
                Api::<EndpointSlice>::all(client.clone()),
                watcher::Config::default().labels(SLICE_LABEL_SELECTOR),
            )
            .default_backoff()
            .boxed(),
            nodes: watcher(
                Api::<Node>::all(client.clone()),
                watcher::Config::default().fields(&format!("metadata.name={node_name}")),
            )
            .default_backoff()
            .boxed(),
        }
    }
}

/// Whether the API server answers `GET /version` (which every client may read;
/// whether the agent may list and watch, the watchers find out for themselves).
async fn api_server_answers(client: Client) -> bool {
    matches!(
        tokio::time::timeout(PROBE_TIMEOUT, client.apiserver_version()).await,
        Ok(Ok(_))
    )
}

/// Whether the source is in contact with the API server, as far as it can tell:
/// a failed list or watch loses contact; a listing, a watch event or an answer
/// to a probe restores it.
#[derive(Debug)]
struct Contact {
    /// When contact was lost, or when the source started if it had none yet
    /// (None: in contact).
    lost_since: Option<SystemTime>,
}

/// No contact yet, since now (the source's start).
impl Default for Contact {
    fn default() -> Self {
        Self {
            lost_since: Some(SystemTime::now()),
        }
    }
}

impl Contact {
    fn is_lost(&self) -> bool {
        self.lost_since.is_some()
    }

    /// How long contact has been lost (zero while in contact).
    fn lost_for(&self) -> Duration {
        self.lost_since
            .and_then(|t| t.elapsed().ok())
            .unwrap_or_default()
    }

    /// A list or watch failed at `now`.
    fn failed(&mut self, now: SystemTime) -> SourceEvent {
        if self.lost_since.is_none() {
            log::warn!(
                "lost contact with the API server; the datapath keeps serving its last state"
            );
        }
        SourceEvent::Disconnected {
            since: *self.lost_since.get_or_insert(now),
        }
    }

    /// Something came from the API server: `Connected` if there was no contact.
    fn heard(&mut self) -> Vec<SourceEvent> {
        if self.lost_since.take().is_none() {
            return Vec::new();
        }
        log::info!("in contact with the API server");
        vec![SourceEvent::Connected]
    }
}

/// What the source knows: the current objects of both kinds, the listings in
/// progress, the node addresses last sent and the contact with the API server.
/// Turns watcher output into [`SourceEvent`]s.
#[derive(Debug, Default)]
struct State {
    node_name: String,
    contact: Contact,
    services: BTreeMap<ObjectKey, Service>,
    /// Slices in the model's compact form (what the relist needs, at a fifth of
    /// the API objects' memory).
    slices: BTreeMap<ObjectKey, Slice>,
    /// Objects of a listing in progress (between `Init` and `InitDone`).
    service_listing: Option<BTreeMap<ObjectKey, Service>>,
    slice_listing: Option<BTreeMap<ObjectKey, Slice>>,
    node_listing: Option<Option<Node>>,
    services_listed: bool,
    slices_listed: bool,
    node_addresses: Option<Vec<IpAddr>>,
    /// The Node is being deleted or drained (a node starts eligible).
    node_ineligible: bool,
}

impl State {
    fn new(node_name: String) -> Self {
        Self {
            node_name,
            ..Self::default()
        }
    }

    /// Whether both kinds have been listed once (and the first `Resync` sent).
    fn synced(&self) -> bool {
        self.services_listed && self.slices_listed
    }

    /// The events that one update of the Service watcher leads to.
    fn services(&mut self, update: Result<Event<Service>, watcher::Error>) -> Vec<SourceEvent> {
        self.update("Services", update, Self::service_event)
    }

    /// The events that one update of the EndpointSlice watcher leads to.
    fn slices(&mut self, update: Result<Event<EndpointSlice>, watcher::Error>) -> Vec<SourceEvent> {
        self.update("EndpointSlices", update, Self::slice_event)
    }

    /// The events that one update of the Node watcher leads to.
    fn node(&mut self, update: Result<Event<Node>, watcher::Error>) -> Vec<SourceEvent> {
        let what = format!("Node {}", self.node_name);
        self.update(&what, update, Self::node_event)
    }

    /// An event (contact, and what it changes) or an error (no contact; the
    /// watcher retries) of the watcher of `what`.
    fn update<K>(
        &mut self,
        what: &str,
        update: Result<Event<K>, watcher::Error>,
        changes: fn(&mut Self, Event<K>) -> Vec<SourceEvent>,
    ) -> Vec<SourceEvent> {
        match update {
            Ok(event) => {
                // The watcher sends `Init` before it asks for the listing: no
                // sign of contact yet.
                let mut events = match event {
                    Event::Init => Vec::new(),
                    _ => self.contact.heard(),
                };
                events.extend(changes(self, event));
                events
            }
            Err(e) => {
                log::warn!("watching {what}: {e} (retrying)");
                vec![self.contact.failed(SystemTime::now())]
            }
        }
    }

    fn resync(&self) -> SourceEvent {
        SourceEvent::Resync {
            services: self.services.values().cloned().collect(),
            slices: self.slices.values().cloned().collect(),
            problems: Vec::new(),
        }
    }

    /// Before the first `Resync`, changes only go to the store (the `Resync` will
    /// carry them).
    fn when_synced(&self, event: SourceEvent) -> Vec<SourceEvent> {
        if self.synced() {
            vec![event]
        } else {
            Vec::new()
        }
    }

    fn service_event(&mut self, event: Event<Service>) -> Vec<SourceEvent> {
        match event {
            Event::Init => {
                self.service_listing = Some(BTreeMap::new());
                Vec::new()
            }
            Event::InitApply(svc) => {
                self.service_listing
                    .get_or_insert_default()
                    .insert(ObjectKey::of(&svc.metadata), svc);
                Vec::new()
            }
            Event::InitDone => {
                self.services = self.service_listing.take().unwrap_or_default();
                log::info!("listed {} Services", self.services.len());
                self.services_listed = true;
                if self.synced() {
                    vec![self.resync()]
                } else {
                    Vec::new()
                }
            }
            Event::Apply(svc) => {
                self.services
                    .insert(ObjectKey::of(&svc.metadata), svc.clone());
                self.when_synced(SourceEvent::ServiceApplied(Box::new(svc)))
            }
            Event::Delete(svc) => {
                let key = ObjectKey::of(&svc.metadata);
                self.services.remove(&key);
                self.when_synced(SourceEvent::ServiceDeleted(key))
            }
        }
    }

    fn slice_event(&mut self, event: Event<EndpointSlice>) -> Vec<SourceEvent> {
        match event {
            Event::Init => {
                self.slice_listing = Some(BTreeMap::new());
                Vec::new()
            }
            Event::InitApply(slice) => {
                let slice = Slice::from(&slice);
                self.slice_listing
                    .get_or_insert_default()
                    .insert(slice.key.clone(), slice);
                Vec::new()
            }
            Event::InitDone => {
                self.slices = self.slice_listing.take().unwrap_or_default();
                log::info!("listed {} EndpointSlices", self.slices.len());
                self.slices_listed = true;
                if self.synced() {
                    vec![self.resync()]
                } else {
                    Vec::new()
                }
            }
            Event::Apply(slice) => {
                let slice = Slice::from(&slice);
                self.slices.insert(slice.key.clone(), slice.clone());
                self.when_synced(SourceEvent::SliceApplied(Box::new(slice)))
            }
            Event::Delete(slice) => {
                let key = ObjectKey::of(&slice.metadata);
                self.slices.remove(&key);
                self.when_synced(SourceEvent::SliceDeleted(key))
            }
        }
    }

    /// The Node's addresses are sent when they differ from the last ones sent.
    /// A listing without the Node, or its deletion, keeps them: the machine still
    /// has its addresses, and the kubelet registers the Node again.
    fn node_event(&mut self, event: Event<Node>) -> Vec<SourceEvent> {
        let node = match event {
            Event::Init => {
                self.node_listing = Some(None);
                return Vec::new();
            }
            Event::InitApply(node) => {
                self.node_listing = Some(Some(node));
                return Vec::new();
            }
            Event::InitDone => match self.node_listing.take().flatten() {
                Some(node) => node,
                None => {
                    log::warn!(
                        "Node {} not found; its addresses are taken when it appears",
                        self.node_name
                    );
                    return Vec::new();
                }
            },
            Event::Apply(node) => node,
            Event::Delete(_) => {
                log::warn!(
                    "Node {} was deleted; keeping its last addresses",
                    self.node_name
                );
                return self.eligibility(false);
            }
        };
        let mut out = self.eligibility(node_eligible(&node));
        let addresses = node_addresses(&node);
        if self.node_addresses.as_ref() == Some(&addresses) {
            return out;
        }
        log::info!("Node {} addresses: {addresses:?}", self.node_name);
        self.node_addresses = Some(addresses.clone());
        out.push(SourceEvent::NodeAddresses(addresses));
        out
    }

    /// `NodeEligible` when the node's eligibility changes (it starts eligible).
    fn eligibility(&mut self, eligible: bool) -> Vec<SourceEvent> {
        if self.node_ineligible != eligible {
            return Vec::new();
        }
        log::info!(
            "Node {} is {} for external load balancers",
            self.node_name,
            if eligible {
                "eligible again"
            } else {
                "not eligible (being deleted or drained)"
            }
        );
        self.node_ineligible = !eligible;
        vec![SourceEvent::NodeEligible(eligible)]
    }
}

/// The taint the cluster autoscaler puts on a node it is about to remove.
pub const TO_BE_DELETED_TAINT: &str = "ToBeDeletedByClusterAutoscaler";

/// Whether external load balancers should send the node traffic: not while
/// it is being deleted or the autoscaler is draining it (kube-proxy's
/// `nodeEligible`, which its `/healthz` reports).
pub fn node_eligible(node: &Node) -> bool {
    let deleting = node.metadata.deletion_timestamp.is_some();
    let drained = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .is_some_and(|t| t.iter().any(|t| t.key == TO_BE_DELETED_TAINT));
    !deleting && !drained
}

/// A Node's InternalIP and ExternalIP addresses, in its order, without repeats.
pub fn node_addresses(node: &Node) -> Vec<IpAddr> {
    let mut out = Vec::new();
    let listed = node.status.as_ref().and_then(|s| s.addresses.as_ref());
    for a in listed.into_iter().flatten() {
        if a.type_ != "InternalIP" && a.type_ != "ExternalIP" {
            continue;
        }
        match a.address.parse::<IpAddr>() {
            Ok(ip) if !out.contains(&ip) => out.push(ip),
            Ok(_) => {}
            Err(_) => log::warn!(
                "Node address {:?} ({}) is not an IP address; ignored",
                a.address,
                a.type_
            ),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use k8s_openapi::{
        api::core::v1::{NodeAddress, NodeStatus},
        apimachinery::pkg::apis::meta::v1::ObjectMeta,
    };

    use super::*;

    fn svc(name: &str) -> Service {
        Service {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("ns".into()),
                ..ObjectMeta::default()
            },
            ..Service::default()
        }
    }

    fn slice(name: &str) -> EndpointSlice {
        EndpointSlice {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("ns".into()),
                ..ObjectMeta::default()
            },
            ..EndpointSlice::default()
        }
    }

    fn node(addrs: &[(&str, &str)]) -> Node {
        Node {
            metadata: ObjectMeta {
                name: Some("n1".into()),
                ..ObjectMeta::default()
            },
            status: Some(NodeStatus {
                addresses: Some(
                    addrs
                        .iter()
                        .map(|(t, a)| NodeAddress {
                            type_: (*t).into(),
                            address: (*a).into(),
                        })
                        .collect(),
                ),
                ..NodeStatus::default()
            }),
            ..Node::default()
        }
    }

    fn names(event: &SourceEvent) -> (Vec<String>, Vec<String>) {
        let SourceEvent::Resync {
            services, slices, ..
        } = event
        else {
            panic!("not a resync: {event:?}")
        };
        (
            services
                .iter()
                .map(|s| s.metadata.name.clone().unwrap())
                .collect(),
            slices.iter().map(|s| s.key.name.clone()).collect(),
        )
    }

    /// A state that has heard from the API server (so that events carry no
    /// `Connected`).
    fn in_contact() -> State {
        let mut st = State::new("n1".into());
        st.contact.heard();
        st
    }

    fn lost_since(events: &[SourceEvent]) -> SystemTime {
        match events {
            [SourceEvent::Disconnected { since }] => *since,
            _ => panic!("expected one Disconnected: {events:?}"),
        }
    }

    #[test]
    fn contact_is_lost_on_errors_and_restored_by_any_event() {
        fn failure<K>() -> Result<Event<K>, watcher::Error> {
            Err(watcher::Error::NoResourceVersion)
        }
        let mut st = State::new("n1".into());
        let started = SystemTime::now();
        assert!(st.contact.is_lost(), "no contact before anything arrived");
        // A failure before any contact: no contact since the start.
        std::thread::sleep(Duration::from_millis(5));
        let since = lost_since(&st.services(failure()));
        assert!(since <= started, "{since:?} is not the start");
        // `Init` comes before the list request.
        assert!(st.services(Ok(Event::Init)).is_empty());
        assert!(st.contact.is_lost());
        let out = st.services(Ok(Event::InitApply(svc("a"))));
        assert!(matches!(&out[..], [SourceEvent::Connected]), "{out:?}");
        assert!(!st.contact.is_lost());
        // Connected once, not with every event.
        assert!(st.services(Ok(Event::InitDone)).is_empty());

        // Every failure of any watcher says so, with the time contact was lost.
        std::thread::sleep(Duration::from_millis(5));
        let before = SystemTime::now();
        let since = lost_since(&st.slices(failure()));
        assert!(since >= before, "{since:?} is not this outage's");
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(lost_since(&st.node(failure())), since);
        assert_eq!(lost_since(&st.services(failure())), since);
        assert!(st.contact.is_lost());

        // An event of another watcher restores contact, and comes with its own
        // consequences.
        let out = st.node(Ok(Event::Apply(node(&[("InternalIP", "10.0.0.1")]))));
        assert!(
            matches!(
                &out[..],
                [SourceEvent::Connected, SourceEvent::NodeAddresses(_)]
            ),
            "{out:?}"
        );
        assert!(!st.contact.is_lost());
    }

    #[test]
    fn first_resync_waits_for_both_listings_then_relists_replace() {
        let mut st = in_contact();
        assert!(st.services(Ok(Event::Init)).is_empty());
        assert!(st.services(Ok(Event::InitApply(svc("a")))).is_empty());
        assert!(st.services(Ok(Event::InitApply(svc("b")))).is_empty());
        assert!(st.services(Ok(Event::InitDone)).is_empty());
        // Not synced yet: an Apply is stored, not sent.
        assert!(st.services(Ok(Event::Apply(svc("c")))).is_empty());
        assert!(st.slices(Ok(Event::Init)).is_empty());
        assert!(st.slices(Ok(Event::InitApply(slice("a-1")))).is_empty());
        let out = st.slices(Ok(Event::InitDone));
        assert_eq!(out.len(), 1);
        assert_eq!(
            names(&out[0]),
            (vec!["a".into(), "b".into(), "c".into()], vec!["a-1".into()])
        );

        let out = st.services(Ok(Event::Delete(svc("b"))));
        assert!(
            matches!(&out[..], [SourceEvent::ServiceDeleted(k)] if *k == ObjectKey::new("ns", "b"))
        );

        // A relist of slices: only the listed ones remain, services come from the store.
        st.slices(Ok(Event::Init));
        st.slices(Ok(Event::InitApply(slice("c-1"))));
        // Services keep flowing during the slice relist.
        let out = st.services(Ok(Event::Apply(svc("d"))));
        assert!(
            matches!(&out[..], [SourceEvent::ServiceApplied(s)] if s.metadata.name.as_deref() == Some("d"))
        );
        let out = st.slices(Ok(Event::InitDone));
        assert_eq!(
            names(&out[0]),
            (vec!["a".into(), "c".into(), "d".into()], vec!["c-1".into()])
        );
    }

    #[test]
    fn node_addresses_sent_on_change_only() {
        let mut st = in_contact();
        st.node(Ok(Event::Init));
        st.node(Ok(Event::InitApply(node(&[
            ("InternalIP", "10.0.0.1"),
            ("Hostname", "n1"),
            ("ExternalIP", "2001:db8::1"),
            ("InternalIP", "10.0.0.1"),
            ("InternalIP", "bogus"),
        ]))));
        let out = st.node(Ok(Event::InitDone));
        let want: Vec<IpAddr> = vec!["10.0.0.1".parse().unwrap(), "2001:db8::1".parse().unwrap()];
        assert!(
            matches!(&out[..], [SourceEvent::NodeAddresses(a)] if *a == want),
            "{out:?}"
        );
        let same = node(&[("InternalIP", "10.0.0.1"), ("ExternalIP", "2001:db8::1")]);
        assert!(st.node(Ok(Event::Apply(same.clone()))).is_empty());
        // A deleted Node keeps its addresses, but is no longer eligible.
        let out = st.node(Ok(Event::Delete(same)));
        assert!(
            matches!(&out[..], [SourceEvent::NodeEligible(false)]),
            "{out:?}"
        );
        let out = st.node(Ok(Event::Apply(node(&[("InternalIP", "10.0.0.2")]))));
        assert!(
            matches!(&out[..], [SourceEvent::NodeEligible(true), SourceEvent::NodeAddresses(a)] if *a == vec!["10.0.0.2".parse::<IpAddr>().unwrap()]),
            "{out:?}"
        );
    }

    #[test]
    fn a_node_being_deleted_or_drained_is_not_eligible() {
        let mut st = in_contact();
        let mut n = node(&[("InternalIP", "10.0.0.1")]);
        st.node(Ok(Event::Apply(n.clone())));
        let taint = |key: &str| k8s_openapi::api::core::v1::Taint {
            key: key.into(),
            effect: "NoSchedule".into(),
            ..Default::default()
        };
        n.spec = Some(k8s_openapi::api::core::v1::NodeSpec {
            taints: Some(vec![taint("node.kubernetes.io/unschedulable")]),
            ..Default::default()
        });
        assert!(
            st.node(Ok(Event::Apply(n.clone()))).is_empty(),
            "cordoned is still eligible"
        );
        n.spec.as_mut().unwrap().taints = Some(vec![taint(TO_BE_DELETED_TAINT)]);
        let out = st.node(Ok(Event::Apply(n.clone())));
        assert!(
            matches!(&out[..], [SourceEvent::NodeEligible(false)]),
            "{out:?}"
        );
        n.spec = None;
        let out = st.node(Ok(Event::Apply(n.clone())));
        assert!(
            matches!(&out[..], [SourceEvent::NodeEligible(true)]),
            "{out:?}"
        );
        n.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
        ));
        let out = st.node(Ok(Event::Apply(n)));
        assert!(
            matches!(&out[..], [SourceEvent::NodeEligible(false)]),
            "{out:?}"
        );
    }
}
