//! Fuzzes what the proxy does with a Workload API message: prost decoding, then
//! splitting the concatenated DER certificates and checking the SVID. Nothing may
//! panic, and nothing that is not a valid, verifying SVID may be accepted.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use tandem_identity::spiffe::{api::X509SvidResponse, credentials_from, SpiffeConfig};

fuzz_target!(|data: &[u8]| {
    let Ok(response) = X509SvidResponse::decode(data) else {
        return;
    };
    let config = SpiffeConfig {
        socket: "/nonexistent".into(),
        id: "spiffe://example.org/fuzz".into(),
        trust_anchors: Vec::new(),
        backoff_min: std::time::Duration::from_millis(100),
        backoff_max: std::time::Duration::from_secs(1),
    };
    for svid in &response.svids {
        let _ = tandem_identity::source::split_der(&svid.x509_svid);
        let _ = tandem_identity::source::split_der(&svid.bundle);
    }
    if let Ok(credentials) = credentials_from(&response, &config, std::time::SystemTime::now()) {
        // Only a chain that verifies against its own bundle gets here.
        assert_eq!(credentials.name, config.id);
        assert!(!credentials.cert_chain.is_empty() && !credentials.trust_anchors.is_empty());
    }
});
