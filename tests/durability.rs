//! Restart durability: jobs and un-acked fires survive a graceful restart and a kill -9, acked
//! fires stay acked, and occurrences missed while the server was down follow the misfire policy.

mod common;

use std::time::Duration;

use common::*;
use tickd::api::pb;

/// Jobs and un-acked fires come back after a graceful restart on the same directory.
#[tokio::test]
async fn graceful_restart_keeps_jobs_and_unacked_fires() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut server = TestServer::start(dir.path()).await;
    let mut sub = Sub::open(&mut server.client, "q", 10).await;
    let pending = schedule(&mut server.client, job("q", after_trigger(3_600_000))).await;
    let fired = schedule(&mut server.client, job("q", at_trigger(ts_in(-1)))).await;
    let fire = sub.next(1_000).await;
    assert_eq!(fire.job_id, fired.id);
    server.stop().await;

    let mut server = TestServer::start(dir.path()).await;
    let got = server
        .client
        .get_job(pb::GetJobRequest {
            id: pending.id.clone(),
        })
        .await
        .expect("job survived")
        .into_inner();
    assert_eq!(got.state(), pb::JobState::Scheduled);
    assert_eq!(got.next_fire_time, pending.next_fire_time);
    let mut sub = Sub::open(&mut server.client, "q", 10).await;
    let again = sub.next(1_000).await;
    assert_eq!(
        again.fire_id, fire.fire_id,
        "the un-acked fire is delivered again"
    );
    sub.ack(&[&again.fire_id]).await;
    sub.expect_none(200).await;
    server.stop().await;
}

/// After kill -9: every acknowledged job is back, the un-acked fire is delivered again with the
/// same fire_id, and a fire acked through the unary Ack is not.
#[tokio::test]
async fn kill_dash_nine_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut child, addr) = spawn_binary(dir.path());
    let mut client = connect(addr).await;
    let mut sub = Sub::open(&mut client, "q", 10).await;
    let pending = schedule(&mut client, job("q", after_trigger(3_600_000))).await;
    let acked_job = schedule(&mut client, job("q", at_trigger(ts_in(-1)))).await;
    let acked = sub.next(2_000).await;
    assert_eq!(acked.job_id, acked_job.id);
    let resp = client
        .ack(pb::AckRequest {
            queue: "q".into(),
            fire_ids: vec![acked.fire_id.clone()],
        })
        .await
        .expect("ack")
        .into_inner();
    assert_eq!(resp.acked_count, 1);
    let unacked_job = schedule(&mut client, job("q", at_trigger(ts_in(-1)))).await;
    let unacked = sub.next(2_000).await;
    assert_eq!(unacked.job_id, unacked_job.id);

    child.kill().expect("kill -9");
    child.wait().expect("reap");
    drop(sub);

    let (mut child, addr) = spawn_binary(dir.path());
    let mut client = connect(addr).await;
    for id in [&pending.id, &acked_job.id, &unacked_job.id] {
        client
            .get_job(pb::GetJobRequest { id: id.clone() })
            .await
            .unwrap_or_else(|e| panic!("job {id} lost: {e:?}"));
    }
    let mut sub = Sub::open(&mut client, "q", 10).await;
    let again = sub.next(2_000).await;
    assert_eq!(again.fire_id, unacked.fire_id);
    sub.ack(&[&again.fire_id]).await;
    sub.expect_none(300).await;
    child.kill().expect("kill");
    child.wait().expect("reap");
}

/// Occurrences that fell due while the server was down follow each job's misfire policy.
#[tokio::test]
async fn missed_occurrences_follow_the_misfire_policy_after_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut server = TestServer::start(dir.path()).await;
    let start = now_micros() + 200_000;
    let mut ids = Vec::new();
    for (queue, policy) in [
        ("once", pb::MisfirePolicy::FireOnce),
        ("skip", pb::MisfirePolicy::Skip),
        ("all", pb::MisfirePolicy::FireAll),
    ] {
        let mut j = job(queue, every_trigger(100, Some(ts_micros(start))));
        j.misfire_policy = policy.into();
        j.misfire_grace_period = Some(ms(50));
        ids.push(schedule(&mut server.client, j).await.id);
    }
    server.stop().await;
    // Down across the occurrences at start, start + 100 ms, ...
    tokio::time::sleep(Duration::from_millis(900)).await;
    let restarted_at = now_micros();
    let mut server = TestServer::start(dir.path()).await;
    let grid = |t: i64| (t - start) % 100_000 == 0;

    // FIRE_ONCE: one catch-up fire for the latest missed occurrence, then back on the grid.
    let mut once = Sub::open(&mut server.client, "once", 100).await;
    let catch_up = once.next(1_000).await;
    let c = micros_of(&catch_up.scheduled_time);
    assert!(grid(c));
    assert!(c > start, "the latest missed occurrence, not the first");
    assert!(c <= restarted_at, "a missed occurrence");
    let next = once.next(1_000).await;
    assert_eq!(micros_of(&next.scheduled_time), c + 100_000);

    // SKIP: nothing for what was missed by more than the grace period.
    let mut skip = Sub::open(&mut server.client, "skip", 100).await;
    let first = skip.next(1_000).await;
    let f = micros_of(&first.scheduled_time);
    assert!(grid(f));
    assert!(
        f >= restarted_at - 150_000,
        "an occurrence missed by more than the grace period fired: {} ms before restart",
        (restarted_at - f) / 1_000
    );

    // FIRE_ALL: every missed occurrence, oldest first.
    let mut all = Sub::open(&mut server.client, "all", 100).await;
    for k in 0..6 {
        let fire = all.next(1_000).await;
        assert_eq!(micros_of(&fire.scheduled_time), start + k * 100_000);
    }
    server.stop().await;
}

/// SIGTERM: open streams end with UNAVAILABLE, health stops serving, and the process exits 0
/// well within its grace period, with what it accepted stored.
#[tokio::test]
async fn sigterm_shuts_down_in_order_and_exits_zero() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut child, addr) = spawn_binary(dir.path());
    let mut client = connect(addr).await;
    let mut sub = Sub::open(&mut client, "q", 10).await;
    let job = schedule(&mut client, job("q", after_trigger(3_600_000))).await;
    let started = std::time::Instant::now();
    let pid = i32::try_from(child.id()).expect("pid");
    // SAFETY: sending a signal to our own child process.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    match sub.end(5_000).await {
        Err(status) => assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}"),
        other => panic!("expected UNAVAILABLE, got {other:?}"),
    }
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .expect("join")
        .expect("wait");
    assert!(status.success(), "exit status {status:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );

    let (mut child, addr) = spawn_binary(dir.path());
    let mut client = connect(addr).await;
    client
        .get_job(pb::GetJobRequest { id: job.id })
        .await
        .expect("the job survived");
    child.kill().expect("kill");
    child.wait().expect("reap");
}
