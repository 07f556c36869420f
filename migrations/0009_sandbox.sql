-- The kernel sandbox agents run in.
--
-- `channels.sandbox` overrides `[acp] sandbox` for the channel (NULL: the config's), and
-- `channels.allowed_ports` overrides `[acp] allowed_ports` (a JSON array of TCP ports the agent
-- may connect to; NULL: the config's). `warm_sessions.sandbox` is the sandbox in force for the
-- running agent (its one-line summary; the `session` event of each job has the details).
ALTER TABLE channels ADD COLUMN sandbox TEXT CHECK (sandbox IS NULL OR sandbox IN ('landlock', 'none'));
ALTER TABLE channels ADD COLUMN allowed_ports TEXT
    CHECK (allowed_ports IS NULL OR (json_valid(allowed_ports) AND json_type(allowed_ports) = 'array'));
ALTER TABLE warm_sessions ADD COLUMN sandbox TEXT;

DROP VIEW warm_pool;
CREATE VIEW warm_pool AS
SELECT
    c.name AS channel,
    CASE WHEN w.state = 'warm' AND EXISTS (
             SELECT 1 FROM jobs j WHERE j.channel_id = w.channel_id AND j.state = 'running')
         THEN 'busy' ELSE w.state END AS state,
    w.holder,
    w.pid,
    w.acp_session_id,
    w.sandbox,
    strftime('%Y-%m-%d %H:%M:%f', w.last_used_at / 1000.0, 'unixepoch') AS last_used,
    strftime('%Y-%m-%d %H:%M:%f', w.expires_at / 1000.0, 'unixepoch') AS expires,
    strftime('%Y-%m-%d %H:%M:%f', w.warm_at / 1000.0, 'unixepoch') AS warm_at,
    w.error
FROM warm_sessions w JOIN channels c ON c.id = w.channel_id;
