//! Jobs and how they advance past their occurrences.
//!
//! [`JobSpec`] is what a client scheduled and never changes; [`JobStatus`] is the part tickd
//! updates as the job fires, pauses or completes. [`advance`] is the one place that decides which
//! occurrences fire when a job falls due: the grace period, the misfire policy, `max_fires` and
//! `end_time` all live there. Pure arithmetic: no clock, no I/O.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::ledger::{SkipReason, Skipped};
use super::overlap::{self, OverlapPolicy, Running};
use super::packed::PackedSpec;
use super::time::{Micros, Timestamp};
use super::trace::TraceContext;
use super::trigger::{MAX_COUNTED_OCCURRENCES, Recurrence, TriggerError, TriggerSpec};

/// A job's id. Cheap to clone; shared between the job map, the timer index and fires.
pub type JobId = Arc<str>;

/// What happens to occurrences missed by more than the grace period.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MisfirePolicy {
    /// One catch-up fire for the latest missed occurrence.
    FireOnce,
    /// Nothing for missed occurrences.
    Skip,
    /// One fire per missed occurrence, oldest first, up to a cap.
    FireAll,
}

/// A job's lifecycle state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum JobState {
    Scheduled,
    Paused,
    Completed,
    Cancelled,
}

impl JobState {
    /// COMPLETED or CANCELLED: the job will not fire again.
    pub fn is_final(self) -> bool {
        matches!(self, JobState::Completed | JobState::Cancelled)
    }

    /// Lower-case name, for logs and metric attributes.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Scheduled => "scheduled",
            JobState::Paused => "paused",
            JobState::Completed => "completed",
            JobState::Cancelled => "cancelled",
        }
    }
}

/// What the client scheduled, with defaults filled in. Immutable once stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobSpec {
    pub id: JobId,
    pub queue: String,
    pub trigger: TriggerSpec,
    pub payload: Bytes,
    pub labels: BTreeMap<String, String>,
    /// 0 = unbounded.
    pub max_fires: u64,
    /// Exclusive.
    pub end_time: Option<Timestamp>,
    pub misfire_policy: MisfirePolicy,
    pub misfire_grace: Micros,
    pub ack_deadline: Micros,
    pub max_attempts: u32,
    pub dead_letter_queue: Option<String>,
    /// What an occurrence due while a fire of the job runs does. Not written when ALLOW, so a
    /// spec stored before overlap policies reads and encodes (and so its etag) as it did.
    #[serde(default, skip_serializing_if = "OverlapPolicy::is_allow")]
    pub overlap_policy: OverlapPolicy,
}

/// The part of a job that changes as it runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobStatus {
    pub state: JobState,
    /// The next occurrence to fire (before jitter); `None` once the job will not fire again.
    pub next_occurrence: Option<Timestamp>,
    pub fire_count: u64,
    pub create_time: Timestamp,
    pub last_fire_time: Option<Timestamp>,
    /// When the job became COMPLETED or CANCELLED; retention counts from here. Missing in
    /// records written before tickd kept it: such a job counts from when it is loaded.
    #[serde(default)]
    pub finish_time: Option<Timestamp>,
    /// The span of the Schedule call that created the job; its fires link to it. Boxed: most
    /// jobs of a large fleet carry none, and a million empty slots would cost 48 MB.
    #[serde(default)]
    pub trace: Option<Box<TraceContext>>,
}

/// A job as the scheduler holds it: its spec, its resolved trigger and its status.
#[derive(Debug, Clone)]
pub struct Job {
    /// Packed: one allocation a job, shared with its fires and the scheduler's indexes. Its
    /// trigger resolves to the job's recurrence ([`Job::recurrence`]); the recurrence is not
    /// kept beside it, which saved 24 bytes a job.
    pub spec: PackedSpec,
    pub status: JobStatus,
}

impl Job {
    /// A new job created at `now`: state SCHEDULED with its first occurrence, or COMPLETED at
    /// once when it has none (an end_time before the first occurrence).
    pub fn create(spec: JobSpec, now: Timestamp) -> Result<Job, TriggerError> {
        let spec = PackedSpec::new(&spec);
        let recurrence = spec.recurrence(now)?;
        let first = recurrence
            .first(now)
            .filter(|o| spec.end_time().is_none_or(|end| *o < end));
        let status = JobStatus {
            state: if first.is_some() {
                JobState::Scheduled
            } else {
                JobState::Completed
            },
            next_occurrence: first,
            fire_count: 0,
            create_time: now,
            last_fire_time: None,
            finish_time: None,
            trace: None,
        };
        Ok(Job { spec, status })
    }

    /// A job rebuilt from its stored spec and status.
    pub fn restore(spec: PackedSpec, status: JobStatus) -> Result<Job, TriggerError> {
        spec.recurrence(status.create_time)?;
        Ok(Job { spec, status })
    }

    /// The trigger resolved against the job's creation time. `None` only for a trigger that
    /// does not resolve, which [`Job::create`] and [`Job::restore`] refuse.
    pub fn recurrence(&self) -> Option<Recurrence> {
        self.spec.recurrence(self.status.create_time).ok()
    }

    /// When occurrence `o` is released: `o` plus its jitter.
    pub fn due(&self, occurrence: Timestamp) -> Timestamp {
        occurrence.plus(jitter_for(self.spec.id(), occurrence, self.spec.jitter()))
    }

    /// When the next occurrence is released, if the job is waiting for one: its due time, or
    /// the job's creation if that is later (an `at` in the past is released at once).
    pub fn next_due(&self) -> Option<Timestamp> {
        match self.status.state {
            JobState::Scheduled => self
                .status
                .next_occurrence
                .map(|o| self.due(o).max(self.status.create_time)),
            _ => None,
        }
    }
}

/// Namespace of the job ids derived from Schedule request ids (a random UUID, fixed forever:
/// changing it would give a retried request a new job).
const REQUEST_ID_NAMESPACE: uuid::Uuid = uuid::uuid!("6f1c2d3e-8a4b-4c5d-9e6f-7a8b9c0d1e2f");

/// The id of the job a Schedule without an id but with `request_id` creates: the same for
/// every retry of the request, on every replica.
pub fn job_id_for_request(request_id: &str) -> String {
    uuid::Uuid::new_v5(&REQUEST_ID_NAMESPACE, request_id.as_bytes()).to_string()
}

/// The stable id of one occurrence of one job: `<job id>@<RFC 3339 scheduled time>`.
pub fn fire_id(job_id: &str, scheduled: Timestamp) -> super::FireId {
    scheduled.shared_with_prefix(job_id, '@')
}

/// Whether a fire id is one TriggerJob released (see [`triggered_fire_id`]).
pub fn is_triggered(fire_id: &str) -> bool {
    fire_id.ends_with("#trigger")
}

/// The fire id of the extra occurrence TriggerJob releases at `at`: a scheduled occurrence's
/// id with `#trigger` after it, so that it is never one the schedule releases.
pub fn triggered_fire_id(job_id: &str, at: Timestamp) -> super::FireId {
    format!("{}#trigger", fire_id(job_id, at)).into()
}

/// The jitter of one occurrence, in `[0, max)`: derived from the job id and the occurrence so
/// that it is the same after a restart and on every replica.
pub fn jitter_for(job_id: &str, occurrence: Timestamp, max: Micros) -> Micros {
    if max <= 0 {
        return 0;
    }
    // FNV-1a over the id and the instant, then a splitmix64 finish to spread the low bits.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in job_id.bytes().chain(occurrence.0.to_le_bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^= h >> 31;
    // `max` is positive, so the remainder fits back into an i64.
    (h % max as u64) as Micros
}

/// A lifecycle change asked for by a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    Cancel,
    Pause,
    Resume,
}

/// A lifecycle change that does not apply to the job's state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("job {id} is {}; only scheduled or paused jobs can be paused or resumed", .state.as_str())]
pub struct TransitionRefused {
    pub id: String,
    pub state: JobState,
}

impl Job {
    /// Applies `transition`: true when the job changed. Cancelling a cancelled or completed
    /// job, pausing a paused one or resuming a scheduled one changes nothing; pausing or
    /// resuming a finished job is refused.
    pub fn apply(&mut self, transition: Transition) -> Result<bool, TransitionRefused> {
        use JobState::*;
        let from = self.status.state;
        let to = match (transition, from) {
            (Transition::Cancel, Scheduled | Paused) => Cancelled,
            (Transition::Cancel, Cancelled | Completed) => from,
            (Transition::Pause, Scheduled | Paused) => Paused,
            (Transition::Resume, Scheduled | Paused) => Scheduled,
            (Transition::Pause | Transition::Resume, Completed | Cancelled) => {
                return Err(TransitionRefused {
                    id: self.spec.id().to_string(),
                    state: from,
                });
            }
        };
        if to == from {
            return Ok(false);
        }
        self.status.state = to;
        if to == Cancelled {
            self.status.next_occurrence = None;
        }
        Ok(true)
    }
}

/// Why a job cannot be updated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UpdateRefused {
    #[error("job {id} is {}; only scheduled or paused jobs can be updated", .state.as_str())]
    Finished { id: String, state: JobState },
    #[error("{0}")]
    Trigger(#[from] TriggerError),
}

impl Job {
    /// The job with `spec` in place of its own (same id and queue), its next occurrence
    /// recomputed when the trigger changed. A new trigger counts from the update, as a new
    /// job's counts from its creation: `after` becomes the `at` it resolves to, an `every`
    /// without `start_time` starts one period after `now`, and an `at` already past becomes
    /// `now` (it fires at once, as on Schedule; left in the past it would count as missed
    /// since the job's creation). No occurrence fires twice and none owed is lost at the
    /// switch: an occurrence whose time has come under the old trigger (the timer may be
    /// releasing it) stays the next one; otherwise the next is the new trigger's first after
    /// `now`. Released fires are not touched. A new `end_time` or `max_fires` the job has
    /// reached completes it.
    pub fn updated(&self, spec: &JobSpec, now: Timestamp) -> Result<Job, UpdateRefused> {
        if self.status.state.is_final() {
            return Err(UpdateRefused::Finished {
                id: self.spec.id().to_string(),
                state: self.status.state,
            });
        }
        let changed = spec.trigger != self.spec.trigger();
        let packed = if changed {
            let mut anchored = spec.clone();
            anchored.trigger = anchor(&spec.trigger, now);
            PackedSpec::new(&anchored)
        } else {
            PackedSpec::new(spec)
        };
        let rec = packed.recurrence(self.status.create_time)?;
        let mut status = self.status.clone();
        if changed {
            status.next_occurrence = match (status.state, status.next_occurrence) {
                (JobState::Scheduled, Some(o)) if o <= now => Some(o),
                _ => match rec {
                    Recurrence::Once(at) => Some(at),
                    _ => rec.next_after(now),
                },
            };
        }
        let ended = match status.next_occurrence {
            None => true,
            Some(o) => {
                packed.end_time().is_some_and(|end| o >= end)
                    || (packed.max_fires() > 0 && status.fire_count >= packed.max_fires())
            }
        };
        if ended {
            status.state = JobState::Completed;
            status.next_occurrence = None;
            status.finish_time = Some(now);
        }
        Ok(Job {
            spec: packed,
            status,
        })
    }
}

impl Job {
    /// The occurrences this job owes at `now` (due, not released: from its next occurrence
    /// up to `now`), as a run skipped for the reason they would be if withdrawn now: PAUSED
    /// for a paused job, else ENDED. `None` when it owes none.
    pub fn owed(&self, now: Timestamp) -> Option<Skipped> {
        let first = self.status.next_occurrence.filter(|o| *o <= now)?;
        let rec = self.recurrence()?;
        // Not past the job's end: its end_time, and the fires max_fires leaves it.
        let mut until = now;
        if let Some(end) = self.spec.end_time() {
            if first >= end {
                return None;
            }
            until = until.min(end.minus(1));
        }
        let mut last = rec
            .latest_at_or_before(until)
            .map_or(first, |l| l.max(first));
        let (mut count, mut at_least) = rec.count_between(first, last, MAX_COUNTED_OCCURRENCES);
        count = count.max(1);
        let max = self.spec.max_fires();
        if max > 0 {
            let left = max.saturating_sub(self.status.fire_count);
            if left == 0 {
                return None;
            }
            if left <= count {
                let mut o = first;
                for _ in 1..left {
                    match rec.next_after(o) {
                        Some(n) if n <= last => o = n,
                        _ => break,
                    }
                }
                last = o;
                count = left;
                at_least = false;
            }
        }
        Some(Skipped {
            first,
            last,
            count,
            at_least,
            reason: match self.status.state {
                JobState::Paused => SkipReason::Paused,
                _ => SkipReason::Ended,
            },
        })
    }
}

impl Job {
    /// What `updated` (this job after an update at `now`) withdraws of the occurrences this
    /// job owed: all of them when the update ended the job or moved a paused job to a new
    /// trigger; none when the trigger stayed, or when the first owed is kept (a scheduled job
    /// whose trigger changed: the first is still released, and the new trigger's occurrences
    /// after it are released or passed over, and recorded, as any others).
    pub fn withdrawn_by(&self, updated: &Job, now: Timestamp) -> Option<Skipped> {
        let run = self.owed(now)?;
        if updated.status.state.is_final() {
            return Some(run);
        }
        if updated.spec.trigger() == self.spec.trigger() {
            return None;
        }
        (updated.status.next_occurrence != Some(run.first)).then_some(run)
    }
}

/// A trigger set by an update at `now`, with what it would resolve against the job's creation
/// resolved against `now` instead (see [`Job::updated`]).
fn anchor(trigger: &TriggerSpec, now: Timestamp) -> TriggerSpec {
    match trigger {
        TriggerSpec::At { at } => TriggerSpec::At { at: (*at).max(now) },
        TriggerSpec::After { after } => TriggerSpec::At {
            at: now.plus(*after),
        },
        TriggerSpec::Every {
            period,
            start_time: None,
            jitter,
        } => TriggerSpec::Every {
            period: *period,
            start_time: Some(now.plus(*period)),
            jitter: *jitter,
        },
        other => other.clone(),
    }
}

/// The etag of a job's spec (AIP-154): the same for the same spec on every replica and
/// build, different (but for a 2^-32 chance) after any change to it.
pub fn etag(spec: &PackedSpec) -> String {
    match rmp_serde::to_vec(spec) {
        Ok(bytes) => format!("{:08x}{:08x}", crc32fast::hash(&bytes), bytes.len()),
        // A spec always encodes; were it not to, no etag could ever match, which is safe.
        Err(_) => String::new(),
    }
}

/// What [`advance`] decided for a job that fell due.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Advance {
    /// Occurrences to fire now, oldest first.
    pub fires: Vec<Timestamp>,
    /// Occurrences passed over without a fire (misfire policy or catch-up cap).
    pub skipped: u64,
    /// True when `skipped` stopped counting at [`MAX_COUNTED_OCCURRENCES`].
    pub skipped_at_least: bool,
    /// True when the first pending occurrence was late by more than the grace period.
    pub misfired: bool,
    /// Occurrences passed over because their queue had no room (see [`advance_with_room`]).
    pub skipped_no_room: u64,
    /// Cron slots the job's DST policy passed over on the way to its next occurrence: local
    /// times that did not exist, and instants of repeated local times.
    pub skipped_dst: (u64, u64),
    /// Every occurrence passed over, as runs by reason, oldest first (for the ledger). A
    /// misfire run's reason is [`SkipReason::Misfire`]; the caller knows if a pause caused it.
    pub passed_over: Vec<Skipped>,
    /// The rest of the overlap policy's decision (its `release` is left empty: they are
    /// `fires`): `hold` is an occurrence stored as a held fire, `unhold` and `replace` are for
    /// the job's fires already out.
    pub overlap: overlap::Plan,
    /// The job's status after these fires.
    pub status: JobStatus,
}

/// How many occurrences [`advance`] steps back, one at a time, past those whose jitter
/// releases them after the misfire cutoff.
const MAX_JITTER_STEPS_BACK: u32 = 16;

/// Decides which occurrences fire for a job whose next occurrence is due at `now`.
///
/// An occurrence late by no more than the grace period fires normally (lateness counts from its
/// due time, or from the job's creation if that is later: an `at` in the past is not "missed").
/// When the first pending occurrence is later than that, every occurrence up to `now - grace`
/// is missed and the misfire policy decides: FIRE_ONCE fires the latest, SKIP fires none,
/// FIRE_ALL fires them oldest first up to `fire_all_cap`. Occurrences within the grace period
/// are left for the next call. `max_fires` and `end_time` end the job.
pub fn advance(job: &Job, now: Timestamp, fire_all_cap: usize) -> Advance {
    advance_with_room(job, now, fire_all_cap, usize::MAX, Running::default())
}

/// [`advance`] for a queue that can take at most `room` more fires, of a job whose fires are
/// `running` as given: its overlap policy ([`overlap::decide`]) releases, holds or skips the
/// occurrences due (a held one is stored as a fire, and counts as one), and occurrences beyond
/// `room` are passed over (counted in `skipped_no_room`). Neither counts in the job's fire
/// count; the job moves on to its next occurrence as usual.
pub fn advance_with_room(
    job: &Job,
    now: Timestamp,
    fire_all_cap: usize,
    room: usize,
    running: Running,
) -> Advance {
    let spec = &job.spec;
    let mut status = job.status.clone();
    let unchanged = |status: JobStatus| Advance {
        fires: Vec::new(),
        skipped: 0,
        skipped_at_least: false,
        misfired: false,
        skipped_no_room: 0,
        skipped_dst: (0, 0),
        passed_over: Vec::new(),
        overlap: overlap::Plan::default(),
        status,
    };
    let Some(first) = status.next_occurrence else {
        return unchanged(status);
    };
    if status.state != JobState::Scheduled {
        return unchanged(status);
    }
    let Some(due) = job.next_due() else {
        return unchanged(status);
    };
    if due > now {
        return unchanged(status);
    }

    let Some(rec) = job.recurrence() else {
        return unchanged(status);
    };
    let rec = &rec;
    let end_time = spec.end_time();
    let in_range = |o: Timestamp| end_time.is_none_or(|end| o < end);
    let mut fires = Vec::new();
    let mut skipped = 0;
    let mut skipped_at_least = false;
    let mut passed_over = Vec::new();
    let mut missed = |first: Timestamp, last: Option<Timestamp>, count: u64, at_least: bool| {
        if let Some(last) = last.filter(|_| count > 0) {
            passed_over.push(Skipped {
                first,
                last,
                count,
                at_least,
                reason: SkipReason::Misfire,
            });
        }
    };
    let misfired = now.since(due) > spec.misfire_grace();
    let last_handled = if !misfired {
        fires.push(first);
        first
    } else {
        let mut cutoff = now.minus(spec.misfire_grace());
        if let Some(end) = end_time {
            cutoff = cutoff.min(end.minus(1));
        }
        let mut latest = rec
            .latest_at_or_before(cutoff)
            .map_or(first, |l| l.max(first));
        // Jitter can push an occurrence's release past the cutoff: such an occurrence is not
        // missed yet, so step back to one that is (`first` is due, or we would not be here).
        // Validation keeps the jitter within a period, so this takes a step or two; a stored
        // spec whose jitter spans many periods jumps instead to the latest occurrence a whole
        // jitter before the cutoff, which is missed whatever its jitter.
        let mut steps = 0;
        while latest > first && job.due(latest) > cutoff {
            let before = if steps < MAX_JITTER_STEPS_BACK {
                latest.minus(1)
            } else {
                cutoff.minus(spec.jitter())
            };
            steps += 1;
            latest = rec
                .latest_at_or_before(before)
                .map_or(first, |l| l.max(first));
        }
        match spec.misfire_policy() {
            MisfirePolicy::FireOnce => {
                fires.push(latest);
                let (n, capped) = rec.count_between(first, latest, MAX_COUNTED_OCCURRENCES);
                skipped = n.saturating_sub(1);
                skipped_at_least = capped;
                missed(
                    first,
                    rec.latest_at_or_before(latest.minus(1)),
                    skipped,
                    capped,
                );
            }
            MisfirePolicy::Skip => {
                let (n, capped) = rec.count_between(first, latest, MAX_COUNTED_OCCURRENCES);
                // `first` is known to be pending even if a cron walk could not re-find it.
                skipped = n.max(1);
                skipped_at_least = capped;
                missed(first, Some(latest), skipped, capped);
            }
            MisfirePolicy::FireAll => {
                let mut cursor = Some(first);
                while let Some(o) = cursor.filter(|o| *o <= latest) {
                    if fires.len() == fire_all_cap.max(1) {
                        let (n, capped) = rec.count_between(o, latest, MAX_COUNTED_OCCURRENCES);
                        skipped = n;
                        skipped_at_least = capped;
                        missed(o, Some(latest), skipped, capped);
                        break;
                    }
                    fires.push(o);
                    cursor = rec.next_after(o);
                }
            }
        }
        latest
    };

    // Fires cut off, oldest first, go in the ledger as one run (they are consecutive).
    fn cut(
        passed_over: &mut Vec<Skipped>,
        fires: &mut Vec<Timestamp>,
        keep: usize,
        reason: SkipReason,
    ) {
        if fires.len() > keep {
            passed_over.push(Skipped {
                first: fires[keep],
                last: fires[fires.len() - 1],
                count: (fires.len() - keep) as u64,
                at_least: false,
                reason,
            });
            fires.truncate(keep);
        }
    }
    let max_fires = spec.max_fires();
    if max_fires > 0 {
        let remaining = max_fires.saturating_sub(status.fire_count);
        cut(
            &mut passed_over,
            &mut fires,
            usize::try_from(remaining).unwrap_or(usize::MAX),
            SkipReason::Ended,
        );
    }
    // The overlap policy picks what is released and what held; the queue's room then cuts
    // what is stored (released first, then held), from the back.
    let mut overlap = overlap::decide(spec.overlap_policy(), running, &fires);
    passed_over.extend(overlap.skipped.take());
    let released = overlap.release.len();
    let mut stored = std::mem::take(&mut overlap.release);
    stored.extend(overlap.hold);
    let skipped_no_room = stored.len().saturating_sub(room) as u64;
    cut(&mut passed_over, &mut stored, room, SkipReason::BacklogFull);
    overlap.hold = stored.get(released).copied();
    stored.truncate(released);
    // Nothing released replaces nothing.
    overlap.replace &= !stored.is_empty();
    let fires = stored;
    status.fire_count += (fires.len() + usize::from(overlap.hold.is_some())) as u64;
    if !fires.is_empty() || overlap.hold.is_some() {
        status.last_fire_time = Some(now);
    }
    let (next, dst_runs) = rec.next_after_with_dst_skips(last_handled, end_time);
    let next = next.filter(|o| in_range(*o));
    let skipped_dst = dst_runs
        .iter()
        .fold((0, 0), |(gap, repeat), run| match run.reason {
            SkipReason::DstGap => (gap + run.count, repeat),
            _ => (gap, repeat + run.count),
        });
    passed_over.extend(dst_runs);
    let exhausted = max_fires > 0 && status.fire_count >= max_fires;
    if exhausted || next.is_none() {
        status.state = JobState::Completed;
        status.next_occurrence = None;
    } else {
        status.next_occurrence = next;
    }
    Advance {
        fires,
        skipped,
        skipped_at_least,
        misfired,
        skipped_no_room,
        skipped_dst,
        passed_over,
        overlap,
        status,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Micros = 1_000_000;

    fn spec(trigger: TriggerSpec) -> JobSpec {
        JobSpec {
            id: "job".into(),
            queue: "q".into(),
            trigger,
            payload: Bytes::new(),
            labels: BTreeMap::new(),
            max_fires: 0,
            end_time: None,
            misfire_policy: MisfirePolicy::FireOnce,
            misfire_grace: 5 * S,
            ack_deadline: 30 * S,
            max_attempts: 10,
            dead_letter_queue: None,
            overlap_policy: Default::default(),
        }
    }

    fn every(period: Micros) -> TriggerSpec {
        TriggerSpec::Every {
            period,
            start_time: Some(Timestamp(0)),
            jitter: 0,
        }
    }

    /// Runs `advance` repeatedly like the timer loop does, until nothing more is due at `now`.
    fn run_until(job: &mut Job, now: Timestamp) -> (Vec<Timestamp>, u64) {
        let mut fired = Vec::new();
        let mut skipped = 0;
        for _ in 0..1_000 {
            if job
                .next_due()
                .is_none_or(|d| d.max(job.status.create_time) > now)
            {
                break;
            }
            let a = advance(job, now, 100);
            fired.extend(a.fires);
            skipped += a.skipped;
            job.status = a.status;
        }
        (fired, skipped)
    }

    /// An on-time occurrence fires and the job moves to the next one.
    #[test]
    fn on_time_occurrence_fires_and_advances() {
        let mut job = Job::create(spec(every(10 * S)), Timestamp(0)).expect("valid");
        assert_eq!(job.status.next_occurrence, Some(Timestamp(0)));
        let a = advance(&job, Timestamp(S), 100);
        assert_eq!(a.fires, vec![Timestamp(0)]);
        assert!(!a.misfired);
        assert_eq!(a.status.next_occurrence, Some(Timestamp(10 * S)));
        assert_eq!(a.status.fire_count, 1);
        assert_eq!(a.status.last_fire_time, Some(Timestamp(S)));
        job.status = a.status;
        let a = advance(&job, Timestamp(5 * S), 100);
        assert!(a.fires.is_empty(), "not due yet");
    }

    /// FIRE_ONCE after a long outage sends one fire for the latest missed occurrence and
    /// continues on schedule; those within the grace period fire normally afterwards.
    #[test]
    fn fire_once_catches_up_with_one_fire() {
        let mut job = Job::create(spec(every(10 * S)), Timestamp(0)).expect("valid");
        let now = Timestamp(100 * S + 2 * S);
        let a = advance(&job, now, 100);
        assert!(a.misfired);
        // cutoff = 97 s: latest missed is 90 s; 100 s is within grace and fires next.
        assert_eq!(a.fires, vec![Timestamp(90 * S)]);
        assert_eq!(a.skipped, 9);
        assert_eq!(a.status.next_occurrence, Some(Timestamp(100 * S)));
        job.status = a.status;
        let (fired, _) = run_until(&mut job, now);
        assert_eq!(fired, vec![Timestamp(100 * S)]);
        assert_eq!(job.status.next_occurrence, Some(Timestamp(110 * S)));
    }

    /// SKIP sends nothing for missed occurrences and counts them.
    #[test]
    fn skip_sends_nothing_for_missed() {
        let mut s = spec(every(10 * S));
        s.misfire_policy = MisfirePolicy::Skip;
        let mut job = Job::create(s, Timestamp(0)).expect("valid");
        let (fired, skipped) = run_until(&mut job, Timestamp(95 * S));
        // cutoff 90 s: 0..=90 missed (10), nothing within grace.
        assert_eq!(fired, Vec::<Timestamp>::new());
        assert_eq!(skipped, 10);
        assert_eq!(job.status.next_occurrence, Some(Timestamp(100 * S)));
    }

    /// FIRE_ALL sends every missed occurrence oldest first, up to the cap, and skips the rest.
    #[test]
    fn fire_all_is_capped() {
        let mut s = spec(every(S));
        s.misfire_policy = MisfirePolicy::FireAll;
        s.misfire_grace = 0;
        let job = Job::create(s, Timestamp(0)).expect("valid");
        let a = advance(&job, Timestamp(9 * S), 4);
        assert_eq!(
            a.fires,
            vec![
                Timestamp(0),
                Timestamp(S),
                Timestamp(2 * S),
                Timestamp(3 * S)
            ]
        );
        assert_eq!(a.skipped, 6, "4..=9 s skipped");
        assert_eq!(a.status.next_occurrence, Some(Timestamp(10 * S)));
    }

    /// max_fires completes the job, even in the middle of a FIRE_ALL catch-up.
    #[test]
    fn max_fires_completes() {
        let mut s = spec(every(S));
        s.misfire_policy = MisfirePolicy::FireAll;
        s.misfire_grace = 0;
        s.max_fires = 3;
        let job = Job::create(s, Timestamp(0)).expect("valid");
        let a = advance(&job, Timestamp(9 * S), 100);
        assert_eq!(a.fires.len(), 3);
        assert_eq!(a.status.state, JobState::Completed);
        assert_eq!(a.status.next_occurrence, None);
    }

    /// end_time is exclusive and completes the job as soon as no occurrence is left before it.
    #[test]
    fn end_time_is_exclusive() {
        let mut s = spec(every(10 * S));
        s.end_time = Some(Timestamp(20 * S));
        let mut job = Job::create(s, Timestamp(0)).expect("valid");
        let (fired, _) = run_until(&mut job, Timestamp(10 * S));
        assert_eq!(fired, vec![Timestamp(0), Timestamp(10 * S)]);
        assert_eq!(
            job.status.state,
            JobState::Completed,
            "20 s is not before end_time"
        );
    }

    /// A job whose end_time comes before its first occurrence is complete at once.
    #[test]
    fn end_time_before_first_occurrence_completes_at_creation() {
        let mut s = spec(TriggerSpec::At {
            at: Timestamp(50 * S),
        });
        s.end_time = Some(Timestamp(10 * S));
        let job = Job::create(s, Timestamp(0)).expect("valid");
        assert_eq!(job.status.state, JobState::Completed);
        assert_eq!(job.next_due(), None);
    }

    /// An `at` in the past fires at once, even with SKIP: lateness counts from creation.
    #[test]
    fn past_at_fires_at_once() {
        let mut s = spec(TriggerSpec::At { at: Timestamp(0) });
        s.misfire_policy = MisfirePolicy::Skip;
        let job = Job::create(s, Timestamp(3_600 * S)).expect("valid");
        let a = advance(&job, Timestamp(3_600 * S + 1), 100);
        assert_eq!(a.fires, vec![Timestamp(0)]);
        assert_eq!(a.status.state, JobState::Completed);
    }

    /// Paused and completed jobs never fire.
    #[test]
    fn paused_job_does_not_fire() {
        let mut job = Job::create(spec(every(S)), Timestamp(0)).expect("valid");
        job.status.state = JobState::Paused;
        assert!(advance(&job, Timestamp(10 * S), 100).fires.is_empty());
        assert_eq!(job.next_due(), None);
    }

    /// Jitter stays within [0, max), is stable, and differs between occurrences.
    /// A new trigger: an occurrence already due under the old one is kept (the timer may be
    /// releasing it); otherwise the new trigger's first after now; a paused job's pending
    /// occurrence is recomputed; a one-shot moves even into the past (it fires at once).
    #[test]
    fn an_update_recomputes_the_next_occurrence() {
        let from_ten = TriggerSpec::Every {
            period: 10 * S,
            start_time: Some(Timestamp(10 * S)),
            jitter: 0,
        };
        let mut s = spec(from_ten.clone());
        let job = Job::create(s.clone(), Timestamp(0)).expect("valid");
        assert_eq!(job.status.next_occurrence, Some(Timestamp(10 * S)));
        s.trigger = every(7 * S);
        // Not due yet at 5 s: the new trigger's first after now (7 s).
        let moved = job.updated(&s, Timestamp(5 * S)).expect("update");
        assert_eq!(moved.status.next_occurrence, Some(Timestamp(7 * S)));
        // Due at 10 s (not yet released): still released, the new trigger after it.
        let kept = job.updated(&s, Timestamp(10 * S)).expect("update");
        assert_eq!(kept.status.next_occurrence, Some(Timestamp(10 * S)));
        let mut paused = job.clone();
        paused.status.state = JobState::Paused;
        let recomputed = paused.updated(&s, Timestamp(12 * S)).expect("update");
        assert_eq!(recomputed.status.next_occurrence, Some(Timestamp(14 * S)));
        assert_eq!(recomputed.status.state, JobState::Paused);
        // A new trigger counts from the update: an `at` already past is now (it fires at
        // once), `after` resolves to the `at` it means, `every` starts a period after now.
        s.trigger = TriggerSpec::At { at: Timestamp(S) };
        let once = job.updated(&s, Timestamp(5 * S)).expect("update");
        assert_eq!(once.status.next_occurrence, Some(Timestamp(5 * S)));
        assert_eq!(once.next_due(), Some(Timestamp(5 * S)));
        assert_eq!(
            once.spec.trigger(),
            TriggerSpec::At {
                at: Timestamp(5 * S)
            }
        );
        s.trigger = TriggerSpec::After { after: 3 * S };
        let after = job.updated(&s, Timestamp(5 * S)).expect("update");
        assert_eq!(after.status.next_occurrence, Some(Timestamp(8 * S)));
        assert_eq!(
            after.spec.trigger(),
            TriggerSpec::At {
                at: Timestamp(8 * S)
            }
        );
        s.trigger = TriggerSpec::Every {
            period: 4 * S,
            start_time: None,
            jitter: 0,
        };
        let periodic = job.updated(&s, Timestamp(5 * S)).expect("update");
        assert_eq!(periodic.status.next_occurrence, Some(Timestamp(9 * S)));
        // An occurrence whose time has come is owed even while its jitter holds it back.
        let mut jittered = spec(TriggerSpec::Every {
            period: 10 * S,
            start_time: Some(Timestamp(10 * S)),
            jitter: 5 * S,
        });
        let held = Job::create(jittered.clone(), Timestamp(0)).expect("valid");
        let due = held.due(Timestamp(10 * S));
        assert!(due > Timestamp(10 * S), "this id's jitter is not zero");
        jittered.trigger = every(7 * S);
        let owed = held.updated(&jittered, Timestamp(10 * S)).expect("update");
        assert_eq!(owed.status.next_occurrence, Some(Timestamp(10 * S)));
        // The same trigger leaves the next occurrence alone; an end before it completes the job.
        let mut same = spec(from_ten);
        same.end_time = Some(Timestamp(10 * S));
        let ended = job.updated(&same, Timestamp(5 * S)).expect("update");
        assert_eq!(ended.status.state, JobState::Completed);
        assert_eq!(ended.status.next_occurrence, None);
        assert_eq!(ended.status.finish_time, Some(Timestamp(5 * S)));
        let mut done = job.clone();
        done.status.state = JobState::Cancelled;
        assert!(matches!(
            done.updated(&same, Timestamp(5 * S)),
            Err(UpdateRefused::Finished { .. })
        ));
    }

    /// What a job owes stops where the job would: at its end_time, and after the fires its
    /// max_fires leaves it; nothing when it owes none.
    #[test]
    fn owed_stops_where_the_job_would() {
        let mut s = spec(TriggerSpec::Every {
            period: 10 * S,
            start_time: Some(Timestamp(10 * S)),
            jitter: 0,
        });
        let job = Job::create(s.clone(), Timestamp(0)).expect("valid");
        assert_eq!(job.owed(Timestamp(5 * S)), None);
        let all = job.owed(Timestamp(1_000 * S)).expect("owed");
        assert_eq!(
            (all.first, all.last, all.count),
            (Timestamp(10 * S), Timestamp(1_000 * S), 100)
        );
        s.end_time = Some(Timestamp(35 * S));
        let ended = Job::create(s.clone(), Timestamp(0)).expect("valid");
        let run = ended.owed(Timestamp(1_000 * S)).expect("owed");
        assert_eq!((run.last, run.count), (Timestamp(30 * S), 3));
        s.end_time = None;
        s.max_fires = 2;
        let mut capped = Job::create(s, Timestamp(0)).expect("valid");
        capped.status.fire_count = 1;
        let run = capped.owed(Timestamp(1_000 * S)).expect("owed");
        assert_eq!(
            (run.first, run.last, run.count),
            (Timestamp(10 * S), Timestamp(10 * S), 1)
        );
        capped.status.fire_count = 2;
        assert_eq!(capped.owed(Timestamp(1_000 * S)), None);
    }

    /// A scheduled job late by several occurrences keeps the first when its trigger changes:
    /// nothing is withdrawn (the new trigger's occurrences after it are released or passed
    /// over, and recorded, as any others); paused, all it owed is withdrawn.
    #[test]
    fn an_update_withdraws_only_what_it_drops() {
        let old = TriggerSpec::Every {
            period: 10 * S,
            start_time: Some(Timestamp(10 * S)),
            jitter: 0,
        };
        let mut s = spec(old);
        let job = Job::create(s.clone(), Timestamp(0)).expect("valid");
        s.trigger = TriggerSpec::Every {
            period: 10 * S,
            start_time: Some(Timestamp(10 * S)),
            jitter: S,
        };
        let now = Timestamp(45 * S);
        let updated = job.updated(&s, now).expect("update");
        assert_eq!(updated.status.next_occurrence, Some(Timestamp(10 * S)));
        assert_eq!(job.withdrawn_by(&updated, now), None);
        let mut paused = job.clone();
        paused.status.state = JobState::Paused;
        let moved = paused.updated(&s, now).expect("update");
        let run = paused.withdrawn_by(&moved, now).expect("withdrawn");
        assert_eq!(
            (run.first, run.last, run.count),
            (Timestamp(10 * S), Timestamp(40 * S), 4)
        );
        assert_eq!(run.reason, SkipReason::Paused);
    }

    /// Stepping over a cron slot the DST policy skips says so: Berlin's 02:30 of 2026-03-29
    /// with gap SKIP, New York's second 01:30 of 2026-11-01 with repeat FIRST.
    #[test]
    fn advance_counts_the_slots_a_dst_policy_skips() {
        use crate::domain::dst::{DstGap, DstPolicy, DstRepeat};
        let at = |rfc: &str| {
            Timestamp(
                chrono::DateTime::parse_from_rfc3339(rfc)
                    .expect("time")
                    .timestamp_micros(),
            )
        };
        for (zone, expr, dst, created, due, next, skipped) in [
            (
                "Europe/Berlin",
                "30 2 * * *",
                DstPolicy {
                    gap: DstGap::Skip,
                    repeat: DstRepeat::Auto,
                },
                "2026-03-27T12:00:00Z",
                "2026-03-28T01:30:00Z",
                "2026-03-30T00:30:00Z",
                (1, 0),
            ),
            (
                "America/New_York",
                "30 1 * * *",
                DstPolicy {
                    gap: DstGap::Auto,
                    repeat: DstRepeat::First,
                },
                "2026-10-31T12:00:00Z",
                "2026-11-01T05:30:00Z",
                "2026-11-02T06:30:00Z",
                (0, 1),
            ),
        ] {
            let mut s = spec(TriggerSpec::Cron {
                expression: expr.into(),
                time_zone: zone.into(),
                dst,
            });
            s.misfire_grace = S;
            let job = Job::create(s, at(created)).expect("valid");
            assert_eq!(job.status.next_occurrence, Some(at(due)));
            let plan = advance(&job, at(due), 10);
            assert_eq!(plan.fires, [at(due)]);
            assert_eq!(plan.status.next_occurrence, Some(at(next)), "{zone}");
            assert_eq!(plan.skipped_dst, skipped, "{zone}");
        }
    }

    /// The etag follows the spec, not the status.
    #[test]
    fn etag_follows_the_spec() {
        let a = Job::create(spec(every(10 * S)), Timestamp(0)).expect("valid");
        let mut b = a.clone();
        b.status.fire_count = 9;
        assert_eq!(etag(&a.spec), etag(&b.spec));
        let mut other = spec(every(10 * S));
        other.payload = Bytes::from_static(b"other");
        assert_ne!(etag(&a.spec), etag(&PackedSpec::new(&other)));
        assert_eq!(etag(&a.spec).len(), 16);
    }

    #[test]
    fn request_ids_give_stable_distinct_job_ids() {
        let a = job_id_for_request("0b9c6c4e-1f55-4a57-9a59-3c2f3e1b2a10");
        assert_eq!(
            a,
            job_id_for_request("0b9c6c4e-1f55-4a57-9a59-3c2f3e1b2a10")
        );
        assert_ne!(
            a,
            job_id_for_request("0b9c6c4e-1f55-4a57-9a59-3c2f3e1b2a11")
        );
        // Pinned (Python's uuid.uuid5 gives the same): a retry after an upgrade must find
        // the job the first call created.
        assert_eq!(
            job_id_for_request("r1"),
            "f6e294c8-ef47-5581-8538-07c8b5ea1b1d"
        );
        assert_eq!(a.len(), 36);
        assert_eq!(&a[14..15], "5", "a UUIDv5");
    }

    #[test]
    fn jitter_is_bounded_and_stable() {
        let values: Vec<_> = (0..1_000)
            .map(|k| jitter_for("job", Timestamp(k * S), 250_000))
            .collect();
        assert!(values.iter().all(|j| (0..250_000).contains(j)));
        assert_eq!(values[7], jitter_for("job", Timestamp(7 * S), 250_000));
        let distinct: std::collections::HashSet<_> = values.iter().collect();
        assert!(distinct.len() > 900);
        assert_eq!(jitter_for("job", Timestamp(0), 0), 0);
    }

    /// Jitter is a pure function of the job id and the occurrence, fixed across processes,
    /// versions and replicas: these values must never change (a restart or an upgrade would
    /// otherwise move fires that are already armed).
    #[test]
    fn jitter_values_are_fixed() {
        assert_eq!(
            [
                jitter_for("job", Timestamp(7 * S), 250_000),
                jitter_for("job", Timestamp(8 * S), 250_000),
                jitter_for("report-42", Timestamp(1_780_272_000 * S), 60 * S),
            ],
            [19_896, 187_765, 18_787_564]
        );
    }

    /// A catch-up never fires an occurrence before its jittered due time.
    #[test]
    fn catch_up_respects_jitter() {
        let mut s = spec(TriggerSpec::Every {
            period: 10 * S,
            start_time: Some(Timestamp(10 * S)),
            jitter: 10 * S,
        });
        s.misfire_grace = 0;
        for id in ["a", "b", "c", "d", "e", "f", "g", "h"] {
            s.id = id.into();
            for policy in [MisfirePolicy::FireOnce, MisfirePolicy::FireAll] {
                s.misfire_policy = policy;
                let job = Job::create(s.clone(), Timestamp(0)).expect("valid");
                for now in [20 * S + S / 2, 25 * S, 29 * S, 45 * S] {
                    let a = advance(&job, Timestamp(now), 100);
                    for o in &a.fires {
                        assert!(
                            job.due(*o) <= Timestamp(now),
                            "{id} {policy:?}: {o:?} fired early at {now}"
                        );
                    }
                }
            }
        }
    }

    /// A stored spec whose jitter spans many periods (validation refuses one, a damaged
    /// record may hold one) catches up at once instead of stepping back one period at a time
    /// (found by fuzzing: a 259 µs period with 54,000 years of jitter never returned).
    #[test]
    fn catch_up_with_a_jitter_of_many_periods_ends() {
        let mut s = spec(TriggerSpec::Every {
            period: 259,
            start_time: Some(Timestamp(0)),
            jitter: 1_767_225_600_000_300_000,
        });
        s.misfire_grace = 0;
        for policy in [
            MisfirePolicy::FireOnce,
            MisfirePolicy::Skip,
            MisfirePolicy::FireAll,
        ] {
            s.misfire_policy = policy;
            let job = Job::create(s.clone(), Timestamp(1_767_225_600_000_000)).expect("valid");
            let due = job.next_due().expect("scheduled");
            let now = due.plus(86_400_082_000_000_000);
            let started = std::time::Instant::now();
            let a = advance(&job, now, 64);
            assert!(
                started.elapsed() < std::time::Duration::from_secs(1),
                "{policy:?}"
            );
            if let Some(last) = a.fires.last() {
                assert!(job.due(*last) <= now, "{policy:?}: {last:?} fired early");
            }
        }
    }

    /// The overlap policy cuts what is due before the queue's room does, and a held
    /// occurrence counts as a fire (it is stored): BUFFER_ONE with a fire running and room
    /// for none passes the one it would hold over as BACKLOG_FULL; with room, holds it and
    /// skips the rest as OVERLAP. Skipped occurrences are not in the fire count.
    #[test]
    fn overlap_comes_before_room() {
        let mut s = spec(every(S));
        s.misfire_policy = MisfirePolicy::FireAll;
        s.overlap_policy = OverlapPolicy::BufferOne;
        let job = Job::create(s, Timestamp(0)).expect("valid");
        let busy = Running {
            running: 1,
            held: false,
        };
        let a = advance_with_room(&job, Timestamp(10 * S), 100, 0, busy);
        assert!(a.fires.is_empty());
        assert_eq!(a.overlap.hold, None);
        assert_eq!(a.skipped_no_room, 1);
        let reasons: Vec<_> = a.passed_over.iter().map(|r| (r.reason, r.count)).collect();
        assert_eq!(
            reasons,
            vec![(SkipReason::Overlap, 5), (SkipReason::BacklogFull, 1)]
        );
        assert_eq!(a.status.fire_count, 0);

        let a = advance_with_room(&job, Timestamp(10 * S), 100, 1, busy);
        assert_eq!(a.overlap.hold, Some(Timestamp(0)));
        assert_eq!(a.status.fire_count, 1);
        assert_eq!(a.status.next_occurrence, Some(Timestamp(6 * S)));
    }

    /// Fire ids are made of the job id and the RFC 3339 scheduled time.
    #[test]
    fn fire_id_is_stable() {
        assert_eq!(&*fire_id("a", Timestamp(S)), "a@1970-01-01T00:00:01Z");
        assert_eq!(
            &*fire_id("ü", Timestamp(S + 1_500)),
            "ü@1970-01-01T00:00:01.001500Z"
        );
        // Ids too long to be joined on the stack, and instants outside the years RFC 3339
        // writes with four digits, read the same as every other.
        let long = "j".repeat(300);
        assert_eq!(
            &*fire_id(&long, Timestamp(S)),
            format!("{long}@1970-01-01T00:00:01Z")
        );
        let far = Timestamp(12_000 * 365 * 86_400 * S);
        assert_eq!(&*fire_id("a", far), format!("a@{far}"));
    }
}
