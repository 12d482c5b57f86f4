//! The labelled-corpus accuracy test: recall per kind and hard negatives touched.
//!
//! The corpus is generated at test time by `redaction/corpus/generate.py` (Faker plus
//! hand-written hard negatives, fixed seed), with the interpreter the project's test
//! entry point provides in `PERISCOPE_PYTHON` (or `<repo>/.venv/bin/python`).

use std::path::{Path, PathBuf};
use std::process::Command;

use periscope_redaction::Redactor;

#[path = "../../corpus/eval.rs"]
mod eval;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_default()
}

fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("PERISCOPE_PYTHON") {
        let p = PathBuf::from(p);
        assert!(p.exists(), "PERISCOPE_PYTHON={} does not exist; run scripts/test to create the venv", p.display());
        return p;
    }
    let venv = repo_root().join(".venv/bin/python");
    assert!(
        venv.exists(),
        "no Python with faker: PERISCOPE_PYTHON is unset and {} does not exist. Run scripts/test \
         (it creates .venv and installs requirements-dev.txt), or by hand: python3 -m venv .venv && \
         .venv/bin/pip install -r requirements-dev.txt",
        venv.display()
    );
    venv
}

fn generate_corpus() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("periscope-redaction-corpus-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let out = dir.join("corpus.jsonl");
    let script = repo_root().join("redaction/corpus/generate.py");
    let status = Command::new(python())
        .arg(&script)
        .args(["--seed", "1234", "--out"])
        .arg(&out)
        .status()
        .expect("run the corpus generator");
    assert!(status.success(), "{} failed ({status}); is faker installed (requirements-dev.txt)?", script.display());
    out
}

#[test]
fn the_default_rules_reach_the_recall_and_false_positive_targets_on_the_labelled_corpus() {
    let path = generate_corpus();
    let samples = eval::load(&path).expect("corpus parses");
    let _ = std::fs::remove_dir_all(path.parent().unwrap_or(&path));
    assert!(samples.len() > 5_000, "corpus too small: {}", samples.len());

    let scores = eval::score(&Redactor::default_rules(), &samples);
    println!("{}", scores.table());
    for (kind, input, output) in scores.misses.iter().take(40) {
        println!("MISS {kind}: {input}\n  -> {output}");
    }
    for (kind, input, output) in scores.touched.iter().take(15) {
        println!("TOUCHED {kind}: {input}\n  -> {output}");
    }
    for (kind, k) in &scores.positives {
        let recall = k.redacted as f64 / k.total as f64;
        assert!(recall >= 0.99, "recall for {kind} is {:.2}% (< 99%)", recall * 100.0);
    }
    assert!(scores.touched_rate() <= 0.01, "{:.2}% of hard negatives touched (> 1%)", scores.touched_rate() * 100.0);
}
