//! Mapping what the agent sends (`session/update` notifications, including ones that do not
//! match the ACP schema) to [`AgentEvent`]s; see the table in the parent module.

use super::*;

/// Everything the agent sends during a prompt, in order. `kind` is a short
/// stable string (see the module docs for the list); `text` is the human text
/// if any; `data` is JSON detail.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentEvent {
    pub kind: String,
    pub text: Option<String>,
    pub data: Value,
}

impl AgentEvent {
    pub(super) fn new(kind: &str, text: Option<String>, data: Value) -> Self {
        Self {
            kind: kind.to_string(),
            text,
            data,
        }
    }
}

/// Serialises a unit enum to its wire string (`"allow_once"`).
pub(super) fn enum_str<T: serde::Serialize>(value: &T) -> Value {
    serde_json::to_value(value).unwrap_or(Value::Null)
}

pub(super) fn block_text(block: &ContentBlock) -> Option<String> {
    match block {
        ContentBlock::Text(t) => Some(t.text.clone()),
        ContentBlock::ResourceLink(l) => Some(l.uri.clone()),
        _ => None,
    }
}

/// `session/update` with its params kept as JSON. The SDK's typed
/// `SessionNotification` handler drops a notification whose params fail to
/// deserialise (with only a trace-level log); this type always parses, and
/// [`Shared::on_update`] does the typed parse itself.
#[derive(Debug, Clone)]
pub(super) struct RawSessionUpdate(pub(super) Value);

const SESSION_UPDATE: &str = "session/update";

impl JsonRpcMessage for RawSessionUpdate {
    fn matches_method(method: &str) -> bool {
        method == SESSION_UPDATE
    }

    fn method(&self) -> &str {
        SESSION_UPDATE
    }

    fn to_untyped_message(&self) -> Result<UntypedMessage, agent_client_protocol::Error> {
        UntypedMessage::new(SESSION_UPDATE, &self.0)
    }

    fn parse_message(method: &str, params: &Value) -> Result<Self, agent_client_protocol::Error> {
        if method != SESSION_UPDATE {
            return Err(agent_client_protocol::Error::method_not_found());
        }
        Ok(Self(params.clone()))
    }
}

impl JsonRpcNotification for RawSessionUpdate {}

/// The event kind for a `sessionUpdate` wire tag (the tag itself when unknown).
fn kind_for_tag(tag: &str) -> &str {
    match tag {
        "agent_message_chunk" => EventKind::Message.as_str(),
        "agent_thought_chunk" => EventKind::Thought.as_str(),
        "user_message_chunk" => EventKind::UserMessage.as_str(),
        "available_commands_update" => EventKind::Commands.as_str(),
        "current_mode_update" => EventKind::Mode.as_str(),
        "usage_update" => EventKind::Usage.as_str(),
        "config_option_update" => EventKind::Config.as_str(),
        "session_info_update" => EventKind::SessionInfo.as_str(),
        other => other,
    }
}

/// Maps the raw JSON of an update that failed schema parsing to an
/// [`AgentEvent`]: kind from the `sessionUpdate` tag, text from
/// `content.text` or `title` when present, data = the update plus
/// `parseError`.
pub fn raw_update_event(update: &Value, error: &str) -> AgentEvent {
    let tag = update
        .get("sessionUpdate")
        .and_then(Value::as_str)
        .unwrap_or("other");
    let text = update
        .pointer("/content/text")
        .or_else(|| update.get("title"))
        .and_then(Value::as_str)
        .map(str::to_string);
    let mut data = update.clone();
    if let Value::Object(map) = &mut data {
        map.insert("parseError".into(), error.into());
    } else {
        data = json!({ "update": update, "parseError": error });
    }
    AgentEvent::new(kind_for_tag(tag), text, data)
}

/// Maps one `session/update` to an [`AgentEvent`].
pub fn update_event(update: &SessionUpdate) -> AgentEvent {
    let mut data = serde_json::to_value(update).unwrap_or(Value::Null);
    let (kind, text): (String, Option<String>) = match update {
        SessionUpdate::AgentMessageChunk(c) => {
            (EventKind::Message.as_str().into(), block_text(&c.content))
        }
        SessionUpdate::AgentThoughtChunk(c) => {
            (EventKind::Thought.as_str().into(), block_text(&c.content))
        }
        SessionUpdate::UserMessageChunk(c) => (
            EventKind::UserMessage.as_str().into(),
            block_text(&c.content),
        ),
        SessionUpdate::ToolCall(tc) => {
            if let Value::Object(map) = &mut data {
                map.insert("id".into(), tc.tool_call_id.to_string().into());
                map.insert("title".into(), tc.title.clone().into());
                map.insert("kind".into(), enum_str(&tc.kind));
                map.insert("status".into(), enum_str(&tc.status));
            }
            (EventKind::ToolCall.as_str().into(), Some(tc.title.clone()))
        }
        SessionUpdate::ToolCallUpdate(u) => {
            if let Value::Object(map) = &mut data {
                map.insert("id".into(), u.tool_call_id.to_string().into());
                if let Some(title) = &u.fields.title {
                    map.insert("title".into(), title.clone().into());
                }
                if let Some(kind) = &u.fields.kind {
                    map.insert("kind".into(), enum_str(kind));
                }
                if let Some(status) = &u.fields.status {
                    map.insert("status".into(), enum_str(status));
                }
            }
            (
                EventKind::ToolCallUpdate.as_str().into(),
                u.fields.title.clone(),
            )
        }
        SessionUpdate::Plan(p) => (
            "plan".into(),
            Some(
                p.entries
                    .iter()
                    .map(|e| e.content.as_str())
                    .collect::<Vec<_>>()
                    .join("\n"),
            ),
        ),
        SessionUpdate::AvailableCommandsUpdate(c) => (
            "commands".into(),
            Some(
                c.available_commands
                    .iter()
                    .map(|c| c.name.as_str())
                    .collect::<Vec<_>>()
                    .join(" "),
            ),
        ),
        SessionUpdate::CurrentModeUpdate(m) => (
            EventKind::Mode.as_str().into(),
            Some(m.current_mode_id.to_string()),
        ),
        SessionUpdate::UsageUpdate(_) => (EventKind::Usage.as_str().into(), None),
        SessionUpdate::ConfigOptionUpdate(_) => (EventKind::Config.as_str().into(), None),
        SessionUpdate::SessionInfoUpdate(_) => (EventKind::SessionInfo.as_str().into(), None),
        _ => (
            data.get("sessionUpdate")
                .and_then(Value::as_str)
                .unwrap_or("other")
                .to_string(),
            None,
        ),
    };
    AgentEvent { kind, text, data }
}
