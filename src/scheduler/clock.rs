//! Time as the scheduler sees it. The core asks a [`Clock`] for "now" and for sleeping, so tests
//! can drive virtual time: a test about next week runs in milliseconds.
//!
//! Two kinds of "now": wall-clock time ([`Clock::now`]) decides when occurrences are due, and
//! steady time ([`Clock::steady_now`]), which never jumps, measures leases: ack deadlines,
//! redelivery delays and backoffs. An NTP step moves the first and not the second, so it can
//! neither expire every lease at once nor stretch them.

use std::fmt::Debug;
use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::watch;

use crate::domain::time::micros_duration;
use crate::domain::{Micros, Timestamp};

/// A future returned by [`Clock::sleep_until`].
pub type Sleep<'a> = Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

/// The source of wall-clock time for the scheduler.
pub trait Clock: Send + Sync + Debug + 'static {
    /// The current wall-clock time.
    fn now(&self) -> Timestamp;

    /// Monotonic time, in the same units: it advances with real time and never jumps when the
    /// wall clock is stepped. Only differences between two readings mean anything.
    fn steady_now(&self) -> Timestamp;

    /// Resolves at or after `deadline`, or earlier: callers re-check `now()` after waking.
    fn sleep_until(&self, deadline: Timestamp) -> Sleep<'_>;
}

/// The system clock. Sleeps are capped so that a wall-clock jump is noticed within a second.
#[derive(Debug, Default)]
pub struct SystemClock;

/// Longest single sleep of the system clock.
const MAX_SYSTEM_SLEEP: Duration = Duration::from_secs(1);

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        Timestamp::now_utc()
    }

    fn steady_now(&self) -> Timestamp {
        static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
        let elapsed = START.get_or_init(std::time::Instant::now).elapsed();
        Timestamp(i64::try_from(elapsed.as_micros()).unwrap_or(i64::MAX))
    }

    fn sleep_until(&self, deadline: Timestamp) -> Sleep<'_> {
        let wait = micros_duration(deadline.since(self.now())).min(MAX_SYSTEM_SLEEP);
        Box::pin(tokio::time::sleep(wait))
    }
}

/// The system clock moved by a fixed offset: a machine whose clock is wrong. For tests of
/// clock skew between replicas.
#[derive(Debug)]
pub struct SkewedClock {
    pub skew: Micros,
}

impl Clock for SkewedClock {
    fn now(&self) -> Timestamp {
        Timestamp::now_utc().plus(self.skew)
    }

    fn steady_now(&self) -> Timestamp {
        SystemClock.steady_now()
    }

    fn sleep_until(&self, deadline: Timestamp) -> Sleep<'_> {
        let wait = micros_duration(deadline.since(self.now())).min(MAX_SYSTEM_SLEEP);
        Box::pin(tokio::time::sleep(wait))
    }
}

/// A clock that moves only when told to. For tests. Steady time starts at the wall time given
/// and moves with [`ManualClock::advance`]; [`ManualClock::step_wall`] moves only the wall clock,
/// as an NTP step does.
#[derive(Debug)]
pub struct ManualClock {
    /// (wall, steady).
    now: Mutex<(Timestamp, Timestamp)>,
    tick: watch::Sender<Timestamp>,
}

impl ManualClock {
    pub fn new(start: Timestamp) -> Self {
        ManualClock {
            now: Mutex::new((start, start)),
            tick: watch::Sender::new(start),
        }
    }

    /// Moves time forward by `micros` and wakes every sleeper whose deadline has come.
    pub fn advance(&self, micros: Micros) {
        let next = {
            let mut now = self.now.lock().unwrap_or_else(|p| p.into_inner());
            *now = (now.0.plus(micros), now.1.plus(micros));
            now.0
        };
        self.tick.send_replace(next);
    }

    /// Steps the wall clock by `micros` (negative: back) without moving steady time.
    pub fn step_wall(&self, micros: Micros) {
        let next = {
            let mut now = self.now.lock().unwrap_or_else(|p| p.into_inner());
            now.0 = now.0.plus(micros);
            now.0
        };
        self.tick.send_replace(next);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        self.now.lock().unwrap_or_else(|p| p.into_inner()).0
    }

    fn steady_now(&self) -> Timestamp {
        self.now.lock().unwrap_or_else(|p| p.into_inner()).1
    }

    fn sleep_until(&self, deadline: Timestamp) -> Sleep<'_> {
        let mut rx = self.tick.subscribe();
        Box::pin(async move {
            let mut last = *rx.borrow_and_update();
            while last < deadline {
                if rx.changed().await.is_err() {
                    return;
                }
                let now = *rx.borrow_and_update();
                if now < last {
                    // The wall clock was stepped back: the caller re-plans (a deadline it
                    // derived from steady time is now this much further away on the wall).
                    return;
                }
                last = now;
            }
        })
    }
}
