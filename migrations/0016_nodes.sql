-- The gorp processes (nodes) sharing this database, and leader leases for what runs on one
-- node at a time. On SQLite there is one node at a time; the tables are the same on
-- PostgreSQL, where several nodes share the database.

-- One row per node start. `id` is the instance id (host:pid:nonce) that its job and warm
-- leases carry. A node renews `lease_expires_at` every second; a node whose lease ran out is
-- gone (its rows stay until the cleaner removes them a day later). `stopped_at` is set by a
-- clean shutdown. `clock_offset_ms` is what the node adds to its own clock to read the
-- database's (0 on SQLite).
CREATE TABLE nodes (
    id               TEXT PRIMARY KEY,
    host             TEXT NOT NULL,
    pid              INTEGER NOT NULL,
    version          TEXT NOT NULL,
    started_at       INTEGER NOT NULL,
    last_seen_at     INTEGER NOT NULL,
    lease_expires_at INTEGER NOT NULL,
    stopped_at       INTEGER,
    clock_offset_ms  INTEGER NOT NULL DEFAULT 0,
    -- How many jobs it runs at once (`[worker] concurrency`).
    slots            INTEGER NOT NULL DEFAULT 0
);

-- Leases on what one node runs at a time: `matrix` (the Matrix bot: one device, one crypto
-- store).
CREATE TABLE leaders (
    name             TEXT PRIMARY KEY CHECK (name IN ('matrix')),
    holder           TEXT NOT NULL,
    acquired_at      INTEGER NOT NULL,
    lease_expires_at INTEGER NOT NULL
);

-- Readable node list: what each node holds now.
CREATE VIEW node_list AS
SELECT
    n.id AS node,
    n.host,
    n.pid,
    n.version,
    n.slots,
    CASE WHEN n.stopped_at IS NOT NULL THEN 'stopped'
         WHEN n.lease_expires_at < CAST(strftime('%s', 'now') AS INTEGER) * 1000 THEN 'gone'
         ELSE 'up' END AS state,
    strftime('%Y-%m-%d %H:%M:%f', n.started_at / 1000.0, 'unixepoch') AS started,
    strftime('%Y-%m-%d %H:%M:%f', n.last_seen_at / 1000.0, 'unixepoch') AS last_seen,
    (SELECT count(*) FROM warm_sessions w
     WHERE w.holder = n.id AND w.state IN ('starting', 'warm', 'busy')) AS channels,
    (SELECT count(*) FROM jobs j WHERE j.state = 'running' AND j.lease_owner = n.id) AS running,
    (SELECT group_concat(l.name, ',') FROM leaders l
     WHERE l.holder = n.id AND l.lease_expires_at >= n.last_seen_at) AS leads
FROM nodes n;
