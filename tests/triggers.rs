//! Each trigger kind fires at the right time through the real server, and the job lifecycle
//! RPCs (cancel, pause, resume, get, list) do what they say.

mod common;

use common::*;
use tickd::api::pb;
use tonic::Code;

both_backends! {
    /// An `at` trigger fires at its time, not a microsecond before, carrying that time as
    /// scheduled_time and fire_time.
    #[tokio::test]
    async fn at_fires_at_its_time(backend) {
        let mut server = backend.manual().await;
        let mut sub = server.subscribe("q", 10).await;
        let at = server.ts_in(300);
        let job = server.schedule(job("q", at_trigger(at))).await;
        assert_eq!(job.state(), pb::JobState::Scheduled);
        assert_eq!(job.next_fire_time, Some(at));
        server.advance_to(micros_of(&Some(at)) - 1).await;
        assert_eq!(server.counts("q"), (0, 0), "fired early");
        server.advance_to(micros_of(&Some(at))).await;
        let fire = sub.recv().await;
        assert_eq!(fire.job_id, job.id);
        assert_eq!(fire.scheduled_time, Some(at));
        assert_eq!(fire.fire_time, Some(at));
        assert_eq!(fire.attempt, 1);
        assert_eq!(
            fire.fire_id,
            format!("{}@{}", job.id, rfc3339(micros_of(&Some(at))))
        );
        sub.ack(&[&fire.fire_id]).await;
        server.stop().await;
    }
}

fn rfc3339(micros: i64) -> String {
    tickd::domain::Timestamp(micros).to_string()
}

both_backends! {
    /// An `at` in the past fires at once, and the job completes.
    #[tokio::test]
    async fn past_at_fires_at_once_and_completes(backend) {
        let mut server = backend.manual().await;
        let mut sub = server.subscribe("q", 10).await;
        let job = server
            .schedule(job("q", at_trigger(server.ts_in(-60_000))))
            .await;
        server.settle().await;
        let fire = sub.recv().await;
        assert_eq!(fire.job_id, job.id);
        let got = server.job(&job.id).await;
        assert_eq!(got.state(), pb::JobState::Completed);
        assert_eq!(got.fire_count, 1);
        assert!(got.next_fire_time.is_none());
        assert_eq!(got.last_fire_time, Some(server.ts_in(0)));
        server.stop().await;
    }
}

both_backends! {
    /// `after` fires once, exactly that long after scheduling, and never again.
    #[tokio::test]
    async fn after_fires_after_its_delay(backend) {
        let mut server = backend.manual().await;
        let mut sub = server.subscribe("q", 10).await;
        let before = server.now();
        let job = server.schedule(job("q", after_trigger(250))).await;
        server.advance(249).await;
        assert_eq!(server.counts("q"), (0, 0), "fired early");
        server.advance(1).await;
        let fire = sub.recv().await;
        assert_eq!(fire.job_id, job.id);
        assert_eq!(micros_of(&fire.scheduled_time), before + 250_000);
        sub.ack(&[&fire.fire_id]).await;
        server.wait_in_flight("q", 0).await;
        server.advance(3_600_000).await;
        assert_eq!(server.counts("q"), (0, 0), "fired once only");
        server.stop().await;
    }
}

both_backends! {
    /// An interval fires at start + k·period exactly, without drift, each at its time.
    #[tokio::test]
    async fn every_fires_on_a_fixed_grid(backend) {
        let mut server = backend.manual().await;
        let mut sub = server.subscribe("q", 10).await;
        let start = server.now() + 200_000;
        let job = server
            .schedule(job("q", every_trigger(150, Some(ts_micros(start)))))
            .await;
        for k in 0..4 {
            server.advance_to(start + k * 150_000 - 1).await;
            assert_eq!(server.counts("q"), (0, 0), "occurrence {k} fired early");
            server.advance_to(start + k * 150_000).await;
            let fire = sub.recv().await;
            assert_eq!(fire.job_id, job.id);
            assert_eq!(micros_of(&fire.scheduled_time), start + k * 150_000);
            sub.ack(&[&fire.fire_id]).await;
            server.wait_in_flight("q", 0).await;
        }
        server.stop().await;
    }
}

both_backends! {
    /// A cron expression with seconds fires on whole seconds, in its time zone.
    #[tokio::test]
    async fn cron_with_seconds_fires_on_whole_seconds(backend) {
        let mut server = backend.manual().await;
        let mut sub = server.subscribe("q", 10).await;
        server.advance(300).await; // off the whole second
        let now = server.now();
        let job = server
            .schedule(job("q", cron_trigger("* * * * * *", "Europe/Berlin")))
            .await;
        server.advance(700).await;
        server.advance(1_000).await;
        let first = sub.recv().await;
        let second = sub.recv().await;
        assert_eq!(first.job_id, job.id);
        let (a, b) = (
            micros_of(&first.scheduled_time),
            micros_of(&second.scheduled_time),
        );
        assert_eq!(a, now - now % 1_000_000 + 1_000_000);
        assert_eq!(b - a, 1_000_000);
        server.stop().await;
    }
}

both_backends! {
    /// max_fires completes a job after that many fires.
    #[tokio::test]
    async fn max_fires_completes_the_job(backend) {
        let mut server = backend.manual().await;
        let mut sub = server.subscribe("q", 10).await;
        let mut j = job("q", every_trigger(100, None));
        j.max_fires = 2;
        let job = server.schedule(j).await;
        for _ in 0..5 {
            server.advance(100).await;
        }
        sub.recv().await;
        sub.recv().await;
        assert_eq!(server.counts("q"), (0, 2), "exactly two fires");
        let got = server.job(&job.id).await;
        assert_eq!(got.state(), pb::JobState::Completed);
        assert_eq!(got.fire_count, 2);
        server.stop().await;
    }
}

both_backends! {
    /// Cancel stops further fires; cancelling twice is fine; an unknown id is NOT_FOUND.
    #[tokio::test]
    async fn cancel_stops_fires(backend) {
        let mut server = backend.manual().await;
        let job = server.schedule(job("q", every_trigger(200, None))).await;
        let cancelled = server.cancel(&job.id).await.expect("cancel");
        assert_eq!(cancelled.state(), pb::JobState::Cancelled);
        assert!(cancelled.next_fire_time.is_none());
        server.advance(1_000).await;
        assert_eq!(server.counts("q"), (0, 0), "a cancelled job fired");
        let again = server
            .cancel(&job.id)
            .await
            .expect("second cancel is not an error");
        assert_eq!(again.state(), pb::JobState::Cancelled);
        expect_code(server.cancel("nope").await, Code::NotFound);
        server.stop().await;
    }
}

both_backends! {
    /// A paused job does not fire; on resume, what it missed follows the misfire policy
    /// (FIRE_ONCE: one catch-up fire for the latest missed occurrence, then the on-time one).
    /// Pausing or resuming a cancelled or completed job is FAILED_PRECONDITION.
    #[tokio::test]
    async fn pause_and_resume_follow_misfire_policy(backend) {
        let mut server = backend.manual().await;
        let mut sub = server.subscribe("q", 10).await;
        let start = server.now() + 300_000;
        let mut j = job("q", every_trigger(100, Some(ts_micros(start))));
        j.misfire_grace_period = Some(ms(50));
        let every = server.schedule(j).await;
        let paused = server.pause(&every.id).await.expect("pause");
        assert_eq!(paused.state(), pb::JobState::Paused);
        assert!(paused.next_fire_time.is_none());
        server.advance(800).await; // occurrences at +300 .. +800 ms pass while paused
        assert_eq!(server.counts("q"), (0, 0), "a paused job fired");
        let resumed = server.resume(&every.id).await.expect("resume");
        assert_eq!(resumed.state(), pb::JobState::Scheduled);
        server.settle().await;
        let catch_up = sub.recv().await;
        let on_time = sub.recv().await;
        assert_eq!(
            (
                micros_of(&catch_up.scheduled_time) - start,
                micros_of(&on_time.scheduled_time) - start
            ),
            (400_000, 500_000),
            "the latest missed occurrence (+700 ms), then the one due now (+800 ms)"
        );
        assert_eq!(server.counts("q"), (0, 2));

        server.cancel(&every.id).await.expect("cancel");
        expect_code(server.pause(&every.id).await, Code::FailedPrecondition);
        expect_code(server.resume(&every.id).await, Code::FailedPrecondition);
        let once = server.schedule(job("q", after_trigger(0))).await;
        server.settle().await;
        assert_eq!(server.job(&once.id).await.state(), pb::JobState::Completed);
        expect_code(server.resume(&once.id).await, Code::FailedPrecondition);
        expect_code(server.pause(&once.id).await, Code::FailedPrecondition);
        server.stop().await;
    }
}

both_backends! {
    /// A job whose end_time passed while it was paused completes when it is resumed.
    #[tokio::test]
    async fn end_time_passed_while_paused_completes_on_resume(backend) {
        let mut server = backend.manual().await;
        let mut j = job("q", every_trigger(100, None));
        j.end_time = Some(server.ts_in(450));
        j.misfire_policy = pb::MisfirePolicy::Skip.into();
        j.misfire_grace_period = Some(ms(50));
        let job = server.schedule(j).await;
        server.pause(&job.id).await.expect("pause");
        server.advance(1_000).await;
        server.resume(&job.id).await.expect("resume");
        server.settle().await;
        let got = server.job(&job.id).await;
        assert_eq!(got.state(), pb::JobState::Completed);
        assert!(got.next_fire_time.is_none());
        assert_eq!(server.counts("q"), (0, 0), "SKIP: nothing fired");
        server.stop().await;
    }
}

both_backends! {
    /// Options left unset read back as their defaults: FIRE_ONCE, 5 s grace, 30 s ack deadline,
    /// 10 attempts.
    #[tokio::test]
    async fn unset_options_read_back_as_defaults(backend) {
        let mut server = backend.manual().await;
        let created = server.schedule(job("q", after_trigger(60_000))).await;
        let got = server.job(&created.id).await;
        for j in [&created, &got] {
            assert_eq!(j.misfire_policy(), pb::MisfirePolicy::FireOnce);
            assert_eq!(j.misfire_grace_period, Some(ms(5_000)));
            assert_eq!(j.ack_deadline, Some(ms(30_000)));
            assert_eq!(j.max_attempts, 10);
            assert_eq!(j.max_fires, 0);
            assert_eq!(j.create_time, Some(server.ts_in(0)));
        }
        server.stop().await;
    }
}

both_backends! {
    /// Scheduling an existing id with the same spec returns the job; a different spec is
    /// ALREADY_EXISTS. An empty id gets a generated one.
    #[tokio::test]
    async fn schedule_is_idempotent_by_id(backend) {
        let mut server = backend.start().await;
        let mut j = job("q", after_trigger(60_000));
        j.id = "report-1".into();
        let first = schedule(&mut server.client, j.clone()).await;
        let second = schedule(&mut server.client, j.clone()).await;
        assert_eq!(first.id, "report-1");
        assert_eq!(first.create_time, second.create_time);
        j.payload = b"different".to_vec().into();
        let err = server
            .client
            .schedule(pb::ScheduleRequest { job: Some(j), ..Default::default() })
            .await
            .expect_err("different spec");
        assert_eq!(err.code(), Code::AlreadyExists);
        let generated = schedule(&mut server.client, job("q", after_trigger(60_000))).await;
        assert_eq!(generated.id.len(), 36, "a UUID: {}", generated.id);
        let missing = server
            .client
            .get_job(pb::GetJobRequest { id: "nope".into() })
            .await
            .expect_err("unknown");
        assert_eq!(missing.code(), Code::NotFound);
        server.stop().await;
    }
}

both_backends! {
    /// ListJobs pages hold 100 jobs by default and at most 1000, whatever page_size asks for.
    #[tokio::test]
    async fn list_jobs_default_and_max_page_size(backend) {
        let server = backend.manual().await;
        let calls: Vec<_> = (0..1_001)
            .map(|i| {
                let mut client = server.client.clone();
                tokio::spawn(async move {
                    let mut j = job("q", after_trigger(60_000));
                    j.id = format!("job-{i:04}");
                    schedule(&mut client, j).await;
                })
            })
            .collect();
        for c in calls {
            c.await.expect("scheduled");
        }
        let mut client = server.client.clone();
        for (asked, got) in [(0, 100), (1_000, 1_000), (5_000, 1_000)] {
            let page = client
                .list_jobs(pb::ListJobsRequest {
                    page_size: asked,
                    ..Default::default()
                })
                .await
                .expect("list")
                .into_inner();
            assert_eq!(page.jobs.len(), got, "page_size {asked}");
            assert!(!page.next_page_token.is_empty(), "more follow");
        }
        server.stop().await;
    }
}

both_backends! {
    /// ListJobs filters by queue, state and labels, and pages through results.
    #[tokio::test]
    async fn list_jobs_filters_and_pages(backend) {
        let mut server = backend.start().await;
        for i in 0..5 {
            let mut j = job(if i < 3 { "a" } else { "b" }, after_trigger(60_000));
            j.id = format!("job-{i}");
            j.labels
                .insert("team".into(), if i % 2 == 0 { "x" } else { "y" }.into());
            j.labels.insert("env".into(), "prod".into());
            schedule(&mut server.client, j).await;
        }
        server
            .client
            .pause_job(pb::PauseJobRequest { id: "job-1".into() })
            .await
            .expect("pause");

        let list =
            |queue: &str, states: Vec<pb::JobState>, labels: &[(&str, &str)], size, token: &str| {
                pb::ListJobsRequest {
                    queue: queue.into(),
                    states: states.into_iter().map(i32::from).collect(),
                    labels: labels
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                    page_size: size,
                    page_token: token.into(),
                    view: pb::JobView::Full.into(),
                }
            };
        let ids = |r: &pb::ListJobsResponse| r.jobs.iter().map(|j| j.id.clone()).collect::<Vec<_>>();

        let all = server
            .client
            .list_jobs(list("", vec![], &[], 0, ""))
            .await
            .expect("list")
            .into_inner();
        assert_eq!(ids(&all), vec!["job-0", "job-1", "job-2", "job-3", "job-4"]);
        assert!(all.next_page_token.is_empty());

        let a = server
            .client
            .list_jobs(list("a", vec![], &[], 0, ""))
            .await
            .expect("list")
            .into_inner();
        assert_eq!(ids(&a), vec!["job-0", "job-1", "job-2"]);

        let paused = server
            .client
            .list_jobs(list("", vec![pb::JobState::Paused], &[], 0, ""))
            .await
            .expect("list")
            .into_inner();
        assert_eq!(ids(&paused), vec!["job-1"]);

        let labelled = server
            .client
            .list_jobs(list("", vec![], &[("team", "x"), ("env", "prod")], 0, ""))
            .await
            .expect("list")
            .into_inner();
        assert_eq!(ids(&labelled), vec!["job-0", "job-2", "job-4"]);

        let mut seen = Vec::new();
        let mut token = String::new();
        loop {
            let page = server
                .client
                .list_jobs(list("", vec![], &[], 2, &token))
                .await
                .expect("list")
                .into_inner();
            assert!(page.jobs.len() <= 2);
            seen.extend(ids(&page));
            if page.next_page_token.is_empty() {
                break;
            }
            token = page.next_page_token;
        }
        assert_eq!(seen, vec!["job-0", "job-1", "job-2", "job-3", "job-4"]);
        server.stop().await;
    }
}

fn utc_micros(rfc3339: &str) -> i64 {
    chrono::DateTime::parse_from_rfc3339(rfc3339)
        .expect("time")
        .timestamp_micros()
}

fn cron_with_policy(
    expression: &str,
    time_zone: &str,
    gap: pb::DstGapPolicy,
    repeat: pb::DstRepeatPolicy,
) -> pb::Trigger {
    pb::Trigger {
        kind: Some(pb::trigger::Kind::Cron(pb::Cron {
            expression: expression.into(),
            time_zone: time_zone.into(),
            dst_policy: Some(pb::DstPolicy {
                gap: gap.into(),
                repeat: repeat.into(),
            }),
            ..Default::default()
        })),
    }
}

both_backends! {
    /// Through the API, a job's DST policy decides its fires on both of New York's change
    /// days: with SKIP the 02:30 of 2026-03-08 (which does not exist) has no fire, with BOTH
    /// the 01:30 of 2026-11-01 (which happens twice) has two, an hour apart, with distinct
    /// fire ids. The job shows its policy and the time zone database release.
    #[tokio::test]
    async fn dst_policy_decides_the_fires_on_change_days(backend) {
        let start = utc_micros("2026-03-07T12:00:00Z");
        let mut server = backend.manual_at(start, |_| {}).await;
        // Metrics are per process, and both stores' tests share one: a queue per store.
        let q = format!("dst-{}", backend.name());
        let mut sub = server.subscribe(&q, 10).await;
        let mut j = job(
            &q,
            cron_with_policy(
                "30 1,2 * * *",
                "America/New_York",
                pb::DstGapPolicy::Skip,
                pb::DstRepeatPolicy::Both,
            ),
        );
        j.id = "ny".into();
        let job = server.schedule(j).await;
        let Some(pb::trigger::Kind::Cron(cron)) = job.trigger.as_ref().and_then(|t| t.kind.clone())
        else {
            panic!("a cron trigger: {job:?}");
        };
        assert_eq!(
            cron.dst_policy,
            Some(pb::DstPolicy {
                gap: pb::DstGapPolicy::Skip.into(),
                repeat: pb::DstRepeatPolicy::Both.into(),
            })
        );
        assert_eq!(cron.time_zone_database_version, chrono_tz::IANA_TZDB_VERSION);

        let mut scheduled = Vec::new();
        // Spring forward: 01:30 EST (06:30Z) fires, 02:30 does not exist and is skipped; the
        // next fire is 01:30 EDT the day after (05:30Z).
        for at in ["2026-03-08T06:30:00Z", "2026-03-09T05:30:00Z"] {
            server.advance_to(utc_micros(at)).await;
            let fire = sub.recv().await;
            sub.ack(&[&fire.fire_id]).await;
            // Acked before the clock moves past its ack deadline.
            server.wait_in_flight(&q, 0).await;
            scheduled.push(micros_of(&fire.scheduled_time));
        }
        assert_eq!(
            scheduled,
            [utc_micros("2026-03-08T06:30:00Z"), utc_micros("2026-03-09T05:30:00Z")]
        );
        // The skipped 02:30 is counted, not silent.
        let text = scrape(server.metrics_addr).await;
        assert_eq!(skipped_occurrences(&text, &q, "dst_gap"), Some(1.0));
        assert_eq!(skipped_occurrences(&text, &q, "dst_repeat"), None);

        // Fall back: 01:30 EDT (05:30Z), 01:30 EST (06:30Z), then 02:30 EST (07:30Z).
        server.advance_to(utc_micros("2026-10-31T12:00:00Z")).await;
        // The months between were missed at once: one catch-up fire for the latest of them,
        // 02:30 EDT on 2026-10-31.
        let catch_up = sub.recv().await;
        assert_eq!(
            micros_of(&catch_up.scheduled_time),
            utc_micros("2026-10-31T06:30:00Z")
        );
        sub.ack(&[&catch_up.fire_id]).await;
        server.wait_in_flight(&q, 0).await;
        let mut fall = Vec::new();
        for at in ["2026-11-01T05:30:00Z", "2026-11-01T06:30:00Z", "2026-11-01T07:30:00Z"] {
            server.advance_to(utc_micros(at)).await;
            let fire = sub.recv().await;
            sub.ack(&[&fire.fire_id]).await;
            server.wait_in_flight(&q, 0).await;
            fall.push((micros_of(&fire.scheduled_time), fire.fire_id));
        }
        assert_eq!(
            fall.iter().map(|(t, _)| *t).collect::<Vec<_>>(),
            [
                utc_micros("2026-11-01T05:30:00Z"),
                utc_micros("2026-11-01T06:30:00Z"),
                utc_micros("2026-11-01T07:30:00Z"),
            ]
        );
        assert_ne!(fall[0].1, fall[1].1, "the two 01:30s have their own fire ids");
        server.stop().await;
    }
}

both_backends! {
    /// A DST policy value the server does not know is refused, naming the field, and nothing
    /// is stored.
    #[tokio::test]
    async fn unknown_dst_policy_is_refused(backend) {
        let mut server = backend.manual().await;
        let mut j = job("q", cron_trigger("0 * * * *", "Europe/Berlin"));
        j.id = "bad-dst".into();
        if let Some(pb::trigger::Kind::Cron(c)) = j.trigger.as_mut().and_then(|t| t.kind.as_mut()) {
            c.dst_policy = Some(pb::DstPolicy { gap: 9, repeat: 7 });
        }
        let status = expect_code(server.client.schedule(pb::ScheduleRequest { job: Some(j), ..Default::default() }).await, Code::InvalidArgument);
        let mut fields = bad_fields(&status);
        fields.sort();
        assert_eq!(
            fields,
            ["job.trigger.cron.dst_policy.gap", "job.trigger.cron.dst_policy.repeat"]
        );
        expect_code(server.get("bad-dst").await, Code::NotFound);
        server.stop().await;
    }
}

both_backends! {
    /// A preview of an existing cron job lists what the job then releases, fire id for fire
    /// id, and shows the slot its DST policy skips: Berlin's 02:30 on 2026-03-29 does not
    /// exist, and with gap SKIP it is listed as skipped and never fires.
    #[tokio::test]
    async fn preview_lists_what_the_job_then_releases(backend) {
        let mut server = backend.manual_at(utc_micros("2026-03-27T12:00:00Z"), |_| {}).await;
        let mut sub = server.subscribe("q", 10).await;
        let mut j = job(
            "q",
            cron_with_policy(
                "30 2 * * *",
                "Europe/Berlin",
                pb::DstGapPolicy::Skip,
                pb::DstRepeatPolicy::Unspecified,
            ),
        );
        j.id = "berlin".into();
        server.schedule(j).await;
        let preview = server
            .client
            .preview_occurrences(pb::PreviewOccurrencesRequest {
                subject: Some(pb::preview_occurrences_request::Subject::JobId("berlin".into())),
                max_occurrences: 4,
                ..Default::default()
            })
            .await
            .expect("preview")
            .into_inner();
        assert!(preview.more);
        assert_eq!(preview.time_zone_database_version, chrono_tz::IANA_TZDB_VERSION);
        let rows: Vec<_> = preview
            .occurrences
            .iter()
            .map(|o| (o.local_time.as_str(), o.dst_effect(), o.skipped, o.fire_id.as_str()))
            .collect();
        assert_eq!(
            rows,
            [
                ("2026-03-28T02:30:00", pb::DstEffect::None, false, "berlin@2026-03-28T01:30:00Z"),
                ("2026-03-29T02:30:00", pb::DstEffect::Nonexistent, true, ""),
                ("2026-03-30T02:30:00", pb::DstEffect::None, false, "berlin@2026-03-30T00:30:00Z"),
                ("2026-03-31T02:30:00", pb::DstEffect::None, false, "berlin@2026-03-31T00:30:00Z"),
            ]
        );
        assert_eq!(preview.occurrences[1].release_time, None);
        // What the job then releases, day by day.
        let mut released = Vec::new();
        for o in preview.occurrences.iter().filter(|o| !o.skipped) {
            server.advance_to(micros_of(&o.release_time)).await;
            let fire = sub.recv().await;
            sub.ack(&[&fire.fire_id]).await;
            server.wait_in_flight("q", 0).await;
            assert_eq!(fire.fire_time, o.release_time);
            released.push(fire.fire_id);
        }
        assert_eq!(
            released,
            ["berlin@2026-03-28T01:30:00Z", "berlin@2026-03-30T00:30:00Z", "berlin@2026-03-31T00:30:00Z"]
        );
        server.wait_in_flight("q", 0).await;
        assert_eq!(server.counts("q"), (0, 0), "nothing fired on the skipped day");
        server.stop().await;
    }
}

both_backends! {
    /// A proposed job is previewed without being stored: its release times carry the jitter
    /// the same job gets once scheduled, and a range and a count bound the list.
    #[tokio::test]
    async fn preview_of_a_proposed_job_matches_its_fires(backend) {
        let mut server = backend.manual().await;
        let mut sub = server.subscribe("q", 10).await;
        let start = server.ts_in(1_000);
        let mut proposed = job("q", every_trigger(1_000, Some(start)));
        if let Some(pb::trigger::Kind::Every(e)) =
            proposed.trigger.as_mut().and_then(|t| t.kind.as_mut())
        {
            e.jitter = Some(ms(500));
        }
        proposed.id = "jittery".into();
        let mut unnamed = proposed.clone();
        unnamed.id.clear();
        unnamed.queue.clear();
        let ask = |job: pb::Job| pb::PreviewOccurrencesRequest {
            subject: Some(pb::preview_occurrences_request::Subject::Job(job)),
            max_occurrences: 3,
            ..Default::default()
        };
        let named = server
            .client
            .preview_occurrences(ask(proposed.clone()))
            .await
            .expect("preview")
            .into_inner();
        assert_eq!(named.occurrences.len(), 3);
        assert!(named.more);
        let anonymous = server
            .client
            .preview_occurrences(ask(unnamed))
            .await
            .expect("preview without id or queue")
            .into_inner();
        for (a, n) in anonymous.occurrences.iter().zip(&named.occurrences) {
            assert_eq!(a.scheduled_time, n.scheduled_time);
            assert_eq!(a.release_time, None, "jitter depends on the id");
            assert_eq!(a.fire_id, "");
        }
        expect_code(server.get("jittery").await, Code::NotFound);

        server.schedule(proposed).await;
        for o in &named.occurrences {
            assert_ne!(o.release_time, o.scheduled_time, "jitter applied");
            server.advance_to(micros_of(&o.release_time)).await;
            let fire = sub.recv().await;
            assert_eq!(fire.fire_id, o.fire_id);
            assert_eq!(fire.scheduled_time, o.scheduled_time);
            assert_eq!(fire.fire_time, o.release_time);
            sub.ack(&[&fire.fire_id]).await;
        }
        // A range: [second, third) holds one occurrence.
        let ranged = server
            .client
            .preview_occurrences(pb::PreviewOccurrencesRequest {
                subject: Some(pb::preview_occurrences_request::Subject::JobId("jittery".into())),
                start_time: named.occurrences[2].scheduled_time,
                end_time: Some(ts_micros(micros_of(&named.occurrences[2].scheduled_time) + 1_000_000)),
                max_occurrences: 10,
            })
            .await
            .expect("preview")
            .into_inner();
        // The first three were released: the pending one is the fourth, past the range.
        assert_eq!(ranged.occurrences.len(), 0);
        assert!(!ranged.more);
        server.stop().await;
    }
}

both_backends! {
    /// Bad preview requests are refused with the field named; an unknown job is NOT_FOUND.
    #[tokio::test]
    async fn preview_refuses_bad_requests(backend) {
        let server = backend.manual().await;
        let mut c = server.client.clone();
        let status = expect_code(
            c.preview_occurrences(pb::PreviewOccurrencesRequest::default()).await,
            Code::InvalidArgument,
        );
        assert_bad_field(&status, "job_id");
        let status = expect_code(
            c.preview_occurrences(pb::PreviewOccurrencesRequest {
                subject: Some(pb::preview_occurrences_request::Subject::JobId("x".into())),
                max_occurrences: 5_000,
                start_time: Some(ts_micros(2_000_000)),
                end_time: Some(ts_micros(1_000_000)),
            })
            .await,
            Code::InvalidArgument,
        );
        let mut fields = bad_fields(&status);
        fields.sort();
        assert_eq!(fields, ["end_time", "max_occurrences"]);
        let status = expect_code(
            c.preview_occurrences(pb::PreviewOccurrencesRequest {
                subject: Some(pb::preview_occurrences_request::Subject::Job(job(
                    "",
                    cron_trigger("nope", "Mars/Olympus"),
                ))),
                ..Default::default()
            })
            .await,
            Code::InvalidArgument,
        );
        let mut fields = bad_fields(&status);
        fields.sort();
        assert_eq!(
            fields,
            ["job.trigger.cron.expression", "job.trigger.cron.time_zone"]
        );
        expect_code(
            c.preview_occurrences(pb::PreviewOccurrencesRequest {
                subject: Some(pb::preview_occurrences_request::Subject::JobId("missing".into())),
                ..Default::default()
            })
            .await,
            Code::NotFound,
        );
        server.stop().await;
    }
}
