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

fn load_env(text: &str, dir: &Path, env: &[(&str, &str)]) -> Result<Validated, ConfigErrors> {
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    load_str_with_env(text, "test.toml", dir, &move |name| {
        env.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
    })
}

fn token_spec(v: &Validated) -> &TokenSpec {
    match &v.backend_auth[0] {
        ResolvedAuth::Token(t) => t,
        other => panic!("expected a token credential, got {other:?}"),
    }
}

fn auth_problems(auth: &str, dir: &Path, env: &[(&str, &str)]) -> String {
    let text = format!("{MINIMAL}[backends.auth]\n{auth}\n");
    load_env(&text, dir, env).unwrap_err().to_string()
}

#[test]
fn entra_secret_resolves_the_entra_token_url() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "{MINIMAL}[backends.auth]\ntype = \"entra_secret\"\ntenant_id = \"contoso.onmicrosoft.com\"\nclient_id = \"app-1\"\nclient_secret = \"s3cret\"\n"
    );
    let v = load_env(&text, dir.path(), &[]).unwrap();
    let t = token_spec(&v);
    assert_eq!(t.kind, "entra_secret");
    assert_eq!(t.identity, "app-1");
    assert_eq!(t.scope, "https://cognitiveservices.azure.com/.default");
    let SourceSpec::ClientSecret {
        token_url, basic, ..
    } = &t.source
    else {
        panic!("{t:?}")
    };
    assert_eq!(
        token_url,
        "https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/token"
    );
    assert!(!basic, "Entra takes the secret in the form");
    assert!(!format!("{v:?}").contains("s3cret"));
}

#[test]
fn entra_sections_name_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let e = auth_problems(
        "type = \"entra_secret\"\nclient_id = \"a\"\nclient_secret = \"s\"",
        d,
        &[],
    );
    assert!(
        e.contains("backends[0].auth.tenant_id") && e.contains("token_url"),
        "{e}"
    );
    let e = auth_problems(
        "type = \"entra_secret\"\ntenant_id = \"t/../evil?\"\nclient_id = \"a\"\nclient_secret = \"s\"",
        d,
        &[],
    );
    assert!(e.contains("not a tenant id"), "{e}");
    let e = auth_problems(
        "type = \"entra_secret\"\ntoken_url = \"http://idp.example/token\"\nclient_id = \"a\"\nclient_secret = \"s\"",
        d,
        &[],
    );
    assert!(
        e.contains("backends[0].auth.token_url") && e.contains("must use https"),
        "{e}"
    );
    let e = auth_problems(
        "type = \"entra_secret\"\ntoken_url = \"https://idp.example/token\"\ntenant_id = \"t\"\nclient_id = \"a\"\nclient_secret = \"s\"",
        d,
        &[],
    );
    assert!(e.contains("not both"), "{e}");
    let e = auth_problems(
        "type = \"entra_secret\"\ntoken_url = \"https://app:hunter2@idp.example/token\"\nclient_id = \"a\"\nclient_secret = \"s\"",
        d,
        &[],
    );
    assert!(
        e.contains("user name or password") && !e.contains("hunter2"),
        "{e}"
    );
    let e = auth_problems(
        "type = \"entra_secret\"\ntoken_url = \"http://169.254.169.254/token\"\nclient_id = \"a\"\nclient_secret = \"s\"",
        d,
        &[],
    );
    assert!(e.contains("plain http only to localhost)"), "{e}");
    for tenant in ["..", ".", "a..b", "-"] {
        let e = auth_problems(
            &format!("type = \"entra_secret\"\ntenant_id = \"{tenant}\"\nclient_id = \"a\"\nclient_secret = \"s\""),
            d,
            &[],
        );
        assert!(e.contains("not a tenant id"), "{tenant}: {e}");
    }
    let e = auth_problems(
        "type = \"entra_secret\"\ntenant_id = \"t\"\nclient_id = \"a\"\nclient_secret = \"s\"\ntoken_endpoint_auth_method = \"private_key_jwt\"",
        d,
        &[],
    );
    assert!(e.contains("token_endpoint_auth_method"), "{e}");
    let e = auth_problems(
        "type = \"entra_secret\"\ntenant_id = \"t\"\nclient_id = \"a\"",
        d,
        &[],
    );
    assert!(
        e.contains("`client_secret` or `client_secret_file` is required"),
        "{e}"
    );
    let e = auth_problems(
        "type = \"entra_certificate\"\ntenant_id = \"t\"\nclient_id = \"a\"\ncertificate_file = \"missing.pem\"",
        d,
        &[],
    );
    assert!(
        e.contains("backends[0].auth.certificate_file") && e.contains("cannot read"),
        "{e}"
    );
    std::fs::write(
        d.join("bad.pem"),
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let e = auth_problems(
        "type = \"entra_certificate\"\ntenant_id = \"t\"\nclient_id = \"a\"\ncertificate_file = \"bad.pem\"",
        d,
        &[],
    );
    assert!(e.contains("certificate_file"), "{e}");
}

#[test]
fn entra_certificate_checks_the_key_and_algorithm() {
    let dir = tempfile::tempdir().unwrap();
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let cert = rcgen::CertificateParams::new(vec!["gw".into()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    std::fs::write(
        dir.path().join("gw.pem"),
        format!("{}{}", cert.pem(), key.serialize_pem()),
    )
    .unwrap();
    let base = "type = \"entra_certificate\"\ntenant_id = \"t\"\nclient_id = \"a\"\ncertificate_file = \"gw.pem\"";
    let text = format!("{MINIMAL}[backends.auth]\n{base}\n");
    let v = load_env(&text, dir.path(), &[]).unwrap();
    assert_eq!(token_spec(&v).kind, "entra_certificate");
    let e = auth_problems(&format!("{base}\nalgorithm = \"PS256\""), dir.path(), &[]);
    assert!(
        e.contains("backends[0].auth.algorithm") && e.contains("signs ES256"),
        "{e}"
    );
    let e = auth_problems(&format!("{base}\nalgorithm = \"HS256\""), dir.path(), &[]);
    assert!(e.contains("'HS256' is not one of"), "{e}");
}

#[test]
fn managed_identity_follows_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let text = format!("{MINIMAL}[backends.auth]\ntype = \"managed_identity\"\n");
    let v = load_env(&text, d, &[]).unwrap();
    let t = token_spec(&v);
    assert_eq!(t.identity, "system");
    assert!(
        matches!(&t.source, SourceSpec::Imds { endpoint, selector: None }
        if endpoint == "http://169.254.169.254/metadata/identity/oauth2/token")
    );
    let text =
        format!("{MINIMAL}[backends.auth]\ntype = \"managed_identity\"\nobject_id = \"oid-1\"\n");
    let env = [
        ("IDENTITY_ENDPOINT", "http://localhost:42356/msi/token"),
        ("IDENTITY_HEADER", "hdr"),
    ];
    let v = load_env(&text, d, &env).unwrap();
    let t = token_spec(&v);
    assert_eq!(t.identity, "object_id=oid-1");
    assert!(
        matches!(&t.source, SourceSpec::AppService { endpoint, selector: Some(("principal_id", id)), .. }
            if endpoint == "http://localhost:42356/msi/token" && id == "oid-1"),
        "{t:?}"
    );
    let e = auth_problems(
        "type = \"managed_identity\"\nclient_id = \"a\"\nmi_res_id = \"b\"",
        d,
        &[],
    );
    assert!(e.contains("at most one of"), "{e}");
    // IMDS calls the resource id msi_res_id
    let text =
        format!("{MINIMAL}[backends.auth]\ntype = \"managed_identity\"\nmi_res_id = \"/sub/x\"\n");
    let v = load_env(&text, d, &[]).unwrap();
    assert!(matches!(
        &token_spec(&v).source,
        SourceSpec::Imds {
            selector: Some(("msi_res_id", _)),
            ..
        }
    ));
    // hosts whose protocol is not supported are named, not silently sent to IMDS
    let mi = "type = \"managed_identity\"";
    let arc = [
        (
            "IDENTITY_ENDPOINT",
            "http://localhost:40342/metadata/identity/oauth2/token",
        ),
        ("IMDS_ENDPOINT", "http://localhost:40342"),
    ];
    let e = auth_problems(mi, d, &arc);
    assert!(e.contains("Azure Arc"), "{e}");
    let fabric = [
        (
            "IDENTITY_ENDPOINT",
            "https://localhost:2377/metadata/identity/oauth2/token",
        ),
        ("IDENTITY_HEADER", "h"),
        ("IDENTITY_SERVER_THUMBPRINT", "ab"),
    ];
    let e = auth_problems(mi, d, &fabric);
    assert!(e.contains("Service Fabric"), "{e}");
}

#[test]
fn workload_identity_reads_the_aks_variables() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("token"), "eyJ...").unwrap();
    let file = d.join("token").display().to_string();
    let env = [
        ("AZURE_CLIENT_ID", "wi-client"),
        ("AZURE_TENANT_ID", "tenant-1"),
        ("AZURE_AUTHORITY_HOST", "https://login.microsoftonline.us/"),
        ("AZURE_FEDERATED_TOKEN_FILE", file.as_str()),
    ];
    let text = format!("{MINIMAL}[backends.auth]\ntype = \"workload_identity\"\n");
    let v = load_env(&text, d, &env).unwrap();
    let t = token_spec(&v);
    assert_eq!(t.identity, "wi-client");
    assert!(
        matches!(&t.source, SourceSpec::Federated { token_url, token_file, .. }
            if token_url == "https://login.microsoftonline.us/tenant-1/oauth2/v2.0/token"
            && token_file.ends_with("token")),
        "{t:?}"
    );
    let e = auth_problems("type = \"workload_identity\"", d, &[]);
    assert!(
        e.contains("backends[0].auth.client_id") && e.contains("AZURE_CLIENT_ID"),
        "{e}"
    );
    assert!(
        e.contains("AZURE_FEDERATED_TOKEN_FILE") && e.contains("AZURE_TENANT_ID"),
        "{e}"
    );
}

#[test]
fn hardening_keys_are_checked_with_their_paths() {
    let text = r#"
[server]
max_body_bytes = 1000
max_buffered_body_bytes = 999
trusted_proxies = ["10.0.0.0/8", "::1", "not-an-ip"]

[[clients]]
id = "a"
deployments = ["*"]
operations = ["*"]
max_concurrent_requests = 0

[[backends]]
name = "sim"
url = "http://127.0.0.1:9"
deployments = { "gpt-4o" = "gpt-4o" }
pass_response_headers = ["set-cookie", "transfer-encoding", "bad header"]
"#;
    let err = load(text).unwrap_err();
    let paths: Vec<&str> = err.problems.iter().map(|p| p.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "server.max_buffered_body_bytes",
            "server.trusted_proxies[2]",
            "backends[0].pass_response_headers[1]",
            "backends[0].pass_response_headers[2]",
            "clients[0].max_concurrent_requests",
        ],
        "{err}"
    );
    assert!(err.problems.iter().all(|p| p.line.is_some()), "{err}");
    let ok = load(&format!(
        "{MINIMAL}\n[server]\ntrusted_proxies = [\"192.168.1.7\", \"fd00::/8\"]\n"
    ))
    .unwrap();
    assert_eq!(ok.trusted_proxies.len(), 2);
    assert!(ok.trusted_proxies[0].contains(&"192.168.1.7".parse::<std::net::IpAddr>().unwrap()));
    // The default budget is sized for the machine, never below one largest body.
    assert!(ok.max_buffered_body_bytes >= 64 * 1024 * 1024);
    assert!(ok.max_buffered_body_bytes <= 1024 * 1024 * 1024);
}

#[test]
fn routing_keys_parse_with_defaults_and_bad_values_are_named_with_lines() {
    let v = load(MINIMAL).unwrap();
    let r = &v.config.routing;
    assert_eq!(r.max_attempts, 3);
    assert_eq!(r.retry_budget.0, std::time::Duration::from_secs(30));
    assert!(r.headroom);
    assert_eq!(r.breaker.consecutive_failures, 5);
    let b = &v.config.backends[0];
    assert_eq!(
        b.retry_on,
        crate::config::routing::default_retry_on(),
        "502, 503, 504 and first-byte timeouts by default"
    );
    assert!(b.health.is_none() && b.max_concurrent.is_none() && b.timeouts.total.is_none());

    let text = r#"
[routing]
max_attempts = 0
default_cooldown = "10m"
queue_wait = "2m"

[routing.breaker]
failure_rate = 1.5
open_for = "10m"

[[backends]]
name = "sim"
url = "http://127.0.0.1:9"
deployments = { "gpt-4o" = "gpt-4o" }
max_concurrent = 0
timeouts = { first_byte = "10s", total = "5s" }
health = { path = "models", interval = "1s", timeout = "2s" }
"#;
    let err = load(text).unwrap_err();
    let paths: Vec<&str> = err.problems.iter().map(|p| p.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "routing.max_attempts",
            "routing.default_cooldown",
            "routing.queue_wait",
            "routing.breaker.failure_rate",
            "routing.breaker.open_for",
            "backends[0].max_concurrent",
            "backends[0].timeouts.total",
            "backends[0].health.timeout",
            "backends[0].health.path",
        ],
        "{err}"
    );
    assert!(err.problems.iter().all(|p| p.line.is_some()), "{err}");
    let unknown = load(&format!("{MINIMAL}retry_on = [\"418\"]\n")).unwrap_err();
    assert!(unknown.to_string().contains("retry_on"), "{unknown}");
}

/// A certificate and key (rcgen, ECDSA P-256) written into `dir`: (cert path, key path).
fn tls_files(dir: &Path, name: &str) -> (String, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".into()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let (c, k) = (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key")),
    );
    std::fs::write(&c, cert.pem()).unwrap();
    std::fs::write(&k, key.serialize_pem()).unwrap();
    (c.display().to_string(), k.display().to_string())
}

#[test]
fn tls_sections_are_checked_file_by_file_and_key_by_key() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = tls_files(dir.path(), "server");
    let (_, other_key) = tls_files(dir.path(), "other");
    let (ca, _) = tls_files(dir.path(), "ca");
    let paths = |text: String| -> Vec<(String, String)> {
        problems_of(&format!("{MINIMAL}{text}"))
            .into_iter()
            .map(|p| (p.path, p.message))
            .collect()
    };
    // A complete section loads.
    let ok = load(&format!(
        "{MINIMAL}[server.tls]\ncert_file = \"{cert}\"\nkey_file = \"{key}\"\nclient_auth = \"required\"\nclient_ca_file = \"{ca}\"\n[[clients]]\nid = \"batch\"\ndeployments = [\"*\"]\noperations = [\"*\"]\ncertificates = [{{ san_dns = \"Batch.Internal\" }}, {{ sha256 = \"{}\" }}]\n",
        "AB:".repeat(31) + "AB"
    ))
    .unwrap();
    let tls = ok.server_tls.unwrap();
    assert!(tls.identity.is_some() && tls.client_ca.is_some());
    assert_eq!(
        ok.cert_bindings[0],
        [
            tls::CertMatcher::SanDns("batch.internal".into()),
            tls::CertMatcher::Sha256("ab".repeat(32))
        ]
    );
    let cases = [
        (format!("[server.tls]\ncert_file = \"{cert}\"\n"), "server.tls.key_file", "required with cert_file"),
        (format!("[server.tls]\ncert_file = \"{cert}\"\nkey_file = \"{other_key}\"\n"), "server.tls.key_file", "does not belong to the certificate"),
        (format!("[server.tls]\ncert_file = \"{}/missing.pem\"\nkey_file = \"{key}\"\n", dir.path().display()), "server.tls.cert_file", "cannot read"),
        (format!("[server.tls]\ncert_file = \"{key}\"\nkey_file = \"{key}\"\n"), "server.tls.cert_file", "no certificate"),
        (format!("[server.tls]\ncert_file = \"{cert}\"\nkey_file = \"{key}\"\nclient_auth = \"optional\"\n"), "server.tls.client_ca_file", "required"),
        (format!("[server.tls]\ncert_file = \"{cert}\"\nkey_file = \"{key}\"\nclient_auth = \"optional\"\nclient_ca_file = \"{ca}\"\ncrl_files = [\"{key}\"]\n"), "server.tls.crl_files[0]", "no CRL"),
        (format!("[server.tls]\nclient_ca_file = \"{ca}\"\nforwarded_cert = {{ header = \"x-client-cert\", format = \"pem-urlencoded\", trusted_proxies = [\"10.0.0.0/33\"] }}\n"), "server.tls.forwarded_cert.trusted_proxies[0]", "not an IP address"),
        (format!("[admin.tls]\nclient_ca_file = \"{ca}\"\n"), "admin.tls", "cert_file and key_file are required"),
        ("[[clients]]\nid = \"a\"\ncertificates = [{ san_dns = \"x\" }]\n".to_owned(), "clients[0].certificates", "no listener verifies client certificates"),
        (format!("[server.tls]\ncert_file = \"{cert}\"\nkey_file = \"{key}\"\nclient_auth = \"optional\"\nclient_ca_file = \"{ca}\"\n[[clients]]\nid = \"a\"\ncertificates = [{{ san_dns = \"x\", subject_cn = \"y\" }}]\n"), "clients[0].certificates[0]", "exactly one of"),
        (format!("[server.tls]\ncert_file = \"{cert}\"\nkey_file = \"{key}\"\nclient_auth = \"optional\"\nclient_ca_file = \"{ca}\"\n[[clients]]\nid = \"a\"\ncertificates = [{{ sha256 = \"abc\" }}]\n"), "clients[0].certificates[0].sha256", "where a SHA-256 thumbprint has 64"),
        (format!("[server.tls]\ncert_file = \"{cert}\"\nkey_file = \"{key}\"\nclient_auth = \"optional\"\nclient_ca_file = \"{ca}\"\n[[clients]]\nid = \"a\"\ncertificates = [{{ san_uri = \"spiffe://x\" }}]\n[[clients]]\nid = \"b\"\ncertificates = [{{ san_uri = \"spiffe://x\" }}]\n"), "clients[1].certificates[0].san_uri", "already bound by client 'a'"),
    ];
    for (text, path, message) in cases {
        let found = paths(text.clone());
        assert!(
            found.iter().any(|(p, m)| p == path && m.contains(message)),
            "expected {path}: {message} for\n{text}\ngot {found:?}"
        );
    }
}

#[test]
fn telemetry_is_off_without_an_endpoint_and_resolves_the_traces_url() {
    let v = load(MINIMAL).unwrap();
    assert!(v.telemetry.is_none(), "no [telemetry]: off");
    let v = load(&format!("{MINIMAL}\n[telemetry]\nsampling_ratio = 0.5\n")).unwrap();
    assert!(v.telemetry.is_none(), "no otlp_endpoint: off");
    for (given, url) in [
        ("http://127.0.0.1:4318", "http://127.0.0.1:4318/v1/traces"),
        ("http://127.0.0.1:4318/", "http://127.0.0.1:4318/v1/traces"),
        (
            "https://otel.example/base",
            "https://otel.example/base/v1/traces",
        ),
        (
            "https://otel.example/v1/traces",
            "https://otel.example/v1/traces",
        ),
    ] {
        let v = load(&format!(
            "{MINIMAL}\n[telemetry]\notlp_endpoint = \"{given}\"\n"
        ))
        .unwrap();
        let t = v.telemetry.unwrap();
        assert_eq!(t.endpoint, url);
        assert_eq!(
            (t.service_name.as_str(), t.sampling_ratio),
            ("portcullis", 1.0)
        );
    }
}

#[test]
fn telemetry_problems_name_their_keys_and_never_a_header_value() {
    let text = format!(
        "{MINIMAL}\n[telemetry]\notlp_endpoint = \"http://collector.example:4318\"\nsampling_ratio = 1.5\n[telemetry.headers]\nx-api-key = \"otlp-secret-value-123\"\n"
    );
    let err = load(&text).unwrap_err();
    let paths: Vec<&str> = err.problems.iter().map(|p| p.path.as_str()).collect();
    assert_eq!(
        paths,
        ["telemetry.sampling_ratio", "telemetry.headers"],
        "{err}"
    );
    assert!(err.problems[1].message.contains("https"), "{err}");
    assert_eq!(err.problems[0].line, Some(9), "{err}");
    assert!(!err.to_string().contains("otlp-secret-value-123"));
    // The same headers over https, or over http to loopback, are fine, and stay redacted.
    for endpoint in [
        "https://collector.example",
        "http://127.0.0.1:4318",
        "http://localhost:4318",
    ] {
        let ok = text
            .replace("http://collector.example:4318", endpoint)
            .replace("1.5", "0.25");
        let t = load(&ok).unwrap().telemetry.unwrap();
        assert_eq!(t.headers[0].0.as_str(), "x-api-key");
        assert_eq!(t.headers[0].1.expose(), "otlp-secret-value-123");
        assert!(!format!("{t:?}").contains("otlp-secret-value-123"));
    }
    for (key, value, path) in [
        (
            "otlp_endpoint",
            "\"collector:4318\"",
            "telemetry.otlp_endpoint",
        ),
        (
            "otlp_endpoint",
            "\"ftp://collector\"",
            "telemetry.otlp_endpoint",
        ),
        (
            "otlp_endpoint",
            "\"http://u:p@collector\"",
            "telemetry.otlp_endpoint",
        ),
        (
            "otlp_endpoint",
            "\"http://collector/?a=b\"",
            "telemetry.otlp_endpoint",
        ),
        ("sampling_ratio", "-0.1", "telemetry.sampling_ratio"),
        ("service_name", "\"\"", "telemetry.service_name"),
        ("batch_delay", "\"0s\"", "telemetry.batch_delay"),
        ("max_queue", "0", "telemetry.max_queue"),
        ("sample_ratio", "1.0", "telemetry.sample_ratio"),
    ] {
        let mut text = format!("{MINIMAL}\n[telemetry]\n{key} = {value}\n");
        if key != "otlp_endpoint" {
            text.push_str("otlp_endpoint = \"http://127.0.0.1:4318\"\n");
        }
        let err = load(&text).unwrap_err();
        assert_eq!(err.problems[0].path, path, "{key} = {value}: {err}");
    }
}
