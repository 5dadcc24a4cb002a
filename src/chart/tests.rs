//! Chart unit tests: every document is parsed with a real XML parser (roxmltree), checked
//! to be inert (no script, style, link or foreign content), and measured: bar heights,
//! stacking, the "other" group, axes and labels.

use super::*;

/// 2026-12-01T00:00:00Z.
const DEC_1: i64 = 1_796_083_200_000;
const HOUR: i64 = 3_600_000;

fn hours(n: usize) -> Vec<i64> {
    (0..n as i64).map(|i| DEC_1 + i * HOUR).collect()
}

fn series(name: &str, values: &[f64]) -> Series {
    Series {
        name: name.into(),
        values: values.to_vec(),
    }
}

fn chart<'a>(buckets: &'a [i64], series: &'a [Series]) -> TimeChart<'a> {
    TimeChart {
        title: "Tokens by deployment",
        unit: Unit::Tokens,
        buckets_ms: buckets,
        bucket_ms: HOUR,
        series,
    }
}

/// `svg` parsed, after checking it is one inert `<svg>` document of known elements.
fn parse(svg: &str) -> roxmltree::Document<'_> {
    let doc = roxmltree::Document::parse(svg).unwrap_or_else(|e| panic!("{e}: {svg}"));
    let root = doc.root_element();
    assert_eq!(root.tag_name().name(), "svg");
    assert_eq!(
        root.tag_name().namespace(),
        Some("http://www.w3.org/2000/svg")
    );
    assert_eq!(root.attribute("width"), Some("100%"));
    assert_eq!(root.attribute("role"), Some("img"));
    assert_eq!(root.attribute("font-family"), Some("system-ui, sans-serif"));
    for node in doc.descendants().filter(|n| n.is_element()) {
        let name = node.tag_name().name();
        assert!(
            ["svg", "title", "text", "tspan", "rect", "line", "g"].contains(&name),
            "unexpected <{name}>"
        );
        for a in node.attributes() {
            assert!(
                !["style", "href", "src"].contains(&a.name()) && !a.name().starts_with("on"),
                "attribute {}=\"{}\" on <{name}>",
                a.name(),
                a.value()
            );
        }
    }
    for banned in ["style=", "<script", "href", "foreignObject", "url(", "<!"] {
        assert!(!svg.contains(banned), "{banned} in {svg}");
    }
    // The namespace is the only address in the document.
    assert_eq!(svg.matches("http").count(), 1, "{svg}");
    doc
}

/// The `viewBox` as (width, height).
fn view_box(doc: &roxmltree::Document<'_>) -> (f64, f64) {
    let vb: Vec<f64> = doc
        .root_element()
        .attribute("viewBox")
        .unwrap()
        .split(' ')
        .map(|v| v.parse().unwrap())
        .collect();
    assert_eq!(vb[..2], [0.0, 0.0]);
    (vb[2], vb[3])
}

/// A drawn bar segment: its box, its colour and its tooltip.
#[derive(Debug)]
struct Seg {
    x: f64,
    y: f64,
    width: f64,
    height: f64,
    fill: String,
    tip: String,
}

fn segments(doc: &roxmltree::Document<'_>) -> Vec<Seg> {
    let Some(bars) = doc
        .descendants()
        .find(|n| n.tag_name().name() == "g" && n.attribute("class") == Some("bars"))
    else {
        return Vec::new();
    };
    let f = |n: roxmltree::Node<'_, '_>, a: &str| n.attribute(a).unwrap().parse::<f64>().unwrap();
    bars.children()
        .filter(|n| n.is_element())
        .map(|n| {
            assert_eq!(n.tag_name().name(), "rect");
            let title = n.first_element_child().unwrap();
            assert_eq!(title.tag_name().name(), "title");
            Seg {
                x: f(n, "x"),
                y: f(n, "y"),
                width: f(n, "width"),
                height: f(n, "height"),
                fill: n.attribute("fill").unwrap().to_owned(),
                tip: title.text().unwrap_or("").to_owned(),
            }
        })
        .collect()
}

/// Every text node's content, in document order, each `<text>` as one string.
fn texts(doc: &roxmltree::Document<'_>) -> Vec<String> {
    doc.descendants()
        .filter(|n| n.tag_name().name() == "text")
        .map(|n| {
            n.descendants()
                .filter(|d| d.is_text())
                .filter_map(|d| d.text())
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect()
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 0.02
}

#[test]
fn hostile_names_appear_only_escaped() {
    let hostile = [
        "<script>alert(1)</script>",
        "a\"b'c&d",
        "x\" onload=\"alert(1)",
        "</text><script>",
    ];
    let buckets = hours(3);
    let s: Vec<Series> = hostile
        .iter()
        .map(|name| series(name, &[1.0, 2.0, 3.0]))
        .collect();
    let mut c = chart(&buckets, &s);
    let title = "Usage for <b>\"team's\"</b> & co";
    c.title = title;
    let svg = stacked_bars(&c);
    let doc = parse(&svg);
    assert!(
        svg.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
        "{svg}"
    );
    assert!(svg.contains("a&quot;b&#39;c&amp;d"), "{svg}");
    assert!(!svg.contains("<b>") && !svg.contains("onload=\""), "{svg}");
    // Parsed back, each name is text again: in the legend and in every tooltip.
    assert_eq!(doc.root_element().attribute("aria-label"), Some(title));
    let legend = texts(&doc);
    for name in hostile {
        // The legend cuts names at 24 characters.
        let start = &name[..name.len().min(20)];
        assert!(
            legend.iter().any(|t| t.starts_with(start)),
            "{name}: {legend:?}"
        );
        let tips = segments(&doc)
            .into_iter()
            .filter(|s| s.tip.starts_with(&format!("{name} · ")))
            .count();
        assert_eq!(tips, 3, "{name}");
    }

    let items = [(hostile[0].to_owned(), 2.0), (hostile[1].to_owned(), 1.0)];
    let svg = horizontal_bars(title, Unit::Count, &items);
    let doc = parse(&svg);
    assert!(svg.contains("&lt;script&gt;"));
    assert!(texts(&doc).iter().any(|t| t == hostile[1]));
}

#[test]
fn control_and_bidi_characters_are_replaced() {
    let buckets = hours(1);
    let s = [series("a\u{1}b\u{202e}c\td\u{ffff}", &[5.0])];
    let svg = stacked_bars(&chart(&buckets, &s));
    let doc = parse(&svg);
    assert!(texts(&doc)
        .iter()
        .any(|t| t.starts_with("a\u{fffd}b\u{fffd}c\u{fffd}d\u{fffd}")));
    let svg = horizontal_bars("r\u{0}", Unit::Count, &[("\u{7}bell".to_owned(), 1.0)]);
    parse(&svg);
}

#[test]
fn known_values_give_proportional_stacked_segments() {
    let buckets = hours(4);
    let s = [
        series("b", &[10.0, 20.0, 0.0, 0.0]),
        series("a", &[10.0, 0.0, 30.0, 40.0]),
    ];
    let svg = stacked_bars(&chart(&buckets, &s));
    let doc = parse(&svg);
    assert_eq!(view_box(&doc), (960.0, 320.0));
    let segs = segments(&doc);
    // One segment per non-zero value: a has 3, b has 2.
    assert_eq!(segs.len(), 5, "{segs:?}");
    let find = |name: &str, hour: i64| {
        let at = format!("{name} · 2026-12-01 {hour:02}:00 UTC · ");
        segs.iter()
            .find(|s| s.tip.starts_with(&at))
            .unwrap_or_else(|| panic!("{at}: {segs:?}"))
    };
    // Heights are proportional to the values.
    let a3 = find("a", 3);
    assert!(close(find("a", 0).height / a3.height, 0.25));
    assert!(close(find("a", 2).height / a3.height, 0.75));
    assert!(close(find("b", 1).height / a3.height, 0.5));
    assert!(close(find("b", 0).height, find("a", 0).height));
    // The axis ends at 40 (4 steps of 10): the tallest bar fills the plot.
    let ticks: Vec<String> = texts(&doc)
        .into_iter()
        .filter(|t| t.parse::<f64>().is_ok())
        .collect();
    assert_eq!(ticks, ["0", "10", "20", "30", "40"]);
    // The largest series (a, 80 in all) is at the bottom, b stacked on it.
    let (a0, b0) = (find("a", 0), find("b", 0));
    assert!(close(b0.y + b0.height, a0.y), "{a0:?} {b0:?}");
    assert!(close(a0.y + a0.height, a3.y + a3.height));
    assert!(close(a0.x, b0.x) && close(a0.width, b0.width));
    assert_eq!(a0.fill, PALETTE[0]);
    assert_eq!(b0.fill, PALETTE[1]);
    // Bars are evenly spaced, left to right in time.
    let x: Vec<f64> = (0..4)
        .map(|h| find(if h == 1 { "b" } else { "a" }, h).x)
        .collect();
    assert!(close(x[1] - x[0], x[3] - x[2]) && x[1] > x[0]);
    // Tooltips carry the exact value; the legend the totals, largest first.
    assert!(find("a", 3).tip.ends_with(" · 40 tokens"));
    let legend = texts(&doc);
    let a = legend.iter().position(|t| t == "a 80").unwrap();
    let b = legend.iter().position(|t| t == "b 30").unwrap();
    assert!(a < b, "{legend:?}");
}

#[test]
fn more_than_seven_series_sum_the_smallest_into_other() {
    let buckets = hours(2);
    // s0 is the smallest (1 + 1), s9 the largest (10 + 10).
    let s: Vec<Series> = (0..10)
        .map(|i| series(&format!("s{i}"), &[f64::from(i + 1); 2]))
        .collect();
    let svg = stacked_bars(&chart(&buckets, &s));
    let doc = parse(&svg);
    let legend = texts(&doc);
    for i in 3..10 {
        let total = 2 * (i + 1);
        assert!(legend.contains(&format!("s{i} {total}")), "{legend:?}");
    }
    for i in 0..3 {
        assert!(!svg.contains(&format!("s{i}")), "s{i} is in other");
    }
    assert!(legend.contains(&"other (3) 12".to_owned()), "{legend:?}");
    let segs = segments(&doc);
    assert_eq!(segs.len(), 8 * 2);
    let other: Vec<&Seg> = segs.iter().filter(|s| s.fill == OTHER_COLOUR).collect();
    assert_eq!(other.len(), 2);
    assert!(other[0].tip.starts_with("other (3 series) · "));
    assert!(other[0].tip.ends_with(" · 6 tokens"), "{}", other[0].tip);
    // Eight colours, each once per bucket; "other" on top of the stack.
    let mut fills: Vec<&str> = segs.iter().map(|s| s.fill.as_str()).collect();
    fills.sort_unstable();
    fills.dedup();
    assert_eq!(fills.len(), 8);
    let top = segs[..8].iter().min_by(|a, b| a.y.total_cmp(&b.y)).unwrap();
    assert_eq!(top.fill, OTHER_COLOUR);

    // Seven series keep their names; series without usage are left out and do not count.
    let mut seven: Vec<Series> = s[..7].to_vec();
    seven.push(series("idle", &[0.0, 0.0]));
    let svg = stacked_bars(&chart(&buckets, &seven));
    assert!(!svg.contains("other") && !svg.contains("idle"), "{svg}");
    assert_eq!(segments(&parse(&svg)).len(), 14);
}

#[test]
fn empty_charts_say_so() {
    let buckets = hours(24);
    let zeros = [series("a", &[0.0; 24]), series("b", &[])];
    let junk = [series(
        "a",
        &[f64::NAN, f64::INFINITY, f64::NEG_INFINITY, -5.0],
    )];
    for (buckets, s) in [
        (&buckets[..], &zeros[..]),
        (&buckets[..], &junk[..]),
        (&buckets[..], &[][..]),
        (&[][..], &[series("a", &[1.0])][..]),
    ] {
        let svg = stacked_bars(&chart(buckets, s));
        let doc = parse(&svg);
        assert_eq!(view_box(&doc), (960.0, 320.0));
        let t = texts(&doc);
        assert!(t.contains(&EMPTY_MESSAGE.to_owned()), "{t:?}");
        assert!(t.contains(&EMPTY_HINT.to_owned()), "{t:?}");
        assert!(segments(&doc).is_empty());
        let message = doc
            .descendants()
            .find(|n| n.is_element() && n.text() == Some(EMPTY_MESSAGE))
            .unwrap();
        assert_eq!(message.attribute("x"), Some("480"));
        assert_eq!(message.attribute("text-anchor"), Some("middle"));
    }
    assert_eq!(
        EMPTY_MESSAGE, "No usage in this time range",
        "the dashboard relies on it"
    );
    assert_eq!(
        EMPTY_HINT,
        "Requests through the gateway appear here within a few seconds."
    );
    for items in [
        vec![],
        vec![("a".to_owned(), 0.0), ("b".to_owned(), f64::NAN)],
    ] {
        let svg = horizontal_bars("Refusals by reason", Unit::Count, &items);
        let doc = parse(&svg);
        assert!(texts(&doc).contains(&EMPTY_MESSAGE.to_owned()));
        assert!(segments(&doc).is_empty());
    }
}

#[test]
fn non_finite_and_negative_values_count_as_zero() {
    let buckets = hours(4);
    let s = [series("a", &[f64::NAN, f64::INFINITY, -3.0, 5.0, 99.0])];
    let svg = stacked_bars(&chart(&buckets, &s));
    let doc = parse(&svg);
    let segs = segments(&doc);
    assert_eq!(segs.len(), 1, "{segs:?}");
    assert!(segs[0].tip.contains("03:00 UTC · 5 tokens"));
    assert!(
        texts(&doc).contains(&"a 5".to_owned()),
        "the 99 has no bucket"
    );
}

#[test]
fn long_names_are_cut_with_an_ellipsis() {
    let buckets = hours(1);
    let long = "deployment-".repeat(10);
    let s = [series(&long, &[1.0])];
    let doc_text = stacked_bars(&chart(&buckets, &s));
    let doc = parse(&doc_text);
    let legend = texts(&doc);
    let shown: String = long.chars().take(23).collect();
    assert!(legend.contains(&format!("{shown}… 1")), "{legend:?}");
    let tip = &segments(&doc)[0].tip;
    assert!(tip.starts_with(&format!("{}… · ", &long[..79])), "{tip}");
    // Multi-byte characters are cut between characters.
    let wide = "é".repeat(40);
    let svg = horizontal_bars("t", Unit::Count, &[(wide, 1.0)]);
    let doc = parse(&svg);
    assert!(texts(&doc).contains(&format!("{}…", "é".repeat(27))));
}

#[test]
fn the_same_input_gives_the_same_document() {
    let buckets = hours(24);
    let s: Vec<Series> = (0..9)
        .map(|i| series(&format!("c{i}"), &[f64::from(i % 3 + 1); 24]))
        .collect();
    let c = chart(&buckets, &s);
    assert_eq!(stacked_bars(&c), stacked_bars(&c));
    let items = [("a".to_owned(), 1.0), ("b".to_owned(), 1.0)];
    assert_eq!(
        horizontal_bars("t", Unit::Usd, &items),
        horizontal_bars("t", Unit::Usd, &items)
    );
    // Equal totals keep the caller's order: c2, c5, c8 (3 each), then c1, c4, c7 (2 each).
    let svg = stacked_bars(&c);
    let at = |name: &str| svg.find(&format!(">{name}<")).unwrap();
    assert!(at("c2") < at("c5") && at("c5") < at("c8") && at("c8") < at("c1"));
    assert!(at("c1") < at("c4") && at("c4") < at("c7"));
}

#[test]
fn ticks_are_round_and_four_to_six() {
    let t = |max, whole| {
        let t = Ticks::new(max, whole);
        (t.step, t.steps)
    };
    assert_eq!(t(40.0, true), (10.0, 4));
    assert_eq!(t(41.0, true), (10.0, 5));
    assert_eq!(t(7.0, true), (2.0, 4));
    assert_eq!(t(1.0, true), (1.0, 3), "no fractional requests");
    assert_eq!(t(123_456.0, true), (50_000.0, 3));
    assert_eq!(t(0.37, false), (0.1, 4));
    assert_eq!(t(0.003, false), (0.001, 3));
    assert_eq!(t(0.0, false).1, 5, "a zero axis still has ticks");
    assert_eq!(t(f64::NAN, false).1, 5);
    let mut max = 0.001;
    while max < 1e15 {
        for whole in [false, true] {
            let ticks = Ticks::new(max, whole);
            assert!(ticks.top() >= max * (1.0 - 1e-9), "{max}: {ticks:?}");
            assert!((3..=5).contains(&ticks.steps), "{max}: {ticks:?}");
            let exp = ticks.step.log10().floor();
            let mantissa = (ticks.step / 10f64.powf(exp)).round();
            assert!([1.0, 2.0, 5.0].contains(&mantissa), "{max}: {ticks:?}");
            assert!(!whole || ticks.step >= 1.0);
        }
        max *= 1.37;
    }
}

#[test]
fn values_read_per_unit() {
    let c = |v| Unit::Count.compact(v);
    assert_eq!(c(0.0), "0");
    assert_eq!(c(950.0), "950");
    assert_eq!(c(999.4), "999.4");
    assert_eq!(c(999.6), "1k");
    assert_eq!(c(1_000.0), "1k");
    assert_eq!(c(1_234.0), "1.2k");
    assert_eq!(c(2.5), "2.5");
    assert_eq!(c(3_400_000.0), "3.4M");
    assert_eq!(c(999_950.0), "1M");
    assert_eq!(c(7.2e9), "7.2B");
    assert_eq!(c(5e15), "5000T");
    assert_eq!(c(f64::NAN), "0");
    assert_eq!(Unit::Tokens.compact(12_345.0), "12.3k");
    let u = |v| Unit::Usd.compact(v);
    assert_eq!(u(0.0), "$0");
    assert_eq!(u(0.12), "$0.12");
    assert_eq!(u(0.0042), "$0.0042");
    assert_eq!(u(0.00001), "<$0.0001");
    assert_eq!(u(12.5), "$12.50");
    assert_eq!(u(999.999), "$1k");
    assert_eq!(u(1_234.0), "$1.2k");
    assert_eq!(u(-3.0), "$0");

    assert_eq!(Unit::Count.exact(1_234_567.0), "1,234,567");
    assert_eq!(Unit::Count.exact(999.0), "999");
    assert_eq!(Unit::Count.exact(2.5), "2.5");
    assert_eq!(Unit::Tokens.exact(1_000.0), "1,000 tokens");
    assert_eq!(Unit::Usd.exact(1_234.5), "$1,234.50");
    assert_eq!(Unit::Usd.exact(12.999), "$13.00");
    assert_eq!(Unit::Usd.exact(0.0042), "$0.0042");
    assert_eq!(Unit::Usd.exact(0.0), "$0");

    let tick = |v, step| Unit::Usd.tick(v, step);
    assert_eq!(tick(0.0, 0.2), "$0");
    assert_eq!(tick(0.4, 0.2), "$0.40");
    assert_eq!(tick(0.30000000000000004, 0.1), "$0.30");
    assert_eq!(tick(0.003, 0.001), "$0.003");
    assert_eq!(tick(10.0, 5.0), "$10");
    assert_eq!(tick(1_500.0, 500.0), "$1.5k");
    assert_eq!(Unit::Tokens.tick(2_000_000.0, 500_000.0), "2M");
}

#[test]
fn usd_charts_label_their_axis_in_dollars() {
    let buckets = hours(3);
    let s = [series("gpt-4o", &[0.12, 0.37, 0.05])];
    let mut c = chart(&buckets, &s);
    c.unit = Unit::Usd;
    let doc_text = stacked_bars(&c);
    let doc = parse(&doc_text);
    let t = texts(&doc);
    for label in ["$0", "$0.10", "$0.20", "$0.30", "$0.40"] {
        assert!(t.contains(&label.to_owned()), "{label}: {t:?}");
    }
    assert!(t.contains(&"gpt-4o $0.54".to_owned()), "{t:?}");
    assert!(segments(&doc)[1].tip.ends_with(" · $0.3700"));
}

/// The x axis's time labels, left to right, with their x.
fn time_labels_of(doc: &roxmltree::Document<'_>) -> Vec<(f64, String)> {
    doc.descendants()
        .filter(|n| n.tag_name().name() == "text" && n.attribute("text-anchor") == Some("middle"))
        .filter_map(|n| {
            let text = n.text()?;
            let looks =
                text.len() == 5 && (text.as_bytes()[2] == b':' || text.as_bytes()[2] == b'-');
            looks.then(|| (n.attribute("x").unwrap().parse().unwrap(), text.to_owned()))
        })
        .collect()
}

#[test]
fn time_labels_are_utc_few_and_evenly_spaced() {
    // The last 24 hours in hours: HH:MM, every third bucket.
    let buckets = hours(24);
    let s = [series("a", &[1.0; 24])];
    let doc_text = stacked_bars(&chart(&buckets, &s));
    let doc = parse(&doc_text);
    let labels = time_labels_of(&doc);
    let names: Vec<&str> = labels.iter().map(|(_, t)| t.as_str()).collect();
    assert_eq!(
        names,
        ["00:00", "03:00", "06:00", "09:00", "12:00", "15:00", "18:00", "21:00"]
    );
    let gaps: Vec<f64> = labels.windows(2).map(|w| w[1].0 - w[0].0).collect();
    assert!(gaps.iter().all(|g| close(*g, gaps[0])), "{gaps:?}");
    assert!(texts(&doc).contains(&"Times in UTC".to_owned()));

    // Two days exactly are still hours; past that, dates.
    let buckets: Vec<i64> = (0..48).map(|i| DEC_1 + i * HOUR).collect();
    let s = [series("a", &[1.0; 48])];
    let labels = time_labels_of(&parse(&stacked_bars(&chart(&buckets, &s))));
    assert_eq!(labels.len(), 8);
    assert_eq!(labels[1].1, "06:00");

    // A week in 6-hour buckets: MM-DD, one a day.
    let buckets: Vec<i64> = (0..28).map(|i| DEC_1 + i * 6 * HOUR).collect();
    let s = [series("a", &[1.0; 28])];
    let mut c = chart(&buckets, &s);
    c.bucket_ms = 6 * HOUR;
    let labels = time_labels_of(&parse(&stacked_bars(&c)));
    let names: Vec<&str> = labels.iter().map(|(_, t)| t.as_str()).collect();
    assert_eq!(
        names,
        ["12-01", "12-02", "12-03", "12-04", "12-05", "12-06", "12-07"]
    );

    // A thousand buckets: still at most eight labels, and every bar drawn.
    let buckets: Vec<i64> = (0..1_000).map(|i| DEC_1 + i * 60_000).collect();
    let s = [series("a", &[1.0; 1_000])];
    let mut c = chart(&buckets, &s);
    c.bucket_ms = 60_000;
    let doc_text = stacked_bars(&c);
    let doc = parse(&doc_text);
    assert!(time_labels_of(&doc).len() <= 8);
    let segs = segments(&doc);
    assert_eq!(segs.len(), 1_000);
    assert!(segs.last().unwrap().x + segs.last().unwrap().width <= WIDTH - 16.0 + 0.01);
    assert_eq!(
        TimeAxis::new(&buckets, 60_000).full(DEC_1 + 90 * 60_000),
        "2026-12-01 01:30 UTC"
    );
}

#[test]
fn horizontal_bars_rank_items_and_grow_with_them() {
    let items: Vec<(String, f64)> = [
        ("rate_limited", 30.0),
        ("unauthorized", 120.0),
        ("forbidden", 60.0),
    ]
    .iter()
    .map(|(n, v)| ((*n).to_owned(), *v))
    .collect();
    let svg = horizontal_bars("Refusals by reason", Unit::Count, &items);
    let doc = parse(&svg);
    let (w, h3) = view_box(&doc);
    assert_eq!(w, 960.0);
    let segs = segments(&doc);
    let names: Vec<&str> = segs
        .iter()
        .map(|s| s.tip.split(" · ").next().unwrap())
        .collect();
    assert_eq!(names, ["unauthorized", "forbidden", "rate_limited"]);
    assert!(close(segs[1].width / segs[0].width, 0.5));
    assert!(close(segs[2].width / segs[0].width, 0.25));
    assert!(segs[0].y < segs[1].y && segs[1].y < segs[2].y);
    assert!(segs[0].tip.ends_with(" · 120"));
    let t = texts(&doc);
    for label in ["0", "50", "100", "150"] {
        assert!(t.contains(&label.to_owned()), "{label}: {t:?}");
    }

    let more: Vec<(String, f64)> = (0..6).map(|i| (format!("r{i}"), 1.0)).collect();
    let (_, h6) = view_box(&parse(&horizontal_bars("t", Unit::Count, &more)));
    assert!(h6 > h3, "{h6} > {h3}");

    // Past twenty rows, the smallest are summed into "other".
    let many: Vec<(String, f64)> = (0..25)
        .map(|i| (format!("r{i}"), f64::from(i + 1)))
        .collect();
    let doc_text = horizontal_bars("t", Unit::Count, &many);
    let doc = parse(&doc_text);
    let segs = segments(&doc);
    assert_eq!(segs.len(), 20);
    assert_eq!(segs[19].tip, "other (6) · 21");
    assert!(segs[0].tip.starts_with("r24 · "));
}
