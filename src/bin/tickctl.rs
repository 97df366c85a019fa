//! tickctl: the command line for tickd. Schedules, inspects and controls jobs, and subscribes
//! to a queue, over tickd's gRPC API.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use base64::Engine as _;
use chrono::{DateTime, SecondsFormat, Utc};
use clap::{Args, Parser, Subcommand, ValueEnum};
use prost_types::{Duration as PbDuration, Timestamp as PbTimestamp};
use serde_json::{Value, json};
use tickd::api::pb;
use tickd::api::pb::scheduler_client::SchedulerClient;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use tonic_types::StatusExt;

type Client = SchedulerClient<InterceptedService<Channel, Bearer>>;

/// Schedule and control jobs on a tickd server, and receive their fires.
#[derive(Debug, Parser)]
#[command(name = "tickctl", version, about)]
struct Cli {
    /// tickd's address: host:port, or a URL (http://…, https://… for TLS).
    #[arg(
        long,
        env = "TICKD_ADDR",
        default_value = "127.0.0.1:50051",
        global = true
    )]
    addr: String,

    /// Bearer token to send (the server's auth file knows its SHA-256). Prefer the
    /// environment variable: a flag shows in the process list.
    #[arg(long, env = "TICKD_TOKEN", hide_env_values = true, global = true)]
    token: Option<String>,

    /// PEM CA certificate(s) to verify tickd's certificate with (default: the public web
    /// roots). Implies https://.
    #[arg(long, env = "TICKD_CA_FILE", global = true)]
    ca_file: Option<PathBuf>,

    /// PEM client certificate, for a server with mutual TLS (with --key). Implies https://.
    #[arg(long, env = "TICKD_CLIENT_CERT", global = true, requires = "key")]
    cert: Option<PathBuf>,

    /// PEM private key of --cert.
    #[arg(long, env = "TICKD_CLIENT_KEY", global = true, requires = "cert")]
    key: Option<PathBuf>,

    /// Name to check tickd's certificate against, when it differs from the address's host.
    #[arg(long, env = "TICKD_TLS_SERVER_NAME", global = true)]
    tls_server_name: Option<String>,

    /// Output format.
    #[arg(long, short, value_enum, default_value = "table", global = true)]
    output: Output,

    /// Longest a command may wait for tickd (not `subscribe`, which waits for fires).
    #[arg(long, default_value = "30s", value_parser = parse_duration, global = true)]
    timeout: Duration,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    /// Readable text.
    Table,
    /// JSON, for scripts.
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Schedule a job and print it.
    Schedule(Box<ScheduleArgs>),
    /// Cancel a job: it fires no more.
    Cancel { id: String },
    /// Delete a job now, in any state (its fires not yet acked are dropped).
    Delete { id: String },
    /// Show a job.
    Get { id: String },
    /// List jobs (every page).
    List(ListArgs),
    /// Change a job: only what the flags give (a trigger, --payload, --label (replaces all
    /// labels), --max-fires, --end, ...); its id and queue stay.
    Update(Box<UpdateArgs>),
    /// Release one extra fire of a job now (its schedule untouched); prints the fire id.
    Trigger { id: String },
    /// Release again the occurrences of a past range that were not delivered (those the
    /// ledger has as delivered, or still out, are left alone); prints the fire ids.
    Backfill {
        id: String,
        /// Start of the range (RFC 3339, inclusive).
        #[arg(long, value_parser = parse_time)]
        start: DateTime<Utc>,
        /// End of the range (RFC 3339, exclusive); default: up to now.
        #[arg(long, value_parser = parse_time)]
        end: Option<DateTime<Utc>>,
    },
    /// Pause a job.
    Pause { id: String },
    /// Resume a paused job.
    Resume { id: String },
    /// Receive a queue's fires, one JSON line each, acking each after printing it.
    Subscribe(SubscribeArgs),
    /// Show the occurrences a job would release (an existing job with --job, or a proposed
    /// one from trigger flags), with jitter, fire ids and what DST does to each.
    Preview(Box<PreviewArgs>),
    /// Show what became of a job's occurrences (its ledger), newest first: delivered,
    /// dead-lettered, dropped, or skipped and why.
    #[command(alias = "ledger")]
    Occurrences {
        id: String,
        /// Most entries to show.
        #[arg(long, default_value_t = 20)]
        count: usize,
    },
}

#[derive(Debug, Args)]
struct PreviewArgs {
    /// An existing job's id. Without it, give a trigger (--at, --after, --every, --cron).
    #[arg(
        long,
        conflicts_with_all = ["at", "after", "every", "cron", "id", "max_fires", "end"],
        required_unless_present_any = ["at", "after", "every", "cron"]
    )]
    job: Option<String>,
    #[command(flatten)]
    trigger: TriggerArgs,
    /// With a trigger: the proposed job's id (its jitter and fire ids depend on it).
    #[arg(long)]
    id: Option<String>,
    /// With a trigger: the job completes after this many fires.
    #[arg(long)]
    max_fires: Option<u64>,
    /// With a trigger: no occurrence at or after this RFC 3339 time fires.
    #[arg(long, value_parser = parse_time)]
    end: Option<DateTime<Utc>>,
    /// Only occurrences at or after this RFC 3339 time.
    #[arg(long, value_parser = parse_time)]
    from: Option<DateTime<Utc>>,
    /// Only occurrences before this RFC 3339 time.
    #[arg(long, value_parser = parse_time)]
    until: Option<DateTime<Utc>>,
    /// Most occurrences to show (1 to 1000).
    #[arg(long, default_value_t = 10)]
    count: i32,
}

/// When a job fires: one of --at, --after, --every, --cron.
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("trigger").args(["at", "after", "every", "cron"])))]
struct TriggerArgs {
    /// Fire once at this RFC 3339 time.
    #[arg(long, value_parser = parse_time)]
    at: Option<DateTime<Utc>>,
    /// Fire once after this long (e.g. 30s, 5m).
    #[arg(long, value_parser = parse_duration)]
    after: Option<Duration>,
    /// Fire every period (e.g. 5m).
    #[arg(long, value_parser = parse_duration)]
    every: Option<Duration>,
    /// With --every: the first occurrence (RFC 3339).
    #[arg(long, value_parser = parse_time, requires = "every")]
    start: Option<DateTime<Utc>>,
    /// With --every: delay each fire by a random amount below this.
    #[arg(long, value_parser = parse_duration, requires = "every")]
    jitter: Option<Duration>,
    /// Fire on a cron expression (5 fields, 6 with seconds, or @hourly etc.).
    #[arg(long)]
    cron: Option<String>,
    /// With --cron: IANA time zone (default UTC).
    #[arg(long, requires = "cron")]
    tz: Option<String>,
    /// With --cron: what a local time that does not exist (spring forward) does. Default:
    /// shift for a fixed-time job such as "30 2 * * *", skip for any other.
    #[arg(long, value_enum, requires = "cron")]
    dst_gap: Option<DstGap>,
    /// With --cron: what a local time that happens twice (fall back) does. Default: first
    /// for a fixed-time job, both for any other.
    #[arg(long, value_enum, requires = "cron")]
    dst_repeat: Option<DstRepeat>,
}

#[derive(Debug, Args)]
struct ScheduleArgs {
    /// Schedule every job of a JSON Lines file (- for stdin) through BatchSchedule, 1,000 per
    /// call: one object per line whose keys are this command's flags without the dashes
    /// ({"queue": "emails", "id": "a", "after": "30s", "label": ["team=web"]}); `labels` may
    /// also be an object.
    #[arg(long, conflicts_with_all = ["queue", "id", "request_id", "at", "after", "every", "cron", "payload", "payload_file"])]
    from_file: Option<String>,
    /// Queue whose subscribers receive the fires.
    #[arg(long, required_unless_present = "from_file")]
    queue: Option<String>,
    /// Job id; tickd assigns one when omitted.
    #[arg(long)]
    id: Option<String>,
    /// Without --id: makes the command safe to retry; a retry with the same request id
    /// returns the job the first run created (its id is derived from the request id).
    #[arg(long)]
    request_id: Option<String>,
    #[command(flatten)]
    trigger: TriggerArgs,
    #[command(flatten)]
    options: JobOptions,
}

/// A job's payload, labels and delivery options, for `schedule` and `update`.
#[derive(Debug, Args)]
struct JobOptions {
    /// Payload given as a string.
    #[arg(long, conflicts_with = "payload_file")]
    payload: Option<String>,
    /// Payload read from a file, or from stdin with -.
    #[arg(long)]
    payload_file: Option<String>,
    /// A label, key=value; repeat for more.
    #[arg(long = "label", value_parser = parse_label)]
    labels: Vec<(String, String)>,
    /// Complete the job after this many fires.
    #[arg(long)]
    max_fires: Option<u64>,
    /// No occurrence at or after this RFC 3339 time fires.
    #[arg(long, value_parser = parse_time)]
    end: Option<DateTime<Utc>>,
    /// What to do with missed occurrences.
    #[arg(long, value_enum)]
    misfire: Option<Misfire>,
    /// How late an occurrence may be and still fire normally.
    #[arg(long, value_parser = parse_duration)]
    misfire_grace: Option<Duration>,
    /// How long a worker has to ack a fire.
    #[arg(long, value_parser = parse_duration)]
    ack_deadline: Option<Duration>,
    /// Deliveries of a fire before it is dead-lettered or dropped.
    #[arg(long)]
    max_attempts: Option<u32>,
    /// Queue for fires that used up their attempts.
    #[arg(long)]
    dead_letter_queue: Option<String>,
    /// What an occurrence due while the job's previous fire still runs (un-acked) does.
    #[arg(long, value_enum)]
    overlap: Option<Overlap>,
}

#[derive(Debug, Args)]
struct UpdateArgs {
    /// The job to change.
    id: String,
    /// Change the job only if it is still as it was read with this etag (`get -o json`).
    #[arg(long)]
    etag: Option<String>,
    #[command(flatten)]
    trigger: TriggerArgs,
    #[command(flatten)]
    options: JobOptions,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum DstGap {
    /// Fire once at the first instant after the gap.
    Shift,
    /// Do not fire.
    Skip,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum DstRepeat {
    /// Fire at the first of the two instants.
    First,
    /// Fire at the second.
    Last,
    /// Fire at both.
    Both,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Misfire {
    /// One catch-up fire for the latest missed occurrence.
    Once,
    /// Nothing for missed occurrences.
    Skip,
    /// One fire per missed occurrence.
    All,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Overlap {
    /// Released anyway (the default).
    Allow,
    /// Skipped.
    Skip,
    /// Held until the running fire is acked; at most one held.
    BufferOne,
    /// Released; the running fire is withdrawn.
    Replace,
}

#[derive(Debug, Args)]
struct ListArgs {
    /// Only jobs on this queue.
    #[arg(long)]
    queue: Option<String>,
    /// Only jobs in this state; repeat for several.
    #[arg(long = "state", value_enum)]
    states: Vec<State>,
    /// Only jobs with this label, key=value; repeat and all must match.
    #[arg(long = "label", value_parser = parse_label)]
    labels: Vec<(String, String)>,
    /// Jobs per request.
    #[arg(long, default_value_t = 500)]
    page_size: i32,
    /// Include each job's payload (left out by default).
    #[arg(long)]
    full: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum State {
    Scheduled,
    Paused,
    Completed,
    Cancelled,
}

#[derive(Debug, Args)]
struct SubscribeArgs {
    /// The queue to receive fires from.
    queue: String,
    /// Print fires without acking them (they are delivered again after their deadline).
    #[arg(long)]
    no_ack: bool,
    /// Most un-acked fires at once.
    #[arg(long, default_value_t = 64)]
    max_in_flight: u32,
    /// Exit after this many fires.
    #[arg(long)]
    count: Option<u64>,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (use e.g. 500ms, 30s, 5m, 1h)"))
}

fn parse_time(s: &str) -> Result<DateTime<Utc>, String> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| format!("{e} (use RFC 3339, e.g. 2026-12-01T09:00:00Z)"))
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("{s:?} is not key=value"))
}

fn pb_duration(d: Duration) -> PbDuration {
    PbDuration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

fn pb_time(t: DateTime<Utc>) -> PbTimestamp {
    PbTimestamp {
        seconds: t.timestamp(),
        nanos: i32::try_from(t.timestamp_subsec_nanos()).unwrap_or(0),
    }
}

/// A failure to report: what went wrong, and the exit code.
struct Failure(String, u8);

impl From<tonic::Status> for Failure {
    fn from(status: tonic::Status) -> Self {
        let violations = status
            .get_details_bad_request()
            .map(|b| b.field_violations)
            .unwrap_or_default();
        let mut text = if violations.is_empty() {
            format!("error: {:?}: {}", status.code(), status.message())
        } else {
            format!("error: {:?}: the request was refused:", status.code())
        };
        for v in violations {
            text.push_str(&format!("\n  {}: {}", v.field, v.description));
        }
        Failure(text, 1)
    }
}

/// Adds `authorization: Bearer <token>` to every call when a token is set.
#[derive(Clone)]
struct Bearer(Option<MetadataValue<Ascii>>);

impl Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// How to reach tickd: the address and the security flags.
struct Target<'a> {
    addr: &'a str,
    token: Option<&'a str>,
    ca_file: Option<&'a Path>,
    cert: Option<&'a Path>,
    key: Option<&'a Path>,
    server_name: Option<&'a str>,
}

fn read_file(flag: &str, path: &Path) -> Result<Vec<u8>, Failure> {
    std::fs::read(path).map_err(|e| Failure(format!("error: {flag} {}: {e}", path.display()), 2))
}

async fn connect(target: &Target<'_>, timeout: Option<Duration>) -> Result<Client, Failure> {
    let addr = target.addr;
    let tls_asked = target.ca_file.is_some() || target.cert.is_some();
    let url = if addr.contains("://") {
        addr.to_string()
    } else if tls_asked {
        format!("https://{addr}")
    } else {
        format!("http://{addr}")
    };
    let tls = url.starts_with("https://");
    if tls_asked && !tls {
        return Err(Failure(
            format!(
                "error: --ca-file and --cert need TLS; use https://{}",
                addr.trim_start_matches("http://")
            ),
            2,
        ));
    }
    let bearer = match target.token {
        None => None,
        Some(token) => {
            if !tls {
                eprintln!("warning: sending the bearer token without TLS ({url})");
            }
            let mut value = format!("Bearer {}", token.trim())
                .parse::<MetadataValue<Ascii>>()
                .map_err(|_| Failure("error: --token must be printable ASCII".into(), 2))?;
            // Kept out of HPACK's tables and of debug output.
            value.set_sensitive(true);
            Some(value)
        }
    };
    let mut endpoint = Channel::from_shared(url.clone())
        .map_err(|e| Failure(format!("error: invalid address {addr:?}: {e}"), 2))?
        .connect_timeout(Duration::from_secs(5));
    if let Some(timeout) = timeout {
        endpoint = endpoint.timeout(timeout);
    }
    if tls {
        let mut config = ClientTlsConfig::new();
        config = match target.ca_file {
            Some(path) => {
                config.ca_certificate(Certificate::from_pem(read_file("--ca-file", path)?))
            }
            None => config.with_webpki_roots(),
        };
        if let (Some(cert), Some(key)) = (target.cert, target.key) {
            config = config.identity(Identity::from_pem(
                read_file("--cert", cert)?,
                read_file("--key", key)?,
            ));
        }
        if let Some(name) = target.server_name {
            config = config.domain_name(name);
        }
        endpoint = endpoint
            .tls_config(config)
            .map_err(|e| Failure(format!("error: TLS setup for {addr}: {e}"), 2))?;
    }
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| Failure(format!("error: cannot reach tickd at {addr}: {e}"), 1))?;
    Ok(SchedulerClient::with_interceptor(channel, Bearer(bearer)))
}

fn time_str(t: &Option<PbTimestamp>) -> Option<String> {
    let t = t.as_ref()?;
    let nanos = u32::try_from(t.nanos).ok()?;
    DateTime::<Utc>::from_timestamp(t.seconds, nanos)
        .map(|t| t.to_rfc3339_opts(SecondsFormat::AutoSi, true))
}

fn duration_str(d: &Option<PbDuration>) -> Option<String> {
    let d = d.as_ref()?;
    let std = Duration::new(u64::try_from(d.seconds).ok()?, u32::try_from(d.nanos).ok()?);
    Some(humantime::format_duration(std).to_string())
}

fn payload_json(payload: &[u8]) -> (Value, Value) {
    let text = std::str::from_utf8(payload).map_or(Value::Null, |s| Value::String(s.into()));
    let b64 = base64::engine::general_purpose::STANDARD.encode(payload);
    (text, Value::String(b64))
}

fn labels_json(labels: &HashMap<String, String>) -> Value {
    let sorted: std::collections::BTreeMap<_, _> = labels.iter().collect();
    json!(sorted)
}

fn trigger_text(t: &Option<pb::Trigger>) -> String {
    use pb::trigger::Kind;
    match t.as_ref().and_then(|t| t.kind.as_ref()) {
        Some(Kind::At(at)) => format!("at {}", time_str(&Some(*at)).unwrap_or_default()),
        Some(Kind::After(d)) => format!("after {}", duration_str(&Some(*d)).unwrap_or_default()),
        Some(Kind::Every(e)) => {
            let mut s = format!("every {}", duration_str(&e.period).unwrap_or_default());
            if let Some(start) = time_str(&e.start_time) {
                s.push_str(&format!(" from {start}"));
            }
            if let Some(j) = duration_str(&e.jitter) {
                s.push_str(&format!(" jitter {j}"));
            }
            s
        }
        Some(Kind::Cron(c)) => {
            let tz = if c.time_zone.is_empty() {
                "UTC"
            } else {
                &c.time_zone
            };
            let mut s = format!("cron {:?} in {tz}", c.expression);
            if let Some(p) = &c.dst_policy {
                let gap = match p.gap() {
                    pb::DstGapPolicy::Unspecified => "default",
                    pb::DstGapPolicy::Shift => "shift",
                    pb::DstGapPolicy::Skip => "skip",
                };
                let repeat = match p.repeat() {
                    pb::DstRepeatPolicy::Unspecified => "default",
                    pb::DstRepeatPolicy::First => "first",
                    pb::DstRepeatPolicy::Last => "last",
                    pb::DstRepeatPolicy::Both => "both",
                };
                s.push_str(&format!(", DST gap {gap}, repeat {repeat}"));
            }
            s
        }
        None => String::new(),
    }
}

fn state_name(job: &pb::Job) -> &'static str {
    match job.state() {
        pb::JobState::Scheduled => "SCHEDULED",
        pb::JobState::Paused => "PAUSED",
        pb::JobState::Completed => "COMPLETED",
        pb::JobState::Cancelled => "CANCELLED",
        pb::JobState::Unspecified => "UNSPECIFIED",
    }
}

fn job_json(job: &pb::Job) -> Value {
    let (payload, payload_base64) = payload_json(&job.payload);
    json!({
        "id": job.id,
        "queue": job.queue,
        "state": state_name(job),
        "trigger": trigger_text(&job.trigger),
        "next_fire_time": time_str(&job.next_fire_time),
        "fire_count": job.fire_count,
        "create_time": time_str(&job.create_time),
        "last_fire_time": time_str(&job.last_fire_time),
        "finish_time": time_str(&job.finish_time),
        "expire_time": time_str(&job.expire_time),
        "labels": labels_json(&job.labels),
        "payload": payload,
        "payload_base64": payload_base64,
        "max_fires": job.max_fires,
        "end_time": time_str(&job.end_time),
        "misfire_policy": job.misfire_policy().as_str_name(),
        "misfire_grace_period": duration_str(&job.misfire_grace_period),
        "ack_deadline": duration_str(&job.ack_deadline),
        "max_attempts": job.max_attempts,
        "dead_letter_queue": job.dead_letter_queue,
        "overlap_policy": job.overlap_policy().as_str_name(),
        "etag": job.etag,
    })
}

fn fire_json(fire: &pb::Fire) -> Value {
    let (payload, payload_base64) = payload_json(&fire.payload);
    json!({
        "fire_id": fire.fire_id,
        "job_id": fire.job_id,
        "queue": fire.queue,
        "scheduled_time": time_str(&fire.scheduled_time),
        "fire_time": time_str(&fire.fire_time),
        "attempt": fire.attempt,
        "dead_lettered": fire.dead_lettered,
        "labels": labels_json(&fire.labels),
        "payload": payload,
        "payload_base64": payload_base64,
        "traceparent": fire.traceparent,
    })
}

/// `emit` with `format!` arguments.
macro_rules! emit_fmt {
    ($($arg:tt)*) => {
        emit(format_args!($($arg)*))
    };
}

/// Writes one line to stdout; a closed pipe (`| head`) is not worth a panic.
fn emit(line: impl std::fmt::Display) {
    let _ = writeln!(std::io::stdout().lock(), "{line}");
}

fn print_job(job: &pb::Job, output: Output) {
    match output {
        Output::Json => emit(job_json(job)),
        Output::Table => {
            let dash = || "-".to_string();
            emit_fmt!("id:             {}", job.id);
            emit_fmt!("queue:          {}", job.queue);
            emit_fmt!("state:          {}", state_name(job));
            emit_fmt!("trigger:        {}", trigger_text(&job.trigger));
            emit_fmt!(
                "next fire:      {}",
                time_str(&job.next_fire_time).unwrap_or_else(dash)
            );
            emit_fmt!("fires:          {}", job.fire_count);
            emit_fmt!("etag:           {}", job.etag);
            emit_fmt!(
                "created:        {}",
                time_str(&job.create_time).unwrap_or_else(dash)
            );
            if !job.labels.is_empty() {
                let mut labels: Vec<_> =
                    job.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                labels.sort();
                emit_fmt!("labels:         {}", labels.join(", "));
            }
        }
    }
}

fn read_payload(args: &JobOptions) -> Result<Vec<u8>, Failure> {
    if let Some(p) = &args.payload {
        return Ok(p.clone().into_bytes());
    }
    let Some(path) = &args.payload_file else {
        return Ok(Vec::new());
    };
    let mut bytes = Vec::new();
    let read = if path == "-" {
        std::io::stdin().read_to_end(&mut bytes).map(|_| ())
    } else {
        std::fs::read(path).map(|b| bytes = b)
    };
    read.map_err(|e| Failure(format!("error: cannot read payload from {path}: {e}"), 2))?;
    Ok(bytes)
}

async fn schedule(client: &mut Client, args: ScheduleArgs, output: Output) -> Result<(), Failure> {
    if let Some(file) = &args.from_file {
        return schedule_from_file(client, file, output).await;
    }
    let job = client.schedule(request_of(args)?).await?.into_inner();
    print_job(&job, output);
    Ok(())
}

/// Most jobs per BatchSchedule call.
const BATCH: usize = 1_000;

/// Schedules the jobs of a JSON Lines file, 1,000 per BatchSchedule call (each call all or
/// nothing; a refused call stops the command, and the calls before it stay done).
async fn schedule_from_file(
    client: &mut Client,
    file: &str,
    output: Output,
) -> Result<(), Failure> {
    let text = if file == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .map_err(|e| Failure(format!("error: cannot read stdin: {e}"), 2))?;
        s
    } else {
        std::fs::read_to_string(file)
            .map_err(|e| Failure(format!("error: cannot read {file}: {e}"), 2))?
    };
    let mut jobs = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = |e: String| Failure(format!("error: {file} line {}: {e}", n + 1), 2);
        jobs.push(request_of(line_args(line).map_err(at)?).map_err(|e| at(e.0))?);
    }
    if jobs.is_empty() {
        return Err(Failure(format!("error: {file} holds no job"), 2));
    }
    let mut done = 0;
    for (call, chunk) in jobs.chunks(BATCH).enumerate() {
        let request = pb::BatchScheduleRequest {
            requests: chunk.to_vec(),
        };
        let created = match client.batch_schedule(request).await {
            Ok(r) => r.into_inner().jobs,
            Err(status) => {
                if done > 0 {
                    eprintln!(
                        "{done} job(s) of lines 1 to {} were scheduled before this call was refused; \
                         requests[i] below is line {} + i",
                        call * BATCH,
                        call * BATCH + 1
                    );
                }
                return Err(status.into());
            }
        };
        done += created.len();
        if let Output::Json = output {
            for job in &created {
                print_job(job, output);
            }
        }
    }
    if !matches!(output, Output::Json) {
        println!("scheduled {done} job(s)");
    }
    Ok(())
}

/// The schedule flags of one JSON Lines object, parsed as on the command line.
fn line_args(line: &str) -> Result<ScheduleArgs, String> {
    #[derive(Debug, Parser)]
    #[command(name = "line", no_binary_name = true)]
    struct Line {
        #[command(flatten)]
        args: ScheduleArgs,
    }
    let object: serde_json::Map<String, Value> =
        serde_json::from_str(line).map_err(|e| format!("not a JSON object: {e}"))?;
    let mut argv = Vec::new();
    for (key, value) in object {
        let flag = format!("--{}", key.replace('_', "-"));
        let scalar = |v: &Value| match v {
            Value::String(s) => Ok(s.clone()),
            Value::Number(n) => Ok(n.to_string()),
            Value::Bool(b) => Ok(b.to_string()),
            other => Err(format!("{key}: {other} is not a string or a number")),
        };
        match (key.as_str(), &value) {
            ("from_file" | "from-file", _) => {
                return Err("from_file cannot be used in a line".into());
            }
            ("labels", Value::Object(map)) => {
                for (k, v) in map {
                    argv.push("--label".to_string());
                    argv.push(format!("{k}={}", scalar(v)?));
                }
            }
            (_, Value::Array(items)) => {
                for item in items {
                    argv.push(flag.clone());
                    argv.push(scalar(item)?);
                }
            }
            _ => {
                argv.push(flag);
                argv.push(scalar(&value)?);
            }
        }
    }
    Line::try_parse_from(argv).map(|l| l.args).map_err(|e| {
        let text = e.to_string();
        let first = text.lines().next().unwrap_or_default();
        first.trim_start_matches("error: ").to_string()
    })
}

/// The trigger the flags describe.
fn trigger_of(args: &TriggerArgs) -> Result<pb::Trigger, Failure> {
    use pb::trigger::Kind;
    let kind = if let Some(at) = args.at {
        Kind::At(pb_time(at))
    } else if let Some(after) = args.after {
        Kind::After(pb_duration(after))
    } else if let Some(every) = args.every {
        Kind::Every(pb::Interval {
            period: Some(pb_duration(every)),
            start_time: args.start.map(pb_time),
            jitter: args.jitter.map(pb_duration),
        })
    } else if let Some(cron) = &args.cron {
        Kind::Cron(pb::Cron {
            expression: cron.clone(),
            time_zone: args.tz.clone().unwrap_or_default(),
            dst_policy: (args.dst_gap.is_some() || args.dst_repeat.is_some()).then(|| {
                pb::DstPolicy {
                    gap: match args.dst_gap {
                        None => pb::DstGapPolicy::Unspecified,
                        Some(DstGap::Shift) => pb::DstGapPolicy::Shift,
                        Some(DstGap::Skip) => pb::DstGapPolicy::Skip,
                    }
                    .into(),
                    repeat: match args.dst_repeat {
                        None => pb::DstRepeatPolicy::Unspecified,
                        Some(DstRepeat::First) => pb::DstRepeatPolicy::First,
                        Some(DstRepeat::Last) => pb::DstRepeatPolicy::Last,
                        Some(DstRepeat::Both) => pb::DstRepeatPolicy::Both,
                    }
                    .into(),
                }
            }),
            time_zone_database_version: String::new(),
        })
    } else {
        return Err(Failure(
            "error: give one of --at, --after, --every, --cron".into(),
            2,
        ));
    };
    Ok(pb::Trigger { kind: Some(kind) })
}

/// The Schedule request the schedule flags describe.
fn request_of(args: ScheduleArgs) -> Result<pb::ScheduleRequest, Failure> {
    let request_id = args.request_id.clone().unwrap_or_default();
    Ok(pb::ScheduleRequest {
        job: Some(job_of(args)?),
        request_id,
    })
}

/// The job the schedule flags describe.
fn job_of(args: ScheduleArgs) -> Result<pb::Job, Failure> {
    let trigger = trigger_of(&args.trigger)?;
    let payload = read_payload(&args.options)?;
    Ok(pb::Job {
        id: args.id.unwrap_or_default(),
        queue: args.queue.unwrap_or_default(),
        trigger: Some(trigger),
        payload: payload.into(),
        ..options_job(args.options)
    })
}

/// The payload-less part of a job the option flags describe.
fn options_job(o: JobOptions) -> pb::Job {
    let misfire_policy = match o.misfire {
        None => pb::MisfirePolicy::Unspecified,
        Some(Misfire::Once) => pb::MisfirePolicy::FireOnce,
        Some(Misfire::Skip) => pb::MisfirePolicy::Skip,
        Some(Misfire::All) => pb::MisfirePolicy::FireAll,
    };
    let overlap_policy = match o.overlap {
        None => pb::OverlapPolicy::Unspecified,
        Some(Overlap::Allow) => pb::OverlapPolicy::Allow,
        Some(Overlap::Skip) => pb::OverlapPolicy::Skip,
        Some(Overlap::BufferOne) => pb::OverlapPolicy::BufferOne,
        Some(Overlap::Replace) => pb::OverlapPolicy::Replace,
    };
    pb::Job {
        overlap_policy: overlap_policy.into(),
        labels: o.labels.into_iter().collect(),
        max_fires: o.max_fires.unwrap_or(0),
        end_time: o.end.map(pb_time),
        misfire_policy: misfire_policy.into(),
        misfire_grace_period: o.misfire_grace.map(pb_duration),
        ack_deadline: o.ack_deadline.map(pb_duration),
        max_attempts: o.max_attempts.unwrap_or(0),
        dead_letter_queue: o.dead_letter_queue.unwrap_or_default(),
        ..Default::default()
    }
}

/// `update`: the fields given on the command line, and only those, are changed.
async fn update(client: &mut Client, args: UpdateArgs, output: Output) -> Result<(), Failure> {
    let t = &args.trigger;
    let o = &args.options;
    let given = [
        (
            "trigger",
            t.at.is_some() || t.after.is_some() || t.every.is_some() || t.cron.is_some(),
        ),
        ("payload", o.payload.is_some() || o.payload_file.is_some()),
        ("labels", !o.labels.is_empty()),
        ("max_fires", o.max_fires.is_some()),
        ("end_time", o.end.is_some()),
        ("misfire_policy", o.misfire.is_some()),
        ("misfire_grace_period", o.misfire_grace.is_some()),
        ("ack_deadline", o.ack_deadline.is_some()),
        ("max_attempts", o.max_attempts.is_some()),
        ("dead_letter_queue", o.dead_letter_queue.is_some()),
        ("overlap_policy", o.overlap.is_some()),
    ];
    let paths: Vec<String> = given
        .iter()
        .filter(|(_, set)| *set)
        .map(|(p, _)| p.to_string())
        .collect();
    if paths.is_empty() {
        return Err(Failure(
            "error: nothing to change: give a trigger (--at, --after, --every, --cron) or an \
             option such as --payload, --label, --max-attempts"
                .into(),
            2,
        ));
    }
    let trigger = if paths.iter().any(|p| p == "trigger") {
        Some(trigger_of(&args.trigger)?)
    } else {
        None
    };
    let payload = read_payload(&args.options)?;
    let job = pb::Job {
        id: args.id,
        etag: args.etag.unwrap_or_default(),
        trigger,
        payload: payload.into(),
        ..options_job(args.options)
    };
    let job = client
        .update_job(pb::UpdateJobRequest {
            job: Some(job),
            update_mask: Some(prost_types::FieldMask { paths }),
        })
        .await?
        .into_inner();
    print_job(&job, output);
    Ok(())
}

async fn list(client: &mut Client, args: ListArgs, output: Output) -> Result<(), Failure> {
    let states = args
        .states
        .iter()
        .map(|s| match s {
            State::Scheduled => pb::JobState::Scheduled,
            State::Paused => pb::JobState::Paused,
            State::Completed => pb::JobState::Completed,
            State::Cancelled => pb::JobState::Cancelled,
        } as i32)
        .collect::<Vec<_>>();
    let mut jobs = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = client
            .list_jobs(pb::ListJobsRequest {
                queue: args.queue.clone().unwrap_or_default(),
                states: states.clone(),
                labels: args.labels.iter().cloned().collect(),
                page_size: args.page_size,
                page_token,
                view: if args.full {
                    pb::JobView::Full
                } else {
                    pb::JobView::Basic
                } as i32,
            })
            .await?
            .into_inner();
        jobs.extend(page.jobs);
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    match output {
        Output::Json => println!("{}", Value::Array(jobs.iter().map(job_json).collect())),
        Output::Table => {
            let rows: Vec<[String; 6]> = jobs
                .iter()
                .map(|j| {
                    [
                        j.id.clone(),
                        j.queue.clone(),
                        state_name(j).to_string(),
                        time_str(&j.next_fire_time).unwrap_or_else(|| "-".into()),
                        j.fire_count.to_string(),
                        trigger_text(&j.trigger),
                    ]
                })
                .collect();
            let header =
                ["ID", "QUEUE", "STATE", "NEXT FIRE", "FIRES", "TRIGGER"].map(String::from);
            let mut widths = header.clone().map(|h| h.len());
            for row in &rows {
                for (w, cell) in widths.iter_mut().zip(row) {
                    *w = (*w).max(cell.len());
                }
            }
            for row in std::iter::once(&header).chain(&rows) {
                let cells: Vec<String> = row
                    .iter()
                    .zip(widths)
                    .map(|(c, w)| format!("{c:<w$}"))
                    .collect();
                emit_fmt!("{}", cells.join("  ").trim_end());
            }
            if rows.is_empty() {
                emit_fmt!("(no jobs)");
            }
        }
    }
    Ok(())
}

async fn subscribe(client: &mut Client, args: SubscribeArgs) -> Result<(), Failure> {
    use pb::subscribe_request::Request;
    // With --count, take no more fires than will be printed: fires held when the stream closes
    // would be redelivered with one attempt used up.
    let max_in_flight = match args.count {
        Some(n) => args
            .max_in_flight
            .min(u32::try_from(n).unwrap_or(u32::MAX))
            .max(1),
        None => args.max_in_flight,
    };
    let (tx, rx) = mpsc::channel(1);
    let _ = tx
        .send(pb::SubscribeRequest {
            request: Some(Request::Open(pb::SubscribeOpen {
                queue: args.queue.clone(),
                max_in_flight,
            })),
        })
        .await;
    let mut acker = client.clone();
    let mut fires = client
        .subscribe(ReceiverStream::new(rx))
        .await?
        .into_inner();
    let mut received = 0u64;
    while args.count.is_none_or(|n| received < n) {
        let Some(fire) = fires.message().await? else {
            break;
        };
        // Ack only what was really written out: a closed pipe stops here, un-acked.
        let written = {
            let mut out = std::io::stdout().lock();
            writeln!(out, "{}", fire_json(&fire)).and_then(|()| out.flush())
        };
        if let Err(e) = written {
            return Err(Failure(
                format!("error: cannot write the fire out ({e}); it was not acked"),
                1,
            ));
        }
        if !args.no_ack {
            // The unary Ack answers once the ack is stored.
            acker
                .ack(pb::AckRequest {
                    queue: args.queue.clone(),
                    fire_ids: vec![fire.fire_id],
                })
                .await?;
        }
        received += 1;
    }
    drop(tx);
    Ok(())
}

async fn run(cli: Cli) -> Result<(), Failure> {
    let timeout = (!matches!(cli.command, Command::Subscribe(_))).then_some(cli.timeout);
    let target = Target {
        addr: &cli.addr,
        token: cli.token.as_deref(),
        ca_file: cli.ca_file.as_deref(),
        cert: cli.cert.as_deref(),
        key: cli.key.as_deref(),
        server_name: cli.tls_server_name.as_deref(),
    };
    let mut client = connect(&target, timeout).await?;
    let output = cli.output;
    match cli.command {
        Command::Schedule(args) => schedule(&mut client, *args, output).await,
        Command::Cancel { id } => {
            let job = client
                .cancel_job(pb::CancelJobRequest { id })
                .await?
                .into_inner();
            print_job(&job, output);
            Ok(())
        }
        Command::Delete { id } => {
            client
                .delete_job(pb::DeleteJobRequest { id: id.clone() })
                .await?;
            match output {
                Output::Json => println!("{}", json!({ "deleted": id })),
                _ => println!("deleted {id}"),
            }
            Ok(())
        }
        Command::Get { id } => {
            let job = client.get_job(pb::GetJobRequest { id }).await?.into_inner();
            print_job(&job, output);
            Ok(())
        }
        Command::Pause { id } => {
            let job = client
                .pause_job(pb::PauseJobRequest { id })
                .await?
                .into_inner();
            print_job(&job, output);
            Ok(())
        }
        Command::Resume { id } => {
            let job = client
                .resume_job(pb::ResumeJobRequest { id })
                .await?
                .into_inner();
            print_job(&job, output);
            Ok(())
        }
        Command::List(args) => list(&mut client, args, output).await,
        Command::Subscribe(args) => subscribe(&mut client, args).await,
        Command::Preview(args) => preview(&mut client, *args, output).await,
        Command::Occurrences { id, count } => occurrences(&mut client, id, count, output).await,
        Command::Update(args) => update(&mut client, *args, output).await,
        Command::Backfill { id, start, end } => {
            let done = client
                .backfill_job(pb::BackfillJobRequest {
                    id,
                    start_time: Some(pb_time(start)),
                    // Unset: as late as a timestamp goes (the server counts an end after its
                    // now as its now; this client's clock does not matter).
                    end_time: Some(end.map_or(
                        prost_types::Timestamp {
                            seconds: 253_402_214_400, // 9999-12-31T00:00:00Z
                            nanos: 0,
                        },
                        pb_time,
                    )),
                })
                .await?
                .into_inner();
            match output {
                Output::Json => emit(json!({
                    "fire_ids": done.fire_ids,
                    "delivered_count": done.delivered_count,
                    "outstanding_count": done.outstanding_count,
                })),
                Output::Table => {
                    for id in &done.fire_ids {
                        emit_fmt!("released {id}");
                    }
                    emit_fmt!(
                        "{} released; left alone: {} delivered, {} still out",
                        done.fire_ids.len(),
                        done.delivered_count,
                        done.outstanding_count
                    );
                }
            }
            Ok(())
        }
        Command::Trigger { id } => {
            let fired = client
                .trigger_job(pb::TriggerJobRequest { id })
                .await?
                .into_inner();
            let outcome = fired.outcome();
            match output {
                Output::Json => emit(json!({
                    "fire_id": fired.fire_id,
                    "scheduled_time": time_str(&fired.scheduled_time),
                    "outcome": outcome.as_str_name(),
                })),
                Output::Table => match outcome {
                    pb::TriggerOutcome::Held => emit_fmt!(
                        "held {} (overlap policy BUFFER_ONE): delivered once the running fire is acked",
                        fired.fire_id
                    ),
                    pb::TriggerOutcome::Skipped => emit_fmt!(
                        "skipped: a fire of the job is still running (overlap policy); see `tickctl occurrences`"
                    ),
                    _ => emit_fmt!("released {}", fired.fire_id),
                },
            }
            Ok(())
        }
    }
}

async fn preview(client: &mut Client, args: PreviewArgs, output: Output) -> Result<(), Failure> {
    use pb::preview_occurrences_request::Subject;
    let subject = match args.job {
        Some(id) => Subject::JobId(id),
        None => Subject::Job(pb::Job {
            id: args.id.unwrap_or_default(),
            trigger: Some(trigger_of(&args.trigger)?),
            max_fires: args.max_fires.unwrap_or(0),
            end_time: args.end.map(pb_time),
            ..Default::default()
        }),
    };
    let p = client
        .preview_occurrences(pb::PreviewOccurrencesRequest {
            subject: Some(subject),
            start_time: args.from.map(pb_time),
            end_time: args.until.map(pb_time),
            max_occurrences: args.count,
        })
        .await?
        .into_inner();
    let dst = |o: &pb::PreviewedOccurrence| match (o.dst_effect(), o.skipped) {
        (pb::DstEffect::Unspecified | pb::DstEffect::None, _) => "",
        (pb::DstEffect::Nonexistent, false) => "does not exist: shifted to the end of the gap",
        (pb::DstEffect::Nonexistent, true) => "does not exist: skipped",
        (pb::DstEffect::RepeatedFirst, false) => "happens twice: the first",
        (pb::DstEffect::RepeatedFirst, true) => "happens twice: the first, skipped",
        (pb::DstEffect::RepeatedSecond, false) => "happens twice: the second",
        (pb::DstEffect::RepeatedSecond, true) => "happens twice: the second, skipped",
    };
    match output {
        Output::Json => {
            let occurrences: Vec<Value> = p
                .occurrences
                .iter()
                .map(|o| {
                    json!({
                        "scheduled_time": time_str(&o.scheduled_time),
                        "release_time": time_str(&o.release_time),
                        "fire_id": (!o.fire_id.is_empty()).then_some(&o.fire_id),
                        "local_time": (!o.local_time.is_empty()).then_some(&o.local_time),
                        "dst": (!dst(o).is_empty()).then(|| dst(o)),
                        "skipped": o.skipped,
                    })
                })
                .collect();
            emit(json!({
                "occurrences": occurrences,
                "more": p.more,
                "time_zone_database_version": p.time_zone_database_version,
            }));
        }
        Output::Table => {
            let dash = || "-".to_string();
            emit_fmt!(
                "{:<28}  {:<28}  {:<19}  DST",
                "SCHEDULED",
                "RELEASED",
                "LOCAL TIME"
            );
            for o in &p.occurrences {
                let released = if o.skipped {
                    "skipped".to_string()
                } else {
                    time_str(&o.release_time).unwrap_or_else(|| "(depends on --id)".into())
                };
                emit_fmt!(
                    "{:<28}  {:<28}  {:<19}  {}",
                    time_str(&o.scheduled_time).unwrap_or_else(dash),
                    released,
                    if o.local_time.is_empty() {
                        "-"
                    } else {
                        &o.local_time
                    },
                    dst(o)
                );
            }
            if p.occurrences.is_empty() {
                emit("no occurrences (the job will not fire again, or none fall in the range)");
            }
            if p.more {
                emit("more follow: raise --count, or narrow --from and --until");
            }
            emit_fmt!("time zone database {}", p.time_zone_database_version);
        }
    }
    Ok(())
}

async fn occurrences(
    client: &mut Client,
    id: String,
    count: usize,
    output: Output,
) -> Result<(), Failure> {
    let mut entries = Vec::new();
    let mut page_token = String::new();
    let mut more = false;
    while entries.len() < count {
        let page = client
            .list_occurrences(pb::ListOccurrencesRequest {
                job_id: id.clone(),
                page_size: i32::try_from(count - entries.len()).unwrap_or(1_000),
                page_token,
            })
            .await?
            .into_inner();
        entries.extend(page.occurrences);
        more = !page.next_page_token.is_empty();
        if !more {
            break;
        }
        page_token = page.next_page_token;
    }
    entries.truncate(count);
    let outcome = |o: &pb::Occurrence| match o.outcome() {
        pb::OccurrenceOutcome::Delivered => "delivered".to_string(),
        pb::OccurrenceOutcome::DeadLettered => "dead-lettered".to_string(),
        pb::OccurrenceOutcome::Dropped => "dropped".to_string(),
        pb::OccurrenceOutcome::Replaced => "replaced by a later fire (overlap)".to_string(),
        pb::OccurrenceOutcome::Skipped => format!(
            "skipped: {}",
            match o.skip_reason() {
                pb::SkipReason::Misfire => "missed (misfire policy)",
                pb::SkipReason::Paused => "job paused",
                pb::SkipReason::Overlap => "previous fire still running",
                pb::SkipReason::BacklogFull => "queue backlog full",
                pb::SkipReason::DstGap => "local time did not exist (DST)",
                pb::SkipReason::DstRepeat => "local time repeated (DST)",
                pb::SkipReason::Ended => "job ended",
                pb::SkipReason::Unspecified => "unknown",
            }
        ),
        pb::OccurrenceOutcome::Unspecified => "unknown".to_string(),
    };
    match output {
        Output::Json => {
            let list: Vec<Value> = entries
                .iter()
                .map(|o| {
                    json!({
                        "scheduled_time": time_str(&o.scheduled_time),
                        "last_scheduled_time": time_str(&o.last_scheduled_time),
                        "count": o.count,
                        "count_at_least": o.count_at_least,
                        "fire_id": (!o.fire_id.is_empty()).then_some(&o.fire_id),
                        "outcome": o.outcome().as_str_name(),
                        "skip_reason": (o.skip_reason() != pb::SkipReason::Unspecified)
                            .then(|| o.skip_reason().as_str_name()),
                        "attempts": o.attempts,
                        "record_time": time_str(&o.record_time),
                        "triggered": o.triggered,
                    })
                })
                .collect();
            emit(json!({ "occurrences": list, "more": more }));
        }
        Output::Table => {
            let dash = || "-".to_string();
            emit_fmt!(
                "{:<28}  {:>6}  {:<8}  {:<28}  OUTCOME",
                "SCHEDULED",
                "COUNT",
                "ATTEMPTS",
                "SEALED"
            );
            for o in &entries {
                let scheduled = match o.count {
                    1 => time_str(&o.scheduled_time).unwrap_or_else(dash),
                    _ => format!("{} ..", time_str(&o.scheduled_time).unwrap_or_else(dash)),
                };
                let triggered = if o.triggered { " (triggered)" } else { "" };
                let count = if o.count_at_least {
                    format!("≥{}", o.count)
                } else {
                    o.count.to_string()
                };
                emit_fmt!(
                    "{:<28}  {:>6}  {:<8}  {:<28}  {}{}",
                    scheduled,
                    count,
                    o.attempts,
                    time_str(&o.record_time).unwrap_or_else(dash),
                    outcome(o),
                    triggered
                );
            }
            if entries.is_empty() {
                emit(
                    "no occurrence of this job has been delivered or skipped yet (or its records passed --ledger-retention)",
                );
            }
            if more {
                emit("older entries follow: raise --count");
            }
        }
    }
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure(text, code)) => {
            eprintln!("{text}");
            ExitCode::from(code)
        }
    }
}
