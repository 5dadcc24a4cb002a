//! `portcullis demo`: the gateway in front of the embedded simulated Azure OpenAI backend,
//! on loopback, with no network, files or Azure account needed.
//!
//! The demo configuration is ordinary TOML run through the same loader and validation as
//! `serve`, so what the demo shows is what a deployment runs. Both identities are real: the
//! client holds a JWT and an API key, and the gateway authenticates to the backend as an
//! Entra-style app (`entra_secret` against the embedded issuer's token endpoint); the
//! simulated backend verifies every bearer token it receives, as Azure OpenAI does.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use crate::app::{self, Running};
use crate::config;
use crate::sim::issuer::{DemoIssuer, DEMO_GATEWAY_CLIENT};
use crate::sim::{BearerCheck, SimHandle, SimOptions};

/// Demo settings.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Gateway port on 127.0.0.1 (0 = any free port). 8080 falls back to a free port when taken.
    pub port: u16,
    /// Delay between streamed tokens, so streaming is visible in a terminal.
    pub token_latency: Duration,
}

/// A running demo: the simulator, the issuer and the gateway.
pub struct Demo {
    pub sim: SimHandle,
    pub issuer: DemoIssuer,
    pub gateway: Running,
    /// A JWT from the demo issuer, identifying client `demo-app`.
    pub client_jwt: String,
    /// An API key issued to client `demo-app`.
    pub client_key: String,
    /// The admin token (every scope) for the dashboard and the admin API.
    pub admin_token: String,
}

/// The audience demo tokens are issued for.
pub const DEMO_AUDIENCE: &str = "api://portcullis-demo";
/// The demo's one client.
pub const DEMO_CLIENT: &str = "demo-app";

/// The audience of the backend's tokens (Azure OpenAI's, as the default scope names it).
pub const BACKEND_AUDIENCE: &str = "https://cognitiveservices.azure.com";

/// The demo's configuration text, pointing at the simulator and the demo issuer.
pub fn demo_config(
    sim_url: &str,
    issuer: &DemoIssuer,
    store_secret: &str,
    admin_token: &str,
    listen: SocketAddr,
) -> String {
    let issuer_url = issuer.issuer();
    let token_url = issuer.token_url();
    let client_secret = issuer.client_secret();
    format!(
        r#"# Portcullis demo configuration (generated)
[server]
listen = "{listen}"
drain_timeout = "5s"

[admin]
listen = "127.0.0.1:0"

[[admin.tokens]]
name = "demo-operator"
token = "{admin_token}"
scopes = ["read", "keys", "config", "tokens"]

[audit]
path = "-"

[store]
url = "sqlite::memory:"
key_hmac_secret = "{store_secret}"

[[issuers]]
name = "demo"
issuer = "{issuer_url}"
audiences = ["{DEMO_AUDIENCE}"]
algorithms = ["ES256"]

[[clients]]
id = "{DEMO_CLIENT}"
jwt = [{{ issuer = "demo", claims = {{ azp = "{DEMO_CLIENT}" }} }}]
deployments = ["*"]
operations = ["*"]

[[backends]]
name = "sim-eastus"
url = "{sim_url}"
type = "azure"
api_version = "2024-10-21"
priority = 0
deployments = {{ "gpt-4o" = "gpt-4o", "gpt-4o-mini" = "gpt-4o-mini", "text-embedding-3-small" = "text-embedding-3-small" }}
[backends.auth]
type = "entra_secret"
token_url = "{token_url}"
client_id = "{DEMO_GATEWAY_CLIENT}"
client_secret = "{client_secret}"
"#
    )
}

/// Start the simulator and the gateway.
pub async fn start(opts: &DemoOptions) -> Result<Demo, Box<dyn std::error::Error + Send + Sync>> {
    let issuer = DemoIssuer::start().await?;
    let sim = SimHandle::start(SimOptions {
        bearer: Some(BearerCheck {
            jwks_uri: format!("{}/jwks", issuer.issuer()),
            audience: BACKEND_AUDIENCE.to_owned(),
            issuer: Some(issuer.issuer()),
        }),
        token_latency: opts.token_latency,
        ..SimOptions::default()
    })
    .await?;
    let mut listen: SocketAddr = ([127, 0, 0, 1], opts.port).into();
    if opts.port == 8080 && std::net::TcpListener::bind(listen).is_err() {
        listen.set_port(0);
    }
    let store_secret = format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    );
    let admin_token = format!("pcl-admin-{}", uuid::Uuid::new_v4().simple());
    let text = demo_config(&sim.url(), &issuer, &store_secret, &admin_token, listen);
    let validated = config::load_str(&text, "demo configuration", std::path::Path::new("."))?;
    let gateway = app::start(&validated).await?;
    gateway
        .gateway
        .wait_issuer_keys(Duration::from_secs(5))
        .await;
    // The backend token is acquired in the background; the first request should find it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let state = gateway.gateway.readiness();
        if state.is_ready() {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            return Err(format!(
                "the demo gateway is not ready: {}",
                state.reasons().join("; ")
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let client_jwt = issuer.sign(
        DEMO_AUDIENCE,
        Duration::from_secs(24 * 3600),
        serde_json::json!({ "sub": "demo-user", "azp": DEMO_CLIENT, "scp": "chat" }),
    )?;
    let keys = gateway
        .keys()
        .ok_or("the demo configuration enables API keys")?;
    let (_, key) = keys
        .admin
        .create(
            DEMO_CLIENT,
            Some("demo"),
            Some(Duration::from_secs(24 * 3600)),
        )
        .await?;
    keys.api_keys.reload().await?;
    let client_key = key.expose().to_owned();
    Ok(Demo {
        sim,
        issuer,
        gateway,
        client_jwt,
        client_key,
        admin_token,
    })
}

/// The lines printed for the user: shell exports and a ready curl.
pub fn instructions(demo: &Demo) -> String {
    let gw = format!("http://{}", demo.gateway.addr);
    let key = &demo.client_key;
    let jwt = &demo.client_jwt;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "Portcullis demo: gateway on {gw}, in front of a simulated Azure OpenAI backend at {}.",
        demo.sim.url()
    );
    if let Some(a) = demo.gateway.admin_addr {
        let _ = writeln!(s, "Metrics: http://{a}/metrics   Health: {gw}/health");
        let _ = writeln!(
            s,
            "Dashboard: http://{a}/dashboard/ (sign in with the admin token {})",
            demo.admin_token
        );
    }
    let _ = writeln!(s, "Deployments: gpt-4o, gpt-4o-mini, text-embedding-3-small. Audit lines follow below, one per request.");
    let _ = writeln!(
        s,
        "Client '{DEMO_CLIENT}' holds an API key issued by the gateway and a JWT from the demo issuer at {}; requests without either are refused.",
        demo.issuer.issuer()
    );
    let _ = writeln!(
        s,
        "The gateway authenticates to the backend as app '{DEMO_GATEWAY_CLIENT}' with a token from the issuer's token endpoint (entra_secret); the backend verifies every token. No client holds a backend key."
    );
    let _ = writeln!(
        s,
        "\n# Paste into a shell, then use any OpenAI or Azure OpenAI SDK:"
    );
    let _ = writeln!(s, "export OPENAI_BASE_URL={gw}/v1");
    let _ = writeln!(s, "export OPENAI_API_KEY={key}");
    let _ = writeln!(s, "export AZURE_OPENAI_ENDPOINT={gw}");
    let _ = writeln!(s, "export AZURE_OPENAI_API_KEY={key}");
    let _ = writeln!(s, "export OPENAI_API_VERSION=2024-10-21");
    let _ = writeln!(s, "export PORTCULLIS_DEMO_JWT={jwt}");
    let _ = writeln!(
        s,
        "\n# A streaming chat completion, authenticated with the JWT:"
    );
    let _ = writeln!(
        s,
        "curl -N {gw}/v1/chat/completions -H \"Authorization: Bearer $PORTCULLIS_DEMO_JWT\" -H 'Content-Type: application/json' -d '{{\"model\":\"gpt-4o\",\"stream\":true,\"messages\":[{{\"role\":\"user\",\"content\":\"Hello\"}}]}}'"
    );
    let _ = writeln!(s, "\n# Press Ctrl-C to stop.");
    s
}
