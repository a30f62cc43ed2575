//! Who is working: a worker id that lets another process on the same host, boot and PID
//! namespace prove the worker is gone (its pid no longer runs the same process), and the clock
//! the store uses.

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// This process as a worker: `host/pid/process-start/instance`.
///
/// `instance` names the kernel boot and the PID namespace the pid belongs to (a hash of
/// /proc/sys/kernel/random/boot_id and /proc/self/ns/pid): two containers with the same host
/// name, or a machine before and after a reboot, have different instances, so one never takes
/// the other's pid for its own. Without it (not Linux, /proc unreadable) the id is
/// `host/pid/process-start`, and such a worker is only ever gone when its lease runs out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Worker {
    pub id: String,
    pub host: String,
    pub pid: u32,
}

/// A worker id taken apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Identity<'a> {
    host: &'a str,
    pid: u32,
    start: u64,
    instance: Option<&'a str>,
}

impl<'a> Identity<'a> {
    fn parse(id: &'a str) -> Option<Identity<'a>> {
        let parts: Vec<&str> = id.rsplitn(4, '/').collect();
        let (host, pid, start, instance) = match parts.as_slice() {
            [instance, start, pid, host] if is_instance(instance) => (*host, *pid, *start, Some(*instance)),
            // Ids without an instance; a host name never holds a '/'.
            [start, pid, host] => (*host, *pid, *start, None),
            _ => return None,
        };
        Some(Identity { host, pid: pid.parse().ok()?, start: start.parse().ok()?, instance })
    }
}

/// An instance is 16 lowercase hex digits.
fn is_instance(text: &str) -> bool {
    text.len() == 16 && text.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl Worker {
    pub fn current() -> Self {
        let host = hostname();
        let pid = std::process::id();
        let id = match (process_start(pid), instance()) {
            (Some(start), Some(instance)) => format!("{host}/{pid}/{start}/{instance}"),
            (start, _) => format!("{host}/{pid}/{}", start.unwrap_or(0)),
        };
        Worker { id, host, pid }
    }

    /// True when `other` is the id of a process that provably no longer runs: same host name,
    /// same kernel boot and PID namespace as this process, and its pid is gone or now belongs
    /// to a process started at another time. Anything else (another host, container or boot,
    /// an id without an instance) is never provably gone: only its lease running out counts.
    pub fn proves_gone(&self, other: &str) -> bool {
        let (Some(me), Some(them)) = (Identity::parse(&self.id), Identity::parse(other)) else {
            return false;
        };
        if other == self.id || me.instance.is_none() || them.instance != me.instance || them.host != me.host {
            return false;
        }
        match process_start(them.pid) {
            None => std::path::Path::new("/proc/self/stat").exists(),
            Some(now) => now != them.start,
        }
    }
}

/// This process's kernel boot and PID namespace, hashed into 16 hex digits; `None` when either
/// cannot be read.
fn instance() -> Option<String> {
    use sha2::{Digest, Sha256};
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let namespace = std::fs::read_link("/proc/self/ns/pid").ok()?;
    let boot = boot.trim();
    if boot.is_empty() {
        return None;
    }
    let digest = Sha256::digest(format!("{boot}\n{}", namespace.display()).as_bytes());
    Some(hex::encode(&digest[..8]))
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

    /// The pid of a process that has just ended.
    fn dead_pid() -> u32 {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        pid
    }

    #[test]
    fn a_dead_pid_is_gone_only_in_the_same_boot_and_pid_namespace() {
        let me = Worker::current();
        assert!(!me.proves_gone(&me.id));
        let mine = instance();
        if mine.is_none() && cfg!(not(target_os = "linux")) {
            return;
        }
        let mine = mine.expect("the boot id and PID namespace are readable on Linux");
        assert!(me.id.ends_with(&format!("/{mine}")), "{}", me.id);
        let pid = dead_pid();
        // Same host, boot and namespace: a dead pid, or a live pid started at another time.
        assert!(me.proves_gone(&format!("{}/{pid}/5/{mine}", me.host)));
        assert!(me.proves_gone(&format!("{}/{}/1/{mine}", me.host, me.pid)));
        // Another container with the same host name, another boot, an old id, another host.
        assert!(!me.proves_gone(&format!("{}/{pid}/5/0123456789abcdef", me.host)));
        assert!(!me.proves_gone(&format!("{}/{pid}/5", me.host)));
        assert!(!me.proves_gone(&format!("other-host/{pid}/5/{mine}")));
        assert!(!me.proves_gone("garbage"));
    }

    #[test]
    fn ids_parse_with_and_without_an_instance() {
        let with = Identity::parse("h.example/12/345/0123456789abcdef").unwrap();
        assert_eq!(with, Identity { host: "h.example", pid: 12, start: 345, instance: Some("0123456789abcdef") });
        let without = Identity::parse("h.example/12/345").unwrap();
        assert_eq!(without, Identity { host: "h.example", pid: 12, start: 345, instance: None });
        assert_eq!(Identity::parse("12/345"), None);
    }
}
