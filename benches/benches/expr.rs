//! Cost of the expression language: parsing (once per action, in the broker and the
//! agent) and evaluation (at every hit, in the application's thread).
//!
//! Run: `cargo bench -p periscope-benches --bench expr`
//!
//! The scope is a `SimpleScope` shaped like a typical event: a handful of scalar
//! fields, one object three levels deep, and two active spans.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use periscope_protocol::expr::{Budget, SimpleScope, Template, parse_condition};
use periscope_protocol::value::{Field, List, Object, Value};

fn obj(name: &str, fields: Vec<(&str, Value)>) -> Value {
    Value::Object(Object {
        type_name: name.into(),
        fields: fields.into_iter().map(|(n, v)| Field::new(n, v)).collect(),
        omitted: 0,
    })
}

fn scope(status: &str, amount: i64) -> SimpleScope {
    let item = |sku: &str, price: f64| obj("Item", vec![("sku", Value::str(sku)), ("price", Value::Float(price))]);
    let order = obj(
        "Order",
        vec![
            ("id", Value::Int(9_001)),
            (
                "customer",
                obj(
                    "Customer",
                    vec![("id", Value::Int(7)), ("email", Value::str("ada@example.com")), ("tier", Value::str("gold"))],
                ),
            ),
            (
                "items",
                Value::List(List { type_name: None, items: vec![item("A1", 3.5), item("B2", 10.0)], omitted: 0 }),
            ),
        ],
    );
    SimpleScope::new()
        .with_field("message", "payment processed")
        .with_field("user.id", 42_i64)
        .with_field("currency", "EUR")
        .with_field("retries", 0_i64)
        .with_field("order", order)
        .with_field("status", status)
        .with_field("amount", amount)
        .with_span("charge", vec![Field::new("attempt", Value::Int(1))])
        .with_span("request", vec![Field::new("method", Value::str("POST")), Field::new("path", Value::str("/pay"))])
}

fn parse(c: &mut Criterion) {
    let typical = r#"status == "failed" && amount > 1000"#;
    c.bench_function("expr/parse/typical_condition", |b| b.iter(|| parse_condition(black_box(typical))));
    let larger = r#"(status in ["failed", "declined"] || retries > 2) && order.customer.tier == "gold" && span.request.method == "POST" && !order.customer.email.ends_with("@example.org")"#;
    c.bench_function("expr/parse/larger_condition", |b| b.iter(|| parse_condition(black_box(larger))));
    let template = "user {user.id} paid {amount} for {order.id}";
    c.bench_function("expr/parse/template", |b| b.iter(|| Template::parse(black_box(template))));
}

fn eval(c: &mut Criterion) {
    let cond = parse_condition(r#"status == "failed" && amount > 1000"#).expect("bench condition parses");
    let ok = scope("ok", 1_500);
    c.bench_function("expr/eval/false_condition_first_clause", |b| {
        b.iter(|| cond.eval_condition(black_box(&ok), &mut Budget::default()))
    });
    let small = scope("failed", 50);
    c.bench_function("expr/eval/false_condition_second_clause", |b| {
        b.iter(|| cond.eval_condition(black_box(&small), &mut Budget::default()))
    });
    let path = parse_condition(r#"order.customer.tier == "gold""#).expect("bench condition parses");
    c.bench_function("expr/eval/true_condition_3_segment_path", |b| {
        b.iter(|| path.eval_condition(black_box(&ok), &mut Budget::default()))
    });
    let larger = parse_condition(r#"(status in ["failed", "declined"] || retries > 2) && order.customer.tier == "gold" && span.request.method == "POST" && !order.customer.email.ends_with("@example.org")"#).expect("bench condition parses");
    let failed = scope("failed", 1_500);
    c.bench_function("expr/eval/larger_true_condition", |b| {
        b.iter(|| larger.eval_condition(black_box(&failed), &mut Budget::default()))
    });
}

fn template(c: &mut Criterion) {
    let t = Template::parse("user {user.id} paid {amount} {currency} for {order.id}").expect("bench template parses");
    let s = scope("ok", 1_500);
    c.bench_function("expr/template/render_4_placeholders", |b| {
        b.iter(|| {
            t.render(black_box(&s), &mut Budget::default(), |_, _, v| {
                black_box(v);
            })
        })
    });
}

criterion_group!(benches, parse, eval, template);
criterion_main!(benches);
