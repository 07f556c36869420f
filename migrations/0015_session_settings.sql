-- What a channel's agent sessions are opened and run with.
-- agent_options: the session config options (ACP `session/set_config_option`) set for the
--   channel, a JSON object of option id (or category) → value, applied before every prompt.
-- mcp_servers: MCP servers given to every session the channel's agent opens (JSON array).
-- additional_directories: workspace roots besides the channel's workspace (JSON array of
--   absolute paths).
ALTER TABLE channels ADD COLUMN agent_options TEXT NOT NULL DEFAULT '{}'
    CHECK (json_valid(agent_options) AND json_type(agent_options) = 'object');
ALTER TABLE channels ADD COLUMN mcp_servers TEXT NOT NULL DEFAULT '[]'
    CHECK (json_valid(mcp_servers) AND json_type(mcp_servers) = 'array');
ALTER TABLE channels ADD COLUMN additional_directories TEXT NOT NULL DEFAULT '[]'
    CHECK (json_valid(additional_directories) AND json_type(additional_directories) = 'array');

-- A job's own options, over its channel's for its turn (NULL: none).
ALTER TABLE jobs ADD COLUMN agent_options TEXT
    CHECK (agent_options IS NULL OR (json_valid(agent_options) AND json_type(agent_options) = 'object'));

-- What the running agent said of itself when its session opened: name, version, capabilities
-- and the session's config options (JSON), for `gorp channels options`, `!options` and doctor.
ALTER TABLE warm_sessions ADD COLUMN agent_info TEXT;
