//! Restart cost with many pending jobs. Not a test: run with `cargo bench --bench restart`
//! (optionally `-- JOBS`, default 1,000,000) and read the numbers.
//!
//! Writes JOBS interval jobs straight into an embedded store in batches of 10,000, then starts
//! the scheduler core on it and reports how long rebuilding memory took and how much resident
//! memory it added.

mod common;

use common::*;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use tickd::domain::{JobId, JobSpec, JobState, JobStatus, MisfirePolicy, Timestamp, TriggerSpec};
use tickd::scheduler::{Scheduler, SchedulerConfig, SystemClock};
use tickd::store::{DB_FILE_NAME, RedbStore, Store, Write};

const BATCH: usize = 10_000;
const HOUR_MICROS: i64 = 3_600_000_000;

fn job(i: usize, now: Timestamp) -> (Arc<JobSpec>, JobStatus) {
    let spec = JobSpec {
        id: format!("job-{i:08}").into(),
        queue: "q".into(),
        trigger: TriggerSpec::Every {
            period: HOUR_MICROS,
            start_time: None,
            jitter: 0,
        },
        payload: Bytes::from_static(b"small payload"),
        labels: Default::default(),
        max_fires: 0,
        end_time: None,
        misfire_policy: MisfirePolicy::FireOnce,
        misfire_grace: 5_000_000,
        ack_deadline: 30_000_000,
        max_attempts: 10,
        dead_letter_queue: None,
    };
    let status = JobStatus {
        state: JobState::Scheduled,
        next_occurrence: Some(now.plus(HOUR_MICROS)),
        fire_count: 0,
        create_time: now,
        last_fire_time: None,
        finish_time: None,
        trace: None,
    };
    (Arc::new(spec), status)
}

#[tokio::main]
async fn main() {
    let n: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let dir = tempfile::tempdir().expect("tempdir");
    let now = Timestamp::now_utc();
    {
        let store = RedbStore::open(dir.path()).expect("open");
        let started = Instant::now();
        for first in (0..n).step_by(BATCH) {
            let mut writes = Vec::with_capacity(2 * BATCH);
            for i in first..(first + BATCH).min(n) {
                let (spec, status) = job(i, now);
                let id: JobId = spec.id.clone();
                writes.push(Write::PutSpec(spec));
                writes.push(Write::PutStatus(id, status));
            }
            store.commit(&writes).expect("commit");
        }
        let took = started.elapsed();
        let size = std::fs::metadata(dir.path().join(DB_FILE_NAME)).map_or(0, |m| m.len());
        println!(
            "store: {n} jobs written in {:.2} s ({:.0} jobs/s in batches of {BATCH}); file {} MiB, {} bytes/job",
            took.as_secs_f64(),
            n as f64 / took.as_secs_f64(),
            size >> 20,
            size / n as u64
        );
    }

    let rss_before = rss_bytes();
    let started = Instant::now();
    let store = RedbStore::open(dir.path()).expect("reopen");
    let core = Scheduler::start(
        Arc::new(store),
        Arc::new(SystemClock),
        SchedulerConfig::default(),
    )
    .await
    .expect("start");
    let took = started.elapsed();
    let added = rss_bytes().saturating_sub(rss_before);
    println!(
        "restart: {} jobs rebuilt in {:.2} s; resident memory +{} MiB ({} bytes/job)",
        core.job_count().await,
        took.as_secs_f64(),
        added >> 20,
        added / n as u64
    );
    let started = Instant::now();
    let stats = core.stats();
    println!(
        "stats (what a /metrics scrape counts): {:.1} ms for {} jobs",
        started.elapsed().as_secs_f64() * 1e3,
        stats.jobs.iter().map(|(_, n)| n).sum::<u64>()
    );
    core.shutdown().await;
}
