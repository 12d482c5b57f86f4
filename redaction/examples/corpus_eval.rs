//! Scores the default rules on a corpus from `redaction/corpus/generate.py` and prints
//! the table, or JSON with `--json` (what `benches/presidio_compare.py` reads).
//!
//! Run: `cargo run --release -p periscope-redaction --example corpus_eval -- CORPUS.jsonl [--json]`

#[path = "../corpus/eval.rs"]
mod eval;

use periscope_redaction::Redactor;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(path) = args.iter().find(|a| !a.starts_with("--")) else {
        eprintln!("usage: corpus_eval CORPUS.jsonl [--json]");
        std::process::exit(2);
    };
    let samples = match eval::load(std::path::Path::new(path)) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(1);
        }
    };
    let redactor = Redactor::default_rules();
    // Warm up (the lazy DFA fills its cache), then measure a few rounds.
    let _ = eval::score(&redactor, &samples);
    let mut best = eval::score(&redactor, &samples);
    for _ in 0..4 {
        let s = eval::score(&redactor, &samples);
        if s.seconds < best.seconds {
            best = s;
        }
    }
    if args.iter().any(|a| a == "--json") {
        let kinds: serde_json::Map<String, serde_json::Value> = best
            .positives
            .iter()
            .map(|(k, v)| {
                (k.clone(), serde_json::json!({"n": v.total, "redacted": v.redacted, "attributed": v.attributed}))
            })
            .collect();
        let negatives: serde_json::Map<String, serde_json::Value> =
            best.negatives.iter().map(|(k, (n, t))| (k.clone(), serde_json::json!({"n": n, "touched": t}))).collect();
        let out = serde_json::json!({
            "bytes": best.bytes,
            "seconds": best.seconds,
            "positives": kinds,
            "negatives": negatives,
        });
        println!("{out}");
    } else {
        print!("{}", best.table());
        for (kind, input, output) in &best.misses {
            println!("MISS {kind}: {input}\n  -> {output}");
        }
        for (kind, input, output) in &best.touched {
            println!("TOUCHED {kind}: {input}\n  -> {output}");
        }
    }
}
