-- Dashboard sessions: one row per browser login with an API token.
--
-- The cookie holds a random secret; only its SHA-256 is stored, so reading this table gives
-- no session away. A session is only good while the token it was opened with is still one of
-- `[webhook] tokens` (its SHA-256 is kept to check), until it expires, and until its logout
-- deletes it. Every form of the dashboard carries the session's CSRF token.
CREATE TABLE dashboard_sessions (
    id_sha256    TEXT PRIMARY KEY,
    token_sha256 TEXT NOT NULL,
    csrf         TEXT NOT NULL,
    created_at   INTEGER NOT NULL,
    expires_at   INTEGER NOT NULL
);
CREATE INDEX dashboard_sessions_expiry ON dashboard_sessions (expires_at);
