//! The testbed without any load balancer: connectivity as a CNI gives it,
//! clients and servers, agent plumbing (with a fake agent), teardown and
//! cleanup. Needs root.

use std::{
    io::{BufRead as _, BufReader},
    net::{IpAddr, SocketAddr},
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{Mutex, mpsc},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use lb_testbed::{
    AGENT_HEALTHZ, Cluster, Options, ProbeError, command_in, curl_in, http_get, in_netns,
    output_with_timeout, serve_in, socat_udp_in, tcp_echo, tcp_probe, tcp_request, tcp_stream,
    udp_probe, udp_request,
};

const T: Duration = Duration::from_secs(3);
const PORT: u16 = 8080;
/// Nobody listens here.
const CLOSED: u16 = 9;

/// Serialises `Cluster::up` with the creation of fake leftovers, which any
/// `up` would otherwise remove half-made.
static UP: Mutex<()> = Mutex::new(());

fn up(opts: Options) -> Result<Cluster> {
    let _g = UP.lock().unwrap_or_else(|p| p.into_inner());
    Cluster::up(opts)
}

fn netns_list() -> String {
    let out = output_with_timeout(Command::new("ip").args(["netns", "list"]), T).unwrap();
    out.stdout
}

fn sock(ip: IpAddr, port: u16) -> SocketAddr {
    SocketAddr::new(ip, port)
}

#[test]
fn pods_nodes_and_client_connect_as_with_a_cni() -> Result<()> {
    let c = up(Options::default())?;
    c.start_pod_servers(&[PORT])?;

    // Names fit, and are the run's.
    let run = c.run_id().to_string();
    for n in c.nodes() {
        for name in [n.uplink(), n.bridge_port()]
            .into_iter()
            .chain(n.host_veths())
        {
            ensure!(name.len() <= 15 && name.contains(&run), "{name}");
        }
        ensure!(n.ns().contains(&run) && n.ns().contains(&std::process::id().to_string()));
    }
    ensure!(c.pods().count() == 4);
    ensure!(c.node("node-a").ipv4().to_string() == "192.168.77.10");
    ensure!(c.node("node-b").ipv6().to_string() == "fd00:77::11");
    ensure!(c.pod("pod-b1").ipv4().to_string() == "10.244.2.11");
    ensure!(c.pod("pod-b1").ipv6().to_string() == "fd00:244:2::11");
    ensure!(c.node("node-a").pod_iface_pattern() == format!("cali{run}a*"));

    // Offloads: complete checksums on the emulated NICs and out of the
    // bridge, GRO (NAPI) on the bridge side of the node uplinks, pod veths
    // untouched.
    let features = |ns: &str, dev: &str| -> Result<String> {
        Ok(output_with_timeout(&mut command_in(ns, "ethtool", ["-k", dev]), T)?.stdout)
    };
    let a = c.node("node-a");
    ensure!(features(a.ns(), a.uplink())?.contains("tx-checksumming: off"));
    ensure!(features(c.client().ns(), c.client().iface())?.contains("tx-checksumming: off"));
    let port = features(c.lan_ns(), a.bridge_port())?;
    ensure!(port.contains("generic-receive-offload: on") && port.contains("tx-checksumming: off"));
    ensure!(features(a.ns(), a.host_veths()[0])?.contains("tx-checksumming: on"));
    ensure!(features(c.pod("pod-a0").ns(), "eth0")?.contains("tx-checksumming: on"));

    // Pod to pod: same node and across nodes, both ways, TCP and UDP, v4 and v6.
    for (from, to) in [
        ("pod-a0", "pod-a1"),
        ("pod-a0", "pod-b0"),
        ("pod-b1", "pod-a1"),
    ] {
        let (src, dst) = (c.pod(from), c.pod(to));
        for v6 in [false, true] {
            let addr = dst.sock(v6, PORT);
            ensure!(tcp_request(src.ns(), addr, b"hi", T)? == to);
            ensure!(udp_request(src.ns(), addr, b"hello", T)? == to);
        }
    }
    // The echo, in bulk.
    let payload: Vec<u8> = (0..200_000u32).map(|i| (i % 253) as u8).collect();
    let (name, echo) = tcp_echo(
        c.pod("pod-a0").ns(),
        c.pod("pod-b1").sock(true, PORT),
        &payload,
        T,
    )?;
    ensure!(
        name == "pod-b1" && echo == payload,
        "echo of {} bytes",
        echo.len()
    );

    // Debian's tools inside a namespace.
    for url in ["http://10.244.2.10:8080/", "http://[fd00:244:2::10]:8080/x"] {
        let body = curl_in(c.pod("pod-a1").ns(), url, T)?;
        // The greeting names the server and the client address it saw.
        let (hello, rest) = body.split_once('\n').unwrap_or_default();
        ensure!(
            hello.starts_with("pod-b0 ")
                && (hello.contains(" 10.244.1.11:") || hello.contains(" [fd00:244:1::11]:")),
            "curl {url}: {body:?}"
        );
        ensure!(rest.starts_with("GET /"), "curl {url}: {body:?}");
    }
    for v6 in [false, true] {
        let reply = socat_udp_in(
            c.pod("pod-b0").ns(),
            c.pod("pod-a0").sock(v6, PORT),
            b"ping",
            T,
        )?;
        let (hello, echo) = reply.split_once('\n').unwrap_or_default();
        let peer = if v6 {
            "[fd00:244:2::10]:"
        } else {
            "10.244.2.10:"
        };
        ensure!(
            hello.starts_with(&format!("pod-a0 {peer}")) && echo == "ping",
            "socat: {reply:?}"
        );
    }

    // Refusal is told apart from a timeout.
    let (a0, b0) = (c.pod("pod-a0"), c.pod("pod-b0"));
    for v6 in [false, true] {
        let closed = b0.sock(v6, CLOSED);
        ensure!(tcp_probe(a0.ns(), closed, b"", T) == Err(ProbeError::Refused));
        ensure!(udp_probe(a0.ns(), closed, b"x", T) == Err(ProbeError::Refused));
    }
    ensure!(curl_in(a0.ns(), "http://10.244.2.10:9/", T).is_err());

    // Without lb nothing routes service addresses: unreachable, at once.
    let client = c.client();
    for (ns, ip) in [
        (a0.ns(), c.cluster_ip_prefixes()[0].host(10)),
        (a0.ns(), c.cluster_ip_prefixes()[1].host(10)),
        (client.ns(), c.cluster_ip_prefixes()[0].host(10)),
        (client.ns(), c.lb_prefixes()[0].host(10)),
        (client.ns(), c.lb_prefixes()[1].host(10)),
        (client.ns(), c.external_ip_prefixes()[1].host(10)),
    ] {
        let r = tcp_probe(ns, sock(ip, 80), b"", T);
        ensure!(
            matches!(r, Err(ProbeError::Unreachable(_))),
            "{ns} -> {ip}: {r:?}"
        );
    }

    // The client and the pods reach the nodes' addresses; nodes reach pods.
    let _node_servers = c
        .nodes()
        .iter()
        .map(|n| serve_in(n.ns(), n.name(), &n.addrs(), &[8081]))
        .collect::<Result<Vec<_>>>()?;
    for n in c.nodes() {
        for v6 in [false, true] {
            let addr = n.sock(v6, 8081);
            ensure!(tcp_request(client.ns(), addr, b"", T)? == n.name());
            ensure!(udp_request(client.ns(), addr, b"u", T)? == n.name());
            ensure!(tcp_request(a0.ns(), addr, b"", T)? == n.name());
            ensure!(tcp_request(n.ns(), b0.sock(v6, PORT), b"", T)? == "pod-b0");
        }
    }

    // A long-lived stream loses nothing.
    let report = tcp_stream(
        a0.ns(),
        c.pod("pod-b1").sock(false, PORT),
        4 << 20,
        Duration::from_secs(2),
    )?;
    ensure!(report.server == "pod-b1", "{report:?}");
    ensure!(report.lossless() && report.sent == 4 << 20, "{report:?}");
    ensure!(report.longest_stall < Duration::from_secs(1), "{report:?}");

    // What node-b's uplink receives has complete checksums, as from a real
    // NIC, even for a bulk stream that the bridge's GRO merges.
    let b = c.node("node-b");
    let (total, bad) = thread::scope(|s| -> Result<(usize, usize)> {
        let (ready_tx, ready_rx) = mpsc::channel();
        let cap = s.spawn(|| {
            in_netns(b.ns(), || {
                tcp_checksums(b.uplink(), Duration::from_millis(1500), ready_tx)
            })
        });
        ready_rx.recv_timeout(T)?;
        let r = tcp_stream(
            a0.ns(),
            b0.sock(false, PORT),
            8 << 20,
            Duration::from_secs(1),
        )?;
        ensure!(r.lossless(), "{r:?}");
        cap.join().expect("capture thread")
    })?;
    ensure!(
        total > 50 && bad == 0,
        "{bad} of {total} TCP checksums incomplete"
    );

    // in_netns really is inside.
    let inside = in_netns(a0.ns(), || std::fs::read_link("/proc/thread-self/ns/net"))?;
    let expected = std::fs::metadata(Path::new("/run/netns").join(a0.ns()))?.ino();
    ensure!(
        inside.to_string_lossy() == format!("net:[{expected}]"),
        "{inside:?}"
    );
    Ok(())
}

fn fake_agent(dir: &Path, name: &str, body: &str) -> Result<PathBuf> {
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n"))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
    Ok(path)
}

#[test]
fn agents_start_restart_and_stop() -> Result<()> {
    let c = up(Options {
        agent_ready_timeout: Duration::from_secs(2),
        ..Options::default()
    })?;
    let dir = c.run_dir().to_path_buf();
    // Says where it runs and what it was given, then answers 200 on the
    // healthz address until SIGTERM.
    let healthz = fake_agent(
        &dir,
        "healthz",
        r"read -r _; printf 'HTTP/1.0 200 OK\r\n\r\nok\n'",
    )?;
    let good = fake_agent(
        &dir,
        "good-agent",
        &(r#"echo "fake agent $$ in $(readlink /proc/$$/ns/net): $*"
prev=
for a in "$@"; do
  [ "$prev" = --pin-path ] && [ -d "$(dirname "$a")" ] && echo "pin parent visible"
  prev=$a
done
exec socat TCP-LISTEN:10256,bind=127.0.0.1,reuseaddr,fork EXEC:"#
            .to_string()
            + &healthz.display().to_string()),
    )?;
    let manifests = dir.join("manifests");
    std::fs::create_dir_all(&manifests)?;
    let t0 = Instant::now();
    c.start_agents(&good, &manifests)?;
    ensure!(t0.elapsed() < Duration::from_secs(10));
    let run = c.run_id();
    for n in c.nodes() {
        let log = c.agent_log(n.name());
        let ino = std::fs::metadata(Path::new("/run/netns").join(n.ns()))?.ino();
        for want in [
            format!("in net:[{ino}]"),
            format!("run --manifests {}", manifests.display()),
            format!("--node-name {}", n.name()),
            format!("--node-ip {}", n.node_ip_arg()),
            format!("--iface {}", n.uplink()),
            format!("--pod-ifaces cali{run}{}*", &n.name()[5..]),
            format!("--pin-path /sys/fs/bpf/lb-test-{run}/{}/lb", n.name()),
            "--log-level info".to_string(),
            "pin parent visible".to_string(),
        ] {
            ensure!(log.contains(&want), "{want:?} not in {log:?}");
        }
        ensure!(http_get(n.ns(), AGENT_HEALTHZ, "/healthz", T)?.0 == 200);
    }

    let before = c.agent_pid("node-a").context("agent a")?;
    c.restart_agent("node-a")?;
    let after = c.agent_pid("node-a").context("agent a")?;
    ensure!(before != after);
    ensure!(c.agent_log("node-a").matches("fake agent").count() == 2);

    c.stop_agent("node-b")?;
    ensure!(c.agent_pid("node-b").is_none());
    ensure!(http_get(c.node("node-b").ns(), AGENT_HEALTHZ, "/healthz", T).is_err());
    c.stop_agent("node-a")?;

    // An agent that dies at once: reported with its log, without waiting.
    let dying = fake_agent(&dir, "dying-agent", "echo 'fatal: no such map' >&2; exit 3")?;
    let t0 = Instant::now();
    let e = c.start_agents(&dying, &manifests).unwrap_err();
    let msg = format!("{e:#}");
    ensure!(
        msg.contains("exited") && msg.contains("fatal: no such map"),
        "{msg}"
    );
    ensure!(t0.elapsed() < Duration::from_secs(2));
    c.stop_agent("node-a")?;
    c.stop_agent("node-b")?;

    // One that never answers: the ready timeout, with its log.
    let mute = fake_agent(&dir, "mute-agent", "echo 'still loading'; exec sleep 30")?;
    let e = c.start_agents(&mute, &manifests).unwrap_err();
    let msg = format!("{e:#}");
    ensure!(
        msg.contains("not ready") && msg.contains("still loading"),
        "{msg}"
    );
    Ok(())
}

/// Run only as the child of `sigint_tears_down`.
#[test]
fn sigint_child() -> Result<()> {
    if std::env::var_os("LB_TESTBED_SIGINT_CHILD").is_none() {
        return Ok(());
    }
    let c = Cluster::up(Options::default())?;
    println!("READY {}", c.run_id());
    thread::sleep(Duration::from_secs(20));
    Ok(())
}

#[test]
fn teardown_cleanup_and_two_clusters() -> Result<()> {
    let c1 = up(Options::default())?;
    let c2 = up(Options {
        pods_per_node: 1,
        ..Options::default()
    })?;
    ensure!(c1.run_id() != c2.run_id());
    c1.start_pod_servers(&[PORT])?;
    c2.start_pod_servers(&[PORT])?;
    let probe = |c: &Cluster| -> Result<()> {
        let (a0, b0) = (c.pod("pod-a0"), c.pod("pod-b0"));
        ensure!(tcp_request(a0.ns(), b0.sock(true, PORT), b"", T)? == "pod-b0");
        Ok(())
    };
    probe(&c1)?;
    probe(&c2)?;

    // Teardown leaves nothing of the run behind; the other cluster lives on.
    let run1 = c1.run_id().to_string();
    let pin1 = c1.pin_dir().to_path_buf();
    let dir1 = c1.run_dir().to_path_buf();
    ensure!(netns_list().contains(&run1));
    c1.down();
    ensure!(!netns_list().contains(&run1), "{}", netns_list());
    let links = output_with_timeout(Command::new("ip").args(["-o", "link"]), T)?.stdout;
    ensure!(!links.contains(&format!("lb{run1}")), "{links}");
    ensure!(!pin1.exists() && !dir1.exists());
    probe(&c2)?;

    // Leftovers of a dead run (namespace with a link and a process still in
    // it, pin dir) are removed by the next `up`.
    let dead_pid = {
        let mut child = Command::new("true").spawn()?;
        let pid = child.id();
        child.wait()?;
        pid
    };
    let (c3, mut orphan, stale_ns, stale_pin) = {
        let _g = UP.lock().unwrap_or_else(|p| p.into_inner());
        let stale_ns = format!("lbt-dead-{dead_pid}-node-a");
        let stale_pin = PathBuf::from("/sys/fs/bpf/lb-test-dead");
        let ip = |args: &[&str]| output_with_timeout(Command::new("ip").args(args), T);
        ensure!(ip(&["netns", "add", &stale_ns])?.status.success());
        ensure!(
            ip(&[
                "-n",
                &stale_ns,
                "link",
                "add",
                "lbdead-a-up",
                "type",
                "veth",
                "peer",
                "name",
                "lbdead-a-br"
            ])?
            .status
            .success()
        );
        std::fs::create_dir_all(stale_pin.join(format!("owner-{dead_pid}")))?;
        std::fs::create_dir_all(stale_pin.join("node-a"))?;
        let orphan = command_in(&stale_ns, "sleep", ["30"])
            .stdout(Stdio::null())
            .spawn()?;
        let c3 = Cluster::up(Options {
            pods_per_node: 1,
            ..Options::default()
        })?;
        (c3, orphan, stale_ns, stale_pin)
    };
    ensure!(!netns_list().contains(&stale_ns), "{}", netns_list());
    ensure!(!stale_pin.exists());
    let deadline = Instant::now() + T;
    while orphan.try_wait()?.is_none() {
        ensure!(Instant::now() < deadline, "the orphan still runs");
        thread::sleep(Duration::from_millis(20));
    }
    c3.start_pod_servers(&[PORT])?;
    probe(&c3)?;
    drop(c3);

    // SIGINT: the handler tears down and exits 130.
    let mut child = Command::new(std::env::current_exe()?)
        .args(["sigint_child", "--exact", "--nocapture", "--test-threads=1"])
        .env("LB_TESTBED_SIGINT_CHILD", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let stdout = child.stdout.take().context("child stdout")?;
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            // The harness prints "test sigint_child ... " before it.
            if let Some((_, run)) = line.split_once("READY ") {
                let _ = tx.send(run.trim().to_string());
            }
        }
    });
    let run = match rx.recv_timeout(Duration::from_secs(15)) {
        Ok(run) => run,
        Err(_) => {
            // SIGTERM first, so that it tears down what it made.
            // SAFETY: signalling our own child, not yet reaped.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
            thread::sleep(Duration::from_secs(3));
            let _ = child.kill();
            let _ = child.wait();
            anyhow::bail!("the SIGINT child did not come up");
        }
    };
    ensure!(netns_list().contains(&run));
    // SAFETY: signalling our own child, not yet reaped.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            anyhow::bail!("the SIGINT child did not exit");
        }
        thread::sleep(Duration::from_millis(20));
    };
    ensure!(status.code() == Some(130), "{status}");
    ensure!(!netns_list().contains(&run), "{}", netns_list());
    drop(c2);
    Ok(())
}

/// Captures IPv4 TCP packets arriving on `dev` (in the current thread's
/// namespace) for `duration` and checks their checksums: (seen, wrong).
fn tcp_checksums(dev: &str, duration: Duration, ready: mpsc::Sender<()>) -> Result<(usize, usize)> {
    let proto = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: plain socket calls on a descriptor we own; the buffers and
    // structs passed live for each call.
    unsafe {
        let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto));
        ensure!(
            fd >= 0,
            "packet socket: {}",
            std::io::Error::last_os_error()
        );
        let name = std::ffi::CString::new(dev)?;
        let mut sll: libc::sockaddr_ll = std::mem::zeroed();
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = proto;
        sll.sll_ifindex = libc::if_nametoindex(name.as_ptr()) as i32;
        let len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 100_000,
        };
        let ok = libc::bind(fd, (&raw const sll).cast(), len) == 0
            && libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const tv).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            ) == 0;
        let _ = ready.send(());
        let (mut total, mut bad) = (0, 0);
        let deadline = Instant::now() + duration;
        let mut buf = vec![0u8; 70_000];
        while ok && Instant::now() < deadline {
            let mut from: libc::sockaddr_ll = std::mem::zeroed();
            let mut from_len = len;
            let n = libc::recvfrom(
                fd,
                buf.as_mut_ptr().cast(),
                buf.len(),
                0,
                (&raw mut from).cast(),
                &mut from_len,
            );
            if n <= 0 || from.sll_pkttype == libc::PACKET_OUTGOING {
                continue;
            }
            let p = &buf[..n as usize];
            if p.len() < 34 || p[12..14] != [0x08, 0x00] || p[23] != 6 {
                continue;
            }
            let ip = &p[14..];
            let ihl = usize::from(ip[0] & 0xf) * 4;
            let ip_len = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
            if ip_len > ip.len() || ihl < 20 || ip_len < ihl {
                continue;
            }
            let seg = &ip[ihl..ip_len];
            let mut sum = 0u32;
            for w in ip[12..20].chunks(2).chain(seg.chunks(2)) {
                sum += u32::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)]));
            }
            sum += 6 + seg.len() as u32;
            while sum > 0xffff {
                sum = (sum & 0xffff) + (sum >> 16);
            }
            total += 1;
            if sum != 0xffff {
                bad += 1;
            }
        }
        libc::close(fd);
        ensure!(ok, "binding the packet socket to {dev}");
        Ok((total, bad))
    }
}
