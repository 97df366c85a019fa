//! The PostgreSQL schema: versioned migrations embedded in the binary (`migrations/`), applied
//! at start.
//!
//! Several replicas may start at once: sqlx takes an advisory lock around the migrations, on a
//! connection of their own that is closed whatever the outcome (a session lock left on a
//! pooled connection after a failed migration would block every other replica).
//!
//! Also the storage side of the multi-replica engine: jobs ([`PgStore::insert_job`],
//! [`PgStore::get_job`], [`PgStore::list_jobs`], [`PgStore::transition`],
//! [`PgStore::delete_job`], [`PgStore::delete_expired`]), [`PgStore::release_due`], the release of
//! due occurrences that stays exactly-once when replicas race, [`PgStore::claim`] (a fire
//! leased to one holder at a time, with a token), [`PgStore::ack`], and [`PgStore::nack`],
//! [`PgStore::extend`] and [`PgStore::reap_expired`], fenced by the lease token, and
//! [`Wakeups`] (LISTEN/NOTIFY on the queues a release, nack or redelivery filled). The engine
//! around them (the loops, streams, health) is `scheduler::replicated`.

use chrono::{DateTime, Utc};
use sqlx::Connection;
use sqlx::Row;
use sqlx::postgres::{PgConnection, PgPool, PgPoolOptions};

use super::{StoreError, codec};
use crate::domain::fire::{AfterAttempt, after_attempt, expiry_backoff};
use crate::domain::job::is_triggered;
use crate::domain::job::{UpdateRefused, etag, triggered_fire_id};
use crate::domain::ledger::OccurrenceKey;
use crate::domain::overlap::{self, Disposition};
use crate::domain::{
    FireRecord, Job, JobSpec, JobState, JobStatus, Micros, Occurrence, Outcome, OverlapPolicy,
    PackedSpec, Running, SkipReason, Timestamp, TraceContext, Transition, TransitionRefused,
    advance_with_room, fire_id,
};

/// Why [`PgStore::trigger`] released nothing.
#[derive(Debug)]
pub enum TriggerFailed {
    Finished(JobState),
    /// The queue holds this many fires, at least the backlog limit.
    Full(usize),
}

/// Why [`PgStore::backfill`] released nothing.
#[derive(Debug)]
pub enum BackfillFailed {
    Refused(crate::domain::backfill::BackfillRefused),
    /// The queue holds `outstanding` fires and has no room for `wanted` more.
    Full {
        outstanding: usize,
        wanted: usize,
    },
}

/// Why [`PgStore::update`] changed nothing.
#[derive(Debug)]
pub enum UpdateFailed {
    /// The job's spec is not the one the caller read.
    Changed,
    Refused(UpdateRefused),
}

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Applies every migration `url`'s database does not have yet.
pub async fn migrate(url: &str) -> Result<(), StoreError> {
    let mut conn = PgConnection::connect(url)
        .await
        .map_err(|e| StoreError::Io(format!("cannot connect to PostgreSQL: {e}")))?;
    let result = MIGRATOR.run_direct(None, &mut conn, false).await;
    let _ = conn.close().await;
    result.map_err(|e| StoreError::Io(format!("database migration failed: {e}")))
}

/// The newest migration version in this binary.
pub fn schema_version() -> i64 {
    MIGRATOR.iter().map(|m| m.version).max().unwrap_or(0)
}

/// The NOTIFY channel on which a release names the queues it gave new fires.
pub const FIRES_CHANNEL: &str = "tickd_fires";

/// What wakes a replica's delivery loop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wakeup {
    /// New fires on this queue.
    Queue(String),
    /// The listening connection was lost and is back: notifications may have been missed, so
    /// look at every queue.
    Reconnected,
}

/// Listens for [`Wakeup`]s (LISTEN/NOTIFY). Where the database has no NOTIFY, replicas poll.
#[derive(Debug)]
pub struct Wakeups {
    listener: sqlx::postgres::PgListener,
}

impl Wakeups {
    pub async fn listen(url: &str) -> Result<Wakeups, StoreError> {
        let mut listener = sqlx::postgres::PgListener::connect(url).await.map_err(db)?;
        listener.listen(FIRES_CHANNEL).await.map_err(db)?;
        Ok(Wakeups { listener })
    }

    /// The next wake-up; waits for one.
    pub async fn next(&mut self) -> Result<Wakeup, StoreError> {
        Ok(match self.listener.try_recv().await.map_err(db)? {
            Some(n) => Wakeup::Queue(n.payload().to_string()),
            None => Wakeup::Reconnected,
        })
    }
}

/// Session settings of every pooled connection: a replica stopped mid-transaction (SIGSTOP, a
/// long pause) loses its session within seconds, so its row locks go and its COMMIT fails.
const SESSION_SETTINGS: &str = "SET idle_in_transaction_session_timeout = '2s'; \
     SET statement_timeout = '5s'; SET lock_timeout = '1s'";

fn db(e: sqlx::Error) -> StoreError {
    StoreError::Io(format!("PostgreSQL: {e}"))
}

fn time(t: Timestamp) -> Result<DateTime<Utc>, StoreError> {
    t.to_chrono()
        .ok_or_else(|| StoreError::Io(format!("time {} out of range", t.0)))
}

fn state_name(s: JobState) -> &'static str {
    s.as_str()
}

fn state_of(name: &str) -> Result<JobState, StoreError> {
    Ok(match name {
        "scheduled" => JobState::Scheduled,
        "paused" => JobState::Paused,
        "completed" => JobState::Completed,
        "cancelled" => JobState::Cancelled,
        other => {
            return Err(StoreError::Corrupt {
                table: "tickd_jobs",
                key: String::new(),
                reason: format!("unknown state {other}"),
            });
        }
    })
}

/// Jobs and fires in PostgreSQL, shared by every replica.
#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
    /// Whether occurrences' fates are written to the ledger (`--ledger-max-per-job` > 0).
    ledger: bool,
}

impl PgStore {
    /// Migrates `url`'s database and opens a pool of at most `max_connections` on it.
    pub async fn connect(url: &str, max_connections: u32) -> Result<PgStore, StoreError> {
        migrate(url).await?;
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            // A call waits this long for a connection, then fails (UNAVAILABLE) rather than hang
            // while the database is down.
            .acquire_timeout(std::time::Duration::from_secs(3))
            .after_connect(|conn, _| {
                Box::pin(async move {
                    sqlx::raw_sql(SESSION_SETTINGS).execute(conn).await?;
                    Ok(())
                })
            })
            .connect(url)
            .await
            .map_err(db)?;
        Ok(PgStore { pool, ledger: true })
    }

    /// The store writing occurrences' fates to the ledger (`true`, the default) or not.
    pub fn with_ledger(mut self, on: bool) -> PgStore {
        self.ledger = on;
        self
    }

    /// Closes the pool, waiting for connections in use to come back.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// Stores new jobs in one statement (one commit); returns, per job, whether it was stored
    /// (false when its id is taken, also by an earlier job of the same call).
    pub async fn insert_jobs(&self, jobs: &[&Job]) -> Result<Vec<bool>, StoreError> {
        insert_rows(&self.pool, jobs).await
    }

    /// Stores new jobs in one transaction, all or none: a job whose id is taken by a job with
    /// the same spec is answered with that job; one taken by a different job stores nothing
    /// and is answered `Err(its index)`.
    pub async fn insert_batch(&self, jobs: &[&Job]) -> Result<Result<Vec<Job>, usize>, StoreError> {
        let mut tx = self.pool.begin().await.map_err(db)?;
        let inserted = insert_rows(&mut *tx, jobs).await?;
        let mut answer = Vec::with_capacity(jobs.len());
        for (index, (job, inserted)) in jobs.iter().zip(inserted).enumerate() {
            if inserted {
                answer.push((*job).clone());
                continue;
            }
            let row = sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT {JOB_COLUMNS} FROM tickd_jobs WHERE id = $1 FOR SHARE"
            )))
            .bind(job.spec.id())
            .fetch_optional(&mut *tx)
            .await
            .map_err(db)?;
            match row.map(|r| job_from_row(&r)).transpose()? {
                Some((existing, _)) if existing.spec == job.spec => answer.push(existing),
                _ => {
                    tx.rollback().await.map_err(db)?;
                    return Ok(Err(index));
                }
            }
        }
        tx.commit().await.map_err(db)?;
        Ok(Ok(answer))
    }

    /// Stores a new job; false when its id is taken.
    pub async fn insert_job(&self, job: &Job) -> Result<bool, StoreError> {
        Ok(self
            .insert_jobs(&[job])
            .await?
            .first()
            .copied()
            .unwrap_or(false))
    }

    /// Releases what is due: in one transaction, takes up to `limits.batch` jobs due at the
    /// database's now (or at `now`, for tests on a manual clock) that no other replica holds,
    /// decides their fires with [`advance_with_room`] (a queue holding `limits.max_backlog`
    /// fires gets no more), inserts the fires (an existing fire_id is left alone) and moves
    /// each job on only if nobody moved it since it was read (its `version`). `trace_for` gives
    /// each new fire its trace context. Nothing is visible to anyone before the commit.
    pub async fn release_due(
        &self,
        now: Option<Timestamp>,
        limits: ReleaseLimits,
        trace_for: &(dyn Fn(&FireRecord, &Job) -> Option<TraceContext> + Sync),
    ) -> Result<Released, StoreError> {
        let now = now.map(time).transpose()?;
        let mut tx = self.pool.begin().await.map_err(db)?;
        // The locking SELECT returns the columns itself: a row locked after another replica's
        // commit is returned as that commit left it (a join on a locking CTE would read it from
        // the statement's older snapshot).
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {JOB_COLUMNS}, coalesce($1, now()) AS db_now FROM tickd_jobs \
             WHERE next_due_at <= coalesce($1, now()) \
             ORDER BY next_due_at, id LIMIT $2 FOR UPDATE SKIP LOCKED"
        )))
        .bind(now)
        .bind(limits.batch)
        .fetch_all(&mut *tx)
        .await
        .map_err(db)?;
        let mut released = Released {
            jobs: rows.len(),
            ..Released::default()
        };
        if rows.is_empty() {
            tx.rollback().await.map_err(db)?;
            return Ok(released);
        }
        let jobs = rows
            .iter()
            .map(|row| Ok((job_from_row(row)?, instant(row, "db_now")?)))
            .collect::<Result<Vec<_>, StoreError>>()?;
        // Outstanding fires per queue of these jobs, counted once; this batch's are added.
        let mut queues: Vec<&str> = jobs.iter().map(|((j, _), _)| j.spec.queue()).collect();
        queues.sort_unstable();
        queues.dedup();
        let mut outstanding: std::collections::HashMap<String, usize> =
            sqlx::query_as::<_, (String, i64)>(
                "SELECT queue, count(*) FROM tickd_fires WHERE queue = ANY($1) GROUP BY queue",
            )
            .bind(&queues)
            .fetch_all(&mut *tx)
            .await
            .map_err(db)?
            .into_iter()
            .map(|(q, n)| (q, usize::try_from(n).unwrap_or(usize::MAX)))
            .collect();
        // The fires of jobs with an overlap policy, read (and the running ones locked) once.
        let overlapping: Vec<&str> = jobs
            .iter()
            .filter(|((j, _), _)| !j.spec.overlap_policy().is_allow())
            .map(|((j, _), _)| j.spec.id())
            .collect();
        let running = running_of(&mut tx, &overlapping).await?;
        let mut staged = Staged::default();
        let mut updates = Vec::with_capacity(jobs.len());
        for ((job, version), db_now) in &jobs {
            let held = outstanding.entry(job.spec.queue().to_string()).or_default();
            let next = staged.release(
                job,
                *db_now,
                &limits,
                held,
                SkipReason::Misfire,
                running.get(job.spec.id()).copied().unwrap_or_default(),
                trace_for,
                self.ledger,
            )?;
            updates.push((next, *version, *db_now));
        }
        // One statement for every fire, one for every job: the transaction's round trips do
        // not grow with the batch.
        if let Some((_, _, db_now)) = updates.first() {
            let db_now = *db_now;
            released.replaced = staged
                .carry_out(&mut tx, db_now, self.ledger, &mut released.woken)
                .await?;
        }
        released.skipped = std::mem::take(&mut staged.skipped);
        released.recorded = std::mem::take(&mut staged.recorded);
        staged.ledger.insert(&mut tx).await?;
        released.fires = staged.fires.insert(&mut tx).await?;
        update_jobs(&mut tx, &updates).await?;
        // Replicas with subscribers on these queues wake up when this commits.
        let queues: Vec<String> = released.fires.iter().map(|f| f.queue.clone()).collect();
        notify(&mut tx, queues).await?;
        tx.commit().await.map_err(db)?;
        Ok(released)
    }

    /// When the earliest job falls due or the earliest lease ends, and the database's now (or
    /// `now`) as it was read.
    pub async fn next_due(
        &self,
        now: Option<Timestamp>,
    ) -> Result<(Option<Timestamp>, Timestamp), StoreError> {
        let row = sqlx::query(
            "SELECT least( \
                 (SELECT min(next_due_at) FROM tickd_jobs WHERE next_due_at IS NOT NULL), \
                 (SELECT min(lease_expires_at) FROM tickd_fires WHERE state = 'leased') \
             ) AS next, coalesce($1, now()) AS db_now",
        )
        .bind(now.map(time).transpose()?)
        .fetch_one(&self.pool)
        .await
        .map_err(db)?;
        next_and_now(&row)
    }

    /// When the earliest fire of `queue` that is waiting becomes deliverable, and the
    /// database's now (or `now`) as it was read.
    pub async fn next_available(
        &self,
        queue: &str,
        now: Option<Timestamp>,
    ) -> Result<(Option<Timestamp>, Timestamp), StoreError> {
        let row = sqlx::query(
            "SELECT min(available_at) AS next, coalesce($2, now()) AS db_now FROM tickd_fires \
             WHERE queue = $1 AND state = 'ready'",
        )
        .bind(queue)
        .bind(now.map(time).transpose()?)
        .fetch_one(&self.pool)
        .await
        .map_err(db)?;
        next_and_now(&row)
    }

    /// The database's clock, now.
    pub async fn clock(&self) -> Result<Timestamp, StoreError> {
        let t: DateTime<Utc> = sqlx::query_scalar("SELECT clock_timestamp()")
            .fetch_one(&self.pool)
            .await
            .map_err(db)?;
        Ok(Timestamp::from_chrono(&t))
    }

    /// Jobs per state, and per queue the fires waiting and the fires leased.
    pub async fn counts(&self) -> Result<Counts, StoreError> {
        let jobs = sqlx::query_as::<_, (String, i64)>(
            "SELECT state, count(*) FROM tickd_jobs GROUP BY state",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(db)?
        .into_iter()
        .map(|(state, n)| Ok((state_of(&state)?, u64::try_from(n).unwrap_or(0))))
        .collect::<Result<Vec<_>, StoreError>>()?;
        let queues = sqlx::query_as::<_, (String, i64, i64)>(
            "SELECT queue, count(*) FILTER (WHERE state = 'ready'), \
                 count(*) FILTER (WHERE state = 'leased') \
             FROM tickd_fires GROUP BY queue",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(db)?
        .into_iter()
        .map(|(q, ready, leased)| {
            (
                q,
                u64::try_from(ready).unwrap_or(0),
                u64::try_from(leased).unwrap_or(0),
            )
        })
        .collect();
        Ok(Counts { jobs, queues })
    }

    /// Of the leases named by `tokens`, those that still hold (not acked, expired and passed
    /// on, or nacked).
    pub async fn still_leased(&self, tokens: &[uuid::Uuid]) -> Result<Vec<uuid::Uuid>, StoreError> {
        sqlx::query_scalar(
            "SELECT lease_token FROM tickd_fires \
             WHERE lease_token = ANY($1) AND state = 'leased'",
        )
        .bind(tokens)
        .fetch_all(&self.pool)
        .await
        .map_err(db)
    }

    /// One job, as the database has it now.
    pub async fn get_job(&self, id: &str) -> Result<Option<Job>, StoreError> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {JOB_COLUMNS} FROM tickd_jobs WHERE id = $1"
        )))
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .map_err(db)?;
        row.map(|row| job_from_row(&row).map(|(job, _)| job))
            .transpose()
    }

    /// Cancels, pauses or resumes a job (see [`Job::apply`]), on whichever replica: the row is
    /// locked while it changes. `Ok(None)` when there is no such job.
    ///
    /// A resumed job's occurrences that fell due while it was paused are released (or passed
    /// over as PAUSED, by the misfire policy) in the same transaction, as `release_due` would;
    /// a cancelled job's owed occurrences go in the ledger.
    pub async fn transition(
        &self,
        id: &str,
        transition: Transition,
        now: Option<Timestamp>,
        limits: &ReleaseLimits,
        trace_for: &(dyn Fn(&FireRecord, &Job) -> Option<TraceContext> + Sync),
    ) -> Result<Option<Result<(Job, Released), TransitionRefused>>, StoreError> {
        let mut tx = self.pool.begin().await.map_err(db)?;
        let Some((mut job, version, db_now)) = locked_job(&mut tx, id, now, "UPDATE").await? else {
            return Ok(None);
        };
        let owed = job.owed(db_now);
        let mut released = Released::default();
        match job.apply(transition) {
            Err(refused) => return Ok(Some(Err(refused))),
            Ok(false) => {}
            Ok(true) => {
                let mut staged = Staged::default();
                match (transition, owed) {
                    (Transition::Resume, Some(_)) => {
                        let queue = job.spec.queue().to_string();
                        let mut held = queue_fires(&mut tx, &queue).await?;
                        let running = if job.spec.overlap_policy().is_allow() {
                            Running::default()
                        } else {
                            let id = job.spec.id();
                            running_of(&mut tx, &[id])
                                .await?
                                .remove(id)
                                .unwrap_or_default()
                        };
                        job = staged.release(
                            &job,
                            db_now,
                            limits,
                            &mut held,
                            SkipReason::Paused,
                            running,
                            trace_for,
                            self.ledger,
                        )?;
                        released.replaced = staged
                            .carry_out(&mut tx, db_now, self.ledger, &mut released.woken)
                            .await?;
                    }
                    (Transition::Cancel, Some(run)) if self.ledger => {
                        let record = Occurrence::skipped(run, db_now);
                        staged.ledger.push(id, &record)?;
                        staged.recorded.push((
                            id.to_string(),
                            job.spec.queue().to_string(),
                            record,
                        ));
                    }
                    _ => {}
                }
                update_job(&mut tx, &job, version, db_now).await?;
                staged.ledger.insert(&mut tx).await?;
                released.fires = staged.fires.insert(&mut tx).await?;
                released.skipped = staged.skipped;
                released.recorded = staged.recorded;
                notify(
                    &mut tx,
                    released.fires.iter().map(|f| f.queue.clone()).collect(),
                )
                .await?;
                if job.status.state.is_final() {
                    job.status.finish_time.get_or_insert(db_now);
                }
            }
        }
        tx.commit().await.map_err(db)?;
        Ok(Some(Ok((job, released))))
    }

    /// Up to `n` ledger records of a job, newest occurrence first, after `after`, none sealed
    /// longer than `retention` before the database's now (or `now`); and whether more follow.
    /// `None` when there is no such job.
    pub async fn occurrences(
        &self,
        id: &str,
        after: Option<OccurrenceKey>,
        n: usize,
        retention: Micros,
        now: Option<Timestamp>,
    ) -> Result<Option<(Vec<Occurrence>, bool)>, StoreError> {
        let mut tx = self.pool.begin().await.map_err(db)?;
        let exists: Option<i32> = sqlx::query_scalar("SELECT 1 FROM tickd_jobs WHERE id = $1")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await
            .map_err(db)?;
        if exists.is_none() {
            return Ok(None);
        }
        if !self.ledger {
            // No ledger kept (--ledger-max-per-job 0): none shown, also from before.
            return Ok(Some((Vec::new(), false)));
        }
        let (after_time, after_triggered) = match after {
            Some((t, triggered)) => (Some(time(t)?), triggered),
            None => (None, false),
        };
        let rows = sqlx::query(
            "SELECT job_id, scheduled_time, triggered, last_time, count, count_at_least, \
                 outcome, attempts, record_time FROM tickd_occurrences \
             WHERE job_id = $1 \
               AND ($2::timestamptz IS NULL OR (scheduled_time, triggered) < ($2, $3)) \
               AND record_time >= coalesce($5, now()) - $6 * interval '1 microsecond' \
             ORDER BY scheduled_time DESC, triggered DESC LIMIT $4",
        )
        .bind(id)
        .bind(after_time)
        .bind(after_triggered)
        .bind(i64::try_from(n.saturating_add(1)).unwrap_or(i64::MAX))
        .bind(now.map(time).transpose()?)
        .bind(retention)
        .fetch_all(&mut *tx)
        .await
        .map_err(db)?;
        tx.commit().await.map_err(db)?;
        let mut records = rows
            .iter()
            .map(occurrence_from_row)
            .collect::<Result<Vec<_>, _>>()?;
        let more = records.len() > n;
        records.truncate(n);
        Ok(Some((records, more)))
    }

    /// Deletes up to `limit` ledger records sealed longer than `retention` before the
    /// database's now (or `now`); returns how many went (fewer than `limit`: none is left).
    pub async fn prune_ledger(
        &self,
        now: Option<Timestamp>,
        retention: Micros,
        limit: i64,
    ) -> Result<u64, StoreError> {
        let old = sqlx::query(
            "DELETE FROM tickd_occurrences WHERE ctid IN ( \
                 SELECT ctid FROM tickd_occurrences \
                 WHERE record_time < coalesce($1, now()) - $2 * interval '1 microsecond' \
                 LIMIT $3)",
        )
        .bind(now.map(time).transpose()?)
        .bind(retention)
        .bind(limit)
        .execute(&self.pool)
        .await
        .map_err(db)?;
        Ok(old.rows_affected())
    }

    /// Trims the ledgers of `jobs` to their newest `per_job` records; returns how many went.
    /// Each job costs a walk of its newest `per_job` index entries.
    pub async fn trim_ledgers(&self, jobs: &[String], per_job: usize) -> Result<u64, StoreError> {
        let trimmed = sqlx::query(
            "DELETE FROM tickd_occurrences o USING ( \
                 SELECT j.id, cut.scheduled_time, cut.triggered FROM unnest($1::text[]) AS j(id) \
                 CROSS JOIN LATERAL ( \
                     SELECT scheduled_time, triggered FROM tickd_occurrences \
                     WHERE job_id = j.id \
                     ORDER BY scheduled_time DESC, triggered DESC OFFSET $2 LIMIT 1) cut) c \
             WHERE o.job_id = c.id \
               AND (o.scheduled_time, o.triggered) <= (c.scheduled_time, c.triggered)",
        )
        .bind(jobs)
        .bind(i64::try_from(per_job).unwrap_or(i64::MAX))
        .execute(&self.pool)
        .await
        .map_err(db)?;
        Ok(trimmed.rows_affected())
    }

    /// Releases one extra fire of a scheduled or paused job now (TriggerJob), its schedule
    /// untouched, as its overlap policy says (released, held, or skipped); `None` when there
    /// is no such job. A queue holding `max_backlog` fires takes none. The same job triggered
    /// twice at one instant releases one fire. With the fire (as released, or as it would
    /// have been), what the release did besides (fires replaced, ledger records, held fires
    /// let go).
    pub async fn trigger(
        &self,
        id: &str,
        now: Option<Timestamp>,
        max_backlog: usize,
        trace_for: &(dyn Fn(&FireRecord, &Job) -> Option<TraceContext> + Sync),
    ) -> Result<Option<Result<(FireRecord, Disposition, Released), TriggerFailed>>, StoreError>
    {
        let mut tx = self.pool.begin().await.map_err(db)?;
        // FOR UPDATE: two triggers of one job at once must see each other's fire (overlap).
        let Some((job, _, at)) = locked_job(&mut tx, id, now, "UPDATE").await? else {
            return Ok(None);
        };
        if job.status.state.is_final() {
            return Ok(Some(Err(TriggerFailed::Finished(job.status.state))));
        }
        let queue = job.spec.queue().to_string();
        let mut rec = FireRecord::released(
            triggered_fire_id(job.spec.id(), at),
            job.spec.id().into(),
            queue.clone(),
            at,
            at,
        );
        // Triggered at this instant already: that fire is the answer.
        let existing: Option<bool> =
            sqlx::query_scalar("SELECT state = 'held' FROM tickd_fires WHERE fire_id = $1")
                .bind(&*rec.fire_id)
                .fetch_optional(&mut *tx)
                .await
                .map_err(db)?;
        if let Some(held) = existing {
            rec.held = held;
            let disposition = if held {
                Disposition::Held
            } else {
                Disposition::Released
            };
            tx.rollback().await.map_err(db)?;
            return Ok(Some(Ok((rec, disposition, Released::default()))));
        }
        let policy = job.spec.overlap_policy();
        let plan = if policy.is_allow() {
            None
        } else {
            let running = running_of(&mut tx, &[job.spec.id()])
                .await?
                .remove(job.spec.id())
                .unwrap_or_default();
            Some(overlap::decide(policy, running, &[at]))
        };
        let disposition = plan
            .as_ref()
            .map_or(Disposition::Released, |p| p.disposition());
        if disposition != Disposition::Skipped {
            let outstanding = queue_fires(&mut tx, &queue).await?;
            if outstanding >= max_backlog {
                return Ok(Some(Err(TriggerFailed::Full(outstanding))));
            }
        }
        let mut released = Released::default();
        let mut staged = Staged::default();
        if let Some(plan) = &plan {
            if plan.replace {
                staged.withdraw.push(id.to_string());
            }
            if plan.unhold {
                staged.unhold.push(id.to_string());
            }
            released.replaced = staged
                .carry_out(&mut tx, at, self.ledger, &mut released.woken)
                .await?;
            if let Some(run) = plan.skipped {
                let mut record = Occurrence::skipped(run, at);
                record.triggered = true;
                staged.record(self.ledger, id, &queue, record)?;
                released.skipped.push(Skipped {
                    job_id: id.to_string(),
                    queue: queue.clone(),
                    missed: SkipReason::Misfire,
                    misfire: 0,
                    misfire_at_least: false,
                    backlog_full: 0,
                    dst: (0, 0),
                    overlap: run.count,
                });
            }
        }
        if disposition != Disposition::Skipped {
            rec.held = disposition == Disposition::Held;
            rec.trace = trace_for(&rec, &job);
            staged.fires.push(&job, rec.clone())?;
        }
        staged.ledger.insert(&mut tx).await?;
        released.recorded = std::mem::take(&mut staged.recorded);
        released.fires = staged.fires.insert(&mut tx).await?;
        if disposition == Disposition::Released {
            notify(&mut tx, vec![queue]).await?;
        }
        tx.commit().await.map_err(db)?;
        Ok(Some(Ok((rec, disposition, released))))
    }

    /// Releases the occurrences of job `id` in `[start, end)` whose ledger entry is not
    /// DELIVERED and whose fire is not out, oldest first, with their usual fire ids (see
    /// [`crate::domain::backfill`]), all or nothing; `None` when there is no such job. With
    /// them, how many occurrences of the range were left alone as delivered and as out.
    #[allow(clippy::too_many_arguments)]
    pub async fn backfill(
        &self,
        id: &str,
        start: Timestamp,
        end: Timestamp,
        now: Option<Timestamp>,
        bounds: crate::domain::ledger::Bounds,
        max_backlog: usize,
        trace_for: &(dyn Fn(&FireRecord, &Job) -> Option<TraceContext> + Sync),
    ) -> Result<Option<Result<(Vec<FireRecord>, u32, u32), BackfillFailed>>, StoreError> {
        use crate::domain::backfill;
        let mut tx = self.pool.begin().await.map_err(db)?;
        // FOR UPDATE: two backfills of one job at once see each other's fires.
        let Some((job, _, now)) = locked_job(&mut tx, id, now, "UPDATE").await? else {
            return Ok(None);
        };
        if let Err(e) = backfill::admissible(&job, start, now) {
            return Ok(Some(Err(BackfillFailed::Refused(e))));
        }
        let bounds = if self.ledger {
            bounds
        } else {
            crate::domain::ledger::Bounds {
                per_job: 0,
                ..bounds
            }
        };
        // Trimming to the cap is lazy (each retention pass), and an old occurrence's record may
        // arrive after a trim: the oldest entry the ledger surely still has is the
        // `per_job`-th newest, if it holds that many.
        let (len, oldest): (i64, Option<DateTime<Utc>>) = sqlx::query_as(
            "SELECT count(*), (SELECT scheduled_time FROM tickd_occurrences \
                 WHERE job_id = $1 AND record_time >= $2 \
                 ORDER BY scheduled_time DESC OFFSET $3 - 1 LIMIT 1) \
             FROM tickd_occurrences WHERE job_id = $1 AND record_time >= $2",
        )
        .bind(id)
        .bind(time(now.minus(bounds.retention))?)
        .bind(i64::try_from(bounds.per_job.max(1)).unwrap_or(i64::MAX))
        .fetch_one(&mut *tx)
        .await
        .map_err(db)?;
        if let Err(e) = backfill::ledger_reaches(
            bounds,
            now,
            start,
            usize::try_from(len).unwrap_or(usize::MAX),
            oldest.map(|t| Timestamp::from_chrono(&t)),
            id,
        ) {
            return Ok(Some(Err(BackfillFailed::Refused(e))));
        }
        let wanted = match backfill::occurrences(&job, start, end, now) {
            Ok(w) => w,
            Err(e) => return Ok(Some(Err(BackfillFailed::Refused(e)))),
        };
        let ids: Vec<String> = wanted.iter().map(|o| fire_id(id, *o).to_string()).collect();
        // The fires still out, locked: an ack under way is waited for (then its fire is gone
        // and its DELIVERED record, written by the same statement, is seen below).
        let out: std::collections::HashSet<String> = sqlx::query_scalar(
            "SELECT fire_id FROM tickd_fires WHERE fire_id = ANY($1) FOR UPDATE",
        )
        .bind(&ids)
        .fetch_all(&mut *tx)
        .await
        .map_err(db)?
        .into_iter()
        .collect();
        let times = wanted
            .iter()
            .map(|o| time(*o))
            .collect::<Result<Vec<_>, _>>()?;
        let delivered: std::collections::HashSet<DateTime<Utc>> = sqlx::query_scalar(
            "SELECT scheduled_time FROM tickd_occurrences WHERE job_id = $1 AND NOT triggered \
             AND outcome = 1 AND scheduled_time = ANY($2)",
        )
        .bind(id)
        .bind(&times)
        .fetch_all(&mut *tx)
        .await
        .map_err(db)?
        .into_iter()
        .collect();
        let (mut n_delivered, mut n_out) = (0u32, 0u32);
        let mut fires = NewFires::default();
        let queue = job.spec.queue().to_string();
        for ((o, t), fid) in wanted.iter().zip(&times).zip(ids) {
            if out.contains(&fid) {
                n_out += 1;
            } else if delivered.contains(t) {
                n_delivered += 1;
            } else {
                let mut rec = FireRecord::released(fid.into(), id.into(), queue.clone(), *o, now);
                rec.trace = trace_for(&rec, &job);
                fires.push(&job, rec)?;
            }
        }
        let outstanding = queue_fires(&mut tx, &queue).await?;
        if outstanding + fires.records.len() > max_backlog {
            return Ok(Some(Err(BackfillFailed::Full {
                outstanding,
                wanted: fires.records.len(),
            })));
        }
        let released = fires.insert(&mut tx).await?;
        if !released.is_empty() {
            notify(&mut tx, vec![queue]).await?;
        }
        tx.commit().await.map_err(db)?;
        Ok(Some(Ok((released, n_delivered, n_out))))
    }

    /// Puts `spec` in place of its job's spec if that still has `etag` (see
    /// [`Job::updated`]); `None` when there is no such job. `now` overrides the database's
    /// clock (tests). With the job, the ledger record of the occurrences it owed and will not
    /// release (see [`Job::withdrawn_by`]).
    pub async fn update(
        &self,
        spec: &JobSpec,
        expected: &str,
        now: Option<Timestamp>,
    ) -> Result<Option<Result<(Job, Option<Occurrence>), UpdateFailed>>, StoreError> {
        let mut tx = self.pool.begin().await.map_err(db)?;
        let Some((job, version, now)) = locked_job(&mut tx, &spec.id, now, "UPDATE").await? else {
            return Ok(None);
        };
        if etag(&job.spec) != expected {
            return Ok(Some(Err(UpdateFailed::Changed)));
        }
        let mut updated = match job.updated(spec, now) {
            Ok(j) => j,
            Err(e) => return Ok(Some(Err(UpdateFailed::Refused(e)))),
        };
        // The spec as updated: a relative trigger was resolved against now (`Job::updated`).
        let stored = updated.spec.to_spec();
        sqlx::query("UPDATE tickd_jobs SET spec = $2, labels = $3::jsonb WHERE id = $1")
            .bind(&*spec.id)
            .bind(codec::encode(&stored)?)
            .bind(labels_json(&stored.labels)?)
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        update_job(&mut tx, &updated, version, now).await?;
        // The job's fires out say whether their end must look for a held fire: under
        // BUFFER_ONE, or while one is held (it stays held until what runs ends).
        let policy = updated.spec.overlap_policy();
        if policy != job.spec.overlap_policy() {
            // Locked in fire id order, as acks lock theirs.
            sqlx::query(
                "UPDATE tickd_fires SET buffer_one = $2 OR EXISTS (SELECT 1 FROM tickd_fires h \
                     WHERE h.job_id = $1 AND h.state = 'held') \
                 WHERE fire_id IN (SELECT fire_id FROM tickd_fires WHERE job_id = $1 \
                     ORDER BY fire_id FOR UPDATE)",
            )
            .bind(&*spec.id)
            .bind(policy == OverlapPolicy::BufferOne)
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        }
        // What the job owed and will not release now goes in the ledger.
        let withdrawn = job
            .withdrawn_by(&updated, now)
            .filter(|_| self.ledger)
            .map(|run| Occurrence::skipped(run, now));
        if let Some(record) = &withdrawn {
            let mut ledger = NewOccurrences::default();
            ledger.push(&spec.id, record)?;
            ledger.insert(&mut tx).await?;
        }
        if updated.status.state.is_final() {
            updated.status.finish_time.get_or_insert(now);
        }
        tx.commit().await.map_err(db)?;
        Ok(Some(Ok((updated, withdrawn))))
    }

    /// Deletes a job and its outstanding fires at once; `None` when there is no such job, else
    /// the fires dropped.
    pub async fn delete_job(&self, id: &str) -> Result<Option<Vec<FireRecord>>, StoreError> {
        let mut tx = self.pool.begin().await.map_err(db)?;
        let deleted = sqlx::query("DELETE FROM tickd_jobs WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        if deleted.rows_affected() == 0 {
            return Ok(None);
        }
        let fires = sqlx::query(sqlx::AssertSqlSafe(format!(
            "DELETE FROM tickd_fires WHERE job_id = $1 RETURNING {FIRE_COLUMNS}"
        )))
        .bind(id)
        .fetch_all(&mut *tx)
        .await
        .map_err(db)?;
        // Last: a ledger record sealed by a transaction this one waited for is seen.
        sqlx::query("DELETE FROM tickd_occurrences WHERE job_id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        tx.commit().await.map_err(db)?;
        Ok(Some(
            fires.iter().map(fire_from_row).collect::<Result<_, _>>()?,
        ))
    }

    /// Up to `page_size` jobs in id order after `after` that are on `queue` (when given), in
    /// one of `states` (when any) and carry every one of `labels`, and whether more may follow.
    pub async fn list_jobs(
        &self,
        queue: Option<&str>,
        states: &[JobState],
        labels: &std::collections::BTreeMap<String, String>,
        page_size: i64,
        after: Option<&str>,
    ) -> Result<(Vec<Job>, bool), StoreError> {
        let states: Vec<&str> = states.iter().map(|s| state_name(*s)).collect();
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {JOB_COLUMNS} FROM tickd_jobs \
             WHERE ($1::text IS NULL OR queue = $1) AND ($2::text IS NULL OR id > $2) \
               AND (cardinality($3::text[]) = 0 OR state = ANY($3)) \
               AND labels @> $4::jsonb \
             ORDER BY id LIMIT $5 + 1"
        )))
        .bind(queue)
        .bind(after)
        .bind(&states)
        .bind(labels_json(labels)?)
        .bind(page_size)
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        let more = rows.len() as i64 > page_size;
        let jobs = rows
            .iter()
            .take(usize::try_from(page_size).unwrap_or(0))
            .map(|row| job_from_row(row).map(|(job, _)| job))
            .collect::<Result<Vec<_>, _>>()?;
        Ok((jobs, more))
    }

    /// Deletes up to `limit` finished jobs whose retention (`retention` after their finish)
    /// ended at the database's now (or `now`) and that have no fire outstanding. Returns how
    /// many.
    pub async fn delete_expired(
        &self,
        now: Option<Timestamp>,
        retention: Micros,
        limit: i64,
    ) -> Result<u64, StoreError> {
        let deleted: i64 = sqlx::query_scalar(
            "WITH gone AS (DELETE FROM tickd_jobs WHERE id IN ( \
                 SELECT j.id FROM tickd_jobs j \
                 WHERE j.state IN ('completed', 'cancelled') \
                   AND j.finish_time <= coalesce($1, now()) - $2 * interval '1 microsecond' \
                   AND NOT EXISTS (SELECT 1 FROM tickd_fires f WHERE f.job_id = j.id) \
                 LIMIT $3 FOR UPDATE SKIP LOCKED) RETURNING id), \
             ledger AS (DELETE FROM tickd_occurrences o USING gone WHERE o.job_id = gone.id) \
             SELECT count(*) FROM gone",
        )
        .bind(now.map(time).transpose()?)
        .bind(retention)
        .bind(limit)
        .fetch_one(&self.pool)
        .await
        .map_err(db)?;
        Ok(u64::try_from(deleted).unwrap_or(0))
    }

    /// Leases up to `n` ready fires of `queue` to `holder`: each for its ack deadline, measured
    /// on the database's clock (or from `now`, for tests), with a new lease token. A fire is
    /// leased to one holder at a time; replicas claiming at once skip each other's rows.
    pub async fn claim(
        &self,
        queue: &str,
        n: i64,
        holder: &str,
        now: Option<Timestamp>,
    ) -> Result<Vec<Lease>, StoreError> {
        let now = now.map(time).transpose()?;
        let rows = sqlx::query(
            "UPDATE tickd_fires f SET state = 'leased', lease_token = gen_random_uuid(), \
                 leased_by = $3, \
                 lease_expires_at = coalesce($4, clock_timestamp()) \
                     + f.ack_deadline_us * interval '1 microsecond' \
             FROM ( \
                 SELECT fire_id FROM tickd_fires \
                 WHERE queue = $1 AND state = 'ready' AND available_at <= coalesce($4, now()) \
                 ORDER BY available_at, fire_id LIMIT $2 FOR UPDATE SKIP LOCKED) ready \
             WHERE f.fire_id = ready.fire_id \
             RETURNING f.fire_id, f.job_id, f.queue, f.scheduled_time, f.fire_time, f.attempt, \
                 f.dead_lettered, f.trace, false AS held, f.lease_token, f.lease_expires_at, \
                 (SELECT j.spec FROM tickd_jobs j WHERE j.id = f.job_id) AS spec",
        )
        .bind(queue)
        .bind(n)
        .bind(holder)
        .bind(now)
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        rows.into_iter()
            .map(|row| {
                let fire = fire_from_row(&row)?;
                // A job is deleted with its fires in one transaction, so a leased fire has one.
                let spec: Option<Vec<u8>> = row.try_get("spec").map_err(db)?;
                let spec = spec.ok_or_else(|| StoreError::MissingSpec(fire.job_id.to_string()))?;
                let spec: JobSpec = codec::decode("tickd_jobs", &fire.job_id, &spec)?;
                Ok(Lease {
                    spec: PackedSpec::for_delivery(&spec),
                    fire,
                    token: row.try_get("lease_token").map_err(db)?,
                    expires_at: instant(&row, "lease_expires_at")?,
                })
            })
            .collect()
    }

    /// Acks fires of `queue` by id, from any replica and whatever their lease: returns the
    /// ones that were outstanding (and are now gone).
    /// Each one's occurrence goes in the ledger as delivered, at the database's now (or `now`),
    /// in the same statement.
    pub async fn ack(
        &self,
        queue: &str,
        fire_ids: &[String],
        now: Option<Timestamp>,
    ) -> Result<Vec<FireRecord>, StoreError> {
        let done = sqlx::query(sqlx::AssertSqlSafe(format!(
            "WITH done AS (DELETE FROM tickd_fires WHERE fire_id IN ( \
                     SELECT fire_id FROM tickd_fires WHERE queue = $1 AND fire_id = ANY($2) \
                     AND state <> 'held' ORDER BY fire_id FOR UPDATE) \
                 RETURNING {FIRE_COLUMNS}, buffer_one), \
             sealed AS ({SEAL_DELIVERED}) \
             SELECT * FROM done"
        )))
        .bind(queue)
        .bind(fire_ids)
        .bind(now.map(time).transpose()?)
        .bind(self.ledger)
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        self.acked(done, now).await
    }

    /// Acks many fires, each of its own queue (`(queue, fire_id)` pairs), in one commit: the
    /// acks that several streams sent meanwhile. Returns the ones that were outstanding.
    pub async fn ack_each(
        &self,
        acks: &[(String, String)],
        now: Option<Timestamp>,
    ) -> Result<Vec<FireRecord>, StoreError> {
        let (queues, ids): (Vec<&str>, Vec<&str>) =
            acks.iter().map(|(q, id)| (q.as_str(), id.as_str())).unzip();
        let done = sqlx::query(sqlx::AssertSqlSafe(format!(
            "WITH done AS (DELETE FROM tickd_fires WHERE fire_id IN ( \
                     SELECT fire_id FROM tickd_fires WHERE (queue, fire_id) IN \
                         (SELECT * FROM unnest($1::text[], $2::text[])) \
                     AND state <> 'held' ORDER BY fire_id FOR UPDATE) \
                 RETURNING {FIRE_COLUMNS}, buffer_one), \
             sealed AS ({SEAL_DELIVERED}) \
             SELECT * FROM done"
        )))
        .bind(&queues)
        .bind(&ids)
        .bind(now.map(time).transpose()?)
        .bind(self.ledger)
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        self.acked(done, now).await
    }

    /// The fires an ack deleted (rows of [`FIRE_COLUMNS`] and `buffer_one`); the held fires of
    /// their BUFFER_ONE jobs go if nothing of the job runs any more. (Not in the ack's
    /// statement: its snapshot would not see a fire held by a release it waited for.)
    async fn acked(
        &self,
        done: Vec<sqlx::postgres::PgRow>,
        now: Option<Timestamp>,
    ) -> Result<Vec<FireRecord>, StoreError> {
        let mut jobs = Vec::new();
        let mut fires = Vec::with_capacity(done.len());
        for row in &done {
            let fire = fire_from_row(row)?;
            if row.try_get::<bool, _>("buffer_one").map_err(db)? && !fire.dead_lettered {
                jobs.push(fire.job_id.to_string());
            }
            fires.push(fire);
        }
        if !jobs.is_empty() {
            jobs.sort_unstable();
            jobs.dedup();
            // The ack is stored; a held fire not let go now is let go by the sweep.
            if let Err(e) = unhold_idle(&self.pool, Some(&jobs), now).await {
                tracing::warn!(error = %e, "a held fire could not be let go after an ack; the retention pass lets it go within a minute");
            }
        }
        Ok(fires)
    }

    /// Lets go every held fire whose job has nothing running (a sweep: an ack or a failed
    /// attempt lets its job's held fire go itself, but a crash between its commit and that
    /// may leave one held). Returns the queues woken.
    pub async fn unhold_idle(&self, now: Option<Timestamp>) -> Result<Vec<String>, StoreError> {
        unhold_idle(&self.pool, None, now).await
    }

    /// Moves the lease of a fire held with `token` to `by` from now; false when the lease is
    /// no longer that token's (expired and passed on, acked, nacked).
    pub async fn extend(
        &self,
        fire_id: &str,
        token: uuid::Uuid,
        by: Micros,
        now: Option<Timestamp>,
    ) -> Result<bool, StoreError> {
        let moved = sqlx::query(
            "UPDATE tickd_fires \
             SET lease_expires_at = coalesce($4, clock_timestamp()) + $3 * interval '1 microsecond' \
             WHERE fire_id = $1 AND lease_token = $2 AND state = 'leased'",
        )
        .bind(fire_id)
        .bind(token)
        .bind(by)
        .bind(now.map(time).transpose()?)
        .execute(&self.pool)
        .await
        .map_err(db)?;
        Ok(moved.rows_affected() == 1)
    }

    /// Gives back a fire held with `token` for another attempt after `delay` (or to its
    /// dead-letter queue, or drops it, when its attempts are used up), and says which; `None`
    /// when the lease is no longer that token's, and then nothing changes.
    pub async fn nack(
        &self,
        fire_id: &str,
        token: uuid::Uuid,
        delay: Micros,
        now: Option<Timestamp>,
    ) -> Result<Option<Attempted>, StoreError> {
        let mut tx = self.pool.begin().await.map_err(db)?;
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {FAILED_ATTEMPT_COLUMNS}, coalesce($3, clock_timestamp()) AS db_now \
             FROM tickd_fires WHERE fire_id = $1 AND lease_token = $2 AND state = 'leased' \
             FOR UPDATE"
        )))
        .bind(fire_id)
        .bind(token)
        .bind(now.map(time).transpose()?)
        .fetch_optional(&mut *tx)
        .await
        .map_err(db)?;
        let Some(row) = row else {
            return Ok(None);
        };
        let failed = FailedAttempt::read(&row)?;
        let outcome = failed.settle(&mut tx, |_| delay, self.ledger).await?;
        notify(&mut tx, outcome.queue().into_iter().collect()).await?;
        tx.commit().await.map_err(db)?;
        Ok(Some(outcome))
    }

    /// Takes back up to `limit` fires whose lease expired (at the database's now, or `now`),
    /// whoever held them: each goes out again the expiry backoff after its lease ended (capped at
    /// `max_backoff`), or to its dead-letter queue, or is dropped. Returns what became of each.
    pub async fn reap_expired(
        &self,
        now: Option<Timestamp>,
        limit: i64,
        max_backoff: Micros,
    ) -> Result<Vec<Attempted>, StoreError> {
        let mut tx = self.pool.begin().await.map_err(db)?;
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {FAILED_ATTEMPT_COLUMNS}, lease_expires_at AS db_now \
             FROM tickd_fires \
             WHERE state = 'leased' AND lease_expires_at <= coalesce($1, now()) \
             ORDER BY lease_expires_at LIMIT $2 FOR UPDATE SKIP LOCKED"
        )))
        .bind(now.map(time).transpose()?)
        .bind(limit)
        .fetch_all(&mut *tx)
        .await
        .map_err(db)?;
        if rows.is_empty() {
            tx.rollback().await.map_err(db)?;
            return Ok(Vec::new());
        }
        let mut outcomes = Vec::with_capacity(rows.len());
        for row in rows {
            let failed = FailedAttempt::read(&row)?;
            outcomes.push(
                failed
                    .settle(
                        &mut tx,
                        |attempt| expiry_backoff(attempt, max_backoff),
                        self.ledger,
                    )
                    .await?,
            );
        }
        notify(
            &mut tx,
            outcomes.iter().filter_map(Attempted::queue).collect(),
        )
        .await?;
        tx.commit().await.map_err(db)?;
        Ok(outcomes)
    }
}

/// A leased fire whose attempt failed, as read (and locked) for deciding what follows.
struct FailedAttempt {
    fire: FireRecord,
    max_attempts: u32,
    dead_letter_queue: Option<String>,
    /// Its job is BUFFER_ONE: when it stops running, the job's held fire may go.
    buffer_one: bool,
    now: Timestamp,
}

/// The columns [`FailedAttempt::read`] reads, besides `db_now`.
const FAILED_ATTEMPT_COLUMNS: &str = "fire_id, job_id, queue, scheduled_time, fire_time, \
     attempt, dead_lettered, trace, false AS held, max_attempts, dead_letter_queue, buffer_one";

/// What became of a fire whose attempt failed: `fire` as it was, and [`after_attempt`]'s
/// decision.
#[derive(Debug, Clone)]
pub struct Attempted {
    pub fire: FireRecord,
    pub after: AfterAttempt,
    /// The occurrence's ledger record, when the fire's fate is sealed.
    pub record: Option<Occurrence>,
}

impl Attempted {
    /// The queue the fire waits on now, unless it was dropped.
    fn queue(&self) -> Option<String> {
        match &self.after {
            AfterAttempt::Again { .. } => Some(self.fire.queue.clone()),
            AfterAttempt::DeadLetter { queue } => Some(queue.clone()),
            AfterAttempt::Drop => None,
        }
    }
}

impl FailedAttempt {
    fn read(row: &sqlx::postgres::PgRow) -> Result<FailedAttempt, StoreError> {
        Ok(FailedAttempt {
            fire: fire_from_row(row)?,
            max_attempts: u32::try_from(row.try_get::<i32, _>("max_attempts").map_err(db)?)
                .unwrap_or(1),
            dead_letter_queue: row.try_get("dead_letter_queue").map_err(db)?,
            buffer_one: row.try_get("buffer_one").map_err(db)?,
            now: instant(row, "db_now")?,
        })
    }

    /// Writes what [`after_attempt`] decides; `delay_for(attempt)` is the wait before the next.
    /// A dead-lettered or dropped fire's occurrence goes in the ledger (when `ledger`).
    async fn settle(
        self,
        tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
        delay_for: impl Fn(u32) -> Micros,
        ledger: bool,
    ) -> Result<Attempted, StoreError> {
        let delay = delay_for(self.fire.attempt);
        let id = &self.fire.fire_id;
        let after = after_attempt(
            self.fire.attempt,
            self.fire.dead_lettered,
            self.max_attempts,
            self.dead_letter_queue.as_deref(),
            delay,
        );
        let query = match &after {
            AfterAttempt::Again { attempt, delay } => sqlx::query(
                "UPDATE tickd_fires SET state = 'ready', attempt = $2, \
                 available_at = $3, lease_token = NULL, leased_by = NULL, \
                 lease_expires_at = NULL WHERE fire_id = $1",
            )
            .bind(id)
            .bind(i32::try_from(*attempt).unwrap_or(i32::MAX))
            .bind(time(self.now.plus(*delay))?),
            AfterAttempt::DeadLetter { queue } => sqlx::query(
                "UPDATE tickd_fires SET state = 'ready', attempt = 1, queue = $2, \
                 dead_lettered = true, available_at = $3, lease_token = NULL, \
                 leased_by = NULL, lease_expires_at = NULL WHERE fire_id = $1",
            )
            .bind(id)
            .bind(queue)
            .bind(time(self.now)?),
            AfterAttempt::Drop => {
                sqlx::query("DELETE FROM tickd_fires WHERE fire_id = $1").bind(id)
            }
        };
        query.execute(&mut **tx).await.map_err(db)?;
        // A fire dropped on the dead-letter queue: its occurrence is DEAD_LETTERED already.
        let record = match after {
            AfterAttempt::Again { .. } => None,
            AfterAttempt::DeadLetter { .. } => Some(Outcome::DeadLettered),
            AfterAttempt::Drop if self.fire.dead_lettered => None,
            AfterAttempt::Drop => Some(Outcome::Dropped),
        }
        .filter(|_| ledger)
        .map(|outcome| {
            let f = &self.fire;
            let triggered = is_triggered(&f.fire_id);
            Occurrence::released(f.scheduled_time, triggered, outcome, f.attempt, self.now)
        });
        if let Some(record) = &record {
            let mut new = NewOccurrences::default();
            new.push(&self.fire.job_id, record)?;
            new.insert(tx).await?;
        }
        // It stopped running (to the dead-letter queue, or dropped): its job's held fire may go.
        let stopped = !self.fire.dead_lettered && !matches!(after, AfterAttempt::Again { .. });
        if self.buffer_one && stopped {
            let job = [self.fire.job_id.to_string()];
            unhold_idle(&mut **tx, Some(&job), Some(self.now)).await?;
        }
        Ok(Attempted {
            fire: self.fire,
            after,
            record,
        })
    }
}

/// A fire leased to one holder until `expires_at` (database time).
#[derive(Debug, Clone)]
pub struct Lease {
    pub fire: FireRecord,
    /// The fire's job (payload, labels, delivery options).
    pub spec: PackedSpec,
    /// Names this lease: a nack or extend must carry it, so a stale holder changes nothing.
    pub token: uuid::Uuid,
    pub expires_at: Timestamp,
}

/// Labels as a JSON object, for the `labels` column and its filter.
fn labels_json(labels: &std::collections::BTreeMap<String, String>) -> Result<String, StoreError> {
    serde_json::to_string(labels).map_err(|e| StoreError::Io(format!("labels: {e}")))
}

/// The columns [`job_from_row`] reads.
const JOB_COLUMNS: &str = "id, spec, state, next_occurrence, fire_count, create_time, \
     last_fire_time, finish_time, trace, version";

/// The ledger records of the fires a `done` CTE deleted by ack ($3: now or null for the
/// database's, $4: whether the ledger is kept). A dead-lettered fire's occurrence is in the
/// ledger as such already. A record under the same key is replaced, as everywhere.
const SEAL_DELIVERED: &str = "INSERT INTO tickd_occurrences (job_id, scheduled_time, \
     triggered, last_time, count, outcome, attempts, record_time) \
     SELECT job_id, scheduled_time, right(fire_id, 8) = '#trigger', scheduled_time, 1, 1, \
         attempt, coalesce($3::timestamptz, now()) \
     FROM done WHERE NOT dead_lettered AND $4::bool \
     ON CONFLICT (job_id, scheduled_time, triggered) DO UPDATE SET \
         last_time = excluded.last_time, count = 1, count_at_least = false, \
         outcome = excluded.outcome, attempts = excluded.attempts, \
         record_time = excluded.record_time";

/// The columns [`fire_from_row`] reads.
const FIRE_COLUMNS: &str = "fire_id, job_id, queue, scheduled_time, fire_time, attempt, \
     dead_lettered, trace, state = 'held' AS held";

/// A fire from a row of [`FIRE_COLUMNS`].
fn fire_from_row(row: &sqlx::postgres::PgRow) -> Result<FireRecord, StoreError> {
    let fire_id: String = row.try_get("fire_id").map_err(db)?;
    let job_id: String = row.try_get("job_id").map_err(db)?;
    Ok(FireRecord {
        trace: decode_trace(row, "tickd_fires", &fire_id)?,
        fire_id: fire_id.into(),
        job_id: job_id.as_str().into(),
        queue: row.try_get("queue").map_err(db)?,
        scheduled_time: instant(row, "scheduled_time")?,
        fire_time: instant(row, "fire_time")?,
        attempt: u32::try_from(row.try_get::<i32, _>("attempt").map_err(db)?).unwrap_or(1),
        not_before: None,
        dead_lettered: row.try_get("dead_lettered").map_err(db)?,
        held: row.try_get("held").map_err(db)?,
    })
}

/// The `trace` column (MessagePack), if set.
fn decode_trace(
    row: &sqlx::postgres::PgRow,
    table: &'static str,
    key: &str,
) -> Result<Option<TraceContext>, StoreError> {
    let bytes: Option<Vec<u8>> = row.try_get("trace").map_err(db)?;
    bytes.map(|b| codec::decode(table, key, &b)).transpose()
}

/// One job, locked `FOR UPDATE` (to change it) or `FOR SHARE` (to act on it unchanged) for the
/// rest of `tx`, with its version and the database's now (or `now`).
async fn locked_job(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    id: &str,
    now: Option<Timestamp>,
    lock: &'static str,
) -> Result<Option<(Job, i64, Timestamp)>, StoreError> {
    let row = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {JOB_COLUMNS}, coalesce($2, now()) AS db_now FROM tickd_jobs \
         WHERE id = $1 FOR {lock}"
    )))
    .bind(id)
    .bind(now.map(time).transpose()?)
    .fetch_optional(&mut **tx)
    .await
    .map_err(db)?;
    let Some(row) = row else {
        return Ok(None);
    };
    let (job, version) = job_from_row(&row)?;
    Ok(Some((job, version, instant(&row, "db_now")?)))
}

/// Wakes, when the transaction commits, the replicas serving these queues.
async fn notify(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    mut queues: Vec<String>,
) -> Result<(), StoreError> {
    queues.sort_unstable();
    queues.dedup();
    if queues.is_empty() {
        return Ok(());
    }
    sqlx::query("SELECT pg_notify($1, q) FROM unnest($2::text[]) AS q")
        .bind(FIRES_CHANNEL)
        .bind(&queues)
        .execute(&mut **tx)
        .await
        .map_err(db)?;
    Ok(())
}

/// Most advances of one job in one release (each takes one on-time occurrence).
const MAX_STEPS: usize = 1_000;

/// How much one [`PgStore::release_due`] takes on.
#[derive(Debug, Clone, Copy)]
pub struct ReleaseLimits {
    /// Most jobs in one transaction.
    pub batch: i64,
    /// Most catch-up fires of one MISFIRE_POLICY_FIRE_ALL job.
    pub catch_up_cap: usize,
    /// Most fires one queue holds un-acked.
    pub max_backlog: usize,
}

/// Due jobs' releases being gathered for one transaction.
#[derive(Default)]
struct Staged {
    fires: NewFires,
    ledger: NewOccurrences,
    skipped: Vec<Skipped>,
    recorded: Vec<(String, String, Occurrence)>,
    /// Jobs whose running and held fires a release withdraws (overlap REPLACE).
    withdraw: Vec<String>,
    /// Jobs whose held fire goes now (nothing of theirs runs).
    unhold: Vec<String>,
}

impl Staged {
    /// Advances a due job as far as `db_now` (at most MAX_STEPS on-time occurrences; the rest
    /// stays due for the next release): its fires and ledger records are staged, `held` (its
    /// queue's outstanding fires) grows with its fires, and the job as it will be is returned.
    /// Occurrences its misfire policy passes over are skipped for `missed` (MISFIRE, or
    /// PAUSED on resume). `running` is the job's fires as its overlap policy sees them (see
    /// [`running_of`]; ignored under ALLOW).
    #[allow(clippy::too_many_arguments)]
    fn release(
        &mut self,
        job: &Job,
        db_now: Timestamp,
        limits: &ReleaseLimits,
        held: &mut usize,
        missed: SkipReason,
        mut running: Running,
        trace_for: &(dyn Fn(&FireRecord, &Job) -> Option<TraceContext> + Sync),
        ledger: bool,
    ) -> Result<Job, StoreError> {
        let id = job.spec.id().to_string();
        let queue = job.spec.queue().to_string();
        let mut next = job.clone();
        let mut occurrences = Vec::new();
        let mut hold = None;
        let mut skipped = Skipped {
            job_id: id.clone(),
            queue: queue.clone(),
            missed,
            misfire: 0,
            misfire_at_least: false,
            backlog_full: 0,
            dst: (0, 0),
            overlap: 0,
        };
        for _ in 0..MAX_STEPS {
            let stored = *held + occurrences.len() + usize::from(hold.is_some());
            let room = limits.max_backlog.saturating_sub(stored);
            let plan = advance_with_room(&next, db_now, limits.catch_up_cap, room, running);
            if plan.status == next.status {
                break;
            }
            skipped.misfire += plan.skipped;
            skipped.misfire_at_least |= plan.skipped_at_least;
            skipped.backlog_full += plan.skipped_no_room;
            skipped.dst.0 += plan.skipped_dst.0;
            skipped.dst.1 += plan.skipped_dst.1;
            let o = &plan.overlap;
            if o.replace {
                // Released earlier in this release: withdrawn before anyone saw them.
                for at in occurrences.drain(..).chain(hold.take()) {
                    let record = Occurrence::released(at, false, Outcome::Replaced, 0, db_now);
                    self.record(ledger, &id, &queue, record)?;
                }
                if !self.withdraw.contains(&id) {
                    self.withdraw.push(id.clone());
                }
            }
            if o.unhold && !self.unhold.contains(&id) {
                self.unhold.push(id.clone());
            }
            running = o.after(running, plan.fires.len());
            for mut run in plan.passed_over {
                if run.reason == SkipReason::Misfire {
                    run.reason = missed;
                }
                if run.reason == SkipReason::Overlap {
                    skipped.overlap += run.count;
                }
                self.record(ledger, &id, &queue, Occurrence::skipped(run, db_now))?;
            }
            occurrences.extend(plan.fires);
            if let Some(at) = plan.overlap.hold {
                hold = Some(at);
            }
            next.status = plan.status;
            if next.next_due().is_none_or(|due| due > db_now) {
                break;
            }
        }
        if skipped.misfire > 0
            || skipped.backlog_full > 0
            || skipped.dst != (0, 0)
            || skipped.overlap > 0
        {
            self.skipped.push(skipped);
        }
        let stored = occurrences.into_iter().map(|o| (o, false));
        for (occurrence, is_held) in stored.chain(hold.map(|o| (o, true))) {
            let mut rec = FireRecord::released(
                fire_id(&id, occurrence),
                id.as_str().into(),
                queue.clone(),
                occurrence,
                db_now,
            );
            rec.held = is_held;
            rec.trace = trace_for(&rec, job);
            *held += 1;
            self.fires.push(job, rec)?;
        }
        Ok(next)
    }

    /// Stages a ledger record of job `id` on `queue` (when the ledger is on).
    fn record(
        &mut self,
        ledger: bool,
        id: &str,
        queue: &str,
        record: Occurrence,
    ) -> Result<(), StoreError> {
        if ledger {
            self.ledger.push(id, &record)?;
            self.recorded
                .push((id.to_string(), queue.to_string(), record));
        }
        Ok(())
    }

    /// Withdraws and lets go what the staged releases said (before their fires are stored):
    /// the withdrawn fires are returned, their occurrences staged as REPLACED; the queues of
    /// fires let go are added to `woken`.
    async fn carry_out(
        &mut self,
        tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
        now: Timestamp,
        ledger: bool,
        woken: &mut Vec<String>,
    ) -> Result<Vec<FireRecord>, StoreError> {
        let mut replaced = Vec::new();
        if !self.withdraw.is_empty() {
            // Locked in fire id order, as acks lock theirs.
            let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
                "DELETE FROM tickd_fires WHERE fire_id IN (SELECT fire_id FROM tickd_fires \
                     WHERE job_id = ANY($1) AND NOT dead_lettered ORDER BY fire_id FOR UPDATE) \
                 RETURNING {FIRE_COLUMNS}, state = 'leased' AS leased"
            )))
            .bind(&self.withdraw)
            .fetch_all(&mut **tx)
            .await
            .map_err(db)?;
            for row in rows {
                let fire = fire_from_row(&row)?;
                let leased: bool = row.try_get("leased").map_err(db)?;
                let delivered = match (leased, fire.held) {
                    (true, _) => fire.attempt,
                    (false, true) => 0,
                    (false, false) => fire.attempt.saturating_sub(1),
                };
                let triggered = is_triggered(&fire.fire_id);
                let record = Occurrence::released(
                    fire.scheduled_time,
                    triggered,
                    Outcome::Replaced,
                    delivered,
                    now,
                );
                // Not dead-lettered: on its job's queue.
                self.record(ledger, &fire.job_id, &fire.queue, record)?;
                replaced.push(fire);
            }
        }
        if !self.unhold.is_empty() {
            woken.extend(unhold_idle(&mut **tx, Some(&self.unhold), Some(now)).await?);
        }
        Ok(replaced)
    }
}

/// The fires of `jobs` as their overlap policies see them: for each, how many run (released
/// and not acked, dead-lettered or dropped; held ones not counted) and whether one is held.
/// The running ones are locked (FOR SHARE) for the rest of `tx`, so that none of them ends
/// unseen while `tx` decides: an ack waits for it, and then finds what it held.
async fn running_of(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    jobs: &[&str],
) -> Result<std::collections::HashMap<String, Running>, StoreError> {
    let mut out = std::collections::HashMap::new();
    if jobs.is_empty() {
        return Ok(out);
    }
    sqlx::query(
        "SELECT fire_id FROM tickd_fires \
         WHERE job_id = ANY($1) AND NOT dead_lettered AND state <> 'held' \
         ORDER BY fire_id FOR SHARE",
    )
    .bind(jobs)
    .fetch_all(&mut **tx)
    .await
    .map_err(db)?;
    // Read again after the locks: what committed while they were waited for is seen.
    let rows: Vec<(String, i64, bool)> = sqlx::query_as(
        "SELECT job_id, count(*) FILTER (WHERE state <> 'held'), bool_or(state = 'held') \
         FROM tickd_fires WHERE job_id = ANY($1) AND NOT dead_lettered GROUP BY job_id",
    )
    .bind(jobs)
    .fetch_all(&mut **tx)
    .await
    .map_err(db)?;
    for (job, running, held) in rows {
        out.insert(
            job,
            Running {
                running: u32::try_from(running).unwrap_or(u32::MAX),
                held,
            },
        );
    }
    Ok(out)
}

/// Lets go the oldest held fire of each of `jobs` (all jobs when `None`) that has no fire
/// running any more: it becomes ready at `now` (the database's when `None`), and the replicas
/// serving its queue are woken when this commits. Returns those queues.
async fn unhold_idle<'e>(
    conn: impl sqlx::PgExecutor<'e>,
    jobs: Option<&[String]>,
    now: Option<Timestamp>,
) -> Result<Vec<String>, StoreError> {
    sqlx::query_scalar(
        "WITH let_go AS ( \
             UPDATE tickd_fires h SET state = 'ready', \
                 available_at = coalesce($2::timestamptz, now()) \
             WHERE h.fire_id IN ( \
                 SELECT DISTINCT ON (job_id) fire_id FROM tickd_fires \
                 WHERE state = 'held' AND ($1::text[] IS NULL OR job_id = ANY($1)) \
                 ORDER BY job_id, fire_time, fire_id) \
             AND h.state = 'held' \
             AND NOT EXISTS (SELECT 1 FROM tickd_fires r WHERE r.job_id = h.job_id \
                 AND r.state <> 'held' AND NOT r.dead_lettered) \
             RETURNING h.queue) \
         SELECT q FROM (SELECT DISTINCT queue AS q FROM let_go) woken, \
             LATERAL (SELECT pg_notify($3, q)) n",
    )
    .bind(jobs)
    .bind(now.map(time).transpose()?)
    .bind(FIRES_CHANNEL)
    .fetch_all(conn)
    .await
    .map_err(db)
}

/// What one [`PgStore::release_due`] did.
#[derive(Debug, Default)]
pub struct Released {
    /// Jobs it looked at (a full batch means more may be due).
    pub jobs: usize,
    /// Fires stored, in the order released.
    pub fires: Vec<FireRecord>,
    /// Jobs that passed occurrences over.
    pub skipped: Vec<Skipped>,
    /// Ledger records written, with their job's id and queue.
    pub recorded: Vec<(String, String, Occurrence)>,
    /// Fires withdrawn by a later release of their job (overlap REPLACE).
    pub replaced: Vec<FireRecord>,
    /// Queues where a held fire was let go.
    pub woken: Vec<String>,
}

/// Occurrences of one job passed over without a fire.
#[derive(Debug)]
pub struct Skipped {
    pub job_id: String,
    pub queue: String,
    /// Why `misfire` were missed: MISFIRE, or PAUSED for a job resumed.
    pub missed: SkipReason,
    /// By the misfire policy.
    pub misfire: u64,
    /// `misfire` stopped counting at its cap.
    pub misfire_at_least: bool,
    /// Because the queue held its most fires.
    pub backlog_full: u64,
    /// By the job's DST policy: local times that did not exist, and repeated ones.
    pub dst: (u64, u64),
    /// By the job's overlap policy.
    pub overlap: u64,
}

/// Counts for gauges (see [`PgStore::counts`]).
#[derive(Debug, Default)]
pub struct Counts {
    pub jobs: Vec<(JobState, u64)>,
    /// (queue, ready, leased).
    pub queues: Vec<(String, u64, u64)>,
}

/// The `next` (nullable) and `db_now` columns of a "when next" query.
fn next_and_now(row: &sqlx::postgres::PgRow) -> Result<(Option<Timestamp>, Timestamp), StoreError> {
    let next: Option<DateTime<Utc>> = row.try_get("next").map_err(db)?;
    Ok((
        next.map(|t| Timestamp::from_chrono(&t)),
        instant(row, "db_now")?,
    ))
}

/// A timestamp column.
fn instant(row: &sqlx::postgres::PgRow, col: &str) -> Result<Timestamp, StoreError> {
    let t: DateTime<Utc> = row.try_get(col).map_err(db)?;
    Ok(Timestamp::from_chrono(&t))
}

/// A job and its version from a row of [`JOB_COLUMNS`].
fn job_from_row(row: &sqlx::postgres::PgRow) -> Result<(Job, i64), StoreError> {
    let id: String = row.try_get("id").map_err(db)?;
    let spec: JobSpec = codec::decode("tickd_jobs", &id, row.try_get("spec").map_err(db)?)?;
    let at = |col: &str| -> Result<Option<Timestamp>, StoreError> {
        let t: Option<DateTime<Utc>> = row.try_get(col).map_err(db)?;
        Ok(t.map(|t| Timestamp::from_chrono(&t)))
    };
    let status = JobStatus {
        state: state_of(row.try_get("state").map_err(db)?)?,
        next_occurrence: at("next_occurrence")?,
        fire_count: u64::try_from(row.try_get::<i64, _>("fire_count").map_err(db)?).unwrap_or(0),
        create_time: instant(row, "create_time")?,
        last_fire_time: at("last_fire_time")?,
        finish_time: at("finish_time")?,
        trace: decode_trace(row, "tickd_jobs", &id)?.map(Box::new),
    };
    let version: i64 = row.try_get("version").map_err(db)?;
    let job = Job::restore(PackedSpec::new(&spec), status)
        .map_err(|e| StoreError::Io(format!("job {id}: {e}")))?;
    Ok((job, version))
}

/// Inserts `jobs` in one statement on `exec`, leaving alone any whose id exists; returns, per
/// job, whether it was stored (false also for a repeat of an earlier job's id).
async fn insert_rows<'e>(
    exec: impl sqlx::PgExecutor<'e>,
    jobs: &[&Job],
) -> Result<Vec<bool>, StoreError> {
    let mut cols = JobRows::default();
    let mut seen = std::collections::HashSet::new();
    let mut first = Vec::with_capacity(jobs.len());
    for job in jobs {
        first.push(seen.insert(job.spec.id()));
        cols.push(job)?;
    }
    let inserted: Vec<String> = sqlx::query_scalar(
        "INSERT INTO tickd_jobs (id, queue, spec, state, next_occurrence, next_due_at, \
             fire_count, create_time, last_fire_time, finish_time, labels, trace) \
         SELECT * FROM unnest($1::text[], $2::text[], $3::bytea[], $4::text[], \
             $5::timestamptz[], $6::timestamptz[], $7::bigint[], $8::timestamptz[], \
             $9::timestamptz[], $10::timestamptz[], $11::jsonb[], $12::bytea[]) \
         ON CONFLICT (id) DO NOTHING RETURNING id",
    )
    .bind(&cols.ids)
    .bind(&cols.queues)
    .bind(&cols.specs)
    .bind(&cols.states)
    .bind(&cols.next)
    .bind(&cols.due)
    .bind(&cols.counts)
    .bind(&cols.created)
    .bind(&cols.last)
    .bind(&cols.finished)
    .bind(&cols.labels)
    .bind(&cols.traces)
    .fetch_all(exec)
    .await
    .map_err(db)?;
    let inserted: std::collections::HashSet<String> = inserted.into_iter().collect();
    Ok(jobs
        .iter()
        .zip(first)
        .map(|(job, first)| first && inserted.contains(job.spec.id()))
        .collect())
}

/// Jobs to insert, column by column (for one `INSERT … SELECT FROM unnest`).
#[derive(Default)]
struct JobRows {
    ids: Vec<String>,
    queues: Vec<String>,
    specs: Vec<Vec<u8>>,
    states: Vec<&'static str>,
    next: Vec<Option<DateTime<Utc>>>,
    due: Vec<Option<DateTime<Utc>>>,
    counts: Vec<i64>,
    created: Vec<DateTime<Utc>>,
    last: Vec<Option<DateTime<Utc>>>,
    finished: Vec<Option<DateTime<Utc>>>,
    labels: Vec<String>,
    traces: Vec<Option<Vec<u8>>>,
}

impl JobRows {
    fn push(&mut self, job: &Job) -> Result<(), StoreError> {
        let s = &job.status;
        self.ids.push(job.spec.id().to_string());
        self.queues.push(job.spec.queue().to_string());
        self.specs.push(codec::encode(&job.spec)?);
        self.states.push(state_name(s.state));
        self.next.push(s.next_occurrence.map(time).transpose()?);
        self.due.push(job.next_due().map(time).transpose()?);
        self.counts
            .push(i64::try_from(s.fire_count).unwrap_or(i64::MAX));
        self.created.push(time(s.create_time)?);
        self.last.push(s.last_fire_time.map(time).transpose()?);
        self.finished.push(s.finish_time.map(time).transpose()?);
        self.labels.push(labels_json(job.spec.labels())?);
        self.traces
            .push(s.trace.as_deref().map(codec::encode).transpose()?);
        Ok(())
    }
}

/// Fires to insert, column by column (for one `INSERT … SELECT FROM unnest`).
#[derive(Default)]
struct NewFires {
    records: Vec<FireRecord>,
    ids: Vec<String>,
    job_ids: Vec<String>,
    queues: Vec<String>,
    scheduled: Vec<DateTime<Utc>>,
    fired: Vec<DateTime<Utc>>,
    ack_deadlines: Vec<i64>,
    max_attempts: Vec<i32>,
    dead_letter_queues: Vec<Option<String>>,
    traces: Vec<Option<Vec<u8>>>,
    states: Vec<&'static str>,
    buffer_one: Vec<bool>,
}

impl NewFires {
    fn push(&mut self, job: &Job, rec: FireRecord) -> Result<(), StoreError> {
        self.ids.push(rec.fire_id.to_string());
        self.job_ids.push(rec.job_id.to_string());
        self.queues.push(rec.queue.clone());
        self.scheduled.push(time(rec.scheduled_time)?);
        self.fired.push(time(rec.fire_time)?);
        self.ack_deadlines.push(job.spec.ack_deadline());
        self.max_attempts
            .push(i32::try_from(job.spec.max_attempts()).unwrap_or(i32::MAX));
        self.dead_letter_queues
            .push(job.spec.dead_letter_queue().map(str::to_string));
        self.traces
            .push(rec.trace.as_ref().map(codec::encode).transpose()?);
        self.states.push(if rec.held { "held" } else { "ready" });
        self.buffer_one
            .push(job.spec.overlap_policy() == OverlapPolicy::BufferOne);
        self.records.push(rec);
        Ok(())
    }

    /// Inserts them all, leaving alone any whose fire_id exists; returns those inserted.
    async fn insert(
        self,
        tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    ) -> Result<Vec<FireRecord>, StoreError> {
        if self.records.is_empty() {
            return Ok(Vec::new());
        }
        let inserted: Vec<String> = sqlx::query_scalar(
            "INSERT INTO tickd_fires (fire_id, job_id, queue, scheduled_time, fire_time, \
                 attempt, ack_deadline_us, max_attempts, dead_letter_queue, state, \
                 available_at, trace, buffer_one) \
             SELECT id, job, q, sched, fired, 1, deadline, attempts, dlq, st, fired, tr, b1 \
             FROM unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[], \
                 $5::timestamptz[], $6::bigint[], $7::int[], $8::text[], $9::bytea[], \
                 $10::text[], $11::bool[]) \
                 AS u(id, job, q, sched, fired, deadline, attempts, dlq, tr, st, b1) \
             ON CONFLICT (fire_id) DO NOTHING RETURNING fire_id",
        )
        .bind(&self.ids)
        .bind(&self.job_ids)
        .bind(&self.queues)
        .bind(&self.scheduled)
        .bind(&self.fired)
        .bind(&self.ack_deadlines)
        .bind(&self.max_attempts)
        .bind(&self.dead_letter_queues)
        .bind(&self.traces)
        .bind(&self.states)
        .bind(&self.buffer_one)
        .fetch_all(&mut **tx)
        .await
        .map_err(db)?;
        if inserted.len() == self.records.len() {
            return Ok(self.records);
        }
        let inserted: std::collections::HashSet<String> = inserted.into_iter().collect();
        Ok(self
            .records
            .into_iter()
            .filter(|r| inserted.contains(&*r.fire_id))
            .collect())
    }
}

/// Ledger records to write in one statement.
#[derive(Debug, Default)]
struct NewOccurrences {
    job_ids: Vec<String>,
    scheduled: Vec<DateTime<Utc>>,
    triggered: Vec<bool>,
    last: Vec<DateTime<Utc>>,
    counts: Vec<i64>,
    at_least: Vec<bool>,
    outcomes: Vec<i16>,
    attempts: Vec<i32>,
    times: Vec<DateTime<Utc>>,
}

impl NewOccurrences {
    fn push(&mut self, job_id: &str, r: &Occurrence) -> Result<(), StoreError> {
        self.job_ids.push(job_id.to_string());
        self.scheduled.push(time(r.scheduled)?);
        self.triggered.push(r.triggered);
        self.last.push(time(r.last)?);
        self.counts.push(i64::try_from(r.count).unwrap_or(i64::MAX));
        self.at_least.push(r.count_at_least);
        self.outcomes.push(i16::from(u8::from(r.outcome)));
        self.attempts
            .push(i32::try_from(r.attempts).unwrap_or(i32::MAX));
        self.times.push(time(r.time)?);
        Ok(())
    }

    /// Writes them all; a record under a key already there replaces it (a dead-lettered
    /// occurrence later dropped from the dead-letter queue).
    async fn insert(
        self,
        tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    ) -> Result<(), StoreError> {
        if self.job_ids.is_empty() {
            return Ok(());
        }
        sqlx::query(
            "INSERT INTO tickd_occurrences (job_id, scheduled_time, triggered, last_time, \
                 count, outcome, attempts, record_time, count_at_least) \
             SELECT * FROM unnest($1::text[], $2::timestamptz[], $3::bool[], \
                 $4::timestamptz[], $5::bigint[], $6::smallint[], $7::int[], \
                 $8::timestamptz[], $9::bool[]) \
             ON CONFLICT (job_id, scheduled_time, triggered) DO UPDATE SET \
                 last_time = excluded.last_time, count = excluded.count, \
                 outcome = excluded.outcome, attempts = excluded.attempts, \
                 record_time = excluded.record_time, \
                 count_at_least = excluded.count_at_least",
        )
        .bind(&self.job_ids)
        .bind(&self.scheduled)
        .bind(&self.triggered)
        .bind(&self.last)
        .bind(&self.counts)
        .bind(&self.outcomes)
        .bind(&self.attempts)
        .bind(&self.times)
        .bind(&self.at_least)
        .execute(&mut **tx)
        .await
        .map_err(db)?;
        Ok(())
    }
}

/// A ledger record from a `tickd_occurrences` row.
fn occurrence_from_row(row: &sqlx::postgres::PgRow) -> Result<Occurrence, StoreError> {
    let code: i16 = row.try_get("outcome").map_err(db)?;
    let outcome = u8::try_from(code)
        .map_err(|_| format!("unknown occurrence outcome {code}"))
        .and_then(Outcome::try_from)
        .map_err(|reason| StoreError::Corrupt {
            table: "tickd_occurrences",
            key: row.try_get::<String, _>("job_id").unwrap_or_default(),
            reason,
        })?;
    Ok(Occurrence {
        scheduled: instant(row, "scheduled_time")?,
        last: instant(row, "last_time")?,
        count: u64::try_from(row.try_get::<i64, _>("count").map_err(db)?).unwrap_or(0),
        triggered: row.try_get("triggered").map_err(db)?,
        outcome,
        attempts: u32::try_from(row.try_get::<i32, _>("attempts").map_err(db)?).unwrap_or(0),
        time: instant(row, "record_time")?,
        count_at_least: row.try_get("count_at_least").map_err(db)?,
    })
}

/// Fires outstanding on `queue`.
async fn queue_fires(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    queue: &str,
) -> Result<usize, StoreError> {
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM tickd_fires WHERE queue = $1")
        .bind(queue)
        .fetch_one(&mut **tx)
        .await
        .map_err(db)?;
    Ok(usize::try_from(n).unwrap_or(usize::MAX))
}

/// [`update_job`] for many jobs in one statement; fails (and the caller's transaction must
/// not commit) unless every row was still at its version.
async fn update_jobs(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    jobs: &[(Job, i64, Timestamp)],
) -> Result<(), StoreError> {
    if jobs.is_empty() {
        return Ok(());
    }
    let mut ids = Vec::with_capacity(jobs.len());
    let mut versions = Vec::with_capacity(jobs.len());
    let mut states = Vec::with_capacity(jobs.len());
    let mut next = Vec::with_capacity(jobs.len());
    let mut due = Vec::with_capacity(jobs.len());
    let mut counts = Vec::with_capacity(jobs.len());
    let mut last = Vec::with_capacity(jobs.len());
    let mut nows = Vec::with_capacity(jobs.len());
    for (job, version, now) in jobs {
        let s = &job.status;
        ids.push(job.spec.id().to_string());
        versions.push(*version);
        states.push(state_name(s.state));
        next.push(s.next_occurrence.map(time).transpose()?);
        due.push(job.next_due().map(time).transpose()?);
        counts.push(i64::try_from(s.fire_count).unwrap_or(i64::MAX));
        last.push(s.last_fire_time.map(time).transpose()?);
        nows.push(time(*now)?);
    }
    let moved = sqlx::query(
        "UPDATE tickd_jobs j SET state = u.state, next_occurrence = u.next, \
             next_due_at = u.due, fire_count = u.fires, last_fire_time = u.last, \
             finish_time = CASE WHEN u.state IN ('completed', 'cancelled') \
                 THEN coalesce(j.finish_time, u.now) END, \
             version = j.version + 1 \
         FROM unnest($1::text[], $2::bigint[], $3::text[], $4::timestamptz[], \
             $5::timestamptz[], $6::bigint[], $7::timestamptz[], $8::timestamptz[]) \
             AS u(id, version, state, next, due, fires, last, now) \
         WHERE j.id = u.id AND j.version = u.version",
    )
    .bind(&ids)
    .bind(&versions)
    .bind(&states)
    .bind(&next)
    .bind(&due)
    .bind(&counts)
    .bind(&last)
    .bind(&nows)
    .execute(&mut **tx)
    .await
    .map_err(db)?;
    if moved.rows_affected() != jobs.len() as u64 {
        return Err(StoreError::Io(
            "a job changed while it was being released; nothing of this release was made".into(),
        ));
    }
    Ok(())
}

/// Writes a job's status if its row is still at `version` (the row is locked by the caller, so
/// anything else means a bug or a foreign writer: the transaction must not commit). A job that
/// finished now gets `now` as its finish time.
async fn update_job(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    job: &Job,
    version: i64,
    now: Timestamp,
) -> Result<(), StoreError> {
    let s = &job.status;
    let moved = sqlx::query(
        "UPDATE tickd_jobs SET state = $3, next_occurrence = $4, next_due_at = $5, \
         fire_count = $6, last_fire_time = $7, \
         finish_time = CASE WHEN $3 IN ('completed', 'cancelled') \
             THEN coalesce(finish_time, $8) END, \
         version = version + 1 \
         WHERE id = $1 AND version = $2",
    )
    .bind(job.spec.id())
    .bind(version)
    .bind(state_name(s.state))
    .bind(s.next_occurrence.map(time).transpose()?)
    .bind(job.next_due().map(time).transpose()?)
    .bind(i64::try_from(s.fire_count).unwrap_or(i64::MAX))
    .bind(s.last_fire_time.map(time).transpose()?)
    .bind(time(now)?)
    .execute(&mut **tx)
    .await
    .map_err(db)?;
    if moved.rows_affected() != 1 {
        return Err(StoreError::Io(format!(
            "job {} changed while it was being updated; nothing of this change was made",
            job.spec.id()
        )));
    }
    Ok(())
}
