//! A tokenizer built from a GGUF file's own vocabulary, for files that ship no `tokenizer.json`
//! (the offline SmolLM2 GGUF among them).
//!
//! Byte-level BPE (`tokenizer.ggml.model = "gpt2"`) is rebuilt as a Hugging Face tokenizer: the
//! pre-tokenizer splits exactly as llama.cpp does for the file's `tokenizer.ggml.pre` profile (its
//! list of regular expressions, each splitting the pieces of the one before, keeping unmatched
//! text as pieces), then bytes map to BPE symbols and the file's merges apply. Control and
//! user-defined tokens are matched in text, as llama.cpp does when it parses special tokens.
//! Profiles not listed here are refused rather than guessed: a wrong split tokenizes silently wrong.
//!
//! SentencePiece vocabularies (`tokenizer.ggml.model = "llama"`: Gemma, Phi-3, Llama 2, Mistral)
//! are rebuilt the way llama.cpp tokenizes them: spaces become `▁`, each stretch of text between
//! special tokens gets a leading `▁` (`add_space_prefix`), and adjacent pieces merge while their
//! concatenation is in the vocabulary, the highest-scoring merge first. That is BPE whose merges
//! are every (left, right) split of a vocabulary piece into two pieces, ranked by the piece's score;
//! characters outside the vocabulary fall back to `<0xXX>` byte pieces.

use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{Prepend, Replace, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::NormalizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use crate::decoder::Metadata;
use crate::error::BackendError;
use crate::llm_vocab::{LlmVocab, END_OF_TURN_TEXTS};

/// llama.cpp's regular expressions per pre-tokenizer profile (`llama-vocab.cpp`).
fn pre_tokenizer_regexes(pre: &str) -> Option<&'static [&'static str]> {
    const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
    Some(match pre {
        "gpt-2" | "gpt2" | "default" => &[GPT2],
        // SmolLM, StarCoder, Refact, Command-R and others: digits one by one, then GPT-2's rules.
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva-7b" => {
            &[r"\p{N}", r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"]
        }
        "llama3" | "llama-bpe" | "llama-v3" | "falcon3" | "pixtral" => &[
            r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
        ],
        "qwen2" | "deepseek-r1-qwen" => &[
            r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
        ],
        _ => return None,
    })
}

/// llama.cpp's token types (`tokenizer.ggml.token_type`).
const NORMAL: i64 = 1;
const CONTROL: i64 = 3;
const USER_DEFINED: i64 = 4;

pub fn from_gguf(md: &Metadata) -> Result<LlmVocab, BackendError> {
    let model = md.string("tokenizer.ggml.model")?;
    let tokens = md.strings("tokenizer.ggml.tokens")?;
    let types = md.ints("tokenizer.ggml.token_type").unwrap_or_default();
    let tokenizer = match model {
        "gpt2" => byte_level_bpe(md, &tokens, &types)?,
        "llama" => sentencepiece_bpe(md, &tokens, &types)?,
        other => {
            return Err(BackendError::Unsupported(format!(
                "tokenizer model `{other}` in GGUF metadata is not supported (byte-level BPE `gpt2` and \
                 SentencePiece `llama` are); put the model's tokenizer.json beside the GGUF"
            )))
        }
    };
    vocab(md, tokenizer, &tokens, &types)
}

/// Control and user-defined tokens, matched in text before the model's own rules apply.
fn add_special_tokens(tokenizer: &mut Tokenizer, tokens: &[&str], types: &[i64]) -> Result<(), BackendError> {
    let added: Vec<AddedToken> = tokens
        .iter()
        .zip(types)
        .filter(|(_, &kind)| kind == CONTROL || kind == USER_DEFINED)
        .map(|(text, &kind)| AddedToken::from(text.to_string(), kind == CONTROL).normalized(false))
        .collect();
    tokenizer
        .add_special_tokens(added)
        .map_err(|e| BackendError::Unsupported(format!("special tokens: {e}")))?;
    Ok(())
}

/// SentencePiece as llama.cpp runs it (see the module documentation).
fn sentencepiece_bpe(md: &Metadata, tokens: &[&str], types: &[i64]) -> Result<Tokenizer, BackendError> {
    let scores: Vec<f32> = match md.get("tokenizer.ggml.scores") {
        Some(value) => value
            .to_vec()
            .map_err(|e| BackendError::Unsupported(format!("`tokenizer.ggml.scores`: {e}")))?
            .iter()
            .map(|v| v.to_f32().unwrap_or(0.0))
            .collect(),
        None => vec![0.0; tokens.len()],
    };
    let kind = |i: usize| types.get(i).copied().unwrap_or(NORMAL);
    let mut ids: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    for (i, t) in tokens.iter().enumerate() {
        ids.entry(t).or_insert(i);
    }
    // Every split of a normal piece into two normal pieces is a merge, ranked by the piece's score
    // (ties: lower id, then the split further left).
    let normal = |t: &str| ids.get(t).is_some_and(|&i| kind(i) == NORMAL);
    let mut ranked: Vec<(f32, usize, usize)> = Vec::new();
    for (i, piece) in tokens.iter().enumerate().filter(|&(i, _)| kind(i) == NORMAL) {
        for (at, _) in piece.char_indices().skip(1) {
            if normal(&piece[..at]) && normal(&piece[at..]) {
                ranked.push((scores.get(i).copied().unwrap_or(0.0), i, at));
            }
        }
    }
    ranked.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    let merges: Vec<(String, String)> =
        ranked.iter().map(|&(_, i, at)| (tokens[i][..at].to_string(), tokens[i][at..].to_string())).collect();
    let vocab: tokenizers::models::bpe::Vocab =
        tokens.iter().enumerate().map(|(i, t)| (t.to_string(), i as u32)).rev().collect();
    let unk =
        md.usize("tokenizer.ggml.unknown_token_id").ok().and_then(|i| tokens.get(i)).map(|t| t.to_string());
    let mut builder = BPE::builder().vocab_and_merges(vocab, merges).byte_fallback(true).fuse_unk(true);
    if let Some(unk) = unk {
        builder = builder.unk_token(unk);
    }
    let bpe = builder.build().map_err(|e| {
        BackendError::Unsupported(format!("cannot build the SentencePiece model from GGUF metadata: {e}"))
    })?;
    let mut tokenizer = Tokenizer::new(bpe);
    let replace = |from: &str, to: &str| {
        Replace::new(from, to).map_err(|e| BackendError::Unsupported(format!("tokenizer normalizer: {e}")))
    };
    let mut normalizers = Vec::new();
    if md.bool("tokenizer.ggml.add_space_prefix").unwrap_or(true) {
        normalizers.push(NormalizerWrapper::Prepend(Prepend::new("▁".into())));
    }
    normalizers.push(NormalizerWrapper::Replace(replace(" ", "▁")?));
    tokenizer
        .with_normalizer(Some(NormalizerSequence::new(normalizers)))
        .map_err(|e| BackendError::Unsupported(format!("tokenizer normalizer: {e}")))?;
    let mut decoders = vec![
        DecoderWrapper::Replace(replace("▁", " ")?),
        DecoderWrapper::ByteFallback(ByteFallback::new()),
        DecoderWrapper::Fuse(Fuse::new()),
    ];
    if md.bool("tokenizer.ggml.add_space_prefix").unwrap_or(true) {
        decoders.push(DecoderWrapper::Strip(Strip::new(' ', 1, 0)));
    }
    tokenizer.with_decoder(Some(DecoderSequence::new(decoders)));
    add_special_tokens(&mut tokenizer, tokens, types)?;
    Ok(tokenizer)
}

/// Byte-level BPE with llama.cpp's pre-tokenizer for the file's profile.
fn byte_level_bpe(md: &Metadata, tokens: &[&str], types: &[i64]) -> Result<Tokenizer, BackendError> {
    let pre = md.string("tokenizer.ggml.pre").unwrap_or("default");
    let regexes = pre_tokenizer_regexes(pre).ok_or_else(|| {
        BackendError::Unsupported(format!(
            "pre-tokenizer `{pre}` in GGUF metadata is not supported (known: smollm, gpt2, llama3, qwen2 and their \
             aliases); put the model's tokenizer.json beside the GGUF"
        ))
    })?;
    let merges: Vec<(String, String)> = md
        .strings("tokenizer.ggml.merges")?
        .into_iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| BackendError::Unsupported(format!("merge `{m}` is not two symbols")))
        })
        .collect::<Result<_, _>>()?;
    let vocab: tokenizers::models::bpe::Vocab =
        tokens.iter().enumerate().map(|(i, t)| (t.to_string(), i as u32)).collect();
    let ignore_merges = matches!(pre, "llama3" | "llama-bpe" | "llama-v3");
    let bpe =
        BPE::builder().vocab_and_merges(vocab, merges).ignore_merges(ignore_merges).build().map_err(|e| {
            BackendError::Unsupported(format!("cannot build the BPE model from GGUF metadata: {e}"))
        })?;
    let mut splits: Vec<PreTokenizerWrapper> = regexes
        .iter()
        .map(|regex| {
            Split::new(SplitPattern::Regex(regex.to_string()), SplitDelimiterBehavior::Isolated, false)
                .map(PreTokenizerWrapper::Split)
                .map_err(|e| BackendError::Unsupported(format!("pre-tokenizer regex: {e}")))
        })
        .collect::<Result<_, _>>()?;
    splits.push(PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, false, false)));
    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer.with_pre_tokenizer(Some(Sequence::new(splits)));
    tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
    add_special_tokens(&mut tokenizer, tokens, types)?;
    Ok(tokenizer)
}

/// BOS, the end-of-generation set and the chat template from the metadata.
fn vocab(
    md: &Metadata,
    tokenizer: Tokenizer,
    tokens: &[&str],
    types: &[i64],
) -> Result<LlmVocab, BackendError> {
    let id = |key: &str| {
        md.usize(key).ok().and_then(|i| u32::try_from(i).ok()).filter(|&i| (i as usize) < tokens.len())
    };
    let bos = id("tokenizer.ggml.bos_token_id");
    let eos = id("tokenizer.ggml.eos_token_id");
    let mut eos_ids: Vec<u32> = [eos, id("tokenizer.ggml.eot_token_id"), id("tokenizer.ggml.eom_token_id")]
        .into_iter()
        .flatten()
        .collect();
    for (i, (text, &kind)) in tokens.iter().zip(types).enumerate() {
        if kind == CONTROL && END_OF_TURN_TEXTS.contains(text) && !eos_ids.contains(&(i as u32)) {
            eos_ids.push(i as u32);
        }
    }
    let text_of = |id: Option<u32>| id.map(|i| tokens[i as usize].to_string()).unwrap_or_default();
    Ok(LlmVocab {
        tokenizer,
        bos,
        eos_ids,
        add_bos: md.bool("tokenizer.ggml.add_bos_token").unwrap_or(false),
        bos_text: text_of(bos),
        eos_text: text_of(eos),
        chat_template: md.string("tokenizer.chat_template").ok().map(str::to_string),
    })
}
