//! The reconciler's id allocator: service ids, Maglev rows and backend ids.
//!
//! Freed ids are reused last (a FIFO behind the never-used ones), so that a
//! conntrack entry never finds its backend id reused by another pod soon after.

use std::collections::{HashSet, VecDeque};

use crate::bpf::Sizes;

/// The three id spaces, each as large as the map it indexes.
#[derive(Debug)]
pub(super) struct IdSpaces {
    /// Service-port ids (`service_stats`, `service_names`).
    pub(super) services: Ids,
    /// Maglev rows (as many as service ids).
    pub(super) rows: Ids,
    /// Backend ids (`backends`, `backend_stats`).
    pub(super) backends: Ids,
}

impl IdSpaces {
    pub(super) fn new(sizes: &Sizes) -> Self {
        Self {
            services: Ids::new(sizes.service_ids),
            rows: Ids::new(sizes.service_ids),
            backends: Ids::new(sizes.backends),
        }
    }
}

/// Ids from `0..capacity`, never-used ones first, then freed ones oldest first.
#[derive(Debug)]
pub(super) struct Ids {
    capacity: u32,
    next_fresh: u32,
    free: VecDeque<u32>,
    in_use: HashSet<u32>,
}

impl Ids {
    pub(super) fn new(capacity: u32) -> Self {
        Self {
            capacity,
            next_fresh: 0,
            free: VecDeque::new(),
            in_use: HashSet::new(),
        }
    }

    pub(super) fn available(&self) -> usize {
        (self.capacity - self.next_fresh) as usize + self.free.len()
    }

    pub(super) fn alloc(&mut self) -> Option<u32> {
        let id = if self.next_fresh < self.capacity {
            self.next_fresh += 1;
            self.next_fresh - 1
        } else {
            self.free.pop_front()?
        };
        self.in_use.insert(id);
        Some(id)
    }

    pub(super) fn release(&mut self, id: u32) {
        if self.in_use.remove(&id) {
            self.free.push_back(id);
        }
    }

    /// Marks an id found in the maps as in use (adoption, before any `alloc`).
    pub(super) fn claim(&mut self, id: u32) -> bool {
        if id >= self.capacity || self.in_use.contains(&id) {
            return false;
        }
        if id >= self.next_fresh {
            self.free.extend(self.next_fresh..id);
            self.next_fresh = id + 1;
        } else {
            self.free.retain(|f| *f != id);
        }
        self.in_use.insert(id);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_reused_last_and_claims_work() {
        let mut ids = Ids::new(4);
        assert_eq!(ids.alloc(), Some(0));
        assert_eq!(ids.alloc(), Some(1));
        ids.release(0);
        assert_eq!(ids.alloc(), Some(2), "never-used ids first");
        assert_eq!(ids.alloc(), Some(3));
        assert_eq!(ids.alloc(), Some(0), "then the oldest freed");
        assert_eq!(ids.alloc(), None);
        assert_eq!(ids.available(), 0);

        let mut ids = Ids::new(8);
        assert!(ids.claim(5));
        assert!(!ids.claim(5), "claimed twice");
        assert!(!ids.claim(8), "out of range");
        let got: Vec<_> = (0..7).filter_map(|_| ids.alloc()).collect();
        assert_eq!(got, vec![6, 7, 0, 1, 2, 3, 4]);
    }
}
