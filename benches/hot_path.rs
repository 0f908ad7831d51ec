//! Micro-benchmarks of the hit path's parts: parsing, encoding, the cache,
//! and a whole `get` hit through the engine (in-memory store: no DynamoDB).
//!
//! Each group has a baseline measured in the same run (a `Mutex<HashMap>`
//! lookup, a bare `memchr`-free line split) so results read as ratios, which
//! survive noisy machines better than absolute times.
//! Run: `cargo bench --bench hot_path`.

use std::collections::HashMap;
use std::hint::black_box;
use std::sync::Mutex;

use bytes::BytesMut;
use criterion::{Criterion, criterion_group, criterion_main};

use dynacache::cache::{Entry, ItemCache};
use dynacache::engine::Engine;
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
    g.bench_function("get_hit", |b| {
        b.iter(|| {
            i = (i + 7919) % KEYS;
            black_box(cache.get(&keys[i], 0).map(|e| e.value().len()))
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
        (KEYS / 10 * (value.len() + 12 + dynacache::cache::ENTRY_OVERHEAD)) as u64,
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

fn engine(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let engine = Engine::new(ItemCache::new(1 << 26, 16), MemoryStore::new());
    let limits = Limits::default();
    let mut out = BytesMut::with_capacity(4096);
    rt.block_on(async {
        let set = [&b"set session:abc 1 0 100\r\n"[..], &[b'x'; 100], b"\r\n"].concat();
        let Parsed::Request(cmd, _) = parse(&set, &limits) else {
            unreachable!()
        };
        engine.execute(cmd, &mut out).await;
    });
    let get = b"get session:abc\r\n";
    c.bench_function("engine/get_hit_parse_execute_encode", |b| {
        b.iter(|| {
            out.clear();
            let Parsed::Request(cmd, _) = parse(black_box(get), &limits) else {
                unreachable!()
            };
            rt.block_on(engine.execute(cmd, &mut out));
        })
    });
}

criterion_group!(benches, protocol, cache, engine);
criterion_main!(benches);
