//! BatchSchedule: up to 1,000 jobs in one call and one commit, all or nothing, with each
//! refusal naming the request it is in. On both stores.

mod common;

use common::*;
use tickd::api::pb;
use tonic::Code;

fn batch(jobs: Vec<pb::Job>) -> pb::BatchScheduleRequest {
    pb::BatchScheduleRequest {
        requests: jobs
            .into_iter()
            .map(|j| pb::ScheduleRequest {
                job: Some(j),
                ..Default::default()
            })
            .collect(),
    }
}

fn named(id: &str, queue: &str, trigger: pb::Trigger) -> pb::Job {
    let mut j = job(queue, trigger);
    j.id = id.into();
    j
}

both_backends! {
    /// The jobs are created in the order asked, with ids given or assigned; they are there
    /// after a restart and fire like any job.
    #[tokio::test]
    async fn a_batch_creates_every_job_in_order(backend) {
        let mut server = backend.manual().await;
        let request = batch(vec![
            named("first", "batch", after_trigger(1_000)),
            job("batch", after_trigger(2_000)),
            named("third", "batch", every_trigger(3_000, None)),
        ]);
        let jobs = server
            .client
            .batch_schedule(request)
            .await
            .expect("batch")
            .into_inner()
            .jobs;
        assert_eq!(jobs.len(), 3);
        assert_eq!(jobs[0].id, "first");
        assert!(!jobs[1].id.is_empty(), "an id was assigned");
        assert_eq!(jobs[2].id, "third");
        assert_eq!(micros_of(&jobs[1].next_fire_time), server.now() + 2_000_000);

        let mut server = server.restart().await;
        for j in &jobs {
            assert_eq!(server.job(&j.id).await.next_fire_time, j.next_fire_time);
        }
        let mut sub = server.subscribe("batch", 10).await;
        server.advance(3_000).await;
        let mut fired: Vec<String> = Vec::new();
        for _ in 0..3 {
            fired.push(sub.recv().await.job_id);
        }
        fired.sort();
        let mut want: Vec<String> = jobs.iter().map(|j| j.id.clone()).collect();
        want.sort();
        assert_eq!(fired, want);
        server.stop().await;
    }
}

both_backends! {
    /// One bad request refuses the whole batch: every violation is named with its request's
    /// index, and no job of the batch is created.
    #[tokio::test]
    async fn one_bad_request_refuses_the_batch(backend) {
        let mut server = backend.manual().await;
        let mut bad_queue = named("c", "ok", after_trigger(1_000));
        bad_queue.queue = String::new();
        let refused = server
            .client
            .batch_schedule(batch(vec![
                named("a", "ok", after_trigger(1_000)),
                named("b", "ok", cron_trigger("nope", "UTC")),
                bad_queue,
                named("a", "ok", after_trigger(5_000)),
            ]))
            .await;
        let status = expect_code(refused, Code::InvalidArgument);
        let mut fields = bad_fields(&status);
        fields.sort();
        assert_eq!(
            fields,
            vec![
                "requests[1].job.trigger.cron.expression",
                "requests[2].job.queue",
                "requests[3].job.id",
            ],
            "{status:?}"
        );
        assert_eq!(server.core.job_count().await, 0, "nothing was created");

        for n in [0, 1_001] {
            let jobs = (0..n).map(|_| job("ok", after_trigger(1_000))).collect();
            let refused = server.client.batch_schedule(batch(jobs)).await;
            assert_bad_field(&expect_code(refused, Code::InvalidArgument), "requests");
        }
        assert_eq!(server.core.job_count().await, 0);
        server.stop().await;
    }
}

both_backends! {
    /// An id taken by a different job refuses the batch with ALREADY_EXISTS naming the request,
    /// and creates none of the others; an id taken by the same job is answered with it, so a
    /// retried batch creates nothing twice.
    #[tokio::test]
    async fn a_taken_id_refuses_the_batch_and_a_retry_is_idempotent(backend) {
        let mut server = backend.manual().await;
        server.schedule(named("taken", "q", after_trigger(60_000))).await;
        let refused = server
            .client
            .batch_schedule(batch(vec![
                named("new", "q", after_trigger(1_000)),
                named("taken", "q", after_trigger(1_000)),
            ]))
            .await;
        let status = expect_code(refused, Code::AlreadyExists);
        assert!(status.message().contains("requests[1]"), "{status:?}");
        expect_code(server.get("new").await, Code::NotFound);

        let request = batch(vec![
            named("new", "q", after_trigger(1_000)),
            named("other", "q", after_trigger(2_000)),
        ]);
        let first = server
            .client
            .batch_schedule(request.clone())
            .await
            .expect("batch")
            .into_inner();
        let again = server
            .client
            .batch_schedule(request)
            .await
            .expect("the same batch again")
            .into_inner();
        assert_eq!(first.jobs, again.jobs);
        assert_eq!(server.core.job_count().await, 3);
        server.stop().await;
    }
}

fn with_request_id(job: pb::Job, request_id: &str) -> pb::ScheduleRequest {
    pb::ScheduleRequest {
        job: Some(job),
        request_id: request_id.into(),
    }
}

both_backends! {
    /// A Schedule without an id but with a request_id can be retried, also after a restart:
    /// the retry returns the job the first call created and stores nothing new. The same
    /// request_id with another job is ALREADY_EXISTS; another request_id is another job; an
    /// explicit id wins over the request_id.
    #[tokio::test]
    async fn schedule_with_a_request_id_is_safe_to_retry(backend) {
        let mut server = backend.manual().await;
        let proposed = job("idem", after_trigger(60_000));
        let first = server
            .client
            .schedule(with_request_id(proposed.clone(), "2f9a1c3e-0d4b-4e5f-8a6b-7c8d9e0f1a2b"))
            .await
            .expect("schedule")
            .into_inner();
        assert_eq!(first.id.len(), 36, "a UUID: {}", first.id);
        server.advance(10).await;
        let retry = server
            .client
            .schedule(with_request_id(proposed.clone(), "2f9a1c3e-0d4b-4e5f-8a6b-7c8d9e0f1a2b"))
            .await
            .expect("retry")
            .into_inner();
        assert_eq!(retry, first, "the same job, created once");

        let mut different = proposed.clone();
        different.payload = b"other".to_vec().into();
        expect_code(
            server
                .client
                .schedule(with_request_id(different, "2f9a1c3e-0d4b-4e5f-8a6b-7c8d9e0f1a2b"))
                .await,
            Code::AlreadyExists,
        );
        let other = server
            .client
            .schedule(with_request_id(proposed.clone(), "another-request"))
            .await
            .expect("schedule")
            .into_inner();
        assert_ne!(other.id, first.id);
        let mut explicit = proposed.clone();
        explicit.id = "explicit".into();
        let named = server
            .client
            .schedule(with_request_id(explicit, "third-request"))
            .await
            .expect("schedule")
            .into_inner();
        assert_eq!(named.id, "explicit");
        let status = expect_code(
            server
                .client
                .schedule(with_request_id(proposed.clone(), "no spaces allowed"))
                .await,
            Code::InvalidArgument,
        );
        assert_bad_field(&status, "request_id");

        let mut server = server.restart().await;
        let after_restart = server
            .client
            .schedule(with_request_id(proposed, "2f9a1c3e-0d4b-4e5f-8a6b-7c8d9e0f1a2b"))
            .await
            .expect("retry after restart")
            .into_inner();
        assert_eq!(after_restart.id, first.id);
        assert_eq!(after_restart.create_time, first.create_time);
        let listed = server
            .client
            .list_jobs(pb::ListJobsRequest {
                queue: "idem".into(),
                ..Default::default()
            })
            .await
            .expect("list")
            .into_inner();
        assert_eq!(listed.jobs.len(), 3, "first, other and explicit: nothing twice");
        server.stop().await;
    }
}

both_backends! {
    /// In a batch, request ids make a retried batch create nothing twice, and two requests
    /// with one request id are refused, naming the second.
    #[tokio::test]
    async fn a_batch_with_request_ids_is_safe_to_retry(backend) {
        let mut server = backend.manual().await;
        let request = pb::BatchScheduleRequest {
            requests: vec![
                with_request_id(job("idem", after_trigger(1_000)), "r-1"),
                with_request_id(job("idem", after_trigger(2_000)), "r-2"),
            ],
        };
        let first = server
            .client
            .batch_schedule(request.clone())
            .await
            .expect("batch")
            .into_inner();
        let again = server
            .client
            .batch_schedule(request)
            .await
            .expect("retried batch")
            .into_inner();
        assert_eq!(first.jobs, again.jobs);
        assert_ne!(first.jobs[0].id, first.jobs[1].id);
        let status = expect_code(
            server
                .client
                .batch_schedule(pb::BatchScheduleRequest {
                    requests: vec![
                        with_request_id(job("idem", after_trigger(1_000)), "r-3"),
                        with_request_id(job("idem", after_trigger(2_000)), "r-3"),
                    ],
                })
                .await,
            Code::InvalidArgument,
        );
        assert_bad_field(&status, "requests[1].request_id");
        server.stop().await;
    }
}
