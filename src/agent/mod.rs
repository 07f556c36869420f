//! Agents at work: the warm pool of live agent processes (one per channel, driven by the
//! `warm_sessions` lease table) and the executor that runs a job's prompt on one of them.
//! This is where the ACP layer ([`crate::acp`]) meets the store. [`confine`] works out the
//! sandbox each channel's agent starts in.

pub mod confine;
pub mod executor;
pub mod pool;

pub use executor::AcpExecutor;
pub use pool::WarmSessionManager;
