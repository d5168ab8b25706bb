//! The datapath object, embedded at build time, and its loading.

pub mod attach;
pub mod batch;
pub mod layout;
pub mod maps;
pub mod migrate;
pub mod pins;
pub mod sock;

use std::{
    collections::HashSet,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};
use aya::{
    Ebpf, EbpfLoader,
    programs::{CgroupSockAddr, SchedClassifier, Xdp},
};
use lb_common::{LAYOUT_VERSION, Layout, capacity, map_names};

pub use self::maps::{CounterMaps, Maps, NodeConfig};

/// The datapath object built from `lb-ebpf` (see the `lb-objects` crate).
pub static OBJECT: &[u8] = lb_objects::LB;

/// Program names in the object.
pub const XDP_PROGRAM: &str = "lb_xdp";
pub const TC_PROGRAM: &str = "lb_tc";

/// Map capacities, fixed when the maps are created: the one owner of every
/// map size, from the flags (`--max-frontends`, `--max-services`,
/// `--max-backends`, `--maglev-entries`, `--conntrack-size`) down to the
/// kernel. They reach it at load, as the maps' `max_entries`. The loaded
/// [`Maps`] carry the sizes they were made with; everything above them (the
/// reconciler, the metrics) reads them there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sizes {
    /// `services` entries (frontends).
    pub services: u32,
    /// Service-port ids.
    pub service_ids: u32,
    /// Backend slots.
    pub backends: u32,
    /// Maglev entries shared by every table (each Service port's tables are
    /// sized from its backends: `crate::maglev::table_size_for`).
    pub maglev_entries: u32,
    /// Conntrack entries (two per flow).
    pub conntrack: u32,
}

/// The fewest Maglev entries: one table of the size 101 to 6,552 backends get.
pub const MIN_MAGLEV_ENTRIES: u32 = 65_536;
/// The most: 4 GiB of tables.
pub const MAX_MAGLEV_ENTRIES: u32 = 1 << 30;

impl Default for Sizes {
    fn default() -> Self {
        Self {
            services: capacity::SERVICES,
            service_ids: capacity::SERVICE_IDS,
            backends: capacity::BACKENDS,
            maglev_entries: capacity::MAGLEV_ENTRIES,
            conntrack: capacity::CONNTRACK,
        }
    }
}

impl Sizes {
    /// The configured capacity of the map `name`, if it is one of the sized maps.
    pub fn max_entries(&self, name: &str) -> Result<Option<u32>> {
        Ok(Some(match name {
            map_names::SERVICES => self.services,
            map_names::BACKENDS | map_names::BACKEND_STATS => self.backends,
            map_names::SERVICE_STATS | map_names::SERVICE_NAMES => self.service_ids,
            map_names::MAGLEV => self.maglev_elements(),
            map_names::CONNTRACK => self.conntrack,
            _ => return Ok(None),
        }))
    }

    /// Elements of the flat `maglev` array (two entries each).
    pub fn maglev_elements(&self) -> u32 {
        lb_common::maglev_row_elements(self.maglev_entries)
    }

    /// Refuses sizes no map can be made with, naming the flag.
    pub fn check(&self) -> Result<()> {
        if !(MIN_MAGLEV_ENTRIES..=MAX_MAGLEV_ENTRIES).contains(&self.maglev_entries) {
            bail!(
                "--maglev-entries must be between {MIN_MAGLEV_ENTRIES} and {MAX_MAGLEV_ENTRIES} \
                 (4 bytes each), not {}",
                self.maglev_entries
            );
        }
        Ok(())
    }
}

/// How to load the datapath.
#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    /// Directory (on bpffs) to pin the maps in; maps already pinned there are
    /// reused as they are, so state survives agent restarts, or migrated
    /// where their layout or size changed (see [`layout`]). None: unpinned.
    pub pin_path: Option<PathBuf>,
    pub sizes: Sizes,
    /// Datapath log level (aya-log): None keeps only warnings and errors; per-flow
    /// messages are at debug. Levels below it are pruned by the verifier.
    pub log_level: Option<log::Level>,
}

/// The loaded (not yet attached) datapath.
pub struct Datapath {
    ebpf: Ebpf,
    sizes: Sizes,
    /// What was done with each pinned map (None: no pin path).
    plan: Option<layout::Plan>,
    /// Maps migrated at load whose pins are not replaced yet (see
    /// [`Self::finish_migration`]).
    pending: Option<migrate::Pending>,
    /// Link pins this datapath attached or took over.
    attached: HashSet<PathBuf>,
}

impl Datapath {
    /// Creates or reuses the maps and loads both programs into the kernel.
    pub fn load(opts: &LoadOptions) -> Result<Self> {
        let sizes = &opts.sizes;
        sizes.check()?;
        let mut loader = EbpfLoader::new();
        // aya-log's level lives in read-only data: the verifier drops every log
        // statement below it, so disabled logs cost nothing per packet.
        let level = opts.log_level.unwrap_or(log::Level::Warn) as u8;
        loader.override_global(aya_log::LEVEL, &level, true);
        // The socket programs serve the sockets of the loading thread's
        // network namespace: the node's, where the agent runs.
        let netns = sock::netns_cookie()?;
        loader.override_global("LB_HOST_NETNS", &netns, true);
        for name in pins::all_map_names() {
            if let Some(n) = sizes.max_entries(name)? {
                loader.map_max_entries(name, n);
            }
        }
        let plan = match &opts.pin_path {
            Some(dir) => {
                pins::prepare_dir(dir)?;
                let plan = layout::plan(dir, sizes)?;
                log::info!("pinned maps: {plan}");
                for m in &plan.maps {
                    let path = dir.join(m.name);
                    match m.action {
                        layout::Action::Create | layout::Action::Reuse => {
                            loader.map_pin_path(m.name, path);
                        }
                        // Made unpinned, pinned when ready.
                        layout::Action::Migrate(_) => {}
                        layout::Action::Replace if m.name == map_names::LAYOUT => {}
                        layout::Action::Replace => {
                            std::fs::remove_file(&path)
                                .with_context(|| format!("replacing {}", path.display()))?;
                            loader.map_pin_path(m.name, path);
                        }
                    }
                }
                Some(plan)
            }
            None => None,
        };
        let mut ebpf = loader
            .load(OBJECT)
            .context("loading the datapath object (maps and BTF)")?;
        let layout_fd = write_layout(&mut ebpf, sizes, plan.as_ref())?;
        let pending = match (&opts.pin_path, &plan) {
            (Some(dir), Some(plan)) if plan.migrates() => {
                Some(migrate::Pending::start(plan, dir, &ebpf, layout_fd)?)
            }
            (Some(dir), Some(_)) => {
                migrate::replace_pin(dir, map_names::LAYOUT, &layout_fd)?;
                None
            }
            _ => None,
        };
        program_mut::<Xdp>(&mut ebpf, XDP_PROGRAM)?
            .load()
            .context("loading the XDP program")?;
        program_mut::<SchedClassifier>(&mut ebpf, TC_PROGRAM)?
            .load()
            .context("loading the tc program")?;
        for (name, _) in sock::PROGRAMS {
            program_mut::<CgroupSockAddr>(&mut ebpf, name)?
                .load()
                .with_context(|| format!("loading the socket program {name}"))?;
        }
        Ok(Self {
            ebpf,
            sizes: opts.sizes,
            plan,
            pending,
            attached: HashSet::new(),
        })
    }

    /// What was done with each pinned map at load.
    pub fn plan(&self) -> Option<&layout::Plan> {
        self.plan.as_ref()
    }

    /// The maps migrated at load whose pins still name the old ones.
    pub fn migrating(&self) -> Vec<&'static str> {
        self.pending
            .as_ref()
            .map(migrate::Pending::names)
            .unwrap_or_default()
    }

    /// Ends a migration begun at load (see [`migrate`]), once the programs
    /// are attached where the agent wants them: swaps the program of every
    /// pinned link in `links_dir` it has not attached itself, copies what the
    /// old programs added meanwhile and replaces the pins. None: nothing was
    /// migrated.
    pub fn finish_migration(&mut self, links_dir: &Path) -> Result<Option<migrate::Report>> {
        let Some(pending) = self.pending.take() else {
            return Ok(None);
        };
        let report = pending.finish(|| {
            let mut swapped = 0;
            for (hook, _, pin) in attach::pinned_links(links_dir) {
                if self.attached.contains(&pin) {
                    continue;
                }
                // A link whose device is gone keeps the old program (and
                // maps) until its pin is removed; nothing reaches it.
                match self.replace(hook, &pin) {
                    Ok(()) => {
                        self.attached.insert(pin);
                        swapped += 1;
                    }
                    Err(e) => log::warn!(
                        "pinned link {} keeps the previous program: {e:#}",
                        pin.display()
                    ),
                }
            }
            let sock_pins = sock::pinned(links_dir);
            if sock_pins > 0 && !self.attached.contains(&links_dir.join("sock")) {
                log::warn!(
                    "{sock_pins} socket program link(s) of the previous run stay on the maps it had \
                     (this run did not attach its own)"
                );
            }
            Ok(swapped)
        })?;
        Ok(Some(report))
    }

    pub fn xdp(&mut self) -> Result<&mut Xdp> {
        program_mut(&mut self.ebpf, XDP_PROGRAM)
    }

    pub fn tc(&mut self) -> Result<&mut SchedClassifier> {
        program_mut(&mut self.ebpf, TC_PROGRAM)
    }

    /// The datapath's log ring buffer, forwarding records to the `log` crate.
    pub fn take_logger(&mut self) -> Result<aya_log::EbpfLogger<&'static dyn log::Log>> {
        aya_log::EbpfLogger::init(&mut self.ebpf).context("setting up datapath logs")
    }

    /// Takes typed handles to the maps out of the object (once), with the
    /// sizes they were created with.
    pub fn take_maps(&mut self) -> Result<Maps> {
        Maps::take(&mut self.ebpf, self.sizes)
    }
}

/// Writes this build's [`Layout`] into the object's `layout` map (made
/// unpinned: see [`migrate::replace_pin`]); returns its descriptor.
fn write_layout(
    ebpf: &mut Ebpf,
    sizes: &Sizes,
    plan: Option<&layout::Plan>,
) -> Result<std::os::fd::OwnedFd> {
    let previous = plan.and_then(|p| p.pinned_layout);
    let migrates = plan.is_some_and(layout::Plan::migrates);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let value = Layout {
        version: LAYOUT_VERSION,
        conntrack_value_size: size_of::<lb_common::CtEntry>() as u32,
        conntrack_entries: sizes.conntrack,
        migrations: previous.map_or(0, |l| l.migrations) + u32::from(migrates),
        since_unix_s: match previous {
            Some(l) if !migrates => l.since_unix_s,
            _ => now,
        },
    };
    let map = ebpf
        .map_mut(map_names::LAYOUT)
        .context("the datapath object has no layout map")?;
    let mut array: aya::maps::Array<&mut aya::maps::MapData, Layout> =
        aya::maps::Array::try_from(map).context("map layout has an unexpected type")?;
    array.set(0, value, 0).context("writing layout")?;
    migrate::object_map_fd(ebpf, map_names::LAYOUT)
}

fn program_mut<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut T>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let program = ebpf
        .program_mut(name)
        .with_context(|| format!("the datapath object has no program {name}"))?;
    program
        .try_into()
        .with_context(|| format!("program {name} has an unexpected type"))
}
