//! A bounded, blocking, multi-priority job queue between async request handlers and a model's owner
//! thread. Pushing never blocks: a full queue hands the job straight back so the caller can answer 429
//! at once. The owner thread blocks on [`JobQueue::pop_wait`] while idle and drains with
//! [`JobQueue::try_pop`] while busy, which suits both fixed encoder batches and a decode-step scheduler
//! that admits new sequences between steps.

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

/// Scheduling class of a request. Higher classes are always served first (strict priority).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Priority {
    /// Premium traffic: served before anything `Normal` that is waiting.
    High,
    #[default]
    Normal,
}

impl Priority {
    const COUNT: usize = 2;

    fn lane(self) -> usize {
        match self {
            Self::High => 0,
            Self::Normal => 1,
        }
    }
}

/// Why a push failed; the job comes back so nothing is lost.
#[derive(Debug)]
pub enum PushError<T> {
    /// `capacity` jobs are already waiting.
    Full(T),
    /// The queue was closed for shutdown.
    Closed(T),
}

struct Lanes<T> {
    lanes: [VecDeque<T>; Priority::COUNT],
    len: usize,
    closed: bool,
}

impl<T> Lanes<T> {
    fn pop(&mut self) -> Option<T> {
        let item = self.lanes.iter_mut().find_map(VecDeque::pop_front)?;
        self.len -= 1;
        Some(item)
    }
}

pub struct JobQueue<T> {
    state: Mutex<Lanes<T>>,
    not_empty: Condvar,
    capacity: usize,
    depth: metrics::Gauge,
}

impl<T> JobQueue<T> {
    /// `depth` is updated on every push and pop (pass `metrics::Gauge::noop()` to skip metrics).
    pub fn new(capacity: usize, depth: metrics::Gauge) -> Self {
        assert!(capacity > 0, "a job queue needs room for at least one job");
        Self {
            state: Mutex::new(Lanes {
                lanes: std::array::from_fn(|_| VecDeque::new()),
                len: 0,
                closed: false,
            }),
            not_empty: Condvar::new(),
            capacity,
            depth,
        }
    }

    // Every critical section leaves the lanes consistent, so a poisoned lock is still usable.
    fn lock(&self) -> MutexGuard<'_, Lanes<T>> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn try_push(&self, item: T, priority: Priority) -> Result<(), PushError<T>> {
        let mut state = self.lock();
        if state.closed {
            return Err(PushError::Closed(item));
        }
        if state.len >= self.capacity {
            return Err(PushError::Full(item));
        }
        state.lanes[priority.lane()].push_back(item);
        state.len += 1;
        self.depth.set(state.len as f64);
        drop(state);
        self.not_empty.notify_one();
        Ok(())
    }

    /// Blocks until a job is available; `None` once the queue is closed and drained.
    pub fn pop_wait(&self) -> Option<T> {
        let mut state = self.lock();
        loop {
            if let Some(item) = state.pop() {
                self.depth.set(state.len as f64);
                return Some(item);
            }
            if state.closed {
                return None;
            }
            state = self.not_empty.wait(state).unwrap_or_else(|poisoned| poisoned.into_inner());
        }
    }

    /// Like [`pop_wait`](Self::pop_wait) but gives up after `timeout`; `None` on timeout or when
    /// closed and drained (check [`is_closed`](Self::is_closed) to tell them apart).
    pub fn pop_timeout(&self, timeout: Duration) -> Option<T> {
        let state = self.lock();
        let (mut state, _) = self
            .not_empty
            .wait_timeout_while(state, timeout, |s| s.len == 0 && !s.closed)
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let item = state.pop();
        self.depth.set(state.len as f64);
        item
    }

    pub fn try_pop(&self) -> Option<T> {
        let mut state = self.lock();
        let item = state.pop();
        if item.is_some() {
            self.depth.set(state.len as f64);
        }
        item
    }

    pub fn len(&self) -> usize {
        self.lock().len
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Refuses further pushes and wakes the consumer; jobs already queued are still handed out.
    pub fn close(&self) {
        self.lock().closed = true;
        self.not_empty.notify_all();
    }

    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::thread;

    use super::*;

    fn queue(capacity: usize) -> JobQueue<u32> {
        JobQueue::new(capacity, metrics::Gauge::noop())
    }

    #[test]
    fn full_queue_returns_the_job() {
        let q = queue(2);
        q.try_push(1, Priority::Normal).unwrap();
        q.try_push(2, Priority::High).unwrap();
        match q.try_push(3, Priority::High) {
            Err(PushError::Full(3)) => {}
            other => panic!("expected Full(3), got {other:?}"),
        }
        assert_eq!(q.len(), 2);
    }

    #[test]
    fn high_priority_is_served_first_and_fifo_within_a_class() {
        let q = queue(8);
        for (item, priority) in
            [(1, Priority::Normal), (2, Priority::Normal), (3, Priority::High), (4, Priority::High)]
        {
            q.try_push(item, priority).unwrap();
        }
        let order: Vec<u32> = std::iter::from_fn(|| q.try_pop()).collect();
        assert_eq!(order, [3, 4, 1, 2]);
    }

    #[test]
    fn close_drains_then_ends_and_refuses_pushes() {
        let q = queue(4);
        q.try_push(7, Priority::Normal).unwrap();
        q.close();
        assert!(matches!(q.try_push(8, Priority::Normal), Err(PushError::Closed(8))));
        assert_eq!(q.pop_wait(), Some(7));
        assert_eq!(q.pop_wait(), None);
    }

    #[test]
    fn pop_wait_wakes_on_push_from_another_thread() {
        let q = Arc::new(queue(4));
        let consumer = {
            let q = Arc::clone(&q);
            thread::spawn(move || q.pop_wait())
        };
        thread::sleep(Duration::from_millis(20));
        q.try_push(42, Priority::Normal).unwrap();
        assert_eq!(consumer.join().unwrap(), Some(42));
    }

    #[test]
    fn pop_timeout_gives_up() {
        let q = queue(1);
        assert_eq!(q.pop_timeout(Duration::from_millis(5)), None);
        assert!(!q.is_closed());
        q.try_push(1, Priority::Normal).unwrap();
        assert_eq!(q.pop_timeout(Duration::from_millis(5)), Some(1));
    }
}
