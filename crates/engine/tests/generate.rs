//! The generation scheduler, observed through a recording test double: a "model" whose KV cache is
//! the token history of each sequence. It checks that every chunk starts where its sequence's cache
//! ends, and its next token is a function of the whole history, so any mistake in positions, forks
//! or preemption changes the output. (Real decoders are checked against references in the backends'
//! tests; these tests are about who runs when.)

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hearth_engine::generate::model::{Chunk, DecoderInfo, DecoderModel, SeqId};
use hearth_engine::generate::sampler::SamplingParams;
use hearth_engine::generate::scheduler::{
    Event, FinishReason, GenerationRequest, SchedulerConfig, SchedulerHandle, Usage,
};
use hearth_engine::{BoxError, EngineError, Priority};
use tokenizers::models::wordlevel::WordLevel;
use tokenizers::Tokenizer;
use tokio::sync::mpsc::UnboundedReceiver;

const VOCAB: u32 = 50;
const EOS: u32 = 0;

/// The next token after `history`: never EOS unless the history is `eos_after` tokens long.
fn next_token(history: &[u32], eos_after: Option<usize>) -> u32 {
    if eos_after == Some(history.len()) {
        return EOS;
    }
    let sum: u64 = history.iter().map(|&t| u64::from(t)).sum();
    ((sum * 7 + history.len() as u64) % u64::from(VOCAB - 1)) as u32 + 1
}

/// The whole generation a greedy run of `prompt` must produce.
fn expected(prompt: &[u32], max_new: usize, eos_after: Option<usize>) -> Vec<u32> {
    let mut history = prompt.to_vec();
    let mut out = Vec::new();
    while out.len() < max_new {
        let token = next_token(&history, eos_after);
        out.push(token);
        history.push(token);
        if token == EOS {
            break;
        }
    }
    out
}

#[derive(Default)]
struct Log {
    /// Tokens per step.
    steps: Vec<usize>,
    released: Vec<SeqId>,
    forks: Vec<(SeqId, SeqId, usize)>,
    /// The gate: while closed, steps wait.
    closed: bool,
    /// How long each step takes.
    step_delay: Duration,
}

struct Double {
    caches: HashMap<SeqId, Vec<u32>>,
    log: Arc<Mutex<Log>>,
    eos_after: Option<usize>,
}

impl DecoderModel for Double {
    fn info(&self) -> DecoderInfo {
        DecoderInfo { vocab_size: VOCAB as usize, context_length: 256, kv_bytes_per_token: 1 }
    }

    fn step(&mut self, chunks: &[Chunk]) -> Result<Vec<Vec<f32>>, BoxError> {
        while self.log.lock().unwrap().closed {
            std::thread::sleep(Duration::from_millis(1));
        }
        let delay = self.log.lock().unwrap().step_delay;
        std::thread::sleep(delay);
        self.log.lock().unwrap().steps.push(chunks.iter().map(|c| c.tokens.len()).sum());
        let mut rows = Vec::new();
        for chunk in chunks {
            let cache = self.caches.entry(chunk.seq).or_default();
            assert_eq!(chunk.start, cache.len(), "a chunk must start where its cache ends");
            cache.extend_from_slice(chunk.tokens);
            if chunk.logits {
                let mut logits = vec![0.0; VOCAB as usize];
                logits[next_token(cache, self.eos_after) as usize] = 10.0;
                rows.push(logits);
            }
        }
        Ok(rows)
    }

    fn release(&mut self, seq: SeqId) {
        self.caches.remove(&seq);
        self.log.lock().unwrap().released.push(seq);
    }

    fn fork(&mut self, from: SeqId, to: SeqId, len: usize) -> Result<(), BoxError> {
        let prefix = self.caches[&from][..len].to_vec();
        self.caches.insert(to, prefix);
        self.log.lock().unwrap().forks.push((from, to, len));
        Ok(())
    }

    fn default_kv_budget(&self) -> usize {
        10_000
    }
}

/// Token `i` is the word `t{i}`; token 0 is `<eos>`.
fn tokenizer() -> Arc<Tokenizer> {
    let mut vocab: HashMap<String, u32> = (1..VOCAB).map(|i| (format!("t{i}"), i)).collect();
    vocab.insert("<eos>".into(), EOS);
    let model =
        WordLevel::builder().vocab(vocab.into_iter().collect()).unk_token("<eos>".into()).build().unwrap();
    Arc::new(Tokenizer::new(model))
}

fn config(tweak: impl FnOnce(&mut SchedulerConfig)) -> SchedulerConfig {
    let mut config = SchedulerConfig {
        model: "double".into(),
        queue_depth: 64,
        max_running_sequences: 16,
        max_batch_tokens: 64,
        kv_budget_bytes: None,
        prefix_cache: false,
        eos_ids: vec![EOS],
        max_queue_wait: None,
    };
    tweak(&mut config);
    config
}

async fn start(config: SchedulerConfig, eos_after: Option<usize>) -> (Arc<SchedulerHandle>, Arc<Mutex<Log>>) {
    let log = Arc::new(Mutex::new(Log::default()));
    let model_log = Arc::clone(&log);
    let load = move || Ok((Double { caches: HashMap::new(), log: model_log, eos_after }, ()));
    let (handle, ()) = SchedulerHandle::start(config, tokenizer(), load).await.unwrap();
    (Arc::new(handle), log)
}

fn request(prompt: Vec<u32>, max_new: usize) -> GenerationRequest {
    GenerationRequest {
        prompt,
        max_new_tokens: max_new,
        sampling: SamplingParams::greedy(),
        stop: vec![],
        processors: vec![],
    }
}

/// Everything a generation streamed: its tokens, its text, and how it ended.
#[derive(Debug, PartialEq)]
struct Outcome {
    tokens: Vec<u32>,
    text: String,
    reason: FinishReason,
    usage: Usage,
}

async fn collect(mut events: UnboundedReceiver<Event>) -> Result<Outcome, EngineError> {
    let (mut tokens, mut text) = (Vec::new(), String::new());
    while let Some(event) = events.recv().await {
        match event {
            Event::Token { id, text: piece } => {
                tokens.push(id);
                text.push_str(&piece);
            }
            Event::Finished { reason, text: piece, usage } => {
                text.push_str(&piece);
                return Ok(Outcome { tokens, text, reason, usage });
            }
            Event::Failed(err) => return Err(err),
        }
    }
    panic!("the stream ended without an outcome")
}

async fn generate(handle: &SchedulerHandle, request: GenerationRequest) -> Outcome {
    collect(handle.submit(request, Priority::Normal).unwrap()).await.unwrap()
}

fn words(tokens: &[u32]) -> String {
    tokens.iter().filter(|&&t| t != EOS).map(|t| format!("t{t}")).collect::<Vec<_>>().join(" ")
}

#[tokio::test]
async fn greedy_generation_follows_the_model_until_the_limit_or_eos() {
    let (handle, _) = start(config(|_| {}), None).await;
    let prompt = vec![3, 1, 4, 1, 5];
    let out = generate(&handle, request(prompt.clone(), 12)).await;
    assert_eq!(out.tokens, expected(&prompt, 12, None));
    assert_eq!(out.reason, FinishReason::Length);
    assert_eq!(out.usage, Usage { prompt_tokens: 5, completion_tokens: 12, cached_tokens: 0 });
    // Word-level decoding joins tokens with spaces; the streamed pieces add up to the whole.
    assert_eq!(out.text.split_whitespace().collect::<Vec<_>>().join(" "), words(&out.tokens));

    let (handle, _) = start(config(|_| {}), Some(9)).await;
    let out = generate(&handle, request(prompt.clone(), 50)).await;
    let whole = expected(&prompt, 50, Some(9));
    assert_eq!(whole.len(), 5, "EOS after 9 tokens of history: 4 generated, then EOS");
    assert_eq!(out.tokens, whole[..4], "EOS ends the stream without being streamed");
    assert_eq!(out.reason, FinishReason::Stop);
    assert_eq!(out.usage.completion_tokens, 5, "usage counts every sampled token, EOS included");
}

#[tokio::test]
async fn concurrent_streams_give_exactly_what_each_gives_alone() {
    let (handle, log) = start(config(|c| c.max_batch_tokens = 40), None).await;
    let prompts: Vec<Vec<u32>> =
        (0..16).map(|i| (0..(3 + i * 2)).map(|j| (i * 3 + j) as u32 % 40 + 1).collect()).collect();
    let tasks: Vec<_> = prompts
        .iter()
        .map(|prompt| {
            let handle = Arc::clone(&handle);
            let prompt = prompt.clone();
            tokio::spawn(async move { generate(&handle, request(prompt, 20)).await })
        })
        .collect();
    for (task, prompt) in tasks.into_iter().zip(&prompts) {
        assert_eq!(task.await.unwrap().tokens, expected(prompt, 20, None));
    }
    let steps = log.lock().unwrap().steps.clone();
    assert!(steps.iter().all(|&n| n <= 40), "no step exceeds max_batch_tokens: {steps:?}");
    assert!(steps.iter().any(|&n| n > 1), "sequences share steps: {steps:?}");
}

#[tokio::test]
async fn a_long_prompt_is_prefilled_in_chunks_beside_running_streams() {
    let (handle, log) = start(config(|c| c.max_batch_tokens = 8), None).await;
    log.lock().unwrap().closed = true;
    let short = tokio::spawn({
        let handle = Arc::clone(&handle);
        async move { generate(&handle, request(vec![1, 2], 30)).await }
    });
    let long_prompt: Vec<u32> = (0..50).map(|i| i % 40 + 1).collect();
    let long = tokio::spawn({
        let (handle, prompt) = (Arc::clone(&handle), long_prompt.clone());
        async move { generate(&handle, request(prompt, 5)).await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    log.lock().unwrap().closed = false;
    assert_eq!(short.await.unwrap().tokens, expected(&[1, 2], 30, None));
    assert_eq!(long.await.unwrap().tokens, expected(&long_prompt, 5, None));
    let steps = log.lock().unwrap().steps.clone();
    assert!(steps.iter().all(|&n| n <= 8), "{steps:?}");
    assert!(steps.len() >= 50 / 8, "the 50-token prompt took several steps: {steps:?}");
}

#[tokio::test]
async fn a_shared_prompt_prefix_is_reused_and_changes_nothing() {
    let (handle, log) = start(config(|c| c.prefix_cache = true), None).await;
    let system: Vec<u32> = (1..=30).collect();
    let first: Vec<u32> = system.iter().copied().chain([7, 8]).collect();
    let second: Vec<u32> = system.iter().copied().chain([9, 10, 11]).collect();
    let a = generate(&handle, request(first.clone(), 6)).await;
    assert_eq!(a.usage.cached_tokens, 0);
    let b = generate(&handle, request(second.clone(), 6)).await;
    assert_eq!(b.tokens, expected(&second, 6, None), "a hit gives the same output as a miss");
    assert_eq!(b.usage.cached_tokens, 30, "the shared 30-token prefix came from the cache");
    // The whole first conversation is a prefix of a follow-up turn.
    let follow_up: Vec<u32> = first.iter().copied().chain(a.tokens.iter().copied()).chain([12]).collect();
    let c = generate(&handle, request(follow_up.clone(), 4)).await;
    assert_eq!(c.tokens, expected(&follow_up, 4, None));
    assert!(c.usage.cached_tokens >= first.len() + a.tokens.len() - 1, "{:?}", c.usage);
    assert_eq!(log.lock().unwrap().forks.len(), 2);
}

#[tokio::test]
async fn a_full_kv_budget_preempts_and_recomputes_without_changing_outputs() {
    // 60 tokens of KV for four sequences of 10-token prompts generating 20 tokens each.
    let (handle, _) = start(config(|c| c.kv_budget_bytes = Some(60)), None).await;
    let tasks: Vec<_> = (0..4u32)
        .map(|i| {
            let handle = Arc::clone(&handle);
            let prompt: Vec<u32> = (0..10).map(|j| (i * 10 + j) % 40 + 1).collect();
            tokio::spawn(async move { (generate(&handle, request(prompt.clone(), 20)).await, prompt) })
        })
        .collect();
    for task in tasks {
        let (out, prompt) = task.await.unwrap();
        assert_eq!(out.tokens, expected(&prompt, 20, None));
    }
}

#[tokio::test]
async fn stop_strings_end_generation_and_are_not_emitted() {
    let (handle, _) = start(config(|_| {}), None).await;
    let prompt = vec![3, 1, 4];
    let whole = expected(&prompt, 10, None);
    // Stop at the text of the 3rd and 4th tokens, which spans two tokens.
    let stop = format!("t{} t{}", whole[2], whole[3]);
    let mut req = request(prompt, 10);
    req.stop = vec![stop];
    let out = generate(&handle, req).await;
    assert_eq!(out.reason, FinishReason::Stop);
    assert_eq!(out.tokens, whole[..4]);
    assert_eq!(out.text.trim(), words(&whole[..2]));
}

#[tokio::test]
async fn a_client_that_leaves_frees_its_sequence_within_a_step() {
    let (handle, log) = start(config(|_| {}), None).await;
    let events = handle.submit(request(vec![1, 2, 3], 10_000), Priority::Normal).unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    drop(events);
    let deadline = Instant::now() + Duration::from_secs(5);
    while log.lock().unwrap().released.is_empty() {
        assert!(Instant::now() < deadline, "the sequence was never released");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let steps_at_release = log.lock().unwrap().steps.len();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(log.lock().unwrap().steps.len(), steps_at_release, "no more steps after the client left");
}

#[tokio::test]
async fn a_full_queue_refuses_and_shutdown_answers_what_is_left() {
    let (handle, log) = start(
        config(|c| {
            c.queue_depth = 1;
            c.max_running_sequences = 1;
        }),
        None,
    )
    .await;
    log.lock().unwrap().closed = true;
    let running = handle.submit(request(vec![1], 5), Priority::Normal).unwrap();
    tokio::time::sleep(Duration::from_millis(30)).await; // admitted, stuck in its first step
    let queued = handle.submit(request(vec![2], 5), Priority::Normal).unwrap();
    let refused = handle.submit(request(vec![3], 5), Priority::Normal).err().unwrap();
    assert!(matches!(refused, EngineError::Overloaded { .. }), "{refused}");
    let h = Arc::clone(&handle);
    let stopping =
        tokio::task::spawn_blocking(move || h.shutdown(Instant::now() + Duration::from_millis(50)));
    tokio::time::sleep(Duration::from_millis(100)).await;
    log.lock().unwrap().closed = false;
    stopping.await.unwrap();
    assert!(matches!(collect(queued).await, Err(EngineError::ShuttingDown { .. })));
    // The running one finished its step and was then answered too.
    assert!(collect(running).await.is_err());
}

#[tokio::test]
async fn premium_requests_are_admitted_before_standard_ones_that_wait() {
    let (handle, log) = start(config(|c| c.max_running_sequences = 1), None).await;
    log.lock().unwrap().closed = true;
    let order = Arc::new(Mutex::new(Vec::new()));
    let run = |label: &'static str, priority| {
        let events = handle.submit(request(vec![1, 2], 3), priority).unwrap();
        let order = Arc::clone(&order);
        tokio::spawn(async move {
            collect(events).await.unwrap();
            order.lock().unwrap().push(label);
        })
    };
    let running = run("running", Priority::Normal);
    tokio::time::sleep(Duration::from_millis(30)).await; // admitted, held in its first step
    let waiting = [
        run("standard-1", Priority::Normal),
        run("standard-2", Priority::Normal),
        run("premium", Priority::High),
    ];
    tokio::time::sleep(Duration::from_millis(10)).await;
    log.lock().unwrap().closed = false;
    running.await.unwrap();
    for task in waiting {
        task.await.unwrap();
    }
    assert_eq!(*order.lock().unwrap(), ["running", "premium", "standard-1", "standard-2"]);
}

#[tokio::test]
async fn requests_that_would_wait_longer_than_max_queue_wait_for_a_place_are_refused_at_once() {
    let (handle, log) = start(
        config(|c| {
            c.max_running_sequences = 1;
            c.max_queue_wait = Some(Duration::from_millis(150));
        }),
        None,
    )
    .await;
    log.lock().unwrap().step_delay = Duration::from_millis(20);
    // Six requests at once, one place: nothing is measured yet, so all wait their turn; each holds
    // the place for about 5 steps of 20 ms.
    let first: Vec<_> =
        (0..6).map(|i| handle.submit(request(vec![i + 1], 5), Priority::Normal).unwrap()).collect();
    for events in first {
        collect(events).await.unwrap();
    }
    // Now admissions are known to come every ~100 ms: of six more at once, the first goes in, the
    // second waits ~100 ms, and the rest would wait longer than 150 ms.
    let mut accepted = Vec::new();
    let mut refused = 0;
    for i in 0..6 {
        match handle.submit(request(vec![i + 10], 5), Priority::Normal) {
            Ok(events) => accepted.push(events),
            Err(EngineError::Overloaded {
                reason: hearth_engine::error::Overload::ExpectedWait { expected, max },
                ..
            }) => {
                assert!(expected > max && max == Duration::from_millis(150), "{expected:?}");
                refused += 1;
            }
            Err(other) => panic!("unexpected: {other}"),
        }
    }
    assert!((2..=3).contains(&accepted.len()), "accepted {}, refused {refused}", accepted.len());
    for events in accepted {
        collect(events).await.unwrap();
    }
    // Once the queue is empty, the next request is taken.
    assert!(handle.submit(request(vec![40], 2), Priority::Normal).is_ok());
}
