//! `--since`/`--until`, reading `[store] url` alone, and the three output formats.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use super::*;

/// 2026-12-01T00:00:00Z.
const DEC_1: i64 = 1_796_083_200_000;

#[test]
fn times_are_durations_back_dates_or_rfc3339() {
    let now = DEC_1 + 12 * 3_600_000;
    assert_eq!(
        parse_time("since", "7d", now).unwrap(),
        now - 7 * 86_400_000
    );
    assert_eq!(parse_time("since", "24h", now).unwrap(), now - 86_400_000);
    assert_eq!(parse_time("since", "90m", now).unwrap(), now - 90 * 60_000);
    assert_eq!(parse_time("since", "2026-12-01", now).unwrap(), DEC_1);
    assert_eq!(
        parse_time("until", "2026-12-01T08:30:00Z", now).unwrap(),
        DEC_1 + 8 * 3_600_000 + 30 * 60_000
    );
    assert_eq!(
        parse_time("until", "2026-12-01T08:30:00.250+02:00", now).unwrap(),
        DEC_1 + 6 * 3_600_000 + 30 * 60_000 + 250
    );
    for bad in [
        "yesterday",
        "2026-13-01",
        "2026-02-30",
        "2026-1-01",
        "",
        "7 parsecs",
    ] {
        let e = parse_time("since", bad, now).unwrap_err();
        assert!(
            matches!(e, ReportError::Time { flag: "since", .. }),
            "{bad}: {e:?}"
        );
        assert!(e.to_string().starts_with("--since '"), "{e}");
    }
}

fn args(since: &str, until: Option<&str>) -> UsageArgs {
    UsageArgs {
        config: "portcullis.toml".into(),
        client: Some("team-a".into()),
        deployment: None,
        since: since.into(),
        until: until.map(Into::into),
        by: By::Hour,
        format: Format::Table,
    }
}

#[test]
fn the_query_defaults_to_now_and_refuses_an_empty_window() {
    let now = DEC_1 + 1000;
    let q = query(&args("1s", None), now).unwrap();
    assert_eq!((q.since_ms, q.until_ms), (DEC_1, now));
    assert_eq!((q.by, q.client.as_deref()), (GroupBy::Hour, Some("team-a")));
    let e = query(&args("2026-12-02", Some("2026-12-01")), now).unwrap_err();
    assert!(e.to_string().contains("must be before --until"), "{e}");
}

#[test]
fn only_the_store_url_is_read_from_the_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("portcullis.toml");
    // Backends name variables that are not set, and an auth type that needs the Azure
    // environment: none of it is resolved.
    std::fs::write(
        &path,
        r#"[store]
url = "sqlite://${PORTCULLIS_REPORT_TEST_DIR}/usage.db"
key_hmac_secret = "${PORTCULLIS_REPORT_TEST_UNSET_SECRET}"

[[backends]]
name = "b"
url = "${PORTCULLIS_REPORT_TEST_UNSET_URL}"
deployments = { "gpt-4o" = "gpt-4o" }
[backends.auth]
type = "managed_identity"
"#,
    )
    .unwrap();
    // Not set: the error names the key path.
    let e = store_url(&path).unwrap_err();
    assert!(
        e.to_string()
            .contains("store.url: environment variable PORTCULLIS_REPORT_TEST_DIR"),
        "{e}"
    );
    std::fs::write(
        &path,
        "[store]\nurl = \"postgres://u@db/x\"\n[[backends]]\nkey = \"${NOPE}\"\n",
    )
    .unwrap();
    let (url, base) = store_url(&path).unwrap();
    assert_eq!(
        (url.as_str(), base.as_path()),
        ("postgres://u@db/x", dir.path())
    );
    std::fs::write(&path, "[server]\nlisten = \"${NOPE}\"\n").unwrap();
    assert_eq!(
        store_url(&path).unwrap().0,
        "sqlite://portcullis.db",
        "the default"
    );
    std::fs::write(&path, "[store]\nurl = 5\n").unwrap();
    assert!(store_url(&path)
        .unwrap_err()
        .to_string()
        .contains("store.url: expected a string"));
    std::fs::write(&path, "key = \"hunter2\"\n[store\n").unwrap();
    let e = store_url(&path).unwrap_err().to_string();
    assert!(e.contains("line 2"), "{e}");
    assert!(!e.contains("hunter2"), "the file is not quoted: {e}");
}

fn row(key: Option<&str>, requests: i64, prompt: i64, completion: i64, cost: f64) -> UsageRow {
    UsageRow {
        key: key.map(Into::into),
        requests,
        prompt_tokens: prompt,
        cached_tokens: prompt / 2,
        completion_tokens: completion,
        reasoning_tokens: completion / 4,
        total_tokens: prompt + completion,
        cost_usd: cost,
    }
}

fn rows() -> Vec<UsageRow> {
    vec![
        row(Some("team-a"), 2, 1200, 400, 0.012_345_678),
        row(Some("a,\"b\"\x1b[31m"), 1, 10, 4, 0.000_01),
        row(None, 30, 100_000, 20_000, 12.5),
    ]
}

#[test]
fn tables_align_columns_and_end_with_a_total() {
    let t = render(Format::Table, GroupBy::Client, &rows());
    let want = "\
CLIENT           REQUESTS  PROMPT  CACHED  COMPLETION  REASONING   TOTAL  COST_USD
team-a                  2    1200     600         400        100    1600    0.0123
a,\"b\"\\u{1b}[31m         1      10       5           4          1      14    0.0000
(none)                 30  100000   50000       20000       5000  120000   12.5000
TOTAL                  33  101210   50605       20404       5101  121614   12.5124
";
    assert_eq!(t, want, "\n{t}");
    let empty = render(Format::Table, GroupBy::Day, &[]);
    assert_eq!(
        empty,
        "DAY    REQUESTS  PROMPT  CACHED  COMPLETION  REASONING  TOTAL  COST_USD\n\
         TOTAL         0       0       0           0          0      0    0.0000\n"
    );
}

#[test]
fn json_is_an_array_of_objects_at_full_precision() {
    let text = render(Format::Json, GroupBy::Deployment, &rows());
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let list = v.as_array().unwrap();
    assert_eq!(list.len(), 3);
    assert_eq!(
        list[0],
        serde_json::json!({
            "deployment": "team-a", "requests": 2, "prompt_tokens": 1200, "cached_tokens": 600,
            "completion_tokens": 400, "reasoning_tokens": 100, "total_tokens": 1600,
            "cost_usd": 0.012_345_678
        })
    );
    assert_eq!(list[1]["deployment"], "a,\"b\"\x1b[31m");
    assert_eq!(list[2]["deployment"], serde_json::Value::Null);
    assert_eq!(render(Format::Json, GroupBy::Day, &[]), "[]\n");
}

#[test]
fn csv_has_a_header_quotes_when_needed_and_keeps_full_precision() {
    let text = render(Format::Csv, GroupBy::Subject, &rows());
    assert_eq!(
        text,
        "subject,requests,prompt_tokens,cached_tokens,completion_tokens,reasoning_tokens,total_tokens,cost_usd\n\
         team-a,2,1200,600,400,100,1600,0.012345678\n\
         \"a,\"\"b\"\"\x1b[31m\",1,10,5,4,1,14,0.00001\n\
         ,30,100000,50000,20000,5000,120000,12.5\n"
    );
}
