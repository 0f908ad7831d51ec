//! The lexical layer under both parsers: request lines, space-separated
//! tokens, numbers as memcached's `strtol`/`strtoul` read them, and data
//! blocks. It knows no command: the classic and meta parsers (`classic`,
//! `meta`) and the dispatch (`parse`) build on it, and it depends on no other
//! module of the protocol.
//!
//! Token rules follow memcached 1.6's text parser (`proto_text.c`): tokens are
//! separated by one or more spaces and a trailing `\r` before `\n` is dropped.

use nom::bytes::streaming::{tag, take, take_until};
use nom::{IResult, Parser};

/// Longest key memcached accepts.
pub const KEY_MAX_LEN: usize = 250;

/// A request line up to its `\n` (streaming: `Incomplete` until one arrives),
/// without the `\n` and without one `\r` before it.
pub(super) fn line(input: &[u8]) -> IResult<&[u8], &[u8]> {
    let (rest, line) = take_until("\n")(input)?;
    let (rest, _) = tag("\n")(rest)?;
    Ok((rest, line.strip_suffix(b"\r").unwrap_or(line)))
}

/// A data block of exactly `len` bytes and its terminator (streaming).
/// Returns the block and whether it ended in `\r\n`.
pub(super) fn data_block(input: &[u8], len: usize) -> IResult<&[u8], (&[u8], bool)> {
    let (rest, (data, end)) = (take(len), take(2usize)).parse(input)?;
    Ok((rest, (data, end == b"\r\n")))
}

/// A decimal number as `strtol`/`strtoul` read it: optional sign, digits,
/// nothing after. Out of range for `T` is `None`.
pub(super) fn number<T: std::str::FromStr>(token: &[u8]) -> Option<T> {
    let digits = token.strip_prefix(b"+").unwrap_or(token);
    if digits.is_empty() || digits.starts_with(b"+") {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// An exptime (or `flush_all` delay, or meta `T`/`N`/`R` argument) as
/// memcached reads it: `strtol` into a 64-bit long (a value that does not
/// fit is an error), then stored in a 32-bit int, which keeps the low 32
/// bits. So `4294967295` is -1 (already expired: what libmemcached sends for
/// Django's `timeout=0`), `4294967296` is 0 (never expires) and
/// `4294967396` is 100 seconds.
pub(super) fn exptime_token(token: &[u8]) -> Option<i32> {
    number::<i64>(token).map(|wide| wide as i32)
}

/// Space-separated tokens of a request line; runs of spaces count as one.
#[derive(Clone)]
pub(super) struct Tokens<'a> {
    rest: &'a [u8],
}

impl<'a> Tokens<'a> {
    pub(super) fn new(line: &'a [u8]) -> Self {
        Tokens { rest: line }
    }

    /// The unsplit remainder of the line.
    pub(super) fn rest(self) -> &'a [u8] {
        self.rest
    }

    /// Fills `out` with up to `out.len()` tokens and returns how many there
    /// were; a count above `out.len()` means "too many".
    pub(super) fn collect_into(self, out: &mut [&'a [u8]]) -> usize {
        let mut n = 0;
        for token in self {
            if n < out.len() {
                out[n] = token;
            }
            n += 1;
            if n > out.len() {
                break;
            }
        }
        n
    }
}

impl<'a> Iterator for Tokens<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        let start = self.rest.iter().position(|&b| b != b' ')?;
        let rest = &self.rest[start..];
        let end = rest.iter().position(|&b| b == b' ').unwrap_or(rest.len());
        self.rest = &rest[end..];
        Some(&rest[..end])
    }
}
