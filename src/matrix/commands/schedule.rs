//! `!schedule add|list|pause|resume|rm|next`: cron and one-off jobs of this room's channel.
//! A spec gorp cannot read is answered in gorp's own words ([`spec_problem`]), consistent
//! with the forms the scheduler documents, never with the cron library's text.

use super::super::bot::one_line;
use super::super::command::ScheduleCommand;
use super::super::failure::{refuse, Answer, Failure};
use super::super::strings;
use super::Ctx;
use crate::service::schedules::{self as scheduler, AddSchedule};
use crate::store::{format_ms, now_ms};

pub(super) async fn run(cx: &Ctx<'_>, sc: ScheduleCommand) -> Answer {
    let store = cx.store();
    match sc {
        ScheduleCommand::Add { spec, prompt } => {
            let ch = cx.room_channel().await?;
            if let Some(problem) = spec_problem(&spec, true) {
                return Err(refuse(problem));
            }
            let sch = scheduler::add(
                store,
                cx.config(),
                AddSchedule {
                    channel: ch.name.clone(),
                    when: spec,
                    prompt,
                    timezone: None,
                    catch_up: None,
                    overlap: None,
                    created_by: format!("matrix:{}", cx.sender),
                },
                now_ms(),
            )
            .await?;
            Ok(strings::schedule_added(
                sch.id,
                &strings::schedule_when(sch.cron.as_deref()),
                &sch.timezone,
                &sch.next_run_at.map(format_ms).unwrap_or_else(|| "-".into()),
            ))
        }
        ScheduleCommand::List => {
            let ch = cx.room_channel_opt().await?;
            let list: Vec<_> = store
                .schedule_list()
                .await?
                .into_iter()
                .filter(|x| ch.as_ref().is_none_or(|c| c.id == x.channel_id))
                .collect();
            if list.is_empty() {
                return Ok(strings::NO_SCHEDULES.into());
            }
            let mut out = String::new();
            for x in list {
                out.push_str(&strings::schedule_line(
                    x.id,
                    x.enabled,
                    &strings::schedule_when(x.cron.as_deref()),
                    &x.timezone,
                    x.next_run_at.map(format_ms).as_deref(),
                    &one_line(&x.prompt, 60),
                ));
            }
            Ok(out)
        }
        ScheduleCommand::Pause { id } => {
            if !scheduler::pause(store, id).await? {
                return Err(refuse(strings::no_schedule(id)));
            }
            Ok(strings::schedule_paused(id))
        }
        ScheduleCommand::Resume { id } => {
            if !scheduler::resume(store, id, now_ms()).await? {
                return Err(refuse(strings::no_schedule(id)));
            }
            Ok(strings::schedule_resumed(id))
        }
        ScheduleCommand::Rm { id } => {
            if !scheduler::remove(store, id).await? {
                return Err(refuse(strings::no_schedule(id)));
            }
            Ok(strings::schedule_deleted(id))
        }
        ScheduleCommand::Next { spec } => {
            if let Some(problem) = spec_problem(&spec, false) {
                return Err(refuse(problem));
            }
            let tz_name = scheduler::default_timezone(cx.config());
            let zone = scheduler::parse_tz(&tz_name)?;
            let cron = scheduler::parse_cron(&spec).map_err(Failure::from)?;
            let mut out = strings::next_runs_header(&spec, &tz_name);
            for t in scheduler::upcoming(&cron, zone, now_ms(), 5) {
                out.push_str(&format!("- {}\n", t.to_rfc3339()));
            }
            Ok(out)
        }
    }
}

/// Whether `spec` is read as a one-off (`in 30m`, an RFC 3339 time) rather than as cron: the
/// same test as [`scheduler::parse_when`], whose own errors for one-offs are gorp's words.
fn is_one_off(spec: &str) -> bool {
    let spec = spec.trim();
    spec.starts_with("in ")
        || (spec.len() >= 20 && spec.as_bytes()[4] == b'-' && spec.contains('T'))
}

/// What is wrong with a cron spec, in gorp's words; `None` when it is fine (or a one-off, which
/// the scheduler checks). `one_off_too`: the command also takes one-offs (`!schedule add`).
fn spec_problem(spec: &str, one_off_too: bool) -> Option<String> {
    if one_off_too && is_one_off(spec) {
        return None;
    }
    if scheduler::parse_cron(spec).is_ok() {
        return None;
    }
    let fields = spec.split_whitespace().count();
    Some(
        if spec.trim_start().starts_with('@') || (5..=6).contains(&fields) {
            strings::cron_invalid(spec.trim())
        } else {
            strings::cron_field_count(spec.trim(), fields, one_off_too)
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_cron_is_explained_in_gorps_words() {
        let add = spec_problem("not a cron", true).unwrap();
        assert!(add.contains("has 3 fields"), "{add}");
        assert!(
            add.contains("5 fields") && add.contains("6 with seconds"),
            "{add}"
        );
        assert!(add.contains("in 30m"), "the one-off forms: {add}");
        // Nothing of croner's own text, whose field counts contradict gorp's.
        for croner in ["between 5 and 7", "Invalid pattern", "Pattern", "7 fields"] {
            assert!(!add.contains(croner), "{add}");
        }
        let next = spec_problem("not a cron", false).unwrap();
        assert!(!next.contains("in 30m"), "`next` takes cron only: {next}");

        let range = spec_problem("61 * * * *", false).unwrap();
        assert!(range.contains("not a valid cron expression"), "{range}");
        assert!(range.contains("minute is 0-59"), "{range}");
        assert!(!range.contains("Component"), "{range}");
        let alias = spec_problem("@sometimes", true).unwrap();
        assert!(alias.contains("@daily"), "{alias}");
        let one = spec_problem("x", true).unwrap();
        assert!(one.contains("has 1 field but"), "{one}");
    }

    #[test]
    fn good_specs_and_one_offs_pass() {
        for ok in [
            "0 9 * * 1-5",
            "*/5 * * * *",
            "0 0 9 * * MON",
            "@daily",
            " @hourly ",
        ] {
            assert_eq!(spec_problem(ok, false), None, "{ok}");
        }
        // One-offs are the scheduler's to check (it words their errors itself).
        for one_off in ["in 10m", "in x", "2026-12-01T09:00:00+01:00"] {
            assert_eq!(spec_problem(one_off, true), None, "{one_off}");
            assert!(spec_problem(one_off, false).is_some(), "{one_off}");
        }
    }
}
