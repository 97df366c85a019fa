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

/// RFC 3339 in UTC with a `Z`, and only the sub-second digits there are (none, milliseconds or
/// microseconds), as chrono's `to_rfc3339_opts(AutoSi, true)` writes it; `us` after the raw
/// count outside chrono's range. Every fire id holds one, so years 0000–9999 are written here
/// without chrono's general formatter (a tenth of the instructions); others go through chrono.
impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut buf = [0u8; 32];
        if let Some(text) = rfc3339_utc(self.0, &mut buf) {
            return f.write_str(text);
        }
        match self.to_chrono() {
            Some(t) => f.write_str(&t.to_rfc3339_opts(SecondsFormat::AutoSi, true)),
            None => write!(f, "{}us", self.0),
        }
    }
}

impl Timestamp {
    /// Appends the [`fmt::Display`] form to `out` (without the formatting machinery when the
    /// year is 0000–9999).
    pub fn push_to(self, out: &mut String) {
        let mut buf = [0u8; 32];
        match rfc3339_utc(self.0, &mut buf) {
            Some(text) => out.push_str(text),
            None => {
                use std::fmt::Write as _;
                let _ = write!(out, "{self}");
            }
        }
    }

    /// `prefix` followed by this instant in RFC 3339, as one shared string, built without an
    /// intermediate heap string when it is short (fire ids: one per released fire).
    pub fn shared_with_prefix(self, prefix: &str, separator: char) -> std::sync::Arc<str> {
        const ON_STACK: usize = 256;
        let mut time = [0u8; 32];
        if let Some(text) = rfc3339_utc(self.0, &mut time) {
            let len = prefix.len() + separator.len_utf8() + text.len();
            if len <= ON_STACK {
                let mut buf = [0u8; ON_STACK];
                buf[..prefix.len()].copy_from_slice(prefix.as_bytes());
                let sep = separator.encode_utf8(&mut buf[prefix.len()..]).len();
                buf[prefix.len() + sep..len].copy_from_slice(text.as_bytes());
                // Whole `&str`s and a char, back to back: always UTF-8.
                if let Ok(joined) = std::str::from_utf8(&buf[..len]) {
                    return joined.into();
                }
            }
        }
        let mut out = String::with_capacity(prefix.len() + 28);
        out.push_str(prefix);
        out.push(separator);
        self.push_to(&mut out);
        out.into()
    }
}

/// Writes `micros` as `YYYY-MM-DDTHH:MM:SS[.mmm|.uuuuuu]Z` into `buf` and returns it as text;
/// `None` for years outside 0000–9999.
fn rfc3339_utc(micros: i64, buf: &mut [u8; 32]) -> Option<&str> {
    let secs = micros.div_euclid(MICROS_PER_SECOND);
    let sub = micros.rem_euclid(MICROS_PER_SECOND);
    let days = secs.div_euclid(86_400);
    let of_day = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's days_from_civil, inverted).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    if !(0..=9_999).contains(&year) {
        return None;
    }
    fn digits(buf: &mut [u8], at: usize, value: i64, width: usize) {
        let mut v = value;
        for i in (0..width).rev() {
            buf[at + i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
    }
    digits(buf, 0, year, 4);
    buf[4] = b'-';
    digits(buf, 5, month, 2);
    buf[7] = b'-';
    digits(buf, 8, day, 2);
    buf[10] = b'T';
    digits(buf, 11, of_day / 3_600, 2);
    buf[13] = b':';
    digits(buf, 14, of_day / 60 % 60, 2);
    buf[16] = b':';
    digits(buf, 17, of_day % 60, 2);
    let mut len = 19;
    if sub != 0 {
        buf[len] = b'.';
        if sub % 1_000 == 0 {
            digits(buf, len + 1, sub / 1_000, 3);
            len += 4;
        } else {
            digits(buf, len + 1, sub, 6);
            len += 7;
        }
    }
    buf[len] = b'Z';
    // Only ASCII digits and punctuation were written.
    std::str::from_utf8(&buf[..=len]).ok()
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

    /// The hand-written RFC 3339 form is chrono's, byte for byte: at the edges of the range it
    /// covers, around leap days, and at 300,000 instants spread over all of chrono's range.
    #[test]
    fn display_matches_chrono() {
        let chrono_form = |t: Timestamp| match t.to_chrono() {
            Some(c) => c.to_rfc3339_opts(SecondsFormat::AutoSi, true),
            None => format!("{}us", t.0),
        };
        let year = |y: i32| {
            chrono::NaiveDate::from_ymd_opt(y, 1, 1)
                .and_then(|d| d.and_hms_opt(0, 0, 0))
                .map(|d| d.and_utc().timestamp_micros())
                .expect("date")
        };
        let mut cases = vec![
            0,
            1,
            -1,
            999,
            1_000,
            123_000,
            123_456,
            i64::MIN,
            i64::MAX,
            year(0),
            year(0) - 1,
            year(10_000),
            year(10_000) - 1,
            year(2000) + 59 * 86_400_000_000,
            year(2024) + 59 * 86_400_000_000 + 86_399_999_999,
            year(1900) + 59 * 86_400_000_000,
        ];
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for i in 0..300_000 {
            x = x
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            let v = (x >> 1) as i64;
            // Spread over chrono's whole range, then over years 0–9999, then near now; with
            // whole seconds and whole milliseconds as often as not.
            let t = match i % 3 {
                0 => v % 8_000_000_000_000_000_000 - 4_000_000_000_000_000_000,
                1 => year(0) + v % (year(10_000) - year(0)),
                _ => 1_700_000_000_000_000 + v % 1_000_000_000_000_000,
            };
            cases.push(match i % 4 {
                0 => t - t.rem_euclid(1_000_000),
                1 => t - t.rem_euclid(1_000),
                _ => t,
            });
        }
        for micros in cases {
            let t = Timestamp(micros);
            assert_eq!(t.to_string(), chrono_form(t), "{micros}");
            let mut pushed = String::from(">");
            t.push_to(&mut pushed);
            assert_eq!(pushed, format!(">{}", chrono_form(t)), "{micros}");
        }
    }

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
