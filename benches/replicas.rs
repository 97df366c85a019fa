//! The embedded store and PostgreSQL with 1 and 3 replicas, side by side in one run. Not a
//! test: run with `cargo bench --bench replicas` (optionally `-- SCALE`, default 1.0, which
//! multiplies every job count), read the table.
//!
//! Each tickd is a process of its own (the release binary, `common::Tickd`); this process is
//! the load client.
//! For PostgreSQL it creates a database of its own on `TICKD_BENCH_DATABASE_URL` (default
//! `postgres://postgres@127.0.0.1:5432/test`) per configuration and drops it after.
//!
//! Workloads, per configuration:
//! 1. **Schedule/s**: durable Schedules from 256 callers over 8 connections, spread over the
//!    replicas.
//! 2. **Fires/s delivered and acked**: that many jobs due at one instant, one worker stream per
//!    replica (max_in_flight 256) acking each fire on the stream; from the due instant to the
//!    last fire received.
//! 3. **Lateness at 1,000 fires/s**: one-shot jobs due every millisecond for 10 s; lateness is
//!    the time from a fire's scheduled time to its arrival at the worker.

mod common;

use common::*;
use std::time::Duration;

use sqlx::Connection;
use tickd::api::pb;
use tickd::api::pb::scheduler_client::SchedulerClient;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

const CONNECTIONS: usize = 8;

fn admin_url() -> String {
    std::env::var("TICKD_BENCH_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// A database of its own, dropped when the guard goes.
struct Database {
    name: String,
    url: String,
}

impl Database {
    async fn create() -> Database {
        let name = format!("tickd_bench_{}", uuid::Uuid::now_v7().simple());
        let mut conn = sqlx::postgres::PgConnection::connect(&admin_url())
            .await
            .expect("PostgreSQL at TICKD_BENCH_DATABASE_URL");
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut conn)
            .await
            .expect("create database");
        let _ = conn.close().await;
        let base = admin_url();
        let server = base.rsplit_once('/').map_or(base.as_str(), |(s, _)| s);
        Database {
            url: format!("{server}/{name}"),
            name,
        }
    }

    async fn drop_now(self) {
        if let Ok(mut conn) = sqlx::postgres::PgConnection::connect(&admin_url()).await {
            let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            )))
            .execute(&mut conn)
            .await;
        }
    }
}

/// One worker per replica on `queue`, acking every fire on its stream; sends each fire's
/// (scheduled time, arrival) in micros.
async fn workers(tickds: &[Tickd], queue: &str, out: mpsc::UnboundedSender<(i64, i64)>) {
    for t in tickds {
        let mut client = SchedulerClient::new(t.channel().await);
        let (tx, rx) = mpsc::channel(1024);
        tx.send(pb::SubscribeRequest {
            request: Some(pb::subscribe_request::Request::Open(pb::SubscribeOpen {
                queue: queue.into(),
                max_in_flight: 256,
            })),
        })
        .await
        .expect("open");
        let mut fires = client
            .subscribe(ReceiverStream::new(rx))
            .await
            .expect("subscribe")
            .into_inner();
        let out = out.clone();
        tokio::spawn(async move {
            while let Ok(Some(fire)) = fires.message().await {
                let _ = out.send((micros_of(&fire.scheduled_time), now_micros()));
                let ack = pb::SubscribeRequest {
                    request: Some(pb::subscribe_request::Request::Ack(pb::AckFires {
                        fire_ids: vec![fire.fire_id],
                    })),
                };
                if tx.send(ack).await.is_err() {
                    return;
                }
            }
        });
    }
}

async fn receive(rx: &mut mpsc::UnboundedReceiver<(i64, i64)>, n: usize) -> Vec<(i64, i64)> {
    let mut got = Vec::with_capacity(n);
    while got.len() < n {
        match tokio::time::timeout(Duration::from_secs(120), rx.recv()).await {
            Ok(Some(g)) => got.push(g),
            _ => panic!("only {} of {n} fires arrived", got.len()),
        }
    }
    got
}

struct Row {
    name: String,
    schedule_per_s: f64,
    fires_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

async fn measure(name: &str, tickds: &[Tickd], scale: f64) -> Row {
    let mut channels = Vec::new();
    for i in 0..CONNECTIONS {
        channels.push(tickds[i % tickds.len()].channel().await);
    }
    // 1. Schedule/s, jobs due in an hour.
    let n = (20_000.0 * scale) as usize;
    let far = now_micros() + 3_600_000_000;
    let took = schedule_all(&channels, n, "far", move |_| far).await;
    let schedule_per_s = n as f64 / took.as_secs_f64();
    // Room to schedule `n` more before they fall due: twice what the first took, plus 2 s.
    let lead = |n: usize| (2.0 * n as f64 / schedule_per_s * 1e6) as i64 + 2_000_000;

    // 2. Fires/s: n jobs due at one instant.
    let (tx, mut rx) = mpsc::unbounded_channel();
    workers(tickds, "burst", tx).await;
    let n = (20_000.0 * scale) as usize;
    let due = now_micros() + lead(n);
    schedule_all(&channels, n, "burst", move |_| due).await;
    let wait = due - now_micros();
    assert!(wait > 0, "scheduling the burst took longer than planned");
    tokio::time::sleep(Duration::from_micros(wait as u64)).await;
    let got = receive(&mut rx, n).await;
    let last = got.iter().map(|(_, at)| *at).max().unwrap_or(due);
    let fires_per_s = n as f64 / ((last - due) as f64 / 1e6);

    // 3. Lateness at 1,000 fires/s for 10 s.
    let (tx, mut rx) = mpsc::unbounded_channel();
    workers(tickds, "steady", tx).await;
    let n = (10_000.0 * scale) as usize;
    let start = now_micros() + lead(n);
    schedule_all(&channels, n, "steady", move |i| start + i as i64 * 1_000).await;
    assert!(now_micros() < start, "scheduling took longer than planned");
    let got = receive(&mut rx, n).await;
    let mut late: Vec<i64> = got.iter().map(|(s, at)| at - s).collect();
    late.sort_unstable();
    Row {
        name: name.to_string(),
        schedule_per_s,
        fires_per_s,
        p50_ms: percentile(&late, 0.5),
        p99_ms: percentile(&late, 0.99),
        max_ms: percentile(&late, 1.0),
    }
}

#[tokio::main]
async fn main() {
    let scale: f64 = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(1.0);
    let mut rows = Vec::new();
    {
        let embedded = [Tickd::start(&[], &[])];
        rows.push(measure("embedded (redb)", &embedded, scale).await);
    }
    for replicas in [1, 3] {
        let db = Database::create().await;
        {
            let tickds: Vec<Tickd> = (0..replicas)
                .map(|_| Tickd::start(&[], &[("TICKD_DATABASE_URL", db.url.as_str())]))
                .collect();
            let name = format!(
                "PostgreSQL, {replicas} replica{}",
                if replicas > 1 { "s" } else { "" }
            );
            rows.push(measure(&name, &tickds, scale).await);
        }
        db.drop_now().await;
    }
    println!(
        "\n{:<24} {:>12} {:>14} {:>16} {:>16} {:>16}",
        "store",
        "Schedule/s",
        "fires/s acked",
        "lateness p50 ms",
        "lateness p99 ms",
        "lateness max ms"
    );
    for r in rows {
        println!(
            "{:<24} {:>12.0} {:>14.0} {:>16.1} {:>16.1} {:>16.1}",
            r.name, r.schedule_per_s, r.fires_per_s, r.p50_ms, r.p99_ms, r.max_ms
        );
    }
    println!(
        "\n(lateness: 1,000 fires/s for 10 s, from scheduled time to arrival at the worker; \
         scale {scale})"
    );
}
