//! The verify-and-repair pass: reads back every map the reconciler writes,
//! compares it with what the reconciler believes it wrote, and writes again
//! wherever they differ.
//!
//! Drift has three causes: a write that failed (logged, and the pass comes
//! soon after), an entry changed or removed by hand (`bpftool map update`,
//! `delete`), and a bug. Whatever the cause, the maps go back to the desired
//! state and the drift is counted per map, so that it is seen.
//!
//! What is compared, and how:
//! - `services`: every frontend this agent owns, and the ClusterIP address
//!   entries, entry by entry; an entry nobody owns is removed.
//! - `backends`: every slot in use holds its backend; every other slot is
//!   inactive.
//! - `maglev`: each table in use against a fingerprint of what was last
//!   written there (see `MaglevTables::intact`); a table that differs is
//!   rebuilt from the desired backends, at its place and size.
//! - `addr_filter`: each bit set exactly where an entry stands behind it.
//! - `src_ranges4/6`: exactly the ports' loadBalancerSourceRanges.
//! - `service_names`: the name of each service id in use.
//!
//! The conntrack, affinity and fragment maps are the datapath's own: they are
//! not checked. `config`, the cluster CIDRs and the interface maps are the
//! agent's, checked beside this pass (`crate::repair::pass`).

use std::collections::{BTreeSet, HashMap};

use anyhow::{Context as _, Result};
use lb_common::{Backend, Service, ServiceKey, ServiceName};

use super::{Reconciler, encoding, tables::Prebuilt};
use crate::model::{Desired, Prefix};

/// What one verify pass found wrong, and repaired, per map.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Drift {
    /// Entries missing, different or unowned.
    pub services: usize,
    /// Slots not holding what they should.
    pub backends: usize,
    /// Tables that differed from what was written.
    pub maglev: usize,
    /// Bits set or clear where they should not be.
    pub addr_filter: usize,
    /// Prefixes missing or unowned.
    pub source_ranges: usize,
    pub service_names: usize,
    /// The agent's own maps, checked beside the reconciler's (see
    /// `crate::repair::pass`): `config` and the cluster CIDR tries, and what
    /// `interfaces` and `tx_ports` say of the attached interfaces.
    pub node: usize,
    pub interfaces: usize,
    pub tx_ports: usize,
}

impl Drift {
    /// Each map's count, by the map's name.
    pub fn per_map(&self) -> [(&'static str, usize); 9] {
        [
            (lb_common::map_names::SERVICES, self.services),
            (lb_common::map_names::BACKENDS, self.backends),
            (lb_common::map_names::MAGLEV, self.maglev),
            (lb_common::map_names::ADDR_FILTER, self.addr_filter),
            ("src_ranges", self.source_ranges),
            (lb_common::map_names::SERVICE_NAMES, self.service_names),
            ("config", self.node),
            (lb_common::map_names::INTERFACES, self.interfaces),
            (lb_common::map_names::TX_PORTS, self.tx_ports),
        ]
    }

    pub fn total(&self) -> usize {
        self.per_map().iter().map(|(_, n)| n).sum()
    }
}

impl std::fmt::Display for Drift {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> = self
            .per_map()
            .iter()
            .filter(|(_, n)| *n > 0)
            .map(|(m, n)| format!("{m} {n}"))
            .collect();
        if parts.is_empty() {
            write!(f, "none")
        } else {
            write!(f, "{}", parts.join(", "))
        }
    }
}

impl Reconciler {
    /// Compares the maps with what this reconciler wrote, for the ports of
    /// `desired`, and repairs what differs. Only meaningful after the first
    /// full sync (before it, the maps hold what an earlier agent left, on
    /// purpose). A map that cannot be read is an error; the maps read before
    /// it are repaired.
    pub fn verify(&mut self, desired: &Desired) -> Result<Drift> {
        let mut drift = Drift {
            services: self.verify_services()?,
            backends: self.verify_backends()?,
            maglev: self.verify_maglev(desired)?,
            ..Drift::default()
        };
        drift.source_ranges = self.verify_source_ranges()?;
        drift.service_names = self.verify_service_names()?;
        // Departed backends whose flows have ended let go of their bits.
        self.settle_departed();
        // Last: the entries behind the bits are in place by now.
        drift.addr_filter = self.filter.repair(&mut self.maps)?;
        Ok(drift)
    }

    fn verify_services(&mut self) -> Result<usize> {
        let mut expected: HashMap<ServiceKey, Service> = self
            .owners
            .iter()
            .filter_map(|(k, owner)| Some((*k, *self.ports.get(owner)?.frontends.get(k)?)))
            .collect();
        for a in self.cluster_ips.keys() {
            expected.insert(*a, encoding::address_value());
        }
        let mut found = Vec::new();
        for entry in self.maps.services.iter() {
            found.push(entry.context("reading services")?);
        }
        let mut wrong = 0;
        for (k, v) in found {
            match expected.remove(&k) {
                Some(want) if want == v => {}
                Some(want) => {
                    log::warn!("verify: frontend {k:?} held {v:?}, not {want:?}: rewritten");
                    self.maps.set_service(&k, &want)?;
                    wrong += 1;
                }
                None => {
                    log::warn!("verify: frontend {k:?} is no Service's: removed");
                    self.maps.remove_service(&k)?;
                    wrong += 1;
                }
            }
        }
        for (k, want) in expected {
            log::warn!("verify: frontend {k:?} was missing: written");
            self.maps.set_service(&k, &want)?;
            wrong += 1;
        }
        Ok(wrong)
    }

    fn verify_backends(&mut self) -> Result<usize> {
        let expected: HashMap<u32, Backend> = self
            .backends
            .values()
            .map(|slot| (slot.id, slot.value))
            .collect();
        let mut wrong = 0;
        // Every slot in batched reads (a few system calls for 65,536 slots,
        // where a read per slot took one each), one batch in memory at a
        // time; what differs is put right once the walk is done.
        let mut differ = Vec::new();
        {
            use aya::maps::IterableMap as _;
            use std::os::fd::AsFd as _;
            crate::bpf::batch::for_each_batch(self.maps.backends.map().fd().as_fd(), |batch| {
                for (id, have) in batch.typed::<u32, Backend>()? {
                    match expected.get(&id) {
                        Some(want) if *want == have => {}
                        Some(_) => differ.push((id, have)),
                        None if have.is_active() => differ.push((id, have)),
                        None => {}
                    }
                }
                Ok(std::ops::ControlFlow::Continue(()))
            })
            .context("reading backends")?;
        }
        for (id, have) in differ {
            match expected.get(&id) {
                Some(want) => {
                    log::warn!("verify: backend {id} held {have:?}, not {want:?}: rewritten");
                    self.maps.set_backend(id, want)?;
                }
                None => {
                    log::warn!("verify: backend slot {id} is no endpoint's: cleared");
                    self.maps.clear_backend(id)?;
                }
            }
            wrong += 1;
        }
        Ok(wrong)
    }

    fn verify_maglev(&mut self, desired: &Desired) -> Result<usize> {
        let mut damaged = Vec::new();
        for (key, applied) in &self.ports {
            for e in [applied.tables.cluster, applied.tables.local]
                .into_iter()
                .flatten()
            {
                if !self.maps.maglev.intact(e.start)? {
                    damaged.push(key.clone());
                }
            }
        }
        let mut wrong = 0;
        for key in damaged {
            let (Some(spec), Some(applied)) = (desired.port(&key), self.ports.remove(&key)) else {
                continue;
            };
            log::warn!("verify: a Maglev table of {key} differed from what was written: rewritten");
            let written = self.write_tables(applied.tables, spec, Prebuilt::default());
            self.ports.insert(key, applied);
            wrong += 1;
            if written.is_err() {
                anyhow::bail!("rewriting the Maglev tables of a Service port failed");
            }
        }
        Ok(wrong)
    }

    fn verify_source_ranges(&mut self) -> Result<usize> {
        let mut expected: BTreeSet<(u32, Prefix)> = self
            .ports
            .values()
            .flat_map(|a| a.ranges.iter().map(move |p| (a.id, *p)))
            .collect();
        let mut wrong = 0;
        for (id, (addr, len)) in self.maps.source_ranges()? {
            if !expected.remove(&(id, Prefix { addr, len })) {
                log::warn!(
                    "verify: source range {addr}/{len} of service id {id} is no port's: removed"
                );
                self.maps.remove_source_range(id, (addr, len))?;
                wrong += 1;
            }
        }
        for (id, p) in expected {
            log::warn!(
                "verify: source range {}/{} of service id {id} was missing: written",
                p.addr,
                p.len
            );
            self.maps.add_source_range(id, (p.addr, p.len))?;
            wrong += 1;
        }
        Ok(wrong)
    }

    fn verify_service_names(&mut self) -> Result<usize> {
        let names = self.names.snapshot().services;
        let mut wrong = 0;
        for (id, name) in names {
            let have = self
                .maps
                .service_names
                .get(&id, 0)
                .context("reading service_names")?;
            if have != ServiceName::new(&name) {
                self.maps.set_service_name(id, &name)?;
                wrong += 1;
            }
        }
        Ok(wrong)
    }
}
