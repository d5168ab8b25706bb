//! The conntrack janitor: deletes the conntrack entries of UDP flows whose
//! frontend is gone, or whose backend left the Service port.
//!
//! A UDP flow has no end the datapath could see, and its forward entry takes
//! every datagram of the client's tuple straight to the backend chosen at the
//! first one, without looking at `services` again. So when a frontend goes
//! away (its Service or port deleted, the port or nodePort renumbered, the
//! type changed, an externalIP or ingress IP dropped), a client that keeps
//! its socket (DNS resolvers, QUIC, game and VoIP clients do) would keep
//! reaching the old backend for as long as it sends. kube-proxy deletes the
//! UDP conntrack entries of the Service IPs and ports it removes (`conntrack
//! -D`); this module does the same to lb's `conntrack` map, for the frontends
//! the reconciler reports ([`crate::reconcile::StaleUdp`]). Likewise a
//! backend that left a port (gone from its slices, or no longer serving)
//! whose pod still runs, and still serves other ports (so the datapath's own
//! check, that a flow's backend still exists, passes): kube-proxy clears the
//! UDP flows of the endpoints it removes, and its clients move to a live
//! one at their next datagram. TCP flows are left alone: they end by FIN, RST
//! or idle timeout, as with kube-proxy.
//!
//! What a flow owns (see lb-ebpf's `conntrack::open`): a forward entry keyed
//! by the client -> frontend tuple, and a reply entry keyed by the translated
//! tuple reversed (backend -> client; for a source-NATed flow backend -> the
//! node's address and the port claimed for it; for a hairpin backend -> the
//! frontend address with the client's port). The source-NAT port is held by
//! nothing but that reply entry, so deleting it gives the port back.
//!
//! It also expires flows ([`expire`]): every [`SWEEP_EVERY`] it deletes the
//! flows idle for longer than their state allows (`lb_common::ct_expired`:
//! seconds for an unconfirmed flow, such as a spoofed SYN's, ten seconds once
//! closing, a day for an established TCP connection), and reply entries left
//! without their forward entry (evicted by the LRU). Without that, entries
//! would only ever leave by LRU eviction, which takes the least recently used
//! flows first, live ones included, once the map is full.
//!
//! The map can hold millions of entries: one walk (batched lookups, a few
//! thousand entries per system call) serves every frontend removed since the
//! last, on a thread of its own ([`Janitor`]), never on the agent's loop.
//! The datapath keeps running meanwhile: an entry found stale is read again
//! just before it is deleted, and one that is gone already is no error.

use std::{
    borrow::{Borrow, BorrowMut},
    collections::{BTreeSet, HashMap as StdHashMap, HashSet},
    net::SocketAddr,
    os::fd::{AsFd as _, BorrowedFd},
    path::Path,
    sync::{PoisonError, mpsc},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use aya::maps::{HashMap, IterableMap as _, MapData, MapError, PerCpuArray};
use lb_common::{
    CT_F_FORWARD, CT_F_REPLY, CtEntry, CtEvent, FlowKey, PROTO_UDP, Service, ServiceKey,
    ct_expired, socket_addr,
};

use crate::{
    bpf::maps::is_not_found,
    metrics::AgentMetrics,
    reconcile::{
        StaleUdp,
        departed::{FlowBackends, SharedFlowBackends},
    },
};

/// A walk stops here even if the map has not said it is done (it cannot
/// hold more than its capacity, but the bound must not depend on that).
const WALK_TIME_LIMIT: Duration = Duration::from_secs(60);

/// How often the janitor expires idle flows. An unconfirmed flow's source-NAT
/// port is free again once it is idle (the datapath takes it back when it
/// needs it); this only bounds how long the entries take room.
pub const SWEEP_EVERY: Duration = Duration::from_secs(10);

/// What one walk found and deleted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cleared {
    /// Forward entries deleted (one per flow).
    pub forward: usize,
    /// Reply entries deleted (each flow's, and replies left without their
    /// forward entry).
    pub reply: usize,
    /// Entries looked at.
    pub walked: usize,
    /// The walk reached the end of the map (false: it hit its bounds; what
    /// it found was deleted all the same).
    pub complete: bool,
}

impl Cleared {
    pub fn entries(&self) -> usize {
        self.forward + self.reply
    }
}

/// What makes a flow stale: its frontend, with the Service port it leads to
/// now (none: removed; another port's id: a flow opened under a different id
/// is stale, one opened since under this id is not), or its (service id,
/// backend id), the backend having left that port.
struct Stale {
    frontends: StdHashMap<ServiceKey, Option<u32>>,
    backends: BTreeSet<(u32, u32)>,
}

impl Stale {
    /// Reads what `services` holds now for each of `gone`'s frontends: one
    /// may have come back (a port renumbered and back again) since it was
    /// reported.
    fn read<S: Borrow<MapData>>(
        services: &HashMap<S, ServiceKey, Service>,
        gone: &StaleUdp,
    ) -> Result<Self> {
        let mut now = StdHashMap::with_capacity(gone.frontends.len());
        for k in gone.frontends.iter().filter(|k| k.proto == PROTO_UDP) {
            let id = match services.get(k, 0) {
                Ok(svc) => Some(svc.id),
                Err(MapError::KeyNotFound) => None,
                Err(e) => return Err(e).context("reading services"),
            };
            now.insert(*k, id);
        }
        Ok(Self {
            frontends: now,
            backends: gone.backends.clone(),
        })
    }

    fn is_empty(&self) -> bool {
        self.frontends.is_empty() && self.backends.is_empty()
    }

    /// Whether the entry `(k, v)` belongs to a stale flow. A forward entry
    /// names its frontend in its key (the destination the client sent to),
    /// a reply entry in its value (the source it is rewritten to).
    fn holds(&self, k: &FlowKey, v: &CtEntry) -> bool {
        if k.proto != PROTO_UDP {
            return false;
        }
        // Both entries of a flow name its port and backend.
        if v.flags & (CT_F_FORWARD | CT_F_REPLY) != 0
            && self.backends.contains(&(v.service, v.backend))
        {
            return true;
        }
        let (addr, port) = if v.flags & CT_F_FORWARD != 0 {
            (k.dst, k.dst_port)
        } else if v.flags & CT_F_REPLY != 0 {
            (v.nat_src, v.nat_src_port)
        } else {
            return false;
        };
        let frontend = ServiceKey {
            addr,
            port,
            proto: k.proto,
            family: k.family,
            _pad: [0; 4],
        };
        match self.frontends.get(&frontend) {
            None => false,
            Some(None) => true,
            Some(Some(id)) => *id != v.service,
        }
    }
}

/// Whether `r`, found under the partner key of forward entry `(k, v)`
/// ([`CtEntry::partner_key`]), is that flow's reply and
/// not another's that took the key since: a source-NAT port the datapath
/// gave away after the flow idled, or the same client port reaching the
/// same backend through another frontend (the same reply key; the later
/// flow's entry replaced the earlier's).
fn is_reply_of(r: &CtEntry, k: &FlowKey, v: &CtEntry) -> bool {
    r.flags & CT_F_REPLY != 0
        && r.nat_src == k.dst
        && r.nat_src_port == k.dst_port
        && r.nat_dst == k.src
        && r.nat_dst_port == k.src_port
        && r.service == v.service
}

/// Deletes the conntrack entries of the UDP flows `gone` makes stale (to its
/// frontends, or to its backends through their ports): each such flow's
/// forward entry and its reply entry, and reply entries whose forward entry
/// is gone already. TCP entries and other flows are untouched. One walk of
/// the map, whatever the number of frontends and backends.
pub fn clear<C, S>(
    conntrack: &mut HashMap<C, FlowKey, CtEntry>,
    services: &HashMap<S, ServiceKey, Service>,
    gone: &StaleUdp,
) -> Result<Cleared>
where
    C: BorrowMut<MapData>,
    S: Borrow<MapData>,
{
    let stale = Stale::read(services, gone)?;
    let mut cleared = Cleared::default();
    if stale.is_empty() {
        cleared.complete = true;
        return Ok(cleared);
    }
    let walked = walk_deleting(conntrack, |conntrack, k, v| {
        if stale.holds(k, v) {
            delete_flow(conntrack, &stale, k, &mut cleared)?;
        }
        Ok(())
    })?;
    cleared.walked = walked.entries;
    cleared.complete = walked.complete;
    Ok(cleared)
}

/// Deletes the entry `k`, found stale, and if it is a forward entry, its
/// flow's reply entry too.
fn delete_flow<C: BorrowMut<MapData>>(
    conntrack: &mut HashMap<C, FlowKey, CtEntry>,
    stale: &Stale,
    k: &FlowKey,
    cleared: &mut Cleared,
) -> Result<()> {
    // Read again: the datapath may have replaced or dropped it since.
    let Some(v) = lookup(conntrack, k)? else {
        return Ok(());
    };
    if !stale.holds(k, &v) {
        return Ok(());
    }
    let forward = v.flags & CT_F_FORWARD != 0;
    if delete(conntrack, k)? {
        if forward {
            cleared.forward += 1;
        } else {
            cleared.reply += 1;
        }
    }
    if !forward {
        return Ok(());
    }
    // The flow's reply, wherever the walk is: derived from the forward
    // entry as the datapath keyed it.
    let rk = v.partner_key(k.proto, k.family);
    if let Some(r) = lookup(conntrack, &rk)?
        && is_reply_of(&r, k, &v)
        && delete(conntrack, &rk)?
    {
        cleared.reply += 1;
    }
    Ok(())
}

/// What one expiry sweep found and deleted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Swept {
    /// Flows expired (their forward entry deleted, and their reply entry).
    pub flows: usize,
    /// Entries deleted: the flows' and reply entries left on their own.
    pub entries: usize,
    /// Entries looked at (how full the map is, at the time of the walk).
    pub walked: usize,
    /// The walk reached the end of the map.
    pub complete: bool,
    /// The backends (address and port) whose reply entries it left in place:
    /// the backends that still have flows (see `reconcile::departed`).
    pub backends: HashSet<SocketAddr>,
}

/// The monotonic coarse clock the datapath stamps entries with
/// (`bpf_ktime_get_coarse_ns` reads `CLOCK_MONOTONIC_COARSE`).
pub fn datapath_now() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: writes the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &raw mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

/// Deletes the flows that have expired at `now` (on the datapath's clock,
/// [`datapath_now`]) by `lb_common::ct_expired`, and reply entries whose
/// forward entry is gone and that have been idle as long as their state
/// allows. The forward entry carries its flow's state (the datapath copies
/// the reply's news to it), so only flows idle by their forward entry cost
/// a lookup of their reply; reply entries, a lookup of their forward entry
/// once idle themselves.
pub fn expire<C: BorrowMut<MapData>>(
    conntrack: &mut HashMap<C, FlowKey, CtEntry>,
    now: u64,
) -> Result<Swept> {
    let mut swept = Swept::default();
    let walked = walk_deleting(conntrack, |conntrack, k, v| {
        // Its own time says it may have expired: look closer.
        let alone = if v.flags & CT_F_FORWARD != 0 {
            (Some(v.last_seen_ns), None)
        } else {
            (None, Some(v.last_seen_ns))
        };
        let fate = if ct_expired(v.flags, k.proto, alone.0, alone.1, now) {
            expire_entry(conntrack, k, now, &mut swept)?
        } else {
            Expiry::Kept
        };
        // What stays holds its backend: a forward entry's is where it
        // leads, a reply entry's where its key comes from.
        if fate == Expiry::Kept {
            let backend = if v.flags & CT_F_FORWARD != 0 {
                socket_addr(&v.nat_dst, k.family, v.nat_dst_port)
            } else {
                socket_addr(&k.src, k.family, k.src_port)
            };
            swept.backends.extend(backend);
        }
        Ok(())
    })?;
    swept.walked = walked.entries;
    swept.complete = walked.complete;
    Ok(swept)
}

/// Reads the entry `k` again (the datapath may have used it since) with its
/// partner, and deletes what has expired: a forward entry's whole flow, or
/// a reply entry whose forward entry is no longer its flow's.
fn expire_entry<C: BorrowMut<MapData>>(
    conntrack: &mut HashMap<C, FlowKey, CtEntry>,
    k: &FlowKey,
    now: u64,
    swept: &mut Swept,
) -> Result<Expiry> {
    let Some(v) = lookup(conntrack, k)? else {
        return Ok(Expiry::Deleted);
    };
    if v.flags & CT_F_FORWARD != 0 {
        let rk = v.partner_key(k.proto, k.family);
        let reply = lookup(conntrack, &rk)?.filter(|r| is_reply_of(r, k, &v));
        let flags = v.flags | reply.map_or(0, |r| r.flags);
        let reply_seen = reply.map(|r| r.last_seen_ns);
        if !ct_expired(flags, k.proto, Some(v.last_seen_ns), reply_seen, now) {
            return Ok(Expiry::Kept);
        }
        if delete(conntrack, k)? {
            swept.flows += 1;
            swept.entries += 1;
        }
        if reply.is_some() && delete(conntrack, &rk)? {
            swept.entries += 1;
        }
        return Ok(Expiry::Deleted);
    } else if v.flags & CT_F_REPLY != 0 {
        let fk = v.partner_key(k.proto, k.family);
        let has_forward = lookup(conntrack, &fk)?.is_some_and(|f| is_reply_of(&v, &fk, &f));
        if has_forward {
            return Ok(Expiry::ForwardDecides);
        }
        if ct_expired(v.flags, k.proto, None, Some(v.last_seen_ns), now) {
            if delete(conntrack, k)? {
                swept.entries += 1;
            }
            return Ok(Expiry::Deleted);
        }
    }
    Ok(Expiry::Kept)
}

/// What became of an entry the sweep looked at closer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expiry {
    /// It is gone (deleted now, or already).
    Deleted,
    /// It stays.
    Kept,
    /// A reply entry whose flow's forward entry is there: the flow lives or
    /// goes by that entry (whether walked already or still to come).
    ForwardDecides,
}

fn lookup<C: Borrow<MapData>>(
    conntrack: &HashMap<C, FlowKey, CtEntry>,
    k: &FlowKey,
) -> Result<Option<CtEntry>> {
    match conntrack.get(k, 0) {
        Ok(v) => Ok(Some(v)),
        Err(MapError::KeyNotFound) => Ok(None),
        Err(e) => Err(e).context("reading a conntrack entry"),
    }
}

/// Deletes `k`; false if it was gone already (the datapath's LRU evicted it,
/// or it was deleted as another entry's reply).
fn delete<C: BorrowMut<MapData>>(
    conntrack: &mut HashMap<C, FlowKey, CtEntry>,
    k: &FlowKey,
) -> Result<bool> {
    match conntrack.remove(k) {
        Ok(()) => Ok(true),
        Err(e) if is_not_found(&e) => Ok(false),
        Err(e) => Err(e).context("deleting a conntrack entry"),
    }
}

/// Walks `conntrack` (bounded by its capacity and [`WALK_TIME_LIMIT`]),
/// calling `each` on every entry with the map, which it may delete from.
/// Each batch is dealt with as it arrives: its entries lie in buckets the
/// walk has passed, so deleting them does not disturb it, and memory stays
/// at one batch however many entries go.
fn walk_deleting<C: BorrowMut<MapData>>(
    conntrack: &mut HashMap<C, FlowKey, CtEntry>,
    mut each: impl FnMut(&mut HashMap<C, FlowKey, CtEntry>, &FlowKey, &CtEntry) -> Result<()>,
) -> Result<Walked> {
    let capacity = conntrack
        .map()
        .info()
        .context("reading the conntrack map's info")?
        .max_entries() as usize;
    // A descriptor of its own, so that the deletions can borrow the map.
    let fd = conntrack
        .map()
        .fd()
        .as_fd()
        .try_clone_to_owned()
        .context("duplicating the conntrack map's descriptor")?;
    walk(
        fd.as_fd(),
        capacity + crate::bpf::batch::CHUNK,
        WALK_TIME_LIMIT,
        |keys, values| {
            for (k, v) in keys.iter().zip(values) {
                each(conntrack, k, v)?;
            }
            Ok(())
        },
    )
    .context("walking conntrack")
}

/// How a walk ended.
#[derive(Debug)]
struct Walked {
    entries: usize,
    complete: bool,
}

/// Calls `each` on the entries of the hash map `fd` (keys `FlowKey`, values
/// `CtEntry`), a batch at a time ([`crate::bpf::batch::for_each_batch`]),
/// bounded by `max_entries` and `max_time`.
fn walk(
    fd: BorrowedFd<'_>,
    max_entries: usize,
    max_time: Duration,
    mut each: impl FnMut(&[FlowKey], &[CtEntry]) -> Result<()>,
) -> Result<Walked> {
    let started = Instant::now();
    let mut walked = Walked {
        entries: 0,
        complete: true,
    };
    crate::bpf::batch::for_each_batch(fd, |batch| {
        let (keys, values): (Vec<FlowKey>, Vec<CtEntry>) =
            batch.typed::<FlowKey, CtEntry>()?.into_iter().unzip();
        each(&keys, &values)?;
        walked.entries += keys.len();
        if walked.entries >= max_entries || started.elapsed() >= max_time {
            walked.complete = false;
            return Ok(std::ops::ControlFlow::Break(()));
        }
        Ok(std::ops::ControlFlow::Continue(()))
    })?;
    Ok(walked)
}

/// The datapath's conntrack counts (`ct_stats`), summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtCounts {
    /// Entries inserted under a key the map did not hold.
    pub created: u64,
    /// Entries the datapath deleted.
    pub removed: u64,
}

impl CtCounts {
    pub fn read<S: Borrow<MapData>>(stats: &PerCpuArray<S, u64>) -> Result<Self> {
        let get = |e: CtEvent| -> Result<u64> {
            Ok(stats
                .get(&(e as u32), 0)
                .with_context(|| format!("reading ct_stats {}", e.as_str()))?
                .iter()
                .sum())
        };
        Ok(Self {
            created: get(CtEvent::Created)?,
            removed: get(CtEvent::Removed)?,
        })
    }
}

/// Counts the entries the LRU evicted. The kernel reports neither evictions
/// nor how many entries an LRU map holds, but every entry that ever was is
/// either still held (the sweep counts them), deleted (by the datapath, or by
/// the agent, which knows its own), or evicted: so the entries created, less
/// those deleted and those held, were evicted. The balance is taken from the
/// first sweep on (entries of an earlier agent's time are in it), and only
/// its growth is counted: a balance read low (entries created during a walk)
/// catches up at the next sweep, and the count never goes back.
#[derive(Debug, Default)]
pub struct Pressure {
    /// The agent's deletions so far.
    deleted: u64,
    /// The balance at the first sweep.
    baseline: Option<i128>,
    /// Evictions counted so far.
    counted: u64,
}

impl Pressure {
    /// The agent deleted `n` entries.
    pub fn deleted(&mut self, n: usize) {
        self.deleted += n as u64;
    }

    /// A complete sweep found `held` entries, with the datapath's `counts`
    /// read before it began: returns the evictions not counted yet.
    pub fn observe(&mut self, counts: CtCounts, held: usize) -> u64 {
        let balance = i128::from(counts.created)
            - i128::from(counts.removed)
            - i128::from(self.deleted)
            - held as i128;
        let baseline = *self.baseline.get_or_insert(balance);
        let evicted = u64::try_from(balance - baseline).unwrap_or(0);
        let new = evicted.saturating_sub(self.counted);
        self.counted = self.counted.max(evicted);
        new
    }
}

/// What the janitor's thread does next.
pub enum Job<'a> {
    /// [`clear`] the UDP flows these make stale.
    Clear(&'a StaleUdp),
    /// [`expire`] idle flows (every [`SWEEP_EVERY`]).
    Expire,
}

/// Runs [`clear`] on a thread of its own for the frontends handed to it, and
/// [`expire`] every [`SWEEP_EVERY`] in between. Frontends handed while a
/// walk runs wait for the next, and all that waited go in one: a burst of
/// deletions costs one walk after the current.
pub struct Janitor {
    tx: Option<mpsc::Sender<StaleUdp>>,
}

impl Janitor {
    /// A janitor of the maps pinned in `pin_path`, counting in `metrics` what
    /// it deletes (UDP flows of removed frontends, idle flows), what the LRU
    /// evicted, and how full the map (of `capacity` entries) is. If the maps
    /// cannot be opened, that is logged and the janitor does nothing (entries
    /// then leave by LRU eviction only). After each complete sweep it tells
    /// `flows` which backends still have flows.
    pub fn start(
        pin_path: &Path,
        metrics: AgentMetrics,
        capacity: u32,
        flows: SharedFlowBackends,
    ) -> Self {
        let opened = (|| -> Result<_> {
            let open = |name: &str| -> Result<MapData> {
                let path = pin_path.join(name);
                MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))
            };
            let ct = HashMap::<_, FlowKey, CtEntry>::try_from(aya::maps::Map::from_map_data(
                open(lb_common::map_names::CONNTRACK)?,
            )?)?;
            let svc = HashMap::<_, ServiceKey, Service>::try_from(aya::maps::Map::from_map_data(
                open(lb_common::map_names::SERVICES)?,
            )?)?;
            let stats = PerCpuArray::<_, u64>::try_from(aya::maps::Map::from_map_data(open(
                lb_common::map_names::CT_STATS,
            )?)?)?;
            Ok((ct, svc, stats))
        })();
        let (mut ct, svc, stats) = match opened {
            Ok(maps) => maps,
            Err(e) => {
                log::warn!(
                    "conntrack will not be cleaned (UDP flows of removed frontends stay, idle \
                     flows leave by LRU eviction only): {e:#}"
                );
                return Self { tx: None };
            }
        };
        let mut pressure = Pressure::default();
        // The first sweep runs at once: it counts the entries (the fill gauge)
        // and sets the baseline evictions are counted from.
        Self::spawn(Duration::ZERO, SWEEP_EVERY, move |job| {
            let t0 = Instant::now();
            match job {
                Job::Clear(gone) => {
                    let c = clear(&mut ct, &svc, gone)?;
                    metrics.conntrack_cleared.inc_by(c.entries() as u64);
                    pressure.deleted(c.entries());
                    log_walk(gone, &c, t0.elapsed());
                }
                Job::Expire => {
                    // Read before the walk: an entry created during it and
                    // walked over then counts as held, not as created, which
                    // only delays its share of the balance to the next sweep.
                    let counts = CtCounts::read(&stats);
                    let swept_from = Instant::now();
                    let swept = expire(&mut ct, datapath_now())?;
                    metrics.conntrack_expired.inc_by(swept.entries as u64);
                    pressure.deleted(swept.entries);
                    log_sweep(&swept, t0.elapsed());
                    if swept.complete {
                        *flows.lock().unwrap_or_else(PoisonError::into_inner) = FlowBackends {
                            swept_from: Some(swept_from),
                            held: swept.backends.clone(),
                        };
                        let held = swept.walked.saturating_sub(swept.entries);
                        metrics.set_map("conntrack", held, capacity);
                        match counts {
                            Ok(counts) => {
                                let evicted = pressure.observe(counts, held);
                                if evicted > 0 {
                                    metrics.conntrack_evicted.inc_by(evicted);
                                    log::warn!(
                                        "conntrack: {evicted} entries evicted since the last \
                                         sweep ({held} of {capacity} held): live flows may \
                                         have lost their state; raise --conntrack-size"
                                    );
                                }
                            }
                            Err(e) => log::warn!("conntrack evictions not counted: {e:#}"),
                        }
                    }
                }
            }
            Ok(())
        })
    }

    /// A janitor running `work` on its thread: a [`Job::Clear`] once per
    /// batch of what is handed to it, a [`Job::Expire`] after `first`, then
    /// whenever `every` has passed without one.
    pub fn spawn(
        first: Duration,
        every: Duration,
        mut work: impl FnMut(Job<'_>) -> Result<()> + Send + 'static,
    ) -> Self {
        let (tx, rx) = mpsc::channel::<StaleUdp>();
        let spawned = std::thread::Builder::new()
            .name("ct-janitor".into())
            .spawn(move || {
                let mut next_sweep = Instant::now() + first;
                loop {
                    let wait = next_sweep.saturating_duration_since(Instant::now());
                    match rx.recv_timeout(wait) {
                        Ok(mut gone) => {
                            while let Ok(more) = rx.try_recv() {
                                gone.extend(more);
                            }
                            if let Err(e) = work(Job::Clear(&gone)) {
                                log::error!(
                                    "clearing the UDP flows of {gone:?} from conntrack: {e:#}"
                                );
                            }
                        }
                        Err(mpsc::RecvTimeoutError::Timeout) => {
                            if let Err(e) = work(Job::Expire) {
                                log::error!("expiring idle conntrack flows: {e:#}");
                            }
                            next_sweep = Instant::now() + every;
                        }
                        // The janitor was dropped (and the sender with it).
                        Err(mpsc::RecvTimeoutError::Disconnected) => return,
                    }
                }
            });
        match spawned {
            Ok(_) => Self { tx: Some(tx) },
            Err(e) => {
                log::warn!("no conntrack janitor thread: {e}");
                Self { tx: None }
            }
        }
    }

    /// Hands over what makes UDP flows stale (returns at once).
    pub fn hand(&self, gone: StaleUdp) {
        if gone.is_empty() {
            return;
        }
        if let Some(tx) = &self.tx {
            // Fails only if the thread is gone, which it said.
            let _ = tx.send(gone);
        }
    }
}

fn log_sweep(s: &Swept, took: Duration) {
    let line = format!(
        "conntrack: {} idle flows expired ({} entries), {} entries walked in {took:?}",
        s.flows, s.entries, s.walked
    );
    if !s.complete {
        log::warn!("{line}; the walk stopped at its bounds before the end of the map");
    } else {
        log::debug!("{line}");
    }
}

fn log_walk(gone: &StaleUdp, c: &Cleared, took: Duration) {
    let line = format!(
        "conntrack: {} entries of UDP flows to {} removed frontend(s) and {} backend(s) that left their port cleared ({} forward, {} reply), {} entries walked in {took:?}",
        c.entries(),
        gone.frontends.len(),
        gone.backends.len(),
        c.forward,
        c.reply,
        c.walked
    );
    if !c.complete {
        log::warn!("{line}; the walk stopped at its bounds before the end of the map");
    } else if c.entries() > 0 {
        log::info!("{line}");
    } else {
        log::debug!("{line}");
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use lb_common::{CT_F_HAIRPIN, CT_F_SNAT, FAMILY_V4, FAMILY_V6, PROTO_TCP};

    use super::*;

    fn frontend(addr: [u8; 16], port: u16, family: u8) -> ServiceKey {
        ServiceKey {
            addr,
            port,
            proto: PROTO_UDP,
            family,
            _pad: [0; 4],
        }
    }

    fn v4(a: [u8; 4]) -> [u8; 16] {
        let mut x = [0; 16];
        x[..4].copy_from_slice(&a);
        x
    }

    /// The two entries the datapath's `conntrack::open` writes for a flow
    /// from `client` to `front` sent to `backend`, leaving from `nat_src`.
    fn flow(
        client: ([u8; 16], u16),
        front: ([u8; 16], u16),
        backend: ([u8; 16], u16),
        nat_src: ([u8; 16], u16),
        family: u8,
        flags: u16,
    ) -> ((FlowKey, CtEntry), (FlowKey, CtEntry)) {
        let fk = FlowKey {
            src: client.0,
            dst: front.0,
            src_port: client.1,
            dst_port: front.1,
            proto: PROTO_UDP,
            family,
            _pad: [0; 2],
        };
        let fv = CtEntry {
            nat_src: nat_src.0,
            nat_dst: backend.0,
            nat_src_port: nat_src.1,
            nat_dst_port: backend.1,
            backend: 3,
            service: 7,
            flags: CT_F_FORWARD | flags,
            ..CtEntry::default()
        };
        // As the datapath builds it (s.key): backend -> what the flow leaves from.
        let rk = FlowKey {
            src: backend.0,
            dst: nat_src.0,
            src_port: backend.1,
            dst_port: nat_src.1,
            proto: PROTO_UDP,
            family,
            _pad: [0; 2],
        };
        let rv = CtEntry {
            nat_src: front.0,
            nat_dst: client.0,
            nat_src_port: front.1,
            nat_dst_port: client.1,
            backend: 3,
            service: 7,
            flags: CT_F_REPLY | flags,
            ..CtEntry::default()
        };
        ((fk, fv), (rk, rv))
    }

    #[test]
    fn the_reply_key_is_the_datapaths_for_plain_source_nat_and_hairpin_flows() {
        let client = (v4([10, 244, 0, 5]), 40_000);
        let vip = (v4([10, 96, 0, 10]), 53);
        let backend = (v4([10, 244, 1, 7]), 5353);
        let snat = (v4([192, 0, 2, 1]), 61_007);
        let mut v6c = [0u8; 16];
        v6c[0] = 0xfd;
        v6c[15] = 5;
        let mut v6b = v6c;
        v6b[15] = 7;
        let mut v6vip = v6c;
        v6vip[1] = 0x96;
        for ((fk, fv), (rk, rv)) in [
            flow(client, vip, backend, client, FAMILY_V4, 0),
            flow(client, vip, backend, snat, FAMILY_V4, CT_F_SNAT),
            // The pod is its own backend, and hears from the frontend
            // address with its own port.
            flow(
                client,
                vip,
                (client.0, 5353),
                (vip.0, client.1),
                FAMILY_V4,
                CT_F_HAIRPIN,
            ),
            flow(
                (v6c, 40_000),
                (v6vip, 53),
                (v6b, 5353),
                (v6c, 40_000),
                FAMILY_V6,
                0,
            ),
        ] {
            assert_eq!(fv.partner_key(fk.proto, fk.family), rk);
            assert!(is_reply_of(&rv, &fk, &fv));
        }
    }

    #[test]
    fn a_reply_another_flow_took_over_is_not_this_flows() {
        let client = (v4([10, 244, 0, 5]), 40_000);
        let vip = (v4([10, 96, 0, 10]), 53);
        let other_vip = (v4([10, 96, 0, 11]), 53);
        let backend = (v4([10, 244, 1, 7]), 5353);
        let ((fk, fv), _) = flow(client, vip, backend, client, FAMILY_V4, 0);
        // The same client port through another frontend to the same backend.
        let (_, (rk, rv)) = flow(client, other_vip, backend, client, FAMILY_V4, 0);
        assert_eq!(fv.partner_key(fk.proto, fk.family), rk, "the same key");
        assert!(!is_reply_of(&rv, &fk, &fv));
        // The same tuple opened again under another Service port's id.
        let (_, (_, mut again)) = flow(client, vip, backend, client, FAMILY_V4, 0);
        again.service = 8;
        assert!(!is_reply_of(&again, &fk, &fv));
    }

    #[test]
    fn stale_entries_are_those_of_udp_flows_to_gone_frontends_opened_under_another_id() {
        let vip = v4([10, 96, 0, 10]);
        let moved = v4([10, 96, 0, 12]);
        let stale = Stale {
            frontends: StdHashMap::from([
                (frontend(vip, 53, FAMILY_V4), None),
                (frontend(moved, 53, FAMILY_V4), Some(9)),
            ]),
            backends: BTreeSet::new(),
        };
        let client = (v4([10, 244, 0, 5]), 40_000);
        let backend = (v4([10, 244, 1, 7]), 5353);
        let ((fk, fv), (rk, rv)) = flow(client, (vip, 53), backend, client, FAMILY_V4, 0);
        assert!(stale.holds(&fk, &fv));
        assert!(stale.holds(&rk, &rv));
        // Same address, another port: not gone.
        let ((fk2, fv2), (rk2, rv2)) = flow(client, (vip, 54), backend, client, FAMILY_V4, 0);
        assert!(!stale.holds(&fk2, &fv2) && !stale.holds(&rk2, &rv2));
        // TCP is never cleared.
        let mut tcp = fk;
        tcp.proto = PROTO_TCP;
        assert!(!stale.holds(&tcp, &fv));
        // A frontend now leading to service 9: flows of id 7 are stale, of 9 not.
        let ((fk3, mut fv3), _) = flow(client, (moved, 53), backend, client, FAMILY_V4, 0);
        assert!(stale.holds(&fk3, &fv3));
        fv3.service = 9;
        assert!(!stale.holds(&fk3, &fv3));
        // An IPv6 key with the same 16 bytes is another frontend.
        let ((mut fk4, fv4), _) = flow(client, (vip, 53), backend, client, FAMILY_V4, 0);
        fk4.family = FAMILY_V6;
        assert!(!stale.holds(&fk4, &fv4));
    }

    #[test]
    fn stale_entries_are_those_of_udp_flows_to_a_backend_that_left_their_port() {
        // `flow` opens under service 7, backend 3.
        let stale = Stale {
            frontends: StdHashMap::new(),
            backends: BTreeSet::from([(7, 3)]),
        };
        let client = (v4([10, 244, 0, 5]), 40_000);
        let vip = (v4([10, 96, 0, 10]), 53);
        let backend = (v4([10, 244, 1, 7]), 5353);
        let ((fk, fv), (rk, rv)) = flow(client, vip, backend, client, FAMILY_V4, 0);
        assert!(stale.holds(&fk, &fv) && stale.holds(&rk, &rv));
        // The same backend through another port, another backend of the port.
        let (mut other_port, mut other_backend) = (fv, fv);
        other_port.service = 8;
        other_backend.backend = 4;
        assert!(!stale.holds(&fk, &other_port) && !stale.holds(&fk, &other_backend));
        // TCP keeps a backend that left.
        let mut tcp = fk;
        tcp.proto = PROTO_TCP;
        assert!(!stale.holds(&tcp, &fv));
    }

    #[test]
    fn frontends_handed_during_a_walk_go_in_one_next_walk() {
        let walks: Arc<Mutex<Vec<BTreeSet<ServiceKey>>>> = Arc::default();
        let of = |keys: &[ServiceKey]| StaleUdp {
            frontends: keys.iter().copied().collect(),
            backends: BTreeSet::new(),
        };
        let (started_tx, started_rx) = mpsc::channel();
        let (go_tx, go_rx) = mpsc::channel::<()>();
        let janitor = {
            let walks = walks.clone();
            Janitor::spawn(
                Duration::from_secs(3600),
                Duration::from_secs(3600),
                move |job| {
                    let Job::Clear(gone) = job else {
                        panic!("no sweep is due within the test");
                    };
                    walks.lock().unwrap().push(gone.frontends.clone());
                    started_tx.send(()).unwrap();
                    go_rx.recv_timeout(Duration::from_secs(5)).unwrap();
                    Ok(())
                },
            )
        };
        let key = |port| frontend(v4([10, 96, 0, 1]), port, FAMILY_V4);
        janitor.hand(of(&[key(1)]));
        started_rx.recv_timeout(Duration::from_secs(5)).unwrap();
        // The first walk runs: these three wait, then go together.
        janitor.hand(of(&[key(2)]));
        janitor.hand(of(&[]));
        janitor.hand(of(&[key(3), key(2)]));
        janitor.hand(of(&[key(4)]));
        go_tx.send(()).unwrap();
        started_rx.recv_timeout(Duration::from_secs(5)).unwrap();
        go_tx.send(()).unwrap();
        drop(janitor);
        let walks = walks.lock().unwrap();
        assert_eq!(
            *walks,
            vec![
                BTreeSet::from([key(1)]),
                BTreeSet::from([key(2), key(3), key(4)])
            ]
        );
    }
}
