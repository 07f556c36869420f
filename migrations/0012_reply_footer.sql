-- Whether a channel's Matrix replies end with a footer line: the turn's duration, tokens and
-- cost (on by default).
ALTER TABLE channels ADD COLUMN reply_footer INTEGER NOT NULL DEFAULT 1 CHECK (reply_footer IN (0, 1));
