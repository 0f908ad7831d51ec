//! Values as large as memcached's: 1,000,000-byte values (incompressible
//! and compressible) through every command, across restarts and sidecars,
//! expiring, and leaving no chunk item behind (the table is scanned through
//! the SDK); concurrent writers on one chunked key; what compression saves
//! in the write units DynamoDB reports.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use aws_sdk_dynamodb::types::AttributeValue;
use dynacache::engine::EngineOptions;
use dynacache::store::DynamoSettings;

use common::corpus;
use common::proxy::FaultProxy;
use common::{DynamoLocal, McClient, TestServer, WAIT, table_item};

const MB: usize = 1_000_000;

/// A storage command with its data block.
fn storage(
    cmd: &str,
    key: &str,
    flags: u32,
    exptime: i64,
    value: &[u8],
    cas: Option<u64>,
) -> Vec<u8> {
    let cas = cas.map(|c| format!(" {c}")).unwrap_or_default();
    let mut req = format!("{cmd} {key} {flags} {exptime} {}{cas}\r\n", value.len()).into_bytes();
    req.extend_from_slice(value);
    req.extend_from_slice(b"\r\n");
    req
}

/// What `get`/`gets` answer for one key holding `value`.
fn value_reply(key: &str, flags: u32, value: &[u8], cas: Option<u64>) -> Vec<u8> {
    let cas = cas.map(|c| format!(" {c}")).unwrap_or_default();
    let mut reply = format!("VALUE {key} {flags} {}{cas}\r\n", value.len()).into_bytes();
    reply.extend_from_slice(value);
    reply.extend_from_slice(b"\r\nEND\r\n");
    reply
}

/// The cas unique of `key`, by `gets`, checking the value on the way.
async fn gets(c: &mut McClient, key: &str, value: &[u8]) -> u64 {
    let reply = c.call_bytes(format!("gets {key}\r\n").as_bytes()).await;
    let head_end = reply.windows(2).position(|w| w == b"\r\n").unwrap();
    let head = String::from_utf8(reply[..head_end].to_vec()).unwrap();
    let cas: u64 = head.rsplit(' ').next().unwrap().parse().unwrap();
    assert_eq!(
        reply,
        value_reply(key, 0, value, Some(cas)),
        "gets {key}: {head}"
    );
    cas
}

async fn get_is(c: &mut McClient, key: &str, value: &[u8], what: &str) {
    let reply = c.call_bytes(format!("get {key}\r\n").as_bytes()).await;
    assert!(
        reply == value_reply(key, 0, value, None),
        "{what}: get {key} answered {} bytes, starting {:?}",
        reply.len(),
        String::from_utf8_lossy(&reply[..reply.len().min(80)])
    );
}

async fn get_misses(c: &mut McClient, key: &str, what: &str) {
    let reply = c.call_bytes(format!("get {key}\r\n").as_bytes()).await;
    assert!(
        reply == b"END\r\n",
        "{what}: get {key} answered {} bytes, starting {:?}",
        reply.len(),
        String::from_utf8_lossy(&reply[..reply.len().min(80)])
    );
}

/// The chunk items the table holds for `key` (a scan through the SDK), with
/// their attributes.
async fn chunks_of(
    db: &DynamoLocal,
    settings: &DynamoSettings,
    key: &str,
) -> Vec<HashMap<String, AttributeValue>> {
    let mut found = Vec::new();
    let mut start = None;
    loop {
        let page = db
            .client()
            .scan()
            .table_name(&settings.table)
            .consistent_read(true)
            .filter_expression("begins_with(#k, :p)")
            .expression_attribute_names("#k", &settings.key_attribute)
            .expression_attribute_values(":p", AttributeValue::S("dynacache chunk ".into()))
            .set_exclusive_start_key(start)
            .send()
            .await
            .unwrap();
        for item in page.items() {
            let k = item[&settings.key_attribute].as_s().unwrap();
            if k.ends_with(&format!(" {key}")) {
                found.push(item.clone());
            }
        }
        start = page.last_evaluated_key().cloned();
        if start.is_none() {
            return found;
        }
    }
}

/// How many items besides the head hold `key`'s value (the head's `chunks`).
async fn head_chunks(db: &DynamoLocal, settings: &DynamoSettings, key: &str) -> usize {
    let item = table_item(&db.client(), settings, key).await.unwrap();
    item.get("chunks")
        .map_or(0, |n| n.as_n().unwrap().parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn million_byte_values_work_with_every_command() {
    let db = DynamoLocal::shared().await;
    let settings = db.new_table().await;
    let a = TestServer::start(settings.clone()).await;
    // The second sidecar re-reads DynamoDB on every get (without fleet mode
    // it would serve its own copy for max_local_age after a write elsewhere).
    let rereads = EngineOptions {
        max_local_age: Duration::from_millis(1),
        ..EngineOptions::default()
    };
    let b = TestServer::start_custom(settings.clone(), 64 << 20, rereads.clone(), None).await;
    let (mut ca, mut cb) = (a.client().await, b.client().await);
    for (kind, value) in [
        ("random", corpus::random(MB, 1)),
        ("html", corpus::html(MB, 2)),
    ] {
        let key = format!("big-{kind}");
        assert_eq!(
            ca.call(&storage("set", &key, 0, 0, &value, None)).await,
            "STORED\r\n",
            "{kind}"
        );
        // Incompressible: split over items; HTML: compressed into one.
        let chunks = head_chunks(&db, &settings, &key).await;
        match kind {
            "random" => assert_eq!(chunks, 2, "1 MB over three items"),
            _ => assert_eq!(chunks, 0, "1 MB of HTML compresses into one item"),
        }
        assert_eq!(chunks_of(&db, &settings, &key).await.len(), chunks);
        get_is(&mut ca, &key, &value, "from the writer's memory").await;
        get_is(&mut cb, &key, &value, "through a second sidecar").await;
        let cas = gets(&mut ca, &key, &value).await;
        assert_eq!(gets(&mut cb, &key, &value).await, cas, "one cas everywhere");

        // append and prepend: a new value of about the same size, whole.
        let mut grown = value.clone();
        grown.extend_from_slice(b"-tail");
        assert_eq!(
            cb.call(&storage("append", &key, 0, 0, b"-tail", None))
                .await,
            "STORED\r\n"
        );
        let mut grown2 = b"head-".to_vec();
        grown2.extend_from_slice(&grown);
        assert_eq!(
            ca.call(&storage("prepend", &key, 0, 0, b"head-", None))
                .await,
            "STORED\r\n"
        );
        get_is(&mut ca, &key, &grown2, "after append and prepend").await;
        get_is(
            &mut cb,
            &key,
            &grown2,
            "after append and prepend, elsewhere",
        )
        .await;

        // cas: the old unique is refused, the current one stores.
        let replacement = corpus::random(MB - 1, 7);
        assert_eq!(
            ca.call(&storage("cas", &key, 0, 0, &replacement, Some(cas)))
                .await,
            "EXISTS\r\n"
        );
        let cas = gets(&mut cb, &key, &grown2).await;
        assert_eq!(
            ca.call(&storage("cas", &key, 0, 0, &replacement, Some(cas)))
                .await,
            "STORED\r\n"
        );
        get_is(&mut cb, &key, &replacement, "after cas").await;

        // An append or prepend that would grow it past item_size_max (1 MiB)
        // is not stored, as memcached answers, and the value stays whole
        // (a compressible value must not grow without bound in one item).
        let past = vec![b'x'; 60_000];
        for (command, c) in [("append", &mut ca), ("prepend", &mut cb)] {
            assert_eq!(
                c.call(&storage(command, &key, 0, 0, &past, None)).await,
                "NOT_STORED\r\n",
                "{command} past item_size_max"
            );
        }
        get_is(&mut cb, &key, &replacement, "after refused appends").await;

        // touch: the head and every chunk take the new expiry.
        assert_eq!(
            ca.call(format!("touch {key} 3600\r\n").as_bytes()).await,
            "TOUCHED\r\n"
        );
        let head = table_item(&db.client(), &settings, &key).await.unwrap();
        let expiry = head["expires_at"].as_n().unwrap().clone();
        let chunks = chunks_of(&db, &settings, &key).await;
        assert_eq!(chunks.len(), 2, "the replacement is incompressible");
        for chunk in &chunks {
            assert_eq!(chunk["expires_at"].as_n().unwrap(), &expiry);
            assert_eq!(chunk["version"], head["version"]);
        }
        get_is(&mut cb, &key, &replacement, "after touch").await;

        // A cold cache (a restart) reads it back whole.
        let cold =
            TestServer::start_custom(settings.clone(), 64 << 20, rereads.clone(), None).await;
        let mut cc = cold.client().await;
        get_is(&mut cc, &key, &replacement, "after a restart").await;

        // delete: gone everywhere, and no chunk left.
        assert_eq!(
            ca.call(format!("delete {key}\r\n").as_bytes()).await,
            "DELETED\r\n"
        );
        get_misses(&mut ca, &key, "deleted, writer").await;
        get_misses(&mut cb, &key, "deleted, second sidecar").await;
        get_misses(&mut cc, &key, "deleted, restarted sidecar").await;
        assert!(chunks_of(&db, &settings, &key).await.is_empty());
        assert_eq!(head_chunks(&db, &settings, &key).await, 0, "a tombstone");
        assert!(cold.stop().await);
    }

    // Overwritten by a small value: the head only, no chunk left.
    let key = "shrinks";
    let big = corpus::random(MB, 3);
    assert_eq!(
        ca.call(&storage("set", key, 0, 0, &big, None)).await,
        "STORED\r\n"
    );
    assert_eq!(chunks_of(&db, &settings, key).await.len(), 2);
    assert_eq!(
        cb.call(&storage("set", key, 0, 0, b"small", None)).await,
        "STORED\r\n"
    );
    assert!(chunks_of(&db, &settings, key).await.is_empty());
    get_is(&mut cb, key, b"small", "overwritten by a small value").await;
    // A smaller chunked value over a larger one: the extra chunk goes.
    assert_eq!(
        ca.call(&storage("set", key, 0, 0, &big, None)).await,
        "STORED\r\n"
    );
    let smaller = corpus::random(500_000, 4);
    assert_eq!(
        cb.call(&storage("set", key, 0, 0, &smaller, None)).await,
        "STORED\r\n"
    );
    assert_eq!(chunks_of(&db, &settings, key).await.len(), 1);
    assert_eq!(head_chunks(&db, &settings, key).await, 1);
    get_is(&mut cb, key, &smaller, "a smaller chunked value").await;

    // Over item_size_max (1 MiB): refused as memcached refuses it, the data
    // discarded with the stream kept in sync, and the old value deleted,
    // chunks and all.
    let too_large = corpus::random(1024 * 1024 + 1, 8);
    let mut req = storage("set", key, 0, 0, &too_large, None);
    req.extend_from_slice(b"get shrinks\r\n");
    assert_eq!(
        ca.call(&req).await,
        "SERVER_ERROR object too large for cache\r\n"
    );
    assert_eq!(
        ca.reply().await,
        "END\r\n",
        "in sync: the next request answered"
    );
    get_misses(&mut cb, key, "the old value is gone").await;
    assert!(chunks_of(&db, &settings, key).await.is_empty());
    assert!(a.stop().await && b.stop().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_values_expire_with_their_chunks() {
    let db = DynamoLocal::shared().await;
    let settings = db.new_table().await;
    let a = TestServer::start(settings.clone()).await;
    let mut c = a.client().await;
    let value = corpus::random(MB, 5);
    assert_eq!(
        c.call(&storage("set", "soon", 0, 5, &value, None)).await,
        "STORED\r\n"
    );
    let head = table_item(&db.client(), &settings, "soon").await.unwrap();
    let chunks = chunks_of(&db, &settings, "soon").await;
    assert_eq!(chunks.len(), 2);
    for chunk in &chunks {
        // DynamoDB's TTL removes them with the head.
        assert_eq!(chunk["expires_at"], head["expires_at"]);
    }
    get_is(&mut c, "soon", &value, "before its expiry").await;
    let cold = TestServer::start(settings.clone()).await;
    let mut cc = cold.client().await;
    get_is(
        &mut cc,
        "soon",
        &value,
        "before its expiry, read from DynamoDB",
    )
    .await;
    // Expired: a miss from memory and from DynamoDB (whose TTL deletes lazily).
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let reply = c.call_bytes(b"get soon\r\n").await;
        if reply == b"END\r\n" {
            break;
        }
        assert!(Instant::now() < deadline, "never expired");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    get_misses(&mut cc, "soon", "expired, the other sidecar").await;
    let fresh = TestServer::start(settings.clone()).await;
    get_misses(
        &mut fresh.client().await,
        "soon",
        "expired, read from DynamoDB",
    )
    .await;
    // Written again over the expired one: its chunks are replaced.
    let again = corpus::random(MB, 6);
    assert_eq!(
        c.call(&storage("add", "soon", 0, 0, &again, None)).await,
        "STORED\r\n"
    );
    get_is(&mut c, "soon", &again, "added over the expired value").await;
    // (The other sidecars remember it absent for max_local_age: a new one reads it.)
    let another = TestServer::start(settings.clone()).await;
    get_is(
        &mut another.client().await,
        "soon",
        &again,
        "added, read from DynamoDB",
    )
    .await;
    assert!(another.stop().await);
    assert_eq!(chunks_of(&db, &settings, "soon").await.len(), 2);
    for server in [a, cold, fresh] {
        assert!(server.stop().await);
    }
}

/// Two sidecars write one chunked key over and over while readers on both
/// (which re-read DynamoDB on every get) check that each value they get is
/// one that was written, whole: never chunks of two writes together.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_on_one_chunked_key_never_mix_versions() {
    let db = DynamoLocal::shared().await;
    let settings = db.new_table().await;
    let options = EngineOptions {
        max_local_age: Duration::from_millis(1),
        ..EngineOptions::default()
    };
    let a = TestServer::start_custom(settings.clone(), 64 << 20, options.clone(), None).await;
    let b = TestServer::start_custom(settings.clone(), 64 << 20, options, None).await;
    // A written value: 8 bytes of its seed, then bytes made from the seed.
    let made = |seed: u64| {
        let mut v = seed.to_be_bytes().to_vec();
        v.extend_from_slice(&corpus::random(
            600_000 + (seed as usize % 7) * 50_000,
            seed,
        ));
        v
    };
    let first = made(1);
    let mut c = a.client().await;
    assert_eq!(
        c.call(&storage("set", "hot", 0, 0, &first, None)).await,
        "STORED\r\n"
    );
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for (w, server) in [(0u64, &a), (1, &b)] {
        let mut c = server.client().await;
        writers.push(tokio::spawn(async move {
            let mut stored = 0;
            for i in 0..12u64 {
                let seed = 100 + w * 1000 + i;
                let reply = c
                    .call(&storage("set", "hot", 0, 0, &made(seed), None))
                    .await;
                // A write may lose a race it could not win in 64 tries; it
                // must say so, never answer STORED for what did not land.
                assert!(
                    reply == "STORED\r\n" || reply.starts_with("SERVER_ERROR"),
                    "{reply}"
                );
                stored += usize::from(reply == "STORED\r\n");
            }
            stored
        }));
    }
    let mut readers = Vec::new();
    for server in [&a, &b] {
        let mut c = server.client().await;
        let stop = stop.clone();
        readers.push(tokio::spawn(async move {
            let mut reads = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let reply = c.call_bytes(b"get hot\r\n").await;
                if reply.starts_with(b"SERVER_ERROR") {
                    continue;
                }
                let head_end = reply.windows(2).position(|w| w == b"\r\n").unwrap();
                let data = &reply[head_end + 2..reply.len() - 7];
                let seed = u64::from_be_bytes(data[..8].try_into().unwrap());
                assert!(
                    data == made(seed).as_slice(),
                    "a read mixed values (seed {seed})"
                );
                reads += 1;
            }
            reads
        }));
    }
    let mut stored = 0;
    for w in writers {
        stored += tokio::time::timeout(WAIT, w).await.unwrap().unwrap();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut reads = 0;
    for r in readers {
        reads += tokio::time::timeout(WAIT, r).await.unwrap().unwrap();
    }
    assert!(stored >= 12, "most writes land: {stored} of 24");
    assert!(reads >= 10, "the readers read: {reads}");
    // The last write is what every sidecar and the table hold, whole, with
    // exactly its own chunks.
    let mut ca = a.client().await;
    let reply = ca.call_bytes(b"get hot\r\n").await;
    let head_end = reply.windows(2).position(|w| w == b"\r\n").unwrap();
    let seed = u64::from_be_bytes(reply[head_end + 2..head_end + 10].try_into().unwrap());
    get_is(&mut b.client().await, "hot", &made(seed), "after the race").await;
    let chunks = head_chunks(&db, &settings, "hot").await;
    assert_eq!(chunks_of(&db, &settings, "hot").await.len(), chunks);
    assert!(a.stop().await && b.stop().await);
}

/// What DynamoDB reports consuming (ReturnConsumedCapacity, read by a proxy
/// from its answers) for one `set` of `value` to a new key.
async fn write_units(server: &TestServer, proxy: &FaultProxy, key: &str, value: &[u8]) -> f64 {
    let before = proxy.capacity("PutItem") + proxy.capacity("TransactWriteItems");
    let mut c = server.client().await;
    assert_eq!(
        c.call(&storage("set", key, 0, 0, value, None)).await,
        "STORED\r\n"
    );
    proxy.capacity("PutItem") + proxy.capacity("TransactWriteItems") - before
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compression_cuts_the_write_units_dynamodb_bills() {
    let db = DynamoLocal::shared().await;
    let settings = db.new_table().await;
    let proxy = FaultProxy::start(&db.endpoint).await;
    let via_proxy = |compression| DynamoSettings {
        endpoint_url: Some(proxy.endpoint()),
        compression,
        ..settings.clone()
    };
    let zstd = TestServer::start(via_proxy(dynacache::store::Compression::Zstd)).await;
    let off = TestServer::start(via_proxy(dynacache::store::Compression::Off)).await;
    let html = corpus::html(100_000, 11);
    let plain = write_units(&off, &proxy, "page-plain", &html).await;
    let packed = write_units(&zstd, &proxy, "page-packed", &html).await;
    println!("100 KB of HTML: {plain} write units plain, {packed} compressed");
    assert!(plain >= 98.0, "100 KB uncompressed: {plain} units");
    assert!(
        packed * 3.0 <= plain,
        "100 KB of HTML compressed: {packed} units against {plain}"
    );
    // Incompressible: stored as it is, for what it cost before (+ at most one unit).
    let noise = corpus::random(100_000, 12);
    let plain = write_units(&off, &proxy, "noise-plain", &noise).await;
    let packed = write_units(&zstd, &proxy, "noise-packed", &noise).await;
    println!("100 KB incompressible: {plain} write units plain, {packed} with compression on");
    assert!(packed <= plain + 1.0, "{packed} against {plain}");
    let item = table_item(&db.client(), &settings, "noise-packed")
        .await
        .unwrap();
    assert!(item["value"].is_b(), "stored as plain bytes, as before");
    // Below the threshold nothing changes at all.
    let small = corpus::html(900, 13);
    assert_eq!(
        write_units(&zstd, &proxy, "small", &small).await,
        1.0,
        "one unit"
    );
    let item = table_item(&db.client(), &settings, "small").await.unwrap();
    assert_eq!(item["value"].as_b().unwrap().as_ref(), small.as_slice());
    // What is stored compressed reads back as it was written.
    let mut c = off.client().await;
    get_is(
        &mut c,
        "page-packed",
        &html,
        "a compressed value, by a sidecar with compression off",
    )
    .await;
    assert!(zstd.stop().await && off.stop().await);
}

/// Read-modify-writes on a chunked value from two sidecars: every append
/// lands exactly once (each is one conditional write of the whole value),
/// and the meta commands work on it as on any value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_and_meta_commands_on_chunked_values_stay_atomic() {
    let db = DynamoLocal::shared().await;
    let settings = db.new_table().await;
    let a = TestServer::start(settings.clone()).await;
    let b = TestServer::start(settings.clone()).await;
    let base = corpus::random(500_000, 21);
    let mut c = a.client().await;
    assert_eq!(
        c.call(&storage("set", "log", 0, 0, &base, None)).await,
        "STORED\r\n"
    );
    assert_eq!(head_chunks(&db, &settings, "log").await, 1);
    let mut tasks = Vec::new();
    for (side, server) in [("a", &a), ("b", &b)] {
        let mut c = server.client().await;
        tasks.push(tokio::spawn(async move {
            for i in 0..6 {
                let tag = format!("|{side}{i}");
                let reply = c
                    .call(&storage("append", "log", 0, 0, tag.as_bytes(), None))
                    .await;
                assert_eq!(reply, "STORED\r\n", "{tag}");
            }
        }));
    }
    for t in tasks {
        tokio::time::timeout(WAIT, t).await.unwrap().unwrap();
    }
    // Read from DynamoDB (a cold sidecar): the base, then all 12 tags once each.
    let cold = TestServer::start(settings.clone()).await;
    let reply = cold.client().await.call_bytes(b"get log\r\n").await;
    let head_end = reply.windows(2).position(|w| w == b"\r\n").unwrap();
    let data = &reply[head_end + 2..reply.len() - 7];
    assert!(data.starts_with(&base), "the base is kept whole");
    let tail = String::from_utf8(data[base.len()..].to_vec()).unwrap();
    let mut tags: Vec<&str> = tail.split('|').filter(|t| !t.is_empty()).collect();
    tags.sort();
    let mut expected: Vec<String> = ["a", "b"]
        .iter()
        .flat_map(|side| (0..6).map(move |i| format!("{side}{i}")))
        .collect();
    expected.sort();
    assert_eq!(tags, expected, "every append once: {tail}");

    // Meta commands on a value over three items.
    let value = corpus::random(MB, 22);
    let mut ms = format!("ms meta {} F5 T0\r\n", value.len()).into_bytes();
    ms.extend_from_slice(&value);
    ms.extend_from_slice(b"\r\n");
    assert_eq!(c.call(&ms).await, "HD\r\n");
    assert_eq!(head_chunks(&db, &settings, "meta").await, 2);
    let mut cb = cold.client().await;
    let reply = cb.call_bytes(b"mg meta v f c s\r\n").await;
    let head_end = reply.windows(2).position(|w| w == b"\r\n").unwrap();
    let head = String::from_utf8(reply[..head_end].to_vec()).unwrap();
    assert!(head.starts_with(&format!("VA {MB} f5 c")), "{head}");
    assert!(head.ends_with(&format!(" s{MB}")), "{head}");
    assert!(&reply[head_end + 2..reply.len() - 2] == value.as_slice());
    let cas: u64 = head
        .split(' ')
        .find_map(|f| f.strip_prefix('c'))
        .unwrap()
        .parse()
        .unwrap();
    // A delete conditioned on an old cas is refused; on the current one, done.
    assert_eq!(
        cb.call(format!("md meta C{}\r\n", cas - 1).as_bytes())
            .await,
        "EX\r\n"
    );
    assert_eq!(
        cb.call(format!("md meta C{cas}\r\n").as_bytes()).await,
        "HD\r\n"
    );
    assert_eq!(cb.call(b"mg meta v\r\n").await, "EN\r\n");
    assert!(chunks_of(&db, &settings, "meta").await.is_empty());
    for server in [a, b, cold] {
        assert!(server.stop().await);
    }
}

/// The largest value `item_size_max` can be set to allow (VALUE_MAX, 4 MiB
/// less 64 KiB), incompressible: written in one transaction (head and 10
/// chunks, under TransactWriteItems' 100 items and 4 MB), read back whole by
/// a cold sidecar, touched (every chunk rewritten), overwritten by a value
/// of fewer chunks (the extra ones deleted in the same transaction) and by
/// the largest again, deleted with nothing left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_largest_value_allowed_is_written_touched_overwritten_and_deleted() {
    use dynacache::store::{Store, VALUE_MAX};
    let db = DynamoLocal::shared().await;
    let settings = db.new_table().await;
    // Both sidecars re-read DynamoDB on every get (no fleet mode here).
    let config = dynacache::config::Config {
        item_size_max: bytesize::ByteSize::b(VALUE_MAX as u64),
        max_local_age: Duration::from_millis(1),
        ..common::test_config(settings.clone())
    };
    let a = TestServer::with_config(config.clone()).await;
    let key = "largest";
    let largest = VALUE_MAX - key.len() - a.engine.store().item_overhead();
    let mut c = a.client().await;
    let big = corpus::random(largest, 11);
    let mut over = storage("set", key, 0, 0, &corpus::random(largest + 1, 12), None);
    over.extend_from_slice(b"get none\r\n");
    assert_eq!(
        c.call(&over).await,
        "SERVER_ERROR object too large for cache\r\n",
        "one byte more is refused"
    );
    assert_eq!(c.reply().await, "END\r\n");
    assert_eq!(
        c.call(&storage("set", key, 0, 0, &big, None)).await,
        "STORED\r\n"
    );
    let chunks = head_chunks(&db, &settings, key).await;
    assert_eq!(chunks_of(&db, &settings, key).await.len(), chunks);
    assert!(chunks >= 9, "{chunks} chunks for {largest} bytes");
    let cold = TestServer::with_config(config.clone()).await;
    let mut cc = cold.client().await;
    get_is(&mut cc, key, &big, "the largest, read cold").await;
    assert_eq!(
        c.call(format!("touch {key} 3600\r\n").as_bytes()).await,
        "TOUCHED\r\n"
    );
    get_is(&mut cc, key, &big, "after touch").await;
    // Fewer chunks: the old ones past the new count are deleted with the
    // write.
    let smaller = corpus::random(largest - 500_000, 13);
    assert_eq!(
        cc.call(&storage("set", key, 0, 0, &smaller, None)).await,
        "STORED\r\n"
    );
    let fewer = head_chunks(&db, &settings, key).await;
    assert!(fewer < chunks, "{fewer} chunks after {chunks}");
    assert_eq!(chunks_of(&db, &settings, key).await.len(), fewer);
    get_is(&mut c, key, &smaller, "fewer chunks").await;
    assert_eq!(
        c.call(&storage("set", key, 0, 0, &big, None)).await,
        "STORED\r\n"
    );
    get_is(&mut cc, key, &big, "the largest again").await;
    assert_eq!(
        cc.call(format!("delete {key}\r\n").as_bytes()).await,
        "DELETED\r\n"
    );
    assert!(chunks_of(&db, &settings, key).await.is_empty());
    get_misses(&mut c, key, "deleted").await;
    assert!(a.stop().await && cold.stop().await);
}

/// A PutItem or UpdateItem that DynamoDB refuses because a transaction (a
/// chunked write from another sidecar) holds the same item
/// (`TransactionConflictException`, injected by the proxy) is sent again:
/// up to 4 attempts, then `SERVER_ERROR` with the old value kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_refused_for_a_transaction_in_flight_is_sent_again() {
    const CONFLICT: &str = "TransactionConflictException";
    let db = DynamoLocal::shared().await;
    let settings = db.new_table().await;
    let proxy = FaultProxy::start(&db.endpoint).await;
    let server = TestServer::start(DynamoSettings {
        endpoint_url: Some(proxy.endpoint()),
        ..settings.clone()
    })
    .await;
    let mut c = server.client().await;
    assert_eq!(
        c.call(&storage("set", "k", 0, 0, b"v1", None)).await,
        "STORED\r\n"
    );

    // Three refusals, then DynamoDB: stored on the fourth attempt.
    let puts = proxy.calls("PutItem");
    proxy.refuse("PutItem", CONFLICT, 3);
    assert_eq!(
        c.call(&storage("set", "k", 0, 0, b"v2", None)).await,
        "STORED\r\n"
    );
    assert_eq!(proxy.calls("PutItem"), puts + 4);
    // A touch (UpdateItem) likewise.
    proxy.refuse("UpdateItem", CONFLICT, 1);
    assert_eq!(c.call(b"touch k 3600\r\n").await, "TOUCHED\r\n");

    // Refused on every attempt: an error, and nothing changed.
    let puts = proxy.calls("PutItem");
    proxy.refuse("PutItem", CONFLICT, 4);
    assert_eq!(
        c.call(&storage("set", "k", 0, 0, b"v3", None)).await,
        "SERVER_ERROR too much contention on this key, try again\r\n"
    );
    assert_eq!(proxy.calls("PutItem"), puts + 4, "4 attempts, no more");
    let item = table_item(&db.client(), &settings, "k").await.unwrap();
    assert_eq!(item["value"].as_b().unwrap().as_ref(), b"v2");
    let cold = TestServer::start(settings.clone()).await;
    get_is(
        &mut cold.client().await,
        "k",
        b"v2",
        "the refused write did not land",
    )
    .await;
    assert!(server.stop().await && cold.stop().await);
}
