//! Exit codes of the command line (README.md, "Exit codes") and the error kinds that map onto them.

use std::fmt;

/// The process exit status, as documented in README.md.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// The run finished: every item is done, failed or rejected.
    Finished = 0,
    /// An unexpected error.
    Error = 1,
    /// Bad usage or a bad job file.
    Usage = 2,
    /// Stopped at the budget cap.
    Budget = 3,
    /// Interrupted by SIGINT/SIGTERM.
    Interrupted = 4,
    /// Batch mode: the provider's batches are still running; `--resume` collects them later.
    Waiting = 5,
    /// The run finished, but more than `limits.max_failed_share` of its items failed or were
    /// rejected.
    Failures = 6,
}

impl Exit {
    pub fn code(self) -> u8 {
        self as u8
    }
}

/// An error the user can fix by changing the command line, the job file or the environment.
/// It maps to exit code 2; its message names the cause and the fix.
#[derive(Debug)]
pub struct UsageError(pub String);

impl fmt::Display for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

/// Shorthand for returning a [`UsageError`] inside `anyhow`.
pub fn usage(message: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(UsageError(message.into()))
}

/// The exit code for an error: 2 when a [`UsageError`] is anywhere in its chain, else 1.
pub fn exit_for_error(error: &anyhow::Error) -> Exit {
    if error.chain().any(|cause| cause.downcast_ref::<UsageError>().is_some()) {
        Exit::Usage
    } else {
        Exit::Error
    }
}
