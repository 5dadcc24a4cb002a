//! Read the request body: bounded per request, gateway-wide, and in time.
//!
//! Bodies are buffered whole (routing reads the `model` from them, failover resends them),
//! so memory is bounded twice: each body by `server.max_body_bytes` (413), and all bodies
//! held at once by `server.max_buffered_body_bytes` — a [`BodyBudget`] of bytes. A request
//! that declares its length reserves it before a byte is read; one that does not (chunked
//! HTTP/1.1, HTTP/2 without `content-length`) reserves as its frames arrive. A request that
//! cannot get room within `server.buffer_wait` gets 503 `overloaded` with `retry-after`;
//! one that waits does not read its body, so TCP pushes back on the client meanwhile. The
//! room is given back when the [`Buffered`] body is dropped: once the backend has answered
//! (the body is kept until then for failover).

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header;
use http_body::Body as HttpBody;
use http_body_util::BodyExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::{BoxError, GatewayError};

/// The gateway-wide budget of buffered request-body bytes.
#[derive(Debug, Clone)]
pub struct BodyBudget {
    room: Arc<Semaphore>,
    total: u64,
    wait: Duration,
}

impl BodyBudget {
    /// A budget of `total` bytes; a request waits at most `wait` for room.
    pub fn new(total: u64, wait: Duration) -> Self {
        let permits = usize::try_from(total)
            .unwrap_or(usize::MAX)
            .min(Semaphore::MAX_PERMITS);
        Self {
            room: Arc::new(Semaphore::new(permits)),
            total: permits as u64,
            wait,
        }
    }

    /// Bytes of request bodies held now.
    pub fn held(&self) -> u64 {
        self.total - self.room.available_permits() as u64
    }

    /// Take `n` more bytes into `held`, waiting at most the budget's `wait`.
    async fn take(
        &self,
        held: &mut Option<OwnedSemaphorePermit>,
        n: u64,
    ) -> Result<(), GatewayError> {
        if n == 0 {
            return Ok(());
        }
        // Bodies are at most `server.max_body_bytes` (at most u32::MAX, checked by config).
        let n = u32::try_from(n).map_err(|_| GatewayError::PayloadTooLarge {
            limit: u64::from(u32::MAX),
        })?;
        let permit = match self.room.clone().try_acquire_many_owned(n) {
            Ok(p) => p,
            // A timeout, or a closed semaphore (never: nothing closes it).
            Err(_) => {
                match tokio::time::timeout(self.wait, self.room.clone().acquire_many_owned(n)).await
                {
                    Ok(Ok(p)) => p,
                    _ => {
                        return Err(GatewayError::Overloaded {
                            retry_after: self.wait,
                        })
                    }
                }
            }
        };
        match held {
            Some(h) => h.merge(permit),
            None => *held = Some(permit),
        }
        Ok(())
    }
}

/// Per-request limits.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimits {
    /// `server.max_body_bytes`.
    pub max_bytes: u64,
    /// `server.body_timeout`: from the end of the head to the end of the body.
    pub timeout: Duration,
}

/// A request body read whole, with the budget it holds until dropped.
#[derive(Debug, Default)]
pub struct Buffered {
    pub bytes: Bytes,
    _room: Option<OwnedSemaphorePermit>,
}

impl Buffered {
    /// The same body in an allocation of its own, still counted in the budget. A body read
    /// in one frame is a slice of the connection's read buffer: kept for long (a stream's
    /// lifetime), it would keep that whole buffer alive.
    pub fn detach(self) -> Self {
        Self {
            bytes: Bytes::copy_from_slice(&self.bytes),
            _room: self._room,
        }
    }
}

/// Read the whole body: 413 over `max_bytes` (at once from `Content-Length`), 408 after
/// `timeout`, 503 `overloaded` when the budget has no room in time.
pub async fn read<B>(
    headers: &http::HeaderMap,
    body: B,
    limits: BodyLimits,
    budget: &BodyBudget,
) -> Result<Buffered, GatewayError>
where
    B: HttpBody<Data = Bytes> + Send,
    B::Error: Into<BoxError>,
{
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limits.max_bytes) {
        return Err(GatewayError::PayloadTooLarge {
            limit: limits.max_bytes,
        });
    }
    if declared == Some(0) || body.is_end_stream() {
        return Ok(Buffered::default());
    }
    let mut room = None;
    // Reserved before reading: a request that must wait leaves its body in the socket.
    if let Some(n) = declared {
        budget.take(&mut room, n).await?;
    }
    let collect = collect(body, declared, limits.max_bytes, budget, &mut room);
    let bytes = tokio::time::timeout(limits.timeout, collect)
        .await
        .map_err(|_| {
            GatewayError::RequestTimeout(humantime::format_duration(limits.timeout).to_string())
        })??;
    Ok(Buffered { bytes, _room: room })
}

async fn collect<B>(
    body: B,
    declared: Option<u64>,
    limit: u64,
    budget: &BodyBudget,
    room: &mut Option<OwnedSemaphorePermit>,
) -> Result<Bytes, GatewayError>
where
    B: HttpBody<Data = Bytes> + Send,
    B::Error: Into<BoxError>,
{
    let too_large = || GatewayError::PayloadTooLarge { limit };
    tokio::pin!(body);
    // Most bodies arrive in one frame: kept as it is, copied only when a second one comes.
    let mut first: Option<Bytes> = None;
    let mut joined: Option<BytesMut> = None;
    let mut len: u64 = 0;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| {
            let e: BoxError = e.into();
            GatewayError::InvalidRequest(format!("could not read the request body: {e}"))
        })?;
        let Ok(data) = frame.into_data() else {
            continue; // trailers carry nothing the gateway forwards
        };
        if data.is_empty() {
            continue;
        }
        len += data.len() as u64;
        if len > limit {
            return Err(too_large());
        }
        match declared {
            // HTTP/1.1 and HTTP/2 both refuse a body longer than its `content-length`, so
            // the reservation covers it; this only guards the arithmetic.
            Some(n) if len > n => return Err(too_large()),
            Some(_) => {}
            None => budget.take(room, data.len() as u64).await?,
        }
        match (&mut joined, first.take()) {
            (Some(buf), _) => buf.extend_from_slice(&data),
            (None, None) => first = Some(data),
            (None, Some(f)) => {
                let cap = declared.unwrap_or(0).max(len);
                let mut buf = BytesMut::with_capacity(usize::try_from(cap).unwrap_or(0));
                buf.extend_from_slice(&f);
                buf.extend_from_slice(&data);
                joined = Some(buf);
            }
        }
    }
    Ok(match joined {
        Some(buf) => buf.freeze(),
        None => first.unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use http_body_util::{Full, StreamBody};

    fn limits(max: u64) -> BodyLimits {
        BodyLimits {
            max_bytes: max,
            timeout: Duration::from_secs(5),
        }
    }

    fn declared(n: usize) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        h.insert(header::CONTENT_LENGTH, n.into());
        h
    }

    fn chunks(
        parts: Vec<&'static [u8]>,
    ) -> impl HttpBody<Data = Bytes, Error = std::convert::Infallible> + Send {
        StreamBody::new(futures_util::stream::iter(
            parts
                .into_iter()
                .map(|p| Ok(http_body::Frame::data(Bytes::from_static(p)))),
        ))
    }

    #[tokio::test]
    async fn bodies_hold_budget_until_dropped() {
        let budget = BodyBudget::new(100, Duration::from_millis(50));
        let a = read(
            &declared(60),
            Full::new(Bytes::from(vec![1u8; 60])),
            limits(100),
            &budget,
        )
        .await
        .unwrap();
        assert_eq!(a.bytes.len(), 60);
        assert_eq!(budget.held(), 60);
        // 60 more do not fit while `a` is held: refused after the wait, nothing read.
        let e = read(
            &declared(60),
            Full::new(Bytes::from(vec![1u8; 60])),
            limits(100),
            &budget,
        )
        .await
        .unwrap_err();
        assert_eq!(e.code(), "overloaded");
        assert_eq!(e.status(), 503);
        assert_eq!(budget.held(), 60, "a refused request holds nothing");
        drop(a);
        assert_eq!(budget.held(), 0);
    }

    #[tokio::test]
    async fn a_waiting_request_gets_room_when_it_is_released() {
        let budget = BodyBudget::new(100, Duration::from_secs(5));
        let a = read(
            &declared(80),
            Full::new(Bytes::from(vec![1u8; 80])),
            limits(100),
            &budget,
        )
        .await
        .unwrap();
        let b2 = budget.clone();
        let waiting = tokio::spawn(async move {
            read(
                &declared(80),
                Full::new(Bytes::from(vec![2u8; 80])),
                limits(100),
                &b2,
            )
            .await
            .map(|b| b.bytes.len())
        });
        tokio::task::yield_now().await;
        drop(a);
        assert_eq!(waiting.await.unwrap().unwrap(), 80);
    }

    #[tokio::test]
    async fn unknown_lengths_reserve_as_they_arrive_and_are_joined() {
        let budget = BodyBudget::new(10, Duration::from_millis(20));
        let b = read(
            &http::HeaderMap::new(),
            chunks(vec![b"abc", b"", b"defg"]),
            limits(100),
            &budget,
        )
        .await
        .unwrap();
        assert_eq!(&b.bytes[..], b"abcdefg");
        assert_eq!(budget.held(), 7);
        let e = read(
            &http::HeaderMap::new(),
            chunks(vec![b"abc", b"defg"]),
            limits(100),
            &budget,
        )
        .await
        .unwrap_err();
        assert_eq!(e.code(), "overloaded");
        assert_eq!(budget.held(), 7, "the partial reservation was given back");
        let e = read(
            &http::HeaderMap::new(),
            chunks(vec![b"abcdef", b"ghijk"]),
            limits(8),
            &BodyBudget::new(100, Duration::from_millis(1)),
        )
        .await
        .unwrap_err();
        assert_eq!(e.code(), "payload_too_large");
    }

    #[tokio::test]
    async fn declared_lengths_over_the_limit_are_refused_unread() {
        let budget = BodyBudget::new(1000, Duration::from_millis(1));
        let e = read(
            &declared(101),
            Full::new(Bytes::from(vec![0u8; 101])),
            limits(100),
            &budget,
        )
        .await
        .unwrap_err();
        assert_eq!(e.code(), "payload_too_large");
        assert_eq!(budget.held(), 0);
    }
}
