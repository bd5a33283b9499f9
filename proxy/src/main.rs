//! `tandem-proxy`: parse the environment, set up logging, run until drained.
//!
//! Exit codes: 0 after a clean shutdown, 64 (EX_USAGE, as Linkerd) for invalid
//! configuration, 1 when the proxy cannot start or fails while running.

use std::process::ExitCode;

fn main() -> ExitCode {
    let config = match tandem_proxy::config::Config::from_env() {
        Ok(config) => config,
        Err(error) => {
            eprintln!("tandem-proxy: invalid configuration: {error}");
            return ExitCode::from(64);
        }
    };
    let log_level = match tandem_proxy::log::init(&config.log_filter, config.log_format) {
        Ok(level) => level,
        Err(error) => {
            eprintln!("tandem-proxy: invalid configuration: {error}");
            return ExitCode::from(64);
        }
    };
    match tandem_proxy::app::run(config, log_level) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("tandem-proxy: {error:#}");
            ExitCode::FAILURE
        }
    }
}
