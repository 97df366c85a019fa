-- The ledger: what became of each occurrence of a job (ListOccurrences). One row per
-- occurrence whose fate is sealed, or per run of occurrences skipped at once for one reason.
-- Rows go with their job (deleted by tickd in the job's deleting transaction: a foreign key
-- would make every ack lock its job row), and after --ledger-retention or beyond
-- --ledger-max-per-job.

CREATE TABLE tickd_occurrences (
    job_id         text NOT NULL,
    -- The occurrence (before jitter); the first of a run.
    scheduled_time timestamptz NOT NULL,
    -- Released by TriggerJob rather than by the schedule.
    triggered      boolean NOT NULL,
    -- The last occurrence of a run, and how many it holds (1 unless a skipped run); a
    -- count that stopped at its cap (a cron run is counted by walking it) is a lower bound.
    last_time      timestamptz NOT NULL,
    count          bigint NOT NULL,
    count_at_least boolean NOT NULL DEFAULT false,
    -- 1 delivered, 2 dead-lettered, 3 dropped, 16 + reason skipped (tickd's Outcome codes).
    outcome        smallint NOT NULL,
    attempts       integer NOT NULL,
    -- When its fate was sealed.
    record_time    timestamptz NOT NULL,
    PRIMARY KEY (job_id, scheduled_time, triggered)
);

CREATE INDEX tickd_occurrences_sealed ON tickd_occurrences (record_time);
