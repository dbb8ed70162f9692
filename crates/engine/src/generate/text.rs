//! Generated tokens to streamed text: incremental detokenization that never splits a UTF-8
//! character, and stop strings that are never emitted, also when they span several tokens.

use tokenizers::Tokenizer;

/// Turns tokens into text one token at a time. A token that ends inside a multi-byte character
/// (byte-level BPE splits them) yields nothing until the character is complete. Text is the
/// difference between decoding a window that ends before and after the new token, so tokenizers
/// that drop a leading space at the start of a decode (SentencePiece) still get their spaces.
pub struct Detokenizer {
    ids: Vec<u32>,
    /// Start of the window decoded for context.
    prefix_offset: usize,
    /// Tokens before this have been emitted as text.
    read_offset: usize,
}

impl Detokenizer {
    pub fn new() -> Self {
        Self { ids: Vec::new(), prefix_offset: 0, read_offset: 0 }
    }

    fn decode(tokenizer: &Tokenizer, ids: &[u32]) -> String {
        tokenizer.decode(ids, true).unwrap_or_default()
    }

    /// The new text after `token` (possibly empty).
    pub fn push(&mut self, tokenizer: &Tokenizer, token: u32) -> String {
        self.ids.push(token);
        let before = Self::decode(tokenizer, &self.ids[self.prefix_offset..self.read_offset]);
        let after = Self::decode(tokenizer, &self.ids[self.prefix_offset..]);
        if after.len() > before.len() && after.starts_with(&before) && !after.ends_with('\u{FFFD}') {
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            after[before.len()..].to_string()
        } else {
            String::new()
        }
    }

    /// Whatever is held back (an incomplete character at the very end becomes U+FFFD).
    pub fn finish(&mut self, tokenizer: &Tokenizer) -> String {
        let before = Self::decode(tokenizer, &self.ids[self.prefix_offset..self.read_offset]);
        let after = Self::decode(tokenizer, &self.ids[self.prefix_offset..]);
        self.prefix_offset = self.ids.len();
        self.read_offset = self.ids.len();
        after.strip_prefix(before.as_str()).map(str::to_string).unwrap_or_default()
    }
}

impl Default for Detokenizer {
    fn default() -> Self {
        Self::new()
    }
}

/// Finds stop strings in streamed text. Text that could be the start of a stop string is held
/// back until it is known not to be one.
pub struct StopMatcher {
    stops: Vec<String>,
    pending: String,
}

/// What [`StopMatcher::push`] decided.
#[derive(Debug, PartialEq, Eq)]
pub enum Matched {
    /// Text that is safe to emit (possibly empty).
    Text(String),
    /// A stop string was found: the text before it, to emit last.
    Stop(String),
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> Self {
        Self { stops: stops.into_iter().filter(|s| !s.is_empty()).collect(), pending: String::new() }
    }

    pub fn push(&mut self, text: &str) -> Matched {
        if self.stops.is_empty() {
            return Matched::Text(text.to_string());
        }
        self.pending.push_str(text);
        let found = self.stops.iter().filter_map(|stop| self.pending.find(stop.as_str())).min();
        if let Some(at) = found {
            let before = self.pending[..at].to_string();
            self.pending.clear();
            return Matched::Stop(before);
        }
        let hold = self.held_suffix();
        let emit_to = self.pending.len() - hold;
        let emit = self.pending[..emit_to].to_string();
        self.pending.drain(..emit_to);
        Matched::Text(emit)
    }

    /// Bytes at the end of `pending` that are the beginning of some stop string.
    fn held_suffix(&self) -> usize {
        let bytes = self.pending.as_bytes();
        let mut longest = 0;
        for stop in &self.stops {
            let stop = stop.as_bytes();
            for len in (longest + 1..=stop.len().saturating_sub(1).min(bytes.len())).rev() {
                if bytes[bytes.len() - len..] == stop[..len] {
                    longest = longest.max(len);
                    break;
                }
            }
        }
        longest
    }

    /// The held-back text, once generation has ended for another reason.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for piece in pieces {
            match m.push(piece) {
                Matched::Text(t) => out.push_str(&t),
                Matched::Stop(t) => {
                    out.push_str(&t);
                    return (out, true);
                }
            }
        }
        out.push_str(&m.finish());
        (out, false)
    }

    #[test]
    fn stop_strings_are_found_across_pieces_and_never_emitted() {
        assert_eq!(run(&["END"], &["The ", "story E", "N", "D here"]), ("The story ".into(), true));
        assert_eq!(run(&["\n\n", "###"], &["a", "\n", "\nb"]), ("a".into(), true));
        assert_eq!(run(&["###"], &["#", "#", "x"]), ("##x".into(), false), "a partial match is released");
        assert_eq!(run(&["stop"], &["no st", "op", "ping"]), ("no ".into(), true));
        assert_eq!(run(&[], &["plain"]), ("plain".into(), false));
        assert_eq!(run(&["é!"], &["caf", "é", "!"]), ("caf".into(), true), "multi-byte stops");
    }

    #[test]
    fn only_a_possible_stop_start_is_held() {
        let mut m = StopMatcher::new(vec!["abc".into()]);
        assert_eq!(m.push("xxab"), Matched::Text("xx".into()));
        assert_eq!(m.push("d"), Matched::Text("abd".into()));
    }
}
