//! Logs go to stderr through `tracing`, filtered by `RUST_LOG` (default: info for backfill,
//! warn for libraries), without colour when `NO_COLOR` is set or stderr is not a terminal.
//! While a progress bar is drawn, log lines are printed above it: the command line sets the
//! logging up, the runner's reporter sets and clears the bar.

use std::io::{IsTerminal, Write};
use std::sync::Mutex;

use indicatif::ProgressBar;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;

/// The bar currently drawn, if any. A mutex because the reporter task sets it while any
/// thread may log.
static BAR: Mutex<Option<ProgressBar>> = Mutex::new(None);

pub fn set_bar(bar: Option<ProgressBar>) {
    *BAR.lock().expect("bar lock") = bar;
}

/// Writes one log record, suspending the bar around it.
pub struct StderrAboveBar {
    buffer: Vec<u8>,
}

impl Write for StderrAboveBar {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buffer.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for StderrAboveBar {
    fn drop(&mut self) {
        let bytes = std::mem::take(&mut self.buffer);
        let print = || {
            let _ = std::io::stderr().write_all(&bytes);
        };
        match BAR.lock().ok().and_then(|bar| bar.clone()) {
            Some(bar) => bar.suspend(print),
            None => print(),
        }
    }
}

struct MakeStderr;

impl<'a> MakeWriter<'a> for MakeStderr {
    type Writer = StderrAboveBar;
    fn make_writer(&'a self) -> Self::Writer {
        StderrAboveBar { buffer: Vec::with_capacity(256) }
    }
}

pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn,backfill=info,backfill_controller=info"));
    let color = std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()) && std::io::stderr().is_terminal();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(MakeStderr)
        .with_ansi(color)
        .with_target(false)
        .try_init();
}
