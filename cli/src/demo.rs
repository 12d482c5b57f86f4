//! `periscope demo`: a broker plus several instrumented shop processes, each with an
//! agent, spread over two pools and several tags, driven by their own load generators,
//! and, when a Python 3.9+ is there, a Python shop with the Python agent in a pool of
//! its own (`demo_python`).
//! It prints where to connect and one request that places a snapshot and shows its hit,
//! then runs until Ctrl-C.
//!
//! The shops are real child processes (this same executable, `periscope shop-instance`),
//! so what the demo shows is what a user gets when attaching the agent to a service.
//! Their logs go to files in a temporary directory; closing their standard input is how
//! the demo tells them to stop.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, bail};
use tokio::process::{Child, Command};

use periscope_broker::BrokerConfig;
use periscope_broker::config::{AgentKeyConfig, ApiKeyConfig};

/// One demo shop instance.
#[derive(Debug, Clone, Copy)]
pub struct InstanceSpec {
    /// Instance name (also the agent's display name).
    pub name: &'static str,
    /// Pool.
    pub pool: &'static str,
    /// Tags.
    pub tags: &'static [&'static str],
    /// Region label used by the shop.
    pub region: &'static str,
}

/// The fleet `periscope demo` starts, in order.
pub const INSTANCES: &[InstanceSpec] = &[
    InstanceSpec { name: "shop-eu-1", pool: "shop", tags: &["env:prod", "region:eu"], region: "eu-west" },
    InstanceSpec { name: "shop-us-1", pool: "shop", tags: &["env:prod", "region:us"], region: "us-east" },
    InstanceSpec { name: "shop-eu-canary", pool: "shop", tags: &["env:canary", "region:eu"], region: "eu-west" },
    InstanceSpec { name: "shop-staging", pool: "shop-staging", tags: &["env:staging"], region: "eu-central" },
];

/// Options of `periscope demo`.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Where the broker listens.
    pub listen: SocketAddr,
    /// How many shop instances (1 to 4).
    pub instances: usize,
    /// Requests per second each shop's load generator sends.
    pub requests_per_second: f64,
    /// API key to use; generated when absent.
    pub api_key: Option<String>,
    /// Persist actions and hits here.
    pub data_dir: Option<PathBuf>,
}

/// A random secret with a readable prefix.
pub fn generate_key(prefix: &str) -> String {
    let mut bytes = [0u8; 24];
    if getrandom::fill(&mut bytes).is_err() {
        // No OS randomness: fall back to an id generator's entropy source (also getrandom,
        // with a time-based fallback) rather than failing the demo.
        return format!("{prefix}{}", periscope_protocol::KeyId::generate().as_str().trim_start_matches("key_"));
    }
    const ALPHABET: &[u8; 32] = b"0123456789abcdefghjkmnpqrstvwxyz";
    let body: String = bytes.iter().map(|b| ALPHABET[usize::from(b & 31)] as char).collect();
    format!("{prefix}{body}")
}

struct Fleet {
    children: Vec<(InstanceSpec, Child)>,
}

impl Fleet {
    /// Asks every shop to stop (closing its stdin), then kills what is left after `grace`.
    async fn stop(mut self, grace: Duration) {
        for (_, child) in &mut self.children {
            drop(child.stdin.take());
        }
        let deadline = tokio::time::Instant::now() + grace;
        for (spec, child) in &mut self.children {
            match tokio::time::timeout_at(deadline, child.wait()).await {
                Ok(_) => {}
                Err(_) => {
                    tracing::warn!(instance = spec.name, "shop did not stop in time; killing it");
                    let _ = child.kill().await;
                }
            }
        }
    }
}

/// Runs the demo until `shutdown` resolves.
pub async fn run_demo(options: DemoOptions, shutdown: impl Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
    if !(1..=INSTANCES.len()).contains(&options.instances) {
        bail!("--instances must be between 1 and {}", INSTANCES.len());
    }
    let (api_key, key_source) = match &options.api_key {
        Some(k) => (k.clone(), "from PERISCOPE_API_KEY"),
        None => (generate_key("psk_"), "generated for this run; set PERISCOPE_API_KEY to choose one"),
    };
    let agent_key = generate_key("pak_");
    let config = BrokerConfig {
        listen: options.listen,
        // The demo's key administers the demo: company_admin of `default`, with room for
        // the demo's own start-up polling on top of a user's calls.
        api_keys: vec![ApiKeyConfig {
            quotas: Some(periscope_broker::quota::CallerQuotaOverrides {
                calls_per_minute: Some(600),
                call_burst: Some(100),
                ..Default::default()
            }),
            ..ApiKeyConfig::new("demo", api_key.clone()).with_role(periscope_broker::auth::Role::CompanyAdmin)
        }],
        agent_keys: vec![AgentKeyConfig::any_pool(agent_key.clone())],
        data_dir: options.data_dir.clone(),
        ..BrokerConfig::default()
    };
    config.validate().context("the demo configuration")?;

    let listener = tokio::net::TcpListener::bind(options.listen).await.with_context(|| {
        format!("cannot listen on {} (is another broker running? try --listen 127.0.0.1:0)", options.listen)
    })?;
    let addr = listener.local_addr()?;
    let (stop_broker, broker_stopped) = tokio::sync::oneshot::channel::<()>();
    let broker = tokio::spawn(periscope_broker::run(listener, config, async move {
        let _ = broker_stopped.await;
    }));

    let log_dir = std::env::temp_dir().join(format!("periscope-demo-{}", std::process::id()));
    std::fs::create_dir_all(&log_dir).with_context(|| format!("creating {}", log_dir.display()))?;
    let exe = std::env::current_exe().context("locating the periscope executable")?;
    let mut fleet = Fleet { children: Vec::new() };
    for (i, spec) in INSTANCES.iter().take(options.instances).enumerate() {
        let log = std::fs::File::create(log_dir.join(format!("{}.log", spec.name)))?;
        let child = Command::new(&exe)
            .arg("shop-instance")
            .args(["--broker-url", &format!("ws://{addr}/agents")])
            .args(["--agent-key", &agent_key])
            .args(["--pool", spec.pool])
            .args(["--tags", &spec.tags.join(",")])
            .args(["--instance", spec.name])
            .args(["--region", spec.region])
            .args(["--seed", &(i as u64 + 1).to_string()])
            .args(["--rps", &options.requests_per_second.to_string()])
            .env_remove("PERISCOPE_API_KEY")
            .stdin(Stdio::piped())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", spec.name))?;
        fleet.children.push((*spec, child));
    }
    let python_shop = crate::demo_python::start(addr, &agent_key, &log_dir, options.requests_per_second).await;
    if let Some(child) = python_shop {
        fleet.children.push((crate::demo_python::SPEC, child));
    }

    let expected = fleet.children.len();
    let ready = wait_ready(&broker_state_url(addr), &api_key, expected, &mut fleet).await;
    let example = match ready {
        Ok(example) => example,
        Err(e) => {
            fleet.stop(Duration::from_secs(2)).await;
            let _ = stop_broker.send(());
            let _ = broker.await;
            return Err(e.context(format!("shop logs are in {}", log_dir.display())));
        }
    };
    print_banner(addr, &api_key, key_source, &fleet, &log_dir, &example);

    shutdown.await;
    println!("\nStopping the shops and the broker...");
    fleet.stop(Duration::from_secs(5)).await;
    let _ = stop_broker.send(());
    match broker.await {
        Ok(result) => result?,
        Err(e) => bail!("the broker task failed: {e}"),
    }
    println!("Stopped.");
    Ok(())
}

fn broker_state_url(addr: SocketAddr) -> String {
    format!("http://{addr}/api/v1")
}

/// A location worth a first snapshot.
struct Example {
    file: String,
    line: u64,
}

/// Waits until every shop's agent is online and the "order placed" event has run.
async fn wait_ready(api: &str, key: &str, instances: usize, fleet: &mut Fleet) -> anyhow::Result<Example> {
    let client = reqwest::Client::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        for (spec, child) in &mut fleet.children {
            if let Some(status) = child.try_wait()? {
                bail!("{} exited early ({status})", spec.name);
            }
        }
        let online = client
            .get(format!("{api}/agents?status=online"))
            .bearer_auth(key)
            .send()
            .await
            .ok()
            .and_then(|r| r.status().is_success().then_some(r));
        let online: usize = match online {
            Some(r) => r.json::<serde_json::Value>().await.ok().and_then(|v| v["total"].as_u64()).unwrap_or(0) as usize,
            None => 0,
        };
        if online >= instances {
            let sources = client
                .get(format!("{api}/sources?q=total_cents&pool=shop&limit=50"))
                .bearer_auth(key)
                .send()
                .await
                .ok();
            if let Some(r) = sources {
                let page: serde_json::Value = r.json().await.unwrap_or_default();
                let found = page["items"].as_array().and_then(|items| {
                    items.iter().find(|s| {
                        s["kind"] == "event"
                            && s["fields"].as_array().is_some_and(|f| f.iter().any(|x| x == "order_id"))
                    })
                });
                if let Some(s) = found {
                    return Ok(Example {
                        file: s["file"].as_str().unwrap_or_default().to_owned(),
                        line: s["line"].as_u64().unwrap_or(0),
                    });
                }
            }
        }
        if tokio::time::Instant::now() > deadline {
            bail!("the shops did not come online with their catalogs within 60 s ({online}/{instances} agents online)");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn print_banner(addr: SocketAddr, key: &str, key_source: &str, fleet: &Fleet, log_dir: &std::path::Path, ex: &Example) {
    let base = format!("http://{addr}");
    let pools: Vec<String> = fleet
        .children
        .iter()
        .map(|(s, _)| format!("{} (pool {}, tags {})", s.name, s.pool, s.tags.join(" ")))
        .collect();
    println!("Periscope demo is running.");
    println!();
    println!("  MCP endpoint:  {base}/mcp");
    println!("  REST API:      {base}/api/v1");
    println!("  API key:       {key}  ({key_source})");
    println!("  Shops:         {}", pools.join("\n                 "));
    println!("  Shop logs:     {}", log_dir.display());
    println!();
    println!("Try it: place a snapshot on the line that logs \"order placed\" in the EU shops, then wait for its hit:");
    println!();
    println!(
        "  id=$(curl -s -X POST {base}/api/v1/actions -H 'Authorization: Bearer {key}' -H 'Content-Type: application/json' \\\n      -d '{{\"pool\":\"shop\",\"tags\":[\"region:eu\"],\"file\":\"{}\",\"line\":{},\"max_hits\":1}}' | sed -E 's/.*\"action_id\":\"([^\"]+)\".*/\\1/')",
        ex.file, ex.line
    );
    println!("  curl -s \"{base}/api/v1/actions/$id/hits?wait_seconds=30\" -H 'Authorization: Bearer {key}'");
    println!();
    if fleet.children.iter().any(|(s, _)| s.pool == crate::demo_python::SPEC.pool)
        && let Some(line) = crate::demo_python::example_line()
    {
        println!(
            "The Python shop (pool {}) takes the same calls on any line of pyshop.py; its order total:",
            crate::demo_python::SPEC.pool
        );
        println!();
        println!(
            "  curl -s -X POST {base}/api/v1/actions -H 'Authorization: Bearer {key}' -H 'Content-Type: application/json' \\\n      -d '{{\"pool\":\"{}\",\"file\":\"pyshop.py\",\"line\":{line},\"max_hits\":1}}'",
            crate::demo_python::SPEC.pool
        );
        println!();
    }
    println!("Press Ctrl-C to stop.");
}

/// Options of the hidden `periscope shop-instance` command (one demo child).
#[derive(Debug, Clone)]
pub struct ShopInstanceOptions {
    /// Pool.
    pub pool: String,
    /// Instance name.
    pub instance: String,
    /// Region label.
    pub region: String,
    /// Seed for data and load.
    pub seed: u64,
    /// Load generator rate.
    pub requests_per_second: f64,
}

/// Runs one shop with its agent and load generator until stdin closes or a signal.
/// The caller has installed the tracing subscriber with `agent.layer()`.
pub async fn run_shop_instance(
    options: ShopInstanceOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.context("binding the shop's port")?;
    let url = format!("http://{}", listener.local_addr()?);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let shop_config = periscope_demo::ShopConfig::new(options.instance.clone(), options.region.clone(), options.seed);
    let shop = tokio::spawn(periscope_demo::serve(listener, shop_config, stopped(stop_rx.clone())));
    let load_config = periscope_demo::LoadConfig::new(options.requests_per_second, options.seed);
    let load = tokio::spawn(periscope_demo::generate_load(url.clone(), load_config, stopped(stop_rx)));
    tracing::info!(instance = %options.instance, %url, pool = %options.pool, "demo shop running");
    shutdown.await;
    let _ = stop_tx.send(true);
    let stats = load.await.context("load generator")?;
    tracing::info!(?stats, "load generator stopped");
    shop.await.context("shop")?.context("shop server")?;
    Ok(())
}
