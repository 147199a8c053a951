//! The one error type of the files library, with its wire codes and HTTP statuses in one place.

use borg_proto::envelope::EnvelopeError;
use borg_store::StoreError;

/// Why a files operation failed. [`FilesError::code`] is the wire error code and
/// [`FilesError::http_status`] the status a server answers with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FilesError {
    /// The input does not parse, or breaks a rule of the format (a bound, a field's shape,
    /// shard sizes that do not add up to the file size).
    #[error("malformed: {0}")]
    Malformed(String),
    /// The input, or a file it describes, is over a size limit.
    #[error("too large: {0}")]
    TooLarge(String),
    /// The envelope's signature does not verify for its sender.
    #[error("signature does not verify for the sender key")]
    BadSignature,
    /// A valid signature, but not by the key that may do this (not the file's owner).
    #[error("forbidden: {0}")]
    Forbidden(String),
    /// A chunk failed authentication: flipped bits, wrong position, wrong file or wrong key.
    #[error("chunk {index} does not decrypt: corrupt, out of place, or the wrong key")]
    Corrupt { index: u64 },
    /// Shard bytes, sizes or the plaintext hash do not match what the manifest says.
    #[error("file does not match its manifest: {0}")]
    Mismatch(String),
    /// The wrapped file key does not open with this key: not the owner's encryption key.
    #[error("the file key is not wrapped for this key")]
    WrongKey,
    /// A resumed upload re-encrypted a chunk to a different shard than the one already sent:
    /// the file changed since. Start over with a new file key.
    #[error("chunk {index} changed since it was uploaded; start over with a new file key")]
    Changed { index: u64 },
    /// Reading the plaintext failed.
    #[error("read error: {0}")]
    Io(String),
    /// The shard store (the sink or source of shards) failed.
    #[error("{0}")]
    Store(StoreError),
}

impl FilesError {
    /// The error code used on the wire (`{"error":"<code>",...}`) and in metrics labels.
    pub fn code(&self) -> &'static str {
        match self {
            FilesError::Malformed(_) => "malformed",
            FilesError::TooLarge(_) => "too_large",
            FilesError::BadSignature => "bad_signature",
            FilesError::Forbidden(_) => "forbidden",
            FilesError::Corrupt { .. } => "corrupt",
            FilesError::Mismatch(_) => "mismatch",
            FilesError::WrongKey => "wrong_key",
            FilesError::Changed { .. } => "changed",
            FilesError::Io(_) => "io",
            FilesError::Store(e) => e.code(),
        }
    }

    /// The HTTP status for this error when it answers a request: 400 for bad input, 401 for
    /// a bad signature, 403 for a non-owner, 409 for a changed upload, 413 for too large,
    /// 422 for content that does not match its manifest, 500 for our own failures.
    pub fn http_status(&self) -> u16 {
        match self {
            FilesError::Malformed(_) => 400,
            FilesError::BadSignature => 401,
            FilesError::Forbidden(_) | FilesError::WrongKey => 403,
            FilesError::Changed { .. } => 409,
            FilesError::TooLarge(_) => 413,
            FilesError::Corrupt { .. } | FilesError::Mismatch(_) => 422,
            FilesError::Io(_) => 500,
            FilesError::Store(e) => e.http_status(),
        }
    }
}

impl From<EnvelopeError> for FilesError {
    fn from(e: EnvelopeError) -> FilesError {
        match e {
            EnvelopeError::TooLarge => FilesError::TooLarge(e.to_string()),
            EnvelopeError::BadSignature => FilesError::BadSignature,
            other => FilesError::Malformed(other.to_string()),
        }
    }
}

impl From<StoreError> for FilesError {
    fn from(e: StoreError) -> FilesError {
        FilesError::Store(e)
    }
}

impl From<std::io::Error> for FilesError {
    fn from(e: std::io::Error) -> FilesError {
        FilesError::Io(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_and_statuses() {
        let cases = [
            (FilesError::Malformed("x".into()), "malformed", 400),
            (FilesError::TooLarge("x".into()), "too_large", 413),
            (FilesError::BadSignature, "bad_signature", 401),
            (FilesError::Forbidden("x".into()), "forbidden", 403),
            (FilesError::Corrupt { index: 3 }, "corrupt", 422),
            (FilesError::Mismatch("x".into()), "mismatch", 422),
            (FilesError::WrongKey, "wrong_key", 403),
            (FilesError::Changed { index: 0 }, "changed", 409),
            (FilesError::Io("x".into()), "io", 500),
            (
                FilesError::Store(StoreError::Full {
                    used: 1,
                    budget: 1,
                    wanted: 1,
                }),
                "full",
                507,
            ),
        ];
        for (e, code, status) in cases {
            assert_eq!((e.code(), e.http_status()), (code, status), "{e}");
        }
        assert_eq!(
            FilesError::from(EnvelopeError::BadSignature),
            FilesError::BadSignature
        );
        assert_eq!(
            FilesError::from(EnvelopeError::TooLarge).code(),
            "too_large"
        );
    }
}
