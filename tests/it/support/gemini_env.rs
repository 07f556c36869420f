//! Running the real Gemini CLI in ACP mode offline: where it is installed, the settings file
//! that turns off its usage statistics, telemetry, update check and model router, and the
//! environment that points it at the fake Gemini API.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// The model the CLI is told to use. Its default, `auto`, first asks a classifier model (a
/// side request) which model should answer.
pub const MODEL: &str = "gemini-2.5-flash";

/// `$GEMINI_AGENT_BIN`, else the launcher `scripts/setup-gemini-agent` writes,
/// `$GEMINI_AGENT_DIR/gemini` (default `<crate>/target/gemini-cli/gemini`); fails with how to
/// install it when missing.
pub fn agent_binary() -> PathBuf {
    let bin = match std::env::var_os("GEMINI_AGENT_BIN") {
        Some(bin) => PathBuf::from(bin),
        None => std::env::var_os("GEMINI_AGENT_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/gemini-cli"))
            .join("gemini"),
    };
    assert!(
        bin.exists(),
        "Gemini CLI is not installed at {}: run scripts/setup-gemini-agent \
         (it installs @google/gemini-cli and, when the system's Node is older than 20, \
         Node 22 from npm into target/gemini-cli)",
        bin.display()
    );
    bin
}

/// The arguments that start the CLI as an ACP agent.
pub fn agent_args() -> Vec<String> {
    vec!["--acp".into()]
}

/// Writes `<home>/.gemini/settings.json`: no usage statistics (else it posts them to
/// `play.googleapis.com`), no telemetry, no update check, a fixed model, and sessions that start
/// in the CLI's `autoEdit` mode (edits run without asking), so that gorp has to put them in
/// `default` itself.
pub fn write_settings(home: &Path) {
    let dir = home.join(".gemini");
    std::fs::create_dir_all(&dir).unwrap();
    let settings = serde_json::json!({
        "privacy": { "usageStatisticsEnabled": false },
        "telemetry": { "enabled": false },
        "general": {
            "enableAutoUpdate": false,
            "enableAutoUpdateNotification": false,
            "defaultApprovalMode": "auto_edit",
        },
        "model": { "name": MODEL },
    });
    std::fs::write(dir.join("settings.json"), settings.to_string()).unwrap();
}

/// The environment that keeps the CLI offline: its API is the fake at `base` (with a base URL
/// set it authenticates as an "AI API gateway" with the key it is given), any other host goes
/// to the fake too (which records and refuses it), its home is `home`, the workspace is
/// trusted (in an untrusted folder the CLI ignores `defaultApprovalMode`), and it does not
/// relaunch itself in a child Node process with a larger heap.
pub fn gemini_env(base: &str, home: &Path) -> Vec<(String, String)> {
    let home = home.display().to_string();
    let env = [
        ("GOOGLE_GEMINI_BASE_URL", base),
        ("GEMINI_API_KEY", "dummy-key"),
        ("HOME", home.as_str()),
        ("GEMINI_CLI_NO_RELAUNCH", "true"),
        ("GEMINI_CLI_TRUST_WORKSPACE", "true"),
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
