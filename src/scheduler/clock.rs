//! Time as the scheduler sees it. The core asks a [`Clock`] for "now" and for sleeping, so tests
//! can drive virtual time: a test about next week runs in milliseconds.

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

    fn sleep_until(&self, deadline: Timestamp) -> Sleep<'_> {
        let wait = micros_duration(deadline.since(self.now())).min(MAX_SYSTEM_SLEEP);
        Box::pin(tokio::time::sleep(wait))
    }
}

/// A clock that moves only when told to. For tests.
#[derive(Debug)]
pub struct ManualClock {
    now: Mutex<Timestamp>,
    tick: watch::Sender<Timestamp>,
}

impl ManualClock {
    pub fn new(start: Timestamp) -> Self {
        ManualClock {
            now: Mutex::new(start),
            tick: watch::Sender::new(start),
        }
    }

    /// Moves time forward by `micros` and wakes every sleeper whose deadline has come.
    pub fn advance(&self, micros: Micros) {
        let next = {
            let mut now = self.now.lock().unwrap_or_else(|p| p.into_inner());
            *now = now.plus(micros);
            *now
        };
        self.tick.send_replace(next);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        *self.now.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn sleep_until(&self, deadline: Timestamp) -> Sleep<'_> {
        let mut rx = self.tick.subscribe();
        Box::pin(async move {
            while *rx.borrow_and_update() < deadline {
                if rx.changed().await.is_err() {
                    return;
                }
            }
        })
    }
}
