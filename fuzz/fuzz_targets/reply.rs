//! `gorp::matrix::render::render_reply` on any job row facts and event rows, then its split
//! and HTML.
//!
//! Checks, besides not panicking: the source line when asked for; the documented line of a
//! job without output (`👀 queued`, `⏳ working…`, `✅ done (no output)`, `❌ failed`,
//! `🛑 cancelled`); and, when no event text contains the status emoji themselves, that no
//! status line is inside an open code fence (a fence a status line interrupts is closed
//! first).
//!
//! The input is text: `state|source|show_source|error|stop_reason` on the first line, then
//! one event per line, `kind|attempt|id|status|title|text`; a backslash-n in a field is a
//! line break and an empty field is absent.
#![no_main]

use gorp::matrix::render::{
    markdown_to_html, render_reply, split_message, ReplyInput, MAX_PART_BYTES,
};
use gorp::store::{Event, JobState, Source};
use libfuzzer_sys::fuzz_target;
use serde_json::{json, Map, Value};

const EMOJI: &[&str] = &["🔧", "🔐", "🚫", "❌", "🛑", "✅", "⏳", "👀"];

/// `\n` in a field is a line break; an empty field is `None`.
fn field(s: Option<&str>) -> Option<String> {
    s.filter(|s| !s.is_empty()).map(|s| s.replace("\\n", "\n"))
}

fuzz_target!(|input: &str| {
    // Line 1: `state|source|show_source|error|stop_reason`; then one event per line:
    // `kind|attempt|id|status|title|text`.
    let mut lines = input.lines();
    let mut head = lines.next().unwrap_or("").splitn(5, '|');
    let state = match head.next().unwrap_or("") {
        "queued" => JobState::Queued,
        "running" => JobState::Running,
        "failed" => JobState::Failed,
        "cancelled" => JobState::Cancelled,
        _ => JobState::Succeeded,
    };
    let source = match head.next().unwrap_or("") {
        "webhook" => Source::Webhook,
        "schedule" => Source::Schedule,
        "cli" => Source::Cli,
        _ => Source::Matrix,
    };
    let show_source = !head.next().unwrap_or("").is_empty();
    let error = field(head.next());
    let stop_reason = field(head.next());
    let events: Vec<Event> = lines
        .take(200)
        .enumerate()
        .map(|(seq, line)| {
            let mut f = line.splitn(6, '|');
            let kind = f.next().unwrap_or("").to_string();
            let attempt = f.next().and_then(|a| a.parse().ok()).unwrap_or(1);
            let mut data = Map::new();
            for key in ["id", "status", "title"] {
                if let Some(v) = field(f.next()) {
                    data.insert(key.into(), json!(v));
                }
            }
            Event {
                seq: seq as i64,
                job_id: "0190abcd-ef01-7000-8000-000000000000".into(),
                attempt,
                kind,
                text: field(f.next()),
                data: (!data.is_empty()).then_some(Value::Object(data)),
                at: 0,
            }
        })
        .collect();
    let reply = render_reply(&ReplyInput {
        job_id: "0190abcd-ef01-7000-8000-000000000000",
        source,
        state,
        attempt: 1,
        max_attempts: 3,
        error: error.as_deref(),
        stop_reason: stop_reason.as_deref(),
        show_source,
        events: &events,
    });

    let mut body = reply.as_str();
    if show_source {
        let head = format!("**{}** job `0190abcd`\n\n", source.as_str());
        body = reply
            .strip_prefix(&head)
            .unwrap_or_else(|| panic!("no source line: {reply:?}"));
    }
    const SHOWN: &[&str] = &[
        "message",
        "tool_call",
        "tool_call_update",
        "permission",
        "fs_denied",
        "error",
    ];
    let shown = events.iter().any(|e| SHOWN.contains(&e.kind.as_str()));
    if !shown {
        let cancelled_plain = error.as_deref().map_or(true, |e| e.trim().is_empty())
            && stop_reason.as_deref().map_or(true, |r| {
                r.trim().is_empty() || r.trim().eq_ignore_ascii_case("cancelled")
            });
        let want = match state {
            JobState::Queued => Some("👀 queued"),
            JobState::Running => Some("⏳ working…"),
            JobState::Succeeded => Some("✅ done (no output)"),
            JobState::Failed if error.as_deref().map_or(true, |e| e.trim().is_empty()) => {
                Some("❌ failed")
            }
            JobState::Cancelled if cancelled_plain => Some("🛑 cancelled"),
            _ => None,
        };
        if let Some(want) = want {
            assert_eq!(body, want);
        }
    }

    let texts = events
        .iter()
        .flat_map(|e| {
            [
                e.text.as_deref(),
                e.data.as_ref().and_then(|d| d["title"].as_str()),
            ]
        })
        .chain([error.as_deref(), stop_reason.as_deref()])
        .flatten();
    let mut clean = true;
    for t in texts {
        if EMOJI.iter().any(|m| t.contains(m)) {
            clean = false;
        }
    }
    if clean {
        let mut open: Option<Fence> = None;
        for line in body.split_inclusive('\n') {
            if open.is_some() && EMOJI.iter().any(|m| line.starts_with(m)) {
                panic!("status line {line:?} inside a code fence: {reply:?}");
            }
            open = match open {
                Some(f) if fence_closes(&f, line) => None,
                Some(f) => Some(f),
                None => fence_open(line),
            };
        }
    }

    for part in split_message(&reply, MAX_PART_BYTES) {
        assert!(part.len() <= MAX_PART_BYTES);
    }
    let _ = markdown_to_html(&reply);
});

/// An open fenced code block (0-3 spaces, then 3 or more `` ` `` or `~`).
struct Fence {
    ch: u8,
    len: usize,
}

fn indent_ok(body: &str) -> Option<&str> {
    let indent = body.len() - body.trim_start_matches(' ').len();
    (indent <= 3).then(|| &body[indent..])
}

fn fence_open(line: &str) -> Option<Fence> {
    let rest = indent_ok(line.trim_end_matches(['\n', '\r']))?;
    let ch = *rest
        .as_bytes()
        .first()
        .filter(|c| **c == b'`' || **c == b'~')?;
    let len = rest.bytes().take_while(|c| *c == ch).count();
    if len < 3 || (ch == b'`' && rest[len..].contains('`')) {
        return None;
    }
    Some(Fence { ch, len })
}

fn fence_closes(fence: &Fence, line: &str) -> bool {
    let Some(rest) = indent_ok(line.trim_end_matches(['\n', '\r'])) else {
        return false;
    };
    let len = rest.bytes().take_while(|c| *c == fence.ch).count();
    len >= fence.len && rest[len..].trim_matches([' ', '\t']).is_empty()
}
