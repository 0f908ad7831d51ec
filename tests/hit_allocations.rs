//! A get hit allocates nothing: the reply is encoded from the cache in
//! place (`ItemCache::get_with`), with no copy of the item. Counted with a
//! counting global allocator (this test binary only), per thread.

use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use std::time::Duration;

use bytes::BytesMut;
use dynacache::cache::ItemCache;
use dynacache::engine::{Engine, Flow};
use dynacache::output::{Output, ReplyBudget};
use dynacache::protocol::{Limits, Parsed, parse};
use dynacache::store::MemoryStore;

/// Runs `request` to completion on this thread, polling it by hand so
/// that no executor allocates; the engine's hit path never waits.
/// Replies go to an output as a connection's do (written to a sink when
/// full, within a shared budget); `out` is its buffer, kept between calls.
fn run(engine: &Engine<MemoryStore>, request: &[u8], out: &mut BytesMut) {
    let Parsed::Request(cmd, _) = parse(request, &Limits::default()) else {
        panic!("not a request: {request:?}");
    };
    let budget = budget();
    let mut sink = tokio::io::sink();
    let mut output = Output::to(
        &mut sink,
        budget,
        Duration::from_secs(1),
        std::mem::take(out),
    );
    {
        let mut future = pin!(engine.execute(cmd, &mut output));
        let mut cx = Context::from_waker(Waker::noop());
        match future.as_mut().poll(&mut cx) {
            Poll::Ready(flow) => assert_eq!(flow, Flow::Continue),
            Poll::Pending => panic!("a request on the memory store waited"),
        }
    }
    *out = output.into_buf();
}

fn budget() -> &'static ReplyBudget {
    static BUDGET: std::sync::OnceLock<ReplyBudget> = std::sync::OnceLock::new();
    BUDGET.get_or_init(|| ReplyBudget::new(1 << 20))
}

fn engine_with_items() -> Engine<MemoryStore> {
    let engine = Engine::new(ItemCache::new(1 << 20, 4), MemoryStore::new());
    let mut out = BytesMut::new();
    for key in ["a", "b", "c"] {
        run(
            &engine,
            format!("set {key} 5 0 5\r\nvalue\r\n").as_bytes(),
            &mut out,
        );
    }
    assert_eq!(out, "STORED\r\n".repeat(3).as_bytes());
    engine
}

fn allocations(engine: &Engine<MemoryStore>, request: &[u8], out: &mut BytesMut) -> u64 {
    out.clear();
    out.reserve(4096);
    allocation_counter::measure(|| run(engine, request, out)).count_total
}

#[test]
fn get_hits_allocate_nothing() {
    let engine = engine_with_items();
    let mut out = BytesMut::new();
    // The first request of each kind initializes its metric handles.
    for request in [&b"get a\r\n"[..], b"gets a b c\r\n", b"mg a v f t c k\r\n"] {
        allocations(&engine, request, &mut out);
    }
    assert_eq!(allocations(&engine, b"get a\r\n", &mut out), 0);
    assert_eq!(out, &b"VALUE a 5 5\r\nvalue\r\nEND\r\n"[..]);
    assert_eq!(allocations(&engine, b"gets a b c\r\n", &mut out), 0);
    assert!(out.starts_with(b"VALUE a 5 5 "), "{out:?}");
    assert_eq!(allocations(&engine, b"mg a v f t c k\r\n", &mut out), 0);
    assert!(out.starts_with(b"VA 5 f5 t-1 c"), "{out:?}");
    // The counter counts: a miss reads the store and allocates.
    assert!(allocations(&engine, b"get nothing\r\n", &mut out) > 0);
    assert_eq!(out, &b"END\r\n"[..]);
}
