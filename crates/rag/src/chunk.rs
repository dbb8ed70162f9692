//! Chunking by tokens: windows of at most `max_tokens` of the embedding model's own tokens, each
//! starting `max_tokens - overlap` tokens after the previous one (OpenAI's `static` strategy).
//! Token offsets come from the model's tokenizer; this module only cuts.

/// One chunk: the bytes `start..end` of the text, holding `tokens` tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Span {
    pub start: usize,
    pub end: usize,
    pub tokens: usize,
}

/// The windows over a text whose tokens sit at `offsets` (byte ranges, in order, special tokens
/// left out). The last window ends at the last token; a text of `max_tokens` tokens or fewer is
/// one chunk. `overlap` must be below `max_tokens`.
pub fn windows(offsets: &[(usize, usize)], max_tokens: usize, overlap: usize) -> Vec<Span> {
    assert!(max_tokens > 0 && overlap < max_tokens, "chunk sizes are validated before chunking");
    let step = max_tokens - overlap;
    let mut spans = Vec::new();
    let mut first = 0;
    while first < offsets.len() {
        let last = (first + max_tokens).min(offsets.len());
        let window = &offsets[first..last];
        // Sub-word tokens of one character can share a range: take the widest end.
        let end = window.iter().map(|&(_, e)| e).max().unwrap_or(window[0].1);
        spans.push(Span { start: window[0].0, end, tokens: window.len() });
        if last == offsets.len() {
            break;
        }
        first += step;
    }
    spans
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Offsets of whitespace-separated words, as a word-level tokenizer would give them.
    fn words(text: &str) -> Vec<(usize, usize)> {
        let mut offsets = Vec::new();
        let mut start = None;
        for (i, c) in text.char_indices().chain(std::iter::once((text.len(), ' '))) {
            match (c.is_whitespace(), start) {
                (false, None) => start = Some(i),
                (true, Some(s)) => {
                    offsets.push((s, i));
                    start = None;
                }
                _ => {}
            }
        }
        offsets
    }

    #[test]
    fn windows_overlap_by_the_given_tokens_and_cover_the_text() {
        let text = (0..10).map(|i| format!("w{i}")).collect::<Vec<_>>().join(" ");
        let spans = windows(&words(&text), 4, 2);
        let chunks: Vec<&str> = spans.iter().map(|s| &text[s.start..s.end]).collect();
        assert_eq!(chunks, ["w0 w1 w2 w3", "w2 w3 w4 w5", "w4 w5 w6 w7", "w6 w7 w8 w9"]);
        assert!(spans.iter().all(|s| s.tokens == 4));
    }

    #[test]
    fn a_short_text_is_one_chunk_and_the_tail_is_kept() {
        let text = "one two three";
        assert_eq!(windows(&words(text), 800, 400), [Span { start: 0, end: 13, tokens: 3 }]);
        let text = "a b c d e";
        let spans = windows(&words(text), 3, 0);
        let chunks: Vec<&str> = spans.iter().map(|s| &text[s.start..s.end]).collect();
        assert_eq!(chunks, ["a b c", "d e"]);
        assert!(windows(&[], 10, 5).is_empty());
    }

    #[test]
    fn every_token_is_in_some_chunk_whatever_the_sizes() {
        let text = "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor".repeat(7);
        let offsets = words(&text);
        for max in 1..12 {
            for overlap in 0..max {
                let spans = windows(&offsets, max, overlap);
                for &(s, e) in &offsets {
                    assert!(spans.iter().any(|c| c.start <= s && e <= c.end), "max {max} overlap {overlap}");
                }
                assert!(spans.iter().all(|c| c.tokens <= max));
                assert_eq!(spans.last().unwrap().end, offsets.last().unwrap().1);
            }
        }
    }
}
