//! TriggerJob: one extra occurrence now, with a fire id of its own, the schedule untouched.
//! On both stores.

mod common;

use common::*;
use tickd::api::pb;
use tonic::Code;

fn trigger(id: &str) -> pb::TriggerJobRequest {
    pb::TriggerJobRequest { id: id.into() }
}

both_backends! {
    /// A triggered fire arrives now, as `<id>@<now>#trigger`, acks like any other, and
    /// leaves the job's next occurrence and fire count alone; an un-acked one survives a
    /// restart and is delivered again with the same id.
    #[tokio::test]
    async fn a_triggered_fire_is_extra_and_durable(backend) {
        let mut server = backend.manual().await;
        let mut sub = server.subscribe("q", 10).await;
        let mut j = job("q", every_trigger(3_600_000, None));
        j.id = "hourly".into();
        let created = server.schedule(j).await;
        server.advance(5).await;
        let now = server.now();
        let answer = server
            .client
            .trigger_job(trigger("hourly"))
            .await
            .expect("trigger")
            .into_inner();
        // On PostgreSQL under a manual clock, subscriptions claim when the server settles.
        server.settle().await;
        assert_eq!(micros_of(&answer.scheduled_time), now);
        assert!(answer.fire_id.starts_with("hourly@"), "{}", answer.fire_id);
        assert!(answer.fire_id.ends_with("#trigger"), "{}", answer.fire_id);
        let fire = sub.recv().await;
        assert_eq!(fire.fire_id, answer.fire_id);
        assert_eq!(fire.scheduled_time, answer.scheduled_time);
        assert_eq!(fire.attempt, 1);
        let after = server.job("hourly").await;
        assert_eq!(after.next_fire_time, created.next_fire_time, "schedule untouched");
        assert_eq!(after.fire_count, 0);
        sub.ack(&[&fire.fire_id]).await;
        server.wait_in_flight("q", 0).await;

        server.advance(1).await;
        let second = server
            .client
            .trigger_job(trigger("hourly"))
            .await
            .expect("trigger")
            .into_inner();
        server.settle().await;
        assert_ne!(second.fire_id, answer.fire_id);
        assert_eq!(sub.recv().await.fire_id, second.fire_id);
        drop(sub);
        let mut server = server.restart().await;
        let mut sub = server.subscribe("q", 10).await;
        // Delivered again at once on the embedded store, after its lease on PostgreSQL.
        server.advance(31_000).await;
        let again = sub.recv().await;
        assert_eq!(again.fire_id, second.fire_id, "the un-acked triggered fire survived");
        server.stop().await;
    }
}

both_backends! {
    /// A paused job can be triggered; a cancelled one, an unknown one, an empty id and a full
    /// queue are refused, and nothing is released.
    #[tokio::test]
    async fn what_cannot_be_triggered(backend) {
        let mut server = backend.manual_with(|c| c.max_queue_backlog = 1).await;
        for id in ["p", "c"] {
            let mut j = job("q", every_trigger(3_600_000, None));
            j.id = id.into();
            server.schedule(j).await;
        }
        server.pause("p").await.expect("pause");
        server.cancel("c").await.expect("cancel");
        let mut c = server.client.clone();
        expect_code(c.trigger_job(trigger("c")).await, Code::FailedPrecondition);
        expect_code(c.trigger_job(trigger("missing")).await, Code::NotFound);
        expect_code(c.trigger_job(trigger("")).await, Code::InvalidArgument);
        server.settle().await;
        assert_eq!(server.counts("q"), (0, 0));
        c.trigger_job(trigger("p")).await.expect("a paused job can be triggered");
        server.settle().await;
        assert_eq!(server.counts("q"), (1, 0));
        server.advance(1).await;
        let status = expect_code(c.trigger_job(trigger("p")).await, Code::ResourceExhausted);
        assert!(status.message().contains("--max-queue-backlog"), "{status:?}");
        server.settle().await;
        assert_eq!(server.counts("q"), (1, 0), "nothing more released");
        server.stop().await;
    }
}
