//! The meta command parsers (memcached 1.6): `mg`, `ms`, `md`, `ma`, `me`
//! (`mn` is answered by the dispatch, `parse`). They build the request types
//! of `command` ([`Meta`], [`MetaFlags`]): flags are read into a small fixed
//! struct that borrows from the request line, and only a base64 key (`b`) is
//! decoded into an allocation.
//!
//! The flag rules follow memcached 1.6.18's `_meta_flag_preparse`, checked
//! against Debian's memcached: a flag letter may appear once; an unknown
//! letter is `CLIENT_ERROR invalid flag` (`invalid or duplicate flag` for
//! `md` and `ma`, which report every flag error that way); a bad number is
//! `bad token in command line format`; `ms` swallows its data block after a
//! flag error.

use std::borrow::Cow;

use base64::Engine as _;
use base64::alphabet;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};

use super::command::{Command, Meta, MetaCmd, MetaFlags, MetaMode, StoreMode};
use super::parsed::{BAD_FORMAT, Limits, Parsed, invalid};
use super::reply::Reply;
use super::token::{KEY_MAX_LEN, Tokens, data_block, exptime_token, number};

const BAD_TOKEN: &str = "bad token in command line format";
const MD_MA_FLAG_ERROR: Reply<'static> = Reply::ClientError("invalid or duplicate flag");

/// `mg|ms|md|ma|me <key> ...`: `tokens` follow the command name.
pub(super) fn meta<'a>(
    cmd: MetaCmd,
    mut tokens: Tokens<'a>,
    after_line: &'a [u8],
    line_len: usize,
    limits: &Limits,
) -> Parsed<'a> {
    let Some(key_token) = tokens.next() else {
        return match cmd {
            MetaCmd::Debug => invalid(BAD_FORMAT, line_len, false),
            _ => invalid(Reply::Error, line_len, false),
        };
    };
    if key_token.len() > KEY_MAX_LEN {
        return invalid(BAD_FORMAT, line_len, false);
    }
    if cmd == MetaCmd::Debug {
        // `me <key> [b]`: other tokens are ignored.
        let base64 = tokens.any(|t| t == b"b");
        let key = if base64 {
            match decode_base64(key_token) {
                Some(key) => Cow::Owned(key),
                None => return invalid(DECODE_ERROR, line_len, false),
            }
        } else {
            Cow::Borrowed(key_token)
        };
        let mut flags = MetaFlags::default();
        flags.base64 = base64;
        return request(cmd, key, key_token, flags, b"", line_len);
    }
    // `ms <key> <datalen>`: the length comes before the flags; the data
    // block is swallowed after any later error.
    let mut block = None;
    if cmd == MetaCmd::Set {
        let Some(len) = tokens.next().and_then(number::<i64>) else {
            return invalid(BAD_FORMAT, line_len, false);
        };
        if !(0..=i64::from(i32::MAX) - 2).contains(&len) {
            return invalid(BAD_FORMAT, line_len, false);
        }
        let len = len as usize;
        let base64 = tokens.clone().any(|t| t.first() == Some(&b'b'));
        if key_token.len() + len + limits.item_overhead > limits.item_size_max {
            // A base64 key is not decoded here: the old item is then left as is.
            return Parsed::TooLarge {
                mode: if base64 {
                    StoreMode::Add
                } else {
                    StoreMode::Set
                },
                key: key_token,
                len: line_len,
                discard: len as u64 + 2,
                noreply: false,
            };
        }
        block = Some(match data_block(after_line, len) {
            Ok((_, (data, true))) => Ok(data),
            Ok((_, (_, false))) => Err(len),
            Err(_) => return Parsed::Incomplete,
        });
    }
    let total = line_len + block.map_or(0, |b| b.map_or_else(|len| len, <[u8]>::len) + 2);
    let flags = match parse_flags(cmd, tokens) {
        Ok(flags) => flags,
        Err(reply) => return invalid(reply, total, false),
    };
    // memcached decodes the key while reading the flags, before the data.
    let key = if flags.base64 {
        match decode_base64(key_token) {
            Some(key) => Cow::Owned(key),
            None if matches!(cmd, MetaCmd::Delete | MetaCmd::Arith) => {
                return invalid(MD_MA_FLAG_ERROR, total, false);
            }
            None => return invalid(DECODE_ERROR, total, false),
        }
    } else {
        Cow::Borrowed(key_token)
    };
    let data = match block {
        None => &b""[..],
        Some(Ok(data)) => data,
        Some(Err(_)) => {
            return invalid(Reply::ClientError("bad data chunk"), total, false);
        }
    };
    request(cmd, key, key_token, flags, data, total)
}

const DECODE_ERROR: Reply<'static> = Reply::ClientError("error decoding key");

fn request<'a>(
    cmd: MetaCmd,
    key: Cow<'a, [u8]>,
    key_token: &'a [u8],
    flags: MetaFlags<'a>,
    data: &'a [u8],
    len: usize,
) -> Parsed<'a> {
    Parsed::Request(
        Command::Meta(Meta {
            cmd,
            key,
            key_token,
            flags,
            data,
        }),
        len,
    )
}

/// The flags after the key (and `ms`'s length), as memcached 1.6.18 reads
/// them: hard errors (unknown or duplicate letter) stop at once; soft ones
/// (a bad number) are reported unless a hard one follows.
fn parse_flags<'a>(cmd: MetaCmd, tokens: Tokens<'a>) -> Result<MetaFlags<'a>, Reply<'static>> {
    let mut flags = MetaFlags::default();
    flags.delta = 1;
    let mut seen = [false; 128];
    let mut soft: Option<&'static str> = None;
    let md_ma = matches!(cmd, MetaCmd::Delete | MetaCmd::Arith);
    let hard = |msg: &'static str| {
        Err(if md_ma {
            MD_MA_FLAG_ERROR
        } else {
            Reply::ClientError(msg)
        })
    };
    for token in tokens {
        let letter = token[0];
        let arg = &token[1..];
        if letter >= 128 {
            return hard("invalid flag");
        }
        if seen[letter as usize] {
            return hard("duplicate flag");
        }
        seen[letter as usize] = true;
        match letter {
            b'b' => flags.base64 = true,
            b'q' => flags.quiet = true,
            b'v' => flags.value = true,
            b'c' | b'f' | b'k' | b's' | b't' => flags.push_echo(letter),
            b'O' => {
                if token.len() > 32 {
                    return hard("opaque token too long");
                }
                flags.opaque = arg;
                flags.push_echo(letter);
            }
            // Accepted, not answered: see the README.
            b'h' | b'l' | b'u' | b'P' | b'L' => {}
            b'I' => flags.invalidate = true,
            b'T' | b'N' | b'R' => match exptime_token(arg) {
                Some(n) => {
                    let n = Some(n);
                    match letter {
                        b'T' => flags.ttl = n,
                        b'N' => flags.vivify = n,
                        _ => flags.recache = n,
                    }
                }
                None => soft = Some(BAD_TOKEN),
            },
            b'C' => match number::<u64>(arg) {
                Some(n) => flags.cas = Some(n),
                None => soft = Some(BAD_TOKEN),
            },
            // memcached reads client flags as an unsigned long and keeps 32 bits.
            b'F' => match number::<u64>(arg) {
                Some(n) => flags.client_flags = n as u32,
                None => soft = Some("bad command line format"),
            },
            b'J' => match number::<u64>(arg) {
                Some(n) => flags.initial = n,
                None => soft = Some("invalid numeric initial value"),
            },
            b'D' => match number::<u64>(arg) {
                Some(n) => flags.delta = n,
                None => soft = Some("invalid numeric delta value"),
            },
            b'M' => {
                if token.len() != 2 {
                    soft = Some("incorrect length for M token");
                } else {
                    flags.mode = match (cmd, arg[0]) {
                        (MetaCmd::Set, b'S') => Some(MetaMode::Set),
                        (MetaCmd::Set, b'E') => Some(MetaMode::Add),
                        (MetaCmd::Set, b'R') => Some(MetaMode::Replace),
                        (MetaCmd::Set, b'A') => Some(MetaMode::Append),
                        (MetaCmd::Set, b'P') => Some(MetaMode::Prepend),
                        (MetaCmd::Arith, b'I' | b'+') => Some(MetaMode::Incr),
                        (MetaCmd::Arith, b'D' | b'-') => Some(MetaMode::Decr),
                        _ => None,
                    };
                }
            }
            _ => return hard("invalid flag"),
        }
    }
    if let Some(msg) = soft {
        return hard(msg);
    }
    // The mode is checked after the flags, by the command itself.
    if seen[b'M' as usize] && flags.mode.is_none() {
        return Err(match cmd {
            MetaCmd::Set => Reply::ClientError("invalid mode for ms M token"),
            MetaCmd::Arith => Reply::ClientError("invalid mode for ma M token"),
            _ => return Ok(flags),
        });
    }
    Ok(flags)
}

/// The base64 of meta keys (`b`): the standard alphabet, padded to a multiple
/// of 4 (`=` only at the end). Bits below the last whole byte are ignored, as
/// memcached's decoder ignores them (`YR==` is `a`, like `YQ==`).
const KEY_BASE64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new()
        .with_decode_padding_mode(DecodePaddingMode::RequireCanonical)
        .with_decode_allow_trailing_bits(true),
);

/// A base64 meta key decoded; None if malformed (empty, unpadded, a byte
/// outside the alphabet, `=` before the end), answered `error decoding key`.
///
/// memcached's decoder is looser: it skips bytes outside the alphabet and
/// stops at the first padded quad. dynacache refuses those keys instead; the
/// keys memcached refuses (`!!!`, an unpadded `m10`) it refuses too.
fn decode_base64(input: &[u8]) -> Option<Vec<u8>> {
    if input.is_empty() {
        return None;
    }
    KEY_BASE64.decode(input).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::parse;

    fn p(buf: &[u8]) -> Parsed<'_> {
        parse(buf, &Limits::default())
    }

    fn meta_of(parsed: Parsed<'_>) -> (Meta<'_>, usize) {
        match parsed {
            Parsed::Request(Command::Meta(meta), len) => (meta, len),
            other => panic!("not a meta request: {other:?}"),
        }
    }

    fn err(msg: &'static str, len: usize) -> Parsed<'static> {
        invalid(Reply::ClientError(msg), len, false)
    }

    #[test]
    fn mg_flags_keep_their_order() {
        let (m, len) = meta_of(p(b"mg k v f s k c t O123 q h l\r\n"));
        assert_eq!(len, 29);
        assert_eq!(m.cmd, MetaCmd::Get);
        assert_eq!(&m.key[..], b"k");
        assert!(matches!(m.key, Cow::Borrowed(_)), "no allocation");
        assert_eq!(m.flags.echo(), b"fskctO");
        assert_eq!(m.flags.opaque, b"123");
        assert!(m.flags.value && m.flags.quiet && !m.flags.base64);
        let (m, _) = meta_of(p(b"mg k T30 N-1 R+5\r\n"));
        assert_eq!(
            (m.flags.ttl, m.flags.vivify, m.flags.recache),
            (Some(30), Some(-1), Some(5))
        );
    }

    #[test]
    fn flag_errors() {
        assert_eq!(p(b"mg k v v\r\n"), err("duplicate flag", 10));
        assert_eq!(p(b"mg k x\r\n"), err("invalid flag", 8));
        assert_eq!(p(b"mg k noreply\r\n"), err("invalid flag", 14));
        assert_eq!(p(b"mg k E5\r\n"), err("invalid flag", 9));
        assert_eq!(p(b"mg k T\r\n"), err("bad token in command line format", 8));
        // A later hard error wins over an earlier bad number.
        assert_eq!(p(b"mg k T x\r\n"), err("invalid flag", 10));
        let long = format!("mg k O{}\r\n", "1".repeat(32));
        assert_eq!(p(long.as_bytes()), err("opaque token too long", long.len()));
        assert_eq!(p(b"md k x\r\n"), err("invalid or duplicate flag", 8));
        assert_eq!(p(b"ma k D-1\r\n"), err("invalid or duplicate flag", 10));
        assert_eq!(p(b"ma k Mi\r\n"), err("invalid mode for ma M token", 9));
        assert_eq!(p(b"mg\r\n"), invalid(Reply::Error, 4, false));
        assert_eq!(p(b"me\r\n"), invalid(BAD_FORMAT, 4, false));
        let key = format!("md {}\r\n", "k".repeat(251));
        assert_eq!(p(key.as_bytes()), invalid(BAD_FORMAT, key.len(), false));
    }

    #[test]
    fn ms_reads_length_flags_and_data() {
        let buf = b"ms k 2 T100 F4294967297 c k O1 MA C9 I\r\nhi\r\nmn\r\n";
        let (m, len) = meta_of(p(buf));
        assert_eq!(len, buf.len() - 4);
        assert_eq!(m.data, b"hi");
        let f = m.flags;
        assert_eq!(
            (f.ttl, f.client_flags, f.mode, f.cas, f.invalidate),
            (Some(100), 1, Some(MetaMode::Append), Some(9), true)
        );
        assert_eq!(f.echo(), b"ckO");
        assert_eq!(p(b"ms k 2 c\r\nh"), Parsed::Incomplete);
    }

    #[test]
    fn ms_errors_swallow_the_data_unless_the_line_is_bad() {
        // Bad line: the data line is then read as a command.
        assert_eq!(p(b"ms k\r\n"), invalid(BAD_FORMAT, 6, false));
        assert_eq!(p(b"ms k abc\r\nhi\r\n"), invalid(BAD_FORMAT, 10, false));
        assert_eq!(p(b"ms k -1\r\n"), invalid(BAD_FORMAT, 9, false));
        // Bad flags: `<len> + 2` bytes are swallowed.
        assert_eq!(p(b"ms k 2 x\r\nhi\r\n"), err("invalid flag", 14));
        assert_eq!(p(b"ms k 3 x\r\nabcde\r\n"), err("invalid flag", 15));
        assert_eq!(
            p(b"ms k 2 MX\r\nhi\r\n"),
            err("invalid mode for ms M token", 15)
        );
        assert_eq!(
            p(b"ms k 2 M\r\nhi\r\n"),
            err("incorrect length for M token", 14)
        );
        assert_eq!(
            p(b"ms k 2 Fabc\r\nhi\r\n"),
            err("bad command line format", 17)
        );
        assert_eq!(p(b"ms k 2 b\r\nhi\r\n"), err("error decoding key", 14));
        assert_eq!(p(b"ms k 3\r\nabcde\r\n"), err("bad data chunk", 13));
    }

    #[test]
    fn ms_too_large_is_discarded() {
        let limits = Limits {
            item_size_max: 100,
            ..Limits::default()
        };
        assert!(matches!(
            parse(b"ms k 100 T0\r\n", &limits),
            Parsed::TooLarge {
                key: b"k",
                len: 13,
                discard: 102,
                ..
            }
        ));
    }

    #[test]
    fn base64_keys() {
        let (m, _) = meta_of(p(b"ms bTEw 2 b k\r\nhi\r\n"));
        assert_eq!((&m.key[..], m.key_token), (&b"m10"[..], &b"bTEw"[..]));
        let (m, _) = meta_of(p(b"me YTE= b\r\n"));
        assert_eq!(&m.key[..], b"a1");
        assert_eq!(p(b"md m10 b\r\n"), err("invalid or duplicate flag", 10));
        assert_eq!(decode_base64(b"AAECAw=="), Some(vec![0, 1, 2, 3]));
        assert_eq!(decode_base64(b"YQ=="), Some(b"a".to_vec()));
        for bad in [&b"d1"[..], b"!!!!", b"Y===", b"YQ==YQ==", b""] {
            assert_eq!(decode_base64(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn ma_defaults_and_modes() {
        let (m, _) = meta_of(p(b"ma k\r\n"));
        assert_eq!((m.flags.delta, m.flags.mode), (1, None));
        let (m, _) = meta_of(p(b"ma k M- D7 N0 J5\r\n"));
        assert_eq!(
            (m.flags.delta, m.flags.mode, m.flags.vivify, m.flags.initial),
            (7, Some(MetaMode::Decr), Some(0), 5)
        );
    }

    #[test]
    fn base64_key_round_trips_and_refusals() {
        // RFC 4648's vectors, and keys of every byte and length.
        for (plain, encoded) in [
            (&b"f"[..], &b"Zg=="[..]),
            (b"fo", b"Zm8="),
            (b"foo", b"Zm9v"),
            (b"foob", b"Zm9vYg=="),
            (b"fooba", b"Zm9vYmE="),
            (b"foobar", b"Zm9vYmFy"),
        ] {
            assert_eq!(decode_base64(encoded).as_deref(), Some(plain));
        }
        let all: Vec<u8> = (0..=255).collect();
        for len in 1..=all.len() {
            let key = &all[all.len() - len..];
            let encoded = base64::engine::general_purpose::STANDARD.encode(key);
            assert_eq!(decode_base64(encoded.as_bytes()).as_deref(), Some(key));
        }
        // Bits below the last byte are ignored, as memcached ignores them.
        assert_eq!(decode_base64(b"YR=="), Some(b"a".to_vec()));
        assert_eq!(decode_base64(b"YWJ="), Some(b"ab".to_vec()));
        // Refused: empty, unpadded, outside the standard alphabet, `=` before
        // the end or more than two of them.
        for bad in [
            &b""[..],
            b"m10",
            b"YQ",
            b"YQ=",
            b"YWI",
            b"!!!",
            b"YQ==!",
            b"-_-_",
            b"YQ=a",
            b"Y=Q=",
            b"Y===",
            b"====",
            b"YQ==YQ==",
            b"YQ== ",
        ] {
            assert_eq!(decode_base64(bad), None, "{}", String::from_utf8_lossy(bad));
        }
        // The replies memcached gives to keys it cannot decode.
        assert_eq!(p(b"mg !!! b v\r\n"), err("error decoding key", 12));
        assert_eq!(p(b"me m10 b\r\n"), err("error decoding key", 10));
        assert_eq!(p(b"ms m10 2 b\r\nhi\r\n"), err("error decoding key", 16));
        assert_eq!(p(b"ma m10 b\r\n"), err("invalid or duplicate flag", 10));
    }
}
