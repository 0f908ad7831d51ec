//! Where a connection's replies go: a buffer that is written to the client
//! as it fills, so one request can never hold more than a bounded amount of
//! reply memory, however many values it asks for.
//!
//! Each connection may buffer [`ALLOWANCE`] bytes of replies on its own.
//! Beyond that it takes bytes from a [`ReplyBudget`] shared by every
//! connection of the process, and gives them back once they are written:
//! when the budget is used up, connections wait for others' replies to
//! drain instead of allocating more. A client that does not read cannot
//! hold budget for long: every write is bounded by the write timeout.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::Semaphore;

/// Reply bytes a connection buffers without taking from the shared budget:
/// ordinary replies (hits of a few KiB, a pipelined batch) fit, and
/// `max_connections` of them stay small (64 MiB for 1024 connections).
pub const ALLOWANCE: usize = 64 * 1024;

/// Reply memory shared by all connections, in bytes.
#[derive(Clone)]
pub struct ReplyBudget {
    bytes: Arc<Semaphore>,
    limit: usize,
}

impl ReplyBudget {
    pub fn new(limit: usize) -> ReplyBudget {
        let limit = limit.clamp(1, Semaphore::MAX_PERMITS);
        ReplyBudget {
            bytes: Arc::new(Semaphore::new(limit)),
            limit,
        }
    }

    /// Bytes not taken by any connection now.
    pub fn available(&self) -> usize {
        self.bytes.available_permits()
    }
}

/// A connection's reply buffer (see the module documentation).
pub struct Output<'a> {
    buf: BytesMut,
    sink: Option<Sink<'a>>,
    /// Bytes written to the client since this output was made.
    written: usize,
    /// Set once a write failed: later output is dropped, and the
    /// connection ends.
    failed: Option<std::io::Error>,
}

struct Sink<'a> {
    stream: &'a mut (dyn AsyncWrite + Unpin + Send + 'a),
    budget: &'a ReplyBudget,
    /// Bytes taken from the budget (beyond the allowance) and not yet given back.
    held: usize,
    write_timeout: Duration,
}

/// A position in the output, to take back what was encoded after it.
#[derive(Debug, Clone, Copy)]
pub struct Mark {
    len: usize,
    written: usize,
}

impl<'a> Output<'a> {
    /// Output that is only collected (tests, benchmarks): never written
    /// anywhere, never limited.
    pub fn collect() -> Output<'static> {
        Output {
            buf: BytesMut::new(),
            sink: None,
            written: 0,
            failed: None,
        }
    }

    /// Output written to `stream` as it fills, within `budget`.
    pub fn to(
        stream: &'a mut (dyn AsyncWrite + Unpin + Send + 'a),
        budget: &'a ReplyBudget,
        write_timeout: Duration,
        buf: BytesMut,
    ) -> Output<'a> {
        Output {
            buf,
            sink: Some(Sink {
                stream,
                budget,
                held: 0,
                write_timeout,
            }),
            written: 0,
            failed: None,
        }
    }

    /// The buffer to encode small replies into.
    pub fn buf(&mut self) -> &mut BytesMut {
        &mut self.buf
    }

    /// What is buffered and not yet written.
    pub fn pending(&self) -> &[u8] {
        &self.buf
    }

    /// Takes the buffer back (what was not written), for reuse.
    pub fn into_buf(mut self) -> BytesMut {
        std::mem::take(&mut self.buf)
    }

    /// Bytes written to the client so far.
    pub fn written(&self) -> usize {
        self.written
    }

    /// Whether writing to the client failed (the connection must end).
    pub fn take_error(&mut self) -> Option<std::io::Error> {
        self.failed.take()
    }

    pub fn mark(&self) -> Mark {
        Mark {
            len: self.buf.len(),
            written: self.written,
        }
    }

    /// Drops what was encoded since `mark`, if none of it was written yet
    /// (returns whether it could).
    pub fn truncate(&mut self, mark: Mark) -> bool {
        if self.written != mark.written {
            return false;
        }
        self.buf.truncate(mark.len);
        true
    }

    /// Whether `more` bytes can be encoded now without waiting.
    pub fn fits(&self, more: usize) -> bool {
        match &self.sink {
            None => true,
            Some(sink) => self.buf.len() + more <= ALLOWANCE + sink.held,
        }
    }

    /// Makes room for `more` bytes: writes out what is buffered, then takes
    /// what the allowance lacks from the shared budget (waiting for it).
    pub async fn make_room(&mut self, more: usize) {
        if self.fits(more) {
            return;
        }
        self.flush().await;
        let Some(sink) = &mut self.sink else {
            return;
        };
        let need = (self.buf.len() + more)
            .saturating_sub(ALLOWANCE)
            .min(sink.budget.limit);
        if need > sink.held {
            let more_permits = u32::try_from(need - sink.held).unwrap_or(u32::MAX);
            match sink.budget.bytes.acquire_many(more_permits).await {
                Ok(permit) => {
                    permit.forget();
                    sink.held += more_permits as usize;
                }
                Err(_) => unreachable!("the budget's semaphore is never closed"),
            }
        }
    }

    /// Writes what is buffered to the client (within the write timeout)
    /// and gives back the budget it held.
    pub async fn flush(&mut self) {
        let Some(sink) = &mut self.sink else {
            return;
        };
        if !self.buf.is_empty() && self.failed.is_none() {
            // Most writes complete at once (the socket has room): try once
            // before arming the write timeout's timer, which would cost
            // more than the write itself on the hit path.
            let mut write = std::pin::pin!(sink.stream.write_all(&self.buf));
            let first =
                std::future::poll_fn(|cx| std::task::Poll::Ready(write.as_mut().poll(cx))).await;
            let done = match first {
                std::task::Poll::Ready(done) => Ok(done),
                std::task::Poll::Pending => tokio::time::timeout(sink.write_timeout, write).await,
            };
            match done {
                Ok(Ok(())) => self.written += self.buf.len(),
                Ok(Err(e)) => self.failed = Some(e),
                Err(_) => {
                    self.failed = Some(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "the client did not read its replies within write_timeout",
                    ))
                }
            }
        }
        self.buf.clear();
        if sink.held > 0 {
            sink.budget.bytes.add_permits(sink.held);
            sink.held = 0;
        }
        // A large reply leaves a large allocation behind: let it go.
        if self.buf.capacity() > 4 * ALLOWANCE {
            self.buf = BytesMut::with_capacity(16 * 1024);
        }
    }
}

impl Drop for Output<'_> {
    fn drop(&mut self) {
        if let Some(sink) = &mut self.sink
            && sink.held > 0
        {
            sink.budget.bytes.add_permits(sink.held);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn replies_beyond_the_allowance_take_budget_until_written() {
        let budget = ReplyBudget::new(1 << 20);
        let mut sink = Vec::new();
        let mut out = Output::to(&mut sink, &budget, Duration::from_secs(1), BytesMut::new());
        out.buf().extend_from_slice(&[b'a'; 1000]);
        assert!(out.fits(ALLOWANCE - 1000));
        assert!(!out.fits(ALLOWANCE));
        // A value larger than the allowance: the buffer is written first,
        // then the budget lends what the allowance lacks.
        out.make_room(ALLOWANCE + 100).await;
        assert_eq!(out.written(), 1000);
        assert_eq!(budget.available(), (1 << 20) - 100);
        out.buf().extend_from_slice(&vec![b'b'; ALLOWANCE + 100]);
        out.flush().await;
        assert_eq!(budget.available(), 1 << 20, "given back once written");
        let mark = out.mark();
        out.buf().extend_from_slice(b"x");
        assert!(out.truncate(mark));
        drop(out);
        assert_eq!(sink.len(), 1000 + ALLOWANCE + 100);
    }

    #[tokio::test]
    async fn a_client_that_does_not_read_fails_its_output_in_time() {
        let (mut client, mut server) = tokio::io::duplex(1024);
        let budget = ReplyBudget::new(1 << 20);
        let mut out = Output::to(
            &mut server,
            &budget,
            Duration::from_millis(50),
            BytesMut::new(),
        );
        out.buf().extend_from_slice(&[b'a'; 4096]);
        out.flush().await;
        assert!(out.take_error().is_some(), "write_timeout");
        drop(out);
        assert_eq!(budget.available(), 1 << 20);
        let _ = &mut client;
    }
}
