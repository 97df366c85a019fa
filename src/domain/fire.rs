//! Fires: one released occurrence of one job, as stored until it is acked.
//!
//! A fire is born in the scheduler's commit of [`super::job::advance`], waits on its queue, and
//! is removed when acked or dropped. Only what must survive a restart lives here.

use serde::{Deserialize, Serialize};

use super::job::JobId;
use super::time::{Micros, Timestamp};
use super::trace::TraceContext;

/// A fire as stored. `attempt` is the attempt number of its next (or current) delivery.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FireRecord {
    pub fire_id: String,
    pub job_id: JobId,
    /// The queue it is delivered on: the job's, or its dead-letter queue.
    pub queue: String,
    pub scheduled_time: Timestamp,
    pub fire_time: Timestamp,
    pub attempt: u32,
    /// Not deliverable before this time (a nack delay or a redelivery backoff).
    pub not_before: Option<Timestamp>,
    pub dead_lettered: bool,
    /// The fire's span, which every delivery of it carries to the worker.
    #[serde(default)]
    pub trace: Option<TraceContext>,
}

/// Delay before redelivering a fire whose ack deadline expired on `attempt`: one second, doubling
/// per attempt, capped at `max`.
pub fn expiry_backoff(attempt: u32, max: Micros) -> Micros {
    let doublings = attempt.saturating_sub(1).min(30);
    (1_000_000_i64 << doublings).min(max)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Backoff starts at one second, doubles, and stops at the cap.
    #[test]
    fn expiry_backoff_doubles_to_cap() {
        let cap = 60_000_000;
        let got: Vec<_> = (1..=8).map(|a| expiry_backoff(a, cap)).collect();
        assert_eq!(
            got,
            vec![
                1_000_000, 2_000_000, 4_000_000, 8_000_000, 16_000_000, 32_000_000, 60_000_000,
                60_000_000
            ]
        );
        assert_eq!(expiry_backoff(u32::MAX, cap), cap);
    }
}
