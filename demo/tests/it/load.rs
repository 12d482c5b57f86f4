//! The load generator drives a real shop and counts what happened.

use std::time::Duration;

use periscope_demo::{LoadConfig, ShopConfig, generate_load};

use crate::support::TestShop;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bounded_run_gets_mostly_successes_and_some_expected_failures() {
    let config = ShopConfig {
        payment_timeout: Duration::from_millis(100),
        processor_latency: Duration::from_millis(2),
        decline_rate: 0.2,
        slow_payment_rate: 0.1,
        ..ShopConfig::new("shop-load", "test-region", 5)
    };
    let shop = TestShop::start(config).await;
    let load = LoadConfig { concurrency: 4, max_requests: Some(600), ..LoadConfig::new(2_000.0, 9) };
    // The budget ends the run; the long shutdown timer only guards against a hang.
    let stats = generate_load(shop.url.clone(), load, tokio::time::sleep(Duration::from_secs(120))).await;

    assert_eq!(stats.requests, 600, "{stats:?}");
    assert_eq!(stats.transport_errors, 0, "{stats:?}");
    assert_eq!(stats.successes + stats.client_errors + stats.server_errors, 600, "{stats:?}");
    assert!(stats.successes * 10 >= stats.requests * 7, "mostly 2xx: {stats:?}");
    assert!(stats.client_errors > 0, "expected failures happen: {stats:?}");
    assert!(stats.orders_placed > 0 && stats.payments_captured > 0, "{stats:?}");
    assert!(stats.payments_declined + stats.payments_timed_out > 0, "{stats:?}");
    assert_eq!(stats.server_errors, stats.payments_timed_out, "the only 5xx are processor timeouts: {stats:?}");
    shop.stop().await.unwrap();
}

#[tokio::test]
async fn an_unreachable_shop_is_counted_not_fatal() {
    // Bind then drop a listener so the port is (almost certainly) closed.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    let load = LoadConfig { max_requests: Some(20), ..LoadConfig::new(1_000.0, 1) };
    let stats = generate_load(url, load, tokio::time::sleep(Duration::from_secs(60))).await;
    assert_eq!(stats.requests, 20);
    assert_eq!(stats.transport_errors, 20);
}
