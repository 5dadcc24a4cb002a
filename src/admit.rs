//! Admit: is there room for this request?
//!
//! Runs after authorization and before the request body is read. Today it enforces a
//! client's `max_concurrent_requests`: requests in flight at once, open streams included,
//! counted by one atomic per client (only for clients that set a limit). An admitted
//! request holds an [`Admission`] until its answer has been relayed to the end (or the
//! client went away); dropping it gives the slot back. Rate limits, token limits, quotas
//! and budgets join here (issue 14); [`redis`] keeps their counters in Redis, shared by all
//! replicas.

pub mod redis;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use crate::config::ClientConfig;
use crate::error::GatewayError;
use crate::identify::Caller;

/// One client's admission limits and the state they count, shared by all its requests.
#[derive(Debug, Default)]
pub struct ClientLimits {
    client: Arc<str>,
    max_concurrent: Option<u32>,
    in_flight: AtomicU32,
}

impl ClientLimits {
    pub fn new(c: &ClientConfig) -> Self {
        Self {
            client: Arc::from(c.id.as_str()),
            max_concurrent: c.max_concurrent_requests,
            in_flight: AtomicU32::new(0),
        }
    }

    /// Requests of this client admitted and not yet finished (0 when it has no limit:
    /// unlimited clients are not counted).
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }
}

/// A request's hold on its client's limits; released on drop.
#[derive(Debug, Default)]
pub struct Admission {
    concurrent: Option<Arc<ClientLimits>>,
}

impl Drop for Admission {
    fn drop(&mut self) {
        if let Some(l) = self.concurrent.take() {
            l.in_flight.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// Admit `caller`'s request, or refuse it with 429 `too_many_concurrent_requests`.
pub fn admit(caller: &Caller) -> Result<Admission, GatewayError> {
    let limits = &caller.client.limits;
    let Some(max) = limits.max_concurrent else {
        return Ok(Admission::default());
    };
    // Increment only while below the limit, so a burst of refusals never pushes the count
    // over it (and a refused request has nothing to give back).
    let taken = limits
        .in_flight
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < max).then_some(n + 1)
        });
    match taken {
        Ok(_) => Ok(Admission {
            concurrent: Some(limits.clone()),
        }),
        Err(_) => Err(GatewayError::TooManyConcurrentRequests {
            client: limits.client.to_string(),
            limit: max,
        }),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::authorize::ClientPolicy;
    use crate::identify::AuthMethod;

    fn caller(max: Option<u32>) -> Caller {
        let mut c: ClientConfig =
            toml::from_str("id = \"a\"\ndeployments = [\"*\"]\noperations = [\"*\"]").unwrap();
        c.max_concurrent_requests = max;
        Caller {
            client: Arc::new(ClientPolicy::new(&c)),
            method: AuthMethod::ApiKey,
            principal: Default::default(),
            grants: Vec::new(),
        }
    }

    #[test]
    fn concurrency_is_capped_and_released_on_drop() {
        let c = caller(Some(2));
        let a = admit(&c).unwrap();
        let b = admit(&c).unwrap();
        let e = admit(&c).unwrap_err();
        assert_eq!(e.code(), "too_many_concurrent_requests");
        assert_eq!(e.status(), 429);
        assert_eq!(c.client.limits.in_flight(), 2, "a refusal takes no slot");
        drop(a);
        let _c = admit(&c).unwrap();
        drop(b);
        assert_eq!(c.client.limits.in_flight(), 1);
    }

    #[test]
    fn unlimited_clients_are_not_counted() {
        let c = caller(None);
        let held: Vec<_> = (0..100).map(|_| admit(&c).unwrap()).collect();
        assert_eq!(c.client.limits.in_flight(), 0);
        drop(held);
    }

    #[test]
    fn concurrent_admissions_never_exceed_the_limit() {
        let c = Arc::new(caller(Some(3)));
        let peak = Arc::new(AtomicU32::new(0));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (c, peak) = (c.clone(), peak.clone());
                std::thread::spawn(move || {
                    for _ in 0..10_000 {
                        if let Ok(a) = admit(&c) {
                            peak.fetch_max(c.client.limits.in_flight(), Ordering::Relaxed);
                            drop(a);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert!(peak.load(Ordering::Relaxed) <= 3);
        assert_eq!(c.client.limits.in_flight(), 0);
    }
}
