//! The job commands: `!jobs` (the newest jobs, of this room's channel when it is one), `!job`
//! (one job and the start of its output) and `!cancel` (a job, or the one running here).

use super::super::bot::one_line;
use super::super::failure::{refuse, Answer};
use super::super::render::split_message;
use super::super::strings;
use super::Ctx;
use crate::store::{format_ms, CancelOutcome, JobFilter};

/// The most of a job's output `!job` shows; `gorp job` shows the rest.
const MAX_OUTPUT_SHOWN: usize = 4000;

/// `!jobs [n]`.
pub(super) async fn list(cx: &Ctx<'_>, limit: i64) -> Answer {
    let ch = cx.room_channel_opt().await?;
    let jobs = cx
        .store()
        .job_list(&JobFilter {
            channel: ch.map(|c| c.name),
            limit,
            ..Default::default()
        })
        .await?;
    if jobs.is_empty() {
        return Ok(strings::NO_JOBS.into());
    }
    let mut out = String::new();
    for j in jobs {
        out.push_str(&strings::job_line(
            &j.id,
            j.state,
            &j.channel,
            &j.source.to_string(),
            &one_line(&j.prompt, 60),
        ));
    }
    Ok(out)
}

/// `!job <id>`.
pub(super) async fn show(cx: &Ctx<'_>, prefix: &str) -> Answer {
    let id = cx.resolve_job(prefix).await?;
    let store = cx.store();
    let j = store
        .job_get(&id)
        .await?
        .ok_or_else(|| refuse(strings::no_job(prefix)))?;
    let output = store.job_output(&id).await?;
    let mut out = strings::job_head(
        &j.id,
        j.state,
        &j.channel,
        &j.source.to_string(),
        &format_ms(j.created_at),
        j.attempt,
        j.max_attempts,
    );
    if let Some(e) = &j.error {
        out.push_str(&strings::job_error_line(&one_line(e, 300)));
    }
    out.push_str(&strings::job_prompt_line(&one_line(&j.prompt, 200)));
    if !output.is_empty() {
        let cut = split_message(&output, MAX_OUTPUT_SHOWN);
        out.push('\n');
        out.push_str(&cut[0]);
        if cut.len() > 1 {
            out.push_str(&strings::job_output_cut(&j.id));
        }
    }
    Ok(out)
}

/// `!cancel [id]`: without an id, the job running in this room's channel.
pub(super) async fn cancel(cx: &Ctx<'_>, prefix: Option<&str>) -> Answer {
    let id = match prefix {
        Some(prefix) => cx.resolve_job(prefix).await?,
        None => {
            let ch = cx.room_channel().await?;
            let job = cx
                .running_job(&ch)
                .await?
                .ok_or_else(|| refuse(strings::nothing_running(&ch.name)))?;
            tracing::Span::current().record("job", job.id.as_str());
            job.id
        }
    };
    Ok(match cx.bot.cancel(&id).await? {
        CancelOutcome::Cancelled => strings::cancelled_before_start(&id),
        CancelOutcome::Requested => strings::stopping(&id),
        CancelOutcome::AlreadyFinished(st) => strings::already_finished(&id, st),
    })
}
