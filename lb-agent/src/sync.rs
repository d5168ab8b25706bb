//! The sync engine: source events in, minimal map writes out, through the one
//! pipeline the agent has:
//!
//! 1. the [`Store`] takes each [`SourceEvent`] and says which Services it
//!    touched;
//! 2. the model of each touched Service ([`Store::model`]) goes into the
//!    desired tables ([`Desired`]), which resolve frontend conflicts and say
//!    which service ports changed;
//! 3. the [`Reconciler`] brings those ports' map entries to the desired state;
//! 4. after the first full sync, what an earlier agent left in the maps and is
//!    not desired any more is removed ([`Reconciler::finish_adoption`]).
//!
//! The agent's loop, the map tests and the benchmark all drive this one type;
//! what the agent adds around it (node facts, health, metrics) stays in
//! `agent`.

use std::{
    collections::BTreeSet,
    sync::{Mutex, MutexGuard},
    time::{Duration, Instant},
};

use crate::{
    cluster::{NodeInfo, Problem},
    model::{Desired, PortKey},
    reconcile::{Drift, Reconciler, Stats},
    source::{
        SourceEvent,
        store::{Dirty, Store},
    },
};

pub struct Engine {
    store: Store,
    desired: Desired,
    /// Locked while the maps are written. Nothing on another thread takes it:
    /// the metrics read the counters through handles of their own and the
    /// ids' names from [`Reconciler::id_names`].
    reconciler: Mutex<Reconciler>,
    /// Services touched since the last sync.
    dirty: Dirty,
    /// Whether the first full sync has happened (and adoption is finished).
    synced_once: bool,
    /// When the oldest event not yet synced arrived.
    pending_since: Option<Instant>,
    /// The next sync is due even with nothing new: ports that failed are
    /// tried again ([`Self::retry_failed`]).
    retry: bool,
}

/// What taking one source event did.
#[derive(Debug, Default)]
pub struct Taken {
    /// Input the event reported as skipped (the caller logs and counts it).
    pub problems: Vec<Problem>,
    /// The node's addresses changed: every Service is synced again.
    pub node_changed: bool,
    /// The event was a full listing.
    pub listing: bool,
}

/// How full the maps the reconciler writes are.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Occupancy {
    /// Frontends written into `services`.
    pub frontends: usize,
    /// `backends` slots in use.
    pub backends: usize,
    /// Service ports (service ids).
    pub ports: usize,
    /// `maglev` elements the tables take (space given up but not yet
    /// free included).
    pub maglev_elements: usize,
}

/// What one sync did.
#[derive(Debug)]
pub struct SyncReport {
    /// The service ports whose desired state changed, and were reconciled.
    pub changed: BTreeSet<PortKey>,
    /// What was skipped: the touched Services' model problems, frontend
    /// conflicts between Services, and ports the maps had no room for.
    pub problems: Vec<Problem>,
    /// The map writes.
    pub stats: Stats,
    /// This was the first sync: what the maps held at start and is no longer
    /// desired has been removed.
    pub first: bool,
    /// Time spent in the store and the model (step 2), and in all.
    pub modelled: Duration,
    pub took: Duration,
    /// From the arrival of the oldest event this sync includes to its end.
    pub latency: Option<Duration>,
    pub occupancy: Occupancy,
}

impl Engine {
    /// An engine writing through `reconciler`, for the node `node` (its
    /// addresses make the NodePort frontends).
    pub fn new(reconciler: Reconciler, node: NodeInfo) -> Self {
        Self {
            store: Store::new(node),
            desired: Desired::new(),
            reconciler: Mutex::new(reconciler),
            dirty: Dirty::default(),
            synced_once: false,
            pending_since: None,
            retry: false,
        }
    }

    /// Takes a source event into the store.
    pub fn take(&mut self, event: SourceEvent) -> Taken {
        let listing = matches!(event, SourceEvent::Resync { .. });
        let mut d = self.store.apply(event);
        if !d.is_empty() {
            self.pending_since.get_or_insert_with(Instant::now);
        }
        let taken = Taken {
            problems: std::mem::take(&mut d.problems),
            node_changed: d.all,
            listing,
        };
        self.dirty.merge(d);
        taken
    }

    /// Whether a sync has something to do: the store holds a full listing
    /// (before one, it is partial, and a sync would remove what it lacks) and
    /// something changed since the last sync.
    pub fn is_due(&self) -> bool {
        self.store.is_synced() && (!self.dirty.is_empty() || self.retry)
    }

    /// Makes the next sync try again the ports that could not be written
    /// (every sync does, this one even if nothing else changed). Returns
    /// whether there are any.
    pub fn retry_failed(&mut self) -> bool {
        let any = !self.reconciler().failed_ports().is_empty();
        self.retry = any;
        any
    }

    /// The verify-and-repair pass (see [`Reconciler::verify`]); None before
    /// the first sync, while the maps still hold what an earlier agent left.
    pub fn verify(&self) -> Option<anyhow::Result<Drift>> {
        self.synced_once
            .then(|| self.reconciler().verify(&self.desired))
    }

    /// Syncs the maps with what the store holds; None if it is not due.
    pub fn sync(&mut self) -> Option<SyncReport> {
        if !self.is_due() {
            return None;
        }
        let t0 = Instant::now();
        self.retry = false;
        let dirty = std::mem::take(&mut self.dirty);
        let keys: Vec<_> = if dirty.all {
            // Every Service the store holds, and those deleted since the
            // last sync: gone from the store, still in the desired tables.
            let mut keys = dirty.services;
            keys.extend(self.store.service_keys().cloned());
            keys.into_iter().collect()
        } else {
            dirty.services.into_iter().collect()
        };
        let mut changed = BTreeSet::new();
        let mut problems = Vec::new();
        for k in keys {
            let model = self.store.model(&k);
            if let Some(m) = &model {
                problems.extend(m.problems.iter().cloned());
            }
            let ch = self.desired.set_service(&k, model);
            changed.extend(ch.ports);
            problems.extend(ch.problems);
        }
        let modelled = t0.elapsed();
        let mut stats = Stats::default();
        let first = !self.synced_once;
        let occupancy = {
            let mut r = self.reconciler();
            problems.extend(r.apply(&self.desired, &changed, &mut stats));
            if first {
                r.finish_adoption(&mut stats);
            }
            let (frontends, backends, ports) = r.occupancy();
            Occupancy {
                frontends,
                backends,
                ports,
                maglev_elements: r.maglev_elements_used() as usize,
            }
        };
        self.synced_once = true;
        Some(SyncReport {
            changed,
            problems,
            stats,
            first,
            modelled,
            took: t0.elapsed(),
            latency: self.pending_since.take().map(|t| t.elapsed()),
            occupancy,
        })
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn desired(&self) -> &Desired {
        &self.desired
    }

    /// The reconciler, and through it the maps, locked.
    pub fn reconciler(&self) -> MutexGuard<'_, Reconciler> {
        // A panic elsewhere while holding it leaves the maps as they were
        // written: still usable.
        self.reconciler
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}
