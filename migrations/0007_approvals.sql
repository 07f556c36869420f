-- no-transaction
-- Approvals: the permission policy `ask`, approval rows and standing rules.
--
-- SQLite cannot change a CHECK constraint in place, so `channels` is rebuilt with `ask` allowed
-- (the procedure of SQLite's "ALTER TABLE" page: foreign keys off, copy, drop, rename, check).
-- It runs outside sqlx's transaction because foreign keys cannot be switched off inside one;
-- the rebuild itself is one transaction.
PRAGMA foreign_keys = OFF;
PRAGMA legacy_alter_table = ON;
BEGIN IMMEDIATE;

CREATE TABLE channels_new (
    id                INTEGER PRIMARY KEY,
    name              TEXT NOT NULL UNIQUE
                      CHECK (length(name) BETWEEN 1 AND 64 AND name NOT GLOB '*[^a-z0-9_-]*'
                             AND substr(name, 1, 1) NOT IN ('_', '-')),
    -- Stable id used in the channel's webhook URL; never the ACP session id.
    webhook_id        TEXT NOT NULL UNIQUE,
    -- Per-channel overrides of [acp] agent_binary / agent_args (JSON array of strings).
    agent_binary      TEXT,
    agent_args        TEXT CHECK (agent_args IS NULL OR json_valid(agent_args)),
    permission_policy TEXT NOT NULL DEFAULT 'allow'
                      CHECK (permission_policy IN ('allow', 'deny', 'ask')),
    matrix_room_id    TEXT UNIQUE,
    -- The ACP session the conversation continues in (set by the executor).
    acp_session_id    TEXT,
    created_at        INTEGER NOT NULL,
    webhook_token_sha256 TEXT,
    webhook_secret    TEXT,
    webhook_template  TEXT
);
INSERT INTO channels_new (id, name, webhook_id, agent_binary, agent_args, permission_policy,
                          matrix_room_id, acp_session_id, created_at, webhook_token_sha256,
                          webhook_secret, webhook_template)
SELECT id, name, webhook_id, agent_binary, agent_args, permission_policy, matrix_room_id,
       acp_session_id, created_at, webhook_token_sha256, webhook_secret, webhook_template
FROM channels;
DROP TABLE channels;
ALTER TABLE channels_new RENAME TO channels;

-- One row per permission request the agent sent under `ask`, committed before it is shown.
-- A decision is a guarded transition out of `pending` (`WHERE state = 'pending'`); a second
-- decision changes nothing.
CREATE TABLE approvals (
    id           TEXT PRIMARY KEY,
    job_id       TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    attempt      INTEGER NOT NULL,
    channel_id   INTEGER NOT NULL REFERENCES channels (id) ON DELETE CASCADE,
    -- The request as the agent sent it: its tool call id, title and kind, and the tool's input
    -- (`{"rawInput": …, "content": […], "locations": […]}`: command, path, diff).
    tool_call_id TEXT,
    title        TEXT,
    kind         TEXT,
    input        TEXT NOT NULL CHECK (json_valid(input)),
    -- The options the agent offered: `[{"id", "name", "kind"}]`.
    options      TEXT NOT NULL CHECK (json_valid(options)),
    state        TEXT NOT NULL DEFAULT 'pending'
                 CHECK (state IN ('pending', 'allowed', 'denied', 'expired', 'cancelled')),
    -- The option the agent was answered with (none when expired or cancelled).
    option_id    TEXT,
    decided_by   TEXT,
    decided_via  TEXT CHECK (decided_via IN ('matrix', 'http', 'cli', 'rule', 'timeout', 'restart', 'job')),
    rule_id      INTEGER REFERENCES permission_rules (id) ON DELETE SET NULL,
    created_at   INTEGER NOT NULL,
    expires_at   INTEGER NOT NULL,
    decided_at   INTEGER,
    CHECK ((state = 'pending') = (decided_at IS NULL))
);
CREATE INDEX approvals_pending ON approvals (expires_at) WHERE state = 'pending';
CREATE INDEX approvals_job ON approvals (job_id, attempt);
CREATE INDEX approvals_channel ON approvals (channel_id, created_at);

-- "Allow always": later requests of the same tool kind whose stable part matches are allowed
-- by the rule. `matcher` is `program:<first word of the command>`, `path:<directory prefix>`
-- or `title:<exact title>`.
CREATE TABLE permission_rules (
    id          INTEGER PRIMARY KEY,
    channel_id  INTEGER NOT NULL REFERENCES channels (id) ON DELETE CASCADE,
    tool_kind   TEXT NOT NULL,
    matcher     TEXT NOT NULL CHECK (length(matcher) > 0),
    created_by  TEXT NOT NULL,
    created_via TEXT NOT NULL,
    -- The approval whose "allow always" made the rule.
    approval_id TEXT,
    created_at  INTEGER NOT NULL,
    UNIQUE (channel_id, tool_kind, matcher)
);

-- Where an approval was posted in Matrix, and whether the post shows its decision yet.
CREATE TABLE matrix_approvals (
    approval_id TEXT PRIMARY KEY REFERENCES approvals (id) ON DELETE CASCADE,
    room_id     TEXT NOT NULL,
    event_id    TEXT UNIQUE,
    posted_at   INTEGER,
    -- The decided state the message was last edited to show.
    shown_state TEXT,
    attempts    INTEGER NOT NULL DEFAULT 0,
    last_error  TEXT
);
-- Posted messages whose decision is not shown yet (a decided approval never changes again).
CREATE INDEX matrix_approvals_open ON matrix_approvals (approval_id) WHERE shown_state IS NULL;

CREATE VIEW approval_log AS
SELECT a.id, c.name AS channel, a.job_id, a.attempt, a.state, a.kind, a.title,
       a.option_id, a.decided_by, a.decided_via,
       strftime('%Y-%m-%d %H:%M:%f', a.created_at / 1000.0, 'unixepoch') AS created,
       strftime('%Y-%m-%d %H:%M:%f', a.decided_at / 1000.0, 'unixepoch') AS decided,
       round((a.decided_at - a.created_at) / 1000.0, 3) AS wait_secs
FROM approvals a JOIN channels c ON c.id = a.channel_id;

PRAGMA foreign_key_check;
COMMIT;
PRAGMA legacy_alter_table = OFF;
PRAGMA foreign_keys = ON;
