//! Capture on error, through MCP against real agents: a `capture_errors` action makes a
//! Rust agent snapshot ERROR events and panics (once per location and type per
//! interval, within a budget per agent, every occurrence counted), and `list_errors`
//! answers what is failing, newest first, with a snapshot each.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::{Value, json};

use crate::mcp::{body, call, code, connect_to, text};
use crate::support::{API_KEY, TestAgent, TestBroker, eventually, wait_installed, wait_online};

/// Panics whose message carries this marker, as the host's own hook saw them.
static HOST_HOOK_SAW: AtomicUsize = AtomicUsize::new(0);
const MARKER: &str = "periscope-it-boom";

/// The host's own panic hook, set once for this test binary before any error capture
/// is placed by these tests; it chains to whatever hook was there (the test harness's).
fn install_host_hook() {
    static ONCE: Mutex<bool> = Mutex::new(false);
    let mut done = ONCE.lock().unwrap();
    if *done {
        return;
    }
    *done = true;
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let text = info
            .payload()
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| info.payload().downcast_ref::<&str>().map(|s| (*s).to_owned()))
            .unwrap_or_default();
        if text.contains(MARKER) {
            HOST_HOOK_SAW.fetch_add(1, Ordering::SeqCst);
        } else {
            previous(info);
        }
    }));
}

fn charge_card(order_id: u64, attempt: u32) {
    let _span = tracing::info_span!("charge_card", order_id, attempt).entered();
    tracing::error!(error = "card declined", card = "4111 1111 1111 1111", "payment failed for {}", "ada@example.com");
}

fn reserve_stock(sku: &str) {
    let _span = tracing::info_span!("reserve_stock", sku).entered();
    let _ = std::panic::catch_unwind(|| panic!("{MARKER}: no stock for {}", "sku-7"));
}

/// The errors `list_errors` returns, once `ready` holds for them.
async fn errors_until(
    client: &crate::mcp::Client,
    args: Value,
    what: &str,
    ready: impl Fn(&[Value]) -> bool,
) -> Vec<Value> {
    eventually(Duration::from_secs(20), what, || async {
        let r = call(client, "list_errors", args.clone()).await;
        assert_eq!(code(&r), None, "{}", text(&r));
        let errors = body(&r)["errors"].as_array().cloned().unwrap_or_default();
        ready(&errors).then_some(errors)
    })
    .await
}

fn find<'a>(errors: &'a [Value], kind: &str) -> Option<&'a Value> {
    errors.iter().find(|e| e["kind"] == kind)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_and_an_error_event_are_captured_once_each_with_their_stacks_and_every_occurrence_counted() {
    install_host_hook();
    let broker = TestBroker::start().await;
    let api = broker.api();
    let agent = TestAgent::start(&broker.ws_url(), "shop", &["region:eu"]);
    let other = TestAgent::start(&broker.ws_url(), "shop", &["region:us"]);
    wait_online(&api, &agent.id()).await;
    wait_online(&api, &other.id()).await;
    let client = connect_to(&broker.http(), API_KEY).await.unwrap();

    let r = call(&client, "capture_errors", json!({"pool": "shop", "tags": ["region:eu"]})).await;
    assert_eq!(code(&r), None, "{}", text(&r));
    let action = body(&r)["action"].clone();
    assert_eq!(action["kind"], "capture_errors");
    assert_eq!(action["agents"].as_array().map(Vec::len), Some(1), "only the EU agent: {action:#}");
    let action_id = action["action_id"].as_str().unwrap().to_owned();
    wait_installed(&api, &action_id, &agent.id()).await;

    // Five declined cards at one location, then three panics at another: one capture each.
    agent
        .run(|| {
            for attempt in 0..5 {
                charge_card(42, attempt);
            }
        })
        .join()
        .unwrap();
    std::thread::sleep(Duration::from_millis(50));
    agent
        .run(|| {
            for _ in 0..3 {
                reserve_stock("sku-7");
            }
        })
        .join()
        .unwrap();
    // The US agent fails too, but no capture is placed on it.
    other.run(|| charge_card(7, 0)).join().unwrap();

    let errors = errors_until(&client, json!({"pool": "shop"}), "both errors counted", |e| {
        find(e, "event").is_some_and(|x| x["count"] == 5) && find(e, "panic").is_some_and(|x| x["count"] == 3)
    })
    .await;
    assert_eq!(errors.len(), 2, "{errors:#?}");
    assert_eq!(errors[0]["kind"], "panic", "newest first: {errors:#?}");
    assert!(errors[0]["last_seen_ms"].as_u64() >= errors[1]["last_seen_ms"].as_u64());

    let event = find(&errors, "event").unwrap();
    assert_eq!((event["captured"].as_u64(), event["uncaptured"].as_u64()), (Some(1), Some(4)), "{event:#}");
    assert!(event["file"].as_str().unwrap().ends_with("it/errors.rs"), "{event:#}");
    let message = event["message"].as_str().unwrap();
    assert_eq!(message, "payment failed for [REDACTED:EMAIL]: card declined", "{event:#}");
    assert_eq!(event["snapshot"]["error"]["message"], message, "the snapshot's error, redacted too");
    assert_eq!(event["pools"], json!(["shop"]));
    let snap = &event["snapshot"];
    assert_eq!(snap["error"]["kind"], "event", "{snap:#}");
    assert_eq!(snap["spans"][0]["name"], "charge_card", "{snap:#}");
    assert_eq!(snap["spans"][0]["fields"]["order_id"]["value"], 42, "{snap:#}");
    let card = snap["fields"]["card"].to_string();
    assert!(!card.contains("4111 1111 1111 1111"), "the card number is redacted: {card}");

    let panic = find(&errors, "panic").unwrap();
    assert_eq!((panic["captured"].as_u64(), panic["uncaptured"].as_u64()), (Some(1), Some(2)), "{panic:#}");
    assert_eq!(panic["error_type"], "panic");
    assert!(panic["message"].as_str().unwrap().contains("no stock for sku-7"), "{panic:#}");
    let snap = &panic["snapshot"];
    assert_eq!(snap["location"]["line"], event_line_of_panic(), "{snap:#}");
    assert_eq!(snap["spans"][0]["name"], "reserve_stock", "{snap:#}");
    let frames = snap["backtrace"].as_array().cloned().unwrap_or_default();
    assert!(frames.iter().any(|f| f.as_str().is_some_and(|f| f.contains("reserve_stock"))), "{frames:#?}");
    assert_eq!(HOST_HOOK_SAW.load(Ordering::SeqCst), 3, "the host's own hook ran for every panic");

    // Filters: another pool, tags the agent lacks, a service.
    let none = call(&client, "list_errors", json!({"pool": "shop", "tags": ["region:us"]})).await;
    assert_eq!(body(&none)["count"], 0, "{}", text(&none));
    let eu = call(&client, "list_errors", json!({"pool": "shop", "tags": ["region:eu"]})).await;
    assert!(text(&eu).contains("5 occurrence(s), 1 captured, 4 not captured"), "{}", text(&eu));
    let by_service = call(&client, "list_errors", json!({"service": "it-service", "snapshots": false})).await;
    assert_eq!(body(&by_service)["count"], 2, "{}", text(&by_service));
    assert!(body(&by_service)["errors"][0].get("snapshot").is_none());
    assert!(text(&by_service).contains("3 occurrence(s), 1 captured"), "{}", text(&by_service));

    // The same over REST; the action itself holds both snapshots.
    let (status, page) = api.get("/errors?pool=shop&tag=region:eu&limit=1").await;
    assert_eq!(status, 200, "{page:#}");
    assert_eq!((page["count"].as_u64(), page["errors"][0]["kind"].as_str()), (Some(1), Some("panic")));
    let (_, hits) = api.get(&format!("/actions/{action_id}/hits")).await;
    assert_eq!(hits["hits"].as_array().map(Vec::len), Some(2), "{hits:#}");

    // Removed like any action: later errors are neither captured nor counted.
    let r = call(&client, "remove_action", json!({"action_id": action_id})).await;
    assert_eq!(code(&r), None, "{}", text(&r));
    agent.run(|| charge_card(43, 0)).join().unwrap();
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let after = call(&client, "list_errors", json!({"pool": "shop"})).await;
    assert_eq!(find(body(&after)["errors"].as_array().unwrap(), "event").unwrap()["count"], 5);

    client.cancel().await.unwrap();
    agent.shutdown();
    other.shutdown();
    broker.stop().await;
}

/// The line of the `panic!` in `reserve_stock`.
fn event_line_of_panic() -> u32 {
    let src = include_str!("errors.rs");
    let at = src.lines().position(|l| l.contains("catch_unwind(|| panic!(")).unwrap();
    u32::try_from(at + 1).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_capture_per_location_per_interval_and_per_agent_budget_while_every_occurrence_counts() {
    let broker = TestBroker::start().await;
    let api = broker.api();
    let agent = TestAgent::start(&broker.ws_url(), "budget", &[]);
    wait_online(&api, &agent.id()).await;
    let client = connect_to(&broker.http(), API_KEY).await.unwrap();
    let r = call(&client, "capture_errors", json!({"pool": "budget", "max_captures_per_agent": 2})).await;
    assert_eq!(code(&r), None, "{}", text(&r));
    let action_id = body(&r)["action"]["action_id"].as_str().unwrap().to_owned();
    wait_installed(&api, &action_id, &agent.id()).await;

    // Captured; within the interval (counted only); after it (captured: budget spent);
    // after it again (counted only: no budget left).
    for pause_after in [0, 1_100, 1_100, 0] {
        agent.run(|| charge_card(1, 0)).join().unwrap();
        std::thread::sleep(Duration::from_millis(pause_after));
    }
    agent.run(|| charge_card(1, 1)).join().unwrap();
    let errors = errors_until(&client, json!({"pool": "budget"}), "five occurrences counted", |e| {
        e.first().is_some_and(|x| x["count"] == 5)
    })
    .await;
    let e = &errors[0];
    assert_eq!((e["captured"].as_u64(), e["uncaptured"].as_u64()), (Some(2), Some(3)), "{e:#}");
    let (_, hits) = api.get(&format!("/actions/{action_id}/hits")).await;
    assert_eq!(hits["hits"].as_array().map(Vec::len), Some(2), "{hits:#}");

    // Bad arguments are refused with their range.
    let r = call(&client, "capture_errors", json!({"pool": "budget", "min_interval_ms": 10})).await;
    assert_eq!(code(&r).as_deref(), Some("invalid_input"), "{}", text(&r));
    assert!(text(&r).contains("min_interval_ms is 10; allowed range is 1000..=3600000"), "{}", text(&r));
    let r = call(&client, "list_errors", json!({"limit": 0})).await;
    assert_eq!(code(&r).as_deref(), Some("invalid_input"), "{}", text(&r));

    client.cancel().await.unwrap();
    agent.shutdown();
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_cluster_errors_captured_through_one_node_are_listed_by_another() {
    let cluster = crate::support::TestCluster::start(2).await;
    let (a, b) = (cluster.node(0), cluster.node(1));
    let agent = TestAgent::start(&a.ws_url(), "cluster-errors", &["region:eu"]);
    wait_online(&a.api(), &agent.id()).await;
    wait_online(&b.api(), &agent.id()).await;
    // Placed through node b: the agent is held by node a.
    let via_b = connect_to(&b.http(), API_KEY).await.unwrap();
    let r = call(&via_b, "capture_errors", json!({"pool": "cluster-errors"})).await;
    assert_eq!(code(&r), None, "{}", text(&r));
    let action_id = body(&r)["action"]["action_id"].as_str().unwrap().to_owned();
    wait_installed(&a.api(), &action_id, &agent.id()).await;
    agent
        .run(|| {
            for attempt in 0..3 {
                charge_card(9, attempt);
            }
        })
        .join()
        .unwrap();
    // Counts and the snapshot reach every node: listed through b, whatever a holds.
    let errors = errors_until(&via_b, json!({"pool": "cluster-errors"}), "the error counted through node b", |e| {
        e.first().is_some_and(|x| x["count"] == 3 && x["snapshot"].is_object())
    })
    .await;
    assert_eq!((errors[0]["captured"].as_u64(), errors[0]["uncaptured"].as_u64()), (Some(1), Some(2)));
    assert_eq!(errors[0]["snapshot"]["spans"][0]["name"], "charge_card", "{:#}", errors[0]);
    via_b.cancel().await.unwrap();
    agent.shutdown();
    cluster.stop().await;
}
