//! The `portcullis` binary: a thin CLI over the library (`serve`, `check`, `reload`,
//! `demo`, `keys`, `usage`, `sidecar`, `healthcheck`).

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use portcullis::identify::api_key::{self, KeyAdmin};
use portcullis::reload::client as reload;
use portcullis::store::{self, KeyRecord};
use portcullis::{app, config, demo, listener, report, sidecar};

/// mimalloc: measurably cheaper than glibc malloc for the many small, short-lived
/// allocations of request handling (see bench/RESULTS.md). Built with `no_thp`: otherwise
/// it asks for transparent huge pages on its eagerly committed arena, and the first few
/// allocations of each thread make 2 MiB resident — 12 MB of an idle gateway's 25 MB RSS.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "portcullis",
    version,
    about = "Identity-aware gateway for Azure OpenAI and OpenAI-compatible APIs"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway. SIGHUP, a change to the configuration file and `portcullis reload`
    /// reload the configuration without dropping a request.
    Serve {
        /// Configuration file (TOML).
        #[arg(long, short, default_value = "portcullis.toml")]
        config: PathBuf,
        /// Do not reload when the configuration file changes (SIGHUP and
        /// `portcullis reload` still do).
        #[arg(long)]
        no_watch: bool,
    },
    /// Ask a running gateway to reload its configuration file (POST /admin/reload on the
    /// admin listener named by [admin] listen, with [admin] token), and print the outcome:
    /// exit code 0 when applied, 1 when rejected (the running configuration is kept).
    Reload {
        #[arg(long, short, default_value = "portcullis.toml")]
        config: PathBuf,
        /// The admin listener's address (host:port), instead of [admin] listen.
        #[arg(long)]
        admin: Option<String>,
    },
    /// Validate a configuration file and print every problem (exit code 1 if any).
    Check {
        #[arg(long, short, default_value = "portcullis.toml")]
        config: PathBuf,
    },
    /// Run the gateway in front of an embedded simulated Azure OpenAI backend.
    Demo {
        /// Port on 127.0.0.1 (0 = any free port).
        #[arg(long, default_value_t = 8080)]
        port: u16,
        /// Milliseconds between streamed tokens.
        #[arg(long, default_value_t = 40)]
        token_latency_ms: u64,
    },
    /// Manage gateway-issued API keys, in the store named by the configuration's [store].
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Report usage (requests, tokens, cost) recorded in the store named by [store] url.
    Usage(report::UsageArgs),
    /// Run as a sidecar configured by environment variables alone (API_BASE_URL, HOST,
    /// PORT, AZURE_CLIENT_ID, AZURE_TENANT_ID, AZURE_CERTIFICATE_PATH, AZURE_SCOPE, ...;
    /// see the README): every path and method goes to API_BASE_URL unchanged, with the
    /// application's credential removed and the backend token added. Listens on 127.0.0.1
    /// unless told otherwise. With --config, runs the gateway that file describes, client
    /// authentication included, as `serve` does.
    #[command(after_help = sidecar_help())]
    Sidecar {
        /// A configuration file: its clients must authenticate (as with `serve`).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Allow a HOST other than loopback (PORTCULLIS_SIDECAR_ALLOW_NON_LOOPBACK=true):
        /// anyone who reaches the port uses the backend credential.
        #[arg(long)]
        allow_non_loopback: bool,
    },
    /// Exit 0 when the gateway answers its health check with 200, 1 otherwise (for
    /// container HEALTHCHECKs and exec probes, where no curl is installed).
    Healthcheck {
        /// Default: http://127.0.0.1:$PORT/health (PORT as sidecar mode reads it, 8080
        /// when unset).
        #[arg(long)]
        url: Option<String>,
    },
}

fn sidecar_help() -> String {
    let mut help = String::from("Environment:\n");
    for (name, what) in sidecar::VARIABLES {
        help.push_str(&format!("  {name:<38} {what}\n"));
    }
    help
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Issue a key for a client. The key is printed once, alone, on standard output.
    Create {
        #[arg(long, short, default_value = "portcullis.toml")]
        config: PathBuf,
        /// A [[clients]] id.
        #[arg(long)]
        client: String,
        /// Lifetime, e.g. 90d (default: the key never expires).
        #[arg(long, value_parser = humantime::parse_duration)]
        expires: Option<Duration>,
        /// A label shown by `keys list`.
        #[arg(long)]
        name: Option<String>,
    },
    /// List keys (never the keys themselves).
    List {
        #[arg(long, short, default_value = "portcullis.toml")]
        config: PathBuf,
        /// Only this client's keys.
        #[arg(long)]
        client: Option<String>,
        /// A JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a key by id; running gateways refuse it at their next poll.
    Revoke {
        #[arg(long, short, default_value = "portcullis.toml")]
        config: PathBuf,
        /// The key's id, as printed by `keys create` and `keys list`.
        id: String,
    },
    /// Issue a new key for a client; its other keys keep working until the grace ends.
    Rotate {
        #[arg(long, short, default_value = "portcullis.toml")]
        config: PathBuf,
        /// A [[clients]] id.
        #[arg(long)]
        client: String,
        /// How long the client's older keys keep working.
        #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
        grace: Duration,
        /// Lifetime of the new key, e.g. 90d (default: never expires).
        #[arg(long, value_parser = humantime::parse_duration)]
        expires: Option<Duration>,
        /// A label for the new key.
        #[arg(long)]
        name: Option<String>,
    },
}

impl KeysCommand {
    fn config(&self) -> &PathBuf {
        match self {
            KeysCommand::Create { config, .. }
            | KeysCommand::List { config, .. }
            | KeysCommand::Revoke { config, .. }
            | KeysCommand::Rotate { config, .. } => config,
        }
    }

    /// The client a key is issued to, which must be in `[[clients]]`.
    fn issued_to(&self) -> Option<&str> {
        match self {
            KeysCommand::Create { client, .. } | KeysCommand::Rotate { client, .. } => Some(client),
            KeysCommand::List { .. } | KeysCommand::Revoke { .. } => None,
        }
    }
}

fn init_logs(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("PORTCULLIS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Check { config } = &cli.command {
        return match config::load_file(config) {
            Ok(v) => {
                println!(
                    "{}: OK ({} backend{})",
                    config.display(),
                    v.config.backends.len(),
                    if v.config.backends.len() == 1 {
                        ""
                    } else {
                        "s"
                    }
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprint!("{e}");
                ExitCode::FAILURE
            }
        };
    }
    // `keys` and `usage` print for people and scripts: only warnings and errors go to the log.
    init_logs(
        if matches!(cli.command, Command::Keys { .. } | Command::Usage(_)) {
            "warn"
        } else {
            "info"
        },
    );
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        match cli.command {
            Command::Serve { config, no_watch } => serve(config, !no_watch).await,
            Command::Reload { config, admin } => reload(&config, admin.as_deref()).await,
            Command::Demo {
                port,
                token_latency_ms,
            } => run_demo(port, token_latency_ms).await,
            Command::Keys { command } => match keys(command).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(message) => {
                    eprint!("{message}");
                    ExitCode::FAILURE
                }
            },
            Command::Usage(args) => match report::run(&args, report::now_ms()).await {
                Ok(text) => {
                    print!("{text}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            },
            Command::Sidecar {
                config: Some(config),
                ..
            } => serve(config, true).await,
            Command::Sidecar {
                config: None,
                allow_non_loopback,
            } => run_sidecar(sidecar::Options { allow_non_loopback }).await,
            Command::Healthcheck { url } => healthcheck(url).await,
            Command::Check { .. } => ExitCode::SUCCESS,
        }
    })
}

async fn serve(path: PathBuf, watch: bool) -> ExitCode {
    // Registered first: from here on SIGHUP reloads instead of ending the process.
    #[cfg(unix)]
    let hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: cannot handle SIGHUP: {e}");
            return ExitCode::FAILURE;
        }
    };
    let validated = match config::load_file(&path) {
        Ok(v) => v,
        Err(e) => {
            eprint!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let opts = app::StartOptions {
        config_file: Some(path),
        watch,
    };
    let running = match app::start_with(&validated, opts).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    #[cfg(unix)]
    let hangups = portcullis::reload::on_hangup(hangup, running.reloader());
    listener::shutdown_signal().await;
    #[cfg(unix)]
    hangups.abort();
    tracing::info!("shutdown signal received; draining");
    running.shutdown();
    running.wait().await;
    ExitCode::SUCCESS
}

/// `portcullis sidecar` without a file: the environment's configuration, until SIGTERM.
async fn run_sidecar(opts: sidecar::Options) -> ExitCode {
    let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
    let validated = match sidecar::from_env(&|name| std::env::var(name).ok(), opts, &cwd) {
        Ok(v) => v,
        Err(e) => {
            eprint!("{e}");
            return ExitCode::FAILURE;
        }
    };
    if !validated.listen.ip().is_loopback() {
        tracing::warn!(listen = %validated.listen, "the sidecar listens on a non-loopback address and authenticates no client: whoever reaches it uses the backend credential");
    }
    let running = match app::start(&validated).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let credential = match validated.backend_auth.first() {
        Some(config::ResolvedAuth::Token(t)) => t.kind,
        _ => "none",
    };
    tracing::info!(upstream = %validated.config.backends[0].url, credential, "sidecar mode: every request goes to the upstream unchanged, with the backend credential added");
    listener::shutdown_signal().await;
    tracing::info!("shutdown signal received; draining");
    running.shutdown();
    running.wait().await;
    ExitCode::SUCCESS
}

/// `portcullis healthcheck`: GET the health URL, exit 0 on 200.
async fn healthcheck(url: Option<String>) -> ExitCode {
    let url = url.unwrap_or_else(|| {
        let port = std::env::var("PORT").unwrap_or_else(|_| "8080".into());
        format!("http://127.0.0.1:{}/health", port.trim())
    });
    let client = match reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(5))
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    match client.get(&url).send().await {
        Ok(r) if r.status() == reqwest::StatusCode::OK => ExitCode::SUCCESS,
        Ok(r) => {
            eprintln!("unhealthy: {url} answered {}", r.status());
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("unhealthy: {url}: {}", portcullis::proxy::error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// `portcullis reload`: POST /admin/reload to the gateway the configuration describes.
async fn reload(path: &std::path::Path, admin: Option<&str>) -> ExitCode {
    let target = match reload::admin_target(path, admin) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    match reload::request(&target).await {
        Ok(outcome) => {
            print!("{}", reload::describe(&outcome));
            if outcome.applied() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run_demo(port: u16, token_latency_ms: u64) -> ExitCode {
    let opts = demo::DemoOptions {
        port,
        token_latency: Duration::from_millis(token_latency_ms),
    };
    let d = match demo::start(&opts).await {
        Ok(d) => d,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    print!("{}", demo::instructions(&d));
    use std::io::Write as _;
    let _ = std::io::stdout().flush();
    listener::shutdown_signal().await;
    d.gateway.shutdown();
    d.gateway.wait().await;
    d.sim.stop().await;
    ExitCode::SUCCESS
}

/// `portcullis keys ...`. Errors come back as the text to print (ending in a newline).
async fn keys(command: KeysCommand) -> Result<(), String> {
    let path = command.config().clone();
    // `[store]` and the client ids only: the backends' secrets are not this command's.
    let view = config::operator::load(&path).map_err(|e| format!("error: {e}\n"))?;
    let Some(secret) = view.key_hmac_secret.clone() else {
        return Err(format!(
            "error: {}: store.key_hmac_secret (or store.key_hmac_secret_file) is not set; \
             API keys are stored as an HMAC under it (e.g. `openssl rand -hex 32`)\n",
            path.display()
        ));
    };
    if let Some(client) = command.issued_to() {
        if !view.client_ids.iter().any(|id| id == client) {
            return Err(format!(
                "error: {}: no [[clients]] entry has the id '{}'\n",
                path.display(),
                client.escape_default()
            ));
        }
    }
    let store = store::open(view.store.url.as_str(), &view.base_dir)
        .await
        .map_err(|e| format!("error: {e}\n"))?;
    let admin = KeyAdmin::new(store.clone(), &secret);
    let result = run_keys(&admin, command).await;
    store.close().await;
    result.map_err(|e| format!("error: {e}\n"))
}

async fn run_keys(admin: &KeyAdmin, command: KeysCommand) -> Result<(), store::StoreError> {
    match command {
        KeysCommand::Create {
            client,
            expires,
            name,
            ..
        } => {
            let (record, key) = admin.create(&client, name.as_deref(), expires).await?;
            println!("{}", key.expose());
            eprintln!(
                "created API key {} for client {}{}, {}. This is the only time the key is shown: store it now.",
                record.id,
                record.client,
                shown_name(&record),
                expiry(&record)
            );
        }
        KeysCommand::Rotate {
            client,
            grace,
            expires,
            name,
            ..
        } => {
            let rotation = admin
                .rotate(&client, grace, expires, name.as_deref())
                .await?;
            println!("{}", rotation.key.expose());
            let record = &rotation.record;
            eprintln!(
                "created API key {} for client {}{}, {}. This is the only time the key is shown: store it now.",
                record.id,
                record.client,
                shown_name(record),
                expiry(record)
            );
            for old in &rotation.rolled {
                eprintln!(
                    "older key {} of client {} keeps working until {}",
                    old.id,
                    old.client,
                    old.expires_at.map(rfc3339).unwrap_or_default()
                );
            }
        }
        KeysCommand::List { client, json, .. } => {
            let keys = admin.list(client.as_deref()).await?;
            if json {
                println!("{}", keys_json(&keys));
            } else {
                print!("{}", keys_table(&keys, api_key::unix_now()));
            }
        }
        KeysCommand::Revoke { id, .. } => {
            let before = api_key::unix_now();
            let record = admin.revoke(&id).await?;
            let at = record.revoked_at.map(rfc3339).unwrap_or_default();
            if record.revoked_at.is_some_and(|t| t < before) {
                eprintln!(
                    "API key {} of client {} was already revoked at {at}",
                    record.id, record.client
                );
            } else {
                eprintln!(
                    "revoked API key {} of client {}; running gateways refuse it at their next poll",
                    record.id, record.client
                );
            }
        }
    }
    Ok(())
}

fn shown_name(k: &KeyRecord) -> String {
    k.name
        .as_deref()
        .map(|n| format!(" (name {n})"))
        .unwrap_or_default()
}

fn expiry(k: &KeyRecord) -> String {
    match k.expires_at {
        Some(t) => format!("expires {}", rfc3339(t)),
        None => "never expires".into(),
    }
}

/// Unix seconds as RFC 3339 UTC (`2026-01-31T12:00:00Z`).
fn rfc3339(t: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(t)
        .ok()
        .and_then(|d| {
            d.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| t.to_string())
}

/// `keys list --json`: an array of the admin API's key objects (times RFC 3339 or null).
fn keys_json(keys: &[KeyRecord]) -> String {
    let now = api_key::unix_now();
    let list: Vec<serde_json::Value> = keys.iter().map(|k| k.view(now)).collect();
    serde_json::to_string_pretty(&list).unwrap_or_else(|_| "[]".into())
}

/// `keys list`: aligned columns, one key per line.
fn keys_table(keys: &[KeyRecord], now: i64) -> String {
    let header = [
        "ID",
        "CLIENT",
        "NAME",
        "CREATED",
        "EXPIRES",
        "LAST USED",
        "STATUS",
    ];
    let rows: Vec<[String; 7]> = keys
        .iter()
        .map(|k| {
            [
                k.id.clone(),
                k.client.clone(),
                k.name.clone().unwrap_or_else(|| "-".into()),
                rfc3339(k.created_at),
                k.expires_at.map(rfc3339).unwrap_or_else(|| "never".into()),
                k.last_used_at
                    .map(rfc3339)
                    .unwrap_or_else(|| "never".into()),
                k.status(now).as_str().to_owned(),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut l = String::new();
        for (cell, w) in cells.zip(widths) {
            l.push_str(&format!("{cell:<w$}  "));
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(&mut header.iter().copied());
    for row in &rows {
        line(&mut row.iter().map(String::as_str));
    }
    out
}
