//! Clients that use real kernel sockets created inside a namespace, and
//! wrappers for `curl` and `socat` run inside a namespace.

use std::{
    fmt,
    io::{self, ErrorKind, Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpStream, UdpSocket},
    os::fd::AsRawFd as _,
    process::Stdio,
    sync::{Mutex, mpsc},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};
use socket2::{Domain, Protocol, Socket, Type};

use crate::ns::{self, command_in};

/// Why a request got no answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeError {
    /// TCP: the connection attempt was answered with a RST; UDP: an ICMP
    /// port unreachable came back.
    Refused,
    /// TCP: the established connection was reset before the answer.
    Reset,
    /// Nothing came back in time.
    TimedOut,
    /// No route, or ICMP host / network unreachable.
    Unreachable(String),
    /// The connection was closed before a whole line came back.
    Closed,
    /// Anything else (the message says what).
    Other(String),
}

impl fmt::Display for ProbeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Refused => f.write_str("connection refused"),
            Self::Reset => f.write_str("connection reset"),
            Self::TimedOut => f.write_str("timed out"),
            Self::Unreachable(m) => write!(f, "unreachable: {m}"),
            Self::Closed => f.write_str("closed before an answer"),
            Self::Other(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for ProbeError {}

impl From<io::Error> for ProbeError {
    fn from(e: io::Error) -> Self {
        match e.raw_os_error() {
            Some(libc::ECONNREFUSED) => Self::Refused,
            Some(libc::ECONNRESET | libc::EPIPE) => Self::Reset,
            Some(libc::ETIMEDOUT | libc::EAGAIN | libc::EINPROGRESS) => Self::TimedOut,
            Some(libc::EHOSTUNREACH | libc::ENETUNREACH | libc::EADDRNOTAVAIL) => {
                Self::Unreachable(e.to_string())
            }
            _ => match e.kind() {
                ErrorKind::TimedOut | ErrorKind::WouldBlock => Self::TimedOut,
                _ => Self::Other(e.to_string()),
            },
        }
    }
}

fn remaining(deadline: Instant) -> Result<Duration, ProbeError> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        Err(ProbeError::TimedOut)
    } else {
        Ok(left)
    }
}

/// A pod server's greeting: its name, and the client address it saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    pub server: String,
    pub peer: Option<SocketAddr>,
}

impl Hello {
    fn parse(line: &str) -> Self {
        let (server, peer) = line.split_once(' ').unwrap_or((line, ""));
        Self {
            server: server.to_string(),
            peer: peer.trim().parse().ok(),
        }
    }
}

/// Reads from `s` until a newline; returns the line (without it) and
/// whatever came after it.
fn read_line(s: &mut TcpStream, deadline: Instant) -> Result<(String, Vec<u8>), ProbeError> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(i) = got.iter().position(|&b| b == b'\n') {
            let rest = got.split_off(i + 1);
            got.pop();
            return Ok((String::from_utf8_lossy(&got).into_owned(), rest));
        }
        if got.len() > 65536 {
            return Err(ProbeError::Other("no newline in the first 64 KiB".into()));
        }
        s.set_read_timeout(Some(remaining(deadline)?))?;
        match s.read(&mut buf) {
            Ok(0) => return Err(ProbeError::Closed),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
}

fn tcp_connect(addr: SocketAddr, deadline: Instant) -> Result<TcpStream, ProbeError> {
    tcp_connect_noting(addr, deadline, &mut None)
}

/// Connects to `addr` by `deadline`. `local` gets the local address the
/// kernel chose at `connect`, while the handshake is under way: a refused
/// socket gives its port back.
fn tcp_connect_noting(
    addr: SocketAddr,
    deadline: Instant,
    local: &mut Option<SocketAddr>,
) -> Result<TcpStream, ProbeError> {
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    sock.set_nonblocking(true)?;
    match sock.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e.into()),
    }
    *local = sock.local_addr().ok().and_then(|a| a.as_socket());
    loop {
        let mut pending = libc::pollfd {
            fd: sock.as_raw_fd(),
            events: libc::POLLOUT,
            revents: 0,
        };
        let wait = i32::try_from(remaining(deadline)?.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: one pollfd of an open socket.
        match unsafe { libc::poll(&mut pending, 1, wait) } {
            0 => return Err(ProbeError::TimedOut),
            n if n > 0 => break,
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != ErrorKind::Interrupted {
                    return Err(e.into());
                }
            }
        }
    }
    if let Some(e) = sock.take_error()? {
        return Err(e.into());
    }
    sock.set_nonblocking(false)?;
    let s: TcpStream = sock.into();
    s.set_nodelay(true)?;
    s.set_write_timeout(Some(remaining(deadline)?))?;
    Ok(s)
}

/// Connects from namespace `ns` to `addr` over TCP, sends `payload`, and
/// returns the first line of the answer (a pod server's name), telling a
/// refused connection apart from a timeout.
pub fn tcp_probe(
    ns: &str,
    addr: SocketAddr,
    payload: &[u8],
    timeout: Duration,
) -> Result<String, ProbeError> {
    tcp_probe_traced(ns, addr, payload, timeout).0
}

/// [`tcp_probe`], also telling the local address the connection left from
/// (None if it never began), so that a failure can be looked up in
/// conntrack.
pub fn tcp_probe_traced(
    ns: &str,
    addr: SocketAddr,
    payload: &[u8],
    timeout: Duration,
) -> (Result<String, ProbeError>, Option<SocketAddr>) {
    let deadline = Instant::now() + timeout;
    ns::try_in_netns(ns, || {
        let mut local = None;
        let r = tcp_connect_noting(addr, deadline, &mut local).and_then(|mut s| {
            s.write_all(payload)?;
            read_line(&mut s, deadline).map(|(line, _)| Hello::parse(&line).server)
        });
        (r, local)
    })
    .unwrap_or_else(|e| (Err(ProbeError::Other(format!("{e:#}"))), None))
}

/// Connects over TCP and returns the server's greeting: who answered, and
/// which client address it saw (source NAT shows here).
pub fn tcp_hello(ns: &str, addr: SocketAddr, timeout: Duration) -> Result<Hello, ProbeError> {
    let deadline = Instant::now() + timeout;
    ns::try_in_netns(ns, || {
        let mut s = tcp_connect(addr, deadline)?;
        read_line(&mut s, deadline).map(|(line, _)| Hello::parse(&line))
    })
    .unwrap_or_else(|e| Err(ProbeError::Other(format!("{e:#}"))))
}

/// [`tcp_probe`] with the error as an `anyhow::Error` naming the request.
pub fn tcp_request(
    ns: &str,
    addr: SocketAddr,
    payload: &[u8],
    timeout: Duration,
) -> Result<String> {
    tcp_probe(ns, addr, payload, timeout).with_context(|| format!("TCP {ns} -> {addr}"))
}

/// Connects over TCP, sends `payload`, closes the sending side and reads
/// until the server closes: returns the first line (the server's name) and
/// everything after it (the echo, for the pod servers).
pub fn tcp_echo(
    ns: &str,
    addr: SocketAddr,
    payload: &[u8],
    timeout: Duration,
) -> Result<(String, Vec<u8>)> {
    let deadline = Instant::now() + timeout;
    let r: Result<(String, Vec<u8>), ProbeError> = ns::try_in_netns(ns, || {
        let mut s = tcp_connect(addr, deadline)?;
        s.write_all(payload)?;
        s.shutdown(Shutdown::Write)?;
        let (line, mut rest) = read_line(&mut s, deadline)?;
        let line = Hello::parse(&line).server;
        let mut buf = [0u8; 16384];
        loop {
            s.set_read_timeout(Some(remaining(deadline)?))?;
            match s.read(&mut buf) {
                Ok(0) => return Ok((line, rest)),
                Ok(n) => rest.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
    })
    .unwrap_or_else(|e| Err(ProbeError::Other(format!("{e:#}"))));
    r.with_context(|| format!("TCP echo {ns} -> {addr}"))
}

/// One UDP flow: a socket connected to `addr`, opened in the namespace `ns`
/// (it stays there), so every datagram has the same source address and
/// port: what conntrack keys a UDP flow by.
pub struct UdpFlow {
    socket: UdpSocket,
}

impl UdpFlow {
    /// A connect the node refuses (lb's socket programs refuse a frontend
    /// without endpoints) is [`ProbeError::Refused`].
    pub fn open(ns: &str, addr: SocketAddr) -> Result<Self, ProbeError> {
        Self::open_from(ns, 0, addr)
    }

    /// [`Self::open`] from the local port `port` (0: any), for a tuple known
    /// in advance.
    pub fn open_from(ns: &str, port: u16, addr: SocketAddr) -> Result<Self, ProbeError> {
        let socket = ns::try_in_netns(ns, || -> io::Result<UdpSocket> {
            let local: SocketAddr = match addr {
                SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, port).into(),
                SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, port).into(),
            };
            let s = UdpSocket::bind(local)?;
            s.connect(addr)?;
            Ok(s)
        })
        .map_err(|e| ProbeError::Other(format!("a UDP socket in {ns}: {e:#}")))??;
        Ok(Self { socket })
    }

    /// The flow's own address and port.
    pub fn local(&self) -> Result<SocketAddr> {
        Ok(self.socket.local_addr()?)
    }

    /// Sends `payload` and waits for the answer that echoes it; returns the
    /// answering server's name. Answers that do not echo it (late ones, to
    /// an earlier payload of this flow) are skipped. An ICMP port
    /// unreachable is [`ProbeError::Refused`].
    pub fn ask(&self, payload: &[u8], timeout: Duration) -> Result<String, ProbeError> {
        let deadline = Instant::now() + timeout;
        // An ICMP port unreachable for an earlier datagram fails the next
        // call on the socket (and is cleared by that): send again, so that
        // every ask sends its datagram.
        if let Err(e) = self.socket.send(payload) {
            if e.kind() != ErrorKind::ConnectionRefused {
                return Err(e.into());
            }
            self.socket.send(payload)?;
        }
        let mut buf = vec![0u8; 65536];
        loop {
            self.socket.set_read_timeout(Some(remaining(deadline)?))?;
            match self.socket.recv(&mut buf) {
                Ok(n) => {
                    let got = &buf[..n];
                    let Some(i) = got.iter().position(|&b| b == b'\n') else {
                        return Err(ProbeError::Other("answer without a newline".into()));
                    };
                    if &got[i + 1..] != payload {
                        continue;
                    }
                    return Ok(Hello::parse(&String::from_utf8_lossy(&got[..i])).server);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// Sends `payload` in one UDP datagram from namespace `ns` (from a connected
/// socket of its own, so an answer from another address than `addr` is not
/// taken) and returns the first line of the answer, once the rest of an
/// answer echoes the payload. An ICMP port unreachable is
/// [`ProbeError::Refused`].
pub fn udp_probe(
    ns: &str,
    addr: SocketAddr,
    payload: &[u8],
    timeout: Duration,
) -> Result<String, ProbeError> {
    UdpFlow::open(ns, addr)?.ask(payload, timeout)
}

/// [`udp_probe`] with the error as an `anyhow::Error` naming the request.
pub fn udp_request(
    ns: &str,
    addr: SocketAddr,
    payload: &[u8],
    timeout: Duration,
) -> Result<String> {
    udp_probe(ns, addr, payload, timeout).with_context(|| format!("UDP {ns} -> {addr}"))
}

/// What a long-lived TCP stream saw (see [`tcp_stream`]).
#[derive(Debug, Clone)]
pub struct StreamReport {
    /// The server's name (first line).
    pub server: String,
    /// Bytes written.
    pub sent: u64,
    /// Echoed bytes read back (not counting the name line).
    pub received: u64,
    /// The longest time with bytes outstanding and nothing read back.
    pub longest_stall: Duration,
    /// The offset of the first echoed byte that differs from what was sent.
    pub corrupt_at: Option<u64>,
    /// Why the stream ended early (reset, write error), if it did.
    pub error: Option<String>,
    /// From connect to the end of reading.
    pub elapsed: Duration,
}

impl StreamReport {
    /// Everything sent came back, intact, and nothing failed.
    pub fn lossless(&self) -> bool {
        self.error.is_none() && self.corrupt_at.is_none() && self.received == self.sent
    }
}

/// The byte at offset `i` of a stream.
fn pattern(i: u64) -> u8 {
    (i % 251) as u8
}

#[derive(Default)]
struct StreamState {
    sent: u64,
    received: u64,
    pending_since: Option<Instant>,
    longest_stall: Duration,
}

/// A long-lived stream from namespace `ns` to an echoing server at `addr`:
/// connects, reads the server's name, then sends `total_bytes` in chunks
/// spread evenly over `duration` while reading the echo in parallel, and
/// waits (up to 5 s after the last write) for everything to come back.
/// Fails only if it cannot connect or get the name; a reset mid-stream is
/// reported in [`StreamReport::error`].
pub fn tcp_stream(
    ns: &str,
    addr: SocketAddr,
    total_bytes: u64,
    duration: Duration,
) -> Result<StreamReport> {
    const TICK: Duration = Duration::from_millis(10);
    const DRAIN: Duration = Duration::from_secs(5);
    let r = ns::try_in_netns(ns, || -> Result<StreamReport> {
        let start = Instant::now();
        let connect_deadline = start + Duration::from_secs(5);
        let mut s = tcp_connect(addr, connect_deadline).map_err(|e| anyhow!(e))?;
        let (server, early) = read_line(&mut s, connect_deadline).map_err(|e| anyhow!(e))?;
        let server = Hello::parse(&server).server;
        if !early.is_empty() {
            bail!("the server sent {} bytes before any data", early.len());
        }
        s.set_write_timeout(Some(Duration::from_secs(2)))?;
        let mut reader = s.try_clone()?;
        let state = Mutex::new(StreamState::default());
        let ticks = (duration.as_millis() / TICK.as_millis()).max(1) as u64;
        let chunk = total_bytes.div_ceil(ticks).max(1);
        let lock = || state.lock().unwrap_or_else(|p| p.into_inner());
        let (write_error, (read_error, corrupt_at)) = thread::scope(|sc| {
            let reader = sc.spawn(|| {
                let deadline = start + duration + DRAIN;
                let mut buf = vec![0u8; 65536];
                let mut corrupt_at = None;
                let mut offset = 0u64;
                let error = loop {
                    let Ok(left) = remaining(deadline) else {
                        break Some("echo incomplete when the drain time ran out".to_string());
                    };
                    let _ = reader.set_read_timeout(Some(left.min(Duration::from_millis(100))));
                    match reader.read(&mut buf) {
                        Ok(0) => break None,
                        Ok(n) => {
                            if corrupt_at.is_none()
                                && let Some(i) =
                                    (0..n).find(|&i| buf[i] != pattern(offset + i as u64))
                            {
                                corrupt_at = Some(offset + i as u64);
                            }
                            offset += n as u64;
                            let now = Instant::now();
                            let mut st = lock();
                            if let Some(t) = st.pending_since {
                                st.longest_stall = st.longest_stall.max(now - t);
                            }
                            st.received += n as u64;
                            st.pending_since = (st.received < st.sent).then_some(now);
                        }
                        Err(e)
                            if matches!(
                                e.kind(),
                                ErrorKind::WouldBlock
                                    | ErrorKind::TimedOut
                                    | ErrorKind::Interrupted
                            ) => {}
                        Err(e) => break Some(format!("read: {}", ProbeError::from(e))),
                    }
                };
                let mut st = lock();
                if let Some(t) = st.pending_since {
                    st.longest_stall = st.longest_stall.max(t.elapsed());
                }
                (error, corrupt_at)
            });
            let mut write_error = None;
            let mut offset = 0u64;
            for k in 0..ticks {
                if offset >= total_bytes {
                    break;
                }
                let at = start + duration.mul_f64(k as f64 / ticks as f64);
                thread::sleep(at.saturating_duration_since(Instant::now()));
                let len = chunk.min(total_bytes - offset);
                let data: Vec<u8> = (offset..offset + len).map(pattern).collect();
                {
                    let mut st = lock();
                    if st.pending_since.is_none() {
                        st.pending_since = Some(Instant::now());
                    }
                    st.sent += len;
                }
                if let Err(e) = s.write_all(&data) {
                    write_error = Some(format!("write: {}", ProbeError::from(e)));
                    break;
                }
                offset += len;
            }
            let _ = s.shutdown(Shutdown::Write);
            let read = reader
                .join()
                .unwrap_or((Some("reader panicked".into()), None));
            (write_error, read)
        });
        let st = lock();
        Ok(StreamReport {
            server,
            sent: st.sent,
            received: st.received,
            longest_stall: st.longest_stall,
            corrupt_at,
            error: write_error.or(read_error),
            elapsed: start.elapsed(),
        })
    });
    r.and_then(|r| r)
        .with_context(|| format!("TCP stream {ns} -> {addr}"))
}

/// A plain HTTP/1.0 GET from namespace `ns`: returns the status code and
/// the body.
pub fn http_get(
    ns: &str,
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
) -> Result<(u16, String)> {
    let deadline = Instant::now() + timeout;
    let r = ns::try_in_netns(ns, || -> Result<Vec<u8>, ProbeError> {
        let mut s = tcp_connect(addr, deadline)?;
        write!(
            s,
            "GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )?;
        let mut got = Vec::new();
        let mut buf = [0u8; 16384];
        loop {
            s.set_read_timeout(Some(remaining(deadline)?))?;
            match s.read(&mut buf) {
                Ok(0) => return Ok(got),
                Ok(n) if got.len() < 1 << 20 => got.extend_from_slice(&buf[..n]),
                Ok(_) => return Ok(got),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
    })?;
    let got = r.with_context(|| format!("HTTP GET {path} from {ns} to {addr}"))?;
    let text = String::from_utf8_lossy(&got);
    let status = text
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("HTTP GET {path} from {ns} to {addr}: no status line"))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// Runs `curl` inside namespace `ns` and returns what it printed (the
/// body). `--http0.9` is given so the pod servers' answer (their name, then
/// the echoed request) is taken as a body. Fails on a non-zero exit, with
/// curl's message.
pub fn curl_in(ns: &str, url: &str, timeout: Duration) -> Result<String> {
    let secs = format!("{:.3}", timeout.as_secs_f64());
    let mut cmd = command_in(
        ns,
        "curl",
        ["-sS", "-g", "--http0.9", "--max-time", &secs, url],
    );
    let out = ns::output_with_timeout(&mut cmd, timeout + Duration::from_secs(2))?;
    if !out.status.success() {
        bail!(
            "curl {url} in {ns} failed ({}): {}",
            out.status,
            out.stderr.trim()
        );
    }
    Ok(out.stdout)
}

/// Sends `payload` in one UDP datagram with `socat` inside namespace `ns`
/// and returns the answer (for a pod server: `<name>\n<payload>`). Stops as
/// soon as the whole answer is there; fails (with socat's message, e.g.
/// "Connection refused") if none comes within `timeout`.
pub fn socat_udp_in(
    ns: &str,
    addr: SocketAddr,
    payload: &[u8],
    timeout: Duration,
) -> Result<String> {
    let secs = format!("{:.3}", timeout.as_secs_f64());
    let target = match addr.ip() {
        IpAddr::V4(ip) => format!("UDP4:{ip}:{}", addr.port()),
        IpAddr::V6(ip) => format!("UDP6:[{ip}]:{}", addr.port()),
    };
    let mut child = command_in(ns, "socat", ["-t", &secs, "-T", &secs, "-", &target])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting socat in {ns}"))?;
    let pid = child.id();
    let (mut stdin, mut stdout, mut stderr) = (
        child.stdin.take().context("socat stdin")?,
        child.stdout.take().context("socat stdout")?,
        child.stderr.take().context("socat stderr")?,
    );
    let payload = payload.to_vec();
    let expected_tail = payload.len();
    let (tx, rx) = mpsc::channel::<Vec<u8>>();
    let out_thread = thread::spawn(move || {
        let mut buf = [0u8; 65536];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let err_thread = thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let in_thread = thread::spawn(move || {
        let _ = stdin.write_all(&payload);
    });
    let deadline = Instant::now() + timeout + Duration::from_millis(500);
    let mut got = Vec::new();
    let complete = |got: &[u8]| {
        got.iter()
            .position(|&b| b == b'\n')
            .is_some_and(|i| got.len() - i > expected_tail)
    };
    let mut done = false;
    while !done {
        let Ok(left) = remaining(deadline) else { break };
        match rx.recv_timeout(left) {
            Ok(chunk) => {
                got.extend_from_slice(&chunk);
                done = complete(&got);
            }
            // socat exited (stdout closed) or the time is up.
            Err(_) => break,
        }
    }
    // Not reaped yet, so the pid is still socat's.
    ns::kill(pid, libc::SIGKILL);
    let _ = child.wait();
    let _ = in_thread.join();
    let _ = out_thread.join();
    let err = err_thread.join().unwrap_or_default();
    if done {
        Ok(String::from_utf8_lossy(&got).into_owned())
    } else {
        let mut msg = format!("socat UDP {ns} -> {addr}: no complete answer within {timeout:?}");
        if !got.is_empty() {
            msg += &format!("; got: {:?}", String::from_utf8_lossy(&got));
        }
        if !err.trim().is_empty() {
            msg += &format!("; socat: {}", err.trim());
        }
        bail!(msg)
    }
}
