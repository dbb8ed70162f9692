//! Encoder models (sentence embedders, cross-encoders) behind one owner thread with dynamic batching.
//!
//! A request becomes one [`Job`] of tokenized sequences. The owner thread keeps the jobs it has taken
//! from the queue in arrival order and fills each forward pass with their sequences, longest first
//! within a job, until the batch reaches `max_batch_size` sequences or its padded size
//! (`sequences × longest`) would pass `max_batch_tokens`. One large request can therefore span several
//! batches, and several small ones share one. A job whose caller has gone (the reply channel is
//! closed) is dropped before any more of it reaches the model.

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use tokio::sync::oneshot;

use crate::error::{BoxError, EngineError, Overload};
use crate::queue::{JobQueue, Priority, PushError};

/// One tokenized input: token ids and their segment (token type) ids, special tokens included.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sequence {
    pub ids: Vec<u32>,
    pub type_ids: Vec<u32>,
}

impl Sequence {
    /// A single-segment sequence (all token types 0).
    pub fn new(ids: Vec<u32>) -> Self {
        let type_ids = vec![0; ids.len()];
        Self { ids, type_ids }
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

/// The capability every encoder backend implements: run one batch, one output per sequence, in order.
/// The owner thread calls it; implementations need not be `Send` because they are built on that thread.
pub trait EncoderModel: 'static {
    type Output: Send + 'static;

    fn forward(&mut self, batch: &[&Sequence]) -> Result<Vec<Self::Output>, BoxError>;
}

/// How large one forward pass may grow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchLimits {
    /// Upper bound on `sequences × longest sequence` (padded tokens). A single longer sequence still
    /// runs alone.
    pub max_batch_tokens: usize,
    /// Upper bound on sequences per forward pass.
    pub max_batch_size: usize,
}

#[derive(Clone, Debug)]
pub struct WorkerConfig {
    pub model: Arc<str>,
    pub batch: BatchLimits,
    /// Requests that may wait in the queue before new ones are refused with 429.
    pub queue_depth: usize,
}

type Reply<O> = oneshot::Sender<Result<Vec<O>, EngineError>>;

struct Job<O> {
    sequences: Vec<Sequence>,
    reply: Reply<O>,
    enqueued_at: Instant,
}

/// The async side of an encoder worker: submits jobs and awaits their answers.
pub struct EncoderHandle<O> {
    model: Arc<str>,
    queue: Arc<JobQueue<Job<O>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl<O: Send + 'static> EncoderHandle<O> {
    /// Spawns the owner thread, runs `load` on it, and returns once the model is ready. `load` returns
    /// the model and a description of it (`I`) for the caller.
    pub async fn start<M, I, F>(config: WorkerConfig, load: F) -> Result<(Self, I), BoxError>
    where
        M: EncoderModel<Output = O>,
        I: Send + 'static,
        F: FnOnce() -> Result<(M, I), BoxError> + Send + 'static,
    {
        let labels = [("model", config.model.to_string())];
        let queue =
            Arc::new(JobQueue::new(config.queue_depth, metrics::gauge!("hearth_queue_depth", &labels)));
        let model_id = Arc::clone(&config.model);
        let (loaded_tx, loaded_rx) = oneshot::channel();
        let worker_queue = Arc::clone(&queue);
        let thread =
            std::thread::Builder::new().name(format!("model-{}", config.model)).spawn(move || {
                let model = match catch_unwind(AssertUnwindSafe(load)) {
                    Ok(Ok((model, info))) => {
                        if loaded_tx.send(Ok(info)).is_err() {
                            return; // the caller gave up waiting
                        }
                        model
                    }
                    Ok(Err(err)) => {
                        let _ = loaded_tx.send(Err(err));
                        return;
                    }
                    Err(panic) => {
                        let _ = loaded_tx.send(Err(panic_message(&panic).into()));
                        return;
                    }
                };
                Worker::new(model, config, worker_queue).run();
            })?;
        let handle = Self { model: model_id, queue, thread: Mutex::new(Some(thread)) };
        match loaded_rx.await {
            Ok(Ok(info)) => Ok((handle, info)),
            Ok(Err(err)) => Err(err),
            Err(_) => Err("the model's loader thread exited without reporting".into()),
        }
    }

    /// Queues `sequences` and waits for one output per sequence. Refuses at once when the queue is
    /// full. Dropping the returned future withdraws the job before it reaches the model.
    pub async fn encode(&self, sequences: Vec<Sequence>, priority: Priority) -> Result<Vec<O>, EngineError> {
        let (reply, answer) = oneshot::channel();
        let job = Job { sequences, reply, enqueued_at: Instant::now() };
        self.queue.try_push(job, priority).map_err(|err| match err {
            PushError::Full(_) => EngineError::Overloaded {
                model: Arc::clone(&self.model),
                reason: Overload::QueueFull { queue_depth: self.queue.capacity() },
            },
            PushError::Closed(_) => EngineError::ShuttingDown { model: Arc::clone(&self.model) },
        })?;
        answer.await.unwrap_or_else(|_| {
            Err(EngineError::Backend {
                model: Arc::clone(&self.model),
                message: "the model's worker thread stopped".into(),
            })
        })
    }

    /// The id of the model this worker serves.
    pub fn model(&self) -> &Arc<str> {
        &self.model
    }

    pub fn queue_len(&self) -> usize {
        self.queue.len()
    }

    /// Stops accepting jobs, lets the owner thread finish what is queued, and waits for it.
    pub fn shutdown(&self) {
        self.queue.close();
        let thread = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(thread) = thread {
            let _ = thread.join();
        }
    }
}

impl<O> Drop for EncoderHandle<O> {
    fn drop(&mut self) {
        // The owner thread exits once the queue is drained; nobody waits for it here.
        self.queue.close();
    }
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    let detail = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into());
    format!("the model panicked: {detail}")
}

/// A job taken off the queue, partly run.
struct InFlight<O> {
    job: Job<O>,
    /// Sequence indices, longest first: batches of similar lengths waste less on padding.
    order: Vec<usize>,
    /// Position in `order` of the next sequence to run.
    next: usize,
    outputs: Vec<Option<O>>,
    started: bool,
}

impl<O> InFlight<O> {
    fn new(job: Job<O>) -> Self {
        let mut order: Vec<usize> = (0..job.sequences.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(job.sequences[i].len()));
        let outputs = std::iter::repeat_with(|| None).take(job.sequences.len()).collect();
        Self { job, order, next: 0, outputs, started: false }
    }

    fn remaining(&self) -> usize {
        self.order.len() - self.next
    }
}

struct WorkerMetrics {
    batch_size: metrics::Histogram,
    batch_tokens: metrics::Histogram,
    batch_seconds: metrics::Histogram,
    queue_wait_seconds: metrics::Histogram,
    tokens: metrics::Counter,
    cancelled: metrics::Counter,
}

impl WorkerMetrics {
    fn new(model: &str) -> Self {
        let labels = [("model", model.to_string())];
        Self {
            batch_size: metrics::histogram!("hearth_batch_size", &labels),
            batch_tokens: metrics::histogram!("hearth_batch_padded_tokens", &labels),
            batch_seconds: metrics::histogram!("hearth_batch_duration_seconds", &labels),
            queue_wait_seconds: metrics::histogram!("hearth_queue_wait_seconds", &labels),
            tokens: metrics::counter!("hearth_tokens_processed_total", &labels),
            cancelled: metrics::counter!("hearth_requests_cancelled_total", &labels),
        }
    }
}

struct Worker<M: EncoderModel> {
    model: M,
    config: WorkerConfig,
    queue: Arc<JobQueue<Job<M::Output>>>,
    pending: VecDeque<InFlight<M::Output>>,
    metrics: WorkerMetrics,
}

impl<M: EncoderModel> Worker<M> {
    fn new(model: M, config: WorkerConfig, queue: Arc<JobQueue<Job<M::Output>>>) -> Self {
        let metrics = WorkerMetrics::new(&config.model);
        Self { model, config, queue, pending: VecDeque::new(), metrics }
    }

    fn run(mut self) {
        tracing::debug!(model = %self.config.model, "encoder worker started");
        while self.fill_pending() {
            self.drop_cancelled();
            let picks = self.plan_batch();
            if !picks.is_empty() {
                self.run_batch(&picks);
            }
        }
        tracing::debug!(model = %self.config.model, "encoder worker stopped");
    }

    /// Blocks for work while idle, then tops up without blocking. False once closed and drained.
    fn fill_pending(&mut self) -> bool {
        if self.pending.is_empty() {
            match self.queue.pop_wait() {
                Some(job) => self.pending.push_back(InFlight::new(job)),
                None => return false,
            }
        }
        while self.pending.iter().map(InFlight::remaining).sum::<usize>() < self.config.batch.max_batch_size {
            match self.queue.try_pop() {
                Some(job) => self.pending.push_back(InFlight::new(job)),
                None => break,
            }
        }
        true
    }

    fn drop_cancelled(&mut self) {
        let before = self.pending.len();
        self.pending.retain(|f| !f.job.reply.is_closed());
        let dropped = before - self.pending.len();
        if dropped > 0 {
            self.metrics.cancelled.increment(dropped as u64);
            tracing::debug!(model = %self.config.model, dropped, "dropped requests whose clients left");
        }
    }

    /// Chooses the next batch as (pending index, sequence index) pairs, in arrival order.
    fn plan_batch(&self) -> Vec<(usize, usize)> {
        let limits = self.config.batch;
        let mut picks = Vec::new();
        let mut longest = 0;
        'jobs: for (p, flight) in self.pending.iter().enumerate() {
            for &s in &flight.order[flight.next..] {
                let len = flight.job.sequences[s].len().max(1);
                let new_longest = longest.max(len);
                let full = picks.len() >= limits.max_batch_size
                    || (picks.len() + 1) * new_longest > limits.max_batch_tokens;
                if full && !picks.is_empty() {
                    break 'jobs;
                }
                picks.push((p, s));
                longest = new_longest;
            }
        }
        picks
    }

    fn run_batch(&mut self, picks: &[(usize, usize)]) {
        let now = Instant::now();
        for &(p, _) in picks {
            let flight = &mut self.pending[p];
            if !flight.started {
                flight.started = true;
                self.metrics
                    .queue_wait_seconds
                    .record(now.duration_since(flight.job.enqueued_at).as_secs_f64());
            }
        }
        let batch: Vec<&Sequence> = picks.iter().map(|&(p, s)| &self.pending[p].job.sequences[s]).collect();
        let longest = batch.iter().map(|s| s.len()).max().unwrap_or(0);
        let real_tokens: usize = batch.iter().map(|s| s.len()).sum();
        self.metrics.batch_size.record(batch.len() as f64);
        self.metrics.batch_tokens.record((batch.len() * longest) as f64);

        let model = &mut self.model;
        let result = match catch_unwind(AssertUnwindSafe(|| model.forward(&batch))) {
            Ok(Ok(outputs)) if outputs.len() == batch.len() => Ok(outputs),
            Ok(Ok(outputs)) => {
                Err(format!("the model returned {} outputs for a batch of {}", outputs.len(), batch.len()))
            }
            Ok(Err(err)) => Err(err.to_string()),
            Err(panic) => Err(panic_message(&panic)),
        };
        self.metrics.batch_seconds.record(now.elapsed().as_secs_f64());

        match result {
            Ok(outputs) => {
                self.metrics.tokens.increment(real_tokens as u64);
                for (&(p, s), output) in picks.iter().zip(outputs) {
                    let flight = &mut self.pending[p];
                    flight.outputs[s] = Some(output);
                    flight.next += 1;
                }
                self.answer_finished();
            }
            Err(message) => {
                tracing::error!(model = %self.config.model, %message, batch = picks.len(), "batch failed");
                self.fail_jobs(picks, &message);
            }
        }
    }

    fn answer_finished(&mut self) {
        let mut i = 0;
        while i < self.pending.len() {
            if self.pending[i].remaining() > 0 {
                i += 1;
                continue;
            }
            let Some(flight) = self.pending.remove(i) else { break };
            let outputs: Option<Vec<_>> = flight.outputs.into_iter().collect();
            let answer = outputs.ok_or_else(|| EngineError::Backend {
                model: Arc::clone(&self.config.model),
                message: "a finished job is missing outputs".into(),
            });
            // The caller may have left meanwhile; nothing to do then.
            let _ = flight.job.reply.send(answer);
        }
    }

    fn fail_jobs(&mut self, picks: &[(usize, usize)], message: &str) {
        let mut failed: Vec<usize> = picks.iter().map(|&(p, _)| p).collect();
        failed.dedup();
        for &p in failed.iter().rev() {
            if let Some(flight) = self.pending.remove(p) {
                let _ = flight.job.reply.send(Err(EngineError::Backend {
                    model: Arc::clone(&self.config.model),
                    message: message.to_string(),
                }));
            }
        }
    }
}
