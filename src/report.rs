//! `portcullis usage`: usage records summed from the store, as a table, JSON or CSV.
//!
//! Only `[store] url` is read from the configuration file: the rest (backends, their
//! credentials, the `${ENV}` values they name) is neither validated nor resolved, so the
//! report runs on a machine that holds none of the gateway's secrets.
//!
//! Times are UTC. `--since` and `--until` take a duration back from now (`7d`, `24h`), a
//! date (`2026-12-01`: its midnight) or an RFC 3339 time; the window includes `--since`
//! and excludes `--until`.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::config::StoreConfig;
use crate::store::{self, GroupBy, StoreError, UsageQuery, UsageRow};

/// `portcullis usage` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct UsageArgs {
    /// Configuration file (TOML); only `[store] url` is read.
    #[arg(long, short, default_value = "portcullis.toml")]
    pub config: PathBuf,
    /// Only this client's requests (a [[clients]] id).
    #[arg(long)]
    pub client: Option<String>,
    /// Only requests to this deployment.
    #[arg(long)]
    pub deployment: Option<String>,
    /// Start (inclusive): a duration back from now (7d, 24h), a date (2026-12-01, UTC) or
    /// an RFC 3339 time.
    #[arg(long, default_value = "7d")]
    pub since: String,
    /// End (exclusive), in the same forms as --since [default: now].
    #[arg(long)]
    pub until: Option<String>,
    /// One row per UTC day or hour, or per client, deployment or subject.
    #[arg(long, value_enum, default_value_t = By::Day)]
    pub by: By,
    /// table (aligned, with a total row), json (an array of objects) or csv.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
}

/// `--by`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum By {
    Day,
    Hour,
    Client,
    Deployment,
    Subject,
}

impl From<By> for GroupBy {
    fn from(by: By) -> Self {
        match by {
            By::Day => GroupBy::Day,
            By::Hour => GroupBy::Hour,
            By::Client => GroupBy::Client,
            By::Deployment => GroupBy::Deployment,
            By::Subject => GroupBy::Subject,
        }
    }
}

/// `--format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Json,
    Csv,
}

/// Why a report could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// The configuration file, or its `[store] url`, cannot be used.
    #[error("{path}: {reason}")]
    Config { path: String, reason: String },
    /// `--since` or `--until` is not a time.
    #[error("--{flag} '{value}': {reason}")]
    Time {
        flag: &'static str,
        value: String,
        reason: String,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Unix milliseconds now.
pub fn now_ms() -> i64 {
    let since_epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(since_epoch.as_millis()).unwrap_or(i64::MAX)
}

/// Run the report `args` asks for at `now_ms`; returns what to print.
pub async fn run(args: &UsageArgs, now_ms: i64) -> Result<String, ReportError> {
    let query = query(args, now_ms)?;
    let (url, base_dir) = store_url(&args.config)?;
    // A report never creates a database: a missing file is a wrong path, not "no usage".
    if let Some(file) = store::sqlite_file(&url, &base_dir)? {
        if !file.exists() {
            return Err(ReportError::Config {
                path: args.config.display().to_string(),
                reason: format!(
                    "store.url '{url}': no database at {} (wrong configuration, or no \
                     gateway has used it yet)",
                    file.display()
                ),
            });
        }
    }
    let store = store::open_store(&url, &base_dir).await?;
    let rows = store.usage_report(&query).await;
    store.close().await;
    Ok(render(args.format, query.by, &rows?))
}

/// The store query `args` describe.
pub fn query(args: &UsageArgs, now_ms: i64) -> Result<UsageQuery, ReportError> {
    let since_ms = parse_time("since", &args.since, now_ms)?;
    let until_ms = match &args.until {
        Some(u) => parse_time("until", u, now_ms)?,
        None => now_ms,
    };
    if since_ms >= until_ms {
        return Err(ReportError::Time {
            flag: "since",
            value: args.since.clone(),
            reason: "must be before --until (default: now)".into(),
        });
    }
    Ok(UsageQuery {
        client: args.client.clone(),
        deployment: args.deployment.clone(),
        since_ms,
        until_ms,
        by: args.by.into(),
    })
}

/// A `--since`/`--until` value as unix milliseconds.
pub fn parse_time(flag: &'static str, value: &str, now_ms: i64) -> Result<i64, ReportError> {
    let bad = |reason: &str| ReportError::Time {
        flag,
        value: value.escape_default().to_string(),
        reason: reason.to_owned(),
    };
    if let Ok(d) = humantime::parse_duration(value) {
        return i64::try_from(d.as_millis())
            .ok()
            .and_then(|ms| now_ms.checked_sub(ms))
            .ok_or_else(|| bad("too long ago"));
    }
    if let Some(date) = parse_date(value) {
        return Ok(date.midnight().assume_utc().unix_timestamp() * 1000);
    }
    match time::OffsetDateTime::parse(value, &time::format_description::well_known::Rfc3339) {
        Ok(t) => i64::try_from(t.unix_timestamp_nanos().div_euclid(1_000_000))
            .map_err(|_| bad("out of range")),
        Err(_) => Err(bad(
            "expected a duration back from now (7d, 24h), a date (2026-12-01) or an RFC 3339 \
             time (2026-12-01T08:00:00Z)",
        )),
    }
}

/// `YYYY-MM-DD`.
fn parse_date(value: &str) -> Option<time::Date> {
    let mut parts = value.split('-');
    let (y, m, d) = (parts.next()?, parts.next()?, parts.next()?);
    let digits = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_digit());
    if parts.next().is_some() || !digits(y, 4) || !digits(m, 2) || !digits(d, 2) {
        return None;
    }
    let month = time::Month::try_from(m.parse::<u8>().ok()?).ok()?;
    time::Date::from_calendar_date(y.parse().ok()?, month, d.parse().ok()?).ok()
}

/// `[store] url` of the configuration at `path` (the default when absent, `${ENV}`
/// expanded), and the directory relative SQLite paths are resolved against.
pub fn store_url(path: &Path) -> Result<(String, PathBuf), ReportError> {
    let bad = |reason: String| ReportError::Config {
        path: path.display().to_string(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|e| bad(format!("cannot read file: {e}")))?;
    // The message and line only: the error's own rendering quotes the file, which may hold
    // secrets.
    let table: toml::Table = toml::from_str(&text).map_err(|e| {
        let line = e.span().map(|s| {
            text.as_bytes()[..s.start.min(text.len())]
                .iter()
                .filter(|&&b| b == b'\n')
                .count()
                + 1
        });
        match line {
            Some(l) => bad(format!("line {l}: {}", e.message())),
            None => bad(e.message().to_owned()),
        }
    })?;
    let raw = match table.get("store") {
        None => None,
        Some(toml::Value::Table(store)) => match store.get("url") {
            None => None,
            Some(toml::Value::String(url)) => Some(url.as_str()),
            Some(_) => return Err(bad("store.url: expected a string".into())),
        },
        Some(_) => return Err(bad("store: expected a table".into())),
    };
    let url = match raw {
        Some(raw) => crate::config::expand_env(raw).map_err(|e| bad(format!("store.url: {e}")))?,
        None => StoreConfig::default().url.0,
    };
    let base_dir = path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    Ok((url, base_dir))
}

/// The report in `format`, rows keyed by `by`.
pub fn render(format: Format, by: GroupBy, rows: &[UsageRow]) -> String {
    match format {
        Format::Table => table(by, rows),
        Format::Json => json(by, rows),
        Format::Csv => csv(by, rows),
    }
}

const FIELDS: [&str; 7] = [
    "requests",
    "prompt_tokens",
    "cached_tokens",
    "completion_tokens",
    "reasoning_tokens",
    "total_tokens",
    "cost_usd",
];

fn counts(r: &UsageRow) -> [i64; 6] {
    [
        r.requests,
        r.prompt_tokens,
        r.cached_tokens,
        r.completion_tokens,
        r.reasoning_tokens,
        r.total_tokens,
    ]
}

/// Aligned columns: the key left, numbers right, then a total row. Costs to 4 decimals;
/// control characters in keys escaped.
fn table(by: GroupBy, rows: &[UsageRow]) -> String {
    let header = [
        by.as_str().to_uppercase(),
        "REQUESTS".into(),
        "PROMPT".into(),
        "CACHED".into(),
        "COMPLETION".into(),
        "REASONING".into(),
        "TOTAL".into(),
        "COST_USD".into(),
    ];
    let line = |key: String, counts: [i64; 6], cost: f64| -> [String; 8] {
        let [a, b, c, d, e, f] = counts.map(|n| n.to_string());
        [key, a, b, c, d, e, f, format!("{cost:.4}")]
    };
    let mut total = [0i64; 6];
    let mut total_cost = 0.0;
    let mut lines: Vec<[String; 8]> = Vec::with_capacity(rows.len() + 2);
    lines.push(header);
    for r in rows {
        for (t, n) in total.iter_mut().zip(counts(r)) {
            *t = t.saturating_add(n);
        }
        total_cost += r.cost_usd;
        let key = r
            .key
            .as_deref()
            .map_or_else(|| "(none)".to_owned(), escape_controls);
        lines.push(line(key, counts(r), r.cost_usd));
    }
    lines.push(line("TOTAL".into(), total, total_cost));
    let mut widths = [0usize; 8];
    for l in &lines {
        for (w, cell) in widths.iter_mut().zip(l) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for l in &lines {
        let mut text = String::new();
        for (i, (cell, w)) in l.iter().zip(widths).enumerate() {
            if i == 0 {
                text.push_str(&format!("{cell:<w$}"));
            } else {
                text.push_str(&format!("  {cell:>w$}"));
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    }
    out
}

fn escape_controls(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// An array of objects, `{"<by>": key, "requests": ..., "cost_usd": ...}`; costs at full
/// precision, a missing key is `null`.
fn json(by: GroupBy, rows: &[UsageRow]) -> String {
    let list: Vec<Value> = rows
        .iter()
        .map(|r| {
            let mut o = Map::new();
            o.insert(
                by.as_str().into(),
                r.key.clone().map_or(Value::Null, Value::String),
            );
            for (name, n) in FIELDS.iter().zip(counts(r)) {
                o.insert((*name).into(), n.into());
            }
            o.insert("cost_usd".into(), r.cost_usd.into());
            Value::Object(o)
        })
        .collect();
    let mut out = serde_json::to_string_pretty(&list).unwrap_or_else(|_| "[]".into());
    out.push('\n');
    out
}

/// A header, then one line per row, fields quoted as RFC 4180 does; costs at full
/// precision (the shortest form that reads back the same), a missing key is empty.
fn csv(by: GroupBy, rows: &[UsageRow]) -> String {
    let mut out = format!("{},{}\n", by.as_str(), FIELDS.join(","));
    for r in rows {
        out.push_str(&csv_field(r.key.as_deref().unwrap_or("")));
        for n in counts(r) {
            out.push(',');
            out.push_str(&n.to_string());
        }
        out.push(',');
        out.push_str(&r.cost_usd.to_string());
        out.push('\n');
    }
    out
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\r', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_owned()
    }
}

#[cfg(test)]
mod tests;
