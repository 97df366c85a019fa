//! Limits that keep one client or one queue from growing tickd without bound: the per-queue
//! backlog.

mod common;

use common::*;
use tickd::api::pb;

/// A queue at --max-queue-backlog takes no new fire: its jobs' further occurrences are skipped
/// (counted by reason, the job keeps its schedule), Schedule keeps working, other queues keep
/// firing, and once a fire is acked the next occurrence fires again.
#[tokio::test]
async fn a_full_queue_skips_occurrences_and_counts_them() {
    let mut server = TestServer::manual_with(|c| c.max_queue_backlog = 3).await;
    let mut j = job("full", every_trigger(1_000, None));
    j.id = "ticker".into();
    server.schedule(j).await;
    let mut other = job("elsewhere", every_trigger(1_000, None));
    other.id = "other".into();
    server.schedule(other).await;
    for _ in 0..5 {
        server.advance(1_000).await;
    }
    assert_eq!(server.counts("full"), (3, 0), "the queue holds its limit");
    assert_eq!(server.counts("elsewhere"), (3, 0));
    let ticker = server.job("ticker").await;
    assert_eq!(ticker.state(), pb::JobState::Scheduled);
    assert_eq!(ticker.fire_count, 3, "skipped occurrences are not fires");
    assert_eq!(
        micros_of(&ticker.next_fire_time),
        MANUAL_START_MICROS + 6_000_000,
        "the job keeps its schedule"
    );
    let text = scrape(server.metrics_addr).await;
    let skipped = |queue: &str| {
        sample(
            &text,
            "tickd_occurrences_skipped_total",
            &[
                &format!("tickd_queue=\"{queue}\""),
                "tickd_skip_reason=\"backlog_full\"",
            ],
        )
    };
    assert_eq!(skipped("full"), Some(2.0), "{text}");

    // Schedule still works on a full queue.
    let mut late = job("full", after_trigger(60_000));
    late.id = "late".into();
    server.schedule(late).await;

    // Room again after an ack: the next occurrence fires.
    let mut sub = server.subscribe("full", 1).await;
    let fire = sub.recv().await;
    sub.ack(&[&fire.fire_id]).await;
    server
        .wait_until("the ack applied", |s| s.counts("full") == (1, 1))
        .await;
    server.advance(1_000).await;
    assert_eq!(server.job("ticker").await.fire_count, 4);
    server.stop().await;
}

/// At --max-subscribers open streams a new Subscribe is refused with RESOURCE_EXHAUSTED naming
/// the limit; once one ends, there is room again.
#[tokio::test]
async fn subscribers_are_bounded() {
    let mut server = TestServer::manual_with(|c| c.max_subscribers = 2).await;
    let first = server.subscribe("a", 1).await;
    let _second = server.subscribe("b", 1).await;
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(pb::SubscribeRequest {
        request: Some(pb::subscribe_request::Request::Open(pb::SubscribeOpen {
            queue: "c".into(),
            max_in_flight: 1,
        })),
    })
    .await
    .expect("send open");
    let refused = server
        .client
        .subscribe(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect_err("a third stream is refused");
    assert_eq!(
        refused.code(),
        tonic::Code::ResourceExhausted,
        "{refused:?}"
    );
    assert!(
        refused.message().contains("--max-subscribers"),
        "{refused:?}"
    );
    drop(first);
    server
        .wait_until("the first stream ended", |s| s.queue("a").subscribers == 0)
        .await;
    let _third = server.subscribe("c", 1).await;
    server.stop().await;
}

/// A Subscribe that never sends its open ends with INVALID_ARGUMENT after
/// --subscribe-open-timeout, and frees its admission slot.
#[tokio::test]
async fn a_subscribe_without_open_times_out_and_frees_its_slot() {
    let mut server = TestServer::start_with(|c| {
        c.subscribe_open_timeout = std::time::Duration::from_millis(200);
        c.max_concurrent_requests = 1;
    })
    .await;
    let (_hold, rx) = tokio::sync::mpsc::channel::<pb::SubscribeRequest>(1);
    let started = std::time::Instant::now();
    let ended = server
        .client
        .subscribe(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect_err("no open");
    assert_eq!(ended.code(), tonic::Code::InvalidArgument, "{ended:?}");
    assert!(ended.message().contains("within 200ms"), "{ended:?}");
    assert!(started.elapsed() >= std::time::Duration::from_millis(200));
    // The only slot is free again.
    expect_code(server.get("nothing").await, tonic::Code::NotFound);
    server.stop().await;
}

/// An open Subscribe stream does not hold an admission slot: with one slot, calls still go
/// through while the stream stays open.
#[tokio::test]
async fn an_open_stream_holds_no_admission_slot() {
    let mut server = TestServer::manual_with(|c| c.max_concurrent_requests = 1).await;
    let _open = server.subscribe("a", 1).await;
    for _ in 0..3 {
        expect_code(server.get("nothing").await, tonic::Code::NotFound);
    }
    server.stop().await;
}
