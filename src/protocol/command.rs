//! Parsed requests. Keys and data borrow from the connection's read buffer:
//! parsing allocates nothing, and a cache hit copies nothing but the reply.

/// A storage command's mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreMode {
    /// `set`: store unconditionally.
    Set,
    /// `add`: store only if the key holds no live item.
    Add,
}

impl StoreMode {
    pub fn name(self) -> &'static str {
        match self {
            StoreMode::Set => "set",
            StoreMode::Add => "add",
        }
    }
}

/// One request, as the client sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command<'a> {
    /// `get <key>+` (`cas: false`) or `gets <key>+` (`cas: true`).
    Get { keys: Keys<'a>, cas: bool },
    /// `set` / `add <key> <flags> <exptime> <bytes> [noreply]` and its data block.
    Store {
        mode: StoreMode,
        key: &'a [u8],
        flags: u32,
        exptime: i64,
        data: &'a [u8],
        noreply: bool,
    },
    /// `delete <key> [0] [noreply]`.
    Delete { key: &'a [u8], noreply: bool },
    /// `touch <key> <exptime> [noreply]`.
    Touch {
        key: &'a [u8],
        exptime: i64,
        noreply: bool,
    },
    /// `version`.
    Version,
    /// `quit`: close the connection once earlier replies are written.
    Quit,
}

impl Command<'_> {
    /// The command's name as a static string, for metrics labels.
    pub fn name(&self) -> &'static str {
        match self {
            Command::Get { cas: false, .. } => "get",
            Command::Get { cas: true, .. } => "gets",
            Command::Store { mode, .. } => mode.name(),
            Command::Delete { .. } => "delete",
            Command::Touch { .. } => "touch",
            Command::Version => "version",
            Command::Quit => "quit",
        }
    }
}

/// The keys of a multi-key retrieval: the space-separated tail of the request
/// line, already checked by the parser (1..=250 bytes, no control bytes).
/// Iterating splits lazily, so a `get` of 100 keys allocates nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keys<'a>(pub(crate) &'a [u8]);

impl<'a> Keys<'a> {
    pub fn iter(&self) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.0.split(|&b| b == b' ').filter(|k| !k.is_empty())
    }
}
