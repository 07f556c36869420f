//! The reply pump: job rows → Matrix.
//!
//! Everything a room sees about a job is derived from its rows, read after they are committed:
//! the status reaction on the prompt (👀 queued, ⏳ running, ✅ succeeded, ❌ failed,
//! 🛑 cancelled), one reply message per job edited (`m.replace`) as output streams — at most
//! once per `edit_interval_ms` and at most `max_edits` times — then a final edit with the whole
//! answer rendered from Markdown, split across further messages when it is too long; a typing
//! notice while a job of the room runs; a notice when gorp restarted while a job ran; and a
//! notice when a queued job is held because its channel's budget is spent.
//!
//! Progress is written to `matrix_replies`, so after a restart the pump continues each open
//! reply where it stopped (the worst case is one edit or one part posted twice).
//!
//! A prompt never shows two status reactions of gorp at once: the old one is redacted before
//! the new one is sent. Each reply is brought up to date inside a span with its job, channel
//! and room.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use anyhow::Context;

use matrix_sdk::ruma::events::reaction::ReactionEventContent;
use matrix_sdk::ruma::events::relation::{Annotation, InReplyTo, Reply};
use matrix_sdk::ruma::events::room::message::{
    Relation, ReplacementMetadata, RoomMessageEventContent,
};
use matrix_sdk::ruma::{EventId, OwnedRoomId, RoomId};
use matrix_sdk::{Client, Room};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::render::{markdown_to_html, render_reply, split_message, ReplyInput, MAX_PART_BYTES};
use super::strings::{self, state_emoji};
use crate::config::Config;
use crate::store::{
    now_ms, Event, EventKind, JobState, MatrixReply, MatrixReplyUpdate, Source, Store,
};

/// Open replies handled per pass.
const BATCH: i64 = 200;
/// A reply that keeps failing (retried with backoff from 1 s to a minute) is given up after
/// this long, with the error recorded in its row.
const GIVE_UP_AFTER: Duration = Duration::from_secs(15 * 60);

/// A reply's run of failures.
struct Failing {
    since: Instant,
    next_try: Instant,
    wait: Duration,
}

pub struct Pump {
    client: Client,
    store: Store,
    edit_interval: Duration,
    max_edits: i64,
    /// When each job's reply was last edited (in memory: at most one edit early after a restart).
    last_edit: HashMap<String, Instant>,
    failures: HashMap<String, Failing>,
    typing: HashSet<OwnedRoomId>,
}

impl Pump {
    pub fn new(client: Client, store: Store, config: &Config) -> Pump {
        let m = config.matrix.clone().unwrap_or_default();
        Pump {
            client,
            store,
            edit_interval: Duration::from_millis(m.edit_interval_ms),
            max_edits: i64::from(m.max_edits),
            last_edit: HashMap::new(),
            failures: HashMap::new(),
            typing: HashSet::new(),
        }
    }

    /// Runs until `shutdown`: a pass after every commit (at most one per 20 ms) and at least
    /// every `edit_interval` while replies are open.
    /// `recoveries` changes when the homeserver is reachable again: replies that were backing
    /// off are retried at once.
    #[tracing::instrument(name = "matrix_pump", skip_all)]
    pub async fn run(
        mut self,
        mut recoveries: tokio::sync::watch::Receiver<u64>,
        shutdown: CancellationToken,
    ) {
        let mut commits = self.store.subscribe_commits();
        let min_gap = Duration::from_millis(20);
        loop {
            let started = Instant::now();
            let open = match self.pass().await {
                Ok(n) => n,
                Err(e) => {
                    tracing::warn!(error = %e, "Matrix reply pass failed");
                    1
                }
            };
            let idle = if open > 0 {
                self.edit_interval.min(Duration::from_secs(1))
            } else {
                Duration::from_secs(3600)
            };
            tokio::select! {
                _ = commits.changed() => {}
                Ok(()) = recoveries.changed() => self.failures.clear(),
                _ = tokio::time::sleep(idle) => {}
                _ = shutdown.cancelled() => break,
            }
            let spent = started.elapsed();
            if spent < min_gap {
                tokio::select! {
                    _ = tokio::time::sleep(min_gap - spent) => {}
                    _ = shutdown.cancelled() => break,
                }
            }
        }
        for room in std::mem::take(&mut self.typing) {
            if let Some(r) = self.client.get_room(&room) {
                let _ = r.typing_notice(false).await;
            }
        }
    }

    /// One pass over the open replies. Returns how many are still open.
    pub async fn pass(&mut self) -> anyhow::Result<usize> {
        let open = self.store.matrix_open_replies(BATCH).await?;
        let mut running_rooms: HashSet<OwnedRoomId> = HashSet::new();
        let mut still_open = 0;
        for r in open {
            if self.backing_off(&r.job_id) {
                still_open += 1;
                continue;
            }
            let Ok(room_id) = RoomId::parse(r.room_id.as_str()) else {
                self.give_up(&r, "invalid room id").await;
                continue;
            };
            let Some(room) = self.client.get_room(&room_id) else {
                // Not synced yet (a room made a moment ago) or gorp left it.
                self.fail(&r, "gorp is not in the room").await;
                still_open += 1;
                continue;
            };
            if r.state == JobState::Running {
                running_rooms.insert(room_id.clone());
            }
            let span = tracing::info_span!(
                "matrix_reply",
                job = %r.job_id,
                channel = %r.channel,
                room = %r.room_id
            );
            match self.update(&room, &r).instrument(span).await {
                Ok(done) => {
                    self.failures.remove(&r.job_id);
                    if !done {
                        still_open += 1;
                    } else {
                        self.last_edit.remove(&r.job_id);
                    }
                }
                Err(e) => {
                    tracing::warn!(job = %r.job_id, room = %r.room_id, error = %e, "cannot update the Matrix reply");
                    self.fail(&r, &e.to_string()).await;
                    still_open += 1;
                }
            }
        }
        for room_id in &running_rooms {
            if let Some(room) = self.client.get_room(room_id) {
                // matrix-sdk re-sends only when the previous notice is about to lapse.
                let _ = room.typing_notice(true).await;
            }
        }
        let stopped: Vec<OwnedRoomId> = self.typing.difference(&running_rooms).cloned().collect();
        for room_id in stopped {
            if let Some(room) = self.client.get_room(&room_id) {
                let _ = room.typing_notice(false).await;
            }
        }
        self.typing = running_rooms;
        Ok(still_open)
    }

    async fn fail(&mut self, r: &MatrixReply, error: &str) {
        let now = Instant::now();
        let f = self.failures.entry(r.job_id.clone()).or_insert(Failing {
            since: now,
            next_try: now,
            wait: Duration::from_millis(500),
        });
        f.wait = (f.wait * 2).min(Duration::from_secs(60));
        f.next_try = now + f.wait;
        if now.duration_since(f.since) >= GIVE_UP_AFTER {
            self.failures.remove(&r.job_id);
            self.give_up(r, error).await;
        }
    }

    /// Whether a failing reply waits out its backoff in this pass.
    fn backing_off(&self, job_id: &str) -> bool {
        self.failures
            .get(job_id)
            .is_some_and(|f| Instant::now() < f.next_try)
    }

    async fn give_up(&mut self, r: &MatrixReply, error: &str) {
        tracing::warn!(job = %r.job_id, room = %r.room_id, error, "giving up on the Matrix reply");
        let mut u = r.update();
        u.done = true;
        u.error = Some(error.to_string());
        let _ = self.store.matrix_reply_update(&r.job_id, u, now_ms()).await;
    }

    /// Brings one job's room up to date with its rows. Returns true when the reply is final.
    async fn update(&mut self, room: &Room, r: &MatrixReply) -> anyhow::Result<bool> {
        let mut u = r.update();
        let prompt = match &r.prompt_event_id {
            Some(p) => Some(EventId::parse(p.as_str())?),
            None => None,
        };
        // 👀 first, whatever the job's state by now: the prompt is committed.
        if let Some(prompt) = &prompt {
            if u.reaction_key.is_none() {
                self.react(room, r, prompt, state_emoji(JobState::Queued), &mut u)
                    .await?;
            }
        }
        // Then the text, then the state's reaction, so ✅ comes after the answer.
        let posted = self.post(room, r, &mut u).await?;
        if let Some(prompt) = &prompt {
            let want = state_emoji(r.state);
            if u.reaction_key.as_deref() != Some(want) {
                self.react(room, r, prompt, want, &mut u).await?;
            }
        }
        if posted {
            self.store
                .matrix_reply_update(&r.job_id, u.clone(), now_ms())
                .await?;
        }
        Ok(u.done)
    }

    /// Posts what the job's rows say that the room has not seen: restart notices, the reply,
    /// streaming edits, the final answer. Returns whether `u` changed.
    async fn post(
        &mut self,
        room: &Room,
        r: &MatrixReply,
        u: &mut MatrixReplyUpdate,
    ) -> anyhow::Result<bool> {
        let mut changed = false;
        let terminal = r.state.is_terminal();
        let fresh_output = r.last_seq > r.rendered_seq;
        // Attempts up to this one are over, so their restart notices can be posted.
        let finished_attempts = if r.state == JobState::Running {
            r.attempt - 1
        } else {
            r.attempt
        };
        let restart_check = u.noted_attempt < finished_attempts;
        // A queued job with rows the room has not seen may have been held by a spent budget.
        let held_check = r.state == JobState::Queued && r.last_seq > r.rendered_seq;
        let edit_due = r.state == JobState::Running
            && r.reply_event_id.is_some()
            && fresh_output
            && u.edits < self.max_edits
            && self
                .last_edit
                .get(&r.job_id)
                .is_none_or(|t| t.elapsed() >= self.edit_interval);
        let needs_events = terminal
            || restart_check
            || held_check
            || edit_due
            || (r.state == JobState::Running && r.reply_event_id.is_none());
        if !needs_events {
            return Ok(false);
        }
        let events = self.store.job_events_list(&r.job_id, 0, 100_000).await?;

        // A restart interrupted this job: say so once per interrupted attempt.
        let noted = u.noted_attempt;
        for ev in events.iter().filter(|e| {
            e.kind == EventKind::Rescued && e.attempt > noted && e.attempt <= finished_attempts
        }) {
            let text = strings::restart_notice(short_id(&r.job_id), ev.text.as_deref());
            room.send(RoomMessageEventContent::notice_plain(text))
                .await?;
            count("notice");
        }
        if restart_check {
            u.noted_attempt = finished_attempts;
            changed = true;
        }
        if held_check {
            // Held by a spent budget: say why once (one `held` event per attempt).
            for ev in events
                .iter()
                .filter(|e| e.kind == EventKind::Held && e.seq > r.rendered_seq)
            {
                let why = ev.text.as_deref().unwrap_or("held");
                let text = strings::held_notice(short_id(&r.job_id), why);
                let html = markdown_to_html(&text);
                room.send(RoomMessageEventContent::notice_html(text, html))
                    .await?;
                count("notice");
            }
            u.rendered_seq = r.last_seq;
            changed = true;
        }
        if r.state == JobState::Queued {
            return Ok(changed);
        }

        let markdown = render_reply(&ReplyInput {
            job_id: &r.job_id,
            source: r.source,
            state: r.state,
            attempt: r.attempt,
            max_attempts: r.max_attempts,
            error: r.error.as_deref(),
            stop_reason: r.stop_reason.as_deref(),
            show_source: r.source != Source::Matrix,
            events: &events,
        });

        if terminal {
            let mut markdown = markdown;
            if r.reply_footer {
                if let Some(footer) = strings::reply_footer(
                    r.started_at.zip(r.finished_at).map(|(s, f)| f - s),
                    r.input_tokens,
                    r.output_tokens,
                    r.cost_usd,
                ) {
                    markdown.push_str("\n\n");
                    markdown.push_str(&footer);
                }
            }
            let edit_of = match &r.reply_event_id {
                Some(id) => Some(EventId::parse(id.as_str())?),
                None => None,
            };
            let parts = fitting_parts(&markdown, edit_of.as_deref());
            let mut parts = parts.into_iter();
            let first = parts.next().unwrap_or_default();
            match &r.reply_event_id {
                Some(id) => {
                    let id = EventId::parse(id.as_str())?;
                    room.send(message(&first).make_replacement(ReplacementMetadata::new(id, None)))
                        .await?;
                    count("edit");
                    u.edits += 1;
                }
                None => {
                    let sent = room.send(self.first_message(&first, r)).await?;
                    count("reply");
                    u.reply_event_id = Some(sent.response.event_id.to_string());
                }
            }
            for part in parts {
                room.send(message(&part)).await?;
                count("part");
            }
            u.rendered_seq = r.last_seq.max(last_seq(&events));
            u.done = true;
            return Ok(true);
        }

        // Running: the reply appears at once, then follows the output at a bounded rate.
        let edit_of = match &r.reply_event_id {
            Some(id) => Some(EventId::parse(id.as_str())?),
            None => None,
        };
        let streaming = streaming_view(&markdown, edit_of.as_deref());
        match &r.reply_event_id {
            None => {
                let sent = room.send(self.first_message(&streaming, r)).await?;
                count("reply");
                u.reply_event_id = Some(sent.response.event_id.to_string());
                u.rendered_seq = r.last_seq;
                self.last_edit.insert(r.job_id.clone(), Instant::now());
                changed = true;
            }
            Some(id) if edit_due => {
                let id = EventId::parse(id.as_str())?;
                room.send(message(&streaming).make_replacement(ReplacementMetadata::new(id, None)))
                    .await?;
                count("edit");
                u.edits += 1;
                u.rendered_seq = r.last_seq;
                self.last_edit.insert(r.job_id.clone(), Instant::now());
                changed = true;
            }
            Some(_) => {}
        }
        Ok(changed)
    }

    /// Makes `key` the prompt's status reaction: the one it replaces is redacted first, so the
    /// prompt never shows two. The new reaction is recorded at once, so a later failure in the
    /// same pass cannot leave it behind unrecorded.
    async fn react(
        &mut self,
        room: &Room,
        r: &MatrixReply,
        prompt: &EventId,
        key: &str,
        u: &mut MatrixReplyUpdate,
    ) -> anyhow::Result<()> {
        if let Some(old) = u
            .reaction_event_id
            .as_deref()
            .and_then(|o| EventId::parse(o).ok())
        {
            // On failure the pass fails and is retried (with backoff) before anything is sent.
            room.redact(&old, None, None)
                .await
                .context("cannot remove the previous status reaction")?;
        }
        let sent = room
            .send(ReactionEventContent::new(Annotation::new(
                prompt.to_owned(),
                key.to_string(),
            )))
            .await?;
        count("reaction");
        u.reaction_key = Some(key.to_string());
        u.reaction_event_id = Some(sent.response.event_id.to_string());
        self.store
            .matrix_reply_update(&r.job_id, u.clone(), now_ms())
            .await?;
        Ok(())
    }

    /// The reply's first message: an answer to the prompt when there is one.
    fn first_message(&self, markdown: &str, r: &MatrixReply) -> RoomMessageEventContent {
        let mut content = message(markdown);
        if let Some(prompt) = r
            .prompt_event_id
            .as_deref()
            .and_then(|p| EventId::parse(p).ok())
        {
            content.relates_to = Some(Relation::Reply(Reply::new(InReplyTo::new(prompt))));
        }
        content
    }
}

/// Counts what the pump posted, by kind (`reaction`, `reply`, `edit`, `part`, `notice`).
fn count(kind: &'static str) {
    metrics::counter!(crate::metrics::MATRIX_SENDS, "kind" => kind).increment(1);
}

fn message(markdown: &str) -> RoomMessageEventContent {
    RoomMessageEventContent::text_html(markdown, markdown_to_html(markdown))
}

/// What a streaming edit shows: the first part of the output so far, marked as continuing.
fn streaming_view(markdown: &str, edit_of: Option<&EventId>) -> String {
    let parts = fitting_parts_within(markdown, edit_of, MAX_PART_BYTES - 64, 64);
    if parts.len() <= 1 {
        return markdown.to_string();
    }
    format!("{}\n\n…", parts[0])
}

/// Largest message content gorp sends, before encryption. The homeserver refuses events over
/// 64 KiB, Megolm's base64 ciphertext is a third larger than the content, and an edit carries
/// the text twice (fallback and new content), each as Markdown and HTML.
const MAX_CONTENT_BYTES: usize = 40_000;

fn fits(content: &RoomMessageEventContent, extra: usize) -> bool {
    serde_json::to_vec(content).is_ok_and(|v| v.len() + extra <= MAX_CONTENT_BYTES)
}

/// `markdown` split into parts that each fit one event (the first as an edit of `edit_of`).
fn fitting_parts(markdown: &str, edit_of: Option<&EventId>) -> Vec<String> {
    fitting_parts_within(markdown, edit_of, MAX_PART_BYTES, 0)
}

fn fitting_parts_within(
    markdown: &str,
    edit_of: Option<&EventId>,
    start: usize,
    extra: usize,
) -> Vec<String> {
    let mut max = start;
    loop {
        let parts = split_message(markdown, max);
        let ok = parts.iter().enumerate().all(|(i, part)| {
            let content = message(part);
            match (i, edit_of) {
                (0, Some(id)) => fits(
                    &content.make_replacement(ReplacementMetadata::new(id.to_owned(), None)),
                    extra,
                ),
                _ => fits(&content, extra),
            }
        });
        if ok || max <= 1024 {
            return parts;
        }
        max /= 2;
    }
}

fn last_seq(events: &[Event]) -> i64 {
    events.last().map(|e| e.seq).unwrap_or(0)
}

fn short_id(id: &str) -> &str {
    id.get(..8).unwrap_or(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn size(c: &RoomMessageEventContent) -> usize {
        serde_json::to_vec(c).unwrap().len()
    }

    #[test]
    fn every_part_fits_one_event_even_as_an_edit() {
        let id = EventId::parse("$reply:localhost").unwrap();
        // Escaping makes the HTML several times the Markdown.
        let heavy = "<&>\"' ".repeat(20_000);
        let plain = "word ".repeat(20_000);
        for text in [heavy.as_str(), plain.as_str()] {
            for edit in [None, Some(id.as_ref())] {
                let parts = fitting_parts(text, edit);
                assert!(parts.len() > 1);
                for (i, p) in parts.iter().enumerate() {
                    let c = message(p);
                    let n = match (i, edit) {
                        (0, Some(id)) => {
                            size(&c.make_replacement(ReplacementMetadata::new(id.to_owned(), None)))
                        }
                        _ => size(&c),
                    };
                    assert!(n <= MAX_CONTENT_BYTES, "part {i} is {n} bytes");
                }
                let joined: String = parts.concat();
                assert_eq!(
                    joined.split_whitespace().count(),
                    text.split_whitespace().count()
                );
            }
        }
    }

    #[test]
    fn a_short_answer_is_one_part() {
        assert_eq!(fitting_parts("hello", None), vec!["hello".to_string()]);
        assert_eq!(streaming_view("hello", None), "hello");
    }
}
