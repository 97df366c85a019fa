//! The performance harness: each of tickd's workloads next to the floor it cannot beat on this
//! machine, measured in the same run, with the ratio. Not a test: run with
//!
//! ```text
//! cargo bench --bench perf                 # the full run (a few minutes)
//! cargo bench --bench perf -- --smoke      # seconds: shows the harness works, numbers mean nothing
//! cargo bench --bench perf -- --jobs 300000 --burst 50000 --seconds 3
//! cargo bench --bench perf -- --only schedule --tls   # tickd served over TLS
//! ```
//!
//! Processes: tickd (release build, embedded store, fsync on every commit) runs as a process of
//! its own, a fresh one per group of workloads. The floor for the RPC workloads is a no-op
//! server of the same gRPC service, also a process of its own (this binary again, with
//! `TICKD_PERF_ROLE=noop`): it answers Schedule and BatchSchedule with the jobs it was sent and
//! streams ready-made fires on Subscribe. The load client is this process, on a tokio runtime
//! of its own. Floors for the timing workloads are tokio timers in this process; the floor for
//! memory is a `BTreeMap` in this process holding the same jobs. Everything shares the
//! machine's cores, as a client and a server on one host do.
//!
//! Workloads:
//! - Schedule for `--seconds` with 1 connection × 64 calls in flight, then 4 × 256;
//! - bulk create: `--jobs` jobs through BatchSchedule, 1,000 per call, 4 calls in flight;
//! - memory per pending job once those jobs are held and the journal folded (64-byte payloads);
//! - restart with them: from starting the process to serving;
//! - burst: `--burst` jobs due at one instant, one subscriber (10,000 in flight), acks batched:
//!   when the last fire arrives after the instant, and fires/s delivered and acked;
//! - lateness: `--burst` jobs spread evenly over `--seconds` (20,000/s by default), one
//!   subscriber: how late each fire arrives after its scheduled time.

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use common::*;
use tickd::api::pb;
use tickd::api::pb::scheduler_client::SchedulerClient;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Request, Response, Status, Streaming};

/// Bytes of payload per job (the issue's workload).
const PAYLOAD: [u8; 64] = [7u8; 64];
/// Jobs per BatchSchedule call.
const PER_BATCH: usize = 1_000;
/// Fires a subscriber may hold un-acked.
const MAX_IN_FLIGHT: u32 = 10_000;

#[derive(Parser, Debug)]
#[command(about = "tickd's performance harness: each workload next to its floor")]
struct Opts {
    /// Pending jobs for bulk create, memory and restart.
    #[arg(long, default_value_t = 1_000_000)]
    jobs: usize,
    /// Jobs due at one instant; also the jobs of the lateness workload.
    #[arg(long, default_value_t = 100_000)]
    burst: usize,
    /// Seconds per rate workload (Schedule) and over which the lateness jobs are spread.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// A run of seconds that only shows the harness works (small sizes).
    #[arg(long)]
    smoke: bool,
    /// Only these groups of workloads (schedule, bulk, fires); all when not given.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Serve tickd over TLS (a certificate made for the run) and call it over TLS; the
    /// no-op floor stays plaintext.
    #[arg(long)]
    tls: bool,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

impl Opts {
    fn runs(&self, group: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|g| g == group)
    }

    /// A fresh tickd, over TLS with `--tls`.
    fn tickd(&self) -> Tickd {
        let Some(tls) = &self.tls.then(tls_files) else {
            return Tickd::start(&[], &[]);
        };
        let cert = tls.dir.path().join("tls.crt");
        let key = tls.dir.path().join("tls.key");
        let (cert, key) = (cert.display().to_string(), key.display().to_string());
        let tickd = Tickd::start(&["--tls-cert", &cert, "--tls-key", &key], &[]);
        if let Ok(mut addrs) = TLS_ADDRS.lock() {
            addrs.push(tickd.addr.clone());
        }
        tickd
    }
}

/// The run's TLS certificate (with `--tls`).
struct TlsFiles {
    dir: tempfile::TempDir,
    ca_pem: String,
}

static TLS: std::sync::OnceLock<TlsFiles> = std::sync::OnceLock::new();
/// Addresses served over TLS.
static TLS_ADDRS: Mutex<Vec<String>> = Mutex::new(Vec::new());

fn tls_files() -> &'static TlsFiles {
    TLS.get_or_init(|| {
        let key = rcgen::KeyPair::generate().expect("key");
        let params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).expect("params");
        let cert = params.self_signed(&key).expect("certificate");
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("tls.crt"), cert.pem()).expect("write");
        std::fs::write(dir.path().join("tls.key"), key.serialize_pem()).expect("write");
        TlsFiles {
            dir,
            ca_pem: cert.pem(),
        }
    })
}

fn main() {
    match std::env::var("TICKD_PERF_ROLE").as_deref() {
        Ok("noop") => return noop::serve(),
        Ok("btree") => return btree_floor(),
        _ => {}
    }
    let mut opts = Opts::parse();
    if opts.smoke {
        opts.jobs = opts.jobs.min(5_000);
        opts.burst = opts.burst.min(2_000);
        opts.seconds = opts.seconds.min(0.5);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let rows = runtime.block_on(run(&opts));
    print_table(&opts, &rows);
}

/// One line of the report.
struct Row {
    workload: String,
    tickd: String,
    floor: String,
    /// tickd's figure over the floor's, where both are rates or sizes.
    ratio: Option<f64>,
    goal: &'static str,
}

async fn run(opts: &Opts) -> Vec<Row> {
    let mut rows = Vec::new();
    let noop = Noop::start();

    // Schedule, against a fresh tickd.
    if opts.runs("schedule") {
        let tickd = opts.tickd();
        let (p50, p99) = fdatasync_floor(tickd.dir.path());
        rows.push(Row {
            workload: "one durable commit (what a Schedule waits for at least)".into(),
            tickd: String::new(),
            floor: format!(
                "write 4 KiB + fdatasync on the data directory's disk: p50 {p50:.2} ms, p99 {p99:.2} ms"
            ),
            ratio: None,
            goal: "",
        });
        for (connections, in_flight) in [(1, 64), (4, 256)] {
            let before = Commits::read(&tickd.metrics_addr).await;
            let t = schedule_for(
                &tickd.addr,
                tickd.pid(),
                connections,
                in_flight,
                opts.seconds,
            )
            .await;
            let store = Commits::read(&tickd.metrics_addr).await.since(before);
            let f = schedule_for(
                &noop.addr,
                noop.child.id(),
                connections,
                in_flight,
                opts.seconds,
            )
            .await;
            rows.push(Row {
                workload: format!(
                    "Schedule, {connections} connection(s) × {in_flight} in flight, durable"
                ),
                tickd: format!(
                    "{}/s, p99 {:.1} ms, {:.0} µs CPU a call ({})",
                    num(t.rate),
                    t.p99_ms,
                    t.cpu_us,
                    store.describe()
                ),
                floor: format!(
                    "no-op server {}/s, p99 {:.1} ms, {:.0} µs CPU a call",
                    num(f.rate),
                    f.p99_ms,
                    f.cpu_us
                ),
                ratio: Some(t.rate / f.rate),
                goal: if connections == 1 {
                    "≥ 0.7× the no-op rate, p99 ≤ 10 ms"
                } else {
                    ""
                },
            });
        }
    }

    // Bulk create, memory per pending job and restart, against a fresh tickd.
    if opts.runs("bulk") {
        let mut tickd = opts.tickd();
        let rss_empty = tickd.rss_bytes();
        let cpu_before = common::cpu_seconds(tickd.pid());
        let t = bulk_create(&tickd.addr, opts.jobs).await;
        let cpu = common::cpu_seconds(tickd.pid()) - cpu_before;
        let f = bulk_create(&noop.addr, opts.jobs).await;
        rows.push(Row {
            workload: format!(
                "bulk create, {} jobs, BatchSchedule of {PER_BATCH}, 4 in flight",
                num(opts.jobs as f64)
            ),
            tickd: format!(
                "{} jobs/s, {:.1} µs of tickd CPU a job",
                num(t),
                cpu * 1e6 / opts.jobs as f64
            ),
            floor: format!("no-op server {} jobs/s", num(f)),
            ratio: Some(t / f),
            goal: "≥ 300,000 jobs/s",
        });
        // Let the last commits settle, and the checkpointer fold what the journal holds (its
        // buffers are not memory held for jobs), before reading resident memory.
        let folding = Instant::now();
        while folding.elapsed() < Duration::from_secs(30)
            && common::store_files(tickd.dir.path())
                .iter()
                .filter(|f| f.to_string_lossy().ends_with(".log"))
                .count()
                > 1
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let per_job = tickd.rss_bytes().saturating_sub(rss_empty) as f64 / opts.jobs as f64;
        let floor = btree_floor_of(opts.jobs);
        rows.push(Row {
            workload: format!("memory per pending job, {} jobs", num(opts.jobs as f64)),
            tickd: format!("{per_job:.0} B"),
            floor: format!("BTreeMap entry {floor:.0} B"),
            ratio: Some(per_job / floor),
            goal: "≤ 365 B at 1,000,000 jobs",
        });
        let read = Instant::now();
        let bytes: usize = common::store_files(tickd.dir.path())
            .iter()
            .map(|f| std::fs::read(f).map_or(0, |b| b.len()))
            .sum();
        let read = read.elapsed();
        let took = tickd.restart(&[]);
        let per_job_after = tickd.rss_bytes().saturating_sub(rss_empty) as f64 / opts.jobs as f64;
        rows.push(Row {
            workload: format!(
                "restart with {} pending jobs, to serving",
                num(opts.jobs as f64)
            ),
            tickd: format!(
                "{:.2} s ({per_job_after:.0} B/job after)",
                took.as_secs_f64()
            ),
            floor: format!(
                "reading the {:.0} MiB store (redb file and journal) {:.2} s",
                bytes as f64 / 1_048_576.0,
                read.as_secs_f64()
            ),
            ratio: Some(took.as_secs_f64() / read.as_secs_f64().max(1e-6)),
            goal: "≤ 3 s with 1,000,000 jobs",
        });
    }

    // Burst, saturation and lateness, against a fresh tickd.
    if opts.runs("fires") {
        let tickd = opts.tickd();
        let n = opts.burst;
        let burst = fires(&tickd, "burst", n, 0.0).await;
        let store = burst
            .store
            .as_ref()
            .map_or(String::new(), |s| format!(" ({})", s.describe()));
        let floor = timers(n, 0.0).await;
        rows.push(Row {
            workload: format!("{} jobs due at one instant, one subscriber", num(n as f64)),
            tickd: format!(
                "last received {:.0} ms after, {:.1} µs of tickd CPU a fire{store}",
                burst.last_ms,
                burst.cpu_us.unwrap_or(0.0)
            ),
            floor: format!(
                "tokio timers in-process: last woke {:.0} ms after",
                floor.last_ms
            ),
            ratio: Some(burst.last_ms / floor.last_ms.max(0.001)),
            goal: "≤ 250 ms",
        });
        let stream = noop_stream(&noop.addr, n).await;
        rows.push(Row {
            workload: "fires/s delivered and acked at saturation (the burst)".into(),
            tickd: format!(
                "{}/s delivered, {}/s acked",
                num(burst.delivered_rate),
                num(burst.acked_rate)
            ),
            floor: format!("no-op server stream {} fires/s", num(stream)),
            ratio: Some(burst.acked_rate / stream),
            goal: "",
        });
        let rate = n as f64 / opts.seconds;
        let spread = fires(&tickd, "spread", n, opts.seconds).await;
        let floor = timers(n, opts.seconds).await;
        rows.push(Row {
            workload: format!("{} fires/s over {} s, lateness", num(rate), opts.seconds),
            tickd: format!("p50 {:.2} ms, p99 {:.2} ms", spread.p50_ms, spread.p99_ms),
            floor: format!(
                "tokio timers in-process: p50 {:.2} ms, p99 {:.2} ms",
                floor.p50_ms, floor.p99_ms
            ),
            ratio: None,
            goal: "p50 ≤ 1.5 ms, p99 ≤ 5 ms",
        });
    }
    rows
}

/// `n` rounded, with thousands separated by commas.
fn num(x: f64) -> String {
    let digits = format!("{:.0}", x.abs());
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if x < 0.0 { format!("-{out}") } else { out }
}

fn print_table(opts: &Opts, rows: &[Row]) {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!();
    println!(
        "tickd performance, {cores} cores{}",
        if opts.smoke {
            " (smoke run: sizes too small for the numbers to mean anything)"
        } else {
            ""
        }
    );
    println!();
    println!("| workload | tickd | floor, same run | tickd / floor | goal |");
    println!("|---|---|---|---|---|");
    for row in rows {
        println!(
            "| {} | {} | {} | {} | {} |",
            row.workload,
            row.tickd,
            row.floor,
            row.ratio.map_or(String::new(), |r| format!("{r:.2}×")),
            row.goal
        );
    }
}

async fn connect(addr: &str) -> Channel {
    let tls = TLS_ADDRS.lock().is_ok_and(|a| a.iter().any(|t| t == addr));
    if tls {
        let config = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(&tls_files().ca_pem))
            .domain_name("localhost");
        return Channel::from_shared(format!("https://{addr}"))
            .expect("uri")
            .tls_config(config)
            .expect("TLS config")
            .connect()
            .await
            .expect("connect");
    }
    Channel::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect()
        .await
        .expect("connect")
}

fn job(id: String, queue: &str, due: i64) -> pb::Job {
    pb::Job {
        id,
        queue: queue.into(),
        trigger: Some(pb::Trigger {
            kind: Some(pb::trigger::Kind::At(ts(due))),
        }),
        payload: PAYLOAD.to_vec().into(),
        // Late fires of a saturated server still count as delivered, not missed.
        misfire_grace_period: Some(prost_types::Duration {
            seconds: 3_600,
            nanos: 0,
        }),
        ..Default::default()
    }
}

struct Rate {
    rate: f64,
    p99_ms: f64,
    /// The server's CPU time per call (user + system), in microseconds.
    cpu_us: f64,
}

/// Calls Schedule for `seconds` from `connections` × `in_flight` callers, each job an hour out.
async fn schedule_for(
    addr: &str,
    pid: u32,
    connections: usize,
    in_flight: usize,
    seconds: f64,
) -> Rate {
    static RUN: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let run = RUN.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut channels = Vec::new();
    for _ in 0..connections {
        channels.push(connect(addr).await);
    }
    let due = now_micros() + 3_600_000_000;
    let cpu_before = common::cpu_seconds(pid);
    let started = Instant::now();
    let until = started + Duration::from_secs_f64(seconds);
    let mut tasks = Vec::new();
    for c in 0..connections * in_flight {
        let mut client = SchedulerClient::new(channels[c % connections].clone());
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut i = 0;
            while Instant::now() < until {
                let call = Instant::now();
                client
                    .schedule(pb::ScheduleRequest {
                        job: Some(job(format!("s{run}-{c}-{i}"), "pending", due)),
                        ..Default::default()
                    })
                    .await
                    .expect("schedule");
                latencies.push(call.elapsed().as_micros() as i64);
                i += 1;
            }
            latencies
        }));
    }
    let mut latencies = Vec::new();
    for t in tasks {
        latencies.extend(t.await.expect("caller"));
    }
    let took = started.elapsed().as_secs_f64();
    let cpu = common::cpu_seconds(pid) - cpu_before;
    latencies.sort_unstable();
    Rate {
        rate: latencies.len() as f64 / took,
        p99_ms: percentile(&latencies, 0.99),
        cpu_us: cpu * 1e6 / latencies.len().max(1) as f64,
    }
}

/// The floor of any durable answer: writing 4 KiB into a file in `dir` and waiting for
/// `fdatasync`, 200 times; p50 and p99 in milliseconds.
fn fdatasync_floor(dir: &std::path::Path) -> (f64, f64) {
    use std::io::{Seek, Write};
    let path = dir.join("fdatasync-floor");
    let mut file = std::fs::File::create(&path).expect("create a file in the data directory");
    let mut times = Vec::new();
    for i in 0..200u32 {
        let started = Instant::now();
        file.seek(std::io::SeekFrom::Start(0)).expect("seek");
        file.write_all(&[i as u8; 4096]).expect("write");
        file.sync_data().expect("fdatasync");
        times.push(started.elapsed().as_micros() as i64);
    }
    let _ = std::fs::remove_file(path);
    times.sort_unstable();
    (percentile(&times, 0.5), percentile(&times, 0.99))
}

/// Jobs `<prefix>-<i>` for `0..n`, due at `due(i)`, as BatchSchedule requests of [`PER_BATCH`].
fn batches(prefix: &str, n: usize, due: impl Fn(usize) -> i64) -> Vec<pb::BatchScheduleRequest> {
    (0..n)
        .step_by(PER_BATCH)
        .map(|first| pb::BatchScheduleRequest {
            requests: (first..(first + PER_BATCH).min(n))
                .map(|i| pb::ScheduleRequest {
                    job: Some(job(format!("{prefix}-{i}"), prefix, due(i))),
                    ..Default::default()
                })
                .collect(),
        })
        .collect()
}

/// Sends `requests` as BatchSchedule calls, 4 in flight on one connection each.
async fn send_batches(addr: &str, requests: Vec<pb::BatchScheduleRequest>) {
    let requests = Arc::new(Mutex::new(requests.into_iter()));
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let mut client = SchedulerClient::new(connect(addr).await)
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20);
        let requests = requests.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let next = requests.lock().expect("requests").next();
                let Some(request) = next else { break };
                client
                    .batch_schedule(request)
                    .await
                    .expect("batch schedule");
            }
        }));
    }
    for t in tasks {
        t.await.expect("caller");
    }
}

/// Creates `n` pending jobs (an hour out) through BatchSchedule; answers jobs/s. The requests
/// are built before the clock starts.
async fn bulk_create(addr: &str, n: usize) -> f64 {
    let due = now_micros() + 3_600_000_000;
    let requests = batches("bulk", n, |_| due);
    let started = Instant::now();
    send_batches(addr, requests).await;
    n as f64 / started.elapsed().as_secs_f64()
}

/// Resident bytes per entry of a `BTreeMap` holding `n` jobs like the bulk ones, measured in
/// a fresh process (this binary again) so that no memory freed earlier is reused.
fn btree_floor_of(n: usize) -> f64 {
    let exe = std::env::current_exe().expect("this binary");
    let out = std::process::Command::new(exe)
        .env("TICKD_PERF_ROLE", "btree")
        .env("TICKD_PERF_JOBS", n.to_string())
        .output()
        .expect("run the BTreeMap floor");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("the BTreeMap floor prints bytes per entry")
}

/// The floor for memory: a `BTreeMap` of `TICKD_PERF_JOBS` jobs (id, queue, due time, 64-byte
/// payload); prints resident bytes per entry.
fn btree_floor() {
    #[allow(dead_code)]
    struct Entry {
        queue: String,
        due: i64,
        payload: Vec<u8>,
    }
    let n: usize = std::env::var("TICKD_PERF_JOBS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(1_000_000);
    let before = rss_bytes();
    let map: BTreeMap<String, Entry> = (0..n)
        .map(|i| {
            (
                format!("bulk-{i}"),
                Entry {
                    queue: "bulk".into(),
                    due: i as i64,
                    payload: PAYLOAD.to_vec(),
                },
            )
        })
        .collect();
    let per = rss_bytes().saturating_sub(before) as f64 / n as f64;
    std::hint::black_box(&map);
    println!("{per}");
}

struct Fires {
    /// Milliseconds from the last scheduled time to the last fire received.
    last_ms: f64,
    p50_ms: f64,
    p99_ms: f64,
    /// Fires/s from the first scheduled time to the last fire received.
    delivered_rate: f64,
    /// Fires/s from the first scheduled time until the last ack is on disk.
    acked_rate: f64,
    /// What the store did from the first scheduled time until the last ack (tickd only).
    store: Option<Commits>,
    /// tickd's CPU time (all threads) from the subscription until the last ack, per fire, in
    /// microseconds (tickd only).
    cpu_us: Option<f64>,
}

/// Store commits, from tickd's metrics.
#[derive(Debug, Clone, Copy)]
struct Commits {
    commits: f64,
    writes: f64,
    seconds: f64,
}

impl Commits {
    async fn read(metrics_addr: &str) -> Commits {
        let text = scrape(metrics_addr).await;
        Commits {
            commits: metric_sum(&text, "tickd_store_commit_duration_seconds_count"),
            writes: metric_sum(&text, "tickd_store_commit_writes_sum"),
            seconds: metric_sum(&text, "tickd_store_commit_duration_seconds_sum"),
        }
    }

    /// How many commits, how large, and how long they took in all.
    fn describe(&self) -> String {
        format!(
            "writer: {} commits of {} writes, {:.0} ms committing",
            num(self.commits),
            num(self.writes / self.commits.max(1.0)),
            self.seconds * 1e3
        )
    }

    fn since(self, before: Commits) -> Commits {
        Commits {
            commits: self.commits - before.commits,
            writes: self.writes - before.writes,
            seconds: self.seconds - before.seconds,
        }
    }
}

/// Schedules `n` one-shot jobs on a queue of their own, due evenly over `spread` seconds from
/// a moment that leaves time to create them, subscribes before they fall due, acks each fire
/// (batched; the last batch through the unary Ack, which answers once acks are on disk), and
/// measures when each fire arrived against its scheduled time.
async fn fires(tickd: &Tickd, queue: &str, n: usize, spread: f64) -> Fires {
    let addr = tickd.addr.as_str();
    let start = now_micros() + 2_000_000 + n as i64 * 20;
    let step = (spread * 1e6 / n as f64) as i64;
    let requests = batches(queue, n, |i| start + i as i64 * step);
    send_batches(addr, requests).await;
    assert!(
        now_micros() < start,
        "creating the jobs took longer than planned; lower --burst"
    );
    let commits = Commits::read(&tickd.metrics_addr).await;
    let cpu_before = common::cpu_seconds(tickd.pid());
    let channel = connect(addr).await;
    let (tx, rx) = mpsc::channel(1024);
    tx.send(pb::SubscribeRequest {
        request: Some(pb::subscribe_request::Request::Open(pb::SubscribeOpen {
            queue: queue.into(),
            max_in_flight: MAX_IN_FLIGHT,
        })),
    })
    .await
    .expect("open");
    let mut stream = SchedulerClient::new(channel.clone())
        .subscribe(ReceiverStream::new(rx))
        .await
        .expect("subscribe")
        .into_inner();
    let mut lateness = Vec::with_capacity(n);
    let mut pending = Vec::new();
    let mut last = 0;
    while lateness.len() < n {
        let fire = stream.message().await.expect("stream").expect("fire");
        last = now_micros();
        lateness.push(last - micros_of(&fire.scheduled_time));
        pending.push(fire.fire_id);
        if lateness.len() == n {
            break;
        }
        if pending.len() >= 256 {
            tx.send(pb::SubscribeRequest {
                request: Some(pb::subscribe_request::Request::Ack(pb::AckFires {
                    fire_ids: std::mem::take(&mut pending),
                })),
            })
            .await
            .expect("ack");
        }
    }
    SchedulerClient::new(channel)
        .ack(pb::AckRequest {
            queue: queue.into(),
            fire_ids: pending,
        })
        .await
        .expect("ack");
    let acked = now_micros();
    let cpu = common::cpu_seconds(tickd.pid()) - cpu_before;
    let commits = Commits::read(&tickd.metrics_addr).await.since(commits);
    lateness.sort_unstable();
    let end = start + (n as i64 - 1) * step;
    Fires {
        last_ms: (last - end) as f64 / 1e3,
        p50_ms: percentile(&lateness, 0.5),
        p99_ms: percentile(&lateness, 0.99),
        delivered_rate: n as f64 / ((last - start) as f64 / 1e6),
        acked_rate: n as f64 / ((acked - start) as f64 / 1e6),
        store: Some(commits),
        cpu_us: Some(cpu * 1e6 / n as f64),
    }
}

/// The floor of [`fires`]: `n` tokio timers in this process, due as those jobs are.
async fn timers(n: usize, spread: f64) -> Fires {
    let (base, base_micros) = (Instant::now(), now_micros());
    let start = base_micros + 1_000_000;
    let step = (spread * 1e6 / n as f64) as i64;
    let (tx, mut rx) = mpsc::unbounded_channel();
    for i in 0..n {
        let due = start + i as i64 * step;
        let at = base + Duration::from_micros((due - base_micros) as u64);
        let tx = tx.clone();
        tokio::spawn(async move {
            tokio::time::sleep_until(at.into()).await;
            let _ = tx.send(now_micros() - due);
        });
    }
    drop(tx);
    let mut lateness = Vec::with_capacity(n);
    while let Some(late) = rx.recv().await {
        lateness.push(late);
    }
    let last = now_micros();
    lateness.sort_unstable();
    Fires {
        last_ms: lateness.last().map_or(0.0, |l| *l as f64 / 1e3),
        p50_ms: percentile(&lateness, 0.5),
        p99_ms: percentile(&lateness, 0.99),
        delivered_rate: n as f64 / ((last - start) as f64 / 1e6),
        acked_rate: 0.0,
        store: None,
        cpu_us: None,
    }
}

/// Fires/s the no-op server streams to one subscriber.
async fn noop_stream(addr: &str, n: usize) -> f64 {
    let (tx, rx) = mpsc::channel(1);
    tx.send(pb::SubscribeRequest {
        request: Some(pb::subscribe_request::Request::Open(pb::SubscribeOpen {
            queue: format!("stream-{n}"),
            max_in_flight: MAX_IN_FLIGHT,
        })),
    })
    .await
    .expect("open");
    let mut stream = SchedulerClient::new(connect(addr).await)
        .subscribe(ReceiverStream::new(rx))
        .await
        .expect("subscribe")
        .into_inner();
    let started = Instant::now();
    let mut received = 0;
    while let Some(fire) = stream.next().await {
        fire.expect("fire");
        received += 1;
    }
    assert_eq!(received, n, "the no-op server streams every fire");
    n as f64 / started.elapsed().as_secs_f64()
}

/// The no-op server as a process of its own.
struct Noop {
    child: std::process::Child,
    addr: String,
}

impl Noop {
    fn start() -> Noop {
        use std::io::BufRead;
        let exe = std::env::current_exe().expect("this binary");
        let mut child = std::process::Command::new(exe)
            .env("TICKD_PERF_ROLE", "noop")
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("start the no-op server");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        std::io::BufReader::new(stdout)
            .read_line(&mut line)
            .expect("the no-op server prints its address");
        Noop {
            child,
            addr: line.trim().to_string(),
        }
    }
}

impl Drop for Noop {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A server of tickd's gRPC service that does nothing: the floor of what a call costs.
mod noop {
    use super::*;
    use std::pin::Pin;
    use tickd::api::pb::scheduler_server::{Scheduler, SchedulerServer};

    pub struct Noop;

    /// Serves on an ephemeral port (TCP_NODELAY, as tickd) and prints its address.
    pub fn serve() {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            println!("{}", listener.local_addr().expect("addr"));
            tonic::transport::Server::builder()
                .add_service(
                    SchedulerServer::new(Noop)
                        .max_decoding_message_size(64 << 20)
                        .max_encoding_message_size(64 << 20),
                )
                .serve_with_incoming(
                    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
                )
                .await
                .expect("serve");
        });
    }

    fn unimplemented<T>() -> Result<Response<T>, Status> {
        Err(Status::unimplemented(
            "the no-op server answers only what the harness calls",
        ))
    }

    type FireStream = Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::Fire, Status>> + Send>>;

    #[tonic::async_trait]
    impl Scheduler for Noop {
        async fn schedule(
            &self,
            request: Request<pb::ScheduleRequest>,
        ) -> Result<Response<pb::Job>, Status> {
            Ok(Response::new(request.into_inner().job.unwrap_or_default()))
        }

        async fn batch_schedule(
            &self,
            request: Request<pb::BatchScheduleRequest>,
        ) -> Result<Response<pb::BatchScheduleResponse>, Status> {
            let jobs = request
                .into_inner()
                .requests
                .into_iter()
                .map(|r| r.job.unwrap_or_default())
                .collect();
            Ok(Response::new(pb::BatchScheduleResponse { jobs }))
        }

        async fn cancel_job(
            &self,
            _: Request<pb::CancelJobRequest>,
        ) -> Result<Response<pb::Job>, Status> {
            unimplemented()
        }

        async fn delete_job(
            &self,
            _: Request<pb::DeleteJobRequest>,
        ) -> Result<Response<()>, Status> {
            unimplemented()
        }

        async fn get_job(
            &self,
            _: Request<pb::GetJobRequest>,
        ) -> Result<Response<pb::Job>, Status> {
            unimplemented()
        }

        async fn update_job(
            &self,
            _: Request<pb::UpdateJobRequest>,
        ) -> Result<Response<pb::Job>, Status> {
            unimplemented()
        }

        async fn trigger_job(
            &self,
            _: Request<pb::TriggerJobRequest>,
        ) -> Result<Response<pb::TriggerJobResponse>, Status> {
            unimplemented()
        }

        async fn backfill_job(
            &self,
            _: Request<pb::BackfillJobRequest>,
        ) -> Result<Response<pb::BackfillJobResponse>, Status> {
            unimplemented()
        }

        async fn list_jobs(
            &self,
            _: Request<pb::ListJobsRequest>,
        ) -> Result<Response<pb::ListJobsResponse>, Status> {
            unimplemented()
        }

        async fn preview_occurrences(
            &self,
            _: Request<pb::PreviewOccurrencesRequest>,
        ) -> Result<Response<pb::PreviewOccurrencesResponse>, Status> {
            unimplemented()
        }

        async fn list_occurrences(
            &self,
            _: Request<pb::ListOccurrencesRequest>,
        ) -> Result<Response<pb::ListOccurrencesResponse>, Status> {
            unimplemented()
        }

        async fn pause_job(
            &self,
            _: Request<pb::PauseJobRequest>,
        ) -> Result<Response<pb::Job>, Status> {
            unimplemented()
        }

        async fn resume_job(
            &self,
            _: Request<pb::ResumeJobRequest>,
        ) -> Result<Response<pb::Job>, Status> {
            unimplemented()
        }

        type SubscribeStream = FireStream;

        /// Streams `n` ready-made fires to a subscription on queue `stream-<n>`, as fast as
        /// the client reads them, then ends the stream.
        async fn subscribe(
            &self,
            request: Request<Streaming<pb::SubscribeRequest>>,
        ) -> Result<Response<FireStream>, Status> {
            let mut requests = request.into_inner();
            let open = match requests.message().await? {
                Some(pb::SubscribeRequest {
                    request: Some(pb::subscribe_request::Request::Open(open)),
                }) => open,
                _ => return Err(Status::invalid_argument("open first")),
            };
            let n: usize = open
                .queue
                .strip_prefix("stream-")
                .and_then(|n| n.parse().ok())
                .ok_or_else(|| Status::invalid_argument("queue: stream-<count>"))?;
            let now = ts(now_micros());
            let template = pb::Fire {
                job_id: "stream-job".into(),
                queue: open.queue,
                scheduled_time: Some(now),
                fire_time: Some(now),
                attempt: 1,
                payload: PAYLOAD.to_vec().into(),
                ack_deadline_time: Some(now),
                ..Default::default()
            };
            let fires = tokio_stream::iter(0..n).map(move |i| {
                let mut fire = template.clone();
                fire.fire_id = format!("stream-job@{i}");
                Ok(fire)
            });
            Ok(Response::new(Box::pin(fires)))
        }

        async fn ack(
            &self,
            _: Request<pb::AckRequest>,
        ) -> Result<Response<pb::AckResponse>, Status> {
            unimplemented()
        }
    }
}
