//! PostgreSQL: connecting, its migrations (`migrations-postgres/`) and what `gorp doctor` reads.
//! The queries themselves are in the `gorp-pg` crate.

use std::time::Duration;

use sqlx::migrate::MigrateError;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};

use super::{DatabaseReport, Result, StoreError, PG_MIGRATOR};
use crate::config::DatabaseConfig;

/// How long connecting may take before gorp says the server does not answer.
const CONNECT_WAIT: Duration = Duration::from_secs(10);

/// What went wrong reaching the database, in words.
fn open_error(cfg: &DatabaseConfig, e: sqlx::Error) -> StoreError {
    let at = cfg.location();
    StoreError::Open(match &e {
        sqlx::Error::Configuration(c) => format!("database.url {at} cannot be read: {c}"),
        sqlx::Error::Io(io) => format!("cannot reach PostgreSQL at {at}: {io}"),
        sqlx::Error::PoolTimedOut => {
            format!("no answer from PostgreSQL at {at} within {CONNECT_WAIT:?}")
        }
        sqlx::Error::Tls(t) => format!("TLS with PostgreSQL at {at} failed: {t}"),
        sqlx::Error::Database(d) => match d.code().as_deref() {
            Some("28P01") | Some("28000") => format!(
                "PostgreSQL at {at} refused the credentials of database.url: {}",
                d.message()
            ),
            Some("3D000") => format!("PostgreSQL at {at}: {}", d.message()),
            _ => format!("PostgreSQL at {at}: {}", d.message()),
        },
        other => format!("PostgreSQL at {at}: {other}"),
    })
}

/// A pool on `cfg.url`.
pub(super) async fn connect(cfg: &DatabaseConfig) -> Result<PgPool> {
    use sqlx::Connection;
    let url = cfg.url.as_deref().unwrap_or_default();
    let opts: PgConnectOptions = url.parse().map_err(|e| open_error(cfg, e))?;
    // One plain connection first: a refused connection or bad credentials are told at once,
    // not after the pool's retries.
    match tokio::time::timeout(CONNECT_WAIT, sqlx::PgConnection::connect_with(&opts)).await {
        Ok(Ok(c)) => {
            let _ = c.close().await;
        }
        Ok(Err(e)) => return Err(open_error(cfg, e)),
        Err(_) => return Err(open_error(cfg, sqlx::Error::PoolTimedOut)),
    }
    PgPoolOptions::new()
        .max_connections(cfg.max_connections)
        .acquire_timeout(CONNECT_WAIT)
        .connect_with(opts)
        .await
        .map_err(|e| open_error(cfg, e))
}

/// Runs the pending migrations; returns the schema version.
pub(super) async fn migrate(cfg: &DatabaseConfig) -> Result<i64> {
    let pool = connect(cfg).await?;
    let ran = run_migrations(cfg, &pool).await;
    pool.close().await;
    ran
}

/// Runs the pending migrations on `pool` (sqlx's migrator holds an advisory lock meanwhile, so
/// nodes starting together migrate one at a time); returns the schema version.
pub(super) async fn run_migrations(cfg: &DatabaseConfig, pool: &PgPool) -> Result<i64> {
    match PG_MIGRATOR.run(pool).await {
        Ok(()) => Ok(PG_MIGRATOR.iter().map(|m| m.version).max().unwrap_or(0)),
        Err(MigrateError::VersionMissing(v)) => Err(StoreError::Open(format!(
            "{} was migrated by a newer gorp (migration {v} is unknown to this one): run that \
             gorp, or restore the backup taken before the upgrade",
            cfg.location()
        ))),
        Err(e) => Err(e.into()),
    }
}

/// What `gorp doctor` reads of a PostgreSQL database, changing nothing.
pub(super) async fn inspect(cfg: &DatabaseConfig) -> Result<DatabaseReport> {
    let pool = connect(cfg).await?;
    let known = PG_MIGRATOR.migrations.len();
    let has_table: bool =
        sqlx::query_scalar("SELECT to_regclass('public._sqlx_migrations') IS NOT NULL")
            .fetch_one(&pool)
            .await?;
    let mut report = DatabaseReport {
        backend: "postgres",
        location: cfg.location(),
        exists: true,
        applied: 0,
        known,
        unknown: Vec::new(),
        not_writable: None,
        channel_agents: Vec::new(),
    };
    if has_table {
        let versions: Vec<i64> =
            sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success")
                .fetch_all(&pool)
                .await?;
        report.applied = versions.len();
        report.unknown = versions
            .into_iter()
            .filter(|v| !PG_MIGRATOR.migrations.iter().any(|m| m.version == *v))
            .collect();
        let has_channels: bool =
            sqlx::query_scalar("SELECT to_regclass('public.channels') IS NOT NULL")
                .fetch_one(&pool)
                .await?;
        if has_channels {
            let can_write: bool = sqlx::query_scalar(
                "SELECT has_table_privilege(current_user, 'public.jobs', 'INSERT')
                    AND has_table_privilege(current_user, 'public.jobs', 'UPDATE')",
            )
            .fetch_one(&pool)
            .await?;
            if !can_write {
                report.not_writable =
                    Some("the role of database.url may not insert into or update jobs".into());
            }
            report.channel_agents = sqlx::query_as(
                "SELECT name::text, agent_binary, agent_args FROM channels
                 WHERE agent_binary IS NOT NULL OR agent_args IS NOT NULL ORDER BY name",
            )
            .fetch_all(&pool)
            .await?;
        }
    } else {
        let can_create: bool =
            sqlx::query_scalar("SELECT has_schema_privilege(current_user, 'public', 'CREATE')")
                .fetch_one(&pool)
                .await?;
        if !can_create {
            report.not_writable =
                Some("the role of database.url may not create tables in schema public".into());
        }
    }
    pool.close().await;
    Ok(report)
}
