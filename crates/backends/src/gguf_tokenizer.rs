//! A tokenizer built from a GGUF file's own vocabulary, for files that ship no `tokenizer.json`
//! (the offline SmolLM2 GGUF among them).
//!
//! Byte-level BPE (`tokenizer.ggml.model = "gpt2"`) is rebuilt as a Hugging Face tokenizer: the
//! pre-tokenizer splits exactly as llama.cpp does for the file's `tokenizer.ggml.pre` profile (its
//! list of regular expressions, each splitting the pieces of the one before, keeping unmatched
//! text as pieces), then bytes map to BPE symbols and the file's merges apply. Control and
//! user-defined tokens are matched in text, as llama.cpp does when it parses special tokens.
//! Profiles not listed here are refused rather than guessed: a wrong split tokenizes silently wrong.
//! SentencePiece vocabularies (`llama`, Gemma) are not supported yet.

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use crate::decoder::Metadata;
use crate::error::BackendError;

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
const CONTROL: i64 = 3;
const USER_DEFINED: i64 = 4;

/// Texts that end a turn in common chat formats; when the vocabulary has them as control tokens
/// they stop generation, as llama.cpp's end-of-generation set does.
const END_OF_TURN_TEXTS: &[&str] = &[
    "<|im_end|>",
    "<|eot_id|>",
    "<|end_of_text|>",
    "<|endoftext|>",
    "<end_of_turn>",
    "<|end|>",
    "<|eom_id|>",
];

/// A GGUF's vocabulary as Hearth uses it.
pub struct GgufVocab {
    pub tokenizer: Tokenizer,
    pub bos: Option<u32>,
    /// Every id that ends generation.
    pub eos_ids: Vec<u32>,
    /// Prepend BOS to prompts (`tokenizer.ggml.add_bos_token`).
    pub add_bos: bool,
    pub bos_text: String,
    pub eos_text: String,
    /// `tokenizer.chat_template`, if the file has one.
    pub chat_template: Option<String>,
}

pub fn from_gguf(md: &Metadata) -> Result<GgufVocab, BackendError> {
    let model = md.string("tokenizer.ggml.model")?;
    if model != "gpt2" {
        return Err(BackendError::Unsupported(format!(
            "tokenizer model `{model}` in GGUF metadata is not supported yet (only byte-level BPE, `gpt2`); \
             put the model's tokenizer.json beside the GGUF"
        )));
    }
    let pre = md.string("tokenizer.ggml.pre").unwrap_or("default");
    let regexes = pre_tokenizer_regexes(pre).ok_or_else(|| {
        BackendError::Unsupported(format!(
            "pre-tokenizer `{pre}` in GGUF metadata is not supported (known: smollm, gpt2, llama3, qwen2 and their \
             aliases); put the model's tokenizer.json beside the GGUF"
        ))
    })?;
    let tokens = md.strings("tokenizer.ggml.tokens")?;
    let types = md.ints("tokenizer.ggml.token_type").unwrap_or_default();
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
    let added: Vec<AddedToken> = tokens
        .iter()
        .zip(&types)
        .filter(|(_, &kind)| kind == CONTROL || kind == USER_DEFINED)
        .map(|(text, &kind)| AddedToken::from(text.to_string(), kind == CONTROL).normalized(false))
        .collect();
    tokenizer
        .add_special_tokens(added)
        .map_err(|e| BackendError::Unsupported(format!("special tokens: {e}")))?;

    let id = |key: &str| {
        md.usize(key).ok().and_then(|i| u32::try_from(i).ok()).filter(|&i| (i as usize) < tokens.len())
    };
    let bos = id("tokenizer.ggml.bos_token_id");
    let eos = id("tokenizer.ggml.eos_token_id");
    let mut eos_ids: Vec<u32> = [eos, id("tokenizer.ggml.eot_token_id"), id("tokenizer.ggml.eom_token_id")]
        .into_iter()
        .flatten()
        .collect();
    for (i, (text, &kind)) in tokens.iter().zip(&types).enumerate() {
        if kind == CONTROL && END_OF_TURN_TEXTS.contains(text) && !eos_ids.contains(&(i as u32)) {
            eos_ids.push(i as u32);
        }
    }
    let text_of = |id: Option<u32>| id.map(|i| tokens[i as usize].to_string()).unwrap_or_default();
    Ok(GgufVocab {
        tokenizer,
        bos,
        eos_ids,
        add_bos: md.bool("tokenizer.ggml.add_bos_token").unwrap_or(false),
        bos_text: text_of(bos),
        eos_text: text_of(eos),
        chat_template: md.string("tokenizer.chat_template").ok().map(str::to_string),
    })
}
