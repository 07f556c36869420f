//! A session's lifecycle and configuration: opening one (`session/resume`, else `session/load`,
//! else `session/new`), closing it (`session/close`), what goes with every opening (MCP servers,
//! additional directories), and the session config options the agent offers (model, mode, …),
//! set with `session/set_config_option`.

use agent_client_protocol::v1::schema::{
    CloseSessionRequest, EnvVariable, HttpHeader, McpServer, McpServerHttp, McpServerStdio,
    ResumeSessionRequest, SessionConfigKind, SessionConfigOption, SessionConfigOptionCategory,
    SessionConfigOptionValue, SessionConfigSelectOptions, SetSessionConfigOptionRequest,
};
use serde::{Deserialize, Serialize};

pub use crate::config::{McpServerSpec, MASK};

use super::modes::SessionModes;
use super::*;

/// How long `session/close` may take before the agent is stopped anyway.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// The ACP form of an MCP server.
fn mcp_to_acp(spec: &McpServerSpec) -> McpServer {
    match (&spec.command, &spec.url) {
        (_, Some(url)) => McpServer::Http(
            McpServerHttp::new(spec.name.clone(), url.clone()).headers(
                spec.headers
                    .iter()
                    .map(|(k, v)| HttpHeader::new(k.clone(), v.clone()))
                    .collect(),
            ),
        ),
        (command, None) => McpServer::Stdio(
            McpServerStdio::new(spec.name.clone(), command.clone().unwrap_or_default())
                .args(spec.args.clone())
                .env(
                    spec.env
                        .iter()
                        .map(|(k, v)| EnvVariable::new(k.clone(), v.clone()))
                        .collect(),
                ),
        ),
    }
}

/// What goes with every session the process opens.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionSetup {
    pub mcp_servers: Vec<McpServerSpec>,
    /// More workspace roots besides the session's `cwd` (absolute paths).
    pub additional_directories: Vec<PathBuf>,
}

/// The method a session was opened with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum OpenedWith {
    #[serde(rename = "session/resume")]
    Resume,
    #[serde(rename = "session/load")]
    Load,
    #[serde(rename = "session/new")]
    New,
}

impl OpenedWith {
    pub fn method(self) -> &'static str {
        match self {
            OpenedWith::Resume => "session/resume",
            OpenedWith::Load => "session/load",
            OpenedWith::New => "session/new",
        }
    }

    /// The conversation went on (resumed or loaded) rather than starting anew.
    pub fn continued(self) -> bool {
        self != OpenedWith::New
    }
}

/// An opened session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opened {
    pub id: String,
    pub with: OpenedWith,
    /// Why the stored session was not continued, when it was not.
    pub fallback: Option<String>,
}

/// One of a session's config options, as the agent offers it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ConfigOptionInfo {
    pub id: String,
    pub name: String,
    /// `mode`, `model`, `model_config`, `thought_level` or the agent's own word.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub category: Option<String>,
    /// `select` or `boolean`.
    pub kind: String,
    pub current: String,
    /// The values it takes (`true`/`false` for a boolean).
    pub values: Vec<String>,
}

impl ConfigOptionInfo {
    fn from_acp(o: &SessionConfigOption) -> Option<Self> {
        let category = o.category.as_ref().map(|c| match c {
            SessionConfigOptionCategory::Mode => "mode".to_string(),
            SessionConfigOptionCategory::Model => "model".to_string(),
            SessionConfigOptionCategory::ModelConfig => "model_config".to_string(),
            SessionConfigOptionCategory::ThoughtLevel => "thought_level".to_string(),
            SessionConfigOptionCategory::Other(s) => s.clone(),
            _ => "other".to_string(),
        });
        let (kind, current, values) = match &o.kind {
            SessionConfigKind::Select(s) => {
                let values = match &s.options {
                    SessionConfigSelectOptions::Ungrouped(list) => {
                        list.iter().map(|v| v.value.to_string()).collect()
                    }
                    SessionConfigSelectOptions::Grouped(groups) => groups
                        .iter()
                        .flat_map(|g| g.options.iter().map(|v| v.value.to_string()))
                        .collect(),
                    _ => Vec::new(),
                };
                ("select", s.current_value.to_string(), values)
            }
            SessionConfigKind::Boolean(b) => (
                "boolean",
                b.current_value.to_string(),
                vec!["true".into(), "false".into()],
            ),
            _ => return None,
        };
        Some(ConfigOptionInfo {
            id: o.id.to_string(),
            name: o.name.clone(),
            category,
            kind: kind.into(),
            current,
            values,
        })
    }

    /// Whether `key` names this option: its id, or its category (`model=…` for an option of
    /// category `model` whatever its id).
    pub fn is_named(&self, key: &str) -> bool {
        self.id == key || self.category.as_deref() == Some(key)
    }

    /// The value as the agent takes it; an error naming the values it offers.
    pub fn value_for(&self, value: &str) -> Result<SessionConfigOptionValue, String> {
        if self.kind == "boolean" {
            return match value {
                "true" | "on" | "yes" => Ok(SessionConfigOptionValue::boolean(true)),
                "false" | "off" | "no" => Ok(SessionConfigOptionValue::boolean(false)),
                _ => Err(format!(
                    "option {}: {value:?} is not true or false",
                    self.id
                )),
            };
        }
        if self.values.iter().any(|v| v == value) {
            Ok(SessionConfigOptionValue::value_id(value.to_string()))
        } else {
            Err(format!(
                "option {} has no value {value:?} (values: {})",
                self.id,
                self.values.join(", ")
            ))
        }
    }
}

/// Finds the option `key` names among `options`, or says which there are.
pub fn find_option<'a>(
    options: &'a [ConfigOptionInfo],
    key: &str,
) -> Result<&'a ConfigOptionInfo, String> {
    options
        .iter()
        .find(|o| o.id == key)
        .or_else(|| options.iter().find(|o| o.is_named(key)))
        .ok_or_else(|| {
            if options.is_empty() {
                format!("the agent offers no option {key:?} (it offers no options)")
            } else {
                format!(
                    "the agent offers no option {key:?} (options: {})",
                    options
                        .iter()
                        .map(|o| o.id.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            }
        })
}

/// Checks `key=value` settings against what the agent offers.
pub fn check_options(
    options: &[ConfigOptionInfo],
    wanted: &std::collections::BTreeMap<String, String>,
) -> Result<(), String> {
    for (k, v) in wanted {
        find_option(options, k)?.value_for(v)?;
    }
    Ok(())
}

impl Shared {
    pub(super) fn remember_options(&self, session: &str, options: Option<&[SessionConfigOption]>) {
        let list: Vec<ConfigOptionInfo> = options
            .unwrap_or_default()
            .iter()
            .filter_map(ConfigOptionInfo::from_acp)
            .collect();
        self.options
            .lock()
            .unwrap()
            .insert(session.to_string(), list);
    }

    /// Notes a `config_option_update` for `session`.
    pub(super) fn note_options_update(&self, session: &str, update: &SessionUpdate) {
        if let SessionUpdate::ConfigOptionUpdate(u) = update {
            self.remember_options(session, Some(&u.config_options));
        }
    }
}

impl AgentProcess {
    /// Sets what goes with every session this process opens from now on.
    pub fn set_session_setup(&mut self, setup: SessionSetup) {
        self.setup = setup;
    }

    /// What goes with every session this process opens.
    pub fn session_setup(&self) -> &SessionSetup {
        &self.setup
    }

    /// Whether the agent advertised `sessionCapabilities.resume`.
    pub fn supports_resume(&self) -> bool {
        self.init
            .agent_capabilities
            .session_capabilities
            .resume
            .is_some()
    }

    /// Whether the agent advertised `sessionCapabilities.close`.
    pub fn supports_close(&self) -> bool {
        self.init
            .agent_capabilities
            .session_capabilities
            .close
            .is_some()
    }

    /// Refuses a setup the agent did not say it takes (an HTTP MCP server, more
    /// directories), rather than leaving it out silently.
    pub fn check_setup(&self) -> Result<(), AcpError> {
        let caps = &self.init.agent_capabilities;
        if let Some(s) = self.setup.mcp_servers.iter().find(|s| s.url.is_some()) {
            if !caps.mcp_capabilities.http {
                return Err(AcpError::InvalidSpec(format!(
                    "the agent does not take HTTP MCP servers (mcpCapabilities.http), so MCP \
                     server {:?} cannot be given to it",
                    s.name
                )));
            }
        }
        if !self.setup.additional_directories.is_empty()
            && caps.session_capabilities.additional_directories.is_none()
        {
            return Err(AcpError::InvalidSpec(
                "the agent does not take additional directories \
                 (sessionCapabilities.additionalDirectories)"
                    .into(),
            ));
        }
        Ok(())
    }

    pub(super) fn mcp_servers(&self) -> Vec<McpServer> {
        self.setup.mcp_servers.iter().map(mcp_to_acp).collect()
    }

    /// Opens the stored session `stored` the cheapest way the agent offers: `session/resume`
    /// (no history replayed), else `session/load`; when that fails (or there is none), a new
    /// session. Each try is bounded by the session timeout, so an agent that never answers
    /// does not hold the channel.
    pub async fn open_session(&self, stored: Option<&str>) -> Result<Opened, AcpError> {
        self.check_setup()?;
        let mut fallback = None;
        if let Some(id) = stored {
            let tries: &[OpenedWith] = match (self.supports_resume(), self.supports_load_session())
            {
                (true, true) => &[OpenedWith::Resume, OpenedWith::Load],
                (true, false) => &[OpenedWith::Resume],
                (false, true) => &[OpenedWith::Load],
                (false, false) => &[],
            };
            for with in tries {
                let tried = match with {
                    OpenedWith::Resume => self.resume_session(id).await,
                    _ => self.load_session(id).await,
                };
                match tried {
                    Ok(()) => {
                        return Ok(Opened {
                            id: id.to_string(),
                            with: *with,
                            fallback,
                        })
                    }
                    Err(e) if self.has_exited() => return Err(e),
                    Err(e) => {
                        tracing::warn!(pid = self.pid, session = %id, method = with.method(), error = %e, "cannot continue the stored session");
                        fallback = Some(format!("{} failed: {e}", with.method()));
                    }
                }
            }
            if tries.is_empty() {
                fallback = Some("the agent can neither resume nor load a session".into());
            }
        }
        let id = self.new_session().await?;
        Ok(Opened {
            id,
            with: OpenedWith::New,
            fallback,
        })
    }

    /// `session/resume`: continues a session without replaying its history.
    pub async fn resume_session(&self, id: &str) -> Result<(), AcpError> {
        if !self.supports_resume() {
            return Err(AcpError::Unsupported("session/resume".into()));
        }
        let resp = self
            .request(
                "session/resume",
                ResumeSessionRequest::new(SessionId::new(id), self.cwd.clone())
                    .mcp_servers(self.mcp_servers())
                    .additional_directories(self.setup.additional_directories.clone()),
                self.timeouts.load_session,
            )
            .await?;
        self.remember_modes(
            id,
            SessionModes::from_parts(resp.modes.as_ref(), resp.config_options.as_deref()),
        );
        self.shared
            .remember_options(id, resp.config_options.as_deref());
        Ok(())
    }

    /// `session/close`, when the agent offers it, bounded by [`CLOSE_TIMEOUT`]. Returns
    /// whether the agent closed it; a failure is logged (the agent is usually stopped next).
    pub async fn close_session(&self, id: &str) -> bool {
        if !self.supports_close() || self.has_exited() {
            return false;
        }
        match self
            .request(
                "session/close",
                CloseSessionRequest::new(SessionId::new(id)),
                CLOSE_TIMEOUT,
            )
            .await
        {
            Ok(_) => {
                self.shared.options.lock().unwrap().remove(id);
                self.shared.modes.lock().unwrap().remove(id);
                true
            }
            Err(e) => {
                tracing::warn!(pid = self.pid, session = %id, error = %e, "session/close failed");
                false
            }
        }
    }

    /// The config options `session` offers, as last reported by the agent.
    pub fn session_options(&self, session: &str) -> Vec<ConfigOptionInfo> {
        self.shared
            .options
            .lock()
            .unwrap()
            .get(session)
            .cloned()
            .unwrap_or_default()
    }

    /// Sets option `key` (an id or a category) of `session` to `value` with
    /// `session/set_config_option`, unless it already has it. Returns the option's id and
    /// whether it changed.
    pub async fn set_config_option(
        &self,
        session: &str,
        key: &str,
        value: &str,
    ) -> Result<(String, bool), AcpError> {
        let options = self.session_options(session);
        let option = find_option(&options, key).map_err(AcpError::InvalidSpec)?;
        let typed = option.value_for(value).map_err(AcpError::InvalidSpec)?;
        if option.current == value
            || (option.kind == "boolean"
                && typed.as_bool().map(|b| b.to_string()) == Some(option.current.clone()))
        {
            return Ok((option.id.clone(), false));
        }
        let resp = self
            .request(
                "session/set_config_option",
                SetSessionConfigOptionRequest::new(
                    SessionId::new(session),
                    option.id.clone(),
                    typed,
                ),
                self.timeouts.new_session,
            )
            .await?;
        self.shared
            .remember_options(session, Some(&resp.config_options));
        self.remember_modes(
            session,
            SessionModes::from_parts(None, Some(&resp.config_options))
                .or_else(|| self.session_modes(session)),
        );
        Ok((option.id.clone(), true))
    }
}
