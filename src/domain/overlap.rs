//! Overlap: what a job does with an occurrence that falls due while its previous fire is still
//! running. tickd does not run code: a fire is *running* from its release until it is acked,
//! dead-lettered or dropped. A fire held back by BUFFER_ONE is not running yet.
//!
//! [`decide`] is the whole policy, pure: given how many fires of the job are running, whether
//! one is held, and the occurrences now due (oldest first, consecutive), it says which are
//! released, which one is held, which are skipped, and whether the running fires are
//! withdrawn. The engines keep the counts and carry the decision out.

use serde::{Deserialize, Serialize};

use super::ledger::{SkipReason, Skipped};
use super::time::Timestamp;

/// A job's overlap policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum OverlapPolicy {
    /// Every occurrence is released, running or not (tickd's behaviour before overlap
    /// policies).
    #[default]
    Allow,
    /// An occurrence due while a fire of the job is running is skipped (SKIPPED OVERLAP).
    Skip,
    /// An occurrence due while a fire is running is held, and released when no fire of the
    /// job runs any more; at most one is held, further ones are skipped.
    BufferOne,
    /// An occurrence due while fires are running is released, and the running ones are
    /// withdrawn (REPLACED): not delivered again, a later ack of one accepted and ignored.
    Replace,
}

impl OverlapPolicy {
    /// ALLOW: whether the policy is the default (a spec with it is stored as before).
    pub fn is_allow(&self) -> bool {
        *self == OverlapPolicy::Allow
    }

    /// Lower-case name, for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            OverlapPolicy::Allow => "allow",
            OverlapPolicy::Skip => "skip",
            OverlapPolicy::BufferOne => "buffer_one",
            OverlapPolicy::Replace => "replace",
        }
    }

    /// A small code for packing (two bits).
    pub fn code(self) -> u8 {
        match self {
            OverlapPolicy::Allow => 0,
            OverlapPolicy::Skip => 1,
            OverlapPolicy::BufferOne => 2,
            OverlapPolicy::Replace => 3,
        }
    }

    /// The policy of a code from [`OverlapPolicy::code`] (only its two low bits count).
    pub fn from_code(code: u8) -> OverlapPolicy {
        match code & 3 {
            0 => OverlapPolicy::Allow,
            1 => OverlapPolicy::Skip,
            2 => OverlapPolicy::BufferOne,
            _ => OverlapPolicy::Replace,
        }
    }
}

/// What an overlap policy made of one occurrence (TriggerJob's answer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    Released,
    Held,
    Skipped,
}

/// A job's fires as overlap sees them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Running {
    /// Fires released and not yet acked, dead-lettered or dropped (held ones not counted).
    pub running: u32,
    /// A fire of the job is held (BUFFER_ONE).
    pub held: bool,
}

/// What [`decide`] decided for the occurrences due.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    /// Released now, oldest first.
    pub release: Vec<Timestamp>,
    /// Released in the held state: delivered once no fire of the job runs.
    pub hold: Option<Timestamp>,
    /// Passed over (SKIPPED OVERLAP), as one run.
    pub skipped: Option<Skipped>,
    /// The job's held fire is released now: nothing of the job runs any more (its previous
    /// fire ended without anyone releasing the held one yet).
    pub unhold: bool,
    /// The job's running fires (and a held one) are withdrawn, REPLACED by the release.
    pub replace: bool,
}

impl Plan {
    /// What became of the one occurrence a plan was made for.
    pub fn disposition(&self) -> Disposition {
        if !self.release.is_empty() {
            Disposition::Released
        } else if self.hold.is_some() {
            Disposition::Held
        } else {
            Disposition::Skipped
        }
    }

    /// The job's fires as they will be once the plan is carried out, `released` fires
    /// released with it (`release.len()`, unless the caller took them out).
    pub fn after(&self, before: Running, released: usize) -> Running {
        let mut r = before;
        if self.replace {
            r = Running::default();
        }
        if self.unhold {
            r.held = false;
            r.running += 1;
        }
        r.running += released as u32;
        if self.hold.is_some() {
            r.held = true;
        }
        r
    }
}

/// Decides what `policy` does with `due` (oldest first, consecutive occurrences of one job)
/// when the job has `now` running. A held fire with nothing running is released first (it
/// becomes the running one) whatever the policy; then:
/// - ALLOW releases everything;
/// - SKIP releases the first when nothing runs, and skips the rest;
/// - BUFFER_ONE releases the first when nothing runs, holds the next one when none is held,
///   and skips the rest;
/// - REPLACE releases the last, withdraws what runs (and a held fire), and skips the rest.
pub fn decide(policy: OverlapPolicy, now: Running, due: &[Timestamp]) -> Plan {
    let mut plan = Plan::default();
    if due.is_empty() {
        return plan;
    }
    let mut running = now.running;
    let mut held = now.held;
    if held && running == 0 {
        plan.unhold = true;
        held = false;
        running = 1;
    }
    let skip = |from: &[Timestamp]| {
        if let (Some(first), Some(last)) = (from.first(), from.last()) {
            Some(Skipped {
                first: *first,
                last: *last,
                count: from.len() as u64,
                at_least: false,
                reason: SkipReason::Overlap,
            })
        } else {
            None
        }
    };
    match policy {
        OverlapPolicy::Allow => plan.release = due.to_vec(),
        OverlapPolicy::Skip => {
            let next = if running == 0 {
                plan.release.push(due[0]);
                1
            } else {
                0
            };
            plan.skipped = skip(&due[next..]);
        }
        OverlapPolicy::BufferOne => {
            let mut next = 0;
            if running == 0 {
                plan.release.push(due[0]);
                next = 1;
            }
            if next < due.len() && !held {
                plan.hold = Some(due[next]);
                next += 1;
            }
            plan.skipped = skip(&due[next..]);
        }
        OverlapPolicy::Replace => {
            let (last, rest) = due
                .split_last()
                .map_or((due[0], &due[..0]), |(l, r)| (*l, r));
            // The fire just promoted from held is replaced with the rest.
            plan.replace = running > 0 || held;
            plan.unhold = false;
            plan.release.push(last);
            plan.skipped = skip(rest);
        }
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(n: i64) -> Timestamp {
        Timestamp(n)
    }

    fn run(running: u32, held: bool) -> Running {
        Running { running, held }
    }

    fn skipped(first: i64, last: i64, count: u64) -> Option<Skipped> {
        Some(Skipped {
            first: t(first),
            last: t(last),
            count,
            at_least: false,
            reason: SkipReason::Overlap,
        })
    }

    /// ALLOW releases all, whatever runs.
    #[test]
    fn allow_releases_everything() {
        let p = decide(OverlapPolicy::Allow, run(3, false), &[t(1), t(2)]);
        assert_eq!(p.release, vec![t(1), t(2)]);
        assert_eq!((p.hold, p.skipped, p.replace), (None, None, false));
    }

    /// SKIP: nothing runs → the first goes, the rest skip; something runs → all skip.
    #[test]
    fn skip_releases_only_when_idle() {
        let p = decide(OverlapPolicy::Skip, run(0, false), &[t(1), t(2), t(3)]);
        assert_eq!(p.release, vec![t(1)]);
        assert_eq!(p.skipped, skipped(2, 3, 2));
        let p = decide(OverlapPolicy::Skip, run(1, false), &[t(4)]);
        assert!(p.release.is_empty());
        assert_eq!(p.skipped, skipped(4, 4, 1));
    }

    /// BUFFER_ONE: idle → release one, hold the next, skip the rest; running → hold one;
    /// running and holding → skip; holding with nothing running → the held one goes first.
    #[test]
    fn buffer_one_holds_at_most_one() {
        let p = decide(OverlapPolicy::BufferOne, run(0, false), &[t(1), t(2), t(3)]);
        assert_eq!(p.release, vec![t(1)]);
        assert_eq!(p.hold, Some(t(2)));
        assert_eq!(p.skipped, skipped(3, 3, 1));
        assert_eq!(p.after(run(0, false), p.release.len()), run(1, true));

        let p = decide(OverlapPolicy::BufferOne, run(1, false), &[t(4)]);
        assert_eq!((p.release.len(), p.hold, p.skipped), (0, Some(t(4)), None));

        let p = decide(OverlapPolicy::BufferOne, run(1, true), &[t(5), t(6)]);
        assert_eq!((p.release.len(), p.hold), (0, None));
        assert_eq!(p.skipped, skipped(5, 6, 2));

        let p = decide(OverlapPolicy::BufferOne, run(0, true), &[t(7)]);
        assert!(p.unhold);
        assert_eq!((p.release.len(), p.hold), (0, Some(t(7))));
        assert_eq!(p.after(run(0, true), p.release.len()), run(1, true));
    }

    /// REPLACE: the last goes, what runs (or is held) is withdrawn, the rest skip.
    #[test]
    fn replace_withdraws_what_runs() {
        let p = decide(OverlapPolicy::Replace, run(0, false), &[t(1), t(2), t(3)]);
        assert_eq!(p.release, vec![t(3)]);
        assert_eq!(p.skipped, skipped(1, 2, 2));
        assert!(!p.replace);
        let p = decide(OverlapPolicy::Replace, run(2, false), &[t(4)]);
        assert_eq!(
            (p.release.clone(), p.replace, p.skipped),
            (vec![t(4)], true, None)
        );
        assert_eq!(p.after(run(2, false), p.release.len()), run(1, false));
        let p = decide(OverlapPolicy::Replace, run(0, true), &[t(5)]);
        assert!(p.replace && !p.unhold);
        assert_eq!(p.after(run(0, true), p.release.len()), run(1, false));
    }

    /// Nothing due changes nothing, even with a held fire and nothing running.
    #[test]
    fn nothing_due_decides_nothing() {
        assert_eq!(
            decide(OverlapPolicy::BufferOne, run(0, true), &[]),
            Plan::default()
        );
    }

    /// Codes round-trip.
    #[test]
    fn codes_round_trip() {
        for p in [
            OverlapPolicy::Allow,
            OverlapPolicy::Skip,
            OverlapPolicy::BufferOne,
            OverlapPolicy::Replace,
        ] {
            assert_eq!(OverlapPolicy::from_code(p.code()), p);
        }
    }
}
