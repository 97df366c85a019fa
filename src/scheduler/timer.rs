//! The timer loop: the one task that wakes when something is due.
//!
//! Each pass takes what is due from the state (jobs whose occurrence has come, ack deadlines
//! that passed, redelivery delays that ended), hands jobs to the writer in one `Advance` op and
//! waits for it to commit (that wait is the loop's back-pressure), then sleeps until the
//! earliest next deadline or until a writer says something earlier was armed.

use std::sync::Arc;

use tokio::sync::{oneshot, watch};
use tracing::warn;

use super::embedded::Inner;
use super::writer::{Op, Redelivery};
use crate::domain::Micros;

/// Most jobs advanced in one writer op.
const MAX_JOBS_PER_ADVANCE: usize = 1_024;
/// Pause after a failed commit before trying the same jobs again.
const RETRY_AFTER_FAILED_COMMIT_MICROS: Micros = 1_000_000;
/// Longest sleep with nothing armed: a safety net, so that a missed wake-up costs at most this.
const IDLE_RECHECK_MICROS: Micros = 60_000_000;
/// While store commits fail, how often (in real time) the writer is asked to try one, so that
/// health recovers even when nothing else is being written.
const PROBE_FAILING_STORE_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

pub(crate) async fn run(inner: Arc<Inner>, mut stop: watch::Receiver<bool>) {
    let mut health = inner.health.subscribe();
    loop {
        if *stop.borrow_and_update() {
            return;
        }
        let now = inner.clock.now();
        let steady = inner.clock.steady_now();
        let work = inner.mutate(|state| state.take_due(now, steady, MAX_JOBS_PER_ADVANCE));
        let expired_any = !work.expired.is_empty() || !work.retired.is_empty();
        inner.redeliver(work.expired, Redelivery::Expired);
        if !work.retired.is_empty() {
            let _ = inner.send(Op::Retire { ids: work.retired });
        }
        if work.jobs.is_empty() {
            if expired_any {
                // Every op of this pass is sent (see `Scheduler::settle`).
                inner.mutate(|state| state.timer_busy = false);
            }
        } else {
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
            let committed = rx.await;
            inner.mutate(|state| state.timer_busy = false);
            match committed {
                Ok(Ok(())) => continue,
                Ok(Err(e)) => {
                    warn!(error = %e, "jobs could not be advanced; retrying shortly");
                }
                Err(_) => return,
            }
            tokio::select! {
                _ = inner.clock.sleep_until(now.plus(RETRY_AFTER_FAILED_COMMIT_MICROS)) => {}
                _ = stop.changed() => {}
            }
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
