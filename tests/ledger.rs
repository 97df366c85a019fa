//! The ledger (ListOccurrences): what became of each occurrence of a job, on both stores,
//! across acks, drops, pauses, a restart and a cancel, paged newest first.

mod common;

use common::*;
use tickd::api::pb;
use tonic::Code;

/// (first occurrence in s after t0, count, outcome, skip reason, attempts, fire id's tail).
type Row = (i64, u64, pb::OccurrenceOutcome, pb::SkipReason, u32, String);

fn rows(t0: i64, entries: &[pb::Occurrence]) -> Vec<Row> {
    entries
        .iter()
        .map(|o| {
            (
                (micros_of(&o.scheduled_time) - t0) / 1_000_000,
                o.count,
                o.outcome(),
                o.skip_reason(),
                o.attempts,
                o.fire_id.split('@').next().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

async fn page(
    server: &mut TestServer,
    job_id: &str,
    page_size: i32,
    page_token: String,
) -> Result<pb::ListOccurrencesResponse, tonic::Status> {
    server
        .client
        .list_occurrences(pb::ListOccurrencesRequest {
            job_id: job_id.into(),
            page_size,
            page_token,
        })
        .await
        .map(|r| r.into_inner())
}

both_backends! {
    /// Every occurrence of an interval job is in the ledger once with its fate: delivered,
    /// dropped after its last attempt, skipped as PAUSED when the job resumed (the misfire
    /// policy fires the latest), skipped as MISFIRE after tickd was down, and skipped as
    /// PAUSED when the paused job was cancelled. Pages run newest first; the counter moves
    /// with the ledger.
    #[tokio::test]
    async fn every_occurrence_has_its_fate(backend) {
        // A queue per store: both tests count in one process's metrics.
        let q = &format!("ledger-{}", backend.name());
        let mut server = backend.manual().await;
        let t0 = server.now();
        let mut sub = server.subscribe(q, 10).await;
        let mut j = job(q, every_trigger(1_000, Some(ts_micros(t0 + 1_000_000))));
        j.id = "tick".into();
        j.max_attempts = 2;
        j.misfire_policy = pb::MisfirePolicy::FireOnce.into();
        j.misfire_grace_period = Some(ms(500));
        server.schedule(j).await;

        // 1 s: acked.
        server.advance_to(t0 + 1_000_000).await;
        let fire = sub.recv().await;
        sub.ack(&[&fire.fire_id]).await;
        server.wait_in_flight(q, 0).await;
        // 2 s: nacked on both attempts, dropped.
        server.advance_to(t0 + 2_000_000).await;
        for attempt in 1..=2 {
            let fire = sub.recv().await;
            assert_eq!(fire.attempt, attempt);
            sub.nack(&[&fire.fire_id], None).await;
            server.settle().await;
        }
        server.wait_in_flight(q, 0).await;
        // Paused from 2.5 s to 7.5 s: on resume 7 s fires, 3..6 s are PAUSED.
        server.advance_to(t0 + 2_500_000).await;
        server.pause("tick").await.expect("pause");
        server.settle().await;
        server.advance_to(t0 + 7_500_000).await;
        server.resume("tick").await.expect("resume");
        server.settle().await;
        let fire = sub.recv().await;
        assert_eq!(micros_of(&fire.scheduled_time), t0 + 7_000_000);
        sub.ack(&[&fire.fire_id]).await;
        server.wait_in_flight(q, 0).await;
        drop(sub);

        // Down from 7.5 s to 12.5 s: 12 s fires, 8..11 s are MISFIRE.
        let mut server = server.restart().await;
        let mut sub = server.subscribe(q, 10).await;
        server.advance_to(t0 + 12_500_000).await;
        let fire = sub.recv().await;
        assert_eq!(micros_of(&fire.scheduled_time), t0 + 12_000_000);
        sub.ack(&[&fire.fire_id]).await;
        server.wait_in_flight(q, 0).await;
        // Paused at 12.5 s, cancelled at 14.5 s: 13 and 14 s were owed, PAUSED.
        server.pause("tick").await.expect("pause");
        server.settle().await;
        server.advance_to(t0 + 14_500_000).await;
        server.cancel("tick").await.expect("cancel");
        server.settle().await;

        use pb::OccurrenceOutcome::*;
        let none = pb::SkipReason::Unspecified;
        let expected: Vec<Row> = vec![
            (13, 2, Skipped, pb::SkipReason::Paused, 0, String::new()),
            (12, 1, Delivered, none, 1, "tick".into()),
            (8, 4, Skipped, pb::SkipReason::Misfire, 0, String::new()),
            (7, 1, Delivered, none, 1, "tick".into()),
            (3, 4, Skipped, pb::SkipReason::Paused, 0, String::new()),
            (2, 1, Dropped, none, 2, "tick".into()),
            (1, 1, Delivered, none, 1, "tick".into()),
        ];
        let first = page(&mut server, "tick", 3, String::new()).await.expect("page");
        assert_eq!(rows(t0, &first.occurrences), expected[..3]);
        assert!(!first.next_page_token.is_empty());
        let rest = page(&mut server, "tick", 10, first.next_page_token).await.expect("page");
        assert_eq!(rows(t0, &rest.occurrences), expected[3..]);
        assert!(rest.next_page_token.is_empty());
        // A run's last occurrence; a delivered one's fire id and ack time.
        assert_eq!(micros_of(&first.occurrences[0].last_scheduled_time), t0 + 14_000_000);
        let delivered = &first.occurrences[1];
        assert_eq!(delivered.fire_id, fire.fire_id);
        assert_eq!(micros_of(&delivered.record_time), t0 + 12_500_000);

        // The counter (this process's, over the restart) moved with every entry.
        let metrics = scrape(server.metrics_addr).await;
        let queue = format!("tickd_queue=\"{q}\"");
        let count = |outcome: &str, reason: &str| {
            sample(
                &metrics,
                "tickd_occurrences_total",
                &[&queue, &format!("tickd_outcome=\"{outcome}\""), &format!("tickd_reason=\"{reason}\"")],
            )
        };
        assert_eq!(count("skipped", "misfire"), Some(4.0));
        assert_eq!(count("skipped", "paused"), Some(6.0));
        assert_eq!(count("delivered", "none"), Some(3.0));
        assert_eq!(count("dropped", "none"), Some(1.0));
        server.stop().await;
    }
}

both_backends! {
    /// Unknown job: NOT_FOUND; no id, a negative page size or a token from elsewhere:
    /// INVALID_ARGUMENT naming the field. A job with no sealed occurrence has an empty ledger.
    #[tokio::test]
    async fn refusals_and_an_empty_ledger(backend) {
        let mut server = backend.manual().await;
        let mut j = job("q", every_trigger(1_000, None));
        j.id = "quiet".into();
        server.schedule(j).await;
        let empty = page(&mut server, "quiet", 0, String::new()).await.expect("page");
        assert!(empty.occurrences.is_empty());
        assert!(empty.next_page_token.is_empty());
        expect_code(page(&mut server, "nope", 0, String::new()).await, Code::NotFound);
        let status = expect_code(page(&mut server, "", 0, String::new()).await, Code::InvalidArgument);
        assert_bad_field(&status, "job_id");
        let status = expect_code(page(&mut server, "quiet", -1, String::new()).await, Code::InvalidArgument);
        assert_bad_field(&status, "page_size");
        let status =
            expect_code(page(&mut server, "quiet", 0, "j1.6a".into()).await, Code::InvalidArgument);
        assert_bad_field(&status, "page_token");
        server.stop().await;
    }
}

both_backends! {
    /// An update that ends a job (here: a max_fires it reached) while it owes occurrences (it
    /// was paused over two), or moves a paused job to a new trigger, puts what it owed in the
    /// ledger.
    #[tokio::test]
    async fn an_update_that_ends_a_job_records_what_it_owed(backend) {
        let mut server = backend.manual().await;
        let t0 = server.now();
        let mut sub = server.subscribe("q", 10).await;
        let mut j = job("q", every_trigger(1_000, Some(ts_micros(t0 + 1_000_000))));
        j.id = "ended".into();
        server.schedule(j.clone()).await;
        let mut moved = j.clone();
        moved.id = "moved".into();
        server.schedule(moved.clone()).await;
        server.pause("moved").await.expect("pause");
        server.settle().await;
        server.advance_to(t0 + 1_000_000).await;
        let fire = sub.recv().await;
        sub.ack(&[&fire.fire_id]).await;
        server.wait_in_flight("q", 0).await;
        server.pause("ended").await.expect("pause");
        server.settle().await;
        server.advance_to(t0 + 3_500_000).await;
        let limit = |max_fires: u64| {
            let mut job = j.clone();
            job.max_fires = max_fires;
            pb::UpdateJobRequest {
                job: Some(job),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["max_fires".into()],
                }),
            }
        };
        // A paused job given a new trigger: 1, 2 and 3 s, owed to the old one, are withdrawn.
        moved.trigger = Some(every_trigger(10_000, Some(ts_micros(t0 + 10_000_000))));
        let update = pb::UpdateJobRequest {
            job: Some(moved),
            update_mask: Some(prost_types::FieldMask { paths: vec!["trigger".into()] }),
        };
        server.client.update_job(update).await.expect("update");
        let entries = page(&mut server, "moved", 0, String::new()).await.expect("page").occurrences;
        assert_eq!(
            rows(t0, &entries),
            [(1, 3, pb::OccurrenceOutcome::Skipped, pb::SkipReason::Paused, 0, String::new())]
        );
        // Not reached (1 fire of 2): the job stays, owing 2 s (3 s is past its max_fires).
        let kept = server.client.update_job(limit(2)).await.expect("update").into_inner();
        assert_eq!(kept.state(), pb::JobState::Paused);
        // Reached: the job completes, and what it owed is in the ledger.
        let ended = server.client.update_job(limit(1)).await.expect("update").into_inner();
        assert_eq!(ended.state(), pb::JobState::Completed);
        let entries = page(&mut server, "ended", 0, String::new()).await.expect("page").occurrences;
        use pb::OccurrenceOutcome::*;
        assert_eq!(
            rows(t0, &entries),
            [
                (2, 1, Skipped, pb::SkipReason::Paused, 0, String::new()),
                (1, 1, Delivered, pb::SkipReason::Unspecified, 1, "ended".into()),
            ]
        );
        server.stop().await;
    }
}

both_backends! {
    /// A fire whose last attempt fails goes to the dead-letter queue: DEAD_LETTERED, with the
    /// attempts made; when it fails there too and is dropped, the entry stays as it was (the
    /// occurrence is counted once).
    #[tokio::test]
    async fn a_dead_lettered_occurrence_is_recorded_once(backend) {
        let q = &format!("dl-{}", backend.name());
        let dlq = &format!("dlq-{}", backend.name());
        let mut server = backend.manual().await;
        let t0 = server.now();
        let mut sub = server.subscribe(q, 10).await;
        let mut dead = server.subscribe(dlq, 10).await;
        let mut j = job(q, at_trigger(ts_micros(t0 + 1_000_000)));
        j.id = "doomed".into();
        j.max_attempts = 2;
        j.dead_letter_queue = dlq.clone();
        server.schedule(j).await;
        server.advance_to(t0 + 1_000_000).await;
        for _ in 0..2 {
            let fire = sub.recv().await;
            sub.nack(&[&fire.fire_id], None).await;
            server.settle().await;
        }
        for _ in 0..2 {
            let fire = dead.recv().await;
            dead.nack(&[&fire.fire_id], None).await;
            server.settle().await;
        }
        server.wait_in_flight(dlq, 0).await;
        let entries = page(&mut server, "doomed", 0, String::new()).await.expect("page").occurrences;
        assert_eq!(
            rows(t0, &entries),
            [(1, 1, pb::OccurrenceOutcome::DeadLettered, pb::SkipReason::Unspecified, 2, "doomed".into())]
        );
        let metrics = scrape(server.metrics_addr).await;
        let count = |queue: &str, outcome: &str| {
            sample(
                &metrics,
                "tickd_occurrences_total",
                &[&format!("tickd_queue=\"{queue}\""), &format!("tickd_outcome=\"{outcome}\"")],
            )
        };
        assert_eq!(count(q, "dead_lettered"), Some(1.0));
        assert_eq!(count(dlq, "dropped"), None);
        server.stop().await;
    }
}

both_backends! {
    /// --ledger-max-per-job keeps the newest entries (on PostgreSQL after the retention pass a
    /// settle runs); --ledger-retention hides and then deletes entries sealed too long ago.
    #[tokio::test]
    async fn the_ledger_keeps_its_bounds(backend) {
        let q = &format!("bounds-{}", backend.name());
        let mut server = backend
            .manual_with(|c| {
                c.ledger_max_per_job = 3;
                c.ledger_retention = std::time::Duration::from_secs(60);
            })
            .await;
        let t0 = server.now();
        let mut sub = server.subscribe(q, 10).await;
        let mut j = job(q, every_trigger(1_000, Some(ts_micros(t0 + 1_000_000))));
        j.id = "capped".into();
        server.schedule(j).await;
        for k in 1..=5 {
            server.advance_to(t0 + k * 1_000_000).await;
            let fire = sub.recv().await;
            sub.ack(&[&fire.fire_id]).await;
            server.wait_in_flight(q, 0).await;
        }
        server.settle().await;
        server.settle().await;
        let at = |entries: &[pb::Occurrence]| -> Vec<i64> {
            entries
                .iter()
                .map(|e| (micros_of(&e.scheduled_time) - t0) / 1_000_000)
                .collect()
        };
        let entries = page(&mut server, "capped", 10, String::new()).await.expect("page").occurrences;
        assert_eq!(at(&entries), [5, 4, 3]);
        // 61 s after the last ack: past the retention. The job is paused so that nothing new
        // is sealed; its entries are no longer listed.
        server.pause("capped").await.expect("pause");
        server.settle().await;
        server.advance_to(t0 + 66_000_000).await;
        server.settle().await;
        let entries = page(&mut server, "capped", 10, String::new()).await.expect("page").occurrences;
        assert!(entries.is_empty(), "{entries:?}");
        server.stop().await;
    }
}

const STEP: i64 = 5_000_000;
const DAY: i64 = 86_400_000_000;

fn utc_micros(rfc3339: &str) -> i64 {
    chrono::DateTime::parse_from_rfc3339(rfc3339)
        .expect("time")
        .timestamp_micros()
}

/// The next `n` occurrences of job `tick` fire on time and are acked, one by one.
async fn fire_next(server: &mut TestServer, sub: &mut Sub, q: &str, n: usize) {
    for _ in 0..n {
        let next = micros_of(&server.job("tick").await.next_fire_time);
        server.advance_to(next).await;
        took(server, sub, q, next).await;
    }
}

/// Takes the one fire released for `at`, acks it, and waits until the ack is stored.
async fn took(server: &mut TestServer, sub: &mut Sub, q: &str, at: i64) {
    let fire = sub.recv().await;
    assert_eq!(micros_of(&fire.scheduled_time), at, "{}", fire.fire_id);
    sub.ack(&[&fire.fire_id]).await;
    server.wait_in_flight(q, 0).await;
}

both_backends! {
    /// A month of a `*/5 * * * * *` job in Berlin (518,400 slots), across a clock jump while
    /// up, two outages, two pauses and the night the clocks go back (repeat FIRST: the second
    /// pass of 02:00–02:59:55 is skipped): the ledger and the pending occurrence cover every
    /// 5-second instant of the month exactly once. The instants are computed here, not by
    /// tickd: Berlin's offset is whole hours, so every UTC instant on the 5-second grid is a
    /// slot.
    #[tokio::test]
    async fn a_month_of_slots_each_accounted_for_once(backend) {
        let q = &format!("month-{}", backend.name());
        let t0 = utc_micros("2026-10-10T00:00:00Z");
        let mut server = backend
            .manual_at(t0, |c| {
                c.ledger_max_per_job = 100_000;
                c.ledger_retention = std::time::Duration::from_secs(60 * 86_400);
            })
            .await;
        let mut sub = server.subscribe(q, 10).await;
        let mut j = job(
            q,
            pb::Trigger {
                kind: Some(pb::trigger::Kind::Cron(pb::Cron {
                    expression: "*/5 * * * * *".into(),
                    time_zone: "Europe/Berlin".into(),
                    dst_policy: Some(pb::DstPolicy {
                        gap: pb::DstGapPolicy::Unspecified.into(),
                        repeat: pb::DstRepeatPolicy::First.into(),
                    }),
                    ..Default::default()
                })),
            },
        );
        j.id = "tick".into();
        j.misfire_policy = pb::MisfirePolicy::Skip.into();
        j.misfire_grace_period = Some(ms(1_000));
        server.schedule(j).await;

        fire_next(&mut server, &mut sub, q, 6).await;
        // The clock jumps two days while tickd runs: MISFIRE.
        let at = server.now() + 2 * DAY;
        server.advance_to(at).await;
        took(&mut server, &mut sub, q, at).await;
        fire_next(&mut server, &mut sub, q, 3).await;
        // Down three days: MISFIRE.
        drop(sub);
        let at = server.now() + 3 * DAY;
        let mut server = server.restart_after(3 * DAY / 1_000).await;
        let mut sub = server.subscribe(q, 10).await;
        server.settle().await;
        took(&mut server, &mut sub, q, at).await;
        fire_next(&mut server, &mut sub, q, 3).await;
        // Paused four days: PAUSED.
        server.pause("tick").await.expect("pause");
        server.settle().await;
        let at = server.now() + 4 * DAY;
        server.advance_to(at).await;
        server.resume("tick").await.expect("resume");
        server.settle().await;
        took(&mut server, &mut sub, q, at).await;
        fire_next(&mut server, &mut sub, q, 3).await;
        // Up to just before the clocks go back, then through the night: 02:59:55 CEST is
        // followed by 03:00:00 CET, an hour later; the hour between is DST_REPEAT.
        let at = utc_micros("2026-10-25T00:59:30Z");
        server.advance_to(at).await;
        took(&mut server, &mut sub, q, at).await;
        fire_next(&mut server, &mut sub, q, 6).await;
        assert_eq!(server.now(), utc_micros("2026-10-25T02:00:00Z"));
        // Down five days, then paused until the month is over.
        drop(sub);
        let at = server.now() + 5 * DAY;
        let mut server = server.restart_after(5 * DAY / 1_000).await;
        let mut sub = server.subscribe(q, 10).await;
        server.settle().await;
        took(&mut server, &mut sub, q, at).await;
        fire_next(&mut server, &mut sub, q, 2).await;
        server.pause("tick").await.expect("pause");
        server.settle().await;
        let at = t0 + 30 * DAY;
        server.advance_to(at).await;
        server.resume("tick").await.expect("resume");
        server.settle().await;
        took(&mut server, &mut sub, q, at).await;
        fire_next(&mut server, &mut sub, q, 2).await;

        // Every entry, oldest last.
        let mut entries = Vec::new();
        let mut token = String::new();
        loop {
            let p = page(&mut server, "tick", 1_000, token).await.expect("page");
            entries.extend(p.occurrences);
            if p.next_page_token.is_empty() {
                break;
            }
            token = p.next_page_token;
        }
        let pending = micros_of(&server.job("tick").await.next_fire_time);
        let first = t0 + STEP;
        let slots = ((pending - first) / STEP) as usize;
        assert!(slots > 30 * 86_400 / 5, "a month: {slots} slots");
        // Each entry covers first..=last on the grid; its count is exact, or a lower bound
        // (10,000: the cron walk's cap) when it says so.
        let mut seen = vec![0u8; slots];
        for e in &entries {
            let (from, to) = (micros_of(&e.scheduled_time), micros_of(&e.last_scheduled_time));
            assert_eq!((from - first) % STEP, 0, "on the grid: {e:?}");
            let len = ((to - from) / STEP + 1) as u64;
            if e.count_at_least {
                assert!(e.count == 10_000 && len > e.count, "{e:?}");
            } else {
                assert_eq!(len, e.count, "a run is contiguous: {e:?}");
            }
            for k in 0..len as i64 {
                let i = ((from - first) / STEP + k) as usize;
                assert!(i < slots, "before the pending occurrence: {e:?}");
                seen[i] += 1;
            }
        }
        let missing = seen.iter().filter(|n| **n == 0).count();
        let twice = seen.iter().filter(|n| **n > 1).count();
        assert_eq!((missing, twice), (0, 0), "every slot once");

        use pb::SkipReason::*;
        let total = |reason: pb::SkipReason| -> u64 {
            entries
                .iter()
                .filter(|e| e.skip_reason() == reason)
                .map(|e| {
                    (micros_of(&e.last_scheduled_time) - micros_of(&e.scheduled_time)) / STEP + 1
                })
                .sum::<i64>() as u64
        };
        let delivered = entries
            .iter()
            .filter(|e| e.outcome() == pb::OccurrenceOutcome::Delivered)
            .count();
        assert_eq!(delivered, 6 + 1 + 3 + 1 + 3 + 1 + 3 + 1 + 6 + 1 + 2 + 1 + 2);
        assert_eq!(total(DstRepeat), 720);
        let dst = entries
            .iter()
            .find(|e| e.skip_reason() == DstRepeat)
            .expect("the repeated hour");
        assert_eq!(micros_of(&dst.scheduled_time), utc_micros("2026-10-25T01:00:00Z"));
        assert!(total(Misfire) > 5 * 86_400 / 5 && total(Paused) > 4 * 86_400 / 5);
        assert!(entries.iter().any(|e| e.count_at_least), "days of a cron run: at least 10,000");
        assert_eq!(
            total(Misfire) + total(Paused) + total(DstRepeat) + delivered as u64,
            slots as u64
        );
        server.stop().await;
    }
}
