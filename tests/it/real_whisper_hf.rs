//! The candle backend on Whisper base in its two other formats, written by
//! `scripts/convert-whisper-hf` from the CTranslate2 folder (`whisper-base-hf`): Transformers'
//! `model.safetensors` (float16, separate query/key/value, the decoding lists in
//! `generation_config.json`) and a Q8_0 GGUF file with Transformers' names and no encoder
//! positions (as candle's quantized Whisper files are). Checked against the CTranslate2 folder's
//! own numbers and CTranslate2's greedy tokens (`tests/fixtures/whisper/ct2-reference.json`).

use std::path::PathBuf;

use hearth_backends::whisper::hf::sinusoids;
use hearth_backends::whisper::{
    load, load_ct2_folder, read_vocab, CandleWhisper, DecoderWeights, EncoderWeights, WhisperWeights,
};
use hearth_backends::ModelsRoot;
use hearth_engine::transcribe::SpeechModel;
use hearth_engine::{DType, Device};

use crate::real_whisper::{
    assert_decodes_ctranslate2s_tokens, assert_librivox_within_faster_whispers_wer,
    assert_word_timestamps_match_faster_whispers, model_dir, reference_window,
};
use crate::support::{app, models_root, App};

fn folder() -> PathBuf {
    let dir = models_root().join("whisper-base-hf");
    assert!(
        dir.join("model.safetensors").is_file(),
        "{} is missing: `scripts/setup` writes it (scripts/convert-whisper-hf)",
        dir.display()
    );
    dir
}

fn load_file(file: Option<&str>, decoder: DecoderWeights) -> CandleWhisper {
    let root = ModelsRoot::new(&models_root()).unwrap();
    let (model, _, loaded) = load(
        &folder(),
        file,
        &root,
        Device::Cpu,
        DType::F32,
        WhisperWeights { encoder: EncoderWeights::Float, decoder },
    )
    .unwrap();
    assert_eq!(
        loaded.format,
        if file.is_some_and(|f| f.ends_with(".gguf")) { "gguf" } else { "safetensors" }
    );
    model
}

/// The float16 safetensors hold the CTranslate2 folder's float16 values under Transformers'
/// names: split back into query, key and value, they rebuild the same fused projections, so the
/// encoder output is the CTranslate2 folder's bit for bit, and the greedy tokens are CTranslate2's.
#[test]
fn transformers_safetensors_reproduce_the_ctranslate2_folder_exactly() {
    let mut model = load_file(None, DecoderWeights::Float);
    let (ct2, _) = load_ct2_folder(&model_dir(), candle_core::Device::Cpu, candle_core::DType::F32).unwrap();
    assert_eq!(model.dims(), ct2.dims());
    let window = reference_window();
    let ours = model.encoder_output(&window).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let theirs = ct2.encoder_output(&window).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert!(ours == theirs, "the encoder outputs differ");
    // And the decoder's logits (self- and cross-attention, both fused projections, the tied
    // output projection) for the start of a transcript.
    let (mut ct2, vocab) = (ct2, read_vocab(&folder()).unwrap());
    let prompt = [vocab.sot, vocab.language_token("en").unwrap(), vocab.transcribe];
    for m in [&mut model as &mut dyn SpeechModel, &mut ct2] {
        m.encode(&window).unwrap();
    }
    let (ours, theirs) = (model.decode(&prompt).unwrap(), ct2.decode(&prompt).unwrap());
    assert_eq!(ours.len(), 51865);
    assert!(ours == theirs, "the decoder's logits differ");
    model.reset();
    assert_decodes_ctranslate2s_tokens(&mut model, &vocab, 1e-3);
}

/// Transformers' `config.json` + `generation_config.json` give the decoding rules the same lists
/// as CTranslate2's `config.json`: suppressed tokens, languages, alignment heads.
#[test]
fn transformers_configs_give_the_ctranslate2_folders_decoding_lists() {
    let (ours, theirs) = (read_vocab(&folder()).unwrap(), read_vocab(&model_dir()).unwrap());
    assert_eq!(ours.suppress, theirs.suppress);
    assert_eq!(ours.suppress_begin, theirs.suppress_begin);
    assert_eq!(ours.languages, theirs.languages);
    assert_eq!(ours.alignment_heads, theirs.alignment_heads);
    assert_eq!(ours.alignment_heads.len(), 8);
}

/// The Q8_0 GGUF file (matrices widened to f32 when loading, the decoder then Q8_0 again as on
/// the CPU by default) decodes CTranslate2's greedy tokens; its encoder positions are computed,
/// and the computed sinusoids are the ones the CTranslate2 folder stores (to float16's rounding).
#[test]
fn the_q8_0_gguf_file_decodes_ctranslate2s_greedy_tokens() {
    let stored = hearth_backends::whisper::ct2::Ct2Model::read(&model_dir().join("model.bin"))
        .unwrap()
        .tensor("encoder/position_encodings/encodings", candle_core::DType::F32, &candle_core::Device::Cpu)
        .unwrap();
    let (length, channels) = stored.dims2().unwrap();
    let stored = stored.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let worst = sinusoids(length, channels).iter().zip(&stored).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(worst <= 2.5e-4, "computed sinusoids differ from the stored ones by {worst}");

    let mut model = load_file(Some("whisper-base-q8_0.gguf"), DecoderWeights::Auto);
    assert!(model.decoder_q8());
    assert_decodes_ctranslate2s_tokens(&mut model, &read_vocab(&folder()).unwrap(), 0.01);
}

async fn whisper(file: Option<&str>) -> App {
    assert!(folder().is_dir());
    let file = file.map(|f| format!("file = \"{f}\"\n")).unwrap_or_default();
    // No `backend`: a folder with safetensors or GGUF weights runs on candle.
    app(&format!(
        "models_dir = \"{}\"\n[[models]]\nid = \"whisper\"\nkind = \"stt\"\nsource = \"whisper-base-hf\"\n{file}\
         device = \"cpu\"\nmax_audio_secs = 20\n",
        models_root().display()
    ))
    .await
}

/// Word timestamps need the alignment heads, which a Transformers folder keeps in
/// `generation_config.json`: the same words within 60 ms of faster-whisper's.
#[tokio::test]
async fn transformers_folder_times_words_as_faster_whisper_does() {
    assert_word_timestamps_match_faster_whispers(&whisper(None).await).await;
}

/// The LibriVox clips on the GGUF file through the router, within faster-whisper's WER plus a word.
#[tokio::test]
async fn librivox_clips_on_the_gguf_file_transcribe_within_faster_whispers_wer() {
    assert_librivox_within_faster_whispers_wer(&whisper(Some("whisper-base-q8_0.gguf")).await).await;
}
