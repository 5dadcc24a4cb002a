//! The `portcullis` binary: a thin CLI over the library (`serve`, `check`, `demo`).

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use portcullis::{app, config, demo, listener};

/// mimalloc: measurably cheaper than glibc malloc for the many small, short-lived
/// allocations of request handling (see bench/RESULTS.md).
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
    /// Run the gateway.
    Serve {
        /// Configuration file (TOML).
        #[arg(long, short, default_value = "portcullis.toml")]
        config: PathBuf,
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
}

fn init_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("PORTCULLIS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
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
    init_logs();
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
            Command::Serve { config } => serve(config).await,
            Command::Demo {
                port,
                token_latency_ms,
            } => run_demo(port, token_latency_ms).await,
            Command::Check { .. } => ExitCode::SUCCESS,
        }
    })
}

async fn serve(path: PathBuf) -> ExitCode {
    let validated = match config::load_file(&path) {
        Ok(v) => v,
        Err(e) => {
            eprint!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let running = match app::start(&validated).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    listener::shutdown_signal().await;
    tracing::info!("shutdown signal received; draining");
    running.shutdown();
    running.wait().await;
    ExitCode::SUCCESS
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
