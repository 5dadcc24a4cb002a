//! Account: what did the request really cost?
//!
//! The stage after the answer. A [`Meter`] rides along with the relayed response body
//! ([`crate::proxy::body::Relay`]): it reads each frame for the backend's `usage` without
//! holding the stream back ([`usage::JsonUsage`] for JSON answers, [`tap::SseTap`] for
//! event streams), and, when the gateway asked the backend for a usage chunk the client did
//! not ask for (`stream_options.include_usage`), removes it so the client sees the stream
//! it would have seen. For a traced request the same scan also keeps the `model` the answer
//! names ([`Meter::take_response_model`], for `gen_ai.response.model`). When the body ends,
//! [`Meter::settle`]:
//! - takes the usage the backend reported, or — for a stream the backend cut — the prompt
//!   estimate plus the streamed text counted with the tokenizer (`counted`), or for an
//!   error answer nothing (backends do not bill refusals);
//! - reconciles the admission [`Reservation`] (refunds or charges the difference);
//! - prices the tokens (`[prices]`), counts them in the metrics, adds them to the audit
//!   line, and queues a usage record for the store (batched, off the request path).
//!
//! When the client goes away before the end, the relay keeps reading the backend, bounded
//! in time and bytes ([`DRAIN_BYTES`], [`DRAIN_TIME`]), until the usage arrives, so the
//! charge stays exact.

pub mod tap;
pub mod usage;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;

use crate::admit::{Demand, Reservation};
use crate::audit::{AuditRecord, AuditUsage};
use crate::buffer::Buffered;
use crate::metrics::{AccountingMetrics, TokenCounts};
use crate::pricing::{self, Price};
use crate::route::Operation;
use crate::store::UsageRecord;
use crate::tokens::{self, Encoding, Estimate, EstimateOptions};
use crate::usage_log::UsageWriter;
use tap::{Mode, SseTap};
use usage::{JsonUsage, Usage};

/// After a client disconnect, read at most this much more of the backend's answer for
/// its usage.
pub const DRAIN_BYTES: u64 = 8 * 1024 * 1024;
/// ... and for at most this long.
pub const DRAIN_TIME: Duration = Duration::from_secs(120);

/// What every request's accounting shares: where records go, the metrics.
#[derive(Clone)]
pub struct Accounting {
    pub writer: Option<Arc<UsageWriter>>,
    pub metrics: AccountingMetrics,
}

/// What the pipeline knows before forwarding, for the meter.
pub struct Plan {
    /// Shared by every request (one reference count per request, not a copy).
    pub accounting: Arc<Accounting>,
    pub operation: Operation,
    pub deployment: Option<String>,
    pub encoding: Encoding,
    /// The request's estimate, or what to make one from.
    pub estimate: Estimated,
    pub reservation: Option<Reservation>,
    pub price: Option<Price>,
    /// The gateway added `stream_options.include_usage` to the request.
    pub injected_usage: bool,
    /// Read the model the answer names too (the request is traced).
    pub want_model: bool,
    pub client: Arc<str>,
    pub subject: Option<String>,
    pub key_id: Option<Arc<str>>,
}

/// What the account stage knows of a request's estimate.
pub enum Estimated {
    /// Admission estimated it.
    Admitted(Estimate),
    /// Nothing needed an estimate before the answer; it can be made from the body.
    Deferred(Deferred),
    /// Neither (not estimated, and no body worth estimating: not a POST).
    Unknown,
}

/// A request not estimated before it was forwarded (its client has no token limit): its
/// body, kept (and counted in the gateway's body budget) until the answer shows whether its
/// usage must be estimated after all — a success that reports none, or a stream the backend
/// cuts.
pub struct Deferred {
    pub body: Buffered,
    /// The body is a form, not JSON.
    pub form: bool,
    pub options: EstimateOptions,
}

impl Plan {
    /// The admission's estimate, if it made one.
    fn admitted(&self) -> Option<Estimate> {
        match &self.estimate {
            Estimated::Admitted(e) => Some(*e),
            _ => None,
        }
    }

    /// The request's estimate: the admission's, or one made now from the deferred body.
    fn estimate(&self) -> Option<Estimate> {
        match &self.estimate {
            Estimated::Admitted(e) => Some(*e),
            Estimated::Deferred(d) => Some(tokens::estimate_body(
                self.operation,
                self.deployment.as_deref().unwrap_or_default(),
                &d.body.bytes,
                d.form,
                &d.options,
            )),
            Estimated::Unknown => None,
        }
    }

    /// Whether this operation's answers report token usage.
    fn reports_usage(&self) -> bool {
        matches!(
            self.operation,
            Operation::Chat | Operation::Completions | Operation::Embeddings | Operation::Responses
        )
    }
}

enum Tap {
    Json(JsonUsage),
    /// A JSON answer of a traced request: its `model` is read too.
    JsonModel(JsonUsage<true>),
    Sse(Box<SseTap>),
    /// Nothing to read (an error answer, an operation without usage).
    None,
}

/// A request's accounting, carried by its relayed body; see the module docs.
pub struct Meter {
    plan: Plan,
    tap: Tap,
    status: u16,
}

impl Meter {
    /// The meter for an answer with `status` and `content_type`.
    pub fn new(plan: Plan, status: u16, content_type: Option<&str>) -> Self {
        let ct = content_type.unwrap_or("");
        let ok = (200..300).contains(&status);
        let mut plan = plan;
        let tap = if !ok || !plan.reports_usage() {
            Tap::None
        } else if ct.starts_with("text/event-stream") {
            let tap = SseTap::new(if plan.injected_usage {
                Mode::Strip
            } else {
                Mode::Observe
            });
            Tap::Sse(Box::new(if plan.want_model {
                tap.with_model()
            } else {
                tap
            }))
        } else if ct.starts_with("application/json") {
            if plan.want_model {
                Tap::JsonModel(JsonUsage::with_model())
            } else {
                Tap::Json(JsonUsage::new())
            }
        } else {
            Tap::None
        };
        let reports = ok && plan.reports_usage();
        plan.estimate = match std::mem::replace(&mut plan.estimate, Estimated::Unknown) {
            // A failure or an operation without usage: nothing will be estimated.
            Estimated::Deferred(_) if !reports => Estimated::Unknown,
            // A stream may last long: its own allocation, not the connection's buffer (a
            // JSON answer is read to its end at once).
            Estimated::Deferred(d) if !matches!(tap, Tap::Json(_) | Tap::JsonModel(_)) => {
                Estimated::Deferred(Deferred {
                    body: d.body.detach(),
                    ..d
                })
            }
            kept => kept,
        };
        Self { plan, tap, status }
    }

    /// Read one frame of the answer; returns the bytes to forward (the frame itself unless
    /// a usage chunk the client did not ask for is removed). May be empty.
    pub fn feed(&mut self, frame: Bytes) -> Bytes {
        match &mut self.tap {
            Tap::Json(j) => {
                j.feed(&frame);
                frame
            }
            Tap::JsonModel(j) => {
                j.feed(&frame);
                frame
            }
            Tap::Sse(s) => s.feed(frame),
            Tap::None => frame,
        }
    }

    /// At the end of the body: bytes still held (an event the stream stopped inside).
    pub fn flush(&mut self) -> Bytes {
        match &mut self.tap {
            Tap::Sse(s) => s.flush(),
            _ => Bytes::new(),
        }
    }

    /// Whether the bytes forwarded may differ from the backend's (a usage chunk removed):
    /// the answer's length is then unknown in advance.
    pub fn rewrites(&self) -> bool {
        matches!(&self.tap, Tap::Sse(s) if s.mode() == Mode::Strip)
    }

    /// The model the answer named, handed over (for the trace, just before
    /// [`Meter::settle`]).
    pub fn take_response_model(&mut self) -> Option<String> {
        match &mut self.tap {
            Tap::JsonModel(j) => j.take_model(),
            Tap::Sse(s) => s.take_model(),
            Tap::Json(_) | Tap::None => None,
        }
    }

    /// Whether the answer's usage is still to come (worth reading on after a disconnect).
    pub fn awaits_usage(&self) -> bool {
        match &self.tap {
            Tap::Json(j) => j.finish().is_none(),
            Tap::JsonModel(j) => j.finish().is_none(),
            Tap::Sse(s) => s.finish().usage.is_none(),
            Tap::None => false,
        }
    }

    /// The usage the request is charged, where it came from, and the request's estimate
    /// (made now if it is needed and admission made none).
    fn usage(&self) -> (Usage, &'static str, Option<Estimate>) {
        let reported = match &self.tap {
            Tap::Json(j) => j.finish(),
            Tap::JsonModel(j) => j.finish(),
            Tap::Sse(s) => s.finish().usage,
            Tap::None => None,
        };
        if let Some(u) = reported {
            return (u, "reported", self.plan.admitted());
        }
        if !(200..300).contains(&self.status) {
            // Refused or failed: backends do not bill it.
            return (Usage::default(), "none", self.plan.admitted());
        }
        if !self.plan.reports_usage() {
            return (Usage::default(), "none", self.plan.admitted());
        }
        let estimate = self.plan.estimate();
        let e = estimate.unwrap_or_default();
        if let Tap::Sse(s) = &self.tap {
            // Cut, abandoned, or complete without a usage chunk (sidecar mode asks for none):
            // the prompt and what was streamed.
            let sum = s.finish();
            let text = tokens::count(self.plan.encoding, sum.delta_text);
            // Text past the tap's limit: a generous 1 token per 2 bytes.
            let completion = text + sum.dropped.div_ceil(2);
            let u = Usage {
                prompt: e.prompt,
                completion,
                ..Usage::default()
            };
            return (u, "counted", estimate);
        }
        // A success that reported nothing: it stays charged as estimated.
        let u = Usage {
            prompt: e.prompt,
            completion: e.output,
            ..Usage::default()
        };
        (u, "none", estimate)
    }

    /// Reconcile, price, count and record the request (see the module docs).
    pub fn settle(self, rec: &mut AuditRecord) {
        let (u, source, estimate) = self.usage();
        let plan = self.plan;
        let tokens = Demand {
            tokens: u.prompt + u.completion,
            micro_usd: 0,
        };
        let usd = plan.price.map_or(0.0, |p| {
            p.usd(pricing::Tokens {
                prompt: u.prompt,
                cached: u.cached,
                completion: u.completion,
            })
        });
        let estimated = estimate.map(Estimate::total);
        let reports_usage = plan.reports_usage();
        if let Some(r) = plan.reservation {
            r.settle(Demand {
                micro_usd: pricing::micro_usd(usd),
                ..tokens
            });
        }
        let m = &plan.accounting.metrics;
        if let Some(d) = &plan.deployment {
            let counts = TokenCounts {
                prompt: u.prompt,
                cached: u.cached,
                completion: u.completion,
                reasoning: u.reasoning,
            };
            m.count_usage(&plan.client, d, counts, usd);
        }
        if let (Some(e), "reported", true) = (estimated, source, reports_usage) {
            m.estimate_error
                .observe(e as f64 - (u.prompt + u.completion) as f64);
        }
        if !reports_usage && source == "none" {
            return;
        }
        rec.usage = Some(AuditUsage {
            prompt_tokens: u.prompt,
            cached_tokens: u.cached,
            completion_tokens: u.completion,
            reasoning_tokens: u.reasoning,
            estimated_tokens: estimated,
            source,
            cost_usd: usd,
        });
        if let Some(w) = &plan.accounting.writer {
            let time_ms = rec
                .time
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as i64);
            let n = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
            w.record(UsageRecord {
                time_ms,
                request_id: rec.request_id.to_str().unwrap_or_default().to_owned(),
                client: plan.client.to_string(),
                subject: plan.subject,
                key_id: plan.key_id.map(|k| k.to_string()),
                operation: plan.operation.as_str().to_owned(),
                deployment: plan.deployment,
                backend: rec.backend.as_deref().cloned(),
                prompt_tokens: n(u.prompt),
                cached_tokens: n(u.cached),
                completion_tokens: n(u.completion),
                reasoning_tokens: n(u.reasoning),
                estimated_tokens: estimated.map(n),
                usage_source: source.to_owned(),
                cost_usd: usd,
                status: i32::from(rec.status),
                stream: rec.stream,
            });
        }
    }
}
