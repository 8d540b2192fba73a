//! systemd integration shared by vmbackup's daemons: `Type=notify` readiness, `STATUS=`
//! lines, `STOPPING=1`, and watchdog pings.
//!
//! Outside systemd (no `NOTIFY_SOCKET`), every call is a no-op. Watchdog pings come from a
//! task on the async runtime after a round trip through the blocking pool, so a wedged
//! runtime or an exhausted pool stops the pings and systemd restarts the daemon.

use std::time::Duration;

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;

fn send(state: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(state) {
        tracing::warn!(error = %e, "notifying systemd failed");
    }
}

/// READY=1 (call once the listener is bound and state is open), with a status line.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// STATUS=… line shown by `systemctl status`.
pub fn status(status: &str) {
    send(&[NotifyState::Status(status)]);
}

/// RELOADING=1 while a reload (SIGHUP) is applied.
pub fn reloading() {
    send(&[NotifyState::Reloading]);
}

/// READY=1 again after a reload.
pub fn reloaded() {
    send(&[NotifyState::Ready]);
}

/// STOPPING=1.
pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}

/// When systemd asks for a watchdog (`WatchdogSec=`), pings it at half the interval until
/// `shutdown`; `status` (if it returns a line) is sent with each ping.
pub fn spawn_watchdog<F>(shutdown: CancellationToken, status: F)
where
    F: Fn() -> Option<String> + Send + 'static,
{
    let Some(interval) = sd_notify::watchdog_enabled() else { return };
    let period = (interval / 2).max(Duration::from_millis(10));
    tracing::info!(interval_ms = u64::try_from(interval.as_millis()).unwrap_or(u64::MAX), "systemd watchdog enabled");
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            // Prove the blocking pool still runs work before vouching for the process.
            if tokio::time::timeout(period, tokio::task::spawn_blocking(|| ())).await.is_err() {
                tracing::error!("blocking pool did not answer within the watchdog period; withholding the ping");
                continue;
            }
            match status() {
                Some(line) => send(&[NotifyState::Watchdog, NotifyState::Status(&line)]),
                None => send(&[NotifyState::Watchdog]),
            }
        }
    });
}
