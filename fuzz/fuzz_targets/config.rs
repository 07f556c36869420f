//! `gorp::config::Config`: `from_toml` on any text, and `load_with` with `GORP_*` overrides,
//! with no file and with the text as the file.
//!
//! The input is a TOML file, optionally followed by a line `#--- env` and `KEY=VALUE` lines
//! (a key without the `GORP_` prefix gets it).
//!
//! Checks, besides not panicking: a loaded config has its label as `source`; `masked()` and
//! `to_masked_toml()` (`gorp config check`) work, the latter is TOML, and every secret in it is
//! `********`; a config written back as TOML loads to the same config; `load_with` without
//! overrides is `from_toml` of the same file; an environment error names one of the given
//! variables; with no file, errors come from the overrides alone.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use gorp::config::{Config, ConfigError};
use libfuzzer_sys::fuzz_target;

const LABEL: &str = "fuzz.toml";
const MASK: &str = "********";

fn file_path() -> &'static PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        std::env::temp_dir().join(format!("gorp-fuzz-config-{}.toml", std::process::id()))
    })
}

fuzz_target!(|input: &str| {
    let (text, env_text) = match input.find("\n#--- env\n") {
        Some(i) => (&input[..i + 1], &input[i + "\n#--- env\n".len()..]),
        None => (input, ""),
    };
    let env: Vec<(String, String)> = env_text
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| {
            let k = if k.starts_with("GORP_") {
                k.to_string()
            } else {
                format!("GORP_{k}")
            };
            (k, v.to_string())
        })
        .collect();

    // The file alone.
    let from_text = Config::from_toml(text, LABEL);
    match &from_text {
        Ok(config) => check_config(config, LABEL, true),
        Err(e) => assert!(!e.to_string().is_empty()),
    }

    // The file through load_with, without and with overrides.
    let path = file_path();
    std::fs::write(path, text).unwrap();
    let label = path.display().to_string();
    let loaded = Config::load_with(Some(path), &[]);
    let relabelled = Config::from_toml(text, &label);
    match (&loaded, &relabelled) {
        (Ok(a), Ok(b)) => assert_eq!(a, b),
        (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string()),
        (a, b) => panic!("load_with {a:?} but from_toml {b:?}"),
    }
    if !env.is_empty() {
        match Config::load_with(Some(path), &env) {
            Ok(config) => check_config(&config, &label, false),
            Err(e) => check_error(&e, &env, None),
        }
    }

    // No file: defaults plus overrides.
    match Config::load_with(None, &env) {
        Ok(config) => check_config(&config, "defaults", false),
        Err(e) => check_error(&e, &env, Some("defaults")),
    }
});

fn check_error(e: &ConfigError, env: &[(String, String)], file: Option<&str>) {
    assert!(!e.to_string().is_empty());
    match e {
        ConfigError::Env { var, .. } => {
            assert!(env.iter().any(|(k, _)| k == var), "{var:?} was not given")
        }
        ConfigError::Invalid { path, .. } | ConfigError::Parse { path, .. } => {
            if let Some(label) = file {
                assert!(
                    matches!(e, ConfigError::Invalid { .. }),
                    "{e:?} with no file"
                );
                assert_eq!(path, label);
            }
        }
        ConfigError::Read { .. } => panic!("{e:?}"),
    }
}

/// `masked`: also check `gorp config check`'s output (the slow part; once per input).
fn check_config(config: &Config, label: &str, masked: bool) {
    assert_eq!(config.source, label);
    if masked {
        check_masked(config);
    }

    // Written back as TOML, it loads to the same config.
    let written = toml::to_string(config).unwrap_or_else(|e| panic!("{config:?}: {e}"));
    match Config::from_toml(&written, label) {
        Ok(again) => assert_eq!(&again, config, "{written}"),
        Err(e) => panic!("written config does not load: {e}\n{written}"),
    }
}

/// `gorp config check`: TOML, secrets masked.
fn check_masked(config: &Config) {
    let masked = config.masked();
    let text = config.to_masked_toml();
    text.parse::<toml::Table>()
        .unwrap_or_else(|e| panic!("masked config is not TOML: {e}\n{text}"));
    let tokens = masked["webhook"]["tokens"].as_array().unwrap();
    assert_eq!(tokens.len(), config.webhook.tokens.len());
    assert!(
        tokens.iter().all(|t| t.as_str() == Some(MASK)),
        "{tokens:?}"
    );
    if let Some(m) = &config.matrix {
        let mm = &masked["matrix"];
        for (key, value) in [
            ("password", &m.password),
            ("access_token", &m.access_token),
            ("store_passphrase", &m.store_passphrase),
            ("recovery_key", &m.recovery_key),
        ] {
            if value.is_some() {
                assert_eq!(mm[key].as_str(), Some(MASK), "matrix.{key}");
            }
        }
    }
}
