//! Kubernetes mode: cluster state from the API server.
//!
//! Three watchers (kube-runtime's `watcher`, with its default backoff):
//!
//! - Services, except those another proxy implements
//!   (`service.kubernetes.io/service-proxy-name`) and headless ones
//!   (`service.kubernetes.io/headless`), as kube-proxy selects them;
//! - EndpointSlices, except those of headless Services (all nodes' endpoints:
//!   the model picks what this node needs);
//! - Nodes: this node's Node object, whose InternalIP and ExternalIP addresses
//!   are the addresses NodePorts answer on, whose `topology.kubernetes.io/zone`
//!   label is the zone topology hints are read for, and whose deletion or
//!   autoscaler taint makes it ineligible; and, unless the cluster CIDRs are
//!   given (`--cluster-cidr`), every Node, whose `spec.podCIDRs` together are
//!   the cluster's pod CIDRs (as CNIs such as Flannel and Calico read them).
//!   With `--cluster-cidr` only this node's object is watched: every Node's
//!   status updates are the biggest stream a node agent can subscribe to.
//!
//! Events: after the first complete listing of Services, EndpointSlices and
//! Nodes one [`SourceEvent::Resync`], after this node's facts (so the first
//! sync already knows the node's zone and the cluster CIDRs); after that `ServiceApplied` / `ServiceDeleted` /
//! `SliceApplied` / `SliceDeleted` for each watch event, and a new `Resync` (with
//! both kinds: the other kind from the local store) whenever a watcher has
//! listed again (after a `410 Gone` or a lost connection), so that objects deleted
//! while it was not watching disappear. `NodeAddresses` when this node's
//! addresses change, `NodeZone` when its zone does, `NodeEligible` when its
//! eligibility does, `ClusterCidrs` when the Nodes' pod CIDRs do. Watch errors
//! are logged and retried with backoff; they never end [`run`].
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

use super::node::{node_addresses, node_eligible, node_zone, pod_cidrs};
use crate::{
    cluster::ObjectKey,
    model::{Prefix, Slice},
    source::SourceEvent,
};

/// Which Nodes the source watches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Nodes {
    /// This node's object only (the cluster CIDRs are known otherwise).
    OwnOnly,
    /// Every Node, for their pod CIDRs.
    All,
}

/// The Services lb implements (the same selection as kube-proxy's).
pub const SERVICE_LABEL_SELECTOR: &str =
    "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless";
/// The EndpointSlices lb reads.
pub const SLICE_LABEL_SELECTOR: &str = "!service.kubernetes.io/headless";

/// How often the source asks whether the API server answers while it has no
/// contact (the watchers retry on their own backoff, up to 30 s apart, and a
/// watch that resumes says nothing until an object changes).
const PROBE_EVERY: Duration = Duration::from_secs(2);
/// How often the source asks while in contact. A silent partition (packets
/// dropped, no reset) leaves the watches waiting for events that cannot come
/// until the client's read timeout, five minutes; an unanswered probe says
/// at once that contact is lost, and the relist when it is back replaces the
/// stuck watches.
const CHECK_CONTACT_EVERY: Duration = Duration::from_secs(10);
/// An outage at least this long ends with fresh watchers (a relist) rather
/// than the watchers' own retries.
const RELIST_AFTER: Duration = Duration::from_secs(3);
/// How long a probe waits for the answer.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Watches Services, EndpointSlices and Nodes (`nodes`; the Node `node_name`
/// is this node) and sends what changes to `tx` (see the module
/// documentation), until `tx` is closed.
pub async fn run(
    client: Client,
    node_name: String,
    nodes: Nodes,
    tx: mpsc::Sender<SourceEvent>,
) -> Result<()> {
    let mut w = Watchers::new(&client, &node_name, nodes);
    let mut state = State::new(node_name, nodes);
    let mut probe_every = tokio::time::interval(PROBE_EVERY);
    probe_every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut check_every = tokio::time::interval(CHECK_CONTACT_EVERY);
    check_every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
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
            _ = check_every.tick(), if probe.is_none() && !state.contact.is_lost() => {
                probe = Some(api_server_answers(client.clone()).boxed());
                Vec::new()
            }
            // (Only polled while a probe is in flight.)
            answered = async { probe.as_mut().expect("a probe in flight").await }, if probe.is_some() => {
                probe = None;
                match (answered, state.contact.is_lost()) {
                    (true, _) => state.contact.heard(),
                    (false, false) => vec![state.contact.failed(SystemTime::now())],
                    (false, true) => Vec::new(),
                }
            }
            // The watchers retry forever; this does not happen.
            else => bail!("the Kubernetes watch streams ended"),
        };
        if long_outage && !state.contact.is_lost() {
            log::info!("the API server answers again: listing afresh");
            w = Watchers::new(&client, &state.node_name, nodes);
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
    fn new(client: &Client, node_name: &str, nodes: Nodes) -> Self {
        let node_config = match nodes {
            Nodes::OwnOnly => {
                watcher::Config::default().fields(&format!("metadata.name={node_name}"))
            }
            Nodes::All => watcher::Config::default(),
        };
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
            nodes: watcher(Api::<Node>::all(client.clone()), node_config)
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
    node_listing: Option<NodeListing>,
    services_listed: bool,
    slices_listed: bool,
    nodes_listed: bool,
    node_addresses: Option<Vec<IpAddr>>,
    /// The Node is being deleted or drained (a node starts eligible).
    node_ineligible: bool,
    /// The zone last sent (a node starts without one).
    node_zone: Option<String>,
    /// Whether the Nodes' pod CIDRs are wanted (`Nodes::All`).
    want_pod_cidrs: bool,
    /// Each Node's pod CIDRs.
    pod_cidrs: BTreeMap<String, Vec<Prefix>>,
    /// Their union as last sent.
    cluster_cidrs: Vec<Prefix>,
}

/// A Node listing in progress.
#[derive(Debug, Default)]
struct NodeListing {
    own: Option<Node>,
    pod_cidrs: BTreeMap<String, Vec<Prefix>>,
}

impl State {
    fn new(node_name: String, nodes: Nodes) -> Self {
        Self {
            node_name,
            want_pod_cidrs: nodes == Nodes::All,
            ..Self::default()
        }
    }

    /// Whether all three kinds have been listed once (and the first `Resync`
    /// sent). The Nodes count: a first sync without this node's zone would
    /// widen every topology-narrowed Service until the Node listing came, and
    /// one without the cluster CIDRs would masquerade every client.
    fn synced(&self) -> bool {
        self.services_listed && self.slices_listed && self.nodes_listed
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
        let what = if self.want_pod_cidrs {
            "Nodes".to_owned()
        } else {
            format!("Node {}", self.node_name)
        };
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

    /// Events of the Node watcher: this node's facts (see [`Self::own_node`])
    /// and the cluster's pod CIDRs.
    fn node_event(&mut self, event: Event<Node>) -> Vec<SourceEvent> {
        match event {
            Event::Init => {
                self.node_listing = Some(NodeListing::default());
                Vec::new()
            }
            Event::InitApply(node) => {
                let name = node.metadata.name.clone().unwrap_or_default();
                let cidrs = self.pod_cidrs_of(&node);
                let listing = self.node_listing.get_or_insert_default();
                listing.pod_cidrs.insert(name.clone(), cidrs);
                if name == self.node_name {
                    listing.own = Some(node);
                }
                Vec::new()
            }
            Event::InitDone => {
                let listing = self.node_listing.take().unwrap_or_default();
                self.pod_cidrs = listing.pod_cidrs;
                let mut out = match listing.own {
                    Some(node) => self.own_node(&node),
                    None => {
                        log::warn!(
                            "Node {} not found; its addresses are taken when it appears",
                            self.node_name
                        );
                        Vec::new()
                    }
                };
                out.extend(self.cluster_cidrs_event());
                // The first complete listing of all three, if this one ends
                // it: the Resync after the node's facts. (A relist of Nodes
                // alone needs none: their facts are sent as they change.)
                if !self.synced() {
                    self.nodes_listed = true;
                    if self.synced() {
                        out.push(self.resync());
                    }
                }
                out
            }
            Event::Apply(node) => {
                let name = node.metadata.name.clone().unwrap_or_default();
                let cidrs = self.pod_cidrs_of(&node);
                self.pod_cidrs.insert(name.clone(), cidrs);
                let mut out = if name == self.node_name {
                    self.own_node(&node)
                } else {
                    Vec::new()
                };
                out.extend(self.cluster_cidrs_event());
                out
            }
            Event::Delete(node) => {
                let name = node.metadata.name.clone().unwrap_or_default();
                self.pod_cidrs.remove(&name);
                let mut out = Vec::new();
                if name == self.node_name {
                    log::warn!(
                        "Node {} was deleted; keeping its last addresses",
                        self.node_name
                    );
                    out = self.eligibility(false);
                }
                out.extend(self.cluster_cidrs_event());
                out
            }
        }
    }

    /// This node's eligibility, addresses and zone, each sent when it differs
    /// from the last one sent. Its deletion (see [`Self::node_event`]) keeps
    /// the addresses: the machine still has them, and the kubelet registers
    /// the Node again.
    fn own_node(&mut self, node: &Node) -> Vec<SourceEvent> {
        let mut out = self.eligibility(node_eligible(node));
        let addresses = node_addresses(node);
        if self.node_addresses.as_ref() != Some(&addresses) {
            log::info!("Node {} addresses: {addresses:?}", self.node_name);
            self.node_addresses = Some(addresses.clone());
            out.push(SourceEvent::NodeAddresses(addresses));
        }
        let zone = node_zone(node);
        if zone != self.node_zone {
            log::info!("Node {} zone: {zone:?}", self.node_name);
            self.node_zone.clone_from(&zone);
            out.push(SourceEvent::NodeZone(zone));
        }
        out
    }

    /// A Node's pod CIDRs, those that do not parse logged and left out.
    fn pod_cidrs_of(&self, node: &Node) -> Vec<Prefix> {
        if !self.want_pod_cidrs {
            return Vec::new();
        }
        let (cidrs, bad) = pod_cidrs(node);
        for c in bad {
            log::warn!(
                "Node {}: pod CIDR {c:?} does not parse; left out of the cluster CIDRs",
                node.metadata.name.as_deref().unwrap_or("")
            );
        }
        cidrs
    }

    /// `ClusterCidrs` if the union of the Nodes' pod CIDRs changed (and they
    /// are wanted).
    fn cluster_cidrs_event(&mut self) -> Option<SourceEvent> {
        if !self.want_pod_cidrs {
            return None;
        }
        let mut all: Vec<Prefix> = self.pod_cidrs.values().flatten().copied().collect();
        all.sort();
        all.dedup();
        if all == self.cluster_cidrs {
            return None;
        }
        let listed: Vec<String> = all.iter().map(ToString::to_string).collect();
        log::info!(
            "cluster CIDRs (the Nodes' pod CIDRs): [{}]",
            listed.join(", ")
        );
        self.cluster_cidrs.clone_from(&all);
        Some(SourceEvent::ClusterCidrs(all))
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

#[cfg(test)]
mod tests {
    use k8s_openapi::{
        api::core::v1::{NodeAddress, NodeStatus},
        apimachinery::pkg::apis::meta::v1::ObjectMeta,
    };

    use super::*;
    use crate::source::node::TO_BE_DELETED_TAINT;

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
        let mut st = State::new("n1".into(), Nodes::OwnOnly);
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
        let mut st = State::new("n1".into(), Nodes::OwnOnly);
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

    /// Lists this node's Node (addresses, no zone) and returns the events.
    fn list_node(st: &mut State) -> Vec<SourceEvent> {
        assert!(st.node(Ok(Event::Init)).is_empty());
        assert!(
            st.node(Ok(Event::InitApply(node(&[("InternalIP", "10.0.0.1")]))))
                .is_empty()
        );
        st.node(Ok(Event::InitDone))
    }

    #[test]
    fn first_resync_waits_for_the_node_listing_and_comes_after_the_nodes_facts() {
        let mut st = in_contact();
        for ev in [Event::Init, Event::InitApply(svc("a")), Event::InitDone] {
            assert!(st.services(Ok(ev)).is_empty());
        }
        for ev in [Event::Init, Event::InitApply(slice("a-1")), Event::InitDone] {
            assert!(
                st.slices(Ok(ev)).is_empty(),
                "no Resync before the Nodes are listed"
            );
        }
        let mut zoned = node(&[("InternalIP", "10.0.0.1")]);
        zoned.metadata.labels = Some(BTreeMap::from([(
            crate::source::node::ZONE_LABEL.to_owned(),
            "z1".to_owned(),
        )]));
        st.node(Ok(Event::Init));
        st.node(Ok(Event::InitApply(zoned.clone())));
        let out = st.node(Ok(Event::InitDone));
        assert!(
            matches!(
                &out[..],
                [
                    SourceEvent::NodeAddresses(_),
                    SourceEvent::NodeZone(Some(z)),
                    SourceEvent::Resync { .. }
                ] if z == "z1"
            ),
            "{out:?}"
        );
        // A relist of the Nodes alone sends no Resync.
        st.node(Ok(Event::Init));
        st.node(Ok(Event::InitApply(zoned)));
        let out = st.node(Ok(Event::InitDone));
        assert!(out.is_empty(), "{out:?}");
    }

    #[test]
    fn first_resync_waits_for_all_listings_then_relists_replace() {
        let mut st = in_contact();
        assert!(
            matches!(&list_node(&mut st)[..], [SourceEvent::NodeAddresses(_)]),
            "no Resync before the Services and EndpointSlices are listed"
        );
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
