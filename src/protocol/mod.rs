//! The memcached text protocol: bytes in, [`Command`]s out ([`parse`]), and
//! [`Reply`] values back to bytes ([`reply`]).
//!
//! This module owns framing and syntax only. It knows nothing of the cache or
//! of DynamoDB, performs no I/O and keeps no state between calls, so every rule
//! here is unit-tested on plain byte slices.

pub mod command;
pub mod meta;
pub mod parse;
pub mod reply;

pub use command::{Command, Keys, StatsGroup, StoreMode};
pub use meta::{Meta, MetaCmd, MetaFlags, MetaMode};
pub use parse::{Limits, Parsed, parse};
pub use reply::{MetaCode, MetaItem, Reply};

/// Longest key memcached accepts.
pub const KEY_MAX_LEN: usize = 250;
