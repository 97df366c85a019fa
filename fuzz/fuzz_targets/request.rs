//! Requests as a client could send them: the first byte picks the message (see
//! `tickd_fuzz::Request`), the rest is decoded as its protobuf encoding, then checked by the
//! validation in `src/api/validate.rs` that the service runs first, and what it accepts is
//! turned into domain types as the service turns it.
//!
//! Nothing may panic. A refusal is INVALID_ARGUMENT carrying a `google.rpc.BadRequest` whose
//! every violation names a field, each clipped to about `MAX_ECHO_CHARS`, at most
//! `MAX_VIOLATIONS` of them. A job spec that is accepted makes a job, packs and stores (encodes
//! and decodes) to the same spec, and previews.

#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use tickd::api::pb;
use tickd::api::validate::{
    self, Limits, MAX_ECHO_CHARS, MAX_MESSAGE_CHARS, MAX_VIOLATIONS, PreviewSubject, Violations,
};
use tickd::domain::backfill;
use tickd::domain::job::etag;
use tickd::domain::preview::{self, preview};
use tickd::domain::{Job, JobSpec, PackedSpec, Timestamp, advance};
use tickd::store::codec;
use tickd_fuzz::Request;
use tonic::{Code, Status};
use tonic_types::StatusExt;

/// 2026-01-01T00:00:00Z: the server's "now".
const NOW: Timestamp = Timestamp(tickd_fuzz::DEFAULT_START_MICROS);

const LIMITS: Limits = Limits {
    // Small, so that a fuzzer's input can pass it.
    max_payload_bytes: 1024,
    subscribe_open_timeout: std::time::Duration::from_secs(10),
    max_list_response_bytes: 1 << 20,
};

fuzz_target!(|data: &[u8]| {
    let Some((&first, bytes)) = data.split_first() else {
        return;
    };
    match Request::of(first) {
        Request::Schedule => {
            let Ok(req) = pb::ScheduleRequest::decode(bytes) else {
                return;
            };
            if let Some(spec) = accepted(validate::schedule_request(req, LIMITS, NOW)) {
                check_spec(spec, NOW);
            }
        }
        Request::BatchSchedule => {
            let Ok(req) = pb::BatchScheduleRequest::decode(bytes) else {
                return;
            };
            let n = req.requests.len();
            if let Some(specs) = accepted(validate::batch_schedule_request(req, LIMITS, NOW)) {
                assert_eq!(
                    specs.len(),
                    n,
                    "a batch accepted a different number of jobs"
                );
                let mut ids: Vec<_> = specs
                    .iter()
                    .filter(|s| !s.id.is_empty())
                    .map(|s| s.id.clone())
                    .collect();
                let named = ids.len();
                ids.sort_unstable();
                ids.dedup();
                assert_eq!(ids.len(), named, "a batch accepted one id twice");
                for spec in specs {
                    check_spec(spec, NOW);
                }
            }
        }
        Request::UpdateJob => {
            let Ok(req) = pb::UpdateJobRequest::decode(bytes) else {
                return;
            };
            let Some(target) = accepted(validate::update_target(&req)) else {
                return;
            };
            assert!(!target.paths.is_empty(), "an update that changes nothing");
            let new = req.job.clone().unwrap_or_default();
            // The job as the service would have read it, in API form.
            let current = current_job(&target.id);
            if let Some(spec) = accepted(validate::updated_spec(
                current,
                &new,
                &target.paths,
                LIMITS,
                NOW,
            )) {
                assert_eq!(&*spec.id, target.id, "an update changed the job's id");
                check_spec(spec, NOW);
            }
        }
        Request::PreviewOccurrences => {
            let Ok(req) = pb::PreviewOccurrencesRequest::decode(bytes) else {
                return;
            };
            let Some(q) = accepted(validate::preview_request(req, LIMITS, NOW)) else {
                return;
            };
            assert!(q.max >= 1 && q.max <= validate::MAX_PREVIEW_OCCURRENCES);
            let job = match q.subject {
                PreviewSubject::Existing(id) => existing_job(&id),
                PreviewSubject::Proposed(spec) => preview::proposed(spec, q.from.unwrap_or(NOW))
                    .expect("validation resolved the trigger: a proposed job is made"),
            };
            let p = preview(&job, q.from, q.to, q.max);
            assert!(p.occurrences.len() <= q.max);
            assert!(
                p.occurrences
                    .windows(2)
                    .all(|w| w[0].scheduled <= w[1].scheduled),
                "preview out of order"
            );
            for o in &p.occurrences {
                assert!(q.from.is_none_or(|f| o.scheduled >= f));
                assert!(q.to.is_none_or(|t| o.scheduled < t));
                assert_eq!(o.skipped, o.release.is_none());
            }
        }
        Request::ListJobs => {
            let Ok(req) = pb::ListJobsRequest::decode(bytes) else {
                return;
            };
            if let Some(q) = accepted(validate::list_request(req)) {
                assert!(q.page_size >= 1 && q.page_size <= validate::MAX_PAGE_SIZE);
                if let Some(after) = &q.after {
                    // A token decodes to the id it was made of.
                    let again = pb::ListJobsRequest {
                        page_token: validate::encode_page_token(after),
                        ..Default::default()
                    };
                    let q2 = validate::list_request(again).expect("a token tickd made");
                    assert_eq!(q2.after.as_deref(), Some(after.as_str()));
                }
            }
        }
        Request::ListOccurrences => {
            let Ok(req) = pb::ListOccurrencesRequest::decode(bytes) else {
                return;
            };
            if let Some(q) = accepted(validate::occurrences_request(req)) {
                assert!(q.page_size >= 1 && q.page_size <= validate::MAX_PAGE_SIZE);
                if let Some(key) = q.after {
                    let again = pb::ListOccurrencesRequest {
                        job_id: q.job_id.clone(),
                        page_token: validate::encode_occurrence_token(key),
                        ..Default::default()
                    };
                    let q2 = validate::occurrences_request(again).expect("a token tickd made");
                    assert_eq!(q2.after, Some(key));
                }
            }
        }
        Request::BackfillJob => {
            let Ok(req) = pb::BackfillJobRequest::decode(bytes) else {
                return;
            };
            if let Some((start, end)) = accepted(validate::backfill_request(&req)) {
                assert!(start < end);
                let job = existing_job(&req.id);
                if backfill::admissible(&job, start, NOW).is_ok()
                    && let Ok(fires) = backfill::occurrences(&job, start, end, NOW)
                {
                    assert!(fires.len() <= backfill::MAX_OCCURRENCES);
                    assert!(fires.windows(2).all(|w| w[0] < w[1]));
                    assert!(fires.iter().all(|o| *o >= start && *o < end && *o <= NOW));
                }
            }
        }
        Request::Ack => {
            let Ok(req) = pb::AckRequest::decode(bytes) else {
                return;
            };
            // As the service's Ack checks it.
            let mut v = Violations::default();
            validate::check_name(&mut v, "queue", &req.queue, true);
            validate::fire_ids(&mut v, "fire_ids", &req.fire_ids);
            accepted(v.into_result());
        }
        Request::JobId => {
            let Ok(req) = pb::GetJobRequest::decode(bytes) else {
                return;
            };
            accepted(validate::job_id(&req.id));
        }
    }
});

/// The value validation accepted, or `None` after checking how it refused: INVALID_ARGUMENT
/// with a BadRequest whose violations each name a field, nothing echoed at length.
fn accepted<T>(result: Result<T, Status>) -> Option<T> {
    let status = match result {
        Ok(value) => return Some(value),
        Err(status) => status,
    };
    assert_eq!(
        status.code(),
        Code::InvalidArgument,
        "refused with {:?}: {}",
        status.code(),
        status.message()
    );
    let details = status.get_error_details();
    let bad_request = details
        .bad_request()
        .unwrap_or_else(|| panic!("no BadRequest details: {}", status.message()));
    assert!(
        !bad_request.field_violations.is_empty(),
        "a BadRequest without violations: {}",
        status.message()
    );
    // However many fields are bad, the status stays small.
    assert!(bad_request.field_violations.len() <= MAX_VIOLATIONS);
    assert!(status.message().chars().count() <= MAX_MESSAGE_CHARS + 64);
    for v in &bad_request.field_violations {
        assert!(!v.field.is_empty(), "a violation names no field: {v:?}");
        assert!(!v.description.is_empty(), "a violation says nothing: {v:?}");
        // `Violations::add` clips each to MAX_ECHO_CHARS (+200 for descriptions), plus "…".
        assert!(v.field.chars().count() <= MAX_ECHO_CHARS + 1, "{v:?}");
        assert!(
            v.description.chars().count() <= MAX_ECHO_CHARS + 201,
            "{v:?}"
        );
    }
    None
}

/// A job the validation accepted: it makes a job, packs and is stored as itself, and can be
/// walked and advanced.
fn check_spec(spec: JobSpec, now: Timestamp) {
    let packed = PackedSpec::new(&spec);
    assert!(packed == spec, "packing changed the spec: {spec:?}");
    // A packed spec is stored exactly as the spec it was made of (its etag depends on it).
    let from_spec = codec::encode(&spec).expect("a spec encodes");
    let from_packed = codec::encode(&packed).expect("a packed spec encodes");
    assert_eq!(from_spec, from_packed, "packed and plain encodings differ");
    let read = codec::decode_spec("job_specs", &spec.id, &from_packed).expect("a record we wrote");
    assert!(read == spec, "the stored spec reads back different");
    assert_eq!(etag(&read), etag(&packed));
    let read: JobSpec =
        codec::decode("job_specs", &spec.id, &from_spec).expect("a record we wrote");
    assert_eq!(read, spec);

    let job = Job::create(spec, now).expect("an accepted spec makes a job");
    if let Some(due) = job.next_due() {
        let a = advance(&job, due, 16);
        assert!(a.fires.windows(2).all(|w| w[0] < w[1]));
    }
    let p = preview(&job, None, None, 5);
    assert!(p.occurrences.len() <= 5);
}

/// The job an id names, as if it existed: an hourly cron job created a day before [`NOW`].
fn existing_job(id: &str) -> Job {
    let spec = validate::schedule_request(
        pb::ScheduleRequest {
            job: Some(current_job(id)),
            request_id: String::new(),
        },
        LIMITS,
        Timestamp(NOW.0 - 86_400_000_000),
    )
    .expect("the existing job is valid");
    Job::create(spec, Timestamp(NOW.0 - 86_400_000_000)).expect("the existing job")
}

/// An existing job in API form, as UpdateJob reads it before applying the update.
fn current_job(id: &str) -> pb::Job {
    pb::Job {
        id: id.to_string(),
        queue: "q".into(),
        trigger: Some(pb::Trigger {
            kind: Some(pb::trigger::Kind::Cron(pb::Cron {
                expression: "0 * * * *".into(),
                time_zone: "Europe/Berlin".into(),
                ..Default::default()
            })),
        }),
        payload: b"payload".to_vec().into(),
        misfire_grace_period: Some(prost_types::Duration {
            seconds: 5,
            nanos: 0,
        }),
        ack_deadline: Some(prost_types::Duration {
            seconds: 30,
            nanos: 0,
        }),
        max_attempts: 10,
        ..Default::default()
    }
}
