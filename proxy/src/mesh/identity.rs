//! The proxy's mesh identity: the certificate client from `tandem-identity`, and TLS
//! configurations rebuilt whenever it delivers a new certificate.
//!
//! Configurations are swapped whole: a connection takes the current one when it starts
//! its handshake and keeps it, so a rotation never touches open connections.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tandem_identity::client::Credentials;
use tandem_identity::metrics::IdentityMetrics;
use tandem_identity::IdentityConfig;
use tracing::{info, warn};

use super::tls::TlsConfigs;

pub struct LocalIdentity {
    /// The identity peers verify: a DNS name or a SPIFFE ID.
    pub name: Arc<str>,
    /// The SNI that mesh TLS to this proxy carries (a DNS name).
    pub server_name: Arc<str>,
    configs: ArcSwap<TlsConfigs>,
}

impl LocalIdentity {
    /// The configurations of the current certificate.
    pub fn configs(&self) -> Arc<TlsConfigs> {
        self.configs.load_full()
    }
}

fn configs_for(credentials: &Credentials) -> Result<TlsConfigs, String> {
    TlsConfigs::new(
        &credentials.name,
        credentials.cert_chain.clone(),
        credentials.key.clone_key(),
        &credentials.trust_anchors,
    )
}

/// Starts the certificate source and waits for the first certificate, as Linkerd does
/// before it serves any traffic. Rotations are applied by a background task.
pub async fn start(
    config: IdentityConfig,
    metrics: IdentityMetrics,
) -> anyhow::Result<Arc<LocalIdentity>> {
    let name = config.id.clone();
    let server_name = Arc::from(config.server_name.as_str());
    let mut updates = config.start(metrics)?;
    let first = loop {
        if let Some(credentials) = updates.borrow_and_update().clone() {
            break credentials;
        }
        match tokio::time::timeout(Duration::from_secs(15), updates.changed()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => {
                anyhow::bail!("the identity source stopped before providing a certificate")
            }
            Err(_) => {
                warn!(identity = %name, "still waiting for a certificate")
            }
        }
    };
    let configs = configs_for(&first)
        .map_err(|e| anyhow::anyhow!("cannot use the issued certificate: {e}"))?;
    info!(identity = %first.name, "certified");
    let identity = Arc::new(LocalIdentity {
        name: Arc::from(first.name.as_str()),
        server_name,
        configs: ArcSwap::from_pointee(configs),
    });
    let rotating = identity.clone();
    tokio::spawn(async move {
        while updates.changed().await.is_ok() {
            let Some(credentials) = updates.borrow_and_update().clone() else {
                continue;
            };
            match configs_for(&credentials) {
                Ok(configs) => {
                    rotating.configs.store(Arc::new(configs));
                    info!(identity = %credentials.name, "certificate rotated");
                }
                Err(error) => {
                    warn!(%error, "cannot use the renewed certificate; keeping the current one")
                }
            }
        }
    });
    Ok(identity)
}
