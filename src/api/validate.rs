//! Validation at the edge: every request is checked here before anything reaches the core, and
//! a bad one is refused with INVALID_ARGUMENT and a `google.rpc.BadRequest` naming each bad field.

use std::collections::{BTreeMap, HashMap};

use prost_types::{Duration as PbDuration, Timestamp as PbTimestamp};
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use super::pb;
use crate::domain::job::job_id_for_request;
use crate::domain::ledger::OccurrenceKey;
use crate::domain::time::{MICROS_PER_MILLI, MICROS_PER_SECOND};
use crate::domain::trigger::{Recurrence, parse_cron, parse_time_zone};
use crate::domain::{
    DstGap, DstPolicy, DstRepeat, JobSpec, JobState, Micros, MisfirePolicy, OverlapPolicy,
    Timestamp, TriggerSpec,
};

pub const MAX_NAME_LEN: usize = 128;
pub const MAX_LABELS: usize = 64;
pub const MAX_LABEL_VALUE_BYTES: usize = 1024;
pub const DEFAULT_ACK_DEADLINE_MICROS: Micros = 30 * MICROS_PER_SECOND;
pub const MIN_ACK_DEADLINE_MICROS: Micros = 100 * MICROS_PER_MILLI;
pub const MAX_ACK_DEADLINE_MICROS: Micros = 3_600 * MICROS_PER_SECOND;
pub const DEFAULT_MISFIRE_GRACE_MICROS: Micros = 5 * MICROS_PER_SECOND;
pub const MAX_MISFIRE_GRACE_MICROS: Micros = 365 * 86_400 * MICROS_PER_SECOND;
pub const DEFAULT_MAX_ATTEMPTS: u32 = 10;
pub const MAX_MAX_ATTEMPTS: u32 = 1_000;
pub const MIN_PERIOD_MICROS: Micros = MICROS_PER_MILLI;
/// Longest `after`, period or jitter: 100 years.
pub const MAX_SPAN_MICROS: Micros = 100 * 366 * 86_400 * MICROS_PER_SECOND;
pub const DEFAULT_MAX_IN_FLIGHT: u32 = 64;
pub const MAX_MAX_IN_FLIGHT: u32 = 10_000;
pub const MAX_RETRY_DELAY_MICROS: Micros = 86_400 * MICROS_PER_SECOND;
pub const DEFAULT_PAGE_SIZE: usize = 100;
pub const MAX_PAGE_SIZE: usize = 1_000;
pub const MAX_FIRE_IDS_PER_CALL: usize = 10_000;
/// Earliest and latest instants protobuf Timestamps may carry (0001-01-01 to 9999-12-31).
const MIN_TIMESTAMP_SECONDS: i64 = -62_135_596_800;
const MAX_TIMESTAMP_SECONDS: i64 = 253_402_300_799;

/// Most violations one status lists; the rest are counted in its message.
pub const MAX_VIOLATIONS: usize = 100;
/// About how long a status message gets (it lists the violations again, each clipped), before
/// the count of those not listed.
pub const MAX_MESSAGE_CHARS: usize = 4_000;

/// Collects field violations; turns into one INVALID_ARGUMENT status. Keeps the first
/// [`MAX_VIOLATIONS`] and counts the rest, so that a request with a great many bad fields (a
/// label map of a hundred thousand bad keys) is not answered with an error larger than itself.
#[derive(Debug, Default)]
pub struct Violations(Vec<(String, String)>, usize);

impl Violations {
    /// Adds a violation. Field and description are cut to a few hundred characters, so an
    /// error never echoes a huge piece of client input back (or into logs).
    pub fn add(&mut self, field: impl Into<String>, description: impl Into<String>) {
        if self.0.len() >= MAX_VIOLATIONS {
            self.1 += 1;
            return;
        }
        self.0.push((
            clip(field.into(), MAX_ECHO_CHARS),
            clip(description.into(), MAX_ECHO_CHARS + 200),
        ));
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Runs `f` on violations of its own and adds them with `prefix` before each field (for a
    /// message inside a list: `requests[3].`).
    pub fn nested<R>(&mut self, prefix: &str, f: impl FnOnce(&mut Violations) -> R) -> R {
        let mut inner = Violations::default();
        let result = f(&mut inner);
        for (field, description) in inner.0 {
            self.add(format!("{prefix}{field}"), description);
        }
        self.1 += inner.1;
        result
    }

    /// `Ok(())` when nothing was wrong, else the status to return.
    pub fn into_result(self) -> Result<(), Status> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(self.into_status())
        }
    }

    /// The INVALID_ARGUMENT status listing the violations.
    pub fn into_status(self) -> Status {
        let summary = self
            .0
            .iter()
            .map(|(f, d)| format!("{f}: {d}"))
            .collect::<Vec<_>>()
            .join("; ");
        let mut summary = clip(summary, MAX_MESSAGE_CHARS);
        if self.1 > 0 {
            summary.push_str(&format!("; and {} more", self.1));
        }
        let mut details = ErrorDetails::new();
        for (field, description) in self.0 {
            details.add_bad_request_violation(field, description);
        }
        Status::with_error_details(
            Code::InvalidArgument,
            format!("invalid request: {summary}"),
            details,
        )
    }
}

/// About how much client input an error message quotes.
pub const MAX_ECHO_CHARS: usize = 200;

/// `s` cut to at most `max` characters, marked with "…" when cut.
pub fn clip(mut s: String, max: usize) -> String {
    if let Some((at, _)) = s.char_indices().nth(max) {
        s.truncate(at);
        s.push('…');
    }
    s
}

/// Checks a queue (or job id) name: 1 to 128 characters of `[A-Za-z0-9._-]`.
pub fn check_name(v: &mut Violations, field: &str, name: &str, required: bool) {
    if name.is_empty() {
        if required {
            v.add(field, "is required");
        }
        return;
    }
    if name.len() > MAX_NAME_LEN {
        v.add(
            field,
            format!(
                "is {} characters; at most {MAX_NAME_LEN} are allowed",
                name.len()
            ),
        );
    } else if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        v.add(field, "may only contain letters, digits, '.', '_' and '-'");
    }
}

/// A protobuf Timestamp as microseconds, if it is well-formed and within 0001..=9999.
pub fn timestamp(v: &mut Violations, field: &str, t: &PbTimestamp) -> Option<Timestamp> {
    if !(0..1_000_000_000).contains(&t.nanos)
        || !(MIN_TIMESTAMP_SECONDS..=MAX_TIMESTAMP_SECONDS).contains(&t.seconds)
    {
        v.add(
            field,
            "is not a valid timestamp (years 0001 to 9999, nanos in [0, 1e9))",
        );
        return None;
    }
    Some(Timestamp(
        t.seconds * MICROS_PER_SECOND + i64::from(t.nanos) / 1_000,
    ))
}

/// A protobuf Duration as microseconds, if well-formed and within `[min, max]`.
pub fn duration(
    v: &mut Violations,
    field: &str,
    d: &PbDuration,
    min: Micros,
    max: Micros,
) -> Option<Micros> {
    let same_sign = (d.seconds >= 0 && d.nanos >= 0) || (d.seconds <= 0 && d.nanos <= 0);
    if !same_sign || d.nanos.abs() >= 1_000_000_000 {
        v.add(field, "is not a valid duration");
        return None;
    }
    let micros = d
        .seconds
        .checked_mul(MICROS_PER_SECOND)
        .and_then(|s| s.checked_add(i64::from(d.nanos) / 1_000));
    match micros {
        Some(m) if m >= min && m <= max => Some(m),
        _ => {
            v.add(
                field,
                format!("must be between {} and {}", human(min), human(max)),
            );
            None
        }
    }
}

fn human(micros: Micros) -> String {
    humantime::format_duration(std::time::Duration::from_micros(micros.max(0) as u64)).to_string()
}

/// Limits that come from the server's configuration.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_payload_bytes: usize,
    /// How long a Subscribe may take to send its `open`.
    pub subscribe_open_timeout: std::time::Duration,
    /// Most bytes of jobs in one ListJobs response (below the message size limit).
    pub max_list_response_bytes: usize,
}

/// Turns a Schedule request into a job spec with defaults filled in, or says what is wrong.
pub fn schedule_request(
    req: pb::ScheduleRequest,
    limits: Limits,
    now: Timestamp,
) -> Result<JobSpec, Status> {
    let mut v = Violations::default();
    let spec = schedule_spec(&mut v, req, limits, now, true);
    v.into_result()?;
    spec.ok_or_else(|| Status::invalid_argument("invalid job"))
}

/// Most jobs in one BatchSchedule.
pub const MAX_BATCH_JOBS: usize = 1_000;

/// Validates a BatchSchedule and converts each job, in order. A violation names the request
/// it is in (`requests[3].job.queue`); explicit ids may not repeat.
pub fn batch_schedule_request(
    req: pb::BatchScheduleRequest,
    limits: Limits,
    now: Timestamp,
) -> Result<Vec<JobSpec>, Status> {
    let mut v = Violations::default();
    let n = req.requests.len();
    if n == 0 || n > MAX_BATCH_JOBS {
        v.add(
            "requests",
            format!("holds {n} requests; send 1 to {MAX_BATCH_JOBS} per call"),
        );
        return Err(v.into_status());
    }
    let mut specs = Vec::with_capacity(n);
    let mut first_with_id: HashMap<String, (usize, &str)> = HashMap::new();
    for (i, r) in req.requests.into_iter().enumerate() {
        // An explicit id, or the one a request id gives a job without one.
        let explicit = r.job.as_ref().map(|j| j.id.clone()).unwrap_or_default();
        let (id, field) = if !explicit.is_empty() {
            (explicit, "job.id")
        } else if !r.request_id.is_empty() {
            (job_id_for_request(&r.request_id), "request_id")
        } else {
            (String::new(), "")
        };
        if !id.is_empty() {
            if let Some((first, first_field)) = first_with_id.get(&id) {
                v.add(
                    format!("requests[{i}].{field}"),
                    format!(
                        "gives the same job id as requests[{first}].{first_field}; each job of \
                         a batch needs its own id"
                    ),
                );
            } else {
                first_with_id.insert(id, (i, field));
            }
        }
        specs.push(v.nested(&format!("requests[{i}]."), |v| {
            schedule_spec(v, r, limits, now, true)
        }));
    }
    v.into_result()?;
    specs
        .into_iter()
        .map(|s| s.ok_or_else(|| Status::invalid_argument("invalid job")))
        .collect()
}

/// Checks one ScheduleRequest into `v` (fields named from the request: `job.queue`), and
/// converts it when nothing was wrong with it. A proposed job (for a preview) may leave its
/// queue empty.
fn schedule_spec(
    v: &mut Violations,
    req: pb::ScheduleRequest,
    limits: Limits,
    now: Timestamp,
    queue_required: bool,
) -> Option<JobSpec> {
    let Some(job) = req.job else {
        v.add("job", "is required");
        return None;
    };
    check_name(v, "job.id", &job.id, false);
    check_name(v, "request_id", &req.request_id, false);
    check_name(v, "job.queue", &job.queue, queue_required);
    let trigger = trigger(v, job.trigger.as_ref(), now);

    if job.payload.len() > limits.max_payload_bytes {
        v.add(
            "job.payload",
            format!(
                "is {} bytes; at most {} are allowed (server flag --max-payload-bytes)",
                job.payload.len(),
                limits.max_payload_bytes
            ),
        );
    }
    let labels = labels(v, "job.labels", &job.labels);
    let end_time = job
        .end_time
        .as_ref()
        .and_then(|t| timestamp(v, "job.end_time", t));
    if let Some(end) = end_time
        && end <= now
    {
        v.add("job.end_time", "is in the past; the job would never fire");
    }
    let misfire_policy = match pb::MisfirePolicy::try_from(job.misfire_policy) {
        Ok(pb::MisfirePolicy::Unspecified | pb::MisfirePolicy::FireOnce) => MisfirePolicy::FireOnce,
        Ok(pb::MisfirePolicy::Skip) => MisfirePolicy::Skip,
        Ok(pb::MisfirePolicy::FireAll) => MisfirePolicy::FireAll,
        Err(_) => {
            v.add(
                "job.misfire_policy",
                format!("{} is not a MisfirePolicy value", job.misfire_policy),
            );
            MisfirePolicy::FireOnce
        }
    };
    let misfire_grace = match &job.misfire_grace_period {
        Some(d) => duration(
            v,
            "job.misfire_grace_period",
            d,
            0,
            MAX_MISFIRE_GRACE_MICROS,
        ),
        None => Some(DEFAULT_MISFIRE_GRACE_MICROS),
    };
    let ack_deadline = match &job.ack_deadline {
        Some(d) => duration(
            v,
            "job.ack_deadline",
            d,
            MIN_ACK_DEADLINE_MICROS,
            MAX_ACK_DEADLINE_MICROS,
        ),
        None => Some(DEFAULT_ACK_DEADLINE_MICROS),
    };
    let max_attempts = match job.max_attempts {
        0 => DEFAULT_MAX_ATTEMPTS,
        n if n > MAX_MAX_ATTEMPTS => {
            v.add(
                "job.max_attempts",
                format!("must be at most {MAX_MAX_ATTEMPTS}"),
            );
            n
        }
        n => n,
    };
    let overlap_policy = match pb::OverlapPolicy::try_from(job.overlap_policy) {
        Ok(pb::OverlapPolicy::Unspecified | pb::OverlapPolicy::Allow) => OverlapPolicy::Allow,
        Ok(pb::OverlapPolicy::Skip) => OverlapPolicy::Skip,
        Ok(pb::OverlapPolicy::BufferOne) => OverlapPolicy::BufferOne,
        Ok(pb::OverlapPolicy::Replace) => OverlapPolicy::Replace,
        Err(_) => {
            v.add(
                "job.overlap_policy",
                format!("{} is not an OverlapPolicy value", job.overlap_policy),
            );
            OverlapPolicy::Allow
        }
    };
    check_name(v, "job.dead_letter_queue", &job.dead_letter_queue, false);
    if !job.dead_letter_queue.is_empty() && job.dead_letter_queue == job.queue {
        v.add("job.dead_letter_queue", "must differ from job.queue");
    }

    if !v.is_empty() {
        return None;
    }
    // Every `None` below has added a violation.
    let (Some(trigger), Some(misfire_grace), Some(ack_deadline)) =
        (trigger, misfire_grace, ack_deadline)
    else {
        return None;
    };
    // A retried request without an id finds the job its first attempt created.
    let id = if job.id.is_empty() && !req.request_id.is_empty() {
        job_id_for_request(&req.request_id)
    } else {
        job.id
    };
    Some(JobSpec {
        id: id.into(),
        queue: job.queue,
        trigger,
        // A slice of the request's receive buffer: the job held in memory copies it into its
        // own allocation (`PackedSpec`), so the buffer is not pinned beyond the call.
        payload: job.payload,
        labels,
        max_fires: job.max_fires,
        end_time,
        misfire_policy,
        misfire_grace,
        ack_deadline,
        max_attempts,
        dead_letter_queue: (!job.dead_letter_queue.is_empty()).then_some(job.dead_letter_queue),
        overlap_policy,
    })
}

fn trigger(v: &mut Violations, t: Option<&pb::Trigger>, now: Timestamp) -> Option<TriggerSpec> {
    use pb::trigger::Kind;
    let Some(kind) = t.and_then(|t| t.kind.as_ref()) else {
        v.add(
            "job.trigger",
            "is required: set one of at, after, every or cron",
        );
        return None;
    };
    match kind {
        Kind::At(at) => timestamp(v, "job.trigger.at", at).map(|at| TriggerSpec::At { at }),
        Kind::After(d) => duration(v, "job.trigger.after", d, 0, MAX_SPAN_MICROS)
            .map(|after| TriggerSpec::After { after }),
        Kind::Every(every) => {
            let period = match &every.period {
                Some(p) => duration(
                    v,
                    "job.trigger.every.period",
                    p,
                    MIN_PERIOD_MICROS,
                    MAX_SPAN_MICROS,
                ),
                None => {
                    v.add("job.trigger.every.period", "is required");
                    None
                }
            };
            let start_time = match &every.start_time {
                Some(s) => Some(timestamp(v, "job.trigger.every.start_time", s)?),
                None => None,
            };
            let jitter = match &every.jitter {
                Some(j) => duration(v, "job.trigger.every.jitter", j, 0, MAX_SPAN_MICROS)?,
                None => 0,
            };
            let period = period?;
            if jitter > period {
                v.add("job.trigger.every.jitter", "must not exceed the period");
                return None;
            }
            Some(TriggerSpec::Every {
                period,
                start_time,
                jitter,
            })
        }
        Kind::Cron(c) => {
            if c.expression.trim().is_empty() {
                v.add("job.trigger.cron.expression", "is required");
                return None;
            }
            let cron = parse_cron(&c.expression);
            if let Err(e) = &cron {
                v.add("job.trigger.cron.expression", e.to_string());
            }
            let tz = parse_time_zone(&c.time_zone);
            if let Err(e) = &tz {
                v.add("job.trigger.cron.time_zone", e.to_string());
            }
            let dst = dst_policy(v, c.dst_policy.as_ref());
            let (Ok(cron), Ok(tz), Some(dst)) = (cron, tz, dst) else {
                return None;
            };
            let rec = Recurrence::Cron {
                cron: std::sync::Arc::new(cron),
                tz,
                dst,
            };
            if rec.next_after(now).is_none() {
                v.add(
                    "job.trigger.cron.expression",
                    format!("{:?} never fires", c.expression),
                );
                return None;
            }
            Some(TriggerSpec::Cron {
                expression: c.expression.clone(),
                time_zone: c.time_zone.clone(),
                dst,
            })
        }
    }
}

/// Checks a cron trigger's DST policy; absent is the default.
fn dst_policy(v: &mut Violations, p: Option<&pb::DstPolicy>) -> Option<DstPolicy> {
    let Some(p) = p else {
        return Some(DstPolicy::default());
    };
    let gap = match pb::DstGapPolicy::try_from(p.gap) {
        Ok(pb::DstGapPolicy::Unspecified) => Some(DstGap::Auto),
        Ok(pb::DstGapPolicy::Shift) => Some(DstGap::Shift),
        Ok(pb::DstGapPolicy::Skip) => Some(DstGap::Skip),
        Err(_) => {
            v.add(
                "job.trigger.cron.dst_policy.gap",
                format!("{} is not a DstGapPolicy value", p.gap),
            );
            None
        }
    };
    let repeat = match pb::DstRepeatPolicy::try_from(p.repeat) {
        Ok(pb::DstRepeatPolicy::Unspecified) => Some(DstRepeat::Auto),
        Ok(pb::DstRepeatPolicy::First) => Some(DstRepeat::First),
        Ok(pb::DstRepeatPolicy::Last) => Some(DstRepeat::Last),
        Ok(pb::DstRepeatPolicy::Both) => Some(DstRepeat::Both),
        Err(_) => {
            v.add(
                "job.trigger.cron.dst_policy.repeat",
                format!("{} is not a DstRepeatPolicy value", p.repeat),
            );
            None
        }
    };
    Some(DstPolicy {
        gap: gap?,
        repeat: repeat?,
    })
}

/// Checks a label map: at most 64 entries, keys of `[A-Za-z0-9._/-]{1,128}`, values of at most
/// 1024 bytes.
pub fn labels(
    v: &mut Violations,
    field: &str,
    labels: &std::collections::HashMap<String, String>,
) -> BTreeMap<String, String> {
    if labels.len() > MAX_LABELS {
        v.add(
            field,
            format!(
                "has {} labels; at most {MAX_LABELS} are allowed",
                labels.len()
            ),
        );
    }
    for (k, val) in labels {
        let key_ok = !k.is_empty()
            && k.len() <= MAX_NAME_LEN
            && k.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'/'));
        if !key_ok {
            v.add(
                format!("{field}[{k}]"),
                format!("label keys must be 1 to {MAX_NAME_LEN} characters of letters, digits, '.', '_', '-' and '/'"),
            );
        }
        if val.len() > MAX_LABEL_VALUE_BYTES {
            v.add(
                format!("{field}[{k}]"),
                format!("label values may be at most {MAX_LABEL_VALUE_BYTES} bytes"),
            );
        }
    }
    labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

/// Checks a job id given to CancelJob, GetJob, PauseJob or ResumeJob.
pub fn job_id(id: &str) -> Result<(), Status> {
    let mut v = Violations::default();
    check_name(&mut v, "id", id, true);
    v.into_result()
}

/// Checks a list of fire ids.
pub fn fire_ids(v: &mut Violations, field: &str, ids: &[String]) {
    if ids.len() > MAX_FIRE_IDS_PER_CALL {
        v.add(
            field,
            format!(
                "has {} ids; at most {MAX_FIRE_IDS_PER_CALL} per message",
                ids.len()
            ),
        );
    }
    if ids.iter().any(|id| id.is_empty() || id.len() > 256) {
        v.add(field, "fire ids must be 1 to 256 characters");
    }
}

/// The fields UpdateJob can change, as update_mask names them.
const UPDATABLE: [&str; 11] = [
    "trigger",
    "payload",
    "labels",
    "max_fires",
    "end_time",
    "misfire_policy",
    "misfire_grace_period",
    "ack_deadline",
    "max_attempts",
    "dead_letter_queue",
    "overlap_policy",
];

/// What an UpdateJob names: the job, the fields to change, and the etag it was read with.
#[derive(Debug)]
pub struct UpdateTarget {
    pub id: String,
    pub paths: Vec<&'static str>,
    pub etag: Option<String>,
}

/// Checks an UpdateJob's job id and update_mask.
pub fn update_target(req: &pb::UpdateJobRequest) -> Result<UpdateTarget, Status> {
    let mut v = Violations::default();
    let id = req.job.as_ref().map(|j| j.id.clone()).unwrap_or_default();
    if req.job.is_none() {
        v.add("job", "is required");
    } else {
        check_name(&mut v, "job.id", &id, true);
    }
    let mut paths = Vec::new();
    match &req.update_mask {
        None => v.add(
            "update_mask",
            format!(
                "is required: name the fields to change ({}), or *",
                UPDATABLE.join(", ")
            ),
        ),
        Some(mask) if mask.paths.is_empty() => v.add(
            "update_mask",
            format!(
                "names no field: name the fields to change ({}), or *",
                UPDATABLE.join(", ")
            ),
        ),
        Some(mask) => {
            for path in &mask.paths {
                match path.as_str() {
                    "*" => paths.extend(UPDATABLE),
                    "id" | "queue" => v.add(
                        "update_mask",
                        format!("{path} cannot change; schedule a new job instead"),
                    ),
                    p => match UPDATABLE.iter().find(|u| **u == p) {
                        Some(u) => paths.push(*u),
                        None => v.add(
                            "update_mask",
                            format!(
                                "{:?} is not a field UpdateJob can change ({})",
                                clip(p.to_string(), MAX_ECHO_CHARS),
                                UPDATABLE.join(", ")
                            ),
                        ),
                    },
                }
            }
        }
    }
    v.into_result()?;
    paths.sort_unstable();
    paths.dedup();
    let etag = req
        .job
        .as_ref()
        .map(|j| j.etag.clone())
        .filter(|e| !e.is_empty());
    Ok(UpdateTarget { id, paths, etag })
}

/// The spec an UpdateJob asks for: `current` (the job as read, in API form) with the named
/// fields taken from `new`, checked as Schedule checks a job (violations name `job.<field>`).
pub fn updated_spec(
    mut current: pb::Job,
    new: &pb::Job,
    paths: &[&str],
    limits: Limits,
    now: Timestamp,
) -> Result<JobSpec, Status> {
    for path in paths {
        match *path {
            "trigger" => current.trigger = new.trigger.clone(),
            "payload" => current.payload = new.payload.clone(),
            "labels" => current.labels = new.labels.clone(),
            "max_fires" => current.max_fires = new.max_fires,
            "end_time" => current.end_time = new.end_time,
            "misfire_policy" => current.misfire_policy = new.misfire_policy,
            "misfire_grace_period" => current.misfire_grace_period = new.misfire_grace_period,
            "ack_deadline" => current.ack_deadline = new.ack_deadline,
            "max_attempts" => current.max_attempts = new.max_attempts,
            "dead_letter_queue" => current.dead_letter_queue = new.dead_letter_queue.clone(),
            "overlap_policy" => current.overlap_policy = new.overlap_policy,
            _ => {}
        }
    }
    // An end_time the update does not name is the job's own; a paused job's may have passed
    // (it completes when resumed), which must not refuse an update of its payload.
    let kept_end = (!paths.contains(&"end_time")).then(|| current.end_time.take());
    let mut v = Violations::default();
    let spec = schedule_spec(
        &mut v,
        pb::ScheduleRequest {
            job: Some(current),
            ..Default::default()
        },
        limits,
        now,
        true,
    );
    v.into_result()?;
    let mut spec = spec.ok_or_else(|| Status::invalid_argument("invalid job"))?;
    if let Some(end) = kept_end {
        let mut v = Violations::default();
        spec.end_time = end.and_then(|t| timestamp(&mut v, "job.end_time", &t));
        v.into_result()?;
    }
    Ok(spec)
}

/// Most occurrences one PreviewOccurrences returns, and how many it returns by default.
pub const MAX_PREVIEW_OCCURRENCES: usize = 1_000;
pub const DEFAULT_PREVIEW_OCCURRENCES: usize = 10;

/// Whose occurrences a preview lists.
#[derive(Debug)]
pub enum PreviewSubject {
    Existing(String),
    Proposed(JobSpec),
}

/// A validated PreviewOccurrences request.
#[derive(Debug)]
pub struct PreviewQuery {
    pub subject: PreviewSubject,
    pub from: Option<Timestamp>,
    pub to: Option<Timestamp>,
    pub max: usize,
}

pub fn preview_request(
    req: pb::PreviewOccurrencesRequest,
    limits: Limits,
    now: Timestamp,
) -> Result<PreviewQuery, Status> {
    use pb::preview_occurrences_request::Subject;
    let mut v = Violations::default();
    let from = req
        .start_time
        .as_ref()
        .and_then(|t| timestamp(&mut v, "start_time", t));
    let subject = match req.subject {
        None => {
            v.add(
                "job_id",
                "give job_id (an existing job) or job (a proposed one)",
            );
            None
        }
        Some(Subject::JobId(id)) => {
            check_name(&mut v, "job_id", &id, true);
            Some(PreviewSubject::Existing(id))
        }
        Some(Subject::Job(job)) => schedule_spec(
            &mut v,
            pb::ScheduleRequest {
                job: Some(job),
                ..Default::default()
            },
            limits,
            // As if scheduled at the range's start: an end_time before now is fine for a
            // range in the past.
            from.unwrap_or(now),
            false,
        )
        .map(PreviewSubject::Proposed),
    };
    let to = req
        .end_time
        .as_ref()
        .and_then(|t| timestamp(&mut v, "end_time", t));
    if let (Some(from), Some(to)) = (from, to)
        && to <= from
    {
        v.add("end_time", "must be after start_time");
    }
    let max = match req.max_occurrences {
        0 => DEFAULT_PREVIEW_OCCURRENCES,
        n if n < 0 || n as usize > MAX_PREVIEW_OCCURRENCES => {
            v.add(
                "max_occurrences",
                format!("is {n}; ask for 1 to {MAX_PREVIEW_OCCURRENCES} (0 for {DEFAULT_PREVIEW_OCCURRENCES})"),
            );
            0
        }
        n => n as usize,
    };
    v.into_result()?;
    let subject = subject.ok_or_else(|| Status::invalid_argument("invalid preview request"))?;
    Ok(PreviewQuery {
        subject,
        from,
        to,
        max,
    })
}

/// A validated ListJobs request.
#[derive(Debug)]
pub struct ListQuery {
    pub filter: crate::scheduler::JobFilter,
    pub page_size: usize,
    pub after: Option<String>,
    /// Whether payloads are returned (JOB_VIEW_FULL).
    pub with_payload: bool,
}

pub fn list_request(req: pb::ListJobsRequest) -> Result<ListQuery, Status> {
    let mut v = Violations::default();
    check_name(&mut v, "queue", &req.queue, false);
    // A state named twice counts once; the first bad value is reported.
    let mut states = Vec::new();
    let mut bad_state = None;
    for s in &req.states {
        let state = match pb::JobState::try_from(*s) {
            Ok(pb::JobState::Scheduled) => JobState::Scheduled,
            Ok(pb::JobState::Paused) => JobState::Paused,
            Ok(pb::JobState::Completed) => JobState::Completed,
            Ok(pb::JobState::Cancelled) => JobState::Cancelled,
            Ok(pb::JobState::Unspecified) | Err(_) => {
                bad_state.get_or_insert(*s);
                continue;
            }
        };
        if !states.contains(&state) {
            states.push(state);
        }
    }
    if let Some(s) = bad_state {
        v.add("states", format!("{s} is not a job state to filter on"));
    }
    let with_payload = match pb::JobView::try_from(req.view) {
        Ok(pb::JobView::Full) => true,
        Ok(pb::JobView::Basic | pb::JobView::Unspecified) => false,
        Err(_) => {
            v.add("view", format!("{} is not a job view", req.view));
            false
        }
    };
    let labels = labels(&mut v, "labels", &req.labels);
    let page_size = page_size(&mut v, req.page_size);
    let after = if req.page_token.is_empty() {
        None
    } else {
        match decode_page_token(&req.page_token) {
            Some(id) => Some(id),
            None => {
                v.add("page_token", "is not a token returned by ListJobs");
                None
            }
        }
    };
    v.into_result()?;
    Ok(ListQuery {
        filter: crate::scheduler::JobFilter {
            queue: (!req.queue.is_empty()).then_some(req.queue),
            states,
            labels,
        },
        page_size,
        after,
        with_payload,
    })
}

/// A list call's page size: the default for 0, at most the maximum (AIP-158).
fn page_size(v: &mut Violations, asked: i32) -> usize {
    match asked {
        n if n < 0 => {
            v.add("page_size", "must not be negative");
            0
        }
        0 => DEFAULT_PAGE_SIZE,
        n => (n as usize).min(MAX_PAGE_SIZE),
    }
}

/// A validated ListOccurrences request.
#[derive(Debug)]
pub struct OccurrencesQuery {
    pub job_id: String,
    pub page_size: usize,
    pub after: Option<OccurrenceKey>,
}

pub fn occurrences_request(req: pb::ListOccurrencesRequest) -> Result<OccurrencesQuery, Status> {
    let mut v = Violations::default();
    check_name(&mut v, "job_id", &req.job_id, true);
    let page_size = page_size(&mut v, req.page_size);
    let after = if req.page_token.is_empty() {
        None
    } else {
        let key = decode_occurrence_token(&req.page_token);
        if key.is_none() {
            v.add("page_token", "is not a token returned by ListOccurrences");
        }
        key
    };
    v.into_result()?;
    Ok(OccurrencesQuery {
        job_id: req.job_id,
        page_size,
        after,
    })
}

/// Checks a BackfillJob request: the job id and its range `[start_time, end_time)`.
pub fn backfill_request(req: &pb::BackfillJobRequest) -> Result<(Timestamp, Timestamp), Status> {
    let mut v = Violations::default();
    check_name(&mut v, "id", &req.id, true);
    let mut time = |field: &str, t: &Option<PbTimestamp>| match t {
        None => {
            v.add(field, "is required");
            None
        }
        Some(t) => timestamp(&mut v, field, t),
    };
    let start = time("start_time", &req.start_time);
    let end = time("end_time", &req.end_time);
    if let (Some(s), Some(e)) = (start, end)
        && e <= s
    {
        v.add("end_time", "must be after start_time");
    }
    v.into_result()?;
    match (start, end) {
        (Some(s), Some(e)) => Ok((s, e)),
        _ => Err(Status::internal("backfill range checked but missing")),
    }
}

const OCCURRENCE_TOKEN_PREFIX: &str = "o1.";

/// An opaque ListOccurrences page token: a version prefix and the last entry's key.
pub fn encode_occurrence_token((at, triggered): OccurrenceKey) -> String {
    format!(
        "{OCCURRENCE_TOKEN_PREFIX}{}.{}",
        at.0,
        if triggered { 't' } else { 's' }
    )
}

fn decode_occurrence_token(token: &str) -> Option<OccurrenceKey> {
    let (at, kind) = token
        .strip_prefix(OCCURRENCE_TOKEN_PREFIX)?
        .split_once('.')?;
    let triggered = match kind {
        "t" => true,
        "s" => false,
        _ => return None,
    };
    Some((Timestamp(at.parse().ok()?), triggered))
}

const PAGE_TOKEN_PREFIX: &str = "j1.";

/// An opaque page token: a version prefix and the last id, hex-encoded.
pub fn encode_page_token(last_id: &str) -> String {
    let mut s = String::from(PAGE_TOKEN_PREFIX);
    for b in last_id.bytes() {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

fn decode_page_token(token: &str) -> Option<String> {
    let hex = token.strip_prefix(PAGE_TOKEN_PREFIX)?;
    if hex.len() % 2 != 0 || hex.len() > 2 * MAX_NAME_LEN {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect();
    String::from_utf8(bytes?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Occurrence page tokens round-trip and garbage is refused.
    #[test]
    fn occurrence_tokens_round_trip() {
        for key in [
            (Timestamp(-5), true),
            (Timestamp(1_700_000_000_000_000), false),
        ] {
            assert_eq!(
                decode_occurrence_token(&encode_occurrence_token(key)),
                Some(key)
            );
        }
        for bad in ["", "o1.", "o1.12", "o1.12.x", "o1.x.s", "j1.12.s"] {
            assert_eq!(decode_occurrence_token(bad), None, "{bad}");
        }
    }

    /// Page tokens round-trip and garbage is refused.
    #[test]
    fn page_tokens_round_trip() {
        let t = encode_page_token("job-1.a_b");
        assert_eq!(decode_page_token(&t).as_deref(), Some("job-1.a_b"));
        assert_eq!(decode_page_token("nonsense"), None);
        assert_eq!(decode_page_token("j1.zz"), None);
        assert_eq!(decode_page_token("j1.é1"), None);
    }

    /// Names outside the allowed alphabet or length are refused with the field named.
    #[test]
    fn names_are_checked() {
        let mut v = Violations::default();
        check_name(&mut v, "job.queue", "ok.name_1-2", true);
        assert!(v.is_empty());
        check_name(&mut v, "job.queue", "", true);
        check_name(&mut v, "job.queue", "has space", true);
        check_name(&mut v, "job.queue", &"x".repeat(129), true);
        assert_eq!(v.0.len(), 3);
        assert!(v.0.iter().all(|(f, _)| f == "job.queue"));
    }

    /// A proposed job is checked as if scheduled at the preview's start: an end_time already
    /// past is fine for a range that lies before it, and refused for a range from now.
    #[test]
    fn a_proposed_job_is_checked_at_the_preview_start() {
        use prost_types::Timestamp as PbTimestamp;
        let now = Timestamp(2_000_000_000_000_000);
        let at = |s: i64| PbTimestamp {
            seconds: s,
            nanos: 0,
        };
        let request = |start: Option<PbTimestamp>| pb::PreviewOccurrencesRequest {
            subject: Some(pb::preview_occurrences_request::Subject::Job(pb::Job {
                trigger: Some(pb::Trigger {
                    kind: Some(pb::trigger::Kind::Cron(pb::Cron {
                        expression: "0 * * * *".into(),
                        ..Default::default()
                    })),
                }),
                end_time: Some(at(1_000_000)),
                ..Default::default()
            })),
            start_time: start,
            ..Default::default()
        };
        let limits = Limits {
            max_payload_bytes: 1024,
            subscribe_open_timeout: std::time::Duration::from_secs(1),
            max_list_response_bytes: 1 << 20,
        };
        assert!(preview_request(request(Some(at(900_000))), limits, now).is_ok());
        let refused = preview_request(request(None), limits, now).expect_err("end in the past");
        assert!(
            refused.message().contains("job.end_time"),
            "{}",
            refused.message()
        );
    }

    /// A request with a great many bad fields is refused with a bounded status: the first
    /// violations and a count of the rest. Each bad label key used to add one, so a ListJobs
    /// of 1 MB was refused with 20 MB of message and details (the `request` fuzz target now
    /// checks the bound).
    #[test]
    fn a_great_many_violations_make_a_bounded_status() {
        let req = pb::ListJobsRequest {
            labels: (0..100_000)
                .map(|i| (format!("!{i}"), String::new()))
                .collect(),
            ..Default::default()
        };
        let status = list_request(req).expect_err("bad label keys");
        let listed = status
            .get_error_details()
            .bad_request()
            .map_or(0, |b| b.field_violations.len());
        assert_eq!(listed, MAX_VIOLATIONS);
        assert!(status.message().chars().count() <= MAX_MESSAGE_CHARS + 100);
        assert!(
            status.message().ends_with("and 99901 more"),
            "{}",
            status.message()
        );
        assert!(
            status.details().len() < 64 * 1024,
            "{}",
            status.details().len()
        );
        // Nested violations are counted too.
        let mut v = Violations::default();
        v.nested("requests[0].", |inner| {
            for i in 0..150 {
                inner.add(format!("f{i}"), "bad");
            }
        });
        assert_eq!((v.0.len(), v.1), (MAX_VIOLATIONS, 50));
        assert!(v.into_status().message().ends_with("and 50 more"));
    }

    /// Durations out of range or malformed are refused; defaults are in range.
    #[test]
    fn durations_are_checked() {
        let mut v = Violations::default();
        let d = |seconds, nanos| PbDuration { seconds, nanos };
        assert_eq!(
            duration(&mut v, "f", &d(1, 500_000_000), 0, 10_000_000),
            Some(1_500_000)
        );
        assert_eq!(duration(&mut v, "f", &d(-1, 0), 0, 10_000_000), None);
        assert_eq!(duration(&mut v, "f", &d(1, -1), 0, 10_000_000), None);
        assert_eq!(duration(&mut v, "f", &d(i64::MAX, 0), 0, i64::MAX), None);
        assert_eq!(v.0.len(), 3);
    }
}
