//! Configuration loading: the seed plan's defaults test, as written, and the error paths.

use std::io::Write;

use gorp::config::{Config, ConfigError};
use serial_test::serial;

/// Removes every variable `Config::load()` reads.
fn clear_config_env_vars() {
    for (k, _) in std::env::vars() {
        if k.starts_with("GORP_") {
            std::env::remove_var(k);
        }
    }
}

#[test]
#[serial]
fn test_config_acp_warm_session_defaults() {
    clear_config_env_vars();

    let temp_dir = std::env::temp_dir().join("gorp-config-warm-test");
    let _ = std::fs::remove_dir_all(&temp_dir);
    std::fs::create_dir_all(&temp_dir).unwrap();
    let config_path = temp_dir.join("config.toml");

    let config_content = r#"
[matrix]
home_server = "https://test.matrix.org"
user_id = "@bot:test.matrix.org"
password = "secret123"
allowed_users = ["@user1:test.matrix.org"]

[acp]
agent_binary = "claude"

[webhook]
port = 8080

[workspace]
path = "./test-workspace"
"#;

    let mut file = std::fs::File::create(&config_path).unwrap();
    file.write_all(config_content.as_bytes()).unwrap();
    std::env::set_var("GORP_CONFIG_PATH", config_path.to_str().unwrap());

    let config = gorp::config::Config::load().unwrap();

    // Defaults: 1 hour keep-alive, 5 min pre-warm
    assert_eq!(config.acp.keep_alive_secs, 3600);
    assert_eq!(config.acp.pre_warm_secs, 300);

    clear_config_env_vars();
    let _ = std::fs::remove_dir_all(&temp_dir);
}

#[test]
#[serial]
fn load_reads_gorp_config_path_and_env_overrides() {
    clear_config_env_vars();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(
        &path,
        "[worker]\nconcurrency = 2\n[database]\npath = \"/tmp/a.db\"\n",
    )
    .unwrap();
    std::env::set_var("GORP_CONFIG_PATH", &path);
    std::env::set_var("GORP_DATABASE_PATH", "/tmp/b.db");
    let c = Config::load().unwrap();
    clear_config_env_vars();
    assert_eq!(c.worker.concurrency, 2);
    assert_eq!(
        c.database.path,
        std::path::PathBuf::from("/tmp/b.db"),
        "env wins over the file"
    );
    assert_eq!(c.source, path.display().to_string());
}

#[test]
#[serial]
fn gorp_config_path_naming_a_missing_file_is_an_error() {
    clear_config_env_vars();
    std::env::set_var("GORP_CONFIG_PATH", "/nonexistent/gorp.toml");
    let err = Config::load().unwrap_err();
    clear_config_env_vars();
    assert!(matches!(err, ConfigError::Read { .. }));
    assert!(err.to_string().contains("/nonexistent/gorp.toml"), "{err}");
}

fn load_text(text: &str) -> Result<Config, ConfigError> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, text).unwrap();
    Config::load_with(Some(&path), &[])
}

fn assert_err(text: &str, needles: &[&str]) {
    let err = load_text(text)
        .expect_err("config must be refused")
        .to_string();
    assert!(err.contains("bad.toml"), "error names the file: {err}");
    for n in needles {
        assert!(err.contains(n), "error {err:?} should mention {n:?}");
    }
}

#[test]
fn unknown_key_names_file_and_key() {
    assert_err(
        "[worker]\nconcurency = 3\n",
        &["worker", "concurency", "concurrency"],
    );
    assert_err("[wrker]\nconcurrency = 3\n", &["wrker"]);
}

#[test]
fn wrong_type_names_key_and_expectation() {
    assert_err(
        "[worker]\nconcurrency = \"eight\"\n",
        &["worker.concurrency", "u32"],
    );
    assert_err("[webhook]\nport = 70000\n", &["webhook.port"]);
}

#[test]
fn bad_values_are_refused() {
    assert_err(
        "[worker]\nconcurrency = 5000\n",
        &["worker.concurrency", "at most 1024"],
    );
    assert_err(
        "[scheduler]\ntimezone = \"Mars Standard\"\n",
        &["scheduler.timezone", "IANA"],
    );
    assert_err(
        "[scheduler]\ntimezone = \"Mars/Olympus\"\n",
        &["scheduler.timezone", "IANA"],
    );
    assert_err("[webhook]\nbind = \"localhost:80\"\n", &["webhook.bind"]);
    assert_err(
        "[acp]\npermission_policy = \"maybe\"\n",
        &["acp.permission_policy"],
    );
    assert_err(
        "[matrix]\nhome_server = \"https://m.org\"\nuser_id = \"bot\"\npassword = \"x\"\n",
        &["matrix.user_id"],
    );
    assert_err("[worker\n", &["line 1"]);
    assert_err(
        "[webhook]\nmax_body_bytes = 0\n",
        &["webhook.max_body_bytes", "at least 64"],
    );
    assert_err(
        "[acp]\nmax_concurrent_starts = 0\n",
        &["acp.max_concurrent_starts"],
    );
}

#[test]
fn env_override_with_an_unknown_section_is_refused() {
    let env = |k: &str, v: &str| vec![(k.to_string(), v.to_string())];
    let err = Config::load_with(None, &env("GORP_WROKER_CONCURRENCY", "4"))
        .expect_err("a misspelt section must not be ignored")
        .to_string();
    for needle in [
        "GORP_WROKER_CONCURRENCY",
        "unknown config section",
        "wroker",
        "worker",
    ] {
        assert!(err.contains(needle), "{err:?} should mention {needle:?}");
    }
    // An unknown key in a known section is refused as before; gorp's own non-config
    // variables are not keys.
    assert!(Config::load_with(None, &env("GORP_WORKER_CONCURENCY", "4")).is_err());
    assert!(Config::load_with(None, &env("GORP_LOG", "debug")).is_ok());
    assert_eq!(
        Config::load_with(None, &env("GORP_WORKER_MAX_RESCUES", "9"))
            .unwrap()
            .worker
            .max_rescues,
        9
    );
}

#[test]
fn unreadable_file_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let err = Config::load_with(Some(&dir.path().join("missing.toml")), &[]).unwrap_err();
    assert!(err.to_string().contains("missing.toml"), "{err}");
    assert!(err.to_string().contains("cannot read"), "{err}");
}

#[test]
fn example_config_loads() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config.example.toml");
    let c = Config::load_with(Some(&path), &[]).expect("config.example.toml must load");
    assert!(c.matrix.is_some(), "the example documents [matrix]");
}
