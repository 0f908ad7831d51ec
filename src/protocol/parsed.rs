//! What parsing answers: [`Parsed`] (a whole request, "need more bytes", the
//! reply to a malformed one, a too-large item to discard, or a line too long),
//! and the [`Limits`] it is checked against. Shared by the dispatch (`parse`)
//! and the classic and meta parsers; depends only on `command` and `reply`.

use super::command::{Command, StoreMode};
use super::reply::Reply;

/// Bounds that keep a connection's memory small whatever a client sends.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// A request line longer than this with no newline closes the connection
    /// (memcached: 2048), except retrieval lines, bounded by `max_get_line`.
    pub max_line: usize,
    /// Longest `get`/`gets` line (hundreds of keys are normal in a multi-get).
    pub max_get_line: usize,
    /// Largest item accepted: key + value + `item_overhead` must not exceed it.
    pub item_size_max: usize,
    /// Bytes an item costs in the store besides its key and value.
    pub item_overhead: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_line: 2048,
            max_get_line: 256 * 1024,
            item_size_max: 1024 * 1024,
            item_overhead: 0,
        }
    }
}

impl Limits {
    /// The most bytes one buffered request can take: a line plus a data block.
    pub fn max_request(&self) -> usize {
        self.max_get_line
            .max(self.max_line + self.item_size_max + 2)
    }
}

/// What the front of the read buffer holds.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed<'a> {
    /// A whole request, `len` bytes long.
    Request(Command<'a>, usize),
    /// Not a whole request yet: read more.
    Incomplete,
    /// A malformed request, `len` bytes long: answer `reply` unless `noreply`.
    Invalid {
        reply: Reply<'static>,
        len: usize,
        noreply: bool,
    },
    /// A storage request whose item exceeds [`Limits::item_size_max`]. Answer
    /// `SERVER_ERROR object too large for cache` (unless `noreply`), consume
    /// the `len` bytes of its line, then discard `discard` more bytes (the
    /// data block and its `\r\n`) as they arrive, without buffering them.
    TooLarge {
        mode: StoreMode,
        key: &'a [u8],
        len: usize,
        discard: u64,
        noreply: bool,
    },
    /// A line over the limit with no newline: close the connection.
    LineTooLong,
}

/// A malformed request of `len` bytes: answer `reply` unless `noreply`.
pub(super) fn invalid(reply: Reply<'static>, len: usize, noreply: bool) -> Parsed<'static> {
    Parsed::Invalid {
        reply,
        len,
        noreply,
    }
}

/// `CLIENT_ERROR bad command line format`, the reply both parsers give most.
pub(super) const BAD_FORMAT: Reply<'static> = Reply::ClientError("bad command line format");
