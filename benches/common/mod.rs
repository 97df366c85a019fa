//! What the benchmarks share: times, percentiles, resident memory, a tickd process of its own,
//! and many concurrent Schedule callers.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use prost_types::Timestamp as PbTimestamp;
use tickd::api::pb;
use tickd::api::pb::scheduler_client::SchedulerClient;
use tonic::transport::Channel;

/// Concurrent Schedule callers of [`schedule_all`].
pub const CALLERS: usize = 256;

pub fn now_micros() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

pub fn ts(micros: i64) -> PbTimestamp {
    PbTimestamp {
        seconds: micros.div_euclid(1_000_000),
        nanos: (micros.rem_euclid(1_000_000) * 1_000) as i32,
    }
}

pub fn micros_of(t: &Option<PbTimestamp>) -> i64 {
    t.as_ref()
        .map_or(0, |t| t.seconds * 1_000_000 + i64::from(t.nanos) / 1_000)
}

/// The `p` percentile of `sorted` microseconds, in milliseconds (0 when empty).
pub fn percentile(sorted: &[i64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)] as f64 / 1_000.0
}

/// This process's resident memory.
pub fn rss_bytes() -> u64 {
    statm_rss("/proc/self/statm")
}

/// The embedded store's files in `data_dir`: the redb file and its journal segments.
pub fn store_files(data_dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(data_dir)
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| {
                    let name = e.file_name();
                    let name = name.to_string_lossy();
                    name == tickd::store::DB_FILE_NAME
                        || (name.starts_with("journal-") && name.ends_with(".log"))
                })
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}

/// Bytes the embedded store takes in `data_dir`.
pub fn store_bytes(data_dir: &std::path::Path) -> u64 {
    store_files(data_dir)
        .iter()
        .filter_map(|f| std::fs::metadata(f).ok())
        .map(|m| m.len())
        .sum()
}

/// CPU time (user + system) process `pid` has used so far, in seconds (0 if unreadable).
pub fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name (which may hold spaces) closed by ')': utime is the 12th
    // and stime the 13th of them, in clock ticks.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // SAFETY: sysconf reads a constant of the system.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    (ticks(11) + ticks(12)) / per_second
}

/// Resident memory from a `/proc/<pid>/statm` file.
fn statm_rss(path: &str) -> u64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * 4096)
}

/// The value of `key` in a text log line (`key=value`).
fn log_field(line: &str, key: &str) -> Option<String> {
    let rest = line.split_once(&format!(" {key}="))?.1;
    Some(rest.chars().take_while(|c| !c.is_whitespace()).collect())
}

/// The tickd binary (release build) as a process of its own, on ephemeral ports and a data
/// directory of its own; stopped (SIGTERM) when dropped.
pub struct Tickd {
    pub child: Child,
    pub addr: String,
    pub metrics_addr: String,
    pub dir: tempfile::TempDir,
}

impl Tickd {
    /// Starts tickd with extra flags and environment, and waits for its address.
    pub fn start(args: &[&str], env: &[(&str, &str)]) -> Tickd {
        let dir = tempfile::tempdir().expect("tempdir");
        let (child, addr, metrics_addr) = spawn(dir.path(), args, env);
        Tickd {
            child,
            addr,
            metrics_addr,
            dir,
        }
    }

    /// Stops tickd (SIGTERM, waiting for it to exit), starts it again on the same data
    /// directory with `args`, and answers how long the new process took to listen (it listens
    /// once memory is rebuilt from the store).
    pub fn restart(&mut self, args: &[&str]) -> Duration {
        self.stop();
        let started = Instant::now();
        let (child, addr, metrics_addr) = spawn(self.dir.path(), args, &[]);
        let took = started.elapsed();
        self.child = child;
        self.addr = addr;
        self.metrics_addr = metrics_addr;
        took
    }

    /// Resident memory of the tickd process.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn rss_bytes(&self) -> u64 {
        statm_rss(&format!("/proc/{}/statm", self.child.id()))
    }

    fn stop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr))
            .expect("uri")
            .connect()
            .await
            .expect("connect")
    }
}

impl Drop for Tickd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Starts the tickd binary on `dir` and ephemeral ports; answers it with its gRPC and metrics
/// addresses once it logs them.
fn spawn(dir: &std::path::Path, args: &[&str], env: &[(&str, &str)]) -> (Child, String, String) {
    // For profiling: TICKD_BENCH_BIN runs another tickd binary (one built with debug info),
    // TICKD_BENCH_WRAPPER runs it under a profiler (`perf record -g -o tickd.perf --`).
    let bin = std::env::var("TICKD_BENCH_BIN").unwrap_or(env!("CARGO_BIN_EXE_tickd").into());
    let wrapper = std::env::var("TICKD_BENCH_WRAPPER").unwrap_or_default();
    let mut words = wrapper.split_whitespace();
    let mut command = match words.next() {
        Some(program) => {
            let mut c = Command::new(program);
            c.args(words).arg(&bin);
            c
        }
        None => Command::new(&bin),
    };
    let mut child = command
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(dir)
        .args(args)
        .envs(env.iter().copied())
        .env("TICKD_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start tickd (cargo builds it for benches)");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let (Some(a), Some(m)) = (log_field(&line, "addr"), log_field(&line, "metrics_addr"))
            {
                let _ = tx.send((a, m));
            }
        }
    });
    let (addr, metrics_addr) = rx
        .recv_timeout(Duration::from_secs(120))
        .expect("tickd logs its address");
    (child, addr, metrics_addr)
}

/// Schedules `n` one-shot jobs `<prefix>-<i>` on queue `prefix`, due at `due(i)`, from
/// [`CALLERS`] callers spread over `channels`; returns how long it took. A long misfire grace
/// period keeps a burst that is delivered late from being counted as missed.
pub async fn schedule_all(
    channels: &[Channel],
    n: usize,
    prefix: &str,
    due: impl Fn(usize) -> i64 + Send + Sync + Clone + 'static,
) -> Duration {
    let started = Instant::now();
    let per = n.div_ceil(CALLERS);
    let mut tasks = Vec::new();
    for c in 0..CALLERS {
        let mut client = SchedulerClient::new(channels[c % channels.len()].clone());
        let prefix = prefix.to_string();
        let due = due.clone();
        tasks.push(tokio::spawn(async move {
            for i in (c * per)..((c + 1) * per).min(n) {
                let job = pb::Job {
                    id: format!("{prefix}-{i}"),
                    queue: prefix.clone(),
                    trigger: Some(pb::Trigger {
                        kind: Some(pb::trigger::Kind::At(ts(due(i)))),
                    }),
                    payload: b"small payload".to_vec().into(),
                    misfire_grace_period: Some(prost_types::Duration {
                        seconds: 600,
                        nanos: 0,
                    }),
                    ..Default::default()
                };
                client
                    .schedule(pb::ScheduleRequest {
                        job: Some(job),
                        ..Default::default()
                    })
                    .await
                    .expect("schedule");
            }
        }));
    }
    for t in tasks {
        t.await.expect("caller");
    }
    started.elapsed()
}

/// The sum of a metric's samples in a Prometheus text scrape.
pub fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The Prometheus text of a `/metrics` endpoint (empty when it cannot be read).
pub async fn scrape(addr: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
        return String::new();
    };
    let request = format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    if s.write_all(request.as_bytes()).await.is_err() {
        return String::new();
    }
    let mut out = String::new();
    let _ = s.read_to_string(&mut out).await;
    out
}
