//! A private network namespace for one test thread, with a fixed topology so that
//! `bpf_fib_lookup` gives known answers:
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

use std::{
    fs::File,
    os::fd::AsRawFd as _,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

pub use lb_testbed::fib::{LOCAL_POD_MAC, NODE_B_MAC, POD_GW_MAC, ROUTER_MAC, UPLINK_MAC};

/// Runs `ip` (or another command) and panics with its output if it fails.
pub fn run(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

pub struct Netns {
    pub name: String,
    original: File,
}

impl Netns {
    /// Creates the namespace and moves the calling thread into it.
    pub fn enter() -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "lbt-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        run(&["ip", "netns", "add", &name]);
        let n = name.as_str();
        let ip = |args: &[&str]| {
            let mut all = vec!["ip", "-n", n];
            all.extend_from_slice(args);
            run(&all);
        };
        ip(&["link", "set", "lo", "up"]);
        ip(&[
            "link",
            "add",
            "up0",
            "address",
            "02:00:00:00:00:01",
            "type",
            "veth",
            "peer",
            "name",
            "up1",
        ]);
        ip(&[
            "link",
            "add",
            "pod0",
            "address",
            "02:00:00:00:01:01",
            "type",
            "veth",
            "peer",
            "name",
            "pod1",
        ]);
        ip(&[
            "link",
            "add",
            "flannel.1",
            "type",
            "vxlan",
            "id",
            "1",
            "dstport",
            "8472",
            "nolearning",
        ]);
        // A jumbo-frame uplink (AWS's MTU is 9001); Flannel's VXLAN device
        // 50 bytes below a 1500-byte underlay.
        for dev in ["up0", "up1"] {
            ip(&["link", "set", dev, "mtu", "9000"]);
        }
        ip(&["link", "set", "flannel.1", "mtu", "1450"]);
        for dev in ["up0", "up1", "pod0", "pod1", "flannel.1"] {
            ip(&["link", "set", dev, "up"]);
        }
        ip(&["addr", "add", "192.0.2.1/24", "dev", "up0"]);
        ip(&["-6", "addr", "add", "2001:db8::1/64", "dev", "up0", "nodad"]);
        ip(&["addr", "add", "10.244.0.1/24", "dev", "pod0"]);
        ip(&[
            "-6",
            "addr",
            "add",
            "fd00:244::1/64",
            "dev",
            "pod0",
            "nodad",
        ]);
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
            ip(&[
                "neigh",
                "add",
                addr,
                "lladdr",
                mac,
                "dev",
                dev,
                "nud",
                "permanent",
            ]);
        }
        ip(&["route", "add", "10.244.1.0/24", "via", "192.0.2.2"]);
        ip(&["route", "add", "198.51.100.0/24", "via", "192.0.2.254"]);
        ip(&["route", "add", "10.244.2.0/24", "via", "192.0.2.3"]);
        ip(&[
            "route",
            "add",
            "10.244.3.0/24",
            "via",
            "10.244.3.0",
            "dev",
            "flannel.1",
            "onlink",
        ]);
        for (prefix, via) in [
            ("fd00:244:2::/64", "2001:db8::3"),
            ("fd00:244:3::/64", "fd00:244:3::"),
        ] {
            let mut args = vec!["-6", "route", "add", prefix, "via", via];
            if prefix.starts_with("fd00:244:3") {
                args.extend(["dev", "flannel.1", "onlink"]);
            }
            ip(&args);
        }
        ip(&[
            "-6",
            "route",
            "add",
            "fd00:244:1::/64",
            "via",
            "2001:db8::2",
        ]);
        ip(&[
            "-6",
            "route",
            "add",
            "2001:db8:100::/64",
            "via",
            "2001:db8::fe",
        ]);
        for sysctl in ["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"] {
            run(&["ip", "netns", "exec", n, "sysctl", "-qw", sysctl]);
        }
        let original = File::open("/proc/thread-self/ns/net").expect("current netns");
        let target = File::open(format!("/run/netns/{name}")).expect("new netns");
        // SAFETY: setns on this thread with valid namespace fds.
        let rc = unsafe { libc::setns(target.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        Self { name, original }
    }

    pub fn ifindex(&self, dev: &str) -> u32 {
        let c = std::ffi::CString::new(dev).unwrap();
        // SAFETY: valid C string; this thread is inside the namespace.
        let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
        assert_ne!(i, 0, "no interface {dev}");
        i
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // SAFETY: back to the namespace we came from, then remove ours.
        unsafe { libc::setns(self.original.as_raw_fd(), libc::CLONE_NEWNET) };
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}
