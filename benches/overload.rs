//! Overload: the real `hearth` binary (this build's release binary) serving the offline
//! all-MiniLM-L6-v2, driven over loopback by a Rust load generator in this process.
//!
//! 1. capacity: 8 clients back to back, to learn what the model serves (requests/s);
//! 2. 200 clients back to back for `HEARTH_BENCH_LOAD_SECONDS` (default 60), with load shedding
//!    by expected wait on (`max_queue_wait_ms = 2000`, the default) and off (`0`): throughput,
//!    latency of successes and of 429s, errors, and the server's RSS over time;
//! 3. 5× overload: requests arriving at five times the measured capacity (open loop, for half
//!    that time): every request must end in a success or a 429, none may hang.
//!
//! Each request embeds 16 sentences (an ingest-like batch). A client that gets a 429 waits its
//! `Retry-After`, as the OpenAI SDKs do. The route and per-model in-flight limits are raised so
//! that the model's own queue policy is what is measured. Results: `benches/results/overload.json`.

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::server::{models_dir, Server};
use common::{machine, round};
use serde_json::{json, Value};

const MODEL: &str = "all-minilm-l6-v2";
const INPUTS_PER_REQUEST: usize = 16;
const CLIENTS: usize = 200;
/// A request with no answer after this long counts as hung.
const HANG: Duration = Duration::from_secs(60);

fn main() {
    common::run(bench());
}

fn sentences() -> Arc<[String]> {
    let base = [
        "The mill by the river has ground flour for the town since the fourteenth century.",
        "Configure the service to restart on failure and to log in JSON.",
        "A quiet street of stone houses leads down to the harbour.",
        "Embeddings map sentences to vectors whose distances follow their meanings.",
    ];
    (0..1_000).map(|i| format!("{} Item {i}.", base[i % base.len()])).collect()
}

/// A server whose model queue policy is the one measured (`max_queue_wait_ms`).
fn start(name: &str, max_queue_wait_ms: u64) -> Server {
    Server::start(
        &format!("overload-{name}"),
        &format!(
            "[server]\nport = 0\nmax_concurrent_requests_per_route = 4096\nmax_concurrent_requests = 4096\n\
             queue_depth = 4096\nmax_queue_wait_ms = {max_queue_wait_ms}\n\
             [[models]]\nid = \"{MODEL}\"\nkind = \"embedding\"\nsource = \"{MODEL}\"\n"
        ),
    )
}

/// How one request ended.
#[derive(Clone, Copy)]
enum Outcome {
    Ok(f64),
    /// 429, with its latency and `Retry-After`.
    Shed(f64, u64),
    Failed,
    Hung,
}

#[derive(Default)]
struct Tally {
    ok: Vec<f64>,
    shed: Vec<f64>,
    failed: usize,
    hung: usize,
}

impl Tally {
    fn add(&mut self, outcome: Outcome) {
        match outcome {
            Outcome::Ok(s) => self.ok.push(s),
            Outcome::Shed(s, _) => self.shed.push(s),
            Outcome::Failed => self.failed += 1,
            Outcome::Hung => self.hung += 1,
        }
    }

    fn summary(&mut self, seconds: f64) -> Value {
        let stats = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            let pct = |p: f64| {
                if v.is_empty() {
                    return Value::Null;
                }
                let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
                json!(round(v[rank.clamp(1, v.len()) - 1] * 1e3, 1))
            };
            json!({"count": v.len(), "p50_ms": pct(50.0), "p99_ms": pct(99.0), "max_ms": pct(100.0)})
        };
        json!({
            "seconds": round(seconds, 1),
            "succeeded": stats(&mut self.ok),
            "sentences_per_second": round((self.ok.len() * INPUTS_PER_REQUEST) as f64 / seconds, 1),
            "shed_429": stats(&mut self.shed),
            "failed": self.failed,
            "hung": self.hung,
        })
    }
}

async fn send(client: &reqwest::Client, url: &str, body: Vec<u8>) -> Outcome {
    let sent = Instant::now();
    let request = client.post(url).header("content-type", "application/json").body(body).send();
    match tokio::time::timeout(HANG, async {
        let response = request.await.ok()?;
        let status = response.status().as_u16();
        let retry: u64 =
            response.headers().get("retry-after").and_then(|v| v.to_str().ok()?.parse().ok()).unwrap_or(1);
        response.bytes().await.ok()?;
        Some((status, retry))
    })
    .await
    {
        Err(_) => Outcome::Hung,
        Ok(None) => Outcome::Failed,
        Ok(Some((200, _))) => Outcome::Ok(sent.elapsed().as_secs_f64()),
        Ok(Some((429, retry))) => Outcome::Shed(sent.elapsed().as_secs_f64(), retry),
        Ok(Some(_)) => Outcome::Failed,
    }
}

fn body(sentences: &[String], start: usize) -> Vec<u8> {
    let input: Vec<&str> =
        (0..INPUTS_PER_REQUEST).map(|i| sentences[(start + i) % sentences.len()].as_str()).collect();
    serde_json::to_vec(&json!({"model": MODEL, "input": input})).expect("the body serializes")
}

/// `clients` tasks sending back to back for `duration`; a 429 is followed by its `Retry-After`.
async fn closed_loop(server: &Server, clients: usize, duration: Duration) -> (Tally, f64) {
    let url = format!("{}/v1/embeddings", server.url);
    let sentences = sentences();
    let started = Instant::now();
    let deadline = started + duration;
    let tasks: Vec<_> = (0..clients)
        .map(|c| {
            let (url, sentences) = (url.clone(), Arc::clone(&sentences));
            tokio::spawn(async move {
                let client = reqwest::Client::builder().no_proxy().build().expect("an HTTP client");
                let mut tally = Tally::default();
                let mut next = c * INPUTS_PER_REQUEST;
                while Instant::now() < deadline {
                    let outcome = send(&client, &url, body(&sentences, next)).await;
                    next += clients * INPUTS_PER_REQUEST;
                    tally.add(outcome);
                    if let Outcome::Shed(_, retry) = outcome {
                        let wait = Duration::from_secs(retry)
                            .min(deadline.saturating_duration_since(Instant::now()));
                        tokio::time::sleep(wait).await;
                    }
                }
                tally
            })
        })
        .collect();
    let mut total = Tally::default();
    for task in tasks {
        let tally = task.await.expect("a client task ends");
        total.ok.extend(tally.ok);
        total.shed.extend(tally.shed);
        total.failed += tally.failed;
        total.hung += tally.hung;
    }
    (total, started.elapsed().as_secs_f64())
}

/// Requests arriving every `1 / rate` seconds for `duration`, whatever happens to earlier ones.
async fn open_loop(server: &Server, rate: f64, duration: Duration) -> (Tally, f64) {
    let url = format!("{}/v1/embeddings", server.url);
    let sentences = sentences();
    let client =
        reqwest::Client::builder().no_proxy().pool_max_idle_per_host(4096).build().expect("a client");
    let started = Instant::now();
    let mut tasks = Vec::new();
    let mut i = 0usize;
    while started.elapsed() < duration {
        let due = started + Duration::from_secs_f64(i as f64 / rate);
        tokio::time::sleep_until(due.into()).await;
        let (client, url, body) = (client.clone(), url.clone(), body(&sentences, i * INPUTS_PER_REQUEST));
        tasks.push(tokio::spawn(async move { send(&client, &url, body).await }));
        i += 1;
    }
    let mut tally = Tally::default();
    for task in tasks {
        tally.add(task.await.expect("a request task ends"));
    }
    (tally, started.elapsed().as_secs_f64())
}

/// Samples the server's RSS every second until stopped.
fn sample_rss(server: &Server) -> (Arc<AtomicBool>, std::thread::JoinHandle<Vec<f64>>) {
    let stop = Arc::new(AtomicBool::new(false));
    let pid = server.child.id();
    let flag = Arc::clone(&stop);
    let samples = Arc::new(Mutex::new(Vec::new()));
    let handle = std::thread::spawn(move || {
        while !flag.load(Ordering::Relaxed) {
            let read = std::fs::read_to_string(format!("/proc/{pid}/status")).ok().and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            });
            if let Some(kib) = read {
                samples.lock().unwrap().push(round(kib / 1024.0, 1));
            }
            std::thread::sleep(Duration::from_secs(1));
        }
        std::mem::take(&mut *samples.lock().unwrap())
    });
    (stop, handle)
}

fn rss_summary(samples: &[f64]) -> Value {
    let (min, max) = samples.iter().fold((f64::MAX, 0f64), |(lo, hi), &x| (lo.min(x), hi.max(x)));
    let tenth = samples.len() / 10;
    json!({
        "samples_mib": samples,
        "min_mib": min, "max_mib": max,
        "first_tenth_max_mib": samples[..tenth.max(1)].iter().cloned().fold(0.0, f64::max),
        "last_tenth_max_mib": samples[samples.len() - tenth.max(1)..].iter().cloned().fold(0.0, f64::max),
    })
}

async fn bench() {
    let load_seconds: u64 =
        std::env::var("HEARTH_BENCH_LOAD_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(60);
    let load = Duration::from_secs(load_seconds);
    assert!(models_dir().join(MODEL).join("model.safetensors").is_file(), "run scripts/fetch-models first");
    let mut results = json!({
        "machine": machine(),
        "model": MODEL,
        "inputs_per_request": INPUTS_PER_REQUEST,
        "clients": CLIENTS,
        "load_seconds": load_seconds,
    });
    let mut capacity_rps = 0.0;
    for (policy, max_wait) in [("shed", 2_000u64), ("off", 0)] {
        let server = start(policy, max_wait);
        closed_loop(&server, 8, Duration::from_secs(3)).await; // warm-up
        let mut entry = json!({"max_queue_wait_ms": max_wait});
        if policy == "shed" {
            let (mut capacity, seconds) = closed_loop(&server, 8, Duration::from_secs(15)).await;
            capacity_rps = capacity.ok.len() as f64 / seconds;
            println!("capacity (8 clients): {capacity_rps:.2} requests/s of {INPUTS_PER_REQUEST} sentences");
            entry["capacity_8_clients"] = capacity.summary(seconds);
        }
        let (stop, sampler) = sample_rss(&server);
        let (mut tally, seconds) = closed_loop(&server, CLIENTS, load).await;
        stop.store(true, Ordering::Relaxed);
        let rss = sampler.join().expect("the RSS sampler ends");
        let closed = tally.summary(seconds);
        println!("{policy}: {CLIENTS} clients for {load_seconds} s: {closed}");
        entry["closed_loop"] = closed;
        entry["closed_loop_rss"] = rss_summary(&rss);
        if policy == "shed" {
            let rate = 5.0 * capacity_rps;
            let (stop, sampler) = sample_rss(&server);
            let (mut tally, seconds) = open_loop(&server, rate, load / 2).await;
            stop.store(true, Ordering::Relaxed);
            let rss = sampler.join().expect("the RSS sampler ends");
            let open = tally.summary(seconds);
            println!("{policy}: 5x overload ({rate:.1} requests/s arriving): {open}");
            entry["overload_5x"] =
                json!({"arrivals_per_second": round(rate, 2), "result": open, "rss": rss_summary(&rss)});
        }
        server.stop();
        results[policy] = entry;
    }
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/results/overload.json");
    std::fs::write(&out, serde_json::to_string_pretty(&results).expect("JSON") + "\n")
        .expect("results written");
    println!("wrote {}", out.display());
}
