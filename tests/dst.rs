//! tickd's cron occurrences against an independent implementation: `dst/occurrences.json`,
//! written by `dst/generate.py` from croniter and Python's zoneinfo, holds a year of six
//! schedules in five zones whose clocks change (by an hour, by 30 minutes, at midnight, and
//! over a whole skipped day), under each of the twelve DST policies.

use std::sync::Arc;

use serde_json::Value;
use tickd::domain::trigger::{Recurrence, parse_cron, parse_time_zone};
use tickd::domain::{DstGap, DstPolicy, DstRepeat, Timestamp};

const S: i64 = 1_000_000;
const MODULUS: u128 = (1 << 61) - 1;

fn policy(gap: &str, repeat: &str) -> DstPolicy {
    DstPolicy {
        gap: match gap {
            "auto" => DstGap::Auto,
            "shift" => DstGap::Shift,
            "skip" => DstGap::Skip,
            other => panic!("unknown gap policy {other}"),
        },
        repeat: match repeat {
            "auto" => DstRepeat::Auto,
            "first" => DstRepeat::First,
            "last" => DstRepeat::Last,
            "both" => DstRepeat::Both,
            other => panic!("unknown repeat policy {other}"),
        },
    }
}

fn table() -> Value {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/dst/occurrences.json"
    ))
    .expect("tests/dst/occurrences.json");
    serde_json::from_str(&text).expect("valid JSON")
}

fn int(v: &Value, key: &str) -> i64 {
    v[key].as_i64().unwrap_or_else(|| panic!("{key} in {v}"))
}

/// Every case: the same number of occurrences in the year, the same digest of them, and the
/// same occurrences, listed, within 36 hours of each clock change.
#[test]
fn a_year_of_occurrences_matches_zoneinfo_and_croniter() {
    let table = table();
    assert_eq!(
        table["tzdb"].as_str(),
        Some(chrono_tz::IANA_TZDB_VERSION),
        "the table was generated with another time zone database release than chrono-tz's; \
         regenerate it (tests/dst/generate.py) with the matching tzdata"
    );
    let cases = table["cases"].as_array().expect("cases");
    assert_eq!(cases.len(), 360);
    for case in cases {
        let expression = case["expression"].as_str().expect("expression");
        let zone = case["time_zone"].as_str().expect("time_zone");
        let gap = case["gap"].as_str().expect("gap");
        let repeat = case["repeat"].as_str().expect("repeat");
        let name = format!("{expression:?} in {zone}, gap {gap}, repeat {repeat}");
        let rec = Recurrence::Cron {
            cron: Arc::new(parse_cron(expression).expect("cron")),
            tz: parse_time_zone(zone).expect("zone"),
            dst: policy(gap, repeat),
        };
        let (from, to) = (int(case, "from") * S, int(case, "to") * S);
        let mut times = Vec::new();
        let mut cursor = rec.next_after(Timestamp(from - 1));
        while let Some(t) = cursor.filter(|t| t.0 < to) {
            assert_eq!(t.0 % S, 0, "{name}: {t} is not a whole second");
            times.push(t.0 / S);
            cursor = rec.next_after(t);
        }
        let near: Vec<i64> = case["near_changes"]
            .as_array()
            .expect("near_changes")
            .iter()
            .map(|v| v.as_i64().expect("seconds"))
            .collect();
        let changes: Vec<i64> = case["changes"]
            .as_array()
            .expect("changes")
            .iter()
            .map(|v| v.as_i64().expect("seconds"))
            .collect();
        assert!(
            !changes.is_empty(),
            "{name}: the zone's clocks change in the year"
        );
        let ours_near: Vec<i64> = times
            .iter()
            .copied()
            .filter(|t| changes.iter().any(|c| (t - c).abs() <= 36 * 3600))
            .collect();
        assert_eq!(
            render(&ours_near),
            render(&near),
            "{name}: occurrences within 36 hours of a clock change differ"
        );
        assert_eq!(
            times.len() as i64,
            int(case, "count"),
            "{name}: count for the year"
        );
        let digest = times.iter().fold(0u128, |d, t| {
            (d * 1_000_003 + u128::try_from(*t).expect("after 1970")) % MODULUS
        });
        assert_eq!(
            digest as i64,
            int(case, "digest"),
            "{name}: digest for the year"
        );
        // The other questions the scheduler asks give the same answers.
        assert_eq!(
            rec.count_between(Timestamp(from), Timestamp(to - 1), 100_000),
            (times.len() as u64, false),
            "{name}: count_between"
        );
        let listed: Vec<i64> = near.iter().map(|t| t * S).collect();
        for (i, t) in listed.iter().enumerate() {
            assert_eq!(
                rec.latest_at_or_before(Timestamp(*t)),
                Some(Timestamp(*t)),
                "{name}: latest at or before an occurrence"
            );
            let before = times
                .iter()
                .rev()
                .find(|x| **x * S < *t)
                .map(|x| Timestamp(x * S));
            if i > 0 || before.is_some() {
                assert_eq!(
                    rec.latest_at_or_before(Timestamp(t - 1)),
                    before,
                    "{name}: latest before {}",
                    Timestamp(*t)
                );
            }
        }
    }
}

fn render(times: &[i64]) -> Vec<String> {
    times.iter().map(|t| Timestamp(t * S).to_string()).collect()
}
