-- The gorp nodes sharing this database, leader leases, and the notifications that wake other
-- nodes (the same version as SQLite's 0016_nodes.sql; the notifications are PostgreSQL's own).

-- One row per node start; `id` is the instance id its job and warm leases carry. A node renews
-- `lease_expires_at` every second; a node whose lease ran out is gone. `clock_offset_ms` is
-- what the node adds to its own clock to read the database's.
CREATE TABLE nodes (
    id               TEXT COLLATE "C" PRIMARY KEY,
    host             TEXT NOT NULL,
    pid              BIGINT NOT NULL,
    version          TEXT NOT NULL,
    started_at       BIGINT NOT NULL,
    last_seen_at     BIGINT NOT NULL,
    lease_expires_at BIGINT NOT NULL,
    stopped_at       BIGINT,
    clock_offset_ms  BIGINT NOT NULL DEFAULT 0,
    -- How many jobs it runs at once (`[worker] concurrency`).
    slots            BIGINT NOT NULL DEFAULT 0
);

-- Leases on what one node runs at a time: `matrix` (the Matrix bot: one device, one crypto
-- store).
CREATE TABLE leaders (
    name             TEXT COLLATE "C" PRIMARY KEY CHECK (name IN ('matrix')),
    holder           TEXT NOT NULL,
    acquired_at      BIGINT NOT NULL,
    lease_expires_at BIGINT NOT NULL
);

CREATE VIEW node_list AS
SELECT
    n.id AS node,
    n.host,
    n.pid,
    n.version,
    n.slots,
    CASE WHEN n.stopped_at IS NOT NULL THEN 'stopped'
         WHEN n.lease_expires_at < now_ms() THEN 'gone'
         ELSE 'up' END AS state,
    utc_text(n.started_at) AS started,
    utc_text(n.last_seen_at) AS last_seen,
    (SELECT count(*) FROM warm_sessions w
     WHERE w.holder = n.id AND w.state IN ('starting', 'warm', 'busy')) AS channels,
    (SELECT count(*) FROM jobs j WHERE j.state = 'running' AND j.lease_owner = n.id) AS running,
    (SELECT string_agg(l.name, ',') FROM leaders l
     WHERE l.holder = n.id AND l.lease_expires_at >= n.last_seen_at) AS leads
FROM nodes n;

-- ----- notifications ---------------------------------------------------------------------------
-- Every node LISTENs on these channels (sqlx's PgListener). NOTIFY is sent at commit and
-- folded per transaction, so a batch of rows costs one notification.
-- gorp_jobs:   a job may have become claimable by another node: inserted, back to queued
--              (retry, release, rescue), a channel lease let go of, a channel's settings or
--              budget changed. A finished job wakes no other node: its channel's lease stays
--              with the node that ran it, which claims the next job itself.
-- gorp_cancel: a running job's cancel was requested; the payload is the node running it.
-- gorp_events: rows readers wait for (events, approvals, Matrix replies, job states).

CREATE FUNCTION gorp_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify(TG_ARGV[0], '');
    RETURN NULL;
END
$$;

CREATE FUNCTION gorp_notify_cancel() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('gorp_cancel', coalesce(NEW.lease_owner, ''));
    RETURN NULL;
END
$$;

CREATE TRIGGER jobs_inserted_notify AFTER INSERT ON jobs
    FOR EACH STATEMENT EXECUTE FUNCTION gorp_notify('gorp_jobs');
CREATE TRIGGER jobs_claimable_notify AFTER UPDATE OF state, run_at ON jobs
    FOR EACH ROW WHEN (NEW.state = 'queued')
    EXECUTE FUNCTION gorp_notify('gorp_jobs');
CREATE TRIGGER channels_changed_notify AFTER UPDATE ON channels
    FOR EACH STATEMENT EXECUTE FUNCTION gorp_notify('gorp_jobs');
CREATE TRIGGER warm_lease_freed_notify AFTER UPDATE OF lease_expires_at ON warm_sessions
    FOR EACH ROW WHEN (OLD.lease_expires_at IS NOT NULL
                       AND (NEW.lease_expires_at IS NULL
                            OR NEW.lease_expires_at < OLD.lease_expires_at))
    EXECUTE FUNCTION gorp_notify('gorp_jobs');

CREATE TRIGGER jobs_cancel_notify AFTER UPDATE OF cancel_requested ON jobs
    FOR EACH ROW WHEN (NEW.cancel_requested AND NOT OLD.cancel_requested
                       AND NEW.state = 'running')
    EXECUTE FUNCTION gorp_notify_cancel();

CREATE TRIGGER job_events_notify AFTER INSERT ON job_events
    FOR EACH STATEMENT EXECUTE FUNCTION gorp_notify('gorp_events');
CREATE TRIGGER jobs_state_notify AFTER UPDATE OF state ON jobs
    FOR EACH STATEMENT EXECUTE FUNCTION gorp_notify('gorp_events');
CREATE TRIGGER approvals_notify AFTER INSERT OR UPDATE ON approvals
    FOR EACH STATEMENT EXECUTE FUNCTION gorp_notify('gorp_events');
CREATE TRIGGER matrix_replies_notify AFTER INSERT OR UPDATE ON matrix_replies
    FOR EACH STATEMENT EXECUTE FUNCTION gorp_notify('gorp_events');
