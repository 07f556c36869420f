//! `gorp doctor`: what this machine and config can do, checked for real and read-only. The
//! kernel sandbox; every configured agent (found, its Node against what it needs, started and
//! asked to `initialize` and open a session: its name, version, capabilities and sign-in);
//! the database (migrations, writable); the Matrix homeserver and the bot's device; the HTTP
//! port. Each failure comes with a fix; the exit code is 1 when something is broken.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

use super::{out, sandbox_default, Cli, CmdResult, EXIT_ERROR, EXIT_OK};
use crate::acp::client::{install_hint, AgentProcess, AgentSpec, Timeouts};
use crate::config::Config;
use crate::store::{PermissionPolicy, Store};

/// How long doctor gives an agent to answer `initialize` and `session/new`, at most.
const AGENT_WAIT: Duration = Duration::from_secs(30);
/// How long the homeserver and a process on the HTTP port get to answer.
const NET_WAIT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
enum Status {
    Ok,
    Warn,
    Fail,
}

#[derive(Debug, Serialize)]
struct Check {
    check: String,
    status: Status,
    /// Not failed (a warning is ok).
    ok: bool,
    detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    fix: Option<String>,
}

#[derive(Default)]
struct Checks(Vec<Check>);

impl Checks {
    fn add(&mut self, check: &str, status: Status, detail: String, fix: Option<String>) {
        self.0.push(Check {
            check: check.into(),
            ok: status != Status::Fail,
            status,
            detail,
            fix,
        });
    }
    fn ok(&mut self, check: &str, detail: String) {
        self.add(check, Status::Ok, detail, None);
    }
    fn warn(&mut self, check: &str, detail: String, fix: Option<String>) {
        self.add(check, Status::Warn, detail, fix);
    }
    fn fail(&mut self, check: &str, detail: String, fix: String) {
        self.add(check, Status::Fail, detail, Some(fix));
    }
}

pub(super) async fn doctor(cli: &Cli, config: &Config) -> CmdResult {
    let mut c = Checks::default();
    let abi = sandbox(&mut c, config);
    let db = database(&mut c, config).await;
    let mut agents: Vec<(String, Vec<String>, String)> = vec![(
        config.acp.agent_binary.clone(),
        config.acp.agent_args.clone(),
        "[acp] agent_binary".into(),
    )];
    for (name, binary, args) in db.map(|d| d.channel_agents).unwrap_or_default() {
        let args: Vec<String> = match (&args, &binary) {
            (Some(json), _) => serde_json::from_str(json).unwrap_or_default(),
            (None, Some(_)) => Vec::new(),
            (None, None) => config.acp.agent_args.clone(),
        };
        let binary = binary.unwrap_or_else(|| config.acp.agent_binary.clone());
        if let Some(a) = agents
            .iter_mut()
            .find(|(b, a, _)| *b == binary && *a == args)
        {
            a.2.push_str(&format!(", channel {name}"));
        } else {
            agents.push((binary, args, format!("channel {name}")));
        }
    }
    for (binary, args, used_by) in &agents {
        agent(&mut c, config, binary, args, used_by).await;
    }
    for p in &config.acp.extra_writable {
        if p.exists() {
            c.ok("extra_writable", format!("{} exists", p.display()));
        } else {
            c.fail(
                "extra_writable",
                format!("{} does not exist", p.display()),
                "create it, or take it out of [acp] extra_writable".into(),
            );
        }
    }
    matrix(&mut c, config).await;
    http_port(&mut c, config).await;

    let ok = c.0.iter().all(|x| x.ok);
    out(
        cli,
        serde_json::json!({ "ok": ok, "landlock_abi": abi, "checks": c.0 }),
        || {
            let mut lines = Vec::new();
            for x in &c.0 {
                let status = match x.status {
                    Status::Ok => "ok",
                    Status::Warn => "warn",
                    Status::Fail => "FAIL",
                };
                lines.push(format!("{:<15} {:<4} {}", x.check, status, x.detail));
                if let Some(fix) = &x.fix {
                    lines.push(format!("{:<20} fix: {fix}", ""));
                }
            }
            lines.push(if ok {
                "everything gorp needs is in order".into()
            } else {
                format!(
                    "{} check(s) failed; each says how to fix it",
                    c.0.iter().filter(|x| !x.ok).count()
                )
            });
            lines.join("\n")
        },
    );
    Ok(if ok { EXIT_OK } else { EXIT_ERROR })
}

/// The kernel sandbox; returns the Landlock ABI.
fn sandbox(c: &mut Checks, config: &Config) -> i32 {
    let abi = crate::sandbox::kernel_abi();
    let asked = config.acp.sandbox == Some(crate::store::SandboxMode::Landlock);
    if abi > 0 {
        c.ok(
            "landlock",
            format!("the kernel supports Landlock ABI {abi}"),
        );
    } else if asked {
        c.fail(
            "landlock",
            "the kernel has no Landlock, and [acp] sandbox = \"landlock\": agents will not start"
                .into(),
            "run Linux 5.13 or newer with Landlock enabled at boot (lsm=…,landlock), or set \
             [acp] sandbox = \"none\" knowing agents then write anywhere gorp's user can"
                .into(),
        );
    } else {
        c.warn(
            "landlock",
            "the kernel has no Landlock: agents run without a sandbox".into(),
            Some("Linux 5.13 or newer with Landlock enabled at boot".into()),
        );
    }
    c.ok(
        "sandbox",
        format!(
            "[acp] sandbox = {} (channels may override it)",
            match config.acp.sandbox {
                Some(m) => m.to_string(),
                None => format!("unset: {}", sandbox_default(config)),
            }
        ),
    );
    if let Some(ports) = &config.acp.allowed_ports {
        if abi >= 4 {
            c.ok(
                "allowed_ports",
                format!("TCP connect limited to ports {ports:?}"),
            );
        } else {
            c.fail(
                "allowed_ports",
                format!("[acp] allowed_ports needs Landlock ABI 4; this kernel has {abi}: agents will not start"),
                "run Linux 6.7 or newer, or remove [acp] allowed_ports".into(),
            );
        }
    }
    abi
}

/// The database, read-only.
async fn database(c: &mut Checks, config: &Config) -> Option<crate::store::DatabaseReport> {
    let r = match Store::inspect(&config.database).await {
        Ok(r) => r,
        Err(e) => {
            c.fail(
                "database",
                format!("{} cannot be read: {e}", config.database.location()),
                match config.database.backend() {
                    crate::config::Backend::Sqlite => "check [database] path and its permissions".into(),
                    crate::config::Backend::Postgres => "check [database] url: the server, the role and its password, the database name".into(),
                },
            );
            return None;
        }
    };
    let path = format!("{} ({})", r.location, r.backend);
    if !r.exists {
        match &r.not_writable {
            None => c.ok(
                "database",
                format!("{path} does not exist yet; gorp creates it"),
            ),
            Some(why) => c.fail(
                "database",
                format!("{path} does not exist and cannot be created: {why}"),
                "make its directory writable for gorp's user, or set [database] path".into(),
            ),
        }
        return Some(r);
    }
    if !r.unknown.is_empty() {
        c.fail(
            "migrations",
            format!(
                "{path} was migrated by a newer gorp (versions {:?} are unknown to this one)",
                r.unknown
            ),
            "run the newer gorp, or restore the backup taken before the upgrade".into(),
        );
    } else if r.applied < r.known {
        c.warn(
            "migrations",
            format!(
                "{path}: {} of {} migrations applied; the rest run at the next start",
                r.applied, r.known
            ),
            Some("`gorp migrate` (after a backup) applies them now".into()),
        );
    } else {
        c.ok(
            "migrations",
            format!("{path}: all {} migrations applied", r.known),
        );
    }
    match &r.not_writable {
        None => c.ok(
            "db writable",
            format!("{path} and its directory are writable"),
        ),
        Some(why) => c.fail(
            "db writable",
            format!("gorp cannot write {why}"),
            "give gorp's user write access to the file and its directory (SQLite writes a -wal \
             file beside it)"
                .into(),
        ),
    }
    Some(r)
}

/// Finds `binary` as the agent's process would: a path, or a name on `PATH`.
fn find_binary(binary: &str, path_var: Option<&str>) -> Option<PathBuf> {
    if binary.contains('/') {
        return Path::new(binary).is_file().then(|| PathBuf::from(binary));
    }
    let path = path_var
        .map(std::ffi::OsString::from)
        .or_else(|| std::env::var_os("PATH"))?;
    std::env::split_paths(&path)
        .map(|d| d.join(binary))
        .find(|p| p.is_file())
}

/// The Node major version a script's npm package says it needs (`engines.node`), found in the
/// nearest `package.json` above the script.
fn node_needed(script: &Path) -> Option<(u32, String)> {
    let real = std::fs::canonicalize(script).ok()?;
    for dir in real.ancestors().skip(1) {
        let pkg = dir.join("package.json");
        if let Ok(text) = std::fs::read_to_string(&pkg) {
            let v: serde_json::Value = serde_json::from_str(&text).ok()?;
            let range = v.pointer("/engines/node")?.as_str()?.to_string();
            let major = range
                .trim_start_matches(|c: char| !c.is_ascii_digit())
                .split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()?;
            return Some((major, range));
        }
    }
    None
}

/// The agent: found, its Node, started, `initialize`, a session.
async fn agent(c: &mut Checks, config: &Config, binary: &str, args: &[String], used_by: &str) {
    let name = Path::new(binary)
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or(binary)
        .to_string();
    let check = "agent".to_string();
    let env_path = config.acp.env.get("PATH").map(String::as_str);
    let Some(found) = find_binary(binary, env_path) else {
        c.fail(
            &check,
            format!("{binary} ({used_by}) is not found (a path, or a program on PATH)"),
            install_hint(binary),
        );
        return;
    };
    // A Node script: is the Node on PATH new enough for its package?
    let head = std::fs::read(&found)
        .map(|b| b[..b.len().min(256)].to_vec())
        .unwrap_or_default();
    let shebang = String::from_utf8_lossy(&head)
        .lines()
        .next()
        .unwrap_or("")
        .to_string();
    // `#!/usr/bin/env node` (an npm bin): the node on PATH runs it. A wrapper that names its
    // own node is left alone.
    if shebang.starts_with("#!") && shebang.contains("node") {
        let node = find_binary("node", env_path);
        let version = match &node {
            Some(n) => tokio::process::Command::new(n)
                .arg("--version")
                .output()
                .await
                .ok()
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string()),
            None => None,
        };
        let major: Option<u32> = version
            .as_deref()
            .and_then(|v| v.trim_start_matches('v').split('.').next()?.parse().ok());
        match (version.as_deref(), major, node_needed(&found)) {
            (None, _, need) => c.fail(
                "node",
                format!("{name} is a Node script, but no node is on PATH"),
                format!(
                    "install Node {} (or the npm registry's `node` package) and put it on \
                     PATH, or on the agent's PATH with [acp] env PATH",
                    need.map(|(m, _)| format!("{m} or newer"))
                        .unwrap_or_default()
                ),
            ),
            (Some(v), Some(m), Some((need, range))) if m < need => c.fail(
                "node",
                format!("node {v} is older than {name} needs ({range})"),
                format!(
                    "install Node {need} or newer (e.g. `npm install node@{need}` in a directory \
                     of its own) and put its bin first on the agent's PATH ([acp] env PATH)"
                ),
            ),
            (Some(v), _, need) => c.ok(
                "node",
                format!(
                    "node {v}{}",
                    need.map(|(_, r)| format!(" ({name} needs {r})"))
                        .unwrap_or_default()
                ),
            ),
        }
    }
    let cwd = ScratchDir(std::env::temp_dir().join(format!(
        "gorp-doctor-{}-{}",
        std::process::id(),
        c.0.len()
    )));
    if let Err(e) = std::fs::create_dir_all(cwd.path()) {
        c.fail(
            &check,
            format!("no temporary directory: {e}"),
            "check TMPDIR".into(),
        );
        return;
    }
    let spec = AgentSpec {
        binary: binary.to_string(),
        args: args.to_vec(),
        cwd: cwd.path().to_path_buf(),
        env: config
            .acp
            .env
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        sandbox: crate::sandbox::Spec::none(),
    };
    let wait = |secs: u64| Duration::from_secs(secs).min(AGENT_WAIT);
    let timeouts = Timeouts {
        initialize: wait(config.acp.initialize_timeout_secs),
        new_session: wait(config.acp.session_timeout_secs),
        load_session: wait(config.acp.session_timeout_secs),
        prompt: AGENT_WAIT,
        stall: None,
    };
    let agent = match AgentProcess::spawn(
        &spec,
        timeouts,
        PermissionPolicy::Ask,
        cwd.path().to_path_buf(),
    )
    .await
    {
        Ok(a) => a,
        Err(e) => {
            c.fail(
                &check,
                format!("{binary} ({used_by}) does not start as an ACP agent: {e}"),
                format!("run it by hand to see why; {}", install_hint(binary)),
            );
            return;
        }
    };
    let init = agent.initialize_response();
    let caps = &init.agent_capabilities;
    let sc = &caps.session_capabilities;
    let mut can: Vec<&str> = Vec::new();
    for (yes, what) in [
        (caps.load_session, "load"),
        (sc.resume.is_some(), "resume"),
        (sc.close.is_some(), "close"),
        (sc.additional_directories.is_some(), "more directories"),
        (caps.prompt_capabilities.image, "images"),
        (caps.mcp_capabilities.http, "MCP over HTTP"),
    ] {
        if yes {
            can.push(what);
        }
    }
    let info = init
        .agent_info
        .as_ref()
        .map(|i| format!("{} {}", i.name, i.version))
        .unwrap_or_else(|| "an agent that gave no name".into());
    let auth: Vec<String> = init
        .auth_methods
        .iter()
        .map(|m| m.id().to_string())
        .collect();
    c.ok(
        &check,
        format!(
            "{info} ({used_by}) speaks ACP; sessions: {}; sign-in methods: {}",
            if can.is_empty() {
                "new only".to_string()
            } else {
                can.join(", ")
            },
            if auth.is_empty() {
                "none".to_string()
            } else {
                auth.join(", ")
            }
        ),
    );
    match agent.new_session().await {
        Ok(id) => {
            c.ok(
                "signed in",
                format!("{name} opens a session (signed in, or it needs no sign-in)"),
            );
            agent.close_session(&id).await;
        }
        Err(e) => {
            c.fail(
                "signed in",
                format!("{name} does not open a session: {e}"),
                format!(
                "read the agent's message above; when it wants credentials, give it an API key \
                 in [acp] env ({}), or its own login in a channel's agent home: `gorp channels \
                 login <channel> -- {binary} {}`",
                match name.as_str() {
                    n if n.contains("claude") => "ANTHROPIC_API_KEY",
                    n if n.contains("codex") => "OPENAI_API_KEY",
                    n if n.contains("gemini") => "GEMINI_API_KEY",
                    _ => "the key the agent documents",
                },
                if name.contains("claude") { "/login" } else { "login" }
            ),
            )
        }
    }
    agent.shutdown().await;
}

/// A directory removed when dropped: the agent's working directory while doctor asks it.
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The homeserver answers, and the bot's device.
async fn matrix(c: &mut Checks, config: &Config) {
    let Some(m) = &config.matrix else {
        c.ok("matrix", "[matrix] is not configured: no bot".into());
        return;
    };
    let url = format!(
        "{}/_matrix/client/versions",
        m.home_server.trim_end_matches('/')
    );
    let answer = match matrix_sdk::reqwest::Client::builder()
        .timeout(NET_WAIT)
        .build()
    {
        Ok(client) => client.get(&url).send().await,
        Err(e) => {
            c.fail("homeserver", format!("no HTTP client: {e}"), "—".into());
            return;
        }
    };
    match answer {
        Ok(r) if r.status().is_success() => {
            let versions = r
                .text()
                .await
                .ok()
                .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
                .and_then(|v| v["versions"].as_array().map(|a| a.len()))
                .unwrap_or(0);
            c.ok(
                "homeserver",
                format!("{} answers ({versions} spec versions)", m.home_server),
            );
        }
        Ok(r) => c.fail(
            "homeserver",
            format!("{url} answered {}", r.status()),
            "check [matrix] home_server: it is the client API's base URL".into(),
        ),
        Err(e) => c.fail(
            "homeserver",
            format!("{} cannot be reached: {e}", m.home_server),
            "check [matrix] home_server, DNS and the network; gorp runs without the bot until \
             it is back"
                .into(),
        ),
    }
    let session = m.state_dir.join("session.json");
    match std::fs::read_to_string(&session)
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
    {
        Some(s) => c.ok(
            "bot device",
            format!(
                "{} on device {} (from {})",
                s["user_id"].as_str().unwrap_or("?"),
                s["device_id"].as_str().unwrap_or("?"),
                session.display()
            ),
        ),
        None => c.warn(
            "bot device",
            format!(
                "no saved session in {}: the bot logs in as {} at the next start",
                session.display(),
                m.user_id
            ),
            None,
        ),
    }
}

/// The HTTP port is free, or a gorp already serves it.
async fn http_port(c: &mut Checks, config: &Config) {
    let w = &config.webhook;
    let addr = format!("{}:{}", w.bind, w.port);
    match tokio::net::TcpListener::bind(&addr).await {
        Ok(l) => {
            drop(l);
            c.ok("http port", format!("{addr} is free"));
        }
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            let host = if w.bind == "0.0.0.0" || w.bind == "::" {
                "127.0.0.1"
            } else {
                w.bind.as_str()
            };
            let probe = matrix_sdk::reqwest::Client::builder()
                .timeout(NET_WAIT)
                .build()
                .ok()
                .map(|client| {
                    client
                        .get(format!("http://{host}:{}/healthz", w.port))
                        .send()
                });
            let gorp = match probe {
                Some(f) => match f.await {
                    Ok(r) if r.status().is_success() => r
                        .text()
                        .await
                        .ok()
                        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
                        .is_some_and(|v| v["status"] == "ok"),
                    _ => false,
                },
                None => false,
            };
            if gorp {
                c.warn(
                    "http port",
                    format!("{addr} is served by a running gorp (its /healthz answers)"),
                    Some(
                        "fine if that is this service; a second gorp needs another [webhook] port"
                            .into(),
                    ),
                );
            } else {
                c.fail(
                    "http port",
                    format!("{addr} is in use by another program"),
                    "stop that program, or set [webhook] port (GORP_WEBHOOK_PORT) to a free one"
                        .into(),
                );
            }
        }
        Err(e) => c.fail(
            "http port",
            format!("cannot listen on {addr}: {e}"),
            "check [webhook] bind and port (a port below 1024 needs privileges)".into(),
        ),
    }
}
