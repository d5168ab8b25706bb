//! The one-node namespace whose FIB gives known answers, for the datapath's
//! tests and the per-packet benchmark: its devices' and neighbours' Ethernet
//! addresses.

/// `up0`, the uplink.
pub const UPLINK_MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];
/// Node B, behind the uplink (routes the remote pod CIDRs).
pub const NODE_B_MAC: [u8; 6] = [2, 0, 0, 0, 0, 2];
/// The router to the clients, behind the uplink.
pub const ROUTER_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0xfe];
/// `pod0`, the host side of a pod veth (the pods' gateway).
pub const POD_GW_MAC: [u8; 6] = [2, 0, 0, 0, 1, 1];
/// The local pod behind `pod0`.
pub const LOCAL_POD_MAC: [u8; 6] = [2, 0, 0, 0, 1, 5];
