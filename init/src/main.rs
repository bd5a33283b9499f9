//! `tandem-init`: command line, dispatch, and the mapping of failures to exit codes.

use std::io::Write;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;

use tandem_init::backend;
use tandem_init::config::{Cli, Command, Config, Flags};
use tandem_init::exit::{Classify, ExitClass, Failure, Outcome};
use tandem_init::log::{self, LogFormat};
use tandem_init::rules::RuleSet;
use tandem_init::{netns, validate};

fn main() {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help and --version
            let _ = e.print();
            std::process::exit(0);
        }
        Err(e) => {
            // clap's message spans several lines (usage, hints); the first one says it all.
            let text = e.render().to_string();
            let first = text.lines().next().unwrap_or("invalid flags");
            eprintln!("tandem-init: {}", first.trim_start_matches("error: "));
            std::process::exit(ExitClass::BadFlags.code());
        }
    };
    log::set_format(cli.flags.log_format);
    if let Err(failure) = run(cli) {
        report(&failure);
        std::process::exit(failure.class.code());
    }
}

fn report(failure: &Failure) {
    match log::format() {
        LogFormat::Json => log::error(&failure.to_string()),
        LogFormat::Plain => eprintln!("tandem-init: {}", log::one_line(&failure.to_string())),
    }
}

fn run(cli: Cli) -> Outcome<()> {
    let flags = cli.flags;
    let config = Config::from_flags(&flags).class(ExitClass::BadFlags)?;
    if let Some(path) = &flags.netns {
        // Before any thread exists (see netns::enter).
        netns::enter(path).class(ExitClass::Other)?;
    }
    match cli.command.unwrap_or(Command::Apply) {
        Command::Apply => apply(&flags, &config),
        Command::Cleanup => cleanup(&flags),
        Command::Validate => {
            validate::run(&config, Duration::from_millis(flags.validate_timeout_ms))
        }
    }
}

fn apply(flags: &Flags, config: &Config) -> Outcome<()> {
    log::info(&describe(config, flags));
    if config.host && !uid_exists(config.proxy_uid) {
        // A wrong uid loops the proxy's own connections back into it.
        log::warn(&format!(
            "no user on this host has uid {}: is --proxy-uid the uid the proxy runs as?",
            config.proxy_uid
        ));
    }
    let rules = RuleSet::build(config);
    let backend = backend::choose(flags.firewall, &rules.families(), flags.dry_run)?;
    let payloads = backend::apply_payloads(&backend, &rules)?;
    if flags.dry_run {
        print_payloads(&payloads)?;
        log::info("dry run: the rules above were not applied");
        return Ok(());
    }
    backend::commit(&payloads)?;
    log::info(&format!(
        "applied {} inbound and {} outbound rules with {} ({})",
        rules.inbound.len(),
        rules.outbound.len(),
        backend.name(),
        payloads
            .iter()
            .map(|p| p.what.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    ));
    if flags.validate {
        validate::run(config, Duration::from_millis(flags.validate_timeout_ms))?;
    }
    Ok(())
}

fn uid_exists(uid: u32) -> bool {
    // Large enough for any passwd entry; a smaller buffer could fail with ERANGE.
    let mut buf = vec![0u8; 256 * 1024];
    // SAFETY: `pwd`, `result` and `buf` outlive the call, and `buf.len()` is its size.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    let rc = unsafe {
        libc::getpwuid_r(
            uid,
            &mut pwd,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut result,
        )
    };
    rc == 0 && !result.is_null()
}

fn cleanup(flags: &Flags) -> Outcome<()> {
    let payloads = backend::cleanup_payloads(flags.firewall)?;
    if payloads.is_empty() {
        log::info("cleanup: nothing of Tandem's is installed");
        return Ok(());
    }
    if flags.dry_run {
        print_payloads(&payloads)?;
        log::info("dry run: nothing was removed");
        return Ok(());
    }
    backend::commit(&payloads)?;
    let removed: Vec<&str> = payloads.iter().map(|p| p.what.as_str()).collect();
    log::info(&format!(
        "cleanup: removed Tandem's rules from {}",
        removed.join(", ")
    ));
    Ok(())
}

fn print_payloads(payloads: &[backend::Payload]) -> Outcome<()> {
    let mut out = std::io::stdout().lock();
    for payload in payloads {
        writeln!(out, "{}", payload.header())
            .and_then(|()| out.write_all(payload.text.as_bytes()))
            .context("cannot write the dry-run output")
            .class(ExitClass::Other)?;
    }
    Ok(())
}

fn describe(config: &Config, flags: &Flags) -> String {
    let list = |text: String| {
        if text.is_empty() {
            "none".to_string()
        } else {
            text
        }
    };
    let cidrs = |c: &[tandem_init::config::Cidr]| {
        list(
            c.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(","),
        )
    };
    format!(
        "config: inbound port {}, outbound port {}, proxy uid {}, proxy gid {}, \
         inbound ports ignored {}, outbound ports ignored {}, ports redirected {}, \
         inbound subnets ignored {}, outbound subnets ignored {}, ipv6 {}, netns {}{}",
        config.inbound_port,
        config.outbound_port,
        config.proxy_uid,
        config
            .proxy_gid
            .map_or("none".to_string(), |g| g.to_string()),
        list(config.inbound_ports_to_ignore.to_string()),
        list(config.outbound_ports_to_ignore.to_string()),
        if config.ports_to_redirect.is_empty() {
            "all".to_string()
        } else {
            config.ports_to_redirect.to_string()
        },
        cidrs(&config.inbound_subnets_to_ignore),
        cidrs(&config.outbound_subnets_to_ignore),
        config.ipv6,
        flags
            .netns
            .as_ref()
            .map_or("current".to_string(), |p| p.display().to_string()),
        if config.host {
            ", host mode (only connections addressed to this host are redirected)"
        } else {
            ""
        },
    )
}
