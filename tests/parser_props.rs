//! Property tests of the request parser: every command, encoded as a
//! client would send it, parses back to itself, whole or fed in pieces, and
//! alongside other requests in one buffer (pipelining).

use dynacache::protocol::{Command, Limits, Parsed, StatsGroup, StoreMode, parse};
use proptest::prelude::*;

/// An owned request, to generate and encode.
#[derive(Debug, Clone)]
enum Req {
    Get {
        keys: Vec<String>,
        cas: bool,
        touch: Option<i64>,
    },
    Store {
        mode: StoreMode,
        key: String,
        flags: u32,
        exptime: i64,
        data: Vec<u8>,
        noreply: bool,
    },
    Delete {
        key: String,
        noreply: bool,
    },
    Touch {
        key: String,
        exptime: i64,
        noreply: bool,
    },
    Arith {
        incr: bool,
        key: String,
        delta: u64,
        noreply: bool,
    },
    FlushAll {
        delay: i64,
        noreply: bool,
    },
    Verbosity {
        level: u32,
        noreply: bool,
    },
    CacheMemlimit {
        megabytes: u32,
        noreply: bool,
    },
    Stats(StatsGroup),
    Version,
    Quit,
}

impl Req {
    fn encode(&self) -> Vec<u8> {
        let nr = |noreply: bool| if noreply { " noreply" } else { "" };
        match self {
            Req::Get { keys, cas, touch } => {
                let name = match (cas, touch) {
                    (false, None) => "get".to_string(),
                    (true, None) => "gets".to_string(),
                    (false, Some(t)) => format!("gat {t}"),
                    (true, Some(t)) => format!("gats {t}"),
                };
                format!("{name} {}\r\n", keys.join(" ")).into_bytes()
            }
            Req::Store {
                mode,
                key,
                flags,
                exptime,
                data,
                noreply,
            } => {
                let cas = match mode {
                    StoreMode::Cas(unique) => format!(" {unique}"),
                    _ => String::new(),
                };
                let mut out = format!(
                    "{} {key} {flags} {exptime} {}{cas}{}\r\n",
                    mode.name(),
                    data.len(),
                    nr(*noreply)
                )
                .into_bytes();
                out.extend_from_slice(data);
                out.extend_from_slice(b"\r\n");
                out
            }
            Req::Delete { key, noreply } => {
                format!("delete {key}{}\r\n", nr(*noreply)).into_bytes()
            }
            Req::Touch {
                key,
                exptime,
                noreply,
            } => format!("touch {key} {exptime}{}\r\n", nr(*noreply)).into_bytes(),
            Req::Arith {
                incr,
                key,
                delta,
                noreply,
            } => {
                let name = if *incr { "incr" } else { "decr" };
                format!("{name} {key} {delta}{}\r\n", nr(*noreply)).into_bytes()
            }
            Req::FlushAll { delay, noreply } => {
                format!("flush_all {delay}{}\r\n", nr(*noreply)).into_bytes()
            }
            Req::Verbosity { level, noreply } => {
                format!("verbosity {level}{}\r\n", nr(*noreply)).into_bytes()
            }
            Req::CacheMemlimit { megabytes, noreply } => {
                format!("cache_memlimit {megabytes}{}\r\n", nr(*noreply)).into_bytes()
            }
            Req::Stats(group) => {
                let sub = match group {
                    StatsGroup::General => "",
                    StatsGroup::Settings => " settings",
                    StatsGroup::Items => " items",
                    StatsGroup::Slabs => " slabs",
                    StatsGroup::Sizes => " sizes",
                    StatsGroup::Conns => " conns",
                    StatsGroup::Reset => " reset",
                    StatsGroup::Detail { dump: true } => " detail dump",
                    StatsGroup::Detail { dump: false } => " detail on",
                    StatsGroup::Cachedump => " cachedump 1 10",
                    StatsGroup::HotKeys => " hotkeys",
                };
                format!("stats{sub}\r\n").into_bytes()
            }
            Req::Version => b"version\r\n".to_vec(),
            Req::Quit => b"quit\r\n".to_vec(),
        }
    }

    /// Whether `cmd` is this request.
    fn matches(&self, cmd: &Command<'_>) -> bool {
        match (self, cmd) {
            (
                Req::Get { keys, cas, touch },
                Command::Get {
                    keys: k,
                    cas: c,
                    touch: t,
                },
            ) => {
                k.iter()
                    .map(|k| String::from_utf8_lossy(k).into_owned())
                    .collect::<Vec<_>>()
                    == *keys
                    && c == cas
                    // memcached keeps an exptime in 32 bits
                    && *t == touch.map(|e| e as i32)
            }
            (
                Req::Store {
                    mode,
                    key,
                    flags,
                    exptime,
                    data,
                    noreply,
                },
                Command::Store {
                    mode: m,
                    key: k,
                    flags: f,
                    exptime: e,
                    data: d,
                    noreply: n,
                },
            ) => {
                mode == m
                    && key.as_bytes() == *k
                    && flags == f
                    && *exptime as i32 == *e
                    && data == d
                    && noreply == n
            }
            (Req::Delete { key, noreply }, Command::Delete { key: k, noreply: n }) => {
                key.as_bytes() == *k && noreply == n
            }
            (
                Req::Touch {
                    key,
                    exptime,
                    noreply,
                },
                Command::Touch {
                    key: k,
                    exptime: e,
                    noreply: n,
                },
            ) => key.as_bytes() == *k && *exptime as i32 == *e && noreply == n,
            (
                Req::Arith {
                    incr,
                    key,
                    delta,
                    noreply,
                },
                Command::Arith {
                    incr: i,
                    key: k,
                    delta: d,
                    noreply: n,
                },
            ) => incr == i && key.as_bytes() == *k && delta == d && noreply == n,
            (
                Req::FlushAll { delay, noreply },
                Command::FlushAll {
                    delay: d,
                    noreply: n,
                },
            ) => *delay as i32 == *d && noreply == n,
            (Req::Verbosity { noreply, .. }, Command::Verbosity { noreply: n }) => noreply == n,
            (
                Req::CacheMemlimit { megabytes, noreply },
                Command::CacheMemlimit {
                    megabytes: m,
                    noreply: n,
                },
            ) => u64::from(*megabytes) == *m && noreply == n,
            (Req::Stats(g), Command::Stats(h)) => g == h,
            (Req::Version, Command::Version) | (Req::Quit, Command::Quit) => true,
            _ => false,
        }
    }
}

fn key() -> impl Strategy<Value = String> {
    // Any printable byte but space; memcached allows control bytes too, but
    // a trailing \r would be read as part of the line ending.
    "[!-~]{1,250}"
}

fn exptime() -> impl Strategy<Value = i64> {
    prop_oneof![
        Just(0i64),
        -10i64..=0,
        1i64..=2_592_000,
        2_592_001i64..=4_000_000_000
    ]
}

fn request() -> impl Strategy<Value = Req> {
    let mode = prop_oneof![
        Just(StoreMode::Set),
        Just(StoreMode::Add),
        Just(StoreMode::Replace),
        Just(StoreMode::Append),
        Just(StoreMode::Prepend),
        any::<u64>().prop_map(StoreMode::Cas),
    ];
    let group = prop_oneof![
        Just(StatsGroup::General),
        Just(StatsGroup::Settings),
        Just(StatsGroup::Items),
        Just(StatsGroup::Slabs),
        Just(StatsGroup::Sizes),
        Just(StatsGroup::Conns),
        Just(StatsGroup::Reset),
        Just(StatsGroup::Detail { dump: true }),
        Just(StatsGroup::Detail { dump: false }),
        Just(StatsGroup::Cachedump),
        Just(StatsGroup::HotKeys),
    ];
    prop_oneof![
        (
            prop::collection::vec(key(), 1..8),
            any::<bool>(),
            prop::option::of(exptime())
        )
            .prop_map(|(keys, cas, touch)| Req::Get { keys, cas, touch }),
        (
            mode,
            key(),
            any::<u32>(),
            exptime(),
            prop::collection::vec(any::<u8>(), 0..600),
            any::<bool>()
        )
            .prop_map(|(mode, key, flags, exptime, data, noreply)| Req::Store {
                mode,
                key,
                flags,
                exptime,
                data,
                noreply
            }),
        (key(), any::<bool>()).prop_map(|(key, noreply)| Req::Delete { key, noreply }),
        (key(), exptime(), any::<bool>()).prop_map(|(key, exptime, noreply)| Req::Touch {
            key,
            exptime,
            noreply
        }),
        (any::<bool>(), key(), any::<u64>(), any::<bool>()).prop_map(
            |(incr, key, delta, noreply)| Req::Arith {
                incr,
                key,
                delta,
                noreply
            }
        ),
        (exptime(), any::<bool>()).prop_map(|(delay, noreply)| Req::FlushAll { delay, noreply }),
        (any::<u32>(), any::<bool>())
            .prop_map(|(level, noreply)| Req::Verbosity { level, noreply }),
        (any::<u32>(), any::<bool>())
            .prop_map(|(megabytes, noreply)| Req::CacheMemlimit { megabytes, noreply }),
        group.prop_map(Req::Stats),
        Just(Req::Version),
        Just(Req::Quit),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn every_command_round_trips(req in request()) {
        let bytes = req.encode();
        match parse(&bytes, &Limits::default()) {
            Parsed::Request(cmd, len) => {
                prop_assert_eq!(len, bytes.len());
                prop_assert!(req.matches(&cmd), "{:?} parsed as {:?}", req, cmd);
            }
            other => prop_assert!(false, "{:?} parsed as {:?}", req, other),
        }
        // Streaming: every proper prefix is incomplete, never a wrong answer.
        for cut in [0, 1, bytes.len() / 2, bytes.len() - 2, bytes.len() - 1] {
            prop_assert_eq!(parse(&bytes[..cut], &Limits::default()), Parsed::Incomplete);
        }
    }

    #[test]
    fn pipelined_requests_parse_in_order(reqs in prop::collection::vec(request(), 1..10)) {
        let buf: Vec<u8> = reqs.iter().flat_map(Req::encode).collect();
        let mut rest = &buf[..];
        for req in &reqs {
            match parse(rest, &Limits::default()) {
                Parsed::Request(cmd, len) => {
                    prop_assert!(req.matches(&cmd), "{:?} parsed as {:?}", req, cmd);
                    rest = &rest[len..];
                }
                other => prop_assert!(false, "{:?} parsed as {:?}", req, other),
            }
        }
        prop_assert!(rest.is_empty());
    }
}

/// One meta flag as a client sends it.
#[derive(Debug, Clone)]
enum MetaFlag {
    Echo(u8),
    Quiet,
    Value,
    Opaque(String),
    Ttl(i32),
    Cas(u64),
    ClientFlags(u32),
    Delta(u64),
}

impl MetaFlag {
    fn letter(&self) -> u8 {
        match self {
            MetaFlag::Echo(c) => *c,
            MetaFlag::Quiet => b'q',
            MetaFlag::Value => b'v',
            MetaFlag::Opaque(_) => b'O',
            MetaFlag::Ttl(_) => b'T',
            MetaFlag::Cas(_) => b'C',
            MetaFlag::ClientFlags(_) => b'F',
            MetaFlag::Delta(_) => b'D',
        }
    }

    fn encode(&self) -> String {
        match self {
            MetaFlag::Echo(c) => (*c as char).to_string(),
            MetaFlag::Quiet => "q".into(),
            MetaFlag::Value => "v".into(),
            MetaFlag::Opaque(o) => format!("O{o}"),
            MetaFlag::Ttl(t) => format!("T{t}"),
            MetaFlag::Cas(c) => format!("C{c}"),
            MetaFlag::ClientFlags(f) => format!("F{f}"),
            MetaFlag::Delta(d) => format!("D{d}"),
        }
    }
}

fn meta_flag() -> impl Strategy<Value = MetaFlag> {
    prop_oneof![
        prop::sample::select(b"cfkst".to_vec()).prop_map(MetaFlag::Echo),
        Just(MetaFlag::Quiet),
        Just(MetaFlag::Value),
        "[a-zA-Z0-9]{0,31}".prop_map(MetaFlag::Opaque),
        any::<i32>().prop_map(MetaFlag::Ttl),
        any::<u64>().prop_map(MetaFlag::Cas),
        any::<u32>().prop_map(MetaFlag::ClientFlags),
        any::<u64>().prop_map(MetaFlag::Delta),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    /// mg, ms, md and ma with any valid set of flags, in any order.
    #[test]
    fn meta_commands_round_trip(
        cmd in prop::sample::select(vec!["mg", "ms", "md", "ma"]),
        key in key(),
        flags in prop::collection::vec(meta_flag(), 0..10),
        data in prop::collection::vec(any::<u8>(), 0..300),
    ) {
        // Each letter once: memcached refuses duplicates.
        let mut seen = std::collections::HashSet::new();
        let flags: Vec<MetaFlag> = flags.into_iter().filter(|f| seen.insert(f.letter())).collect();
        let mut line = format!("{cmd} {key}");
        if cmd == "ms" {
            line.push_str(&format!(" {}", data.len()));
        }
        for flag in &flags {
            line.push(' ');
            line.push_str(&flag.encode());
        }
        let mut bytes = format!("{line}\r\n").into_bytes();
        if cmd == "ms" {
            bytes.extend_from_slice(&data);
            bytes.extend_from_slice(b"\r\n");
        }
        let Parsed::Request(Command::Meta(meta), len) = parse(&bytes, &Limits::default()) else {
            return Err(TestCaseError::fail(format!("{line:?} did not parse as a meta request")));
        };
        prop_assert_eq!(len, bytes.len());
        prop_assert_eq!(meta.cmd.name(), cmd);
        prop_assert_eq!(&meta.key[..], key.as_bytes());
        prop_assert_eq!(meta.data, if cmd == "ms" { &data[..] } else { &b""[..] });
        let echoed: Vec<u8> = flags
            .iter()
            .filter(|f| matches!(f, MetaFlag::Echo(_) | MetaFlag::Opaque(_)))
            .map(MetaFlag::letter)
            .collect();
        prop_assert_eq!(meta.flags.echo(), &echoed[..], "return flags keep their order");
        for flag in &flags {
            match flag {
                MetaFlag::Quiet => prop_assert!(meta.flags.quiet),
                MetaFlag::Value => prop_assert!(meta.flags.value),
                MetaFlag::Opaque(o) => prop_assert_eq!(meta.flags.opaque, o.as_bytes()),
                MetaFlag::Ttl(t) => prop_assert_eq!(meta.flags.ttl, Some(*t)),
                MetaFlag::Cas(c) => prop_assert_eq!(meta.flags.cas, Some(*c)),
                MetaFlag::ClientFlags(f) => prop_assert_eq!(meta.flags.client_flags, *f),
                MetaFlag::Delta(d) => prop_assert_eq!(meta.flags.delta, *d),
                MetaFlag::Echo(_) => {}
            }
        }
        for cut in [0, 1, bytes.len() - 1] {
            prop_assert_eq!(parse(&bytes[..cut], &Limits::default()), Parsed::Incomplete);
        }
    }
}
