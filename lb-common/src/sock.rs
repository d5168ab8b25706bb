//! Socket-level balancing for the node's own clients (see lb-ebpf's `sock`):
//! the key of the map that remembers which frontend a socket was sent to, and
//! the events it counts.

/// Key of `sock_origins`: a socket of the node (by its cookie,
/// `bpf_get_socket_cookie`) and the backend it was connected or sent to. The
/// value is the [`crate::ServiceKey`] of the frontend the application asked
/// for, so that `getpeername` and the source of a received datagram show the
/// frontend again, not the backend.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockOrigin {
    /// The socket's cookie (unique while the kernel runs, never reused).
    pub cookie: u64,
    /// Backend address (network order; IPv4 in the first 4 bytes).
    pub addr: [u8; 16],
    /// Backend port (host order).
    pub port: u16,
    /// [`crate::FAMILY_V4`] or [`crate::FAMILY_V6`] (an IPv4 backend of a
    /// dual-stack socket, reached through a v4-mapped address, is `FAMILY_V4`).
    pub family: u8,
    pub _pad: [u8; 5],
}

/// What the socket programs did: the index of the per-CPU `sock_stats`
/// counters (one count per system call they changed or refused).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SockEvent {
    /// A TCP or UDP `connect` to a frontend went to a backend instead.
    Connected = 0,
    /// An unconnected UDP `sendmsg` to a frontend went to a backend instead.
    Sent,
    /// A `connect` or `sendmsg` to a frontend without usable backends (or to a
    /// ClusterIP on a port that is no Service port) was refused with
    /// ECONNREFUSED.
    Refused,
    /// A `connect` or `sendmsg` to a frontend with a Local traffic policy
    /// and no endpoint on this node (or to a LoadBalancer IP whose source
    /// ranges leave the node out) failed with EPERM: the node's share of what
    /// the packet path drops.
    Dropped,
    /// `getpeername` or a received datagram showed the frontend in place of
    /// the backend.
    Restored,
    /// The socket could not be remembered (`sock_origins` update failed):
    /// `getpeername` and received datagrams will show the backend.
    OriginLost,
}

impl SockEvent {
    /// Number of events (size of the `sock_stats` map).
    pub const COUNT: u32 = Self::OriginLost as u32 + 1;

    pub const ALL: [Self; Self::COUNT as usize] = [
        Self::Connected,
        Self::Sent,
        Self::Refused,
        Self::Dropped,
        Self::Restored,
        Self::OriginLost,
    ];

    /// The name in dumps and metrics.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Connected => "connected",
            Self::Sent => "sent",
            Self::Refused => "refused",
            Self::Dropped => "dropped",
            Self::Restored => "restored",
            Self::OriginLost => "origin_lost",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_indexed_in_order() {
        for (i, e) in SockEvent::ALL.iter().enumerate() {
            assert_eq!(*e as usize, i, "{e:?}");
        }
    }
}
