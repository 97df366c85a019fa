//! UpdateJob: a field mask names what changes (AIP-134), an etag guards against a change made
//! in between (AIP-154), and a new trigger takes over without an occurrence lost or fired
//! twice. On both stores.

mod common;

use common::*;
use prost_types::FieldMask;
use tickd::api::pb;
use tonic::Code;

fn update(job: pb::Job, paths: &[&str]) -> pb::UpdateJobRequest {
    pb::UpdateJobRequest {
        job: Some(job),
        update_mask: Some(FieldMask {
            paths: paths.iter().map(|p| p.to_string()).collect(),
        }),
    }
}

fn named(id: &str, trigger: pb::Trigger) -> pb::Job {
    let mut j = job("q", trigger);
    j.id = id.into();
    j
}

both_backends! {
    /// An interval job is moved to another interval after two fires: the fires are the old
    /// trigger's up to the switch and the new one's after it, none twice, none of the old
    /// after it. The change survives a restart.
    #[tokio::test]
    async fn a_new_trigger_takes_over_at_the_switch(backend) {
        let mut server = backend.manual().await;
        let t0 = server.now();
        let mut sub = server.subscribe("q", 10).await;
        server
            .schedule(named("switch", every_trigger(1_000, Some(ts_micros(t0 + 1_000_000)))))
            .await;
        let mut seen = Vec::new();
        for ms in [1_000, 2_000] {
            server.advance_to(t0 + ms * 1_000).await;
            let fire = sub.recv().await;
            sub.ack(&[&fire.fire_id]).await;
            seen.push((micros_of(&fire.scheduled_time) - t0) / 1_000);
        }
        server.advance_to(t0 + 2_050_000).await;
        let updated = server
            .client
            .update_job(update(
                named("switch", every_trigger(300, Some(ts_micros(t0 + 2_100_000)))),
                &["trigger"],
            ))
            .await
            .expect("update")
            .into_inner();
        assert_eq!(micros_of(&updated.next_fire_time), t0 + 2_100_000);
        assert_eq!(updated.fire_count, 2);
        for ms in [2_100, 2_400, 2_700, 3_000] {
            server.advance_to(t0 + ms * 1_000).await;
            let fire = sub.recv().await;
            sub.ack(&[&fire.fire_id]).await;
            seen.push((micros_of(&fire.scheduled_time) - t0) / 1_000);
        }
        assert_eq!(seen, [1_000, 2_000, 2_100, 2_400, 2_700, 3_000]);
        server.wait_in_flight("q", 0).await;
        assert_eq!(server.counts("q"), (0, 0), "nothing of the old trigger at 3,000");
        let mut server = server.restart().await;
        let after = server.job("switch").await;
        assert_eq!(after.trigger, updated.trigger);
        assert_eq!(after.etag, updated.etag);
        server.stop().await;
    }
}

both_backends! {
    /// A new trigger counts from the update, not from the job's creation: an `at` moved into
    /// the past fires at once even under misfire SKIP (it was not missed), and `after` is
    /// stored as the `at` it resolves to from the update.
    #[tokio::test]
    async fn a_new_trigger_counts_from_the_update(backend) {
        let mut server = backend.manual().await;
        let t0 = server.now();
        let mut sub = server.subscribe("q", 10).await;
        for id in ["past", "later"] {
            let mut j = named(id, at_trigger(ts_micros(t0 + 3_600_000_000)));
            j.misfire_policy = pb::MisfirePolicy::Skip.into();
            j.misfire_grace_period = Some(ms(1_000));
            server.schedule(j).await;
        }
        server.advance_to(t0 + 60_000_000).await;
        let past = server
            .client
            .update_job(update(named("past", at_trigger(ts_micros(t0 + 5_000_000))), &["trigger"]))
            .await
            .expect("update")
            .into_inner();
        assert_eq!(past.trigger, Some(at_trigger(ts_micros(t0 + 60_000_000))));
        let fire = sub.recv().await;
        assert_eq!(fire.fire_id, format!("past@{}", tickd::domain::Timestamp(t0 + 60_000_000)));
        sub.ack(&[&fire.fire_id]).await;
        server.wait_in_flight("q", 0).await;
        assert_eq!(server.job("past").await.state(), pb::JobState::Completed);
        let later = server
            .client
            .update_job(update(named("later", after_trigger(10_000)), &["trigger"]))
            .await
            .expect("update")
            .into_inner();
        assert_eq!(later.trigger, Some(at_trigger(ts_micros(t0 + 70_000_000))));
        assert_eq!(micros_of(&later.next_fire_time), t0 + 70_000_000);
        server.stop().await;
    }
}

both_backends! {
    /// The etag changes with the spec; an update carrying a stale one is ABORTED and changes
    /// nothing; the fields not named stay as they were, and the next fire carries the new
    /// payload and labels.
    #[tokio::test]
    async fn etag_guards_and_fields_not_named_stay(backend) {
        let mut server = backend.manual().await;
        let mut sub = server.subscribe("q", 10).await;
        let mut original = named("guarded", every_trigger(1_000, None));
        original.payload = b"old".to_vec().into();
        original.max_attempts = 7;
        let created = server.schedule(original).await;
        assert!(!created.etag.is_empty());
        assert_eq!(server.job("guarded").await.etag, created.etag, "stable");

        let mut change = named("guarded", cron_trigger("nope", "")); // not named: ignored
        change.payload = b"new".to_vec().into();
        change.labels.insert("team".into(), "web".into());
        change.etag = created.etag.clone();
        let updated = server
            .client
            .update_job(update(change.clone(), &["payload", "labels"]))
            .await
            .expect("update")
            .into_inner();
        assert_ne!(updated.etag, created.etag);
        assert_eq!(updated.payload, b"new".to_vec());
        assert_eq!(updated.trigger, created.trigger);
        assert_eq!(updated.max_attempts, 7);
        assert_eq!(updated.next_fire_time, created.next_fire_time, "same trigger, same next");

        // The same request again carries the etag it read before the first update.
        let status = expect_code(
            server.client.update_job(update(change, &["payload"])).await,
            Code::Aborted,
        );
        assert!(status.message().contains("changed since it was read"), "{status:?}");
        assert_eq!(server.job("guarded").await, updated, "nothing changed");

        server.advance(1_000).await;
        let fire = sub.recv().await;
        assert_eq!(fire.payload, b"new".to_vec());
        assert_eq!(fire.labels.get("team").map(String::as_str), Some("web"));
        server.stop().await;
    }
}

both_backends! {
    /// What cannot be updated is refused, naming the field, and changes nothing: no mask, the
    /// queue or an unknown field in it, a bad new value, an unknown job, a finished job. A
    /// max_fires the job has reached completes it.
    #[tokio::test]
    async fn refusals_and_completion(backend) {
        let mut server = backend.manual().await;
        let mut sub = server.subscribe("q", 10).await;
        let created = server.schedule(named("u", every_trigger(1_000, None))).await;
        let mut c = server.client.clone();
        let no_mask = pb::UpdateJobRequest {
            job: Some(named("u", every_trigger(5, None))),
            update_mask: None,
        };
        assert_bad_field(&expect_code(c.update_job(no_mask).await, Code::InvalidArgument), "update_mask");
        for paths in [&["queue"][..], &["state"][..], &["trigger", "nope"][..]] {
            let status = expect_code(
                c.update_job(update(named("u", every_trigger(5, None)), paths)).await,
                Code::InvalidArgument,
            );
            assert_bad_field(&status, "update_mask");
        }
        let status = expect_code(
            c.update_job(update(named("u", cron_trigger("nope", "")), &["trigger"])).await,
            Code::InvalidArgument,
        );
        assert_bad_field(&status, "job.trigger.cron.expression");
        expect_code(
            c.update_job(update(named("missing", every_trigger(5, None)), &["trigger"])).await,
            Code::NotFound,
        );
        assert_eq!(server.job("u").await, created, "nothing changed");

        server.advance(1_000).await;
        let fire = sub.recv().await;
        sub.ack(&[&fire.fire_id]).await;
        let mut one = named("u", every_trigger(5, None));
        one.max_fires = 1;
        let done = c.update_job(update(one, &["max_fires"])).await.expect("update").into_inner();
        assert_eq!(done.state(), pb::JobState::Completed);
        assert_eq!(done.next_fire_time, None);
        let status = expect_code(
            c.update_job(update(named("u", every_trigger(5, None)), &["*"])).await,
            Code::FailedPrecondition,
        );
        assert!(status.message().contains("is completed"), "{status:?}");
        server.stop().await;
    }
}
