//! Why a request from a room failed, and what the room is told.
//!
//! A [`Failure`] is either the person's (a refusal such as "no job matches …": the room sees
//! the text, marked ❌) or gorp's (a database or homeserver error: the room sees only
//! [`strings::internal_error`] with a short error id, and the details go to the log under that
//! id). Errors converted with `?` are sorted by [`Failure::from`]: the store's and the
//! scheduler's refusals are the person's, everything else is internal.

use crate::service::schedules::ScheduleError;
use crate::store::StoreError;

use super::strings;

/// A failed request from a room.
#[derive(Debug)]
pub enum Failure {
    /// The person's mistake or a refusal; the text (without the ❌ mark) is shown.
    User(String),
    /// gorp's fault; logged, never shown.
    Internal(anyhow::Error),
}

/// A command's Markdown answer, or why there is none.
pub type Answer = Result<String, Failure>;

/// A refusal with `text` shown to the room.
pub fn refuse(text: impl Into<String>) -> Failure {
    Failure::User(text.into())
}

impl<E: Into<anyhow::Error>> From<E> for Failure {
    fn from(e: E) -> Failure {
        classify(e.into())
    }
}

/// The person's refusals among the store's and the scheduler's errors; the rest is internal.
fn classify(e: anyhow::Error) -> Failure {
    let store = e.downcast_ref::<StoreError>().or_else(|| {
        e.downcast_ref::<ScheduleError>().and_then(|s| match s {
            ScheduleError::Store(s) => Some(s),
            ScheduleError::Invalid(_) => None,
        })
    });
    if let Some(s) = store {
        let text = match s {
            StoreError::UnknownChannel(name) => Some(strings::no_channel(name)),
            StoreError::ChannelExists(name) => Some(strings::channel_exists(name)),
            StoreError::ChannelBusy(name) => Some(strings::channel_busy(name)),
            StoreError::JobNotFound(id) => Some(strings::no_job(id)),
            StoreError::Invalid(why) => Some(why.clone()),
            _ => None,
        };
        if let Some(text) = text {
            return Failure::User(text);
        }
    }
    if let Some(ScheduleError::Invalid(why)) = e.downcast_ref::<ScheduleError>() {
        return Failure::User(why.clone());
    }
    Failure::Internal(e)
}

impl Failure {
    /// What the room is told. An internal error is logged first (`error!` with the error and
    /// its id, inside the caller's span: room, event, job).
    pub fn answer(self) -> String {
        match self {
            Failure::User(text) => strings::error(&text),
            Failure::Internal(e) => {
                let id = error_id();
                tracing::error!(error_id = %id, error = format!("{e:#}"), "internal error answering Matrix");
                strings::internal_error(&id)
            }
        }
    }
}

/// A short random id (8 hex digits) tying an answer to its log line.
pub fn error_id() -> String {
    let mut id = uuid::Uuid::new_v4().simple().to_string();
    id.truncate(8);
    id
}

/// The answer to a result: the text, or the failure's answer.
pub fn answer(result: Answer) -> String {
    result.unwrap_or_else(Failure::answer)
}

#[cfg(test)]
pub(super) mod tests {
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    use super::*;

    /// A writer the test reads back.
    #[derive(Clone, Default)]
    pub(in crate::matrix) struct Captured(pub(in crate::matrix) Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn logged(f: impl FnOnce() -> String) -> (String, String) {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        let answer = tracing::subscriber::with_default(subscriber, f);
        let log = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        (answer, log)
    }

    #[test]
    fn an_internal_error_is_logged_with_an_id_and_the_room_sees_only_the_id() {
        let e = StoreError::Db(sqlx::Error::Protocol(
            "disk on fire at /var/lib/gorp".into(),
        ));
        let (answer, log) = logged(|| Failure::from(e).answer());
        assert!(answer.starts_with("❌ "), "{answer}");
        assert!(!answer.contains("disk on fire"), "{answer}");
        assert!(!answer.contains("/var/lib"), "{answer}");
        let id = answer
            .split("error id ")
            .nth(1)
            .and_then(|rest| rest.get(..8))
            .expect("an error id in the answer");
        assert!(id.bytes().all(|b| b.is_ascii_hexdigit()), "{id}");
        let line = log
            .lines()
            .find(|l| l.contains(id))
            .unwrap_or_else(|| panic!("no log line with {id}: {log}"));
        assert!(line.contains("ERROR"), "{line}");
        assert!(line.contains("disk on fire at /var/lib/gorp"), "{line}");
    }

    #[test]
    fn error_ids_differ() {
        let ids: std::collections::HashSet<String> = (0..100).map(|_| error_id()).collect();
        assert_eq!(ids.len(), 100);
        assert!(ids.iter().all(|i| i.len() == 8));
    }

    #[test]
    fn refusals_are_shown_and_other_errors_are_internal() {
        let cases: Vec<(anyhow::Error, Option<&str>)> = vec![
            (
                StoreError::JobNotFound("abc".into()).into(),
                Some("no job matches `abc`"),
            ),
            (
                StoreError::ChannelExists("ops".into()).into(),
                Some("channel **ops** exists"),
            ),
            (
                StoreError::Invalid("prompt too long".into()).into(),
                Some("prompt too long"),
            ),
            (
                ScheduleError::Invalid("delay \"in 0m\" must be positive".into()).into(),
                Some("must be positive"),
            ),
            (
                ScheduleError::Store(StoreError::UnknownChannel("x".into())).into(),
                Some("no channel **x**"),
            ),
            (
                anyhow::Error::from(StoreError::UnknownChannel("y".into())).context("while x"),
                Some("no channel **y**"),
            ),
            (StoreError::WriterGone.into(), None),
            (ScheduleError::Store(StoreError::WriterGone).into(), None),
            (anyhow::anyhow!("homeserver said 500"), None),
        ];
        for (e, want) in cases {
            let shown = format!("{e:#}");
            match (Failure::from(e), want) {
                (Failure::User(text), Some(want)) => {
                    assert!(text.contains(want), "{text} lacks {want}");
                    assert!(strings::error(&text).starts_with("❌ "));
                }
                (Failure::Internal(_), None) => {}
                (f, want) => panic!("{shown}: {f:?}, wanted {want:?}"),
            }
        }
    }
}
