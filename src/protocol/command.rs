//! Parsed requests: [`Command`] and the types it is made of, classic
//! ([`StoreMode`], [`StatsGroup`], [`Keys`]) and meta ([`Meta`], [`MetaCmd`],
//! [`MetaFlags`], [`MetaMode`]). Keys and data borrow from the connection's
//! read buffer: parsing allocates nothing (but for a base64 meta key), and a
//! cache hit copies nothing but the reply.
//!
//! Types only: the parsers that build them are `classic` and `meta`. This
//! module depends on no other module of the protocol.

use std::borrow::Cow;

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
    /// `stats hotkeys`: dynacache's own, the keys read and written most.
    HotKeys,
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

/// Which meta command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetaCmd {
    Get,
    Set,
    Delete,
    Arith,
    Debug,
}

impl MetaCmd {
    pub fn name(self) -> &'static str {
        match self {
            MetaCmd::Get => "mg",
            MetaCmd::Set => "ms",
            MetaCmd::Delete => "md",
            MetaCmd::Arith => "ma",
            MetaCmd::Debug => "me",
        }
    }
}

/// The `M` flag of `ms` and `ma`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MetaMode {
    /// `ms` `MS` (the default).
    #[default]
    Set,
    /// `ms` `ME`: add.
    Add,
    /// `ms` `MR`: replace.
    Replace,
    /// `ms` `MA`.
    Append,
    /// `ms` `MP`.
    Prepend,
    /// `ma` `MI` / `M+` (the default for `ma`).
    Incr,
    /// `ma` `MD` / `M-`.
    Decr,
}

/// Most return flags one request can ask for: `c f k O s t`, once each.
const ECHO_MAX: usize = 6;

/// The flags of one meta request: a small fixed struct that borrows from the
/// request line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MetaFlags<'a> {
    /// Return flags (`c f k O s t`) in the order they were sent: replies
    /// echo them in that order.
    echo: [u8; ECHO_MAX],
    echo_len: u8,
    /// `b`: the key token is base64.
    pub base64: bool,
    /// `q`: quiet (which replies it hides depends on the command).
    pub quiet: bool,
    /// `v`: return the value.
    pub value: bool,
    /// `O<opaque>`: echoed as is (possibly empty).
    pub opaque: &'a [u8],
    /// `T<ttl>`: touch (mg, ma) or the item's exptime (ms).
    pub ttl: Option<i32>,
    /// `N<ttl>`: vivify on miss (mg, ma).
    pub vivify: Option<i32>,
    /// `R<ttl>`: recache (mg); accepted, never wins (see the README).
    pub recache: Option<i32>,
    /// `C<cas>`: compare and swap (ms, md, ma).
    pub cas: Option<u64>,
    /// `F<flags>` (ms).
    pub client_flags: u32,
    /// `M<mode>` (ms, ma).
    pub mode: Option<MetaMode>,
    /// `J<initial>` (ma with N).
    pub initial: u64,
    /// `D<delta>` (ma), 1 unless given.
    pub delta: u64,
    /// `I`: invalidate (md: mark stale; ms: store stale if older).
    pub invalidate: bool,
}

impl<'a> MetaFlags<'a> {
    /// The return flags asked for, in request order.
    pub fn echo(&self) -> &[u8] {
        &self.echo[..self.echo_len as usize]
    }

    /// Records a return flag; the meta parser refuses duplicates before
    /// this, so there is room.
    pub(super) fn push_echo(&mut self, flag: u8) {
        self.echo[self.echo_len as usize] = flag;
        self.echo_len += 1;
    }
}

/// A parsed meta request (see [`Command::Meta`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meta<'a> {
    pub cmd: MetaCmd,
    /// The key (decoded if `b`).
    pub key: Cow<'a, [u8]>,
    /// The key as sent, echoed by `k`.
    pub key_token: &'a [u8],
    pub flags: MetaFlags<'a>,
    /// The data block of `ms`.
    pub data: &'a [u8],
}
