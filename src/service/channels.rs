//! Channels: create one with its workspace, rotate its webhook token, delete it.

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::acp::client::ConfigOptionInfo;
use crate::config::{Config, McpServerSpec};
use crate::store::{
    now_ms, validate_channel_name, Channel, NewChannel, PermissionPolicy, SandboxMode, Store,
    StoreError,
};

/// A channel to create. Unset fields take the defaults of `[acp]`.
#[derive(Debug, Clone, Default)]
pub struct NewChannelSpec {
    pub name: String,
    pub agent_binary: Option<String>,
    pub agent_args: Option<Vec<String>>,
    /// Default: `[acp] permission_policy`.
    pub permission_policy: Option<PermissionPolicy>,
    pub matrix_room_id: Option<String>,
    pub webhook_secret: Option<String>,
    pub webhook_template: Option<String>,
    /// Default: `[acp] sandbox`.
    pub sandbox: Option<SandboxMode>,
    /// Default: `[acp] allowed_ports`.
    pub allowed_ports: Option<Vec<u16>>,
}

/// Changes to a channel: each `Some` is set; for the sandbox and the ports, `Some(None)` goes
/// back to the config's.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Changes {
    pub permission_policy: Option<PermissionPolicy>,
    pub sandbox: Option<Option<SandboxMode>>,
    pub allowed_ports: Option<Option<Vec<u16>>>,
    /// The per-job cost budget (USD); `Some(None)`: `[budget] job_max_cost_usd`.
    pub budget_job_usd: Option<Option<f64>>,
    /// The per-job token budget; `Some(None)`: `[budget] job_max_tokens`.
    pub budget_job_tokens: Option<Option<i64>>,
    /// The daily budget (USD); `Some(None)`: `[budget] daily_max_cost_usd`.
    pub budget_day_usd: Option<Option<f64>>,
    /// The monthly budget (USD); `Some(None)`: `[budget] monthly_max_cost_usd`.
    pub budget_month_usd: Option<Option<f64>>,
    /// Whether its Matrix replies end with the usage footer.
    pub reply_footer: Option<bool>,
    /// The whole set of session config options (replaces the channel's).
    pub options: Option<BTreeMap<String, String>>,
    /// The whole list of MCP servers (replaces the channel's).
    pub mcp_servers: Option<Vec<McpServerSpec>>,
    /// The whole list of additional directories (replaces the channel's).
    pub additional_directories: Option<Vec<PathBuf>>,
}

/// A channel's session config options: what is set, and what its agent offers.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct OptionsView {
    pub channel: String,
    /// Set for the channel: option id (or category) → value.
    pub set: BTreeMap<String, String>,
    /// What the agent offered when its session last opened, with the values it had then;
    /// `null` when the channel's agent has not run yet (`gorp warm <channel>` starts it).
    pub offered: Option<Vec<ConfigOptionInfo>>,
    /// The agent's name and version, capabilities and auth methods as it said at that start.
    #[schema(value_type = Option<Object>)]
    pub agent: Option<serde_json::Value>,
}

impl OptionsView {
    /// The value the channel sets for offered option `o` (by its id or its category).
    pub fn set_for(&self, o: &ConfigOptionInfo) -> Option<&str> {
        self.set
            .iter()
            .find(|(k, _)| o.is_named(k))
            .map(|(_, v)| v.as_str())
    }

    /// What the channel sets that names no option the agent offered (all of it before the
    /// agent's first start).
    pub fn set_elsewhere(&self) -> Vec<(&str, &str)> {
        self.set
            .iter()
            .filter(|(k, _)| {
                self.offered
                    .as_ref()
                    .is_none_or(|l| !l.iter().any(|o| o.is_named(k)))
            })
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect()
    }
}

/// The options view of `channel`.
pub async fn options_view(store: &Store, channel: &Channel) -> Result<OptionsView, StoreError> {
    let info: Option<serde_json::Value> = store
        .warm_get(channel.id)
        .await?
        .and_then(|r| r.agent_info)
        .and_then(|i| serde_json::from_str(&i).ok());
    let offered = info
        .as_ref()
        .and_then(|v| serde_json::from_value(v.get("options")?.clone()).ok());
    let agent = info.map(|mut v| {
        if let Some(o) = v.as_object_mut() {
            o.remove("options");
        }
        v
    });
    Ok(OptionsView {
        channel: channel.name.clone(),
        set: channel.options(),
        offered,
        agent,
    })
}

/// The config options the channel's agent offered when its session last opened (`None` when it
/// has not run yet).
pub async fn offered_options(
    store: &Store,
    channel_id: i64,
) -> Result<Option<Vec<ConfigOptionInfo>>, StoreError> {
    let Some(row) = store.warm_get(channel_id).await? else {
        return Ok(None);
    };
    Ok(row
        .agent_info
        .as_deref()
        .and_then(|i| serde_json::from_str::<serde_json::Value>(i).ok())
        .and_then(|v| serde_json::from_value(v.get("options")?.clone()).ok()))
}

/// Checks options as text and, when the channel's agent has reported what it offers, against
/// that (an unknown option or value is refused; nothing is written).
pub async fn check_options(
    store: &Store,
    channel_id: i64,
    options: &BTreeMap<String, String>,
) -> Result<(), StoreError> {
    crate::store::validate_options(options).map_err(StoreError::Invalid)?;
    if let Some(offered) = offered_options(store, channel_id).await? {
        crate::acp::client::check_options(&offered, options).map_err(StoreError::Invalid)?;
    }
    Ok(())
}

/// A listing shows secrets as [`crate::config::MASK`]: a list read and sent back keeps the
/// stored value of each masked `env` or header value (of the server of the same name); a mask
/// with nothing stored behind it is refused rather than stored as the secret.
fn keep_masked_secrets(
    servers: &mut [McpServerSpec],
    stored: &[McpServerSpec],
) -> Result<(), StoreError> {
    for s in servers.iter_mut() {
        let old = stored.iter().find(|o| o.name == s.name);
        for (map, old_map, what) in [
            (&mut s.env, old.map(|o| &o.env), "env"),
            (&mut s.headers, old.map(|o| &o.headers), "header"),
        ] {
            for (k, v) in map.iter_mut() {
                if v != crate::config::MASK {
                    continue;
                }
                match old_map.and_then(|m| m.get(k)) {
                    Some(real) => *v = real.clone(),
                    None => {
                        return Err(StoreError::Invalid(format!(
                            "MCP server {}: {what} {k} is {:?}, the mask shown in place of a \
                             secret; send its real value",
                            s.name,
                            crate::config::MASK
                        )))
                    }
                }
            }
        }
    }
    Ok(())
}

/// Refuses MCP servers that are malformed or share a name.
pub fn check_mcp_servers(servers: &[McpServerSpec]) -> Result<(), StoreError> {
    let mut names = std::collections::HashSet::new();
    for s in servers {
        s.validate().map_err(StoreError::Invalid)?;
        if !names.insert(s.name.as_str()) {
            return Err(StoreError::Invalid(format!(
                "two MCP servers are named {:?}",
                s.name
            )));
        }
    }
    if servers.len() > 32 {
        return Err(StoreError::Invalid("at most 32 MCP servers".into()));
    }
    Ok(())
}

/// Refuses a directory that is relative, missing or not a directory; returns the canonical
/// paths.
pub fn check_directories(dirs: &[PathBuf]) -> Result<Vec<PathBuf>, StoreError> {
    if dirs.len() > 32 {
        return Err(StoreError::Invalid(
            "at most 32 additional directories".into(),
        ));
    }
    dirs.iter()
        .map(|d| {
            if !d.is_absolute() {
                return Err(StoreError::Invalid(format!(
                    "additional directory {}: must be an absolute path",
                    d.display()
                )));
            }
            match std::fs::canonicalize(d) {
                Ok(c) if c.is_dir() => Ok(c),
                Ok(_) => Err(StoreError::Invalid(format!(
                    "additional directory {}: not a directory",
                    d.display()
                ))),
                Err(e) => Err(StoreError::Invalid(format!(
                    "additional directory {}: {e}",
                    d.display()
                ))),
            }
        })
        .collect()
}

/// Refuses a budget that is negative, not a number, or absurd (nothing is written).
pub fn check_budget(usd: Option<f64>, tokens: Option<i64>) -> Result<(), StoreError> {
    if usd.is_some_and(|c| !c.is_finite() || !(0.0..=1e6).contains(&c)) {
        return Err(StoreError::Invalid(
            "a cost budget is a number of USD from 0 to 1000000".into(),
        ));
    }
    if tokens.is_some_and(|t| t < 1) {
        return Err(StoreError::Invalid(
            "a token budget is a whole number, 1 or more".into(),
        ));
    }
    Ok(())
}

/// Refuses port 0 (nothing is written).
pub fn check_ports(ports: &[u16]) -> Result<(), StoreError> {
    if ports.contains(&0) {
        return Err(StoreError::Invalid(
            "allowed ports are TCP ports from 1 to 65535".into(),
        ));
    }
    Ok(())
}

/// A new channel and what its creator is shown once.
#[derive(Debug, Clone)]
pub struct Created {
    pub channel: Channel,
    pub workspace: PathBuf,
    /// The channel's own webhook bearer token (only its hash is stored).
    pub webhook_token: String,
}

impl Created {
    /// The webhook path (`/webhook/session/<id>`), relative to gorp's public URL.
    pub fn webhook_path(&self) -> String {
        webhook_path(&self.channel)
    }
}

/// The webhook path of a channel, relative to gorp's public URL.
pub fn webhook_path(channel: &Channel) -> String {
    format!("/webhook/session/{}", channel.webhook_id)
}

#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The workspace directory cannot be created (a problem of the machine).
    #[error("cannot create the workspace {path}: {error}")]
    Workspace { path: String, error: String },
}

/// Creates a channel: checks the name, makes its workspace directory, then inserts the row
/// with a new webhook token. A name that is invalid or taken writes nothing (an existing
/// channel's workspace is left as it is).
pub async fn create(
    store: &Store,
    config: &Config,
    spec: NewChannelSpec,
) -> Result<Created, ChannelError> {
    validate_channel_name(&spec.name).map_err(StoreError::Invalid)?;
    if let Some(p) = &spec.allowed_ports {
        check_ports(p)?;
    }
    let workspace = config.channel_dir(&spec.name);
    let made = !workspace.exists();
    std::fs::create_dir_all(&workspace).map_err(|e| ChannelError::Workspace {
        path: workspace.display().to_string(),
        error: e.to_string(),
    })?;
    let token = crate::auth::new_token();
    let inserted = store
        .channel_insert(
            NewChannel {
                name: spec.name,
                agent_binary: spec.agent_binary,
                agent_args: spec.agent_args,
                permission_policy: Some(
                    spec.permission_policy
                        .unwrap_or(config.acp.permission_policy),
                ),
                matrix_room_id: spec.matrix_room_id,
                webhook_token: Some(token.clone()),
                webhook_secret: spec.webhook_secret,
                webhook_template: spec.webhook_template,
                sandbox: spec.sandbox,
                allowed_ports: spec.allowed_ports,
            },
            now_ms(),
        )
        .await;
    let channel = match inserted {
        Ok(c) => c,
        Err(e) => {
            // A directory made for a channel that was not created goes again (if still empty).
            if made {
                let _ = std::fs::remove_dir(&workspace);
            }
            return Err(e.into());
        }
    };
    Ok(Created {
        channel,
        workspace,
        webhook_token: token,
    })
}

/// Gives a channel a new webhook bearer token; the old one stops working at once. Returns the
/// channel and the new token (shown once).
pub async fn rotate_token(store: &Store, name: &str) -> Result<(Channel, String), StoreError> {
    let channel = store
        .channel_get(name)
        .await?
        .ok_or_else(|| StoreError::UnknownChannel(name.to_string()))?;
    let token = crate::auth::new_token();
    store.channel_set_webhook_token(channel.id, &token).await?;
    Ok((channel, token))
}

/// Sets a channel's permission policy (its next prompt runs under it); `None` when there is
/// no such channel.
pub async fn set_policy(
    store: &Store,
    name: &str,
    policy: PermissionPolicy,
) -> Result<Option<Channel>, StoreError> {
    if !store.channel_set_policy(name, policy).await? {
        return Ok(None);
    }
    store.channel_get(name).await
}

/// Applies `changes` to a channel, all in one write; `None` when there is no such channel. The sandbox and the
/// ports apply from the agent's next start (`gorp warm` shows the sandbox in force).
pub async fn update(
    store: &Store,
    name: &str,
    changes: Changes,
) -> Result<Option<Channel>, StoreError> {
    if let Some(Some(p)) = &changes.allowed_ports {
        check_ports(p)?;
    }
    check_budget(
        changes.budget_job_usd.flatten(),
        changes.budget_job_tokens.flatten(),
    )?;
    for usd in [changes.budget_day_usd, changes.budget_month_usd] {
        check_budget(usd.flatten(), None)?;
    }
    let mut changes = changes;
    // Options and MCP servers are checked against the channel as it is: one read for both.
    let current = if changes.options.is_some() || changes.mcp_servers.is_some() {
        match store.channel_get(name).await? {
            Some(ch) => Some(ch),
            None => return Ok(None),
        }
    } else {
        None
    };
    if let (Some(o), Some(ch)) = (&changes.options, &current) {
        check_options(store, ch.id, o).await?;
    }
    if let (Some(m), Some(ch)) = (changes.mcp_servers.as_mut(), &current) {
        let stored: Vec<McpServerSpec> = serde_json::from_str(&ch.mcp_servers).unwrap_or_default();
        keep_masked_secrets(m, &stored)?;
        check_mcp_servers(m)?;
    }
    let dirs = match &changes.additional_directories {
        Some(d) => Some(check_directories(d)?),
        None => None,
    };
    let update = crate::store::ChannelUpdate {
        permission_policy: changes.permission_policy,
        sandbox: changes.sandbox,
        allowed_ports: changes
            .allowed_ports
            .map(|p| p.map(|p| serde_json::to_string(&p).expect("ports serialise"))),
        budget_job_usd: changes.budget_job_usd,
        budget_job_tokens: changes.budget_job_tokens,
        budget_day_usd: changes.budget_day_usd,
        budget_month_usd: changes.budget_month_usd,
        reply_footer: changes.reply_footer,
        agent_options: changes
            .options
            .map(|o| serde_json::to_string(&o).expect("options serialise")),
        mcp_servers: changes
            .mcp_servers
            .map(|m| serde_json::to_string(&m).expect("servers serialise")),
        additional_directories: dirs.map(|d| serde_json::to_string(&d).expect("paths serialise")),
    };
    if !store.channel_update(name, update).await? {
        return Ok(None);
    }
    store.channel_get(name).await
}

/// Deletes a channel and its job history (its workspace stays). Refused while one of its jobs
/// is running.
pub async fn delete(store: &Store, name: &str) -> Result<(), StoreError> {
    store.channel_delete(name).await
}
