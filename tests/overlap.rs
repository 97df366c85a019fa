//! Overlap policies: what an occurrence due while the job's previous fire still runs (released,
//! not yet acked, dead-lettered or dropped) does. SKIP skips it, BUFFER_ONE holds one until the
//! running fire ends, REPLACE withdraws the running fire; TriggerJob obeys the same policy.
//! Across redeliveries, a dead-lettering and a restart, on both stores, checked through what
//! workers receive and through the ledger.

mod common;

use common::*;
use tickd::api::pb;

/// (occurrence in s after t0, count, outcome, skip reason, attempts, triggered).
type Row = (i64, u64, pb::OccurrenceOutcome, pb::SkipReason, u32, bool);

async fn ledger(server: &mut TestServer, job_id: &str, t0: i64) -> Vec<Row> {
    let page = server
        .client
        .list_occurrences(pb::ListOccurrencesRequest {
            job_id: job_id.into(),
            page_size: 100,
            page_token: String::new(),
        })
        .await
        .expect("list occurrences")
        .into_inner();
    let mut rows: Vec<Row> = page
        .occurrences
        .iter()
        .map(|o| {
            (
                (micros_of(&o.scheduled_time) - t0) / 1_000_000,
                o.count,
                o.outcome(),
                o.skip_reason(),
                o.attempts,
                o.triggered,
            )
        })
        .collect();
    rows.reverse();
    rows
}

/// An every-second job from t0 + 1 s with `policy`, a short grace, two attempts.
fn ticking(q: &str, id: &str, t0: i64, policy: pb::OverlapPolicy) -> pb::Job {
    let mut j = job(q, every_trigger(1_000, Some(ts_micros(t0 + 1_000_000))));
    j.id = id.into();
    j.overlap_policy = policy.into();
    j.misfire_grace_period = Some(ms(500));
    j.max_attempts = 2;
    j
}

fn at(t0: i64, fire: &pb::Fire) -> i64 {
    (micros_of(&fire.scheduled_time) - t0) / 1_000_000
}

async fn trigger(server: &mut TestServer, id: &str) -> pb::TriggerJobResponse {
    let answer = server
        .client
        .trigger_job(pb::TriggerJobRequest { id: id.into() })
        .await
        .expect("trigger")
        .into_inner();
    server.settle().await;
    answer
}

/// The next fire, which the server releases on its own after something the test did (an ack
/// lets a held fire go): settles until it arrives (on PostgreSQL under a manual clock,
/// subscriptions claim when the server settles).
async fn next_fire(server: &TestServer, sub: &mut Sub) -> pb::Fire {
    for _ in 0..500 {
        server.settle().await;
        if let Ok(got) =
            tokio::time::timeout(std::time::Duration::from_millis(10), sub.fires.message()).await
        {
            return got.expect("stream").expect("stream ended");
        }
    }
    panic!("no fire came");
}

use pb::OccurrenceOutcome::*;
const NONE: pb::SkipReason = pb::SkipReason::Unspecified;
const OVERLAP: pb::SkipReason = pb::SkipReason::Overlap;

both_backends! {
    /// SKIP: while the 1 s fire runs (delivered, nacked, delivered again) the 2 s and 3 s
    /// occurrences are skipped; once it is acked the 4 s one goes out. The ledger says so,
    /// and the skip counter moves.
    #[tokio::test]
    async fn skip_passes_over_what_falls_due_while_a_fire_runs(backend) {
        let q = &format!("overlap-skip-{}", backend.name());
        let mut server = backend.manual().await;
        let t0 = server.now();
        let mut sub = server.subscribe(q, 10).await;
        server.schedule(ticking(q, "s", t0, pb::OverlapPolicy::Skip)).await;
        assert_eq!(server.job("s").await.overlap_policy(), pb::OverlapPolicy::Skip);

        server.advance_to(t0 + 1_000_000).await;
        let first = sub.recv().await;
        assert_eq!(at(t0, &first), 1);
        server.advance_to(t0 + 2_000_000).await;
        // Nacked: delivered again, still running.
        sub.nack(&[&first.fire_id], None).await;
        server.settle().await;
        let again = sub.recv().await;
        assert_eq!((again.fire_id.as_str(), again.attempt), (first.fire_id.as_str(), 2));
        server.advance_to(t0 + 3_000_000).await;
        assert_eq!(server.counts(q), (0, 1), "only the 1 s fire is out");
        sub.ack(&[&first.fire_id]).await;
        server.wait_in_flight(q, 0).await;
        server.advance_to(t0 + 4_000_000).await;
        let next = sub.recv().await;
        assert_eq!(at(t0, &next), 4);
        sub.ack(&[&next.fire_id]).await;
        server.wait_in_flight(q, 0).await;

        assert_eq!(
            ledger(&mut server, "s", t0).await,
            vec![
                (1, 1, Delivered, NONE, 2, false),
                (2, 1, Skipped, OVERLAP, 0, false),
                (3, 1, Skipped, OVERLAP, 0, false),
                (4, 1, Delivered, NONE, 1, false),
            ]
        );
        let metrics = scrape(server.metrics_addr).await;
        let queue = format!("tickd_queue=\"{q}\"");
        assert_eq!(
            sample(
                &metrics,
                "tickd_occurrences_skipped_total",
                &[&queue, "tickd_skip_reason=\"overlap\""]
            ),
            Some(2.0),
            "{metrics}"
        );
    }

    /// BUFFER_ONE: the 2 s occurrence is held while the 1 s fire runs, the 3 s one skipped;
    /// the held fire survives a restart (and stays held, the 1 s fire being out again), and
    /// goes out when the 1 s fire is acked. Then a running fire that is dead-lettered lets
    /// the held one go too.
    #[tokio::test]
    async fn buffer_one_holds_one_until_the_running_fire_ends(backend) {
        let q = &format!("overlap-buffer-{}", backend.name());
        let dead = &format!("overlap-buffer-dead-{}", backend.name());
        let mut server = backend.manual().await;
        let t0 = server.now();
        let mut sub = server.subscribe(q, 10).await;
        let mut j = ticking(q, "b", t0, pb::OverlapPolicy::BufferOne);
        j.dead_letter_queue = dead.clone();
        server.schedule(j).await;

        server.advance_to(t0 + 1_000_000).await;
        let first = sub.recv().await;
        assert_eq!(at(t0, &first), 1);
        server.advance_to(t0 + 2_000_000).await;
        server.advance_to(t0 + 3_000_000).await;
        assert_eq!(server.counts(q), (0, 1), "the 2 s fire is held, not waiting");
        assert_eq!(server.job("b").await.fire_count, 2, "a held fire is released");
        drop(sub);

        let mut server = server.restart().await;
        let mut sub = server.subscribe(q, 10).await;
        server.settle().await;
        // Only the 1 s fire is out (delivered again on the embedded store, still leased on
        // PostgreSQL); the 2 s fire is still held. The 1 s fire's ack lets it go.
        assert_eq!(server.counts(q), (0, 1), "the 2 s fire is still held");
        assert_eq!(server.ack(q, &[&first.fire_id]).await, 1);
        let mut held = next_fire(&server, &mut sub).await;
        if held.fire_id == first.fire_id {
            held = next_fire(&server, &mut sub).await;
        }
        assert_eq!(at(t0, &held), 2);

        // 4 s is held behind the 2 s fire, which fails both attempts and is dead-lettered:
        // the 4 s fire goes.
        server.advance_to(t0 + 3_600_000).await;
        server.advance_to(t0 + 4_000_000).await;
        assert_eq!(server.counts(q), (0, 1));
        sub.nack(&[&held.fire_id], None).await;
        server.settle().await;
        let retry = sub.recv().await;
        assert_eq!((retry.fire_id.as_str(), retry.attempt), (held.fire_id.as_str(), 2));
        sub.nack(&[&held.fire_id], None).await;
        let fourth = next_fire(&server, &mut sub).await;
        assert_eq!(at(t0, &fourth), 4);
        sub.ack(&[&fourth.fire_id]).await;
        server.wait_in_flight(q, 0).await;

        assert_eq!(
            ledger(&mut server, "b", t0).await,
            vec![
                (1, 1, Delivered, NONE, 1, false),
                (2, 1, DeadLettered, NONE, 2, false),
                (3, 1, Skipped, OVERLAP, 0, false),
                (4, 1, Delivered, NONE, 1, false),
            ]
        );
    }

    /// A held fire let go (the 2 s one, after the 1 s fire's ack) is out like any other, and
    /// the next occurrence is held behind it, also across a restart: the 3 s fire goes only
    /// once the 2 s fire is acked.
    #[tokio::test]
    async fn a_fire_let_go_runs_and_holds_the_next_across_a_restart(backend) {
        let q = &format!("overlap-let-go-{}", backend.name());
        let mut server = backend.manual().await;
        let t0 = server.now();
        let mut sub = server.subscribe(q, 10).await;
        let mut j = ticking(q, "g", t0, pb::OverlapPolicy::BufferOne);
        j.end_time = Some(ts_micros(t0 + 3_500_000));
        server.schedule(j).await;
        server.advance_to(t0 + 1_000_000).await;
        let first = sub.recv().await;
        server.advance_to(t0 + 2_000_000).await;
        sub.ack(&[&first.fire_id]).await;
        let second = next_fire(&server, &mut sub).await;
        assert_eq!(at(t0, &second), 2);
        server.advance_to(t0 + 3_000_000).await;
        assert_eq!(server.counts(q), (0, 1), "the 3 s fire is held behind the 2 s one");
        drop(sub);

        let mut server = server.restart().await;
        let mut sub = server.subscribe(q, 10).await;
        server.settle().await;
        assert_eq!(server.counts(q), (0, 1), "the 3 s fire is still held");
        assert_eq!(server.ack(q, &[&second.fire_id]).await, 1);
        let mut third = next_fire(&server, &mut sub).await;
        if third.fire_id == second.fire_id {
            third = next_fire(&server, &mut sub).await;
        }
        assert_eq!(at(t0, &third), 3);
        sub.ack(&[&third.fire_id]).await;
        server.wait_in_flight(q, 0).await;
        assert_eq!(server.job("g").await.state(), pb::JobState::Completed);
        assert_eq!(
            ledger(&mut server, "g", t0).await,
            vec![
                (1, 1, Delivered, NONE, 1, false),
                (2, 1, Delivered, NONE, 1, false),
                (3, 1, Delivered, NONE, 1, false),
            ]
        );
    }

    /// REPLACE: the 2 s occurrence goes out and the un-acked 1 s fire is withdrawn (the
    /// worker's later ack of it is accepted and changes nothing; it is not delivered again).
    /// The ledger says REPLACED with the deliveries made, and the drop counter says why.
    #[tokio::test]
    async fn replace_withdraws_the_running_fire(backend) {
        let q = &format!("overlap-replace-{}", backend.name());
        let mut server = backend.manual().await;
        let t0 = server.now();
        let mut sub = server.subscribe(q, 10).await;
        server.schedule(ticking(q, "r", t0, pb::OverlapPolicy::Replace)).await;

        server.advance_to(t0 + 1_000_000).await;
        let first = sub.recv().await;
        server.advance_to(t0 + 2_000_000).await;
        let second = sub.recv().await;
        assert_eq!(at(t0, &second), 2);
        assert_eq!(server.counts(q), (0, 1), "the 1 s fire is gone");
        assert_eq!(server.ack(q, &[&first.fire_id]).await, 0, "a withdrawn fire's ack is a no-op");
        sub.ack(&[&second.fire_id]).await;
        server.wait_in_flight(q, 0).await;

        assert_eq!(
            ledger(&mut server, "r", t0).await,
            vec![
                (1, 1, Replaced, NONE, 1, false),
                (2, 1, Delivered, NONE, 1, false),
            ]
        );
        let metrics = scrape(server.metrics_addr).await;
        assert_eq!(
            sample(
                &metrics,
                "tickd_fires_dropped_total",
                &[&format!("tickd_queue=\"{q}\""), "tickd_drop_reason=\"replaced\""]
            ),
            Some(1.0),
            "{metrics}"
        );
    }

    /// TriggerJob obeys the policy, which UpdateJob changes: with a fire running, SKIP
    /// skips the triggered occurrence (and records it, triggered), BUFFER_ONE holds it until
    /// the running fire is acked, REPLACE releases it and withdraws the running one.
    #[tokio::test]
    async fn trigger_obeys_the_overlap_policy(backend) {
        let q = &format!("overlap-trigger-{}", backend.name());
        let mut server = backend.manual().await;
        let t0 = server.now();
        let mut sub = server.subscribe(q, 10).await;
        let mut j = job(q, every_trigger(3_600_000, None));
        j.id = "t".into();
        j.overlap_policy = pb::OverlapPolicy::Skip.into();
        server.schedule(j).await;
        let set_policy = |policy: pb::OverlapPolicy| pb::UpdateJobRequest {
            job: Some(pb::Job {
                id: "t".into(),
                overlap_policy: policy.into(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["overlap_policy".into()],
            }),
        };

        // Nothing runs: released.
        server.advance(1_000).await;
        let first = trigger(&mut server, "t").await;
        assert_eq!(first.outcome(), pb::TriggerOutcome::Released);
        let running = sub.recv().await;
        assert_eq!(running.fire_id, first.fire_id);
        // SKIP, with it running: skipped, no fire id.
        server.advance(1_000).await;
        let skipped = trigger(&mut server, "t").await;
        assert_eq!(skipped.outcome(), pb::TriggerOutcome::Skipped);
        assert!(skipped.fire_id.is_empty());

        // BUFFER_ONE: held, delivered when the running fire is acked.
        server.client.update_job(set_policy(pb::OverlapPolicy::BufferOne)).await.expect("update");
        server.advance(1_000).await;
        let held = trigger(&mut server, "t").await;
        assert_eq!(held.outcome(), pb::TriggerOutcome::Held);
        assert!(held.fire_id.ends_with("#trigger"), "{}", held.fire_id);
        assert_eq!(server.counts(q), (0, 1));
        sub.ack(&[&running.fire_id]).await;
        let released = next_fire(&server, &mut sub).await;
        assert_eq!(released.fire_id, held.fire_id);

        // REPLACE: released, the running (formerly held) fire withdrawn.
        server.client.update_job(set_policy(pb::OverlapPolicy::Replace)).await.expect("update");
        server.advance(1_000).await;
        let replacing = trigger(&mut server, "t").await;
        assert_eq!(replacing.outcome(), pb::TriggerOutcome::Released);
        let last = sub.recv().await;
        assert_eq!(last.fire_id, replacing.fire_id);
        assert_eq!(server.counts(q), (0, 1));
        sub.ack(&[&last.fire_id]).await;
        server.wait_in_flight(q, 0).await;

        assert_eq!(
            ledger(&mut server, "t", t0).await,
            vec![
                (1, 1, Delivered, NONE, 1, true),
                (2, 1, Skipped, OVERLAP, 0, true),
                (3, 1, Replaced, NONE, 1, true),
                (4, 1, Delivered, NONE, 1, true),
            ]
        );
        assert_eq!(server.job("t").await.fire_count, 0, "triggered fires leave the count alone");
    }

    /// A catch-up of several occurrences at once (FIRE_ALL after an outage) is cut by the
    /// policy: SKIP releases the first of them and skips the rest as one run; BUFFER_ONE
    /// releases the first and holds the second; REPLACE releases the last.
    #[tokio::test]
    async fn a_catch_up_is_cut_by_the_policy(backend) {
        let q = &format!("overlap-catch-up-{}", backend.name());
        let mut server = backend.manual().await;
        let t0 = server.now();
        let mut sub = server.subscribe(q, 10).await;
        for (id, policy) in [
            ("cs", pb::OverlapPolicy::Skip),
            ("cb", pb::OverlapPolicy::BufferOne),
            ("cr", pb::OverlapPolicy::Replace),
        ] {
            let mut j = ticking(q, id, t0, policy);
            j.misfire_policy = pb::MisfirePolicy::FireAll.into();
            server.schedule(j).await;
        }
        // 1..4 s missed at once.
        server.advance_to(t0 + 4_700_000).await;
        let mut got: Vec<(String, i64)> = Vec::new();
        for _ in 0..3 {
            let f = sub.recv().await;
            got.push((f.job_id.clone(), at(t0, &f)));
        }
        got.sort();
        assert_eq!(
            got,
            vec![("cb".into(), 1), ("cr".into(), 4), ("cs".into(), 1)]
        );
        assert_eq!(
            ledger(&mut server, "cs", t0).await,
            vec![(2, 3, Skipped, OVERLAP, 0, false)]
        );
        assert_eq!(
            ledger(&mut server, "cb", t0).await,
            vec![(3, 2, Skipped, OVERLAP, 0, false)]
        );
        assert_eq!(
            ledger(&mut server, "cr", t0).await,
            vec![(1, 3, Skipped, OVERLAP, 0, false)]
        );
        assert_eq!(server.counts(q), (0, 3), "nothing but the three fires waits");
        assert_eq!(server.job("cb").await.fire_count, 2, "cb's 2 s fire is held");
        assert_eq!(server.job("cs").await.fire_count, 1);
        assert_eq!(server.job("cr").await.fire_count, 1);
    }

    /// The running fire's last attempt expires at the instant the next occurrence falls due
    /// (one timer pass, one batch): the occurrence, held or not, goes out once the running
    /// fire is dropped.
    #[tokio::test]
    async fn a_fire_ending_as_the_next_falls_due_lets_it_go(backend) {
        let q = &format!("overlap-same-pass-{}", backend.name());
        let mut server = backend.manual().await;
        let t0 = server.now();
        let mut sub = server.subscribe(q, 10).await;
        let mut j = job(q, every_trigger(2_000, Some(ts_micros(t0 + 1_000_000))));
        j.id = "e".into();
        j.overlap_policy = pb::OverlapPolicy::BufferOne.into();
        j.misfire_grace_period = Some(ms(500));
        j.max_attempts = 1;
        j.ack_deadline = Some(ms(2_000));
        j.end_time = Some(ts_micros(t0 + 3_500_000));
        server.schedule(j).await;
        server.advance_to(t0 + 1_000_000).await;
        let first = sub.recv().await;
        server.advance_to(t0 + 3_000_000).await;
        let next = next_fire(&server, &mut sub).await;
        assert_ne!(next.fire_id, first.fire_id);
        assert_eq!(at(t0, &next), 3);
        sub.ack(&[&next.fire_id]).await;
        server.wait_in_flight(q, 0).await;
        assert_eq!(
            ledger(&mut server, "e", t0).await,
            vec![(1, 1, Dropped, NONE, 1, false), (3, 1, Delivered, NONE, 1, false)]
        );
    }

    /// REPLACE withdraws a running fire even when its ack deadline passed in the same pass
    /// (it was on its way back for another attempt): only the new fire goes out.
    #[tokio::test]
    async fn replace_withdraws_a_fire_on_its_way_back(backend) {
        let q = &format!("overlap-replace-back-{}", backend.name());
        let mut server = backend.manual().await;
        let t0 = server.now();
        let mut sub = server.subscribe(q, 10).await;
        let mut j = job(q, every_trigger(2_000, Some(ts_micros(t0 + 1_000_000))));
        j.id = "w".into();
        j.overlap_policy = pb::OverlapPolicy::Replace.into();
        j.misfire_grace_period = Some(ms(500));
        j.ack_deadline = Some(ms(2_000));
        server.schedule(j).await;
        server.advance_to(t0 + 1_000_000).await;
        let first = sub.recv().await;
        server.advance_to(t0 + 3_000_000).await;
        let next = next_fire(&server, &mut sub).await;
        assert_eq!(at(t0, &next), 3, "the 1 s fire is not sent again");
        // Well past any redelivery backoff of the 1 s fire: still only the 3 s one.
        server.advance_to(t0 + 4_900_000).await;
        assert_eq!(server.counts(q), (0, 1));
        sub.ack(&[&next.fire_id]).await;
        server.wait_in_flight(q, 0).await;
        assert_eq!(server.ack(q, &[&first.fire_id]).await, 0);
        assert_eq!(
            ledger(&mut server, "w", t0).await,
            vec![(1, 1, Replaced, NONE, 1, false), (3, 1, Delivered, NONE, 1, false)]
        );
    }

    /// SKIP → ALLOW → SKIP with fires out: the fire released under ALLOW runs, so the next
    /// trigger is skipped.
    #[tokio::test]
    async fn fires_released_under_allow_count_after_the_policy_returns(backend) {
        let q = &format!("overlap-round-trip-{}", backend.name());
        let mut server = backend.manual().await;
        let mut sub = server.subscribe(q, 10).await;
        let mut j = job(q, every_trigger(3_600_000, None));
        j.id = "p".into();
        j.overlap_policy = pb::OverlapPolicy::Skip.into();
        server.schedule(j).await;
        let set_policy = |policy: pb::OverlapPolicy| pb::UpdateJobRequest {
            job: Some(pb::Job {
                id: "p".into(),
                overlap_policy: policy.into(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["overlap_policy".into()],
            }),
        };
        server.advance(1_000).await;
        let a = trigger(&mut server, "p").await;
        assert_eq!(sub.recv().await.fire_id, a.fire_id);
        server.client.update_job(set_policy(pb::OverlapPolicy::Allow)).await.expect("update");
        server.advance(1_000).await;
        let b = trigger(&mut server, "p").await;
        assert_eq!(b.outcome(), pb::TriggerOutcome::Released);
        assert_eq!(sub.recv().await.fire_id, b.fire_id);
        server.client.update_job(set_policy(pb::OverlapPolicy::Skip)).await.expect("update");
        sub.ack(&[&a.fire_id]).await;
        server.wait_in_flight(q, 1).await;
        server.advance(1_000).await;
        let c = trigger(&mut server, "p").await;
        assert_eq!(c.outcome(), pb::TriggerOutcome::Skipped, "b's fire still runs");
    }
}
