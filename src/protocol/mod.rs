//! The memcached text protocol: bytes in, [`Command`]s out ([`parse()`]), and
//! [`Reply`] values back to bytes ([`reply`]).
//!
//! This module owns framing and syntax only. It knows nothing of the cache or
//! of DynamoDB, performs no I/O and keeps no state between calls, so every rule
//! here is unit-tested on plain byte slices.
//!
//! Its submodules form layers; each uses only those below it:
//!
//! - [`parse`](mod@parse): the entry point, which frames a request line and
//!   dispatches on the command name to
//! - `classic` (storage, retrieval, delete, touch, incr/decr, operator
//!   commands) and `meta` (`mg`, `ms`, `md`, `ma`, `me`), the parsers,
//!   which build on
//! - `parsed` ([`Parsed`], [`Limits`]: what parsing answers),
//! - [`reply`] ([`Reply`] and its encoding),
//! - [`command`] (the request types, classic and meta) and
//! - `token` (lines, tokens, numbers, data blocks).
//!
//! This file only declares them and re-exports their public types.

mod classic;
pub mod command;
mod meta;
pub mod parse;
mod parsed;
pub mod reply;
mod token;

pub use command::{Command, Keys, Meta, MetaCmd, MetaFlags, MetaMode, StatsGroup, StoreMode};
pub use parse::parse;
pub use parsed::{Limits, Parsed};
pub use reply::{MetaCode, MetaItem, Reply};
pub use token::KEY_MAX_LEN;
