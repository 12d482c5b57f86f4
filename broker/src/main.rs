//! The `periscope` command: parse arguments, set up logging, hand over to the library.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use periscope_broker::BrokerConfig;
use periscope_broker::config::{AgentKeyConfig, ApiKeyConfig};

#[derive(Debug, Parser)]
#[command(name = "periscope", version, about = "Live inspection of running services: broker, MCP server and tools")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the broker.
    Serve(ServeArgs),
    /// Serve MCP on stdin/stdout for clients that only speak stdio, forwarding to a
    /// broker's `/mcp` endpoint. Logs go to stderr.
    Mcp(McpArgs),
}

#[derive(Debug, clap::Args)]
struct McpArgs {
    /// The broker's URL (`http://host:7070`, or its MCP endpoint `http://host:7070/mcp`).
    #[arg(long, env = "PERISCOPE_URL")]
    url: String,
    /// An API key of that broker.
    #[arg(long = "api-key", env = "PERISCOPE_API_KEY", hide_env_values = true)]
    api_key: String,
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// Address to listen on [default: 127.0.0.1:7070, or `listen` from the config file].
    #[arg(long, env = "PERISCOPE_LISTEN")]
    listen: Option<SocketAddr>,
    /// TOML configuration file.
    #[arg(long, env = "PERISCOPE_CONFIG")]
    config: Option<PathBuf>,
    /// An API key for REST and MCP callers (repeatable); named `cli`.
    #[arg(long = "api-key", env = "PERISCOPE_API_KEY", value_delimiter = ',')]
    api_keys: Vec<String>,
    /// Directory for the database (actions, hits); without it nothing survives a restart.
    #[arg(long, env = "PERISCOPE_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// An agent key accepted for every pool (repeatable).
    #[arg(long = "agent-key", env = "PERISCOPE_AGENT_KEY", value_delimiter = ',')]
    agent_keys: Vec<String>,
}

fn init_logging(default: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("PERISCOPE_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    // Colours only on a terminal: stdio MCP clients capture stderr into log files.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi).init();
}

fn load_config(args: &ServeArgs) -> anyhow::Result<BrokerConfig> {
    let mut config = match &args.config {
        Some(path) => BrokerConfig::load(path)?,
        None => BrokerConfig::default(),
    };
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    if let Some(dir) = &args.data_dir {
        config.data_dir = Some(dir.clone());
    }
    for key in &args.api_keys {
        config.api_keys.push(ApiKeyConfig::new("cli", key.clone()));
    }
    for key in &args.agent_keys {
        config.agent_keys.push(AgentKeyConfig { key: key.clone(), pools: vec!["*".into()] });
    }
    config.validate()?;
    Ok(config)
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the runtime")?;
    match cli.command {
        Command::Serve(args) => {
            init_logging("info");
            let config = load_config(&args)?;
            if config.api_keys.is_empty() {
                tracing::warn!("no API keys configured: REST and MCP callers will all be refused (use --api-key)");
            }
            if config.agent_keys.is_empty() {
                tracing::warn!("no agent keys configured: agents will all be refused (use --agent-key)");
            }
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::bind(config.listen)
                    .await
                    .with_context(|| format!("cannot listen on {}", config.listen))?;
                periscope_broker::run(listener, config, shutdown_signal()).await
            })
        }
        Command::Mcp(args) => {
            // Standard output carries JSON-RPC only: every log line goes to stderr. The MCP
            // library's own logs are off unless PERISCOPE_LOG asks for them: the proxy
            // reports what matters (connected, refused, unreachable) itself.
            init_logging("info,rmcp=off");
            let options = periscope_broker::mcp::proxy::ProxyOptions { url: args.url, api_key: args.api_key };
            runtime.block_on(periscope_broker::mcp::proxy::run_stdio(options))
        }
    }
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}
