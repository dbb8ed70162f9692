//! Word error rate, for the tests and benches that score transcripts against references: the
//! normaliser of `../shared/peers/stt_faster_whisper.py` (lower case; anything but ASCII letters
//! and apostrophes separates words) and word-level edit distance.

/// `text`'s words, normalised.
pub fn normalized_words(text: &str) -> Vec<String> {
    let cleaned: String = text
        .to_lowercase()
        .chars()
        .map(|c| if c.is_ascii_lowercase() || c == '\'' { c } else { ' ' })
        .collect();
    cleaned.split_whitespace().map(str::to_string).collect()
}

/// Substitutions, insertions and deletions that turn `reference` into `hypothesis`.
pub fn word_errors(reference: &[String], hypothesis: &[String]) -> usize {
    let mut row: Vec<usize> = (0..=hypothesis.len()).collect();
    for (i, r) in reference.iter().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, h) in hypothesis.iter().enumerate() {
            let current = (row[j + 1] + 1).min(row[j] + 1).min(diagonal + usize::from(r != h));
            diagonal = row[j + 1];
            row[j + 1] = current;
        }
    }
    row[hypothesis.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_each_kind_of_edit() {
        let w = normalized_words;
        assert_eq!(w("Mr. Dashwood's ill-disposed!"), ["mr", "dashwood's", "ill", "disposed"]);
        assert_eq!(word_errors(&w("a b c d"), &w("a b c d")), 0);
        assert_eq!(word_errors(&w("a b c d"), &w("a x c d")), 1, "substitution");
        assert_eq!(word_errors(&w("a b c d"), &w("a b d")), 1, "deletion");
        assert_eq!(word_errors(&w("a b c d"), &w("a b c c d e")), 2, "insertions");
        assert_eq!(word_errors(&w("a b"), &w("")), 2);
    }
}
