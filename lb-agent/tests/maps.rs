//! The typed map writers against real (unpinned) maps.

mod support;

use support::{Lab, SIZES};

/// Row `r`'s test pattern: non-zero ids no other row has.
fn pattern(r: usize, len: usize) -> Vec<u32> {
    (0..len).map(|i| (r * 100_000 + i + 1) as u32).collect()
}

#[test]
fn maglev_rows_read_back_what_was_written_at_every_row() {
    let mut lab = Lab::new();
    let maglev = &mut lab.maps.maglev;
    let (rows, len) = (maglev.rows(), maglev.row_len());
    assert_eq!(rows, SIZES.service_ids as usize);
    // Rows of 251 ids (1008 bytes with the pair padding) straddle page
    // boundaries: each write maps just the pages of its row.
    for r in 0..rows {
        assert_eq!(maglev.write_row(r as u32, &pattern(r, len)).unwrap(), len);
    }
    // Written all, then read all: no row overlaps another.
    for r in 0..rows {
        assert_eq!(
            maglev.read_row(r as u32).unwrap(),
            pattern(r, len),
            "row {r}"
        );
    }
    // Only changed entries are stored (and counted).
    let mut t = pattern(3, len);
    t[len - 1] = 7;
    assert_eq!(maglev.write_row(3, &t).unwrap(), 1);
    assert_eq!(maglev.read_row(3).unwrap(), t);
    assert_eq!(maglev.read_row(4).unwrap(), pattern(4, len));
    // Out of range and wrong lengths are errors, not writes elsewhere.
    assert!(maglev.write_row(rows as u32, &t).is_err());
    assert!(maglev.read_row(rows as u32).is_err());
    assert!(maglev.write_row(0, &t[..len - 1]).is_err());
}
