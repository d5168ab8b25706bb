//! Socket-level balancing for the node's own clients (the datapath's `sock`
//! programs): attaching the cgroup programs to the root of the cgroup v2
//! hierarchy, so that every process of the node, hostNetwork pods included,
//! reaches Services when it connects or sends.
//!
//! The links are pinned beside the interfaces' (`<pin-path>/links/sock-<hook>`),
//! so they stay when the agent exits. A new agent attaches its programs first
//! and then moves its pins over the old ones: the old links go with their last
//! reference, and no call goes unserved in between (while both run, the first
//! translates and the second sees a backend, which is no frontend).

use std::{
    ffi::CString,
    fs::File,
    os::{fd::AsRawFd as _, unix::ffi::OsStrExt as _},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};
use aya::programs::{
    CgroupAttachMode, CgroupSockAddr,
    links::{FdLink, LinkError},
};

use super::{Datapath, program_mut};

/// The socket programs, by the hook (and pin) name they attach as.
pub const PROGRAMS: [(&str, &str); 8] = [
    ("lb_connect4", "connect4"),
    ("lb_connect6", "connect6"),
    ("lb_sendmsg4", "sendmsg4"),
    ("lb_sendmsg6", "sendmsg6"),
    ("lb_recvmsg4", "recvmsg4"),
    ("lb_recvmsg6", "recvmsg6"),
    ("lb_getpeername4", "getpeername4"),
    ("lb_getpeername6", "getpeername6"),
];

/// The file-name prefix of the socket programs' link pins.
const PIN_PREFIX: &str = "sock-";

const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

fn is_cgroup2(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: statfs into a zeroed struct with a valid path.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    unsafe { libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == CGROUP2_SUPER_MAGIC }
}

/// The root of the cgroup v2 hierarchy at `path` (`--cgroup-path`): `path`
/// itself, or, on a host with the hybrid layout (cgroup v1 controllers,
/// cgroup v2 beside them), its `unified` directory.
pub fn cgroup2_root(path: &Path) -> Result<PathBuf> {
    for candidate in [path.to_path_buf(), path.join("unified")] {
        if is_cgroup2(&candidate) {
            return Ok(candidate);
        }
    }
    bail!(
        "no cgroup v2 hierarchy at {} (nor at {}/unified): mount it (`mount -t cgroup2 none {}`) \
         or point --cgroup-path at where it is",
        path.display(),
        path.display(),
        path.display()
    )
}

/// The cookie of the calling thread's network namespace (`SO_NETNS_COOKIE`,
/// Linux 5.14): the socket programs serve sockets of this namespace only.
pub fn netns_cookie() -> Result<u64> {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0")
        .or_else(|_| std::net::UdpSocket::bind("[::1]:0"))
        .context("opening a socket to read the network namespace's cookie")?;
    let mut cookie: u64 = 0;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt on an open socket into a u64 of the given length.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .context("reading the network namespace's cookie (SO_NETNS_COOKIE needs Linux 5.14)");
    }
    Ok(cookie)
}

fn pin_of(links_dir: &Path, hook: &str) -> PathBuf {
    links_dir.join(format!("{PIN_PREFIX}{hook}"))
}

/// How many of the socket programs have a pinned link in `links_dir`.
pub fn pinned(links_dir: &Path) -> usize {
    PROGRAMS
        .iter()
        .filter(|(_, hook)| pin_of(links_dir, hook).exists())
        .count()
}

/// Removes the socket programs' pinned links (detaching them). Returns how
/// many there were.
pub fn detach(links_dir: &Path) -> Result<usize> {
    let mut n = 0;
    for (_, hook) in PROGRAMS {
        let pin = pin_of(links_dir, hook);
        match std::fs::remove_file(&pin) {
            Ok(()) => n += 1,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", pin.display())),
        }
    }
    Ok(n)
}

impl Datapath {
    /// Runs every socket program on the cgroup `root` (see the module docs),
    /// in place of those a previous run pinned.
    pub fn attach_sockets(&mut self, root: &Path, links_dir: &Path) -> Result<()> {
        let cgroup = File::open(root).with_context(|| format!("opening {}", root.display()))?;
        for (name, hook) in PROGRAMS {
            let program: &mut CgroupSockAddr = program_mut(&mut self.ebpf, name)?;
            // A cgroup link is always one of several (the kernel takes no
            // attach flags with a link: "Single" passes none), so the old
            // link of a previous run stays until its pin is replaced.
            let id = program
                .attach(&cgroup, CgroupAttachMode::Single)
                .with_context(|| format!("attaching {name} to {}", root.display()))?;
            let link: FdLink = program.take_link(id)?.try_into().map_err(|e: LinkError| {
                anyhow::anyhow!("{name} on {} is not a BPF link ({e})", root.display())
            })?;
            let pin = pin_of(links_dir, hook);
            // (No dot in it: bpffs refuses names with dots.)
            let fresh = links_dir.join(format!("{PIN_PREFIX}{hook}-new"));
            let _ = std::fs::remove_file(&fresh);
            link.pin(&fresh)
                .with_context(|| format!("pinning {}", fresh.display()))?;
            std::fs::rename(&fresh, &pin)
                .with_context(|| format!("moving {} to {}", fresh.display(), pin.display()))?;
        }
        // (What `finish_migration` asks: the socket programs are this run's.)
        self.attached.insert(links_dir.join("sock"));
        Ok(())
    }
}
