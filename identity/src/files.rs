//! Certificates written by something else (cert-manager's CSI driver, Vault
//! agent, a script): a PEM chain and key on memory-backed storage, re-read when
//! their contents change.
//!
//! The files are polled rather than watched: writers replace them in different
//! ways (rename, symlink swap, in place), and a poll of three small files every
//! few seconds sees all of them. A change that does not check out (a key written
//! before its certificate, say) is skipped until the next change; the current
//! certificate stays in use meanwhile.

use anyhow::{Context, Result};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::client::{Credentials, ENV_ALLOW_DISK, ENV_TRUST_ANCHORS};
use crate::metrics::IdentityMetrics;

/// The certificate chain, leaf first (PEM).
pub const ENV_CERT_FILE: &str = "TANDEM_IDENTITY_CERT_FILE";
/// The leaf's key (PEM, PKCS#8 or SEC1).
pub const ENV_KEY_FILE: &str = "TANDEM_IDENTITY_KEY_FILE";
/// Trust anchors (PEM), re-read like the others; else `LINKERD2_PROXY_IDENTITY_TRUST_ANCHORS`.
pub const ENV_TRUST_ANCHORS_FILE: &str = "TANDEM_IDENTITY_TRUST_ANCHORS_FILE";
/// How often the files are checked for changes (default 5s).
pub const ENV_POLL_INTERVAL: &str = "TANDEM_IDENTITY_FILES_POLL_INTERVAL";

#[derive(Clone, Debug)]
pub struct FilesConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub trust_anchors_file: Option<PathBuf>,
    /// Used when there is no anchors file.
    pub trust_anchors: Vec<CertificateDer<'static>>,
    pub poll_interval: Duration,
    /// `TANDEM_IDENTITY_ALLOW_DISK`: accept a key that is not on tmpfs.
    pub allow_disk: bool,
}

impl FilesConfig {
    pub fn from_env(env: &crate::env::Env) -> Result<FilesConfig, Vec<String>> {
        let get = |var: &str| env.setting(var);
        let mut errors = Vec::new();
        let mut path = |var: &str| match get(var) {
            Some(p) => PathBuf::from(p),
            None => {
                errors.push(format!(
                    "{var}: required with {ENV_CERT_FILE}/{ENV_KEY_FILE}"
                ));
                PathBuf::new()
            }
        };
        let cert = path(ENV_CERT_FILE);
        let key = path(ENV_KEY_FILE);
        let trust_anchors_file = get(ENV_TRUST_ANCHORS_FILE).map(PathBuf::from);
        let trust_anchors = crate::source::optional_anchors(env, &mut errors);
        if trust_anchors_file.is_none() && trust_anchors.is_empty() {
            errors.push(format!(
                "{ENV_TRUST_ANCHORS_FILE} or {ENV_TRUST_ANCHORS}: trust anchors are required"
            ));
        }
        let poll_interval = match get(ENV_POLL_INTERVAL) {
            None => Duration::from_secs(5),
            Some(v) => match crate::env::duration(&v) {
                Ok(d) if !d.is_zero() => d,
                _ => {
                    errors.push(format!(
                        "{ENV_POLL_INTERVAL}={v:?}: expected a duration such as 5s"
                    ));
                    Duration::from_secs(5)
                }
            },
        };
        let allow_disk = get(ENV_ALLOW_DISK)
            .is_some_and(|v| crate::client::parse_bool(ENV_ALLOW_DISK, &v, &mut errors));
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(FilesConfig {
            cert,
            key,
            trust_anchors_file,
            trust_anchors,
            poll_interval,
            allow_disk,
        })
    }
}

/// Starts watching the files on the current tokio runtime. The key's directory
/// must be memory-backed (or explicitly allowed); files that are missing or do
/// not check out at start are waited for.
pub fn spawn(
    config: FilesConfig,
    id: String,
    metrics: IdentityMetrics,
) -> Result<watch::Receiver<Option<Arc<Credentials>>>> {
    let key_dir = config
        .key
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    crate::tmpfs::check_dir(key_dir, config.allow_disk)
        .with_context(|| format!("{ENV_KEY_FILE}={}", config.key.display()))?;
    let handle = tokio::runtime::Handle::try_current()
        .context("the file identity source must be started inside a tokio runtime")?;
    let (tx, rx) = watch::channel(None);
    handle.spawn(async move {
        tokio::select! {
            _ = poll_forever(&config, &id, &metrics, &tx) => {}
            _ = tx.closed() => debug!("file identity source stopped: no more receivers"),
        }
    });
    Ok(rx)
}

async fn poll_forever(
    config: &FilesConfig,
    id: &str,
    metrics: &IdentityMetrics,
    tx: &watch::Sender<Option<Arc<Credentials>>>,
) {
    // The files last published, and the last problem reported (each problem is
    // logged and counted once, not on every poll).
    let mut published: Option<ring::digest::Digest> = None;
    let mut reported: Option<String> = None;
    loop {
        let outcome = match read_files(config).await {
            Ok(files) => {
                let digest = files.digest();
                if published.is_some_and(|d| d.as_ref() == digest.as_ref()) {
                    Ok(None)
                } else {
                    // A failed change is checked again on every poll: a certificate
                    // not valid yet (a clock behind the issuer's) becomes usable.
                    files.credentials(config, id).map(|c| Some((digest, c)))
                }
            }
            Err(e) => Err(e),
        };
        match outcome {
            Ok(None) => {}
            Ok(Some((digest, credentials))) => {
                published = Some(digest);
                reported = None;
                metrics.refreshed(SystemTime::now(), credentials.not_after);
                info!(
                    id = %credentials.name,
                    not_after = %crate::pem::rfc3339(credentials.not_after),
                    cert = %config.cert.display(),
                    "certificate loaded"
                );
                tx.send_replace(Some(Arc::new(credentials)));
            }
            Err(e) => {
                let problem = format!("{e:#}");
                if reported.as_ref() != Some(&problem) {
                    metrics.failed();
                    warn!(cert = %config.cert.display(), "cannot use the certificate files, keeping the current certificate: {problem}");
                    reported = Some(problem);
                }
            }
        }
        tokio::time::sleep(config.poll_interval).await;
    }
}

struct Files {
    cert: Vec<u8>,
    key: Vec<u8>,
    anchors: Option<Vec<u8>>,
}

impl Files {
    /// A digest of all three, so that no second copy of the key is kept.
    fn digest(&self) -> ring::digest::Digest {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        for part in [
            &self.cert[..],
            &self.key[..],
            self.anchors.as_deref().unwrap_or(&[]),
        ] {
            ctx.update(&(part.len() as u64).to_be_bytes());
            ctx.update(part);
        }
        ctx.finish()
    }

    fn credentials(&self, config: &FilesConfig, id: &str) -> Result<Credentials> {
        // Checked on every change, following symlinks: a key swapped for a link to a
        // disk file is refused like one on disk from the start.
        if !config.allow_disk && !crate::tmpfs::is_memory_backed(&config.key)? {
            anyhow::bail!(
                "{} is not memory-backed (tmpfs/ramfs); refusing the key (or set {ENV_ALLOW_DISK}=true)",
                config.key.display()
            );
        }
        let chain =
            crate::pem::certs(&self.cert).with_context(|| format!("{}", config.cert.display()))?;
        let key = PrivateKeyDer::from_pem_slice(&self.key).map_err(|e| {
            anyhow::anyhow!("{}: no usable PEM private key: {e}", config.key.display())
        })?;
        let anchors = match (&self.anchors, &config.trust_anchors_file) {
            (Some(pem), Some(path)) => {
                crate::pem::certs(pem).with_context(|| format!("{}", path.display()))?
            }
            _ => config.trust_anchors.clone(),
        };
        crate::source::checked_credentials(id, chain, key, anchors, SystemTime::now())
    }
}

async fn read_files(config: &FilesConfig) -> Result<Files> {
    let read = |path: PathBuf| async move {
        tokio::fs::read(&path)
            .await
            .with_context(|| format!("cannot read {}", path.display()))
    };
    let cert = read(config.cert.clone()).await?;
    let key = read(config.key.clone()).await?;
    let anchors = match &config.trust_anchors_file {
        Some(path) => Some(read(path.clone()).await?),
        None => None,
    };
    Ok(Files { cert, key, anchors })
}
