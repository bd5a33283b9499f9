//! TLS between proxies and the issuer service, with the ring provider (and the
//! post-quantum hybrid key exchange from aws-lc-rs) passed explicitly (never
//! installed process-wide) and TLS 1.3 only, as in Linkerd.

use anyhow::{Context, Result};
use rustls::client::danger::ServerCertVerifier;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use std::sync::{Arc, RwLock};
use std::time::SystemTime;
use tokio::io::{AsyncRead, AsyncWrite};

/// The crypto provider used everywhere in this crate: ring, with the key exchanges
/// of [`kx_groups`].
pub fn provider() -> Arc<CryptoProvider> {
    let mut provider = rustls::crypto::ring::default_provider();
    provider.kx_groups = kx_groups();
    Arc::new(provider)
}

/// The key exchanges offered and accepted, in order of preference, as linkerd2-proxy
/// orders them: the post-quantum hybrid `X25519MLKEM768` first (from aws-lc-rs, the
/// only rustls provider that has ML-KEM), then the classical groups (from ring, as the
/// rest of the provider). A client sends shares for the hybrid and for X25519 in one
/// ClientHello, so a peer without the hybrid answers X25519 without a retry.
pub fn kx_groups() -> Vec<&'static dyn rustls::crypto::SupportedKxGroup> {
    vec![
        rustls::crypto::aws_lc_rs::kx_group::X25519MLKEM768,
        rustls::crypto::ring::kx_group::X25519,
        rustls::crypto::ring::kx_group::SECP256R1,
        rustls::crypto::ring::kx_group::SECP384R1,
    ]
}

fn roots(anchors: &[CertificateDer<'_>]) -> Result<rustls::RootCertStore> {
    let mut roots = rustls::RootCertStore::empty();
    for a in anchors {
        roots
            .add(a.clone().into_owned())
            .context("invalid trust anchor")?;
    }
    Ok(roots)
}

/// A client config that trusts only `anchors`.
pub fn client_config(anchors: &[CertificateDer<'_>]) -> Result<rustls::ClientConfig> {
    Ok(rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("TLS 1.3 unavailable")?
        .with_root_certificates(roots(anchors)?)
        .with_no_client_auth())
}

/// Verifies that `chain` (leaf first) is valid at `now`, chains to `anchors`
/// and names `name`, with the same webpki rules a TLS peer applies.
pub fn verify(
    chain: &[CertificateDer<'_>],
    anchors: &[CertificateDer<'_>],
    name: &str,
    now: SystemTime,
) -> Result<()> {
    let (leaf, intermediates) = chain.split_first().context("empty certificate chain")?;
    let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots(anchors)?),
        provider(),
    )
    .build()
    .context("build certificate verifier")?;
    let server_name =
        ServerName::try_from(name.to_string()).with_context(|| format!("invalid name {name:?}"))?;
    let now = UnixTime::since_unix_epoch(
        now.duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default(),
    );
    verifier
        .verify_server_cert(leaf, intermediates, &server_name, &[], now)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}

/// Whether `id` is a SPIFFE ID (`spiffe://trust-domain/path`) rather than a DNS name.
pub fn is_spiffe_id(id: &str) -> bool {
    id.starts_with("spiffe://")
}

/// Checks the shape of a SPIFFE ID: a lower-case trust domain of letters, digits,
/// `.`, `-` and `_`, then an optional path of non-empty segments.
pub fn check_spiffe_id(id: &str) -> Result<()> {
    let Some(rest) = id.strip_prefix("spiffe://") else {
        anyhow::bail!("expected a SPIFFE ID (spiffe://trust-domain/path)");
    };
    let (domain, path) = rest.split_once('/').map_or((rest, ""), |(d, p)| (d, p));
    let domain_ok = !domain.is_empty()
        && domain
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b));
    if !domain_ok {
        anyhow::bail!(
            "{id:?}: the trust domain must be lower-case letters, digits, '.', '-' or '_'"
        );
    }
    if rest.contains('/')
        && path
            .split('/')
            .any(|segment| segment.is_empty() || segment == "." || segment == "..")
    {
        anyhow::bail!("{id:?}: empty, '.' or '..' path segment");
    }
    if id.contains(['?', '#']) {
        anyhow::bail!("{id:?}: a SPIFFE ID has no query or fragment");
    }
    Ok(())
}

/// [`verify`] for either kind of identity: a DNS name is checked as a TLS peer
/// would check it; a SPIFFE ID must be a URI SAN of the leaf (SNI cannot carry one).
pub fn verify_id(
    chain: &[CertificateDer<'_>],
    anchors: &[CertificateDer<'_>],
    id: &str,
    now: SystemTime,
) -> Result<()> {
    if !is_spiffe_id(id) {
        return verify(chain, anchors, id, now);
    }
    let (leaf, intermediates) = chain.split_first().context("empty certificate chain")?;
    let parsed = rustls::server::ParsedCertificate::try_from(leaf)
        .map_err(|e| anyhow::anyhow!("invalid leaf certificate: {e}"))?;
    let now = UnixTime::since_unix_epoch(
        now.duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default(),
    );
    rustls::client::verify_server_cert_signed_by_trust_anchor(
        &parsed,
        &roots(anchors)?,
        intermediates,
        now,
        provider().signature_verification_algorithms.all,
    )
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let names = sans(leaf);
    if !names.prove(id) {
        anyhow::bail!(
            "the certificate does not name {id} as its only URI SAN (URI SANs: {:?})",
            names.uris
        );
    }
    Ok(())
}

/// The names a certificate carries, by kind.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Sans {
    /// DNS SANs, lower-cased (DNS names compare without case).
    pub dns: Vec<String>,
    /// URI SANs, as written.
    pub uris: Vec<String>,
}

impl Sans {
    /// The certificate's SPIFFE ID: its URI SAN when it has exactly one and that is a
    /// `spiffe://` URI (an X.509-SVID carries exactly one).
    pub fn spiffe_id(&self) -> Option<&str> {
        match self.uris.as_slice() {
            [only] if is_spiffe_id(only) => Some(only),
            _ => None,
        }
    }

    /// Whether the certificate proves `id`. A SPIFFE ID must be the certificate's SPIFFE
    /// ID. A DNS identity must be a DNS SAN of a certificate that is not an SVID: a
    /// SPIFFE workload's certificate (which may also carry DNS names) never passes for a
    /// DNS identity, so an SVID cannot stand in for a pod.
    pub fn prove(&self, id: &str) -> bool {
        if is_spiffe_id(id) {
            return self.spiffe_id() == Some(id);
        }
        !self.uris.iter().any(|u| is_spiffe_id(u))
            && self.dns.iter().any(|d| d.eq_ignore_ascii_case(id))
    }
}

/// The DNS and URI SANs of a certificate (none when it cannot be parsed).
pub fn sans(cert: &CertificateDer<'_>) -> Sans {
    use x509_parser::extensions::GeneralName;
    let mut out = Sans::default();
    let Ok((_, parsed)) = x509_parser::parse_x509_certificate(cert.as_ref()) else {
        return out;
    };
    let Ok(Some(san)) = parsed.subject_alternative_name() else {
        return out;
    };
    for name in &san.value.general_names {
        match name {
            GeneralName::DNSName(dns) => out.dns.push(dns.to_ascii_lowercase()),
            GeneralName::URI(uri) => out.uris.push(uri.to_string()),
            _ => {}
        }
    }
    out
}

/// A server certificate that can be swapped while serving: new handshakes use
/// the new certificate, open connections are untouched.
#[derive(Debug, Default)]
pub struct SwappableCert {
    current: RwLock<Option<Arc<CertifiedKey>>>,
}

impl SwappableCert {
    /// Installs a chain (leaf first) and its PKCS#8 key.
    pub fn set(&self, chain: Vec<CertificateDer<'static>>, key: &PrivateKeyDer<'_>) -> Result<()> {
        let key = provider()
            .key_provider
            .load_private_key(key.clone_key())
            .context("unusable TLS key")?;
        let ck = Arc::new(CertifiedKey::new(chain, key));
        match self.current.write() {
            Ok(mut g) => *g = Some(ck),
            Err(poisoned) => *poisoned.into_inner() = Some(ck),
        }
        Ok(())
    }
}

impl ResolvesServerCert for SwappableCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        match self.current.read() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }
}

/// A server config that serves whatever `cert` currently holds.
pub fn server_config(cert: Arc<SwappableCert>) -> Result<rustls::ServerConfig> {
    Ok(rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("TLS 1.3 unavailable")?
        .with_no_client_auth()
        .with_cert_resolver(cert))
}

/// Any bidirectional byte stream, boxed so plaintext and TLS share one type.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

/// A boxed [`Io`].
pub type BoxedIo = Box<dyn Io>;

#[cfg(test)]
mod tests {
    use super::*;

    /// The first flight of a client: the ClientHello, with a share for the hybrid
    /// (1,216 bytes) and one for X25519 (32 bytes), so that a peer without the hybrid
    /// answers without a retry.
    #[test]
    fn the_client_hello_carries_the_hybrid_and_x25519_shares() {
        let config = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        let name = ServerName::try_from("peer.example").unwrap();
        let mut client = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
        let mut flight = Vec::new();
        client.write_tls(&mut flight).unwrap();
        eprintln!("first flight: {} bytes", flight.len());
        let share = |group: [u8; 2], len: u16| {
            let entry = [&group[..], &len.to_be_bytes()].concat();
            flight.windows(entry.len()).any(|w| w == entry)
        };
        assert!(share([0x11, 0xec], 1216), "an X25519MLKEM768 share");
        assert!(share([0x00, 0x1d], 32), "an X25519 share");
    }
}
