//! Fuzz the frame decoder: any byte stream, cut into reads at any points, yields frames no
//! larger than the limit or an error, never a panic; after an error the reader stays failed;
//! and the frames that decode re-encode to a prefix of the input.
#![no_main]

use borg_net::frame::{write_frame, FrameError, FrameReader, MAX_FRAME};
use libfuzzer_sys::fuzz_target;
use tokio::io::AsyncWriteExt;

fuzz_target!(|data: &[u8]| {
    let Some((&chunk, input)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(chunk).max(1);
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a current-thread runtime without drivers always builds");
    rt.block_on(async {
        // Feed the input through a small pipe in `chunk`-sized writes, so reads end anywhere.
        let (mut tx, rx) = tokio::io::duplex(64);
        let owned = input.to_vec();
        let writer = async move {
            for piece in owned.chunks(chunk) {
                if tx.write_all(piece).await.is_err() {
                    return;
                }
            }
        };
        let reader = async move {
            let mut r = FrameReader::new(rx);
            let mut frames = Vec::new();
            loop {
                match r.read_frame().await {
                    Ok(Some(f)) => {
                        assert!(f.len() <= MAX_FRAME);
                        frames.push(f);
                    }
                    Ok(None) => return (frames, true),
                    Err(_) => {
                        assert!(matches!(r.read_frame().await, Err(FrameError::Failed)));
                        return (frames, false);
                    }
                }
            }
        };
        let ((), (frames, clean)) = tokio::join!(writer, reader);
        let mut wire = Vec::new();
        for f in &frames {
            write_frame(&mut wire, f).await.expect("a decoded frame fits the limit");
        }
        assert!(input.starts_with(&wire));
        if clean {
            assert_eq!(wire.len(), input.len(), "a clean end consumed everything");
        }
    });
});
