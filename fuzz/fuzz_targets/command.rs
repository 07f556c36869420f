//! `gorp::matrix::command::parse` on any message body.
//!
//! Checks, besides not panicking: `None` exactly when the first non-whitespace character is
//! not `!`; leading whitespace and the ASCII case of the command word do not change a valid
//! command; every accepted command holds only what its doc allows (channel names that
//! validate, 1..=50 jobs, lowercase hex job ids of at most 64 characters, positive schedule
//! ids, a non-empty one-line spec and a non-empty prompt); a valid command written back in its
//! canonical form parses to itself; every error is one line.
#![no_main]

use gorp::matrix::command::{
    parse, BudgetSet, Command, ScheduleCommand, MAX_JOBS, MAX_JOB_ID_LEN,
};
use gorp::store::validate_channel_name;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|body: &str| {
    let got = parse(body);
    let is_command = body.trim_start().starts_with('!');
    assert_eq!(got.is_some(), is_command, "{body:?}");
    let Some(result) = got else { return };
    let cmd = match result {
        Ok(cmd) => cmd,
        Err(e) => {
            assert!(!e.message.is_empty());
            assert!(
                !e.message.contains('\n'),
                "error is not one line: {:?}",
                e.message
            );
            return;
        }
    };
    check_fields(&cmd);

    // Leading whitespace and the command word's ASCII case do not matter.
    assert_eq!(parse(&format!(" \n\t{body}")), Some(Ok(cmd.clone())));
    let rest = body.trim_start().strip_prefix('!').unwrap();
    let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
    let upper = format!("!{}{}", rest[..end].to_ascii_uppercase(), &rest[end..]);
    assert_eq!(parse(&upper), Some(Ok(cmd.clone())), "{upper:?}");

    // The canonical form parses back to the same command.
    let canonical = canonical(&cmd);
    assert_eq!(parse(&canonical), Some(Ok(cmd.clone())), "{canonical:?}");
});

fn check_job_id(id: &str) {
    assert!(!id.is_empty() && id.len() <= MAX_JOB_ID_LEN, "{id:?}");
    assert!(id.as_bytes()[0].is_ascii_hexdigit(), "{id:?}");
    assert!(
        id.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b) || b == b'-'),
        "{id:?}"
    );
}

fn check_spec(spec: &str) {
    assert!(!spec.is_empty() && spec.trim() == spec, "{spec:?}");
    assert!(!spec.contains('\n'), "{spec:?}");
}

fn check_fields(cmd: &Command) {
    match cmd {
        Command::Create { name } | Command::Join { name } | Command::Delete { name } => {
            assert!(validate_channel_name(name).is_ok(), "{name:?}")
        }
        Command::Jobs { limit } => assert!((1..=MAX_JOBS).contains(limit)),
        Command::Job { id } | Command::Cancel { id: Some(id) } => check_job_id(id),
        Command::Schedule(ScheduleCommand::Add { spec, prompt }) => {
            check_spec(spec);
            assert!(!prompt.is_empty() && prompt.trim() == prompt, "{prompt:?}");
        }
        Command::Schedule(ScheduleCommand::Next { spec }) => check_spec(spec),
        Command::Schedule(
            ScheduleCommand::Pause { id }
            | ScheduleCommand::Resume { id }
            | ScheduleCommand::Rm { id },
        ) => assert!(*id > 0),
        Command::Allow { id: Some(id), .. } | Command::Deny { id: Some(id) } => {
            assert!(!id.is_empty() && id.len() <= 32, "{id:?}");
            assert!(id.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()), "{id:?}");
        }
        Command::Rules { remove: Some(id) } => assert!(*id > 0),
        Command::Answer { id, answer } => {
            assert!(!answer.is_empty() && answer.trim() == answer, "{answer:?}");
            if let Some(id) = id {
                assert!((8..=32).contains(&id.len()), "{id:?}");
                assert!(id.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()), "{id:?}");
            }
        }
        _ => {}
    }
}

fn canonical(cmd: &Command) -> String {
    match cmd {
        Command::Help => "!help".into(),
        Command::Create { name } => format!("!create {name}"),
        Command::Join { name } => format!("!join {name}"),
        Command::List => "!list".into(),
        Command::Delete { name } => format!("!delete {name}"),
        Command::Status => "!status".into(),
        Command::Jobs { limit } => format!("!jobs {limit}"),
        Command::Job { id } => format!("!job {id}"),
        Command::Cancel { id: None } => "!cancel".into(),
        Command::Cancel { id: Some(id) } => format!("!cancel {id}"),
        Command::Reset => "!reset".into(),
        Command::Warm => "!warm".into(),
        Command::Token => "!token".into(),
        Command::Schedule(s) => match s {
            ScheduleCommand::Add { spec, prompt } => format!("!schedule add \"{spec}\" {prompt}"),
            ScheduleCommand::List => "!schedule list".into(),
            ScheduleCommand::Pause { id } => format!("!schedule pause {id}"),
            ScheduleCommand::Resume { id } => format!("!schedule resume {id}"),
            ScheduleCommand::Rm { id } => format!("!schedule rm {id}"),
            ScheduleCommand::Next { spec } => format!("!schedule next \"{spec}\""),
        },
        Command::Allow { id, always } => {
            let word = if *always { "!always" } else { "!allow" };
            match id {
                Some(id) => format!("{word} {id}"),
                None => word.into(),
            }
        }
        Command::Deny { id: Some(id) } => format!("!deny {id}"),
        Command::Deny { id: None } => "!deny".into(),
        Command::Approvals => "!approvals".into(),
        Command::Answer { id: Some(id), answer } => format!("!answer {id} {answer}"),
        Command::Answer { id: None, answer } => format!("!answer {answer}"),
        Command::Rules { remove: Some(id) } => format!("!rules rm {id}"),
        Command::Rules { remove: None } => "!rules".into(),
        Command::Usage { since: Some(s) } => format!("!usage {s}"),
        Command::Usage { since: None } => "!usage".into(),
        Command::Budget { set: None } => "!budget".into(),
        Command::Budget { set: Some(BudgetSet::JobUsd(Some(c))) } => format!("!budget job {c}"),
        Command::Budget { set: Some(BudgetSet::JobUsd(None)) } => "!budget job default".into(),
        Command::Budget { set: Some(BudgetSet::JobTokens(Some(t))) } => format!("!budget tokens {t}"),
        Command::Budget { set: Some(BudgetSet::JobTokens(None)) } => "!budget tokens default".into(),
        Command::Budget { set: Some(BudgetSet::DayUsd(Some(c))) } => format!("!budget day {c}"),
        Command::Budget { set: Some(BudgetSet::DayUsd(None)) } => "!budget day default".into(),
        Command::Budget { set: Some(BudgetSet::MonthUsd(Some(c))) } => format!("!budget month {c}"),
        Command::Budget { set: Some(BudgetSet::MonthUsd(None)) } => "!budget month default".into(),
        Command::Policy { set: Some(p) } => format!("!policy {p}"),
        Command::Policy { set: None } => "!policy".into(),
        Command::Options => "!options".into(),
        Command::SetOption { key, set: None } => format!("!{key}"),
        Command::SetOption { key, set: Some(None) } => format!("!{key} default"),
        Command::SetOption { key, set: Some(Some(v)) } => format!("!{key} {v}"),
    }
}
