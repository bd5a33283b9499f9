//! Authenticating certification requests. [`Authenticator`] is a trait so a
//! Kubernetes TokenReview implementation can sit next to [`TokenFile`].

use crate::issuer::Refusal;
use anyhow::{bail, Context, Result};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;

/// A boxed future returned by [`Authenticator::authenticate`].
pub type AuthFuture<'a> = Pin<Box<dyn Future<Output = Result<(), Refusal>> + Send + 'a>>;

/// Decides whether `token` may claim `identity`.
pub trait Authenticator: Send + Sync + 'static {
    /// Resolves to `Ok(())` when allowed, or a [`Refusal::Unauthenticated`]
    /// (unknown token) / [`Refusal::PermissionDenied`] (known token, other identity).
    fn authenticate<'a>(&'a self, token: &'a [u8], identity: &'a str) -> AuthFuture<'a>;
}

/// Tokens from a file of `TOKEN IDENTITY` lines (`#` comments and blank lines
/// ignored; a token may appear on several lines to claim several identities).
///
/// The file is re-read on every request so tokens can be added or revoked
/// without a restart; it is tiny and requests are rare.
#[derive(Clone, Debug)]
pub struct TokenFile {
    path: PathBuf,
}

impl TokenFile {
    /// Opens and validates the file once so a broken file fails at startup.
    pub fn open(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("read token file {}", path.display()))?;
        let entries = parse(&text).with_context(|| format!("token file {}", path.display()))?;
        if entries.is_empty() {
            tracing::warn!(path = %path.display(), "token file has no entries; every request will be refused");
        }
        Ok(Self {
            path: path.to_path_buf(),
        })
    }
}

fn parse(text: &str) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut words = line.split_whitespace();
        match (words.next(), words.next(), words.next()) {
            (Some(token), Some(identity), None) => {
                out.push((token.to_string(), identity.to_string()))
            }
            _ => bail!("line {}: expected `TOKEN IDENTITY`", n + 1),
        }
    }
    Ok(out)
}

/// Compares without an early exit so response timing does not reveal how much
/// of a token matched.
fn same(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Authenticator for TokenFile {
    fn authenticate<'a>(&'a self, token: &'a [u8], identity: &'a str) -> AuthFuture<'a> {
        Box::pin(async move {
            let token = token.trim_ascii();
            if token.is_empty() {
                return Err(Refusal::Unauthenticated("no token in the request".into()));
            }
            let text = tokio::fs::read_to_string(&self.path).await.map_err(|e| {
                tracing::error!(path = %self.path.display(), error = %e, "cannot read token file");
                Refusal::Internal("token file unavailable".into())
            })?;
            let entries = parse(&text).map_err(|e| {
                tracing::error!(path = %self.path.display(), error = format!("{e:#}"), "invalid token file");
                Refusal::Internal("token file invalid".into())
            })?;
            let mut known = false;
            let mut allowed = false;
            for (t, id) in &entries {
                if same(t.as_bytes(), token) {
                    known = true;
                    allowed |= id.eq_ignore_ascii_case(identity);
                }
            }
            match (known, allowed) {
                (_, true) => Ok(()),
                (true, false) => Err(Refusal::PermissionDenied(format!(
                    "token is not allowed to claim identity {identity:?}"
                ))),
                (false, _) => Err(Refusal::Unauthenticated("token is not recognised".into())),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn token_file_maps_tokens_to_identities() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        std::fs::write(
            &path,
            "# comment\n\nabc web.ns.serviceaccount.identity.linkerd.cluster.local\nabc other.ns\n",
        )
        .unwrap();
        let auth = TokenFile::open(&path).unwrap();
        auth.authenticate(
            b"abc\n",
            "web.ns.serviceaccount.identity.linkerd.cluster.local",
        )
        .await
        .unwrap();
        auth.authenticate(b"abc", "other.ns").await.unwrap();
        assert!(matches!(
            auth.authenticate(b"abc", "db.ns").await,
            Err(Refusal::PermissionDenied(_))
        ));
        assert!(matches!(
            auth.authenticate(b"nope", "other.ns").await,
            Err(Refusal::Unauthenticated(_))
        ));
        assert!(matches!(
            auth.authenticate(b"", "other.ns").await,
            Err(Refusal::Unauthenticated(_))
        ));
        std::fs::write(&path, "only-one-word\n").unwrap();
        assert!(TokenFile::open(&path).is_err());
    }
}
