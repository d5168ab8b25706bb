//! The part of an EndpointSlice the model reads, in a compact form the store
//! keeps instead of the API object.
//!
//! At 10,000 Services × 10 endpoints the store holds 100,000 endpoints. As
//! `k8s_openapi` values each takes about 450 bytes (a 352-byte struct of
//! optional fields, a `Vec` for its addresses and heap strings), as a
//! [`SliceEndpoint`] about 80: that difference was a fifth of the agent's memory.

use std::net::IpAddr;

use k8s_openapi::api::discovery::v1::{Endpoint, EndpointPort, EndpointSlice};
use serde::Serialize;

use crate::cluster::ObjectKey;

/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// An EndpointSlice as the model reads it. (Serialize: the manifest source
/// digests what it read.)
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Slice {
    pub key: ObjectKey,
    /// The Service it belongs to (its [`SERVICE_NAME_LABEL`] label, in its
    /// namespace); `None` without the label.
    pub service: Option<ObjectKey>,
    /// `addressType`: `IPv4`, `IPv6` or `FQDN`.
    pub address_type: Box<str>,
    pub ports: Box<[EndpointPort]>,
    pub endpoints: Box<[SliceEndpoint]>,
}

/// One endpoint: its first address (the only one with defined semantics, and
/// the only one kube-proxy reads), its conditions as given, and its node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SliceEndpoint {
    pub address: Address,
    pub ready: Option<bool>,
    pub serving: Option<bool>,
    pub terminating: Option<bool>,
    pub node_name: Option<Box<str>>,
    /// Its zone and topology hints, when it has any (boxed: most clusters
    /// have one zone and no hints, and the endpoint stays small).
    pub topology: Option<Box<EndpointTopology>>,
}

/// Where an endpoint is, and where the EndpointSlice controller says it
/// should be used (`hints`; kube-proxy reads only these, `zone` is for
/// Services whose slices no controller hints, see the model).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct EndpointTopology {
    /// `zone`.
    pub zone: Option<Box<str>>,
    /// `hints.forZones[].name` (empty: no zone hints).
    pub for_zones: Box<[Box<str>]>,
    /// `hints.forNodes[].name` (empty: no node hints).
    pub for_nodes: Box<[Box<str>]>,
}

impl EndpointTopology {
    fn of(ep: &Endpoint) -> Option<Box<Self>> {
        let hints = ep.hints.as_ref();
        let names = |v: Option<Box<[Box<str>]>>| v.unwrap_or_default();
        let t = Self {
            zone: ep.zone.as_deref().map(Into::into),
            for_zones: names(
                hints
                    .and_then(|h| h.for_zones.as_ref())
                    .map(|z| z.iter().map(|z| z.name.as_str().into()).collect()),
            ),
            for_nodes: names(
                hints
                    .and_then(|h| h.for_nodes.as_ref())
                    .map(|n| n.iter().map(|n| n.name.as_str().into()).collect()),
            ),
        };
        (t != Self::default()).then(|| Box::new(t))
    }
}

/// An endpoint address: parsed when it parses, kept as text (for the problem
/// report) when it does not.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum Address {
    Ip(IpAddr),
    Unparsed(Box<str>),
    Missing,
}

impl From<&EndpointSlice> for Slice {
    fn from(slice: &EndpointSlice) -> Self {
        let key = ObjectKey::of(&slice.metadata);
        let service = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL))
            .map(|name| ObjectKey::new(key.namespace.clone(), name.clone()));
        let endpoints = slice
            .endpoints
            .iter()
            .flatten()
            .map(|ep| {
                let cond = ep.conditions.as_ref();
                SliceEndpoint {
                    address: match ep.addresses.first() {
                        None => Address::Missing,
                        Some(a) => match a.parse() {
                            Ok(ip) => Address::Ip(ip),
                            Err(_) => Address::Unparsed(a.as_str().into()),
                        },
                    },
                    ready: cond.and_then(|c| c.ready),
                    serving: cond.and_then(|c| c.serving),
                    terminating: cond.and_then(|c| c.terminating),
                    node_name: ep.node_name.as_deref().map(Into::into),
                    topology: EndpointTopology::of(ep),
                }
            })
            .collect();
        Self {
            key,
            service,
            address_type: slice.address_type.as_str().into(),
            ports: slice.ports.clone().unwrap_or_default().into(),
            endpoints,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_what_the_model_reads() {
        let slice: EndpointSlice = serde_yaml_ng::from_str(
            r#"
metadata:
  name: web-abc
  namespace: shop
  labels: {kubernetes.io/service-name: web, other: x}
  annotations: {a: b}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints:
- addresses: ["10.244.1.11", "10.244.1.99"]
  conditions: {ready: false, serving: true, terminating: true}
  nodeName: node-a
  zone: z1
  hints: {forZones: [{name: z1}, {name: z2}], forNodes: [{name: node-a}]}
  targetRef: {kind: Pod, name: web-1, namespace: shop}
- addresses: ["10.244.1.300"]
- addresses: []
"#,
        )
        .unwrap();
        let s = Slice::from(&slice);
        assert_eq!(s.key, ObjectKey::new("shop", "web-abc"));
        assert_eq!(s.service, Some(ObjectKey::new("shop", "web")));
        assert_eq!(&*s.address_type, "IPv4");
        assert_eq!(s.ports.len(), 1);
        assert_eq!(s.ports[0].port, Some(8080));
        assert_eq!(
            &*s.endpoints,
            [
                SliceEndpoint {
                    address: Address::Ip("10.244.1.11".parse().unwrap()),
                    ready: Some(false),
                    serving: Some(true),
                    terminating: Some(true),
                    node_name: Some("node-a".into()),
                    topology: Some(Box::new(EndpointTopology {
                        zone: Some("z1".into()),
                        for_zones: ["z1".into(), "z2".into()].into(),
                        for_nodes: ["node-a".into()].into(),
                    })),
                },
                SliceEndpoint {
                    address: Address::Unparsed("10.244.1.300".into()),
                    ready: None,
                    serving: None,
                    terminating: None,
                    node_name: None,
                    topology: None,
                },
                SliceEndpoint {
                    address: Address::Missing,
                    ready: None,
                    serving: None,
                    terminating: None,
                    node_name: None,
                    topology: None,
                },
            ]
        );
    }

    #[test]
    fn a_slice_without_the_label_belongs_to_no_service() {
        let slice: EndpointSlice =
            serde_yaml_ng::from_str("metadata: {name: x}\naddressType: IPv6\n").unwrap();
        let s = Slice::from(&slice);
        assert_eq!(s.service, None);
        assert_eq!(s.key, ObjectKey::new("default", "x"));
        assert!(s.endpoints.is_empty() && s.ports.is_empty());
    }

    #[test]
    fn an_endpoint_is_small() {
        // The point of the type (see the module comment).
        assert!(std::mem::size_of::<SliceEndpoint>() <= 64);
    }
}
