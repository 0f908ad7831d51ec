//! The classic text commands: storage (`set`, `add`, `replace`, `append`,
//! `prepend`, `cas`), retrieval (`get`, `gets`, `gat`, `gats`), `delete`,
//! `touch`, `incr`/`decr` and the operator commands (`flush_all`, `stats`,
//! `verbosity`, `cache_memlimit`). Each parser reads the tokens after the
//! command name, which the dispatch (`parse`) has split off, and answers one
//! [`Parsed`].
//!
//! The rules follow memcached 1.6's text parser (`proto_text.c`), checked
//! byte for byte against Debian's memcached 1.6.18: a wrong token count is
//! `ERROR`, and a storage command whose line is malformed leaves its data
//! block to be read as the next command, as memcached does.

use super::command::{Command, Keys, StatsGroup, StoreMode};
use super::parsed::{BAD_FORMAT, Limits, Parsed, invalid};
use super::reply::Reply;
use super::token::{KEY_MAX_LEN, Tokens, data_block, exptime_token, number};

const BAD_CHUNK: Reply<'static> = Reply::ClientError("bad data chunk");
const BAD_EXPTIME: Reply<'static> = Reply::ClientError("invalid exptime argument");
const BAD_DELTA: Reply<'static> = Reply::ClientError("invalid numeric delta argument");
const DELETE_USAGE: Reply<'static> =
    Reply::ClientError("bad command line format.  Usage: delete <key> [noreply]");

/// Most tokens any command here takes (`cas` later: 7); longer lines are
/// retrieval commands, whose keys are read lazily from the line.
const MAX_TOKENS: usize = 8;

/// `get|gets <key>+`: the keys are the rest of the line.
pub(super) fn get(cas: bool, tokens: Tokens<'_>, line_len: usize) -> Parsed<'_> {
    retrieval(cas, None, tokens.rest(), line_len)
}

/// `gat|gats <exptime> <key>+`.
pub(super) fn gat(cas: bool, mut tokens: Tokens<'_>, line_len: usize) -> Parsed<'_> {
    let Some(exptime) = tokens.next() else {
        return invalid(Reply::Error, line_len, false);
    };
    let Some(exptime) = exptime_token(exptime) else {
        return invalid(BAD_EXPTIME, line_len, false);
    };
    retrieval(cas, Some(exptime), tokens.rest(), line_len)
}

/// `get|gets|gat|gats`: the keys are the rest of the line.
fn retrieval(cas: bool, touch: Option<i32>, keys: &[u8], line_len: usize) -> Parsed<'_> {
    let mut any = false;
    for key in Keys(keys).iter() {
        if key.len() > KEY_MAX_LEN {
            return invalid(BAD_FORMAT, line_len, false);
        }
        any = true;
    }
    // memcached: `get` alone is an error; `gat <exptime>` alone is an empty answer.
    if !any && touch.is_none() {
        return invalid(Reply::Error, line_len, false);
    }
    Parsed::Request(
        Command::Get {
            keys: Keys(keys),
            cas,
            touch,
        },
        line_len,
    )
}

/// `set|add <key> <flags> <exptime> <bytes> [noreply]` and its data block.
pub(super) fn storage<'a>(
    mode: StoreMode,
    tokens: Tokens<'a>,
    after_line: &'a [u8],
    line_len: usize,
    limits: &Limits,
) -> Parsed<'a> {
    let mut args = [&b""[..]; MAX_TOKENS];
    let n = tokens.collect_into(&mut args);
    // memcached: 4 arguments (5 for cas), and one more that is ignored
    // unless it is "noreply".
    let base = if matches!(mode, StoreMode::Cas(_)) {
        5
    } else {
        4
    };
    if n != base && n != base + 1 {
        return invalid(Reply::Error, line_len, false);
    }
    let noreply = n == base + 1 && args[base] == b"noreply";
    let key = args[0];
    if key.len() > KEY_MAX_LEN {
        return invalid(BAD_FORMAT, line_len, noreply);
    }
    let (Some(flags), Some(exptime), Some(len)) = (
        // memcached reads flags as 64 bits and keeps the low 32.
        number::<u64>(args[1]).map(|wide| wide as u32),
        exptime_token(args[2]),
        number::<i64>(args[3]),
    ) else {
        return invalid(BAD_FORMAT, line_len, noreply);
    };
    let mode = match mode {
        StoreMode::Cas(_) => match number::<u64>(args[4]) {
            Some(unique) => StoreMode::Cas(unique),
            None => return invalid(BAD_FORMAT, line_len, noreply),
        },
        other => other,
    };
    // memcached keeps `<bytes> + 2` in an int.
    if !(0..=i64::from(i32::MAX) - 2).contains(&len) {
        return invalid(BAD_FORMAT, line_len, noreply);
    }
    let len = len as usize;
    if key.len() + len + limits.item_overhead > limits.item_size_max {
        return Parsed::TooLarge {
            mode,
            key,
            len: line_len,
            discard: len as u64 + 2,
            noreply,
        };
    }
    match data_block(after_line, len) {
        Ok((_, (data, true))) => Parsed::Request(
            Command::Store {
                mode,
                key,
                flags,
                exptime,
                data,
                noreply,
            },
            line_len + len + 2,
        ),
        // memcached consumes `<bytes> + 2` and reports the block as bad.
        Ok((_, (_, false))) => invalid(BAD_CHUNK, line_len + len + 2, noreply),
        Err(_) => Parsed::Incomplete,
    }
}

/// `delete <key> [0] [noreply]`: memcached still accepts the old hold time if it is 0.
pub(super) fn delete<'a>(tokens: Tokens<'a>, line_len: usize) -> Parsed<'a> {
    let mut args = [&b""[..]; MAX_TOKENS];
    let n = tokens.collect_into(&mut args);
    if !(1..=3).contains(&n) {
        return invalid(Reply::Error, line_len, false);
    }
    let noreply = n > 1 && args[n - 1] == b"noreply";
    if n > 1 {
        let hold_is_zero = args[1] == b"0";
        let valid = (n == 2 && (hold_is_zero || noreply)) || (n == 3 && hold_is_zero && noreply);
        if !valid {
            return invalid(DELETE_USAGE, line_len, noreply);
        }
    }
    let key = args[0];
    if key.len() > KEY_MAX_LEN {
        return invalid(BAD_FORMAT, line_len, noreply);
    }
    Parsed::Request(Command::Delete { key, noreply }, line_len)
}

/// `touch <key> <exptime> [noreply]`.
pub(super) fn touch<'a>(tokens: Tokens<'a>, line_len: usize) -> Parsed<'a> {
    match key_and_number(tokens, exptime_token, BAD_EXPTIME) {
        Ok((key, exptime, noreply)) => Parsed::Request(
            Command::Touch {
                key,
                exptime,
                noreply,
            },
            line_len,
        ),
        Err((reply, noreply)) => invalid(reply, line_len, noreply),
    }
}

/// `incr|decr <key> <delta> [noreply]`.
pub(super) fn arith<'a>(incr: bool, tokens: Tokens<'a>, line_len: usize) -> Parsed<'a> {
    match key_and_number(tokens, number::<u64>, BAD_DELTA) {
        Ok((key, delta, noreply)) => Parsed::Request(
            Command::Arith {
                incr,
                key,
                delta,
                noreply,
            },
            line_len,
        ),
        Err((reply, noreply)) => invalid(reply, line_len, noreply),
    }
}

/// `<key> <number> [noreply]`, the shape of `touch`, `incr` and `decr`;
/// `read` reads the number, `bad_number` is memcached's reply to one it
/// cannot read. An error is the reply to send and whether the client asked
/// for none.
fn key_and_number<'a, T>(
    tokens: Tokens<'a>,
    read: fn(&[u8]) -> Option<T>,
    bad_number: Reply<'static>,
) -> Result<(&'a [u8], T, bool), (Reply<'static>, bool)> {
    let mut args = [&b""[..]; MAX_TOKENS];
    let n = tokens.collect_into(&mut args);
    if n != 2 && n != 3 {
        return Err((Reply::Error, false));
    }
    let noreply = n == 3 && args[2] == b"noreply";
    let key = args[0];
    if key.len() > KEY_MAX_LEN {
        return Err((BAD_FORMAT, noreply));
    }
    match read(args[1]) {
        Some(number) => Ok((key, number, noreply)),
        None => Err((bad_number, noreply)),
    }
}

/// `flush_all [delay] [noreply]`.
pub(super) fn flush_all<'a>(tokens: Tokens<'a>, line_len: usize) -> Parsed<'a> {
    let mut args = [&b""[..]; MAX_TOKENS];
    let n = tokens.collect_into(&mut args);
    if n > 2 {
        return invalid(Reply::Error, line_len, false);
    }
    let noreply = n > 0 && args[n - 1] == b"noreply";
    let delay = match (n, noreply) {
        (0, _) | (1, true) => 0,
        _ => match exptime_token(args[0]) {
            Some(delay) => delay,
            None => return invalid(BAD_EXPTIME, line_len, noreply),
        },
    };
    Parsed::Request(Command::FlushAll { delay, noreply }, line_len)
}

/// `stats [group ...]`; memcached answers `ERROR` to groups it does not know.
pub(super) fn stats<'a>(mut tokens: Tokens<'a>, line_len: usize) -> Parsed<'a> {
    let group = match tokens.next() {
        None => StatsGroup::General,
        Some(b"settings") => StatsGroup::Settings,
        Some(b"items") => StatsGroup::Items,
        Some(b"slabs") => StatsGroup::Slabs,
        Some(b"sizes") => StatsGroup::Sizes,
        Some(b"conns") => StatsGroup::Conns,
        Some(b"reset") => StatsGroup::Reset,
        Some(b"detail") => match tokens.next() {
            Some(b"dump") => StatsGroup::Detail { dump: true },
            Some(b"on" | b"off") => StatsGroup::Detail { dump: false },
            _ => {
                return invalid(
                    Reply::ClientError("usage: stats detail on|off|dump"),
                    line_len,
                    false,
                );
            }
        },
        Some(b"cachedump") => StatsGroup::Cachedump,
        Some(b"hotkeys") => StatsGroup::HotKeys,
        Some(_) => return invalid(Reply::Error, line_len, false),
    };
    Parsed::Request(Command::Stats(group), line_len)
}

/// `verbosity <level> [noreply]`.
pub(super) fn verbosity<'a>(tokens: Tokens<'a>, line_len: usize) -> Parsed<'a> {
    let mut args = [&b""[..]; MAX_TOKENS];
    let n = tokens.collect_into(&mut args);
    if n != 1 && n != 2 {
        return invalid(Reply::Error, line_len, false);
    }
    let noreply = args[n - 1] == b"noreply";
    if number::<u32>(args[0]).is_none() {
        return invalid(BAD_FORMAT, line_len, noreply);
    }
    Parsed::Request(Command::Verbosity { noreply }, line_len)
}

/// `cache_memlimit <megabytes> [noreply]`.
pub(super) fn cache_memlimit<'a>(tokens: Tokens<'a>, line_len: usize) -> Parsed<'a> {
    let mut args = [&b""[..]; MAX_TOKENS];
    let n = tokens.collect_into(&mut args);
    if n != 1 && n != 2 {
        return invalid(Reply::Error, line_len, false);
    }
    let noreply = n == 2 && args[1] == b"noreply";
    match number::<u32>(args[0]) {
        Some(mb) => Parsed::Request(
            Command::CacheMemlimit {
                megabytes: u64::from(mb),
                noreply,
            },
            line_len,
        ),
        None => invalid(Reply::Error, line_len, noreply),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::parse;

    fn p(buf: &[u8]) -> Parsed<'_> {
        parse(buf, &Limits::default())
    }

    fn keys_of(parsed: Parsed<'_>) -> Vec<Vec<u8>> {
        match parsed {
            Parsed::Request(Command::Get { keys, .. }, _) => {
                keys.iter().map(<[u8]>::to_vec).collect()
            }
            other => panic!("not a get: {other:?}"),
        }
    }

    #[test]
    fn get_with_many_keys_and_extra_spaces() {
        let buf = b"get a  bb ccc\r\n";
        assert_eq!(
            keys_of(p(buf)),
            vec![b"a".to_vec(), b"bb".to_vec(), b"ccc".to_vec()]
        );
        match p(buf) {
            Parsed::Request(
                Command::Get {
                    cas: false,
                    touch: None,
                    ..
                },
                len,
            ) => assert_eq!(len, buf.len()),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn gets_and_bare_newline() {
        match p(b"gets k\nrest") {
            Parsed::Request(
                Command::Get {
                    cas: true,
                    keys,
                    touch: None,
                },
                7,
            ) => {
                assert_eq!(keys.iter().collect::<Vec<_>>(), vec![&b"k"[..]])
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn get_without_keys_is_error() {
        assert_eq!(p(b"get\r\n"), invalid(Reply::Error, 5, false));
        assert_eq!(p(b"get   \r\n"), invalid(Reply::Error, 8, false));
    }

    #[test]
    fn exptime_is_cut_to_32_bits_as_memcached_stores_it() {
        let cases: [(&[u8], Option<i32>); 8] = [
            (b"0", Some(0)),
            (b"-1", Some(-1)),
            (b"2147483648", Some(i32::MIN)),
            (b"4294967295", Some(-1)),
            (b"4294967296", Some(0)),
            (b"4294967396", Some(100)),
            (b"-2147483649", Some(i32::MAX)),
            (b"99999999999999999999", None),
        ];
        for (token, want) in cases {
            assert_eq!(
                exptime_token(token),
                want,
                "{}",
                String::from_utf8_lossy(token)
            );
        }
        match p(b"set k 0 4294967396 1\r\nx\r\n") {
            Parsed::Request(Command::Store { exptime, .. }, _) => assert_eq!(exptime, 100),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            p(b"set k 0 99999999999999999999 1\r\nx\r\n"),
            invalid(BAD_FORMAT, 32, false)
        );
    }

    #[test]
    fn key_length_limit() {
        let ok = format!("get {}\r\n", "k".repeat(250));
        assert!(matches!(p(ok.as_bytes()), Parsed::Request(..)));
        let long = format!("get x {}\r\n", "k".repeat(251));
        assert_eq!(p(long.as_bytes()), invalid(BAD_FORMAT, long.len(), false));
        let set = format!("set {} 0 0 1\r\nx\r\n", "k".repeat(251));
        // The data line is not consumed: memcached then reads it as a command.
        assert_eq!(p(set.as_bytes()), invalid(BAD_FORMAT, set.len() - 3, false));
    }

    #[test]
    fn set_parses_fields_and_data() {
        let buf = b"set k 42 -1 5 noreply\r\nhello\r\nget k\r\n";
        match p(buf) {
            Parsed::Request(
                Command::Store {
                    mode: StoreMode::Set,
                    key,
                    flags,
                    exptime,
                    data,
                    noreply,
                },
                len,
            ) => {
                assert_eq!(
                    (key, flags, exptime, data, noreply),
                    (&b"k"[..], 42, -1, &b"hello"[..], true)
                );
                assert_eq!(len, buf.len() - b"get k\r\n".len());
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn fifth_argument_other_than_noreply_is_ignored() {
        assert!(matches!(
            p(b"add k 0 0 1 garbage\r\nx\r\n"),
            Parsed::Request(
                Command::Store {
                    mode: StoreMode::Add,
                    noreply: false,
                    ..
                },
                24
            )
        ));
        assert_eq!(
            p(b"set k 0 0 1 noreply extra\r\n"),
            invalid(Reply::Error, 27, false)
        );
        assert_eq!(p(b"set k 0 0\r\n"), invalid(Reply::Error, 11, false));
    }

    #[test]
    fn set_waits_for_whole_data_block() {
        assert_eq!(p(b"set k 0 0 5\r\nhel"), Parsed::Incomplete);
        assert_eq!(p(b"set k 0 0 5\r\nhello\r"), Parsed::Incomplete);
        assert_eq!(p(b"set k 0 0 5"), Parsed::Incomplete);
    }

    #[test]
    fn bad_data_chunk_consumes_length_plus_two() {
        // memcached reads 5 bytes "xyzab", rejects them, then parses "\r\n" as a command.
        assert_eq!(
            p(b"set a 0 0 3\r\nxyzab\r\n"),
            invalid(BAD_CHUNK, 18, false)
        );
        assert_eq!(
            p(b"set a 0 0 3 noreply\r\nxyzab\r\n"),
            invalid(BAD_CHUNK, 26, true)
        );
    }

    #[test]
    fn bad_numbers() {
        for line in [
            &b"set a 0 abc 1\r\n"[..],
            b"set a -1 0 1\r\n",
            b"set a 18446744073709551616 0 1\r\n",
            b"set a 0 0 -1\r\n",
            b"set a 0 0 2147483646\r\n",
            b"set a 0 0 1x\r\n",
        ] {
            assert_eq!(p(line), invalid(BAD_FORMAT, line.len(), false), "{line:?}");
        }
        // strtol accepts a plus sign and leading zeros.
        assert!(matches!(
            p(b"set a +7 0 01\r\nx\r\n"),
            Parsed::Request(Command::Store { flags: 7, .. }, _)
        ));
        // Flags are read as 64 bits and cut to 32, as memcached stores them.
        assert!(matches!(
            p(b"set a 4294967297 0 1\r\nx\r\n"),
            Parsed::Request(Command::Store { flags: 1, .. }, _)
        ));
        assert_eq!(p(b"touch a abc\r\n"), invalid(BAD_EXPTIME, 13, false));
    }

    #[test]
    fn too_large_is_discarded_not_buffered() {
        let limits = Limits {
            item_size_max: 100,
            ..Limits::default()
        };
        // 1 byte key + 99 bytes fits; 100 does not.
        assert!(matches!(
            parse(b"set k 0 0 99\r\n", &limits),
            Parsed::Incomplete
        ));
        assert_eq!(
            parse(b"set k 0 0 100 noreply\r\n", &limits),
            Parsed::TooLarge {
                mode: StoreMode::Set,
                key: b"k",
                len: 23,
                discard: 102,
                noreply: true
            }
        );
        // A 2 GB length is answered at once.
        assert!(matches!(
            parse(b"set k 0 0 2147483645\r\n", &limits),
            Parsed::TooLarge {
                discard: 2147483647,
                ..
            }
        ));
    }

    #[test]
    fn delete_forms() {
        assert_eq!(
            p(b"delete a\r\n"),
            Parsed::Request(
                Command::Delete {
                    key: b"a",
                    noreply: false
                },
                10
            )
        );
        assert_eq!(
            p(b"delete a 0\r\n"),
            Parsed::Request(
                Command::Delete {
                    key: b"a",
                    noreply: false
                },
                12
            )
        );
        assert_eq!(
            p(b"delete a noreply\r\n"),
            Parsed::Request(
                Command::Delete {
                    key: b"a",
                    noreply: true
                },
                18
            )
        );
        assert_eq!(
            p(b"delete a 0 noreply\r\n"),
            Parsed::Request(
                Command::Delete {
                    key: b"a",
                    noreply: true
                },
                20
            )
        );
        assert_eq!(p(b"delete a 1\r\n"), invalid(DELETE_USAGE, 12, false));
        assert_eq!(
            p(b"delete a 1 noreply\r\n"),
            invalid(DELETE_USAGE, 20, true)
        );
        assert_eq!(p(b"delete\r\n"), invalid(Reply::Error, 8, false));
        assert_eq!(p(b"delete a b c d\r\n"), invalid(Reply::Error, 16, false));
    }

    #[test]
    fn touch_forms() {
        assert_eq!(
            p(b"touch a 10 noreply\r\n"),
            Parsed::Request(
                Command::Touch {
                    key: b"a",
                    exptime: 10,
                    noreply: true
                },
                20
            )
        );
        assert_eq!(p(b"touch a 10 20 30\r\n"), invalid(Reply::Error, 18, false));
    }

    #[test]
    fn cas_needs_its_unique() {
        assert!(matches!(
            p(b"cas k 1 2 1 99 noreply\r\nx\r\n"),
            Parsed::Request(
                Command::Store {
                    mode: StoreMode::Cas(99),
                    noreply: true,
                    ..
                },
                27
            )
        ));
        // Without the unique, the line is an unknown form; the data line follows as a command.
        assert_eq!(p(b"cas k 0 0 1\r\ny\r\n"), invalid(Reply::Error, 13, false));
        assert_eq!(p(b"cas k 0 0 1 abc\r\n"), invalid(BAD_FORMAT, 17, false));
        assert_eq!(p(b"cas k 0 0 1 -1\r\n"), invalid(BAD_FORMAT, 16, false));
    }

    #[test]
    fn gat_forms() {
        match p(b"gats 10 a b\r\n") {
            Parsed::Request(
                Command::Get {
                    keys,
                    cas: true,
                    touch: Some(10),
                },
                13,
            ) => {
                assert_eq!(keys.iter().count(), 2)
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            p(b"gat 10\r\n"),
            Parsed::Request(
                Command::Get {
                    touch: Some(10),
                    ..
                },
                8
            )
        ));
        assert_eq!(p(b"gat\r\n"), invalid(Reply::Error, 5, false));
        assert_eq!(p(b"gat x k\r\n"), invalid(BAD_EXPTIME, 9, false));
    }

    #[test]
    fn arith_forms() {
        assert_eq!(
            p(b"incr n 18446744073709551615 noreply\r\n"),
            Parsed::Request(
                Command::Arith {
                    incr: true,
                    key: b"n",
                    delta: u64::MAX,
                    noreply: true
                },
                37
            )
        );
        assert_eq!(
            p(b"decr n 18446744073709551616\r\n"),
            invalid(BAD_DELTA, 29, false)
        );
        assert_eq!(p(b"incr n -1\r\n"), invalid(BAD_DELTA, 11, false));
        assert_eq!(p(b"incr n\r\n"), invalid(Reply::Error, 8, false));
    }

    #[test]
    fn flush_all_forms() {
        let flush = |delay, noreply| Command::FlushAll { delay, noreply };
        assert_eq!(p(b"flush_all\r\n"), Parsed::Request(flush(0, false), 11));
        assert_eq!(
            p(b"flush_all noreply\r\n"),
            Parsed::Request(flush(0, true), 19)
        );
        assert_eq!(
            p(b"flush_all 10 noreply\r\n"),
            Parsed::Request(flush(10, true), 22)
        );
        assert_eq!(
            p(b"flush_all -1\r\n"),
            Parsed::Request(flush(-1, false), 14)
        );
        assert_eq!(p(b"flush_all abc\r\n"), invalid(BAD_EXPTIME, 15, false));
        assert_eq!(p(b"flush_all 1 2 3\r\n"), invalid(Reply::Error, 17, false));
    }

    #[test]
    fn stats_and_operator_forms() {
        assert_eq!(
            p(b"stats\r\n"),
            Parsed::Request(Command::Stats(StatsGroup::General), 7)
        );
        assert_eq!(
            p(b"stats settings x\r\n"),
            Parsed::Request(Command::Stats(StatsGroup::Settings), 18)
        );
        assert_eq!(
            p(b"stats detail dump\r\n"),
            Parsed::Request(Command::Stats(StatsGroup::Detail { dump: true }), 19)
        );
        assert_eq!(p(b"stats bogus\r\n"), invalid(Reply::Error, 13, false));
        assert_eq!(
            p(b"stats detail\r\n"),
            invalid(
                Reply::ClientError("usage: stats detail on|off|dump"),
                14,
                false
            )
        );
        assert_eq!(p(b"verbosity\r\n"), invalid(Reply::Error, 11, false));
        assert_eq!(p(b"verbosity a\r\n"), invalid(BAD_FORMAT, 13, false));
        assert_eq!(
            p(b"verbosity 1 noreply\r\n"),
            Parsed::Request(Command::Verbosity { noreply: true }, 21)
        );
        assert_eq!(
            p(b"cache_memlimit abc\r\n"),
            invalid(Reply::Error, 20, false)
        );
        assert_eq!(
            p(b"cache_memlimit 64\r\n"),
            Parsed::Request(
                Command::CacheMemlimit {
                    megabytes: 64,
                    noreply: false
                },
                19
            )
        );
    }
}
