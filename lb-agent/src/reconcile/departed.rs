//! Backends that left every Service port while conntrack may still hold
//! their flows: they keep their `addr_filter` bit until a sweep of conntrack
//! finds no flow of theirs.
//!
//! A TCP connection keeps its backend until it ends, as kube-proxy's
//! conntrack keeps it, also when the backend leaves its slices (turned not
//! Ready, or removed while its pod still runs). The datapath translates the
//! backend's replies by their conntrack entry; but it looks only if the
//! backend's bit in `addr_filter` is set, and a backend in no port would
//! otherwise lose it at once: its replies would pass untranslated, from the
//! pod's address instead of the frontend's, and the client would reset the
//! connection. So a departed backend keeps its filter reference until the
//! conntrack janitor's sweep, begun after it left, finds no reply entry from
//! it ([`FlowBackends`]); and a backend with flows that the reconciler does
//! not know (one that left before the agent restarted) gets a reference too.
//! Without a janitor (no flows known), a departed backend lets go at once.

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    sync::{Arc, Mutex, PoisonError},
    time::Instant,
};

use super::{encoding::FilterKey, filter::Filter};
use crate::bpf::Maps;

/// The backends conntrack holds reply entries of, as the janitor's last
/// complete sweep found them.
#[derive(Clone, Debug, Default)]
pub struct FlowBackends {
    /// When that sweep began (none: no sweep has completed yet).
    pub swept_from: Option<Instant>,
    /// The backends (address, port) replies come from.
    pub held: HashSet<SocketAddr>,
}

/// [`FlowBackends`] shared between the janitor, which writes it after each
/// sweep, and the reconciler.
pub type SharedFlowBackends = Arc<Mutex<FlowBackends>>;

#[derive(Debug, Default)]
pub struct Departed {
    /// Departed backends holding a filter reference, and since when.
    since: HashMap<SocketAddr, Instant>,
    flows: Option<SharedFlowBackends>,
}

impl Departed {
    /// Follows the flows the janitor reports from now on.
    pub fn follow(&mut self, flows: SharedFlowBackends) {
        self.flows = Some(flows);
    }

    /// `addr` left its last port: it keeps its filter reference while flows
    /// may hold it (released by [`Self::settle`]), or lets go now if no flows
    /// are followed.
    pub fn left(&mut self, addr: SocketAddr, filter: &mut Filter, maps: &mut Maps) {
        if self.flows.is_some() {
            // One that held a departed reference already (its flows were
            // found before it was taken over at start) keeps that one.
            if self.since.insert(addr, Instant::now()).is_some() {
                filter.remove(maps, FilterKey::backend(addr));
            }
        } else {
            filter.remove(maps, FilterKey::backend(addr));
        }
    }

    /// `addr` is a backend again: whether it still holds a filter reference
    /// (which it then keeps as a backend).
    pub fn returned(&mut self, addr: &SocketAddr) -> bool {
        self.since.remove(addr).is_some()
    }

    /// Releases the departed backends the last sweep (begun after they left)
    /// found no flow of, and holds a reference for backends with flows that
    /// are neither backends (`is_backend`) nor departed.
    pub fn settle(
        &mut self,
        is_backend: impl Fn(&SocketAddr) -> bool,
        filter: &mut Filter,
        maps: &mut Maps,
    ) {
        let Some(flows) = &self.flows else { return };
        let seen = flows.lock().unwrap_or_else(PoisonError::into_inner).clone();
        let Some(swept_from) = seen.swept_from else {
            return;
        };
        self.since.retain(|addr, since| {
            let gone = swept_from > *since && !seen.held.contains(addr);
            if gone {
                filter.remove(maps, FilterKey::backend(*addr));
            }
            !gone
        });
        for addr in seen.held {
            if !is_backend(&addr) && !self.since.contains_key(&addr) {
                filter.add(maps, FilterKey::backend(addr));
                self.since.insert(addr, Instant::now());
            }
        }
    }

    /// Departed backends holding a filter reference.
    pub fn count(&self) -> usize {
        self.since.len()
    }
}
