//! What the durability barrier costs a caller: the time from queuing one action row to
//! knowing it is committed (`StoreHandle::barrier`), against queuing it alone, and a barrier
//! with nothing queued, measured side by side in one run on the same database.
//!
//! Run: `cargo run --release -p periscope-benches --example store_barrier -- 2000`

use std::time::Instant;

use periscope_broker::store::{ActionRow, Store};

fn row(i: u64) -> ActionRow {
    ActionRow {
        id: format!("act_{i:016x}"),
        spec: r#"{"id":"act_x","location":{"file":"src/shop.rs","line":501},"expires_at_ms":1,"kind":{"type":"snapshot","max_hits":1}}"#.into(),
        target: r#"{"pool":"shop","tags":[]}"#.into(),
        created_by: "bench".into(),
        created_at_ms: i,
        status: "active".into(),
        ended_at_ms: None,
        end_reason: None,
        pending_note: None,
        hits_refused: 0,
        org: "default".into(),
        created_by_key: "key_bench".into(),
        reach: None,
        pools: None,
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let n: u64 = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(2_000);
    let dir = std::env::temp_dir().join(format!("periscope-barrier-{}", std::process::id()));
    let (store, _) = Store::open(&dir)?;
    let store = store.handle();
    let mut next = 0;
    // Rounds alternate so that the machine's load falls on all three alike.
    let (mut queued, mut durable, mut idle) = (0f64, 0f64, 0f64);
    for _ in 0..5 {
        let t = Instant::now();
        for _ in 0..n {
            next += 1;
            store.put_action(row(next));
        }
        queued += t.elapsed().as_secs_f64();
        store.barrier().await;
        let t = Instant::now();
        for _ in 0..n {
            next += 1;
            store.put_action(row(next));
            store.barrier().await;
        }
        durable += t.elapsed().as_secs_f64();
        let t = Instant::now();
        for _ in 0..n {
            store.barrier().await;
        }
        idle += t.elapsed().as_secs_f64();
    }
    let per = |total: f64| total / (5 * n) as f64 * 1e6;
    println!(
        "per action: queued only {:.1} µs, queued and committed {:.1} µs; an idle barrier {:.1} µs",
        per(queued),
        per(durable),
        per(idle)
    );
    drop(store);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
