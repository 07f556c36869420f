//! gorp's store on PostgreSQL: the same operations as the SQLite store, with the same names,
//! arguments and results, written for PostgreSQL and checked at compile time against it (this
//! crate's `sqlx.toml` points the query macros at `PG_DATABASE_URL`).
//!
//! Differences from the SQLite store, and why:
//! - No writer task: PostgreSQL takes concurrent writers, so each operation is its own
//!   transaction on the pool, and one operation's error never touches another's.
//! - Deadlocks (`40P01`) and serialization failures (`40001`) are retried ([`retry!`]).
//! - Bulk inserts bind arrays (`unnest`) where SQLite reads a JSON array (`json_each`).
//! - Flags are `BOOLEAN`, ids of jobs and approvals `TEXT COLLATE "C"`; `docs/postgres.md` has
//!   the schema's choices.
//!
//! Every write that commits bumps the commit counter the store's readers wait on, and a write
//! that can make a job claimable wakes this process's workers ([`PgStore::committed`]).

mod approvals;
mod budgets;
mod channels;
mod dashboard;
mod events;
mod jobs;
mod listen;
mod matrix;
mod nodes;
mod schedules;
mod warm;

use std::sync::Arc;

use sqlx::postgres::PgPool;
use tokio::sync::{watch, Notify};

pub use gorp_types::{kinds, types, DatabaseReport, Result, StoreError};

/// Embedded migrations from `migrations-postgres/` (numbered as the SQLite ones: a schema
/// version means the same on both backends).
pub static PG_MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations-postgres");

/// Runs an `async` block again, up to 5 times in all, while it fails with a deadlock or a
/// serialization failure (PostgreSQL rolled the transaction back; running it again is safe).
#[macro_export]
macro_rules! retry {
    ($body:expr) => {{
        let mut tries = 0u32;
        loop {
            match $body.await {
                Err(e) if tries < 4 && $crate::retryable(&e) => {
                    tries += 1;
                    ::tracing::debug!(error = %e, tries, "retrying a transaction");
                    continue;
                }
                other => break other,
            }
        }
    }};
}

/// One write in a transaction of its own: `transaction!(store, wakes, |tx| { …; Ok(out) })`.
/// The body runs with `tx`, the open transaction's connection; `Ok` commits it (also from an
/// early `return Ok(…)`), an error rolls it back, so a refused write writes nothing. A deadlock
/// or serialization failure runs it all again ([`retry!`]). After the commit the store tells
/// this process's readers, and its workers when `wakes` ([`PgStore::committed`]).
#[macro_export]
macro_rules! transaction {
    ($store:expr, $wakes:expr, |$tx:ident| $body:block) => {{
        let out = $crate::retry!(async {
            let mut open = $store.pool.begin().await?;
            let out: $crate::Result<_> = {
                let $tx: &mut ::sqlx::PgConnection = &mut open;
                async { $body }.await
            };
            let out = out?;
            open.commit().await?;
            Ok::<_, $crate::StoreError>(out)
        })?;
        $store.committed($wakes);
        out
    }};
}

/// One statement on the pool (PostgreSQL commits it by itself), written with its `.await?`:
/// `statement!(store, wakes, sqlx::query!(…).execute(&store.pool).await?)`. It runs again on a
/// deadlock or serialization failure; then readers and workers are told as by [`transaction!`].
#[macro_export]
macro_rules! statement {
    ($store:expr, $wakes:expr, $query:expr) => {{
        let out = $crate::retry!(async { Ok::<_, $crate::StoreError>($query) })?;
        $store.committed($wakes);
        out
    }};
}

/// True for errors after which the same transaction may simply run again.
pub fn retryable(e: &StoreError) -> bool {
    match e {
        StoreError::Db(sqlx::Error::Database(d)) => {
            matches!(d.code().as_deref(), Some("40001") | Some("40P01"))
        }
        _ => false,
    }
}

/// A handle on a PostgreSQL database holding gorp's schema. Cheap to clone.
#[derive(Clone)]
pub struct PgStore {
    pub(crate) pool: PgPool,
    jobs_changed: Arc<Notify>,
    /// Notified when another node asked to cancel a job this node runs.
    cancels: Arc<Notify>,
    commits: watch::Sender<u64>,
}

/// What a [`PgStore`] tells the rest of its process.
pub struct Wakes {
    /// Notified when a write (here or on another node) may have made a job claimable.
    pub jobs_changed: Arc<Notify>,
    /// Notified when a cancel was asked for a running job (the payload names the node running
    /// it; each node reads its own requests, which is one cheap query).
    pub cancels: Arc<Notify>,
    /// Bumped after every commit here and every change notified by another node.
    pub commits: watch::Sender<u64>,
}

impl PgStore {
    /// A store on `pool` (migrated already).
    pub fn new(pool: PgPool, wakes: Wakes) -> PgStore {
        PgStore {
            pool,
            jobs_changed: wakes.jobs_changed,
            cancels: wakes.cancels,
            commits: wakes.commits,
        }
    }

    /// The pool (for migrations and reports).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Tells this process's readers that a write committed, and its workers when `wakes`.
    pub(crate) fn committed(&self, wakes: bool) {
        self.commits.send_modify(|n| *n = n.wrapping_add(1));
        if wakes {
            self.jobs_changed.notify_one();
        }
    }

    /// Closes the pool.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}
