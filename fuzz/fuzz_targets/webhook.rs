//! `gorp::http::webhook::decode_body`: a webhook request's headers and body, after the size,
//! credential and rate checks, decoded into a ping, a job or an error.
//!
//! The input reads like an HTTP request: header lines (`name: value`), an empty line, the body
//! (any bytes). Two pseudo-headers set the channel and config: `x-fuzz-template` (the
//! channel's GitHub template, `\n` for a line break) and `x-fuzz-payload-max`
//! (`[webhook] github_payload_max_bytes`).
//!
//! Checks, besides not panicking: 415 exactly when the content type is not JSON; 400 with the
//! documented message for bad UTF-8, bad JSON, an invalid request or a blank prompt; a ping
//! only for a GitHub `ping` delivery without `prompt`; a GitHub job keyed `github:<delivery>`
//! whose prompt is the template with each placeholder filled once, so its size is bounded by
//! the template and the (cut) payload, and which carries the whole payload when it fits; a
//! request job that carries the body's prompt, priority and key (else `Idempotency-Key`).
#![no_main]

use gorp::config::WebhookConfig;
use gorp::http::error::ApiError;
use gorp::http::webhook::{decode_body, Decoded, DEFAULT_GITHUB_TEMPLATE};
use gorp::store::{Channel, Source};
use http::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

const TRUNCATED: &str = "\n… (payload truncated)";

fn trim(b: &[u8]) -> &[u8] {
    let start = b
        .iter()
        .position(|c| !c.is_ascii_whitespace())
        .unwrap_or(b.len());
    let end = b
        .iter()
        .rposition(|c| !c.is_ascii_whitespace())
        .map_or(start, |i| i + 1);
    &b[start..end.max(start)]
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

fuzz_target!(|data: &[u8]| {
    let (head, body) = match data.windows(2).position(|w| w == b"\n\n") {
        Some(i) => (&data[..i], &data[i + 2..]),
        None => (data, &[][..]),
    };
    let mut headers = HeaderMap::new();
    let mut template: Option<String> = None;
    let mut config = WebhookConfig::default();
    for line in head.split(|b| *b == b'\n') {
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            continue;
        };
        let (name, value) = (trim(&line[..colon]), trim(&line[colon + 1..]));
        match name.to_ascii_lowercase().as_slice() {
            b"x-fuzz-template" => {
                template = Some(String::from_utf8_lossy(value).replace("\\n", "\n"));
            }
            b"x-fuzz-payload-max" => {
                if let Some(n) = std::str::from_utf8(value).ok().and_then(|v| v.parse().ok()) {
                    config.github_payload_max_bytes = n;
                }
            }
            _ => {
                if let (Ok(n), Ok(v)) =
                    (HeaderName::from_bytes(name), HeaderValue::from_bytes(value))
                {
                    headers.append(n, v);
                }
            }
        }
    }
    let channel = Channel {
        id: 7,
        name: "fuzz".into(),
        webhook_id: "wh".into(),
        agent_binary: None,
        agent_args: None,
        permission_policy: gorp::store::PermissionPolicy::Deny,
        matrix_room_id: None,
        acp_session_id: None,
        created_at: 0,
        sandbox: None,
        allowed_ports: None,
        budget_job_usd: None,
        budget_job_tokens: None,
        budget_day_usd: None,
        budget_month_usd: None,
        reply_footer: true,
        agent_options: "{}".into(),
        mcp_servers: "[]".into(),
        additional_directories: "[]".into(),
        webhook_token_sha256: None,
        webhook_secret: None,
        webhook_template: template.clone(),
    };

    let result = decode_body(&headers, body, &channel, &config);

    // Content type first.
    let ct = header(&headers, "content-type").unwrap_or("");
    let mime = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    let json_type =
        mime == "application/json" || (mime.starts_with("application/") && mime.ends_with("+json"));
    if !json_type {
        match result {
            Err(ApiError::UnsupportedMediaType(m)) => {
                assert!(
                    m.starts_with("expected Content-Type: application/json, got "),
                    "{m}"
                )
            }
            other => panic!("content type {ct:?} accepted: {other:?}"),
        }
        return;
    }
    let bad_request = |want: &str| match &result {
        Err(ApiError::BadRequest(m)) => assert!(m.starts_with(want), "{m:?} vs {want:?}"),
        other => panic!("expected 400 {want:?}, got {other:?}"),
    };
    let Ok(text) = std::str::from_utf8(body) else {
        return bad_request("body is not valid UTF-8");
    };
    let Ok(value) = serde_json::from_str::<Value>(text) else {
        return bad_request("body is not valid JSON: ");
    };

    let event = header(&headers, "x-github-event");
    let delivery = header(&headers, "x-github-delivery");
    match (event, delivery, value.get("prompt")) {
        (Some("ping"), Some(_), None) => assert!(matches!(result, Ok(Decoded::Ping)), "{result:?}"),
        (Some(event), Some(delivery), None) => {
            let job = match result {
                Ok(Decoded::Job(job)) => job,
                other => panic!("GitHub delivery not a job: {other:?}"),
            };
            assert_eq!(job.channel_id, channel.id);
            assert_eq!(job.source, Source::Webhook);
            assert_eq!(job.priority, 0);
            assert_eq!(
                job.idempotency_key.as_deref(),
                Some(format!("github:{delivery}").as_str())
            );
            check_github_prompt(
                &job.prompt,
                template.as_deref(),
                event,
                delivery,
                &value,
                &config,
            );
        }
        _ => match result {
            Ok(Decoded::Job(job)) => {
                assert_eq!(job.channel_id, channel.id);
                assert_eq!(job.source, Source::Webhook);
                assert_eq!(Some(job.prompt.as_str()), value["prompt"].as_str());
                assert!(!job.prompt.trim().is_empty());
                let priority = value.get("priority").and_then(|p| {
                    p.as_i64().or_else(|| {
                        p.as_f64()
                            .filter(|f| f.fract() == 0.0 && f.abs() <= 9.0e15)
                            .map(|f| f as i64)
                    })
                });
                assert_eq!(job.priority, priority.unwrap_or(0));
                let key = match value.get("idempotency_key").and_then(Value::as_str) {
                    Some(k) => Some(k),
                    None => header(&headers, "idempotency-key"),
                };
                assert_eq!(job.idempotency_key.as_deref(), key);
            }
            Ok(Decoded::Ping) => panic!("ping without a GitHub ping delivery"),
            Err(ApiError::BadRequest(m)) => {
                assert!(
                    m.starts_with("invalid request: ") || m == "prompt is empty",
                    "{m:?}"
                )
            }
            Err(e) => panic!("unexpected error {e:?}"),
        },
    }
});

/// The prompt is the template with each placeholder filled once: no longer than the template
/// with every placeholder replaced by its value, the payload cut to the configured size.
fn check_github_prompt(
    prompt: &str,
    template: Option<&str>,
    event: &str,
    delivery: &str,
    payload: &Value,
    config: &WebhookConfig,
) {
    let template = template.unwrap_or(DEFAULT_GITHUB_TEMPLATE);
    let json = serde_json::to_string_pretty(payload).unwrap();
    let max = config.github_payload_max_bytes;
    let cut_len = if json.len() > max {
        max + TRUNCATED.len()
    } else {
        json.len()
    };
    let action = payload.get("action").and_then(Value::as_str).unwrap_or("");
    let repo = payload
        .pointer("/repository/full_name")
        .and_then(Value::as_str)
        .unwrap_or("");
    let mut bound = template.len();
    for (placeholder, len) in [
        ("{event}", event.len()),
        ("{action}", action.len()),
        ("{repository}", repo.len()),
        ("{delivery}", delivery.len()),
        ("{payload}", cut_len),
    ] {
        bound += template.matches(placeholder).count() * len;
    }
    assert!(
        prompt.len() <= bound,
        "prompt of {} bytes exceeds {bound} (template {template:?}, event {event:?}, action {action:?}, repository {repo:?}, delivery {delivery:?})",
        prompt.len()
    );
    if template.contains("{payload}") {
        if json.len() <= max {
            assert!(prompt.contains(&json), "payload missing from {prompt:?}");
        } else {
            assert!(
                prompt.contains(TRUNCATED),
                "no truncation mark in {prompt:?}"
            );
        }
    }
}
