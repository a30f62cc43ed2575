//! Who is working: a worker id that lets another process on the same host prove the worker
//! is gone (its pid no longer runs the same process), and the clock the store uses.

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// This process as a worker: `host/pid/process-start`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Worker {
    pub id: String,
    pub host: String,
    pub pid: u32,
}

impl Worker {
    pub fn current() -> Self {
        let host = hostname();
        let pid = std::process::id();
        let start = process_start(pid).unwrap_or(0);
        Worker { id: format!("{host}/{pid}/{start}"), host, pid }
    }

    /// True when `other` is a worker id of this host whose process no longer exists (or its
    /// pid now belongs to another process). Workers on other hosts are never provably gone.
    pub fn proves_gone(&self, other: &str) -> bool {
        let mut parts = other.rsplitn(3, '/');
        let (Some(start), Some(pid), Some(host)) = (parts.next(), parts.next(), parts.next()) else {
            return false;
        };
        if host != self.host {
            return false;
        }
        let (Ok(pid), Ok(start)) = (pid.parse::<u32>(), start.parse::<u64>()) else { return false };
        if pid == self.pid && other == self.id {
            return false;
        }
        match process_start(pid) {
            None => std::path::Path::new("/proc/self/stat").exists(),
            Some(now) => now != start,
        }
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".into())
        .replace('/', "_")
}

/// The process's start time in clock ticks since boot (field 22 of /proc/PID/stat).
fn process_start(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces; fields after it follow the last ')'.
    let after = &stat[stat.rfind(')')? + 2..];
    after.split_whitespace().nth(19)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_live_process_is_not_gone_and_a_dead_one_is() {
        let me = Worker::current();
        assert!(!me.proves_gone(&me.id));
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        let start = process_start(pid);
        child.wait().unwrap();
        if let Some(start) = start {
            assert!(me.proves_gone(&format!("{}/{pid}/{start}", me.host)));
        }
        assert!(!me.proves_gone(&format!("other-host/{}/1", me.pid)));
        assert!(me.proves_gone(&format!("{}/{}/{}", me.host, me.pid, 1)) || cfg!(not(target_os = "linux")));
    }
}
