//! What a job would release from its pending occurrence on: each occurrence with its jitter,
//! its fire id, and, for a cron job, its wall-clock time and what DST did to it, including the
//! slots its DST policy skips. For PreviewOccurrences; nothing here changes a job.

use chrono::NaiveDateTime;

use super::dst::{DstEffect, Slot};
use super::job::{Job, JobSpec, JobState, fire_id};
use super::time::Timestamp;
use super::trigger::{Recurrence, TriggerError};

/// One previewed occurrence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Previewed {
    /// The occurrence before jitter (a fire's scheduled time). For a skipped local time that
    /// does not exist, the instant the clocks jumped.
    pub scheduled: Timestamp,
    /// When it would be released (jitter applied); `None` when skipped.
    pub release: Option<Timestamp>,
    /// The fire id it would carry; `None` when skipped.
    pub fire_id: Option<String>,
    /// For a cron job: the wall-clock time matched, and what DST did to it.
    pub local: Option<(NaiveDateTime, DstEffect)>,
    pub skipped: bool,
}

/// The occurrences of a preview, and whether the range held more than were asked for.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Preview {
    pub occurrences: Vec<Previewed>,
    pub more: bool,
}

/// Occurrences of `job` in `[from, to)` (from its pending occurrence when `from` is `None`),
/// at most `max` of them, ending where the job would end (`end_time`, `max_fires`). A job
/// that will not fire again (completed, cancelled) has none.
pub fn preview(job: &Job, from: Option<Timestamp>, to: Option<Timestamp>, max: usize) -> Preview {
    let mut out = Preview::default();
    let (Some(next), Some(rec)) = (job.status.next_occurrence, job.recurrence()) else {
        return out;
    };
    if matches!(job.status.state, JobState::Completed | JobState::Cancelled) {
        return out;
    }
    let start = from.map_or(next, |f| f.max(next));
    let spec = &job.spec;
    let mut left = match spec.max_fires() {
        0 => u64::MAX,
        n => n.saturating_sub(job.status.fire_count),
    };
    if start > next && left < u64::MAX {
        // Occurrences from the pending one up to the range's start fire first and use up
        // `max_fires` before the range begins.
        let (before, _) = rec.count_between(next, start.minus(1), left);
        left -= before;
    }
    // Cron slots (skipped ones included), or the other triggers' occurrences, from `start` on.
    let mut cron = rec.cron_slots(start.minus(1));
    let is_cron = cron.is_some();
    let mut plain = (cron.is_none())
        .then(|| {
            if next >= start {
                Some(next)
            } else {
                rec.next_after(start.minus(1))
            }
        })
        .flatten();
    let mut next_candidate = || -> Option<Slot> {
        match cron.as_mut() {
            Some(slots) => slots.next(),
            None => {
                let at = plain?;
                plain = rec.next_after(at);
                Some(Slot {
                    at,
                    local: NaiveDateTime::default(),
                    effect: DstEffect::None,
                    released: true,
                })
            }
        }
    };
    while left > 0 {
        let Some(slot) = next_candidate() else {
            break;
        };
        if to.is_some_and(|to| slot.at >= to) || spec.end_time().is_some_and(|e| slot.at >= e) {
            break;
        }
        if out.occurrences.len() == max {
            out.more = true;
            break;
        }
        let (release, id) = if slot.released {
            left -= 1;
            (
                // As the timer releases it: an occurrence before the job existed (an `at` in
                // the past) goes out at once.
                Some(job.due(slot.at).max(job.status.create_time)),
                Some(fire_id(spec.id(), slot.at).to_string()),
            )
        } else {
            (None, None)
        };
        out.occurrences.push(Previewed {
            scheduled: slot.at,
            release,
            fire_id: id,
            local: is_cron.then_some((slot.local, slot.effect)),
            skipped: !slot.released,
        });
    }
    out
}

/// A proposed job (not scheduled) as if created at `at`, the start of the range previewed: a
/// cron job's slot exactly at `at` is its first occurrence (a range includes its start), where
/// a job created at `at` would begin strictly after it.
pub fn proposed(spec: JobSpec, at: Timestamp) -> Result<Job, TriggerError> {
    let mut job = Job::create(spec, at)?;
    if let (Some(rec @ Recurrence::Cron { .. }), Some(next)) =
        (job.recurrence(), job.status.next_occurrence)
        && let Some(first) = rec.next_after(at.minus(1))
        && first < next
    {
        job.status.next_occurrence = Some(first);
    }
    Ok(job)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::dst::{DstGap, DstPolicy, DstRepeat};
    use crate::domain::trigger::TriggerSpec;
    use crate::store::contract::spec;

    const S: i64 = 1_000_000;

    fn t(rfc3339: &str) -> Timestamp {
        Timestamp(
            chrono::DateTime::parse_from_rfc3339(rfc3339)
                .expect("time")
                .timestamp_micros(),
        )
    }

    fn cron_job(expr: &str, zone: &str, dst: DstPolicy, now: Timestamp) -> Job {
        let mut s = spec("p");
        s.trigger = TriggerSpec::Cron {
            expression: expr.into(),
            time_zone: zone.into(),
            dst,
        };
        Job::create(s, now).expect("valid")
    }

    /// A cron job in New York over its fall-back night, repeat FIRST: the second 01:30 is listed
    /// as skipped, without a release time or fire id; the others carry both.
    #[test]
    fn lists_skipped_slots_with_their_dst_effect() {
        let dst = DstPolicy {
            gap: DstGap::Auto,
            repeat: DstRepeat::First,
        };
        let job = cron_job(
            "30 1 * * *",
            "America/New_York",
            dst,
            t("2026-10-31T12:00:00Z"),
        );
        let p = preview(&job, None, None, 3);
        let rows: Vec<_> = p
            .occurrences
            .iter()
            .map(|o| {
                (
                    o.scheduled.to_string(),
                    o.local.map(|(l, e)| format!("{l} {e:?}")),
                    o.skipped,
                    o.fire_id.clone(),
                )
            })
            .collect();
        assert_eq!(
            rows,
            [
                (
                    "2026-11-01T05:30:00Z".into(),
                    Some("2026-11-01 01:30:00 RepeatFirst".into()),
                    false,
                    Some("p@2026-11-01T05:30:00Z".into())
                ),
                (
                    "2026-11-01T06:30:00Z".into(),
                    Some("2026-11-01 01:30:00 RepeatSecond".into()),
                    true,
                    None
                ),
                (
                    "2026-11-02T06:30:00Z".into(),
                    Some("2026-11-02 01:30:00 None".into()),
                    false,
                    Some("p@2026-11-02T06:30:00Z".into())
                ),
            ]
        );
        assert!(p.more, "the schedule goes on past three");
    }

    /// A proposed cron job previewed from an instant one of its slots falls on lists that slot
    /// first (a range includes its start); from just after it, the next.
    #[test]
    fn a_proposed_job_includes_a_slot_at_the_range_start() {
        let mut s = spec("p");
        s.trigger = TriggerSpec::Cron {
            expression: "0 * * * *".into(),
            time_zone: String::new(),
            dst: DstPolicy::default(),
        };
        let at = t("2026-05-01T10:00:00Z");
        let job = proposed(s.clone(), at).expect("valid");
        let p = preview(&job, Some(at), None, 2);
        let scheduled: Vec<Timestamp> = p.occurrences.iter().map(|o| o.scheduled).collect();
        assert_eq!(scheduled, [at, t("2026-05-01T11:00:00Z")]);
        let after = proposed(s, at.plus(1)).expect("valid");
        assert_eq!(
            after.status.next_occurrence,
            Some(t("2026-05-01T11:00:00Z"))
        );
    }

    /// An interval with jitter: release times are the occurrence plus the job's own stable
    /// jitter; `to` and `max_fires` end the list, and a range past the job's end is empty.
    #[test]
    fn jitter_range_and_limits() {
        let mut s = spec("j");
        s.trigger = TriggerSpec::Every {
            period: 10 * S,
            start_time: Some(Timestamp(100 * S)),
            jitter: 2 * S,
        };
        s.max_fires = 4;
        let job = Job::create(s, Timestamp(0)).expect("valid");
        let p = preview(&job, None, None, 100);
        let scheduled: Vec<i64> = p.occurrences.iter().map(|o| o.scheduled.0 / S).collect();
        assert_eq!(scheduled, [100, 110, 120, 130], "max_fires ends it");
        assert!(!p.more);
        for o in &p.occurrences {
            assert_eq!(o.release, Some(job.due(o.scheduled)));
            assert_ne!(o.release, Some(o.scheduled), "jitter applied");
            assert!(
                o.release
                    .is_some_and(|r| r >= o.scheduled && r < o.scheduled.plus(2 * S))
            );
            assert_eq!(o.local, None);
        }
        let ranged = preview(
            &job,
            Some(Timestamp(105 * S)),
            Some(Timestamp(130 * S)),
            100,
        );
        let scheduled: Vec<i64> = ranged
            .occurrences
            .iter()
            .map(|o| o.scheduled.0 / S)
            .collect();
        assert_eq!(scheduled, [110, 120]);
        // The occurrences before the range use up max_fires first: 100..130 are all four.
        let late = preview(&job, Some(Timestamp(125 * S)), None, 100);
        let scheduled: Vec<i64> = late.occurrences.iter().map(|o| o.scheduled.0 / S).collect();
        assert_eq!(scheduled, [130], "100, 110 and 120 fire before the range");
        assert!(
            preview(&job, Some(Timestamp(131 * S)), None, 100)
                .occurrences
                .is_empty()
        );
        let capped = preview(&job, None, None, 2);
        assert_eq!(capped.occurrences.len(), 2);
        assert!(capped.more);
        let mut done = job.clone();
        done.status.state = JobState::Completed;
        assert_eq!(preview(&done, None, None, 10), Preview::default());
    }
}
