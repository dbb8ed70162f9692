//! Transcribes audio files with a CTranslate2 Whisper folder and prints each transcript with its
//! speed as a multiple of real time: `cargo run --release -p hearth-backends --example transcribe
//! -- MODEL_DIR FILE...` (for `perf` and quick checks; benches/stt.rs measures against peers).
//! With `--features whisper-cpp`, a MODEL that is a ggml file (`…/ggml-base.bin`, with the
//! folder's `tokenizer.json` and `config.json`) runs on whisper.cpp instead.

use std::time::Instant;

use candle_core::{DType, Device};
use hearth_audio::mel::MelSpectrogram;
use hearth_audio::{decode_to_rate, DecodeLimits, MelConfig, WHISPER_SAMPLE_RATE_HZ};
use hearth_backends::whisper::load_ct2_folder;
use hearth_engine::transcribe::decoding::{transcribe, DecodeOptions};
use hearth_engine::transcribe::{SpeechModel, WhisperVocab};

type Error = Box<dyn std::error::Error + Send + Sync>;

fn main() -> Result<(), Error> {
    let mut args = std::env::args().skip(1);
    let dir = args.next().ok_or("usage: transcribe MODEL_DIR FILE...")?;
    let files: Vec<String> = args.collect();
    #[cfg(feature = "whisper-cpp")]
    if dir.ends_with(".bin") {
        let path = std::path::Path::new(&dir);
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let model = hearth_backends::whisper::cpp::WhisperCpp::load(path, threads)?;
        let vocab = hearth_backends::whisper::read_vocab(path.parent().ok_or("a ggml file in a folder")?)?;
        return run(model, &vocab, &files);
    }
    let (mut model, vocab) = load_ct2_folder(dir.as_ref(), Device::Cpu, DType::F32)?;
    // HEARTH_WHISPER_DECODER=f32 keeps the decoder's float weights (the default is Q8_0, as served).
    if std::env::var("HEARTH_WHISPER_DECODER").as_deref() != Ok("f32") {
        model.quantize_decoder()?;
    }
    // HEARTH_WHISPER_ENCODER=float keeps the encoder's float weights (the default is int8 where
    // the CPU has AVX-512 VNNI, as served).
    if std::env::var("HEARTH_WHISPER_ENCODER").as_deref() != Ok("float") {
        println!("int8 encoder: {}", model.quantize_encoder()?);
    }
    run(model, &vocab, &files)
}

fn run(mut model: impl SpeechModel, vocab: &WhisperVocab, files: &[String]) -> Result<(), Error> {
    let mel = MelSpectrogram::new(MelConfig::whisper(model.n_mels()));
    let options = DecodeOptions { language: Some("en".into()), ..DecodeOptions::default() };
    // The two costs, apart: one encoder window, and one decoder token (after 3 prompt tokens).
    let window = vec![0.0f32; model.n_mels() * 3000];
    let mut encode = f64::INFINITY;
    for _ in 0..3 {
        let started = Instant::now();
        model.encode(&window)?;
        encode = encode.min(started.elapsed().as_secs_f64());
    }
    model.decode(&[vocab.sot, vocab.transcribe, vocab.no_timestamps])?;
    // HEARTH_DECODE_TOKENS: more tokens, to profile the decoder alone.
    let tokens: usize = std::env::var("HEARTH_DECODE_TOKENS").ok().and_then(|n| n.parse().ok()).unwrap_or(32);
    let started = Instant::now();
    for _ in 0..tokens.min(400) {
        model.decode(&[vocab.eot - 1])?;
    }
    let per_token = started.elapsed().as_secs_f64() / tokens.min(400) as f64;
    println!("encoder: {:.3} s per window (best of 3); decoder: {:.2} ms per token", encode, per_token * 1e3);
    for file in files {
        let started = Instant::now();
        let audio = decode_to_rate(&std::fs::read(file)?, &DecodeLimits::default(), WHISPER_SAMPLE_RATE_HZ)?;
        let features = mel.log_mel(&audio.samples, 480_000);
        let content_frames = audio.samples.len() / 160;
        let transcript =
            transcribe(&mut model, vocab, &features, content_frames, &options, &|| false, &mut |_| {})?;
        let secs = started.elapsed().as_secs_f64();
        println!(
            "{file}: {:.2}x real time ({:.2} s for {:.2} s)\n  {}",
            audio.duration_secs() / secs,
            secs,
            audio.duration_secs(),
            transcript.text()
        );
        for s in &transcript.segments {
            println!(
                "  [{:.2} → {:.2}] {} (avg_logprob {:.3}, no_speech {:.3}, t {})",
                s.start, s.end, s.text, s.avg_logprob, s.no_speech_prob, s.temperature
            );
        }
    }
    Ok(())
}
