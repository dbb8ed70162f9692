//! Word timestamps, as OpenAI's reference `add_word_timestamps` computes them: the decoder reads a
//! window's text again, the cross-attention of the model's alignment heads (soft-max over the
//! window's audio, standardised per frame, median-filtered over time, averaged over heads) gives a
//! token × frame similarity, dynamic time warping finds the monotonic path through it, and each
//! word starts where the path reaches its first token and ends where it reaches the next word's.

use super::{SpeechModel, WhisperVocab};
use crate::BoxError;

/// Audio positions per second (the encoder's stride: 20 ms).
const POSITIONS_PER_SECOND: f64 = 50.0;
const MEDIAN_FILTER_WIDTH: usize = 7;
/// Punctuation merged into the next word (opening marks) or the previous one (closing marks).
const PREPENDED: &str = "\"'“¿([{-";
const APPENDED: &str = "\"'.。,，!！?？:：”)]}、";
const SENTENCE_ENDS: &str = ".。!！?？";
/// Languages written without spaces: every character sequence that decodes whole is a word.
const UNSPACED: &[&str] = &["zh", "ja", "th", "lo", "my", "yue"];

/// One word and when it is said, in seconds from the start of the audio.
#[derive(Debug, Clone, PartialEq)]
pub struct Word {
    pub word: String,
    pub start: f64,
    pub end: f64,
}

/// A word's text and tokens while the punctuation is merged.
struct Timing {
    word: String,
    tokens: usize,
    start: f64,
    end: f64,
}

/// The (layer, head) pairs to align with: the model's own list, else every head of the upper half
/// of the decoder (OpenAI's default).
pub fn alignment_heads(model: &dyn SpeechModel, vocab: &WhisperVocab) -> Vec<(usize, usize)> {
    if !vocab.alignment_heads.is_empty() {
        return vocab.alignment_heads.clone();
    }
    let (layers, heads) = model.text_layers();
    (layers / 2..layers).flat_map(|l| (0..heads).map(move |h| (l, h))).collect()
}

/// Words of each segment of one encoded window. `segment_tokens` are the segments' text tokens
/// (no timestamps); `frames` the window's log-mel frames of audio; `offset` its start in seconds.
#[allow(clippy::too_many_arguments, reason = "one window's whole context, as the decoding loop holds it")]
pub fn align(
    model: &mut dyn SpeechModel,
    vocab: &WhisperVocab,
    language: u32,
    task: u32,
    language_code: &str,
    segment_tokens: &[Vec<u32>],
    frames: usize,
    offset: f64,
) -> Result<Vec<Vec<Word>>, BoxError> {
    let text: Vec<u32> = segment_tokens.iter().flatten().copied().collect();
    if text.is_empty() {
        return Ok(vec![Vec::new(); segment_tokens.len()]);
    }
    let sot_sequence = [vocab.sot, language, task];
    let mut tokens = sot_sequence.to_vec();
    tokens.push(vocab.no_timestamps);
    tokens.extend_from_slice(&text);
    tokens.push(vocab.eot);
    let heads = alignment_heads(model, vocab);
    let scores = model.cross_attention(&tokens, &heads)?;
    let n_tokens = tokens.len();
    let positions = scores.first().map_or(0, |s| s.len() / n_tokens);
    let n = (frames / 2).clamp(1, positions.max(1));
    let mut matrix = vec![0f64; n_tokens * n];
    for head in &scores {
        let mut weights = vec![0f64; n_tokens * n];
        for (row, out) in head.chunks_exact(positions).zip(weights.chunks_exact_mut(n)) {
            softmax_into(&row[..n], out);
        }
        standardize_columns(&mut weights, n_tokens, n);
        for row in weights.chunks_exact_mut(n) {
            median_filter(row, MEDIAN_FILTER_WIDTH);
        }
        matrix.iter_mut().zip(&weights).for_each(|(m, w)| *m += w / scores.len() as f64);
    }
    // Rows of the no-timestamps token and the text, not the start sequence or the end.
    let rows = &matrix[sot_sequence.len() * n..(n_tokens - 1) * n];
    let cost: Vec<f64> = rows.iter().map(|x| -x).collect();
    let (text_indices, time_indices) = dtw(&cost, rows.len() / n, n);
    // The path's time at each row it reaches first.
    let mut jump_times = Vec::new();
    for (k, (&i, &t)) in text_indices.iter().zip(&time_indices).enumerate() {
        if k == 0 || i != text_indices[k - 1] {
            jump_times.push(t as f64 / POSITIONS_PER_SECOND);
        }
    }
    let words = split_words(vocab, &text, language_code);
    let mut timings = Vec::with_capacity(words.len());
    let mut boundary = 0;
    for (word, count) in words {
        let start = jump_times.get(boundary).copied().unwrap_or(0.0);
        let end = jump_times.get(boundary + count).copied().unwrap_or(start);
        timings.push(Timing { word, tokens: count, start, end });
        boundary += count;
    }
    shorten_long_words(&mut timings);
    merge_punctuation(&mut timings);

    let mut result = Vec::with_capacity(segment_tokens.len());
    let mut next = 0;
    for tokens in segment_tokens {
        let mut saved = 0;
        let mut words = Vec::new();
        while next < timings.len() && saved < tokens.len() {
            let timing = &timings[next];
            if !timing.word.is_empty() {
                words.push(Word {
                    word: timing.word.clone(),
                    start: round2(offset + timing.start),
                    end: round2(offset + timing.end),
                });
            }
            saved += timing.tokens;
            next += 1;
        }
        result.push(words);
    }
    Ok(result)
}

fn round2(secs: f64) -> f64 {
    (secs * 100.0).round() / 100.0
}

fn softmax_into(scores: &[f32], out: &mut [f64]) {
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let mut sum = 0.0;
    for (o, &s) in out.iter_mut().zip(scores) {
        *o = (s as f64 - max).exp();
        sum += *o;
    }
    out.iter_mut().for_each(|o| *o /= sum);
}

/// Each frame's column standardised over the tokens (population standard deviation).
fn standardize_columns(weights: &mut [f64], rows: usize, cols: usize) {
    for c in 0..cols {
        let mean = (0..rows).map(|r| weights[r * cols + c]).sum::<f64>() / rows as f64;
        let var = (0..rows).map(|r| (weights[r * cols + c] - mean).powi(2)).sum::<f64>() / rows as f64;
        let std = var.sqrt().max(1e-12);
        (0..rows).for_each(|r| weights[r * cols + c] = (weights[r * cols + c] - mean) / std);
    }
}

/// A running median of `width` values with reflected edges (left as is when shorter than half).
fn median_filter(row: &mut [f64], width: usize) {
    let pad = width / 2;
    let n = row.len();
    if n <= pad {
        return;
    }
    let reflect = |i: isize| -> f64 {
        let j = if i < 0 {
            -i
        } else if i as usize >= n {
            2 * (n as isize - 1) - i
        } else {
            i
        };
        row[j.clamp(0, n as isize - 1) as usize]
    };
    let filtered: Vec<f64> = (0..n as isize)
        .map(|i| {
            let mut window: Vec<f64> = (i - pad as isize..=i + pad as isize).map(reflect).collect();
            window.sort_by(f64::total_cmp);
            window[pad]
        })
        .collect();
    row.copy_from_slice(&filtered);
}

/// The cheapest monotonic path through `cost` (`rows × cols`) from its first cell to its last,
/// moving down, right or diagonally (ties: diagonal, then down, then right, as OpenAI's); the
/// (row, column) of each step.
pub fn dtw(cost: &[f64], rows: usize, cols: usize) -> (Vec<usize>, Vec<usize>) {
    let w = cols + 1;
    let mut total = vec![f64::INFINITY; (rows + 1) * w];
    let mut trace = vec![0u8; (rows + 1) * w];
    total[0] = 0.0;
    for j in 1..=cols {
        for i in 1..=rows {
            let (c0, c1, c2) = (total[(i - 1) * w + j - 1], total[(i - 1) * w + j], total[i * w + j - 1]);
            let (best, step) = if c0 < c1 && c0 < c2 {
                (c0, 0)
            } else if c1 < c0 && c1 < c2 {
                (c1, 1)
            } else {
                (c2, 2)
            };
            total[i * w + j] = cost[(i - 1) * cols + j - 1] + best;
            trace[i * w + j] = step;
        }
    }
    (0..w).for_each(|j| trace[j] = 2);
    (0..=rows).for_each(|i| trace[i * w] = 1);
    let (mut i, mut j) = (rows, cols);
    let mut path = Vec::new();
    while i > 0 || j > 0 {
        path.push((i.saturating_sub(1), j.saturating_sub(1)));
        match trace[i * w + j] {
            0 => {
                i -= 1;
                j -= 1;
            }
            1 => i -= 1,
            _ => j -= 1,
        }
    }
    path.reverse();
    path.into_iter().unzip()
}

/// Groups of tokens that decode to whole characters, with their text.
fn unicode_pieces(vocab: &WhisperVocab, tokens: &[u32]) -> Vec<(String, usize)> {
    let mut pieces = Vec::new();
    let mut current = Vec::new();
    for &t in tokens {
        current.push(t);
        let text = vocab.tokenizer.decode(&current, false).unwrap_or_default();
        if !text.contains('\u{fffd}') {
            pieces.push((text, current.len()));
            current.clear();
        }
    }
    if !current.is_empty() {
        pieces.push((vocab.tokenizer.decode(&current, false).unwrap_or_default(), current.len()));
    }
    pieces
}

/// Words as (text with its leading space, token count): a new word at a space, at punctuation,
/// and (languages without spaces) at every whole character.
fn split_words(vocab: &WhisperVocab, tokens: &[u32], language: &str) -> Vec<(String, usize)> {
    let pieces = unicode_pieces(vocab, tokens);
    if UNSPACED.contains(&language) {
        return pieces;
    }
    let mut words: Vec<(String, usize)> = Vec::new();
    for (piece, count) in pieces {
        let trimmed = piece.trim();
        let punctuation = trimmed.chars().all(|c| c.is_ascii_punctuation());
        match words.last_mut() {
            Some(last) if !piece.starts_with(' ') && !punctuation => {
                last.0.push_str(&piece);
                last.1 += count;
            }
            _ => words.push((piece, count)),
        }
    }
    words
}

/// OpenAI's guard against words the alignment stretched over a pause: longer than twice the
/// median word (at most 0.7 s), next to a sentence end, they are cut to that length.
fn shorten_long_words(timings: &mut [Timing]) {
    let mut durations: Vec<f64> = timings.iter().map(|t| t.end - t.start).filter(|&d| d > 0.0).collect();
    if durations.is_empty() {
        return;
    }
    durations.sort_by(f64::total_cmp);
    let median = if durations.len() % 2 == 1 {
        durations[durations.len() / 2]
    } else {
        (durations[durations.len() / 2 - 1] + durations[durations.len() / 2]) / 2.0
    };
    let max = median.min(0.7) * 2.0;
    let is_end = |w: &str| !w.is_empty() && SENTENCE_ENDS.contains(w);
    for i in 1..timings.len() {
        if timings[i].end - timings[i].start > max {
            if is_end(&timings[i].word) {
                timings[i].end = timings[i].start + max;
            } else if is_end(&timings[i - 1].word) {
                timings[i].start = timings[i].end - max;
            }
        }
    }
}

/// Opening punctuation joins the next word, closing punctuation the previous one.
fn merge_punctuation(timings: &mut [Timing]) {
    let n = timings.len();
    if n < 2 {
        return;
    }
    let (mut i, mut j) = (n as isize - 2, n - 1);
    while i >= 0 {
        let k = i as usize;
        let word = &timings[k].word;
        if word.starts_with(' ') && PREPENDED.contains(word.trim()) {
            let (word, tokens) =
                (std::mem::take(&mut timings[k].word), std::mem::take(&mut timings[k].tokens));
            timings[j].word = word + &timings[j].word;
            timings[j].tokens += tokens;
        } else {
            j = k;
        }
        i -= 1;
    }
    let (mut i, mut j) = (0, 1);
    while j < n {
        let following = timings[j].word.clone();
        if !timings[i].word.ends_with(' ') && !following.is_empty() && APPENDED.contains(following.as_str()) {
            timings[i].word.push_str(&following);
            timings[i].tokens += timings[j].tokens;
            timings[j].word.clear();
            timings[j].tokens = 0;
        } else {
            i = j;
        }
        j += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dtw_follows_the_cheap_diagonal_and_stays_monotonic() {
        // 3 tokens over 6 frames: token k is cheap in frames 2k and 2k + 1.
        let (rows, cols) = (3, 6);
        let cost: Vec<f64> =
            (0..rows * cols).map(|x| if (x % cols) / 2 == x / cols { 0.0 } else { 1.0 }).collect();
        let (text, time) = dtw(&cost, rows, cols);
        assert_eq!(text, [0, 0, 1, 1, 2, 2]);
        assert_eq!(time, [0, 1, 2, 3, 4, 5]);
        let (text, time) = dtw(&[0.0; 12], 4, 3);
        assert!(text.windows(2).all(|w| w[0] <= w[1]) && time.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!((text[0], time[0], *text.last().unwrap(), *time.last().unwrap()), (0, 0, 3, 2));
    }

    #[test]
    fn median_filter_reflects_at_the_edges() {
        let mut row = vec![5.0, 1.0, 9.0, 2.0, 8.0, 3.0, 7.0, 4.0];
        median_filter(&mut row, 3);
        assert_eq!(row, [1.0, 5.0, 2.0, 8.0, 3.0, 7.0, 4.0, 7.0]);
        let mut short = vec![3.0, 1.0];
        median_filter(&mut short, 7);
        assert_eq!(short, [3.0, 1.0], "shorter than the half width: unchanged");
    }

    #[test]
    fn punctuation_joins_its_word() {
        let timing = |word: &str| Timing { word: word.into(), tokens: 1, start: 0.0, end: 0.0 };
        let mut timings = vec![timing(" \""), timing(" Hello"), timing(","), timing(" world"), timing(".")];
        merge_punctuation(&mut timings);
        let words: Vec<(&str, usize)> = timings.iter().map(|t| (t.word.as_str(), t.tokens)).collect();
        assert_eq!(words, [("", 0), (" \" Hello,", 3), ("", 0), (" world.", 2), ("", 0)]);
    }
}
