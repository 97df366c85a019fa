//! Stored records as a damaged disk or database could hand them back: the first byte picks
//! the kind (see `tickd_fuzz::Record`), the rest are its bytes, read with the decoders the
//! stores use at start-up (`store::codec`, the journal's replay) and the PostgreSQL store per
//! row (its `spec` and `trace` columns).
//!
//! A decoder returns an error, never panics. A record that decodes encodes again to a record
//! that decodes to the same value. A job that decodes is restored as start-up restores it, and
//! asking it when it is next due, or advancing it, must not panic either.

#![no_main]

use libfuzzer_sys::fuzz_target;
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::fmt::Debug;
use tickd::domain::ledger::{Bounds, JobLedger, job_of_store_key};
use tickd::domain::preview::preview;
use tickd::domain::{
    FireRecord, Job, JobSpec, JobState, JobStatus, Occurrence, Outcome, PackedSpec, Timestamp,
    TraceContext, advance,
};
use tickd::store::{codec, fuzzing};
use tickd_fuzz::Record;

/// What start-up's clock says.
const NOW: Timestamp = Timestamp(tickd_fuzz::DEFAULT_START_MICROS);

fuzz_target!(|data: &[u8]| {
    let Some((&first, bytes)) = data.split_first() else {
        return;
    };
    match Record::of(first) {
        Record::Status => {
            if let Some(status) = round_trip::<JobStatus>("job_statuses", bytes) {
                restore(plain_spec(), status);
            }
        }
        Record::Spec => {
            if let Some(spec) = spec_record(bytes) {
                restore(spec, plain_status());
            }
        }
        Record::Fire => {
            round_trip::<FireRecord>("fires", bytes);
        }
        Record::Occurrence => {
            if let Some(record) = round_trip::<Occurrence>("occurrences", bytes) {
                // The PostgreSQL store keeps the outcome as its code.
                let code = u8::from(record.outcome);
                assert_eq!(Outcome::try_from(code), Ok(record.outcome));
                ledger(vec![record.clone(), record]);
            }
            for &b in bytes.iter().take(4) {
                if let Ok(o) = Outcome::try_from(b) {
                    assert_eq!(u8::from(o), b);
                }
            }
        }
        Record::Trace => {
            round_trip::<TraceContext>("trace", bytes);
        }
        Record::PgSpec => {
            // As the PostgreSQL store reads a job row's spec column.
            if let Some(spec) = round_trip::<JobSpec>("tickd_jobs", bytes) {
                let packed = PackedSpec::new(&spec);
                assert!(packed == spec, "packing changed a stored spec");
                restore(packed, plain_status());
            }
        }
        Record::JournalSegment => journal(bytes),
        Record::Job => {
            let Some((len, rest)) = bytes.split_first_chunk::<2>() else {
                return;
            };
            let len = usize::from(u16::from_be_bytes(*len)).min(rest.len());
            let (status, spec) = rest.split_at(len);
            let status = codec::decode::<JobStatus>("job_statuses", "k", status);
            let spec = codec::decode_spec("job_specs", "k", spec);
            if let (Ok(status), Ok(spec)) = (status, spec) {
                restore(spec, status);
            }
        }
    }
});

/// Decodes `bytes` as the stores do; when that succeeds, the value encodes and decodes again
/// to itself.
fn round_trip<T>(table: &'static str, bytes: &[u8]) -> Option<T>
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    let value: T = codec::decode(table, "k", bytes).ok()?;
    let again = codec::encode(&value).expect("a decoded record encodes");
    let read: T = codec::decode(table, "k", &again).expect("a record we encoded decodes");
    assert_eq!(
        read, value,
        "{table}: a record changed through encode and decode"
    );
    Some(value)
}

/// A `job_specs` record, read as the embedded store reads it; it must agree with reading it
/// as a plain `JobSpec`, and round-trip.
fn spec_record(bytes: &[u8]) -> Option<PackedSpec> {
    let packed = codec::decode_spec("job_specs", "k", bytes).ok()?;
    if let Ok(plain) = codec::decode::<JobSpec>("job_specs", "k", bytes) {
        assert!(packed == plain, "packed and plain reads of a record differ");
    }
    let again = codec::encode(&packed).expect("a decoded spec encodes");
    let read = codec::decode_spec("job_specs", "k", &again).expect("a spec we encoded decodes");
    assert!(read == packed, "a spec changed through encode and decode");
    Some(packed)
}

/// A journal segment, replayed as opening the store replays it; each value left is decoded as
/// loading decodes its table's records, and a job with both records is restored.
fn journal(bytes: &[u8]) {
    let Ok((writes, _torn)) = fuzzing::journal_segment(bytes.to_vec()) else {
        return;
    };
    let mut specs = Vec::new();
    let mut statuses = Vec::new();
    let mut records = Vec::new();
    for (table, key, value) in writes {
        let Some(value) = value else {
            continue;
        };
        match table {
            0 => {
                if let Ok(spec) = codec::decode_spec("job_specs", &key, &value) {
                    specs.push((key, spec));
                }
            }
            1 => {
                if let Ok(status) = codec::decode::<JobStatus>("job_statuses", &key, &value) {
                    statuses.push((key, status));
                }
            }
            2 => {
                let _ = codec::decode::<FireRecord>("fires", &key, &value);
            }
            3 => {
                if let Ok(record) = codec::decode::<Occurrence>("occurrences", &key, &value) {
                    let _ = job_of_store_key(&key);
                    records.push(record);
                }
            }
            t => panic!("the journal replayed a write to table {t}"),
        }
    }
    for (key, status) in statuses {
        if let Some((_, spec)) = specs.iter().find(|(k, _)| *k == key) {
            restore(spec.clone(), status);
        }
    }
    ledger(records);
}

/// Restores a job as start-up does (a job that does not resolve is left out), then asks what
/// the scheduler asks of it.
fn restore(spec: PackedSpec, status: JobStatus) {
    let Ok(job) = Job::restore(spec, status) else {
        return;
    };
    let _ = job.spec.to_spec();
    let Some(due) = job.next_due() else {
        return;
    };
    // Due now, and much later (a long outage), as the timer advances it.
    for now in [due, due.plus(86_400_000_000)] {
        let a = advance(&job, now, 16);
        assert!(a.fires.len() <= 16, "{} fires", a.fires.len());
    }
    let _ = preview(&job, None, None, 5);
}

/// Builds a ledger of `records` as start-up does.
fn ledger(records: Vec<Occurrence>) {
    let n = records.len();
    let (l, gone) = JobLedger::from_records(records, Bounds::default(), NOW);
    assert!(l.len() + gone.len() <= n);
}

fn plain_spec() -> PackedSpec {
    PackedSpec::new(&JobSpec {
        id: "k".into(),
        queue: "q".into(),
        trigger: tickd::domain::TriggerSpec::Every {
            period: 60_000_000,
            start_time: None,
            jitter: 0,
        },
        payload: Default::default(),
        labels: Default::default(),
        max_fires: 0,
        end_time: None,
        misfire_policy: tickd::domain::MisfirePolicy::FireAll,
        misfire_grace: 5_000_000,
        ack_deadline: 30_000_000,
        max_attempts: 10,
        dead_letter_queue: None,
        overlap_policy: Default::default(),
    })
}

fn plain_status() -> JobStatus {
    JobStatus {
        state: JobState::Scheduled,
        next_occurrence: Some(NOW),
        fire_count: 0,
        create_time: Timestamp(NOW.0 - 3_600_000_000),
        last_fire_time: None,
        finish_time: None,
        trace: None,
    }
}
