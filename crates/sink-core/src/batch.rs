//! Groups consumed records into batches by count, bytes and linger time.
//!
//! Pure and synchronous: the loop feeds it records and the clock, and takes
//! sealed batches when it has room to write them. Sealed batches wait in a
//! queue instead of growing the open one, so a batch never exceeds its limits
//! while the sink is slow.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::sink::{Batch, Entry, PartitionRange, Record, Rejection};

/// Most entries a batch reserves room for at once; past that it grows.
const PRESIZE_MAX_ENTRIES: usize = 10_000;

/// When a batch is sealed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLimits {
    /// Seal once a batch holds this many records.
    pub max_events: usize,
    /// Seal before a record would take a batch past this many bytes (a single
    /// larger record makes a batch of its own).
    pub max_bytes: usize,
    /// Seal a non-empty batch this long after its first record arrived.
    pub linger: Duration,
}

/// A sealed batch, ready for the sink, with the records decode already sent
/// to the dead-letter topic.
#[derive(Debug)]
pub struct Work<T> {
    /// What the sink writes.
    pub batch: Batch<T>,
    /// Records that failed [`crate::Sink::decode`]; they are in `batch.ranges`
    /// but not in `batch.entries`.
    pub dead_letters: Vec<(Record, Rejection)>,
}

impl<T> Work<T> {
    /// Records in this batch, decoded or not.
    pub fn len(&self) -> usize {
        self.batch.entries.len() + self.dead_letters.len()
    }

    /// True when the batch holds no record at all.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The open batch and the queue of sealed ones.
#[derive(Debug)]
pub struct Batcher<T> {
    limits: BatchLimits,
    topic: Arc<str>,
    /// False for a sink whose write never rejects an entry
    /// ([`crate::Sink::rejects_at_write`]): a decoded record's payload, key
    /// and headers are freed as soon as it is added.
    keep_decoded_payloads: bool,
    open: Work<T>,
    /// The open batch's bytes per partition, kept as records are added: a
    /// purge takes exactly its partition's share off (a freed payload no
    /// longer says how large it was).
    open_partition_bytes: Vec<(i32, usize)>,
    open_since: Option<Instant>,
    sealed: VecDeque<Work<T>>,
}

impl<T> Batcher<T> {
    /// An empty batcher for one topic.
    pub fn new(topic: Arc<str>, limits: BatchLimits) -> Self {
        Self {
            open: empty_work(&topic),
            limits,
            topic,
            keep_decoded_payloads: true,
            open_partition_bytes: Vec::new(),
            open_since: None,
            sealed: VecDeque::new(),
        }
    }

    /// Frees each decoded record's payload, key and headers as it is added,
    /// for a sink that never needs them after decode; they still count
    /// towards [`BatchLimits::max_bytes`]. Records that failed decode keep
    /// theirs: their dead letters carry them.
    pub fn dropping_decoded_payloads(mut self) -> Self {
        self.keep_decoded_payloads = false;
        self
    }

    /// Adds a consumed record with what decode made of it. `resumed_from` is
    /// where fetching of its partition resumed before it (see
    /// [`crate::offsets::OffsetTracker::accept`]); a range this record opens
    /// starts there.
    pub fn push(
        &mut self,
        mut record: Record,
        decoded: Result<T, Rejection>,
        resumed_from: i64,
        now: Instant,
    ) {
        let size = record.size();
        let record_partition = record.partition;
        if !self.open.is_empty() && self.open_bytes() + size > self.limits.max_bytes {
            self.seal();
        }
        extend_range(
            &mut self.open.batch.ranges,
            record.partition,
            resumed_from,
            record.offset,
        );
        if self.open.batch.entries.capacity() == 0 {
            // Sized on the first record, not when the batch opens: an idle
            // consumer holds no buffer. Growing by doubling showed in
            // profiles (realloc, memmove of whole batches).
            self.open
                .batch
                .entries
                .reserve(self.limits.max_events.min(PRESIZE_MAX_ENTRIES));
        }
        match decoded {
            Ok(item) => {
                if !self.keep_decoded_payloads {
                    record.drop_contents();
                }
                self.open.batch.entries.push(Entry { record, item });
            }
            Err(rejection) => self.open.dead_letters.push((record, rejection)),
        }
        match self
            .open_partition_bytes
            .iter_mut()
            .find(|(p, _)| *p == record_partition)
        {
            Some((_, bytes)) => *bytes += size,
            None => self.open_partition_bytes.push((record_partition, size)),
        }
        self.open_since.get_or_insert(now);
        if self.open.len() >= self.limits.max_events || self.open_bytes() >= self.limits.max_bytes {
            self.seal();
        }
    }

    /// Bytes in the open batch.
    fn open_bytes(&self) -> usize {
        self.open_partition_bytes
            .iter()
            .map(|&(_, bytes)| bytes)
            .sum()
    }

    /// Seals the open batch if it has lingered long enough.
    pub fn tick(&mut self, now: Instant) {
        if self.deadline().is_some_and(|deadline| now >= deadline) {
            self.seal();
        }
    }

    /// When the open batch must be sealed, if it holds anything.
    pub fn deadline(&self) -> Option<Instant> {
        self.open_since.map(|since| since + self.limits.linger)
    }

    /// Seals the open batch now (shutdown, or a sink with room to spare).
    pub fn seal(&mut self) {
        if self.open.is_empty() {
            return;
        }
        let work = std::mem::replace(&mut self.open, empty_work(&self.topic));
        self.sealed.push_back(work);
        self.open_partition_bytes.clear();
        self.open_since = None;
    }

    /// The oldest sealed batch, if any.
    pub fn pop_sealed(&mut self) -> Option<Work<T>> {
        self.sealed.pop_front()
    }

    /// True when sealed batches wait for the sink.
    pub fn has_sealed(&self) -> bool {
        !self.sealed.is_empty()
    }

    /// How many sealed batches wait for the sink.
    pub fn sealed_len(&self) -> usize {
        self.sealed.len()
    }

    /// Records held, open and sealed.
    pub fn buffered(&self) -> usize {
        self.open.len() + self.sealed.iter().map(Work::len).sum::<usize>()
    }

    /// Drops every buffered record of `partition`: it was revoked, or it will
    /// be fetched again from another offset.
    pub fn purge(&mut self, partition: i32) {
        purge_work(&mut self.open, partition);
        self.open_partition_bytes.retain(|&(p, _)| p != partition);
        if self.open.is_empty() {
            self.open_since = None;
        }
        for work in &mut self.sealed {
            purge_work(work, partition);
        }
        self.sealed.retain(|work| !work.is_empty());
    }
}

fn empty_work<T>(topic: &Arc<str>) -> Work<T> {
    Work {
        batch: Batch {
            topic: Arc::clone(topic),
            entries: Vec::new(),
            ranges: Vec::new(),
        },
        dead_letters: Vec::new(),
    }
}

fn extend_range(ranges: &mut Vec<PartitionRange>, partition: i32, resumed_from: i64, offset: i64) {
    match ranges.iter_mut().find(|r| r.partition == partition) {
        Some(range) => range.next = offset + 1,
        None => ranges.push(PartitionRange {
            partition,
            first: resumed_from.min(offset),
            next: offset + 1,
        }),
    }
}

fn purge_work<T>(work: &mut Work<T>, partition: i32) {
    work.batch
        .entries
        .retain(|e| e.record.partition != partition);
    work.dead_letters.retain(|(r, _)| r.partition != partition);
    work.batch.ranges.retain(|r| r.partition != partition);
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn record(partition: i32, offset: i64, bytes: usize) -> Record {
        Record {
            topic: "t".into(),
            partition,
            offset,
            timestamp_ms: None,
            key: None,
            payload: vec![b'x'; bytes],
            headers: None,
        }
    }

    fn limits(max_events: usize, max_bytes: usize, linger_ms: u64) -> BatchLimits {
        BatchLimits {
            max_events,
            max_bytes,
            linger: Duration::from_millis(linger_ms),
        }
    }

    #[test]
    fn seals_at_max_events() {
        let now = Instant::now();
        let mut b = Batcher::new("t".into(), limits(3, 1 << 20, 1000));
        for offset in 0..7 {
            b.push(record(0, offset, 10), Ok(offset), offset, now);
        }
        let sizes: Vec<usize> = std::iter::from_fn(|| b.pop_sealed())
            .map(|w| w.len())
            .collect();
        assert_eq!(sizes, vec![3, 3]);
        assert_eq!(b.buffered(), 1, "the 7th record stays open");
    }

    #[test]
    fn never_exceeds_max_bytes() {
        let now = Instant::now();
        let mut b = Batcher::new("t".into(), limits(1000, 100, 1000));
        for offset in 0..10 {
            b.push(record(0, offset, 30), Ok(()), offset, now);
        }
        b.seal();
        let sizes: Vec<usize> = std::iter::from_fn(|| b.pop_sealed())
            .map(|w| w.len())
            .collect();
        // 3 x 30 = 90 fits, a 4th would make 120 > 100.
        assert_eq!(sizes, vec![3, 3, 3, 1]);
    }

    #[test]
    fn dropped_payloads_are_freed_at_once_and_still_count_towards_the_byte_limit() {
        let now = Instant::now();
        let mut b = Batcher::new("t".into(), limits(1000, 100, 1000)).dropping_decoded_payloads();
        for offset in 0..4 {
            b.push(record(0, offset, 30), Ok(()), offset, now);
        }
        b.push(record(0, 4, 30), Err(Rejection::new("bad", "bad")), 4, now);
        b.seal();
        let first = b.pop_sealed().unwrap();
        assert_eq!(first.len(), 3, "3 x 30 bytes fit in 100, a 4th does not");
        assert!(first
            .batch
            .entries
            .iter()
            .all(|e| e.record.payload.is_empty() && e.record.offset >= 0));
        let second = b.pop_sealed().unwrap();
        assert_eq!(
            second.dead_letters[0].0.payload.len(),
            30,
            "a dead letter keeps its bytes"
        );
    }

    #[test]
    fn a_purge_takes_off_exactly_the_bytes_of_its_partition() {
        let now = Instant::now();
        let mut b = Batcher::new("t".into(), limits(1000, 100, 1000)).dropping_decoded_payloads();
        b.push(record(0, 0, 30), Ok(()), 0, now);
        b.push(record(1, 0, 30), Ok(()), 0, now);
        b.push(record(1, 1, 30), Err(Rejection::new("bad", "bad")), 1, now);
        b.purge(1);
        // 30 bytes left open: 60 more fit, 80 more do not.
        b.push(record(0, 1, 60), Ok(()), 1, now);
        assert!(!b.has_sealed());
        b.push(record(0, 2, 20), Ok(()), 2, now);
        assert_eq!(b.pop_sealed().unwrap().len(), 2);
    }

    #[test]
    fn an_oversized_record_is_a_batch_of_its_own() {
        let now = Instant::now();
        let mut b = Batcher::new("t".into(), limits(1000, 100, 1000));
        b.push(record(0, 0, 10), Ok(()), 0, now);
        b.push(record(0, 1, 500), Ok(()), 1, now);
        b.push(record(0, 2, 10), Ok(()), 2, now);
        b.seal();
        let sizes: Vec<usize> = std::iter::from_fn(|| b.pop_sealed())
            .map(|w| w.len())
            .collect();
        assert_eq!(sizes, vec![1, 1, 1]);
    }

    #[test]
    fn seals_after_linger_from_first_record() {
        let t0 = Instant::now();
        let mut b = Batcher::new("t".into(), limits(1000, 1 << 20, 100));
        assert_eq!(b.deadline(), None, "nothing to linger for");
        b.push(record(0, 0, 1), Ok(()), 0, t0);
        b.push(record(0, 1, 1), Ok(()), 1, t0 + Duration::from_millis(90));
        assert_eq!(b.deadline(), Some(t0 + Duration::from_millis(100)));
        b.tick(t0 + Duration::from_millis(99));
        assert!(!b.has_sealed());
        b.tick(t0 + Duration::from_millis(100));
        assert_eq!(b.pop_sealed().unwrap().len(), 2);
        assert_eq!(b.deadline(), None);
    }

    #[test]
    fn ranges_cover_rejected_records_too() {
        let now = Instant::now();
        let mut b = Batcher::new("t".into(), limits(1000, 1 << 20, 100));
        b.push(record(1, 5, 1), Err(Rejection::new("bad", "bad")), 5, now);
        b.push(record(2, 7, 1), Ok(7), 7, now);
        b.push(record(1, 6, 1), Ok(6), 6, now);
        b.push(record(1, 9, 1), Err(Rejection::new("bad", "bad")), 9, now);
        b.seal();
        let work = b.pop_sealed().unwrap();
        assert_eq!(
            work.batch.ranges,
            vec![
                PartitionRange {
                    partition: 1,
                    first: 5,
                    next: 10
                },
                PartitionRange {
                    partition: 2,
                    first: 7,
                    next: 8
                },
            ]
        );
        assert_eq!(work.batch.entries.len(), 2);
        assert_eq!(work.dead_letters.len(), 2);
    }

    #[test]
    fn a_range_starts_where_fetching_resumed() {
        let now = Instant::now();
        let mut b = Batcher::new("t".into(), limits(1000, 1 << 20, 100));
        // Offsets 3 and 4 do not exist (a transaction marker, say).
        b.push(record(0, 5, 1), Ok(()), 3, now);
        b.push(record(0, 6, 1), Ok(()), 6, now);
        b.seal();
        let work = b.pop_sealed().unwrap();
        assert_eq!(
            work.batch.ranges,
            vec![PartitionRange {
                partition: 0,
                first: 3,
                next: 7
            }]
        );
    }

    #[test]
    fn purge_drops_a_partition_everywhere() {
        let now = Instant::now();
        let mut b = Batcher::new("t".into(), limits(2, 1 << 20, 100));
        b.push(record(0, 0, 1), Ok(()), 0, now);
        b.push(record(1, 0, 1), Ok(()), 0, now); // sealed: [p0, p1]
        b.push(record(1, 1, 1), Ok(()), 1, now); // open: [p1]
        b.purge(1);
        assert_eq!(b.buffered(), 1);
        assert_eq!(b.deadline(), None, "the open batch is empty again");
        let work = b.pop_sealed().unwrap();
        assert_eq!(work.batch.ranges.len(), 1);
        assert_eq!(work.batch.ranges[0].partition, 0);
    }
}
