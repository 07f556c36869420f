//! The closed sets of values gorp stores as text (job states and sources, event kinds,
//! permission policies, a schedule's catch-up and overlap policies, warm-session states): they
//! live in the `gorp-types` crate, which every store backend shares, and are used from here.

pub use gorp_types::kinds::*;
