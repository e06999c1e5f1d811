//! What a process of this machine uses, from /proc (Linux), for the fleet and soak
//! reports.

/// One process at one moment.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ProcessUsage {
    pub rss_bytes: u64,
    pub peak_rss_bytes: u64,
    /// User plus system CPU seconds since the process started.
    pub cpu_seconds: f64,
    pub open_fds: usize,
}

/// The usage of `pid`, or None when it is gone.
pub fn usage(pid: u32) -> Option<ProcessUsage> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib = |key: &str| -> Option<u64> {
        let v = status.lines().find_map(|l| l.strip_prefix(key))?;
        Some(v.split_whitespace().next()?.parse::<u64>().ok()? * 1024)
    };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command (which may hold spaces) closed by ')': utime and
    // stime are the 14th and 15th fields of the line, in clock ticks (100 a second
    // on Linux, `getconf CLK_TCK`).
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    Some(ProcessUsage {
        rss_bytes: kib("VmRSS:")?,
        peak_rss_bytes: kib("VmHWM:").unwrap_or(0),
        cpu_seconds: (ticks(11) + ticks(12)) / 100.0,
        open_fds: std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count(),
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn this_process_has_memory_and_open_files() {
        let u = super::usage(std::process::id()).expect("this process is in /proc");
        assert!(u.rss_bytes > 0 && u.peak_rss_bytes >= u.rss_bytes, "{u:?}");
        assert!(u.open_fds >= 3, "{u:?}");
    }
}
