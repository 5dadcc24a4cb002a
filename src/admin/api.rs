//! The admin API's endpoints (described by `openapi.json`, which a schemathesis run in
//! the test suite holds them to): clients, keys, usage, charts, refusals, backends,
//! reload, metrics.
//!
//! Key changes take effect in this replica before the answer is sent (its key table is
//! read again from the store), and in the others at their next poll
//! (`store.refresh_interval`). A created or rotated key is in its answer and nowhere else:
//! not in the audit line, which names the key's id and client.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::BodyExt;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{error, Endpoint, Grant, Inner};
use crate::config::ClientConfig;
use crate::error::{full, json_response, Body, BoxError};
use crate::reload::Trigger;
use crate::report;
use crate::store::usage::{SeriesPoint, SeriesQuery, Split};
use crate::store::{GroupBy, StoreError, UsageQuery};

/// Largest request body the admin API reads.
const MAX_BODY: usize = 64 * 1024;

type Answer = (Response<Body>, Option<Value>);

fn plain(r: Response<Body>) -> Answer {
    (r, None)
}

fn ok(status: StatusCode, v: &Value) -> Response<Body> {
    json_response(status, Bytes::from(v.to_string()))
}

fn bad(message: impl AsRef<str>) -> Response<Body> {
    error(
        StatusCode::BAD_REQUEST,
        "invalid_parameter",
        message.as_ref(),
    )
}

/// Answer `endpoint` for a request allowed by `grant`.
pub(super) async fn answer<B>(
    inner: &Inner,
    grant: &Grant,
    endpoint: Endpoint,
    req: Request<B>,
) -> Answer
where
    B: http_body::Body + Send,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let query = req.uri().query().unwrap_or("").to_owned();
    let q = Query::parse(&query);
    match endpoint {
        Endpoint::WhoAmI => plain(ok(
            StatusCode::OK,
            &json!({
                "name": grant.name.as_deref().unwrap_or("anonymous"),
                "scopes": grant.scopes.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
            }),
        )),
        Endpoint::Clients => {
            // All at once: with Redis slow, the page waits for one deadline, not one each.
            let snap = inner.gateway.snapshot();
            let list = futures_util::future::join_all(
                snap.client_configs
                    .iter()
                    .map(|c| client_view(inner, &snap, c)),
            )
            .await;
            plain(ok(
                StatusCode::OK,
                &json!({ "object": "list", "data": list }),
            ))
        }
        Endpoint::Client(id) => {
            let snap = inner.gateway.snapshot();
            match snap.client_configs.iter().find(|c| c.id.as_str() == id) {
                Some(c) => plain(ok(StatusCode::OK, &client_view(inner, &snap, c).await)),
                None => plain(no_client(&id)),
            }
        }
        Endpoint::Keys => {
            let Some((admin, _)) = &inner.stores.keys else {
                return plain(keys_disabled());
            };
            match admin.list(q.get("client")).await {
                Ok(mut keys) => {
                    keys.reverse();
                    let now = crate::identify::api_key::unix_now();
                    let data: Vec<Value> = keys.iter().map(|k| k.view(now)).collect();
                    plain(ok(
                        StatusCode::OK,
                        &json!({ "object": "list", "data": data }),
                    ))
                }
                Err(e) => plain(store_error(&e)),
            }
        }
        Endpoint::CreateKey | Endpoint::RotateKey => {
            let rotate = endpoint == Endpoint::RotateKey;
            let body = match read_json::<KeyRequest, B>(req).await {
                Ok(b) => b,
                Err(r) => return plain(*r),
            };
            issue(inner, body, rotate).await
        }
        Endpoint::RevokeKey(id) => {
            let Some((admin, table)) = &inner.stores.keys else {
                return plain(keys_disabled());
            };
            match admin.revoke(&id).await {
                Ok(record) => {
                    refresh(table).await;
                    let now = crate::identify::api_key::unix_now();
                    let detail =
                        json!({ "action": "revoke", "key_id": record.id, "client": record.client });
                    (ok(StatusCode::OK, &record.view(now)), Some(detail))
                }
                Err(e) => plain(store_error(&e)),
            }
        }
        Endpoint::Usage => plain(usage(inner, &q).await),
        Endpoint::Series | Endpoint::UsageChart => {
            plain(series(inner, &q, endpoint == Endpoint::UsageChart).await)
        }
        Endpoint::Refusals | Endpoint::RefusalsChart => {
            plain(refusals(inner, &q, endpoint == Endpoint::RefusalsChart))
        }
        Endpoint::Backends => plain(ok(StatusCode::OK, &inner.gateway.backends_view())),
        Endpoint::Reload => {
            let outcome = inner.reloader.reload(Trigger::Admin).await;
            let status = if outcome.applied() {
                StatusCode::OK
            } else {
                StatusCode::UNPROCESSABLE_ENTITY
            };
            let body = serde_json::to_value(&outcome).unwrap_or_default();
            let detail = json!({ "action": "reload", "applied": outcome.applied() });
            (ok(status, &body), Some(detail))
        }
        Endpoint::Metrics => {
            let mut r = Response::new(full(inner.gateway.metrics.render()));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            plain(r)
        }
    }
}

/// The query string's parameters (the last of repeated ones).
struct Query(Vec<(String, String)>);

impl Query {
    fn parse(q: &str) -> Self {
        Query(form_urlencoded::parse(q.as_bytes()).into_owned().collect())
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

fn client_configs(inner: &Inner) -> Arc<Vec<ClientConfig>> {
    inner.gateway.snapshot().client_configs.clone()
}

fn no_client(id: &str) -> Response<Body> {
    error(
        StatusCode::NOT_FOUND,
        "client_not_found",
        &format!(
            "no [[clients]] entry has the id '{}'",
            crate::shown::shown(id)
        ),
    )
}

fn keys_disabled() -> Response<Body> {
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        "api_keys_disabled",
        "API keys are disabled: set [store] key_hmac_secret (or key_hmac_secret_file)",
    )
}

fn store_error(e: &StoreError) -> Response<Body> {
    match e {
        StoreError::UnknownKey(_) => error(StatusCode::NOT_FOUND, "key_not_found", &e.to_string()),
        StoreError::Invalid(m) => bad(m),
        _ => {
            tracing::warn!(error = %e, "admin API: the store failed");
            error(
                StatusCode::SERVICE_UNAVAILABLE,
                "store_unavailable",
                "the store did not answer; try again",
            )
        }
    }
}

/// A client's policy as configured, and what its limits have left now.
async fn client_view(inner: &Inner, snap: &crate::gateway::Snapshot, c: &ClientConfig) -> Value {
    let policy = snap
        .identity
        .clients()
        .find(|p| &*p.id == c.id.as_str())
        .cloned();
    let (limits, counters, in_flight) = match &policy {
        Some(p) => {
            let (views, source) = inner.gateway.limiter().remaining(&p.limits).await;
            (views, source, p.limits.in_flight())
        }
        None => (Vec::new(), "none", 0),
    };
    let jwt: Vec<Value> = c
        .jwt
        .iter()
        .map(|b| {
            let claims: serde_json::Map<String, Value> = b
                .claims
                .iter()
                .map(|(k, m)| {
                    let v = match m {
                        crate::config::ClaimMatch::One(t) => json!(t.as_str()),
                        crate::config::ClaimMatch::All(ts) => {
                            json!(ts.iter().map(|t| t.as_str()).collect::<Vec<_>>())
                        }
                    };
                    (k.clone(), v)
                })
                .collect();
            json!({ "issuer": b.issuer.as_str(), "claims": claims })
        })
        .collect();
    let certificates: Vec<Value> = c
        .certificates
        .iter()
        .map(|b| {
            let mut m = serde_json::Map::new();
            for (k, v) in [
                ("san_dns", &b.san_dns),
                ("san_uri", &b.san_uri),
                ("san_email", &b.san_email),
                ("subject_cn", &b.subject_cn),
                ("sha256", &b.sha256),
            ] {
                if let Some(v) = v {
                    m.insert(k.into(), json!(v.as_str()));
                }
            }
            Value::Object(m)
        })
        .collect();
    let scopes: serde_json::Map<String, Value> = c
        .deployment_scopes
        .iter()
        .map(|(g, s)| (g.clone(), json!(texts(s))))
        .collect();
    let per_subject = c.per_subject.as_ref().map(|s| {
        json!({
            "requests_per_minute": s.requests_per_minute,
            "tokens_per_minute": s.tokens_per_minute,
            "token_quota": s.token_quota.map(|q| json!({ "tokens": q.tokens, "period": crate::admit::period::name(q.period) })),
            "budget": s.budget.map(|b| json!({ "usd": b.usd, "period": crate::admit::period::name(b.period) })),
        })
    });
    json!({
        "id": c.id.as_str(),
        "authentication": {
            "jwt": jwt,
            "certificates": certificates,
            "api_keys": inner.stores.keys.is_some(),
            "anonymous": c.anonymous,
        },
        "deployments": texts(&c.deployments),
        "operations": texts(&c.operations),
        "deployment_scopes": scopes,
        "max_concurrent_requests": c.max_concurrent_requests,
        "in_flight": in_flight,
        "limits": limits,
        "per_subject": per_subject,
        "counters": counters,
    })
}

fn texts(v: &[crate::config::Text]) -> Vec<&str> {
    v.iter().map(|t| t.as_str()).collect()
}

/// `POST /admin/keys` and `/admin/keys/rotate`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyRequest {
    client: String,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    expires_in: Option<String>,
    #[serde(default)]
    grace: Option<String>,
}

fn duration(field: &str, v: Option<&str>) -> Result<Option<Duration>, Box<Response<Body>>> {
    let Some(v) = v else { return Ok(None) };
    match humantime::parse_duration(v) {
        Ok(d) if !d.is_zero() && d <= Duration::from_secs(10 * 366 * 86_400) => Ok(Some(d)),
        Ok(_) => Err(Box::new(bad(format!(
            "{field}: must be more than 0 and at most 10 years"
        )))),
        Err(_) => Err(Box::new(bad(format!(
            "{field}: '{}' is not a duration (e.g. 90d, 12h)",
            crate::shown::shown(v)
        )))),
    }
}

async fn issue(inner: &Inner, body: KeyRequest, rotate: bool) -> Answer {
    let Some((admin, table)) = &inner.stores.keys else {
        return plain(keys_disabled());
    };
    if !client_configs(inner)
        .iter()
        .any(|c| c.id.as_str() == body.client)
    {
        return plain(no_client(&body.client));
    }
    let expires = match duration("expires_in", body.expires_in.as_deref()) {
        Ok(d) => d,
        Err(r) => return plain(*r),
    };
    if !rotate && body.grace.is_some() {
        return plain(bad("grace: only for POST /admin/keys/rotate"));
    }
    let now = crate::identify::api_key::unix_now();
    let name = body.name.as_deref();
    let (resp, record_id) = if rotate {
        let grace = match duration("grace", body.grace.as_deref()) {
            Ok(d) => d.unwrap_or(Duration::from_secs(86_400)),
            Err(r) => return plain(*r),
        };
        match admin.rotate(&body.client, grace, expires, name).await {
            Ok(r) => {
                let v = json!({
                    "key": r.key.expose(),
                    "record": r.record.view(now),
                    "rolled": r.rolled.iter().map(|k| k.view(now)).collect::<Vec<_>>(),
                });
                (ok(StatusCode::CREATED, &v), r.record.id)
            }
            Err(e) => return plain(store_error(&e)),
        }
    } else {
        match admin.create(&body.client, name, expires).await {
            Ok((record, key)) => {
                let mut v = record.view(now);
                v["key"] = json!(key.expose());
                (ok(StatusCode::CREATED, &v), record.id)
            }
            Err(e) => return plain(store_error(&e)),
        }
    };
    refresh(table).await;
    let detail = json!({
        "action": if rotate { "rotate" } else { "create" },
        "key_id": record_id,
        "client": body.client,
    });
    (resp, Some(detail))
}

/// Read the key table again, so this replica sees a change before it answers.
async fn refresh(table: &crate::identify::api_key::ApiKeys) {
    if let Err(e) = table.reload().await {
        tracing::warn!(error = %e, "admin API: the key table could not be read again; the change applies at the next poll");
    }
}

async fn read_json<T, B>(req: Request<B>) -> Result<T, Box<Response<Body>>>
where
    T: for<'de> Deserialize<'de>,
    B: http_body::Body + Send,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let json_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
    if !json_type {
        return Err(Box::new(error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send the body as application/json",
        )));
    }
    let limited = http_body_util::Limited::new(req.into_body(), MAX_BODY);
    let bytes = match limited.collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return Err(Box::new(if e.is::<http_body_util::LengthLimitError>() {
                error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "body_too_large",
                    "the body is larger than 64 KiB",
                )
            } else {
                bad("the body could not be read")
            }))
        }
    };
    serde_json::from_slice(&bytes).map_err(|e| {
        // serde's message names the field and the problem, never quotes the body.
        Box::new(bad(format!(
            "invalid body: {}",
            e.to_string().escape_default()
        )))
    })
}

/// `since`, `until` (default now) of a query, as unix ms.
fn window(q: &Query, default_since: &str, now_ms: i64) -> Result<(i64, i64), Box<Response<Body>>> {
    let since = report::parse_time("since", q.get("since").unwrap_or(default_since), now_ms)
        .map_err(|e| Box::new(bad(e.to_string())))?;
    let until = match q.get("until") {
        Some(u) => {
            report::parse_time("until", u, now_ms).map_err(|e| Box::new(bad(e.to_string())))?
        }
        None => now_ms,
    };
    // RFC 3339 writes years 1970..=9999 here; the bucket arithmetic stays far from overflow.
    const YEAR_10000_MS: i64 = 253_402_300_800_000;
    if since < 0 || until > YEAR_10000_MS {
        return Err(Box::new(bad(
            "since, until: between 1970-01-01 and 9999-12-31",
        )));
    }
    if since >= until {
        return Err(Box::new(bad("since: must be before until (default: now)")));
    }
    Ok((since, until))
}

fn usage_store(inner: &Inner) -> Result<&Arc<dyn crate::store::Store>, Box<Response<Body>>> {
    inner.stores.usage.as_ref().ok_or_else(|| {
        Box::new(error(
            StatusCode::SERVICE_UNAVAILABLE,
            "usage_not_recorded",
            "usage is not recorded: set [store] record_usage = true",
        ))
    })
}

async fn usage(inner: &Inner, q: &Query) -> Response<Body> {
    let now = report::now_ms();
    let (since_ms, until_ms) = match window(q, "7d", now) {
        Ok(w) => w,
        Err(r) => return *r,
    };
    let by = match q.get("by").unwrap_or("day") {
        "day" => GroupBy::Day,
        "hour" => GroupBy::Hour,
        "client" => GroupBy::Client,
        "deployment" => GroupBy::Deployment,
        "subject" => GroupBy::Subject,
        _ => return bad("by: one of day, hour, client, deployment, subject"),
    };
    let store = match usage_store(inner) {
        Ok(s) => s,
        Err(r) => return *r,
    };
    let query = UsageQuery {
        client: q.get("client").map(str::to_owned),
        deployment: q.get("deployment").map(str::to_owned),
        since_ms,
        until_ms,
        by,
    };
    match store.usage_report(&query).await {
        Ok(rows) => {
            let data: Vec<Value> = rows
                .iter()
                .map(|r| {
                    json!({
                        "key": r.key, "requests": r.requests, "prompt_tokens": r.prompt_tokens,
                        "cached_tokens": r.cached_tokens, "completion_tokens": r.completion_tokens,
                        "reasoning_tokens": r.reasoning_tokens, "total_tokens": r.total_tokens,
                        "cost_usd": r.cost_usd,
                    })
                })
                .collect();
            ok(
                StatusCode::OK,
                &json!({
                    "object": "usage", "by": by.as_str(),
                    "since": crate::store::rfc3339_ms(since_ms), "until": crate::store::rfc3339_ms(until_ms), "data": data,
                }),
            )
        }
        Err(e) => store_error(&e),
    }
}

/// What a series counts.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Metric {
    Requests,
    Tokens,
    Cost,
    Errors,
}

impl Metric {
    fn of(self, p: &SeriesPoint) -> f64 {
        match self {
            Metric::Requests => p.requests as f64,
            Metric::Tokens => p.total_tokens as f64,
            Metric::Cost => p.cost_usd,
            Metric::Errors => p.errors as f64,
        }
    }
}

async fn series(inner: &Inner, q: &Query, svg: bool) -> Response<Body> {
    let now = report::now_ms();
    let (since_ms, until_ms) = match window(q, "24h", now) {
        Ok(w) => w,
        Err(r) => return *r,
    };
    let split = match q.get("split").unwrap_or("none") {
        "none" => None,
        "client" => Some(Split::Client),
        "deployment" => Some(Split::Deployment),
        _ => return bad("split: one of none, client, deployment"),
    };
    let (metric, metric_name, unit) = match q.get("metric").unwrap_or("requests") {
        "requests" => (Metric::Requests, "requests", crate::chart::Unit::Count),
        "tokens" => (Metric::Tokens, "tokens", crate::chart::Unit::Tokens),
        "cost" => (Metric::Cost, "cost", crate::chart::Unit::Usd),
        "errors" => (Metric::Errors, "errors", crate::chart::Unit::Count),
        _ => return bad("metric: one of requests, tokens, cost, errors"),
    };
    let buckets: i64 = match q.get("buckets").map(str::parse::<i64>) {
        None => 48,
        Some(Ok(n)) if (1..=500).contains(&n) => n,
        Some(_) => return bad("buckets: an integer from 1 to 500"),
    };
    let store = match usage_store(inner) {
        Ok(s) => s,
        Err(r) => return *r,
    };
    let bucket_ms = ((until_ms - since_ms) + buckets - 1) / buckets;
    let query = SeriesQuery {
        client: q.get("client").map(str::to_owned),
        deployment: q.get("deployment").map(str::to_owned),
        since_ms,
        until_ms,
        bucket_ms,
        split,
    };
    let points = match store.usage_series(&query).await {
        Ok(p) => p,
        Err(e) => return store_error(&e),
    };
    let n = usize::try_from((until_ms - since_ms + bucket_ms - 1) / bucket_ms).unwrap_or(0);
    let starts: Vec<i64> = (0..n as i64).map(|i| since_ms + i * bucket_ms).collect();
    let mut series: Vec<crate::chart::Series> = Vec::new();
    let mut names: Vec<Option<String>> = Vec::new();
    for p in &points {
        let i = match names.iter().position(|k| *k == p.key) {
            Some(i) => i,
            None => {
                names.push(p.key.clone());
                series.push(crate::chart::Series {
                    name: p.key.clone().unwrap_or_else(|| {
                        if split.is_some() {
                            "(none)".into()
                        } else {
                            metric_name.into()
                        }
                    }),
                    values: vec![0.0; n],
                });
                series.len() - 1
            }
        };
        let b = usize::try_from((p.bucket_start_ms - since_ms) / bucket_ms).unwrap_or(usize::MAX);
        if let Some(v) = series[i].values.get_mut(b) {
            *v += metric.of(p);
        }
    }
    if svg {
        let title = format!("{metric_name} per {}", human(bucket_ms));
        let chart = crate::chart::TimeChart {
            title: &title,
            unit,
            buckets_ms: &starts,
            bucket_ms,
            series: &series,
        };
        let mut r = Response::new(full(crate::chart::stacked_bars(&chart)));
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("image/svg+xml"),
        );
        return r;
    }
    let list: Vec<Value> = series
        .iter()
        .zip(&names)
        .map(|(s, k)| json!({ "name": k, "total": s.values.iter().sum::<f64>(), "values": s.values }))
        .collect();
    ok(
        StatusCode::OK,
        &json!({
            "object": "usage.series", "metric": metric_name,
            "since": crate::store::rfc3339_ms(since_ms), "until": crate::store::rfc3339_ms(until_ms), "bucket_ms": bucket_ms,
            "buckets": starts.iter().map(|&s| crate::store::rfc3339_ms(s)).collect::<Vec<_>>(),
            "series": list,
        }),
    )
}

/// `90000` → `1.5 min`, for chart titles.
fn human(ms: i64) -> String {
    match ms {
        m if m % 86_400_000 == 0 => format!("{} d", m / 86_400_000),
        m if m % 3_600_000 == 0 => format!("{} h", m / 3_600_000),
        m if m >= 60_000 => format!("{:.0} min", m as f64 / 60_000.0),
        m => format!("{:.0} s", (m as f64 / 1000.0).max(1.0)),
    }
}

fn refusals(inner: &Inner, q: &Query, svg: bool) -> Response<Body> {
    let now = report::now_ms();
    let since = q.get("since").unwrap_or("24h");
    let back = match humantime::parse_duration(since) {
        Ok(d) if d <= Duration::from_secs(86_400) => d,
        _ => return bad("since: a duration back from now, at most 24h (e.g. 1h)"),
    };
    let since_ms = now - i64::try_from(back.as_millis()).unwrap_or(0);
    let activity = inner.gateway.audit().activity();
    let counts = activity.since(since_ms);
    if svg {
        let items: Vec<(String, f64)> = counts
            .iter()
            .map(|c| (format!("{} ({})", c.code, c.status), c.count as f64))
            .collect();
        let title = format!(
            "Refusals and errors by reason, last {}",
            humantime::format_duration(back)
        );
        let mut r = Response::new(full(crate::chart::horizontal_bars(
            &title,
            crate::chart::Unit::Count,
            &items,
        )));
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("image/svg+xml"),
        );
        return r;
    }
    let started = activity
        .started()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    ok(
        StatusCode::OK,
        &json!({
            "object": "refusals",
            "replica_started": crate::store::rfc3339_ms(started),
            "since": crate::store::rfc3339_ms(since_ms.max(started)),
            "total": counts.iter().map(|c| c.count).sum::<u64>(),
            "by_reason": counts.iter().map(|c| json!({ "code": c.code, "status": c.status, "count": c.count })).collect::<Vec<_>>(),
        }),
    )
}
