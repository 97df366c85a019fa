//! Fires: one released occurrence of one job, as stored until it is acked.
//!
//! A fire is born in the scheduler's commit of [`super::job::advance`], waits on its queue, and
//! is removed when acked or dropped. Only what must survive a restart lives here.

use serde::{Deserialize, Serialize};

use super::job::JobId;
use super::time::{Micros, Timestamp};
use super::trace::TraceContext;

/// A fire's id (`<job id>@<scheduled time>`): shared, not copied, by every index and message
/// that names the fire.
pub type FireId = std::sync::Arc<str>;

/// A fire as stored. `attempt` is the attempt number of its next (or current) delivery.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FireRecord {
    pub fire_id: FireId,
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
    /// Held back by the job's overlap policy (BUFFER_ONE) until no fire of the job runs: not
    /// delivered before. Cleared when it is let go.
    #[serde(default)]
    pub held: bool,
}

impl FireRecord {
    /// A fire for its first delivery: occurrence `scheduled_time` of job `job_id`, released on
    /// `queue` at `fire_time`, without a trace (the caller gives it one).
    pub fn released(
        fire_id: FireId,
        job_id: JobId,
        queue: String,
        scheduled_time: Timestamp,
        fire_time: Timestamp,
    ) -> FireRecord {
        FireRecord {
            fire_id,
            job_id,
            queue,
            scheduled_time,
            fire_time,
            attempt: 1,
            not_before: None,
            dead_lettered: false,
            trace: None,
            held: false,
        }
    }
}

/// What happens to a fire whose delivery attempt failed (nacked, or its ack deadline passed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AfterAttempt {
    /// Delivered again as `attempt`, not before `delay` from now.
    Again { attempt: u32, delay: Micros },
    /// Its attempts are used up: it moves to this dead-letter queue, starting at attempt 1.
    DeadLetter { queue: String },
    /// Its attempts are used up and there is nowhere to move it: it is dropped.
    Drop,
}

/// Decides [`AfterAttempt`] for a fire that failed its attempt `attempt` (on its dead-letter
/// queue already when `dead_lettered`), of a job allowing `max_attempts` with dead-letter queue
/// `dead_letter_queue`; `delay` is the wait before the next attempt (the nack's, or the expiry
/// backoff). A fire already dead-lettered is dropped when it uses up its attempts again.
pub fn after_attempt(
    attempt: u32,
    dead_lettered: bool,
    max_attempts: u32,
    dead_letter_queue: Option<&str>,
    delay: Micros,
) -> AfterAttempt {
    if attempt < max_attempts {
        return AfterAttempt::Again {
            attempt: attempt + 1,
            delay,
        };
    }
    match dead_letter_queue {
        Some(queue) if !dead_lettered => AfterAttempt::DeadLetter {
            queue: queue.to_string(),
        },
        _ => AfterAttempt::Drop,
    }
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

    /// Attempts left: again, with the next attempt number and the delay; none left: to the
    /// dead-letter queue once, then dropped; no dead-letter queue: dropped.
    #[test]
    fn after_an_attempt() {
        assert_eq!(
            after_attempt(2, false, 3, Some("dead"), 7),
            AfterAttempt::Again {
                attempt: 3,
                delay: 7
            }
        );
        assert_eq!(
            after_attempt(3, false, 3, Some("dead"), 7),
            AfterAttempt::DeadLetter {
                queue: "dead".into()
            }
        );
        assert_eq!(
            after_attempt(3, true, 3, Some("dead"), 7),
            AfterAttempt::Drop
        );
        assert_eq!(after_attempt(3, false, 3, None, 7), AfterAttempt::Drop);
    }

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
