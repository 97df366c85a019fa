//! What the fuzz targets and the seed generator (`examples/make_seeds.rs`) share: how an input
//! is laid out for each target, so that the seeds the generator writes are inputs the targets
//! read the way they were meant.
//!
//! - `cron`: text, one item a line (see [`CronInput`]).
//! - `request`: a [`Request`] byte, then the protobuf encoding of that request message.
//! - `store_record`: a [`Record`] byte, then the bytes of that kind of stored record.

/// Which request message a `request` input holds (its first byte, modulo the count).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    Schedule,
    BatchSchedule,
    UpdateJob,
    PreviewOccurrences,
    ListJobs,
    ListOccurrences,
    BackfillJob,
    Ack,
    /// CancelJob, DeleteJob, GetJob, PauseJob, ResumeJob and TriggerJob: a message with only
    /// `string id = 1`.
    JobId,
}

impl Request {
    pub const ALL: [Request; 9] = [
        Request::Schedule,
        Request::BatchSchedule,
        Request::UpdateJob,
        Request::PreviewOccurrences,
        Request::ListJobs,
        Request::ListOccurrences,
        Request::BackfillJob,
        Request::Ack,
        Request::JobId,
    ];

    pub fn of(byte: u8) -> Request {
        Request::ALL[usize::from(byte) % Request::ALL.len()]
    }

    pub fn byte(self) -> u8 {
        Request::ALL.iter().position(|r| *r == self).unwrap_or(0) as u8
    }
}

/// Which stored record a `store_record` input holds (its first byte, modulo the count).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Record {
    /// A `job_statuses` value (`JobStatus`).
    Status,
    /// A `job_specs` value, read as the embedded store reads it (packed, or as a `JobSpec`).
    Spec,
    /// A `fires` value (`FireRecord`).
    Fire,
    /// An `occurrences` value (`Occurrence`).
    Occurrence,
    /// A `trace` column or field (`TraceContext`).
    Trace,
    /// The PostgreSQL `tickd_jobs.spec` column (`JobSpec`).
    PgSpec,
    /// A journal segment file, magic bytes and all.
    JournalSegment,
    /// A job as the embedded store loads it: a big-endian u16 length, that many bytes of
    /// status, then the spec.
    Job,
}

impl Record {
    pub const ALL: [Record; 8] = [
        Record::Status,
        Record::Spec,
        Record::Fire,
        Record::Occurrence,
        Record::Trace,
        Record::PgSpec,
        Record::JournalSegment,
        Record::Job,
    ];

    pub fn of(byte: u8) -> Record {
        Record::ALL[usize::from(byte) % Record::ALL.len()]
    }

    pub fn byte(self) -> u8 {
        Record::ALL.iter().position(|r| *r == self).unwrap_or(0) as u8
    }
}

/// A `cron` input: text lines, each optional after the first.
///
/// 1. the trigger: a cron expression, or `every <period µs> [<start µs>|-] [<jitter µs>]`,
///    `at <µs>` or `after <µs>`;
/// 2. the time zone: an IANA name as a client gives it (empty: UTC), or `#<n>` for zone `n` of
///    the time-zone database (so the fuzzer reaches every zone without spelling its name);
/// 3. the start instant, in microseconds since the epoch (default 2026-01-01T00:00:00Z);
/// 4. the DST policy: `<gap> <repeat>`, numbered as in the proto (0 = unspecified);
/// 5. how late the scheduler runs: `<µs late> <misfire policy>` (proto numbering).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CronInput {
    pub trigger: String,
    pub time_zone: String,
    pub start: i64,
    pub gap: i32,
    pub repeat: i32,
    pub late: i64,
    pub misfire: i32,
}

/// 2026-01-01T00:00:00Z.
pub const DEFAULT_START_MICROS: i64 = 1_767_225_600_000_000;

impl CronInput {
    pub fn parse(data: &[u8]) -> Option<CronInput> {
        let text = std::str::from_utf8(data).ok()?;
        let mut lines = text.split('\n');
        let trigger = lines.next()?.to_string();
        let time_zone = lines.next().unwrap_or("");
        let time_zone = match time_zone.strip_prefix('#') {
            Some(n) => {
                let n: usize = n.trim().parse().ok()?;
                chrono_tz::TZ_VARIANTS[n % chrono_tz::TZ_VARIANTS.len()]
                    .name()
                    .to_string()
            }
            None => time_zone.to_string(),
        };
        let start = match lines.next() {
            Some(s) => s.trim().parse().ok()?,
            None => DEFAULT_START_MICROS,
        };
        let pair = |line: Option<&str>| -> Option<(i64, i64)> {
            let Some(line) = line else {
                return Some((0, 0));
            };
            let mut it = line.split_whitespace().map(str::parse::<i64>);
            Some((
                it.next().unwrap_or(Ok(0)).ok()?,
                it.next().unwrap_or(Ok(0)).ok()?,
            ))
        };
        let (gap, repeat) = pair(lines.next())?;
        let (late, misfire) = pair(lines.next())?;
        Some(CronInput {
            trigger,
            time_zone,
            start,
            gap: gap as i32,
            repeat: repeat as i32,
            late,
            misfire: misfire as i32,
        })
    }

    pub fn render(&self) -> String {
        format!(
            "{}\n{}\n{}\n{} {}\n{} {}",
            self.trigger,
            self.time_zone,
            self.start,
            self.gap,
            self.repeat,
            self.late,
            self.misfire
        )
    }
}
