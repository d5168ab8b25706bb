//! Where cluster state comes from, and what of it is known. Both sources send
//! [`SourceEvent`]s into a channel; the [`store`] holds what they reported,
//! grouped the way the model reads it.
//!
//! - [`manifests`]: a directory of Service and EndpointSlice manifests (YAML or
//!   JSON), re-read whole after every change and sent as a full `Resync`.
//! - [`kube`]: the Kubernetes API: watchers on Services, EndpointSlices and
//!   Nodes, with a `Resync` after every (re)list and
//!   `Applied`/`Deleted` events in between.
pub mod kube;
pub mod manifests;
pub mod node;
pub mod store;

use std::{net::IpAddr, time::SystemTime};

use k8s_openapi::api::core::v1::Service;

use crate::{
    cluster::{ObjectKey, Problem},
    model::{Prefix, Slice},
};

/// What a source reports.
#[derive(Clone, Debug)]
pub enum SourceEvent {
    /// A Service was created or changed.
    ServiceApplied(Box<Service>),
    ServiceDeleted(ObjectKey),
    /// An EndpointSlice was created or changed (in the model's compact form:
    /// sources convert as objects arrive, so no API object is kept).
    SliceApplied(Box<Slice>),
    SliceDeleted(ObjectKey),
    /// A full (re)list: exactly these objects exist; anything not in it is gone.
    /// `problems` are the inputs that were skipped in this listing (the
    /// manifest source reports unparsable files here).
    Resync {
        services: Vec<Service>,
        slices: Vec<Slice>,
        problems: Vec<Problem>,
    },
    /// This node's addresses changed (Kubernetes mode: the Node object).
    NodeAddresses(Vec<IpAddr>),
    /// This node's zone changed (its Node's `topology.kubernetes.io/zone`
    /// label; None: it has none).
    NodeZone(Option<String>),
    /// The cluster's pod CIDRs changed: every Node's `spec.podCIDRs`, as
    /// listed now (sorted, without repeats; empty: none is known). Only sent
    /// when they are wanted (no `--cluster-cidr`).
    ClusterCidrs(Vec<Prefix>),
    /// Whether this node should get traffic from external load balancers
    /// changed: false while its Node is being deleted or is tainted
    /// `ToBeDeletedByClusterAutoscaler` (kube-proxy's `nodeEligible`).
    NodeEligible(bool),
    /// Input that was skipped, outside a resync (e.g. a watch event that does not
    /// decode).
    Invalid(Problem),
    /// The source has no contact with where its state comes from (Kubernetes:
    /// a list or watch of the API server failed; the source retries). Sent for
    /// every failure; `since` is when contact was lost (or, if there was none
    /// yet, when the source started) and stays until [`SourceEvent::Connected`].
    /// The manifest source never loses contact.
    Disconnected {
        since: SystemTime,
    },
    /// The source is in contact again (Kubernetes: a listing or watch event
    /// arrived, or the API server answered).
    Connected,
}
