//! Throughput and memory of tickd on this machine. Not a test: run with
//! `cargo bench --bench throughput` (optionally `-- JOBS`), read the numbers.
//!
//! 1. Schedule rate through gRPC (real server, embedded store, fsync on commit), with many
//!    concurrent callers so that group commit can work.
//! 2. Memory per pending job: resident memory growth after scheduling them all.
//! 3. Simultaneous fires: that many jobs due at the same instant, received and acked by one
//!    subscriber; time from the due instant to the last fire received.
//! 4. Bulk create: that many jobs through BatchSchedule, 1,000 per call.

mod common;

use common::*;
use std::time::Instant;

use tickd::api::pb;
use tickd::api::pb::scheduler_client::SchedulerClient;
use tickd::config::Config;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

/// HTTP/2 connections the callers spread over (one connection is served by one task).
const CONNECTIONS: usize = 8;

#[tokio::main]
async fn main() {
    let n: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(100_000);
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = Config::defaults();
    config.data_dir = dir.path().to_path_buf();
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let listeners = tickd::api::Listeners {
        grpc: listener,
        metrics: TcpListener::bind("127.0.0.1:0").await.expect("bind"),
    };
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        tickd::api::run(listeners, &config, async {
            let _ = stopped.await;
        })
        .await
    });
    let mut channels = Vec::new();
    for _ in 0..CONNECTIONS {
        channels.push(
            Channel::from_shared(format!("http://{addr}"))
                .expect("uri")
                .connect()
                .await
                .expect("connect"),
        );
    }
    let channel = channels[0].clone();

    // 1 and 2: pending jobs, an hour out.
    let rss_before = rss_bytes();
    let took = {
        let at = now_micros() + 3_600_000_000;
        schedule_all(&channels, n, "pending", move |_| at)
    }
    .await;
    let rss_after = rss_bytes();
    println!(
        "schedule: {n} jobs in {:.2} s = {:.0} jobs/s ({CALLERS} concurrent callers on {CONNECTIONS} connections, fsync per group commit)",
        took.as_secs_f64(),
        n as f64 / took.as_secs_f64()
    );
    println!(
        "memory: {:.0} bytes resident per pending job (RSS {} MiB -> {} MiB; includes the client)",
        (rss_after.saturating_sub(rss_before)) as f64 / n as f64,
        rss_before / (1 << 20),
        rss_after / (1 << 20)
    );

    // 3: n jobs due at one instant, a few seconds out so that scheduling them finishes first.
    let due = now_micros() + 5_000_000 + (n as i64) * 200;
    let took = schedule_all(&channels, n, "burst", move |_| due).await;
    assert!(
        now_micros() < due,
        "scheduling took too long ({took:?}); lower JOBS"
    );
    let (tx, rx) = mpsc::channel(1024);
    tx.send(pb::SubscribeRequest {
        request: Some(pb::subscribe_request::Request::Open(pb::SubscribeOpen {
            queue: "burst".into(),
            max_in_flight: 10_000,
        })),
    })
    .await
    .expect("open");
    let mut fires = SchedulerClient::new(channel.clone())
        .subscribe(ReceiverStream::new(rx))
        .await
        .expect("subscribe")
        .into_inner();
    let mut received = 0;
    let mut batch = Vec::new();
    while received < n {
        let fire = fires.message().await.expect("stream").expect("fire");
        received += 1;
        batch.push(fire.fire_id);
        if batch.len() >= 256 || received == n {
            tx.send(pb::SubscribeRequest {
                request: Some(pb::subscribe_request::Request::Ack(pb::AckFires {
                    fire_ids: std::mem::take(&mut batch),
                })),
            })
            .await
            .expect("ack");
        }
    }
    let last = now_micros();
    println!(
        "burst: {n} jobs due at one instant, all received {:.2} s after it ({:.0} fires/s)",
        (last - due) as f64 / 1e6,
        n as f64 / ((last - due) as f64 / 1e6)
    );

    // 4: bulk create through BatchSchedule, 1,000 jobs per call, 8 calls in flight.
    let started = Instant::now();
    let calls = n.div_ceil(1_000);
    let mut tasks = Vec::new();
    for (c, channel) in channels.iter().enumerate() {
        let mut client = SchedulerClient::new(channel.clone());
        tasks.push(tokio::spawn(async move {
            for call in (c..calls).step_by(CONNECTIONS) {
                let requests = (call * 1_000..((call + 1) * 1_000).min(n))
                    .map(|i| pb::ScheduleRequest {
                        job: Some(pb::Job {
                            id: format!("bulk-{i}"),
                            queue: "bulk".into(),
                            trigger: Some(pb::Trigger {
                                kind: Some(pb::trigger::Kind::At(ts(now_micros() + 3_600_000_000))),
                            }),
                            payload: b"small payload".to_vec().into(),
                            ..Default::default()
                        }),
                    })
                    .collect();
                client
                    .batch_schedule(pb::BatchScheduleRequest { requests })
                    .await
                    .expect("batch schedule");
            }
        }));
    }
    for t in tasks {
        t.await.expect("caller");
    }
    let took = started.elapsed();
    println!(
        "bulk create: {n} jobs through BatchSchedule (1,000 per call, {CONNECTIONS} calls in flight) in {:.2} s = {:.0} jobs/s",
        took.as_secs_f64(),
        n as f64 / took.as_secs_f64()
    );

    let _ = stop.send(());
    let _ = server.await;
}
