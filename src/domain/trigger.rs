//! Trigger arithmetic: when a job's occurrences fall.
//!
//! A [`TriggerSpec`] is what the client asked for and is stored as given (an `after` stays a
//! duration, so a repeated Schedule compares equal). A [`Recurrence`] is the spec resolved against
//! the job's creation time; it answers "next occurrence after t" and "latest occurrence at or
//! before t". Cron parsing and time-zone arithmetic are croner's and chrono-tz's; nothing here
//! reads a clock; what DST does to a cron schedule is [`super::dst`]'s.

use std::str::FromStr;
use std::sync::Arc;

use chrono_tz::Tz;
use croner::Cron;
use croner::parser::{CronParser, Seconds, Year};
use serde::{Deserialize, Serialize};

use super::dst::{self, DstEffect, DstPolicy, Slot, Walk};
use super::ledger::{SkipReason, Skipped};
use super::time::{Micros, Timestamp};

/// A trigger as the client gave it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TriggerSpec {
    /// Once, at this instant.
    At { at: Timestamp },
    /// Once, this long after the job was created.
    After { after: Micros },
    /// At `start_time + k * period`; `start_time` defaults to creation + period.
    Every {
        period: Micros,
        start_time: Option<Timestamp>,
        jitter: Micros,
    },
    /// On a cron expression in an IANA time zone (empty = UTC).
    Cron {
        expression: String,
        time_zone: String,
        /// Absent from records written before DST policies existed: `Auto`, what those jobs did.
        #[serde(default)]
        dst: DstPolicy,
    },
}

impl TriggerSpec {
    /// The most a fire of this trigger is delayed by jitter.
    pub fn jitter(&self) -> Micros {
        match self {
            TriggerSpec::Every { jitter, .. } => *jitter,
            _ => 0,
        }
    }
}

/// Why a trigger cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TriggerError {
    #[error("cron expression {expression:?} is invalid: {reason}")]
    InvalidCron { expression: String, reason: String },
    #[error("unknown time zone {0:?}; use an IANA name such as Europe/Berlin")]
    UnknownTimeZone(String),
}

/// A trigger resolved against its job's creation time.
#[derive(Debug, Clone)]
pub enum Recurrence {
    Once(Timestamp),
    Every {
        start: Timestamp,
        period: Micros,
    },
    /// Shared, so that cloning a job (the writer does, per change) does not copy the schedule.
    Cron {
        cron: Arc<Cron>,
        tz: Tz,
        dst: DstPolicy,
    },
}

/// How far [`Recurrence::count_between`] walks a cron schedule before it stops counting.
pub const MAX_COUNTED_OCCURRENCES: u64 = 10_000;

/// Parses a cron expression the way tickd accepts it: 5 fields, 6 with leading seconds, or an
/// @alias. Also used by validation, so the error text reaches the client.
///
/// A field that selects no value at all (croner reads `,` or `,,` as an empty list) is refused
/// here: such a pattern never matches, and croner would search 3,000 years of minutes or
/// seconds to say so (half a minute of CPU in a request's validation).
pub fn parse_cron(expression: &str) -> Result<Cron, TriggerError> {
    let invalid = |reason: String| TriggerError::InvalidCron {
        expression: expression.to_string(),
        reason,
    };
    let cron = CronParser::builder()
        .seconds(Seconds::Optional)
        .year(Year::Disallowed)
        .build()
        .parse(expression)
        .map_err(|e| invalid(e.to_string()))?;
    let p = &cron.pattern;
    for (field, component) in [
        ("seconds", &p.seconds),
        ("minutes", &p.minutes),
        ("hours", &p.hours),
        ("day-of-month", &p.days),
        ("month", &p.months),
        ("day-of-week", &p.days_of_week),
    ] {
        if component.values().is_empty() && !component.has_modifiers() {
            return Err(invalid(format!("its {field} field selects no value")));
        }
    }
    Ok(cron)
}

/// Parses an IANA time zone name; empty means UTC.
pub fn parse_time_zone(name: &str) -> Result<Tz, TriggerError> {
    if name.is_empty() {
        return Ok(Tz::UTC);
    }
    Tz::from_str(name).map_err(|_| TriggerError::UnknownTimeZone(name.to_string()))
}

impl Recurrence {
    /// Resolves a spec for a job created at `created`.
    pub fn resolve(spec: &TriggerSpec, created: Timestamp) -> Result<Recurrence, TriggerError> {
        Ok(match spec {
            TriggerSpec::At { at } => Recurrence::Once(*at),
            TriggerSpec::After { after } => Recurrence::Once(created.plus(*after)),
            TriggerSpec::Every {
                period, start_time, ..
            } => Recurrence::Every {
                start: start_time.unwrap_or_else(|| created.plus(*period)),
                // Validation refuses a period below 1 ms; this keeps the arithmetic total anyway.
                period: (*period).max(1),
            },
            TriggerSpec::Cron {
                expression,
                time_zone,
                dst,
            } => Recurrence::Cron {
                cron: Arc::new(parse_cron(expression)?),
                tz: parse_time_zone(time_zone)?,
                dst: *dst,
            },
        })
    }

    /// The job's first occurrence. Only a one-shot trigger may have it before `created` (an
    /// `at` in the past fires at once); an interval whose start is in the past begins at its
    /// first grid point at or after creation, as cron begins at its first match after it.
    pub fn first(&self, created: Timestamp) -> Option<Timestamp> {
        match self {
            Recurrence::Once(at) => Some(*at),
            Recurrence::Every { start, .. } if *start >= created => Some(*start),
            Recurrence::Every { .. } => self.next_after(created.minus(1)),
            Recurrence::Cron { .. } => self.next_after(created),
        }
    }

    /// The first occurrence strictly after `t`.
    pub fn next_after(&self, t: Timestamp) -> Option<Timestamp> {
        match self {
            Recurrence::Once(at) => (*at > t).then_some(*at),
            Recurrence::Every { start, period } => {
                if t < *start {
                    return Some(*start);
                }
                let k = t.since(*start) / period + 1;
                k.checked_mul(*period)
                    .and_then(|off| start.0.checked_add(off))
                    .map(Timestamp)
            }
            Recurrence::Cron { cron, tz, dst } => {
                Walk::new(cron, *tz, *dst, t, false).next().map(|s| s.at)
            }
        }
    }

    /// The latest occurrence at or before `t`, if any.
    pub fn latest_at_or_before(&self, t: Timestamp) -> Option<Timestamp> {
        match self {
            Recurrence::Once(at) => (*at <= t).then_some(*at),
            Recurrence::Every { start, period } => {
                if t < *start {
                    return None;
                }
                let k = t.since(*start) / period;
                Some(start.plus(k * period))
            }
            Recurrence::Cron { cron, tz, dst } => dst::latest_at_or_before(cron, *tz, *dst, t),
        }
    }

    /// Occurrences in `[from, to]`, counting at most `limit` for cron (the walk costs per step).
    /// Returns the count and whether it stopped at the limit.
    pub fn count_between(&self, from: Timestamp, to: Timestamp, limit: u64) -> (u64, bool) {
        if to < from {
            return (0, false);
        }
        match self {
            Recurrence::Once(at) => (u64::from(*at >= from && *at <= to), false),
            Recurrence::Every { start, period } => {
                let first = if from <= *start {
                    Some(*start)
                } else {
                    self.next_after(from.minus(1))
                };
                match (first, self.latest_at_or_before(to)) {
                    (Some(a), Some(b)) if a <= b => ((b.since(a) / period) as u64 + 1, false),
                    _ => (0, false),
                }
            }
            Recurrence::Cron { cron, tz, dst } => {
                let mut n = 0;
                for slot in Walk::new(cron, *tz, *dst, from.minus(1), false) {
                    if slot.at > to {
                        break;
                    }
                    if n == limit {
                        return (n, true);
                    }
                    n += 1;
                }
                (n, false)
            }
        }
    }

    /// [`Recurrence::next_after`], and the slots the job's DST policy skipped on the way there
    /// (local times that did not exist, second or first instants of repeated ones), as runs;
    /// only those before `end` (exclusive), where the job ends.
    pub fn next_after_with_dst_skips(
        &self,
        t: Timestamp,
        end: Option<Timestamp>,
    ) -> (Option<Timestamp>, Vec<Skipped>) {
        let Recurrence::Cron { cron, tz, dst } = self else {
            return (self.next_after(t), Vec::new());
        };
        let mut skipped = Vec::new();
        for slot in Walk::new(cron, *tz, *dst, t, true) {
            if slot.released {
                return (Some(slot.at), skipped);
            }
            if end.is_some_and(|e| slot.at >= e) {
                return (None, skipped);
            }
            let reason = match slot.effect {
                DstEffect::Gap => SkipReason::DstGap,
                _ => SkipReason::DstRepeat,
            };
            Skipped::push(&mut skipped, slot.at, reason);
        }
        (None, skipped)
    }

    /// The slots of a cron schedule after `t`, skipped ones included, with what DST did to each
    /// (for previews). None for other triggers.
    pub fn cron_slots(&self, t: Timestamp) -> Option<impl Iterator<Item = Slot> + '_> {
        match self {
            Recurrence::Cron { cron, tz, dst } => Some(Walk::new(cron, *tz, *dst, t, true)),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{NaiveDate, TimeZone, Utc};

    fn utc(y: i32, mo: u32, d: u32, h: u32, mi: u32, s: u32) -> Timestamp {
        let t = Utc
            .with_ymd_and_hms(y, mo, d, h, mi, s)
            .single()
            .expect("valid UTC time");
        Timestamp::from_chrono(&t)
    }

    fn local(tz: Tz, y: i32, mo: u32, d: u32, h: u32, mi: u32) -> String {
        let naive = NaiveDate::from_ymd_opt(y, mo, d)
            .and_then(|d| d.and_hms_opt(h, mi, 0))
            .expect("valid date");
        format!("{naive} {}", tz.name())
    }

    fn cron(expr: &str, tz: &str) -> Recurrence {
        Recurrence::resolve(
            &TriggerSpec::Cron {
                expression: expr.into(),
                time_zone: tz.into(),
                dst: DstPolicy::default(),
            },
            Timestamp(0),
        )
        .expect("valid cron")
    }

    fn in_zone(t: Timestamp, tz: Tz) -> String {
        let dt = t.to_chrono().expect("in range").with_timezone(&tz);
        format!("{} {}", dt.naive_local(), tz.name())
    }

    /// `after` resolves to an absolute time counted from creation.
    #[test]
    fn after_is_counted_from_creation() {
        let r = Recurrence::resolve(&TriggerSpec::After { after: 1_500_000 }, Timestamp(10))
            .expect("valid");
        assert_eq!(r.first(Timestamp(10)), Some(Timestamp(1_500_010)));
        assert_eq!(r.next_after(Timestamp(1_500_010)), None);
    }

    /// An interval whose start is before creation begins at its first grid point from creation
    /// on: occurrences from before the job existed are not owed.
    #[test]
    fn interval_with_past_start_begins_at_creation() {
        let spec = TriggerSpec::Every {
            period: 10,
            start_time: Some(Timestamp(0)),
            jitter: 0,
        };
        let r = Recurrence::resolve(&spec, Timestamp(1_005)).expect("valid");
        assert_eq!(r.first(Timestamp(1_005)), Some(Timestamp(1_010)));
        assert_eq!(r.first(Timestamp(1_010)), Some(Timestamp(1_010)));
    }

    /// Intervals land on start + k·period exactly, however late they are asked.
    #[test]
    fn interval_has_no_drift() {
        let r = Recurrence::Every {
            start: Timestamp(1_000),
            period: 250,
        };
        assert_eq!(r.next_after(Timestamp(0)), Some(Timestamp(1_000)));
        assert_eq!(r.next_after(Timestamp(1_000)), Some(Timestamp(1_250)));
        assert_eq!(r.next_after(Timestamp(1_249)), Some(Timestamp(1_250)));
        assert_eq!(
            r.next_after(Timestamp(1_000_017)),
            Some(Timestamp(1_000_250))
        );
        assert_eq!(r.latest_at_or_before(Timestamp(999)), None);
        assert_eq!(
            r.latest_at_or_before(Timestamp(1_499)),
            Some(Timestamp(1_250))
        );
        assert_eq!(
            r.count_between(Timestamp(1_000), Timestamp(2_000), 10),
            (5, false)
        );
        assert_eq!(
            r.count_between(Timestamp(1_001), Timestamp(1_999), 10),
            (3, false)
        );
    }

    /// Without a start time the first interval occurrence is one period after creation.
    #[test]
    fn interval_defaults_to_one_period_after_creation() {
        let spec = TriggerSpec::Every {
            period: 5,
            start_time: None,
            jitter: 0,
        };
        let r = Recurrence::resolve(&spec, Timestamp(100)).expect("valid");
        assert_eq!(r.first(Timestamp(100)), Some(Timestamp(105)));
    }

    /// Cron with seconds fires on whole seconds, strictly after the given instant.
    #[test]
    fn cron_with_seconds_is_exclusive_and_whole() {
        let r = cron("*/10 * * * * *", "");
        let t = utc(2026, 1, 1, 0, 0, 0);
        assert_eq!(r.next_after(t), Some(utc(2026, 1, 1, 0, 0, 10)));
        assert_eq!(
            r.next_after(t.plus(500_000)),
            Some(utc(2026, 1, 1, 0, 0, 10))
        );
        assert_eq!(
            r.latest_at_or_before(utc(2026, 1, 1, 0, 0, 19).plus(999_999)),
            Some(utc(2026, 1, 1, 0, 0, 10))
        );
        assert_eq!(
            r.count_between(t, utc(2026, 1, 1, 0, 1, 0), 100),
            (7, false)
        );
        assert_eq!(r.count_between(t, utc(2026, 1, 1, 0, 1, 0), 3), (3, true));
    }

    /// Aliases such as @hourly parse.
    #[test]
    fn cron_aliases_parse() {
        let r = cron("@hourly", "UTC");
        assert_eq!(
            r.next_after(utc(2026, 3, 1, 10, 15, 0)),
            Some(utc(2026, 3, 1, 11, 0, 0))
        );
    }

    /// Bad expressions and zones are refused with a reason.
    #[test]
    fn bad_cron_and_zone_are_errors() {
        assert!(matches!(
            parse_cron("61 * * * *"),
            Err(TriggerError::InvalidCron { .. })
        ));
        assert!(matches!(
            parse_cron("not cron"),
            Err(TriggerError::InvalidCron { .. })
        ));
        assert_eq!(
            parse_time_zone("Mars/Olympus"),
            Err(TriggerError::UnknownTimeZone("Mars/Olympus".into()))
        );
    }

    /// A field that lists nothing (`,`) is refused when parsed, not searched for 3,000 years
    /// (found by fuzzing: `, * * * *` took 15 s of CPU in Schedule's validation).
    #[test]
    fn a_field_that_selects_nothing_is_refused_at_once() {
        for expr in [
            ", * * * *",
            "30 ,,,,,,,,,,,,,,,, * * * *",
            ", * * * * *",
            "0 0 ,,, * *",
            "0 0 * ,,, *",
            "0 0 * * ,,,",
            "0 0 , * MON",
        ] {
            let refused = parse_cron(expr);
            assert!(
                matches!(&refused, Err(TriggerError::InvalidCron { reason, .. }) if reason.contains("selects no value")),
                "{expr}: {refused:?}"
            );
        }
        // Lists with a value, and modifiers, still parse.
        for expr in [
            "0,30 * * * *",
            "0 0 L * *",
            "0 0 * * 5#3",
            "0 0 15W * *",
            "0 0 * * 5L",
        ] {
            assert!(parse_cron(expr).is_ok(), "{expr}");
        }
    }

    /// Spring forward in Berlin: 02:30 does not exist on 2026-03-29, so it fires once at 03:00
    /// local, and the day before and after fire at 02:30 as usual.
    #[test]
    fn berlin_spring_forward_fires_once_at_next_valid_instant() {
        let tz: Tz = "Europe/Berlin".parse().expect("zone");
        let r = cron("30 2 * * *", "Europe/Berlin");
        let mut t = utc(2026, 3, 27, 12, 0, 0);
        let mut seen = Vec::new();
        for _ in 0..3 {
            let next = r.next_after(t).expect("an occurrence");
            seen.push(in_zone(next, tz));
            t = next;
        }
        assert_eq!(
            seen,
            vec![
                local(tz, 2026, 3, 28, 2, 30),
                local(tz, 2026, 3, 29, 3, 0),
                local(tz, 2026, 3, 30, 2, 30),
            ]
        );
    }

    /// Fall back in Berlin: 02:30 happens twice on 2026-10-25, and the job fires once.
    #[test]
    fn berlin_fall_back_fires_once() {
        let r = cron("30 2 * * *", "Europe/Berlin");
        let from = utc(2026, 10, 24, 12, 0, 0);
        let to = utc(2026, 10, 26, 12, 0, 0);
        assert_eq!(r.count_between(from, to, 100), (2, false));
        // 02:30 CEST (UTC+2) is 00:30Z; the repeat at 02:30 CET (01:30Z) must not fire.
        assert_eq!(r.next_after(from), Some(utc(2026, 10, 25, 0, 30, 0)));
    }

    /// New York skips no day around its DST changes and keeps 09:00 local on both sides.
    #[test]
    fn new_york_daily_job_keeps_local_time_across_dst() {
        let tz: Tz = "America/New_York".parse().expect("zone");
        let r = cron("0 9 * * *", "America/New_York");
        // 2026-03-08 spring forward, 2026-11-01 fall back.
        for (from, days) in [
            (utc(2026, 3, 6, 20, 0, 0), 4),
            (utc(2026, 10, 30, 20, 0, 0), 4),
        ] {
            let mut t = from;
            let mut prev_day = None;
            for _ in 0..days {
                let next = r.next_after(t).expect("an occurrence");
                let dt = next.to_chrono().expect("range").with_timezone(&tz);
                assert_eq!(dt.format("%H:%M").to_string(), "09:00");
                let day = dt.date_naive();
                if let Some(p) = prev_day {
                    assert_eq!(day, p + chrono::Days::new(1), "no day skipped");
                }
                prev_day = Some(day);
                t = next;
            }
        }
        // An hourly job on the fall-back night fires at both 01:00s (they are distinct hours).
        let hourly = cron("0 * * * *", "America/New_York");
        let (n, _) = hourly.count_between(
            utc(2026, 11, 1, 4, 0, 0), // 00:00 EDT
            utc(2026, 11, 1, 8, 0, 0), // 03:00 EST
            100,
        );
        assert_eq!(n, 5, "00:00, 01:00 EDT, 01:00 EST, 02:00, 03:00");
    }

    /// A New York job at 02:30 on the spring-forward day fires once at 03:00 and returns to
    /// 02:30 the next day.
    #[test]
    fn new_york_spring_forward_gap() {
        let tz: Tz = "America/New_York".parse().expect("zone");
        let r = cron("30 2 * * *", "America/New_York");
        let next = r.next_after(utc(2026, 3, 7, 12, 0, 0)).expect("occurrence");
        assert_eq!(in_zone(next, tz), local(tz, 2026, 3, 8, 3, 0));
        let after = r.next_after(next).expect("occurrence");
        assert_eq!(in_zone(after, tz), local(tz, 2026, 3, 9, 2, 30));
    }
}
