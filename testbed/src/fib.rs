//! One node in a namespace of its own, with a fixed topology so that
//! `bpf_fib_lookup` gives known answers: what the datapath's tests and the
//! per-packet benchmark run their frames through.
//!
//! ```text
//!  up0 (uplink, MTU 9000) 02:00:00:00:00:01  192.0.2.1/24  2001:db8::1/64
//!    192.0.2.2 / 2001:db8::2     02:00:00:00:00:02  node B (routes 10.244.1.0/24, fd00:244:1::/64)
//!    192.0.2.254 / 2001:db8::fe  02:00:00:00:00:fe  router to clients (198.51.100.0/24, 2001:db8:100::/64)
//!    192.0.2.3 / 2001:db8::3                        node C (routes 10.244.2.0/24, fd00:244:2::/64),
//!                                                    its neighbour never resolved (a cold neighbour)
//!  pod0 (host side of a pod veth) 02:00:00:00:01:01, pods 10.244.0.0/24, fd00:244::/64
//!    10.244.0.5 / fd00:244::5    02:00:00:00:01:05  a local pod
//!  flannel.1 (VXLAN as Flannel sets it up, MTU 1450) node D's pods 10.244.3.0/24, fd00:244:3::/64
//!    via 10.244.3.0 / fd00:244:3:: onlink             02:00:00:00:03:00 (permanent, as flannel writes it)
//! ```

use std::fs::File;

use anyhow::{Context as _, Result};

use crate::{
    ns::{self, ip},
    scope::Scope,
};

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

/// The namespace (see the module docs), removed when dropped.
pub struct FibNamespace {
    ns: String,
    /// The namespace the calling thread was in before [`Self::enter`].
    entered_from: Option<File>,
    // Last: dropping it removes the namespace.
    scope: Scope,
}

impl FibNamespace {
    /// Builds the namespace.
    pub fn up() -> Result<Self> {
        let scope = Scope::new()?;
        let ns = scope.add_netns(
            "fib",
            &["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"],
        )?;
        build(&ns).with_context(|| format!("building {ns}"))?;
        Ok(Self {
            ns,
            entered_from: None,
            scope,
        })
    }

    /// Builds the namespace and moves the calling thread into it; dropping it
    /// moves the thread back (drop it on the same thread).
    pub fn enter() -> Result<Self> {
        let mut fib = Self::up()?;
        let original = File::open("/proc/thread-self/ns/net").context("the current netns")?;
        let target = File::open(ns::netns_path(&fib.ns)).context("the new netns")?;
        ns::enter_netns(&target).context("setns")?;
        fib.entered_from = Some(original);
        Ok(fib)
    }

    /// Its name.
    pub fn ns(&self) -> &str {
        &self.ns
    }

    /// The scope it lives in (its run directory takes a run's files).
    pub fn scope(&self) -> &Scope {
        &self.scope
    }
}

impl Drop for FibNamespace {
    fn drop(&mut self) {
        if let Some(original) = &self.entered_from
            && let Err(e) = ns::enter_netns(original)
        {
            eprintln!("lb-testbed: back to the original namespace: {e}");
        }
    }
}

fn build(n: &str) -> Result<()> {
    let ip = |args: &str| ip(Some(n), args).map(drop);
    ip("link add up0 address 02:00:00:00:00:01 type veth peer name up1")?;
    ip("link add pod0 address 02:00:00:00:01:01 type veth peer name pod1")?;
    ip("link add flannel.1 type vxlan id 1 dstport 8472 nolearning")?;
    // A jumbo-frame uplink (AWS's MTU is 9001); Flannel's VXLAN device 50
    // bytes below a 1500-byte underlay.
    for dev in ["up0", "up1"] {
        ip(&format!("link set {dev} mtu 9000"))?;
    }
    ip("link set flannel.1 mtu 1450")?;
    for dev in ["up0", "up1", "pod0", "pod1", "flannel.1"] {
        ip(&format!("link set {dev} up"))?;
    }
    ip("addr add 192.0.2.1/24 dev up0")?;
    ip("-6 addr add 2001:db8::1/64 dev up0 nodad")?;
    ip("addr add 10.244.0.1/24 dev pod0")?;
    ip("-6 addr add fd00:244::1/64 dev pod0 nodad")?;
    for (addr, mac, dev) in [
        ("192.0.2.2", "02:00:00:00:00:02", "up0"),
        ("192.0.2.254", "02:00:00:00:00:fe", "up0"),
        ("2001:db8::2", "02:00:00:00:00:02", "up0"),
        ("2001:db8::fe", "02:00:00:00:00:fe", "up0"),
        ("10.244.0.5", "02:00:00:00:01:05", "pod0"),
        ("fd00:244::5", "02:00:00:00:01:05", "pod0"),
        ("10.244.3.0", "02:00:00:00:03:00", "flannel.1"),
        ("fd00:244:3::", "02:00:00:00:03:00", "flannel.1"),
    ] {
        ip(&format!(
            "neigh add {addr} lladdr {mac} dev {dev} nud permanent"
        ))?;
    }
    for route in [
        "route add 10.244.1.0/24 via 192.0.2.2",
        "route add 198.51.100.0/24 via 192.0.2.254",
        "route add 10.244.2.0/24 via 192.0.2.3",
        "route add 10.244.3.0/24 via 10.244.3.0 dev flannel.1 onlink",
        "-6 route add fd00:244:1::/64 via 2001:db8::2",
        "-6 route add 2001:db8:100::/64 via 2001:db8::fe",
        "-6 route add fd00:244:2::/64 via 2001:db8::3",
        "-6 route add fd00:244:3::/64 via fd00:244:3:: dev flannel.1 onlink",
    ] {
        ip(route)?;
    }
    Ok(())
}
