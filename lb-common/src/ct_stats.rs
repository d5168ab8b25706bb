//! What the datapath did to the `conntrack` map: the index of the per-CPU
//! `ct_stats` counters.
//!
//! The kernel does not say when an LRU map evicts an entry, nor how many
//! entries it holds. These counts make it possible to tell: the entries the
//! datapath created, less those it and the agent deleted, less those the map
//! holds, were evicted (`lb_conntrack_evicted_total`, see the agent's
//! conntrack janitor).

/// A conntrack event, counted once per entry.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CtEvent {
    /// An entry was inserted under a key the map did not hold (an update that
    /// replaced an entry is not counted: the map holds as many as before).
    Created = 0,
    /// The datapath deleted an entry (the forward entry of an expired flow
    /// whose source-NAT port it gave to a new flow).
    Removed,
}

impl CtEvent {
    /// Number of events (size of the `ct_stats` map).
    pub const COUNT: u32 = Self::Removed as u32 + 1;

    pub const ALL: [Self; Self::COUNT as usize] = [Self::Created, Self::Removed];

    /// The name in dumps.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Created => "created",
            Self::Removed => "removed",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_indexed_in_order() {
        for (i, e) in CtEvent::ALL.iter().enumerate() {
            assert_eq!(*e as usize, i, "{e:?}");
        }
    }
}
