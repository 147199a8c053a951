//! Fuzz the binary stream frame decoder (`Want`, `Shard`, `Missing`, `Close`): arbitrary bytes
//! must decode or fail cleanly; what decodes respects the bounds and re-encodes to exactly the
//! input (the encoding is canonical). Also fuzz the resume progress record decoder with the
//! same bytes, which reads untrusted disk contents.
#![no_main]

use borg_proto::stream::frame::{Frame, MAX_SHARD_LEN, MAX_STREAM_FRAME};
use borg_proto::stream::progress::{Progress, MAX_PROGRESS_SHARDS};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(frame) = Frame::decode(data) {
        if let Frame::Shard(s) = &frame {
            assert!(s.bytes.len() <= MAX_SHARD_LEN);
        }
        assert!(data.len() <= MAX_STREAM_FRAME);
        assert_eq!(frame.encode(), data);
    }
    if let Ok(p) = Progress::decode(data) {
        assert!(p.total() <= MAX_PROGRESS_SHARDS && p.done_count() <= p.total());
        assert_eq!(p.encode(), data);
    }
});
