//! What an unauthenticated request costs the broker: the key lookup behind a 401, counted
//! in instructions (`benches/unauthorized.sh`, under callgrind), and 401s per second
//! over real HTTP against a broker on loopback.
//!
//! Run:
//! - `cargo run --release -p periscope-benches --example unauthorized -- lookup <n>`: `n`
//!   lookups of unknown API keys in a key directory of 50 stored keys.
//! - `cargo run --release -p periscope-benches --example unauthorized -- refresh <n>`: `n`
//!   freshness checks of that directory (what a lookup cost before it stopped
//!   consulting the database for keys it does not know).
//! - `cargo run --release -p periscope-benches --example unauthorized -- http <secs> <connections> [busy]`:
//!   requests with unknown keys on that many keep-alive connections for `secs` seconds;
//!   prints 401s per second. With `busy`, another connection commits to the broker's
//!   database every millisecond, as the store's writer does while hits flow in.

use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use periscope_broker::BrokerConfig;
use periscope_broker::audit::Actor;
use periscope_broker::config::ApiKeyConfig;
use periscope_broker::keys::{KeyKind, KeyStore, NewKey};
use periscope_broker::quota::CallerSettings;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let mode = args.get(1).map(String::as_str).unwrap_or("lookup");
    let n: u64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(100_000);
    match mode {
        "lookup" | "refresh" => tokio::runtime::Builder::new_current_thread().build()?.block_on(lookups(mode, n)),
        "http" => {
            let conns: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(4);
            let busy = args.get(4).is_some_and(|a| a == "busy");
            tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(http(n, conns, busy))
        }
        other => anyhow::bail!("unknown mode `{other}`: lookup, refresh or http"),
    }
}

/// A key that looks like a real one and is not.
fn unknown_key(i: u64) -> String {
    format!("psk_{:032x}", i.wrapping_mul(0x9e37_79b9_7f4a_7c15))
}

async fn lookups(mode: &str, n: u64) -> anyhow::Result<()> {
    let dir = periscope_broker::store::ScratchDir::new()?;
    let backend = std::sync::Arc::new(periscope_broker::backend::local::SqliteKeys::open(dir.path())?);
    let keys = KeyStore::open(
        backend,
        &[ApiKeyConfig::new("configured", "bench-key-0123456789")],
        &[],
        CallerSettings::default(),
    )
    .await?;
    for i in 0..50 {
        keys.create(
            NewKey {
                kind: KeyKind::Api,
                name: format!("key {i}"),
                org: "default".into(),
                role: None,
                group: None,
                scopes: None,
                pools: None,
                quotas: None,
                expires_at_ms: None,
            },
            &Actor::cli(),
        )
        .await?;
    }
    let tokens: Vec<String> = (0..1024).map(unknown_key).collect();
    let start = Instant::now();
    let mut refused = 0u64;
    for i in 0..n {
        let token = &tokens[(i % 1024) as usize];
        if mode == "refresh" {
            black_box(keys.refresh().await.is_ok());
        } else if keys.authenticate_api(black_box(token)).await.is_err() {
            refused += 1;
        }
    }
    let took = start.elapsed();
    eprintln!("{mode}: {n} in {took:?} ({:.0} ns each), {refused} refused", took.as_nanos() as f64 / n.max(1) as f64);
    Ok(())
}

async fn http(secs: u64, conns: usize, busy: bool) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let dir = periscope_broker::store::ScratchDir::new()?;
    let mut config = BrokerConfig { data_dir: Some(dir.path().to_owned()), ..Default::default() };
    config.api_keys.push(ApiKeyConfig::new("configured", "bench-key-0123456789"));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let broker = tokio::spawn(periscope_broker::run(listener, config, async move {
        let _ = stopped.await;
    }));
    let stop_writing = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = busy.then(|| {
        let (path, stop) = (dir.path().to_owned(), Arc::clone(&stop_writing));
        std::thread::spawn(move || -> anyhow::Result<u64> {
            // Wait for the broker to create its database.
            std::thread::sleep(Duration::from_millis(500));
            let conn = periscope_broker::store::open_connection(&path)?;
            let mut commits = 0u64;
            while !stop.load(Ordering::Relaxed) {
                conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('bench', ?1)", [commits.to_string()])?;
                commits += 1;
                std::thread::sleep(Duration::from_millis(1));
            }
            Ok(commits)
        })
    });
    let url = format!("http://{addr}/api/v1/agents");
    let done = Arc::new(AtomicU64::new(0));
    let until = Instant::now() + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for c in 0..conns {
        let (url, done) = (url.clone(), Arc::clone(&done));
        tasks.push(tokio::spawn(async move {
            let client = reqwest::Client::builder().pool_max_idle_per_host(1).build().expect("client");
            let mut i = c as u64 * 1_000_000_007;
            while Instant::now() < until {
                i += 1;
                let Ok(resp) = client.get(&url).bearer_auth(unknown_key(i)).send().await else { continue };
                if resp.status() == 401 {
                    let _ = resp.bytes().await;
                    done.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for t in tasks {
        t.await?;
    }
    let n = done.load(Ordering::Relaxed);
    stop_writing.store(true, Ordering::Relaxed);
    let commits = match writer {
        Some(w) => w.join().map_err(|_| anyhow::anyhow!("the writer panicked"))??,
        None => 0,
    };
    println!(
        "{n} responses 401 in {secs} s on {conns} connections ({commits} commits by another connection): {:.0} per second",
        n as f64 / secs as f64
    );
    let _ = stop.send(());
    broker.await??;
    Ok(())
}
