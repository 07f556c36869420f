//! What gorp posts to Matrix for a job: the reply's Markdown built from the job's event rows,
//! its HTML, and its split into message-sized parts.
//!
//! Everything here is pure: the reply pump and the command dispatcher read the rows and send
//! the messages.
//!
//! Why one file: rendering and splitting share the fence and list rules, and half of the file
//! is their unit tests (the splitter's edge cases).

use std::collections::HashMap;

pub use crate::markdown::markdown_to_html;
#[cfg(test)]
use crate::markdown::safe_url;

use crate::store::{Event, EventKind, JobState, Source};

use super::strings::{self, state_emoji};

/// The size a reply is split to, in bytes. A Matrix event may be 64 KiB, and the plain body,
/// the HTML `formatted_body` and, for edits, the `m.new_content` copy all count toward it.
pub const MAX_PART_BYTES: usize = 16 * 1024;

/// Longest tool title shown, in characters.
const MAX_TITLE_CHARS: usize = 120;
/// Longest status text (permission, refusal, error) shown, in characters.
const MAX_STATUS_CHARS: usize = 2000;

/// `text` as a Markdown code span: delimited by more backticks than any run inside it, and
/// padded with a space when it starts or ends with a backtick or a space, so no content can
/// close it early. Newlines become spaces (a code span is one line); empty text is `` ` ` ``.
pub fn inline_code(text: &str) -> String {
    if text.is_empty() {
        return "` `".to_string();
    }
    let text: String = text
        .chars()
        .map(|c| if c == '\n' || c == '\r' { ' ' } else { c })
        .collect();
    let mut longest = 0;
    let mut run = 0;
    for c in text.chars() {
        run = if c == '`' { run + 1 } else { 0 };
        longest = longest.max(run);
    }
    let ticks = "`".repeat(longest + 1);
    if text.starts_with(['`', ' ']) || text.ends_with(['`', ' ']) {
        format!("{ticks} {text} {ticks}")
    } else {
        format!("{ticks}{text}{ticks}")
    }
}

// ---------------------------------------------------------------------------------------------
// Code fences

/// An open fenced code block: what opened it, and how a split closes and reopens it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Fence {
    /// `` ` `` or `~`.
    ch: char,
    /// How many fence characters opened it; a closing fence needs at least as many.
    len: usize,
    /// The opening line as written (indent, fence, info string), ending in `\n`.
    opener: String,
}

impl Fence {
    /// A line that closes this fence.
    fn closer(&self) -> String {
        std::iter::repeat_n(self.ch, self.len).collect()
    }
}

/// The fence `line` opens: 0-3 spaces, then 3 or more `` ` `` or `~`; a backtick fence's info
/// string may not contain a backtick.
fn fence_open(line: &str) -> Option<Fence> {
    let body = line.trim_end_matches(['\n', '\r']);
    let indent = body.len() - body.trim_start_matches(' ').len();
    if indent > 3 {
        return None;
    }
    let rest = &body[indent..];
    let ch = rest.chars().next().filter(|c| *c == '`' || *c == '~')?;
    let len = rest.len() - rest.trim_start_matches(ch).len();
    if len < 3 || (ch == '`' && rest[len..].contains('`')) {
        return None;
    }
    Some(Fence {
        ch,
        len,
        opener: format!("{body}\n"),
    })
}

/// How many fence characters (`` ` `` or `~`, at least 3, after at most 3 spaces) `line` starts
/// with; 0 when it does not start like a fence.
fn fence_lead(line: &str) -> usize {
    let indent = line.len() - line.trim_start_matches(' ').len();
    if indent > 3 {
        return 0;
    }
    let rest = &line[indent..];
    let Some(ch) = rest.chars().next().filter(|c| *c == '`' || *c == '~') else {
        return 0;
    };
    let len = rest.len() - rest.trim_start_matches(ch).len();
    if len >= 3 {
        len
    } else {
        0
    }
}

/// Whether `line` closes `fence`: 0-3 spaces, at least as many of the same character, then only
/// spaces or tabs.
fn fence_closes(fence: &Fence, line: &str) -> bool {
    let body = line.trim_end_matches(['\n', '\r']);
    let indent = body.len() - body.trim_start_matches(' ').len();
    if indent > 3 {
        return false;
    }
    let rest = &body[indent..];
    let len = rest.len() - rest.trim_start_matches(fence.ch).len();
    len >= fence.len && rest[len..].trim_matches([' ', '\t']).is_empty()
}

/// The fence open after `line`, given the fence open before it.
fn next_fence(open: Option<&Fence>, line: &str) -> Option<Fence> {
    match open {
        Some(f) if fence_closes(f, line) => None,
        Some(f) => Some(f.clone()),
        None => fence_open(line),
    }
}

/// The fence open at the end of `text`, given the fence open at its start.
fn scan_fences(mut open: Option<Fence>, text: &str) -> Option<Fence> {
    for line in text.split_inclusive('\n') {
        open = next_fence(open.as_ref(), line);
    }
    open
}

// ---------------------------------------------------------------------------------------------
// Splitting

/// One part of a split message: `body` is a slice of the original text; `prefix` reopens and
/// `suffix` closes a code fence the split went through.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Part {
    pub prefix: String,
    pub body: String,
    pub suffix: String,
}

impl Part {
    fn len(&self) -> usize {
        self.prefix.len() + self.body.len() + self.suffix.len()
    }
}

/// Splits `text` into parts of at most `max_bytes` bytes each.
///
/// Parts break at line ends where possible; a single line longer than a part breaks after the
/// last whitespace in the second half of the room left, or else at the last char boundary that
/// fits. A part that ends inside a fenced code block (```` ``` ```` or `~~~`, 0-3 spaces of
/// indent, optional info string) gets a line closing the fence, and the next part starts with
/// the fence's opening line again, so every part renders on its own; these lines count toward
/// `max_bytes`. Removing them gives back `text` exactly. A text that fits is one part; an empty
/// text is one empty part.
///
/// An opening fence line longer than a whole part is cut like any other line, and the fence
/// is then not whole in the parts that hold that line. A fence too long to repeat (its bare
/// fence line and closer take more than a quarter of a part, e.g. 8 or more backticks at 64
/// bytes) is neither closed nor reopened.
///
/// `max_bytes` is meant to be at least 64. For smaller values the split still terminates and
/// keeps the text, but a part holds at least one character.
pub fn split_message(text: &str, max_bytes: usize) -> Vec<String> {
    split_parts(text, max_bytes)
        .into_iter()
        .map(|mut p| {
            p.prefix.push_str(&p.body);
            p.prefix.push_str(&p.suffix);
            p.prefix
        })
        .collect()
}

/// What reopens `fence` in a new part, if it is small enough to repeat (at most a quarter of
/// a part with its closing line): the opening line, or failing that the bare fence.
fn reopener(fence: &Fence, max_bytes: usize) -> Option<String> {
    let budget = max_bytes / 4;
    let closer_len = fence.len + 1;
    if fence.opener.len() + closer_len <= budget {
        return Some(fence.opener.clone());
    }
    let bare = format!("{}\n", fence.closer());
    (bare.len() + closer_len <= budget).then_some(bare)
}

/// The bytes a part needs to close `fence` after a body, given whether the body ends a line:
/// zero when the fence is not reopened in the next part.
fn close_cost(fence: Option<&Fence>, ends_line: bool, max_bytes: usize) -> usize {
    match fence {
        Some(f) if reopener(f, max_bytes).is_some() => f.len + usize::from(!ends_line),
        _ => 0,
    }
}

/// Where to cut `s` so the first piece has at most `room` bytes: after the last whitespace in
/// the second half of that room, else at the last char boundary, and always at least one char.
/// The second piece starts a line in the next part, so the cut moves back while that piece
/// would start (after spaces) with ```` ``` ```` or `~~~` and read as a code fence there.
fn cut_point(s: &str, room: usize) -> usize {
    let mut end = room.min(s.len());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    if end == 0 {
        return s.chars().next().map_or(s.len(), char::len_utf8);
    }
    let cut = match s[..end]
        .char_indices()
        .rev()
        .find(|(_, c)| c.is_whitespace())
    {
        Some((i, c)) if i + c.len_utf8() >= end / 2 => i + c.len_utf8(),
        _ => end,
    };
    let fence_like = |at: usize| {
        let rest = s[at..].trim_start_matches(' ');
        rest.starts_with("```") || rest.starts_with("~~~")
    };
    let mut safe = cut;
    while safe > 0 && fence_like(safe) {
        safe = s[..safe].char_indices().next_back().map_or(0, |(i, _)| i);
    }
    if safe > 0 {
        safe
    } else {
        cut
    }
}

/// [`split_message`] keeping the added fence lines apart from the text.
pub fn split_parts(text: &str, max_bytes: usize) -> Vec<Part> {
    if text.len() <= max_bytes {
        return vec![Part {
            body: text.to_string(),
            ..Part::default()
        }];
    }
    // An eighth of each part is kept for closing a fence that the part opens only when read
    // on its own (a piece of a line, or a line inside a fence too long to repeat, that looks
    // like an opener there); see `close_stray_fences`.
    let slack = max_bytes / 8;
    let mut parts = split_within(text, max_bytes - slack);
    close_stray_fences(&mut parts, slack);
    parts
}

/// Closes, in every part but the last, a short code fence that is left open when the part is
/// read on its own although the split did not mean it as code.
fn close_stray_fences(parts: &mut [Part], slack: usize) {
    let n = parts.len();
    for p in parts.iter_mut().take(n.saturating_sub(1)) {
        let shown = format!("{}{}{}", p.prefix, p.body, p.suffix);
        if let Some(f) = scan_fences(None, &shown) {
            if f.len < slack {
                if !shown.ends_with('\n') {
                    p.suffix.push('\n');
                }
                p.suffix.push_str(&f.closer());
            }
        }
    }
}

/// The split itself, into parts of at most `max_bytes`.
fn split_within(text: &str, max_bytes: usize) -> Vec<Part> {
    let mut parts = Vec::new();
    let mut cur = Part::default();
    // The fence open at the end of `cur.body` (in the original text).
    let mut open: Option<Fence> = None;
    let mut lines = text.split_inclusive('\n').peekable();
    while let Some(line) = lines.next() {
        let is_last = lines.peek().is_none();
        let after = next_fence(open.as_ref(), line);
        let mut rest = line;
        while !rest.is_empty() {
            // The whole rest of the line fits, with room to close the fence it leaves open
            // (unless nothing follows it).
            let closing = if is_last {
                0
            } else {
                close_cost(after.as_ref(), rest.ends_with('\n'), max_bytes)
            };
            if cur.len() + rest.len() + closing <= max_bytes {
                cur.body.push_str(rest);
                break;
            }
            if cur.body.is_empty() {
                // Even a fresh part cannot hold it: cut the line (inside the fence, if any),
                // leaving room to close the fence open before it and, when the piece ends the
                // line, the fence the line opens.
                // A line outside a fence that starts like a fence opener (but is none, as a later
                // backtick in it shows) may be cut so its first piece reads as one: room for a
                // closer of that piece too.
                let lead = if open.is_none() { fence_lead(rest) } else { 0 };
                let reserve = close_cost(open.as_ref(), false, max_bytes)
                    .max(if is_last {
                        0
                    } else {
                        close_cost(after.as_ref(), true, max_bytes)
                    })
                    .max(if lead > 0 { lead + 1 } else { 0 });
                let room = max_bytes.saturating_sub(cur.len()).saturating_sub(reserve);
                let cut = cut_point(rest, room);
                cur.body.push_str(&rest[..cut]);
                rest = &rest[cut..];
                if rest.is_empty() {
                    break;
                }
                if lead > 0 {
                    if let Some(f) = fence_open(&cur.body) {
                        // Closed in this part, not reopened: the next piece is not code.
                        cur.suffix = format!("\n{}", f.closer());
                    }
                }
            }
            parts.push(finish_part(&mut cur, open.as_ref(), max_bytes));
        }
        open = after;
    }
    parts.push(cur);
    parts
}

/// Closes `cur` (adding a fence closer when `open` is reopened) and replaces it with the next
/// part, which starts by reopening the fence.
fn finish_part(cur: &mut Part, open: Option<&Fence>, max_bytes: usize) -> Part {
    let reopen = open.and_then(|f| Some((f, reopener(f, max_bytes)?)));
    let mut next = Part::default();
    if let Some((fence, line)) = reopen {
        if !cur.body.ends_with('\n') {
            cur.suffix.push('\n');
        }
        cur.suffix.push_str(&fence.closer());
        next.prefix = line;
    }
    std::mem::replace(cur, next)
}

// ---------------------------------------------------------------------------------------------
// Replies

/// What a job's Matrix reply shows, built only from the job row's facts and its event rows.
pub struct ReplyInput<'a> {
    pub job_id: &'a str,
    pub source: Source,
    pub state: JobState,
    pub attempt: i64,
    pub max_attempts: i64,
    pub error: Option<&'a str>,
    pub stop_reason: Option<&'a str>,
    /// Whether the reply starts with a line naming the source and the first 8 characters of
    /// the job id, e.g. ``**webhook** job `0190abcd` ``, for jobs that did not come from this
    /// room (webhook, schedule, cli).
    pub show_source: bool,
    /// Every event of the job, in seq order.
    pub events: &'a [Event],
}

/// The Markdown of a job's reply.
///
/// - Output is the `message`, `tool_call`, `tool_call_update`, `permission`, `fs_denied` and
///   `error` events of the latest attempt that produced a message or tool event (earlier
///   attempts' partial output is dropped; events of later attempts that produced none, such as
///   the error that failed a retry, still show). When no attempt produced any, the latest
///   attempt with a shown event counts. Every other kind (thoughts, stderr, usage, plan, fs
///   reads and writes, `rescued`, …) is not shown.
/// - `message` texts are concatenated: the answer, as the agent wrote it.
/// - A tool call is one line where it happened, updated in place by later `tool_call_update`s
///   with the same id: `` 🔧 `<title>` … `` while pending or in progress, `` 🔧 `<title>` ✓ ``
///   when completed, `` 🔧 `<title>` ✗ `` when failed. The title is its first line, at most 120
///   characters, as inline code.
/// - `permission` → `🔐 permission: <option id or cancelled>`, `fs_denied` → `🚫 <reason>`,
///   `error` → `❌ <text>`. A multi-line text shows its first line, then the rest as a code
///   block.
/// - Status lines stand apart from the answer (blank lines around them; consecutive ones are
///   joined by line breaks). A code block of the answer that a status line interrupts is
///   closed before it and reopened after it.
/// - Without output: `⏳ working…` while running, `👀 queued` while queued.
/// - Finished jobs end with `❌ failed: <error>` (unless an `error` event already showed that
///   text), `🛑 cancelled`, `🛑 cancelled before it started` or `🛑 cancelled: <reason>`
///   ([`strings::reply_cancelled`]: a cancellation is said once), or, for a success without any output,
///   `✅ done (no output)`.
/// - `show_source` puts the source and the first 8 characters of the job id first, e.g.
///   ``**webhook** job `0190abcd` ``, then a blank line.
pub fn render_reply(input: &ReplyInput) -> String {
    let mut items = reply_items(input.events);
    let has_output = items
        .iter()
        .any(|i| !matches!(i, Item::Text(t) if t.trim().is_empty()));
    let shown_errors: Vec<&str> = items
        .iter()
        .filter_map(|i| match i {
            Item::Status {
                error: Some(text), ..
            } => Some(text.as_str()),
            _ => None,
        })
        .collect();
    let error = input.error.map(str::trim).filter(|e| !e.is_empty());
    let last_line = match input.state {
        JobState::Queued if !has_output => Some(status_item(
            state_emoji(JobState::Queued),
            Some(strings::REPLY_QUEUED),
        )),
        JobState::Running if !has_output => Some(status_item(
            state_emoji(JobState::Running),
            Some(strings::REPLY_WORKING),
        )),
        JobState::Failed => match error {
            Some(e) if shown_errors.contains(&e) => None,
            Some(e) => Some(status_item(
                state_emoji(JobState::Failed),
                Some(&strings::reply_failed(e)),
            )),
            None => Some(status_item(
                state_emoji(JobState::Failed),
                Some(strings::REPLY_FAILED),
            )),
        },
        JobState::Cancelled => {
            let reason = input
                .stop_reason
                .map(str::trim)
                .filter(|r| !r.is_empty() && !r.eq_ignore_ascii_case("cancelled"));
            Some(status_item(
                state_emoji(JobState::Cancelled),
                Some(&strings::reply_cancelled(error.or(reason))),
            ))
        }
        JobState::Succeeded if !has_output => Some(status_item(
            state_emoji(JobState::Succeeded),
            Some(strings::REPLY_DONE_NO_OUTPUT),
        )),
        _ => None,
    };
    items.extend(last_line);
    let mut out = String::new();
    if input.show_source {
        let id8: String = input.job_id.chars().take(8).collect();
        out.push_str(&strings::reply_source_head(input.source.as_str(), &id8));
    }
    out.push_str(&layout(&items));
    out
}

/// One block of a reply.
#[derive(Debug, Clone, PartialEq)]
enum Item {
    /// Consecutive `message` text.
    Text(String),
    /// A tool call's line, updated in place.
    Tool { title: String, status: String },
    /// Any other status line (Markdown). `error` holds the text of an `error` event.
    Status {
        markdown: String,
        multiline: bool,
        error: Option<String>,
    },
}

/// The blocks of the reply's output, from the events that count (see [`render_reply`]).
fn reply_items(events: &[Event]) -> Vec<Item> {
    use EventKind::*;
    const OUTPUT: [EventKind; 3] = [Message, ToolCall, ToolCallUpdate];
    const SHOWN: [EventKind; 6] = [
        Message,
        ToolCall,
        ToolCallUpdate,
        Permission,
        FsDenied,
        Error,
    ];
    // Kinds gorp does not name (an agent's own update tags) are not shown.
    let mut events: Vec<(&Event, EventKind)> = events
        .iter()
        .filter_map(|e| Some((e, e.kind.parse::<EventKind>().ok()?)))
        .filter(|(_, k)| SHOWN.contains(k))
        .collect();
    events.sort_by_key(|(e, _)| e.seq);
    let latest = |kinds: &[EventKind]| {
        events
            .iter()
            .filter(|(_, k)| kinds.contains(k))
            .map(|(e, _)| e.attempt)
            .max()
    };
    let Some(attempt) = latest(&OUTPUT).or_else(|| latest(&SHOWN)) else {
        return Vec::new();
    };

    let mut items: Vec<Item> = Vec::new();
    let mut tools: HashMap<String, usize> = HashMap::new();
    for (e, kind) in events.into_iter().filter(|(e, _)| e.attempt >= attempt) {
        let text = e.text.as_deref();
        match kind {
            Message => {
                let text = text.unwrap_or("");
                if text.is_empty() {
                    continue;
                }
                match items.last_mut() {
                    Some(Item::Text(t)) => t.push_str(text),
                    _ => items.push(Item::Text(text.to_string())),
                }
            }
            ToolCall | ToolCallUpdate => {
                let data = e.data.as_ref();
                let field = |name: &str| {
                    data.and_then(|d| d.get(name))
                        .and_then(|v| v.as_str())
                        .map(str::to_string)
                };
                let id = field("id");
                let title = field("title").or_else(|| text.map(str::to_string));
                let status = field("status");
                let known = id.as_ref().and_then(|id| tools.get(id).copied());
                match (known, items.get_mut(known.unwrap_or(usize::MAX))) {
                    (
                        Some(_),
                        Some(Item::Tool {
                            title: t,
                            status: s,
                        }),
                    ) => {
                        if let Some(title) = title.filter(|t| !t.trim().is_empty()) {
                            *t = title;
                        }
                        if let Some(status) = status {
                            *s = status;
                        }
                    }
                    _ => {
                        if kind == ToolCallUpdate && id.is_none() {
                            continue;
                        }
                        if let Some(id) = id {
                            tools.insert(id, items.len());
                        }
                        items.push(Item::Tool {
                            title: title.unwrap_or_default(),
                            status: status.unwrap_or_default(),
                        });
                    }
                }
            }
            Permission => {
                items.push(status_item("🔐", Some(&strings::reply_permission(text))));
            }
            FsDenied => items.push(status_item(
                "🚫",
                Some(text.unwrap_or(strings::REPLY_ACCESS_DENIED)),
            )),
            Error => {
                let text = text.unwrap_or("error");
                let mut item = status_item("❌", Some(text));
                if let Item::Status { error, .. } = &mut item {
                    *error = Some(text.trim().to_string());
                }
                items.push(item);
            }
            _ => {}
        }
    }
    items
}

/// A status line: `emoji` followed by `text` (its first line; further lines as a code block).
/// Control characters become spaces and the text is cut to [`MAX_STATUS_CHARS`].
fn status_item(emoji: &str, text: Option<&str>) -> Item {
    let Some(text) = text else {
        return Item::Status {
            markdown: emoji.to_string(),
            multiline: false,
            error: None,
        };
    };
    let text = cut_chars(text.trim(), MAX_STATUS_CHARS);
    let (first, rest) = match text.split_once('\n') {
        Some((first, rest)) => (first, rest.trim_matches('\n')),
        None => (text.as_str(), ""),
    };
    let first = one_line(first);
    let mut markdown = if first.is_empty() {
        emoji.to_string()
    } else {
        format!("{emoji} {first}")
    };
    let multiline = !rest.trim().is_empty();
    if multiline {
        markdown.push('\n');
        markdown.push_str(&code_block(rest));
    }
    Item::Status {
        markdown,
        multiline,
        error: None,
    }
}

/// `text` in a backtick code block whose fence is longer than any backtick run inside it.
pub(super) fn code_block(text: &str) -> String {
    let longest = text.split(|c| c != '`').map(str::len).max().unwrap_or(0);
    let fence = "`".repeat(longest.max(2) + 1);
    format!("{fence}\n{text}\n{fence}")
}

/// `text` with control characters (line breaks, tabs, …) replaced by spaces.
fn one_line(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// At most `max` characters of `text`, with `…` when cut.
fn cut_chars(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &text[..i]),
        None => text.to_string(),
    }
}

/// The Markdown line of a tool call (see [`render_reply`]).
fn tool_line(title: &str, status: &str) -> String {
    let first = title
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("tool");
    let title = cut_chars(&one_line(first), MAX_TITLE_CHARS);
    let mark = match status {
        "completed" => "✓",
        "failed" => "✗",
        _ => "…",
    };
    format!("🔧 {} {mark}", inline_code(&title))
}

/// Joins the blocks: status lines separated from text by blank lines and from each other by
/// line breaks; a code fence of the text that a status line interrupts is closed before it and
/// reopened after it.
fn layout(items: &[Item]) -> String {
    let mut out = String::new();
    let mut open: Option<Fence> = None;
    let mut reopen: Option<Fence> = None;
    // Whether the last block was a status line, and whether it may be followed by a line break.
    let mut prev_status: Option<bool> = None;
    for item in items {
        let (line, multiline) = match item {
            Item::Text(text) => {
                let mut text = text.as_str();
                if prev_status.is_some() {
                    out.push_str("\n\n");
                }
                if let Some(fence) = reopen.take() {
                    out.push_str(&fence.opener);
                    open = Some(fence);
                } else if prev_status.is_some() {
                    text = text.trim_start_matches(['\n', '\r']);
                }
                out.push_str(text);
                open = scan_fences(open, text);
                prev_status = None;
                continue;
            }
            Item::Tool { title, status } => (tool_line(title, status), false),
            Item::Status {
                markdown,
                multiline,
                ..
            } => (markdown.clone(), *multiline),
        };
        if let Some(fence) = open.take() {
            if !out.ends_with('\n') {
                out.push('\n');
            }
            out.push_str(&fence.closer());
            reopen = Some(fence);
        } else if prev_status.is_none() {
            out.truncate(out.trim_end_matches(['\n', '\r']).len());
        }
        match prev_status {
            Some(true) if !multiline => out.push_str("  \n"),
            _ if out.is_empty() => {}
            _ => out.push_str("\n\n"),
        }
        out.push_str(&line);
        prev_status = Some(!multiline);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    // ---- helpers ----

    fn ev(
        seq: i64,
        attempt: i64,
        kind: &str,
        text: Option<&str>,
        data: Option<serde_json::Value>,
    ) -> Event {
        Event {
            seq,
            job_id: "0190abcd-ef01-7000-8000-000000000000".into(),
            attempt,
            kind: kind.into(),
            text: text.map(str::to_string),
            data,
            at: 0,
        }
    }

    fn msg(seq: i64, attempt: i64, text: &str) -> Event {
        ev(seq, attempt, "message", Some(text), None)
    }

    fn tool(seq: i64, attempt: i64, id: &str, title: &str, status: &str) -> Event {
        ev(
            seq,
            attempt,
            "tool_call",
            Some(title),
            Some(json!({ "id": id, "title": title, "kind": "read", "status": status })),
        )
    }

    fn tool_update(seq: i64, attempt: i64, id: &str, data: serde_json::Value) -> Event {
        let mut data = data;
        data["id"] = json!(id);
        let title = data
            .get("title")
            .and_then(|t| t.as_str())
            .map(str::to_string);
        ev(
            seq,
            attempt,
            "tool_call_update",
            title.as_deref(),
            Some(data),
        )
    }

    fn reply(state: JobState, events: &[Event]) -> String {
        render_reply(&ReplyInput {
            job_id: "0190abcd-ef01-7000-8000-000000000000",
            source: Source::Matrix,
            state,
            attempt: 1,
            max_attempts: 3,
            error: None,
            stop_reason: None,
            show_source: false,
            events,
        })
    }

    fn reply_with(
        state: JobState,
        error: Option<&str>,
        stop_reason: Option<&str>,
        events: &[Event],
    ) -> String {
        render_reply(&ReplyInput {
            job_id: "0190abcd-ef01-7000-8000-000000000000",
            source: Source::Matrix,
            state,
            attempt: 1,
            max_attempts: 3,
            error,
            stop_reason,
            show_source: false,
            events,
        })
    }

    /// Removes the fence lines `split_parts` added, joining the bodies back.
    fn strip_added(parts: &[Part]) -> String {
        parts.iter().map(|p| p.body.as_str()).collect()
    }

    // ---- markdown_to_html ----

    #[test]
    fn html_basic_markdown() {
        let html = markdown_to_html("# T\n\n**b** _i_ ~~s~~ `c`\n\n```rust\nfn x() {}\n```\n");
        assert!(html.contains("<h1>T</h1>"), "{html}");
        assert!(html.contains("<strong>b</strong>"));
        assert!(html.contains("<em>i</em>"));
        assert!(html.contains("<del>s</del>"));
        assert!(html.contains("<code>c</code>"));
        assert!(
            html.contains("<pre><code class=\"language-rust\">fn x() {}\n</code></pre>"),
            "{html}"
        );
    }

    #[test]
    fn html_tables_and_task_lists() {
        let html = markdown_to_html("| a | b |\n|---|---|\n| 1 | 2 |\n\n- [x] done\n- [ ] todo\n");
        assert!(
            html.contains("<table>") && html.contains("<td>1</td>"),
            "{html}"
        );
        assert!(html.contains("☑ done") && html.contains("☐ todo"), "{html}");
        assert!(!html.contains("<input"), "{html}");
    }

    #[test]
    fn html_raw_html_is_escaped() {
        let html = markdown_to_html("<script>alert(1)</script>\n<div onclick=x>\nhi\n</div>\n\ntext <b>bold</b> <img src=x onerror=y>\n");
        assert!(!html.contains("<script"), "{html}");
        assert!(!html.contains("<div"), "{html}");
        assert!(!html.contains("<b>"), "{html}");
        assert!(!html.contains("<img"), "{html}");
        assert!(
            html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
            "{html}"
        );
        assert!(html.contains("&lt;b&gt;bold&lt;/b&gt;"), "{html}");
        // The lines of an HTML block stay lines.
        assert!(
            html.contains("<p>&lt;div onclick=x&gt;<br />\nhi<br />\n&lt;/div&gt;</p>"),
            "{html}"
        );
    }

    #[test]
    fn html_links_and_images() {
        let html = markdown_to_html("[ok](https://example.com) [bad](javascript:alert(1)) <javascript:x> ![cat](https://e.com/c.png) ![](https://e.com/d.png) [rel](docs/x:y.md)");
        assert!(
            html.contains("<a href=\"https://example.com\">ok</a>"),
            "{html}"
        );
        assert!(!html.contains("javascript:alert"), "{html}");
        assert!(html.contains("bad"), "{html}");
        assert!(!html.contains("<img"), "{html}");
        assert!(
            html.contains("<a href=\"https://e.com/c.png\">cat</a>"),
            "{html}"
        );
        assert!(
            html.contains("<a href=\"https://e.com/d.png\">https://e.com/d.png</a>"),
            "{html}"
        );
        assert!(html.contains("<a href=\"docs/x:y.md\">rel</a>"), "{html}");
        let html = markdown_to_html("[![badge](https://e.com/b.svg)](https://e.com)");
        assert_eq!(html, "<p><a href=\"https://e.com\">badge</a></p>\n");
        assert!(!html.contains("href=\"javascript"), "{html}");
    }

    #[test]
    fn html_odd_input() {
        assert_eq!(markdown_to_html(""), "");
        for md in [
            "<",
            "<!--",
            "<![CDATA[",
            "```",
            "[x](",
            "![",
            "| a |\n|-",
            "- [ ]",
            "\0",
            "日本語 <b>",
        ] {
            let html = markdown_to_html(md);
            assert!(
                !html.contains("<b>") && !html.contains("<!--"),
                "{md:?}: {html}"
            );
        }
        // Pseudo-random soup of Markdown and HTML fragments: no panic, no raw tag survives.
        let pieces = [
            "<b>",
            "</b>",
            "<div>\n",
            "\n\n",
            "```",
            "~~~",
            "`",
            "*",
            "_",
            "[a](",
            ")",
            "![",
            "]",
            "javascript:",
            "<a href=x>",
            "- [x] ",
            "| b |",
            "\n|---|\n",
            "é",
            "🦀",
            "> ",
            "    ",
            "&amp;",
            "\r\n",
        ];
        let mut state: u64 = 0xDEAD_BEEF_CAFE_F00D;
        for _ in 0..2000 {
            let mut md = String::new();
            for _ in 0..(state % 25) {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                md.push_str(pieces[(state % pieces.len() as u64) as usize]);
            }
            let html = markdown_to_html(&md);
            assert!(
                !html.contains("<b>") && !html.contains("<div") && !html.contains("<a href=x"),
                "{md:?}: {html}"
            );
            assert!(!html.contains("href=\"javascript"), "{md:?}: {html}");
        }
    }

    #[test]
    fn safe_urls() {
        for url in [
            "https://x",
            "HTTP://x",
            "mailto:a@b",
            "mxc://s/m",
            "matrix:r/x",
            "/abs",
            "rel/x:y",
            "#frag:x",
            "?q=a:b",
            "",
        ] {
            assert!(safe_url(url), "{url}");
        }
        for url in [
            "javascript:x",
            " JavaScript:x",
            "data:text/html,x",
            "vbscript:x",
            "file:///etc/passwd",
            ":x",
        ] {
            assert!(!safe_url(url), "{url}");
        }
    }

    #[test]
    fn inline_code_cannot_be_escaped() {
        assert_eq!(inline_code("ls"), "`ls`");
        assert_eq!(inline_code("a`b"), "``a`b``");
        assert_eq!(inline_code("`x"), "`` `x ``");
        assert_eq!(inline_code("a\nb"), "`a b`");
        assert_eq!(inline_code(""), "` `");
        assert_eq!(inline_code("```"), "```` ``` ````");
        let html = markdown_to_html(&inline_code("x` **y** <b>"));
        assert!(html.contains("<code>x` **y** &lt;b&gt;</code>"), "{html}");
    }

    // ---- split_message ----

    /// Found by fuzzing: a fence opening line longer than a part was cut so that its last
    /// piece filled a part, and the closer added for the fence it opens went over the size.
    #[test]
    fn a_cut_fence_opening_line_leaves_room_for_its_closer() {
        let info = format!("{}){}", "a".repeat(8), "a".repeat(130));
        let text = format!(
            "```{info}o that iu longer than the re{}o that iu longer than the rest\n```\n",
            "a".repeat(10)
        );
        for max in [64, 70, 71, 72, 80, 100] {
            for part in split_message(&text, max) {
                assert!(
                    part.len() <= max,
                    "max {max}: part of {} bytes: {part:?}",
                    part.len()
                );
            }
        }
    }

    /// Found by fuzzing: a line that starts like a fence opener but is none (a later backtick)
    /// was cut so its first piece, alone in its part, opened a fence nothing closed.
    #[test]
    fn a_cut_line_that_only_looks_like_a_fence_opener_is_closed_in_its_part() {
        let text = format!(
            "```{}{}a2- [ ]{}```````agaaaa```\nbody line one\nbody line two\n",
            "a".repeat(15),
            "\0".repeat(50),
            "a".repeat(20)
        );
        let parts = split_message(&text, 70);
        assert!(parts.len() > 1);
        for part in &parts {
            assert!(part.len() <= 70, "part of {} bytes: {part:?}", part.len());
            assert_eq!(scan_fences(None, part), None, "fence left open in {part:?}");
        }
        assert!(parts[0].ends_with("\n```"), "{:?}", parts[0]);
    }

    #[test]
    fn split_small_and_empty() {
        assert_eq!(split_message("", 64), vec![String::new()]);
        assert_eq!(split_message("hello\n", 64), vec!["hello\n".to_string()]);
        let exact = "x".repeat(64);
        assert_eq!(split_message(&exact, 64), vec![exact.clone()]);
    }

    #[test]
    fn split_prefers_line_breaks() {
        let text = "aaaa aaaa\n".repeat(20); // 200 bytes
        let parts = split_message(&text, 64);
        assert!(parts.len() > 1);
        for p in &parts {
            assert!(p.len() <= 64, "{p:?}");
            assert!(p.ends_with('\n'), "{p:?} did not break at a line end");
        }
        assert_eq!(parts.concat(), text);
    }

    #[test]
    fn split_long_line_at_whitespace_then_anywhere() {
        let text = "word ".repeat(40);
        let parts = split_message(&text, 64);
        for p in &parts[..parts.len() - 1] {
            assert!(p.len() <= 64 && p.ends_with(' '), "{p:?}");
        }
        assert_eq!(parts.concat(), text);

        let text = "é".repeat(100); // 200 bytes, no whitespace
        let parts = split_message(&text, 64);
        assert!(parts.iter().all(|p| p.len() <= 64 && !p.is_empty()));
        assert_eq!(parts.concat(), text);
    }

    #[test]
    fn split_closes_and_reopens_fences() {
        let code: String = (0..30).map(|i| format!("let x{i} = {i};\n")).collect();
        let text = format!("Intro line.\n\n```rust\n{code}```\n\nAfter.\n");
        let parts = split_message(&text, 120);
        assert!(parts.len() > 2);
        let mut inside = false;
        for (i, p) in parts.iter().enumerate() {
            assert!(p.len() <= 120, "part {i} is {} bytes", p.len());
            // Every part has balanced fences on its own.
            let fences = p.lines().filter(|l| l.starts_with("```")).count();
            assert_eq!(fences % 2, 0, "part {i} unbalanced: {p:?}");
            if i > 0 && inside {
                assert!(
                    p.starts_with("```rust\n"),
                    "part {i} does not reopen: {p:?}"
                );
            }
            inside = p.trim_end().ends_with("```") && !p.ends_with("After.\n");
        }
        let structured = split_parts(&text, 120);
        assert_eq!(strip_added(&structured), text);
        // Removing the added lines from the strings gives the text back too.
        let mut rebuilt = String::new();
        for (i, p) in parts.iter().enumerate() {
            let mut s = p.as_str();
            if i > 0 && structured[i].prefix == "```rust\n" {
                s = s.strip_prefix("```rust\n").unwrap();
            }
            if structured[i].suffix.ends_with("```") {
                s = s.strip_suffix("```").unwrap();
                if structured[i].suffix == "\n```" {
                    s = s.strip_suffix('\n').unwrap();
                }
            }
            rebuilt.push_str(s);
        }
        assert_eq!(rebuilt, text);
    }

    #[test]
    fn split_tilde_and_indented_fences() {
        let body = "x\n".repeat(100);
        for (opener, closer) in [
            ("~~~\n", "~~~"),
            ("   ~~~~ python\n", "~~~~"),
            ("````md\n", "````"),
        ] {
            let text = format!("{opener}{body}{closer}\nend\n");
            let parts = split_parts(&text, 100);
            assert_eq!(strip_added(&parts), text);
            assert!(parts.len() > 2);
            for (i, p) in parts.iter().enumerate() {
                assert!(p.len() <= 100, "{opener:?} part {i}: {p:?}");
                if i > 0 && i < parts.len() - 1 {
                    assert_eq!(p.prefix, opener, "{opener:?} part {i}");
                }
                if i < parts.len() - 2 {
                    assert_eq!(p.suffix, closer, "{opener:?} part {i}");
                }
            }
        }
    }

    #[test]
    fn split_cut_never_starts_a_part_with_a_fence() {
        let text = format!("{} ```\n", "a".repeat(61));
        let parts = split_message(&text, 64);
        assert_eq!(parts.concat(), text);
        assert!(
            parts.iter().all(|p| !p.trim_start().starts_with("```")),
            "{parts:?}"
        );
        assert_eq!(cut_point("abc  ~~~x", 7), 2);
        assert_eq!(cut_point("~~~~~~~~", 4), 4);
        assert_eq!(cut_point("日本", 2), 3);
        assert_eq!(cut_point("", 0), 0);
    }

    #[test]
    fn split_inside_fence_long_line() {
        let text = format!("```\n{}\n```\n", "y".repeat(300));
        let parts = split_parts(&text, 64);
        assert_eq!(strip_added(&parts), text);
        for p in &parts {
            assert!(p.len() <= 64, "{p:?}");
        }
        let strings = split_message(&text, 64);
        assert!(
            strings[1].starts_with("```\n") && strings[1].ends_with("\n```"),
            "{strings:?}"
        );
    }

    #[test]
    fn split_non_fences() {
        // Four spaces of indent, backticks in a backtick info string, a tilde closer for a
        // backtick fence: none of these open or close a fence.
        let text = format!("    ```\n{}``` a`b\n{}", "z\n".repeat(40), "q\n".repeat(40));
        for p in split_parts(&text, 64) {
            assert!(p.prefix.is_empty() && p.suffix.is_empty(), "{p:?}");
        }
        let text = format!("```\n{}~~~\n{}```\n", "z\n".repeat(40), "q\n".repeat(40));
        let parts = split_parts(&text, 64);
        assert!(parts[1..parts.len() - 1]
            .iter()
            .all(|p| p.prefix == "```\n"));
    }

    #[test]
    fn split_unclosed_fence_at_end() {
        let text = format!("```sh\n{}", "echo hi\n".repeat(30));
        let parts = split_parts(&text, 100);
        assert_eq!(strip_added(&parts), text);
        assert!(parts.last().unwrap().suffix.is_empty());
        assert!(parts.iter().all(|p| p.len() <= 100));
    }

    #[test]
    fn split_huge_info_string_is_not_repeated() {
        let opener = format!("```{}\n", "i".repeat(100));
        let text = format!("{opener}{}```\n", "c\n".repeat(100));
        let parts = split_parts(&text, 64);
        assert_eq!(strip_added(&parts), text);
        assert!(parts.iter().all(|p| p.len() <= 64));
        assert!(parts
            .iter()
            .skip(1)
            .all(|p| p.prefix.is_empty() || p.prefix == "```\n"));
    }

    #[test]
    fn split_never_panics_and_keeps_text() {
        let seeds = [
            "```rust\nfn main() {\n    println!(\"日本語 🦀\");\n}\n```\nok\n",
            "~~~\n\r\n\r\n~~~\n",
            "plain é text with spaces and 🦀 crabs ",
            "```\n```\n```\n",
            "\n\n\n\n",
        ];
        let mut state: u64 = 0x2545_F491_4F6C_DD1D;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for max in [0, 1, 2, 3, 4, 5, 17, 64, 65, 100, 333] {
            for _ in 0..60 {
                let mut text = String::new();
                for _ in 0..(next() % 30) {
                    text.push_str(seeds[(next() % seeds.len() as u64) as usize]);
                }
                let parts = split_parts(&text, max);
                assert_eq!(strip_added(&parts), text, "max {max}");
                assert!(
                    parts.iter().all(|p| !p.body.is_empty() || parts.len() == 1),
                    "max {max}"
                );
                let strings = split_message(&text, max);
                assert_eq!(strings.len(), parts.len());
                if max >= 64 {
                    assert!(strings.iter().all(|p| p.len() <= max), "max {max}");
                    // Every part but the last renders with its fences balanced.
                    for s in &strings[..strings.len() - 1] {
                        assert_eq!(scan_fences(None, s), None, "max {max}: {s:?}");
                    }
                }
            }
        }
    }

    // ---- render_reply ----

    #[test]
    fn reply_messages_concatenate() {
        let events = [
            msg(1, 1, "Hello, "),
            msg(2, 1, "world.\n\nSecond"),
            msg(3, 1, " paragraph."),
        ];
        assert_eq!(
            reply(JobState::Succeeded, &events),
            "Hello, world.\n\nSecond paragraph."
        );
        assert_eq!(
            reply(JobState::Running, &events),
            "Hello, world.\n\nSecond paragraph."
        );
    }

    #[test]
    fn reply_tool_calls_in_place() {
        let events = [
            msg(1, 1, "Let me look."),
            tool(2, 1, "c1", "Read src/main.rs", "pending"),
            tool(3, 1, "c2", "Run cargo test", "in_progress"),
            tool_update(4, 1, "c1", json!({ "status": "completed" })),
            msg(5, 1, "Done reading."),
            tool_update(
                6,
                1,
                "c2",
                json!({ "status": "failed", "title": "Run cargo test --all" }),
            ),
        ];
        let out = reply(JobState::Running, &events);
        assert_eq!(
            out,
            "Let me look.\n\n🔧 `Read src/main.rs` ✓  \n🔧 `Run cargo test --all` ✗\n\nDone reading."
        );
        let html = markdown_to_html(&out);
        assert!(html.contains("<p>Let me look.</p>"), "{html}");
        assert!(
            html.contains("<code>Read src/main.rs</code> ✓<br />"),
            "{html}"
        );
    }

    #[test]
    fn reply_tool_status_marks() {
        for (status, mark) in [
            ("pending", "…"),
            ("in_progress", "…"),
            ("completed", "✓"),
            ("failed", "✗"),
            ("weird", "…"),
        ] {
            let out = reply(JobState::Running, &[tool(1, 1, "a", "T", status)]);
            assert_eq!(out, format!("🔧 `T` {mark}"));
        }
    }

    #[test]
    fn reply_tool_title_cut_and_escaped() {
        let long = format!("{}\nsecond line", "é".repeat(300));
        let out = reply(JobState::Running, &[tool(1, 1, "a", &long, "pending")]);
        assert!(!out.contains("second line"));
        assert_eq!(out.chars().filter(|c| *c == 'é').count(), 120);
        assert!(out.contains('…'));

        let out = reply(
            JobState::Running,
            &[tool(1, 1, "a", "```rust <b>x</b> `q`", "completed")],
        );
        assert_eq!(out, "🔧 ```` ```rust <b>x</b> `q` ```` ✓");
        let html = markdown_to_html(&out);
        assert!(!html.contains("<pre") && !html.contains("<b>"), "{html}");

        // No title at all.
        let out = reply(
            JobState::Running,
            &[ev(1, 1, "tool_call", None, Some(json!({ "id": "z" })))],
        );
        assert_eq!(out, "🔧 `tool` …");
    }

    #[test]
    fn reply_tool_update_without_call() {
        let out = reply(
            JobState::Running,
            &[tool_update(
                1,
                1,
                "x",
                json!({ "title": "Edit a.rs", "status": "completed" }),
            )],
        );
        assert_eq!(out, "🔧 `Edit a.rs` ✓");
        // An update without an id cannot be placed.
        let out = reply(
            JobState::Running,
            &[ev(1, 1, "tool_call_update", Some("x"), None)],
        );
        assert_eq!(out, "⏳ working…");
    }

    #[test]
    fn reply_status_events() {
        let events = [
            ev(1, 1, "permission", Some("allow_once"), None),
            ev(2, 1, "fs_denied", Some("path outside the workspace"), None),
            ev(3, 1, "error", Some("agent exited"), None),
        ];
        assert_eq!(
            reply(JobState::Running, &events),
            "🔐 permission: allow_once  \n🚫 path outside the workspace  \n❌ agent exited"
        );
        let out = reply(
            JobState::Running,
            &[ev(1, 1, "permission", Some("cancelled"), None)],
        );
        assert_eq!(out, "🔐 permission: cancelled");
    }

    #[test]
    fn reply_hidden_kinds() {
        let events = [
            ev(1, 1, "thought", Some("thinking"), None),
            ev(2, 1, "stderr", Some("warn"), None),
            ev(3, 1, "usage", None, Some(json!({ "used": 1 }))),
            ev(4, 1, "plan", Some("step"), None),
            ev(5, 1, "commands", Some("a b"), None),
            ev(6, 1, "mode", Some("code"), None),
            ev(7, 1, "fs_read", Some("a.rs"), None),
            ev(8, 1, "fs_write", Some("b.rs"), None),
            ev(9, 1, "rescued", Some("lease expired"), None),
            ev(10, 1, "something_new", Some("?"), None),
        ];
        assert_eq!(reply(JobState::Running, &events), "⏳ working…");
        assert_eq!(reply(JobState::Succeeded, &events), "✅ done (no output)");
    }

    #[test]
    fn reply_latest_attempt_only() {
        let events = [
            msg(1, 1, "partial from attempt one"),
            tool(2, 1, "c1", "Read a", "completed"),
            ev(3, 1, "error", Some("boom"), None),
            ev(4, 2, "rescued", Some("lease expired"), None),
            msg(5, 2, "attempt two answer"),
        ];
        assert_eq!(reply(JobState::Succeeded, &events), "attempt two answer");

        // A later attempt without output (the error that failed it) still shows.
        let events = [
            msg(1, 1, "partial"),
            ev(2, 2, "error", Some("agent could not start"), None),
        ];
        assert_eq!(
            reply_with(
                JobState::Failed,
                Some("agent could not start"),
                None,
                &events
            ),
            "partial\n\n❌ agent could not start"
        );

        // No output anywhere: only the latest attempt's status events.
        let events = [
            ev(1, 1, "error", Some("first"), None),
            ev(2, 2, "error", Some("second"), None),
        ];
        assert_eq!(
            reply_with(JobState::Failed, Some("second"), None, &events),
            "❌ second"
        );
    }

    #[test]
    fn reply_events_sorted_by_seq() {
        let events = [msg(2, 1, "b"), msg(1, 1, "a")];
        assert_eq!(reply(JobState::Succeeded, &events), "ab");
    }

    #[test]
    fn reply_waiting_states() {
        assert_eq!(reply(JobState::Running, &[]), "⏳ working…");
        assert_eq!(reply(JobState::Queued, &[]), "👀 queued");
        assert_eq!(reply(JobState::Queued, &[msg(1, 1, "x")]), "x");
        assert_eq!(reply(JobState::Running, &[msg(1, 1, "x")]), "x");
    }

    #[test]
    fn reply_terminal_states() {
        assert_eq!(reply(JobState::Succeeded, &[]), "✅ done (no output)");
        assert_eq!(reply(JobState::Succeeded, &[msg(1, 1, "answer")]), "answer");
        assert_eq!(
            reply_with(
                JobState::Failed,
                Some("agent exited with code 1"),
                None,
                &[msg(1, 1, "half")]
            ),
            "half\n\n❌ failed: agent exited with code 1"
        );
        // The same text already shown by an error event is not repeated.
        assert_eq!(
            reply_with(
                JobState::Failed,
                Some("boom"),
                None,
                &[msg(1, 1, "half"), ev(2, 1, "error", Some("boom\n"), None)]
            ),
            "half\n\n❌ boom"
        );
        // A different error text is.
        assert_eq!(
            reply_with(
                JobState::Failed,
                Some("lease expired"),
                None,
                &[ev(1, 1, "error", Some("boom"), None)]
            ),
            "❌ boom  \n❌ failed: lease expired"
        );
        assert_eq!(reply_with(JobState::Failed, None, None, &[]), "❌ failed");
        assert_eq!(
            reply_with(JobState::Cancelled, None, None, &[]),
            "🛑 cancelled"
        );
        assert_eq!(
            reply_with(
                JobState::Cancelled,
                Some("cancelled by user"),
                Some("cancelled"),
                &[msg(1, 1, "x")]
            ),
            "x\n\n🛑 cancelled"
        );
        assert_eq!(
            reply_with(JobState::Cancelled, None, Some("cancelled"), &[]),
            "🛑 cancelled"
        );
        assert_eq!(
            reply_with(JobState::Cancelled, None, Some("refusal"), &[]),
            "🛑 cancelled: refusal"
        );
    }

    #[test]
    fn reply_multiline_error_is_a_code_block() {
        let text = "agent exited\nstderr:\n```oops\n<b>x</b>";
        let out = reply_with(JobState::Failed, Some(text), None, &[]);
        assert_eq!(
            out,
            "❌ failed: agent exited\n````\nstderr:\n```oops\n<b>x</b>\n````"
        );
        let html = markdown_to_html(&out);
        assert!(
            html.contains("<pre><code>stderr:\n```oops\n&lt;b&gt;x&lt;/b&gt;\n</code></pre>"),
            "{html}"
        );
        // A status line after a multi-line one starts its own paragraph.
        let events = [
            ev(1, 1, "error", Some("a\nb"), None),
            ev(2, 1, "fs_denied", Some("no"), None),
        ];
        assert_eq!(
            reply(JobState::Running, &events),
            "❌ a\n```\nb\n```\n\n🚫 no"
        );
    }

    #[test]
    fn reply_status_line_inside_code_fence() {
        let events = [
            msg(1, 1, "Here:\n```rust\nfn a() {}\n"),
            tool(2, 1, "t", "Read x", "completed"),
            msg(3, 1, "fn b() {}\n```\nEnd."),
        ];
        let out = reply(JobState::Succeeded, &events);
        assert_eq!(
            out,
            "Here:\n```rust\nfn a() {}\n```\n\n🔧 `Read x` ✓\n\n```rust\nfn b() {}\n```\nEnd."
        );
        // The final status line is not swallowed by an unclosed fence.
        let out = reply_with(
            JobState::Failed,
            Some("crash"),
            None,
            &[msg(1, 1, "```\ncode")],
        );
        assert_eq!(out, "```\ncode\n```\n\n❌ failed: crash");
        let html = markdown_to_html(&out);
        assert!(html.contains("<p>❌ failed: crash</p>"), "{html}");
    }

    #[test]
    fn reply_status_lines_do_not_glue_to_paragraphs() {
        let events = [
            msg(1, 1, "text without newline"),
            tool(2, 1, "t", "T", "pending"),
            msg(3, 1, "\n\nmore"),
        ];
        let out = reply(JobState::Running, &events);
        assert_eq!(out, "text without newline\n\n🔧 `T` …\n\nmore");
        let html = markdown_to_html(&out);
        assert_eq!(html.matches("<p>").count(), 3, "{html}");
    }

    #[test]
    fn reply_show_source() {
        let out = render_reply(&ReplyInput {
            job_id: "0190abcd-ef01-7000-8000-000000000000",
            source: Source::Webhook,
            state: JobState::Succeeded,
            attempt: 1,
            max_attempts: 3,
            error: None,
            stop_reason: None,
            show_source: true,
            events: &[msg(1, 1, "hi")],
        });
        assert_eq!(out, "**webhook** job `0190abcd`\n\nhi");
        let out = render_reply(&ReplyInput {
            job_id: "ab",
            source: Source::Schedule,
            state: JobState::Running,
            attempt: 1,
            max_attempts: 1,
            error: None,
            stop_reason: None,
            show_source: true,
            events: &[],
        });
        assert_eq!(out, "**schedule** job `ab`\n\n⏳ working…");
    }

    #[test]
    fn reply_odd_events_never_panic() {
        let odd = [
            ev(1, 1, "tool_call", None, Some(json!(null))),
            ev(2, 1, "tool_call", None, Some(json!([1, 2]))),
            ev(
                3,
                1,
                "tool_call",
                Some(""),
                Some(json!({ "id": 5, "title": 7 })),
            ),
            ev(
                4,
                1,
                "tool_call_update",
                None,
                Some(json!({ "id": "missing" })),
            ),
            ev(5, 1, "message", None, None),
            ev(6, 1, "error", None, None),
            ev(7, 1, "permission", None, None),
            ev(8, 1, "fs_denied", Some("\n\n"), None),
            ev(9, -5, "message", Some("negative attempt"), None),
            ev(10, i64::MAX, "error", Some("\u{0}\u{7}🦀"), None),
            msg(11, 1, &"```\n".repeat(50)),
        ];
        for &state in JobState::ALL {
            for n in 0..=odd.len() {
                let out = reply_with(state, Some("\n"), Some(""), &odd[..n]);
                let _ = markdown_to_html(&out);
                let _ = split_message(&out, 64);
            }
        }
    }
}
