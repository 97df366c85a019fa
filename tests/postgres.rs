//! The PostgreSQL schema on a real server: migrations apply on a fresh database, also when
//! several replicas start at once, and applying them again changes nothing.
//!
//! Needs PostgreSQL at `TICKD_TEST_DATABASE_URL` (default
//! `postgres://postgres@127.0.0.1:5432/test`); each test creates a database of its own and
//! drops it. When the server cannot be reached the tests fail, saying how to start it.
//! Built only with `--features postgres-tests` (which `.ci/run` uses), so that `cargo test`
//! needs nothing but Rust.

#![cfg(feature = "postgres-tests")]

mod common;

use common::pg::TestDatabase;
use sqlx::Connection;
use sqlx::postgres::PgConnection;

/// Release limits with no backlog cap.
fn limits(batch: i64, catch_up_cap: usize) -> tickd::store::postgres::ReleaseLimits {
    tickd::store::postgres::ReleaseLimits {
        batch,
        catch_up_cap,
        max_backlog: usize::MAX,
    }
}

async fn tables(url: &str) -> Vec<String> {
    let mut conn = PgConnection::connect(url).await.expect("connect");
    let names: Vec<(String,)> = sqlx::query_as(
        "SELECT table_name::text FROM information_schema.tables \
         WHERE table_schema = 'public' ORDER BY table_name",
    )
    .fetch_all(&mut conn)
    .await
    .expect("list tables");
    names.into_iter().map(|(n,)| n).collect()
}

/// Three replicas starting at once on a fresh database: every one succeeds, the schema is
/// there once, and each migration is recorded once.
#[tokio::test]
async fn replicas_starting_at_once_migrate_once() {
    let db = TestDatabase::create().await;
    let runs: Vec<_> = (0..3)
        .map(|_| {
            let url = db.url.clone();
            tokio::spawn(async move { tickd::store::postgres::migrate(&url).await })
        })
        .collect();
    for run in runs {
        run.await.expect("task").expect("migrate");
    }
    assert_eq!(
        tables(&db.url).await,
        vec![
            "_sqlx_migrations",
            "tickd_fires",
            "tickd_jobs",
            "tickd_occurrences"
        ]
    );
    let mut conn = PgConnection::connect(&db.url).await.expect("connect");
    let applied: Vec<(i64, bool)> =
        sqlx::query_as("SELECT version, success FROM _sqlx_migrations ORDER BY version")
            .fetch_all(&mut conn)
            .await
            .expect("read migrations");
    assert_eq!(applied, vec![(1, true), (2, true), (3, true)]);
    assert_eq!(tickd::store::postgres::schema_version(), 3);
    let _ = conn.close().await;

    // Once more (a restart): nothing to do, nothing changed.
    tickd::store::postgres::migrate(&db.url)
        .await
        .expect("migrate again");
    assert_eq!(tables(&db.url).await.len(), 4);
}

/// A database that cannot be reached is a clear error, not a hang or a panic.
#[tokio::test]
async fn an_unreachable_database_is_a_clear_error() {
    let err = tickd::store::postgres::migrate("postgres://postgres@127.0.0.1:9/nowhere")
        .await
        .expect_err("nothing listens on port 9");
    assert!(
        err.to_string().contains("cannot connect to PostgreSQL"),
        "{err}"
    );
}

fn every_second_job(id: &str, created: tickd::domain::Timestamp) -> tickd::domain::Job {
    let spec = tickd::domain::JobSpec {
        id: id.into(),
        queue: "q".into(),
        trigger: tickd::domain::TriggerSpec::Every {
            period: 1_000_000,
            start_time: None,
            jitter: 0,
        },
        payload: bytes::Bytes::from_static(b"p"),
        labels: Default::default(),
        max_fires: 0,
        end_time: None,
        misfire_policy: tickd::domain::MisfirePolicy::FireAll,
        misfire_grace: 5_000_000,
        ack_deadline: 30_000_000,
        max_attempts: 10,
        dead_letter_queue: None,
        overlap_policy: Default::default(),
    };
    tickd::domain::Job::create(spec, created).expect("job")
}

/// Replicas racing for the same due jobs release each occurrence once: four release passes at
/// once over 20 jobs that each missed five occurrences insert 100 fires, each exactly once;
/// four replicas then lease them at once, each fire to exactly one, and any replica acks.
#[tokio::test]
async fn racing_replicas_release_each_occurrence_once() {
    use tickd::domain::Timestamp;
    let db = TestDatabase::create().await;
    let created = Timestamp(1_780_272_000_000_000);
    let first = tickd::store::postgres::PgStore::connect(&db.url, 8)
        .await
        .expect("connect");
    for i in 0..20 {
        assert!(
            first
                .insert_job(&every_second_job(&format!("job-{i:02}"), created))
                .await
                .expect("insert")
        );
    }
    let now = Timestamp(created.0 + 5_500_000);
    let passes: Vec<_> = (0..4)
        .map(|_| {
            let url = db.url.clone();
            tokio::spawn(async move {
                let replica = tickd::store::postgres::PgStore::connect(&url, 8)
                    .await
                    .expect("connect");
                let mut released = Vec::new();
                // A replica passes until nothing is due.
                loop {
                    let batch = replica
                        .release_due(Some(now), limits(3, 100), &|_, _| None)
                        .await
                        .expect("release")
                        .fires;
                    if batch.is_empty() {
                        break;
                    }
                    released.extend(batch.into_iter().map(|f| f.fire_id));
                }
                released
            })
        })
        .collect();
    let mut all = Vec::new();
    for pass in passes {
        all.extend(pass.await.expect("task"));
    }
    let total = all.len();
    all.sort();
    all.dedup();
    assert_eq!(total, 100, "every occurrence released");
    assert_eq!(all.len(), 100, "no occurrence released twice");
    let mut conn = PgConnection::connect(&db.url).await.expect("connect");
    let (rows,): (i64,) = sqlx::query_as("SELECT count(*) FROM tickd_fires")
        .fetch_one(&mut conn)
        .await
        .expect("count");
    assert_eq!(rows, 100);
    let (behind,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM tickd_jobs WHERE fire_count <> 5 OR next_due_at <> $1",
    )
    .bind(Timestamp(created.0 + 6_000_000).to_chrono().expect("time"))
    .fetch_one(&mut conn)
    .await
    .expect("count");
    assert_eq!(behind, 0, "every job moved on to its sixth occurrence");
    let _ = conn.close().await;

    // Four replicas leasing the queue at once: each fire leased to exactly one of them, for
    // its ack deadline (30 s) from the given time.
    let claims: Vec<_> = (0..4)
        .map(|r| {
            let url = db.url.clone();
            tokio::spawn(async move {
                let replica = tickd::store::postgres::PgStore::connect(&url, 8)
                    .await
                    .expect("connect");
                let mut leased = Vec::new();
                loop {
                    let batch = replica
                        .claim("q", 7, &format!("replica-{r}"), Some(now))
                        .await
                        .expect("claim");
                    if batch.is_empty() {
                        break;
                    }
                    leased.extend(batch);
                }
                leased
            })
        })
        .collect();
    let mut leases = Vec::new();
    for claim in claims {
        leases.extend(claim.await.expect("task"));
    }
    let mut ids: Vec<String> = leases.iter().map(|l| l.fire.fire_id.to_string()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(
        (leases.len(), ids.len()),
        (100, 100),
        "each fire leased once"
    );
    assert!(
        leases
            .iter()
            .all(|l| *l.spec.id() == *l.fire.job_id && l.spec.payload_bytes() == b"p"),
        "each lease carries its job's spec and payload"
    );
    assert!(
        leases
            .iter()
            .all(|l| l.expires_at.0 == now.0 + 30_000_000 && l.fire.attempt == 1)
    );
    let mut tokens: Vec<_> = leases.iter().map(|l| l.token).collect();
    tokens.sort();
    tokens.dedup();
    assert_eq!(tokens.len(), 100, "a token per lease");

    // Any replica acks, by id; a second ack finds nothing.
    assert_eq!(first.ack("q", &ids, None).await.expect("ack").len(), 100);
    assert_eq!(first.ack("q", &ids, None).await.expect("ack").len(), 0);
    assert!(
        first
            .claim("q", 10, "late", Some(now))
            .await
            .expect("claim")
            .is_empty()
    );
}

/// Leases are fenced by their token: once a lease expired and the fire went to another holder,
/// the first holder's nack and extend change nothing, while the new holder's do. Attempts count
/// up, the expiry backoff applies, and after the last attempt the fire moves to the dead-letter
/// queue.
#[tokio::test]
async fn a_stale_lease_changes_nothing() {
    use tickd::domain::Timestamp;
    let db = TestDatabase::create().await;
    let store = tickd::store::postgres::PgStore::connect(&db.url, 8)
        .await
        .expect("connect");
    let created = Timestamp(1_780_272_000_000_000);
    let mut job = every_second_job("one", created);
    let mut spec = job.spec.to_spec();
    spec.max_attempts = 3;
    spec.dead_letter_queue = Some("dead".into());
    job.spec = spec.into();
    store.insert_job(&job).await.expect("insert");
    let t = |s: i64| Some(Timestamp(created.0 + s * 1_000_000));
    assert_eq!(
        store
            .release_due(t(1), limits(10, 100), &|_, _| None)
            .await
            .expect("release")
            .fires
            .len(),
        1
    );

    let a = store
        .claim("q", 1, "a", t(1))
        .await
        .expect("claim")
        .remove(0);
    assert_eq!(a.fire.attempt, 1);
    // A's lease (30 s) expires; the reaper sends the fire out again after 1 s.
    assert_eq!(
        store
            .reap_expired(t(30), 10, 60_000_000)
            .await
            .expect("reap")
            .len(),
        0
    );
    assert_eq!(
        store
            .reap_expired(t(31), 10, 60_000_000)
            .await
            .expect("reap")
            .len(),
        1
    );
    assert!(
        store
            .claim("q", 1, "b", t(31))
            .await
            .expect("claim")
            .is_empty(),
        "backoff"
    );
    let b = store
        .claim("q", 1, "b", t(32))
        .await
        .expect("claim")
        .remove(0);
    assert_eq!((&*b.fire.fire_id, b.fire.attempt), (&*a.fire.fire_id, 2));

    // A wakes up: its nack and extend name a lease that is gone.
    assert!(
        store
            .nack(&a.fire.fire_id, a.token, 0, t(33))
            .await
            .expect("nack")
            .is_none()
    );
    assert!(
        !store
            .extend(&a.fire.fire_id, a.token, 600_000_000, t(33))
            .await
            .expect("extend")
    );
    assert!(
        store
            .claim("q", 1, "c", t(33))
            .await
            .expect("claim")
            .is_empty(),
        "still B's"
    );

    // B's own work counts: extend, then nack (attempt 3 after the nack's delay).
    assert!(
        store
            .extend(&b.fire.fire_id, b.token, 60_000_000, t(33))
            .await
            .expect("extend")
    );
    assert_eq!(
        store
            .reap_expired(t(62), 10, 60_000_000)
            .await
            .expect("reap")
            .len(),
        0,
        "extended"
    );
    assert!(
        store
            .nack(&b.fire.fire_id, b.token, 5_000_000, t(62))
            .await
            .expect("nack")
            .is_some()
    );
    assert!(
        store
            .claim("q", 1, "c", t(66))
            .await
            .expect("claim")
            .is_empty(),
        "nack delay"
    );
    let c = store
        .claim("q", 1, "c", t(67))
        .await
        .expect("claim")
        .remove(0);
    assert_eq!(c.fire.attempt, 3);

    // The last attempt fails: the fire moves to the dead-letter queue, attempt 1.
    assert!(
        store
            .nack(&c.fire.fire_id, c.token, 0, t(68))
            .await
            .expect("nack")
            .is_some()
    );
    assert!(
        store
            .claim("q", 1, "d", t(68))
            .await
            .expect("claim")
            .is_empty()
    );
    let dead = store
        .claim("dead", 1, "d", t(68))
        .await
        .expect("claim")
        .remove(0);
    assert_eq!(
        (
            &*dead.fire.fire_id,
            dead.fire.attempt,
            dead.fire.dead_lettered
        ),
        (&*a.fire.fire_id, 1, true)
    );
}

/// Job changes from any replica: pause stops releases, resume brings them back, cancel
/// finishes the job, a finished job cannot be paused, and delete takes the job and its fires.
#[tokio::test]
async fn job_changes_from_any_replica() {
    use tickd::domain::{JobState, Timestamp, Transition};
    let db = TestDatabase::create().await;
    let a = tickd::store::postgres::PgStore::connect(&db.url, 8)
        .await
        .expect("connect");
    let b = tickd::store::postgres::PgStore::connect(&db.url, 8)
        .await
        .expect("connect");
    let created = Timestamp(1_780_272_000_000_000);
    let t = |s: i64| Some(Timestamp(created.0 + s * 1_000_000));
    a.insert_job(&every_second_job("j", created))
        .await
        .expect("insert");
    assert!(
        !a.insert_job(&every_second_job("j", created))
            .await
            .expect("insert"),
        "id taken"
    );

    let none = |_: &_, _: &_| None;
    let state = |r: Option<Result<(tickd::domain::Job, _), _>>| {
        r.expect("found").expect("allowed").0.status.state
    };
    assert_eq!(
        state(
            b.transition("j", Transition::Pause, t(0), &limits(10, 100), &none)
                .await
                .expect("pause")
        ),
        JobState::Paused
    );
    assert!(
        a.release_due(t(3), limits(10, 100), &|_, _| None)
            .await
            .expect("release")
            .fires
            .is_empty(),
        "paused"
    );
    // The resume releases what fell due while paused, as a release would.
    let (resumed, on_resume) = b
        .transition("j", Transition::Resume, t(3), &limits(10, 100), &none)
        .await
        .expect("resume")
        .expect("found")
        .expect("allowed");
    assert_eq!(resumed.status.state, JobState::Scheduled);
    let mut released = on_resume.fires.len();
    loop {
        let n = a
            .release_due(t(3), limits(10, 100), &|_, _| None)
            .await
            .expect("release")
            .fires
            .len();
        if n == 0 {
            break;
        }
        released += n;
    }
    assert_eq!(
        released, 3,
        "the occurrences of 1, 2 and 3 s, late but within the grace"
    );

    let (cancelled, _) = a
        .transition("j", Transition::Cancel, t(4), &limits(10, 100), &none)
        .await
        .expect("cancel")
        .expect("found")
        .expect("allowed");
    assert_eq!(cancelled.status.state, JobState::Cancelled);
    assert_eq!(cancelled.status.finish_time, t(4));
    let read = b.get_job("j").await.expect("get").expect("found");
    assert_eq!(
        (read.status.state, read.status.finish_time),
        (JobState::Cancelled, t(4))
    );
    let refused = b
        .transition("j", Transition::Pause, t(5), &limits(10, 100), &none)
        .await
        .expect("pause")
        .expect("found");
    assert!(refused.is_err(), "a cancelled job cannot be paused");
    assert!(
        a.transition("nope", Transition::Cancel, t(5), &limits(10, 100), &none)
            .await
            .expect("cancel")
            .is_none()
    );

    assert_eq!(
        b.delete_job("j").await.expect("delete").map(|f| f.len()),
        Some(3),
        "its three fires dropped"
    );
    assert!(a.get_job("j").await.expect("get").is_none());
    assert!(a.claim("q", 10, "x", t(6)).await.expect("claim").is_empty());
    assert!(a.delete_job("j").await.expect("delete").is_none());
}

/// Listing pages through the jobs in id order (all, or one queue's), and retention deletes a
/// finished job once its time is up and no fire of it is outstanding.
#[tokio::test]
async fn listing_and_retention() {
    use tickd::domain::{Timestamp, Transition};
    let db = TestDatabase::create().await;
    let store = tickd::store::postgres::PgStore::connect(&db.url, 8)
        .await
        .expect("connect");
    let created = Timestamp(1_780_272_000_000_000);
    let t = |s: i64| Some(Timestamp(created.0 + s * 1_000_000));
    for i in 0..5 {
        let mut job = every_second_job(&format!("j{i}"), created);
        let mut spec = job.spec.to_spec();
        spec.labels
            .insert("parity".into(), ["even", "odd"][i % 2].into());
        job.spec = spec.into();
        store.insert_job(&job).await.expect("insert");
    }
    let none = std::collections::BTreeMap::new();
    let (page, more) = store
        .list_jobs(None, &[], &none, 2, None)
        .await
        .expect("list");
    let ids = |jobs: &[tickd::domain::Job]| {
        jobs.iter()
            .map(|j| j.spec.id().to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        (ids(&page), more),
        (vec!["j0".to_string(), "j1".into()], true)
    );
    let (page, more) = store
        .list_jobs(Some("q"), &[], &none, 10, Some("j2"))
        .await
        .expect("list");
    assert_eq!(
        (ids(&page), more),
        (vec!["j3".to_string(), "j4".into()], false)
    );
    assert!(
        store
            .list_jobs(Some("other"), &[], &none, 10, None)
            .await
            .expect("list")
            .0
            .is_empty()
    );

    let odd = std::collections::BTreeMap::from([("parity".to_string(), "odd".to_string())]);
    let (page, _) = store
        .list_jobs(None, &[], &odd, 10, None)
        .await
        .expect("list");
    assert_eq!(ids(&page), vec!["j1".to_string(), "j3".into()], "by label");

    // j0 has an outstanding fire when it is cancelled (jobs due at once go in id order); j1
    // has none.
    let released = store
        .release_due(t(1), limits(1, 100), &|_, _| None)
        .await
        .expect("release")
        .fires;
    assert_eq!(&*released[0].job_id, "j0");
    for id in ["j0", "j1"] {
        store
            .transition(id, Transition::Cancel, t(1), &limits(10, 100), &|_, _| None)
            .await
            .expect("cancel");
    }
    let cancelled = [tickd::domain::JobState::Cancelled];
    let (page, _) = store
        .list_jobs(None, &cancelled, &none, 10, None)
        .await
        .expect("list");
    assert_eq!(ids(&page), vec!["j0".to_string(), "j1".into()], "by state");
    let hour = 3_600_000_000;
    assert_eq!(
        store
            .delete_expired(t(3_600), hour, 10)
            .await
            .expect("retention"),
        0,
        "not yet"
    );
    assert_eq!(
        store
            .delete_expired(t(3_601), hour, 10)
            .await
            .expect("retention"),
        1
    );
    assert!(store.get_job("j1").await.expect("get").is_none());
    assert!(
        store.get_job("j0").await.expect("get").is_some(),
        "its fire is outstanding"
    );
    let fire = store
        .claim("q", 1, "w", t(3_601))
        .await
        .expect("claim")
        .remove(0);
    store
        .ack("q", &[fire.fire.fire_id.to_string()], None)
        .await
        .expect("ack");
    assert_eq!(
        store
            .delete_expired(t(3_601), hour, 10)
            .await
            .expect("retention"),
        1
    );
    assert!(store.get_job("j0").await.expect("get").is_none());
}

/// A release wakes the replicas listening: the queue that got new fires is named once the
/// release has committed.
#[tokio::test]
async fn a_release_wakes_listeners() {
    use tickd::domain::Timestamp;
    use tickd::store::postgres::{PgStore, Wakeup, Wakeups};
    let db = TestDatabase::create().await;
    let store = PgStore::connect(&db.url, 8).await.expect("connect");
    let mut wakeups = Wakeups::listen(&db.url).await.expect("listen");
    let created = Timestamp(1_780_272_000_000_000);
    store
        .insert_job(&every_second_job("w", created))
        .await
        .expect("insert");
    assert_eq!(
        store
            .release_due(
                Some(Timestamp(created.0 + 1_000_000)),
                limits(10, 100),
                &|_, _| None
            )
            .await
            .expect("release")
            .fires
            .len(),
        1
    );
    let woke = tokio::time::timeout(std::time::Duration::from_secs(10), wakeups.next())
        .await
        .expect("a wake-up in time")
        .expect("listening");
    assert_eq!(woke, Wakeup::Queue("q".into()));
}

/// A BUFFER_ONE job's held fire whose running fire ended without letting it go (a replica
/// that crashed between an ack's commit and the statement after it) is let go by the sweep
/// each retention pass runs; a held fire whose job still runs something is not.
#[tokio::test]
async fn a_held_fire_left_behind_is_swept() {
    use tickd::domain::{OverlapPolicy, Timestamp};
    let db = TestDatabase::create().await;
    let store = tickd::store::postgres::PgStore::connect(&db.url, 8)
        .await
        .expect("connect");
    let created = Timestamp(1_780_272_000_000_000);
    let mut job = every_second_job("b", created);
    let mut spec = job.spec.to_spec();
    spec.overlap_policy = OverlapPolicy::BufferOne;
    job.spec = spec.into();
    store.insert_job(&job).await.expect("insert");
    let t = |s: i64| Some(Timestamp(created.0 + s * 1_000_000));
    let release = |s| store.release_due(t(s), limits(10, 100), &|_, _| None);
    let first = release(1).await.expect("release").fires;
    assert_eq!((first.len(), first[0].held), (1, false));
    let second = release(2).await.expect("release").fires;
    assert_eq!((second.len(), second[0].held), (1, true));
    assert_eq!(
        store.claim("q", 10, "a", t(2)).await.expect("claim").len(),
        1
    );
    assert!(
        store
            .claim("q", 10, "a", t(2))
            .await
            .expect("claim")
            .is_empty()
    );
    // Something still runs: the sweep leaves the held fire alone.
    assert!(store.unhold_idle(t(2)).await.expect("sweep").is_empty());

    let mut conn = PgConnection::connect(&db.url).await.expect("connect");
    sqlx::query("DELETE FROM tickd_fires WHERE fire_id = $1")
        .bind(&*first[0].fire_id)
        .execute(&mut conn)
        .await
        .expect("delete");
    let _ = conn.close().await;
    assert!(
        store
            .claim("q", 10, "a", t(2))
            .await
            .expect("claim")
            .is_empty()
    );
    assert_eq!(
        store.unhold_idle(t(2)).await.expect("sweep"),
        vec!["q".to_string()]
    );
    let leased = store.claim("q", 10, "a", t(2)).await.expect("claim");
    assert_eq!(leased.len(), 1);
    assert_eq!(leased[0].fire.fire_id, second[0].fire_id);

    // Without the sweep: an ack lets the held fire go, also for a job that became
    // BUFFER_ONE (by UpdateJob) while its fire was out.
    let mut other = every_second_job("a", Timestamp(created.0 + 2_500_000));
    store.insert_job(&other).await.expect("insert");
    let released = store
        .release_due(t(4), limits(10, 100), &|_, _| None)
        .await
        .expect("release")
        .fires;
    let running: Vec<_> = released.iter().filter(|f| &*f.job_id == "a").collect();
    assert_eq!(running.len(), 1);
    let mut spec = other.spec.to_spec();
    spec.overlap_policy = OverlapPolicy::BufferOne;
    let etag = tickd::domain::job::etag(&other.spec);
    other = store
        .update(&spec, &etag, t(4))
        .await
        .expect("update")
        .expect("found")
        .expect("updated")
        .0;
    assert_eq!(other.spec.overlap_policy(), OverlapPolicy::BufferOne);
    let (held, disposition, _) = store
        .trigger("a", t(4), usize::MAX, &|_, _| None)
        .await
        .expect("trigger")
        .expect("found")
        .expect("triggered");
    assert_eq!(disposition, tickd::domain::Disposition::Held);
    let acked = store
        .ack("q", &[running[0].fire_id.to_string()], t(4))
        .await
        .expect("ack");
    assert_eq!(acked.len(), 1);
    let leased = store.claim("q", 10, "a", t(4)).await.expect("claim");
    assert!(
        leased.iter().any(|l| l.fire.fire_id == held.fire_id),
        "{leased:?}"
    );
}
