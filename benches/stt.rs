//! `cargo bench --bench stt`: speech to text on the real Whisper base weights, through Hearth's
//! real path (config, loader, `Transcriber`: decoding and log-mel on the preprocessing pool, the
//! model on its owner thread), on the CPU, for each backend: candle on the CTranslate2 folder (as
//! configured by default, and with `encoder_weights = "float"` where the default is int8) and,
//! built with `--features whisper-cpp`, whisper.cpp on the ggml files written from it (float16 and
//! Q8_0; scripts/setup) — each in its own process, so that peak RSS is its own — beside
//! faster-whisper on the same folder and clips in the same run
//! (`benches/peers/stt_faster_whisper.py`, float32 and int8):
//!
//! 1. speed as a multiple of real time over Debian's five LibriVox clips, one after another, and
//!    their WER;
//! 2. latency of one 5.3 s clip (median of 3);
//! 3. throughput (audio seconds per second) with 4 requests in flight, 20 requests;
//! 4. peak RSS.
//!
//! Results go to `benches/results/stt.json`. Environment: `HEARTH_MODELS_DIR` (default
//! `~/.cache/hearth/models`), `HEARTH_STT_PEER_PYTHON` (default `~/.cache/hearth/venv/bin/python`,
//! the e2e venv, which has faster-whisper).

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use futures::stream::{self, StreamExt};
use hearth::config::{default_models_dir, Config, Overrides};
use hearth::server::load_models;
use hearth::state::AppState;
use hearth_engine::registry::{LoadState, Served};
use hearth_engine::transcribe::wer::{normalized_words, word_errors};
use hearth_engine::transcribe::{DecodeOptions, Transcribe, TranscribeRequest, Transcriber};
use hearth_engine::Priority;
use serde_json::{json, Value};

use common::{machine, peak_rss_mib, python_peer, round};

const MODEL: &str = "whisper-base-ct2";
const LIBRIVOX: &str = "/usr/share/pocketsphinx/test/data/librivox";
const FIVE_SECONDS: &str = "sense_and_sensibility_01_austen_64kb-0890";

fn main() {
    common::run(bench());
}

struct Clip {
    id: String,
    reference: String,
    bytes: Vec<u8>,
    seconds: f64,
}

fn clips() -> Vec<Clip> {
    let text = std::fs::read_to_string(Path::new(LIBRIVOX).join("transcription"))
        .expect("pocketsphinx-testdata is installed (scripts/setup)");
    let mut clips: Vec<Clip> = text
        .lines()
        .filter_map(|line| {
            let (body, id) = line.rsplit_once('(')?;
            let reference = body.trim().strip_prefix("<s>")?.strip_suffix("</s>")?.trim().to_string();
            let id = id.trim_end_matches(')').trim().to_string();
            let bytes = std::fs::read(Path::new(LIBRIVOX).join(format!("{id}.wav"))).ok()?;
            // 16 kHz s16le mono with a 44-byte header.
            let seconds = (bytes.len() - 44) as f64 / 32_000.0;
            Some(Clip { id, reference, bytes, seconds })
        })
        .collect();
    clips.sort_by(|a, b| a.id.cmp(&b.id));
    clips
}

/// One way Hearth runs Whisper base: (name, `[[models]]` keys after `id`).
const BACKENDS: &[(&str, &str)] = &[
    ("candle", "preset = \"whisper-base\"\nsource = \"whisper-base-ct2\"\ndevice = \"cpu\"\n"),
    (
        "candle float encoder",
        "preset = \"whisper-base\"\nsource = \"whisper-base-ct2\"\ndevice = \"cpu\"\nencoder_weights = \"float\"\n",
    ),
    (
        "whisper-cpp f16",
        "kind = \"stt\"\nsource = \"whisper-base-ggml\"\nfile = \"ggml-base.bin\"\ncpu_threads = 2\n",
    ),
    (
        "whisper-cpp q8_0",
        "kind = \"stt\"\nsource = \"whisper-base-ggml\"\nfile = \"ggml-base-q8_0.bin\"\ncpu_threads = 2\n",
    ),
];

/// Set in the child process that measures one backend.
const ONE_BACKEND: &str = "HEARTH_BENCH_STT_BACKEND";

async fn bench() {
    let models_dir =
        std::env::var_os("HEARTH_MODELS_DIR").map(PathBuf::from).unwrap_or_else(default_models_dir);
    let folder = models_dir.join(MODEL);
    assert!(folder.join("model.bin").is_file(), "{} is missing: run scripts/fetch-models", folder.display());
    let clips = clips();
    assert_eq!(clips.len(), 5);
    if let Ok(name) = std::env::var(ONE_BACKEND) {
        let (_, keys) = BACKENDS.iter().find(|(n, _)| *n == name).expect("a known backend");
        let report = measure(&models_dir, keys, &clips).await;
        println!("RESULT {report}");
        return;
    }
    let audio: f64 = clips.iter().map(|c| c.seconds).sum();
    let words: usize = clips.iter().map(|c| normalized_words(&c.reference).len()).sum();
    let mut hearth = Vec::new();
    for (name, _) in BACKENDS {
        if name.starts_with("whisper-cpp") && !cfg!(feature = "whisper-cpp") {
            println!("{name}: skipped (build the bench with --features whisper-cpp)");
            continue;
        }
        if *name == "candle float encoder" && !hearth_backends::int8::available() {
            println!("{name}: skipped (the same as `candle` on a CPU without AVX-512 VNNI)");
            continue;
        }
        println!("Hearth, {name}, CPU");
        let output = std::process::Command::new(std::env::current_exe().unwrap())
            .env(ONE_BACKEND, name)
            .stderr(std::process::Stdio::inherit())
            .output()
            .expect("the bench runs itself");
        let stdout = String::from_utf8_lossy(&output.stdout);
        print!(
            "{}",
            stdout
                .lines()
                .filter(|l| !l.starts_with("RESULT "))
                .map(|l| format!("{l}\n"))
                .collect::<String>()
        );
        let report: Value = stdout
            .lines()
            .find_map(|l| l.strip_prefix("RESULT "))
            .and_then(|json| serde_json::from_str(json).ok())
            .unwrap_or_else(|| panic!("{name}: the measuring process failed ({})", output.status));
        hearth.push((name.to_string(), report));
    }
    let peers: Vec<Value> = ["float32", "int8"]
        .iter()
        .filter_map(|compute| match run_peer(&folder, compute) {
            Ok(report) => {
                println!("faster-whisper {compute}: {report}");
                Some(report)
            }
            Err(reason) => {
                println!("peer {compute} skipped: {reason}");
                None
            }
        })
        .collect();
    let backends: Vec<Value> = hearth
        .iter()
        .map(|(name, report)| {
            let over: serde_json::Map<String, Value> = peers
                .iter()
                .map(|peer| {
                    let ratio = |key: &str| {
                        let (ours, theirs) = (report[key].as_f64()?, peer[key].as_f64()?);
                        Some(round(ours / theirs, 3))
                    };
                    let ratios = json!({
                        "speed": ratio("speed_x_realtime"),
                        "latency_5s": ratio("latency_5s_s"),
                        "concurrent4": ratio("concurrent4_x_realtime"),
                        "peak_rss": ratio("peak_rss_mib"),
                    });
                    println!("{name} / faster-whisper {}: {ratios}", peer["compute_type"]);
                    (peer["compute_type"].as_str().unwrap_or("?").to_string(), ratios)
                })
                .collect();
            let mut entry = report.clone();
            entry["backend"] = json!(name);
            entry["over_faster_whisper"] = Value::Object(over);
            entry
        })
        .collect();
    let results = json!({
        "machine": machine(),
        "model": "Whisper base: whisper-base-ct2 (CTranslate2, float16 tensors; candle computes in f32), whisper-base-ggml (written from it by scripts/convert-whisper-ggml)",
        "clips": format!("{LIBRIVOX} (5 clips, {audio:.2} s, {words} words)"),
        "hearth": backends,
        "peers": peers,
        "notes": "speed and concurrency: audio seconds per wall second (higher is better); latency and RSS: lower is better. Greedy decoding, English, 2 threads on every side; each backend and peer in its own process.",
    });
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/results/stt.json");
    std::fs::write(&path, serde_json::to_string_pretty(&results).unwrap() + "\n").unwrap();
    println!("wrote {}", path.display());
}

/// Speed, WER, latency, concurrency and peak RSS of one backend, in this process.
async fn measure(models_dir: &Path, keys: &str, clips: &[Clip]) -> Value {
    let state = load(models_dir, keys).await;
    let transcriber = transcriber(&state);
    let audio: f64 = clips.iter().map(|c| c.seconds).sum();
    transcribe(&transcriber, &clips[0].bytes).await; // warm up
    let started = Instant::now();
    let mut errors = 0;
    let mut words = 0;
    for clip in clips {
        let text = transcribe(&transcriber, &clip.bytes).await;
        let reference = normalized_words(&clip.reference);
        errors += word_errors(&reference, &normalized_words(&text));
        words += reference.len();
    }
    let speed = audio / started.elapsed().as_secs_f64();
    let wer = errors as f64 / words as f64;
    println!("  {audio:.2} s of audio: {speed:.2}x real time, WER {wer:.4}");

    let five = clips.iter().find(|c| c.id == FIVE_SECONDS).expect("the 5.3 s clip");
    let mut latencies = Vec::new();
    for _ in 0..3 {
        let started = Instant::now();
        transcribe(&transcriber, &five.bytes).await;
        latencies.push(started.elapsed().as_secs_f64());
    }
    latencies.sort_by(f64::total_cmp);
    let latency = latencies[1];
    println!("  latency, one {:.1} s clip: {latency:.3} s", five.seconds);

    let jobs: Vec<&Clip> = (0..20).map(|i| &clips[i % clips.len()]).collect();
    let started = Instant::now();
    stream::iter(jobs.iter().map(|clip| transcribe(&transcriber, &clip.bytes)))
        .buffer_unordered(4)
        .count()
        .await;
    let concurrent = jobs.iter().map(|c| c.seconds).sum::<f64>() / started.elapsed().as_secs_f64();
    println!("  4 requests in flight: {concurrent:.2}x real time");
    let rss = peak_rss_mib();
    println!("  peak RSS {rss:.0} MiB");
    json!({
        "speed_x_realtime": round(speed, 2),
        "wer": round(wer, 4),
        "latency_5s_s": round(latency, 3),
        "concurrent4_x_realtime": round(concurrent, 2),
        "peak_rss_mib": round(rss, 1),
    })
}

async fn load(models_dir: &Path, keys: &str) -> AppState {
    let toml = format!("models_dir = \"{}\"\n[[models]]\nid = \"whisper\"\n{keys}", models_dir.display());
    let state = AppState::new(Config::parse(&toml, None, &Overrides::default()).unwrap()).unwrap();
    load_models(state.clone()).await;
    state
}

fn transcriber(state: &AppState) -> Arc<Transcriber> {
    match state.registry.get("whisper").map(|e| e.state()) {
        Some(LoadState::Ready(served)) => match &*served {
            Served::Stt(transcriber) => Arc::clone(transcriber),
            _ => panic!("not a speech model"),
        },
        _ => panic!("whisper did not load"),
    }
}

async fn transcribe(transcriber: &Transcriber, bytes: &[u8]) -> String {
    let options = DecodeOptions { language: Some("en".into()), ..DecodeOptions::default() };
    let request =
        TranscribeRequest { audio: bytes.to_vec(), options, priority: Priority::Normal, segments: None };
    transcriber.transcribe(request).await.expect("transcription").text()
}

fn run_peer(folder: &Path, compute: &str) -> Result<Value, String> {
    python_peer("HEARTH_STT_PEER_PYTHON", "stt_faster_whisper.py", &[folder.as_os_str(), compute.as_ref()])
}
