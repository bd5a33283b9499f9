//! Logging with `tracing`: filter from `LINKERD2_PROXY_LOG`, plain or JSON lines on
//! stdout (as Linkerd), and a filter that the admin server can change at run time.

use std::sync::{Arc, Mutex};

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Registry};

use crate::config::LogFormat;

/// Reads and replaces the log filter of the running proxy.
#[derive(Clone)]
pub struct LogLevel {
    handle: reload::Handle<EnvFilter, Registry>,
    current: Arc<Mutex<String>>,
}

impl LogLevel {
    pub fn get(&self) -> String {
        self.current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Replaces the filter; an invalid directive leaves the old one in place.
    pub fn set(&self, directives: &str) -> Result<(), String> {
        let filter =
            EnvFilter::try_new(directives).map_err(|e| format!("invalid log filter: {e}"))?;
        self.handle
            .reload(filter)
            .map_err(|e| format!("cannot change the log filter: {e}"))?;
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = directives.to_string();
        Ok(())
    }
}

/// Installs the global subscriber. The filter was validated with the configuration.
pub fn init(directives: &str, format: LogFormat) -> Result<LogLevel, String> {
    let filter = EnvFilter::try_new(directives)
        .map_err(|e| format!("LINKERD2_PROXY_LOG={directives:?}: {e}"))?;
    let (filter, handle) = reload::Layer::new(filter);
    let registry = tracing_subscriber::registry().with(filter);
    let installed = match format {
        LogFormat::Plain => registry
            .with(tracing_subscriber::fmt::layer().with_ansi(false))
            .try_init(),
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_current_span(false),
            )
            .try_init(),
    };
    installed.map_err(|e| format!("cannot install the logger: {e}"))?;
    Ok(LogLevel {
        handle,
        current: Arc::new(Mutex::new(directives.to_string())),
    })
}
