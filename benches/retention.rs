//! Memory and disk under a steady stream of one-shot jobs with retention. Not a test: run with
//! `cargo bench --bench retention` (optionally `-- JOBS`, default 200,000) and read the table.
//!
//! Schedules JOBS one-shot jobs due at once, in rounds of 10,000, on the embedded store with a
//! retention of 1 s; a subscriber acks every fire. After each round it prints the jobs the core
//! holds, resident memory and the store file's size. Flat columns are the pass: memory and disk
//! follow the jobs alive at a time, not the jobs ever scheduled.

mod common;

use common::*;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tickd::domain::{JobSpec, MisfirePolicy, TriggerSpec};
use tickd::scheduler::{Scheduler, SchedulerConfig, SystemClock};
use tickd::store::RedbStore;
use tokio_stream::StreamExt;

const ROUND: usize = 10_000;

fn one_shot(i: usize) -> JobSpec {
    JobSpec {
        id: format!("order-{i:08}").into(),
        queue: "reminders".into(),
        trigger: TriggerSpec::After { after: 0 },
        payload: Bytes::from(vec![b'x'; 200]),
        labels: Default::default(),
        max_fires: 0,
        end_time: None,
        misfire_policy: MisfirePolicy::FireOnce,
        misfire_grace: 5_000_000,
        ack_deadline: 30_000_000,
        max_attempts: 10,
        dead_letter_queue: None,
        overlap_policy: Default::default(),
    }
}

#[tokio::main]
async fn main() {
    let n: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(200_000);
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(RedbStore::open(dir.path()).expect("open store"));
    let core = Scheduler::start(
        store,
        Arc::new(SystemClock),
        SchedulerConfig {
            retention: 1_000_000,
            ..SchedulerConfig::default()
        },
    )
    .await
    .expect("start");
    let mut sub = core.subscribe("reminders", 10_000).expect("subscribe");
    let handle = sub.handle();
    let acker = tokio::spawn(async move {
        let mut acked = 0usize;
        while let Some(d) = sub.next().await {
            handle.ack(&[d.fire.fire_id.to_string()]);
            acked += 1;
        }
        acked
    });

    let started = Instant::now();
    println!(
        "{:>10} {:>10} {:>10} {:>12} {:>8}",
        "scheduled", "jobs_held", "rss_MiB", "store_MiB", "secs"
    );
    let mut scheduled = 0;
    while scheduled < n {
        let round: Vec<_> = (scheduled..(scheduled + ROUND).min(n))
            .map(|i| {
                let core = core.clone();
                tokio::spawn(async move { core.schedule(one_shot(i)).await })
            })
            .collect();
        for call in round {
            call.await.expect("task").expect("schedule");
        }
        scheduled = (scheduled + ROUND).min(n);
        // Let the round fire, be acked and pass its retention before sampling.
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        let store_bytes = common::store_bytes(dir.path());
        println!(
            "{:>10} {:>10} {:>10.1} {:>12.1} {:>8.1}",
            scheduled,
            core.job_count().await,
            rss_bytes() as f64 / 1_048_576.0,
            store_bytes as f64 / 1_048_576.0,
            started.elapsed().as_secs_f64()
        );
    }
    core.shutdown().await;
    let acked = acker.await.expect("acker");
    println!("fires acked: {acked}");
}
