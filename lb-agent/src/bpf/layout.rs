//! What to do with each map an earlier run pinned: reuse it, migrate it into
//! a new map, or refuse to start.
//!
//! The pin set's layout version is what its `layout` map says
//! ([`lb_common::Layout`]); a pin set without one is version 1, the first
//! release's. Each pinned map is compared with the map this build creates:
//! type, key and value size, flags, entry count and, where the kernel has
//! them for both, the BTF shape of the key and value (field names, offsets
//! and types), so that a same-size change of meaning is not taken for the
//! same map.
//!
//! - Reuse: the same layout version and the same definition. The new
//!   programs use the pinned map as it is.
//! - Migrate: a known conversion from an older layout (conntrack 1 -> 2,
//!   services 1 or 2 -> 3), or
//!   the same layout with another entry count (`--conntrack-size`, or any
//!   other size flag): a new map is made and filled from the pinned one
//!   (`super::migrate`), and replaces its pin once the new programs serve.
//! - Refuse: anything else (a newer layout, another type, a key or value of
//!   another size or shape in the same version, an older layout's map this
//!   build knows no conversion for): the agent stops, naming the map and
//!   what differs, rather than guess.
//!
//! A map's version is the pin set's, except for a map whose definition is
//! exactly that of one other known layout of it (and not the pin set's): an
//! upgrade stopped between two of its pin replacements leaves maps of both,
//! and each is then taken as what it is.

use std::{fmt, path::Path};

use anyhow::{Context as _, Result, bail};
use aya::maps::{Array, Map, MapData};
use lb_common::{LAYOUT_VERSION, Layout, map_names};

use super::{OBJECT, Sizes, batch, pins};

pub const BPF_MAP_TYPE_HASH: u32 = 1;
pub const BPF_MAP_TYPE_ARRAY: u32 = 2;
pub const BPF_MAP_TYPE_PERCPU_ARRAY: u32 = 6;
pub const BPF_MAP_TYPE_LRU_HASH: u32 = 9;

/// What a map is, as far as reusing it goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Def {
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub flags: u32,
    /// The BTF shape of the key and the value (see [`shape`]), where known.
    pub btf: Option<(String, String)>,
}

impl Def {
    /// Whether `self` (pinned) is `want` but for the entry count. BTF shapes
    /// are compared only where both have them.
    fn same_but_size(&self, want: &Def) -> bool {
        self.map_type == want.map_type
            && self.key_size == want.key_size
            && self.value_size == want.value_size
            && self.flags == want.flags
            && match (&self.btf, &want.btf) {
                (Some(a), Some(b)) => a == b,
                _ => true,
            }
    }

    /// What differs from `want`, in words.
    fn differences(&self, want: &Def) -> String {
        let mut d = Vec::new();
        if self.map_type != want.map_type {
            d.push(format!(
                "type {} (this agent: {})",
                self.map_type, want.map_type
            ));
        }
        if self.key_size != want.key_size {
            d.push(format!(
                "{}-byte keys (this agent: {})",
                self.key_size, want.key_size
            ));
        }
        if self.value_size != want.value_size {
            d.push(format!(
                "{}-byte values (this agent: {})",
                self.value_size, want.value_size
            ));
        }
        if self.flags != want.flags {
            d.push(format!(
                "flags {:#x} (this agent: {:#x})",
                self.flags, want.flags
            ));
        }
        if let (Some(a), Some(b)) = (&self.btf, &want.btf) {
            if a.0 != b.0 {
                d.push(format!("key type {} (this agent: {})", a.0, b.0));
            }
            if a.1 != b.1 {
                d.push(format!("value type {} (this agent: {})", a.1, b.1));
            }
        }
        if self.max_entries != want.max_entries {
            d.push(format!(
                "{} entries (this agent: {})",
                self.max_entries, want.max_entries
            ));
        }
        d.join(", ")
    }
}

/// How a migrated map's entries are carried over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Conversion {
    /// As they are (the same layout in a map of another size).
    Copy,
    /// Layout 1's conntrack values to layout 2's (see `super::migrate`).
    ConntrackV1,
    /// Layout 1 and 2's `services` values, whose tables are rows of
    /// `table_size` entries, to layout 3's (see `super::migrate`).
    ServicesV2 { table_size: u32 },
}

/// What to do with one map.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Nothing pinned: created (and pinned) at load.
    Create,
    /// The pinned map, as it is.
    Reuse,
    /// A new map, filled from the pinned one.
    Migrate(Conversion),
    /// The pinned map is replaced by an empty new one: it holds nothing
    /// between packets (`scratch`), or it is `layout`, rewritten each start.
    Replace,
}

#[derive(Clone, Debug)]
pub struct MapPlan {
    pub name: &'static str,
    pub action: Action,
    /// The pinned map's definition, and the layout version it is taken as.
    pub found: Option<(Def, u32)>,
    pub want: Def,
}

/// What to do with every map of a pin directory.
#[derive(Clone, Debug)]
pub struct Plan {
    /// The pin set's layout version (None: nothing was pinned).
    pub pinned_version: Option<u32>,
    /// What the pinned `layout` map said (None: there was none).
    pub pinned_layout: Option<Layout>,
    pub maps: Vec<MapPlan>,
}

impl Plan {
    pub fn get(&self, name: &str) -> Option<&MapPlan> {
        self.maps.iter().find(|m| m.name == name)
    }

    /// The maps to migrate, with their conversions.
    pub fn migrations(&self) -> impl Iterator<Item = (&'static str, Conversion)> + '_ {
        self.maps.iter().filter_map(|m| match m.action {
            Action::Migrate(c) => Some((m.name, c)),
            _ => None,
        })
    }

    pub fn migrates(&self) -> bool {
        self.migrations().next().is_some()
    }
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.pinned_version {
            None => write!(f, "nothing pinned")?,
            Some(v) => write!(f, "pinned layout {v}, this agent's {LAYOUT_VERSION}")?,
        }
        for m in &self.maps {
            match (&m.action, &m.found) {
                (Action::Migrate(c), Some((found, v))) => write!(
                    f,
                    "; {}: migrate ({c:?}, layout {v}: {})",
                    m.name,
                    found.differences(&m.want)
                )?,
                (Action::Replace, Some(_)) => write!(f, "; {}: replace", m.name)?,
                _ => {}
            }
        }
        Ok(())
    }
}

/// The definitions older layouts gave maps this build defines otherwise:
/// (map, version, map type, key size, value size, flags). Where they are the
/// same as this build's but for the meaning (`services`), only the BTF shape
/// tells them apart (see [`matches_older`]).
const OLDER: [(&str, u32, u32, u32, u32, u32); 3] = [
    (
        map_names::CONNTRACK,
        1,
        BPF_MAP_TYPE_LRU_HASH,
        size_of::<lb_common::FlowKey>() as u32,
        size_of::<lb_common::v1::CtEntry>() as u32,
        0,
    ),
    (
        map_names::SERVICES,
        1,
        BPF_MAP_TYPE_HASH,
        size_of::<lb_common::ServiceKey>() as u32,
        size_of::<lb_common::v2::Service>() as u32,
        0,
    ),
    (
        map_names::SERVICES,
        2,
        BPF_MAP_TYPE_HASH,
        size_of::<lb_common::ServiceKey>() as u32,
        size_of::<lb_common::v2::Service>() as u32,
        0,
    ),
];

/// The conversion from `version`'s layout of map `name` to this build's, if
/// that layout differs from this build's (None: the same layout).
fn conversion_from(name: &str, version: u32) -> Option<Option<Conversion>> {
    match (name, version) {
        (map_names::CONNTRACK, 1) => Some(Some(Conversion::ConntrackV1)),
        // The table size is the pinned `config`'s: filled in by `decide`.
        (map_names::SERVICES, 1 | 2) => Some(Some(Conversion::ServicesV2 { table_size: 0 })),
        // Layout 1 had no `fragments`, `ct_stats` or `layout` map (nothing to convert:
        // a pinned one is this build's); every other map is the same in 1, 2 and 3
        // (`maglev` holds the same entries: where tables lie is `services`' to say).
        _ => None,
    }
}

/// The kernel adds BPF_F_RDONLY_PROG to devmaps itself: not a difference.
const RDONLY_PROG: u32 = 1 << 7;

/// The pinned map's definition.
pub fn pinned_def(path: &Path) -> Result<Def> {
    let data = MapData::from_pin(path).with_context(|| format!("opening {}", path.display()))?;
    map_def(&data)
}

/// The definition of an open map (BTF shapes from the kernel's copy of its BTF).
pub fn map_def(data: &MapData) -> Result<Def> {
    use std::os::fd::AsFd as _;
    let info = batch::map_info(data.fd().as_fd())?;
    let btf = if info.btf_id != 0 && info.btf_value_type_id != 0 {
        batch::btf_blob(info.btf_id).ok().and_then(|blob| {
            Some((
                shape(&blob, info.btf_key_type_id)?,
                shape(&blob, info.btf_value_type_id)?,
            ))
        })
    } else {
        None
    };
    Ok(Def {
        map_type: info.map_type,
        key_size: info.key_size,
        value_size: info.value_size,
        max_entries: info.max_entries,
        flags: info.map_flags & !RDONLY_PROG,
        btf,
    })
}

/// The definitions of this build's maps, with `sizes`.
fn wanted(sizes: &Sizes) -> Result<Vec<(&'static str, Def)>> {
    let obj = aya_obj::Object::parse(OBJECT).context("parsing the embedded datapath object")?;
    let blob = obj.btf.as_ref().map(aya_obj::btf::Btf::to_bytes);
    let mut out = Vec::new();
    for name in pins::all_map_names() {
        let Some(def) = obj.maps.get(name) else {
            bail!("the datapath object has no map {name}");
        };
        let btf = match (def, &blob) {
            (aya_obj::Map::Btf(m), Some(blob)) => (|| {
                Some((
                    shape(blob, m.def.btf_key_type_id)?,
                    shape(blob, m.def.btf_value_type_id)?,
                ))
            })(),
            _ => None,
        };
        out.push((
            name,
            Def {
                map_type: def.map_type(),
                key_size: def.key_size(),
                value_size: def.value_size(),
                max_entries: sizes
                    .max_entries(name)?
                    .unwrap_or_else(|| def.max_entries()),
                flags: def.map_flags() & !RDONLY_PROG,
                btf,
            },
        ));
    }
    Ok(out)
}

/// What the pinned `layout` map says, if there is one.
pub fn read_layout(dir: &Path) -> Result<Option<Layout>> {
    let path = dir.join(map_names::LAYOUT);
    if !path.exists() {
        return Ok(None);
    }
    let data = MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
    let array: Array<MapData, Layout> = Map::from_map_data(data)
        .and_then(Array::try_from)
        .with_context(|| format!("{} is not an array of Layout", path.display()))?;
    Ok(Some(
        array
            .get(&0, 0)
            .with_context(|| format!("reading {}", path.display()))?,
    ))
}

/// The plan for the maps pinned in `dir`, for maps of `sizes`. An error
/// names every map that cannot be reused or migrated and what differs.
pub fn plan(dir: &Path, sizes: &Sizes) -> Result<Plan> {
    let pinned_layout = read_layout(dir)?;
    let any_pinned = map_names::ALL.iter().any(|n| dir.join(n).exists());
    let pinned_version = match pinned_layout {
        Some(l) => Some(l.version),
        None if any_pinned => Some(1),
        None => None,
    };
    if let Some(v) = pinned_version
        && v > LAYOUT_VERSION
    {
        bail!(
            "the maps pinned in {} have layout version {v}, newer than this agent's \
             {LAYOUT_VERSION}: they were made by a newer lb-agent, whose maps this one cannot \
             read. Run that version, or `lb-agent cleanup --pin-path {}` (flushes connection \
             tracking).",
            dir.display(),
            dir.display()
        );
    }
    if pinned_version == Some(0) {
        bail!(
            "{}/layout says layout version 0, which no agent writes: run `lb-agent cleanup \
             --pin-path {}`",
            dir.display(),
            dir.display()
        );
    }
    let mut maps = Vec::new();
    let mut problems = Vec::new();
    for (name, want) in wanted(sizes)? {
        let path = dir.join(name);
        if !path.exists() {
            let action = if name == map_names::LAYOUT {
                Action::Replace
            } else {
                Action::Create
            };
            maps.push(MapPlan {
                name,
                action,
                found: None,
                want,
            });
            continue;
        }
        let found =
            pinned_def(&path).with_context(|| format!("reading pinned map {}", path.display()))?;
        let label = pinned_version.unwrap_or(LAYOUT_VERSION);
        let version = version_of(name, &found, &want, label);
        let action = if name == map_names::LAYOUT {
            Ok(Action::Replace)
        } else if name == pins::SCRATCH {
            // Holds nothing between packets: any other one is replaced.
            Ok(if found == want {
                Action::Reuse
            } else {
                Action::Replace
            })
        } else {
            decide(name, &found, &want, version, dir)
        };
        match action {
            Ok(action) => maps.push(MapPlan {
                name,
                action,
                found: Some((found, version)),
                want,
            }),
            Err(why) => problems.push(format!("{}: {why}", path.display())),
        }
    }
    if !problems.is_empty() {
        bail!(
            "maps pinned by an earlier run cannot be reused or migrated by this agent (pinned \
             layout {}, this agent's {LAYOUT_VERSION}):\n  {}\nStart with the settings and \
             version they were made with, or run `lb-agent cleanup --pin-path {}` to remove them \
             (flushes connection tracking).",
            pinned_version.unwrap_or(LAYOUT_VERSION),
            problems.join("\n  "),
            dir.display()
        );
    }
    Ok(Plan {
        pinned_version,
        pinned_layout,
        maps,
    })
}

/// Whether `found` is exactly what layout `version` (older than this
/// build's) made for `name`, where that layout differs from this build's:
/// its type, sizes and flags, and a BTF shape that is not this build's
/// (`want`'s) where both are known, so that a map already converted (an
/// upgrade stopped between two pin replacements) is not converted again.
fn matches_older(name: &str, version: u32, found: &Def, want: &Def) -> bool {
    let converted = matches!((&found.btf, &want.btf), (Some(a), Some(b)) if a == b);
    !converted
        && OLDER.iter().any(|(n, v, t, k, val, fl)| {
            *n == name
                && *v == version
                && (
                    found.map_type,
                    found.key_size,
                    found.value_size,
                    found.flags,
                ) == (*t, *k, *val, *fl)
        })
}

/// Whether `found` is what layout `version` makes for `name` (entry counts
/// aside).
fn fits(name: &str, version: u32, found: &Def, want: &Def) -> bool {
    if version != LAYOUT_VERSION && conversion_from(name, version).is_some() {
        matches_older(name, version, found, want)
    } else {
        found.same_but_size(want)
    }
}

/// The layout version pinned map `name` is taken as (see the module docs).
fn version_of(name: &str, found: &Def, want: &Def, label: u32) -> u32 {
    if fits(name, label, found, want) {
        return label;
    }
    let others: Vec<u32> = (1..=LAYOUT_VERSION)
        .filter(|v| *v != label && fits(name, *v, found, want))
        .collect();
    match others.as_slice() {
        [one] => *one,
        _ => label,
    }
}

fn decide(name: &str, found: &Def, want: &Def, version: u32, dir: &Path) -> Result<Action, String> {
    if version != LAYOUT_VERSION
        && let Some(conv) = conversion_from(name, version)
    {
        let Some(conv) = conv else {
            return Err(format!(
                "layout {version}'s {name} cannot be converted to layout {LAYOUT_VERSION}'s"
            ));
        };
        if !matches_older(name, version, found, want) {
            return Err(format!(
                "not what layout {version} made for {name} ({})",
                found.differences(want)
            ));
        }
        if let Conversion::ServicesV2 { .. } = conv {
            let table_size = super::maps::pinned_maglev_size(dir).map_err(|e| format!("{e:#}"))?;
            return Ok(Action::Migrate(Conversion::ServicesV2 { table_size }));
        }
        return Ok(Action::Migrate(conv));
    }
    if !found.same_but_size(want) {
        return Err(format!(
            "layout {version} like this agent's, but {}: a change of meaning this agent \
             cannot migrate",
            found.differences(want)
        ));
    }
    if found.max_entries == want.max_entries {
        return Ok(Action::Reuse);
    }
    // Another size (`maglev` included: its tables keep their places, and a
    // smaller map must still hold every one, see `super::migrate`).
    Ok(Action::Migrate(Conversion::Copy))
}

/// The shape of BTF type `id` in `blob`: its kind, name, size and, for a
/// struct or union, each member's name, offset and shape; for an array, its
/// element's shape and length. None if the blob cannot be read.
pub fn shape(blob: &[u8], id: u32) -> Option<String> {
    let btf = RawBtf::parse(blob)?;
    let mut out = String::new();
    btf.render(id, 0, &mut out)?;
    Some(out)
}

/// Just enough of a BTF blob to render types (see the kernel's btf.rst).
struct RawBtf<'a> {
    strings: &'a [u8],
    /// Offset of each type's record in `types` (index 0: type id 1).
    types: Vec<(u32, u32, u32, &'a [u8])>,
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

impl<'a> RawBtf<'a> {
    fn parse(blob: &'a [u8]) -> Option<Self> {
        if blob.get(0..2)? != [0x9f, 0xeb] {
            return None;
        }
        let hdr_len = u32_at(blob, 4)? as usize;
        let (type_off, type_len) = (u32_at(blob, 8)? as usize, u32_at(blob, 12)? as usize);
        let (str_off, str_len) = (u32_at(blob, 16)? as usize, u32_at(blob, 20)? as usize);
        let types_b = blob.get(hdr_len + type_off..hdr_len + type_off + type_len)?;
        let strings = blob.get(hdr_len + str_off..hdr_len + str_off + str_len)?;
        let mut types = Vec::new();
        let mut at = 0;
        while at + 12 <= types_b.len() {
            let (name, info, size) = (
                u32_at(types_b, at)?,
                u32_at(types_b, at + 4)?,
                u32_at(types_b, at + 8)?,
            );
            let kind = (info >> 24) & 0x1f;
            let vlen = (info & 0xffff) as usize;
            let extra = match kind {
                1 | 14 | 17 => 4,
                3 => 12,
                4 | 5 | 15 | 19 => 12 * vlen,
                6 | 13 => 8 * vlen,
                _ => 0,
            };
            let rest = types_b.get(at + 12..at + 12 + extra)?;
            types.push((name, info, size, rest));
            at += 12 + extra;
        }
        Some(Self { strings, types })
    }

    fn name(&self, off: u32) -> &str {
        let s = self.strings.get(off as usize..).unwrap_or_default();
        let end = s.iter().position(|b| *b == 0).unwrap_or(s.len());
        std::str::from_utf8(&s[..end]).unwrap_or("?")
    }

    fn render(&self, id: u32, depth: usize, out: &mut String) -> Option<()> {
        use std::fmt::Write as _;
        if depth > 8 {
            out.push('…');
            return Some(());
        }
        if id == 0 {
            out.push_str("void");
            return Some(());
        }
        let (name, info, size, rest) = *self.types.get(id as usize - 1)?;
        let kind = (info >> 24) & 0x1f;
        match kind {
            // INT: its size in bits, signedness.
            1 => {
                let enc = u32_at(rest, 0)?;
                let signed = (enc >> 24) & 1 != 0;
                let _ = write!(out, "{}{}", if signed { 'i' } else { 'u' }, enc & 0xff);
            }
            3 => {
                let (elem, n) = (u32_at(rest, 0)?, u32_at(rest, 8)?);
                out.push('[');
                self.render(elem, depth + 1, out)?;
                let _ = write!(out, ";{n}]");
            }
            4 | 5 => {
                let _ = write!(out, "{}({size}){{", self.name(name));
                let vlen = (info & 0xffff) as usize;
                let bitfield = info >> 31 != 0;
                for i in 0..vlen {
                    let (mname, mtype, moff) = (
                        u32_at(rest, i * 12)?,
                        u32_at(rest, i * 12 + 4)?,
                        u32_at(rest, i * 12 + 8)?,
                    );
                    let bits = if bitfield { moff & 0xff_ffff } else { moff };
                    if i > 0 {
                        out.push(',');
                    }
                    let _ = write!(out, "{}@{}:", self.name(mname), bits / 8);
                    self.render(mtype, depth + 1, out)?;
                }
                out.push('}');
            }
            // ENUM, ENUM64: their size.
            6 | 19 => {
                let _ = write!(out, "enum{size}");
            }
            // TYPEDEF, VOLATILE, CONST, RESTRICT, TYPE_TAG: what they name.
            8..=11 | 18 => self.render(size, depth, out)?,
            2 => out.push_str("ptr"),
            16 => {
                let _ = write!(out, "f{}", size * 8);
            }
            k => {
                let _ = write!(out, "kind{k}");
            }
        }
        Some(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A BTF blob of `types` (raw records) and `strings`.
    fn blob(types: &[u8], strings: &[u8]) -> Vec<u8> {
        let mut b = vec![0x9f, 0xeb, 1, 0];
        b.extend_from_slice(&24u32.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        b.extend_from_slice(&(types.len() as u32).to_le_bytes());
        b.extend_from_slice(&(types.len() as u32).to_le_bytes());
        b.extend_from_slice(&(strings.len() as u32).to_le_bytes());
        b.extend_from_slice(types);
        b.extend_from_slice(strings);
        b
    }

    fn rec(out: &mut Vec<u8>, words: &[u32]) {
        for w in words {
            out.extend_from_slice(&w.to_le_bytes());
        }
    }

    /// struct S { <a>: u32 @0, <b>: u32 @4 } with member names at the
    /// string offsets `a` and `b`.
    fn two_fields(a: u32, b: u32) -> Vec<u8> {
        let mut t = Vec::new();
        // 1: u32 (INT, 4 bytes, 32 bits).
        rec(&mut t, &[0, 1 << 24, 4, 32]);
        // 2: struct "S" of 8 bytes, two members.
        rec(&mut t, &[1, (4 << 24) | 2, 8, a, 1, 0, b, 1, 32]);
        blob(&t, b"\0S\0port\0addr\0")
    }

    #[test]
    fn shapes_tell_fields_of_the_same_size_apart() {
        let port_addr = shape(&two_fields(3, 8), 2).unwrap();
        assert_eq!(port_addr, "S(8){port@0:u32,addr@4:u32}");
        let addr_port = shape(&two_fields(8, 3), 2).unwrap();
        assert_ne!(port_addr, addr_port, "the same size, another meaning");
        assert_eq!(shape(&two_fields(3, 8), 1).unwrap(), "u32");
        assert!(shape(&two_fields(3, 8), 9).is_none(), "no such type");
        assert!(shape(b"not btf", 1).is_none());
    }

    #[test]
    fn this_builds_maps_have_btf_shapes() {
        let wanted = wanted(&Sizes::default()).unwrap();
        let (_, ct) = wanted
            .iter()
            .find(|(n, _)| *n == map_names::CONNTRACK)
            .unwrap();
        let (key, value) = ct.btf.clone().expect("conntrack's BTF");
        assert!(key.starts_with("FlowKey(40){src@0:"), "{key}");
        assert!(value.contains("ingress@56:u32"), "{value}");
        let (_, layout) = wanted
            .iter()
            .find(|(n, _)| *n == map_names::LAYOUT)
            .unwrap();
        assert!(
            layout
                .btf
                .as_ref()
                .unwrap()
                .1
                .starts_with("Layout(24){version@0:u32"),
            "{layout:?}"
        );
    }
}
