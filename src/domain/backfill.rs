//! Backfill: releasing again the occurrences of a past range that were not delivered.
//!
//! Which occurrences a range holds is the job's trigger's business ([`occurrences`]); which of
//! them were delivered is the ledger's, so a backfill is only as good as the ledger's memory:
//! [`ledger_reaches`] refuses a range the ledger may have forgotten (past its retention, or
//! trimmed to its cap). The engines leave out what was delivered or is still out, and release
//! the rest with the usual fire ids, so a backfill repeated by mistake releases nothing twice.

use super::job::{Job, JobState};
use super::ledger::Bounds;
use super::time::{Micros, Timestamp};

/// Most occurrences one backfill takes on.
pub const MAX_OCCURRENCES: usize = 1_000;

/// Why a backfill releases nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BackfillRefused {
    #[error("job {id} is {}; only a scheduled or paused job can be backfilled", .state.as_str())]
    Finished { id: String, state: JobState },
    #[error(
        "the range holds more than {MAX_OCCURRENCES} occurrences of job {id}; backfill it in parts"
    )]
    TooMany { id: String },
    #[error(
        "tickd keeps no ledger (--ledger-max-per-job 0), so it cannot tell which occurrences \
         were delivered; nothing was released"
    )]
    LedgerOff,
    #[error(
        "start_time is before what the ledger keeps (--ledger-retention {} back from now), so \
         tickd cannot tell which occurrences were delivered; start later, or raise \
         --ledger-retention",
        humantime::format_duration(std::time::Duration::from_micros((*.retention).max(0) as u64))
    )]
    BeyondRetention { retention: Micros },
    #[error("start_time is in the future; a backfill is of occurrences already past")]
    StartInFuture,
    #[error(
        "job {id}'s ledger holds --ledger-max-per-job ({per_job}) entries and reaches back only \
         to {oldest}, so tickd cannot tell which earlier occurrences were delivered; start at \
         or after {oldest}, or raise --ledger-max-per-job"
    )]
    BeyondCap {
        id: String,
        per_job: usize,
        oldest: Timestamp,
    },
}

/// Whether `job` can be backfilled from `start` at `now`: it is SCHEDULED or PAUSED, and
/// `start` is not in the future.
pub fn admissible(job: &Job, start: Timestamp, now: Timestamp) -> Result<(), BackfillRefused> {
    if job.status.state.is_final() {
        return Err(BackfillRefused::Finished {
            id: job.spec.id().to_string(),
            state: job.status.state,
        });
    }
    if start > now {
        return Err(BackfillRefused::StartInFuture);
    }
    Ok(())
}

/// The occurrences of `job`'s trigger in `[start, end)`, oldest first: not after `now` (a
/// backfill is of the past), not before the job's creation, not at or after its `end_time`,
/// and before its pending occurrence (the schedule's own); at most [`MAX_OCCURRENCES`].
pub fn occurrences(
    job: &Job,
    start: Timestamp,
    end: Timestamp,
    now: Timestamp,
) -> Result<Vec<Timestamp>, BackfillRefused> {
    let Some(rec) = job.recurrence() else {
        return Ok(Vec::new());
    };
    let mut until = end.min(now.plus(1));
    if let Some(job_end) = job.spec.end_time() {
        until = until.min(job_end);
    }
    // The pending occurrence and those after it are the schedule's to release (or to pass
    // over): released here too, one could be delivered twice.
    if let Some(pending) = job.status.next_occurrence {
        until = until.min(pending);
    }
    let mut out = Vec::new();
    // Occurrences before the job's creation are not its own (an id deleted and used again
    // would have its predecessor's delivered occurrences released again).
    let mut cursor = rec.next_after(start.max(job.status.create_time).minus(1));
    while let Some(o) = cursor.filter(|o| *o < until) {
        if out.len() == MAX_OCCURRENCES {
            return Err(BackfillRefused::TooMany {
                id: job.spec.id().to_string(),
            });
        }
        out.push(o);
        cursor = rec.next_after(o);
    }
    Ok(out)
}

/// Whether a job's ledger still knows what became of every occurrence from `start` on, at
/// `now`: it is kept (`bounds.per_job > 0`), `start` is within its retention (a record is
/// sealed no earlier than its occurrence, so none from `start` on has expired), and, when it
/// holds its cap of `len` records, its oldest record (`oldest`, by occurrence) is not after
/// `start` (anything earlier may have been trimmed).
pub fn ledger_reaches(
    bounds: Bounds,
    now: Timestamp,
    start: Timestamp,
    len: usize,
    oldest: Option<Timestamp>,
    id: &str,
) -> Result<(), BackfillRefused> {
    if bounds.per_job == 0 {
        return Err(BackfillRefused::LedgerOff);
    }
    if start < now.minus(bounds.retention) {
        return Err(BackfillRefused::BeyondRetention {
            retention: bounds.retention,
        });
    }
    match oldest {
        Some(oldest) if len >= bounds.per_job && oldest > start => {
            Err(BackfillRefused::BeyondCap {
                id: id.to_string(),
                per_job: bounds.per_job,
                oldest,
            })
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::job::{JobSpec, MisfirePolicy};
    use crate::domain::trigger::TriggerSpec;

    const S: i64 = 1_000_000;

    fn every_second(end_time: Option<Timestamp>) -> Job {
        let spec = JobSpec {
            id: "b".into(),
            queue: "q".into(),
            trigger: TriggerSpec::Every {
                period: S,
                start_time: Some(Timestamp(0)),
                jitter: 0,
            },
            payload: Default::default(),
            labels: Default::default(),
            max_fires: 0,
            end_time,
            misfire_policy: MisfirePolicy::FireOnce,
            misfire_grace: 5 * S,
            ack_deadline: 30 * S,
            max_attempts: 10,
            dead_letter_queue: None,
            overlap_policy: Default::default(),
        };
        let mut job = Job::create(spec, Timestamp(0)).expect("valid");
        // Advanced far past every range below.
        job.status.next_occurrence = Some(Timestamp(1_000_000 * S));
        job
    }

    /// `[start, end)`, capped at now (inclusive) and at the job's end_time (exclusive).
    #[test]
    fn a_range_is_half_open_and_in_the_past() {
        let job = every_second(None);
        let got = occurrences(&job, Timestamp(2 * S), Timestamp(5 * S), Timestamp(10 * S));
        assert_eq!(
            got,
            Ok(vec![Timestamp(2 * S), Timestamp(3 * S), Timestamp(4 * S)])
        );
        let got = occurrences(&job, Timestamp(2 * S), Timestamp(50 * S), Timestamp(4 * S));
        assert_eq!(
            got,
            Ok(vec![Timestamp(2 * S), Timestamp(3 * S), Timestamp(4 * S)])
        );
        let ended = every_second(Some(Timestamp(3 * S)));
        let got = occurrences(&ended, Timestamp(0), Timestamp(9 * S), Timestamp(9 * S));
        assert_eq!(got, Ok(vec![Timestamp(0), Timestamp(S), Timestamp(2 * S)]));
    }

    /// The pending occurrence (due, or owed while paused) and later ones are the schedule's:
    /// a backfill stops before it. Occurrences before the job's creation are not its own.
    #[test]
    fn only_the_jobs_own_past_occurrences() {
        let mut job = every_second(None);
        job.status.next_occurrence = Some(Timestamp(3 * S));
        let got = occurrences(&job, Timestamp(0), Timestamp(9 * S), Timestamp(9 * S));
        assert_eq!(got, Ok(vec![Timestamp(0), Timestamp(S), Timestamp(2 * S)]));
        job.status.create_time = Timestamp(S + 1);
        let got = occurrences(&job, Timestamp(0), Timestamp(9 * S), Timestamp(9 * S));
        assert_eq!(got, Ok(vec![Timestamp(2 * S)]));
    }

    /// More than the most one backfill takes is refused, not cut.
    #[test]
    fn too_many_is_refused() {
        let job = every_second(None);
        let n = MAX_OCCURRENCES as i64;
        assert_eq!(
            occurrences(&job, Timestamp(0), Timestamp(n * S), Timestamp(2 * n * S))
                .map(|v| v.len()),
            Ok(MAX_OCCURRENCES)
        );
        assert!(matches!(
            occurrences(
                &job,
                Timestamp(0),
                Timestamp((n + 1) * S),
                Timestamp(2 * n * S)
            ),
            Err(BackfillRefused::TooMany { .. })
        ));
    }

    /// The ledger must be kept, reach back past the start in time, and not be trimmed past
    /// it by its cap.
    #[test]
    fn the_ledger_must_reach_the_start() {
        let bounds = Bounds {
            per_job: 3,
            retention: 100 * S,
        };
        let now = Timestamp(1_000 * S);
        let ok = |start: i64, len: usize, oldest: Option<i64>| {
            ledger_reaches(
                bounds,
                now,
                Timestamp(start * S),
                len,
                oldest.map(|o| Timestamp(o * S)),
                "j",
            )
        };
        assert_eq!(ok(950, 2, Some(990)), Ok(()));
        assert_eq!(ok(950, 3, Some(940)), Ok(()));
        assert!(matches!(
            ok(950, 3, Some(960)),
            Err(BackfillRefused::BeyondCap { .. })
        ));
        assert!(matches!(
            ok(850, 0, None),
            Err(BackfillRefused::BeyondRetention { .. })
        ));
        let off = Bounds {
            per_job: 0,
            ..bounds
        };
        assert_eq!(
            ledger_reaches(off, now, now, 0, None, "j"),
            Err(BackfillRefused::LedgerOff)
        );
    }
}
