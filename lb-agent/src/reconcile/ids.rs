//! The reconciler's allocators: service ids, backend ids, and the space of
//! the Maglev tables.
//!
//! Freed ids are reused last (a FIFO behind the never-used ones), so that a
//! conntrack entry never finds its backend id reused by another pod soon after.
//! Freed table space is held until the next pass, so that no packet that read
//! a frontend before it was rewritten reads a table written over.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};

use super::encoding::Extent;
use crate::bpf::Sizes;

/// The id spaces, each as large as the map it indexes, and the table space.
#[derive(Debug)]
pub(super) struct IdSpaces {
    /// Service-port ids (`service_stats`, `service_names`).
    pub(super) services: Ids,
    /// Elements of `maglev`.
    pub(super) tables: Extents,
    /// Backend ids (`backends`, `backend_stats`).
    pub(super) backends: Ids,
}

impl IdSpaces {
    pub(super) fn new(sizes: &Sizes) -> Self {
        Self {
            services: Ids::new(sizes.service_ids),
            tables: Extents::new(sizes.maglev_elements()),
            backends: Ids::new(sizes.backends),
        }
    }
}

/// Ranges of `0..capacity` (the elements of `maglev`) for tables of several
/// sizes: the smallest free range that fits (the lowest of equals), free
/// ranges merged with their neighbours, so that space freed by tables of one
/// size serves tables of another.
#[derive(Debug)]
pub(super) struct Extents {
    capacity: u32,
    /// Free ranges: start to length, never adjacent (merged).
    free: BTreeMap<u32, u32>,
    /// The same, by (length, start), for the best fit.
    by_len: BTreeSet<(u32, u32)>,
    /// In use: start to length.
    used: HashMap<u32, u32>,
    /// Given up since the last [`Self::settle`]: free only then.
    quarantine: Vec<Extent>,
}

impl Extents {
    pub(super) fn new(capacity: u32) -> Self {
        let mut e = Self {
            capacity,
            free: BTreeMap::new(),
            by_len: BTreeSet::new(),
            used: HashMap::new(),
            quarantine: Vec::new(),
        };
        if capacity > 0 {
            e.insert_free(0, capacity);
        }
        e
    }

    fn insert_free(&mut self, start: u32, len: u32) {
        self.free.insert(start, len);
        self.by_len.insert((len, start));
    }

    fn remove_free(&mut self, start: u32) -> u32 {
        let len = self.free.remove(&start).expect("a free range");
        self.by_len.remove(&(len, start));
        len
    }

    /// Elements neither in use nor held (what allocations may take).
    pub(super) fn free_elements(&self) -> u64 {
        self.free.values().map(|l| u64::from(*l)).sum()
    }

    /// Elements in use (held ones included).
    pub(super) fn used_elements(&self) -> u64 {
        u64::from(self.capacity) - self.free_elements()
    }

    /// A range of `len` elements, or None if no free range is that long.
    pub(super) fn alloc(&mut self, len: u32) -> Option<Extent> {
        if len == 0 {
            return None;
        }
        let &(have, start) = self.by_len.range((len, 0)..).next()?;
        self.remove_free(start);
        if have > len {
            self.insert_free(start + len, have - len);
        }
        self.used.insert(start, len);
        Some(Extent { start, len })
    }

    /// Gives `e` up: free from the next [`Self::settle`] on. An extent
    /// not in use, or not as it was given, is ignored.
    pub(super) fn release(&mut self, e: Extent) {
        if self.used.get(&e.start) == Some(&e.len) {
            self.used.remove(&e.start);
            self.quarantine.push(e);
        }
    }

    /// Keeps the first `len` elements of `e` and gives the rest up (as
    /// [`Self::release`]); returns the extent kept.
    pub(super) fn shrink(&mut self, e: Extent, len: u32) -> Extent {
        if len == 0 || len >= e.len || self.used.get(&e.start) != Some(&e.len) {
            return e;
        }
        self.used.insert(e.start, len);
        self.quarantine.push(Extent {
            start: e.start + len,
            len: e.len - len,
        });
        Extent {
            start: e.start,
            len,
        }
    }

    /// Frees what was given up: called at the start of a pass, when every
    /// frontend that named it has been rewritten. Returns what it freed (for
    /// the caller to clear).
    pub(super) fn settle(&mut self) -> Vec<Extent> {
        let freed = std::mem::take(&mut self.quarantine);
        for e in &freed {
            self.free_now(*e);
        }
        freed
    }

    /// Takes back an extent that was allocated and never used (no frontend
    /// ever named it), at once.
    pub(super) fn unalloc(&mut self, e: Extent) {
        if self.used.get(&e.start) == Some(&e.len) {
            self.used.remove(&e.start);
            self.free_now(e);
        }
    }

    fn free_now(&mut self, e: Extent) {
        let (mut start, mut len) = (e.start, e.len);
        if let Some((&before, &blen)) = self.free.range(..start).next_back()
            && before + blen == start
        {
            self.remove_free(before);
            start = before;
            len += blen;
        }
        if self.free.contains_key(&(start + len)) {
            len += self.remove_free(start + len);
        }
        self.insert_free(start, len);
    }

    /// Marks an extent found in the maps as in use (adoption, before any
    /// `alloc`). True if it is now held: it was free, or is already held
    /// exactly so (frontends of one port share a table). False if it lies
    /// outside the space or overlaps another.
    pub(super) fn claim(&mut self, e: Extent) -> bool {
        if self.used.get(&e.start) == Some(&e.len) {
            return true;
        }
        if e.len == 0 || u64::from(e.start) + u64::from(e.len) > u64::from(self.capacity) {
            return false;
        }
        let Some((&start, &len)) = self.free.range(..=e.start).next_back() else {
            return false;
        };
        if start + len < e.end() {
            return false;
        }
        self.remove_free(start);
        if e.start > start {
            self.insert_free(start, e.start - start);
        }
        if start + len > e.end() {
            self.insert_free(e.end(), start + len - e.end());
        }
        self.used.insert(e.start, e.len);
        true
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

    fn ext(start: u32, len: u32) -> Extent {
        Extent { start, len }
    }

    #[test]
    fn extents_fit_best_merge_when_freed_and_wait_a_pass() {
        let mut e = Extents::new(100);
        let a = e.alloc(10).unwrap();
        let b = e.alloc(30).unwrap();
        let c = e.alloc(10).unwrap();
        assert_eq!((a, b, c), (ext(0, 10), ext(10, 30), ext(40, 10)));
        assert_eq!(e.free_elements(), 50);
        e.release(a);
        assert_eq!(
            e.alloc(10),
            Some(ext(50, 10)),
            "a released range waits for settle"
        );
        e.settle();
        // Best fit: the 10 freed at 0 rather than the 40 left at 60.
        assert_eq!(e.alloc(8), Some(ext(0, 8)));
        assert_eq!(e.alloc(41), None, "no free range of 41");
        // Freeing b and c merges them with their free neighbours (2 left at
        // 8, 40 at 60 after the 10 at 50): 8..50 is one range of 42.
        e.release(b);
        e.release(c);
        e.settle();
        assert_eq!(e.alloc(41), Some(ext(8, 41)));
        assert_eq!(e.used_elements(), 8 + 41 + 10);
        // Released twice, or with another length: ignored.
        e.release(ext(8, 41));
        e.release(ext(8, 41));
        e.release(ext(0, 9));
        e.settle();
        assert_eq!(e.used_elements(), 8 + 10);
    }

    #[test]
    fn a_shrunk_extent_gives_its_tail_up_and_claims_split_free_space() {
        let mut e = Extents::new(64);
        let a = e.alloc(32).unwrap();
        let kept = e.shrink(a, 8);
        assert_eq!(kept, ext(0, 8));
        e.settle();
        assert_eq!(
            e.alloc(56),
            Some(ext(8, 56)),
            "the tail merged with the rest"
        );
        e.unalloc(ext(8, 56));
        assert_eq!(e.free_elements(), 56, "never used: free at once");

        let mut e = Extents::new(100);
        assert!(e.claim(ext(20, 10)));
        assert!(e.claim(ext(20, 10)), "the same table again");
        assert!(!e.claim(ext(25, 10)), "overlaps");
        assert!(!e.claim(ext(95, 10)), "past the end");
        assert!(e.claim(ext(30, 5)));
        assert_eq!(e.alloc(20), Some(ext(0, 20)));
        assert_eq!(e.alloc(66), None);
        assert_eq!(e.alloc(65), Some(ext(35, 65)));
    }
}
