//! Times inputs built to make a regex scanner rescan: long runs that keep a pattern
//! alive while candidates inside them are rejected. Each should take milliseconds for
//! 100 KB; a quadratic regression shows up as seconds. (Timings are not asserted in tests:
//! the machines are shared.)
//!
//! Run: `cargo run --release -p periscope-redaction --example pathological`
fn main() {
    let r = periscope_redaction::Redactor::default_rules();
    let cases = [
        ("digits+spaces", "1 ".repeat(50_000)),
        ("digit run", "1".repeat(100_000)),
        ("hex run ::", format!("{}::x", "a".repeat(100_000))),
        ("dots", "1.".repeat(50_000)),
        ("local part", format!("{}@x.png", "a".repeat(100_000))),
        ("key=", "key=".repeat(25_000)),
        ("token.1", format!("token{}", ".1".repeat(50_000))),
        ("markers", "[REDACTED:X]".repeat(8_000)),
        ("eyJ-", "eyJ-".repeat(25_000)),
        ("password=", "password=a ".repeat(10_000)),
        ("4111 ", "4111 ".repeat(20_000)),
        ("(0) ", "+1 (0) ".repeat(15_000)),
        ("call ", "call 1 2 3 4 5 6 7 8 9 ".repeat(5_000)),
        ("sk-", format!("sk-{}", "a1-".repeat(33_000))),
        ("https://a", format!("https://{}", "a1.".repeat(33_000))),
        ("x1.1.1.1", "x1.2.3.4.".repeat(10_000)),
        ("AB12", "AB12 ".repeat(20_000)),
        ("aa:bb", "aa:".repeat(33_000)),
        ("Bearer", "Bearer ".repeat(14_000)),
    ];
    for (name, text) in cases {
        let t = std::time::Instant::now();
        let mut rep = periscope_redaction::Report::new();
        let out = r.redact_text(&text, "t", &mut rep);
        println!(
            "{name:>14}: {:>8.1} ms, {} -> {} bytes, {} findings",
            t.elapsed().as_secs_f64() * 1e3,
            text.len(),
            out.len(),
            rep.len()
        );
    }
}
