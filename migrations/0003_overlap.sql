-- Overlap policies. A fire of a BUFFER_ONE job released while another fire of the job runs
-- waits in state 'held' (never claimed) until no fire of its job runs (released and not yet
-- acked, dead-lettered or dropped). tickd_occurrences.outcome 4 is REPLACED: a fire withdrawn
-- un-acked by a later release of an OVERLAP_POLICY_REPLACE job.

ALTER TABLE tickd_fires DROP CONSTRAINT tickd_fires_state_check;
ALTER TABLE tickd_fires ADD CONSTRAINT tickd_fires_state_check
    CHECK (state IN ('ready', 'leased', 'held'));

-- Set on every fire of a BUFFER_ONE job (at release, and by UpdateJob when the policy
-- changes): the end of such a fire looks for its job's held fire.
ALTER TABLE tickd_fires ADD COLUMN buffer_one boolean NOT NULL DEFAULT false;

CREATE INDEX tickd_fires_held ON tickd_fires (job_id) WHERE state = 'held';
