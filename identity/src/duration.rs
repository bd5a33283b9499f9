//! Durations in Linkerd's environment format: digits followed by `ms`, `s`, `m`,
//! `h` or `d`, or a bare `0`. The CLI flags use the same format so operators only
//! learn one syntax.

use std::time::Duration;

/// Parses `10s`, `250ms`, `24h`, `7d` or `0`.
pub fn parse(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    let digits = s.bytes().take_while(u8::is_ascii_digit).count();
    let (num, unit) = s.split_at(digits);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?}: expected a duration such as 10s"))?;
    let unit_ms: u64 = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(format!("{s:?}: expected a duration such as 10s")),
    };
    n.checked_mul(unit_ms)
        .map(Duration::from_millis)
        .ok_or_else(|| format!("{s:?}: duration too large"))
}

/// Formats a duration compactly for log lines and `check` findings.
pub fn human(d: Duration) -> String {
    let secs = d.as_secs();
    if secs >= 2 * 86_400 {
        format!("{}d", secs / 86_400)
    } else if secs >= 2 * 3_600 {
        format!("{}h", secs / 3_600)
    } else if secs >= 120 {
        format!("{}m", secs / 60)
    } else if secs >= 1 {
        format!("{secs}s")
    } else {
        format!("{}ms", d.as_millis())
    }
}

/// A clap value parser for duration flags.
pub fn clap_parse(s: &str) -> Result<Duration, String> {
    parse(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_linkerd_durations() {
        assert_eq!(parse("0"), Ok(Duration::ZERO));
        assert_eq!(parse("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse("3m"), Ok(Duration::from_secs(180)));
        assert_eq!(parse("24h"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse("2d"), Ok(Duration::from_secs(172_800)));
        for bad in ["", "x", "10", "1.5s", "-1s", "s", "10 s", "1w"] {
            assert!(parse(bad).is_err(), "{bad:?} should be rejected");
        }
    }
}
