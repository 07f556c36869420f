//! The agent commands of a channel's room: `!status` (agent, queue, running job, session),
//! `!reset` (the next job starts a new conversation) and `!warm` (start the agent now).

use super::super::failure::Answer;
use super::super::strings;
use super::Ctx;
use crate::store::{format_ms, now_ms, WarmState};

/// `!status`.
pub(super) async fn status(cx: &Ctx<'_>) -> Answer {
    let ch = cx.room_channel().await?;
    let store = cx.store();
    let warm = store.warm_get(ch.id).await?;
    let depth = store.channel_queue_depth(ch.id).await?;
    let running = cx.running_job(&ch).await?;
    let agent = match &warm {
        // The store already reports a warm agent with a running job as `busy`.
        Some(w) => {
            let pid = w
                .pid
                .filter(|_| matches!(w.state, WarmState::Warm | WarmState::Busy));
            let until = w
                .expires_at
                .filter(|_| w.state == WarmState::Warm)
                .map(format_ms);
            strings::agent_line(w.state.as_str(), pid, until.as_deref())
        }
        None => strings::AGENT_COLD.into(),
    };
    let running = match &running {
        Some(j) => strings::running_line(
            &j.id,
            &j.started_at.map(format_ms).unwrap_or_default(),
            j.attempt,
        ),
        None => strings::NOTHING_RUNNING.into(),
    };
    Ok(strings::status(
        &ch.name,
        &agent,
        depth,
        &running,
        ch.acp_session_id.as_deref(),
        &cx.config().channel_dir(&ch.name).display(),
    ))
}

/// `!reset`: forgets the channel's ACP session (and tells a warm agent to start a new one).
pub(super) async fn reset(cx: &Ctx<'_>) -> Answer {
    let ch = cx.room_channel().await?;
    match &cx.bot.services().warm {
        Some(w) => w.reset(ch.id).await?,
        None => cx.store().channel_set_acp_session(ch.id, None).await?,
    }
    Ok(strings::reset_done(&ch.name))
}

/// `!warm`: asks the warm pool to start the channel's agent now.
pub(super) async fn warm(cx: &Ctx<'_>) -> Answer {
    let ch = cx.room_channel().await?;
    let now = now_ms();
    cx.store().warm_request(ch.id, Some(now), now).await?;
    Ok(strings::warming(&ch.name))
}
