-- Idempotency keys are scoped per channel, rescues after gorp's own death are counted apart
-- from failed attempts, and a channel's queue keeps its jobs in their original order.

-- A key names at most one job per channel and source: one channel never sees or blocks
-- another's jobs (two channels may receive the same GitHub delivery).
DROP INDEX jobs_idempotency;
CREATE UNIQUE INDEX jobs_idempotency ON jobs (channel_id, source, idempotency_key)
    WHERE idempotency_key IS NOT NULL;

-- Runs cut short because the gorp running them died (its lease expired with no outcome from
-- the agent). They do not spend the job's attempts (`attempt - interruptions` does); they are
-- bounded by `[worker] max_rescues` instead.
ALTER TABLE jobs ADD COLUMN interruptions INTEGER NOT NULL DEFAULT 0;

-- A channel runs its jobs by priority, then in the order they were queued; a rescued or
-- retried job keeps its place (`run_at` only says when it may run).
DROP INDEX jobs_queued;
CREATE INDEX jobs_queued ON jobs (channel_id, priority DESC, created_at, id, run_at)
    WHERE state = 'queued';
