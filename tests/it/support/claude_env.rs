//! Running the real Claude Code ACP agent offline: where it is installed, the environment that
//! points it at the fake Anthropic API, and the cache that stops its one GitHub fetch.
//! Shared by the integration tests and the ACP benchmark.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// `$CLAUDE_AGENT_BIN`, else the launcher `scripts/setup-claude-agent` writes,
/// `$CLAUDE_AGENT_DIR/claude-agent-acp` (default `<crate>/target/claude-agent-acp/claude-agent-acp`,
/// which runs the agent on a Node it accepts); fails with how to install it when missing.
pub fn agent_binary() -> PathBuf {
    let bin = match std::env::var_os("CLAUDE_AGENT_BIN") {
        Some(bin) => PathBuf::from(bin),
        None => std::env::var_os("CLAUDE_AGENT_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                Path::new(env!("CARGO_MANIFEST_DIR")).join("target/claude-agent-acp")
            })
            .join("claude-agent-acp"),
    };
    assert!(
        bin.exists(),
        "the Claude Code ACP agent is not installed at {}: run scripts/setup-claude-agent \
         (it installs @agentclientprotocol/claude-agent-acp and, when the system's Node is older \
         than 22, Node 22 from npm into target/claude-agent-acp)",
        bin.display()
    );
    bin
}

/// The environment that keeps Claude Code offline: its API is the fake at `base`, any other
/// host goes to the fake too (which records and refuses it), and its home is `home`.
pub fn claude_env(base: &str, home: &Path) -> Vec<(String, String)> {
    let home = home.display().to_string();
    let claude_dir = format!("{home}/.claude");
    let env = [
        ("ANTHROPIC_BASE_URL", base),
        ("ANTHROPIC_API_KEY", "dummy-key"),
        ("IS_SANDBOX", "1"),
        ("HOME", home.as_str()),
        ("CLAUDE_CONFIG_DIR", claude_dir.as_str()),
        ("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1"),
        ("DISABLE_TELEMETRY", "1"),
        ("DISABLE_AUTOUPDATER", "1"),
        ("DISABLE_ERROR_REPORTING", "1"),
        // The current agent asks the model for a predicted next prompt after every turn (a
        // model request with tools, which would take the next scripted reply).
        ("CLAUDE_CODE_ENABLE_PROMPT_SUGGESTION", "false"),
        ("HTTPS_PROXY", base),
        ("HTTP_PROXY", base),
        ("https_proxy", base),
        ("http_proxy", base),
        ("NO_PROXY", "127.0.0.1,localhost"),
        ("no_proxy", "127.0.0.1,localhost"),
    ];
    env.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Claude Code fetches a plugin blocklist from GitHub unless its cache under `home` is less
/// than an hour old, even with non-essential traffic disabled.
pub fn seed_plugin_blocklist(home: &Path) {
    let dir = home.join(".claude/plugins");
    std::fs::create_dir_all(&dir).unwrap();
    let now = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    let cache = serde_json::json!({ "fetchedAt": now, "plugins": [] });
    std::fs::write(dir.join("blocklist.json"), cache.to_string()).unwrap();
}
