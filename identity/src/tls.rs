//! TLS between proxies and the issuer service, with the ring provider passed
//! explicitly (never installed process-wide) and TLS 1.3 only, as in Linkerd.

use anyhow::{Context, Result};
use rustls::client::danger::ServerCertVerifier;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use std::sync::{Arc, RwLock};
use std::time::SystemTime;
use tokio::io::{AsyncRead, AsyncWrite};

/// The crypto provider used everywhere in this crate.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
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
