//! `cargo bench --bench stt`: speech to text on the real Whisper base CTranslate2 folder, through
//! Hearth's real path (config, loader, `Transcriber`: decoding and log-mel on the preprocessing
//! pool, the model on its owner thread), on the CPU, beside faster-whisper on the same folder and
//! clips in the same run (`benches/peers/stt_faster_whisper.py`, float32 and int8):
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

async fn bench() {
    let models_dir =
        std::env::var_os("HEARTH_MODELS_DIR").map(PathBuf::from).unwrap_or_else(default_models_dir);
    let folder = models_dir.join(MODEL);
    assert!(folder.join("model.bin").is_file(), "{} is missing: run scripts/fetch-models", folder.display());
    let state = load(&models_dir).await;
    let transcriber = transcriber(&state);
    let clips = clips();
    assert_eq!(clips.len(), 5);
    let audio: f64 = clips.iter().map(|c| c.seconds).sum();

    println!("Hearth, {MODEL}, CPU");
    transcribe(&transcriber, &clips[0].bytes).await; // warm up
    let started = Instant::now();
    let mut errors = 0;
    let mut words = 0;
    for clip in &clips {
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

    let hearth = json!({
        "speed_x_realtime": round(speed, 2),
        "wer": round(wer, 4),
        "latency_5s_s": round(latency, 3),
        "concurrent4_x_realtime": round(concurrent, 2),
        "peak_rss_mib": round(rss, 1),
    });
    let peers: Vec<Value> = ["float32", "int8"]
        .iter()
        .filter_map(|compute| match run_peer(&folder, compute) {
            Ok(report) => {
                let ratio = |key: &str| {
                    let (ours, theirs) = (hearth[key].as_f64()?, report[key].as_f64()?);
                    Some(round(ours / theirs, 3))
                };
                let ratios = json!({
                    "speed": ratio("speed_x_realtime"),
                    "latency_5s": ratio("latency_5s_s"),
                    "concurrent4": ratio("concurrent4_x_realtime"),
                    "peak_rss": ratio("peak_rss_mib"),
                });
                println!("  faster-whisper {compute}: {report}\n    Hearth / peer: {ratios}");
                Some(json!({ "report": report, "hearth_over_peer": ratios }))
            }
            Err(reason) => {
                println!("  peer {compute} skipped: {reason}");
                None
            }
        })
        .collect();
    let results = json!({
        "machine": machine(),
        "model": MODEL,
        "clips": format!("{LIBRIVOX} (5 clips, {audio:.2} s, {words} words)"),
        "hearth": hearth,
        "peers": peers,
        "notes": "speed and concurrency: audio seconds per wall second (higher is better); latency and RSS: lower is better. Greedy decoding, English, 2 threads on both sides.",
    });
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/results/stt.json");
    std::fs::write(&path, serde_json::to_string_pretty(&results).unwrap() + "\n").unwrap();
    println!("wrote {}", path.display());
}

async fn load(models_dir: &Path) -> AppState {
    let toml = format!(
        "models_dir = \"{}\"\n[[models]]\nid = \"whisper\"\npreset = \"whisper-base\"\nsource = \"{MODEL}\"\ndevice = \"cpu\"\n",
        models_dir.display()
    );
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
