//! Mesh TLS: rustls configurations built from the proxy's current certificate, and
//! reading identities out of peer certificates.
//!
//! Choices, matching linkerd2-proxy so either proxy can sit at either end:
//! - TLS 1.3 only, ECDSA P-256 certificates, AES-128-GCM preferred (it is several times
//!   faster than ChaCha20 where the CPU has AES instructions), then AES-256-GCM, then
//!   ChaCha20-Poly1305.
//! - The post-quantum hybrid key exchange `X25519MLKEM768` first, then X25519, as
//!   linkerd2-proxy offers them: two Tandem proxies, or Tandem and linkerd2-proxy,
//!   agree on the hybrid; a peer without it answers the X25519 share that comes in
//!   the same ClientHello.
//! - Servers request a client certificate but accept its absence; the client identity
//!   is the SPIFFE ID of an X.509-SVID (its one `spiffe://` URI SAN), else the first
//!   DNS SAN of the client's leaf.
//! - Clients check the server's chain against the trust anchors without matching the
//!   SNI, then require the identity discovery named: a SPIFFE ID as the leaf's SPIFFE
//!   ID, a DNS name among the DNS SANs of a leaf that is not an SVID (so a SPIFFE
//!   workload can never pass for a pod, even under a shared anchor).
//! - ALPN `transport.l5d.io/v1` is offered only by the server config used for direct
//!   connections to the inbound port.
//!
//! The `tls` label types ([`TlsStatus`], [`NoTlsReason`]) live here too: they say
//! what TLS a connection has, which metrics only print.
//!
//! Unlike Linkerd, client session resumption is on: a new connection to a known peer
//! costs an abbreviated handshake, not a full one. The peer's identity is still checked
//! on every connection (a resumed session keeps the peer's certificate chain).

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};

/// The ALPN protocol that announces Linkerd's transport header (`mesh::transport_header`).
pub const TRANSPORT_HEADER_ALPN: &[u8] = b"transport.l5d.io/v1";

/// The ALPN protocol a Tandem inbound proxy selects for a carrier connection
/// (`opaque::carrier`).
pub const CARRIER_ALPN: &[u8] = b"tunnel.tandem.io/v1";

/// What TLS a connection has: the `tls` label and its companions.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub enum TlsStatus {
    /// No mesh TLS, for the reason given (Linkerd's `no_tls_reason` values).
    NoIdentity(NoTlsReason),
    /// The application's own TLS, passed through untouched.
    Opaque,
    /// Mesh TLS: `tls="true"` with the peer's identity as `client_id` (inbound) or
    /// `server_id` (outbound); a client without a certificate has none.
    Established(Option<Arc<str>>),
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum NoTlsReason {
    Loopback,
    NoTlsFromRemote,
    NotProvidedByServiceDiscovery,
}

impl NoTlsReason {
    pub fn label(self) -> &'static str {
        match self {
            NoTlsReason::Loopback => "loopback",
            NoTlsReason::NoTlsFromRemote => "no_tls_from_remote",
            NoTlsReason::NotProvidedByServiceDiscovery => "not_provided_by_service_discovery",
        }
    }
}

/// The configurations of one certificate, swapped whole when the certificate rotates.
pub struct TlsConfigs {
    /// The local identity these configs present.
    pub name: Arc<str>,
    /// For connections redirected to the inbound port (no ALPN).
    pub server: Arc<ServerConfig>,
    /// For direct connections to the inbound port: a Tandem carrier (preferred) or
    /// Linkerd's transport header (`transport.l5d.io/v1`).
    pub server_direct: Arc<ServerConfig>,
    /// For direct connections when carriers are turned off: the transport header only.
    pub server_transport_header: Arc<ServerConfig>,
    /// For meshed outbound connections (no ALPN).
    pub client: Arc<ClientConfig>,
    /// For opaque meshed outbound connections that send a transport header.
    pub client_transport_header: Arc<ClientConfig>,
    /// For opaque meshed outbound connections: a carrier if the peer takes one, else
    /// the transport header (`opaque/carrier.rs`).
    pub client_tunnel: Arc<ClientConfig>,
}

impl std::fmt::Debug for TlsConfigs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConfigs")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// The crypto provider: ring, with the cipher suites reordered as described above and
/// the post-quantum hybrid key exchange preferred (`tandem_identity::tls::kx_groups`).
pub fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::ring::cipher_suite::*;
    let mut provider = rustls::crypto::ring::default_provider();
    provider.kx_groups = tandem_identity::tls::kx_groups();
    provider.cipher_suites = vec![
        TLS13_AES_128_GCM_SHA256,
        TLS13_AES_256_GCM_SHA384,
        TLS13_CHACHA20_POLY1305_SHA256,
    ];
    Arc::new(provider)
}

impl TlsConfigs {
    pub fn new(
        name: &str,
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        trust_anchors: &[CertificateDer<'static>],
    ) -> Result<TlsConfigs, String> {
        let provider = provider();
        let mut roots = RootCertStore::empty();
        for anchor in trust_anchors {
            roots
                .add(anchor.clone())
                .map_err(|e| format!("invalid trust anchor: {e}"))?;
        }
        let roots = Arc::new(roots);
        let client_verifier =
            WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
                .allow_unauthenticated()
                .build()
                .map_err(|e| format!("cannot build the client verifier: {e}"))?;
        let server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| e.to_string())?
            .with_client_cert_verifier(client_verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(|e| format!("certificate and key do not fit together: {e}"))?;
        let mut server_direct = server.clone();
        let mut server_transport_header = server.clone();
        server_transport_header.alpn_protocols = vec![TRANSPORT_HEADER_ALPN.to_vec()];
        // A TLS server picks by its own preference: the carrier first.
        server_direct.alpn_protocols = vec![CARRIER_ALPN.to_vec(), TRANSPORT_HEADER_ALPN.to_vec()];

        let verifier = Arc::new(ChainOnlyVerifier {
            roots,
            algorithms: provider.signature_verification_algorithms,
        });
        let client = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| e.to_string())?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_auth_cert(chain, key)
            .map_err(|e| format!("certificate and key do not fit together: {e}"))?;
        let mut client_transport_header = client.clone();
        client_transport_header.alpn_protocols = vec![TRANSPORT_HEADER_ALPN.to_vec()];
        let mut client_tunnel = client.clone();
        client_tunnel.alpn_protocols = vec![CARRIER_ALPN.to_vec(), TRANSPORT_HEADER_ALPN.to_vec()];
        Ok(TlsConfigs {
            name: Arc::from(name),
            server: Arc::new(server),
            server_direct: Arc::new(server_direct),
            server_transport_header: Arc::new(server_transport_header),
            client: Arc::new(client),
            client_transport_header: Arc::new(client_transport_header),
            client_tunnel: Arc::new(client_tunnel),
        })
    }
}

/// Checks the server's chain against the trust anchors, but not its name: the identity
/// is checked after the handshake against what discovery expects (which may be a URI,
/// which SNI cannot carry).
#[derive(Debug)]
struct ChainOnlyVerifier {
    roots: Arc<RootCertStore>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for ChainOnlyVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The identity a peer proved: its SPIFFE ID when its leaf is an SVID, else the
/// leaf's first DNS SAN.
pub fn peer_identity(certs: Option<&[CertificateDer<'_>]>) -> Option<Arc<str>> {
    let sans = tandem_identity::tls::sans(certs?.first()?);
    match sans.spiffe_id() {
        Some(id) => Some(Arc::from(id)),
        None => sans.dns.into_iter().next().map(Arc::from),
    }
}

/// Whether the peer's leaf certificate proves `expected` (see
/// [`tandem_identity::tls::Sans::prove`]).
pub fn names(certs: Option<&[CertificateDer<'_>]>, expected: &str) -> bool {
    certs
        .and_then(|c| c.first())
        .is_some_and(|leaf| tandem_identity::tls::sans(leaf).prove(expected))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(sans: Vec<rcgen::SanType>) -> Vec<CertificateDer<'static>> {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = sans;
        vec![params.self_signed(&key).unwrap().der().clone()]
    }

    #[test]
    fn spiffe_ids_match_uri_sans_and_dns_names_match_dns_sans() {
        let id = "spiffe://root.linkerd.cluster.local/vm/billing";
        let svid = leaf(vec![rcgen::SanType::URI(id.try_into().unwrap())]);
        assert!(names(Some(&svid), id));
        assert!(!names(
            Some(&svid),
            "spiffe://root.linkerd.cluster.local/vm/Billing"
        ));
        assert!(!names(Some(&svid), "billing.vm.example.com"));

        let pod = leaf(vec![rcgen::SanType::DnsName(
            "Web.NS.serviceaccount.identity.linkerd.cluster.local"
                .try_into()
                .unwrap(),
        )]);
        assert!(names(
            Some(&pod),
            "web.ns.serviceaccount.identity.linkerd.cluster.local"
        ));
        assert!(!names(
            Some(&pod),
            "spiffe://web.ns.serviceaccount.identity.linkerd.cluster.local"
        ));
        assert!(!names(
            None,
            "web.ns.serviceaccount.identity.linkerd.cluster.local"
        ));

        // A URI SAN is never taken for a DNS identity, whatever it spells.
        let odd = leaf(vec![rcgen::SanType::URI(
            "spiffe://a.example".try_into().unwrap(),
        )]);
        assert!(!names(Some(&odd), "a.example"));
        assert_eq!(peer_identity(Some(&svid)).as_deref(), Some(id));
    }
}
