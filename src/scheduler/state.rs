//! The scheduler's memory: jobs, the timer index, fires and their delivery state, queues and
//! subscribers. Everything here can be rebuilt from the store ([`State::restore`]); the only
//! things that live in memory alone are which subscriber holds which fire and until when.
//!
//! This is where a fire waits (a queue's `ready` list or the `deadlines` index) and where it is
//! handed to a subscriber ([`State::dispatch`]). Guarded by one std mutex in `Inner`; never held
//! across an `.await`. Nothing here does I/O or blocks: a full or closed subscriber channel is
//! noticed with `try_send`, never waited on.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;

use tokio::sync::mpsc;
use tracing::{error, warn};

use super::clock::Clock;
use crate::domain::{FireRecord, Job, JobId, JobSpec, Timestamp};
use crate::store::Snapshot;

/// Identifies one Subscribe stream.
pub(crate) type SubId = u64;

/// A fire as handed to a subscriber.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub fire: FireRecord,
    pub spec: Arc<JobSpec>,
    pub ack_deadline: Timestamp,
}

/// Where a fire is in its delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FireStatus {
    /// On its queue's ready list, waiting for a subscriber with room.
    Ready,
    /// Waiting in `deadlines` until it may be delivered (nack delay or backoff).
    Delayed(Timestamp),
    /// Held by a subscriber until the deadline (also in `deadlines`).
    InFlight { sub: SubId, deadline: Timestamp },
    /// Its redelivery is being written; not deliverable until that commit applies.
    Pending,
    /// Acked; its deletion is being written.
    Acked,
}

#[derive(Debug)]
pub(crate) struct FireEntry {
    pub rec: FireRecord,
    pub spec: Arc<JobSpec>,
    pub status: FireStatus,
}

#[derive(Debug)]
pub(crate) struct JobEntry {
    pub job: Job,
    /// The key of this job in `timers`, when it is in there.
    pub timer: Option<Timestamp>,
}

#[derive(Debug, Default)]
pub(crate) struct QueueState {
    /// Fires waiting for a subscriber, oldest first. May hold ids whose status has moved on;
    /// those are skipped when popped.
    pub ready: VecDeque<String>,
    pub subs: Vec<SubId>,
    /// Round-robin cursor into `subs`.
    pub next_sub: usize,
}

#[derive(Debug)]
pub(crate) struct Subscriber {
    pub queue: String,
    pub max_in_flight: usize,
    pub in_flight: HashSet<String>,
    pub tx: mpsc::Sender<Delivery>,
    /// Set when the stream's receiver is gone: it takes nothing more.
    pub closed: bool,
}

impl Subscriber {
    fn has_room(&self) -> bool {
        !self.closed && self.in_flight.len() < self.max_in_flight
    }
}

/// What the timer loop found due in one pass.
#[derive(Debug, Default)]
pub(crate) struct DueWork {
    /// Jobs whose next occurrence is due, with that occurrence (taken out of `timers`).
    pub jobs: Vec<(JobId, Timestamp)>,
    /// Fires whose ack deadline passed; now `Pending`, to be redelivered.
    pub expired: Vec<String>,
    /// When the loop should look again, if anything is waiting.
    pub next_wake: Option<Timestamp>,
}

#[derive(Debug)]
pub(crate) struct State {
    pub clock: Arc<dyn Clock>,
    pub jobs: BTreeMap<JobId, JobEntry>,
    /// (due time, job id) of every SCHEDULED job with a next occurrence.
    pub timers: BTreeSet<(Timestamp, JobId)>,
    pub fires: HashMap<String, FireEntry>,
    /// (time, fire id) of in-flight ack deadlines and delayed redeliveries.
    pub deadlines: BTreeSet<(Timestamp, String)>,
    pub queues: HashMap<String, QueueState>,
    pub subscribers: HashMap<SubId, Subscriber>,
    pub next_sub_id: SubId,
    pub shutting_down: bool,
}

impl State {
    pub fn new(clock: Arc<dyn Clock>) -> State {
        State {
            clock,
            jobs: BTreeMap::new(),
            timers: BTreeSet::new(),
            fires: HashMap::new(),
            deadlines: BTreeSet::new(),
            queues: HashMap::new(),
            subscribers: HashMap::new(),
            next_sub_id: 0,
            shutting_down: false,
        }
    }

    /// Rebuilds memory from what the store holds: every SCHEDULED job armed at its next due
    /// time, every stored fire waiting on its queue in release order.
    pub fn restore(snapshot: Snapshot, clock: Arc<dyn Clock>) -> Result<State, String> {
        let mut state = State::new(clock);
        for (spec, status) in snapshot.jobs {
            let id = spec.id.clone();
            let job = Job::restore(Arc::new(spec), status)
                .map_err(|e| format!("stored job {id} cannot be loaded: {e}"))?;
            state.jobs.insert(id.clone(), JobEntry { job, timer: None });
            state.sync_timer(&id);
        }
        let mut fires = snapshot.fires;
        fires.sort_by(|a, b| (a.fire_time, &a.fire_id).cmp(&(b.fire_time, &b.fire_id)));
        for rec in fires {
            let Some(entry) = state.jobs.get(&rec.job_id) else {
                error!(fire_id = %rec.fire_id, job_id = %rec.job_id, "stored fire has no job; it is left in the store and not delivered");
                continue;
            };
            let spec = entry.job.spec.clone();
            state.insert_fire(rec, spec);
        }
        Ok(state)
    }

    /// Puts a job's timer where its status says: armed at its next due time when SCHEDULED,
    /// absent otherwise. Returns true when it became the earliest timer.
    pub fn sync_timer(&mut self, id: &JobId) -> bool {
        let Some(entry) = self.jobs.get_mut(id) else {
            return false;
        };
        let want = entry.job.next_due();
        if entry.timer == want {
            return false;
        }
        if let Some(old) = entry.timer.take() {
            self.timers.remove(&(old, id.clone()));
        }
        match want {
            Some(due) => {
                entry.timer = Some(due);
                self.timers.insert((due, id.clone()));
                self.timers.first().is_some_and(|(t, _)| *t == due)
            }
            None => false,
        }
    }

    /// Adds a stored fire and makes it deliverable (now, or at its `not_before`).
    pub fn insert_fire(&mut self, rec: FireRecord, spec: Arc<JobSpec>) {
        let id = rec.fire_id.clone();
        let queue = rec.queue.clone();
        let not_before = rec.not_before;
        self.fires.insert(
            id.clone(),
            FireEntry {
                rec,
                spec,
                status: FireStatus::Pending,
            },
        );
        self.make_deliverable(&id, not_before);
        self.dispatch(&queue);
    }

    /// Moves a fire to `Ready` on its queue, or to `Delayed` until `not_before`.
    fn make_deliverable(&mut self, id: &str, not_before: Option<Timestamp>) {
        let Some(entry) = self.fires.get_mut(id) else {
            return;
        };
        match not_before {
            Some(t) if t > Timestamp::MIN => {
                entry.status = FireStatus::Delayed(t);
                self.deadlines.insert((t, id.to_string()));
            }
            _ => {
                entry.status = FireStatus::Ready;
                self.queues
                    .entry(entry.rec.queue.clone())
                    .or_default()
                    .ready
                    .push_back(id.to_string());
            }
        }
    }

    /// Hands ready fires of `queue` to its subscribers, round robin, while any has room.
    /// Returns true when a new deadline became the earliest one.
    pub fn dispatch(&mut self, queue: &str) -> bool {
        let mut earliest_changed = false;
        let Some(q) = self.queues.get_mut(queue) else {
            return false;
        };
        while !q.ready.is_empty() && !q.subs.is_empty() {
            // Find a subscriber with room, starting at the round-robin cursor.
            let n = q.subs.len();
            let Some(pos) = (0..n).map(|i| (q.next_sub + i) % n).find(|&i| {
                self.subscribers
                    .get(&q.subs[i])
                    .is_some_and(|s| s.has_room())
            }) else {
                break;
            };
            let sub_id = q.subs[pos];
            // Find the oldest fire that is still ready.
            let Some(fire_id) = std::iter::from_fn(|| q.ready.pop_front()).find(|id| {
                self.fires
                    .get(id)
                    .is_some_and(|f| f.status == FireStatus::Ready)
            }) else {
                break;
            };
            let (Some(entry), Some(sub)) = (
                self.fires.get_mut(&fire_id),
                self.subscribers.get_mut(&sub_id),
            ) else {
                break;
            };
            let now = self.clock.now();
            let deadline = now.plus(entry.spec.ack_deadline);
            let delivery = Delivery {
                fire: entry.rec.clone(),
                spec: entry.spec.clone(),
                ack_deadline: deadline,
            };
            match sub.tx.try_send(delivery) {
                Ok(()) => {
                    entry.status = FireStatus::InFlight {
                        sub: sub_id,
                        deadline,
                    };
                    sub.in_flight.insert(fire_id.clone());
                    let key = (deadline, fire_id);
                    earliest_changed |= self.deadlines.first().is_none_or(|f| key < *f);
                    self.deadlines.insert(key);
                    q.next_sub = (pos + 1) % n;
                }
                Err(e) => {
                    // The stream is gone (or, against our accounting, full): keep the fire
                    // first in line and stop giving this subscriber work.
                    if matches!(e, mpsc::error::TrySendError::Full(_)) {
                        warn!(
                            queue,
                            sub_id, "subscriber channel full despite room; closing it"
                        );
                    }
                    sub.closed = true;
                    q.ready.push_front(fire_id);
                }
            }
        }
        earliest_changed
    }

    /// Takes a fire off whatever holds it (a subscriber slot, the deadline index), leaving its
    /// status to the caller. Returns the queue whose subscriber got room, if any.
    pub fn release(&mut self, id: &str) -> Option<String> {
        let entry = self.fires.get(id)?;
        match entry.status {
            FireStatus::InFlight { sub, deadline } => {
                self.deadlines.remove(&(deadline, id.to_string()));
                let s = self.subscribers.get_mut(&sub)?;
                s.in_flight.remove(id);
                Some(s.queue.clone())
            }
            FireStatus::Delayed(t) => {
                self.deadlines.remove(&(t, id.to_string()));
                None
            }
            FireStatus::Ready | FireStatus::Pending | FireStatus::Acked => None,
        }
    }

    /// Marks fires acked (in memory) and returns those that were pending, for the store to
    /// delete, plus the queues that got room. `queue` restricts the ack to fires of one queue;
    /// `sub` to fires in flight on one stream.
    pub fn mark_acked(
        &mut self,
        ids: &[String],
        queue: Option<&str>,
        sub: Option<SubId>,
    ) -> (Vec<String>, Vec<String>) {
        let mut acked = Vec::new();
        let mut freed = Vec::new();
        for id in ids {
            let Some(entry) = self.fires.get(id) else {
                continue;
            };
            if entry.status == FireStatus::Acked
                || queue.is_some_and(|q| q != entry.rec.queue)
                || sub.is_some_and(
                    |s| !matches!(entry.status, FireStatus::InFlight { sub, .. } if sub == s),
                )
            {
                continue;
            }
            if let Some(q) = self.release(id) {
                freed.push(q);
            }
            if let Some(entry) = self.fires.get_mut(id) {
                entry.status = FireStatus::Acked;
            }
            acked.push(id.clone());
        }
        (acked, freed)
    }

    /// Takes fires in flight on `sub` back for redelivery: they become `Pending`.
    pub fn take_back(&mut self, ids: &[String], sub: SubId) -> Vec<String> {
        let mut taken = Vec::new();
        for id in ids {
            let held = self.fires.get(id).is_some_and(
                |e| matches!(e.status, FireStatus::InFlight { sub: s, .. } if s == sub),
            );
            if held {
                self.release(id);
                if let Some(e) = self.fires.get_mut(id) {
                    e.status = FireStatus::Pending;
                }
                taken.push(id.clone());
            }
        }
        taken
    }

    /// Collects what is due at `now`: up to `max_jobs` jobs (taken out of the timer index),
    /// expired deadlines (fires become `Pending`) and delayed fires whose time has come (they
    /// become ready and are dispatched).
    pub fn take_due(&mut self, now: Timestamp, max_jobs: usize) -> DueWork {
        let mut work = DueWork::default();
        while work.jobs.len() < max_jobs {
            let Some((due, id)) = self.timers.first().cloned() else {
                break;
            };
            if due > now {
                break;
            }
            self.timers.pop_first();
            if let Some(entry) = self.jobs.get_mut(&id) {
                entry.timer = None;
                if let Some(o) = entry.job.status.next_occurrence {
                    work.jobs.push((id, o));
                }
            }
        }
        let mut wake_queues = HashSet::new();
        while let Some((t, id)) = self.deadlines.first().cloned() {
            if t > now {
                break;
            }
            self.deadlines.pop_first();
            let Some(entry) = self.fires.get_mut(&id) else {
                continue;
            };
            match entry.status {
                FireStatus::InFlight { sub, .. } => {
                    entry.status = FireStatus::Pending;
                    if let Some(s) = self.subscribers.get_mut(&sub) {
                        s.in_flight.remove(&id);
                        wake_queues.insert(s.queue.clone());
                    }
                    work.expired.push(id);
                }
                FireStatus::Delayed(_) => {
                    wake_queues.insert(entry.rec.queue.clone());
                    self.make_deliverable(&id, None);
                }
                FireStatus::Ready | FireStatus::Pending | FireStatus::Acked => {}
            }
        }
        for q in wake_queues {
            self.dispatch(&q);
        }
        work.next_wake = match (self.timers.first(), self.deadlines.first()) {
            (Some((a, _)), Some((b, _))) => Some((*a).min(*b)),
            (Some((a, _)), None) => Some(*a),
            (None, Some((b, _))) => Some(*b),
            (None, None) => None,
        };
        if work.jobs.len() == max_jobs {
            work.next_wake = Some(now);
        }
        work
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
        let queue = rec.queue.clone();
        entry.rec = rec;
        if pending {
            self.make_deliverable(&id, not_before);
            self.dispatch(&queue);
        }
    }

    /// Puts a `Pending` fire back in line unchanged (its redelivery could not be written).
    pub fn requeue_unchanged(&mut self, id: &str) {
        let Some(entry) = self.fires.get(id) else {
            return;
        };
        if entry.status == FireStatus::Pending {
            let queue = entry.rec.queue.clone();
            self.make_deliverable(id, None);
            self.dispatch(&queue);
        }
    }

    /// Registers a subscriber on `queue` and gives it work at once.
    pub fn add_subscriber(
        &mut self,
        queue: &str,
        max_in_flight: usize,
        tx: mpsc::Sender<Delivery>,
    ) -> SubId {
        self.next_sub_id += 1;
        let id = self.next_sub_id;
        self.subscribers.insert(
            id,
            Subscriber {
                queue: queue.to_string(),
                max_in_flight,
                in_flight: HashSet::new(),
                tx,
                closed: false,
            },
        );
        self.queues
            .entry(queue.to_string())
            .or_default()
            .subs
            .push(id);
        id
    }

    /// Removes a subscriber; returns the fires it held, now `Pending` for redelivery.
    pub fn remove_subscriber(&mut self, id: SubId) -> Vec<String> {
        let Some(sub) = self.subscribers.remove(&id) else {
            return Vec::new();
        };
        if let Some(q) = self.queues.get_mut(&sub.queue) {
            q.subs.retain(|s| *s != id);
            q.next_sub = 0;
        }
        let mut held = Vec::new();
        for fire_id in sub.in_flight {
            if let Some(entry) = self.fires.get_mut(&fire_id)
                && let FireStatus::InFlight { deadline, .. } = entry.status
            {
                self.deadlines.remove(&(deadline, fire_id.clone()));
                entry.status = FireStatus::Pending;
                held.push(fire_id);
            }
        }
        held
    }

    /// Ends every subscription: their streams close, and fires they held go back to the front
    /// of their queues without counting an attempt (the worker did nothing wrong).
    pub fn close_all_subscribers(&mut self) {
        let subs: Vec<SubId> = self.subscribers.keys().copied().collect();
        for id in subs {
            for fire_id in self.remove_subscriber(id) {
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

    /// Extends the deadline of fires in flight on `sub`.
    pub fn extend(&mut self, ids: &[String], sub: SubId, deadline: Timestamp) -> bool {
        let mut earliest_changed = false;
        for id in ids {
            let Some(entry) = self.fires.get_mut(id) else {
                continue;
            };
            if let FireStatus::InFlight {
                sub: s,
                deadline: old,
            } = entry.status
                && s == sub
            {
                self.deadlines.remove(&(old, id.clone()));
                entry.status = FireStatus::InFlight { sub, deadline };
                let key = (deadline, id.clone());
                earliest_changed |= self.deadlines.first().is_none_or(|f| key < *f);
                self.deadlines.insert(key);
            }
        }
        earliest_changed
    }
}
