//! Request parsing, the entry point: frames a request line over the connection's read buffer.
//!
//! [`parse`] looks at the front of the buffer and answers with one [`Parsed`]:
//! a whole request and its length, "need more bytes", or what to answer for a
//! malformed one. Limits are enforced here, before anything is buffered: a line
//! without a newline past [`Limits::max_line`] ends the connection (as
//! memcached does), and a data block over the item limit is never buffered but
//! discarded as it streams in ([`Parsed::TooLarge`]).
//!
//! This module owns the dispatch only: it frames the request line, enforces
//! the line limits, splits off the command name (command names are
//! case-sensitive, an unknown one is `ERROR`) and calls down into the classic
//! parsers (`classic`) or the meta parsers (`meta`). Tokens, numbers and data
//! blocks are read by `token`; [`Parsed`] and [`Limits`] are defined in
//! `parsed`. Token rules follow memcached 1.6's text parser (`proto_text.c`),
//! checked byte for byte against Debian's memcached 1.6.18.

use super::command::{Command, MetaCmd, StoreMode};
use super::parsed::{Limits, Parsed, invalid};
use super::reply::Reply;
use super::token::{Tokens, line};
use super::{classic, meta};

/// Parses the request at the front of `buf`.
pub fn parse<'a>(buf: &'a [u8], limits: &Limits) -> Parsed<'a> {
    let (after_line, line) = match line(buf) {
        Ok(ok) => ok,
        Err(_) => return incomplete_line(buf, limits),
    };
    let line_len = buf.len() - after_line.len();
    // The same bound whether the newline came in this read or a later one,
    // so the answer does not depend on how the bytes were split.
    if line_len > limits.max_line && !is_retrieval(buf) || line_len > limits.max_get_line {
        return Parsed::LineTooLong;
    }

    // Split off the command name; the rest is tokenized per command.
    let mut tokens = Tokens::new(line);
    let Some(name) = tokens.next() else {
        return invalid(Reply::Error, line_len, false);
    };
    match name {
        b"get" | b"gets" => classic::get(name == b"gets", tokens, line_len),
        b"gat" | b"gats" => classic::gat(name == b"gats", tokens, line_len),
        b"set" => classic::storage(StoreMode::Set, tokens, after_line, line_len, limits),
        b"add" => classic::storage(StoreMode::Add, tokens, after_line, line_len, limits),
        b"replace" => classic::storage(StoreMode::Replace, tokens, after_line, line_len, limits),
        b"append" => classic::storage(StoreMode::Append, tokens, after_line, line_len, limits),
        b"prepend" => classic::storage(StoreMode::Prepend, tokens, after_line, line_len, limits),
        b"cas" => classic::storage(StoreMode::Cas(0), tokens, after_line, line_len, limits),
        b"delete" => classic::delete(tokens, line_len),
        b"touch" => classic::touch(tokens, line_len),
        b"incr" | b"decr" => classic::arith(name == b"incr", tokens, line_len),
        b"flush_all" => classic::flush_all(tokens, line_len),
        b"stats" => classic::stats(tokens, line_len),
        b"verbosity" => classic::verbosity(tokens, line_len),
        b"cache_memlimit" => classic::cache_memlimit(tokens, line_len),
        b"shutdown" => Parsed::Request(Command::Shutdown, line_len),
        b"mn" => Parsed::Request(Command::MetaNoop, line_len),
        b"mg" => meta::meta(MetaCmd::Get, tokens, after_line, line_len, limits),
        b"ms" => meta::meta(MetaCmd::Set, tokens, after_line, line_len, limits),
        b"md" => meta::meta(MetaCmd::Delete, tokens, after_line, line_len, limits),
        b"ma" => meta::meta(MetaCmd::Arith, tokens, after_line, line_len, limits),
        b"me" => meta::meta(MetaCmd::Debug, tokens, after_line, line_len, limits),
        b"version" => Parsed::Request(Command::Version, line_len),
        b"quit" => Parsed::Request(Command::Quit, line_len),
        _ => invalid(Reply::Error, line_len, false),
    }
}

/// No newline yet: wait for more, unless the line is already too long.
fn incomplete_line<'a>(buf: &'a [u8], limits: &Limits) -> Parsed<'a> {
    if buf.len() <= limits.max_line {
        return Parsed::Incomplete;
    }
    if is_retrieval(buf) && buf.len() <= limits.max_get_line {
        Parsed::Incomplete
    } else {
        Parsed::LineTooLong
    }
}

/// `get`/`gets` lines may be long: multi-gets of hundreds of keys are normal.
fn is_retrieval(buf: &[u8]) -> bool {
    buf.starts_with(b"get ") || buf.starts_with(b"gets ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(buf: &[u8]) -> Parsed<'_> {
        parse(buf, &Limits::default())
    }

    #[test]
    fn unknown_and_uppercase_commands_are_error() {
        assert_eq!(p(b"GET a\r\n"), invalid(Reply::Error, 7, false));
        assert_eq!(p(b"bogus\r\n"), invalid(Reply::Error, 7, false));
        assert_eq!(p(b"\r\n"), invalid(Reply::Error, 2, false));
    }

    #[test]
    fn version_and_quit_ignore_arguments() {
        assert_eq!(
            p(b"version extra\r\n"),
            Parsed::Request(Command::Version, 15)
        );
        assert_eq!(p(b"quit\r\n"), Parsed::Request(Command::Quit, 6));
    }

    #[test]
    fn long_lines_close_except_retrieval() {
        let junk = vec![b'x'; 3000];
        assert_eq!(p(&junk), Parsed::LineTooLong);
        let mut get = b"get ".to_vec();
        get.extend(std::iter::repeat_n(&b"a "[..], 1500).flatten());
        assert_eq!(p(&get), Parsed::Incomplete);
        let huge = [b"get ".as_slice(), &vec![b'a'; 300 * 1024]].concat();
        assert_eq!(p(&huge), Parsed::LineTooLong);
        assert_eq!(p(&junk[..2048]), Parsed::Incomplete);
        // With or without its newline yet, a long line gets one answer.
        let mut line = junk.clone();
        line.extend_from_slice(b"\r\n");
        assert_eq!(p(&line), Parsed::LineTooLong);
    }
}
