//! One client connection: read bytes into a bounded buffer, parse every
//! whole request in it, run each through the engine in order, and write the
//! replies of the batch with one write.
//!
//! Memory per connection is bounded by [`Limits::max_request`] for input and
//! by one batch of replies for output. A client that disconnects mid-request
//! leaves nothing half-applied: a request runs only once it is whole.

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use crate::engine::{Engine, Flow};
use crate::protocol::{Parsed, Reply, parse};
use crate::server::ServeOptions;
use crate::store::Store;

/// Read in chunks of this much at least.
const READ_CHUNK: usize = 16 * 1024;
/// Write out replies early once this much is waiting (a big multi-get).
const WRITE_HIGH_WATER: usize = 256 * 1024;

const TOO_LARGE: Reply<'static> = Reply::ServerError("object too large for cache");

/// Serves one connection until the client quits or disconnects, the
/// protocol requires closing it, it idles past `options.idle_timeout`, or
/// `shutdown` fires while it is between requests.
pub async fn serve<S, T>(
    mut stream: T,
    engine: &Engine<S>,
    options: &ServeOptions,
    shutdown: &CancellationToken,
) -> std::io::Result<()>
where
    S: Store,
    T: AsyncRead + AsyncWrite + Unpin,
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
    loop {
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
                    let flow = engine.execute(cmd, &mut wbuf).await;
                    rbuf.advance(len);
                    if flow == Flow::Close {
                        return stream.write_all(&wbuf).await;
                    }
                    if wbuf.len() >= WRITE_HIGH_WATER {
                        stream.write_all(&wbuf).await?;
                        wbuf.clear();
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
                        reply.encode(&mut wbuf);
                    }
                    rbuf.advance(len);
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
                            None => TOO_LARGE.encode(&mut wbuf),
                            Some(e) => Reply::ServerError(&e.to_string()).encode(&mut wbuf),
                        }
                    }
                    rbuf.advance(len);
                    discard = d;
                }
                Parsed::LineTooLong => {
                    // memcached closes such a connection without a reply.
                    return stream.write_all(&wbuf).await;
                }
            }
        }
        if !wbuf.is_empty() {
            stream.write_all(&wbuf).await?;
            engine.count_io(0, wbuf.len());
            wbuf.clear();
        }
        if rbuf.capacity() - rbuf.len() < READ_CHUNK {
            rbuf.reserve(READ_CHUNK);
        }
        let idle = async {
            match options.idle_timeout {
                Some(limit) => tokio::time::sleep(limit).await,
                None => std::future::pending().await,
            }
        };
        let read = tokio::select! {
            biased;
            _ = &mut cancelled => return Ok(()),
            read = stream.read_buf(&mut rbuf) => read?,
            _ = idle => return Ok(()),
        };
        if read == 0 {
            return Ok(());
        }
        engine.count_io(read, 0);
    }
}
