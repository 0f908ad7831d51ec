//! The peer protocol on the wire: messages, and the encrypted channel that
//! carries them.
//!
//! A connection starts with the Noise handshake `NNpsk0_25519_ChaChaPoly_
//! BLAKE2s` keyed by the fleet secret: a peer that does not know the secret
//! cannot complete it. Every frame after it is one Noise transport message
//! (at most 65,535 bytes: a 2-byte length, then the ciphertext and its
//! 16-byte tag), whose plaintext is a postcard-encoded batch of [`Msg`]s.
//! Noise's per-direction nonces make every frame authenticated and in
//! order: a frame that was altered, replayed, reordered or injected fails
//! to decrypt, and the connection is dropped.

use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

const NOISE: &str = "Noise_NNpsk0_25519_ChaChaPoly_BLAKE2s";
/// Largest Noise message.
const FRAME_MAX: usize = 65535;
/// Poly1305's tag.
const TAG: usize = 16;
/// Largest plaintext of one frame.
pub const PAYLOAD_MAX: usize = FRAME_MAX - TAG;
/// The longest varint a frame's message count can take.
const VARINT_MAX: usize = 10;

/// One message between peers. The connection from Y to X carries Y's
/// lease requests and X's grants, invalidations and flushes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Msg {
    /// The dialer names itself (first message).
    Hello {
        member: u64,
    },
    /// The dialed names itself (its answer).
    Welcome {
        member: u64,
    },
    /// The dialed holds the dialer's lease and counts it as a member whose
    /// writes it waits for: the dialer may acknowledge writes once every
    /// member it knows said so.
    Known,
    LeaseRequest {
        seq: u64,
    },
    /// A lease of `millis`, counted by the requester from when it asked.
    Grant {
        seq: u64,
        millis: u32,
    },
    /// `key` was written: drop it. With `doubt`, the write's outcome is
    /// unknown: keep the key uncached while the table may still hold the
    /// version it replaced (`expected`: that version, None for no item)
    /// and until it holds `ours` or another.
    Invalidate {
        id: u64,
        key: Vec<u8>,
        doubt: Option<(Option<u64>, u64)>,
    },
    /// A `flush_all` hides items older than `before`.
    Flush {
        id: u64,
        before: u64,
    },
    /// Every invalidation and flush up to `id` is applied.
    Ack {
        id: u64,
    },
    /// The sender leaves the fleet and acknowledges nothing any more.
    Bye,
}

/// The 32-byte Noise PSK derived from the configured secret.
pub fn psk(secret: &str) -> [u8; 32] {
    use blake2::Digest;
    let mut hasher = blake2::Blake2s256::new();
    hasher.update(b"dynacache fleet secret v1\0");
    hasher.update(secret.as_bytes());
    hasher.finalize().into()
}

/// Why a connection ended.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("handshake or frame rejected (wrong secret, or altered bytes)")]
    Crypto,
    #[error("undecodable message")]
    Decode,
}

/// The receiving and sending halves' shared Noise state (each direction
/// has its own key and counter; the lock is held only to seal or open).
pub struct Cipher(Mutex<snow::TransportState>);

impl Cipher {
    /// Runs the handshake as the dialer.
    pub async fn connect<T: AsyncRead + AsyncWrite + Unpin>(
        stream: &mut T,
        psk: &[u8; 32],
    ) -> Result<Cipher, WireError> {
        Cipher::handshake(stream, psk, true).await
    }

    /// Runs the handshake as the dialed.
    pub async fn accept<T: AsyncRead + AsyncWrite + Unpin>(
        stream: &mut T,
        psk: &[u8; 32],
    ) -> Result<Cipher, WireError> {
        Cipher::handshake(stream, psk, false).await
    }

    /// NNpsk0 takes one message each way: the dialer's, then the answer.
    async fn handshake<T: AsyncRead + AsyncWrite + Unpin>(
        stream: &mut T,
        psk: &[u8; 32],
        dialer: bool,
    ) -> Result<Cipher, WireError> {
        let builder = snow::Builder::new(NOISE.parse().expect("a valid Noise pattern"))
            .psk(0, psk)
            .map_err(|_| WireError::Crypto)?;
        let mut noise = if dialer {
            builder.build_initiator()
        } else {
            builder.build_responder()
        }
        .map_err(|_| WireError::Crypto)?;
        let mut buf = vec![0u8; FRAME_MAX];
        for sending in [dialer, !dialer] {
            if sending {
                let n = noise
                    .write_message(&[], &mut buf)
                    .map_err(|_| WireError::Crypto)?;
                write_frame(stream, &buf[..n]).await?;
            } else {
                let frame = read_frame(stream).await?;
                noise
                    .read_message(&frame, &mut buf)
                    .map_err(|_| WireError::Crypto)?;
            }
        }
        let transport = noise.into_transport_mode().map_err(|_| WireError::Crypto)?;
        Ok(Cipher(Mutex::new(transport)))
    }

    /// Seals `msgs` into frames (as many as their size needs) and writes them.
    pub async fn send<W: AsyncWrite + Unpin>(
        &self,
        stream: &mut W,
        msgs: &[Msg],
    ) -> Result<(), WireError> {
        // A frame's payload is a postcard `Vec<Msg>`: a varint count, then
        // the messages' encodings one after another. Each message is encoded
        // once; as many as fit go in one frame (a key is at most 250 bytes,
        // so any one message fits).
        let encoded = msgs
            .iter()
            .map(postcard::to_stdvec)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| WireError::Decode)?;
        let mut out = Vec::new();
        let mut rest = &encoded[..];
        while !rest.is_empty() {
            let mut count = 0;
            let mut size = 0;
            while count < rest.len() && VARINT_MAX + size + rest[count].len() <= PAYLOAD_MAX {
                size += rest[count].len();
                count += 1;
            }
            let count = count.max(1);
            let mut plain = postcard::to_stdvec(&(count as u64)).map_err(|_| WireError::Decode)?;
            for msg in &rest[..count] {
                plain.extend_from_slice(msg);
            }
            let mut sealed = vec![0u8; plain.len() + TAG];
            let n = self
                .0
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .write_message(&plain, &mut sealed)
                .map_err(|_| WireError::Crypto)?;
            out.extend_from_slice(&(n as u16).to_be_bytes());
            out.extend_from_slice(&sealed[..n]);
            rest = &rest[count..];
        }
        stream.write_all(&out).await?;
        Ok(())
    }

    /// Reads, opens and decodes the next frame.
    pub async fn recv<R: AsyncRead + Unpin>(&self, stream: &mut R) -> Result<Vec<Msg>, WireError> {
        let frame = read_frame(stream).await?;
        let mut plain = vec![0u8; frame.len()];
        let n = self
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .read_message(&frame, &mut plain)
            .map_err(|_| WireError::Crypto)?;
        postcard::from_bytes(&plain[..n]).map_err(|_| WireError::Decode)
    }
}

async fn write_frame<W: AsyncWrite + Unpin>(stream: &mut W, frame: &[u8]) -> std::io::Result<()> {
    let mut out = Vec::with_capacity(frame.len() + 2);
    out.extend_from_slice(&(frame.len() as u16).to_be_bytes());
    out.extend_from_slice(frame);
    stream.write_all(&out).await
}

async fn read_frame<R: AsyncRead + Unpin>(stream: &mut R) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 2];
    stream.read_exact(&mut len).await?;
    let mut frame = vec![0u8; u16::from_be_bytes(len) as usize];
    stream.read_exact(&mut frame).await?;
    Ok(frame)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn peers_with_the_secret_talk_and_others_are_refused() {
        let (mut a, mut b) = tokio::io::duplex(1 << 20);
        let key = psk("s3cret");
        let (dialer, dialed) =
            tokio::join!(Cipher::connect(&mut a, &key), Cipher::accept(&mut b, &key));
        let (dialer, dialed) = (dialer.unwrap(), dialed.unwrap());
        // Enough invalidations to need several frames.
        let msgs: Vec<Msg> = (0..1000)
            .map(|id| Msg::Invalidate {
                id,
                key: vec![b'k'; 250],
                doubt: Some((None, id)),
            })
            .collect();
        let (sent, got) = tokio::join!(dialer.send(&mut a, &msgs), async {
            let mut all = Vec::new();
            while all.len() < msgs.len() {
                all.extend(dialed.recv(&mut b).await.unwrap());
            }
            all
        });
        sent.unwrap();
        assert_eq!(got, msgs);

        // The wrong secret: the handshake fails on both sides.
        let (mut a, mut b) = tokio::io::duplex(1 << 20);
        let guess = psk("guess");
        // The dialed side refuses the first message and hangs up, so the
        // dialer's handshake fails too.
        let dialed = tokio::spawn(async move { Cipher::accept(&mut b, &key).await.is_err() });
        let dialer = Cipher::connect(&mut a, &guess).await;
        assert!(
            dialed.await.unwrap(),
            "the dialed side refuses a dialer without the secret"
        );
        assert!(dialer.is_err());
    }

    #[tokio::test]
    async fn an_altered_frame_is_refused() {
        let (mut a, mut b) = tokio::io::duplex(1 << 20);
        let key = psk("s3cret");
        let (dialer, dialed) =
            tokio::join!(Cipher::connect(&mut a, &key), Cipher::accept(&mut b, &key));
        let (dialer, dialed) = (dialer.unwrap(), dialed.unwrap());
        let mut captured = Vec::new();
        dialer
            .send(&mut captured, &[Msg::Ack { id: 7 }])
            .await
            .unwrap();
        // Replaying a frame, or flipping one bit of it, fails to open.
        let mut flipped = captured.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert!(dialed.recv(&mut &flipped[..]).await.is_err());
        assert_eq!(
            dialed.recv(&mut &captured[..]).await.unwrap(),
            [Msg::Ack { id: 7 }]
        );
        assert!(dialed.recv(&mut &captured[..]).await.is_err(), "a replay");
        // Garbage instead of a handshake.
        let (mut a, mut b) = tokio::io::duplex(1 << 20);
        a.write_all(b"\x00\x05hello").await.unwrap();
        drop(a);
        assert!(Cipher::accept(&mut b, &key).await.is_err());
    }
}
