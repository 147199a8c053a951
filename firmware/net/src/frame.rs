//! Length-prefixed frames over any byte stream.
//!
//! Wire format: a 4-byte big-endian payload length, then the payload. A length above
//! [`MAX_FRAME`] is a protocol violation: the reader returns [`FrameError::TooLarge`] without
//! reading the payload and refuses every later read ([`FrameError::Failed`]); the connection
//! must be closed, because after an untrusted length there is no reliable way to find the next
//! frame. The same holds after any other error.
//!
//! End of stream exactly between two frames is a clean close (`Ok(None)`); anywhere else it is
//! [`FrameError::UnexpectedEof`].
//!
//! [`FrameReader::read_frame`] is cancel-safe (partial progress is kept in the reader), so it
//! can sit in a `tokio::select!` loop. [`write_frame`] is not: a cancelled write leaves a half
//! frame on the wire, so give each writer its own task or await it to completion.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Length of the big-endian length prefix.
pub const FRAME_HEADER_LEN: usize = 4;

/// Room above 1 MiB so that a frame carrying a maximal (1 MiB) envelope plus a small header
/// still fits. The envelope layer enforces its own 1 MiB limit.
pub const FRAME_HEADROOM: usize = 16 * 1024;

/// Largest accepted payload, in bytes.
pub const MAX_FRAME: usize = (1 << 20) + FRAME_HEADROOM;

/// Payload bytes requested from the stream per read; the buffer grows as data arrives, so a
/// peer that announces a large frame and sends nothing does not cost a large allocation.
const READ_CHUNK: usize = 64 * 1024;

/// Errors from reading or writing frames.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {len} bytes exceeds the {max}-byte limit")]
    TooLarge { len: usize, max: usize },
    #[error("stream ended in the middle of a frame")]
    UnexpectedEof,
    #[error("frame stream i/o: {0}")]
    Io(#[from] io::Error),
    #[error("the frame stream already failed; close the connection")]
    Failed,
}

/// Reads frames from a stream, keeping partial progress between calls.
#[derive(Debug)]
pub struct FrameReader<R> {
    inner: R,
    header: [u8; FRAME_HEADER_LEN],
    header_filled: usize,
    /// Payload length once the header is complete.
    expected: Option<usize>,
    payload: Vec<u8>,
    failed: bool,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            header: [0; FRAME_HEADER_LEN],
            header_filled: 0,
            expected: None,
            payload: Vec::new(),
            failed: false,
        }
    }

    /// The next frame, `Ok(None)` on a clean end of stream. Cancel-safe. After an error every
    /// later call returns [`FrameError::Failed`].
    pub async fn read_frame(&mut self) -> Result<Option<Vec<u8>>, FrameError> {
        if self.failed {
            return Err(FrameError::Failed);
        }
        let result = self.read_frame_inner().await;
        if result.is_err() {
            self.failed = true;
            self.payload = Vec::new();
        }
        result
    }

    async fn read_frame_inner(&mut self) -> Result<Option<Vec<u8>>, FrameError> {
        loop {
            let Some(len) = self.expected else {
                if self.header_filled == FRAME_HEADER_LEN {
                    let len = u32::from_be_bytes(self.header) as usize;
                    if len > MAX_FRAME {
                        return Err(FrameError::TooLarge {
                            len,
                            max: MAX_FRAME,
                        });
                    }
                    self.expected = Some(len);
                    self.payload = Vec::with_capacity(len.min(READ_CHUNK));
                    continue;
                }
                let n = self
                    .inner
                    .read(&mut self.header[self.header_filled..])
                    .await?;
                if n == 0 {
                    return if self.header_filled == 0 {
                        Ok(None)
                    } else {
                        Err(FrameError::UnexpectedEof)
                    };
                }
                self.header_filled += n;
                continue;
            };
            let missing = len - self.payload.len();
            if missing == 0 {
                self.expected = None;
                self.header_filled = 0;
                return Ok(Some(std::mem::take(&mut self.payload)));
            }
            self.payload.reserve(missing.min(READ_CHUNK));
            // `take` bounds the read to this frame, so bytes of the next frame stay in the
            // stream; read_buf only appends what it read, which keeps this cancel-safe.
            let limit = missing.min(READ_CHUNK) as u64;
            let n = (&mut self.inner)
                .take(limit)
                .read_buf(&mut self.payload)
                .await?;
            if n == 0 {
                return Err(FrameError::UnexpectedEof);
            }
        }
    }

    /// Whether part of a frame (header or payload) has arrived and the rest has not.
    pub fn in_progress(&self) -> bool {
        self.header_filled > 0
    }

    /// The underlying stream (any partially read frame is lost).
    pub fn into_inner(self) -> R {
        self.inner
    }
}

/// Read one frame from `reader`. Not cancel-safe; keep a [`FrameReader`] for repeated reads.
pub async fn read_frame<R: AsyncRead + Unpin>(
    reader: &mut R,
) -> Result<Option<Vec<u8>>, FrameError> {
    FrameReader::new(reader).read_frame().await
}

/// Write one frame and flush. A payload over [`MAX_FRAME`] is refused before anything is
/// written, so the stream stays usable. Not cancel-safe (see the module docs).
pub async fn write_frame<W: AsyncWrite + Unpin>(
    writer: &mut W,
    payload: &[u8],
) -> Result<(), FrameError> {
    let len = checked_len(payload.len())?;
    // One buffer, one write: over TLS this becomes one record instead of a 4-byte record
    // followed by the payload.
    let mut buf = Vec::with_capacity(FRAME_HEADER_LEN + payload.len());
    buf.extend_from_slice(&len.to_be_bytes());
    buf.extend_from_slice(payload);
    writer.write_all(&buf).await?;
    writer.flush().await?;
    Ok(())
}

fn checked_len(len: usize) -> Result<u32, FrameError> {
    match u32::try_from(len) {
        Ok(n) if len <= MAX_FRAME => Ok(n),
        _ => Err(FrameError::TooLarge {
            len,
            max: MAX_FRAME,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use tokio::io::duplex;

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
    }

    /// Bound for every wait in these tests; reaching it is a failure.
    async fn within<F: std::future::Future>(f: F) -> F::Output {
        tokio::time::timeout(std::time::Duration::from_secs(20), f)
            .await
            .expect("test step timed out")
    }

    #[tokio::test]
    async fn round_trip_and_clean_eof() {
        let (mut a, b) = duplex(1 << 12);
        let writer = async move {
            write_frame(&mut a, b"hello").await.unwrap();
            write_frame(&mut a, b"").await.unwrap();
            write_frame(&mut a, &[7u8; 100_000]).await.unwrap();
        };
        let reader = async move {
            let mut r = FrameReader::new(b);
            let mut got = Vec::new();
            while let Some(f) = r.read_frame().await.unwrap() {
                got.push(f);
            }
            got
        };
        let ((), got) = within(async { tokio::join!(writer, reader) }).await;
        assert_eq!(got, vec![b"hello".to_vec(), vec![], vec![7u8; 100_000]]);
    }

    #[tokio::test]
    async fn max_frame_is_accepted() {
        let (mut a, b) = duplex(1 << 16);
        let mut r = FrameReader::new(b);
        let payload = vec![1u8; MAX_FRAME];
        let (w, got) =
            within(async { tokio::join!(write_frame(&mut a, &payload), r.read_frame()) }).await;
        w.unwrap();
        assert_eq!(got.unwrap().unwrap().len(), MAX_FRAME);
    }

    #[tokio::test]
    async fn oversized_frame_is_an_error_and_poisons_the_reader() {
        let (mut a, b) = duplex(1 << 16);
        let too_big = (MAX_FRAME as u32 + 1).to_be_bytes();
        a.write_all(&too_big).await.unwrap();
        // A well-formed frame after it must not be delivered: the reader does not resync.
        write_frame(&mut a, b"after").await.unwrap();
        let mut r = FrameReader::new(b);
        let err = within(r.read_frame()).await.unwrap_err();
        assert!(
            matches!(err, FrameError::TooLarge { len, max } if len == MAX_FRAME + 1 && max == MAX_FRAME),
            "{err}"
        );
        assert!(matches!(r.read_frame().await, Err(FrameError::Failed)));
    }

    #[tokio::test]
    async fn oversized_write_is_refused_before_writing() {
        let (mut a, b) = duplex(1 << 16);
        let err = write_frame(&mut a, &vec![0u8; MAX_FRAME + 1])
            .await
            .unwrap_err();
        assert!(matches!(err, FrameError::TooLarge { .. }));
        write_frame(&mut a, b"ok").await.unwrap();
        drop(a);
        let mut r = FrameReader::new(b);
        assert_eq!(within(r.read_frame()).await.unwrap().unwrap(), b"ok");
        assert!(within(r.read_frame()).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn eof_inside_header_or_payload_is_an_error() {
        for bytes in [&[0u8, 0][..], &[0, 0, 0, 10, 1, 2, 3][..]] {
            let (mut a, b) = duplex(64);
            a.write_all(bytes).await.unwrap();
            drop(a);
            let mut r = FrameReader::new(b);
            assert!(matches!(
                within(r.read_frame()).await,
                Err(FrameError::UnexpectedEof)
            ));
        }
    }

    #[tokio::test]
    async fn read_frame_is_cancel_safe() {
        let (mut a, b) = duplex(64);
        let mut r = FrameReader::new(b);
        // Half a header and part of the payload are available; the read is abandoned after it
        // consumed them and found nothing more.
        a.write_all(&[0, 0, 0, 5, b'a', b'b']).await.unwrap();
        tokio::select! {
            biased;
            res = r.read_frame() => panic!("frame cannot be complete yet: {res:?}"),
            () = std::future::ready(()) => {}
        }
        assert!(r.in_progress());
        a.write_all(b"cde").await.unwrap();
        assert_eq!(within(r.read_frame()).await.unwrap().unwrap(), b"abcde");
        assert!(!r.in_progress());
    }

    proptest! {
        /// Any chunking of any sequence of frames decodes to the same frames.
        #[test]
        fn frames_survive_any_chunking(
            frames in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..20),
            chunk in 1usize..64,
        ) {
            let mut wire = Vec::new();
            rt().block_on(async {
                for f in &frames {
                    write_frame(&mut wire, f).await.unwrap();
                }
            });
            let decoded = rt().block_on(async {
                let (mut a, b) = duplex(64);
                let writer = async move {
                    for piece in wire.chunks(chunk) {
                        a.write_all(piece).await.unwrap();
                    }
                };
                let reader = async move {
                    let mut r = FrameReader::new(b);
                    let mut out = Vec::new();
                    while let Some(f) = r.read_frame().await.unwrap() {
                        out.push(f);
                    }
                    out
                };
                tokio::join!(writer, reader).1
            });
            prop_assert_eq!(decoded, frames);
        }

        /// Arbitrary input never panics, and once an error is reported the reader stays failed.
        #[test]
        fn arbitrary_input_is_decoded_or_rejected(bytes in proptest::collection::vec(any::<u8>(), 0..2000)) {
            rt().block_on(async {
                let mut input = &bytes[..];
                let mut r = FrameReader::new(&mut input);
                loop {
                    match r.read_frame().await {
                        Ok(Some(f)) => assert!(f.len() <= MAX_FRAME),
                        Ok(None) => break,
                        Err(_) => {
                            assert!(matches!(r.read_frame().await, Err(FrameError::Failed)));
                            break;
                        }
                    }
                }
            });
        }
    }
}
