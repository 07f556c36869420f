//! `!usage` and `!budget`: what this room's channel spent, and its limits (per job, per day, per
//! month).
//! Only `allowed_users` reach these handlers.

use super::super::failure::Answer;
use super::*;
use crate::budget::{self, SpendPolicy};
use crate::matrix::command::BudgetSet;
use crate::service::{channels, usage};
use crate::store::{now_ms, UsageBy, UsageFilter};

pub(super) async fn report(cx: &Ctx<'_>, since: Option<&str>) -> Answer {
    let ch = cx.room_channel().await?;
    let since = usage::parse_since(since.unwrap_or(usage::DEFAULT_SINCE), now_ms())
        .map_err(|e| refuse(format!("{e}; usage: `{}`", strings::usage::USAGE)))?;
    let filter = UsageFilter {
        since,
        channel: Some(ch.name.clone()),
        by: UsageBy::Day,
    };
    let policy = SpendPolicy::from_config(cx.config());
    let r = usage::report(cx.store(), filter, &policy, now_ms()).await?;
    Ok(strings::usage_report(&ch.name, &r))
}

pub(super) async fn budget(cx: &Ctx<'_>, set: Option<BudgetSet>) -> Answer {
    let mut ch = cx.room_channel().await?;
    if let Some(set) = set {
        let changes = match set {
            BudgetSet::JobUsd(c) => channels::Changes {
                budget_job_usd: Some(c),
                ..Default::default()
            },
            BudgetSet::JobTokens(t) => channels::Changes {
                budget_job_tokens: Some(t),
                ..Default::default()
            },
            BudgetSet::DayUsd(c) => channels::Changes {
                budget_day_usd: Some(c),
                ..Default::default()
            },
            BudgetSet::MonthUsd(c) => channels::Changes {
                budget_month_usd: Some(c),
                ..Default::default()
            },
        };
        ch = channels::update(cx.store(), &ch.name, changes)
            .await?
            .ok_or_else(|| refuse(strings::NOT_A_CHANNEL))?;
        tracing::info!(channel = %ch.name, usd = ?ch.budget_job_usd, tokens = ?ch.budget_job_tokens,
            day = ?ch.budget_day_usd, month = ?ch.budget_month_usd, by = %cx.sender, "budget set");
    }
    let policy = SpendPolicy::from_config(cx.config());
    let now = now_ms();
    let spend = cx
        .store()
        .channel_spend(&policy.limits(now), Some(&ch.name))
        .await?;
    let lines: Vec<String> = spend
        .iter()
        .flat_map(|s| budget::spend_lines(&policy, s, now))
        .collect();
    let b = &cx.config().budget;
    Ok(strings::budget_is(
        &ch.name,
        (
            ch.budget_job_usd.or(b.job_max_cost_usd),
            ch.budget_job_usd.is_some(),
        ),
        (
            ch.budget_job_tokens.or(b.job_max_tokens.map(|t| t as i64)),
            ch.budget_job_tokens.is_some(),
        ),
        &lines,
    ))
}
