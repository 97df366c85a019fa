//! Delivery through the real server: competing consumers, acks, nacks, redelivery after a
//! dropped stream or an expired deadline, dead-lettering, max_in_flight, and fires waiting for
//! a subscriber.

mod common;

use std::collections::{HashMap, HashSet};

use common::*;
use tonic::Code;

/// Schedules `n` jobs on `queue` that are due at once, and settles so their fires are on the
/// queue.
async fn due_now(server: &mut TestServer, queue: &str, n: usize) -> Vec<String> {
    let mut ids = Vec::new();
    for _ in 0..n {
        ids.push(server.schedule(job(queue, after_trigger(0))).await.id);
    }
    server.settle().await;
    ids
}

both_backends! {
    /// Two subscribers share a queue: every fire goes to exactly one of them, both get work, and
    /// no acked fire is delivered again.
    #[tokio::test]
    async fn competing_consumers_share_a_queue(backend) {
        let mut server = backend.manual().await;
        let mut a = server.subscribe("work", 4).await;
        let mut b = server.subscribe("work", 4).await;
        let jobs = due_now(&mut server, "work", 20).await;

        let mut by_sub: HashMap<&str, usize> = HashMap::new();
        let mut seen = HashSet::new();
        while seen.len() < jobs.len() {
            let (name, fire) = tokio::select! {
                f = a.recv() => ("a", f),
                f = b.recv() => ("b", f),
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
        server.wait_in_flight("work", 0).await;
        assert_eq!(server.counts("work"), (0, 0), "nothing left to deliver");
        server.stop().await;
    }
}

both_backends! {
    /// A nack without a delay redelivers at once with attempt + 1 and the same fire_id; a nack
    /// with a delay waits exactly that long.
    #[tokio::test]
    async fn nack_redelivers_with_next_attempt(backend) {
        let mut server = backend.manual().await;
        let mut sub = server.subscribe("q", 10).await;
        due_now(&mut server, "q", 1).await;
        let first = sub.recv().await;
        sub.nack(&[&first.fire_id], None).await;
        let second = sub.recv().await;
        assert_eq!(second.fire_id, first.fire_id);
        assert_eq!(second.attempt, 2);
        assert_eq!(
            second.fire_time, first.fire_time,
            "fire_time is kept on redelivery"
        );

        sub.nack(&[&second.fire_id], Some(400)).await;
        server.wait_in_flight("q", 0).await;
        server.advance(399).await;
        assert_eq!(server.counts("q"), (1, 0), "held for the delay");
        server.advance(1).await;
        let third = sub.recv().await;
        assert_eq!(third.attempt, 3);
        sub.ack(&[&third.fire_id]).await;
        server.wait_in_flight("q", 0).await;
        assert_eq!(server.counts("q"), (0, 0));
        server.stop().await;
    }
}

both_backends! {
    /// A fire in flight on a stream that drops stays leased until its ack deadline (the worker may
    /// still be working on it): no other subscriber gets it before; then it goes to another with
    /// attempt + 1, after the first expiry backoff (1 s).
    #[tokio::test]
    async fn a_dropped_stream_keeps_its_leases_until_the_deadline(backend) {
        let mut server = backend.manual().await;
        let mut first = server.subscribe("q", 10).await;
        due_now(&mut server, "q", 1).await;
        let fire = first.recv().await;
        let mut second = server.subscribe("q", 10).await;
        drop(first);
        server
            .wait_until("the server saw the stream go", |s| {
                s.queue("q").subscribers == 1
            })
            .await;
        server.advance(29_999).await;
        assert_eq!(
            server.counts("q"),
            (0, 1),
            "still leased to the dropped stream's worker"
        );
        server.advance(1).await;
        assert_eq!(
            server.counts("q"),
            (1, 0),
            "expired, waiting out the backoff"
        );
        server.advance(1_000).await;
        let again = second.recv().await;
        assert_eq!(again.fire_id, fire.fire_id);
        assert_eq!(again.attempt, 2);
        server.stop().await;
    }
}

both_backends! {
    /// The worker of a dropped stream can still ack its fire, with Ack or on a new stream, and
    /// then it is never delivered again.
    #[tokio::test]
    async fn a_fire_leased_to_a_dropped_stream_can_still_be_acked(backend) {
        let mut server = backend.manual().await;
        let mut first = server.subscribe("q", 10).await;
        due_now(&mut server, "q", 2).await;
        let a = first.recv().await;
        let b = first.recv().await;
        drop(first);
        server
            .wait_until("the server saw the stream go", |s| {
                s.queue("q").subscribers == 0
            })
            .await;
        server.settle().await;
        assert_eq!(server.counts("q"), (0, 2), "both still leased");
        assert_eq!(server.ack("q", &[&a.fire_id]).await, 1);
        let reconnected = server.subscribe("q", 10).await;
        reconnected.ack(&[&b.fire_id]).await;
        server.wait_in_flight("q", 0).await;
        server.advance(3_600_000).await;
        assert_eq!(server.counts("q"), (0, 0), "nothing left to deliver");
        server.stop().await;
    }
}

/// Leases are measured on a steady clock: a wall-clock step forward by an hour (NTP) expires
/// none of them, and one back stretches none of them.
/// Embedded only: across replicas leases follow the database's clock, which a test on a
/// manual clock stands in for with that clock's wall time.
#[tokio::test]
async fn a_wall_clock_step_moves_no_lease() {
    let mut server = TestServer::manual().await;
    let mut sub = server.subscribe("q", 10).await;
    due_now(&mut server, "q", 1).await;
    let fire = sub.recv().await;
    server.manual_clock().step_wall(3_600_000_000);
    server.settle().await;
    assert_eq!(server.counts("q"), (0, 1), "a step forward expired a lease");
    server.manual_clock().step_wall(-7_200_000_000);
    server.advance(30_000).await;
    assert_eq!(server.counts("q"), (1, 0), "a step back stretched a lease");
    server.advance(1_000).await;
    let again = sub.recv().await;
    assert_eq!((&*again.fire_id, again.attempt), (&*fire.fire_id, 2));
    server.stop().await;
}

both_backends! {
    /// A fire in flight is not handed to anyone else while its ack deadline holds (the lease); once
    /// it passes, the fire comes back after a backoff of exactly one second, with attempt 2.
    #[tokio::test]
    async fn expired_deadline_redelivers_after_backoff(backend) {
        let mut server = backend.manual().await;
        let mut holder = server.subscribe("q", 10).await;
        let mut j = job("q", after_trigger(0));
        j.ack_deadline = Some(ms(200));
        server.schedule(j).await;
        server.settle().await;
        let fire = holder.recv().await;
        let mut other = server.subscribe("q", 10).await;
        assert_eq!(
            micros_of(&fire.ack_deadline_time),
            server.now() + 200_000,
            "the deadline starts when the fire is handed out"
        );
        server.advance(199).await;
        assert_eq!(server.counts("q"), (0, 1), "leased until the deadline");
        server.advance(1).await;
        server.advance(999).await;
        assert_eq!(server.counts("q"), (1, 0), "waiting out the backoff");
        server.advance(1).await;
        let again = tokio::select! {
            f = holder.recv() => f,
            f = other.recv() => f,
        };
        assert_eq!(again.fire_id, fire.fire_id);
        assert_eq!(again.attempt, 2);
        server.stop().await;
    }
}

both_backends! {
    /// Extend on the stream moves the deadline: the fire stays leased past its first deadline and
    /// expires at the extended one.
    #[tokio::test]
    async fn extend_moves_the_ack_deadline(backend) {
        let mut server = backend.manual().await;
        let mut sub = server.subscribe("q", 10).await;
        for _ in 0..2 {
            let mut j = job("q", after_trigger(0));
            j.ack_deadline = Some(ms(1_000));
            server.schedule(j).await;
        }
        server.settle().await;
        let (held, other) = (sub.recv().await, sub.recv().await);
        server.advance(500).await;
        sub.extend(&[&held.fire_id], 5_000).await;
        // The stream is read in order: once the later ack is taken, so is the extension.
        sub.ack(&[&other.fire_id]).await;
        server.wait_in_flight("q", 1).await;
        server.advance(4_999).await;
        assert_eq!(
            server.counts("q"),
            (0, 1),
            "still leased: extended to 5.5 s"
        );
        server.advance(1).await;
        assert_eq!(
            server.counts("q"),
            (1, 0),
            "expired at the extended deadline"
        );
        server.stop().await;
    }
}

both_backends! {
    /// Nack and extend act only on fires in flight on the same stream: sent from another stream
    /// of the queue, they change nothing (no redelivery is counted, the deadline holds).
    #[tokio::test]
    async fn nack_and_extend_from_another_stream_are_ignored(backend) {
        // A queue name of its own: the metrics registry is shared by the servers of this process.
        let q = &format!("strangers-{backend:?}");
        let mut server = backend.manual().await;
        let mut holder = server.subscribe(q, 1).await;
        let mut stranger = server.subscribe(q, 1).await;
        for _ in 0..2 {
            let mut j = job(q, after_trigger(0));
            j.ack_deadline = Some(ms(1_000));
            server.schedule(j).await;
        }
        server.settle().await;
        let held = holder.recv().await;
        let own = stranger.recv().await;
        stranger.extend(&[&held.fire_id], 3_600_000).await;
        stranger.nack(&[&held.fire_id], None).await;
        // The stream is read in order: once the stranger's own ack is taken, so are the others.
        stranger.ack(&[&own.fire_id]).await;
        server.wait_in_flight(q, 1).await;
        let metrics = scrape(server.metrics_addr).await;
        let label = format!("tickd_queue=\"{q}\"");
        assert_eq!(
            sample(&metrics, "tickd_redeliveries_total", &[&label]),
            None,
            "the nack was ignored"
        );
        server.advance(1_000).await;
        assert_eq!(server.counts(q), (1, 0), "the extend was ignored");
        server.stop().await;
    }
}

both_backends! {
    /// After max_attempts a fire moves to the dead-letter queue, keeping its fire_id, job_id and
    /// payload and starting again at attempt 1.
    #[tokio::test]
    async fn exhausted_fire_is_dead_lettered(backend) {
        let mut server = backend.manual().await;
        let mut sub = server.subscribe("q", 10).await;
        let mut dead = server.subscribe("q.dead", 10).await;
        let mut j = job("q", after_trigger(0));
        j.max_attempts = 2;
        j.dead_letter_queue = "q.dead".into();
        j.payload = b"hello".to_vec().into();
        let job = server.schedule(j).await;
        server.settle().await;
        let f1 = sub.recv().await;
        sub.nack(&[&f1.fire_id], None).await;
        let f2 = sub.recv().await;
        assert_eq!(f2.attempt, 2);
        sub.nack(&[&f2.fire_id], None).await;
        let d = dead.recv().await;
        assert_eq!(d.fire_id, f1.fire_id);
        assert_eq!(d.job_id, job.id);
        assert_eq!(d.queue, "q.dead");
        assert_eq!(d.attempt, 1);
        assert!(d.dead_lettered);
        assert_eq!(&d.payload[..], b"hello");
        dead.ack(&[&d.fire_id]).await;
        server.wait_in_flight("q.dead", 0).await;
        assert_eq!(server.counts("q"), (0, 0));
        assert_eq!(server.counts("q.dead"), (0, 0));
        server.stop().await;
    }
}

both_backends! {
    /// Without a dead-letter queue an exhausted fire is dropped (and not delivered again).
    #[tokio::test]
    async fn exhausted_fire_without_dead_letter_queue_is_dropped(backend) {
        let mut server = backend.manual().await;
        let mut sub = server.subscribe("q", 10).await;
        let mut j = job("q", after_trigger(0));
        j.max_attempts = 1;
        server.schedule(j).await;
        server.settle().await;
        let f = sub.recv().await;
        sub.nack(&[&f.fire_id], None).await;
        server.wait_in_flight("q", 0).await;
        assert_eq!(server.counts("q"), (0, 0), "dropped, not waiting");
        assert_eq!(server.core.dropped_fires(), 1);
        server.stop().await;
    }
}

both_backends! {
    /// A subscriber never holds more than max_in_flight un-acked fires; an ack makes room.
    #[tokio::test]
    async fn max_in_flight_is_respected(backend) {
        let mut server = backend.manual().await;
        let mut sub = server.subscribe("q", 2).await;
        due_now(&mut server, "q", 5).await;
        let a = sub.recv().await;
        let _b = sub.recv().await;
        assert_eq!(server.counts("q"), (3, 2));
        sub.ack(&[&a.fire_id]).await;
        let c = sub.recv().await;
        assert_ne!(c.fire_id, a.fire_id);
        server.wait_in_flight("q", 2).await;
        assert_eq!(server.counts("q"), (2, 2));
        server.stop().await;
    }
}

both_backends! {
    /// Without max_in_flight a subscriber holds the default, 64.
    #[tokio::test]
    async fn default_max_in_flight_is_64(backend) {
        let mut server = backend.manual().await;
        let mut sub = server.subscribe("q", 0).await;
        due_now(&mut server, "q", 70).await;
        for _ in 0..64 {
            sub.recv().await;
        }
        server.wait_in_flight("q", 64).await;
        assert_eq!(server.counts("q"), (6, 64));
        server.stop().await;
    }
}

both_backends! {
    /// A stuck worker (its stream is never read) holds at most its max_in_flight fires; a healthy
    /// worker on the same queue gets all the others.
    #[tokio::test]
    async fn a_stuck_subscriber_does_not_stall_a_healthy_one(backend) {
        let mut server = backend.manual().await;
        let _stuck = server.subscribe("q", 2).await;
        due_now(&mut server, "q", 10).await;
        server
            .wait_until("the stuck worker holds 2", |s| s.queue("q").in_flight == 2)
            .await;
        let mut healthy = server.subscribe("q", 100).await;
        let mut got = HashSet::new();
        for _ in 0..8 {
            let f = healthy.recv().await;
            healthy.ack(&[&f.fire_id]).await;
            got.insert(f.fire_id);
        }
        assert_eq!(got.len(), 8);
        server.wait_in_flight("q", 2).await;
        assert_eq!(
            server.counts("q"),
            (0, 2),
            "only the stuck worker's two are left"
        );
        server.stop().await;
    }
}

both_backends! {
    /// Fires of a queue with no subscriber wait, stored, until one subscribes.
    #[tokio::test]
    async fn fires_wait_for_a_subscriber(backend) {
        let mut server = backend.manual().await;
        let job = due_now(&mut server, "later", 1).await;
        server.advance(3_600_000).await;
        assert_eq!(server.counts("later"), (1, 0));
        let mut sub = server.subscribe("later", 10).await;
        let f = sub.recv().await;
        assert_eq!((f.job_id.as_str(), f.attempt), (job[0].as_str(), 1));
        server.stop().await;
    }
}

both_backends! {
    /// The unary Ack acks a fire received on a stream: it is not delivered again, even after the
    /// stream drops. Unknown ids are not an error.
    #[tokio::test]
    async fn unary_ack_is_final(backend) {
        let mut server = backend.manual().await;
        let mut sub = server.subscribe("q", 10).await;
        due_now(&mut server, "q", 1).await;
        let f = sub.recv().await;
        let acked = server
            .ack("q", &[&f.fire_id, "unknown@1970-01-01T00:00:00Z"])
            .await;
        assert_eq!(acked, 1);
        drop(sub);
        server.settle().await;
        assert_eq!(server.counts("q"), (0, 0), "not waiting for redelivery");
        assert_eq!(
            server.ack("q", &[&f.fire_id]).await,
            0,
            "acking twice is not an error"
        );
        server.stop().await;
    }
}

both_backends! {
    /// Shutdown ends open streams with UNAVAILABLE so workers reconnect elsewhere.
    #[tokio::test]
    async fn shutdown_ends_streams_with_unavailable(backend) {
        let mut server = backend.start().await;
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
}
