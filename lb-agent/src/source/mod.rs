//! Where cluster state comes from. Both sources send
//! [`SourceEvent`](crate::cluster::SourceEvent)s into a channel:
//!
//! - [`manifests`]: a directory of Service and EndpointSlice manifests (YAML or
//!   JSON), re-read whole after every change and sent as a full `Resync`.
//! - [`kube`]: the Kubernetes API: watchers on Services, EndpointSlices and this
//!   node's Node object, with a `Resync` after every (re)list and
//!   `Applied`/`Deleted` events in between.
pub mod kube;
pub mod manifests;
