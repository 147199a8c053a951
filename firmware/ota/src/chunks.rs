//! A release image as content-addressed chunks, so nodes fetch it through the storage layer.
//!
//! The image is cut into [`IMAGE_CHUNK`]-byte pieces (the last one shorter); each is stored
//! as a plain shard (its address is its SHA-256: the shard store takes any bytes and checks
//! nothing else). The **chunk list** names them in order, and is itself one shard; its
//! address is the manifest's fetch id, `chunks:<64 hex>`. Since maintainers approve the
//! manifest, which names the list's address, which names every chunk's address, every byte a
//! node fetches is checked against something the maintainers signed before it is written.
//! Images are not secret, so the chunks are not encrypted.
//!
//! The list's encoding is binary, so a 2 GiB image's list still fits in one shard:
//! `"BORGCHK1"`, the image size (u64 big endian), the chunk size (u32 big endian), then
//! 32 bytes per chunk. Decoding checks the magic, that the chunk size is [`IMAGE_CHUNK`],
//! that the count matches the size exactly, and the bound [`MAX_CHUNKS`].

use std::io::Read;

use sha2::Digest;

use crate::types::{FetchId, Sha256Hex};
use crate::OtaError;

/// Bytes per image chunk: one shard.
pub const IMAGE_CHUNK: usize = 256 * 1024;
const MAGIC: &[u8; 8] = b"BORGCHK1";
const HEADER: usize = 8 + 8 + 4;
/// Most chunks in one list: the list must fit in one shard (256 KiB), which bounds an image to
/// 8,191 × 256 KiB ≈ 2 GiB, well above an A/B slot.
pub const MAX_CHUNKS: usize = (IMAGE_CHUNK - HEADER) / 32;
/// The fetch-id prefix of a chunked image.
pub const FETCH_PREFIX: &str = "chunks:";

fn malformed(reason: impl Into<String>) -> OtaError {
    OtaError::Malformed {
        what: "chunk list",
        reason: reason.into(),
    }
}

/// The chunks of an image, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkList {
    pub size: u64,
    pub addrs: Vec<Sha256Hex>,
}

impl ChunkList {
    /// Number of chunks an image of `size` bytes has.
    pub fn count_for(size: u64) -> u64 {
        size.div_ceil(IMAGE_CHUNK as u64)
    }

    /// Offset and length of chunk `i`.
    pub fn span(&self, i: usize) -> (u64, usize) {
        let start = i as u64 * IMAGE_CHUNK as u64;
        let len = (self.size - start).min(IMAGE_CHUNK as u64) as usize;
        (start, len)
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER + 32 * self.addrs.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&self.size.to_be_bytes());
        out.extend_from_slice(&(IMAGE_CHUNK as u32).to_be_bytes());
        for a in &self.addrs {
            out.extend_from_slice(a.as_bytes());
        }
        out
    }

    /// The list's own address (what the manifest's fetch id names).
    pub fn address(&self) -> Sha256Hex {
        Sha256Hex::of(&self.encode())
    }

    /// The fetch id naming this list.
    pub fn fetch_id(&self) -> FetchId {
        // 7 + 64 characters of [a-z0-9:]: always a valid fetch id.
        FetchId::new(&format!("{FETCH_PREFIX}{}", self.address()))
            .unwrap_or_else(|_| FetchId::content(&self.address()))
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, OtaError> {
        if bytes.len() < HEADER || &bytes[..8] != MAGIC {
            return Err(malformed("not a chunk list (magic)"));
        }
        let size = u64::from_be_bytes(bytes[8..16].try_into().map_err(|_| malformed("size"))?);
        let chunk = u32::from_be_bytes(bytes[16..20].try_into().map_err(|_| malformed("chunk"))?);
        if chunk as usize != IMAGE_CHUNK {
            return Err(malformed(format!("chunk size {chunk}, not {IMAGE_CHUNK}")));
        }
        let body = &bytes[HEADER..];
        if !body.len().is_multiple_of(32) {
            return Err(malformed("a partial address"));
        }
        let n = body.len() / 32;
        if n > MAX_CHUNKS || size == 0 || Self::count_for(size) != n as u64 {
            return Err(malformed(format!(
                "{n} chunks for {size} bytes (at most {MAX_CHUNKS})"
            )));
        }
        let addrs = body
            .chunks_exact(32)
            .map(|c| {
                let mut a = [0u8; 32];
                a.copy_from_slice(c);
                Sha256Hex::from_bytes(a)
            })
            .collect();
        Ok(Self { size, addrs })
    }

    /// Read an image once: its chunk list and its SHA-256 (bounded memory: one chunk).
    /// `each` gets every chunk with its address, e.g. to upload it.
    pub fn build(
        mut reader: impl Read,
        mut each: impl FnMut(&Sha256Hex, &[u8]) -> Result<(), OtaError>,
    ) -> Result<(Self, Sha256Hex), OtaError> {
        let mut whole = sha2::Sha256::new();
        let mut addrs = Vec::new();
        let mut size = 0u64;
        let mut buf = vec![0u8; IMAGE_CHUNK];
        loop {
            let mut filled = 0;
            while filled < IMAGE_CHUNK {
                match reader.read(&mut buf[filled..]) {
                    Ok(0) => break,
                    Ok(n) => filled += n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(OtaError::Io(e.to_string())),
                }
            }
            if filled == 0 {
                break;
            }
            let chunk = &buf[..filled];
            whole.update(chunk);
            let addr = Sha256Hex::of(chunk);
            each(&addr, chunk)?;
            addrs.push(addr);
            size += filled as u64;
            if addrs.len() > MAX_CHUNKS {
                return Err(malformed(format!(
                    "the image is larger than {MAX_CHUNKS} chunks of {IMAGE_CHUNK} bytes"
                )));
            }
            if filled < IMAGE_CHUNK {
                break;
            }
        }
        if size == 0 {
            return Err(malformed("the image is empty"));
        }
        let digest = Sha256Hex::from_bytes(whole.finalize().into());
        Ok((Self { size, addrs }, digest))
    }
}

/// The chunk list address a fetch id names, if it is a `chunks:` id.
pub fn list_address(fetch: &FetchId) -> Option<Sha256Hex> {
    fetch.as_str().strip_prefix(FETCH_PREFIX)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 31 % 251) as u8).collect()
    }

    #[test]
    fn an_image_cuts_into_chunks_that_name_it() {
        for len in [
            1,
            IMAGE_CHUNK - 1,
            IMAGE_CHUNK,
            IMAGE_CHUNK + 1,
            3 * IMAGE_CHUNK + 7,
        ] {
            let img = image(len);
            let mut seen = Vec::new();
            let (list, digest) = ChunkList::build(&img[..], |a, c| {
                assert_eq!(Sha256Hex::of(c), *a);
                seen.extend_from_slice(c);
                Ok(())
            })
            .unwrap();
            assert_eq!(seen, img);
            assert_eq!(digest, Sha256Hex::of(&img));
            assert_eq!(list.size, len as u64);
            assert_eq!(list.addrs.len() as u64, ChunkList::count_for(len as u64));
            let (start, n) = list.span(list.addrs.len() - 1);
            assert_eq!(start as usize + n, len);
            assert_eq!(ChunkList::decode(&list.encode()).unwrap(), list);
            assert_eq!(list_address(&list.fetch_id()), Some(list.address()));
        }
        assert!(ChunkList::build(&[][..], |_, _| Ok(())).is_err());
    }

    #[test]
    fn a_list_that_does_not_add_up_is_refused() {
        let (list, _) = ChunkList::build(&image(2 * IMAGE_CHUNK)[..], |_, _| Ok(())).unwrap();
        let good = list.encode();
        let mut short = good.clone();
        short.truncate(good.len() - 32);
        assert!(ChunkList::decode(&short).is_err(), "one address missing");
        let mut partial = good.clone();
        partial.pop();
        assert!(ChunkList::decode(&partial).is_err());
        let mut size = good.clone();
        size[15] ^= 1;
        size[14] ^= 0x80;
        assert!(
            ChunkList::decode(&size).is_err(),
            "size not matching the count"
        );
        let mut magic = good.clone();
        magic[0] = b'X';
        assert!(ChunkList::decode(&magic).is_err());
        assert!(list_address(&FetchId::new("sha256:ab").unwrap()).is_none());
    }

    proptest::proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..400)) {
            let mut b = MAGIC.to_vec();
            b.extend_from_slice(&bytes);
            let _ = ChunkList::decode(&b);
            let _ = ChunkList::decode(&bytes);
        }
    }
}
