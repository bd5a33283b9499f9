//! Creating trust anchors and issuers (`tandem-identity ca anchor|issuer`).

use anyhow::{bail, Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, KeyPair, KeyUsagePurpose,
    PKCS_ECDSA_P256_SHA256,
};
use std::path::Path;
use std::time::{Duration, SystemTime};

/// Default trust anchor name, as in Linkerd.
pub const DEFAULT_ANCHOR_NAME: &str = "root.linkerd.cluster.local";
/// Default issuer name, as in Linkerd.
pub const DEFAULT_ISSUER_NAME: &str = "identity.linkerd.cluster.local";
/// Default anchor validity: 10 years.
pub const DEFAULT_ANCHOR_VALIDITY: Duration = Duration::from_secs(10 * 365 * 86_400);
/// Default issuer validity: 1 year.
pub const DEFAULT_ISSUER_VALIDITY: Duration = Duration::from_secs(365 * 86_400);

/// A CA certificate and its private key, both PEM.
pub struct CaMaterial {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for CaMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaMaterial")
            .field("cert_pem", &self.cert_pem)
            .finish_non_exhaustive()
    }
}

fn ca_params(
    name: &str,
    not_before: SystemTime,
    validity: Duration,
    constraints: BasicConstraints,
) -> Result<CertificateParams> {
    let mut params = CertificateParams::new(vec![name.to_string()])
        .with_context(|| format!("invalid name {name:?}"))?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(constraints);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.not_before = crate::pem::offset(not_before);
    params.not_after = crate::pem::offset(not_before + validity);
    params.serial_number = Some(crate::issuer::random_serial()?);
    params.use_authority_key_identifier_extension = false;
    Ok(params)
}

/// Creates a self-signed ECDSA P-256 trust anchor valid from `not_before` for `validity`.
pub fn anchor(name: &str, not_before: SystemTime, validity: Duration) -> Result<CaMaterial> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).context("generate anchor key")?;
    let cert = ca_params(name, not_before, validity, BasicConstraints::Unconstrained)?
        .self_signed(&key)
        .context("sign anchor")?;
    Ok(CaMaterial {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// Creates an issuer (CA, path length 0) signed by the anchor whose
/// certificate and key are given as PEM.
pub fn issuer(
    anchor_cert_pem: &str,
    anchor_key_pem: &str,
    name: &str,
    not_before: SystemTime,
    validity: Duration,
) -> Result<CaMaterial> {
    let anchor_key =
        crate::issuer::load_ca_key(anchor_key_pem.as_bytes()).context("invalid anchor key")?;
    let anchor_der = crate::pem::certs(anchor_cert_pem.as_bytes())
        .context("invalid anchor certificate")?
        .remove(0);
    let anchor_params = CertificateParams::from_ca_cert_der(&anchor_der)
        .context("anchor certificate is not a usable CA certificate")?;
    // rcgen needs a `Certificate` as issuer; only its name and key identifier
    // are used, so re-signing the parsed parameters locally is harmless.
    let anchor = anchor_params
        .self_signed(&anchor_key)
        .context("anchor key does not fit the anchor certificate")?;
    crate::issuer::check_key_matches(&anchor_der, &anchor_key)
        .context("anchor key does not belong to the anchor certificate")?;

    let anchor_not_after = {
        let (_, x) = x509_parser::parse_x509_certificate(&anchor_der)
            .context("invalid anchor certificate")?;
        crate::pem::system_time(&x.validity().not_after)
    };
    let mut validity = validity;
    if not_before + validity > anchor_not_after {
        let shortened = anchor_not_after
            .duration_since(not_before)
            .unwrap_or(Duration::ZERO);
        if shortened.is_zero() {
            bail!(
                "the anchor expired at {}",
                crate::pem::rfc3339(anchor_not_after)
            );
        }
        tracing::warn!(
            anchor_expires = %crate::pem::rfc3339(anchor_not_after),
            "issuer validity shortened to the anchor's expiry"
        );
        validity = shortened;
    }

    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).context("generate issuer key")?;
    let mut params = ca_params(name, not_before, validity, BasicConstraints::Constrained(0))?;
    params.use_authority_key_identifier_extension = true;
    let cert = params
        .signed_by(&key, &anchor, &anchor_key)
        .context("sign issuer")?;
    Ok(CaMaterial {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// Writes a certificate (0644) and its key (0600). Existing files are only
/// replaced when `force` is set, so an anchor is not overwritten by accident.
pub fn write(material: &CaMaterial, cert_path: &Path, key_path: &Path, force: bool) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    for (path, contents, mode) in [
        (key_path, &material.key_pem, 0o600),
        (cert_path, &material.cert_pem, 0o644),
    ] {
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).mode(mode);
        if force {
            opts.create(true).truncate(true);
        } else {
            opts.create_new(true);
        }
        let mut f = opts.open(path).with_context(|| {
            if path.exists() && !force {
                format!(
                    "{} already exists (use --force to replace it)",
                    path.display()
                )
            } else {
                format!("create {}", path.display())
            }
        })?;
        // `mode` only applies on creation; tighten a replaced key file as well.
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(mode))
            .with_context(|| format!("chmod {}", path.display()))?;
        f.write_all(contents.as_bytes())
            .with_context(|| format!("write {}", path.display()))?;
    }
    Ok(())
}
