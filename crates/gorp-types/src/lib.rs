//! What gorp's store and its callers share, whichever database backs the store: the closed
//! sets of stored values ([`kinds`]), the rows and values the store reads and writes
//! ([`types`]) and the store's error ([`error`]).
//!
//! A crate of its own so that each database backend's queries, compile-time checked against
//! their own database, can live in a crate of their own and speak these types.

pub mod error;
pub mod kinds;
pub mod types;

pub use error::{DatabaseReport, Result, StoreError};
