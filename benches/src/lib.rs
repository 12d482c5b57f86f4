//! Shared fixtures for the criterion benches in `benches/benches/` and the
//! instruction-count examples in `benches/examples/`.

use periscope_protocol::value::{List, Object};
use periscope_protocol::{ActionId, Field, Hit, HitLocation, SpanFrame, ThreadInfo, TruncationSummary, Value};

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
    }
}
