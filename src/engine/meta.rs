//! Meta commands (`mg`, `ms`, `md`, `ma`, `me`) on the classic commands'
//! paths: `mg` is the get path (or `touch_item` with `T`), `ms` the storage
//! path with its conditional puts, `ma` the atomic read-modify-write of
//! `incr`, `md` `delete` (or a version-conditioned put with `C`). Which
//! replies `q` hides follows memcached 1.6.18: `mg` hides `EN`, `ms` and
//! `md` hide `HD`, `ma` hides the answer to a counter that existed.

use bytes::BytesMut;

use super::read::Value;
use super::stats::bump;
use super::write::{Arith, StoreResult};
use super::{Engine, error_reply, expiry};
use crate::metrics::Outcome;
use crate::protocol::{Meta, MetaCmd, MetaCode, MetaItem, MetaMode, Reply, StoreMode};
use crate::store::{Store, View};

/// The return flags each reply answers (`h` and `l` are never answered).
const MG_HIT: &[u8] = b"cfkOst";
const KEY_OPAQUE: &[u8] = b"kO";
const MS: &[u8] = b"ckO";
const MA_HIT: &[u8] = b"ckOt";

impl<S: Store> Engine<S> {
    pub(super) async fn meta(&self, meta: Meta<'_>, out: &mut BytesMut, view: View) -> Outcome {
        let key = &meta.key[..];
        if let Err(e) = self.store.check_key(key) {
            return error_reply(out, &e);
        }
        let result = match meta.cmd {
            MetaCmd::Get => self.meta_get(&meta, out, view).await,
            MetaCmd::Set => self.meta_set(&meta, out, view).await,
            MetaCmd::Delete => self.meta_delete(&meta, out, view).await,
            MetaCmd::Arith => self.meta_arith(&meta, out, view).await,
            MetaCmd::Debug => self.meta_debug(&meta, out, view).await,
        };
        result.unwrap_or_else(|e| error_reply(out, &e))
    }

    async fn meta_get(
        &self,
        meta: &Meta<'_>,
        out: &mut BytesMut,
        view: View,
    ) -> Result<Outcome, crate::store::StoreError> {
        let key = &meta.key[..];
        let flags = &meta.flags;
        let mut found = match flags.ttl {
            Some(ttl) => {
                bump(&self.stats.cmd_touch);
                let item = self.touch_item(key, expiry(ttl, view.now), view).await?;
                bump(&self.stats.cmd_get);
                bump(match item {
                    Some(_) => &self.stats.touch_hits,
                    None => &self.stats.touch_misses,
                });
                bump(match item {
                    Some(_) => &self.stats.get_hits,
                    None => &self.stats.get_misses,
                });
                item.map(Value::Stored)
            }
            None => {
                // A hit is answered from the cache in place, as `get`'s are.
                let served = self.fresh_with(key, view, self.now_ms(), |entry| {
                    let item = MetaItem {
                        cas: entry.version(),
                        flags: entry.flags(),
                        size: entry.value().len(),
                        ttl: ttl_left(entry.expires_at(), view.now),
                    };
                    let (code, data) = if flags.value {
                        (MetaCode::Va, entry.value())
                    } else {
                        (MetaCode::Hd, &b""[..])
                    };
                    self.meta_reply(out, meta, code, MG_HIT, Some(item), data, false);
                });
                match served.served() {
                    Ok(()) => {
                        self.metrics.hits.increment(1);
                        bump(&self.stats.get_hits);
                        return Ok(Outcome::Hit);
                    }
                    Err(lookup) => self.finish_lookup(key, view, lookup).await?,
                }
            }
        };
        let mut win = false;
        if found.is_none()
            && let Some(ttl) = flags.vivify
        {
            // Vivify: an empty item, created only if the key is still
            // absent; its creator is told it won (`W`). memcached then
            // applies `T`, so `T` wins over `N` for the new item's TTL.
            let ttl = flags.ttl.unwrap_or(ttl);
            match self
                .store_inner(StoreMode::Add, None, key, 0, ttl, b"", view)
                .await?
            {
                StoreResult::Stored(item) => {
                    win = true;
                    found = Some(Value::Stored(item));
                }
                _ => found = self.lookup(key, view).await?,
            }
        }
        let Some(value) = found else {
            if !flags.quiet {
                self.meta_reply(out, meta, MetaCode::En, KEY_OPAQUE, None, b"", false);
            }
            return Ok(Outcome::Miss);
        };
        let item = MetaItem {
            cas: value.version(),
            flags: value.flags(),
            size: value.bytes().len(),
            ttl: ttl_left(value.expires_at(), view.now),
        };
        let (code, data) = if flags.value {
            (MetaCode::Va, value.bytes())
        } else {
            (MetaCode::Hd, &b""[..])
        };
        self.meta_reply(out, meta, code, MG_HIT, Some(item), data, win);
        Ok(Outcome::Hit)
    }

    async fn meta_set(
        &self,
        meta: &Meta<'_>,
        out: &mut BytesMut,
        view: View,
    ) -> Result<Outcome, crate::store::StoreError> {
        let flags = &meta.flags;
        let mode = match (flags.mode.unwrap_or_default(), flags.cas) {
            (MetaMode::Add, _) => StoreMode::Add,
            (MetaMode::Set | MetaMode::Replace, Some(cas)) => StoreMode::Cas(cas),
            (MetaMode::Replace, None) => StoreMode::Replace,
            (MetaMode::Append, _) => StoreMode::Append,
            (MetaMode::Prepend, _) => StoreMode::Prepend,
            _ => StoreMode::Set,
        };
        let result = self
            .store_inner(
                mode,
                flags.cas,
                &meta.key,
                flags.client_flags,
                flags.ttl.unwrap_or(0),
                meta.data,
                view,
            )
            .await?;
        let (code, outcome, cas) = match result {
            StoreResult::Stored(item) => (MetaCode::Hd, Outcome::Stored, item.version),
            StoreResult::NotStored => (MetaCode::Ns, Outcome::NotStored, 0),
            StoreResult::Exists => (MetaCode::Ex, Outcome::NotStored, 0),
            StoreResult::NotFound => (MetaCode::Nf, Outcome::NotFound, 0),
        };
        if !(flags.quiet && code == MetaCode::Hd) {
            let item = MetaItem {
                cas,
                flags: 0,
                size: 0,
                ttl: 0,
            };
            self.meta_reply(out, meta, code, MS, Some(item), b"", false);
        }
        Ok(outcome)
    }

    async fn meta_delete(
        &self,
        meta: &Meta<'_>,
        out: &mut BytesMut,
        view: View,
    ) -> Result<Outcome, crate::store::StoreError> {
        let key = &meta.key[..];
        let (code, outcome) = match meta.flags.cas {
            Some(cas) => match self.delete_version(key, cas, view).await? {
                StoreResult::Stored(_) => (MetaCode::Hd, Outcome::Deleted),
                StoreResult::Exists => (MetaCode::Ex, Outcome::NotStored),
                _ => (MetaCode::Nf, Outcome::NotFound),
            },
            // `I` (invalidate) deletes too: see the README.
            None => match self.delete(key, view).await?.0 {
                Outcome::Deleted => (MetaCode::Hd, Outcome::Deleted),
                other => (MetaCode::Nf, other),
            },
        };
        if !(meta.flags.quiet && code == MetaCode::Hd) {
            self.meta_reply(out, meta, code, KEY_OPAQUE, None, b"", false);
        }
        Ok(outcome)
    }

    async fn meta_arith(
        &self,
        meta: &Meta<'_>,
        out: &mut BytesMut,
        view: View,
    ) -> Result<Outcome, crate::store::StoreError> {
        let key = &meta.key[..];
        let flags = &meta.flags;
        let incr = flags.mode != Some(MetaMode::Decr);
        let expires_at = flags.ttl.map(|ttl| expiry(ttl, view.now));
        // Twice at most: a vivify that loses to another creator increments theirs.
        for _ in 0..2 {
            let arith = self
                .arith_inner(incr, key, flags.delta, flags.cas, expires_at, view)
                .await?;
            let (item, number, quiet) = match arith {
                Arith::Written(item, n) => (item, n, flags.quiet),
                Arith::Mismatch => {
                    self.meta_reply(out, meta, MetaCode::Ex, KEY_OPAQUE, None, b"", false);
                    return Ok(Outcome::NotStored);
                }
                Arith::Refused(reply) => {
                    reply.encode(out);
                    return Ok(Outcome::ClientError);
                }
                Arith::Missing => {
                    let Some(ttl) = flags.vivify else {
                        self.meta_reply(out, meta, MetaCode::Nf, KEY_OPAQUE, None, b"", false);
                        return Ok(Outcome::NotFound);
                    };
                    // As for mg, `T` wins over `N` for the new item's TTL.
                    let ttl = flags.ttl.unwrap_or(ttl);
                    let initial = flags.initial.to_string();
                    match self
                        .store_inner(StoreMode::Add, None, key, 0, ttl, initial.as_bytes(), view)
                        .await?
                    {
                        // memcached answers a vivified counter even under `q`.
                        StoreResult::Stored(item) => (item, flags.initial, false),
                        _ => continue,
                    }
                }
            };
            if !quiet {
                let meta_item = MetaItem {
                    cas: item.version,
                    flags: item.flags,
                    size: item.value.len(),
                    ttl: ttl_left(item.expires_at, view.now),
                };
                let mut text = itoa::Buffer::new();
                let (code, data) = if flags.value {
                    (MetaCode::Va, text.format(number).as_bytes())
                } else {
                    (MetaCode::Hd, &b""[..])
                };
                self.meta_reply(out, meta, code, MA_HIT, Some(meta_item), data, false);
            }
            return Ok(Outcome::Ok);
        }
        Err(crate::store::StoreError::Contention)
    }

    /// `me <key>`: what dynacache knows of the item (see the README).
    async fn meta_debug(
        &self,
        meta: &Meta<'_>,
        out: &mut BytesMut,
        view: View,
    ) -> Result<Outcome, crate::store::StoreError> {
        let key = &meta.key[..];
        let Some(value) = self.lookup(key, view).await? else {
            Reply::Line("EN").encode(out);
            return Ok(Outcome::Miss);
        };
        let mut num = itoa::Buffer::new();
        out.extend_from_slice(b"ME ");
        // A binary key is shown as sent (base64), as memcached shows keys stored with `b`.
        let printable = key.iter().all(|&b| b.is_ascii_graphic());
        out.extend_from_slice(if printable { key } else { meta.key_token });
        out.extend_from_slice(b" exp=");
        out.extend_from_slice(
            num.format(ttl_left(value.expires_at(), view.now))
                .as_bytes(),
        );
        out.extend_from_slice(b" cas=");
        out.extend_from_slice(num.format(value.version()).as_bytes());
        out.extend_from_slice(b" size=");
        out.extend_from_slice(num.format(key.len() + value.bytes().len()).as_bytes());
        out.extend_from_slice(b"\r\n");
        Ok(Outcome::Hit)
    }

    #[allow(clippy::too_many_arguments)]
    fn meta_reply(
        &self,
        out: &mut BytesMut,
        meta: &Meta<'_>,
        code: MetaCode,
        answers: &'static [u8],
        item: Option<MetaItem>,
        data: &[u8],
        win: bool,
    ) {
        Reply::Meta {
            code,
            flags: &meta.flags,
            answers,
            key: meta.key_token,
            item,
            data,
            win,
        }
        .encode(out);
    }
}

/// Seconds an item has left, -1 if it never expires (the `t` flag). An item
/// answered although already expired (`mg <key> t T-1` answers, then the item
/// is gone) shows -1 as well, as memcached shows it.
fn ttl_left(expires_at: u32, now: u32) -> i64 {
    match expires_at {
        0 => -1,
        at if at <= now => -1,
        at => i64::from(at) - i64::from(now),
    }
}
