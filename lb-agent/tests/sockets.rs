//! Socket-level balancing for the node's own clients: real sockets of the
//! Lab's namespace (the "node") connect and send to frontends programmed in
//! its maps, with the socket programs attached to the root of the cgroup v2
//! hierarchy. The backends are servers on the namespace's own addresses, so
//! every answer proves where the call went. Needs root (BPF, cgroups,
//! network namespaces).

mod support;

use std::{
    io::{ErrorKind, Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    path::PathBuf,
    time::Duration,
};

use lb_agent::bpf::sock;
use lb_common::SockEvent;
use support::{CLUSTER_IP, Lab, TCP, UDP, backend, sa};

/// The socket programs of `lab`'s datapath attached to the root cgroup, their
/// links pinned in the lab's pin directory (its scope removes them, and so
/// detaches the programs, even if the test dies).
struct Attached {
    links: PathBuf,
}

impl Attached {
    fn new(lab: &mut Lab) -> Self {
        let scope = lab.fib.scope();
        scope.mark_pin_dir().expect("the lab's pin directory");
        let links = scope.pin_dir().join("links");
        std::fs::create_dir_all(&links).expect("a directory on bpffs for the links");
        let root = sock::cgroup2_root(std::path::Path::new("/sys/fs/cgroup"))
            .expect("a cgroup v2 hierarchy");
        lab.dp
            .attach_sockets(&root, &links)
            .expect("attach the socket programs");
        assert_eq!(sock::pinned(&links), sock::PROGRAMS.len());
        Self { links }
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        let _ = sock::detach(&self.links);
    }
}

fn calls(lab: &Lab, event: SockEvent) -> u64 {
    lab.maps
        .sock_counters()
        .unwrap()
        .into_iter()
        .find(|(e, _)| *e == event)
        .unwrap()
        .1
}

const TIMEOUT: Duration = Duration::from_secs(2);

/// A TCP server on `addr` that answers one connection with the address it
/// was reached at and the peer's, then closes (giving up after a while, so
/// that a connection that never comes fails the test instead of hanging it).
fn tcp_server(addr: SocketAddr) -> std::thread::JoinHandle<()> {
    let listener = TcpListener::bind(addr).expect("bind the backend");
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let deadline = std::time::Instant::now() + TIMEOUT;
        while std::time::Instant::now() < deadline {
            match listener.accept() {
                Ok((mut s, peer)) => {
                    let local = s.local_addr().unwrap();
                    let _ = writeln!(s, "{local} {peer}");
                    return;
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    })
}

fn read_line(mut s: TcpStream) -> String {
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.trim().to_string()
}

/// Echoes `n` datagrams on `sock`, each prefixed with the address it came to.
fn udp_echo(sock: UdpSocket, n: usize) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        sock.set_read_timeout(Some(TIMEOUT)).unwrap();
        let mut buf = [0u8; 512];
        for _ in 0..n {
            let Ok((len, peer)) = sock.recv_from(&mut buf) else {
                return;
            };
            let mut reply = format!("{} ", sock.local_addr().unwrap()).into_bytes();
            reply.extend_from_slice(&buf[..len]);
            let _ = sock.send_to(&reply, peer);
        }
    })
}

#[test]
fn tcp_connects_go_to_a_backend_and_the_peer_reads_as_the_frontend() {
    let mut lab = Lab::new();
    let _attached = Attached::new(&mut lab);
    for (vip, be) in [
        (sa("10.96.0.10:80"), sa("192.0.2.1:8080")),
        (sa("[fd00:96::10]:80"), sa("[2001:db8::1]:8080")),
    ] {
        lab.service(&[vip], TCP, &[backend(&be.to_string(), true)], CLUSTER_IP);
        let server = tcp_server(be);
        let s = TcpStream::connect_timeout(&vip, TIMEOUT)
            .unwrap_or_else(|e| panic!("connect to {vip}: {e}"));
        assert_eq!(
            s.peer_addr().unwrap(),
            vip,
            "getpeername shows the frontend"
        );
        let line = read_line(s);
        assert!(
            line.starts_with(&format!("{be} ")),
            "{vip}: answered by {line:?}, expected the backend {be}"
        );
        server.join().unwrap();
    }
    assert_eq!(calls(&lab, SockEvent::Connected), 2);
    assert_eq!(calls(&lab, SockEvent::Restored), 2);
}

#[test]
fn a_dual_stack_socket_reaches_an_ipv4_frontend_through_its_mapped_address() {
    let mut lab = Lab::new();
    let _attached = Attached::new(&mut lab);
    let vip = sa("10.96.0.11:80");
    let be = sa("192.0.2.1:8081");
    lab.service(&[vip], TCP, &[backend(&be.to_string(), true)], CLUSTER_IP);
    let server = tcp_server(be);
    let mapped = sa("[::ffff:10.96.0.11]:80");
    let s = TcpStream::connect_timeout(&mapped, TIMEOUT)
        .unwrap_or_else(|e| panic!("connect to {mapped}: {e}"));
    assert_eq!(s.peer_addr().unwrap(), mapped);
    let line = read_line(s);
    assert!(
        line.starts_with(&format!("{be} ")),
        "answered by {line:?}, expected {be}"
    );
    server.join().unwrap();
}

#[test]
fn udp_datagrams_go_to_a_backend_and_come_back_from_the_frontend() {
    let mut lab = Lab::new();
    let _attached = Attached::new(&mut lab);
    for (vip, be, client) in [
        (sa("10.96.0.53:53"), sa("192.0.2.1:5353"), "0.0.0.0:0"),
        (sa("[fd00:96::53]:53"), sa("[2001:db8::1]:5353"), "[::]:0"),
    ] {
        lab.service(&[vip], UDP, &[backend(&be.to_string(), true)], CLUSTER_IP);
        let server = udp_echo(UdpSocket::bind(be).unwrap(), 2);

        // Unconnected: sendto the frontend, recvfrom shows it as the source.
        let c = UdpSocket::bind(client).unwrap();
        c.set_read_timeout(Some(TIMEOUT)).unwrap();
        c.send_to(b"unconnected", vip).unwrap();
        let mut buf = [0u8; 512];
        let (n, from) = c.recv_from(&mut buf).expect("an answer");
        assert_eq!(from, vip, "the answer's source reads as the frontend");
        let text = String::from_utf8_lossy(&buf[..n]).to_string();
        assert_eq!(text, format!("{be} unconnected"));

        // Connected: connect, send, recv, and getpeername.
        let c = UdpSocket::bind(client).unwrap();
        c.set_read_timeout(Some(TIMEOUT)).unwrap();
        c.connect(vip).unwrap();
        assert_eq!(c.peer_addr().unwrap(), vip);
        c.send(b"connected").unwrap();
        let n = c.recv(&mut buf).expect("an answer");
        assert_eq!(
            String::from_utf8_lossy(&buf[..n]),
            format!("{be} connected")
        );
        server.join().unwrap();
    }
    assert_eq!(calls(&lab, SockEvent::Sent), 2);
    assert_eq!(calls(&lab, SockEvent::Connected), 2);
    assert!(calls(&lab, SockEvent::Restored) >= 4);
}

#[test]
fn a_frontend_without_backends_and_a_clusterip_port_that_is_no_service_port_are_refused() {
    let mut lab = Lab::new();
    let _attached = Attached::new(&mut lab);
    let vip = sa("10.96.0.20:80");
    let tcp = lab.service(&[vip], TCP, &[], CLUSTER_IP);
    lab.service(&[vip], UDP, &[], CLUSTER_IP);
    lab.cluster_address(&tcp);
    let refused = |r: std::io::Result<()>, what: &str| match r {
        Err(e) => assert_eq!(e.kind(), ErrorKind::ConnectionRefused, "{what}: {e}"),
        Ok(()) => panic!("{what}: not refused"),
    };
    refused(
        TcpStream::connect_timeout(&vip, TIMEOUT).map(drop),
        "TCP without backends",
    );
    let u = UdpSocket::bind("0.0.0.0:0").unwrap();
    refused(
        u.send_to(b"x", vip).map(drop),
        "UDP sendto without backends",
    );
    refused(
        TcpStream::connect_timeout(&sa("10.96.0.20:81"), TIMEOUT).map(drop),
        "TCP to a port of the ClusterIP that is no Service port",
    );
    assert_eq!(calls(&lab, SockEvent::Refused), 3);
}

#[test]
fn sockets_of_other_network_namespaces_are_left_alone() {
    let mut lab = Lab::new();
    let _attached = Attached::new(&mut lab);
    let vip = sa("10.96.0.12:80");
    lab.service(&[vip], TCP, &[backend("192.0.2.1:8082", true)], CLUSTER_IP);
    // A thread in another namespace (a pod's, or another node's in the
    // testbed): its connect to the VIP is not translated, so it finds no
    // route (that namespace has no interface but lo).
    let other = lab.fib.scope().add_netns("other", &[]).unwrap();
    let outcome = lb_testbed::in_netns(&other, move || {
        TcpStream::connect_timeout(&vip, TIMEOUT)
            .map(drop)
            .map_err(|e| e.kind())
    });
    assert_eq!(outcome, Err(ErrorKind::NetworkUnreachable));
    assert_eq!(calls(&lab, SockEvent::Connected), 0);
}
