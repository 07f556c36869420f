//! `gorp::acp::client`: the mapping of `session/update` notifications to job events, from any
//! JSON, along the path the client takes: a typed `SessionNotification` goes through
//! `update_event`, one that does not parse through `raw_update_event`.
//!
//! Checks, besides not panicking: a raw event keeps the update (an object gains `parseError`,
//! anything else is wrapped) and takes its kind from `sessionUpdate`; a typed update gets the
//! same kind the raw mapping gives its JSON, so a kind never depends on which path an update
//! took; tool calls carry `id` and `title` in their data; kinds are never empty.
#![no_main]

use agent_client_protocol::v1::schema::{SessionNotification, SessionUpdate};
use gorp::acp::client::{raw_update_event, update_event};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let Ok(value) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    // Anything, as an update that failed schema parsing.
    check_raw(&value, "fuzz");
    if let Some(update) = value.get("update") {
        check_raw(update, "fuzz");
    }
    // The client's path: the whole params, then the update alone.
    match serde_json::from_value::<SessionNotification>(value.clone()) {
        Ok(note) => check_typed(&note.update),
        Err(e) => check_raw(&value["update"], &e.to_string()),
    }
    if let Ok(update) = serde_json::from_value::<SessionUpdate>(value) {
        check_typed(&update);
    }
});

fn check_raw(update: &Value, error: &str) {
    let event = raw_update_event(update, error);
    assert!(!event.kind.is_empty() || update["sessionUpdate"] == "");
    assert_eq!(event.data["parseError"], error);
    match update {
        Value::Object(map) => {
            for (k, v) in map {
                if k != "parseError" {
                    assert_eq!(&event.data[k], v);
                }
            }
        }
        _ => assert_eq!(&event.data["update"], update),
    }
    let tag = update.get("sessionUpdate").and_then(Value::as_str);
    if tag.is_none() {
        assert_eq!(event.kind, "other");
    }
    let text = update
        .pointer("/content/text")
        .or_else(|| update.get("title"))
        .and_then(Value::as_str);
    assert_eq!(event.text.as_deref(), text);
}

fn check_typed(update: &SessionUpdate) {
    let event = update_event(update);
    let wire = serde_json::to_value(update).unwrap_or(Value::Null);
    assert_eq!(event.kind, raw_update_event(&wire, "").kind, "{wire}");
    assert!(!event.kind.is_empty() || wire["sessionUpdate"] == "");
    match update {
        SessionUpdate::ToolCall(tc) => {
            assert_eq!(event.data["id"], tc.tool_call_id.to_string());
            assert_eq!(event.data["title"], tc.title.as_str());
            assert_eq!(event.text.as_deref(), Some(tc.title.as_str()));
        }
        SessionUpdate::ToolCallUpdate(u) => {
            assert_eq!(event.data["id"], u.tool_call_id.to_string());
            assert_eq!(event.text, u.fields.title);
        }
        _ => {}
    }
}
