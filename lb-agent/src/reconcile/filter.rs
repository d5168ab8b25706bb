//! The `addr_filter` bitmap, reference-counted: a bit is set before the first
//! entry it stands for is written, and cleared after the last one is removed,
//! so the datapath never skips a packet it should translate (a clear bit
//! proves there is no such entry; a set bit only says "look it up").

use std::collections::HashMap;

use super::encoding::FilterKey;
use crate::bpf::Maps;

#[derive(Debug, Default)]
pub struct Filter {
    /// How many written entries stand behind each set bit.
    counts: HashMap<u32, u32>,
    /// The words written so far (read from the map on first touch: an adopted
    /// datapath's bitmap is already set).
    words: HashMap<u32, u64>,
    /// A write failed since [`Self::take_failed`] last asked.
    failed: bool,
}

impl Filter {
    /// One more entry stands behind `key`'s bit: sets it if it is the first.
    pub fn add(&mut self, maps: &mut Maps, key: FilterKey) {
        let bit = key.bit();
        let n = self.counts.entry(bit).or_insert(0);
        *n += 1;
        if *n == 1 {
            self.write(maps, bit, true);
        }
    }

    /// One entry behind `key`'s bit is gone: clears it if it was the last.
    pub fn remove(&mut self, maps: &mut Maps, key: FilterKey) {
        let bit = key.bit();
        if let Some(n) = self.counts.get_mut(&bit) {
            *n -= 1;
            if *n == 0 {
                self.counts.remove(&bit);
                self.write(maps, bit, false);
            }
        }
    }

    /// Counts an entry found in the maps at start (its bit is already set).
    pub(super) fn count(&mut self, key: FilterKey) {
        *self.counts.entry(key.bit()).or_insert(0) += 1;
    }

    fn write(&mut self, maps: &mut Maps, bit: u32, set: bool) {
        let index = bit / 64;
        let word = self
            .words
            .entry(index)
            .or_insert_with(|| maps.addr_filter.get(&index, 0).unwrap_or(0));
        if set {
            *word |= 1 << (bit % 64);
        } else {
            *word &= !(1 << (bit % 64));
        }
        if let Err(e) = maps.set_filter_word(index, *word) {
            log::error!("{e:#}");
            self.failed = true;
        }
    }

    /// Whether a write failed since the last call.
    pub(super) fn take_failed(&mut self) -> bool {
        std::mem::take(&mut self.failed)
    }

    /// Makes every word of the map what the counts say: a bit set exactly
    /// where an entry stands behind it. Returns how many bits were wrong.
    pub(super) fn repair(&mut self, maps: &mut Maps) -> anyhow::Result<usize> {
        let mut expected: HashMap<u32, u64> = HashMap::new();
        for bit in self.counts.keys() {
            *expected.entry(bit / 64).or_insert(0) |= 1 << (bit % 64);
        }
        let mut wrong = 0;
        for index in 0..lb_common::hash::ADDR_FILTER_WORDS {
            let want = expected.get(&index).copied().unwrap_or(0);
            let have = maps.addr_filter.get(&index, 0)?;
            if have != want {
                wrong += (have ^ want).count_ones() as usize;
                maps.set_filter_word(index, want)?;
            }
            if want == 0 {
                self.words.remove(&index);
            } else {
                self.words.insert(index, want);
            }
        }
        Ok(wrong)
    }
}
