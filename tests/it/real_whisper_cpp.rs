//! whisper.cpp (the `whisper-cpp` feature) on the ggml files `scripts/convert-whisper-ggml` writes
//! from the offline Whisper base tensors (`whisper-base-ggml`: float16 and Q8_0), checked against
//! CTranslate2's own decoding of the same weights (`tests/fixtures/whisper/ct2-reference.json`) and
//! on real speech through the real router, as the candle backend is in `real_whisper.rs`.

use std::path::PathBuf;

use axum::http::StatusCode;
use hearth_backends::whisper::cpp::WhisperCpp;
use hearth_backends::whisper::read_vocab;
use hearth_engine::transcribe::wer::normalized_words as words;

use crate::real_whisper::{
    assert_decodes_ctranslate2s_tokens, assert_librivox_within_faster_whispers_wer, clip, SHORT_CLIP,
};
use crate::support::{app, form, models_root, post_form, App};

fn folder() -> PathBuf {
    let dir = models_root().join("whisper-base-ggml");
    assert!(
        dir.join("ggml-base.bin").is_file(),
        "{} is missing: `scripts/setup` writes it (scripts/convert-whisper-ggml)",
        dir.display()
    );
    dir
}

fn wav(name: &str) -> Vec<u8> {
    std::fs::read(clip(name)).unwrap()
}

/// float16 weights and whisper.cpp's float16 attention: no-speech 0.073 against CTranslate2's 0.078.
#[test]
fn the_f16_ggml_file_decodes_ctranslate2s_greedy_tokens() {
    let mut model = WhisperCpp::load(&folder().join("ggml-base.bin"), 2).unwrap();
    assert_decodes_ctranslate2s_tokens(&mut model, &read_vocab(&folder()).unwrap(), 0.01);
}

/// Q8_0 matrices: no-speech 0.073 against 0.078 on the CPU these tests were written on, 0.066 on a
/// Sapphire Rapids CPU with AVX-512 and AMX (whisper.cpp is built for the building CPU, and ggml's
/// Q8_0 kernels differ by instruction set in how they round); the tokens are CTranslate2's on both.
#[test]
fn the_q8_0_ggml_file_decodes_ctranslate2s_greedy_tokens() {
    let mut model = WhisperCpp::load(&folder().join("ggml-base-q8_0.bin"), 2).unwrap();
    assert_decodes_ctranslate2s_tokens(&mut model, &read_vocab(&folder()).unwrap(), 0.02);
}

async fn whisper_cpp(file: &str) -> App {
    assert!(folder().is_dir());
    // No `backend`: a folder with a ggml file and no model.bin runs on whisper.cpp.
    app(&format!(
        "models_dir = \"{}\"\n[[models]]\nid = \"whisper\"\nkind = \"stt\"\nsource = \"whisper-base-ggml\"\nfile = \"{file}\"\n\
         cpu_threads = 2\nmax_audio_secs = 20\n",
        models_root().display()
    ))
    .await
}

/// The five LibriVox clips on whisper.cpp within the bound the candle backend meets
/// (faster-whisper's WER on the same clips plus one word; measured: equal, 2 of 71 words).
async fn librivox_within_faster_whispers_wer(file: &str) {
    assert_librivox_within_faster_whispers_wer(&whisper_cpp(file).await).await;
}

#[tokio::test]
async fn librivox_clips_on_the_f16_file_transcribe_within_faster_whispers_wer() {
    librivox_within_faster_whispers_wer("ggml-base.bin").await;
}

#[tokio::test]
async fn librivox_clips_on_the_q8_0_file_transcribe_within_faster_whispers_wer() {
    librivox_within_faster_whispers_wer("ggml-base-q8_0.bin").await;
}

/// Segments with their timings and scores, as on the candle backend; word timestamps are refused
/// with a 400 naming the parameter (whisper.cpp does not expose the cross-attention they need).
#[tokio::test]
async fn verbose_json_has_segments_and_word_timestamps_are_refused() {
    let app = whisper_cpp("ggml-base-q8_0.bin").await;
    let bytes = wav(SHORT_CLIP);
    let reply = post_form(
        &app,
        "/v1/audio/transcriptions",
        form(Some(("clip.wav", &bytes)), &[("model", "whisper"), ("response_format", "verbose_json")]),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    assert_eq!(reply.body["language"], "english");
    let segments = reply.body["segments"].as_array().unwrap();
    assert_eq!(segments.len(), 1);
    assert_eq!(words(segments[0]["text"].as_str().unwrap()), words("He was not an ill-disposed young man."));
    let (start, end) = (segments[0]["start"].as_f64().unwrap(), segments[0]["end"].as_f64().unwrap());
    assert!(start < end && end <= reply.body["duration"].as_f64().unwrap() + 0.01, "{start} → {end}");

    let reply = post_form(
        &app,
        "/v1/audio/transcriptions",
        form(
            Some(("clip.wav", &bytes)),
            &[
                ("model", "whisper"),
                ("response_format", "verbose_json"),
                ("timestamp_granularities[]", "word"),
            ],
        ),
    )
    .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.text);
    assert_eq!(reply.body["error"]["param"], "timestamp_granularities");
    assert!(reply.body["error"]["message"].as_str().unwrap().contains("cannot time words"));
}

/// Translation runs on whisper.cpp too (the task token is Hearth's decoding rule).
#[tokio::test]
async fn translations_run_on_whisper_cpp() {
    let app = whisper_cpp("ggml-base-q8_0.bin").await;
    let bytes = wav(SHORT_CLIP);
    let reply =
        post_form(&app, "/v1/audio/translations", form(Some(("clip.wav", &bytes)), &[("model", "whisper")]))
            .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    assert_eq!(words(reply.body["text"].as_str().unwrap()), words("He was not an ill-disposed young man."));
}
