//! Exit codes, one per failure class, so that an orchestrator (or a repair controller)
//! can react to *why* the init failed without parsing its log.

use std::fmt;

/// The failure classes documented in `init/README.md`. Keep the two in step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitClass {
    /// Anything not covered below, e.g. the namespace path cannot be entered.
    Other,
    /// The flags are invalid or contradict each other (clap also uses 2).
    BadFlags,
    /// No usable firewall backend: binary missing or the kernel refuses it.
    BackendMissing,
    /// The backend rejected the rule set; nothing of this run was applied.
    ApplyFailed,
    /// Rules are in place (or not) but traffic is not redirected as configured.
    /// 95 is what Linkerd's network validator uses, so existing repair tooling
    /// that restarts pods on that code keeps working.
    ValidationFailed,
}

impl ExitClass {
    pub fn code(self) -> i32 {
        match self {
            ExitClass::Other => 1,
            ExitClass::BadFlags => 2,
            ExitClass::BackendMissing => 3,
            ExitClass::ApplyFailed => 4,
            ExitClass::ValidationFailed => 95,
        }
    }
}

/// An error on its way to the user: one line of text and the exit code it deserves.
#[derive(Debug)]
pub struct Failure {
    pub class: ExitClass,
    pub error: anyhow::Error,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // `{:#}` joins the context chain with ": ", which keeps it on one line; tool
        // output that spans lines is flattened where it is captured.
        write!(f, "{:#}", self.error)
    }
}

impl std::error::Error for Failure {}

pub type Outcome<T> = Result<T, Failure>;

/// Attaches an exit class to any error convertible to `anyhow::Error`.
pub trait Classify<T> {
    fn class(self, class: ExitClass) -> Outcome<T>;
}

impl<T, E: Into<anyhow::Error>> Classify<T> for Result<T, E> {
    fn class(self, class: ExitClass) -> Outcome<T> {
        self.map_err(|e| Failure {
            class,
            error: e.into(),
        })
    }
}

pub fn fail<T>(class: ExitClass, error: anyhow::Error) -> Outcome<T> {
    Err(Failure { class, error })
}
