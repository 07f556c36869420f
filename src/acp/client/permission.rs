//! Answering the agent's `session/request_permission` by the channel's policy.

use super::*;

impl Shared {
    pub(super) async fn decide_permission(
        &self,
        req: &RequestPermissionRequest,
    ) -> RequestPermissionResponse {
        let preferred: &[PermissionOptionKind] = match self.policy {
            PermissionPolicy::Allow => &[
                PermissionOptionKind::AllowOnce,
                PermissionOptionKind::AllowAlways,
            ],
            PermissionPolicy::Deny => &[
                PermissionOptionKind::RejectOnce,
                PermissionOptionKind::RejectAlways,
            ],
        };
        let chosen = preferred
            .iter()
            .find_map(|kind| req.options.iter().find(|o| o.kind == *kind));
        let options: Vec<Value> = req
            .options
            .iter()
            .map(|o| json!({ "id": o.option_id.to_string(), "name": o.name, "kind": enum_str(&o.kind) }))
            .collect();
        let policy = match self.policy {
            PermissionPolicy::Allow => "allow",
            PermissionPolicy::Deny => "deny",
        };
        let tool_call = serde_json::to_value(&req.tool_call).unwrap_or(Value::Null);
        let (event, response) = match chosen {
            Some(option) => (
                AgentEvent::new(
                    EventKind::Permission.as_str(),
                    Some(option.option_id.to_string()),
                    json!({
                        "policy": policy,
                        "outcome": "selected",
                        "optionId": option.option_id.to_string(),
                        "optionKind": enum_str(&option.kind),
                        "options": options,
                        "toolCall": tool_call,
                    }),
                ),
                RequestPermissionResponse::new(RequestPermissionOutcome::Selected(
                    SelectedPermissionOutcome::new(option.option_id.clone()),
                )),
            ),
            None => (
                AgentEvent::new(
                    EventKind::Permission.as_str(),
                    Some("cancelled".to_string()),
                    json!({
                        "policy": policy,
                        "outcome": "cancelled",
                        "optionId": null,
                        "optionKind": null,
                        "options": options,
                        "toolCall": tool_call,
                    }),
                ),
                RequestPermissionResponse::new(RequestPermissionOutcome::Cancelled),
            ),
        };
        self.emit(&req.session_id.0, event).await;
        response
    }
}
