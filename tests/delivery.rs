//! Delivery through the real server: competing consumers, acks, nacks, redelivery after a
//! dropped stream or an expired deadline, dead-lettering, max_in_flight, and fires waiting for
//! a subscriber.

mod common;

use std::collections::{HashMap, HashSet};

use common::*;
use tickd::api::pb;
use tonic::Code;

/// Schedules `n` jobs on `queue` that are due at once.
async fn due_now(client: &mut Client, queue: &str, n: usize) -> Vec<String> {
    let mut ids = Vec::new();
    for _ in 0..n {
        ids.push(schedule(client, job(queue, at_trigger(ts_in(-1)))).await.id);
    }
    ids
}

/// Two subscribers share a queue: every fire goes to exactly one of them, both get work, and
/// no acked fire is delivered again.
#[tokio::test]
async fn competing_consumers_share_a_queue() {
    let mut server = TestServer::start().await;
    let mut a = Sub::open(&mut server.client, "work", 4).await;
    let mut b = Sub::open(&mut server.client, "work", 4).await;
    let jobs = due_now(&mut server.client, "work", 20).await;

    let mut by_sub: HashMap<&str, usize> = HashMap::new();
    let mut seen = HashSet::new();
    while seen.len() < jobs.len() {
        let (name, fire) = tokio::select! {
            f = a.next(2_000) => ("a", f),
            f = b.next(2_000) => ("b", f),
        };
        assert!(
            seen.insert(fire.fire_id.clone()),
            "delivered twice: {}",
            fire.fire_id
        );
        assert_eq!(fire.attempt, 1);
        *by_sub.entry(name).or_default() += 1;
        let sub = if name == "a" { &a } else { &b };
        sub.ack(&[&fire.fire_id]).await;
    }
    assert!(by_sub.get("a").copied().unwrap_or(0) > 0, "{by_sub:?}");
    assert!(by_sub.get("b").copied().unwrap_or(0) > 0, "{by_sub:?}");
    a.expect_none(300).await;
    b.expect_none(10).await;
    server.stop().await;
}

/// A nack without a delay redelivers at once with attempt + 1 and the same fire_id; a nack
/// with a delay waits that long.
#[tokio::test]
async fn nack_redelivers_with_next_attempt() {
    let mut server = TestServer::start().await;
    let mut sub = Sub::open(&mut server.client, "q", 10).await;
    due_now(&mut server.client, "q", 1).await;
    let first = sub.next(1_000).await;
    sub.nack(&[&first.fire_id], None).await;
    let second = sub.next(1_000).await;
    assert_eq!(second.fire_id, first.fire_id);
    assert_eq!(second.attempt, 2);
    assert_eq!(
        second.fire_time, first.fire_time,
        "fire_time is kept on redelivery"
    );

    let nacked_at = now_micros();
    sub.nack(&[&second.fire_id], Some(400)).await;
    let third = sub.next(2_000).await;
    assert!(
        now_micros() - nacked_at >= 400_000,
        "redelivered before the delay"
    );
    assert_eq!(third.attempt, 3);
    sub.ack(&[&third.fire_id]).await;
    sub.expect_none(300).await;
    server.stop().await;
}

/// A fire in flight on a stream that drops goes to another subscriber with attempt + 1.
#[tokio::test]
async fn dropped_stream_redelivers_to_another_subscriber() {
    let mut server = TestServer::start().await;
    let mut first = Sub::open(&mut server.client, "q", 10).await;
    due_now(&mut server.client, "q", 1).await;
    let fire = first.next(1_000).await;
    let mut second = Sub::open(&mut server.client, "q", 10).await;
    drop(first);
    let again = second.next(2_000).await;
    assert_eq!(again.fire_id, fire.fire_id);
    assert_eq!(again.attempt, 2);
    server.stop().await;
}

/// A fire not acked before its deadline is redelivered after a backoff of about a second.
#[tokio::test]
async fn expired_deadline_redelivers_after_backoff() {
    let mut server = TestServer::start().await;
    let mut sub = Sub::open(&mut server.client, "q", 10).await;
    let mut j = job("q", at_trigger(ts_in(-1)));
    j.ack_deadline = Some(ms(200));
    schedule(&mut server.client, j).await;
    let fire = sub.next(1_000).await;
    let deadline = micros_of(&fire.ack_deadline_time);
    let again = sub.next(3_000).await;
    assert_eq!(again.fire_id, fire.fire_id);
    assert_eq!(again.attempt, 2);
    assert!(
        now_micros() >= deadline + 1_000_000,
        "redelivered before deadline + 1 s backoff"
    );
    server.stop().await;
}

/// After max_attempts a fire moves to the dead-letter queue, keeping its fire_id, job_id and
/// payload and starting again at attempt 1.
#[tokio::test]
async fn exhausted_fire_is_dead_lettered() {
    let mut server = TestServer::start().await;
    let mut sub = Sub::open(&mut server.client, "q", 10).await;
    let mut dead = Sub::open(&mut server.client, "q.dead", 10).await;
    let mut j = job("q", at_trigger(ts_in(-1)));
    j.max_attempts = 2;
    j.dead_letter_queue = "q.dead".into();
    j.payload = b"hello".to_vec().into();
    let job = schedule(&mut server.client, j).await;
    let f1 = sub.next(1_000).await;
    sub.nack(&[&f1.fire_id], None).await;
    let f2 = sub.next(1_000).await;
    assert_eq!(f2.attempt, 2);
    sub.nack(&[&f2.fire_id], None).await;
    let d = dead.next(1_000).await;
    assert_eq!(d.fire_id, f1.fire_id);
    assert_eq!(d.job_id, job.id);
    assert_eq!(d.queue, "q.dead");
    assert_eq!(d.attempt, 1);
    assert!(d.dead_lettered);
    assert_eq!(&d.payload[..], b"hello");
    dead.ack(&[&d.fire_id]).await;
    sub.expect_none(200).await;
    server.stop().await;
}

/// Without a dead-letter queue an exhausted fire is dropped (and not delivered again).
#[tokio::test]
async fn exhausted_fire_without_dead_letter_queue_is_dropped() {
    let mut server = TestServer::start().await;
    let mut sub = Sub::open(&mut server.client, "q", 10).await;
    let mut j = job("q", at_trigger(ts_in(-1)));
    j.max_attempts = 1;
    schedule(&mut server.client, j).await;
    let f = sub.next(1_000).await;
    sub.nack(&[&f.fire_id], None).await;
    sub.expect_none(400).await;
    server.stop().await;
}

/// A subscriber never holds more than max_in_flight un-acked fires; an ack makes room.
#[tokio::test]
async fn max_in_flight_is_respected() {
    let mut server = TestServer::start().await;
    let mut sub = Sub::open(&mut server.client, "q", 2).await;
    due_now(&mut server.client, "q", 5).await;
    let a = sub.next(1_000).await;
    let _b = sub.next(1_000).await;
    sub.expect_none(300).await;
    sub.ack(&[&a.fire_id]).await;
    let c = sub.next(1_000).await;
    assert_ne!(c.fire_id, a.fire_id);
    sub.expect_none(200).await;
    server.stop().await;
}

/// Fires of a queue with no subscriber wait until one subscribes.
#[tokio::test]
async fn fires_wait_for_a_subscriber() {
    let mut server = TestServer::start().await;
    let job = due_now(&mut server.client, "later", 1).await;
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let mut sub = Sub::open(&mut server.client, "later", 10).await;
    let f = sub.next(1_000).await;
    assert_eq!(f.job_id, job[0]);
    server.stop().await;
}

/// The unary Ack acks a fire received on a stream: it is not delivered again, even after the
/// stream drops. Unknown ids are not an error.
#[tokio::test]
async fn unary_ack_is_final() {
    let mut server = TestServer::start().await;
    let mut sub = Sub::open(&mut server.client, "q", 10).await;
    due_now(&mut server.client, "q", 1).await;
    let f = sub.next(1_000).await;
    let resp = server
        .client
        .ack(pb::AckRequest {
            queue: "q".into(),
            fire_ids: vec![f.fire_id.clone(), "unknown@1970-01-01T00:00:00Z".into()],
        })
        .await
        .expect("ack")
        .into_inner();
    assert_eq!(resp.acked_count, 1);
    drop(sub);
    let mut other = Sub::open(&mut server.client, "q", 10).await;
    other.expect_none(400).await;
    let again = server
        .client
        .ack(pb::AckRequest {
            queue: "q".into(),
            fire_ids: vec![f.fire_id.clone()],
        })
        .await
        .expect("acking twice is not an error")
        .into_inner();
    assert_eq!(again.acked_count, 0);
    server.stop().await;
}

/// Shutdown ends open streams with UNAVAILABLE so workers reconnect elsewhere.
#[tokio::test]
async fn shutdown_ends_streams_with_unavailable() {
    let mut server = TestServer::start().await;
    let mut sub = Sub::open(&mut server.client, "q", 10).await;
    let started = std::time::Instant::now();
    server.stop().await;
    assert!(
        started.elapsed() < std::time::Duration::from_secs(3),
        "shutdown waited for the open stream: {:?}",
        started.elapsed()
    );
    let end = sub.end(2_000).await;
    match end {
        Err(status) => assert_eq!(status.code(), Code::Unavailable, "{status:?}"),
        other => panic!("expected UNAVAILABLE, got {other:?}"),
    }
}
