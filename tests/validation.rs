//! Bad input gets INVALID_ARGUMENT with a BadRequest violation naming the field, and changes
//! nothing: after every refused request the server holds no job.

mod common;

use common::*;
use tickd::api::pb;
use tonic::Code;

/// One bad Schedule request and the field it must be refused on.
struct Case {
    name: &'static str,
    field: &'static str,
    job: Option<pb::Job>,
}

fn ok_job() -> pb::Job {
    job("q", after_trigger(60_000))
}

fn with(f: impl FnOnce(&mut pb::Job)) -> Option<pb::Job> {
    let mut j = ok_job();
    f(&mut j);
    Some(j)
}

fn cases(max_payload: usize) -> Vec<Case> {
    vec![
        Case {
            name: "no job",
            field: "job",
            job: None,
        },
        Case {
            name: "no queue",
            field: "job.queue",
            job: with(|j| j.queue.clear()),
        },
        Case {
            name: "queue with a space",
            field: "job.queue",
            job: with(|j| j.queue = "a b".into()),
        },
        Case {
            name: "queue too long",
            field: "job.queue",
            job: with(|j| j.queue = "q".repeat(129)),
        },
        Case {
            name: "bad id",
            field: "job.id",
            job: with(|j| j.id = "no/slashes".into()),
        },
        Case {
            name: "no trigger",
            field: "job.trigger",
            job: with(|j| j.trigger = None),
        },
        Case {
            name: "empty trigger",
            field: "job.trigger",
            job: with(|j| j.trigger = Some(pb::Trigger { kind: None })),
        },
        Case {
            name: "zero period",
            field: "job.trigger.every.period",
            job: with(|j| j.trigger = Some(every_trigger(0, None))),
        },
        Case {
            name: "negative period",
            field: "job.trigger.every.period",
            job: with(|j| j.trigger = Some(every_trigger(-1_000, None))),
        },
        Case {
            name: "missing period",
            field: "job.trigger.every.period",
            job: with(|j| {
                j.trigger = Some(pb::Trigger {
                    kind: Some(pb::trigger::Kind::Every(pb::Interval::default())),
                })
            }),
        },
        Case {
            name: "jitter over period",
            field: "job.trigger.every.jitter",
            job: with(|j| {
                j.trigger = Some(pb::Trigger {
                    kind: Some(pb::trigger::Kind::Every(pb::Interval {
                        period: Some(ms(1_000)),
                        start_time: None,
                        jitter: Some(ms(2_000)),
                    })),
                })
            }),
        },
        Case {
            name: "negative after",
            field: "job.trigger.after",
            job: with(|j| j.trigger = Some(after_trigger(-5))),
        },
        Case {
            name: "malformed at",
            field: "job.trigger.at",
            job: with(|j| {
                j.trigger = Some(at_trigger(prost_types::Timestamp {
                    seconds: 0,
                    nanos: -1,
                }))
            }),
        },
        Case {
            name: "unparsable cron",
            field: "job.trigger.cron.expression",
            job: with(|j| j.trigger = Some(cron_trigger("every tuesday", ""))),
        },
        Case {
            name: "cron out of range",
            field: "job.trigger.cron.expression",
            job: with(|j| j.trigger = Some(cron_trigger("61 * * * *", ""))),
        },
        Case {
            name: "cron that never fires",
            field: "job.trigger.cron.expression",
            job: with(|j| j.trigger = Some(cron_trigger("0 0 30 2 *", ""))),
        },
        Case {
            name: "unknown time zone",
            field: "job.trigger.cron.time_zone",
            job: with(|j| j.trigger = Some(cron_trigger("0 * * * *", "Mars/Olympus"))),
        },
        Case {
            name: "payload over the limit",
            field: "job.payload",
            job: with(|j| j.payload = vec![0u8; max_payload + 1].into()),
        },
        Case {
            name: "too many labels",
            field: "job.labels",
            job: with(|j| {
                for i in 0..65 {
                    j.labels.insert(format!("k{i}"), "v".into());
                }
            }),
        },
        Case {
            name: "label value too long",
            field: "job.labels[k]",
            job: with(|j| {
                j.labels.insert("k".into(), "v".repeat(1_025));
            }),
        },
        Case {
            name: "bad label key",
            field: "job.labels[bad key]",
            job: with(|j| {
                j.labels.insert("bad key".into(), "v".into());
            }),
        },
        Case {
            name: "end_time in the past",
            field: "job.end_time",
            job: with(|j| j.end_time = Some(ts_in(-1_000))),
        },
        Case {
            name: "ack deadline too short",
            field: "job.ack_deadline",
            job: with(|j| j.ack_deadline = Some(ms(10))),
        },
        Case {
            name: "ack deadline too long",
            field: "job.ack_deadline",
            job: with(|j| j.ack_deadline = Some(ms(2 * 3_600_000))),
        },
        Case {
            name: "negative grace",
            field: "job.misfire_grace_period",
            job: with(|j| j.misfire_grace_period = Some(ms(-1))),
        },
        Case {
            name: "unknown misfire policy",
            field: "job.misfire_policy",
            job: with(|j| j.misfire_policy = 42),
        },
        Case {
            name: "unknown overlap policy",
            field: "job.overlap_policy",
            job: with(|j| j.overlap_policy = 42),
        },
        Case {
            name: "too many attempts",
            field: "job.max_attempts",
            job: with(|j| j.max_attempts = 1_001),
        },
        Case {
            name: "bad dead-letter queue",
            field: "job.dead_letter_queue",
            job: with(|j| j.dead_letter_queue = "dead letters".into()),
        },
        Case {
            name: "dead-letter queue equal to queue",
            field: "job.dead_letter_queue",
            job: with(|j| j.dead_letter_queue = "q".into()),
        },
    ]
}

both_backends! {
    /// Every bad Schedule request is refused on the right field and stores nothing.
    #[tokio::test]
    async fn bad_schedule_requests_are_refused_and_change_nothing(backend) {
        let mut server = backend.start().await;
        let mut failures = Vec::new();
        for case in cases(256 * 1024) {
            match server
                .client
                .schedule(pb::ScheduleRequest { job: case.job, ..Default::default() })
                .await
            {
                Ok(_) => failures.push(format!("{}: accepted", case.name)),
                Err(status) => {
                    let fields = bad_fields(&status);
                    if status.code() != Code::InvalidArgument || !fields.iter().any(|f| f == case.field)
                    {
                        failures.push(format!("{}: {:?} {fields:?}", case.name, status.code()));
                    }
                }
            }
        }
        assert!(failures.is_empty(), "{failures:#?}");
        let list = server
            .client
            .list_jobs(pb::ListJobsRequest::default())
            .await
            .expect("list")
            .into_inner();
        assert!(
            list.jobs.is_empty(),
            "a refused request left a job: {:?}",
            list.jobs
        );
        // Nor in the store: a restart rebuilds memory from the store alone.
        let server = server.restart().await;
        assert_eq!(
            server.core.job_count().await,
            0,
            "a refused request left a stored job"
        );
        server.stop().await;
    }
}

both_backends! {
    /// The payload limit is configurable.
    #[tokio::test]
    async fn payload_limit_is_configurable(backend) {
        let mut server = backend.start_with(|c| c.max_payload_bytes = 16).await;
        let mut j = ok_job();
        j.payload = vec![1u8; 17].into();
        let err = server
            .client
            .schedule(pb::ScheduleRequest {
                job: Some(j.clone()),
                ..Default::default()
            })
            .await
            .expect_err("over the limit");
        assert_bad_field(&err, "job.payload");
        j.payload = vec![1u8; 16].into();
        schedule(&mut server.client, j).await;
        server.stop().await;
    }
}

both_backends! {
    /// Bad ids, list filters and acks are refused on the right field.
    #[tokio::test]
    async fn bad_ids_filters_and_acks_are_refused(backend) {
        let mut server = backend.start().await;
        let c = &mut server.client;
        assert_bad_field(
            &c.get_job(pb::GetJobRequest { id: String::new() })
                .await
                .expect_err("empty"),
            "id",
        );
        assert_bad_field(
            &c.cancel_job(pb::CancelJobRequest { id: "a b".into() })
                .await
                .expect_err("bad"),
            "id",
        );
        assert_bad_field(
            &c.pause_job(pb::PauseJobRequest { id: String::new() })
                .await
                .expect_err("empty"),
            "id",
        );
        assert_bad_field(
            &c.resume_job(pb::ResumeJobRequest { id: String::new() })
                .await
                .expect_err("empty"),
            "id",
        );
        let bad_list = |f: fn(&mut pb::ListJobsRequest)| {
            let mut r = pb::ListJobsRequest::default();
            f(&mut r);
            r
        };
        assert_bad_field(
            &c.list_jobs(bad_list(|r| r.page_size = -1))
                .await
                .expect_err("negative"),
            "page_size",
        );
        assert_bad_field(
            &c.list_jobs(bad_list(|r| r.page_token = "garbage".into()))
                .await
                .expect_err("token"),
            "page_token",
        );
        assert_bad_field(
            &c.list_jobs(bad_list(|r| r.states = vec![0]))
                .await
                .expect_err("unspecified"),
            "states",
        );
        assert_bad_field(
            &c.list_jobs(bad_list(|r| r.queue = "a b".into()))
                .await
                .expect_err("queue"),
            "queue",
        );
        assert_bad_field(
            &c.ack(pb::AckRequest {
                queue: String::new(),
                fire_ids: vec!["x".into()],
            })
            .await
            .expect_err("no queue"),
            "queue",
        );
        assert_bad_field(
            &c.ack(pb::AckRequest {
                queue: "q".into(),
                fire_ids: vec![String::new()],
            })
            .await
            .expect_err("empty id"),
            "fire_ids",
        );
        server.stop().await;
    }
}

both_backends! {
    /// A Subscribe whose first message is not an open is refused, as is a bad open.
    #[tokio::test]
    async fn subscribe_must_open_first(backend) {
        let mut server = backend.start().await;
        let first = pb::SubscribeRequest {
            request: Some(pb::subscribe_request::Request::Ack(pb::AckFires {
                fire_ids: vec![],
            })),
        };
        let err = server
            .client
            .subscribe(tokio_stream::iter(vec![first]))
            .await
            .expect_err("ack before open");
        assert_bad_field(&err, "request");

        let bad_open = pb::SubscribeRequest {
            request: Some(pb::subscribe_request::Request::Open(pb::SubscribeOpen {
                queue: "bad queue".into(),
                max_in_flight: 20_000,
            })),
        };
        let err = server
            .client
            .subscribe(tokio_stream::iter(vec![bad_open]))
            .await
            .expect_err("bad open");
        assert_bad_field(&err, "open.queue");
        assert_bad_field(&err, "open.max_in_flight");
        server.stop().await;
    }
}

both_backends! {
    /// A bad message later on a stream ends it with INVALID_ARGUMENT naming the field.
    #[tokio::test]
    async fn bad_message_on_a_stream_ends_it(backend) {
        let mut server = backend.start().await;
        let mut sub = Sub::open(&mut server.client, "q", 10).await;
        sub.send(pb::subscribe_request::Request::Nack(pb::NackFires {
            fire_ids: vec!["x".into()],
            retry_delay: Some(ms(-5)),
        }))
        .await;
        match sub.end(2_000).await {
            Err(status) => assert_bad_field(&status, "nack.retry_delay"),
            other => panic!("expected INVALID_ARGUMENT, got {other:?}"),
        }
        let mut sub = Sub::open(&mut server.client, "q", 10).await;
        sub.send(pb::subscribe_request::Request::Open(pb::SubscribeOpen {
            queue: "q".into(),
            max_in_flight: 1,
        }))
        .await;
        match sub.end(2_000).await {
            Err(status) => {
                assert_eq!(status.code(), Code::InvalidArgument);
                assert_bad_field(&status, "open");
            }
            other => panic!("expected INVALID_ARGUMENT, got {other:?}"),
        }
        server.stop().await;
    }
}
