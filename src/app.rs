//! `gorp start`: opens the store and runs the worker pool, the rescuer and the retention
//! cleaner until shutdown (SIGINT or SIGTERM, or the caller's token).

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::agent::pool::WarmSessionManager;
use crate::agent::AcpExecutor;
use crate::background;
use crate::cleaner::Cleaner;
use crate::config::Config;
use crate::http::HttpState;
use crate::instance::InstanceId;
use crate::rescuer::Rescuer;
use crate::store::Store;
use crate::worker::{PoolConfig, WorkerPool};

/// How long a busy port is tried again before gorp gives up.
const BIND_RETRY_FOR: std::time::Duration = std::time::Duration::from_secs(5);

/// Listens on `addr`. A port still held for a moment after the previous gorp died is tried
/// again for up to [`BIND_RETRY_FOR`]: an agent that gorp was starting when it was killed holds
/// a copy of the listening socket between `fork` and `exec` (only `exec` closes it), so right
/// after a `kill -9` the port can be busy for a few milliseconds.
async fn bind(addr: &str) -> anyhow::Result<tokio::net::TcpListener> {
    let until = tokio::time::Instant::now() + BIND_RETRY_FOR;
    let mut warned = false;
    loop {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => return Ok(l),
            Err(e)
                if e.kind() == std::io::ErrorKind::AddrInUse
                    && tokio::time::Instant::now() < until =>
            {
                if !warned {
                    tracing::warn!(%addr, "the port is in use; trying again for up to {BIND_RETRY_FOR:?}");
                    warned = true;
                }
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            Err(e) => return Err(anyhow::anyhow!("cannot listen on {addr}: {e}")),
        }
    }
}

/// Runs gorp (ACP executor on warm sessions) until `shutdown` fires; returns after the pool
/// has drained and the agents are stopped.
pub async fn run(
    config: Config,
    store: Store,
    instance: InstanceId,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let instance_id = instance.to_string();
    let config = Arc::new(config);
    let addr = format!("{}:{}", config.webhook.bind, config.webhook.port);
    let listener = bind(&addr).await?;
    let lease = Duration::from_secs(config.worker.lease_secs);
    let node =
        crate::node::NodeKeeper::start(store.clone(), &instance, lease, config.worker.concurrency)
            .await?;
    let warm = WarmSessionManager::new(store.clone(), config.clone(), instance_id.clone());
    let executor = Arc::new(AcpExecutor::new(warm.clone()));
    let pool = WorkerPool::new(
        store.clone(),
        executor,
        PoolConfig::from(&*config),
        instance_id.clone(),
    );
    let http_state = HttpState::new(
        store.clone(),
        config.clone(),
        Some(pool.handle()),
        Some(warm.clone()),
    );
    let http_stop = CancellationToken::new();
    let http = tokio::spawn(crate::http::serve_with(
        listener,
        http_state,
        crate::dashboard::routes(),
        http_stop.clone(),
    ));
    let keeper_stop = CancellationToken::new();
    let node = tokio::spawn(background::run(node, keeper_stop.clone()));
    let keeper = tokio::spawn(background::run(warm.clone(), keeper_stop.clone()));
    let scheduler = crate::scheduler::Scheduler::new(store.clone(), config.clone());
    let scheduler = tokio::spawn(background::run(scheduler, keeper_stop.clone()));
    // Matrix is optional: gorp without it (or with the homeserver down) keeps working. The bot
    // (one device, one crypto store) runs on the node holding the `matrix` leader lease.
    let matrix = config.matrix.is_some().then(|| {
        let services = crate::matrix::Services {
            store: store.clone(),
            config: config.clone(),
            warm: Some(warm.clone()),
            pool: Some(pool.handle()),
        };
        tokio::spawn(crate::node::lead(
            store.clone(),
            crate::node::MATRIX,
            instance_id.clone(),
            lease,
            keeper_stop.clone(),
            move |stop| {
                let services = services.clone();
                async move {
                    if let Err(e) = crate::matrix::run(services, stop).await {
                        tracing::error!(error = format!("{e:#}"), "the Matrix bot stopped");
                    }
                }
            },
        ))
    });

    run_pool(&config, store.clone(), pool, shutdown).await;

    // In-flight requests get the grace period too; open event streams end with it.
    http_stop.cancel();
    let grace = Duration::from_secs(config.worker.shutdown_grace_secs.max(1));
    match tokio::time::timeout(grace, http).await {
        Ok(Ok(Err(e))) => tracing::warn!(error = %e, "HTTP server error"),
        Err(_) => tracing::warn!("HTTP requests still open after the grace period; closing them"),
        _ => {}
    }
    keeper_stop.cancel();
    let _ = tokio::join!(keeper, scheduler, node);
    if let Some(m) = matrix {
        let _ = m.await;
    }
    warm.shutdown().await;
    if let Err(e) = store.node_stop(&instance_id, crate::store::now_ms()).await {
        tracing::warn!(error = %e, "cannot record this node's stop");
    }
    tracing::info!("gorp stopped");
    Ok(())
}

/// Runs `pool` and the background services (rescuer, cleaner) until `shutdown`.
pub async fn run_pool(
    config: &Config,
    store: Store,
    pool: WorkerPool,
    shutdown: CancellationToken,
) {
    let w = &config.worker;
    let services = CancellationToken::new();
    let rescuer = Rescuer::new(
        store.clone(),
        Duration::from_secs(w.rescue_interval_secs),
        w.max_rescues,
    );
    let cleaner = Cleaner::new(
        store.clone(),
        Duration::from_secs(u64::from(config.database.retention_days) * 86_400),
        Duration::from_secs(w.clean_interval_secs),
    );
    let r = tokio::spawn(background::run(rescuer, services.clone()));
    let c = tokio::spawn(background::run(cleaner, services.clone()));
    tracing::info!(instance = %pool.handle().owner(), db = %config.database.path.display(), "gorp started");
    pool.run(shutdown).await;
    services.cancel();
    let _ = tokio::join!(r, c);
    let _ = store.flush().await;
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
