//! All Services' ports, with frontend conflicts between them resolved.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::{Frontend, HealthCheckSpec, PortKey, PortSpec, Scope, ServiceModel};
use crate::cluster::{ObjectKey, Problem, ProblemKind};

/// What one [`Desired::set_service`] call changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// Every port whose effective [`PortSpec`] was added, changed or removed,
    /// including other Services' ports that won or lost a contested frontend.
    pub ports: BTreeSet<PortKey>,
    /// [`ProblemKind::DuplicateFrontend`] for each frontend this Service's ports
    /// claim but do not get.
    pub problems: Vec<Problem>,
}

/// The desired state of every Service port on this node.
///
/// A frontend (address, port, protocol) claimed by several ports belongs to the
/// smallest [`PortKey`] (namespace, name, port name, protocol, family), whatever
/// order the Services arrived in; the others' effective specs omit it, and get
/// it back, in claimant order, when its owner lets it go.
///
/// [`set_service`](Self::set_service) costs in proportion to that Service's
/// ports and frontends (and the ports that share its frontends), not to the
/// whole state.
#[derive(Clone, Debug, Default)]
pub struct Desired {
    /// The ports each Service contributes.
    services: HashMap<ObjectKey, Vec<PortKey>>,
    /// Each port as its Service's model has it: every frontend it claims.
    claimed: HashMap<PortKey, PortSpec>,
    /// Each port with the frontends it does not own removed.
    effective: BTreeMap<PortKey, PortSpec>,
    /// The ports claiming each frontend; the first owns it.
    claims: HashMap<Frontend, BTreeSet<PortKey>>,
    /// The frontends with more than one claimant.
    contested: BTreeSet<Frontend>,
    /// Each Service's health check node port, if it has one.
    health_checks: BTreeMap<ObjectKey, HealthCheckSpec>,
}

impl Desired {
    pub fn new() -> Self {
        Self::default()
    }

    /// Replaces what `service` contributes with `model`'s ports (`None`: the
    /// Service is gone or ignored). The model's problems are not kept: the
    /// caller reports them.
    ///
    /// Every port of `model` must belong to `service`; ports of another
    /// Service, and a second port with the same key, are ignored.
    pub fn set_service(&mut self, service: &ObjectKey, model: Option<ServiceModel>) -> Changes {
        match model.as_ref().and_then(|m| m.health_check) {
            Some(hc) => self.health_checks.insert(service.clone(), hc),
            None => self.health_checks.remove(service),
        };
        let old: Vec<(PortKey, PortSpec)> = self
            .services
            .remove(service)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|key| self.claimed.remove(&key).map(|spec| (key, spec)))
            .collect();
        let mut new: Vec<(PortKey, PortSpec)> = Vec::new();
        for (key, spec) in model.map(|m| m.ports).unwrap_or_default() {
            debug_assert_eq!(&key.service, service, "{key} set as part of {service}");
            if &key.service == service && !new.iter().any(|(k, _)| *k == key) {
                new.push((key, spec));
            }
        }

        // The frontends this call may move, and who owned them before.
        let frontends: BTreeSet<Frontend> = old
            .iter()
            .chain(&new)
            .flat_map(|(_, spec)| spec.frontends.keys().copied())
            .collect();
        let owners_before: Vec<Option<PortKey>> =
            frontends.iter().map(|f| self.owner(f).cloned()).collect();

        for (key, spec) in &old {
            for f in spec.frontends.keys() {
                self.unclaim(f, key);
            }
        }
        for (key, spec) in &new {
            for f in spec.frontends.keys() {
                self.claim(*f, key);
            }
        }

        let mut touched: BTreeSet<PortKey> = old
            .into_iter()
            .map(|(k, _)| k)
            .chain(new.iter().map(|(k, _)| k.clone()))
            .collect();
        for (f, before) in frontends.iter().zip(owners_before) {
            let after = self.owner(f);
            if before.as_ref() != after {
                touched.extend(after.cloned());
                touched.extend(before);
            }
        }

        if !new.is_empty() {
            self.services.insert(
                service.clone(),
                new.iter().map(|(k, _)| k.clone()).collect(),
            );
        }
        for (key, spec) in new {
            self.claimed.insert(key, spec);
        }

        let mut changes = Changes::default();
        for key in touched {
            if self.refresh(&key) {
                changes.ports.insert(key);
            }
        }
        for key in self.services.get(service).into_iter().flatten() {
            for f in self.claimed[key].frontends.keys() {
                if let Some(owner) = self.owner(f)
                    && owner != key
                {
                    changes.problems.push(duplicate(f, owner, key));
                }
            }
        }
        changes
    }

    /// The health check node ports, by port: one per port, the smallest
    /// Service key keeping a port two Services name.
    pub fn health_checks(&self) -> BTreeMap<u16, (&ObjectKey, HealthCheckSpec)> {
        let mut out = BTreeMap::new();
        for (svc, hc) in &self.health_checks {
            out.entry(hc.port).or_insert((svc, *hc));
        }
        out
    }

    /// A port's effective spec.
    pub fn port(&self, key: &PortKey) -> Option<&PortSpec> {
        self.effective.get(key)
    }

    /// Every port's effective spec, in key order.
    pub fn ports(&self) -> impl Iterator<Item = (&PortKey, &PortSpec)> {
        self.effective.iter()
    }

    /// The ports `service` contributes.
    pub fn service_ports(&self, service: &ObjectKey) -> impl Iterator<Item = &PortKey> {
        self.services.get(service).into_iter().flatten()
    }

    /// The port that owns `frontend`, if any claims it.
    pub fn owner(&self, frontend: &Frontend) -> Option<&PortKey> {
        self.claims.get(frontend).and_then(|c| c.first())
    }

    /// Every current conflict: one [`ProblemKind::DuplicateFrontend`] per port
    /// that claims a frontend another port owns (in frontend, then port order).
    pub fn problems(&self) -> Vec<Problem> {
        let mut out = Vec::new();
        for f in &self.contested {
            let mut claimants = self.claims[f].iter();
            let Some(owner) = claimants.next() else {
                continue;
            };
            out.extend(claimants.map(|loser| duplicate(f, owner, loser)));
        }
        out
    }

    /// The number of ports.
    pub fn len(&self) -> usize {
        self.effective.len()
    }

    pub fn is_empty(&self) -> bool {
        self.effective.is_empty()
    }

    fn claim(&mut self, f: Frontend, key: &PortKey) {
        let claimants = self.claims.entry(f).or_default();
        claimants.insert(key.clone());
        if claimants.len() > 1 {
            self.contested.insert(f);
        }
    }

    fn unclaim(&mut self, f: &Frontend, key: &PortKey) {
        if let Some(claimants) = self.claims.get_mut(f) {
            claimants.remove(key);
            if claimants.len() < 2 {
                self.contested.remove(f);
            }
            if claimants.is_empty() {
                self.claims.remove(f);
            }
        }
    }

    /// Recomputes `key`'s effective spec from its claimed one; whether it changed.
    fn refresh(&mut self, key: &PortKey) -> bool {
        let new = self.claimed.get(key).map(|spec| {
            let frontends: BTreeMap<_, _> = spec
                .frontends
                .iter()
                .filter(|(f, _)| self.owner(f) == Some(key))
                .map(|(f, s)| (*f, *s))
                .collect();
            // `local` is there exactly when a frontend that remains needs it.
            let local = frontends
                .values()
                .any(|s| s.scope == Scope::Local)
                .then(|| spec.local.clone())
                .flatten();
            PortSpec {
                frontends,
                cluster: spec.cluster.clone(),
                local,
                draining: spec.draining.clone(),
                affinity_timeout: spec.affinity_timeout,
                source_ranges: spec.source_ranges.clone(),
            }
        });
        if self.effective.get(key) == new.as_ref() {
            return false;
        }
        match new {
            Some(spec) => self.effective.insert(key.clone(), spec),
            None => self.effective.remove(key),
        };
        true
    }
}

fn duplicate(f: &Frontend, owner: &PortKey, loser: &PortKey) -> Problem {
    Problem::new(
        ProblemKind::DuplicateFrontend,
        Some(loser.service.clone()),
        format!("{f} is claimed by {owner} and {loser}; {owner} keeps it"),
    )
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, SocketAddr};

    use super::*;
    use crate::{
        cluster::NodeInfo,
        model::{BackendSpec, Family, FrontendKind, FrontendSpec, Proto, Table, service_model},
    };

    fn obj(name: &str) -> ObjectKey {
        ObjectKey::new("ns", name)
    }

    fn key(service: &str, port: &str) -> PortKey {
        PortKey {
            service: obj(service),
            port_name: port.into(),
            proto: Proto::Tcp,
            family: Family::V4,
        }
    }

    fn fe(addr: &str, port: u16) -> Frontend {
        Frontend {
            addr: addr.parse().unwrap(),
            port,
            proto: Proto::Tcp,
        }
    }

    fn cluster_ip() -> FrontendSpec {
        FrontendSpec {
            kind: FrontendKind::ClusterIp,
            scope: Scope::Cluster,
            snat_remote: false,
        }
    }

    fn spec(frontends: &[Frontend], backend: &str) -> PortSpec {
        PortSpec {
            frontends: frontends.iter().map(|f| (*f, cluster_ip())).collect(),
            cluster: Table {
                backends: BTreeSet::from([BackendSpec {
                    addr: backend.parse().unwrap(),
                    local: false,
                    terminating: false,
                }]),
                terminating_fallback: false,
            },
            local: None,
            draining: BTreeSet::new(),
            affinity_timeout: None,
            source_ranges: None,
        }
    }

    /// A model of Service `ns/name` with ports `(port name, frontends)`.
    fn model(name: &str, ports: &[(&str, &[Frontend])]) -> ServiceModel {
        ServiceModel {
            ports: ports
                .iter()
                .map(|(port, fes)| (key(name, port), spec(fes, "10.0.0.1:8080")))
                .collect(),
            problems: Vec::new(),
            health_check: None,
        }
    }

    fn frontends(d: &Desired, k: &PortKey) -> Vec<Frontend> {
        d.port(k)
            .unwrap_or_else(|| panic!("no port {k}"))
            .frontends
            .keys()
            .copied()
            .collect()
    }

    fn changed(keys: &[PortKey]) -> BTreeSet<PortKey> {
        keys.iter().cloned().collect()
    }

    fn snapshot(d: &Desired) -> Vec<(PortKey, PortSpec)> {
        d.ports().map(|(k, s)| (k.clone(), s.clone())).collect()
    }

    fn permutations<T: Clone>(items: &[T]) -> Vec<Vec<T>> {
        if items.len() <= 1 {
            return vec![items.to_vec()];
        }
        let mut out = Vec::new();
        for i in 0..items.len() {
            let mut rest = items.to_vec();
            let first = rest.remove(i);
            for mut p in permutations(&rest) {
                p.insert(0, first.clone());
                out.push(p);
            }
        }
        out
    }

    const VIP: &str = "10.96.0.1";

    #[test]
    fn conflicts_resolve_the_same_in_any_order() {
        let shared = fe(VIP, 80);
        let models = [
            ("c", model("c", &[("http", &[shared, fe("10.96.0.3", 80)])])),
            ("a", model("a", &[("web", &[shared])])),
            ("b", model("b", &[("http", &[shared, fe("10.96.0.2", 80)])])),
        ];
        let mut results = Vec::new();
        for order in permutations(&models) {
            let mut d = Desired::new();
            for (name, m) in order {
                d.set_service(&obj(name), Some(m));
            }
            results.push((snapshot(&d), d.problems()));
        }
        assert_eq!(results.len(), 6);
        for r in &results[1..] {
            assert_eq!(*r, results[0]);
        }
        let (ports, problems) = &results[0];
        let by_key: BTreeMap<_, _> = ports.iter().cloned().collect();
        assert_eq!(by_key.len(), 3);
        assert_eq!(
            by_key[&key("a", "web")]
                .frontends
                .keys()
                .copied()
                .collect::<Vec<_>>(),
            [shared]
        );
        assert_eq!(
            by_key[&key("b", "http")]
                .frontends
                .keys()
                .copied()
                .collect::<Vec<_>>(),
            [fe("10.96.0.2", 80)]
        );
        assert_eq!(
            by_key[&key("c", "http")]
                .frontends
                .keys()
                .copied()
                .collect::<Vec<_>>(),
            [fe("10.96.0.3", 80)]
        );
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(
            problems
                .iter()
                .all(|p| p.kind == ProblemKind::DuplicateFrontend)
        );
        assert_eq!(problems[0].object, Some(obj("b")));
        assert_eq!(problems[1].object, Some(obj("c")));
        assert!(
            problems[0].message.contains("10.96.0.1:80/TCP"),
            "{}",
            problems[0]
        );
    }

    #[test]
    fn smallest_port_key_wins_in_key_order() {
        // Namespace before name, name before port name, port name before
        // protocol and family.
        let shared = fe(VIP, 80);
        let mut d = Desired::new();
        let z_in_a = ObjectKey::new("a", "z");
        let m = ServiceModel {
            ports: vec![(
                PortKey {
                    service: z_in_a.clone(),
                    ..key("", "http")
                },
                spec(&[shared], "10.0.0.9:80"),
            )],
            problems: Vec::new(),
            health_check: None,
        };
        d.set_service(
            &obj("b"),
            Some(model("b", &[("y", &[shared]), ("x", &[shared])])),
        );
        assert_eq!(d.owner(&shared), Some(&key("b", "x")));
        d.set_service(&z_in_a, Some(m));
        assert_eq!(d.owner(&shared).map(|k| &k.service), Some(&z_in_a));
        assert_eq!(d.problems().len(), 2);
    }

    #[test]
    fn loser_gets_the_frontend_when_the_owner_goes() {
        let shared = fe(VIP, 80);
        let mut d = Desired::new();
        d.set_service(&obj("a"), Some(model("a", &[("http", &[shared])])));
        let c = d.set_service(
            &obj("b"),
            Some(model("b", &[("http", &[shared, fe("10.96.0.2", 80)])])),
        );
        assert_eq!(c.ports, changed(&[key("b", "http")]));
        assert_eq!(c.problems.len(), 1);
        assert_eq!(c.problems[0].kind, ProblemKind::DuplicateFrontend);
        assert_eq!(c.problems[0].object, Some(obj("b")));
        assert_eq!(frontends(&d, &key("b", "http")), [fe("10.96.0.2", 80)]);

        let c = d.set_service(&obj("a"), None);
        assert_eq!(c.ports, changed(&[key("a", "http"), key("b", "http")]));
        assert!(c.problems.is_empty());
        assert_eq!(d.port(&key("a", "http")), None);
        assert_eq!(
            frontends(&d, &key("b", "http")),
            [shared, fe("10.96.0.2", 80)]
        );
        assert!(d.problems().is_empty());
        assert_eq!(d.len(), 1);
    }

    #[test]
    fn owner_dropping_just_the_frontend_hands_it_over() {
        let shared = fe(VIP, 80);
        let mut d = Desired::new();
        d.set_service(
            &obj("a"),
            Some(model("a", &[("http", &[shared, fe("10.96.0.5", 80)])])),
        );
        d.set_service(&obj("b"), Some(model("b", &[("http", &[shared])])));
        assert_eq!(frontends(&d, &key("b", "http")), []);
        let c = d.set_service(
            &obj("a"),
            Some(model("a", &[("http", &[fe("10.96.0.5", 80)])])),
        );
        assert_eq!(c.ports, changed(&[key("a", "http"), key("b", "http")]));
        assert_eq!(frontends(&d, &key("b", "http")), [shared]);
        assert!(d.problems().is_empty());
    }

    #[test]
    fn changes_list_exactly_the_affected_ports() {
        let shared = fe(VIP, 80);
        let mut d = Desired::new();
        // Unrelated services never show up.
        d.set_service(
            &obj("x"),
            Some(model("x", &[("http", &[fe("10.96.9.9", 80)])])),
        );
        let c = d.set_service(
            &obj("m"),
            Some(model("m", &[("http", &[shared]), ("dns", &[fe(VIP, 53)])])),
        );
        assert_eq!(c.ports, changed(&[key("m", "dns"), key("m", "http")]));
        assert!(c.problems.is_empty());

        // The same model again: nothing.
        let c = d.set_service(
            &obj("m"),
            Some(model("m", &[("http", &[shared]), ("dns", &[fe(VIP, 53)])])),
        );
        assert_eq!(c, Changes::default());

        // A larger claimant: only itself changes (it is added, without the frontend).
        let c = d.set_service(&obj("z"), Some(model("z", &[("http", &[shared])])));
        assert_eq!(c.ports, changed(&[key("z", "http")]));
        assert_eq!(c.problems.len(), 1);

        // A smaller claimant takes the frontend from m; z stays a loser, unchanged.
        let c = d.set_service(&obj("a"), Some(model("a", &[("http", &[shared])])));
        assert_eq!(c.ports, changed(&[key("a", "http"), key("m", "http")]));
        assert!(
            c.problems.is_empty(),
            "the winner has no problem: {:?}",
            c.problems
        );
        assert_eq!(frontends(&d, &key("m", "http")), []);
        assert_eq!(frontends(&d, &key("m", "dns")), [fe(VIP, 53)]);
        assert_eq!(d.problems().len(), 2);

        // Only backends change: only that port.
        let mut m2 = model("m", &[("http", &[shared]), ("dns", &[fe(VIP, 53)])]);
        m2.ports[1].1 = spec(&[fe(VIP, 53)], "10.0.0.2:53");
        let c = d.set_service(&obj("m"), Some(m2));
        assert_eq!(c.ports, changed(&[key("m", "dns")]));
        assert_eq!(c.problems.len(), 1, "m:http still loses: {:?}", c.problems);

        // A port removed from a Service: that port.
        let c = d.set_service(&obj("m"), Some(model("m", &[("http", &[shared])])));
        assert_eq!(c.ports, changed(&[key("m", "dns")]));
        assert_eq!(d.port(&key("m", "dns")), None);

        // The owner goes: the next claimant (m, not z) gets it.
        let c = d.set_service(&obj("a"), None);
        assert_eq!(c.ports, changed(&[key("a", "http"), key("m", "http")]));
        assert_eq!(d.owner(&shared), Some(&key("m", "http")));
        assert_eq!(frontends(&d, &key("z", "http")), []);
    }

    #[test]
    fn deletion_removes_the_ports() {
        let mut d = Desired::new();
        d.set_service(
            &obj("a"),
            Some(model(
                "a",
                &[("http", &[fe(VIP, 80)]), ("https", &[fe(VIP, 443)])],
            )),
        );
        d.set_service(
            &obj("b"),
            Some(model("b", &[("http", &[fe("10.96.0.2", 80)])])),
        );
        assert_eq!(d.len(), 3);
        assert_eq!(d.service_ports(&obj("a")).count(), 2);

        let c = d.set_service(&obj("a"), None);
        assert_eq!(c.ports, changed(&[key("a", "http"), key("a", "https")]));
        assert_eq!(d.len(), 1);
        assert_eq!(d.service_ports(&obj("a")).count(), 0);
        assert_eq!(d.owner(&fe(VIP, 80)), None);
        assert_eq!(
            d.ports().map(|(k, _)| k.clone()).collect::<Vec<_>>(),
            [key("b", "http")]
        );

        // Deleting what is not there changes nothing; an empty model is a deletion.
        assert_eq!(d.set_service(&obj("a"), None), Changes::default());
        let c = d.set_service(&obj("b"), Some(ServiceModel::default()));
        assert_eq!(c.ports, changed(&[key("b", "http")]));
        assert!(d.is_empty());
        assert!(d.claims.is_empty() && d.contested.is_empty() && d.services.is_empty());
    }

    #[test]
    fn losing_the_only_local_frontend_drops_the_local_table() {
        let shared = fe(VIP, 30080);
        let mut local = spec(&[shared, fe("10.96.0.2", 80)], "10.0.0.1:8080");
        local.frontends.insert(
            shared,
            FrontendSpec {
                kind: FrontendKind::NodePort,
                scope: Scope::Local,
                snat_remote: false,
            },
        );
        local.local = Some(local.cluster.clone());
        let mut d = Desired::new();
        d.set_service(
            &obj("b"),
            Some(ServiceModel {
                ports: vec![(key("b", "http"), local.clone())],
                problems: vec![],
                health_check: None,
            }),
        );
        assert_eq!(d.port(&key("b", "http")), Some(&local));
        let c = d.set_service(&obj("a"), Some(model("a", &[("np", &[shared])])));
        assert_eq!(c.ports, changed(&[key("a", "np"), key("b", "http")]));
        let b = d.port(&key("b", "http")).unwrap();
        assert_eq!(b.local, None);
        assert_eq!(
            b.frontends.keys().copied().collect::<Vec<_>>(),
            [fe("10.96.0.2", 80)]
        );
        d.set_service(&obj("a"), None);
        assert_eq!(d.port(&key("b", "http")), Some(&local));
    }

    #[test]
    fn from_service_models() {
        let svc = |name: &str, ip: &str| -> k8s_openapi::api::core::v1::Service {
            serde_yaml_ng::from_str(&format!(
                "
metadata: {{name: {name}, namespace: ns}}
spec:
  clusterIP: {ip}
  externalIPs: [203.0.113.10]
  ports: [{{name: http, port: 80}}]
"
            ))
            .unwrap()
        };
        let node = NodeInfo {
            name: "n".into(),
            addresses: vec![],
            zone: None,
        };
        let mut d = Desired::new();
        let web2 = service_model(&svc("web2", "10.96.0.2"), &[], &node);
        let web1 = service_model(&svc("web1", "10.96.0.1"), &[], &node);
        d.set_service(&obj("web2"), Some(web2));
        let c = d.set_service(&obj("web1"), Some(web1));
        assert_eq!(
            c.ports,
            changed(&[key("web1", "http"), key("web2", "http")])
        );
        assert_eq!(
            frontends(&d, &key("web1", "http")),
            [fe("10.96.0.1", 80), fe("203.0.113.10", 80)]
        );
        assert_eq!(frontends(&d, &key("web2", "http")), [fe("10.96.0.2", 80)]);
        let problems = d.problems();
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].object, Some(obj("web2")));
    }

    #[test]
    fn ten_thousand_services() {
        let mut d = Desired::new();
        let spec_for = |i: u32, backend_base: u32| -> ServiceModel {
            let vip = IpAddr::from([10, 96, (i >> 8) as u8, i as u8]);
            let mut s = spec(
                &[Frontend {
                    addr: vip,
                    port: 80,
                    proto: Proto::Tcp,
                }],
                "10.0.0.1:80",
            );
            s.cluster.backends = (0..10)
                .map(|b| BackendSpec {
                    addr: SocketAddr::new(
                        IpAddr::from((backend_base + i * 10 + b).to_be_bytes()),
                        8080,
                    ),
                    local: false,
                    terminating: false,
                })
                .collect();
            ServiceModel {
                ports: vec![(key(&format!("s{i:05}"), "http"), s)],
                problems: vec![],
                health_check: None,
            }
        };
        for i in 0..10_000 {
            let c = d.set_service(&obj(&format!("s{i:05}")), Some(spec_for(i, 0x0a00_0000)));
            assert_eq!(c.ports.len(), 1);
        }
        assert_eq!(d.len(), 10_000);
        assert!(d.problems().is_empty());
        // An update touches one port, however many there are.
        let c = d.set_service(&obj("s04242"), Some(spec_for(4242, 0x0b00_0000)));
        assert_eq!(c.ports, changed(&[key("s04242", "http")]));
        let backends = &d.port(&key("s04242", "http")).unwrap().cluster.backends;
        assert_eq!(backends.len(), 10);
        assert!(
            backends
                .iter()
                .all(|b| b.addr.ip().to_string().starts_with("11."))
        );
    }
}
