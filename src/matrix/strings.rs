//! Every text the Matrix bot posts in a room: command answers, errors, hints, help, usage, the
//! status words of job replies and notices. Kept in one place so gorp speaks with one voice.
//!
//! Conventions:
//! - Texts are Markdown; names and ids are shown bold (`**ops**`) or as inline code.
//! - Every error a room sees goes through [`error`], so it starts with ❌. Error texts themselves
//!   (the `problem` of a usage error, what [`no_job`] returns, …) are lowercase fragments
//!   without the mark; [`error`] adds it.
//! - An internal error (gorp's fault, not the person's) shows only [`internal_error`]: a fixed
//!   sentence and the error id that the log line carries.

use std::fmt::Display;

use crate::store::JobState;

use super::render::inline_code;

/// The mark every error reply starts with.
pub const ERROR_MARK: &str = "❌";

/// An error reply: [`ERROR_MARK`], then `text`.
pub fn error(text: &str) -> String {
    format!("{ERROR_MARK} {text}")
}

/// The answer to an internal error: no details, only the id under which they were logged.
pub fn internal_error(error_id: &str) -> String {
    error(&format!(
        "Something went wrong on gorp's side (error id {error_id}); the operator can find it in the log."
    ))
}

/// The status reaction for a job state.
pub fn state_emoji(s: JobState) -> &'static str {
    match s {
        JobState::Queued => "👀",
        JobState::Running => "⏳",
        JobState::Succeeded => "✅",
        JobState::Failed => "❌",
        JobState::Cancelled => "🛑",
    }
}

// ---- help and usage ----

/// The `!help` text (Markdown): every command with its usage and what it does.
pub const HELP: &str = "\
**gorp commands**

- `!help` — this list
- `!create <name>` — create a channel with its own room and invite you
- `!join <name>` — invite you to a channel's room
- `!list` — list the channels
- `!delete <name>` — delete a channel and its job history (its workspace stays on disk)
- `!status` — this room's agent, queue and session
- `!jobs [n]` — the newest jobs (10 by default, at most 50)
- `!job <id>` — one job and its output (the first few characters of the id are enough)
- `!cancel [id]` — cancel a job, or the one running in this room
- `!reset` — the next job starts a new conversation
- `!warm` — start this room's agent now so the next job starts fast
- `!token` — a new webhook token for this room's channel (the old one stops working)
- `!schedule add \"<cron or one-off>\" <prompt>` — run a prompt on a schedule
- `!schedule list` — this room's schedules
- `!schedule pause <id>` / `!schedule resume <id>` / `!schedule rm <id>` — pause, resume or delete a schedule
- `!schedule next \"<cron>\"` — when a schedule would fire
- `!policy [allow|deny|ask]` — show or set what happens when the agent asks to use a tool
- `!approvals` — the agent's requests waiting for a decision
- `!allow [id]` / `!always [id]` / `!deny [id]` — answer a request (or react ✅ ♾️ ❌ to it)
- `!answer [id] <answer>` — answer a question of the agent (or react with a choice's number; `!deny` or ❌ declines it)
- `!rules` / `!rules rm <id>` — the \"allow always\" rules of this room's channel
- `!options` — the agent's session options (model, mode, …) and those this channel sets
- `!model [name|default]` / `!mode [name|default]` — show or set the channel's model or mode (`default`: the agent's own)
- `!usage [since]` — what this room's channel spent per day (7 days, or e.g. `30d`, `2026-12-01`)
- `!budget` / `!budget job|day|month <usd>` / `!budget tokens <n>` — show the channel's limits and spend, or set one (`default`: the config's)

Any other message in a channel's room is a prompt for its agent.";

/// The usage line of each command, as shown after `usage:`.
pub mod usage {
    pub const HELP: &str = "!help";
    pub const CREATE: &str = "!create <name>";
    pub const JOIN: &str = "!join <name>";
    pub const LIST: &str = "!list";
    pub const DELETE: &str = "!delete <name>";
    pub const STATUS: &str = "!status";
    pub const JOBS: &str = "!jobs [n]";
    pub const JOB: &str = "!job <id>";
    pub const CANCEL: &str = "!cancel [id]";
    pub const RESET: &str = "!reset";
    pub const WARM: &str = "!warm";
    pub const TOKEN: &str = "!token";
    pub const SCHEDULE: &str = "!schedule add|list|pause|resume|rm|next …";
    pub const SCHEDULE_ADD: &str = "!schedule add \"<cron or one-off>\" <prompt>";
    pub const SCHEDULE_LIST: &str = "!schedule list";
    pub const SCHEDULE_PAUSE: &str = "!schedule pause <id>";
    pub const SCHEDULE_RESUME: &str = "!schedule resume <id>";
    pub const SCHEDULE_RM: &str = "!schedule rm <id>";
    pub const SCHEDULE_NEXT: &str = "!schedule next \"<cron>\"";
    pub const ALLOW: &str = "!allow [id]";
    pub const ALWAYS: &str = "!always [id]";
    pub const DENY: &str = "!deny [id]";
    pub const ANSWER: &str = "!answer [id] <answer>";
    pub const USAGE: &str = "!usage [since]";
    pub const BUDGET: &str = "!budget [job|day|month <usd>|tokens <n>|<which> default]";
    pub const APPROVALS: &str = "!approvals";
    pub const RULES: &str = "!rules [rm <id>]";
    pub const RULES_RM: &str = "!rules rm <id>";
    pub const POLICY: &str = "!policy [allow|deny|ask]";
    pub const OPTIONS: &str = "!options";
    pub const MODEL: &str = "!model [name|default]";
    pub const MODE: &str = "!mode [name|default]";
}

// ---- malformed commands (the parser's problems; one line each) ----

/// A malformed command: the problem, then the usage as inline code.
pub fn usage_error(problem: &str, usage: &str) -> String {
    format!("{problem}; usage: {}", inline_code(usage))
}

/// An unknown command word; `shown` is the word as echoed back (already shortened), `None`
/// for a lone `!`.
pub fn unknown_command(shown: Option<&str>) -> String {
    match shown {
        None => "unknown command `!`; `!help` lists the commands".to_string(),
        Some(word) => format!(
            "unknown command {}; `!help` lists the commands",
            inline_code(&format!("!{word}"))
        ),
    }
}

pub const NO_ARGUMENTS: &str = "this command takes no arguments";
pub const TOO_MANY_ARGUMENTS: &str = "too many arguments";
pub const OPTION_VALUE_SHAPE: &str = "an option value is at most 256 characters";
pub const MISSING_CHANNEL_NAME: &str = "missing channel name";
pub const MISSING_JOB_ID: &str = "missing job id";
pub const MISSING_SCHEDULE_ID: &str = "missing schedule id";
pub const MISSING_SUBCOMMAND: &str = "missing subcommand";
pub const UNKNOWN_SUBCOMMAND: &str = "unknown subcommand";
pub const MISSING_PROMPT: &str = "missing prompt";
pub const MISSING_SPEC: &str = "missing schedule spec";
pub const SPEC_NOT_QUOTED: &str = "put the schedule spec in double quotes";
pub const SPEC_NOT_CLOSED: &str = "the schedule spec has no closing quote";
pub const SPEC_EMPTY: &str = "the schedule spec is empty";
pub const SCHEDULE_ID_SHAPE: &str = "a schedule id is a positive number";
pub const APPROVAL_ID_SHAPE: &str =
    "a request id is up to 32 digits and letters a-f; its first few characters are enough";
pub const MISSING_RULE_ID: &str = "missing rule id";
pub const RULE_ID_SHAPE: &str = "a rule id is a positive number";
pub const UNKNOWN_POLICY: &str = "the policy is allow, deny or ask";

/// `!jobs n` out of range.
pub fn jobs_count_range(max: i64) -> String {
    format!("the number of jobs must be between 1 and {max}")
}

/// What a job id looks like (gorp's ids are UUIDs, version 7, written with dashes).
pub const JOB_ID_SHAPE: &str = "a job id looks like `0190a5d2-ac96-7c4b-bcce-b302099a8057` (digits, letters a-f and dashes); its first few characters are enough";

// ---- rooms and channels ----

/// A message or command that needs a channel, in a room that is none.
pub const NOT_A_CHANNEL: &str =
    "this room is not a gorp channel; `!create <name>` makes one and `!help` lists the commands";

pub fn no_channel(name: &str) -> String {
    format!("no channel **{name}**; `!list` shows the channels")
}

pub fn channel_exists(name: &str) -> String {
    format!("channel **{name}** exists; `!join {name}` invites you to its room")
}

pub fn channel_busy(name: &str) -> String {
    format!("channel **{name}** has a running job; `!cancel` it first")
}

pub fn not_in_channel_room(name: &str) -> String {
    format!("gorp is not in **{name}**'s room")
}

/// A Markdown link to a room.
pub fn room_link(room: &impl Display) -> String {
    format!("[{room}](https://matrix.to/#/{room})")
}

pub fn already_in_room(name: &str, link: &str) -> String {
    format!("You are already in **{name}**'s room ({link}).")
}

pub fn invited(name: &str, link: &str) -> String {
    format!("Invited you to **{name}**'s room ({link}).")
}

pub fn room_created_for(name: &str, link: &str) -> String {
    format!("Channel **{name}** had no room; created {link} and invited you.")
}

pub const NO_CHANNELS: &str = "No channels yet. `!create <name>` makes one.";
pub const CHANNELS_HEADER: &str = "Channels:\n";

pub fn channel_line(name: &str, room: Option<&str>, queued: i64) -> String {
    let room = room
        .map(|r| format!("`{r}`"))
        .unwrap_or_else(|| "no room".into());
    format!("- **{name}** — {room} — {queued} queued\n")
}

/// Posted in a deleted channel's room before gorp leaves it.
pub fn channel_deleted_notice(name: &str) -> String {
    format!("Channel **{name}** was deleted; gorp leaves this room.")
}

pub fn channel_deleted(name: &str, workspace: &impl Display) -> String {
    format!("Deleted channel **{name}** and its job history. Its workspace `{workspace}` is kept on disk.")
}

pub fn room_name(name: &str) -> String {
    format!("gorp: {name}")
}

pub fn room_topic(name: &str) -> String {
    format!("gorp channel {name}")
}

/// The first message in a new channel's room, with its webhook token (shown only there).
pub fn welcome(name: &str, workspace: &impl Display, url: &str, token: &str) -> String {
    format!(
        "This room is gorp channel **{name}**. Every message here is a prompt for its agent (workspace `{workspace}`); `!help` lists the commands.\n\nWebhook: `POST {url}` with `Authorization: Bearer {token}` (the token is shown only here; gorp keeps its hash)."
    )
}

pub fn channel_created(name: &str, link: &str, url: &str) -> String {
    format!(
        "Created channel **{name}**: {link} (you are invited).\n\nWebhook: `POST {url}` — its token is in the new room."
    )
}

pub const TOKEN_NEEDS_ENCRYPTION: &str =
    "this room is not encrypted; gorp posts tokens only in encrypted rooms";

pub fn new_token(name: &str, url: &str, token: &str) -> String {
    format!(
        "New webhook token for **{name}** (the old one no longer works):\n\n`POST {url}` with `Authorization: Bearer {token}`"
    )
}

// ---- the channel's agent ----

pub fn reset_done(name: &str) -> String {
    format!("**{name}**: the next job starts a new conversation (ACP session).")
}

pub fn warming(name: &str) -> String {
    format!("**{name}**: warming the agent; `!status` shows when it is ready.")
}

/// What `!status` says about the agent process: its state, pid and warm deadline.
pub fn agent_line(state: &str, pid: Option<i64>, warm_until: Option<&str>) -> String {
    let mut l = state.to_string();
    if let Some(pid) = pid {
        l.push_str(&format!(" (pid {pid})"));
    }
    if let Some(until) = warm_until {
        l.push_str(&format!(", stays warm until {until} UTC"));
    }
    l
}

pub const AGENT_COLD: &str = "cold";
pub const NOTHING_RUNNING: &str = "none";
pub const NO_SESSION: &str = "none (the next job starts one)";

pub fn running_line(job_id: &str, since: &str, attempt: i64) -> String {
    format!("`{job_id}` since {since} UTC (attempt {attempt})")
}

pub fn status(
    name: &str,
    agent: &str,
    queued: i64,
    running: &str,
    session: Option<&str>,
    workspace: &impl Display,
) -> String {
    let session = session
        .map(|x| format!("`{x}`"))
        .unwrap_or_else(|| NO_SESSION.into());
    format!(
        "**{name}**\n- agent: {agent}\n- queued: {queued}\n- running: {running}\n- ACP session: {session}\n- workspace: `{workspace}`"
    )
}

// ---- jobs ----

pub const NO_JOBS: &str = "No jobs.";

pub fn job_line(id: &str, state: JobState, channel: &str, source: &str, prompt: &str) -> String {
    format!(
        "- `{id}` {} {channel} {source} — {prompt}\n",
        state_emoji(state)
    )
}

/// The head of `!job`: id, state, channel, source, creation time and attempts.
#[allow(clippy::too_many_arguments)]
pub fn job_head(
    id: &str,
    state: JobState,
    channel: &str,
    source: &str,
    created: &str,
    attempt: i64,
    max_attempts: i64,
) -> String {
    format!(
        "`{id}` {} **{}** on **{channel}** from {source}\n- created {created} UTC, attempt {attempt} of {max_attempts}\n",
        state_emoji(state),
        state.as_str()
    )
}

pub fn job_error_line(error: &str) -> String {
    format!("- error: {error}\n")
}

pub fn job_prompt_line(prompt: &str) -> String {
    format!("- prompt: {prompt}\n")
}

/// After the first part of a long output in `!job`.
pub fn job_output_cut(id: &str) -> String {
    format!("\n\n… (`gorp job {id}` shows all of it)")
}

pub fn no_job(prefix: &str) -> String {
    format!("no job matches `{prefix}`; `!jobs` lists the recent ones")
}

pub fn ambiguous_job(prefix: &str) -> String {
    format!("`{prefix}` matches more than one job; give more of the id")
}

pub fn nothing_running(channel: &str) -> String {
    format!("nothing is running in **{channel}**")
}

pub fn cancelled_before_start(id: &str) -> String {
    format!("🛑 `{id}` cancelled before it ran.")
}

pub fn stopping(id: &str) -> String {
    format!("🛑 stopping `{id}`…")
}

pub fn already_finished(id: &str, state: JobState) -> String {
    format!("`{id}` already finished ({}).", state.as_str())
}

/// A prompt the store refused (e.g. too long); `why` is the store's reason.
pub fn not_queued(why: &str) -> String {
    format!("not queued: {why}")
}

/// A message gorp could not decrypt.
pub fn undecryptable(sender: &impl Display) -> String {
    error(&format!(
        "gorp could not decrypt a message from {sender}: its room key did not reach gorp's device. Nothing was run. Send it again; if this keeps happening, let your client share keys with unverified devices (gorp's device is never verified)."
    ))
}

// ---- schedules ----

pub const NO_SCHEDULES: &str = "No schedules.";

/// How a schedule fires, as listed: the cron expression or "once".
pub fn schedule_when(cron: Option<&str>) -> String {
    cron.map(|c| format!("`{c}`"))
        .unwrap_or_else(|| "once".into())
}

pub fn schedule_added(id: i64, when: &str, timezone: &str, next: &str) -> String {
    format!("Schedule **{id}** added: {when} ({timezone}), next run {next} UTC.")
}

pub fn schedule_line(
    id: i64,
    enabled: bool,
    when: &str,
    timezone: &str,
    next: Option<&str>,
    prompt: &str,
) -> String {
    let next = next
        .map(|t| format!("{t} UTC"))
        .unwrap_or_else(|| "-".into());
    format!(
        "- **{id}** {} {when} ({timezone}) next {next} — {prompt}\n",
        if enabled { "▶" } else { "⏸" }
    )
}

pub fn schedule_paused(id: i64) -> String {
    format!("Schedule **{id}** paused.")
}

pub fn schedule_resumed(id: i64) -> String {
    format!("Schedule **{id}** resumed.")
}

pub fn schedule_deleted(id: i64) -> String {
    format!("Schedule **{id}** deleted.")
}

pub fn no_schedule(id: i64) -> String {
    format!("no schedule {id}")
}

pub fn next_runs_header(spec: &str, timezone: &str) -> String {
    format!("`{spec}` in {timezone} runs next at:\n")
}

/// What gorp reads as a cron expression, said the same way everywhere.
const CRON_FORMS: &str = "5 fields (minute hour day-of-month month day-of-week, e.g. `0 9 * * 1-5`), 6 with seconds first, or an alias such as `@daily`";

/// The one-off forms `!schedule add` accepts besides cron.
const ONE_OFF_FORMS: &str = "`in 30m` (s, m, h or d) or a time such as `2026-12-01T09:00:00+01:00`";

/// A spec with the wrong number of fields for a cron expression.
pub fn cron_field_count(spec: &str, fields: usize, one_off_too: bool) -> String {
    let or_one_off = if one_off_too {
        format!("; a one-off is {ONE_OFF_FORMS}")
    } else {
        String::new()
    };
    format!(
        "{} has {fields} field{} but a cron expression has {CRON_FORMS}{or_one_off}",
        inline_code(spec),
        if fields == 1 { "" } else { "s" }
    )
}

/// A cron expression with the right number of fields whose values gorp cannot read, or an
/// unknown alias.
pub fn cron_invalid(spec: &str) -> String {
    format!(
        "{} is not a valid cron expression: minute is 0-59, hour 0-23, day-of-month 1-31, month 1-12 or JAN-DEC, day-of-week 0-7 or SUN-SAT (seconds 0-59 come first in the 6-field form); the aliases are @yearly, @monthly, @weekly, @daily and @hourly",
        inline_code(spec)
    )
}

// ---- job replies (rendered by `render`, posted by `pump`) ----

pub const REPLY_QUEUED: &str = "queued";
pub const REPLY_WORKING: &str = "working…";
pub const REPLY_DONE_NO_OUTPUT: &str = "done (no output)";
pub const REPLY_FAILED: &str = "failed";

pub fn reply_failed(error: &str) -> String {
    format!("failed: {error}")
}

/// The last line of a cancelled job's reply (after 🛑), said once: `cancelled`, the reason when
/// it already reads as a cancellation (`cancelled before it started`), else
/// `cancelled: <reason>`. A plain cancel by a person (`cancelled by user`, from `!cancel` or
/// a 🛑 reaction, both visible in the room) is just `cancelled`.
pub fn reply_cancelled(why: Option<&str>) -> String {
    let why = why.map(str::trim).filter(|w| {
        !w.is_empty()
            && !w.eq_ignore_ascii_case("cancelled")
            && !w.eq_ignore_ascii_case("cancelled by user")
    });
    match why {
        None => "cancelled".into(),
        Some(w) if w.to_lowercase().starts_with("cancelled ") => w.to_string(),
        Some(w) => format!("cancelled: {w}"),
    }
}

pub fn reply_permission(what: Option<&str>) -> String {
    format!("permission: {}", what.unwrap_or("unknown"))
}

pub const REPLY_ACCESS_DENIED: &str = "access denied";

/// The head of a reply to a job that did not come from the room (webhook, schedule, CLI).
pub fn reply_source_head(source: &str, id8: &str) -> String {
    format!("**{source}** job {}\n\n", inline_code(id8))
}

/// Posted when gorp restarted while a job ran (the job runs again).
pub fn restart_notice(id8: &str, why: Option<&str>) -> String {
    format!(
        "↻ gorp restarted while job `{id8}` was running: {}",
        why.unwrap_or("its lease expired")
    )
}

// ---- approvals ----

/// The reaction keys that answer a posted permission request.
pub const ALLOW_ONCE_KEY: &str = "✅";
pub const ALLOW_ALWAYS_KEY: &str = "♾️";
pub const DENY_KEY: &str = "❌";

/// Longest excerpt of a tool's input shown in a request (characters).
const MAX_INPUT_CHARS: usize = 3000;
/// Most lines of a tool's input shown in a request.
const MAX_INPUT_LINES: usize = 40;

/// The short form of an approval id people type (`!allow 0190a5d2`).
pub fn short_approval(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

/// At most [`MAX_INPUT_LINES`] lines and [`MAX_INPUT_CHARS`] characters of `text`, saying how
/// much was left out.
fn excerpt(text: &str) -> String {
    let mut out = String::new();
    for (shown, line) in text.lines().enumerate() {
        if shown == MAX_INPUT_LINES || out.chars().count() + line.chars().count() > MAX_INPUT_CHARS
        {
            let left = text.lines().count() - shown;
            out.push_str(&format!("… ({left} more lines)"));
            return out;
        }
        out.push_str(line);
        out.push('\n');
    }
    out.trim_end_matches('\n').to_string()
}

/// The tool's input as a code block: the command, the diff of an edit, the content of a new
/// file, else the JSON the agent sent.
pub fn approval_input(kind: Option<&str>, input: &serde_json::Value) -> String {
    let raw = &input["rawInput"];
    if let Some(cmd) = raw["command"].as_str() {
        return super::render::code_block(&excerpt(cmd));
    }
    let diffs: Vec<String> = input["content"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| c["type"] == "diff")
        .map(|c| {
            let mut d = format!("--- {}\n", c["path"].as_str().unwrap_or("?"));
            for l in c["oldText"].as_str().unwrap_or_default().lines() {
                d.push_str(&format!("-{l}\n"));
            }
            for l in c["newText"].as_str().unwrap_or_default().lines() {
                d.push_str(&format!("+{l}\n"));
            }
            d
        })
        .collect();
    if !diffs.is_empty() {
        return super::render::code_block(&excerpt(&diffs.join("\n")));
    }
    if let Some(content) = raw["content"].as_str() {
        let path = raw["file_path"].as_str().unwrap_or("a new file");
        return format!(
            "{}\n{}",
            inline_code(path),
            super::render::code_block(&excerpt(content))
        );
    }
    if raw.is_null() || (raw.is_object() && raw.as_object().is_some_and(|o| o.is_empty())) {
        return String::new();
    }
    let _ = kind;
    let json = serde_json::to_string_pretty(raw).unwrap_or_default();
    super::render::code_block(&excerpt(&json))
}

/// A permission request, as posted in the channel's room.
pub fn approval_request(
    id: &str,
    job: &str,
    title: Option<&str>,
    kind: Option<&str>,
    input: &serde_json::Value,
    timeout_secs: u64,
) -> String {
    let short = short_approval(id);
    let title = title.filter(|t| !t.trim().is_empty()).unwrap_or("a tool");
    let mut s = format!(
        "🔐 **The agent asks to use a tool** ({}, job {})\n\n{}{}\n",
        inline_code(short),
        inline_code(job.get(..8).unwrap_or(job)),
        inline_code(title),
        kind.map(|k| format!(" — {k}")).unwrap_or_default(),
    );
    let body = approval_input(kind, input);
    if !body.is_empty() {
        s.push('\n');
        s.push_str(&body);
        s.push('\n');
    }
    s.push_str(&format!(
        "\nReact {ALLOW_ONCE_KEY} allow once · {ALLOW_ALWAYS_KEY} allow always · {DENY_KEY} deny, or \
         send `!allow {short}`, `!always {short}`, `!deny {short}`. Denied if nobody answers \
         within {}.",
        duration_words(timeout_secs)
    ));
    s
}

fn duration_words(secs: u64) -> String {
    match secs {
        s if s % 3600 == 0 && s >= 3600 => format!("{} h", s / 3600),
        s if s % 60 == 0 && s >= 60 => format!("{} min", s / 60),
        s => format!("{s} s"),
    }
}

/// The keycap reactions that pick a question's choice by number (1 to 9).
pub const NUMBER_KEYS: [&str; 9] = [
    "1\u{fe0f}\u{20e3}",
    "2\u{fe0f}\u{20e3}",
    "3\u{fe0f}\u{20e3}",
    "4\u{fe0f}\u{20e3}",
    "5\u{fe0f}\u{20e3}",
    "6\u{fe0f}\u{20e3}",
    "7\u{fe0f}\u{20e3}",
    "8\u{fe0f}\u{20e3}",
    "9\u{fe0f}\u{20e3}",
];

/// The mark of a question from the agent and of its answer.
pub const QUESTION_MARK: &str = "❓";

/// A question from the agent as posted in the room: its message, the form's fields with their
/// numbered choices, and how to answer.
pub fn question_request(
    id: &str,
    job: &str,
    message: Option<&str>,
    fields: &[crate::service::questions::Field],
    reactions: usize,
    timeout_secs: u64,
) -> String {
    let short = short_approval(id);
    let mut s = format!(
        "{QUESTION_MARK} **The agent asks** ({}, job {})\n\n{}\n",
        inline_code(short),
        inline_code(job.get(..8).unwrap_or(job)),
        excerpt(message.unwrap_or("(no message)")),
    );
    for f in fields {
        s.push_str(&format!("\n**{}**", f.label()));
        if f.label() != f.name {
            s.push_str(&format!(" ({})", inline_code(&f.name)));
        }
        if let Some(d) = &f.description {
            s.push_str(&format!(" — {}", excerpt(d)));
        }
        s.push('\n');
        for (i, (value, title)) in f.choices.iter().enumerate() {
            s.push_str(&format!("{}. {}", i + 1, title));
            if title != value {
                s.push_str(&format!(" ({})", inline_code(value)));
            }
            s.push('\n');
        }
    }
    let react = if reactions > 0 {
        format!(
            "React {} to pick a choice, or send ",
            NUMBER_KEYS[..reactions].join(" ")
        )
    } else {
        "Send ".to_string()
    };
    s.push_str(&format!(
        "\n{react}`!answer {short} <answer>` ({}). React {DENY_KEY} or send `!deny {short}` to \
         decline. Declined if nobody answers within {}.",
        crate::service::questions::hint(fields),
        duration_words(timeout_secs)
    ));
    s
}

/// The request's message once decided: what was decided, by whom and how.
pub fn approval_decided(
    id: &str,
    title: Option<&str>,
    state: crate::store::ApprovalState,
    by: Option<&str>,
    via: Option<crate::store::DecidedVia>,
    rule: Option<&str>,
) -> String {
    use crate::store::{ApprovalState as S, DecidedVia as V};
    let title = inline_code(title.unwrap_or("a tool"));
    let short = inline_code(short_approval(id));
    let by = by.unwrap_or("someone");
    let how = match via {
        Some(V::Matrix) => " in Matrix",
        Some(V::Http) => " over HTTP",
        Some(V::Cli) => " from the command line",
        _ => "",
    };
    let what = match (state, via) {
        (S::Allowed, _) if rule.is_some() => format!(
            "{ALLOW_ALWAYS_KEY} **Allowed always** by {by}{how}; rule: {}",
            inline_code(rule.unwrap_or_default())
        ),
        (S::Allowed, _) => format!("{ALLOW_ONCE_KEY} **Allowed once** by {by}{how}"),
        (S::Answered, _) => format!("{QUESTION_MARK} **Answered** by {by}{how}"),
        (S::Declined, Some(V::Timeout)) => "⌛ **Declined**: nobody answered in time".to_string(),
        (S::Declined, _) => format!("{DENY_KEY} **Declined** by {by}{how}"),
        (S::Denied, Some(V::Timeout)) => "⌛ **Denied**: nobody answered in time".to_string(),
        (S::Denied, _) => format!("{DENY_KEY} **Denied** by {by}{how}"),
        (S::Expired, _) => {
            "⚠️ **Expired**: gorp stopped while this request waited; the job runs again and asks again"
                .to_string()
        }
        (S::Cancelled, _) => "🛑 **Withdrawn**: the job ended before anyone answered".to_string(),
        (S::Pending, _) => "🔐 waiting".to_string(),
    };
    format!("{what} — {title} ({short})")
}

/// `!approvals` with nothing pending.
pub fn no_pending_approvals(channel: &str) -> String {
    format!("Nothing in **{channel}** is waiting for a decision.")
}

/// One line of `!approvals`.
pub fn approval_line(
    id: &str,
    request: crate::store::RequestKind,
    title: Option<&str>,
    kind: Option<&str>,
    job: &str,
) -> String {
    let what = match request {
        crate::store::RequestKind::Question => format!(
            "{QUESTION_MARK} {} (question)",
            inline_code(&title.unwrap_or("?").chars().take(80).collect::<String>())
        ),
        crate::store::RequestKind::Permission => format!(
            "{} ({})",
            inline_code(title.unwrap_or("a tool")),
            kind.unwrap_or("other")
        ),
    };
    format!(
        "- {} {what} — job {}",
        inline_code(short_approval(id)),
        inline_code(job.get(..8).unwrap_or(job))
    )
}

pub fn no_approval(prefix: &str) -> String {
    format!("no request of this room's channel starts with `{prefix}`")
}

pub fn ambiguous_approval(prefix: &str) -> String {
    format!("`{prefix}` matches more than one request; give more of the id")
}

pub const NO_PENDING_TO_DECIDE: &str = "nothing in this room is waiting for a decision";

pub fn several_pending(n: usize) -> String {
    format!("{n} requests are waiting; give the id (`!approvals` lists them)")
}

pub fn approval_not_pending(id: &str, state: crate::store::ApprovalState) -> String {
    format!(
        "request {} is already {state}",
        inline_code(short_approval(id))
    )
}

pub fn approval_not_offered(what: &str) -> String {
    format!("the agent did not offer that answer: {what}")
}

pub fn decided_reply(id: &str, state: crate::store::ApprovalState) -> String {
    use crate::store::ApprovalState as S;
    format!(
        "{} {} {} {state}.",
        match state {
            S::Allowed => ALLOW_ONCE_KEY,
            S::Answered => QUESTION_MARK,
            _ => DENY_KEY,
        },
        match state {
            S::Answered | S::Declined => "question",
            _ => "request",
        },
        inline_code(short_approval(id))
    )
}

/// The start of a question's message, for the line that says how it was decided.
pub fn first_words(text: &str) -> String {
    let line = text.lines().next().unwrap_or_default();
    match line.char_indices().nth(80) {
        Some((i, _)) => format!("{}…", &line[..i]),
        None => line.to_string(),
    }
}

/// A question's answer under the line that says who answered it.
pub fn answer_shown(answer: &serde_json::Value) -> String {
    let text = match answer.as_object() {
        Some(fields) => fields
            .iter()
            .map(|(k, v)| match v.as_str() {
                Some(s) => format!("{k}: {s}"),
                None => format!("{k}: {v}"),
            })
            .collect::<Vec<_>>()
            .join("\n"),
        None => answer.to_string(),
    };
    format!("\n\n{}", super::render::code_block(&excerpt(&text)))
}

pub fn bad_answer(why: &str) -> String {
    format!("that answer does not fit the question: {why}")
}

pub fn not_a_question(id: &str) -> String {
    format!(
        "{} is a permission request: answer it with `!allow`, `!always` or `!deny`",
        inline_code(short_approval(id))
    )
}

pub fn is_a_question(id: &str) -> String {
    format!(
        "{} is a question: answer it with `!answer` or decline it with `!deny`",
        inline_code(short_approval(id))
    )
}

pub const MISSING_ANSWER: &str = "give the answer after the command";

pub const BUDGET_COST_SHAPE: &str = "a cost budget is a number of USD from 0 to 1000000";
pub const BUDGET_TOKENS_SHAPE: &str = "a token budget is a whole number, 1 or more";
pub const UNKNOWN_BUDGET: &str = "set `job`, `day`, `month` (USD) or `tokens`";
pub const MISSING_BUDGET_VALUE: &str = "give the budget after its name (or `default`)";

/// `!usage`: a channel's spend per day.
pub fn usage_report(channel: &str, r: &crate::service::usage::Report) -> String {
    if r.rows.is_empty() {
        return format!(
            "**{channel}** has spent nothing since {} (UTC).",
            crate::store::format_ms(r.since)
        );
    }
    let mut s = format!(
        "**{channel}** since {} (UTC):\n",
        crate::store::format_ms(r.since)
    );
    for row in r.rows.iter().chain(std::iter::once(&r.total)) {
        s.push_str(&format!(
            "- {}: {} jobs, {} tokens in, {} out, **{:.4} USD**, {:.0} s of agent time\n",
            if row.key == "total" {
                "**total**"
            } else {
                row.key.as_str()
            },
            row.jobs,
            row.input_tokens,
            row.output_tokens,
            row.cost_usd,
            row.agent_secs
        ));
    }
    s
}

/// The last line of a finished job's reply: how long its turn took, its tokens and cost, as far
/// as they are known (`None` when nothing is).
pub fn reply_footer(
    duration_ms: Option<i64>,
    input_tokens: Option<i64>,
    output_tokens: Option<i64>,
    cost_usd: Option<f64>,
) -> Option<String> {
    let mut parts = Vec::new();
    if let Some(ms) = duration_ms.filter(|ms| *ms >= 0) {
        parts.push(format!("⏱ {:.1} s", ms as f64 / 1000.0));
    }
    if input_tokens.is_some() || output_tokens.is_some() {
        let (i, o) = (input_tokens.unwrap_or(0), output_tokens.unwrap_or(0));
        parts.push(format!("{} tokens ({i} in, {o} out)", i + o));
    }
    if let Some(c) = cost_usd {
        parts.push(format!("{c:.4} USD"));
    }
    (!parts.is_empty()).then(|| parts.join(" · "))
}

/// `!budget`: a channel's per-job limits and where they come from, then one line per window
/// of its spend against its budget.
pub fn budget_is(
    channel: &str,
    usd: (Option<f64>, bool),
    tokens: (Option<i64>, bool),
    spend: &[String],
) -> String {
    let from = |own: bool| {
        if own {
            "the channel's"
        } else {
            "from the config"
        }
    };
    let mut s = format!(
        "**{channel}** per-job budget: {} ({}), {} ({}). A job over it is stopped and fails with stop reason `budget`.",
        usd.0
            .map(|c| format!("**{c} USD**"))
            .unwrap_or_else(|| "no cost limit".into()),
        from(usd.1),
        tokens
            .0
            .map(|t| format!("**{t} tokens**"))
            .unwrap_or_else(|| "no token limit".into()),
        from(tokens.1),
    );
    for line in spend {
        s.push_str("\n- ");
        s.push_str(line);
    }
    s
}

/// The room's notice that a job is held by a spent budget (`why` is its `held` event).
pub fn held_notice(job: &str, why: &str) -> String {
    format!("⏸ job {job} is {why}. `!budget` shows the figures; `!budget day <usd>` or `!budget month <usd>` raises a budget.")
}

/// `!options`: what the channel sets and what its agent offers (Markdown).
pub fn options_view(view: &crate::service::channels::OptionsView) -> String {
    let mut lines = Vec::new();
    match &view.offered {
        None => lines.push(format!(
            "**{}**: its agent has not run yet, so its options are not known (`!warm` starts it)",
            view.channel
        )),
        Some(list) if list.is_empty() => {
            lines.push(format!("**{}**: the agent offers no options", view.channel))
        }
        Some(list) => {
            lines.push(format!("**{}** session options:", view.channel));
            for o in list {
                let set = view
                    .set_for(o)
                    .map(|v| format!(" — set to **{v}**"))
                    .unwrap_or_default();
                lines.push(format!(
                    "- `{}`: {} (one of {}){set}",
                    o.id,
                    inline_code(&o.current),
                    o.values
                        .iter()
                        .map(|v| inline_code(v))
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
        }
    }
    let other: Vec<String> = view
        .set_elsewhere()
        .iter()
        .map(|(k, v)| inline_code(&format!("{k}={v}")))
        .collect();
    if !other.is_empty() {
        lines.push(format!("set for the channel: {}", other.join(" ")));
    }
    lines.join("\n")
}

/// `!model` / `!mode` without a value.
pub fn option_is(channel: &str, key: &str, set: Option<&str>, current: Option<&str>) -> String {
    match (set, current) {
        (Some(v), _) => format!("**{channel}** {key}: **{v}** (set for the channel)"),
        (None, Some(c)) => format!("**{channel}** {key}: **{c}** (the agent's own)"),
        (None, None) => format!(
            "**{channel}** sets no {key}; its agent has not said which it offers yet (`!options`)"
        ),
    }
}

/// `!model <v>` / `!mode <v>` (`None`: back to the agent's own).
pub fn option_set(channel: &str, key: &str, value: Option<&str>) -> String {
    match value {
        Some(v) => format!("**{channel}** {key} is now **{v}**; the next prompt runs with it."),
        None => format!(
            "**{channel}** no longer sets a {key}; the next prompt runs with the agent's own."
        ),
    }
}

pub fn policy_is(channel: &str, policy: crate::store::PermissionPolicy) -> String {
    format!(
        "**{channel}** permission policy: **{policy}** ({})",
        policy_words(policy)
    )
}

pub fn policy_set(channel: &str, policy: crate::store::PermissionPolicy) -> String {
    format!(
        "**{channel}** permission policy is now **{policy}** ({}); the next prompt runs under it.",
        policy_words(policy)
    )
}

fn policy_words(policy: crate::store::PermissionPolicy) -> &'static str {
    use crate::store::PermissionPolicy as P;
    match policy {
        P::Allow => "the agent may use every tool",
        P::Deny => "every tool request is refused",
        P::Ask => "tool requests are posted here for a decision",
    }
}

pub fn no_rules(channel: &str) -> String {
    format!("**{channel}** has no \"allow always\" rules.")
}

pub fn rule_line(id: i64, kind: &str, matcher: &str, by: &str) -> String {
    format!("- {id}: {kind} {} (by {by})", inline_code(matcher))
}

pub fn rule_removed(id: i64) -> String {
    format!("Rule {id} removed; requests it matched ask again.")
}

pub fn no_rule(id: i64) -> String {
    format!("this room's channel has no rule {id}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_start_with_the_mark() {
        assert_eq!(error("no job"), "❌ no job");
        let internal = internal_error("3f9a1c2e");
        assert!(internal.starts_with("❌ "), "{internal}");
        assert!(internal.contains("error id 3f9a1c2e"), "{internal}");
        assert!(undecryptable(&"@a:b").starts_with("❌ "));
    }

    #[test]
    fn a_cancel_is_said_once() {
        assert_eq!(reply_cancelled(None), "cancelled");
        assert_eq!(reply_cancelled(Some("cancelled")), "cancelled");
        assert_eq!(reply_cancelled(Some("cancelled by user")), "cancelled");
        assert_eq!(
            reply_cancelled(Some("cancelled before it started")),
            "cancelled before it started"
        );
        assert_eq!(
            reply_cancelled(Some("gorp is shutting down")),
            "cancelled: gorp is shutting down"
        );
        for why in [
            None,
            Some("cancelled by user"),
            Some("cancelled before it started"),
        ] {
            let text = reply_cancelled(why);
            assert_eq!(text.matches("cancelled").count(), 1, "{text}");
        }
    }

    #[test]
    fn the_job_id_shape_is_plain() {
        assert!(!JOB_ID_SHAPE.contains("starting with"), "{JOB_ID_SHAPE}");
        // The example is a real UUID v7 as gorp writes job ids.
        let example = JOB_ID_SHAPE.split('`').nth(1).unwrap();
        let id = uuid::Uuid::parse_str(example).unwrap();
        assert_eq!(id.get_version_num(), 7);
        assert_eq!(id.to_string(), example);
    }
}
