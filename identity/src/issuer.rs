//! Signing proxy certificates: CSR validation and issuance. Pure (no I/O) so
//! the gRPC service stays thin and the rules are unit-testable.

use anyhow::{bail, Context, Result};
use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SerialNumber,
};
use rustls_pki_types::{CertificateDer, CertificateSigningRequestDer};
use std::time::{Duration, SystemTime};
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::FromDer;

/// Why a certification request was refused. Each maps to a gRPC status and a
/// metric label; the message names the problem for the proxy's logs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The token is missing, unknown or rejected.
    Unauthenticated(String),
    /// The token may not claim the requested identity, or the CSR names another.
    PermissionDenied(String),
    /// The CSR is malformed, badly signed or asks for something not allowed.
    InvalidCsr(String),
    /// The issuer is expired, not yet valid or not loaded.
    IssuerUnavailable(String),
    /// Signing failed unexpectedly.
    Internal(String),
}

impl Refusal {
    /// The `reason` label of `identity_refusals_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::Unauthenticated(_) => "unauthenticated",
            Refusal::PermissionDenied(_) => "permission_denied",
            Refusal::InvalidCsr(_) => "invalid_csr",
            Refusal::IssuerUnavailable(_) => "issuer_unavailable",
            Refusal::Internal(_) => "internal",
        }
    }

    /// The human-readable message.
    pub fn message(&self) -> &str {
        match self {
            Refusal::Unauthenticated(m)
            | Refusal::PermissionDenied(m)
            | Refusal::InvalidCsr(m)
            | Refusal::IssuerUnavailable(m)
            | Refusal::Internal(m) => m,
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.message())
    }
}

/// A loaded issuer: certificate chain and signing key.
pub struct Issuer {
    signer: rcgen::Certificate,
    key: KeyPair,
    /// The issuer certificate followed by any further intermediates from its file.
    pub chain: Vec<CertificateDer<'static>>,
    /// The issuer certificate's subject, for logs.
    pub subject: String,
    pub not_before: SystemTime,
    /// The earliest expiry in the chain: no leaf may outlive it.
    pub not_after: SystemTime,
}

impl std::fmt::Debug for Issuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issuer")
            .field("subject", &self.subject)
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// A freshly issued certificate.
#[derive(Debug)]
pub struct Issued {
    pub leaf: CertificateDer<'static>,
    pub intermediates: Vec<CertificateDer<'static>>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// Set when the requested lifetime was cut to the issuer's expiry.
    pub shortened: bool,
}

impl Issuer {
    /// Loads an issuer from PEM. With `anchors`, the chain must verify against
    /// one of them, so a mismatched issuer is caught at load, not by every proxy.
    pub fn from_pem(
        cert_pem: &[u8],
        key_pem: &[u8],
        anchors: Option<&[CertificateDer<'_>]>,
    ) -> Result<Self> {
        let chain = crate::pem::certs(cert_pem).context("issuer certificate")?;
        let key = load_ca_key(key_pem).context("invalid issuer key")?;
        check_key_matches(&chain[0], &key)
            .context("issuer key does not belong to the issuer certificate")?;

        let mut not_before = SystemTime::UNIX_EPOCH;
        let mut not_after: Option<SystemTime> = None;
        let mut subject = String::new();
        for (i, der) in chain.iter().enumerate() {
            let (_, x) = x509_parser::parse_x509_certificate(der)
                .with_context(|| format!("issuer chain certificate {i} is invalid"))?;
            if i == 0 {
                subject = x.subject().to_string();
                not_before = crate::pem::system_time(&x.validity().not_before);
                if !x.is_ca() {
                    bail!("issuer certificate {subject} is not a CA (basicConstraints CA:false)");
                }
            }
            let na = crate::pem::system_time(&x.validity().not_after);
            not_after = Some(not_after.map_or(na, |cur: SystemTime| cur.min(na)));
        }
        if let Some(anchors) = anchors {
            crate::check::verify_chain(&chain, anchors)
                .context("issuer does not chain to the trust anchors")?;
        }
        let params = CertificateParams::from_ca_cert_der(&chain[0])
            .context("issuer certificate is not a usable CA certificate")?;
        // rcgen needs a `Certificate` as signer; only its subject name and key
        // identifier are used, so re-signing the parsed parameters is harmless.
        let signer = params.self_signed(&key).context("issuer key cannot sign")?;
        Ok(Self {
            signer,
            key,
            chain,
            subject,
            not_before,
            not_after: not_after.unwrap_or(SystemTime::UNIX_EPOCH),
        })
    }

    /// Fails when the issuer cannot sign at `now`.
    pub fn check_valid(&self, now: SystemTime) -> Result<(), Refusal> {
        if now >= self.not_after {
            return Err(Refusal::IssuerUnavailable(format!(
                "issuer certificate expired at {}",
                crate::pem::rfc3339(self.not_after)
            )));
        }
        if now < self.not_before {
            return Err(Refusal::IssuerUnavailable(format!(
                "issuer certificate is not valid before {}",
                crate::pem::rfc3339(self.not_before)
            )));
        }
        Ok(())
    }

    /// Validates `csr` for `identity` and signs a certificate valid from
    /// `now - skew` for `lifetime`, cut to the issuer's expiry.
    pub fn certify(
        &self,
        identity: &str,
        csr: &[u8],
        now: SystemTime,
        lifetime: Duration,
        skew: Duration,
    ) -> Result<Issued, Refusal> {
        self.check_valid(now)?;
        let key = validate_csr(csr, identity)?;

        let not_before = now - skew;
        let wanted = now + lifetime;
        let not_after = wanted.min(self.not_after);
        let shortened = not_after < wanted;

        let mut params = CertificateParams::new(vec![identity.to_string()])
            .map_err(|e| Refusal::InvalidCsr(format!("invalid identity {identity:?}: {e}")))?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, identity);
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.not_before = crate::pem::offset(not_before);
        params.not_after = crate::pem::offset(not_after);
        params.serial_number =
            Some(random_serial().map_err(|e| Refusal::Internal(format!("{e:#}")))?);
        params.use_authority_key_identifier_extension = true;
        let cert = params
            .signed_by(&key, &self.signer, &self.key)
            .map_err(|e| Refusal::Internal(format!("signing failed: {e}")))?;
        Ok(Issued {
            leaf: cert.der().clone(),
            intermediates: self.chain.clone(),
            not_before,
            not_after,
            shortened,
        })
    }
}

/// The public key of an accepted CSR, in the form rcgen signs.
struct CsrKey {
    raw: Vec<u8>,
}

impl rcgen::PublicKeyData for CsrKey {
    fn der_bytes(&self) -> &[u8] {
        &self.raw
    }

    fn algorithm(&self) -> &rcgen::SignatureAlgorithm {
        &rcgen::PKCS_ECDSA_P256_SHA256
    }
}

/// Checks a CSR (DER, or PEM for tools that send text): valid signature, a
/// P-256 key, and exactly one DNS SAN equal to `identity` with no other SANs.
fn validate_csr(csr: &[u8], identity: &str) -> Result<CsrKey, Refusal> {
    let der: Vec<u8> = if csr.starts_with(b"-----BEGIN") {
        use rustls_pki_types::pem::PemObject;
        CertificateSigningRequestDer::from_pem_slice(csr)
            .map_err(|e| Refusal::InvalidCsr(format!("invalid PEM CSR: {e}")))?
            .as_ref()
            .to_vec()
    } else {
        csr.to_vec()
    };
    let (_, req) = x509_parser::certification_request::X509CertificationRequest::from_der(&der)
        .map_err(|e| Refusal::InvalidCsr(format!("CSR is not valid DER: {e}")))?;

    let spki = &req.certification_request_info.subject_pki;
    let is_ec = spki.algorithm.algorithm == x509_parser::oid_registry::OID_KEY_TYPE_EC_PUBLIC_KEY;
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.as_oid().ok());
    if !is_ec || curve.as_ref() != Some(&x509_parser::oid_registry::OID_EC_P256) {
        let what = if spki.algorithm.algorithm == x509_parser::oid_registry::OID_PKCS1_RSAENCRYPTION
        {
            "an RSA key".to_string()
        } else if is_ec {
            "an EC key on a curve other than P-256".to_string()
        } else {
            format!("a key of type {}", spki.algorithm.algorithm)
        };
        return Err(Refusal::InvalidCsr(format!(
            "CSR has {what}; only ECDSA P-256 keys are accepted"
        )));
    }
    req.verify_signature()
        .map_err(|_| Refusal::InvalidCsr("CSR signature does not verify".into()))?;

    let mut dns = Vec::new();
    let mut others = Vec::new();
    for ext in req.requested_extensions().into_iter().flatten() {
        if let ParsedExtension::SubjectAlternativeName(san) = ext {
            for name in &san.general_names {
                match name {
                    GeneralName::DNSName(d) => dns.push(d.to_string()),
                    GeneralName::URI(u) => others.push(format!("URI SAN {u:?}")),
                    GeneralName::IPAddress(_) => others.push("an IP address SAN".to_string()),
                    GeneralName::RFC822Name(e) => others.push(format!("email SAN {e:?}")),
                    other => others.push(format!("SAN {other:?}")),
                }
            }
        }
    }
    if !others.is_empty() {
        return Err(Refusal::InvalidCsr(format!(
            "CSR must only name a DNS identity, but it has {}",
            others.join(", ")
        )));
    }
    match dns.as_slice() {
        [one] if one.eq_ignore_ascii_case(identity) => {}
        [one] => {
            return Err(Refusal::PermissionDenied(format!(
                "CSR names {one:?} but the request is for identity {identity:?}"
            )))
        }
        [] => {
            return Err(Refusal::InvalidCsr(format!(
                "CSR has no DNS SAN; it must have exactly one, {identity:?}"
            )))
        }
        many => {
            return Err(Refusal::InvalidCsr(format!(
                "CSR has {} DNS SANs ({}); it must have exactly one, {identity:?}",
                many.len(),
                many.join(", ")
            )))
        }
    }
    Ok(CsrKey {
        raw: spki.subject_public_key.data.to_vec(),
    })
}

/// Fails unless `key` is the key of `cert`.
pub fn check_key_matches(cert: &CertificateDer<'_>, key: &KeyPair) -> Result<()> {
    let (_, x) = x509_parser::parse_x509_certificate(cert).context("invalid certificate")?;
    if x.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
        bail!("the key does not match the certificate");
    }
    Ok(())
}

/// A random positive 128-bit serial number.
pub fn random_serial() -> Result<SerialNumber> {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| anyhow::anyhow!("no system randomness"))?;
    // Positive and without a leading zero byte, so the DER integer is 16 bytes.
    b[0] = (b[0] & 0x7f) | 0x40;
    Ok(SerialNumber::from_slice(&b))
}

/// Proxies make their CSRs with the client's function; the issuer checks that shape.
pub use crate::client::generate_csr;

/// A CA signing key held by rustls' ring provider, so PKCS#8 and SEC1
/// (`EC PRIVATE KEY`, as written by step and cert-manager) both load.
struct CaKey {
    signer: Box<dyn rustls::sign::Signer>,
    public: Vec<u8>,
}

impl rcgen::RemoteKeyPair for CaKey {
    fn public_key(&self) -> &[u8] {
        &self.public
    }

    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        self.signer
            .sign(msg)
            .map_err(|_| rcgen::Error::RingUnspecified)
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        &rcgen::PKCS_ECDSA_P256_SHA256
    }
}

/// Loads an ECDSA P-256 CA key from PEM (PKCS#8 or SEC1).
pub fn load_ca_key(pem: &[u8]) -> Result<KeyPair> {
    let der = crate::pem::private_key(pem)?;
    let key = crate::tls::provider()
        .key_provider
        .load_private_key(der)
        .context("unsupported private key")?;
    let signer = key
        .choose_scheme(&[rustls::SignatureScheme::ECDSA_NISTP256_SHA256])
        .context("the key must be ECDSA P-256")?;
    let spki = key.public_key().context("the key has no public key")?;
    let (_, spki) = x509_parser::x509::SubjectPublicKeyInfo::from_der(spki.as_ref())
        .map_err(|e| anyhow::anyhow!("invalid public key: {e}"))?;
    let public = spki.subject_public_key.data.to_vec();
    KeyPair::from_remote(Box::new(CaKey { signer, public })).context("unusable key")
}
