//! Redacts one case of the redaction bench (`benches/benches/redaction.rs`) a number of
//! times, so that `benches/redaction_instructions.sh` can count the instructions per
//! byte under callgrind: a measure that, unlike throughput, does not move with the load
//! of a shared machine.
//!
//! Run: `cargo run --release -p periscope-benches --example redaction_cost -- <case> <rounds>`
//! where `<case>` is `clean_log_lines`, `pii_dense_log_lines`, `mixed_log_lines`,
//! `debug_output` or `json_snapshot_value`.

use std::hint::black_box;

use periscope_benches::{redaction_snapshots, redaction_text_cases};
use periscope_protocol::Value;
use periscope_redaction::{Redactor, Report};

#[inline(never)]
fn redact_text(redactor: &Redactor, text: &str, report: &mut Report) -> usize {
    report.clear();
    text.split_inclusive('\n').map(|line| redactor.redact_text(black_box(line), "log", report).len()).sum()
}

#[inline(never)]
fn redact_values(redactor: &Redactor, values: &mut [Value], report: &mut Report) {
    report.clear();
    for v in values.iter_mut() {
        redactor.redact_field("request", v, "fields.request", report);
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let case = args.next().unwrap_or_else(|| "clean_log_lines".into());
    let rounds: usize = args.next().and_then(|n| n.parse().ok()).unwrap_or(10);
    let redactor = Redactor::default_rules();
    let mut report = Report::new();
    if case == "json_snapshot_value" {
        let snapshots = redaction_snapshots();
        let bytes: usize = snapshots.iter().map(Value::encoded_len).sum();
        for _ in 0..rounds {
            let mut values = snapshots.clone();
            redact_values(&redactor, &mut values, &mut report);
        }
        println!("{bytes}");
        return;
    }
    let Some((_, text)) = redaction_text_cases().into_iter().find(|(name, _)| *name == case) else {
        eprintln!("unknown case `{case}`");
        std::process::exit(2);
    };
    let mut out = 0usize;
    for _ in 0..rounds {
        out += redact_text(&redactor, &text, &mut report);
    }
    black_box(out);
    println!("{}", text.len());
}
