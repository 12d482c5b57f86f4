//! The `periscope` command: parse arguments, set up logging, hand over to the broker
//! library (or to the demo and the administrative commands in this crate).
//!
//! # Layout
//!
//! - this file: the command line and its dispatch.
//! - [`commands`]: `keys`, `audit export`, `config check`, and the environment `serve`
//!   reads.
//! - [`demo`]: `periscope demo` and its shop processes.
//! - [`users`]: `periscope users`, the people who sign in through OAuth.
//! - [`loadtest`]: `periscope loadtest`, simulated agents and callers against a running broker.
//! - [`hostbench`]: `periscope host-bench`, what the agent costs its host with the broker
//!   healthy, slow and unreachable.

mod commands;
mod demo;
mod demo_python;
mod hostbench;
mod loadtest;
mod users;

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use commands as cli;

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
    /// Run a broker with several instrumented demo shops and print how to try it.
    Demo(DemoArgs),
    /// One demo shop with its agent (started by `periscope demo`).
    #[command(hide = true)]
    ShopInstance(ShopInstanceArgs),
    /// Serve MCP on stdin/stdout for clients that only speak stdio, forwarding to a
    /// broker's `/mcp` endpoint. Logs go to stderr.
    Mcp(McpArgs),
    /// Redact standard input with the redaction rules, to try them on sample data.
    Redact(RedactArgs),
    /// Create, list and revoke API keys and agent keys in a data directory (the broker
    /// may be running on it: its next call sees the change).
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Create, list, disable and enable the people who sign in from MCP clients through
    /// OAuth (the broker needs `[oauth] enabled = true`).
    #[command(subcommand)]
    Users(users::UsersCommand),
    /// Read the audit trail of a data directory.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Check a configuration file.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Drive a running broker (or cluster) with simulated agents over WebSockets and
    /// callers over REST and MCP, and report throughput, latencies, drops, memory and CPU.
    Loadtest(LoadtestArgs),
    /// Measure what the agent costs the service it lives in: demo shops without and with
    /// the agent under the same steady load, with the broker healthy, slow (a trickling
    /// proxy) and unreachable, as latency ratios in one run, with memory and drops.
    HostBench(HostBenchArgs),
    /// One demo shop for `periscope host-bench` (with the agent when given a broker URL).
    #[command(hide = true)]
    HostBenchService(HostBenchServiceArgs),
}

#[derive(Debug, clap::Args)]
struct HostBenchArgs {
    /// Broker base URL (start one with benches/loadtest/broker.toml).
    #[arg(long = "broker", env = "PERISCOPE_URL")]
    broker: String,
    /// API key (places and removes actions, reads agents).
    #[arg(long = "api-key", env = "PERISCOPE_API_KEY", hide_env_values = true)]
    api_key: String,
    /// Agent key the shops' agents register with.
    #[arg(long = "agent-key", env = "PERISCOPE_AGENT_KEY", hide_env_values = true)]
    agent_key: String,
    /// Pool the shops' agents register into.
    #[arg(long, default_value = "hostbench")]
    pool: String,
    /// Seconds of load with every broker healthy.
    #[arg(long, default_value_t = 20)]
    healthy_seconds: u64,
    /// Seconds the slow and unreachable brokers stay so, under load.
    #[arg(long, default_value_t = 120)]
    duration: u64,
    /// Requests per second to each shop.
    #[arg(long, default_value_t = 200.0)]
    rps: f64,
    /// Bytes per second the slow proxy passes each way.
    #[arg(long, default_value_t = 512)]
    slow_bytes_per_sec: usize,
    /// Which shops, with which agent: the Rust demo shop, or the Python one
    /// (`demo/python/pyshop.py`, run by `--python`).
    #[arg(long, value_enum, default_value = "rust")]
    language: HostLanguage,
    /// The interpreter for `--language python`, with `periscope_agent` installed.
    #[arg(long, env = "PERISCOPE_PYTHON", default_value = "python3")]
    python: std::path::PathBuf,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

/// The agents `host-bench` can measure.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum HostLanguage {
    Rust,
    Python,
}

#[derive(Debug, clap::Args)]
struct HostBenchServiceArgs {
    #[arg(long)]
    instance: String,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    #[arg(long)]
    broker_url: Option<String>,
    #[arg(long, default_value = "")]
    agent_key: String,
    #[arg(long, default_value = "hostbench")]
    pool: String,
    #[arg(long, value_delimiter = ',')]
    tags: Vec<String>,
}

#[derive(Debug, clap::Args)]
struct LoadtestArgs {
    /// Broker base URL; repeat (or comma-separate) for the nodes of a cluster.
    #[arg(long = "broker", env = "PERISCOPE_URL", value_delimiter = ',', required = true)]
    brokers: Vec<String>,
    /// API key of the callers (mcp:actions:write, mcp:hits:read, mcp:system:read).
    #[arg(long = "api-key", env = "PERISCOPE_API_KEY", hide_env_values = true)]
    api_key: String,
    /// Agent key the simulated agents register with.
    #[arg(long = "agent-key", env = "PERISCOPE_AGENT_KEY", hide_env_values = true, default_value = "")]
    agent_key: String,
    /// Pool the agents register into.
    #[arg(long, default_value = "load")]
    pool: String,
    /// Simulated agents.
    #[arg(long, default_value_t = 100)]
    agents: usize,
    /// Services the agents are spread over (identical catalogs within a service).
    #[arg(long, default_value_t = 5)]
    services: usize,
    /// Catalog locations per service.
    #[arg(long, default_value_t = 200)]
    locations: usize,
    /// Callers that place snapshots and wait for hits (`wait_seconds`).
    #[arg(long, default_value_t = 10)]
    callers: usize,
    /// Callers that place snapshots and poll for hits.
    #[arg(long, default_value_t = 0)]
    pollers: usize,
    /// Callers over MCP (one streamable-HTTP session each) that place snapshots and wait
    /// for hits with `get_action`'s `wait_seconds`.
    #[arg(long, default_value_t = 0)]
    mcp_callers: usize,
    /// MCP callers that poll `get_action` without waiting.
    #[arg(long, default_value_t = 0)]
    mcp_pollers: usize,
    /// Seconds of measured load (after every agent has registered).
    #[arg(long, default_value_t = 30)]
    duration: u64,
    /// `max_hits` of each snapshot (1..=50).
    #[arg(long, default_value_t = 5)]
    max_hits: u32,
    /// Hits per second a live snapshot's callsite fires, per agent.
    #[arg(long, default_value_t = 50.0)]
    hit_rate: f64,
    /// Approximate bytes of one hit frame.
    #[arg(long, default_value_t = 2048)]
    hit_bytes: usize,
    /// Dynamic log lines per second per agent (places one log action per service).
    #[arg(long, default_value_t = 0.0)]
    log_rate: f64,
    /// Metric report interval in milliseconds (places one metric per service); 0: none.
    #[arg(long, default_value_t = 0)]
    metric_interval_ms: u64,
    /// `agent`: each snapshot targets one agent; `service`: every agent of a service.
    #[arg(long, default_value = "agent", value_parser = ["agent", "service"])]
    target: String,
    /// The broker's process id (same host): report its RSS and CPU from /proc.
    #[arg(long)]
    broker_pid: Option<u32>,
    /// Agents connecting at once.
    #[arg(long, default_value_t = 64)]
    connect_concurrency: usize,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

impl LoadtestArgs {
    fn options(self) -> anyhow::Result<loadtest::Options> {
        let brokers = self
            .brokers
            .iter()
            .map(|b| url::Url::parse(b).with_context(|| format!("--broker `{b}` is not a URL (http://host:port)")))
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(loadtest::Options {
            brokers,
            api_key: self.api_key,
            agent_key: self.agent_key,
            pool: self.pool,
            agents: self.agents,
            services: self.services,
            locations: self.locations,
            callers: self.callers,
            pollers: self.pollers,
            mcp_callers: self.mcp_callers,
            mcp_pollers: self.mcp_pollers,
            duration: std::time::Duration::from_secs(self.duration),
            max_hits: self.max_hits,
            hit_rate: self.hit_rate,
            hit_bytes: self.hit_bytes,
            log_rate: self.log_rate,
            metric_interval: (self.metric_interval_ms > 0)
                .then(|| std::time::Duration::from_millis(self.metric_interval_ms)),
            target_service: self.target == "service",
            broker_pid: self.broker_pid,
            connect_concurrency: self.connect_concurrency,
            json: self.json,
        })
    }
}

#[derive(Debug, Subcommand)]
enum KeysCommand {
    /// Create a key and print its secret (once; only its hash is stored).
    Create(KeysCreateArgs),
    /// List keys (never their secrets).
    List(KeysListArgs),
    /// Revoke a key: it stops working on the broker's next call.
    Revoke(KeysRevokeArgs),
}

#[derive(Debug, clap::Args)]
struct DataDirArg {
    /// The broker's data directory (a single node).
    #[arg(long, env = "PERISCOPE_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// The cluster's Redis (`redis://host:6379/0`), instead of a data directory.
    #[arg(long, env = "PERISCOPE_REDIS_URL")]
    redis: Option<String>,
    /// The cluster's key prefix in Redis.
    #[arg(long, default_value = "periscope:")]
    key_prefix: String,
}

impl DataDirArg {
    fn target(&self) -> anyhow::Result<cli::Target> {
        cli::Target::from_flags(self.data_dir.clone(), self.redis.clone(), self.key_prefix.clone())
    }
}

#[derive(Debug, clap::Args)]
struct KeysCreateArgs {
    #[command(flatten)]
    dir: DataDirArg,
    /// Who or what uses the key (a person, a CI job, an assistant).
    #[arg(long)]
    name: Option<String>,
    /// An agent key (for agents registering into `--pools`) instead of an API key.
    #[arg(long)]
    agent: bool,
    /// developer (default), group_admin (needs --group) or company_admin.
    #[arg(long)]
    role: Option<String>,
    /// Narrower scopes than the role's, comma-separated.
    #[arg(long, value_delimiter = ',')]
    scopes: Vec<String>,
    /// Only these pools (agent keys: the pools it may register into; `*` for any).
    #[arg(long, alias = "pool", value_delimiter = ',')]
    pools: Vec<String>,
    /// The group (created when missing).
    #[arg(long)]
    group: Option<String>,
    /// The organization [default: default] (created when missing).
    #[arg(long)]
    org: Option<String>,
    /// Expires after this long: 90s, 30m, 12h, 30d, 2w.
    #[arg(long)]
    expires_in: Option<String>,
    /// Expires at this time: 2026-12-31 or 2026-12-31T23:59:59Z.
    #[arg(long)]
    expires_at: Option<String>,
    /// Print the key as JSON (with its secret) instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
struct KeysListArgs {
    #[command(flatten)]
    dir: DataDirArg,
    /// Only this organization.
    #[arg(long)]
    org: Option<String>,
    /// Also list revoked and expired keys.
    #[arg(long)]
    all: bool,
    /// JSON lines instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
struct KeysRevokeArgs {
    #[command(flatten)]
    dir: DataDirArg,
    /// The key's id (`key_…`, from `keys list`).
    key_id: String,
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Write audit entries as JSON lines to standard output, oldest first.
    Export(AuditExportArgs),
}

#[derive(Debug, clap::Args)]
struct AuditExportArgs {
    #[command(flatten)]
    dir: DataDirArg,
    /// Only this organization.
    #[arg(long)]
    org: Option<String>,
    /// From this time (Unix ms, 2026-12-31 or RFC 3339).
    #[arg(long)]
    since: Option<String>,
    /// Before this time.
    #[arg(long)]
    until: Option<String>,
    /// Only this actor (key id, key name, agent:<id>, system, cli).
    #[arg(long)]
    actor: Option<String>,
    /// Only this kind (action_placed, key_revoked, ...).
    #[arg(long)]
    kind: Option<String>,
    /// Only this action.
    #[arg(long)]
    action_id: Option<String>,
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Validate a configuration file without starting anything; errors name the key.
    Check {
        /// The TOML file.
        file: PathBuf,
    },
}

#[derive(Debug, clap::Args)]
struct RedactArgs {
    /// Redaction rules (TOML); the built-in rules when absent.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Read JSON documents (one or more, e.g. JSON lines) and redact them structurally:
    /// member names are known, so `"password": "x"` is caught by name.
    #[arg(long)]
    json: bool,
    /// Also write what fired, where (never the values), to standard error as JSON lines.
    #[arg(long)]
    report: bool,
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
struct DemoArgs {
    /// Address the broker listens on.
    #[arg(long, default_value = "127.0.0.1:7070")]
    listen: SocketAddr,
    /// How many shop processes to start (1 to 4).
    #[arg(long, default_value_t = 4)]
    instances: usize,
    /// Requests per second each shop's load generator sends.
    #[arg(long, default_value_t = 10.0)]
    rps: f64,
    /// API key to print and accept [default: generated].
    #[arg(long, env = "PERISCOPE_API_KEY")]
    api_key: Option<String>,
    /// Keep actions and hits in this directory.
    #[arg(long, env = "PERISCOPE_DATA_DIR")]
    data_dir: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
struct ShopInstanceArgs {
    #[arg(long)]
    broker_url: String,
    #[arg(long)]
    agent_key: String,
    #[arg(long)]
    pool: String,
    #[arg(long, value_delimiter = ',')]
    tags: Vec<String>,
    #[arg(long)]
    instance: String,
    #[arg(long)]
    region: String,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    #[arg(long, default_value_t = 10.0)]
    rps: f64,
}

#[derive(Debug, clap::Args)]
#[command(after_help = "Environment (flags win over it; it wins over the file): PERISCOPE_CONFIG, PERISCOPE_LISTEN, \
PERISCOPE_PUBLIC_URL, PERISCOPE_DATA_DIR, PERISCOPE_REDIS_URL, PERISCOPE_NODE_NAME, PERISCOPE_API_KEY, \
PERISCOPE_AGENT_KEY, PERISCOPE_HIT_RETENTION_DAYS, PERISCOPE_AUDIT_RETENTION_DAYS, PERISCOPE_LOG.")]
struct ServeArgs {
    /// Address to listen on [default: 127.0.0.1:7070, or `listen` from the config file].
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// TOML configuration file.
    #[arg(long)]
    config: Option<PathBuf>,
    /// An API key for REST and MCP callers (repeatable): a company_admin of `default`
    /// named `cli`.
    #[arg(long = "api-key", value_delimiter = ',')]
    api_keys: Vec<String>,
    /// Directory for the database (keys, actions, hits, audit); without it nothing
    /// survives a restart.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// An agent key accepted for every pool of `default` (repeatable).
    #[arg(long = "agent-key", value_delimiter = ',')]
    agent_keys: Vec<String>,
    /// Run as a node of the cluster sharing this Redis (`redis://host:6379/0`).
    #[arg(long)]
    redis: Option<String>,
    /// This node's name in the cluster [default: host name and port].
    #[arg(long)]
    node_name: Option<String>,
}

fn init_logging(default: &str) {
    let filter = periscope_broker::logging::filter(default);
    // Colours only on a terminal: stdio MCP clients capture stderr into log files.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi).init();
}

/// Resolves when standard input reaches its end (the parent closed it).
async fn stdin_closed() {
    use tokio::io::AsyncReadExt;
    let mut stdin = tokio::io::stdin();
    let mut buf = [0u8; 64];
    loop {
        match stdin.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

/// Most input `periscope redact` reads, so a stray pipe cannot exhaust memory.
const MAX_REDACT_INPUT: u64 = 256 * 1024 * 1024;

fn redact(args: &RedactArgs) -> anyhow::Result<()> {
    use std::io::{Read as _, Write as _};
    let config = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            periscope_redaction::RedactionConfig::from_toml_str(&text).with_context(|| format!("{}", path.display()))?
        }
        None => periscope_redaction::RedactionConfig::default(),
    };
    let redactor = periscope_redaction::Redactor::new(&config)?;
    let mut input = String::new();
    std::io::stdin()
        .take(MAX_REDACT_INPUT + 1)
        .read_to_string(&mut input)
        .context("reading standard input (it must be UTF-8)")?;
    anyhow::ensure!(input.len() as u64 <= MAX_REDACT_INPUT, "standard input is larger than 256 MiB");
    let mut report = periscope_redaction::Report::new();
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    if args.json {
        for (i, doc) in serde_json::Deserializer::from_str(&input).into_iter::<serde_json::Value>().enumerate() {
            let mut doc = doc.with_context(|| format!("JSON document {} does not parse", i + 1))?;
            redactor.redact_json(&mut doc, &mut report);
            serde_json::to_writer(&mut out, &doc)?;
            writeln!(out)?;
        }
    } else {
        for (i, line) in input.split_inclusive('\n').enumerate() {
            out.write_all(redactor.redact_text(line, &format!("line {}", i + 1), &mut report).as_bytes())?;
        }
    }
    out.flush()?;
    if args.report {
        let stderr = std::io::stderr();
        let mut err = stderr.lock();
        for f in report.findings() {
            writeln!(err, "{}", serde_json::json!({ "path": f.path, "rule": f.rule }))?;
        }
    }
    Ok(())
}

fn load_config(args: &ServeArgs) -> anyhow::Result<periscope_broker::BrokerConfig> {
    let flags = cli::ServeFlags {
        config: args.config.clone(),
        listen: args.listen,
        data_dir: args.data_dir.clone(),
        api_keys: args.api_keys.clone(),
        agent_keys: args.agent_keys.clone(),
        redis: args.redis.clone(),
        node_name: args.node_name.clone(),
    };
    cli::serve_config(&flags, |name| std::env::var(name).ok())
}

async fn keys(command: KeysCommand) -> anyhow::Result<()> {
    match command {
        KeysCommand::Create(a) => {
            let request = cli::CreateKey {
                name: a.name,
                agent: a.agent,
                role: a.role,
                scopes: a.scopes,
                pools: a.pools,
                group: a.group,
                org: a.org,
                expires_in: a.expires_in,
                expires_at: a.expires_at,
            };
            let issued = cli::create_key(&a.dir.target()?, &request).await?;
            if a.json {
                println!("{}", serde_json::to_string(&issued)?);
            } else {
                print!("{}", cli::describe_issued(&issued));
            }
        }
        KeysCommand::List(a) => {
            let items = cli::list_keys(&a.dir.target()?, a.org.as_deref(), a.all).await?;
            if a.json {
                for k in items {
                    println!("{k}");
                }
            } else {
                print!("{}", cli::key_table(&items));
            }
        }
        KeysCommand::Revoke(a) => {
            let key = cli::revoke_key(&a.dir.target()?, &a.key_id).await?;
            println!(
                "Revoked {} (`{}`); it fails from the broker's next call on.",
                a.key_id,
                key["name"].as_str().unwrap_or("")
            );
        }
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the runtime")?;
    match cli.command {
        Command::Demo(args) => {
            init_logging("warn");
            let options = demo::DemoOptions {
                listen: args.listen,
                instances: args.instances,
                requests_per_second: args.rps,
                api_key: args.api_key,
                data_dir: args.data_dir,
            };
            runtime.block_on(demo::run_demo(options, shutdown_signal()))
        }
        Command::ShopInstance(args) => {
            use tracing_subscriber::prelude::*;
            let agent = periscope_agent::Agent::builder()
                .broker_url(args.broker_url.clone())
                .agent_key(args.agent_key.clone())
                .pool(args.pool.clone())
                .tags(args.tags.clone())
                .service("demo-shop")
                .service_version(env!("CARGO_PKG_VERSION"))
                .display_name(args.instance.clone())
                .reconnect_initial(std::time::Duration::from_millis(500))
                .start()?;
            tracing_subscriber::registry()
                .with(
                    tracing_subscriber::fmt::layer()
                        .with_writer(std::io::stderr)
                        .with_filter(tracing_subscriber::filter::LevelFilter::INFO),
                )
                .with(agent.layer())
                .init();
            let options = demo::ShopInstanceOptions {
                pool: args.pool,
                instance: args.instance,
                region: args.region,
                seed: args.seed,
                requests_per_second: args.rps,
            };
            let result = runtime.block_on(demo::run_shop_instance(options, async {
                tokio::select! {
                    _ = shutdown_signal() => {}
                    _ = stdin_closed() => {}
                }
            }));
            agent.shutdown(std::time::Duration::from_secs(2));
            result
        }
        Command::Redact(args) => redact(&args),
        Command::Loadtest(args) => {
            let options = args.options()?;
            let json = options.json;
            let report = runtime.block_on(loadtest::run(options))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.render());
            }
            Ok(())
        }
        Command::HostBench(args) => {
            let options = hostbench::Options {
                broker: url::Url::parse(&args.broker)
                    .with_context(|| format!("--broker `{}` is not a URL (http://host:port)", args.broker))?,
                api_key: args.api_key,
                agent_key: args.agent_key,
                pool: args.pool,
                healthy: std::time::Duration::from_secs(args.healthy_seconds),
                duration: std::time::Duration::from_secs(args.duration),
                rps: args.rps,
                slow_bytes_per_sec: args.slow_bytes_per_sec,
                host: match args.language {
                    HostLanguage::Rust => hostbench::Host::Rust {
                        exe: std::env::current_exe().context("finding this executable to start the shops")?,
                    },
                    HostLanguage::Python => {
                        hostbench::Host::Python { python: args.python, script: demo_python::script() }
                    }
                },
            };
            let report = runtime.block_on(hostbench::run(options))?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.render());
            }
            Ok(())
        }
        Command::HostBenchService(args) => {
            use tracing_subscriber::prelude::*;
            // The same subscriber with and without the agent, so the agent is the only difference.
            let agent = match &args.broker_url {
                Some(url) => Some(
                    periscope_agent::Agent::builder()
                        .broker_url(url.clone())
                        .agent_key(args.agent_key.clone())
                        .pool(args.pool.clone())
                        .tags(args.tags.clone())
                        .service("host-bench-shop")
                        .service_version(env!("CARGO_PKG_VERSION"))
                        .display_name(args.instance.clone())
                        .reconnect_initial(std::time::Duration::from_millis(500))
                        .reconnect_max(std::time::Duration::from_secs(5))
                        .start()?,
                ),
                None => None,
            };
            // INFO, as a service usually logs (the shop logs nothing at INFO for the
            // requests the bench sends): below it the agent's catalog would stay empty,
            // as the host's level hint keeps INFO callsites from registering at all.
            tracing_subscriber::registry()
                .with(
                    tracing_subscriber::fmt::layer()
                        .with_writer(std::io::stderr)
                        .with_filter(tracing_subscriber::filter::LevelFilter::INFO),
                )
                .with(agent.as_ref().map(|a| a.layer()))
                .init();
            let id = agent.as_ref().map(|a| a.id().to_string());
            let result = runtime.block_on(hostbench::serve_shop(args.instance, args.seed, id, stdin_closed()));
            if let Some(agent) = agent {
                agent.shutdown(std::time::Duration::from_secs(2));
            }
            result
        }
        Command::Keys(command) => runtime.block_on(keys(command)),
        Command::Users(command) => {
            println!("{}", runtime.block_on(users::run(command))?);
            Ok(())
        }
        Command::Audit(AuditCommand::Export(a)) => {
            let filter = cli::AuditFilter {
                org: a.org,
                since: a.since,
                until: a.until,
                actor: a.actor,
                kind: a.kind,
                action_id: a.action_id,
            };
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::new(stdout.lock());
            let n = runtime.block_on(cli::export_audit(&a.dir.target()?, &filter, &mut out))?;
            eprintln!("{n} audit entr{} exported", if n == 1 { "y" } else { "ies" });
            Ok(())
        }
        Command::Config(ConfigCommand::Check { file }) => {
            print!("{}", cli::check_config(&file)?);
            Ok(())
        }
        Command::Serve(args) => {
            init_logging("info");
            let config = load_config(&args)?;
            if config.agent_keys.is_empty() {
                tracing::warn!(
                    "no agent keys configured: only agent keys made with `periscope keys create --agent` will be accepted"
                );
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
