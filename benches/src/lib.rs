//! Shared fixtures for the criterion benches in `benches/benches/` and the
//! instruction-count examples in `benches/examples/`: deterministic inputs, so every
//! run (and every version compared) measures the same bytes.

use periscope_protocol::value::{List, Map, Object};
use periscope_protocol::{ActionId, Field, Hit, HitLocation, SpanFrame, ThreadInfo, TruncationSummary, Value};
/// A tiny deterministic generator, so every run measures the same bytes.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[(self.next() as usize) % items.len()]
    }
    fn hex(&mut self, n: usize) -> String {
        (0..n).map(|_| char::from(b"0123456789abcdef"[(self.next() % 16) as usize])).collect()
    }
    fn num(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo)
    }
}

const MODULES: &[&str] = &[
    "orders::service",
    "payments::gateway",
    "http::server",
    "db::pool",
    "auth::session_cache",
    "inventory::sync",
    "tokio_postgres::connection",
];
const WORDS: &[&str] = &[
    "request completed",
    "cache miss for key",
    "retrying after backoff",
    "connection established",
    "processing batch",
    "scheduled job finished",
    "slow query detected",
    "user lookup",
    "rate limit checked",
    "handler returned",
];
const PATHS: &[&str] = &["/api/v2/orders", "/healthz", "/api/v2/users/search", "/metrics", "/api/v2/carts/checkout"];

fn clean_line(g: &mut Lcg) -> String {
    let uuid = format!("{}-{}-4{}-a{}-{}", g.hex(8), g.hex(4), g.hex(3), g.hex(3), g.hex(12));
    format!(
        "2024-06-{:02}T{:02}:{:02}:{:02}.{:03}Z INFO {} {}: method=GET path={} status={} duration_ms={} request_id={} \
         order_id=ORD-{} version=v1.{}.{} commit={} retries={} host=web-{:02}.prod port={}\n",
        g.num(1, 29),
        g.num(0, 24),
        g.num(0, 60),
        g.num(0, 60),
        g.num(0, 1000),
        g.pick(MODULES),
        g.pick(WORDS),
        g.pick(PATHS),
        g.pick(&["200", "201", "204", "304", "404", "500"]),
        g.num(1, 2000),
        uuid,
        g.num(100_000, 999_999),
        g.num(0, 30),
        g.num(0, 10),
        g.hex(12),
        g.num(0, 4),
        g.num(1, 40),
        g.pick(&["8080", "443", "5432", "6379"]),
    )
}

fn pii_line(g: &mut Lcg) -> String {
    let pii = match g.next() % 8 {
        0 => format!("user=jane.doe{}@example.com", g.num(1, 999)),
        1 => format!("phone=+1-415-555-{:04}", g.num(0, 10_000)),
        2 => "card=4111 1111 1111 1111".to_owned(),
        3 => format!("client_ip=203.0.113.{}", g.num(1, 255)),
        4 => format!("password={}", g.hex(12)),
        5 => format!("auth=Bearer {}", g.hex(40)),
        6 => "iban=GB82WEST12345698765432".to_owned(),
        _ => format!("ssn={:03}-{:02}-{:04}", g.num(100, 600), g.num(10, 99), g.num(1000, 9999)),
    };
    format!(
        "2024-06-{:02}T{:02}:{:02}:{:02}Z WARN {} {}: {} status={} duration_ms={}\n",
        g.num(1, 29),
        g.num(0, 24),
        g.num(0, 60),
        g.num(0, 60),
        g.pick(MODULES),
        g.pick(WORDS),
        pii,
        g.pick(&["200", "401", "500"]),
        g.num(1, 2000),
    )
}

fn lines(n_bytes: usize, f: fn(&mut Lcg) -> String) -> String {
    let mut g = Lcg(42);
    let mut out = String::with_capacity(n_bytes + 256);
    while out.len() < n_bytes {
        out.push_str(&f(&mut g));
    }
    out
}

fn object(name: &str, fields: Vec<(&str, Value)>) -> Value {
    Value::Object(Object {
        type_name: name.into(),
        fields: fields.into_iter().map(|(n, v)| Field::new(n, v)).collect(),
        omitted: 0,
    })
}

/// An order as a snapshot captures it: nested four levels, 40 lines, long strings.
pub fn order(lines: usize) -> Value {
    let geo = object("GeoPoint", vec![("lat", Value::Float(47.37)), ("lon", Value::Float(8.54))]);
    let address = object(
        "Address",
        vec![("street", "1 Main Street".into()), ("city", "Zürich".into()), ("postcode", "8001".into()), ("geo", geo)],
    );
    let customer = object(
        "Customer",
        vec![
            ("id", Value::Int(7)),
            ("name", "Ada Lovelace".into()),
            ("email", "[REDACTED:EMAIL]".into()),
            ("address", address),
        ],
    );
    let items = (0..lines)
        .map(|i| {
            object(
                "Line",
                vec![("sku", format!("SKU-{i:05}").into()), ("qty", Value::Int(2)), ("price_cents", Value::Int(1999))],
            )
        })
        .collect();
    object(
        "Order",
        vec![
            ("id", Value::Int(42)),
            ("customer", customer),
            ("lines", Value::List(List { type_name: Some("Vec".into()), items, omitted: 0 })),
            ("gift_message", "Happy birthday! ".repeat(40).into()),
            ("status", "Paid".into()),
        ],
    )
}

fn snapshot(g: &mut Lcg) -> Value {
    let items = (0..12)
        .map(|i| {
            object(
                "LineItem",
                vec![
                    ("sku", Value::str(format!("SKU-{}", g.num(10_000, 99_999)))),
                    ("name", Value::str(g.pick(&["Blue mug", "Desk lamp", "USB-C cable", "Notebook, A5"]))),
                    ("quantity", Value::Int(i + 1)),
                    ("unit_price_cents", Value::Int(g.num(100, 10_000) as i64)),
                ],
            )
        })
        .collect();
    let headers = Value::Map(Map {
        type_name: Some("HeaderMap".into()),
        entries: vec![
            (Value::str("content-type"), Value::str("application/json")),
            (Value::str("user-agent"), Value::str("Mozilla/5.0 (X11; Linux x86_64) Firefox/126.0")),
            (Value::str("x-request-id"), Value::str(g.hex(32))),
            (Value::str("accept-language"), Value::str("en-US,en;q=0.9")),
        ],
        omitted: 0,
    });
    object(
        "CheckoutRequest",
        vec![
            ("order_id", Value::str(format!("ORD-{}", g.num(100_000, 999_999)))),
            ("customer_id", Value::Int(g.num(1, 1_000_000) as i64)),
            ("currency", Value::str("EUR")),
            ("items", Value::List(List { type_name: Some("Vec".into()), items, omitted: 0 })),
            ("headers", headers),
            ("note", Value::str("Please leave the parcel at the back door if nobody answers, thanks!")),
            ("created_at", Value::str("2024-06-12T09:41:07.123Z")),
            ("trace_id", Value::str(g.hex(32))),
        ],
    )
}

/// A realistic snapshot hit: the order of [`order`] with `lines` lines, three spans.
pub fn hit(lines: usize) -> Hit {
    Hit {
        action_id: ActionId::generate(),
        seq: 1,
        time_ms: 1_795_000_000_000,
        location: HitLocation { file: "demo/src/shop.rs".into(), line: 501, module: Some("shop".into()), name: None },
        thread: Some(ThreadInfo { name: Some("tokio-rt-worker".into()), id: "3".into() }),
        fields: vec![
            Field::new("message", "order placed".into()),
            Field::new("order_id", Value::Int(1045)),
            Field::new("order", order(lines)),
        ],
        spans: (0..3)
            .map(|i| SpanFrame {
                name: format!("span{i}"),
                target: Some("shop".into()),
                file: Some("demo/src/shop.rs".into()),
                line: Some(100 + i),
                fields: vec![Field::new("user_id", Value::Int(1037)), Field::new("cart_id", Value::Int(1040))],
            })
            .collect(),
        watches: vec![],
        backtrace: None,
        truncation: TruncationSummary::default(),
        redactions: vec![],
        rules_version: 3,
        error: None,
        call: None,
    }
}

fn debug_output(n_bytes: usize) -> String {
    let mut g = Lcg(7);
    let mut out = String::new();
    while out.len() < n_bytes {
        out.push_str(&format!(
            "Request {{\n    method: GET,\n    uri: /api/v2/orders/{}?expand=items,\n    version: HTTP/1.1,\n    \
             headers: {{\n        \"host\": \"shop.internal:8080\",\n        \"accept\": \"application/json\",\n        \
             \"x-request-id\": \"{}\",\n    }},\n    body: OrderQuery {{\n        id: {},\n        include_items: true,\n        \
             since: Some(2024-06-{:02}T00:00:00Z),\n        tags: [\"priority\", \"eu-west-1\"],\n    }},\n}}\n",
            g.num(1, 1_000_000),
            g.hex(32),
            g.num(1, 1_000_000),
            g.num(1, 29)
        ));
    }
    out
}

/// Mostly clean service logs with one line in ten carrying PII or a secret: what a
/// typical mixed workload looks like.
fn mixed_line(g: &mut Lcg) -> String {
    if g.num(0, 9) == 0 { pii_line(g) } else { clean_line(g) }
}

/// The text cases of the redaction bench, by name: 256 KiB each, redacted line by line.
pub fn redaction_text_cases() -> Vec<(&'static str, String)> {
    vec![
        ("clean_log_lines", lines(256 * 1024, clean_line)),
        ("pii_dense_log_lines", lines(256 * 1024, pii_line)),
        ("mixed_log_lines", lines(256 * 1024, mixed_line)),
        ("debug_output", debug_output(256 * 1024)),
    ]
}

/// The value-tree case of the redaction bench: 64 checkout-request snapshots.
pub fn redaction_snapshots() -> Vec<Value> {
    let mut g = Lcg(3);
    (0..64).map(|_| snapshot(&mut g)).collect()
}
