//! Settings read from files and read again when the files change: the TLS certificate, key
//! and client CA ([`super::tls`]) and the auth file ([`super::auth`]).
//!
//! Files are polled, not watched: Kubernetes updates a mounted Secret by swapping a symlink,
//! which inotify-style watches on the files miss. Every interval the files' contents are
//! hashed; when the hash differs from the last one seen, the setting is loaded again. A load
//! that fails (a half-written file, a key that does not match its certificate) keeps the
//! setting in force and is logged once per content; the next change is tried again.

use std::path::PathBuf;
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use opentelemetry::KeyValue;
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::telemetry::metrics;

/// A setting loaded from files, swapped in whole when they change.
#[derive(Debug)]
pub struct Reloadable<T> {
    current: RwLock<Arc<T>>,
    /// How many times the setting was swapped; [`Reloadable::changes`] hands out receivers.
    swaps: watch::Sender<u64>,
}

impl<T> Reloadable<T> {
    pub fn new(value: T) -> Self {
        Reloadable {
            current: RwLock::new(Arc::new(value)),
            swaps: watch::Sender::new(0),
        }
    }

    /// Wakes its holder each time a new setting is swapped in (not for files that changed
    /// but could not be loaded).
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.swaps.subscribe()
    }

    /// The setting in force.
    pub fn get(&self) -> Arc<T> {
        match self.current.read() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    fn set(&self, value: T) {
        let value = Arc::new(value);
        match self.current.write() {
            Ok(mut g) => *g = value,
            Err(poisoned) => *poisoned.into_inner() = value,
        }
        self.swaps.send_modify(|n| *n += 1);
    }
}

/// The SHA-256 of the files' contents, in order; a file that cannot be read counts as its
/// error text, so that its return is a change. Taken before a load, so that a change made
/// while loading is seen by the next check.
pub async fn fingerprint(paths: &[PathBuf]) -> [u8; 32] {
    let mut hash = Sha256::new();
    for path in paths {
        match tokio::fs::read(path).await {
            Ok(bytes) => {
                hash.update((bytes.len() as u64).to_le_bytes());
                hash.update(&bytes);
            }
            Err(e) => hash.update(format!("unreadable: {e}").as_bytes()),
        }
    }
    hash.finalize().into()
}

/// Checks `paths` every `interval` and, when their contents differ from `seen` (the
/// [`fingerprint`] taken before `target` was loaded) and the last check, replaces `target`'s
/// value with `load()`'s. Stops once `target` is dropped. `what` names the setting in logs.
pub fn spawn_reloader<T, E, F>(
    what: &'static str,
    paths: Vec<PathBuf>,
    seen: [u8; 32],
    interval: Duration,
    target: &Arc<Reloadable<T>>,
    load: F,
) where
    T: Send + Sync + 'static,
    E: std::fmt::Display + Send,
    F: Fn() -> Result<T, E> + Send + 'static,
{
    let target: Weak<Reloadable<T>> = Arc::downgrade(target);
    let mut seen = seen;
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            if target.strong_count() == 0 {
                return;
            }
            let now = fingerprint(&paths).await;
            if now == seen {
                continue;
            }
            seen = now;
            // The files are small and read once per change: loading on this thread is fine.
            let loaded = load();
            let Some(target) = target.upgrade() else {
                return;
            };
            let result = if loaded.is_ok() { "ok" } else { "failed" };
            metrics::instruments().config_reloads.add(
                1,
                &[
                    KeyValue::new("tickd.setting", what),
                    KeyValue::new("tickd.result", result),
                ],
            );
            match loaded {
                Ok(value) => {
                    target.set(value);
                    info!(setting = what, files = ?paths, "reloaded after its files changed");
                }
                Err(e) => warn!(
                    setting = what,
                    error = %e,
                    "files changed but cannot be loaded; the previous setting stays in force \
                     until they are fixed"
                ),
            }
        }
    });
}
