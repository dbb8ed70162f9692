//! What the bench binaries share: how they start, and where and when the figures were taken.

use std::future::Future;
use std::process::Command;

use serde_json::{json, Value};

#[allow(dead_code, reason = "only the benches that read retrieval-debian use it")]
pub mod retrieval_debian;
#[allow(dead_code, reason = "only the benches that drive the real binary use it")]
pub mod server;

/// Runs the bench on a fresh multi-threaded runtime, after pinning candle's CPU thread count as the
/// `hearth` binary does (it must happen before any thread starts).
#[allow(dead_code, reason = "the synchronous benches pin the threads themselves")]
pub fn run(bench: impl Future<Output = ()>) {
    hearth_backends::device::pin_cpu_threads();
    tokio::runtime::Runtime::new().expect("cannot start the tokio runtime").block_on(bench);
}

/// When and where the figures were taken.
pub fn machine() -> Value {
    let command_output = |program: &str, args: &[&str]| {
        Command::new(program)
            .args(args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    let cpu_model = std::fs::read_to_string("/proc/cpuinfo").ok().and_then(|info| {
        info.lines().find_map(|l| {
            l.strip_prefix("model name").map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
        })
    });
    json!({
        "date": command_output("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"]),
        "git_commit": command_output("git", &["rev-parse", "HEAD"]),
        "git_dirty": command_output("git", &["status", "--porcelain"]).map(|s| !s.is_empty()),
        "cpu_model": cpu_model,
        "nproc": std::thread::available_parallelism().map(usize::from).ok(),
        // candle sizes its matmul thread pool from this; unset, it re-reads /proc/cpuinfo per matmul.
        "RAYON_NUM_THREADS": std::env::var("RAYON_NUM_THREADS").ok(),
    })
}

pub fn round(value: f64, decimals: i32) -> f64 {
    let scale = 10f64.powi(decimals);
    (value * scale).round() / scale
}

/// The process's peak resident set (`VmHWM`), in MiB.
#[allow(dead_code, reason = "not every bench reports memory this way")]
pub fn peak_rss_mib() -> f64 {
    status_mib("self", "VmHWM")
}

/// A memory figure of `/proc/{process}/status` (`VmRSS`, `VmHWM`, …; `process` a pid or `self`),
/// in MiB; 0 when it cannot be read.
#[allow(dead_code, reason = "not every bench reports memory")]
pub fn status_mib(process: &str, field: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{process}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kib| kib / 1024.0)
}

/// Runs a peer script from `benches/peers/` with the Python in `$python_env` (default the e2e
/// venv, `~/.cache/hearth/venv/bin/python`) and reads the one JSON object it prints.
#[allow(dead_code, reason = "not every bench has a Python peer")]
pub fn python_peer(python_env: &str, script: &str, args: &[&std::ffi::OsStr]) -> Result<Value, String> {
    let python = std::env::var_os(python_env).map(std::path::PathBuf::from).unwrap_or_else(|| {
        std::path::PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
            .join(".cache/hearth/venv/bin/python")
    });
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/peers").join(script);
    let output = Command::new(&python)
        .arg(&script)
        .args(args)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", python.display()))?;
    if !output.status.success() {
        return Err(String::from_utf8_lossy(&output.stderr).lines().last().unwrap_or("failed").to_string());
    }
    serde_json::from_slice(&output.stdout).map_err(|e| format!("peer output: {e}"))
}
