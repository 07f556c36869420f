//! The `!` commands: one handler per command group, each from the parsed [`Command`] to the
//! Markdown answer (texts in [`strings`]).
//!
//! - [`channels`]: `!create`, `!join`, `!list`, `!delete`, `!token` (channels and their rooms).
//! - [`agent`]: `!status`, `!reset`, `!warm` (the agent of this room's channel).
//! - [`jobs`]: `!jobs`, `!job`, `!cancel`.
//! - [`schedule`]: `!schedule …`.
//! - [`approvals`]: `!policy`, `!approvals`, `!allow`, `!always`, `!deny`, `!answer`, `!rules`.
//! - [`usage`]: `!usage`, `!budget`.
//!
//! A handler returns an [`Answer`]; a [`Failure`] becomes the room's ❌ reply in [`run`] (an
//! internal one is logged with an error id and the room sees only that id).

mod agent;
mod approvals;
mod channels;
mod jobs;
mod schedule;
mod usage;

use matrix_sdk::ruma::UserId;
use matrix_sdk::Room;

use super::bot::Bot;
use super::command::Command;
use super::failure::{self, refuse};
use super::strings;
use crate::store::{Channel, Job, JobFilter, JobState};

/// What a handler knows about the request: the bot, the room it came from and who sent it.
pub(super) struct Ctx<'a> {
    pub bot: &'a Bot,
    pub room: &'a Room,
    pub sender: &'a UserId,
}

/// Runs a command; returns the Markdown answer (a failure's answer when it failed).
pub(super) async fn run(bot: &Bot, cmd: Command, room: &Room, sender: &UserId) -> String {
    let cx = Ctx { bot, room, sender };
    let result = match cmd {
        Command::Help => Ok(strings::HELP.to_string()),
        Command::Create { name } => channels::create(&cx, &name).await,
        Command::Join { name } => channels::join(&cx, &name).await,
        Command::List => channels::list(&cx).await,
        Command::Delete { name } => channels::delete(&cx, &name).await,
        Command::Token => channels::token(&cx).await,
        Command::Status => agent::status(&cx).await,
        Command::Reset => agent::reset(&cx).await,
        Command::Warm => agent::warm(&cx).await,
        Command::Jobs { limit } => jobs::list(&cx, limit).await,
        Command::Job { id } => jobs::show(&cx, &id).await,
        Command::Cancel { id } => jobs::cancel(&cx, id.as_deref()).await,
        Command::Schedule(sc) => schedule::run(&cx, sc).await,
        Command::Policy { set } => approvals::policy(&cx, set).await,
        Command::Options => channels::options(&cx).await,
        Command::SetOption { key, set } => channels::set_option(&cx, &key, set).await,
        Command::Usage { since } => usage::report(&cx, since.as_deref()).await,
        Command::Budget { set } => usage::budget(&cx, set).await,
        Command::Approvals => approvals::list(&cx).await,
        Command::Allow { id, always } => {
            let choice = if always {
                crate::service::approvals::Choice::AllowAlways
            } else {
                crate::service::approvals::Choice::AllowOnce
            };
            approvals::decide(&cx, id.as_deref(), choice).await
        }
        Command::Answer { id, answer } => approvals::answer(&cx, id.as_deref(), &answer).await,
        Command::Deny { id } => {
            approvals::decide(&cx, id.as_deref(), crate::service::approvals::Choice::Deny).await
        }
        Command::Rules { remove } => approvals::rules(&cx, remove).await,
    };
    failure::answer(result)
}

impl Ctx<'_> {
    fn store(&self) -> &crate::store::Store {
        &self.bot.services().store
    }

    fn config(&self) -> &crate::config::Config {
        &self.bot.services().config
    }

    /// The channel of the room the command came from; refused when the room is none.
    async fn room_channel(&self) -> Result<Channel, failure::Failure> {
        self.store()
            .channel_get_by_room(self.room.room_id().as_str())
            .await?
            .ok_or_else(|| refuse(strings::NOT_A_CHANNEL))
    }

    /// The channel of the room, if it is one.
    async fn room_channel_opt(&self) -> Result<Option<Channel>, failure::Failure> {
        Ok(self
            .store()
            .channel_get_by_room(self.room.room_id().as_str())
            .await?)
    }

    /// The job running in channel `ch`, if any.
    async fn running_job(&self, ch: &Channel) -> Result<Option<Job>, failure::Failure> {
        let running = self
            .store()
            .job_list(&JobFilter {
                state: Some(JobState::Running),
                channel: Some(ch.name.clone()),
                limit: 1,
                ..Default::default()
            })
            .await?;
        Ok(running.into_iter().next())
    }

    /// The one job whose id starts with `prefix`; refused when none or several do.
    async fn resolve_job(&self, prefix: &str) -> Result<String, failure::Failure> {
        let ids = self.store().job_ids_with_prefix(prefix, 2).await?;
        match ids.as_slice() {
            [one] => {
                tracing::Span::current().record("job", one.as_str());
                Ok(one.clone())
            }
            [] => Err(refuse(strings::no_job(prefix))),
            _ => Err(refuse(strings::ambiguous_job(prefix))),
        }
    }
}
