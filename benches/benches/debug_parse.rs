//! Throughput of turning `Debug` text back into captured values.
//!
//! Run with `cargo bench -p periscope-benches --bench debug_parse`.
//!
//! The input is the `{:?}` (and `{:#?}`) of a realistic shop order: a customer with an
//! address and a geo point (four levels deep), 40 line items, an audit trail of 150
//! entries, a long gift message and a few maps. Two limit settings are measured: the
//! defaults (depth 3, 100 items), where most of the text is skipped as balanced text,
//! and the hard maxima, where nearly all of it is built into values.

#![allow(missing_docs)]

use std::collections::BTreeMap;
use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use periscope_agent::debug_parse::parse_debug;
use periscope_protocol::CaptureLimits;

#[derive(Debug)]
#[allow(dead_code)] // read through Debug only
struct GeoPoint {
    lat: f64,
    lon: f64,
}

#[derive(Debug)]
#[allow(dead_code)]
struct Address {
    line1: String,
    line2: Option<String>,
    city: String,
    postcode: String,
    country: &'static str,
    geo: GeoPoint,
}

#[derive(Debug)]
#[allow(dead_code)]
struct Customer {
    id: u64,
    name: String,
    email: String,
    phone: String,
    address: Address,
}

#[derive(Debug)]
#[allow(dead_code)]
struct LineItem {
    sku: String,
    name: String,
    qty: u32,
    unit_price_cents: i64,
    tags: Vec<&'static str>,
}

#[derive(Debug)]
#[allow(dead_code)]
enum AuditEvent {
    Created { at_ms: u64 },
    ItemAdded { sku: String, qty: u32 },
    Priced(i64, i64),
    Note(String),
}

#[derive(Debug)]
#[allow(dead_code)]
enum Status {
    Placed,
    Paid { processor_ref: String },
}

#[derive(Debug)]
#[allow(dead_code)]
struct Order {
    id: u64,
    customer: Customer,
    items: Vec<LineItem>,
    subtotal_cents: i64,
    tax_cents: i64,
    discount_code: Option<String>,
    gift_message: String,
    status: Status,
    audit: Vec<AuditEvent>,
    attributes: BTreeMap<String, String>,
    dims: (u32, u32, f32),
}

fn order() -> Order {
    Order {
        id: 918_273,
        customer: Customer {
            id: 5_501,
            name: "Amélie Dubois".into(),
            email: "amelie.dubois@example.fr".into(),
            phone: "+33 6 12 34 56 78".into(),
            address: Address {
                line1: "12 rue de la \"Paix\"".into(),
                line2: Some("Bâtiment B, 3e étage".into()),
                city: "Paris".into(),
                postcode: "75002".into(),
                country: "FR",
                geo: GeoPoint { lat: 48.8686, lon: 2.3314 },
            },
        },
        items: (0..40)
            .map(|i| LineItem {
                sku: format!("SKU-{i:05}"),
                name: format!("Organic cotton T-shirt, size {}", ["S", "M", "L"][i % 3]),
                qty: 1 + (i as u32 % 4),
                unit_price_cents: 1_999 + (i as i64 * 137) % 5_000,
                tags: vec!["apparel", "summer"],
            })
            .collect(),
        subtotal_cents: 123_456,
        tax_cents: 24_691,
        discount_code: Some("WELCOME10".into()),
        gift_message: "Joyeux anniversaire ! 🎂 ".repeat(20),
        status: Status::Paid { processor_ref: "ch_3Pq8xY2eZvKYlo2C0x9".into() },
        audit: (0..150u64)
            .map(|i| match i % 4 {
                0 => AuditEvent::Created { at_ms: 1_764_000_000_000 + i },
                1 => AuditEvent::ItemAdded { sku: format!("SKU-{i:05}"), qty: 2 },
                2 => AuditEvent::Priced(i as i64 * 100, 20),
                _ => AuditEvent::Note(format!("line {i}: customer asked \"gift wrap\"\n")),
            })
            .collect(),
        attributes: (0..12).map(|i| (format!("attr_{i}"), format!("value {i}"))).collect(),
        dims: (30, 20, 1.5),
    }
}

fn bench(c: &mut Criterion) {
    let order = order();
    let inputs = [("compact", format!("{order:?}")), ("pretty", format!("{order:#?}"))];
    let limit_sets = [("default_limits", CaptureLimits::default()), ("hard_max_limits", CaptureLimits::HARD_MAX)];
    let mut group = c.benchmark_group("debug_parse");
    for (input_name, text) in &inputs {
        group.throughput(Throughput::Bytes(text.len() as u64));
        for (limits_name, limits) in &limit_sets {
            group.bench_function(format!("{input_name}/{limits_name}/{}B", text.len()), |b| {
                b.iter(|| parse_debug(black_box(text), limits))
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
