//! Engine behaviour on an in-memory store, through parsed requests.

use super::*;
use crate::protocol::{Limits, Parsed, parse};
use crate::store::{Item, MemoryStore};

const NOW: u32 = 1_800_000_000;

fn engine() -> Engine<MemoryStore> {
    Engine::new(ItemCache::new(1 << 20, 4), MemoryStore::new())
}

/// Runs every request in `input` at `now`, as a connection would.
async fn run(engine: &Engine<MemoryStore>, input: &[u8], now: u32) -> String {
    let mut out = Output::collect();
    let mut rest = input;
    loop {
        match parse(rest, &Limits::default()) {
            Parsed::Request(cmd, len) => {
                engine.execute_at(cmd, &mut out, now).await;
                rest = &rest[len..];
            }
            Parsed::Invalid {
                reply,
                len,
                noreply,
            } => {
                if !noreply {
                    reply.encode(out.buf());
                }
                rest = &rest[len..];
            }
            Parsed::Incomplete => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    String::from_utf8(out.pending().to_vec()).unwrap()
}

#[tokio::test]
async fn set_writes_store_then_cache() {
    let e = engine();
    assert_eq!(run(&e, b"set k 3 0 2\r\nhi\r\n", NOW).await, "STORED\r\n");
    let stored = e.store().raw(b"k").unwrap();
    assert_eq!(
        (stored.value.as_slice(), stored.flags, stored.expires_at),
        (&b"hi"[..], 3, 0)
    );
    let cached = e.cache().get(b"k", NOW).unwrap();
    assert_eq!(
        (cached.value.as_slice(), cached.version),
        (&b"hi"[..], stored.version)
    );
    // The hit is served from memory: no store call.
    let calls = e.store().calls();
    assert_eq!(
        run(&e, b"get k\r\n", NOW).await,
        "VALUE k 3 2\r\nhi\r\nEND\r\n"
    );
    assert_eq!(e.store().calls(), calls);
}

#[tokio::test]
async fn failed_set_answers_server_error_and_caches_nothing() {
    let e = engine();
    run(&e, b"set k 0 0 3\r\nold\r\n", NOW).await;
    e.store().set_failing(true);
    let reply = run(&e, b"set k 0 0 3\r\nnew\r\n", NOW).await;
    assert!(
        reply.starts_with("SERVER_ERROR dynamodb unreachable"),
        "{reply}"
    );
    assert!(
        e.cache().get(b"k", NOW).is_none(),
        "the cached copy is dropped"
    );
    assert_eq!(e.store().raw(b"k").unwrap().value, b"old");
}

#[tokio::test]
async fn store_error_on_miss_is_server_error_not_a_miss() {
    let e = engine();
    run(&e, b"set hit 0 0 1\r\nx\r\n", NOW).await;
    e.store().set_failing(true);
    // A hit is still served from memory during an outage...
    assert_eq!(
        run(&e, b"get hit\r\n", NOW).await,
        "VALUE hit 0 1\r\nx\r\nEND\r\n"
    );
    // ...but a multi-get with a miss answers only the error, no partial values.
    let reply = run(&e, b"get hit other\r\n", NOW).await;
    assert!(reply.starts_with("SERVER_ERROR "), "{reply}");
    assert!(
        !reply.contains("VALUE") && !reply.contains("END"),
        "{reply}"
    );
}

#[tokio::test]
async fn miss_fills_from_store() {
    let e = engine();
    let item = Item {
        value: b"from db".to_vec(),
        flags: 1,
        expires_at: 0,
        version: 77,
        chunks: 0,
    };
    e.store().insert_raw(b"k", item);
    assert_eq!(
        run(&e, b"gets k\r\n", NOW).await,
        "VALUE k 1 7 77\r\nfrom db\r\nEND\r\n"
    );
    assert_eq!(e.cache().get(b"k", NOW).unwrap().version, 77);
}

#[tokio::test]
async fn expired_items_are_never_served() {
    let e = engine();
    // Expired in the store but not yet deleted (TTL is lazy).
    let item = Item {
        value: b"stale".to_vec(),
        flags: 0,
        expires_at: NOW - 1,
        version: 1,
        chunks: 0,
    };
    e.store().insert_raw(b"old", item);
    assert_eq!(run(&e, b"get old\r\n", NOW).await, "END\r\n");
    // Expired in memory.
    run(&e, b"set k 0 10 1\r\nx\r\n", NOW).await;
    assert_eq!(
        run(&e, b"get k\r\n", NOW + 9).await,
        "VALUE k 0 1\r\nx\r\nEND\r\n"
    );
    assert_eq!(run(&e, b"get k\r\n", NOW + 10).await, "END\r\n");
}

#[tokio::test]
async fn add_only_when_absent_or_expired() {
    let e = engine();
    assert_eq!(run(&e, b"add k 0 5 1\r\na\r\n", NOW).await, "STORED\r\n");
    assert_eq!(
        run(&e, b"add k 0 0 1\r\nb\r\n", NOW).await,
        "NOT_STORED\r\n"
    );
    assert_eq!(
        run(&e, b"add k 0 0 1\r\nc\r\n", NOW + 5).await,
        "STORED\r\n"
    );
    assert_eq!(e.store().raw(b"k").unwrap().value, b"c");
}

#[tokio::test]
async fn delete_and_touch_() {
    let e = engine();
    run(&e, b"set k 0 0 1\r\nx\r\n", NOW).await;
    assert_eq!(run(&e, b"touch k 100\r\n", NOW).await, "TOUCHED\r\n");
    assert_eq!(e.store().raw(b"k").unwrap().expires_at, NOW + 100);
    assert_eq!(e.cache().get(b"k", NOW).unwrap().expires_at, NOW + 100);
    assert_eq!(run(&e, b"touch nope 1\r\n", NOW).await, "NOT_FOUND\r\n");
    assert_eq!(run(&e, b"delete k\r\n", NOW).await, "DELETED\r\n");
    assert!(e.cache().get(b"k", NOW).is_none());
    // What a delete leaves in the table: a tombstone no reader takes for an
    // item, whose version a late write conditioned on an older one fails on.
    let tombstone = e.store().raw(b"k").unwrap();
    assert!(!tombstone.is_live(View::at(NOW)) && tombstone.value.is_empty());
    // Not even for a read whose clock says an earlier time (it began in an
    // earlier second, or its host's clock is behind): an empty value no
    // client wrote must never be served.
    assert!(!tombstone.is_live(View::at(NOW - 3600)));
    assert_eq!(run(&e, b"delete k\r\n", NOW).await, "NOT_FOUND\r\n");
}

#[tokio::test]
async fn noreply_suppresses_replies_and_errors() {
    let e = engine();
    assert_eq!(
        run(&e, b"set k 0 0 1 noreply\r\nx\r\ndelete k noreply\r\n", NOW).await,
        ""
    );
    e.store().set_failing(true);
    assert_eq!(run(&e, b"set k 0 0 1 noreply\r\nx\r\n", NOW).await, "");
}

#[tokio::test]
async fn replace_append_prepend_need_a_live_item() {
    let e = engine();
    assert_eq!(
        run(&e, b"replace k 0 0 1\r\nx\r\n", NOW).await,
        "NOT_STORED\r\n"
    );
    assert_eq!(
        run(&e, b"append k 0 0 1\r\nx\r\n", NOW).await,
        "NOT_STORED\r\n"
    );
    assert_eq!(
        run(&e, b"prepend k 0 0 1\r\nx\r\n", NOW).await,
        "NOT_STORED\r\n"
    );
    assert!(e.store().raw(b"k").is_none());
    run(&e, b"set k 5 100 1\r\nb\r\n", NOW).await;
    assert_eq!(run(&e, b"append k 9 0 1\r\nc\r\n", NOW).await, "STORED\r\n");
    assert_eq!(
        run(&e, b"prepend k 9 0 1\r\na\r\n", NOW).await,
        "STORED\r\n"
    );
    // Flags and expiry are the original item's.
    assert_eq!(
        run(&e, b"get k\r\n", NOW).await,
        "VALUE k 5 3\r\nabc\r\nEND\r\n"
    );
    let stored = e.store().raw(b"k").unwrap();
    assert_eq!(
        (stored.value.as_slice(), stored.expires_at),
        (&b"abc"[..], NOW + 100)
    );
    assert_eq!(
        run(&e, b"replace k 2 0 1\r\nz\r\n", NOW).await,
        "STORED\r\n"
    );
    assert_eq!(
        run(&e, b"get k\r\n", NOW).await,
        "VALUE k 2 1\r\nz\r\nEND\r\n"
    );
    // An expired item counts as absent.
    run(&e, b"set old 0 10 1\r\nx\r\n", NOW).await;
    assert_eq!(
        run(&e, b"replace old 0 0 1\r\ny\r\n", NOW + 10).await,
        "NOT_STORED\r\n"
    );
}

#[tokio::test]
async fn cas_tells_exists_from_not_found() {
    let e = engine();
    assert_eq!(
        run(&e, b"cas k 0 0 1 1\r\nx\r\n", NOW).await,
        "NOT_FOUND\r\n"
    );
    run(&e, b"set k 0 0 1\r\nx\r\n", NOW).await;
    let unique = e.store().raw(b"k").unwrap().version;
    let stale = format!("cas k 0 0 1 {}\r\ny\r\n", unique + 1);
    assert_eq!(run(&e, stale.as_bytes(), NOW).await, "EXISTS\r\n");
    let good = format!("cas k 0 0 1 {unique}\r\ny\r\n");
    assert_eq!(run(&e, good.as_bytes(), NOW).await, "STORED\r\n");
    // Every write changes the unique: the same cas fails now.
    assert_eq!(run(&e, good.as_bytes(), NOW).await, "EXISTS\r\n");
    let after = e.store().raw(b"k").unwrap().version;
    assert!(after > unique);
    assert_eq!(
        run(&e, b"gets k\r\n", NOW).await,
        format!("VALUE k 0 1 {after}\r\ny\r\nEND\r\n")
    );
    let snapshot: std::collections::HashMap<_, _> = e.counters().stats().into_iter().collect();
    assert_eq!(
        (
            snapshot["cas_hits"],
            snapshot["cas_badval"],
            snapshot["cas_misses"]
        ),
        (1, 2, 1)
    );
}

#[tokio::test]
async fn incr_decr_follow_memcached_arithmetic() {
    let e = engine();
    assert_eq!(run(&e, b"incr n 1\r\n", NOW).await, "NOT_FOUND\r\n");
    run(&e, b"set n 3 0 2\r\n10\r\n", NOW).await;
    assert_eq!(run(&e, b"incr n 5\r\n", NOW).await, "15\r\n");
    assert_eq!(run(&e, b"decr n 100\r\n", NOW).await, "0\r\n");
    // A shorter result keeps the old length, padded with spaces.
    assert_eq!(
        run(&e, b"get n\r\n", NOW).await,
        "VALUE n 3 2\r\n0 \r\nEND\r\n"
    );
    run(&e, b"set n 0 0 20\r\n18446744073709551615\r\n", NOW).await;
    assert_eq!(run(&e, b"incr n 1\r\n", NOW).await, "0\r\n");
    assert_eq!(
        run(&e, b"get n\r\n", NOW).await,
        "VALUE n 0 20\r\n0                   \r\nEND\r\n"
    );
    run(&e, b"set n 0 0 1\r\n9\r\n", NOW).await;
    assert_eq!(run(&e, b"incr n 1\r\n", NOW).await, "10\r\n");
    assert_eq!(
        run(&e, b"get n\r\n", NOW).await,
        "VALUE n 0 2\r\n10\r\nEND\r\n"
    );
    run(&e, b"set s 0 0 2\r\nab\r\n", NOW).await;
    assert_eq!(
        run(&e, b"incr s 1\r\n", NOW).await,
        "CLIENT_ERROR cannot increment or decrement non-numeric value\r\n"
    );
    assert_eq!(
        run(&e, b"incr n -1\r\n", NOW).await,
        "CLIENT_ERROR invalid numeric delta argument\r\n"
    );
    assert_eq!(
        run(&e, b"decr n 1 noreply\r\nget n\r\n", NOW).await,
        "VALUE n 0 2\r\n9 \r\nEND\r\n"
    );
}

#[tokio::test]
async fn flush_all_hides_older_items_from_cache_and_store() {
    let e = engine();
    run(&e, b"set a 0 0 1\r\nx\r\nset b 0 0 1\r\ny\r\n", NOW).await;
    assert_eq!(run(&e, b"flush_all\r\n", NOW).await, "OK\r\n");
    assert_eq!(e.cache().stats().items, 0, "memory freed at once");
    // Still in the store, but flushed: never served, absent for add.
    assert!(e.store().raw(b"a").is_some());
    assert_eq!(run(&e, b"get a b\r\n", NOW).await, "END\r\n");
    assert_eq!(run(&e, b"add a 0 0 1\r\nz\r\n", NOW).await, "STORED\r\n");
    assert_eq!(
        run(&e, b"get a\r\n", NOW).await,
        "VALUE a 0 1\r\nz\r\nEND\r\n"
    );
    assert_eq!(
        run(&e, b"replace b 0 0 1\r\nz\r\n", NOW).await,
        "NOT_STORED\r\n"
    );
    assert_eq!(run(&e, b"incr b 1\r\n", NOW).await, "NOT_FOUND\r\n");
    assert_eq!(run(&e, b"delete b\r\n", NOW).await, "NOT_FOUND\r\n");
    // A delayed flush hides nothing until its time.
    assert_eq!(run(&e, b"flush_all 100 noreply\r\n", NOW).await, "");
    assert_eq!(
        run(&e, b"get a\r\n", NOW).await,
        "VALUE a 0 1\r\nz\r\nEND\r\n"
    );
    assert_eq!(
        run(&e, b"flush_all abc\r\n", NOW).await,
        "CLIENT_ERROR invalid exptime argument\r\n"
    );
}

#[tokio::test(start_paused = true)]
async fn flush_marker_is_read_at_most_once_a_second() {
    // max_local_age of 1 ms must not become a thousand marker reads a second.
    let options = EngineOptions {
        max_local_age: Duration::from_millis(1),
        ..EngineOptions::default()
    };
    assert_eq!(options.flush_poll_period(), MIN_FLUSH_POLL);
    let e = Arc::new(Engine::with_options(
        ItemCache::new(1 << 20, 4),
        MemoryStore::new(),
        options,
    ));
    let shutdown = tokio_util::sync::CancellationToken::new();
    let upkeep = tokio::spawn({
        let (e, shutdown) = (e.clone(), shutdown.clone());
        async move { e.run_upkeep(shutdown).await }
    });
    tokio::time::sleep(Duration::from_millis(3500)).await;
    shutdown.cancel();
    upkeep.await.unwrap();
    assert_eq!(e.store().calls(), 3, "one read at 1 s, 2 s and 3 s");
    // Longer ages are kept; zero (never re-read) still polls every 2 s.
    for (age, period) in [(5000, 5000), (0, 2000)] {
        let options = EngineOptions {
            max_local_age: Duration::from_millis(age),
            ..EngineOptions::default()
        };
        assert_eq!(options.flush_poll_period(), Duration::from_millis(period));
    }
}

#[tokio::test]
async fn flush_all_can_be_refused() {
    let options = EngineOptions {
        flush_enabled: false,
        ..EngineOptions::default()
    };
    let e = Engine::with_options(ItemCache::new(1 << 20, 4), MemoryStore::new(), options);
    run(&e, b"set a 0 0 1\r\nx\r\n", NOW).await;
    assert_eq!(
        run(&e, b"flush_all\r\n", NOW).await,
        "CLIENT_ERROR flush_all not allowed\r\n"
    );
    assert_eq!(
        run(&e, b"get a\r\n", NOW).await,
        "VALUE a 0 1\r\nx\r\nEND\r\n"
    );
}

#[tokio::test]
async fn gat_touches_and_returns() {
    let e = engine();
    run(&e, b"set k 1 0 1\r\nx\r\n", NOW).await;
    let unique = e.store().raw(b"k").unwrap().version;
    assert_eq!(
        run(&e, b"gat 100 k nope\r\n", NOW).await,
        "VALUE k 1 1\r\nx\r\nEND\r\n"
    );
    assert_eq!(e.store().raw(b"k").unwrap().expires_at, NOW + 100);
    // A touch is a write: the item gets a new cas unique (see the README).
    let touched = e.store().raw(b"k").unwrap().version;
    assert!(touched > unique);
    assert_eq!(
        run(&e, b"gats 0 k\r\n", NOW).await,
        format!(
            "VALUE k 1 1 {}\r\nx\r\nEND\r\n",
            e.store().raw(b"k").unwrap().version
        )
    );
    assert!(e.store().raw(b"k").unwrap().version > touched);
    assert_eq!(e.store().raw(b"k").unwrap().expires_at, 0);
    assert_eq!(run(&e, b"gat 100\r\n", NOW).await, "END\r\n");
}

#[tokio::test]
async fn stats_groups_are_well_formed() {
    let e = engine();
    run(&e, b"set k 0 0 1\r\nx\r\nget k\r\nget nope\r\n", NOW).await;
    let general = run(&e, b"stats\r\n", NOW).await;
    for name in [
        "pid",
        "uptime",
        "time",
        "version",
        "curr_connections",
        "total_connections",
        "cmd_get",
        "cmd_set",
        "cmd_touch",
        "get_hits",
        "get_misses",
        "delete_hits",
        "delete_misses",
        "incr_hits",
        "incr_misses",
        "decr_hits",
        "decr_misses",
        "cas_hits",
        "cas_misses",
        "cas_badval",
        "touch_hits",
        "touch_misses",
        "curr_items",
        "total_items",
        "bytes",
        "limit_maxbytes",
        "evictions",
        "bytes_read",
        "bytes_written",
        "rusage_user",
        "rusage_system",
        "cmd_flush",
        "rejected_connections",
        "reclaimed",
        "store_too_large",
        "store_no_memory",
    ] {
        assert!(
            general.contains(&format!("STAT {name} ")),
            "stats has {name}: {general}"
        );
    }
    assert!(general.contains("STAT get_hits 1\r\n") && general.contains("STAT get_misses 1\r\n"));
    assert!(general.ends_with("END\r\n"));
    for group in [
        "settings",
        "items",
        "slabs",
        "sizes",
        "conns",
        "detail dump",
        "cachedump 1 1",
    ] {
        let reply = run(&e, format!("stats {group}\r\n").as_bytes(), NOW).await;
        assert!(reply.ends_with("END\r\n"), "stats {group}: {reply}");
        assert!(
            reply.lines().all(|l| l == "END" || l.starts_with("STAT ")),
            "stats {group}: {reply}"
        );
    }
    assert_eq!(run(&e, b"stats reset\r\n", NOW).await, "RESET\r\n");
    assert!(
        run(&e, b"stats\r\n", NOW)
            .await
            .contains("STAT get_hits 0\r\n")
    );
    assert_eq!(run(&e, b"stats bogus\r\n", NOW).await, "ERROR\r\n");
}

#[tokio::test]
async fn operator_commands() {
    let e = engine();
    assert_eq!(run(&e, b"verbosity 1\r\n", NOW).await, "OK\r\n");
    assert_eq!(run(&e, b"verbosity 1 noreply\r\n", NOW).await, "");
    assert_eq!(run(&e, b"cache_memlimit 100\r\n", NOW).await, "OK\r\n");
    assert_eq!(e.cache().stats().limit_bytes, 100 << 20);
    assert_eq!(
        run(&e, b"cache_memlimit 1\r\n", NOW).await,
        "MEMLIMIT_TOO_SMALL cannot set maxbytes to less than 8m\r\n"
    );
    assert_eq!(
        run(&e, b"shutdown\r\n", NOW).await,
        "ERROR: shutdown not enabled\r\n"
    );
    assert_eq!(run(&e, b"mn\r\n", NOW).await, "MN\r\n");
}

#[tokio::test]
async fn endless_races_end_in_a_server_error() {
    let e = engine();
    run(&e, b"set n 0 0 1\r\n1\r\n", NOW).await;
    e.store().set_interfering(true);
    assert_eq!(
        run(&e, b"incr n 1\r\n", NOW).await,
        "SERVER_ERROR too much contention on this key, try again\r\n"
    );
    assert!(
        e.cache().get(b"n", NOW).is_none(),
        "the outcome is unknown: not cached"
    );
    e.store().set_interfering(false);
    assert_eq!(run(&e, b"incr n 1\r\n", NOW).await, "2\r\n");
}

#[tokio::test]
async fn meta_get_and_set() {
    let e = engine();
    assert_eq!(run(&e, b"mg k v\r\n", NOW).await, "EN\r\n");
    assert_eq!(run(&e, b"mg k v q k\r\n", NOW).await, "");
    assert_eq!(run(&e, b"mg k k O9\r\n", NOW).await, "EN kk O9\r\n");
    let reply = run(&e, b"ms k 2 T100 F5 c k O1\r\nhi\r\n", NOW).await;
    let version = e.store().raw(b"k").unwrap().version;
    assert_eq!(reply, format!("HD c{version} kk O1\r\n"));
    let stored = e.store().raw(b"k").unwrap();
    assert_eq!(
        (stored.value.as_slice(), stored.flags, stored.expires_at),
        (&b"hi"[..], 5, NOW + 100)
    );
    let calls = e.store().calls();
    assert_eq!(
        run(&e, b"mg k v f s t c k O2\r\n", NOW + 10).await,
        format!("VA 2 f5 s2 t90 c{version} kk O2\r\nhi\r\n")
    );
    assert_eq!(e.store().calls(), calls, "a hit is served from memory");
    assert_eq!(run(&e, b"mg k\r\n", NOW).await, "HD\r\n");
    // `h` and `l` are accepted and not answered.
    assert_eq!(run(&e, b"mg k h l s\r\n", NOW).await, "HD s2\r\n");
    assert_eq!(
        run(&e, b"ms k 2 q\r\nho\r\nmg k v\r\n", NOW).await,
        "VA 2\r\nho\r\n"
    );
}

#[tokio::test]
async fn meta_set_modes_are_conditional_puts() {
    let e = engine();
    assert_eq!(run(&e, b"ms k 1 MR\r\nx\r\n", NOW).await, "NS\r\n");
    assert_eq!(run(&e, b"ms k 1 MA\r\nx\r\n", NOW).await, "NS\r\n");
    assert_eq!(run(&e, b"ms k 1 ME\r\nb\r\n", NOW).await, "HD\r\n");
    assert_eq!(run(&e, b"ms k 1 ME c\r\nx\r\n", NOW).await, "NS c0\r\n");
    assert_eq!(
        run(&e, b"ms k 1 MA\r\nc\r\nms k 1 MP\r\na\r\n", NOW).await,
        "HD\r\nHD\r\n"
    );
    assert_eq!(run(&e, b"mg k v\r\n", NOW).await, "VA 3\r\nabc\r\n");
    let version = e.store().raw(b"k").unwrap().version;
    assert_eq!(run(&e, b"ms k 1 C1\r\nx\r\n", NOW).await, "EX\r\n");
    assert_eq!(run(&e, b"ms j 1 C1\r\nx\r\n", NOW).await, "NF\r\n");
    // Append under a cas: applied only to that version.
    assert_eq!(run(&e, b"ms k 1 MA C1\r\nd\r\n", NOW).await, "EX\r\n");
    let req = format!("ms k 1 MA C{version}\r\nd\r\nmg k v\r\n");
    assert_eq!(run(&e, req.as_bytes(), NOW).await, "HD\r\nVA 4\r\nabcd\r\n");
    let version = e.store().raw(b"k").unwrap().version;
    let req = format!("ms k 1 C{version}\r\nz\r\nmg k v\r\n");
    assert_eq!(run(&e, req.as_bytes(), NOW).await, "HD\r\nVA 1\r\nz\r\n");
}

#[tokio::test]
async fn meta_get_touch_and_vivify() {
    let e = engine();
    run(&e, b"ms k 1\r\nx\r\n", NOW).await;
    assert_eq!(run(&e, b"mg k T30 t v\r\n", NOW).await, "VA 1 t30\r\nx\r\n");
    assert_eq!(e.store().raw(b"k").unwrap().expires_at, NOW + 30);
    // N: the first miss creates an empty item and is told it won.
    assert_eq!(
        run(&e, b"mg n N30 v t s\r\n", NOW).await,
        "VA 0 t30 s0 W\r\n\r\n"
    );
    assert_eq!(e.store().raw(b"n").unwrap().expires_at, NOW + 30);
    assert_eq!(run(&e, b"mg n N30 s\r\n", NOW).await, "HD s0\r\n");
}

#[tokio::test]
async fn meta_delete() {
    let e = engine();
    assert_eq!(run(&e, b"md k\r\nmd k q\r\n", NOW).await, "NF\r\nNF\r\n");
    run(&e, b"ms k 1\r\nx\r\n", NOW).await;
    assert_eq!(run(&e, b"md k q k\r\nmg k\r\n", NOW).await, "EN\r\n");
    run(&e, b"ms k 1\r\nx\r\n", NOW).await;
    assert_eq!(run(&e, b"md k C1 O1 k\r\n", NOW).await, "EX O1 kk\r\n");
    let version = e.store().raw(b"k").unwrap().version;
    let req = format!("md k C{version}\r\nmg k v\r\nmd k\r\n");
    assert_eq!(run(&e, req.as_bytes(), NOW).await, "HD\r\nEN\r\nNF\r\n");
    assert!(e.cache().get(b"k", NOW).is_none());
}

#[tokio::test]
async fn meta_arithmetic() {
    let e = engine();
    assert_eq!(run(&e, b"ma c\r\nma c q\r\n", NOW).await, "NF\r\nNF\r\n");
    assert_eq!(run(&e, b"ma c N0 J10\r\n", NOW).await, "HD\r\n");
    assert_eq!(run(&e, b"ma c v\r\n", NOW).await, "VA 2\r\n11\r\n");
    assert_eq!(run(&e, b"ma c MD D3 v\r\n", NOW).await, "VA 1\r\n8\r\n");
    // Shrinking is space-padded in the item, not in the answer.
    assert_eq!(e.store().raw(b"c").unwrap().value, b"8 ");
    let reply = run(&e, b"ma c t c v k\r\n", NOW).await;
    let version = e.store().raw(b"c").unwrap().version;
    assert_eq!(reply, format!("VA 1 t-1 c{version} kc\r\n9\r\n"));
    assert_eq!(run(&e, b"ma c q v\r\n", NOW).await, "");
    assert_eq!(
        run(&e, b"ma c T50 t v\r\n", NOW).await,
        "VA 2 t50\r\n11\r\n"
    );
    assert_eq!(e.store().raw(b"c").unwrap().expires_at, NOW + 50);
    assert_eq!(run(&e, b"ma c C1 v\r\n", NOW).await, "EX\r\n");
    run(&e, b"ms s 2\r\nab\r\n", NOW).await;
    assert_eq!(
        run(&e, b"ma s q\r\n", NOW).await,
        "CLIENT_ERROR cannot increment or decrement non-numeric value\r\n"
    );
}

#[tokio::test]
async fn meta_debug_and_failures() {
    let e = engine();
    assert_eq!(run(&e, b"me k\r\n", NOW).await, "EN\r\n");
    run(&e, b"ms k 2 T100\r\nhi\r\n", NOW).await;
    let version = e.store().raw(b"k").unwrap().version;
    assert_eq!(
        run(&e, b"me k\r\n", NOW).await,
        format!("ME k exp=100 cas={version} size=3\r\n")
    );
    e.store().set_failing(true);
    let reply = run(&e, b"ms k 1 q\r\nx\r\n", NOW).await;
    assert!(reply.starts_with("SERVER_ERROR"), "{reply}");
    let reply = run(&e, b"mg j v q\r\n", NOW).await;
    assert!(reply.starts_with("SERVER_ERROR"), "never a miss: {reply}");
}

/// A write that timed out may land later. Until it is known not to, the key
/// is not served from memory nor filled from a read; once fenced it never
/// lands; and if it lands before the fence, readers see it at once.
#[tokio::test]
async fn a_write_of_unknown_outcome_is_fenced_and_never_served_stale() {
    let e = engine();
    run(&e, b"set k 0 0 2\r\nv0\r\n", NOW).await;
    e.store().set_timing_out(true);
    assert_eq!(
        run(&e, b"set k 0 0 4\r\nlate\r\n", NOW).await,
        "SERVER_ERROR dynamodb timed out\r\n"
    );
    e.store().set_timing_out(false);
    assert!(e.in_doubt(b"k"));
    // Reads go to the store and fill nothing while the write may land...
    assert_eq!(
        run(&e, b"get k\r\n", NOW).await,
        "VALUE k 0 2\r\nv0\r\nEND\r\n"
    );
    assert!(
        e.cache().get(b"k", NOW).is_none(),
        "not cached while in doubt"
    );
    // ...so when it does land, the next read sees it.
    assert_eq!(
        e.store().land_late(),
        [crate::store::Written::Done { chunks: 0 }]
    );
    assert_eq!(
        run(&e, b"get k\r\n", NOW).await,
        "VALUE k 0 4\r\nlate\r\nEND\r\n"
    );
    assert!(
        !e.in_doubt(b"k"),
        "a read that saw the write settles the doubt"
    );
    assert!(
        e.cache().get(b"k", NOW).is_some(),
        "and may be cached again"
    );

    // Fenced before it lands: it never does.
    e.store().set_timing_out(true);
    assert!(
        run(&e, b"delete k\r\n", NOW)
            .await
            .starts_with("SERVER_ERROR")
    );
    e.store().set_timing_out(false);
    assert_eq!(e.settle_doubts().await, 0, "fenced");
    assert!(!e.in_doubt(b"k"));
    assert!(matches!(
        e.store().land_late()[..],
        [crate::store::Written::Conflict(_)]
    ));
    assert_eq!(
        run(&e, b"get k\r\n", NOW).await,
        "VALUE k 0 4\r\nlate\r\nEND\r\n"
    );
    assert_eq!(e.counters().get(Event::WritesFenced), 1);

    // A key that held nothing is fenced by a tombstone.
    e.store().set_timing_out(true);
    assert!(
        run(&e, b"add new 0 0 1\r\nx\r\n", NOW)
            .await
            .starts_with("SERVER_ERROR")
    );
    e.store().set_timing_out(false);
    assert_eq!(e.settle_doubts().await, 0);
    assert!(matches!(
        e.store().land_late()[..],
        [crate::store::Written::Conflict(_)]
    ));
    assert_eq!(run(&e, b"get new\r\n", NOW).await, "END\r\n");
    assert_eq!(run(&e, b"add new 0 0 1\r\ny\r\n", NOW).await, "STORED\r\n");
}

/// Every mutating command goes through the one write path: counted by the
/// store calls it makes, each conditioned on what it replaces (a store
/// that takes every write for a conflict sees none land).
#[tokio::test]
async fn every_mutating_command_writes_conditionally() {
    let requests: &[&[u8]] = &[
        b"set k 0 0 1\r\nx\r\n",
        b"add k 0 0 1\r\nx\r\n",
        b"replace k 0 0 1\r\nx\r\n",
        b"append k 0 0 1\r\nx\r\n",
        b"prepend k 0 0 1\r\nx\r\n",
        b"cas k 0 0 1 VERSION\r\nx\r\n",
        b"incr n 1\r\n",
        b"decr n 1\r\n",
        b"touch k 10\r\n",
        b"gat 10 k\r\n",
        b"gats 10 k\r\n",
        b"delete k\r\n",
        b"ms k 1\r\nx\r\n",
        b"md k\r\n",
        b"ma n\r\n",
        b"mg k T10 v\r\n",
    ];
    for request in requests {
        let e = engine();
        run(&e, b"set k 0 0 1\r\nv\r\nset n 0 0 1\r\n5\r\n", NOW).await;
        let version = e.store().raw(b"k").unwrap().version;
        let request = String::from_utf8_lossy(request).replace("VERSION", &version.to_string());
        let before = (e.store().raw(b"k"), e.store().raw(b"n"));
        let writes = || {
            [Event::WritesDone, Event::WritesRefused, Event::WritesFailed]
                .map(|w| e.counters().get(w))
                .iter()
                .sum::<u64>()
        };
        let through_write_path = writes();
        // Another writer moves every key on before each write lands.
        e.store().set_interfering(true);
        let reply = run(&e, request.as_bytes(), NOW).await;
        e.store().set_interfering(false);
        assert!(
            writes() > through_write_path,
            "{request:?} went through the write path"
        );
        assert!(
            ![
                "STORED", "DELETED", "TOUCHED", "HD", "VALUE", "VA", "4", "5", "6"
            ]
            .iter()
            .any(|ok| reply.starts_with(ok)),
            "{request:?} cannot succeed when every expected version has moved on: {reply}"
        );
        let after = (e.store().raw(b"k"), e.store().raw(b"n"));
        let values = |(k, n): &(Option<Item>, Option<Item>)| {
            (
                k.as_ref().map(|i| i.value.clone()),
                n.as_ref().map(|i| i.value.clone()),
            )
        };
        assert_eq!(
            values(&after),
            values(&before),
            "{request:?} landed nothing"
        );
    }
}

// ---- fleet mode: the holes docs/fleet.md closes, one deterministic test
// each (a never-started fleet whose one peer's lease the test grants and
// takes away; the peers' side is tests/fleet.rs)

fn fleet_engine() -> (Arc<Engine<MemoryStore>>, Arc<Fleet<MemoryStore>>) {
    let options = EngineOptions {
        max_local_age: std::time::Duration::ZERO,
        ..EngineOptions::default()
    };
    let e = Arc::new(Engine::with_options(
        ItemCache::new(1 << 20, 4),
        MemoryStore::new(),
        options,
    ));
    let fleet = e.join_fleet(crate::fleet::FleetOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        advertise: "127.0.0.1:0".into(),
        lease: std::time::Duration::from_secs(60),
        membership_period: std::time::Duration::from_secs(60),
        secret: "s".into(),
    });
    let cache: std::sync::Weak<dyn crate::fleet::LocalCache> =
        Arc::downgrade(&e) as std::sync::Weak<dyn crate::fleet::LocalCache>;
    fleet.test_attach(cache);
    (e, fleet)
}

/// `get k` answered from memory (true) or not.
async fn hit(e: &Engine<MemoryStore>, request: &[u8], expected: &str) -> bool {
    let hits = e.counters().get(Event::CacheHits);
    assert_eq!(run(e, request, NOW).await, expected);
    e.counters().get(Event::CacheHits) > hits
}

fn item(value: &[u8], version: u64) -> Item {
    Item {
        value: value.to_vec(),
        flags: 0,
        expires_at: 0,
        version,
        chunks: 0,
    }
}

/// (a) After a lapse, nothing filled before it is served: writes made
/// meanwhile did not wait for this member.
#[tokio::test]
async fn fleet_after_a_lapse_serves_nothing_filled_before_it() {
    let (e, fleet) = fleet_engine();
    fleet.test_lease(60_000).await;
    assert_eq!(run(&e, b"set k 0 0 2\r\nv1\r\n", NOW).await, "STORED\r\n");
    assert!(hit(&e, b"get k\r\n", "VALUE k 0 2\r\nv1\r\nEND\r\n").await);
    // The lease lapses: memory is not served, reads go through.
    fleet.test_lease(0).await;
    assert!(!hit(&e, b"get k\r\n", "VALUE k 0 2\r\nv1\r\nEND\r\n").await);
    // Meanwhile a peer writes k without waiting for us.
    let k = e.store().raw(b"k").unwrap();
    e.store().insert_raw(b"k", item(b"v2", k.version + 1));
    // Regained: the old copy is gone.
    fleet.test_lease(60_000).await;
    assert!(!hit(&e, b"get k\r\n", "VALUE k 0 2\r\nv2\r\nEND\r\n").await);
    assert!(hit(&e, b"get k\r\n", "VALUE k 0 2\r\nv2\r\nEND\r\n").await);
}

/// (a) ...and the flush marker is re-read: a `flush_all` made during the
/// lapse did not wait for this member either.
#[tokio::test]
async fn fleet_after_a_lapse_rereads_the_flush_marker() {
    let (e, fleet) = fleet_engine();
    fleet.test_lease(60_000).await;
    assert_eq!(run(&e, b"set f 0 0 1\r\nx\r\n", NOW).await, "STORED\r\n");
    fleet.test_lease(0).await;
    let flush_at = e.store().raw(b"f").unwrap().version + 1;
    e.store()
        .insert_raw(super::admin::FLUSH_MARKER_KEY, item(b"", flush_at));
    fleet.test_lease(60_000).await;
    assert_eq!(run(&e, b"get f\r\n", NOW).await, "END\r\n");
}

/// (b) An invalidation ends the key's read in flight: neither it nor a get
/// that joined it caches the older value it read.
#[tokio::test]
async fn fleet_an_invalidation_ends_the_reads_in_flight() {
    let (e, fleet) = fleet_engine();
    fleet.test_lease(60_000).await;
    e.store().insert_raw(b"k", item(b"v1", 1));
    e.store().hold_answers(true);
    let first = tokio::spawn({
        let e = e.clone();
        async move { run(&e, b"get k\r\n", NOW).await }
    });
    while e.store().answers_waiting() == 0 {
        tokio::task::yield_now().await;
    }
    let joined = tokio::spawn({
        let e = e.clone();
        async move { run(&e, b"get k\r\n", NOW).await }
    });
    while e.reads.get(&b"k"[..]).is_none_or(|f| f.followers() == 0) {
        tokio::task::yield_now().await;
    }
    // A peer's write lands and is invalidated here, the reads still out.
    e.store().insert_raw(b"k", item(b"v2", 2));
    crate::fleet::LocalCache::invalidate(&*e, b"k", None);
    e.store().hold_answers(false);
    // They began before the write: the older value is a fair answer...
    assert_eq!(first.await.unwrap(), "VALUE k 0 2\r\nv1\r\nEND\r\n");
    assert_eq!(joined.await.unwrap(), "VALUE k 0 2\r\nv1\r\nEND\r\n");
    // ...but it was not cached.
    assert!(!hit(&e, b"get k\r\n", "VALUE k 0 2\r\nv2\r\nEND\r\n").await);
}

/// (c) Without its leases, a member does not serve old copies even when
/// DynamoDB fails and `stale_on_error` allows stale copies.
#[tokio::test]
async fn fleet_stale_on_error_needs_the_leases() {
    let (e, fleet) = fleet_engine();
    fleet.test_lease(60_000).await;
    assert_eq!(run(&e, b"set k 0 0 2\r\nv1\r\n", NOW).await, "STORED\r\n");
    fleet.test_lease(0).await;
    e.store().set_failing(true);
    assert!(run(&e, b"get k\r\n", NOW).await.starts_with("SERVER_ERROR"));
}

/// (d) A peer's write of unknown outcome: the key stays uncached while a
/// read still shows the version that write expects, so when it lands late
/// the older value is not served from memory.
#[tokio::test]
async fn fleet_a_peer_write_of_unknown_outcome_keeps_the_key_uncached() {
    let (e, fleet) = fleet_engine();
    fleet.test_lease(60_000).await;
    e.store().insert_raw(b"k", item(b"v1", 100));
    assert!(!hit(&e, b"get k\r\n", "VALUE k 0 2\r\nv1\r\nEND\r\n").await);
    assert!(hit(&e, b"get k\r\n", "VALUE k 0 2\r\nv1\r\nEND\r\n").await);
    // The peer's write expected version 100 and would leave 200; it timed out.
    crate::fleet::LocalCache::invalidate(&*e, b"k", Some((Some(100), 200)));
    assert!(!hit(&e, b"get k\r\n", "VALUE k 0 2\r\nv1\r\nEND\r\n").await);
    assert!(!hit(&e, b"get k\r\n", "VALUE k 0 2\r\nv1\r\nEND\r\n").await);
    // It lands: no message says so, and the new value is read at once.
    e.store().insert_raw(b"k", item(b"v2", 200));
    assert!(!hit(&e, b"get k\r\n", "VALUE k 0 2\r\nv2\r\nEND\r\n").await);
    // Seen landed: cached again.
    assert!(hit(&e, b"get k\r\n", "VALUE k 0 2\r\nv2\r\nEND\r\n").await);
}

/// (b) ...and a write of the key in flight here when a peer's write of it
/// is invalidated: which is newer the cache cannot tell, so neither is kept.
#[tokio::test]
async fn fleet_an_invalidation_keeps_a_write_in_flight_out_of_the_cache() {
    let (e, fleet) = fleet_engine();
    fleet.test_lease(60_000).await;
    e.store().hold_answers(true);
    let ours = tokio::spawn({
        let e = e.clone();
        async move { run(&e, b"set k 0 0 2\r\nv1\r\n", NOW).await }
    });
    while e.store().answers_waiting() == 0 {
        tokio::task::yield_now().await;
    }
    // Our write has landed; a peer's lands after it and is invalidated here
    // before our answer comes back.
    let landed = e.store().raw(b"k").unwrap();
    e.store().insert_raw(b"k", item(b"v2", landed.version + 1));
    crate::fleet::LocalCache::invalidate(&*e, b"k", None);
    e.store().hold_answers(false);
    assert_eq!(ours.await.unwrap(), "STORED\r\n");
    assert!(!hit(&e, b"get k\r\n", "VALUE k 0 2\r\nv2\r\nEND\r\n").await);
}

/// Not coherent, a get does not join a read already in flight: that read
/// may predate a peer's write acknowledged since without waiting for this
/// member.
#[tokio::test]
async fn fleet_without_the_leases_a_get_joins_no_read_in_flight() {
    let (e, fleet) = fleet_engine();
    fleet.test_lease(60_000).await;
    e.store().insert_raw(b"k", item(b"v1", 1));
    e.store().hold_answers(true);
    let first = tokio::spawn({
        let e = e.clone();
        async move { run(&e, b"get k\r\n", NOW).await }
    });
    while e.store().answers_waiting() == 0 {
        tokio::task::yield_now().await;
    }
    // The lease lapses; a peer's write is acknowledged without us.
    fleet.test_lease(0).await;
    e.store().insert_raw(b"k", item(b"v2", 2));
    let later = tokio::spawn({
        let e = e.clone();
        async move { run(&e, b"get k\r\n", NOW).await }
    });
    // It reads for itself (two reads held), or has joined the first.
    while e.store().answers_waiting() < 2
        && e.reads.get(&b"k"[..]).is_none_or(|f| f.followers() == 0)
    {
        tokio::task::yield_now().await;
    }
    e.store().hold_answers(false);
    assert_eq!(first.await.unwrap(), "VALUE k 0 2\r\nv1\r\nEND\r\n");
    assert_eq!(later.await.unwrap(), "VALUE k 0 2\r\nv2\r\nEND\r\n");
}

fn with_age(max_local_age: Duration, negative_caching: bool) -> Engine<MemoryStore> {
    let options = EngineOptions {
        max_local_age,
        negative_caching,
        ..EngineOptions::default()
    };
    Engine::with_options(ItemCache::new(1 << 20, 4), MemoryStore::new(), options)
}

#[tokio::test]
async fn a_read_that_finds_nothing_is_remembered_until_a_write() {
    let e = with_age(Duration::from_secs(3600), true);
    assert_eq!(run(&e, b"get nope\r\n", NOW).await, "END\r\n");
    let calls = e.store().calls();
    for _ in 0..5 {
        assert_eq!(
            run(&e, b"get nope\r\nmg nope v\r\n", NOW).await,
            "END\r\nEN\r\n"
        );
    }
    assert_eq!(e.store().calls(), calls, "answered from the negative entry");
    assert_eq!(e.counters().get(Event::CacheNegativeHits), 10);
    // In a multi-get, only the keys not known absent are read.
    run(&e, b"get nope other\r\n", NOW).await;
    assert_eq!(e.store().calls(), calls + 1);
    // Charged like any entry, but not an item (memcached's curr_items).
    let stats = e.cache().stats();
    assert_eq!(stats.items, 0, "keys known absent are not items");
    assert!(stats.bytes > 0, "they are charged");
    // A write replaces it: the value is served, from memory.
    assert_eq!(run(&e, b"set nope 0 0 1\r\nx\r\n", NOW).await, "STORED\r\n");
    assert_eq!(
        run(&e, b"get nope\r\n", NOW).await,
        "VALUE nope 0 1\r\nx\r\nEND\r\n"
    );
    // A delete leaves it known absent; so does a refused write.
    assert_eq!(run(&e, b"delete nope\r\n", NOW).await, "DELETED\r\n");
    let calls = e.store().calls();
    assert_eq!(run(&e, b"get nope\r\n", NOW).await, "END\r\n");
    assert_eq!(
        run(&e, b"replace never 0 0 1\r\nx\r\n", NOW).await,
        "NOT_STORED\r\n"
    );
    let calls_after_replace = e.store().calls();
    assert_eq!(run(&e, b"get never\r\n", NOW).await, "END\r\n");
    assert_eq!(e.store().calls(), calls_after_replace);
    assert!(calls_after_replace > calls);
    // `add` is decided by the store, never by a negative entry.
    assert_eq!(run(&e, b"add nope 0 0 1\r\ny\r\n", NOW).await, "STORED\r\n");
    assert_eq!(
        run(&e, b"get nope\r\n", NOW).await,
        "VALUE nope 0 1\r\ny\r\nEND\r\n"
    );
}

#[tokio::test]
async fn a_negative_entry_lasts_max_local_age_at_most() {
    let e = with_age(Duration::from_millis(100), true);
    assert_eq!(run(&e, b"get k\r\n", NOW).await, "END\r\n");
    // Another writer creates the key behind this engine's back.
    e.store().insert_raw(b"k", item(b"theirs", 7));
    assert_eq!(
        run(&e, b"get k\r\n", NOW).await,
        "END\r\n",
        "within the bound"
    );
    // Waiting out the bound itself (100 ms of real time: the engine's clock).
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(
        run(&e, b"get k\r\n", NOW).await,
        "VALUE k 0 6\r\ntheirs\r\nEND\r\n"
    );
    // During an outage an aged negative entry is an error, never a miss.
    run(&e, b"get gone\r\n", NOW).await;
    tokio::time::sleep(Duration::from_millis(150)).await;
    e.store().set_failing(true);
    let reply = run(&e, b"get gone\r\n", NOW).await;
    assert!(reply.starts_with("SERVER_ERROR "), "{reply}");
}

#[tokio::test]
async fn negative_caching_can_be_turned_off() {
    let e = with_age(Duration::from_secs(3600), false);
    run(&e, b"get nope\r\n", NOW).await;
    let calls = e.store().calls();
    run(&e, b"get nope\r\nget nope\r\n", NOW).await;
    assert_eq!(e.store().calls(), calls + 2, "every miss reads");
    assert_eq!(e.cache().stats().items, 0);
}

#[tokio::test]
async fn a_written_key_outlasts_keys_read_once_or_deleted_unseen() {
    // A crawler's misses (each read once, remembered absent, never again),
    // and a cleanup job's deletes of keys that are not there (each leaves a
    // negative entry, filled as a read would be).
    for (noise, answer) in [("get bot", "END\r\n"), ("delete gone", "NOT_FOUND\r\n")] {
        // One shard with room for a few dozen small entries.
        let e = Engine::new(ItemCache::new(4096, 1), MemoryStore::new());
        assert_eq!(
            run(&e, b"set session 0 0 5\r\nalice\r\n", NOW).await,
            "STORED\r\n"
        );
        for i in 0..200 {
            let request = format!("{noise}{i}\r\n");
            assert_eq!(run(&e, request.as_bytes(), NOW).await, answer);
        }
        // The written key started in the main queue: the one-time entries
        // passed through the small one without displacing it.
        let calls = e.store().calls();
        assert_eq!(
            run(&e, b"get session\r\n", NOW).await,
            "VALUE session 0 5\r\nalice\r\nEND\r\n"
        );
        assert_eq!(e.store().calls(), calls, "{noise}: still in memory");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_is_as_old_as_when_it_was_asked() {
    // max_local_age counts from when the read was sent: an answer that
    // took longer than the bound to come back is too old to serve again.
    let e = Arc::new(with_age(Duration::from_millis(200), true));
    e.store().insert_raw(b"k", item(b"v1", 1));
    e.store().hold_answers(true);
    let first = tokio::spawn({
        let e = e.clone();
        async move { run(&e, b"get k\r\n", NOW).await }
    });
    while e.store().answers_waiting() == 0 {
        tokio::task::yield_now().await;
    }
    // The answer is taken; it comes back after the bound has passed.
    tokio::time::sleep(Duration::from_millis(250)).await;
    e.store().hold_answers(false);
    assert_eq!(first.await.unwrap(), "VALUE k 0 2\r\nv1\r\nEND\r\n");
    assert!(
        !hit(&e, b"get k\r\n", "VALUE k 0 2\r\nv1\r\nEND\r\n").await,
        "read again, not served from a copy 250 ms old"
    );
}
