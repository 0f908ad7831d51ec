//! Meta commands (`mg`, `ms`, `md`, `ma`, `me`) on the classic commands'
//! paths: `mg` is the get path (or a touch through the write path with
//! `T`), `ms` a storage write, `ma` the arithmetic of `incr`, `md` a delete
//! (only of that version with `C`). Which replies `q` hides follows
//! memcached 1.6.18: `mg` hides `EN`, `ms` and `md` hide `HD`, `ma` hides the
//! answer to a counter that existed.

use bytes::BytesMut;

use super::write::{Done, Op, Refusal};
use super::{Engine, REPLY_HEAD, error_reply, expiry};
use crate::metrics::{Event, Outcome};
use crate::output::Output;
use crate::protocol::{Meta, MetaCmd, MetaCode, MetaItem, MetaMode, Reply, StoreMode};
use crate::store::{Item, Store, StoreError, View};

/// The return flags each reply answers (`h` and `l` are never answered).
const MG_HIT: &[u8] = b"cfkOst";
const KEY_OPAQUE: &[u8] = b"kO";
const MS: &[u8] = b"ckO";
const MA_HIT: &[u8] = b"ckOt";

impl<S: Store> Engine<S> {
    pub(super) async fn meta(&self, meta: Meta<'_>, out: &mut Output<'_>, view: View) -> Outcome {
        let key = &meta.key[..];
        if let Err(e) = self.check_key(key) {
            return error_reply(out.buf(), &e);
        }
        let result = match meta.cmd {
            MetaCmd::Get => self.meta_get(&meta, out, view).await,
            MetaCmd::Set => self.meta_set(&meta, out, view).await,
            MetaCmd::Delete => self.meta_delete(&meta, out, view).await,
            MetaCmd::Arith => self.meta_arith(&meta, out, view).await,
            MetaCmd::Debug => self.meta_debug(&meta, out, view).await,
        };
        result.unwrap_or_else(|e| error_reply(out.buf(), &e))
    }

    async fn meta_get(
        &self,
        meta: &Meta<'_>,
        out: &mut Output<'_>,
        view: View,
    ) -> Result<Outcome, StoreError> {
        let key = &meta.key[..];
        let flags = &meta.flags;
        let mut found = match flags.ttl {
            Some(ttl) => {
                self.counters.record(Event::CmdTouch);
                self.count_read(key);
                let op = Op::Touch {
                    expires_at: expiry(ttl, view.now),
                };
                match self.write(key, op, view).await? {
                    Done::Written(item) => {
                        self.counters.record(Event::GetHits);
                        Some(item)
                    }
                    Done::Refused(..) => {
                        self.counters.record(Event::GetMisses);
                        None
                    }
                }
            }
            None => {
                self.count_read(key);
                // A hit is answered from the cache in place, as `get`'s are.
                let now_ms = self.now_ms();
                let lookup = self
                    .hit_in_place(key, view, now_ms, out, |entry, buf| {
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
                        meta_reply(buf, meta, code, MG_HIT, Some(item), data, false);
                    })
                    .await;
                match lookup {
                    Ok(_) => {
                        self.count_hit(key);
                        self.counters.record(Event::GetHits);
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
            let op = Op::Store {
                mode: StoreMode::Add,
                flags: 0,
                expires_at: expiry(flags.ttl.unwrap_or(ttl), view.now),
                data: b"",
                cas: None,
            };
            match self.write(key, op, view).await? {
                Done::Written(item) => {
                    win = true;
                    found = Some(item);
                }
                Done::Refused(..) => found = self.lookup(key, view).await?,
            }
        }
        let Some(item) = found else {
            if !flags.quiet {
                meta_reply(out.buf(), meta, MetaCode::En, KEY_OPAQUE, None, b"", false);
            }
            return Ok(Outcome::Miss);
        };
        let (code, data) = if flags.value {
            (MetaCode::Va, &item.value[..])
        } else {
            (MetaCode::Hd, &b""[..])
        };
        out.make_room(data.len() + key.len() + REPLY_HEAD).await;
        meta_reply(
            out.buf(),
            meta,
            code,
            MG_HIT,
            Some(meta_item(&item, view)),
            data,
            win,
        );
        Ok(Outcome::Hit)
    }

    async fn meta_set(
        &self,
        meta: &Meta<'_>,
        out: &mut Output<'_>,
        view: View,
    ) -> Result<Outcome, StoreError> {
        let flags = &meta.flags;
        self.counters.record(Event::CmdSet);
        let mode = match flags.mode.unwrap_or_default() {
            MetaMode::Add => StoreMode::Add,
            MetaMode::Replace => StoreMode::Replace,
            MetaMode::Append => StoreMode::Append,
            MetaMode::Prepend => StoreMode::Prepend,
            _ => StoreMode::Set,
        };
        // `C` with `ME` is ignored (memcached adds or refuses, whatever the cas).
        let cas = flags.cas.filter(|_| mode != StoreMode::Add);
        let op = Op::Store {
            mode,
            flags: flags.client_flags,
            expires_at: expiry(flags.ttl.unwrap_or(0), view.now),
            data: meta.data,
            cas,
        };
        let (code, outcome, cas) = match self.write(&meta.key, op, view).await? {
            Done::Written(item) => (MetaCode::Hd, Outcome::Stored, item.version),
            Done::Refused(Refusal::Exists, _) => (MetaCode::Ex, Outcome::NotStored, 0),
            Done::Refused(Refusal::NotFound, _) => (MetaCode::Nf, Outcome::NotFound, 0),
            Done::Refused(..) => (MetaCode::Ns, Outcome::NotStored, 0),
        };
        if !(flags.quiet && code == MetaCode::Hd) {
            let item = MetaItem {
                cas,
                flags: 0,
                size: 0,
                ttl: 0,
            };
            meta_reply(out.buf(), meta, code, MS, Some(item), b"", false);
        }
        Ok(outcome)
    }

    async fn meta_delete(
        &self,
        meta: &Meta<'_>,
        out: &mut Output<'_>,
        view: View,
    ) -> Result<Outcome, StoreError> {
        // `I` (invalidate) deletes too: see the README.
        let op = Op::Delete {
            cas: meta.flags.cas,
        };
        let (code, outcome) = match self.write(&meta.key, op, view).await? {
            Done::Written(_) => (MetaCode::Hd, Outcome::Deleted),
            Done::Refused(Refusal::Exists, _) => (MetaCode::Ex, Outcome::NotStored),
            Done::Refused(..) => (MetaCode::Nf, Outcome::NotFound),
        };
        if !(meta.flags.quiet && code == MetaCode::Hd) {
            meta_reply(out.buf(), meta, code, KEY_OPAQUE, None, b"", false);
        }
        Ok(outcome)
    }

    async fn meta_arith(
        &self,
        meta: &Meta<'_>,
        out: &mut Output<'_>,
        view: View,
    ) -> Result<Outcome, StoreError> {
        let key = &meta.key[..];
        let flags = &meta.flags;
        let op = Op::Arith {
            incr: flags.mode != Some(MetaMode::Decr),
            delta: flags.delta,
            cas: flags.cas,
            expires_at: flags.ttl.map(|ttl| expiry(ttl, view.now)),
        };
        // Twice at most: a vivify that loses to another creator increments theirs.
        for _ in 0..2 {
            let (item, number, quiet) = match self.write(key, op, view).await? {
                Done::Written(item) => {
                    let n = super::write::parse_counter(&item.value).expect("written as a number");
                    (item, n, flags.quiet)
                }
                Done::Refused(Refusal::Exists, _) => {
                    meta_reply(out.buf(), meta, MetaCode::Ex, KEY_OPAQUE, None, b"", false);
                    return Ok(Outcome::NotStored);
                }
                Done::Refused(Refusal::NotANumber, _) => {
                    Reply::ClientError("cannot increment or decrement non-numeric value")
                        .encode(out.buf());
                    return Ok(Outcome::ClientError);
                }
                Done::Refused(..) => {
                    let Some(ttl) = flags.vivify else {
                        meta_reply(out.buf(), meta, MetaCode::Nf, KEY_OPAQUE, None, b"", false);
                        return Ok(Outcome::NotFound);
                    };
                    // As for mg, `T` wins over `N` for the new item's TTL.
                    let initial = flags.initial.to_string();
                    let create = Op::Store {
                        mode: StoreMode::Add,
                        flags: 0,
                        expires_at: expiry(flags.ttl.unwrap_or(ttl), view.now),
                        data: initial.as_bytes(),
                        cas: None,
                    };
                    match self.write(key, create, view).await? {
                        // memcached answers a vivified counter even under `q`.
                        Done::Written(item) => (item, flags.initial, false),
                        Done::Refused(..) => continue,
                    }
                }
            };
            if !quiet {
                let mut text = itoa::Buffer::new();
                let (code, data) = if flags.value {
                    (MetaCode::Va, text.format(number).as_bytes())
                } else {
                    (MetaCode::Hd, &b""[..])
                };
                meta_reply(
                    out.buf(),
                    meta,
                    code,
                    MA_HIT,
                    Some(meta_item(&item, view)),
                    data,
                    false,
                );
            }
            return Ok(Outcome::Ok);
        }
        Err(StoreError::Contention)
    }

    /// `me <key>`: what dynacache knows of the item (see the README).
    async fn meta_debug(
        &self,
        meta: &Meta<'_>,
        out: &mut Output<'_>,
        view: View,
    ) -> Result<Outcome, StoreError> {
        let key = &meta.key[..];
        let Some(item) = self.lookup(key, view).await? else {
            Reply::MetaMiss.encode(out.buf());
            return Ok(Outcome::Miss);
        };
        // A binary key is shown as sent (base64), as memcached shows keys stored with `b`.
        let printable = key.iter().all(|&b| b.is_ascii_graphic());
        Reply::MetaDebug {
            key: if printable { key } else { meta.key_token },
            ttl: ttl_left(item.expires_at, view.now),
            cas: item.version,
            size: key.len() + item.value.len(),
        }
        .encode(out.buf());
        Ok(Outcome::Hit)
    }
}

fn meta_item(item: &Item, view: View) -> MetaItem {
    MetaItem {
        cas: item.version,
        flags: item.flags,
        size: item.value.len(),
        ttl: ttl_left(item.expires_at, view.now),
    }
}

fn meta_reply(
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
