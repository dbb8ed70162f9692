//! Per-model admission control: a request holds a permit from arrival to answer, so a model never has
//! more than `max_concurrent_requests` requests tokenizing, queued or running. Refusal is immediate.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::{EngineError, Overload};

#[derive(Clone)]
pub struct Admission {
    model: Arc<str>,
    permits: Arc<Semaphore>,
    max_concurrent_requests: usize,
}

/// Held for the lifetime of one admitted request.
pub struct Permit(#[allow(dead_code)] OwnedSemaphorePermit);

impl Admission {
    pub fn new(model: Arc<str>, max_concurrent_requests: usize) -> Self {
        Self { model, permits: Arc::new(Semaphore::new(max_concurrent_requests)), max_concurrent_requests }
    }

    pub fn try_admit(&self) -> Result<Permit, EngineError> {
        Arc::clone(&self.permits).try_acquire_owned().map(Permit).map_err(|_| EngineError::Overloaded {
            model: Arc::clone(&self.model),
            reason: Overload::TooManyConcurrent { max_concurrent_requests: self.max_concurrent_requests },
        })
    }

    pub fn in_flight(&self) -> usize {
        self.max_concurrent_requests - self.permits.available_permits()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_beyond_the_limit_and_frees_on_drop() {
        let admission = Admission::new("m".into(), 2);
        let a = admission.try_admit().unwrap();
        let _b = admission.try_admit().unwrap();
        let err = admission.try_admit().err().unwrap();
        assert!(matches!(err, EngineError::Overloaded { .. }), "{err}");
        assert_eq!(admission.in_flight(), 2);
        drop(a);
        assert!(admission.try_admit().is_ok());
    }
}
