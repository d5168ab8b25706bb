//! The objects the sources reported, grouped the way the model reads them, and
//! which Services a change touches.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    net::IpAddr,
};

use k8s_openapi::api::core::v1::Service;

use super::SourceEvent;
use crate::{
    cluster::{NodeInfo, ObjectKey, Problem},
    model::{ServiceModel, Slice, service_model},
};

/// Services whose model may have changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Dirty {
    pub services: BTreeSet<ObjectKey>,
    /// Node facts changed: every Service must be recomputed.
    pub all: bool,
    /// Input problems reported with the event (counted and logged by the caller).
    pub problems: Vec<Problem>,
}

impl Dirty {
    pub fn merge(&mut self, other: Self) {
        self.services.extend(other.services);
        self.all |= other.all;
        self.problems.extend(other.problems);
    }

    pub fn is_empty(&self) -> bool {
        self.services.is_empty() && !self.all
    }
}

#[derive(Default)]
pub struct Store {
    services: HashMap<ObjectKey, Service>,
    /// Slices in the model's compact form, not as the API objects (see `Slice`).
    slices: HashMap<ObjectKey, Slice>,
    /// Service -> its slices (by the service-name label).
    slices_of: HashMap<ObjectKey, BTreeSet<ObjectKey>>,
    node: NodeInfo,
    /// Whether a full listing has arrived (before that the store is partial and
    /// must not be reconciled: a restarted agent would delete everything).
    synced: bool,
}

impl Store {
    pub fn new(node: NodeInfo) -> Self {
        Self {
            node,
            ..Self::default()
        }
    }

    pub fn node(&self) -> &NodeInfo {
        &self.node
    }

    pub fn is_synced(&self) -> bool {
        self.synced
    }

    pub fn service_keys(&self) -> impl Iterator<Item = &ObjectKey> {
        self.services.keys()
    }

    pub fn service_count(&self) -> usize {
        self.services.len()
    }

    /// The model of one Service as the store holds it now (None: no such Service).
    pub fn model(&self, key: &ObjectKey) -> Option<ServiceModel> {
        let svc = self.services.get(key)?;
        let slices: Vec<&Slice> = self
            .slices_of
            .get(key)
            .into_iter()
            .flatten()
            .filter_map(|k| self.slices.get(k))
            .collect();
        Some(service_model(svc, &slices, &self.node))
    }

    pub fn apply(&mut self, event: SourceEvent) -> Dirty {
        let mut dirty = Dirty::default();
        match event {
            SourceEvent::ServiceApplied(svc) => self.put_service(*svc, &mut dirty),
            SourceEvent::ServiceDeleted(key) => {
                if self.services.remove(&key).is_some() {
                    dirty.services.insert(key);
                }
            }
            SourceEvent::SliceApplied(slice) => self.put_slice(*slice, &mut dirty),
            SourceEvent::SliceDeleted(key) => self.remove_slice(&key, &mut dirty),
            SourceEvent::Resync {
                services,
                slices,
                problems,
            } => {
                self.resync(services, slices, &mut dirty);
                dirty.problems = problems;
            }
            SourceEvent::NodeAddresses(addrs) => self.set_node_addresses(addrs, &mut dirty),
            SourceEvent::NodeZone(zone) => {
                if zone != self.node.zone {
                    self.node.zone = zone;
                    dirty.all = true;
                }
            }
            SourceEvent::Invalid(p) => dirty.problems.push(p),
            // Not cluster state: the agent reports them.
            SourceEvent::Disconnected { .. }
            | SourceEvent::Connected
            | SourceEvent::NodeEligible(_)
            | SourceEvent::ClusterCidrs(_) => {}
        }
        dirty
    }

    /// Sets the node's addresses (NodePort frontends depend on them).
    pub fn set_node_addresses(&mut self, mut addrs: Vec<IpAddr>, dirty: &mut Dirty) {
        addrs.sort();
        addrs.dedup();
        if addrs != self.node.addresses {
            self.node.addresses = addrs;
            dirty.all = true;
        }
    }

    fn put_service(&mut self, svc: Service, dirty: &mut Dirty) {
        let key = ObjectKey::of(&svc.metadata);
        if self.services.get(&key) != Some(&svc) {
            self.services.insert(key.clone(), svc);
            dirty.services.insert(key);
        }
    }

    fn put_slice(&mut self, slice: Slice, dirty: &mut Dirty) {
        let key = slice.key.clone();
        if self.slices.get(&key) == Some(&slice) {
            return;
        }
        // A slice may move to another Service if its label changes.
        self.remove_slice(&key, dirty);
        if let Some(svc) = slice.service.clone() {
            self.slices_of
                .entry(svc.clone())
                .or_default()
                .insert(key.clone());
            dirty.services.insert(svc);
        }
        self.slices.insert(key, slice);
    }

    fn remove_slice(&mut self, key: &ObjectKey, dirty: &mut Dirty) {
        let Some(old) = self.slices.remove(key) else {
            return;
        };
        if let Some(svc) = old.service {
            if let Some(set) = self.slices_of.get_mut(&svc) {
                set.remove(key);
                if set.is_empty() {
                    self.slices_of.remove(&svc);
                }
            }
            dirty.services.insert(svc);
        }
    }

    /// Replaces everything with a full listing; only what differs is dirty.
    /// (Objects are taken one at a time from the listing, without a second
    /// collection of them: at 10,000 Services that would be tens of megabytes.)
    fn resync(&mut self, services: Vec<Service>, slices: Vec<Slice>, dirty: &mut Dirty) {
        self.synced = true;
        let listed: HashSet<ObjectKey> = services
            .iter()
            .map(|s| ObjectKey::of(&s.metadata))
            .collect();
        self.services.retain(|k, _| {
            let keep = listed.contains(k);
            if !keep {
                dirty.services.insert(k.clone());
            }
            keep
        });
        drop(listed);
        for s in services {
            self.put_service(s, dirty);
        }
        let listed: HashSet<&ObjectKey> = slices.iter().map(|s| &s.key).collect();
        let gone: Vec<ObjectKey> = self
            .slices
            .keys()
            .filter(|k| !listed.contains(*k))
            .cloned()
            .collect();
        drop(listed);
        for k in gone {
            self.remove_slice(&k, dirty);
        }
        for s in slices {
            self.put_slice(s, dirty);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(ns: &str, name: &str, ip: &str) -> Service {
        serde_yaml_ng::from_str(&format!(
            "metadata: {{namespace: {ns}, name: {name}}}\nspec: {{clusterIP: {ip}, ports: [{{port: 80}}]}}"
        ))
        .unwrap()
    }

    fn slice(ns: &str, name: &str, service: &str, ip: &str) -> Slice {
        let slice: k8s_openapi::api::discovery::v1::EndpointSlice = serde_yaml_ng::from_str(&format!(
            "metadata: {{namespace: {ns}, name: {name}, labels: {{kubernetes.io/service-name: {service}}}}}\n\
             addressType: IPv4\nendpoints: [{{addresses: [\"{ip}\"]}}]\nports: [{{port: 8080}}]"
        ))
        .unwrap();
        Slice::from(&slice)
    }

    fn keys(d: &Dirty) -> Vec<String> {
        d.services.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn events_mark_exactly_the_services_they_touch() {
        let mut s = Store::default();
        let d = s.apply(SourceEvent::ServiceApplied(Box::new(svc(
            "a",
            "web",
            "10.96.0.1",
        ))));
        assert_eq!(keys(&d), ["a/web"]);
        let d = s.apply(SourceEvent::ServiceApplied(Box::new(svc(
            "a",
            "web",
            "10.96.0.1",
        ))));
        assert!(d.is_empty(), "unchanged object: nothing to do");
        let d = s.apply(SourceEvent::SliceApplied(Box::new(slice(
            "a",
            "web-1",
            "web",
            "10.244.0.5",
        ))));
        assert_eq!(keys(&d), ["a/web"]);
        assert_eq!(s.model(&ObjectKey::new("a", "web")).unwrap().ports.len(), 1);
        let d = s.apply(SourceEvent::SliceDeleted(ObjectKey::new("a", "web-1")));
        assert_eq!(keys(&d), ["a/web"]);
        let d = s.apply(SourceEvent::ServiceDeleted(ObjectKey::new("a", "web")));
        assert_eq!(keys(&d), ["a/web"]);
        assert!(s.model(&ObjectKey::new("a", "web")).is_none());
    }

    #[test]
    fn a_resync_removes_what_it_does_not_list_and_marks_only_differences() {
        let mut s = Store::default();
        assert!(!s.is_synced());
        s.apply(SourceEvent::Resync {
            services: vec![svc("a", "one", "10.96.0.1"), svc("a", "two", "10.96.0.2")],
            slices: vec![slice("a", "one-x", "one", "10.244.0.5")],
            problems: vec![],
        });
        assert!(s.is_synced());
        let d = s.apply(SourceEvent::Resync {
            services: vec![svc("a", "one", "10.96.0.1")],
            slices: vec![slice("a", "one-x", "one", "10.244.0.6")],
            problems: vec![],
        });
        assert_eq!(keys(&d), ["a/one", "a/two"]);
        assert_eq!(s.service_count(), 1);
    }

    #[test]
    fn node_address_changes_dirty_everything() {
        let mut s = Store::default();
        let d = s.apply(SourceEvent::NodeAddresses(vec![
            "192.0.2.1".parse().unwrap(),
        ]));
        assert!(d.all);
        let d = s.apply(SourceEvent::NodeAddresses(vec![
            "192.0.2.1".parse().unwrap(),
        ]));
        assert!(!d.all);
    }

    #[test]
    fn node_zone_changes_dirty_everything() {
        let mut s = Store::default();
        assert!(!s.apply(SourceEvent::NodeZone(None)).all);
        assert!(s.apply(SourceEvent::NodeZone(Some("z1".into()))).all);
        assert_eq!(s.node().zone.as_deref(), Some("z1"));
        assert!(!s.apply(SourceEvent::NodeZone(Some("z1".into()))).all);
        assert!(s.apply(SourceEvent::NodeZone(None)).all);
    }

    #[test]
    fn a_slice_relabelled_to_another_service_moves() {
        let mut s = Store::default();
        s.apply(SourceEvent::SliceApplied(Box::new(slice(
            "a",
            "x",
            "one",
            "10.244.0.5",
        ))));
        let d = s.apply(SourceEvent::SliceApplied(Box::new(slice(
            "a",
            "x",
            "two",
            "10.244.0.5",
        ))));
        assert_eq!(keys(&d), ["a/one", "a/two"]);
    }
}
