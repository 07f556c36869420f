//! Warm agent sessions: live agent processes per channel, driven by the `warm_sessions` table.
//!
//! [`WarmSessionManager`] owns this process's agent processes. A job takes its channel's
//! session with [`WarmSessionManager::acquire`]: the live process when there is one (warm),
//! else a new one (cold) that resumes the channel's stored ACP session with `session/load` when
//! the agent supports it. Every change is written to the channel's `warm_sessions` row, which is
//! a lease held by this instance and renewed by the keeper.
//!
//! The keeper ([`WarmSessionManager::run_once`]) works from the table, never from in-memory
//! timers alone:
//! - a session idle past `expires_at` is shut down;
//! - a row whose `warm_at` has come is warmed (pre-warm, `gorp warm <channel>`);
//! - a row that is warm and unexpired but whose holder is gone (lease expired, or the holder
//!   process died on this host) is taken over and warmed again — this is how warm sessions
//!   survive restarts;
//! - a session whose row another instance took over is shut down here;
//! - a session whose process died while idle is dropped and its row marked failed.
//!
//! At most `max_warm_sessions` processes live at once; a cold start evicts the least recently
//! used idle session first. At most `max_concurrent_starts` agents start at once (agents are
//! heavy to start: many at once on a small machine time out). After a restart the keeper warms
//! the orphaned rows a few at a time, channels with queued jobs first, then the most recently
//! used, and only as many as fit under `max_warm_sessions`: the rest are marked stopped.
//!
//! Why one file: acquire, release, the keeper pass and shutdown share the per-channel slots
//! and their locking; split, the locking rules would be spread over files.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::OwnedMutexGuard;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::acp::client::{
    AcpError, AgentProcess, AgentSpec, McpServerSpec, OpenedWith, SessionSetup, Timeouts,
};
use crate::config::Config;
use crate::store::{now_ms, Channel, Millis, Store, WarmSession, WarmState, WarmUpdate};

/// How often the keeper runs.
pub const KEEPER_INTERVAL: Duration = Duration::from_secs(1);

/// A live agent with its open ACP session.
pub struct Live {
    pub agent: AgentProcess,
    pub session_id: String,
    /// The method the session was opened with.
    pub opened_with: OpenedWith,
    /// Why the stored session was not continued, when it was not.
    pub fallback: Option<String>,
    /// The session's cumulative cost as the agent last reported it (ACP's `usage_update.cost`
    /// is the session's running total), so a turn's cost is its difference.
    pub reported_cost: std::sync::Mutex<Option<f64>>,
    /// The value each config option had when the session opened: an option a job set for its
    /// own turn goes back to it for the next job.
    pub option_defaults: std::collections::BTreeMap<String, String>,
    /// Options changed since the lease row last recorded them.
    pub options_changed: std::sync::atomic::AtomicBool,
}

impl Live {
    /// The session continued the channel's stored one (`session/resume` or `session/load`)
    /// rather than starting anew.
    pub fn resumed(&self) -> bool {
        self.opened_with.continued()
    }

    /// The value each of the session's config options has now.
    fn current_options(
        agent: &AgentProcess,
        session: &str,
    ) -> std::collections::BTreeMap<String, String> {
        agent
            .session_options(session)
            .into_iter()
            .map(|o| (o.id, o.current))
            .collect()
    }

    /// What the agent said of itself and the session's options, as the lease row keeps it.
    pub fn agent_info(&self) -> String {
        let init = self.agent.initialize_response();
        let caps = &init.agent_capabilities;
        let info = init.agent_info.as_ref();
        serde_json::json!({
            "agent": info.map(|i| serde_json::json!({"name": i.name, "version": i.version})),
            "protocol_version": serde_json::to_value(init.protocol_version).ok(),
            "capabilities": {
                "load_session": caps.load_session,
                "resume": caps.session_capabilities.resume.is_some(),
                "close": caps.session_capabilities.close.is_some(),
                "list": caps.session_capabilities.list.is_some(),
                "additional_directories": caps.session_capabilities.additional_directories.is_some(),
                "images": caps.prompt_capabilities.image,
                "audio": caps.prompt_capabilities.audio,
                "embedded_context": caps.prompt_capabilities.embedded_context,
                "mcp_http": caps.mcp_capabilities.http,
                "mcp_sse": caps.mcp_capabilities.sse,
            },
            "auth_methods": init.auth_methods.iter().map(|m| m.id().to_string()).collect::<Vec<_>>(),
            "opened_with": self.opened_with.method(),
            "options": self.agent.session_options(&self.session_id),
        })
        .to_string()
    }

    /// Closes the session (when the agent offers `session/close`) and stops the agent.
    pub async fn close_and_stop(self) {
        self.agent.close_session(&self.session_id).await;
        self.agent.shutdown().await;
    }
}

struct Slot {
    channel_id: i64,
    live: Arc<tokio::sync::Mutex<Option<Live>>>,
    /// Set by [`WarmSessionManager::reset`]: the next job opens a new ACP session.
    reset: std::sync::atomic::AtomicBool,
    last_used: AtomicI64,
    /// When a release last wrote the row (0: the next release must write).
    recorded: AtomicI64,
}

/// A release within this long of the previous recorded one skips its write: under a stream of
/// jobs the row's `last_used_at`/`expires_at` then lag by at most this much.
const RECORD_EVERY_MS: i64 = 1_000;

/// A channel's session, held by one job (or a pre-warm) at a time.
pub struct SessionGuard {
    guard: OwnedMutexGuard<Option<Live>>,
    /// The agent was already running when the guard was taken.
    pub warm: bool,
    /// How long the cold start took (zero when warm).
    pub start_time: Duration,
}

impl SessionGuard {
    pub fn live(&self) -> &Live {
        self.guard
            .as_ref()
            .expect("a guard always holds a live session")
    }
}

/// Why a session could not be had.
#[derive(Debug, thiserror::Error)]
pub enum WarmError {
    #[error(transparent)]
    Acp(#[from] AcpError),
    #[error("database: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error("cancelled while the agent was starting")]
    Cancelled,
    #[error(
        "the channel's agent is held by {holder} (another gorp on this database) until its \
         lease runs out"
    )]
    HeldElsewhere { holder: String },
    #[error("cannot prepare the workspace {path}: {error}")]
    Workspace {
        path: PathBuf,
        error: std::io::Error,
    },
}

/// See the module docs.
pub struct WarmSessionManager {
    store: Store,
    config: Arc<Config>,
    instance: String,
    slots: Mutex<HashMap<i64, Arc<Slot>>>,
    /// Channels being warmed in the background by the keeper.
    warming: Mutex<std::collections::HashSet<i64>>,
    /// Bounds the agents starting at once.
    starts: tokio::sync::Semaphore,
    tasks: TaskTracker,
    /// When the last lease renewal that succeeded was sent (self-fencing counts from it).
    renewed: Mutex<Instant>,
    /// True after this node stopped its agents because it could not renew their leases; the
    /// next renewal that succeeds first lets go of the rows it no longer runs.
    fenced: std::sync::atomic::AtomicBool,
    /// Idle channels of ours that had a due job at the previous keeper pass (see `hand_over`).
    waiting: Mutex<std::collections::HashSet<i64>>,
}

impl WarmSessionManager {
    pub fn new(store: Store, config: Arc<Config>, instance: String) -> Arc<Self> {
        let starts = tokio::sync::Semaphore::new(config.acp.max_concurrent_starts.max(1) as usize);
        Arc::new(WarmSessionManager {
            store,
            config,
            instance,
            slots: Mutex::new(HashMap::new()),
            warming: Mutex::new(Default::default()),
            starts,
            tasks: TaskTracker::new(),
            renewed: Mutex::new(Instant::now()),
            fenced: Default::default(),
            waiting: Default::default(),
        })
    }

    pub fn instance(&self) -> &str {
        &self.instance
    }

    fn max_starts(&self) -> usize {
        self.config.acp.max_concurrent_starts.max(1) as usize
    }

    fn keep_alive_ms(&self) -> i64 {
        (self.config.acp.keep_alive_secs * 1000) as i64
    }

    /// How long a warm-session lease lasts unless renewed: `[worker] lease_secs`, the job
    /// lease's length, so a node that loses the database stops its agents and its jobs on one
    /// deadline.
    fn lease_ms(&self) -> i64 {
        (self.config.worker.lease_secs * 1000) as i64
    }

    fn lease_until(&self, now: Millis) -> Millis {
        now + self.lease_ms()
    }

    fn slot(&self, channel_id: i64) -> Arc<Slot> {
        self.slots
            .lock()
            .expect("slots lock")
            .entry(channel_id)
            .or_insert_with(|| {
                Arc::new(Slot {
                    channel_id,
                    live: Arc::new(tokio::sync::Mutex::new(None)),
                    reset: Default::default(),
                    last_used: AtomicI64::new(0),
                    recorded: AtomicI64::new(0),
                })
            })
            .clone()
    }

    /// The channel's slot, if this process has one (without making it).
    fn existing_slot(&self, channel_id: i64) -> Option<Arc<Slot>> {
        self.slots
            .lock()
            .expect("slots lock")
            .get(&channel_id)
            .cloned()
    }

    /// The pid of the channel's live agent here, if any (for tests and `gorp warm`).
    pub fn live_pid(&self, channel_id: i64) -> Option<u32> {
        let slot = self.existing_slot(channel_id)?;
        let guard = slot.live.try_lock().ok()?;
        guard.as_ref().map(|l| l.agent.pid())
    }

    /// Live agents here; a slot busy with a job (or a start) counts as live.
    fn live_count(&self) -> usize {
        self.snapshot()
            .iter()
            .filter(|s| s.live.try_lock().map(|g| g.is_some()).unwrap_or(true))
            .count()
    }

    /// Every slot, taken out of the map so no lock is held across awaits.
    fn snapshot(&self) -> Vec<Arc<Slot>> {
        self.slots
            .lock()
            .expect("slots lock")
            .values()
            .cloned()
            .collect()
    }

    /// The channel's session if its agent is warm here, without reading the channel.
    pub async fn acquire_if_warm(
        &self,
        channel_id: i64,
        cancel: &CancellationToken,
    ) -> Option<SessionGuard> {
        let slot = self.existing_slot(channel_id)?;
        let mut guard = tokio::select! {
            g = slot.live.clone().lock_owned() => g,
            _ = cancel.cancelled() => return None,
        };
        let alive = guard.as_ref().is_some_and(|l| !l.agent.has_exited());
        if !alive {
            return None;
        }
        if slot.reset.swap(false, Ordering::SeqCst) && !self.new_session(&slot, &mut guard).await {
            return None;
        }
        slot.last_used.store(now_ms(), Ordering::Relaxed);
        Some(SessionGuard {
            guard,
            warm: true,
            start_time: Duration::ZERO,
        })
    }

    /// Takes the channel's session for one job, starting the agent if it is not warm.
    pub async fn acquire(
        &self,
        channel: &Channel,
        cancel: &CancellationToken,
    ) -> Result<SessionGuard, WarmError> {
        let slot = self.slot(channel.id);
        let mut guard = tokio::select! {
            g = slot.live.clone().lock_owned() => g,
            _ = cancel.cancelled() => return Err(WarmError::Cancelled),
        };
        let now = now_ms();
        slot.last_used.store(now, Ordering::Relaxed);
        if let Some(exited) = guard.as_ref().map(|l| l.agent.has_exited()) {
            // Warm: nothing to write. The row says `warm`; readers show it `busy` while the
            // channel has a running job, and `release` records the use.
            if !exited
                && (!slot.reset.swap(false, Ordering::SeqCst)
                    || self.new_session(&slot, &mut guard).await)
            {
                return Ok(SessionGuard {
                    guard,
                    warm: true,
                    start_time: Duration::ZERO,
                });
            }
            // The process died while idle: start over.
            if let Some(dead) = guard.take() {
                dead.agent.shutdown().await;
            }
        }
        self.evict_for_new(channel.id).await;
        let started = Instant::now();
        let live = tokio::select! {
            r = self.start(channel) => r?,
            _ = cancel.cancelled() => {
                let _ = self.store.warm_stop(channel.id, &self.instance, false, None, now_ms()).await;
                return Err(WarmError::Cancelled);
            }
        };
        *guard = Some(live);
        metrics::histogram!(crate::metrics::AGENT_COLD_START_SECONDS)
            .record(started.elapsed().as_secs_f64());
        Ok(SessionGuard {
            guard,
            warm: false,
            start_time: started.elapsed(),
        })
    }

    /// Gives the session back after a job. A dead agent is dropped so the next job starts a
    /// fresh one.
    pub async fn release(&self, channel_id: i64, mut guard: SessionGuard) {
        let now = now_ms();
        let slot = self.slot(channel_id);
        let alive = guard.guard.as_ref().is_some_and(|l| !l.agent.has_exited());
        let options_changed = guard
            .guard
            .as_ref()
            .is_some_and(|l| l.options_changed.swap(false, Ordering::Relaxed));
        if alive
            && guard.warm
            && !options_changed
            && now - slot.recorded.load(Ordering::Relaxed) < RECORD_EVERY_MS
        {
            slot.last_used.store(now, Ordering::Relaxed);
            return;
        }
        if alive {
            slot.recorded.store(now, Ordering::Relaxed);
            let live = guard.live();
            let update = WarmUpdate {
                state: WarmState::Warm,
                pid: Some(live.agent.pid() as i64),
                session: Some(live.session_id.clone()),
                lease_until: self.lease_until(now),
                expires_at: Some(now + self.keep_alive_ms()),
                used: true,
                sandbox: None,
                agent_info: options_changed.then(|| live.agent_info()),
            };
            if let Err(e) = self
                .store
                .warm_upsert(channel_id, &self.instance, update, now)
                .await
            {
                tracing::warn!(channel_id, error = %e, "cannot record warm session");
            }
        } else {
            let tail = guard
                .guard
                .as_ref()
                .map(|l| l.agent.stderr_tail())
                .unwrap_or_default();
            if let Some(dead) = guard.guard.take() {
                dead.agent.shutdown().await;
            }
            let msg = format!("agent exited; {}", last_lines(&tail, 5));
            let _ = self
                .store
                .warm_stop(channel_id, &self.instance, true, Some(msg), now)
                .await;
        }
        self.slot(channel_id)
            .last_used
            .store(now, Ordering::Relaxed);
    }

    /// Gives the session back after a cancelled prompt: the agent is restarted (the keeper
    /// warms it again within a second, resuming the session with `session/load`), because
    /// some agents answer the prompt after a cancel out of turn.
    pub async fn recycle(&self, channel_id: i64, mut guard: SessionGuard) {
        if let Some(l) = guard.guard.take() {
            l.agent.shutdown().await;
        }
        let now = now_ms();
        let note = Some("restarted after a cancelled prompt".to_string());
        let _ = self
            .store
            .warm_stop(channel_id, &self.instance, false, note, now)
            .await;
        let _ = self.store.warm_request(channel_id, Some(now), now).await;
    }

    /// Gives the session back after its job's lease was lost (taken over, or this node could
    /// not renew it): the agent is stopped and not warmed again here, since the channel may
    /// already run on another node.
    pub async fn discard(&self, channel_id: i64, mut guard: SessionGuard) {
        if let Some(l) = guard.guard.take() {
            l.agent.shutdown().await;
        }
        let note = Some("stopped: the job's lease was lost".to_string());
        let _ = self
            .store
            .warm_stop(channel_id, &self.instance, false, note, now_ms())
            .await;
    }

    /// Makes the channel's next job start a new conversation: the stored ACP session is
    /// forgotten, and a warm agent opens a new session before its next prompt.
    pub async fn reset(&self, channel_id: i64) -> Result<(), WarmError> {
        self.store.channel_set_acp_session(channel_id, None).await?;
        self.slot(channel_id).reset.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// Replaces a live agent's session with a new one. On failure the agent is stopped (the
    /// caller then starts a fresh one) and false is returned.
    async fn new_session(&self, slot: &Slot, guard: &mut OwnedMutexGuard<Option<Live>>) -> bool {
        let Some(live) = guard.as_mut() else {
            return false;
        };
        live.agent.close_session(&live.session_id).await;
        match live.agent.new_session().await {
            Ok(id) => {
                tracing::info!(channel_id = slot.channel_id, session = %id, "new ACP session after a reset");
                live.option_defaults = Live::current_options(&live.agent, &id);
                live.session_id = id.clone();
                live.opened_with = OpenedWith::New;
                live.fallback = None;
                live.options_changed.store(true, Ordering::Relaxed);
                // The next release records the new session in the lease row.
                slot.recorded.store(0, Ordering::Relaxed);
                if let Err(e) = self
                    .store
                    .channel_set_acp_session(slot.channel_id, Some(id))
                    .await
                {
                    tracing::warn!(error = %e, "cannot record the new ACP session");
                }
                true
            }
            Err(e) => {
                tracing::warn!(channel_id = slot.channel_id, error = %e, "cannot open a new session; restarting the agent");
                if let Some(dead) = guard.take() {
                    dead.agent.shutdown().await;
                }
                false
            }
        }
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Starts the channel's agent now (if it is not running) and leaves it warm.
    pub async fn pre_warm(&self, channel: &Channel) -> Result<bool, WarmError> {
        let never = CancellationToken::new();
        let g = self.acquire(channel, &never).await?;
        let was_warm = g.warm;
        self.release(channel.id, g).await;
        Ok(was_warm)
    }

    /// Spawns the agent, opens (or resumes) the ACP session and records the row.
    async fn start(&self, channel: &Channel) -> Result<Live, WarmError> {
        let now = now_ms();
        // The lease first: a channel's agent runs on one node at a time. On SQLite a holder
        // that died on this host is known to be gone; across machines only leases decide.
        let row = self.store.warm_get(channel.id).await?;
        let holder = row.as_ref().and_then(|r| r.holder.clone());
        let dead = holder
            .as_deref()
            .filter(|h| !self.store.is_shared() && crate::instance::holder_is_dead(h));
        if !self
            .store
            .warm_take(channel.id, &self.instance, dead, now, self.lease_until(now))
            .await?
        {
            return Err(WarmError::HeldElsewhere {
                holder: holder.unwrap_or_else(|| "another gorp".into()),
            });
        }
        self.store
            .warm_upsert(
                channel.id,
                &self.instance,
                WarmUpdate {
                    state: WarmState::Starting,
                    pid: None,
                    session: None,
                    lease_until: self.lease_until(now),
                    expires_at: None,
                    used: false,
                    sandbox: None,
                    agent_info: None,
                },
                now,
            )
            .await?;
        match self.spawn_session(channel).await {
            Ok(live) => {
                let now = now_ms();
                self.store
                    .warm_upsert(
                        channel.id,
                        &self.instance,
                        WarmUpdate {
                            state: WarmState::Warm,
                            pid: Some(live.agent.pid() as i64),
                            session: Some(live.session_id.clone()),
                            lease_until: self.lease_until(now),
                            expires_at: Some(now + self.keep_alive_ms()),
                            used: false,
                            sandbox: Some(live.agent.sandbox().summary()),
                            agent_info: Some(live.agent_info()),
                        },
                        now,
                    )
                    .await?;
                if channel.acp_session_id.as_deref() != Some(live.session_id.as_str()) {
                    self.store
                        .channel_set_acp_session(channel.id, Some(live.session_id.clone()))
                        .await?;
                }
                Ok(live)
            }
            Err(e) => {
                let _ = self
                    .store
                    .warm_stop(
                        channel.id,
                        &self.instance,
                        true,
                        Some(e.to_string()),
                        now_ms(),
                    )
                    .await;
                Err(e)
            }
        }
    }

    async fn spawn_session(&self, channel: &Channel) -> Result<Live, WarmError> {
        let _start = self.starts.acquire().await.expect("never closed");
        let acp = &self.config.acp;
        let dir = self.config.channel_dir(&channel.name);
        std::fs::create_dir_all(&dir).map_err(|error| WarmError::Workspace {
            path: dir.clone(),
            error,
        })?;
        // The configured arguments belong to the configured binary: a channel that names its
        // own binary gets only its own arguments.
        let args: Vec<String> = match (&channel.agent_args, &channel.agent_binary) {
            (Some(json), _) => serde_json::from_str(json).unwrap_or_default(),
            (None, Some(_)) => Vec::new(),
            (None, None) => acp.agent_args.clone(),
        };
        let mut env: Vec<(String, String)> = acp
            .env
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let sandbox = super::confine::spec(&self.config, channel, &mut env)
            .map_err(|(path, error)| WarmError::Workspace { path, error })?;
        let spec = AgentSpec {
            binary: channel
                .agent_binary
                .clone()
                .unwrap_or_else(|| acp.agent_binary.clone()),
            args,
            cwd: dir.clone(),
            env,
            sandbox,
        };
        let timeouts = Timeouts {
            initialize: Duration::from_secs(acp.initialize_timeout_secs),
            new_session: Duration::from_secs(acp.session_timeout_secs),
            load_session: Duration::from_secs(acp.session_timeout_secs),
            prompt: Duration::from_secs(acp.prompt_timeout_secs),
            stall: (acp.stall_timeout_secs > 0)
                .then(|| Duration::from_secs(acp.stall_timeout_secs)),
        };
        let policy = channel.permission_policy;
        let setup = self
            .session_setup(channel)
            .map_err(|e| WarmError::Acp(*e))?;
        let mut agent = AgentProcess::spawn(&spec, timeouts, policy, dir).await?;
        agent.set_session_setup(setup);
        let opened = match agent.open_session(channel.acp_session_id.as_deref()).await {
            Ok(o) => o,
            Err(e) => {
                agent.shutdown().await;
                return Err(e.into());
            }
        };
        tracing::info!(channel = %channel.name, pid = agent.pid(), session = %opened.id, with = opened.with.method(), "agent started");
        let option_defaults = Live::current_options(&agent, &opened.id);
        Ok(Live {
            agent,
            session_id: opened.id,
            opened_with: opened.with,
            fallback: opened.fallback,
            reported_cost: std::sync::Mutex::new(None),
            option_defaults,
            options_changed: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// What goes with every session of the channel's agent: `[acp] mcp_servers` and the
    /// channel's own, and its additional directories.
    fn session_setup(&self, channel: &Channel) -> Result<SessionSetup, Box<AcpError>> {
        let mut mcp_servers = self.config.acp.mcp_servers.clone();
        let own: Vec<McpServerSpec> = serde_json::from_str(&channel.mcp_servers).map_err(|e| {
            Box::new(AcpError::InvalidSpec(format!(
                "the channel's mcp_servers cannot be read: {e}"
            )))
        })?;
        // A channel's server replaces a configured one of the same name.
        mcp_servers.retain(|s| !own.iter().any(|o| o.name == s.name));
        mcp_servers.extend(own);
        Ok(SessionSetup {
            mcp_servers,
            additional_directories: channel.directories(),
        })
    }

    /// Stops the channel's agent now if it is idle (the conversation is kept: the next job
    /// resumes it in a new agent). Returns false when there is none or a job is using it.
    pub async fn stop_idle(&self, channel_id: i64, why: &str) -> bool {
        let Some(slot) = self.existing_slot(channel_id) else {
            return false;
        };
        let Ok(mut g) = slot.live.clone().try_lock_owned() else {
            return false;
        };
        let Some(l) = g.take() else {
            return false;
        };
        tracing::info!(channel_id, why, "stopping a warm session");
        l.close_and_stop().await;
        let _ = self
            .store
            .warm_stop(
                channel_id,
                &self.instance,
                false,
                Some(why.into()),
                now_ms(),
            )
            .await;
        true
    }

    /// Makes room for one more process by shutting down the least recently used idle one.
    async fn evict_for_new(&self, except: i64) {
        let max = self.config.acp.max_warm_sessions as usize;
        loop {
            let mut idle: Vec<Arc<Slot>> = self.snapshot();
            idle.retain(|s| s.channel_id != except);
            // A busy slot (locked by a job) counts as live.
            let live = idle
                .iter()
                .filter(|s| s.live.try_lock().map(|g| g.is_some()).unwrap_or(true))
                .count();
            if live < max {
                return;
            }
            idle.sort_by_key(|s| s.last_used.load(Ordering::Relaxed));
            let mut evicted = false;
            for s in idle {
                if let Ok(mut g) = s.live.clone().try_lock_owned() {
                    if let Some(l) = g.take() {
                        tracing::info!(
                            channel_id = s.channel_id,
                            "evicting least recently used warm session"
                        );
                        l.close_and_stop().await;
                        let _ = self
                            .store
                            .warm_stop(
                                s.channel_id,
                                &self.instance,
                                false,
                                Some("evicted: too many warm sessions".into()),
                                now_ms(),
                            )
                            .await;
                        evicted = true;
                        break;
                    }
                }
            }
            if !evicted {
                return; // every other session is busy: allow one over the cap
            }
        }
    }

    /// One keeper pass at time `now` (see the module docs). Warm-ups it starts run in the
    /// background; [`WarmSessionManager::settle`] waits for them.
    pub async fn run_once(
        self: &Arc<Self>,
        now: Millis,
    ) -> Result<KeeperReport, crate::store::StoreError> {
        let mut report = KeeperReport::default();
        let rows = self.store.warm_list().await?;
        let by_channel: HashMap<i64, &WarmSession> =
            rows.iter().map(|r| (r.channel_id, r)).collect();

        // Live sessions here: expire, hand over, or drop dead ones.
        for slot in self.snapshot() {
            let Ok(mut g) = slot.live.clone().try_lock_owned() else {
                continue; // busy with a job
            };
            let Some(live) = g.as_ref() else { continue };
            let row = by_channel.get(&slot.channel_id);
            let mine = row.is_some_and(|r| r.holder.as_deref() == Some(self.instance.as_str()));
            let expired = row.and_then(|r| r.expires_at).is_some_and(|e| e <= now);
            let dead = live.agent.has_exited();
            if !mine || expired || dead {
                let l = g.take().expect("checked above");
                let tail = l.agent.stderr_tail();
                if dead {
                    l.agent.shutdown().await;
                } else {
                    // Expired, the channel deleted, or its lease taken over.
                    l.close_and_stop().await;
                }
                if mine {
                    let note = if dead {
                        Some(format!("agent exited while idle; {}", last_lines(&tail, 5)))
                    } else if expired {
                        Some("keep-alive expired".to_string())
                    } else {
                        None
                    };
                    self.store
                        .warm_stop(slot.channel_id, &self.instance, dead, note, now)
                        .await?;
                }
                report.stopped += 1;
            }
        }

        report.handed_over = self.hand_over(now).await?;

        // Rows to warm here: requested (warm_at due), or warm but orphaned (restart/takeover).
        let warming: std::collections::HashSet<i64> =
            self.warming.lock().expect("warming lock").clone();
        let mut requested = Vec::new();
        let mut orphaned = Vec::new();
        for row in &rows {
            if self.live_pid(row.channel_id).is_some() {
                if row.warm_at.is_some_and(|t| t <= now) {
                    // Asked for and already warm here.
                    self.store.warm_request(row.channel_id, None, now).await?;
                }
                continue;
            }
            if warming.contains(&row.channel_id) {
                continue;
            }
            if row.warm_at.is_some_and(|t| t <= now) {
                requested.push(row);
            } else if matches!(
                row.state,
                WarmState::Warm | WarmState::Busy | WarmState::Starting
            ) && row.expires_at.is_some_and(|e| e > now)
                && row.holder.as_deref() != Some(self.instance.as_str())
                && (row.lease_expires_at.is_none_or(|l| l < now)
                    || (!self.store.is_shared()
                        && row
                            .holder
                            .as_deref()
                            .is_some_and(crate::instance::holder_is_dead)))
            {
                orphaned.push(row);
            }
        }
        // Orphans are warmed again only as far as they fit under the cap, the channels with
        // queued jobs first, then the most recently used; the rest are marked stopped.
        if !orphaned.is_empty() {
            let queued = self.store.channel_ids_with_queued_jobs().await?;
            orphaned.sort_by_key(|r| {
                (
                    !queued.contains(&r.channel_id),
                    std::cmp::Reverse(r.last_used_at),
                )
            });
            let max = self.config.acp.max_warm_sessions as usize;
            let room = max.saturating_sub(self.live_count() + warming.len() + requested.len());
            for row in orphaned.split_off(room.min(orphaned.len())) {
                self.store
                    .warm_stop_orphan(
                        row.channel_id,
                        row.holder.as_deref(),
                        &format!(
                            "not warmed again after a restart: max_warm_sessions ({max}) reached"
                        ),
                        now,
                    )
                    .await?;
                report.stopped += 1;
            }
        }
        // A few at a time: the rest wait for a later pass.
        let slots = self.max_starts().saturating_sub(warming.len());
        let to_warm = requested
            .into_iter()
            .map(|r| (r, true))
            .chain(orphaned.into_iter().map(|r| (r, false)))
            .take(slots);
        for (row, requested) in to_warm {
            if !self
                .warming
                .lock()
                .expect("warming lock")
                .insert(row.channel_id)
            {
                continue; // already warming
            }
            report.warming += 1;
            let me = self.clone();
            let channel_id = row.channel_id;
            self.tasks.spawn(async move {
                me.warm_in_background(channel_id, requested).await;
                me.warming.lock().expect("warming lock").remove(&channel_id);
            });
        }

        self.store.warm_expire_orphans(now).await?;
        let sent = Instant::now();
        if self.fenced.load(Ordering::SeqCst) {
            // Back after fencing: the rows of the agents stopped then are let go of first, so
            // the renewal below keeps only what runs here now.
            self.store
                .warm_release_leases(&self.instance, now_ms())
                .await?;
            self.fenced.store(false, Ordering::SeqCst);
        }
        self.store
            .warm_heartbeat(&self.instance, self.lease_until(now))
            .await?;
        *self.renewed.lock().expect("renewed lock") = sent;
        Ok(report)
    }

    /// How long after the last renewal this node stops its agents: three quarters of the
    /// lease, so they are stopped before the lease runs out and another node may take over.
    pub fn fence_after(&self) -> Duration {
        Duration::from_millis(self.lease_ms() as u64 * 3 / 4)
    }

    fn since_renewed(&self) -> Duration {
        self.renewed.lock().expect("renewed lock").elapsed()
    }

    /// Self-fencing: when the leases have not been renewed for [`Self::fence_after`], every
    /// idle agent here is stopped (a busy one is stopped by its job, which the worker pool
    /// fences on the same deadline). Returns how many were stopped.
    pub async fn fence_if_stale(&self) -> usize {
        let since = self.since_renewed();
        if since < self.fence_after() {
            return 0;
        }
        let mut stopped = 0;
        for slot in self.snapshot() {
            let Ok(mut g) = slot.live.clone().try_lock_owned() else {
                continue;
            };
            if let Some(l) = g.take() {
                l.agent.shutdown().await;
                stopped += 1;
            }
        }
        if stopped > 0 || !self.fenced.load(Ordering::SeqCst) {
            tracing::error!(
                since_renewed = ?since,
                stopped,
                "cannot renew the warm-session leases; stopped this node's agents (self-fencing)"
            );
        }
        self.fenced.store(true, Ordering::SeqCst);
        stopped
    }

    /// Work moves: on a shared database, an idle agent of ours whose channel has had a due
    /// job for two keeper passes in a row is one this node is too busy to run (an idle node
    /// claims a due job within a poll). It is stopped and its lease let go of, so a node with
    /// room takes the channel.
    async fn hand_over(&self, now: Millis) -> Result<usize, crate::store::StoreError> {
        if !self.store.is_shared() {
            return Ok(0);
        }
        let due = self.store.channel_ids_with_due_jobs(now).await?;
        let mut waiting_now = std::collections::HashSet::new();
        let mut handed = 0;
        let before = self.waiting.lock().expect("waiting lock").clone();
        // Only when another node has room: among busy nodes, moving a channel only costs it
        // its warm agent.
        let mut room: Option<bool> = None;
        for slot in self.snapshot() {
            if !due.contains(&slot.channel_id) {
                continue;
            }
            let Ok(mut g) = slot.live.clone().try_lock_owned() else {
                continue; // busy: its next job follows in the same slot
            };
            if g.is_none() {
                continue;
            }
            if !before.contains(&slot.channel_id) {
                waiting_now.insert(slot.channel_id);
                continue;
            }
            if room.is_none() {
                let nodes = self.store.node_list(now).await?;
                room = Some(
                    nodes
                        .iter()
                        .any(|n| n.id != self.instance && n.state == "up" && n.running < n.slots),
                );
            }
            if room == Some(false) {
                waiting_now.insert(slot.channel_id);
                continue;
            }
            let l = g.take().expect("checked above");
            l.close_and_stop().await;
            self.store
                .warm_stop(
                    slot.channel_id,
                    &self.instance,
                    false,
                    Some("handed over: this node was busy while the channel had a job".into()),
                    now,
                )
                .await?;
            tracing::info!(
                channel_id = slot.channel_id,
                "handed an idle channel over to a node with room"
            );
            handed += 1;
        }
        *self.waiting.lock().expect("waiting lock") = waiting_now;
        Ok(handed)
    }

    async fn warm_in_background(&self, channel_id: i64, clear_request: bool) {
        let channel = match self.store.channel_get_by_id(channel_id).await {
            Ok(Some(c)) => c,
            _ => return,
        };
        match self.pre_warm(&channel).await {
            Ok(_) => tracing::info!(channel = %channel.name, "pre-warmed agent"),
            Err(e) => tracing::warn!(channel = %channel.name, error = %e, "pre-warm failed"),
        }
        if clear_request {
            let _ = self.store.warm_request(channel_id, None, now_ms()).await;
        }
    }

    /// Waits until the warm-ups started by the keeper have finished.
    pub async fn settle(&self) {
        loop {
            if self.warming.lock().expect("warming lock").is_empty() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Shuts every agent down. The rows stay warm with released leases, so the next gorp
    /// warms them again.
    pub async fn shutdown(&self) {
        self.tasks.close();
        self.tasks.wait().await;
        let slots: Vec<Arc<Slot>> = self
            .slots
            .lock()
            .expect("slots lock")
            .drain()
            .map(|(_, s)| s)
            .collect();
        for slot in slots {
            if let Some(l) = slot.live.lock().await.take() {
                l.agent.shutdown().await;
            }
        }
        if let Err(e) = self
            .store
            .warm_release_leases(&self.instance, now_ms())
            .await
        {
            tracing::warn!(error = %e, "cannot release warm-session leases");
        }
    }
}

/// What one keeper pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct KeeperReport {
    pub stopped: usize,
    pub warming: usize,
    /// Idle agents stopped so another node can take their channel's waiting jobs.
    pub handed_over: usize,
    /// Agents stopped because their leases could not be renewed in time.
    pub fenced: usize,
}

fn last_lines(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    let start = lines.len().saturating_sub(n);
    let tail = lines[start..].join(" | ");
    if tail.is_empty() {
        "no stderr output".into()
    } else {
        format!("stderr: {tail}")
    }
}

/// The keeper: one pass every [`KEEPER_INTERVAL`].
impl crate::background::Service for Arc<WarmSessionManager> {
    type Report = KeeperReport;
    const NAME: &'static str = "warm-keeper";

    fn interval(&self) -> Duration {
        KEEPER_INTERVAL
    }

    /// A pass that cannot reach the database gives up by the fencing deadline, and the next
    /// pass fences first: a node cut off from the database never runs agents on leases it
    /// could not renew.
    async fn run_once(&self, now: Millis) -> Result<KeeperReport, crate::store::StoreError> {
        let mut report = KeeperReport {
            fenced: self.fence_if_stale().await,
            ..Default::default()
        };
        let left = self.fence_after().saturating_sub(self.since_renewed());
        match tokio::time::timeout(
            left.max(KEEPER_INTERVAL),
            WarmSessionManager::run_once(self, now),
        )
        .await
        {
            Ok(r) => {
                let r = r?;
                report.stopped += r.stopped;
                report.warming += r.warming;
                report.handed_over += r.handed_over;
                Ok(report)
            }
            // The database does not answer in time.
            Err(_) => Err(crate::store::StoreError::Db(sqlx::Error::PoolTimedOut)),
        }
    }

    fn counts(r: &KeeperReport) -> Vec<(&'static str, u64)> {
        vec![
            ("stopped", r.stopped as u64),
            ("warming", r.warming as u64),
            ("handed_over", r.handed_over as u64),
            ("fenced", r.fenced as u64),
        ]
    }
}
