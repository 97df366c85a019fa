//! Hooks through which the core reports what happens to fires and to the store, so that the
//! telemetry layer can trace and count it. The core knows nothing of OpenTelemetry; it calls
//! these with its lock released, and a hook must not block.

use std::fmt::Debug;
use std::time::Duration;

use crate::domain::{FireRecord, Job, Outcome, Timestamp, TraceContext};

/// Why a fire went back for redelivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedeliveryReason {
    /// The worker nacked it.
    Nack,
    /// Its ack deadline passed (the stream that held it may have gone away before).
    Expired,
}

impl RedeliveryReason {
    pub fn as_str(self) -> &'static str {
        match self {
            RedeliveryReason::Nack => "nack",
            RedeliveryReason::Expired => "expired",
        }
    }
}

/// Why a fire was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// Its last attempt failed and its job has no dead-letter queue.
    AttemptsExhausted,
    /// Its job was deleted (DeleteJob) before it was acked.
    JobDeleted,
    /// Withdrawn un-acked when a later occurrence of its job was released (overlap policy
    /// REPLACE).
    Replaced,
}

impl DropReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::AttemptsExhausted => "attempts_exhausted",
            DropReason::JobDeleted => "job_deleted",
            DropReason::Replaced => "replaced",
        }
    }
}

pub use crate::domain::SkipReason;

/// Logs the cron slots a job's DST policy skipped (at INFO: the job asked for it) and gives
/// the counts to report, by reason.
pub(crate) fn dst_skipped(
    job_id: &str,
    queue: &str,
    (gap, repeat): (u64, u64),
) -> impl Iterator<Item = (SkipReason, u64)> {
    [
        (SkipReason::DstGap, gap, "a local time that does not exist"),
        (SkipReason::DstRepeat, repeat, "a repeated local time"),
    ]
    .into_iter()
    .filter(|(_, n, _)| *n > 0)
    .map(move |(reason, n, what)| {
        tracing::info!(
            job_id,
            queue,
            skipped = n,
            "{n} occurrence(s) at {what} skipped by the job's DST policy"
        );
        (reason, n)
    })
}

/// Receives the core's events. Every method has a no-op default.
pub trait Observer: Send + Sync + Debug + 'static {
    /// A fire is being released for `job` (before it is stored). Returns the trace context to
    /// store with the fire and send with every delivery of it.
    fn fire_released(&self, _fire: &FireRecord, _job: &Job) -> Option<TraceContext> {
        None
    }

    /// `count` released fires of `queue` are stored (their commit succeeded). Told once per
    /// queue and commit, not per fire: a burst releases thousands in one commit.
    fn fires_stored(&self, _queue: &str, _count: u64) {}

    /// A fire was handed to a subscriber at `now`.
    fn fire_delivered(&self, _fire: &FireRecord, _now: Timestamp) {}

    /// A fire's ack is stored.
    fn fire_acked(&self, _fire: &FireRecord) {}

    /// A fire's redelivery is stored; `fire.attempt` is the attempt to come.
    fn fire_redelivered(&self, _fire: &FireRecord, _reason: RedeliveryReason) {}

    /// A fire moved to the dead-letter queue (`fire.queue`) from `from_queue`.
    fn fire_dead_lettered(&self, _fire: &FireRecord, _from_queue: &str) {}

    /// A fire was dropped: after its last attempt (no dead-letter queue), or with its job.
    fn fire_dropped(&self, _fire: &FireRecord, _reason: DropReason) {}

    /// `count` occurrences of a job on `queue` were passed over without a fire (stored).
    fn occurrences_skipped(&self, _queue: &str, _count: u64, _reason: SkipReason) {}

    /// Ledger records are stored: `count` occurrences of jobs on `queue` met `outcome`. Told
    /// once per queue, outcome and commit where the engine can (a burst acks thousands).
    fn occurrences_recorded(&self, _queue: &str, _outcome: Outcome, _count: u64) {}

    /// A store commit of `writes` writes finished (or failed) after `elapsed`.
    fn store_committed(&self, _writes: usize, _elapsed: Duration, _ok: bool) {}
}

/// Observes nothing.
#[derive(Debug, Default)]
pub struct NoopObserver;

impl Observer for NoopObserver {}
