//! Session modes: which permission mode a session runs in, and putting it in one where the
//! agent asks the client (gorp) before it uses a tool.
//!
//! Agents advertise modes in two ways, both read here: the `modes` of `session/new` /
//! `session/load` (changed with `session/set_mode`) and a session config option of category
//! `mode` (changed with `session/set_config_option`). When an agent offers both, the config
//! option is used, as ACP asks of clients. `current_mode_update` and `config_option_update`
//! notifications keep the current mode known between prompts.

use agent_client_protocol::v1::schema::{
    LoadSessionResponse, NewSessionResponse, SessionConfigKind, SessionConfigOption,
    SessionConfigOptionCategory, SessionConfigOptionValue, SessionConfigSelectOptions,
    SessionModeState, SetSessionConfigOptionRequest, SetSessionModeRequest,
};

use super::*;

/// Mode ids, in order of preference, of modes in which the agent asks the client before it
/// edits a file or runs a command: Claude Code's and Gemini CLI's `default` ("Manual" /
/// "Prompts for approval": reads run freely, everything else asks) and Codex's `read-only`
/// (approval on request in a read-only sandbox: reads run freely, an edit or a command that
/// needs more than reading asks; Codex's `auto` runs commands that write the workspace
/// without asking).
pub const ASKING_MODES: &[&str] = &["default", "read-only"];

/// How a session's mode is changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModeControl {
    /// `session/set_mode`.
    SetMode,
    /// `session/set_config_option` on the config option with this id.
    ConfigOption(String),
}

impl ModeControl {
    /// The ACP method that changes the mode.
    pub fn method(&self) -> &'static str {
        match self {
            ModeControl::SetMode => "session/set_mode",
            ModeControl::ConfigOption(_) => "session/set_config_option",
        }
    }
}

/// The modes a session offers and the one it is in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionModes {
    pub current: String,
    pub available: Vec<String>,
    pub control: ModeControl,
}

impl SessionModes {
    pub(super) fn from_parts(
        modes: Option<&SessionModeState>,
        options: Option<&[SessionConfigOption]>,
    ) -> Option<Self> {
        if let Some(found) = options.and_then(mode_option) {
            return Some(found);
        }
        let modes = modes?;
        Some(SessionModes {
            current: modes.current_mode_id.to_string(),
            available: modes
                .available_modes
                .iter()
                .map(|m| m.id.to_string())
                .collect(),
            control: ModeControl::SetMode,
        })
    }

    pub(super) fn from_new(resp: &NewSessionResponse) -> Option<Self> {
        Self::from_parts(resp.modes.as_ref(), resp.config_options.as_deref())
    }

    pub(super) fn from_load(resp: &LoadSessionResponse) -> Option<Self> {
        Self::from_parts(resp.modes.as_ref(), resp.config_options.as_deref())
    }

    /// The mode gorp puts sessions in: `wanted` when given (it must be offered), else the
    /// first of [`ASKING_MODES`] the session offers.
    pub fn asking_mode(&self, wanted: Option<&str>) -> Option<String> {
        match wanted {
            Some(w) => self.available.iter().find(|m| *m == w).cloned(),
            None => ASKING_MODES
                .iter()
                .find(|m| self.available.iter().any(|a| a == *m))
                .map(|m| m.to_string()),
        }
    }
}

/// The select-type config option of category `mode`, if any.
fn mode_option(options: &[SessionConfigOption]) -> Option<SessionModes> {
    options.iter().find_map(|o| {
        if o.category != Some(SessionConfigOptionCategory::Mode) {
            return None;
        }
        let SessionConfigKind::Select(select) = &o.kind else {
            return None;
        };
        let available = match &select.options {
            SessionConfigSelectOptions::Ungrouped(list) => {
                list.iter().map(|v| v.value.to_string()).collect()
            }
            SessionConfigSelectOptions::Grouped(groups) => groups
                .iter()
                .flat_map(|g| g.options.iter().map(|v| v.value.to_string()))
                .collect(),
            _ => Vec::new(),
        };
        Some(SessionModes {
            current: select.current_value.to_string(),
            available,
            control: ModeControl::ConfigOption(o.id.to_string()),
        })
    })
}

impl Shared {
    /// Notes a `current_mode_update` / `config_option_update` for `session`.
    pub(super) fn note_mode_update(&self, session: &str, update: &SessionUpdate) {
        let mut modes = self.modes.lock().unwrap();
        let Some(known) = modes.get_mut(session) else {
            return;
        };
        match update {
            SessionUpdate::CurrentModeUpdate(m) => known.current = m.current_mode_id.to_string(),
            SessionUpdate::ConfigOptionUpdate(u) => {
                if let Some(found) = mode_option(&u.config_options) {
                    *known = found;
                }
            }
            _ => {}
        }
    }
}

impl AgentProcess {
    /// The modes `session` offers, as last reported by the agent; `None` when the agent
    /// advertised none for it.
    pub fn session_modes(&self, session: &str) -> Option<SessionModes> {
        self.shared.modes.lock().unwrap().get(session).cloned()
    }

    /// Puts `session` in `mode` (one it offers) with the method the agent advertised, and
    /// checks that the agent reports the new mode. Does nothing when it is already in it.
    pub async fn set_session_mode(&self, session: &str, mode: &str) -> Result<(), AcpError> {
        let Some(modes) = self.session_modes(session) else {
            return Err(AcpError::Unsupported("session modes".into()));
        };
        if modes.current == mode {
            return Ok(());
        }
        if !modes.available.iter().any(|m| m == mode) {
            return Err(AcpError::InvalidSpec(format!(
                "the agent offers no mode {mode:?} (modes: {})",
                modes.available.join(", ")
            )));
        }
        let timeout = self.timeouts.new_session;
        match &modes.control {
            ModeControl::SetMode => {
                self.request(
                    "session/set_mode",
                    SetSessionModeRequest::new(SessionId::new(session), mode.to_string()),
                    timeout,
                )
                .await?;
                let mut all = self.shared.modes.lock().unwrap();
                if let Some(known) = all.get_mut(session) {
                    known.current = mode.to_string();
                }
            }
            ModeControl::ConfigOption(id) => {
                let resp = self
                    .request(
                        "session/set_config_option",
                        SetSessionConfigOptionRequest::new(
                            SessionId::new(session),
                            id.clone(),
                            SessionConfigOptionValue::value_id(mode.to_string()),
                        ),
                        timeout,
                    )
                    .await?;
                let mut all = self.shared.modes.lock().unwrap();
                if let Some(found) = mode_option(&resp.config_options) {
                    all.insert(session.to_string(), found);
                }
            }
        }
        match self.session_modes(session) {
            Some(now) if now.current == mode => Ok(()),
            now => Err(AcpError::Rpc {
                op: modes.control.method().into(),
                code: 0,
                message: format!(
                    "the agent did not switch to mode {mode:?} (it reports {:?})",
                    now.map(|m| m.current)
                ),
                data: None,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mode_config_option_wins_over_modes() {
        let resp: NewSessionResponse = serde_json::from_value(json!({
            "sessionId": "s",
            "modes": { "currentModeId": "auto", "availableModes": [
                { "id": "auto", "name": "Auto" }, { "id": "default", "name": "Manual" } ] },
            "configOptions": [
                { "id": "model", "name": "Model", "category": "model", "type": "select",
                  "currentValue": "m", "options": [ { "value": "m", "name": "M" } ] },
                { "id": "mode", "name": "Mode", "category": "mode", "type": "select",
                  "currentValue": "auto", "options": [
                    { "value": "auto", "name": "Auto" }, { "value": "default", "name": "Manual" },
                    { "value": "plan", "name": "Plan" } ] }
            ]
        }))
        .unwrap();
        let modes = SessionModes::from_new(&resp).unwrap();
        assert_eq!(modes.control, ModeControl::ConfigOption("mode".into()));
        assert_eq!(modes.current, "auto");
        assert_eq!(modes.available, ["auto", "default", "plan"]);
        assert_eq!(modes.asking_mode(None).as_deref(), Some("default"));
        assert_eq!(modes.asking_mode(Some("plan")).as_deref(), Some("plan"));
        assert_eq!(modes.asking_mode(Some("nope")), None);
    }

    /// Codex (codex-acp 0.16) offers its approval presets; gorp picks `read-only`.
    #[test]
    fn codex_presets_ask_in_read_only() {
        let resp: NewSessionResponse = serde_json::from_value(json!({
            "sessionId": "s",
            "configOptions": [
                { "id": "mode", "name": "Approval Preset", "category": "mode", "type": "select",
                  "currentValue": "auto", "options": [
                    { "value": "read-only", "name": "Read Only" },
                    { "value": "auto", "name": "Default" },
                    { "value": "full-access", "name": "Full Access" } ] }
            ]
        }))
        .unwrap();
        let modes = SessionModes::from_new(&resp).unwrap();
        assert_eq!(modes.asking_mode(None).as_deref(), Some("read-only"));
    }

    #[test]
    fn modes_alone_and_no_modes() {
        let resp: NewSessionResponse = serde_json::from_value(json!({
            "sessionId": "s",
            "modes": { "currentModeId": "auto", "availableModes": [ { "id": "auto", "name": "A" } ] }
        }))
        .unwrap();
        let modes = SessionModes::from_new(&resp).unwrap();
        assert_eq!(modes.control, ModeControl::SetMode);
        assert_eq!(modes.asking_mode(None), None, "no asking mode offered");
        let bare: NewSessionResponse = serde_json::from_value(json!({ "sessionId": "s" })).unwrap();
        assert_eq!(SessionModes::from_new(&bare), None);
    }
}
