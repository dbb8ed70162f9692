//! A bounded, blocking, multi-priority job queue between async request handlers and the threads that
//! serve them (a model's owner thread, the preprocessing pool). Pushing never blocks: a full queue
//! hands the job straight back so the caller can answer 429 at once. Consumers block on
//! [`JobQueue::pop_wait`] while idle and drain with [`JobQueue::try_pop`] while busy, which suits
//! both fixed encoder batches and a decode-step scheduler that admits new sequences between steps.
//!
//! Order: every job gets a [`Ticket`] when pushed. A higher [`Priority`] is a head start in time: a
//! premium job is served before standard jobs that arrived up to [`Priority::head_start`] earlier,
//! and a standard job that has waited longer than that goes first. Premium traffic overtakes, and
//! no class starves.

use std::cmp::Ordering;
use std::collections::VecDeque;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Scheduling class of a request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Priority {
    /// Premium traffic: overtakes `Normal` work that arrived up to two seconds earlier.
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

    /// How much earlier than its arrival a job of this class counts as having arrived.
    pub const fn head_start(self) -> Duration {
        match self {
            Self::High => Duration::from_secs(2),
            Self::Normal => Duration::ZERO,
        }
    }
}

/// A job's place in line: its arrival time and class. Smaller tickets are served first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ticket {
    pub arrived: Instant,
    pub priority: Priority,
}

impl Ticket {
    pub fn now(priority: Priority) -> Self {
        Self { arrived: Instant::now(), priority }
    }
}

impl Ord for Ticket {
    fn cmp(&self, other: &Self) -> Ordering {
        // arrived − head_start, compared without subtracting from an Instant.
        (self.arrived + other.priority.head_start())
            .cmp(&(other.arrived + self.priority.head_start()))
            .then(self.priority.cmp(&other.priority))
    }
}

impl PartialOrd for Ticket {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
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
    lanes: [VecDeque<(Ticket, T)>; Priority::COUNT],
    len: usize,
    closed: bool,
}

impl<T> Lanes<T> {
    /// The lane heads compete by ticket; within a lane, first in first out.
    fn pop(&mut self) -> Option<(Ticket, T)> {
        let lane = self
            .lanes
            .iter()
            .enumerate()
            .filter_map(|(i, lane)| lane.front().map(|(ticket, _)| (i, *ticket)))
            .min_by_key(|&(_, ticket)| ticket)?
            .0;
        let item = self.lanes[lane].pop_front()?;
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
        state.lanes[priority.lane()].push_back((Ticket::now(priority), item));
        state.len += 1;
        self.depth.set(state.len as f64);
        drop(state);
        self.not_empty.notify_one();
        Ok(())
    }

    /// Blocks until a job is available; `None` once the queue is closed and drained.
    pub fn pop_wait(&self) -> Option<(Ticket, T)> {
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

    pub fn try_pop(&self) -> Option<(Ticket, T)> {
        let mut state = self.lock();
        let item = state.pop();
        if item.is_some() {
            self.depth.set(state.len as f64);
        }
        item
    }

    /// Takes every waiting job, in serving order (for shutdown and failure: the caller answers them).
    pub fn drain(&self) -> Vec<T> {
        let mut state = self.lock();
        let items = std::iter::from_fn(|| state.pop()).map(|(_, item)| item).collect();
        self.depth.set(0.0);
        items
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

    /// Refuses further pushes and wakes the consumers; jobs already queued are still handed out.
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

    fn items(q: &JobQueue<u32>) -> Vec<u32> {
        std::iter::from_fn(|| q.try_pop()).map(|(_, item)| item).collect()
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
        assert_eq!(items(&q), [3, 4, 1, 2]);
    }

    #[test]
    fn a_head_start_is_bounded_so_waiting_work_is_not_starved() {
        let now = Instant::now();
        let ticket =
            |ago_ms: u64, priority| Ticket { arrived: now - Duration::from_millis(ago_ms), priority };
        // Premium overtakes standard work that arrived less than the head start earlier…
        assert!(ticket(0, Priority::High) < ticket(1_500, Priority::Normal));
        // …but not standard work that has waited longer than that.
        assert!(ticket(2_500, Priority::Normal) < ticket(0, Priority::High));
        // Within a class, arrival order.
        assert!(ticket(10, Priority::Normal) < ticket(5, Priority::Normal));
        assert!(ticket(10, Priority::High) < ticket(5, Priority::High));
    }

    #[test]
    fn close_drains_then_ends_and_refuses_pushes() {
        let q = queue(4);
        q.try_push(7, Priority::Normal).unwrap();
        q.close();
        assert!(matches!(q.try_push(8, Priority::Normal), Err(PushError::Closed(8))));
        assert_eq!(q.pop_wait().map(|(_, item)| item), Some(7));
        assert!(q.pop_wait().is_none());
    }

    #[test]
    fn drain_takes_everything_in_serving_order() {
        let q = queue(4);
        q.try_push(1, Priority::Normal).unwrap();
        q.try_push(2, Priority::High).unwrap();
        assert_eq!(q.drain(), [2, 1]);
        assert!(q.is_empty());
    }

    #[test]
    fn pop_wait_wakes_on_push_from_another_thread() {
        let q = Arc::new(queue(4));
        let consumer = {
            let q = Arc::clone(&q);
            thread::spawn(move || q.pop_wait().map(|(_, item)| item))
        };
        thread::sleep(Duration::from_millis(20));
        q.try_push(42, Priority::Normal).unwrap();
        assert_eq!(consumer.join().unwrap(), Some(42));
    }
}
