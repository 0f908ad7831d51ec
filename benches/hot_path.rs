//! Micro-benchmarks of the hit path's parts: parsing, encoding, the cache,
//! a whole `get` hit (and a 100-key multi-get) through the engine, and the
//! connection loop over an in-memory stream (in-memory store: no DynamoDB).
//!
//! Each group has a baseline measured in the same run (a `Mutex<HashMap>`
//! lookup, a bare `memchr`-free line split) so results read as ratios, which
//! survive noisy machines better than absolute times.
//! Run: `cargo bench --bench hot_path`.

use std::collections::HashMap;
use std::hint::black_box;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use criterion::{Criterion, criterion_group, criterion_main};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use dynacache::cache::{Entry, ItemCache};

/// The binary's allocator: a hit allocates its copy of the item.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use dynacache::connection::ConnectionOptions;
use dynacache::engine::Engine;
use dynacache::output::{Output, ReplyBudget};
use dynacache::protocol::{Limits, Parsed, Reply, parse};
use dynacache::store::MemoryStore;

fn protocol(c: &mut Criterion) {
    let limits = Limits::default();
    let mut g = c.benchmark_group("parse");
    let get = b"get :1:django.contrib.sessions.cacheabcdefghijklmnopqrstuvwxyz012345\r\n";
    g.bench_function("baseline/find_newline", |b| {
        b.iter(|| black_box(get.iter().position(|&c| c == b'\n')))
    });
    g.bench_function("get_1_key", |b| {
        b.iter(|| matches!(parse(black_box(get), &limits), Parsed::Request(..)))
    });
    let multi: Vec<u8> = {
        let mut v = b"get".to_vec();
        for i in 0..100 {
            v.extend_from_slice(format!(" key:{i:04}").as_bytes());
        }
        v.extend_from_slice(b"\r\n");
        v
    };
    g.bench_function("get_100_keys", |b| {
        b.iter(|| match parse(black_box(&multi), &limits) {
            Parsed::Request(dynacache::protocol::Command::Get { keys, .. }, _) => {
                keys.iter().count()
            }
            _ => unreachable!(),
        })
    });
    let set = [
        &b"set session:abc 1 3600 100\r\n"[..],
        &[b'x'; 100],
        b"\r\n",
    ]
    .concat();
    g.bench_function("set_100_bytes", |b| {
        b.iter(|| matches!(parse(black_box(&set), &limits), Parsed::Request(..)))
    });
    g.finish();

    let mut g = c.benchmark_group("encode");
    let data = [b'v'; 100];
    let mut out = BytesMut::with_capacity(4096);
    g.bench_function("baseline/memcpy_100_bytes", |b| {
        b.iter(|| {
            out.clear();
            out.extend_from_slice(black_box(&data));
        })
    });
    g.bench_function("value_100_bytes", |b| {
        b.iter(|| {
            out.clear();
            Reply::Value {
                key: b"session:abc",
                flags: 1,
                data: black_box(&data),
                cas: None,
            }
            .encode(&mut out);
        })
    });
    g.finish();
}

fn cache(c: &mut Criterion) {
    const KEYS: usize = 100_000;
    let keys: Vec<Vec<u8>> = (0..KEYS)
        .map(|i| format!("key:{i:08}").into_bytes())
        .collect();
    let value = [b'v'; 100];

    let mut g = c.benchmark_group("cache");
    let baseline: Mutex<HashMap<Vec<u8>, Vec<u8>>> =
        Mutex::new(keys.iter().map(|k| (k.clone(), value.to_vec())).collect());
    let mut i = 0;
    g.bench_function("baseline/mutex_hashmap_get", |b| {
        b.iter(|| {
            i = (i + 7919) % KEYS;
            black_box(baseline.lock().unwrap().get(&keys[i]).map(|v| v.len()))
        })
    });

    let cache = ItemCache::new(1 << 30, 16);
    for k in &keys {
        cache.insert(Entry::new(k, &value, 0, 0, 1));
    }
    g.bench_function("get_hit_in_place", |b| {
        b.iter(|| {
            i = (i + 7919) % KEYS;
            black_box(cache.get_with(&keys[i], 0, |e| e.value().len()))
        })
    });
    g.bench_function("get_hit_copy", |b| {
        b.iter(|| {
            i = (i + 7919) % KEYS;
            black_box(cache.get(&keys[i], 0).map(|e| e.value.len()))
        })
    });
    g.bench_function("insert_replace", |b| {
        b.iter(|| {
            i = (i + 7919) % KEYS;
            cache.insert(Entry::new(&keys[i], &value, 0, 0, 2))
        })
    });
    // A budget of a tenth of the keys: every insert evicts.
    let small = ItemCache::new(
        (KEYS / 10 * dynacache::cache::entry_charge(value.len() + 12)) as u64,
        16,
    );
    g.bench_function("insert_evict", |b| {
        b.iter(|| {
            i = (i + 7919) % KEYS;
            small.insert(Entry::new(&keys[i], &value, 0, 0, 2))
        })
    });
    g.finish();
}

/// Runs `cmd` with its replies going to an output over a sink, as a
/// connection's go; `buf` is the reply buffer, kept between runs.
async fn execute(
    engine: &Engine<MemoryStore>,
    cmd: dynacache::protocol::Command<'_>,
    buf: &mut BytesMut,
    budget: &ReplyBudget,
) {
    let mut sink = tokio::io::sink();
    let mut out = Output::to(
        &mut sink,
        budget,
        Duration::from_secs(1),
        std::mem::take(buf),
    );
    engine.execute(cmd, &mut out).await;
    *buf = out.into_buf();
}

fn engine(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let engine = Engine::new(ItemCache::new(1 << 26, 16), MemoryStore::new());
    let limits = Limits::default();
    let budget = ReplyBudget::new(1 << 28);
    let mut out = BytesMut::with_capacity(4096);
    rt.block_on(async {
        let set = [&b"set session:abc 1 0 100\r\n"[..], &[b'x'; 100], b"\r\n"].concat();
        let Parsed::Request(cmd, _) = parse(&set, &limits) else {
            unreachable!()
        };
        execute(&engine, cmd, &mut out, &budget).await;
    });
    let get = b"get session:abc\r\n";
    c.bench_function("engine/get_hit_parse_execute_encode", |b| {
        b.iter(|| {
            out.clear();
            let Parsed::Request(cmd, _) = parse(black_box(get), &limits) else {
                unreachable!()
            };
            rt.block_on(execute(&engine, cmd, &mut out, &budget));
        })
    });

    // A multi-get of 100 keys, all hits: the cost per key of the fast path.
    let mut multi = b"get".to_vec();
    rt.block_on(async {
        for i in 0..100 {
            let key = format!("key:{i:04}");
            let set = [
                format!("set {key} 0 0 32\r\n").as_bytes(),
                &[b'v'; 32],
                b"\r\n",
            ]
            .concat();
            let Parsed::Request(cmd, _) = parse(&set, &limits) else {
                unreachable!()
            };
            execute(&engine, cmd, &mut out, &budget).await;
            multi.extend_from_slice(format!(" {key}").as_bytes());
        }
    });
    multi.extend_from_slice(b"\r\n");
    c.bench_function("engine/get_100_hits", |b| {
        b.iter(|| {
            out.clear();
            let Parsed::Request(cmd, _) = parse(black_box(&multi), &limits) else {
                unreachable!()
            };
            rt.block_on(execute(&engine, cmd, &mut out, &budget));
        })
    });
}

/// The whole per-connection loop (read, parse, execute, encode, one write per
/// batch) over an in-memory stream: what a hit costs besides the syscalls.
fn connection(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let engine = Arc::new(Engine::new(ItemCache::new(1 << 26, 16), MemoryStore::new()));
    let options = ConnectionOptions::default();
    let shutdown = CancellationToken::new();
    let (mut client, server) = tokio::io::duplex(1 << 20);
    rt.spawn({
        let (engine, shutdown) = (engine.clone(), shutdown.clone());
        async move { dynacache::connection::serve(server, &engine, &options, &shutdown).await }
    });
    let set = [&b"set session:abc 1 0 100\r\n"[..], &[b'x'; 100], b"\r\n"].concat();
    let mut reply = vec![0u8; 8];
    rt.block_on(async {
        client.write_all(&set).await.unwrap();
        client.read_exact(&mut reply).await.unwrap();
    });
    assert_eq!(reply, b"STORED\r\n");
    let one = b"VALUE session:abc 1 100\r\n".len() + 100 + 2 + b"END\r\n".len();
    for depth in [1usize, 16] {
        let batch = b"get session:abc\r\n".repeat(depth);
        let mut replies = vec![0u8; one * depth];
        c.bench_function(&format!("connection/{depth}_pipelined_get_hits"), |b| {
            b.iter(|| {
                rt.block_on(async {
                    client.write_all(&batch).await.unwrap();
                    client.read_exact(&mut replies).await.unwrap();
                })
            })
        });
    }
    shutdown.cancel();
}

criterion_group!(benches, protocol, cache, engine, connection);
criterion_main!(benches);
