//! The writer: the one place where durable state changes.
//!
//! Every change (Schedule, Cancel, Pause, Resume, a job advancing past its occurrences, an ack, a
//! redelivery) is an [`Op`] sent to one thread. The thread drains whatever ops are waiting,
//! decides each against memory plus the changes already decided in this batch, commits all of
//! them in one store transaction (one fsync: group commit), then applies them to memory and
//! answers each caller. Because applying happens here and not in the caller, a caller that goes
//! away mid-call (a cancelled RPC) cannot leave a change half-applied: it is either committed
//! and applied, or not committed at all.
//!
//! A fire is born here: [`decide_advance`] writes the job's new status and the fire's record in
//! the same transaction, so a crash can never lose an occurrence.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};
use tracing::{debug, error, warn};

use super::embedded::Inner;
use super::observe::{DropReason, RedeliveryReason, SkipReason, dst_skipped};
use super::state::{FireStatus, State};
use super::{Backfilled, SchedulerError, Triggered};
use super::{FastMap, FastSet};
use crate::domain::fire::{AfterAttempt, after_attempt, expiry_backoff};
use crate::domain::job::{etag, is_triggered, triggered_fire_id};
use crate::domain::{
    Disposition, FireId, FireRecord, Job, JobId, JobKey, JobSpec, JobState, Micros, Occurrence,
    Outcome, PackedSpec, Running, Timestamp, advance_with_room, fire_id,
};
use crate::domain::{backfill, overlap};
use crate::store::Write;

/// How long a finished job past its retention waits before it is looked at again, while a fire
/// of it is outstanding.
const RETIRE_RECHECK_MICROS: Micros = 60_000_000;
/// Most ops decided and committed in one transaction.
const MAX_OPS_PER_BATCH: usize = 4_096;
/// Pause of the writer after a failed commit, before it takes the next batch; doubled after
/// each further failure, up to [`MAX_RETRY_AFTER_FAILED_COMMIT`].
const RETRY_AFTER_FAILED_COMMIT: std::time::Duration = std::time::Duration::from_millis(100);
const MAX_RETRY_AFTER_FAILED_COMMIT: std::time::Duration = std::time::Duration::from_secs(2);

pub(crate) type Reply<T> = oneshot::Sender<Result<T, SchedulerError>>;

pub(crate) use crate::domain::Transition;

/// Why a fire goes back for redelivery, and so when it is delivered again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Redelivery {
    /// The worker nacked it; deliver again after this delay.
    Nack(Micros),
    /// Its ack deadline passed (also after the stream that held it went away); back off
    /// exponentially.
    Expired,
}

impl Redelivery {
    fn reason(self) -> RedeliveryReason {
        match self {
            Redelivery::Nack(_) => RedeliveryReason::Nack,
            Redelivery::Expired => RedeliveryReason::Expired,
        }
    }
}

/// What the observer is told once a batch is applied.
#[derive(Debug)]
enum Event {
    /// Fires of a queue stored by the batch, in one count.
    Stored(String, u64),
    Acked(FireRecord),
    Redelivered(FireRecord, RedeliveryReason),
    DeadLettered(FireRecord, String),
    Dropped(FireRecord, DropReason),
    Skipped(String, u64, SkipReason),
    /// Ledger records of jobs on a queue with one outcome, in one count.
    Recorded(String, Outcome, u64),
}

/// A change for the writer.
#[derive(Debug)]
pub(crate) enum Op {
    Schedule {
        job: Job,
        reply: Reply<Job>,
    },
    /// Jobs stored all together or not at all (BatchSchedule).
    ScheduleBatch {
        jobs: Vec<Job>,
        reply: Reply<Vec<Job>>,
    },
    Transition {
        id: String,
        transition: Transition,
        reply: Reply<Job>,
    },
    /// Releases an extra occurrence of a job at `at` (TriggerJob), as its overlap policy says.
    Trigger {
        id: String,
        at: Timestamp,
        reply: Reply<Triggered>,
    },
    /// Releases the occurrences of a job in `[start, end)` not delivered and not out
    /// (BackfillJob).
    Backfill {
        id: String,
        start: Timestamp,
        end: Timestamp,
        reply: Reply<Backfilled>,
    },
    /// Puts a new spec in place of a job's, if the job's spec still has `etag`.
    Update {
        spec: Box<JobSpec>,
        etag: String,
        reply: Reply<Job>,
    },
    /// Jobs the timer found due, each with the occurrence it saw.
    Advance {
        due: Vec<(JobKey, Timestamp)>,
        reply: Reply<()>,
    },
    /// Fires already marked acked in memory; their records are deleted.
    Ack {
        fire_ids: Vec<FireId>,
        reply: Option<Reply<()>>,
    },
    Redeliver {
        fire_id: FireId,
        why: Redelivery,
    },
    /// Deletes a job at once, dropping its outstanding fires; answers how many.
    Delete {
        id: String,
        reply: Reply<u32>,
    },
    /// Finished jobs whose retention ended; each is deleted unless a fire of it is still
    /// outstanding (then it is looked at again later).
    Retire {
        ids: Vec<JobKey>,
    },
    /// Commit even if nothing else is to be written: while commits fail, shows whether the
    /// store works again.
    Probe,
    /// Answered once every op sent before it is committed and applied.
    Flush {
        reply: oneshot::Sender<()>,
    },
    /// Commit what came before, then stop.
    Shutdown {
        reply: oneshot::Sender<()>,
    },
}

/// What to do to memory once a batch is committed.
#[derive(Debug)]
enum Effect {
    /// Replace the job in memory with the batch's version and re-arm its timer.
    Job(JobId),
    /// Re-arm a job's timer from memory (an advance that found nothing to do).
    Rearm(JobId),
    /// A released fire, with the spec of the held job it belongs to.
    NewFire(FireRecord, PackedSpec),
    /// Back on its queue with the next attempt (now or after `not_before`).
    FireRedelivered(FireRecord, RedeliveryReason),
    FireDeleted(FireId),
    /// Moved to its job's dead-letter queue after its last attempt on `from_queue`.
    FireDeadLettered {
        rec: FireRecord,
        from_queue: String,
        attempts: u32,
    },
    /// Deleted after its last attempt: its job has no dead-letter queue.
    FireDropped(FireRecord),
    /// Withdrawn by a later release of its job (overlap policy REPLACE).
    FireReplaced(FireRecord),
    /// The job's held fire goes if nothing of the job runs.
    Unhold(JobId),
    /// The job is deleted; so are these fires of it, still outstanding.
    JobDeleted {
        id: JobId,
        fires: Vec<FireId>,
    },
    /// A finished job kept past its retention because a fire of it is outstanding.
    RetireLater(JobId),
    /// Occurrences of a job on `queue` passed over without a fire.
    Skipped {
        queue: String,
        count: u64,
        reason: SkipReason,
    },
    /// A ledger record of the job of `spec`.
    Recorded {
        spec: PackedSpec,
        record: Occurrence,
    },
}

/// What a ScheduleBatch decided: the ids to answer with, or why none is stored.
type BatchOutcome = Result<Vec<JobId>, SchedulerError>;

/// A batch being decided: the writes, the jobs as they will be after it, and what to apply.
#[derive(Debug, Default)]
struct Batch {
    writes: Vec<Write>,
    jobs: FastMap<JobId, Job>,
    effects: Vec<Effect>,
    job_replies: Vec<(Reply<Job>, Result<JobId, SchedulerError>)>,
    batch_replies: Vec<(Reply<Vec<Job>>, BatchOutcome)>,
    count_replies: Vec<(Reply<u32>, Result<u32, SchedulerError>)>,
    trigger_replies: Vec<(Reply<Triggered>, Result<Triggered, SchedulerError>)>,
    backfill_replies: Vec<(Reply<Backfilled>, Result<Backfilled, SchedulerError>)>,
    /// The fires of jobs whose overlap policy is not ALLOW as this batch's releases, holds and
    /// replacements leave them (memory's view when the batch first looked, plus those).
    running: FastMap<JobId, Running>,
    /// Fires this batch withdrew (overlap REPLACE).
    replaced: FastSet<FireId>,
    /// Fires this batch dead-lettered or dropped: they no longer run.
    sealed: FastSet<FireId>,
    /// Fires outstanding per queue as this batch leaves them (memory's count when the batch
    /// first looked, plus the fires it released).
    queue_fires: FastMap<String, usize>,
    /// Jobs deleted in this batch (a later op in it sees them gone).
    deleted: FastSet<JobId>,
    /// When the batch is decided; finish times are stamped with it.
    now: Timestamp,
    unit_replies: Vec<Reply<()>>,
    /// Fires whose redelivery is in this batch, with the delay decided for them; put back in
    /// line with that delay if the commit fails.
    redelivered: Vec<(FireId, Option<Timestamp>)>,
    /// Acked fires deleted in this batch; their deletion is retried if the commit fails.
    acked: FastSet<FireId>,
    /// Fires TriggerJob released in this batch, and whether held.
    triggered: FastMap<FireId, bool>,
    /// Jobs deleted in this batch, also if created again after: their fires' fates found
    /// later in the batch are not theirs to record, nor to redeliver.
    deleted_ever: FastSet<JobId>,
}

impl Batch {
    /// The job as this batch leaves it: from the batch, else from memory (locked only for the
    /// clone; memory's durable parts change only in this thread, so the copy stays valid).
    fn job(&self, inner: &Inner, id: &str) -> Option<Job> {
        if let Some(job) = self.jobs.get(id) {
            return Some(job.clone());
        }
        if self.deleted.contains(id) {
            return None;
        }
        inner.lock().job(id)
    }

    /// [`Batch::job`] for a job known by its held spec (the timer's, for a release or a
    /// retirement): no search of memory.
    fn held_job(&self, inner: &Inner, spec: &PackedSpec) -> Option<Job> {
        if let Some(job) = self.jobs.get(spec.id()) {
            return Some(job.clone());
        }
        if self.deleted.contains(spec.id()) {
            return None;
        }
        inner.lock().held(spec)
    }

    fn put_job(&mut self, job: Job, spec_too: bool) {
        let id: JobId = job.spec.id().into();
        self.put_job_as(id, job, spec_too);
    }

    /// [`Batch::put_job`] with the job's id already made.
    fn put_job_as(&mut self, id: JobId, mut job: Job, spec_too: bool) {
        if job.status.state.is_final() && job.status.finish_time.is_none() {
            job.status.finish_time = Some(self.now);
        }
        self.deleted.remove(&id);
        if spec_too {
            self.writes.push(Write::PutSpec(job.spec.clone()));
        }
        self.writes
            .push(Write::PutStatus(id.clone(), job.status.clone()));
        self.effects.push(Effect::Job(id.clone()));
        self.jobs.insert(id, job);
    }
}

/// Runs the writer until a `Shutdown` op or until every sender is gone.
pub(crate) fn run(inner: Arc<Inner>, mut rx: mpsc::UnboundedReceiver<Op>) {
    let mut failures: u32 = 0;
    while let Some(first) = rx.blocking_recv() {
        let mut ops = vec![first];
        while ops.len() < MAX_OPS_PER_BATCH {
            match rx.try_recv() {
                Ok(op) => ops.push(op),
                Err(_) => break,
            }
        }
        let mut stops = Vec::new();
        let mut flushes = Vec::new();
        let mut probe = false;
        let ops: Vec<Op> = ops
            .into_iter()
            .filter_map(|op| match op {
                Op::Probe => {
                    probe = true;
                    None
                }
                Op::Shutdown { reply } => {
                    stops.push(reply);
                    None
                }
                Op::Flush { reply } => {
                    flushes.push(reply);
                    None
                }
                op => Some(op),
            })
            .collect();
        if !ops.is_empty() || probe {
            if process(&inner, ops, probe) {
                failures = 0;
            } else {
                // Back off so that a broken disk is not hammered; calls that arrive meanwhile
                // wait and are tried with the next batch.
                let pause = RETRY_AFTER_FAILED_COMMIT
                    .saturating_mul(1 << failures.min(8))
                    .min(MAX_RETRY_AFTER_FAILED_COMMIT);
                failures = failures.saturating_add(1);
                std::thread::sleep(pause);
            }
        }
        for reply in flushes {
            let _ = reply.send(());
        }
        if !stops.is_empty() {
            for reply in stops {
                let _ = reply.send(());
            }
            break;
        }
    }
    debug!("writer stopped");
}

/// Decides, commits and applies one batch of ops; false when the commit failed.
fn process(inner: &Inner, ops: Vec<Op>, probe: bool) -> bool {
    // Deciding runs without holding the state lock (misfire arithmetic can be slow); it takes
    // the lock only to copy what it reads.
    let now = inner.clock.now();
    let mut batch = Batch {
        now,
        ..Batch::default()
    };
    // Ledger records memory let go of leave the store first (before any record this batch
    // puts under a key one of them had).
    let gone = std::mem::take(&mut inner.lock().ledger_gone);
    batch
        .writes
        .extend(gone.iter().cloned().map(Write::DeleteOccurrence));
    for op in ops {
        decide(inner, &mut batch, op, now);
    }

    let result = if batch.writes.is_empty() && !probe {
        Ok(())
    } else {
        let started = std::time::Instant::now();
        let result = inner.store.commit(&batch.writes);
        inner.config.observer.store_committed(
            batch.writes.len(),
            started.elapsed(),
            result.is_ok(),
        );
        inner.set_store_health(result.as_ref().err());
        result
    };

    let (replies, batch_answers, events) = inner.mutate(|state| {
        let mut events = Vec::new();
        match &result {
            Ok(()) => events = apply(inner, state, &batch.jobs, batch.effects),
            Err(e) => {
                error!(error = %e, writes = batch.writes.len(), "store commit failed; the batch's changes were not made");
                for effect in batch.effects {
                    if let Effect::Job(id) | Effect::Rearm(id) = effect {
                        state.sync_timer(&id);
                    }
                }
                for (id, not_before) in &batch.redelivered {
                    state.requeue_unwritten(id, *not_before);
                }
                state.ledger_gone.extend(gone);
            }
        }
        // Job replies read the job from memory after apply, so they show the committed state.
        let mut replies = Vec::with_capacity(batch.job_replies.len());
        for (reply, outcome) in batch.job_replies {
            let answer = match (&result, outcome) {
                (_, Err(e)) => Err(e),
                (Err(e), Ok(_)) => Err(not_stored(e)),
                (Ok(()), Ok(id)) => state
                    .job(&id)
                    .ok_or_else(|| SchedulerError::Internal(format!("job {id} vanished"))),
            };
            replies.push((reply, answer));
        }
        let mut batch_answers = Vec::with_capacity(batch.batch_replies.len());
        for (reply, outcome) in batch.batch_replies {
            let answer = match (&result, outcome) {
                (_, Err(e)) => Err(e),
                (Err(e), Ok(_)) => Err(not_stored(e)),
                (Ok(()), Ok(ids)) => ids
                    .iter()
                    .map(|id| {
                        state.job(id).ok_or_else(|| {
                            SchedulerError::Internal(format!("job {id} vanished"))
                        })
                    })
                    .collect(),
            };
            batch_answers.push((reply, answer));
        }
        (replies, batch_answers, events)
    });
    let observer = &inner.config.observer;
    for event in events {
        match event {
            Event::Stored(queue, count) => observer.fires_stored(&queue, count),
            Event::Acked(rec) => observer.fire_acked(&rec),
            Event::Redelivered(rec, reason) => observer.fire_redelivered(&rec, reason),
            Event::DeadLettered(rec, from) => observer.fire_dead_lettered(&rec, &from),
            Event::Dropped(rec, reason) => observer.fire_dropped(&rec, reason),
            Event::Skipped(queue, count, reason) => {
                observer.occurrences_skipped(&queue, count, reason)
            }
            Event::Recorded(queue, outcome, count) => {
                observer.occurrences_recorded(&queue, outcome, count)
            }
        }
    }
    for (reply, answer) in batch_answers {
        let _ = reply.send(answer);
    }
    for (reply, answer) in replies {
        let _ = reply.send(answer);
    }
    for (reply, outcome) in batch.backfill_replies {
        let answer = match (&result, outcome) {
            (_, Err(e)) => Err(e),
            (Err(e), Ok(_)) => Err(not_stored(e)),
            (Ok(()), Ok(b)) => Ok(b),
        };
        let _ = reply.send(answer);
    }
    for (reply, outcome) in batch.trigger_replies {
        let answer = match (&result, outcome) {
            (_, Err(e)) => Err(e),
            (Err(e), Ok(_)) => Err(not_stored(e)),
            (Ok(()), Ok(t)) => Ok(t),
        };
        let _ = reply.send(answer);
    }
    for (reply, outcome) in batch.count_replies {
        let answer = match (&result, outcome) {
            (_, Err(e)) => Err(e),
            (Err(e), Ok(_)) => Err(not_stored(e)),
            (Ok(()), Ok(n)) => Ok(n),
        };
        let _ = reply.send(answer);
    }
    for reply in batch.unit_replies {
        let _ = reply.send(result.as_ref().map(|_| ()).map_err(not_stored));
    }
    if result.is_err() {
        // Acked fires stay acked in memory; their deletion is retried until the store takes
        // it, so memory and store agree again.
        if !batch.acked.is_empty() {
            let _ = inner.ops.send(Op::Ack {
                fire_ids: batch.acked.into_iter().collect(),
                reply: None,
            });
        }
    }
    result.is_ok()
}

fn not_stored(e: &crate::store::StoreError) -> SchedulerError {
    match e {
        crate::store::StoreError::Full(_) => SchedulerError::ResourceExhausted(format!(
            "the change could not be stored: {e}; free space on tickd's data volume (tickd \
             retries by itself)"
        )),
        _ => SchedulerError::Unavailable(format!(
            "the change could not be stored: {e}; retry shortly"
        )),
    }
}

/// Applies a committed batch to memory.
fn apply(
    inner: &Inner,
    state: &mut State,
    jobs: &FastMap<JobId, Job>,
    effects: Vec<Effect>,
) -> Vec<Event> {
    let mut events = Vec::new();
    // Jobs whose fires started or stopped running, or got a held one: once every effect is
    // applied, a held fire of theirs goes if nothing of theirs runs (whatever the order the
    // batch decided things in).
    let mut overlapping: Vec<JobId> = Vec::new();
    for effect in effects {
        match &effect {
            Effect::NewFire(rec, _) if rec.held => overlapping.push(rec.job_id.clone()),
            Effect::FireDeadLettered { rec, .. } | Effect::FireDropped(rec) => {
                overlapping.push(rec.job_id.clone())
            }
            _ => {}
        }
        match effect {
            Effect::Job(id) => {
                if let Some(job) = jobs.get(&id) {
                    // A job that now has an overlap policy, and had none: follow its fires.
                    if !job.spec.overlap_policy().is_allow()
                        && !job.spec.is_held()
                        && state
                            .job(&id)
                            .is_none_or(|j| j.spec.overlap_policy().is_allow())
                    {
                        state.track_overlap(&job.spec);
                    }
                    state.put_job(job.clone());
                }
            }
            Effect::Rearm(id) => state.sync_timer(&id),
            Effect::NewFire(rec, spec) => {
                // Not if its job was deleted since (then the fire was not stored either).
                if spec.is_held() {
                    match events.last_mut() {
                        Some(Event::Stored(queue, n)) if *queue == rec.queue => *n += 1,
                        _ => events.push(Event::Stored(rec.queue.clone(), 1)),
                    }
                    state.insert_fire(rec, spec);
                }
            }
            Effect::FireRedelivered(rec, reason) => {
                events.push(Event::Redelivered(rec.clone(), reason));
                state.apply_fire_update(rec);
            }
            Effect::FireDeleted(id) => {
                if let Some(entry) = state.remove_fire(&id) {
                    if !state.overlap_fires.is_empty() {
                        overlapping.push(entry.rec.job_id.clone());
                    }
                    events.push(Event::Acked(entry.rec));
                }
            }
            Effect::FireReplaced(rec) => {
                if state.remove_fire(&rec.fire_id).is_some() {
                    inner
                        .dropped_fires
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    events.push(Event::Dropped(rec, DropReason::Replaced));
                }
            }
            Effect::Unhold(id) => {
                state.unhold_if_idle(&id);
            }
            Effect::JobDeleted { id, fires } => {
                for fire_id in fires {
                    if let Some(entry) = state.remove_fire(&fire_id) {
                        inner
                            .dropped_fires
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        events.push(Event::Dropped(entry.rec, DropReason::JobDeleted));
                    }
                }
                state.remove_job(&id);
                state.forget_ledger(&id);
            }
            Effect::Skipped {
                queue,
                count,
                reason,
            } => events.push(Event::Skipped(queue, count, reason)),
            Effect::Recorded { spec, record } => {
                match events.last_mut() {
                    Some(Event::Recorded(q, outcome, n))
                        if q == spec.queue() && *outcome == record.outcome =>
                    {
                        *n += record.count
                    }
                    _ => events.push(Event::Recorded(
                        spec.queue().to_string(),
                        record.outcome,
                        record.count,
                    )),
                }
                state.record_occurrence(&spec, record);
            }
            Effect::RetireLater(id) => {
                let later = state.clock.now().plus(RETIRE_RECHECK_MICROS);
                state.set_expiry(&id, Some(later));
            }
            Effect::FireDeadLettered {
                rec,
                from_queue,
                attempts,
            } => {
                warn!(fire_id = %rec.fire_id, job_id = %rec.job_id, queue = %from_queue, dead_letter_queue = %rec.queue, attempts, "fire dead-lettered after its last attempt");
                events.push(Event::DeadLettered(rec.clone(), from_queue));
                state.apply_fire_update(rec);
            }
            Effect::FireDropped(rec) => {
                warn!(fire_id = %rec.fire_id, job_id = %rec.job_id, queue = %rec.queue, attempts = rec.attempt, "fire dropped after its last attempt: its job has no dead-letter queue");
                inner
                    .dropped_fires
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                state.remove_fire(&rec.fire_id);
                events.push(Event::Dropped(rec, DropReason::AttemptsExhausted));
            }
        }
    }
    if !state.overlap_fires.is_empty() {
        for job in overlapping {
            state.unhold_if_idle(&job);
        }
    }
    events
}

fn decide(inner: &Inner, batch: &mut Batch, op: Op, now: Timestamp) {
    match op {
        Op::Delete { id, reply } => {
            let outcome = decide_delete(inner, batch, &id);
            batch.count_replies.push((reply, outcome));
        }
        Op::Retire { ids } => {
            for id in ids {
                decide_retire(inner, batch, &id.0);
            }
        }
        Op::Schedule { job, reply } => {
            let id: JobId = job.spec.id().into();
            let outcome = match batch.job(inner, &id) {
                Some(existing) if existing.spec == job.spec => Ok(id),
                Some(_) => Err(SchedulerError::AlreadyExists(id.to_string())),
                None => {
                    batch.put_job(job, true);
                    Ok(id)
                }
            };
            batch.job_replies.push((reply, outcome));
        }
        Op::ScheduleBatch { jobs, reply } => {
            // All or nothing: every job is checked before any is put. Each job is looked up
            // once: the same id twice in one request is refused by validation.
            let mut exists = Vec::with_capacity(jobs.len());
            let mut taken = None;
            for (index, job) in jobs.iter().enumerate() {
                match batch.job(inner, job.spec.id()) {
                    Some(existing) if existing.spec != job.spec => {
                        taken = Some(SchedulerError::InBatch {
                            index,
                            error: Box::new(SchedulerError::AlreadyExists(
                                job.spec.id().to_string(),
                            )),
                        });
                        break;
                    }
                    found => exists.push(found.is_some()),
                }
            }
            let outcome = match taken {
                Some(e) => Err(e),
                None => {
                    let mut ids = Vec::with_capacity(jobs.len());
                    for (job, exists) in jobs.into_iter().zip(exists) {
                        let id: JobId = job.spec.id().into();
                        if !exists {
                            batch.put_job(job, true);
                        }
                        ids.push(id);
                    }
                    Ok(ids)
                }
            };
            batch.batch_replies.push((reply, outcome));
        }
        Op::Transition {
            id,
            transition,
            reply,
        } => {
            let outcome = decide_transition(inner, batch, &id, transition);
            batch.job_replies.push((reply, outcome));
        }
        Op::Trigger { id, at, reply } => {
            let outcome = decide_trigger(inner, batch, &id, at);
            batch.trigger_replies.push((reply, outcome));
        }
        Op::Backfill {
            id,
            start,
            end,
            reply,
        } => {
            let outcome = decide_backfill(inner, batch, &id, start, end, now);
            batch.backfill_replies.push((reply, outcome));
        }
        Op::Update { spec, etag, reply } => {
            let outcome = decide_update(inner, batch, &spec, &etag, now);
            batch.job_replies.push((reply, outcome));
        }
        Op::Advance { due, reply } => {
            for (key, expected) in due {
                decide_advance(inner, batch, &key.0, expected, now, false);
            }
            batch.unit_replies.push(reply);
        }
        Op::Ack { fire_ids, reply } => {
            // Per acked fire: (its job's spec, occurrence, attempts) for its ledger record.
            type Seal = Option<(PackedSpec, Timestamp, u32)>;
            let acked: Vec<(FireId, Seal)> = {
                let state = inner.lock();
                fire_ids
                    .into_iter()
                    .filter_map(|id| {
                        let f = state.fires.get(&id)?;
                        // A dead-lettered fire's occurrence is in the ledger as such already.
                        let seal = (!f.rec.dead_lettered).then(|| {
                            let r = &f.rec;
                            (f.spec.clone(), r.scheduled_time, r.attempt)
                        });
                        (f.status == FireStatus::Acked).then_some((id, seal))
                    })
                    .collect()
            };
            for (id, seal) in acked {
                // The same id may come from a stream ack, a unary ack and a retry at once.
                if batch.acked.insert(id.clone()) {
                    batch.writes.push(Write::DeleteFire(id.clone()));
                    if let Some((spec, scheduled, attempts)) = seal {
                        let triggered = is_triggered(&id);
                        let record = Occurrence::released(
                            scheduled,
                            triggered,
                            Outcome::Delivered,
                            attempts,
                            now,
                        );
                        record_occurrence(inner, batch, &spec, record);
                    }
                    batch.effects.push(Effect::FireDeleted(id));
                }
            }
            if let Some(reply) = reply {
                batch.unit_replies.push(reply);
            }
        }
        Op::Redeliver { fire_id, why } => decide_redelivery(inner, batch, fire_id, why, now),
        // Filtered out by `run` before deciding.
        Op::Probe | Op::Flush { .. } | Op::Shutdown { .. } => {}
    }
}

fn decide_transition(
    inner: &Inner,
    batch: &mut Batch,
    id: &str,
    transition: Transition,
) -> Result<JobId, SchedulerError> {
    let Some(mut job) = batch.job(inner, id) else {
        return Err(SchedulerError::NotFound(id.to_string()));
    };
    let owed = job.owed(batch.now);
    if job
        .apply(transition)
        .map_err(|e| SchedulerError::FailedPrecondition(e.to_string()))?
    {
        batch.put_job(job.clone(), false);
        match (transition, owed) {
            // What fell due while paused is decided now, by the misfire policy.
            (Transition::Resume, Some(run)) => {
                decide_advance(inner, batch, &job.spec, run.first, batch.now, true);
            }
            // Occurrences owed and never to be released go in the ledger.
            (Transition::Cancel, Some(run)) => {
                let record = Occurrence::skipped(run, batch.now);
                record_occurrence(inner, batch, &job.spec, record);
            }
            _ => {}
        }
    }
    Ok(job.spec.id().into())
}

/// Releases one extra fire of a scheduled or paused job, its schedule untouched, as its
/// overlap policy says (released, held or skipped). The same job triggered twice at one
/// instant releases one fire.
fn decide_trigger(
    inner: &Inner,
    batch: &mut Batch,
    id: &str,
    at: Timestamp,
) -> Result<Triggered, SchedulerError> {
    let Some(job) = batch.job(inner, id) else {
        return Err(SchedulerError::NotFound(id.to_string()));
    };
    if job.status.state.is_final() {
        return Err(SchedulerError::FailedPrecondition(format!(
            "job {id} is {}; only a scheduled or paused job can be triggered",
            job.status.state.as_str()
        )));
    }
    let id: JobId = job.spec.id().into();
    let fire_id = triggered_fire_id(&id, at);
    let queue = job.spec.queue();
    let mut rec = FireRecord::released(fire_id.clone(), id.clone(), queue.to_string(), at, at);
    let existing = inner.lock().fires.get(&fire_id).map(|e| e.rec.held);
    if let Some(held) = existing.or_else(|| batch.triggered.get(&fire_id).copied()) {
        rec.held = held;
        let disposition = if held {
            Disposition::Held
        } else {
            Disposition::Released
        };
        return Ok(Triggered {
            fire: rec,
            disposition,
        });
    }
    let outstanding = match batch.queue_fires.get(queue) {
        Some(n) => *n,
        None => inner.lock().queue_fires(queue) as usize,
    };
    let policy = job.spec.overlap_policy();
    let plan = if policy.is_allow() {
        None
    } else {
        let running = running_of(inner, batch, &id);
        let plan = overlap::decide(policy, running, &[at]);
        Some((running, plan))
    };
    let disposition = plan
        .as_ref()
        .map_or(Disposition::Released, |(_, p)| p.disposition());
    if disposition != Disposition::Skipped && outstanding >= inner.config.max_queue_backlog {
        return Err(SchedulerError::ResourceExhausted(format!(
            "queue {queue} holds {outstanding} fires not yet acked (--max-queue-backlog); \
             nothing was triggered"
        )));
    }
    if let Some((running, plan)) = plan {
        carry_out(inner, batch, &job, &plan, running, plan.release.len());
        if let Some(run) = plan.skipped {
            overlap_skipped(batch, &job, run.count);
            let mut record = Occurrence::skipped(run, batch.now);
            record.triggered = true;
            record_occurrence(inner, batch, &job.spec, record);
        }
    }
    if disposition == Disposition::Skipped {
        return Ok(Triggered {
            fire: rec,
            disposition,
        });
    }
    batch.queue_fires.insert(queue.to_string(), outstanding + 1);
    rec.held = disposition == Disposition::Held;
    rec.trace = inner.config.observer.fire_released(&rec, &job);
    batch.triggered.insert(fire_id, rec.held);
    batch.writes.push(Write::PutFire(rec.clone()));
    batch
        .effects
        .push(Effect::NewFire(rec.clone(), job.spec.clone()));
    Ok(Triggered {
        fire: rec,
        disposition,
    })
}

/// Releases the occurrences of a job in `[start, end)` whose ledger entry is not DELIVERED
/// and whose fire is not out, oldest first, with their usual fire ids (see
/// [`crate::domain::backfill`]); all or nothing.
fn decide_backfill(
    inner: &Inner,
    batch: &mut Batch,
    id: &str,
    start: Timestamp,
    end: Timestamp,
    now: Timestamp,
) -> Result<Backfilled, SchedulerError> {
    let Some(job) = batch.job(inner, id) else {
        return Err(SchedulerError::NotFound(id.to_string()));
    };
    backfill::admissible(&job, start, now)?;
    // Walked before the state lock is taken (a cron walk of 1,000 steps takes a while).
    let wanted = backfill::occurrences(&job, start, end, now);
    let id: JobId = job.spec.id().into();
    let queue = job.spec.queue();
    let mut done = Backfilled::default();
    let mut release = Vec::new();
    let outstanding = {
        let state = inner.lock();
        let ledger = state.ledgers.get(id.as_bytes());
        backfill::ledger_reaches(
            inner.config.ledger,
            now,
            start,
            ledger.map_or(0, |l| l.len()),
            ledger.and_then(|l| l.records().next()).map(|r| r.scheduled),
            &id,
        )?;
        let wanted = wanted?;
        // Fires of the job this batch released already.
        let in_batch: FastSet<FireId> = batch
            .effects
            .iter()
            .filter_map(|e| match e {
                Effect::NewFire(rec, _) if rec.job_id == id => Some(rec.fire_id.clone()),
                _ => None,
            })
            .collect();
        for o in wanted {
            let fire = fire_id(&id, o);
            // In memory (an acked one until its deletion is applied), or released by this batch.
            let out = state.fires.contains_key(&fire) || in_batch.contains(&fire);
            if out {
                done.outstanding += 1;
            } else if ledger
                .and_then(|l| l.get((o, false)))
                .is_some_and(|r| r.outcome == Outcome::Delivered)
            {
                done.delivered += 1;
            } else {
                release.push((fire, o));
            }
        }
        match batch.queue_fires.get(queue) {
            Some(n) => *n,
            None => state.queue_fires(queue) as usize,
        }
    };
    if outstanding + release.len() > inner.config.max_queue_backlog {
        return Err(SchedulerError::ResourceExhausted(format!(
            "queue {queue} holds {outstanding} fires not yet acked and has no room for {} more \
             (--max-queue-backlog); nothing was backfilled",
            release.len()
        )));
    }
    batch
        .queue_fires
        .insert(queue.to_string(), outstanding + release.len());
    for (fire, o) in release {
        let mut rec = FireRecord::released(fire, id.clone(), queue.to_string(), o, now);
        rec.trace = inner.config.observer.fire_released(&rec, &job);
        batch.writes.push(Write::PutFire(rec.clone()));
        batch
            .effects
            .push(Effect::NewFire(rec.clone(), job.spec.clone()));
        done.fires.push(rec);
    }
    Ok(done)
}

/// The fires of job `id` as its overlap policy sees them, this batch's decisions included.
fn running_of(inner: &Inner, batch: &Batch, id: &str) -> Running {
    match batch.running.get(id) {
        Some(r) => *r,
        None => inner.lock().running_of(id),
    }
}

/// Carries out the part of an overlap `plan` for `job` that concerns its fires already out
/// (withdrawn, or the held one let go), and notes the job's fires as the plan leaves them
/// (`running` before it, `released` fires released by it). The caller stores the plan's
/// releases and hold.
fn carry_out(
    inner: &Inner,
    batch: &mut Batch,
    job: &Job,
    plan: &overlap::Plan,
    running: Running,
    released: usize,
) {
    let id: JobId = job.spec.id().into();
    if plan.replace {
        withdraw(inner, batch, job);
    }
    if plan.unhold {
        batch.effects.push(Effect::Unhold(id.clone()));
    }
    batch.running.insert(id, plan.after(running, released));
}

/// Withdraws the fires of `job` that run or are held (overlap REPLACE): each is deleted and
/// its occurrence recorded REPLACED; a later ack of one finds nothing.
fn withdraw(inner: &Inner, batch: &mut Batch, job: &Job) {
    let id = job.spec.id();
    let out = inner.lock().replaceable_of(id);
    for (rec, delivered) in out {
        // Sealed otherwise in this batch already (dead-lettered, dropped, or replaced). One
        // sent back for another attempt is withdrawn: its deletion follows the redelivery's
        // write, and memory removes it after making it deliverable again.
        if batch.replaced.contains(&rec.fire_id) || batch.sealed.contains(&rec.fire_id) {
            continue;
        }
        batch.replaced.insert(rec.fire_id.clone());
        batch.writes.push(Write::DeleteFire(rec.fire_id.clone()));
        let record = Occurrence::released(
            rec.scheduled_time,
            is_triggered(&rec.fire_id),
            Outcome::Replaced,
            delivered,
            batch.now,
        );
        record_occurrence(inner, batch, &job.spec, record);
        batch.effects.push(Effect::FireReplaced(rec));
    }
    // Fires this batch released for the job go before they were ever out.
    let mut gone = Vec::new();
    batch.effects.retain(|effect| match effect {
        Effect::NewFire(rec, _) if &*rec.job_id == id => {
            gone.push(rec.clone());
            false
        }
        _ => true,
    });
    for rec in gone {
        batch.writes.push(Write::DeleteFire(rec.fire_id.clone()));
        batch.triggered.remove(&rec.fire_id);
        let record = Occurrence::released(
            rec.scheduled_time,
            is_triggered(&rec.fire_id),
            Outcome::Replaced,
            0,
            batch.now,
        );
        record_occurrence(inner, batch, &job.spec, record);
    }
}

/// Counts `count` occurrences of `job` skipped by its overlap policy.
fn overlap_skipped(batch: &mut Batch, job: &Job, count: u64) {
    debug!(job_id = %job.spec.id(), count, policy = job.spec.overlap_policy().as_str(), "occurrence(s) skipped: a fire of the job is still running");
    batch.effects.push(Effect::Skipped {
        queue: job.spec.queue().to_string(),
        count,
        reason: SkipReason::Overlap,
    });
}

/// Replaces a job's spec (see [`Job::updated`]) if it still has the spec the caller read.
fn decide_update(
    inner: &Inner,
    batch: &mut Batch,
    spec: &JobSpec,
    expected: &str,
    now: Timestamp,
) -> Result<JobId, SchedulerError> {
    let id = &*spec.id;
    let Some(job) = batch.job(inner, id) else {
        return Err(SchedulerError::NotFound(id.to_string()));
    };
    if etag(&job.spec) != expected {
        return Err(SchedulerError::Aborted(format!(
            "job {id} changed since it was read; read it again and retry"
        )));
    }
    let updated = job.updated(spec, now)?;
    // What the job owed and will not release now goes in the ledger.
    let withdrawn = job.withdrawn_by(&updated, now);
    batch.put_job(updated, true);
    if let Some(run) = withdrawn {
        record_occurrence(inner, batch, &job.spec, Occurrence::skipped(run, now));
    }
    Ok(id.into())
}

/// Deletes a job and its outstanding fires; answers how many fires were dropped.
fn decide_delete(inner: &Inner, batch: &mut Batch, id: &str) -> Result<u32, SchedulerError> {
    let Some(job) = batch.job(inner, id) else {
        return Err(SchedulerError::NotFound(id.to_string()));
    };
    let id: JobId = job.spec.id().into();
    let fires = inner.lock().fires_of(&id);
    let records = ledger_keys(inner, &id);
    delete_job(batch, id, fires.clone(), records);
    Ok(u32::try_from(fires.len()).unwrap_or(u32::MAX))
}

/// Deletes a finished job whose retention ended, unless a fire of it is still outstanding.
fn decide_retire(inner: &Inner, batch: &mut Batch, spec: &PackedSpec) {
    let Some(job) = batch.held_job(inner, spec) else {
        return;
    };
    let id: JobId = spec.id().into();
    if !job.status.state.is_final() {
        return;
    }
    let outstanding = inner.lock().fires_per_job.get(&id).is_some_and(|n| *n > 0);
    if outstanding {
        batch.effects.push(Effect::RetireLater(id));
        return;
    }
    debug!(job_id = %id, "finished job deleted: its retention ended");
    let records = ledger_keys(inner, &id);
    delete_job(batch, id, Vec::new(), records);
}

/// The store keys of a job's ledger records in memory.
fn ledger_keys(inner: &Inner, id: &str) -> Vec<String> {
    inner
        .lock()
        .ledgers
        .get(id.as_bytes())
        .map_or_else(Vec::new, |l| {
            l.records()
                .map(|r| crate::domain::ledger::store_key(id, r.key()))
                .collect()
        })
}

/// Deletes a job with its outstanding `fires` and its ledger `records` (store keys), and what
/// this batch released or recorded for it.
fn delete_job(batch: &mut Batch, id: JobId, fires: Vec<FireId>, records: Vec<String>) {
    for fire_id in &fires {
        batch.writes.push(Write::DeleteFire(fire_id.clone()));
    }
    // Fires this same batch released for the job (it fell due beside the delete) go too, and
    // so do ledger records it put.
    batch.effects.retain(|effect| match effect {
        Effect::NewFire(rec, _) if rec.job_id == id => {
            batch.writes.push(Write::DeleteFire(rec.fire_id.clone()));
            false
        }
        Effect::Recorded { spec, record } if spec.id() == &*id => {
            batch
                .writes
                .push(Write::DeleteOccurrence(record.store_key(&id)));
            false
        }
        _ => true,
    });
    batch
        .writes
        .extend(records.into_iter().map(Write::DeleteOccurrence));
    batch.deleted_ever.insert(id.clone());
    batch.writes.push(Write::DeleteJob(id.clone()));
    batch.jobs.remove(&id);
    batch.deleted.insert(id.clone());
    batch.effects.push(Effect::JobDeleted { id, fires });
}

/// Puts a ledger record of the job of `spec` in the batch (unless the ledger keeps none).
fn record_occurrence(inner: &Inner, batch: &mut Batch, spec: &PackedSpec, record: Occurrence) {
    if inner.config.ledger.per_job == 0 || batch.deleted_ever.contains(spec.id()) {
        return;
    }
    batch
        .writes
        .push(Write::PutOccurrence(spec.id().into(), record.clone()));
    batch.effects.push(Effect::Recorded {
        spec: spec.clone(),
        record,
    });
}

/// Advances one due job: the job's new status and a record per fire go into the same batch.
fn decide_advance(
    inner: &Inner,
    batch: &mut Batch,
    spec: &PackedSpec,
    expected: Timestamp,
    now: Timestamp,
    resumed: bool,
) {
    let Some(job) = batch.held_job(inner, spec) else {
        return;
    };
    let id: JobId = spec.id().into();
    if job.status.state != JobState::Scheduled || job.status.next_occurrence != Some(expected) {
        // Changed since the timer looked (paused, cancelled, already advanced).
        batch.effects.push(Effect::Rearm(id));
        return;
    }
    let queue = job.spec.queue();
    // Memory's count is read once per queue and batch; fires this batch adds are counted on top.
    let outstanding = match batch.queue_fires.get(queue) {
        Some(n) => *n,
        None => {
            let n = inner.lock().queue_fires(queue) as usize;
            batch.queue_fires.insert(queue.to_string(), n);
            n
        }
    };
    let room = inner.config.max_queue_backlog.saturating_sub(outstanding);
    let policy = job.spec.overlap_policy();
    let running = if policy.is_allow() {
        Running::default()
    } else {
        running_of(inner, batch, &id)
    };
    let plan = advance_with_room(&job, now, inner.config.max_catch_up_fires, room, running);
    if plan.status == job.status {
        batch.effects.push(Effect::Rearm(id));
        return;
    }
    if !policy.is_allow() {
        carry_out(inner, batch, &job, &plan.overlap, running, plan.fires.len());
    }
    // Missed while paused, not while tickd was down: the ledger and the counter say so.
    let missed = if resumed {
        SkipReason::Paused
    } else {
        SkipReason::Misfire
    };
    if plan.skipped > 0 {
        let at_least = if plan.skipped_at_least {
            "at least "
        } else {
            ""
        };
        warn!(
            job_id = %id,
            queue = %job.spec.queue(),
            skipped = plan.skipped,
            policy = ?job.spec.misfire_policy(),
            "{at_least}{} missed occurrence(s) skipped by the misfire policy",
            plan.skipped
        );
        batch.effects.push(Effect::Skipped {
            queue: queue.to_string(),
            count: plan.skipped,
            reason: missed,
        });
    }
    if plan.skipped_no_room > 0 {
        warn!(
            job_id = %id,
            queue = %queue,
            skipped = plan.skipped_no_room,
            max_queue_backlog = inner.config.max_queue_backlog,
            "occurrence(s) skipped: the queue holds --max-queue-backlog fires not yet acked; is anyone consuming it?"
        );
        batch.effects.push(Effect::Skipped {
            queue: queue.to_string(),
            count: plan.skipped_no_room,
            reason: SkipReason::BacklogFull,
        });
    }
    for (reason, count) in dst_skipped(&id, queue, plan.skipped_dst) {
        batch.effects.push(Effect::Skipped {
            queue: queue.to_string(),
            count,
            reason,
        });
    }
    for run in &plan.passed_over {
        let mut run = *run;
        if run.reason == SkipReason::Misfire {
            run.reason = missed;
        }
        if run.reason == SkipReason::Overlap {
            overlap_skipped(batch, &job, run.count);
        }
        let record = Occurrence::skipped(run, now);
        record_occurrence(inner, batch, &job.spec, record);
    }
    let held = plan.overlap.hold;
    if let Some(n) = batch.queue_fires.get_mut(queue) {
        *n += plan.fires.len() + usize::from(held.is_some());
    }
    let stored = plan.fires.iter().map(|o| (*o, false));
    for (occurrence, held) in stored.chain(held.map(|o| (o, true))) {
        let mut rec = FireRecord::released(
            fire_id(&id, occurrence),
            id.clone(),
            job.spec.queue().to_string(),
            occurrence,
            now,
        );
        rec.held = held;
        rec.trace = inner.config.observer.fire_released(&rec, &job);
        batch.writes.push(Write::PutFire(rec.clone()));
        batch.effects.push(Effect::NewFire(rec, job.spec.clone()));
    }
    let mut next = job;
    next.status = plan.status;
    batch.put_job_as(id, next, false);
}

/// Notes that a fire of the job of `spec` stopped running in this batch (dead-lettered or
/// dropped): later decisions of the batch under its overlap policy see it gone.
fn stopped_running(inner: &Inner, batch: &mut Batch, spec: &PackedSpec, fire_id: &FireId) {
    batch.sealed.insert(fire_id.clone());
    if spec.overlap_policy().is_allow() && !batch.running.contains_key(spec.id()) {
        return;
    }
    let mut r = running_of(inner, batch, spec.id());
    r.running = r.running.saturating_sub(1);
    batch.running.insert(spec.id().into(), r);
}

/// Counts an attempt for a fire that came back, and decides where it goes: its queue again
/// (at once or after a delay), the dead-letter queue, or nowhere.
fn decide_redelivery(
    inner: &Inner,
    batch: &mut Batch,
    fire_id: FireId,
    why: Redelivery,
    now: Timestamp,
) {
    let (spec, mut rec) = {
        let state = inner.lock();
        match state.fires.get(&fire_id) {
            // Anything but Pending: acked while on its way here.
            Some(entry) if entry.status == FireStatus::Pending => {
                (entry.spec.clone(), entry.rec.clone())
            }
            _ => return,
        }
    };
    if batch.deleted_ever.contains(&rec.job_id) || batch.replaced.contains(&fire_id) {
        // Dropped with its job by a delete earlier in this batch, or replaced (put back in
        // line, as any redelivery, should that commit fail).
        batch.redelivered.push((fire_id, None));
        return;
    }
    let delivered_attempt = rec.attempt;
    let delay = match why {
        Redelivery::Nack(d) => d,
        Redelivery::Expired => {
            expiry_backoff(delivered_attempt, inner.config.max_redelivery_backoff)
        }
    };
    match after_attempt(
        rec.attempt,
        rec.dead_lettered,
        spec.max_attempts(),
        spec.dead_letter_queue(),
        delay,
    ) {
        AfterAttempt::DeadLetter { queue } => {
            batch.redelivered.push((fire_id.clone(), None));
            stopped_running(inner, batch, &spec, &fire_id);
            let record = Occurrence::released(
                rec.scheduled_time,
                is_triggered(&fire_id),
                Outcome::DeadLettered,
                delivered_attempt,
                now,
            );
            record_occurrence(inner, batch, &spec, record);
            let from_queue = std::mem::replace(&mut rec.queue, queue);
            rec.attempt = 1;
            rec.not_before = None;
            rec.dead_lettered = true;
            batch.writes.push(Write::PutFire(rec.clone()));
            batch.effects.push(Effect::FireDeadLettered {
                rec,
                from_queue,
                attempts: delivered_attempt,
            });
            return;
        }
        AfterAttempt::Drop => {
            batch.redelivered.push((fire_id.clone(), None));
            if !rec.dead_lettered {
                stopped_running(inner, batch, &spec, &fire_id);
            }
            // A fire dropped on the dead-letter queue: its occurrence is DEAD_LETTERED already.
            if !rec.dead_lettered {
                let record = Occurrence::released(
                    rec.scheduled_time,
                    is_triggered(&fire_id),
                    Outcome::Dropped,
                    delivered_attempt,
                    now,
                );
                record_occurrence(inner, batch, &spec, record);
            }
            batch.writes.push(Write::DeleteFire(fire_id));
            batch.effects.push(Effect::FireDropped(rec));
            return;
        }
        AfterAttempt::Again { attempt, delay } => {
            rec.attempt = attempt;
            rec.not_before = (delay > 0).then(|| now.plus(delay));
        }
    }
    batch.redelivered.push((fire_id, rec.not_before));
    batch.writes.push(Write::PutFire(rec.clone()));
    batch
        .effects
        .push(Effect::FireRedelivered(rec, why.reason()));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn released(job: &str, at: i64) -> FireRecord {
        FireRecord {
            fire_id: fire_id(job, Timestamp(at)),
            job_id: job.into(),
            queue: "q".into(),
            scheduled_time: Timestamp(at),
            fire_time: Timestamp(at),
            attempt: 1,
            not_before: None,
            dead_lettered: false,
            trace: None,
            held: false,
        }
    }

    /// A job deleted in the batch that released a fire for it takes that fire along: the
    /// store is left with no fire whose job is gone, and memory never gets it.
    #[test]
    fn a_delete_takes_the_fires_its_batch_released() {
        let mut batch = Batch::default();
        for rec in [released("a", 1), released("b", 1)] {
            batch.writes.push(Write::PutFire(rec.clone()));
            let spec = PackedSpec::new(&crate::store::contract::spec(&rec.job_id));
            batch.effects.push(Effect::NewFire(rec, spec));
        }
        delete_job(&mut batch, "a".into(), Vec::new(), Vec::new());
        let deleted: Vec<&str> = batch
            .writes
            .iter()
            .filter_map(|w| match w {
                Write::DeleteFire(id) => Some(&**id),
                _ => None,
            })
            .collect();
        assert_eq!(deleted, vec![&*fire_id("a", Timestamp(1))]);
        let new_fires: Vec<&str> = batch
            .effects
            .iter()
            .filter_map(|e| match e {
                Effect::NewFire(rec, _) => Some(&*rec.job_id),
                _ => None,
            })
            .collect();
        assert_eq!(new_fires, vec!["b"]);
        assert!(matches!(batch.writes.last(), Some(Write::DeleteJob(id)) if &**id == "a"));
    }
}
