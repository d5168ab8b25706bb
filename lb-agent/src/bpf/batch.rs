//! Whole-map reads and writes a batch of entries per system call
//! (`BPF_MAP_LOOKUP_BATCH`, `BPF_MAP_UPDATE_BATCH`, Linux 5.6; aya has no
//! batch calls), for copying large maps (a migration copies half a million
//! conntrack entries in well under a second this way, where one call per
//! entry takes several) and for the verify pass's read of `backends`. A
//! kernel or map type without batch calls falls back to one call per entry.
//!
//! Also the map facts aya's `MapInfo` keeps to itself: the BTF ids of a map's
//! key and value, and the BTF blob they are in.

use std::os::fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd};

use std::ops::ControlFlow;

use anyhow::{Context as _, Result, bail};

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_BTF_GET_FD_BY_ID: libc::c_long = 19;
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;

/// Update flags.
pub const BPF_ANY: u64 = 0;
pub const BPF_NOEXIST: u64 = 1;

/// Entries asked for per batch call: for conntrack, 4,096 keys and values
/// are about 400 KB of buffers, and a million-entry map takes some 250 calls.
pub const CHUNK: usize = 4096;

fn sys_bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<i64> {
    // SAFETY: bpf(2) with an attribute struct of the size given, laid out as
    // the kernel's union member for `cmd` (zero beyond what is set).
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_mut(attr).cast::<libc::c_void>(),
            size_of::<T>() as libc::c_uint,
        )
    };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// `bpf_map_info`, as far as this crate reads it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct RawMapInfo {
    pub map_type: u32,
    pub id: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub map_flags: u32,
    pub name: [u8; 16],
    pub ifindex: u32,
    pub btf_vmlinux_value_type_id: u32,
    pub netns_dev: u64,
    pub netns_ino: u64,
    /// The BTF object of the map's key and value types (0: none).
    pub btf_id: u32,
    pub btf_key_type_id: u32,
    pub btf_value_type_id: u32,
    pub btf_vmlinux_id: u32,
    pub map_extra: u64,
}

#[repr(C)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// What the kernel says of the map behind `fd`.
pub fn map_info(fd: BorrowedFd<'_>) -> Result<RawMapInfo> {
    let mut info = RawMapInfo::default();
    let mut attr = InfoAttr {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: size_of::<RawMapInfo>() as u32,
        info: std::ptr::from_mut(&mut info) as u64,
    };
    sys_bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr).context("BPF_OBJ_GET_INFO_BY_FD (map)")?;
    Ok(info)
}

#[repr(C)]
struct BtfInfo {
    btf: u64,
    btf_size: u32,
    id: u32,
    name: u64,
    name_len: u32,
    kernel_btf: u32,
}

#[repr(C)]
struct GetFdById {
    id: u32,
    next_id: u32,
    open_flags: u32,
}

/// The raw BTF blob of the kernel's BTF object `btf_id` (as loaded with the
/// program that created a map).
pub fn btf_blob(btf_id: u32) -> Result<Vec<u8>> {
    let mut get = GetFdById {
        id: btf_id,
        next_id: 0,
        open_flags: 0,
    };
    let fd = sys_bpf(BPF_BTF_GET_FD_BY_ID, &mut get)
        .with_context(|| format!("BPF_BTF_GET_FD_BY_ID {btf_id}"))?;
    // SAFETY: a descriptor the kernel just returned, owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let mut info = BtfInfo {
        btf: 0,
        btf_size: 0,
        id: 0,
        name: 0,
        name_len: 0,
        kernel_btf: 0,
    };
    let query = |info: &mut BtfInfo| {
        let mut attr = InfoAttr {
            bpf_fd: fd.as_raw_fd() as u32,
            info_len: size_of::<BtfInfo>() as u32,
            info: std::ptr::from_mut(info) as u64,
        };
        sys_bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr).context("BPF_OBJ_GET_INFO_BY_FD (BTF)")
    };
    query(&mut info)?;
    let mut blob = vec![0u8; info.btf_size as usize];
    info.btf = blob.as_mut_ptr() as u64;
    query(&mut info)?;
    blob.truncate(info.btf_size as usize);
    Ok(blob)
}

/// A map's entries, keys and values each in one buffer.
#[derive(Clone, Debug, Default)]
pub struct Entries {
    pub key_size: usize,
    pub value_size: usize,
    pub keys: Vec<u8>,
    pub values: Vec<u8>,
}

impl Entries {
    pub fn new(key_size: usize, value_size: usize) -> Self {
        Self {
            key_size,
            value_size,
            ..Self::default()
        }
    }

    pub fn len(&self) -> usize {
        self.keys.len().checked_div(self.key_size).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn key(&self, i: usize) -> &[u8] {
        &self.keys[i * self.key_size..(i + 1) * self.key_size]
    }

    pub fn value(&self, i: usize) -> &[u8] {
        &self.values[i * self.value_size..(i + 1) * self.value_size]
    }

    pub fn push(&mut self, key: &[u8], value: &[u8]) {
        debug_assert_eq!(key.len(), self.key_size);
        debug_assert_eq!(value.len(), self.value_size);
        self.keys.extend_from_slice(key);
        self.values.extend_from_slice(value);
    }

    /// The entries as typed pairs (each read unaligned from its bytes).
    pub fn typed<K: aya::Pod, V: aya::Pod>(&self) -> Result<Vec<(K, V)>> {
        if size_of::<K>() != self.key_size || size_of::<V>() != self.value_size {
            bail!(
                "entries of {}-byte keys and {}-byte values read as {} and {} bytes",
                self.key_size,
                self.value_size,
                size_of::<K>(),
                size_of::<V>()
            );
        }
        Ok((0..self.len())
            .map(|i| {
                // SAFETY: each slice holds exactly one K or V (checked
                // above); Pod types are valid for any bytes.
                unsafe {
                    (
                        std::ptr::read_unaligned(self.key(i).as_ptr().cast::<K>()),
                        std::ptr::read_unaligned(self.value(i).as_ptr().cast::<V>()),
                    )
                }
            })
            .collect())
    }

    /// These entries but those whose key `other` holds.
    pub fn without_keys_of(&self, other: &Entries) -> Self {
        let have: std::collections::HashSet<&[u8]> =
            (0..other.len()).map(|i| other.key(i)).collect();
        let mut out = Self::new(self.key_size, self.value_size);
        for i in 0..self.len() {
            if !have.contains(self.key(i)) {
                out.push(self.key(i), self.value(i));
            }
        }
        out
    }

    /// Typed pairs as entries.
    pub fn from_typed<K: aya::Pod, V: aya::Pod>(pairs: &[(K, V)]) -> Self {
        let mut e = Self::new(size_of::<K>(), size_of::<V>());
        for (k, v) in pairs {
            e.push(pod_bytes(k), pod_bytes(v));
        }
        e
    }
}

fn pod_bytes<T: aya::Pod>(v: &T) -> &[u8] {
    // SAFETY: a Pod value is plain bytes.
    unsafe { std::slice::from_raw_parts(std::ptr::from_ref(v).cast::<u8>(), size_of::<T>()) }
}

#[repr(C)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Whether a batch call failed because this kernel or map type has none.
fn no_batch(e: &std::io::Error) -> bool {
    /// The kernel's internal ENOTSUPP, which reaches userspace as is.
    const ENOTSUPP: i32 = 524;
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL | libc::EOPNOTSUPP | libc::ENOSYS | ENOTSUPP)
    )
}

/// Map types whose values are per CPU.
fn per_cpu(map_type: u32) -> bool {
    // BPF_MAP_TYPE_PERCPU_HASH, _PERCPU_ARRAY, _LRU_PERCPU_HASH.
    matches!(map_type, 5 | 6 | 10)
}

/// The CPUs the kernel may run on (`/sys/devices/system/cpu/possible`): a
/// per-CPU map's value, read or written from userspace, is one slot each.
pub fn possible_cpus() -> Result<usize> {
    let text = std::fs::read_to_string("/sys/devices/system/cpu/possible")
        .context("reading /sys/devices/system/cpu/possible")?;
    let mut n = 0;
    for part in text.trim().split(',') {
        let last = part.rsplit('-').next().unwrap_or(part);
        n = n.max(last.parse::<usize>().context("parsing the possible CPUs")? + 1);
    }
    Ok(n)
}

/// The bytes of one value of the map as userspace reads and writes it: per
/// CPU, each slot rounded up to 8 bytes.
fn value_len(info: &RawMapInfo) -> Result<usize> {
    let vs = info.value_size as usize;
    Ok(if per_cpu(info.map_type) {
        vs.next_multiple_of(8) * possible_cpus()?
    } else {
        vs
    })
}

/// Every entry of the map behind `fd`, a batch at a time (a per-CPU map's
/// values hold every CPU's slot, see `value_len`).
/// Entries the datapath adds or removes meanwhile may or may not be seen,
/// as with any walk of a live map.
pub fn read_all(fd: BorrowedFd<'_>) -> Result<Entries> {
    let mut out: Option<Entries> = None;
    for_each_batch(fd, |batch| {
        match &mut out {
            None => out = Some(batch.clone()),
            Some(all) => {
                all.keys.extend_from_slice(&batch.keys);
                all.values.extend_from_slice(&batch.values);
            }
        }
        Ok(ControlFlow::Continue(()))
    })?;
    match out {
        Some(all) => Ok(all),
        None => {
            let info = map_info(fd)?;
            Ok(Entries::new(info.key_size as usize, value_len(&info)?))
        }
    }
}

/// Hands every entry of the map behind `fd` to `each`, a batch of up to
/// `CHUNK` at a time, holding no more than one batch: a walk of a big map
/// (the verify pass reads all 65,536 `backends` slots every minute, the
/// conntrack janitor millions of entries) costs its buffers once, not the
/// map's size in memory. `each` may stop the walk early. The kernel's
/// cursor is a bucket index, so entries the datapath inserts or evicts
/// meanwhile do not restart the walk, as they can a `BPF_MAP_GET_NEXT_KEY`
/// walk (a key evicted under it sends it back to the first bucket).
pub fn for_each_batch(
    fd: BorrowedFd<'_>,
    mut each: impl FnMut(&Entries) -> Result<ControlFlow<()>>,
) -> Result<()> {
    let info = map_info(fd)?;
    let (ks, vs) = (info.key_size as usize, value_len(&info)?);
    let mut out = Entries::new(ks, vs);
    // The batch token: a bucket or index, at most a key's size.
    let mut token_in = [0u64; 8];
    let mut token_out = [0u64; 8];
    let mut first = true;
    let mut keys = vec![0u8; CHUNK * ks];
    let mut values = vec![0u8; CHUNK * vs];
    loop {
        let mut attr = BatchAttr {
            in_batch: if first {
                0
            } else {
                token_in.as_mut_ptr() as u64
            },
            out_batch: token_out.as_mut_ptr() as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: CHUNK as u32,
            map_fd: fd.as_raw_fd() as u32,
            elem_flags: 0,
            flags: 0,
        };
        let r = sys_bpf(BPF_MAP_LOOKUP_BATCH, &mut attr);
        let n = attr.count as usize;
        let done = match r {
            Ok(_) => false,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => true,
            Err(e) if first && no_batch(&e) => return each(&read_each(fd, ks, vs)?).map(drop),
            Err(e) => return Err(e).context("BPF_MAP_LOOKUP_BATCH"),
        };
        out.keys.clear();
        out.values.clear();
        out.keys.extend_from_slice(&keys[..n * ks]);
        out.values.extend_from_slice(&values[..n * vs]);
        if n > 0 && each(&out)?.is_break() {
            return Ok(());
        }
        if done {
            return Ok(());
        }
        token_in = token_out;
        first = false;
    }
}

#[repr(C)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value_or_next: u64,
    flags: u64,
}

/// [`read_all`] one call per entry (kernels before 5.6).
fn read_each(fd: BorrowedFd<'_>, ks: usize, vs: usize) -> Result<Entries> {
    let mut out = Entries::new(ks, vs);
    let mut key: Option<Vec<u8>> = None;
    let mut next = vec![0u8; ks];
    let mut value = vec![0u8; vs];
    loop {
        let mut attr = ElemAttr {
            map_fd: fd.as_raw_fd() as u32,
            _pad: 0,
            key: key.as_mut().map_or(0, |k| k.as_mut_ptr() as u64),
            value_or_next: next.as_mut_ptr() as u64,
            flags: 0,
        };
        match sys_bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(out),
            Err(e) => return Err(e).context("BPF_MAP_GET_NEXT_KEY"),
        }
        let mut attr = ElemAttr {
            map_fd: fd.as_raw_fd() as u32,
            _pad: 0,
            key: next.as_mut_ptr() as u64,
            value_or_next: value.as_mut_ptr() as u64,
            flags: 0,
        };
        match sys_bpf(BPF_MAP_LOOKUP_ELEM, &mut attr) {
            Ok(_) => out.push(&next, &value),
            // Gone since: skip it.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => return Err(e).context("BPF_MAP_LOOKUP_ELEM"),
        }
        key = Some(next.clone());
    }
}

/// What [`write_all`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Written {
    /// Entries stored.
    pub stored: usize,
    /// Entries left out because the key was there already (with
    /// [`BPF_NOEXIST`]).
    pub existed: usize,
    /// Entries left out because the map was full (`E2BIG`: a hash map at
    /// capacity; an LRU map evicts instead).
    pub full: usize,
}

/// Stores `entries` in the map behind `fd` with `flags` ([`BPF_ANY`] or
/// [`BPF_NOEXIST`]: keys already there are kept as they are, and counted).
/// The kernel's batch update takes no `BPF_NOEXIST` (only `BPF_F_LOCK`):
/// those writes go one call per entry, so leave out first what is known to
/// be there (see [`Entries::without_keys_of`]).
pub fn write_all(fd: BorrowedFd<'_>, entries: &Entries, flags: u64) -> Result<Written> {
    if flags != BPF_ANY {
        return write_each(fd, entries, flags);
    }
    let (ks, vs) = (entries.key_size, entries.value_size);
    let mut w = Written::default();
    let total = entries.len();
    let mut at = 0;
    while at < total {
        let n = (total - at).min(CHUNK);
        let mut attr = BatchAttr {
            in_batch: 0,
            out_batch: 0,
            keys: entries.keys[at * ks..].as_ptr() as u64,
            values: entries.values[at * vs..].as_ptr() as u64,
            count: n as u32,
            map_fd: fd.as_raw_fd() as u32,
            elem_flags: flags,
            flags: 0,
        };
        let r = sys_bpf(BPF_MAP_UPDATE_BATCH, &mut attr);
        let done = attr.count as usize;
        match r {
            Ok(_) => {
                w.stored += n;
                at += n;
            }
            Err(e) if at == 0 && done == 0 && no_batch(&e) => {
                return write_each(fd, entries, flags);
            }
            // The element at `at + done` was refused: count it and go on
            // after it.
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                w.stored += done;
                w.existed += 1;
                at += done + 1;
            }
            Err(e) if e.raw_os_error() == Some(libc::E2BIG) => {
                w.stored += done;
                w.full += 1;
                at += done + 1;
            }
            Err(e) => return Err(e).context("BPF_MAP_UPDATE_BATCH"),
        }
    }
    Ok(w)
}

/// [`write_all`] one call per entry.
fn write_each(fd: BorrowedFd<'_>, entries: &Entries, flags: u64) -> Result<Written> {
    let mut w = Written::default();
    for i in 0..entries.len() {
        let mut attr = ElemAttr {
            map_fd: fd.as_raw_fd() as u32,
            _pad: 0,
            key: entries.key(i).as_ptr() as u64,
            value_or_next: entries.value(i).as_ptr() as u64,
            flags,
        };
        match sys_bpf(BPF_MAP_UPDATE_ELEM, &mut attr) {
            Ok(_) => w.stored += 1,
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => w.existed += 1,
            Err(e) if e.raw_os_error() == Some(libc::E2BIG) => w.full += 1,
            Err(e) => return Err(e).context("BPF_MAP_UPDATE_ELEM"),
        }
    }
    Ok(w)
}
