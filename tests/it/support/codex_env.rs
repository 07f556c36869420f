//! Running the real Codex ACP agent (`codex-acp`) offline: where it is installed, the
//! `CODEX_HOME` whose `config.toml` points it at the fake OpenAI Responses API, and the
//! environment that keeps everything else on 127.0.0.1.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// The model Codex is told to use: one of the models Codex knows (an unknown slug makes it
/// print a "model metadata not found" warning into the agent's message stream).
pub const MODEL: &str = "gpt-5.4-mini";

/// The variable Codex reads the fake provider's API key from.
pub const API_KEY_VAR: &str = "FAKE_OPENAI_API_KEY";

/// `$CODEX_AGENT_BIN`, else the launcher `scripts/setup-codex-agent` writes,
/// `$CODEX_AGENT_DIR/codex-acp` (default `<crate>/target/codex-acp/codex-acp`); fails with how
/// to install it when missing.
pub fn agent_binary() -> PathBuf {
    let bin = match std::env::var_os("CODEX_AGENT_BIN") {
        Some(bin) => PathBuf::from(bin),
        None => std::env::var_os("CODEX_AGENT_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/codex-acp"))
            .join("codex-acp"),
    };
    assert!(
        bin.exists(),
        "the Codex ACP agent is not installed at {}: run scripts/setup-codex-agent \
         (it installs @zed-industries/codex-acp, whose native binary needs no Node to run, \
         into target/codex-acp)",
        bin.display()
    );
    bin
}

/// Writes `<home>/.codex/config.toml`: a model provider `fake` at `api_url` speaking the
/// Responses API, no retries (a failed request fails the turn at once), and sessions that start
/// in Codex's `auto` preset (approval on request, the workspace writable: commands run without
/// asking), so that gorp has to put them in `read-only` itself. Returns the directory, for
/// `CODEX_HOME`.
pub fn write_codex_home(home: &Path, api_url: &str) -> PathBuf {
    let dir = home.join(".codex");
    std::fs::create_dir_all(&dir).unwrap();
    let config = format!(
        r#"model = "{MODEL}"
model_provider = "fake"
approval_policy = "on-request"
sandbox_mode = "workspace-write"
web_search = "disabled"
check_for_update_on_startup = false

[model_providers.fake]
name = "Fake OpenAI"
base_url = "{api_url}"
env_key = "{API_KEY_VAR}"
wire_api = "responses"
request_max_retries = 0
stream_max_retries = 0

[analytics]
enabled = false
"#
    );
    std::fs::write(dir.join("config.toml"), config).unwrap();
    dir
}

/// The environment that keeps Codex offline: its home is `home` (with `CODEX_HOME` at
/// `home/.codex`, see [`write_codex_home`]), its API key is a dummy, and any other host goes to
/// the fake at `base` as a proxy (which records and refuses it).
pub fn codex_env(base: &str, home: &Path) -> Vec<(String, String)> {
    let home = home.display().to_string();
    let codex_home = format!("{home}/.codex");
    let env = [
        ("HOME", home.as_str()),
        ("CODEX_HOME", codex_home.as_str()),
        (API_KEY_VAR, "dummy-key"),
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
