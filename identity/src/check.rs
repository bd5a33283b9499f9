//! `tandem-identity check`: validity, key type, chain and time left of an
//! anchor bundle, issuer or proxy certificate, one finding per line.

use anyhow::{bail, Result};
use rustls_pki_types::CertificateDer;
use std::time::{Duration, SystemTime};
use x509_parser::certificate::X509Certificate;

/// Warn this long before expiry, as `linkerd check` does.
pub const DEFAULT_WARN_WITHIN: Duration = Duration::from_secs(60 * 86_400);

/// Severity of a finding; the worst one decides the exit code.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Ok,
    Warning,
    Error,
}

/// One line of the report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    pub level: Level,
    pub message: String,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let level = match self.level {
            Level::Ok => "ok",
            Level::Warning => "warning",
            Level::Error => "error",
        };
        write!(f, "{level}: {}", self.message)
    }
}

/// All findings for one file.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub findings: Vec<Finding>,
}

impl Report {
    fn push(&mut self, level: Level, message: String) {
        self.findings.push(Finding { level, message });
    }

    /// The worst level found.
    pub fn level(&self) -> Level {
        self.findings
            .iter()
            .map(|f| f.level)
            .max()
            .unwrap_or(Level::Ok)
    }

    /// 0 when everything is fine, 1 with warnings, 2 with errors.
    pub fn exit_code(&self) -> i32 {
        match self.level() {
            Level::Ok => 0,
            Level::Warning => 1,
            Level::Error => 2,
        }
    }
}

/// Checks the certificates in `pem` at `now`; with `anchors_pem` the chain is
/// verified against those anchors.
pub fn check(
    pem: &[u8],
    anchors_pem: Option<&[u8]>,
    now: SystemTime,
    warn_within: Duration,
) -> Report {
    let mut report = Report::default();
    let certs = match crate::pem::certs(pem) {
        Ok(c) => c,
        Err(e) => {
            report.push(Level::Error, format!("{e:#}"));
            return report;
        }
    };
    let anchors = match anchors_pem.map(crate::pem::certs).transpose() {
        Ok(a) => a,
        Err(e) => {
            report.push(Level::Error, format!("trust anchors: {e:#}"));
            return report;
        }
    };
    for der in &certs {
        check_one(der, now, warn_within, &mut report);
    }

    let first_self_signed = parse(&certs[0])
        .map(|x| is_self_signed(&x))
        .unwrap_or(false);
    match &anchors {
        Some(anchors) => match verify_chain(&certs, anchors) {
            Ok(anchor) => report.push(
                Level::Ok,
                format!("{} chains to trust anchor {anchor}", name(&certs[0])),
            ),
            Err(e) => report.push(
                Level::Error,
                format!(
                    "{} does not chain to the trust anchors: {e:#}",
                    name(&certs[0])
                ),
            ),
        },
        // A bundle of anchors: each must be a properly self-signed CA.
        None if first_self_signed => {
            for der in &certs {
                if let Err(e) = verify_chain(std::slice::from_ref(der), std::slice::from_ref(der)) {
                    report.push(Level::Error, format!("{}: {e:#}", name(der)));
                }
            }
        }
        None => report.push(
            Level::Ok,
            format!(
                "{}: chain not verified (pass --anchors to verify it)",
                name(&certs[0])
            ),
        ),
    }
    report
}

fn parse<'a>(der: &'a CertificateDer<'_>) -> Result<X509Certificate<'a>> {
    match x509_parser::parse_x509_certificate(der) {
        Ok((_, x)) => Ok(x),
        Err(e) => bail!("invalid certificate: {e}"),
    }
}

fn name(der: &CertificateDer<'_>) -> String {
    parse(der)
        .map(|x| x.subject().to_string())
        .unwrap_or_else(|_| "<unparsable certificate>".into())
}

fn is_self_signed(x: &X509Certificate<'_>) -> bool {
    x.subject().as_raw() == x.issuer().as_raw()
}

fn check_one(
    der: &CertificateDer<'_>,
    now: SystemTime,
    warn_within: Duration,
    report: &mut Report,
) {
    let x = match parse(der) {
        Ok(x) => x,
        Err(e) => {
            report.push(Level::Error, format!("{e:#}"));
            return;
        }
    };
    let kind = if x.is_ca() {
        if is_self_signed(&x) {
            "trust anchor"
        } else {
            "issuer"
        }
    } else {
        "certificate"
    };
    let subject = x.subject().to_string();
    let not_before = crate::pem::system_time(&x.validity().not_before);
    let not_after = crate::pem::system_time(&x.validity().not_after);
    let spki = x.public_key();
    let p256 = spki.algorithm.algorithm == x509_parser::oid_registry::OID_KEY_TYPE_EC_PUBLIC_KEY
        && spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok())
            == Some(x509_parser::oid_registry::OID_EC_P256);
    if !p256 {
        report.push(
            Level::Error,
            format!("{kind} {subject}: key is not ECDSA P-256"),
        );
    }
    if now < not_before {
        report.push(
            Level::Error,
            format!(
                "{kind} {subject}: not valid before {}",
                crate::pem::rfc3339(not_before)
            ),
        );
    } else if now >= not_after {
        report.push(
            Level::Error,
            format!(
                "{kind} {subject}: expired at {} ({} ago)",
                crate::pem::rfc3339(not_after),
                crate::env::human(now.duration_since(not_after).unwrap_or_default())
            ),
        );
    } else {
        let left = not_after.duration_since(now).unwrap_or_default();
        let level = if left < warn_within {
            Level::Warning
        } else {
            Level::Ok
        };
        let hint = if level == Level::Warning {
            format!(
                ", less than {}; rotate it soon",
                crate::env::human(warn_within)
            )
        } else {
            String::new()
        };
        report.push(
            level,
            format!(
                "{kind} {subject}: valid until {} ({} left{hint})",
                crate::pem::rfc3339(not_after),
                crate::env::human(left),
            ),
        );
    }
}

/// Verifies that `chain` (leaf or issuer first, then intermediates) links by
/// name and signature to one of `anchors`; returns that anchor's subject.
///
/// Signature checks use x509-parser's verifier. A CA is accepted as the first
/// element, which webpki's end-entity API does not allow.
pub fn verify_chain(
    chain: &[CertificateDer<'_>],
    anchors: &[CertificateDer<'_>],
) -> Result<String> {
    let anchors: Vec<X509Certificate<'_>> = anchors.iter().map(parse).collect::<Result<_>>()?;
    let parsed: Vec<X509Certificate<'_>> = chain.iter().map(parse).collect::<Result<_>>()?;
    let Some(mut current) = parsed.first() else {
        bail!("empty chain");
    };
    let mut rest = parsed.iter().skip(1);
    loop {
        // The current certificate may itself be an anchor (a bundle, or a chain
        // that includes its root).
        if let Some(a) = anchors.iter().find(|a| a.as_ref() == current.as_ref()) {
            if is_self_signed(a) {
                a.verify_signature(None).map_err(|_| {
                    anyhow::anyhow!("anchor {} has an invalid self-signature", a.subject())
                })?;
            }
            return Ok(a.subject().to_string());
        }
        if let Some(a) = anchors.iter().find(|a| {
            a.subject().as_raw() == current.issuer().as_raw()
                && current.verify_signature(Some(a.public_key())).is_ok()
        }) {
            if !a.is_ca() {
                bail!("anchor {} is not a CA", a.subject());
            }
            return Ok(a.subject().to_string());
        }
        match rest.next() {
            Some(next) if next.subject().as_raw() == current.issuer().as_raw() => {
                if !next.is_ca() {
                    bail!(
                        "{} is not a CA but issued {}",
                        next.subject(),
                        current.subject()
                    );
                }
                current
                    .verify_signature(Some(next.public_key()))
                    .map_err(|_| {
                        anyhow::anyhow!(
                            "signature of {} does not verify with {}",
                            current.subject(),
                            next.subject()
                        )
                    })?;
                current = next;
            }
            Some(next) => bail!("{} was not issued by {}", current.subject(), next.subject()),
            None => bail!(
                "no trust anchor issued {} (issuer {})",
                current.subject(),
                current.issuer()
            ),
        }
    }
}
