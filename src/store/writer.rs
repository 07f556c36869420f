//! The writer task: the only code that writes to the database, and the group-commit loop.
//!
//! It takes every operation waiting in its queue (up to [`MAX_GROUP`]), applies them in one
//! `BEGIN IMMEDIATE` transaction and answers each caller after the commit. Enqueues of the group
//! become one multi-row insert, and so do events; every other write is a [`Write`] of its
//! table's module, applied in arrival order. `BEGIN IMMEDIATE` takes the write lock up front, so
//! a transaction never fails on lock upgrade when another process (the CLI, `sqlite3`) writes
//! too.
//!
//! Each [`Write`] names its own output type, and its caller receives exactly that type: there
//! is no shared reply enum to match at run time.
//!
//! Failure handling: an operation that is refused for a reason of its own (unknown channel,
//! channel busy) answers with that error and writes nothing. A database error aborts the group:
//! it is rolled back and each operation is retried in a transaction of its own, so one bad
//! operation never fails its neighbours.

use std::future::Future;
use std::sync::Arc;

use futures::future::BoxFuture;
use sqlx::{Connection, SqliteConnection};
use tokio::sync::{mpsc, oneshot, Notify};

use super::{events, jobs, Enqueued, Millis, NewEvent, NewJob, Result, StoreError};

/// Most operations applied in one transaction.
const MAX_GROUP: usize = 1024;
/// Most rows in one multi-row insert statement.
pub(super) const MAX_ROWS_PER_INSERT: usize = 2048;

/// The connection a write runs on, inside the writer's transaction.
pub(super) type Conn = SqliteConnection;

/// What applying a write gives: a database error (which aborts the group) around the write's
/// own result (a refusal such as "channel busy" writes nothing and fails only this write).
pub(super) type Applied<T> = std::result::Result<Result<T>, sqlx::Error>;

/// One write of one table, applied inside the writer's transaction and answered after commit.
pub(super) trait Write: Send + Sync + 'static {
    type Output: Send + 'static;

    /// True when committing this write can make a job claimable (wakes idle workers).
    const WAKES_WORKERS: bool = false;

    fn apply(&self, conn: &mut Conn) -> impl Future<Output = Applied<Self::Output>> + Send;
}

pub(super) enum Op {
    Flush(oneshot::Sender<Result<()>>),
    /// Jobs to insert; every enqueue of a group becomes one multi-row insert.
    Enqueue {
        jobs: Vec<NewJob>,
        now: Millis,
        reply: oneshot::Sender<Result<Vec<Enqueued>>>,
    },
    /// Events to append, unanswered; every event of a group becomes one multi-row insert.
    Events(Vec<NewEvent>),
    Write(Box<dyn Pending>),
}

impl Op {
    pub(super) fn write<W: Write>(write: W) -> (Op, oneshot::Receiver<Result<W::Output>>) {
        let (reply, rx) = oneshot::channel();
        let slot = Slot {
            write,
            out: None,
            reply,
        };
        (Op::Write(Box::new(slot)), rx)
    }

    fn wakes_workers(&self) -> bool {
        match self {
            Op::Enqueue { .. } => true,
            Op::Write(w) => w.wakes_workers(),
            Op::Flush(_) | Op::Events(_) => false,
        }
    }
}

/// A [`Write`] waiting in the queue with its caller's reply channel, its output type erased.
pub(super) trait Pending: Send {
    fn wakes_workers(&self) -> bool;
    /// Applies the write and keeps its result until [`Pending::finish`].
    fn apply<'a>(
        &'a mut self,
        conn: &'a mut Conn,
    ) -> BoxFuture<'a, std::result::Result<(), sqlx::Error>>;
    /// Answers the caller: `failed` when the transaction did not commit, else the kept result.
    fn finish(self: Box<Self>, failed: Option<StoreError>);
}

struct Slot<W: Write> {
    write: W,
    out: Option<Result<W::Output>>,
    reply: oneshot::Sender<Result<W::Output>>,
}

impl<W: Write> Pending for Slot<W> {
    fn wakes_workers(&self) -> bool {
        W::WAKES_WORKERS
    }

    fn apply<'a>(
        &'a mut self,
        conn: &'a mut Conn,
    ) -> BoxFuture<'a, std::result::Result<(), sqlx::Error>> {
        Box::pin(async move {
            self.out = Some(self.write.apply(conn).await?);
            Ok(())
        })
    }

    fn finish(self: Box<Self>, failed: Option<StoreError>) {
        let res = match (failed, self.out) {
            (Some(e), _) => Err(e),
            (None, Some(out)) => out,
            // Not reached: a committed group applied every write in it.
            (None, None) => Err(StoreError::WriterGone),
        };
        let _ = self.reply.send(res);
    }
}

/// Results of the batched operations of one group, kept until the commit.
enum Kept {
    Nothing,
    Enqueued(Vec<Enqueued>),
}

fn finish(op: Op, kept: Kept, failed: Option<StoreError>) {
    match op {
        Op::Flush(reply) => {
            let _ = reply.send(failed.map_or(Ok(()), Err));
        }
        Op::Enqueue { reply, .. } => {
            let res = match (failed, kept) {
                (Some(e), _) => Err(e),
                (None, Kept::Enqueued(v)) => Ok(v),
                (None, Kept::Nothing) => Err(StoreError::WriterGone),
            };
            let _ = reply.send(res);
        }
        Op::Events(_) => {
            if let Some(e) = failed {
                tracing::error!(error = %e, "job events could not be written");
            }
        }
        Op::Write(w) => w.finish(failed),
    }
}

pub(super) async fn run(
    mut conn: SqliteConnection,
    mut rx: mpsc::Receiver<Op>,
    wake: Arc<Notify>,
    commits: tokio::sync::watch::Sender<u64>,
) {
    let mut group: Vec<Op> = Vec::with_capacity(MAX_GROUP);
    while rx.recv_many(&mut group, MAX_GROUP).await > 0 {
        let wakes = group.iter().any(Op::wakes_workers);
        let mut ops = std::mem::take(&mut group);
        match apply_in_tx(&mut conn, &mut ops).await {
            Ok(kept) => {
                for (op, kept) in ops.into_iter().zip(kept) {
                    finish(op, kept, None);
                }
            }
            Err(e) => {
                if ops.len() > 1 {
                    tracing::warn!(error = %e, ops = ops.len(), "write group failed; retrying its operations one by one");
                }
                for op in ops {
                    let mut one = vec![op];
                    let res = apply_in_tx(&mut conn, &mut one).await;
                    let op = one.pop().expect("one operation");
                    match res {
                        Ok(mut kept) => finish(op, kept.pop().unwrap_or(Kept::Nothing), None),
                        Err(e) => finish(op, Kept::Nothing, Some(StoreError::Db(e))),
                    }
                }
            }
        }
        commits.send_modify(|n| *n = n.wrapping_add(1));
        if wakes {
            wake.notify_one();
        }
    }
    let _ = conn.close().await;
}

/// Applies `ops` in one transaction and commits; returns what the batched operations gave.
///
/// Plain statements, not sqlx's `Transaction`: when COMMIT fails (`SQLITE_FULL`,
/// `SQLITE_IOERR`) SQLite may already have rolled the transaction back; sqlx 0.9 then fails its
/// own ROLLBACK, keeps counting the transaction as open and refuses every later `begin_with`
/// on the connection, so the writer would never write again.
async fn apply_in_tx(
    conn: &mut SqliteConnection,
    ops: &mut [Op],
) -> std::result::Result<Vec<Kept>, sqlx::Error> {
    sqlx::raw_sql("BEGIN IMMEDIATE").execute(&mut *conn).await?;
    let res = match apply_group(conn, ops).await {
        Ok(kept) => sqlx::raw_sql("COMMIT")
            .execute(&mut *conn)
            .await
            .map(|_| kept),
        Err(e) => Err(e),
    };
    if res.is_err() {
        // What is left of the transaction; this fails when SQLite rolled it back already.
        let _ = sqlx::raw_sql("ROLLBACK").execute(&mut *conn).await;
    }
    res
}

async fn apply_group(
    conn: &mut SqliteConnection,
    ops: &mut [Op],
) -> std::result::Result<Vec<Kept>, sqlx::Error> {
    let mut kept: Vec<Kept> = ops.iter().map(|_| Kept::Nothing).collect();

    // 1. Every enqueue of the group as one multi-row insert.
    let mut rows = Vec::new();
    let mut spans = Vec::new(); // (op index, first row, row count)
    for (i, op) in ops.iter().enumerate() {
        if let Op::Enqueue { jobs, now, .. } = op {
            spans.push((i, rows.len(), jobs.len()));
            rows.extend(jobs.iter().map(|j| jobs::JobRow::new(j, *now)));
        }
    }
    if !spans.is_empty() {
        let results = if rows.is_empty() {
            Vec::new()
        } else {
            jobs::insert_jobs(conn, &rows).await?
        };
        for (i, first, n) in spans {
            kept[i] = Kept::Enqueued(results[first..first + n].to_vec());
        }
    }

    // 2. Every event of the group, in order, as multi-row inserts.
    let events: Vec<&NewEvent> = ops
        .iter()
        .filter_map(|op| match op {
            Op::Events(events) => Some(events.iter()),
            _ => None,
        })
        .flatten()
        .collect();
    if !events.is_empty() {
        events::insert_events(conn, &events).await?;
    }

    // 3. The rest, in arrival order.
    for op in ops.iter_mut() {
        if let Op::Write(w) = op {
            w.apply(conn).await?;
        }
    }
    Ok(kept)
}
