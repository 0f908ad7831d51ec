//! Replies and their wire encoding. The engine builds [`Reply`] values and
//! encodes them straight into the connection's write buffer, so a run of
//! pipelined replies leaves in one write.

use bytes::{BufMut, BytesMut};

use super::command::MetaFlags;

/// One reply line (and, for [`Reply::Value`], its data block).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply<'a> {
    /// `VALUE <key> <flags> <bytes>[ <cas>]` + data: one hit of a retrieval.
    Value {
        key: &'a [u8],
        flags: u32,
        data: &'a [u8],
        cas: Option<u64>,
    },
    /// `END`: the end of a retrieval.
    End,
    Stored,
    NotStored,
    /// `EXISTS`: a `cas` whose unique no longer matches.
    Exists,
    NotFound,
    Deleted,
    Touched,
    /// `OK` (flush_all, verbosity, cache_memlimit).
    Ok,
    /// `RESET` (stats reset).
    Reset,
    /// The new value of an `incr`/`decr`.
    Number(u64),
    /// `STAT <name> <value>`.
    Stat(&'a str, &'a str),
    /// `MN`: the end of a batch of quiet meta commands.
    MetaNoop,
    /// `EN`: `me` found no item.
    MetaMiss,
    /// `ME <key> exp=<ttl> cas=<cas> size=<bytes>`: what `me` knows of an item.
    MetaDebug {
        key: &'a [u8],
        ttl: i64,
        cas: u64,
        size: usize,
    },
    /// memcached's answer to `shutdown` when it was not started with `-A`.
    ShutdownRefused,
    /// memcached's answer to `cache_memlimit` below 8 MiB.
    MemlimitTooSmall,
    /// `VERSION <v>`.
    Version(&'a str),
    /// `ERROR`: unknown command or wrong number of tokens.
    Error,
    /// `CLIENT_ERROR <msg>`: the request was malformed.
    ClientError(&'a str),
    /// `SERVER_ERROR <msg>`: the request was fine but could not be served.
    ServerError(&'a str),
    /// A meta command's reply: `<code> <return flags>*`, and for `VA` the value.
    Meta {
        code: MetaCode,
        /// The flags the request asked for.
        flags: &'a MetaFlags<'a>,
        /// Which return flags this reply answers (others are left out).
        answers: &'static [u8],
        /// The key as sent, for `k`.
        key: &'a [u8],
        /// The item's attributes, for `c f s t`; None leaves them out.
        item: Option<MetaItem>,
        /// `VA`'s data.
        data: &'a [u8],
        /// ` W`: this client won the right to recompute the value.
        win: bool,
    },
}

/// A meta reply's two-letter code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetaCode {
    /// Value follows.
    Va,
    /// Success, no value.
    Hd,
    /// Miss (mg).
    En,
    /// Not stored.
    Ns,
    /// Cas mismatch.
    Ex,
    /// Not found.
    Nf,
}

/// What the `c f s t` return flags report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetaItem {
    pub cas: u64,
    pub flags: u32,
    pub size: usize,
    /// Seconds left, -1 for none.
    pub ttl: i64,
}

impl Reply<'_> {
    /// Appends the reply's bytes to `out`.
    pub fn encode(&self, out: &mut BytesMut) {
        match self {
            Reply::Value {
                key,
                flags,
                data,
                cas,
            } => {
                let mut num = itoa::Buffer::new();
                out.reserve(key.len() + data.len() + 40);
                out.put_slice(b"VALUE ");
                out.put_slice(key);
                out.put_u8(b' ');
                out.put_slice(num.format(*flags).as_bytes());
                out.put_u8(b' ');
                out.put_slice(num.format(data.len()).as_bytes());
                if let Some(cas) = cas {
                    out.put_u8(b' ');
                    out.put_slice(num.format(*cas).as_bytes());
                }
                out.put_slice(b"\r\n");
                out.put_slice(data);
                out.put_slice(b"\r\n");
            }
            Reply::End => out.put_slice(b"END\r\n"),
            Reply::Stored => out.put_slice(b"STORED\r\n"),
            Reply::NotStored => out.put_slice(b"NOT_STORED\r\n"),
            Reply::Exists => out.put_slice(b"EXISTS\r\n"),
            Reply::Ok => out.put_slice(b"OK\r\n"),
            Reply::Reset => out.put_slice(b"RESET\r\n"),
            Reply::Number(n) => {
                out.put_slice(itoa::Buffer::new().format(*n).as_bytes());
                out.put_slice(b"\r\n");
            }
            Reply::Stat(name, value) => {
                out.put_slice(b"STAT ");
                out.put_slice(name.as_bytes());
                line(out, b" ", value);
            }
            Reply::MetaNoop => out.put_slice(b"MN\r\n"),
            Reply::MetaMiss => out.put_slice(b"EN\r\n"),
            Reply::MetaDebug {
                key,
                ttl,
                cas,
                size,
            } => {
                let mut num = itoa::Buffer::new();
                out.put_slice(b"ME ");
                out.put_slice(key);
                out.put_slice(b" exp=");
                out.put_slice(num.format(*ttl).as_bytes());
                out.put_slice(b" cas=");
                out.put_slice(num.format(*cas).as_bytes());
                out.put_slice(b" size=");
                out.put_slice(num.format(*size).as_bytes());
                out.put_slice(b"\r\n");
            }
            Reply::ShutdownRefused => out.put_slice(b"ERROR: shutdown not enabled\r\n"),
            Reply::MemlimitTooSmall => {
                out.put_slice(b"MEMLIMIT_TOO_SMALL cannot set maxbytes to less than 8m\r\n")
            }
            Reply::NotFound => out.put_slice(b"NOT_FOUND\r\n"),
            Reply::Deleted => out.put_slice(b"DELETED\r\n"),
            Reply::Touched => out.put_slice(b"TOUCHED\r\n"),
            Reply::Version(v) => line(out, b"VERSION ", v),
            Reply::Error => out.put_slice(b"ERROR\r\n"),
            Reply::ClientError(msg) => line(out, b"CLIENT_ERROR ", msg),
            Reply::ServerError(msg) => line(out, b"SERVER_ERROR ", msg),
            Reply::Meta {
                code,
                flags,
                answers,
                key,
                item,
                data,
                win,
            } => {
                let mut num = itoa::Buffer::new();
                out.reserve(data.len() + key.len() + 64);
                out.put_slice(match code {
                    MetaCode::Va => b"VA",
                    MetaCode::Hd => b"HD",
                    MetaCode::En => b"EN",
                    MetaCode::Ns => b"NS",
                    MetaCode::Ex => b"EX",
                    MetaCode::Nf => b"NF",
                });
                if *code == MetaCode::Va {
                    out.put_u8(b' ');
                    out.put_slice(num.format(data.len()).as_bytes());
                }
                for &flag in flags.echo() {
                    if !answers.contains(&flag) {
                        continue;
                    }
                    let text = match (flag, item) {
                        (b'k', _) => {
                            out.put_slice(b" k");
                            out.put_slice(key);
                            if flags.base64 {
                                out.put_slice(b" b");
                            }
                            continue;
                        }
                        (b'O', _) => {
                            out.put_slice(b" O");
                            out.put_slice(flags.opaque);
                            continue;
                        }
                        (b'c', Some(i)) => num.format(i.cas),
                        (b'f', Some(i)) => num.format(i.flags),
                        (b's', Some(i)) => num.format(i.size),
                        (b't', Some(i)) => num.format(i.ttl),
                        _ => continue,
                    };
                    out.put_u8(b' ');
                    out.put_u8(flag);
                    out.put_slice(text.as_bytes());
                }
                if *win {
                    out.put_slice(b" W");
                }
                out.put_slice(b"\r\n");
                if *code == MetaCode::Va {
                    out.put_slice(data);
                    out.put_slice(b"\r\n");
                }
            }
        }
    }
}

/// `<prefix><text>\r\n`, with any CR or LF in `text` (an error message from
/// elsewhere) replaced so one reply stays one line.
fn line(out: &mut BytesMut, prefix: &[u8], text: &str) {
    out.put_slice(prefix);
    for &b in text.as_bytes() {
        out.put_u8(if b == b'\r' || b == b'\n' { b' ' } else { b });
    }
    out.put_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(reply: Reply<'_>) -> Vec<u8> {
        let mut out = BytesMut::new();
        reply.encode(&mut out);
        out.to_vec()
    }

    #[test]
    fn value_with_and_without_cas() {
        let v = Reply::Value {
            key: b"k",
            flags: 4294967295,
            data: b"x",
            cas: None,
        };
        assert_eq!(bytes(v), b"VALUE k 4294967295 1\r\nx\r\n");
        let v = Reply::Value {
            key: b"k",
            flags: 0,
            data: b"",
            cas: Some(9),
        };
        assert_eq!(bytes(v), b"VALUE k 0 0 9\r\n\r\n");
    }

    #[test]
    fn status_lines() {
        assert_eq!(bytes(Reply::Stored), b"STORED\r\n");
        assert_eq!(bytes(Reply::NotStored), b"NOT_STORED\r\n");
        assert_eq!(bytes(Reply::NotFound), b"NOT_FOUND\r\n");
        assert_eq!(bytes(Reply::Deleted), b"DELETED\r\n");
        assert_eq!(bytes(Reply::Touched), b"TOUCHED\r\n");
        assert_eq!(bytes(Reply::End), b"END\r\n");
        assert_eq!(bytes(Reply::Error), b"ERROR\r\n");
        assert_eq!(bytes(Reply::Version("1.6.18")), b"VERSION 1.6.18\r\n");
        assert_eq!(bytes(Reply::Exists), b"EXISTS\r\n");
        assert_eq!(bytes(Reply::Ok), b"OK\r\n");
        assert_eq!(bytes(Reply::Reset), b"RESET\r\n");
        assert_eq!(
            bytes(Reply::Number(18446744073709551615)),
            b"18446744073709551615\r\n"
        );
        assert_eq!(bytes(Reply::Stat("pid", "42")), b"STAT pid 42\r\n");
        assert_eq!(bytes(Reply::MetaNoop), b"MN\r\n");
        assert_eq!(bytes(Reply::MetaMiss), b"EN\r\n");
    }

    #[test]
    fn error_text_stays_on_one_line() {
        assert_eq!(
            bytes(Reply::ServerError("dynamodb: timed out\r\nretry")),
            b"SERVER_ERROR dynamodb: timed out  retry\r\n"
        );
        assert_eq!(
            bytes(Reply::ClientError("bad data chunk")),
            b"CLIENT_ERROR bad data chunk\r\n"
        );
    }
}
