//! Conversions between protobuf messages and domain types, and the one place where a core
//! error becomes a gRPC status.

use std::collections::{BTreeMap, HashMap};

use prost_types::{Duration as PbDuration, Timestamp as PbTimestamp};
use tonic::Status;

use super::pb;
use crate::domain::job::etag;
use crate::domain::preview::Preview;
use crate::domain::{
    DstEffect, DstGap, DstPolicy, DstRepeat, Job, JobState, Micros, MisfirePolicy, Occurrence,
    Outcome, OverlapPolicy, SkipReason, Timestamp, TriggerSpec, fire_id,
};
use crate::scheduler::{Delivery, SchedulerError};

pub fn timestamp(t: Timestamp) -> PbTimestamp {
    let (seconds, nanos) = t.to_seconds_nanos();
    PbTimestamp { seconds, nanos }
}

pub fn duration(micros: Micros) -> PbDuration {
    PbDuration {
        seconds: micros / 1_000_000,
        // |micros % 1e6| < 1e6, so the product fits an i32.
        nanos: ((micros % 1_000_000) * 1_000) as i32,
    }
}

pub fn job_state(s: JobState) -> pb::JobState {
    match s {
        JobState::Scheduled => pb::JobState::Scheduled,
        JobState::Paused => pb::JobState::Paused,
        JobState::Completed => pb::JobState::Completed,
        JobState::Cancelled => pb::JobState::Cancelled,
    }
}

pub fn misfire_policy(p: MisfirePolicy) -> pb::MisfirePolicy {
    match p {
        MisfirePolicy::FireOnce => pb::MisfirePolicy::FireOnce,
        MisfirePolicy::Skip => pb::MisfirePolicy::Skip,
        MisfirePolicy::FireAll => pb::MisfirePolicy::FireAll,
    }
}

pub fn overlap_policy(p: OverlapPolicy) -> pb::OverlapPolicy {
    match p {
        OverlapPolicy::Allow => pb::OverlapPolicy::Allow,
        OverlapPolicy::Skip => pb::OverlapPolicy::Skip,
        OverlapPolicy::BufferOne => pb::OverlapPolicy::BufferOne,
        OverlapPolicy::Replace => pb::OverlapPolicy::Replace,
    }
}

fn dst_policy(p: DstPolicy) -> pb::DstPolicy {
    pb::DstPolicy {
        gap: match p.gap {
            DstGap::Auto => pb::DstGapPolicy::Unspecified,
            DstGap::Shift => pb::DstGapPolicy::Shift,
            DstGap::Skip => pb::DstGapPolicy::Skip,
        }
        .into(),
        repeat: match p.repeat {
            DstRepeat::Auto => pb::DstRepeatPolicy::Unspecified,
            DstRepeat::First => pb::DstRepeatPolicy::First,
            DstRepeat::Last => pb::DstRepeatPolicy::Last,
            DstRepeat::Both => pb::DstRepeatPolicy::Both,
        }
        .into(),
    }
}

fn trigger(t: &TriggerSpec) -> pb::Trigger {
    use pb::trigger::Kind;
    let kind = match t {
        TriggerSpec::At { at } => Kind::At(timestamp(*at)),
        TriggerSpec::After { after } => Kind::After(duration(*after)),
        TriggerSpec::Every {
            period,
            start_time,
            jitter,
        } => Kind::Every(pb::Interval {
            period: Some(duration(*period)),
            start_time: start_time.map(timestamp),
            jitter: (*jitter > 0).then(|| duration(*jitter)),
        }),
        TriggerSpec::Cron {
            expression,
            time_zone,
            dst,
        } => Kind::Cron(pb::Cron {
            expression: expression.clone(),
            time_zone: time_zone.clone(),
            dst_policy: (*dst != DstPolicy::default()).then(|| dst_policy(*dst)),
            time_zone_database_version: chrono_tz::IANA_TZDB_VERSION.to_string(),
        }),
    };
    pb::Trigger { kind: Some(kind) }
}

/// A preview as the API shows it. Without the job's id (a proposal that names none), its fire
/// ids are unknown, and so are its release times if it has jitter (both depend on the id).
pub fn preview(p: &Preview, job: &Job, id_known: bool) -> pb::PreviewOccurrencesResponse {
    let release_known = id_known || job.spec.jitter() == 0;
    pb::PreviewOccurrencesResponse {
        occurrences: p
            .occurrences
            .iter()
            .map(|o| pb::PreviewedOccurrence {
                scheduled_time: Some(timestamp(o.scheduled)),
                release_time: o.release.filter(|_| release_known).map(timestamp),
                fire_id: o.fire_id.clone().filter(|_| id_known).unwrap_or_default(),
                local_time: o
                    .local
                    .map(|(l, _)| l.format("%Y-%m-%dT%H:%M:%S").to_string())
                    .unwrap_or_default(),
                dst_effect: match o.local.map(|(_, e)| e) {
                    None => pb::DstEffect::Unspecified,
                    Some(DstEffect::None) => pb::DstEffect::None,
                    Some(DstEffect::Gap) => pb::DstEffect::Nonexistent,
                    Some(DstEffect::RepeatFirst) => pb::DstEffect::RepeatedFirst,
                    Some(DstEffect::RepeatSecond) => pb::DstEffect::RepeatedSecond,
                }
                .into(),
                skipped: o.skipped,
            })
            .collect(),
        more: p.more,
        time_zone_database_version: chrono_tz::IANA_TZDB_VERSION.to_string(),
    }
}

/// A ledger entry of job `job_id` as the API shows it.
pub fn occurrence(job_id: &str, o: &Occurrence) -> pb::Occurrence {
    let (outcome, reason) = match o.outcome {
        Outcome::Delivered => (pb::OccurrenceOutcome::Delivered, None),
        Outcome::DeadLettered => (pb::OccurrenceOutcome::DeadLettered, None),
        Outcome::Dropped => (pb::OccurrenceOutcome::Dropped, None),
        Outcome::Replaced => (pb::OccurrenceOutcome::Replaced, None),
        Outcome::Skipped(r) => (pb::OccurrenceOutcome::Skipped, Some(r)),
    };
    let fire_id = match (reason, o.triggered) {
        (Some(_), _) => String::new(),
        (None, false) => fire_id(job_id, o.scheduled).to_string(),
        (None, true) => crate::domain::job::triggered_fire_id(job_id, o.scheduled).to_string(),
    };
    pb::Occurrence {
        scheduled_time: Some(timestamp(o.scheduled)),
        last_scheduled_time: Some(timestamp(o.last)),
        count: o.count,
        fire_id,
        outcome: outcome.into(),
        skip_reason: match reason {
            None => pb::SkipReason::Unspecified,
            Some(SkipReason::Misfire) => pb::SkipReason::Misfire,
            Some(SkipReason::Paused) => pb::SkipReason::Paused,
            Some(SkipReason::Overlap) => pb::SkipReason::Overlap,
            Some(SkipReason::BacklogFull) => pb::SkipReason::BacklogFull,
            Some(SkipReason::DstGap) => pb::SkipReason::DstGap,
            Some(SkipReason::DstRepeat) => pb::SkipReason::DstRepeat,
            Some(SkipReason::Ended) => pb::SkipReason::Ended,
        }
        .into(),
        attempts: o.attempts,
        record_time: Some(timestamp(o.time)),
        triggered: o.triggered,
        count_at_least: o.count_at_least,
    }
}

/// A job as the API shows it; `retention` is the server's, for `expire_time`.
pub fn job(j: &Job, retention: Micros) -> pb::Job {
    let spec = &j.spec;
    pb::Job {
        etag: etag(spec),
        id: spec.id().to_string(),
        queue: spec.queue().to_string(),
        trigger: Some(trigger(&spec.trigger())),
        payload: spec.payload(),
        labels: labels(spec.labels()),
        max_fires: spec.max_fires(),
        end_time: spec.end_time().map(timestamp),
        misfire_policy: misfire_policy(spec.misfire_policy()).into(),
        misfire_grace_period: Some(duration(spec.misfire_grace())),
        ack_deadline: Some(duration(spec.ack_deadline())),
        max_attempts: spec.max_attempts(),
        dead_letter_queue: spec.dead_letter_queue().unwrap_or_default().to_string(),
        state: job_state(j.status.state).into(),
        next_fire_time: j.next_due().map(timestamp),
        fire_count: j.status.fire_count,
        create_time: Some(timestamp(j.status.create_time)),
        last_fire_time: j.status.last_fire_time.map(timestamp),
        finish_time: j.status.finish_time.map(timestamp),
        expire_time: j.status.finish_time.map(|f| timestamp(f.plus(retention))),
        overlap_policy: overlap_policy(spec.overlap_policy()).into(),
    }
}

fn labels(labels: &BTreeMap<String, String>) -> HashMap<String, String> {
    labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

pub fn fire(d: Delivery) -> pb::Fire {
    pb::Fire {
        fire_id: d.fire.fire_id.to_string(),
        job_id: d.fire.job_id.to_string(),
        queue: d.fire.queue,
        scheduled_time: Some(timestamp(d.fire.scheduled_time)),
        fire_time: Some(timestamp(d.fire.fire_time)),
        attempt: d.fire.attempt,
        payload: d.spec.payload(),
        labels: labels(d.spec.labels()),
        traceparent: d
            .fire
            .trace
            .as_ref()
            .map(|t| t.traceparent.clone())
            .unwrap_or_default(),
        tracestate: d
            .fire
            .trace
            .as_ref()
            .map(|t| t.tracestate.clone())
            .unwrap_or_default(),
        ack_deadline_time: Some(timestamp(d.ack_deadline)),
        dead_lettered: d.fire.dead_lettered,
    }
}

/// The only mapping from core errors to gRPC statuses.
pub fn status(e: SchedulerError) -> Status {
    match e {
        SchedulerError::NotFound(_) => Status::not_found(e.to_string()),
        SchedulerError::AlreadyExists(_) => Status::already_exists(format!(
            "{e}; use another id, or cancel the existing job and schedule under a new id"
        )),
        SchedulerError::FailedPrecondition(_) => Status::failed_precondition(e.to_string()),
        SchedulerError::Aborted(_) => Status::aborted(e.to_string()),
        SchedulerError::InvalidTrigger(_) => Status::invalid_argument(super::validate::clip(
            e.to_string(),
            super::validate::MAX_ECHO_CHARS + 200,
        )),
        SchedulerError::Unavailable(_) => Status::unavailable(e.to_string()),
        SchedulerError::ResourceExhausted(_) => Status::resource_exhausted(e.to_string()),
        SchedulerError::Internal(_) => Status::internal(e.to_string()),
        SchedulerError::InvalidField { field, message } => {
            let mut v = super::validate::Violations::default();
            v.add(field, message);
            v.into_status()
        }
        SchedulerError::InBatch { index, error } => match *error {
            SchedulerError::InvalidTrigger(t) => {
                let mut v = super::validate::Violations::default();
                v.add(
                    format!("requests[{index}].job.trigger"),
                    format!("{t}; no job of the batch was scheduled"),
                );
                v.into_status()
            }
            inner => {
                let status = status(inner);
                Status::new(
                    status.code(),
                    format!(
                        "requests[{index}]: {}; no job of the batch was scheduled",
                        status.message()
                    ),
                )
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Negative durations keep seconds and nanos of the same sign, as protobuf requires.
    #[test]
    fn durations_keep_sign() {
        assert_eq!(
            duration(-1_500_000),
            PbDuration {
                seconds: -1,
                nanos: -500_000_000
            }
        );
        assert_eq!(
            duration(2_000_001),
            PbDuration {
                seconds: 2,
                nanos: 1_000
            }
        );
    }
}
