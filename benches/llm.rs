//! `cargo bench --bench llm`: chat/completions speed on the real SmolLM2-135M-Instruct Q4_1 GGUF,
//! through Hearth's real path (config, loader, `Generator`, the decode-step scheduler), on the CPU,
//! beside llama.cpp on the same file in the same run (`benches/peers/llm_llamacpp.py`, when set up;
//! it measures the same five figures, its 8 streams as 8 sequences batched in one context):
//!
//! 1. decode tokens/s of one greedy stream (128 tokens after "Once upon a time", median of 3);
//! 2. aggregate tokens/s of 8 concurrent streams (128 tokens each, median of 3), and its ratio to
//!    one stream;
//! 3. time to first token for a 512-token prompt (prefix cache off, median of 3);
//! 4. decode tokens/s over 32 tokens after prompts of 128, 1,024 and 4,096 tokens;
//! 5. peak RSS;
//! 6. chat beside embeddings in the same process: one greedy stream while an embedder
//!    (all-MiniLM-L6-v2 on candle, its own owner thread) embeds batches of 32 new sentences, each
//!    model's rate beside the other over its rate alone (the LLM computes on its own thread pool,
//!    the encoder on candle's, so both progress at once; on 2 cores they share them).
//!
//! Results go to `benches/results/llm.json`. Environment: `HEARTH_MODELS_DIR` (default
//! `~/.cache/hearth/models`), `HEARTH_LLM_PEER_PYTHON` (default
//! `~/.cache/hearth/peers/llm-venv/bin/python`, a venv with llama-cpp-python).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use hearth::config::{default_models_dir, Config, Overrides};
use hearth::server::load_models;
use hearth::state::AppState;
use hearth_engine::embed::{Embed, EmbedInput, Embedder};
use hearth_engine::generate::sampler::SamplingParams;
use hearth_engine::generate::scheduler::Event;
use hearth_engine::generate::service::{
    Generate, GenerateOptions, GenerationStream, Generator, PreparedPrompt, Prompt,
};
use hearth_engine::registry::{LoadState, Served};
use hearth_engine::Priority;
use serde_json::{json, Value};

use common::{machine, round};

const MODEL: &str = "smollm2-135m-instruct";
const FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
const FILLER: &str = "the quick brown fox jumps over the lazy dog ";
const STREAMS: usize = 8;
const EMBEDDER: &str = "all-minilm-l6-v2";

fn main() {
    common::run(bench());
}

async fn bench() {
    let models_dir =
        std::env::var_os("HEARTH_MODELS_DIR").map(PathBuf::from).unwrap_or_else(default_models_dir);
    let gguf = models_dir.join(MODEL).join(FILE);
    assert!(gguf.is_file(), "{} is missing: run scripts/fetch-models", gguf.display());
    let state = load(&models_dir).await;
    let generator = generator(&state);

    println!("Hearth, {MODEL} ({FILE}), CPU");
    let start = prepare(&generator, Prompt::Text("Once upon a time".into())).await;
    decode_rate(&generator, &start, 16).await; // warm up
    let decode = median(3, || decode_rate(&generator, &start, 128)).await;
    println!("  decode, 1 stream: {decode:.1} tok/s");

    let prompts: Vec<PreparedPrompt> = {
        let mut prompts = Vec::new();
        for i in 0..STREAMS {
            prompts
                .push(prepare(&generator, Prompt::Text(format!("Story number {i}: once upon a time"))).await);
        }
        prompts
    };
    // From the start of the 8 requests to the end of the last (their prompts' prefill included, as
    // the peer counts it); a warm-up, then the median of 3 (as the peer's).
    let together = || {
        let (generator, prompts) = (generator.clone(), prompts.clone());
        async move {
            let t = Instant::now();
            let streams: Vec<_> = prompts
                .iter()
                .map(|p| {
                    let stream =
                        generator.start(p, vec![greedy(128)]).expect("admitted").pop().expect("one stream");
                    tokio::spawn(count(stream))
                })
                .collect();
            let mut generated = 0;
            for stream in streams {
                generated += stream.await.expect("the stream task").0;
            }
            generated as f64 / t.elapsed().as_secs_f64()
        }
    };
    together().await;
    let aggregate = median(3, together).await;
    println!("  {STREAMS} streams: {aggregate:.1} tok/s aggregate ({:.2}× one stream)", aggregate / decode);

    let filler = prepare(&generator, Prompt::Text(FILLER.repeat(500))).await.tokens;
    let first_token = |n: usize| {
        let prompt = PreparedPrompt { tokens: filler[..n].to_vec() };
        let generator = generator.clone();
        async move {
            let t = Instant::now();
            count(generator.start(&prompt, vec![greedy(1)]).expect("admitted").pop().expect("one stream"))
                .await;
            t.elapsed().as_secs_f64()
        }
    };
    first_token(512).await;
    let ttft = median(3, || first_token(512)).await;
    println!("  time to first token, 512-token prompt: {ttft:.3} s");
    let mut at_context = serde_json::Map::new();
    for n in [128usize, 1024, 4096] {
        let prompt = PreparedPrompt { tokens: filler[..n].to_vec() };
        let rate = decode_rate(&generator, &prompt, 32).await;
        println!("  decode after {n} tokens: {rate:.1} tok/s");
        at_context.insert(n.to_string(), json!(round(rate, 1)));
    }
    let rss = peak_rss_mib();
    println!("  peak RSS: {rss:.0} MiB");

    let beside = beside_embeddings(&state, &generator, &start, decode).await;

    let hearth = json!({
        "decode_tok_s": round(decode, 1),
        "aggregate_tok_s_8_streams": round(aggregate, 1),
        "aggregate_over_single": round(aggregate / decode, 2),
        "ttft_512_s": round(ttft, 3),
        "decode_at_context_tok_s": at_context.clone(),
        "peak_rss_mib": round(rss, 0),
        "beside_an_embedder": beside,
    });
    let peer = match run_peer(&gguf) {
        Ok(report) => {
            let ratio = |ours: f64, key: &str| report[key].as_f64().map(|theirs| round(ours / theirs, 2));
            let at = |n: usize| {
                let theirs = report["decode_at_context_tok_s"][n.to_string()].as_f64();
                let ours = at_context.get(&n.to_string()).and_then(Value::as_f64);
                ours.zip(theirs).map(|(ours, theirs)| round(ours / theirs, 2))
            };
            let ratios = json!({
                "decode": ratio(decode, "decode_tok_s"),
                "aggregate_8_streams": ratio(aggregate, "aggregate_tok_s_8_sequences"),
                "ttft_512 (lower is better)": ratio(ttft, "ttft_512_s"),
                "decode_after_128": at(128),
                "decode_after_1024": at(1024),
                "decode_after_4096": at(4096),
            });
            println!("  llama.cpp: {report}\n  Hearth / llama.cpp: {ratios}");
            json!({ "report": report, "hearth_over_peer": ratios })
        }
        Err(reason) => {
            println!("  peer skipped: {reason}");
            json!({ "skipped": reason })
        }
    };
    let results = json!({
        "bench": "llm",
        "command": "cargo bench --bench llm",
        "machine": machine(),
        "model": MODEL,
        "file": FILE,
        "device": "cpu",
        "hearth": hearth,
        "peer": peer,
    });
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/results/llm.json");
    std::fs::write(&path, serde_json::to_string_pretty(&results).expect("the results serialize") + "\n")
        .expect("can write the results");
    println!("wrote {}", path.display());
    state.registry.shutdown(Instant::now());
}

async fn load(models_dir: &Path) -> AppState {
    let toml = format!(
        "models_dir = \"{}\"\n[[models]]\nid = \"{MODEL}\"\npreset = \"{MODEL}\"\nsource = \"{MODEL}\"\ndevice = \"cpu\"\nprefix_cache = false\nkv_cache_mib = 1024\n\
         [[models]]\nid = \"{EMBEDDER}\"\nkind = \"embedding\"\nsource = \"{EMBEDDER}\"\ndevice = \"cpu\"\nbackend = \"candle\"\n",
        models_dir.display()
    );
    let config = Config::parse(&toml, None, &Overrides::default()).expect("the bench config is valid");
    let state = AppState::new(config).expect("the app state");
    load_models(state.clone()).await;
    state
}

fn generator(state: &AppState) -> Arc<Generator> {
    match state.registry.get(MODEL).expect("configured").state() {
        LoadState::Ready(served) => match &*served {
            Served::Llm(generator) => generator.clone(),
            _ => panic!("{MODEL} is not an LLM"),
        },
        LoadState::Failed(message) => panic!("{MODEL} failed to load: {message}"),
        _ => panic!("{MODEL} is not ready"),
    }
}

/// Sentences/s of the embedder over `seconds`, 32 new sentences a request, while `busy` is unset
/// or until it is set (then the count so far).
async fn embed_for(embedder: &Embedder, seconds: f64, busy: Option<&std::sync::atomic::AtomicBool>) -> f64 {
    use std::sync::atomic::Ordering;
    let t = Instant::now();
    let mut embedded = 0usize;
    let mut batch = 0usize;
    loop {
        let sentences: Vec<String> = (0..32)
            .map(|i| format!("Sentence {i} of batch {batch}: the quick brown fox jumps over the lazy dog."))
            .collect();
        embedder
            .embed(EmbedInput::Texts(sentences), None, Priority::Normal)
            .await
            .expect("the sentences embed");
        embedded += 32;
        batch += 1;
        let done = match busy {
            Some(flag) => !flag.load(Ordering::Acquire),
            None => t.elapsed().as_secs_f64() >= seconds,
        };
        if done {
            return embedded as f64 / t.elapsed().as_secs_f64();
        }
    }
}

/// Phase 6: the embedder alone, then one greedy stream of 128 tokens with the embedder busy beside it.
async fn beside_embeddings(
    state: &AppState,
    generator: &Arc<Generator>,
    start: &PreparedPrompt,
    decode: f64,
) -> Value {
    use std::sync::atomic::{AtomicBool, Ordering};
    let served = match state.registry.get(EMBEDDER).expect("configured").state() {
        LoadState::Ready(served) => served,
        _ => panic!("{EMBEDDER} is not ready"),
    };
    let Served::Embedding(embedder) = &*served else { panic!("{EMBEDDER} is not an embedding model") };
    let embedder = embedder.clone();
    embed_for(&embedder, 1.0, None).await; // warm up
    let alone = embed_for(&embedder, 5.0, None).await;
    let busy = Arc::new(AtomicBool::new(true));
    let background = {
        let (embedder, busy) = (embedder.clone(), busy.clone());
        tokio::spawn(async move { embed_for(&embedder, 0.0, Some(&busy)).await })
    };
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let chat = decode_rate(generator, start, 128).await;
    busy.store(false, Ordering::Release);
    let embeddings = background.await.expect("the embedding task");
    let (chat_share, embed_share) = (chat / decode, embeddings / alone);
    println!(
        "  beside an embedder: chat {chat:.1} tok/s ({chat_share:.2}× alone), embeddings {embeddings:.1} sentences/s \
         ({embed_share:.2}× alone, {alone:.1} alone); together {:.2} of one model's time",
        chat_share + embed_share
    );
    json!({
        "embedder": EMBEDDER,
        "embedder_alone_sentences_s": round(alone, 1),
        "chat_tok_s": round(chat, 1),
        "embeddings_sentences_s": round(embeddings, 1),
        "chat_over_alone": round(chat_share, 2),
        "embeddings_over_alone": round(embed_share, 2),
    })
}

async fn prepare(generator: &Generator, prompt: Prompt) -> PreparedPrompt {
    generator.prepare(prompt, Priority::Normal).await.expect("the prompt is valid")
}

fn greedy(max_tokens: usize) -> GenerateOptions {
    GenerateOptions {
        max_tokens: Some(max_tokens),
        sampling: SamplingParams { temperature: 0.0, ..SamplingParams::default() },
        stop: Vec::new(),
        processors: Vec::new(),
        priority: Priority::Normal,
    }
}

/// Tokens generated, and the instants of the first and last.
async fn count(mut stream: GenerationStream) -> (usize, Option<Instant>, Option<Instant>) {
    let (mut n, mut first, mut last) = (0, None, None);
    while let Some(event) = stream.next().await {
        match event {
            Event::Token { .. } => {
                n += 1;
                let now = Instant::now();
                first.get_or_insert(now);
                last = Some(now);
            }
            Event::Finished { .. } => break,
            Event::Failed(error) => panic!("generation failed: {error}"),
        }
    }
    (n, first, last)
}

/// Tokens/s between the first and the last of `n` greedy tokens after `prompt`.
async fn decode_rate(generator: &Generator, prompt: &PreparedPrompt, n: usize) -> f64 {
    let stream = generator.start(prompt, vec![greedy(n)]).expect("admitted").pop().expect("one stream");
    let (tokens, first, last) = count(stream).await;
    assert_eq!(tokens, n, "greedy decoding ended before {n} tokens");
    (tokens - 1) as f64 / (last.unwrap() - first.unwrap()).as_secs_f64()
}

async fn median<F: std::future::Future<Output = f64>>(runs: usize, mut run: impl FnMut() -> F) -> f64 {
    let mut values = Vec::new();
    for _ in 0..runs {
        values.push(run().await);
    }
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("VmHWM:").map(|v| v.trim().trim_end_matches(" kB").trim().to_owned())
            })
        })
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// Runs `benches/peers/llm_llamacpp.py` and returns its JSON report, or why it could not run.
fn run_peer(gguf: &Path) -> Result<Value, String> {
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("."))
        .join("hearth");
    let python = std::env::var_os("HEARTH_LLM_PEER_PYTHON")
        .map_or_else(|| cache.join("peers/llm-venv/bin/python"), PathBuf::from);
    if !python.is_file() {
        return Err(format!("no peer python at {} (see benches/peers/llm_llamacpp.py)", python.display()));
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/peers/llm_llamacpp.py");
    println!("  running the peer: {} {}", python.display(), script.display());
    let output = Command::new(&python)
        .arg(&script)
        .arg(gguf)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", python.display()))?;
    if !output.status.success() {
        return Err(format!(
            "the peer failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let last_line = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(last_line).map_err(|e| format!("the peer printed `{last_line}`, not JSON: {e}"))
}
