//! `periscope host-bench`: what the agent costs the service it lives in, with the broker
//! healthy, slow, and unreachable, measured as ratios in one run.
//!
//! It starts five copies of the demo shop as real processes (`periscope
//! host-bench-service`): one without the agent (the baseline), one with the agent
//! connected but in a pool no action reaches (`idle`: what attaching the agent costs),
//! and three with it, each agent reaching the broker through its own TCP proxy. With
//! every agent connected it places a snapshot and a dynamic log on the handler the load
//! runs through (in the three proxied shops), then drives all five shops with the same
//! steady load, one request to each in turn, so that whatever else the machine does
//! falls on all alike. A first window has every proxy passing bytes through (healthy
//! broker); then a second snapshot is placed and, once every agent has it, one proxy
//! trickles (`--slow-bytes-per-sec`) and one goes dark (existing connections closed,
//! new ones accepted and never answered) for `--duration`. An agent that cannot deliver
//! captures nothing (its queue full, or no session): the host pays two atomic loads per
//! firing, and the drops are counted. Then the proxies recover, and the
//! report waits for the broker to show the hits each agent dropped while it could not
//! reach it. Latencies are exact (every sample kept, bounded by [`MAX_SAMPLES`]); the
//! shops' memory is read from `/proc` before and after the outage.
//!
//! With `--language python` the five shops are the demo's Python shop
//! (`demo/python/pyshop.py bench`: the standard library's threaded HTTP server), the
//! baseline run by the interpreter alone and the others through `python -m
//! periscope_agent run`, exactly as a team attaches the agent; the actions go on a line
//! of the handler every request runs.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::loadtest::{ProcSample, USER_HZ, loadavg, proc_sample};

/// Latency samples kept per service and window (beyond them, samples are counted only).
pub const MAX_SAMPLES: usize = 2_000_000;

/// What to run, from the command line.
#[derive(Debug, Clone)]
pub struct Options {
    /// Broker base URL (`http://host:port`).
    pub broker: url::Url,
    /// API key (places and removes actions, reads agents).
    pub api_key: String,
    /// Agent key for the shops' agents.
    pub agent_key: String,
    /// Pool the shops' agents register into.
    pub pool: String,
    /// Healthy window (every proxy passing).
    pub healthy: Duration,
    /// Outage window (one proxy slow, one dark).
    pub duration: Duration,
    /// Requests per second to each shop.
    pub rps: f64,
    /// What the slow proxy lets through, each way.
    pub slow_bytes_per_sec: usize,
    /// The shops, and so the agent, being measured.
    pub host: Host,
}

/// Which service, with which agent, the shops are.
#[derive(Debug, Clone)]
pub enum Host {
    /// The demo's Rust shop (`periscope host-bench-service`) with the Rust agent.
    Rust {
        /// The `periscope` executable that runs the shops.
        exe: PathBuf,
    },
    /// The demo's Python shop with the Python agent.
    Python {
        /// An interpreter with `periscope_agent` installed.
        python: PathBuf,
        /// `demo/python/pyshop.py`.
        script: PathBuf,
    },
}

/// The `return product` line of the Python shop's `get_product` (any line can be
/// probed), found in the script so that editing it moves nothing.
fn python_probe_line(script: &std::path::Path) -> anyhow::Result<u64> {
    let text = std::fs::read_to_string(script).with_context(|| format!("reading {}", script.display()))?;
    let start = text
        .lines()
        .position(|l| l.starts_with("def get_product("))
        .with_context(|| format!("{} has no `def get_product(`", script.display()))?;
    text.lines()
        .enumerate()
        .skip(start)
        .find(|(_, l)| l.trim() == "return product")
        .map(|(i, _)| i as u64 + 1)
        .with_context(|| format!("{}: get_product has no `return product` line", script.display()))
}

impl Host {
    /// Where the actions go, once the agents' catalogs (`sources`) show it: the
    /// `get_product` item `list_sources` shows for the Rust shop; for the Python one,
    /// `python_line` in `pyshop.py` once some item of that file is listed.
    fn location(&self, sources: &serde_json::Value, python_line: Option<u64>) -> Option<(String, u64)> {
        let items = sources["items"].as_array().map(Vec::as_slice).unwrap_or_default();
        match self {
            Host::Rust { .. } => items.iter().find_map(|i| {
                (i["name"].as_str()? == "get_product" && i["file"].as_str()?.ends_with("http.rs"))
                    .then(|| Some(("demo/src/http.rs".to_owned(), i["line"].as_u64()?)))?
            }),
            Host::Python { .. } => items
                .iter()
                .any(|i| i["file"].as_str().is_some_and(|f| f.ends_with("pyshop.py")))
                .then(|| Some(("pyshop.py".to_owned(), python_line?)))?,
        }
    }

    /// The dynamic log's template: the handler's product id, by its name there.
    fn log_template(&self) -> &'static str {
        match self {
            Host::Rust { .. } => "product {id} read",
            Host::Python { .. } => "product {product_id} read",
        }
    }
}

impl Options {
    /// Checks the flags make a run, with a sentence for each problem.
    pub fn validate(&self) -> anyhow::Result<()> {
        if !matches!(self.broker.scheme(), "http" | "https") {
            bail!("--broker {}: the URL must start with http:// or https://", self.broker);
        }
        if self.api_key.is_empty() || self.agent_key.is_empty() {
            bail!("--api-key and --agent-key are required (or PERISCOPE_API_KEY and PERISCOPE_AGENT_KEY)");
        }
        if !periscope_protocol::messages::is_label(&self.pool, 128) {
            bail!("--pool `{}` must be 1 to 128 characters from A-Z a-z 0-9 . _ : = / -", self.pool);
        }
        if !self.rps.is_finite() || !(1.0..=2_000.0).contains(&self.rps) {
            bail!("--rps is {}; allowed range is 1..=2000 requests per second per shop", self.rps);
        }
        if self.duration.is_zero() || self.healthy.is_zero() {
            bail!("--duration and --healthy-seconds must be above zero");
        }
        if !(1..=100_000_000).contains(&self.slow_bytes_per_sec) {
            bail!("--slow-bytes-per-sec is {}; allowed range is 1..=100000000", self.slow_bytes_per_sec);
        }
        if let Host::Python { script, .. } = &self.host
            && !script.is_file()
        {
            bail!("{} is not there: run host-bench --language python from the repository", script.display());
        }
        Ok(())
    }
}

/// What a proxy does with the bytes between an agent and the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Passes them through.
    Pass,
    /// Passes at most a set number of bytes per second each way.
    Slow,
    /// Closes what is open; accepts new connections and never answers.
    Dark,
}

/// A TCP proxy in front of the broker whose behaviour can be switched while it runs.
struct Proxy {
    addr: SocketAddr,
    mode: watch::Sender<Mode>,
}

impl Proxy {
    async fn start(upstream: SocketAddr, slow_bps: usize) -> anyhow::Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await.context("binding a proxy port")?;
        let addr = listener.local_addr()?;
        let (mode, rx) = watch::channel(Mode::Pass);
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                let mut rx = rx.clone();
                tokio::spawn(async move {
                    if *rx.borrow_and_update() == Mode::Dark {
                        // Accepted, never answered, closed once the broker is back.
                        let _ = rx.wait_for(|m| *m != Mode::Dark).await;
                        drop(socket);
                        return;
                    }
                    let Ok(up) = TcpStream::connect(upstream).await else { return };
                    let _ = socket.set_nodelay(true);
                    let _ = up.set_nodelay(true);
                    let (a_read, a_write) = socket.into_split();
                    let (b_read, b_write) = up.into_split();
                    let mut dark = rx.clone();
                    tokio::select! {
                        () = pump(a_read, b_write, rx.clone(), slow_bps) => {}
                        () = pump(b_read, a_write, rx, slow_bps) => {}
                        _ = dark.wait_for(|m| *m == Mode::Dark) => {}
                    }
                });
            }
        });
        Ok(Proxy { addr, mode })
    }

    fn set(&self, mode: Mode) {
        let _ = self.mode.send(mode);
    }
}

/// Copies one direction; in [`Mode::Slow`], a tenth of the per-second allowance every
/// 100 ms.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut mode: watch::Receiver<Mode>,
    slow_bps: usize,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let slow = *mode.borrow_and_update() == Mode::Slow;
        let cap = if slow { (slow_bps / 10).clamp(1, buf.len()) } else { buf.len() };
        let n = tokio::select! {
            r = from.read(&mut buf[..cap]) => match r {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
            changed = mode.changed() => {
                if changed.is_err() {
                    return;
                }
                continue;
            }
        };
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
        if slow {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// One shop process and its load client.
struct Shop {
    name: &'static str,
    child: tokio::process::Child,
    pid: u32,
    url: String,
    /// Its agent's pool; none for the baseline.
    pool: Option<String>,
    /// Its agent's id, once known (the Python shop does not know it: the broker is
    /// asked).
    agent_id: Option<String>,
    http: reqwest::Client,
}

/// Says, with its output, why `python` cannot run the Python shops' agent.
async fn check_python(python: &std::path::Path) -> anyhow::Result<()> {
    let out = tokio::process::Command::new(python)
        .args(["-c", "import periscope_agent"])
        .stdin(Stdio::null())
        .output()
        .await
        .with_context(|| format!("running {} (--python, or PERISCOPE_PYTHON)", python.display()))?;
    if !out.status.success() {
        bail!(
            "{} cannot import periscope_agent (install the agent: scripts/build-python-agent --release, then pip \
             install the wheel): {}",
            python.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

async fn start_shop(
    opts: &Options,
    name: &'static str,
    broker_ws: Option<String>,
    pool: &str,
    seed: u64,
) -> anyhow::Result<Shop> {
    let mut cmd = match &opts.host {
        Host::Rust { exe } => {
            let mut cmd = tokio::process::Command::new(exe);
            cmd.arg("host-bench-service")
                .arg("--instance")
                .arg(format!("host-bench-{name}"))
                .arg("--seed")
                .arg(seed.to_string());
            if let Some(ws) = &broker_ws {
                cmd.args(["--broker-url", ws, "--agent-key", &opts.agent_key, "--pool", pool]);
                cmd.arg("--tags").arg(format!("variant:{name}"));
            }
            cmd
        }
        Host::Python { python, script } => {
            let mut cmd = tokio::process::Command::new(python);
            // The same interpreter and script with and without the agent; the agent
            // attached the way a team attaches it, from the outside.
            if let Some(ws) = &broker_ws {
                cmd.args(["-m", "periscope_agent", "run", "--"]).arg(python);
                cmd.env("PERISCOPE_BROKER_URL", format!("{ws}/agents"))
                    .env("PERISCOPE_AGENT_KEY", &opts.agent_key)
                    .env("PERISCOPE_POOL", pool)
                    .env("PERISCOPE_TAGS", format!("variant:{name}"))
                    .env("PERISCOPE_SERVICE", "host-bench-pyshop")
                    .env("PERISCOPE_DISPLAY_NAME", format!("host-bench-{name}"))
                    .env("PERISCOPE_RECONNECT_INITIAL_MS", "500");
            }
            cmd.arg(script).arg("bench").env_remove("PERISCOPE_API_KEY");
            cmd
        }
    };
    cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::inherit()).kill_on_drop(true);
    let mut child = cmd.spawn().context("starting a shop")?;
    let pid = child.id().context("the shop exited at once")?;
    let stdout = child.stdout.take().context("the shop's stdout")?;
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .context("the shop did not say where it listens within 30 s")?
        .context("reading the shop's stdout")?
        .context("the shop exited before saying where it listens")?;
    let ready: serde_json::Value = serde_json::from_str(&line).with_context(|| format!("the shop said `{line}`"))?;
    let url = ready["url"].as_str().context("the shop's ready line has no url")?.to_owned();
    let agent_id = ready["agent_id"].as_str().map(str::to_owned);
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(1)
        .timeout(Duration::from_secs(10))
        .build()
        .context("building the HTTP client")?;
    let pool = broker_ws.is_some().then(|| pool.to_owned());
    Ok(Shop { name, child, pid, url, pool, agent_id, http })
}

/// Exact percentiles of one set of samples.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Figures {
    /// Requests answered.
    pub count: u64,
    /// Requests that failed (counted, not timed).
    pub errors: u64,
    /// Mean, µs.
    pub mean_us: f64,
    /// Median, µs.
    pub p50_us: u64,
    /// 90th percentile, µs.
    pub p90_us: u64,
    /// 99th percentile, µs.
    pub p99_us: u64,
    /// Ratio of the mean to the baseline's (same window).
    pub mean_ratio: Option<f64>,
    /// Ratio of the median to the baseline's.
    pub p50_ratio: Option<f64>,
    /// Ratio of the 99th percentile to the baseline's.
    pub p99_ratio: Option<f64>,
}

#[derive(Default)]
struct Samples {
    micros: Vec<u32>,
    count: u64,
    errors: u64,
}

impl Samples {
    fn figures(&mut self) -> Figures {
        self.micros.sort_unstable();
        let q = |q: f64| {
            if self.micros.is_empty() {
                return 0;
            }
            let i = ((self.micros.len() as f64 * q).ceil() as usize).clamp(1, self.micros.len()) - 1;
            u64::from(self.micros[i])
        };
        let mean = if self.micros.is_empty() {
            0.0
        } else {
            self.micros.iter().map(|&m| f64::from(m)).sum::<f64>() / self.micros.len() as f64
        };
        Figures {
            count: self.count,
            errors: self.errors,
            mean_us: (mean * 10.0).round() / 10.0,
            p50_us: q(0.5),
            p90_us: q(0.9),
            p99_us: q(0.99),
            ..Figures::default()
        }
    }
}

/// One shop's figures in one window, with its memory.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ShopReport {
    /// `baseline` (no agent), `healthy`, `slow` or `dark` (what its broker does in the
    /// outage window).
    pub shop: String,
    /// Its agent's id (none for the baseline).
    pub agent_id: Option<String>,
    /// Latencies with every broker healthy.
    pub healthy_window: Figures,
    /// Latencies while the slow and dark brokers are so.
    pub outage_window: Figures,
    /// Resident memory when the outage starts, KiB.
    pub rss_before_outage_kib: u64,
    /// When it ends, KiB.
    pub rss_after_outage_kib: u64,
    /// Peak over the process's life, KiB.
    pub rss_peak_kib: u64,
    /// CPU time (user and system, every thread: the service's and the agent's) the
    /// process used in the outage window, seconds: where a latency ratio's cost went.
    pub outage_cpu_seconds: f64,
    /// The agent's drop counters as the broker shows them after the outage (its last
    /// heartbeat): hits dropped while disconnected, on a full queue, over rates.
    pub dropped_disconnected: Option<u64>,
    /// Hits dropped on a full queue.
    pub dropped_queue_full: Option<u64>,
    /// Hits dropped over the agent's rates.
    pub dropped_rate: Option<u64>,
    /// Whether the agent was online again when the report was made.
    pub reconnected: Option<bool>,
}

/// What a run measured.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Report {
    /// Requests per second to each shop.
    pub rps: f64,
    /// Healthy window, seconds.
    pub healthy_seconds: f64,
    /// Outage window, seconds.
    pub outage_seconds: f64,
    /// Bytes per second the slow proxy passes each way.
    pub slow_bytes_per_sec: usize,
    /// Seconds from the end of the outage to the broker showing every agent's drops.
    pub drops_reported_after_seconds: Option<f64>,
    /// Load average at the start and the end.
    pub loadavg: (String, String),
    /// Per shop.
    pub shops: Vec<ShopReport>,
}

/// Sends one request to each shop in turn (the order rotating every tick) at `rps` per
/// shop until `until`.
async fn drive(shops: &[Shop], samples: &mut [Samples], rps: f64, until: Instant, tick0: &mut u64) {
    let mut interval = tokio::time::interval(Duration::from_secs_f64(1.0 / rps));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    while Instant::now() < until {
        interval.tick().await;
        *tick0 += 1;
        let tick = *tick0;
        for k in 0..shops.len() {
            let i = (k + tick as usize) % shops.len();
            let url = format!("{}/products/{}", shops[i].url, 1 + tick % 40);
            let started = Instant::now();
            let ok = match shops[i].http.get(&url).send().await {
                Ok(r) => r.status().is_success() && r.bytes().await.is_ok(),
                Err(_) => false,
            };
            let s = &mut samples[i];
            if ok {
                s.count += 1;
                if s.micros.len() < MAX_SAMPLES {
                    s.micros.push(started.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
                }
            } else {
                s.errors += 1;
            }
        }
    }
}

async fn api(
    http: &reqwest::Client,
    opts: &Options,
    method: reqwest::Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> anyhow::Result<serde_json::Value> {
    let url = opts.broker.join(path).with_context(|| format!("building the URL of {path}"))?;
    let mut req = http.request(method.clone(), url).bearer_auth(&opts.api_key);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.with_context(|| format!("{method} {path}"))?;
    let status = resp.status();
    let text = resp.text().await.with_context(|| format!("{method} {path}: reading the answer"))?;
    if !status.is_success() {
        bail!("{method} {path}: HTTP {status}: {}", periscope_protocol::value::truncate_chars(&text, 400));
    }
    serde_json::from_str(&text).with_context(|| format!("{method} {path}: the answer is not JSON"))
}

/// The id of the online agent in `pool` tagged `variant:{name}` (how a shop that does not
/// print its agent's id is found).
async fn find_agent(http: &reqwest::Client, opts: &Options, pool: &str, name: &str) -> Option<String> {
    let path = format!("/api/v1/agents?pool={pool}&tag=variant:{name}&status=online&limit=2");
    let list = api(http, opts, reqwest::Method::GET, &path, None).await.ok()?;
    let items = list["items"].as_array()?;
    match items.as_slice() {
        [one] => one["agent_id"].as_str().map(str::to_owned),
        _ => None,
    }
}

fn is_online(view: &serde_json::Value) -> bool {
    view["status"] == "online"
}

async fn agent_view(http: &reqwest::Client, opts: &Options, id: &str) -> Option<serde_json::Value> {
    api(http, opts, reqwest::Method::GET, &format!("/api/v1/agents/{id}"), None).await.ok()
}

async fn place_snapshot(
    http: &reqwest::Client,
    opts: &Options,
    target: &serde_json::Value,
) -> anyhow::Result<serde_json::Value> {
    let mut snapshot = target.clone();
    snapshot["max_hits"] = 50.into();
    snapshot["expire_seconds"] = 3_600.into();
    api(http, opts, reqwest::Method::POST, "/api/v1/actions", Some(snapshot)).await
}

/// Runs the bench and returns its report.
pub async fn run(opts: Options) -> anyhow::Result<Report> {
    opts.validate()?;
    let python_line = match &opts.host {
        Host::Python { python, script } => {
            check_python(python).await?;
            Some(python_probe_line(script)?)
        }
        Host::Rust { .. } => None,
    };
    let http =
        reqwest::Client::builder().timeout(Duration::from_secs(30)).build().context("building the HTTP client")?;
    api(&http, &opts, reqwest::Method::GET, "/api/v1/agents", None)
        .await
        .context("reaching the broker before the run")?;
    let host = opts.broker.host_str().context("--broker has no host")?;
    let port = opts.broker.port_or_known_default().context("--broker has no port")?;
    let upstream = tokio::net::lookup_host((host, port))
        .await
        .with_context(|| format!("resolving {host}:{port}"))?
        .next()
        .with_context(|| format!("{host}:{port} resolves to nothing"))?;
    let names = ["healthy", "slow", "dark"];
    let mut proxies = Vec::new();
    for _ in names {
        proxies.push(Proxy::start(upstream, opts.slow_bytes_per_sec).await?);
    }
    // `idle` has the agent, connected straight to the broker, in a pool of its own that
    // no action reaches: what attaching the agent costs before anything is placed.
    let idle_pool = format!("{}-idle", opts.pool);
    let direct = format!("ws://{}", upstream);
    let mut shops = vec![
        start_shop(&opts, "baseline", None, &opts.pool, 1).await?,
        start_shop(&opts, "idle", Some(direct), &idle_pool, 1).await?,
    ];
    for (name, proxy) in names.iter().zip(&proxies) {
        shops.push(start_shop(&opts, name, Some(format!("ws://{}", proxy.addr)), &opts.pool, 1).await?);
    }
    let dark_shop = shops.len() - 1;
    let placed_on = shops.iter().filter(|s| s.pool.is_some() && s.name != "idle").count();
    let with_agent = shops.iter().filter(|s| s.pool.is_some()).count();
    // Every agent online with its catalog.
    let (file, line) = {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let mut online = 0;
            for shop in &mut shops {
                if let (None, Some(pool)) = (&shop.agent_id, &shop.pool) {
                    shop.agent_id = find_agent(&http, &opts, pool, shop.name).await;
                }
                if let Some(id) = &shop.agent_id
                    && agent_view(&http, &opts, id).await.is_some_and(|v| is_online(&v))
                {
                    online += 1;
                }
            }
            // The handler's callsite registers (and reaches the catalog) when it first runs.
            for shop in &shops {
                let _ = shop.http.get(format!("{}/products/1", shop.url)).send().await;
            }
            let sources = api(
                &http,
                &opts,
                reqwest::Method::GET,
                &format!("/api/v1/sources?pool={}&q=get_product&limit=50", opts.pool),
                None,
            )
            .await
            .ok();
            let location = sources.as_ref().and_then(|s| opts.host.location(s, python_line));
            if online == with_agent
                && let Some(location) = location
            {
                break location;
            }
            if Instant::now() > deadline {
                bail!("the shops' agents did not come online with their catalogs within 60 s ({online} online)");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    // A snapshot and a log on every agent, on the handler each request runs.
    let target = serde_json::json!({ "pool": opts.pool, "file": file, "line": line });
    let mut placed = vec![place_snapshot(&http, &opts, &target).await?];
    let mut log = target.clone();
    log["template"] = opts.host.log_template().into();
    log["expire_seconds"] = 3_600.into();
    placed.push(api(&http, &opts, reqwest::Method::POST, "/api/v1/logs", Some(log)).await?);

    let load_start = loadavg();
    let mut healthy: Vec<Samples> = shops.iter().map(|_| Samples::default()).collect();
    let mut outage: Vec<Samples> = shops.iter().map(|_| Samples::default()).collect();
    let mut tick = 0;
    // Warm every shop and connection before anything is timed.
    drive(
        &shops,
        &mut shops.iter().map(|_| Samples::default()).collect::<Vec<_>>(),
        opts.rps,
        Instant::now() + Duration::from_secs(1),
        &mut tick,
    )
    .await;
    drive(&shops, &mut healthy, opts.rps, Instant::now() + opts.healthy, &mut tick).await;
    // A fresh snapshot for the outage: the agents that cannot deliver keep capturing
    // for it (a hit lost to a missing broker gives its slot back), the worst case.
    let outage_snapshot = place_snapshot(&http, &opts, &target).await?;
    let id = outage_snapshot["action_id"].as_str().unwrap_or_default().to_owned();
    placed.push(outage_snapshot);
    let installed_by = Instant::now() + Duration::from_secs(30);
    loop {
        let view = api(&http, &opts, reqwest::Method::GET, &format!("/api/v1/actions/{id}"), None).await?;
        let states: Vec<&str> = view["agents"]
            .as_array()
            .map(|a| a.iter().filter_map(|s| s["state"].as_str()).collect())
            .unwrap_or_default();
        if states.len() == placed_on && states.iter().all(|s| *s != "pending") {
            break;
        }
        if Instant::now() > installed_by {
            bail!("the outage snapshot was not installed on every agent within 30 s: {states:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let before: Vec<ProcSample> = shops.iter().map(|s| proc_sample(s.pid).unwrap_or_default()).collect();
    proxies[1].set(Mode::Slow);
    proxies[2].set(Mode::Dark);
    drive(&shops, &mut outage, opts.rps, Instant::now() + opts.duration, &mut tick).await;
    let after: Vec<ProcSample> = shops.iter().map(|s| proc_sample(s.pid).unwrap_or_default()).collect();
    let load_end = loadavg();
    for p in &proxies {
        p.set(Mode::Pass);
    }
    let recovered = Instant::now();
    // The broker shows each agent's drops once it is back: its next heartbeat.
    let mut views: Vec<Option<serde_json::Value>> = vec![None; shops.len()];
    let mut reported_after = None;
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        for (i, shop) in shops.iter().enumerate() {
            if let Some(id) = &shop.agent_id {
                views[i] = agent_view(&http, &opts, id).await;
            }
        }
        let dark_reported = views[dark_shop]
            .as_ref()
            .is_some_and(|v| is_online(v) && v["stats"]["hits_dropped_disconnected"].as_u64().unwrap_or(0) > 0);
        let all_online = views.iter().skip(1).all(|v| v.as_ref().is_some_and(is_online));
        if dark_reported && all_online {
            reported_after = Some(recovered.elapsed().as_secs_f64());
            // One more heartbeat, so counters sent after reconnecting are in.
            tokio::time::sleep(Duration::from_secs(2)).await;
            for (i, shop) in shops.iter().enumerate() {
                if let Some(id) = &shop.agent_id {
                    views[i] = agent_view(&http, &opts, id).await.or(views[i].take());
                }
            }
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    for p in &placed {
        if let Some(id) = p["action_id"].as_str() {
            let _ = api(&http, &opts, reqwest::Method::DELETE, &format!("/api/v1/actions/{id}"), None).await;
        }
    }
    let base_h = healthy[0].figures();
    let base_o = outage[0].figures();
    let ratio = |a: f64, b: f64| (b > 0.0).then(|| (a / b * 1000.0).round() / 1000.0);
    let with_ratios = |mut f: Figures, base: &Figures| {
        f.mean_ratio = ratio(f.mean_us, base.mean_us);
        f.p50_ratio = ratio(f.p50_us as f64, base.p50_us as f64);
        f.p99_ratio = ratio(f.p99_us as f64, base.p99_us as f64);
        f
    };
    let mut report = Report {
        rps: opts.rps,
        healthy_seconds: opts.healthy.as_secs_f64(),
        outage_seconds: opts.duration.as_secs_f64(),
        slow_bytes_per_sec: opts.slow_bytes_per_sec,
        drops_reported_after_seconds: reported_after,
        loadavg: (load_start, load_end),
        shops: Vec::new(),
    };
    for (i, shop) in shops.iter_mut().enumerate() {
        let (h, o) = (healthy[i].figures(), outage[i].figures());
        let view = views[i].as_ref();
        let stat = |k: &str| view.and_then(|v| v["stats"][k].as_u64());
        report.shops.push(ShopReport {
            shop: shop.name.to_owned(),
            agent_id: shop.agent_id.clone(),
            healthy_window: with_ratios(h, &base_h),
            outage_window: with_ratios(o, &base_o),
            rss_before_outage_kib: before[i].rss_kib,
            rss_after_outage_kib: after[i].rss_kib,
            rss_peak_kib: after[i].hwm_kib,
            outage_cpu_seconds: (after[i].cpu_ticks.saturating_sub(before[i].cpu_ticks) as f64 / USER_HZ * 100.0)
                .round()
                / 100.0,
            dropped_disconnected: stat("hits_dropped_disconnected"),
            dropped_queue_full: stat("hits_dropped_queue_full"),
            dropped_rate: stat("hits_dropped_rate"),
            reconnected: view.map(is_online),
        });
        // Closing its stdin stops the shop.
        drop(shop.child.stdin.take());
    }
    for shop in &mut shops {
        if tokio::time::timeout(Duration::from_secs(10), shop.child.wait()).await.is_err() {
            let _ = shop.child.kill().await;
        }
    }
    Ok(report)
}

impl Report {
    /// The report as a person reads it.
    pub fn render(&self) -> String {
        use std::fmt::Write as _;
        let mut o = String::new();
        let _ = writeln!(
            o,
            "{} req/s to each shop; healthy window {:.0} s, outage window {:.0} s (slow proxy: {} B/s each way); \
             load average {} -> {}",
            self.rps,
            self.healthy_seconds,
            self.outage_seconds,
            self.slow_bytes_per_sec,
            self.loadavg.0,
            self.loadavg.1
        );
        let r = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.3}"));
        for (title, pick) in [
            (
                "healthy window (every broker healthy)",
                (|s: &ShopReport| &s.healthy_window) as fn(&ShopReport) -> &Figures,
            ),
            ("outage window (slow: trickling proxy; dark: unreachable)", |s: &ShopReport| &s.outage_window),
        ] {
            let _ = writeln!(o, "{title}:");
            for s in &self.shops {
                let f = pick(s);
                let _ = writeln!(
                    o,
                    "  {:<8} n={} errors={} mean={:.0} µs (x{}) p50={} µs (x{}) p90={} µs p99={} µs (x{})",
                    s.shop,
                    f.count,
                    f.errors,
                    f.mean_us,
                    r(f.mean_ratio),
                    f.p50_us,
                    r(f.p50_ratio),
                    f.p90_us,
                    f.p99_us,
                    r(f.p99_ratio)
                );
            }
        }
        let _ = writeln!(o, "memory and drops:");
        for s in &self.shops {
            let d = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());
            let _ = writeln!(
                o,
                "  {:<8} RSS {:.1} -> {:.1} MiB (peak {:.1}); CPU in the outage {:.2} s; dropped while disconnected {}, \
                 queue full {}, rate {}; back online {}",
                s.shop,
                s.rss_before_outage_kib as f64 / 1024.0,
                s.rss_after_outage_kib as f64 / 1024.0,
                s.rss_peak_kib as f64 / 1024.0,
                s.outage_cpu_seconds,
                d(s.dropped_disconnected),
                d(s.dropped_queue_full),
                d(s.dropped_rate),
                s.reconnected.map_or("-".to_string(), |b| b.to_string())
            );
        }
        match self.drops_reported_after_seconds {
            Some(s) => {
                let _ = writeln!(o, "the broker showed the dark agent's drops {s:.1} s after it was reachable again");
            }
            None => {
                let _ = writeln!(o, "the broker did not show the dark agent's drops within 120 s of recovery");
            }
        }
        o
    }
}

/// The shop a `host-bench` child runs: the demo shop with (or without) the agent, no
/// load generator of its own; prints one JSON line (`url`, `agent_id`) when it listens,
/// and stops when its standard input closes.
pub async fn serve_shop(
    instance: String,
    seed: u64,
    agent_id: Option<String>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0").await.context("binding the shop's port")?;
    let url = format!("http://{}", listener.local_addr()?);
    println!("{}", serde_json::json!({ "url": url, "agent_id": agent_id }));
    let config = periscope_demo::ShopConfig::new(instance, "bench", seed);
    periscope_demo::serve(listener, config, shutdown).await.context("shop server")?;
    Ok(())
}
