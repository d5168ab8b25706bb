//! What lb reads of a Node object, in either source: this node's addresses,
//! zone and eligibility, and every Node's pod CIDRs (the cluster CIDRs).

use std::net::IpAddr;

use k8s_openapi::api::core::v1::Node;

use crate::model::Prefix;

/// The Node label that names its zone.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

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

/// A Node's zone: its `topology.kubernetes.io/zone` label (an empty one is none).
pub fn node_zone(node: &Node) -> Option<String> {
    node.metadata
        .labels
        .as_ref()?
        .get(ZONE_LABEL)
        .filter(|z| !z.is_empty())
        .cloned()
}

/// A Node's pod CIDRs (`spec.podCIDRs`, else `spec.podCIDR`), and those that
/// do not parse.
pub fn pod_cidrs(node: &Node) -> (Vec<Prefix>, Vec<String>) {
    let Some(spec) = &node.spec else {
        return Default::default();
    };
    let listed: Vec<&String> = match &spec.pod_cidrs {
        Some(c) if !c.is_empty() => c.iter().collect(),
        _ => spec.pod_cidr.iter().collect(),
    };
    let (mut good, mut bad) = (Vec::new(), Vec::new());
    for c in listed {
        match Prefix::parse(c) {
            Some(p) => good.push(p),
            None => bad.push(c.clone()),
        }
    }
    (good, bad)
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
