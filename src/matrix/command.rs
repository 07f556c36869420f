//! The `!` commands people type in a Matrix room, parsed without side effects.
//!
//! A message is a command when its first non-whitespace character is `!`. The command word
//! that follows is case-insensitive and the arguments are separated by any whitespace. The
//! spec of `!schedule add` and `!schedule next` is quoted, with `"…"` or the typographic
//! quotes chat clients substitute (`“…”`, `„…“`), and must close on the line it opens; the
//! prompt of `!schedule add` is everything after the closing quote, newlines included.
//!
//! [`parse`] only checks the shape of a command. Whether a channel, job or schedule exists is
//! the dispatcher's business; it also resolves job id prefixes to full ids.

use crate::store::{validate_channel_name, PermissionPolicy};

use super::strings::{self, usage};

/// What `!jobs` lists when no count is given.
pub const DEFAULT_JOBS: i64 = 10;
/// The most jobs `!jobs n` lists.
pub const MAX_JOBS: i64 = 50;
/// Longest accepted job id or id prefix (a UUID has 36 characters).
pub const MAX_JOB_ID_LEN: usize = 64;

/// A well-formed command.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// `!help`: the list of commands ([`strings::HELP`]).
    Help,
    /// `!create <name>`: a new channel with its own room.
    Create { name: String },
    /// `!join <name>`: an invitation to a channel's room.
    Join { name: String },
    /// `!list`: every channel.
    List,
    /// `!delete <name>`: removes a channel and its job history.
    Delete { name: String },
    /// `!status`: the agent, queue and session of this room's channel.
    Status,
    /// `!jobs [n]`: the newest `n` jobs ([`DEFAULT_JOBS`] when omitted, at most [`MAX_JOBS`]).
    Jobs { limit: i64 },
    /// `!job <id>`: one job and its output; `id` is lowercase and may be a prefix.
    Job { id: String },
    /// `!cancel [id]`: stops a job, or the one running in this room when `id` is `None`.
    Cancel { id: Option<String> },
    /// `!reset`: the next job starts a new agent conversation.
    Reset,
    /// `!warm`: starts the channel's agent ahead of the next job.
    Warm,
    /// `!token`: a new webhook token for this room's channel (the old one stops working).
    Token,
    /// `!schedule …`: cron and one-off jobs of this room's channel.
    Schedule(ScheduleCommand),
    /// `!allow [id]` / `!always [id]`: allows a pending permission request (the room's only
    /// pending one when `id` is `None`); `always` also stores a standing rule.
    Allow { id: Option<String>, always: bool },
    /// `!deny [id]`: denies a pending permission request, or declines a question.
    Deny { id: Option<String> },
    /// `!answer [id] <answer>`: answers a pending question of the agent (the room's only pending
    /// one when `id` is `None`). The first word is the id when it is at least
    /// [`MIN_ANSWER_ID_LEN`] hex digits and more text follows.
    Answer { id: Option<String>, answer: String },
    /// `!approvals`: the pending permission requests of this room's channel.
    Approvals,
    /// `!rules` / `!rules rm <id>`: this room's channel's standing rules.
    Rules { remove: Option<i64> },
    /// `!policy [allow|deny|ask]`: shows or sets this room's channel's permission policy.
    Policy { set: Option<PermissionPolicy> },
    /// `!options`: the session config options this room's channel sets and those its agent
    /// offers.
    Options,
    /// `!model [value|default]` / `!mode [value|default]`: shows or sets (or with `default`
    /// stops setting) the channel's option of that name.
    SetOption {
        key: String,
        set: Option<Option<String>>,
    },
    /// `!usage [since]`: what this room's channel spent, per day (`since` as `gorp usage` reads
    /// it; 7 days when omitted).
    Usage { since: Option<String> },
    /// `!budget`: this room's channel's limits and what it spent today and this month;
    /// `!budget job <usd>|tokens <n>|day <usd>|month <usd>` sets one (`default`: the config's).
    Budget { set: Option<BudgetSet> },
}

/// A change `!budget` makes.
#[derive(Debug, Clone, PartialEq)]
pub enum BudgetSet {
    /// The per-job cost budget in USD (`None`: `[budget]`'s).
    JobUsd(Option<f64>),
    /// The per-job token budget (`None`: `[budget]`'s).
    JobTokens(Option<i64>),
    /// The daily budget in USD (`None`: `[budget]`'s).
    DayUsd(Option<f64>),
    /// The monthly budget in USD (`None`: `[budget]`'s).
    MonthUsd(Option<f64>),
}

/// The subcommands of `!schedule`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScheduleCommand {
    /// `!schedule add "<cron or one-off>" <prompt>`.
    Add { spec: String, prompt: String },
    /// `!schedule list`.
    List,
    /// `!schedule pause <id>`.
    Pause { id: i64 },
    /// `!schedule resume <id>`.
    Resume { id: i64 },
    /// `!schedule rm <id>`.
    Rm { id: i64 },
    /// `!schedule next "<cron>"`: the next times a spec fires.
    Next { spec: String },
}

/// A malformed or unknown command. `message` is one line of Markdown: what is wrong, then the
/// usage of the command (e.g. ``missing channel name; usage: `!create <name>` ``).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandError {
    pub message: String,
}

impl std::fmt::Display for CommandError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for CommandError {}

/// Characters accepted as the opening quote of a schedule spec: ASCII and the typographic
/// quotes (English “…”, German „…“) that chat clients put in place of `"`.
const OPEN_QUOTES: [char; 4] = ['"', '“', '”', '„'];
/// Characters accepted as the closing quote of a schedule spec.
const CLOSE_QUOTES: [char; 3] = ['"', '”', '“'];

/// Longest part of an unknown command word echoed back in the error.
const MAX_ECHO_CHARS: usize = 32;

/// Parses a message body.
///
/// `None` when the message is not a command: its first non-whitespace character is not `!`.
/// `Some(Ok)` for a well-formed command, `Some(Err)` for an unknown or malformed one; a lone
/// `!` (nothing or whitespace after it) is an unknown command.
pub fn parse(body: &str) -> Option<Result<Command, CommandError>> {
    let rest = body.trim_start().strip_prefix('!')?;
    let (word, args) = split_word(rest);
    let lower = word.to_lowercase();
    Some(match lower.as_str() {
        "help" => no_args(args, usage::HELP, Command::Help),
        "create" => one_name(args, usage::CREATE).map(|name| Command::Create { name }),
        "join" => one_name(args, usage::JOIN).map(|name| Command::Join { name }),
        "list" => no_args(args, usage::LIST, Command::List),
        "delete" => one_name(args, usage::DELETE).map(|name| Command::Delete { name }),
        "status" => no_args(args, usage::STATUS, Command::Status),
        "jobs" => jobs(args),
        "job" => match one_arg(args, strings::MISSING_JOB_ID, usage::JOB) {
            Ok(arg) => job_id(arg, usage::JOB).map(|id| Command::Job { id }),
            Err(e) => Err(e),
        },
        "cancel" => cancel(args),
        "reset" => no_args(args, usage::RESET, Command::Reset),
        "warm" => no_args(args, usage::WARM, Command::Warm),
        "token" => no_args(args, usage::TOKEN, Command::Token),
        "schedule" => schedule(args).map(Command::Schedule),
        "allow" => approval_id(args, usage::ALLOW).map(|id| Command::Allow { id, always: false }),
        "always" => approval_id(args, usage::ALWAYS).map(|id| Command::Allow { id, always: true }),
        "deny" => approval_id(args, usage::DENY).map(|id| Command::Deny { id }),
        "answer" => answer(args),
        "approvals" => no_args(args, usage::APPROVALS, Command::Approvals),
        "rules" => rules(args),
        "policy" => policy(args),
        "options" => no_args(args, usage::OPTIONS, Command::Options),
        "model" => set_option("model", args, usage::MODEL),
        "mode" => set_option("mode", args, usage::MODE),
        "usage" => {
            let mut words = args.split_whitespace();
            match (words.next(), words.next()) {
                (since, None) => Ok(Command::Usage {
                    since: since.map(str::to_string),
                }),
                _ => Err(usage_error(strings::TOO_MANY_ARGUMENTS, usage::USAGE)),
            }
        }
        "budget" => budget(args),
        _ => Err(unknown_command(word)),
    })
}

/// Splits off the first whitespace-separated word; the remainder keeps its leading whitespace.
fn split_word(s: &str) -> (&str, &str) {
    match s.find(char::is_whitespace) {
        Some(i) => s.split_at(i),
        None => (s, ""),
    }
}

/// The error for a malformed command: the problem, then the usage as inline code.
fn usage_error(problem: &str, usage: &str) -> CommandError {
    CommandError {
        message: strings::usage_error(problem, usage),
    }
}

/// The error for an unknown command word (echoed back, shortened).
fn unknown_command(word: &str) -> CommandError {
    let message = if word.is_empty() {
        strings::unknown_command(None)
    } else {
        let mut shown: String = word.chars().take(MAX_ECHO_CHARS).collect();
        if word.chars().nth(MAX_ECHO_CHARS).is_some() {
            shown.push('…');
        }
        strings::unknown_command(Some(&shown))
    };
    CommandError { message }
}

/// A command that takes no arguments.
fn no_args(args: &str, usage: &str, cmd: Command) -> Result<Command, CommandError> {
    if args.trim().is_empty() {
        Ok(cmd)
    } else {
        Err(usage_error(strings::NO_ARGUMENTS, usage))
    }
}

/// Exactly one argument, `missing` being the problem when there is none.
fn one_arg<'a>(args: &'a str, missing: &str, usage: &str) -> Result<&'a str, CommandError> {
    let mut words = args.split_whitespace();
    match (words.next(), words.next()) {
        (Some(arg), None) => Ok(arg),
        (None, _) => Err(usage_error(missing, usage)),
        (Some(_), Some(_)) => Err(usage_error(strings::TOO_MANY_ARGUMENTS, usage)),
    }
}

/// Exactly one argument that is a valid channel name.
fn one_name(args: &str, usage: &str) -> Result<String, CommandError> {
    let name = one_arg(args, strings::MISSING_CHANNEL_NAME, usage)?;
    validate_channel_name(name).map_err(|e| usage_error(&e, usage))?;
    Ok(name.to_string())
}

/// `!jobs [n]`.
fn jobs(args: &str) -> Result<Command, CommandError> {
    let mut words = args.split_whitespace();
    let limit = match (words.next(), words.next()) {
        (None, _) => DEFAULT_JOBS,
        (Some(n), None) => match n.parse::<i64>() {
            Ok(n) if (1..=MAX_JOBS).contains(&n) => n,
            _ => {
                return Err(usage_error(
                    &strings::jobs_count_range(MAX_JOBS),
                    usage::JOBS,
                ))
            }
        },
        (Some(_), Some(_)) => return Err(usage_error(strings::TOO_MANY_ARGUMENTS, usage::JOBS)),
    };
    Ok(Command::Jobs { limit })
}

/// `!cancel [id]`.
fn cancel(args: &str) -> Result<Command, CommandError> {
    let mut words = args.split_whitespace();
    match (words.next(), words.next()) {
        (None, _) => Ok(Command::Cancel { id: None }),
        (Some(arg), None) => job_id(arg, usage::CANCEL).map(|id| Command::Cancel { id: Some(id) }),
        (Some(_), Some(_)) => Err(usage_error(strings::TOO_MANY_ARGUMENTS, usage::CANCEL)),
    }
}

/// Longest accepted approval id or id prefix (an approval id has 32 characters).
pub const MAX_APPROVAL_ID_LEN: usize = 32;

/// An optional approval id or a prefix of one: 1 to [`MAX_APPROVAL_ID_LEN`] hex digits,
/// returned lowercase.
fn approval_id(args: &str, usage: &str) -> Result<Option<String>, CommandError> {
    let mut words = args.split_whitespace();
    match (words.next(), words.next()) {
        (None, _) => Ok(None),
        (Some(arg), None) => {
            if arg.len() <= MAX_APPROVAL_ID_LEN && arg.bytes().all(|b| b.is_ascii_hexdigit()) {
                Ok(Some(arg.to_ascii_lowercase()))
            } else {
                Err(usage_error(strings::APPROVAL_ID_SHAPE, usage))
            }
        }
        (Some(_), Some(_)) => Err(usage_error(strings::TOO_MANY_ARGUMENTS, usage)),
    }
}

/// The shortest approval id prefix `!answer` takes as an id (a shorter hex word is the answer).
pub const MIN_ANSWER_ID_LEN: usize = 8;

/// `!answer [id] <answer>`.
fn answer(args: &str) -> Result<Command, CommandError> {
    let args = args.trim();
    if args.is_empty() {
        return Err(usage_error(strings::MISSING_ANSWER, usage::ANSWER));
    }
    let (first, rest) = split_word(args);
    let rest = rest.trim();
    let is_id = first.len() >= MIN_ANSWER_ID_LEN
        && first.len() <= MAX_APPROVAL_ID_LEN
        && first.bytes().all(|b| b.is_ascii_hexdigit());
    Ok(if is_id && !rest.is_empty() {
        Command::Answer {
            id: Some(first.to_ascii_lowercase()),
            answer: rest.to_string(),
        }
    } else {
        Command::Answer {
            id: None,
            answer: args.to_string(),
        }
    })
}

/// `!rules` or `!rules rm <id>`.
fn rules(args: &str) -> Result<Command, CommandError> {
    let (sub, rest) = split_word(args.trim_start());
    match sub.to_lowercase().as_str() {
        "" => Ok(Command::Rules { remove: None }),
        "rm" => {
            let arg = one_arg(rest, strings::MISSING_RULE_ID, usage::RULES_RM)?;
            match arg.parse::<i64>() {
                Ok(id) if id > 0 => Ok(Command::Rules { remove: Some(id) }),
                _ => Err(usage_error(strings::RULE_ID_SHAPE, usage::RULES_RM)),
            }
        }
        _ => Err(usage_error(strings::UNKNOWN_SUBCOMMAND, usage::RULES)),
    }
}

/// `!model [value|default]`, `!mode [value|default]`.
fn set_option(key: &str, args: &str, usage: &str) -> Result<Command, CommandError> {
    let mut words = args.split_whitespace();
    let set = match (words.next(), words.next()) {
        (None, _) => None,
        (Some("default"), None) => Some(None),
        (Some(v), None) if v.len() <= 256 => Some(Some(v.to_string())),
        (Some(_), None) => return Err(usage_error(strings::OPTION_VALUE_SHAPE, usage)),
        (Some(_), Some(_)) => return Err(usage_error(strings::TOO_MANY_ARGUMENTS, usage)),
    };
    Ok(Command::SetOption {
        key: key.to_string(),
        set,
    })
}

/// `!policy [allow|deny|ask]`.
fn policy(args: &str) -> Result<Command, CommandError> {
    let mut words = args.split_whitespace();
    match (words.next(), words.next()) {
        (None, _) => Ok(Command::Policy { set: None }),
        (Some(p), None) => match p.to_lowercase().parse::<PermissionPolicy>() {
            Ok(policy) => Ok(Command::Policy { set: Some(policy) }),
            Err(_) => Err(usage_error(strings::UNKNOWN_POLICY, usage::POLICY)),
        },
        (Some(_), Some(_)) => Err(usage_error(strings::TOO_MANY_ARGUMENTS, usage::POLICY)),
    }
}

/// `!budget`, `!budget job|day|month <usd>|default`, `!budget tokens <n>|default`.
fn budget(args: &str) -> Result<Command, CommandError> {
    let mut words = args.split_whitespace();
    let (what, value, extra) = (words.next(), words.next(), words.next());
    if extra.is_some() {
        return Err(usage_error(strings::TOO_MANY_ARGUMENTS, usage::BUDGET));
    }
    let cost = |v: &str| match v.trim_start_matches('$').parse::<f64>() {
        Ok(c) if c.is_finite() && (0.0..=1e6).contains(&c) => Ok(c),
        _ => Err(usage_error(strings::BUDGET_COST_SHAPE, usage::BUDGET)),
    };
    let set = match (what.map(str::to_lowercase).as_deref(), value) {
        (None, _) => return Ok(Command::Budget { set: None }),
        (Some("job"), Some("default")) => BudgetSet::JobUsd(None),
        (Some("tokens"), Some("default")) => BudgetSet::JobTokens(None),
        (Some("day"), Some("default")) => BudgetSet::DayUsd(None),
        (Some("month"), Some("default")) => BudgetSet::MonthUsd(None),
        (Some("job"), Some(v)) => BudgetSet::JobUsd(Some(cost(v)?)),
        (Some("day"), Some(v)) => BudgetSet::DayUsd(Some(cost(v)?)),
        (Some("month"), Some(v)) => BudgetSet::MonthUsd(Some(cost(v)?)),
        (Some("job" | "tokens" | "day" | "month"), None) => {
            return Err(usage_error(strings::MISSING_BUDGET_VALUE, usage::BUDGET))
        }
        (Some("tokens"), Some(v)) => match v.parse::<i64>() {
            Ok(t) if t >= 1 => BudgetSet::JobTokens(Some(t)),
            _ => return Err(usage_error(strings::BUDGET_TOKENS_SHAPE, usage::BUDGET)),
        },
        _ => return Err(usage_error(strings::UNKNOWN_BUDGET, usage::BUDGET)),
    };
    Ok(Command::Budget { set: Some(set) })
}

/// A job id or a prefix of one: 1 to [`MAX_JOB_ID_LEN`] characters of hex digits and `-`,
/// starting with a hex digit (as every UUID does), returned lowercase.
fn job_id(arg: &str, usage: &str) -> Result<String, CommandError> {
    let ok = arg.len() <= MAX_JOB_ID_LEN
        && arg.bytes().next().is_some_and(|b| b.is_ascii_hexdigit())
        && arg.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-');
    if ok {
        Ok(arg.to_ascii_lowercase())
    } else {
        Err(usage_error(strings::JOB_ID_SHAPE, usage))
    }
}

/// `!schedule <subcommand> …`.
fn schedule(args: &str) -> Result<ScheduleCommand, CommandError> {
    let (sub, rest) = split_word(args.trim_start());
    match sub.to_lowercase().as_str() {
        "" => Err(usage_error(strings::MISSING_SUBCOMMAND, usage::SCHEDULE)),
        "add" => {
            let (spec, after) = quoted_spec(rest, usage::SCHEDULE_ADD)?;
            let prompt = after.trim();
            if prompt.is_empty() {
                return Err(usage_error(strings::MISSING_PROMPT, usage::SCHEDULE_ADD));
            }
            Ok(ScheduleCommand::Add {
                spec,
                prompt: prompt.to_string(),
            })
        }
        "next" => {
            let (spec, after) = quoted_spec(rest, usage::SCHEDULE_NEXT)?;
            if !after.trim().is_empty() {
                return Err(usage_error(
                    strings::TOO_MANY_ARGUMENTS,
                    usage::SCHEDULE_NEXT,
                ));
            }
            Ok(ScheduleCommand::Next { spec })
        }
        "list" => {
            if rest.trim().is_empty() {
                Ok(ScheduleCommand::List)
            } else {
                Err(usage_error(strings::NO_ARGUMENTS, usage::SCHEDULE_LIST))
            }
        }
        "pause" => schedule_id(rest, usage::SCHEDULE_PAUSE).map(|id| ScheduleCommand::Pause { id }),
        "resume" => {
            schedule_id(rest, usage::SCHEDULE_RESUME).map(|id| ScheduleCommand::Resume { id })
        }
        "rm" => schedule_id(rest, usage::SCHEDULE_RM).map(|id| ScheduleCommand::Rm { id }),
        _ => Err(usage_error(strings::UNKNOWN_SUBCOMMAND, usage::SCHEDULE)),
    }
}

/// Exactly one argument that is a positive schedule id.
fn schedule_id(args: &str, usage: &str) -> Result<i64, CommandError> {
    let arg = one_arg(args, strings::MISSING_SCHEDULE_ID, usage)?;
    match arg.parse::<i64>() {
        Ok(id) if id > 0 => Ok(id),
        _ => Err(usage_error(strings::SCHEDULE_ID_SHAPE, usage)),
    }
}

/// A quoted spec at the start of `args` (after whitespace): the trimmed text between the
/// quotes, and what follows the closing quote. The closing quote must be on the same line.
fn quoted_spec<'a>(args: &'a str, usage: &str) -> Result<(String, &'a str), CommandError> {
    let args = args.trim_start();
    let Some(open) = args.chars().next() else {
        return Err(usage_error(strings::MISSING_SPEC, usage));
    };
    if !OPEN_QUOTES.contains(&open) {
        return Err(usage_error(strings::SPEC_NOT_QUOTED, usage));
    }
    let inner = &args[open.len_utf8()..];
    let line_end = inner.find('\n').unwrap_or(inner.len());
    let Some(close) = inner[..line_end].find(CLOSE_QUOTES) else {
        return Err(usage_error(strings::SPEC_NOT_CLOSED, usage));
    };
    let spec = inner[..close].trim();
    if spec.is_empty() {
        return Err(usage_error(strings::SPEC_EMPTY, usage));
    }
    let close_len = inner[close..].chars().next().map_or(0, char::len_utf8);
    Ok((spec.to_string(), &inner[close + close_len..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(body: &str) -> Command {
        match parse(body) {
            Some(Ok(cmd)) => cmd,
            other => panic!("{body:?} should parse, got {other:?}"),
        }
    }

    fn err(body: &str) -> String {
        match parse(body) {
            Some(Err(e)) => e.message,
            other => panic!("{body:?} should be an error, got {other:?}"),
        }
    }

    fn name(s: &str) -> String {
        s.to_string()
    }

    fn sched(sc: ScheduleCommand) -> Command {
        Command::Schedule(sc)
    }

    /// Every valid form and the command it yields.
    #[test]
    fn valid_commands() {
        let cases: Vec<(&str, Command)> = vec![
            ("!help", Command::Help),
            ("!HELP", Command::Help),
            ("  !Help  ", Command::Help),
            ("\n\t!help\n", Command::Help),
            ("!create foo", Command::Create { name: name("foo") }),
            (
                "!create\tfoo-bar_1",
                Command::Create {
                    name: name("foo-bar_1"),
                },
            ),
            ("!CREATE   foo  ", Command::Create { name: name("foo") }),
            ("!create\nfoo", Command::Create { name: name("foo") }),
            ("!join foo", Command::Join { name: name("foo") }),
            ("!Join 0abc", Command::Join { name: name("0abc") }),
            ("!list", Command::List),
            ("!LIST \n", Command::List),
            ("!delete foo", Command::Delete { name: name("foo") }),
            ("!status", Command::Status),
            (
                "!jobs",
                Command::Jobs {
                    limit: DEFAULT_JOBS,
                },
            ),
            ("!jobs 1", Command::Jobs { limit: 1 }),
            ("!jobs 50", Command::Jobs { limit: 50 }),
            ("!Jobs\u{3000}7", Command::Jobs { limit: 7 }),
            (
                "!job 0123abcd",
                Command::Job {
                    id: name("0123abcd"),
                },
            ),
            (
                "!job ABCDEF01-23",
                Command::Job {
                    id: name("abcdef01-23"),
                },
            ),
            (
                "!job 01890a5d-ac96-774b-bcce-b302099a8057",
                Command::Job {
                    id: name("01890a5d-ac96-774b-bcce-b302099a8057"),
                },
            ),
            ("!job a", Command::Job { id: name("a") }),
            ("!cancel", Command::Cancel { id: None }),
            ("!cancel   ", Command::Cancel { id: None }),
            (
                "!cancel 0BAD",
                Command::Cancel {
                    id: Some(name("0bad")),
                },
            ),
            ("!reset", Command::Reset),
            ("!warm", Command::Warm),
            ("!token", Command::Token),
            ("!schedule list", sched(ScheduleCommand::List)),
            ("!Schedule LIST", sched(ScheduleCommand::List)),
            ("!schedule pause 3", sched(ScheduleCommand::Pause { id: 3 })),
            (
                "!schedule resume 9223372036854775807",
                sched(ScheduleCommand::Resume { id: i64::MAX }),
            ),
            ("!schedule rm 12", sched(ScheduleCommand::Rm { id: 12 })),
            (
                "!schedule add \"0 9 * * *\" summarise the news",
                sched(ScheduleCommand::Add {
                    spec: name("0 9 * * *"),
                    prompt: name("summarise the news"),
                }),
            ),
            (
                "!schedule add “0 9 * * 1-5” check CI",
                sched(ScheduleCommand::Add {
                    spec: name("0 9 * * 1-5"),
                    prompt: name("check CI"),
                }),
            ),
            (
                "!schedule add „@daily“ tidy up",
                sched(ScheduleCommand::Add {
                    spec: name("@daily"),
                    prompt: name("tidy up"),
                }),
            ),
            (
                "!schedule add \" in 10m \"   first line\n\n  second  line  \n",
                sched(ScheduleCommand::Add {
                    spec: name("in 10m"),
                    prompt: name("first line\n\n  second  line"),
                }),
            ),
            (
                "!schedule add \"0 9 * * *\"\nprompt on the next line",
                sched(ScheduleCommand::Add {
                    spec: name("0 9 * * *"),
                    prompt: name("prompt on the next line"),
                }),
            ),
            (
                "!schedule add \"*/5 * * * *\"résumé ✓ 日本語",
                sched(ScheduleCommand::Add {
                    spec: name("*/5 * * * *"),
                    prompt: name("résumé ✓ 日本語"),
                }),
            ),
            (
                "!schedule next \"0 9 * * *\"",
                sched(ScheduleCommand::Next {
                    spec: name("0 9 * * *"),
                }),
            ),
            (
                "!schedule NEXT “@hourly”  ",
                sched(ScheduleCommand::Next {
                    spec: name("@hourly"),
                }),
            ),
            (
                "!allow",
                Command::Allow {
                    id: None,
                    always: false,
                },
            ),
            (
                "!allow 0190A5d2",
                Command::Allow {
                    id: Some(name("0190a5d2")),
                    always: false,
                },
            ),
            (
                "!always",
                Command::Allow {
                    id: None,
                    always: true,
                },
            ),
            (
                "!ALWAYS ab12",
                Command::Allow {
                    id: Some(name("ab12")),
                    always: true,
                },
            ),
            ("!deny", Command::Deny { id: None }),
            (
                "!deny  f00 ",
                Command::Deny {
                    id: Some(name("f00")),
                },
            ),
            ("!approvals", Command::Approvals),
            (
                "!answer 2",
                Command::Answer {
                    id: None,
                    answer: "2".into(),
                },
            ),
            (
                "!answer  Redis, in memory ",
                Command::Answer {
                    id: None,
                    answer: "Redis, in memory".into(),
                },
            ),
            (
                "!answer 0190A5D2AC96 choice=1; note=fast",
                Command::Answer {
                    id: Some(name("0190a5d2ac96")),
                    answer: "choice=1; note=fast".into(),
                },
            ),
            // A short hex word is the answer, and so is a lone long one.
            (
                "!answer cafe latte",
                Command::Answer {
                    id: None,
                    answer: "cafe latte".into(),
                },
            ),
            (
                "!answer deadbeef",
                Command::Answer {
                    id: None,
                    answer: "deadbeef".into(),
                },
            ),
            ("!usage", Command::Usage { since: None }),
            (
                "!usage 30d",
                Command::Usage {
                    since: Some("30d".into()),
                },
            ),
            ("!budget", Command::Budget { set: None }),
            (
                "!budget job 2.5",
                Command::Budget {
                    set: Some(BudgetSet::JobUsd(Some(2.5))),
                },
            ),
            (
                "!budget JOB $1",
                Command::Budget {
                    set: Some(BudgetSet::JobUsd(Some(1.0))),
                },
            ),
            (
                "!budget tokens 200000",
                Command::Budget {
                    set: Some(BudgetSet::JobTokens(Some(200_000))),
                },
            ),
            (
                "!budget tokens default",
                Command::Budget {
                    set: Some(BudgetSet::JobTokens(None)),
                },
            ),
            (
                "!budget day 20",
                Command::Budget {
                    set: Some(BudgetSet::DayUsd(Some(20.0))),
                },
            ),
            (
                "!budget Month $0",
                Command::Budget {
                    set: Some(BudgetSet::MonthUsd(Some(0.0))),
                },
            ),
            (
                "!budget day default",
                Command::Budget {
                    set: Some(BudgetSet::DayUsd(None)),
                },
            ),
            ("!rules", Command::Rules { remove: None }),
            ("!rules rm 3", Command::Rules { remove: Some(3) }),
            ("!policy", Command::Policy { set: None }),
            ("!options", Command::Options),
            (
                "!model",
                Command::SetOption {
                    key: "model".into(),
                    set: None,
                },
            ),
            (
                "!model opus",
                Command::SetOption {
                    key: "model".into(),
                    set: Some(Some("opus".into())),
                },
            ),
            (
                "!mode default",
                Command::SetOption {
                    key: "mode".into(),
                    set: Some(None),
                },
            ),
            (
                "!policy ASK",
                Command::Policy {
                    set: Some(PermissionPolicy::Ask),
                },
            ),
            (
                "!policy deny",
                Command::Policy {
                    set: Some(PermissionPolicy::Deny),
                },
            ),
        ];
        for (body, want) in cases {
            assert_eq!(ok(body), want, "{body:?}");
        }
    }

    /// Every error class, with a fragment the message must contain.
    #[test]
    fn malformed_commands() {
        let cases: Vec<(&str, &str)> = vec![
            ("!", "unknown command `!`"),
            ("!   ", "unknown command `!`"),
            ("! help", "unknown command `!`"),
            ("!foo", "unknown command `!foo`; `!help` lists the commands"),
            ("!Foo bar", "unknown command `!Foo`"),
            ("!!", "unknown command `!!`"),
            ("!help,", "unknown command `!help,`"),
            ("!日本", "unknown command `!日本`"),
            ("!help me", "takes no arguments; usage: `!help`"),
            ("!allow xyz", "a request id is up to 32 digits"),
            ("!allow a b", "too many arguments; usage: `!allow [id]`"),
            ("!deny 0190a5d2-ac96", "a request id is up to 32"),
            (
                "!always aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
                "a request id is up to 32",
            ),
            ("!approvals all", "takes no arguments; usage: `!approvals`"),
            (
                "!answer",
                "give the answer after the command; usage: `!answer [id] <answer>`",
            ),
            ("!answer   ", "give the answer after the command"),
            (
                "!rules add x",
                "unknown subcommand; usage: `!rules [rm <id>]`",
            ),
            ("!rules rm", "missing rule id; usage: `!rules rm <id>`"),
            ("!rules rm 0", "a rule id is a positive number"),
            ("!rules rm 1 2", "too many arguments"),
            (
                "!policy maybe",
                "the policy is allow, deny or ask; usage: `!policy [allow|deny|ask]`",
            ),
            ("!policy ask now", "too many arguments"),
            ("!model a b", "too many arguments"),
            ("!options x", "this command takes no arguments"),
            (
                "!budget day -1",
                "a cost budget is a number of USD from 0 to 1000000",
            ),
            ("!budget month lots", "a cost budget is a number"),
            ("!budget month NaN", "a cost budget is a number"),
            ("!budget day 1e7", "a cost budget is a number"),
            ("!budget tokens 0", "a token budget is a whole number"),
            ("!budget day", "give the budget after its name"),
            (
                "!budget week 5",
                "set `job`, `day`, `month` (USD) or `tokens`",
            ),
            ("!budget day 5 6", "too many arguments"),
            ("!create", "missing channel name; usage: `!create <name>`"),
            ("!create a b", "too many arguments; usage: `!create <name>`"),
            ("!create Foo", "invalid channel name \"Foo\""),
            ("!create ..", "invalid channel name"),
            ("!create a/b", "invalid channel name"),
            ("!create a\\b", "invalid channel name"),
            ("!create -a", "invalid channel name"),
            ("!create café", "usage: `!create <name>`"),
            ("!join", "usage: `!join <name>`"),
            ("!delete", "usage: `!delete <name>`"),
            ("!delete x y", "too many arguments"),
            ("!list all", "usage: `!list`"),
            ("!status now", "usage: `!status`"),
            ("!reset x", "usage: `!reset`"),
            ("!warm x", "usage: `!warm`"),
            ("!token abc", "usage: `!token`"),
            ("!jobs 0", "between 1 and 50; usage: `!jobs [n]`"),
            ("!jobs -1", "between 1 and 50"),
            ("!jobs 51", "between 1 and 50"),
            ("!jobs x", "between 1 and 50"),
            ("!jobs 99999999999999999999", "between 1 and 50"),
            ("!jobs 1 2", "too many arguments"),
            ("!job", "missing job id; usage: `!job <id>`"),
            ("!job xyz", "usage: `!job <id>`"),
            ("!job -abc", "a job id looks like `0190a5d2-"),
            ("!job a b", "too many arguments"),
            ("!job ０", "a job id looks like"),
            ("!cancel nope", "usage: `!cancel [id]`"),
            ("!cancel a b", "too many arguments"),
            (
                "!schedule",
                "missing subcommand; usage: `!schedule add|list|pause|resume|rm|next …`",
            ),
            ("!schedule frobnicate", "unknown subcommand"),
            ("!schedule list x", "usage: `!schedule list`"),
            (
                "!schedule pause",
                "missing schedule id; usage: `!schedule pause <id>`",
            ),
            ("!schedule pause 0", "positive number"),
            ("!schedule resume -3", "usage: `!schedule resume <id>`"),
            ("!schedule rm x", "usage: `!schedule rm <id>`"),
            ("!schedule rm 1 2", "too many arguments"),
            (
                "!schedule add",
                "missing schedule spec; usage: `!schedule add \"<cron or one-off>\" <prompt>`",
            ),
            ("!schedule add 0 9 * * * hi", "double quotes"),
            ("!schedule add \"0 9 * * * hi", "no closing quote"),
            ("!schedule add \"0 9\n* * *\" hi", "no closing quote"),
            ("!schedule add \"\" hi", "spec is empty"),
            ("!schedule add \"  \" hi", "spec is empty"),
            ("!schedule add \"0 9 * * *\"", "missing prompt"),
            ("!schedule add \"0 9 * * *\"  \n ", "missing prompt"),
            ("!schedule next", "usage: `!schedule next \"<cron>\"`"),
            ("!schedule next 0 9 * * *", "double quotes"),
            ("!schedule next “0 9 * * *", "no closing quote"),
            ("!schedule next \"0 9 * * *\" extra", "too many arguments"),
        ];
        for (body, want) in cases {
            let message = err(body);
            assert!(
                message.contains(want),
                "{body:?}: {message:?} lacks {want:?}"
            );
            assert!(
                !message.contains('\n'),
                "{body:?}: {message:?} is not one line"
            );
        }
    }

    #[test]
    fn not_commands() {
        for body in [
            "",
            "   ",
            "hello",
            "hello !help",
            "\u{a0}x",
            "¡help",
            "?help",
            "`!help`",
        ] {
            assert_eq!(parse(body), None, "{body:?}");
        }
    }

    #[test]
    fn unknown_command_echo_is_shortened_and_safe() {
        let long = format!("!{}", "é".repeat(500));
        let message = err(&long);
        assert!(message.contains('…'));
        assert!(message.chars().count() < 120, "{message}");
        // A backtick in the word cannot break out of the inline code.
        let message = err("!a`b");
        assert!(message.starts_with("unknown command ``!a`b``"), "{message}");
    }

    #[test]
    fn job_id_limits() {
        assert_eq!(
            ok(&format!("!job {}", "a".repeat(64))),
            Command::Job { id: "a".repeat(64) }
        );
        err(&format!("!job {}", "a".repeat(65)));
    }

    #[test]
    fn help_lists_every_command() {
        for word in [
            "!help",
            "!create",
            "!join",
            "!list",
            "!delete",
            "!status",
            "!jobs",
            "!job ",
            "!cancel",
            "!reset",
            "!warm",
            "!token",
            "!schedule add",
            "!schedule list",
            "!schedule pause",
            "!schedule resume",
            "!schedule rm",
            "!schedule next",
            "!policy",
            "!answer",
            "!usage",
            "!budget",
            "!approvals",
            "!allow",
            "!always",
            "!deny",
            "!rules",
            "!options",
            "!model",
            "!mode",
        ] {
            assert!(strings::HELP.contains(word), "HELP lacks {word}");
        }
        // Each usage in HELP parses once its placeholders are filled in.
        assert_eq!(
            ok("!schedule add \"0 9 * * *\" p"),
            sched(ScheduleCommand::Add {
                spec: name("0 9 * * *"),
                prompt: name("p")
            })
        );
    }

    /// Odd input never panics: every prefix and every char-boundary cut of some commands, a
    /// multibyte character inserted at every position, and pseudo-random strings.
    #[test]
    fn never_panics() {
        let seeds = [
            "!schedule add “0 9 * * *” résumé\n日本語 prompt",
            "!schedule next \"@daily\"",
            "!job 01890a5d-ac96-774b-bcce-b302099a8057",
            "!create foo-bar",
            "!jobs 12",
            "!cancel",
            "  !HeLp  ",
            "!schedule add „x“",
            "!\"“”„",
        ];
        let inserts = ["é", "日", "🦀", "\u{200b}", "\"", "“", "\n", " ", "!", "\0"];
        for seed in seeds {
            for (i, _) in seed.char_indices().chain([(seed.len(), ' ')]) {
                let _ = parse(&seed[..i]);
                let _ = parse(&seed[i..]);
                for ins in inserts {
                    let _ = parse(&format!("{}{ins}{}", &seed[..i], &seed[i..]));
                }
            }
        }
        // A small xorshift generator over an alphabet of awkward characters.
        let alphabet: Vec<char> = "!! \t\n\"“”„'`abcxyzAZ09-_/\\.é日🦀\u{3000}\u{a0}schedulejobadd"
            .chars()
            .collect();
        let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..5000 {
            let len = (next() % 40) as usize;
            let mut s = String::from("!");
            if next() % 2 == 0 {
                s.push_str(
                    [
                        "schedule add ",
                        "schedule next ",
                        "job ",
                        "jobs ",
                        "create ",
                    ][(next() % 5) as usize],
                );
            }
            for _ in 0..len {
                s.push(alphabet[(next() % alphabet.len() as u64) as usize]);
            }
            let _ = parse(&s);
        }
        let _ = parse(&"!".repeat(100_000));
        let _ = parse(&format!("!schedule add \"{}", "x".repeat(100_000)));
    }
}
