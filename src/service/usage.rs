//! Usage reports: what the agents' turns cost, from the committed usage rows (one per attempt),
//! grouped by day, channel or source. Every front end reads the same report.

use serde::Serialize;

use crate::budget::SpendPolicy;
use crate::store::{ChannelSpend, Millis, Store, StoreError, UsageBy, UsageFilter, UsageRow};

/// The window of a report when none is given.
pub const DEFAULT_SINCE: &str = "7d";

/// A report: its rows and their sum.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct Report {
    /// Attempts whose turn ended at or after this (Unix ms).
    pub since: Millis,
    pub by: UsageBy,
    pub channel: Option<String>,
    pub rows: Vec<UsageRow>,
    /// Every row summed (`key` is `total`).
    pub total: UsageRow,
    /// Spend today and this month against the budgets: of the report's channel, else of every
    /// channel with a daily or monthly budget. Days and months are those of `timezone`.
    pub budgets: Vec<ChannelSpend>,
    pub timezone: String,
}

/// Reads `since` as a window back from `now` (`30m`, `24h`, `7d`, `4w`) or a UTC date
/// (`2026-12-01`).
pub fn parse_since(s: &str, now: Millis) -> Result<Millis, String> {
    let s = s.trim();
    let bad = || {
        format!(
            "since {s:?} is not a window such as 30m, 24h, 7d, 4w, nor a date such as 2026-12-01"
        )
    };
    if let Ok(d) = chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        let ms = d
            .and_hms_opt(0, 0, 0)
            .ok_or_else(bad)?
            .and_utc()
            .timestamp_millis();
        return Ok(ms);
    }
    let split = s.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let (n, unit) = s.split_at(split);
    let n: i64 = n.parse().map_err(|_| bad())?;
    let unit_ms: i64 = match unit {
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        "w" => 7 * 86_400_000,
        _ => return Err(bad()),
    };
    if n <= 0 || n > 3660 {
        return Err(format!(
            "since {s:?}: the window must be from 1 unit to ten years"
        ));
    }
    Ok(now - n * unit_ms)
}

/// The report of `filter`, with the budgets' windows as of `now`.
pub async fn report(
    store: &Store,
    filter: UsageFilter,
    policy: &SpendPolicy,
    now: Millis,
) -> Result<Report, StoreError> {
    let rows = store.usage_report(&filter).await?;
    let mut budgets = store
        .channel_spend(&policy.limits(now), filter.channel.as_deref())
        .await?;
    if filter.channel.is_none() {
        budgets.retain(|b| b.day_max_usd.is_some() || b.month_max_usd.is_some());
    }
    let mut total = UsageRow {
        key: "total".into(),
        jobs: 0,
        attempts: 0,
        input_tokens: 0,
        output_tokens: 0,
        cache_read_tokens: 0,
        cache_write_tokens: 0,
        cost_usd: 0.0,
        agent_secs: 0.0,
    };
    for r in &rows {
        // A job's attempts may fall in several days: jobs are summed per row.
        total.jobs += r.jobs;
        total.attempts += r.attempts;
        total.input_tokens += r.input_tokens;
        total.output_tokens += r.output_tokens;
        total.cache_read_tokens += r.cache_read_tokens;
        total.cache_write_tokens += r.cache_write_tokens;
        total.cost_usd += r.cost_usd;
        total.agent_secs += r.agent_secs;
    }
    Ok(Report {
        since: filter.since,
        by: filter.by,
        channel: filter.channel,
        rows,
        total,
        budgets,
        timezone: policy.tz.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_and_dates_are_read_and_anything_else_refused() {
        let now = 1_000_000_000_000;
        assert_eq!(parse_since("7d", now), Ok(now - 7 * 86_400_000));
        assert_eq!(parse_since("30m", now), Ok(now - 30 * 60_000));
        assert_eq!(parse_since(" 2w ", now), Ok(now - 14 * 86_400_000));
        assert_eq!(parse_since("2026-12-01", now), Ok(1_796_083_200_000));
        for bad in [
            "",
            "7",
            "d",
            "-3d",
            "0d",
            "7y",
            "1.5d",
            "99999d",
            "2026-13-01",
            "yesterday",
        ] {
            assert!(parse_since(bad, now).is_err(), "{bad:?}");
        }
    }
}
