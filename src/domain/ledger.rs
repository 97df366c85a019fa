//! The ledger: what became of each occurrence of a job that fell due. An occurrence is
//! recorded once its fate is sealed: delivered (acked), dead-lettered, dropped after its last
//! attempt, or skipped with the reason. A run of occurrences skipped for one reason at once
//! (a misfire window of 10,000) is one record with a count, so the ledger stays small.
//!
//! A job's records are kept newest first by occurrence, at most `cap` of them and none older
//! than the retention; this module decides which records go. Where records are held and
//! stored is the scheduler's and the store's business.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use super::time::{Micros, Timestamp};

/// Why occurrences were passed over without a fire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SkipReason {
    /// Missed while tickd was down (or too busy); the misfire policy passed them over.
    Misfire,
    /// Fell due while the job was paused; the misfire policy passed them over on resume.
    Paused,
    /// The job's previous fire was still running (overlap policy SKIP).
    Overlap,
    /// Their queue held `--max-queue-backlog` fires not yet acked.
    BacklogFull,
    /// A cron job's local time did not exist, and its DST policy skips such times.
    DstGap,
    /// A cron job's local time happened twice, and its DST policy fires only one of the two.
    DstRepeat,
    /// The job ended first: `max_fires` was reached within a catch-up, or the job was
    /// cancelled (or ended by an update) while they were owed.
    Ended,
}

impl SkipReason {
    pub fn as_str(self) -> &'static str {
        match self {
            SkipReason::Misfire => "misfire",
            SkipReason::Paused => "paused",
            SkipReason::Overlap => "overlap",
            SkipReason::BacklogFull => "backlog_full",
            SkipReason::DstGap => "dst_gap",
            SkipReason::DstRepeat => "dst_repeat",
            SkipReason::Ended => "ended",
        }
    }
}

/// A run of occurrences passed over for one reason: `count` of them, `first` to `last`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Skipped {
    pub first: Timestamp,
    pub last: Timestamp,
    pub count: u64,
    /// `count` stopped at its cap (a cron run is counted by walking it, 10,000 steps at
    /// most): the run holds at least that many; `first` and `last` are exact.
    pub at_least: bool,
    pub reason: SkipReason,
}

impl Skipped {
    /// Adds `at` to the last run of `runs` if it has the same reason, else starts a run.
    pub fn push(runs: &mut Vec<Skipped>, at: Timestamp, reason: SkipReason) {
        match runs.last_mut() {
            Some(run) if run.reason == reason => {
                run.last = at;
                run.count += 1;
            }
            _ => runs.push(Skipped {
                first: at,
                last: at,
                count: 1,
                at_least: false,
                reason,
            }),
        }
    }
}

/// What became of an occurrence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(into = "u8", try_from = "u8")]
pub enum Outcome {
    /// A worker acked its fire.
    Delivered,
    /// Its fire's last attempt failed and it went to the job's dead-letter queue.
    DeadLettered,
    /// Its fire's last attempt failed and the job has no dead-letter queue.
    Dropped,
    /// Its fire was withdrawn un-acked when a later occurrence was released (overlap policy
    /// REPLACE).
    Replaced,
    /// It was never released.
    Skipped(SkipReason),
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Delivered => "delivered",
            Outcome::DeadLettered => "dead_lettered",
            Outcome::Dropped => "dropped",
            Outcome::Replaced => "replaced",
            Outcome::Skipped(_) => "skipped",
        }
    }
}

const SKIPPED: u8 = 16;

impl From<Outcome> for u8 {
    fn from(o: Outcome) -> u8 {
        match o {
            Outcome::Delivered => 1,
            Outcome::DeadLettered => 2,
            Outcome::Dropped => 3,
            Outcome::Replaced => 4,
            Outcome::Skipped(r) => {
                SKIPPED
                    + match r {
                        SkipReason::Misfire => 0,
                        SkipReason::Paused => 1,
                        SkipReason::Overlap => 2,
                        SkipReason::BacklogFull => 3,
                        SkipReason::DstGap => 4,
                        SkipReason::DstRepeat => 5,
                        SkipReason::Ended => 6,
                    }
            }
        }
    }
}

impl TryFrom<u8> for Outcome {
    type Error = String;

    fn try_from(code: u8) -> Result<Outcome, String> {
        use SkipReason::*;
        Ok(match code {
            1 => Outcome::Delivered,
            2 => Outcome::DeadLettered,
            3 => Outcome::Dropped,
            4 => Outcome::Replaced,
            _ => Outcome::Skipped(match code.wrapping_sub(SKIPPED) {
                0 => Misfire,
                1 => Paused,
                2 => Overlap,
                3 => BacklogFull,
                4 => DstGap,
                5 => DstRepeat,
                6 => Ended,
                _ => return Err(format!("unknown occurrence outcome {code}")),
            }),
        })
    }
}

/// One ledger record: an occurrence, or a run of skipped ones, and what became of it.
/// Stored positionally (see `store::codec`): fields are only ever added at the end.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Occurrence {
    /// The occurrence (before jitter); the first of a run.
    pub scheduled: Timestamp,
    /// The last occurrence of a run; `scheduled` for one.
    pub last: Timestamp,
    /// Occurrences this record stands for (1 unless a skipped run).
    pub count: u64,
    /// Released by TriggerJob, not by the schedule.
    pub triggered: bool,
    pub outcome: Outcome,
    /// Delivery attempts made (0 for a skipped occurrence).
    pub attempts: u32,
    /// When its fate was sealed: the ack, the dead-lettering, the drop or the skip.
    pub time: Timestamp,
    /// `count` is a lower bound (see [`Skipped::at_least`]).
    #[serde(default)]
    pub count_at_least: bool,
}

/// Where a record sits in its job's ledger: by occurrence, then scheduled before triggered.
pub type OccurrenceKey = (Timestamp, bool);

impl Occurrence {
    /// A released occurrence's record.
    pub fn released(
        scheduled: Timestamp,
        triggered: bool,
        outcome: Outcome,
        attempts: u32,
        time: Timestamp,
    ) -> Occurrence {
        Occurrence {
            scheduled,
            last: scheduled,
            count: 1,
            triggered,
            outcome,
            attempts,
            time,
            count_at_least: false,
        }
    }

    /// The record of a run of skipped occurrences.
    pub fn skipped(run: Skipped, time: Timestamp) -> Occurrence {
        Occurrence {
            scheduled: run.first,
            last: run.last,
            count: run.count,
            triggered: false,
            outcome: Outcome::Skipped(run.reason),
            attempts: 0,
            time,
            count_at_least: run.at_least,
        }
    }

    pub fn key(&self) -> OccurrenceKey {
        (self.scheduled, self.triggered)
    }

    /// The record's key in a store: the job's id (which holds no space), the occurrence and
    /// whether it was triggered.
    pub fn store_key(&self, job_id: &str) -> String {
        store_key(job_id, self.key())
    }
}

/// See [`Occurrence::store_key`].
pub fn store_key(job_id: &str, (at, triggered): OccurrenceKey) -> String {
    format!("{job_id} {} {}", at.0, if triggered { 't' } else { 's' })
}

/// The job id a store key belongs to.
pub fn job_of_store_key(key: &str) -> Option<&str> {
    key.split_once(' ').map(|(job, _)| job)
}

/// How much of a ledger is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    /// Records per job; the oldest go first. 0 keeps none.
    pub per_job: usize,
    /// Records whose fate was sealed longer ago than this go.
    pub retention: Micros,
}

impl Default for Bounds {
    fn default() -> Bounds {
        Bounds {
            per_job: DEFAULT_PER_JOB,
            retention: DEFAULT_RETENTION,
        }
    }
}

/// Default for [`Bounds::per_job`].
pub const DEFAULT_PER_JOB: usize = 1_000;
/// Default for [`Bounds::retention`]: 7 days.
pub const DEFAULT_RETENTION: Micros = 7 * 24 * 3_600 * 1_000_000;

/// One job's ledger, oldest occurrence first. Records mostly arrive in occurrence order, so
/// an insert is a push at the back and the cap a pop at the front; the retention is looked at
/// only when the oldest seal in the ledger has passed it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobLedger {
    records: VecDeque<Occurrence>,
    /// The earliest `time` among the records (when one was sealed the longest ago).
    oldest: Option<Timestamp>,
}

impl JobLedger {
    /// A ledger of `records` (any order; of two with one key the later wins), trimmed to
    /// `bounds` at `now`; and the keys of the records left out.
    pub fn from_records(
        mut records: Vec<Occurrence>,
        bounds: Bounds,
        now: Timestamp,
    ) -> (JobLedger, Vec<OccurrenceKey>) {
        records.reverse();
        // Stable: of equal keys, the one given last (now first) stays.
        records.sort_by_key(Occurrence::key);
        records.dedup_by_key(|r| r.key());
        let mut l = JobLedger {
            oldest: records.iter().map(|r| r.time).min(),
            records: records.into(),
        };
        let gone = l.trim(bounds, now);
        (l, gone)
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn records(&self) -> impl DoubleEndedIterator<Item = &Occurrence> {
        self.records.iter()
    }

    /// The record under `key`, if kept.
    pub fn get(&self, key: OccurrenceKey) -> Option<&Occurrence> {
        let i = self
            .records
            .binary_search_by_key(&key, Occurrence::key)
            .ok()?;
        self.records.get(i)
    }

    /// Adds `record` (replacing one with the same key, which a store replay may bring) and
    /// returns the keys of the records that no longer fit `bounds` at `now`.
    pub fn insert(
        &mut self,
        record: Occurrence,
        bounds: Bounds,
        now: Timestamp,
    ) -> Vec<OccurrenceKey> {
        self.oldest = Some(self.oldest.map_or(record.time, |o| o.min(record.time)));
        let key = record.key();
        if self.records.back().is_none_or(|last| last.key() < key) {
            self.records.push_back(record);
        } else {
            match self.records.binary_search_by_key(&key, Occurrence::key) {
                Ok(i) => self.records[i] = record,
                Err(i) => self.records.insert(i, record),
            }
        }
        self.trim(bounds, now)
    }

    /// Removes the records that do not fit `bounds` at `now`; returns their keys.
    pub fn trim(&mut self, bounds: Bounds, now: Timestamp) -> Vec<OccurrenceKey> {
        let mut gone = Vec::new();
        while self.records.len() > bounds.per_job {
            if let Some(r) = self.records.pop_front() {
                gone.push(r.key());
            }
        }
        let horizon = now.minus(bounds.retention);
        if self.oldest.is_some_and(|o| o < horizon) {
            self.records.retain(|r| {
                let keep = r.time >= horizon;
                if !keep {
                    gone.push(r.key());
                }
                keep
            });
            self.oldest = self.records.iter().map(|r| r.time).min();
        }
        gone
    }

    /// Up to `n` records newest first, starting after `after` (a key a previous page ended
    /// with), leaving out those older than the retention at `now`; and whether more follow.
    pub fn page(
        &self,
        after: Option<OccurrenceKey>,
        n: usize,
        bounds: Bounds,
        now: Timestamp,
    ) -> (Vec<Occurrence>, bool) {
        let horizon = now.minus(bounds.retention);
        let end = match after {
            Some(key) => match self.records.binary_search_by_key(&key, Occurrence::key) {
                Ok(i) | Err(i) => i,
            },
            None => self.records.len(),
        };
        let mut shown = self
            .records
            .range(..end)
            .rev()
            .filter(|r| r.time >= horizon);
        let page: Vec<Occurrence> = shown.by_ref().take(n).cloned().collect();
        let more = shown.next().is_some();
        (page, more)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: i64 = 1_000_000;

    fn delivered(at: i64, time: i64) -> Occurrence {
        Occurrence::released(
            Timestamp(at * S),
            false,
            Outcome::Delivered,
            1,
            Timestamp(time * S),
        )
    }

    /// Every outcome survives its code; an unknown code is an error, not a panic.
    #[test]
    fn outcomes_round_trip_their_codes() {
        use SkipReason::*;
        let all = [
            Outcome::Delivered,
            Outcome::DeadLettered,
            Outcome::Dropped,
            Outcome::Replaced,
            Outcome::Skipped(Misfire),
            Outcome::Skipped(Paused),
            Outcome::Skipped(Overlap),
            Outcome::Skipped(BacklogFull),
            Outcome::Skipped(DstGap),
            Outcome::Skipped(DstRepeat),
            Outcome::Skipped(Ended),
        ];
        for o in all {
            assert_eq!(Outcome::try_from(u8::from(o)), Ok(o));
        }
        for bad in [0, 5, 15, 23, 255] {
            assert!(Outcome::try_from(bad).is_err(), "{bad}");
        }
        let run = Skipped {
            first: Timestamp(1),
            last: Timestamp(9),
            count: 5,
            at_least: true,
            reason: DstGap,
        };
        let r = Occurrence::skipped(run, Timestamp(10));
        let bytes = rmp_serde::to_vec(&r).expect("encode");
        assert_eq!(
            rmp_serde::from_slice::<Occurrence>(&bytes).expect("decode"),
            r
        );
        assert_eq!(job_of_store_key(&r.store_key("job-1")), Some("job-1"));
    }

    /// Records keep occurrence order whatever order they come in; the cap removes the oldest
    /// occurrences and the retention the records sealed too long ago, and says which.
    #[test]
    fn insert_orders_and_trims() {
        let bounds = Bounds {
            per_job: 3,
            retention: 100 * S,
        };
        let mut l = JobLedger::default();
        assert!(
            l.insert(delivered(20, 21), bounds, Timestamp(30 * S))
                .is_empty()
        );
        assert!(
            l.insert(delivered(10, 25), bounds, Timestamp(30 * S))
                .is_empty()
        );
        assert!(
            l.insert(delivered(30, 31), bounds, Timestamp(31 * S))
                .is_empty()
        );
        let at: Vec<i64> = l.records().map(|r| r.scheduled.0 / S).collect();
        assert_eq!(at, [10, 20, 30]);
        // A fourth pushes the oldest occurrence out.
        let gone = l.insert(delivered(40, 41), bounds, Timestamp(41 * S));
        assert_eq!(gone, [(Timestamp(10 * S), false)]);
        // The same key again replaces, it does not add.
        assert!(
            l.insert(delivered(40, 42), bounds, Timestamp(42 * S))
                .is_empty()
        );
        assert_eq!(l.len(), 3);
        // 122 s: the record sealed at 21 s is past the retention.
        let gone = l.trim(bounds, Timestamp(122 * S));
        assert_eq!(gone, [(Timestamp(20 * S), false)]);
        assert_eq!(l.len(), 2);
    }

    /// A ledger built from records in any order, with a duplicate key, is the one inserted in
    /// order: sorted, the later duplicate kept, trimmed once.
    #[test]
    fn from_records_sorts_dedups_and_trims() {
        let bounds = Bounds {
            per_job: 2,
            retention: 100 * S,
        };
        let mut late = delivered(20, 25);
        late.attempts = 3;
        let (l, gone) = JobLedger::from_records(
            vec![
                delivered(30, 31),
                delivered(10, 11),
                delivered(20, 21),
                late.clone(),
            ],
            bounds,
            Timestamp(40 * S),
        );
        assert_eq!(gone, [(Timestamp(10 * S), false)]);
        let kept: Vec<&Occurrence> = l.records().collect();
        assert_eq!(kept, [&late, &delivered(30, 31)]);
    }

    /// Pages run newest first and continue after the key a page ended with; records past the
    /// retention are not shown even before they are trimmed.
    #[test]
    fn pages_run_newest_first() {
        let bounds = Bounds {
            per_job: 100,
            retention: 45 * S,
        };
        let mut l = JobLedger::default();
        for at in 1..=5 {
            l.insert(delivered(at * 10, at * 10 + 1), bounds, Timestamp(0));
        }
        let triggered = Occurrence::released(
            Timestamp(30 * S),
            true,
            Outcome::Delivered,
            1,
            Timestamp(35 * S),
        );
        l.insert(triggered, bounds, Timestamp(0));
        let now = Timestamp(60 * S);
        let (first, more) = l.page(None, 2, bounds, now);
        let keys: Vec<OccurrenceKey> = first.iter().map(Occurrence::key).collect();
        assert_eq!(
            keys,
            [(Timestamp(50 * S), false), (Timestamp(40 * S), false)]
        );
        assert!(more);
        let (second, more) = l.page(keys.last().copied(), 2, bounds, now);
        let keys: Vec<OccurrenceKey> = second.iter().map(Occurrence::key).collect();
        assert_eq!(
            keys,
            [(Timestamp(30 * S), true), (Timestamp(30 * S), false)]
        );
        assert!(more);
        // At 60 s the occurrence at 10 s (sealed at 11 s) is past the 45 s retention.
        let (rest, more) = l.page(keys.last().copied(), 10, bounds, now);
        let at: Vec<i64> = rest.iter().map(|r| r.scheduled.0 / S).collect();
        assert_eq!(at, [20]);
        assert!(!more);
    }
}
