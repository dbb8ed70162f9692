//! Scheduling behaviour of the encoder worker, observed through a recording test double: a model
//! whose forward pass records the batches it saw and can be held at a gate. (Real models are covered
//! by the backends' tests; these tests are about who runs when, which a real model cannot show.)

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use hearth_engine::encoder::{BatchLimits, EncoderHandle, EncoderModel, Finite, Sequence, WorkerConfig};
use hearth_engine::error::Overload;
use hearth_engine::{BoxError, EngineError, Priority};

/// Shared view of what the recording model did.
#[derive(Default)]
struct Log {
    /// First token id of every sequence, per batch.
    batches: Mutex<Vec<Vec<u32>>>,
    /// Forward passes begun (including one held at the gate).
    entered: AtomicUsize,
    gate: Mutex<bool>,
    opened: Condvar,
}

impl Log {
    fn batches(&self) -> Vec<Vec<u32>> {
        self.batches.lock().unwrap().clone()
    }

    fn open_gate(&self) {
        *self.gate.lock().unwrap() = true;
        self.opened.notify_all();
    }
}

/// What the recording model answers: a number, which the worker checks like a real output.
#[derive(Debug, PartialEq)]
struct Out(f32);

impl Finite for Out {
    fn is_finite(&self) -> bool {
        // Id 777 stands for a bug in the worker loop itself: the check panics outside the guarded
        // forward pass, which kills the owner thread.
        assert!(self.0 != 7770.0, "a bug outside the forward pass");
        self.0.is_finite()
    }
}

/// Test double: outputs each sequence's first id × 10; fails on id 666; panics on id 999; answers
/// NaN for id 404; kills its owner thread on id 777 (see [`Out`]). Memory: one byte per padded
/// token. Its device default is 12 padded tokens per batch.
struct RecordingModel {
    log: Arc<Log>,
}

impl EncoderModel for RecordingModel {
    type Output = Out;

    fn activation_bytes(&self, n: usize, longest: usize) -> usize {
        n * longest
    }

    fn default_memory_budget(&self) -> usize {
        usize::MAX
    }

    fn default_batch_tokens(&self) -> usize {
        12
    }

    fn forward(&mut self, batch: &[&Sequence]) -> Result<Vec<Out>, BoxError> {
        self.log.entered.fetch_add(1, Ordering::SeqCst);
        let guard = self.log.gate.lock().unwrap();
        drop(self.log.opened.wait_while(guard, |open| !*open).unwrap());
        let firsts: Vec<u32> = batch.iter().map(|s| s.ids[0]).collect();
        self.log.batches.lock().unwrap().push(firsts.clone());
        if firsts.contains(&666) {
            return Err("model error on 666".into());
        }
        if firsts.contains(&999) {
            panic!("boom on 999");
        }
        Ok(firsts.iter().map(|&id| Out(if id == 404 { f32::NAN } else { (id * 10) as f32 })).collect())
    }
}

async fn start(limits: BatchLimits, queue_depth: usize, gate_open: bool) -> (EncoderHandle<Out>, Arc<Log>) {
    let log = Arc::new(Log::default());
    *log.gate.lock().unwrap() = gate_open;
    let config = WorkerConfig { model: "test".into(), batch: limits, queue_depth, max_queue_wait: None };
    let model_log = Arc::clone(&log);
    let (handle, ()) =
        EncoderHandle::start(config, move || Ok((RecordingModel { log: model_log }, ()))).await.unwrap();
    (handle, log)
}

fn seq(first: u32, len: usize) -> Sequence {
    let mut ids = vec![first];
    ids.resize(len, 1);
    Sequence::new(ids)
}

const ROOMY: BatchLimits =
    BatchLimits { max_batch_tokens: Some(10_000), max_batch_size: 64, max_batch_bytes: None };

fn outs(values: &[u32]) -> Vec<Out> {
    values.iter().map(|&v| Out(v as f32)).collect()
}

async fn encode(handle: &EncoderHandle<Out>, sequences: Vec<Sequence>, priority: Priority) -> Vec<Out> {
    handle.encode(sequences, priority).await.unwrap()
}

/// Waits until the model has begun a forward pass (it is then held at the gate, if closed).
async fn until_model_busy(log: &Log) {
    for _ in 0..1000 {
        if log.entered.load(Ordering::SeqCst) > 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    panic!("the model never started a batch");
}

/// Waits until `n` jobs wait in the queue.
async fn until_queued(handle: &EncoderHandle<Out>, n: usize) {
    for _ in 0..1000 {
        if handle.queue_len() >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    panic!("fewer than {n} jobs ever queued");
}

fn limits(max_batch_tokens: usize, max_batch_size: usize, max_batch_bytes: Option<usize>) -> BatchLimits {
    BatchLimits { max_batch_tokens: Some(max_batch_tokens), max_batch_size, max_batch_bytes }
}

/// Spawns `encode` of one sequence per `(first id, length)` and returns the task.
fn submit(
    handle: &Arc<EncoderHandle<Out>>,
    sequences: &[(u32, usize)],
    priority: Priority,
) -> tokio::task::JoinHandle<Result<Vec<Out>, EngineError>> {
    let h = Arc::clone(handle);
    let sequences: Vec<Sequence> = sequences.iter().map(|&(id, len)| seq(id, len)).collect();
    tokio::spawn(async move { h.encode(sequences, priority).await })
}

#[tokio::test]
async fn outputs_come_back_in_request_order() {
    let (handle, log) = start(ROOMY, 8, true).await;
    // Longest-first scheduling reorders inside the batch; answers must not be reordered.
    let out = encode(&handle, vec![seq(1, 2), seq(2, 9), seq(3, 5)], Priority::Normal).await;
    assert_eq!(out, outs(&[10, 20, 30]));
    assert_eq!(log.batches(), [vec![2, 3, 1]]);
}

#[tokio::test]
async fn token_budget_and_batch_size_split_a_large_request() {
    // 5 sequences of 4 tokens; budget 8 padded tokens → 2 per batch.
    let (handle, log) = start(limits(8, 64, None), 8, true).await;
    let out = encode(&handle, (1..=5).map(|i| seq(i, 4)).collect(), Priority::Normal).await;
    assert_eq!(out, outs(&[10, 20, 30, 40, 50]));
    assert_eq!(log.batches(), [vec![1, 2], vec![3, 4], vec![5]]);

    let (handle, log) = start(limits(10_000, 3, None), 8, true).await;
    encode(&handle, (1..=5).map(|i| seq(i, 4)).collect(), Priority::Normal).await;
    assert_eq!(log.batches(), [vec![1, 2, 3], vec![4, 5]]);
}

#[tokio::test]
async fn without_a_configured_token_budget_the_models_default_applies() {
    let unset = BatchLimits { max_batch_tokens: None, max_batch_size: 64, max_batch_bytes: None };
    let (handle, log) = start(unset, 8, true).await;
    encode(&handle, (1..=5).map(|i| seq(i, 4)).collect(), Priority::Normal).await;
    assert_eq!(log.batches(), [vec![1, 2, 3], vec![4, 5]], "12 padded tokens hold three rows of 4");
}

#[tokio::test]
async fn the_memory_budget_splits_batches_the_token_budget_would_allow() {
    // The double costs 1 byte per padded token: 12 bytes hold three rows of 4.
    let (handle, log) = start(limits(10_000, 64, Some(12)), 8, true).await;
    encode(&handle, (1..=5).map(|i| seq(i, 4)).collect(), Priority::Normal).await;
    assert_eq!(log.batches(), [vec![1, 2, 3], vec![4, 5]]);
}

#[tokio::test]
async fn a_sequence_longer_than_the_budget_still_runs_alone() {
    let (handle, log) = start(limits(4, 64, Some(4)), 8, true).await;
    let out = encode(&handle, vec![seq(7, 20), seq(8, 2)], Priority::Normal).await;
    assert_eq!(out, outs(&[70, 80]));
    assert_eq!(log.batches(), [vec![7], vec![8]]);
}

#[tokio::test]
async fn waiting_requests_are_batched_together_high_priority_first() {
    let (handle, log) = start(ROOMY, 8, false).await;
    let handle = Arc::new(handle);
    // The first request occupies the model (held at the gate) while three more queue up.
    let first = submit(&handle, &[(1, 3)], Priority::Normal);
    until_model_busy(&log).await;
    let mut waiting = Vec::new();
    for (first_id, priority) in [(2, Priority::Normal), (3, Priority::Normal), (4, Priority::High)] {
        waiting.push(submit(&handle, &[(first_id, 3)], priority));
        until_queued(&handle, waiting.len()).await;
    }
    log.open_gate();
    assert_eq!(first.await.unwrap().unwrap(), outs(&[10]));
    for (task, expected) in waiting.into_iter().zip([20, 30, 40]) {
        assert_eq!(task.await.unwrap().unwrap(), outs(&[expected]));
    }
    assert_eq!(log.batches(), [vec![1], vec![4, 2, 3]]);
}

#[tokio::test]
async fn sequences_of_similar_length_from_different_requests_share_a_batch() {
    // Two requests, each with a long and a short sequence, queue behind a running one. The batches
    // pair long with long and short with short across the requests, instead of padding each
    // request's short sequence to its long one.
    let (handle, log) = start(limits(10_000, 2, None), 8, false).await;
    let handle = Arc::new(handle);
    let first = submit(&handle, &[(1, 2)], Priority::Normal);
    until_model_busy(&log).await;
    let a = submit(&handle, &[(10, 30), (11, 3)], Priority::Normal);
    until_queued(&handle, 1).await;
    let b = submit(&handle, &[(20, 29), (21, 2)], Priority::Normal);
    until_queued(&handle, 2).await;
    log.open_gate();
    first.await.unwrap().unwrap();
    assert_eq!(a.await.unwrap().unwrap(), outs(&[100, 110]));
    assert_eq!(b.await.unwrap().unwrap(), outs(&[200, 210]));
    assert_eq!(log.batches(), [vec![1], vec![10, 20], vec![11, 21]]);
}

#[tokio::test]
async fn a_full_queue_refuses_at_once() {
    let (handle, log) = start(ROOMY, 1, false).await;
    let handle = Arc::new(handle);
    let running = submit(&handle, &[(1, 2)], Priority::Normal);
    until_model_busy(&log).await;
    let queued = submit(&handle, &[(2, 2)], Priority::Normal);
    until_queued(&handle, 1).await;
    match handle.encode(vec![seq(3, 2)], Priority::High).await {
        Err(EngineError::Overloaded { reason: Overload::QueueFull { queue_depth: 1 }, .. }) => {}
        other => panic!("expected a full queue, got {other:?}"),
    }
    log.open_gate();
    assert_eq!(running.await.unwrap().unwrap(), outs(&[10]));
    assert_eq!(queued.await.unwrap().unwrap(), outs(&[20]));
}

#[tokio::test]
async fn a_request_whose_caller_left_never_reaches_the_model() {
    let (handle, log) = start(ROOMY, 8, false).await;
    let handle = Arc::new(handle);
    let running = submit(&handle, &[(1, 2)], Priority::Normal);
    until_model_busy(&log).await;
    let abandoned = submit(&handle, &[(2, 2)], Priority::Normal);
    let kept = submit(&handle, &[(3, 2)], Priority::Normal);
    until_queued(&handle, 2).await;
    abandoned.abort(); // what hyper does to a handler whose client disconnected
    assert!(abandoned.await.unwrap_err().is_cancelled());
    log.open_gate();
    assert_eq!(running.await.unwrap().unwrap(), outs(&[10]));
    assert_eq!(kept.await.unwrap().unwrap(), outs(&[30]));
    assert_eq!(log.batches(), [vec![1], vec![3]], "sequence 2 must never reach the model");
}

#[tokio::test]
async fn a_failing_panicking_or_non_finite_batch_answers_its_requests_and_the_worker_lives_on() {
    let (handle, _log) = start(ROOMY, 8, true).await;
    let err = handle.encode(vec![seq(666, 2)], Priority::Normal).await.unwrap_err();
    assert!(matches!(&err, EngineError::Backend { message, .. } if message.contains("666")), "{err}");
    let err = handle.encode(vec![seq(999, 2)], Priority::Normal).await.unwrap_err();
    assert!(matches!(&err, EngineError::Backend { message, .. } if message.contains("panicked")), "{err}");
    let err = handle.encode(vec![seq(5, 2), seq(404, 2)], Priority::Normal).await.unwrap_err();
    assert!(matches!(&err, EngineError::Backend { message, .. } if message.contains("NaN")), "{err}");
    assert_eq!(encode(&handle, vec![seq(5, 2)], Priority::Normal).await, outs(&[50]));
    assert!(handle.is_alive());
}

#[tokio::test]
async fn a_dead_owner_thread_fails_its_queue_and_later_requests_at_once() {
    let (handle, log) = start(ROOMY, 8, false).await;
    let handle = Arc::new(handle);
    let killer = submit(&handle, &[(777, 2)], Priority::Normal);
    until_model_busy(&log).await;
    let queued = submit(&handle, &[(2, 2)], Priority::Normal);
    until_queued(&handle, 1).await;
    let watcher = tokio::spawn({
        let h = Arc::clone(&handle);
        async move { h.failed().await }
    });
    log.open_gate();
    for task in [killer, queued] {
        let err = task.await.unwrap().unwrap_err();
        assert!(matches!(err, EngineError::ModelFailed { .. }), "{err}");
    }
    tokio::time::timeout(Duration::from_secs(5), watcher).await.expect("failed() resolves").unwrap();
    assert!(!handle.is_alive());
    let err = handle.encode(vec![seq(3, 2)], Priority::Normal).await.unwrap_err();
    assert!(matches!(err, EngineError::ModelFailed { .. }), "{err}");
}

#[tokio::test]
async fn shutdown_finishes_queued_work_then_refuses() {
    let (handle, log) = start(limits(10_000, 1, None), 8, false).await;
    let handle = Arc::new(handle);
    let running = submit(&handle, &[(1, 2)], Priority::Normal);
    until_model_busy(&log).await;
    let queued: Vec<_> = (2..=4).map(|id| submit(&handle, &[(id, 2)], Priority::Normal)).collect();
    until_queued(&handle, 3).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    handle.begin_shutdown(deadline);
    // New work is refused as soon as shutdown begins, while queued work still runs.
    let err = handle.encode(vec![seq(9, 2)], Priority::Normal).await.unwrap_err();
    assert!(matches!(err, EngineError::ShuttingDown { .. }), "{err}");
    let stopping = tokio::task::spawn_blocking({
        let h = Arc::clone(&handle);
        move || h.shutdown(deadline)
    });
    log.open_gate();
    stopping.await.unwrap();
    assert_eq!(running.await.unwrap().unwrap(), outs(&[10]));
    for (task, expected) in queued.into_iter().zip([20, 30, 40]) {
        assert_eq!(task.await.unwrap().unwrap(), outs(&[expected]), "queued work finishes");
    }
    assert_eq!(log.batches(), [vec![1], vec![2], vec![3], vec![4]]);
}

#[tokio::test]
async fn work_not_started_by_the_shutdown_deadline_is_answered_shutting_down() {
    let (handle, log) = start(ROOMY, 8, false).await;
    let handle = Arc::new(handle);
    let running = submit(&handle, &[(1, 2)], Priority::Normal);
    until_model_busy(&log).await;
    let queued: Vec<_> = (2..=3).map(|id| submit(&handle, &[(id, 2)], Priority::Normal)).collect();
    until_queued(&handle, 2).await;
    // The running batch outlives the deadline: the queued jobs must not wait for it.
    let h = Arc::clone(&handle);
    tokio::task::spawn_blocking(move || h.shutdown(Instant::now() + Duration::from_millis(50)))
        .await
        .unwrap();
    for task in queued {
        let err = task.await.unwrap().unwrap_err();
        assert!(matches!(err, EngineError::ShuttingDown { .. }), "{err}");
    }
    log.open_gate();
    assert_eq!(running.await.unwrap().unwrap(), outs(&[10]), "the batch in flight still answers");
    assert_eq!(log.batches(), [vec![1]]);
}

#[tokio::test]
async fn a_failed_load_is_reported() {
    let config = WorkerConfig { model: "broken".into(), batch: ROOMY, queue_depth: 1, max_queue_wait: None };
    let result = EncoderHandle::<Out>::start(config, || -> Result<(RecordingModel, ()), BoxError> {
        Err("weights missing".into())
    })
    .await;
    assert_eq!(result.err().map(|e| e.to_string()).as_deref(), Some("weights missing"));
}

/// Test double for admission by expected wait: takes one millisecond per token it reads.
struct PacedModel;

impl EncoderModel for PacedModel {
    type Output = Out;

    fn activation_bytes(&self, n: usize, longest: usize) -> usize {
        n * longest
    }

    fn default_memory_budget(&self) -> usize {
        usize::MAX
    }

    fn forward(&mut self, batch: &[&Sequence]) -> Result<Vec<Out>, BoxError> {
        let tokens: usize = batch.iter().map(|s| s.len()).sum();
        std::thread::sleep(Duration::from_millis(tokens as u64));
        Ok(batch.iter().map(|s| Out(s.ids[0] as f32)).collect())
    }
}

#[tokio::test]
async fn work_that_would_wait_longer_than_max_queue_wait_is_refused_at_once() {
    let max_wait = Duration::from_millis(100);
    let config = WorkerConfig {
        model: "paced".into(),
        batch: limits(64, 4, None),
        queue_depth: 1_000,
        max_queue_wait: Some(max_wait),
    };
    let (handle, ()) = EncoderHandle::start(config, || Ok((PacedModel, ()))).await.unwrap();
    let handle = Arc::new(handle);
    // The first batch measures the service time: 1 ms per token.
    encode(&handle, vec![seq(1, 10)], Priority::Normal).await;

    // 200 requests of 10 tokens arrive at once: 2 s of work against a 100 ms limit.
    let tasks: Vec<_> = (0..200u32)
        .map(|i| {
            let h = Arc::clone(&handle);
            tokio::spawn(async move {
                let asked = Instant::now();
                let result = h.encode(vec![seq(i + 2, 10)], Priority::Normal).await;
                (result, asked.elapsed())
            })
        })
        .collect();
    let (mut served, mut refused) = (Vec::new(), Vec::new());
    for task in tasks {
        match task.await.unwrap() {
            (Ok(out), took) => served.push((out, took)),
            (Err(EngineError::Overloaded { reason, .. }), took) => refused.push((reason, took)),
            (Err(other), _) => panic!("unexpected error: {other}"),
        }
    }
    assert!(served.len() >= 5 && refused.len() >= 150, "served {}, refused {}", served.len(), refused.len());
    for (reason, took) in &refused {
        let Overload::ExpectedWait { expected, max } = *reason else { panic!("{reason:?}") };
        assert!(expected > max && max == max_wait, "{reason:?}");
        assert!(reason.retry_after() >= Duration::from_secs(1));
        assert!(*took < Duration::from_millis(50), "a refusal took {took:?}");
    }
    // What was admitted waited about the limit plus its own service, not the whole backlog.
    let worst = served.iter().map(|(_, took)| *took).max().unwrap();
    assert!(worst < Duration::from_millis(600), "an admitted request took {worst:?}");
    // Once the backlog has drained, requests are admitted again.
    assert_eq!(encode(&handle, vec![seq(7, 10)], Priority::Normal).await, outs(&[7]));
    assert_eq!(handle.expected_wait(), Duration::ZERO);
}
