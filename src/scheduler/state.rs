//! The scheduler's memory: jobs, the timer index, fires and their delivery state, queues and
//! subscribers. Everything here can be rebuilt from the store ([`State::restore`]); the only
//! things that live in memory alone are which subscriber holds which fire and until when.
//!
//! This is where a fire waits (its queue's `ready` list, or the `deadlines` index while delayed)
//! and where it is handed out ([`State::poll_delivery`]). Delivery is pulled: a subscription
//! takes a fire only when its stream is polled and it is below `max_in_flight`, so a fire is
//! never parked in a buffer of a slow or dead stream, and its ack deadline starts when it is
//! handed to that stream. Guarded by one std mutex (`Inner::state`); never held across an
//! `.await`; nothing here does I/O or waits.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::task::{Poll, Waker};

use tracing::error;

use super::clock::Clock;
use super::{FastMap, FastSet};
use crate::domain::ledger::{self, Bounds, JobLedger};
use crate::domain::{
    FireId, FireRecord, Job, JobId, JobKey, JobState, Micros, Occurrence, PackedSpec, Running,
    Timestamp, TraceContext,
};
use crate::store::Snapshot;

/// Identifies one Subscribe stream.
pub(crate) type SubId = u64;

/// A fire as handed to a subscriber.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub fire: FireRecord,
    pub spec: PackedSpec,
    pub ack_deadline: Timestamp,
}

/// Where a fire is in its delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FireStatus {
    /// On its queue's ready list, waiting for a subscriber with room.
    Ready,
    /// Waiting in `deadlines` until it may be delivered (nack delay or backoff); steady time.
    Delayed(Timestamp),
    /// Handed to a subscriber's stream; back for redelivery at the deadline (in `deadlines`,
    /// steady time). Stays so when the stream goes away: the worker may still ack it.
    InFlight { sub: SubId, deadline: Timestamp },
    /// Its redelivery is being written; not deliverable until that commit applies.
    Pending,
    /// Acked; its deletion is being written (and retried until it is).
    Acked,
    /// Held back by its job's overlap policy (BUFFER_ONE) until no fire of the job runs
    /// ([`State::unhold_if_idle`]); on no list, in no index.
    Held,
}

#[derive(Debug)]
pub(crate) struct FireEntry {
    pub rec: FireRecord,
    pub spec: PackedSpec,
    pub status: FireStatus,
}

#[derive(Debug, Default)]
pub(crate) struct QueueState {
    /// Fires waiting for a subscriber, oldest first. May hold ids whose status has moved on;
    /// those are skipped when popped.
    pub ready: VecDeque<FireId>,
    pub subs: Vec<SubId>,
}

#[derive(Debug)]
pub(crate) struct Subscriber {
    pub queue: String,
    pub max_in_flight: usize,
    pub in_flight: FastSet<FireId>,
    /// Set while the stream waits for a fire; woken when one may be there for it.
    pub waker: Option<Waker>,
}

/// What the timer loop found due in one pass.
#[derive(Debug, Default)]
pub(crate) struct DueWork {
    /// Jobs whose next occurrence is due, with that occurrence (taken out of `timers`).
    pub jobs: Vec<(JobKey, Timestamp)>,
    /// Fires whose ack deadline passed; now `Pending`, to be redelivered.
    pub expired: Vec<FireId>,
    /// Finished jobs whose retention ended (taken out of `expiries`), to be deleted.
    pub retired: Vec<JobKey>,
    /// When the loop should look again, if anything is waiting.
    pub next_wake: Option<Timestamp>,
}

#[derive(Debug)]
pub(crate) struct State {
    pub clock: Arc<dyn Clock>,
    /// Every held job, as its packed spec (ordered by id, searched with the id's bytes): an
    /// 8-byte key that is the job's only allocation. Its status and index keys are kept in it
    /// (`PackedSpec::held_status`); [`State::job`] gives the job.
    pub jobs: BTreeSet<JobKey>,
    /// The trace context of each held job created in a traced call (few are): kept aside, so
    /// that the jobs without one do not each carry room for it.
    pub traces: FastMap<JobKey, Box<TraceContext>>,
    /// Jobs per queue, in id order: ListJobs on one queue scans only that queue's jobs.
    pub by_queue: FastMap<String, BTreeSet<JobKey>>,
    /// How many jobs are in each state; changed only through [`State::put_job`].
    pub job_counts: BTreeMap<JobState, u64>,
    /// (due time, job id) of every SCHEDULED job with a next occurrence.
    pub timers: BTreeSet<(Timestamp, JobKey)>,
    /// How long a finished job is kept (see [`State::expiry_of`]).
    pub retention: Micros,
    /// (deletion time, job id) of every COMPLETED or CANCELLED job.
    pub expiries: BTreeSet<(Timestamp, JobKey)>,
    pub fires: FastMap<FireId, FireEntry>,
    /// Fires outstanding per job (stored and not yet acked or dropped); a job with any is not
    /// deleted by retention.
    pub fires_per_job: FastMap<JobId, u32>,
    /// Fires outstanding per queue (waiting or in flight); a queue at `--max-queue-backlog`
    /// takes no new fire.
    pub fires_per_queue: FastMap<String, u32>,
    /// The outstanding fires of each job whose overlap policy is not ALLOW (and of any job
    /// with a held fire): what its policy looks at. Most jobs are in none.
    pub overlap_fires: FastMap<JobId, Vec<FireId>>,
    /// (steady time, fire id) of in-flight ack deadlines and delayed redeliveries: measured on
    /// the steady clock, so a wall-clock step moves none of them.
    pub deadlines: BTreeSet<(Timestamp, FireId)>,
    pub queues: FastMap<String, QueueState>,
    pub subscribers: FastMap<SubId, Subscriber>,
    pub next_sub_id: SubId,
    pub shutting_down: bool,
    /// Set when a timer or deadline became the earliest of its index: the timer loop must look
    /// again. Whoever releases the lock reads and clears it (`Inner::mutate`).
    pub timer_dirty: bool,
    /// Subscription streams to wake once the lock is released (`Inner::mutate`).
    pub wakers: Vec<Waker>,
    /// Set while the timer loop holds work it took from the indexes and has not finished
    /// handing to the writer (see `Scheduler::settle`).
    pub timer_busy: bool,
    /// The ledger of each job that has records (most pending jobs have none).
    pub ledgers: FastMap<JobKey, JobLedger>,
    pub ledger_bounds: Bounds,
    /// Store keys of ledger records memory no longer keeps (out of bounds, or their job was
    /// deleted): the writer deletes them from the store with its next batch.
    pub ledger_gone: Vec<String>,
}

impl State {
    pub fn new(clock: Arc<dyn Clock>, retention: Micros) -> State {
        State {
            clock,
            jobs: BTreeSet::new(),
            traces: FastMap::default(),
            by_queue: FastMap::default(),
            job_counts: BTreeMap::new(),
            timers: BTreeSet::new(),
            retention,
            expiries: BTreeSet::new(),
            fires: FastMap::default(),
            fires_per_job: FastMap::default(),
            fires_per_queue: FastMap::default(),
            overlap_fires: FastMap::default(),
            deadlines: BTreeSet::new(),
            queues: FastMap::default(),
            subscribers: FastMap::default(),
            next_sub_id: 0,
            shutting_down: false,
            timer_dirty: false,
            wakers: Vec::new(),
            timer_busy: false,
            ledgers: FastMap::default(),
            ledger_bounds: Bounds::default(),
            ledger_gone: Vec::new(),
        }
    }

    /// Rebuilds memory from what the store holds: every SCHEDULED job armed at its next due
    /// time, every stored fire waiting on its queue in release order. A job that cannot be
    /// loaded (say its time zone left the time-zone database) is logged and left out, rather
    /// than keeping every other job from running.
    ///
    /// The indexes are built in bulk from sorted lists (a million jobs inserted one by one
    /// spent most of a restart comparing ids while rebalancing the trees).
    pub fn restore(
        snapshot: Snapshot,
        clock: Arc<dyn Clock>,
        retention: Micros,
        ledger_bounds: Bounds,
    ) -> State {
        let mut state = State::new(clock, retention);
        state.ledger_bounds = ledger_bounds;
        let mut entries = Vec::with_capacity(snapshot.jobs.len());
        let mut timers = Vec::new();
        let mut expiries = Vec::new();
        let mut by_queue: FastMap<String, Vec<JobKey>> = FastMap::default();
        for (spec, status) in snapshot.jobs {
            let id = spec.clone();
            let job = match Job::restore(spec, status) {
                Ok(job) => job,
                Err(e) => {
                    error!(job_id = %id.id(), error = %e, "stored job cannot be loaded; it stays in the store but does not fire");
                    continue;
                }
            };
            *state.job_counts.entry(job.status.state).or_default() += 1;
            let id = JobKey(job.spec.clone());
            let timer = job.next_due();
            let expiry = state.expiry_of(&job);
            if let Some(trace) = &job.status.trace {
                state.traces.insert(id.clone(), trace.clone());
            }
            job.spec.hold_status(&job.status);
            job.spec.set_held_timer(timer.is_some());
            job.spec.set_held_expiry(expiry);
            job.spec.set_held(true);
            if let Some(t) = timer {
                timers.push((t, id.clone()));
            }
            if let Some(t) = expiry {
                expiries.push((t, id.clone()));
            }
            match by_queue.get_mut(job.spec.queue()) {
                Some(ids) => ids.push(id.clone()),
                None => {
                    by_queue.insert(job.spec.queue().to_string(), vec![id.clone()]);
                }
            }
            entries.push(id);
        }
        // Collecting into a BTreeMap or BTreeSet sorts the list (the store lists jobs in id
        // order, so it is sorted already) and builds the tree in one pass.
        state.jobs = entries.into_iter().collect();
        state.timers = timers.into_iter().collect();
        state.expiries = expiries.into_iter().collect();
        state.by_queue = by_queue
            .into_iter()
            .map(|(queue, ids)| (queue, ids.into_iter().collect()))
            .collect();
        state.timer_dirty = true;
        let mut fires = snapshot.fires;
        fires.sort_by(|a, b| (a.fire_time, &a.fire_id).cmp(&(b.fire_time, &b.fire_id)));
        for rec in fires {
            let Some(key) = state.jobs.get(rec.job_id.as_bytes()) else {
                error!(fire_id = %rec.fire_id, job_id = %rec.job_id, "stored fire has no job; it is left in the store and not delivered");
                continue;
            };
            let spec = key.0.clone();
            state.insert_fire(rec, spec);
        }
        // A held fire whose job has nothing running any more goes (its release may have been
        // in memory only: the oldest held first).
        let jobs: Vec<JobId> = state.overlap_fires.keys().cloned().collect();
        for job in jobs {
            state.unhold_if_idle(&job);
        }
        // Records of jobs no longer held (deleted before their records were) go from the
        // store; so do records beyond the bounds (they may have changed since).
        // Each job's records are built into its ledger at once (trimmed once, not per record).
        let mut by_job: FastMap<JobKey, Vec<Occurrence>> = FastMap::default();
        for (key, record) in snapshot.occurrences {
            match ledger::job_of_store_key(&key).and_then(|job| state.jobs.get(job.as_bytes())) {
                Some(job) => match by_job.get_mut(job.0.id_bytes()) {
                    Some(records) => records.push(record),
                    None => {
                        by_job.insert(job.clone(), vec![record]);
                    }
                },
                None => state.ledger_gone.push(key),
            }
        }
        let now = state.clock.now();
        for (job, records) in by_job {
            let (l, gone) = JobLedger::from_records(records, ledger_bounds, now);
            state
                .ledger_gone
                .extend(gone.into_iter().map(|k| ledger::store_key(job.id(), k)));
            if !l.is_empty() {
                state.ledgers.insert(job, l);
            }
        }
        state
    }

    /// Drops a deleted job's ledger from memory (the batch that deleted the job deleted its
    /// records from the store). Not part of [`State::remove_job`]: an updated job is removed
    /// and put back.
    pub fn forget_ledger(&mut self, id: &str) {
        self.ledgers.remove(id.as_bytes());
    }

    /// Adds a ledger record of the job `spec` is (or was: an updated job's spec is replaced)
    /// the spec of, sealed at `record.time` (now); records that no longer fit the bounds, and
    /// the record itself when the job is gone, are queued for deletion from the store.
    pub fn record_occurrence(&mut self, spec: &PackedSpec, record: Occurrence) {
        let key = if spec.is_held() {
            JobKey(spec.clone())
        } else {
            match self.jobs.get(spec.id_bytes()) {
                Some(key) => key.clone(),
                None => {
                    self.ledger_gone.push(record.store_key(spec.id()));
                    return;
                }
            }
        };
        let now = record.time;
        let bounds = self.ledger_bounds;
        let gone = match self.ledgers.get_mut(key.0.id_bytes()) {
            Some(l) => l.insert(record, bounds, now),
            None => {
                let (l, gone) = JobLedger::from_records(vec![record], bounds, now);
                if !l.is_empty() {
                    self.ledgers.insert(key.clone(), l);
                }
                gone
            }
        };
        self.ledger_gone
            .extend(gone.into_iter().map(|k| ledger::store_key(key.id(), k)));
    }

    /// Stores a new or changed job, keeps the counts by state, and re-arms its timer and its
    /// deletion. A change of a held job (its spec is the held allocation) needs no search of
    /// the id index; a new job, one insert.
    pub fn put_job(&mut self, job: Job) {
        let want_timer = job.next_due();
        let want_expiry = self.expiry_of(&job);
        let (old_timer, old_expiry) = if job.spec.is_held() {
            let old = held_job(&job.spec);
            if let Some(n) = self.job_counts.get_mut(&old.status.state) {
                *n = n.saturating_sub(1);
            }
            (old_timer(&old), old.spec.held_expiry())
        } else {
            let key = JobKey(job.spec.clone());
            if !self.jobs.insert(key.clone()) {
                // A job's spec never changes while it is held; a new spec under a held id
                // (there is no such path today) replaces the job, so that no index keeps the
                // old spec alive.
                // Its ledger stays, keyed by the new spec (the old one is let go).
                let ledger = self.ledgers.remove(job.spec.id_bytes());
                self.remove_job(job.spec.id());
                let spec = job.spec.clone();
                self.put_job(job);
                if let Some(l) = ledger {
                    self.ledgers.insert(JobKey(spec), l);
                }
                return;
            }
            job.spec.set_held(true);
            match self.by_queue.get_mut(job.spec.queue()) {
                Some(ids) => {
                    ids.insert(key);
                }
                None => {
                    self.by_queue
                        .insert(job.spec.queue().to_string(), BTreeSet::from([key]));
                }
            }
            (None, None)
        };
        *self.job_counts.entry(job.status.state).or_default() += 1;
        if let Some(trace) = &job.status.trace
            && !self.traces.contains_key(job.spec.id_bytes())
        {
            self.traces.insert(JobKey(job.spec.clone()), trace.clone());
        }
        job.spec.hold_status(&job.status);
        job.spec.set_held_timer(want_timer.is_some());
        job.spec.set_held_expiry(want_expiry);
        let id = JobKey(job.spec);
        if rekey(&mut self.timers, old_timer, &id, want_timer) {
            self.timer_dirty = true;
        }
        if rekey(&mut self.expiries, old_expiry, &id, want_expiry) {
            self.timer_dirty = true;
        }
    }

    /// Takes a deleted job out of memory: its entry, its timer, its expiry and its count.
    pub fn remove_job(&mut self, id: &str) {
        let Some(key) = self.jobs.take(id.as_bytes()) else {
            return;
        };
        self.traces.remove(id.as_bytes());
        let job = held_job(&key.0);
        let queue = job.spec.queue();
        if let Some(ids) = self.by_queue.get_mut(queue) {
            ids.remove(id.as_bytes());
            if ids.is_empty() {
                self.by_queue.remove(queue);
            }
        }
        if let Some(t) = old_timer(&job) {
            self.timers.remove(&(t, key.clone()));
        }
        if let Some(t) = job.spec.held_expiry() {
            self.expiries.remove(&(t, key));
        }
        job.spec.set_held_timer(false);
        job.spec.set_held_expiry(None);
        job.spec.set_held(false);
        if let Some(n) = self.job_counts.get_mut(&job.status.state) {
            *n = n.saturating_sub(1);
        }
    }

    /// The job held under `id`, with its status as last applied.
    pub fn job(&self, id: &str) -> Option<Job> {
        self.held(&self.jobs.get(id.as_bytes())?.0)
    }

    /// The job `spec` belongs to, with its status as last applied, if `spec` is the one held
    /// under its id (no search).
    pub fn held(&self, spec: &PackedSpec) -> Option<Job> {
        if !spec.is_held() {
            return None;
        }
        let mut job = held_job(spec);
        if !self.traces.is_empty() {
            job.status.trace = self.traces.get(spec.id_bytes()).cloned();
        }
        Some(job)
    }

    /// When a finished job is deleted: `retention` after it finished (after now for a job
    /// stored before tickd kept finish times).
    fn expiry_of(&self, job: &Job) -> Option<Timestamp> {
        job.status.state.is_final().then(|| {
            job.status
                .finish_time
                .unwrap_or_else(|| self.clock.now())
                .plus(self.retention)
        })
    }

    /// Moves a job's deletion to `at` (none: not to be deleted).
    pub fn set_expiry(&mut self, id: &str, at: Option<Timestamp>) {
        if let Some(key) = self.jobs.get(id.as_bytes()) {
            let old = key.0.held_expiry();
            key.0.set_held_expiry(at);
            if rekey(&mut self.expiries, old, key, at) {
                self.timer_dirty = true;
            }
        }
    }

    /// Fire ids of a job still outstanding (a scan, for the rare job deleted with some).
    pub fn fires_of(&self, job_id: &str) -> Vec<FireId> {
        if self.fires_per_job.get(job_id).is_none_or(|n| *n == 0) {
            return Vec::new();
        }
        self.fires
            .iter()
            .filter(|(_, e)| &*e.rec.job_id == job_id)
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Takes a fire out of memory (after its deletion is stored), wherever it was.
    pub fn remove_fire(&mut self, id: &str) -> Option<FireEntry> {
        self.release(id);
        let entry = self.fires.remove(id)?;
        if !self.overlap_fires.is_empty()
            && let Some(ids) = self.overlap_fires.get_mut(&*entry.rec.job_id)
        {
            ids.retain(|f| **f != *id);
            if ids.is_empty() {
                self.overlap_fires.remove(&*entry.rec.job_id);
            }
        }
        uncount(&mut self.fires_per_job, &*entry.rec.job_id);
        uncount(&mut self.fires_per_queue, entry.rec.queue.as_str());
        Some(entry)
    }

    /// A fire moved from one queue to another (dead-lettering).
    fn count_queue_move(&mut self, from: &str, to: &str) {
        uncount(&mut self.fires_per_queue, from);
        *self.fires_per_queue.entry(to.to_string()).or_default() += 1;
    }

    /// Fires outstanding on `queue`.
    pub fn queue_fires(&self, queue: &str) -> u32 {
        self.fires_per_queue.get(queue).copied().unwrap_or(0)
    }

    /// Puts a job's timer where its status says: armed at its next due time when SCHEDULED,
    /// absent otherwise.
    pub fn sync_timer(&mut self, id: &str) {
        if let Some(key) = self.jobs.get(id.as_bytes()) {
            let job = held_job(&key.0);
            let want = job.next_due();
            let old = old_timer(&job);
            job.spec.set_held_timer(want.is_some());
            if rekey(&mut self.timers, old, key, want) {
                self.timer_dirty = true;
            }
        }
    }

    fn insert_deadline(&mut self, at: Timestamp, fire_id: FireId) {
        let key = (at, fire_id);
        if self.deadlines.first().is_none_or(|first| key < *first) {
            self.timer_dirty = true;
        }
        self.deadlines.insert(key);
    }

    /// Adds a stored fire and makes it deliverable (now, or at its `not_before`).
    pub fn insert_fire(&mut self, rec: FireRecord, spec: PackedSpec) {
        let id = rec.fire_id.clone();
        let not_before = rec.not_before;
        match self.fires.get(&id) {
            None => {
                count_one(&mut self.fires_per_job, &rec.job_id);
                count_one(&mut self.fires_per_queue, rec.queue.as_str());
                if rec.held || !spec.overlap_policy().is_allow() {
                    match self.overlap_fires.get_mut(&rec.job_id) {
                        Some(ids) => ids.push(id.clone()),
                        None => {
                            self.overlap_fires
                                .insert(rec.job_id.clone(), vec![id.clone()]);
                        }
                    }
                }
            }
            Some(old) if old.rec.queue != rec.queue => {
                let from = old.rec.queue.clone();
                self.count_queue_move(&from, &rec.queue);
            }
            Some(_) => {}
        }
        let held = rec.held;
        self.fires.insert(
            id.clone(),
            FireEntry {
                rec,
                spec,
                status: if held {
                    FireStatus::Held
                } else {
                    FireStatus::Pending
                },
            },
        );
        if !held {
            self.make_deliverable(&id, not_before);
        }
    }

    /// Follows every outstanding fire of a job whose overlap policy was ALLOW until now (after
    /// an update: a scan of the fires, for the rare job that has some): fires released under
    /// ALLOW were not followed.
    pub fn track_overlap(&mut self, spec: &PackedSpec) {
        if spec.overlap_policy().is_allow() {
            return;
        }
        let ids = self.fires_of(spec.id());
        if !ids.is_empty() {
            self.overlap_fires.insert(spec.id().into(), ids);
        }
    }

    /// Whether a fire counts as running for its job's overlap policy: released and not yet
    /// acked, dead-lettered or dropped, and not held.
    fn is_running(entry: &FireEntry) -> bool {
        !entry.rec.dead_lettered && !matches!(entry.status, FireStatus::Held | FireStatus::Acked)
    }

    /// The fires of job `id` as its overlap policy sees them (only followed for jobs whose
    /// policy is not ALLOW, or that hold a fire).
    pub fn running_of(&self, id: &str) -> Running {
        let mut r = Running::default();
        for f in self.overlap_fires.get(id).into_iter().flatten() {
            if let Some(e) = self.fires.get(f) {
                if e.status == FireStatus::Held {
                    r.held = true;
                } else if State::is_running(e) {
                    r.running += 1;
                }
            }
        }
        r
    }

    /// The fires of job `id` an overlap REPLACE withdraws (running or held), each with the
    /// deliveries made of it so far.
    pub fn replaceable_of(&self, id: &str) -> Vec<(FireRecord, u32)> {
        self.overlap_fires
            .get(id)
            .into_iter()
            .flatten()
            .filter_map(|f| {
                let e = self.fires.get(f)?;
                let delivered = match e.status {
                    FireStatus::InFlight { .. } | FireStatus::Pending => e.rec.attempt,
                    FireStatus::Held => 0,
                    _ => e.rec.attempt.saturating_sub(1),
                };
                (e.status == FireStatus::Held || State::is_running(e))
                    .then(|| (e.rec.clone(), delivered))
            })
            .collect()
    }

    /// Lets the oldest held fire of job `id` go if no fire of the job runs: it becomes
    /// deliverable. Only in memory: the store keeps it marked held until it is next written,
    /// and a restart lets it go again by the same rule. Returns whether one went.
    pub fn unhold_if_idle(&mut self, id: &str) -> bool {
        let Some(ids) = self.overlap_fires.get(id) else {
            return false;
        };
        let mut oldest: Option<(Timestamp, FireId)> = None;
        for f in ids {
            let Some(e) = self.fires.get(f) else { continue };
            if State::is_running(e) {
                return false;
            }
            if e.status == FireStatus::Held {
                let key = (e.rec.fire_time, e.rec.fire_id.clone());
                if oldest.as_ref().is_none_or(|o| key < *o) {
                    oldest = Some(key);
                }
            }
        }
        let Some((_, fire_id)) = oldest else {
            return false;
        };
        let not_before = match self.fires.get_mut(&fire_id) {
            Some(e) => {
                e.rec.held = false;
                e.status = FireStatus::Pending;
                e.rec.not_before
            }
            None => return false,
        };
        self.make_deliverable(&fire_id, not_before);
        true
    }

    /// Moves a fire to `Ready` at the back of its queue (waking a subscriber), or to `Delayed`
    /// until `not_before`.
    fn make_deliverable(&mut self, id: &str, not_before: Option<Timestamp>) {
        let Some(entry) = self.fires.get_mut(id) else {
            return;
        };
        let now = self.clock.now();
        match not_before {
            Some(t) if t > now => {
                // Stored as wall time (it must survive a restart); waited for on steady time.
                let at = self.clock.steady_now().plus(t.since(now));
                entry.status = FireStatus::Delayed(at);
                let id = entry.rec.fire_id.clone();
                self.insert_deadline(at, id);
            }
            _ => {
                entry.status = FireStatus::Ready;
                let queue = entry.rec.queue.as_str();
                let id = entry.rec.fire_id.clone();
                match self.queues.get_mut(queue) {
                    Some(q) => q.ready.push_back(id),
                    None => {
                        let mut q = QueueState::default();
                        q.ready.push_back(id);
                        self.queues.insert(queue.to_string(), q);
                    }
                }
                let queue = entry.rec.queue.clone();
                self.wake_queue(&queue);
            }
        }
    }

    /// Wakes the waiting subscribers of `queue` that have room, if it has ready fires.
    pub fn wake_queue(&mut self, queue: &str) {
        let Some(q) = self.queues.get(queue) else {
            return;
        };
        if q.ready.is_empty() {
            return;
        }
        for sub_id in &q.subs {
            if let Some(sub) = self.subscribers.get_mut(sub_id)
                && sub.in_flight.len() < sub.max_in_flight
                && let Some(waker) = sub.waker.take()
            {
                self.wakers.push(waker);
            }
        }
    }

    /// Hands the oldest ready fire of the subscriber's queue to it, if it has room. `Ready(None)`
    /// once the subscription is gone (the stream ends); `Pending` with the waker stored when
    /// there is nothing for it now.
    pub fn poll_delivery(&mut self, sub_id: SubId, waker: &Waker) -> Poll<Option<Delivery>> {
        let Some(sub) = self.subscribers.get_mut(&sub_id) else {
            return Poll::Ready(None);
        };
        if sub.in_flight.len() < sub.max_in_flight
            && let Some(q) = self.queues.get_mut(&sub.queue)
        {
            while let Some(fire_id) = q.ready.pop_front() {
                let Some(entry) = self.fires.get_mut(&fire_id) else {
                    continue;
                };
                if entry.status != FireStatus::Ready {
                    continue;
                }
                let deadline = self.clock.steady_now().plus(entry.spec.ack_deadline());
                entry.status = FireStatus::InFlight {
                    sub: sub_id,
                    deadline,
                };
                sub.in_flight.insert(fire_id.clone());
                let delivery = Delivery {
                    fire: entry.rec.clone(),
                    spec: entry.spec.clone(),
                    ack_deadline: self.clock.now().plus(entry.spec.ack_deadline()),
                };
                self.insert_deadline(deadline, fire_id);
                return Poll::Ready(Some(delivery));
            }
        }
        sub.waker = Some(waker.clone());
        Poll::Pending
    }

    /// Takes a fire off whatever holds it (a subscriber slot, the deadline index), leaving its
    /// status to the caller. Wakes the subscribers of a queue that got room.
    pub fn release(&mut self, id: &str) {
        let Some(entry) = self.fires.get(id) else {
            return;
        };
        let owned = entry.rec.fire_id.clone();
        match entry.status {
            FireStatus::InFlight { sub, deadline } => {
                self.deadlines.remove(&(deadline, owned));
                if let Some(s) = self.subscribers.get_mut(&sub) {
                    s.in_flight.remove(id);
                    let queue = s.queue.clone();
                    self.wake_queue(&queue);
                }
            }
            FireStatus::Delayed(t) => {
                self.deadlines.remove(&(t, owned));
            }
            FireStatus::Ready | FireStatus::Pending | FireStatus::Acked | FireStatus::Held => {}
        }
    }

    /// Marks fires of `queue` acked in memory, wherever they are in their delivery. Returns the
    /// ids whose deletion must be written: first those newly acked, then those already acked
    /// whose deletion is still being written (a retried ack waits for that write too).
    pub fn mark_acked(&mut self, ids: &[String], queue: &str) -> (Vec<FireId>, Vec<FireId>) {
        let mut newly = Vec::new();
        let mut already = Vec::new();
        for id in ids {
            let Some(entry) = self.fires.get(id.as_str()) else {
                continue;
            };
            let id = entry.rec.fire_id.clone();
            // An acked fire whose deletion is still being written counts whatever queue it is
            // on by now (a dead-lettering may have moved it meanwhile).
            if entry.status == FireStatus::Acked {
                already.push(id);
                continue;
            }
            // Never delivered: not the worker's to ack.
            if entry.status == FireStatus::Held {
                continue;
            }
            if entry.rec.queue != queue {
                continue;
            }
            self.release(&id);
            if let Some(entry) = self.fires.get_mut(&id) {
                entry.status = FireStatus::Acked;
            }
            newly.push(id);
        }
        (newly, already)
    }

    /// Takes fires in flight on `sub` back for redelivery: they become `Pending`.
    pub fn take_back(&mut self, ids: &[String], sub: SubId) -> Vec<FireId> {
        let mut taken = Vec::new();
        for id in ids {
            let Some(entry) = self.fires.get(id.as_str()) else {
                continue;
            };
            if matches!(entry.status, FireStatus::InFlight { sub: s, .. } if s == sub) {
                let id = entry.rec.fire_id.clone();
                self.release(&id);
                if let Some(e) = self.fires.get_mut(&id) {
                    e.status = FireStatus::Pending;
                }
                taken.push(id);
            }
        }
        taken
    }

    /// Collects what is due at `now`: up to `max_jobs` jobs (taken out of the timer index),
    /// expired deadlines (fires become `Pending`) and delayed fires whose time has come (they
    /// become ready).
    pub fn take_due(&mut self, now: Timestamp, steady: Timestamp, max_jobs: usize) -> DueWork {
        let mut work = DueWork::default();
        while work.jobs.len() < max_jobs {
            let Some((due, id)) = self.timers.first().cloned() else {
                break;
            };
            if due > now {
                break;
            }
            self.timers.pop_first();
            if id.0.is_held() {
                id.0.set_held_timer(false);
                if let Some(o) = id.0.held_status().next_occurrence {
                    work.jobs.push((id, o));
                }
            }
        }
        while let Some((t, id)) = self.deadlines.first().cloned() {
            if t > steady {
                break;
            }
            self.deadlines.pop_first();
            let Some(entry) = self.fires.get_mut(&id) else {
                continue;
            };
            match entry.status {
                FireStatus::InFlight { sub, deadline } if deadline == t => {
                    entry.status = FireStatus::Pending;
                    if let Some(s) = self.subscribers.get_mut(&sub) {
                        s.in_flight.remove(&id);
                        let queue = s.queue.clone();
                        self.wake_queue(&queue);
                    }
                    work.expired.push(id);
                }
                FireStatus::Delayed(at) if at == t => self.make_deliverable(&id, None),
                _ => {}
            }
        }
        while work.retired.len() < max_jobs {
            let Some((t, id)) = self.expiries.first().cloned() else {
                break;
            };
            if t > now {
                break;
            }
            self.expiries.pop_first();
            if id.0.is_held() {
                id.0.set_held_expiry(None);
                work.retired.push(id);
            }
        }
        work.next_wake = [
            self.timers.first().map(|(t, _)| *t),
            // A steady deadline, as the wall time it is this far from now.
            self.deadlines
                .first()
                .map(|(t, _)| now.plus(t.since(steady))),
            self.expiries.first().map(|(t, _)| *t),
        ]
        .into_iter()
        .flatten()
        .min();
        if work.jobs.len() == max_jobs || work.retired.len() == max_jobs {
            work.next_wake = Some(now);
        }
        self.timer_busy =
            !work.jobs.is_empty() || !work.expired.is_empty() || !work.retired.is_empty();
        work
    }

    /// Whether nothing in the timer or deadline indexes is due at `now`, and the timer loop
    /// holds no work it took earlier.
    pub fn idle_at(&self, now: Timestamp, steady: Timestamp) -> bool {
        !self.timer_busy
            && self.timers.first().is_none_or(|(t, _)| *t > now)
            && self.deadlines.first().is_none_or(|(t, _)| *t > steady)
            && self.expiries.first().is_none_or(|(t, _)| *t > now)
    }

    /// Applies a committed fire update (redelivery or dead-lettering): the fire becomes
    /// deliverable again unless it was acked while the update was being written.
    pub fn apply_fire_update(&mut self, rec: FireRecord) {
        let id = rec.fire_id.clone();
        let Some(entry) = self.fires.get_mut(&id) else {
            return;
        };
        let pending = entry.status == FireStatus::Pending;
        let not_before = rec.not_before;
        let moved =
            (entry.rec.queue != rec.queue).then(|| (entry.rec.queue.clone(), rec.queue.clone()));
        entry.rec = rec;
        if let Some((from, to)) = moved {
            self.count_queue_move(&from, &to);
        }
        if pending {
            self.make_deliverable(&id, not_before);
        }
    }

    /// Puts a `Pending` fire back in line when its redelivery could not be written: with the
    /// delay that was decided (so a nack delay or backoff still holds), but without the
    /// attempt, which is not stored.
    pub fn requeue_unwritten(&mut self, id: &str, not_before: Option<Timestamp>) {
        if self
            .fires
            .get(id)
            .is_some_and(|e| e.status == FireStatus::Pending)
        {
            self.make_deliverable(id, not_before);
        }
    }

    /// Registers a subscriber on `queue`.
    pub fn add_subscriber(&mut self, queue: &str, max_in_flight: usize) -> SubId {
        self.next_sub_id += 1;
        let id = self.next_sub_id;
        self.subscribers.insert(
            id,
            Subscriber {
                queue: queue.to_string(),
                max_in_flight,
                in_flight: FastSet::default(),
                waker: None,
            },
        );
        self.queues
            .entry(queue.to_string())
            .or_default()
            .subs
            .push(id);
        id
    }

    /// Removes a subscriber and wakes its stream (which then ends). Returns the fires it held,
    /// now `Pending`, oldest first.
    /// Removes a subscriber whose stream went away, leaving the fires it held in flight until
    /// their deadlines.
    pub fn detach_subscriber(&mut self, id: SubId) {
        self.unlink_subscriber(id);
    }

    /// Takes a subscriber out of the tables (waking its stream so that it ends).
    fn unlink_subscriber(&mut self, id: SubId) -> Option<Subscriber> {
        let mut sub = self.subscribers.remove(&id)?;
        if let Some(waker) = sub.waker.take() {
            self.wakers.push(waker);
        }
        if let Some(q) = self.queues.get_mut(&sub.queue) {
            q.subs.retain(|s| *s != id);
            if q.subs.is_empty() && q.ready.is_empty() {
                self.queues.remove(&sub.queue);
            }
        }
        Some(sub)
    }

    /// Removes a subscriber at shutdown and returns the fires it held, oldest first, now
    /// `Pending` (off the deadline index).
    fn remove_subscriber(&mut self, id: SubId) -> Vec<FireId> {
        let Some(sub) = self.unlink_subscriber(id) else {
            return Vec::new();
        };
        let mut held = Vec::new();
        for fire_id in sub.in_flight {
            if let Some(entry) = self.fires.get_mut(&fire_id)
                && let FireStatus::InFlight { deadline, .. } = entry.status
            {
                self.deadlines.remove(&(deadline, fire_id.clone()));
                entry.status = FireStatus::Pending;
                held.push((entry.rec.fire_time, fire_id));
            }
        }
        held.sort();
        held.into_iter().map(|(_, id)| id).collect()
    }

    /// Ends every subscription: their streams end, and fires they held go back to the front
    /// of their queues in their original order, without counting an attempt (the worker did
    /// nothing wrong).
    pub fn close_all_subscribers(&mut self) {
        let subs: Vec<SubId> = self.subscribers.keys().copied().collect();
        for id in subs {
            for fire_id in self.remove_subscriber(id).into_iter().rev() {
                if let Some(entry) = self.fires.get_mut(&fire_id) {
                    entry.status = FireStatus::Ready;
                    self.queues
                        .entry(entry.rec.queue.clone())
                        .or_default()
                        .ready
                        .push_front(fire_id);
                }
            }
        }
    }

    /// Moves the deadline of fires in flight on `sub` to `deadline`.
    pub fn extend(&mut self, ids: &[String], sub: SubId, deadline: Timestamp) {
        for id in ids {
            let Some(entry) = self.fires.get_mut(id.as_str()) else {
                continue;
            };
            if let FireStatus::InFlight {
                sub: s,
                deadline: old,
            } = entry.status
                && s == sub
            {
                entry.status = FireStatus::InFlight { sub, deadline };
                let id = entry.rec.fire_id.clone();
                self.deadlines.remove(&(old, id.clone()));
                self.insert_deadline(deadline, id);
            }
        }
    }
}

/// Moves `id`'s key in `index` from `old` to `want` (none: out of the index). True when the
/// new key is the earliest of the index, so the timer loop must look again.
fn rekey(
    index: &mut BTreeSet<(Timestamp, JobKey)>,
    old: Option<Timestamp>,
    id: &JobKey,
    want: Option<Timestamp>,
) -> bool {
    if old == want {
        return false;
    }
    if let Some(old) = old {
        index.remove(&(old, id.clone()));
    }
    let Some(t) = want else {
        return false;
    };
    index.insert((t, id.clone()));
    index.first().is_some_and(|(first, _)| *first == t)
}

/// A held job: its spec and the status kept in it (without its trace context: see
/// [`State::job`]).
fn held_job(spec: &PackedSpec) -> Job {
    Job {
        spec: spec.clone(),
        status: spec.held_status(),
    }
}

/// A held job's key in the timer index, if it is in it: the next due time of its held status
/// (the key is always put in at that time, with that status, and taken out before either
/// changes).
fn old_timer(held: &Job) -> Option<Timestamp> {
    if held.spec.held_timer() {
        held.next_due()
    } else {
        None
    }
}

/// Counts one more for `key` (copying it only when it is new).
fn count_one<K, Q>(counts: &mut FastMap<K, u32>, key: &Q)
where
    K: std::borrow::Borrow<Q> + std::hash::Hash + Eq,
    Q: std::hash::Hash + Eq + ToOwned<Owned = K> + ?Sized,
{
    match counts.get_mut(key) {
        Some(n) => *n += 1,
        None => {
            counts.insert(key.to_owned(), 1);
        }
    }
}

/// Counts one fewer for `key`, forgetting it at zero.
fn uncount<K, Q>(counts: &mut FastMap<K, u32>, key: &Q)
where
    K: std::borrow::Borrow<Q> + std::hash::Hash + Eq,
    Q: std::hash::Hash + Eq + ?Sized,
{
    if let Some(n) = counts.get_mut(key) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            counts.remove(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheduler::ManualClock;
    use crate::store::contract::{spec, status};

    /// Restoring builds the same memory as putting each job in turn (the path every change
    /// takes), for jobs in every state, on several queues, listed in any order.
    #[test]
    fn restore_builds_what_putting_each_job_builds() {
        let clock: Arc<dyn Clock> = Arc::new(ManualClock::new(Timestamp(1_000)));
        let mut jobs = Vec::new();
        for i in (0..60).rev() {
            let mut spec = spec(&format!("job-{i:02}"));
            spec.queue = ["a", "b", "c"][i % 3].to_string();
            let mut status = status(
                [
                    JobState::Scheduled,
                    JobState::Paused,
                    JobState::Completed,
                    JobState::Cancelled,
                ][i % 4],
            );
            status.next_occurrence = status
                .state
                .eq(&JobState::Scheduled)
                .then_some(Timestamp(i as i64 * 7 % 20));
            status.finish_time = status.state.is_final().then_some(Timestamp(i as i64));
            status.trace = (i % 5 == 0).then(|| {
                Box::new(TraceContext {
                    traceparent: format!("trace-{i}"),
                    tracestate: String::new(),
                })
            });
            jobs.push((spec, status));
        }
        let restored = State::restore(
            Snapshot {
                jobs: jobs
                    .iter()
                    .map(|(spec, status)| (PackedSpec::new(spec), status.clone()))
                    .collect(),
                fires: Vec::new(),
                occurrences: Vec::new(),
            },
            clock.clone(),
            500,
            Bounds::default(),
        );
        let mut put = State::new(clock, 500);
        for (spec, status) in jobs {
            put.put_job(Job::restore(PackedSpec::new(&spec), status).expect("job"));
        }
        let view = |s: &State| {
            (
                s.jobs
                    .iter()
                    .map(|k| {
                        (
                            k.clone(),
                            k.0.is_held(),
                            k.0.held_timer(),
                            k.0.held_expiry(),
                            s.job(k.id()).map(|j| j.status),
                        )
                    })
                    .collect::<Vec<_>>(),
                s.traces.len(),
                s.timers.clone(),
                s.expiries.clone(),
                s.by_queue
                    .iter()
                    .map(|(q, ids)| (q.clone(), ids.clone()))
                    .collect::<BTreeMap<_, _>>(),
                s.job_counts.clone(),
            )
        };
        assert_eq!(view(&restored), view(&put));
        assert_eq!(restored.jobs.len(), 60);
        assert_eq!(restored.timers.len(), 15);
        assert_eq!(restored.expiries.len(), 30);
        assert_eq!(restored.traces.len(), 12);
        assert_eq!(
            restored.job("job-05").and_then(|j| j.status.trace),
            Some(Box::new(TraceContext {
                traceparent: "trace-5".into(),
                tracestate: String::new(),
            }))
        );
        for i in 0..60 {
            put.remove_job(&format!("job-{i:02}"));
        }
        assert!(put.traces.is_empty() && put.jobs.is_empty());
    }

    /// The timer and retention indexes hold exactly one key for each job armed in them, at
    /// the time its held status says, through every change a job goes through; a removed job
    /// leaves no key behind (a stale key would keep its spec in memory and wake the timer).
    #[test]
    fn the_indexes_follow_every_change_of_a_held_job() {
        let clock: Arc<dyn Clock> = Arc::new(ManualClock::new(Timestamp(1_000)));
        let mut state = State::new(clock, 500);
        let check = |state: &State| {
            let mut timers = BTreeSet::new();
            let mut expiries = BTreeSet::new();
            for key in &state.jobs {
                let job = held_job(&key.0);
                if key.0.held_timer() {
                    timers.insert((job.next_due().expect("armed job is due"), key.clone()));
                }
                if let Some(t) = key.0.held_expiry() {
                    expiries.insert((t, key.clone()));
                }
            }
            assert_eq!(state.timers, timers);
            assert_eq!(state.expiries, expiries);
            assert!(state.jobs.iter().all(|k| k.0.is_held()));
        };
        let mut jobs = Vec::new();
        for i in 0..4 {
            let mut s = spec(&format!("job-{i}"));
            s.trigger = crate::domain::TriggerSpec::Every {
                period: 10,
                start_time: None,
                jitter: 7,
            };
            let job = Job::create(s, Timestamp(1_000)).expect("job");
            state.put_job(job.clone());
            jobs.push(job);
            check(&state);
        }
        // The next occurrence moves on (as a release does), then the job pauses and resumes.
        let mut job = jobs[0].clone();
        job.status.next_occurrence = job.status.next_occurrence.map(|t| t.plus(10));
        state.put_job(job.clone());
        check(&state);
        job.status.state = JobState::Paused;
        state.put_job(job.clone());
        check(&state);
        job.status.state = JobState::Scheduled;
        state.put_job(job.clone());
        check(&state);
        // Taken by the timer loop, then armed again without a change.
        let work = state.take_due(Timestamp(5_000), Timestamp(5_000), 2);
        assert_eq!(work.jobs.len(), 2);
        check(&state);
        for (key, _) in &work.jobs {
            state.sync_timer(key.id());
            check(&state);
        }
        // Finished, kept for retention, kept longer, then deleted.
        let mut done = jobs[1].clone();
        done.status.state = JobState::Completed;
        done.status.next_occurrence = None;
        done.status.finish_time = Some(Timestamp(2_000));
        state.put_job(done);
        check(&state);
        state.set_expiry("job-1", Some(Timestamp(9_000)));
        check(&state);
        for id in ["job-1", "job-2"] {
            state.remove_job(id);
            check(&state);
        }
        assert_eq!(state.jobs.len(), 2);
        assert!(state.timers.iter().all(|(_, k)| state.jobs.contains(k)));
        // A removed job's spec no longer says it is held (a change put with it is a new job).
        let held: Vec<bool> = jobs.iter().map(|j| j.spec.is_held()).collect();
        assert_eq!(held, vec![true, false, false, true]);
        assert!(state.held(&jobs[1].spec).is_none());
        assert!(state.held(&jobs[3].spec).is_some());
    }

    /// A job put under a held id with a new spec replaces the old one everywhere: no index
    /// keeps the old spec (its queue, its timer) once the new one is in.
    #[test]
    fn a_new_spec_under_a_held_id_replaces_the_job() {
        let clock: Arc<dyn Clock> = Arc::new(ManualClock::new(Timestamp(1_000)));
        let mut state = State::new(clock, 500);
        let mut first = spec("a");
        first.queue = "old".into();
        let mut status = status(JobState::Scheduled);
        status.next_occurrence = Some(Timestamp(10));
        let first = PackedSpec::new(&first);
        state.put_job(Job::restore(first.clone(), status.clone()).expect("job"));
        let mut second = spec("a");
        second.queue = "new".into();
        status.next_occurrence = Some(Timestamp(20));
        let second = PackedSpec::new(&second);
        state.put_job(Job::restore(second.clone(), status).expect("job"));

        assert_eq!(state.jobs.len(), 1);
        assert!(state.job("a").is_some_and(|j| j.spec.ptr_eq(&second)));
        assert!(!state.by_queue.contains_key("old"));
        assert_eq!(state.by_queue["new"].len(), 1);
        let timers: Vec<_> = state.timers.iter().map(|(t, k)| (*t, k.id())).collect();
        assert_eq!(timers, vec![(Timestamp(20), "a")]);
        assert!(state.timers.iter().all(|(_, k)| k.0.ptr_eq(&second)));
        assert_eq!(state.job_counts[&JobState::Scheduled], 1);
        assert!(!first.is_held() && second.is_held());
    }
}
