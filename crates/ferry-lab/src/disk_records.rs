//! Checks the records the guest's disk writer (`ferry.disk=`, crate ferry-guest) leaves on a disk,
//! in raw images taken from the host: that a live migration moved every write the guest made, and
//! that nothing stale overwrote what the guest wrote after it resumed.
//!
//! The record format and ring layout are [`ferry_guest::disk_record`]'s. Record `seq` always lands
//! in slot `(seq - 1) % slots` and the writer writes and syncs one record at a time, so in a
//! quiescent image whose newest record is `M` every slot holds exactly the newest record `≤ M` of
//! its residue class (or nothing, before the first lap ends) — except the slot of `M + 1`, which
//! may hold a torn record if the image was taken while that write was under way. [`check_image`]
//! checks this for one image; [`check_moved`] checks it for both sides of a move and then compares
//! them slot by slot.
//!
//! Images must be raw (byte `offset` of the image is byte `offset` of the guest's disk) and
//! quiescent: the source as it was at switchover (the source VM stopped), the destination after
//! its VM was stopped or quit — not read while the guest is still writing. The ring must have been
//! zeroed (or never held records) when the guest started: records left by an earlier run are
//! reported as out of place.
use std::fmt;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use ferry_guest::disk_record::{self, Parsed, Ring, RECORD_SIZE};

/// What one slot of the ring holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Slot {
    /// No record (zeros, or data that is not a record).
    Empty,
    Record { seq: u64, seed: u64 },
    /// Starts like a record but is not a whole, valid one; the reason.
    Torn(String),
}

impl Slot {
    /// The record's sequence number; 0 for an empty slot, `None` for a torn one.
    pub fn seq(&self) -> Option<u64> {
        match self {
            Slot::Empty => Some(0),
            Slot::Record { seq, .. } => Some(*seq),
            Slot::Torn(_) => None,
        }
    }
}

impl fmt::Display for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Slot::Empty => write!(f, "no record"),
            Slot::Record { seq, .. } => write!(f, "seq {seq}"),
            Slot::Torn(reason) => write!(f, "a torn record ({reason})"),
        }
    }
}

/// Reads and classifies every slot of the ring `[offset, offset + span)` of a raw image.
/// `span` must be a positive multiple of [`RECORD_SIZE`] (64 KiB), as the guest requires.
pub fn scan(image: &Path, offset: u64, span: u64) -> Result<Vec<Slot>> {
    let ring = Ring::new(offset, span).map_err(anyhow::Error::msg)?;
    let file = File::open(image).with_context(|| format!("open {}", image.display()))?;
    let len = file.metadata().with_context(|| format!("stat {}", image.display()))?.len();
    ensure!(
        len >= offset + span,
        "{} is {len} bytes, too short for the record ring [{offset}, {})",
        image.display(),
        offset + span
    );
    let mut buffer = vec![0u8; RECORD_SIZE];
    (0..ring.slots)
        .map(|slot| {
            let at = ring.slot_offset(slot);
            file.read_exact_at(&mut buffer, at).with_context(|| format!("read {} at {at}", image.display()))?;
            Ok(match disk_record::parse(&buffer, at) {
                Parsed::Empty => Slot::Empty,
                Parsed::Record(header) => Slot::Record { seq: header.seq, seed: header.seed },
                Parsed::Torn(reason) => Slot::Torn(reason.to_string()),
            })
        })
        .collect()
}

/// One image's ring, found consistent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageCheck {
    /// Newest record (0: none).
    pub max_seq: u64,
    /// Slots holding a valid record.
    pub records: u64,
    /// The slot of record `max_seq + 1` if it holds a torn record: a write under way when the
    /// image was taken.
    pub in_flight: Option<u64>,
    /// The writer's seed (0 if there are no records).
    pub seed: u64,
}

/// Checks that one quiescent raw image holds a consistent ring (see the module docs); errors name
/// the slot, its offset and the sequence numbers involved.
pub fn check_image(image: &Path, offset: u64, span: u64) -> Result<ImageCheck> {
    let slots = scan(image, offset, span)?;
    let ring = Ring::new(offset, span).map_err(anyhow::Error::msg)?;
    check_ring(&ring, &slots).with_context(|| format!("disk records in {}", image.display()))
}

fn check_ring(ring: &Ring, slots: &[Slot]) -> Result<ImageCheck> {
    let mut max_seq = 0;
    let mut records = 0;
    let mut seed: Option<(u64, u64)> = None; // (seed, slot it was first seen in)
    for (index, slot) in slots.iter().enumerate() {
        if let Slot::Record { seq, seed: record_seed } = *slot {
            max_seq = max_seq.max(seq);
            records += 1;
            match seed {
                None => seed = Some((record_seed, index as u64)),
                Some((first, first_slot)) if first != record_seed => bail!(
                    "slot {index} (offset {}) holds a record with seed {record_seed}, slot {first_slot} one with seed \
                     {first}: records from two runs (the ring must be zeroed before the guest starts)",
                    ring.slot_offset(index as u64)
                ),
                Some(_) => {}
            }
        }
    }
    let in_flight_slot = ring.slot_of(max_seq + 1);
    let mut in_flight = None;
    for (index, slot) in slots.iter().enumerate() {
        let index = index as u64;
        let at = ring.slot_offset(index);
        let expected = ring.expected_seq(index, max_seq);
        match slot.seq() {
            None if index == in_flight_slot => in_flight = Some(index),
            None => bail!(
                "slot {index} (offset {at}) holds {slot}, and it is not the slot being written after the newest \
                 record (seq {max_seq}, so slot {in_flight_slot})"
            ),
            Some(seq) if seq == expected => {}
            Some(seq) if seq > 0 && ring.slot_of(seq) != index => bail!(
                "slot {index} (offset {at}) holds seq {seq}, which belongs in slot {} (a record from an earlier run \
                 or another ring layout? the ring must be zeroed before the guest starts)",
                ring.slot_of(seq)
            ),
            Some(_) => {
                let what = if expected == 0 { "no record".to_string() } else { format!("seq {expected}") };
                bail!(
                    "slot {index} (offset {at}) holds {slot} but must hold {what}, given that the newest record is \
                     seq {max_seq}: a write lost, or overwritten by an older one"
                )
            }
        }
    }
    Ok(ImageCheck { max_seq, records, in_flight, seed: seed.map_or(0, |(seed, _)| seed) })
}

/// The result of [`check_moved`]. Slot counts add up to the ring's slot count, less any slot in
/// flight at switchover and any in flight at the destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MoveCheck {
    /// Slots holding the same record in both images.
    pub same: u64,
    /// Slots the guest rewrote after the move (a newer record at the destination).
    pub newer_at_dest: u64,
    /// Slots empty in both.
    pub empty: u64,
    /// Newest record at switchover (0: none).
    pub source_max_seq: u64,
    /// Newest record at the destination.
    pub dest_max_seq: u64,
    /// Slot torn in the source image (a write under way at switchover, which the destination
    /// completed or superseded).
    pub in_flight_at_switchover: Option<u64>,
    /// Slot torn in the destination image (a write under way when it was taken).
    pub in_flight_at_dest: Option<u64>,
}

impl MoveCheck {
    /// Whether the comparison checked anything: some record from before the move is still in
    /// place at the destination. If the guest kept writing long enough to go once round the
    /// whole ring after the move, every slot is newer and the move can no longer be judged.
    pub fn compared_any(&self) -> bool {
        self.same > 0
    }
}

impl fmt::Display for MoveCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} slots as at switchover, {} rewritten after the move, {} empty; newest record seq {} at switchover, \
             seq {} at the destination",
            self.same, self.newer_at_dest, self.empty, self.source_max_seq, self.dest_max_seq
        )?;
        if let Some(slot) = self.in_flight_at_switchover {
            write!(f, "; a write in flight at switchover (slot {slot}) completed at the destination")?;
        }
        if let Some(slot) = self.in_flight_at_dest {
            write!(f, "; a write in flight at the destination (slot {slot})")?;
        }
        Ok(())
    }
}

/// Compares the raw `source` image as it was at switchover with the raw `dest` image taken after
/// the guest ran on at the destination (both quiescent; see the module docs), over the guest's
/// record ring `[offset, offset + span)` (its `ferry.disk_offset` and `ferry.disk_span`).
///
/// Fails if either image's ring is inconsistent on its own ([`check_image`]: a torn record other
/// than one write in flight, a gap, a stale record), if the destination holds an older record than
/// the source at some slot (a write the move lost) or a different record with the same sequence
/// number, or if the write in flight at switchover is missing at the destination. Errors name the
/// slot, its offset and both sequence numbers.
///
/// A pass only means something if [`MoveCheck::compared_any`]: keep the guest's run at the
/// destination shorter than one lap of the ring (span / rate seconds).
pub fn check_moved(source: &Path, dest: &Path, offset: u64, span: u64) -> Result<MoveCheck> {
    let ring = Ring::new(offset, span).map_err(anyhow::Error::msg)?;
    let source_slots = scan(source, offset, span)?;
    let dest_slots = scan(dest, offset, span)?;
    let at_source = check_ring(&ring, &source_slots)
        .with_context(|| format!("disk records in the source image {}", source.display()))?;
    let at_dest = check_ring(&ring, &dest_slots)
        .with_context(|| format!("disk records in the destination image {}", dest.display()))?;
    if at_source.records > 0 && at_dest.records > 0 {
        ensure!(
            at_source.seed == at_dest.seed,
            "the source's records have seed {}, the destination's seed {}: not the same guest run",
            at_source.seed,
            at_dest.seed
        );
    }

    let mut check = MoveCheck {
        same: 0,
        newer_at_dest: 0,
        empty: 0,
        source_max_seq: at_source.max_seq,
        dest_max_seq: at_dest.max_seq,
        in_flight_at_switchover: at_source.in_flight,
        in_flight_at_dest: at_dest.in_flight,
    };
    for (index, (at_switchover, after)) in source_slots.iter().zip(&dest_slots).enumerate() {
        let index = index as u64;
        let at = ring.slot_offset(index);
        let Some(after_seq) = after.seq() else {
            // The destination's own write in flight; what it replaces is checked through
            // dest_max_seq below (it is newer than anything at the source if that holds).
            continue;
        };
        match at_switchover.seq() {
            None => {
                // The write in flight at switchover: the destination must have finished it (or
                // written a later lap over it).
                let in_flight_seq = at_source.max_seq + 1;
                ensure!(
                    after_seq >= in_flight_seq,
                    "slot {index} (offset {at}): the write of seq {in_flight_seq} was in flight at switchover \
                     (the source holds {at_switchover}), but the destination holds {after}: the move lost it"
                );
                check.newer_at_dest += 1;
            }
            Some(before_seq) if after_seq < before_seq => bail!(
                "slot {index} (offset {at}): the destination holds {after} but the source held seq {before_seq} \
                 at switchover: a write the move lost"
            ),
            Some(0) if after_seq == 0 => check.empty += 1,
            Some(before_seq) if after_seq == before_seq => {
                ensure!(
                    at_switchover == after,
                    "slot {index} (offset {at}): source and destination hold different records with seq {before_seq}"
                );
                check.same += 1;
            }
            Some(_) => check.newer_at_dest += 1,
        }
    }
    ensure!(
        at_dest.max_seq >= at_source.max_seq,
        "the destination's newest record is seq {} but the source's was seq {} at switchover: the move lost writes",
        at_dest.max_seq,
        at_source.max_seq
    );
    Ok(check)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_guest::disk_record::RecordHeader;
    use std::fs::OpenOptions;
    use std::path::PathBuf;

    const OFFSET: u64 = 3 * 4096;
    const SLOTS: u64 = 8;
    const SPAN: u64 = SLOTS * RECORD_SIZE as u64;
    const SEED: u64 = 99;

    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> TempDir {
            let dir = std::env::temp_dir().join(format!("ferry-disk-records-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn ring() -> Ring {
        Ring::new(OFFSET, SPAN).unwrap()
    }

    /// A raw image the way the guest leaves it after writing records 1..=last (plus some bytes
    /// after the ring, as a real disk has).
    fn image(dir: &TempDir, name: &str, last: u64) -> PathBuf {
        let path = dir.0.join(name);
        let file = OpenOptions::new().write(true).create(true).truncate(true).open(&path).unwrap();
        file.set_len(OFFSET + SPAN + 4096).unwrap();
        for seq in 1..=last {
            write_record(&path, seq);
        }
        path
    }

    fn write_record(path: &Path, seq: u64) {
        let offset = ring().slot_offset(ring().slot_of(seq));
        let mut record = vec![0u8; RECORD_SIZE];
        disk_record::encode(&mut record, RecordHeader { seq, offset, seed: SEED });
        OpenOptions::new().write(true).open(path).unwrap().write_all_at(&record, offset).unwrap();
    }

    /// Record `seq`, written only as far as its first `bytes` bytes.
    fn write_torn(path: &Path, seq: u64, bytes: usize) {
        let offset = ring().slot_offset(ring().slot_of(seq));
        let mut record = vec![0u8; RECORD_SIZE];
        disk_record::encode(&mut record, RecordHeader { seq, offset, seed: SEED });
        OpenOptions::new().write(true).open(path).unwrap().write_all_at(&record[..bytes], offset).unwrap();
    }

    fn copy(dir: &TempDir, from: &Path, name: &str) -> PathBuf {
        let path = dir.0.join(name);
        std::fs::copy(from, &path).unwrap();
        path
    }

    #[test]
    fn an_exact_copy_passes() {
        let dir = TempDir::new("copy");
        let source = image(&dir, "source.raw", 11); // wrapped once
        let dest = copy(&dir, &source, "dest.raw");
        let check = check_moved(&source, &dest, OFFSET, SPAN).unwrap();
        assert_eq!(
            check,
            MoveCheck {
                same: 8,
                newer_at_dest: 0,
                empty: 0,
                source_max_seq: 11,
                dest_max_seq: 11,
                in_flight_at_switchover: None,
                in_flight_at_dest: None,
            }
        );
        assert!(check.compared_any());
        assert!(check.to_string().contains("8 slots as at switchover"), "{check}");
        let slots = scan(&source, OFFSET, SPAN).unwrap();
        assert_eq!(slots[2], Slot::Record { seq: 11, seed: SEED });
        assert_eq!(slots[3], Slot::Record { seq: 4, seed: SEED });
    }

    #[test]
    fn a_dest_missing_the_newest_source_record_fails() {
        let dir = TempDir::new("lost");
        let dest = image(&dir, "dest.raw", 10);
        let source = copy(&dir, &dest, "source.raw");
        write_record(&source, 11); // slot 2: seq 3 → 11 at the source only
        let error = format!("{:#}", check_moved(&source, &dest, OFFSET, SPAN).unwrap_err());
        assert!(error.contains("slot 2 ") && error.contains("seq 3") && error.contains("seq 11"), "{error}");
        assert!(error.contains("lost"), "{error}");
    }

    #[test]
    fn later_records_at_the_dest_pass_and_are_counted() {
        let dir = TempDir::new("newer");
        let source = image(&dir, "source.raw", 3); // slots 3.. still empty
        let dest = copy(&dir, &source, "dest.raw");
        for seq in 4..=5 {
            write_record(&dest, seq);
        }
        let check = check_moved(&source, &dest, OFFSET, SPAN).unwrap();
        assert_eq!((check.same, check.newer_at_dest, check.empty), (3, 2, 3));
        assert_eq!((check.source_max_seq, check.dest_max_seq), (3, 5));

        // Over the wrap.
        let source = image(&dir, "source2.raw", 11);
        let dest = copy(&dir, &source, "dest2.raw");
        for seq in 12..=14 {
            write_record(&dest, seq);
        }
        let check = check_moved(&source, &dest, OFFSET, SPAN).unwrap();
        assert_eq!((check.same, check.newer_at_dest, check.empty), (5, 3, 0));
        assert_eq!((check.source_max_seq, check.dest_max_seq), (11, 14));
    }

    #[test]
    fn torn_records_fail() {
        let dir = TempDir::new("torn");
        let source = image(&dir, "source.raw", 11);
        let dest = copy(&dir, &source, "dest.raw");
        // Damage a record in the middle of the ring of the destination.
        let mut byte = [0u8; 1];
        let file = OpenOptions::new().read(true).write(true).open(&dest).unwrap();
        let at = ring().slot_offset(5) + 30_000;
        file.read_exact_at(&mut byte, at).unwrap();
        file.write_all_at(&[byte[0] ^ 1], at).unwrap();
        let error = format!("{:#}", check_moved(&source, &dest, OFFSET, SPAN).unwrap_err());
        assert!(error.contains("destination image") && error.contains("slot 5 ") && error.contains("torn"), "{error}");

        // And in the source.
        let error = format!("{:#}", check_moved(&dest, &source, OFFSET, SPAN).unwrap_err());
        assert!(error.contains("source image") && error.contains("slot 5 ") && error.contains("torn"), "{error}");
    }

    #[test]
    fn a_write_in_flight_at_switchover_must_be_completed_at_the_dest() {
        let dir = TempDir::new("inflight");
        let source = image(&dir, "source.raw", 11);
        let dest = copy(&dir, &source, "dest.raw");
        write_torn(&source, 12, 4096); // slot 3 was being rewritten when the VM stopped
        assert_eq!(check_image(&source, OFFSET, SPAN).unwrap().in_flight, Some(3));

        let error = format!("{:#}", check_moved(&source, &dest, OFFSET, SPAN).unwrap_err());
        assert!(error.contains("slot 3 ") && error.contains("seq 12") && error.contains("seq 4"), "{error}");

        write_record(&dest, 12);
        let check = check_moved(&source, &dest, OFFSET, SPAN).unwrap();
        assert_eq!(check.in_flight_at_switchover, Some(3));
        assert_eq!((check.same, check.newer_at_dest), (7, 1));

        // The destination's own write in flight is fine too, but only the next one.
        write_torn(&dest, 13, 8192);
        let check = check_moved(&source, &dest, OFFSET, SPAN).unwrap();
        assert_eq!(check.in_flight_at_dest, Some(4));
        assert_eq!((check.same, check.newer_at_dest), (6, 1));
        write_torn(&dest, 15, 8192);
        assert!(check_moved(&source, &dest, OFFSET, SPAN).is_err());
    }

    #[test]
    fn a_stale_write_over_a_newer_one_at_the_dest_fails() {
        let dir = TempDir::new("stale");
        let source = image(&dir, "source.raw", 11);
        let dest = copy(&dir, &source, "dest.raw");
        for seq in 12..=14 {
            write_record(&dest, seq);
        }
        // A late copy of the source's slot 4 (seq 5) lands over the guest's seq 13.
        let mut old = vec![0u8; RECORD_SIZE];
        let at = ring().slot_offset(4);
        File::open(&source).unwrap().read_exact_at(&mut old, at).unwrap();
        OpenOptions::new().write(true).open(&dest).unwrap().write_all_at(&old, at).unwrap();
        let error = format!("{:#}", check_moved(&source, &dest, OFFSET, SPAN).unwrap_err());
        assert!(error.contains("slot 4 ") && error.contains("seq 5") && error.contains("seq 13"), "{error}");
    }

    #[test]
    fn other_runs_and_short_images_are_rejected() {
        let dir = TempDir::new("other");
        let source = image(&dir, "source.raw", 4);
        let dest = copy(&dir, &source, "dest.raw");
        // A record with another seed.
        let offset = ring().slot_offset(1);
        let mut record = vec![0u8; RECORD_SIZE];
        disk_record::encode(&mut record, RecordHeader { seq: 2, offset, seed: SEED + 1 });
        OpenOptions::new().write(true).open(&dest).unwrap().write_all_at(&record, offset).unwrap();
        let error = format!("{:#}", check_moved(&source, &dest, OFFSET, SPAN).unwrap_err());
        assert!(error.contains("seed"), "{error}");

        let short = dir.0.join("short.raw");
        std::fs::write(&short, vec![0u8; 4096]).unwrap();
        assert!(check_moved(&source, &short, OFFSET, SPAN).unwrap_err().to_string().contains("too short"));
        assert!(scan(&source, OFFSET, 1000).is_err());
    }
}
