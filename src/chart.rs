//! Server-rendered SVG charts for the dashboard: usage over time as stacked bars
//! ([`stacked_bars`]) and a ranking as horizontal bars ([`horizontal_bars`], e.g. refusals
//! by reason). The dashboard loads no chart library: it embeds these documents.
//!
//! Each chart is one complete `<svg>` element, 960 units wide, that scales to its container
//! (`width="100%"`). It is self-contained and inert: no script, no `<foreignObject>`, no
//! link or `href` to anything, and no `style` attribute (the dashboard's
//! Content-Security-Policy forbids inline styles), only presentation attributes.
//!
//! Series names are client ids and deployment names, which operators and clients choose:
//! every text is escaped, its control and bidirectional-formatting characters replaced,
//! and a long one cut with an ellipsis. Values that are not finite, or negative, count as 0.
//! Times are UTC. The same input always gives the same bytes.

use std::fmt::Write as _;

/// The charts' width in SVG units (their `viewBox`); they scale to their container.
pub const WIDTH: f64 = 960.0;
/// The height of a [`stacked_bars`] chart.
pub const TIME_CHART_HEIGHT: f64 = 320.0;
/// The first line of an empty chart (the dashboard looks for it).
pub const EMPTY_MESSAGE: &str = "No usage in this time range";
/// The second line of an empty chart.
pub const EMPTY_HINT: &str = "Requests through the gateway appear here within a few seconds.";

/// Series drawn under their own name; more are summed into "other".
const NAMED_SERIES: usize = 7;
/// The Okabe–Ito palette without its black: told apart with the common colour-vision
/// deficiencies. A series keeps its colour by rank (largest first).
const PALETTE: [&str; NAMED_SERIES] = [
    "#0072b2", "#e69f00", "#009e73", "#d55e00", "#56b4e9", "#cc79a7", "#f0e442",
];
/// "other", the eighth colour.
const OTHER_COLOUR: &str = "#9ca3af";
/// Rows of a [`horizontal_bars`] chart; more are summed into a last "other" row.
const MAX_ROWS: usize = 20;
/// Values are drawn up to this (a billion billions); beyond, the axis would lose meaning.
const MAX_VALUE: f64 = 1e18;
/// X-axis labels at most.
const MAX_TIME_LABELS: usize = 8;
/// Up to this range, the x axis shows `HH:MM`; beyond, `MM-DD`.
const HOURS_UP_TO_MS: i64 = 2 * 86_400_000;

const FONT: &str = "system-ui, sans-serif";
const INK: &str = "#111827";
const TEXT: &str = "#374151";
const MUTED: &str = "#6b7280";
const GRID: &str = "#e5e7eb";
const AXIS: &str = "#9ca3af";

/// One stack of a [`TimeChart`]: a value per bucket.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// Shown in the legend and the tooltips (escaped, cut when long).
    pub name: String,
    /// Index-aligned with [`TimeChart::buckets_ms`]: missing values are 0, extra ones are
    /// ignored.
    pub values: Vec<f64>,
}

/// Series over time buckets, drawn by [`stacked_bars`].
#[derive(Debug, Clone, Copy)]
pub struct TimeChart<'a> {
    /// The chart's heading and accessible name.
    pub title: &'a str,
    pub unit: Unit,
    /// Each bucket's start, unix milliseconds (UTC), in order.
    pub buckets_ms: &'a [i64],
    /// Bucket length in milliseconds.
    pub bucket_ms: i64,
    pub series: &'a [Series],
}

/// What a chart's values are, and so how they read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// Requests, refusals...: `950`, `1.2k`, `3.4M`.
    Count,
    /// Tokens: as counts, and "tokens" in tooltips.
    Tokens,
    /// US dollars: `$0.12`, `$12.34`, `$1.2k`.
    Usd,
}

impl Unit {
    /// A value in a few characters, for legends and bar ends: `1.2k`, `3.4M`, `$0.12`,
    /// `$1.2k`.
    pub fn compact(self, v: f64) -> String {
        let v = clean(v);
        match self {
            Unit::Count | Unit::Tokens => {
                if v.round() >= 1_000.0 {
                    suffixed(v)
                } else {
                    plain(v)
                }
            }
            Unit::Usd => {
                if v == 0.0 {
                    "$0".to_owned()
                } else if v < 0.01 {
                    let s = format!("{v:.4}");
                    if s == "0.0000" {
                        "<$0.0001".to_owned()
                    } else {
                        format!("${}", trim_zeros(&s))
                    }
                } else if (v * 100.0).round() < 100_000.0 {
                    format!("${v:.2}")
                } else {
                    format!("${}", suffixed(v))
                }
            }
        }
    }

    /// A value in full, for tooltips: `1,234`, `1,234 tokens`, `$1,234.56`, `$0.0042`.
    pub fn exact(self, v: f64) -> String {
        let v = clean(v);
        match self {
            Unit::Count => grouped(v, false),
            Unit::Tokens => format!("{} tokens", grouped(v, false)),
            Unit::Usd if v == 0.0 => "$0".to_owned(),
            Unit::Usd if v < 1.0 => format!("${v:.4}"),
            Unit::Usd => format!("${}", grouped(v, true)),
        }
    }

    /// An axis label for `v`, a multiple of `step`: as many decimals as the step needs.
    fn tick(self, v: f64, step: f64) -> String {
        match self {
            Unit::Count | Unit::Tokens => self.compact(v),
            Unit::Usd if v == 0.0 => "$0".to_owned(),
            Unit::Usd if v >= 1_000.0 => format!("${}", suffixed(v)),
            Unit::Usd if step >= 1.0 => format!("${v:.0}"),
            Unit::Usd => {
                let decimals = (-step.log10()).ceil().clamp(2.0, 9.0) as usize;
                format!("${v:.decimals$}")
            }
        }
    }

    /// Whether values are whole (no fractional ticks).
    fn whole(self) -> bool {
        matches!(self, Unit::Count | Unit::Tokens)
    }
}

/// Usage over time: a bar per bucket, its series stacked (largest at the bottom), with a
/// legend of totals, a y axis of 4-6 round ticks, UTC time labels, and a tooltip per
/// segment. With more than seven series (that have any usage), the seven largest keep
/// their names and the rest are summed into "other". With no bucket, or nothing but
/// zeros, the chart says [`EMPTY_MESSAGE`] and [`EMPTY_HINT`].
pub fn stacked_bars(chart: &TimeChart<'_>) -> String {
    let n = chart.buckets_ms.len();
    let stacks = stacks(chart.series, n);
    let mut svg = Svg::open(TIME_CHART_HEIGHT, chart.title);
    let left = 64.0;
    let right = WIDTH - 16.0;
    let bottom = TIME_CHART_HEIGHT - 28.0;
    let slot = (right - left) / n.max(1) as f64;
    let time = TimeAxis::new(chart.buckets_ms, chart.bucket_ms);

    if stacks.is_empty() {
        let top = 64.0;
        if n > 0 {
            svg.line(left, bottom, right, bottom, AXIS);
            time_labels(&mut svg, &time, left, slot, bottom);
        }
        svg.empty((top + bottom) / 2.0);
        return svg.close();
    }

    // Legend: one entry per stack, wrapped onto as many rows as it needs.
    let mut x = 16.0;
    let mut y = 46.0;
    for s in &stacks {
        let label = s.label();
        let total = chart.unit.compact(s.total);
        let width = 16.0 + text_width(&label, 12.0) + 6.0 + text_width(&total, 12.0) + 20.0;
        if x > 16.0 && x + width > WIDTH - 16.0 {
            x = 16.0;
            y += 18.0;
        }
        svg.swatch(x, y - 9.0, s.colour);
        let _ = write!(
            svg.out,
            r#"<text x="{}" y="{}" font-size="12" fill="{TEXT}">{}"#,
            num(x + 16.0),
            num(y),
            escape(&label),
        );
        let _ = write!(
            svg.out,
            r#"<tspan dx="6" fill="{MUTED}">{}</tspan></text>"#,
            escape(&total),
        );
        x += width;
    }
    let top = y + 18.0;

    // Y axis: round ticks from 0 to at least the tallest bar.
    let tallest = (0..n)
        .map(|i| stacks.iter().map(|s| s.values[i]).sum::<f64>())
        .fold(0.0, f64::max);
    let ticks = Ticks::new(tallest, chart.unit.whole());
    let scale = (bottom - top) / ticks.top();
    for (i, v) in ticks.values().enumerate() {
        let y = bottom - v * scale;
        svg.line(left, y, right, y, if i == 0 { AXIS } else { GRID });
        svg.text(
            left - 8.0,
            y + 4.0,
            11.0,
            MUTED,
            "end",
            &chart.unit.tick(v, ticks.step),
        );
    }

    // Bars: a gap between them while they are wide enough to have one; without, edges on
    // whole pixels, or anti-aliasing shows seams between neighbours.
    let gap = if slot >= 4.0 { slot * 0.2 } else { 0.0 };
    svg.out.push_str(if gap > 0.0 {
        "<g class=\"bars\">"
    } else {
        "<g class=\"bars\" shape-rendering=\"crispEdges\">"
    });
    for (i, &start) in chart.buckets_ms.iter().enumerate() {
        let x = left + i as f64 * slot + gap / 2.0;
        let mut base = bottom;
        for s in &stacks {
            let v = s.values[i];
            if v <= 0.0 {
                continue;
            }
            let h = v * scale;
            let tip = format!(
                "{} · {} · {}",
                s.tip_name(),
                time.full(start),
                chart.unit.exact(v)
            );
            svg.bar(x, base - h, slot - gap, h, s.colour, &tip);
            base -= h;
        }
    }
    svg.out.push_str("</g>");
    time_labels(&mut svg, &time, left, slot, bottom);
    svg.close()
}

/// A ranking: one labelled bar per item, largest first (ties keep their order), its value
/// at its end, on an x axis of round ticks. Past twenty items, the smallest are summed into
/// a last "other" row. The height grows with the rows; with no item, or nothing but zeros,
/// the chart says [`EMPTY_MESSAGE`] and [`EMPTY_HINT`].
pub fn horizontal_bars(title: &str, unit: Unit, items: &[(String, f64)]) -> String {
    let mut rows: Vec<(String, f64)> = items
        .iter()
        .map(|(name, v)| (name.clone(), clean(*v)))
        .filter(|(_, v)| *v > 0.0)
        .collect();
    rows.sort_by(|a, b| b.1.total_cmp(&a.1));
    if rows.len() > MAX_ROWS {
        let rest = rows.split_off(MAX_ROWS - 1);
        let sum = rest.iter().map(|(_, v)| v).sum();
        rows.push((format!("other ({})", rest.len()), sum));
    }

    let top = 40.0;
    let row_h = 26.0;
    if rows.is_empty() {
        let height = 160.0;
        let mut svg = Svg::open(height, title);
        svg.empty((top + height) / 2.0 - 8.0);
        return svg.close();
    }
    let rows_bottom = top + rows.len() as f64 * row_h;
    let height = rows_bottom + 32.0;
    let mut svg = Svg::open(height, title);
    let left = 216.0;
    let right = WIDTH - 72.0;
    let largest = rows.iter().map(|(_, v)| *v).fold(0.0, f64::max);
    let ticks = Ticks::new(largest, unit.whole());
    let scale = (right - left) / ticks.top();
    for (i, v) in ticks.values().enumerate() {
        let x = left + v * scale;
        svg.line(
            x,
            top - 4.0,
            x,
            rows_bottom,
            if i == 0 { AXIS } else { GRID },
        );
        svg.text(
            x,
            rows_bottom + 16.0,
            11.0,
            MUTED,
            "middle",
            &unit.tick(v, ticks.step),
        );
    }
    for (i, (name, v)) in rows.iter().enumerate() {
        let y = top + i as f64 * row_h + 17.0;
        svg.text(left - 8.0, y, 12.0, TEXT, "end", &clip(name, 28));
        let end = left + v * scale + 6.0;
        svg.text(end, y, 11.0, TEXT, "start", &unit.compact(*v));
    }
    svg.out.push_str("<g class=\"bars\">");
    for (i, (name, v)) in rows.iter().enumerate() {
        let y = top + i as f64 * row_h + 5.0;
        let tip = format!("{} · {}", clip(name, 80), unit.exact(*v));
        svg.bar(left, y, v * scale, 16.0, PALETTE[0], &tip);
    }
    svg.out.push_str("</g>");
    svg.close()
}

/// One stack of bars as drawn: a series, or the sum of the smallest ones.
#[derive(Debug)]
struct Stack {
    name: String,
    /// How many series "other" sums; 0 for a named series.
    others: usize,
    colour: &'static str,
    /// One per bucket, each finite and in `0..=MAX_VALUE`.
    values: Vec<f64>,
    total: f64,
}

impl Stack {
    /// The legend's name: cut to fit, "other (3)" for the sum of three series.
    fn label(&self) -> String {
        if self.others > 0 {
            format!("{} ({})", self.name, self.others)
        } else {
            clip(&self.name, 24)
        }
    }

    /// The tooltip's name: longer, "other (3 series)".
    fn tip_name(&self) -> String {
        if self.others > 0 {
            format!("{} ({} series)", self.name, self.others)
        } else {
            clip(&self.name, 80)
        }
    }
}

/// The stacks to draw for `series` over `n` buckets, largest total first: series without
/// any usage are left out, and past [`NAMED_SERIES`] the rest are summed into "other".
fn stacks(series: &[Series], n: usize) -> Vec<Stack> {
    let mut all: Vec<(&Series, Vec<f64>, f64)> = series
        .iter()
        .map(|s| {
            let values: Vec<f64> = (0..n)
                .map(|i| s.values.get(i).copied().map_or(0.0, clean))
                .collect();
            let total = values.iter().sum();
            (s, values, total)
        })
        .filter(|(_, _, total)| *total > 0.0)
        .collect();
    // Stable: equal totals keep the caller's order.
    all.sort_by(|a, b| b.2.total_cmp(&a.2));
    let rest = if all.len() > NAMED_SERIES {
        all.split_off(NAMED_SERIES)
    } else {
        Vec::new()
    };
    let mut stacks: Vec<Stack> = all
        .into_iter()
        .zip(PALETTE)
        .map(|((s, values, total), colour)| Stack {
            name: s.name.clone(),
            others: 0,
            colour,
            values,
            total,
        })
        .collect();
    if !rest.is_empty() {
        let values: Vec<f64> = (0..n)
            .map(|i| {
                rest.iter()
                    .map(|(_, v, _)| v[i])
                    .sum::<f64>()
                    .min(MAX_VALUE)
            })
            .collect();
        stacks.push(Stack {
            name: "other".to_owned(),
            others: rest.len(),
            colour: OTHER_COLOUR,
            total: values.iter().sum(),
            values,
        });
    }
    stacks
}

/// The x axis's labels under the bars: evenly spaced, at most [`MAX_TIME_LABELS`]; and
/// "Times in UTC" in the top right corner.
fn time_labels(svg: &mut Svg, time: &TimeAxis<'_>, left: f64, slot: f64, bottom: f64) {
    let n = time.buckets.len();
    if n == 0 {
        return;
    }
    let every = n.div_ceil(MAX_TIME_LABELS);
    for (i, &start) in time.buckets.iter().enumerate().step_by(every) {
        let x = left + (i as f64 + 0.5) * slot;
        svg.text(x, bottom + 18.0, 11.0, MUTED, "middle", &time.short(start));
    }
    svg.text(WIDTH - 16.0, 22.0, 11.0, MUTED, "end", "Times in UTC");
}

/// How a chart's bucket times read.
struct TimeAxis<'a> {
    buckets: &'a [i64],
    /// `HH:MM` labels, else `MM-DD`.
    hours: bool,
}

impl<'a> TimeAxis<'a> {
    fn new(buckets: &'a [i64], bucket_ms: i64) -> Self {
        let span = match (buckets.first(), buckets.last()) {
            (Some(first), Some(last)) => {
                last.saturating_sub(*first).saturating_add(bucket_ms.max(0))
            }
            _ => 0,
        };
        TimeAxis {
            buckets,
            hours: span <= HOURS_UP_TO_MS,
        }
    }

    /// An axis label: `13:00` or `12-01`.
    fn short(&self, ms: i64) -> String {
        match utc(ms) {
            Some(t) if self.hours => format!("{:02}:{:02}", t.hour(), t.minute()),
            Some(t) => format!("{:02}-{:02}", u8::from(t.month()), t.day()),
            None => "?".to_owned(),
        }
    }

    /// A tooltip's time: `2026-12-01 13:00 UTC`.
    fn full(&self, ms: i64) -> String {
        match utc(ms) {
            Some(t) => format!(
                "{:04}-{:02}-{:02} {:02}:{:02} UTC",
                t.year(),
                u8::from(t.month()),
                t.day(),
                t.hour(),
                t.minute()
            ),
            None => format!("{ms} ms"),
        }
    }
}

fn utc(ms: i64) -> Option<time::OffsetDateTime> {
    time::OffsetDateTime::from_unix_timestamp(ms.div_euclid(1000)).ok()
}

/// An axis from 0 by round steps (1, 2 or 5 × 10ⁿ): 4 to 6 ticks, the last at or above
/// the largest value.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Ticks {
    step: f64,
    /// Steps above 0 (3 to 5).
    steps: u32,
}

impl Ticks {
    /// Ticks for values up to `max`; `whole` keeps steps at 1 or more.
    fn new(max: f64, whole: bool) -> Self {
        let max = if max.is_finite() { max.max(1e-9) } else { 1.0 };
        // The smallest round step that reaches `max` in at most 5 steps takes at least 3
        // (the next smaller one, at most 2.5 times smaller, needed more than 5).
        let mut exp = (max / 5.0).log10().floor() as i32 - 1;
        loop {
            for m in [1.0, 2.0, 5.0] {
                let step = m * 10f64.powi(exp);
                if whole && step < 1.0 {
                    continue;
                }
                // A hair of tolerance: 0.3 / 0.1 is 2.9999999999999996.
                let steps = (max / step - 1e-9).ceil().max(1.0);
                if steps <= 5.0 {
                    return Ticks {
                        step,
                        // Only a whole axis under 3 can have fewer: 0, 1, 2, 3 for a 1.
                        steps: (steps as u32).max(3),
                    };
                }
            }
            exp += 1;
        }
    }

    /// The axis's end.
    fn top(self) -> f64 {
        self.step * f64::from(self.steps)
    }

    /// Every tick from 0.
    fn values(self) -> impl Iterator<Item = f64> {
        (0..=self.steps).map(move |i| self.step * f64::from(i))
    }
}

/// An SVG document being written.
struct Svg {
    out: String,
}

impl Svg {
    /// `<svg ...>` of this height, named `title` for assistive technology and as a heading.
    fn open(height: f64, title: &str) -> Self {
        let title = escape(&clip(title, 80));
        let mut out = String::with_capacity(8 * 1024);
        let _ = write!(
            out,
            r#"<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {} {}" width="100%""#,
            num(WIDTH),
            num(height),
        );
        let _ = write!(
            out,
            r#" role="img" aria-label="{title}" font-family="{FONT}"><title>{title}</title>"#
        );
        let _ = write!(
            out,
            r#"<text x="16" y="22" font-size="15" font-weight="600" fill="{INK}">{title}</text>"#
        );
        Svg { out }
    }

    fn close(mut self) -> String {
        self.out.push_str("</svg>");
        self.out
    }

    /// Text at (`x`, `y`) (its baseline), anchored `start`, `middle` or `end`.
    fn text(&mut self, x: f64, y: f64, size: f64, fill: &str, anchor: &str, content: &str) {
        let _ = write!(
            self.out,
            r#"<text x="{}" y="{}" font-size="{}" fill="{fill}" text-anchor="{anchor}">{}</text>"#,
            num(x),
            num(y),
            num(size),
            escape(content),
        );
    }

    fn line(&mut self, x1: f64, y1: f64, x2: f64, y2: f64, stroke: &str) {
        let _ = write!(
            self.out,
            r#"<line x1="{}" y1="{}" x2="{}" y2="{}" stroke="{stroke}" stroke-width="1""#,
            num(x1),
            num(y1),
            num(x2),
            num(y2),
        );
        self.out.push_str(r#" shape-rendering="crispEdges"/>"#);
    }

    /// A bar (or a segment of one) with its tooltip.
    fn bar(&mut self, x: f64, y: f64, w: f64, h: f64, fill: &str, tip: &str) {
        let _ = write!(
            self.out,
            r#"<rect x="{}" y="{}" width="{}" height="{}" fill="{fill}"><title>{}</title></rect>"#,
            num(x),
            num(y),
            num(w),
            num(h),
            escape(tip),
        );
    }

    /// A legend's colour square.
    fn swatch(&mut self, x: f64, y: f64, fill: &str) {
        let _ = write!(
            self.out,
            r#"<rect x="{}" y="{}" width="10" height="10" rx="2" fill="{fill}"/>"#,
            num(x),
            num(y),
        );
    }

    /// The empty state, centred on `y`.
    fn empty(&mut self, y: f64) {
        self.text(WIDTH / 2.0, y - 4.0, 15.0, TEXT, "middle", EMPTY_MESSAGE);
        self.text(WIDTH / 2.0, y + 18.0, 12.0, MUTED, "middle", EMPTY_HINT);
    }
}

/// `v` as a drawable value: not finite or negative is 0, and at most [`MAX_VALUE`].
fn clean(v: f64) -> f64 {
    if v.is_finite() && v > 0.0 {
        v.min(MAX_VALUE)
    } else {
        0.0
    }
}

/// A coordinate: at most two decimals, no trailing zeros (`12.5`, `300`).
fn num(v: f64) -> String {
    let s = format!("{v:.2}");
    match trim_zeros(&s) {
        "-0" => "0".to_owned(),
        t => t.to_owned(),
    }
}

/// `1.50` → `1.5`, `2.00` → `2`; text without a `.` unchanged.
fn trim_zeros(s: &str) -> &str {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.')
    } else {
        s
    }
}

/// A value under 1,000 without a suffix: whole, or with the decimals it needs.
fn plain(v: f64) -> String {
    if v.fract() == 0.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        trim_zeros(&format!("{v:.1}")).to_owned()
    } else {
        trim_zeros(&format!("{v:.2}")).to_owned()
    }
}

/// A value of 1,000 or more with one decimal and a suffix: `1.2k`, `3.4M`, `5B`, `6T`.
fn suffixed(v: f64) -> String {
    let units = [(1e3, "k"), (1e6, "M"), (1e9, "B"), (1e12, "T")];
    for (i, (div, suffix)) in units.iter().enumerate() {
        let scaled = (v / div * 10.0).round() / 10.0;
        if scaled < 1_000.0 || i == units.len() - 1 {
            return format!("{}{suffix}", trim_zeros(&format!("{scaled:.1}")));
        }
    }
    plain(v)
}

/// `v` (not negative) with thousands separators and its hundredths: `1,234,567` and
/// `2.5`, or with `cents` always two decimals, `1,234.50`.
fn grouped(v: f64, cents: bool) -> String {
    let hundredths = (v * 100.0).round();
    let whole = (hundredths / 100.0).trunc();
    let fraction = hundredths - whole * 100.0;
    let digits = format!("{whole:.0}");
    let mut out = String::with_capacity(digits.len() + digits.len() / 3 + 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if cents {
        let _ = write!(out, ".{fraction:02.0}");
    } else if fraction > 0.0 {
        let _ = write!(out, ".{}", format!("{fraction:02.0}").trim_end_matches('0'));
    }
    out
}

/// `s` cut to `max` characters, the last of them an ellipsis.
fn clip(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_owned()
    } else {
        let mut out: String = s.chars().take(max.saturating_sub(1)).collect();
        out.push('…');
        out
    }
}

/// `s` escaped for XML text and attribute values. Control characters (which XML 1.0
/// forbids, even escaped) and bidirectional-formatting ones (which could reorder the text
/// around them) become U+FFFD.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{fffe}' | '\u{ffff}' => {
                out.push('\u{fffd}')
            }
            c if c.is_control() => out.push('\u{fffd}'),
            c => out.push(c),
        }
    }
    out
}

/// About how wide `s` is at `size` in a system sans-serif font (for the legend's layout).
fn text_width(s: &str, size: f64) -> f64 {
    s.chars().count() as f64 * size * 0.56
}

#[cfg(test)]
mod tests;
