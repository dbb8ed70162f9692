//! A model's owner thread and its bounded job queue: the lifecycle every kind of model worker
//! shares (encoders in [`crate::encoder`], decoders in [`crate::generate`]).
//!
//! - The model is loaded *on* its thread and never leaves it.
//! - Pushing a job never blocks: a full queue is `Overloaded` (429), a closed one `ShuttingDown`.
//! - If the thread's loop panics, the model is failed: `alive` turns false (a supervisor waits on
//!   [`Owner::failed`]), queued jobs are answered [`EngineError::ModelFailed`], and so are later
//!   pushes.
//! - [`Owner::shutdown`] lets queued work run until a deadline, then answers what is left
//!   [`EngineError::ShuttingDown`]; loops check [`Lifecycle::past_deadline`] between steps.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, watch};

use crate::error::{panic_message, BoxError, EngineError, Overload};
use crate::queue::{JobQueue, Priority, PushError};

/// A job that can be answered with an error (when it cannot run).
pub(crate) trait Answer: Send + 'static {
    fn fail(self, error: EngineError);
}

/// What the handle and the owner thread share.
pub(crate) struct Lifecycle {
    pub(crate) model: Arc<str>,
    /// False once the owner thread has died.
    alive: watch::Sender<bool>,
    /// Set by shutdown: work not started by then is answered `ShuttingDown`.
    deadline: Mutex<Option<Instant>>,
}

impl Lifecycle {
    pub(crate) fn past_deadline(&self) -> bool {
        self.deadline.lock().unwrap_or_else(|p| p.into_inner()).is_some_and(|d| Instant::now() >= d)
    }

    pub(crate) fn failed(&self) -> EngineError {
        EngineError::ModelFailed { model: Arc::clone(&self.model) }
    }

    pub(crate) fn shutting_down(&self) -> EngineError {
        EngineError::ShuttingDown { model: Arc::clone(&self.model) }
    }
}

pub(crate) struct Owner<J> {
    pub(crate) life: Arc<Lifecycle>,
    pub(crate) queue: Arc<JobQueue<J>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl<J: Answer> Owner<J> {
    /// Spawns the owner thread, runs `load` on it, then `run(model, queue, lifecycle)` until the
    /// queue is closed and drained. Returns once the model is loaded, with what `load` reported.
    pub(crate) async fn start<M, I, F, R>(
        model: Arc<str>,
        queue_depth: usize,
        load: F,
        run: R,
    ) -> Result<(Self, I), BoxError>
    where
        I: Send + 'static,
        F: FnOnce() -> Result<(M, I), BoxError> + Send + 'static,
        R: FnOnce(M, Arc<JobQueue<J>>, Arc<Lifecycle>) + Send + 'static,
    {
        let labels = [("model", model.to_string())];
        let queue = Arc::new(JobQueue::new(queue_depth, metrics::gauge!("hearth_queue_depth", &labels)));
        let life = Arc::new(Lifecycle {
            model: Arc::clone(&model),
            alive: watch::Sender::new(true),
            deadline: Mutex::new(None),
        });
        let (loaded_tx, loaded_rx) = oneshot::channel();
        let (thread_queue, thread_life) = (Arc::clone(&queue), Arc::clone(&life));
        let thread = std::thread::Builder::new().name(format!("model-{model}")).spawn(move || {
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
            let (queue, life) = (Arc::clone(&thread_queue), Arc::clone(&thread_life));
            if let Err(panic) = catch_unwind(AssertUnwindSafe(|| run(model, queue, life))) {
                tracing::error!(
                    model = %thread_life.model,
                    cause = %panic_message(&panic),
                    "the model's owner thread died; failing its queued requests"
                );
                thread_life.alive.send_replace(false);
                thread_queue.close();
                for job in thread_queue.drain() {
                    job.fail(thread_life.failed());
                }
            }
        })?;
        let owner = Self { life, queue, thread: Mutex::new(Some(thread)) };
        match loaded_rx.await {
            Ok(Ok(info)) => Ok((owner, info)),
            Ok(Err(err)) => Err(err),
            Err(_) => Err("the model's loader thread exited without reporting".into()),
        }
    }

    /// Queues `job`, or says at once why it cannot be.
    pub(crate) fn push(&self, job: J, priority: Priority) -> Result<(), EngineError> {
        if !self.is_alive() {
            return Err(self.life.failed());
        }
        self.queue.try_push(job, priority).map_err(|err| match err {
            PushError::Full(_) => EngineError::Overloaded {
                model: Arc::clone(&self.life.model),
                reason: Overload::QueueFull { queue_depth: self.queue.capacity() },
            },
            PushError::Closed(_) if !self.is_alive() => self.life.failed(),
            PushError::Closed(_) => self.life.shutting_down(),
        })
    }

    pub(crate) fn is_alive(&self) -> bool {
        *self.life.alive.borrow()
    }

    /// Resolves once the owner thread has died (never, while it lives).
    pub(crate) async fn failed(&self) {
        let mut alive = self.life.alive.subscribe();
        let _ = alive.wait_for(|alive| !alive).await;
    }

    /// Stops accepting jobs from now on; what is queued runs until `deadline`. Returns at once.
    pub(crate) fn begin_shutdown(&self, deadline: Instant) {
        *self.life.deadline.lock().unwrap_or_else(|p| p.into_inner()) = Some(deadline);
        self.queue.close();
    }

    /// Stops accepting jobs and lets the owner thread work until `deadline`; jobs not started by
    /// then are answered [`EngineError::ShuttingDown`]. Blocks until the thread has stopped, or
    /// shortly after the deadline if a step is still running.
    pub(crate) fn shutdown(&self, deadline: Instant) {
        self.begin_shutdown(deadline);
        let thread = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        let Some(thread) = thread else { return };
        while !thread.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        for job in self.queue.drain() {
            job.fail(self.life.shutting_down());
        }
        // The owner thread answers its own pending work before its next step; a step that is still
        // running is not waited for beyond a short grace.
        let grace = Instant::now() + Duration::from_millis(200);
        while !thread.is_finished() && Instant::now() < grace {
            std::thread::sleep(Duration::from_millis(5));
        }
        if thread.is_finished() {
            let _ = thread.join();
        } else {
            tracing::warn!(model = %self.life.model, "a step was still running at the shutdown deadline");
        }
    }
}

impl<J> Drop for Owner<J> {
    fn drop(&mut self) {
        // The owner thread exits once the queue is drained; nobody waits for it here.
        self.queue.close();
    }
}
