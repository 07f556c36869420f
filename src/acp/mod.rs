//! ACP: gorp's agent client. It speaks the protocol and knows nothing of jobs or the
//! database; [`crate::agent`] bridges it to the store.
//!
//! - [`client`]: one agent process and its ACP connection (spawn, initialize, sessions,
//!   prompts, permission and file-system requests).

pub mod client;
mod line_limit;
