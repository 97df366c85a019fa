//! A cron schedule in a time zone, walked in wall-clock time, and what a job's DST policy makes
//! of a local time that does not exist (the clocks spring forward over it) or that happens twice
//! (they fall back over it).
//!
//! croner matches the pattern against wall-clock times only (it is handed them as UTC, so it
//! sees no DST of its own); chrono-tz says which instants each match names: one, none (a gap) or
//! two (a fold). [`Walk`] puts the results in instant order, including, when asked, the slots a
//! policy skips. Nothing here reads a clock.

use chrono::{DateTime, LocalResult, NaiveDateTime, Offset, TimeZone, Utc};
use chrono_tz::Tz;
use croner::{Cron, JobType};
use serde::{Deserialize, Serialize};

use super::time::{MICROS_PER_SECOND, Timestamp};

/// What a cron job does with a local time that does not exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum DstGap {
    /// [`DstGap::Shift`] for a fixed-time job, [`DstGap::Skip`] for any other (see
    /// [`DstPolicy`]).
    #[default]
    Auto,
    /// Fire once at the first instant after the gap.
    Shift,
    /// Do not fire.
    Skip,
}

/// What a cron job does with a local time that happens twice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum DstRepeat {
    /// [`DstRepeat::First`] for a fixed-time job, [`DstRepeat::Both`] for any other.
    #[default]
    Auto,
    /// Fire at the first of the two instants.
    First,
    /// Fire at the second.
    Last,
    /// Fire at both.
    Both,
}

/// A cron job's DST policy. `Auto` is what cron has always done (Vixie cron, croner): a
/// fixed-time job (one second, one minute and one hour, such as `30 2 * * *`) fires once on a
/// DST day, at the end of a gap or at the first of a repeated time; any other job runs by the
/// wall clock, so an hour that does not exist has no runs and one that happens twice has two.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct DstPolicy {
    #[serde(default)]
    pub gap: DstGap,
    #[serde(default)]
    pub repeat: DstRepeat,
}

impl DstPolicy {
    /// The policy as one number, for a packed spec (and back with [`DstPolicy::from_code`]).
    pub fn code(self) -> i64 {
        let gap = match self.gap {
            DstGap::Auto => 0,
            DstGap::Shift => 1,
            DstGap::Skip => 2,
        };
        let repeat = match self.repeat {
            DstRepeat::Auto => 0,
            DstRepeat::First => 1,
            DstRepeat::Last => 2,
            DstRepeat::Both => 3,
        };
        gap | (repeat << 8)
    }

    pub fn from_code(code: i64) -> DstPolicy {
        DstPolicy {
            gap: match code & 0xff {
                1 => DstGap::Shift,
                2 => DstGap::Skip,
                _ => DstGap::Auto,
            },
            repeat: match (code >> 8) & 0xff {
                1 => DstRepeat::First,
                2 => DstRepeat::Last,
                3 => DstRepeat::Both,
                _ => DstRepeat::Auto,
            },
        }
    }

    /// The policy with `Auto` decided for this cron.
    fn decide(self, cron: &Cron) -> Decided {
        let fixed = cron.determine_job_type() == JobType::FixedTime;
        let repeat = match self.repeat {
            DstRepeat::Auto if fixed => DstRepeat::First,
            DstRepeat::Auto => DstRepeat::Both,
            r => r,
        };
        Decided {
            shift: match self.gap {
                DstGap::Auto => fixed,
                g => g == DstGap::Shift,
            },
            first: matches!(repeat, DstRepeat::First | DstRepeat::Both),
            second: matches!(repeat, DstRepeat::Last | DstRepeat::Both),
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Decided {
    shift: bool,
    first: bool,
    second: bool,
}

/// What DST did to a slot of the schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DstEffect {
    /// Its local time happens once.
    None,
    /// Its local time does not exist; `at` is the first instant after the gap.
    Gap,
    /// Its local time happens twice; this is the first of the two instants.
    RepeatFirst,
    /// Its local time happens twice; this is the second.
    RepeatSecond,
}

/// One slot of a cron schedule: a local time the pattern matches, the instant it stands for,
/// and whether the job's policy releases it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    pub at: Timestamp,
    /// The wall-clock time the pattern matched (for a gap, the first match in it).
    pub local: NaiveDateTime,
    pub effect: DstEffect,
    pub released: bool,
}

/// How many pattern matches one [`Walk`] step may look at before it gives up: a pattern whose
/// every match is skipped by its policy (only possible for dates that exist only in DST gaps)
/// must not loop for ever.
const MAX_MATCHES_PER_STEP: u32 = 100_000;

/// The slots of a cron schedule strictly after an instant, in instant order.
pub struct Walk<'a> {
    cron: &'a Cron,
    tz: Tz,
    policy: Decided,
    with_skipped: bool,
    after: Timestamp,
    state: State,
}

#[derive(Debug, Clone, Copy)]
enum State {
    /// The next match after `from` (at it when `inclusive`), outside any fold.
    Plain {
        from: NaiveDateTime,
        inclusive: bool,
    },
    /// Walking a fold's matches: their first instants, then (`second`) their second ones.
    Fold {
        fold: Fold,
        second: bool,
        from: NaiveDateTime,
        inclusive: bool,
    },
    Done,
}

/// A range of local times that happens twice: `[start, end)`, first at offset `first_offset`
/// (seconds east of UTC), then again at `second_offset`.
#[derive(Debug, Clone, Copy)]
struct Fold {
    start: NaiveDateTime,
    end: NaiveDateTime,
    first_offset: i64,
    second_offset: i64,
}

impl Fold {
    fn instant(&self, local: NaiveDateTime, second: bool) -> Timestamp {
        let offset = if second {
            self.second_offset
        } else {
            self.first_offset
        };
        Timestamp(
            local
                .and_utc()
                .timestamp_micros()
                .saturating_sub(offset * MICROS_PER_SECOND),
        )
    }
}

impl<'a> Walk<'a> {
    /// The slots after `after`; with `with_skipped`, also those the policy does not release.
    pub fn new(
        cron: &'a Cron,
        tz: Tz,
        policy: DstPolicy,
        after: Timestamp,
        with_skipped: bool,
    ) -> Walk<'a> {
        let state = match wall(tz, after) {
            None => State::Done,
            Some(w) => match tz.from_local_datetime(&w) {
                LocalResult::Ambiguous(e, l) => match fold_of(tz, &e, &l) {
                    Some(fold) => State::Fold {
                        fold,
                        // `after` is in the fold's second pass if it is past the first.
                        second: offset_at(tz, after.0.div_euclid(MICROS_PER_SECOND))
                            == Some(fold.second_offset),
                        from: w,
                        inclusive: false,
                    },
                    None => State::Plain {
                        from: w,
                        inclusive: false,
                    },
                },
                _ => State::Plain {
                    from: w,
                    inclusive: false,
                },
            },
        };
        Walk {
            cron,
            tz,
            policy: policy.decide(cron),
            with_skipped,
            after,
            state,
        }
    }

    fn next_match(&self, from: NaiveDateTime, inclusive: bool) -> Option<NaiveDateTime> {
        self.cron
            .find_next_occurrence(&Utc.from_utc_datetime(&from), inclusive)
            .ok()
            .map(|d| d.naive_utc())
    }
}

impl Iterator for Walk<'_> {
    type Item = Slot;

    fn next(&mut self) -> Option<Slot> {
        for _ in 0..MAX_MATCHES_PER_STEP {
            match self.state {
                State::Done => return None,
                State::Plain { from, inclusive } => {
                    let Some(m) = self.next_match(from, inclusive) else {
                        self.state = State::Done;
                        return None;
                    };
                    self.state = State::Plain {
                        from: m,
                        inclusive: false,
                    };
                    match self.tz.from_local_datetime(&m) {
                        LocalResult::Single(d) => {
                            let at = Timestamp::from_chrono(&d);
                            if at > self.after {
                                return Some(Slot {
                                    at,
                                    local: m,
                                    effect: DstEffect::None,
                                    released: true,
                                });
                            }
                        }
                        LocalResult::Ambiguous(e, l) => {
                            if let Some(fold) = fold_of(self.tz, &e, &l) {
                                self.state = State::Fold {
                                    fold,
                                    second: false,
                                    from: m,
                                    inclusive: true,
                                };
                            }
                        }
                        LocalResult::None => {
                            let Some((at, end)) = gap_of(self.tz, m) else {
                                continue;
                            };
                            // Shifted, the gap's matches are one fire at `at`, and so is a
                            // match at the gap's end (the same instant).
                            self.state = State::Plain {
                                from: end,
                                inclusive: !self.policy.shift,
                            };
                            if at > self.after && (self.policy.shift || self.with_skipped) {
                                return Some(Slot {
                                    at,
                                    local: m,
                                    effect: DstEffect::Gap,
                                    released: self.policy.shift,
                                });
                            }
                        }
                    }
                }
                State::Fold {
                    fold,
                    second,
                    from,
                    inclusive,
                } => {
                    let released = if second {
                        self.policy.second
                    } else {
                        self.policy.first
                    };
                    let m = if released || self.with_skipped {
                        self.next_match(from, inclusive).filter(|m| *m < fold.end)
                    } else {
                        None
                    };
                    let Some(m) = m else {
                        self.state = if second {
                            State::Plain {
                                from: fold.end,
                                inclusive: true,
                            }
                        } else {
                            State::Fold {
                                fold,
                                second: true,
                                from: fold.start,
                                inclusive: true,
                            }
                        };
                        continue;
                    };
                    self.state = State::Fold {
                        fold,
                        second,
                        from: m,
                        inclusive: false,
                    };
                    let at = fold.instant(m, second);
                    if at > self.after {
                        return Some(Slot {
                            at,
                            local: m,
                            effect: if second {
                                DstEffect::RepeatSecond
                            } else {
                                DstEffect::RepeatFirst
                            },
                            released,
                        });
                    }
                }
            }
        }
        self.state = State::Done;
        None
    }
}

/// The latest released slot at or before `t`.
pub fn latest_at_or_before(
    cron: &Cron,
    tz: Tz,
    policy: DstPolicy,
    t: Timestamp,
) -> Option<Timestamp> {
    // Cron works in whole seconds: search from the second that contains `t`.
    let whole = Timestamp(t.0.div_euclid(MICROS_PER_SECOND) * MICROS_PER_SECOND);
    let mut probe = wall(tz, whole)?;
    let mut inclusive = true;
    // Each round goes back one match; only matches a policy skips make it take more than one.
    for _ in 0..1_000 {
        let m = cron
            .find_previous_occurrence(&Utc.from_utc_datetime(&probe), inclusive)
            .ok()?
            .naive_utc();
        let earliest = match tz.from_local_datetime(&m) {
            LocalResult::Single(d) => Some(Timestamp::from_chrono(&d)),
            LocalResult::Ambiguous(e, _) => Some(Timestamp::from_chrono(&e)),
            LocalResult::None => gap_of(tz, m).map(|(at, _)| at),
        };
        if let Some(earliest) = earliest {
            let latest = Walk::new(cron, tz, policy, earliest.minus(1), false)
                .map(|s| s.at)
                .take_while(|at| *at <= t)
                .last();
            if latest.is_some() {
                return latest;
            }
        }
        probe = m;
        inclusive = false;
    }
    None
}

/// The wall-clock time at `t` in `tz`.
fn wall(tz: Tz, t: Timestamp) -> Option<NaiveDateTime> {
    tz.timestamp_micros(t.0).single().map(|d| d.naive_local())
}

/// The UTC offset (seconds east) in force at `secs` seconds since the epoch.
fn offset_at(tz: Tz, secs: i64) -> Option<i64> {
    let utc = DateTime::from_timestamp(secs, 0)?.naive_utc();
    Some(i64::from(
        tz.offset_from_utc_datetime(&utc).fix().local_minus_utc(),
    ))
}

/// The first second in `(lo, hi]` whose offset is not `lo`'s (the transition between them).
fn transition(tz: Tz, mut lo: i64, mut hi: i64) -> Option<i64> {
    let before = offset_at(tz, lo)?;
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if offset_at(tz, mid)? == before {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Some(hi)
}

/// The fold holding a local time whose two instants are `e` and `l`.
fn fold_of(tz: Tz, e: &DateTime<Tz>, l: &DateTime<Tz>) -> Option<Fold> {
    let first_offset = i64::from(e.offset().fix().local_minus_utc());
    let second_offset = i64::from(l.offset().fix().local_minus_utc());
    let at = transition(tz, e.timestamp(), l.timestamp())?;
    let local = |offset: i64| DateTime::from_timestamp(at + offset, 0).map(|d| d.naive_utc());
    Some(Fold {
        start: local(second_offset)?,
        end: local(first_offset)?,
        first_offset,
        second_offset,
    })
}

/// For a local time `m` in a gap: the instant the clocks jumped, and the local time they jumped
/// to. None if the zone's offsets around it are not one simple step forward.
fn gap_of(tz: Tz, m: NaiveDateTime) -> Option<(Timestamp, NaiveDateTime)> {
    // Offsets from well before to well after: a gap is at most a day (Pacific/Apia, 2011-12-30).
    let probe = m.and_utc().timestamp();
    let before = offset_at(tz, probe.checked_sub(30 * 3600)?)?;
    let after = offset_at(tz, probe.checked_add(30 * 3600)?)?;
    if after <= before {
        return None;
    }
    // With the offset after, `m` would be at `probe - after`, still before the jump; with the
    // offset before, at `probe - before`, already after it.
    let (lo, hi) = (probe - after, probe - before);
    if offset_at(tz, lo)? != before || offset_at(tz, hi)? != after {
        return None;
    }
    let at = transition(tz, lo, hi)?;
    let end = DateTime::from_timestamp(at + after, 0)?.naive_utc();
    Some((Timestamp(at.checked_mul(MICROS_PER_SECOND)?), end))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::trigger::{parse_cron, parse_time_zone};

    fn slots(expr: &str, zone: &str, policy: DstPolicy, from: &str, n: usize) -> Vec<String> {
        let cron = parse_cron(expr).expect("cron");
        let tz = parse_time_zone(zone).expect("zone");
        let from = chrono::DateTime::parse_from_rfc3339(from).expect("time");
        let from = Timestamp::from_chrono(&from);
        Walk::new(&cron, tz, policy, from, true)
            .take(n)
            .map(|s| {
                format!(
                    "{} {} {:?}{}",
                    s.at,
                    s.local,
                    s.effect,
                    if s.released { "" } else { " skipped" }
                )
            })
            .collect()
    }

    fn p(gap: DstGap, repeat: DstRepeat) -> DstPolicy {
        DstPolicy { gap, repeat }
    }

    /// Berlin springs forward from 02:00 to 03:00 on 2026-03-29: a fixed-time job shifts to
    /// 03:00 (01:00Z) by default, and with SKIP that day has no fire but a skipped slot.
    #[test]
    fn berlin_gap_shifts_or_skips() {
        let from = "2026-03-28T12:00:00Z";
        assert_eq!(
            slots("30 2 * * *", "Europe/Berlin", DstPolicy::default(), from, 2),
            [
                "2026-03-29T01:00:00Z 2026-03-29 02:30:00 Gap",
                "2026-03-30T00:30:00Z 2026-03-30 02:30:00 None",
            ]
        );
        assert_eq!(
            slots(
                "30 2 * * *",
                "Europe/Berlin",
                p(DstGap::Skip, DstRepeat::Auto),
                from,
                2
            ),
            [
                "2026-03-29T01:00:00Z 2026-03-29 02:30:00 Gap skipped",
                "2026-03-30T00:30:00Z 2026-03-30 02:30:00 None",
            ]
        );
        // Every 20 minutes from 01:00 to 03:59: the gap's three matches shift to one fire at
        // 03:00, which is also a match of its own.
        let every = slots(
            "*/20 1-3 * * *",
            "Europe/Berlin",
            p(DstGap::Shift, DstRepeat::Auto),
            from,
            7,
        );
        assert_eq!(
            every,
            [
                "2026-03-29T00:00:00Z 2026-03-29 01:00:00 None",
                "2026-03-29T00:20:00Z 2026-03-29 01:20:00 None",
                "2026-03-29T00:40:00Z 2026-03-29 01:40:00 None",
                "2026-03-29T01:00:00Z 2026-03-29 02:00:00 Gap",
                "2026-03-29T01:20:00Z 2026-03-29 03:20:00 None",
                "2026-03-29T01:40:00Z 2026-03-29 03:40:00 None",
                "2026-03-29T23:00:00Z 2026-03-30 01:00:00 None",
            ]
        );
    }

    /// New York falls back from 02:00 EDT to 01:00 EST on 2026-11-01: 01:30 happens at 05:30Z
    /// and again at 06:30Z. FIRST, LAST and BOTH each release what they say, and a walk lists
    /// the instant a policy skips.
    #[test]
    fn new_york_repeat_first_last_both() {
        let from = "2026-10-31T12:00:00Z";
        let first = "2026-11-01T05:30:00Z 2026-11-01 01:30:00 RepeatFirst";
        let second = "2026-11-01T06:30:00Z 2026-11-01 01:30:00 RepeatSecond";
        let next_day = "2026-11-02T06:30:00Z 2026-11-02 01:30:00 None";
        let zone = "America/New_York";
        assert_eq!(
            slots(
                "30 1 * * *",
                zone,
                p(DstGap::Auto, DstRepeat::First),
                from,
                3
            ),
            [
                first.to_string(),
                format!("{second} skipped"),
                next_day.into()
            ]
        );
        assert_eq!(
            slots(
                "30 1 * * *",
                zone,
                p(DstGap::Auto, DstRepeat::Last),
                from,
                3
            ),
            [format!("{first} skipped"), second.into(), next_day.into()]
        );
        assert_eq!(
            slots(
                "30 1 * * *",
                zone,
                p(DstGap::Auto, DstRepeat::Both),
                from,
                3
            ),
            [first, second, next_day]
        );
        // Started between the two instants, a walk still finds the second.
        assert_eq!(
            slots(
                "30 1 * * *",
                zone,
                p(DstGap::Auto, DstRepeat::Both),
                "2026-11-01T06:00:00Z",
                1
            ),
            [second]
        );
    }

    /// Lord Howe moves its clocks by 30 minutes: 02:00 → 02:30 on 2026-10-04, 02:00 → 01:30
    /// on 2026-04-05.
    #[test]
    fn lord_howe_half_hour_changes() {
        let zone = "Australia/Lord_Howe";
        assert_eq!(
            slots(
                "15 2 * * *",
                zone,
                DstPolicy::default(),
                "2026-10-03T00:00:00Z",
                1
            ),
            ["2026-10-03T15:30:00Z 2026-10-04 02:15:00 Gap"]
        );
        assert_eq!(
            slots(
                "45 1 * * *",
                zone,
                p(DstGap::Auto, DstRepeat::Both),
                "2026-04-04T00:00:00Z",
                2
            ),
            [
                "2026-04-04T14:45:00Z 2026-04-05 01:45:00 RepeatFirst",
                "2026-04-04T15:15:00Z 2026-04-05 01:45:00 RepeatSecond",
            ]
        );
    }

    /// Samoa skipped 2011-12-30: a daily job at noon fires at the first instant of the 31st
    /// when shifted, skips the day when told to, and goes on either way.
    #[test]
    fn apia_skipped_day() {
        let zone = "Pacific/Apia";
        let from = "2011-12-29T12:00:00Z";
        assert_eq!(
            slots("0 12 * * *", zone, DstPolicy::default(), from, 3),
            [
                "2011-12-29T22:00:00Z 2011-12-29 12:00:00 None",
                "2011-12-30T10:00:00Z 2011-12-30 12:00:00 Gap",
                "2011-12-30T22:00:00Z 2011-12-31 12:00:00 None",
            ]
        );
        assert_eq!(
            slots(
                "0 12 * * *",
                zone,
                p(DstGap::Skip, DstRepeat::Auto),
                from,
                3
            ),
            [
                "2011-12-29T22:00:00Z 2011-12-29 12:00:00 None",
                "2011-12-30T10:00:00Z 2011-12-30 12:00:00 Gap skipped",
                "2011-12-30T22:00:00Z 2011-12-31 12:00:00 None",
            ]
        );
    }

    #[test]
    fn policy_codes_round_trip() {
        for gap in [DstGap::Auto, DstGap::Shift, DstGap::Skip] {
            for repeat in [
                DstRepeat::Auto,
                DstRepeat::First,
                DstRepeat::Last,
                DstRepeat::Both,
            ] {
                let policy = p(gap, repeat);
                assert_eq!(DstPolicy::from_code(policy.code()), policy);
            }
        }
        assert_eq!(DstPolicy::from_code(0), DstPolicy::default());
    }
}
