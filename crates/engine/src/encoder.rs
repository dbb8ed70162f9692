//! Encoder models (sentence embedders, cross-encoders) behind one owner thread with dynamic batching.
//!
//! A request becomes one [`Job`] of tokenized sequences. The owner thread keeps the jobs it has taken
//! from the queue and fills each forward pass from all of them ([`plan_batch`]):
//! - the job first in line (by [`Ticket`]: arrival time, with a head start for higher priorities) is
//!   the anchor, and its longest remaining sequence is always in the batch, so every job progresses
//!   in its turn and no class starves;
//! - the rest of the batch is every pending job's remaining sequences that are no longer than the
//!   anchor's, longest first, so sequences of similar length share a batch and padding stays small;
//! - the batch stops at `max_batch_size` sequences, at `max_batch_tokens` padded tokens, or when the
//!   model's estimate of its peak activation memory would pass the memory budget (attention memory
//!   grows with the square of the length, so a token budget alone cannot bound it).
//!
//! One large request can span several batches, and several small ones share one. A job whose caller
//! has gone is dropped before any more of it reaches the model. Outputs are checked: a NaN or an
//! infinity fails the batch (a 500, logged), it is never an answer.
//!
//! Lifecycle: if the owner thread dies (a panic outside a forward pass), the model is failed: queued
//! and later requests get [`EngineError::ModelFailed`] at once, and [`EncoderHandle::failed`]
//! resolves so a supervisor can reload it. [`EncoderHandle::shutdown`] lets queued work finish until
//! a deadline and answers what is left with [`EngineError::ShuttingDown`].

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::backlog::Backlog;
use crate::error::{panic_message, BoxError, EngineError, Overload};
use crate::owner::{Answer, Lifecycle, Owner};
use crate::queue::{JobQueue, Priority, Ticket};

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

/// Model outputs whose values can be checked: a NaN or an infinity is a failure, never an answer.
pub trait Finite {
    fn is_finite(&self) -> bool;
}

impl Finite for f32 {
    fn is_finite(&self) -> bool {
        f32::is_finite(*self)
    }
}

impl Finite for Vec<f32> {
    fn is_finite(&self) -> bool {
        self.iter().all(|x| x.is_finite())
    }
}

/// The capability every encoder backend implements. The owner thread calls it; implementations need
/// not be `Send` because they are built on that thread.
pub trait EncoderModel: 'static {
    type Output: Finite + Send + 'static;

    /// Runs one batch: one output per sequence, in order.
    fn forward(&mut self, batch: &[&Sequence]) -> Result<Vec<Self::Output>, BoxError>;

    /// Estimated peak bytes of activations for a padded batch of `n` sequences of `longest` tokens.
    fn activation_bytes(&self, n: usize, longest: usize) -> usize;

    /// The activation memory one forward pass may use when the config sets no budget: what the
    /// model's device can spare.
    fn default_memory_budget(&self) -> usize;

    /// Padded tokens per forward pass when the config sets none. Measured on CPU (benches/README.md,
    /// "Batch size on a CPU"): passes of a few hundred tokens run fastest per token, while on a GPU
    /// larger batches pay; this default suits a GPU.
    fn default_batch_tokens(&self) -> usize {
        16_384
    }
}

/// How large one forward pass may grow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchLimits {
    /// Upper bound on `sequences × longest sequence` (padded tokens); `None`: the model's device
    /// default ([`EncoderModel::default_batch_tokens`]).
    pub max_batch_tokens: Option<usize>,
    /// Upper bound on sequences per forward pass.
    pub max_batch_size: usize,
    /// Upper bound on the model's estimate of a batch's peak activation memory, in bytes; `None`:
    /// the model's device default. A single sequence over any budget still runs, alone.
    pub max_batch_bytes: Option<usize>,
}

#[derive(Clone, Debug)]
pub struct WorkerConfig {
    pub model: Arc<str>,
    pub batch: BatchLimits,
    /// Requests that may wait in the queue before new ones are refused with 429.
    pub queue_depth: usize,
    /// Refuse a request at once (429) when the work ahead would keep it waiting longer than this
    /// (see [`crate::backlog`]); `None`: only the queue depth bounds waiting.
    pub max_queue_wait: Option<Duration>,
}

type Reply<O> = oneshot::Sender<Result<Vec<O>, EngineError>>;

struct Job<O> {
    sequences: Vec<Sequence>,
    reply: Reply<O>,
}

impl<O: Send + 'static> Answer for Job<O> {
    fn fail(self, error: EngineError) {
        let _ = self.reply.send(Err(error));
    }
}

/// The async side of an encoder worker: submits jobs and awaits their answers.
pub struct EncoderHandle<O> {
    owner: Owner<Job<O>>,
    /// Tokens admitted and not answered, and the recent time per token.
    backlog: Arc<Backlog>,
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
        let (model, queue_depth) = (Arc::clone(&config.model), config.queue_depth);
        let backlog = Arc::new(Backlog::new(&model, config.max_queue_wait));
        let worker_backlog = Arc::clone(&backlog);
        let run = move |model: M, queue, life| Worker::new(model, config, queue, life, worker_backlog).run();
        let (owner, info) = Owner::start(model, queue_depth, load, run).await?;
        Ok((Self { owner, backlog }, info))
    }

    /// Queues `sequences` and waits for one output per sequence. Refuses at once when the queue is
    /// full, when the work ahead would wait longer than `max_queue_wait`, or when the model has
    /// failed. Dropping the returned future withdraws the job before it reaches the model.
    pub async fn encode(&self, sequences: Vec<Sequence>, priority: Priority) -> Result<Vec<O>, EngineError> {
        let tokens: usize = sequences.iter().map(Sequence::len).sum();
        let _admitted = self.backlog.admit(tokens as u64).map_err(|refused| EngineError::Overloaded {
            model: Arc::clone(self.model()),
            reason: Overload::ExpectedWait { expected: refused.expected, max: refused.max },
        })?;
        let (reply, answer) = oneshot::channel();
        let span = tracing::info_span!("model", model = %self.model(), sequences = sequences.len(), tokens);
        self.owner.push(Job { sequences, reply }, priority)?;
        // The span covers the queue wait and every batch that runs part of this job.
        match tracing::Instrument::instrument(answer, span).await {
            Ok(result) => result,
            // The owner thread dropped the job without answering: it died holding it.
            Err(_) => Err(self.owner.life.failed()),
        }
    }

    /// The id of the model this worker serves.
    pub fn model(&self) -> &Arc<str> {
        &self.owner.life.model
    }

    pub fn queue_len(&self) -> usize {
        self.owner.queue.len()
    }

    /// How long a request queued now is expected to wait (see [`crate::backlog`]).
    pub fn expected_wait(&self) -> Duration {
        self.backlog.expected_wait()
    }

    /// False once the owner thread has died.
    pub fn is_alive(&self) -> bool {
        self.owner.is_alive()
    }

    /// Resolves once the owner thread has died (never, while it lives).
    pub async fn failed(&self) {
        self.owner.failed().await
    }

    /// Stops accepting jobs from now on; what is queued runs until `deadline`. Returns at once.
    pub fn begin_shutdown(&self, deadline: Instant) {
        self.owner.begin_shutdown(deadline)
    }

    /// Stops accepting jobs and lets the owner thread finish what is queued until `deadline`; jobs
    /// not started by then are answered [`EngineError::ShuttingDown`]. Blocks until the thread has
    /// stopped, or shortly after the deadline if a forward pass is still running.
    pub fn shutdown(&self, deadline: Instant) {
        self.owner.shutdown(deadline)
    }
}

/// A job taken off the queue, partly run.
struct InFlight<O> {
    job: Job<O>,
    ticket: Ticket,
    /// Indices of the sequences not run yet, longest first.
    remaining: Vec<usize>,
    outputs: Vec<Option<O>>,
    started: bool,
}

impl<O> InFlight<O> {
    fn new(ticket: Ticket, job: Job<O>) -> Self {
        let mut remaining: Vec<usize> = (0..job.sequences.len()).collect();
        remaining.sort_by_key(|&i| std::cmp::Reverse(job.sequences[i].len()));
        let outputs = std::iter::repeat_with(|| None).take(job.sequences.len()).collect();
        Self { job, ticket, remaining, outputs, started: false }
    }

    fn len_of(&self, sequence: usize) -> usize {
        self.job.sequences[sequence].len().max(1)
    }
}

/// The limits a batch is planned under, with the memory budget resolved.
struct Budget<'a> {
    max_tokens: usize,
    max_size: usize,
    max_bytes: usize,
    bytes: &'a dyn Fn(usize, usize) -> usize,
}

/// Chooses the next batch as (pending index, sequence index) pairs; see the module docs.
fn plan_batch<O>(pending: &VecDeque<InFlight<O>>, budget: &Budget) -> Vec<(usize, usize)> {
    let Some((anchor, flight)) =
        pending.iter().enumerate().filter(|(_, f)| !f.remaining.is_empty()).min_by_key(|(_, f)| f.ticket)
    else {
        return Vec::new();
    };
    let first = flight.remaining[0];
    let longest = flight.len_of(first);
    let mut candidates: Vec<(usize, usize, usize, Ticket)> = pending
        .iter()
        .enumerate()
        .flat_map(|(p, f)| f.remaining.iter().map(move |&s| (p, s, f.len_of(s), f.ticket)))
        .filter(|&(p, s, len, _)| len <= longest && (p, s) != (anchor, first))
        .collect();
    candidates.sort_by(|a, b| b.2.cmp(&a.2).then(a.3.cmp(&b.3)).then(a.1.cmp(&b.1)));
    let mut picks = vec![(anchor, first)];
    for (p, s, _, _) in candidates {
        let n = picks.len() + 1;
        if n > budget.max_size
            || n * longest > budget.max_tokens
            || (budget.bytes)(n, longest) > budget.max_bytes
        {
            break;
        }
        picks.push((p, s));
    }
    picks
}

/// How many batches' worth of sequences the owner thread takes off the queue to plan from.
const LOOKAHEAD_BATCHES: usize = 2;

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
    max_batch_bytes: usize,
    max_batch_tokens: usize,
    queue: Arc<JobQueue<Job<M::Output>>>,
    life: Arc<Lifecycle>,
    pending: VecDeque<InFlight<M::Output>>,
    metrics: WorkerMetrics,
    backlog: Arc<Backlog>,
}

impl<M: EncoderModel> Worker<M> {
    fn new(
        model: M,
        config: WorkerConfig,
        queue: Arc<JobQueue<Job<M::Output>>>,
        life: Arc<Lifecycle>,
        backlog: Arc<Backlog>,
    ) -> Self {
        let metrics = WorkerMetrics::new(&config.model);
        let max_batch_bytes = config.batch.max_batch_bytes.unwrap_or_else(|| model.default_memory_budget());
        let max_batch_tokens = config.batch.max_batch_tokens.unwrap_or_else(|| model.default_batch_tokens());
        tracing::debug!(model = %config.model, max_batch_tokens, max_batch_bytes, "encoder batch limits");
        Self {
            model,
            config,
            max_batch_bytes,
            max_batch_tokens,
            queue,
            life,
            pending: VecDeque::new(),
            metrics,
            backlog,
        }
    }

    fn run(mut self) {
        tracing::debug!(model = %self.config.model, "encoder worker started");
        while self.fill_pending() {
            if self.life.past_deadline() {
                self.abandon_pending();
                continue;
            }
            self.drop_cancelled();
            let model = &self.model;
            let bytes = |n, longest| model.activation_bytes(n, longest);
            let budget = Budget {
                max_tokens: self.max_batch_tokens,
                max_size: self.config.batch.max_batch_size,
                max_bytes: self.max_batch_bytes,
                bytes: &bytes,
            };
            let picks = plan_batch(&self.pending, &budget);
            if !picks.is_empty() {
                self.run_batch(&picks);
            }
        }
        tracing::debug!(model = %self.config.model, "encoder worker stopped");
    }

    /// Blocks for work while idle, then tops up without blocking, to [`LOOKAHEAD_BATCHES`] batches'
    /// worth of sequences so the planner can match lengths across jobs. False once closed and drained.
    fn fill_pending(&mut self) -> bool {
        if self.pending.is_empty() {
            match self.queue.pop_wait() {
                Some((ticket, job)) => self.pending.push_back(InFlight::new(ticket, job)),
                None => return false,
            }
        }
        let enough = LOOKAHEAD_BATCHES * self.config.batch.max_batch_size;
        while self.pending.iter().map(|f| f.remaining.len()).sum::<usize>() < enough {
            match self.queue.try_pop() {
                Some((ticket, job)) => self.pending.push_back(InFlight::new(ticket, job)),
                None => break,
            }
        }
        true
    }

    /// Past the shutdown deadline: answer everything taken but not finished.
    fn abandon_pending(&mut self) {
        for flight in self.pending.drain(..) {
            flight.job.fail(self.life.shutting_down());
        }
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

    fn run_batch(&mut self, picks: &[(usize, usize)]) {
        let now = Instant::now();
        for &(p, _) in picks {
            let flight = &mut self.pending[p];
            if !flight.started {
                flight.started = true;
                self.metrics
                    .queue_wait_seconds
                    .record(now.duration_since(flight.ticket.arrived).as_secs_f64());
            }
        }
        let batch: Vec<&Sequence> = picks.iter().map(|&(p, s)| &self.pending[p].job.sequences[s]).collect();
        let longest = batch.iter().map(|s| s.len()).max().unwrap_or(0);
        let real_tokens: usize = batch.iter().map(|s| s.len()).sum();
        self.metrics.batch_size.record(batch.len() as f64);
        self.metrics.batch_tokens.record((batch.len() * longest) as f64);

        let model = &mut self.model;
        let result = match catch_unwind(AssertUnwindSafe(|| model.forward(&batch))) {
            Ok(Ok(outputs)) if outputs.len() != batch.len() => {
                Err(format!("the model returned {} outputs for a batch of {}", outputs.len(), batch.len()))
            }
            Ok(Ok(outputs)) => match outputs.iter().filter(|o| !o.is_finite()).count() {
                0 => Ok(outputs),
                bad => Err(format!(
                    "the model produced NaN or infinite values for {bad} of {} sequences (a dtype \
                     overflow? try `dtype = \"f32\"`)",
                    outputs.len()
                )),
            },
            Ok(Err(err)) => Err(err.to_string()),
            Err(panic) => Err(format!("the model {}", panic_message(&panic))),
        };
        let elapsed = now.elapsed();
        self.metrics.batch_seconds.record(elapsed.as_secs_f64());
        self.backlog.record(real_tokens as u64, elapsed);

        match result {
            Ok(outputs) => {
                self.metrics.tokens.increment(real_tokens as u64);
                for (&(p, s), output) in picks.iter().zip(outputs) {
                    let flight = &mut self.pending[p];
                    flight.outputs[s] = Some(output);
                    flight.remaining.retain(|&r| r != s);
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
        let (finished, unfinished): (VecDeque<_>, VecDeque<_>) =
            std::mem::take(&mut self.pending).into_iter().partition(|f| f.remaining.is_empty());
        self.pending = unfinished;
        for flight in finished {
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
        failed.sort_unstable();
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// Pending jobs from `(seconds ago, priority, sequence lengths)`.
    fn pending(jobs: &[(u64, Priority, &[usize])]) -> VecDeque<InFlight<f32>> {
        let now = Instant::now();
        jobs.iter()
            .map(|&(ago, priority, lengths)| {
                let sequences = lengths.iter().map(|&len| Sequence::new(vec![1; len])).collect();
                let (reply, _) = oneshot::channel();
                let ticket = Ticket { arrived: now - Duration::from_secs(ago), priority };
                InFlight::new(ticket, Job { sequences, reply })
            })
            .collect()
    }

    fn plan(
        jobs: &[(u64, Priority, &[usize])],
        max_tokens: usize,
        max_size: usize,
        max_bytes: usize,
    ) -> Vec<(usize, usize)> {
        // Memory: 1 byte per padded token plus a quadratic attention term.
        let bytes = |n: usize, longest: usize| n * longest + n * longest * longest;
        plan_batch(&pending(jobs), &Budget { max_tokens, max_size, max_bytes, bytes: &bytes })
    }

    const ROOMY: usize = usize::MAX;

    #[test]
    fn the_oldest_job_anchors_and_similar_lengths_from_every_job_fill_the_batch() {
        let jobs: &[(u64, Priority, &[usize])] = &[
            (9, Priority::Normal, &[10, 3]),
            (5, Priority::Normal, &[30, 9, 2]),
            (1, Priority::Normal, &[10, 8]),
        ];
        // Anchor: job 0's 10 tokens; longest first from all jobs (job 1's 30 is too long to join).
        assert_eq!(plan(jobs, ROOMY, 4, ROOMY), [(0, 0), (2, 0), (1, 1), (2, 1)]);
    }

    #[test]
    fn premium_jobs_anchor_first_within_their_head_start() {
        let jobs: &[(u64, Priority, &[usize])] = &[(1, Priority::Normal, &[4]), (0, Priority::High, &[6])];
        assert_eq!(plan(jobs, ROOMY, 1, ROOMY), [(1, 0)]);
        let starving: &[(u64, Priority, &[usize])] =
            &[(60, Priority::Normal, &[4]), (0, Priority::High, &[6])];
        assert_eq!(plan(starving, ROOMY, 1, ROOMY), [(0, 0)]);
    }

    #[test]
    fn token_and_memory_budgets_cut_the_batch() {
        let jobs: &[(u64, Priority, &[usize])] = &[(1, Priority::Normal, &[8, 8, 8, 8])];
        assert_eq!(plan(jobs, 16, 64, ROOMY).len(), 2, "16 padded tokens hold two rows of 8");
        // Each row costs 8 + 64 = 72 bytes: a budget of 150 holds two, 100 one.
        assert_eq!(plan(jobs, ROOMY, 64, 150).len(), 2);
        assert_eq!(plan(jobs, ROOMY, 64, 100).len(), 1);
        assert_eq!(plan(jobs, ROOMY, 64, 1).len(), 1, "one sequence always runs, alone");
    }
}
