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
            .map(|j| pb::ScheduleRequest { job: Some(j) })
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
