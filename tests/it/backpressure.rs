//! What agents send waits for the database writer instead of queuing without bound, and
//! nothing taken in is dropped on the way.

use std::time::Duration;

use serde_json::json;

use crate::support::*;

/// A gauge or counter from `/metrics`.
fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map_or_else(|| panic!("{name} is not on /metrics"), |v| v as u64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_log_lines_stays_within_the_store_queue_and_every_line_is_stored() {
    const QUEUE: u64 = 64 * 1024;
    // Frames of 50 lines, each well within the queue's room.
    const FRAMES: u64 = 200;
    const PER_FRAME: u64 = 50;
    let data_dir = temp_dir("backpressure");
    let mut config = test_config();
    config.data_dir = Some(data_dir.clone());
    config.store.max_queued_bytes = QUEUE;
    // Nothing rate-limited: the flood is meant to reach the store.
    config.ingest.action_log_lines_per_sec = 1_000_000.0;
    config.ingest.action_log_bytes_per_sec = 1 << 30;
    config.ingest.agent_bytes_per_sec = 1 << 30;
    config.ingest.key_bytes_per_sec = 1 << 30;
    config.ingest.org_bytes_per_sec = 1 << 30;
    let broker = TestBroker::start_with(config, "127.0.0.1:0".parse().unwrap()).await;
    let api = broker.api();
    let (mut agent, _) = RawAgent::registered(&broker, AGENT_KEY, "agt_floodstore", "flood").await;
    agent.publish("src/flood.rs", 5, &["n"]).await;
    let id = eventually(Duration::from_secs(10), "the log placed once the location is known", || {
        let api = api.clone();
        async move {
            let body = json!({"pool": "flood", "file": "src/flood.rs", "line": 5, "template": "x"});
            let (status, log) = api.post("/logs", body).await;
            (status == 201).then(|| log["action_id"].as_str().unwrap().to_owned())
        }
    })
    .await;
    agent.until("action_add").await;

    // 10,000 lines, 2.5 MB of them: forty times the room the store's queue has.
    let text = "order ord_123 for user 48213 moved to pending; ".repeat(5);
    for f in 0..FRAMES {
        let lines: Vec<_> = (0..PER_FRAME)
            .map(
                |i| json!({"action_id": id, "seq": f * PER_FRAME + i + 1, "time_ms": 1, "level": "info", "text": text}),
            )
            .collect();
        agent.send(json!({"type": "log_lines", "lines": lines})).await;
    }
    let total = FRAMES * PER_FRAME;
    let metrics = || {
        let (client, url) = (reqwest::Client::new(), format!("{}/metrics", broker.http()));
        async move { client.get(url).bearer_auth(ADMIN_KEY).send().await.unwrap().text().await.unwrap() }
    };
    let text = eventually(Duration::from_secs(60), "every line taken in and committed", || {
        let m = metrics();
        async move {
            let text = m.await;
            let done = metric(&text, "periscope_log_lines_accepted_total") == total
                && metric(&text, "periscope_store_queue_rows") == 0;
            done.then_some(text)
        }
    })
    .await;
    let peak = metric(&text, "periscope_store_queue_peak_bytes");
    assert_eq!(metric(&text, "periscope_store_queue_capacity_bytes"), QUEUE);
    assert!(peak > 0 && peak <= QUEUE, "the queue held {peak} bytes at most, within {QUEUE}");
    assert!(metric(&text, "periscope_store_ingest_waits_total") > 0, "the session waited for the writer");
    assert_eq!(metric(&text, "periscope_log_lines_refused_total"), 0);

    // Every line is in the database, none dropped on the way.
    broker.stop().await;
    let (_store, loaded) = periscope_broker::store::Store::open(&data_dir).unwrap();
    let mut seqs: Vec<u64> = loaded
        .lines
        .iter()
        .map(|l| serde_json::from_str::<serde_json::Value>(&l.body).unwrap()["seq"].as_u64().unwrap())
        .collect();
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=total).collect::<Vec<_>>());
    let _ = std::fs::remove_dir_all(&data_dir);
}
