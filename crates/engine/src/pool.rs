//! A fixed pool of threads for CPU-bound request work that must not run on the async runtime
//! (tokenization today, audio decoding later). Unlike tokio's blocking pool (up to 512 threads,
//! unbounded queue), it has a fixed number of threads and a bounded queue that refuses at once when
//! full. A task whose caller has gone is skipped before it starts, and a running task can ask
//! whether its caller is still there. A panic in a task is an internal error for that caller only.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use tokio::sync::oneshot;

use crate::error::{panic_message, EngineError};
use crate::queue::{JobQueue, Priority, PushError};

type Task = Box<dyn FnOnce() + Send + 'static>;

/// Tells a running task whether its caller is still waiting for the answer.
pub struct Caller<'a> {
    gone: &'a (dyn Fn() -> bool + Sync),
}

impl Caller<'_> {
    pub fn gone(&self) -> bool {
        (self.gone)()
    }
}

pub struct BlockingPool {
    queue: Arc<JobQueue<Task>>,
}

impl BlockingPool {
    /// Starts `threads` threads named `{name}-N` sharing a queue of `queue_depth` tasks.
    pub fn new(name: &str, threads: usize, queue_depth: usize) -> std::io::Result<Self> {
        let gauge = metrics::gauge!("hearth_preprocess_queue_depth");
        let queue = Arc::new(JobQueue::<Task>::new(queue_depth, gauge));
        for i in 0..threads.max(1) {
            let queue = Arc::clone(&queue);
            std::thread::Builder::new().name(format!("{name}-{i}")).spawn(move || {
                while let Some((_, task)) = queue.pop_wait() {
                    task();
                }
            })?;
        }
        Ok(Self { queue })
    }

    /// Runs `work` on a pool thread and waits for its result. Refuses at once when the queue is
    /// full. Dropping the returned future withdraws the task if it has not started, and makes
    /// [`Caller::gone`] true if it has.
    pub async fn run<R, F>(&self, priority: Priority, work: F) -> Result<R, EngineError>
    where
        R: Send + 'static,
        F: FnOnce(&Caller) -> R + Send + 'static,
    {
        let (reply, answer) = oneshot::channel::<std::thread::Result<R>>();
        let task: Task = Box::new(move || {
            if reply.is_closed() {
                return;
            }
            let gone = || reply.is_closed();
            let caller = Caller { gone: &gone };
            let result = catch_unwind(AssertUnwindSafe(|| work(&caller)));
            let _ = reply.send(result);
        });
        self.queue.try_push(task, priority).map_err(|err| match err {
            PushError::Full(_) => EngineError::PreprocessingBusy { queue_depth: self.queue.capacity() },
            PushError::Closed(_) => EngineError::ShuttingDown { model: "preprocessing".into() },
        })?;
        // A span per task, for traces: the wait for a thread and the work (tokenization, mostly).
        let waited = tracing::Instrument::instrument(answer, tracing::info_span!("preprocess"));
        match waited.await {
            Ok(Ok(result)) => Ok(result),
            Ok(Err(panic)) => Err(EngineError::Internal { message: panic_message(&panic) }),
            Err(_) => Err(EngineError::ShuttingDown { model: "preprocessing".into() }),
        }
    }

    /// Tasks waiting for a thread.
    pub fn queue_len(&self) -> usize {
        self.queue.len()
    }
}

impl Drop for BlockingPool {
    fn drop(&mut self) {
        // The threads finish what is queued, then exit.
        self.queue.close();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Barrier};
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn runs_work_and_turns_a_panic_into_an_internal_error() {
        let pool = BlockingPool::new("test", 2, 4).unwrap();
        assert_eq!(pool.run(Priority::Normal, |_| 6 * 7).await.unwrap(), 42);
        let err = pool.run(Priority::Normal, |_| -> u32 { panic!("tokenizer bug") }).await.unwrap_err();
        assert!(
            matches!(&err, EngineError::Internal { message } if message.contains("tokenizer bug")),
            "{err}"
        );
        assert_eq!(pool.run(Priority::Normal, |_| 1).await.unwrap(), 1, "the thread survives");
    }

    #[tokio::test]
    async fn a_full_queue_refuses_at_once() {
        let pool = Arc::new(BlockingPool::new("test", 1, 1).unwrap());
        let hold = Arc::new(Barrier::new(2));
        let busy = tokio::spawn({
            let (pool, hold) = (Arc::clone(&pool), Arc::clone(&hold));
            async move { pool.run(Priority::Normal, move |_| hold.wait()).await.map(|_| ()) }
        });
        while pool.queue_len() > 0 || busy.is_finished() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        tokio::time::sleep(Duration::from_millis(20)).await; // the one thread has taken it
        let queued = tokio::spawn({
            let pool = Arc::clone(&pool);
            async move { pool.run(Priority::Normal, |_| ()).await }
        });
        while pool.queue_len() == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let refused = pool.run(Priority::High, |_| ()).await.unwrap_err();
        assert!(matches!(refused, EngineError::PreprocessingBusy { queue_depth: 1 }), "{refused}");
        hold.wait();
        busy.await.unwrap().unwrap();
        queued.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn a_running_task_sees_its_caller_leave() {
        let pool = BlockingPool::new("test", 1, 4).unwrap();
        let saw_gone = Arc::new(AtomicBool::new(false));
        let started = Arc::new(Barrier::new(2));
        let work = {
            let (saw_gone, started) = (Arc::clone(&saw_gone), Arc::clone(&started));
            move |caller: &Caller| {
                started.wait();
                for _ in 0..2000 {
                    if caller.gone() {
                        saw_gone.store(true, Ordering::SeqCst);
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        };
        // Poll the task until it has started, then drop it as a departed client's handler is.
        let mut task = Box::pin(pool.run(Priority::Normal, work));
        tokio::select! {
            _ = &mut task => panic!("the task cannot finish before its caller leaves"),
            _ = tokio::task::spawn_blocking(move || started.wait()) => {}
        }
        drop(task);
        for _ in 0..2000 {
            if saw_gone.load(Ordering::SeqCst) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        panic!("the task never saw its caller leave");
    }
}
