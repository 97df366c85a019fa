//! Soak test: tickd as a separate process under steady load for a long time, with its
//! resources sampled as it goes. Not a test and not in CI: run with
//! `cargo bench --bench soak -- SECONDS` (default 3,600) and read the table; flat columns
//! are the pass.
//!
//! Load: 100 jobs every second, one-shot jobs scheduled at 200/s (due 0–5 s later), four
//! subscribers on the queue acking 95% of fires and nacking the rest (retry after 100 ms),
//! each dropping its stream and reconnecting about once a minute (the fires it held come back
//! after their 5 s ack deadline). tickd runs with `--retention 1m`.
//!
//! Every 10 s it prints tickd's resident memory, the store file's size, tickd's open file
//! descriptors, the jobs and the backlog it reports, and the lateness of the fires received in
//! that window (receive time minus scheduled time).

mod common;

use common::*;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tickd::api::pb;
use tickd::api::pb::scheduler_client::SchedulerClient;
use tokio_stream::StreamExt;
use tonic::transport::Channel;

const RECURRING: usize = 100;
const ONE_SHOTS_PER_SECOND: u64 = 200;
const SUBSCRIBERS: usize = 4;
const SAMPLE_EVERY: Duration = Duration::from_secs(10);

/// A small xorshift generator: the load needs variety, not statistical quality.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Lateness of the fires received since the last sample, in microseconds.
#[derive(Default)]
struct Window {
    lateness: Mutex<Vec<i64>>,
    received: AtomicU64,
    acked: AtomicU64,
    nacked: AtomicU64,
    reconnects: AtomicU64,
}

fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

fn job(queue: &str, trigger: pb::trigger::Kind) -> pb::Job {
    pb::Job {
        queue: queue.into(),
        trigger: Some(pb::Trigger {
            kind: Some(trigger),
        }),
        payload: vec![b'x'; 100].into(),
        ack_deadline: Some(prost_types::Duration {
            seconds: 5,
            nanos: 0,
        }),
        ..Default::default()
    }
}

async fn subscriber(client: SchedulerClient<Channel>, seed: u64, window: Arc<Window>) {
    let mut rng = Rng(seed);
    loop {
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        let open = pb::SubscribeRequest {
            request: Some(pb::subscribe_request::Request::Open(pb::SubscribeOpen {
                queue: "soak".into(),
                max_in_flight: 100,
            })),
        };
        if tx.send(open).await.is_err() {
            return;
        }
        let mut client = client.clone();
        let Ok(response) = client
            .subscribe(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
        else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let mut fires = response.into_inner();
        // Drop the stream after about a minute (30–90 s).
        let until = Instant::now() + Duration::from_secs(30 + rng.below(60));
        while Instant::now() < until {
            let next = tokio::time::timeout(Duration::from_secs(1), fires.next()).await;
            let Ok(Some(Ok(fire))) = next else {
                if matches!(next, Ok(None) | Ok(Some(Err(_)))) {
                    break;
                }
                continue;
            };
            window.received.fetch_add(1, Ordering::Relaxed);
            if fire.attempt == 1 {
                let late = now_micros() - micros_of(&fire.scheduled_time);
                if let Ok(mut l) = window.lateness.lock() {
                    l.push(late);
                }
            }
            let request = if rng.below(100) < 5 {
                window.nacked.fetch_add(1, Ordering::Relaxed);
                pb::subscribe_request::Request::Nack(pb::NackFires {
                    fire_ids: vec![fire.fire_id],
                    retry_delay: Some(prost_types::Duration {
                        seconds: 0,
                        nanos: 100_000_000,
                    }),
                })
            } else {
                window.acked.fetch_add(1, Ordering::Relaxed);
                pb::subscribe_request::Request::Ack(pb::AckFires {
                    fire_ids: vec![fire.fire_id],
                })
            };
            if tx
                .send(pb::SubscribeRequest {
                    request: Some(request),
                })
                .await
                .is_err()
            {
                break;
            }
        }
        window.reconnects.fetch_add(1, Ordering::Relaxed);
    }
}

#[tokio::main]
async fn main() {
    let seconds: u64 = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(3_600);
    let tickd = common::Tickd::start(&["--retention", "1m"], &[]);
    let pid = tickd.child.id();
    let metrics_addr = tickd.metrics_addr.clone();
    let channel = tickd.channel().await;
    let client = SchedulerClient::new(channel);

    let window = Arc::new(Window::default());
    for i in 0..SUBSCRIBERS {
        tokio::spawn(subscriber(
            client.clone(),
            0x9e37_79b9_7f4a_7c15 ^ (i as u64 + 1),
            window.clone(),
        ));
    }
    let mut c = client.clone();
    for i in 0..RECURRING {
        let mut j = job(
            "soak",
            pb::trigger::Kind::Every(pb::Interval {
                period: Some(prost_types::Duration {
                    seconds: 1,
                    nanos: 0,
                }),
                ..Default::default()
            }),
        );
        j.id = format!("every-{i:03}");
        c.schedule(pb::ScheduleRequest {
            job: Some(j),
            ..Default::default()
        })
        .await
        .expect("schedule a recurring job");
    }
    let scheduled = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    {
        let client = client.clone();
        let scheduled = scheduled.clone();
        let failed = failed.clone();
        tokio::spawn(async move {
            let mut rng = Rng(0x2545_f491_4f6c_dd1d);
            let mut tick = tokio::time::interval(Duration::from_millis(50));
            loop {
                tick.tick().await;
                for _ in 0..ONE_SHOTS_PER_SECOND / 20 {
                    let mut c = client.clone();
                    let j = job(
                        "soak",
                        pb::trigger::Kind::After(prost_types::Duration {
                            seconds: rng.below(6) as i64,
                            nanos: 0,
                        }),
                    );
                    let scheduled = scheduled.clone();
                    let failed = failed.clone();
                    tokio::spawn(async move {
                        match c
                            .schedule(pb::ScheduleRequest {
                                job: Some(j),
                                ..Default::default()
                            })
                            .await
                        {
                            Ok(_) => scheduled.fetch_add(1, Ordering::Relaxed),
                            Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                        };
                    });
                }
            }
        });
    }

    println!(
        "{:>6} {:>8} {:>9} {:>5} {:>7} {:>7} {:>8} {:>8} {:>8} {:>8} {:>6} {:>6}",
        "secs",
        "rss_MiB",
        "store_MiB",
        "fds",
        "jobs",
        "backlog",
        "fires/s",
        "p50_ms",
        "p99_ms",
        "max_ms",
        "recon",
        "errors"
    );
    let started = Instant::now();
    let mut next = started + SAMPLE_EVERY;
    while started.elapsed() < Duration::from_secs(seconds) {
        tokio::time::sleep_until(next.into()).await;
        next += SAMPLE_EVERY;
        let mut late = std::mem::take(&mut *window.lateness.lock().expect("lock"));
        late.sort_unstable();
        let received = window.received.swap(0, Ordering::Relaxed);
        let text = scrape(&metrics_addr).await;
        println!(
            "{:>6} {:>8.1} {:>9.1} {:>5} {:>7} {:>7} {:>8.0} {:>8.1} {:>8.1} {:>8.1} {:>6} {:>6}",
            started.elapsed().as_secs(),
            rss_mib(pid),
            common::store_bytes(tickd.dir.path()) as f64 / 1_048_576.0,
            open_fds(pid),
            metric_sum(&text, "tickd_jobs"),
            metric_sum(&text, "tickd_queue_backlog"),
            received as f64 / SAMPLE_EVERY.as_secs_f64(),
            percentile(&late, 0.5),
            percentile(&late, 0.99),
            late.last().map_or(0.0, |m| *m as f64 / 1_000.0),
            window.reconnects.load(Ordering::Relaxed),
            failed.load(Ordering::Relaxed),
        );
    }
    println!(
        "scheduled {} one-shot jobs ({} refused), acked {}, nacked {}",
        scheduled.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed),
        window.acked.load(Ordering::Relaxed),
        window.nacked.load(Ordering::Relaxed)
    );
    drop(tickd);
}
