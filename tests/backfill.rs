//! BackfillJob: the occurrences of a past range that were not delivered go out again, oldest
//! first, with their usual fire ids; what was delivered or is still out is left alone, so a
//! repeated backfill releases nothing twice; a range the ledger may have forgotten is refused.
//! On both stores.

mod common;

use common::*;
use tickd::api::pb;
use tonic::Code;

const S: i64 = 1_000_000;

async fn backfill(
    server: &mut TestServer,
    id: &str,
    start: i64,
    end: i64,
) -> Result<pb::BackfillJobResponse, tonic::Status> {
    let answer = server
        .client
        .backfill_job(pb::BackfillJobRequest {
            id: id.into(),
            start_time: Some(ts_micros(start)),
            end_time: Some(ts_micros(end)),
        })
        .await
        .map(|r| r.into_inner());
    server.settle().await;
    answer
}

/// An every-second job from t0 + 1 s that skips what it missed.
fn ticking(q: &str, id: &str, t0: i64) -> pb::Job {
    let mut j = job(q, every_trigger(1_000, Some(ts_micros(t0 + S))));
    j.id = id.into();
    j.misfire_policy = pb::MisfirePolicy::Skip.into();
    j.misfire_grace_period = Some(ms(500));
    j
}

both_backends! {
    /// 1 s delivered, 2 s still out, 3..6 s skipped while paused: a backfill of 1..6 s
    /// releases 3..6 s oldest first with their usual ids and leaves 1 s and 2 s alone; once
    /// they are acked, the same backfill again releases nothing. The job's fire count and
    /// schedule are untouched.
    #[tokio::test]
    async fn a_backfill_releases_what_was_not_delivered_once(backend) {
        let q = &format!("backfill-{}", backend.name());
        let mut server = backend.manual().await;
        let t0 = server.now();
        let mut sub = server.subscribe(q, 10).await;
        server.schedule(ticking(q, "b", t0)).await;
        server.advance_to(t0 + S).await;
        let first = sub.recv().await;
        sub.ack(&[&first.fire_id]).await;
        server.wait_in_flight(q, 0).await;
        server.advance_to(t0 + 2 * S).await;
        let second = sub.recv().await;
        server.advance_to(t0 + 2 * S + 500_000).await;
        server.pause("b").await.expect("pause");
        server.settle().await;
        server.advance_to(t0 + 6 * S + 500_000).await;
        server.resume("b").await.expect("resume");
        server.settle().await;
        let before = server.job("b").await;

        let done = backfill(&mut server, "b", t0 + S, t0 + 6 * S + 500_000)
            .await
            .expect("backfill");
        assert_eq!((done.delivered_count, done.outstanding_count), (1, 1));
        let expected: Vec<String> = (3..=6)
            .map(|k| tickd::domain::fire_id("b", tickd::domain::Timestamp(t0 + k * S)).to_string())
            .collect();
        assert_eq!(done.fire_ids, expected);
        for id in &expected {
            let fire = sub.recv().await;
            assert_eq!(&fire.fire_id, id, "oldest first");
            sub.ack(&[&fire.fire_id]).await;
        }
        server.wait_in_flight(q, 1).await;
        let after = server.job("b").await;
        assert_eq!(after.fire_count, before.fire_count);
        assert_eq!(after.next_fire_time, before.next_fire_time);

        let again = backfill(&mut server, "b", t0 + S, t0 + 6 * S + 500_000)
            .await
            .expect("backfill");
        assert!(again.fire_ids.is_empty(), "{again:?}");
        assert_eq!((again.delivered_count, again.outstanding_count), (5, 1));
        sub.ack(&[&second.fire_id]).await;
        server.wait_in_flight(q, 0).await;
    }

    /// What a backfill refuses, and that a refused backfill releases nothing: an unknown or
    /// finished job, a malformed or future range, a range of more than 1,000 occurrences,
    /// a start the ledger's retention no longer covers, and one before a ledger trimmed to
    /// its cap.
    #[tokio::test]
    async fn a_backfill_the_ledger_cannot_answer_is_refused(backend) {
        let q = &format!("backfill-refused-{}", backend.name());
        let mut server = backend
            .manual_with(|c| {
                c.ledger_max_per_job = 2;
                c.ledger_retention = std::time::Duration::from_secs(3_600);
            })
            .await;
        let t0 = server.now();
        let mut sub = server.subscribe(q, 10).await;
        server.schedule(ticking(q, "r", t0)).await;
        for k in 1..=3 {
            server.advance_to(t0 + k * S).await;
            let fire = sub.recv().await;
            sub.ack(&[&fire.fire_id]).await;
            server.wait_in_flight(q, 0).await;
        }
        let now = server.now();
        let status = |r: Result<pb::BackfillJobResponse, tonic::Status>| r.expect_err("refused");

        expect_code(backfill(&mut server, "nope", t0, now).await, Code::NotFound);
        let bad = status(backfill(&mut server, "r", now, t0).await);
        assert_bad_field(&bad, "end_time");
        let future = status(backfill(&mut server, "r", now + S, now + 2 * S).await);
        assert_bad_field(&future, "start_time");
        // The ledger holds its cap (2 s and 3 s): 1 s is beyond what it knows.
        let capped = expect_code(backfill(&mut server, "r", t0 + 500_000, now).await, Code::FailedPrecondition);
        assert!(capped.message().contains("--ledger-max-per-job"), "{}", capped.message());
        // An hour of retention: two hours back is beyond it.
        server.advance(7_200_000).await;
        let now = server.now();
        let before = server.counts(q);
        let old = expect_code(backfill(&mut server, "r", t0 + 2 * S, now).await, Code::FailedPrecondition);
        assert!(old.message().contains("--ledger-retention"), "{}", old.message());
        // More than 1,000 occurrences in the range (the last 30 minutes: 1,800).
        let many = status(backfill(&mut server, "r", now - 1_800 * S, now).await);
        assert_bad_field(&many, "end_time");
        assert_eq!(server.counts(q), before, "nothing was released");
        server.cancel("r").await.expect("cancel");
        server.settle().await;
        let finished = expect_code(backfill(&mut server, "r", now - 10 * S, now).await, Code::FailedPrecondition);
        assert!(finished.message().contains("cancelled"), "{}", finished.message());
    }

    /// Without a ledger (`--ledger-max-per-job 0`) tickd cannot tell what was delivered, and
    /// says so.
    #[tokio::test]
    async fn no_ledger_no_backfill(backend) {
        let q = &format!("backfill-off-{}", backend.name());
        let mut server = backend.manual_with(|c| c.ledger_max_per_job = 0).await;
        let t0 = server.now();
        server.schedule(ticking(q, "n", t0)).await;
        server.advance(3_000).await;
        let now = server.now();
        let status = expect_code(
            backfill(&mut server, "n", t0, now).await,
            Code::FailedPrecondition,
        );
        assert!(
            status.message().contains("--ledger-max-per-job 0"),
            "{}",
            status.message()
        );
    }

    /// What the schedule still owes is its own: a paused job's owed occurrences are not
    /// backfilled (resume releases them, once, by the misfire policy); and an id deleted and
    /// used again does not release its predecessor's occurrences (the new job's start later).
    #[tokio::test]
    async fn a_backfill_leaves_the_schedule_its_own(backend) {
        let q = &format!("backfill-own-{}", backend.name());
        let mut server = backend.manual().await;
        let t0 = server.now();
        let mut sub = server.subscribe(q, 10).await;
        let mut j = ticking(q, "o", t0);
        j.misfire_policy = pb::MisfirePolicy::FireAll.into();
        server.schedule(j.clone()).await;
        server.pause("o").await.expect("pause");
        server.advance_to(t0 + 3 * S + 700_000).await;
        let done = backfill(&mut server, "o", t0, t0 + 4 * S).await.expect("backfill");
        assert!(done.fire_ids.is_empty(), "{done:?}");
        server.resume("o").await.expect("resume");
        server.settle().await;
        for k in 1..=3 {
            let fire = sub.recv().await;
            assert_eq!(micros_of(&fire.scheduled_time), t0 + k * S);
            sub.ack(&[&fire.fire_id]).await;
        }
        server.wait_in_flight(q, 0).await;

        server
            .client
            .delete_job(pb::DeleteJobRequest { id: "o".into() })
            .await
            .expect("delete");
        server.schedule(ticking(q, "o", t0)).await;
        server.advance_to(t0 + 4 * S + 100_000).await;
        let done = backfill(&mut server, "o", t0, t0 + 4 * S).await.expect("backfill");
        assert!(done.fire_ids.is_empty(), "the old job's occurrences: {done:?}");
        assert_eq!((done.delivered_count, done.outstanding_count), (0, 0));
    }

    /// A ledger at its cap vouches for its newest `--ledger-max-per-job` entries only, also
    /// when an old occurrence's record arrives late (PostgreSQL trims lazily, so its table may
    /// hold more): a backfill reaching further back is refused, so the delivered 2 s
    /// occurrence is never released again.
    #[tokio::test]
    async fn a_late_record_does_not_hide_a_trimmed_one(backend) {
        let q = &format!("backfill-late-{}", backend.name());
        let mut server = backend.manual_with(|c| c.ledger_max_per_job = 2).await;
        let t0 = server.now();
        let mut sub = server.subscribe(q, 10).await;
        let mut j = ticking(q, "t", t0);
        j.ack_deadline = Some(ms(600_000));
        server.schedule(j).await;
        server.advance_to(t0 + S).await;
        let late = sub.recv().await;
        for k in 2..=4 {
            server.advance_to(t0 + k * S).await;
            let f = sub.recv().await;
            sub.ack(&[&f.fire_id]).await;
            server.wait_in_flight(q, 1).await;
        }
        server.pause("t").await.expect("pause");
        server.settle().await;
        assert_eq!(server.ack(q, &[&late.fire_id]).await, 1);
        server.settle().await;
        // The ledger vouches for its two newest entries only (3 s and 4 s).
        let refused = expect_code(
            backfill(&mut server, "t", t0 + S, t0 + 4 * S + 1).await,
            Code::FailedPrecondition,
        );
        assert!(refused.message().contains("--ledger-max-per-job"), "{}", refused.message());
        let done = backfill(&mut server, "t", t0 + 3 * S, t0 + 4 * S + 1)
            .await
            .expect("backfill");
        assert_eq!((done.fire_ids.len(), done.delivered_count), (0, 2), "{done:?}");
    }
}
