//! Restart durability: jobs and un-acked fires survive a graceful restart and a kill -9 with
//! their exact state, acked fires stay acked, attempts are kept, and occurrences missed while
//! the server was down follow the misfire policy, exactly (on a manual clock).

mod common;

use std::time::Duration;

use common::*;
use tickd::api::pb;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

both_backends! {
    /// Jobs and un-acked fires come back after a graceful restart on the same store; once acked
    /// a fire is gone. On the embedded store the fire that was in flight comes back at once
    /// without an attempt counted (the README's promise for a shutdown); across replicas its
    /// lease holds (the worker may still be on it, and ack it elsewhere), so it comes back when
    /// its deadline passes, as attempt 2.
    #[tokio::test]
    async fn graceful_restart_keeps_jobs_and_unacked_fires(backend) {
        let mut server = backend.manual().await;
        let mut sub = server.subscribe("q", 10).await;
        let pending = server.schedule(job("q", after_trigger(3_600_000))).await;
        let fired = server.schedule(job("q", after_trigger(0))).await;
        server.settle().await;
        let fire = sub.recv().await;
        assert_eq!((fire.job_id.as_str(), fire.attempt), (fired.id.as_str(), 1));

        let mut server = server.restart().await;
        let got = server.job(&pending.id).await;
        assert_eq!(got.state(), pb::JobState::Scheduled);
        assert_eq!(got.next_fire_time, pending.next_fire_time);
        assert_eq!(server.job(&fired.id).await.state(), pb::JobState::Completed);
        let mut sub = server.subscribe("q", 10).await;
        let attempt = match backend {
            Backend::Embedded => 1,
            Backend::Postgres => {
                server.settle().await;
                assert_eq!(server.counts("q"), (0, 1), "still leased");
                // The 30 s ack deadline, then the 1 s backoff.
                server.advance(31_000).await;
                2
            }
        };
        let again = sub.recv().await;
        assert_eq!(
            (&*again.fire_id, again.attempt),
            (&*fire.fire_id, attempt),
            "the un-acked fire is delivered again"
        );
        sub.ack(&[&again.fire_id]).await;
        server.wait_in_flight("q", 0).await;
        assert_eq!(server.queue("q").backlog, 0);

        let server = server.restart().await;
        assert_eq!(
            (server.queue("q").backlog, server.queue("q").in_flight),
            (0, 0),
            "an acked fire does not come back after a restart"
        );
        server.stop().await;
    }
}

/// After kill -9, everything that was answered OK is there exactly as it was: a pending job
/// with its next fire time, a cancelled, a paused and a resumed job in their states, a fire
/// acked by the unary Ack and one acked on the stream stay acked, and the fire that was in
/// flight on its second attempt is delivered again with attempt 2 and the same fire_id.
#[tokio::test]
async fn kill_dash_nine_keeps_every_acknowledged_change() {
    let mut tickd = TickdProcess::start();
    let mut client = tickd.client().await;
    let mut sub = Sub::open(&mut client, "q", 10).await;
    let named = |id: &str, trigger| {
        let mut j = job("q", trigger);
        j.id = id.into();
        j
    };
    let pending = schedule(&mut client, named("pending", after_trigger(3_600_000))).await;
    schedule(&mut client, named("cancelled", after_trigger(3_600_000))).await;
    schedule(&mut client, named("paused", every_trigger(3_600_000, None))).await;
    schedule(
        &mut client,
        named("resumed", every_trigger(3_600_000, None)),
    )
    .await;
    client
        .cancel_job(pb::CancelJobRequest {
            id: "cancelled".into(),
        })
        .await
        .expect("cancel");
    for id in ["paused", "resumed"] {
        client
            .pause_job(pb::PauseJobRequest { id: id.into() })
            .await
            .expect("pause");
    }
    client
        .resume_job(pb::ResumeJobRequest {
            id: "resumed".into(),
        })
        .await
        .expect("resume");

    // One fire acked by the unary Ack.
    schedule(&mut client, named("unary-acked", after_trigger(0))).await;
    let f = sub.recv().await;
    assert_eq!(f.job_id, "unary-acked");
    let acked = client
        .ack(pb::AckRequest {
            queue: "q".into(),
            fire_ids: vec![f.fire_id.clone()],
        })
        .await
        .expect("ack")
        .into_inner();
    assert_eq!(acked.acked_count, 1);

    // One acked on the stream. Nothing else is happening, so the next commit after the ack is
    // the ack's own (a stream ack gets no answer; it is written with the next group commit).
    schedule(&mut client, named("stream-acked", after_trigger(0))).await;
    let f = sub.recv().await;
    assert_eq!(f.job_id, "stream-acked");
    let commits = commit_count(&tickd).await;
    sub.ack(&[&f.fire_id]).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while commit_count(&tickd).await == commits {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the stream ack was never written"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    // One in flight on its second attempt.
    schedule(&mut client, named("in-flight", after_trigger(0))).await;
    let first = sub.recv().await;
    assert_eq!((first.job_id.as_str(), first.attempt), ("in-flight", 1));
    sub.nack(&[&first.fire_id], None).await;
    let second = sub.recv().await;
    assert_eq!((&*second.fire_id, second.attempt), (&*first.fire_id, 2));

    tickd.kill9();
    drop(sub);
    let tickd = tickd.start_again();
    let mut client = tickd.client().await;
    let state = |job: pb::Job| (job.id.clone(), job.state());
    let mut states = Vec::new();
    for id in [
        "pending",
        "cancelled",
        "paused",
        "resumed",
        "unary-acked",
        "stream-acked",
        "in-flight",
    ] {
        let job = client
            .get_job(pb::GetJobRequest { id: id.into() })
            .await
            .unwrap_or_else(|e| panic!("job {id} lost: {e:?}"))
            .into_inner();
        if id == "pending" {
            assert_eq!(job.next_fire_time, pending.next_fire_time);
        }
        states.push(state(job));
    }
    use pb::JobState::*;
    let want: Vec<(String, pb::JobState)> = [
        ("pending", Scheduled),
        ("cancelled", Cancelled),
        ("paused", Paused),
        ("resumed", Scheduled),
        ("unary-acked", Completed),
        ("stream-acked", Completed),
        ("in-flight", Completed),
    ]
    .into_iter()
    .map(|(id, s)| (id.to_string(), s))
    .collect();
    assert_eq!(states, want);

    // Exactly one fire is stored: the one in flight at the crash.
    let metrics = scrape(tickd.metrics_addr).await;
    assert_eq!(
        sample(&metrics, "tickd_queue_backlog", &["tickd_queue=\"q\""]),
        Some(1.0),
        "{metrics}"
    );
    // Readiness and the store, as the chart's alerts and dashboard read them.
    let health = |state: &str| {
        sample(
            &metrics,
            "tickd_health",
            &[&format!("tickd_health_state=\"{state}\"")],
        )
    };
    assert_eq!(
        [health("serving"), health("store_failing"), health("failed")],
        [Some(1.0), Some(0.0), Some(0.0)],
        "{metrics}"
    );
    assert_eq!(
        sample(&metrics, "tickd_info", &["tickd_store=\"embedded\""]),
        Some(1.0),
        "{metrics}"
    );
    let mut sub = Sub::open(&mut client, "q", 10).await;
    let back = sub.recv().await;
    assert_eq!(
        (&*back.fire_id, back.attempt),
        (&*first.fire_id, 2),
        "the fire in flight at the crash comes back with the attempt it had"
    );
}

/// Successful store commits so far, from the process's `/metrics`.
async fn commit_count(tickd: &TickdProcess) -> f64 {
    let text = scrape(tickd.metrics_addr).await;
    sample(
        &text,
        "tickd_store_commit_duration_seconds_count",
        &["tickd_commit_ok=\"true\""],
    )
    .unwrap_or(0.0)
}

/// Three interval jobs, one per misfire policy, every 100 ms from `start` with a 50 ms grace
/// period, on queues named after their policy behind `prefix` (metrics are per process: each
/// test keeps its own queues).
async fn jobs_per_policy(server: &mut TestServer, start: i64, prefix: &str) {
    for (queue, policy) in [
        ("once", pb::MisfirePolicy::FireOnce),
        ("skip", pb::MisfirePolicy::Skip),
        ("all", pb::MisfirePolicy::FireAll),
    ] {
        let queue = format!("{prefix}{queue}");
        let mut j = job(&queue, every_trigger(100, Some(ts_micros(start))));
        j.id = queue;
        j.misfire_policy = policy.into();
        j.misfire_grace_period = Some(ms(50));
        server.schedule(j).await;
    }
}

/// Receives every fire waiting on `queue` (the server is settled) and returns their
/// scheduled times relative to `start`, in ms.
async fn drain(server: &mut TestServer, queue: &str, start: i64) -> Vec<i64> {
    let n = server.queue(queue).backlog;
    let mut sub = server.subscribe(queue, 1_000).await;
    let mut times = Vec::new();
    for _ in 0..n {
        let fire = sub.recv().await;
        times.push((micros_of(&fire.scheduled_time) - start) / 1_000);
        sub.ack(&[&fire.fire_id]).await;
    }
    server.wait_in_flight(queue, 0).await;
    assert_eq!(server.queue(queue).backlog, 0);
    // Close the subscription and wait until the server has seen it go: otherwise a fire
    // released next could be leased to this closed stream (a dropped stream keeps its leases
    // until their deadline) instead of waiting for the next drain.
    drop(sub);
    server
        .wait_until(&format!("no subscriber left on {queue}"), |s| {
            s.queue(queue).subscribers == 0
        })
        .await;
    times
}

both_backends! {
    /// Down from before the first occurrence (at +200 ms) until +900 ms: the occurrences at
    /// 200..=800 ms are missed by more than the grace period, the one at 900 ms is on time.
    /// FIRE_ONCE sends the latest missed one (800) then 900; SKIP sends only 900; FIRE_ALL sends
    /// all of them, oldest first.
    #[tokio::test]
    async fn missed_occurrences_follow_the_misfire_policy_after_restart(backend) {
        let mut server = backend.manual().await;
        let start = server.now() + 200_000;
        let p = &format!("{}.", backend.name());
        jobs_per_policy(&mut server, start, p).await;
        let mut server = server.restart_after(900).await;
        server.settle().await;
        // Passed-over occurrences are counted, per queue.
        let text = scrape(server.metrics_addr).await;
        let skipped = |queue: &str| skipped_occurrences(&text, &format!("{p}{queue}"), "misfire");
        assert_eq!(skipped("once"), Some(6.0), "{text}");
        assert_eq!(skipped("skip"), Some(7.0), "{text}");
        assert_eq!(skipped("all"), None, "{text}");

        let q = |queue: &str| format!("{p}{queue}");
        assert_eq!(drain(&mut server, &q("once"), start).await, vec![600, 700]);
        assert_eq!(drain(&mut server, &q("skip"), start).await, vec![700]);
        assert_eq!(
            drain(&mut server, &q("all"), start).await,
            vec![0, 100, 200, 300, 400, 500, 600, 700]
        );
        // And each is back on its grid.
        server.advance(100).await;
        for queue in ["once", "skip", "all"] {
            assert_eq!(drain(&mut server, &q(queue), start).await, vec![800], "{queue}");
        }
        server.stop().await;
    }
}

both_backends! {
    /// `--max-catch-up-fires` caps FIRE_ALL: of seven missed occurrences only the three oldest are
    /// sent; the rest are skipped, and the job goes on with its next on-time occurrence.
    #[tokio::test]
    async fn fire_all_is_capped_by_max_catch_up_fires(backend) {
        let mut server = backend.manual_with(|c| c.max_catch_up_fires = 3).await;
        let start = server.now() + 200_000;
        let p = format!("capped.{}.", backend.name());
        jobs_per_policy(&mut server, start, &p).await;
        let mut server = server.restart_after(900).await;
        server.settle().await;
        assert_eq!(
            drain(&mut server, &format!("{p}all"), start).await,
            vec![0, 100, 200, 700]
        );
        server.stop().await;
    }
}

both_backends! {
    /// A daily 02:30 Europe/Berlin job, down across the spring-forward night: FIRE_ALL catches up
    /// on each missed day at its real instant (03:00 CEST on the night 02:30 does not exist, and
    /// the offset changes from +01:00 to +02:00), FIRE_ONCE only on the latest.
    #[tokio::test]
    async fn cron_catch_up_across_a_dst_change(backend) {
        // Friday 2026-03-27 12:00 UTC; Berlin springs forward on Sunday 2026-03-29 at 02:00.
        let friday_noon = 1_774_612_800_000_000;
        let mut server = backend.manual_at(friday_noon, |_| {}).await;
        for (id, policy) in [
            ("dst.all", pb::MisfirePolicy::FireAll),
            ("dst.once", pb::MisfirePolicy::FireOnce),
        ] {
            let mut j = job(id, cron_trigger("30 2 * * *", "Europe/Berlin"));
            j.id = id.into();
            j.misfire_policy = policy.into();
            server.schedule(j).await;
        }
        // Back on Tuesday 2026-03-31 at 12:00 UTC.
        let mut server = server.restart_after(4 * 24 * 3_600_000).await;
        server.settle().await;
        let utc = |t: i64| {
            chrono::DateTime::from_timestamp_micros(friday_noon + t * 1_000)
                .expect("time")
                .format("%m-%d %H:%M")
                .to_string()
        };
        let all: Vec<String> = drain(&mut server, "dst.all", friday_noon)
            .await
            .into_iter()
            .map(utc)
            .collect();
        assert_eq!(
            all,
            vec!["03-28 01:30", "03-29 01:00", "03-30 00:30", "03-31 00:30"],
            "02:30 CET, 03:00 CEST (02:30 does not exist), then 02:30 CEST, in UTC"
        );
        let once: Vec<String> = drain(&mut server, "dst.once", friday_noon)
            .await
            .into_iter()
            .map(utc)
            .collect();
        assert_eq!(once, vec!["03-31 00:30"]);
        server.stop().await;
    }
}

/// SIGTERM: health turns NOT_SERVING (seen on a Watch opened before), open streams end with
/// UNAVAILABLE, the process exits 0 well within its grace period, and after a start on the
/// same directory the accepted job is there and the fire that was in flight comes back with
/// its attempt not counted.
#[tokio::test]
async fn sigterm_shuts_down_in_order_and_exits_zero() {
    let mut tickd = TickdProcess::start();
    let mut client = tickd.client().await;
    let mut health = HealthClient::new(channel(tickd.addr).await);
    let mut watch = health
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("watch")
        .into_inner();
    let first = watch.message().await.expect("watch").expect("a status");
    assert_eq!(first.status(), ServingStatus::Serving);

    let mut sub = Sub::open(&mut client, "q", 10).await;
    let job = schedule(&mut client, job("q", after_trigger(0))).await;
    let fire = sub.recv().await;
    assert_eq!(fire.attempt, 1);

    let started = std::time::Instant::now();
    tickd.sigterm();
    let next = tokio::time::timeout(Duration::from_secs(10), watch.message())
        .await
        .expect("health changes in time");
    assert!(
        matches!(&next, Ok(Some(s)) if s.status() == ServingStatus::NotServing),
        "health turns NOT_SERVING first, got {next:?}"
    );
    match sub.end(10_000).await {
        Err(status) => assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}"),
        other => panic!("expected UNAVAILABLE, got {other:?}"),
    }
    let status = tickd.wait_exit(Duration::from_secs(10)).await;
    assert!(status.success(), "exit status {status:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );

    let tickd = tickd.start_again();
    let mut client = tickd.client().await;
    client
        .get_job(pb::GetJobRequest { id: job.id })
        .await
        .expect("the job survived");
    let mut sub = Sub::open(&mut client, "q", 10).await;
    let again = sub.recv().await;
    assert_eq!(
        (&*again.fire_id, again.attempt),
        (&*fire.fire_id, 1),
        "handed back at shutdown without counting an attempt"
    );
}

/// A store that can hold its commits: while `hold` is set a commit waits inside the store,
/// counted in `held`.
#[derive(Debug)]
struct HeldStore {
    inner: tickd::store::RedbStore,
    hold: std::sync::atomic::AtomicBool,
    held: std::sync::atomic::AtomicUsize,
}

impl tickd::store::Store for HeldStore {
    fn load(&self) -> Result<tickd::store::Snapshot, tickd::store::StoreError> {
        self.inner.load()
    }

    fn commit(&self, writes: &[tickd::store::Write]) -> Result<(), tickd::store::StoreError> {
        use std::sync::atomic::Ordering::SeqCst;
        if self.hold.load(SeqCst) {
            self.held.fetch_add(1, SeqCst);
            while self.hold.load(SeqCst) {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        self.inner.commit(writes)
    }
}

/// Invariant 5 through gRPC: a client that cancels its Schedule, Cancel or Pause while the
/// commit is under way leaves each change whole: visible once the commit ends, and still there
/// after a restart. Never half: a job stored without its state, or a state not stored.
#[tokio::test]
async fn calls_cancelled_mid_commit_leave_the_change_whole() {
    use std::sync::atomic::Ordering::SeqCst;
    let held = std::sync::Arc::new(std::sync::Mutex::new(None::<std::sync::Arc<HeldStore>>));
    let slot = held.clone();
    let mut server = TestServer::manual_on(move |redb| {
        let store = std::sync::Arc::new(HeldStore {
            inner: redb,
            hold: false.into(),
            held: 0.into(),
        });
        *slot.lock().expect("slot") = Some(store.clone());
        store
    })
    .await;
    let store = held.lock().expect("slot").clone().expect("store built");
    let mut kept = job("halves", after_trigger(3_600_000));
    kept.id = "to-cancel".into();
    server.schedule(kept).await;
    let mut paused = job("halves", after_trigger(3_600_000));
    paused.id = "to-pause".into();
    server.schedule(paused).await;
    server.settle().await;

    let mut created = job("halves", after_trigger(3_600_000));
    created.id = "created".into();
    let calls: [(&str, tonic::codegen::BoxFuture<(), ()>); 3] = {
        let (mut a, mut b, mut c) = (
            server.client.clone(),
            server.client.clone(),
            server.client.clone(),
        );
        [
            (
                "Schedule",
                Box::pin(async move {
                    let _ = a
                        .schedule(pb::ScheduleRequest {
                            job: Some(created),
                            ..Default::default()
                        })
                        .await;
                    Ok(())
                }),
            ),
            (
                "CancelJob",
                Box::pin(async move {
                    let _ = b
                        .cancel_job(pb::CancelJobRequest {
                            id: "to-cancel".into(),
                        })
                        .await;
                    Ok(())
                }),
            ),
            (
                "PauseJob",
                Box::pin(async move {
                    let _ = c
                        .pause_job(pb::PauseJobRequest {
                            id: "to-pause".into(),
                        })
                        .await;
                    Ok(())
                }),
            ),
        ]
    };
    for (name, call) in calls {
        store.held.store(0, SeqCst);
        store.hold.store(true, SeqCst);
        let call = tokio::spawn(call);
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while store.held.load(SeqCst) == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "{name} never reached the store"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        // The client gives up while the commit is held: its request is reset.
        call.abort();
        let _ = call.await;
        store.hold.store(false, SeqCst);
        server.settle().await;
    }
    let check = |server: &mut TestServer| {
        let mut client = server.client.clone();
        async move {
            let get = |id: &str| pb::GetJobRequest { id: id.into() };
            let state = |j: pb::Job| j.state();
            let created = client.get_job(get("created")).await.expect("created");
            assert_eq!(state(created.into_inner()), pb::JobState::Scheduled);
            let cancelled = client.get_job(get("to-cancel")).await.expect("to-cancel");
            assert_eq!(state(cancelled.into_inner()), pb::JobState::Cancelled);
            let paused = client.get_job(get("to-pause")).await.expect("to-pause");
            assert_eq!(state(paused.into_inner()), pb::JobState::Paused);
        }
    };
    check(&mut server).await;
    // The restart opens the plain store: let go of the held one first.
    drop(store);
    drop(held);
    let mut server = server.restart().await;
    check(&mut server).await;
    server.stop().await;
}
