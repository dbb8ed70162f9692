//! Scheduling behaviour of the encoder worker, observed through a recording test double: a model
//! whose forward pass records the batches it saw and can be held at a gate. (Real models are covered
//! by the backends' tests; these tests are about who runs when, which a real model cannot show.)

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use hearth_engine::encoder::{BatchLimits, EncoderHandle, EncoderModel, Sequence, WorkerConfig};
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

/// Test double: outputs each sequence's first id × 10; fails on id 666; panics on id 999.
struct RecordingModel {
    log: Arc<Log>,
}

impl EncoderModel for RecordingModel {
    type Output = u32;

    fn forward(&mut self, batch: &[&Sequence]) -> Result<Vec<u32>, BoxError> {
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
        Ok(firsts.iter().map(|id| id * 10).collect())
    }
}

async fn start(limits: BatchLimits, queue_depth: usize, gate_open: bool) -> (EncoderHandle<u32>, Arc<Log>) {
    let log = Arc::new(Log::default());
    *log.gate.lock().unwrap() = gate_open;
    let config = WorkerConfig { model: "test".into(), batch: limits, queue_depth };
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

const ROOMY: BatchLimits = BatchLimits { max_batch_tokens: 10_000, max_batch_size: 64 };

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
async fn until_queued(handle: &EncoderHandle<u32>, n: usize) {
    for _ in 0..1000 {
        if handle.queue_len() >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    panic!("fewer than {n} jobs ever queued");
}

#[tokio::test]
async fn outputs_come_back_in_request_order() {
    let (handle, log) = start(ROOMY, 8, true).await;
    // Longest-first scheduling reorders inside the batch; answers must not be reordered.
    let out = handle.encode(vec![seq(1, 2), seq(2, 9), seq(3, 5)], Priority::Normal).await.unwrap();
    assert_eq!(out, [10, 20, 30]);
    assert_eq!(log.batches(), [vec![2, 3, 1]]);
}

#[tokio::test]
async fn token_budget_and_batch_size_split_a_large_request() {
    // 5 sequences of 4 tokens; budget 8 padded tokens → 2 per batch.
    let limits = BatchLimits { max_batch_tokens: 8, max_batch_size: 64 };
    let (handle, log) = start(limits, 8, true).await;
    let out = handle.encode((1..=5).map(|i| seq(i, 4)).collect(), Priority::Normal).await.unwrap();
    assert_eq!(out, [10, 20, 30, 40, 50]);
    assert_eq!(log.batches(), [vec![1, 2], vec![3, 4], vec![5]]);

    let limits = BatchLimits { max_batch_tokens: 10_000, max_batch_size: 3 };
    let (handle, log) = start(limits, 8, true).await;
    handle.encode((1..=5).map(|i| seq(i, 4)).collect(), Priority::Normal).await.unwrap();
    assert_eq!(log.batches(), [vec![1, 2, 3], vec![4, 5]]);
}

#[tokio::test]
async fn a_sequence_longer_than_the_budget_still_runs_alone() {
    let limits = BatchLimits { max_batch_tokens: 4, max_batch_size: 64 };
    let (handle, log) = start(limits, 8, true).await;
    let out = handle.encode(vec![seq(7, 20), seq(8, 2)], Priority::Normal).await.unwrap();
    assert_eq!(out, [70, 80]);
    assert_eq!(log.batches(), [vec![7], vec![8]]);
}

#[tokio::test]
async fn waiting_requests_are_batched_together_high_priority_first() {
    let (handle, log) = start(ROOMY, 8, false).await;
    let handle = Arc::new(handle);
    // The first request occupies the model (held at the gate) while three more queue up.
    let first = tokio::spawn({
        let h = Arc::clone(&handle);
        async move { h.encode(vec![seq(1, 3)], Priority::Normal).await }
    });
    until_model_busy(&log).await;
    let mut waiting = Vec::new();
    for (first_id, priority) in [(2, Priority::Normal), (3, Priority::Normal), (4, Priority::High)] {
        let h = Arc::clone(&handle);
        waiting.push(tokio::spawn(async move { h.encode(vec![seq(first_id, 3)], priority).await }));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    log.open_gate();
    assert_eq!(first.await.unwrap().unwrap(), [10]);
    for (task, expected) in waiting.into_iter().zip([20, 30, 40]) {
        assert_eq!(task.await.unwrap().unwrap(), [expected]);
    }
    assert_eq!(log.batches(), [vec![1], vec![4, 2, 3]]);
}

#[tokio::test]
async fn a_full_queue_refuses_at_once() {
    let (handle, log) = start(ROOMY, 1, false).await;
    let handle = Arc::new(handle);
    let running = tokio::spawn({
        let h = Arc::clone(&handle);
        async move { h.encode(vec![seq(1, 2)], Priority::Normal).await }
    });
    until_model_busy(&log).await;
    let queued = tokio::spawn({
        let h = Arc::clone(&handle);
        async move { h.encode(vec![seq(2, 2)], Priority::Normal).await }
    });
    until_queued(&handle, 1).await;
    let refused = handle.encode(vec![seq(3, 2)], Priority::High).await;
    match refused {
        Err(EngineError::Overloaded { reason: Overload::QueueFull { queue_depth: 1 }, .. }) => {}
        other => panic!("expected a full queue, got {other:?}"),
    }
    log.open_gate();
    assert_eq!(running.await.unwrap().unwrap(), [10]);
    assert_eq!(queued.await.unwrap().unwrap(), [20]);
}

#[tokio::test]
async fn a_request_whose_caller_left_never_reaches_the_model() {
    let (handle, log) = start(ROOMY, 8, false).await;
    let handle = Arc::new(handle);
    let running = tokio::spawn({
        let h = Arc::clone(&handle);
        async move { h.encode(vec![seq(1, 2)], Priority::Normal).await }
    });
    until_model_busy(&log).await;
    let abandoned = tokio::spawn({
        let h = Arc::clone(&handle);
        async move { h.encode(vec![seq(2, 2)], Priority::Normal).await }
    });
    let kept = tokio::spawn({
        let h = Arc::clone(&handle);
        async move { h.encode(vec![seq(3, 2)], Priority::Normal).await }
    });
    until_queued(&handle, 2).await;
    abandoned.abort(); // what hyper does to a handler whose client disconnected
    assert!(abandoned.await.unwrap_err().is_cancelled());
    log.open_gate();
    assert_eq!(running.await.unwrap().unwrap(), [10]);
    assert_eq!(kept.await.unwrap().unwrap(), [30]);
    assert_eq!(log.batches(), [vec![1], vec![3]], "sequence 2 must never reach the model");
}

#[tokio::test]
async fn a_failing_or_panicking_batch_answers_its_requests_and_the_worker_lives_on() {
    let (handle, _log) = start(ROOMY, 8, true).await;
    let err = handle.encode(vec![seq(666, 2)], Priority::Normal).await.unwrap_err();
    assert!(matches!(&err, EngineError::Backend { message, .. } if message.contains("666")), "{err}");
    let err = handle.encode(vec![seq(999, 2)], Priority::Normal).await.unwrap_err();
    assert!(matches!(&err, EngineError::Backend { message, .. } if message.contains("panicked")), "{err}");
    assert_eq!(handle.encode(vec![seq(5, 2)], Priority::Normal).await.unwrap(), [50]);
}

#[tokio::test]
async fn shutdown_finishes_queued_work_then_refuses() {
    let (handle, log) = start(ROOMY, 8, false).await;
    let handle = Arc::new(handle);
    let queued = tokio::spawn({
        let h = Arc::clone(&handle);
        async move { h.encode(vec![seq(4, 2)], Priority::Normal).await }
    });
    until_model_busy(&log).await;
    log.open_gate();
    let h = Arc::clone(&handle);
    tokio::task::spawn_blocking(move || h.shutdown()).await.unwrap();
    assert_eq!(queued.await.unwrap().unwrap(), [40]);
    let err = handle.encode(vec![seq(5, 2)], Priority::Normal).await.unwrap_err();
    assert!(matches!(err, EngineError::ShuttingDown { .. }), "{err}");
}

#[tokio::test]
async fn a_failed_load_is_reported() {
    let config = WorkerConfig { model: "broken".into(), batch: ROOMY, queue_depth: 1 };
    let result = EncoderHandle::<u32>::start(config, || -> Result<(RecordingModel, ()), BoxError> {
        Err("weights missing".into())
    })
    .await;
    assert_eq!(result.err().map(|e| e.to_string()).as_deref(), Some("weights missing"));
}
