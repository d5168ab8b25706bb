//! The datapath object, embedded at build time, and its loading.

pub mod maps;

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use aya::{
    Ebpf, EbpfLoader,
    programs::{SchedClassifier, Xdp},
};
use lb_common::{capacity, map_names};

pub use self::maps::Maps;

/// The datapath object built from `lb-ebpf` by this crate's build script.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb"));

/// Program names in the object.
pub const XDP_PROGRAM: &str = "lb_xdp";
pub const TC_PROGRAM: &str = "lb_tc";

/// Map capacities, fixed when the maps are created.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sizes {
    /// `services` entries (frontends).
    pub services: u32,
    /// Service-port ids, which is also the number of Maglev rows.
    pub service_ids: u32,
    /// Backend slots.
    pub backends: u32,
    /// Entries per Maglev row (a prime).
    pub maglev_table_size: u32,
    /// Conntrack entries (two per flow).
    pub conntrack: u32,
}

impl Default for Sizes {
    fn default() -> Self {
        Self {
            services: capacity::SERVICES,
            service_ids: capacity::SERVICE_IDS,
            backends: capacity::BACKENDS,
            maglev_table_size: capacity::MAGLEV_TABLE_SIZE,
            conntrack: capacity::CONNTRACK,
        }
    }
}

impl Sizes {
    /// Elements of the flat `maglev` array (two entries each).
    pub fn maglev_elements(&self) -> Result<u32> {
        self.service_ids
            .checked_mul(lb_common::maglev_row_elements(self.maglev_table_size))
            .context("service ids x Maglev table size does not fit a BPF array")
    }
}

/// How to load the datapath.
#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    /// Directory (on bpffs) to pin the maps in; maps already pinned there are
    /// reused as they are, so state survives agent restarts. None: unpinned.
    pub pin_path: Option<PathBuf>,
    pub sizes: Sizes,
}

/// The loaded (not yet attached) datapath.
pub struct Datapath {
    ebpf: Ebpf,
    sizes: Sizes,
}

impl Datapath {
    /// Creates or reuses the maps and loads both programs into the kernel.
    pub fn load(opts: &LoadOptions) -> Result<Self> {
        let sizes = &opts.sizes;
        let maglev_elements = sizes.maglev_elements()?;
        let mut loader = EbpfLoader::new();
        loader
            .map_max_entries(map_names::SERVICES, sizes.services)
            .map_max_entries(map_names::BACKENDS, sizes.backends)
            .map_max_entries(map_names::BACKEND_STATS, sizes.backends)
            .map_max_entries(map_names::SERVICE_STATS, sizes.service_ids)
            .map_max_entries(map_names::MAGLEV, maglev_elements)
            .map_max_entries(map_names::CONNTRACK, sizes.conntrack);
        let pins: Vec<(&str, PathBuf)> = match &opts.pin_path {
            Some(dir) => map_names::ALL.iter().map(|n| (*n, dir.join(n))).collect(),
            None => Vec::new(),
        };
        for (name, path) in &pins {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader
            .load(OBJECT)
            .context("loading the datapath object (maps and BTF)")?;
        program_mut::<Xdp>(&mut ebpf, XDP_PROGRAM)?
            .load()
            .context("loading the XDP program")?;
        program_mut::<SchedClassifier>(&mut ebpf, TC_PROGRAM)?
            .load()
            .context("loading the tc program")?;
        Ok(Self {
            ebpf,
            sizes: opts.sizes,
        })
    }

    pub fn xdp(&mut self) -> Result<&mut Xdp> {
        program_mut(&mut self.ebpf, XDP_PROGRAM)
    }

    pub fn tc(&mut self) -> Result<&mut SchedClassifier> {
        program_mut(&mut self.ebpf, TC_PROGRAM)
    }

    /// Takes typed handles to the maps out of the object (once).
    pub fn take_maps(&mut self) -> Result<Maps> {
        Maps::take(&mut self.ebpf, self.sizes.maglev_table_size)
    }
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

/// Mounts bpffs at `/sys/fs/bpf` if nothing is mounted there, and creates `dir`.
pub fn prepare_pin_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))
}
