//! The timer loop: the one task that wakes when something is due.
//!
//! Each pass takes what is due from the state (jobs whose occurrence has come, ack deadlines
//! that passed, redelivery delays that ended) and hands jobs to the writer in one `Advance` op.
//! While more is due it takes the next pass with at most two advances uncommitted (that wait is
//! the loop's back-pressure, and two let the writer decide one while it commits the other);
//! then it waits for what is in flight and sleeps until the earliest next deadline or until a
//! writer says something earlier was armed.

use std::collections::VecDeque;
use std::sync::Arc;

use tokio::sync::{oneshot, watch};
use tracing::warn;

use super::SchedulerError;
use super::embedded::Inner;
use super::writer::{Op, Redelivery};
use crate::domain::Micros;

/// Most jobs advanced in one writer op.
const MAX_JOBS_PER_ADVANCE: usize = 1_024;
/// Advance ops sent and not yet committed: two let the writer decide one while it commits the
/// other.
const ADVANCES_IN_FLIGHT: usize = 2;
/// Pause after a failed commit before trying the same jobs again.
const RETRY_AFTER_FAILED_COMMIT_MICROS: Micros = 1_000_000;
/// Longest sleep with nothing armed: a safety net, so that a missed wake-up costs at most this.
const IDLE_RECHECK_MICROS: Micros = 60_000_000;
/// While store commits fail, how often (in real time) the writer is asked to try one, so that
/// health recovers even when nothing else is being written.
const PROBE_FAILING_STORE_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

pub(crate) async fn run(inner: Arc<Inner>, mut stop: watch::Receiver<bool>) {
    let mut health = inner.health.subscribe();
    // Advances sent and not yet committed, oldest first: at most [`ADVANCES_IN_FLIGHT`], so
    // that the writer decides the next while it commits one.
    let mut in_flight: VecDeque<oneshot::Receiver<Result<(), SchedulerError>>> = VecDeque::new();
    loop {
        if *stop.borrow_and_update() {
            return;
        }
        let now = inner.clock.now();
        let steady = inner.clock.steady_now();
        let work = inner.mutate(|state| {
            let work = state.take_due(now, steady, MAX_JOBS_PER_ADVANCE);
            // Jobs of an advance still being committed are in neither index: the loop is busy
            // until it is applied (a flush sent before the advance does not wait for it).
            state.timer_busy |= !in_flight.is_empty();
            work
        });
        let expired_any = !work.expired.is_empty() || !work.retired.is_empty();
        inner.redeliver(work.expired, Redelivery::Expired);
        if !work.retired.is_empty() {
            let _ = inner.send(Op::Retire { ids: work.retired });
        }
        let took_jobs = !work.jobs.is_empty();
        if took_jobs {
            let (tx, rx) = oneshot::channel();
            if inner
                .send(Op::Advance {
                    due: work.jobs,
                    reply: tx,
                })
                .is_err()
            {
                return;
            }
            in_flight.push_back(rx);
        }
        if expired_any && in_flight.is_empty() {
            // Every op of this pass is sent (see `Scheduler::settle`).
            inner.mutate(|state| state.timer_busy = false);
        }
        // With more due, keep going while the limit allows; otherwise wait for what is in
        // flight before sleeping, so that a failed advance is retried.
        let limit = if took_jobs { ADVANCES_IN_FLIGHT } else { 1 };
        let mut failed = false;
        let mut awaited = false;
        while in_flight.len() >= limit {
            let Some(rx) = in_flight.pop_front() else {
                break;
            };
            awaited = true;
            match rx.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    warn!(error = %e, "jobs could not be advanced; retrying shortly");
                    failed = true;
                }
                Err(_) => return,
            }
        }
        if awaited && in_flight.is_empty() {
            inner.mutate(|state| state.timer_busy = false);
        }
        if failed {
            tokio::select! {
                _ = inner.clock.sleep_until(now.plus(RETRY_AFTER_FAILED_COMMIT_MICROS)) => {}
                _ = stop.changed() => {}
            }
            continue;
        }
        if took_jobs || awaited {
            // Look again: what was committed meanwhile may have re-armed a job earlier than
            // this pass's next wake-up.
            continue;
        }

        let wake_at = work
            .next_wake
            .unwrap_or_else(|| now.plus(IDLE_RECHECK_MICROS));
        let failing = matches!(*health.borrow_and_update(), super::Health::StoreFailing(_));
        let probe = async {
            if failing {
                tokio::time::sleep(PROBE_FAILING_STORE_EVERY).await
            } else {
                std::future::pending().await
            }
        };
        tokio::select! {
            _ = inner.clock.sleep_until(wake_at) => {}
            _ = inner.timer_wake.notified() => {}
            _ = stop.changed() => {}
            _ = health.changed() => {}
            _ = probe => {
                let _ = inner.send(Op::Probe);
            }
        }
    }
}
