//! The one item type the store, the cache and the engine share, and the
//! one rule for expiry. It depends on nothing else in the crate, so every
//! module can use it without a cycle (the store's is re-exported as
//! `store::Item`).

/// An item: what the table holds for a key, what the cache keeps a copy
/// of, and what a reply is made from.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Item {
    pub value: Vec<u8>,
    pub flags: u32,
    /// Unix seconds after which the item is gone; 0 = never.
    pub expires_at: u32,
    /// Changes on every write (the item's cas unique), never repeats: a
    /// write conditioned on it cannot land once anything else was written.
    /// Versions are made from the writer's clock, so a version also dates
    /// its write (see [`View::flushed_before`]).
    pub version: u64,
    /// How many items besides the key's own hold the rest of the value in
    /// the store (0: all of it is in one item; see `store::dynamo`). Only
    /// the store sets it; the engine hands it back with the version a
    /// write replaces, so that the write removes those items too.
    pub chunks: u8,
}

/// Whether an item with this expiry is gone at `now` (Unix seconds): the
/// one rule for expiry, in the store, the cache and the engine.
pub fn is_expired(expires_at: u32, now: u32) -> bool {
    expires_at != 0 && expires_at <= now
}

/// How far in the past a tombstone's expiry is set (see [`Item::tombstone`]).
pub const TOMBSTONE_AGE: u32 = 24 * 60 * 60;

/// What "live" means for one request: not expired at `now`, and not written
/// before the last `flush_all` that has taken effect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct View {
    /// Unix seconds.
    pub now: u32,
    /// Items whose version is below this were flushed; 0 = no flush.
    pub flushed_before: u64,
}

impl View {
    pub fn at(now: u32) -> View {
        View {
            now,
            flushed_before: 0,
        }
    }
}

impl Item {
    pub fn is_expired(&self, now: u32) -> bool {
        is_expired(self.expires_at, now)
    }

    /// Whether clients may see this item under `view`.
    pub fn is_live(&self, view: View) -> bool {
        !self.is_expired(view.now) && self.version >= view.flushed_before
    }

    /// What a delete leaves: an empty item, expired a day before the
    /// delete (no reader takes it for a value, not one whose request began
    /// in an earlier second, nor one on a host whose clock is behind; the
    /// table's TTL removes it), whose version a late write conditioned on an
    /// older one fails on.
    pub fn tombstone(version: u64, now: u32) -> Item {
        Item {
            value: Vec::new(),
            flags: 0,
            expires_at: now.saturating_sub(TOMBSTONE_AGE).max(1),
            version,
            chunks: 0,
        }
    }
}
