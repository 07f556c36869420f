-- Per-channel webhook credentials and GitHub prompt template.

-- SHA-256 (hex) of the channel's own bearer token; the token itself is shown once, at creation.
ALTER TABLE channels ADD COLUMN webhook_token_sha256 TEXT;
-- Secret for GitHub-style X-Hub-Signature-256 (HMAC-SHA256 of the raw body). Kept as given,
-- since verifying a signature needs it.
ALTER TABLE channels ADD COLUMN webhook_secret TEXT;
-- Prompt template for GitHub deliveries without a prompt: {event}, {action}, {repository},
-- {delivery}, {payload}.
ALTER TABLE channels ADD COLUMN webhook_template TEXT;
