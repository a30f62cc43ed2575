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

/// `run --json`: the one JSON line every exit writes on stdout, so a cron job's JSON Lines file
/// has a line for every night. The summary is that line when the run gets that far; a refusal,
/// an error before or outside the run, and an abort by a second signal write the short form
/// `{run_id, job, status, exit_code, error}` here instead.
pub mod json_line {
    use std::io::Write;
    use std::sync::Mutex;

    use super::Exit;

    struct Pending {
        job: String,
        run_id: Option<i64>,
    }

    /// `Some` while a `--json` command still owes its line. A mutex because the line is owed
    /// by whichever comes first — the summary, the error path or the second-signal abort on
    /// the signal task — and must be written once.
    static PENDING: Mutex<Option<Pending>> = Mutex::new(None);

    fn pending() -> std::sync::MutexGuard<'static, Option<Pending>> {
        PENDING.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// This command owes a JSON line on every exit; `job` names it until the job file is read.
    pub fn arm(job: impl Into<String>) {
        *pending() = Some(Pending { job: job.into(), run_id: None });
    }

    /// The job's name, once the job file is read.
    pub fn set_job(name: &str) {
        if let Some(p) = pending().as_mut() {
            p.job = name.to_owned();
        }
    }

    /// The run the command works on, once it is known.
    pub fn set_run(id: i64) {
        if let Some(p) = pending().as_mut() {
            p.run_id = Some(id);
        }
    }

    /// The line is about to be written by its owner (the summary): nothing more to write.
    pub fn disarm() {
        pending().take();
    }

    /// `refused` for exit 2, `aborted` for exit 4 (a second signal), `error` otherwise.
    pub fn status_for(exit: Exit) -> &'static str {
        match exit {
            Exit::Usage => "refused",
            Exit::Interrupted => "aborted",
            _ => "error",
        }
    }

    /// Writes the short line if one is still owed (at most once per process).
    pub fn write(exit: Exit, error: &str) {
        write_status(status_for(exit), exit, Some(error), None);
    }

    /// Writes the short line with this `status` (and a `message` when there is no error).
    pub fn write_status(status: &str, exit: Exit, error: Option<&str>, message: Option<&str>) {
        let Some(p) = pending().take() else { return };
        let mut line = serde_json::json!({
            "run_id": p.run_id,
            "job": p.job,
            "status": status,
            "exit_code": exit.code(),
            "error": error,
        });
        if let Some(message) = message {
            line["message"] = message.into();
        }
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{line}").and_then(|_| out.flush());
    }
}
