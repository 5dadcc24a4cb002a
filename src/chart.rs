//! Charts as SVG documents, rendered by the gateway for the dashboard (and for anyone who
//! wants the picture: `GET /admin/usage/chart.svg`).
//!
//! A leaf: data in, a string out. The output has no script, no style attribute and no
//! reference to anything outside itself (the dashboard's Content-Security-Policy allows
//! none), every text is XML-escaped (series names are client ids and deployment names),
//! and the same input gives the same bytes.

use std::fmt::Write as _;

/// What the values count, for axis labels and tooltips.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    Count,
    Tokens,
    Usd,
}

/// One named series; `values` are index-aligned with the chart's buckets.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub name: String,
    pub values: Vec<f64>,
}

/// A stacked bar chart over time.
#[derive(Debug, Clone)]
pub struct TimeChart<'a> {
    pub title: &'a str,
    pub unit: Unit,
    /// Bucket starts, unix milliseconds (UTC).
    pub buckets_ms: &'a [i64],
    pub bucket_ms: i64,
    pub series: &'a [Series],
}

/// Colour-blind-friendly palette (Okabe–Ito, reordered); `OTHER` for the rest.
const PALETTE: [&str; 7] = [
    "#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442",
];
const OTHER: &str = "#999999";
const WIDTH: f64 = 960.0;
const HEIGHT: f64 = 320.0;
const FONT: &str = "system-ui, -apple-system, Segoe UI, Roboto, sans-serif";
const EMPTY_TITLE: &str = "No usage in this time range";
const EMPTY_HINT: &str = "Requests through the gateway appear here within a few seconds.";

/// `&`, `<`, `>`, `"`, `'` escaped; control characters dropped; at most `max` characters
/// (an ellipsis marks a cut).
fn text(s: &str, max: usize) -> String {
    let mut out = String::with_capacity(s.len());
    let count = s.chars().filter(|c| !c.is_control()).count();
    for (i, c) in s.chars().filter(|c| !c.is_control()).enumerate() {
        if i + 1 == max && count > max {
            out.push('…');
            break;
        }
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn finite(v: f64) -> f64 {
    if v.is_finite() && v > 0.0 {
        v
    } else {
        0.0
    }
}

/// A "nice" step (1, 2 or 5 × 10ⁿ) giving about `ticks` intervals up to `max`.
pub fn nice_step(max: f64, ticks: u32) -> f64 {
    if max <= 0.0 || !max.is_finite() {
        return 1.0;
    }
    let raw = max / f64::from(ticks.max(1));
    let mag = 10f64.powf(raw.log10().floor());
    let n = raw / mag;
    let f = if n <= 1.0 {
        1.0
    } else if n <= 2.0 {
        2.0
    } else if n <= 5.0 {
        5.0
    } else {
        10.0
    };
    f * mag
}

/// `1.2k`, `3.4M`, `$0.12`, `$1.2k`.
pub fn format_value(v: f64, unit: Unit) -> String {
    let v = finite(v);
    let short = |v: f64| {
        let (d, s) = if v >= 1e9 {
            (1e9, "G")
        } else if v >= 1e6 {
            (1e6, "M")
        } else if v >= 1e3 {
            (1e3, "k")
        } else {
            (1.0, "")
        };
        let x = v / d;
        let t = if s.is_empty() && x.fract() != 0.0 {
            format!("{x:.2}")
        } else if x < 10.0 && x.fract() != 0.0 {
            format!("{x:.1}")
        } else {
            format!("{x:.0}")
        };
        let t = if t.contains('.') {
            t.trim_end_matches('0').trim_end_matches('.').to_owned()
        } else {
            t
        };
        format!("{t}{s}")
    };
    match unit {
        Unit::Usd if v > 0.0 && v < 1.0 => format!("${v:.2}"),
        Unit::Usd => format!("${}", short(v)),
        Unit::Count | Unit::Tokens => short(v),
    }
}

/// A bucket start as `HH:MM` (short ranges) or `MM-DD` (UTC).
fn time_label(ms: i64, long: bool) -> String {
    let Ok(t) = time::OffsetDateTime::from_unix_timestamp(ms.div_euclid(1000)) else {
        return String::new();
    };
    if long {
        format!("{:02}-{:02}", u8::from(t.month()), t.day())
    } else {
        format!("{:02}:{:02}", t.hour(), t.minute())
    }
}

fn full_time(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(ms.div_euclid(1000))
        .map(|t| {
            format!(
                "{}-{:02}-{:02} {:02}:{:02} UTC",
                t.year(),
                u8::from(t.month()),
                t.day(),
                t.hour(),
                t.minute()
            )
        })
        .unwrap_or_default()
}

fn open(out: &mut String, title: &str, height: f64) {
    let t = text(title, 120);
    let _ = write!(
        out,
        r##"<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {height}" width="100%" role="img" aria-label="{t}" font-family="{FONT}" font-size="12"><title>{t}</title><rect x="0" y="0" width="{WIDTH}" height="{height}" fill="#ffffff"/>"##
    );
}

fn empty(out: &mut String, height: f64) {
    let y = height / 2.0;
    let _ = write!(
        out,
        r##"<text x="{x}" y="{y1}" text-anchor="middle" font-size="16" font-weight="600" fill="#374151">{EMPTY_TITLE}</text><text x="{x}" y="{y2}" text-anchor="middle" font-size="13" fill="#6b7280">{EMPTY_HINT}</text></svg>"##,
        x = WIDTH / 2.0,
        y1 = y - 6.0,
        y2 = y + 16.0,
    );
}

/// The 7 largest series by total keep their names; the rest become one "other".
fn top_series(series: &[Series], n: usize) -> Vec<(String, Vec<f64>, &'static str)> {
    let mut order: Vec<(usize, f64)> = series
        .iter()
        .enumerate()
        .map(|(i, s)| (i, s.values.iter().copied().map(finite).sum()))
        .collect();
    order.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let keep = if order.len() > PALETTE.len() {
        PALETTE.len() - 1
    } else {
        order.len()
    };
    let mut out: Vec<(String, Vec<f64>, &'static str)> = order[..keep]
        .iter()
        .enumerate()
        .map(|(c, (i, _))| {
            let values = (0..n)
                .map(|b| finite(series[*i].values.get(b).copied().unwrap_or(0.0)))
                .collect();
            (series[*i].name.clone(), values, PALETTE[c])
        })
        .collect();
    if order.len() > keep {
        let mut rest = vec![0.0; n];
        for (i, _) in &order[keep..] {
            for (b, r) in rest.iter_mut().enumerate() {
                *r += finite(series[*i].values.get(b).copied().unwrap_or(0.0));
            }
        }
        out.push(("other".into(), rest, OTHER));
    }
    out
}

/// A stacked bar per bucket, one colour per series, legend with totals, tooltips.
pub fn stacked_bars(chart: &TimeChart<'_>) -> String {
    let mut out = String::with_capacity(8192);
    open(&mut out, chart.title, HEIGHT);
    let n = chart.buckets_ms.len();
    let series = top_series(chart.series, n);
    let totals: Vec<f64> = (0..n)
        .map(|b| series.iter().map(|s| s.1[b]).sum())
        .collect();
    let max = totals.iter().copied().fold(0.0, f64::max);
    if n == 0 || max <= 0.0 {
        empty(&mut out, HEIGHT);
        return out;
    }
    // Legend.
    let mut x = 56.0;
    for (name, values, colour) in &series {
        let total: f64 = values.iter().sum();
        let label = format!("{} · {}", text(name, 28), format_value(total, chart.unit));
        let _ = write!(
            out,
            r##"<rect x="{x}" y="12" width="10" height="10" rx="2" fill="{colour}"/><text x="{tx}" y="21" fill="#374151">{label}</text>"##,
            tx = x + 14.0
        );
        x += 14.0 + 7.0 * label.chars().count() as f64 + 18.0;
    }
    // Axes and gridlines.
    let (left, right, top, bottom) = (56.0, WIDTH - 16.0, 40.0, HEIGHT - 28.0);
    let step = nice_step(max, 5);
    let y_max = (max / step).ceil() * step;
    let y_of = |v: f64| bottom - (v / y_max) * (bottom - top);
    let mut tick = 0.0;
    while tick <= y_max + step / 2.0 {
        let y = y_of(tick);
        let _ = write!(
            out,
            r##"<line x1="{left}" y1="{y:.1}" x2="{right}" y2="{y:.1}" stroke="#e5e7eb" stroke-width="1"/><text x="{lx}" y="{ty:.1}" text-anchor="end" fill="#6b7280">{label}</text>"##,
            lx = left - 6.0,
            ty = y + 4.0,
            label = format_value(tick, chart.unit),
        );
        tick += step;
    }
    // Bars.
    let slot = (right - left) / n as f64;
    let bar = (slot * 0.72).max(1.0);
    let long = chart.bucket_ms.saturating_mul(n as i64) > 2 * 86_400_000;
    for b in 0..n {
        let x = left + slot * b as f64 + (slot - bar) / 2.0;
        let mut base = 0.0;
        for (name, values, colour) in &series {
            let v = values[b];
            if v <= 0.0 {
                continue;
            }
            let (y0, y1) = (y_of(base), y_of(base + v));
            base += v;
            let _ = write!(
                out,
                r#"<rect class="bar" x="{x:.1}" y="{y1:.1}" width="{bar:.1}" height="{h:.1}" fill="{colour}"><title>{name} · {when} · {value}</title></rect>"#,
                h = (y0 - y1).max(0.5),
                name = text(name, 64),
                when = full_time(chart.buckets_ms[b]),
                value = format_value(v, chart.unit),
            );
        }
    }
    // Time labels: at most 8, evenly spaced.
    let every = n.div_ceil(8).max(1);
    for b in (0..n).step_by(every) {
        let x = left + slot * b as f64 + slot / 2.0;
        let _ = write!(
            out,
            r##"<text x="{x:.1}" y="{y}" text-anchor="middle" fill="#6b7280">{label}</text>"##,
            y = HEIGHT - 10.0,
            label = time_label(chart.buckets_ms[b], long),
        );
    }
    let _ = write!(
        out,
        r##"<line x1="{left}" y1="{bottom}" x2="{right}" y2="{bottom}" stroke="#9ca3af" stroke-width="1"/></svg>"##
    );
    out
}

/// One horizontal bar per item, largest first as given (refusals by reason).
pub fn horizontal_bars(title: &str, unit: Unit, items: &[(String, f64)]) -> String {
    let row = 26.0;
    let height = (48.0 + row * items.len() as f64).max(120.0);
    let mut out = String::with_capacity(2048);
    open(&mut out, title, height);
    let max = items.iter().map(|(_, v)| finite(*v)).fold(0.0, f64::max);
    if max <= 0.0 {
        let y = height / 2.0;
        let _ = write!(
            out,
            r##"<text x="{x}" y="{y}" text-anchor="middle" font-size="15" font-weight="600" fill="#374151">Nothing refused or failed in this time range</text></svg>"##,
            x = WIDTH / 2.0
        );
        return out;
    }
    let _ = write!(
        out,
        r##"<text x="16" y="24" font-size="13" font-weight="600" fill="#374151">{}</text>"##,
        text(title, 120)
    );
    let (label_w, right) = (260.0, WIDTH - 90.0);
    for (i, (name, v)) in items.iter().enumerate() {
        let v = finite(*v);
        let y = 40.0 + row * i as f64;
        let w = ((right - label_w) * v / max).max(1.0);
        let colour = if name.starts_with("backend_error") || name.contains("(5") {
            "#D55E00"
        } else {
            "#0072B2"
        };
        let _ = write!(
            out,
            r##"<text x="{lx}" y="{ty:.1}" text-anchor="end" fill="#374151">{name}</text><rect class="bar" x="{label_w}" y="{y:.1}" width="{w:.1}" height="18" rx="3" fill="{colour}"><title>{name} · {value}</title></rect><text x="{vx:.1}" y="{ty:.1}" fill="#374151">{value}</text>"##,
            lx = label_w - 8.0,
            ty = y + 13.0,
            vx = label_w + w + 6.0,
            name = text(name, 40),
            value = format_value(v, unit),
        );
    }
    out.push_str("</svg>");
    out
}

#[cfg(test)]
mod tests;
