//! A job's spec as tickd holds it in memory: one shared allocation per job.
//!
//! [`JobSpec`] is the spec as validation builds it and the stores read it: a struct of owned
//! fields, five or six allocations per job. A scheduler holding a million jobs keeps each one
//! as a [`PackedSpec`] instead: a thin pointer (8 bytes) to one reference-counted allocation
//! holding the fixed fields and, after them, the id, queue, dead-letter queue, cron expression,
//! time zone and payload bytes back to back. Fires, indexes and the writer share it by cloning
//! the pointer. The spec never changes once built. The embedded scheduler also keeps a held
//! job's status and index keys in it (`held_status`, `hold_status`, written only under its
//! state lock), so that a held job is this one allocation and its index entries.
//!
//! [`JobKey`] orders a packed spec by its job id, for the scheduler's indexes; it borrows as the
//! id's bytes so that the indexes are searched with a `&[u8]`.

use std::borrow::{Borrow, Cow};
use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU8, AtomicU64, Ordering::Relaxed};

use bytes::Bytes;
use chrono_tz::Tz;
use croner::Cron;
use serde::de::Visitor;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use triomphe::ThinArc;

use super::dst::DstPolicy;
use super::job::{JobSpec, JobState, JobStatus, MisfirePolicy};
use super::overlap::OverlapPolicy;
use super::time::{Micros, Timestamp};
use super::trigger::{Recurrence, TriggerError, TriggerSpec, parse_cron, parse_time_zone};

/// Which [`TriggerSpec`] variant a packed spec holds, and what its three numbers mean.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// `[at, -, -]`
    At,
    /// `[after, -, -]`
    After,
    /// `[period, start_time, jitter]`; start_time only with `HAS_START`.
    Every,
    /// `[dst policy code, -, -]`; the expression and the time zone are in the bytes.
    Cron,
}

const HAS_START: u8 = 1;
const HAS_DLQ: u8 = 2;
/// Every end offset is exact (always, unless the strings passed 4 GiB; see `Rare::long_ends`):
/// each string of the bytes is then known to be exactly the UTF-8 it was copied from.
const ENDS_EXACT: u8 = 4;
/// The strings pass 64 KiB: their end offsets are in `Rare::long_ends`, not `Header::ends`.
const LONG_ENDS: u8 = 8;
/// The overlap policy's code ([`OverlapPolicy::code`]) sits in these two bits.
const OVERLAP_SHIFT: u8 = 4;
const OVERLAP_MASK: u8 = 3 << OVERLAP_SHIFT;

/// The fixed-size part. The bytes that follow it are, in order: id, queue, dead-letter queue,
/// cron expression, time zone (each ending at the offset in `ends`), then the payload.
#[derive(PartialEq, Eq)]
struct Header {
    /// Labels, `max_fires` and `end_time`, out of line: most jobs set none of them, and
    /// inline they would cost 24 bytes a job, not 8.
    rare: Option<Box<Rare>>,
    misfire_grace: Micros,
    ack_deadline: Micros,
    trigger: [i64; 3],
    max_attempts: u32,
    /// End offsets of id, queue, dead-letter queue, expression and time zone. Validation bounds
    /// names to 128 bytes, so only a long cron expression takes them past 64 KiB; such a spec
    /// keeps them in `Rare::long_ends` (`LONG_ENDS`), so that every other spec's header is 128
    /// bytes, not 136.
    ends: [u16; 5],
    /// A cron trigger's parsed schedule (none for other triggers, or when the expression or
    /// the time zone does not parse), and its time zone.
    schedule: Schedule,
    /// The job's status and index keys while the embedded scheduler holds it (see [`Held`]).
    held: Held,
    tz: ScheduleTz,
    /// The held status's state ([`JobState`] as a number) and which of its optional times
    /// are set (the `HELD_*` bits). Here rather than in [`Held`]: they fill the header's padding.
    held_state: HeldByte,
    held_set: HeldByte,
    kind: Kind,
    flags: u8,
    misfire_policy: MisfirePolicy,
}

/// Where the embedded scheduler keeps a held job's status (as it last applied a committed
/// change) and its key in the retention index, so that a held job is this one allocation and
/// nothing else. Atomics only because the spec is shared with fires on other threads: they are
/// written and read only under the scheduler's state lock, so `Relaxed` is enough. Not part of
/// a spec's equality. Unused (zero) in a spec that no scheduler holds. The status's trace
/// context is not here: few jobs carry one, and the scheduler keeps those aside.
#[derive(Default)]
struct Held {
    next_occurrence: AtomicI64,
    fire_count: AtomicU64,
    create_time: AtomicI64,
    last_fire_time: AtomicI64,
    finish_time: AtomicI64,
    /// The job's key in the retention index.
    expiry: AtomicI64,
}

impl PartialEq for Held {
    fn eq(&self, _: &Held) -> bool {
        true
    }
}

impl Eq for Held {}

/// A byte of [`Held`] state: never part of a spec's equality.
#[derive(Default)]
struct HeldByte(AtomicU8);

impl PartialEq for HeldByte {
    fn eq(&self, _: &HeldByte) -> bool {
        true
    }
}

impl Eq for HeldByte {}

const HELD_NEXT: u8 = 1;
const HELD_LAST: u8 = 2;
const HELD_FINISH: u8 = 4;
/// The job is in the timer index, at its next due time.
const HELD_TIMER: u8 = 8;
/// The job is in the retention index, at `Held::expiry`.
const HELD_EXPIRY: u8 = 16;
/// This allocation is the job the scheduler's state holds under its id (set when it is put in,
/// cleared when it is taken out): a held job is found from its spec without a search.
const HELD_IN: u8 = 32;

/// The fields most jobs leave at their defaults.
#[derive(PartialEq, Eq)]
struct Rare {
    labels: BTreeMap<String, String>,
    max_fires: u64,
    end_time: Option<Timestamp>,
    /// The end offsets, when they do not fit `Header::ends` (see `LONG_ENDS`). The stores'
    /// records are at most 4 GiB in all, so `u32` holds them.
    long_ends: Option<Box<[u32; 5]>>,
}

/// A cron expression, parsed once when the spec is packed. Always equal to another: it is
/// derived from the expression, which is compared in the bytes.
struct Schedule(Option<Arc<Cron>>);

impl PartialEq for Schedule {
    fn eq(&self, _: &Schedule) -> bool {
        true
    }
}

impl Eq for Schedule {}

/// The time zone of [`Schedule`] (apart from it, so that it fills the header's padding).
/// Always equal to another, for the same reason.
struct ScheduleTz(Tz);

impl PartialEq for ScheduleTz {
    fn eq(&self, _: &ScheduleTz) -> bool {
        true
    }
}

impl Eq for ScheduleTz {}

/// A job's spec in one shared allocation. Cloning shares it. Compares equal to another when
/// every field is equal (as the [`JobSpec`] each was built from would).
#[derive(Clone)]
pub struct PackedSpec(ThinArc<Header, u8>);

impl PackedSpec {
    /// Packs `spec`, parsing a cron trigger's schedule once (see [`PackedSpec::recurrence`]).
    pub fn new(spec: &JobSpec) -> PackedSpec {
        PackedSpec::pack(Fields::of(spec), true)
    }

    /// Packs `spec` for delivering its fires only: a cron trigger's schedule is not parsed,
    /// and [`PackedSpec::recurrence`] parses it each time it is asked.
    pub fn for_delivery(spec: &JobSpec) -> PackedSpec {
        PackedSpec::pack(Fields::of(spec), false)
    }

    fn pack(fields: Fields<'_>, parse_schedule: bool) -> PackedSpec {
        let (kind, trigger, flags_from_trigger, expression, time_zone) = match fields.trigger {
            TriggerFields::At { at } => (Kind::At, [at.0, 0, 0], 0, "", ""),
            TriggerFields::After { after } => (Kind::After, [after, 0, 0], 0, "", ""),
            TriggerFields::Every {
                period,
                start_time,
                jitter,
            } => (
                Kind::Every,
                [period, start_time.map_or(0, |t| t.0), jitter],
                if start_time.is_some() { HAS_START } else { 0 },
                "",
                "",
            ),
            TriggerFields::Cron {
                expression,
                time_zone,
                dst,
            } => (Kind::Cron, [dst.code(), 0, 0], 0, expression, time_zone),
        };
        let schedule = (parse_schedule && kind == Kind::Cron)
            .then(|| {
                parse_cron(expression)
                    .ok()
                    .zip(parse_time_zone(time_zone).ok())
            })
            .flatten();
        let (schedule, tz) = match schedule {
            Some((cron, tz)) => (Schedule(Some(Arc::new(cron))), tz),
            None => (Schedule(None), Tz::UTC),
        };
        let dlq = fields.dead_letter_queue;
        let strings = [
            fields.id,
            fields.queue,
            dlq.unwrap_or(""),
            expression,
            time_zone,
        ];
        let payload = fields.payload.0;
        let mut bytes =
            Vec::with_capacity(strings.iter().map(|s| s.len()).sum::<usize>() + payload.len());
        let mut long_ends = [0u32; 5];
        let mut exact = true;
        for (end, s) in long_ends.iter_mut().zip(strings) {
            bytes.extend_from_slice(s.as_bytes());
            *end = u32::try_from(bytes.len()).unwrap_or_else(|_| {
                exact = false;
                u32::MAX
            });
        }
        bytes.extend_from_slice(payload);
        let mut flags = flags_from_trigger | (fields.overlap_policy.code() << OVERLAP_SHIFT);
        if exact {
            flags |= ENDS_EXACT;
        }
        if dlq.is_some() {
            flags |= HAS_DLQ;
        }
        let mut ends = [0u16; 5];
        let long_ends = match long_ends
            .iter()
            .zip(&mut ends)
            .try_for_each(|(long, short)| {
                *short = u16::try_from(*long).ok()?;
                Some(())
            }) {
            Some(()) => None,
            None => {
                flags |= LONG_ENDS;
                Some(Box::new(long_ends))
            }
        };
        let header = Header {
            rare: (!fields.labels.is_empty()
                || fields.max_fires != 0
                || fields.end_time.is_some()
                || long_ends.is_some())
            .then(|| {
                Box::new(Rare {
                    labels: fields.labels.into_owned(),
                    max_fires: fields.max_fires,
                    end_time: fields.end_time,
                    long_ends,
                })
            }),
            misfire_grace: fields.misfire_grace,
            ack_deadline: fields.ack_deadline,
            trigger,
            max_attempts: fields.max_attempts,
            ends,
            schedule,
            held: Held::default(),
            tz: ScheduleTz(tz),
            held_state: HeldByte::default(),
            held_set: HeldByte::default(),
            kind,
            flags,
            misfire_policy: fields.misfire_policy,
        };
        PackedSpec(ThinArc::from_header_and_slice(header, &bytes))
    }

    fn header(&self) -> &Header {
        &self.0.header.header
    }

    /// The end offset of string `i` of the bytes (see [`Header`]).
    fn end(&self, i: usize) -> usize {
        let h = self.header();
        if h.flags & LONG_ENDS == 0 {
            h.ends[i] as usize
        } else {
            h.rare
                .as_ref()
                .and_then(|r| r.long_ends.as_deref())
                .map_or(0, |ends| ends[i] as usize)
        }
    }

    /// String `i` of the bytes (see [`Header`]); empty if the offsets were ever out of place.
    /// Read on every index lookup and fire, so not validated again when the offsets are exact.
    fn string(&self, i: usize) -> &str {
        let h = self.header();
        let start = if i == 0 { 0 } else { self.end(i - 1) };
        let bytes = self.0.slice.get(start..self.end(i)).unwrap_or(&[]);
        if h.flags & ENDS_EXACT != 0 {
            // SAFETY: with exact offsets, `start..end` is exactly the range `new` filled by
            // copying one `&str` (strings are copied whole, back to back, and their end
            // offsets recorded), and neither the bytes nor the header change after `new`.
            unsafe { std::str::from_utf8_unchecked(bytes) }
        } else {
            std::str::from_utf8(bytes).unwrap_or("")
        }
    }

    /// The job id's bytes (ordering by them is ordering by the id).
    pub fn id_bytes(&self) -> &[u8] {
        self.0.slice.get(..self.end(0)).unwrap_or(&[])
    }

    pub fn id(&self) -> &str {
        self.string(0)
    }

    pub fn queue(&self) -> &str {
        self.string(1)
    }

    pub fn dead_letter_queue(&self) -> Option<&str> {
        (self.header().flags & HAS_DLQ != 0).then(|| self.string(2))
    }

    pub fn payload_bytes(&self) -> &[u8] {
        self.0.slice.get(self.end(4)..).unwrap_or(&[])
    }

    /// The payload as `Bytes` sharing this allocation (no copy).
    pub fn payload(&self) -> Bytes {
        if self.payload_bytes().is_empty() {
            return Bytes::new();
        }
        Bytes::from_owner(PayloadOf(self.clone()))
    }

    pub fn labels(&self) -> &BTreeMap<String, String> {
        static NONE: BTreeMap<String, String> = BTreeMap::new();
        self.header().rare.as_ref().map_or(&NONE, |r| &r.labels)
    }

    pub fn trigger(&self) -> TriggerSpec {
        match self.trigger_fields() {
            TriggerFields::At { at } => TriggerSpec::At { at },
            TriggerFields::After { after } => TriggerSpec::After { after },
            TriggerFields::Every {
                period,
                start_time,
                jitter,
            } => TriggerSpec::Every {
                period,
                start_time,
                jitter,
            },
            TriggerFields::Cron {
                expression,
                time_zone,
                dst,
            } => TriggerSpec::Cron {
                expression: expression.to_string(),
                time_zone: time_zone.to_string(),
                dst,
            },
        }
    }

    /// The trigger, borrowing its strings.
    fn trigger_fields(&self) -> TriggerFields<'_> {
        let h = self.header();
        let [a, b, c] = h.trigger;
        match h.kind {
            Kind::At => TriggerFields::At { at: Timestamp(a) },
            Kind::After => TriggerFields::After { after: a },
            Kind::Every => TriggerFields::Every {
                period: a,
                start_time: (h.flags & HAS_START != 0).then_some(Timestamp(b)),
                jitter: c,
            },
            Kind::Cron => TriggerFields::Cron {
                expression: self.string(3),
                time_zone: self.string(4),
                dst: DstPolicy::from_code(a),
            },
        }
    }

    /// The trigger resolved against the job's creation time (what [`Recurrence::resolve`]
    /// gives for [`PackedSpec::trigger`], without parsing a cron expression again).
    pub fn recurrence(&self, created: Timestamp) -> Result<Recurrence, TriggerError> {
        let h = self.header();
        let [a, b, _] = h.trigger;
        Ok(match h.kind {
            Kind::At => Recurrence::Once(Timestamp(a)),
            Kind::After => Recurrence::Once(created.plus(a)),
            Kind::Every => Recurrence::Every {
                start: if h.flags & HAS_START != 0 {
                    Timestamp(b)
                } else {
                    created.plus(a)
                },
                // Validation refuses a period below 1 ms; this keeps the arithmetic total anyway.
                period: a.max(1),
            },
            Kind::Cron => match &h.schedule.0 {
                Some(cron) => Recurrence::Cron {
                    cron: cron.clone(),
                    tz: h.tz.0,
                    dst: DstPolicy::from_code(a),
                },
                None => Recurrence::resolve(&self.trigger(), created)?,
            },
        })
    }

    /// The most a fire of this trigger is delayed by jitter.
    pub fn jitter(&self) -> Micros {
        let h = self.header();
        match h.kind {
            Kind::Every => h.trigger[2],
            _ => 0,
        }
    }

    /// 0 = unbounded.
    pub fn max_fires(&self) -> u64 {
        self.header().rare.as_ref().map_or(0, |r| r.max_fires)
    }

    /// Exclusive.
    pub fn end_time(&self) -> Option<Timestamp> {
        self.header().rare.as_ref().and_then(|r| r.end_time)
    }

    pub fn misfire_policy(&self) -> MisfirePolicy {
        self.header().misfire_policy
    }

    pub fn overlap_policy(&self) -> OverlapPolicy {
        OverlapPolicy::from_code((self.header().flags & OVERLAP_MASK) >> OVERLAP_SHIFT)
    }

    pub fn misfire_grace(&self) -> Micros {
        self.header().misfire_grace
    }

    pub fn ack_deadline(&self) -> Micros {
        self.header().ack_deadline
    }

    pub fn max_attempts(&self) -> u32 {
        self.header().max_attempts
    }

    /// The spec as a struct of owned fields (copies every string and the payload).
    pub fn to_spec(&self) -> JobSpec {
        JobSpec {
            id: self.id().into(),
            queue: self.queue().to_string(),
            trigger: self.trigger(),
            payload: Bytes::copy_from_slice(self.payload_bytes()),
            labels: self.labels().clone(),
            max_fires: self.max_fires(),
            end_time: self.end_time(),
            misfire_policy: self.misfire_policy(),
            misfire_grace: self.misfire_grace(),
            ack_deadline: self.ack_deadline(),
            max_attempts: self.max_attempts(),
            dead_letter_queue: self.dead_letter_queue().map(str::to_string),
            overlap_policy: self.overlap_policy(),
        }
    }

    /// The status last stored with [`PackedSpec::hold_status`], without its trace context.
    pub fn held_status(&self) -> JobStatus {
        let h = self.header();
        let set = h.held_set.0.load(Relaxed);
        let at =
            |bit: u8, cell: &AtomicI64| (set & bit != 0).then(|| Timestamp(cell.load(Relaxed)));
        JobStatus {
            state: match h.held_state.0.load(Relaxed) {
                0 => JobState::Scheduled,
                1 => JobState::Paused,
                2 => JobState::Completed,
                _ => JobState::Cancelled,
            },
            next_occurrence: at(HELD_NEXT, &h.held.next_occurrence),
            fire_count: h.held.fire_count.load(Relaxed),
            create_time: Timestamp(h.held.create_time.load(Relaxed)),
            last_fire_time: at(HELD_LAST, &h.held.last_fire_time),
            finish_time: at(HELD_FINISH, &h.held.finish_time),
            trace: None,
        }
    }

    /// Keeps `status` as this job's held status (see [`Held`]), all but its trace context; its
    /// index keys stay.
    pub fn hold_status(&self, status: &JobStatus) {
        let h = self.header();
        let put = |t: Option<Timestamp>, bit: u8, cell: &AtomicI64| {
            cell.store(t.map_or(0, |t| t.0), Relaxed);
            if t.is_some() { bit } else { 0 }
        };
        let set = put(status.next_occurrence, HELD_NEXT, &h.held.next_occurrence)
            | put(status.last_fire_time, HELD_LAST, &h.held.last_fire_time)
            | put(status.finish_time, HELD_FINISH, &h.held.finish_time);
        h.held.fire_count.store(status.fire_count, Relaxed);
        h.held.create_time.store(status.create_time.0, Relaxed);
        h.held_state.0.store(
            match status.state {
                JobState::Scheduled => 0,
                JobState::Paused => 1,
                JobState::Completed => 2,
                JobState::Cancelled => 3,
            },
            Relaxed,
        );
        let keys = h.held_set.0.load(Relaxed) & (HELD_TIMER | HELD_EXPIRY | HELD_IN);
        h.held_set.0.store(set | keys, Relaxed);
    }

    /// Whether the held job is in the timer index (at the next due time of its held status).
    pub fn held_timer(&self) -> bool {
        self.header().held_set.0.load(Relaxed) & HELD_TIMER != 0
    }

    pub fn set_held_timer(&self, armed: bool) {
        self.set_held_flag(HELD_TIMER, armed);
    }

    /// Whether this allocation is the job the scheduler's state holds under its id.
    pub fn is_held(&self) -> bool {
        self.header().held_set.0.load(Relaxed) & HELD_IN != 0
    }

    pub fn set_held(&self, held: bool) {
        self.set_held_flag(HELD_IN, held);
    }

    fn set_held_flag(&self, bit: u8, on: bool) {
        let cell = &self.header().held_set.0;
        let set = cell.load(Relaxed);
        cell.store(if on { set | bit } else { set & !bit }, Relaxed);
    }

    /// The held job's key in the retention index, if it is in it.
    pub fn held_expiry(&self) -> Option<Timestamp> {
        let h = self.header();
        (h.held_set.0.load(Relaxed) & HELD_EXPIRY != 0)
            .then(|| Timestamp(h.held.expiry.load(Relaxed)))
    }

    pub fn set_held_expiry(&self, at: Option<Timestamp>) {
        self.header()
            .held
            .expiry
            .store(at.map_or(0, |t| t.0), Relaxed);
        self.set_held_flag(HELD_EXPIRY, at.is_some());
    }

    /// Whether both point at the same allocation.
    pub fn ptr_eq(&self, other: &PackedSpec) -> bool {
        self.0.heap_ptr() == other.0.heap_ptr()
    }
}

impl From<JobSpec> for PackedSpec {
    fn from(spec: JobSpec) -> PackedSpec {
        PackedSpec::new(&spec)
    }
}

impl PartialEq for PackedSpec {
    fn eq(&self, other: &PackedSpec) -> bool {
        self.ptr_eq(other) || (self.header() == other.header() && self.0.slice == other.0.slice)
    }
}

impl Eq for PackedSpec {}

impl PartialEq<JobSpec> for PackedSpec {
    fn eq(&self, other: &JobSpec) -> bool {
        self.to_spec() == *other
    }
}

impl fmt::Debug for PackedSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PackedSpec")
            .field("id", &self.id())
            .field("queue", &self.queue())
            .field("trigger", &self.trigger())
            .field("payload_bytes", &self.payload_bytes().len())
            .finish_non_exhaustive()
    }
}

/// Serializes exactly as the [`JobSpec`] it was built from does, without building one: the
/// stores encode it when a job is created.
impl Serialize for PackedSpec {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let h = self.header();
        Fields {
            id: self.id(),
            queue: self.queue(),
            trigger: self.trigger_fields(),
            payload: RawIn(self.payload_bytes()),
            labels: Cow::Borrowed(self.labels()),
            max_fires: self.max_fires(),
            end_time: self.end_time(),
            misfire_policy: h.misfire_policy,
            misfire_grace: h.misfire_grace,
            ack_deadline: h.ack_deadline,
            max_attempts: h.max_attempts,
            dead_letter_queue: self.dead_letter_queue(),
            overlap_policy: self.overlap_policy(),
        }
        .serialize(serializer)
    }
}

/// A spec's fields, borrowed where they can be: what packing reads, from a [`JobSpec`] or
/// straight from a stored record (then its strings and payload are copied once, into the
/// packed spec, and not first into allocations of their own). Reads the same records as
/// `JobSpec`'s `Deserialize`, arrays or maps with field names, and writes what `JobSpec`'s
/// `Serialize` writes.
#[derive(Serialize, Deserialize)]
#[serde(rename = "JobSpec")]
struct Fields<'a> {
    id: &'a str,
    queue: &'a str,
    #[serde(borrow)]
    trigger: TriggerFields<'a>,
    #[serde(borrow)]
    payload: RawIn<'a>,
    labels: Cow<'a, BTreeMap<String, String>>,
    max_fires: u64,
    end_time: Option<Timestamp>,
    misfire_policy: MisfirePolicy,
    misfire_grace: Micros,
    ack_deadline: Micros,
    max_attempts: u32,
    #[serde(borrow)]
    dead_letter_queue: Option<&'a str>,
    #[serde(default, skip_serializing_if = "OverlapPolicy::is_allow")]
    overlap_policy: OverlapPolicy,
}

impl<'a> Fields<'a> {
    fn of(spec: &'a JobSpec) -> Fields<'a> {
        Fields {
            id: &spec.id,
            queue: &spec.queue,
            trigger: match &spec.trigger {
                TriggerSpec::At { at } => TriggerFields::At { at: *at },
                TriggerSpec::After { after } => TriggerFields::After { after: *after },
                TriggerSpec::Every {
                    period,
                    start_time,
                    jitter,
                } => TriggerFields::Every {
                    period: *period,
                    start_time: *start_time,
                    jitter: *jitter,
                },
                TriggerSpec::Cron {
                    expression,
                    time_zone,
                    dst,
                } => TriggerFields::Cron {
                    expression,
                    time_zone,
                    dst: *dst,
                },
            },
            payload: RawIn(&spec.payload),
            labels: Cow::Borrowed(&spec.labels),
            max_fires: spec.max_fires,
            end_time: spec.end_time,
            misfire_policy: spec.misfire_policy,
            misfire_grace: spec.misfire_grace,
            ack_deadline: spec.ack_deadline,
            max_attempts: spec.max_attempts,
            dead_letter_queue: spec.dead_letter_queue.as_deref(),
            overlap_policy: spec.overlap_policy,
        }
    }
}

/// [`TriggerSpec`], borrowed (read and written as it is).
#[derive(Serialize, Deserialize)]
#[serde(rename = "TriggerSpec")]
enum TriggerFields<'a> {
    At {
        at: Timestamp,
    },
    After {
        after: Micros,
    },
    Every {
        period: Micros,
        start_time: Option<Timestamp>,
        jitter: Micros,
    },
    Cron {
        expression: &'a str,
        time_zone: &'a str,
        #[serde(default)]
        dst: DstPolicy,
    },
}

/// Bytes borrowed from the record being read, or written as MessagePack `bin` (as `Bytes` is).
struct RawIn<'a>(&'a [u8]);

impl Serialize for RawIn<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(self.0)
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for RawIn<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Borrowed;
        impl<'de> Visitor<'de> for Borrowed {
            type Value = RawIn<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("bytes borrowed from the record")
            }
            fn visit_borrowed_bytes<E: serde::de::Error>(
                self,
                v: &'de [u8],
            ) -> Result<Self::Value, E> {
                Ok(RawIn(v))
            }
        }
        deserializer.deserialize_bytes(Borrowed)
    }
}

/// Reads a stored spec record straight into a packed spec (see [`Fields`]). A record whose
/// strings or payload cannot be borrowed (not read from a byte slice, or a payload stored as
/// an array) is refused: read it as a [`JobSpec`] then.
impl<'de> Deserialize<'de> for PackedSpec {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Ok(PackedSpec::pack(Fields::deserialize(deserializer)?, true))
    }
}

/// Owns the spec while a payload `Bytes` made from it lives.
struct PayloadOf(PackedSpec);

impl AsRef<[u8]> for PayloadOf {
    fn as_ref(&self) -> &[u8] {
        self.0.payload_bytes()
    }
}

/// A packed spec ordered, compared and hashed by its job id alone: the key of the scheduler's
/// job indexes. Borrows as the id's bytes, so an index is searched with `id.as_bytes()`.
#[derive(Clone, Debug)]
pub struct JobKey(pub PackedSpec);

impl JobKey {
    pub fn id(&self) -> &str {
        self.0.id()
    }
}

impl PartialEq for JobKey {
    fn eq(&self, other: &JobKey) -> bool {
        self.0.id_bytes() == other.0.id_bytes()
    }
}

impl Eq for JobKey {}

impl PartialOrd for JobKey {
    fn partial_cmp(&self, other: &JobKey) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for JobKey {
    fn cmp(&self, other: &JobKey) -> Ordering {
        self.0.id_bytes().cmp(other.0.id_bytes())
    }
}

impl std::hash::Hash for JobKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.id_bytes().hash(state);
    }
}

impl Borrow<[u8]> for JobKey {
    fn borrow(&self) -> &[u8] {
        self.0.id_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::contract::spec;

    fn variants() -> Vec<JobSpec> {
        let mut out = Vec::new();
        for (i, trigger) in [
            TriggerSpec::At { at: Timestamp(-5) },
            TriggerSpec::After { after: 7 },
            TriggerSpec::Every {
                period: 10,
                start_time: None,
                jitter: 3,
            },
            TriggerSpec::Every {
                period: 10,
                start_time: Some(Timestamp(0)),
                jitter: 0,
            },
            TriggerSpec::Cron {
                expression: "*/5 * * * * *".into(),
                time_zone: "Europe/Berlin".into(),
                dst: Default::default(),
            },
            TriggerSpec::Cron {
                expression: "@daily".into(),
                time_zone: String::new(),
                dst: Default::default(),
            },
            TriggerSpec::Cron {
                expression: "30 2 * * *".into(),
                time_zone: "America/New_York".into(),
                dst: DstPolicy {
                    gap: crate::domain::DstGap::Skip,
                    repeat: crate::domain::DstRepeat::Both,
                },
            },
        ]
        .into_iter()
        .enumerate()
        {
            let mut s = spec(&format!("jöb-{i}"));
            s.trigger = trigger;
            s.queue = format!("queue.{i}");
            if i % 2 == 0 {
                s.labels.clear();
                s.payload = Bytes::new();
                s.dead_letter_queue = Some(String::new());
            } else {
                s.payload = Bytes::from(vec![i as u8; 300]);
                s.end_time = Some(Timestamp(i64::MIN));
                s.dead_letter_queue = Some("dead".into());
            }
            s.max_fires = i as u64;
            s.misfire_policy = [
                MisfirePolicy::FireOnce,
                MisfirePolicy::Skip,
                MisfirePolicy::FireAll,
            ][i % 3];
            out.push(s);
        }
        out
    }

    /// Every field comes back as it went in, for every trigger and with or without the
    /// optional fields (an empty dead-letter queue is not the same as none).
    #[test]
    fn a_packed_spec_gives_back_every_field() {
        for s in variants() {
            let packed = PackedSpec::new(&s);
            assert_eq!(packed.to_spec(), s);
            assert_eq!(packed.id(), &*s.id);
            assert_eq!(packed.payload(), s.payload);
            assert_eq!(packed.jitter(), s.trigger.jitter());
            assert_eq!(packed, PackedSpec::new(&s));
            assert_eq!(packed, s);
        }
        let all = variants();
        let mut other = all[1].clone();
        other.max_attempts += 1;
        assert_ne!(PackedSpec::new(&all[1]), PackedSpec::new(&other));
    }

    /// Strings past 64 KiB in all (only a stored cron expression can be that long) keep their
    /// offsets out of line and still come back whole; every other spec's fixed part stays 128
    /// bytes (a job with an 11-byte id, a 4-byte queue and a 64-byte payload is then 223 bytes
    /// with its reference count and length: jemalloc's 224-byte size class, not its 256).
    #[test]
    fn strings_past_64_kib_come_back_whole() {
        assert_eq!(std::mem::size_of::<Header>(), 128);
        for (id, labels) in [("long", false), ("long-with-labels", true)] {
            let mut s = spec(id);
            s.trigger = TriggerSpec::Cron {
                expression: format!("0 0 {} * * *", vec!["1"; 40_000].join(",")),
                time_zone: "Europe/Berlin".into(),
                dst: Default::default(),
            };
            s.dead_letter_queue = Some("dead".into());
            s.payload = Bytes::from(vec![7u8; 100]);
            if !labels {
                s.labels.clear();
            }
            let packed = PackedSpec::new(&s);
            assert_ne!(packed.header().flags & LONG_ENDS, 0);
            assert_eq!(packed.to_spec(), s);
            assert_eq!(packed.id_bytes(), id.as_bytes());
            assert_eq!(packed.queue(), s.queue);
            assert_eq!(packed.dead_letter_queue(), Some("dead"));
            assert_eq!(packed.payload(), s.payload);
            assert_eq!(packed, PackedSpec::new(&s));
        }
        let short = PackedSpec::new(&spec("short"));
        assert_eq!(short.header().flags & LONG_ENDS, 0);
        assert_eq!(short.to_spec(), spec("short"));
    }

    /// The recurrence a packed spec gives is the one its trigger resolves to, packed for
    /// delivery or not; a cron trigger that does not parse gives its error.
    #[test]
    fn a_packed_spec_resolves_as_its_trigger_does() {
        let created = Timestamp(1_700_000_000_000_000);
        let later = Timestamp(1_800_000_000_000_000);
        for s in variants() {
            let want = Recurrence::resolve(&s.trigger, created).expect("resolves");
            for packed in [PackedSpec::new(&s), PackedSpec::for_delivery(&s)] {
                let got = packed.recurrence(created).expect("resolves");
                assert_eq!(got.first(created), want.first(created));
                assert_eq!(got.next_after(later), want.next_after(later));
            }
            assert_eq!(PackedSpec::new(&s), PackedSpec::for_delivery(&s));
        }
        let mut bad = spec("bad");
        bad.trigger = TriggerSpec::Cron {
            expression: "* * *".into(),
            time_zone: "Mars/Olympus".into(),
            dst: Default::default(),
        };
        assert_eq!(
            PackedSpec::new(&bad).recurrence(created).err(),
            Recurrence::resolve(&bad.trigger, created).err()
        );
    }

    /// A held status comes back as it was kept (but for its trace context, which the scheduler
    /// keeps aside), with every optional time set or not, and
    /// keeping one leaves the index keys alone; none of it is part of the spec's equality.
    #[test]
    fn a_held_status_comes_back_as_kept() {
        let packed = PackedSpec::new(&spec("a"));
        packed.set_held_timer(true);
        packed.set_held_expiry(Some(Timestamp(-3)));
        for (i, state) in [
            JobState::Scheduled,
            JobState::Paused,
            JobState::Completed,
            JobState::Cancelled,
        ]
        .into_iter()
        .enumerate()
        {
            let status = JobStatus {
                state,
                next_occurrence: (i % 2 == 0).then_some(Timestamp(i64::MIN)),
                fire_count: u64::MAX - i as u64,
                create_time: Timestamp(i as i64 - 2),
                last_fire_time: (i % 2 == 1).then_some(Timestamp(0)),
                finish_time: (i > 1).then_some(Timestamp(i64::MAX)),
                trace: None,
            };
            packed.hold_status(&status);
            assert_eq!(packed.held_status(), status);
            assert!(packed.held_timer());
            assert_eq!(packed.held_expiry(), Some(Timestamp(-3)));
        }
        packed.set_held_timer(false);
        packed.set_held_expiry(None);
        assert!(!packed.held_timer());
        assert_eq!(packed.held_expiry(), None);
        assert_eq!(packed.held_status().state, JobState::Cancelled);
        assert_eq!(packed, PackedSpec::new(&spec("a")));
    }

    /// The stores encode a packed spec; its record must be byte for byte the plain spec's, or
    /// stored jobs would read back differently.
    #[test]
    fn a_packed_spec_encodes_as_the_spec_it_holds() {
        for s in variants() {
            let packed = PackedSpec::new(&s);
            assert_eq!(
                rmp_serde::to_vec(&packed).expect("encode"),
                rmp_serde::to_vec(&s).expect("encode")
            );
            assert_eq!(
                rmp_serde::to_vec_named(&packed).expect("encode"),
                rmp_serde::to_vec_named(&s).expect("encode")
            );
        }
    }

    /// A stored record reads straight into the packed spec that packing its `JobSpec` gives,
    /// in both record forms (arrays, and maps with field names), cron schedule included; a
    /// payload stored as an array of numbers is refused (the store then reads a `JobSpec`).
    #[test]
    fn a_stored_record_reads_into_a_packed_spec() {
        let created = Timestamp(1_700_000_000_000_000);
        for s in variants() {
            let want = PackedSpec::new(&s);
            for bytes in [
                rmp_serde::to_vec(&s).expect("encode"),
                rmp_serde::to_vec_named(&s).expect("encode"),
            ] {
                let read: PackedSpec = rmp_serde::from_slice(&bytes).expect("decode");
                assert_eq!(read, want);
                assert_eq!(read.to_spec(), s);
                assert_eq!(
                    read.recurrence(created)
                        .expect("resolves")
                        .next_after(created),
                    want.recurrence(created)
                        .expect("resolves")
                        .next_after(created)
                );
            }
        }
        let mut s = spec("a");
        s.payload = Bytes::from_static(b"xy");
        let as_array = rmp_serde::to_vec(&(
            &*s.id,
            &s.queue,
            &s.trigger,
            [b'x', b'y'],
            &s.labels,
            s.max_fires,
            s.end_time,
            s.misfire_policy,
            s.misfire_grace,
            s.ack_deadline,
            s.max_attempts,
            &s.dead_letter_queue,
        ))
        .expect("encode");
        assert!(rmp_serde::from_slice::<PackedSpec>(&as_array).is_err());
        let read: JobSpec = rmp_serde::from_slice(&as_array).expect("decode");
        assert_eq!(read, s);
    }

    /// Keys order as their ids do, and an index of them is searched by the id's bytes.
    #[test]
    fn keys_order_and_borrow_as_their_ids() {
        let ids = ["b", "a", "ab", "é", "Z"];
        let keys: std::collections::BTreeSet<JobKey> = ids
            .iter()
            .map(|id| JobKey(PackedSpec::new(&spec(id))))
            .collect();
        let mut sorted = ids.to_vec();
        sorted.sort();
        assert_eq!(keys.iter().map(JobKey::id).collect::<Vec<_>>(), sorted);
        assert!(keys.contains("ab".as_bytes()));
        assert!(!keys.contains("c".as_bytes()));
    }

    /// A cron trigger stored before DST policies existed (two fields) reads back with the
    /// default policy, in both record forms and through both readers (the owned spec and the
    /// borrowed fields a packed spec is read from).
    #[test]
    fn cron_records_without_a_dst_policy_read_as_the_default() {
        #[derive(Serialize)]
        #[serde(rename = "TriggerSpec")]
        #[allow(dead_code)]
        enum OldTrigger {
            At {
                at: Timestamp,
            },
            After {
                after: Micros,
            },
            Every {
                period: Micros,
                start_time: Option<Timestamp>,
                jitter: Micros,
            },
            Cron {
                expression: String,
                time_zone: String,
            },
        }
        let old = OldTrigger::Cron {
            expression: "30 2 * * *".into(),
            time_zone: "Europe/Berlin".into(),
        };
        for bytes in [
            rmp_serde::to_vec(&old).expect("encode"),
            rmp_serde::to_vec_named(&old).expect("encode"),
        ] {
            let spec: TriggerSpec = rmp_serde::from_slice(&bytes).expect("decode");
            assert_eq!(
                spec,
                TriggerSpec::Cron {
                    expression: "30 2 * * *".into(),
                    time_zone: "Europe/Berlin".into(),
                    dst: DstPolicy::default(),
                }
            );
            let fields: TriggerFields<'_> = rmp_serde::from_slice(&bytes).expect("decode");
            assert!(matches!(
                fields,
                TriggerFields::Cron { expression: "30 2 * * *", dst, .. } if dst == DstPolicy::default()
            ));
        }
    }
}
