//! Parsed requests. Keys and data borrow from the connection's read buffer:
//! parsing allocates nothing, and a cache hit copies nothing but the reply.

use super::meta::Meta;

/// A storage command's mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreMode {
    /// `set`: store unconditionally.
    Set,
    /// `add`: store only if the key holds no live item.
    Add,
    /// `replace`: store only if the key holds a live item.
    Replace,
    /// `append`: add the data after the live item's value (flags and exptime ignored).
    Append,
    /// `prepend`: add the data before the live item's value.
    Prepend,
    /// `cas`: store only if the live item's cas unique is this one.
    Cas(u64),
}

impl StoreMode {
    pub fn name(self) -> &'static str {
        match self {
            StoreMode::Set => "set",
            StoreMode::Add => "add",
            StoreMode::Replace => "replace",
            StoreMode::Append => "append",
            StoreMode::Prepend => "prepend",
            StoreMode::Cas(_) => "cas",
        }
    }
}

/// `stats` and its sub-commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatsGroup {
    General,
    Settings,
    Items,
    Slabs,
    Sizes,
    Conns,
    Reset,
    /// `stats detail on|off|dump`: `dump` is true for `dump`.
    Detail {
        dump: bool,
    },
    /// `stats cachedump <slab> <limit>`.
    Cachedump,
}

/// One request, as the client sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command<'a> {
    /// `get|gets <key>+`, or `gat|gats <exptime> <key>+` (`touch` is the exptime).
    Get {
        keys: Keys<'a>,
        cas: bool,
        touch: Option<i32>,
    },
    /// `set|add|replace|append|prepend <key> <flags> <exptime> <bytes> [noreply]`
    /// and `cas <key> <flags> <exptime> <bytes> <cas unique> [noreply]`, with the data block.
    Store {
        mode: StoreMode,
        key: &'a [u8],
        flags: u32,
        exptime: i32,
        data: &'a [u8],
        noreply: bool,
    },
    /// `delete <key> [0] [noreply]`.
    Delete { key: &'a [u8], noreply: bool },
    /// `touch <key> <exptime> [noreply]`.
    Touch {
        key: &'a [u8],
        exptime: i32,
        noreply: bool,
    },
    /// `incr|decr <key> <delta> [noreply]`.
    Arith {
        incr: bool,
        key: &'a [u8],
        delta: u64,
        noreply: bool,
    },
    /// `flush_all [delay] [noreply]`.
    FlushAll { delay: i32, noreply: bool },
    /// `stats [group]`.
    Stats(StatsGroup),
    /// `verbosity <level> [noreply]`: accepted, changes nothing (logs use RUST_LOG).
    Verbosity { noreply: bool },
    /// `cache_memlimit <megabytes> [noreply]`.
    CacheMemlimit { megabytes: u64, noreply: bool },
    /// `shutdown`: refused, as memcached does unless started with -A.
    Shutdown,
    /// `mn`: the meta no-op, answered `MN`.
    MetaNoop,
    /// `mg`, `ms`, `md`, `ma`, `me` and their flags.
    Meta(Meta<'a>),
    /// `version`.
    Version,
    /// `quit`: close the connection once earlier replies are written.
    Quit,
}

impl Command<'_> {
    /// The command's name as a static string, for metrics labels.
    pub fn name(&self) -> &'static str {
        match self {
            Command::Get {
                cas: false,
                touch: None,
                ..
            } => "get",
            Command::Get {
                cas: true,
                touch: None,
                ..
            } => "gets",
            Command::Get {
                cas: false,
                touch: Some(_),
                ..
            } => "gat",
            Command::Get {
                cas: true,
                touch: Some(_),
                ..
            } => "gats",
            Command::Store { mode, .. } => mode.name(),
            Command::Delete { .. } => "delete",
            Command::Touch { .. } => "touch",
            Command::Arith { incr: true, .. } => "incr",
            Command::Arith { incr: false, .. } => "decr",
            Command::FlushAll { .. } => "flush_all",
            Command::Stats(_) => "stats",
            Command::Verbosity { .. } => "verbosity",
            Command::CacheMemlimit { .. } => "cache_memlimit",
            Command::Shutdown => "shutdown",
            Command::MetaNoop => "mn",
            Command::Meta(meta) => meta.cmd.name(),
            Command::Version => "version",
            Command::Quit => "quit",
        }
    }
}

/// The keys of a multi-key retrieval: the space-separated tail of the request
/// line, already checked by the parser (1..=250 bytes each).
/// Iterating splits lazily, so a `get` of 100 keys allocates nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keys<'a>(pub(crate) &'a [u8]);

impl<'a> Keys<'a> {
    pub fn iter(&self) -> KeyIter<'a> {
        KeyIter(self.0)
    }
}

/// The keys of a [`Keys`], in order. A named type (not a closure-built
/// iterator), so futures that hold one across an await stay `Send`.
#[derive(Debug, Clone)]
pub struct KeyIter<'a>(&'a [u8]);

impl<'a> Iterator for KeyIter<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        let start = self.0.iter().position(|&b| b != b' ')?;
        let rest = &self.0[start..];
        let end = rest.iter().position(|&b| b == b' ').unwrap_or(rest.len());
        self.0 = &rest[end..];
        Some(&rest[..end])
    }
}
