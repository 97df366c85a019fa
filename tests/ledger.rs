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
