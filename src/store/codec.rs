//! How a value's bytes are held in the table: compressed or as they are.
//! Pure functions, no I/O; `dynamo.rs` decides where the bytes go (one
//! item, or a head and chunk items) and marks in the item which codec
//! wrote them, so a reader always knows.
//!
//! zstd at level 3 was chosen by measurement (BENCHMARKS.md, section 7:
//! pickled sessions, HTML, JSON and incompressible bytes): HTML 9-10 times
//! smaller, JSON 4.2, pickled sessions 2.6 (2 KB) to 5.5 (1 MB), for about
//! 1-2 ms of CPU per MB compressed and 0.3-0.5 ms decompressed. lz4 keeps
//! 1.6-1.7 times more bytes (and write units) of HTML and JSON; deflate is
//! as small but compresses 8-10 times slower; level 9 saves 5-10% more bytes
//! for 4-7 times the CPU.

use serde::{Deserialize, Serialize};

/// What `compression` is set to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum Compression {
    /// Values at or above the threshold are stored zstd-compressed when
    /// that makes them smaller.
    Zstd,
    /// Values are stored as they are (for tables that other programs read).
    Off,
}

/// The bytes of a stored value, and how to read them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    /// The value's own bytes.
    Raw,
    /// A zstd frame that records the value's size.
    Zstd,
}

impl Codec {
    /// The name the table records it under.
    pub fn name(self) -> &'static str {
        match self {
            Codec::Raw => "raw",
            Codec::Zstd => "zstd",
        }
    }

    pub fn from_name(name: &str) -> Option<Codec> {
        match name {
            "raw" => Some(Codec::Raw),
            "zstd" => Some(Codec::Zstd),
            _ => None,
        }
    }
}

/// How values are compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Compressor {
    pub compression: Compression,
    /// Values shorter than this are stored as they are.
    pub threshold: usize,
    pub level: i32,
}

impl Compressor {
    /// Whether a value of `len` bytes is worth trying to compress.
    pub fn tries(&self, len: usize) -> bool {
        self.compression == Compression::Zstd && len >= self.threshold
    }

    /// The value compressed, if that is smaller than the value itself;
    /// None: store it as it is.
    pub fn compress(&self, value: &[u8]) -> Option<Vec<u8>> {
        if !self.tries(value.len()) {
            return None;
        }
        let mut packed = CONTEXTS
            .with_borrow_mut(|c| {
                let compressor = c.compressor()?;
                compressor.set_compression_level(self.level)?;
                compressor.compress(value)
            })
            .ok()?;
        if packed.len() >= value.len() {
            return None;
        }
        packed.shrink_to_fit();
        Some(packed)
    }
}

/// zstd's contexts, one of each per thread, made on first use and kept: a
/// context costs more to set up than a small value takes to compress: a
/// 2 KB session compresses in 7 µs with a kept context, 15 µs with a new one,
/// and decompresses in 3 µs against 11 (BENCHMARKS.md, section 7).
#[derive(Default)]
struct Contexts {
    compressor: Option<zstd::bulk::Compressor<'static>>,
    decompressor: Option<zstd::bulk::Decompressor<'static>>,
}

impl Contexts {
    fn compressor(&mut self) -> std::io::Result<&mut zstd::bulk::Compressor<'static>> {
        if self.compressor.is_none() {
            self.compressor = Some(zstd::bulk::Compressor::new(0)?);
        }
        Ok(self.compressor.as_mut().expect("just made"))
    }

    fn decompressor(&mut self) -> std::io::Result<&mut zstd::bulk::Decompressor<'static>> {
        if self.decompressor.is_none() {
            self.decompressor = Some(zstd::bulk::Decompressor::new()?);
        }
        Ok(self.decompressor.as_mut().expect("just made"))
    }
}

thread_local! {
    static CONTEXTS: std::cell::RefCell<Contexts> = std::cell::RefCell::new(Contexts::default());
}

/// Why stored bytes could not be read back.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("a compressed value does not record its size")]
    NoSize,
    #[error("a compressed value of {0} bytes is larger than any value can be")]
    TooLarge(u64),
    #[error("a compressed value is corrupt")]
    Corrupt,
}

/// The value that `bytes`, written by `codec`, hold; at most `max` bytes.
pub fn decode(codec: Codec, bytes: Vec<u8>, max: usize) -> Result<Vec<u8>, DecodeError> {
    match codec {
        Codec::Raw => Ok(bytes),
        Codec::Zstd => {
            // The frame says how large the value is: the buffer is exactly
            // that, and never more than a value can be.
            let size = zstd::zstd_safe::get_frame_content_size(&bytes)
                .map_err(|_| DecodeError::Corrupt)?
                .ok_or(DecodeError::NoSize)?;
            if size > max as u64 {
                return Err(DecodeError::TooLarge(size));
            }
            let value = CONTEXTS
                .with_borrow_mut(|c| c.decompressor()?.decompress(&bytes, size as usize))
                .map_err(|_| DecodeError::Corrupt)?;
            if value.len() as u64 != size {
                return Err(DecodeError::Corrupt);
            }
            Ok(value)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn zstd(threshold: usize) -> Compressor {
        Compressor {
            compression: Compression::Zstd,
            threshold,
            level: 3,
        }
    }

    #[test]
    fn compresses_only_what_it_should_and_reads_it_back() {
        let text = b"<tr><td>row</td><td>value</td></tr>\n".repeat(100);
        let packed = zstd(1024).compress(&text).expect("HTML compresses");
        assert!(packed.len() * 10 < text.len(), "{} bytes", packed.len());
        assert_eq!(
            decode(Codec::Zstd, packed, text.len()).unwrap(),
            text,
            "round trip"
        );
        // Below the threshold, or off: as it is.
        assert_eq!(zstd(text.len() + 1).compress(&text), None);
        let off = Compressor {
            compression: Compression::Off,
            ..zstd(0)
        };
        assert_eq!(off.compress(&text), None);
        // Bytes that do not shrink are stored as they are.
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let noise: Vec<u8> = (0..4096)
            .map(|_| {
                // xorshift64: bytes without structure zstd could use.
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 24) as u8
            })
            .collect();
        assert_eq!(zstd(0).compress(&noise), None);
        assert_eq!(decode(Codec::Raw, noise.clone(), 0).unwrap(), noise);
    }

    #[test]
    fn refuses_what_it_cannot_trust() {
        let text = vec![b'a'; 10_000];
        let packed = zstd(0).compress(&text).unwrap();
        // A value larger than allowed is not decompressed at all.
        assert_eq!(
            decode(Codec::Zstd, packed.clone(), 9_999),
            Err(DecodeError::TooLarge(10_000))
        );
        let mut damaged = packed.clone();
        let last = damaged.len() - 1;
        damaged[last] ^= 0xff;
        damaged.truncate(damaged.len() - 2);
        assert_eq!(
            decode(Codec::Zstd, damaged, 10_000),
            Err(DecodeError::Corrupt)
        );
        assert!(decode(Codec::Zstd, b"not zstd".to_vec(), 10_000).is_err());
        assert_eq!(Codec::from_name("zstd"), Some(Codec::Zstd));
        assert_eq!(Codec::from_name("lz4"), None);
    }
}
