//! Writes the seed corpora under `fuzz/corpus/<target>/` with tickd's own encoders: the cron
//! expressions, zones and DST policies the tests use, valid (and a few invalid) requests of
//! every kind, and store records of every kind as the stores write them.
//!
//! `cargo run --example make_seeds` in `fuzz/` (a plain build: no nightly flags). Files are
//! named by what they hold and overwritten with the same bytes on every run; seeds kept from
//! crashes (`regress-*`) are left alone.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

// Linked for the coverage hooks that builds with cargo fuzz's flags refer to.
use libfuzzer_sys as _;
use prost::Message;
use tickd::api::pb;
use tickd::domain::ledger::{Outcome, SkipReason};
use tickd::domain::{
    DstGap, DstPolicy, DstRepeat, FireRecord, JobSpec, JobState, JobStatus, MisfirePolicy,
    Occurrence, OverlapPolicy, PackedSpec, Timestamp, TraceContext, TriggerSpec,
};
use tickd::store::{Write, codec, fuzzing};
use tickd_fuzz::{CronInput, DEFAULT_START_MICROS, Record, Request};

const S: i64 = 1_000_000;

fn main() -> std::io::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    cron(&root.join("cron"))?;
    requests(&root.join("request"))?;
    records(&root.join("store_record"))?;
    Ok(())
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join(name), bytes)
}

/// Cron expressions and zones from the tests (src/domain/*, tests/dst/occurrences.json), each
/// started just before a DST change, with every policy; and the other triggers.
fn cron(dir: &Path) -> std::io::Result<()> {
    let berlin_spring = 1_774_742_400 * S; // 2026-03-29T00:00:00Z, the night the clocks go forward
    let berlin_fall = 1_792_886_400 * S; // 2026-10-25T00:00:00Z, the night they go back
    let ny_fall = 1_793_509_200 * S; // 2026-11-01T04:00:00Z
    let apia_skipped_day = 1_325_116_800 * S; // 2011-12-29T00:00:00Z
    let lord_howe = 1_775_318_400 * S; // 2026-04-04T16:00:00Z, half an hour back
    let cases: &[(&str, &str, &str, i64)] = &[
        ("utc-every-minute", "* * * * *", "", DEFAULT_START_MICROS),
        (
            "utc-every-10s",
            "*/10 * * * * *",
            "UTC",
            DEFAULT_START_MICROS,
        ),
        ("hourly-alias", "@hourly", "UTC", DEFAULT_START_MICROS),
        ("daily-alias", "@daily", "", DEFAULT_START_MICROS),
        (
            "weekdays-9",
            "0 9 * * MON-FRI",
            "America/New_York",
            DEFAULT_START_MICROS,
        ),
        ("feb-30-never", "0 0 30 2 *", "", DEFAULT_START_MICROS),
        (
            "berlin-0230-spring",
            "30 2 * * *",
            "Europe/Berlin",
            berlin_spring,
        ),
        (
            "berlin-0230-fall",
            "30 2 * * *",
            "Europe/Berlin",
            berlin_fall,
        ),
        (
            "berlin-every-5s-fall",
            "*/5 * * * * *",
            "Europe/Berlin",
            berlin_fall,
        ),
        (
            "berlin-0130-0230",
            "30 1,2 * * *",
            "Europe/Berlin",
            berlin_fall,
        ),
        ("ny-hourly-fall", "0 * * * *", "America/New_York", ny_fall),
        (
            "ny-20min-1to3",
            "*/20 1-3 * * *",
            "America/New_York",
            ny_fall,
        ),
        (
            "santiago-midnight",
            "0 0 * * *",
            "America/Santiago",
            DEFAULT_START_MICROS,
        ),
        (
            "apia-skipped-day",
            "0 12 * * *",
            "Pacific/Apia",
            apia_skipped_day,
        ),
        (
            "lord-howe-half-hour",
            "15 1 * * 0",
            "Australia/Lord_Howe",
            lord_howe,
        ),
        (
            "seconds-fixed",
            "30 0 2 * * *",
            "Europe/Berlin",
            berlin_spring,
        ),
        ("zone-by-index", "45 1 * * *", "#42", DEFAULT_START_MICROS),
        (
            "unknown-zone",
            "0 9 * * *",
            "Mars/Olympus",
            DEFAULT_START_MICROS,
        ),
        ("bad-minute", "61 * * * *", "", DEFAULT_START_MICROS),
        ("not-cron", "not cron", "", DEFAULT_START_MICROS),
        (
            "last-day-of-month",
            "0 0 L * *",
            "Europe/Berlin",
            DEFAULT_START_MICROS,
        ),
        ("nth-weekday", "0 0 * * 5#3", "", DEFAULT_START_MICROS),
        ("nearest-weekday", "0 0 15W * *", "", DEFAULT_START_MICROS),
    ];
    for (name, expr, zone, start) in cases {
        // Every policy on the DST nights; the default elsewhere.
        let policies: &[(i32, i32, &str)] = if *start == DEFAULT_START_MICROS {
            &[(0, 0, "auto")]
        } else {
            &[
                (0, 0, "auto"),
                (1, 1, "shift-first"),
                (2, 3, "skip-both"),
                (2, 2, "skip-last"),
            ]
        };
        for &(gap, repeat, tag) in policies {
            let input = CronInput {
                trigger: expr.to_string(),
                time_zone: zone.to_string(),
                start: *start,
                gap,
                repeat,
                late: 3_600 * S,
                misfire: if tag == "auto" { 0 } else { 2 },
            };
            write(dir, &format!("{name}-{tag}"), input.render().as_bytes())?;
        }
    }
    let others: &[(&str, &str)] = &[
        ("every-250ms", "every 250000"),
        (
            "every-minute-from-start-jitter",
            "every 60000000 1767225600000000 30000000",
        ),
        ("every-1us-past-start", "every 1 0"),
        ("at-past", "at 1000000"),
        ("at-future", "at 1767225660000000"),
        ("after-10s", "after 10000000"),
    ];
    for (name, trigger) in others {
        let input = CronInput {
            trigger: trigger.to_string(),
            time_zone: String::new(),
            start: DEFAULT_START_MICROS,
            gap: 0,
            repeat: 0,
            late: 86_400 * S,
            misfire: 2,
        };
        write(dir, name, input.render().as_bytes())?;
    }
    Ok(())
}

fn request(dir: &Path, name: &str, kind: Request, message: &impl Message) -> std::io::Result<()> {
    let mut bytes = vec![kind.byte()];
    message.encode(&mut bytes).expect("a Vec grows");
    write(dir, name, &bytes)
}

fn duration(micros: i64) -> prost_types::Duration {
    prost_types::Duration {
        seconds: micros / S,
        nanos: ((micros % S) * 1_000) as i32,
    }
}

fn timestamp(micros: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: micros.div_euclid(S),
        nanos: (micros.rem_euclid(S) * 1_000) as i32,
    }
}

fn pb_job(id: &str, kind: pb::trigger::Kind) -> pb::Job {
    pb::Job {
        id: id.into(),
        queue: "emails".into(),
        trigger: Some(pb::Trigger { kind: Some(kind) }),
        payload: b"hello".to_vec().into(),
        labels: HashMap::from([("team".to_string(), "billing".to_string())]),
        ..Default::default()
    }
}

fn cron_kind(expression: &str, zone: &str, gap: i32, repeat: i32) -> pb::trigger::Kind {
    pb::trigger::Kind::Cron(pb::Cron {
        expression: expression.into(),
        time_zone: zone.into(),
        dst_policy: Some(pb::DstPolicy { gap, repeat }),
        ..Default::default()
    })
}

/// Requests like the ones tests/*.rs send, valid and a few not.
fn requests(dir: &Path) -> std::io::Result<()> {
    use pb::trigger::Kind;
    let now = DEFAULT_START_MICROS;
    let jobs = [
        ("at", pb_job("once", Kind::At(timestamp(now + 10 * S)))),
        ("after", pb_job("", Kind::After(duration(10 * S)))),
        (
            "every",
            pb::Job {
                max_fires: 5,
                end_time: Some(timestamp(now + 86_400 * S)),
                misfire_policy: pb::MisfirePolicy::FireAll.into(),
                misfire_grace_period: Some(duration(S)),
                ack_deadline: Some(duration(500_000)),
                max_attempts: 3,
                dead_letter_queue: "emails.dead".into(),
                overlap_policy: pb::OverlapPolicy::BufferOne.into(),
                ..pb_job(
                    "tick",
                    Kind::Every(pb::Interval {
                        period: Some(duration(250_000)),
                        start_time: Some(timestamp(now)),
                        jitter: Some(duration(100_000)),
                    }),
                )
            },
        ),
        (
            "cron-berlin",
            pb_job("nightly", cron_kind("30 2 * * *", "Europe/Berlin", 1, 1)),
        ),
        (
            "cron-ny-skip-both",
            pb_job("hourly", cron_kind("0 * * * *", "America/New_York", 2, 3)),
        ),
        (
            "cron-seconds",
            pb_job("fast", cron_kind("*/5 * * * * *", "", 0, 0)),
        ),
    ];
    for (name, job) in &jobs {
        let schedule = pb::ScheduleRequest {
            job: Some(job.clone()),
            request_id: if job.id.is_empty() {
                "req-1".into()
            } else {
                String::new()
            },
        };
        request(
            dir,
            &format!("schedule-{name}"),
            Request::Schedule,
            &schedule,
        )?;
        request(
            dir,
            &format!("update-{name}"),
            Request::UpdateJob,
            &pb::UpdateJobRequest {
                job: Some(pb::Job {
                    id: "job-1".into(),
                    ..job.clone()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["trigger".into(), "payload".into(), "labels".into()],
                }),
            },
        )?;
        request(
            dir,
            &format!("preview-{name}"),
            Request::PreviewOccurrences,
            &pb::PreviewOccurrencesRequest {
                subject: Some(pb::preview_occurrences_request::Subject::Job(job.clone())),
                start_time: Some(timestamp(now - 86_400 * S)),
                end_time: Some(timestamp(now + 86_400 * S)),
                max_occurrences: 20,
            },
        )?;
    }
    request(
        dir,
        "batch-all",
        Request::BatchSchedule,
        &pb::BatchScheduleRequest {
            requests: jobs
                .iter()
                .enumerate()
                .map(|(i, (_, job))| pb::ScheduleRequest {
                    job: Some(job.clone()),
                    request_id: format!("batch-{i}"),
                })
                .collect(),
        },
    )?;
    request(
        dir,
        "batch-same-id-twice",
        Request::BatchSchedule,
        &pb::BatchScheduleRequest {
            requests: vec![
                pb::ScheduleRequest {
                    job: Some(jobs[0].1.clone()),
                    request_id: String::new(),
                },
                pb::ScheduleRequest {
                    job: Some(jobs[0].1.clone()),
                    request_id: String::new(),
                },
            ],
        },
    )?;
    request(
        dir,
        "schedule-bad-everything",
        Request::Schedule,
        &pb::ScheduleRequest {
            job: Some(pb::Job {
                id: "has space".into(),
                queue: "q/".into(),
                trigger: Some(pb::Trigger {
                    kind: Some(cron_kind("61 * * * *", "Mars/Olympus", 7, 9)),
                }),
                labels: HashMap::from([("".to_string(), "x".repeat(2000))]),
                end_time: Some(timestamp(1)),
                misfire_policy: 42,
                ack_deadline: Some(duration(1)),
                max_attempts: 5000,
                overlap_policy: 9,
                dead_letter_queue: "q/".into(),
                ..Default::default()
            }),
            request_id: "x".repeat(300),
        },
    )?;
    request(
        dir,
        "update-star",
        Request::UpdateJob,
        &pb::UpdateJobRequest {
            job: Some(pb::Job {
                id: "job-1".into(),
                etag: "0011223344556677".into(),
                ..jobs[2].1.clone()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["*".into()],
            }),
        },
    )?;
    request(
        dir,
        "update-queue-refused",
        Request::UpdateJob,
        &pb::UpdateJobRequest {
            job: Some(pb::Job {
                id: "job-1".into(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["queue".into(), "nonsense".into()],
            }),
        },
    )?;
    request(
        dir,
        "preview-existing",
        Request::PreviewOccurrences,
        &pb::PreviewOccurrencesRequest {
            subject: Some(pb::preview_occurrences_request::Subject::JobId(
                "job-1".into(),
            )),
            max_occurrences: 1000,
            ..Default::default()
        },
    )?;
    request(
        dir,
        "list-jobs",
        Request::ListJobs,
        &pb::ListJobsRequest {
            queue: "emails".into(),
            states: vec![pb::JobState::Scheduled.into(), pb::JobState::Paused.into()],
            labels: HashMap::from([("team".to_string(), "billing".to_string())]),
            page_size: 50,
            page_token: tickd::api::validate::encode_page_token("job-1"),
            view: pb::JobView::Full.into(),
        },
    )?;
    // 150 bad label keys, one violation each. Encoded one entry at a time (map entries of
    // concatenated encodings merge), so that the bytes do not follow a HashMap's order.
    let mut many = vec![Request::ListJobs.byte()];
    for i in 0..150 {
        pb::ListJobsRequest {
            labels: HashMap::from([(format!("!{i}"), String::new())]),
            ..Default::default()
        }
        .encode(&mut many)
        .expect("a Vec grows");
    }
    write(dir, "list-jobs-many-bad-labels", &many)?;
    request(
        dir,
        "list-occurrences",
        Request::ListOccurrences,
        &pb::ListOccurrencesRequest {
            job_id: "job-1".into(),
            page_size: 10,
            page_token: tickd::api::validate::encode_occurrence_token((Timestamp(now), true)),
        },
    )?;
    request(
        dir,
        "backfill",
        Request::BackfillJob,
        &pb::BackfillJobRequest {
            id: "job-1".into(),
            start_time: Some(timestamp(now - 6 * 3_600 * S)),
            end_time: Some(timestamp(now)),
        },
    )?;
    request(
        dir,
        "ack",
        Request::Ack,
        &pb::AckRequest {
            queue: "emails".into(),
            fire_ids: vec!["job-1@2026-01-01T00:00:00Z".into(), String::new()],
        },
    )?;
    request(
        dir,
        "job-id",
        Request::JobId,
        &pb::GetJobRequest { id: "job-1".into() },
    )?;
    Ok(())
}

fn spec(id: &str, trigger: TriggerSpec) -> JobSpec {
    JobSpec {
        id: id.into(),
        queue: "emails".into(),
        trigger,
        payload: bytes::Bytes::from_static(b"hello"),
        labels: BTreeMap::new(),
        max_fires: 0,
        end_time: None,
        misfire_policy: MisfirePolicy::FireOnce,
        misfire_grace: 5 * S,
        ack_deadline: 30 * S,
        max_attempts: 10,
        dead_letter_queue: None,
        overlap_policy: OverlapPolicy::Allow,
    }
}

fn record(dir: &Path, name: &str, kind: Record, bytes: &[u8]) -> std::io::Result<()> {
    let mut out = vec![kind.byte()];
    out.extend_from_slice(bytes);
    write(dir, name, &out)
}

/// Records as the stores write them (`store::codec`, the journal's own framing).
fn records(dir: &Path) -> std::io::Result<()> {
    let now = DEFAULT_START_MICROS;
    let enc = |v: &dyn erased::Encode| v.encode();
    let specs = [
        ("at", spec("once", TriggerSpec::At { at: Timestamp(now) })),
        ("after", spec("later", TriggerSpec::After { after: 10 * S })),
        (
            "every",
            JobSpec {
                labels: BTreeMap::from([("team".to_string(), "billing".to_string())]),
                max_fires: 5,
                end_time: Some(Timestamp(now + 86_400 * S)),
                misfire_policy: MisfirePolicy::FireAll,
                dead_letter_queue: Some("emails.dead".into()),
                overlap_policy: OverlapPolicy::BufferOne,
                ..spec(
                    "tick",
                    TriggerSpec::Every {
                        period: 250_000,
                        start_time: Some(Timestamp(now)),
                        jitter: 100_000,
                    },
                )
            },
        ),
        (
            "cron",
            spec(
                "nightly",
                TriggerSpec::Cron {
                    expression: "30 2 * * *".into(),
                    time_zone: "Europe/Berlin".into(),
                    dst: DstPolicy {
                        gap: DstGap::Skip,
                        repeat: DstRepeat::Both,
                    },
                },
            ),
        ),
    ];
    let status = JobStatus {
        state: JobState::Scheduled,
        next_occurrence: Some(Timestamp(now + 60 * S)),
        fire_count: 3,
        create_time: Timestamp(now - 3_600 * S),
        last_fire_time: Some(Timestamp(now)),
        finish_time: None,
        trace: Some(Box::new(TraceContext {
            traceparent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into(),
            tracestate: "k=v".into(),
        })),
    };
    let done = JobStatus {
        state: JobState::Completed,
        next_occurrence: None,
        finish_time: Some(Timestamp(now)),
        trace: None,
        ..status.clone()
    };
    let fire = FireRecord {
        fire_id: "nightly@2026-03-29T01:00:00Z".into(),
        job_id: "nightly".into(),
        queue: "emails".into(),
        scheduled_time: Timestamp(now),
        fire_time: Timestamp(now + 17),
        attempt: 2,
        not_before: Some(Timestamp(now + 5 * S)),
        dead_lettered: false,
        trace: status.trace.as_deref().cloned(),
        held: true,
    };
    let delivered = Occurrence::released(
        Timestamp(now),
        false,
        Outcome::Delivered,
        1,
        Timestamp(now + S),
    );
    let skipped = Occurrence {
        scheduled: Timestamp(now),
        last: Timestamp(now + 3_600 * S),
        count: 7,
        triggered: false,
        outcome: Outcome::Skipped(SkipReason::DstGap),
        attempts: 0,
        time: Timestamp(now),
        count_at_least: true,
    };

    record(dir, "status-scheduled", Record::Status, &enc(&status))?;
    record(dir, "status-completed", Record::Status, &enc(&done))?;
    record(
        dir,
        "status-named-fields",
        Record::Status,
        &rmp_named(&status),
    )?;
    for (name, s) in &specs {
        let packed = PackedSpec::new(s);
        record(dir, &format!("spec-{name}"), Record::Spec, &enc(&packed))?;
        record(dir, &format!("pg-spec-{name}"), Record::PgSpec, &enc(s))?;
        let status_bytes = enc(&status);
        let mut job = (status_bytes.len() as u16).to_be_bytes().to_vec();
        job.extend_from_slice(&status_bytes);
        job.extend_from_slice(&enc(&packed));
        record(dir, &format!("job-{name}"), Record::Job, &job)?;
    }
    record(
        dir,
        "spec-named-fields",
        Record::Spec,
        &rmp_named(&specs[3].1),
    )?;
    record(dir, "fire", Record::Fire, &enc(&fire))?;
    record(dir, "fire-named-fields", Record::Fire, &rmp_named(&fire))?;
    record(
        dir,
        "occurrence-delivered",
        Record::Occurrence,
        &enc(&delivered),
    )?;
    record(
        dir,
        "occurrence-skipped-run",
        Record::Occurrence,
        &enc(&skipped),
    )?;
    record(
        dir,
        "trace",
        Record::Trace,
        &enc(status.trace.as_deref().expect("set")),
    )?;

    let packed = PackedSpec::new(&specs[3].1);
    let segment = fuzzing::journal_segment_of(&[
        Write::PutSpec(packed.clone()),
        Write::PutStatus("nightly".into(), status.clone()),
        Write::PutFire(fire.clone()),
        Write::PutOccurrence("nightly".into(), delivered.clone()),
        Write::PutOccurrence("nightly".into(), skipped.clone()),
        Write::PutStatus("nightly".into(), done.clone()),
        Write::DeleteFire(fire.fire_id.clone()),
        Write::PutSpec(PackedSpec::new(&specs[2].1)),
        Write::PutStatus("tick".into(), status.clone()),
        Write::DeleteJob("once".into()),
        Write::DeleteOccurrence(skipped.store_key("nightly")),
    ])
    .expect("a segment");
    record(dir, "journal-segment", Record::JournalSegment, &segment)?;
    // A second record after the first, and one cut short (a crash mid-append).
    let mut two = segment.clone();
    let second = fuzzing::journal_segment_of(&[Write::PutFire(fire.clone())]).expect("a segment");
    two.extend_from_slice(&second[8..]);
    two.extend_from_slice(&second[8..second.len() - 3]);
    record(
        dir,
        "journal-two-records-and-torn",
        Record::JournalSegment,
        &two,
    )?;
    Ok(())
}

/// Records as earlier builds wrote them: maps with field names (they must still read).
fn rmp_named<T: serde::Serialize>(value: &T) -> Vec<u8> {
    rmp_serde::to_vec_named(value).expect("encodes")
}

/// `codec::encode` for values of different types behind one closure.
mod erased {
    pub trait Encode {
        fn encode(&self) -> Vec<u8>;
    }

    impl<T: serde::Serialize> Encode for T {
        fn encode(&self) -> Vec<u8> {
            super::codec::encode(self).expect("a record encodes")
        }
    }
}
