fn main() {
    let r = periscope_redaction::Redactor::default_rules();
    let line = "2024-06-12T10:11:12.123Z INFO auth::session_cache request completed: method=GET path=/api/v2/orders status=200 duration_ms=1234 request_id=8f3a9c1d-2e4b-4a6f-a7c8-d9e0f1a2b3c4 order_id=ORD-123456 version=v1.2.3 commit=abcdef012345 retries=2 host=web-12.prod port=8080\n";
    let mut rep = periscope_redaction::Report::new();
    println!("{}", r.redact_text(line, "x", &mut rep));
    let n = 200_000;
    let t = std::time::Instant::now();
    let mut total = 0;
    for _ in 0..n { rep.clear(); total += r.redact_text(std::hint::black_box(line), "x", &mut rep).len(); }
    let el = t.elapsed();
    println!("{:.1} MB/s {}", (line.len() * n) as f64 / el.as_secs_f64() / 1e6, total);
}
