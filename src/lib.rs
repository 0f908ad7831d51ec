//! dynacache: a memcached-protocol sidecar that keeps its data in DynamoDB.
//!
//! The data path, one module each: bytes -> [`protocol`] (parse) ->
//! [`protocol::Command`] -> [`engine`] ([`cache`] + [`store`]) ->
//! [`protocol::Reply`] -> bytes, driven per client by [`connection`] and
//! accepted by [`server`] on [`listener`]s. Operators' side: [`admin`]
//! (/metrics, /healthz, /readyz) and [`metrics`].
#![forbid(unsafe_code)]

pub mod admin;
pub mod cache;
pub mod config;
pub mod connection;
pub mod engine;
pub mod fleet;
pub mod hotkeys;
pub mod item;
pub mod listener;
pub mod metrics;
pub mod output;
pub mod protocol;
pub mod server;
pub mod store;
