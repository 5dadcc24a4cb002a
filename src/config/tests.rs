use super::*;

fn load(text: &str) -> Result<Validated, ConfigErrors> {
    load_str(text, "test.toml", Path::new("."))
}

const MINIMAL: &str = r#"
[[backends]]
name = "sim"
url = "http://127.0.0.1:9"
deployments = { "gpt-4o" = "gpt-4o" }
"#;

#[test]
fn minimal_config_gets_documented_defaults() {
    let v = load(MINIMAL).unwrap();
    assert_eq!(v.listen.to_string(), "0.0.0.0:8080");
    assert_eq!(v.admin_listen.unwrap().to_string(), "127.0.0.1:9090");
    assert_eq!(v.config.server.max_body_bytes, 16 * 1024 * 1024);
    assert_eq!(v.config.backends[0].kind, BackendKind::Azure);
    assert_eq!(v.config.backends[0].timeouts.connect.0.as_secs(), 2);
}

#[test]
fn unknown_key_names_path_and_line() {
    let text = format!("{MINIMAL}\n[server]\nlisten = \"127.0.0.1:1\"\nlisten_port = 3\n");
    let err = load(&text).unwrap_err();
    assert_eq!(err.problems.len(), 1);
    let p = &err.problems[0];
    assert_eq!(p.path, "server.listen_port");
    assert!(p.message.contains("unknown field `listen_port`"), "{p}");
    assert_eq!(p.line, Some(9), "{p}");
}

#[test]
fn bad_value_in_backend_names_indexed_path() {
    let text = r#"
[[backends]]
name = "a"
url = "http://127.0.0.1:9"
deployments = { "m" = "m" }

[[backends]]
name = "b"
url = "http://127.0.0.1:9"
deployments = { "m" = "m" }
timeouts = { connect = "soon" }
"#;
    let err = load(text).unwrap_err();
    let p = &err.problems[0];
    assert_eq!(p.path, "backends[1].timeouts.connect");
    assert!(p.message.contains("invalid duration 'soon'"), "{p}");
    assert_eq!(p.line, Some(11));
}

#[test]
fn validation_reports_every_problem_with_lines() {
    let text = r#"
[server]
listen = "nowhere"

[[backends]]
name = "a"
url = "ftp://x"
deployments = {}

[[backends]]
name = "a"
url = "http://127.0.0.1:9"
deployments = { "m" = "m" }
auth = { type = "api_key" }
"#;
    let err = load(text).unwrap_err();
    let shown: Vec<String> = err.problems.iter().map(ToString::to_string).collect();
    let expect = [
        "server.listen (line 3)",
        "backends[0].url (line 7)",
        "backends[0].deployments (line 8)",
        "backends[1].name (line 11)",
        "backends[1].auth (line 14)",
    ];
    for e in expect {
        assert!(
            shown.iter().any(|s| s.starts_with(e)),
            "missing {e} in {shown:#?}"
        );
    }
    assert_eq!(shown.len(), expect.len(), "{shown:#?}");
}

#[test]
fn missing_env_var_is_named() {
    let text = MINIMAL.replace("http://127.0.0.1:9", "${PORTCULLIS_TEST_SURELY_UNSET}");
    let err = load(&text).unwrap_err();
    let p = &err.problems[0];
    assert_eq!(p.path, "backends[0].url");
    assert!(
        p.message
            .contains("PORTCULLIS_TEST_SURELY_UNSET is not set"),
        "{p}"
    );
}

#[test]
fn key_file_is_read_and_never_printed() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("key.txt"), "s3cret-key\n").unwrap();
    let text = format!("{MINIMAL}auth = {{ type = \"api_key\", key_file = \"key.txt\" }}\n");
    let v = load_str(&text, "t", dir.path()).unwrap();
    let ResolvedAuth::ApiKey(s) = &v.backend_auth[0] else {
        panic!("an api key")
    };
    assert_eq!(s.expose(), "s3cret-key");
    assert!(!format!("{v:?}").contains("s3cret-key"));
}

#[test]
fn unknown_auth_type_is_refused() {
    let text = format!("{MINIMAL}auth = {{ type = \"magic\" }}\n");
    let err = load(&text).unwrap_err();
    assert_eq!(err.problems[0].path, "backends[0].auth.type");
    assert!(err.problems[0].message.contains("magic"), "{}", err);
}

#[test]
fn syntax_error_has_line() {
    let err = load("[server\nlisten = 1").unwrap_err();
    assert_eq!(err.problems[0].line, Some(1));
}

#[test]
fn refuses_unsafe_names_keys_and_durations() {
    let text = r#"
[server]
body_timeout = "300000000000y"

[[backends]]
name = "a"
url = "http://127.0.0.1:9"
deployments = { "gpt 4o" = "x?api-version=1" }
timeouts = { connect = "90s", first_byte = "60s" }
auth = { type = "api_key", key = "two\nlines" }
"#;
    let err = load(text).unwrap_err();
    let shown: Vec<String> = err.problems.iter().map(ToString::to_string).collect();
    for e in [
        "server.body_timeout (line 3): must be at most 24h",
        "backends[0].deployments (line 8): invalid deployment name 'gpt 4o'",
        "backends[0].deployments (line 8): invalid deployment name 'x?api-version=1'",
        "backends[0].timeouts.connect (line 9): must be shorter",
        "backends[0].auth (line 10): the key may only contain printable ASCII",
    ] {
        assert!(
            shown.iter().any(|s| s.starts_with(e)),
            "missing {e} in {shown:#?}"
        );
    }
    assert!(
        !err.to_string().contains("two\nlines"),
        "secret echoed: {err}"
    );
}

const ISSUER: &str = r#"
[[issuers]]
name = "entra"
issuer = "https://login.microsoftonline.com/tid/v2.0"
audiences = ["api://portcullis"]
"#;

fn problems_of(text: &str) -> Vec<Problem> {
    load(text)
        .map(|_| Vec::new())
        .unwrap_or_else(|e| e.problems)
}

#[test]
fn identity_sections_parse_with_defaults() {
    let text = format!(
        "{MINIMAL}{ISSUER}\n[[clients]]\nid = \"team-a\"\njwt = [{{ issuer = \"entra\", claims = {{ roles = \"A\" }} }}]\ndeployments = [\"gpt-4o\"]\noperations = [\"chat\"]\n"
    );
    let v = load(&text).unwrap();
    let iss = &v.config.issuers[0];
    assert_eq!(iss.leeway.0.as_secs(), 60);
    assert_eq!(iss.algorithms.len(), 3);
    assert_eq!(v.config.store.url.as_str(), "sqlite://portcullis.db");
    assert!(v.key_hmac_secret.is_none());
    assert_eq!(v.config.clients[0].jwt[0].claims.len(), 1);
}

#[test]
fn issuer_rules_are_enforced() {
    let text = format!(
        "{MINIMAL}\n[[issuers]]\nname = \"x\"\nissuer = \"http://idp.example.com\"\naudiences = []\nalgorithms = [\"none\", \"HS256\", \"XX1\"]\n"
    );
    let p = problems_of(&text);
    let msgs: Vec<String> = p.iter().map(|p| p.to_string()).collect();
    let all = msgs.join("\n");
    assert!(all.contains("issuers[0].issuer"), "{all}");
    assert!(all.contains("must use https"), "{all}");
    assert!(all.contains("issuers[0].audiences"), "{all}");
    assert!(all.contains("\"none\" is never accepted"), "{all}");
    assert!(all.contains("HS256 needs `hmac_secret`"), "{all}");
    assert!(all.contains("unknown algorithm 'XX1'"), "{all}");
    assert!(p.iter().all(|p| p.line.is_some()), "{all}");
}

#[test]
fn tenant_template_needs_jwks_uri_and_tenants() {
    let text = format!(
        "{MINIMAL}\n[[issuers]]\nname = \"multi\"\nissuer = \"https://login.microsoftonline.com/{{tenantid}}/v2.0\"\naudiences = [\"a\"]\n"
    );
    let all: Vec<String> = problems_of(&text).iter().map(|p| p.to_string()).collect();
    let all = all.join("\n");
    assert!(all.contains("issuers[0].jwks_uri"), "{all}");
    assert!(all.contains("issuers[0].allowed_tenants"), "{all}");
}

#[test]
fn clients_are_deny_by_default_and_unambiguous() {
    let text = format!(
        "{MINIMAL}{ISSUER}
[[clients]]
id = \"a\"
jwt = [{{ issuer = \"entra\", claims = {{ azp = \"app\" }} }}]
deployments = [\"gpt-4o\"]
operations = [\"chat\"]

[[clients]]
id = \"b\"
jwt = [{{ issuer = \"entra\", claims = {{ azp = \"app\", roles = \"X\" }} }}]
deployments = [\"gpt-4o\"]
operations = [\"chat\"]

[[clients]]
id = \"c\"
jwt = [{{ issuer = \"nope\" }}]
deployments = []
operations = [\"teleport\"]

[[clients]]
id = \"a\"
anonymous = true
deployments = [\"bad name\"]
operations = [\"*\"]
"
    );
    let all: Vec<String> = problems_of(&text).iter().map(|p| p.to_string()).collect();
    let all = all.join("\n");
    assert!(
        all.contains("could be both client 'a' and client 'b'"),
        "{all}"
    );
    assert!(all.contains("clients[2].jwt[0].issuer"), "{all}");
    assert!(all.contains("clients[2].deployments"), "{all}");
    assert!(all.contains("unknown operation 'teleport'"), "{all}");
    assert!(all.contains("client id 'a' is used twice"), "{all}");
    assert!(
        all.contains("invalid deployment pattern 'bad name'"),
        "{all}"
    );
}

#[test]
fn store_secret_must_be_long_enough() {
    let text = format!("{MINIMAL}\n[store]\nkey_hmac_secret = \"short\"\n");
    let all: Vec<String> = problems_of(&text).iter().map(|p| p.to_string()).collect();
    assert!(all.join("\n").contains("store.key_hmac_secret"), "{all:?}");
    let text = format!("{MINIMAL}\n[store]\nurl = \"postgress://app:hunter2@db/keys\"\n");
    let p = &problems_of(&text)[0];
    assert_eq!(p.path, "store.url");
    assert!(!p.message.contains("hunter2"), "{p}");
}

#[test]
fn overlapping_issuers_and_tenantless_multi_tenant_bindings_are_refused() {
    let text = format!(
        "{MINIMAL}
[[issuers]]
name = \"multi\"
issuer = \"https://login.microsoftonline.com/{{tenantid}}/v2.0\"
jwks_uri = \"https://login.microsoftonline.com/common/discovery/v2.0/keys\"
allowed_tenants = [\"t1\", \"t2\"]
audiences = [\"a\"]

[[issuers]]
name = \"single\"
issuer = \"https://login.microsoftonline.com/t1/v2.0\"
audiences = [\"a\"]

[[issuers]]
name = \"again\"
issuer = \"https://login.microsoftonline.com/t1/v2.0\"
audiences = [\"a\"]

[[clients]]
id = \"c\"
jwt = [{{ issuer = \"multi\", claims = {{ roles = \"R\" }} }}, {{ issuer = \"multi\", claims = {{ roles = \"R2\", tid = \"t1\" }} }}]
deployments = [\"*\"]
operations = [\"*\"]
"
    );
    let all: Vec<String> = problems_of(&text).iter().map(|p| p.to_string()).collect();
    let all = all.join("\n");
    assert!(all.contains("issuers[1].issuer"), "{all}");
    assert!(all.contains("issuers[2].issuer"), "{all}");
    assert!(all.contains("clients[0].jwt[0].claims"), "{all}");
    assert!(!all.contains("clients[0].jwt[1]"), "{all}");
}
