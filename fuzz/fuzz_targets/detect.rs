//! Fuzzes protocol detection with arbitrary client bytes, fed whole and split at
//! every point a dribbling client could split them.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tandem_proxy::net::detect::{classify, Classification, Protocol, DETECT_LIMIT};

fuzz_target!(|data: &[u8]| {
    let data = &data[..data.len().min(DETECT_LIMIT)];
    let whole = classify(data);
    if let Classification::Found(Protocol::Http2) = whole {
        assert!(data.starts_with(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"));
    }
    // Detection reads in pieces: each prefix must classify without panicking, and a
    // decision once made must not change as more bytes arrive.
    let mut decided: Option<Classification> = None;
    for end in 1..=data.len().min(64) {
        let partial = classify(&data[..end]);
        if let Some(earlier) = &decided {
            assert_eq!(earlier, &partial, "decision changed after {end} bytes");
        } else if partial != Classification::NeedMore {
            decided = Some(partial);
        }
    }
});
