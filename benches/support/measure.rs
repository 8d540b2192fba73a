//! What an operation cost: CPU seconds and peak resident memory, of our daemons (read from
//! /proc) and of the other tools (their rusage, taken by this bench binary re-run as a
//! wrapper around each command).

#![allow(dead_code)]

use std::process::Command;

/// The argument that turns a bench binary into the rusage wrapper (see [`wrapper_main`]).
const WRAP: &str = "--rusage-of";

/// User + system CPU seconds of a running process so far.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let fields: Vec<&str> = stat.rsplit_once(')').expect("comm").1.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>().expect("utime") + fields[12].parse::<f64>().expect("stime");
    ticks / 100.0
}

/// Peak resident memory of a running process (since it started or since [`reset_peak`]).
pub fn peak_rss_mib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0)
        >> 10
}

/// Starts a new peak-memory measurement of a running process.
pub fn reset_peak(pid: u32) {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").expect("reset the peak RSS");
}

/// What running one command cost.
#[derive(Debug, Clone, Copy, Default)]
pub struct Cost {
    /// User + system seconds of the command and everything it waited for.
    pub cpu: f64,
    /// Its peak resident memory.
    pub peak_mib: u64,
}

/// Runs `program` and returns its cost; panics with its stderr if it fails.
pub fn run(program: &str, args: &[&str], env: &[(&str, &str)], dir: Option<&std::path::Path>) -> Cost {
    let me = std::env::current_exe().expect("this bench binary");
    let mut c = Command::new(me);
    c.arg(WRAP).arg(program).args(args).envs(env.iter().copied());
    if let Some(d) = dir {
        c.current_dir(d);
    }
    let out = c.output().expect("start the rusage wrapper");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{program} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    let line = stdout.lines().rfind(|l| l.starts_with("rusage ")).expect("the wrapper's rusage line");
    let f: Vec<&str> = line.split_whitespace().collect();
    Cost { cpu: f[1].parse().expect("cpu"), peak_mib: f[2].parse::<u64>().expect("maxrss") >> 10 }
}

/// If this process was started as the rusage wrapper: runs the command, prints
/// `rusage <cpu seconds> <peak KiB>` and exits. Call first thing in `main`.
pub fn wrapper_main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) != Some(WRAP) {
        return;
    }
    let program = args.get(2).expect("a program to run");
    let out = Command::new(program)
        .args(&args[3..])
        .output()
        .unwrap_or_else(|e| panic!("{program} not found ({e}): install it to compare"));
    if !out.status.success() {
        eprintln!("{}", String::from_utf8_lossy(&out.stderr));
        std::process::exit(1);
    }
    use nix::sys::resource::{UsageWho, getrusage};
    let u = getrusage(UsageWho::RUSAGE_CHILDREN).expect("getrusage");
    let secs = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
    println!("rusage {:.3} {}", secs(u.user_time()) + secs(u.system_time()), u.max_rss());
    std::process::exit(0);
}
