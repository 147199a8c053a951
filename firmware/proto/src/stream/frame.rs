//! The binary stream frame codec (docs/STREAM-draft.md, "Frames").
//!
//! A stream frame is the payload of one outer length-prefixed frame (`borg_net::frame`) on an
//! existing TLS link, next to JSON envelopes. Its first byte is [`FRAME_MARK`] (0x05): a
//! control character, which can never begin a JSON text, so a link reader tells the two apart
//! by the first byte alone ([`is_stream_frame`]; the runtime hands every frame whose first byte
//! is 0x00-0x08 to the link's cell as a binary frame, `borg_net::cell::is_binary_frame`).
//!
//! Layout (all integers big-endian):
//!
//! ```text
//! 0      mark    0x05
//! 1      version 1
//! 2      type    1 Want, 2 Shard, 3 Missing, 4 Close
//! 3..7   stream  u32
//! Want, Missing:  7..11 seq u32, 11..43 addr [32]                       (43 bytes)
//! Shard:          7..11 seq u32, 11..43 addr [32], 43..47 len u32, bytes (47 + len)
//! Close:          7..9  code u16                                          (9 bytes)
//! ```
//!
//! Decoding is strict: a wrong mark or version, an unknown type or close code, a shard longer
//! than [`MAX_SHARD_LEN`], a length that disagrees with the bytes present and trailing bytes
//! are all errors. Nothing is allocated before the length has been checked.

/// A shard address: the SHA-256 of its bytes.
pub type Addr = [u8; 32];

/// The largest shard, in bytes (256 KiB; the same limit as `borg_store::MAX_SHARD_BYTES`,
/// restated here because `proto` sits below `store`).
pub const MAX_SHARD_LEN: usize = 256 * 1024;

/// First byte of every stream frame. 0x05 cannot start JSON text, so never a JSON envelope,
/// and it is below `borg_net::cell::BINARY_FRAME_MAX_FIRST_BYTE` (the runtime's binary frames).
pub const FRAME_MARK: u8 = 0x05;
/// The frame format version this codec reads and writes.
pub const FRAME_VERSION: u8 = 1;

const T_WANT: u8 = 1;
const T_SHARD: u8 = 2;
const T_MISSING: u8 = 3;
const T_CLOSE: u8 = 4;

/// Bytes before the type-specific part: mark, version, type, stream.
pub const HEADER_LEN: usize = 7;
/// Length of an encoded `Want` or `Missing`.
pub const REQUEST_LEN: usize = HEADER_LEN + 4 + 32;
/// Length of a `Shard` frame without its bytes.
pub const SHARD_HEADER_LEN: usize = REQUEST_LEN + 4;
/// Length of an encoded `Close`.
pub const CLOSE_LEN: usize = HEADER_LEN + 2;
/// The largest stream frame (a maximal shard): 262,191 bytes, well under the outer 1 MiB limit.
pub const MAX_STREAM_FRAME: usize = SHARD_HEADER_LEN + MAX_SHARD_LEN;

/// Errors decoding a stream frame. Any of them means the peer broke the protocol; the link
/// layer counts it and closes the stream (or the link).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StreamFrameError {
    #[error("stream frame of {len} bytes is too short for its type")]
    TooShort { len: usize },
    #[error("not a stream frame (first byte {0:#04x})")]
    BadMark(u8),
    #[error("unsupported stream frame version {0}")]
    BadVersion(u8),
    #[error("unknown stream frame type {0}")]
    UnknownType(u8),
    #[error("unknown close code {0}")]
    UnknownCloseCode(u16),
    #[error("shard of {len} bytes exceeds the {MAX_SHARD_LEN}-byte limit")]
    ShardTooLarge { len: usize },
    #[error("shard frame declares {declared} bytes but carries {actual}")]
    LengthMismatch { declared: usize, actual: usize },
    #[error("{extra} trailing bytes after the frame")]
    TrailingBytes { extra: usize },
}

impl StreamFrameError {
    /// The wire error code (the same vocabulary as envelope rejections).
    pub fn code(&self) -> &'static str {
        match self {
            StreamFrameError::ShardTooLarge { .. } => "too_large",
            _ => "malformed",
        }
    }
}

/// Why a stream ends. Unknown codes are refused at decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum CloseCode {
    /// The receiver has what it wanted (or gave up); the holder drops the stream's queue.
    Done = 0,
    /// The holder's queue for this stream or its stream budget is full.
    Busy = 1,
    /// The stream id is not open on this link.
    UnknownStream = 2,
    /// The peer broke the protocol (e.g. an undecodable frame).
    Protocol = 3,
    /// The holder is shutting down.
    Shutdown = 4,
}

impl CloseCode {
    pub fn from_u16(v: u16) -> Option<Self> {
        Some(match v {
            0 => CloseCode::Done,
            1 => CloseCode::Busy,
            2 => CloseCode::UnknownStream,
            3 => CloseCode::Protocol,
            4 => CloseCode::Shutdown,
            _ => return None,
        })
    }
}

/// Receiver -> holder: send me shard `addr`; `seq` names this request in the answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Want {
    pub stream: u32,
    pub seq: u32,
    pub addr: Addr,
}

/// Holder -> receiver: the bytes asked for by request `seq`. Nothing here is trusted until
/// SHA-256(bytes) == addr has been checked against the request (see `recv`).
#[derive(Clone, PartialEq, Eq)]
pub struct Shard {
    pub stream: u32,
    pub seq: u32,
    pub addr: Addr,
    pub bytes: Vec<u8>,
}

impl std::fmt::Debug for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shard")
            .field("stream", &self.stream)
            .field("seq", &self.seq)
            .field("addr", &hex8(&self.addr))
            .field("len", &self.bytes.len())
            .finish()
    }
}

/// Holder -> receiver: I do not have `addr` (request `seq`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Missing {
    pub stream: u32,
    pub seq: u32,
    pub addr: Addr,
}

/// Either side: this stream is over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Close {
    pub stream: u32,
    pub code: CloseCode,
}

/// One decoded stream frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Want(Want),
    Shard(Shard),
    Missing(Missing),
    Close(Close),
}

/// Whether an outer frame payload is a stream frame (else it is a JSON envelope).
pub fn is_stream_frame(payload: &[u8]) -> bool {
    payload.first() == Some(&FRAME_MARK)
}

/// The first 8 hex digits of an address, for logs and error messages.
pub fn hex8(addr: &Addr) -> String {
    addr[..4].iter().map(|b| format!("{b:02x}")).collect()
}

impl Frame {
    pub fn stream(&self) -> u32 {
        match self {
            Frame::Want(w) => w.stream,
            Frame::Shard(s) => s.stream,
            Frame::Missing(m) => m.stream,
            Frame::Close(c) => c.stream,
        }
    }

    /// The encoded length of this frame.
    pub fn encoded_len(&self) -> usize {
        match self {
            Frame::Want(_) | Frame::Missing(_) => REQUEST_LEN,
            Frame::Shard(s) => SHARD_HEADER_LEN + s.bytes.len(),
            Frame::Close(_) => CLOSE_LEN,
        }
    }

    /// Append the encoding to `out`. A shard over [`MAX_SHARD_LEN`] is still encoded (the
    /// sender checks its source); the receiving decoder refuses it.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        out.reserve(self.encoded_len());
        let (ty, stream) = match self {
            Frame::Want(w) => (T_WANT, w.stream),
            Frame::Shard(s) => (T_SHARD, s.stream),
            Frame::Missing(m) => (T_MISSING, m.stream),
            Frame::Close(c) => (T_CLOSE, c.stream),
        };
        out.extend_from_slice(&[FRAME_MARK, FRAME_VERSION, ty]);
        out.extend_from_slice(&stream.to_be_bytes());
        match self {
            Frame::Want(Want { seq, addr, .. }) | Frame::Missing(Missing { seq, addr, .. }) => {
                out.extend_from_slice(&seq.to_be_bytes());
                out.extend_from_slice(addr);
            }
            Frame::Shard(s) => {
                out.extend_from_slice(&s.seq.to_be_bytes());
                out.extend_from_slice(&s.addr);
                // Lengths are bounded by MAX_SHARD_LEN in every honest use; saturate rather
                // than wrap so an oversized shard can never encode as a short one.
                let len = u32::try_from(s.bytes.len()).unwrap_or(u32::MAX);
                out.extend_from_slice(&len.to_be_bytes());
                out.extend_from_slice(&s.bytes);
            }
            Frame::Close(c) => out.extend_from_slice(&(c.code as u16).to_be_bytes()),
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len());
        self.encode_into(&mut out);
        out
    }

    /// Decode one stream frame: exactly `bytes`, nothing more, nothing less.
    pub fn decode(bytes: &[u8]) -> Result<Frame, StreamFrameError> {
        let too_short = StreamFrameError::TooShort { len: bytes.len() };
        let [mark, version, ty, s0, s1, s2, s3, rest @ ..] = bytes else {
            return Err(match bytes.first() {
                Some(&m) if m != FRAME_MARK => StreamFrameError::BadMark(m),
                _ => too_short,
            });
        };
        if *mark != FRAME_MARK {
            return Err(StreamFrameError::BadMark(*mark));
        }
        if *version != FRAME_VERSION {
            return Err(StreamFrameError::BadVersion(*version));
        }
        let stream = u32::from_be_bytes([*s0, *s1, *s2, *s3]);
        match *ty {
            T_WANT | T_MISSING => {
                let (seq, addr, rest) = seq_addr(rest).ok_or(too_short)?;
                no_trailing(rest)?;
                Ok(if *ty == T_WANT {
                    Frame::Want(Want { stream, seq, addr })
                } else {
                    Frame::Missing(Missing { stream, seq, addr })
                })
            }
            T_SHARD => {
                let (seq, addr, rest) = seq_addr(rest).ok_or(too_short.clone())?;
                let (len, data) = split_u32(rest).ok_or(too_short)?;
                let len = len as usize;
                if len > MAX_SHARD_LEN {
                    return Err(StreamFrameError::ShardTooLarge { len });
                }
                if data.len() < len {
                    return Err(StreamFrameError::LengthMismatch {
                        declared: len,
                        actual: data.len(),
                    });
                }
                no_trailing(&data[len..])?;
                Ok(Frame::Shard(Shard {
                    stream,
                    seq,
                    addr,
                    bytes: data.to_vec(),
                }))
            }
            T_CLOSE => {
                let [c0, c1, rest @ ..] = rest else {
                    return Err(too_short);
                };
                no_trailing(rest)?;
                let code = u16::from_be_bytes([*c0, *c1]);
                let code =
                    CloseCode::from_u16(code).ok_or(StreamFrameError::UnknownCloseCode(code))?;
                Ok(Frame::Close(Close { stream, code }))
            }
            other => Err(StreamFrameError::UnknownType(other)),
        }
    }
}

fn split_u32(bytes: &[u8]) -> Option<(u32, &[u8])> {
    let (head, rest) = bytes.split_first_chunk::<4>()?;
    Some((u32::from_be_bytes(*head), rest))
}

fn seq_addr(bytes: &[u8]) -> Option<(u32, Addr, &[u8])> {
    let (seq, rest) = split_u32(bytes)?;
    let (addr, rest) = rest.split_first_chunk::<32>()?;
    Some((seq, *addr, rest))
}

fn no_trailing(rest: &[u8]) -> Result<(), StreamFrameError> {
    if rest.is_empty() {
        Ok(())
    } else {
        Err(StreamFrameError::TrailingBytes { extra: rest.len() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn addr(n: u8) -> Addr {
        [n; 32]
    }

    fn arb_frame() -> impl Strategy<Value = Frame> {
        let addr = proptest::array::uniform32(any::<u8>());
        prop_oneof![
            (any::<u32>(), any::<u32>(), addr).prop_map(|(stream, seq, addr)| Frame::Want(Want {
                stream,
                seq,
                addr
            })),
            (any::<u32>(), any::<u32>(), addr)
                .prop_map(|(stream, seq, addr)| Frame::Missing(Missing { stream, seq, addr })),
            (
                any::<u32>(),
                any::<u32>(),
                addr,
                proptest::collection::vec(any::<u8>(), 0..600)
            )
                .prop_map(|(stream, seq, addr, bytes)| Frame::Shard(Shard {
                    stream,
                    seq,
                    addr,
                    bytes
                })),
            (any::<u32>(), 0u16..5).prop_map(|(stream, code)| Frame::Close(Close {
                stream,
                code: CloseCode::from_u16(code).unwrap()
            })),
        ]
    }

    #[test]
    fn layout_is_fixed() {
        let w = Frame::Want(Want {
            stream: 0x01020304,
            seq: 0x0a0b0c0d,
            addr: addr(0xee),
        })
        .encode();
        assert_eq!(w.len(), REQUEST_LEN);
        assert_eq!(&w[..11], &[0x05, 1, 1, 1, 2, 3, 4, 0x0a, 0x0b, 0x0c, 0x0d]);
        assert_eq!(&w[11..], &[0xee; 32]);
        let s = Frame::Shard(Shard {
            stream: 7,
            seq: 9,
            addr: addr(1),
            bytes: vec![5, 6, 7],
        })
        .encode();
        assert_eq!(s.len(), SHARD_HEADER_LEN + 3);
        assert_eq!(s[2], 2);
        assert_eq!(&s[43..47], &[0, 0, 0, 3]);
        assert_eq!(&s[47..], &[5, 6, 7]);
        let c = Frame::Close(Close {
            stream: 7,
            code: CloseCode::Busy,
        })
        .encode();
        assert_eq!(c, vec![0x05, 1, 4, 0, 0, 0, 7, 0, 1]);
        assert!(is_stream_frame(&c));
        assert!(!is_stream_frame(br#"{"v":1}"#));
        assert!(!is_stream_frame(b""));
    }

    #[test]
    fn max_shard_is_accepted_and_one_more_byte_is_refused() {
        let max = Frame::Shard(Shard {
            stream: 1,
            seq: 1,
            addr: addr(2),
            bytes: vec![9; MAX_SHARD_LEN],
        });
        let enc = max.encode();
        assert_eq!(enc.len(), MAX_STREAM_FRAME);
        assert_eq!(Frame::decode(&enc).unwrap(), max);
        let over = Frame::Shard(Shard {
            stream: 1,
            seq: 1,
            addr: addr(2),
            bytes: vec![9; MAX_SHARD_LEN + 1],
        });
        assert_eq!(
            Frame::decode(&over.encode()),
            Err(StreamFrameError::ShardTooLarge {
                len: MAX_SHARD_LEN + 1
            })
        );
        // A huge declared length with no bytes behind it is refused before any allocation.
        let mut lie = Frame::Shard(Shard {
            stream: 1,
            seq: 1,
            addr: addr(2),
            bytes: vec![],
        })
        .encode();
        lie[43..47].copy_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(
            Frame::decode(&lie),
            Err(StreamFrameError::ShardTooLarge {
                len: u32::MAX as usize
            })
        );
    }

    #[test]
    fn every_bound_is_refused() {
        let want = Frame::Want(Want {
            stream: 1,
            seq: 2,
            addr: addr(3),
        })
        .encode();
        let mut bad = want.clone();
        bad[0] = b'{';
        assert_eq!(Frame::decode(&bad), Err(StreamFrameError::BadMark(b'{')));
        let mut bad = want.clone();
        bad[1] = 2;
        assert_eq!(Frame::decode(&bad), Err(StreamFrameError::BadVersion(2)));
        for ty in [0u8, 5, 0xff] {
            let mut bad = want.clone();
            bad[2] = ty;
            assert_eq!(Frame::decode(&bad), Err(StreamFrameError::UnknownType(ty)));
        }
        let mut long = want.clone();
        long.push(0);
        assert_eq!(
            Frame::decode(&long),
            Err(StreamFrameError::TrailingBytes { extra: 1 })
        );
        assert_eq!(
            Frame::decode(&want[..want.len() - 1]),
            Err(StreamFrameError::TooShort {
                len: REQUEST_LEN - 1
            })
        );
        assert_eq!(
            Frame::decode(&[]),
            Err(StreamFrameError::TooShort { len: 0 })
        );
        // Shard: fewer bytes than declared, more bytes than declared.
        let shard = Frame::Shard(Shard {
            stream: 1,
            seq: 2,
            addr: addr(3),
            bytes: vec![1; 10],
        })
        .encode();
        assert_eq!(
            Frame::decode(&shard[..shard.len() - 1]),
            Err(StreamFrameError::LengthMismatch {
                declared: 10,
                actual: 9
            })
        );
        let mut long = shard.clone();
        long.extend_from_slice(&[0, 0]);
        assert_eq!(
            Frame::decode(&long),
            Err(StreamFrameError::TrailingBytes { extra: 2 })
        );
        // Close: unknown code, trailing byte.
        let close = Frame::Close(Close {
            stream: 1,
            code: CloseCode::Done,
        })
        .encode();
        let mut bad = close.clone();
        bad[7..9].copy_from_slice(&5u16.to_be_bytes());
        assert_eq!(
            Frame::decode(&bad),
            Err(StreamFrameError::UnknownCloseCode(5))
        );
        let mut long = close.clone();
        long.push(0);
        assert_eq!(
            Frame::decode(&long),
            Err(StreamFrameError::TrailingBytes { extra: 1 })
        );
        assert_eq!(
            Frame::decode(&close[..8]),
            Err(StreamFrameError::TooShort { len: 8 })
        );
    }

    proptest! {
        #[test]
        fn round_trip(frame in arb_frame()) {
            let enc = frame.encode();
            prop_assert_eq!(enc.len(), frame.encoded_len());
            prop_assert!(is_stream_frame(&enc));
            prop_assert_eq!(Frame::decode(&enc).unwrap(), frame);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..700)) {
            if let Ok(frame) = Frame::decode(&bytes) {
                // Whatever decodes is canonical: it re-encodes to exactly the input.
                prop_assert_eq!(frame.encode(), bytes);
            }
        }

        /// Every bound, for any frame: a declared shard length over the limit, any trailing
        /// bytes, any cut, any unknown type or version byte are refused.
        #[test]
        fn every_bound_is_refused_for_any_frame(
            frame in arb_frame(),
            over in (MAX_SHARD_LEN as u32 + 1)..=u32::MAX,
            extra in proptest::collection::vec(any::<u8>(), 1..8),
            cut in 1usize..8,
            ty in 5u8..=255,
            version in 2u8..=255,
        ) {
            let enc = frame.encode();
            let mut long = enc.clone();
            long.extend_from_slice(&extra);
            prop_assert!(Frame::decode(&long).is_err());
            let short = &enc[..enc.len().saturating_sub(cut)];
            prop_assert!(Frame::decode(short).is_err());
            let mut bad = enc.clone();
            bad[2] = ty;
            prop_assert_eq!(Frame::decode(&bad), Err(StreamFrameError::UnknownType(ty)));
            let mut bad = enc.clone();
            bad[1] = version;
            prop_assert_eq!(Frame::decode(&bad), Err(StreamFrameError::BadVersion(version)));
            if let Frame::Shard(_) = frame {
                let mut bad = enc.clone();
                bad[43..47].copy_from_slice(&over.to_be_bytes());
                prop_assert_eq!(
                    Frame::decode(&bad),
                    Err(StreamFrameError::ShardTooLarge { len: over as usize })
                );
            }
        }

        /// Mostly-valid frames with one byte changed or the tail cut: decode or refuse, and
        /// what decodes re-encodes to the same bytes.
        #[test]
        fn mutated_frames_decode_or_refuse(frame in arb_frame(), pos in any::<usize>(), val in any::<u8>(), cut in any::<usize>()) {
            let mut enc = frame.encode();
            let i = pos % enc.len();
            enc[i] = val;
            enc.truncate(enc.len() - cut % 3);
            if let Ok(f) = Frame::decode(&enc) {
                prop_assert_eq!(f.encode(), enc);
            }
        }
    }
}
