//! `portcullis usage` through the real binary: records written with the library into an
//! SQLite file or a PostgreSQL database, then reported as a table, JSON and CSV.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::PathBuf;
use std::process::{Command, Output};

use common::pg::TestDb;
use portcullis::store::{self, UsageRecord};

const BIN: &str = env!("CARGO_BIN_EXE_portcullis");

/// 2026-12-01T00:00:00Z in unix milliseconds.
const DEC_1: i64 = 1_796_083_200_000;
const HOUR: i64 = 3_600_000;
const DAY: i64 = 24 * HOUR;

/// A configuration whose backends need secrets and an environment this machine does not
/// have: `usage` must not care.
struct Setup {
    dir: tempfile::TempDir,
    config: PathBuf,
    store_url: String,
}

impl Setup {
    fn new(store_url: &str) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("portcullis.toml");
        std::fs::write(
            &config,
            format!(
                r#"[store]
url = "{store_url}"
key_hmac_secret = "${{PORTCULLIS_USAGE_CLI_UNSET_HMAC}}"

[[clients]]
id = "team-a"
deployments = ["*"]
operations = ["*"]

[[backends]]
name = "ptu"
url = "https://${{PORTCULLIS_USAGE_CLI_UNSET_HOST}}.openai.azure.com"
deployments = {{ "gpt-4o" = "gpt-4o" }}
[backends.auth]
type = "api_key"
key = "${{PORTCULLIS_USAGE_CLI_UNSET_KEY}}"

[[backends]]
name = "paygo"
url = "https://paygo.openai.azure.com"
deployments = {{ "gpt-4o" = "gpt-4o" }}
[backends.auth]
type = "managed_identity"
"#
            ),
        )
        .unwrap();
        Setup {
            dir,
            config,
            store_url: store_url.to_owned(),
        }
    }

    async fn write(&self, records: &[UsageRecord]) {
        let s = store::open_store(&self.store_url, self.dir.path())
            .await
            .unwrap();
        s.insert_usage(records).await.unwrap();
        s.close().await;
    }

    /// `portcullis usage --config <file> <args>`, from a directory other than the config's.
    fn usage(&self, args: &[&str]) -> Output {
        let elsewhere = tempfile::tempdir().unwrap();
        Command::new(BIN)
            .arg("usage")
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .current_dir(elsewhere.path())
            .env_remove("AZURE_CLIENT_ID")
            .env_remove("IDENTITY_ENDPOINT")
            .output()
            .unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.usage(args);
        let stdout = String::from_utf8(out.stdout).unwrap();
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert!(
            out.status.success(),
            "usage {args:?} failed:\n{stdout}\n{stderr}"
        );
        assert_eq!(stderr, "", "nothing logged");
        stdout
    }

    fn fails(&self, args: &[&str]) -> String {
        let out = self.usage(args);
        assert_eq!(out.status.code(), Some(1), "usage {args:?}");
        assert!(out.stdout.is_empty());
        String::from_utf8(out.stderr).unwrap()
    }
}

#[allow(clippy::too_many_arguments)]
fn rec(
    time_ms: i64,
    client: &str,
    subject: Option<&str>,
    deployment: &str,
    prompt: i64,
    cached: i64,
    completion: i64,
    cost: f64,
) -> UsageRecord {
    UsageRecord {
        time_ms,
        request_id: format!("req-{time_ms}"),
        client: client.into(),
        subject: subject.map(Into::into),
        key_id: None,
        operation: "chat".into(),
        deployment: Some(deployment.into()),
        backend: Some("ptu".into()),
        prompt_tokens: prompt,
        cached_tokens: cached,
        completion_tokens: completion,
        reasoning_tokens: 0,
        estimated_tokens: Some(prompt),
        usage_source: "reported".into(),
        cost_usd: cost,
        status: 200,
        stream: false,
    }
}

fn december() -> Vec<UsageRecord> {
    vec![
        rec(
            DEC_1 + DAY - 1,
            "team-a",
            Some("alice"),
            "gpt-4o",
            1000,
            200,
            100,
            0.012_345_67,
        ),
        rec(
            DEC_1 + 2 * HOUR,
            "team-b",
            None,
            "gpt-4o",
            50,
            0,
            5,
            0.000_5,
        ),
        rec(DEC_1 + DAY, "team-a", Some("bob"), "o3", 2000, 0, 300, 1.5),
    ]
}

const WINDOW: [&str; 4] = ["--since", "2026-12-01", "--until", "2026-12-03"];

fn with_window<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut v: Vec<&str> = WINDOW.to_vec();
    v.extend_from_slice(extra);
    v
}

async fn reports(setup: &Setup) {
    setup.write(&december()).await;

    // The default table: by day, aligned, with a total row.
    assert_eq!(
        setup.ok(&WINDOW),
        "\
DAY         REQUESTS  PROMPT  CACHED  COMPLETION  REASONING  TOTAL  COST_USD
2026-12-01         2    1050     200         105          0   1155    0.0128
2026-12-02         1    2000       0         300          0   2300    1.5000
TOTAL              3    3050     200         405          0   3455    1.5128
"
    );

    // JSON: an array of objects, costs at full precision.
    let json: serde_json::Value =
        serde_json::from_str(&setup.ok(&with_window(&["--by", "client", "--format", "json"])))
            .unwrap();
    assert_eq!(
        json,
        serde_json::json!([
            {"client": "team-a", "requests": 2, "prompt_tokens": 3000, "cached_tokens": 200,
             "completion_tokens": 400, "reasoning_tokens": 0, "total_tokens": 3400,
             "cost_usd": 1.512_345_67},
            {"client": "team-b", "requests": 1, "prompt_tokens": 50, "cached_tokens": 0,
             "completion_tokens": 5, "reasoning_tokens": 0, "total_tokens": 55,
             "cost_usd": 0.000_5},
        ])
    );

    // CSV: a header and one line per row; a missing subject is an empty field.
    assert_eq!(
        setup.ok(&with_window(&["--by", "subject", "--format", "csv"])),
        "subject,requests,prompt_tokens,cached_tokens,completion_tokens,reasoning_tokens,total_tokens,cost_usd\n\
         alice,1,1000,200,100,0,1100,0.01234567\n\
         bob,1,2000,0,300,0,2300,1.5\n\
         ,1,50,0,5,0,55,0.0005\n"
    );

    // Filters and hours.
    assert_eq!(
        setup.ok(&with_window(&["--client", "team-a", "--deployment", "gpt-4o", "--by", "hour", "--format", "csv"])),
        "hour,requests,prompt_tokens,cached_tokens,completion_tokens,reasoning_tokens,total_tokens,cost_usd\n\
         2026-12-01T23:00:00Z,1,1000,200,100,0,1100,0.01234567\n"
    );
    assert_eq!(
        setup.ok(&["--since", "2026-12-02T00:00:00Z", "--until", "2026-12-02T00:00:00.001Z", "--by", "deployment", "--format", "csv"]),
        "deployment,requests,prompt_tokens,cached_tokens,completion_tokens,reasoning_tokens,total_tokens,cost_usd\n\
         o3,1,2000,0,300,0,2300,1.5\n",
        "RFC 3339 bounds to the millisecond"
    );

    // The default window is the last 7 days.
    let now = portcullis::report::now_ms();
    setup
        .write(&[
            rec(now - HOUR, "recent", None, "gpt-4o", 7, 0, 3, 0.25),
            rec(now - 8 * DAY, "recent", None, "gpt-4o", 1000, 0, 0, 9.0),
        ])
        .await;
    let json: serde_json::Value =
        serde_json::from_str(&setup.ok(&["--client", "recent", "--format", "json"])).unwrap();
    let rows = json.as_array().unwrap();
    assert_eq!(rows.len(), 1, "{json}");
    assert_eq!(
        (
            rows[0]["requests"].as_i64(),
            rows[0]["total_tokens"].as_i64()
        ),
        (Some(1), Some(10))
    );

    // Nothing matches: the table still has its header and a zero total.
    assert_eq!(
        setup
            .ok(&with_window(&["--client", "nobody", "--by", "client"]))
            .lines()
            .count(),
        2
    );
    assert_eq!(
        setup.ok(&with_window(&["--client", "nobody", "--format", "json"])),
        "[]\n"
    );
}

#[tokio::test]
async fn reports_on_sqlite() {
    let setup = Setup::new("sqlite://usage.db");
    reports(&setup).await;
}

#[tokio::test]
async fn reports_on_postgres() {
    let db = TestDb::create().await;
    let setup = Setup::new(&db.url);
    reports(&setup).await;
}

#[test]
fn bad_arguments_and_a_missing_database_are_errors() {
    let setup = Setup::new("sqlite://usage.db");
    let e = setup.fails(&["--since", "last tuesday"]);
    assert!(
        e.starts_with("error: --since 'last tuesday': expected a duration"),
        "{e}"
    );
    let e = setup.fails(&["--since", "2026-12-02", "--until", "2026-12-01"]);
    assert!(e.contains("must be before --until"), "{e}");
    // A report never creates the database it was pointed at.
    let e = setup.fails(&[]);
    assert!(e.contains("no database at"), "{e}");
    assert!(!setup.dir.path().join("usage.db").exists());
    // Bad values are refused by the parser.
    let out = setup.usage(&["--by", "week"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn an_unreachable_store_is_an_error_without_the_password() {
    let port = common::dead_port();
    let setup = Setup::new(&format!("postgres://app:hunter2-usage@127.0.0.1:{port}/x"));
    let e = setup.fails(&[]);
    assert!(e.starts_with("error: cannot open the store"), "{e}");
    assert!(e.contains("app:***@127.0.0.1"), "{e}");
    assert!(!e.contains("hunter2"), "{e}");
}
