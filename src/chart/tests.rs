use super::*;

const HOUR: i64 = 3_600_000;
/// 2026-12-01T00:00:00Z.
const T0: i64 = 1_796_083_200_000;

fn starts(n: usize) -> Vec<i64> {
    (0..n as i64).map(|i| T0 + i * HOUR).collect()
}

fn s(name: &str, values: &[f64]) -> Series {
    Series {
        name: name.into(),
        values: values.to_vec(),
    }
}

fn chart(series: &[Series], n: usize) -> String {
    let b = starts(n);
    stacked_bars(&TimeChart {
        title: "requests per 1 h",
        unit: Unit::Count,
        buckets_ms: &b,
        bucket_ms: HOUR,
        series,
    })
}

fn heights(svg: &str) -> Vec<f64> {
    svg.split("<rect class=\"bar\"")
        .skip(1)
        .map(|r| {
            let h = r.split("height=\"").nth(1).unwrap();
            h[..h.find('"').unwrap()].parse().unwrap()
        })
        .collect()
}

#[test]
fn bars_are_stacked_in_proportion() {
    let svg = chart(
        &[s("app", &[10.0, 0.0, 30.0]), s("batch", &[10.0, 0.0, 0.0])],
        3,
    );
    let h = heights(&svg);
    assert_eq!(h.len(), 3, "zero values draw nothing: {svg}");
    assert!((h[0] - h[1]).abs() < 0.2, "{h:?}");
    assert!((h[2] / h[0] - 3.0).abs() < 0.05, "{h:?}");
    assert!(
        svg.contains("app · 40") && svg.contains("batch · 20"),
        "legend totals"
    );
    assert!(svg.contains("2026-12-01 02:00 UTC"), "tooltip time");
    assert!(svg.contains(">00:00<"), "short ranges label hours");
}

#[test]
fn hostile_names_are_only_ever_escaped() {
    let svg = chart(&[s("<script>alert('x')</script>&\"", &[1.0])], 1);
    assert!(!svg.contains("<script"), "{svg}");
    assert!(svg.contains("&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;&amp;&quot;"));
    for banned in ["style=", "href", "<foreignObject", "javascript:"] {
        assert!(!svg.contains(banned), "{banned} in {svg}");
    }
    let bars = horizontal_bars("<b>", Unit::Count, &[("<img>".into(), 3.0)]);
    assert!(!bars.contains("<img>") && !bars.contains("<b>"), "{bars}");
}

#[test]
fn more_than_seven_series_keep_the_largest_and_sum_the_rest() {
    let series: Vec<Series> = (0..10)
        .map(|i| s(&format!("c{i}"), &[f64::from(i + 1)]))
        .collect();
    let svg = chart(&series, 1);
    for kept in ["c9", "c8", "c7", "c6", "c5", "c4"] {
        assert!(svg.contains(&format!("{kept} · ")), "{kept}");
    }
    assert!(!svg.contains("c0 · ") && !svg.contains("c3 · "));
    // c0..c3: 1 + 2 + 3 + 4.
    assert!(svg.contains("other · 10"), "{svg}");
}

#[test]
fn an_empty_range_says_so() {
    for svg in [
        chart(&[], 3),
        chart(&[s("app", &[0.0, f64::NAN, -1.0])], 3),
        chart(&[], 0),
    ] {
        assert!(
            svg.contains(EMPTY_TITLE) && svg.contains(EMPTY_HINT),
            "{svg}"
        );
        assert!(heights(&svg).is_empty());
    }
    assert!(horizontal_bars("x", Unit::Count, &[]).contains("Nothing refused"));
}

#[test]
fn output_is_deterministic_and_well_formed() {
    let series = [s("a", &[1.0, 2.0]), s("b", &[3.0, 4.0])];
    assert_eq!(chart(&series, 2), chart(&series, 2));
    let svg = chart(&series, 2);
    assert!(svg.starts_with("<svg") && svg.ends_with("</svg>"));
    assert_eq!(svg.matches("<svg").count(), 1);
    assert_eq!(
        svg.matches("<title>").count(),
        svg.matches("</title>").count()
    );
}

#[test]
fn ticks_and_labels_read_well() {
    assert_eq!(nice_step(100.0, 5), 20.0);
    assert_eq!(nice_step(7.0, 5), 2.0);
    assert_eq!(nice_step(0.3, 5), 0.1);
    assert_eq!(format_value(1234.0, Unit::Tokens), "1.2k");
    assert_eq!(format_value(3_400_000.0, Unit::Count), "3.4M");
    assert_eq!(format_value(12.0, Unit::Count), "12");
    assert_eq!(format_value(0.123, Unit::Usd), "$0.12");
    assert_eq!(format_value(1500.0, Unit::Usd), "$1.5k");
    assert_eq!(format_value(f64::INFINITY, Unit::Count), "0");
    let b: Vec<i64> = (0..7).map(|i| T0 + i * 86_400_000).collect();
    let svg = stacked_bars(&TimeChart {
        title: "t",
        unit: Unit::Count,
        buckets_ms: &b,
        bucket_ms: 86_400_000,
        series: &[s("a", &[1.0; 7])],
    });
    assert!(svg.contains(">12-01<"), "long ranges label days: {svg}");
}
