//! Instants and spans as tickd counts them: whole microseconds since the Unix epoch.
//!
//! Owns the conversions to and from chrono; knows nothing of protobuf or of the clock.

use std::fmt;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};

/// An instant, in microseconds since 1970-01-01T00:00:00Z.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Timestamp(pub i64);

/// A span of time in microseconds; never negative once validated.
pub type Micros = i64;

pub const MICROS_PER_SECOND: i64 = 1_000_000;
pub const MICROS_PER_MILLI: i64 = 1_000;

impl Timestamp {
    pub const MIN: Timestamp = Timestamp(i64::MIN);
    pub const MAX: Timestamp = Timestamp(i64::MAX);

    pub fn from_micros(micros: i64) -> Self {
        Timestamp(micros)
    }

    pub fn as_micros(self) -> i64 {
        self.0
    }

    /// Adds a span, saturating at the ends of the range.
    pub fn plus(self, micros: Micros) -> Timestamp {
        Timestamp(self.0.saturating_add(micros))
    }

    /// Subtracts a span, saturating at the ends of the range.
    pub fn minus(self, micros: Micros) -> Timestamp {
        Timestamp(self.0.saturating_sub(micros))
    }

    /// `self - earlier` in microseconds (negative when `self` is earlier).
    pub fn since(self, earlier: Timestamp) -> Micros {
        self.0.saturating_sub(earlier.0)
    }

    /// The same instant as a chrono UTC time; `None` outside chrono's range.
    pub fn to_chrono(self) -> Option<DateTime<Utc>> {
        DateTime::<Utc>::from_timestamp_micros(self.0)
    }

    /// A chrono time, truncated to whole microseconds.
    pub fn from_chrono<Tz: chrono::TimeZone>(t: &DateTime<Tz>) -> Timestamp {
        Timestamp(t.timestamp_micros())
    }

    /// The wall-clock time of this process.
    pub fn now_utc() -> Timestamp {
        Timestamp(Utc::now().timestamp_micros())
    }

    /// Splits into protobuf-style (seconds, nanos) with nanos in [0, 1e9).
    pub fn to_seconds_nanos(self) -> (i64, i32) {
        let secs = self.0.div_euclid(MICROS_PER_SECOND);
        let micros = self.0.rem_euclid(MICROS_PER_SECOND);
        // `micros` is in [0, 1e6), so the product fits in an i32.
        (secs, (micros * 1_000) as i32)
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.to_chrono() {
            Some(t) => f.write_str(&t.to_rfc3339_opts(SecondsFormat::AutoSi, true)),
            None => write!(f, "{}us", self.0),
        }
    }
}

/// A std Duration as microseconds, saturating.
pub fn duration_micros(d: Duration) -> Micros {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

/// Microseconds as a std Duration; negative spans become zero.
pub fn micros_duration(micros: Micros) -> Duration {
    Duration::from_micros(u64::try_from(micros).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Negative instants split into seconds and non-negative nanos as protobuf wants.
    #[test]
    fn seconds_nanos_are_normalised_for_negative_instants() {
        assert_eq!(Timestamp(-1).to_seconds_nanos(), (-1, 999_999_000));
        assert_eq!(Timestamp(1_500_000).to_seconds_nanos(), (1, 500_000_000));
    }

    /// Display is RFC 3339 in UTC, with fractions only when there are any.
    #[test]
    fn display_is_rfc3339() {
        assert_eq!(Timestamp(0).to_string(), "1970-01-01T00:00:00Z");
        assert_eq!(Timestamp(1_500).to_string(), "1970-01-01T00:00:00.001500Z");
    }
}
