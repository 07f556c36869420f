//! The store's error, the same for every database backend.

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("unknown channel {0:?}")]
    UnknownChannel(String),
    #[error("channel {0:?} already exists")]
    ChannelExists(String),
    #[error("channel {0:?} has a running job; cancel it first")]
    ChannelBusy(String),
    #[error("no job with id {0:?}")]
    JobNotFound(String),
    #[error("{0}")]
    Invalid(String),
    #[error("the database writer has stopped")]
    WriterGone,
    /// The database's directory or file cannot be created or opened (permissions, a missing
    /// mount): a problem of the machine, not of the input.
    #[error("cannot open the database: {0}")]
    Open(String),
}

impl StoreError {
    /// True when the error is a unique-constraint violation.
    pub fn is_unique_violation(&self) -> bool {
        matches!(self, StoreError::Db(sqlx::Error::Database(e)) if e.is_unique_violation())
    }

    /// Why the database cannot take this request now, when the cause is the database's
    /// condition rather than the request, so the same request may succeed later: the disk is
    /// full (`SQLITE_FULL`), the disk failed (`SQLITE_IOERR`), another process holds the lock
    /// past `busy_timeout` (`SQLITE_BUSY`/`SQLITE_LOCKED`), the file cannot be opened or
    /// written (`SQLITE_CANTOPEN`/`SQLITE_READONLY`), no connection is free, or the writer
    /// stopped; on PostgreSQL a lost connection, a full disk, a server out of connections or
    /// shutting down, a read-only standby. `None` for every other error.
    pub fn unavailable(&self) -> Option<&'static str> {
        match self {
            StoreError::WriterGone => Some("the database writer has stopped"),
            StoreError::Db(sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed) => {
                Some("no database connection is available")
            }
            StoreError::Db(sqlx::Error::Io(_)) => Some("database I/O error"),
            StoreError::Db(sqlx::Error::Database(e))
                if e.try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
                    .is_some() =>
            {
                // PostgreSQL's SQLSTATE classes: 08 connection exception, 53 insufficient
                // resources (53100 disk full, 53300 too many connections), 57P0x the server
                // shutting down or starting, 25006 a read-only transaction (a standby).
                let code = e.code()?;
                match code.as_ref() {
                    "53100" => Some("the database's disk is full"),
                    "25006" => Some("the database is read-only"),
                    c if c.starts_with("08") => Some("the connection to the database failed"),
                    c if c.starts_with("53") => Some("the database server is out of resources"),
                    c if c.starts_with("57P") => Some("the database server is not available"),
                    _ => None,
                }
            }
            StoreError::Db(sqlx::Error::Database(e)) => {
                // SQLite reports extended result codes; the primary code is the low byte.
                let code = e.code()?.parse::<i32>().ok()? & 0xff;
                match code {
                    5 | 6 => Some("the database is locked by another process"),
                    8 => Some("the database is read-only"),
                    10 => Some("disk I/O error"),
                    13 => Some("the database or disk is full"),
                    14 => Some("the database file cannot be opened"),
                    _ => None,
                }
            }
            _ => None,
        }
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// What `gorp doctor` reads of a database, changing nothing.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DatabaseReport {
    pub backend: &'static str,
    /// The file, or the URL with its password masked.
    pub location: String,
    pub exists: bool,
    /// Migrations the database has applied.
    pub applied: usize,
    /// Migrations this gorp has.
    pub known: usize,
    /// Applied versions this gorp does not know (a newer gorp migrated it).
    pub unknown: Vec<i64>,
    /// Why gorp could not write it, if it could not (the file or its directory).
    pub not_writable: Option<String>,
    /// Channels' agent settings: (name, agent binary, agent args JSON).
    pub channel_agents: Vec<(String, Option<String>, Option<String>)>,
}
