//! `cargo bench --bench tts --features tts`: text to speech on the real Piper voice
//! en_US-joe-medium through Hearth's real path (config, loader, `Synthesizer` on its owner thread,
//! the router: resampling to 24 kHz and encoding included), on the CPU, beside piper-tts on the same
//! voice and text in the same run (`benches/peers/tts_piper.py`):
//!
//! 1. speed as a multiple of real time for a 3-sentence text (median of 15), as raw `pcm`;
//! 2. time to the first audio byte of that text, streamed (median of 15) — piper-tts's is the time
//!    to its first sentence;
//! 3. throughput (audio seconds per second) with 4 requests in flight, 12 requests;
//! 4. peak RSS.
//!
//! Results go to `benches/results/tts.json`. Environment: `HEARTH_MODELS_DIR` (default
//! `~/.cache/hearth/models`), `ORT_DYLIB_PATH` (default `~/.cache/hearth/lib/libonnxruntime.so`),
//! `HEARTH_TTS_PEER_PYTHON` (default `~/.cache/hearth/venv/bin/python`, which has piper-tts).

mod common;

use std::path::{Path, PathBuf};
use std::time::Instant;

use axum::body::Body;
use axum::http::{header, Method, Request};
use axum::Router;
use futures::stream::{self, StreamExt};
use hearth::config::{default_models_dir, default_onnxruntime_library, Config, Overrides};
use hearth::server::load_models;
use hearth::state::AppState;
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tower::ServiceExt;

use common::{machine, peak_rss_mib, python_peer, round};

const FOLDER: &str = "piper-joe-medium";
const TEXT: &str = "The backup job finished at half past two. All twelve snapshots were verified. \
                    The next run is scheduled for tomorrow night.";

fn main() {
    common::run(bench());
}

/// One request: (seconds to the first body byte, seconds to the last, seconds of audio).
async fn speak(router: &Router) -> (f64, f64, f64) {
    let body = json!({"model": "joe", "input": TEXT, "voice": "alloy", "response_format": "pcm"});
    let request = Request::builder()
        .method(Method::POST)
        .uri("/v1/audio/speech")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_string()))
        .unwrap();
    let started = Instant::now();
    let response = router.clone().oneshot(request).await.unwrap();
    assert!(response.status().is_success(), "{}", response.status());
    let mut body = response.into_body();
    let (mut first, mut bytes) = (None, 0usize);
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            first.get_or_insert_with(|| started.elapsed().as_secs_f64());
            bytes += data.len();
        }
    }
    (first.unwrap_or_default(), started.elapsed().as_secs_f64(), bytes as f64 / 2.0 / 24_000.0)
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

async fn bench() {
    let models_dir =
        std::env::var_os("HEARTH_MODELS_DIR").map(PathBuf::from).unwrap_or_else(default_models_dir);
    let voice = models_dir.join(FOLDER).join("en_US-joe-medium.onnx");
    assert!(voice.is_file(), "{} is missing: run scripts/fetch-models", voice.display());
    let library =
        std::env::var_os("ORT_DYLIB_PATH").map(PathBuf::from).unwrap_or_else(default_onnxruntime_library);
    let toml = format!(
        "models_dir = \"{}\"\n[server]\nonnxruntime_library = \"{}\"\n[[models]]\nid = \"joe\"\npreset = \"piper-en-us-joe-medium\"\nsource = \"{FOLDER}\"\ndevice = \"cpu\"\nmax_concurrent_requests = 8\n",
        models_dir.display(),
        library.display()
    );
    let state = AppState::new(Config::parse(&toml, None, &Overrides::default()).unwrap()).unwrap();
    load_models(state.clone()).await;
    let router = hearth::http::router(state);

    println!("Hearth, {FOLDER}, CPU");
    speak(&router).await; // warm up
    let mut runs = Vec::new();
    for _ in 0..15 {
        runs.push(speak(&router).await);
    }
    let speed = median(runs.iter().map(|(_, total, audio)| audio / total).collect());
    let first = median(runs.iter().map(|(first, _, _)| *first).collect());
    println!("  3 sentences: {speed:.2}x real time, first audio after {first:.4} s");
    let started = Instant::now();
    let audio: f64 = stream::iter((0..12).map(|_| speak(&router)))
        .buffer_unordered(4)
        .map(|(_, _, a)| a)
        .collect::<Vec<_>>()
        .await
        .iter()
        .sum();
    let concurrent = audio / started.elapsed().as_secs_f64();
    println!("  4 requests in flight: {concurrent:.2}x real time");
    let rss = peak_rss_mib();
    println!("  peak RSS {rss:.0} MiB");

    let hearth = json!({
        "speed_x_realtime": round(speed, 2),
        "first_audio_s": round(first, 4),
        "concurrent4_x_realtime": round(concurrent, 2),
        "peak_rss_mib": round(rss, 1),
    });
    let peer = match run_peer(&voice) {
        Ok(report) => {
            let ratio = |key: &str| {
                let (ours, theirs) = (hearth[key].as_f64()?, report[key].as_f64()?);
                Some(round(ours / theirs, 3))
            };
            let ratios = json!({
                "speed": ratio("speed_x_realtime"),
                "first_audio": ratio("first_audio_s"),
                "concurrent4": ratio("concurrent4_x_realtime"),
                "peak_rss": ratio("peak_rss_mib"),
            });
            println!("  piper-tts: {report}\n    Hearth / peer: {ratios}");
            json!({ "report": report, "hearth_over_peer": ratios })
        }
        Err(reason) => {
            println!("  peer skipped: {reason}");
            Value::Null
        }
    };
    let results = json!({
        "machine": machine(),
        "voice": "en_US-joe-medium (22050 Hz)",
        "text": TEXT,
        "hearth": hearth,
        "peer": peer,
        "notes": "speed and concurrency: audio seconds per wall second (higher is better); first audio and RSS: lower is better. Both on ONNX Runtime's default CPU threads, the voice's own noise scales. Hearth's numbers include resampling to 24 kHz and the HTTP router; piper-tts's are its Python API at 22050 Hz.",
    });
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/results/tts.json");
    std::fs::write(&path, serde_json::to_string_pretty(&results).unwrap() + "\n").unwrap();
    println!("wrote {}", path.display());
}

fn run_peer(voice: &Path) -> Result<Value, String> {
    python_peer("HEARTH_TTS_PEER_PYTHON", "tts_piper.py", &[voice.as_os_str()])
}
