//! Whisper's decoding rules, model-independent (any [`SpeechModel`]): the audio is read in 30 s
//! windows, each advanced by the last complete timestamp the model emitted; every window is
//! decoded at increasing temperatures until its text is neither repetitive (gzip compression
//! ratio) nor improbable (average log-probability); windows the model judges silent are skipped;
//! the previous windows' text conditions the next; the language is detected from the first
//! window when the request names none. The rules and thresholds are OpenAI's reference
//! `transcribe()` (and faster-whisper's, which keeps them).

use hearth_audio::LogMel;

use super::words::{self, Word};
use super::{SpeechModel, WhisperVocab};
use crate::BoxError;

/// Log-mel frames in one window (30 s), and frames per timestamp step (the encoder's stride 2).
pub const WINDOW_FRAMES: usize = 3000;
const FRAMES_PER_TIMESTAMP: usize = 2;
/// Seconds per log-mel frame and per timestamp token.
const FRAME_SECS: f64 = 0.01;
const TIMESTAMP_SECS: f64 = 0.02;
/// The first timestamp may be at most 1 s into the window.
const MAX_INITIAL_TIMESTAMP_STEPS: u32 = 50;
const COMPRESSION_RATIO_THRESHOLD: f64 = 2.4;
const LOGPROB_THRESHOLD: f64 = -1.0;
const NO_SPEECH_THRESHOLD: f64 = 0.6;
/// Above this temperature the previous text no longer conditions the next window.
const PROMPT_RESET_TEMPERATURE: f32 = 0.5;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Task {
    #[default]
    Transcribe,
    /// Any language to English.
    Translate,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DecodeOptions {
    /// ISO 639-1 code; `None` detects it from the first window.
    pub language: Option<String>,
    pub task: Task,
    /// Text that conditions the first window (a glossary, the previous part of a recording).
    pub prompt: Option<String>,
    /// The first temperature; on failure decoding retries at +0.2 steps up to 1.0.
    pub temperature: f32,
    /// Whether previous windows' text conditions the next (OpenAI's default: yes).
    pub condition_on_previous_text: bool,
    /// Seed for sampling at temperatures above 0.
    pub seed: u64,
    /// Align each segment's words to the audio ([`super::words`]).
    pub word_timestamps: bool,
}

impl Default for DecodeOptions {
    fn default() -> Self {
        DecodeOptions {
            language: None,
            task: Task::Transcribe,
            prompt: None,
            temperature: 0.0,
            condition_on_previous_text: true,
            seed: 0,
            word_timestamps: false,
        }
    }
}

/// One decoded stretch of speech, as OpenAI's `verbose_json` reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct Segment {
    pub id: usize,
    /// The window's first frame (10 ms units), as OpenAI's `seek`.
    pub seek: usize,
    pub start: f64,
    pub end: f64,
    pub text: String,
    pub tokens: Vec<u32>,
    pub temperature: f32,
    pub avg_logprob: f64,
    pub compression_ratio: f64,
    pub no_speech_prob: f64,
    /// The segment's words, when word timestamps were asked for.
    pub words: Vec<Word>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Transcript {
    /// The language decoded (ISO 639-1 code).
    pub language: String,
    pub duration_secs: f64,
    pub segments: Vec<Segment>,
}

impl Transcript {
    pub fn text(&self) -> String {
        self.segments.iter().map(|s| s.text.as_str()).collect::<String>().trim().to_string()
    }
}

/// One attempt at a window.
struct Attempt {
    /// Sampled tokens: text and timestamps, without the end of text.
    tokens: Vec<u32>,
    temperature: f32,
    avg_logprob: f64,
    compression_ratio: f64,
    no_speech_prob: f64,
}

/// A small seeded generator for sampling (SplitMix64).
struct SplitMix(u64);

impl SplitMix {
    fn next_f64(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// `len(text) / len(zlib(text))`: repetitive text compresses well.
pub fn compression_ratio(text: &str) -> f64 {
    if text.is_empty() {
        return 0.0;
    }
    let compressed = miniz_oxide::deflate::compress_to_vec_zlib(text.as_bytes(), 9);
    text.len() as f64 / compressed.len().max(1) as f64
}

fn log_softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().map(|&l| (l as f64 - max).exp()).sum();
    let log_sum = max + sum.ln();
    logits.iter().map(|&l| l as f64 - log_sum).collect()
}

fn argmax(values: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in values.iter().enumerate() {
        if v > values[best] {
            best = i;
        }
    }
    best as u32
}

/// Transcribes (or translates) all of `mel`, which holds `content_frames` frames of audio
/// followed by at least a window of padding.
pub fn transcribe(
    model: &mut dyn SpeechModel,
    vocab: &WhisperVocab,
    mel: &LogMel,
    content_frames: usize,
    options: &DecodeOptions,
    cancelled: &dyn Fn() -> bool,
    on_segment: &mut dyn FnMut(&Segment),
) -> Result<Transcript, BoxError> {
    let mut rng = SplitMix(options.seed);
    let n_text_ctx = model.n_text_ctx();
    let mut language_token = match &options.language {
        Some(code) => Some(vocab.language_token(code).ok_or_else(|| format!("unknown language {code}"))?),
        None => None,
    };
    let mut all_tokens: Vec<u32> = match options.prompt.as_deref().map(str::trim) {
        Some(prompt) if !prompt.is_empty() => vocab.encode(&format!(" {prompt}")),
        _ => Vec::new(),
    };
    let mut prompt_reset_since = 0;
    let mut segments = Vec::new();
    let mut seek = 0;
    while seek < content_frames {
        if cancelled() {
            return Err("cancelled".into());
        }
        let segment_frames = WINDOW_FRAMES.min(content_frames - seek);
        let window = window(mel, seek, segment_frames);
        model.encode(&window)?;
        let language = match language_token {
            Some(token) => token,
            None => {
                let detected = detect_language(model, vocab)?;
                language_token = Some(detected);
                detected
            }
        };
        let time_offset = seek as f64 * FRAME_SECS;
        let segment_secs = segment_frames as f64 * FRAME_SECS;
        // The previous text, at most half the context (OpenAI keeps n_text_ctx / 2 - 1 tokens).
        let keep = n_text_ctx / 2 - 1;
        let previous = &all_tokens[prompt_reset_since..];
        let prompt: Vec<u32> = previous[previous.len().saturating_sub(keep)..].to_vec();

        let mut temperature = options.temperature;
        let attempt = loop {
            let tried = decode_window(model, vocab, &prompt, language, options.task, temperature, &mut rng)?;
            let silent = tried.no_speech_prob > NO_SPEECH_THRESHOLD && tried.avg_logprob < LOGPROB_THRESHOLD;
            let failed = tried.compression_ratio > COMPRESSION_RATIO_THRESHOLD
                || tried.avg_logprob < LOGPROB_THRESHOLD;
            if silent || !failed || temperature >= 1.0 - 1e-6 {
                break tried;
            }
            temperature = (temperature + 0.2).min(1.0);
        };
        if attempt.no_speech_prob > NO_SPEECH_THRESHOLD && attempt.avg_logprob < LOGPROB_THRESHOLD {
            seek += segment_frames;
            continue;
        }

        let tokens = &attempt.tokens;
        let window_start = segments.len();
        let is_ts = |t: u32| t >= vocab.timestamp_begin;
        let single_timestamp_ending =
            tokens.len() >= 2 && !is_ts(tokens[tokens.len() - 2]) && is_ts(tokens[tokens.len() - 1]);
        let mut slices: Vec<usize> =
            (1..tokens.len()).filter(|&i| is_ts(tokens[i - 1]) && is_ts(tokens[i])).collect();
        let mut push = |tokens: &[u32], start: f64, end: f64| {
            let text = vocab.text(tokens);
            if text.trim().is_empty() {
                return;
            }
            segments.push(Segment {
                id: segments.len(),
                seek,
                start,
                end: end.max(start),
                text,
                tokens: tokens.to_vec(),
                temperature: attempt.temperature,
                avg_logprob: attempt.avg_logprob,
                compression_ratio: attempt.compression_ratio,
                no_speech_prob: attempt.no_speech_prob,
                words: Vec::new(),
            });
            on_segment(&segments[segments.len() - 1]);
        };
        let ts_secs = |t: u32| f64::from(t - vocab.timestamp_begin) * TIMESTAMP_SECS;
        if !slices.is_empty() {
            if single_timestamp_ending {
                slices.push(tokens.len());
            }
            let mut last = 0;
            for &current in &slices {
                let piece = &tokens[last..current];
                if let (Some(&first), Some(&end)) = (piece.first(), piece.last()) {
                    let start = if is_ts(first) { ts_secs(first) } else { 0.0 };
                    let end = if is_ts(end) { ts_secs(end) } else { segment_secs };
                    push(piece, time_offset + start, time_offset + end);
                }
                last = current;
            }
            if single_timestamp_ending {
                seek += segment_frames;
            } else {
                let last_timestamp = tokens[last - 1];
                let advance = (last_timestamp - vocab.timestamp_begin) as usize * FRAMES_PER_TIMESTAMP;
                // A window always moves forward, even if the model's last timestamp is 0.
                seek += advance.clamp(1, segment_frames);
            }
        } else {
            let mut duration = segment_secs;
            if let Some(&last) = tokens.iter().rev().find(|&&t| is_ts(t)) {
                if last != vocab.timestamp_begin {
                    duration = ts_secs(last);
                }
            }
            push(tokens, time_offset, time_offset + duration);
            seek += segment_frames;
        }
        if options.word_timestamps && segments.len() > window_start {
            let task = match options.task {
                Task::Transcribe => vocab.transcribe,
                Task::Translate => vocab.translate,
            };
            let text: Vec<Vec<u32>> = segments[window_start..]
                .iter()
                .map(|s| s.tokens.iter().copied().filter(|&t| t < vocab.eot).collect())
                .collect();
            let code = vocab.language_code(language).unwrap_or("en").to_string();
            let aligned =
                words::align(model, vocab, language, task, &code, &text, segment_frames, time_offset)?;
            for (segment, words) in segments[window_start..].iter_mut().zip(aligned) {
                segment.words = words;
            }
        }
        all_tokens.extend_from_slice(tokens);
        if !options.condition_on_previous_text || attempt.temperature > PROMPT_RESET_TEMPERATURE {
            prompt_reset_since = all_tokens.len();
        }
    }
    // Segment ends never pass the audio.
    let duration_secs = content_frames as f64 * FRAME_SECS;
    for segment in &mut segments {
        segment.end = segment.end.min(duration_secs);
        segment.start = segment.start.min(segment.end);
        for word in &mut segment.words {
            word.end = word.end.min(duration_secs);
            word.start = word.start.min(word.end);
        }
    }
    let language = language_token.and_then(|t| vocab.language_code(t)).unwrap_or("en").to_string();
    Ok(Transcript { language, duration_secs, segments })
}

/// Frames `seek..seek + frames` of `mel`, zero-padded to a full window (OpenAI's `pad_or_trim`).
fn window(mel: &LogMel, seek: usize, frames: usize) -> Vec<f32> {
    let mut out = mel.window(seek, WINDOW_FRAMES);
    if frames < WINDOW_FRAMES {
        for row in out.chunks_exact_mut(WINDOW_FRAMES) {
            row[frames..].fill(0.0);
        }
    }
    out
}

/// The most probable language token after `<|startoftranscript|>` for the encoded window.
fn detect_language(model: &mut dyn SpeechModel, vocab: &WhisperVocab) -> Result<u32, BoxError> {
    model.reset();
    let logits = model.decode(&[vocab.sot])?;
    let best = vocab
        .languages
        .iter()
        .map(|&(_, id)| id)
        .filter(|&id| (id as usize) < logits.len())
        .max_by(|&a, &b| logits[a as usize].total_cmp(&logits[b as usize]))
        .ok_or("no language token is in the model's vocabulary")?;
    model.reset();
    Ok(best)
}

fn decode_window(
    model: &mut dyn SpeechModel,
    vocab: &WhisperVocab,
    prompt: &[u32],
    language: u32,
    task: Task,
    temperature: f32,
    rng: &mut SplitMix,
) -> Result<Attempt, BoxError> {
    model.reset();
    let mut head: Vec<u32> = Vec::with_capacity(prompt.len() + 2);
    if !prompt.is_empty() {
        head.push(vocab.sot_prev);
        head.extend_from_slice(prompt);
    }
    head.push(vocab.sot);
    let at_sot = model.decode(&head)?;
    let no_speech_prob = match vocab.no_speech {
        Some(id) => log_softmax(&at_sot).get(id as usize).map_or(0.0, |lp| lp.exp()),
        None => 0.0,
    };
    let task_token = match task {
        Task::Transcribe => vocab.transcribe,
        Task::Translate => vocab.translate,
    };
    let mut logits = model.decode(&[language, task_token])?;
    let used = head.len() + 2;
    // OpenAI samples at most half the context per window.
    let sample_len = (model.n_text_ctx() / 2).min(model.n_text_ctx().saturating_sub(used));
    let mut tokens: Vec<u32> = Vec::new();
    let mut sum_logprob = 0.0;
    for _ in 0..sample_len {
        apply_rules(&mut logits, &tokens, vocab);
        let logprobs = log_softmax(&logits);
        let next = if temperature <= 0.0 { argmax(&logits) } else { sample(&logits, temperature, rng) };
        sum_logprob += logprobs[next as usize];
        if next == vocab.eot {
            break;
        }
        tokens.push(next);
        if tokens.len() == sample_len {
            break;
        }
        logits = model.decode(&[next])?;
    }
    let text = vocab.text(&tokens);
    Ok(Attempt {
        avg_logprob: sum_logprob / (tokens.len() + 1) as f64,
        compression_ratio: compression_ratio(&text),
        tokens,
        temperature,
        no_speech_prob,
    })
}

fn sample(logits: &[f32], temperature: f32, rng: &mut SplitMix) -> u32 {
    let scaled: Vec<f32> = logits.iter().map(|&l| l / temperature).collect();
    let probs: Vec<f64> = log_softmax(&scaled).into_iter().map(f64::exp).collect();
    let mut target = rng.next_f64();
    for (i, p) in probs.iter().enumerate() {
        target -= p;
        if target <= 0.0 {
            return i as u32;
        }
    }
    argmax(logits)
}

/// The logit filters OpenAI applies before every sample: suppressed tokens, no blank start, and
/// the timestamp grammar (timestamps in pairs, never decreasing, the first within 1 s, and a
/// timestamp whenever timestamps together are likelier than any text token).
pub fn apply_rules(logits: &mut [f32], sampled: &[u32], vocab: &WhisperVocab) {
    let n = logits.len();
    let ban =
        |from: usize, to: usize, logits: &mut [f32]| logits[from.min(n)..to.min(n)].fill(f32::NEG_INFINITY);
    for &t in &vocab.suppress {
        ban(t as usize, t as usize + 1, logits);
    }
    if sampled.is_empty() {
        for &t in &vocab.suppress_begin {
            ban(t as usize, t as usize + 1, logits);
        }
    }
    let ts = vocab.timestamp_begin as usize;
    let eot = vocab.eot as usize;
    ban(vocab.no_timestamps as usize, vocab.no_timestamps as usize + 1, logits);
    let is_ts = |t: u32| t >= vocab.timestamp_begin;
    let last_was_ts = sampled.last().is_some_and(|&t| is_ts(t));
    let penultimate_was_ts = sampled.len() < 2 || is_ts(sampled[sampled.len() - 2]);
    if last_was_ts {
        if penultimate_was_ts {
            ban(ts, n, logits); // a pair just closed: text (or the end) comes next
        } else {
            ban(0, eot, logits); // an open pair: its closing timestamp (or the end) comes next
        }
    }
    if let Some(&last) = sampled.iter().rev().find(|&&t| is_ts(t)) {
        // Timestamps never go back; after a closed pair they move forward.
        let floor = if last_was_ts && !penultimate_was_ts { last } else { last + 1 };
        ban(ts, floor as usize, logits);
    }
    if sampled.is_empty() {
        ban(0, ts, logits);
        ban(ts + MAX_INITIAL_TIMESTAMP_STEPS as usize + 1, n, logits);
    }
    let logprobs = log_softmax(logits);
    if ts < n {
        let max_ts = logprobs[ts..].iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let timestamp_logprob = if max_ts.is_finite() {
            max_ts + logprobs[ts..].iter().map(|lp| (lp - max_ts).exp()).sum::<f64>().ln()
        } else {
            f64::NEG_INFINITY
        };
        let max_text = logprobs[..ts].iter().copied().fold(f64::NEG_INFINITY, f64::max);
        if timestamp_logprob > max_text {
            ban(0, ts, logits);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transcribe::WhisperConfig;

    // A tiny vocabulary in Whisper's layout: text, then the special tokens, then 1501 timestamps.
    const HELLO: u32 = 0;
    const WORLD: u32 = 1;
    const EOT: u32 = 3;
    const SOT: u32 = 4;
    const EN: u32 = 5;
    const TRANSLATE: u32 = 7;
    const TRANSCRIBE: u32 = 8;
    const NO_SPEECH: u32 = 11;
    const TS: u32 = 13;
    const VOCAB: usize = TS as usize + 1501;

    fn vocab() -> WhisperVocab {
        let specials = [
            "<|endoftext|>",
            "<|startoftranscript|>",
            "<|en|>",
            "<|fr|>",
            "<|translate|>",
            "<|transcribe|>",
            "<|startoflm|>",
            "<|startofprev|>",
            "<|nospeech|>",
            "<|notimestamps|>",
            "<|0.00|>",
        ];
        let mut vocab = serde_json::json!({ "hello": 0, "world": 1, "[UNK]": 2 });
        let mut added = Vec::new();
        for (i, name) in specials.iter().enumerate() {
            vocab[*name] = (i + 3).into();
            added.push(
                serde_json::json!({ "id": i + 3, "content": name, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true }),
            );
        }
        let json = serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": added, "normalizer": null,
            "pre_tokenizer": { "type": "Whitespace" }, "post_processor": null,
            "decoder": { "type": "WordPiece", "prefix": "##", "cleanup": false },
            "model": { "type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]" }
        });
        let tokenizer = tokenizers::Tokenizer::from_bytes(json.to_string().as_bytes()).unwrap();
        let config = WhisperConfig { lang_ids: vec![5, 6], ..WhisperConfig::default() };
        WhisperVocab::new(tokenizer, &config).unwrap()
    }

    /// A mock speech model (no weights can run in a unit test): after `<|startoftranscript|>` it
    /// favours `<|nospeech|>` when `silent`, and then has no favourite at all (a model unsure of
    /// any text); otherwise after the task token it favours each token of `script` in turn, then
    /// the end of text. Every other logit is flat.
    struct ScriptedModel {
        script: Vec<u32>,
        silent: bool,
        context: Vec<u32>,
        windows: usize,
    }

    impl ScriptedModel {
        fn new(script: Vec<u32>) -> Self {
            ScriptedModel { script, silent: false, context: Vec::new(), windows: 0 }
        }
    }

    impl SpeechModel for ScriptedModel {
        fn n_mels(&self) -> usize {
            80
        }
        fn n_text_ctx(&self) -> usize {
            448
        }
        fn encode(&mut self, mel: &[f32]) -> Result<(), BoxError> {
            assert_eq!(mel.len(), 80 * WINDOW_FRAMES);
            self.windows += 1;
            self.context.clear();
            Ok(())
        }
        fn reset(&mut self) {
            self.context.clear();
        }
        fn decode(&mut self, tokens: &[u32]) -> Result<Vec<f32>, BoxError> {
            self.context.extend_from_slice(tokens);
            let mut logits = vec![-10.0; VOCAB];
            if self.context.last() == Some(&SOT) {
                logits[EN as usize] = 5.0;
                if self.silent {
                    logits[NO_SPEECH as usize] = 10.0;
                }
                return Ok(logits);
            }
            if self.silent {
                return Ok(logits);
            }
            let task =
                self.context.iter().rposition(|&t| t == TRANSCRIBE || t == TRANSLATE).expect("a task token");
            let next = self.script.get(self.context.len() - task - 1).copied().unwrap_or(EOT);
            logits[next as usize] = 10.0;
            Ok(logits)
        }
    }

    fn mel(seconds: usize) -> (LogMel, usize) {
        let frames = seconds * 100;
        let n_frames = frames + WINDOW_FRAMES;
        (LogMel { n_mels: 80, n_frames, data: vec![0.0; 80 * n_frames] }, frames)
    }

    fn run(model: &mut ScriptedModel, seconds: usize, options: &DecodeOptions) -> Transcript {
        let (mel, frames) = mel(seconds);
        transcribe(model, &vocab(), &mel, frames, options, &|| false, &mut |_| {}).unwrap()
    }

    fn spans(transcript: &Transcript) -> Vec<(f64, f64, String)> {
        transcript.segments.iter().map(|s| (s.start, s.end, s.text.trim().to_string())).collect()
    }

    #[test]
    fn timestamp_pairs_split_segments_and_a_single_ending_timestamp_ends_the_window() {
        let mut model = ScriptedModel::new(vec![TS, HELLO, TS + 50, TS + 50, WORLD, TS + 100]);
        let transcript = run(&mut model, 3, &DecodeOptions::default());
        assert_eq!(transcript.language, "en", "detected from the first window");
        assert_eq!(spans(&transcript), [(0.0, 1.0, "hello".into()), (1.0, 2.0, "world".into())]);
        assert_eq!(model.windows, 1);
    }

    #[test]
    fn windows_advance_by_the_last_complete_timestamp() {
        // Each 30 s window ends with a closed pair at 20 s, so the next window starts there.
        let mut model = ScriptedModel::new(vec![TS, HELLO, TS + 500, TS + 500, WORLD, TS + 1000, TS + 1000]);
        let options = DecodeOptions { language: Some("en".into()), ..DecodeOptions::default() };
        let transcript = run(&mut model, 40, &options);
        let expected = [(0.0, 10.0), (10.0, 20.0), (20.0, 30.0), (30.0, 40.0)];
        let got: Vec<(f64, f64)> = spans(&transcript).iter().map(|s| (s.0, s.1)).collect();
        assert_eq!(got, expected);
        assert_eq!(model.windows, 2);
        assert_eq!(transcript.segments.iter().map(|s| s.seek).collect::<Vec<_>>(), [0, 0, 2000, 2000]);
    }

    #[test]
    fn a_window_the_model_judges_silent_is_skipped() {
        let mut model = ScriptedModel { silent: true, ..ScriptedModel::new(vec![TS, HELLO, TS + 50]) };
        let transcript = run(&mut model, 5, &DecodeOptions::default());
        assert!(transcript.segments.is_empty(), "{:?}", spans(&transcript));
    }

    #[test]
    fn repetitive_text_falls_back_to_higher_temperatures() {
        let mut script = vec![TS];
        script.extend(std::iter::repeat_n(HELLO, 120));
        script.push(TS + 100);
        let mut model = ScriptedModel::new(script);
        let transcript = run(&mut model, 3, &DecodeOptions::default());
        let segment = &transcript.segments[0];
        assert!(segment.compression_ratio > COMPRESSION_RATIO_THRESHOLD);
        assert_eq!(segment.temperature, 1.0, "every temperature up to 1.0 was tried");
        let plain =
            run(&mut ScriptedModel::new(vec![TS, HELLO, WORLD, TS + 100]), 3, &DecodeOptions::default());
        assert_eq!(plain.segments[0].temperature, 0.0);
    }

    #[test]
    fn the_timestamp_grammar_is_enforced() {
        let vocab = vocab();
        let allowed = |sampled: &[u32]| {
            let mut logits = vec![0.0f32; VOCAB];
            apply_rules(&mut logits, sampled, &vocab);
            (0..VOCAB as u32).filter(|&t| logits[t as usize].is_finite()).collect::<Vec<_>>()
        };
        // First: a timestamp within the first second (0.00 to 1.00).
        assert_eq!(allowed(&[]), (TS..=TS + 50).collect::<Vec<_>>());
        // Inside a segment: a later timestamp than its opening one; text too, unless timestamps
        // together are likelier than any text token (here, with flat logits, they are).
        let open = allowed(&[TS + 10, HELLO]);
        assert!(open.contains(&(TS + 11)) && !open.contains(&(TS + 10)) && !open.contains(&HELLO));
        let mut text_likely = vec![0.0f32; VOCAB];
        text_likely[HELLO as usize] = 20.0;
        apply_rules(&mut text_likely, &[TS + 10, HELLO], &vocab);
        assert!(text_likely[HELLO as usize].is_finite());
        // After one timestamp closing a segment: the pair's second timestamp or the end, no text.
        let closing = allowed(&[TS + 10, HELLO, TS + 20]);
        assert!(!closing.contains(&HELLO), "text after one timestamp of an open pair is banned");
        assert!(closing.contains(&(TS + 20)) && !closing.contains(&(TS + 19)));
        // After a closed pair: no timestamp at all, and special tokens are never sampled.
        let closed = allowed(&[TS, HELLO, TS + 20, TS + 20]);
        assert!(closed.iter().all(|&t| t < TS) && closed.contains(&HELLO) && !closed.contains(&SOT));
    }

    #[test]
    fn compression_ratio_flags_repetition() {
        assert!(
            compression_ratio(&"the same words again and again ".repeat(20)) > COMPRESSION_RATIO_THRESHOLD
        );
        let sentence =
            "He was not an ill-disposed young man, unless to be rather cold hearted is to be ill disposed.";
        assert!(compression_ratio(sentence) < COMPRESSION_RATIO_THRESHOLD);
    }
}
