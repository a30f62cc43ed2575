//! SIGINT/SIGTERM: the first asks the run to stop (finish in-flight calls within the grace
//! period, record everything, exit 4); the second exits at once (leases then expire).

use tokio_util::sync::CancellationToken;

use crate::exit::Exit;

/// Spawns the listener; returns the token the first signal cancels.
pub fn install() -> std::io::Result<CancellationToken> {
    use tokio::signal::unix::{SignalKind, signal};
    let token = CancellationToken::new();
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let first = token.clone();
    tokio::spawn(async move {
        let name = tokio::select! {
            _ = interrupt.recv() => "SIGINT",
            _ = terminate.recv() => "SIGTERM",
        };
        tracing::warn!("{name}: stopping — waiting for calls in flight (signal again to abort at once)");
        first.cancel();
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
        let why = "second signal, aborting; leased items return to the queue when their lease expires or on --resume";
        eprintln!("backfill: {why}");
        crate::exit::json_line::write(Exit::Interrupted, why);
        std::process::exit(i32::from(Exit::Interrupted.code()));
    });
    Ok(token)
}
