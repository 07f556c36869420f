//! `gorp start`: opens the store and runs the worker pool, the rescuer and the retention
//! cleaner until shutdown (SIGINT or SIGTERM, or the caller's token).

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::cleaner::Cleaner;
use crate::config::Config;
use crate::executor::Executor;
use crate::rescuer::Rescuer;
use crate::store::Store;
use crate::worker::{PoolConfig, PoolHandle, WorkerPool};

/// A unique id for this process start, used as the lease owner of its jobs:
/// `host:pid:random`.
pub fn instance_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into());
    let rand = uuid::Uuid::new_v4().simple().to_string();
    format!("{host}:{}:{}", std::process::id(), &rand[..8])
}

/// A running gorp: what the HTTP and Matrix front ends need to reach.
#[derive(Clone)]
pub struct App {
    pub config: Arc<Config>,
    pub store: Store,
    pub pool: PoolHandle,
    pub instance_id: String,
}

/// Runs gorp with `executor` until `shutdown` fires; returns after the pool has drained.
pub async fn run(
    config: Config,
    store: Store,
    executor: Arc<dyn Executor>,
    instance_id: String,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let w = &config.worker;
    let pool = WorkerPool::new(
        store.clone(),
        executor,
        PoolConfig::from(w),
        instance_id.clone(),
    );
    let services = CancellationToken::new();
    let rescuer = Rescuer::new(store.clone(), Duration::from_secs(w.rescue_interval_secs));
    let cleaner = Cleaner::new(
        store.clone(),
        Duration::from_secs(u64::from(config.database.retention_days) * 86_400),
        Duration::from_secs(w.clean_interval_secs),
    );
    let r = tokio::spawn(rescuer.run(services.clone()));
    let c = tokio::spawn(cleaner.run(services.clone()));
    tracing::info!(instance = %instance_id, db = %config.database.path.display(), "gorp started");
    pool.run(shutdown).await;
    services.cancel();
    let _ = tokio::join!(r, c);
    store.close().await;
    tracing::info!("gorp stopped");
    Ok(())
}

/// A token that fires on SIGINT or SIGTERM.
pub fn shutdown_on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = match signal(SignalKind::terminate()) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                return;
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        }
        t.cancel();
    });
    token
}
