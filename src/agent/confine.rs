//! The sandbox of a channel's agent: which paths it may write and may not read, which ports it
//! may connect to, and its own `HOME` and `TMPDIR` (see [`crate::sandbox`]).
//!
//! Under Landlock a channel's agent may write to:
//! - its workspace, `<workspace>/<channel>`;
//! - its own directories, `<acp.state_path>/<channel>/home` (`HOME`) and `…/tmp` (`TMPDIR`),
//!   unless `[acp] env` names a `HOME` or `TMPDIR` of its own, which are then writable instead;
//! - `[acp] extra_writable`;
//! - the channel's `additional_directories`.
//!
//! It may read everything but gorp's database (and its `-wal`, `-shm`, `-journal` files), the
//! config file, the Matrix store, the other channels' workspaces and agent directories (the
//! whole workspace root and state root but its own), the usual secret stores in the `HOME` of
//! gorp's user ([`SECRET_STORES`]), and `[acp] deny_read`.

use std::path::PathBuf;

use crate::config::Config;
use crate::sandbox::{self, SandboxMode, Spec};
use crate::store::Channel;

/// Where people keep credentials in their home directory: gorp's user's are not the agent's
/// (the agent has a `HOME` of its own). Missing ones are skipped.
pub const SECRET_STORES: &[&str] = &[
    ".ssh",
    ".gnupg",
    ".aws",
    ".azure",
    ".kube",
    ".docker",
    ".netrc",
    ".git-credentials",
    ".pgpass",
    ".npmrc",
    ".pypirc",
    ".cargo/credentials",
    ".cargo/credentials.toml",
    ".config/gcloud",
    ".config/gh",
    ".config/gorp",
    ".claude",
    ".codex",
];

/// The sandbox `channel`'s agent starts in; adds `HOME` and `TMPDIR` to `env` under Landlock
/// (creating them). Fails with the directory it could not create.
pub fn spec(
    config: &Config,
    channel: &Channel,
    env: &mut Vec<(String, String)>,
) -> Result<Spec, (PathBuf, std::io::Error)> {
    let acp = &config.acp;
    let mode = channel.sandbox.or(acp.sandbox);
    let landlock = match mode {
        Some(SandboxMode::Landlock) => true,
        Some(SandboxMode::None) => false,
        None => sandbox::kernel_abi() > 0,
    };
    if !landlock {
        return Ok(Spec {
            mode,
            writable: Vec::new(),
            deny_read: Vec::new(),
            allowed_ports: None,
        });
    }
    let own = config.agent_state_dir(&channel.name);
    let mut writable = vec![config.channel_dir(&channel.name)];
    for (var, dir) in [("HOME", own.join("home")), ("TMPDIR", own.join("tmp"))] {
        let dir = match env.iter().find(|(k, _)| k == var) {
            Some((_, v)) => PathBuf::from(v),
            None => {
                make_private_dir(&dir)?;
                env.push((var.to_string(), dir.display().to_string()));
                dir
            }
        };
        writable.push(dir);
    }
    writable.extend(acp.extra_writable.iter().cloned());
    // The channel's additional directories are workspace roots like its own.
    writable.extend(channel.directories());
    let db = &config.database.path;
    let mut deny_read = vec![
        config.workspace.path.clone(),
        acp.state_path.clone(),
        db.clone(),
    ];
    for suffix in ["-wal", "-shm", "-journal"] {
        let mut p = db.clone().into_os_string();
        p.push(suffix);
        deny_read.push(PathBuf::from(p));
    }
    let config_file = PathBuf::from(&config.source);
    if config_file.is_file() {
        deny_read.push(config_file);
    }
    if config.matrix.is_some() {
        deny_read.push(config.matrix_state_dir());
    }
    if let Some(home) = std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        let home = PathBuf::from(home);
        // An agent `HOME` set in `[acp.env]` to gorp's own is the operator's choice: its
        // stores then stay the agent's.
        let writable_roots: Vec<PathBuf> = writable
            .iter()
            .map(|w| w.canonicalize().unwrap_or_else(|_| w.clone()))
            .collect();
        deny_read.extend(SECRET_STORES.iter().map(|s| home.join(s)).filter(|p| {
            let p = p.canonicalize().unwrap_or_else(|_| p.clone());
            !writable_roots.iter().any(|w| p.starts_with(w))
        }));
    }
    deny_read.extend(acp.deny_read.iter().cloned());
    Ok(Spec {
        mode,
        writable,
        deny_read,
        allowed_ports: channel.ports().or_else(|| acp.allowed_ports.clone()),
    })
}

/// Creates `dir` (and its parents), readable by gorp's user only.
fn make_private_dir(dir: &std::path::Path) -> Result<(), (PathBuf, std::io::Error)> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|error| (dir.to_path_buf(), error))
}
