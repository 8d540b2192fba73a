//! One runner for the external tools the agent calls (`qemu-img`, `mount`, `umount`): every
//! call has a time limit (the tool is killed when it passes), and a failure keeps the
//! tool's own words (its stderr) in the error, with the command that failed.

use std::time::Duration;

use crate::error::{AgentError, ErrorKind, Result};

/// Time limit of short tool calls (creating an overlay, a bitmap, a mount).
pub const SHORT: Duration = Duration::from_secs(120);
/// Time limit of calls that copy data (`qemu-img commit` of a large overlay).
pub const LONG: Duration = Duration::from_secs(24 * 3600);

/// Runs `program args…` and waits at most `limit`; stdout on success.
pub async fn run(program: &str, args: &[&str], limit: Duration) -> Result<Vec<u8>> {
    let command = format!("{program} {}", args.join(" "));
    let child =
        tokio::process::Command::new(program).args(args).stdin(std::process::Stdio::null()).kill_on_drop(true).output();
    let out = match tokio::time::timeout(limit, child).await {
        Err(_) => {
            return Err(AgentError::new(
                ErrorKind::Timeout,
                format!("{command} did not finish within {} s and was stopped", limit.as_secs()),
            ));
        }
        Ok(Err(e)) => {
            return Err(AgentError::new(ErrorKind::Unavailable, format!("cannot run {program}")).with_source(e));
        }
        Ok(Ok(out)) => out,
    };
    if out.status.success() {
        return Ok(out.stdout);
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    Err(AgentError::new(ErrorKind::FailedPrecondition, format!("{command} failed ({}): {}", out.status, stderr.trim())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn failures_keep_the_command_and_its_stderr_and_slow_tools_are_stopped() {
        let e = run("sh", &["-c", "echo broken >&2; exit 3"], SHORT).await.expect_err("exit 3");
        assert_eq!(e.kind(), ErrorKind::FailedPrecondition);
        assert!(e.to_string().contains("sh -c") && e.to_string().contains("broken"), "{e}");
        let e = run("sleep", &["5"], Duration::from_millis(100)).await.expect_err("too slow");
        assert_eq!(e.kind(), ErrorKind::Timeout, "{e}");
        let e = run("/nonexistent/tool", &[], SHORT).await.expect_err("missing");
        assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
        assert_eq!(run("echo", &["ok"], SHORT).await.expect("runs"), b"ok\n");
    }
}
