-- tickd on PostgreSQL: jobs and their fires.
--
-- Times are timestamptz (microsecond precision, as tickd's own). Specs are MessagePack, as in
-- the embedded store; the columns beside them are what the database itself must query on.

CREATE TABLE tickd_jobs (
    id              text PRIMARY KEY,
    queue           text NOT NULL,
    -- The job's spec (trigger, payload, labels, options), MessagePack.
    spec            bytea NOT NULL,
    -- The job's labels again, for ListJobs' label filter (labels @> filter).
    labels          jsonb NOT NULL DEFAULT '{}',
    state           text NOT NULL
        CHECK (state IN ('scheduled', 'paused', 'completed', 'cancelled')),
    -- The next occurrence to fire (before jitter); null once the job will not fire again.
    next_occurrence timestamptz,
    -- When that occurrence is released (jitter included), while the job is scheduled.
    next_due_at     timestamptz,
    fire_count      bigint NOT NULL DEFAULT 0,
    create_time     timestamptz NOT NULL,
    last_fire_time  timestamptz,
    -- When the job became completed or cancelled; retention counts from here.
    finish_time     timestamptz,
    -- Trace context of the Schedule call, MessagePack.
    trace           bytea,
    -- Bumped by every change: the compare-and-set that keeps two replicas from releasing
    -- one occurrence twice.
    version         bigint NOT NULL DEFAULT 0
);

CREATE INDEX tickd_jobs_due ON tickd_jobs (next_due_at) WHERE next_due_at IS NOT NULL;
CREATE INDEX tickd_jobs_by_queue ON tickd_jobs (queue, id);
CREATE INDEX tickd_jobs_labels ON tickd_jobs USING gin (labels jsonb_path_ops);
CREATE INDEX tickd_jobs_finished ON tickd_jobs (finish_time) WHERE finish_time IS NOT NULL;

CREATE TABLE tickd_fires (
    -- '<job id>@<scheduled time>': one row per occurrence, ever.
    fire_id          text PRIMARY KEY,
    job_id           text NOT NULL,
    queue            text NOT NULL,
    scheduled_time   timestamptz NOT NULL,
    fire_time        timestamptz NOT NULL,
    -- The attempt of the next (or current) delivery.
    attempt          integer NOT NULL,
    -- Copied from the job at release: a lease lasts ack_deadline_us; after max_attempts
    -- failed attempts the fire moves to dead_letter_queue (once) or is dropped.
    ack_deadline_us  bigint NOT NULL,
    max_attempts     integer NOT NULL,
    dead_letter_queue text,
    state            text NOT NULL CHECK (state IN ('ready', 'leased')),
    -- Not delivered before this (nack delay, backoff).
    available_at     timestamptz NOT NULL,
    -- A new token for every lease: nack and extend name it, so a stale claim changes nothing.
    lease_token      uuid,
    leased_by        text,
    lease_expires_at timestamptz,
    dead_lettered    boolean NOT NULL DEFAULT false,
    trace            bytea
);

CREATE INDEX tickd_fires_ready ON tickd_fires (queue, available_at) WHERE state = 'ready';
CREATE INDEX tickd_fires_leased ON tickd_fires (lease_expires_at) WHERE state = 'leased';
CREATE INDEX tickd_fires_by_job ON tickd_fires (job_id);
