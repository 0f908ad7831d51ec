//! One client connection: read bytes into a bounded buffer, parse every
//! whole request in it, run each through the engine in order, and write the
//! replies of the batch with one write.
//!
//! Memory per connection is bounded by [`Limits::max_request`] for input and
//! by one batch of replies for output. A client that disconnects mid-request
//! leaves nothing half-applied: a request runs only once it is whole. A
//! client cannot hold its connection slot by trickling a request
//! (`request_timeout`) or by not reading its replies (`write_timeout`).

use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::engine::{Engine, Flow};
use crate::output::{Output, ReplyBudget};
use crate::protocol::{Limits, Parsed, Reply, parse};
use crate::store::Store;

/// Read in chunks of this much at least.
const READ_CHUNK: usize = 16 * 1024;
/// Write out replies early once this much is waiting (a long pipeline).
const WRITE_HIGH_WATER: usize = crate::output::ALLOWANCE;

const TOO_LARGE: Reply<'static> = Reply::ServerError("object too large for cache");

/// How connections are served.
#[derive(Clone)]
pub struct ConnectionOptions {
    pub limits: Limits,
    /// Reply memory shared by every connection (see [`crate::output`]).
    pub replies: ReplyBudget,
    /// Close a connection idle this long (None: never).
    pub idle_timeout: Option<Duration>,
    /// A request must arrive whole within this of its first byte.
    pub request_timeout: Duration,
    /// Replies must be taken by the client within this.
    pub write_timeout: Duration,
}

impl ConnectionOptions {
    pub fn from_config(config: &Config, limits: Limits) -> ConnectionOptions {
        ConnectionOptions {
            limits,
            replies: ReplyBudget::new(config.reply_memory_limit.as_u64() as usize),
            idle_timeout: (!config.idle_timeout.is_zero()).then_some(config.idle_timeout),
            request_timeout: config.request_timeout,
            write_timeout: config.write_timeout,
        }
    }
}

impl Default for ConnectionOptions {
    fn default() -> Self {
        ConnectionOptions::from_config(&Config::default(), Limits::default())
    }
}

/// Serves one connection until the client quits or disconnects, the
/// protocol requires closing it, a timeout fires, or `shutdown` fires while
/// it is between requests.
pub async fn serve<S, T>(
    mut stream: T,
    engine: &Engine<S>,
    options: &ConnectionOptions,
    shutdown: &CancellationToken,
) -> std::io::Result<()>
where
    S: Store,
    T: AsyncRead + AsyncWrite + Unpin + Send,
{
    let limits = &options.limits;
    let mut rbuf = BytesMut::with_capacity(READ_CHUNK);
    let mut wbuf = BytesMut::with_capacity(READ_CHUNK);
    // Bytes of a too-large data block still to throw away.
    let mut discard: u64 = 0;
    // One shutdown waiter for the connection's life, not one per read:
    // registering a fresh waiter on every read was 7% of a hit's instructions.
    let cancelled = shutdown.cancelled();
    tokio::pin!(cancelled);
    // When the request at the front of `rbuf` must be whole (set while part
    // of one is buffered or being discarded).
    let mut request_deadline: Option<Instant> = None;
    loop {
        // Replies of this batch: written as they fill, and at its end.
        let mut out = Output::to(
            &mut stream,
            &options.replies,
            options.write_timeout,
            std::mem::take(&mut wbuf),
        );
        let mut close = false;
        loop {
            if discard > 0 {
                let n = discard.min(rbuf.len() as u64);
                rbuf.advance(n as usize);
                discard -= n;
                if discard > 0 {
                    break;
                }
            }
            match parse(&rbuf, limits) {
                Parsed::Request(cmd, len) => {
                    let flow = engine.execute(cmd, &mut out).await;
                    rbuf.advance(len);
                    request_deadline = None;
                    if flow == Flow::Close {
                        close = true;
                        break;
                    }
                }
                Parsed::Incomplete => break,
                Parsed::Invalid {
                    reply,
                    len,
                    noreply,
                } => {
                    engine.count_invalid();
                    if !noreply {
                        reply.encode(out.buf());
                    }
                    rbuf.advance(len);
                    request_deadline = None;
                }
                Parsed::TooLarge {
                    mode,
                    key,
                    len,
                    discard: d,
                    noreply,
                } => {
                    let failed = engine.reject_too_large(mode, key).await;
                    if !noreply {
                        match failed {
                            None => TOO_LARGE.encode(out.buf()),
                            Some(e) => Reply::ServerError(&e.to_string()).encode(out.buf()),
                        }
                    }
                    rbuf.advance(len);
                    discard = d;
                }
                Parsed::LineTooLong => {
                    // memcached closes such a connection without a reply.
                    close = true;
                    break;
                }
            }
            // Whatever the request was (an error reply counts too: a
            // read of bare newlines asks for 7 bytes per byte), replies
            // beyond the allowance are written before reading on.
            if out.pending().len() >= WRITE_HIGH_WATER {
                out.flush().await;
            }
            if let Some(e) = out.take_error() {
                return Err(e);
            }
        }
        out.flush().await;
        engine.counters().io(0, out.written());
        if let Some(e) = out.take_error() {
            return Err(e);
        }
        wbuf = out.into_buf();
        if close {
            return Ok(());
        }
        if rbuf.is_empty() && discard == 0 {
            request_deadline = None;
        } else if request_deadline.is_none() {
            request_deadline = Some(Instant::now() + options.request_timeout);
        }
        if rbuf.capacity() - rbuf.len() < READ_CHUNK {
            rbuf.reserve(READ_CHUNK);
        }
        let idle = async {
            match (request_deadline, options.idle_timeout) {
                (Some(deadline), _) => tokio::time::sleep_until(deadline).await,
                (None, Some(limit)) => tokio::time::sleep(limit).await,
                (None, None) => std::future::pending().await,
            }
        };
        let read = tokio::select! {
            biased;
            _ = &mut cancelled => return Ok(()),
            read = stream.read_buf(&mut rbuf) => read?,
            // Idle past idle_timeout, or a request trickling in past
            // request_timeout: close without a reply, as memcached does.
            _ = idle => return Ok(()),
        };
        if read == 0 {
            return Ok(());
        }
        engine.counters().io(read, 0);
    }
}
