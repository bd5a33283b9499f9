//! Reading settings from the environment: the one reader both `tandem-proxy` and the
//! identity sources use, so every variable trims, parses and fails the same way.
//!
//! It lives in this crate because it is the lowest one both programs depend on. A
//! reader collects every problem instead of stopping at the first, each naming its
//! variable, so one start-up tells the operator everything that is wrong; the
//! programs turn the list into one line and exit 64.
//!
//! Formats are Linkerd's: durations are digits and a unit (`ms`, `s`, `m`, `h`, `d`)
//! or a bare `0`; port lists are ports and inclusive ranges (`25,4000-4100`).

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

/// Reads variables through a lookup (the process environment, or a table in tests)
/// and collects errors and warnings on the way.
pub struct Env<'a> {
    lookup: &'a dyn Fn(&str) -> Option<String>,
    errors: Vec<String>,
    warnings: Vec<String>,
    /// Every variable asked for, so that those set and never asked for can be told.
    read: RefCell<BTreeSet<String>>,
}

impl<'a> Env<'a> {
    pub fn new(lookup: &'a dyn Fn(&str) -> Option<String>) -> Env<'a> {
        Env {
            lookup,
            errors: Vec::new(),
            warnings: Vec::new(),
            read: RefCell::default(),
        }
    }

    fn raw(&self, var: &str) -> Option<String> {
        self.read.borrow_mut().insert(var.to_string());
        (self.lookup)(var)
    }

    /// The variable's value with surrounding white space removed, blank included.
    pub fn value(&self, var: &str) -> Option<String> {
        self.raw(var).map(|v| v.trim().to_string())
    }

    /// The names among `set` that start with `prefix` and were never asked for.
    pub fn unread<'n>(&self, set: impl IntoIterator<Item = &'n str>, prefix: &str) -> Vec<String> {
        let read = self.read.borrow();
        set.into_iter()
            .filter(|name| name.starts_with(prefix) && !read.contains(*name))
            .map(String::from)
            .collect()
    }

    /// The variable's trimmed value; blank counts as unset.
    pub fn setting(&self, var: &str) -> Option<String> {
        self.value(var).filter(|v| !v.is_empty())
    }

    pub fn is_set(&self, var: &str) -> bool {
        self.setting(var).is_some()
    }

    /// Parses `var`, or `default` when it is unset. A value that does not parse is
    /// recorded as an error naming the variable, and the default stands in for it so
    /// that reading can go on.
    pub fn parse<T>(
        &mut self,
        var: &str,
        default: &str,
        parse: impl Fn(&str) -> Result<T, String>,
    ) -> T {
        if let Some(value) = self.raw(var) {
            match parse(value.trim()) {
                Ok(parsed) => return parsed,
                Err(why) => self.error(format!("{var}={value:?}: {why}")),
            }
        }
        parse(default).unwrap_or_else(|why| panic!("default for {var} is invalid: {why}"))
    }

    /// Parses `var` when it is set and not blank; a bad value is an error.
    pub fn optional<T>(
        &mut self,
        var: &str,
        parse: impl Fn(&str) -> Result<T, String>,
    ) -> Option<T> {
        let value = self.setting(var)?;
        parse(&value)
            .map_err(|why| self.error(format!("{var}={value:?}: {why}")))
            .ok()
    }

    /// Parses `var` if set; a value that does not parse is left out with a warning
    /// (Linkerd's way with thread counts: a pod is better slow than down).
    pub fn parse_or_ignore<T>(
        &mut self,
        var: &str,
        parse: impl Fn(&str) -> Result<T, String>,
    ) -> Option<T> {
        let value = self.raw(var)?;
        parse(value.trim())
            .map_err(|why| self.warn(format!("{var}={value:?}: {why}; ignored")))
            .ok()
    }

    pub fn error(&mut self, message: String) {
        self.errors.push(message);
    }

    pub fn warn(&mut self, message: String) {
        self.warnings.push(message);
    }

    /// Errors recorded so far.
    pub fn errors(&self) -> &[String] {
        &self.errors
    }

    /// The warnings, or every error when there was one.
    pub fn finish(self) -> Result<Vec<String>, Vec<String>> {
        if self.errors.is_empty() {
            Ok(self.warnings)
        } else {
            Err(self.errors)
        }
    }
}

/// Durations as Linkerd writes them: digits and a unit (`ms`, `s`, `m`, `h`, `d`), or a
/// bare `0`. Surrounding white space is ignored; a value too large for a `Duration` in
/// milliseconds is refused rather than wrapped.
pub fn duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if text == "0" {
        return Ok(Duration::ZERO);
    }
    let digits_end = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(digits_end);
    let amount: u64 = digits
        .parse()
        .map_err(|_| "expected a duration such as 500ms, 10s, 5m, 1h or 1d".to_string())?;
    let millis = match unit {
        "ms" => Some(amount),
        "s" => amount.checked_mul(1_000),
        "m" => amount.checked_mul(60_000),
        "h" => amount.checked_mul(3_600_000),
        "d" => amount.checked_mul(86_400_000),
        "" => return Err("a duration needs a unit: ms, s, m, h or d".into()),
        other => {
            return Err(format!(
                "unknown duration unit {other:?}; use ms, s, m, h or d"
            ))
        }
    };
    millis
        .map(Duration::from_millis)
        .ok_or_else(|| "duration is too large".to_string())
}

/// Formats a duration compactly for log lines and messages (`90s`, `5m`, `2d`).
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

/// `true` or `false`, in any case; an empty value is `false`.
pub fn boolean(text: &str) -> Result<bool, String> {
    match text.trim().to_ascii_lowercase().as_str() {
        "true" => Ok(true),
        "false" | "" => Ok(false),
        _ => Err("expected true or false".into()),
    }
}

/// A whole number, zero included.
pub fn count(text: &str) -> Result<usize, String> {
    text.trim()
        .parse()
        .map_err(|_| "expected a whole number".to_string())
}

/// A whole number greater than zero.
pub fn positive(text: &str) -> Result<usize, String> {
    match text.trim().parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err("expected a whole number greater than zero".into()),
    }
}

/// An IP address and port.
pub fn socket_addr(text: &str) -> Result<SocketAddr, String> {
    text.trim()
        .parse()
        .map_err(|_| "expected an IP address and port, such as 0.0.0.0:4143 or [::]:4143".into())
}

/// A TCP port number.
pub fn port(text: &str) -> Result<u16, String> {
    text.trim()
        .parse::<u16>()
        .map_err(|_| format!("{text:?} is not a port number (0-65535)"))
}

/// A set of TCP ports, looked up in constant time (once per connection).
#[derive(Clone, PartialEq, Eq)]
pub struct PortSet {
    bits: Box<[u64; 1024]>,
}

impl PortSet {
    pub fn empty() -> PortSet {
        PortSet {
            bits: Box::new([0; 1024]),
        }
    }

    /// Parses a list of ports and inclusive ranges: `25,3306,4000-4100`.
    pub fn parse(text: &str) -> Result<PortSet, String> {
        let mut set = PortSet::empty();
        for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (low, high) = match item.split_once('-') {
                Some((low, high)) => (port(low)?, port(high)?),
                None => {
                    let port = port(item)?;
                    (port, port)
                }
            };
            if low > high {
                return Err(format!("port range {item} runs backwards"));
            }
            for port in low..=high {
                set.insert(port);
            }
        }
        Ok(set)
    }

    pub fn insert(&mut self, port: u16) {
        self.bits[usize::from(port) / 64] |= 1 << (port % 64);
    }

    pub fn contains(&self, port: u16) -> bool {
        self.bits[usize::from(port) / 64] & (1 << (port % 64)) != 0
    }

    pub fn extend(&mut self, other: &PortSet) {
        for (mine, theirs) in self.bits.iter_mut().zip(other.bits.iter()) {
            *mine |= theirs;
        }
    }

    pub fn is_empty(&self) -> bool {
        self.bits.iter().all(|word| *word == 0)
    }

    pub fn ports(&self) -> impl Iterator<Item = u16> + '_ {
        (0..=u16::MAX).filter(|p| self.contains(*p))
    }

    /// The set as inclusive ranges, lowest first.
    pub fn ranges(&self) -> Vec<(u16, u16)> {
        let mut ranges: Vec<(u16, u16)> = Vec::new();
        for port in self.ports() {
            match ranges.last_mut() {
                Some((_, high)) if u32::from(*high) + 1 == u32::from(port) => *high = port,
                _ => ranges.push((port, port)),
            }
        }
        ranges
    }
}

impl fmt::Debug for PortSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.ports()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_follow_linkerd_format() {
        assert_eq!(duration("0"), Ok(Duration::ZERO));
        assert_eq!(duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(duration(" 10s "), Ok(Duration::from_secs(10)));
        assert_eq!(duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(duration("24h"), Ok(Duration::from_secs(86_400)));
        assert_eq!(duration("2d"), Ok(Duration::from_secs(172_800)));
        assert!(duration("10").unwrap_err().contains("unit"));
        assert!(duration("5y").unwrap_err().contains("unknown"));
        for bad in ["", "x", "1.5s", "-1s", "s", "10 s", "ten s"] {
            assert!(duration(bad).is_err(), "{bad:?} should be rejected");
        }
        assert!(duration("999999999999999999d")
            .unwrap_err()
            .contains("too large"));
    }

    #[test]
    fn blank_is_unset_for_settings_but_kept_as_a_value() {
        let lookup = |var: &str| (var == "BLANK").then(|| "  ".to_string());
        let env = Env::new(&lookup);
        assert_eq!(env.value("BLANK").as_deref(), Some(""));
        assert_eq!(env.setting("BLANK"), None);
        assert!(!env.is_set("BLANK"));
    }

    #[test]
    fn errors_name_their_variable_and_defaults_stand_in() {
        let lookup = |var: &str| match var {
            "T" => Some("soon".to_string()),
            "P" => Some("8080".to_string()),
            _ => None,
        };
        let mut env = Env::new(&lookup);
        assert_eq!(env.parse("T", "3s", duration), Duration::from_secs(3));
        assert_eq!(env.parse("P", "1", port), 8080);
        assert_eq!(env.optional("UNSET", duration), None);
        let errors = env.finish().unwrap_err();
        assert_eq!(errors.len(), 1);
        assert!(errors[0].starts_with("T=\"soon\": "), "{errors:?}");
    }

    #[test]
    fn variables_never_asked_for_are_told() {
        let lookup = |_: &str| Some("1".to_string());
        let env = Env::new(&lookup);
        let _ = env.setting("A_READ");
        let unread = env.unread(["A_READ", "A_OTHER", "B_OTHER"], "A_");
        assert_eq!(unread, ["A_OTHER"]);
    }

    #[test]
    fn booleans_and_numbers() {
        assert_eq!(boolean("TRUE"), Ok(true));
        assert_eq!(boolean("false"), Ok(false));
        assert_eq!(boolean(""), Ok(false));
        assert!(boolean("yes please").is_err());
        assert_eq!(positive("3"), Ok(3));
        assert!(positive("0").is_err());
        assert_eq!(count("0"), Ok(0));
    }

    #[test]
    fn port_sets() {
        let set = PortSet::parse("4190, 4191,25000-25002").unwrap();
        assert_eq!(
            set.ports().collect::<Vec<_>>(),
            vec![4190, 4191, 25000, 25001, 25002]
        );
        assert_eq!(set.ranges(), vec![(4190, 4191), (25000, 25002)]);
        assert!(PortSet::parse("70000").is_err());
        assert!(PortSet::parse("10-5").is_err());
        assert!(PortSet::parse("").unwrap().ports().next().is_none());
        let all = PortSet::parse("0-65535").unwrap();
        assert!(all.contains(0) && all.contains(65535));
    }
}
