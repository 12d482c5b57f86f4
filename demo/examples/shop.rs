//! Runs one shop with its load generator and logs to the terminal.
//!
//! ```sh
//! cargo run -p periscope-demo --example shop -- 10   # seconds of traffic, default 5
//! RUST_LOG=periscope_demo=debug cargo run -p periscope-demo --example shop
//! ```
//!
//! This is what a `periscope demo` child does, minus the agent: install a subscriber,
//! serve, drive load, print what the load generator counted.

use std::time::Duration;

use periscope_demo::{LoadConfig, ShopConfig, generate_load, serve};
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("periscope_demo=info"));
    tracing_subscriber::fmt().with_env_filter(filter).init();
    let seconds: u64 = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(5);

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let shop = tokio::spawn(serve(listener, ShopConfig::new("shop-eu-1", "eu-west", 1), async {
        let _ = stopped.await;
    }));
    let stats = generate_load(url, LoadConfig::default(), tokio::time::sleep(Duration::from_secs(seconds))).await;
    let _ = stop.send(());
    if let Ok(result) = shop.await {
        result?;
    }
    println!("{stats:#?}");
    Ok(())
}
