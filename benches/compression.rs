//! compression: which codec stores a Django app's values in the fewest
//! DynamoDB capacity units, for how much CPU.
//!
//! For each kind of value (`tests/common/corpus.rs`: a pickled session, an
//! HTML page, a JSON answer, incompressible bytes) and size, and each codec
//! (zstd at several levels, as dynacache links it; lz4 and deflate for
//! comparison), prints the compression ratio, the CPU time to compress and
//! to decompress a megabyte (best of several runs, one core), and what one
//! write and one strongly consistent read of the value cost in capacity
//! units, by DynamoDB's rules (a write unit per started KB of an item, a read
//! unit per started 4 KB; a value over one item is a transaction of a head
//! and chunk items at twice the write units, and chunks read with one
//! BatchGetItem).
//!
//! `cargo bench --bench compression` prints the table (BENCHMARKS.md,
//! section 7); under `cargo test --all-targets` it checks that each codec
//! gives back what it was given, and exits.

use std::hint::black_box;
use std::io::{Read, Write};
use std::time::{Duration, Instant};

#[path = "../tests/common/corpus.rs"]
mod corpus;

/// Bytes of an item besides the value: a 60-byte key and dynacache's
/// attribute names and numbers (as `DynamoStore::item_overhead` counts them
/// at the default names, plus a little for the encoded value's map).
const ITEM_OVERHEAD: usize = 60 + 93 + 16;
/// DynamoDB's item limit, and what dynacache puts in one item.
const ITEM_MAX: usize = 400 * 1024;
const PART: usize = ITEM_MAX - 60 - 93 - 128;

#[derive(Clone, Copy)]
enum Codec {
    None,
    Zstd(i32),
    /// zstd with a context kept between calls, as dynacache runs it.
    ZstdKept(i32),
    Lz4,
    Deflate,
}

thread_local! {
    static KEPT: std::cell::RefCell<(zstd::bulk::Compressor<'static>, zstd::bulk::Decompressor<'static>)> =
        std::cell::RefCell::new((
            zstd::bulk::Compressor::new(3).unwrap(),
            zstd::bulk::Decompressor::new().unwrap(),
        ));
}

impl Codec {
    fn name(self) -> String {
        match self {
            Codec::None => "none".into(),
            Codec::Zstd(level) => format!("zstd-{level}"),
            Codec::ZstdKept(level) => format!("zstd-{level}, context kept"),
            Codec::Lz4 => "lz4".into(),
            Codec::Deflate => "deflate-6".into(),
        }
    }

    fn compress(self, data: &[u8]) -> Vec<u8> {
        match self {
            Codec::None => data.to_vec(),
            Codec::Zstd(level) => zstd::bulk::compress(data, level).unwrap(),
            Codec::ZstdKept(level) => KEPT.with_borrow_mut(|(c, _)| {
                c.set_compression_level(level).unwrap();
                c.compress(data).unwrap()
            }),
            Codec::Lz4 => lz4_flex::compress_prepend_size(data),
            Codec::Deflate => {
                let mut e =
                    flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::new(6));
                e.write_all(data).unwrap();
                e.finish().unwrap()
            }
        }
    }

    fn decompress(self, packed: &[u8], len: usize) -> Vec<u8> {
        match self {
            Codec::None => packed.to_vec(),
            Codec::Zstd(_) => zstd::bulk::decompress(packed, len).unwrap(),
            Codec::ZstdKept(_) => KEPT.with_borrow_mut(|(_, d)| d.decompress(packed, len).unwrap()),
            Codec::Lz4 => lz4_flex::decompress_size_prepended(packed).unwrap(),
            Codec::Deflate => {
                let mut out = Vec::with_capacity(len);
                flate2::read::DeflateDecoder::new(packed)
                    .read_to_end(&mut out)
                    .unwrap();
                out
            }
        }
    }
}

const CODECS: [Codec; 8] = [
    Codec::None,
    Codec::Lz4,
    Codec::Deflate,
    Codec::Zstd(1),
    Codec::Zstd(3),
    Codec::ZstdKept(3),
    Codec::Zstd(9),
    Codec::Zstd(19),
];

/// Capacity units of one write and one consistent read of a value stored
/// in `stored` bytes, as dynacache lays it out.
fn units(stored: usize) -> (usize, usize) {
    if stored + ITEM_OVERHEAD <= ITEM_MAX {
        let item = stored + ITEM_OVERHEAD;
        return (item.div_ceil(1024), item.div_ceil(4096));
    }
    // A head and chunks: each item billed on its own; writes transactional.
    let items: Vec<usize> = (0..stored.div_ceil(PART))
        .map(|i| (stored - i * PART).min(PART) + ITEM_OVERHEAD)
        .collect();
    let wcu: usize = items.iter().map(|i| i.div_ceil(1024)).sum();
    let rcu: usize = items.iter().map(|i| i.div_ceil(4096)).sum();
    (2 * wcu, rcu)
}

/// The least CPU time of `runs` calls of `work`.
fn best(runs: usize, mut work: impl FnMut()) -> Duration {
    (0..runs)
        .map(|_| {
            let started = Instant::now();
            work();
            started.elapsed()
        })
        .min()
        .unwrap()
}

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    if !bench {
        for kind in corpus::KINDS {
            let value = corpus::value(kind, 50_000, 1);
            assert_eq!(value.len(), 50_000, "{kind}");
            for codec in CODECS {
                let packed = codec.compress(&value);
                assert_eq!(codec.decompress(&packed, value.len()), value);
            }
        }
        assert_eq!(units(1000), (2, 1));
        // Three items, each billed on its own, written in a transaction.
        let (wcu, rcu) = units(1_000_000);
        assert!(
            (1_950..=2_000).contains(&wcu) && (245..=250).contains(&rcu),
            "{wcu} {rcu}"
        );
        println!("compression: self-check passed; no measurement without --bench");
        return;
    }
    println!(
        "| value | size | codec | stored bytes | ratio | compress ms/MB | decompress ms/MB | WCU per write | RCU per read |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for (kind, size) in [
        ("session", 2_000),
        ("session", 20_000),
        ("session", 1_000_000),
        ("html", 100_000),
        ("html", 1_000_000),
        ("json", 100_000),
        ("json", 1_000_000),
        ("random", 100_000),
        ("random", 1_000_000),
    ] {
        let value = corpus::value(kind, size, 42);
        // Enough runs that the best is a clean one: about 20 MB per cell.
        let runs = (20_000_000 / size).clamp(5, 2000);
        for codec in CODECS {
            let packed = codec.compress(&value);
            let per_mb = |d: Duration| d.as_secs_f64() * 1e3 * 1e6 / size as f64;
            let compress = best(runs, || {
                black_box(codec.compress(black_box(&value)));
            });
            let decompress = best(runs, || {
                black_box(codec.decompress(black_box(&packed), size));
            });
            // dynacache stores a value as it is when compressing does not shrink it.
            let stored = packed.len().min(size);
            let (wcu, rcu) = units(stored);
            println!(
                "| {kind} | {size} | {} | {stored} | {:.2} | {:.2} | {:.2} | {wcu} | {rcu} |",
                codec.name(),
                size as f64 / stored as f64,
                per_mb(compress),
                per_mb(decompress),
            );
        }
    }
}
