//! Schedules: parsing when a schedule fires (cron in an IANA zone, `in 30m`, an RFC 3339
//! time) and adding, pausing, resuming and removing schedules. The loop that fires them is
//! [`crate::scheduler`].

use std::str::FromStr;

use chrono::{DateTime, TimeZone};
use chrono_tz::Tz;
use croner::parser::{CronParser, Seconds};
use croner::Cron;

use crate::config::Config;
use crate::store::{CatchUp, Millis, NewSchedule, Overlap, Schedule, Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum ScheduleError {
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// When a schedule fires.
#[derive(Debug, Clone)]
pub enum When {
    Cron { cron: Box<Cron>, expr: String },
    Once(Millis),
}

/// Parses a croner expression: 5 fields (minute granularity), 6 (with seconds), or an alias
/// such as `@daily`.
pub fn parse_cron(expr: &str) -> Result<Cron, ScheduleError> {
    let expr = expr.trim();
    // A list with an empty item (`,5`, `1,,2`, `5,`) is a typo; the cron library reads a field
    // of only commas as matching nothing, and then searches for a slot for tens of seconds.
    if let Some(field) = expr
        .split_whitespace()
        .find(|f| f.split(',').any(str::is_empty) && f.contains(','))
    {
        return Err(ScheduleError::Invalid(format!(
            "invalid cron expression {expr:?}: the field {field:?} has an empty list item; \
             separate values with single commas, e.g. \"0,30 9 * * *\""
        )));
    }
    CronParser::builder()
        .seconds(Seconds::Optional)
        .build()
        .parse(expr)
        .map_err(|e| {
            tracing::debug!(expr, error = %e, "cron expression refused");
            ScheduleError::Invalid(format!(
                "invalid cron expression {expr:?}; expected 5 fields (minute hour day month \
                 weekday, e.g. \"0 9 * * 1-5\"), 6 with seconds first, or an alias such as \
                 @daily"
            ))
        })
}

/// Parses an IANA time zone name.
pub fn parse_tz(name: &str) -> Result<Tz, ScheduleError> {
    Tz::from_str(name.trim()).map_err(|_| {
        ScheduleError::Invalid(format!(
            "unknown time zone {name:?}; expected an IANA name such as Europe/Berlin or UTC"
        ))
    })
}

/// Parses when a schedule fires: `in 30m` / `in 2h` / `in 1d` / `in 45s`, an RFC 3339 time
/// (one-offs), or a cron expression.
pub fn parse_when(spec: &str, now: Millis) -> Result<When, ScheduleError> {
    let spec = spec.trim();
    if let Some(rest) = spec.strip_prefix("in ") {
        let rest = rest.trim();
        let (num, unit) = rest.split_at(
            rest.find(|c: char| !c.is_ascii_digit())
                .unwrap_or(rest.len()),
        );
        let n: i64 = num.parse().map_err(|_| {
            ScheduleError::Invalid(format!("invalid delay {spec:?}; expected e.g. \"in 30m\""))
        })?;
        let unit_ms = match unit.trim() {
            "s" | "sec" | "secs" | "seconds" => 1_000,
            "m" | "min" | "mins" | "minutes" => 60_000,
            "h" | "hour" | "hours" => 3_600_000,
            "d" | "day" | "days" => 86_400_000,
            other => {
                return Err(ScheduleError::Invalid(format!(
                    "invalid delay unit {other:?} in {spec:?}; expected s, m, h or d"
                )))
            }
        };
        if n <= 0 || n > 366 * 86_400_000 / unit_ms {
            return Err(ScheduleError::Invalid(format!(
                "delay {spec:?} must be positive and at most a year"
            )));
        }
        return Ok(When::Once(now + n * unit_ms));
    }
    if spec.len() >= 20 && spec.as_bytes()[4] == b'-' && spec.contains('T') {
        let t = DateTime::parse_from_rfc3339(spec).map_err(|e| {
            ScheduleError::Invalid(format!(
                "invalid time {spec:?}: {e}; expected RFC 3339 such as 2026-12-01T09:00:00+01:00"
            ))
        })?;
        let at = t.timestamp_millis();
        if at <= now {
            return Err(ScheduleError::Invalid(format!("{spec} is in the past")));
        }
        return Ok(When::Once(at));
    }
    let cron = parse_cron(spec)?;
    Ok(When::Cron {
        cron: Box::new(cron),
        expr: spec.to_string(),
    })
}

/// The first slot strictly after `after`, in `tz`.
pub fn next_after(cron: &Cron, tz: Tz, after: Millis) -> Option<Millis> {
    let t = tz.timestamp_millis_opt(after).single()?;
    cron.find_next_occurrence(&t, false)
        .ok()
        .map(|d| d.timestamp_millis())
}

/// The next `n` slots after `from`, in `tz`.
pub fn upcoming(cron: &Cron, tz: Tz, from: Millis, n: usize) -> Vec<DateTime<Tz>> {
    let Some(start) = tz.timestamp_millis_opt(from).single() else {
        return Vec::new();
    };
    cron.iter_after(start).take(n).collect()
}

pub use crate::config::default_timezone;

/// What [`add`] needs.
#[derive(Debug, Clone)]
pub struct AddSchedule {
    pub channel: String,
    /// Cron expression, `in 30m`, or an RFC 3339 time.
    pub when: String,
    pub prompt: String,
    pub timezone: Option<String>,
    /// Default `once`.
    pub catch_up: Option<CatchUp>,
    /// Default `skip`.
    pub overlap: Option<Overlap>,
    pub created_by: String,
}

/// Validates and stores a schedule; nothing is written when any part is invalid.
pub async fn add(
    store: &Store,
    config: &Config,
    req: AddSchedule,
    now: Millis,
) -> Result<Schedule, ScheduleError> {
    let tz_name = req
        .timezone
        .clone()
        .unwrap_or_else(|| default_timezone(config));
    let tz = parse_tz(&tz_name)?;
    if req.prompt.trim().is_empty() {
        return Err(ScheduleError::Invalid("prompt is empty".into()));
    }
    let (cron, next) = match parse_when(&req.when, now)? {
        When::Once(at) => (None, at),
        When::Cron { cron, expr } => {
            let next = next_after(&cron, tz, now).ok_or_else(|| {
                ScheduleError::Invalid(format!("cron expression {expr:?} never fires"))
            })?;
            (Some(expr), next)
        }
    };
    let channel = store
        .channel_get(&req.channel)
        .await?
        .ok_or_else(|| StoreError::UnknownChannel(req.channel.clone()))?;
    Ok(store
        .schedule_insert(
            NewSchedule {
                channel_id: channel.id,
                cron,
                timezone: tz.name().to_string(),
                prompt: req.prompt,
                catch_up: req.catch_up.unwrap_or(CatchUp::Once),
                overlap: req.overlap.unwrap_or(Overlap::Skip),
                next_run_at: next,
                created_by: req.created_by,
            },
            now,
        )
        .await?)
}

/// Pauses a schedule. False when there is no such active schedule.
pub async fn pause(store: &Store, id: i64) -> Result<bool, ScheduleError> {
    Ok(store.schedule_set_enabled(id, false, None).await?)
}

/// Resumes a paused schedule from its next slot after `now` (paused slots are not caught up).
/// False when there is no such schedule (also when it is removed while this runs).
pub async fn resume(store: &Store, id: i64, now: Millis) -> Result<bool, ScheduleError> {
    let Some(s) = store.schedule_get(id).await? else {
        return Ok(false);
    };
    let next = match &s.cron {
        Some(expr) => next_after(&parse_cron(expr)?, parse_tz(&s.timezone)?, now),
        None => s.next_run_at.map(|t| t.max(now)),
    };
    Ok(store.schedule_set_enabled(id, true, next).await?)
}

/// Removes a schedule (its jobs stay). False when there is no such schedule.
pub async fn remove(store: &Store, id: i64) -> Result<bool, ScheduleError> {
    Ok(store.schedule_delete(id).await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by fuzzing: `", */2 * * *"` parsed, matched no minute at all, and finding its next
    /// slot took tens of seconds (a request or `!schedule add` would hang that long).
    #[test]
    fn a_field_with_an_empty_list_item_is_refused_at_once() {
        for spec in [
            ", */2 * * *",
            ",,",
            "5, * * * *",
            "1,,2 * * * *",
            "0 9 ,1 * *",
            "0 9 * * 1,",
        ] {
            let e = parse_cron(spec).unwrap_err().to_string();
            assert!(e.contains("empty list item"), "{spec:?}: {e}");
            let e = parse_when(spec, 1_767_225_600_000).unwrap_err().to_string();
            assert!(e.contains("empty list item"), "{spec:?}: {e}");
        }
        for spec in ["0,30 9 * * *", "*/5 * * * *", "0 9 * * 1-5", "@daily"] {
            assert!(parse_cron(spec).is_ok(), "{spec:?}");
        }
    }
}
