//! One-line log records on stderr, plain or JSON.
//!
//! Stdout is reserved for `--dry-run` output so that it can be piped straight into
//! `nft -f -` or `iptables-restore`.

use std::sync::OnceLock;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Plain,
    Json,
}

static FORMAT: OnceLock<LogFormat> = OnceLock::new();

pub fn set_format(format: LogFormat) {
    let _ = FORMAT.set(format);
}

pub fn format() -> LogFormat {
    *FORMAT.get().unwrap_or(&LogFormat::Plain)
}

pub fn info(msg: &str) {
    emit("info", msg);
}

pub fn warn(msg: &str) {
    emit("warn", msg);
}

pub fn error(msg: &str) {
    emit("error", msg);
}

/// Writes one record. Embedded newlines (multi-line tool output) are flattened so a
/// log collector never splits one event into several.
pub fn emit(level: &str, msg: &str) {
    let msg = one_line(msg);
    match format() {
        LogFormat::Plain if level == "info" => eprintln!("tandem-init: {msg}"),
        LogFormat::Plain => eprintln!("tandem-init: {level}: {msg}"),
        LogFormat::Json => {
            let record = serde_json::json!({ "level": level, "target": "tandem-init", "msg": msg });
            eprintln!("{record}");
        }
    }
}

pub fn one_line(text: &str) -> String {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}
