-- no-transaction
-- Questions from the agent (ACP elicitation) are approvals of a second kind.
--
-- `approvals` is rebuilt (SQLite cannot change a CHECK constraint in place; the procedure of
-- 0007) with:
-- - `request`: `permission` (a `session/request_permission`) or `question` (an
--   `elicitation/create` form: `title` holds the agent's message, `kind` the mode, `input`
--   `{"requestedSchema": …}`, `options` is empty);
-- - `answer`: the content a question was answered with (JSON object);
-- - the states `answered` and `declined`, which only questions take.
PRAGMA foreign_keys = OFF;
PRAGMA legacy_alter_table = ON;
BEGIN IMMEDIATE;

DROP VIEW approval_log;

CREATE TABLE approvals_new (
    id           TEXT PRIMARY KEY,
    job_id       TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    attempt      INTEGER NOT NULL,
    channel_id   INTEGER NOT NULL REFERENCES channels (id) ON DELETE CASCADE,
    request      TEXT NOT NULL DEFAULT 'permission' CHECK (request IN ('permission', 'question')),
    tool_call_id TEXT,
    title        TEXT,
    kind         TEXT,
    input        TEXT NOT NULL CHECK (json_valid(input)),
    options      TEXT NOT NULL CHECK (json_valid(options)),
    state        TEXT NOT NULL DEFAULT 'pending'
                 CHECK (state IN ('pending', 'allowed', 'denied', 'answered', 'declined',
                                  'expired', 'cancelled')),
    option_id    TEXT,
    answer       TEXT CHECK (answer IS NULL OR json_valid(answer)),
    decided_by   TEXT,
    decided_via  TEXT CHECK (decided_via IN ('matrix', 'http', 'cli', 'rule', 'timeout', 'restart', 'job')),
    rule_id      INTEGER REFERENCES permission_rules (id) ON DELETE SET NULL,
    created_at   INTEGER NOT NULL,
    expires_at   INTEGER NOT NULL,
    decided_at   INTEGER,
    CHECK ((state = 'pending') = (decided_at IS NULL)),
    CHECK (request = 'question' OR state NOT IN ('answered', 'declined')),
    CHECK (request = 'permission' OR state NOT IN ('allowed', 'denied'))
);
INSERT INTO approvals_new (id, job_id, attempt, channel_id, tool_call_id, title, kind, input,
                           options, state, option_id, decided_by, decided_via, rule_id,
                           created_at, expires_at, decided_at)
SELECT id, job_id, attempt, channel_id, tool_call_id, title, kind, input, options, state,
       option_id, decided_by, decided_via, rule_id, created_at, expires_at, decided_at
FROM approvals;
DROP TABLE approvals;
ALTER TABLE approvals_new RENAME TO approvals;
CREATE INDEX approvals_pending ON approvals (expires_at) WHERE state = 'pending';
CREATE INDEX approvals_job ON approvals (job_id, attempt);
CREATE INDEX approvals_channel ON approvals (channel_id, created_at);

CREATE VIEW approval_log AS
SELECT a.id, c.name AS channel, a.job_id, a.attempt, a.request, a.state, a.kind, a.title,
       a.option_id, a.answer, a.decided_by, a.decided_via,
       strftime('%Y-%m-%d %H:%M:%f', a.created_at / 1000.0, 'unixepoch') AS created,
       strftime('%Y-%m-%d %H:%M:%f', a.decided_at / 1000.0, 'unixepoch') AS decided,
       round((a.decided_at - a.created_at) / 1000.0, 3) AS wait_secs
FROM approvals a JOIN channels c ON c.id = a.channel_id;

PRAGMA foreign_key_check;
COMMIT;
PRAGMA legacy_alter_table = OFF;
PRAGMA foreign_keys = ON;
