//! In-process TCP and UDP servers that live in a network namespace.
//!
//! Protocol (both families):
//! - TCP: on accept the server writes its name, a space, the address the
//!   connection came from (as the pod sees it), and a newline, then echoes
//!   everything it receives until the client closes its side (EOF), then
//!   closes. A long stream can so be checked byte for byte. If what it
//!   receives starts with an HTTP request, the server closes once the request
//!   headers are echoed, so an HTTP client (`curl --http0.9`) gets
//!   `<name>\n<request>` and a closed connection.
//! - UDP: each datagram is answered with `<name> <peer>\n` followed by its payload.

use std::{
    io::{self, ErrorKind, Read as _, Write as _},
    net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd as _,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
        mpsc,
    },
    thread::{self, JoinHandle},
    time::Duration,
};

use anyhow::{Context as _, Result, anyhow};
use socket2::{Domain, Protocol, Socket, Type};

use crate::ns;

/// How often the server threads look at their stop flag.
const TICK: Duration = Duration::from_millis(100);
/// Connections served at once per namespace; more are closed at once.
const MAX_CONNECTIONS: usize = 256;

/// Listeners of one namespace; they stop (and their threads are joined)
/// when this is dropped.
pub struct Servers {
    name: String,
    ns: String,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Servers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Servers")
            .field("name", &self.name)
            .field("ns", &self.ns)
            .finish()
    }
}

impl Servers {
    /// The name the servers answer with.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace they listen in.
    pub fn ns(&self) -> &str {
        &self.ns
    }

    /// Stops the servers and waits for their threads (bounded: every thread
    /// looks at the stop flag at least every 100 ms, writes time out after 2 s).
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Starts TCP and UDP servers named `name` inside namespace `ns`, on every
/// address in `addrs` and every port in `ports`. Returns once all sockets
/// are bound and listening (or fails within 5 s).
pub fn serve_in(ns: &str, name: &str, addrs: &[IpAddr], ports: &[u16]) -> Result<Servers> {
    let netns = std::fs::File::open(ns::netns_path(ns))
        .with_context(|| format!("opening network namespace {ns}"))?;
    let stop = Arc::new(AtomicBool::new(false));
    let (ready_tx, ready_rx) = mpsc::channel::<Result<()>>();
    let addrs: Vec<SocketAddr> = addrs
        .iter()
        .flat_map(|a| ports.iter().map(move |p| SocketAddr::new(*a, *p)))
        .collect();
    let thread = {
        let (stop, name, ns) = (stop.clone(), name.to_string(), ns.to_string());
        thread::Builder::new()
            .name(format!("srv {name}"))
            .spawn(move || {
                let sockets = ns::enter_netns(&netns)
                    .with_context(|| format!("entering network namespace {ns}"))
                    .and_then(|()| bind_all(&addrs));
                match sockets {
                    Ok((tcp, udp)) => {
                        let _ = ready_tx.send(Ok(()));
                        serve(&name, &tcp, &udp, &stop);
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
            })
            .context("spawning a server thread")?
    };
    let mut servers = Servers {
        name: name.to_string(),
        ns: ns.to_string(),
        stop,
        thread: Some(thread),
    };
    match ready_rx.recv_timeout(Duration::from_secs(5)) {
        Ok(Ok(())) => Ok(servers),
        Ok(Err(e)) => {
            servers.shutdown();
            Err(e.context(format!("starting servers {name} in {ns}")))
        }
        Err(_) => {
            servers.shutdown();
            Err(anyhow!("servers {name} in {ns} not listening after 5 s"))
        }
    }
}

fn bind_all(addrs: &[SocketAddr]) -> Result<(Vec<TcpListener>, Vec<UdpSocket>)> {
    let mut tcp = Vec::new();
    let mut udp = Vec::new();
    for addr in addrs {
        let t = socket(addr, Type::STREAM, Protocol::TCP)
            .and_then(|s| {
                s.listen(128)?;
                Ok(s)
            })
            .with_context(|| format!("TCP listener on {addr}"))?;
        tcp.push(TcpListener::from(t));
        let u = socket(addr, Type::DGRAM, Protocol::UDP)
            .and_then(|s| {
                force_buffers(&s, UDP_BUFFER_BYTES)?;
                Ok(s)
            })
            .with_context(|| format!("UDP socket on {addr}"))?;
        udp.push(UdpSocket::from(u));
    }
    Ok((tcp, udp))
}

/// Receive and send buffer of each UDP server socket. Tests send bursts of
/// hundreds of datagrams at once (one per flow, each answered once); the
/// default 208 KB holds about 200 small datagrams, and a datagram the server
/// loses looks like one lb lost.
const UDP_BUFFER_BYTES: i32 = 8 << 20;

/// Sets both buffers of `s` to `bytes`, past `net.core.[rw]mem_max` (the
/// `*FORCE` options; the testbed runs as root).
fn force_buffers(s: &Socket, bytes: i32) -> io::Result<()> {
    for opt in [libc::SO_RCVBUFFORCE, libc::SO_SNDBUFFORCE] {
        // SAFETY: setsockopt on an open socket with an int option value.
        let rc = unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&raw const bytes).cast(),
                size_of::<i32>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Sends a UDP answer, waiting (up to 100 ms) while the send buffer is full
/// rather than losing it: the socket is non-blocking for the poll loop.
fn send_answer(u: &UdpSocket, reply: &[u8], peer: SocketAddr) {
    for _ in 0..100 {
        match u.send_to(reply, peer) {
            Err(e) if e.kind() == ErrorKind::WouldBlock => thread::sleep(Duration::from_millis(1)),
            _ => return,
        }
    }
}

fn socket(addr: &SocketAddr, ty: Type, proto: Protocol) -> io::Result<Socket> {
    let s = Socket::new(Domain::for_address(*addr), ty, Some(proto))?;
    s.set_reuse_address(true)?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.bind(&(*addr).into())?;
    s.set_nonblocking(true)?;
    Ok(s)
}

fn serve(name: &str, tcp: &[TcpListener], udp: &[UdpSocket], stop: &Arc<AtomicBool>) {
    let active = Arc::new(AtomicUsize::new(0));
    let mut conns: Vec<JoinHandle<()>> = Vec::new();
    let mut fds: Vec<libc::pollfd> = tcp
        .iter()
        .map(|l| l.as_raw_fd())
        .chain(udp.iter().map(|u| u.as_raw_fd()))
        .map(|fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let mut buf = vec![0u8; 65536];
    while !stop.load(Ordering::SeqCst) {
        // SAFETY: fds is a valid array of pollfd of the given length.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 100) };
        conns.retain(|c| !c.is_finished());
        if n <= 0 {
            continue;
        }
        for l in tcp {
            // Bounded: the backlog holds at most 128 connections.
            for _ in 0..256 {
                let Ok((stream, peer)) = l.accept() else {
                    break;
                };
                if active.load(Ordering::SeqCst) >= MAX_CONNECTIONS {
                    continue;
                }
                active.fetch_add(1, Ordering::SeqCst);
                let (name, stop, active) = (name.to_string(), stop.clone(), active.clone());
                if let Ok(h) =
                    thread::Builder::new()
                        .name(format!("conn {name}"))
                        .spawn(move || {
                            serve_tcp(stream, &name, peer, &stop);
                            active.fetch_sub(1, Ordering::SeqCst);
                        })
                {
                    conns.push(h);
                }
            }
        }
        for u in udp {
            for _ in 0..1024 {
                let Ok((len, peer)) = u.recv_from(&mut buf) else {
                    break;
                };
                let mut reply = Vec::with_capacity(name.len() + 1 + len);
                reply.extend_from_slice(format!("{name} {peer}\n").as_bytes());
                reply.extend_from_slice(&buf[..len]);
                send_answer(u, &reply, peer);
            }
        }
    }
    for c in conns {
        let _ = c.join();
    }
}

fn serve_tcp(mut s: TcpStream, name: &str, peer: SocketAddr, stop: &AtomicBool) {
    let setup = s
        .set_nonblocking(false)
        .and_then(|()| s.set_nodelay(true))
        .and_then(|()| s.set_read_timeout(Some(TICK)))
        .and_then(|()| s.set_write_timeout(Some(Duration::from_secs(2))))
        .and_then(|()| s.write_all(format!("{name} {peer}\n").as_bytes()));
    if setup.is_err() {
        return;
    }
    let mut sniff: Option<Vec<u8>> = Some(Vec::new());
    let mut buf = vec![0u8; 65536];
    while !stop.load(Ordering::SeqCst) {
        let n = match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => continue,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => return,
        };
        if s.write_all(&buf[..n]).is_err() {
            return;
        }
        if let Some(head) = &mut sniff {
            head.extend_from_slice(&buf[..n]);
            match http_request(head) {
                Http::Not => sniff = None,
                Http::Partial => {}
                Http::Complete => break,
            }
        }
    }
    let _ = s.shutdown(Shutdown::Write);
}

enum Http {
    Not,
    Partial,
    Complete,
}

/// Whether `head`, the first bytes of a connection, is an HTTP request and
/// whether its headers are complete.
fn http_request(head: &[u8]) -> Http {
    const METHODS: &[&[u8]] = &[
        b"GET ",
        b"HEAD ",
        b"POST ",
        b"PUT ",
        b"DELETE ",
        b"OPTIONS ",
        b"PATCH ",
    ];
    let method = METHODS.iter().any(|m| {
        if head.len() >= m.len() {
            head.starts_with(m)
        } else {
            m.starts_with(head)
        }
    });
    if !method || head.len() > 16384 {
        Http::Not
    } else if head.windows(4).any(|w| w == b"\r\n\r\n") {
        Http::Complete
    } else {
        Http::Partial
    }
}
