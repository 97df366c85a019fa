//! Several tickd processes on one PostgreSQL database: each serves the whole API, workers on
//! different replicas compete for one queue, replicas racing for the same due jobs release
//! each occurrence once, and nothing acknowledged is lost when a replica is killed, paused
//! (SIGSTOP) or runs with a wrong clock, or when the database restarts.
//!
//! Real processes on the real clock: waits are bounded, and assertions are about what was
//! delivered, not about exact timings (except the promised bounds, with room).
//! Built only with `--features postgres-tests`.

#![cfg(feature = "postgres-tests")]

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use common::pg::TestDatabase;
use common::*;
use sqlx::Connection;
use tickd::api::pb;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tonic::Code;
use tonic_health::ServingStatus;

/// Short polls so that tests about replicas dying do not wait long.
const FAST: &[(&str, &str)] = &[("TICKD_DATABASE_POLL_INTERVAL", "200ms")];

/// A fire as a worker received it.
#[derive(Debug, Clone)]
struct Got {
    fire: pb::Fire,
    /// Which replica's stream it came on.
    replica: usize,
    /// When it arrived, system clock, microseconds.
    at: i64,
}

/// A worker reading one stream in the background, acking every fire when `ack` is set.
struct Worker {
    tx: mpsc::Sender<pb::SubscribeRequest>,
    task: JoinHandle<()>,
}

impl Worker {
    async fn start(
        client: &mut Client,
        queue: &str,
        max_in_flight: u32,
        replica: usize,
        ack: bool,
        out: mpsc::UnboundedSender<Got>,
    ) -> Worker {
        let mut sub = Sub::open(client, queue, max_in_flight).await;
        let tx = sub.tx.clone();
        let task = tokio::spawn(async move {
            while let Ok(Some(fire)) = sub.fires.message().await {
                let id = fire.fire_id.clone();
                let _ = out.send(Got {
                    fire,
                    replica,
                    at: now_micros(),
                });
                if ack {
                    sub.ack(&[&id]).await;
                }
            }
        });
        Worker { tx, task }
    }

    async fn send(&self, request: pb::subscribe_request::Request) {
        self.tx
            .send(pb::SubscribeRequest {
                request: Some(request),
            })
            .await
            .expect("send on the stream");
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Receives until `done` holds for what arrived, failing the test after `within`.
async fn collect(
    rx: &mut mpsc::UnboundedReceiver<Got>,
    got: &mut Vec<Got>,
    within: Duration,
    what: &str,
    done: impl Fn(&[Got]) -> bool,
) {
    let deadline = tokio::time::Instant::now() + within;
    while !done(got) {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(g)) => got.push(g),
            Ok(None) => panic!("every worker stopped before: {what}"),
            Err(_) => panic!("not within {within:?}: {what} (got {} fires)", got.len()),
        }
    }
}

/// Receives whatever arrives for `d`.
async fn collect_for(rx: &mut mpsc::UnboundedReceiver<Got>, got: &mut Vec<Got>, d: Duration) {
    let deadline = tokio::time::Instant::now() + d;
    while let Ok(Some(g)) = tokio::time::timeout_at(deadline, rx.recv()).await {
        got.push(g);
    }
}

/// Receives `n` fires (30 s at most), and whatever more comes within 500 ms (anything
/// delivered twice would), and asserts that they are `n` fires, each delivered once.
async fn receive_each_once(rx: &mut mpsc::UnboundedReceiver<Got>, n: usize) -> Vec<Got> {
    let mut got = Vec::new();
    collect(
        rx,
        &mut got,
        Duration::from_secs(30),
        &format!("{n} fires"),
        |g| g.len() >= n,
    )
    .await;
    collect_for(rx, &mut got, Duration::from_millis(500)).await;
    let ids: HashSet<&str> = got.iter().map(|g| &*g.fire.fire_id).collect();
    assert_eq!(
        (got.len(), ids.len()),
        (n, n),
        "each fire delivered exactly once"
    );
    got
}

/// Every fire_id names one occurrence: its id is `<job id>@<scheduled time>` and no two ids
/// share an occurrence.
fn assert_one_id_per_occurrence(got: &[Got]) {
    let mut by_occurrence: HashMap<(String, i64), String> = HashMap::new();
    for g in got {
        let f = &g.fire;
        assert!(f.fire_id.starts_with(&format!("{}@", f.job_id)), "{f:?}");
        let key = (f.job_id.clone(), micros_of(&f.scheduled_time));
        let id = by_occurrence
            .entry(key)
            .or_insert_with(|| f.fire_id.clone());
        assert_eq!(*id, f.fire_id, "two fire ids for one occurrence");
    }
}

/// The scheduled times each job's fires were for, in ms, sorted, one entry per fire_id.
fn occurrences(got: &[Got]) -> BTreeMap<String, Vec<i64>> {
    let mut seen = HashSet::new();
    let mut by_job: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for g in got {
        if seen.insert(g.fire.fire_id.clone()) {
            by_job
                .entry(g.fire.job_id.clone())
                .or_default()
                .push(micros_of(&g.fire.scheduled_time) / 1_000);
        }
    }
    for times in by_job.values_mut() {
        times.sort_unstable();
    }
    by_job
}

/// Each job's occurrences are every `period_ms` with none missing between its first and the
/// last one more than 2 s older than the newest (later ones may still be on their way: a
/// collection stops at a count or a time, not at a quiet moment).
fn assert_no_gap(got: &[Got], period_ms: i64) {
    for (job, times) in occurrences(got) {
        let newest = times.last().copied().unwrap_or(0);
        let settled: Vec<i64> = times.into_iter().filter(|t| *t <= newest - 2_000).collect();
        for pair in settled.windows(2) {
            assert_eq!(
                pair[1] - pair[0],
                period_ms,
                "job {job}: an occurrence is missing or repeated: {settled:?}"
            );
        }
    }
}

/// An interval job on `queue`, every `period_ms`, with a long misfire grace period (so that a
/// late occurrence is still fired, and the gap checks see every one).
fn every_job(queue: &str, id: &str, period_ms: i64) -> pb::Job {
    let mut j = job(queue, every_trigger(period_ms, None));
    j.id = id.into();
    j.misfire_grace_period = Some(ms(60_000));
    j
}

/// Rows in tickd_fires.
async fn fire_rows(url: &str) -> i64 {
    let mut conn = sqlx::postgres::PgConnection::connect(url)
        .await
        .expect("connect");
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM tickd_fires")
        .fetch_one(&mut conn)
        .await
        .expect("count");
    let _ = conn.close().await;
    n
}

/// A job scheduled on one replica is read, paused, resumed and cancelled on others; a worker
/// on a third receives its fire, and an Ack on yet another is accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_replica_serves_the_whole_api() {
    let db = TestDatabase::create().await;
    let a = TickdProcess::replica(&db.url, FAST);
    let b = TickdProcess::replica(&db.url, FAST);
    let c = TickdProcess::replica(&db.url, FAST);
    let (mut ca, mut cb, mut cc) = (a.client().await, b.client().await, c.client().await);

    let mut later = job("api", after_trigger(3_600_000));
    later.id = "later".into();
    let created = schedule(&mut ca, later).await;
    let get = |c: &mut Client, id: &str| {
        let mut c = c.clone();
        let id = id.to_string();
        async move {
            c.get_job(pb::GetJobRequest { id })
                .await
                .map(|r| r.into_inner())
        }
    };
    let seen = get(&mut cb, "later").await.expect("get on B");
    assert_eq!(seen.next_fire_time, created.next_fire_time);
    cb.pause_job(pb::PauseJobRequest { id: "later".into() })
        .await
        .expect("pause on B");
    assert_eq!(
        get(&mut cc, "later").await.expect("get").state(),
        pb::JobState::Paused
    );
    cc.resume_job(pb::ResumeJobRequest { id: "later".into() })
        .await
        .expect("resume on C");
    ca.cancel_job(pb::CancelJobRequest { id: "later".into() })
        .await
        .expect("cancel on A");
    assert_eq!(
        get(&mut cb, "later").await.expect("get").state(),
        pb::JobState::Cancelled
    );
    let listed = cc
        .list_jobs(pb::ListJobsRequest {
            queue: "api".into(),
            ..Default::default()
        })
        .await
        .expect("list on C")
        .into_inner();
    assert_eq!(listed.jobs.len(), 1);
    expect_code(get(&mut ca, "nope").await, Code::NotFound);

    // Released by whichever replica; delivered on B's stream; acked on C.
    let (tx, mut rx) = mpsc::unbounded_channel();
    let _worker = Worker::start(&mut cb, "api", 10, 1, false, tx).await;
    let mut soon = job("api", after_trigger(200));
    soon.id = "soon".into();
    schedule(&mut ca, soon).await;
    let mut got = Vec::new();
    collect(
        &mut rx,
        &mut got,
        Duration::from_secs(10),
        "the fire on B",
        |g| !g.is_empty(),
    )
    .await;
    assert_eq!(got[0].fire.job_id, "soon");
    let acked = cc
        .ack(pb::AckRequest {
            queue: "api".into(),
            fire_ids: vec![got[0].fire.fire_id.clone()],
        })
        .await
        .expect("ack on C")
        .into_inner();
    assert_eq!(acked.acked_count, 1);
    assert_eq!(fire_rows(&db.url).await, 0);
}

/// Without LISTEN/NOTIFY (`--database-notify=false`, for PostgreSQL-wire databases that lack
/// it) replicas poll: a job scheduled on one fires on time at a worker on the other, within
/// the poll interval.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_notify_replicas_poll() {
    let db = TestDatabase::create().await;
    let polling = &[
        ("TICKD_DATABASE_NOTIFY", "false"),
        ("TICKD_DATABASE_POLL_INTERVAL", "100ms"),
    ];
    let a = TickdProcess::replica(&db.url, polling);
    let b = TickdProcess::replica(&db.url, polling);
    let (mut ca, mut cb) = (a.client().await, b.client().await);
    let (tx, mut rx) = mpsc::unbounded_channel();
    let _worker = Worker::start(&mut cb, "polled", 10, 1, true, tx).await;
    for i in 0..5 {
        let mut j = job("polled", after_trigger(500 + i * 200));
        j.id = format!("polled-{i}");
        schedule(&mut ca, j).await;
    }
    let mut got = Vec::new();
    collect(&mut rx, &mut got, Duration::from_secs(10), "5 fires", |g| {
        g.len() >= 5
    })
    .await;
    for g in &got {
        let late = g.at - micros_of(&g.fire.scheduled_time);
        assert!(
            late < 500_000,
            "{}: {} ms late",
            g.fire.fire_id,
            late / 1_000
        );
    }
}

/// Workers on two replicas share one queue: each of 200 fires goes to exactly one of them,
/// and both get work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_on_different_replicas_compete() {
    let db = TestDatabase::create().await;
    let replicas: Vec<TickdProcess> = (0..3)
        .map(|_| TickdProcess::replica(&db.url, FAST))
        .collect();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut workers = Vec::new();
    for (i, r) in replicas.iter().take(2).enumerate() {
        let mut client = r.client().await;
        workers.push(Worker::start(&mut client, "shared", 8, i, true, tx.clone()).await);
    }
    let mut client = replicas[2].client().await;
    for _ in 0..200 {
        schedule(&mut client, job("shared", after_trigger(0))).await;
    }
    let got = receive_each_once(&mut rx, 200).await;
    for r in 0..2 {
        assert!(got.iter().any(|g| g.replica == r), "worker {r} got none");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(fire_rows(&db.url).await, 0, "every ack stored");
}

/// Three replicas race for the same due jobs: 300 one-shot jobs due at one instant and 20
/// interval jobs; every occurrence is released once (one fire_id, one delivery), and each
/// job's fire count matches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_replicas_release_each_occurrence_once() {
    let db = TestDatabase::create().await;
    let replicas: Vec<TickdProcess> = (0..3)
        .map(|_| TickdProcess::replica(&db.url, FAST))
        .collect();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut workers = Vec::new();
    let mut clients = Vec::new();
    for (i, r) in replicas.iter().enumerate() {
        let mut client = r.client().await;
        workers.push(Worker::start(&mut client, "race", 64, i, true, tx.clone()).await);
        clients.push(client);
    }
    let due = ts_in(1_500);
    for i in 0..300 {
        let mut j = job("race", at_trigger(due));
        j.id = format!("at-{i:03}");
        schedule(&mut clients[i % 3], j).await;
    }
    for i in 0..20 {
        let mut j = every_job("race", &format!("every-{i:02}"), 100);
        j.max_fires = 10;
        schedule(&mut clients[i % 3], j).await;
    }
    let got = receive_each_once(&mut rx, 500).await;
    assert_one_id_per_occurrence(&got);
    assert_no_gap(&got, 100);
    for (job, times) in occurrences(&got) {
        let want = if job.starts_with("at-") { 1 } else { 10 };
        assert_eq!(times.len(), want, "{job}");
    }
    for r in 0..3 {
        assert!(
            got.iter().any(|g| g.replica == r),
            "replica {r} delivered none"
        );
    }
}

/// Under load with three replicas, kill -9 one: the fires in flight on its streams come back
/// after their ack deadline (attempt 2) on the survivors, occurrences falling due meanwhile
/// are released by the survivors within 5 s of their due time, nothing acked is delivered
/// again, and no occurrence is missed or doubled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_dash_nine_of_a_replica_under_load_loses_nothing() {
    let db = TestDatabase::create().await;
    let mut replicas: Vec<TickdProcess> = (0..3)
        .map(|_| TickdProcess::replica(&db.url, FAST))
        .collect();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut workers = Vec::new();
    let mut clients = Vec::new();
    for (i, r) in replicas.iter().enumerate() {
        let mut client = r.client().await;
        // The worker on replica 0 holds what it gets (never acks): those fires are in flight
        // on the replica that dies.
        workers.push(Worker::start(&mut client, "load", 16, i, i != 0, tx.clone()).await);
        clients.push(client);
    }
    for i in 0..30 {
        let mut j = every_job("load", &format!("job-{i:02}"), 500);
        j.ack_deadline = Some(ms(2_000));
        schedule(&mut clients[i % 3], j).await;
    }
    let mut got = Vec::new();
    collect(
        &mut rx,
        &mut got,
        Duration::from_secs(20),
        "fires in flight on the doomed replica",
        |g| g.iter().filter(|g| g.replica == 0).count() >= 5,
    )
    .await;
    replicas[0].kill9();
    let killed_at = now_micros();
    drop(workers.remove(0));
    collect_for(&mut rx, &mut got, Duration::from_secs(6)).await;

    let held: HashSet<String> = got
        .iter()
        .filter(|g| g.replica == 0)
        .map(|g| g.fire.fire_id.clone())
        .collect();
    let acked: HashSet<String> = got
        .iter()
        .filter(|g| g.replica != 0 && g.at < killed_at)
        .map(|g| g.fire.fire_id.clone())
        .collect();
    let after: Vec<&Got> = got.iter().filter(|g| g.at >= killed_at).collect();
    for id in &held {
        let again = after
            .iter()
            .find(|g| &g.fire.fire_id == id)
            .unwrap_or_else(|| panic!("{id}, in flight on the killed replica, never came back"));
        assert_eq!(again.fire.attempt, 2, "{id}");
        assert_ne!(again.replica, 0);
    }
    for g in &after {
        assert!(
            !acked.contains(&g.fire.fire_id),
            "{} was acked and came back",
            g.fire.fire_id
        );
        let scheduled = micros_of(&g.fire.scheduled_time);
        if g.fire.attempt == 1 && scheduled >= killed_at {
            let late = g.at - scheduled;
            assert!(
                late < 5_000_000,
                "{} released {} ms after its due time",
                g.fire.fire_id,
                late / 1_000
            );
        }
    }
    assert_one_id_per_occurrence(&got);
    assert_no_gap(&got, 500);
}

/// A replica stopped (SIGSTOP) while its worker holds a fire loses the lease: the fire goes to
/// a worker on another replica (attempt 2). When the stopped replica goes on, the nack and the
/// extension its worker sent meanwhile name a lease that is gone and change nothing: the other
/// worker keeps the fire, with no third attempt. (Two fences stop it, each enough alone: the
/// replica's own lease clock, on steady time, and the lease token the database checks.)
/// Meanwhile interval jobs keep firing once each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_replica_cannot_act_on_a_lease_it_lost() {
    let db = TestDatabase::create().await;
    let a = TickdProcess::replica(&db.url, FAST);
    let b = TickdProcess::replica(&db.url, FAST);
    let (mut ca, mut cb) = (a.client().await, b.client().await);
    // Interval jobs keep both replicas releasing, so that A is likely stopped mid-release.
    let (ltx, mut lrx) = mpsc::unbounded_channel();
    let _load_a = Worker::start(&mut ca, "tick", 64, 0, true, ltx.clone()).await;
    let _load_b = Worker::start(&mut cb, "tick", 64, 1, true, ltx).await;
    for i in 0..20 {
        schedule(&mut ca, every_job("tick", &format!("tick-{i:02}"), 100)).await;
    }

    let (atx, mut arx) = mpsc::unbounded_channel();
    let worker_a = Worker::start(&mut ca, "fenced", 1, 0, false, atx).await;
    let mut j = job("fenced", after_trigger(0));
    j.id = "fenced".into();
    j.ack_deadline = Some(ms(1_000));
    j.max_attempts = 5;
    schedule(&mut ca, j).await;
    let mut got_a = Vec::new();
    collect(
        &mut arx,
        &mut got_a,
        Duration::from_secs(10),
        "A's worker gets it",
        |g| !g.is_empty(),
    )
    .await;
    let fire_id = got_a[0].fire.fire_id.clone();

    a.sigstop();
    let (btx, mut brx) = mpsc::unbounded_channel();
    let worker_b = Worker::start(&mut cb, "fenced", 1, 1, false, btx).await;
    let mut got_b = Vec::new();
    collect(
        &mut brx,
        &mut got_b,
        Duration::from_secs(10),
        "B's worker gets it",
        |g| !g.is_empty(),
    )
    .await;
    assert_eq!(
        (&*got_b[0].fire.fire_id, got_b[0].fire.attempt),
        (fire_id.as_str(), 2)
    );
    // B holds it for long.
    worker_b
        .send(pb::subscribe_request::Request::Extend(
            pb::ExtendAckDeadline {
                fire_ids: vec![fire_id.clone()],
                ack_deadline: Some(ms(60_000)),
            },
        ))
        .await;
    // A's worker, unaware, nacks and extends while A is stopped; A reads them when it goes on.
    worker_a
        .send(pb::subscribe_request::Request::Nack(pb::NackFires {
            fire_ids: vec![fire_id.clone()],
            retry_delay: None,
        }))
        .await;
    worker_a
        .send(pb::subscribe_request::Request::Extend(
            pb::ExtendAckDeadline {
                fire_ids: vec![fire_id.clone()],
                ack_deadline: Some(ms(60_000)),
            },
        ))
        .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    a.sigcont();
    // Long enough for A to act on everything it read, and for a redelivery to show.
    let mut more_a = Vec::new();
    let mut more_b = Vec::new();
    collect_for(&mut arx, &mut more_a, Duration::from_secs(3)).await;
    collect_for(&mut brx, &mut more_b, Duration::from_millis(10)).await;
    assert!(
        more_a.is_empty(),
        "A's stale nack redelivered it: {more_a:?}"
    );
    assert!(more_b.is_empty(), "{more_b:?}");
    let mut conn = sqlx::postgres::PgConnection::connect(&db.url)
        .await
        .expect("connect");
    let (state, attempt): (String, i32) =
        sqlx::query_as("SELECT state, attempt FROM tickd_fires WHERE fire_id = $1")
            .bind(&fire_id)
            .fetch_one(&mut conn)
            .await
            .expect("the fire");
    assert_eq!((state.as_str(), attempt), ("leased", 2), "still B's");
    let _ = conn.close().await;

    let mut ticks = Vec::new();
    collect_for(&mut lrx, &mut ticks, Duration::from_millis(500)).await;
    assert_one_id_per_occurrence(&ticks);
    let ids: HashSet<&str> = ticks.iter().map(|g| &*g.fire.fire_id).collect();
    assert_eq!(
        ids.len(),
        ticks.len(),
        "an interval occurrence was delivered twice"
    );
    assert_no_gap(&ticks, 100);
}

/// Replicas whose clocks are 30 s ahead and 30 s behind change nothing: a job scheduled "in
/// one second" through either is due one second from now, fires on time on both, interval
/// occurrences are delivered once each, and a lease held on the slow replica is not cut short.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_with_skewed_clocks_agree() {
    let db = TestDatabase::create().await;
    let fast = TickdProcess::replica(
        &db.url,
        &[
            ("TICKD_DATABASE_POLL_INTERVAL", "200ms"),
            ("TICKD_TEST_CLOCK_SKEW_MS", "30000"),
        ],
    );
    let slow = TickdProcess::replica(
        &db.url,
        &[
            ("TICKD_DATABASE_POLL_INTERVAL", "200ms"),
            ("TICKD_TEST_CLOCK_SKEW_MS", "-30000"),
        ],
    );
    let (mut cf, mut cs) = (fast.client().await, slow.client().await);
    let (tx, mut rx) = mpsc::unbounded_channel();
    let _wf = Worker::start(&mut cf, "skew", 64, 0, true, tx.clone()).await;
    let _ws = Worker::start(&mut cs, "skew", 64, 1, true, tx).await;
    for (client, id) in [(&mut cf, "via-fast"), (&mut cs, "via-slow")] {
        let mut j = job("skew", after_trigger(1_000));
        j.id = id.into();
        let before = now_micros();
        let created = schedule(client, j).await;
        let due = micros_of(&created.next_fire_time) - before;
        assert!(
            (500_000..1_500_000).contains(&due),
            "{id}: due {} ms from now",
            due / 1_000
        );
    }
    for i in 0..5 {
        schedule(&mut cs, every_job("skew", &format!("grid-{i}"), 200)).await;
    }
    let mut got = Vec::new();
    collect_for(&mut rx, &mut got, Duration::from_secs(3)).await;
    for id in ["via-fast", "via-slow"] {
        let g = got
            .iter()
            .find(|g| g.fire.job_id == id)
            .unwrap_or_else(|| panic!("{id} never fired"));
        let late = g.at - micros_of(&g.fire.scheduled_time);
        assert!(
            (-100_000..1_000_000).contains(&late),
            "{id}: {late} µs late"
        );
    }
    assert_one_id_per_occurrence(&got);
    let ids: HashSet<&str> = got.iter().map(|g| &*g.fire.fire_id).collect();
    assert_eq!(ids.len(), got.len(), "delivered twice");
    assert_no_gap(&got, 200);

    // A lease taken through the slow replica lasts its whole deadline on the database's clock
    // (on its own clock it would have ended 25 s ago).
    let (htx, mut hrx) = mpsc::unbounded_channel();
    let _holder = Worker::start(&mut cs, "held", 1, 1, false, htx).await;
    let mut j = job("held", after_trigger(0));
    j.ack_deadline = Some(ms(5_000));
    schedule(&mut cf, j).await;
    let mut held = Vec::new();
    collect_for(&mut hrx, &mut held, Duration::from_secs(4)).await;
    assert_eq!(
        held.len(),
        1,
        "delivered once within its deadline: {held:?}"
    );
}

/// A PostgreSQL server of the test's own (initdb in a temporary directory), that the test can
/// stop and start.
struct PrivateCluster {
    dir: tempfile::TempDir,
    port: u16,
    bin: std::path::PathBuf,
}

impl PrivateCluster {
    fn create() -> PrivateCluster {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .expect("PostgreSQL's binaries in /usr/lib/postgresql (apt install postgresql)")
            .filter_map(|e| e.ok())
            .map(|e| e.path().join("bin"))
            .find(|p| p.join("initdb").exists())
            .expect("initdb under /usr/lib/postgresql/*/bin");
        let dir = tempdir();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let cluster = PrivateCluster { dir, port, bin };
        // PostgreSQL refuses to run as root: run it as the postgres user then.
        if is_root() {
            let status = std::process::Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(cluster.dir.path())
                .status()
                .expect("chown");
            assert!(status.success());
        }
        cluster.run(
            "initdb",
            &[
                "-D",
                &cluster.data(),
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
            ],
        );
        cluster.start();
        cluster
    }

    fn data(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    fn run(&self, tool: &str, args: &[&str]) {
        let path = self.bin.join(tool);
        let mut command = if is_root() {
            let mut c = std::process::Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&path);
            c
        } else {
            std::process::Command::new(&path)
        };
        let out = command.args(args).output().expect(tool);
        assert!(
            out.status.success(),
            "{tool} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn start(&self) {
        let options = format!(
            "-p {} -c listen_addresses=127.0.0.1 -k {} -c fsync=off",
            self.port,
            self.dir.path().display()
        );
        let log = self.dir.path().join("log").display().to_string();
        self.run(
            "pg_ctl",
            &[
                "-D",
                &self.data(),
                "-o",
                &options,
                "-l",
                &log,
                "-w",
                "start",
            ],
        );
    }

    fn stop(&self) {
        self.run("pg_ctl", &["-D", &self.data(), "-m", "fast", "-w", "stop"]);
    }
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        let path = self.bin.join("pg_ctl");
        let data = self.data();
        let args = ["-D", data.as_str(), "-m", "immediate", "stop"];
        let _ = if is_root() {
            std::process::Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(&path)
                .args(args)
                .output()
        } else {
            std::process::Command::new(&path).args(args).output()
        };
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// The database restarts under two replicas: while it is down they answer UNAVAILABLE and
/// report NOT_SERVING; they come back by themselves when it is up; what was acked stays
/// acked, the job scheduled before is there, and the interval job goes on without a gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_restart_loses_nothing_acknowledged() {
    let cluster = PrivateCluster::create();
    let url = cluster.url();
    let a = TickdProcess::replica(&url, FAST);
    let b = TickdProcess::replica(&url, FAST);
    let (mut ca, mut cb) = (a.client().await, b.client().await);
    let (tx, mut rx) = mpsc::unbounded_channel();
    let _wa = Worker::start(&mut ca, "restart", 16, 0, true, tx.clone()).await;
    let _wb = Worker::start(&mut cb, "restart", 16, 1, true, tx).await;
    let mut kept = job("restart", after_trigger(3_600_000));
    kept.id = "kept".into();
    schedule(&mut ca, kept).await;
    schedule(&mut cb, every_job("restart", "ticker", 300)).await;
    let mut got = Vec::new();
    collect(
        &mut rx,
        &mut got,
        Duration::from_secs(10),
        "ticks before",
        |g| g.len() >= 3,
    )
    .await;
    // Acks are in by now (each was sent before the next fire was read, a few ms after).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = got.len();

    cluster.stop();
    for addr in [a.addr, b.addr] {
        wait_health(addr, "", ServingStatus::NotServing).await;
    }
    // What the chart's TickdDatabaseUnreachable alert reads.
    let metrics = scrape(a.metrics_addr).await;
    assert_eq!(
        [
            sample(
                &metrics,
                "tickd_health",
                &["tickd_health_state=\"store_failing\""]
            ),
            sample(
                &metrics,
                "tickd_health",
                &["tickd_health_state=\"serving\""]
            ),
            sample(&metrics, "tickd_info", &["tickd_store=\"postgres\""]),
        ],
        [Some(1.0), Some(0.0), Some(1.0)],
        "{metrics}"
    );
    let refused = tokio::time::timeout(
        Duration::from_secs(10),
        ca.schedule(pb::ScheduleRequest {
            job: Some(job("restart", after_trigger(1_000))),
            ..Default::default()
        }),
    )
    .await
    .expect("answered while the database is down");
    expect_code(refused, Code::Unavailable);
    collect_for(&mut rx, &mut got, Duration::from_secs(1)).await;

    cluster.start();
    for addr in [a.addr, b.addr] {
        wait_health(addr, "", ServingStatus::Serving).await;
    }
    let metrics = scrape(b.metrics_addr).await;
    assert_eq!(
        sample(
            &metrics,
            "tickd_health",
            &["tickd_health_state=\"serving\""]
        ),
        Some(1.0),
        "{metrics}"
    );
    let mut client = a.client().await;
    let job_kept = client
        .get_job(pb::GetJobRequest { id: "kept".into() })
        .await
        .expect("the job scheduled before")
        .into_inner();
    assert_eq!(job_kept.state(), pb::JobState::Scheduled);
    collect(
        &mut rx,
        &mut got,
        Duration::from_secs(15),
        "ticks after",
        |g| g.len() >= before + 20,
    )
    .await;
    // What the other worker received meanwhile is still in the channel.
    collect_for(&mut rx, &mut got, Duration::from_millis(500)).await;
    let acked_before: HashSet<&str> = got[..before].iter().map(|g| &*g.fire.fire_id).collect();
    for g in &got[before..] {
        assert!(
            !acked_before.contains(&*g.fire.fire_id),
            "{} was acked before the restart and came back",
            g.fire.fire_id
        );
    }
    assert_one_id_per_occurrence(&got);
    assert_no_gap(&got, 300);
}

/// Two replicas update one job at once, each with the etag it read: exactly one update is
/// made, the other is ABORTED; the job is the winner's on every replica.
#[tokio::test]
async fn concurrent_updates_on_two_replicas_one_wins() {
    let db = TestDatabase::create().await;
    let a = TickdProcess::replica(&db.url, FAST);
    let b = TickdProcess::replica(&db.url, FAST);
    let (mut ca, mut cb) = (a.client().await, b.client().await);
    let mut j = job("upd", every_trigger(3_600_000, None));
    j.id = "shared".into();
    let created = schedule(&mut ca, j).await;
    let request = |payload: &str| {
        let mut job = created.clone();
        job.payload = payload.as_bytes().to_vec().into();
        pb::UpdateJobRequest {
            job: Some(job),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["payload".into()],
            }),
        }
    };
    for round in 0..5 {
        let (ra, rb) = tokio::join!(
            ca.update_job(request(&format!("a{round}"))),
            cb.update_job(request(&format!("b{round}")))
        );
        let winners: Vec<pb::Job> = [ra, rb]
            .into_iter()
            .filter_map(|r| match r {
                Ok(j) => Some(j.into_inner()),
                Err(s) => {
                    assert_eq!(s.code(), Code::Aborted, "{s:?}");
                    None
                }
            })
            .collect();
        if round == 0 {
            assert_eq!(winners.len(), 1, "one update of the two was made");
            let seen = cb
                .get_job(pb::GetJobRequest {
                    id: "shared".into(),
                })
                .await
                .expect("get")
                .into_inner();
            assert_eq!(seen.payload, winners[0].payload);
            assert_eq!(seen.etag, winners[0].etag);
        } else {
            // Every later round carries the first read's etag: stale, refused on both.
            assert!(
                winners.is_empty(),
                "a stale etag changed the job: {winners:?}"
            );
        }
    }
}
