//! Message compression (feature `compression`): gzip and zstd, negotiated per connection.
//!
//! Each side announces the codecs it reads as feature bits in SETTINGS
//! ([`crate::frame::features::GZIP`], [`crate::frame::features::ZSTD`]); a sender compresses only
//! for a peer that announced the codec. A compressed message body carries metadata
//! `tether-encoding: gzip|zstd`; a client that reads compressed responses says so with
//! `tether-accept-encoding`. Bodies under `min_size` are sent as they are, and so is any message
//! marked not to be compressed (`Request::set_compress(false)`, `Response::set_compress(false)`:
//! a body that mixes secrets with attacker-chosen text, for example). A compressed body expands
//! to at most the receiver's `max_frame_size`: a larger one (a compression bomb) is refused
//! without being expanded further (zstd's window is capped to match). A server holds at most
//! `max_concurrent_requests` expanded bodies of up to `max_frame_size` each, as it would
//! uncompressed ones: size those two together. Streams and oneway requests are not compressed.

use std::io::Read;

use bytes::Bytes;

/// Metadata key: the body is compressed with this codec.
pub const ENCODING: &str = "tether-encoding";
/// Metadata key (requests): the client reads responses compressed with this codec.
pub const ACCEPT_ENCODING: &str = "tether-accept-encoding";

/// A compression codec.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(rename_all = "lowercase")
)]
pub enum Encoding {
    /// gzip (RFC 1952), level 6.
    Gzip,
    /// zstd, level 3: about as small as gzip at several times the speed.
    Zstd,
}

impl Encoding {
    /// Its name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Encoding::Gzip => "gzip",
            Encoding::Zstd => "zstd",
        }
    }

    /// The codec a name stands for.
    pub fn from_name(name: &str) -> Option<Encoding> {
        match name {
            "gzip" => Some(Encoding::Gzip),
            "zstd" => Some(Encoding::Zstd),
            _ => None,
        }
    }

    /// Its feature bit in SETTINGS.
    pub fn feature(self) -> u64 {
        match self {
            Encoding::Gzip => crate::frame::features::GZIP,
            Encoding::Zstd => crate::frame::features::ZSTD,
        }
    }

    /// Whether a peer announcing `features` reads it.
    pub fn read_by(self, features: u64) -> bool {
        cfg!(feature = "compression") && features & self.feature() != 0
    }
}

/// Why a compressed body was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DecompressError {
    /// The codec is unknown, or this build has no compression.
    #[error("unsupported encoding {0:?}")]
    Unsupported(String),
    /// The body expands past the limit (a compression bomb, or a message over `max_frame_size`).
    #[error("compressed body expands past {limit} bytes")]
    TooLarge {
        /// The limit.
        limit: usize,
    },
    /// The body is not valid for its codec.
    #[error("compressed body is corrupt: {0}")]
    Corrupt(std::io::Error),
}

/// Compresses `body` with `encoding`.
#[cfg(feature = "compression")]
pub fn compress(encoding: Encoding, body: &[u8]) -> Bytes {
    use std::io::Write;
    let out = match encoding {
        Encoding::Gzip => {
            let mut e =
                flate2::write::GzEncoder::new(Vec::with_capacity(body.len() / 4), flate2::Compression::default());
            // Writing into a Vec cannot fail.
            let _ = e.write_all(body);
            e.finish().unwrap_or_default()
        }
        Encoding::Zstd => zstd::bulk::compress(body, 3).unwrap_or_default(),
    };
    Bytes::from(out)
}

/// Expands `body`, compressed with the codec named `name`, to at most `limit` bytes.
pub fn decompress(name: &str, body: &[u8], limit: usize) -> Result<Bytes, DecompressError> {
    let unsupported = || DecompressError::Unsupported(name.to_owned());
    let encoding = Encoding::from_name(name).ok_or_else(unsupported)?;
    #[cfg(feature = "compression")]
    {
        let reader: Box<dyn Read> = match encoding {
            Encoding::Gzip => Box::new(flate2::read::GzDecoder::new(body)),
            Encoding::Zstd => {
                let mut d = zstd::stream::read::Decoder::new(body).map_err(DecompressError::Corrupt)?;
                // A frame may ask for a window up to 2^31 bytes: allow only what the limit needs,
                // so a bomb's window cannot allocate past it either.
                let window = (usize::BITS - limit.max(1 << 10).saturating_sub(1).leading_zeros()).min(31);
                d.window_log_max(window).map_err(DecompressError::Corrupt)?;
                Box::new(d)
            }
        };
        read_limited(reader, limit)
    }
    #[cfg(not(feature = "compression"))]
    {
        let _ = (encoding, body, limit);
        Err(unsupported())
    }
}

/// Reads `r` to its end, refusing once it passes `limit` bytes (reading one byte past it, never
/// more, so a bomb costs at most `limit` of memory).
#[cfg_attr(not(feature = "compression"), allow(dead_code))]
fn read_limited(r: impl Read, limit: usize) -> Result<Bytes, DecompressError> {
    let mut out = Vec::new();
    r.take(limit as u64 + 1)
        .read_to_end(&mut out)
        .map_err(DecompressError::Corrupt)?;
    if out.len() > limit {
        return Err(DecompressError::TooLarge { limit });
    }
    Ok(Bytes::from(out))
}

/// The codecs this build reads, as feature bits.
pub fn features() -> u64 {
    if cfg!(feature = "compression") {
        crate::frame::features::GZIP | crate::frame::features::ZSTD
    } else {
        0
    }
}

#[cfg(all(test, feature = "compression"))]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_what_expands_past_the_limit() {
        let text: Vec<u8> = b"tether ".iter().copied().cycle().take(1 << 20).collect();
        for enc in [Encoding::Gzip, Encoding::Zstd] {
            let small = compress(enc, &text);
            assert!(small.len() < text.len() / 50, "{enc:?}: {} bytes", small.len());
            assert_eq!(decompress(enc.as_str(), &small, 1 << 20).unwrap(), text);
            assert!(matches!(
                decompress(enc.as_str(), &small, (1 << 20) - 1),
                Err(DecompressError::TooLarge { .. })
            ));
            assert!(matches!(
                decompress(enc.as_str(), b"not compressed at all", 1 << 20),
                Err(DecompressError::Corrupt(_))
            ));
        }
        assert!(matches!(
            decompress("br", b"", 10),
            Err(DecompressError::Unsupported(_))
        ));
    }
}
