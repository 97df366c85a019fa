//! Retention and DeleteJob: finished jobs are deleted a retention period after they finished
//! (never while a fire of theirs is outstanding), DeleteJob deletes at once and drops what is
//! outstanding, and a deleted id can be used again. All on the manual clock.

mod common;

use common::*;
use tickd::api::pb;
use tonic::Code;

const HOUR_MS: i64 = 3_600_000;

fn named(id: &str, queue: &str, trigger: pb::Trigger) -> pb::Job {
    let mut j = job(queue, trigger);
    j.id = id.into();
    j
}

async fn delete(server: &mut TestServer, id: &str) -> Result<(), tonic::Status> {
    server
        .client
        .delete_job(pb::DeleteJobRequest { id: id.into() })
        .await
        .map(|_| ())
}

both_backends! {
    /// A completed and a cancelled job are kept exactly one retention period after they finished
    /// (finish_time and expire_time say so), then deleted from memory and store; their ids can be
    /// used again.
    #[tokio::test]
    async fn finished_jobs_are_deleted_when_their_retention_ends(backend) {
        let mut server =
            backend.manual_with(|c| c.retention = std::time::Duration::from_secs(3_600)).await;
        let mut sub = server.subscribe("kept", 10).await;
        server
            .schedule(named("once", "kept", after_trigger(1_000)))
            .await;
        server
            .schedule(named("every", "kept", every_trigger(HOUR_MS * 24, None)))
            .await;
        server.advance(1_000).await;
        let fire = sub.recv().await;
        sub.ack(&[&fire.fire_id]).await;
        server.wait_in_flight("kept", 0).await;
        server.settle().await;
        let cancelled = server.cancel("every").await.expect("cancel");
        let finished_at = server.now();
        let once = server.job("once").await;
        assert_eq!(once.state(), pb::JobState::Completed);
        assert_eq!(micros_of(&once.finish_time), finished_at);
        assert_eq!(micros_of(&once.expire_time), finished_at + HOUR_MS * 1_000);
        assert_eq!(micros_of(&cancelled.finish_time), finished_at);
        assert_eq!(
            micros_of(&cancelled.expire_time),
            finished_at + HOUR_MS * 1_000
        );
        let scheduled = server.job("every").await;
        assert_eq!(scheduled.state(), pb::JobState::Cancelled);

        server.advance(HOUR_MS - 1).await;
        server.job("once").await;
        server.job("every").await;
        server.advance(1).await;
        expect_code(server.get("once").await, Code::NotFound);
        expect_code(server.get("every").await, Code::NotFound);

        // With a long retention, only what the store deleted is gone.
        let mut server = server
            .restart_with(|c| c.retention = std::time::Duration::from_secs(86_400 * 365))
            .await;
        expect_code(server.get("once").await, Code::NotFound);
        expect_code(server.get("every").await, Code::NotFound);
        // The id is free again, even for a different spec.
        let again = server
            .schedule(named("once", "other", after_trigger(5_000)))
            .await;
        assert_eq!(again.queue, "other");
        assert_eq!(again.state(), pb::JobState::Scheduled);
        assert!(again.finish_time.is_none() && again.expire_time.is_none());
        server.stop().await;
    }
}

both_backends! {
    /// A finished job whose fire is still outstanding is kept past its retention, and deleted
    /// within a minute of that fire's ack.
    #[tokio::test]
    async fn a_job_with_an_outstanding_fire_is_kept_until_the_fire_is_acked(backend) {
        let mut server =
            backend.manual_with(|c| c.retention = std::time::Duration::from_secs(60)).await;
        let mut sub = server.subscribe("slow", 10).await;
        let mut j = named("slow", "slow", after_trigger(0));
        j.ack_deadline = Some(ms(HOUR_MS));
        server.schedule(j).await;
        server.settle().await;
        let fire = sub.recv().await;
        server.advance(HOUR_MS / 2).await;
        assert_eq!(server.job("slow").await.state(), pb::JobState::Completed);
        assert_eq!(server.counts("slow"), (0, 1), "still in flight");
        sub.ack(&[&fire.fire_id]).await;
        server.wait_in_flight("slow", 0).await;
        server.advance(60_000).await;
        expect_code(server.get("slow").await, Code::NotFound);
        server.stop().await;
    }
}

both_backends! {
    /// Retention counts from the stored finish time, across a restart.
    #[tokio::test]
    async fn retention_counts_from_the_finish_across_a_restart(backend) {
        let mut server =
            backend.manual_with(|c| c.retention = std::time::Duration::from_secs(3_600)).await;
        server
            .schedule(named("r", "restarted", every_trigger(HOUR_MS, None)))
            .await;
        server.cancel("r").await.expect("cancel");
        let mut server = server.restart_after(HOUR_MS / 2).await;
        server.job("r").await;
        server.advance(HOUR_MS / 2 - 1).await;
        server.job("r").await;
        server.advance(1).await;
        expect_code(server.get("r").await, Code::NotFound);
        server.stop().await;
    }
}

both_backends! {
    /// DeleteJob deletes a job in any state at once: its fires waiting and in flight are dropped
    /// (counted, an ack of one is ignored), nothing comes back after a restart, and its id is free.
    #[tokio::test]
    async fn delete_job_drops_what_is_outstanding(backend) {
        let mut server = backend.manual().await;
        // Metrics are per process: a queue name per backend.
        let q = &format!("deleted.{}", backend.name());
        let label = format!("tickd_queue=\"{q}\"");
        let mut sub = server.subscribe(q, 1).await;
        server
            .schedule(named("doomed", q, every_trigger(1_000, None)))
            .await;
        server
            .schedule(named("bystander", q, every_trigger(HOUR_MS, None)))
            .await;
        server.advance(3_000).await;
        let held = sub.recv().await;
        assert_eq!(held.job_id, "doomed");
        // On PostgreSQL the counts are refreshed apart from the claim that took the fire.
        server
            .wait_until("two waiting, one in flight", |s| s.counts(q) == (2, 1))
            .await;

        delete(&mut server, "doomed").await.expect("delete");
        expect_code(server.get("doomed").await, Code::NotFound);
        server.settle().await;
        assert_eq!(server.counts(q), (0, 0));
        assert_eq!(server.ack(q, &[&held.fire_id]).await, 0);
        server.settle().await;
        let text = scrape(server.metrics_addr).await;
        assert_eq!(
            sample(
                &text,
                "tickd_fires_dropped_total",
                &[
                    &label,
                    "tickd_drop_reason=\"job_deleted\""
                ]
            ),
            Some(3.0),
            "{text}"
        );
        server.job("bystander").await;

        expect_code(delete(&mut server, "doomed").await, Code::NotFound);
        let refused = expect_code(delete(&mut server, "").await, Code::InvalidArgument);
        assert_bad_field(&refused, "id");

        let mut server = server.restart().await;
        let mut sub = server.subscribe(q, 10).await;
        server.advance(1_000).await;
        expect_code(server.get("doomed").await, Code::NotFound);
        assert_eq!(server.counts(q), (0, 0));
        let reused = server
            .schedule(named("doomed", q, after_trigger(0)))
            .await;
        assert_eq!(reused.state(), pb::JobState::Scheduled);
        server.settle().await;
        let fresh = sub.recv().await;
        assert_eq!(fresh.job_id, "doomed");
        assert_ne!(fresh.fire_id, held.fire_id);
        server.stop().await;
    }
}
