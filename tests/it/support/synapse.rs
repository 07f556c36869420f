//! A real Synapse homeserver on `127.0.0.1`, one per test, for driving Matrix
//! clients against.
//!
//! [`Synapse::start`] needs the Python venv that `scripts/setup-synapse`
//! creates (`<repo>/target/synapse-venv`, or `$SYNAPSE_VENV`); without it,
//! it fails with an error that says to run that script. It then:
//!
//! 1. picks a free port on `127.0.0.1`;
//! 2. writes into a fresh temp dir a homeserver config (JSON, which is YAML),
//!    a logging config (WARNING and above to `homeserver.log`) and a newly
//!    generated ed25519 signing key;
//! 3. starts `python -m synapse.app.homeserver` in its own process group,
//!    with stdout/stderr going to `stdout.log` in the temp dir;
//! 4. polls `GET /_matrix/client/versions` until it answers (bounded by
//!    [`STARTUP_TIMEOUT`]); when the child exits first, the error carries the
//!    tail of its output, and a port lost to another process is retried on a
//!    new port.
//!
//! The config: server name `localhost`, SQLite database, one plain-HTTP
//! listener with only the `client` resource (no federation; the client
//! resource also serves `/_synapse/admin`), `enable_registration: false`,
//! a random `registration_shared_secret`, `report_stats: false`,
//! `trusted_key_servers: []`, `suppress_key_server_warning: true`,
//! presence off, `bcrypt_rounds: 4` (registration and login in ~25 ms instead
//! of ~200 ms), and every rate limit in [`RATE_LIMIT_KEYS`] raised to
//! [`UNLIMITED`] (the defaults allow about 10 messages and 5 logins in a
//! burst, then answer 429).
//!
//! Users are created with the shared-secret admin API
//! (`/_synapse/admin/v1/register`: `GET` a nonce, then `POST` the user with
//! an HMAC-SHA1 of nonce, name, password and admin flag). That registration
//! logs the user in on a new device; [`Synapse::logout`] (or
//! [`Synapse::register_user`], which does both) removes it again so a later
//! password login leaves the user with exactly one device.
//!
//! Dropping a [`Synapse`] kills its whole process group and waits for the
//! child; the child also gets `SIGKILL` when the thread that spawned it ends
//! (`PR_SET_PDEATHSIG`), so a test process killed mid-run leaves no server.
//!
//! A missing venv is an error, never a skip: the Matrix tests then fail with
//! the hint to run `scripts/setup-synapse` (`scripts/test` runs it first).
//!
//! Crates used: `anyhow`, `hex`, `hmac` (0.13), `libc`, `serde_json`,
//! `tokio` (gorp dependencies); `reqwest` (0.12, `json`), `sha1` (0.11),
//! `tempfile` (dev-dependencies). Items the tests do not use yet are covered
//! by the `allow(dead_code)` of `support/mod.rs`.

use std::fs::{self, File};
use std::io::Read;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use hmac::{KeyInit, Mac};
use serde_json::{json, Value};
use tempfile::TempDir;

/// How long [`Synapse::start`] waits for `/_matrix/client/versions`.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);

/// How often [`Synapse::start`] polls while waiting.
const POLL_EVERY: Duration = Duration::from_millis(50);

/// How many times [`Synapse::start`] tries a new port when the chosen one
/// was taken between choosing and binding.
const PORT_ATTEMPTS: usize = 3;

/// The homeserver's `server_name`; user ids are `@name:localhost`.
pub const SERVER_NAME: &str = "localhost";

/// The rate-limit setting every key in [`RATE_LIMIT_KEYS`] gets.
pub const UNLIMITED: (f64, u64) = (100_000.0, 1_000_000);

/// Every rate limit Synapse 1.163 reads (its `config/ratelimiting.py`), as
/// dotted config paths. `rc_federation` is left out (no federation listener;
/// it has a different shape), as are `rc_messages_per_second` and
/// `rc_message_burst_count`, the old spelling of `rc_message`.
pub const RATE_LIMIT_KEYS: &[&str] = &[
    "rc_message",
    "rc_registration",
    "rc_registration_token_validity",
    "rc_login.address",
    "rc_login.account",
    "rc_login.failed_attempts",
    "rc_admin_redaction",
    "rc_joins.local",
    "rc_joins.remote",
    "rc_joins_per_room",
    "rc_key_requests",
    "rc_3pid_validation",
    "rc_invites.per_room",
    "rc_invites.per_user",
    "rc_invites.per_issuer",
    "rc_third_party_invite",
    "rc_media_create",
    "rc_presence.per_user",
    "rc_delayed_event_mgmt",
    "rc_room_creation",
    "rc_reports",
    "rc_user_directory",
    "rc_profile",
];

/// The venv `scripts/setup-synapse` installs into: `$SYNAPSE_VENV`, else
/// `<crate root>/target/synapse-venv`.
pub fn venv_dir() -> PathBuf {
    match std::env::var_os("SYNAPSE_VENV") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => Path::new(env!("CARGO_MANIFEST_DIR")).join("target/synapse-venv"),
    }
}

/// The Python of the venv at [`venv_dir`], or an error saying how to
/// create it.
pub fn venv_python() -> anyhow::Result<PathBuf> {
    python_in_venv(&venv_dir())
}

/// The Python of the venv at `venv` if it has Synapse installed, or an error
/// saying to run `scripts/setup-synapse`.
pub fn python_in_venv(venv: &Path) -> anyhow::Result<PathBuf> {
    let python = venv.join("bin/python");
    let has_synapse = venv
        .join("lib")
        .read_dir()
        .into_iter()
        .flatten()
        .flatten()
        .any(|entry| entry.path().join("site-packages/synapse").is_dir());
    if !python.is_file() || !has_synapse {
        bail!(
            "no Synapse venv at {}: run scripts/setup-synapse first \
             (set SYNAPSE_VENV to use another venv)",
            venv.display()
        );
    }
    Ok(python)
}

/// A user created through the shared-secret registration API.
#[derive(Debug, Clone)]
pub struct RegisteredUser {
    /// `@localpart:localhost`.
    pub user_id: String,
    /// The localpart the user logs in with.
    pub localpart: String,
    pub password: String,
    /// The access token of the device registration created; empty once
    /// [`Synapse::register_user`] logged that device out.
    pub access_token: String,
    /// The device registration created (logged out by
    /// [`Synapse::register_user`]).
    pub device_id: String,
}

/// A running Synapse; killed (whole process group) on drop.
pub struct Synapse {
    child: Child,
    dir: TempDir,
    port: u16,
    base_url: String,
    shared_secret: String,
    http: reqwest::Client,
    startup: Duration,
}

impl Synapse {
    /// Starts a fresh homeserver and waits until it answers.
    pub async fn start() -> anyhow::Result<Synapse> {
        let python = venv_python()?;
        let mut last_error = None;
        for _ in 0..PORT_ATTEMPTS {
            match Self::start_once(&python).await {
                Ok(synapse) => return Ok(synapse),
                Err(StartError::PortTaken(error)) => last_error = Some(error),
                Err(StartError::Other(error)) => return Err(error),
            }
        }
        Err(last_error.unwrap_or_else(|| anyhow!("Synapse did not start")))
    }

    async fn start_once(python: &Path) -> Result<Synapse, StartError> {
        let began = Instant::now();
        let dir = tempfile::Builder::new()
            .prefix("synapse-")
            .tempdir()
            .context("creating Synapse temp dir")?;
        let port = free_port().context("picking a free port")?;
        let shared_secret = random_hex(32)?;
        write_config(dir.path(), port, &shared_secret)?;
        let child = spawn(python, dir.path())?;

        let base_url = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(30))
            .build()
            .context("building HTTP client")?;
        let mut synapse = Synapse {
            child,
            dir,
            port,
            base_url,
            shared_secret,
            http,
            startup: Duration::ZERO,
        };
        synapse.wait_ready(began).await?;
        synapse.startup = began.elapsed();
        Ok(synapse)
    }

    /// Kills the server at once (like a crash); [`Synapse::resume`] starts it again.
    pub fn kill(&mut self) {
        let pid = self.child.id() as libc::pid_t;
        // SAFETY: plain syscall on the process group this struct created.
        unsafe {
            libc::killpg(pid, libc::SIGKILL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the killed server again on the same port, database and keys.
    pub async fn resume(&mut self) -> anyhow::Result<()> {
        let began = Instant::now();
        let python = venv_python()?;
        self.child = spawn(&python, self.dir.path())?;
        match self.wait_ready(began).await {
            Ok(()) => Ok(()),
            Err(StartError::PortTaken(e)) | Err(StartError::Other(e)) => Err(e),
        }
    }
}

/// Starts `python -m synapse.app.homeserver` on the config in `dir`, in its own process group,
/// killed when the spawning thread dies.
fn spawn(python: &Path, dir: &Path) -> anyhow::Result<Child> {
    let output = File::create(dir.join("stdout.log")).context("creating stdout.log")?;
    let mut command = Command::new(python);
    command
        .args(["-m", "synapse.app.homeserver", "--config-path"])
        .arg(dir.join("homeserver.yaml"))
        .current_dir(dir)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .stdin(Stdio::null())
        .stdout(output.try_clone().context("cloning stdout.log")?)
        .stderr(output)
        .process_group(0);
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork
    // and exec.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    command
        .spawn()
        .with_context(|| format!("spawning {} -m synapse.app.homeserver", python.display()))
}

impl Synapse {
    /// Polls `/_matrix/client/versions` until it answers 200, the child
    /// exits, or [`STARTUP_TIMEOUT`] passes.
    async fn wait_ready(&mut self, began: Instant) -> Result<(), StartError> {
        let url = format!("{}/_matrix/client/versions", self.base_url);
        loop {
            if let Some(status) = self.child.try_wait().context("polling Synapse")? {
                let output = self.output_tail();
                let error = anyhow!("Synapse exited ({status}) before it was ready:\n{output}");
                return Err(if output.contains("Address already in use") {
                    StartError::PortTaken(error)
                } else {
                    StartError::Other(error)
                });
            }
            let attempt = self
                .http
                .get(&url)
                .timeout(Duration::from_secs(2))
                .send()
                .await;
            if let Ok(response) = attempt {
                if response.status().is_success() {
                    return Ok(());
                }
            }
            if began.elapsed() > STARTUP_TIMEOUT {
                return Err(StartError::Other(anyhow!(
                    "Synapse did not answer {url} within {STARTUP_TIMEOUT:?}:\n{}",
                    self.output_tail()
                )));
            }
            tokio::time::sleep(POLL_EVERY).await;
        }
    }

    /// `http://127.0.0.1:<port>`, without a trailing slash.
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// The homeserver URL to give a Matrix client: [`Synapse::base_url`],
    /// owned.
    pub fn url(&self) -> String {
        self.base_url.clone()
    }

    /// The pid of the Python process (also its process group id).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn server_name(&self) -> &str {
        SERVER_NAME
    }

    /// From creating the temp dir (config, key, spawn) to the first 200 from
    /// `/_matrix/client/versions`.
    pub fn startup_time(&self) -> Duration {
        self.startup
    }

    /// The temp dir with the config, database, media store and logs.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Synapse's own log (WARNING and above).
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("homeserver.log")
    }

    /// `@localpart:localhost`.
    pub fn user_id(&self, localpart: &str) -> String {
        format!("@{localpart}:{SERVER_NAME}")
    }

    /// The last lines of the child's stdout/stderr and of its log file.
    pub fn output_tail(&self) -> String {
        let tail = |path: PathBuf| {
            let text = fs::read_to_string(&path).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let start = lines.len().saturating_sub(40);
            format!("--- {} ---\n{}", path.display(), lines[start..].join("\n"))
        };
        format!(
            "{}\n{}",
            tail(self.dir.path().join("stdout.log")),
            tail(self.log_path())
        )
    }

    /// Registers a (non-admin) user and logs out the device registration
    /// created, so the user has no device until it logs in.
    pub async fn register_user(
        &self,
        localpart: &str,
        password: &str,
    ) -> anyhow::Result<RegisteredUser> {
        let mut user = self.register(localpart, password, false).await?;
        self.logout(&user.access_token).await?;
        user.access_token.clear();
        Ok(user)
    }

    /// Registers a user through `/_synapse/admin/v1/register` with the shared
    /// secret. The returned access token belongs to a new device.
    pub async fn register(
        &self,
        localpart: &str,
        password: &str,
        admin: bool,
    ) -> anyhow::Result<RegisteredUser> {
        let url = format!("{}/_synapse/admin/v1/register", self.base_url);
        let nonce_reply: Value = self
            .http
            .get(&url)
            .send()
            .await
            .context("GET register nonce")?
            .error_for_status()
            .context("GET register nonce")?
            .json()
            .await
            .context("register nonce JSON")?;
        let nonce = nonce_reply["nonce"]
            .as_str()
            .ok_or_else(|| anyhow!("no nonce in {nonce_reply}"))?;
        let mac = registration_mac(&self.shared_secret, nonce, localpart, password, admin);
        let response = self
            .http
            .post(&url)
            .json(&json!({
                "nonce": nonce,
                "username": localpart,
                "password": password,
                "admin": admin,
                "mac": mac,
            }))
            .send()
            .await
            .context("POST register")?;
        let status = response.status();
        let body: Value = response.json().await.context("register reply JSON")?;
        if !status.is_success() {
            bail!("registering {localpart}: {status} {body}");
        }
        let field = |name: &str| {
            body[name]
                .as_str()
                .map(str::to_owned)
                .ok_or_else(|| anyhow!("no {name} in register reply {body}"))
        };
        Ok(RegisteredUser {
            user_id: field("user_id")?,
            localpart: localpart.to_owned(),
            password: password.to_owned(),
            access_token: field("access_token")?,
            device_id: field("device_id")?,
        })
    }

    /// Logs out the device an access token belongs to
    /// (`POST /_matrix/client/v3/logout`).
    pub async fn logout(&self, access_token: &str) -> anyhow::Result<()> {
        let response = self
            .http
            .post(format!("{}/_matrix/client/v3/logout", self.base_url))
            .bearer_auth(access_token)
            .json(&json!({}))
            .send()
            .await
            .context("POST logout")?;
        let status = response.status();
        if !status.is_success() {
            bail!(
                "logout: {status} {}",
                response.text().await.unwrap_or_default()
            );
        }
        Ok(())
    }

    /// The ids of the devices of the user an access token belongs to
    /// (`GET /_matrix/client/v3/devices`).
    pub async fn devices(&self, access_token: &str) -> anyhow::Result<Vec<String>> {
        let body: Value = self
            .client_get("/_matrix/client/v3/devices", access_token)
            .await?;
        let mut ids: Vec<String> = body["devices"]
            .as_array()
            .ok_or_else(|| anyhow!("no devices in {body}"))?
            .iter()
            .filter_map(|device| device["device_id"].as_str().map(str::to_owned))
            .collect();
        ids.sort();
        Ok(ids)
    }

    /// `GET` a client-server API path with an access token; the JSON reply.
    pub async fn client_get(&self, path: &str, access_token: &str) -> anyhow::Result<Value> {
        let response = self
            .http
            .get(format!("{}{path}", self.base_url))
            .bearer_auth(access_token)
            .send()
            .await
            .with_context(|| format!("GET {path}"))?;
        let status = response.status();
        let body: Value = response
            .json()
            .await
            .with_context(|| format!("GET {path}: JSON"))?;
        if !status.is_success() {
            bail!("GET {path}: {status} {body}");
        }
        Ok(body)
    }

    /// A `reqwest` client that bypasses proxies, for raw API calls.
    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }
}

impl Drop for Synapse {
    fn drop(&mut self) {
        let pid = self.child.id() as libc::pid_t;
        // SAFETY: plain syscall on the process group this struct created.
        unsafe {
            libc::killpg(pid, libc::SIGKILL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

enum StartError {
    /// The listener could not bind: another process took the port.
    PortTaken(anyhow::Error),
    Other(anyhow::Error),
}

impl From<anyhow::Error> for StartError {
    fn from(error: anyhow::Error) -> Self {
        StartError::Other(error)
    }
}

/// The `mac` field of a shared-secret registration: hex HMAC-SHA1 over
/// `nonce \0 username \0 password \0 admin|notadmin`.
pub fn registration_mac(
    secret: &str,
    nonce: &str,
    username: &str,
    password: &str,
    admin: bool,
) -> String {
    let mut mac =
        hmac::Hmac::<sha1::Sha1>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key");
    mac.update(nonce.as_bytes());
    mac.update(b"\0");
    mac.update(username.as_bytes());
    mac.update(b"\0");
    mac.update(password.as_bytes());
    mac.update(b"\0");
    mac.update(if admin {
        b"admin" as &[u8]
    } else {
        b"notadmin"
    });
    hex::encode(mac.finalize().into_bytes())
}

/// A port on 127.0.0.1 that was free a moment ago.
fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn random_bytes(len: usize) -> anyhow::Result<Vec<u8>> {
    let mut bytes = vec![0; len];
    File::open("/dev/urandom")
        .and_then(|mut urandom| urandom.read_exact(&mut bytes))
        .context("reading /dev/urandom")?;
    Ok(bytes)
}

fn random_hex(len: usize) -> anyhow::Result<String> {
    Ok(hex::encode(random_bytes(len)?))
}

/// Unpadded standard base64, the encoding of Synapse's signing key files.
fn base64_unpadded(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..=chunk.len() {
            out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

/// The `rc_*` part of the config: every key of [`RATE_LIMIT_KEYS`] set to
/// [`UNLIMITED`], dotted keys nested.
pub fn rate_limit_config() -> serde_json::Map<String, Value> {
    let (per_second, burst_count) = UNLIMITED;
    let mut config = serde_json::Map::new();
    for key in RATE_LIMIT_KEYS {
        let mut node = &mut config;
        let mut parts = key.split('.').peekable();
        while let Some(part) = parts.next() {
            if parts.peek().is_none() {
                node.insert(
                    part.to_owned(),
                    json!({ "per_second": per_second, "burst_count": burst_count }),
                );
            } else {
                node = node
                    .entry(part.to_owned())
                    .or_insert_with(|| json!({}))
                    .as_object_mut()
                    .expect("rate limit groups are objects");
            }
        }
    }
    config
}

/// Writes `homeserver.yaml`, `log.yaml` and `signing.key` into `dir`.
fn write_config(dir: &Path, port: u16, shared_secret: &str) -> anyhow::Result<()> {
    let path = |name: &str| dir.join(name).to_string_lossy().into_owned();

    let signing_key = format!("ed25519 a_test {}\n", base64_unpadded(&random_bytes(32)?));
    fs::write(dir.join("signing.key"), signing_key).context("writing signing.key")?;

    let log_config = json!({
        "version": 1,
        "formatters": {
            "precise": { "format": "%(asctime)s - %(name)s - %(lineno)d - %(levelname)s - %(message)s" }
        },
        "handlers": {
            "file": {
                "class": "logging.FileHandler",
                "formatter": "precise",
                "filename": path("homeserver.log"),
                "encoding": "utf8"
            }
        },
        "root": { "level": "WARNING", "handlers": ["file"] },
        "disable_existing_loggers": false
    });
    fs::write(
        dir.join("log.yaml"),
        serde_json::to_string_pretty(&log_config)?,
    )
    .context("writing log.yaml")?;

    let mut config = json!({
        "server_name": SERVER_NAME,
        "public_baseurl": format!("http://127.0.0.1:{port}/"),
        "pid_file": path("homeserver.pid"),
        "listeners": [{
            "port": port,
            "bind_addresses": ["127.0.0.1"],
            "type": "http",
            "tls": false,
            "x_forwarded": false,
            "resources": [{ "names": ["client"], "compress": false }]
        }],
        "database": { "name": "sqlite3", "args": { "database": path("homeserver.db") } },
        "log_config": path("log.yaml"),
        "media_store_path": path("media_store"),
        "signing_key_path": path("signing.key"),
        "registration_shared_secret": shared_secret,
        "enable_registration": false,
        "report_stats": false,
        "macaroon_secret_key": random_hex(32)?,
        "form_secret": random_hex(32)?,
        "trusted_key_servers": [],
        "suppress_key_server_warning": true,
        "presence": { "enabled": false },
        "bcrypt_rounds": 4,
    });
    config
        .as_object_mut()
        .expect("config is an object")
        .extend(rate_limit_config());
    // JSON is YAML: Synapse reads this with its YAML loader.
    fs::write(
        dir.join("homeserver.yaml"),
        serde_json::to_string_pretty(&config)?,
    )
    .context("writing homeserver.yaml")?;
    Ok(())
}
