//! A TCP relay from a namespace to this process's own: how an agent inside a
//! node namespace reaches the control plane listening on the host's loopback
//! (as a node's agent reaches its API server over the node's network). The
//! listening socket is made inside the namespace; the upstream connections in
//! the namespace of the thread that started the relay.

use std::{
    io,
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::Duration,
};

use anyhow::{Context as _, Result};

use crate::{ns::lock, ns::try_in_netns};

/// How often the accept loop looks at its stop flag.
const POLL: Duration = Duration::from_millis(50);
/// How long connecting upstream may take (loopback: at once, or refused).
const CONNECT: Duration = Duration::from_secs(2);

/// A running relay; dropping it closes the listener and every connection.
pub struct Relay {
    ns: String,
    listen: SocketAddr,
    stop: Arc<AtomicBool>,
    /// Cut: every connection is closed and new ones are closed at once.
    cut: Arc<AtomicBool>,
    /// Both ends of every open connection, to shut down on a cut or drop.
    open: Arc<Mutex<Open>>,
    accept: Option<thread::JoinHandle<()>>,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("listen", &self.listen)
            .finish_non_exhaustive()
    }
}

impl Relay {
    /// Listens on `listen` inside the network namespace `ns` and relays each
    /// connection to `upstream`, reached from the caller's namespace. When
    /// either side closes, so does the other: an upstream that goes away (an
    /// API server stopped) shows as closed connections inside `ns`, and
    /// connections made meanwhile are accepted and closed at once.
    pub fn start(ns: &str, listen: SocketAddr, upstream: SocketAddr) -> Result<Self> {
        let listener = try_in_netns(ns, || TcpListener::bind(listen))?
            .with_context(|| format!("listening on {listen} in {ns}"))?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let cut = Arc::new(AtomicBool::new(false));
        let open = Arc::new(Mutex::new(Open::default()));
        let accept = {
            let (stop, cut, open) = (stop.clone(), cut.clone(), open.clone());
            thread::Builder::new()
                .name(format!("relay {listen}"))
                .spawn(move || accept_loop(&listener, upstream, &stop, &cut, &open))?
        };
        Ok(Self {
            ns: ns.to_string(),
            listen,
            stop,
            cut,
            open,
            accept: Some(accept),
        })
    }

    /// Cuts the way through (a network partition between the namespace and
    /// the upstream): open connections are closed, new ones are closed as
    /// soon as they are accepted, until [`Self::restore`].
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        self.close_all();
    }

    /// Lets connections through again.
    pub fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }

    /// A silent partition (`on`), or its end: every packet to and from the
    /// listening port inside the namespace is dropped, so that open
    /// connections hang without a reset and new ones time out, as behind a
    /// firewall that drops.
    pub fn silence(&self, on: bool) -> Result<()> {
        let port = self.listen.port();
        let script = if on {
            format!(
                "add table inet lb-relay-silence\n\
                 add chain inet lb-relay-silence out {{ type filter hook output priority 0 ; }}\n\
                 add rule inet lb-relay-silence out tcp dport {port} drop\n\
                 add rule inet lb-relay-silence out tcp sport {port} drop\n"
            )
        } else {
            "delete table inet lb-relay-silence\n".to_string()
        };
        let mut child = std::process::Command::new("ip")
            .args(["netns", "exec", &self.ns, "nft", "-f", "-"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .context("running nft")?;
        io::Write::write_all(
            child.stdin.as_mut().context("nft's stdin")?,
            script.as_bytes(),
        )?;
        drop(child.stdin.take());
        let status = child.wait()?;
        anyhow::ensure!(status.success(), "nft in {}: {status}", self.ns);
        Ok(())
    }

    fn close_all(&self) {
        for (_, (a, b)) in lock(&self.open).conns.drain() {
            let _ = (a.shutdown(Shutdown::Both), b.shutdown(Shutdown::Both));
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        self.close_all();
    }
}

fn accept_loop(
    listener: &TcpListener,
    upstream: SocketAddr,
    stop: &AtomicBool,
    cut: &AtomicBool,
    open: &Arc<Mutex<Open>>,
) {
    while !stop.load(Ordering::SeqCst) {
        // Non-blocking: WouldBlock (nothing to accept) or a passing error.
        let Ok((client, _)) = listener.accept() else {
            thread::sleep(POLL);
            continue;
        };
        if cut.load(Ordering::SeqCst) {
            let _ = client.shutdown(Shutdown::Both);
            continue;
        }
        let _ = client.set_nonblocking(false);
        // Refused upstream: the client sees its connection closed, as it
        // would see a refused one.
        let Ok(server) = TcpStream::connect_timeout(&upstream, CONNECT) else {
            let _ = client.shutdown(Shutdown::Both);
            continue;
        };
        let _ = (client.set_nodelay(true), server.set_nodelay(true));
        let (Ok(c2), Ok(s2), Ok(c3), Ok(s3)) = (
            client.try_clone(),
            server.try_clone(),
            client.try_clone(),
            server.try_clone(),
        ) else {
            continue;
        };
        let id = {
            let mut o = lock(open);
            o.next += 1;
            let id = o.next;
            o.conns.insert(id, (c3, s3));
            id
        };
        pipe(client, s2, open.clone(), id);
        pipe(server, c2, open.clone(), id);
    }
}

/// The open connections by id: their client and upstream sockets.
#[derive(Default)]
struct Open {
    next: u64,
    conns: std::collections::HashMap<u64, (TcpStream, TcpStream)>,
}

/// Copies `from` to `to` on a thread of its own; at the end shuts both down,
/// so that the other direction ends too, and forgets connection `id`.
fn pipe(mut from: TcpStream, mut to: TcpStream, open: Arc<Mutex<Open>>, id: u64) {
    thread::spawn(move || {
        let _ = io::copy(&mut from, &mut to);
        let _ = to.shutdown(Shutdown::Both);
        let _ = from.shutdown(Shutdown::Both);
        lock(&open).conns.remove(&id);
    });
}
