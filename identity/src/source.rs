//! Where the proxy's certificate comes from, chosen by which variables are set
//! (exactly one source may be):
//!
//! | source | set | identity |
//! |---|---|---|
//! | the issuer, Linkerd's token flow ([`crate::client`]) | `LINKERD2_PROXY_IDENTITY_SVC_ADDR` | a DNS name |
//! | a SPIFFE Workload API, e.g. the SPIRE agent ([`crate::spiffe`]) | `LINKERD2_PROXY_IDENTITY_SPIRE_WORKLOAD_API_ADDRESS` | a `spiffe://` ID |
//! | files written by something else ([`crate::files`]) | `TANDEM_IDENTITY_CERT_FILE` | either |
//!
//! Every source publishes [`Credentials`] on a watch channel. The SPIFFE and file
//! sources check each certificate with [`checked_credentials`]; the issuer client
//! applies the same checks to what it is issued (`client.rs`).

use anyhow::{bail, Context, Result};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::sync::Arc;
use std::time::SystemTime;
use tokio::sync::watch;

use crate::client::{ClientConfig, Credentials};
use crate::env::Env;
use crate::files::FilesConfig;
use crate::metrics::IdentityMetrics;
use crate::spiffe::SpiffeConfig;

/// `LINKERD2_PROXY_IDENTITY_SERVER_ID`: the TLS identity peers verify.
pub const ENV_SERVER_ID: &str = "LINKERD2_PROXY_IDENTITY_SERVER_ID";
/// `LINKERD2_PROXY_IDENTITY_SERVER_NAME`: the name peers ask for in SNI.
pub const ENV_SERVER_NAME: &str = "LINKERD2_PROXY_IDENTITY_SERVER_NAME";

/// The proxy's identity and where its certificate comes from.
#[derive(Clone, Debug)]
pub struct IdentityConfig {
    /// The identity peers verify: a DNS name, or a `spiffe://` ID.
    pub id: String,
    /// The DNS name peers send in SNI to reach this proxy's mesh TLS; equal to
    /// `id` when that is a DNS name.
    pub server_name: String,
    pub source: Source,
}

#[derive(Clone, Debug)]
pub enum Source {
    Issuer(ClientConfig),
    Spiffe(SpiffeConfig),
    Files(FilesConfig),
}

impl IdentityConfig {
    /// Reads the configuration from `env`. `Ok(None)`: no identity is configured.
    /// Every problem is reported, each naming its variable.
    pub fn from_env(env: &Env) -> Result<Option<IdentityConfig>, Vec<String>> {
        let set = |k: &str| env.is_set(k);
        // Each source by the variables that select it; the first one set names it.
        let sources: [&[&str]; 3] = [
            &[crate::client::ENV_SVC_ADDR],
            &[crate::spiffe::ENV_ADDRESS, crate::spiffe::ENV_SOCKET],
            &[crate::files::ENV_CERT_FILE, crate::files::ENV_KEY_FILE],
        ];
        let chosen: Vec<&str> = sources
            .iter()
            .filter_map(|vars| vars.iter().copied().find(|v| set(v)))
            .collect();
        let spiffe = sources[1].iter().any(|v| set(v));
        let files = sources[2].iter().any(|v| set(v));
        if chosen.len() > 1 {
            return Err(vec![format!(
                "{}: choose one identity source",
                chosen.join(" and ")
            )]);
        }
        if spiffe || files {
            // Both halves are read before failing, so every problem is reported at once.
            let names = names(env, spiffe);
            let id = names.as_ref().map_or("", |(id, _)| id.as_str());
            let source = if spiffe {
                SpiffeConfig::from_env(env, id).map(Source::Spiffe)
            } else {
                FilesConfig::from_env(env).map(Source::Files)
            };
            return match (names, source) {
                (Ok((id, server_name)), Ok(source)) => Ok(Some(IdentityConfig {
                    id,
                    server_name,
                    source,
                })),
                (names, source) => Err(names
                    .err()
                    .into_iter()
                    .flatten()
                    .chain(source.err().into_iter().flatten())
                    .collect()),
            };
        }
        Ok(ClientConfig::from_env(env)?.map(|client| IdentityConfig {
            id: client.local_name.clone(),
            // Compared with the SNI of a ClientHello, which is read lower-cased.
            server_name: client.local_name.to_ascii_lowercase(),
            source: Source::Issuer(client),
        }))
    }

    /// [`IdentityConfig::from_env`] over a lookup function (tests, tools).
    pub fn from_lookup(
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<IdentityConfig>, Vec<String>> {
        IdentityConfig::from_env(&Env::new(&lookup))
    }

    /// Starts the source on the current tokio runtime. The receiver holds `None`
    /// until the first certificate; after a failure it keeps the last one.
    pub fn start(
        self,
        metrics: IdentityMetrics,
    ) -> Result<watch::Receiver<Option<Arc<Credentials>>>> {
        match self.source {
            Source::Issuer(client) => crate::client::spawn(client, metrics),
            Source::Spiffe(spiffe) => crate::spiffe::spawn(spiffe, metrics),
            Source::Files(files) => crate::files::spawn(files, self.id, metrics),
        }
    }
}

/// `LINKERD2_PROXY_IDENTITY_TRUST_ANCHORS` where it is optional (the SPIFFE and file
/// sources); an unreadable value is reported.
pub(crate) fn optional_anchors(
    env: &Env,
    errors: &mut Vec<String>,
) -> Vec<CertificateDer<'static>> {
    let var = crate::client::ENV_TRUST_ANCHORS;
    match env.setting(var) {
        None => Vec::new(),
        Some(pem) => crate::pem::certs(pem.as_bytes()).unwrap_or_else(|e| {
            errors.push(format!("{var}: {e:#}"));
            Vec::new()
        }),
    }
}

/// A duration variable, `default` when unset; a bad value is reported.
pub(crate) fn duration_setting(
    env: &Env,
    var: &str,
    default: std::time::Duration,
    errors: &mut Vec<String>,
) -> std::time::Duration {
    match env.setting(var) {
        None => default,
        Some(v) => crate::env::duration(&v).unwrap_or_else(|_| {
            errors.push(format!(
                "{var}={v:?}: expected a duration such as {}",
                crate::env::human(default)
            ));
            default
        }),
    }
}

/// The identity and SNI name for the SPIFFE and file sources: `SERVER_ID` and
/// `SERVER_NAME`, or `LOCAL_NAME` for both (Linkerd's older form).
fn names(env: &Env, spiffe: bool) -> Result<(String, String), Vec<String>> {
    let get = |var: &str| env.setting(var);
    let local = get(crate::client::ENV_LOCAL_NAME);
    let mut errors = Vec::new();
    let id = match get(ENV_SERVER_ID).or_else(|| local.clone()) {
        Some(id) => id,
        None => {
            errors.push(format!(
                "{ENV_SERVER_ID}: required (the identity peers verify)"
            ));
            String::new()
        }
    };
    if crate::tls::is_spiffe_id(&id) {
        if let Err(e) = crate::tls::check_spiffe_id(&id) {
            errors.push(format!("{ENV_SERVER_ID}: {e:#}"));
        }
    } else if spiffe && !id.is_empty() {
        errors.push(format!(
            "{ENV_SERVER_ID}={id:?}: the SPIFFE Workload API needs a SPIFFE ID (spiffe://trust-domain/path)"
        ));
    } else if !id.is_empty() && rustls_pki_types::DnsName::try_from(id.as_str()).is_err() {
        errors.push(format!(
            "{ENV_SERVER_ID}={id:?}: expected a DNS name or a SPIFFE ID"
        ));
    }
    let server_name = match get(ENV_SERVER_NAME).or(local) {
        Some(name) => {
            if rustls_pki_types::DnsName::try_from(name.as_str()).is_err() {
                errors.push(format!("{ENV_SERVER_NAME}={name:?}: expected a DNS name"));
            }
            name.to_ascii_lowercase()
        }
        None if !crate::tls::is_spiffe_id(&id) => id.to_ascii_lowercase(),
        None => {
            errors.push(format!(
                "{ENV_SERVER_NAME}: required with a SPIFFE ID (the DNS name peers send in SNI)"
            ));
            String::new()
        }
    };
    if errors.is_empty() {
        Ok((id, server_name))
    } else {
        Err(errors)
    }
}

/// Checks a certificate from any source before it is used: the key is the
/// leaf's, the chain verifies against `anchors` now, and the leaf names `id`
/// (a DNS SAN, or a URI SAN for a SPIFFE ID).
pub fn checked_credentials(
    id: &str,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    anchors: Vec<CertificateDer<'static>>,
    now: SystemTime,
) -> Result<Credentials> {
    if chain.is_empty() {
        bail!("no certificate");
    }
    if anchors.is_empty() {
        bail!("no trust anchors");
    }
    let signing_key = crate::tls::provider()
        .key_provider
        .load_private_key(key.clone_key())
        .map_err(|e| anyhow::anyhow!("unusable private key: {e}"))?;
    rustls::sign::CertifiedKey::new(chain.clone(), signing_key)
        .keys_match()
        .map_err(|e| anyhow::anyhow!("the key does not belong to the certificate: {e}"))?;
    crate::tls::verify_id(&chain, &anchors, id, now).context("the certificate does not verify")?;
    let mut not_after = None::<SystemTime>;
    for cert in &chain {
        let (_, x) = x509_parser::parse_x509_certificate(cert).context("invalid certificate")?;
        let expiry = crate::pem::system_time(&x.validity().not_after);
        not_after = Some(not_after.map_or(expiry, |n| n.min(expiry)));
    }
    Ok(Credentials {
        name: id.to_string(),
        cert_chain: chain,
        key,
        not_after: not_after.unwrap_or(SystemTime::UNIX_EPOCH),
        trust_anchors: anchors,
    })
}

/// Splits concatenated DER certificates (the Workload API's encoding).
pub fn split_der(mut bytes: &[u8]) -> Result<Vec<CertificateDer<'static>>> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let (rest, _) = x509_parser::parse_x509_certificate(bytes)
            .map_err(|e| anyhow::anyhow!("certificate {}: {e}", out.len() + 1))?;
        let length = bytes.len() - rest.len();
        out.push(CertificateDer::from(bytes[..length].to_vec()));
        bytes = rest;
    }
    Ok(out)
}

/// Adds `extra` to `anchors`, skipping duplicates.
pub fn merge_anchors(
    anchors: &mut Vec<CertificateDer<'static>>,
    extra: &[CertificateDer<'static>],
) {
    for anchor in extra {
        if !anchors.contains(anchor) {
            anchors.push(anchor.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(vars: &[(&str, &str)]) -> Result<Option<IdentityConfig>, Vec<String>> {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        IdentityConfig::from_lookup(|k| {
            vars.iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.clone())
        })
    }

    #[test]
    fn no_identity_variables_means_no_identity() {
        assert!(config(&[]).unwrap().is_none());
    }

    #[test]
    fn spiffe_source_needs_a_spiffe_id_and_a_server_name() {
        let ok = config(&[
            (
                "LINKERD2_PROXY_IDENTITY_SPIRE_WORKLOAD_API_ADDRESS",
                "unix:///run/spire/api.sock",
            ),
            (
                "LINKERD2_PROXY_IDENTITY_SERVER_ID",
                "spiffe://root.linkerd.cluster.local/vm",
            ),
            ("LINKERD2_PROXY_IDENTITY_SERVER_NAME", "VM.cluster.local"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(ok.id, "spiffe://root.linkerd.cluster.local/vm");
        assert_eq!(ok.server_name, "vm.cluster.local");
        let Source::Spiffe(spiffe) = ok.source else {
            panic!("expected the SPIFFE source");
        };
        assert_eq!(spiffe.socket, std::path::Path::new("/run/spire/api.sock"));
        assert_eq!(spiffe.backoff_min, std::time::Duration::from_millis(100));
        assert_eq!(spiffe.backoff_max, std::time::Duration::from_secs(1));

        let dns = config(&[
            (
                "LINKERD2_PROXY_IDENTITY_SPIRE_SOCKET",
                "/run/spire/api.sock",
            ),
            ("LINKERD2_PROXY_IDENTITY_SERVER_ID", "vm.example.com"),
        ])
        .unwrap_err();
        assert!(
            dns.iter().any(|e| e.contains("needs a SPIFFE ID")),
            "{dns:?}"
        );

        let no_name = config(&[
            (
                "LINKERD2_PROXY_IDENTITY_SPIRE_WORKLOAD_API_ADDRESS",
                "/run/spire/api.sock",
            ),
            (
                "LINKERD2_PROXY_IDENTITY_SERVER_ID",
                "spiffe://example.org/vm",
            ),
        ])
        .unwrap_err();
        assert!(
            no_name.iter().any(|e| e.contains("SERVER_NAME")),
            "{no_name:?}"
        );

        let bad = config(&[
            (
                "LINKERD2_PROXY_IDENTITY_SPIRE_WORKLOAD_API_ADDRESS",
                "/run/spire/api.sock",
            ),
            (
                "LINKERD2_PROXY_IDENTITY_SERVER_ID",
                "spiffe://Example.org/vm",
            ),
            ("LINKERD2_PROXY_IDENTITY_SERVER_NAME", "vm.example.org"),
        ])
        .unwrap_err();
        assert!(bad.iter().any(|e| e.contains("trust domain")), "{bad:?}");
    }

    #[test]
    fn two_sources_are_refused() {
        let errors = config(&[
            ("LINKERD2_PROXY_IDENTITY_SVC_ADDR", "127.0.0.1:8080"),
            (
                "LINKERD2_PROXY_IDENTITY_SPIRE_WORKLOAD_API_ADDRESS",
                "/run/spire/api.sock",
            ),
        ])
        .unwrap_err();
        assert!(
            errors[0].contains("choose one identity source"),
            "{errors:?}"
        );
        let older = config(&[
            ("TANDEM_IDENTITY_KEY_FILE", "/run/tandem/tls.key"),
            (
                "LINKERD2_PROXY_IDENTITY_SPIRE_SOCKET",
                "/run/spire/api.sock",
            ),
        ])
        .unwrap_err();
        assert_eq!(
            older,
            ["LINKERD2_PROXY_IDENTITY_SPIRE_SOCKET and TANDEM_IDENTITY_KEY_FILE: choose one identity source"]
        );
    }

    #[test]
    fn file_source_takes_a_dns_identity_and_anchors() {
        let ok = config(&[
            ("TANDEM_IDENTITY_CERT_FILE", "/run/tandem/tls.crt"),
            ("TANDEM_IDENTITY_KEY_FILE", "/run/tandem/tls.key"),
            ("TANDEM_IDENTITY_TRUST_ANCHORS_FILE", "/run/tandem/ca.crt"),
            ("LINKERD2_PROXY_IDENTITY_LOCAL_NAME", "vm.example.com"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(
            (ok.id.as_str(), ok.server_name.as_str()),
            ("vm.example.com", "vm.example.com")
        );
        let missing = config(&[
            ("TANDEM_IDENTITY_CERT_FILE", "/run/tandem/tls.crt"),
            ("LINKERD2_PROXY_IDENTITY_LOCAL_NAME", "vm.example.com"),
        ])
        .unwrap_err();
        assert!(
            missing
                .iter()
                .any(|e| e.contains("TANDEM_IDENTITY_KEY_FILE")),
            "{missing:?}"
        );
        assert!(
            missing.iter().any(|e| e.contains("trust anchors")),
            "{missing:?}"
        );
        let everything_wrong = config(&[
            ("TANDEM_IDENTITY_CERT_FILE", "/run/tandem/tls.crt"),
            ("TANDEM_IDENTITY_FILES_POLL_INTERVAL", "often"),
        ])
        .unwrap_err();
        for expected in ["SERVER_ID", "POLL_INTERVAL", "TANDEM_IDENTITY_KEY_FILE"] {
            assert!(
                everything_wrong.iter().any(|e| e.contains(expected)),
                "{expected} missing from {everything_wrong:?}"
            );
        }
    }

    #[test]
    fn spiffe_id_shapes() {
        assert!(crate::tls::check_spiffe_id("spiffe://example.org").is_ok());
        assert!(crate::tls::check_spiffe_id("spiffe://example.org/ns/web/sa/web").is_ok());
        for bad in [
            "spiffe://",
            "spiffe://EXAMPLE.org/a",
            "spiffe://example.org/a//b",
            "spiffe://example.org/a/",
            "spiffe://example.org/../x",
            "spiffe://example.org/a?b",
            "https://example.org/a",
        ] {
            assert!(crate::tls::check_spiffe_id(bad).is_err(), "{bad} accepted");
        }
    }
}
