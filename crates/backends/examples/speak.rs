//! Speaks a text with a Piper voice and writes a 16-bit WAV; prints each sentence's phoneme ids
//! and the time it took (for profiling against piper-tts).
//!
//!   cargo run --release -p hearth-backends --features onnx,espeak --example speak -- \
//!     VOICE_DIR LIBONNXRUNTIME "Text to speak." [out.wav] [noise]
//!
//! `noise` 0 turns both noise scales off (piper-tts's deterministic output).

use std::time::Instant;

use hearth_backends::piper::{PiperOptions, PiperVoices};
use hearth_engine::synthesize::SpeechSynthesizer;
use hearth_engine::Device;

fn main() -> Result<(), hearth_engine::BoxError> {
    let args: Vec<String> = std::env::args().collect();
    let [_, dir, library, text, rest @ ..] = args.as_slice() else {
        return Err("usage: speak VOICE_DIR LIBONNXRUNTIME TEXT [out.wav] [noise]".into());
    };
    let options = PiperOptions {
        device: Device::Cpu,
        onnxruntime: library.into(),
        folders: vec![dir.into()],
        threads: None,
        noise_scale: rest.get(1).is_some_and(|n| n == "0").then_some(0.0),
        noise_w: rest.get(1).is_some_and(|n| n == "0").then_some(0.0),
    };
    let started = Instant::now();
    let mut voices = PiperVoices::load(options)?;
    let voice = voices.voices()[0].clone();
    eprintln!("loaded {} in {:.2} s", voice.id, started.elapsed().as_secs_f64());
    let mut samples = Vec::new();
    for ids in voices.sentences(&voice.id, text)? {
        let t = Instant::now();
        let audio = voices.render(&voice.id, &ids, 1.0)?;
        let rendered = t.elapsed().as_secs_f64();
        let r = Instant::now();
        let _ = hearth_audio::resample(&audio, voice.sample_rate_hz, 24_000)?;
        eprintln!("render {rendered:.4} s, resample to 24 kHz {:.4} s", r.elapsed().as_secs_f64());
        println!("{ids:?}");
        eprintln!(
            "{} ids -> {:.2} s of audio in {:.3} s",
            ids.len(),
            audio.len() as f64 / f64::from(voice.sample_rate_hz),
            t.elapsed().as_secs_f64()
        );
        samples.extend(audio);
    }
    if let Some(out) = rest.first() {
        let mut encoder =
            hearth_audio::Encoder::new(hearth_audio::AudioFormat::Wav, voice.sample_rate_hz, false)?;
        encoder.push(&samples)?;
        std::fs::write(out, encoder.finish()?)?;
    }
    Ok(())
}
