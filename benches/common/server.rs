//! One real `hearth serve` process (this build's binary) on a free loopback port, for the benches
//! that drive Hearth as a client would.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// `HEARTH_MODELS_DIR`, else `~/.cache/hearth/models` (where `scripts/fetch-models` installs).
pub fn models_dir() -> PathBuf {
    std::env::var_os("HEARTH_MODELS_DIR").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var_os("HOME").expect("HOME is set")).join(".cache/hearth/models")
    })
}

pub struct Server {
    pub child: Child,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    /// A temporary directory holding the config (and whatever the config puts there).
    pub dir: PathBuf,
}

impl Server {
    /// Writes `config` (TOML; `[server] port = 0` lets the binary pick a port) to a fresh
    /// temporary directory named after `name`, starts `hearth serve` on it, and returns once
    /// `/ready` answers 200. `{dir}` in the config stands for that directory.
    pub fn start(name: &str, config: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("hearth-bench-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("a temporary directory");
        let path = dir.join("hearth.toml");
        std::fs::write(&path, config.replace("{dir}", &dir.display().to_string()))
            .expect("the config is written");
        let mut child = Command::new(env!("CARGO_BIN_EXE_hearth"))
            .args(["serve", "--config"])
            .arg(&path)
            .args(["--log-format", "json", "--log-level", "warn,hearth::server=info"])
            .env("HEARTH_MODELS_DIR", models_dir())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the hearth binary starts");
        let log = child.stderr.take().expect("a stderr pipe");
        let (address_tx, address_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(log).lines().map_while(Result::ok) {
                if !sent {
                    if let Some(address) = serde_json::from_str::<Value>(&line)
                        .ok()
                        .filter(|v| v["message"] == "listening")
                        .and_then(|v| v["address"].as_str().map(str::to_owned))
                    {
                        let _ = address_tx.send(address);
                        sent = true;
                    }
                }
            }
        });
        let address = address_rx.recv_timeout(Duration::from_secs(60)).expect("the server listens");
        let server = Self { child, url: format!("http://{address}"), dir };
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let ready = Command::new("curl")
                .args(["-sf", "-o", "/dev/null", &format!("{}/ready", server.url)])
                .status()
                .is_ok_and(|s| s.success());
            if ready {
                return server;
            }
            assert!(Instant::now() < deadline, "the server never became ready");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// SIGTERM (a graceful shutdown) and waits for the process to exit; the seconds it took.
    /// The directory stays for inspection until [`Server::stop`].
    pub fn terminate(&mut self) -> f64 {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return 0.0;
        }
        let started = Instant::now();
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let _ = self.child.wait();
        started.elapsed().as_secs_f64()
    }

    /// Terminates the process and removes its directory.
    pub fn stop(mut self) {
        self.terminate();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The sum over every series of one metric in a Prometheus text exposition (a counter's total
/// across labels; for a histogram pass `NAME_sum` or `NAME_count`).
pub fn metric_total(exposition: &str, name: &str) -> f64 {
    exposition
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let metric = series.split('{').next()?;
            (metric == name).then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}
