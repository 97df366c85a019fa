//! Each trigger kind fires at the right time through the real server, and the job lifecycle
//! RPCs (cancel, pause, resume, get, list) do what they say.

mod common;

use common::*;
use tickd::api::pb;
use tonic::Code;

/// An `at` trigger fires at its time, carrying that time as scheduled_time.
#[tokio::test]
async fn at_fires_at_its_time() {
    let mut server = TestServer::start().await;
    let mut sub = Sub::open(&mut server.client, "q", 10).await;
    let at = ts_in(300);
    let job = schedule(&mut server.client, job("q", at_trigger(at))).await;
    assert_eq!(job.state(), pb::JobState::Scheduled);
    let fire = sub.next(2_000).await;
    let received = now_micros();
    assert_eq!(fire.job_id, job.id);
    assert_eq!(micros_of(&fire.scheduled_time), micros_of(&Some(at)));
    assert!(received >= micros_of(&Some(at)), "fired early");
    assert!(micros_of(&fire.fire_time) >= micros_of(&Some(at)));
    assert_eq!(fire.attempt, 1);
    assert_eq!(
        fire.fire_id,
        format!("{}@{}", job.id, rfc3339(micros_of(&Some(at))))
    );
    sub.ack(&[&fire.fire_id]).await;
    server.stop().await;
}

fn rfc3339(micros: i64) -> String {
    tickd::domain::Timestamp(micros).to_string()
}

/// An `at` in the past fires at once, and the job completes.
#[tokio::test]
async fn past_at_fires_at_once_and_completes() {
    let mut server = TestServer::start().await;
    let mut sub = Sub::open(&mut server.client, "q", 10).await;
    let job = schedule(&mut server.client, job("q", at_trigger(ts_in(-60_000)))).await;
    let fire = sub.next(1_000).await;
    assert_eq!(fire.job_id, job.id);
    let got = server
        .client
        .get_job(pb::GetJobRequest { id: job.id.clone() })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(got.state(), pb::JobState::Completed);
    assert_eq!(got.fire_count, 1);
    assert!(got.next_fire_time.is_none());
    assert!(got.last_fire_time.is_some());
    server.stop().await;
}

/// `after` fires once, that long after scheduling.
#[tokio::test]
async fn after_fires_after_its_delay() {
    let mut server = TestServer::start().await;
    let mut sub = Sub::open(&mut server.client, "q", 10).await;
    let before = now_micros();
    let job = schedule(&mut server.client, job("q", after_trigger(250))).await;
    let fire = sub.next(2_000).await;
    assert_eq!(fire.job_id, job.id);
    assert!(micros_of(&fire.scheduled_time) >= before + 250_000);
    assert!(now_micros() >= before + 250_000, "fired early");
    sub.expect_none(300).await;
    server.stop().await;
}

/// An interval fires at start + k·period exactly, without drift.
#[tokio::test]
async fn every_fires_on_a_fixed_grid() {
    let mut server = TestServer::start().await;
    let mut sub = Sub::open(&mut server.client, "q", 10).await;
    let start = now_micros() + 200_000;
    let job = schedule(
        &mut server.client,
        job("q", every_trigger(150, Some(ts_micros(start)))),
    )
    .await;
    for k in 0..4 {
        let fire = sub.next(2_000).await;
        assert_eq!(fire.job_id, job.id);
        assert_eq!(micros_of(&fire.scheduled_time), start + k * 150_000);
        sub.ack(&[&fire.fire_id]).await;
    }
    server.stop().await;
}

/// A cron expression with seconds fires on whole seconds, in its time zone.
#[tokio::test]
async fn cron_with_seconds_fires_on_whole_seconds() {
    let mut server = TestServer::start().await;
    let mut sub = Sub::open(&mut server.client, "q", 10).await;
    let job = schedule(
        &mut server.client,
        job("q", cron_trigger("* * * * * *", "Europe/Berlin")),
    )
    .await;
    let first = sub.next(2_000).await;
    let second = sub.next(2_000).await;
    assert_eq!(first.job_id, job.id);
    let (a, b) = (
        micros_of(&first.scheduled_time),
        micros_of(&second.scheduled_time),
    );
    assert_eq!(a % 1_000_000, 0);
    assert_eq!(b - a, 1_000_000);
    server.stop().await;
}

/// max_fires completes a job after that many fires.
#[tokio::test]
async fn max_fires_completes_the_job() {
    let mut server = TestServer::start().await;
    let mut sub = Sub::open(&mut server.client, "q", 10).await;
    let mut j = job("q", every_trigger(100, None));
    j.max_fires = 2;
    let job = schedule(&mut server.client, j).await;
    sub.next(2_000).await;
    sub.next(2_000).await;
    sub.expect_none(350).await;
    let got = server
        .client
        .get_job(pb::GetJobRequest { id: job.id })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(got.state(), pb::JobState::Completed);
    assert_eq!(got.fire_count, 2);
    server.stop().await;
}

/// Cancel stops further fires; cancelling twice is fine; an unknown id is NOT_FOUND.
#[tokio::test]
async fn cancel_stops_fires() {
    let mut server = TestServer::start().await;
    let mut sub = Sub::open(&mut server.client, "q", 10).await;
    let job = schedule(&mut server.client, job("q", every_trigger(200, None))).await;
    let cancelled = server
        .client
        .cancel_job(pb::CancelJobRequest { id: job.id.clone() })
        .await
        .expect("cancel")
        .into_inner();
    assert_eq!(cancelled.state(), pb::JobState::Cancelled);
    assert!(cancelled.next_fire_time.is_none());
    sub.expect_none(600).await;
    let again = server
        .client
        .cancel_job(pb::CancelJobRequest { id: job.id.clone() })
        .await
        .expect("second cancel is not an error")
        .into_inner();
    assert_eq!(again.state(), pb::JobState::Cancelled);
    let missing = server
        .client
        .cancel_job(pb::CancelJobRequest { id: "nope".into() })
        .await
        .expect_err("unknown id");
    assert_eq!(missing.code(), Code::NotFound);
    server.stop().await;
}

/// A paused job does not fire; on resume, what it missed follows the misfire policy
/// (FIRE_ONCE: one catch-up fire for the latest missed occurrence).
#[tokio::test]
async fn pause_and_resume_follow_misfire_policy() {
    let mut server = TestServer::start().await;
    let mut sub = Sub::open(&mut server.client, "q", 10).await;
    let start = now_micros() + 300_000;
    let mut j = job("q", every_trigger(100, Some(ts_micros(start))));
    j.misfire_grace_period = Some(ms(50));
    let job = schedule(&mut server.client, j).await;
    let paused = server
        .client
        .pause_job(pb::PauseJobRequest { id: job.id.clone() })
        .await
        .expect("pause")
        .into_inner();
    assert_eq!(paused.state(), pb::JobState::Paused);
    assert!(paused.next_fire_time.is_none());
    sub.expect_none(800).await; // occurrences at +300, +400, ... +800 ms are missed
    let resumed_at = now_micros();
    let resumed = server
        .client
        .resume_job(pb::ResumeJobRequest { id: job.id.clone() })
        .await
        .expect("resume")
        .into_inner();
    assert_eq!(resumed.state(), pb::JobState::Scheduled);
    let catch_up = sub.next(1_000).await;
    let scheduled = micros_of(&catch_up.scheduled_time);
    assert!(
        scheduled > start,
        "the catch-up carries the latest missed occurrence"
    );
    assert!(scheduled <= resumed_at, "and it was missed, not future");
    assert_eq!((scheduled - start) % 100_000, 0);
    // Then it continues on its grid.
    let next = sub.next(1_000).await;
    assert_eq!((micros_of(&next.scheduled_time) - start) % 100_000, 0);
    assert!(micros_of(&next.scheduled_time) > scheduled);
    // Pausing a cancelled job is refused.
    server
        .client
        .cancel_job(pb::CancelJobRequest { id: job.id.clone() })
        .await
        .expect("cancel");
    let err = server
        .client
        .pause_job(pb::PauseJobRequest { id: job.id })
        .await
        .expect_err("cannot pause a cancelled job");
    assert_eq!(err.code(), Code::FailedPrecondition);
    server.stop().await;
}

/// Scheduling an existing id with the same spec returns the job; a different spec is
/// ALREADY_EXISTS. An empty id gets a generated one.
#[tokio::test]
async fn schedule_is_idempotent_by_id() {
    let mut server = TestServer::start().await;
    let mut j = job("q", after_trigger(60_000));
    j.id = "report-1".into();
    let first = schedule(&mut server.client, j.clone()).await;
    let second = schedule(&mut server.client, j.clone()).await;
    assert_eq!(first.id, "report-1");
    assert_eq!(first.create_time, second.create_time);
    j.payload = b"different".to_vec().into();
    let err = server
        .client
        .schedule(pb::ScheduleRequest { job: Some(j) })
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

/// ListJobs filters by queue, state and labels, and pages through results.
#[tokio::test]
async fn list_jobs_filters_and_pages() {
    let mut server = TestServer::start().await;
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
