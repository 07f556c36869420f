//! The Matrix front end: rooms are channels, messages become jobs, replies stream back.
//!
//! Enabled when `[matrix]` is configured. The bot logs in once (password or access token) and
//! keeps its session (`session.json`, mode 0600) and matrix-sdk's SQLite stores (state,
//! crypto, optionally encrypted with `store_passphrase`) in `[matrix] state_dir`, so a restart
//! comes back as the same device and end-to-end encryption keeps working.
//!
//! - [`command`]: the pure parser of `!` commands.
//! - [`commands`]: one handler per command group (channels, agent, jobs, schedules).
//! - [`strings`]: every text the bot posts, so it speaks with one voice.
//! - [`failure`]: the person's refusals versus gorp's internal errors (logged with an error id;
//!   the room sees only the id).
//! - [`render`]: job output → Markdown/HTML, split without breaking code fences.
//! - [`bot`]: event handlers (invites, messages, reactions, verification) and the dispatch of
//!   commands. Handlers only write rows and hand off; they never wait for an agent.
//! - [`pump`]: the reply pump. It reads the job rows and their event rows (the single source of
//!   truth) and turns them into status reactions, one streamed reply per job, typing notices and
//!   restart notices, recording its progress in `matrix_replies`.
//! - [`approvals`]: permission requests of `ask` channels posted in their rooms, edited when
//!   decided, and answered by the reactions of allowed users.
//!
//! Startup: log in or restore, one catch-up `/sync` with a zero timeout *before* any handler
//! is attached (so nothing sent while gorp was down is answered), then a loop of long-poll
//! syncs with exponential backoff on errors.

pub mod approvals;
pub mod bot;
pub mod command;
mod commands;
pub mod failure;
pub mod pump;
pub mod render;
pub mod strings;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use matrix_sdk::authentication::matrix::MatrixSession;
use matrix_sdk::config::SyncSettings;
use matrix_sdk::encryption::EncryptionSettings;
use matrix_sdk::ruma::{OwnedDeviceId, OwnedUserId};
use matrix_sdk::{Client, SessionMeta, SessionTokens};
use matrix_sdk_base::crypto::{CollectStrategy, DecryptionSettings, TrustRequirement};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::agent::pool::WarmSessionManager;
use crate::config::{Config, MatrixConfig};
use crate::store::Store;
use crate::worker::PoolHandle;

/// Log filter directives that quiet what matrix-sdk reports as a warning or an error although
/// nothing is wrong for gorp. [`log_filter`] adds them to a default filter; an explicit
/// `GORP_LOG` still decides.
/// - `matrix_sdk_crypto::backups` warns "Trying to backup room keys but no backup key was
///   found" whenever room keys change, because gorp does not enable key backup.
/// - `matrix_sdk::http_client` logs every failed request as an error, among them the 404s for
///   the secret-storage key account data on every start of an account without secret storage
///   (which matrix-sdk then reads as "none"). Every request whose failure matters is returned
///   to its caller and logged there: gorp's own (sync, sends, login) and matrix-sdk's
///   end-to-end encryption requests (`matrix_sdk::client`, `matrix_sdk::encryption`).
pub const LOG_DIRECTIVES: &[&str] = &[
    "matrix_sdk_crypto::backups=error",
    "matrix_sdk::http_client=off",
];

/// `base` (e.g. `info,sqlx=warn`) followed by [`LOG_DIRECTIVES`].
pub fn log_filter(base: &str) -> String {
    std::iter::once(base)
        .chain(LOG_DIRECTIVES.iter().copied())
        .collect::<Vec<_>>()
        .join(",")
}

/// The long-poll timeout of each `/sync`.
pub const LONG_POLL: Duration = Duration::from_secs(30);
/// The longest wait between two attempts to reach the homeserver (`[matrix] retry_max_secs`).
fn max_backoff(config: &Config) -> Duration {
    let secs = config
        .matrix
        .as_ref()
        .map(|m| m.retry_max_secs)
        .unwrap_or(60);
    Duration::from_secs(secs.max(1))
}

/// What the bot keeps to come back as the same device.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredSession {
    pub homeserver_url: String,
    pub user_id: OwnedUserId,
    pub device_id: OwnedDeviceId,
    pub access_token: String,
}

impl std::fmt::Debug for StoredSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredSession")
            .field("homeserver_url", &self.homeserver_url)
            .field("user_id", &self.user_id)
            .field("device_id", &self.device_id)
            .field("access_token", &"********")
            .finish()
    }
}

impl StoredSession {
    fn of(client: &Client) -> anyhow::Result<StoredSession> {
        let session = client
            .matrix_auth()
            .session()
            .context("the Matrix client is not logged in")?;
        Ok(StoredSession {
            homeserver_url: client.homeserver().to_string(),
            user_id: session.meta.user_id,
            device_id: session.meta.device_id,
            access_token: session.tokens.access_token,
        })
    }

    /// Writes the session with owner-only permissions.
    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let json = serde_json::to_vec_pretty(self)?;
        let tmp = path.with_extension("json.tmp");
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("writing {}", tmp.display()))?;
        file.write_all(&json)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
        Ok(())
    }

    pub fn load(path: &Path) -> anyhow::Result<StoredSession> {
        let json = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_slice(&json).with_context(|| format!("parsing {}", path.display()))
    }

    fn to_matrix_session(&self) -> MatrixSession {
        MatrixSession {
            meta: SessionMeta {
                user_id: self.user_id.clone(),
                device_id: self.device_id.clone(),
            },
            tokens: SessionTokens {
                access_token: self.access_token.clone(),
                refresh_token: None,
            },
        }
    }
}

/// Files under the state directory.
pub struct StatePaths {
    pub session: PathBuf,
    pub store: PathBuf,
}

impl StatePaths {
    pub fn new(dir: &Path) -> StatePaths {
        StatePaths {
            session: dir.join("session.json"),
            store: dir.join("store"),
        }
    }
}

/// A client on the bot's store, with key sharing that lets unverified people read the bot:
/// room keys go to every device of every member ([`CollectStrategy::AllDevices`]) and events
/// from unverified devices are decrypted ([`TrustRequirement::Untrusted`]). Both are set
/// explicitly so a changed default cannot lock users out. No cross-signing is bootstrapped and
/// nothing accepts a verification.
async fn build_client(home_server: &str, store: &Path, m: &MatrixConfig) -> anyhow::Result<Client> {
    std::fs::create_dir_all(store).with_context(|| format!("creating {}", store.display()))?;
    Client::builder()
        .homeserver_url(home_server)
        .sqlite_store(store, m.store_passphrase.as_deref())
        .with_encryption_settings(EncryptionSettings {
            auto_enable_cross_signing: false,
            auto_enable_backups: false,
            ..EncryptionSettings::default()
        })
        .with_room_key_recipient_strategy(CollectStrategy::AllDevices)
        .with_decryption_settings(DecryptionSettings {
            sender_device_trust_requirement: TrustRequirement::Untrusted,
        })
        .build()
        .await
        .context("building the Matrix client")
}

/// Logs the bot in: restores the saved session when there is one for the configured user,
/// otherwise logs in (password: a new device; access token: the token's device) and saves it.
pub async fn connect(config: &Config) -> anyhow::Result<Client> {
    let m = config
        .matrix
        .as_ref()
        .context("[matrix] is not configured")?;
    let dir = config.matrix_state_dir();
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let paths = StatePaths::new(&dir);
    if paths.session.exists() {
        let saved = StoredSession::load(&paths.session)?;
        if saved.user_id.as_str() == m.user_id {
            let client = build_client(&saved.homeserver_url, &paths.store, m).await?;
            client
                .restore_session(saved.to_matrix_session())
                .await
                .context("restoring the saved Matrix session")?;
            tracing::info!(user = %saved.user_id, device = %saved.device_id, "Matrix session restored");
            return Ok(client);
        }
        anyhow::bail!(
            "{} belongs to {}, not {}; move it (and {}) away to log in as the new user",
            paths.session.display(),
            saved.user_id,
            m.user_id,
            paths.store.display()
        );
    }
    let client = if let Some(password) = &m.password {
        let client = build_client(&m.home_server, &paths.store, m).await?;
        client
            .matrix_auth()
            .login_username(&m.user_id, password)
            .initial_device_display_name(&m.device_name)
            .send()
            .await
            .with_context(|| format!("logging in as {}", m.user_id))?;
        client
    } else {
        let token = m.access_token.as_deref().unwrap_or_default();
        let (user_id, device_id) = whoami(&m.home_server, token).await?;
        if user_id.as_str() != m.user_id {
            anyhow::bail!("the access token belongs to {user_id}, not {}", m.user_id);
        }
        let client = build_client(&m.home_server, &paths.store, m).await?;
        let saved = StoredSession {
            homeserver_url: m.home_server.clone(),
            user_id,
            device_id,
            access_token: token.to_string(),
        };
        client
            .restore_session(saved.to_matrix_session())
            .await
            .context("logging in with the access token")?;
        client
    };
    let saved = StoredSession::of(&client)?;
    saved.save(&paths.session)?;
    tracing::info!(user = %saved.user_id, device = %saved.device_id, "Matrix login; session saved");
    Ok(client)
}

/// The user and device an access token belongs to, asked with a throwaway in-memory client.
async fn whoami(home_server: &str, token: &str) -> anyhow::Result<(OwnedUserId, OwnedDeviceId)> {
    use matrix_sdk::ruma::api::client::account::whoami;
    let probe = Client::builder()
        .homeserver_url(home_server)
        .build()
        .await
        .context("building the Matrix client")?;
    probe
        .restore_session(MatrixSession {
            meta: SessionMeta {
                user_id: "@probe:localhost".try_into().expect("valid user id"),
                device_id: "PROBE".into(),
            },
            tokens: SessionTokens {
                access_token: token.to_string(),
                refresh_token: None,
            },
        })
        .await
        .context("checking the access token")?;
    let r = probe
        .send(whoami::v3::Request::new())
        .await
        .context("checking the access token (whoami)")?;
    let device = r
        .device_id
        .context("the access token has no device; log in with a password instead")?;
    Ok((r.user_id, device))
}

/// What the bot needs from the rest of gorp.
#[derive(Clone)]
pub struct Services {
    pub store: Store,
    pub config: Arc<Config>,
    pub warm: Option<Arc<WarmSessionManager>>,
    pub pool: Option<PoolHandle>,
}

/// Runs the Matrix bot until `shutdown`: login (retried with backoff while the homeserver
/// cannot be reached), catch-up, handlers, the reply pump and the sync loop.
pub async fn run(services: Services, shutdown: CancellationToken) -> anyhow::Result<()> {
    let mut backoff = Duration::from_secs(1);
    let client = loop {
        let r = tokio::select! {
            r = connect(&services.config) => r,
            _ = shutdown.cancelled() => return Ok(()),
        };
        match r {
            Ok(c) => break c,
            Err(e) => {
                tracing::error!(error = format!("{e:#}"), retry_in = ?backoff, "Matrix login failed");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.cancelled() => return Ok(()),
                }
                backoff = (backoff * 2).min(max_backoff(&services.config));
            }
        }
    };
    run_client(client, services, shutdown).await
}

/// [`run`] with a connected client.
pub async fn run_client(
    client: Client,
    services: Services,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    // Catch up before any handler exists: what arrived while gorp was down is not answered.
    let mut backoff = Duration::from_millis(500);
    loop {
        let r = tokio::select! {
            r = client.sync_once(SyncSettings::default().timeout(Duration::ZERO)) => r,
            _ = shutdown.cancelled() => return Ok(()),
        };
        match r {
            Ok(_) => break,
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?backoff, "Matrix catch-up sync failed");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.cancelled() => return Ok(()),
                }
                backoff = (backoff * 2).min(max_backoff(&services.config));
            }
        }
    }
    recover(&client, &services.config).await;
    let bot = bot::Bot::new(client.clone(), services.clone())?;
    bot.attach();
    bot.answer_pending_invites().await;
    tracing::info!(user = ?client.user_id(), "Matrix bot ready");
    let (recovered, recoveries) = tokio::sync::watch::channel(0u64);
    let status = Status::new(&client, services.store.clone(), recovered);
    status.set("syncing", None).await;
    let pump = pump::Pump::new(client.clone(), services.store.clone(), &services.config);
    let pump = tokio::spawn(pump.run(recoveries, shutdown.clone()));
    let approvals =
        approvals::ApprovalPump::new(client.clone(), services.store.clone(), &services.config);
    let approvals = tokio::spawn(approvals.run(shutdown.clone()));
    sync_forever(&client, &shutdown, &status, max_backoff(&services.config)).await;
    let _ = tokio::join!(pump, approvals);
    status.set("stopped", None).await;
    Ok(())
}

/// Writes the bot's connection state to `matrix_bot` on changes.
struct Status {
    store: Store,
    user: String,
    device: String,
    /// Bumped when syncing works again after failures, so the reply pump retries at once.
    recovered: tokio::sync::watch::Sender<u64>,
}

impl Status {
    fn new(client: &Client, store: Store, recovered: tokio::sync::watch::Sender<u64>) -> Status {
        Status {
            store,
            recovered,
            user: client.user_id().map(|u| u.to_string()).unwrap_or_default(),
            device: client
                .device_id()
                .map(|d| d.to_string())
                .unwrap_or_default(),
        }
    }

    async fn set(&self, state: &'static str, error: Option<String>) {
        let r = self
            .store
            .matrix_bot_state(
                &self.user,
                &self.device,
                state,
                error,
                crate::store::now_ms(),
            )
            .await;
        if let Err(e) = r {
            tracing::warn!(error = %e, "cannot record the Matrix bot state");
        }
    }
}

/// With `[matrix] recovery_key`, imports the account's secrets from server-side secret storage
/// (cross-signing keys, so this device is signed by the bot's identity, and the key-backup key,
/// so room keys sent to earlier devices can be downloaded). Failure is logged, not fatal.
async fn recover(client: &Client, config: &Config) {
    use matrix_sdk::encryption::recovery::RecoveryState;
    let Some(key) = config
        .matrix
        .as_ref()
        .and_then(|m| m.recovery_key.as_deref())
    else {
        return;
    };
    let recovery = client.encryption().recovery();
    if recovery.state() == RecoveryState::Enabled {
        return;
    }
    match recovery.recover(key).await {
        Ok(()) => tracing::info!("secrets restored with the recovery key"),
        Err(e) => tracing::warn!(error = %e, "cannot restore secrets with the recovery key"),
    }
}

/// Long-poll syncs one after another (no pause between quick responses), with exponential
/// backoff from 0.5 s to `[matrix] retry_max_secs` while the homeserver cannot be reached.
async fn sync_forever(
    client: &Client,
    shutdown: &CancellationToken,
    status: &Status,
    max_wait: Duration,
) {
    let long_poll = SyncSettings::default().timeout(LONG_POLL);
    // After a failure the next sync does not wait for news, so recovery is seen at once.
    let probe = SyncSettings::default().timeout(Duration::ZERO);
    let mut backoff = Duration::from_millis(500);
    let mut failing = false;
    loop {
        let settings = if failing { &probe } else { &long_poll };
        let r = tokio::select! {
            r = client.sync_once(settings.clone()) => r,
            _ = shutdown.cancelled() => return,
        };
        match r {
            Ok(_) => {
                backoff = Duration::from_millis(500);
                if failing {
                    failing = false;
                    tracing::info!("Matrix sync recovered");
                    status.set("syncing", None).await;
                    status.recovered.send_modify(|n| *n += 1);
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?backoff, "Matrix sync failed");
                metrics::counter!(crate::metrics::MATRIX_SYNC_FAILURES).increment(1);
                if !failing {
                    failing = true;
                    status.set("retrying", Some(e.to_string())).await;
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.cancelled() => return,
                }
                backoff = (backoff * 2).min(max_wait);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use super::failure::tests::Captured;

    /// The expected matrix-sdk noise is dropped; gorp's lines and matrix-sdk's real failures
    /// are kept.
    #[test]
    fn the_log_filter_quiets_expected_matrix_sdk_noise() {
        assert_eq!(
            log_filter("info,sqlx=warn"),
            "info,sqlx=warn,matrix_sdk_crypto::backups=error,matrix_sdk::http_client=off"
        );
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(log_filter(
                "info,sqlx=warn",
            )))
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::warn!(target: "matrix_sdk_crypto::backups", "Trying to backup room keys but no backup key was found");
            tracing::error!(target: "matrix_sdk::http_client", "Error while sending request: 404 Account data not found");
            tracing::error!(target: "matrix_sdk::client", "Error while sending outgoing E2EE requests");
            tracing::error!(target: "matrix_sdk_crypto::backups", "a real backup failure");
            tracing::info!(target: "gorp::matrix::bot", "refused a message");
        });
        let log = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        assert!(!log.contains("no backup key"), "{log}");
        assert!(!log.contains("Account data not found"), "{log}");
        for kept in [
            "outgoing E2EE",
            "a real backup failure",
            "refused a message",
        ] {
            assert!(log.contains(kept), "{kept}: {log}");
        }
    }
}
