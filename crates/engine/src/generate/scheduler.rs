//! Continuous batching on a decoder's owner thread.
//!
//! Every step is one forward pass over all running sequences: one new token for each sequence that
//! is decoding, and prompt chunks for sequences still being prefilled, within `max_batch_tokens`
//! (so a long prompt is prefilled over several steps and never stalls the running streams). New
//! requests are admitted between steps while fewer than `max_running_sequences` run and the KV-cache
//! budget has room for their prompt; until then they wait in the bounded queue, and a full queue
//! answers 429.
//!
//! KV memory is counted in cached tokens against the budget. A step that would overflow it first
//! evicts prefix-cache entries (least recently used first), then preempts the most recently admitted
//! sequence: its cache is dropped and it is prefilled again later from its prompt and output so far.
//!
//! Prefix cache: a finished sequence's cache is kept (bounded, LRU). A new prompt that starts with
//! tokens of a kept sequence copies their KV entries instead of computing them again.
//!
//! Load shedding: with `max_queue_wait`, a request is refused at once (429) when the requests
//! waiting ahead of it × the recent time between admissions (measured only between requests that
//! were both waiting, so it is the time places take to free up) exceeds it; see [`crate::backlog`].
//!
//! Each sequence samples its own next token ([`Sampler`]), turns tokens into text without splitting
//! characters ([`Detokenizer`]), and stops at an end-of-sequence token, a stop string (never
//! emitted), its token limit or the context. A sequence whose client has gone is released before
//! the next step.

use std::collections::{HashSet, VecDeque};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokenizers::Tokenizer;
use tokio::sync::mpsc;

use super::model::{Chunk, DecoderInfo, DecoderModel, SeqId};
use super::sampler::{LogitsProcessor, Sampler, SamplingParams};
use super::text::{Detokenizer, Matched, StopMatcher};
use crate::backlog::{Admitted, Backlog};
use crate::error::{panic_message, BoxError, EngineError, Overload};
use crate::owner::{Answer, Lifecycle, Owner};
use crate::queue::{JobQueue, Priority, Ticket};

/// How the scheduler of one model may use it.
#[derive(Clone, Debug)]
pub struct SchedulerConfig {
    pub model: Arc<str>,
    /// Requests that may wait for admission before new ones are refused with 429.
    pub queue_depth: usize,
    /// Sequences decoded together at most.
    pub max_running_sequences: usize,
    /// Tokens per step over all sequences (decode tokens plus prompt chunks).
    pub max_batch_tokens: usize,
    /// KV-cache bytes for running sequences and the prefix cache; `None`: the model's default.
    pub kv_budget_bytes: Option<usize>,
    /// Keep finished sequences' caches for reuse by prompts that start the same way.
    pub prefix_cache: bool,
    /// Token ids that end generation (every end-of-sequence / end-of-turn id of the model).
    pub eos_ids: Vec<u32>,
    /// Refuse a request at once when the requests ahead would keep it waiting longer than this
    /// for a place; `None`: only the queue depth bounds waiting.
    pub max_queue_wait: Option<Duration>,
}

/// One generation.
pub struct GenerationRequest {
    /// Prompt tokens, special tokens included; at least one.
    pub prompt: Vec<u32>,
    /// At most this many new tokens (the caller clamps it to the context).
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    /// Text that ends generation; never emitted.
    pub stop: Vec<String>,
    /// Applied to the logits before sampling, in order.
    pub processors: Vec<Box<dyn LogitsProcessor>>,
}

/// Why a generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-sequence token or a stop string.
    Stop,
    /// The token limit or the context length.
    Length,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Prompt tokens whose KV entries came from the prefix cache.
    pub cached_tokens: usize,
}

/// What a generation streams back.
#[derive(Debug)]
pub enum Event {
    /// A generated token and the text it completes (possibly empty while a character or a possible
    /// stop string is held back).
    Token {
        id: u32,
        text: String,
    },
    /// The end, with any text still held back.
    Finished {
        reason: FinishReason,
        text: String,
        usage: Usage,
    },
    Failed(EngineError),
}

struct Job {
    request: GenerationRequest,
    events: mpsc::UnboundedSender<Event>,
    /// Counts this request as waiting until it is admitted (or dropped).
    _waiting: Admitted,
}

impl Answer for Job {
    fn fail(self, error: EngineError) {
        let _ = self.events.send(Event::Failed(error));
    }
}

/// The async side: submits generations and hands back their event streams.
pub struct SchedulerHandle {
    owner: Owner<Job>,
    info: DecoderInfo,
    budget_tokens: usize,
    /// Requests waiting for admission, and the recent time between admissions.
    backlog: Arc<Backlog>,
}

impl SchedulerHandle {
    /// Spawns the owner thread, runs `load` on it, and returns once the model is ready.
    pub async fn start<M, I, F>(
        config: SchedulerConfig,
        tokenizer: Arc<Tokenizer>,
        load: F,
    ) -> Result<(Self, I), BoxError>
    where
        M: DecoderModel,
        I: Send + 'static,
        F: FnOnce() -> Result<(M, I), BoxError> + Send + 'static,
    {
        let (model_id, queue_depth) = (Arc::clone(&config.model), config.queue_depth);
        let backlog = Arc::new(Backlog::new(&model_id, config.max_queue_wait));
        let scheduler_backlog = Arc::clone(&backlog);
        // The model reports its size on its own thread; it comes back with what `load` returns.
        let budget_config = config.clone();
        let load = move || {
            load().map(|(model, info)| {
                let decoder = model.info();
                let budget = budget_tokens(&budget_config, &model);
                (model, (info, decoder, budget))
            })
        };
        let run = move |model: M, queue, life| {
            let budget = budget_tokens(&config, &model);
            Scheduler::new(model, config, budget, tokenizer, queue, life, scheduler_backlog).run()
        };
        let (owner, (info, decoder, budget_tokens)) = Owner::start(model_id, queue_depth, load, run).await?;
        Ok((Self { owner, info: decoder, budget_tokens, backlog }, info))
    }

    pub fn info(&self) -> &DecoderInfo {
        &self.info
    }

    /// Longest sequence (prompt plus output) this scheduler can hold: the model's context, or less
    /// when the KV budget is smaller.
    pub fn max_sequence_tokens(&self) -> usize {
        self.info.context_length.min(self.budget_tokens)
    }

    /// Queues `request`; its events arrive on the returned receiver. Refuses at once when the queue
    /// is full or the model has failed. Dropping the receiver cancels the generation.
    pub fn submit(
        &self,
        request: GenerationRequest,
        priority: Priority,
    ) -> Result<mpsc::UnboundedReceiver<Event>, EngineError> {
        let waiting = self.backlog.admit(1).map_err(|refused| EngineError::Overloaded {
            model: Arc::clone(self.model()),
            reason: Overload::ExpectedWait { expected: refused.expected, max: refused.max },
        })?;
        let (events, receiver) = mpsc::unbounded_channel();
        self.owner.push(Job { request, events, _waiting: waiting }, priority)?;
        Ok(receiver)
    }

    pub fn model(&self) -> &Arc<str> {
        &self.owner.life.model
    }

    pub fn failed_error(&self) -> EngineError {
        self.owner.life.failed()
    }

    pub fn queue_len(&self) -> usize {
        self.owner.queue.len()
    }

    pub fn is_alive(&self) -> bool {
        self.owner.is_alive()
    }

    pub async fn failed(&self) {
        self.owner.failed().await
    }

    pub fn begin_shutdown(&self, deadline: Instant) {
        self.owner.begin_shutdown(deadline)
    }

    pub fn shutdown(&self, deadline: Instant) {
        self.owner.shutdown(deadline)
    }
}

/// KV-cache capacity in tokens: the configured budget, or the model's default, over its bytes per
/// token.
fn budget_tokens<M: DecoderModel>(config: &SchedulerConfig, model: &M) -> usize {
    let bytes = config.kv_budget_bytes.unwrap_or_else(|| model.default_kv_budget());
    bytes / model.info().kv_bytes_per_token.max(1)
}

/// A running (or preempted) generation.
struct Sequence {
    id: SeqId,
    /// Prompt, then generated tokens.
    tokens: Vec<u32>,
    prompt_len: usize,
    /// Tokens whose KV entries are in the model's cache.
    cached: usize,
    max_new_tokens: usize,
    sampler: Sampler,
    processors: Vec<Box<dyn LogitsProcessor>>,
    detokenizer: Detokenizer,
    stops: StopMatcher,
    events: mpsc::UnboundedSender<Event>,
    cached_prompt_tokens: usize,
    queued_at: Instant,
    last_token_at: Option<Instant>,
}

impl Sequence {
    fn generated(&self) -> &[u32] {
        &self.tokens[self.prompt_len..]
    }

    /// Tokens not in the cache yet (the rest of the prompt, or the last sampled token).
    fn pending(&self) -> usize {
        self.tokens.len() - self.cached
    }

    fn usage(&self) -> Usage {
        Usage {
            prompt_tokens: self.prompt_len,
            completion_tokens: self.tokens.len() - self.prompt_len,
            cached_tokens: self.cached_prompt_tokens,
        }
    }
}

/// A finished sequence's cache, kept for prompts that start the same way.
struct PrefixEntry {
    seq: SeqId,
    tokens: Vec<u32>,
    last_used: u64,
}

/// Most prefix-cache entries kept, whatever the memory budget.
const MAX_PREFIX_ENTRIES: usize = 64;

struct SchedulerMetrics {
    time_to_first_token: metrics::Histogram,
    inter_token: metrics::Histogram,
    generated: metrics::Counter,
    prompt: metrics::Counter,
    running: metrics::Gauge,
    kv_used: metrics::Gauge,
    prefix_hits: metrics::Counter,
    prefix_misses: metrics::Counter,
    prefix_tokens: metrics::Counter,
    preempted: metrics::Counter,
    step_seconds: metrics::Histogram,
    cancelled: metrics::Counter,
}

impl SchedulerMetrics {
    fn new(model: &str) -> Self {
        let labels = [("model", model.to_string())];
        Self {
            time_to_first_token: metrics::histogram!("hearth_time_to_first_token_seconds", &labels),
            inter_token: metrics::histogram!("hearth_inter_token_seconds", &labels),
            generated: metrics::counter!("hearth_generated_tokens_total", &labels),
            prompt: metrics::counter!("hearth_prompt_tokens_total", &labels),
            running: metrics::gauge!("hearth_running_sequences", &labels),
            kv_used: metrics::gauge!("hearth_kv_cache_used_ratio", &labels),
            prefix_hits: metrics::counter!("hearth_prefix_cache_hits_total", &labels),
            prefix_misses: metrics::counter!("hearth_prefix_cache_misses_total", &labels),
            prefix_tokens: metrics::counter!("hearth_prefix_cache_reused_tokens_total", &labels),
            preempted: metrics::counter!("hearth_sequences_preempted_total", &labels),
            step_seconds: metrics::histogram!("hearth_decode_step_seconds", &labels),
            cancelled: metrics::counter!("hearth_requests_cancelled_total", &labels),
        }
    }
}

struct Scheduler<M: DecoderModel> {
    model: M,
    config: SchedulerConfig,
    /// KV-cache capacity in tokens.
    budget_tokens: usize,
    context_length: usize,
    eos: HashSet<u32>,
    tokenizer: Arc<Tokenizer>,
    queue: Arc<JobQueue<Job>>,
    life: Arc<Lifecycle>,
    /// In admission order.
    running: Vec<Sequence>,
    /// Preempted sequences, oldest first: admitted again before anything new.
    preempted: VecDeque<Sequence>,
    /// Taken off the queue but not admitted yet (it did not fit).
    held: Option<(Ticket, Job)>,
    prefix: Vec<PrefixEntry>,
    next_seq: SeqId,
    clock: u64,
    metrics: SchedulerMetrics,
    backlog: Arc<Backlog>,
    /// When the last request was admitted.
    last_admission: Option<Instant>,
}

impl<M: DecoderModel> Scheduler<M> {
    fn new(
        model: M,
        config: SchedulerConfig,
        budget_tokens: usize,
        tokenizer: Arc<Tokenizer>,
        queue: Arc<JobQueue<Job>>,
        life: Arc<Lifecycle>,
        backlog: Arc<Backlog>,
    ) -> Self {
        let context_length = model.info().context_length;
        let metrics = SchedulerMetrics::new(&config.model);
        let eos = config.eos_ids.iter().copied().collect();
        Self {
            model,
            config,
            budget_tokens,
            context_length,
            eos,
            tokenizer,
            queue,
            life,
            running: Vec::new(),
            preempted: VecDeque::new(),
            held: None,
            prefix: Vec::new(),
            next_seq: 0,
            clock: 0,
            metrics,
            backlog,
            last_admission: None,
        }
    }

    fn run(mut self) {
        tracing::debug!(model = %self.config.model, budget_tokens = self.budget_tokens, "generation scheduler started");
        loop {
            if self.running.is_empty() && self.preempted.is_empty() && self.held.is_none() {
                match self.queue.pop_wait() {
                    Some(job) => self.held = Some(job),
                    None => break,
                }
            }
            if self.life.past_deadline() {
                self.abandon_all();
                continue;
            }
            self.drop_cancelled();
            self.admit();
            if self.running.is_empty() {
                continue;
            }
            let plan = self.plan();
            self.run_step(&plan);
            self.metrics.running.set(self.running.len() as f64);
            self.metrics.kv_used.set(self.used_tokens() as f64 / self.budget_tokens.max(1) as f64);
        }
        tracing::debug!(model = %self.config.model, "generation scheduler stopped");
    }

    /// Tokens cached now, or about to be: running sequences (all their tokens) and kept prefixes.
    fn used_tokens(&self) -> usize {
        self.running.iter().map(|s| s.tokens.len()).sum::<usize>()
            + self.prefix.iter().map(|e| e.tokens.len()).sum::<usize>()
    }

    fn fresh_id(&mut self) -> SeqId {
        self.next_seq += 1;
        self.next_seq
    }

    /// Past the shutdown deadline: answer everything taken but not finished.
    fn abandon_all(&mut self) {
        for sequence in self.running.drain(..).chain(self.preempted.drain(..)) {
            self.model.release(sequence.id);
            let _ = sequence.events.send(Event::Failed(self.life.shutting_down()));
        }
        if let Some((_, job)) = self.held.take() {
            job.fail(self.life.shutting_down());
        }
        for job in self.queue.drain() {
            job.fail(self.life.shutting_down());
        }
    }

    fn drop_cancelled(&mut self) {
        let mut dropped = 0;
        let model = &mut self.model;
        self.running.retain(|s| {
            let gone = s.events.is_closed();
            if gone {
                model.release(s.id);
                dropped += 1;
            }
            !gone
        });
        self.preempted.retain(|s| {
            let gone = s.events.is_closed();
            dropped += usize::from(gone);
            !gone
        });
        if self.held.as_ref().is_some_and(|(_, job)| job.events.is_closed()) {
            self.held = None;
            dropped += 1;
        }
        if dropped > 0 {
            self.metrics.cancelled.increment(dropped as u64);
            tracing::debug!(model = %self.config.model, dropped, "released sequences whose clients left");
        }
    }

    /// Frees prefix-cache entries, least recently used first, until `needed` more tokens fit.
    fn evict_for(&mut self, needed: usize) -> bool {
        while self.used_tokens() + needed > self.budget_tokens {
            let Some(oldest) =
                self.prefix.iter().enumerate().min_by_key(|(_, e)| e.last_used).map(|(i, _)| i)
            else {
                return false;
            };
            let entry = self.prefix.swap_remove(oldest);
            self.model.release(entry.seq);
        }
        true
    }

    /// Admits preempted sequences, then queued requests, while they fit.
    fn admit(&mut self) {
        while self.running.len() < self.config.max_running_sequences {
            if let Some(sequence) = self.preempted.front() {
                if !self.evict_for(sequence.tokens.len()) {
                    return;
                }
                let Some(mut sequence) = self.preempted.pop_front() else { return };
                sequence.id = self.fresh_id();
                self.running.push(sequence);
                continue;
            }
            if self.held.is_none() {
                match self.queue.try_pop() {
                    Some(job) => self.held = Some(job),
                    None => return,
                }
            }
            let prompt_len = self.held.as_ref().map_or(0, |(_, job)| job.request.prompt.len());
            if prompt_len + 1 > self.budget_tokens.min(self.context_length) {
                if let Some((_, job)) = self.held.take() {
                    job.fail(EngineError::Backend {
                        model: Arc::clone(&self.config.model),
                        message: format!(
                            "a prompt of {prompt_len} tokens does not fit the KV cache of {} tokens",
                            self.budget_tokens
                        ),
                    });
                }
                continue;
            }
            if !self.evict_for(prompt_len) {
                return; // wait for running sequences to finish
            }
            let Some((ticket, job)) = self.held.take() else { return };
            // A request that was already waiting when the one before it was admitted measures one
            // whole interval between admissions under backlog: how fast places free up.
            let now = Instant::now();
            if let Some(last) = self.last_admission.filter(|&last| ticket.arrived <= last) {
                self.backlog.record(1, now.saturating_duration_since(last).max(Duration::from_nanos(1)));
            }
            self.last_admission = Some(now);
            let sequence = self.start(job);
            self.running.push(sequence);
        }
    }

    /// A new sequence for `job`, starting from the longest cached prefix of its prompt.
    fn start(&mut self, job: Job) -> Sequence {
        let id = self.fresh_id();
        let request = job.request;
        let mut cached = 0;
        if self.config.prefix_cache {
            // At least the last prompt token is computed: its logits choose the first new token.
            let usable = request.prompt.len() - 1;
            let best = self
                .prefix
                .iter_mut()
                .map(|e| {
                    let common =
                        e.tokens.iter().zip(&request.prompt[..usable]).take_while(|(a, b)| a == b).count();
                    (common, e)
                })
                .max_by_key(|(common, _)| *common);
            if let Some((common, entry)) = best.filter(|(common, _)| *common > 0) {
                self.clock += 1;
                entry.last_used = self.clock;
                match self.model.fork(entry.seq, id, common) {
                    Ok(()) => cached = common,
                    Err(err) => {
                        tracing::warn!(model = %self.config.model, error = %err, "prefix cache fork failed")
                    }
                }
            }
            if cached > 0 {
                self.metrics.prefix_hits.increment(1);
                self.metrics.prefix_tokens.increment(cached as u64);
            } else {
                self.metrics.prefix_misses.increment(1);
            }
        }
        self.metrics.prompt.increment(request.prompt.len() as u64);
        Sequence {
            id,
            sampler: Sampler::new(request.sampling, &request.prompt),
            prompt_len: request.prompt.len(),
            tokens: request.prompt,
            cached,
            max_new_tokens: request.max_new_tokens,
            processors: request.processors,
            detokenizer: Detokenizer::new(),
            stops: StopMatcher::new(request.stop),
            events: job.events,
            cached_prompt_tokens: cached,
            queued_at: Instant::now(),
            last_token_at: None,
        }
    }

    /// This step's chunks as (running index, token count): every decoding sequence's one token,
    /// then prompt chunks in admission order within the token budget. Makes room in the KV budget,
    /// preempting the youngest sequences if it must.
    fn plan(&mut self) -> Vec<(usize, usize)> {
        loop {
            let mut budget = self.config.max_batch_tokens.max(1);
            let mut plan = Vec::with_capacity(self.running.len());
            for (i, s) in self.running.iter().enumerate() {
                if s.pending() == 1 {
                    plan.push((i, 1));
                    budget = budget.saturating_sub(1);
                }
            }
            for (i, s) in self.running.iter().enumerate() {
                let pending = s.pending();
                if pending > 1 && budget > 0 {
                    let n = pending.min(budget);
                    plan.push((i, n));
                    budget -= n;
                }
            }
            // Every planned token is already counted in `used_tokens` (sequences count all their
            // tokens); decoding adds the one being sampled after this step.
            let growth = plan.iter().filter(|&&(i, n)| self.running[i].pending() == n).count();
            if self.evict_for(growth) || self.running.len() <= 1 {
                return plan;
            }
            self.preempt_youngest();
        }
    }

    fn preempt_youngest(&mut self) {
        let Some(mut sequence) = self.running.pop() else { return };
        self.model.release(sequence.id);
        sequence.cached = 0;
        self.metrics.preempted.increment(1);
        tracing::debug!(model = %self.config.model, tokens = sequence.tokens.len(), "preempted a sequence to free KV cache");
        self.preempted.push_front(sequence);
    }

    fn run_step(&mut self, plan: &[(usize, usize)]) {
        let started = Instant::now();
        let chunks: Vec<Chunk> = plan
            .iter()
            .map(|&(i, n)| {
                let s = &self.running[i];
                Chunk {
                    seq: s.id,
                    start: s.cached,
                    tokens: &s.tokens[s.cached..s.cached + n],
                    logits: s.cached + n == s.tokens.len(),
                }
            })
            .collect();
        let wants_logits: Vec<bool> = chunks.iter().map(|c| c.logits).collect();
        let model = &mut self.model;
        let result = match catch_unwind(AssertUnwindSafe(|| model.step(&chunks))) {
            Ok(Ok(rows)) if rows.len() == wants_logits.iter().filter(|&&w| w).count() => Ok(rows),
            Ok(Ok(rows)) => Err(format!(
                "the model returned {} rows of logits, expected {}",
                rows.len(),
                wants_logits.iter().filter(|&&w| w).count()
            )),
            Ok(Err(err)) => Err(err.to_string()),
            Err(panic) => Err(format!("the model {}", panic_message(&panic))),
        };
        drop(chunks);
        self.metrics.step_seconds.record(started.elapsed().as_secs_f64());
        let rows = match result {
            Ok(rows) => rows,
            Err(message) => {
                tracing::error!(model = %self.config.model, %message, "decode step failed");
                let mut failed: Vec<usize> = plan.iter().map(|&(i, _)| i).collect();
                failed.sort_unstable();
                for &i in failed.iter().rev() {
                    let sequence = self.running.remove(i);
                    self.model.release(sequence.id);
                    let error = EngineError::Backend {
                        model: Arc::clone(&self.config.model),
                        message: message.clone(),
                    };
                    let _ = sequence.events.send(Event::Failed(error));
                }
                return;
            }
        };
        let mut rows = rows.into_iter();
        let mut finished = Vec::new();
        for (&(i, n), wants) in plan.iter().zip(wants_logits) {
            self.running[i].cached += n;
            if !wants {
                continue;
            }
            let Some(mut logits) = rows.next() else { break };
            if let Some(reason) = self.advance(i, &mut logits) {
                finished.push((i, reason));
            }
        }
        finished.sort_unstable_by_key(|&(i, _)| std::cmp::Reverse(i));
        for (i, outcome) in finished {
            let sequence = self.running.remove(i);
            self.finish(sequence, outcome);
        }
    }

    /// Samples sequence `i`'s next token from `logits` and streams it. `Some` when it is done.
    fn advance(&mut self, i: usize, logits: &mut [f32]) -> Option<Outcome> {
        if logits.iter().any(|x| x.is_nan()) {
            return Some(Outcome::Failed("the model produced NaN logits".into()));
        }
        let room = self.context_length.min(self.budget_tokens);
        let s = &mut self.running[i];
        let token = s.sampler.sample(logits, &s.tokens[s.prompt_len..], &mut s.processors);
        s.tokens.push(token);
        let now = Instant::now();
        match s.last_token_at {
            None => self.metrics.time_to_first_token.record(now.duration_since(s.queued_at).as_secs_f64()),
            Some(previous) => self.metrics.inter_token.record(now.duration_since(previous).as_secs_f64()),
        }
        s.last_token_at = Some(now);
        self.metrics.generated.increment(1);
        if self.eos.contains(&token) {
            return Some(Outcome::Done { reason: FinishReason::Stop, flush: true });
        }
        let text = s.detokenizer.push(&self.tokenizer, token);
        match s.stops.push(&text) {
            Matched::Stop(before) => {
                let _ = s.events.send(Event::Token { id: token, text: before });
                Some(Outcome::Done { reason: FinishReason::Stop, flush: false })
            }
            Matched::Text(text) => {
                let _ = s.events.send(Event::Token { id: token, text });
                let limit = s.generated().len() >= s.max_new_tokens || s.tokens.len() >= room;
                limit.then_some(Outcome::Done { reason: FinishReason::Length, flush: true })
            }
        }
    }

    fn finish(&mut self, mut sequence: Sequence, outcome: Outcome) {
        match outcome {
            Outcome::Done { mut reason, flush } => {
                // What the detokenizer and the stop matcher still hold, unless a stop string ended
                // generation (nothing after it is emitted).
                let mut text = String::new();
                if flush {
                    let tail = sequence.detokenizer.finish(&self.tokenizer);
                    match sequence.stops.push(&tail) {
                        Matched::Stop(before) => {
                            text = before;
                            reason = FinishReason::Stop;
                        }
                        Matched::Text(emit) => {
                            text = emit;
                            text.push_str(&sequence.stops.finish());
                        }
                    }
                }
                let _ = sequence.events.send(Event::Finished { reason, text, usage: sequence.usage() });
                self.keep_prefix(sequence);
            }
            Outcome::Failed(message) => {
                tracing::error!(model = %self.config.model, %message, "generation failed");
                self.model.release(sequence.id);
                let error = EngineError::Backend { model: Arc::clone(&self.config.model), message };
                let _ = sequence.events.send(Event::Failed(error));
            }
        }
    }

    /// Keeps a finished sequence's cache for prompts that start the same way.
    fn keep_prefix(&mut self, sequence: Sequence) {
        if !self.config.prefix_cache || sequence.cached == 0 {
            self.model.release(sequence.id);
            return;
        }
        let mut tokens = sequence.tokens;
        tokens.truncate(sequence.cached);
        // An entry this one extends is no longer needed.
        let model = &mut self.model;
        self.prefix.retain(|e| {
            let covered = e.tokens.len() <= tokens.len() && tokens[..e.tokens.len()] == e.tokens[..];
            if covered {
                model.release(e.seq);
            }
            !covered
        });
        self.clock += 1;
        self.prefix.push(PrefixEntry { seq: sequence.id, tokens, last_used: self.clock });
        while self.prefix.len() > MAX_PREFIX_ENTRIES || self.used_tokens() > self.budget_tokens {
            let Some(oldest) =
                self.prefix.iter().enumerate().min_by_key(|(_, e)| e.last_used).map(|(i, _)| i)
            else {
                break;
            };
            let entry = self.prefix.swap_remove(oldest);
            self.model.release(entry.seq);
        }
    }
}

enum Outcome {
    /// `flush`: emit what the detokenizer and stop matcher hold (not after a stop string).
    Done {
        reason: FinishReason,
        flush: bool,
    },
    Failed(String),
}
