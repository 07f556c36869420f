//! Rows and values the store reads and writes: they live in the `gorp-types` crate, which every
//! store backend shares, and are used from here.

pub use gorp_types::types::*;
pub use gorp_types::{DatabaseReport, Result, StoreError};
