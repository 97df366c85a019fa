//! Trigger arithmetic on whatever a client could send: a cron expression, a time zone, a DST
//! policy and a start instant (or an interval, `at` or `after` trigger), read from text lines
//! (see `tickd_fuzz::CronInput`).
//!
//! The trigger goes through Schedule's validation as a client's would (with "now" at the
//! start instant), and through the domain's own parsing; the two must agree, and a trigger
//! validation accepts must make a job. Then the job's occurrences are walked, up to 50 of them,
//! with tickd's own arithmetic: nothing may panic or run unbounded (libFuzzer's -timeout), each
//! occurrence is strictly after the one before, and the other ways of asking (the walk with
//! DST skips, the preview's slots, "latest at or before", counting, one `advance` as the timer
//! makes it) give the same answers.

#![no_main]

use libfuzzer_sys::fuzz_target;
use tickd::api::pb;
use tickd::api::validate::{self, Limits};
use tickd::domain::trigger::{parse_cron, parse_time_zone};
use tickd::domain::{
    DstGap, DstPolicy, DstRepeat, Job, JobSpec, MisfirePolicy, Recurrence, Timestamp, TriggerSpec,
    advance, fire_id,
};
use tickd_fuzz::CronInput;
use tonic::Code;

/// How many occurrences are walked.
const OCCURRENCES: usize = 50;
/// How many of them are also found walking back (each costs a search backwards).
const CHECKED_BACKWARDS: usize = 8;
/// What `advance` may release at once for FIRE_ALL (the scheduler's cap is larger; a small one
/// keeps each run short).
const FIRE_ALL_CAP: usize = 64;
/// Protobuf Timestamps carry years 0001 to 9999; validation refuses the rest.
const MIN_PB_SECONDS: i64 = -62_135_596_800;
const MAX_PB_SECONDS: i64 = 253_402_300_799;

fuzz_target!(|data: &[u8]| {
    let Some(input) = CronInput::parse(data) else {
        return;
    };
    let Some((trigger, pb_trigger)) = triggers(&input) else {
        return;
    };
    let start = Timestamp(input.start);

    // The domain on its own, at any instant a stored job could hold.
    let misfire_policy = match input.misfire {
        1 => MisfirePolicy::Skip,
        2 => MisfirePolicy::FireAll,
        _ => MisfirePolicy::FireOnce,
    };
    let job = trigger.clone().and_then(|trigger| {
        let spec = JobSpec {
            misfire_policy,
            ..spec("fuzz-job", trigger)
        };
        Job::create(spec, start).ok()
    });

    // As a client's Schedule, when "now" is an instant a server could be at.
    if (MIN_PB_SECONDS..=MAX_PB_SECONDS).contains(&input.start.div_euclid(1_000_000)) {
        check_validation(&input, &trigger, pb_trigger, start, job.as_ref());
    }

    let Some(job) = job else {
        return;
    };
    let rec = job.recurrence().expect("a job Job::create made resolves");
    if job.status.next_occurrence.is_none() && matches!(rec, Recurrence::Cron { .. }) {
        // A cron expression that never falls after `start` (`0 0 30 2 *`): finding that out
        // can mean searching to the end of croner's calendar, which `Job::create` (and
        // validation) just did. Searching again in every check below adds nothing but time.
        return;
    }
    let occurrences = walk(&rec, start);
    check_first(&rec, &job, start, &occurrences);
    check_dst_skips(&rec, start, &occurrences);
    check_slots(&rec, start, &occurrences);
    check_backwards(&rec, start, &occurrences);
    check_count(&rec, &occurrences);
    check_fire_ids(&job, &occurrences);
    check_advance(&job, input.late);
});

/// The trigger as the domain holds it (`None`: the expression or zone does not parse, or the
/// DST policy is not a proto value) and as a client sends it; `None` for text that names no
/// trigger at all.
fn triggers(input: &CronInput) -> Option<(Option<TriggerSpec>, pb::trigger::Kind)> {
    use pb::trigger::Kind;
    let mut words = input.trigger.split_whitespace();
    let number = |w: Option<&str>| -> Option<i64> { w?.parse().ok() };
    Some(match words.next() {
        Some("every") => {
            let period = number(words.next())?;
            let start_time = match words.next() {
                None | Some("-") => None,
                w => Some(number(w)?),
            };
            let jitter = match words.next() {
                None => 0,
                w => number(w)?,
            };
            (
                Some(TriggerSpec::Every {
                    period,
                    start_time: start_time.map(Timestamp),
                    jitter,
                }),
                Kind::Every(pb::Interval {
                    period: Some(pb_duration(period)),
                    start_time: start_time.map(pb_timestamp),
                    jitter: (jitter != 0).then(|| pb_duration(jitter)),
                }),
            )
        }
        Some("at") => {
            let at = number(words.next())?;
            (
                Some(TriggerSpec::At { at: Timestamp(at) }),
                Kind::At(pb_timestamp(at)),
            )
        }
        Some("after") => {
            let after = number(words.next())?;
            (
                Some(TriggerSpec::After { after }),
                Kind::After(pb_duration(after)),
            )
        }
        _ => {
            let dst = dst_policy(input.gap, input.repeat);
            let parses =
                parse_cron(&input.trigger).is_ok() && parse_time_zone(&input.time_zone).is_ok();
            (
                dst.filter(|_| parses).map(|dst| TriggerSpec::Cron {
                    expression: input.trigger.clone(),
                    time_zone: input.time_zone.clone(),
                    dst,
                }),
                Kind::Cron(pb::Cron {
                    expression: input.trigger.clone(),
                    time_zone: input.time_zone.clone(),
                    dst_policy: Some(pb::DstPolicy {
                        gap: input.gap,
                        repeat: input.repeat,
                    }),
                    ..Default::default()
                }),
            )
        }
    })
}

/// The DST policy of proto values `gap` and `repeat`, as the proto numbers them.
fn dst_policy(gap: i32, repeat: i32) -> Option<DstPolicy> {
    Some(DstPolicy {
        gap: match gap {
            0 => DstGap::Auto,
            1 => DstGap::Shift,
            2 => DstGap::Skip,
            _ => return None,
        },
        repeat: match repeat {
            0 => DstRepeat::Auto,
            1 => DstRepeat::First,
            2 => DstRepeat::Last,
            3 => DstRepeat::Both,
            _ => return None,
        },
    })
}

fn pb_duration(micros: i64) -> prost_types::Duration {
    prost_types::Duration {
        seconds: micros / 1_000_000,
        nanos: ((micros % 1_000_000) * 1_000) as i32,
    }
}

fn pb_timestamp(micros: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: micros.div_euclid(1_000_000),
        nanos: (micros.rem_euclid(1_000_000) * 1_000) as i32,
    }
}

fn spec(id: &str, trigger: TriggerSpec) -> JobSpec {
    JobSpec {
        id: id.into(),
        queue: "q".into(),
        trigger,
        payload: Default::default(),
        labels: Default::default(),
        max_fires: 0,
        end_time: None,
        misfire_policy: MisfirePolicy::FireOnce,
        misfire_grace: validate::DEFAULT_MISFIRE_GRACE_MICROS,
        ack_deadline: validate::DEFAULT_ACK_DEADLINE_MICROS,
        max_attempts: validate::DEFAULT_MAX_ATTEMPTS,
        dead_letter_queue: None,
        overlap_policy: Default::default(),
    }
}

/// Schedule's validation of the trigger at `now`: refused with INVALID_ARGUMENT naming the
/// trigger, or accepted as the domain reads it, and then a job can be made of it. `job` is the
/// domain's job of `trigger` made at `now`, if it made one.
fn check_validation(
    input: &CronInput,
    trigger: &Option<TriggerSpec>,
    pb_trigger: pb::trigger::Kind,
    now: Timestamp,
    job: Option<&Job>,
) {
    let is_cron = matches!(pb_trigger, pb::trigger::Kind::Cron(_));
    let request = pb::ScheduleRequest {
        job: Some(pb::Job {
            queue: "q".into(),
            trigger: Some(pb::Trigger {
                kind: Some(pb_trigger),
            }),
            ..Default::default()
        }),
        request_id: String::new(),
    };
    let limits = Limits {
        max_payload_bytes: 1024,
        subscribe_open_timeout: std::time::Duration::from_secs(10),
        max_list_response_bytes: 1 << 20,
    };
    match validate::schedule_request(request, limits, now) {
        Ok(accepted) => {
            if is_cron {
                assert!(
                    !input.trigger.trim().is_empty(),
                    "a blank cron expression was accepted"
                );
                assert_eq!(
                    Some(&accepted.trigger),
                    trigger.as_ref(),
                    "validation accepted a cron trigger the domain does not read the same"
                );
            }
            let job = Job::create(accepted, now).expect("an accepted trigger makes a job");
            if is_cron {
                assert!(
                    job.status.next_occurrence.is_some(),
                    "an accepted cron job has no first occurrence"
                );
            }
        }
        Err(status) => {
            assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
            assert!(
                status.message().contains("job.trigger"),
                "refused for something other than the trigger: {}",
                status.message()
            );
            if is_cron && !input.trigger.trim().is_empty() {
                // Refused although it parses: only because it never fires after `now` (a
                // cron job's first occurrence is the first after its creation).
                if trigger.is_some() {
                    let job = job.expect("a cron trigger that parses makes a job");
                    assert_eq!(
                        job.status.next_occurrence,
                        None,
                        "a cron trigger that fires was refused: {}",
                        status.message()
                    );
                }
            }
        }
    }
}

/// Up to [`OCCURRENCES`] occurrences strictly after `start`, each strictly after the one before.
fn walk(rec: &Recurrence, start: Timestamp) -> Vec<Timestamp> {
    let mut out = Vec::with_capacity(OCCURRENCES);
    let mut t = start;
    while out.len() < OCCURRENCES {
        let Some(next) = rec.next_after(t) else {
            break;
        };
        assert!(
            next > t,
            "next_after({t:?}) = {next:?} is not after it ({rec:?})"
        );
        out.push(next);
        t = next;
    }
    out
}

/// A job's first occurrence is its trigger's first after creation (a cron job's is the walk's
/// first).
fn check_first(rec: &Recurrence, job: &Job, start: Timestamp, occurrences: &[Timestamp]) {
    assert_eq!(job.status.next_occurrence, rec.first(start));
    if matches!(rec, Recurrence::Cron { .. }) {
        assert_eq!(rec.first(start), occurrences.first().copied());
    }
    if let Some(due) = job.next_due() {
        assert!(due >= start, "due {due:?} before the job's creation");
    }
}

/// The walk that also reports DST skips finds the same occurrences, and what it skipped lies
/// between the instant asked about and the occurrence found.
fn check_dst_skips(rec: &Recurrence, start: Timestamp, occurrences: &[Timestamp]) {
    let mut t = start;
    for &o in occurrences.iter().take(CHECKED_BACKWARDS) {
        let (next, skipped) = rec.next_after_with_dst_skips(t, None);
        assert_eq!(
            next,
            Some(o),
            "the walk with DST skips disagrees after {t:?}"
        );
        let mut before = t;
        for run in &skipped {
            assert!(
                run.first > before && run.first <= run.last && run.last <= o,
                "skipped run {run:?} out of place between {t:?} and {o:?}"
            );
            assert!(run.count >= 1);
            before = run.last;
        }
        t = o;
    }
}

/// A preview's slots are in instant order, and the released ones are the occurrences.
fn check_slots(rec: &Recurrence, start: Timestamp, occurrences: &[Timestamp]) {
    let Some(slots) = rec.cron_slots(start) else {
        return;
    };
    let mut released = Vec::new();
    let mut last = start;
    // Skipped slots come between released ones: allow as many again.
    for slot in slots.take(2 * OCCURRENCES) {
        assert!(
            slot.at > start && slot.at >= last,
            "slot {slot:?} out of order after {last:?}"
        );
        last = slot.at;
        if slot.released {
            released.push(slot.at);
            if released.len() == occurrences.len() {
                break;
            }
        }
    }
    let n = released.len();
    assert_eq!(
        released[..],
        occurrences[..n],
        "a preview's slots differ from the occurrences"
    );
}

/// Walking back finds the same occurrences: the latest at or before an occurrence is itself,
/// and the latest before it is the one before it.
fn check_backwards(rec: &Recurrence, start: Timestamp, occurrences: &[Timestamp]) {
    for (k, &o) in occurrences.iter().enumerate().take(CHECKED_BACKWARDS) {
        assert_eq!(
            rec.latest_at_or_before(o),
            Some(o),
            "latest at or before occurrence {o:?}"
        );
        let before = rec.latest_at_or_before(o.minus(1));
        match k {
            0 => assert!(
                before.is_none_or(|b| b <= start),
                "latest before the first occurrence after {start:?} is {before:?}"
            ),
            _ => assert_eq!(
                before,
                Some(occurrences[k - 1]),
                "latest before occurrence {o:?}"
            ),
        }
    }
}

/// Counting the occurrences from the first to the last walked finds each once.
fn check_count(rec: &Recurrence, occurrences: &[Timestamp]) {
    let (Some(&first), Some(&last)) = (occurrences.first(), occurrences.last()) else {
        return;
    };
    assert_eq!(
        rec.count_between(first, last, 10_000),
        (occurrences.len() as u64, false),
        "count between {first:?} and {last:?}"
    );
}

/// Distinct occurrences have distinct fire ids, released no earlier than they fall.
fn check_fire_ids(job: &Job, occurrences: &[Timestamp]) {
    let mut ids: Vec<_> = occurrences
        .iter()
        .map(|o| fire_id(job.spec.id(), *o))
        .collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(
        ids.len(),
        occurrences.len(),
        "two occurrences share a fire id"
    );
    for &o in occurrences {
        let due = job.due(o);
        let jitter = job.spec.jitter().max(0);
        assert!(
            due >= o && (jitter == 0 || due.since(o) < jitter) || o.0 > i64::MAX - jitter,
            "occurrence {o:?} due at {due:?} with jitter {jitter}"
        );
    }
}

/// One `advance` as the timer makes it, `late` µs after the job falls due: its fires are in
/// order, from the pending occurrence on, and the job moves past them.
fn check_advance(job: &Job, late: i64) {
    let Some(due) = job.next_due() else {
        return;
    };
    let now = due.plus(late.max(0));
    let a = advance(job, now, FIRE_ALL_CAP);
    assert!(a.fires.len() <= FIRE_ALL_CAP, "{} fires", a.fires.len());
    assert!(
        a.fires.windows(2).all(|w| w[0] < w[1]),
        "fires out of order: {:?}",
        a.fires
    );
    if let (Some(first), Some(pending)) = (a.fires.first(), job.status.next_occurrence) {
        assert!(
            *first >= pending,
            "fired {first:?} before the pending {pending:?}"
        );
    }
    if let (Some(last), Some(next)) = (a.fires.last(), a.status.next_occurrence) {
        assert!(
            next > *last,
            "next occurrence {next:?} not after fire {last:?}"
        );
    }
    if let Some(next) = a.status.next_occurrence
        && !a.fires.is_empty()
    {
        assert!(next > job.status.next_occurrence.unwrap_or(Timestamp::MIN));
    }
}
