//! Fuzzes the transport header parser with arbitrary bytes after a valid preface, and
//! checks that whatever it accepts (port, name, session protocol) encodes back to the
//! same header, and what the inbound side makes of its session protocol.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tandem_proxy::mesh::transport_header::TransportHeader;

fuzz_target!(|data: &[u8]| {
    let mut input = b"transport.l5d.io/v1\r\n\r\n".to_vec();
    input.extend_from_slice(data);
    for candidate in [data, &input[..]] {
        if let Ok(Some((header, used))) = TransportHeader::decode(candidate) {
            assert!(used <= candidate.len());
            assert_ne!(header.port, 0);
            let _ = tandem_proxy::inbound::plan::header_protocol(&header);
            // Re-encoding and decoding gives the same header.
            let again = header.encode();
            assert_eq!(
                TransportHeader::decode(&again),
                Ok(Some((header, again.len())))
            );
        }
    }
});
